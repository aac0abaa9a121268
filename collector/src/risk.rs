//! The risk board: users' risk and devices' marks, the part of what the collector knows that
//! changes decisions on agents. Detectors raise a user's risk for a while when they open an
//! alert; admins mark users (risky, suspended) and devices (untrusted, quarantined) from the
//! portal or the API; resolving or dismissing the alert lowers the risk it raised. The marks live
//! in the store (they survive restarts); the board keeps the current [`RiskState`] in memory,
//! and every change bumps its revision and wakes the agents' long polls on `GET /api/v1/risk`
//! at once. Lapsed marks are removed by [`RiskBoard::expire`], which the server runs every
//! second. Every change is an event in the activity log (app `sluice`, activity `risk`).

use std::sync::{Arc, Mutex};

use crate::db::OptionalRow as _;
use arc_swap::ArcSwap;
use sluice_policy::model::{DeviceRisk, UserRisk};
use sluice_protocol::{
    Actor, CLASS_DEVICE_INVENTORY, Device, Event, Sluice, User,
    risk::{DeviceMark, RiskState, UserMark},
};

use crate::store::{IngestOptions, Store, StoreError};

/// Tables of the marks (a migration).
pub const SCHEMA: &str = "
CREATE TABLE risk_marks(
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    level TEXT NOT NULL,
    reason TEXT NOT NULL,
    alert TEXT,
    set_by TEXT NOT NULL,
    set_at INTEGER NOT NULL,
    expires_at INTEGER,
    PRIMARY KEY(kind, subject)
);
CREATE TABLE risk_revision(id INTEGER PRIMARY KEY CHECK (id = 1), revision INTEGER NOT NULL);
INSERT INTO risk_revision(id, revision) VALUES (1, 0);
";

/// Errors of the board.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// SQL.
    #[error("database: {0}")]
    Sql(#[from] crate::db::DbError),
    /// A subject that cannot be marked.
    #[error("{0}")]
    Invalid(String),
}

const USER: &str = "user";
const DEVICE: &str = "device";
/// Longest reason kept (bytes).
const MAX_REASON: usize = 500;

/// The board.
#[derive(Debug)]
pub struct RiskBoard {
    current: ArcSwap<RiskState>,
    notify: tokio::sync::watch::Sender<u64>,
    /// Serialises read-modify-write of the marks with the reload that follows.
    write: Mutex<()>,
}

/// A mark as stored: level, the alert that raised it, expiry.
type Held = (String, Option<String>, Option<u64>);

/// What a change did, for its event.
struct Change<'a> {
    kind: &'static str,
    subject: &'a str,
    from: Option<String>,
    to: &'a str,
    reason: &'a str,
    alert: Option<&'a str>,
    by: &'a str,
    expires_at: Option<u64>,
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn clip(s: &str) -> String {
    let mut end = s.len().min(MAX_REASON);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Whether `s` can name a user (an e-mail) or a device (an agent id).
fn valid_subject(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 320
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'<' | b'>' | b'"' | b'\'' | b'&'))
}

impl RiskBoard {
    /// The board over the marks in `store`.
    pub fn open(store: &Store) -> Result<Self, Error> {
        let me = Self::empty();
        me.reload(store)?;
        Ok(me)
    }

    /// A board with no marks (when the store could not be read).
    pub fn empty() -> Self {
        let (notify, _) = tokio::sync::watch::channel(0);
        Self {
            current: ArcSwap::from_pointee(RiskState::default()),
            notify,
            write: Mutex::new(()),
        }
    }

    /// The marks now.
    pub fn state(&self) -> Arc<RiskState> {
        self.current.load_full()
    }

    /// Changes wake this (long polls wait on it).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.notify.subscribe()
    }

    /// Reads the marks again from the store (after a change, or one made by another collector
    /// sharing it).
    pub fn reload(&self, store: &Store) -> Result<(), Error> {
        let now = now_s();
        let state = store.with_read(|c| {
            let revision: i64 = c.query_row(
                "SELECT revision FROM risk_revision WHERE id = 1",
                crate::args![],
                |r| r.get(0),
            )?;
            let mut st = c.prepare(
                "SELECT kind, subject, level, reason, alert, expires_at FROM risk_marks \
                 ORDER BY kind, subject",
            )?;
            let rows = st.query_map(crate::args![], |r| {
                Ok((
                    r.get::<String>(0)?,
                    r.get::<String>(1)?,
                    r.get::<String>(2)?,
                    r.get::<String>(3)?,
                    r.get::<Option<String>>(4)?,
                    r.get::<Option<i64>>(5)?,
                ))
            })?;
            let mut s = RiskState {
                revision: u64::try_from(revision).unwrap_or(0),
                ..RiskState::default()
            };
            for row in rows {
                let (kind, subject, level, reason, alert, expires) = row?;
                let expires_at = expires.and_then(|e| u64::try_from(e).ok());
                if expires_at.is_some_and(|e| e <= now) {
                    continue;
                }
                if kind == USER {
                    s.users.push(UserMark {
                        user: subject,
                        risk: level,
                        reason,
                        alert,
                        expires_at,
                    });
                } else {
                    s.devices.push(DeviceMark {
                        device: subject,
                        mark: level,
                        reason,
                        expires_at,
                    });
                }
            }
            Ok(s)
        })?;
        let changed = self.current.load().revision != state.revision;
        self.current.store(Arc::new(state));
        if changed {
            self.notify.send_modify(|v| *v = v.wrapping_add(1));
        }
        Ok(())
    }

    /// Raises `user`'s risk to `level` (a higher risk already there stays), until `expires_at`
    /// (unix seconds; none: until lowered), because of `alert` when a detector raised it.
    #[allow(clippy::too_many_arguments)]
    pub fn raise_user(
        &self,
        store: &Store,
        user: &str,
        level: UserRisk,
        expires_at: Option<u64>,
        reason: &str,
        alert: Option<&str>,
        by: &str,
    ) -> Result<(), Error> {
        let user = user.to_ascii_lowercase();
        if !valid_subject(&user) {
            return Err(Error::Invalid(format!("{user:?} is not a user's e-mail")));
        }
        if level == UserRisk::None {
            return self.set(store, USER, &user, "none", reason, None, by, None);
        }
        let now = now_s();
        let existing = self.existing(store, USER, &user)?;
        if let Some((have, _, have_expires)) = &existing
            && have_expires.is_none_or(|e| e > now)
            && UserRisk::parse(have).is_some_and(|h| h > level)
        {
            return Ok(());
        }
        self.set(
            store,
            USER,
            &user,
            level.as_str(),
            reason,
            alert,
            by,
            expires_at,
        )
    }

    /// Sets `user`'s risk exactly (an admin's mark; `None` lifts whatever is there).
    pub fn mark_user(
        &self,
        store: &Store,
        user: &str,
        level: UserRisk,
        for_s: Option<u64>,
        reason: &str,
        by: &str,
    ) -> Result<(), Error> {
        let user = user.to_ascii_lowercase();
        if !valid_subject(&user) {
            return Err(Error::Invalid(format!("{user:?} is not a user's e-mail")));
        }
        let expires_at = for_s.map(|s| now_s().saturating_add(s));
        self.set(
            store,
            USER,
            &user,
            level.as_str(),
            reason,
            None,
            by,
            expires_at,
        )
    }

    /// Marks device `device` (an agent id; `None` lifts the mark).
    pub fn mark_device(
        &self,
        store: &Store,
        device: &str,
        mark: DeviceRisk,
        for_s: Option<u64>,
        reason: &str,
        by: &str,
    ) -> Result<(), Error> {
        if !valid_subject(device) {
            return Err(Error::Invalid(format!("{device:?} is not a device id")));
        }
        let expires_at = for_s.map(|s| now_s().saturating_add(s));
        self.set(
            store,
            DEVICE,
            device,
            mark.as_str(),
            reason,
            None,
            by,
            expires_at,
        )
    }

    /// Lowers the risk `alert` raised (when that alert is still what holds it): called when the
    /// alert is resolved or dismissed.
    pub fn clear_alert(&self, store: &Store, alert: &str, by: &str) -> Result<(), Error> {
        let held: Vec<String> = store.with_read(|c| {
            let mut st =
                c.prepare("SELECT subject FROM risk_marks WHERE kind = ?1 AND alert = ?2")?;
            let rows = st.query_map(crate::args![USER, alert], |r| r.get(0))?;
            rows.collect()
        })?;
        for user in held {
            self.set(
                store,
                USER,
                &user,
                "none",
                &format!("alert {alert} closed"),
                Some(alert),
                by,
                None,
            )?;
        }
        Ok(())
    }

    /// Removes the marks that lapsed (each an event); true when any did.
    pub fn expire(&self, store: &Store) -> Result<bool, Error> {
        let now = i64::try_from(now_s()).unwrap_or(i64::MAX);
        let lapsed: Vec<(String, String, String, Option<String>)> = store.with_read(|c| {
            let mut st = c.prepare(
                "SELECT kind, subject, level, alert FROM risk_marks \
                 WHERE expires_at IS NOT NULL AND expires_at <= ?1",
            )?;
            let rows = st.query_map([now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
            rows.collect()
        })?;
        for (kind, subject, _, alert) in &lapsed {
            let kind = if kind == USER { USER } else { DEVICE };
            self.set(
                store,
                kind,
                subject,
                "none",
                "the mark lapsed",
                alert.as_deref(),
                "expiry",
                None,
            )?;
        }
        Ok(!lapsed.is_empty())
    }

    /// The mark on `subject`: level, alert, expiry.
    fn existing(&self, store: &Store, kind: &str, subject: &str) -> Result<Option<Held>, Error> {
        Ok(store.with_read(|c| {
            c.query_row(
                "SELECT level, alert, expires_at FROM risk_marks WHERE kind = ?1 AND subject = ?2",
                crate::args![kind, subject],
                |r| {
                    Ok((
                        r.get::<String>(0)?,
                        r.get::<Option<String>>(1)?,
                        r.get::<Option<i64>>(2)?.and_then(|e| u64::try_from(e).ok()),
                    ))
                },
            )
            .optional()
        })?)
    }

    /// Writes one mark (`none` deletes it), bumps the revision, records the event and wakes
    /// the long polls.
    #[allow(clippy::too_many_arguments)]
    fn set(
        &self,
        store: &Store,
        kind: &'static str,
        subject: &str,
        level: &str,
        reason: &str,
        alert: Option<&str>,
        by: &str,
        expires_at: Option<u64>,
    ) -> Result<(), Error> {
        let _one = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let reason = clip(reason);
        let now = now_s();
        let from = store.with_write(|tx| -> Result<Option<String>, crate::db::DbError> {
            let from: Option<String> = tx
                .query_row(
                    "SELECT level FROM risk_marks WHERE kind = ?1 AND subject = ?2",
                    crate::args![kind, subject],
                    |r| r.get(0),
                )
                .optional()?;
            if level == "none" {
                if from.is_none() {
                    return Ok(None);
                }
                tx.execute(
                    "DELETE FROM risk_marks WHERE kind = ?1 AND subject = ?2",
                    crate::args![kind, subject],
                )?;
            } else {
                tx.execute(
                    "INSERT INTO risk_marks(kind, subject, level, reason, alert, set_by, set_at, \
                     expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                     ON CONFLICT(kind, subject) DO UPDATE SET level = ?3, reason = ?4, \
                     alert = ?5, set_by = ?6, set_at = ?7, expires_at = ?8",
                    crate::args![
                        kind,
                        subject,
                        level,
                        reason,
                        alert,
                        by,
                        i64::try_from(now).unwrap_or(i64::MAX),
                        expires_at.map(|e| i64::try_from(e).unwrap_or(i64::MAX)),
                    ],
                )?;
            }
            tx.execute(
                "UPDATE risk_revision SET revision = revision + 1 WHERE id = 1",
                crate::args![],
            )?;
            // The other collectors on the same database reload their boards.
            Store::notify(tx, crate::store::NOTIFY_RISK)?;
            Ok(Some(from.unwrap_or_else(|| "none".into())))
        })?;
        let Some(from) = from else {
            // Lifting what is not there changes nothing.
            return Ok(());
        };
        self.reload(store)?;
        tracing::info!(kind, subject, from, to = level, by, reason, "risk changed");
        record(
            store,
            &Change {
                kind,
                subject,
                from: Some(from),
                to: level,
                reason: &reason,
                alert,
                by,
                expires_at,
            },
        );
        Ok(())
    }
}

/// Records a change in the activity log (a failure to is logged: the change stands).
fn record(store: &Store, ch: &Change<'_>) {
    let id = match crate::store::random_secret("") {
        Ok(id) => id,
        Err(e) => {
            tracing::error!(error = %e, "no randomness for a risk event");
            return;
        }
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let mut e = Event::new(
        id,
        now_ms,
        CLASS_DEVICE_INVENTORY,
        99,
        "Other",
        Device {
            hostname: "collector".into(),
            uid: if ch.kind == DEVICE {
                ch.subject.to_owned()
            } else {
                String::new()
            },
            ..Device::default()
        },
    );
    let raised = ch.to != "none";
    e.severity_id = if raised { 3 } else { 1 };
    let what = if ch.kind == USER { "user" } else { "device" };
    let from = ch.from.as_deref().unwrap_or("none");
    e.message = match ch.expires_at {
        Some(until) if raised => format!(
            "{what} {} risk {from} -> {} until {until} by {}: {}",
            ch.subject, ch.to, ch.by, ch.reason
        ),
        _ => format!(
            "{what} {} risk {from} -> {} by {}: {}",
            ch.subject, ch.to, ch.by, ch.reason
        ),
    };
    if ch.kind == USER {
        e.actor = Actor {
            user: Some(User {
                email_addr: ch.subject.to_owned(),
                ..User::default()
            }),
            process: None,
        };
    }
    e.sluice = Some(Sluice {
        app: "sluice".into(),
        activity: "risk".into(),
        action: if raised { "monitor" } else { "allow" }.into(),
        decided_by: ch.by.to_owned(),
        policy: ch.alert.map(|a| format!("alert {a}")),
        incident: ch.alert.unwrap_or_default().to_owned(),
        detail: Some(format!("{what}_risk={}", ch.to)),
        ..Sluice::default()
    });
    let line = serde_json::to_vec(&e).unwrap_or_default();
    if let Err(err) = store.ingest(&line, IngestOptions::default()) {
        tracing::error!(error = %err, "recording a risk change");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn board(tag: &str) -> (Dir, Store, RiskBoard) {
        let dir = std::env::temp_dir().join(format!("sluice-risk-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open_with(&dir.join("db.sqlite"), &[("risk_0001", SCHEMA)]).expect("db");
        let b = RiskBoard::open(&store).expect("board");
        (Dir(dir), store, b)
    }

    #[test]
    fn raise_lower_and_keep_the_higher() {
        let (_d, store, b) = board("raise");
        let mut rx = b.subscribe();
        b.raise_user(
            &store,
            "Bob@Example.com",
            UserRisk::High,
            None,
            "alert a1: mass download",
            Some("a1"),
            "detector",
        )
        .expect("raise");
        assert!(rx.has_changed().expect("sender"));
        rx.mark_unchanged();
        let s = b.state();
        assert_eq!(s.users.len(), 1);
        assert_eq!(s.users[0].user, "bob@example.com");
        assert_eq!(s.users[0].risk, "high");
        let r1 = s.revision;
        // A lower raise does not lower it; a different alert's closing does not clear it.
        b.raise_user(
            &store,
            "bob@example.com",
            UserRisk::Medium,
            None,
            "x",
            Some("a2"),
            "d",
        )
        .expect("raise");
        b.clear_alert(&store, "a2", "admin").expect("clear");
        assert_eq!(b.state().users[0].risk, "high");
        assert_eq!(b.state().revision, r1);
        b.clear_alert(&store, "a1", "admin").expect("clear");
        assert!(b.state().users.is_empty());
        assert!(b.state().revision > r1);
        assert!(rx.has_changed().expect("sender"));
        // Each change is an event in the log.
        let n: i64 = store
            .with_read(|c| c.query_row("SELECT count(*) FROM events", crate::args![], |r| r.get(0)))
            .expect("count");
        assert_eq!(n, 2);
    }

    #[test]
    fn device_marks_lapse_and_survive_a_restart() {
        let (_d, store, b) = board("device");
        b.mark_device(
            &store,
            "agent-1",
            DeviceRisk::Quarantined,
            None,
            "stolen",
            "admin",
        )
        .expect("mark");
        b.mark_device(
            &store,
            "agent-2",
            DeviceRisk::Untrusted,
            Some(0),
            "x",
            "admin",
        )
        .expect("mark");
        // A mark that already lapsed is not served, and expiry removes it.
        assert_eq!(b.state().devices.len(), 1);
        assert!(b.expire(&store).expect("expire"));
        assert!(!b.expire(&store).expect("expire"));
        let again = RiskBoard::open(&store).expect("reopen");
        assert_eq!(again.state().devices[0].device, "agent-1");
        assert_eq!(again.state().devices[0].mark, "quarantined");
        assert!(
            b.mark_device(&store, "a<b", DeviceRisk::Untrusted, None, "", "x")
                .is_err()
        );
    }
}
