//! `sluice-collector`: the central side of Sluice. It enrolls agents, ingests their events
//! (idempotently, by event id) into an embedded SQLite store, answers queries in a small query
//! language, streams exports, serves signed policy bundles with long polling, forwards events to
//! SIEMs, and hosts the portal.
//!
//! May import `sluice-protocol`, `sluice-policy` and `sluice-net`, never the agent: building the
//! collector compiles no eBPF.
//!
//! # Entry points for the portal (`crate::portal`)
//! - [`Collector`]: the shared state, handed to `portal::handle` as `Arc<Collector>`;
//!   `collector.store` is the [`store::Store`] (`with_conn` for read-write SQL on the single
//!   writer connection, `with_read` for read-only SQL on a pooled reader, plus typed helpers such
//!   as [`store::Store::search`], [`store::Store::get_event_at`] (pass the event's time: without
//!   it the lookup scans an index), [`store::Store::devices`], [`store::Store::bundles`],
//!   [`store::Store::agents`], [`store::Store::saved_queries`], [`store::Store::save_query`],
//!   [`store::Store::stats`]); every store call blocks, so call it from
//!   `tokio::task::spawn_blocking`. `collector.config` is the parsed [`config::Config`].
//! - [`query::parse`] / [`query::Query::compile`]: the query language, errors with positions.
//! - [`web::BoxBody`] (`http_body_util::combinators::BoxBody<Bytes, std::io::Error>`, `Send +
//!   Sync`), [`web::not_found`], [`web::problem`], [`web::full`], [`web::json`]:
//!   response helpers.
//! - [`Collector::publish_bundle`]: verify and publish a signed bundle (wakes long polls).
//! - `portal::MIGRATIONS` run after the store's own, recorded by name; `portal::handle` serves
//!   every request whose path does not start with `/api/`; `portal::set_admin_password` is called
//!   by `sluice-collector init`; `portal::identity` says who a request's portal session is
//!   (`{email, groups, admin}`: a local admin or a person the organisation's OpenID Connect
//!   provider signed in), and the query API accepts only admins' sessions.
//! - [`detect`]: anomaly detection and alerts (`detect::alerts` for the store's alerts,
//!   `detect::change_state` to acknowledge, resolve or dismiss one).

pub mod client;
pub mod clock;
pub mod config;
pub mod conn;
pub mod db;
pub mod detect;
pub mod export;
pub mod forward;
pub mod gate;
pub mod portal;
pub mod query;
pub mod release;
pub mod risk;
pub mod server;
pub mod store;
pub mod tls;
pub mod web;

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use sluice_policy::bundle::{Archive, Limits as BundleLimits, jws::VerifyingKey};

pub use crate::{
    config::Config,
    store::{Published, Store, valid_group},
};

/// Errors of the collector's library entry points.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store.
    #[error("store: {0}")]
    Store(#[from] store::StoreError),
    /// Reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// No bundle public key is configured, so nothing can be published.
    #[error(
        "no `bundle_public_key` is configured: bundles cannot be verified, so none is published"
    )]
    NoBundleKey,
    /// The bundle failed verification.
    #[error("bundle: {0}")]
    Bundle(#[from] sluice_policy::bundle::BundleError),
    /// The bundle public key is unusable.
    #[error("bundle public key {path}: {detail}")]
    BundleKey {
        /// The key file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// TLS material.
    #[error("tls: {0}")]
    Tls(String),
    /// A group name is not acceptable.
    #[error("invalid group name {0:?}: use 1-64 of a-z, A-Z, 0-9, `-`, `_`, `.`")]
    Group(String),
}

/// Counters reported by `/api/v1/status`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Events stored.
    pub accepted: AtomicU64,
    /// Duplicate events acknowledged.
    pub duplicates: AtomicU64,
    /// Invalid lines rejected.
    pub rejected: AtomicU64,
    /// Batches ingested.
    pub batches: AtomicU64,
}

impl Counters {
    /// Adds an ingestion result.
    pub fn add(&self, r: &store::IngestOutcome) {
        self.accepted.fetch_add(r.accepted, Ordering::Relaxed);
        self.duplicates.fetch_add(r.duplicates, Ordering::Relaxed);
        self.rejected.fetch_add(r.rejected, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
    }
}

/// The collector's shared state: one per process, shared as `Arc<Collector>` by every request.
#[derive(Debug)]
pub struct Collector {
    /// The store.
    pub store: Store,
    /// The configuration it was started with.
    pub config: Config,
    /// Bundle publication notices (long polls wait on it).
    pub bundle_notify: tokio::sync::watch::Sender<u64>,
    /// The forwarders' queues.
    pub forward: forward::Forwarder,
    /// Ingestion counters.
    pub counters: Counters,
    /// Connection bounds and their counters.
    pub conns: Arc<conn::ConnLimits>,
    /// When this process started.
    pub started: Instant,
    /// The portal's OpenID Connect relying party, when `[portal.oidc]` is configured (it keeps
    /// the provider's documents between sign-ins).
    pub oidc: Option<portal::oidc::Provider>,
    /// The keys protected files' passwords are sealed to and kept under (none when they could
    /// not be read or made: then no password is kept or released, and the log says why).
    pub release_keys: Option<release::KeyRing>,
    /// Users' risk and devices' marks (what agents long-poll on `/api/v1/risk`).
    pub risk: risk::RiskBoard,
    /// Anomaly detection's queue (its thread starts with [`server::Server::run`]).
    pub detect: detect::Detection,
    /// The portal's sign-in limits and password checks.
    pub signin: portal::signin::Guard,
    /// Places for ingestion batches, in all and per agent.
    pub ingest_gate: gate::IngestGate,
}

impl Collector {
    /// Opens the store under the configured state directory (created 0700 when missing, running
    /// migrations) and prepares the forwarders' queues (their tasks start with
    /// [`server::Server::run`]).
    pub fn open(config: Config) -> Result<Self, Error> {
        if !config.state_dir.exists() {
            use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
            let dir = &config.state_dir;
            let io = |source| Error::Io {
                path: dir.clone(),
                source,
            };
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io)?;
            // The mode given to `create` is masked by the umask.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        }
        let store = match &config.store.postgres {
            Some(conninfo) => Store::open_postgres_with(
                conninfo,
                config.store.max_connections,
                config.retention_days,
                config.store.ca_file.as_deref(),
                portal::MIGRATIONS,
            )?,
            None => Store::open_with(&config.db_path(), portal::MIGRATIONS)?,
        };
        Ok(Self::with_store(store, config))
    }

    /// A collector over an already opened store.
    pub fn with_store(store: Store, config: Config) -> Self {
        let forward = forward::Forwarder::new(&config.forward);
        let (bundle_notify, _) = tokio::sync::watch::channel(0u64);
        let oidc = config.portal.oidc.clone().map(portal::oidc::Provider::new);
        let config_state_dir = config.state_dir.clone();
        let conns = Arc::new(conn::ConnLimits::new(
            config.limits.max_connections,
            config.limits.max_connections_per_address,
        ));
        let risk = risk::RiskBoard::open(&store).unwrap_or_else(|e| {
            tracing::error!(error = %e, "risk marks could not be read: starting with none");
            risk::RiskBoard::empty()
        });
        let detect = detect::Detection::new(&config.detection);
        let signin = portal::signin::Guard::new(config.portal.sign_in.clone());
        let ingest_gate = gate::IngestGate::new(
            config.limits.max_ingest_requests,
            config.limits.max_ingest_requests_per_agent,
        );
        Self {
            signin,
            ingest_gate,
            risk,
            detect,
            store,
            config,
            bundle_notify,
            forward,
            counters: Counters::default(),
            conns,
            started: Instant::now(),
            oidc,
            release_keys: match release::KeyRing::open(&config_state_dir) {
                Ok(k) => Some(k),
                Err(e) => {
                    tracing::error!(error = %e, "release keys: protected files' passwords will not be kept");
                    None
                }
            },
        }
    }

    /// The configured bundle verification key.
    pub fn bundle_key(&self) -> Result<VerifyingKey, Error> {
        let path = self
            .config
            .bundle_public_key
            .clone()
            .ok_or(Error::NoBundleKey)?;
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        VerifyingKey::from_pem(&text).map_err(|e| Error::BundleKey {
            path,
            detail: e.to_string(),
        })
    }

    /// Verifies a signed bundle (tar.gz) against the configured public key and publishes it for
    /// `group`; long polls of that group's agents are answered at once. Blocking (file and
    /// database): call it from `spawn_blocking` in async code.
    /// What the published bundles' rotations taught, from the configured key on: each stored
    /// bundle is verified again with the keys trusted before it, in publication order (so every
    /// collector on one database agrees, and nothing but signatures is trusted).
    pub fn bundle_trust(&self) -> Result<sluice_policy::bundle::Trust, Error> {
        let key = self.bundle_key()?;
        let mut trust = sluice_policy::bundle::Trust::default();
        for id in self.store.bundle_ids()? {
            let Some(bytes) = self.store.bundle_bytes(id)? else {
                continue;
            };
            let Ok(v) = Archive::read(&bytes, &BundleLimits::default())
                .and_then(|a| a.verify_with(&trust.ring(&key)))
            else {
                continue;
            };
            if let Ok(Some(rot)) = v.rotation() {
                let _ = trust.learn(&rot, &key);
            }
        }
        Ok(trust)
    }

    /// The keys a bundle may be published with now.
    pub fn bundle_ring(&self) -> Result<sluice_policy::bundle::KeyRing, Error> {
        Ok(self.bundle_trust()?.ring(&self.bundle_key()?))
    }

    /// Verifies `bytes` (with the configured key and the keys published rotations introduced,
    /// not expired, a whole number revision) and publishes it for `group`.
    pub fn publish_bundle(&self, group: &str, bytes: Vec<u8>) -> Result<Published, Error> {
        if !valid_group(group) {
            return Err(Error::Group(group.to_owned()));
        }
        let ring = self.bundle_ring()?;
        let verified = Archive::read(&bytes, &BundleLimits::default())?
            .verify_with(&ring)?
            .fresh(sluice_policy::bundle::now_s())?;
        if let Some(rot) = verified.rotation()? {
            // Checked before it is served: a rotation agents would refuse is refused here.
            let mut trust = self.bundle_trust()?;
            trust.learn(&rot, &self.bundle_key()?)?;
        }
        let published = self
            .store
            .publish_bundle(group, &verified.manifest.revision, bytes)?;
        self.bundle_notify.send_modify(|v| *v = v.wrapping_add(1));
        tracing::info!(group, revision = %published.revision, etag = %published.etag, "bundle published");
        Ok(published)
    }
}
