//! Bundle distribution: fetch, verify, persist, activate.
//!
//! The agent asks its bundle URL with `If-None-Match` (the active bundle's ETag) and
//! `Prefer: wait=N`; a server that supports long polling holds the request until a new bundle
//! exists (or N seconds pass) and answers 304 otherwise. A server that answers at once is polled
//! periodically with jitter instead. A bundle is verified (signature, exact file list) before
//! anything in it is parsed, refused if its revision is older than the active one (unless allowed),
//! compiled, written to disk as the last good bundle (atomically: temporary file, fsync, rename),
//! and swapped in whole. When the server is down the agent starts from, and keeps, the last good
//! bundle; every failure is kept as the last error in the status.
//!
//! Freshness and keys: a fetched bundle whose signed expiry has passed is refused (a replay of
//! an old bundle); the one in force keeps being enforced past its expiry, reported `stale` in
//! `/status` and in the agent's status events (the portal's device list shows it). Bundles are
//! verified with the configured key and the keys rotations taught ([`sluice_policy::bundle::Trust`],
//! kept in `bundle/trust.json`); a rotation is learnt from a bundle that was verified, compiled
//! and put in force, and its proof is kept in `bundle/rotations.json` for the privileged part,
//! which keeps its own trust beside the CA and learns only what verifies.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use sluice_policy::{
    PolicySet,
    bundle::{
        Archive, BundleError, KeyRing, Limits, RotationProof, Trust, Verified, jws::VerifyingKey,
    },
};

use crate::client::{Client, ClientError};
pub use crate::config::BundleSettings;

/// What `/status` shows about bundles.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BundleStatus {
    /// The active revision.
    pub revision: Option<String>,
    /// Where it came from (`url`, `file`, `last-good`).
    pub source: Option<String>,
    /// When it was activated (Unix seconds).
    pub activated_at: Option<u64>,
    /// When its source last said it is current (Unix seconds): its activation from the bundle
    /// server or a file, and every 304 since. A last-known-good bundle read at start is not
    /// confirmed until the server answers. Posture's `bundle_fresh` check measures from it.
    pub confirmed_at: Option<u64>,
    /// Number of enabled policies.
    pub policies: usize,
    /// The last error, if the last attempt failed.
    pub last_error: Option<String>,
    /// Successful fetches that changed nothing (304).
    pub not_modified: u64,
    /// Bundles refused (bad signature, file list, revision, policies).
    pub refused: u64,
    /// Requests sent to the bundle URL (long polls included).
    pub polls: u64,
    /// When the active bundle stops being fresh (Unix seconds, signed in its manifest).
    pub expires_at: Option<u64>,
    /// Whether that time has passed: the bundle is still enforced, but stale.
    pub stale: bool,
    /// The key ids bundles are verified with now.
    pub trusted_keys: Vec<String>,
}

impl BundleStatus {
    /// A copy with `stale` as of now.
    pub fn now(m: &Mutex<BundleStatus>) -> BundleStatus {
        let mut s = m.lock().unwrap_or_else(|p| p.into_inner()).clone();
        s.stale = s.expires_at.is_some_and(|e| e <= now_s());
        s
    }
}

/// Where an agent keeps what rotations taught it.
const TRUST_FILE: &str = "trust.json";
/// Where it keeps the proofs of those rotations.
const PROOFS_FILE: &str = "rotations.json";
/// Most rotation proofs kept.
const MAX_PROOFS: usize = 64;

fn read_json<T: serde::de::DeserializeOwned + Default>(path: &Path) -> T {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn write_json_private(path: &Path, value: &impl Serialize) -> Result<(), BundleError> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let io = |e: std::io::Error| BundleError::Io(format!("{}: {e}", path.display()));
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| BundleError::Io(e.to_string()))?;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(&bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// The active policy set, shared read-mostly with the proxy.
pub type Active = Arc<ArcSwapOption<PolicySet>>;

/// Called with each newly activated policy set (e.g. to swap the proxy's app catalogue).
pub type OnActivate = Box<dyn Fn(&PolicySet) + Send + Sync>;

/// Fetches and activates bundles.
pub struct Distributor {
    on_activate: Option<OnActivate>,
    settings: BundleSettings,
    key: VerifyingKey,
    trust: Mutex<Trust>,
    state_dir: PathBuf,
    active: Active,
    etag: Mutex<Option<String>>,
    status: Arc<Mutex<BundleStatus>>,
    limits: Limits,
    /// The client of the bundle URL, made on first use.
    client: tokio::sync::Mutex<Option<Client>>,
    /// Which URL is used: 0 `url`, then `fallback_urls`.
    current: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Distributor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Distributor")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Orders revisions as the numbers they are (a verified bundle's revision is a whole number;
/// anything else sorts first).
pub fn revision_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let n = |s: &str| s.trim().parse::<u64>().ok();
    n(a).cmp(&n(b))
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The last good bundle kept under `state_dir` by a distributor, verified with the key at
/// `public_key` and the keys learnt into `trust_file` (the caller's own, where the proxy cannot
/// write), and compiled: how the privileged part learns the catalogue the proxy works with
/// without trusting the proxy's word for it. A bundle signed with a key not trusted yet is
/// retried after learning the proofs the proxy kept (each verified from the trusted keys on);
/// what is learnt is kept in `trust_file`.
pub fn read_last_good(
    state_dir: &Path,
    public_key: &Path,
    trust_file: &Path,
) -> Result<PolicySet, BundleError> {
    let pem = std::fs::read_to_string(public_key)
        .map_err(|e| BundleError::Io(format!("{}: {e}", public_key.display())))?;
    let key = VerifyingKey::from_pem(&pem)?;
    let path = state_dir.join("bundle/last-good.tar.gz");
    let bytes =
        std::fs::read(&path).map_err(|e| BundleError::Io(format!("{}: {e}", path.display())))?;
    let mut trust: Trust = read_json(trust_file);
    let verified: Verified = match Archive::read(&bytes, &Limits::default())?
        .verify_with(&trust.ring(&key))
    {
        Err(BundleError::UnknownKey(..)) => {
            let proofs: Vec<RotationProof> = read_json(&state_dir.join("bundle").join(PROOFS_FILE));
            if trust.catch_up(&key, &proofs) {
                write_json_private(trust_file, &trust)?;
            }
            Archive::read(&bytes, &Limits::default())?.verify_with(&trust.ring(&key))?
        }
        other => other?,
    };
    if let Some(rot) = verified.rotation()?
        && trust.learn(&rot, &key)?
    {
        write_json_private(trust_file, &trust)?;
    }
    PolicySet::compile(&verified.manifest.revision, &verified.files)
        .map_err(|e| BundleError::Manifest(e.to_string()))
}

impl Distributor {
    /// A distributor keeping its last good bundle under `state_dir/bundle`.
    pub fn new(settings: BundleSettings, state_dir: &Path) -> Result<Self, BundleError> {
        let pem = std::fs::read_to_string(&settings.public_key)
            .map_err(|e| BundleError::Io(format!("{}: {e}", settings.public_key.display())))?;
        let key = VerifyingKey::from_pem(&pem)?;
        if settings.url.is_none() && settings.file.is_none() {
            return Err(BundleError::Io("bundle: set `url` or `file`".into()));
        }
        let dir = state_dir.join("bundle");
        let trust: Trust = read_json(&dir.join(TRUST_FILE));
        let status = BundleStatus {
            trusted_keys: trust.ring(&key).ids(),
            ..BundleStatus::default()
        };
        Ok(Self {
            on_activate: None,
            settings,
            key,
            trust: Mutex::new(trust),
            state_dir: dir,
            active: Arc::new(ArcSwapOption::empty()),
            etag: Mutex::new(None),
            client: tokio::sync::Mutex::new(None),
            current: std::sync::atomic::AtomicUsize::new(0),
            status: Arc::new(Mutex::new(status)),
            limits: Limits::default(),
        })
    }

    /// Runs `f` with every policy set activated from now on.
    pub fn on_activate(mut self, f: OnActivate) -> Self {
        self.on_activate = Some(f);
        self
    }

    /// The active policy set handle.
    pub fn active(&self) -> Active {
        self.active.clone()
    }

    /// The status handle.
    pub fn status(&self) -> Arc<Mutex<BundleStatus>> {
        self.status.clone()
    }

    fn set_error(&self, e: &str, refused: bool) {
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        st.last_error = Some(e.to_owned());
        if refused {
            st.refused += 1;
        }
        tracing::warn!(error = %e, "bundle not activated");
    }

    fn ring(&self) -> KeyRing {
        self.trust
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ring(&self.key)
    }

    /// Verifies (with the trusted keys), checks the revision and, unless it is the last good
    /// bundle read again, the expiry; compiles and swaps in a bundle, then learns its rotation.
    /// Returns the revision.
    pub fn activate(
        &self,
        bytes: &[u8],
        source: &str,
        etag: Option<String>,
        persist: bool,
    ) -> Result<String, BundleError> {
        let verified: Verified = Archive::read(bytes, &self.limits)?.verify_with(&self.ring())?;
        // The bundle in force is kept past its expiry (reported stale); a new one must be fresh.
        let verified = if source == "last-good" {
            verified
        } else {
            verified.fresh(now_s())?
        };
        let rotation = verified.rotation()?;
        let proof = verified.rotation_proof();
        let expires_at = verified.manifest.expires_at;
        let revision = verified.manifest.revision.clone();
        if let Some(current) = self.active.load_full()
            && !self.settings.allow_downgrade
            && revision_cmp(&revision, &current.revision) == std::cmp::Ordering::Less
        {
            return Err(BundleError::Manifest(format!(
                "revision {revision} is older than the active {} (set bundle.allow_downgrade to accept it)",
                current.revision
            )));
        }
        let set = PolicySet::compile(&revision, &verified.files)
            .map_err(|e| BundleError::Manifest(e.to_string()))?;
        if persist {
            self.persist(bytes, etag.as_deref())?;
        }
        let policies = set.len();
        if let Some(f) = &self.on_activate {
            f(&set);
        }
        self.active.store(Some(Arc::new(set)));
        *self.etag.lock().unwrap_or_else(|p| p.into_inner()) = etag;
        if let Some(rot) = rotation {
            self.learn(&rot, proof);
        }
        let trusted_keys = self.ring().ids();
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        st.trusted_keys = trusted_keys;
        st.expires_at = expires_at;
        st.stale = expires_at.is_some_and(|e| e <= now_s());
        st.revision = Some(revision.clone());
        st.source = Some(source.to_owned());
        st.activated_at = Some(now_s());
        st.confirmed_at = (source != "last-good").then(now_s);
        st.policies = policies;
        st.last_error = None;
        tracing::info!(%revision, source, policies, "bundle activated");
        Ok(revision)
    }

    /// Learns a rotation of a bundle now in force, and keeps its proof.
    fn learn(&self, rotation: &sluice_policy::bundle::Rotation, proof: Option<RotationProof>) {
        let mut trust = self.trust.lock().unwrap_or_else(|p| p.into_inner());
        match trust.learn(rotation, &self.key) {
            Ok(false) => {}
            Ok(true) => {
                tracing::info!(keys = ?trust.ring(&self.key).ids(), "bundle keys rotated");
                let _ = std::fs::create_dir_all(&self.state_dir);
                if let Err(e) = write_json_private(&self.state_dir.join(TRUST_FILE), &*trust) {
                    tracing::error!(error = %e, "keeping the bundle keys learnt");
                }
                if let Some(p) = proof {
                    let path = self.state_dir.join(PROOFS_FILE);
                    let mut proofs: Vec<RotationProof> = read_json(&path);
                    if !proofs.contains(&p) {
                        proofs.push(p);
                    }
                    let skip = proofs.len().saturating_sub(MAX_PROOFS);
                    if let Err(e) = write_json_private(&path, &proofs[skip..].to_vec()) {
                        tracing::error!(error = %e, "keeping the bundle rotation's proof");
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "a bundle's key rotation was not learnt"),
        }
    }

    fn persist(&self, bytes: &[u8], etag: Option<&str>) -> Result<(), BundleError> {
        use std::io::Write as _;
        let io = |e: std::io::Error| BundleError::Io(format!("{}: {e}", self.state_dir.display()));
        std::fs::create_dir_all(&self.state_dir).map_err(io)?;
        // The bundle holds the directory, groups and policies: readable by the agent alone.
        let private = |path: &Path| {
            use std::os::unix::fs::OpenOptionsExt as _;
            let _ = std::fs::remove_file(path);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
        };
        let tmp = self.state_dir.join("last-good.tar.gz.tmp");
        let mut f = private(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, self.state_dir.join("last-good.tar.gz")).map_err(io)?;
        let tmp = self.state_dir.join("last-good.etag.tmp");
        private(&tmp)
            .and_then(|mut f| f.write_all(etag.unwrap_or("").as_bytes()))
            .map_err(io)?;
        std::fs::rename(&tmp, self.state_dir.join("last-good.etag")).map_err(io)?;
        if let Ok(d) = std::fs::File::open(&self.state_dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Activates the persisted last good bundle, if any (verified again: the disk is not trusted
    /// more than the network).
    pub fn load_last_good(&self) -> Option<String> {
        let bytes = std::fs::read(self.state_dir.join("last-good.tar.gz")).ok()?;
        let etag = std::fs::read_to_string(self.state_dir.join("last-good.etag"))
            .ok()
            .filter(|e| !e.is_empty());
        match self.activate(&bytes, "last-good", etag, false) {
            Ok(r) => Some(r),
            Err(e) => {
                self.set_error(&format!("last good bundle: {e}"), true);
                None
            }
        }
    }

    /// Runs until `shutdown`: loads the last good bundle, then fetches (or loads the file).
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> anyhow::Result<()> {
        // Reading, verifying and compiling a bundle parses a tarball and YAML: off the async
        // workers, like every parser of the agent.
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || me.load_last_good()).await;
        if let Some(file) = self.settings.file.clone() {
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || {
                // A directory is packed as it stands; it must carry its own .signatures.json.
                let read = if file.is_dir() {
                    Archive::from_dir(&file)
                        .and_then(|a| a.write())
                        .map_err(|e| std::io::Error::other(e.to_string()))
                } else {
                    std::fs::read(&file)
                };
                match read {
                    Ok(bytes) => {
                        if let Err(e) = me.activate(&bytes, "file", None, true) {
                            me.set_error(&format!("{}: {e}", file.display()), true);
                        }
                    }
                    Err(e) => me.set_error(&format!("{}: {e}", file.display()), false),
                }
            })
            .await;
            shutdown.cancelled().await;
            return Ok(());
        }
        loop {
            let started = Instant::now();
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = self.fetch_once() => r,
            };
            let wait = match outcome {
                // The server held the request: ask again at once.
                Ok(Fetched::NotModified) if started.elapsed() >= Duration::from_secs(1) => {
                    Duration::ZERO
                }
                Ok(Fetched::Activated) => Duration::ZERO,
                Ok(Fetched::NotModified) => self.jittered(),
                Err(e) => {
                    let refused = matches!(
                        e,
                        BundleError::Signature(_)
                            | BundleError::Mismatch(_)
                            | BundleError::Manifest(_)
                            | BundleError::Unsigned
                            | BundleError::Malformed(_)
                            | BundleError::TooLarge(_)
                            | BundleError::UnknownKey(..)
                            | BundleError::Expired(_)
                            | BundleError::Keys(_)
                    );
                    self.set_error(&e.to_string(), refused);
                    if matches!(e, BundleError::Io(_)) {
                        self.next_url().await;
                    }
                    self.jittered()
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn jittered(&self) -> Duration {
        let base = self.settings.poll_s.max(1) as f64;
        let mut b = [0u8; 2];
        let _ = aws_lc_rs::rand::fill(&mut b);
        let r = f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX); // 0..1
        Duration::from_secs_f64(base * (0.8 + 0.4 * r))
    }

    /// The URL in use: `url`, or one of `fallback_urls` after failures.
    fn url(&self) -> Option<String> {
        match self.current.load(std::sync::atomic::Ordering::Relaxed) {
            0 => self.settings.url.clone(),
            n => self.settings.fallback_urls.get(n - 1).cloned(),
        }
    }

    /// After a failed fetch: the next URL, when there are others.
    async fn next_url(&self) {
        let n = self.settings.fallback_urls.len() + 1;
        if n == 1 {
            return;
        }
        let i = (self.current.load(std::sync::atomic::Ordering::Relaxed) + 1) % n;
        self.current.store(i, std::sync::atomic::Ordering::Relaxed);
        *self.client.lock().await = None;
        tracing::warn!(url = ?self.url(), "fetching bundles from another collector");
    }

    /// The client of the bundle URL, made once (with its root store) and kept for every poll.
    async fn client(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Client>>, BundleError> {
        let mut guard = self.client.lock().await;
        if guard.is_none() {
            let url = self
                .url()
                .ok_or_else(|| BundleError::Io("no bundle url".into()))?;
            let url = url.as_str();
            let roots = crate::trust::root_store(true, true, &self.settings.extra_cas)
                .map_err(|e| BundleError::Io(e.to_string()))?;
            let client = Client::new(url, roots, true)
                .map_err(|e| BundleError::Io(format!("bundle {e}")))?;
            *guard = Some(client);
        }
        Ok(guard)
    }

    async fn fetch_once(self: &Arc<Self>) -> Result<Fetched, BundleError> {
        let url = self
            .url()
            .ok_or_else(|| BundleError::Io("no bundle url".into()))?;
        let uri: http::Uri = url
            .parse()
            .map_err(|e| BundleError::Io(format!("bundle url `{url}`: {e}")))?;
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut guard = self.client().await?;
        let client = guard
            .as_mut()
            .ok_or_else(|| BundleError::Io("no bundle client".into()))?;
        let mut headers = http::HeaderMap::new();
        let prefer = http::HeaderValue::from_str(&format!("wait={}", self.settings.long_poll_s))
            .map_err(|e| BundleError::Io(e.to_string()))?;
        headers.insert("prefer", prefer);
        let etag = self.etag.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(e) = etag.filter(|_| self.active.load().is_some())
            && let Ok(v) = http::HeaderValue::from_str(&e)
        {
            headers.insert(http::header::IF_NONE_MATCH, v);
        }
        if let Some(path) = &self.settings.credential_file {
            if !client.is_https() {
                return Err(BundleError::Io(format!(
                    "bundle url `{url}`: a credential is only sent over https://"
                )));
            }
            let text = std::fs::read_to_string(path)
                .map_err(|e| BundleError::Io(format!("{}: {e}", path.display())))?;
            let value =
                http::HeaderValue::from_str(&format!("Bearer {}", text.trim())).map_err(|_| {
                    BundleError::Io(format!("{}: not a usable credential", path.display()))
                })?;
            headers.insert(http::header::AUTHORIZATION, value);
        }
        let timeout = Duration::from_secs(self.settings.long_poll_s + 15);
        self.status.lock().unwrap_or_else(|p| p.into_inner()).polls += 1;
        let answer = client
            .request(
                http::Method::GET,
                path,
                headers,
                Bytes::new(),
                timeout,
                usize::try_from(self.limits.max_archive).unwrap_or(usize::MAX),
            )
            .await
            .map_err(|e| match e {
                ClientError::TooLarge(m) => BundleError::TooLarge(format!("bundle download: {m}")),
                ClientError::Config(m) | ClientError::Http(m) => BundleError::Io(m),
            })?;
        drop(guard);
        let status = answer.status;
        if status == http::StatusCode::NOT_MODIFIED {
            let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
            st.not_modified += 1;
            st.confirmed_at = Some(now_s());
            return Ok(Fetched::NotModified);
        }
        if status == http::StatusCode::UNAUTHORIZED || status == http::StatusCode::FORBIDDEN {
            return Err(BundleError::Io(format!(
                "bundle server refused the agent's credential ({status})"
            )));
        }
        if !status.is_success() {
            return Err(BundleError::Io(format!("bundle server answered {status}")));
        }
        let etag = answer
            .headers
            .get(http::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.activate(&answer.body, "url", etag, true))
            .await
            .map_err(|e| BundleError::Io(format!("activating the bundle: {e}")))??;
        Ok(Fetched::Activated)
    }
}

enum Fetched {
    NotModified,
    Activated,
}
