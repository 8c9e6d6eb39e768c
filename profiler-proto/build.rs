//! Generates prost types from our .proto files with protox, a pure-Rust protobuf compiler, so
//! the build needs no `protoc` on the machine.
fn main() -> anyhow::Result<()> {
    let protos = ["proto/profile.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
