//! Compiles `proto/csi.proto` and the kubelet's plugin registration API
//! (`proto/pluginregistration/v1/api.proto`) into Rust with protox, a
//! pure-Rust protobuf compiler, so building needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/csi.proto");
    println!("cargo:rerun-if-changed=proto/pluginregistration/v1/api.proto");
    let descriptors = protox::compile(["csi.proto", "pluginregistration/v1/api.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .generate_default_stubs(true)
        .codec_path("crate::codec::CsiCodec")
        .compile_fds(descriptors)?;
    // The CSI services' descriptors (with their imports), for the
    // driver's gRPC reflection service: grpcurl and similar tools can then
    // call the driver by hand without a copy of csi.proto.
    let csi = protox::compile(["csi.proto"], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("csi_descriptor_set.bin"),
        prost::Message::encode_to_vec(&csi),
    )?;
    Ok(())
}
