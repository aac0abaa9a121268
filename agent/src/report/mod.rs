//! Reporting to the collector: events built from what the agent sees ([`convert`]), appended to
//! a durable on-disk spool ([`spool`]), shipped in gzip'd batches over HTTPS with retries
//! ([`ship`]); enrollment ([`enroll`]); device posture and agent status events, sent at start
//! and periodically ([`posture`]).
//!
//! The proxy never waits on any of it: [`EventReporter`] hands each event to the spool's writer
//! thread through a bounded queue. When the queue is full it waits for room briefly in a task of
//! its own; what still cannot be queued is counted (`unspooled`), logged and shown in `/status`,
//! never silently lost.

pub mod client;
pub mod convert;
pub mod enroll;
pub use crate::posture::facts as posture;
pub mod release_key;
pub mod renew;
pub mod risk;
pub mod ship;
pub mod spool;

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::Serialize;
use sluice_protocol::{self as proto, CLASS_DEVICE_INVENTORY, Event, device_activity};
use tokio_util::sync::CancellationToken;

use crate::{
    bundle::Active,
    config::Config,
    event::{ActivityEvent, unix_ms},
    proxy::record::{ConnectionRecord, JsonLinesReporter, LogReporter, Reporter, RequestRecord},
};
use convert::DeviceInfo;
use ship::{ShipSettings, ShipStatus, Shipper};
use spool::{Spool, SpoolOptions, SpoolStats, TryAppend};

/// How long an event waits for room in a full spool queue before it is counted as unspooled.
const QUEUE_WAIT: Duration = Duration::from_secs(2);
/// Most events waiting for room at once (beyond: counted as unspooled at once).
const MAX_WAITING: u64 = 10_000;

/// Errors of reporting.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Settings or a stored file are not usable.
    #[error("{0}")]
    Config(String),
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Talking to the collector failed.
    #[error("{0}")]
    Http(String),
    /// The collector said no.
    #[error("{0}")]
    Refused(String),
    /// The spool failed.
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),
}

/// Where events go, from the config and the enrollment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `https://host:port`.
    pub collector: String,
    /// The collector's CA.
    pub collector_ca: Option<PathBuf>,
    /// The credential file.
    pub credential_file: PathBuf,
    /// The agent id (empty before enrollment).
    pub agent_id: String,
    /// Other collectors on the same database (`report.collector_fallbacks`).
    pub fallbacks: Vec<String>,
}

/// Resolves the collector, its CA, the credential and the agent id; None when no collector is
/// configured or enrolled with.
pub fn target(config: &Config) -> Result<Option<Target>, ReportError> {
    let enrollment = enroll::load(&config.state_dir)?;
    let r = &config.report;
    let Some(collector) = r
        .collector
        .clone()
        .or_else(|| enrollment.as_ref().map(|e| e.collector.clone()))
    else {
        return Ok(None);
    };
    Ok(Some(Target {
        collector: collector.trim_end_matches('/').to_owned(),
        collector_ca: r
            .collector_ca
            .clone()
            .or_else(|| enrollment.as_ref().and_then(|e| e.collector_ca.clone())),
        credential_file: r
            .credential_file
            .clone()
            .unwrap_or_else(|| enroll::credential_path(&config.state_dir)),
        agent_id: enrollment.map(|e| e.agent_id).unwrap_or_default(),
        fallbacks: r
            .collector_fallbacks
            .iter()
            .map(|f| f.trim_end_matches('/').to_owned())
            .collect(),
    }))
}

/// Shared reporting state, read by `/status`, `/metrics` and the status events.
#[derive(Debug)]
pub struct ReportState {
    spool: Arc<Spool>,
    ship: Arc<Mutex<ShipStatus>>,
    unspooled: AtomicU64,
    target: Target,
}

/// A handle on [`ReportState`].
pub type ReportHandle = Arc<ReportState>;

/// What `/status` shows about reporting.
#[derive(Debug, Clone, Serialize)]
pub struct ReportStatus {
    /// The collector.
    pub collector: String,
    /// The agent id.
    pub agent_id: String,
    /// The spool's counters.
    pub spool: SpoolStats,
    /// Events that could not be put in the spool (queue full for too long, spool failed).
    pub unspooled: u64,
    /// Shipping.
    pub ship: ShipStatus,
}

impl ReportState {
    /// The state now.
    pub fn snapshot(&self) -> ReportStatus {
        ReportStatus {
            collector: self.target.collector.clone(),
            agent_id: self.target.agent_id.clone(),
            spool: self.spool.stats(),
            unspooled: self.unspooled.load(Ordering::Relaxed),
            ship: self.ship.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }

    /// Prometheus text for the reporting counters.
    pub fn metrics(&self) -> String {
        use std::fmt::Write as _;
        let s = self.snapshot();
        let mut out = String::new();
        for (name, kind, help, v) in [
            (
                "sluice_report_spool_events",
                "gauge",
                "Events in the spool waiting for acknowledgement.",
                s.spool.events,
            ),
            (
                "sluice_report_spool_bytes",
                "gauge",
                "Bytes of spool segments on disk.",
                s.spool.bytes,
            ),
            (
                "sluice_report_spool_appended_total",
                "counter",
                "Events appended to the spool.",
                s.spool.appended,
            ),
            (
                "sluice_report_spool_dropped_total",
                "counter",
                "Events dropped from a full spool (oldest first).",
                s.spool.dropped,
            ),
            (
                "sluice_report_spool_corrupt_total",
                "counter",
                "Damaged spool records skipped.",
                s.spool.corrupt,
            ),
            (
                "sluice_report_unspooled_total",
                "counter",
                "Events that could not be spooled.",
                s.unspooled,
            ),
            (
                "sluice_report_shipped_events_total",
                "counter",
                "Events acknowledged by the collector.",
                s.ship.events,
            ),
            (
                "sluice_report_ship_failures_total",
                "counter",
                "Failed shipping attempts.",
                s.ship.failures,
            ),
            (
                "sluice_report_credential_refused",
                "gauge",
                "1 while the collector refuses the agent's credential.",
                u64::from(s.ship.credential_refused),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
        out
    }
}

/// Sends activity events to the spool (and the JSON lines file, when configured).
pub struct EventReporter {
    state: ReportHandle,
    lines: Option<JsonLinesReporter>,
    device: DeviceInfo,
    posture: String,
    active: Option<Active>,
    waiting: Arc<AtomicU64>,
}

impl std::fmt::Debug for EventReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventReporter")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl EventReporter {
    /// A reporter into `state`'s spool.
    pub fn new(
        state: ReportHandle,
        device: DeviceInfo,
        posture: sluice_policy::model::Device,
        lines: Option<JsonLinesReporter>,
    ) -> Self {
        Self {
            state,
            lines,
            device,
            posture: convert::enum_name(&posture),
            active: None,
            waiting: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Maps label GUIDs to the active bundle's ids and stamps its revision on events.
    pub fn with_policies(mut self, active: Active) -> Self {
        self.active = Some(active);
        self
    }

    /// The device object stamped on events now.
    pub fn device(&self) -> proto::Device {
        let revision = self
            .active
            .as_ref()
            .and_then(|a| a.load_full())
            .map(|p| p.revision.clone());
        self.device.device(&self.posture, revision)
    }

    fn unspooled(&self, why: &str) {
        let n = self.state.unspooled.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::error!(error = %why, unspooled = n, "event not spooled");
    }

    /// Queues `event` for the spool without blocking the caller.
    pub fn submit(&self, event: &Event) {
        let payload = match serde_json::to_vec(event) {
            Ok(p) => p,
            Err(e) => return self.unspooled(&format!("not serialisable: {e}")),
        };
        match self.state.spool.try_append(payload) {
            Ok(()) => {}
            Err(TryAppend::Failed(e)) => self.unspooled(&e.to_string()),
            Err(TryAppend::Full(payload)) => {
                let handle = tokio::runtime::Handle::try_current();
                let Ok(handle) = handle else {
                    return self.unspooled("spool queue full");
                };
                if self.waiting.fetch_add(1, Ordering::Relaxed) >= MAX_WAITING {
                    self.waiting.fetch_sub(1, Ordering::Relaxed);
                    return self.unspooled("spool queue full");
                }
                let (state, waiting) = (self.state.clone(), self.waiting.clone());
                handle.spawn(async move {
                    if let Err(e) = state.spool.append_queued(payload, QUEUE_WAIT).await {
                        let why = match e {
                            TryAppend::Full(_) => "spool queue full".to_owned(),
                            TryAppend::Failed(e) => e.to_string(),
                        };
                        let n = state.unspooled.fetch_add(1, Ordering::Relaxed) + 1;
                        tracing::error!(error = %why, unspooled = n, "event not spooled");
                    }
                    waiting.fetch_sub(1, Ordering::Relaxed);
                });
            }
        }
    }

    /// Converts an activity to the wire event (without submitting it).
    pub fn convert(&self, ev: &ActivityEvent) -> Event {
        let set = self.active.as_ref().and_then(|a| a.load_full());
        convert::activity_event(ev, &self.device, set.as_deref())
    }

    /// A Device Inventory event with `posture`.
    pub fn posture_event(&self, posture: proto::Posture) -> Event {
        let mut e = Event::new(
            sluice_inspect::new_guid(),
            unix_ms(std::time::SystemTime::now()),
            CLASS_DEVICE_INVENTORY,
            device_activity::LOG,
            "Log",
            self.device(),
        );
        let known = |v: Option<bool>, yes: &str, no: &str| match v {
            Some(true) => yes.to_owned(),
            Some(false) => no.to_owned(),
            None => "unknown".to_owned(),
        };
        let failing: Vec<&str> = posture
            .checks
            .iter()
            .filter(|c| c.status != "pass")
            .map(|c| c.id.as_str())
            .collect();
        e.message = format!(
            "posture of {}: {}, kernel {}, firewall {}, disk encryption {}{}",
            self.device.hostname,
            posture.os_name,
            posture.kernel,
            known(posture.firewall, "on", "off"),
            known(posture.disk_encrypted, "on", "off"),
            if posture.checks.is_empty() {
                String::new()
            } else {
                format!(
                    "; tags [{}]; not passing [{}]",
                    posture.tags.join(", "),
                    failing.join(", ")
                )
            },
        );
        e.posture = Some(posture);
        e
    }

    /// A Device Inventory event with the agent's status.
    pub fn status_event(&self, probe: &ProbeFacts, stopping: bool) -> Event {
        let snap = self.state.snapshot();
        let state = if stopping {
            "stopping"
        } else if probe.degraded {
            "degraded"
        } else {
            "running"
        };
        let mut e = Event::new(
            sluice_inspect::new_guid(),
            unix_ms(std::time::SystemTime::now()),
            CLASS_DEVICE_INVENTORY,
            device_activity::COLLECT,
            "Collect",
            self.device(),
        );
        e.message = format!(
            "agent {state}: steering {}, proxy {}, spool {} events, {} dropped, {} corrupt",
            if probe.steering { "attached" } else { "off" },
            if probe.proxy { "listening" } else { "down" },
            snap.spool.events,
            snap.spool.dropped,
            snap.spool.corrupt,
        );
        e.agent_status = Some(proto::AgentStatus {
            state: state.into(),
            steering: probe.steering,
            proxy: probe.proxy,
            spool_events: snap.spool.events,
            spool_dropped: snap.spool.dropped,
            spool_corrupt: snap.spool.corrupt,
            last_error: probe.last_error.clone().or(snap.ship.last_error),
            bundle_expires_at: probe.bundle_expires_at,
            bundle_stale: probe.bundle_stale,
        });
        e
    }
}

impl Reporter for EventReporter {
    fn request(&self, rec: RequestRecord) {
        LogReporter.request(rec);
    }
    fn connection(&self, rec: ConnectionRecord) {
        // Nothing the proxy did not inspect goes unseen at the collector.
        let event = convert::connection_event(&rec, self.device());
        LogReporter.connection(rec);
        self.submit(&event);
    }
    fn activity(&self, ev: ActivityEvent) {
        let event = self.convert(&ev);
        match &self.lines {
            Some(l) => l.activity(ev),
            None => LogReporter.activity(ev),
        }
        self.submit(&event);
    }
}

/// What the status events say about the rest of the agent.
#[derive(Debug, Clone, Default)]
pub struct ProbeFacts {
    /// Steering attached.
    pub steering: bool,
    /// The proxy accepts.
    pub proxy: bool,
    /// A part failed.
    pub degraded: bool,
    /// The last error of the agent, when there is one.
    pub last_error: Option<String>,
    /// When the bundle in force stops being fresh (Unix seconds).
    pub bundle_expires_at: Option<u64>,
    /// Whether it has: still enforced, but stale.
    pub bundle_stale: bool,
}

/// Reads [`ProbeFacts`] when a status event is due.
pub type Probe = Arc<dyn Fn() -> ProbeFacts + Send + Sync>;

/// Reporting, opened: the reporter to give the proxy, and the tasks to run.
#[derive(Debug)]
pub struct Reporting {
    reporter: Arc<EventReporter>,
    shipper: Shipper,
    state: ReportHandle,
    posture_every: Duration,
    status_every: Duration,
    device: Option<Arc<crate::device::DeviceState>>,
}

impl Reporting {
    /// Sends the measured posture (check results and tags) in `device` with each posture event,
    /// and a posture event at once whenever the tags change.
    pub fn with_device(mut self, device: Arc<crate::device::DeviceState>) -> Self {
        self.device = Some(device);
        self
    }

    /// Records the public address the collector reports in `location`.
    pub fn with_location(mut self, location: Arc<crate::location::NetworkLocation>) -> Self {
        self.shipper = self.shipper.with_location(location);
        self
    }

    /// Opens the spool and prepares shipping, when a collector is configured or enrolled with;
    /// None otherwise.
    pub fn open(config: &Config, active: Option<Active>) -> Result<Option<Self>, ReportError> {
        let Some(target) = target(config)? else {
            return Ok(None);
        };
        let r = &config.report;
        let (spool, reader) = Spool::open(
            &config.state_dir.join("spool"),
            SpoolOptions {
                segment_bytes: r.spool_segment_bytes,
                max_bytes: r.spool_max_bytes,
                ..SpoolOptions::default()
            },
        )?;
        let shipper = Shipper::new(
            ShipSettings {
                collector: target.collector.clone(),
                collector_ca: target.collector_ca.clone(),
                fallbacks: target.fallbacks.clone(),
                credential_file: target.credential_file.clone(),
                agent_id: target.agent_id.clone(),
                max_events: r.batch_max_events,
                max_bytes: r.batch_max_bytes,
                retry_min: Duration::from_millis(r.retry_min_ms),
                retry_max: Duration::from_millis(r.retry_max_ms),
                timeout: Duration::from_secs(30),
            },
            reader,
        );
        if target.agent_id.is_empty() {
            tracing::warn!(collector = %target.collector, "not enrolled: events are spooled but not shipped until `sluice enroll --config FILE --token-file FILE` (or `--token-file -` to read it from standard input) (a token from `sluice-collector token create`)");
        }
        let lines = match &r.events_file {
            Some(p) => Some(
                JsonLinesReporter::open(p).map_err(|source| ReportError::Io {
                    path: p.clone(),
                    source,
                })?,
            ),
            None => None,
        };
        let state = Arc::new(ReportState {
            spool,
            ship: shipper.status(),
            unspooled: AtomicU64::new(0),
            target: target.clone(),
        });
        let mut reporter = EventReporter::new(
            state.clone(),
            DeviceInfo::local(&target.agent_id),
            config.device.posture,
            lines,
        );
        if let Some(a) = active {
            reporter = reporter.with_policies(a);
        }
        Ok(Some(Self {
            reporter: Arc::new(reporter),
            shipper,
            state,
            posture_every: Duration::from_secs(r.posture_interval_s.max(1)),
            status_every: Duration::from_secs(r.status_interval_s.max(1)),
            device: None,
        }))
    }

    /// The reporter for the proxy and the session controls.
    pub fn reporter(&self) -> Arc<EventReporter> {
        self.reporter.clone()
    }

    /// The state handle for `/status` and `/metrics`.
    pub fn handle(&self) -> ReportHandle {
        self.state.clone()
    }

    /// Ships and sends posture and status events until `shutdown`; then writes a last status
    /// event and closes the spool (every queued event is committed).
    pub async fn run(self, probe: Probe, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            reporter,
            shipper,
            state,
            posture_every,
            status_every,
            device,
        } = self;
        let location = shipper.location();
        let periodic = {
            let reporter = reporter.clone();
            let probe = probe.clone();
            let shutdown = shutdown.clone();
            async move {
                let posture_now = || async {
                    let mut p = posture::collect(&reporter.posture).await;
                    if let Some(l) = &location {
                        p.addresses = l.load().addresses.iter().map(ToString::to_string).collect();
                    }
                    if let Some(d) = &device {
                        p.checks = d.checks().as_ref().clone();
                        p.tags = d.tags().tags.iter().cloned().collect();
                    }
                    reporter.submit(&reporter.posture_event(p));
                };
                // A change of network is reported at once (gateways learn where the device is).
                let mut moved_tick = tokio::time::interval(Duration::from_secs(1));
                let mut moves = location.as_ref().map_or(0, |l| l.changes());
                let mut retags = device.as_ref().map_or(0, |d| d.tag_changes());
                let mut posture_tick = tokio::time::interval(posture_every);
                let mut status_tick = tokio::time::interval(status_every);
                posture_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = posture_tick.tick() => posture_now().await,
                        _ = moved_tick.tick() => {
                            // ... and so is a change of posture tags (an event of its own).
                            let now = location.as_ref().map_or(0, |l| l.changes());
                            let tags_now = device.as_ref().map_or(0, |d| d.tag_changes());
                            if now != moves || tags_now != retags {
                                moves = now;
                                retags = tags_now;
                                posture_now().await;
                            }
                        }
                        _ = status_tick.tick() => {
                            reporter.submit(&reporter.status_event(&probe(), false));
                        }
                    }
                }
            }
        };
        let (shipped, ()) = tokio::join!(shipper.run(shutdown.clone()), periodic);
        reporter.submit(&reporter.status_event(&probe(), true));
        let spool = state.spool.clone();
        let _ = tokio::task::spawn_blocking(move || spool.close()).await;
        shipped
    }
}
