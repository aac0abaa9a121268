//! The collector's release key: the public key `protect` seals passwords to, fetched from the
//! collector's `GET /api/v1/release-key` (with the agent's credential, over the verified TLS
//! connection every report uses) and kept in `<state_dir>/release-key.pub`, so an agent that
//! restarts while the collector is away still protects files.
//!
//! Only a public key is stored; a key that changed at the collector (rotated) replaces it at
//! the next poll.

use std::{path::Path, time::Duration};

use sluice_protocol::seal::SealingKey;
use tokio_util::sync::CancellationToken;

/// How often the key is asked for once known.
pub const REFRESH: Duration = Duration::from_secs(300);
/// How often it is asked for while not known.
pub const RETRY: Duration = Duration::from_secs(5);
const FILE: &str = "release-key.pub";

/// The key kept in `state_dir`, if any.
pub fn cached(state_dir: &Path) -> Option<SealingKey> {
    let text = std::fs::read_to_string(state_dir.join(FILE)).ok()?;
    SealingKey::from_base64(&text).ok()
}

fn store(state_dir: &Path, key: &SealingKey) -> std::io::Result<()> {
    let tmp = state_dir.join(format!("{FILE}.tmp"));
    std::fs::write(&tmp, key.to_base64())?;
    std::fs::rename(tmp, state_dir.join(FILE))
}

/// Polls the collector for its release key until `shutdown`, handing each new key to `set`.
pub async fn poll(
    target: super::Target,
    state_dir: std::path::PathBuf,
    set: impl Fn(SealingKey) + Send + 'static,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    #[derive(serde::Deserialize)]
    struct Answer {
        public_key: String,
    }
    let mut known = cached(&state_dir);
    if let Some(k) = &known {
        set(k.clone());
    }
    let mut client = super::client::collector(&target.collector, target.collector_ca.as_deref())?;
    loop {
        let got = async {
            let a: Answer = super::client::get_json(
                &mut client,
                &target.credential_file,
                "/api/v1/release-key",
            )
            .await?;
            Ok::<_, anyhow::Error>(SealingKey::from_base64(&a.public_key)?)
        }
        .await;
        match got {
            Ok(key) => {
                if known.as_ref() != Some(&key) {
                    tracing::info!(key_id = %key.id_hex(), "collector release key");
                    if let Err(e) = store(&state_dir, &key) {
                        tracing::warn!(error = %e, "keeping the release key");
                    }
                    set(key.clone());
                    known = Some(key);
                }
            }
            Err(e) => tracing::warn!(error = %e, "fetching the collector's release key"),
        }
        let wait = if known.is_some() { REFRESH } else { RETRY };
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(wait) => {}
        }
    }
}
