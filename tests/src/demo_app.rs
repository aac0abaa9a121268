//! The demo file-sharing app (`files.test`) that end-to-end tests and `cargo xtask demo` put
//! behind Sluice, and the paths of the fixture files the tests upload.
//!
//! The app is what the default policy bundle's catalogue describes (`policies/default/
//! catalog.yaml`, app `files`): users sign in with a form, get a `session` cookie holding an ES256
//! JWT signed with `tests/fixtures/demo-idp.key` (kid `files-idp-1`, verifiable with
//! `policies/default/jwks/files.json`), and upload, list, download, share and delete files.
//! It keeps its own log of every request and every upload it received (with the SHA-256 of the
//! bytes that arrived), so a test can tell exactly what got through the proxy: through
//! [`DemoApp::requests`] and [`DemoApp::uploads`] in process, or `GET /_log` out of process.
//!
//! Routes (host `files.test`; HTTP/1.1 and HTTP/2 by ALPN over TLS, HTTP/1.1 in plain mode):
//! - `GET /login` (form), `POST /login` (urlencoded `user`, `password`) → 303 to `/files` with
//!   `Set-Cookie: session=<JWT>; HttpOnly; Secure; SameSite=Lax` (no `Secure` in plain mode);
//!   `GET|POST /logout`;
//! - `POST /api/login` (JSON or urlencoded `user`, `password`) → `{"token", "token_type",
//!   "expires_in", "email"}`; API calls take `Authorization: Bearer <token>` as well as the cookie;
//! - `GET /files` (HTML list with download links, share buttons and the upload form),
//!   `GET /api/files` → `{"files": [FileInfo...]}`, `GET /api/me`;
//! - `POST /upload` (multipart, field `file`) → 303 to `/files`, or 201 with the file's JSON when
//!   the request accepts `application/json`; `PUT /api/files/{name}` (raw body) → 201 JSON;
//! - `GET /files/{id}/download` → the bytes, `Content-Disposition: attachment`, a content type by
//!   extension; `POST /files/{id}/share` (optional `with`); `DELETE /api/files/{id}` (owner only);
//! - `GET /_log[?since=SEQ]` → `{"requests": [...], "uploads": [...]}` (not itself logged, no
//!   login needed), `GET /healthz`.
//!
//! Without a valid session, `GET /` and `GET /files...` redirect (303) to `/login`; everything
//! else answers 401. Uploads are streamed: every byte is hashed, and the file is kept in memory
//! only while the app's total stays under [`DemoOptions::store_limit`]; beyond it the upload is
//! still accepted and logged with `kept: false`, and its download answers 410, so multi-GiB
//! transfer tests need no disk and cannot exhaust memory.

use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aws_lc_rs::{
    rand::SystemRandom,
    signature::{self, EcdsaKeyPair, KeyPair as _},
};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256,
};
use rustls::ServerConfig;
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use sha2::{Digest as _, Sha256};
use sluice_policy::bundle::jws::{b64url, b64url_decode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use self::multipart::{Event, Multipart};

/// The host name the app serves.
pub const HOST: &str = "files.test";
/// The password of every demo user unless [`DemoOptions::password`] says otherwise.
pub const DEFAULT_PASSWORD: &str = "demo";
/// The `kid` of the app's token-signing key (as in `policies/default/jwks/files.json`).
pub const KID: &str = "files-idp-1";
/// The tokens' `iss`.
pub const ISSUER: &str = "https://files.test";
/// The tokens' `aud`.
pub const AUDIENCE: &str = "files";
/// The session cookie's name.
pub const COOKIE: &str = "session";
/// The default bound on the bytes of all kept files together.
pub const DEFAULT_STORE_LIMIT: u64 = 512 * 1024 * 1024;

const MAX_FORM_BYTES: usize = 16 * 1024;
const MAX_REQUEST_LOG: usize = 50_000;
const MAX_UPLOAD_LOG: usize = 10_000;
const MAX_NAME_BYTES: usize = 255;
/// Request bodies read (and dropped) before a refusal, so clients see the answer.
const MAX_DRAIN_BYTES: u64 = 64 * 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// paths of the workspace's fixtures

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Where `cargo xtask fixtures` puts the generated files: `$SLUICE_FIXTURES`, else
/// `<workspace>/target/fixtures`.
pub fn fixtures_dir() -> PathBuf {
    std::env::var_os("SLUICE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/fixtures"))
}

/// A generated fixture's path; fails with a hint when the fixtures were not made.
pub fn fixture(name: &str) -> Result<PathBuf> {
    let p = fixtures_dir().join(name);
    if !p.is_file() {
        bail!(
            "fixture {} is missing: run `cargo xtask fixtures` first",
            p.display()
        );
    }
    Ok(p)
}

/// The fixtures' `manifest.json`: `{"files": {NAME: {"sha256", "size", "type", "label" (GUID or
/// null), "label_name", "tenant", "note"}}, "labels": {ID: {"guid", "name", "tenant"}},
/// "password", "cards", "generator"}`.
pub fn fixture_manifest() -> Result<serde_json::Value> {
    let p = fixture("manifest.json")?;
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}

/// The fixtures venv's Python (`$SLUICE_PYTHON`, else `<workspace>/target/pyenv/bin/python`),
/// which has python-docx, openpyxl, python-pptx, pypdf, reportlab and msoffcrypto-tool.
pub fn python() -> PathBuf {
    std::env::var_os("SLUICE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/pyenv/bin/python"))
}

/// Decrypts an encrypted Office file with msoffcrypto-tool (the data integrity HMAC checked)
/// into `out`: whether `password` opened it.
pub fn office_decrypt(file: &Path, password: &str, out: &Path) -> bool {
    let script = "import io, sys, msoffcrypto\n\
                  f = msoffcrypto.OfficeFile(open(sys.argv[1], 'rb'))\n\
                  f.load_key(password=sys.argv[2], verify_password=True)\n\
                  o = io.BytesIO()\n\
                  f.decrypt(o, verify_integrity=True)\n\
                  open(sys.argv[3], 'wb').write(o.getvalue())\n";
    std::process::Command::new(python())
        .args(["-c", script])
        .arg(file)
        .arg(password)
        .arg(out)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `tests/fixtures/read_label.py`.
pub fn read_label_script() -> PathBuf {
    workspace_root().join("tests/fixtures/read_label.py")
}

/// Opens `file` with its format's Python library (and, with `libreoffice`, converts it to PDF with
/// LibreOffice) through `read_label.py`; returns its JSON: `{"opened": true, "type",
/// "properties": {MSIP_Label_*/Sluice_* name: value}, "labelinfo": [...], "label": GUID|null,
/// "summary", "libreoffice"?}`. An `Err` carries the script's message when the file does not open.
pub fn read_label(file: &Path, libreoffice: bool) -> Result<serde_json::Value> {
    let py = python();
    if !py.exists() {
        bail!(
            "{} is missing: run `cargo xtask fixtures` first",
            py.display()
        );
    }
    let mut cmd = Command::new(&py);
    cmd.arg(read_label_script()).arg(file);
    if libreoffice {
        cmd.arg("--libreoffice");
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {}", py.display()))?;
    if !out.status.success() {
        bail!(
            "{} does not open: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("read_label.py printed no JSON")
}

/// `tests/fixtures/demo-idp.key`: the app's token-signing key (PKCS#8 PEM, P-256).
pub fn demo_idp_key_path() -> PathBuf {
    workspace_root().join("tests/fixtures/demo-idp.key")
}

/// `policies/default/jwks/files.json`: the public half of [`demo_idp_key_path`].
pub fn files_jwks_path() -> PathBuf {
    workspace_root().join("policies/default/jwks/files.json")
}

/// `policies/default/directory.yaml`.
pub fn directory_path() -> PathBuf {
    workspace_root().join("policies/default/directory.yaml")
}

// ---------------------------------------------------------------------------------------------
// users

/// A user who can sign in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoUser {
    /// Short id, the token's `sub` (`alice`); accepted as the login name too.
    pub id: String,
    /// E-mail, the token's `email` claim and the login name.
    pub email: String,
    /// Display name.
    pub name: String,
    /// A guest of the organisation (other domain, or a member of a guest group).
    pub guest: bool,
}

impl DemoUser {
    /// The users of a bundle's `directory.yaml` (guests by domain or guest group, as the policy
    /// sees them).
    pub fn from_directory(path: &Path) -> Result<Vec<Self>> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let doc: serde_json::Value =
            serde_norway::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let strings = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let domains = strings(&doc["org_domains"]);
        let guest_groups = strings(&doc["guest_groups"]);
        let mut users = Vec::new();
        for u in doc["users"].as_array().into_iter().flatten() {
            let (Some(id), Some(email)) = (u["id"].as_str(), u["email"].as_str()) else {
                bail!("{}: every user needs an id and an email", path.display());
            };
            let domain = email.rsplit_once('@').map(|(_, d)| d).unwrap_or_default();
            let guest = !domains.iter().any(|d| d.eq_ignore_ascii_case(domain))
                || strings(&u["groups"])
                    .iter()
                    .any(|g| guest_groups.contains(g));
            users.push(Self {
                id: id.to_owned(),
                email: email.to_owned(),
                name: u["name"].as_str().unwrap_or(id).to_owned(),
                guest,
            });
        }
        if users.is_empty() {
            bail!("{} lists no users", path.display());
        }
        Ok(users)
    }

    /// The default bundle's users (alice and bob, members; carol, a guest by group).
    pub fn defaults() -> Result<Vec<Self>> {
        Self::from_directory(&directory_path())
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id, "email": self.email, "name": self.name, "guest": self.guest,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// TLS

/// The app's own small PKI: a CA and a leaf for `files.test`, `*.files.test`, `localhost` and
/// `127.0.0.1` (ECDSA P-256, each with its own key). The CA's key is dropped once the leaf is
/// signed.
#[derive(Clone)]
pub struct DemoPki {
    /// The CA certificate (PEM), for clients' trust stores.
    pub ca_pem: String,
    /// The leaf, then the CA (PEM).
    pub chain_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for DemoPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoPki").finish_non_exhaustive()
    }
}

impl DemoPki {
    /// Files [`DemoPki::load_or_create`] uses in its directory.
    pub const CA_FILE: &str = "ca.pem";
    /// The leaf and CA chain.
    pub const CHAIN_FILE: &str = "files.test.pem";
    /// The leaf's private key.
    pub const KEY_FILE: &str = "files.test.key";

    /// A new CA and leaf.
    pub fn generate() -> Result<Self> {
        let now = time::OffsetDateTime::now_utc();
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name
            .push(DnType::CommonName, "Sluice Demo Files CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.not_before = now - time::Duration::days(1);
        ca.not_after = now + time::Duration::days(365);
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut leaf = CertificateParams::new(vec![
            HOST.to_owned(),
            format!("*.{HOST}"),
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ])?;
        leaf.distinguished_name.push(DnType::CommonName, HOST);
        leaf.not_before = now - time::Duration::days(1);
        leaf.not_after = now + time::Duration::days(90);
        let leaf_cert = leaf.signed_by(&key, &issuer)?;
        Ok(Self {
            ca_pem: ca_cert.pem(),
            chain_pem: format!("{}{}", leaf_cert.pem(), ca_cert.pem()),
            key_pem: key.serialize_pem(),
        })
    }

    /// Loads `ca.pem`, `files.test.pem` and `files.test.key` from `dir`, or generates them there
    /// (key mode 0600) when any is missing.
    pub fn load_or_create(dir: &Path) -> Result<Self> {
        let (ca, chain, key) = (
            dir.join(Self::CA_FILE),
            dir.join(Self::CHAIN_FILE),
            dir.join(Self::KEY_FILE),
        );
        if ca.is_file() && chain.is_file() && key.is_file() {
            let read = |p: &Path| {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
            };
            let pki = Self {
                ca_pem: read(&ca)?,
                chain_pem: read(&chain)?,
                key_pem: read(&key)?,
            };
            pki.server_config()
                .with_context(|| format!("certificates in {}", dir.display()))?;
            return Ok(pki);
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let pki = Self::generate()?;
        std::fs::write(&ca, &pki.ca_pem)?;
        std::fs::write(&chain, &pki.chain_pem)?;
        write_private(&key, pki.key_pem.as_bytes())?;
        Ok(pki)
    }

    /// A rustls server config serving the leaf (ALPN `h2`, `http/1.1`).
    pub fn server_config(&self) -> Result<ServerConfig> {
        let chain = CertificateDer::pem_slice_iter(self.chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow!("certificate chain: {e}"))?;
        if chain.is_empty() {
            bail!("no certificate in the chain");
        }
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| anyhow!("private key: {e}"))?;
        let mut cfg = ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(cfg)
    }
}

fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(data)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// options and records

/// How to run the app.
#[derive(Clone)]
pub struct DemoOptions {
    /// Where to listen (port 0 for any).
    pub listen: SocketAddr,
    /// TLS with this PKI, or plain HTTP/1.1 when `None`.
    pub tls: Option<DemoPki>,
    /// Who can sign in.
    pub users: Vec<DemoUser>,
    /// Every user's password.
    pub password: String,
    /// The token-signing key (PKCS#8 PEM, P-256).
    pub signing_key_pem: String,
    /// How long a session token lives.
    pub token_ttl: Duration,
    /// Bound on the bytes of all kept files together.
    pub store_limit: u64,
    /// The network namespace to listen in (its file, e.g. `/run/netns/NAME`); none: the
    /// caller's. Only [`DemoApp::start`] honours it.
    pub netns: Option<PathBuf>,
}

impl std::fmt::Debug for DemoOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoOptions")
            .field("listen", &self.listen)
            .field("tls", &self.tls.is_some())
            .field("users", &self.users)
            .field("token_ttl", &self.token_ttl)
            .field("store_limit", &self.store_limit)
            .finish_non_exhaustive()
    }
}

impl DemoOptions {
    /// TLS on 127.0.0.1 (any port) with a fresh [`DemoPki`], the default bundle's users, password
    /// [`DEFAULT_PASSWORD`], the key of `tests/fixtures/demo-idp.key`, 1 h tokens, 512 MiB store.
    pub fn tls() -> Result<Self> {
        let key_path = demo_idp_key_path();
        Ok(Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: Some(DemoPki::generate()?),
            users: DemoUser::defaults()?,
            password: DEFAULT_PASSWORD.to_owned(),
            signing_key_pem: std::fs::read_to_string(&key_path)
                .with_context(|| format!("reading {}", key_path.display()))?,
            token_ttl: Duration::from_secs(3600),
            store_limit: DEFAULT_STORE_LIMIT,
            netns: None,
        })
    }

    /// As [`DemoOptions::tls`], but plain HTTP/1.1.
    pub fn plain() -> Result<Self> {
        Ok(Self {
            tls: None,
            ..Self::tls()?
        })
    }
}

/// How an upload arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadVia {
    /// `POST /upload`, multipart field `file`.
    Multipart,
    /// `PUT /api/files/{name}`.
    Put,
}

impl UploadVia {
    fn as_str(self) -> &'static str {
        match self {
            Self::Multipart => "multipart",
            Self::Put => "put",
        }
    }
}

/// A complete upload the app received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRecord {
    /// Sequence number, shared with [`RequestRecord::seq`] (increasing).
    pub seq: u64,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The uploader's e-mail.
    pub user: String,
    /// The file name given.
    pub name: String,
    /// Bytes received.
    pub size: u64,
    /// SHA-256 (lower-case hex) of the bytes received.
    pub sha256: String,
    /// How it arrived.
    pub via: UploadVia,
    /// The id it was stored under.
    pub file_id: String,
    /// Whether its bytes were kept (false past the store limit).
    pub kept: bool,
}

impl UploadRecord {
    /// The record as `/_log` shows it: `{"seq", "at_ms", "user", "name", "size", "sha256",
    /// "via": "multipart"|"put", "file_id", "kept"}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "seq": self.seq, "at_ms": self.at_ms, "user": self.user, "name": self.name,
            "size": self.size, "sha256": self.sha256, "via": self.via.as_str(),
            "file_id": self.file_id, "kept": self.kept,
        })
    }
}

/// A request the app answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// Sequence number (increasing).
    pub seq: u64,
    /// When it was answered, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Method.
    pub method: String,
    /// Path (without the query).
    pub path: String,
    /// Status answered.
    pub status: u16,
    /// The signed-in user's e-mail, if any (for a successful login, the user it signed in).
    pub user: Option<String>,
    /// `HTTP/1.1` or `HTTP/2`.
    pub version: String,
}

impl RequestRecord {
    /// The record as `/_log` shows it: `{"seq", "at_ms", "method", "path", "status", "user",
    /// "version"}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "seq": self.seq, "at_ms": self.at_ms, "method": self.method, "path": self.path,
            "status": self.status, "user": self.user, "version": self.version,
        })
    }
}

/// A stored file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    /// Its id (decimal), as in `/files/{id}/download`.
    pub id: String,
    /// File name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 (lower-case hex).
    pub sha256: String,
    /// The owner's e-mail.
    pub owner: String,
    /// Content type served on download (by extension).
    pub content_type: String,
    /// Whether the bytes were kept (downloads of others answer 410).
    pub kept: bool,
    /// Who it was shared with (e-mails, or `link` for a share without a recipient).
    pub shared_with: Vec<String>,
}

impl FileInfo {
    /// `{"id", "name", "size", "sha256", "owner", "content_type", "kept", "shared_with",
    /// "download": "/files/{id}/download"}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id, "name": self.name, "size": self.size, "sha256": self.sha256,
            "owner": self.owner, "content_type": self.content_type, "kept": self.kept,
            "shared_with": self.shared_with, "download": format!("/files/{}/download", self.id),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// state

#[derive(Debug)]
struct Stored {
    info: FileInfo,
    data: Option<Bytes>,
}

#[derive(Debug, Default)]
struct Log {
    requests: VecDeque<RequestRecord>,
    uploads: VecDeque<UploadRecord>,
}

struct State {
    users: Vec<DemoUser>,
    password: String,
    key: EcdsaKeyPair,
    public: Vec<u8>,
    ttl: Duration,
    store_limit: u64,
    secure_cookie: bool,
    used: AtomicU64,
    next_id: AtomicU64,
    seq: AtomicU64,
    files: Mutex<BTreeMap<u64, Stored>>,
    log: Mutex<Log>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

impl State {
    fn new(opts: &DemoOptions) -> Result<Self> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(opts.signing_key_pem.as_bytes())
            .map_err(|e| anyhow!("the signing key is not a PRIVATE KEY PEM: {e}"))?;
        let key = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            der.secret_pkcs8_der(),
        )
        .map_err(|e| anyhow!("the signing key is not a P-256 PKCS#8 key: {e}"))?;
        let public = key.public_key().as_ref().to_vec();
        if opts.users.is_empty() {
            bail!("the demo app needs at least one user");
        }
        Ok(Self {
            users: opts.users.clone(),
            password: opts.password.clone(),
            key,
            public,
            ttl: opts.token_ttl,
            store_limit: opts.store_limit,
            secure_cookie: opts.tls.is_some(),
            used: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            seq: AtomicU64::new(0),
            files: Mutex::new(BTreeMap::new()),
            log: Mutex::new(Log::default()),
        })
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn user(&self, login: &str) -> Option<&DemoUser> {
        let login = login.trim();
        self.users
            .iter()
            .find(|u| u.email.eq_ignore_ascii_case(login) || u.id == login)
    }

    fn sign_token(&self, user: &DemoUser) -> Result<String> {
        let iat = now_ms() / 1000;
        let header = serde_json::json!({ "alg": "ES256", "typ": "JWT", "kid": KID });
        let claims = serde_json::json!({
            "iss": ISSUER, "aud": AUDIENCE, "sub": user.id, "email": user.email,
            "name": user.name, "iat": iat, "exp": iat + self.ttl.as_secs(),
        });
        let input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let sig = self
            .key
            .sign(&SystemRandom::new(), input.as_bytes())
            .map_err(|_| anyhow!("signing failed"))?;
        Ok(format!("{input}.{}", b64url(sig.as_ref())))
    }

    /// The user a token names, when it is one of ours, unexpired, for this app.
    fn verify_token(&self, token: &str) -> Option<&DemoUser> {
        let mut parts = token.trim().split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let header: serde_json::Value = serde_json::from_slice(&b64url_decode(h)?).ok()?;
        if header["alg"] != "ES256" || header["kid"] != KID {
            return None;
        }
        let sig = b64url_decode(s)?;
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &self.public)
            .verify(format!("{h}.{p}").as_bytes(), &sig)
            .ok()?;
        let claims: serde_json::Value = serde_json::from_slice(&b64url_decode(p)?).ok()?;
        let exp = claims["exp"].as_u64()?;
        if exp <= now_ms() / 1000 || claims["iss"] != ISSUER || claims["aud"] != AUDIENCE {
            return None;
        }
        self.user(claims["email"].as_str()?)
    }

    fn authenticate(&self, headers: &HeaderMap) -> Option<&DemoUser> {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            });
        if let Some(t) = bearer {
            return self.verify_token(t);
        }
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
            .find_map(|t| self.verify_token(t))
    }

    /// Reserves `n` bytes of the store, if they fit.
    fn reserve(&self, n: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|t| *t <= self.store_limit)
            })
            .is_ok()
    }

    fn release(&self, n: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(n))
            });
    }

    fn log_request(&self, rec: RequestRecord) {
        let mut log = lock(&self.log);
        if log.requests.len() >= MAX_REQUEST_LOG {
            log.requests.pop_front();
        }
        log.requests.push_back(rec);
    }

    fn log_upload(&self, rec: UploadRecord) {
        let mut log = lock(&self.log);
        if log.uploads.len() >= MAX_UPLOAD_LOG {
            log.uploads.pop_front();
        }
        log.uploads.push_back(rec);
    }

    /// Stores a finished upload (its reservation, if kept, moves to the file).
    fn store(&self, sink: Sink, name: &str, owner: &str, via: UploadVia) -> FileInfo {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (size, sha256, data) = sink.finish();
        let info = FileInfo {
            id: id.to_string(),
            name: name.to_owned(),
            size,
            sha256: sha256.clone(),
            owner: owner.to_owned(),
            content_type: content_type_for(name).to_owned(),
            kept: data.is_some(),
            shared_with: Vec::new(),
        };
        lock(&self.files).insert(
            id,
            Stored {
                info: info.clone(),
                data,
            },
        );
        self.log_upload(UploadRecord {
            seq: self.next_seq(),
            at_ms: now_ms(),
            user: owner.to_owned(),
            name: name.to_owned(),
            size,
            sha256,
            via,
            file_id: info.id.clone(),
            kept: info.kept,
        });
        info
    }
}

/// Where an upload's bytes go while they arrive: always hashed, kept while the store has room.
struct Sink {
    state: Arc<State>,
    hasher: Sha256,
    size: u64,
    data: Option<Vec<u8>>,
    reserved: u64,
}

impl Sink {
    fn new(state: Arc<State>) -> Self {
        Self {
            state,
            hasher: Sha256::new(),
            size: 0,
            data: Some(Vec::new()),
            reserved: 0,
        }
    }

    fn write(&mut self, chunk: &[u8]) {
        self.hasher.update(chunk);
        self.size += chunk.len() as u64;
        if let Some(buf) = &mut self.data {
            if self.state.reserve(chunk.len() as u64) {
                self.reserved += chunk.len() as u64;
                buf.extend_from_slice(chunk);
            } else {
                self.data = None;
                self.state.release(self.reserved);
                self.reserved = 0;
            }
        }
    }

    /// (size, sha256, kept bytes); the reservation now belongs to the stored bytes.
    fn finish(mut self) -> (u64, String, Option<Bytes>) {
        let hash = crate::hex(&std::mem::take(&mut self.hasher).finalize());
        self.reserved = 0;
        (self.size, hash, self.data.take().map(Bytes::from))
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.state.release(self.reserved);
    }
}

// ---------------------------------------------------------------------------------------------
// the running app

static APP_SEQ: AtomicU32 = AtomicU32::new(0);

/// A running demo app; stops when dropped.
pub struct DemoApp {
    addr: SocketAddr,
    ca_pem: Option<String>,
    ca_file: Option<crate::TempDir>,
    state: Arc<State>,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for DemoApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoApp")
            .field("addr", &self.addr)
            .field("tls", &self.ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for DemoApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            t.abort();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Bound {
    listener: TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<State>,
}

async fn bind(opts: &DemoOptions) -> Result<Bound> {
    let state = Arc::new(State::new(opts)?);
    let acceptor = match &opts.tls {
        Some(pki) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
            pki.server_config()?,
        ))),
        None => None,
    };
    let listener = TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("binding {}", opts.listen))?;
    Ok(Bound {
        listener,
        acceptor,
        state,
    })
}

async fn serve(bound: Bound, shutdown: CancellationToken) {
    let Bound {
        listener,
        acceptor,
        state,
    } = bound;
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((tcp, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, state, shutdown) = (acceptor.clone(), state.clone(), shutdown.clone());
        tokio::spawn(async move {
            let conn = async move {
                match acceptor {
                    Some(acceptor) => {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                        serve_conn(TokioIo::new(tls), h2, state).await;
                    }
                    None => serve_conn(TokioIo::new(tcp), false, state).await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = conn => {}
            }
        });
    }
}

async fn serve_conn<I>(io: I, h2: bool, state: Arc<State>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| handle(req, state.clone()));
    if h2 {
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(4 * 1024 * 1024)
            .initial_connection_window_size(8 * 1024 * 1024)
            .serve_connection(io, svc)
            .await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, svc)
            .await;
    }
}

impl DemoApp {
    /// Starts the app on a runtime of its own (two worker threads), so blocking clients (`curl`
    /// through `std::process`) can be used from any test, async or not.
    pub fn start(opts: DemoOptions) -> Result<Self> {
        let shutdown = CancellationToken::new();
        let (tx, rx) = std::sync::mpsc::channel::<Result<(SocketAddr, Arc<State>)>>();
        let stop = shutdown.clone();
        let ca_pem = opts.tls.as_ref().map(|p| p.ca_pem.clone());
        let thread = std::thread::Builder::new()
            .name("demo-app".into())
            .spawn(move || {
                if let Some(ns) = &opts.netns {
                    let entered = std::fs::File::open(ns)
                        .map_err(anyhow::Error::from)
                        .and_then(|f| {
                            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                                .map_err(anyhow::Error::from)
                        });
                    if let Err(e) = entered {
                        let _ = tx.send(Err(e.context("entering the app's network namespace")));
                        return;
                    }
                }
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
                    match bind(&opts).await {
                        Ok(bound) => {
                            let addr = bound.listener.local_addr().map_err(Into::into);
                            let _ = tx.send(addr.map(|a| (a, bound.state.clone())));
                            serve(bound, stop).await;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                });
            })?;
        let (addr, state) = rx
            .recv()
            .map_err(|_| anyhow!("the demo app's thread ended before it listened"))??;
        Self::finish(addr, ca_pem, state, shutdown, Some(thread), None)
    }

    /// Starts the app on the current tokio runtime.
    pub async fn start_async(opts: DemoOptions) -> Result<Self> {
        let bound = bind(&opts).await?;
        let addr = bound.listener.local_addr()?;
        let state = bound.state.clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(bound, shutdown.clone()));
        let ca_pem = opts.tls.as_ref().map(|p| p.ca_pem.clone());
        Self::finish(addr, ca_pem, state, shutdown, None, Some(task))
    }

    fn finish(
        addr: SocketAddr,
        ca_pem: Option<String>,
        state: Arc<State>,
        shutdown: CancellationToken,
        thread: Option<std::thread::JoinHandle<()>>,
        task: Option<tokio::task::JoinHandle<()>>,
    ) -> Result<Self> {
        let mut app = Self {
            addr,
            ca_pem,
            ca_file: None,
            state,
            shutdown,
            thread,
            task,
        };
        if let Some(pem) = &app.ca_pem {
            let dir = crate::TempDir::new(&format!(
                "demo-app-{}",
                APP_SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(dir.join("ca.pem"), pem)?;
            app.ca_file = Some(dir);
        }
        Ok(app)
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether it serves TLS.
    pub fn is_tls(&self) -> bool {
        self.ca_pem.is_some()
    }

    /// The CA its certificate chains to (PEM), in TLS mode.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// A file holding [`DemoApp::ca_pem`] (for `curl --cacert`), removed when the app stops.
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.ca_file.as_ref().map(|d| d.join("ca.pem"))
    }

    /// `https://files.test:PORT` (or `http://`), the base URL clients use with the name resolved
    /// to [`DemoApp::addr`].
    pub fn base_url(&self) -> String {
        let scheme = if self.is_tls() { "https" } else { "http" };
        format!("{scheme}://{HOST}:{}", self.addr.port())
    }

    /// `curl` arguments that reach this app by name: `--resolve files.test:PORT:IP` and, in TLS
    /// mode, `--cacert <ca file>`.
    pub fn curl_args(&self) -> Vec<String> {
        let ip = match self.addr.ip() {
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
            v4 => v4.to_string(),
        };
        let mut args = vec![
            "--resolve".to_owned(),
            format!("{HOST}:{}:{ip}", self.addr.port()),
        ];
        if let Some(ca) = self.ca_file() {
            args.push("--cacert".to_owned());
            args.push(ca.display().to_string());
        }
        args
    }

    /// Every request answered so far (the most recent 50,000), oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.state.log).requests.iter().cloned().collect()
    }

    /// Every complete upload received so far (the most recent 10,000), oldest first.
    pub fn uploads(&self) -> Vec<UploadRecord> {
        lock(&self.state.log).uploads.iter().cloned().collect()
    }

    /// Forgets the request and upload logs (files stay).
    pub fn clear_log(&self) {
        let mut log = lock(&self.state.log);
        log.requests.clear();
        log.uploads.clear();
    }

    /// The stored files, by id.
    pub fn files(&self) -> Vec<FileInfo> {
        lock(&self.state.files)
            .values()
            .map(|s| s.info.clone())
            .collect()
    }

    /// A stored file's bytes (None when unknown or not kept).
    pub fn file_bytes(&self, id: &str) -> Option<Bytes> {
        let id: u64 = id.parse().ok()?;
        lock(&self.state.files).get(&id)?.data.clone()
    }

    /// Places a file for download tests, owned by `owner` (an e-mail or id of a known user);
    /// not logged as an upload. Fails when the name is not acceptable or the store is full.
    pub fn seed(&self, name: &str, bytes: impl Into<Bytes>, owner: &str) -> Result<FileInfo> {
        let user = self
            .state
            .user(owner)
            .ok_or_else(|| anyhow!("no user `{owner}`"))?;
        let name = valid_name(name).ok_or_else(|| anyhow!("unacceptable file name `{name}`"))?;
        let bytes: Bytes = bytes.into();
        if !self.state.reserve(bytes.len() as u64) {
            bail!("the store limit leaves no room for {} bytes", bytes.len());
        }
        let id = self.state.next_id.fetch_add(1, Ordering::Relaxed);
        let info = FileInfo {
            id: id.to_string(),
            name: name.clone(),
            size: bytes.len() as u64,
            sha256: crate::hex(&Sha256::digest(&bytes)),
            owner: user.email.clone(),
            content_type: content_type_for(&name).to_owned(),
            kept: true,
            shared_with: Vec::new(),
        };
        lock(&self.state.files).insert(
            id,
            Stored {
                info: info.clone(),
                data: Some(bytes),
            },
        );
        Ok(info)
    }

    /// A session token for a known user (e-mail or id), as `POST /login` would set it.
    pub fn token_for(&self, user: &str) -> Result<String> {
        let u = self
            .state
            .user(user)
            .ok_or_else(|| anyhow!("no user `{user}`"))?;
        self.state.sign_token(u)
    }

    /// The users who can sign in.
    pub fn users(&self) -> &[DemoUser] {
        &self.state.users
    }

    /// Resolves once [`DemoApp::stop`] was called.
    pub async fn stopped(&self) {
        self.shutdown.cancelled().await;
    }

    /// Stops serving (also done on drop).
    pub fn stop(&self) {
        self.shutdown.cancel();
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP

type Body = BoxBody<Bytes, std::io::Error>;

fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    respond(status, "application/json", v.to_string())
}

fn error(status: StatusCode, msg: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "error": msg }))
}

fn redirect(to: &'static str) -> Response<Body> {
    let mut r = respond(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", "");
    r.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(to));
    r
}

fn html(status: StatusCode, body: String) -> Response<Body> {
    respond(status, "text/html; charset=utf-8", body)
}

fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json"))
}

fn version_name(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_10 => "HTTP/1.0",
        _ => "other",
    }
}

async fn handle(req: Request<Incoming>, state: Arc<State>) -> Result<Response<Body>, Infallible> {
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let version = version_name(req.version());
    let user = state.authenticate(req.headers()).cloned();
    let is_log = path == "/_log";
    let resp = route(req, &state, user.as_ref()).await;
    let user = user
        .map(|u| u.email)
        .or_else(|| resp.extensions().get::<LoggedIn>().map(|l| l.0.clone()));
    if !is_log {
        let seq = state.next_seq();
        state.log_request(RequestRecord {
            seq,
            at_ms: now_ms(),
            method,
            path,
            status: resp.status().as_u16(),
            user,
            version: version.to_owned(),
        });
    }
    Ok(resp)
}

async fn route(
    req: Request<Incoming>,
    state: &Arc<State>,
    user: Option<&DemoUser>,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method().clone();
    match (&method, segments.as_slice()) {
        (&Method::GET, ["healthz"]) => respond(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, ["_log"]) => log_json(state, req.uri().query()),
        (&Method::GET, ["login"]) => html(StatusCode::OK, login_page(None)),
        (&Method::POST, ["login"]) => login(req, state, false).await,
        (&Method::POST, ["api", "login"]) => login(req, state, true).await,
        (&Method::GET | &Method::POST, ["logout"]) => logout(state),
        _ => {
            let Some(user) = user else {
                let page = method == Method::GET
                    && (segments == [""] || segments.first() == Some(&"files"));
                let json_wanted = wants_json(req.headers());
                // Read what the client is sending before refusing, so it sees the refusal
                // rather than a reset stream.
                drain(&mut req.into_body(), MAX_DRAIN_BYTES).await;
                if page && !json_wanted {
                    return redirect("/login");
                }
                let mut r = error(StatusCode::UNAUTHORIZED, "login required");
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"files\""),
                );
                return r;
            };
            authed(req, state, user, &method, &segments).await
        }
    }
}

async fn authed(
    req: Request<Incoming>,
    state: &Arc<State>,
    user: &DemoUser,
    method: &Method,
    segments: &[&str],
) -> Response<Body> {
    match (method, segments) {
        (&Method::GET, [""]) => redirect("/files"),
        (&Method::GET, ["files"]) => html(StatusCode::OK, files_page(state, user)),
        (&Method::GET, ["api", "files"]) => {
            let files: Vec<_> = lock(&state.files)
                .values()
                .map(|s| s.info.to_json())
                .collect();
            json(StatusCode::OK, &serde_json::json!({ "files": files }))
        }
        (&Method::GET, ["api", "me"]) => json(StatusCode::OK, &user.to_json()),
        (&Method::POST, ["upload"]) => upload_multipart(req, state, user).await,
        (&Method::PUT, ["api", "files", name]) => {
            let Some(name) = percent_decode(name, false).and_then(|n| valid_name(&n)) else {
                return error(StatusCode::BAD_REQUEST, "bad file name");
            };
            upload_put(req, state, user, &name).await
        }
        (&Method::GET, ["files", id, "download"]) => {
            let range = req
                .headers()
                .get(header::RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(single_range);
            download(state, id, range)
        }
        (&Method::POST, ["files", id, "share"]) => share(req, state, id).await,
        (&Method::DELETE, ["api", "files", id]) => delete(state, user, id),
        _ => error(StatusCode::NOT_FOUND, "no such route"),
    }
}

fn log_json(state: &State, query: Option<&str>) -> Response<Body> {
    let since: u64 = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("since="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let log = lock(&state.log);
    let requests: Vec<_> = log
        .requests
        .iter()
        .filter(|r| r.seq > since)
        .map(RequestRecord::to_json)
        .collect();
    let uploads: Vec<_> = log
        .uploads
        .iter()
        .filter(|r| r.seq > since)
        .map(UploadRecord::to_json)
        .collect();
    json(
        StatusCode::OK,
        &serde_json::json!({ "requests": requests, "uploads": uploads }),
    )
}

/// Reads and discards up to `max` bytes of a body.
async fn drain(body: &mut Incoming, max: u64) {
    let mut seen = 0u64;
    while seen <= max {
        match body.frame().await {
            Some(Ok(f)) => seen += f.data_ref().map_or(0, |d| d.len() as u64),
            _ => return,
        }
    }
}

/// Reads a small body whole; `None` when it is larger than `max` or the stream fails.
async fn small_body(mut body: Incoming, max: usize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.ok()?;
        if let Some(d) = frame.data_ref() {
            if out.len() + d.len() > max {
                drain(&mut body, MAX_DRAIN_BYTES).await;
                return None;
            }
            out.extend_from_slice(d);
        }
    }
    Some(out)
}

/// Fields of an urlencoded or JSON (object of strings) body.
fn form_fields(headers: &HeaderMap, body: &[u8]) -> Option<BTreeMap<String, String>> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        return Some(
            v.as_object()?
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect(),
        );
    }
    let text = std::str::from_utf8(body).ok()?;
    let mut out = BTreeMap::new();
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(percent_decode(k, true)?, percent_decode(v, true)?);
    }
    Some(out)
}

async fn login(req: Request<Incoming>, state: &Arc<State>, api: bool) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let Some(body) = small_body(body, MAX_FORM_BYTES).await else {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "login form too large");
    };
    let fields = form_fields(&parts.headers, &body).unwrap_or_default();
    let user = fields
        .get("user")
        .and_then(|u| state.user(u))
        .filter(|_| fields.get("password") == Some(&state.password));
    let Some(user) = user else {
        return if api {
            error(StatusCode::UNAUTHORIZED, "wrong user or password")
        } else {
            html(
                StatusCode::UNAUTHORIZED,
                login_page(Some("Wrong user or password.")),
            )
        };
    };
    let token = match state.sign_token(user) {
        Ok(t) => t,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    let mut r = if api {
        json(
            StatusCode::OK,
            &serde_json::json!({
                "token": token, "token_type": "Bearer",
                "expires_in": state.ttl.as_secs(), "email": user.email,
            }),
        )
    } else {
        let secure = if state.secure_cookie { "; Secure" } else { "" };
        let cookie = format!(
            "{COOKIE}={token}; Path=/; Max-Age={}; HttpOnly{secure}; SameSite=Lax",
            state.ttl.as_secs()
        );
        let mut r = redirect("/files");
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
        r
    };
    r.extensions_mut().insert(LoggedIn(user.email.clone()));
    r
}

/// Marks a response that signed a user in, so the request log names them.
#[derive(Debug, Clone)]
struct LoggedIn(String);

fn logout(state: &State) -> Response<Body> {
    let secure = if state.secure_cookie { "; Secure" } else { "" };
    let mut r = redirect("/login");
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{COOKIE}=; Path=/; Max-Age=0; HttpOnly{secure}; SameSite=Lax"
    )) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

fn uploaded(info: &FileInfo, headers: &HeaderMap, browser_ok: bool) -> Response<Body> {
    if browser_ok && !wants_json(headers) {
        return redirect("/files");
    }
    json(StatusCode::CREATED, &info.to_json())
}

async fn upload_put(
    req: Request<Incoming>,
    state: &Arc<State>,
    user: &DemoUser,
    name: &str,
) -> Response<Body> {
    let (parts, mut body) = req.into_parts();
    let mut sink = Sink::new(state.clone());
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    sink.write(d);
                }
            }
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("body: {e}")),
        }
    }
    let info = state.store(sink, name, &user.email, UploadVia::Put);
    uploaded(&info, &parts.headers, false)
}

async fn upload_multipart(
    req: Request<Incoming>,
    state: &Arc<State>,
    user: &DemoUser,
) -> Response<Body> {
    let (parts, mut body) = req.into_parts();
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    match receive_multipart(content_type, &mut body, state).await {
        Ok((name, sink)) => {
            let info = state.store(sink, &name, &user.email, UploadVia::Multipart);
            uploaded(&info, &parts.headers, true)
        }
        Err((status, msg)) => {
            // Read the rest, so the client sees the refusal rather than a reset stream.
            drain(&mut body, MAX_DRAIN_BYTES).await;
            error(status, &msg)
        }
    }
}

/// The `file` part of a multipart body: (file name, its bytes).
async fn receive_multipart(
    content_type: &str,
    body: &mut Incoming,
    state: &Arc<State>,
) -> Result<(String, Sink), (StatusCode, String)> {
    const MAX_FIELDS_BYTES: u64 = 64 * 1024;
    const MAX_PARTS: usize = 100;
    let bad = |msg: &str| (StatusCode::BAD_REQUEST, msg.to_owned());
    let mut mp = Multipart::new(content_type).map_err(|e| bad(&e.to_string()))?;
    let mut current: Option<(String, Sink)> = None;
    let mut done: Option<(String, Sink)> = None;
    let mut field_bytes = 0u64;
    let mut part_count = 0usize;
    while !mp.is_done() {
        let Some(frame) = body.frame().await else {
            return Err(bad(&multipart::Error::Truncated.to_string()));
        };
        let frame = frame.map_err(|e| bad(&format!("body: {e}")))?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        mp.push(data);
        while let Some(event) = mp.next_event().map_err(|e| bad(&e.to_string()))? {
            match event {
                Event::Part(h) => {
                    part_count += 1;
                    if part_count > MAX_PARTS {
                        return Err(bad("too many parts"));
                    }
                    if h.name.as_deref() == Some("file") && done.is_none() {
                        let name = h
                            .filename
                            .as_deref()
                            .and_then(valid_name)
                            .ok_or_else(|| bad("bad or missing file name"))?;
                        current = Some((name, Sink::new(state.clone())));
                    }
                }
                Event::Data(d) => match &mut current {
                    Some((_, sink)) => sink.write(&d),
                    None => {
                        field_bytes += d.len() as u64;
                        if field_bytes > MAX_FIELDS_BYTES {
                            return Err((
                                StatusCode::PAYLOAD_TOO_LARGE,
                                "form fields too large".to_owned(),
                            ));
                        }
                    }
                },
                Event::PartEnd => {
                    if let Some(c) = current.take() {
                        done = Some(c);
                    }
                }
                Event::End => break,
            }
        }
    }
    done.ok_or_else(|| bad("no `file` field in the form"))
}

/// `bytes=A-B` or `bytes=A-` (one range; anything else is ignored, as RFC 9110 allows).
fn single_range(v: &str) -> Option<(u64, Option<u64>)> {
    let (a, b) = v.trim().strip_prefix("bytes=")?.split_once('-')?;
    let start = a.trim().parse().ok()?;
    let end = if b.trim().is_empty() {
        None
    } else {
        Some(b.trim().parse().ok()?)
    };
    Some((start, end))
}

/// The file's bytes, or the asked range of them (206) like ordinary file servers do.
fn download(state: &State, id: &str, range: Option<(u64, Option<u64>)>) -> Response<Body> {
    let Some(id) = id.parse::<u64>().ok() else {
        return error(StatusCode::NOT_FOUND, "no such file");
    };
    let files = lock(&state.files);
    let Some(stored) = files.get(&id) else {
        return error(StatusCode::NOT_FOUND, "no such file");
    };
    let Some(data) = stored.data.clone() else {
        return error(
            StatusCode::GONE,
            "the file was larger than the demo store keeps",
        );
    };
    let info = stored.info.clone();
    drop(files);
    let total = data.len() as u64;
    let mut r = match range.filter(|(a, b)| *a < total && b.is_none_or(|b| b >= *a)) {
        Some((a, b)) => {
            let end = b.map_or(total - 1, |b| b.min(total - 1));
            let slice = data.slice(a as usize..=end as usize);
            let mut r = Response::new(full(slice));
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {a}-{end}/{total}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            r
        }
        None => Response::new(full(data)),
    };
    let h = r.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&info.content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(&content_disposition(&info.name)) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn share(req: Request<Incoming>, state: &Arc<State>, id: &str) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let Some(body) = small_body(body, MAX_FORM_BYTES).await else {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "share form too large");
    };
    let fields = form_fields(&parts.headers, &body).unwrap_or_default();
    let with = fields
        .get("with")
        .map(|w| w.trim().to_owned())
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "link".to_owned());
    let Some(num) = id.parse::<u64>().ok() else {
        return error(StatusCode::NOT_FOUND, "no such file");
    };
    let mut files = lock(&state.files);
    let Some(stored) = files.get_mut(&num) else {
        return error(StatusCode::NOT_FOUND, "no such file");
    };
    if !stored.info.shared_with.contains(&with) {
        stored.info.shared_with.push(with.clone());
    }
    let info = stored.info.clone();
    drop(files);
    if !wants_json(&parts.headers) && fields.contains_key("from_page") {
        return redirect("/files");
    }
    json(
        StatusCode::OK,
        &serde_json::json!({
            "id": info.id, "shared_with": info.shared_with,
            "link": format!("{ISSUER}/files/{}/download", info.id),
        }),
    )
}

fn delete(state: &State, user: &DemoUser, id: &str) -> Response<Body> {
    let Some(num) = id.parse::<u64>().ok() else {
        return error(StatusCode::NOT_FOUND, "no such file");
    };
    let mut files = lock(&state.files);
    let Some(stored) = files.get(&num) else {
        return error(StatusCode::NOT_FOUND, "no such file");
    };
    if stored.info.owner != user.email {
        return error(StatusCode::FORBIDDEN, "only the owner may delete a file");
    }
    if let Some(gone) = files.remove(&num)
        && let Some(data) = gone.data
    {
        state.release(data.len() as u64);
    }
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

// ---------------------------------------------------------------------------------------------
// pages

fn escape_html(s: &str) -> String {
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

const STYLE: &str = "<style>body{font-family:sans-serif;max-width:48em;margin:2em auto}\
table{border-collapse:collapse;width:100%}td,th{padding:.3em;border-bottom:1px solid #ddd;\
text-align:left}form.inline{display:inline}</style>";

fn login_page(message: Option<&str>) -> String {
    let msg = message
        .map(|m| format!("<p role=\"alert\"><strong>{}</strong></p>", escape_html(m)))
        .unwrap_or_default();
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Demo files: sign in</title>\
         {STYLE}</head><body><h1>Demo files</h1>{msg}\
         <form method=\"post\" action=\"/login\">\
         <p><label>User <input name=\"user\" autocomplete=\"username\" required></label></p>\
         <p><label>Password <input type=\"password\" name=\"password\" \
         autocomplete=\"current-password\" required></label></p>\
         <p><button type=\"submit\">Sign in</button></p></form></body></html>"
    )
}

fn files_page(state: &State, user: &DemoUser) -> String {
    let mut rows = String::new();
    for s in lock(&state.files).values() {
        let f = &s.info;
        let _ = write!(
            rows,
            "<tr><td><a href=\"/files/{id}/download\">{name}</a></td><td>{size}</td>\
             <td>{owner}</td><td><form class=\"inline\" method=\"post\" \
             action=\"/files/{id}/share\"><input type=\"hidden\" name=\"from_page\" value=\"1\">\
             <input name=\"with\" placeholder=\"e-mail\"><button>Share</button></form></td></tr>",
            id = f.id,
            name = escape_html(&f.name),
            size = f.size,
            owner = escape_html(&f.owner),
        );
    }
    if rows.is_empty() {
        rows.push_str("<tr><td colspan=\"4\">No files yet.</td></tr>");
    }
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Demo files</title>{STYLE}\
         </head><body><h1>Demo files</h1><p>Signed in as {who}{guest}. \
         <a href=\"/logout\">Sign out</a></p>\
         <table><thead><tr><th>Name</th><th>Bytes</th><th>Owner</th><th></th></tr></thead>\
         <tbody>{rows}</tbody></table><h2>Upload</h2>\
         <form method=post action=/upload enctype=multipart/form-data>\
         <input type=\"file\" name=\"file\" required> <button type=\"submit\">Upload</button>\
         </form></body></html>",
        who = escape_html(&user.email),
        guest = if user.guest { " (guest)" } else { "" },
    )
}

// ---------------------------------------------------------------------------------------------
// small helpers

/// Decodes `%XX` escapes (and `+` as a space in form values); `None` on a bad escape or
/// invalid UTF-8.
pub fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let escapes_ok = s.split('%').skip(1).all(|rest| {
        rest.as_bytes()
            .get(..2)
            .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if !escapes_ok {
        return None;
    }
    let text = if plus_is_space {
        s.replace('+', " ")
    } else {
        s.to_owned()
    };
    percent_encoding::percent_decode_str(&text)
        .decode_utf8()
        .ok()
        .map(std::borrow::Cow::into_owned)
}

/// The file name to store: the last path component (browsers of old sent whole paths), not
/// empty, not `.`/`..`, at most 255 bytes, no control characters.
fn valid_name(raw: &str) -> Option<String> {
    let name = raw.rsplit(['/', '\\']).next()?.trim();
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.len() > MAX_NAME_BYTES
        || name.chars().any(char::is_control)
    {
        return None;
    }
    Some(name.to_owned())
}

/// `attachment; filename="<ascii fallback>"; filename*=UTF-8''<percent-encoded>` (RFC 6266).
fn content_disposition(name: &str) -> String {
    let fallback: String = name
        .chars()
        .map(|c| {
            if c.is_ascii() && !c.is_ascii_control() && c != '"' && c != '\\' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut encoded = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            encoded.push(b as char);
        } else {
            let _ = write!(encoded, "%{b:02X}");
        }
    }
    format!("attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}")
}

/// The content type served for a file name's extension.
pub fn content_type_for(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "docx" => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "xlsx" => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "pptx" => "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        "pdf" => "application/pdf",
        "txt" => "text/plain; charset=utf-8",
        "csv" => "text/csv; charset=utf-8",
        "json" => "application/json",
        "html" | "htm" => "text/html; charset=utf-8",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "zip" => "application/zip",
        _ => "application/octet-stream",
    }
}

// ---------------------------------------------------------------------------------------------

/// A small streaming `multipart/form-data` parser (RFC 7578 / RFC 2046), bounded: part headers
/// at most 16 KiB, bodies passed on as they arrive, so an upload of any size needs only a few
/// KiB of buffer. Kept in the test crate so the demo app does not depend on the agent's own
/// parser, which it is used to test.
pub mod multipart {
    /// Why a body is not acceptable multipart.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Error {
        /// The content type is not `multipart/form-data` with a usable boundary.
        ContentType(&'static str),
        /// A part's header block exceeds the bound.
        HeadersTooLarge,
        /// A part's header block is malformed.
        BadHeaders(&'static str),
        /// Bytes after a boundary other than `--` or CRLF.
        BadDelimiter,
        /// The body ended before the closing boundary.
        Truncated,
    }

    impl std::fmt::Display for Error {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Self::ContentType(why) => write!(f, "multipart content type: {why}"),
                Self::HeadersTooLarge => f.write_str("multipart part headers too large"),
                Self::BadHeaders(why) => write!(f, "multipart part headers: {why}"),
                Self::BadDelimiter => f.write_str("multipart: garbage after a boundary"),
                Self::Truncated => f.write_str("multipart body ends before its closing boundary"),
            }
        }
    }

    impl std::error::Error for Error {}

    /// A part's headers, as far as the app needs them.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct PartHeaders {
        /// `Content-Disposition` `name`.
        pub name: Option<String>,
        /// `Content-Disposition` `filename*` (UTF-8) or `filename`.
        pub filename: Option<String>,
        /// The part's `Content-Type`.
        pub content_type: Option<String>,
    }

    /// What the parser found next.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Event {
        /// A part begins.
        Part(PartHeaders),
        /// Bytes of the current part's body.
        Data(Vec<u8>),
        /// The current part ended.
        PartEnd,
        /// The closing boundary was seen; anything after it is ignored.
        End,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum St {
        Preamble,
        AfterDelimiter,
        Headers,
        Body,
        Done,
    }

    /// Bound on one part's header block.
    pub const MAX_HEADER_BYTES: usize = 16 * 1024;

    /// The parser: [`Multipart::push`] bytes as they arrive, then take [`Multipart::next_event`]
    /// until it gives `None` (more bytes needed).
    #[derive(Debug)]
    pub struct Multipart {
        delimiter: Vec<u8>,
        buf: Vec<u8>,
        st: St,
    }

    impl Multipart {
        /// For a request's `Content-Type` value.
        pub fn new(content_type: &str) -> Result<Self, Error> {
            let mut params = content_type.split(';');
            let essence = params.next().unwrap_or_default().trim();
            if !essence.eq_ignore_ascii_case("multipart/form-data") {
                return Err(Error::ContentType("not multipart/form-data"));
            }
            let boundary = params
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
                .map(|(_, v)| v.trim().trim_matches('"').to_owned())
                .ok_or(Error::ContentType("no boundary"))?;
            if boundary.is_empty() || boundary.len() > 70 {
                return Err(Error::ContentType("boundary must be 1 to 70 characters"));
            }
            let mut delimiter = b"\r\n--".to_vec();
            delimiter.extend_from_slice(boundary.as_bytes());
            // The first boundary has no CRLF before it: pretend it had one.
            Ok(Self {
                delimiter,
                buf: b"\r\n".to_vec(),
                st: St::Preamble,
            })
        }

        /// Adds bytes of the body.
        pub fn push(&mut self, data: &[u8]) {
            self.buf.extend_from_slice(data);
        }

        /// Whether the closing boundary was seen.
        pub fn is_done(&self) -> bool {
            self.st == St::Done
        }

        fn find_delimiter(&self) -> Option<usize> {
            let d = &self.delimiter;
            let mut from = 0;
            while let Some(off) = self.buf[from..].iter().position(|&b| b == b'\r') {
                let at = from + off;
                if self.buf.len() - at < d.len() {
                    return None;
                }
                if self.buf[at..at + d.len()] == d[..] {
                    return Some(at);
                }
                from = at + 1;
            }
            None
        }

        /// The next event, `Ok(None)` when more bytes are needed.
        pub fn next_event(&mut self) -> Result<Option<Event>, Error> {
            loop {
                match self.st {
                    St::Done => {
                        self.buf.clear();
                        return Ok(None);
                    }
                    St::Preamble => match self.find_delimiter() {
                        Some(at) => {
                            self.buf.drain(..at + self.delimiter.len());
                            self.st = St::AfterDelimiter;
                        }
                        None => {
                            // Keep only what could still start a delimiter.
                            let keep = self.delimiter.len() - 1;
                            if self.buf.len() > keep {
                                self.buf.drain(..self.buf.len() - keep);
                            }
                            return Ok(None);
                        }
                    },
                    St::AfterDelimiter => {
                        // Transport padding (spaces, tabs) may follow a boundary.
                        let pad = self
                            .buf
                            .iter()
                            .take_while(|&&b| b == b' ' || b == b'\t')
                            .count();
                        if pad > 256 {
                            return Err(Error::BadDelimiter);
                        }
                        if self.buf.starts_with(b"--") {
                            self.st = St::Done;
                            return Ok(Some(Event::End));
                        }
                        let rest = &self.buf[pad..];
                        if rest.len() < 2 {
                            return Ok(None);
                        }
                        if &rest[..2] != b"\r\n" {
                            return Err(Error::BadDelimiter);
                        }
                        self.buf.drain(..pad + 2);
                        self.st = St::Headers;
                    }
                    St::Headers => {
                        let end = if self.buf.starts_with(b"\r\n") {
                            Some((0, 2))
                        } else {
                            self.buf
                                .windows(4)
                                .position(|w| w == b"\r\n\r\n")
                                .map(|at| (at, at + 4))
                        };
                        let Some((at, next)) = end else {
                            if self.buf.len() > MAX_HEADER_BYTES {
                                return Err(Error::HeadersTooLarge);
                            }
                            return Ok(None);
                        };
                        if at > MAX_HEADER_BYTES {
                            return Err(Error::HeadersTooLarge);
                        }
                        let headers = parse_headers(&self.buf[..at])?;
                        self.buf.drain(..next);
                        self.st = St::Body;
                        return Ok(Some(Event::Part(headers)));
                    }
                    St::Body => match self.find_delimiter() {
                        Some(0) => {
                            self.buf.drain(..self.delimiter.len());
                            self.st = St::AfterDelimiter;
                            return Ok(Some(Event::PartEnd));
                        }
                        Some(at) => {
                            let data: Vec<u8> = self.buf.drain(..at).collect();
                            return Ok(Some(Event::Data(data)));
                        }
                        None => {
                            let keep = self.delimiter.len() - 1;
                            if self.buf.len() <= keep {
                                return Ok(None);
                            }
                            // Bytes that cannot be the start of a delimiter are body for sure.
                            let safe = self.buf.len() - keep;
                            let safe = self.buf[safe..]
                                .iter()
                                .position(|&b| b == b'\r')
                                .map_or(self.buf.len(), |p| safe + p);
                            let data: Vec<u8> = self.buf.drain(..safe).collect();
                            return Ok(Some(Event::Data(data)));
                        }
                    },
                }
            }
        }

        /// At the end of the body: an error unless the closing boundary was seen.
        pub fn finish(&self) -> Result<(), Error> {
            if self.st == St::Done {
                Ok(())
            } else {
                Err(Error::Truncated)
            }
        }
    }

    fn parse_headers(block: &[u8]) -> Result<PartHeaders, Error> {
        let text = std::str::from_utf8(block).map_err(|_| Error::BadHeaders("not UTF-8"))?;
        let mut out = PartHeaders::default();
        for line in text.split("\r\n") {
            let (name, value) = line
                .split_once(':')
                .ok_or(Error::BadHeaders("a line without a colon"))?;
            let value = value.trim();
            if name.trim().eq_ignore_ascii_case("content-disposition") {
                let (kind, params) = value.split_once(';').unwrap_or((value, ""));
                if !kind.trim().eq_ignore_ascii_case("form-data") {
                    return Err(Error::BadHeaders("disposition is not form-data"));
                }
                let mut plain_filename = None;
                let mut ext_filename = None;
                for (k, v) in params_of(params)? {
                    match k.to_ascii_lowercase().as_str() {
                        "name" => out.name = Some(v),
                        "filename" => plain_filename = Some(v),
                        "filename*" => {
                            ext_filename = v
                                .split_once("''")
                                .filter(|(cs, _)| cs.eq_ignore_ascii_case("utf-8"))
                                .and_then(|(_, enc)| super::percent_decode(enc, false));
                        }
                        _ => {}
                    }
                }
                out.filename = ext_filename.or(plain_filename);
            } else if name.trim().eq_ignore_ascii_case("content-type") {
                out.content_type = Some(value.to_owned());
            }
        }
        Ok(out)
    }

    /// `; k=v; k="quoted \"v\""` parameters.
    fn params_of(s: &str) -> Result<Vec<(String, String)>, Error> {
        let mut out = Vec::new();
        let mut chars = s.chars().peekable();
        loop {
            while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ';') {
                chars.next();
            }
            if chars.peek().is_none() {
                return Ok(out);
            }
            let mut key = String::new();
            while let Some(&c) = chars.peek() {
                if c == '=' || c == ';' {
                    break;
                }
                key.push(c);
                chars.next();
            }
            let mut value = String::new();
            if chars.peek() == Some(&'=') {
                chars.next();
                if chars.peek() == Some(&'"') {
                    chars.next();
                    let mut closed = false;
                    while let Some(c) = chars.next() {
                        match c {
                            '\\' => {
                                if let Some(n) = chars.next() {
                                    value.push(n);
                                }
                            }
                            '"' => {
                                closed = true;
                                break;
                            }
                            c => value.push(c),
                        }
                    }
                    if !closed {
                        return Err(Error::BadHeaders("unterminated quoted parameter"));
                    }
                } else {
                    while let Some(&c) = chars.peek() {
                        if c == ';' {
                            break;
                        }
                        value.push(c);
                        chars.next();
                    }
                    value = value.trim().to_owned();
                }
            }
            out.push((key.trim().to_owned(), value));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::multipart::{Error, Event, Multipart, PartHeaders};
    use super::*;

    const CT: &str = "multipart/form-data; boundary=XyZ";

    fn body() -> Vec<u8> {
        let mut b = b"preamble\r\n--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhi\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a \\\"b\\\".docx\"\r\nContent-Type: application/octet-stream\r\n\r\n".to_vec();
        // Body bytes that look like the start of a delimiter but are not one.
        b.extend_from_slice(b"\r\n--Xy\r\r\n--XyQ");
        b.extend((0..3000u32).map(|i| (i % 251) as u8));
        b.extend_from_slice(b"\r\n--XyZ--\r\nepilogue");
        b
    }

    fn expected_file() -> Vec<u8> {
        let mut v = b"\r\n--Xy\r\r\n--XyQ".to_vec();
        v.extend((0..3000u32).map(|i| (i % 251) as u8));
        v
    }

    /// Feeds `data` in chunks of `n`, collecting (headers, body) per part.
    fn parse(data: &[u8], n: usize) -> Result<Vec<(PartHeaders, Vec<u8>)>, Error> {
        let mut mp = Multipart::new(CT)?;
        let mut parts: Vec<(PartHeaders, Vec<u8>)> = Vec::new();
        for chunk in data.chunks(n) {
            mp.push(chunk);
            while let Some(e) = mp.next_event()? {
                match e {
                    Event::Part(h) => parts.push((h, Vec::new())),
                    Event::Data(d) => parts.last_mut().unwrap().1.extend_from_slice(&d),
                    Event::PartEnd | Event::End => {}
                }
            }
        }
        mp.finish()?;
        Ok(parts)
    }

    #[test]
    fn multipart_parses_the_same_at_every_chunking() {
        let data = body();
        for n in [1, 2, 3, 5, 7, 8, 13, 64, 1000, data.len()] {
            let parts = parse(&data, n).unwrap();
            assert_eq!(parts.len(), 2, "chunk {n}");
            assert_eq!(parts[0].0.name.as_deref(), Some("note"));
            assert_eq!(parts[0].1, b"hi");
            assert_eq!(parts[1].0.name.as_deref(), Some("file"));
            assert_eq!(parts[1].0.filename.as_deref(), Some("a \"b\".docx"));
            assert_eq!(
                parts[1].0.content_type.as_deref(),
                Some("application/octet-stream")
            );
            assert_eq!(parts[1].1, expected_file(), "chunk {n}");
        }
    }

    #[test]
    fn multipart_refuses_bad_input() {
        assert!(matches!(
            Multipart::new("text/plain"),
            Err(Error::ContentType(_))
        ));
        assert!(matches!(
            Multipart::new("multipart/form-data"),
            Err(Error::ContentType(_))
        ));
        let data = body();
        // Truncated anywhere before the closing boundary.
        for cut in [0, 10, 40, 120, data.len() - 14] {
            assert_eq!(
                parse(&data[..cut], 7).unwrap_err(),
                Error::Truncated,
                "{cut}"
            );
        }
        // Endless headers are refused once past the bound, not buffered.
        let mut mp = Multipart::new(CT).unwrap();
        mp.push(b"--XyZ\r\n");
        let line = vec![b'a'; 1024];
        let mut err = None;
        for _ in 0..64 {
            mp.push(&line);
            if let Err(e) = mp.next_event() {
                err = Some(e);
                break;
            }
        }
        assert_eq!(err, Some(Error::HeadersTooLarge));
        assert_eq!(
            parse(b"--XyZ\r\nno colon here\r\n\r\nx\r\n--XyZ--", 4).unwrap_err(),
            Error::BadHeaders("a line without a colon")
        );
        assert_eq!(
            parse(b"--XyZgarbage\r\n", 4).unwrap_err(),
            Error::BadDelimiter
        );
    }

    #[test]
    fn multipart_takes_rfc5987_file_names() {
        let data = b"--XyZ\r\nContent-Disposition: form-data; name=file; filename=\"fallback.txt\"; filename*=UTF-8''r%C3%A9sum%C3%A9.txt\r\n\r\nx\r\n--XyZ--";
        let parts = parse(data, 3).unwrap();
        assert_eq!(parts[0].0.filename.as_deref(), Some("résumé.txt"));
    }

    #[test]
    fn names_dispositions_and_types() {
        assert_eq!(
            valid_name("C:\\Users\\a\\report.docx").as_deref(),
            Some("report.docx")
        );
        assert_eq!(valid_name("../x.pdf").as_deref(), Some("x.pdf"));
        assert_eq!(valid_name(".."), None);
        assert_eq!(valid_name("a\u{7}b"), None);
        assert_eq!(valid_name(&"x".repeat(300)), None);
        assert_eq!(
            content_disposition("ré \"q\".pdf"),
            "attachment; filename=\"r_ _q_.pdf\"; filename*=UTF-8''r%C3%A9%20%22q%22.pdf"
        );
        assert_eq!(content_type_for("A.DOCX"), content_type_for("a.docx"));
        assert_eq!(content_type_for("noext"), "application/octet-stream");
        assert_eq!(percent_decode("a%20b+c", true).as_deref(), Some("a b c"));
        assert_eq!(percent_decode("%zz", true), None);
        assert_eq!(percent_decode("%ff", true), None);
    }

    #[test]
    fn directory_users_and_guests() {
        let users = DemoUser::defaults().unwrap();
        let alice = users.iter().find(|u| u.id == "alice").unwrap();
        assert_eq!(alice.email, "alice@corp.example");
        assert!(!alice.guest);
        let carol = users.iter().find(|u| u.id == "carol").unwrap();
        assert!(carol.guest, "carol is in the contractors guest group");
    }

    #[test]
    fn pki_round_trips_through_a_directory() {
        let dir = crate::TempDir::new("demo-pki-test");
        let a = DemoPki::load_or_create(&dir).unwrap();
        let b = DemoPki::load_or_create(&dir).unwrap();
        assert_eq!(a.ca_pem, b.ca_pem);
        assert_eq!(a.chain_pem, b.chain_pem);
        b.server_config().unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join(DemoPki::KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the key is private");
    }

    #[test]
    fn tokens_verify_and_forgeries_do_not() {
        let opts = DemoOptions::plain().unwrap();
        let state = State::new(&opts).unwrap();
        let alice = state.user("alice").unwrap().clone();
        let t = state.sign_token(&alice).unwrap();
        assert_eq!(state.verify_token(&t).map(|u| u.id.as_str()), Some("alice"));
        // Another key's signature over the same claims is refused.
        let (other, _, _) = sluice_policy::bundle::jws::SigningKey::generate().unwrap();
        let payload = t.split('.').nth(1).unwrap();
        let forged = other.sign(&b64url_decode(payload).unwrap(), KID).unwrap();
        assert!(state.verify_token(&forged).is_none());
        // A changed payload breaks the signature.
        let mut parts: Vec<&str> = t.split('.').collect();
        let bob_claims = b64url(
            String::from_utf8(b64url_decode(parts[1]).unwrap())
                .unwrap()
                .replace("alice@corp.example", "bob@corp.example")
                .as_bytes(),
        );
        parts[1] = &bob_claims;
        assert!(state.verify_token(&parts.join(".")).is_none());
    }

    #[test]
    fn store_reservations_balance() {
        let mut opts = DemoOptions::plain().unwrap();
        opts.store_limit = 10;
        let state = Arc::new(State::new(&opts).unwrap());
        let mut s = Sink::new(state.clone());
        s.write(b"12345678");
        assert_eq!(state.used.load(Ordering::Relaxed), 8);
        s.write(b"abc");
        assert_eq!(
            state.used.load(Ordering::Relaxed),
            0,
            "dropped past the limit"
        );
        let (size, _, data) = s.finish();
        assert_eq!((size, data), (11, None));
        let mut s = Sink::new(state.clone());
        s.write(b"1234");
        drop(s);
        assert_eq!(
            state.used.load(Ordering::Relaxed),
            0,
            "an abandoned upload frees its room"
        );
    }
}
