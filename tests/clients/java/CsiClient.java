// A CSI client written with grpc-java, for tests/clients.rs.
//
// Connects to the driver as unix://<socket> with grpc-java's DEFAULT
// channel settings (no overrideAuthority: the point is to send what
// grpc-java sends by default) and makes the calls it reads from stdin, one
// per line: "<full method name> <request as hex>". Requests and replies stay
// serialized protobuf: the Rust test encodes and decodes them with the
// driver's own generated types, so this file needs no generated code.
// Prints one line per call: "OK <reply as hex>" or "<CODE> <description>".

import io.grpc.CallOptions;
import io.grpc.Grpc;
import io.grpc.InsecureChannelCredentials;
import io.grpc.ManagedChannel;
import io.grpc.MethodDescriptor;
import io.grpc.StatusRuntimeException;
import io.grpc.stub.ClientCalls;
import java.io.BufferedReader;
import java.io.ByteArrayInputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.util.HexFormat;
import java.util.concurrent.TimeUnit;

public final class CsiClient {
  /** Passes serialized messages through as they are. */
  static final class Bytes implements MethodDescriptor.Marshaller<byte[]> {
    @Override
    public InputStream stream(byte[] value) {
      return new ByteArrayInputStream(value);
    }

    @Override
    public byte[] parse(InputStream stream) {
      try {
        return stream.readAllBytes();
      } catch (IOException e) {
        throw new RuntimeException(e);
      }
    }
  }

  public static void main(String[] args) throws Exception {
    ManagedChannel channel =
        Grpc.newChannelBuilder("unix://" + args[0], InsecureChannelCredentials.create()).build();
    HexFormat hex = HexFormat.of();
    BufferedReader in =
        new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
    String line;
    while ((line = in.readLine()) != null) {
      String[] parts = line.split(" ", -1);
      MethodDescriptor<byte[], byte[]> method =
          MethodDescriptor.<byte[], byte[]>newBuilder()
              .setType(MethodDescriptor.MethodType.UNARY)
              .setFullMethodName(parts[0].substring(1))
              .setRequestMarshaller(new Bytes())
              .setResponseMarshaller(new Bytes())
              .build();
      try {
        byte[] reply =
            ClientCalls.blockingUnaryCall(
                channel,
                method,
                CallOptions.DEFAULT.withDeadlineAfter(30, TimeUnit.SECONDS),
                hex.parseHex(parts[1]));
        System.out.println("OK " + hex.formatHex(reply));
      } catch (StatusRuntimeException e) {
        String what = String.valueOf(e.getStatus().getDescription()).replace('\n', ' ');
        System.out.println(e.getStatus().getCode() + " " + what);
      }
      System.out.flush();
    }
    channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
  }
}
