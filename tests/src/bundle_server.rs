//! A bundle server for the distribution tests: serves one bundle with an ETag, answers
//! `If-None-Match` with 304, and (optionally) holds requests carrying `Prefer: wait=N` until a new
//! bundle is published. It can be stopped and started again on the same port.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch};

/// Shared state of the server.
#[derive(Debug)]
pub struct State {
    bundle: Mutex<Option<(Bytes, String)>>,
    changed: watch::Sender<u64>,
    /// Honour `Prefer: wait=N`.
    pub long_poll: AtomicBool,
    /// Requests served.
    pub requests: AtomicU64,
}

/// A running server.
#[derive(Debug)]
pub struct BundleServer {
    /// Its address.
    pub addr: SocketAddr,
    /// Its state (kept across restarts).
    pub state: Arc<State>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl BundleServer {
    /// Starts on 127.0.0.1 (any port).
    pub async fn start(long_poll: bool) -> std::io::Result<Self> {
        let (tx, _) = watch::channel(0);
        let state = Arc::new(State {
            bundle: Mutex::new(None),
            changed: tx,
            long_poll: AtomicBool::new(long_poll),
            requests: AtomicU64::new(0),
        });
        let mut s = Self {
            addr: "127.0.0.1:0".parse().map_err(std::io::Error::other)?,
            state,
            task: None,
        };
        s.listen().await?;
        Ok(s)
    }

    async fn listen(&mut self) -> std::io::Result<()> {
        let listener = TcpListener::bind(self.addr).await?;
        self.addr = listener.local_addr()?;
        let state = self.state.clone();
        self.task = Some(tokio::spawn(async move {
            // Connections belong to the accept task: stopping it ends them too, as a server that
            // goes down closes its kept-alive connections.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                while conns.try_join_next().is_some() {}
                let state = state.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| serve(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        }));
        Ok(())
    }

    /// Publishes a bundle under a new ETag.
    pub fn publish(&self, bytes: Vec<u8>) {
        let n = *self.state.changed.borrow() + 1;
        *self.state.bundle.lock().expect("lock") = Some((Bytes::from(bytes), format!("\"b{n}\"")));
        self.state.changed.send_replace(n);
    }

    /// Stops accepting (the port is released; in-flight connections end).
    pub fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Starts again on the same port.
    pub async fn restart(&mut self) -> std::io::Result<()> {
        self.stop();
        self.listen().await
    }
}

impl Drop for BundleServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let wait = req
        .headers()
        .get("prefer")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("wait="))
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|_| state.long_poll.load(Ordering::Relaxed));
    let inm = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut rx = state.changed.subscribe();
    loop {
        let current = state.bundle.lock().expect("lock").clone();
        match current {
            Some((bytes, etag)) if inm.as_deref() != Some(etag.as_str()) => {
                let mut r = Response::new(Full::new(bytes));
                if let Ok(v) = header::HeaderValue::from_str(&etag) {
                    r.headers_mut().insert(header::ETAG, v);
                }
                return Ok(r);
            }
            _ => {}
        }
        let Some(secs) = wait else { break };
        match tokio::time::timeout(Duration::from_secs(secs), rx.changed()).await {
            Ok(Ok(())) => continue,
            _ => break,
        }
    }
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = if state.bundle.lock().expect("lock").is_some() {
        StatusCode::NOT_MODIFIED
    } else {
        StatusCode::NOT_FOUND
    };
    Ok(r)
}
