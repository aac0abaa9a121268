//! The posture scheduler: evaluates the active bundle's `posture.yaml` at start, every
//! `interval_s`, and as soon as a new bundle is activated; swaps the tags its rules give into
//! the device state the session controls read (so the next request of every open session is
//! decided on them), and keeps the results for the Device Inventory events, which reporting
//! sends at once when the tags change.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{
    bundle::{Active, BundleStatus},
    device::{DeviceState, Tags},
};

/// How often the active bundle's revision is looked at (a new one is evaluated at once).
const BUNDLE_LOOK: Duration = Duration::from_secs(1);

/// What the scheduler needs.
#[derive(Debug)]
pub struct Watch {
    /// The active policy set.
    pub active: Active,
    /// The distributor's status (bundle freshness).
    pub bundle_status: Arc<std::sync::Mutex<BundleStatus>>,
    /// Where tags and results go.
    pub device: Arc<DeviceState>,
    /// The measured system's root.
    pub root: std::path::PathBuf,
    /// nftables tables of Sluice's own, left out of the firewall count.
    pub own_tables: Vec<String>,
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Watch {
    /// Evaluates until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut last_revision: Option<String> = None;
        let mut next_due = tokio::time::Instant::now();
        loop {
            let set = self.active.load_full();
            let revision = set.as_ref().map(|s| s.revision.clone());
            let now = tokio::time::Instant::now();
            if revision != last_revision || now >= next_due {
                last_revision.clone_from(&revision);
                let interval = match set.as_ref().and_then(|s| s.posture.clone()) {
                    Some(spec) => {
                        let every = Duration::from_secs(spec.interval_s.max(1));
                        self.evaluate(Arc::new(spec)).await;
                        every
                    }
                    None => {
                        // No posture.yaml: nothing is measured, no tag is given.
                        if self.device.set_tags(Tags::default()) {
                            tracing::info!("posture: the bundle measures nothing; no tags");
                        }
                        self.device.set_checks(Vec::new());
                        Duration::from_secs(300)
                    }
                };
                next_due = tokio::time::Instant::now() + interval;
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(BUNDLE_LOOK) => {}
            }
        }
    }

    async fn evaluate(&self, spec: Arc<sluice_policy::posture::Posture>) {
        let mut env = super::CheckEnv::new(&self.root);
        env.bundle_age_s = self
            .bundle_status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .confirmed_at
            .map(|t| now_s().saturating_sub(t));
        if spec
            .checks
            .iter()
            .any(|c| c.kind() == sluice_policy::posture::CheckKind::Firewall)
        {
            env.firewall = Some(super::firewall::measure(&self.root, &self.own_tables).await);
        }
        let results = super::run(spec.clone(), env).await;
        let tags = spec.tags(&super::statuses(&results));
        let before = self.device.tags();
        let failing: Vec<String> = results
            .iter()
            .filter(|r| r.status != sluice_policy::posture::CheckStatus::Pass)
            .map(|r| format!("{} {}: {}", r.id, r.status.as_str(), r.detail))
            .collect();
        self.device.set_checks(
            results
                .iter()
                .map(super::CheckResult::to_protocol)
                .collect(),
        );
        let next = Tags {
            tags,
            evaluated: true,
        };
        if self.device.set_tags(next.clone()) {
            tracing::info!(
                from = ?before.tags,
                to = ?next.tags,
                not_passing = ?failing,
                "{}",
                if before.evaluated {
                    "posture tags changed"
                } else {
                    "posture measured"
                }
            );
        } else {
            tracing::debug!(tags = ?next.tags, "posture evaluated");
        }
    }
}
