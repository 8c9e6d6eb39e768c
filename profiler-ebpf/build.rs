//! Fails early, with a useful message, when bpf-linker is missing: `cargo xtask setup` installs it.
fn main() {
    if which::which("bpf-linker").is_err() {
        println!("cargo:warning=bpf-linker not found on PATH; run `cargo xtask setup`");
    }
}
