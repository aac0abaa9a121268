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

impl From<ClientError> for ReportError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Config(m) => Self::Config(m),
            ClientError::Http(m) | ClientError::TooLarge(m) => Self::Http(m),
        }
    }
}
