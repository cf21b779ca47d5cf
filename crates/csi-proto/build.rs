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
    Ok(())
}
