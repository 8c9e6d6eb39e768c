//! The agent's configuration: flags, then `PROFILER_*` environment variables, then the TOML
//! file given by `--config`, then defaults. Everything is checked at start-up, so a bad value
//! is one clear error before anything is loaded.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};
use clap::Args;
use profiler_metadata::relabel::{RelabelConfig, Relabeler};
use profiler_push::{Delivery, OtlpConfig, OtlpProtocol, Protocol, PushConfig};
use serde::Deserialize;

use super::{parse_duration, parse_min_block, record::off_cpu_config, Exit};
use crate::collect::{OffCpuConfig, OffCpuState, Unwinder, DEFAULT_UNWIND_TABLE_MEMORY};

/// `profiler agent` flags. Each one can also come from `PROFILER_<NAME>` or the config file.
#[derive(Args, Debug, Default)]
pub struct AgentArgs {
    /// TOML configuration file; flags and PROFILER_* variables override it.
    #[arg(long, env = "PROFILER_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Pyroscope (or compatible) server, e.g. http://pyroscope:4040 (this, --otlp-endpoint, or both).
    #[arg(long, env = "PROFILER_PYROSCOPE_URL", value_name = "URL")]
    pub pyroscope_url: Option<String>,
    /// OTLP profiles endpoint, e.g. http://otel-collector:4317 (gRPC) or :4318 (HTTP).
    #[arg(long, env = "PROFILER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// grpc (ProfilesService/Export) or http (POST URL/v1development/profiles) [default: grpc].
    #[arg(long, env = "PROFILER_OTLP_PROTOCOL", value_name = "P")]
    pub otlp_protocol: Option<String>,
    /// Header sent to the OTLP endpoint, `name=value`; repeatable.
    #[arg(
        long = "otlp-header",
        env = "PROFILER_OTLP_HEADERS",
        value_name = "K=V",
        value_delimiter = ','
    )]
    pub otlp_headers: Vec<String>,
    /// Header sent to the OTLP endpoint whose value is read from a file (a mounted Secret),
    /// `name=path`; repeatable.
    #[arg(
        long = "otlp-header-file",
        env = "PROFILER_OTLP_HEADER_FILES",
        value_name = "K=PATH",
        value_delimiter = ','
    )]
    pub otlp_header_files: Vec<String>,
    /// PEM file of CA certificates to trust for an https:// OTLP endpoint.
    #[arg(long, env = "PROFILER_OTLP_CA_CERT", value_name = "PATH")]
    pub otlp_ca_cert: Option<PathBuf>,
    /// gzip or none [default: gzip].
    #[arg(long, env = "PROFILER_OTLP_COMPRESSION", value_name = "C")]
    pub otlp_compression: Option<String>,
    /// Samples per second on each CPU [default: 19].
    #[arg(short = 'F', long, env = "PROFILER_FREQUENCY", value_name = "HZ")]
    pub frequency: Option<u64>,
    /// How often profiles are sent [default: 15s].
    #[arg(long, env = "PROFILER_UPLOAD_INTERVAL", value_name = "DUR", value_parser = parse_duration)]
    pub upload_interval: Option<Duration>,
    /// Static label added to every profile, `key=value`; repeatable.
    #[arg(
        long = "label",
        env = "PROFILER_LABELS",
        value_name = "K=V",
        value_delimiter = ','
    )]
    pub labels: Vec<String>,
    /// Tenant, sent as X-Scope-OrgID.
    #[arg(long, env = "PROFILER_TENANT_ID", value_name = "ID")]
    pub tenant_id: Option<String>,
    /// Basic-auth user; the password comes from --basic-auth-password-file or
    /// PROFILER_BASIC_AUTH_PASSWORD, never from a flag.
    #[arg(long, env = "PROFILER_BASIC_AUTH_USER", value_name = "USER")]
    pub basic_auth_user: Option<String>,
    /// File holding the basic-auth password.
    #[arg(long, env = "PROFILER_BASIC_AUTH_PASSWORD_FILE", value_name = "PATH")]
    pub basic_auth_password_file: Option<PathBuf>,
    /// PEM file of CA certificates to trust for https:// servers.
    #[arg(long, env = "PROFILER_CA_CERT", value_name = "PATH")]
    pub ca_cert: Option<PathBuf>,
    /// grpc (push API) or http (/ingest, for older servers and proxies) [default: grpc].
    #[arg(long, env = "PROFILER_PROTOCOL", value_name = "P")]
    pub protocol: Option<String>,
    /// Address of /metrics, /healthz and /readyz [default: 127.0.0.1:7071].
    #[arg(long, env = "PROFILER_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<String>,
    /// This node's name: selects its pods and labels its profiles [default: the hostname].
    #[arg(long, env = "PROFILER_NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// Bound on profile bytes waiting for delivery, per backend [default: 64 MiB].
    #[arg(long, env = "PROFILER_QUEUE_BYTES", value_name = "N")]
    pub queue_bytes: Option<usize>,
    /// Requests under way at once, per backend [default: 2].
    #[arg(long, env = "PROFILER_MAX_IN_FLIGHT", value_name = "N")]
    pub max_in_flight: Option<usize>,
    /// Largest request; an interval's profiles are split to fit [default: 4 MiB].
    #[arg(long, env = "PROFILER_MAX_REQUEST_BYTES", value_name = "N")]
    pub max_request_bytes: Option<usize>,
    /// How long SIGTERM may wait for the last profiles to be delivered [default: 10s].
    #[arg(long, env = "PROFILER_SHUTDOWN_TIMEOUT", value_name = "DUR", value_parser = parse_duration)]
    pub shutdown_timeout: Option<Duration>,
    /// kubeconfig to use outside a cluster [default: in-cluster, else $KUBECONFIG or ~/.kube/config].
    #[arg(long, env = "PROFILER_KUBECONFIG", value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Most series pushed per interval; samples of any more fold into one overflow series
    /// [default: 1000].
    #[arg(long, env = "PROFILER_MAX_SERIES", value_name = "N")]
    pub max_series: Option<usize>,
    /// How long a container's process waits for its pod before it is classified without one
    /// [default: 30s].
    #[arg(long, env = "PROFILER_POD_WAIT", value_name = "DUR", value_parser = parse_duration)]
    pub pod_wait: Option<Duration>,
    /// Label samples with their thread's name. Pyroscope makes each name a series of its own.
    #[arg(long, env = "PROFILER_THREAD_NAMES", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub thread_names: Option<bool>,
    /// How user stacks are unwound: auto (.eh_frame tables, frame pointers elsewhere) or fp
    /// [default: fp].
    #[arg(long, env = "PROFILER_UNWINDER", value_enum, value_name = "U")]
    pub unwinder: Option<Unwinder>,
    /// Kernel memory for unwind tables: 16MiB, 512KiB, or bytes [default: 16MiB].
    #[arg(long, env = "PROFILER_UNWIND_TABLE_MEMORY", value_name = "SIZE", value_parser = super::diff::parse_size)]
    pub unwind_table_memory: Option<u64>,
    /// Longest one binary's symbols or unwind table may take to read; a binary past it is
    /// skipped and counted [default: 5s].
    #[arg(long, env = "PROFILER_PARSE_TIMEOUT", value_name = "DUR", value_parser = parse_duration)]
    pub parse_timeout: Option<Duration>,
    /// Also push off-CPU time: one `offcpu` series per target, beside `process_cpu`.
    #[arg(long, env = "PROFILER_OFF_CPU", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub off_cpu: Option<bool>,
    /// Leave out off-CPU blocks shorter than this: 1us, 1ms, 0 [default: 1us].
    #[arg(long, env = "PROFILER_OFF_CPU_MIN_BLOCK", value_name = "DUR", value_parser = parse_min_block)]
    pub off_cpu_min_block: Option<Duration>,
    /// Which switch-outs count: any, blocked, uninterruptible [default: any].
    #[arg(long, env = "PROFILER_OFF_CPU_STATE", value_enum, value_name = "S")]
    pub off_cpu_state: Option<OffCpuState>,
    /// Switch-outs recorded per second on each CPU before sampling (weighted) starts
    /// [default: 2000].
    #[arg(long, env = "PROFILER_OFF_CPU_MAX_RATE", value_name = "N")]
    pub off_cpu_max_rate: Option<u64>,
}

/// The config file's shape; unknown keys are errors.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    pyroscope_url: Option<String>,
    otlp_endpoint: Option<String>,
    otlp_protocol: Option<String>,
    #[serde(default)]
    otlp_headers: BTreeMap<String, String>,
    #[serde(default)]
    otlp_header_files: BTreeMap<String, PathBuf>,
    otlp_ca_cert: Option<PathBuf>,
    otlp_compression: Option<String>,
    max_in_flight: Option<usize>,
    max_request_bytes: Option<usize>,
    frequency: Option<u64>,
    upload_interval: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    tenant_id: Option<String>,
    basic_auth_user: Option<String>,
    basic_auth_password_file: Option<PathBuf>,
    ca_cert: Option<PathBuf>,
    protocol: Option<String>,
    metrics_addr: Option<String>,
    node_name: Option<String>,
    queue_bytes: Option<usize>,
    shutdown_timeout: Option<String>,
    kubeconfig: Option<PathBuf>,
    max_series: Option<usize>,
    pod_wait: Option<String>,
    thread_names: Option<bool>,
    unwinder: Option<Unwinder>,
    unwind_table_memory: Option<u64>,
    parse_timeout: Option<String>,
    off_cpu: Option<bool>,
    off_cpu_min_block: Option<String>,
    off_cpu_state: Option<OffCpuState>,
    off_cpu_max_rate: Option<u64>,
    #[serde(default)]
    relabel_configs: Vec<RelabelConfig>,
}

/// The agent's settings, merged and checked.
pub struct AgentConfig {
    pub frequency: u64,
    pub upload_interval: Duration,
    pub labels: BTreeMap<String, String>,
    pub metrics_addr: SocketAddr,
    pub node_name: String,
    pub shutdown_timeout: Duration,
    /// Longest one binary's parse may take.
    pub parse_timeout: Duration,
    pub kubeconfig: Option<PathBuf>,
    pub relabel: Relabeler,
    /// Pyroscope, when a URL is configured.
    pub push: Option<PushConfig>,
    /// OTLP, when an endpoint is configured.
    pub otlp: Option<OtlpConfig>,
    /// Most series per upload interval; the rest fold into one overflow series.
    pub max_series: usize,
    /// How long a container's process waits for its pod before it is decided without one.
    pub pod_wait: Duration,
    /// Sample labels with thread names (each name multiplies series in Pyroscope).
    pub thread_names: bool,
    /// How user stacks are unwound.
    pub unwinder: Unwinder,
    /// Kernel memory for unwind tables, in bytes.
    pub unwind_table_memory: u64,
    /// Off-CPU profiling, when enabled.
    pub off_cpu: Option<OffCpuConfig>,
}

impl AgentConfig {
    /// Merges flags and environment (already in `args`, flags first), the config file and
    /// defaults; any bad value is a usage error (exit 2).
    pub fn load(args: AgentArgs) -> Result<AgentConfig> {
        Self::merge(args).map_err(|e| Exit::usage(format!("{e:#}")))
    }

    fn merge(args: AgentArgs) -> Result<AgentConfig> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let frequency = args.frequency.or(file.frequency).unwrap_or(19);
        if !(1..=10_000).contains(&frequency) {
            bail!("frequency {frequency} Hz is out of range (1 to 10000)");
        }
        let upload_interval = match (args.upload_interval, &file.upload_interval) {
            (Some(d), _) => d,
            (None, Some(text)) => {
                parse_duration(text).map_err(|e| anyhow!("upload_interval: {e}"))?
            }
            (None, None) => Duration::from_secs(15),
        };
        let pod_wait = match (args.pod_wait, &file.pod_wait) {
            (Some(d), _) => d,
            (None, Some(text)) => parse_duration(text).map_err(|e| anyhow!("pod_wait: {e}"))?,
            (None, None) => crate::resolve::POD_GRACE,
        };
        let parse_timeout = match (args.parse_timeout, &file.parse_timeout) {
            (Some(d), _) => d,
            (None, Some(text)) => {
                parse_duration(text).map_err(|e| anyhow!("parse_timeout: {e}"))?
            }
            (None, None) => crate::deadline::DEFAULT,
        };
        let shutdown_timeout = match (args.shutdown_timeout, &file.shutdown_timeout) {
            (Some(d), _) => d,
            (None, Some(text)) => {
                parse_duration(text).map_err(|e| anyhow!("shutdown_timeout: {e}"))?
            }
            (None, None) => Duration::from_secs(10),
        };
        let mut labels = file.labels;
        for pair in &args.labels {
            let (key, value) = key_value(pair, "label")?;
            labels.insert(key.to_owned(), value.to_owned());
        }
        let metrics_text = args
            .metrics_addr
            .or(file.metrics_addr)
            .unwrap_or_else(|| "127.0.0.1:7071".into());
        let metrics_addr: SocketAddr = metrics_text
            .parse()
            .map_err(|e| anyhow!("metrics address `{metrics_text}`: {e}"))?;
        let node_name = args.node_name.or(file.node_name).unwrap_or_else(hostname);
        let url = args.pyroscope_url.or(file.pyroscope_url);
        let otlp_endpoint = args.otlp_endpoint.or(file.otlp_endpoint);
        if url.is_none() && otlp_endpoint.is_none() {
            bail!("no backend: give --pyroscope-url or --otlp-endpoint (or PROFILER_PYROSCOPE_URL, PROFILER_OTLP_ENDPOINT, or pyroscope_url/otlp_endpoint in the config file)");
        }
        let protocol = match args.protocol.or(file.protocol).as_deref() {
            None | Some("grpc") => Protocol::Grpc,
            Some("http") => Protocol::Http,
            Some(other) => bail!("protocol `{other}` is not grpc or http"),
        };
        let user = args.basic_auth_user.or(file.basic_auth_user);
        let password_file = args
            .basic_auth_password_file
            .or(file.basic_auth_password_file);
        let basic_auth = match user {
            Some(user) => Some((user, password(password_file.as_deref())?)),
            None => None,
        };
        let relabel = Relabeler::new(&file.relabel_configs).context("relabel_configs")?;
        let max_series = args.max_series.or(file.max_series).unwrap_or(1000);
        if max_series == 0 {
            bail!("max_series must be at least 1");
        }
        let defaults = Delivery::default();
        let delivery = Delivery {
            queue_bytes: args
                .queue_bytes
                .or(file.queue_bytes)
                .unwrap_or(defaults.queue_bytes),
            max_in_flight: args
                .max_in_flight
                .or(file.max_in_flight)
                .unwrap_or(defaults.max_in_flight),
            max_request_bytes: args
                .max_request_bytes
                .or(file.max_request_bytes)
                .unwrap_or(defaults.max_request_bytes),
            ..defaults
        };
        let push = match url {
            Some(url) => {
                let push = PushConfig {
                    url,
                    protocol,
                    tenant_id: args.tenant_id.or(file.tenant_id),
                    basic_auth,
                    ca_cert: args.ca_cert.or(file.ca_cert),
                    delivery,
                };
                push.validate()?;
                Some(push)
            }
            None => None,
        };
        let otlp = match otlp_endpoint {
            Some(endpoint) => {
                let protocol = match args.otlp_protocol.or(file.otlp_protocol).as_deref() {
                    None | Some("grpc") => OtlpProtocol::Grpc,
                    Some("http") => OtlpProtocol::Http,
                    Some(other) => bail!("OTLP protocol `{other}` is not grpc or http"),
                };
                let gzip = match args.otlp_compression.or(file.otlp_compression).as_deref() {
                    None | Some("gzip") => true,
                    Some("none") => false,
                    Some(other) => bail!("OTLP compression `{other}` is not gzip or none"),
                };
                let mut headers = file.otlp_headers;
                for (name, path) in file.otlp_header_files {
                    headers.insert(name, secret(&path)?);
                }
                for pair in &args.otlp_headers {
                    let (name, value) = key_value(pair, "OTLP header")?;
                    headers.insert(name.to_owned(), value.to_owned());
                }
                for pair in &args.otlp_header_files {
                    let (name, path) = key_value(pair, "OTLP header file")?;
                    headers.insert(name.to_owned(), secret(Path::new(path))?);
                }
                let otlp = OtlpConfig {
                    endpoint,
                    protocol,
                    headers: headers.into_iter().collect(),
                    ca_cert: args.otlp_ca_cert.or(file.otlp_ca_cert),
                    gzip,
                    delivery,
                };
                otlp.validate()?;
                Some(otlp)
            }
            None => None,
        };
        let off_cpu_min_block = match (args.off_cpu_min_block, &file.off_cpu_min_block) {
            (Some(d), _) => Some(d),
            (None, Some(text)) => {
                Some(parse_min_block(text).map_err(|e| anyhow!("off_cpu_min_block: {e}"))?)
            }
            (None, None) => None,
        };
        let off_cpu = off_cpu_config(
            args.off_cpu.or(file.off_cpu).unwrap_or(false),
            off_cpu_min_block,
            args.off_cpu_state.or(file.off_cpu_state),
            args.off_cpu_max_rate.or(file.off_cpu_max_rate),
        )
        .map_err(|e| anyhow!(e))?;
        Ok(AgentConfig {
            off_cpu,
            frequency,
            upload_interval,
            labels,
            metrics_addr,
            node_name,
            shutdown_timeout,
            parse_timeout,
            kubeconfig: args.kubeconfig.or(file.kubeconfig),
            relabel,
            push,
            otlp,
            max_series,
            pod_wait,
            thread_names: args.thread_names.or(file.thread_names).unwrap_or(false),
            unwinder: args.unwinder.or(file.unwinder).unwrap_or_default(),
            unwind_table_memory: args
                .unwind_table_memory
                .or(file.unwind_table_memory)
                .unwrap_or(DEFAULT_UNWIND_TABLE_MEMORY),
        })
    }
}

fn read_file(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        // toml's message spans several lines with a caret; its first line says enough.
        let message = e.message().to_owned();
        anyhow!("config file {}: {message}", path.display())
    })
}

/// `pair` split at its first `=`, with a non-empty key; `what` names it in the error.
fn key_value<'a>(pair: &'a str, what: &str) -> Result<(&'a str, &'a str)> {
    pair.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| anyhow!("{what} `{pair}` is not key=value"))
}

/// A secret read from a file (a mounted Kubernetes Secret), without its trailing newline.
fn secret(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the secret file {}", path.display()))?;
    Ok(text.trim_end_matches(['\n', '\r']).to_owned())
}

/// The basic-auth password: from the file if one is named, else PROFILER_BASIC_AUTH_PASSWORD.
fn password(file: Option<&Path>) -> Result<String> {
    if let Some(path) = file {
        return secret(path);
    }
    std::env::var("PROFILER_BASIC_AUTH_PASSWORD").map_err(|_| {
        anyhow!("a basic-auth user needs a password: --basic-auth-password-file or PROFILER_BASIC_AUTH_PASSWORD")
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser;

    use super::{AgentArgs, AgentConfig};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentArgs,
    }

    /// Parses `args` as the agent's command line, with `PROFILER_*` variables from `env` only.
    fn load(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<AgentConfig> {
        // clap reads the process environment; these names are used by this test alone.
        for (key, value) in env {
            std::env::set_var(key, value);
        }
        let cli = Cli::try_parse_from(std::iter::once("agent").chain(args.iter().copied()));
        for (key, _) in env {
            std::env::remove_var(key);
        }
        AgentConfig::merge(cli?.agent)
    }

    #[test]
    fn flags_beat_the_environment_which_beats_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            "pyroscope_url = \"http://from-file:4040\"\nupload_interval = \"30s\"\nqueue_bytes = 1000\n\
             shutdown_timeout = \"3s\"\n[labels]\nteam = \"file\"\n",
        )
        .unwrap();
        let file = file.to_str().unwrap();

        let from_file = load(&["--config", file], &[]).unwrap();
        assert_eq!(
            from_file.push.as_ref().unwrap().url,
            "http://from-file:4040"
        );
        assert_eq!(from_file.upload_interval, Duration::from_secs(30));
        assert_eq!(from_file.push.as_ref().unwrap().delivery.queue_bytes, 1000);
        assert_eq!(from_file.labels["team"], "file");
        assert_eq!(from_file.frequency, 19, "the default");

        let env = [
            ("PROFILER_UPLOAD_INTERVAL", "20s"),
            ("PROFILER_QUEUE_BYTES", "2000"),
        ];
        let from_env = load(&["--config", file], &env).unwrap();
        assert_eq!(from_env.upload_interval, Duration::from_secs(20));
        assert_eq!(from_env.push.as_ref().unwrap().delivery.queue_bytes, 2000);
        assert_eq!(
            from_env.shutdown_timeout,
            Duration::from_secs(3),
            "still the file's"
        );

        let from_flags = load(
            &[
                "--config",
                file,
                "--upload-interval",
                "5s",
                "--label",
                "team=flag",
            ],
            &env,
        )
        .unwrap();
        assert_eq!(from_flags.upload_interval, Duration::from_secs(5));
        assert_eq!(
            from_flags.push.as_ref().unwrap().delivery.queue_bytes,
            2000,
            "the environment's"
        );
        assert_eq!(from_flags.labels["team"], "flag");
    }

    #[test]
    fn otlp_alone_with_headers_from_flags_files_and_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "Bearer s3cret\n").unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            format!(
                "otlp_endpoint = \"http://collector:4318\"\notlp_protocol = \"http\"\n\
                 otlp_compression = \"none\"\nmax_in_flight = 3\n\
                 [otlp_headers]\nx-team = \"file\"\nx-env = \"file\"\n\
                 [otlp_header_files]\nauthorization = \"{}\"\n",
                token.display()
            ),
        )
        .unwrap();
        let config = load(
            &[
                "--config",
                file.to_str().unwrap(),
                "--otlp-header",
                "x-team=flag",
            ],
            &[("PROFILER_MAX_REQUEST_BYTES", "100000")],
        )
        .unwrap();
        assert!(config.push.is_none());
        let otlp = config.otlp.unwrap();
        assert_eq!(otlp.endpoint, "http://collector:4318");
        assert_eq!(otlp.protocol, profiler_push::OtlpProtocol::Http);
        assert!(!otlp.gzip);
        assert_eq!(otlp.delivery.max_in_flight, 3);
        assert_eq!(otlp.delivery.max_request_bytes, 100_000);
        assert_eq!(
            otlp.headers,
            vec![
                ("authorization".to_owned(), "Bearer s3cret".to_owned()),
                ("x-env".to_owned(), "file".to_owned()),
                ("x-team".to_owned(), "flag".to_owned()),
            ]
        );
        // Both backends at once; neither is an error.
        let both = load(
            &[
                "--pyroscope-url",
                "http://p:4040",
                "--otlp-endpoint",
                "https://c:4317",
            ],
            &[],
        )
        .unwrap();
        assert!(both.push.is_some() && both.otlp.as_ref().unwrap().gzip);
        let none = load(&[], &[]).err().unwrap();
        assert!(format!("{none:#}").contains("--otlp-endpoint"), "{none:#}");
        for bad in [
            ["--otlp-endpoint", "grpc://c:4317", "", ""],
            ["--otlp-endpoint", "http://c:4317", "--otlp-protocol", "udp"],
            [
                "--otlp-endpoint",
                "http://c:4317",
                "--otlp-header",
                "novalue",
            ],
            [
                "--otlp-endpoint",
                "http://c:4317",
                "--otlp-header-file",
                "k=/nonexistent",
            ],
            [
                "--otlp-endpoint",
                "http://c:4317",
                "--otlp-compression",
                "zstd",
            ],
        ] {
            let args: Vec<&str> = bad.into_iter().filter(|a| !a.is_empty()).collect();
            assert!(load(&args, &[]).is_err(), "{args:?}");
        }
    }
}
