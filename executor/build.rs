//! Compiles the control-plane protos with protox (pure Rust), so that building dstream
//! needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/dstream.proto");
    let descriptors = protox::compile(["proto/dstream.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
