//! The agent's own monitoring, end to end: deploy/monitoring's rules pass promtool's checks and
//! unit tests, and a real Prometheus (Debian's `prometheus`, started here with a 1 s scrape
//! and evaluation interval and that rule file) scrapes two real agents, one pushing to a real
//! receiver and one whose backend is down. It sees them up with every metric; the down one's
//! delivery alert goes pending; and every query of deploy/monitoring/dashboard.json returns data.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use profiler_tests::{receiver::*, *};
use serde_json::Value;

fn monitoring(name: &str) -> PathBuf {
    root().join("deploy/monitoring").join(name)
}

/// Runs `promtool ARGS` (stdin from `input`), asserting success; returns its output.
fn promtool(promtool: &Path, args: &[&str], input: Option<&str>) -> String {
    let mut child = Command::new(promtool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    if let Some(input) = input {
        stdin.write_all(input.as_bytes()).unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{output}");
    output
}

/// The alert names of rules.yaml, in order.
fn alerts() -> Vec<String> {
    std::fs::read_to_string(monitoring("rules.yaml"))
        .unwrap()
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert: "))
        .map(|name| name.trim().to_owned())
        .collect()
}

#[test]
fn rules_pass_promtool_and_every_alert_is_unit_tested() {
    let Some(promtool_bin) = tool("promtool", "prometheus") else {
        return;
    };
    let checked = promtool(
        &promtool_bin,
        &["check", "rules", monitoring("rules.yaml").to_str().unwrap()],
        None,
    );
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(
        &promtool_bin,
        &[
            "test",
            "rules",
            monitoring("rules_test.yaml").to_str().unwrap(),
        ],
        None,
    );
    assert!(tested.contains("SUCCESS"), "{tested}");

    // Every alert has a test case where it fires (exp_alerts not empty) and one where it
    // does not: an alert that cannot fire, or always fires, fails here.
    let tests = std::fs::read_to_string(monitoring("rules_test.yaml")).unwrap();
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    let (mut fires, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    for (i, line) in lines.iter().enumerate() {
        if let Some(name) = line.strip_prefix("alertname: ") {
            match lines.get(i + 1) {
                Some(&"exp_alerts: []") => quiet.insert(name.to_owned()),
                _ => fires.insert(name.to_owned()),
            };
        }
    }
    let alerts = alerts();
    assert!(alerts.len() >= 9, "{alerts:?}");
    for alert in &alerts {
        assert!(fires.contains(alert), "no test where {alert} fires");
        assert!(quiet.contains(alert), "no test where {alert} stays quiet");
    }
}

/// A process killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `profiler agent` for node `node`, pushing to `url` every second.
fn start_agent(url: &str, node: &str, metrics: SocketAddr) -> Running {
    let child = Command::new(profiler_bin())
        .args(["agent", "--pyroscope-url", url, "--upload-interval", "1s"])
        .args(["-F", "49", "--node-name", node])
        .args(["--metrics-addr", &metrics.to_string()])
        .env_remove("KUBECONFIG")
        .env("PROFILER_KUBECONFIG", "/nonexistent/kubeconfig")
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the agent");
    let agent = Running(child);
    let ready = wait(Duration::from_secs(20), || {
        get(&format!("http://{metrics}/readyz"), None).is_some()
    });
    assert!(ready, "the agent for {node} never became ready");
    agent
}

/// GET `url`: (content type, body), or None on any error (refused, non-2xx).
fn get(url: &str, accept: Option<&str>) -> Option<(String, String)> {
    let mut request = ureq::get(url);
    if let Some(accept) = accept {
        request = request.header("Accept", accept);
    }
    let mut response = request.call().ok()?;
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    Some((content_type, response.body_mut().read_to_string().ok()?))
}

fn wait(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    false
}

fn local_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A Prometheus server with its HTTP API.
struct Prometheus {
    _process: Running,
    addr: SocketAddr,
}

impl Prometheus {
    /// Starts `prometheus` scraping `targets` (address, node) every second with rules.yaml.
    fn start(bin: &Path, dir: &Path, targets: &[(SocketAddr, &str)]) -> Prometheus {
        let mut config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\nscrape_configs:\n  - job_name: profiler\n    static_configs:\n",
            monitoring("rules.yaml").display()
        );
        // The labels a ServiceMonitor gives the targets in a cluster (see the rules' header).
        for (addr, node) in targets {
            config += &format!(
                "      - targets: ['{addr}']\n        labels: {{cluster: test, namespace: profiler, \
                 pod: profiler-{node}, node: {node}}}\n"
            );
        }
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let addr = local_port();
        let child = Command::new(bin)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("starting prometheus");
        let prometheus = Prometheus {
            _process: Running(child),
            addr,
        };
        let ready = wait(Duration::from_secs(30), || {
            get(&format!("http://{addr}/-/ready"), None).is_some()
        });
        assert!(
            ready,
            "prometheus never became ready: {}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
        prometheus
    }

    /// GET /api/v1/PATH?QUERY, the `data` of a successful answer.
    fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let mut request = ureq::get(format!("http://{}/api/v1/{path}", self.addr));
        for (k, v) in query {
            request = request.query(*k, *v);
        }
        let body: Value = match request.call() {
            Ok(mut response) => {
                serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap()
            }
            Err(e) => panic!("{path} {query:?}: {e}"),
        };
        assert_eq!(body["status"], "success", "{path} {query:?}: {body}");
        body["data"].clone()
    }

    /// The instant vector of `expr`.
    fn query(&self, expr: &str) -> Vec<Value> {
        let data = self.api("query", &[("query", expr)]);
        data["result"].as_array().cloned().unwrap_or_default()
    }
}

/// The value of one sample of an instant vector.
fn value(sample: &Value) -> f64 {
    sample["value"][1].as_str().unwrap().parse().unwrap()
}

/// Metric names a family's `# TYPE` line declares, in the classic format.
fn declared_names(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .map(|rest| rest.split(' ').next().unwrap().to_owned())
        .collect()
}

/// Every `expr` of the dashboard's panels, and its template variables' `label_values`
/// queries as (selector, label).
fn dashboard() -> (Vec<String>, Vec<(String, String)>) {
    let text = std::fs::read_to_string(monitoring("dashboard.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    let mut exprs = Vec::new();
    let mut stack: Vec<&Value> = dashboard["panels"].as_array().unwrap().iter().collect();
    while let Some(panel) = stack.pop() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().unwrap().to_owned());
        }
        stack.extend(panel["panels"].as_array().into_iter().flatten());
    }
    let mut variables = Vec::new();
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if variable["type"] != "query" {
            continue;
        }
        let query = variable["query"]["query"].as_str().unwrap();
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .unwrap_or_else(|| panic!("not label_values(SELECTOR, LABEL): {query}"));
        let (selector, label) = inner.rsplit_once(',').unwrap();
        variables.push((selector.trim().to_owned(), label.trim().to_owned()));
    }
    let names: BTreeSet<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    for name in ["cluster", "namespace", "node"] {
        assert!(names.contains(name), "no ${name} variable: {names:?}");
    }
    (exprs, variables)
}

/// An expression as Grafana sends it with every variable at "All" (`.*`, the dashboard's
/// allValue) and `$__rate_interval` at four scrape intervals, its minimum.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "4s")
        .replace("$cluster", ".*")
        .replace("$namespace", ".*")
        .replace("$node", ".*")
}

/// The metrics the README promises (and the rules and dashboard use).
const METRICS: &[&str] = &[
    "profiler_samples_collected_total",
    "profiler_samples_lost_total",
    "profiler_stacks_truncated_total",
    "profiler_processes_tracked",
    "profiler_parses_abandoned_running",
    "profiler_symbolizer_cache_hits_total",
    "profiler_symbolizer_cache_misses_total",
    "profiler_symbolizer_parses_released_total",
    "profiler_symbolizer_gopclntab_errors_total",
    "profiler_perf_map_events_total",
    "profiler_perf_map_entries",
    "profiler_pushes_total",
    "profiler_push_duration_seconds_bucket",
    "profiler_push_duration_seconds_sum",
    "profiler_push_duration_seconds_count",
    "profiler_queue_bytes",
    "profiler_profiles_produced_total",
    "profiler_profiles_delivered_total",
    "profiler_profiles_dropped_total",
    "profiler_build_info",
    "profiler_bpf_map_memory_bytes",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_start_time_seconds",
];

#[test]
fn prometheus_scrapes_alerts_and_fills_the_dashboard() {
    let (Some(prometheus), Some(promtool_bin)) = (
        tool("prometheus", "prometheus"),
        tool("promtool", "prometheus"),
    ) else {
        return;
    };
    let Some(t) = bpf_test() else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let recorder = Recorder::default();
    let server = rt.block_on(start_server(recorder.clone()));
    let down = rt.block_on(free_addr());

    let (metrics_a, metrics_b) = (local_port(), local_port());
    let _a = start_agent(&format!("http://{}", server.addr), "node-a", metrics_a);
    let _b = start_agent(&format!("http://{down}"), "node-b", metrics_b);

    // The page: classic text unless OpenMetrics is asked for, and promtool accepts it.
    let url = format!("http://{metrics_a}/metrics");
    let (content_type, classic) = get(&url, None).unwrap();
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    assert!(!classic.contains("# EOF") && !classic.contains(" info\n"));
    promtool(&promtool_bin, &["check", "metrics"], Some(&classic));
    let accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
    let (content_type, openmetrics) = get(&url, Some(accept)).unwrap();
    assert!(content_type.starts_with("application/openmetrics-text; version=1.0.0"));
    assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
    assert!(openmetrics.contains("# TYPE profiler_build info\n"));
    let declared = declared_names(&classic);

    let prom = Prometheus::start(
        &prometheus,
        t.dir.path(),
        &[(metrics_a, "node-a"), (metrics_b, "node-b")],
    );

    // Both targets up (Prometheus 2.42 negotiates OpenMetrics; it rejected the page before).
    let up = wait(Duration::from_secs(30), || {
        let up = prom.query(r#"up{job="profiler"} == 1"#);
        up.len() == 2
    });
    assert!(up, "targets: {}", prom.api("targets", &[]));

    // Every metric, from both agents, in Prometheus.
    let series_per_name = |p: &Prometheus| -> BTreeMap<String, usize> {
        let mut names = BTreeMap::new();
        for sample in p.query(
            r#"count by (__name__, node) ({job="profiler", __name__=~"profiler_.*|process_.*"})"#,
        ) {
            *names
                .entry(sample["metric"]["__name__"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
        names
    };
    let all_there = wait(Duration::from_secs(30), || {
        let names = series_per_name(&prom);
        METRICS.iter().all(|m| names.get(*m) == Some(&2))
    });
    let names = series_per_name(&prom);
    assert!(
        all_there,
        "missing from Prometheus: {:?}",
        METRICS
            .iter()
            .filter(|m| names.get(**m) != Some(&2))
            .collect::<Vec<_>>()
    );
    for name in &declared {
        let histogram = format!("{name}_bucket");
        assert!(
            names.contains_key(name) || names.contains_key(&histogram),
            "{name} is on the page but not in Prometheus"
        );
    }
    let maps = prom.query(r#"profiler_bpf_map_memory_bytes{node="node-a"}"#);
    assert!(value(&maps[0]) > 100_000.0, "BPF map memory: {maps:?}");
    let rss = prom.query(r#"process_resident_memory_bytes{node="node-a"}"#);
    assert!(value(&rss[0]) > 1_000_000.0, "RSS: {rss:?}");

    // The backend of node-b is down: its delivery alert is pending (for: 10m) or firing;
    // node-a delivers, so not there.
    let mut alerts = Vec::new();
    let alerted = wait(Duration::from_secs(60), || {
        alerts = prom.query(r#"ALERTS{alertname="ProfilerDeliveryFailing"}"#);
        !alerts.is_empty()
    });
    assert!(
        alerted,
        "ProfilerDeliveryFailing never came: {}",
        prom.api("rules", &[])
    );
    for alert in &alerts {
        assert_eq!(alert["metric"]["node"], "node-b", "{alert}");
        let state = alert["metric"]["alertstate"].as_str().unwrap();
        assert!(state == "pending" || state == "firing", "{alert}");
    }
    assert!(recorder.count() > 0, "node-a delivered nothing");

    // Every dashboard query returns data, and the variables list the test's labels.
    let (exprs, variables) = dashboard();
    assert!(exprs.len() >= 20, "{exprs:?}");
    let mut empty = Vec::new();
    let answered = wait(Duration::from_secs(60), || {
        empty = exprs
            .iter()
            .map(|e| substitute(e))
            .filter(|e| prom.query(e).is_empty())
            .collect();
        empty.is_empty()
    });
    assert!(answered, "dashboard queries without data: {empty:#?}");
    for (selector, label) in variables {
        let selector = substitute(&selector);
        let values = prom.api(&format!("label/{label}/values"), &[("match[]", &selector)]);
        let values: BTreeSet<&str> = values
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let expected: BTreeSet<&str> = match label.as_str() {
            "cluster" => ["test"].into(),
            "namespace" => ["profiler"].into(),
            "node" => ["node-a", "node-b"].into(),
            other => panic!("unexpected variable label {other}"),
        };
        assert_eq!(values, expected, "label_values({selector}, {label})");
    }
    drop(server);
}
