//! The shipper: reads the spool in order, sends gzip'd JSON Lines batches to the collector and
//! moves the acknowledged cursor only when the collector has answered 200.
//!
//! Nothing is dropped here. Network errors, 5xx and unexpected answers are retried with
//! exponential backoff and jitter (bounded); 401/403 (credential unknown or revoked) stop
//! shipping, with "credential refused" in the status, until the credential file changes (a new
//! enrollment) or five minutes pass; the spool keeps filling meanwhile. A batch is re-sent with
//! the same id for the same range, and the collector deduplicates by event id, so a batch whose
//! answer was lost is stored once.

use std::{
    io::Write as _,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, header};
use serde::Serialize;
use sluice_protocol::{BATCH_HEADER, IngestResponse};
use tokio_util::sync::CancellationToken;

use super::{
    client::{self as collector_client, MAX_ANSWER},
    spool::{Batch, SpoolReader},
};
use crate::client::{Client, header_value};

/// The ingestion path.
pub const EVENTS_PATH: &str = "/api/v1/events";
/// A refused credential is tried again after this long even if it did not change.
const REFUSED_RETRY: Duration = Duration::from_secs(300);

/// How the shipper talks to the collector.
#[derive(Debug, Clone)]
pub struct ShipSettings {
    /// `https://host:port`.
    pub collector: String,
    /// The collector's CA (PEM); none: the bundled and system roots.
    pub collector_ca: Option<PathBuf>,
    /// Other collectors (same database, same CA), tried in turn after a failure.
    pub fallbacks: Vec<String>,
    /// File holding the agent's credential (read before each batch, so a new enrollment is
    /// picked up without a restart).
    pub credential_file: PathBuf,
    /// The agent id (prefix of batch ids).
    pub agent_id: String,
    /// Most events per batch.
    pub max_events: usize,
    /// Most payload bytes per batch (before compression).
    pub max_bytes: usize,
    /// First retry delay.
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Time allowed for one request.
    pub timeout: Duration,
}

/// What `/status` shows about shipping.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ShipStatus {
    /// `starting`, `ok`, `retrying`, `credential refused`, `not enrolled`.
    pub state: String,
    /// The collector.
    pub collector: String,
    /// Batches acknowledged.
    pub batches: u64,
    /// Events acknowledged (accepted + duplicates + rejected).
    pub events: u64,
    /// Events the collector stored.
    pub accepted: u64,
    /// Events it already had.
    pub duplicates: u64,
    /// Events it refused as invalid (or a lone event it refused as too large).
    pub rejected: u64,
    /// Failed attempts since start.
    pub failures: u64,
    /// Failed attempts in a row now.
    pub consecutive_failures: u64,
    /// Whether the collector refused the credential (401/403): shipping is stopped.
    pub credential_refused: bool,
    /// The last error, cleared by a success.
    pub last_error: Option<String>,
    /// When a batch was last acknowledged (Unix seconds).
    pub last_success_at: Option<u64>,
}

/// The shipping task.
#[derive(Debug)]
pub struct Shipper {
    settings: ShipSettings,
    reader: SpoolReader,
    status: Arc<Mutex<ShipStatus>>,
    /// Told the address the collector sees the agent connect from, with each acknowledgement.
    location: Option<Arc<crate::location::NetworkLocation>>,
    /// Which collector is used: 0 the primary, then the fallbacks.
    current: usize,
}

enum Outcome {
    Acked,
    Refused(String),
    TooLarge,
    Failed(String),
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Reads the credential: one line of text.
pub(crate) fn read_credential(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let c = text.trim().to_owned();
    if c.is_empty() {
        return Err(format!("{}: empty", path.display()));
    }
    Ok(c)
}

/// A delay in `[d/2, d]`, uniformly.
pub fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 4];
    let _ = aws_lc_rs::rand::fill(&mut b);
    let r = f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX);
    d.mul_f64(0.5 + 0.5 * r)
}

/// The `n`th retry delay (before jitter): `min * 2^n`, at most `max`.
pub fn backoff(min: Duration, max: Duration, n: u64) -> Duration {
    let factor = 1u32 << n.min(20) as u32;
    min.saturating_mul(factor).min(max)
}

/// Gzips a batch as JSON Lines.
pub fn encode_batch(batch: &Batch) -> std::io::Result<Vec<u8>> {
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(batch.bytes() / 4 + 64),
        flate2::Compression::fast(),
    );
    for r in &batch.records {
        gz.write_all(r)?;
        gz.write_all(b"\n")?;
    }
    gz.finish()
}

impl Shipper {
    /// A shipper reading from `reader`.
    pub fn new(settings: ShipSettings, reader: SpoolReader) -> Self {
        let status = ShipStatus {
            state: "starting".into(),
            collector: settings.collector.clone(),
            ..ShipStatus::default()
        };
        Self {
            settings,
            reader,
            status: Arc::new(Mutex::new(status)),
            location: None,
            current: 0,
        }
    }

    /// The collector in use.
    fn collector(&self) -> &str {
        match self.current {
            0 => &self.settings.collector,
            n => &self.settings.fallbacks[n - 1],
        }
    }

    /// After a failure: the next collector, when there are others.
    fn next_collector(&mut self) {
        if self.settings.fallbacks.is_empty() {
            return;
        }
        self.current = (self.current + 1) % (self.settings.fallbacks.len() + 1);
        let to = self.collector().to_owned();
        tracing::warn!(collector = %to, "trying another collector");
        self.update(|s| s.collector = to);
    }

    /// Where the location is kept, when it is.
    pub fn location(&self) -> Option<Arc<crate::location::NetworkLocation>> {
        self.location.clone()
    }

    /// Records the public address each acknowledgement reports in `location`.
    pub fn with_location(mut self, location: Arc<crate::location::NetworkLocation>) -> Self {
        self.location = Some(location);
        self
    }

    /// The status handle.
    pub fn status(&self) -> Arc<Mutex<ShipStatus>> {
        self.status.clone()
    }

    fn update(&self, f: impl FnOnce(&mut ShipStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Ships until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut client: Option<Client> = None;
        let mut queue: std::collections::VecDeque<Batch> = Default::default();
        let mut failures = 0u64;
        loop {
            let batch = match queue.pop_front() {
                Some(b) => b,
                None => {
                    let reader = self.reader;
                    let (max_events, max_bytes) =
                        (self.settings.max_events, self.settings.max_bytes);
                    let next = tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        r = reader.next_batch(max_events, max_bytes) => r,
                    };
                    let (reader, r) = next;
                    self.reader = reader;
                    match r {
                        Ok(b) => b,
                        Err(e) => {
                            tracing::error!(error = %e, "reading the spool");
                            if sleep(&shutdown, Duration::from_secs(1)).await {
                                return Ok(());
                            }
                            continue;
                        }
                    }
                }
            };
            if batch.records.is_empty() {
                // Only moved past closed segments.
                if let Err(e) = self.reader.ack(&batch) {
                    tracing::error!(error = %e, "spool cursor not written");
                }
                continue;
            }
            let credential = match read_credential(&self.settings.credential_file) {
                Ok(c) => c,
                Err(e) => {
                    self.update(|s| {
                        s.state = "not enrolled".into();
                        s.last_error = Some(format!("no credential: {e}"));
                    });
                    queue.push_front(batch);
                    if sleep(&shutdown, Duration::from_secs(2)).await {
                        return Ok(());
                    }
                    continue;
                }
            };
            if client.is_none() {
                match collector_client::collector(
                    self.collector(),
                    self.settings.collector_ca.as_deref(),
                ) {
                    Ok(c) => client = Some(c),
                    Err(e) => {
                        failures += 1;
                        self.fail(&e.to_string(), failures);
                        self.next_collector();
                        queue.push_front(batch);
                        if self.wait_retry(&shutdown, failures).await {
                            return Ok(());
                        }
                        continue;
                    }
                }
            }
            let Some(c) = client.as_mut() else {
                continue;
            };
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                o = self.send(c, &batch, &credential) => o,
            };
            match outcome {
                Outcome::Acked => {
                    failures = 0;
                    if let Err(e) = self.reader.ack(&batch) {
                        // The events are delivered; a cursor not written only means redelivery.
                        tracing::error!(error = %e, "spool cursor not written");
                    }
                }
                Outcome::TooLarge if batch.records.len() > 1 => {
                    let half = batch.records.len() / 2;
                    let (a, b) = batch.split(half);
                    queue.push_front(b);
                    queue.push_front(a);
                }
                Outcome::TooLarge => {
                    tracing::error!(
                        batch = %batch.id(&self.settings.agent_id),
                        bytes = batch.bytes(),
                        "the collector refuses this event as too large; it is skipped"
                    );
                    self.update(|s| s.rejected += 1);
                    if let Err(e) = self.reader.ack(&batch) {
                        tracing::error!(error = %e, "spool cursor not written");
                    }
                }
                Outcome::Refused(why) => {
                    tracing::error!(error = %why, "the collector refused the agent's credential; shipping stopped, events keep spooling");
                    self.update(|s| {
                        s.state = "credential refused".into();
                        s.credential_refused = true;
                        s.last_error = Some(why.clone());
                        s.failures += 1;
                    });
                    queue.push_front(batch);
                    client = None;
                    if self.wait_credential(&shutdown, &credential).await {
                        return Ok(());
                    }
                    self.update(|s| {
                        s.state = "retrying".into();
                        s.credential_refused = false;
                    });
                }
                Outcome::Failed(why) => {
                    failures += 1;
                    self.fail(&why, failures);
                    if !self.settings.fallbacks.is_empty() {
                        self.next_collector();
                        client = None;
                    }
                    queue.push_front(batch);
                    if self.wait_retry(&shutdown, failures).await {
                        return Ok(());
                    }
                }
            }
        }
    }

    fn fail(&self, why: &str, failures: u64) {
        tracing::warn!(error = %why, attempt = failures, "events not shipped; will retry");
        self.update(|s| {
            s.state = "retrying".into();
            s.failures += 1;
            s.consecutive_failures = failures;
            s.last_error = Some(why.to_owned());
        });
    }

    /// Sleeps the backoff; true when shutting down.
    async fn wait_retry(&self, shutdown: &CancellationToken, failures: u64) -> bool {
        let d = jitter(backoff(
            self.settings.retry_min,
            self.settings.retry_max,
            failures.saturating_sub(1),
        ));
        sleep(shutdown, d).await
    }

    /// Waits until the credential file holds something else, or [`REFUSED_RETRY`] passes;
    /// true when shutting down.
    async fn wait_credential(&self, shutdown: &CancellationToken, refused: &str) -> bool {
        let since = Instant::now();
        while since.elapsed() < REFUSED_RETRY {
            if sleep(shutdown, Duration::from_secs(1)).await {
                return true;
            }
            if read_credential(&self.settings.credential_file).is_ok_and(|c| c != refused) {
                tracing::info!("credential changed; shipping again");
                return false;
            }
        }
        false
    }

    async fn send(&self, client: &mut Client, batch: &Batch, credential: &str) -> Outcome {
        let id = batch.id(&self.settings.agent_id);
        let body = {
            let b = batch.clone();
            match tokio::task::spawn_blocking(move || encode_batch(&b)).await {
                Ok(Ok(v)) => Bytes::from(v),
                Ok(Err(e)) => return Outcome::Failed(format!("compressing batch: {e}")),
                Err(e) => return Outcome::Failed(format!("compressing batch: {e}")),
            }
        };
        let mut headers = HeaderMap::new();
        let auth = match header_value(&format!("Bearer {credential}")) {
            Ok(v) => v,
            Err(_) => {
                return Outcome::Refused(
                    "the credential file holds characters not allowed in a header".into(),
                );
            }
        };
        headers.insert(header::AUTHORIZATION, auth);
        headers.insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/x-ndjson"),
        );
        headers.insert(
            header::CONTENT_ENCODING,
            http::HeaderValue::from_static("gzip"),
        );
        if let Ok(v) = header_value(&id) {
            headers.insert(BATCH_HEADER, v);
        }
        let answer = match client
            .request(
                Method::POST,
                EVENTS_PATH,
                headers,
                body,
                self.settings.timeout,
                MAX_ANSWER,
            )
            .await
        {
            Ok(a) => a,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        match answer.status {
            StatusCode::OK => {
                let n = batch.records.len() as u64;
                let resp = serde_json::from_slice::<IngestResponse>(&answer.body).ok();
                if resp.is_none() {
                    tracing::warn!(batch = %id, "the collector acknowledged without a readable count");
                }
                let seen = resp
                    .as_ref()
                    .and_then(|r| r.seen_from.as_deref())
                    .and_then(|s| s.parse::<std::net::IpAddr>().ok());
                if let (Some(ip), Some(loc)) = (seen, &self.location) {
                    loc.set_public(ip);
                }
                self.update(|s| {
                    s.state = "ok".into();
                    s.batches += 1;
                    s.events += n;
                    if let Some(r) = &resp {
                        s.accepted += r.accepted;
                        s.duplicates += r.duplicates;
                        s.rejected += r.rejected;
                    }
                    s.consecutive_failures = 0;
                    s.credential_refused = false;
                    s.last_error = None;
                    s.last_success_at = Some(now_s());
                });
                if let Some(r) = resp.filter(|r| r.rejected > 0) {
                    tracing::warn!(batch = %id, rejected = r.rejected, "the collector rejected invalid events");
                }
                tracing::debug!(batch = %id, events = n, "batch acknowledged");
                Outcome::Acked
            }
            s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => Outcome::Refused(format!(
                "credential refused: the collector answered {s}{}",
                detail(&answer.body)
            )),
            StatusCode::PAYLOAD_TOO_LARGE => Outcome::TooLarge,
            s => Outcome::Failed(format!(
                "the collector answered {s}{}",
                detail(&answer.body)
            )),
        }
    }
}

/// A short, printable excerpt of an error answer.
fn detail(body: &[u8]) -> String {
    if body.is_empty() {
        return String::new();
    }
    let text: String = String::from_utf8_lossy(&body[..body.len().min(300)])
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    format!(": {text}")
}

/// Sleeps `d`; true when `shutdown` came first.
async fn sleep(shutdown: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_bounded() {
        let (min, max) = (Duration::from_millis(500), Duration::from_secs(30));
        assert_eq!(backoff(min, max, 0), min);
        assert_eq!(backoff(min, max, 3), Duration::from_secs(4));
        assert_eq!(backoff(min, max, 10), max);
        assert_eq!(backoff(min, max, u64::MAX), max);
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(2));
            assert!(j >= Duration::from_secs(1) && j <= Duration::from_secs(2));
        }
    }
}
