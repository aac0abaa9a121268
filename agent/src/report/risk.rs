//! The risk channel's client: long-polls the collector's `GET /api/v1/risk` (ETag,
//! `If-None-Match`, `Prefer: wait=N`, as bundles are fetched) with the agent's credential and
//! hands each new state of marks to the device state, so an alert raised or resolved at the
//! collector changes this agent's decisions within the time one answer takes to arrive.

use std::{sync::Arc, time::Duration};

use sluice_protocol::risk::RiskState;
use tokio_util::sync::CancellationToken;

use crate::device::DeviceState;

/// How long the collector is asked to hold a poll open.
pub const WAIT: Duration = Duration::from_secs(25);
/// Pause after a failed poll (doubling up to [`MAX_BACKOFF`]).
const BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(15);

/// Polls until `shutdown`.
pub async fn poll(
    target: super::Target,
    device: Arc<DeviceState>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // The collector, then its fallbacks in turn after failures.
    let urls: Vec<&str> = std::iter::once(target.collector.as_str())
        .chain(target.fallbacks.iter().map(String::as_str))
        .collect();
    let mut current = 0;
    let mut client = super::client::collector(urls[current], target.collector_ca.as_deref())?;
    let mut backoff = BACKOFF;
    loop {
        let etag = format!("\"r{}\"", device.risk_revision());
        let got = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            r = once(&mut client, &target, &etag) => r,
        };
        match got {
            Ok(Some(state)) => {
                tracing::info!(
                    revision = state.revision,
                    users = state.users.len(),
                    devices = state.devices.len(),
                    "risk marks"
                );
                device.set_risk(state);
                backoff = BACKOFF;
            }
            Ok(None) => backoff = BACKOFF,
            Err(e) => {
                tracing::warn!(error = %e, collector = urls[current], "polling the collector's risk marks");
                if urls.len() > 1 {
                    current = (current + 1) % urls.len();
                    client =
                        super::client::collector(urls[current], target.collector_ca.as_deref())?;
                }
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// One poll: the new state, or none when it did not change.
async fn once(
    client: &mut crate::client::Client,
    target: &super::Target,
    etag: &str,
) -> anyhow::Result<Option<RiskState>> {
    let credential =
        super::ship::read_credential(&target.credential_file).map_err(anyhow::Error::msg)?;
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        crate::client::header_value(&format!("Bearer {credential}"))?,
    );
    headers.insert(
        http::header::IF_NONE_MATCH,
        crate::client::header_value(etag)?,
    );
    headers.insert(
        "prefer",
        crate::client::header_value(&format!("wait={}", WAIT.as_secs()))?,
    );
    let answer = client
        .request(
            http::Method::GET,
            "/api/v1/risk",
            headers,
            bytes::Bytes::new(),
            WAIT + Duration::from_secs(10),
            super::client::MAX_ANSWER * 8,
        )
        .await?;
    match answer.status {
        http::StatusCode::NOT_MODIFIED => Ok(None),
        http::StatusCode::OK => Ok(Some(serde_json::from_slice(&answer.body)?)),
        s => anyhow::bail!("the collector answered {s}"),
    }
}
