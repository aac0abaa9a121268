//! What the proxy hands to reporting: one record per request and one per connection that was not
//! intercepted (spliced, rejected, refused). The reporter decides where records go; the default one
//! logs them.

use std::{net::SocketAddr, time::SystemTime};

use serde::Serialize;

use crate::{event::ActivityEvent, steer::OriginRecord};

/// One HTTP exchange through interception.
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    /// Unique id (also the incident id shown on pages).
    pub id: String,
    /// When the request head arrived.
    #[serde(with = "unix_ms")]
    pub time: SystemTime,
    /// Process and destination (shared by every request of the connection).
    pub origin: std::sync::Arc<OriginRecord>,
    /// Catalogued app id.
    pub app: String,
    /// SNI (or Host for plain HTTP).
    pub host: String,
    /// Method.
    pub method: String,
    /// Full URL as the client asked for it.
    pub url: String,
    /// Status sent to the client (0 when the client went away first).
    pub status: u16,
    /// Request body bytes sent upstream.
    pub bytes_up: u64,
    /// Response body bytes sent to the client.
    pub bytes_down: u64,
    /// Client-side protocol (`HTTP/1.1`, `HTTP/2`).
    pub client_protocol: String,
    /// Upstream protocol, when a request was sent.
    pub upstream_protocol: Option<String>,
    /// Time to the upstream response head, milliseconds.
    pub upstream_ms: Option<f64>,
    /// Time until the response body ended, milliseconds.
    pub total_ms: f64,
    /// `ok`, `answered` (a hook or the proxy answered), or an error kind (`certificate`,
    /// `connect`, `tls`, `http`, `host_mismatch`, `aborted`).
    pub outcome: String,
    /// Details of an error, for people.
    pub detail: Option<String>,
    /// SHA-256 of the request body as sent upstream (with `proxy.hash_bodies`).
    pub request_sha256: Option<String>,
    /// SHA-256 of the response body as sent to the client (with `proxy.hash_bodies`).
    pub response_sha256: Option<String>,
}

/// A connection handled without interception.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionRecord {
    /// When it was accepted.
    #[serde(with = "unix_ms")]
    pub time: SystemTime,
    /// The client address as accepted.
    pub peer: SocketAddr,
    /// The origin, when one was recorded.
    pub origin: Option<OriginRecord>,
    /// SNI, when a ClientHello was read.
    pub sni: Option<String>,
    /// `spliced`, `rejected`, `no_origin`, `loop`, `bad_client_hello`, `upstream_failed`,
    /// `leaf_failed`, `tls_failed`.
    pub action: String,
    /// Why (a splice reason or an error).
    pub reason: String,
    /// Bytes client to origin (spliced connections).
    pub bytes_up: u64,
    /// Bytes origin to client.
    pub bytes_down: u64,
    /// How a spliced connection's bytes went: `kernel` (joined in the kernel, never entering
    /// the proxy) or `user` (copied by the proxy).
    pub splice: Option<&'static str>,
}

/// Where records go.
pub trait Reporter: Send + Sync + 'static {
    /// A finished request.
    fn request(&self, rec: RequestRecord);
    /// Whether [`Reporter::request`] records go anywhere (they are not built otherwise). By
    /// default: whether the `sluice::record` log target is enabled at info.
    fn wants_requests(&self) -> bool {
        tracing::enabled!(target: "sluice::record", tracing::Level::INFO)
    }
    /// A connection that was not intercepted, or failed before HTTP.
    fn connection(&self, rec: ConnectionRecord);
    /// A request is over: its record (when [`Reporter::wants_requests`]) and the activity event
    /// its flow built (when the session controls looked at it), reported together.
    fn finished(&self, record: Option<RequestRecord>, activity: Option<ActivityEvent>) {
        if let Some(rec) = record {
            self.request(rec);
        }
        if let Some(ev) = activity {
            self.activity(ev);
        }
    }
    /// An activity the session controls saw, allowed or not.
    fn activity(&self, ev: ActivityEvent) {
        tracing::info!(
            target: "sluice::activity",
            id = %ev.id, app = %ev.app, activity = ?ev.activity, action = ev.action.as_str(),
            policy = ?ev.policy, user = ?ev.user, url = %ev.url, "activity"
        );
    }
}

/// Logs records with `tracing` (target `sluice::record`).
#[derive(Debug, Default)]
pub struct LogReporter;

impl Reporter for LogReporter {
    fn request(&self, r: RequestRecord) {
        tracing::info!(
            target: "sluice::record",
            id = %r.id, app = %r.app, method = %r.method, url = %r.url, status = r.status,
            pid = r.origin.tgid, uid = r.origin.uid, comm = %r.origin.comm, up = r.bytes_up, down = r.bytes_down,
            outcome = %r.outcome, "request"
        );
    }
    fn connection(&self, r: ConnectionRecord) {
        tracing::info!(
            target: "sluice::record",
            peer = %r.peer, sni = ?r.sni, action = %r.action, reason = %r.reason, splice = ?r.splice,
            pid = ?r.origin.as_ref().map(|o| o.tgid), "connection"
        );
    }
}

/// Logs records like [`LogReporter`] and appends activity events as JSON lines to a file.
#[derive(Debug)]
pub struct JsonLinesReporter {
    file: std::sync::Mutex<std::fs::File>,
    path: std::path::PathBuf,
}

impl JsonLinesReporter {
    /// Opens (creating, mode 0600) `path` for appending.
    pub fn open(path: &std::path::Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)?;
        Ok(Self {
            file: std::sync::Mutex::new(file),
            path: path.to_owned(),
        })
    }
}

impl Reporter for JsonLinesReporter {
    fn request(&self, rec: RequestRecord) {
        LogReporter.request(rec);
    }
    fn connection(&self, rec: ConnectionRecord) {
        LogReporter.connection(rec);
    }
    fn activity(&self, ev: ActivityEvent) {
        use std::io::Write as _;
        let mut line = match serde_json::to_vec(&ev) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "activity event not serialisable");
                return;
            }
        };
        line.push(b'\n');
        // One write per event keeps lines whole for readers tailing the file.
        let res = self
            .file
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_all(&line);
        if let Err(e) = res {
            tracing::error!(error = %e, path = %self.path.display(), "activity event not written");
        }
        LogReporter.activity(ev);
    }
}

mod unix_ms {
    use std::time::{SystemTime, UNIX_EPOCH};

    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let ms = t
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        s.serialize_u64(ms)
    }
}
