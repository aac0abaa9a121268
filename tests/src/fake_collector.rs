//! A stand-in for `sluice-collector` in the reporting tests: real HTTPS (its own CA, a server
//! certificate for `127.0.0.1` and `localhost`), `POST /api/v1/enroll` with single-use tokens,
//! and `POST /api/v1/events` that inflates gzip JSON Lines, checks the Bearer credential (401
//! unknown, 403 revoked), and stores events deduplicated by id, counting how often each id was
//! received. It can be stopped (the port is released and open connections are cut) and started
//! again on the same port.

use std::{
    collections::{HashMap, HashSet},
    convert::Infallible,
    io::Read as _,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::Result;
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256,
};
use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Largest compressed body accepted.
const MAX_BODY: usize = 16 << 20;
/// Largest inflated body accepted.
const MAX_INFLATED: u64 = 128 << 20;

/// What the collector holds; kept across restarts.
#[derive(Debug, Default)]
pub struct Store {
    /// Stored events by id (the first copy received).
    pub events: HashMap<String, serde_json::Value>,
    /// Times each id was received (stored or duplicate).
    pub received: HashMap<String, u64>,
    /// Batch ids received, in order (retries included).
    pub batches: Vec<String>,
    /// Lines that were not events.
    pub rejected: u64,
}

/// Shared state.
#[derive(Debug, Default)]
pub struct State {
    /// The events.
    pub store: Mutex<Store>,
    /// Credentials accepted.
    pub credentials: Mutex<HashSet<String>>,
    /// Credentials refused with 403.
    pub revoked: Mutex<HashSet<String>>,
    /// Unused enrollment tokens.
    pub tokens: Mutex<HashSet<String>>,
    /// Requests refused with 401/403.
    pub refused: AtomicU64,
    /// Agents enrolled.
    pub enrolled: AtomicU64,
    /// The `Authorization` header of every bundle request (`GET /api/v1/bundles/current`,
    /// answered 404: this stand-in serves no bundles).
    pub bundle_auth: Mutex<Vec<Option<String>>>,
}

/// A running fake collector.
pub struct FakeCollector {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its CA certificate (PEM), to give the agent.
    pub ca_pem: String,
    /// Its state.
    pub state: Arc<State>,
    tls: tokio_rustls::TlsAcceptor,
    running: Option<CancellationToken>,
}

impl std::fmt::Debug for FakeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeCollector")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FakeCollector {
    /// Starts on 127.0.0.1 (any port), accepting `credentials`.
    pub async fn start(credentials: &[&str]) -> Result<Self> {
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut ca_params = CertificateParams::default();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Fake Collector CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        let cert = params.signed_by(&key, &issuer)?;
        let cfg = ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![
                cert.der().clone(),
                CertificateDer::from(ca_cert.der().to_vec()),
            ],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )?;
        let state = Arc::new(State::default());
        state
            .credentials
            .lock()
            .expect("lock")
            .extend(credentials.iter().map(|c| (*c).to_owned()));
        let mut s = Self {
            addr: "127.0.0.1:0".parse()?,
            ca_pem: ca_cert.pem(),
            state,
            tls: tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
            running: None,
        };
        s.listen().await?;
        Ok(s)
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    async fn listen(&mut self) -> Result<()> {
        let listener = TcpListener::bind(self.addr).await?;
        self.addr = listener.local_addr()?;
        let token = CancellationToken::new();
        self.running = Some(token.clone());
        let (state, tls) = (self.state.clone(), self.tls.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = token.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((tcp, _)) = accepted else { continue };
                let (state, tls, token) = (state.clone(), tls.clone(), token.clone());
                tokio::spawn(async move {
                    let serve = async {
                        let Ok(stream) = tls.accept(tcp).await else {
                            return;
                        };
                        let svc = hyper::service::service_fn(move |req| serve(state.clone(), req));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    };
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = serve => {}
                    }
                });
            }
        });
        Ok(())
    }

    /// Stops: the port is released and every open connection is cut.
    pub fn stop(&mut self) {
        if let Some(t) = self.running.take() {
            t.cancel();
        }
    }

    /// Starts again on the same port.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        // The listener is dropped by its task shortly after the cancel.
        for _ in 0..100 {
            match self.listen().await {
                Ok(()) => return Ok(()),
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
        self.listen().await
    }

    /// Adds an enrollment token.
    pub fn add_token(&self, t: &str) {
        self.state.tokens.lock().expect("lock").insert(t.to_owned());
    }

    /// Ids stored.
    pub fn ids(&self) -> HashSet<String> {
        self.state
            .store
            .lock()
            .expect("lock")
            .events
            .keys()
            .cloned()
            .collect()
    }

    /// Number of events stored.
    pub fn count(&self) -> usize {
        self.state.store.lock().expect("lock").events.len()
    }

    /// Ids received more than once.
    pub fn received_twice(&self) -> Vec<String> {
        self.state
            .store
            .lock()
            .expect("lock")
            .received
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(id, _)| id.clone())
            .collect()
    }
}

impl Drop for FakeCollector {
    fn drop(&mut self) {
        self.stop();
    }
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn problem(status: StatusCode, detail: &str) -> Response<Full<Bytes>> {
    answer(
        status,
        serde_json::json!({ "title": status.canonical_reason(), "status": status.as_u16(), "detail": detail }),
    )
}

async fn serve(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let gzip = req
        .headers()
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
    let batch = req
        .headers()
        .get("x-sluice-batch")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(problem(StatusCode::PAYLOAD_TOO_LARGE, "body too large")),
    };
    Ok(match (method.as_str(), path.as_str()) {
        ("POST", "/api/v1/enroll") => {
            let Ok(req) = serde_json::from_slice::<serde_json::Value>(&body) else {
                return Ok(problem(StatusCode::BAD_REQUEST, "not JSON"));
            };
            let token = req["token"].as_str().unwrap_or("").to_owned();
            if !state.tokens.lock().expect("lock").remove(&token) {
                return Ok(problem(StatusCode::UNAUTHORIZED, "unknown or used token"));
            }
            let n = state.enrolled.fetch_add(1, Ordering::Relaxed) + 1;
            let credential = format!("cred-{n}-{}", crate::hex(&n.to_le_bytes()));
            state
                .credentials
                .lock()
                .expect("lock")
                .insert(credential.clone());
            answer(
                StatusCode::OK,
                serde_json::json!({ "agent_id": format!("agent-{n}"), "credential": credential, "group": "default" }),
            )
        }
        ("POST", "/api/v1/events") => {
            let Some(cred) = bearer else {
                state.refused.fetch_add(1, Ordering::Relaxed);
                return Ok(problem(StatusCode::UNAUTHORIZED, "no credential"));
            };
            if state.revoked.lock().expect("lock").contains(&cred) {
                state.refused.fetch_add(1, Ordering::Relaxed);
                return Ok(problem(StatusCode::FORBIDDEN, "revoked"));
            }
            if !state.credentials.lock().expect("lock").contains(&cred) {
                state.refused.fetch_add(1, Ordering::Relaxed);
                return Ok(problem(StatusCode::UNAUTHORIZED, "unknown credential"));
            }
            if !gzip {
                return Ok(problem(StatusCode::UNSUPPORTED_MEDIA_TYPE, "gzip expected"));
            }
            let mut text = Vec::new();
            let inflated = flate2::read::GzDecoder::new(&body[..])
                .take(MAX_INFLATED + 1)
                .read_to_end(&mut text);
            if inflated.is_err() {
                return Ok(problem(StatusCode::BAD_REQUEST, "bad gzip"));
            }
            if text.len() as u64 > MAX_INFLATED {
                return Ok(problem(StatusCode::PAYLOAD_TOO_LARGE, "inflates too far"));
            }
            let (mut accepted, mut duplicates, mut rejected) = (0u64, 0u64, 0u64);
            let mut store = state.store.lock().expect("lock");
            store.batches.push(batch);
            for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                let v: serde_json::Value = match serde_json::from_slice(line) {
                    Ok(v) => v,
                    Err(_) => {
                        rejected += 1;
                        continue;
                    }
                };
                let Some(id) = v["id"].as_str().map(str::to_owned) else {
                    rejected += 1;
                    continue;
                };
                *store.received.entry(id.clone()).or_insert(0) += 1;
                match store.events.entry(id) {
                    std::collections::hash_map::Entry::Occupied(_) => duplicates += 1,
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(v);
                        accepted += 1;
                    }
                }
            }
            store.rejected += rejected;
            answer(
                StatusCode::OK,
                serde_json::json!({ "accepted": accepted, "duplicates": duplicates, "rejected": rejected }),
            )
        }
        ("GET", "/api/v1/bundles/current") => {
            state.bundle_auth.lock().expect("lock").push(authorization);
            problem(StatusCode::NOT_FOUND, "no bundle published")
        }
        _ => problem(StatusCode::NOT_FOUND, "not here"),
    })
}
