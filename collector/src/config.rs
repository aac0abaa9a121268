//! The collector's TOML configuration, parsed whole (unknown keys refused) before anything starts.
//!
//! ```toml
//! listen = "127.0.0.1:8443"            # default
//! state_dir = "/var/lib/sluice-collector"
//! server_names = ["collector.corp.example"]   # added to localhost, 127.0.0.1, ::1
//! retention_days = 90                   # default
//! bundle_public_key = "/etc/sluice/bundle.pub.pem"
//!
//! [limits]                              # all optional, defaults shown
//! max_body_compressed = 16777216
//! max_body_inflated = 134217728
//! max_query_len = 4096
//! max_page = 1000
//! max_long_poll_s = 300
//!
//! [[forward.syslog]]
//! address = "siem.corp.example:6514"
//! tls = true
//! ca_file = "/etc/sluice/siem-ca.pem"
//!
//! [[forward.webhook]]
//! url = "https://hooks.corp.example/sluice"
//! bearer_file = "/etc/sluice/hook.token"
//! ```

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

/// Errors of configuration loading.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid configuration.
    #[error("{path}: {detail}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the position.
        detail: String,
    },
    /// A value is out of range.
    #[error("{0}")]
    Invalid(String),
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address the HTTPS listener (API and portal) binds. Default `127.0.0.1:8443`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Where the database (`collector.db`) and the TLS material (`tls/`) live.
    pub state_dir: PathBuf,
    /// Extra DNS names or IP addresses for the server certificate (`localhost`, `127.0.0.1` and
    /// `::1` are always included).
    #[serde(default)]
    pub server_names: Vec<String>,
    /// Events older than this many days are deleted. Default 90; 0 keeps everything.
    #[serde(default = "default_retention_days")]
    pub retention_days: u32,
    /// The public key (PEM) published bundles must be signed with. Without it nothing can be
    /// published.
    #[serde(default)]
    pub bundle_public_key: Option<PathBuf>,
    /// Bounds on requests.
    #[serde(default)]
    pub limits: Limits,
    /// SIEM forwarding.
    #[serde(default)]
    pub forward: ForwardConfig,
}

/// Bounds on requests.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest ingestion body as sent (bytes). Default 16 MiB.
    pub max_body_compressed: u64,
    /// Largest ingestion body once inflated (bytes). Default 128 MiB.
    pub max_body_inflated: u64,
    /// Longest query text (bytes). Default 4096.
    pub max_query_len: usize,
    /// Largest page of events a query may ask. Default 1000.
    pub max_page: u32,
    /// Longest `Prefer: wait=N` honoured (seconds). Default 300.
    pub max_long_poll_s: u64,
    /// Most connections held at once (agents, portal users and API clients together); further
    /// ones are closed as soon as they are accepted. Default 4096.
    pub max_connections: usize,
    /// Most connections held at once from one client address (IPv4-mapped IPv6 counts as IPv4).
    /// Default 256: many agents behind one NAT gateway share an address.
    pub max_connections_per_address: usize,
    /// A connection that moves no byte for this long while none of its requests is being handled
    /// is closed (seconds). Default 120. Long polls are requests being handled, so they are
    /// never cut by it.
    pub idle_timeout_s: u64,
}

impl Limits {
    /// [`Limits::idle_timeout_s`] as a duration.
    pub fn idle_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.idle_timeout_s)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_compressed: 16 << 20,
            max_body_inflated: 128 << 20,
            max_query_len: 4096,
            max_page: 1000,
            max_long_poll_s: 300,
            max_connections: 4096,
            max_connections_per_address: 256,
            idle_timeout_s: 120,
        }
    }
}

/// Where events are forwarded after they are stored.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardConfig {
    /// Syslog (RFC 5424, octet-counted) receivers.
    #[serde(default)]
    pub syslog: Vec<SyslogTarget>,
    /// Webhooks (POST of a JSON array of events).
    #[serde(default)]
    pub webhook: Vec<WebhookTarget>,
    /// Events each target may hold in memory while its receiver is slow or down; past that new
    /// events are dropped for that target and counted. Default 10,000.
    #[serde(default = "default_queue")]
    pub queue: usize,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        Self {
            syslog: Vec::new(),
            webhook: Vec::new(),
            queue: default_queue(),
        }
    }
}

/// A syslog receiver.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyslogTarget {
    /// `host:port`.
    pub address: String,
    /// Speak TLS (RFC 5425) instead of plain TCP (RFC 6587).
    #[serde(default)]
    pub tls: bool,
    /// CA certificates (PEM) to verify the receiver with; default: the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The name to verify the receiver's certificate for; default: the host of `address`.
    #[serde(default)]
    pub server_name: Option<String>,
}

/// A webhook receiver.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookTarget {
    /// `http://` or `https://` URL.
    pub url: String,
    /// A file holding a bearer token sent as `Authorization: Bearer`.
    #[serde(default)]
    pub bearer_file: Option<PathBuf>,
    /// CA certificates (PEM) for an https URL; default: the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Most events in one POST. Default 500.
    #[serde(default = "default_batch")]
    pub batch: usize,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8443))
}
fn default_retention_days() -> u32 {
    90
}
fn default_queue() -> usize {
    10_000
}
fn default_batch() -> usize {
    500
}

impl Config {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { detail, .. } => ConfigError::Parse {
                path: path.to_owned(),
                detail,
            },
            other => other,
        })
    }

    /// Parses and checks configuration text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            detail: e.to_string(),
        })?;
        c.check()?;
        Ok(c)
    }

    /// A configuration with defaults for `state_dir` (tests and tools).
    pub fn with_state_dir(state_dir: PathBuf) -> Self {
        Self {
            listen: default_listen(),
            state_dir,
            server_names: Vec::new(),
            retention_days: default_retention_days(),
            bundle_public_key: None,
            limits: Limits::default(),
            forward: ForwardConfig::default(),
        }
    }

    fn check(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        if l.max_body_compressed == 0 || l.max_body_inflated < l.max_body_compressed {
            return Err(ConfigError::Invalid(
                "limits: max_body_inflated must be at least max_body_compressed, both non-zero"
                    .into(),
            ));
        }
        if l.max_page == 0 || l.max_query_len == 0 {
            return Err(ConfigError::Invalid(
                "limits: max_page and max_query_len must be non-zero".into(),
            ));
        }
        if l.max_connections == 0
            || l.max_connections_per_address == 0
            || l.max_connections_per_address > l.max_connections
        {
            return Err(ConfigError::Invalid(
                "limits: max_connections_per_address must be between 1 and max_connections".into(),
            ));
        }
        if l.idle_timeout_s == 0 {
            return Err(ConfigError::Invalid(
                "limits: idle_timeout_s must be non-zero".into(),
            ));
        }
        if self.forward.queue == 0 {
            return Err(ConfigError::Invalid(
                "forward.queue must be non-zero".into(),
            ));
        }
        for w in &self.forward.webhook {
            let uri: http::Uri = w.url.parse().map_err(|e| {
                ConfigError::Invalid(format!("forward.webhook url {:?}: {e}", w.url))
            })?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return Err(ConfigError::Invalid(format!(
                    "forward.webhook url {:?}: must be http:// or https:// with a host",
                    w.url
                )));
            }
            if w.batch == 0 {
                return Err(ConfigError::Invalid(
                    "forward.webhook batch must be non-zero".into(),
                ));
            }
        }
        for s in &self.forward.syslog {
            if s.address
                .rsplit_once(':')
                .is_none_or(|(_, p)| p.parse::<u16>().is_err())
            {
                return Err(ConfigError::Invalid(format!(
                    "forward.syslog address {:?}: expected host:port",
                    s.address
                )));
            }
        }
        Ok(())
    }

    /// The database file.
    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join("collector.db")
    }

    /// The TLS directory (`ca.pem`, `ca.key`, `server.pem`, `server.key`).
    pub fn tls_dir(&self) -> PathBuf {
        self.state_dir.join("tls")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_keys() {
        let c = Config::parse("state_dir = \"/tmp/x\"\n").unwrap();
        assert_eq!(c.listen, "127.0.0.1:8443".parse().unwrap());
        assert_eq!(c.retention_days, 90);
        assert_eq!(c.forward.queue, 10_000);
        assert_eq!(c.limits.max_body_compressed, 16 << 20);
        let e = Config::parse("state_dir = \"/x\"\nlisten_addr = \"1.2.3.4:1\"\n").unwrap_err();
        assert!(e.to_string().contains("listen_addr"), "{e}");
        let e = Config::parse("state_dir = \"/x\"\n[[forward.webhook]]\nurl = \"ftp://h/x\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("http"), "{e}");
        let c = Config::parse(
            "state_dir = \"/x\"\n[[forward.syslog]]\naddress = \"h:514\"\n[limits]\nmax_page = 10\n",
        )
        .unwrap();
        assert_eq!(c.forward.syslog.len(), 1);
        assert_eq!(c.limits.max_page, 10);
    }
}
