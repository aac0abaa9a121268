//! Keeps the agent's credential fresh: the collector's credentials expire
//! (`[agents] credential_lifetime_s`, 30 days by default), and the agent exchanges its current
//! one for a new one half way through its life (`POST /api/v1/renew`), without a new enrollment.
//! The new credential is written (0600, atomically) before the enrollment records its times; the
//! one it replaces is still accepted by the collector for ten minutes, and a renewal whose
//! answer was lost is asked again with it. A credential from a collector that does not say when
//! it expires (enrolled before expiry existed) is renewed at once.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, header};
use sluice_protocol::RenewResponse;
use tokio_util::sync::CancellationToken;

use super::{
    Target,
    client::{self as collector_client, MAX_ANSWER},
    enroll::{self, Enrollment},
};

/// The renewal path.
pub const RENEW_PATH: &str = "/api/v1/renew";
/// Longest wait between looks at the enrollment.
pub const CHECK_EVERY: Duration = Duration::from_secs(3600);
/// Wait after a failed renewal.
pub const RETRY: Duration = Duration::from_secs(30);

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// When the credential of `e` is due for renewal (Unix seconds): half way through its life.
pub fn due(e: &Enrollment) -> u64 {
    match e.credential_expires_at {
        None => 0,
        Some(expires) => {
            let issued = e.credential_issued_at.unwrap_or(e.enrolled_at).min(expires);
            issued + (expires - issued) / 2
        }
    }
}

/// Renews the credential once: the new expiry (Unix seconds).
pub async fn renew_once(target: &Target, state_dir: &Path) -> anyhow::Result<u64> {
    let mut e = enroll::load(state_dir)?
        .ok_or_else(|| anyhow::anyhow!("not enrolled: nothing to renew"))?;
    let current =
        super::ship::read_credential(&target.credential_file).map_err(anyhow::Error::msg)?;
    let mut client =
        collector_client::collector(&target.collector, target.collector_ca.as_deref())?;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::AUTHORIZATION,
        crate::client::header_value(&format!("Bearer {current}"))?,
    );
    let answer = client
        .request(
            Method::POST,
            RENEW_PATH,
            headers,
            Bytes::new(),
            Duration::from_secs(30),
            MAX_ANSWER,
        )
        .await?;
    anyhow::ensure!(
        answer.status == StatusCode::OK,
        "the collector answered {}: {}",
        answer.status,
        String::from_utf8_lossy(&answer.body[..answer.body.len().min(300)])
    );
    let resp: RenewResponse = serde_json::from_slice(&answer.body)?;
    anyhow::ensure!(
        !resp.credential.trim().is_empty()
            && !resp.credential.chars().any(|c| c.is_control() || c == ' '),
        "the renewal's credential is empty or unusable"
    );
    enroll::write_private(
        &target.credential_file,
        format!("{}\n", resp.credential).as_bytes(),
        0o600,
    )?;
    e.credential_issued_at = Some(now_s());
    e.credential_expires_at = Some(resp.credential_expires_at);
    enroll::write_private(
        &enroll::enrollment_path(state_dir),
        &serde_json::to_vec_pretty(&e)?,
        0o600,
    )?;
    Ok(resp.credential_expires_at)
}

/// Renews the credential whenever it is due, until `shutdown`.
pub async fn keep_fresh(
    target: Target,
    state_dir: PathBuf,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let wait = match enroll::load(&state_dir) {
            Ok(Some(e)) if e.agent_id == target.agent_id => {
                let (due, now) = (due(&e), now_s());
                if due <= now {
                    match renew_once(&target, &state_dir).await {
                        Ok(expires) => {
                            tracing::info!(expires_at = expires, "agent credential renewed");
                            Duration::ZERO
                        }
                        Err(err) => {
                            tracing::warn!(error = %err, "the agent credential could not be renewed; trying again");
                            RETRY
                        }
                    }
                } else {
                    Duration::from_secs(due - now).min(CHECK_EVERY)
                }
            }
            Ok(_) => CHECK_EVERY,
            Err(err) => {
                tracing::warn!(error = %err, "reading the enrollment");
                CHECK_EVERY
            }
        };
        if wait.is_zero() {
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(issued: Option<u64>, expires: Option<u64>) -> Enrollment {
        Enrollment {
            agent_id: "ag".into(),
            collector: "https://c".into(),
            collector_ca: None,
            group: String::new(),
            enrolled_at: 100,
            credential_issued_at: issued,
            credential_expires_at: expires,
        }
    }

    #[test]
    fn renewal_is_due_half_way() {
        assert_eq!(due(&e(Some(1000), Some(3000))), 2000);
        // Issued at enrollment when the renewal time is not recorded.
        assert_eq!(due(&e(None, Some(300))), 200);
        // No expiry said: at once.
        assert_eq!(due(&e(Some(1000), None)), 0);
    }
}
