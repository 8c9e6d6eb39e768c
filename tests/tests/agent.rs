//! `profiler agent` end to end: the real binary with real BPF, pushing to a real tonic
//! receiver (and a real HTTP server for /ingest) started by the test.

use std::{
    collections::{BTreeMap, HashSet},
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use profiler_proto::pprof::Profile;
use profiler_tests::{receiver::*, *};

/// A running agent process.
struct Agent {
    child: Child,
    metrics: SocketAddr,
}

impl Agent {
    /// Starts `profiler agent` against the Pyroscope server at `url`, uploading every
    /// `interval`.
    fn start(url: &str, interval: &str, extra: &[&str], env: &[(&str, &str)]) -> Agent {
        Agent::spawn(&["--pyroscope-url", url], interval, extra, env)
    }

    /// Starts `profiler agent` with the `backends` flags, uploading every `interval`.
    fn spawn(backends: &[&str], interval: &str, extra: &[&str], env: &[(&str, &str)]) -> Agent {
        let metrics = free_port();
        let mut command = Command::new(profiler_bin());
        command
            .arg("agent")
            .args(backends)
            .args(["--upload-interval", interval])
            .args(["-F", "99", "--node-name", "test-node"])
            .args(["--metrics-addr", &metrics.to_string()])
            .args(extra)
            .env_remove("KUBECONFIG")
            .env("PROFILER_KUBECONFIG", "/nonexistent/kubeconfig")
            .stderr(Stdio::inherit());
        for (k, v) in env {
            command.env(k, v);
        }
        let agent = Agent {
            child: command.spawn().expect("starting the agent"),
            metrics,
        };
        assert!(
            poll(Duration::from_secs(20), || agent
                .get("/readyz")
                .starts_with("HTTP/1.1 200")),
            "the agent never became ready"
        );
        agent
    }

    /// GET `path` on the metrics address; the raw response, or "" when not listening.
    fn get(&self, path: &str) -> String {
        let Ok(mut stream) = TcpStream::connect(self.metrics) else {
            return String::new();
        };
        let _ = write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        let mut out = String::new();
        let _ = stream.read_to_string(&mut out);
        out
    }

    /// Metric values by `name{labels}` from /metrics, after checking the text format.
    fn metrics(&self) -> BTreeMap<String, f64> {
        let response = self.get("/metrics");
        let body = response.split("\r\n\r\n").nth(1).unwrap_or("");
        parse_prometheus(body)
    }

    /// SIGTERM, then the exit status.
    fn terminate(mut self) -> ExitStatus {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

fn poll(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cond()
}

/// Parses Prometheus text exposition: every sample line is `name[{labels}] value`.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut values = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let bare = name.split('{').next().unwrap();
        assert!(
            bare.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        values.insert(name.to_owned(), value);
    }
    assert!(text.ends_with("# EOF\n") || text.ends_with('\n'));
    values
}

fn metric(values: &BTreeMap<String, f64>, name: &str) -> f64 {
    values.get(name).copied().unwrap_or(0.0)
}

/// A gzipped pprof, decoded.
fn decode(raw: &[u8]) -> Profile {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.pb.gz");
    std::fs::write(&path, raw).unwrap();
    load_pprof(&path)
}

fn of_service<'a>(received: &'a [Received], service: &str) -> Vec<&'a Received> {
    received
        .iter()
        .filter(|r| r.label("service_name") == Some(service))
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn spawn_workload(args: &[&str]) -> Child {
    Command::new(workload()).args(args).spawn().unwrap()
}

/// Once ready, every thread of the agent holds only the capabilities the README names
/// (SYS_PTRACE, DAC_READ_SEARCH, SYSLOG, CHECKPOINT_RESTORE), with no_new_privs set. The test
/// runs as root with every capability, so anything more would show.
fn assert_least_privilege(pid: u32) {
    let kept: u64 = [2u32, 19, 34, 40].iter().fold(0, |set, cap| set | 1 << cap);
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    for task in tasks {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap_or_else(|| panic!("no {name} in {status}"))
        };
        let set = |name: &str| u64::from_str_radix(&field(name), 16).unwrap();
        for name in ["CapEff:", "CapPrm:", "CapBnd:"] {
            assert_eq!(set(name), kept, "{name} {status}");
        }
        assert_eq!(set("CapInh:"), 0, "{status}");
        assert_eq!(set("CapAmb:"), 0, "{status}");
        assert_eq!(field("NoNewPrivs:"), "1", "{status}");
    }
}

#[test]
fn profiles_arrive_per_target_with_labels_headers_and_metrics() {
    let Some(_t) = bpf_test() else { return };
    let rt = runtime();
    let recorder = Recorder::default();
    let server = rt.block_on(start_server(recorder.clone()));
    let mut workload = spawn_workload(&["shares", "30"]);
    // A second busy executable, so that every interval has two targets whatever else the
    // machine runs (alone on an idle machine, nothing else was sampled in half the runs).
    let mut other = Command::new("sh")
        .args(["-c", "while :; do :; done"])
        .spawn()
        .unwrap();
    let agent = Agent::start(
        &format!("http://{}", server.addr),
        "2s",
        &[
            "--label",
            "env=test",
            "--tenant-id",
            "team-a",
            "--basic-auth-user",
            "u",
        ],
        &[("PROFILER_BASIC_AUTH_PASSWORD", "p")],
    );
    assert_least_privilege(agent.child.id());
    assert!(poll(Duration::from_secs(20), || {
        of_service(&recorder.snapshot(), "workload").len() >= 2
    }));
    assert!(agent.get("/healthz").starts_with("HTTP/1.1 200"));
    let metrics = agent.metrics();
    let status = agent.terminate();
    for child in [&mut workload, &mut other] {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(status.success(), "{status:?}");

    let received = recorder.snapshot();
    let mine = of_service(&received, "workload");
    let first = mine[0];
    // A series is its labels: no pid, comm or container_id.
    let mut labels = first.labels.clone();
    labels.sort();
    let expected = [
        ("__name__", "process_cpu"),
        ("env", "test"),
        ("node", "test-node"),
        ("service_name", "workload"),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(labels, expected);
    assert_eq!(first.tenant.as_deref(), Some("team-a"));
    assert_eq!(first.authorization.as_deref(), Some("Basic dTpw"));
    let profile = decode(&first.raw_profile);
    // No sample labels, which Pyroscope would turn into series.
    assert!(profile.sample.iter().all(|s| s.label.is_empty()));
    let samples = samples(&profile);
    assert!(has_function(&samples, "heavy"), "{samples:?}");
    // Every target of an interval (each process on the machine here) travels in one request.
    let mut requests_of_interval: BTreeMap<i64, HashSet<usize>> = BTreeMap::new();
    for r in &received {
        requests_of_interval
            .entry(decode(&r.raw_profile).time_nanos)
            .or_default()
            .insert(r.request);
    }
    assert!(
        requests_of_interval
            .values()
            .all(|requests| requests.len() == 1),
        "{requests_of_interval:?}"
    );
    assert!(
        received.len() > requests_of_interval.len(),
        "several targets per interval expected"
    );

    assert!(
        metric(&metrics, "profiler_samples_collected_total") > 0.0,
        "{metrics:?}"
    );
    assert!(
        metric(
            &metrics,
            "profiler_pushes_total{backend=\"pyroscope\",result=\"delivered\"}"
        ) >= 2.0,
        "{metrics:?}"
    );
    assert!(metric(&metrics, "profiler_processes_tracked") > 0.0);
    assert!(metric(&metrics, "profiler_symbolizer_cache_misses_total") > 0.0);
    assert!(metrics.keys().any(|k| k.starts_with("profiler_build_info")));
    assert!(metrics
        .keys()
        .any(|k| k.starts_with("profiler_push_duration_seconds_bucket")));
    assert!(metrics.contains_key("profiler_queue_bytes{backend=\"pyroscope\"}"));
    assert!(metrics.contains_key("profiler_profiles_dropped_total{backend=\"pyroscope\"}"));
    assert!(
        !metrics.keys().any(|k| k.contains("otlp")),
        "no OTLP series without an OTLP endpoint"
    );
    assert_eq!(metric(&metrics, "profiler_series_overflow_total"), 0.0);
}

#[test]
fn outage_loses_and_duplicates_nothing() {
    let Some(_t) = bpf_test() else { return };
    let rt = runtime();
    let recorder = Recorder::default();
    let server = rt.block_on(start_server(recorder.clone()));
    let addr = server.addr;
    let mut workload = spawn_workload(&["burn", "60"]);
    let agent = Agent::start(&format!("http://{addr}"), "1s", &[], &[]);
    assert!(poll(Duration::from_secs(20), || !of_service(
        &recorder.snapshot(),
        "workload"
    )
    .is_empty()));

    // Down for over two intervals, then back on the same port.
    rt.block_on(server.stop());
    std::thread::sleep(Duration::from_millis(3500));
    let during = of_service(&recorder.snapshot(), "workload").len();
    let server = rt.block_on(async { serve(bind_again(addr).await, recorder.clone()) });
    assert!(poll(Duration::from_secs(30), || {
        of_service(&recorder.snapshot(), "workload").len() >= during + 4
    }));
    assert!(agent.terminate().success());
    let _ = workload.kill();
    let _ = workload.wait();
    drop(server);

    let received = recorder.snapshot();
    let mine = of_service(&received, "workload");
    let ids: HashSet<&str> = mine.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), mine.len(), "a profile arrived twice");
    // Intervals follow each other with no gap and no overlap.
    let mut spans: Vec<(i64, i64)> = mine
        .iter()
        .map(|r| {
            let p = decode(&r.raw_profile);
            (p.time_nanos, p.duration_nanos)
        })
        .collect();
    spans.sort();
    for pair in spans.windows(2) {
        assert_eq!(
            pair[0].0 + pair[0].1,
            pair[1].0,
            "gap or overlap: {spans:?}"
        );
    }
}

#[test]
fn sigterm_flushes_the_last_interval() {
    let Some(_t) = bpf_test() else { return };
    let rt = runtime();
    let recorder = Recorder::default();
    let server = rt.block_on(start_server(recorder.clone()));
    let mut workload = spawn_workload(&["burn", "30"]);
    // An interval far longer than the test: the only profile is the one SIGTERM flushes.
    let agent = Agent::start(&format!("http://{}", server.addr), "10m", &[], &[]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(of_service(&recorder.snapshot(), "workload").is_empty());
    assert!(agent.terminate().success());
    let _ = workload.kill();
    let _ = workload.wait();
    let received = recorder.snapshot();
    let mine = of_service(&received, "workload");
    assert_eq!(mine.len(), 1, "{} profiles", mine.len());
    let profile = decode(&mine[0].raw_profile);
    let seconds = profile.duration_nanos as f64 / 1e9;
    assert!(
        (2.5..10.0).contains(&seconds),
        "the flushed interval lasted {seconds}s"
    );
    assert!(has_function(&samples(&profile), "burn_inner"));
}

#[test]
fn a_full_queue_drops_the_oldest_and_counts_it() {
    let Some(_t) = bpf_test() else { return };
    let addr = free_port();
    let mut workload = spawn_workload(&["burn", "30"]);
    let agent = Agent::start(
        &format!("http://{addr}"),
        "1s",
        &["--queue-bytes", "2000", "--shutdown-timeout", "1s"],
        &[],
    );
    assert!(poll(Duration::from_secs(20), || {
        metric(
            &agent.metrics(),
            "profiler_profiles_dropped_total{backend=\"pyroscope\"}",
        ) > 0.0
    }));
    assert!(
        metric(
            &agent.metrics(),
            "profiler_pushes_total{backend=\"pyroscope\",result=\"retrying\"}"
        ) > 0.0
    );
    assert!(agent.terminate().success());
    let _ = workload.kill();
    let _ = workload.wait();
}

#[test]
fn http_ingest_reaches_a_real_http_server() {
    let Some(_t) = bpf_test() else { return };
    let rt = runtime();
    let requests = HttpRequests::default();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(serve_http(listener, requests.clone()));
    let mut workload = spawn_workload(&["burn", "30"]);
    let agent = Agent::start(
        &format!("http://{addr}"),
        "1s",
        &["--protocol", "http"],
        &[],
    );
    let found = poll(Duration::from_secs(20), || {
        requests
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.line.contains("name=workload%7B") || r.line.contains("name=workload{"))
    });
    assert!(agent.terminate().success());
    let _ = workload.kill();
    let _ = workload.wait();
    assert!(
        found,
        "{:?}",
        requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| &r.line)
            .collect::<Vec<_>>()
    );
    let requests = requests.lock().unwrap();
    let HttpRequest { line, body, .. } = requests
        .iter()
        .find(|r| r.line.contains("name=workload"))
        .unwrap();
    assert!(line.starts_with("POST /ingest?"), "{line}");
    for needle in [
        "format=pprof",
        "sampleRate=99",
        "from=",
        "until=",
        "node%3Dtest-node",
    ] {
        assert!(line.contains(needle), "{needle} missing from {line}");
    }
    assert!(has_function(&samples(&decode(body)), "burn_inner"));
}

#[test]
fn relabel_drop_and_keep_decide_what_is_pushed() {
    let Some(t) = bpf_test() else { return };
    let rt = runtime();
    let recorder = Recorder::default();
    let server = rt.block_on(start_server(recorder.clone()));
    // Two copies of the workload under different names; the rules drop one.
    let kept = t.path("keepme");
    std::fs::copy(workload(), &kept).unwrap();
    let config = t.path("agent.toml");
    std::fs::write(
        &config,
        r#"
[[relabel_configs]]
source_labels = ["__meta_process_comm"]
regex = "workload"
action = "drop"

[[relabel_configs]]
source_labels = ["__meta_process_exe"]
regex = "keepme|workload"
action = "keep"

[[relabel_configs]]
source_labels = ["__meta_process_exe"]
target_label = "exe"
"#,
    )
    .unwrap();
    let mut dropped = spawn_workload(&["burn", "30"]);
    let mut keep = Command::new(&kept).args(["burn", "30"]).spawn().unwrap();
    let agent = Agent::start(
        &format!("http://{}", server.addr),
        "1s",
        &["--config", config.to_str().unwrap()],
        &[],
    );
    assert!(poll(Duration::from_secs(20), || of_service(
        &recorder.snapshot(),
        "keepme"
    )
    .len()
        >= 3));
    assert!(agent.terminate().success());
    for child in [&mut dropped, &mut keep] {
        let _ = child.kill();
        let _ = child.wait();
    }
    let received = recorder.snapshot();
    assert!(
        of_service(&received, "workload").is_empty(),
        "a dropped target was pushed"
    );
    assert_eq!(
        of_service(&received, "keepme")[0].label("exe"),
        Some("keepme")
    );
    // The keep rule dropped every other process on the machine.
    let services: HashSet<_> = received
        .iter()
        .filter_map(|r| r.label("service_name"))
        .collect();
    assert_eq!(services, HashSet::from(["keepme"]));
}

#[test]
fn bad_configuration_is_one_clear_error_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let unknown = write(
        "unknown.toml",
        "pyroscope_url = \"http://x:4040\"\nfrequncy = 19\n",
    );
    let regex = write(
        "regex.toml",
        "pyroscope_url = \"http://x:4040\"\n[[relabel_configs]]\nsource_labels = [\"a\"]\nregex = \"(unclosed\"\naction = \"keep\"\n",
    );
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--config", &unknown], "frequncy"),
        (vec!["--pyroscope-url", "ftp://x"], "ftp"),
        (vec!["--pyroscope-url", "not a url"], "not a url"),
        (
            vec![
                "--pyroscope-url",
                "http://x:4040",
                "--basic-auth-user",
                "u",
                "--basic-auth-password-file",
                "/nonexistent/pw",
            ],
            "/nonexistent/pw",
        ),
        (vec!["--config", &regex], "regex"),
        (
            vec!["--pyroscope-url", "http://x:4040", "--max-series", "0"],
            "max_series",
        ),
        (
            vec!["--config", "/nonexistent/agent.toml"],
            "/nonexistent/agent.toml",
        ),
        (vec![], "--otlp-endpoint"),
        (vec!["--otlp-endpoint", "grpc://c:4317"], "grpc://c:4317"),
        (
            vec![
                "--otlp-endpoint",
                "http://c:4317",
                "--otlp-header-file",
                "k=/nonexistent/t",
            ],
            "/nonexistent/t",
        ),
        (
            vec!["--otlp-endpoint", "http://c:4317", "--otlp-protocol", "udp"],
            "udp",
        ),
    ];
    for (args, needle) in cases {
        let out = Command::new(profiler_bin())
            .arg("agent")
            .args(&args)
            .env_remove("PROFILER_PYROSCOPE_URL")
            .env_remove("PROFILER_OTLP_ENDPOINT")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(needle),
            "{args:?}: {stderr}"
        );
    }
}

/// `python3 tests/scripts/otlp_decode.py`, or None (after printing why) where PyPI's
/// opentelemetry-proto is not installed; with CI=true that panics instead.
fn otlp_decoder() -> Option<Command> {
    let probe = Command::new("python3")
        .args([
            "-c",
            "import opentelemetry.proto.profiles.v1development.profiles_pb2",
        ])
        .output();
    match probe {
        Ok(out) if out.status.success() => {
            let mut cmd = Command::new("python3");
            cmd.arg(profiler_tests::root().join("tests/scripts/otlp_decode.py"));
            return Some(cmd);
        }
        _ => {}
    }
    let message =
        "PyPI opentelemetry-proto is not installed for python3; `cargo xtask setup` installs it";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{message}, and CI=true forbids skipping");
    }
    eprintln!("skipped: {message}");
    None
}

/// Every profile of the export requests `raw` (one request each, gzipped or not), as PyPI's
/// opentelemetry-proto decodes them (see tests/scripts/otlp_decode.py).
fn decode_otlp(
    decoder: &mut Command,
    dir: &std::path::Path,
    raw: &[Vec<u8>],
) -> Vec<serde_json::Value> {
    let mut paths = Vec::new();
    for (i, bytes) in raw.iter().enumerate() {
        let path = dir.join(format!("otlp-{i}.pb"));
        std::fs::write(&path, bytes).unwrap();
        paths.push(path);
    }
    let out = decoder.args(&paths).output().unwrap();
    assert!(
        out.status.success(),
        "the Python decoder refused our requests: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .flat_map(|line| {
            let request: serde_json::Value = serde_json::from_str(line).unwrap();
            request["profiles"].as_array().unwrap().clone()
        })
        .collect()
}

fn of_otlp_service<'a>(
    profiles: &'a [serde_json::Value],
    service: &str,
) -> Vec<&'a serde_json::Value> {
    profiles
        .iter()
        .filter(|p| p["resource"]["service.name"] == service)
        .collect()
}

/// Inclusive shares (0-100) of each function over `profiles`' samples.
fn otlp_shares(profiles: &[&serde_json::Value]) -> BTreeMap<String, f64> {
    let samples: Vec<DecodedSample> = profiles
        .iter()
        .flat_map(|p| p["samples"].as_array().unwrap())
        .map(|s| DecodedSample {
            functions: s["functions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap().to_owned())
                .collect(),
            count: s["count"].as_i64().unwrap(),
            labels: Default::default(),
        })
        .collect();
    inclusive_shares(&samples, |_| true).into_iter().collect()
}

#[test]
fn otlp_grpc_export_decodes_with_the_reference_reader_and_has_the_workload_shares() {
    let Some(t) = bpf_test() else { return };
    let Some(mut decoder) = otlp_decoder() else {
        return;
    };
    let rt = runtime();
    let recorder = OtlpRecorder::default();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let server = rt.block_on(async { serve_otlp(listener, recorder.clone()) });
    let token = t.path("token");
    std::fs::write(&token, "Bearer s3cret\n").unwrap();
    let header_file = format!("authorization={}", token.display());
    let mut workload = spawn_workload(&["shares", "30"]);
    let agent = Agent::spawn(
        &["--otlp-endpoint", &format!("http://{}", server.addr)],
        "2s",
        &[
            "--label",
            "env=test",
            "--otlp-header",
            "x-team=a",
            "--otlp-header-file",
            &header_file,
        ],
        &[],
    );
    let workload_requests = || {
        recorder
            .snapshot()
            .iter()
            .filter(|r| r.bytes.windows(8).any(|w| w == b"workload"))
            .count()
    };
    assert!(poll(Duration::from_secs(40), || workload_requests() >= 5));
    let metrics = agent.metrics();
    assert!(agent.terminate().success());
    let _ = workload.kill();
    let _ = workload.wait();

    let received = recorder.snapshot();
    assert_eq!(received[0].header("authorization"), Some("Bearer s3cret"));
    assert_eq!(received[0].header("x-team"), Some("a"));
    assert_eq!(received[0].header("grpc-encoding"), Some("gzip"));
    let raw: Vec<Vec<u8>> = received.iter().map(|r| r.bytes.clone()).collect();
    let profiles = decode_otlp(&mut decoder, t.dir.path(), &raw);
    let mine = of_otlp_service(&profiles, "workload");
    assert!(mine.len() >= 3, "{} workload profiles", mine.len());

    let first = mine[0];
    let resource = &first["resource"];
    for (key, value) in [
        ("service.name", "workload"),
        ("host.name", "test-node"),
        ("k8s.node.name", "test-node"),
        ("process.executable.name", "workload"),
        ("env", "test"),
    ] {
        assert_eq!(resource[key], value, "{key}: {resource}");
    }
    for key in [
        "pid",
        "process.pid",
        "container_id",
        "container.id",
        "__name__",
    ] {
        assert!(resource.get(key).is_none(), "{key} in {resource}");
    }
    assert_eq!(
        first["sample_type"],
        serde_json::json!(["samples", "count"])
    );
    assert_eq!(
        first["period_type"],
        serde_json::json!(["cpu", "nanoseconds"])
    );
    assert_eq!(first["period"], 1_000_000_000 / 99);
    assert!(first["time_unix_nano"].as_u64().unwrap() > 1_600_000_000_000_000_000);
    let seconds = first["duration_nano"].as_f64().unwrap() / 1e9;
    assert!((1.0..4.0).contains(&seconds), "duration {seconds}s");
    let exe = std::fs::canonicalize(profiler_tests::workload()).unwrap();
    let mapping = first["mappings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["filename"] == exe.to_str().unwrap())
        .unwrap_or_else(|| panic!("no mapping of {}: {}", exe.display(), first["mappings"]));
    assert_eq!(
        mapping["build_id"].as_str().unwrap().len(),
        40,
        "the GNU build ID as hex: {mapping}"
    );

    // The known shares of the workload: heavy 6, light 3, leaf_c 1 of every 10 units.
    let shares = otlp_shares(&mine);
    let total: i64 = mine
        .iter()
        .flat_map(|p| p["samples"].as_array().unwrap())
        .map(|s| s["count"].as_i64().unwrap())
        .sum();
    let spans: Vec<_> = mine
        .iter()
        .map(|p| {
            (
                p["duration_nano"].as_u64().unwrap() / 1_000_000,
                p["samples"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s["count"].as_i64().unwrap())
                    .sum::<i64>(),
            )
        })
        .collect();
    assert!(
        total > 150,
        "too few samples: {total} (ms, samples): {spans:?}"
    );
    for (function, truth) in [
        ("main", 100.0),
        ("heavy", 60.0),
        ("light", 30.0),
        ("leaf_c", 10.0),
    ] {
        let got = shares.get(function).copied().unwrap_or(0.0);
        // Sampling noise: three standard errors of a binomial share, plus two points.
        let p: f64 = truth / 100.0;
        let tolerance = 2.0 + 300.0 * (p * (1.0 - p) / total as f64).sqrt();
        assert!(
            (got - truth).abs() <= tolerance,
            "{function}: {got:.1}% exported, {truth}% true (±{tolerance:.1}); all: {shares:?}"
        );
    }
    assert!(
        metric(
            &metrics,
            "profiler_pushes_total{backend=\"otlp\",result=\"delivered\"}"
        ) >= 3.0,
        "{metrics:?}"
    );
    assert!(
        !metrics.keys().any(|k| k.contains("pyroscope")),
        "{metrics:?}"
    );
    drop(server);
}

#[test]
fn otlp_http_export_reaches_a_real_http_server() {
    let Some(t) = bpf_test() else { return };
    let Some(mut decoder) = otlp_decoder() else {
        return;
    };
    let rt = runtime();
    let requests = HttpRequests::default();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(serve_http(listener, requests.clone()));
    let mut workload = spawn_workload(&["burn", "30"]);
    let agent = Agent::spawn(
        &[
            "--otlp-endpoint",
            &format!("http://{addr}"),
            "--otlp-protocol",
            "http",
        ],
        "1s",
        &[],
        &[],
    );
    let gunzip = |body: &[u8]| {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(body)
            .read_to_end(&mut out)
            .unwrap();
        out
    };
    let found = poll(Duration::from_secs(20), || {
        requests
            .lock()
            .unwrap()
            .iter()
            .any(|r| gunzip(&r.body).windows(10).any(|w| w == b"burn_inner"))
    });
    assert!(agent.terminate().success());
    let _ = workload.kill();
    let _ = workload.wait();
    assert!(found);
    let requests = requests.lock().unwrap().clone();
    for r in &requests {
        assert!(
            r.line.starts_with("POST /v1development/profiles "),
            "{}",
            r.line
        );
        assert_eq!(r.header("content-type"), Some("application/x-protobuf"));
        assert_eq!(r.header("content-encoding"), Some("gzip"));
    }
    let raw: Vec<Vec<u8>> = requests.iter().map(|r| r.body.clone()).collect();
    let profiles = decode_otlp(&mut decoder, t.dir.path(), &raw);
    let mine = of_otlp_service(&profiles, "workload");
    assert!(!mine.is_empty());
    assert!(otlp_shares(&mine).contains_key("burn_inner"));
}

#[test]
fn an_otlp_outage_loses_nothing_while_pyroscope_pushes_continue() {
    let Some(_t) = bpf_test() else { return };
    let rt = runtime();
    let pyroscope = Recorder::default();
    let pyroscope_server = rt.block_on(start_server(pyroscope.clone()));
    let otlp = OtlpRecorder::default();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let otlp_addr = listener.local_addr().unwrap();
    let otlp_server = rt.block_on(async { serve_otlp(listener, otlp.clone()) });
    let mut workload = spawn_workload(&["burn", "60"]);
    let agent = Agent::spawn(
        &[
            "--pyroscope-url",
            &format!("http://{}", pyroscope_server.addr),
            "--otlp-endpoint",
            &format!("http://{otlp_addr}"),
        ],
        "1s",
        &[],
        &[],
    );
    let pyroscope_count = || of_service(&pyroscope.snapshot(), "workload").len();
    assert!(poll(Duration::from_secs(20), || pyroscope_count() >= 1
        && !otlp.snapshot().is_empty()));

    // The OTLP endpoint goes away for over three intervals; Pyroscope keeps receiving.
    rt.block_on(otlp_server.stop());
    let before = pyroscope_count();
    std::thread::sleep(Duration::from_millis(3500));
    assert!(
        pyroscope_count() >= before + 2,
        "Pyroscope pushes stalled during the OTLP outage"
    );
    let metrics = agent.metrics();
    assert!(
        metric(
            &metrics,
            "profiler_pushes_total{backend=\"otlp\",result=\"retrying\"}"
        ) > 0.0,
        "{metrics:?}"
    );
    let otlp_server = rt.block_on(async { serve_otlp(bind_again(otlp_addr).await, otlp.clone()) });
    let target = pyroscope_count() + 2;
    assert!(poll(Duration::from_secs(30), || pyroscope_count() >= target));
    assert!(agent.terminate().success());
    let _ = workload.kill();
    let _ = workload.wait();
    drop(otlp_server);

    // Every interval Pyroscope got for the workload reached OTLP too, once.
    let pyroscope_starts: HashSet<i64> = of_service(&pyroscope.snapshot(), "workload")
        .iter()
        .map(|r| decode(&r.raw_profile).time_nanos)
        .collect();
    let mut otlp_starts = Vec::new();
    for received in otlp.snapshot() {
        for resource in received.request().resource_profiles {
            let is_workload = resource.resource.iter().flat_map(|r| &r.attributes).any(|kv| {
                kv.key == "service.name"
                    && matches!(
                        &kv.value.as_ref().and_then(|v| v.value.clone()),
                        Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) if s == "workload"
                    )
            });
            if is_workload {
                for scope in resource.scope_profiles {
                    for profile in scope.profiles {
                        otlp_starts.push(profile.time_unix_nano as i64);
                    }
                }
            }
        }
    }
    let unique: HashSet<i64> = otlp_starts.iter().copied().collect();
    assert_eq!(
        unique.len(),
        otlp_starts.len(),
        "an interval arrived twice over OTLP"
    );
    let missing: Vec<_> = pyroscope_starts.difference(&unique).collect();
    assert!(missing.is_empty(), "intervals lost over OTLP: {missing:?}");
    assert!(
        pyroscope_starts.len() >= 5,
        "{} intervals",
        pyroscope_starts.len()
    );
}

/// Labels sorted, to compare label sets.
fn label_set(received: &Received) -> Vec<(String, String)> {
    let mut labels = received.labels.clone();
    labels.sort();
    labels
}

/// Many short-lived processes of one executable next to a long-running one: one series, every
/// push with a real service name, and the short-lived processes' samples in it.
#[test]
fn churn_of_one_executable_is_one_series() {
    let Some(_t) = bpf_test() else { return };
    let rt = runtime();
    let recorder = Recorder::default();
    let server = rt.block_on(start_server(recorder.clone()));
    let mut long = spawn_workload(&["burn", "30"]);
    let agent = Agent::start(&format!("http://{}", server.addr), "1s", &[], &[]);
    // Ten processes a second for 8 s, each 100 ms of `shares` (heavy, light, middle).
    let cpu_before = children_cpu_seconds();
    let started = std::time::Instant::now();
    let mut children: Vec<Child> = Vec::new();
    let mut spawned = 0;
    while started.elapsed() < Duration::from_secs(8) {
        children.push(spawn_workload(&["shares", "0.1"]));
        spawned += 1;
        std::thread::sleep(Duration::from_millis(100));
        children.retain_mut(|c| c.try_wait().unwrap().is_none());
    }
    for child in &mut children {
        child.wait().unwrap();
    }
    // The CPU time the short-lived processes used (every child waited for so far is one).
    let churn_cpu = children_cpu_seconds() - cpu_before;
    // The last samples reach a push within two intervals.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(agent.terminate().success());
    let long_cpu = process_cpu_seconds(long.id());
    let _ = long.kill();
    let _ = long.wait();

    let received = recorder.snapshot();
    for push in &received {
        let service = push.label("service_name").unwrap_or("");
        assert!(
            !service.is_empty() && service != "[unknown]",
            "no real service name: {:?}",
            push.labels
        );
    }
    let mine = of_service(&received, "workload");
    let series: HashSet<_> = mine.iter().map(|r| label_set(r)).collect();
    assert_eq!(
        series.len(),
        1,
        "{spawned} processes of one executable: {series:?}"
    );
    let mut times: Vec<i64> = mine
        .iter()
        .map(|r| decode(&r.raw_profile).time_nanos)
        .collect();
    let pushes = times.len();
    times.dedup();
    assert_eq!(
        times.len(),
        pushes,
        "one profile per interval for the executable"
    );
    let all: Vec<DecodedSample> = mine
        .iter()
        .flat_map(|r| samples(&decode(&r.raw_profile)))
        .collect();
    assert!(has_function(&all, "burn_inner"), "the long-running one");
    assert!(has_function(&all, "heavy"), "the short-lived ones");
    // The short-lived processes' samples (all but the long-running one's burn) are in the
    // executable's series: about 99 per CPU second they used at 99 Hz; fewer when other work
    // shares the CPUs (70 to 85 % seen here), never as few as half.
    let (long_samples, churn): (Vec<&DecodedSample>, Vec<&DecodedSample>) =
        all.iter().partition(|s| s.has_function("burn_outer"));
    let rate = |samples: &[&DecodedSample], cpu: f64| {
        samples.iter().map(|s| s.count).sum::<i64>() as f64 / cpu
    };
    let (long_rate, churn_rate) = (rate(&long_samples, long_cpu), rate(&churn, churn_cpu));
    eprintln!(
        "samples per CPU second: long-running {long_rate:.1} ({long_cpu:.2} s), \
         short-lived {churn_rate:.1} ({churn_cpu:.2} s)"
    );
    let services: BTreeMap<&str, usize> = received.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r.label("service_name").unwrap_or("")).or_default() += 1;
        m
    });
    assert!(
        churn_rate >= 0.5 * 99.0,
        "short-lived processes: {churn_rate:.1} samples per CPU second (the long-running \
         one: {long_rate:.1}); pushes per service: {services:?}"
    );
    // Every series pushed over the run: a handful of executables on this machine, not one
    // per process.
    let everything: HashSet<_> = received.iter().map(label_set).collect();
    assert!(
        everything.len() < spawned / 2,
        "{} series",
        everything.len()
    );
}

/// A relabel rule that makes a series per process, over more processes than --max-series:
/// every interval pushes at most that many series plus the node's overflow series, and the
/// samples folded into it are counted.
#[test]
fn a_series_per_process_is_capped_and_counted() {
    let Some(t) = bpf_test() else { return };
    let rt = runtime();
    let recorder = Recorder::default();
    let server = rt.block_on(start_server(recorder.clone()));
    let config = t.path("agent.toml");
    std::fs::write(
        &config,
        r#"
max_series = 3

[[relabel_configs]]
source_labels = ["__meta_process_exe"]
regex = "workload"
action = "keep"

[[relabel_configs]]
source_labels = ["__meta_process_pid"]
target_label = "pid"
"#,
    )
    .unwrap();
    let mut children: Vec<Child> = (0..8).map(|_| spawn_workload(&["burn", "30"])).collect();
    let agent = Agent::start(
        &format!("http://{}", server.addr),
        "1s",
        &["--config", config.to_str().unwrap()],
        &[],
    );
    assert!(poll(Duration::from_secs(20), || of_service(
        &recorder.snapshot(),
        "series-overflow"
    )
    .len()
        >= 3));
    let metrics = agent.metrics();
    assert!(agent.terminate().success());
    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }

    let received = recorder.snapshot();
    let mut intervals: BTreeMap<i64, Vec<&Received>> = BTreeMap::new();
    for push in &received {
        let time = decode(&push.raw_profile).time_nanos;
        intervals.entry(time).or_default().push(push);
    }
    for pushes in intervals.values() {
        let per_process = pushes
            .iter()
            .filter(|r| r.label("service_name") == Some("workload"))
            .inspect(|r| assert!(r.label("pid").is_some(), "{:?}", r.labels))
            .count();
        assert!(per_process <= 3, "{per_process} series in one interval");
        assert!(pushes.len() <= 4, "{} series in one interval", pushes.len());
    }
    let overflow = of_service(&received, "series-overflow");
    let expected: Vec<(String, String)> = [
        ("__name__", "process_cpu"),
        ("node", "test-node"),
        ("service_name", "series-overflow"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(label_set(overflow[0]), expected);
    let folded: Vec<DecodedSample> = overflow
        .iter()
        .flat_map(|r| samples(&decode(&r.raw_profile)))
        .collect();
    assert!(has_function(&folded, "burn_inner"));
    assert!(
        metric(&metrics, "profiler_series_overflow_total") > 0.0,
        "{metrics:?}"
    );
}

/// Under a `keep` rule on pod labels, processes of containers whose pods the API server
/// delivers late are profiled once their pods are known: one whose pod comes within
/// --pod-wait (its samples waited), and one whose pod comes after it (it was excluded from
/// sampling meanwhile, and is sampled again).
#[test]
fn a_keep_rule_profiles_pods_whose_metadata_arrives_late() {
    use profiler_tests::kube::{pod, FakeApiServer, FakeContainer};
    let Some(t) = bpf_test() else { return };
    let rt = runtime();
    let recorder = Recorder::default();
    let server = rt.block_on(start_server(recorder.clone()));
    let api = rt.block_on(FakeApiServer::start());
    let kubeconfig = t.path("kubeconfig");
    api.kubeconfig(&kubeconfig);
    let config = t.path("agent.toml");
    std::fs::write(
        &config,
        r#"
[[relabel_configs]]
source_labels = ["__meta_kubernetes_namespace"]
regex = "shop"
action = "keep"
"#,
    )
    .unwrap();
    let early = FakeContainer::new("early");
    early.adopt(spawn_workload(&["shares", "40"]));
    let late = FakeContainer::new("late");
    late.adopt(spawn_workload(&["burn", "40"]));
    let agent = Agent::start(
        &format!("http://{}", server.addr),
        "1s",
        &[
            "--config",
            config.to_str().unwrap(),
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--pod-wait",
            "3s",
        ],
        &[],
    );
    let started = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    api.add_pod(pod(
        "shop",
        "web-1",
        "web",
        "test-node",
        &[("app", &early.id)],
    ));
    let web = |r: &[Received]| {
        of_service(r, "shop/web")
            .iter()
            .any(|r| has_function(&samples(&decode(&r.raw_profile)), "heavy"))
    };
    assert!(
        poll(Duration::from_secs(20), || web(&recorder.snapshot())),
        "the pod that came within the wait was never profiled"
    );
    // Well past the wait: the keep rule has dropped the other process, without a pod.
    std::thread::sleep(Duration::from_secs(6).saturating_sub(started.elapsed()));
    let before = recorder.count();
    api.add_pod(pod(
        "shop",
        "worker-1",
        "worker",
        "test-node",
        &[("worker", &late.id)],
    ));
    let worker = |r: &[Received]| {
        of_service(r, "shop/worker")
            .iter()
            .any(|r| has_function(&samples(&decode(&r.raw_profile)), "burn_inner"))
    };
    assert!(
        poll(Duration::from_secs(20), || worker(&recorder.snapshot())),
        "the pod that came after the wait was never profiled"
    );
    assert!(agent.terminate().success());
    drop((early, late));

    let received = recorder.snapshot();
    assert!(
        received[..before]
            .iter()
            .all(|r| r.label("service_name") != Some("shop/worker")),
        "profiled before its pod was known"
    );
    let first = of_service(&received, "shop/web")[0];
    for (name, value) in [
        ("namespace", "shop"),
        ("pod", "web-1"),
        ("container", "app"),
    ] {
        assert_eq!(first.label(name), Some(value), "{:?}", first.labels);
    }
    assert_eq!(first.label("container_id"), None);
    let services: HashSet<_> = received
        .iter()
        .filter_map(|r| r.label("service_name"))
        .collect();
    assert_eq!(services, HashSet::from(["shop/web", "shop/worker"]));
}

/// `--thread-names` (here from the environment) labels samples with their thread's name,
/// and with nothing else.
#[test]
fn thread_names_label_samples_only_when_asked_for() {
    let Some(_t) = bpf_test() else { return };
    let rt = runtime();
    let recorder = Recorder::default();
    let server = rt.block_on(start_server(recorder.clone()));
    let mut workload = spawn_workload(&["burn", "30"]);
    let agent = Agent::start(
        &format!("http://{}", server.addr),
        "1s",
        &[],
        &[("PROFILER_THREAD_NAMES", "true")],
    );
    assert!(poll(Duration::from_secs(20), || !of_service(
        &recorder.snapshot(),
        "workload"
    )
    .is_empty()));
    assert!(agent.terminate().success());
    let _ = workload.kill();
    let _ = workload.wait();
    let received = recorder.snapshot();
    let profile = decode(&of_service(&received, "workload")[0].raw_profile);
    let samples = samples(&profile);
    assert!(!samples.is_empty());
    for sample in &samples {
        let labels: Vec<(&str, &str)> = sample
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(labels, vec![("thread", "workload")]);
    }
}

/// User plus system CPU seconds of a live process, from /proc/PID/stat.
fn process_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesized name: state is 3, utime 14, stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// User plus system CPU seconds of the children this process has waited for.
fn children_cpu_seconds() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) },
        0
    );
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}
