//! Anomaly detection: every newly stored event goes through the detectors ([`engine`]), whose
//! findings become alerts ([`alerts`]) that people work through in the portal and the API
//! ([`api`]), that are forwarded to the SIEMs that asked for them, and that may raise the user's
//! risk on the risk board ([`crate::risk`]) until they are closed.
//!
//! Detection runs on one thread of its own, fed after each batch commits through a bounded
//! queue: one consumer keeps every user's events in the order they were stored, and the async
//! workers never block on it. A full queue makes the ingestion request wait for room (a flood
//! slows ingestion, agents keep their events spooled meanwhile) rather than let a batch skip
//! detection; only a detection thread that is gone drops (counted in `/api/v1/status`, logged).
//! The detectors' state lives in memory and is rebuilt at start by replaying the newest stored
//! events (without alerting).
//!
//! The queue carries the events as ingestion parsed them for storing (parsing them again was
//! most of detection's cost), and a batch's findings are stored together: its alerts and their
//! activity-log events in one transaction (a commit costs far more than the rows an alert
//! writes, and ingestion waits for the writer meanwhile).

pub mod alerts;
pub mod api;
pub mod config;
pub mod engine;
pub mod geo;

#[cfg(test)]
mod tests;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        mpsc,
    },
    time::{Duration, Instant},
};

use serde::Serialize;
use sluice_protocol::Event;
use tokio_util::sync::CancellationToken;

pub use self::config::{DetectionConfig, Detector, Severity};
use self::{
    alerts::{AlertError, Raised, State},
    engine::{Engine, Finding},
};
use crate::{Collector, store::Store};

/// Counters of detection (`/api/v1/status`).
#[derive(Debug, Default)]
struct Counters {
    queued: AtomicU64,
    processed: AtomicU64,
    dropped: AtomicU64,
    waited: AtomicU64,
    alerts: AtomicU64,
    repeats: AtomicU64,
    failures: AtomicU64,
    rebuilt: AtomicU64,
    ready: AtomicBool,
}

/// What `/api/v1/status` shows of detection.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Whether detection runs.
    pub enabled: bool,
    /// Whether the state has been rebuilt and live events are being looked at.
    pub ready: bool,
    /// Events handed to detection.
    pub queued: u64,
    /// Events looked at.
    pub processed: u64,
    /// Events that skipped detection because the detection thread was not running.
    pub dropped: u64,
    /// Batches whose ingestion waited for room in the detection queue.
    pub waited: u64,
    /// Alerts opened.
    pub alerts: u64,
    /// Findings added to an open alert.
    pub repeats: u64,
    /// Findings that could not be stored.
    pub failures: u64,
    /// Stored events replayed at start.
    pub rebuilt: u64,
}

/// The detection queue and its thread.
#[derive(Debug)]
pub struct Detection {
    tx: Option<mpsc::SyncSender<Vec<Event>>>,
    rx: Mutex<Option<mpsc::Receiver<Vec<Event>>>>,
    counters: Arc<Counters>,
}

impl Detection {
    /// The queue, when `cfg` enables detection (the thread starts with [`Detection::start`]).
    pub fn new(cfg: &DetectionConfig) -> Self {
        let (tx, rx) = if cfg.enabled {
            let (tx, rx) = mpsc::sync_channel(cfg.queue.max(1));
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        Self {
            tx,
            rx: Mutex::new(rx),
            counters: Arc::default(),
        }
    }

    /// Whether detection runs (ingestion then collects the new events for it).
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Hands newly stored events (as ingestion parsed them: [`IngestOutcome::new_parsed`]) to
    /// detection. When the queue is full the caller (an ingestion request) waits for room: a
    /// flood of events slows ingestion (agents keep theirs spooled meanwhile) rather than
    /// letting a batch go unseen by the detectors, which would let a user hide a burst behind
    /// noise.
    ///
    /// [`IngestOutcome::new_parsed`]: crate::store::IngestOutcome::new_parsed
    pub async fn push(&self, events: Vec<Event>) {
        let Some(tx) = &self.tx else { return };
        if events.is_empty() {
            return;
        }
        let n = events.len() as u64;
        let batch = match tx.try_send(events) {
            Ok(()) => {
                self.counters.queued.fetch_add(n, Relaxed);
                return;
            }
            Err(mpsc::TrySendError::Full(batch)) => batch,
            Err(mpsc::TrySendError::Disconnected(_)) => {
                self.dropped(n);
                return;
            }
        };
        self.counters.waited.fetch_add(1, Relaxed);
        let tx = tx.clone();
        match tokio::task::spawn_blocking(move || tx.send(batch)).await {
            Ok(Ok(())) => {
                self.counters.queued.fetch_add(n, Relaxed);
            }
            _ => self.dropped(n),
        }
    }

    /// Events that could not be handed over (the detection thread is gone).
    fn dropped(&self, n: u64) {
        let total = self.counters.dropped.fetch_add(n, Relaxed) + n;
        tracing::warn!(
            dropped = n,
            total,
            "detection is not running: events not looked at"
        );
    }

    /// Starts the detection thread (once; later calls do nothing).
    pub fn start(&self, c: Arc<Collector>, shutdown: CancellationToken) {
        let Some(rx) = self.rx.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("sluice-detect".into())
            .spawn(move || worker(&c, &rx, &shutdown));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "detection thread could not start: no alerts");
        }
    }

    /// The counters.
    pub fn report(&self) -> Report {
        let k = &self.counters;
        Report {
            enabled: self.enabled(),
            ready: k.ready.load(Relaxed),
            queued: k.queued.load(Relaxed),
            processed: k.processed.load(Relaxed),
            dropped: k.dropped.load(Relaxed),
            waited: k.waited.load(Relaxed),
            alerts: k.alerts.load(Relaxed),
            repeats: k.repeats.load(Relaxed),
            failures: k.failures.load(Relaxed),
            rebuilt: k.rebuilt.load(Relaxed),
        }
    }

    /// Whether every event queued so far has been looked at.
    pub fn idle(&self) -> bool {
        let k = &self.counters;
        k.ready.load(Relaxed) && k.processed.load(Relaxed) >= k.queued.load(Relaxed)
    }
}

fn worker(c: &Arc<Collector>, rx: &mpsc::Receiver<Vec<Event>>, shutdown: &CancellationToken) {
    let cfg = &c.config.detection;
    let geo = cfg.geo.as_ref().and_then(|g| match geo::Geo::open(&g.database) {
        Ok(db) => {
            tracing::info!(database = %g.database.display(), "GeoIP database loaded");
            Some(db)
        }
        Err(e) => {
            tracing::error!(error = %e, "GeoIP database: new-country and impossible-travel detection are off");
            None
        }
    });
    let mut engine = Engine::new(cfg, geo);
    let t = Instant::now();
    match rebuild(&c.store, &mut engine, cfg) {
        Ok(n) => {
            c.detect.counters.rebuilt.store(n, Relaxed);
            tracing::info!(
                events = n,
                users = engine.users(),
                seconds = t.elapsed().as_secs_f64(),
                "detection state rebuilt from the store"
            );
        }
        Err(e) => {
            tracing::error!(error = %e, "detection state could not be rebuilt: starting afresh")
        }
    }
    engine.end_rebuild();
    c.detect.counters.ready.store(true, Relaxed);
    loop {
        match rx.recv_timeout(Duration::from_millis(250)) {
            Ok(batch) => {
                // Batches that queued up meanwhile are looked at together: their findings are
                // then stored in one transaction, which helps detection catch up after a flood.
                let mut n = batch.len();
                let mut batches = vec![batch];
                while n < COALESCE_EVENTS {
                    match rx.try_recv() {
                        Ok(b) => {
                            n += b.len();
                            batches.push(b);
                        }
                        Err(_) => break,
                    }
                }
                process(c, &mut engine, &batches);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if shutdown.is_cancelled() {
                    return;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Replays the newest stored events (at most `rebuild_max_events`, within `history_days`),
/// oldest first, without alerting.
fn rebuild(
    store: &Store,
    engine: &mut Engine,
    cfg: &DetectionConfig,
) -> Result<u64, crate::db::DbError> {
    if cfg.rebuild_max_events == 0 {
        return Ok(0);
    }
    let cutoff = crate::store::now_ms() - i64::from(cfg.history_days) * 86_400_000;
    let max = i64::try_from(cfg.rebuild_max_events).unwrap_or(i64::MAX);
    store.with_read(|c| {
        let start: i64 = c
            .query_row(
                "SELECT time FROM events WHERE time >= ?1 ORDER BY time DESC LIMIT 1 OFFSET ?2",
                crate::args![cutoff, max - 1],
                |r| r.get(0),
            )
            .unwrap_or(cutoff);
        let mut n = 0u64;
        let sql = format!(
            "SELECT body FROM events WHERE time >= ?1 AND user_t <> 0 AND app_t NOT IN \
             (SELECT id FROM terms WHERE kind = {} AND value IN ('sluice', 'portal')) \
             ORDER BY time",
            crate::store::terms::APP
        );
        c.for_each(&sql, [start.max(cutoff)], |r| {
            let body: Vec<u8> = r.get(0)?;
            let json = store.body_json(c, &body)?;
            if let Ok(e) = serde_json::from_slice::<Event>(&json) {
                engine.observe(&e, false);
                n += 1;
            }
            Ok(n < cfg.rebuild_max_events)
        })?;
        Ok(n)
    })
}

/// Most events taken off the queue at once (whole batches, so possibly more).
const COALESCE_EVENTS: usize = 10_000;

/// Looks at batches of stored events (in the order they were stored), then stores what they
/// made.
fn process(c: &Collector, engine: &mut Engine, batches: &[Vec<Event>]) {
    let mut findings = Vec::new();
    for e in batches.iter().flatten() {
        findings.extend(engine.observe(e, true));
    }
    if !findings.is_empty() {
        let engine = &*engine;
        let found: Vec<(&config::Rule, &Finding)> = findings
            .iter()
            .map(|f| (engine.rule(f.detector), f))
            .collect();
        store_findings(c, &found);
    }
    // Counted once the findings are stored: `idle` then means the alerts are there.
    let n: usize = batches.iter().map(Vec::len).sum();
    c.detect.counters.processed.fetch_add(n as u64, Relaxed);
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A batch's findings: alerts opened (recorded, forwarded, the user's risk raised when the rule
/// says so) or added to. Stored with their records in one transaction; should it fail, one by
/// one, so one finding that cannot be stored does not lose the others.
fn store_findings(c: &Collector, found: &[(&config::Rule, &Finding)]) {
    let k = &c.detect.counters;
    let (results, recorded): (Vec<Result<Raised, AlertError>>, bool) =
        match alerts::raise_all(&c.store, found, "detector") {
            Ok(all) => (all.into_iter().map(Ok).collect(), true),
            Err(e) => {
                tracing::warn!(error = %e, findings = found.len(),
                    "storing a batch's alerts together failed: one by one");
                let each = found
                    .iter()
                    .map(|(rule, f)| alerts::raise(&c.store, rule, f))
                    .collect();
                (each, false)
            }
        };
    let mut opened = Vec::new();
    for ((rule, f), r) in found.iter().zip(results) {
        match r {
            Ok(Raised::New(a)) => {
                k.alerts.fetch_add(1, Relaxed);
                tracing::info!(alert = %a.id, detector = %a.detector, severity = %a.severity,
                    user = %a.user, title = %a.title, "alert opened");
                opened.push((*rule, a));
            }
            Ok(Raised::Repeat(_)) => {
                k.repeats.fetch_add(1, Relaxed);
            }
            Err(e) => {
                k.failures.fetch_add(1, Relaxed);
                tracing::error!(error = %e, detector = %f.detector, user = %f.user, "storing an alert");
            }
        }
    }
    if opened.is_empty() {
        return;
    }
    let new: Vec<&alerts::Alert> = opened.iter().map(|(_, a)| a).collect();
    if !recorded {
        alerts::record_all(&c.store, &new, "detector");
    }
    let json: Vec<_> = new.iter().map(|a| alerts::forward_json(a)).collect();
    c.forward.push_alerts(&json);
    for (rule, a) in &opened {
        let Some(r) = rule.raise_risk else { continue };
        let until = r.for_s.map(|s| now_s().saturating_add(s));
        let reason = format!("alert {}: {}", a.id, a.title);
        if let Err(e) = c.risk.raise_user(
            &c.store,
            &a.user,
            r.level,
            until,
            &reason,
            Some(&a.id),
            &format!("detector {}", a.detector),
        ) {
            tracing::error!(error = %e, alert = %a.id, "raising the user's risk");
        }
    }
}

/// Errors of changing an alert's state.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The alert store.
    #[error("{0}")]
    Alert(#[from] AlertError),
    /// The risk board.
    #[error("risk: {0}")]
    Risk(#[from] crate::risk::Error),
}

/// Sets an alert's state for `by` (the API's and the portal's), records it, forwards it, and
/// lowers the risk it raised when it leaves open/acknowledged. Blocking. None: no such alert.
pub fn change_state(
    c: &Collector,
    id: &str,
    state: State,
    by: &str,
) -> Result<Option<alerts::Alert>, ChangeError> {
    let Some((a, before)) = alerts::set_state(&c.store, id, state, by)? else {
        return Ok(None);
    };
    if before != state {
        tracing::info!(alert = %a.id, from = before.as_str(), to = state.as_str(), by, "alert state changed");
        alerts::record(&c.store, &a, by);
        c.forward.push_alerts(&[alerts::forward_json(&a)]);
    }
    if before.active() && !state.active() {
        c.risk.clear_alert(&c.store, &a.id, by)?;
    }
    Ok(Some(a))
}
