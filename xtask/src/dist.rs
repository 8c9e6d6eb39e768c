//! `cargo xtask dist` and `cargo xtask image`: what a user installs instead of building.
//!
//! `dist` builds a static musl binary (the eBPF object is embedded by profiler/build.rs as in
//! every build), moves its debug information into a file named after its GNU build ID, and packs
//! both into reproducible tarballs with a `SHA256SUMS`. `image` puts that very binary and the CA
//! bundle into a `FROM scratch` image with buildah and exports it as an OCI archive.
//!
//! Both are reproducible from a commit: archive timestamps, the image's creation time and its
//! layer timestamps all come from `SOURCE_DATE_EPOCH`, by default the commit's time.

use std::env;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

use crate::{run, run_capture, workspace_root};

/// The one target we ship; arm64 would be a second entry once someone can test it.
pub const TARGET: &str = "x86_64-unknown-linux-musl";

/// The target as it appears in file names.
const PLATFORM: &str = "x86_64-linux-musl";

/// The version of every workspace crate (xtask shares `version.workspace`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The image name and tag that `image` builds, which the deployment files reference.
pub fn image_name() -> String {
    format!("profiler:{VERSION}")
}

/// Where the CA bundle of Debian's `ca-certificates` is, on the build host and in the image
/// (rustls-native-certs looks there first).
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The release artifacts `dist` writes.
pub struct Dist {
    /// `target/dist/profiler-<version>-x86_64-linux-musl.tar.gz`: the stripped binary.
    pub tarball: PathBuf,
    /// `...-debug.tar.gz`: `.build-id/xx/rest.debug`, to unpack into `/usr/lib/debug`.
    pub debug_tarball: PathBuf,
}

/// `cargo xtask dist`: setup, then [`build_dist`].
pub fn dist(args: &[OsString]) -> Result<()> {
    crate::no_args("dist", args)?;
    crate::setup()?;
    let dist = build_dist()?;
    println!("{}", dist.tarball.display());
    println!("{}", dist.debug_tarball.display());
    println!("{}", dist_dir().join("SHA256SUMS").display());
    Ok(())
}

/// `cargo xtask image [--dist TARBALL] [-o ARCHIVE]`: builds `profiler:<version>` from the dist
/// tarball (built first unless given) and exports it as an OCI archive.
pub fn image(args: &[OsString]) -> Result<()> {
    let mut tarball = None;
    let mut archive = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .map(PathBuf::from)
                .with_context(|| format!("`image {name}` needs a path"))
        };
        match arg.to_str() {
            Some("--dist") => tarball = Some(value("--dist")?),
            Some("-o" | "--output") => archive = Some(value("--output")?),
            _ => bail!(
                "`image` takes `--dist TARBALL` and `-o ARCHIVE`, got `{}`",
                arg.display()
            ),
        }
    }
    let tarball = match tarball {
        // A given tarball is what the tests pass, after `cargo xtask test` ran setup and dist.
        Some(tarball) => tarball,
        None => {
            crate::setup()?;
            build_dist()?.tarball
        }
    };
    let archive = archive.unwrap_or_else(|| dist_dir().join(image_archive_name()));
    let digest = build_image(&tarball, &archive)?;
    if archive.parent() == Some(dist_dir().as_path()) {
        write_sums()?;
    }
    println!("{} {digest}", archive.display());
    Ok(())
}

/// `target/dist`.
pub fn dist_dir() -> PathBuf {
    workspace_root().join("target/dist")
}

/// The binary package's directory and file stem: `profiler-<version>-x86_64-linux-musl`.
fn package_name() -> String {
    format!("profiler-{VERSION}-{PLATFORM}")
}

/// The OCI archive `image` writes by default.
fn image_archive_name() -> String {
    format!("profiler-{VERSION}-linux-amd64.oci.tar")
}

/// Builds the static binary, splits off its debug information and writes both tarballs and
/// `SHA256SUMS` into `target/dist`.
pub fn build_dist() -> Result<Dist> {
    let binary = build_static_binary()?;
    let build_id = build_id(&binary)?;
    let dir = dist_dir();
    let name = package_name();
    let staging = dir.join(&name);
    let debug_name = format!("{name}-debug");
    let debug_staging = dir.join(&debug_name);
    for stale in [&staging, &debug_staging] {
        remove_dir_if_exists(stale)?;
    }
    fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;

    // gdb, elfutils and our own --debug-dir find it as .build-id/xx/rest.debug under a debug
    // directory; blazesym follows the debug link, which names the same file.
    let (head, rest) = build_id.split_at(2);
    let debug_file = debug_staging
        .join(".build-id")
        .join(head)
        .join(format!("{rest}.debug"));
    fs::create_dir_all(debug_file.parent().unwrap())
        .with_context(|| format!("creating {}", debug_file.display()))?;
    run(Command::new("objcopy")
        .arg("--only-keep-debug")
        .arg(&binary)
        .arg(&debug_file))?;
    // --strip-debug keeps the symbol table, so even without the debug file every function of
    // the profiler has its name (in its own profiles and in a panic's backtrace).
    let shipped = staging.join("profiler");
    run(Command::new("objcopy")
        .arg("--strip-debug")
        .arg(format!("--add-gnu-debuglink={}", debug_file.display()))
        .arg(&binary)
        .arg(&shipped))?;
    ensure!(
        self::build_id(&shipped)? == build_id,
        "stripping changed the build ID of {}",
        shipped.display()
    );
    fs::copy(
        workspace_root().join("README.md"),
        staging.join("README.md"),
    )
    .context("copying README.md")?;

    let tarball = dir.join(format!("{name}.tar.gz"));
    let debug_tarball = dir.join(format!("{debug_name}.tar.gz"));
    // The binary's directory is the tarball's single top-level entry; the debug tarball holds
    // `.build-id/` itself, to unpack into /usr/lib/debug (or a --debug-dir).
    write_tarball(&tarball, &dir, &name)?;
    write_tarball(&debug_tarball, &debug_staging, ".build-id")?;
    write_sums()?;
    Ok(Dist {
        tarball,
        debug_tarball,
    })
}

/// What building for [`TARGET`] needs in the environment.
pub fn target_env(cmd: &mut Command) {
    // ring's C and assembly parts; musl-gcc (musl-tools) compiles against musl's headers.
    cmd.env("CC_x86_64_unknown_linux_musl", "musl-gcc")
        // The build ID names the debug file and the profiles' mappings. Debian's gcc asks ld for
        // one anyway; asking explicitly keeps that true with any linker driver.
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_RUSTFLAGS",
            "-C link-arg=-Wl,--build-id=sha1",
        );
}

/// The suite's release profiler (static musl, see `SUITE`), checked static.
fn build_static_binary() -> Result<PathBuf> {
    crate::build_profiler()?;
    let binary = crate::profiler_bin();
    let headers = run_capture(
        Command::new("readelf")
            .args(["--program-headers", "--dynamic"])
            .arg(&binary),
    )?;
    ensure!(
        !headers.contains("INTERP") && !headers.contains("(NEEDED)"),
        "{} is not static: it names an interpreter or shared libraries",
        binary.display()
    );
    Ok(binary)
}

/// The hex GNU build ID of an ELF file, from `readelf -n`.
pub fn build_id(elf: &Path) -> Result<String> {
    let notes = run_capture(Command::new("readelf").arg("-n").arg(elf))?;
    notes
        .lines()
        .find_map(|line| line.trim().strip_prefix("Build ID: "))
        .map(|id| id.trim().to_owned())
        .filter(|id| id.len() > 2 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .with_context(|| format!("{} has no GNU build-ID note", elf.display()))
}

/// Writes `dir/entry` as a gzipped tarball that depends only on the files' contents and modes:
/// sorted names, uid/gid 0, mtimes of `SOURCE_DATE_EPOCH`, no gzip timestamp.
fn write_tarball(tarball: &Path, dir: &Path, entry: &str) -> Result<()> {
    let epoch = source_date_epoch()?;
    run(Command::new("tar")
        .args([
            "--sort=name",
            "--format=gnu",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
        ])
        .arg(format!("--mtime=@{epoch}"))
        .args(["--use-compress-program", "gzip -9n", "-cf"])
        .arg(tarball)
        .arg("-C")
        .arg(dir)
        .arg(entry))
}

/// Rewrites `target/dist/SHA256SUMS` over this version's artifacts found there.
fn write_sums() -> Result<()> {
    let dir = dist_dir();
    let prefix = format!("profiler-{VERSION}-");
    let mut artifacts = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let is_artifact = name.ends_with(".tar.gz") || name.ends_with(".oci.tar");
        if name.starts_with(&prefix) && is_artifact {
            artifacts.push(name);
        }
    }
    artifacts.sort();
    let sums = run_capture(Command::new("sha256sum").current_dir(&dir).args(&artifacts))?;
    let path = dir.join("SHA256SUMS");
    fs::write(&path, sums).with_context(|| format!("writing {}", path.display()))
}

/// Seconds since the epoch that every timestamp in the artifacts is set to: `SOURCE_DATE_EPOCH`
/// when set, else the time of the commit checked out, else 0 (outside a git checkout).
fn source_date_epoch() -> Result<u64> {
    if let Some(value) = env::var_os("SOURCE_DATE_EPOCH") {
        let text = value.to_string_lossy();
        return text
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={text} is not a number of seconds"));
    }
    Ok(git(&["log", "-1", "--format=%ct"])
        .and_then(|time| time.parse().ok())
        .unwrap_or(0))
}

/// The output of `git ARGS` at the workspace root, trimmed, or None outside a checkout.
fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git")
        .current_dir(workspace_root())
        .args(args)
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// `rm -rf dir`, quietly accepting that it is not there.
fn remove_dir_if_exists(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Builds [`image_name`] from the binary in `tarball` with buildah, exports it to `archive` (an
/// OCI archive) and returns its manifest digest.
///
/// The context holds exactly two files, so nothing else can leak into the image, and it is
/// built beside the archive so that two builds at once do not share one.
pub fn build_image(tarball: &Path, archive: &Path) -> Result<String> {
    let mut context = archive.as_os_str().to_owned();
    context.push(".context");
    let context = PathBuf::from(context);
    remove_dir_if_exists(&context)?;
    fs::create_dir_all(&context).with_context(|| format!("creating {}", context.display()))?;
    run(Command::new("tar")
        .arg("-xzf")
        .arg(tarball)
        .arg("-C")
        .arg(&context)
        .args(["--strip-components=1", "--wildcards", "*/profiler"]))?;
    fs::copy(CA_BUNDLE, context.join("ca-certificates.crt")).with_context(|| {
        format!("copying {CA_BUNDLE} (Debian's ca-certificates, which setup installs)")
    })?;

    let epoch = source_date_epoch()?;
    let created = run_capture(Command::new("date").args([
        "-u",
        &format!("--date=@{epoch}"),
        "+%Y-%m-%dT%H:%M:%SZ",
    ]))?;
    let revision = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let name = image_name();
    run(Command::new("buildah")
        .arg("build")
        // FROM scratch: nothing to pull, and nothing may be, so that it builds offline.
        .arg("--pull=never")
        // Creation time and layer timestamps, which buildah 1.28 does not take from
        // SOURCE_DATE_EPOCH; without the buildah version label, the digest does not depend
        // on which buildah built it either.
        .arg(format!("--timestamp={epoch}"))
        .arg("--identity-label=false")
        .arg("--file")
        .arg(workspace_root().join("deploy/docker/Containerfile"))
        .args(["--build-arg", &format!("VERSION={VERSION}")])
        .args(["--build-arg", &format!("REVISION={revision}")])
        .args(["--build-arg", &format!("CREATED={}", created.trim())])
        .args(["--tag", &name])
        .arg(&context))?;
    remove_dir_if_exists(&context)?;

    if archive.exists() {
        fs::remove_file(archive).with_context(|| format!("removing {}", archive.display()))?;
    }
    let mut digest_file = archive.as_os_str().to_owned();
    digest_file.push(".digest");
    let digest_file = PathBuf::from(digest_file);
    run(Command::new("buildah")
        .args(["push", "--quiet", "--digestfile"])
        .arg(&digest_file)
        .arg(&name)
        .arg(format!("oci-archive:{}:{name}", archive.display())))?;
    let digest = fs::read_to_string(&digest_file)
        .with_context(|| format!("reading {}", digest_file.display()))?;
    fs::remove_file(&digest_file).with_context(|| format!("removing {}", digest_file.display()))?;
    Ok(digest.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tarballs_depend_only_on_contents() {
        let dir = env::temp_dir().join(format!("xtask-dist-test-{}", std::process::id()));
        let tarball = |name: &str, mtime: &str| {
            let tree = dir.join("pkg");
            remove_dir_if_exists(&tree).unwrap();
            fs::create_dir_all(tree.join("sub")).unwrap();
            fs::write(tree.join("b"), "b").unwrap();
            fs::write(tree.join("sub/a"), "a").unwrap();
            run(Command::new("touch")
                .args(["-d", mtime])
                .arg(tree.join("b"))
                .arg(tree.join("sub/a")))
            .unwrap();
            let out = dir.join(name);
            write_tarball(&out, &dir, "pkg").unwrap();
            fs::read(out).unwrap()
        };
        let first = tarball("1.tar.gz", "2001-01-01");
        let second = tarball("2.tar.gz", "2022-02-02");
        remove_dir_if_exists(&dir).unwrap();
        assert_eq!(first, second);
        // gzip without a name or timestamp: bytes 4..8 (MTIME) are zero.
        assert_eq!(&first[..2], b"\x1f\x8b");
        assert_eq!(&first[4..8], &[0, 0, 0, 0]);
    }
}
