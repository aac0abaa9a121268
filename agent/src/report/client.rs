//! The collector as a server the agent talks to: the agent's one HTTP client ([`crate::client`])
//! made for the collector's URL, trusting the collector's CA when one is given (else the bundled
//! and system roots), https:// only since the agent's credential travels with every request.

use std::path::Path;

use super::ReportError;
use crate::client::{Client, ClientError};

/// Largest answer read from the collector.
pub const MAX_ANSWER: usize = 1 << 20;

/// A client of the collector at `url`, trusting `ca` (PEM) when given.
pub fn collector(url: &str, ca: Option<&Path>) -> Result<Client, ReportError> {
    let roots = match ca {
        Some(p) => crate::trust::root_store(false, false, &[p.to_owned()]),
        None => crate::trust::root_store(true, true, &[]),
    }
    .map_err(|e| ReportError::Config(format!("collector CA: {e}")))?;
    Client::new(url, roots, false).map_err(|e| match e {
        ClientError::Config(m) => ReportError::Config(format!("collector {m}")),
        other => ReportError::from(other),
    })
}

/// `GET path` on the collector with the agent's credential (read from `credential_file` each
/// time, so a re-enrollment takes effect): the JSON answer, or why there is none.
pub async fn get_json<T: serde::de::DeserializeOwned>(
    client: &mut Client,
    credential_file: &Path,
    path: &str,
) -> anyhow::Result<T> {
    let credential = super::ship::read_credential(credential_file).map_err(anyhow::Error::msg)?;
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        crate::client::header_value(&format!("Bearer {credential}"))?,
    );
    let answer = client
        .request(
            http::Method::GET,
            path,
            headers,
            bytes::Bytes::new(),
            std::time::Duration::from_secs(10),
            MAX_ANSWER,
        )
        .await?;
    anyhow::ensure!(
        answer.status == http::StatusCode::OK,
        "the collector answered {}",
        answer.status
    );
    Ok(serde_json::from_slice(&answer.body)?)
}

impl From<ClientError> for ReportError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Config(m) => Self::Config(m),
            ClientError::Http(m) | ClientError::TooLarge(m) => Self::Http(m),
        }
    }
}
