//! A local HTTPS origin with its own test CA, for the proxy's end-to-end tests and benchmarks.
//!
//! It serves several names by SNI: a valid certificate for the names given, and deliberately bad
//! ones (`wronghost.test` gets a certificate for another name, `expired.test` an expired one,
//! `selfsigned.test` a self-signed one). HTTP/1.1 and HTTP/2 by ALPN. Routes:
//! - `GET /hello`: a JSON document naming the host, protocol and connection (its number, from 1,
//!   in the order accepted) seen;
//! - `POST|PUT /echo`: streams the body and answers its length and SHA-256;
//! - `GET /bytes/N`: N bytes of the deterministic [`crate::pattern`] stream;
//! - `GET /headers`: the request's header names, to check what the proxy let through;
//! - `GET /ws`: a WebSocket upgrade, then echoes every byte back.
//!
//! [`Origin::start_http11_required`] starts one that, like a server whose logins need
//! HTTP/1.1, resets every HTTP/2 stream with `HTTP_1_1_REQUIRED` and serves HTTP/1.1.
//! [`Origin::start_goaway`] starts one that closes each HTTP/2 connection (GOAWAY) as soon as
//! its first request arrives, as a server does at its limit of requests per connection.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256,
};
use rustls::{ServerConfig, sign::CertifiedKey};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, std::io::Error>;

/// A test CA and the certificates the origin serves.
pub struct TestPki {
    /// The CA certificate (PEM), for trust stores.
    pub ca_pem: String,
    /// Certificates served, by SNI: (name, leaf DER).
    pub leaves: Vec<(String, CertificateDer<'static>)>,
    resolver: Arc<BySni>,
}

/// Serves certificates by SNI without checking they fit the name (the bad cases must not).
#[derive(Debug, Default)]
struct BySni(std::collections::HashMap<String, Arc<CertifiedKey>>);

impl rustls::server::ResolvesServerCert for BySni {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.get(hello.server_name()?).cloned()
    }
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki").finish_non_exhaustive()
    }
}

fn certified(chain: Vec<CertificateDer<'static>>, key: &KeyPair) -> Result<CertifiedKey> {
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok(CertifiedKey::new(
        chain,
        provider.key_provider.load_private_key(der)?,
    ))
}

impl TestPki {
    /// A CA, valid leaves for `good_names`, and the three bad cases.
    pub fn new(good_names: &[&str]) -> Result<Self> {
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut ca_params = CertificateParams::default();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Sluice Test Origin CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);
        let mut resolver = BySni::default();
        let mut leaves = Vec::new();
        let now = time::OffsetDateTime::now_utc();
        let mut add =
            |sni: &str, cert_name: &str, expired: bool, self_signed: bool| -> Result<()> {
                let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
                let mut p = CertificateParams::new(vec![cert_name.to_owned()])?;
                if expired {
                    p.not_before = now - time::Duration::days(30);
                    p.not_after = now - time::Duration::days(1);
                }
                let cert = if self_signed {
                    p.self_signed(&key)?
                } else {
                    p.signed_by(&key, &issuer)?
                };
                let mut chain = vec![cert.der().clone()];
                if !self_signed {
                    chain.push(ca_cert.der().clone());
                }
                resolver
                    .0
                    .insert(sni.to_owned(), Arc::new(certified(chain, &key)?));
                leaves.push((sni.to_owned(), cert.der().clone()));
                Ok(())
            };
        for n in good_names {
            add(n, n, false, false)?;
        }
        add("wronghost.test", "someone-else.test", false, false)?;
        add("expired.test", "expired.test", true, false)?;
        add("selfsigned.test", "selfsigned.test", false, true)?;
        Ok(Self {
            ca_pem: ca_cert.pem(),
            leaves,
            resolver: Arc::new(resolver),
        })
    }

    /// The certificates by SNI, for another server of the test's.
    pub fn resolver(&self) -> Arc<dyn rustls::server::ResolvesServerCert> {
        self.resolver.clone()
    }

    /// The leaf served for `sni`.
    pub fn leaf(&self, sni: &str) -> Option<&CertificateDer<'static>> {
        self.leaves.iter().find(|(n, _)| n == sni).map(|(_, c)| c)
    }
}

/// A running origin.
#[derive(Debug)]
pub struct Origin {
    /// Where it listens.
    pub addr: SocketAddr,
    /// "METHOD PATH" of every request received, in order.
    pub log: Arc<Mutex<Vec<String>>>,
    /// Connections accepted (after the TLS handshake, for the TLS origin).
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Origin {
    /// Starts serving TLS on `addr` (port 0 for any) inside the current tokio runtime.
    pub async fn start(addr: SocketAddr, pki: &TestPki) -> Result<Self> {
        Self::start_tls(addr, pki, H2Mode::Serve).await
    }

    /// Starts serving TLS on `addr`, sending GOAWAY on each HTTP/2 connection as soon as its
    /// first request arrives (the requests already sent are still answered). Every request is
    /// answered with `{"conn":N}` (the connection's number); `GET /slow` takes two seconds, its
    /// first bytes at once, so that the connection stays open, closing, meanwhile.
    pub async fn start_goaway(addr: SocketAddr, pki: &TestPki) -> Result<Self> {
        Self::start_tls(addr, pki, H2Mode::GoAwayOnFirst).await
    }

    /// Starts serving TLS on `addr`, refusing every HTTP/2 request with `HTTP_1_1_REQUIRED`
    /// (logged as `RESET METHOD PATH`) and serving HTTP/1.1.
    pub async fn start_http11_required(addr: SocketAddr, pki: &TestPki) -> Result<Self> {
        Self::start_tls(addr, pki, H2Mode::Refuse).await
    }

    async fn start_tls(addr: SocketAddr, pki: &TestPki, mode: H2Mode) -> Result<Self> {
        let mut cfg = ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(pki.resolver.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let addr = listener.local_addr()?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, log, counted) = (acceptor.clone(), log2.clone(), counted.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let conn = counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    match mode {
                        H2Mode::Refuse if h2 => return refuse_http2(tls, &log).await,
                        H2Mode::GoAwayOnFirst if h2 => {
                            return goaway_on_first(tls, &log, conn).await;
                        }
                        _ => {}
                    }
                    let svc = hyper::service::service_fn(move |req| route(req, log.clone(), conn));
                    let io = TokioIo::new(tls);
                    if h2 {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .initial_stream_window_size(4 * 1024 * 1024)
                            .initial_connection_window_size(8 * 1024 * 1024)
                            .serve_connection(io, svc)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .with_upgrades()
                            .await;
                    }
                });
            }
        });
        Ok(Self {
            addr,
            log,
            connections,
            task,
        })
    }

    /// Starts serving plain HTTP/1.1 on `addr` (port 0 for any).
    pub async fn start_plain(addr: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let addr = listener.local_addr()?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let conn = counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                let log = log2.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| route(req, log.clone(), conn));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            log,
            connections,
            task,
        })
    }

    /// The requests received so far.
    pub fn requests(&self) -> Vec<String> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(v.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn version_name(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_11 => "HTTP/1.1",
        _ => "other",
    }
}

/// What an origin does with HTTP/2 connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum H2Mode {
    /// Serves them.
    Serve,
    /// Resets every stream with `HTTP_1_1_REQUIRED`.
    Refuse,
    /// Sends GOAWAY when the first request arrives.
    GoAwayOnFirst,
}

/// Serves an HTTP/2 connection that the server closes (GOAWAY) once its first request is in.
async fn goaway_on_first<T>(io: T, log: &Arc<Mutex<Vec<String>>>, conn: usize)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Ok(mut c) = h2::server::handshake(io).await else {
        return;
    };
    let mut first = true;
    while let Some(Ok((req, mut respond))) = c.accept().await {
        if let Ok(mut l) = log.lock() {
            l.push(format!("{} {}", req.method(), req.uri().path()));
        }
        if first {
            c.graceful_shutdown();
            first = false;
        }
        let slow = req.uri().path() == "/slow";
        tokio::spawn(async move {
            let head = Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/json")
                .body(())
                .unwrap_or_default();
            let Ok(mut send) = respond.send_response(head, false) else {
                return;
            };
            if slow {
                let _ = send.send_data(Bytes::from_static(b"{\"slow\":true,"), false);
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                let _ = send.send_data(Bytes::from(format!("\"conn\":{conn}}}")), true);
            } else {
                let _ = send.send_data(Bytes::from(format!("{{\"conn\":{conn}}}")), true);
            }
        });
    }
}

/// Resets every stream of an HTTP/2 connection with `HTTP_1_1_REQUIRED`.
async fn refuse_http2<T>(io: T, log: &Mutex<Vec<String>>)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Ok(mut conn) = h2::server::handshake(io).await else {
        return;
    };
    while let Some(Ok((req, mut respond))) = conn.accept().await {
        if let Ok(mut l) = log.lock() {
            l.push(format!("RESET {} {}", req.method(), req.uri().path()));
        }
        respond.send_reset(h2::Reason::HTTP_1_1_REQUIRED);
    }
}

async fn route(
    req: Request<Incoming>,
    log: Arc<Mutex<Vec<String>>>,
    conn: usize,
) -> Result<Response<Body>, Infallible> {
    if let Ok(mut l) = log.lock() {
        l.push(format!("{} {}", req.method(), req.uri().path()));
    }
    let host = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let version = version_name(req.version());
    let path = req.uri().path().to_owned();
    match (req.method().as_str(), path.as_str()) {
        ("GET", "/hello") => Ok(json(
            StatusCode::OK,
            serde_json::json!({
                "hello": "from origin", "host": host, "version": version, "conn": conn
            }),
        )),
        ("GET", "/headers") => {
            let names: Vec<String> = req
                .headers()
                .keys()
                .map(|k| k.as_str().to_owned())
                .collect();
            Ok(json(
                StatusCode::OK,
                serde_json::json!({ "headers": names, "version": version }),
            ))
        }
        ("POST" | "PUT", "/echo") => {
            let mut body = req.into_body();
            let mut hasher = Sha256::new();
            let mut len = 0u64;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            hasher.update(d);
                            len += d.len() as u64;
                        }
                    }
                    Err(e) => {
                        return Ok(json(
                            StatusCode::BAD_REQUEST,
                            serde_json::json!({ "error": e.to_string() }),
                        ));
                    }
                }
            }
            let hash: String = hasher
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            Ok(json(
                StatusCode::OK,
                serde_json::json!({ "len": len, "sha256": hash, "version": version, "host": host }),
            ))
        }
        ("GET" | "HEAD", p) if p.starts_with("/bytes/") => {
            let n: u64 = p.trim_start_matches("/bytes/").parse().unwrap_or(0);
            // A HEAD answer says the length and sends no body (hyper's HTTP/2 server would
            // send one).
            let stream = pattern_stream(if req.method() == Method::HEAD { 0 } else { n });
            let mut r = Response::new(StreamBody::new(stream).boxed());
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, header::HeaderValue::from(n));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/octet-stream"),
            );
            Ok(r)
        }
        ("GET", "/ws") => Ok(websocket(req)),
        _ => Ok(json(
            StatusCode::NOT_FOUND,
            serde_json::json!({ "error": "no such route" }),
        )),
    }
}

/// N bytes of the pattern, in 64 KiB frames.
pub fn pattern_stream(n: u64) -> PatternStream {
    PatternStream { sent: 0, total: n }
}

/// A stream of pattern frames.
#[derive(Debug)]
pub struct PatternStream {
    sent: u64,
    total: u64,
}

impl futures_core::Stream for PatternStream {
    type Item = Result<Frame<Bytes>, std::io::Error>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if self.sent >= self.total {
            return std::task::Poll::Ready(None);
        }
        let len = (self.total - self.sent).min(64 * 1024) as usize;
        let mut buf = vec![0u8; len];
        crate::pattern(self.sent, &mut buf);
        self.sent += len as u64;
        std::task::Poll::Ready(Some(Ok(Frame::data(Bytes::from(buf)))))
    }
}

fn websocket(mut req: Request<Incoming>) -> Response<Body> {
    let Some(key) = req
        .headers()
        .get("sec-websocket-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
    else {
        return json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({ "error": "not a websocket request" }),
        );
    };
    let accept = crate::websocket_accept(&key);
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(up) = on_upgrade.await {
            let mut io = TokioIo::new(up);
            let (mut r, mut w) = tokio::io::split(&mut io);
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    });
    let mut r = Response::new(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("upgrade"),
    );
    h.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    if let Ok(v) = header::HeaderValue::from_str(&accept) {
        h.insert("sec-websocket-accept", v);
    }
    r
}
