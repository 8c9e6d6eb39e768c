//! Generates prost types from our .proto files with protox, a pure-Rust protobuf compiler, so
//! the build needs no `protoc` on the machine.
fn main() -> anyhow::Result<()> {
    // pprof: plain messages, no services.
    let protos = ["proto/profile.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;

    // Pyroscope's push API: messages plus the tonic client and server for PusherService
    // (the server is what tests stand up). No transport-specific helpers (`connect`), so this
    // crate only needs tonic's `codegen` feature; callers bring their own Channel.
    let push_protos = ["proto/push/v1/push.proto", "proto/types/v1/types.proto"];
    for proto in push_protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(push_protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        // Profiles are handed over as `Bytes` so a retried upload is not copied per attempt.
        .bytes(".push.v1.RawSample.raw_profile")
        .compile_fds(descriptors)?;
    Ok(())
}
