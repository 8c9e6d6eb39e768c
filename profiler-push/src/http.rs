//! Delivery through Pyroscope's HTTP ingestion endpoint, `POST /ingest?format=pprof`.
//!
//! With `format=pprof` Pyroscope takes the request body itself as the profile (gzipped or
//! not); a multipart form is only expected when no format is given. The `name` parameter is
//! `<service_name>{label=value,...}`: everything before the braces becomes the
//! `service_name` label as-is, and `__name__` (the profile type) is worked out by Pyroscope
//! from the pprof's sample types, so neither a `.cpu` suffix nor our `__name__` label is sent.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};

use crate::{Attempt, Checked, Item};

/// The service name sent when the upload has no (or an empty) `service_name` label;
/// Pyroscope refuses an empty name.
const UNKNOWN_SERVICE: &str = "unknown_service";

pub(crate) struct HttpSender {
    agent: ureq::Agent,
    /// `{url}/ingest`, without query.
    ingest: url::Url,
    tenant: Option<String>,
    authorization: Option<String>,
}

impl HttpSender {
    pub(crate) fn new(checked: &Checked) -> anyhow::Result<HttpSender> {
        let mut ingest = checked.url.clone();
        let path = format!("{}/ingest", ingest.path().trim_end_matches('/'));
        ingest.set_path(&path);
        ingest.set_query(None);
        ingest.set_fragment(None);

        let mut config = ureq::Agent::config_builder()
            .timeout_global(Some(checked.timeout))
            .user_agent(crate::USER_AGENT)
            // Status codes are classified below, not turned into errors.
            .http_status_as_error(false)
            // Following a redirect would turn the POST into a GET and lose the profile.
            .max_redirects(0)
            .max_redirects_will_error(false);
        if checked.tls {
            config = config.tls_config(tls_config(checked)?);
        }
        Ok(HttpSender {
            agent: config.build().new_agent(),
            ingest,
            tenant: checked.tenant.clone(),
            authorization: checked.authorization.clone(),
        })
    }

    pub(crate) async fn send(&self, item: &Arc<Item>) -> Attempt {
        let url = self.url_for(item);
        let agent = self.agent.clone();
        let tenant = self.tenant.clone();
        let authorization = self.authorization.clone();
        let body = item.pprof_gz.clone();
        // ureq is blocking; keep it off the async worker threads.
        let posted = tokio::task::spawn_blocking(move || {
            let mut request = agent
                .post(url.as_str())
                .header("Content-Type", "application/octet-stream");
            if let Some(tenant) = &tenant {
                request = request.header("X-Scope-OrgID", tenant);
            }
            if let Some(authorization) = &authorization {
                request = request.header("Authorization", authorization);
            }
            match request.send(&body[..]) {
                Ok(mut response) => {
                    let status = response.status().as_u16();
                    if (200..300).contains(&status) {
                        return Attempt::Delivered;
                    }
                    let text = response
                        .body_mut()
                        .with_config()
                        .limit(1024)
                        .read_to_string()
                        .unwrap_or_default();
                    let why = format!("HTTP {status}: {}", text.trim());
                    if status == 429 || status >= 500 {
                        Attempt::Retry(why)
                    } else {
                        Attempt::Rejected(why)
                    }
                }
                Err(err) => classify(err),
            }
        })
        .await;
        posted.unwrap_or_else(|err| Attempt::Retry(format!("HTTP ingest task failed: {err}")))
    }

    fn url_for(&self, item: &Item) -> url::Url {
        let mut url = self.ingest.clone();
        url.query_pairs_mut()
            .append_pair("name", &series_name(&item.labels))
            .append_pair("from", &unix_seconds(item.from).to_string())
            .append_pair("until", &unix_seconds(item.until).to_string())
            .append_pair("format", "pprof")
            .append_pair("sampleRate", &item.sample_rate.to_string());
        url
    }
}

/// Transport failures may pass; a request we cannot even build never will.
fn classify(err: ureq::Error) -> Attempt {
    let why = format!("HTTP ingest: {err}");
    match err {
        ureq::Error::BadUri(_)
        | ureq::Error::Http(_)
        | ureq::Error::InvalidProxyUrl
        | ureq::Error::BodyExceedsLimit(_) => Attempt::Rejected(why),
        // Connection refused/reset, DNS, timeouts, TLS, protocol errors, ...
        _ => Attempt::Retry(why),
    }
}

/// The system's root certificates plus the configured CA bundle. Falls back to ureq's
/// bundled Mozilla roots when the system has none and no bundle is configured.
fn tls_config(checked: &Checked) -> anyhow::Result<TlsConfig> {
    let mut roots: Vec<Certificate<'static>> = rustls_native_certs::load_native_certs()
        .certs
        .iter()
        .map(|der| Certificate::from_der(der.as_ref()).to_owned())
        .collect();
    if let Some(pem) = &checked.ca_pem {
        for item in ureq::tls::parse_pem(pem) {
            if let PemItem::Certificate(cert) = item.context("cannot parse the CA bundle")? {
                roots.push(cert);
            }
        }
    }
    let roots = if roots.is_empty() {
        RootCerts::WebPki
    } else {
        RootCerts::new_with_certs(&roots)
    };
    Ok(TlsConfig::builder().root_certs(roots).build())
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
