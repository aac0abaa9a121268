//! The store: one SQLite database in WAL mode (`<state>/collector.db`, the default), or a
//! PostgreSQL database shared by several collectors ([`pg`], `[store] postgres`). Both go through
//! one SQL layer ([`crate::db`]): the statements below are written once; where the two differ
//! (the events' table and its batch insert, retention, the lookup by id alone) each has its own.
//! What follows describes SQLite; [`pg`] says what PostgreSQL does instead.
//!
//! One writer connection (behind a mutex: SQLite has one writer at a time anyway) takes every
//! write; a small pool of reader connections serves queries concurrently with ingestion (WAL
//! readers never block the writer nor each other).
//!
//! Events are stored compact (`0002_compact_events`), about 340 bytes each with their indexes
//! in `sluice-collector-bench` where the JSON alone is 845:
//! - the whole event, as sent, is the `body`: its JSON compressed with zstd and a dictionary
//!   trained on the store's own events ([`codec`]);
//! - the filter columns of few distinct values (user, groups, app, activity, action, policy,
//!   device, host name, addresses, process, labels) are ids into `terms` ([`terms`]); URL, file
//!   names and message, nearly unique per event, are text;
//! - the key is `(time, idh)`, `idh` the first 8 bytes of the id's SHA-256 ([`id_hash`]);
//!   events of the same millisecond are ordered by it, and keyset pagination goes by
//!   `(time, idh)`. The lists and the API read everything else from the body.
//!
//! Ingestion is idempotent by `UNIQUE (time, idh)` (`INSERT OR IGNORE`), not by a unique index on
//! the id alone: a duplicate is a re-sent event, byte for byte, so its time is the same, and an
//! index led by time takes a batch's inserts in a handful of adjacent pages, where an index of
//! random ids dirties one page per event, each copied whole into the WAL. The price is the
//! lookup by id alone, a scan of that covering index; with the event's time
//! ([`Store::get_event_at`]) it is a single probe. Both compare the id itself after the hash.
//!
//! SQLite's indexes: `(time, idh)`, `(user_t, time, action_t)`, `(device_t, time)`,
//! `(action_t, time)`: a user's, a device's and an action's events come newest first straight
//! from an index (the rowid every entry carries breaks ties cheaply); app and the other columns
//! filter inside the time range. The query planner works from statistics that the migration
//! writes into `sqlite_stat1` instead of measuring them with `ANALYZE`: they state what holds for
//! activity logs whatever their size (a user or a device is selective, an action is not). A
//! sampled `ANALYZE` on 10 M events measured every index alike and made the planner pick
//! `(action, time)` for user + action queries (1.3 s instead of milliseconds), and a full one
//! takes minutes.
//!
//! Free text is matched with `LIKE` over URL, file names, message and the users' terms inside
//! the time window the rest of the query selects, not with FTS5: an external-content FTS5 index
//! over the same text, filled in the same transaction, cut the ingestion rate by about a quarter
//! in a measurement on this machine, while free text is the rarest filter and is almost always
//! combined with a time range. Multi-valued fields (`groups`, `file_names`, `labels`) are stored
//! as `|a|b|` so a whole value can be matched with `LIKE '%|a|%'`.
//!
//! Secrets (enrollment tokens, agent credentials, API tokens) are stored as SHA-256 only.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
};

pub mod cluster;
pub mod codec;
pub mod pg;
pub mod terms;

use rusqlite::Connection;
use serde::Serialize;
use sluice_protocol::{CLASS_DEVICE_INVENTORY, EnrollResponse, Event};

use crate::{
    args,
    db::{Conn, DbError, OptionalRow as _, Val},
    query::Compiled,
};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database.
    #[error("database: {0}")]
    Db(#[from] DbError),
    /// Creating the database's directory.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An enrollment token is unknown, used or expired.
    #[error("enrollment token refused: {0}")]
    TokenRefused(&'static str),
    /// A saved query name is taken.
    #[error("a saved query named {0:?} already exists")]
    NameTaken(String),
    /// A value is not acceptable.
    #[error("{0}")]
    Invalid(String),
}

/// The store's own migrations, in order, recorded by name.
pub const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_core", CORE_SCHEMA),
    ("0002_compact_events", COMPACT_SCHEMA),
    ("0003_agent_credentials", AGENT_CREDENTIALS_SCHEMA),
];

/// Credentials that expire and are renewed: when the current one stops being accepted, and the
/// one it replaced with the end of its grace. Agents enrolled before have no expiry until their
/// first renewal (which they ask for at once).
const AGENT_CREDENTIALS_SCHEMA: &str = "
ALTER TABLE agents ADD COLUMN credential_expires_at INTEGER;
ALTER TABLE agents ADD COLUMN previous_credential_sha256 TEXT;
ALTER TABLE agents ADD COLUMN previous_valid_until INTEGER;
CREATE INDEX agents_previous_credential ON agents(previous_credential_sha256);
";

/// How long a renewed agent's former credential is still accepted (ms).
pub const RENEW_GRACE_MS: i64 = 10 * 60 * 1000;

/// Events made compact (see the module documentation): the former table is kept as
/// `events_v1` until [`Store::open_with`] has moved its rows into the new one.
const COMPACT_SCHEMA: &str = "
DROP INDEX events_time_id;
DROP INDEX events_user_time;
DROP INDEX events_action_time;
DROP INDEX events_app_time;
DROP INDEX events_device_time;
DELETE FROM sqlite_stat1 WHERE tbl = 'events';
ALTER TABLE events RENAME TO events_v1;
CREATE TABLE terms(
  id INTEGER PRIMARY KEY,
  kind INTEGER NOT NULL,
  value TEXT NOT NULL,
  UNIQUE (kind, value)
);
CREATE TABLE event_dicts(
  id INTEGER PRIMARY KEY,
  dict BLOB NOT NULL,
  created_at INTEGER NOT NULL
);
CREATE TABLE events(
  seq INTEGER PRIMARY KEY,
  time INTEGER NOT NULL,
  idh INTEGER NOT NULL,
  received INTEGER NOT NULL,
  class_uid INTEGER NOT NULL,
  activity_t INTEGER NOT NULL,
  action_t INTEGER NOT NULL,
  policy_t INTEGER NOT NULL,
  app_t INTEGER NOT NULL,
  user_t INTEGER NOT NULL,
  groups_t INTEGER NOT NULL,
  device_t INTEGER NOT NULL,
  host_t INTEGER NOT NULL,
  src_ip_t INTEGER NOT NULL,
  dst_ip_t INTEGER NOT NULL,
  process_t INTEGER NOT NULL,
  path_t INTEGER NOT NULL,
  labels_t INTEGER NOT NULL,
  url TEXT NOT NULL,
  file_names TEXT NOT NULL,
  message TEXT NOT NULL,
  body BLOB NOT NULL
);
CREATE UNIQUE INDEX events_time_idh ON events(time, idh);
CREATE INDEX events_user ON events(user_t, time, action_t);
CREATE INDEX events_device ON events(device_t, time);
CREATE INDEX events_action ON events(action_t, time);
INSERT INTO sqlite_stat1(tbl, idx, stat) VALUES
  ('events', 'events_time_idh', '1000000 2 1'),
  ('events', 'events_user', '1000000 500 2 1'),
  ('events', 'events_device', '1000000 2000 2'),
  ('events', 'events_action', '1000000 250000 2');
";

const CORE_SCHEMA: &str = "
CREATE TABLE events(
  seq INTEGER PRIMARY KEY,
  id TEXT NOT NULL,
  time INTEGER NOT NULL,
  received INTEGER NOT NULL,
  class_uid INTEGER NOT NULL,
  activity TEXT NOT NULL DEFAULT '',
  action TEXT NOT NULL DEFAULT '',
  policy TEXT NOT NULL DEFAULT '',
  app TEXT NOT NULL DEFAULT '',
  \"user\" TEXT NOT NULL DEFAULT '',
  groups TEXT NOT NULL DEFAULT '',
  device_uid TEXT NOT NULL DEFAULT '',
  hostname TEXT NOT NULL DEFAULT '',
  src_ip TEXT NOT NULL DEFAULT '',
  dst_ip TEXT NOT NULL DEFAULT '',
  process TEXT NOT NULL DEFAULT '',
  process_path TEXT NOT NULL DEFAULT '',
  url TEXT NOT NULL DEFAULT '',
  file_names TEXT NOT NULL DEFAULT '',
  labels TEXT NOT NULL DEFAULT '',
  message TEXT NOT NULL DEFAULT '',
  json BLOB NOT NULL
);
CREATE UNIQUE INDEX events_time_id ON events(time, id);
CREATE INDEX events_user_time ON events(\"user\", time, action);
CREATE INDEX events_action_time ON events(action, time);
CREATE INDEX events_app_time ON events(app, time);
CREATE INDEX events_device_time ON events(device_uid, time);
-- Planner statistics, fixed: see the module documentation.
ANALYZE sqlite_schema;
INSERT INTO sqlite_stat1(tbl, idx, stat) VALUES
  ('events', 'events_time_id', '1000000 2 1'),
  ('events', 'events_user_time', '1000000 500 2 1'),
  ('events', 'events_device_time', '1000000 2000 2'),
  ('events', 'events_app_time', '1000000 100000 2'),
  ('events', 'events_action_time', '1000000 250000 2');
CREATE TABLE agents(
  id TEXT PRIMARY KEY,
  hostname TEXT NOT NULL,
  grp TEXT NOT NULL,
  credential_sha256 TEXT NOT NULL UNIQUE,
  agent_version TEXT NOT NULL DEFAULT '',
  enrolled_at INTEGER NOT NULL,
  revoked_at INTEGER,
  last_seen INTEGER
);
CREATE TABLE enroll_tokens(
  token_sha256 TEXT PRIMARY KEY,
  grp TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL,
  used_at INTEGER,
  used_by TEXT
);
CREATE TABLE devices(
  uid TEXT PRIMARY KEY,
  hostname TEXT NOT NULL DEFAULT '',
  posture TEXT NOT NULL DEFAULT '',
  os TEXT NOT NULL DEFAULT '',
  agent_version TEXT NOT NULL DEFAULT '',
  bundle_revision TEXT NOT NULL DEFAULT '',
  last_seen INTEGER NOT NULL,
  posture_json TEXT,
  status_json TEXT
);
CREATE TABLE bundles(
  id INTEGER PRIMARY KEY,
  grp TEXT NOT NULL,
  revision TEXT NOT NULL,
  etag TEXT NOT NULL,
  size INTEGER NOT NULL,
  bytes BLOB NOT NULL,
  published_at INTEGER NOT NULL
);
CREATE INDEX bundles_grp ON bundles(grp, id);
CREATE TABLE saved_queries(
  id INTEGER PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  query TEXT NOT NULL,
  created_by TEXT NOT NULL DEFAULT '',
  created_at INTEGER NOT NULL
);
CREATE TABLE api_tokens(
  id INTEGER PRIMARY KEY,
  name TEXT NOT NULL,
  token_sha256 TEXT NOT NULL UNIQUE,
  created_at INTEGER NOT NULL,
  revoked_at INTEGER,
  last_used INTEGER
);
";

/// The notification channel of published bundles (PostgreSQL: every collector's long polls).
pub const NOTIFY_BUNDLES: &str = "sluice_bundles";

/// The notification channel of changed risk marks.
pub const NOTIFY_RISK: &str = "sluice_risk";

/// Largest single event line; longer ones are rejected.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// Batches at least this long are parsed on two threads.
const PARALLEL_PARSE: usize = 256;

/// Reader connections kept open for reuse.
const READERS: usize = 4;

/// The columns every event query returns, in [`EventRow`] order.
const ROW_COLUMNS: &str = "idh, body";

/// The store. Cheap to share behind an `Arc`; every method is blocking (call it from
/// `spawn_blocking` in async code).
pub struct Store {
    backend: Backend,
    enc: Encoding,
}

enum Backend {
    Lite(Lite),
    Pg(Box<pg::Pg>),
}

/// What a store keeps in memory about its events' encoding.
#[derive(Debug, Default)]
struct Encoding {
    codec: codec::Codec,
    terms: terms::Terms,
}

/// The embedded SQLite store's connections.
struct Lite {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.backend {
            Backend::Lite(l) => f.debug_struct("Store").field("path", &l.path).finish(),
            Backend::Pg(p) => f.debug_struct("Store").field("pg", &p.target).finish(),
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Db(e.into())
    }
}

pub use crate::clock::now_ms;

/// A published bundle's identity.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Published {
    /// Row id.
    pub id: i64,
    /// Agent group.
    pub group: String,
    /// Manifest revision.
    pub revision: String,
    /// ETag (quoted).
    pub etag: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// Whether `g` is an acceptable agent group name.
pub fn valid_group(g: &str) -> bool {
    !g.is_empty()
        && g.len() <= 64
        && g.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Lower-case hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data))
}

/// `prefix` followed by 32 random bytes in hex: tokens, credentials.
pub fn random_secret(prefix: &str) -> Result<String, StoreError> {
    let mut b = [0u8; 32];
    aws_lc_rs::rand::fill(&mut b)
        .map_err(|_| StoreError::Invalid("the system random generator failed".into()))?;
    Ok(format!("{prefix}{}", hex::encode(b)))
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

fn configure(conn: &Connection, cache_kib: i64) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "cache_size", -cache_kib)?;
    Ok(())
}

/// Outcome of one ingested batch.
#[derive(Debug, Default, Clone)]
pub struct IngestOutcome {
    /// Events stored now.
    pub accepted: u64,
    /// Events that were already stored (acknowledged, not stored twice).
    pub duplicates: u64,
    /// Lines that were not valid events.
    pub rejected: u64,
    /// The JSON of the events stored now, when asked for (forwarding).
    pub new_events: Vec<bytes::Bytes>,
    /// The events stored now, as parsed (and corrected) for storing, when asked for
    /// (detection: handing them over saves parsing each event a second time).
    pub new_parsed: Vec<Event>,
    /// Protected files whose sealed passwords were kept.
    pub releases: u64,
    /// Protected files whose sealed passwords were not (did not open, or nothing keeps them).
    pub releases_refused: u64,
}

/// What ingestion needs to know about the caller.
#[derive(Clone, Copy, Default)]
pub struct IngestOptions<'a> {
    /// The authenticated agent: its id and enrolled host name replace whatever the events
    /// claim, and times far from the receive time are replaced by it (each noted in the
    /// event's `received`).
    pub agent: Option<&'a AgentBinding>,
    /// Collect the stored events' JSON into [`IngestOutcome::new_events`].
    pub collect_new: bool,
    /// Collect the stored events themselves into [`IngestOutcome::new_parsed`].
    pub collect_parsed: bool,
    /// Keeps the sealed passwords of protected files, in the transaction that stores their
    /// event (only for events stored for the first time). The events are stored without them.
    /// Without it, sealed boxes are dropped.
    pub sealed: Option<&'a SealedSink<'a>>,
}

/// The authenticated agent an ingestion is for, and the clock its events are held to.
#[derive(Debug, Clone)]
pub struct AgentBinding {
    /// The agent's id (its credential's).
    pub id: String,
    /// The host name it enrolled with.
    pub hostname: String,
    /// The receive time (Unix ms).
    pub now: i64,
    /// How far past `now` an event's time may lie (ms).
    pub max_future_ms: i64,
    /// How far before `now` an event's time may lie (ms).
    pub max_past_ms: i64,
}

impl AgentBinding {
    /// Holds `e` to the agent's identity and the clock; true when something was changed.
    pub fn bind(&self, e: &mut Event) -> bool {
        let mut changed = e.received.take().is_some();
        let mut r = sluice_protocol::Received {
            time: u64::try_from(self.now).unwrap_or(0),
            ..Default::default()
        };
        if e.device.uid != self.id {
            changed = true;
            // An empty id is the agent not knowing its own yet, not a claim.
            if !e.device.uid.is_empty() {
                r.flags.push("device_uid".into());
                r.claimed_device_uid = Some(std::mem::take(&mut e.device.uid));
            }
            self.id.clone_into(&mut e.device.uid);
        }
        if e.device.hostname != self.hostname {
            changed = true;
            if !e.device.hostname.is_empty() {
                r.flags.push("hostname".into());
                r.claimed_hostname = Some(std::mem::take(&mut e.device.hostname));
            }
            self.hostname.clone_into(&mut e.device.hostname);
        }
        let t = i64::try_from(e.time).unwrap_or(i64::MAX);
        if t > self.now.saturating_add(self.max_future_ms) {
            r.flags.push("time_future".into());
        } else if t < self.now.saturating_sub(self.max_past_ms) {
            r.flags.push("time_past".into());
        }
        if r.flags.iter().any(|f| f.starts_with("time_")) {
            changed = true;
            r.claimed_time = Some(e.time);
            e.time = r.time;
        }
        if !r.flags.is_empty() {
            e.received = Some(r);
        }
        changed
    }
}

impl std::fmt::Debug for IngestOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestOptions")
            .field("agent", &self.agent)
            .field("collect_new", &self.collect_new)
            .field("collect_parsed", &self.collect_parsed)
            .field("sealed", &self.sealed.is_some())
            .finish()
    }
}

/// Keeps one sealed box; an error is logged and counted, the event is stored anyway.
pub type SealedSink<'a> = dyn Fn(&Conn, &SealedBox) -> Result<(), String> + Sync + 'a;

/// A protected file's sealed passwords, taken out of its event at ingestion.
#[derive(Debug, Clone)]
pub struct SealedBox {
    /// The event it came in.
    pub event_id: String,
    /// The device (the authenticated agent).
    pub device_uid: String,
    /// The downloader (the event's user, lower case).
    pub downloader: String,
    /// The release, its `sealed` box included.
    pub file: sluice_protocol::ProtectedFile,
}

/// Takes the sealed boxes out of `e` (so the stored event carries none).
fn take_sealed(e: &mut Event) -> Vec<SealedBox> {
    let downloader = e
        .actor
        .user
        .as_ref()
        .map(|u| u.email_addr.to_ascii_lowercase())
        .unwrap_or_default();
    let (event_id, device_uid) = (e.id.clone(), e.device.uid.clone());
    let Some(s) = e.sluice.as_mut() else {
        return Vec::new();
    };
    s.protected
        .iter_mut()
        .filter(|p| !p.sealed.is_empty())
        .map(|p| {
            let file = p.clone();
            p.sealed.clear();
            SealedBox {
                event_id: event_id.clone(),
                device_uid: device_uid.clone(),
                downloader: downloader.clone(),
                file,
            }
        })
        .collect()
}

/// An event's filter columns, derived once at ingestion.
#[derive(Debug)]
struct Row {
    id: String,
    /// The id's hash: with the time, what makes an event unique in the table.
    idh: i64,
    time: i64,
    /// When the collector received it (0: now).
    received: i64,
    class_uid: i64,
    activity: String,
    action: String,
    policy: String,
    app: String,
    user: String,
    groups: String,
    device_uid: String,
    hostname: String,
    src_ip: String,
    dst_ip: String,
    process: String,
    process_path: String,
    url: String,
    file_names: String,
    labels: String,
    message: String,
    json: Vec<u8>,
    /// `json` compressed ([`codec`]).
    body: Vec<u8>,
    /// Sealed boxes taken out of the event.
    sealed: Vec<SealedBox>,
}

impl Row {
    /// The term columns' values, in [`terms::COLUMNS`] order.
    fn term_values(&self) -> [(i64, &str); 13] {
        let c = &terms::COLUMNS;
        [
            (c[0].1, &self.activity),
            (c[1].1, &self.action),
            (c[2].1, &self.policy),
            (c[3].1, &self.app),
            (c[4].1, &self.user),
            (c[5].1, &self.groups),
            (c[6].1, &self.device_uid),
            (c[7].1, &self.hostname),
            (c[8].1, &self.src_ip),
            (c[9].1, &self.dst_ip),
            (c[10].1, &self.process),
            (c[11].1, &self.process_path),
            (c[12].1, &self.labels),
        ]
    }
}

/// The 64-bit hash of an event id the table is keyed by (with the time): the first 8 bytes
/// of its SHA-256. Two events of the same millisecond with ids of the same hash are as likely
/// as a SHA-256 collision on 64 bits, and an agent cannot aim one at another's event.
pub fn id_hash(id: &str) -> i64 {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, id.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    i64::from_le_bytes(b)
}

/// `|a|b|`, with `|` inside values replaced so the separators stay unambiguous.
fn joined<'a>(values: impl Iterator<Item = &'a str>) -> String {
    let mut s = String::new();
    for v in values.filter(|v| !v.is_empty()) {
        if s.is_empty() {
            s.push('|');
        }
        s.push_str(&v.replace('|', "/"));
        s.push('|');
    }
    s
}

fn row_of(e: &Event, json: Vec<u8>) -> Result<Row, String> {
    let time = i64::try_from(e.time).map_err(|_| "time out of range".to_owned())?;
    let sl = e.sluice.as_ref();
    let user = e.actor.user.as_ref();
    let process = e.actor.process.as_ref();
    let activity = match sl {
        Some(s) if !s.activity.is_empty() => s.activity.to_ascii_lowercase(),
        _ => e.activity_name.to_ascii_lowercase(),
    };
    let mut labels: Vec<&str> = Vec::new();
    for f in &e.files {
        for l in &f.labels {
            labels.push(&l.guid);
            if let Some(id) = &l.id {
                labels.push(id);
            }
            if let Some(n) = &l.name {
                labels.push(n);
            }
        }
    }
    if let Some(l) = sl.and_then(|s| s.label_applied.as_deref()) {
        labels.push(l);
    }
    Ok(Row {
        id: e.id.clone(),
        idh: id_hash(&e.id),
        time,
        received: 0,
        class_uid: i64::from(e.class_uid),
        activity,
        action: sl
            .map(|s| s.action.to_ascii_lowercase())
            .unwrap_or_default(),
        policy: sl.and_then(|s| s.policy.clone()).unwrap_or_default(),
        app: sl.map(|s| s.app.clone()).unwrap_or_default(),
        user: user
            .map(|u| u.email_addr.to_lowercase())
            .unwrap_or_default(),
        groups: user
            .map(|u| joined(u.groups.iter().map(String::as_str)))
            .unwrap_or_default(),
        device_uid: e.device.uid.clone(),
        hostname: e.device.hostname.clone(),
        src_ip: e
            .src_endpoint
            .as_ref()
            .and_then(|p| p.ip.clone())
            .unwrap_or_default(),
        dst_ip: e
            .dst_endpoint
            .as_ref()
            .and_then(|p| p.ip.clone())
            .unwrap_or_default(),
        process: process.map(|p| p.name.clone()).unwrap_or_default(),
        process_path: process.and_then(|p| p.path.clone()).unwrap_or_default(),
        url: e
            .http_request
            .as_ref()
            .map(|r| r.url.clone())
            .unwrap_or_default(),
        file_names: joined(e.files.iter().filter_map(|f| f.name.as_deref())),
        labels: joined(labels.into_iter()),
        message: e.message.clone(),
        json,
        body: Vec::new(),
        sealed: Vec::new(),
    })
}

/// Parses and checks event lines; the error says why a line is rejected.
fn parse_lines(
    lines: &[&[u8]],
    agent: Option<&AgentBinding>,
    codec: &codec::Codec,
) -> Vec<Result<(Row, Event), String>> {
    lines
        .iter()
        .map(|line| {
            if line.len() > MAX_EVENT_BYTES {
                return Err(format!("event line of {} bytes is too large", line.len()));
            }
            let mut e = serde_json::from_slice::<Event>(line).map_err(|e| e.to_string())?;
            e.validate()?;
            // The line is kept as sent (it parsed as exactly one event), unless it claims what
            // the authenticated agent may not: then the corrected event is serialised again.
            let mut changed = false;
            if let Some(agent) = agent {
                changed = agent.bind(&mut e);
            }
            let sealed = take_sealed(&mut e);
            let json = if changed || !sealed.is_empty() {
                serde_json::to_vec(&e).map_err(|e| e.to_string())?
            } else {
                line.to_vec()
            };
            let mut row = row_of(&e, json)?;
            row.body = codec.encode(&row.json)?;
            row.sealed = sealed;
            Ok((row, e))
        })
        .collect()
}

fn split_lines(body: &[u8]) -> Vec<&[u8]> {
    body.split(|b| *b == b'\n')
        .map(<[u8]>::trim_ascii)
        .filter(|l| !l.is_empty())
        .collect()
}

/// The valid events of a JSON Lines body, and an outcome counting the rejected lines.
fn parse_body(
    body: &[u8],
    agent: Option<&AgentBinding>,
    codec: &codec::Codec,
) -> (Vec<(Row, Event)>, IngestOutcome) {
    let lines = split_lines(body);
    // Parsing is a third of the work and needs no lock: a large batch is parsed on two
    // threads while nothing holds the writer.
    let parsed: Vec<Result<(Row, Event), String>> = if lines.len() >= PARALLEL_PARSE {
        let (a, b) = lines.split_at(lines.len() / 2);
        std::thread::scope(|s| {
            let other = s.spawn(|| parse_lines(b, agent, codec));
            let mut first = parse_lines(a, agent, codec);
            match other.join() {
                Ok(second) => first.extend(second),
                Err(_) => first.extend(parse_lines(b, agent, codec)),
            }
            first
        })
    } else {
        parse_lines(&lines, agent, codec)
    };
    keep_parsed(parsed)
}

fn keep_parsed(parsed: Vec<Result<(Row, Event), String>>) -> (Vec<(Row, Event)>, IngestOutcome) {
    let mut out = IngestOutcome::default();
    let mut rows = Vec::with_capacity(parsed.len());
    for p in parsed {
        match p {
            Ok(r) => rows.push(r),
            Err(why) => {
                out.rejected += 1;
                tracing::debug!(%why, "rejected event line");
            }
        }
    }
    (rows, out)
}

/// The insert of one event (SQLite: a prepared statement run per event).
const INSERT_EVENT: &str = "INSERT INTO events(time, idh, received, class_uid, activity_t, \
     action_t, policy_t, app_t, user_t, groups_t, device_t, host_t, src_ip_t, dst_ip_t, \
     process_t, path_t, labels_t, url, file_names, message, body) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, \
     ?17, ?18, ?19, ?20, ?21) ON CONFLICT DO NOTHING";

/// The insert of a batch (PostgreSQL: one statement, columns as arrays); returns the events it
/// stored (not those already there).
const INSERT_EVENTS_PG: &str = "INSERT INTO events(time, idh, received, class_uid, activity_t, \
     action_t, policy_t, app_t, user_t, groups_t, device_t, host_t, src_ip_t, dst_ip_t, \
     process_t, path_t, labels_t, url, file_names, message, body) \
     SELECT * FROM unnest(?1::bigint[], ?2::bigint[], ?3::bigint[], ?4::bigint[], \
     ?5::bigint[], ?6::bigint[], ?7::bigint[], ?8::bigint[], ?9::bigint[], ?10::bigint[], \
     ?11::bigint[], ?12::bigint[], ?13::bigint[], ?14::bigint[], ?15::bigint[], ?16::bigint[], \
     ?17::bigint[], ?18::text[], ?19::text[], ?20::text[], ?21::bytea[]) \
     ON CONFLICT DO NOTHING RETURNING time, idh";

/// Which of `rows` `c` stored now (false: already stored), in order.
fn insert_events(
    c: &Conn,
    rows: &[(Row, Event)],
    now: i64,
    terms: &terms::Terms,
) -> Result<Vec<bool>, DbError> {
    let values: Vec<(i64, &str)> = rows.iter().flat_map(|(r, _)| r.term_values()).collect();
    let ids = terms.resolve(c, &values)?;
    let ids: Vec<&[i64]> = ids.chunks(terms::COLUMNS.len()).collect();
    let received = |r: &Row| if r.received > 0 { r.received } else { now };
    if let Some(r) = c.with_pg(|pg| {
        let int = |f: &dyn Fn(&Row) -> i64| rows.iter().map(|(r, _)| f(r)).collect::<Vec<i64>>();
        let text = |f: fn(&Row) -> &String| rows.iter().map(|(r, _)| f(r)).collect::<Vec<_>>();
        let term = |i: usize| ids.iter().map(|t| t[i]).collect::<Vec<i64>>();
        let body: Vec<&[u8]> = rows.iter().map(|(r, _)| r.body.as_slice()).collect();
        let cols: Vec<Vec<i64>> = (0..terms::COLUMNS.len()).map(term).collect();
        let (times, idhs) = (int(&|r| r.time), int(&|r| r.idh));
        let (recv, classes) = (int(&|r| received(r)), int(&|r| r.class_uid));
        let (url, files, message) = (
            text(|r| &r.url),
            text(|r| &r.file_names),
            text(|r| &r.message),
        );
        let mut params: Vec<&(dyn postgres::types::ToSql + Sync)> =
            vec![&times, &idhs, &recv, &classes];
        params.extend(
            cols.iter()
                .map(|c| c as &(dyn postgres::types::ToSql + Sync)),
        );
        params.extend([
            &url as &(dyn postgres::types::ToSql + Sync),
            &files,
            &message,
            &body,
        ]);
        let stored = pg.query_pg(INSERT_EVENTS_PG, &params)?;
        let mut new: std::collections::HashSet<(i64, i64)> = stored
            .iter()
            .map(|r| Ok((r.get(0)?, r.get(1)?)))
            .collect::<Result<_, DbError>>()?;
        // A row stored now counts once: a second copy in the same batch is a duplicate.
        Ok(rows
            .iter()
            .map(|(r, _)| new.remove(&(r.time, r.idh)))
            .collect())
    }) {
        return r;
    }
    rows.iter()
        .zip(&ids)
        .map(|((r, _), t)| {
            Ok(c.execute(
                INSERT_EVENT,
                args![
                    r.time,
                    r.idh,
                    received(r),
                    r.class_uid,
                    t[0],
                    t[1],
                    t[2],
                    t[3],
                    t[4],
                    t[5],
                    t[6],
                    t[7],
                    t[8],
                    t[9],
                    t[10],
                    t[11],
                    t[12],
                    r.url,
                    r.file_names,
                    r.message,
                    r.body,
                ],
            )? == 1)
        })
        .collect()
}

/// Stores parsed events in `tx` (the part of ingestion that holds the writer).
fn store_rows(
    tx: &Conn,
    rows: Vec<(Row, Event)>,
    opts: IngestOptions<'_>,
    out: &mut IngestOutcome,
    terms: &terms::Terms,
) -> Result<(), StoreError> {
    let now = now_ms();
    let fresh = insert_events(tx, &rows, now, terms)?;
    for ((r, _), new) in rows.iter().zip(&fresh) {
        if !*new {
            out.duplicates += 1;
            continue;
        }
        out.accepted += 1;
        for b in &r.sealed {
            match opts.sealed {
                Some(keep) => match keep(tx, b) {
                    Ok(()) => out.releases += 1,
                    Err(why) => {
                        out.releases_refused += 1;
                        tracing::warn!(
                            event = %b.event_id,
                            release = %b.file.release_id,
                            %why,
                            "a protected file's sealed passwords were not kept"
                        );
                    }
                },
                None => out.releases_refused += 1,
            }
        }
        if opts.collect_new {
            out.new_events.push(bytes::Bytes::from(r.json.clone()));
        }
    }
    let agent = opts.agent.map(|a| a.id.as_str());
    update_devices(tx, rows.iter().map(|(_, e)| e), agent, now)?;
    if let Some(agent) = agent {
        tx.execute(
            "UPDATE agents SET last_seen = ?1 WHERE id = ?2",
            args![now, agent],
        )?;
    }
    if opts.collect_parsed {
        out.new_parsed = rows
            .into_iter()
            .zip(fresh)
            .filter_map(|((_, e), new)| new.then_some(e))
            .collect();
    }
    Ok(())
}

/// One stored event: the columns the lists show, and its JSON.
#[derive(Debug, Clone, Serialize)]
pub struct EventRow {
    /// The id's 64-bit hash ([`id_hash`]): with the time, the event's key in the store and
    /// the order of events of the same millisecond.
    pub key: i64,
    /// Event id.
    pub id: String,
    /// Unix ms.
    pub time: i64,
    /// OCSF class.
    pub class_uid: i64,
    /// Activity (`download`, `upload`, ... or the OCSF activity name, lower case).
    pub activity: String,
    /// Action taken.
    pub action: String,
    /// Deciding policy.
    pub policy: String,
    /// App id.
    pub app: String,
    /// User (lower case).
    pub user: String,
    /// Groups as `|a|b|`.
    pub groups: String,
    /// Agent id.
    pub device_uid: String,
    /// Host name.
    pub hostname: String,
    /// Client address.
    pub src_ip: String,
    /// Process name.
    pub process: String,
    /// Request URL.
    pub url: String,
    /// File names as `|a|b|`.
    pub file_names: String,
    /// Label GUIDs, ids and names as `|a|b|`.
    pub labels: String,
    /// Summary.
    pub message: String,
    /// The whole event, as JSON text.
    pub json: String,
}

/// The stored event `(idh, body)` of `r` as a row of results (its columns derived from its JSON
/// as at ingestion).
fn event_row(c: &Conn, codec: &codec::Codec, r: &crate::db::Row) -> Result<EventRow, DbError> {
    let key: i64 = r.get(0)?;
    let body: Vec<u8> = r.get(1)?;
    let json = codec.decode(c, &body)?;
    let e: Event = serde_json::from_slice(&json)
        .map_err(|e| DbError::Invalid(format!("stored event {key}: {e}")))?;
    let row = row_of(&e, json).map_err(DbError::Invalid)?;
    Ok(EventRow {
        key,
        id: row.id,
        time: row.time,
        class_uid: row.class_uid,
        activity: row.activity,
        action: row.action,
        policy: row.policy,
        app: row.app,
        user: row.user,
        groups: row.groups,
        device_uid: row.device_uid,
        hostname: row.hostname,
        src_ip: row.src_ip,
        process: row.process,
        url: row.url,
        file_names: row.file_names,
        labels: row.labels,
        message: row.message,
        json: String::from_utf8(row.json).unwrap_or_default(),
    })
}

/// A keyset pagination cursor: the last row of a page, `time.key` as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// Time of the last row.
    pub time: i64,
    /// Key of the last row ([`EventRow::key`]).
    pub key: i64,
}

impl Cursor {
    /// Parses `time.key`.
    pub fn parse(text: &str) -> Option<Self> {
        let (t, k) = text.split_once('.')?;
        Some(Self {
            time: t.parse().ok()?,
            key: k.parse().ok()?,
        })
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.time, self.key)
    }
}

/// One page of a search, newest first.
#[derive(Debug, Clone)]
pub struct Page {
    /// The events.
    pub events: Vec<EventRow>,
    /// Where the next (older) page starts, when there may be one.
    pub next: Option<Cursor>,
}

/// A device as the inventory knows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceRow {
    /// Agent id.
    pub uid: String,
    /// Host name.
    pub hostname: String,
    /// `managed`, `compliant`, `unmanaged`.
    pub posture: String,
    /// Operating system.
    pub os: String,
    /// Agent version.
    pub agent_version: String,
    /// Bundle revision in force.
    pub bundle_revision: String,
    /// Last event or call, Unix ms.
    pub last_seen: i64,
    /// The agent's group, when it is enrolled here.
    pub group: Option<String>,
    /// When the agent was revoked, Unix ms.
    pub revoked_at: Option<i64>,
    /// The last posture report (JSON).
    pub posture_json: Option<String>,
    /// The last status report (JSON).
    pub status_json: Option<String>,
    /// Not seen for [`STALE_MS`].
    pub stale: bool,
}

/// A device not seen for this long (Unix ms) is stale.
pub const STALE_MS: i64 = 15 * 60 * 1000;

/// An enrolled agent.
#[derive(Debug, Clone, Serialize)]
pub struct AgentRow {
    /// Agent id.
    pub id: String,
    /// Host name at enrollment.
    pub hostname: String,
    /// Group.
    pub group: String,
    /// Agent version at enrollment.
    pub agent_version: String,
    /// Unix ms.
    pub enrolled_at: i64,
    /// Unix ms, when revoked.
    pub revoked_at: Option<i64>,
    /// Last authenticated call, Unix ms.
    pub last_seen: Option<i64>,
}

/// Result of checking an agent credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAuth {
    /// A valid, enrolled agent.
    Valid {
        /// Agent id.
        id: String,
        /// Its group.
        group: String,
        /// The host name it enrolled with.
        hostname: String,
    },
    /// Known but revoked.
    Revoked,
    /// Known, but it stopped being accepted at this time (Unix ms).
    Expired(i64),
    /// Not a credential this collector issued.
    Unknown,
}

/// A saved query.
#[derive(Debug, Clone, Serialize)]
pub struct SavedQuery {
    /// Row id.
    pub id: i64,
    /// Unique name.
    pub name: String,
    /// Query text.
    pub query: String,
    /// Who saved it.
    pub created_by: String,
    /// Unix ms.
    pub created_at: i64,
}

/// A published bundle (without its bytes).
#[derive(Debug, Clone, Serialize)]
pub struct BundleRow {
    /// Identity.
    #[serde(flatten)]
    pub published: Published,
    /// Unix ms.
    pub published_at: i64,
}

/// One bucket of the activity chart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Bucket {
    /// Bucket start, Unix ms.
    pub t: i64,
    /// Events in it.
    pub activities: u64,
    /// Blocked events in it.
    pub blocks: u64,
}

impl Lite {
    fn take_reader(&self) -> rusqlite::Result<Connection> {
        let pooled = self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
        if let Some(c) = pooled {
            return Ok(c);
        }
        let c = Connection::open_with_flags(
            &self.path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX
                | rusqlite::OpenFlags::SQLITE_OPEN_URI,
        )?;
        configure(&c, 64 * 1024)?;
        c.set_prepared_statement_cache_capacity(64);
        Ok(c)
    }

    fn give_reader(&self, c: Connection) {
        let mut pool = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < READERS {
            pool.push(c);
        }
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path`, in WAL mode, and runs the store's and
    /// the portal's migrations.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, &[])
    }

    /// Opens (creating) the database at `path` and applies the store's migrations, then
    /// `extra` (another part's tables, e.g. the portal's accounts), each recorded by name.
    pub fn open_with(path: &Path, extra: &[(&str, &str)]) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let mut writer = Connection::open(path)?;
        let mode: String = writer.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Invalid(format!(
                "{}: could not switch to WAL (journal_mode is {mode})",
                path.display()
            )));
        }
        configure(&writer, 256 * 1024)?;
        // A checkpoint writes each changed page once however many transactions changed it, so
        // a larger WAL (256 MiB) turns the many rewrites of hot index pages into one.
        writer.pragma_update(None, "wal_autocheckpoint", 65536)?;
        writer.set_prepared_statement_cache_capacity(64);
        migrate(&mut writer, MIGRATIONS)?;
        migrate(&mut writer, extra)?;
        let enc = Encoding {
            codec: codec::Codec::load(&Conn::lite(&writer), now_ms())?,
            terms: terms::Terms::default(),
        };
        let store = Self {
            backend: Backend::Lite(Lite {
                path: path.to_owned(),
                writer: Mutex::new(writer),
                readers: Mutex::new(Vec::new()),
            }),
            enc,
        };
        store.convert_v1()?;
        Ok(store)
    }

    /// Opens the PostgreSQL database `conninfo` (a `postgresql://` URL or `key=value` pairs)
    /// shared with other collectors, with at most `max_connections` connections, and applies
    /// the store's migrations and `extra`.
    pub fn open_postgres(
        conninfo: &str,
        max_connections: usize,
        retention_days: u32,
        extra: &[(&str, &str)],
    ) -> Result<Self, StoreError> {
        Self::open_postgres_with(conninfo, max_connections, retention_days, None, extra)
    }

    /// [`Store::open_postgres`] verifying the server's certificate against `ca_file` (else
    /// the system's roots).
    pub fn open_postgres_with(
        conninfo: &str,
        max_connections: usize,
        retention_days: u32,
        ca_file: Option<&Path>,
        extra: &[(&str, &str)],
    ) -> Result<Self, StoreError> {
        let pg = pg::Pg::open(
            conninfo,
            max_connections,
            retention_days,
            ca_file,
            &[MIGRATIONS, extra],
        )?;
        let enc = Encoding {
            codec: pg.with_read(|c| codec::Codec::load(c, now_ms()))?,
            terms: terms::Terms::default(),
        };
        let store = Self {
            backend: Backend::Pg(Box::new(pg)),
            enc,
        };
        store.convert_v1()?;
        Ok(store)
    }

    /// The SQLite database file; `None` on PostgreSQL.
    pub fn path(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Lite(l) => Some(&l.path),
            Backend::Pg(_) => None,
        }
    }

    /// Where the store is, for people: the SQLite file, or the PostgreSQL database.
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Lite(l) => format!("sqlite {}", l.path.display()),
            Backend::Pg(p) => p.target.clone(),
        }
    }

    /// Bytes the store takes on disk: SQLite's file and its write-ahead log, or the PostgreSQL
    /// database (all its tables and indexes).
    pub fn disk_bytes(&self) -> Result<u64, StoreError> {
        match &self.backend {
            Backend::Lite(l) => Ok(["", "-wal"]
                .iter()
                .filter_map(|suffix| {
                    std::fs::metadata(PathBuf::from(format!("{}{suffix}", l.path.display()))).ok()
                })
                .map(|m| m.len())
                .sum()),
            Backend::Pg(p) => Ok(p.with_read(|c| {
                c.query_row(
                    "SELECT pg_database_size(current_database())",
                    args![],
                    |r| r.get::<i64>(0),
                )
            })? as u64),
        }
    }

    /// The PostgreSQL store, when this is one.
    pub fn postgres(&self) -> Option<&pg::Pg> {
        match &self.backend {
            Backend::Lite(_) => None,
            Backend::Pg(p) => Some(p),
        }
    }

    /// Runs `f` on a read-write connection. On SQLite that is the single writer (one at a time:
    /// keep it short, ingestion waits meanwhile); each statement commits on its own.
    pub fn with_conn<T>(&self, f: impl FnOnce(&Conn) -> Result<T, DbError>) -> Result<T, DbError> {
        match &self.backend {
            Backend::Lite(l) => {
                let conn = l.writer.lock().unwrap_or_else(|p| p.into_inner());
                f(&Conn::lite(&conn))
            }
            Backend::Pg(p) => p.with_read(f),
        }
    }

    /// Runs `f` in a transaction, committed when `f` succeeds.
    pub fn with_write<T, E: From<DbError>>(
        &self,
        f: impl FnOnce(&Conn) -> Result<T, E>,
    ) -> Result<T, E> {
        match &self.backend {
            Backend::Lite(l) => {
                let mut conn = l.writer.lock().unwrap_or_else(|p| p.into_inner());
                let tx = conn.transaction().map_err(DbError::from)?;
                let out = f(&Conn::lite(&tx))?;
                tx.commit().map_err(DbError::from)?;
                Ok(out)
            }
            Backend::Pg(p) => p.with_write(f),
        }
    }

    /// Runs `f` on a pooled connection for reading (on SQLite a read-only reader, concurrent
    /// with writes).
    pub fn with_read<T>(&self, f: impl FnOnce(&Conn) -> Result<T, DbError>) -> Result<T, DbError> {
        match &self.backend {
            Backend::Lite(l) => {
                let conn = l.take_reader()?;
                let out = f(&Conn::lite(&conn));
                l.give_reader(conn);
                out
            }
            Backend::Pg(p) => p.with_read(f),
        }
    }

    /// Sends notification `channel` to every collector on the same PostgreSQL database when
    /// `c`'s transaction commits (nothing on SQLite: one collector).
    pub fn notify(c: &Conn, channel: &str) -> Result<(), DbError> {
        if c.is_pg() {
            c.execute("SELECT pg_notify(?1, '')", args![channel])?;
        }
        Ok(())
    }

    /// Ingests a JSON Lines body of events in one transaction. Lines that are not valid events
    /// are counted as rejected; events whose id is already stored are counted as duplicates.
    pub fn ingest(
        &self,
        body: &[u8],
        opts: IngestOptions<'_>,
    ) -> Result<IngestOutcome, StoreError> {
        let (rows, mut out) = parse_body(body, opts.agent, &self.enc.codec);
        let samples = rows
            .iter()
            .map(|(r, _)| self.enc.codec.offer(&r.json))
            .find(Option::is_some)
            .flatten();
        self.store_parsed(rows, opts, &mut out)?;
        if let Some(samples) = samples {
            match self.with_conn(|c| self.enc.codec.train(c, &samples, now_ms())) {
                Ok(id) => tracing::info!(
                    dictionary = id,
                    samples = samples.len(),
                    "event bodies are compressed with a dictionary trained on this store's events"
                ),
                Err(e) => tracing::warn!(error = %e, "training a dictionary for event bodies"),
            }
        }
        Ok(out)
    }

    fn store_parsed(
        &self,
        rows: Vec<(Row, Event)>,
        opts: IngestOptions<'_>,
        out: &mut IngestOutcome,
    ) -> Result<(), StoreError> {
        if let Backend::Pg(p) = &self.backend {
            let days = rows
                .iter()
                .map(|(r, _)| r.time.div_euclid(pg::DAY_MS))
                .collect();
            p.ensure_days(&days, now_ms())?;
        }
        self.with_write(|tx| store_rows(tx, rows, opts, out, &self.enc.terms))
    }

    /// Moves the events of the table before `0002_compact_events` (`events_v1`, when there is
    /// one) into the current table, in batches (idempotent: an interrupted move starts over
    /// and skips what it stored), then drops it.
    fn convert_v1(&self) -> Result<(), StoreError> {
        let exists: i64 = self.with_read(|c| {
            let sql = if c.is_pg() {
                "SELECT count(*) FROM pg_class WHERE relname = 'events_v1' \
                 AND relnamespace = to_regnamespace(current_schema())::oid"
            } else {
                "SELECT count(*) FROM sqlite_schema WHERE name = 'events_v1'"
            };
            c.query_row(sql, args![], |r| r.get(0))
        })?;
        if exists == 0 {
            return Ok(());
        }
        tracing::info!("moving stored events into the compact table");
        let (mut moved, mut pending) = (0u64, Vec::<(i64, Vec<u8>)>::new());
        let mut flush = |pending: &mut Vec<(i64, Vec<u8>)>| -> Result<(), StoreError> {
            let mut out = IngestOutcome::default();
            let lines: Vec<&[u8]> = pending.iter().map(|(_, j)| j.as_slice()).collect();
            let parsed = parse_lines(&lines, None, &self.enc.codec);
            let mut rows = Vec::with_capacity(parsed.len());
            for (p, (received, _)) in parsed.into_iter().zip(pending.iter()) {
                match p {
                    Ok((mut r, e)) => {
                        r.received = *received;
                        rows.push((r, e));
                    }
                    Err(why) => tracing::warn!(%why, "a stored event could not be moved"),
                }
            }
            self.store_parsed(rows, IngestOptions::default(), &mut out)?;
            moved += out.accepted;
            pending.clear();
            Ok(())
        };
        let mut failed = None;
        self.with_read(|c| {
            c.for_each(
                "SELECT received, json FROM events_v1 ORDER BY time",
                args![],
                |r| {
                    pending.push((r.get(0)?, r.get(1)?));
                    if pending.len() >= 5_000
                        && let Err(e) = flush(&mut pending)
                    {
                        failed = Some(e);
                        return Ok(false);
                    }
                    Ok(true)
                },
            )
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        flush(&mut pending)?;
        self.with_write(|c| c.batch("DROP TABLE events_v1"))?;
        tracing::info!(events = moved, "stored events moved into the compact table");
        Ok(())
    }

    /// [`Store::ingest`] within the caller's transaction (from [`Store::with_write`]), for
    /// events that belong with the other rows it writes (an alert and its activity-log event:
    /// one commit instead of two). Parses on the caller's thread, while holding the writer:
    /// for a few events only.
    pub fn ingest_in(
        &self,
        tx: &Conn,
        body: &[u8],
        opts: IngestOptions<'_>,
    ) -> Result<IngestOutcome, StoreError> {
        let lines = split_lines(body);
        let (rows, mut out) = keep_parsed(parse_lines(&lines, opts.agent, &self.enc.codec));
        store_rows(tx, rows, opts, &mut out, &self.enc.terms)?;
        Ok(out)
    }

    /// The JSON of a stored event body (the `body` column).
    pub fn body_json(&self, c: &Conn, body: &[u8]) -> Result<Vec<u8>, DbError> {
        Ok(self.enc.codec.decode(c, body)?)
    }

    /// The newest events matching `q`, older than `before`, at most `limit`.
    pub fn search(
        &self,
        q: &Compiled,
        limit: u32,
        before: Option<Cursor>,
    ) -> Result<Page, StoreError> {
        Ok(self.with_read(|c| search_on(c, &self.enc.codec, q, limit, before))?)
    }

    /// How many events match `q` (a full count: ask only when it is wanted).
    pub fn count(&self, q: &Compiled) -> Result<u64, StoreError> {
        Ok(self.with_read(|c| {
            let sql = format!("SELECT count(*) FROM events WHERE {}", q.sql);
            c.query_row(&sql, q.args(), |r| r.get::<i64>(0))
        })? as u64)
    }

    /// Calls `f` with successive pages (newest first) of every event matching `q`, on one
    /// reader connection, until the end or until `f` returns `false`. Memory stays bounded by
    /// one page.
    pub fn for_each_page(
        &self,
        q: &Compiled,
        page: u32,
        mut f: impl FnMut(&[EventRow]) -> bool,
    ) -> Result<(), StoreError> {
        self.with_read(|c| {
            let mut before = None;
            loop {
                let p = search_on(c, &self.enc.codec, q, page, before)?;
                if !p.events.is_empty() && !f(&p.events) {
                    return Ok(());
                }
                match p.next {
                    Some(n) => before = Some(n),
                    None => return Ok(()),
                }
            }
        })
        .map_err(StoreError::from)
    }

    /// One event by id (a scan of the `(time, id)` index; prefer [`Store::get_event_at`]).
    pub fn get_event(&self, id: &str) -> Result<Option<EventRow>, StoreError> {
        self.get_event_at(id, None)
    }

    /// One event by id and, when known, its time (Unix ms): then a single index probe.
    pub fn get_event_at(
        &self,
        id: &str,
        time: Option<i64>,
    ) -> Result<Option<EventRow>, StoreError> {
        let idh = id_hash(id);
        let row = |r: &crate::db::Row, c: &Conn| event_row(c, &self.enc.codec, r);
        let found = self.with_read(|c| match time {
            Some(t) => c.query_map(
                &format!("SELECT {ROW_COLUMNS} FROM events WHERE time = ?1 AND idh = ?2"),
                args![t, idh],
                |r| row(r, c),
            ),
            // SQLite: the covering `(time, idh)` index is the smallest to scan. PostgreSQL scans
            // each partition's.
            None if c.is_pg() => c.query_map(
                &format!("SELECT {ROW_COLUMNS} FROM events WHERE idh = ?1"),
                args![idh],
                |r| row(r, c),
            ),
            None => c.query_map(
                &format!(
                    "SELECT {ROW_COLUMNS} FROM events WHERE seq IN (SELECT seq FROM events \
                     INDEXED BY events_time_idh WHERE idh = ?1)"
                ),
                args![idh],
                |r| row(r, c),
            ),
        })?;
        // The hash picked the rows; the id decides.
        Ok(found.into_iter().find(|e| e.id == id))
    }

    /// Counts of events and blocks per `bucket_ms` between `from` and `to` (Unix ms) among the
    /// events matching `q`.
    pub fn stats(
        &self,
        q: &Compiled,
        bucket_ms: i64,
        from: i64,
        to: i64,
    ) -> Result<Vec<Bucket>, StoreError> {
        if bucket_ms <= 0 {
            return Err(StoreError::Invalid("bucket must be positive".into()));
        }
        // The query's anonymous `?` parameters number on from ?3 (SQLite gives a bare `?` the
        // largest number so far plus one), so they bind after the three fixed ones.
        let sql = format!(
            "SELECT (time / ?1) * ?1 AS b, count(*), count(CASE WHEN action_t = \
             (SELECT id FROM terms WHERE kind = {} AND value = 'block') THEN 1 END) \
             FROM events WHERE time >= ?2 AND time < ?3 AND ({}) GROUP BY b ORDER BY b",
            terms::ACTION,
            q.sql
        );
        let mut params: Vec<Val> = vec![bucket_ms.into(), from.into(), to.into()];
        params.extend(q.params.iter().cloned());
        let params: Vec<&dyn crate::db::Param> =
            params.iter().map(|p| p as &dyn crate::db::Param).collect();
        Ok(self.with_read(|c| {
            c.query_map(&sql, &params, |r| {
                Ok(Bucket {
                    t: r.get(0)?,
                    activities: r.get::<i64>(1)? as u64,
                    blocks: r.get::<Option<i64>>(2)?.unwrap_or(0) as u64,
                })
            })
        })?)
    }

    /// Deletes events older than `cutoff` (Unix ms) in batches of `batch`, releasing the writer
    /// between batches so ingestion goes on. Returns how many were deleted.
    pub fn purge_older_than(&self, cutoff: i64, batch: u32) -> Result<u64, StoreError> {
        if let Backend::Pg(p) = &self.backend {
            return Ok(p.purge_older_than(cutoff, batch)?);
        }
        let mut total = 0u64;
        loop {
            let n = self.with_conn(|c| {
                c.execute(
                    "DELETE FROM events WHERE seq IN \
                     (SELECT seq FROM events WHERE time < ?1 ORDER BY time LIMIT ?2)",
                    args![cutoff, i64::from(batch)],
                )
            })?;
            total += n;
            if n < u64::from(batch) {
                return Ok(total);
            }
            std::thread::yield_now();
        }
    }

    /// Creates a one-time enrollment token for `group`, valid for `ttl_ms`. Returns the token
    /// (only its hash is stored).
    pub fn create_enroll_token(&self, group: &str, ttl_ms: i64) -> Result<String, StoreError> {
        if !valid_group(group) {
            return Err(StoreError::Invalid(format!("invalid group name {group:?}")));
        }
        let token = random_secret("sle_")?;
        let now = now_ms();
        self.with_conn(|c| {
            c.execute(
                "INSERT INTO enroll_tokens(token_sha256, grp, created_at, expires_at) \
                 VALUES (?1, ?2, ?3, ?4)",
                args![
                    sha256_hex(token.as_bytes()),
                    group,
                    now,
                    now.saturating_add(ttl_ms)
                ],
            )
        })?;
        Ok(token)
    }

    /// Redeems an enrollment token (once) and creates the agent and its credential.
    pub fn enroll(
        &self,
        token: &str,
        hostname: &str,
        agent_version: &str,
        credential_ms: i64,
    ) -> Result<EnrollResponse, StoreError> {
        let hash = sha256_hex(token.as_bytes());
        let agent_id = random_secret("ag_")?
            .chars()
            .take(3 + 24)
            .collect::<String>();
        let credential = random_secret("slc_")?;
        let now = now_ms();
        let hostname: String = hostname.chars().take(255).collect();
        let version: String = agent_version.chars().take(64).collect();
        self.with_write(|tx| {
        // Two collectors redeeming one token at once: the second waits for the first's row
        // (SQLite has one writer anyway).
        let lock = if tx.is_pg() { " FOR UPDATE" } else { "" };
        let row: Option<(String, i64, Option<i64>)> = tx
            .query_row(
                &format!(
                    "SELECT grp, expires_at, used_at FROM enroll_tokens WHERE token_sha256 = ?1{lock}"
                ),
                args![hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let group = match row {
            None => return Err(StoreError::TokenRefused("unknown token")),
            Some((_, _, Some(_))) => return Err(StoreError::TokenRefused("token already used")),
            Some((_, exp, None)) if exp <= now => {
                return Err(StoreError::TokenRefused("token expired"));
            }
            Some((g, _, None)) => g,
        };
        tx.execute(
            "UPDATE enroll_tokens SET used_at = ?1, used_by = ?2 WHERE token_sha256 = ?3",
            args![now, agent_id, hash],
        )?;
        let expires = now.saturating_add(credential_ms);
        tx.execute(
            "INSERT INTO agents(id, hostname, grp, credential_sha256, agent_version, enrolled_at, \
             credential_expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            args![
                agent_id,
                hostname,
                group,
                sha256_hex(credential.as_bytes()),
                version,
                now,
                expires
            ],
        )?;
        Ok(EnrollResponse {
            agent_id,
            credential,
            group,
            credential_expires_at: u64::try_from(expires / 1000).ok(),
        })
        })
    }

    /// Checks an agent credential and records the agent as seen.
    pub fn authenticate_agent(&self, credential: &str) -> Result<AgentAuth, StoreError> {
        let hash = sha256_hex(credential.as_bytes());
        let now = now_ms();
        type AgentRowAuth = (String, String, Option<i64>, String, Option<i64>);
        let row: Option<AgentRowAuth> = self.with_read(|c| {
            let current = c
                .query_row(
                    "SELECT id, grp, revoked_at, hostname, credential_expires_at FROM agents \
                     WHERE credential_sha256 = ?1",
                    args![hash],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                )
                .optional()?;
            if current.is_some() {
                return Ok(current);
            }
            // The credential a renewal replaced, in its grace.
            c.query_row(
                "SELECT id, grp, revoked_at, hostname, previous_valid_until FROM agents \
                 WHERE previous_credential_sha256 = ?1",
                args![hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()
        })?;
        Ok(match row {
            None => AgentAuth::Unknown,
            Some((_, _, Some(_), _, _)) => AgentAuth::Revoked,
            Some((_, _, None, _, Some(until))) if until <= now => AgentAuth::Expired(until),
            Some((id, group, None, hostname, _)) => AgentAuth::Valid {
                id,
                group,
                hostname,
            },
        })
    }

    /// Issues agent `id` a new credential lasting `credential_ms`, in exchange for `current`:
    /// its valid current credential (which stays accepted for [`RENEW_GRACE_MS`]), or the one a
    /// renewal replaced, in its grace (the answer to that renewal was lost: the credential it
    /// issued is replaced in turn). None when `current` is neither, or the agent is revoked.
    pub fn renew_agent(
        &self,
        id: &str,
        current: &str,
        credential_ms: i64,
    ) -> Result<Option<(String, i64)>, StoreError> {
        let credential = random_secret("slc_")?;
        let now = now_ms();
        let expires = now.saturating_add(credential_ms);
        let (new_hash, cur_hash) = (
            sha256_hex(credential.as_bytes()),
            sha256_hex(current.as_bytes()),
        );
        let n = self.with_write(|c| {
            let n = c.execute(
                "UPDATE agents SET previous_credential_sha256 = credential_sha256, \
                 previous_valid_until = ?1, credential_sha256 = ?2, credential_expires_at = ?3 \
                 WHERE id = ?4 AND credential_sha256 = ?5 AND revoked_at IS NULL \
                 AND (credential_expires_at IS NULL OR credential_expires_at > ?6)",
                args![
                    now.saturating_add(RENEW_GRACE_MS),
                    new_hash,
                    expires,
                    id,
                    cur_hash,
                    now
                ],
            )?;
            if n == 1 {
                return Ok(n);
            }
            c.execute(
                "UPDATE agents SET credential_sha256 = ?1, credential_expires_at = ?2 \
                 WHERE id = ?3 AND previous_credential_sha256 = ?4 AND revoked_at IS NULL \
                 AND previous_valid_until > ?5",
                args![new_hash, expires, id, cur_hash, now],
            )
        })?;
        Ok((n == 1).then_some((credential, expires)))
    }

    /// Records that agent `id` called now.
    pub fn touch_agent(&self, id: &str) -> Result<(), StoreError> {
        self.with_conn(|c| {
            c.execute(
                "UPDATE agents SET last_seen = ?1 WHERE id = ?2",
                args![now_ms(), id],
            )
        })?;
        Ok(())
    }

    /// Revokes agent `id`; false when there is no such agent.
    pub fn revoke_agent(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.with_conn(|c| {
            c.execute(
                "UPDATE agents SET revoked_at = coalesce(revoked_at, ?1) WHERE id = ?2",
                args![now_ms(), id],
            )
        })? == 1)
    }

    /// Every enrolled agent, newest first.
    pub fn agents(&self) -> Result<Vec<AgentRow>, StoreError> {
        Ok(self.with_read(|c| {
            c.query_map(
                "SELECT id, hostname, grp, agent_version, enrolled_at, revoked_at, last_seen \
                 FROM agents ORDER BY enrolled_at DESC, id",
                args![],
                |r| {
                    Ok(AgentRow {
                        id: r.get(0)?,
                        hostname: r.get(1)?,
                        group: r.get(2)?,
                        agent_version: r.get(3)?,
                        enrolled_at: r.get(4)?,
                        revoked_at: r.get(5)?,
                        last_seen: r.get(6)?,
                    })
                },
            )
        })?)
    }

    /// The device inventory, most recently seen first.
    pub fn devices(&self) -> Result<Vec<DeviceRow>, StoreError> {
        let now = now_ms();
        Ok(self.with_read(|c| {
            c.query_map(
                "SELECT d.uid, d.hostname, d.posture, d.os, d.agent_version, d.bundle_revision, \
                 CASE WHEN d.last_seen > coalesce(a.last_seen, 0) THEN d.last_seen \
                 ELSE coalesce(a.last_seen, 0) END, a.grp, a.revoked_at, d.posture_json, \
                 d.status_json FROM devices d LEFT JOIN agents a ON a.id = d.uid \
                 UNION ALL \
                 SELECT a.id, a.hostname, '', '', a.agent_version, '', coalesce(a.last_seen, \
                 a.enrolled_at), a.grp, a.revoked_at, NULL, NULL FROM agents a \
                 WHERE a.id NOT IN (SELECT uid FROM devices) \
                 ORDER BY 7 DESC",
                args![],
                |r| {
                    Ok(DeviceRow {
                        uid: r.get(0)?,
                        hostname: r.get(1)?,
                        posture: r.get(2)?,
                        os: r.get(3)?,
                        agent_version: r.get(4)?,
                        bundle_revision: r.get(5)?,
                        last_seen: r.get(6)?,
                        group: r.get(7)?,
                        revoked_at: r.get(8)?,
                        posture_json: r.get(9)?,
                        status_json: r.get(10)?,
                        stale: now.saturating_sub(r.get::<i64>(6)?) > STALE_MS,
                    })
                },
            )
        })?)
    }

    /// Creates an API token named `name`; returns it (only its hash is stored).
    pub fn create_api_token(&self, name: &str) -> Result<String, StoreError> {
        let token = random_secret("sla_")?;
        self.with_conn(|c| {
            c.execute(
                "INSERT INTO api_tokens(name, token_sha256, created_at) VALUES (?1, ?2, ?3)",
                args![name, sha256_hex(token.as_bytes()), now_ms()],
            )
        })?;
        Ok(token)
    }

    /// Revokes every unrevoked API token named `name`; returns how many.
    pub fn revoke_api_token(&self, name: &str) -> Result<usize, StoreError> {
        Ok(self.with_conn(|c| {
            c.execute(
                "UPDATE api_tokens SET revoked_at = ?2 WHERE name = ?1 AND revoked_at IS NULL",
                args![name, now_ms()],
            )
        })? as usize)
    }

    /// API tokens: (name, created_at ms, revoked_at ms).
    pub fn api_tokens(&self) -> Result<Vec<(String, i64, Option<i64>)>, StoreError> {
        Ok(self.with_read(|c| {
            c.query_map(
                "SELECT name, created_at, revoked_at FROM api_tokens ORDER BY id",
                args![],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
        })?)
    }

    /// The name of the API token `token`, when it is valid.
    pub fn check_api_token(&self, token: &str) -> Result<Option<String>, StoreError> {
        let hash = sha256_hex(token.as_bytes());
        Ok(self.with_read(|c| {
            c.query_row(
                "SELECT name FROM api_tokens WHERE token_sha256 = ?1 AND revoked_at IS NULL",
                args![hash],
                |r| r.get(0),
            )
            .optional()
        })?)
    }

    /// Stores a published bundle (already verified by the caller).
    pub fn publish_bundle(
        &self,
        group: &str,
        revision: &str,
        bytes: Vec<u8>,
    ) -> Result<Published, StoreError> {
        let etag = format!("\"{}\"", &sha256_hex(&bytes)[..32]);
        let size = bytes.len() as u64;
        let id = self.with_write(|c| {
            let id = c.query_row(
                "INSERT INTO bundles(grp, revision, etag, size, bytes, published_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id",
                args![group, revision, etag, size as i64, bytes, now_ms()],
                |r| r.get::<i64>(0),
            )?;
            // Wakes the long polls held by the other collectors.
            Self::notify(c, NOTIFY_BUNDLES)?;
            Ok::<_, DbError>(id)
        })?;
        Ok(Published {
            id,
            group: group.to_owned(),
            revision: revision.to_owned(),
            etag,
            bytes: size,
        })
    }

    /// The current bundle of `group` (falling back to group `default`), without its bytes.
    pub fn current_bundle(&self, group: &str) -> Result<Option<Published>, StoreError> {
        Ok(self.with_read(|c| {
            c.query_row(
                "SELECT id, grp, revision, etag, size FROM bundles WHERE grp IN (?1, 'default') \
                 ORDER BY grp = ?1 DESC, id DESC LIMIT 1",
                args![group],
                |r| {
                    Ok(Published {
                        id: r.get(0)?,
                        group: r.get(1)?,
                        revision: r.get(2)?,
                        etag: r.get(3)?,
                        bytes: r.get::<i64>(4)? as u64,
                    })
                },
            )
            .optional()
        })?)
    }

    /// Every published bundle's id, oldest first.
    pub fn bundle_ids(&self) -> Result<Vec<i64>, StoreError> {
        Ok(self.with_read(|c| {
            c.query_map("SELECT id FROM bundles ORDER BY id", args![], |r| r.get(0))
        })?)
    }

    /// The bytes of bundle `id`.
    pub fn bundle_bytes(&self, id: i64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.with_read(|c| {
            c.query_row("SELECT bytes FROM bundles WHERE id = ?1", args![id], |r| {
                r.get(0)
            })
            .optional()
        })?)
    }

    /// The newest bundle row id (any group): changes whenever something is published.
    pub fn latest_bundle_id(&self) -> Result<i64, StoreError> {
        Ok(self.with_read(|c| {
            c.query_row("SELECT coalesce(max(id), 0) FROM bundles", args![], |r| {
                r.get(0)
            })
        })?)
    }

    /// Every published bundle, newest first.
    pub fn bundles(&self) -> Result<Vec<BundleRow>, StoreError> {
        Ok(self.with_read(|c| {
            c.query_map(
                "SELECT id, grp, revision, etag, size, published_at FROM bundles ORDER BY id DESC",
                args![],
                |r| {
                    Ok(BundleRow {
                        published: Published {
                            id: r.get(0)?,
                            group: r.get(1)?,
                            revision: r.get(2)?,
                            etag: r.get(3)?,
                            bytes: r.get::<i64>(4)? as u64,
                        },
                        published_at: r.get(5)?,
                    })
                },
            )
        })?)
    }

    /// Saved queries by name.
    pub fn saved_queries(&self) -> Result<Vec<SavedQuery>, StoreError> {
        Ok(self.with_read(|c| {
            c.query_map(
                "SELECT id, name, query, created_by, created_at FROM saved_queries ORDER BY name",
                args![],
                |r| {
                    Ok(SavedQuery {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        query: r.get(2)?,
                        created_by: r.get(3)?,
                        created_at: r.get(4)?,
                    })
                },
            )
        })?)
    }

    /// Saves a query (the caller has checked that it parses).
    pub fn save_query(
        &self,
        name: &str,
        query: &str,
        created_by: &str,
    ) -> Result<SavedQuery, StoreError> {
        if name.trim().is_empty() || name.len() > 200 {
            return Err(StoreError::Invalid(
                "a saved query needs a name of 1-200 characters".into(),
            ));
        }
        let now = now_ms();
        let r = self.with_conn(|c| {
            c.query_row(
                "INSERT INTO saved_queries(name, query, created_by, created_at) \
                 VALUES (?1, ?2, ?3, ?4) RETURNING id",
                args![name, query, created_by, now],
                |r| r.get::<i64>(0),
            )
        });
        match r {
            Ok(id) => Ok(SavedQuery {
                id,
                name: name.to_owned(),
                query: query.to_owned(),
                created_by: created_by.to_owned(),
                created_at: now,
            }),
            Err(e) if e.is_unique_violation() => Err(StoreError::NameTaken(name.to_owned())),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes saved query `id`; false when there is none.
    pub fn delete_query(&self, id: i64) -> Result<bool, StoreError> {
        Ok(
            self.with_conn(|c| c.execute("DELETE FROM saved_queries WHERE id = ?1", args![id]))?
                == 1,
        )
    }
}

fn search_on(
    c: &Conn,
    codec: &codec::Codec,
    q: &Compiled,
    limit: u32,
    before: Option<Cursor>,
) -> Result<Page, DbError> {
    let limit = limit.max(1);
    let mut params: Vec<Val> = q.params.clone();
    let n = params.len();
    let keyset = match before {
        Some(cur) => {
            params.push(cur.time.into());
            params.push(cur.key.into());
            format!(
                " AND time <= ?{a} AND (time < ?{a} OR idh < ?{b})",
                a = n + 1,
                b = n + 2
            )
        }
        None => String::new(),
    };
    params.push(i64::from(limit).into());
    let sql = format!(
        "SELECT {ROW_COLUMNS} FROM events WHERE ({}){keyset} ORDER BY time DESC, idh DESC \
         LIMIT ?{}",
        q.sql,
        params.len()
    );
    let params: Vec<&dyn crate::db::Param> =
        params.iter().map(|p| p as &dyn crate::db::Param).collect();
    let events: Vec<EventRow> = c.query_map(&sql, &params, |r| event_row(c, codec, r))?;
    let next = if events.len() as u32 == limit {
        events.last().map(|e| Cursor {
            time: e.time,
            key: e.key,
        })
    } else {
        None
    };
    Ok(Page { events, next })
}

fn update_devices<'a>(
    tx: &Conn,
    events: impl Iterator<Item = &'a Event>,
    agent: Option<&str>,
    now: i64,
) -> Result<(), DbError> {
    // Ordered by device, so that two collectors updating the same devices lock their rows in
    // the same order (no deadlock).
    use std::collections::BTreeMap as HashMap;
    // One upsert per device per batch: the newest event wins; posture and status from class 5001.
    let mut latest: HashMap<&str, &Event> = HashMap::new();
    let mut posture: HashMap<&str, &Event> = HashMap::new();
    for e in events {
        let uid = e.device.uid.as_str();
        if uid.is_empty() {
            continue;
        }
        if latest.get(uid).is_none_or(|p| p.time <= e.time) {
            latest.insert(uid, e);
        }
        if e.class_uid == CLASS_DEVICE_INVENTORY
            && posture.get(uid).is_none_or(|p| p.time <= e.time)
        {
            posture.insert(uid, e);
        }
    }
    let up = "INSERT INTO devices(uid, hostname, posture, os, agent_version, bundle_revision, last_seen) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT(uid) DO UPDATE SET \
         hostname = excluded.hostname, \
         posture = CASE WHEN excluded.posture <> '' THEN excluded.posture \
           ELSE devices.posture END, \
         os = CASE WHEN excluded.os <> '' THEN excluded.os ELSE devices.os END, \
         agent_version = CASE WHEN excluded.agent_version <> '' THEN excluded.agent_version \
           ELSE devices.agent_version END, \
         bundle_revision = CASE WHEN excluded.bundle_revision <> '' THEN excluded.bundle_revision \
           ELSE devices.bundle_revision END, \
         last_seen = CASE WHEN excluded.last_seen > devices.last_seen THEN excluded.last_seen \
           ELSE devices.last_seen END";
    for (uid, e) in &latest {
        let d = &e.device;
        let seen = agent.map_or(i64::try_from(e.time).unwrap_or(0), |_| now);
        tx.execute(
            up,
            args![
                uid,
                d.hostname,
                d.posture,
                d.os,
                d.agent_version,
                d.bundle_revision.clone().unwrap_or_default(),
                seen
            ],
        )?;
    }
    let pst = "UPDATE devices SET posture_json = coalesce(?2, posture_json), \
         status_json = coalesce(?3, status_json), \
         posture = CASE WHEN ?4 <> '' THEN ?4 ELSE posture END, \
         os = CASE WHEN ?5 <> '' THEN ?5 ELSE os END WHERE uid = ?1";
    for (uid, e) in &posture {
        let pj = e
            .posture
            .as_ref()
            .and_then(|p| serde_json::to_string(p).ok());
        let sj = e
            .agent_status
            .as_ref()
            .and_then(|s| serde_json::to_string(s).ok());
        let (p, os) = e
            .posture
            .as_ref()
            .map(|p| (p.posture.clone(), p.os_name.clone()))
            .unwrap_or_default();
        tx.execute(pst, args![uid, pj, sj, p, os])?;
    }
    Ok(())
}

/// Runs the migrations of `list` not yet recorded, in order, each in its own transaction.
fn migrate(conn: &mut Connection, list: &[(&str, &str)]) -> Result<(), StoreError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS migrations(name TEXT PRIMARY KEY, applied_at INTEGER NOT NULL)",
    )?;
    for (name, sql) in list {
        let tx = conn.transaction()?;
        let done: bool = tx.query_row(
            "SELECT count(*) FROM migrations WHERE name = ?1",
            [name],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if !done {
            tx.execute_batch(sql)
                .map_err(|e| StoreError::Invalid(format!("migration {name}: {e}")))?;
            tx.execute(
                "INSERT INTO migrations(name, applied_at) VALUES (?1, ?2)",
                rusqlite::params![name, now_ms()],
            )?;
            tracing::info!(migration = name, "applied");
        }
        tx.commit()?;
    }
    Ok(())
}
