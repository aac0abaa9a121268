//! The collector's TOML configuration, parsed whole (unknown keys refused) before anything starts.
//!
//! ```toml
//! listen = "127.0.0.1:8443"            # default
//! state_dir = "/var/lib/sluice-collector"
//! server_names = ["collector.corp.example"]   # added to localhost, 127.0.0.1, ::1
//! retention_days = 90                   # default
//! ca_days = 825                         # default: the lifetime of the CA `init` makes
//! bundle_public_key = "/etc/sluice/bundle.pub.pem"
//!
//! [store]                               # optional: without it, SQLite in state_dir
//! postgres = "host=db.corp.example dbname=sluice user=sluice password=..."  # or a postgresql:// URL
//! max_connections = 16                  # default: connections this collector opens at most
//! ca_file = "/etc/sluice/db-ca.pem"     # optional: the database server's CA (default: system roots)
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
//! send = "alerts"                       # events (default), alerts or all
//!
//! [detection]                           # anomaly detection: on by default, see `detect::config`
//! [detection.mass_download]
//! floor = 100
//! raise_risk = { level = "high", for_s = 3600 }
//! [detection.geo]                       # new country and impossible travel
//! database = "/var/lib/GeoIP/GeoLite2-City.mmdb"
//!
//! [portal]
//! listen = "10.20.0.5:9443"             # optional: the portal and admins' API apart (HSTS)
//!
//! [portal.sign_in]                      # local admins' sign-in limits (these are the defaults)
//! max_failures_per_address = 5          # per IPv4 address or IPv6 /64, within window_s
//! max_failures_per_account = 10         # per account name, within window_s: locks the account
//! window_s = 300
//! lockout_s = 900                       # the first lock; each lock in a row doubles it (x16 at most)
//! concurrent_hashes = 2                 # password checks at once (19 MiB of argon2 memory each)
//! waiting_hashes = 8                    # attempts that may wait for a check; more get 429
//!
//! [portal.oidc]                         # sign-in with the organisation's identity provider
//! issuer = "https://login.corp.example/realms/corp"
//! client_id = "sluice-portal"
//! client_secret_file = "/etc/sluice/oidc.secret"   # optional: without it a public client (PKCE)
//! redirect_url = "https://collector.corp.example:8443/auth/oidc/callback"
//! ca_file = "/etc/sluice/idp-ca.pem"    # optional: default the system's roots
//! scopes = ["openid", "email", "profile"]   # default
//! groups_claim = "groups"               # default
//! admins = ["secops@corp.example", "group:sluice-admins"]
//! ```
//!
//! The identity provider's settings live under `[portal.oidc]` rather than a top-level `[oidc]`:
//! they configure who may use the portal and nothing else (agents never see them), and the
//! `[portal]` table leaves room for the portal's other settings. Everything about them is
//! checked here, at load (https URLs, a non-empty client id, scopes with `openid`, well-formed
//! `admins`); the files they name are read when the collector starts serving.

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
    /// Days the collector's own CA is valid when it is made (`init`, or the first `run`): 1 to
    /// 3650, default 825. Its server certificate lives at most 397 days and never past the CA.
    #[serde(default = "default_ca_days")]
    pub ca_days: u32,
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
    /// The portal.
    #[serde(default)]
    pub portal: PortalConfig,
    /// Anomaly detection and alerts (see [`crate::detect::config`]): on by default.
    #[serde(default)]
    pub detection: crate::detect::DetectionConfig,
    /// Agents' credentials.
    #[serde(default)]
    pub agents: AgentsConfig,
    /// Where events and everything else are stored: SQLite in `state_dir` (default), or a
    /// PostgreSQL database shared by several collectors.
    #[serde(default)]
    pub store: StoreConfig,
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// A PostgreSQL connection string (`postgresql://user:password@host/db` or `host=... dbname=...
    /// user=...`). Without it the store is SQLite (`<state_dir>/collector.db`).
    #[serde(default)]
    pub postgres: Option<String>,
    /// Most PostgreSQL connections this collector opens. Default 16.
    #[serde(default = "default_store_connections")]
    pub max_connections: usize,
    /// The CA certificates (PEM) the database server's certificate is verified against. Default:
    /// the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            postgres: None,
            max_connections: default_store_connections(),
            ca_file: None,
        }
    }
}

fn default_store_connections() -> usize {
    16
}

/// The portal's settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortalConfig {
    /// An address of its own for the portal and the admins' API (an admin network), served with
    /// HSTS; `listen` then serves the agents' API alone. Default: absent, everything on `listen`.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Sign-in through an OpenID Connect provider (authorization code flow with PKCE). Without
    /// it only the local admin accounts can sign in.
    #[serde(default)]
    pub oidc: Option<OidcConfig>,
    /// Limits on local sign-in attempts and on the password checks they cost.
    #[serde(default)]
    pub sign_in: crate::portal::signin::SignInConfig,
}

/// The portal's OpenID Connect relying party.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The provider's issuer: an `https://` URL, exactly as the provider writes it in `iss`.
    /// Its discovery document is read from `<issuer>/.well-known/openid-configuration`.
    pub issuer: String,
    /// The client id the provider registered the portal under (the id token's audience).
    pub client_id: String,
    /// A file holding the client secret (a confidential client, authenticated at the token
    /// endpoint). Without it the portal is a public client, protected by PKCE alone.
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// The portal's callback as browsers reach it, registered at the provider:
    /// `https://<collector>/auth/oidc/callback`.
    pub redirect_url: String,
    /// CA certificates (PEM) to verify the provider with; default: the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The scopes asked for. Default `openid`, `email`, `profile`; `openid` is required.
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// The id token claim listing the user's groups. Default `groups`.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// Who gets the admin portal: e-mail addresses (compared without regard to ASCII case) and
    /// `group:<name>` entries (a group of [`OidcConfig::groups_claim`], exact). Everyone else
    /// the provider signs in is an organisation member, who sees only their own page.
    #[serde(default)]
    pub admins: Vec<String>,
}

/// The path the portal serves the OpenID Connect callback on.
pub const OIDC_CALLBACK_PATH: &str = "/auth/oidc/callback";

impl OidcConfig {
    /// Whether a user signed in as `email` with `groups` gets the admin portal.
    pub fn is_admin(&self, email: &str, groups: &[String]) -> bool {
        self.admins.iter().any(|a| match a.strip_prefix("group:") {
            Some(g) => groups.iter().any(|have| have == g),
            None => a.eq_ignore_ascii_case(email),
        })
    }

    /// The discovery document's URL.
    pub fn discovery_url(&self) -> String {
        format!(
            "{}/.well-known/openid-configuration",
            self.issuer.trim_end_matches('/')
        )
    }

    fn check(&self) -> Result<(), ConfigError> {
        let bad = |what: String| Err(ConfigError::Invalid(format!("portal.oidc: {what}")));
        check_https(&self.issuer, "issuer")?;
        if self.issuer.contains(['?', '#']) {
            return bad(format!(
                "issuer {:?}: an issuer has no query or fragment",
                self.issuer
            ));
        }
        let id = self.client_id.as_str();
        if id.is_empty() || id.len() > 255 || id.chars().any(char::is_control) {
            return bad("client_id must be 1-255 characters without control characters".into());
        }
        let uri = check_https(&self.redirect_url, "redirect_url")?;
        if uri.path() != OIDC_CALLBACK_PATH
            || uri.query().is_some()
            || self.redirect_url.contains('#')
        {
            return bad(format!(
                "redirect_url {:?}: the portal's callback is https://<collector>{OIDC_CALLBACK_PATH} \
                 (no query, no fragment)",
                self.redirect_url
            ));
        }
        if !self.scopes.iter().any(|s| s == "openid") {
            return bad("scopes must include \"openid\"".into());
        }
        if let Some(s) = self.scopes.iter().find(|s| {
            s.is_empty()
                || !s
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        }) {
            return bad(format!("scope {s:?} is not a scope token"));
        }
        if self.groups_claim.is_empty() {
            return bad("groups_claim must not be empty".into());
        }
        for a in &self.admins {
            let ok = match a.strip_prefix("group:") {
                Some(g) => !g.is_empty() && !g.chars().any(char::is_control),
                None => {
                    a.split_once('@')
                        .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty())
                        && !a.chars().any(|c| c.is_control() || c.is_whitespace())
                }
            };
            if !ok {
                return bad(format!(
                    "admins entry {a:?}: expected an e-mail address or group:<name>"
                ));
            }
        }
        Ok(())
    }
}

/// Parses `url` and requires `https://` with a host.
fn check_https(url: &str, what: &str) -> Result<http::Uri, ConfigError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| ConfigError::Invalid(format!("portal.oidc: {what} {url:?}: {e}")))?;
    if uri.scheme_str() != Some("https") || uri.host().is_none_or(str::is_empty) {
        return Err(ConfigError::Invalid(format!(
            "portal.oidc: {what} {url:?}: must be an https:// URL with a host"
        )));
    }
    Ok(uri)
}

fn default_scopes() -> Vec<String> {
    ["openid", "email", "profile"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
}
fn default_groups_claim() -> String {
    "groups".into()
}

/// `[agents]`: how long an agent's credential lasts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentsConfig {
    /// Seconds a credential is accepted after it was issued (at enrollment or renewal); agents
    /// renew theirs half way. Default 2592000 (30 days).
    pub credential_lifetime_s: u64,
}

impl Default for AgentsConfig {
    fn default() -> Self {
        Self {
            credential_lifetime_s: 30 * 86_400,
        }
    }
}

impl AgentsConfig {
    /// [`AgentsConfig::credential_lifetime_s`] in milliseconds.
    pub fn credential_ms(&self) -> i64 {
        i64::try_from(self.credential_lifetime_s)
            .unwrap_or(i64::MAX / 1000)
            .saturating_mul(1000)
    }
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
    /// An agent's event dated more than this past the receive time is stored at the receive
    /// time and flagged `time_future` (seconds). Default 600.
    pub max_clock_skew_s: u64,
    /// An agent's event dated more than this before the receive time is stored at the receive
    /// time and flagged `time_past` (days). Default 30 (an agent's spool outlives outages).
    pub max_event_age_days: u64,
    /// Ingestion requests handled at once, all agents together; more wait up to 10 s, then get
    /// 503. Default 8.
    pub max_ingest_requests: usize,
    /// Ingestion requests one agent may have handled at once; more get 429 at once (before
    /// their body is read). Default 2.
    pub max_ingest_requests_per_agent: usize,
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
            max_clock_skew_s: 600,
            max_event_age_days: 30,
            max_ingest_requests: 8,
            max_ingest_requests_per_agent: 2,
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
    /// What it gets: `events` (default), `alerts` or `all`.
    #[serde(default)]
    pub send: Send,
}

/// What a forwarding target gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Send {
    /// Every stored event (the default).
    #[default]
    Events,
    /// Alerts only: each new alert and each change of an alert's state. Syslog messages carry
    /// the alert's severity (critical 2, high 3, medium 4, low 5); webhooks get JSON objects
    /// with `"type": "alert"`.
    Alerts,
    /// Both.
    All,
}

impl Send {
    /// Whether events go out.
    pub fn events(self) -> bool {
        matches!(self, Self::Events | Self::All)
    }

    /// Whether alerts go out.
    pub fn alerts(self) -> bool {
        matches!(self, Self::Alerts | Self::All)
    }
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
    /// What it gets: `events` (default), `alerts` or `all`.
    #[serde(default)]
    pub send: Send,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8443))
}
fn default_retention_days() -> u32 {
    90
}
/// The collector CA's lifetime when `ca_days` is not set: about 27 months.
pub const DEFAULT_CA_DAYS: u32 = 825;
/// The longest `ca_days` accepted (ten years).
pub const MAX_CA_DAYS: u32 = 3650;

fn default_ca_days() -> u32 {
    DEFAULT_CA_DAYS
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
            ca_days: default_ca_days(),
            bundle_public_key: None,
            limits: Limits::default(),
            forward: ForwardConfig::default(),
            portal: PortalConfig::default(),
            detection: crate::detect::DetectionConfig::default(),
            agents: AgentsConfig::default(),
            store: StoreConfig::default(),
        }
    }

    fn check(&self) -> Result<(), ConfigError> {
        self.portal
            .sign_in
            .validate()
            .map_err(ConfigError::Invalid)?;
        if !(4..=3650 * 86_400).contains(&self.agents.credential_lifetime_s) {
            return Err(ConfigError::Invalid(
                "agents.credential_lifetime_s must be from 4 s to 3650 days".into(),
            ));
        }
        if self.ca_days == 0 || self.ca_days > MAX_CA_DAYS {
            return Err(ConfigError::Invalid(format!(
                "ca_days must be 1 to {MAX_CA_DAYS}"
            )));
        }
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
        if l.max_ingest_requests == 0
            || l.max_ingest_requests_per_agent == 0
            || l.max_ingest_requests_per_agent > l.max_ingest_requests
        {
            return Err(ConfigError::Invalid(
                "limits: max_ingest_requests_per_agent must be between 1 and max_ingest_requests"
                    .into(),
            ));
        }
        if l.max_event_age_days == 0 || l.max_clock_skew_s == 0 {
            return Err(ConfigError::Invalid(
                "limits: max_event_age_days and max_clock_skew_s must be non-zero".into(),
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
        if let Some(o) = &self.portal.oidc {
            o.check()?;
        }
        self.detection.check().map_err(ConfigError::Invalid)?;
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

    #[test]
    fn forwarding_send_and_detection_tables() {
        let c = Config::parse(
            "state_dir = \"/x\"\n[[forward.webhook]]\nurl = \"http://h/x\"\nsend = \"alerts\"\n\
             [[forward.syslog]]\naddress = \"h:514\"\n[detection.mass_delete]\nfloor = 7\n",
        )
        .unwrap();
        assert_eq!(c.forward.webhook[0].send, Send::Alerts);
        assert_eq!(c.forward.syslog[0].send, Send::Events);
        assert!(!c.forward.webhook[0].send.events() && Send::All.alerts());
        assert_eq!(c.detection.mass_delete.floor, Some(7));
        assert!(c.detection.enabled);
        let e = Config::parse(
            "state_dir = \"/x\"\n[[forward.syslog]]\naddress = \"h:514\"\nsend = \"some\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("some"), "{e}");
        let e = Config::parse("state_dir = \"/x\"\n[detection]\nqueue = 0\n").unwrap_err();
        assert!(e.to_string().contains("detection.queue"), "{e}");
    }

    const OIDC: &str = "state_dir = \"/x\"\n[portal.oidc]\n\
        issuer = \"https://idp.corp.example/realms/corp\"\n\
        client_id = \"sluice-portal\"\n\
        redirect_url = \"https://collector.corp.example:8443/auth/oidc/callback\"\n";

    #[test]
    fn oidc_defaults_and_admins() {
        assert!(
            Config::parse("state_dir = \"/x\"\n")
                .unwrap()
                .portal
                .oidc
                .is_none()
        );
        let c = Config::parse(&format!(
            "{OIDC}admins = [\"SecOps@Corp.example\", \"group:sluice-admins\"]\n"
        ))
        .unwrap();
        let o = c.portal.oidc.unwrap();
        assert_eq!(o.scopes, ["openid", "email", "profile"]);
        assert_eq!(o.groups_claim, "groups");
        assert!(o.client_secret_file.is_none() && o.ca_file.is_none());
        assert_eq!(
            o.discovery_url(),
            "https://idp.corp.example/realms/corp/.well-known/openid-configuration"
        );
        assert!(o.is_admin("secops@corp.example", &[]));
        assert!(o.is_admin(
            "bob@corp.example",
            &["staff".into(), "sluice-admins".into()]
        ));
        assert!(!o.is_admin(
            "bob@corp.example",
            &["staff".into(), "Sluice-Admins".into()]
        ));
        assert!(!o.is_admin("group:sluice-admins", &[]));
    }

    #[test]
    fn oidc_is_validated_at_load() {
        let with = |extra: &str| Config::parse(&format!("{OIDC}{extra}"));
        for (text, want) in [
            (OIDC.replace("https://idp", "http://idp"), "https"),
            (OIDC.replace("\"sluice-portal\"", "\"\""), "client_id"),
            (OIDC.replace("/auth/oidc/callback", "/cb"), "callback"),
            (
                OIDC.replace("8443/auth", "8443/auth?x=1&y=/auth"),
                "callback",
            ),
            (
                OIDC.replace("https://collector", "http://collector"),
                "redirect_url",
            ),
            (OIDC.replace("/realms/corp", "/realms/corp?x=1"), "query"),
        ] {
            let e = Config::parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
        for (extra, want) in [
            ("scopes = [\"email\"]\n", "openid"),
            ("scopes = [\"openid\", \"a b\"]\n", "scope"),
            ("groups_claim = \"\"\n", "groups_claim"),
            ("admins = [\"bob\"]\n", "admins"),
            ("admins = [\"group:\"]\n", "admins"),
            ("client_secret = \"x\"\n", "client_secret"),
        ] {
            let e = with(extra).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
        with("client_secret_file = \"/etc/s\"\nca_file = \"/etc/ca.pem\"\nscopes = [\"openid\"]\n")
            .unwrap();
    }
}
