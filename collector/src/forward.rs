//! Forwarding to SIEMs: every stored event is handed, after its batch commits, to each configured
//! target's bounded in-memory queue; one task per target drains it.
//!
//! - Syslog: RFC 5424 messages, framed by octet counting (RFC 6587 §3.4.1) over TCP, or over TLS
//!   (RFC 5425). Facility local0; severity warning for blocks, informational otherwise. The
//!   structured data `[sluice@32473 ...]` (32473 is the documentation enterprise number of RFC
//!   5612) carries the event id, action, app, user and policy; the message is the event's JSON.
//! - Webhook: `POST` of a JSON array of events (at most `batch` per request), 2xx = delivered.
//!
//! A target gets events, alerts or both (`send`). An alert goes out when it is opened and when
//! its state changes: to syslog with the alert's severity (critical 2, high 3, medium 4, low 5),
//! MSGID `alert` and `[sluice@32473 alert=... detector=... severity=... user=... state=...]`,
//! the message being the alert's JSON; to a webhook as an object with `"type": "alert"` in the
//! same arrays as events.
//!
//! Failures are retried with exponential backoff (250 ms doubling to 30 s) for as long as it
//! takes, holding the batch in flight; meanwhile the queue fills, and once full new events are
//! dropped for that target and counted (`/api/v1/status`, and a warning in the log). The store
//! stays the record: forwarding is best effort with bounded memory, not a second spool. A syslog
//! batch whose write fails is sent again whole on a new connection, so a receiver may see some
//! events twice; what the kernel had already accepted when a connection broke may be lost (TCP
//! syslog acknowledges nothing more).

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use rustls_pki_types::ServerName;
use serde::Serialize;
use tokio::{
    io::{AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;

use crate::config::{ForwardConfig, Send as SendWhat, SyslogTarget, WebhookTarget};

/// One queued item: an event's JSON or an alert's.
#[derive(Debug, Clone)]
enum Item {
    Event(Bytes),
    Alert(Bytes),
}

impl Item {
    fn json(&self) -> &Bytes {
        match self {
            Item::Event(b) | Item::Alert(b) => b,
        }
    }

    fn syslog_frame(&self) -> Vec<u8> {
        match self {
            Item::Event(b) => syslog_frame(b),
            Item::Alert(b) => alert_frame(b),
        }
    }
}

/// Counters of one target.
#[derive(Debug, Default)]
struct TargetStats {
    sent: AtomicU64,
    dropped: AtomicU64,
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// What `/api/v1/status` shows of a target.
#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    /// `syslog host:port` or `webhook URL`.
    pub target: String,
    /// Events delivered.
    pub sent: u64,
    /// Events dropped because the queue was full.
    pub dropped: u64,
    /// Failed attempts (each retried).
    pub failures: u64,
    /// The last failure.
    pub last_error: Option<String>,
}

#[derive(Debug, Clone)]
enum Kind {
    Syslog(SyslogTarget),
    Webhook(WebhookTarget),
}

#[derive(Debug)]
struct Target {
    name: String,
    kind: Kind,
    send: SendWhat,
    tx: mpsc::Sender<Item>,
    rx: Mutex<Option<mpsc::Receiver<Item>>>,
    stats: Arc<TargetStats>,
}

/// The forwarding targets and their queues.
#[derive(Debug, Default)]
pub struct Forwarder {
    targets: Vec<Target>,
}

impl Forwarder {
    /// Queues for each configured target; the tasks start with [`Forwarder::start`].
    pub fn new(c: &ForwardConfig) -> Self {
        let mut targets = Vec::new();
        let kinds = c
            .syslog
            .iter()
            .map(|s| {
                (
                    format!("syslog {}", s.address),
                    s.send,
                    Kind::Syslog(s.clone()),
                )
            })
            .chain(c.webhook.iter().map(|w| {
                (
                    format!("webhook {}", w.url),
                    w.send,
                    Kind::Webhook(w.clone()),
                )
            }));
        for (name, send, kind) in kinds {
            let (tx, rx) = mpsc::channel(c.queue.max(1));
            targets.push(Target {
                name,
                kind,
                send,
                tx,
                rx: Mutex::new(Some(rx)),
                stats: Arc::default(),
            });
        }
        Self { targets }
    }

    /// Whether any target is configured.
    pub fn enabled(&self) -> bool {
        !self.targets.is_empty()
    }

    /// Whether any target wants events (ingestion then collects the stored events for it).
    pub fn wants_events(&self) -> bool {
        self.targets.iter().any(|t| t.send.events())
    }

    /// Queues stored events (their JSON) for every target that wants events; a full queue
    /// drops and counts.
    pub fn push(&self, events: &[Bytes]) {
        self.queue(events, SendWhat::events, Item::Event);
    }

    /// Queues alerts (their JSON, `"type": "alert"`) for every target that wants alerts.
    pub fn push_alerts(&self, alerts: &[Bytes]) {
        self.queue(alerts, SendWhat::alerts, Item::Alert);
    }

    fn queue(&self, items: &[Bytes], wants: fn(SendWhat) -> bool, item: fn(Bytes) -> Item) {
        for t in self.targets.iter().filter(|t| wants(t.send)) {
            let mut dropped = 0u64;
            for e in items {
                if t.tx.try_send(item(e.clone())).is_err() {
                    dropped += 1;
                }
            }
            if dropped > 0 {
                let total = t.stats.dropped.fetch_add(dropped, Relaxed) + dropped;
                tracing::warn!(target = %t.name, dropped, total, "forwarding queue full: events dropped");
            }
        }
    }

    /// Starts one task per target (once; later calls do nothing).
    pub fn start(&self, shutdown: &CancellationToken) {
        for t in &self.targets {
            let Some(rx) = t.rx.lock().unwrap_or_else(|p| p.into_inner()).take() else {
                continue;
            };
            let (kind, stats, name, shutdown) = (
                t.kind.clone(),
                t.stats.clone(),
                t.name.clone(),
                shutdown.clone(),
            );
            tokio::spawn(async move {
                let r = match kind {
                    Kind::Syslog(s) => syslog_task(s, rx, stats, shutdown).await,
                    Kind::Webhook(w) => webhook_task(w, rx, stats, shutdown).await,
                };
                if let Err(e) = r {
                    tracing::error!(target = %name, error = %e, "forwarder stopped");
                }
            });
        }
    }

    /// Counters per target.
    pub fn stats(&self) -> Vec<TargetReport> {
        self.targets
            .iter()
            .map(|t| TargetReport {
                target: t.name.clone(),
                sent: t.stats.sent.load(Relaxed),
                dropped: t.stats.dropped.load(Relaxed),
                failures: t.stats.failures.load(std::sync::atomic::Ordering::Acquire),
                last_error: t
                    .stats
                    .last_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
            })
            .collect()
    }
}

/// Exponential backoff between attempts.
#[derive(Debug)]
struct Backoff(Duration);

impl Backoff {
    const MIN: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_secs(30);

    fn new() -> Self {
        Self(Self::MIN)
    }

    /// Waits, then doubles; false when shut down meanwhile.
    async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let d = self.0;
        self.0 = (self.0 * 2).min(Self::MAX);
        tokio::select! {
            () = shutdown.cancelled() => false,
            () = tokio::time::sleep(d) => true,
        }
    }

    fn reset(&mut self) {
        self.0 = Self::MIN;
    }
}

fn failed(stats: &TargetStats, name: &str, e: &str) {
    tracing::warn!(target = name, error = e, "forwarding failed; retrying");
    // The error first: whoever sees the failure counted also sees why.
    *stats.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_owned());
    stats
        .failures
        .fetch_add(1, std::sync::atomic::Ordering::Release);
}

/// Waits for one event then takes whatever else is queued, up to `max`. None at shutdown or when
/// the queue is closed.
async fn next_batch(
    rx: &mut mpsc::Receiver<Item>,
    max: usize,
    shutdown: &CancellationToken,
) -> Option<Vec<Item>> {
    let first = tokio::select! {
        () = shutdown.cancelled() => return None,
        e = rx.recv() => e?,
    };
    let mut batch = vec![first];
    while batch.len() < max {
        match rx.try_recv() {
            Ok(e) => batch.push(e),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// Printable US-ASCII without spaces, at most `max`, `-` when empty (RFC 5424 header fields).
fn header_field(v: &str, max: usize) -> String {
    let s: String = v
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if s.is_empty() { "-".into() } else { s }
}

/// An SD-PARAM value with `"`, `\` and `]` escaped.
fn sd_value(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        if matches!(c, '"' | '\\' | ']') {
            s.push('\\');
        }
        s.push(c);
    }
    s
}

/// One RFC 5424 message for an event's JSON, octet-counted.
pub fn syslog_frame(event_json: &[u8]) -> Vec<u8> {
    let v: serde_json::Value = serde_json::from_slice(event_json).unwrap_or_default();
    let s = |ptr: &str| v.pointer(ptr).and_then(|x| x.as_str()).unwrap_or("");
    let action = s("/sluice/action");
    let severity = if action == "block" { 4 } else { 6 };
    let pri = 16 * 8 + severity;
    let time = v
        .get("time")
        .and_then(serde_json::Value::as_i64)
        .map(crate::export::rfc3339_ms)
        .unwrap_or_else(|| "-".into());
    let class = v
        .get("class_uid")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    let mut sd = format!("[sluice@32473 id=\"{}\"", sd_value(s("/id")));
    for (k, p) in [
        ("action", "/sluice/action"),
        ("app", "/sluice/app"),
        ("activity", "/sluice/activity"),
        ("user", "/actor/user/email_addr"),
        ("policy", "/sluice/policy"),
        ("device", "/device/uid"),
    ] {
        let val = s(p);
        if !val.is_empty() {
            sd.push_str(&format!(" {k}=\"{}\"", sd_value(val)));
        }
    }
    sd.push(']');
    let msg = format!(
        "<{pri}>1 {time} {} sluice - {class} {sd} {}",
        header_field(s("/device/hostname"), 255),
        String::from_utf8_lossy(event_json)
    );
    let mut out = format!("{} ", msg.len()).into_bytes();
    out.extend_from_slice(msg.as_bytes());
    out
}

/// One RFC 5424 message for an alert's JSON (as [`crate::detect::alerts::forward_json`] makes
/// it), octet-counted, with the alert's severity.
pub fn alert_frame(alert_json: &[u8]) -> Vec<u8> {
    let v: serde_json::Value = serde_json::from_slice(alert_json).unwrap_or_default();
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("");
    let severity =
        crate::detect::Severity::parse(s("severity")).map_or(4, crate::detect::Severity::syslog);
    let pri = 16 * 8 + u32::from(severity);
    let time = v
        .get("updated")
        .and_then(serde_json::Value::as_i64)
        .map(crate::export::rfc3339_ms)
        .unwrap_or_else(|| "-".into());
    let mut sd = format!("[sluice@32473 alert=\"{}\"", sd_value(s("id")));
    for k in ["detector", "severity", "user", "state", "device"] {
        let val = s(k);
        if !val.is_empty() {
            sd.push_str(&format!(" {k}=\"{}\"", sd_value(val)));
        }
    }
    sd.push(']');
    let msg = format!(
        "<{pri}>1 {time} collector sluice - alert {sd} {}",
        String::from_utf8_lossy(alert_json)
    );
    let mut out = format!("{} ", msg.len()).into_bytes();
    out.extend_from_slice(msg.as_bytes());
    out
}

trait Stream: AsyncWrite + Unpin + Send {}
impl<T: AsyncWrite + Unpin + Send> Stream for T {}

fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

async fn syslog_connect(
    t: &SyslogTarget,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> Result<Box<dyn Stream>, String> {
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&t.address))
        .await
        .map_err(|_| format!("connecting to {}: timed out", t.address))?
        .map_err(|e| format!("connecting to {}: {e}", t.address))?;
    let _ = tcp.set_nodelay(true);
    let Some(tls) = tls else {
        return Ok(Box::new(tcp));
    };
    let name = t
        .server_name
        .clone()
        .unwrap_or_else(|| host_of(&t.address).to_owned());
    let sn = ServerName::try_from(name.clone()).map_err(|e| format!("server name {name}: {e}"))?;
    let s = tokio::time::timeout(Duration::from_secs(10), tls.connect(sn, tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_owned())?
        .map_err(|e| format!("TLS with {}: {e}", t.address))?;
    Ok(Box::new(s))
}

async fn syslog_task(
    t: SyslogTarget,
    mut rx: mpsc::Receiver<Item>,
    stats: Arc<TargetStats>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let name = format!("syslog {}", t.address);
    let tls = if t.tls {
        let cfg = crate::tls::client_config(t.ca_file.as_deref()).map_err(|e| e.to_string())?;
        Some(tokio_rustls::TlsConnector::from(cfg))
    } else {
        None
    };
    let mut conn: Option<Box<dyn Stream>> = None;
    let mut backoff = Backoff::new();
    let mut pending: VecDeque<Item> = VecDeque::new();
    loop {
        if pending.is_empty() {
            match next_batch(&mut rx, 256, &shutdown).await {
                Some(b) => pending.extend(b),
                None => return Ok(()),
            }
        }
        if conn.is_none() {
            match syslog_connect(&t, tls.as_ref()).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    failed(&stats, &name, &e);
                    if !backoff.wait(&shutdown).await {
                        return Ok(());
                    }
                    continue;
                }
            }
        }
        let mut buf = Vec::new();
        for e in &pending {
            buf.extend_from_slice(&e.syslog_frame());
        }
        let Some(c) = conn.as_mut() else { continue };
        let write = async {
            c.write_all(&buf).await?;
            c.flush().await
        };
        match tokio::time::timeout(Duration::from_secs(30), write).await {
            Ok(Ok(())) => {
                stats.sent.fetch_add(pending.len() as u64, Relaxed);
                pending.clear();
                backoff.reset();
            }
            Ok(Err(e)) => {
                conn = None;
                failed(&stats, &name, &format!("writing: {e}"));
                if !backoff.wait(&shutdown).await {
                    return Ok(());
                }
            }
            Err(_) => {
                conn = None;
                failed(&stats, &name, "writing timed out");
                if !backoff.wait(&shutdown).await {
                    return Ok(());
                }
            }
        }
    }
}

async fn webhook_post(
    uri: &http::Uri,
    bearer: Option<&str>,
    tls: Option<&tokio_rustls::TlsConnector>,
    body: Bytes,
) -> Result<(), String> {
    let mut req = crate::client::request(http::Method::POST, uri)
        .map_err(|e| e.to_string())?
        .header(http::header::CONTENT_TYPE, "application/json");
    if let Some(b) = bearer {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {b}"));
    }
    let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
    let mut send = crate::client::connect(uri, tls)
        .await
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    // Drain (bounded) so the connection closes cleanly; what the receiver says is not needed.
    let _ = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
        .collect()
        .await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("answered {status}"))
    }
}

async fn webhook_task(
    w: WebhookTarget,
    mut rx: mpsc::Receiver<Item>,
    stats: Arc<TargetStats>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let name = format!("webhook {}", w.url);
    let uri: http::Uri = w.url.parse().map_err(|e| format!("{}: {e}", w.url))?;
    let bearer = match &w.bearer_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| format!("{}: {e}", p.display()))?
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    let tls = if uri.scheme_str() == Some("https") {
        let cfg = crate::tls::client_config(w.ca_file.as_deref()).map_err(|e| e.to_string())?;
        Some(tokio_rustls::TlsConnector::from(cfg))
    } else {
        None
    };
    let mut backoff = Backoff::new();
    loop {
        let Some(batch) = next_batch(&mut rx, w.batch.max(1), &shutdown).await else {
            return Ok(());
        };
        let mut body = Vec::with_capacity(batch.iter().map(|i| i.json().len()).sum::<usize>() + 2);
        body.push(b'[');
        for (i, e) in batch.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(e.json());
        }
        body.push(b']');
        let body = Bytes::from(body);
        loop {
            let attempt = tokio::time::timeout(
                Duration::from_secs(30),
                webhook_post(&uri, bearer.as_deref(), tls.as_ref(), body.clone()),
            )
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
            match attempt {
                Ok(()) => {
                    stats.sent.fetch_add(batch.len() as u64, Relaxed);
                    backoff.reset();
                    break;
                }
                Err(e) => {
                    failed(&stats, &name, &e);
                    if !backoff.wait(&shutdown).await {
                        return Ok(());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rfc5424_frame() {
        let ev = br#"{"id":"e1","time":1769860800123,"class_uid":6006,"device":{"uid":"ag_1","hostname":"host one"},"actor":{"user":{"email_addr":"a\"b]@x"}},"sluice":{"app":"files","action":"block","activity":"upload"}}"#;
        let f = syslog_frame(ev);
        let text = String::from_utf8(f).unwrap();
        let (len, msg) = text.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), msg.len());
        assert!(
            msg.starts_with(
                "<132>1 2026-01-31T12:00:00.123Z hostone sluice - 6006 [sluice@32473 id=\"e1\" action=\"block\" app=\"files\" activity=\"upload\" user=\"a\\\"b\\]@x\" device=\"ag_1\"] {"
            ),
            "{msg}"
        );
        assert!(msg.ends_with('}'));
    }

    #[test]
    fn alert_frames_carry_the_alert_severity() {
        let a = br#"{"type":"alert","id":"a1","detector":"mass_download","severity":"critical","user":"bob@x","state":"open","updated":1769860800123,"device":"ag_1"}"#;
        let text = String::from_utf8(alert_frame(a)).unwrap();
        let (len, msg) = text.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), msg.len());
        assert!(
            msg.starts_with(
                "<130>1 2026-01-31T12:00:00.123Z collector sluice - alert [sluice@32473 alert=\"a1\" detector=\"mass_download\" severity=\"critical\" user=\"bob@x\" state=\"open\" device=\"ag_1\"] {"
            ),
            "{msg}"
        );
        let low = String::from_utf8(alert_frame(br#"{"severity":"low"}"#)).unwrap();
        assert!(low.contains("<133>1 "), "{low}");
    }
}
