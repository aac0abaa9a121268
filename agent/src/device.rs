//! What decisions know of this device and of its users beyond the request itself: the posture
//! tags the bundle's `posture.yaml` rules gave at the last evaluation, and the central marks (a
//! user's risk, this device's mark) the collector sent on its risk channel. Both are swapped whole
//! when they change and read by every request, so a change applies to the next request of every
//! open session.
//!
//! A mark is honoured until its own expiry by the agent's clock as well, so a mark that lapsed
//! while the collector was away stops applying; and the last marks received are kept in the
//! state directory, so an agent that restarts without its collector still applies them (an
//! unreachable collector lowers nobody's risk).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
};

use arc_swap::ArcSwap;
use sluice_policy::model::{DeviceRisk, UserRisk};
use sluice_protocol::risk::RiskState;

/// File the last marks are kept in, under the state directory.
const RISK_FILE: &str = "risk.json";

/// The posture tags at one evaluation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tags {
    /// The tags.
    pub tags: BTreeSet<String>,
    /// Whether posture was evaluated at all (no `posture.yaml`: never).
    pub evaluated: bool,
}

/// What `/status` (and `sluice status`) shows of it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceView {
    /// The posture tags policies see now.
    pub tags: Vec<String>,
    /// Whether posture was measured (the bundle has a `posture.yaml`).
    pub measured: bool,
    /// The last evaluation's results.
    pub checks: Vec<sluice_protocol::PostureCheck>,
    /// This device's central mark.
    pub mark: &'static str,
    /// Users at risk, by the collector's marks.
    pub users_at_risk: usize,
    /// The revision of the marks held.
    pub risk_revision: u64,
}

/// The device's state, shared by the session controls, the posture scheduler and the risk
/// poller.
#[derive(Debug, Default)]
pub struct DeviceState {
    tags: ArcSwap<Tags>,
    /// The last evaluation's check results, as the collector receives them.
    checks: ArcSwap<Vec<sluice_protocol::PostureCheck>>,
    /// How many times the tags changed (reporting sends a posture event at each).
    changes: std::sync::atomic::AtomicU64,
    risk: ArcSwap<RiskState>,
    keep: Option<PathBuf>,
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl DeviceState {
    /// A state that keeps its marks in `state_dir` (and starts from the ones kept there).
    pub fn kept_in(state_dir: &Path) -> Self {
        let keep = state_dir.join(RISK_FILE);
        let risk = std::fs::read(&keep)
            .ok()
            .and_then(|b| serde_json::from_slice::<RiskState>(&b).ok())
            .unwrap_or_default();
        Self {
            risk: ArcSwap::from_pointee(risk),
            keep: Some(keep),
            ..Self::default()
        }
    }

    /// The posture tags now.
    pub fn tags(&self) -> Arc<Tags> {
        self.tags.load_full()
    }

    /// Sets the posture tags; true when they changed.
    pub fn set_tags(&self, next: Tags) -> bool {
        if *self.tags.load_full() == next {
            return false;
        }
        self.tags.store(Arc::new(next));
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// What `/status` shows.
    pub fn view(&self) -> DeviceView {
        let tags = self.tags();
        let risk = self.risk();
        DeviceView {
            tags: tags.tags.iter().cloned().collect(),
            measured: tags.evaluated,
            checks: self.checks().as_ref().clone(),
            mark: self.device_risk().0.as_str(),
            users_at_risk: risk.users.len(),
            risk_revision: risk.revision,
        }
    }

    /// The checks of the last evaluation that did not pass, for block messages (`{posture}`):
    /// `disk: fail (the root file system ... is not on dm-crypt)`.
    pub fn not_passing(&self) -> String {
        self.checks()
            .iter()
            .filter(|c| c.status != "pass")
            .map(|c| format!("{}: {} ({})", c.id, c.status, c.detail))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// How many times the posture tags changed since the start.
    pub fn tag_changes(&self) -> u64 {
        self.changes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The last evaluation's results.
    pub fn checks(&self) -> Arc<Vec<sluice_protocol::PostureCheck>> {
        self.checks.load_full()
    }

    /// Keeps the last evaluation's results.
    pub fn set_checks(&self, checks: Vec<sluice_protocol::PostureCheck>) {
        self.checks.store(Arc::new(checks));
    }

    /// The marks now.
    pub fn risk(&self) -> Arc<RiskState> {
        self.risk.load_full()
    }

    /// The revision of the marks held.
    pub fn risk_revision(&self) -> u64 {
        self.risk.load().revision
    }

    /// Takes the collector's marks (and keeps them on disk).
    pub fn set_risk(&self, next: RiskState) {
        if let Some(path) = &self.keep {
            let tmp = path.with_extension("json.tmp");
            let written = serde_json::to_vec(&next)
                .map_err(std::io::Error::other)
                .and_then(|b| std::fs::write(&tmp, b))
                .and_then(|()| std::fs::rename(&tmp, path));
            if let Err(e) = written {
                tracing::warn!(error = %e, path = %path.display(), "keeping the risk marks");
            }
        }
        self.risk.store(Arc::new(next));
    }

    /// `user`'s risk now and why (an unknown level from a newer collector counts as
    /// suspended: the highest, never none).
    pub fn user_risk(&self, user: Option<&str>) -> (UserRisk, Option<String>) {
        let Some(user) = user else {
            return (UserRisk::None, None);
        };
        let now = now_s();
        let risk = self.risk.load();
        risk.users
            .iter()
            .filter(|m| m.user.eq_ignore_ascii_case(user))
            .filter(|m| m.expires_at.is_none_or(|e| e > now))
            .map(|m| {
                (
                    UserRisk::parse(&m.risk).unwrap_or(UserRisk::Suspended),
                    Some(m.reason.clone()),
                )
            })
            .max_by_key(|(r, _)| *r)
            .unwrap_or((UserRisk::None, None))
    }

    /// This device's mark now and why (an unknown mark counts as quarantined).
    pub fn device_risk(&self) -> (DeviceRisk, Option<String>) {
        let now = now_s();
        let risk = self.risk.load();
        risk.devices
            .iter()
            .filter(|m| m.expires_at.is_none_or(|e| e > now))
            .map(|m| {
                (
                    DeviceRisk::parse(&m.mark).unwrap_or(DeviceRisk::Quarantined),
                    Some(m.reason.clone()),
                )
            })
            .max_by_key(|(r, _)| *r)
            .unwrap_or((DeviceRisk::None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_protocol::risk::{DeviceMark, UserMark};

    #[test]
    fn marks_apply_until_they_lapse_and_unknown_levels_fail_closed() {
        let dir = std::env::temp_dir().join(format!("sluice-device-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let s = DeviceState::kept_in(&dir);
        let mark = |user: &str, risk: &str, expires_at| UserMark {
            user: user.into(),
            risk: risk.into(),
            reason: format!("{risk} reason"),
            alert: None,
            expires_at,
        };
        s.set_risk(RiskState {
            revision: 3,
            users: vec![
                mark("bob@example.com", "high", None),
                mark("carol@example.com", "high", Some(1)),
                mark("dave@example.com", "extreme", None),
            ],
            devices: vec![DeviceMark {
                device: "me".into(),
                mark: "untrusted".into(),
                reason: "r".into(),
                expires_at: None,
            }],
        });
        assert_eq!(s.user_risk(Some("Bob@Example.com")).0, UserRisk::High);
        assert_eq!(
            s.user_risk(Some("bob@example.com")).1.as_deref(),
            Some("high reason")
        );
        assert_eq!(s.user_risk(Some("carol@example.com")).0, UserRisk::None);
        assert_eq!(s.user_risk(Some("dave@example.com")).0, UserRisk::Suspended);
        assert_eq!(s.user_risk(None).0, UserRisk::None);
        assert_eq!(s.device_risk().0, DeviceRisk::Untrusted);
        // Kept: a restart without the collector still applies them.
        let again = DeviceState::kept_in(&dir);
        assert_eq!(again.risk_revision(), 3);
        assert_eq!(again.user_risk(Some("bob@example.com")).0, UserRisk::High);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
