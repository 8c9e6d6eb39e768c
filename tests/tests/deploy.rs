//! The deployment files under deploy/kubernetes: every manifest validates against the Kubernetes
//! API schemas, kustomization.yaml lists them all, and the ConfigMap carries an agent
//! configuration with the expected keys.
//!
//! Validation shells out to kubernetes-validate (PyPI), which `cargo xtask setup` installs into
//! the `python3` on PATH. Where it is missing these tests skip with a printed reason; with
//! CI=true they fail instead, since CI runs setup first.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use profiler_tests::kubernetes_validate;

/// The agent's top-level configuration keys (its flags in snake_case; the agent rejects others).
const CONFIG_KEYS: &[&str] = &[
    "pyroscope_url",
    "otlp_endpoint",
    "otlp_protocol",
    "otlp_headers",
    "otlp_header_files",
    "otlp_ca_cert",
    "otlp_compression",
    "max_in_flight",
    "max_request_bytes",
    "frequency",
    "upload_interval",
    "labels",
    "tenant_id",
    "basic_auth_user",
    "basic_auth_password_file",
    "ca_cert",
    "protocol",
    "metrics_addr",
    "node_name",
    "queue_bytes",
    "shutdown_timeout",
    "kubeconfig",
    "max_series",
    "pod_wait",
    "thread_names",
    "relabel_configs",
];

/// deploy/kubernetes in the workspace.
fn kubernetes_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// The contents of deploy/kubernetes/NAME.
fn read(name: &str) -> String {
    let path = kubernetes_dir().join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// File names of the YAML files in deploy/kubernetes but kustomization.yaml, sorted.
fn manifests() -> BTreeSet<String> {
    let dir = kubernetes_dir();
    let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    entries
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".yaml") || name.ends_with(".yml"))
        .filter(|name| name != "kustomization.yaml")
        .collect()
}

#[test]
fn manifests_validate_strictly() {
    let files = manifests();
    assert!(files.len() >= 7, "too few manifests: {files:?}");
    kubernetes_validate(&kubernetes_dir(), &files.iter().collect::<Vec<_>>());
}

/// The entries of the top-level `resources:` list of a kustomization, read line by line.
fn kustomize_resources(text: &str) -> BTreeSet<String> {
    let mut resources = BTreeSet::new();
    let mut in_resources = false;
    for line in text.lines() {
        let line = line.split(" #").next().unwrap().trim_end();
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        if !line.starts_with(' ') && !line.starts_with('-') {
            in_resources = line == "resources:";
            continue;
        }
        if in_resources {
            let item = line.trim_start().strip_prefix("- ");
            let item = item.unwrap_or_else(|| panic!("not a list item under resources: {line}"));
            resources.insert(item.trim().trim_matches(['"', '\'']).to_owned());
        }
    }
    resources
}

#[test]
fn kustomization_lists_every_manifest() {
    let listed = kustomize_resources(&read("kustomization.yaml"));
    assert_eq!(
        listed,
        manifests(),
        "kustomization.yaml's resources (left) differ from the YAML files in deploy/kubernetes"
    );
}

/// The block scalar under `config.toml: |` in configmap.yaml, without its indentation.
fn config_toml(configmap: &str) -> String {
    let mut lines = configmap.lines();
    let key_indent = lines
        .by_ref()
        .find_map(|line| {
            (line.trim() == "config.toml: |").then(|| line.len() - line.trim_start().len())
        })
        .expect("no `config.toml: |` in configmap.yaml");
    let block: Vec<&str> = lines
        .take_while(|line| {
            line.trim().is_empty() || line.len() - line.trim_start().len() > key_indent
        })
        .collect();
    let indent = block
        .iter()
        .filter(|line| !line.trim().is_empty())
        .map(|line| line.len() - line.trim_start().len())
        .min()
        .expect("config.toml is empty");
    block
        .iter()
        .map(|line| line.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Keys set before the first table header (`[...]`), comments skipped.
fn top_level_keys(toml: &str) -> BTreeSet<String> {
    toml.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .take_while(|line| !line.starts_with('['))
        .map(|line| {
            let (key, _) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("not `key = value`: {line}"));
            key.trim().to_owned()
        })
        .collect()
}

/// The top-level keys of `toml` as Python's tomllib parses them, or None (printed) where
/// python3 has no tomllib (before 3.11).
fn tomllib_keys(toml: &str) -> Option<BTreeSet<String>> {
    let script = "import sys\n\
                  try:\n    import tomllib\n\
                  except ImportError:\n    sys.exit(3)\n\
                  print('\\n'.join(tomllib.loads(sys.stdin.read())))";
    let mut child = match Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            eprintln!("skipped parsing config.toml: cannot run python3: {e}");
            return None;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(toml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.code() == Some(3) {
        eprintln!("skipped parsing config.toml: python3 has no tomllib (3.11+)");
        return None;
    }
    assert!(
        out.status.success(),
        "config.toml does not parse as TOML:\n{}\n{toml}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect(),
    )
}

#[test]
fn configmap_holds_the_agent_config() {
    let toml = config_toml(&read("configmap.yaml"));
    let keys = top_level_keys(&toml);
    for key in &keys {
        assert!(
            CONFIG_KEYS.contains(&key.as_str()),
            "unknown config key `{key}` in configmap.yaml; known: {CONFIG_KEYS:?}"
        );
    }
    for key in ["frequency", "upload_interval", "labels"] {
        assert!(
            keys.contains(key),
            "`{key}` missing from config.toml:\n{toml}"
        );
    }
    assert!(
        toml.contains("[[relabel_configs]]"),
        "no relabel_configs example in config.toml"
    );
    if let Some(parsed) = tomllib_keys(&toml) {
        assert_eq!(parsed, keys, "tomllib (left) and the line reader disagree");
    }

    // The DaemonSet mounts this ConfigMap where its arguments look for the file.
    let daemonset = read("daemonset.yaml");
    for needle in [
        "name: profiler-config",
        "mountPath: /etc/profiler\n",
        "\"--config\", \"/etc/profiler/config.toml\"",
    ] {
        assert!(
            daemonset.contains(needle),
            "`{needle}` missing from daemonset.yaml"
        );
    }
}
