//! A small OpenID Connect provider for tests and the demo: the organisation's sign-in service
//! that the collector's portal sends people to (`[portal.oidc]`).
//!
//! [`Idp::start`] serves HTTPS on 127.0.0.1 (any port, or [`Idp::start_on`] an address) with a
//! CA of its own, whose certificate is written to `<dir>/idp-ca.pem` (made once per directory and
//! reused, with its key in `idp-ca.key`), so Chromium and the collector (`ca_file`) can trust it;
//! the server certificate names `127.0.0.1` and `localhost`. The issuer is its base URL,
//! `https://127.0.0.1:PORT`.
//!
//! Endpoints, as a real provider has them:
//! - `GET /.well-known/openid-configuration`: the discovery document;
//! - `GET /authorize`: the sign-in form (e-mail and password, and a cancel button) for an
//!   authorization code request; PKCE with S256 is required. `POST /authorize` checks the user,
//!   issues a code (single use, 60 s) bound to the client id, the redirect URI, the code
//!   challenge and the nonce, and redirects (303) to the redirect URI with `code` and `state`;
//!   a cancel redirects with `error=access_denied`, a wrong password shows the form again (401);
//! - `POST /token`: redeems a code (`authorization_code` grant): the client id and redirect URI
//!   must be the code's, the PKCE verifier must hash to its challenge, and a client registered
//!   with [`Idp::add_client`] must authenticate with its secret (HTTP Basic or the form). It
//!   answers an ES256 id token with `iss`, `sub`, `aud`, `azp`, `exp`, `iat`, `auth_time`,
//!   `nonce`, `email`, `email_verified`, `name` and `groups`;
//! - `GET /jwks`: the signing key (EC P-256, its `kid`).
//!
//! Any client id and redirect URI are accepted at `/authorize` (a test provider has no
//! registration step); the code is bound to them. [`Idp::misbehave`] makes `/token` issue a
//! token a relying party must refuse ([`Misbehave`]), so tests can prove it does.

use std::{
    collections::HashMap,
    convert::Infallible,
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aws_lc_rs::{
    rand::SystemRandom,
    signature::{self, EcdsaKeyPair, KeyPair as _},
};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256,
};
use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use sluice_policy::bundle::jws::{b64_decode, b64url};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::demo_app::percent_decode;

/// The password of the demo users ([`IdpUser::demo_users`]).
pub const DEMO_PASSWORD: &str = "demo";
/// The group the demo's admins are in (`admins = ["group:sluice-admins"]`).
pub const ADMIN_GROUP: &str = "sluice-admins";
/// The CA certificate's file name in the provider's directory.
pub const CA_FILE: &str = "idp-ca.pem";
/// The CA key's file name in the provider's directory.
pub const CA_KEY_FILE: &str = "idp-ca.key";
/// How long a code may wait to be redeemed.
const CODE_TTL: Duration = Duration::from_secs(60);
/// How long an id token lives.
const TOKEN_TTL_S: u64 = 300;
/// The largest request body read.
const MAX_BODY: usize = 64 * 1024;

/// A person who can sign in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdpUser {
    /// The e-mail address, the sign-in name and the `email` claim.
    pub email: String,
    /// The password.
    pub password: String,
    /// The display name (`name`).
    pub name: String,
    /// The `groups` claim.
    pub groups: Vec<String>,
}

impl IdpUser {
    /// A user.
    pub fn new(email: &str, password: &str, name: &str, groups: &[&str]) -> Self {
        Self {
            email: email.to_owned(),
            password: password.to_owned(),
            name: name.to_owned(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        }
    }

    /// The demo's people (password [`DEMO_PASSWORD`]): the default bundle's alice (staff,
    /// finance), bob (staff) and carol (contractors), and dana, in [`ADMIN_GROUP`].
    pub fn demo_users() -> Vec<Self> {
        vec![
            Self::new(
                "alice@corp.example",
                DEMO_PASSWORD,
                "Alice Martin",
                &["staff", "finance"],
            ),
            Self::new("bob@corp.example", DEMO_PASSWORD, "Bob Chen", &["staff"]),
            Self::new(
                "carol@corp.example",
                DEMO_PASSWORD,
                "Carol Diaz",
                &["contractors"],
            ),
            Self::new(
                "dana@corp.example",
                DEMO_PASSWORD,
                "Dana Okafor",
                &["staff", ADMIN_GROUP],
            ),
        ]
    }

    /// Users from a JSON file: `[{"email": ..., "password": ..., "name": ..., "groups": [...]}]`
    /// (`name` defaults to the e-mail address, `groups` to none).
    pub fn from_json_file(path: &Path) -> Result<Vec<Self>> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let doc: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let list = doc
            .as_array()
            .with_context(|| format!("{}: a JSON array of users expected", path.display()))?;
        let mut users = Vec::new();
        for u in list {
            let (Some(email), Some(password)) = (u["email"].as_str(), u["password"].as_str())
            else {
                bail!(
                    "{}: every user needs an email and a password",
                    path.display()
                );
            };
            users.push(Self {
                email: email.to_owned(),
                password: password.to_owned(),
                name: u["name"].as_str().unwrap_or(email).to_owned(),
                groups: u["groups"]
                    .as_array()
                    .map(|g| {
                        g.iter()
                            .filter_map(|s| s.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
            });
        }
        if users.is_empty() {
            bail!("{} lists no users", path.display());
        }
        Ok(users)
    }

    /// A stable subject identifier (`sub`): not the e-mail address, as providers do.
    fn subject(&self) -> String {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, self.email.as_bytes());
        format!("u-{}", &hex::encode(d.as_ref())[..16])
    }
}

/// A way for `/token` to get the id token wrong, for negative tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Misbehave {
    /// Correct tokens.
    #[default]
    Nothing,
    /// `aud` names another client.
    WrongAudience,
    /// Signed by another key under the published `kid`.
    BadSignature,
    /// A `nonce` other than the request's.
    WrongNonce,
    /// `exp` ten minutes past (and `iat` an hour back).
    Expired,
    /// `iss` is not the provider's.
    WrongIssuer,
    /// `email_verified` is false.
    UnverifiedEmail,
    /// `alg: none`, no signature.
    AlgNone,
}

/// A code waiting to be redeemed.
#[derive(Debug, Clone)]
struct Grant {
    client_id: String,
    redirect_uri: String,
    code_challenge: String,
    nonce: Option<String>,
    user: IdpUser,
    expires: Instant,
}

struct State {
    issuer: String,
    users: Vec<IdpUser>,
    key: EcdsaKeyPair,
    /// Signs [`Misbehave::BadSignature`] tokens.
    rogue: EcdsaKeyPair,
    kid: String,
    codes: Mutex<HashMap<String, Grant>>,
    clients: Mutex<HashMap<String, String>>,
    misbehave: Mutex<Misbehave>,
    redirects: Mutex<Vec<String>>,
    tokens: AtomicU64,
    /// Keys rotated in after the first ([`Idp::rotate`]), published beside it; the last signs.
    rotated: Mutex<Vec<(String, Arc<EcdsaKeyPair>)>>,
    /// Times the key set was served.
    jwks_served: AtomicU64,
}

/// A running provider (stopped on drop).
pub struct Idp {
    addr: SocketAddr,
    ca_file: PathBuf,
    state: Arc<State>,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Idp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idp")
            .field("issuer", &self.state.issuer)
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn ec_key() -> Result<EcdsaKeyPair> {
    let doc = EcdsaKeyPair::generate_pkcs8(
        &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &SystemRandom::new(),
    )
    .map_err(|_| anyhow!("generating a P-256 key"))?;
    EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref())
        .map_err(|e| anyhow!("P-256 key: {e}"))
}

fn random_hex(n: usize) -> Result<String> {
    let mut b = vec![0u8; n];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| anyhow!("no randomness"))?;
    Ok(hex::encode(b))
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The provider's CA in `dir` (made there when missing) and a fresh server certificate.
fn server_config(dir: &Path) -> Result<(ServerConfig, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (ca_path, key_path) = (dir.join(CA_FILE), dir.join(CA_KEY_FILE));
    let now = time::OffsetDateTime::now_utc();
    let (ca_pem, ca_key) = if ca_path.is_file() && key_path.is_file() {
        let pem = std::fs::read_to_string(&ca_path)?;
        let key = KeyPair::from_pem(&std::fs::read_to_string(&key_path)?)
            .with_context(|| format!("{}", key_path.display()))?;
        (pem, key)
    } else {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name
            .push(DnType::CommonName, "Sluice Demo Identity Provider CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.not_before = now - time::Duration::days(1);
        ca.not_after = now + time::Duration::days(365);
        let pem = ca.self_signed(&key)?.pem();
        {
            use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&key_path)
                .with_context(|| format!("writing {}", key_path.display()))?;
            f.write_all(key.serialize_pem().as_bytes())?;
        }
        std::fs::write(&ca_path, &pem)?;
        (pem, key)
    };
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
    leaf.distinguished_name
        .push(DnType::CommonName, "Sluice Demo Identity Provider");
    leaf.not_before = now - time::Duration::days(1);
    leaf.not_after = now + time::Duration::days(30);
    let cert = leaf.signed_by(&key, &issuer)?;
    let chain = vec![
        cert.der().clone(),
        CertificateDer::from_pem_slice(ca_pem.as_bytes())
            .map_err(|e| anyhow!("CA certificate: {e}"))?,
    ];
    let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
        .map_err(|e| anyhow!("server key: {e}"))?;
    let mut cfg = ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((cfg, ca_path))
}

impl Idp {
    /// Starts a provider for `users` on 127.0.0.1 (any port), its CA in `dir`, on a runtime of
    /// its own (so blocking tests can use it).
    pub fn start(dir: &Path, users: Vec<IdpUser>) -> Result<Self> {
        Self::start_on(dir, SocketAddr::from(([127, 0, 0, 1], 0)), users)
    }

    /// As [`Idp::start`], listening on `listen`.
    pub fn start_on(dir: &Path, listen: SocketAddr, users: Vec<IdpUser>) -> Result<Self> {
        if users.is_empty() {
            bail!("an identity provider needs at least one user");
        }
        let (tls, ca_file) = server_config(dir)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let std_listener =
            std::net::TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let host = if addr.ip().is_unspecified() {
            "127.0.0.1".to_owned()
        } else {
            addr.ip().to_string()
        };
        let state = Arc::new(State {
            issuer: format!("https://{host}:{}", addr.port()),
            users,
            key: ec_key()?,
            rogue: ec_key()?,
            kid: format!("idp-{}", random_hex(4)?),
            codes: Mutex::default(),
            clients: Mutex::default(),
            misbehave: Mutex::default(),
            redirects: Mutex::default(),
            tokens: AtomicU64::new(0),
            rotated: Mutex::default(),
            jwks_served: AtomicU64::new(0),
        });
        let shutdown = CancellationToken::new();
        let (stop, st) = (shutdown.clone(), state.clone());
        let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
        let thread = std::thread::Builder::new()
            .name("idp".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e.into()));
                        return;
                    }
                };
                rt.block_on(async move {
                    match TcpListener::from_std(std_listener) {
                        Ok(listener) => {
                            let _ = tx.send(Ok(()));
                            serve(listener, acceptor, st, stop).await;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e.into()));
                        }
                    }
                });
            })?;
        rx.recv()
            .map_err(|_| anyhow!("the identity provider's thread ended before it listened"))??;
        Ok(Self {
            addr,
            ca_file,
            state,
            shutdown,
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The issuer: `https://127.0.0.1:PORT`, its base URL.
    pub fn issuer(&self) -> &str {
        &self.state.issuer
    }

    /// Its CA certificate (PEM), to trust it by.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// Its signing key's `kid`.
    pub fn kid(&self) -> &str {
        &self.state.kid
    }

    /// Makes `/token` issue tokens wrong in the given way from now on ([`Misbehave::Nothing`]
    /// to stop).
    pub fn misbehave(&self, how: Misbehave) {
        *lock(&self.state.misbehave) = how;
    }

    /// Registers a confidential client: `/token` then requires `secret` from `client_id`.
    pub fn add_client(&self, client_id: &str, secret: &str) {
        lock(&self.state.clients).insert(client_id.to_owned(), secret.to_owned());
    }

    /// Every redirect to a relying party with a code so far (the full URLs), oldest first.
    pub fn redirects(&self) -> Vec<String> {
        lock(&self.state.redirects).clone()
    }

    /// Id tokens issued so far.
    pub fn tokens_issued(&self) -> u64 {
        self.state.tokens.load(Ordering::Relaxed)
    }

    /// Rotates a new signing key in: published beside the others, it signs what
    /// [`Idp::access_token`] makes from now on. Its `kid`.
    pub fn rotate(&self) -> Result<String> {
        let kid = format!("idp-{}", random_hex(4)?);
        lock(&self.state.rotated).push((kid.clone(), Arc::new(ec_key()?)));
        Ok(kid)
    }

    /// Times `/jwks` was served.
    pub fn jwks_served(&self) -> u64 {
        self.state.jwks_served.load(Ordering::Relaxed)
    }

    /// An access token (ES256, with the current key) carrying `claims` and this provider's
    /// `iss`, `iat` and an `exp` an hour away (unless `claims` gives them).
    pub fn access_token(&self, claims: &serde_json::Value) -> Result<String> {
        let now = now_s();
        let mut c = serde_json::json!({
            "iss": self.state.issuer, "iat": now, "nbf": now - 1, "exp": now + 3600,
        });
        if let (Some(m), Some(extra)) = (c.as_object_mut(), claims.as_object()) {
            for (k, v) in extra {
                m.insert(k.clone(), v.clone());
            }
        }
        let rotated = lock(&self.state.rotated);
        let (kid, key): (&str, &EcdsaKeyPair) = match rotated.last() {
            Some((k, key)) => (k, key),
            None => (&self.state.kid, &self.state.key),
        };
        let header = serde_json::json!({ "alg": "ES256", "kid": kid, "typ": "JWT" });
        let input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(c.to_string().as_bytes())
        );
        let sig = key
            .sign(&SystemRandom::new(), input.as_bytes())
            .map_err(|_| anyhow!("signing"))?;
        Ok(format!("{input}.{}", b64url(sig.as_ref())))
    }

    /// Stops serving (also on drop).
    pub fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<State>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((tcp, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let (acceptor, state, shutdown) = (acceptor.clone(), state.clone(), shutdown.clone());
        tokio::spawn(async move {
            let conn = async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| handle(req, state.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            };
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = conn => {}
            }
        });
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    respond(status, "application/json", v.to_string())
}

/// An OAuth error answer of the token endpoint (RFC 6749 §5.2).
fn oauth_error(status: StatusCode, code: &str) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": code }))
}

fn redirect(to: &str) -> Response<Full<Bytes>> {
    let mut r = respond(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", "");
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn pairs(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .take(64)
        .filter_map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((percent_decode(k, true)?, percent_decode(v, true)?))
        })
        .collect()
}

fn param<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// `uri` with `params` appended to its query.
fn with_params(uri: &str, params: &[(&str, &str)]) -> String {
    let mut out = uri.to_owned();
    let mut sep = if uri.contains('?') { '&' } else { '?' };
    for (k, v) in params {
        let _ = write!(out, "{sep}{k}={}", enc(v));
        sep = '&';
    }
    out
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let query = pairs(parts.uri.query().unwrap_or(""));
    let form = if parts.method == Method::POST {
        match http_body_util::Limited::new(body, MAX_BODY).collect().await {
            Ok(b) => pairs(&String::from_utf8_lossy(&b.to_bytes())),
            Err(_) => {
                return Ok(respond(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "text/plain; charset=utf-8",
                    "too large",
                ));
            }
        }
    } else {
        Vec::new()
    };
    Ok(match (&parts.method, parts.uri.path()) {
        (&Method::GET, "/.well-known/openid-configuration") => discovery(&state),
        (&Method::GET, "/jwks") => jwks(&state),
        (&Method::GET, "/authorize") => authorize_form(&query, None, StatusCode::OK),
        (&Method::POST, "/authorize") => authorize_post(&state, &form),
        (&Method::POST, "/token") => token(&state, &parts.headers, &form),
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found",
        ),
    })
}

fn discovery(state: &State) -> Response<Full<Bytes>> {
    let base = &state.issuer;
    json(
        StatusCode::OK,
        &serde_json::json!({
            "issuer": base,
            "authorization_endpoint": format!("{base}/authorize"),
            "token_endpoint": format!("{base}/token"),
            "jwks_uri": format!("{base}/jwks"),
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
            "scopes_supported": ["openid", "email", "profile", "groups"],
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "nonce", "email",
                                 "email_verified", "name", "groups"],
        }),
    )
}

fn jwks(state: &State) -> Response<Full<Bytes>> {
    state.jwks_served.fetch_add(1, Ordering::Relaxed);
    let jwk = |kid: &str, key: &EcdsaKeyPair| {
        let point = key.public_key().as_ref();
        serde_json::json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
            "x": b64url(&point[1..33]), "y": b64url(&point[33..65]),
        })
    };
    let mut keys = vec![jwk(&state.kid, &state.key)];
    for (kid, key) in lock(&state.rotated).iter() {
        keys.push(jwk(kid, key));
    }
    json(StatusCode::OK, &serde_json::json!({ "keys": keys }))
}

/// The checked parameters of an authorization request.
struct AuthRequest<'a> {
    client_id: &'a str,
    redirect_uri: &'a str,
    state: Option<&'a str>,
    nonce: Option<&'a str>,
    code_challenge: &'a str,
}

/// Why an authorization request is refused.
#[derive(Debug)]
enum Refusal {
    /// No client id or no redirect URI to trust: the person gets a page.
    NoClient,
    /// The error goes back to the relying party at this URL.
    Back(String),
}

impl Refusal {
    fn response(self) -> Response<Full<Bytes>> {
        match self {
            Self::NoClient => respond(
                StatusCode::BAD_REQUEST,
                "text/html; charset=utf-8",
                "<!doctype html><title>Bad request</title><h1>Bad request</h1>\
                 <p>The application sent no client id or no valid redirect URI.</p>",
            ),
            Self::Back(url) => redirect(&url),
        }
    }
}

/// Checks an authorization request.
fn auth_request(p: &[(String, String)]) -> Result<AuthRequest<'_>, Refusal> {
    let client_id = param(p, "client_id").unwrap_or("");
    let redirect_uri = param(p, "redirect_uri").unwrap_or("");
    let redirect_ok = redirect_uri
        .parse::<http::Uri>()
        .is_ok_and(|u| matches!(u.scheme_str(), Some("https" | "http")) && u.host().is_some())
        && !redirect_uri.contains('#');
    if client_id.is_empty() || !redirect_ok {
        return Err(Refusal::NoClient);
    }
    let state = param(p, "state");
    let back = |error: &str| {
        let mut params = vec![("error", error)];
        if let Some(s) = state {
            params.push(("state", s));
        }
        Err(Refusal::Back(with_params(redirect_uri, &params)))
    };
    if param(p, "response_type") != Some("code") {
        return back("unsupported_response_type");
    }
    if !param(p, "scope")
        .unwrap_or("")
        .split(' ')
        .any(|s| s == "openid")
    {
        return back("invalid_scope");
    }
    let code_challenge = param(p, "code_challenge").unwrap_or("");
    // PKCE is required, and only S256 (plain would hand the verifier to whoever sees the URL).
    if code_challenge.len() != 43 || param(p, "code_challenge_method") != Some("S256") {
        return back("invalid_request");
    }
    Ok(AuthRequest {
        client_id,
        redirect_uri,
        state,
        nonce: param(p, "nonce"),
        code_challenge,
    })
}

const FORM_FIELDS: &[&str] = &[
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "nonce",
    "code_challenge",
    "code_challenge_method",
];

/// The sign-in page's looks (a demo shows it to people).
const FORM_CSS: &str = "*{box-sizing:border-box}body{font:15px/1.4 system-ui,sans-serif;background:#eef2f0;color:#1b2a24}\
    form{max-width:22em;margin:4em auto;background:#fff;padding:1.5em;border-top:4px solid #1f7a52}\
    h1{font-size:1.25em}label{display:block;margin:.7em 0}input{width:100%;padding:.35em;font:inherit}\
    button{font:inherit;padding:.35em .8em}#sign-in{background:#1f7a52;color:#fff;border:0}\
    .error{background:#fdecec;color:#8a1c1c;padding:.5em}";

fn authorize_form(
    p: &[(String, String)],
    error: Option<&str>,
    status: StatusCode,
) -> Response<Full<Bytes>> {
    let r = match auth_request(p) {
        Ok(r) => r,
        Err(refusal) => return refusal.response(),
    };
    let mut hidden = String::new();
    for f in FORM_FIELDS {
        if let Some(v) = param(p, f) {
            let _ = write!(
                hidden,
                "<input type=\"hidden\" name=\"{f}\" value=\"{}\">",
                esc(v)
            );
        }
    }
    let error = error
        .map(|e| {
            format!(
                "<p class=\"error\" role=\"alert\" id=\"idp-error\">{}</p>",
                esc(e)
            )
        })
        .unwrap_or_default();
    respond(
        status,
        "text/html; charset=utf-8",
        format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
             <title>Sign in · Demo identity provider</title><style>{FORM_CSS}</style></head><body>\
             <form method=\"post\" action=\"/authorize\" id=\"idp-login\">\
             <h1>Sign in to your organisation</h1><p>for <strong>{client}</strong></p>{error}{hidden}\
             <label>E-mail <input name=\"email\" value=\"{email}\" autocomplete=\"username\" required \
             autofocus></label>\
             <label>Password <input type=\"password\" name=\"password\" autocomplete=\"current-password\"></label>\
             <p><button type=\"submit\" id=\"sign-in\" name=\"action\" value=\"sign-in\">Sign in</button> \
             <button type=\"submit\" id=\"cancel\" name=\"action\" value=\"cancel\" formnovalidate>Cancel</button></p>\
             </form></body></html>",
            client = esc(r.client_id),
            email = esc(param(p, "email").unwrap_or("")),
        ),
    )
}

fn authorize_post(state: &State, form: &[(String, String)]) -> Response<Full<Bytes>> {
    let r = match auth_request(form) {
        Ok(r) => r,
        Err(refusal) => return refusal.response(),
    };
    let mut back: Vec<(&str, &str)> = Vec::new();
    if param(form, "action") == Some("cancel") {
        back.push(("error", "access_denied"));
        if let Some(s) = r.state {
            back.push(("state", s));
        }
        return redirect(&with_params(r.redirect_uri, &back));
    }
    let email = param(form, "email").unwrap_or("").trim();
    let password = param(form, "password").unwrap_or("");
    let Some(user) = state
        .users
        .iter()
        .find(|u| u.email.eq_ignore_ascii_case(email) && u.password == password)
    else {
        return authorize_form(
            form,
            Some("Wrong e-mail address or password."),
            StatusCode::UNAUTHORIZED,
        );
    };
    let Ok(code) = random_hex(32) else {
        return respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain; charset=utf-8",
            "no randomness",
        );
    };
    let mut codes = lock(&state.codes);
    codes.retain(|_, g| g.expires > Instant::now());
    codes.insert(
        code.clone(),
        Grant {
            client_id: r.client_id.to_owned(),
            redirect_uri: r.redirect_uri.to_owned(),
            code_challenge: r.code_challenge.to_owned(),
            nonce: r.nonce.map(str::to_owned),
            user: user.clone(),
            expires: Instant::now() + CODE_TTL,
        },
    );
    drop(codes);
    back.push(("code", &code));
    if let Some(s) = r.state {
        back.push(("state", s));
    }
    let url = with_params(r.redirect_uri, &back);
    lock(&state.redirects).push(url.clone());
    redirect(&url)
}

/// The client's credentials: HTTP Basic (RFC 6749 §2.3.1) or the form.
fn client_credentials(
    headers: &http::HeaderMap,
    form: &[(String, String)],
) -> Result<(String, Option<String>), &'static str> {
    if let Some(basic) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
    {
        let decoded = b64_decode(basic.trim())
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or("invalid_client")?;
        let (id, secret) = decoded.split_once(':').ok_or("invalid_client")?;
        let id = percent_decode(id, true).ok_or("invalid_client")?;
        let secret = percent_decode(secret, true).ok_or("invalid_client")?;
        if param(form, "client_id").is_some_and(|f| f != id) {
            return Err("invalid_request");
        }
        return Ok((id, Some(secret)));
    }
    let id = param(form, "client_id").ok_or("invalid_client")?;
    Ok((
        id.to_owned(),
        param(form, "client_secret").map(str::to_owned),
    ))
}

fn token(
    state: &State,
    headers: &http::HeaderMap,
    form: &[(String, String)],
) -> Response<Full<Bytes>> {
    if param(form, "grant_type") != Some("authorization_code") {
        return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type");
    }
    let (client_id, secret) = match client_credentials(headers, form) {
        Ok(c) => c,
        Err(e) => return oauth_error(StatusCode::UNAUTHORIZED, e),
    };
    let registered = lock(&state.clients).get(&client_id).cloned();
    match (&registered, &secret) {
        (Some(want), Some(got)) if want == got => {}
        (None, None) => {}
        _ => return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client"),
    }
    // A code is spent by its first use, right or wrong.
    let Some(grant) = lock(&state.codes).remove(param(form, "code").unwrap_or("")) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
    };
    let verifier = param(form, "code_verifier").unwrap_or("");
    let verifier_ok = (43..=128).contains(&verifier.len())
        && verifier
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'));
    let challenge =
        b64url(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes()).as_ref());
    if grant.expires <= Instant::now()
        || grant.client_id != client_id
        || param(form, "redirect_uri") != Some(grant.redirect_uri.as_str())
        || !verifier_ok
        || challenge != grant.code_challenge
    {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
    }
    let how = *lock(&state.misbehave);
    match id_token(state, &grant, how) {
        Ok(id_token) => {
            state.tokens.fetch_add(1, Ordering::Relaxed);
            let access = random_hex(32).unwrap_or_default();
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "access_token": access,
                    "token_type": "Bearer",
                    "expires_in": TOKEN_TTL_S,
                    "id_token": id_token,
                    "scope": "openid email profile",
                }),
            )
        }
        Err(_) => oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
    }
}

fn id_token(state: &State, grant: &Grant, how: Misbehave) -> Result<String> {
    let now = now_s();
    let user = &grant.user;
    let mut claims = serde_json::json!({
        "iss": state.issuer,
        "sub": user.subject(),
        "aud": grant.client_id,
        "azp": grant.client_id,
        "exp": now + TOKEN_TTL_S,
        "iat": now,
        "auth_time": now,
        "email": user.email,
        "email_verified": true,
        "name": user.name,
        "groups": user.groups,
    });
    if let Some(n) = &grant.nonce {
        claims["nonce"] = serde_json::json!(n);
    }
    let mut alg = "ES256";
    let mut key = &state.key;
    match how {
        Misbehave::Nothing => {}
        Misbehave::WrongAudience => {
            claims["aud"] = serde_json::json!("another-client");
            claims["azp"] = serde_json::json!("another-client");
        }
        Misbehave::BadSignature => key = &state.rogue,
        Misbehave::WrongNonce => {
            claims["nonce"] = serde_json::json!("not-the-nonce-of-the-request")
        }
        Misbehave::Expired => {
            claims["iat"] = serde_json::json!(now - 3600);
            claims["auth_time"] = serde_json::json!(now - 3600);
            claims["exp"] = serde_json::json!(now - 600);
        }
        Misbehave::WrongIssuer => {
            claims["iss"] = serde_json::json!(format!("{}/other", state.issuer))
        }
        Misbehave::UnverifiedEmail => claims["email_verified"] = serde_json::json!(false),
        Misbehave::AlgNone => alg = "none",
    }
    let header = serde_json::json!({ "alg": alg, "kid": state.kid, "typ": "JWT" });
    let input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    if alg == "none" {
        return Ok(format!("{input}."));
    }
    let sig = key
        .sign(&SystemRandom::new(), input.as_bytes())
        .map_err(|_| anyhow!("signing"))?;
    Ok(format!("{input}.{}", b64url(sig.as_ref())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorization_requests_need_pkce_s256_and_openid() {
        let base = "client_id=portal&redirect_uri=https%3A%2F%2Fc.example%2Fcb&response_type=code\
                    &scope=openid%20email&state=s1&nonce=n1";
        let challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
        let ok = pairs(&format!(
            "{base}&code_challenge={challenge}&code_challenge_method=S256"
        ));
        assert!(auth_request(&ok).is_ok());
        for (q, want) in [
            (
                format!("{base}&code_challenge={challenge}&code_challenge_method=plain"),
                "invalid_request",
            ),
            (base.to_owned(), "invalid_request"),
            (
                format!("{base}&code_challenge={challenge}&code_challenge_method=S256")
                    .replace("openid%20", ""),
                "invalid_scope",
            ),
        ] {
            match auth_request(&pairs(&q)) {
                Err(Refusal::Back(url)) => {
                    assert!(url.starts_with("https://c.example/cb?error="), "{url}");
                    assert!(url.contains(want) && url.ends_with("&state=s1"), "{url}");
                }
                _ => panic!("{q}: expected a redirect with an error"),
            }
        }
        // No redirect URI to trust: a page, not a redirect.
        assert!(matches!(
            auth_request(&pairs("client_id=portal")),
            Err(Refusal::NoClient)
        ));
    }

    #[test]
    fn users_load_from_json() {
        let dir = crate::TempDir::new("idp-users");
        let f = dir.join("users.json");
        std::fs::write(
            &f,
            r#"[{"email":"e@x.example","password":"pw","groups":["g"]},{"email":"f@x.example","password":"p2","name":"F"}]"#,
        )
        .expect("write");
        let users = IdpUser::from_json_file(&f).expect("users");
        assert_eq!(
            users[0],
            IdpUser::new("e@x.example", "pw", "e@x.example", &["g"])
        );
        assert_eq!(users[1].name, "F");
        std::fs::write(&f, "[]").expect("write");
        assert!(IdpUser::from_json_file(&f).is_err());
        assert_ne!(users[0].subject(), users[1].subject());
    }
}
