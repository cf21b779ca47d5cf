"""A CSI client written with Python's grpcio, for tests/clients.rs.

Connects to the driver as `unix://<socket>` with grpcio's DEFAULT channel
options (no grpc.default_authority: the point is to send what grpcio sends
by default) and makes the calls it reads from stdin, one per line:
`<full method name> <request as hex>`. Requests and replies stay serialized
protobuf: the Rust test encodes and decodes them with the driver's own
generated types, so this file needs no generated code. Prints one line per
call: `OK <reply as hex>` or `<CODE> <details>`.
"""

import sys

import grpc


def main() -> None:
    socket = sys.argv[1]
    with grpc.insecure_channel("unix://" + socket) as channel:
        for line in sys.stdin:
            method, request = line.rstrip("\n").split(" ")
            # No serializers: grpcio sends and returns the bytes as they are.
            rpc = channel.unary_unary(method)
            try:
                reply = rpc(bytes.fromhex(request), timeout=30)
                print("OK " + reply.hex(), flush=True)
            except grpc.RpcError as e:
                details = (e.details() or "").replace("\n", " ")
                print(f"{e.code().name} {details}", flush=True)


if __name__ == "__main__":
    main()
