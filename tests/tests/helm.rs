//! The Helm chart in deploy/helm/profiler, rendered and linted by Helm's own engine (PyPI
//! helm-python-sdk binds Helm's Go library; no helm binary), with default and non-default
//! values: the output validates against the Kubernetes 1.30 schemas, the wiring of URLs,
//! tenant, Secrets and capabilities is what the values say, and with the defaults the
//! DaemonSet is the one in deploy/kubernetes.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use profiler_tests::{kubernetes_validate_except, python_module, root};
use serde_json::{json, Value};

/// Renders (`render`) or lints (`lint`) the chart at argv[2] with the JSON values in argv[3]:
/// prints JSON, {"templates": {path: text}, "docs": [{"template", "doc"}]} or Helm's lint
/// report. A render error is printed as {"error": ...} so that tests can expect one.
const HELM_PY: &str = r#"
import json, sys
import yaml
import helm_python as helm
command, chart, values = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if command == "lint":
    print(json.dumps(helm.lint(chart, values, strict=True, kube_version="v1.30.0")))
    sys.exit(0)
with helm.Chart.load(chart) as c:
    try:
        c.validate_schema(values)
        templates = c.render(values, name="profiler", namespace="profiler", is_install=True)
    except helm.HelmError as e:
        print(json.dumps({"error": str(e)}))
        sys.exit(0)
docs = []
for path, text in sorted(templates.items()):
    if path.endswith((".yaml", ".yml")):
        for doc in yaml.safe_load_all(text):
            if doc is not None:
                docs.append({"template": path, "doc": doc})
print(json.dumps({"templates": templates, "docs": docs}))
"#;

fn chart() -> PathBuf {
    root().join("deploy/helm/profiler")
}

/// Runs HELM_PY, or None where helm-python-sdk is missing (a failure with CI=true).
fn helm(command: &str, values: &Value) -> Option<Value> {
    if !python_module("helm_python", "helm-python-sdk") {
        return None;
    }
    let out = Command::new("python3")
        .args(["-c", HELM_PY, command])
        .arg(chart())
        .arg(values.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm {command} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

/// The rendered chart.
struct Rendered(Value);

impl Rendered {
    fn new(values: Value) -> Option<Rendered> {
        let out = helm("render", &values)?;
        assert!(
            out.get("error").is_none(),
            "render failed: {}",
            out["error"]
        );
        Some(Rendered(out))
    }

    fn kinds(&self) -> BTreeSet<String> {
        self.docs()
            .map(|d| d["kind"].as_str().unwrap().to_owned())
            .collect()
    }

    fn docs(&self) -> impl Iterator<Item = &Value> {
        self.0["docs"].as_array().unwrap().iter().map(|d| &d["doc"])
    }

    /// The one object of `kind`.
    fn one(&self, kind: &str) -> &Value {
        let found: Vec<&Value> = self.docs().filter(|d| d["kind"] == kind).collect();
        assert_eq!(found.len(), 1, "expected one {kind}, got {}", found.len());
        found[0]
    }

    fn container(&self) -> &Value {
        &self.one("DaemonSet")["spec"]["template"]["spec"]["containers"][0]
    }

    fn env(&self, name: &str) -> Option<&Value> {
        self.container()["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
    }

    fn args(&self) -> Vec<&str> {
        self.container()["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect()
    }

    /// The rendered manifests, one file per template, for kubernetes-validate.
    fn write(&self, dir: &Path) -> Vec<String> {
        let mut files = Vec::new();
        for (path, text) in self.0["templates"].as_object().unwrap() {
            let text = text.as_str().unwrap();
            if !path.ends_with(".yaml") || text.trim().is_empty() {
                continue;
            }
            let name = path.rsplit('/').next().unwrap().to_owned();
            std::fs::write(dir.join(&name), text).unwrap();
            files.push(name);
        }
        files
    }
}

/// Non-default values touching every wiring the chart has.
fn custom_values() -> Value {
    json!({
        "image": {"repository": "registry.example.com/profiler", "tag": "0.1.0-rc1", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}, "other-registry"],
        "pyroscope": {
            "url": "https://profiles.example.com",
            "protocol": "http",
            "tenantId": "team-a",
            "basicAuth": {"username": "123456", "existingSecret": "pyroscope-credentials", "passwordKey": "token"}
        },
        "otlp": {
            "endpoint": "http://otel-collector.observability:4317",
            "protocol": "grpc",
            "headers": [
                {"name": "Authorization", "secretName": "otlp-credentials", "secretKey": "authorization"},
                {"name": "X-Scope-OrgID", "value": "team-a"}
            ]
        },
        "frequency": 49,
        "uploadInterval": "30s",
        "queueBytes": 16777216,
        "labels": {"cluster": "prod-eu-1"},
        "relabelConfigs": [
            {"source_labels": ["__meta_kubernetes_namespace"], "regex": "kube-system", "action": "drop"}
        ],
        "extraArgs": ["--shutdown-timeout", "20s"],
        "extraEnv": [{"name": "RUST_LOG", "value": "debug"}],
        "resources": {"limits": {"memory": "512Mi"}},
        "priorityClassName": "system-node-critical",
        "podAnnotations": {},
        "podLabels": {"team": "observability"},
        "serviceMonitor": {"enabled": true, "interval": "15s", "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": true, "labels": {"release": "kube-prometheus-stack"}},
        "dashboards": {"enabled": true, "annotations": {"grafana_folder": "Profiling"}}
    })
}

#[test]
fn chart_lints_with_default_and_custom_values() {
    for values in [json!({}), custom_values()] {
        let Some(report) = helm("lint", &values) else {
            return;
        };
        assert_eq!(report["errors"], json!([]), "{values}: {report}");
        // Only "info" findings (an icon is recommended) are allowed.
        for message in report["messages"].as_array().unwrap() {
            assert!(message["severity"].as_i64().unwrap() < 2, "{message}");
        }
    }
    // Lint can fail: a password inlined in the values breaks the schema.
    let bad = json!({"pyroscope": {"basicAuth": {"username": "u", "password": "hunter2"}}});
    let report = helm("lint", &bad).unwrap();
    assert!(
        report["errors"].to_string().contains("password"),
        "{report}"
    );
}

#[test]
fn rendered_manifests_validate_strictly() {
    for values in [json!({}), custom_values()] {
        let Some(rendered) = Rendered::new(values.clone()) else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let files = rendered.write(dir.path());
        // Custom resources have no schema there, only a warning: custom_values_wire_everything
        // checks the ServiceMonitor and the PrometheusRule field by field.
        let crds = ["servicemonitor.yaml", "prometheusrule.yaml"];
        kubernetes_validate_except(dir.path(), &files, &crds);
    }
}

#[test]
fn default_values_run_one_unprivileged_agent_per_node() {
    let Some(r) = Rendered::new(json!({})) else {
        return;
    };
    let kinds = r.kinds();
    for kind in [
        "DaemonSet",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "Service",
    ] {
        assert!(kinds.contains(kind), "{kind} missing: {kinds:?}");
    }
    for kind in ["ServiceMonitor", "PrometheusRule"] {
        assert!(!kinds.contains(kind), "{kind} rendered by default");
    }
    assert_eq!(
        r.docs().filter(|d| d["kind"] == "ConfigMap").count(),
        1,
        "a dashboard ConfigMap by default"
    );
    let pod = &r.one("DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["nodeSelector"]["kubernetes.io/arch"], "amd64");
    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
    let c = r.container();
    assert_eq!(
        c["image"], "profiler:0.1.0",
        "the tag defaults to appVersion"
    );
    let security = &c["securityContext"];
    assert_eq!(security["privileged"], false);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    let added: BTreeSet<&str> = security["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let expected = [
        "BPF",
        "PERFMON",
        "SYS_PTRACE",
        "SYS_RESOURCE",
        "CHECKPOINT_RESTORE",
        "SYSLOG",
        "DAC_READ_SEARCH",
    ];
    assert_eq!(added, expected.into_iter().collect());
    assert_eq!(
        r.env("PROFILER_PYROSCOPE_URL").unwrap()["value"],
        "http://pyroscope.pyroscope.svc.cluster.local:4040"
    );
    assert!(r.env("PROFILER_TENANT_ID").is_none());
    assert_eq!(r.args(), ["agent", "--config", "/etc/profiler/config.toml"]);
    assert!(c["resources"]["limits"]["memory"].is_string());
}

#[test]
fn custom_values_wire_everything() {
    let Some(r) = Rendered::new(custom_values()) else {
        return;
    };
    let c = r.container();
    let pod = &r.one("DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(c["image"], "registry.example.com/profiler:0.1.0-rc1");
    assert_eq!(c["imagePullPolicy"], "Always");
    assert_eq!(
        pod["imagePullSecrets"],
        json!([{"name": "regcred"}, {"name": "other-registry"}])
    );
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(
        pod["hostPID"], true,
        "hostPID does not depend on the values"
    );
    assert_eq!(c["securityContext"]["privileged"], false);
    assert_eq!(
        r.one("DaemonSet")["spec"]["template"]["metadata"]["labels"]["team"],
        "observability"
    );

    // Pyroscope: URL, protocol and tenant through the environment; the password as a file
    // from the Secret, its path in PROFILER_BASIC_AUTH_PASSWORD_FILE.
    let env = |name| r.env(name).unwrap_or_else(|| panic!("{name} not set"))["value"].clone();
    assert_eq!(
        env("PROFILER_PYROSCOPE_URL"),
        "https://profiles.example.com"
    );
    assert_eq!(env("PROFILER_PROTOCOL"), "http");
    assert_eq!(env("PROFILER_TENANT_ID"), "team-a");
    assert_eq!(env("PROFILER_BASIC_AUTH_USER"), "123456");
    assert_eq!(env("RUST_LOG"), "debug");
    let password_file = env("PROFILER_BASIC_AUTH_PASSWORD_FILE");
    let password_file = password_file.as_str().unwrap();
    let volume = mounted_secret_file(pod, c, password_file);
    assert_eq!(volume, ("pyroscope-credentials".into(), "token".into()));
    assert!(
        !serde_json::to_string(pod).unwrap().contains("hunter2"),
        "no secret in the spec"
    );

    // OTLP: flags, the secret header as a file from its Secret, the plain one inline.
    let args = r.args();
    let after = |flag: &str| -> Vec<&str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1])
            .collect()
    };
    assert_eq!(
        after("--otlp-endpoint"),
        ["http://otel-collector.observability:4317"]
    );
    assert_eq!(after("--otlp-protocol"), ["grpc"]);
    assert_eq!(after("--otlp-header"), ["X-Scope-OrgID=team-a"]);
    let header_file = after("--otlp-header-file");
    assert_eq!(header_file.len(), 1);
    let (name, path) = header_file[0].split_once('=').unwrap();
    assert_eq!(name, "Authorization");
    assert_eq!(
        mounted_secret_file(pod, c, path),
        ("otlp-credentials".into(), "authorization".into())
    );
    assert!(args.ends_with(&["--shutdown-timeout", "20s"]));

    // The config file: every key one the agent knows, parsed by a real TOML parser.
    let configmap = r
        .docs()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "profiler-config")
        .unwrap();
    let config = toml_to_json(configmap["data"]["config.toml"].as_str().unwrap());
    assert_eq!(config["frequency"], 49);
    assert_eq!(config["upload_interval"], "30s");
    assert_eq!(config["queue_bytes"], 16777216);
    assert_eq!(config["labels"], json!({"cluster": "prod-eu-1"}));
    assert_eq!(
        config["relabel_configs"],
        json!([{"source_labels": ["__meta_kubernetes_namespace"], "regex": "kube-system", "action": "drop"}])
    );

    // The ServiceMonitor selects the Service, which selects the DaemonSet's pods, on the
    // port named metrics; it sets the job and node labels the rules use.
    let service = r.one("Service");
    let monitor = r.one("ServiceMonitor");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(
        monitor["metadata"]["labels"]["release"],
        "kube-prometheus-stack"
    );
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap();
    for (key, value) in selector {
        assert_eq!(&service["metadata"]["labels"][key], value, "{key}");
    }
    let pod_labels = &r.one("DaemonSet")["spec"]["template"]["metadata"]["labels"];
    for (key, value) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&pod_labels[key], value, "{key}");
    }
    assert_eq!(
        monitor["spec"]["namespaceSelector"]["matchNames"],
        json!(["profiler"])
    );
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], "metrics");
    assert_eq!(service["spec"]["ports"][0]["name"], "metrics");
    assert_eq!(c["ports"][0]["name"], "metrics");
    assert_eq!(endpoint["path"], "/metrics");
    assert_eq!(endpoint["interval"], "15s");
    let relabelings = endpoint["relabelings"].as_array().unwrap();
    assert!(relabelings.contains(&json!({"targetLabel": "job", "replacement": "profiler"})));
    assert!(relabelings.contains(
        &json!({"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"})
    ));

    // The PrometheusRule holds deploy/monitoring/rules.yaml as it is; the dashboard
    // ConfigMap, dashboard.json, labelled for Grafana's sidecar.
    let rule = r.one("PrometheusRule");
    assert_eq!(
        rule["spec"],
        yaml_to_json(&root().join("deploy/monitoring/rules.yaml"))
    );
    let dashboard = r
        .docs()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "profiler-dashboard")
        .expect("no dashboard ConfigMap");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(
        dashboard["metadata"]["annotations"]["grafana_folder"],
        "Profiling"
    );
    let json_text = dashboard["data"]["profiler-agents.json"].as_str().unwrap();
    let shipped = std::fs::read_to_string(root().join("deploy/monitoring/dashboard.json")).unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(json_text).unwrap(),
        serde_json::from_str::<Value>(&shipped).unwrap()
    );
}

/// The (Secret, key) mounted at file `path` of container `c`, following its volumeMount to
/// the pod's volume (a secret volume or a projected one).
fn mounted_secret_file(pod: &Value, c: &Value, path: &str) -> (String, String) {
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| path.starts_with(&format!("{}/", m["mountPath"].as_str().unwrap())))
        .unwrap_or_else(|| panic!("nothing mounted at {path}"));
    assert_eq!(mount["readOnly"], true);
    let file = &path[mount["mountPath"].as_str().unwrap().len() + 1..];
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let secrets: Vec<&Value> = if volume["secret"].is_object() {
        vec![&volume["secret"]]
    } else {
        volume["projected"]["sources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| &s["secret"])
            .collect()
    };
    for secret in secrets {
        for item in secret["items"].as_array().unwrap() {
            if item["path"] == file {
                let name = secret["secretName"].as_str().or(secret["name"].as_str());
                return (
                    name.unwrap().to_owned(),
                    item["key"].as_str().unwrap().to_owned(),
                );
            }
        }
    }
    panic!("no Secret key is mounted as {path}: {volume}");
}

#[test]
fn chart_and_kustomize_give_the_same_daemonset() {
    let Some(r) = Rendered::new(json!({})) else {
        return;
    };
    let mut chart = r.one("DaemonSet")["spec"].clone();
    // Helm alone restarts the pods when the config changes.
    let annotations = chart["template"]["metadata"]["annotations"]
        .as_object_mut()
        .unwrap();
    assert!(annotations.remove("checksum/config").is_some());
    let kustomize = yaml_to_json(&root().join("deploy/kubernetes/daemonset.yaml"));
    assert_eq!(
        chart, kustomize["spec"],
        "the chart's DaemonSet spec (left) differs from deploy/kubernetes/daemonset.yaml's"
    );
}

#[test]
fn bad_values_fail_with_a_clear_message() {
    let cases = [
        (
            json!({"pyroscope": {"url": ""}}),
            "set pyroscope.url or otlp.endpoint",
        ),
        (
            json!({"pyroscope": {"basicAuth": {"username": "u"}}}),
            "existingSecret",
        ),
        (
            json!({"pyroscope": {"basicAuth": {"password": "hunter2"}}}),
            "password",
        ),
        (
            json!({"otlp": {"endpoint": "http://x:4317", "headers": [{"name": "A", "value": "v", "secretName": "s", "secretKey": "k"}]}}),
            "headers",
        ),
        (json!({"frequency": 0}), "frequency"),
        (json!({"capabilities": ["ALL"]}), "capabilities"),
    ];
    for (values, needle) in cases {
        let Some(out) = helm("render", &values) else {
            return;
        };
        let error = out["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{values} rendered"));
        assert!(
            error.contains(needle),
            "{values}: `{needle}` not in {error}"
        );
    }
}

/// A YAML file as JSON, read by Python's yaml (PyYAML comes with kubernetes-validate).
fn yaml_to_json(path: &Path) -> Value {
    python_json(
        "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        path.to_str().unwrap(),
    )
}

/// TOML text as JSON, read by Python's tomllib.
fn toml_to_json(text: &str) -> Value {
    python_json(
        "import json, sys, tomllib; print(json.dumps(tomllib.loads(sys.argv[1])))",
        text,
    )
}

fn python_json(script: &str, arg: &str) -> Value {
    let out = Command::new("python3")
        .args(["-c", script, arg])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
