//! Delivery through Pyroscope's HTTP ingestion endpoint, `POST /ingest?format=pprof`.
//!
//! With `format=pprof` Pyroscope takes the request body itself as the profile (gzipped or
//! not); a multipart form is only expected when no format is given. The `name` parameter is
//! `<service_name>{label=value,...}`: everything before the braces becomes the
//! `service_name` label as-is, and `__name__` (the profile type) is worked out by Pyroscope
//! from the pprof's sample types, so neither a `.cpu` suffix nor our `__name__` label is sent.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::endpoint::{classify_http, classify_ureq, Endpoint};
use crate::queue::Attempt;
use crate::Series;

/// The service name sent when the upload has no (or an empty) `service_name` label;
/// Pyroscope refuses an empty name.
const UNKNOWN_SERVICE: &str = "unknown_service";

pub(crate) struct HttpSender {
    agent: ureq::Agent,
    /// `{url}/ingest`, without query.
    ingest: url::Url,
    headers: Vec<(String, String)>,
}

impl HttpSender {
    pub(crate) fn new(endpoint: &Endpoint) -> anyhow::Result<HttpSender> {
        Ok(HttpSender {
            agent: endpoint.http_agent()?,
            ingest: with_path(&endpoint.url, "ingest"),
            headers: endpoint.headers.clone(),
        })
    }

    pub(crate) async fn send(&self, series: &Series) -> Attempt {
        let url = self.url_for(series);
        post(
            &self.agent,
            url,
            &self.headers,
            "application/octet-stream",
            None,
            series.pprof_gz.to_vec(),
            "HTTP ingest",
        )
        .await
        .0
    }

    fn url_for(&self, series: &Series) -> url::Url {
        let mut url = self.ingest.clone();
        url.query_pairs_mut()
            .append_pair("name", &series_name(&series.labels))
            .append_pair("from", &unix_seconds(series.from).to_string())
            .append_pair("until", &unix_seconds(series.until).to_string())
            .append_pair("format", "pprof")
            .append_pair("sampleRate", &series.sample_rate.to_string());
        url
    }
}

/// `url` with `path` appended to its own path (kept as a prefix), without query or fragment.
pub(crate) fn with_path(url: &url::Url, path: &str) -> url::Url {
    let mut out = url.clone();
    let joined = format!("{}/{path}", out.path().trim_end_matches('/'));
    out.set_path(&joined);
    out.set_query(None);
    out.set_fragment(None);
    out
}

/// POSTs `body` with `headers` on a blocking thread (ureq is blocking; the async workers stay
/// free). Returns what the attempt came to and, when it was delivered, the response body (at
/// most 64 KiB). `what` names the API in failure reasons.
pub(crate) async fn post(
    agent: &ureq::Agent,
    url: url::Url,
    headers: &[(String, String)],
    content_type: &'static str,
    content_encoding: Option<&'static str>,
    body: Vec<u8>,
    what: &'static str,
) -> (Attempt, Vec<u8>) {
    let agent = agent.clone();
    let headers = headers.to_vec();
    let posted = tokio::task::spawn_blocking(move || {
        let mut request = agent
            .post(url.as_str())
            .header("Content-Type", content_type);
        if let Some(encoding) = content_encoding {
            request = request.header("Content-Encoding", encoding);
        }
        for (name, value) in &headers {
            request = request.header(name, value);
        }
        match request.send(&body[..]) {
            Ok(mut response) => {
                let status = response.status().as_u16();
                let text = response
                    .body_mut()
                    .with_config()
                    .limit(64 * 1024)
                    .read_to_vec()
                    .unwrap_or_default();
                let why = format!(
                    "{what}: HTTP {status}: {}",
                    String::from_utf8_lossy(&text[..text.len().min(1024)]).trim()
                );
                (classify_http(status, why), text)
            }
            Err(err) => (classify_ureq(err, what), Vec::new()),
        }
    })
    .await;
    posted.unwrap_or_else(|err| {
        (
            Attempt::Retry(format!("{what} task failed: {err}")),
            Vec::new(),
        )
    })
}

/// Pyroscope's `name` parameter: `<service_name>{k=v,...}` from the upload's labels, in
/// their order, leaving out `service_name` (it is the part before the braces) and `__name__`
/// (Pyroscope derives it from the profile). The legacy syntax has no escaping, so `{`, `}`,
/// `,` and `=` inside names and values are replaced by `_`.
pub(crate) fn series_name(labels: &[(String, String)]) -> String {
    let service = labels
        .iter()
        .find(|(name, value)| name == "service_name" && !value.is_empty())
        .map_or(UNKNOWN_SERVICE, |(_, value)| value.as_str());
    let mut out = sanitize(service);
    out.push('{');
    let mut first = true;
    for (name, value) in labels {
        if name == "service_name" || name == "__name__" {
            continue;
        }
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(&sanitize(name));
        out.push('=');
        out.push_str(&sanitize(value));
    }
    out.push('}');
    out
}

fn sanitize(s: &str) -> String {
    s.replace(['{', '}', ',', '='], "_")
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn name_from_labels() {
        let l = labels(&[
            ("__name__", "process_cpu"),
            ("service_name", "checkout"),
            ("env", "prod"),
            ("pod", "a,b"),
        ]);
        assert_eq!(series_name(&l), "checkout{env=prod,pod=a_b}");
        assert_eq!(
            series_name(&labels(&[("host", "x")])),
            "unknown_service{host=x}"
        );
        assert_eq!(series_name(&labels(&[("service_name", "s")])), "s{}");
    }

    #[test]
    fn seconds() {
        assert_eq!(
            unix_seconds(UNIX_EPOCH + std::time::Duration::from_millis(1_999)),
            1
        );
        assert_eq!(
            unix_seconds(UNIX_EPOCH - std::time::Duration::from_secs(5)),
            0
        );
    }
}
