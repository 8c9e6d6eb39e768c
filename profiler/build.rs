//! Builds the eBPF programs (profiler-ebpf, on nightly for bpfel) and leaves the object in
//! OUT_DIR, where `collect` embeds it with `include_bytes_aligned!`.
fn main() -> anyhow::Result<()> {
    // aya-build skips the eBPF build under AYA_BUILD_SKIP=1, for builds that never load the
    // programs (the fuzz targets, whose sanitizer flags the eBPF crate must not see). An empty
    // object keeps `collect` compiling; it refuses to start with it.
    let skip = std::env::var_os("AYA_BUILD_SKIP")
        .is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        let out_dir = std::env::var_os("OUT_DIR").ok_or_else(|| anyhow::anyhow!("no OUT_DIR"))?;
        std::fs::write(std::path::Path::new(&out_dir).join("profiler-ebpf"), [])?;
    }
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../profiler-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "profiler-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
