//! `cargo xtask image`: the `FROM scratch` image of the dist binary. Built twice from the dist
//! tarball it has the same digest; its config names the entrypoint, uid 0 and the OCI labels;
//! and the binary taken out of its root filesystem records. `podman run` is refused in this
//! sandbox (setrlimit), so the layers of the exported OCI archive are unpacked and the binary
//! is run from there.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use profiler_tests::{ship::*, *};
use serde_json::Value;

/// An OCI archive unpacked: `index.json`, `oci-layout` and `blobs/sha256/*`.
struct Archive {
    dir: PathBuf,
}

impl Archive {
    fn unpack(archive: &Path, dir: PathBuf) -> Self {
        untar(archive, &dir);
        Archive { dir }
    }

    /// The blob with `digest` (`sha256:hex`), its digest checked.
    fn blob(&self, digest: &str) -> Vec<u8> {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        let path = self.dir.join("blobs/sha256").join(hex);
        let sum = run_ok(Command::new("sha256sum").arg(&path));
        assert!(
            sum.starts_with(hex),
            "blob {digest} does not match its digest"
        );
        std::fs::read(path).unwrap()
    }

    fn json(&self, digest: &str) -> Value {
        serde_json::from_slice(&self.blob(digest)).unwrap()
    }

    /// The digest of the one manifest in index.json, with its tag.
    fn manifest_digest(&self) -> (String, String) {
        let index: Value =
            serde_json::from_slice(&std::fs::read(self.dir.join("index.json")).unwrap()).unwrap();
        let manifests = index["manifests"].as_array().unwrap();
        assert_eq!(manifests.len(), 1, "{index}");
        let tag = manifests[0]["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        (manifests[0]["digest"].as_str().unwrap().to_owned(), tag)
    }
}

/// Runs `xtask image --dist TARBALL -o ARCHIVE`; returns the digest it printed.
fn build_image(xtask: &Path, tarball: &Path, archive: &Path) -> String {
    let stdout = run_ok(
        Command::new(xtask)
            .args(["image", "--dist"])
            .arg(tarball)
            .arg("-o")
            .arg(archive),
    );
    let line = stdout.lines().last().unwrap_or_default();
    let (path, digest) = line.split_once(' ').expect("`ARCHIVE DIGEST` on stdout");
    assert_eq!(Path::new(path), archive);
    assert!(digest.starts_with("sha256:"), "{line}");
    digest.to_owned()
}

#[test]
fn image_is_reproducible_labelled_and_its_binary_records() {
    let (Some(xtask), Some(tarball)) = (xtask(), dist_tarball()) else {
        return;
    };
    let version = env!("CARGO_PKG_VERSION");
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.oci.tar");
    let second = dir.path().join("second.oci.tar");
    let digest = build_image(&xtask, &tarball, &first);
    // The second build unpacks the tarball again, so every file has a new mtime on disk.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(
        build_image(&xtask, &tarball, &second),
        digest,
        "two builds of one binary differ"
    );
    // (The archives' own tar headers carry the time of the export; the image inside is what
    // the digest names, and it is the same.)

    let archive = Archive::unpack(&first, dir.path().join("oci"));
    let (manifest_digest, tag) = archive.manifest_digest();
    assert_eq!(manifest_digest, digest);
    assert_eq!(tag, format!("profiler:{version}"));
    let manifest = archive.json(&manifest_digest);
    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    let config = archive.json(config_digest);
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["os"], "linux");
    let run = &config["config"];
    assert_eq!(
        run["Entrypoint"],
        serde_json::json!(["/usr/local/bin/profiler"])
    );
    assert_eq!(run["Cmd"], serde_json::json!(["agent"]));
    assert_eq!(run["User"], "0:0");
    let labels: BTreeMap<String, String> = serde_json::from_value(run["Labels"].clone()).unwrap();
    let label = |name: &str| {
        labels
            .get(&format!("org.opencontainers.image.{name}"))
            .unwrap_or_else(|| panic!("no org.opencontainers.image.{name} in {labels:?}"))
            .as_str()
    };
    assert_eq!(label("version"), version);
    assert_eq!(label("title"), "profiler");
    assert_eq!(label("licenses"), "MIT OR Apache-2.0");
    assert!(label("revision").len() == 40, "{labels:?}");
    assert!(label("created").ends_with('Z'), "{labels:?}");
    // The image is also in local storage under its name: the same image (its ID is the
    // config's digest).
    let stored = run_ok(Command::new("buildah").args([
        "inspect",
        "--type",
        "image",
        "--format",
        "{{.FromImageID}}",
        &format!("profiler:{version}"),
    ]));
    assert_eq!(format!("sha256:{}", stored.trim()), config_digest);

    // The root filesystem: the layers in order, and nothing but the binary and the CA bundle.
    let rootfs = dir.path().join("rootfs");
    for layer in manifest["layers"].as_array().unwrap() {
        let digest = layer["digest"].as_str().unwrap();
        archive.blob(digest);
        let path = archive.dir.join("blobs/sha256").join(&digest[7..]);
        untar(&path, &rootfs);
    }
    assert_eq!(
        files_under(&rootfs),
        [
            "etc/ssl/certs/ca-certificates.crt",
            "usr/local/bin/profiler"
        ]
    );
    let bundle = std::fs::read_to_string(rootfs.join("etc/ssl/certs/ca-certificates.crt")).unwrap();
    assert!(
        bundle.matches("BEGIN CERTIFICATE").count() > 50,
        "a thin CA bundle"
    );
    let binary = rootfs.join("usr/local/bin/profiler");

    // The binary keeps its GNU build-ID note: the one the debug tarball is named after.
    let unpacked = dir.path().join("dist");
    untar(&tarball, &unpacked);
    let dist_binary = unpacked
        .join(format!("profiler-{version}-x86_64-linux-musl"))
        .join("profiler");
    assert_eq!(read_build_id(&binary), read_build_id(&dist_binary));
    assert!(
        std::fs::read(&binary).unwrap() == std::fs::read(&dist_binary).unwrap(),
        "the image's binary differs from the dist tarball's"
    );

    // And it records: a one-second recording of the whole machine with a workload running.
    let Some(t) = bpf_test() else { return };
    let mut workload = Command::new(workload())
        .args(["burn", "3"])
        .spawn()
        .unwrap();
    let out = t.path("image.pb.gz");
    let result = output(Command::new(&binary).args([
        "record",
        "--all",
        "-F",
        "499",
        "-d",
        "1s",
        "-o",
        path_str(&out),
    ]));
    workload.kill().ok();
    workload.wait().ok();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "record failed: {stderr}");
    let samples = read_samples(&out);
    assert!(
        has_function(&samples, "burn_inner"),
        "the workload's frames are missing; stderr: {stderr}"
    );
    let profile = load_pprof(&out);
    let seconds = profile.duration_nanos as f64 / 1e9;
    assert!((0.9..2.0).contains(&seconds), "recorded for {seconds} s");
}

#[test]
fn compose_file_runs_the_release_image() {
    let compose = std::fs::read_to_string(root().join("deploy/docker-compose.yaml")).unwrap();
    // The agent service: the lines indented deeper than its `  agent:` key.
    let agent: Vec<&str> = compose
        .lines()
        .skip_while(|line| *line != "  agent:")
        .skip(1)
        .take_while(|line| line.is_empty() || line.starts_with("   "))
        .collect();
    let image = format!("image: profiler:{}", env!("CARGO_PKG_VERSION"));
    assert!(
        agent.iter().any(|line| line.trim() == image),
        "the agent does not use {image}: {agent:#?}"
    );
    assert!(
        !agent
            .iter()
            .any(|line| line.trim_start().starts_with("build:")),
        "the agent builds its own image: {agent:#?}"
    );
}
