//! Alerts: what the detectors found, kept in the store for people to work through (open →
//! acknowledged → resolved or dismissed), with the events that made them. A detector that
//! fires again for the same user while that user's alert of the same detector is open or
//! acknowledged, within its `dedup_s` of the alert's last evidence, adds to that alert (count
//! and evidence) instead of opening another. Each new alert and each change of state is also an
//! event in the activity log (app `sluice`, activity `alert`), like the risk board's changes.

use crate::db::OptionalRow as _;
use serde::Serialize;
use sluice_protocol::{Actor, Device, Event, Sluice, User};

use super::{
    config::{Rule, Severity},
    engine::{Evidence, Finding, MAX_EVIDENCE},
};
use crate::store::{IngestOptions, Store, StoreError, now_ms};

/// The alerts table (a migration).
pub const SCHEMA: &str = "
CREATE TABLE alerts(
    id TEXT PRIMARY KEY,
    detector TEXT NOT NULL,
    severity TEXT NOT NULL,
    \"user\" TEXT NOT NULL,
    device TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    title TEXT NOT NULL,
    summary TEXT NOT NULL,
    created INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    first_seen INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    count INTEGER NOT NULL,
    evidence TEXT NOT NULL,
    state_by TEXT,
    state_at INTEGER
);
CREATE INDEX alerts_created ON alerts(created);
CREATE INDEX alerts_first_seen ON alerts(first_seen);
CREATE INDEX alerts_user_detector ON alerts(\"user\", detector, last_seen);
";

/// Errors of the alerts.
#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    /// The store.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// SQL.
    #[error("database: {0}")]
    Sql(#[from] crate::db::DbError),
}

/// Where an alert is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// New.
    Open,
    /// Someone is on it.
    Acknowledged,
    /// Dealt with.
    Resolved,
    /// Not a problem.
    Dismissed,
}

impl State {
    /// Every state.
    pub const ALL: [State; 4] = [
        Self::Open,
        Self::Acknowledged,
        Self::Resolved,
        Self::Dismissed,
    ];

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Acknowledged => "acknowledged",
            Self::Resolved => "resolved",
            Self::Dismissed => "dismissed",
        }
    }

    /// The state named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// Open or acknowledged: still to be dealt with (and still holding any risk it raised).
    pub fn active(self) -> bool {
        matches!(self, Self::Open | Self::Acknowledged)
    }
}

/// One alert.
#[derive(Debug, Clone, Serialize)]
pub struct Alert {
    /// Id (hex).
    pub id: String,
    /// The detector's name.
    pub detector: String,
    /// `low`, `medium`, `high`, `critical`.
    pub severity: String,
    /// The user (lower case).
    pub user: String,
    /// The device of the event that opened it.
    pub device: String,
    /// `open`, `acknowledged`, `resolved`, `dismissed`.
    pub state: String,
    /// One line.
    pub title: String,
    /// The latest finding's figures.
    pub summary: String,
    /// Opened, Unix ms.
    pub created: i64,
    /// Last changed, Unix ms.
    pub updated: i64,
    /// The first evidence's time (Unix ms).
    pub first_seen: i64,
    /// The last evidence's time (Unix ms).
    pub last_seen: i64,
    /// How many times the detector fired into it.
    pub count: u64,
    /// The events that made it (newest last, at most 100).
    pub evidence: Vec<Evidence>,
    /// Who last changed its state.
    pub state_by: Option<String>,
    /// When, Unix ms.
    pub state_at: Option<i64>,
}

/// The columns of an alert row, as a literal for `concat!` (statements cached by their text).
macro_rules! columns {
    () => {
        "id, detector, severity, \"user\", device, state, title, summary, created, updated, \
         first_seen, last_seen, count, evidence, state_by, state_at"
    };
}

const COLUMNS: &str = columns!();

fn alert_row(r: &crate::db::Row) -> Result<Alert, crate::db::DbError> {
    let evidence: String = r.get(13)?;
    Ok(Alert {
        id: r.get(0)?,
        detector: r.get(1)?,
        severity: r.get(2)?,
        user: r.get(3)?,
        device: r.get(4)?,
        state: r.get(5)?,
        title: r.get(6)?,
        summary: r.get(7)?,
        created: r.get(8)?,
        updated: r.get(9)?,
        first_seen: r.get(10)?,
        last_seen: r.get(11)?,
        count: r.get::<i64>(12)?.max(0) as u64,
        evidence: serde_json::from_str(&evidence).unwrap_or_default(),
        state_by: r.get(14)?,
        state_at: r.get(15)?,
    })
}

/// What [`raise`] did.
#[derive(Debug, Clone)]
pub enum Raised {
    /// A new alert.
    New(Alert),
    /// Added to an open one.
    Repeat(Alert),
}

fn ms(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}

/// Opens an alert for `f`, or adds it to the user's open one of the same detector.
pub fn raise(store: &Store, rule: &Rule, f: &Finding) -> Result<Raised, AlertError> {
    let now = now_ms();
    store.with_write(|tx| raise_in(tx, now, rule, f))
}

/// [`raise`] for each finding of a detection batch and [`record`] (for `by`) of each alert
/// opened, all in one transaction: a commit costs far more than the few rows an alert writes,
/// and ingestion waits for the writer meanwhile. A later finding sees what an earlier one
/// opened, as with [`raise`] one at a time.
pub fn raise_all(
    store: &Store,
    found: &[(&Rule, &Finding)],
    by: &str,
) -> Result<Vec<Raised>, AlertError> {
    let now = now_ms();
    store.with_write(|tx| {
        let raised = found
            .iter()
            .map(|(rule, f)| raise_in(tx, now, rule, f))
            .collect::<Result<Vec<_>, _>>()?;
        let lines = record_lines(
            raised.iter().filter_map(|r| match r {
                Raised::New(a) => Some(a),
                Raised::Repeat(_) => None,
            }),
            by,
        );
        if !lines.is_empty() {
            let o = store.ingest_in(tx, &lines, IngestOptions::default())?;
            if o.rejected > 0 {
                tracing::error!(rejected = o.rejected, "recording alerts: events refused");
            }
        }
        Ok(raised)
    })
}

fn raise_in(
    tx: &crate::db::Conn,
    now: i64,
    rule: &Rule,
    f: &Finding,
) -> Result<Raised, AlertError> {
    let detector = rule.detector.as_str();
    let t = ms(f.time);
    let since = t.saturating_sub(ms(rule.dedup_ms));
    let existing = tx
        .prepare_cached(concat!(
            "SELECT ",
            columns!(),
            " FROM alerts WHERE \"user\" = ?1 AND detector = ?2 \
             AND state IN ('open', 'acknowledged') AND last_seen >= ?3 \
             ORDER BY last_seen DESC LIMIT 1"
        ))?
        .query_row(crate::args![f.user, detector, since], alert_row)
        .optional()?;
    if let Some(mut a) = existing {
        for e in &f.evidence {
            if !a.evidence.contains(e) {
                a.evidence.push(e.clone());
            }
        }
        let extra = a.evidence.len().saturating_sub(MAX_EVIDENCE);
        a.evidence.drain(..extra);
        a.count += 1;
        a.last_seen = a.last_seen.max(t);
        a.first_seen = a.first_seen.min(t);
        a.updated = now;
        a.summary.clone_from(&f.summary);
        tx.prepare_cached(
            "UPDATE alerts SET count = ?2, evidence = ?3, last_seen = ?4, first_seen = ?5, \
             updated = ?6, summary = ?7 WHERE id = ?1",
        )?
        .execute(crate::args![
            a.id,
            a.count as i64,
            serde_json::to_string(&a.evidence).unwrap_or_else(|_| "[]".into()),
            a.last_seen,
            a.first_seen,
            now,
            a.summary
        ])?;
        return Ok(Raised::Repeat(a));
    }
    let id: String = crate::store::random_secret("")?.chars().take(20).collect();
    let mut evidence = f.evidence.clone();
    let extra = evidence.len().saturating_sub(MAX_EVIDENCE);
    evidence.drain(..extra);
    let first = evidence
        .iter()
        .map(|e| ms(e.time))
        .min()
        .unwrap_or(t)
        .min(t);
    let a = Alert {
        id,
        detector: detector.to_owned(),
        severity: rule.severity.as_str().to_owned(),
        user: f.user.clone(),
        device: f.device.clone(),
        state: State::Open.as_str().to_owned(),
        title: f.title.clone(),
        summary: f.summary.clone(),
        created: now,
        updated: now,
        first_seen: first,
        last_seen: t,
        count: 1,
        evidence,
        state_by: None,
        state_at: None,
    };
    tx.prepare_cached(concat!(
        "INSERT INTO alerts(",
        columns!(),
        ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)"
    ))?
    .execute(crate::args![
        a.id,
        a.detector,
        a.severity,
        a.user,
        a.device,
        a.state,
        a.title,
        a.summary,
        a.created,
        a.updated,
        a.first_seen,
        a.last_seen,
        1i64,
        serde_json::to_string(&a.evidence).unwrap_or_else(|_| "[]".into()),
        Option::<String>::None,
        Option::<i64>::None
    ])?;
    Ok(Raised::New(a))
}

/// Which alerts a list shows (empty: any).
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// State.
    pub state: Option<State>,
    /// Severity.
    pub severity: Option<Severity>,
    /// Detector name.
    pub detector: Option<String>,
    /// User (compared in lower case).
    pub user: Option<String>,
}

/// The newest alerts matching `f`, at most `limit`.
pub fn list(store: &Store, f: &Filter, limit: u32) -> Result<Vec<Alert>, AlertError> {
    let mut sql = format!("SELECT {COLUMNS} FROM alerts WHERE 1 = 1");
    let mut args: Vec<String> = Vec::new();
    for (col, v) in [
        ("state", f.state.map(|s| s.as_str().to_owned())),
        ("severity", f.severity.map(|s| s.as_str().to_owned())),
        ("detector", f.detector.clone()),
        ("\"user\"", f.user.as_ref().map(|u| u.trim().to_lowercase())),
    ] {
        if let Some(v) = v {
            args.push(v);
            sql.push_str(&format!(" AND {col} = ?{}", args.len()));
        }
    }
    sql.push_str(&format!(" ORDER BY created DESC, id LIMIT {limit}"));
    Ok(store.with_read(|c| {
        let args: Vec<&dyn crate::db::Param> =
            args.iter().map(|a| a as &dyn crate::db::Param).collect();
        c.query_map(&sql, args, alert_row)
    })?)
}

/// One alert.
pub fn get(store: &Store, id: &str) -> Result<Option<Alert>, AlertError> {
    Ok(store.with_read(|c| {
        c.query_row(
            &format!("SELECT {COLUMNS} FROM alerts WHERE id = ?1"),
            [id],
            alert_row,
        )
        .optional()
    })?)
}

/// Sets `id`'s state; the alert after the change and the state before, or none when there is
/// no such alert.
pub fn set_state(
    store: &Store,
    id: &str,
    state: State,
    by: &str,
) -> Result<Option<(Alert, State)>, AlertError> {
    let now = now_ms();
    store.with_write(|tx| -> Result<_, AlertError> {
        let Some(mut a) = tx
            .query_row(
                &format!("SELECT {COLUMNS} FROM alerts WHERE id = ?1"),
                [id],
                alert_row,
            )
            .optional()?
        else {
            return Ok(None);
        };
        let before = State::parse(&a.state).unwrap_or(State::Open);
        tx.execute(
            "UPDATE alerts SET state = ?2, state_by = ?3, state_at = ?4, updated = ?4 WHERE id = ?1",
            crate::args![id, state.as_str(), by, now],
        )?;
        a.state = state.as_str().to_owned();
        a.state_by = Some(by.to_owned());
        a.state_at = Some(now);
        a.updated = now;
        Ok(Some((a, before)))
    })
}

/// Alerts per `bucket` (by the time of their first evidence) within `from..to` (Unix ms).
pub fn per_bucket(
    store: &Store,
    bucket: i64,
    from: i64,
    to: i64,
) -> Result<Vec<(i64, u64)>, AlertError> {
    let bucket = bucket.max(1);
    Ok(store.with_read(|c| {
        let mut st = c.prepare(
            "SELECT (first_seen / ?1) * ?1 AS b, count(*) FROM alerts \
             WHERE first_seen >= ?2 AND first_seen < ?3 GROUP BY b ORDER BY b",
        )?;
        let rows = st.query_map(crate::args![bucket, from, to], |r| {
            Ok((r.get::<i64>(0)?, r.get::<i64>(1)?.max(0) as u64))
        })?;
        rows.collect()
    })?)
}

/// The alert as forwarding targets get it: `{"type": "alert", ...}`.
pub fn forward_json(a: &Alert) -> bytes::Bytes {
    let mut v = serde_json::to_value(a).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("type".into(), "alert".into());
        o.insert("link".into(), format!("/alerts/{}", a.id).into());
    }
    bytes::Bytes::from(serde_json::to_vec(&v).unwrap_or_default())
}

/// Records an alert's opening or change of state in the activity log (a failure to is logged:
/// the alert stands). OCSF Detection Finding (2004): activity 1 create, 2 update, 3 close.
pub fn record(store: &Store, a: &Alert, by: &str) {
    record_all(store, &[a], by);
}

/// [`record`] for several alerts, stored in one transaction.
pub fn record_all(store: &Store, alerts: &[&Alert], by: &str) {
    let lines = record_lines(alerts.iter().copied(), by);
    if lines.is_empty() {
        return;
    }
    match store.ingest(&lines, IngestOptions::default()) {
        Ok(o) if o.rejected > 0 => {
            tracing::error!(rejected = o.rejected, "recording alerts: events refused");
        }
        Ok(_) => {}
        Err(err) => tracing::error!(error = %err, alerts = alerts.len(), "recording alerts"),
    }
}

/// The activity log's events of `alerts`, as JSON Lines.
fn record_lines<'a>(alerts: impl Iterator<Item = &'a Alert>, by: &str) -> Vec<u8> {
    let mut lines = Vec::new();
    for a in alerts {
        if let Some(line) = record_line(a, by) {
            lines.extend_from_slice(&line);
            lines.push(b'\n');
        }
    }
    lines
}

/// The activity log's event for `a`'s opening or change of state.
fn record_line(a: &Alert, by: &str) -> Option<Vec<u8>> {
    let id = match crate::store::random_secret("") {
        Ok(id) => id.chars().take(32).collect::<String>(),
        Err(e) => {
            tracing::error!(error = %e, alert = %a.id, "no randomness for an alert event");
            return None;
        }
    };
    let state = State::parse(&a.state).unwrap_or(State::Open);
    let (activity_id, name) = match state {
        State::Open => (1, "Create"),
        State::Acknowledged => (2, "Update"),
        State::Resolved | State::Dismissed => (3, "Close"),
    };
    let mut e = Event::new(
        id,
        u64::try_from(now_ms()).unwrap_or(0),
        2004,
        activity_id,
        name,
        Device {
            hostname: "collector".into(),
            uid: a.device.clone(),
            ..Device::default()
        },
    );
    e.class_name = "Detection Finding".into();
    e.category_uid = 2;
    e.severity_id = Severity::parse(&a.severity).map_or(1, Severity::ocsf);
    e.message = match state {
        State::Open => format!("alert {} opened: {} ({})", a.id, a.title, a.user),
        s => format!("alert {} {} by {by}: {}", a.id, s.as_str(), a.title),
    };
    e.actor = Actor {
        user: Some(User {
            email_addr: a.user.clone(),
            ..User::default()
        }),
        process: None,
    };
    e.sluice = Some(Sluice {
        app: "sluice".into(),
        activity: "alert".into(),
        action: "monitor".into(),
        decided_by: by.to_owned(),
        policy: Some(format!("alert {}", a.id)),
        incident: a.id.clone(),
        detail: Some(format!(
            "detector={} severity={} state={}",
            a.detector, a.severity, a.state
        )),
        ..Sluice::default()
    });
    serde_json::to_vec(&e).ok()
}
