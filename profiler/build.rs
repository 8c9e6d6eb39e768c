//! Builds the eBPF programs (profiler-ebpf, on nightly for bpfel) and leaves the object in
//! OUT_DIR, where `collect` embeds it with `include_bytes_aligned!`.
fn main() -> anyhow::Result<()> {
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
