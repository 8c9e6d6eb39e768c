//! The HTTP /ingest pusher against a real (minimal) HTTP/1.1 server on loopback.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use profiler_push::{Protocol, PushOutcome, Pusher};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(10);

/// One request as the server parsed it.
#[derive(Debug, Clone)]
struct HttpRequest {
    method: String,
    path: String,
    query: HashMap<String, String>,
    /// Header names lowercased.
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

/// An HTTP/1.1 server that records every request and answers with the next status from
/// `statuses`, then 200 once they run out.
#[derive(Clone, Default)]
struct IngestServer {
    requests: Arc<Mutex<Vec<HttpRequest>>>,
    statuses: Arc<Mutex<Vec<u16>>>,
}

impl IngestServer {
    async fn start(statuses: Vec<u16>) -> (IngestServer, String) {
        let server = IngestServer {
            requests: Arc::default(),
            statuses: Arc::new(Mutex::new(statuses)),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let accepting = server.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let server = accepting.clone();
                tokio::spawn(async move { server.connection(stream).await });
            }
        });
        (server, url)
    }

    fn requests(&self) -> Vec<HttpRequest> {
        self.requests.lock().unwrap().clone()
    }

    async fn connection(&self, mut stream: TcpStream) {
        let mut buf = Vec::new();
        loop {
            // Read the head.
            let head_end = loop {
                if let Some(pos) = find(&buf, b"\r\n\r\n") {
                    break pos + 4;
                }
                let mut chunk = [0u8; 4096];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
            buf.drain(..head_end);
            let mut lines = head.split("\r\n");
            let mut request_line = lines.next().unwrap().split(' ');
            let method = request_line.next().unwrap().to_string();
            let target = request_line.next().unwrap().to_string();
            let headers: HashMap<String, String> = lines
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let (k, v) = l.split_once(':').unwrap();
                    (k.trim().to_ascii_lowercase(), v.trim().to_string())
                })
                .collect();
            if headers
                .get("expect")
                .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
            {
                stream
                    .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                    .await
                    .unwrap();
            }
            // Read the body.
            let len: usize = headers
                .get("content-length")
                .map(|v| v.parse().unwrap())
                .expect("the pusher sends a Content-Length");
            while buf.len() < len {
                let mut chunk = [0u8; 4096];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let body: Vec<u8> = buf.drain(..len).collect();
            let url = url::Url::parse(&format!("http://x{target}")).unwrap();
            self.requests.lock().unwrap().push(HttpRequest {
                method,
                path: url.path().to_string(),
                query: url.query_pairs().into_owned().collect(),
                headers,
                body,
            });

            let status = {
                let mut statuses = self.statuses.lock().unwrap();
                if statuses.is_empty() {
                    200
                } else {
                    statuses.remove(0)
                }
            };
            let text = format!("status {status}");
            let response = format!(
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{text}",
                text.len()
            );
            if stream.write_all(response.as_bytes()).await.is_err() {
                return;
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_gets_query_headers_and_body() {
    let (server, url) = IngestServer::start(vec![]).await;
    let observer = Arc::new(Recording::default());
    let mut cfg = config(url, Protocol::Http);
    cfg.tenant_id = Some("team-a".into());
    cfg.basic_auth = Some(("user".into(), "pass".into()));
    let pusher = Pusher::start(cfg, observer.clone()).unwrap();

    let mut sent = upload(3, 500);
    sent.labels.push(("env".into(), "prod west".into()));
    pusher.enqueue(sent.clone());
    assert_eq!(pusher.shutdown(Duration::from_secs(5)).await, 0);

    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    let got = &requests[0];
    assert_eq!(got.method, "POST");
    assert_eq!(got.path, "/ingest");
    assert_eq!(got.query["name"], "test-svc{seq=3,env=prod west}");
    assert_eq!(got.query["from"], unix(sent.from).to_string());
    assert_eq!(got.query["until"], unix(sent.until).to_string());
    assert_eq!(got.query["format"], "pprof");
    assert_eq!(got.query["sampleRate"], "99");
    assert_eq!(got.headers["x-scope-orgid"], "team-a");
    assert_eq!(got.headers["authorization"], "Basic dXNlcjpwYXNz");
    assert_eq!(got.headers["content-type"], "application/octet-stream");
    assert!(got.headers["user-agent"].starts_with("profiler-push/"));
    assert_eq!(got.body, sent.pprof_gz);
    assert_eq!(observer.outcomes(), vec![PushOutcome::Delivered]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_retries_5xx_and_429_and_drops_4xx() {
    // Upload 0: 503, 429, then accepted. Upload 1: 400, dropped. Upload 2: accepted.
    // One request at a time (the test config), so the statuses go in this order.
    let (server, url) = IngestServer::start(vec![503, 429, 200, 400]).await;
    let observer = Arc::new(Recording::default());
    // A path prefix in the URL is kept in front of /ingest.
    let pusher = Pusher::start(
        config(format!("{url}/pyroscope/"), Protocol::Http),
        observer.clone(),
    )
    .unwrap();
    for seq in 0..3 {
        pusher.enqueue(upload(seq, 100));
    }
    assert!(wait_until(WAIT, || async { server.requests().len() >= 5 }).await);
    assert_eq!(pusher.shutdown(Duration::from_secs(5)).await, 0);

    let requests = server.requests();
    let names: Vec<_> = requests.iter().map(|r| r.query["name"].clone()).collect();
    assert_eq!(
        names,
        [0, 0, 0, 1, 2].map(|s| format!("test-svc{{seq={s}}}")),
        "retries of the head keep the order"
    );
    assert!(requests.iter().all(|r| r.path == "/pyroscope/ingest"));
    assert_eq!(
        observer.outcomes(),
        vec![
            PushOutcome::Retrying,
            PushOutcome::Retrying,
            PushOutcome::Delivered,
            PushOutcome::Rejected,
            PushOutcome::Delivered,
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_survives_an_outage() {
    let addr = free_addr().await;
    let observer = Arc::new(Recording::default());
    let pusher = Pusher::start(
        config(format!("http://{addr}"), Protocol::Http),
        observer.clone(),
    )
    .unwrap();
    pusher.enqueue(upload(0, 100));
    assert!(
        wait_until(WAIT, || async {
            observer.count(PushOutcome::Retrying) >= 2
        })
        .await
    );
    // Now a server comes up on that port.
    let listener = bind_again(addr).await;
    let server = IngestServer::default();
    let accepting = server.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let server = accepting.clone();
            tokio::spawn(async move { server.connection(stream).await });
        }
    });
    assert_eq!(pusher.shutdown(Duration::from_secs(5)).await, 0);
    assert_eq!(server.requests().len(), 1);
    assert_eq!(observer.count(PushOutcome::Delivered), 1);
}
