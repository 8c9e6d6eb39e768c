//! What every backend's transport needs, checked once at start-up: the URL, TLS roots and the
//! headers to send; and the gRPC channel and HTTP agent built from them.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue, MetadataMap};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use ureq::tls::{PemItem, RootCerts, TlsConfig};

/// A backend's address and credentials, validated.
pub(crate) struct Endpoint {
    pub(crate) url: url::Url,
    pub(crate) tls: bool,
    /// The CA bundle's bytes, only when the URL is `https://` and a bundle was configured.
    pub(crate) ca_pem: Option<Vec<u8>>,
    /// Lowercase header names with their values, sent with every request.
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) timeout: Duration,
}

impl Endpoint {
    /// Checks `url` (named `what` in errors), reads the CA bundle when TLS will use it, and
    /// checks that every header can be sent both as an HTTP header and as gRPC metadata.
    pub(crate) fn check(
        what: &str,
        url_text: &str,
        ca_cert: Option<&Path>,
        headers: Vec<(String, String)>,
        timeout: Duration,
    ) -> anyhow::Result<Endpoint> {
        let url = url::Url::parse(url_text)
            .with_context(|| format!("{what} {url_text:?} is not a valid URL"))?;
        let tls = match url.scheme() {
            "http" => false,
            "https" => true,
            other => bail!(
                "{what} {url_text:?} has scheme {other:?}; use http:// (plain text) or https:// (TLS)"
            ),
        };
        if url.host_str().is_none_or(str::is_empty) {
            bail!("{what} {url_text:?} has no host");
        }
        // http:// never uses TLS, so a CA bundle would be dead configuration; it is not read.
        let ca_pem = match (ca_cert, tls) {
            (Some(path), true) => {
                let pem = std::fs::read(path)
                    .with_context(|| format!("cannot read CA bundle {}", path.display()))?;
                let certs = ureq::tls::parse_pem(&pem)
                    .filter(|item| matches!(item, Ok(PemItem::Certificate(_))))
                    .count();
                if certs == 0 {
                    bail!("CA bundle {} holds no PEM certificate", path.display());
                }
                Some(pem)
            }
            _ => None,
        };
        let mut checked = Vec::with_capacity(headers.len());
        for (name, value) in headers {
            let name = name.to_ascii_lowercase();
            // The same rules as HTTP/2 (and so gRPC) headers; `-bin` keys would be base64.
            if AsciiMetadataKey::from_bytes(name.as_bytes()).is_err() || name.ends_with("-bin") {
                bail!("header name {name:?} is not a valid HTTP header name");
            }
            if AsciiMetadataValue::try_from(value.as_str()).is_err() {
                bail!("the value of header {name:?} is not printable ASCII");
            }
            checked.push((name, value));
        }
        Ok(Endpoint {
            url,
            tls,
            ca_pem,
            headers: checked,
            timeout,
        })
    }

    /// The headers as gRPC metadata (already validated).
    pub(crate) fn metadata(&self) -> MetadataMap {
        let mut map = MetadataMap::new();
        for (name, value) in &self.headers {
            if let (Ok(key), Ok(value)) = (
                AsciiMetadataKey::from_bytes(name.as_bytes()),
                AsciiMetadataValue::try_from(value.as_str()),
            ) {
                map.insert(key, value);
            }
        }
        map
    }

    /// A lazily connecting gRPC channel to `url`: nothing touches the network until the
    /// first request, and a backend that is down is reconnected to on later attempts. Must
    /// run inside a tokio runtime.
    pub(crate) fn channel(&self, url: &str) -> anyhow::Result<Channel> {
        let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
            .with_context(|| format!("URL {url:?} is not usable for gRPC"))?
            .user_agent(crate::USER_AGENT)?
            .connect_timeout(self.timeout)
            .timeout(self.timeout);
        if self.tls {
            endpoint = self.with_tls(endpoint)?;
        }
        Ok(endpoint.connect_lazy())
    }

    /// Adds TLS: the system's roots plus the configured CA bundle. When the system has no
    /// roots at all but a bundle was given, the bundle alone is trusted.
    fn with_tls(
        &self,
        endpoint: tonic::transport::Endpoint,
    ) -> anyhow::Result<tonic::transport::Endpoint> {
        let base = ClientTlsConfig::new().timeout(self.timeout);
        let base = match &self.ca_pem {
            Some(pem) => base.ca_certificate(Certificate::from_pem(pem)),
            None => base,
        };
        match endpoint
            .clone()
            .tls_config(base.clone().with_native_roots())
        {
            Ok(endpoint) => Ok(endpoint),
            Err(err) if self.ca_pem.is_some() => endpoint.tls_config(base).with_context(|| {
                format!("cannot set up TLS with the CA bundle (system roots: {err})")
            }),
            Err(err) => Err(err).context(
                "cannot set up TLS: no usable system root certificates; \
                 install the system CA certificates or configure a CA bundle",
            ),
        }
    }

    /// A blocking HTTP agent that reports every status instead of failing on 4xx/5xx and
    /// never follows redirects (that would turn the POST into a GET and lose the profile).
    pub(crate) fn http_agent(&self) -> anyhow::Result<ureq::Agent> {
        let mut config = ureq::Agent::config_builder()
            .timeout_global(Some(self.timeout))
            .user_agent(crate::USER_AGENT)
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false);
        if self.tls {
            config = config.tls_config(self.http_tls()?);
        }
        Ok(config.build().new_agent())
    }

    /// The system's root certificates plus the configured CA bundle. Falls back to ureq's
    /// bundled Mozilla roots when the system has none and no bundle is configured.
    fn http_tls(&self) -> anyhow::Result<TlsConfig> {
        let mut roots: Vec<ureq::tls::Certificate<'static>> =
            rustls_native_certs::load_native_certs()
                .certs
                .iter()
                .map(|der| ureq::tls::Certificate::from_der(der.as_ref()).to_owned())
                .collect();
        if let Some(pem) = &self.ca_pem {
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
}

/// The current tokio runtime, or an error naming `caller` when there is none.
pub(crate) fn runtime(caller: &str) -> anyhow::Result<tokio::runtime::Handle> {
    tokio::runtime::Handle::try_current()
        .map_err(|_| anyhow::anyhow!("{caller} must be called inside a tokio runtime"))
}

/// What an HTTP response status means for the request: 2xx delivered; 429 and 502/503/504
/// may pass; 500 may be the payload's own fault (capped); any other status is a refusal.
pub(crate) fn classify_http(status: u16, why: String) -> crate::queue::Attempt {
    use crate::queue::Attempt;
    match status {
        200..=299 => Attempt::Delivered,
        429 | 502..=504 => Attempt::Retry(why),
        500 | 505..=599 => Attempt::Suspect(why),
        _ => Attempt::Rejected(why),
    }
}

/// Transport failures may pass; a request we cannot even build never will.
pub(crate) fn classify_ureq(err: ureq::Error, what: &str) -> crate::queue::Attempt {
    use crate::queue::Attempt;
    let why = format!("{what}: {err}");
    match err {
        ureq::Error::BadUri(_)
        | ureq::Error::Http(_)
        | ureq::Error::InvalidProxyUrl
        | ureq::Error::BodyExceedsLimit(_) => Attempt::Rejected(why),
        // Connection refused/reset, DNS, timeouts, TLS, protocol errors, ...
        _ => Attempt::Retry(why),
    }
}

/// What a gRPC status means for the request: `Unknown`/`Internal` are what a proxy's 413 or
/// 400 turns into, so they are retried only up to the cap.
pub(crate) fn classify_grpc(status: &tonic::Status) -> crate::queue::Attempt {
    use crate::queue::Attempt;
    use tonic::Code;
    let why = format!("gRPC {:?}: {}", status.code(), status.message());
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        // tonic reports its own request timeout as Cancelled ("Timeout expired").
        | Code::Cancelled => Attempt::Retry(why),
        Code::Unknown | Code::Internal => Attempt::Suspect(why),
        Code::Ok
        | Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::DataLoss
        | Code::Unauthenticated => Attempt::Rejected(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Attempt;
    use tonic::Code;

    #[test]
    fn grpc_classification() {
        let class = |code| classify_grpc(&tonic::Status::new(code, "x"));
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
        ] {
            assert!(matches!(class(code), Attempt::Retry(_)));
        }
        for code in [Code::Unknown, Code::Internal] {
            assert!(matches!(class(code), Attempt::Suspect(_)));
        }
        for code in [
            Code::InvalidArgument,
            Code::PermissionDenied,
            Code::Unauthenticated,
        ] {
            assert!(matches!(class(code), Attempt::Rejected(_)));
        }
    }

    #[test]
    fn http_classification() {
        let class = |status| classify_http(status, String::new());
        assert!(matches!(class(204), Attempt::Delivered));
        assert!(matches!(class(503), Attempt::Retry(_)));
        assert!(matches!(class(429), Attempt::Retry(_)));
        assert!(matches!(class(500), Attempt::Suspect(_)));
        assert!(matches!(class(413), Attempt::Rejected(_)));
    }

    #[test]
    fn headers_are_checked_and_lowercased() {
        let check = |name: &str, value: &str| {
            Endpoint::check(
                "URL",
                "http://x",
                None,
                vec![(name.into(), value.into())],
                Duration::from_secs(1),
            )
        };
        assert_eq!(
            check("Authorization", "Bearer t").unwrap().headers,
            vec![("authorization".to_owned(), "Bearer t".to_owned())]
        );
        assert!(check("bad name", "v").is_err());
        assert!(check("x-key-bin", "v").is_err());
        assert!(check("x-key", "line\nbreak").is_err());
    }
}
