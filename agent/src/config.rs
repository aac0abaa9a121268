//! The agent's configuration file (TOML), parsed and validated whole before anything starts.
//!
//! Every table and key is documented here and in the README; unknown keys are errors, so a typo
//! never silently falls back to a default.

use std::{path::PathBuf, str::FromStr, time::Duration};

use serde::{Deserialize, Deserializer};
use sluice_net::Cidr;
use sluice_policy::model::App;

/// Errors reading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A value is out of range or inconsistent with another.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole agent configuration.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the agent keeps its state (CA, spool, last good bundle). Default `/var/lib/sluice`.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Endpoint steering (eBPF).
    #[serde(default)]
    pub steer: SteerSettings,
    /// The transparent listener that steered connections reach.
    #[serde(default)]
    pub proxy: ProxySettings,
    /// Health, readiness, metrics and status endpoints.
    #[serde(default)]
    pub admin: AdminSettings,
    /// The interception CA and upstream trust.
    #[serde(default)]
    pub tls: TlsSettings,
    /// The app catalogue: which hosts are intercepted. Hosts of no app are spliced untouched.
    /// The same type as a bundle's `catalog.yaml` entries; locally only `id`, `name`, `hosts`
    /// and `do_not_inspect` may be set (what depends on policies comes with the bundle), and an
    /// active bundle's catalogue replaces these.
    #[serde(default)]
    pub apps: Vec<App>,
    /// Where signed policy bundles come from (absent: no policies).
    #[serde(default)]
    pub bundle: Option<BundleSettings>,
    /// What this device is, for policies.
    #[serde(default)]
    pub device: DeviceSettings,
    /// Where records and activity events go.
    #[serde(default)]
    pub report: ReportSettings,
    /// Branch gateway mode: the forwarded TCP of a LAN steered with nftables TPROXY (off by
    /// default; endpoint and gateway modes can run together).
    #[serde(default)]
    pub gateway: GatewaySettings,
    /// Where the bundle's measured posture checks (`posture.yaml`) read the system.
    #[serde(default)]
    pub posture: PostureSettings,
    /// The privilege split: the unprivileged proxy's user and how it is started.
    #[serde(default)]
    pub privsep: PrivsepSettings,
    /// Malware scanning through ICAP (absent: files are not scanned).
    #[serde(default)]
    pub icap: Option<IcapSettings>,
}

/// `[icap]`: the organisation's anti-virus, reached over ICAP (RFC 3507). Every held upload
/// (REQMOD) and download (RESPMOD) is sent to it; its verdict is the `malware` file filter's, and
/// a scanner that is down or slower than `timeout_ms` makes the file one that cannot be
/// inspected (the app's not-inspectable action applies).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IcapSettings {
    /// The service, `icap://ADDRESS:PORT/SERVICE` (an IP address; port 1344 when left out),
    /// e.g. `icap://127.0.0.1:1344/virus_scan`.
    pub url: String,
    /// The time budget of one scan: connecting, sending and the verdict (default 5000).
    #[serde(default = "default_icap_timeout_ms")]
    pub timeout_ms: u64,
    /// Bytes the scanner sees before it asks for the rest (default 1024; 0: no preview).
    #[serde(default = "default_icap_preview")]
    pub preview: usize,
}

fn default_icap_timeout_ms() -> u64 {
    5000
}

fn default_icap_preview() -> usize {
    1024
}

impl IcapSettings {
    /// The scanner these settings name.
    pub fn scanner(&self) -> Result<sluice_net::icap::Scanner, ConfigError> {
        let bad = |why: &str| ConfigError::Invalid(format!("icap.url `{}`: {why}", self.url));
        let rest = self
            .url
            .strip_prefix("icap://")
            .ok_or_else(|| bad("not an icap:// URL"))?;
        let (authority, path) = rest.split_once('/').ok_or_else(|| bad("no service path"))?;
        if path.is_empty() {
            return Err(bad("no service path"));
        }
        let addr: std::net::SocketAddr = match authority.parse() {
            Ok(a) => a,
            Err(_) => std::net::SocketAddr::new(
                authority
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse()
                    .map_err(|_| bad("the host must be an IP address"))?,
                1344,
            ),
        };
        if self.timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "icap.timeout_ms must be above 0".into(),
            ));
        }
        Ok(sluice_net::icap::Scanner {
            addr,
            uri: self.url.clone(),
            preview: self.preview,
            budget: std::time::Duration::from_millis(self.timeout_ms),
        })
    }
}

/// `[privsep]`: the unprivileged proxy. `sluice run` (root) keeps the eBPF programs, maps,
/// nftables rules, `/proc` reading and the CA key; `sluice proxy` (this user, no capabilities,
/// `no_new_privs`, seccomp, Landlock) parses every outside byte and asks the privileged part for
/// origins, process facts and leaves over [`PrivsepSettings::socket`].
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PrivsepSettings {
    /// The proxy's user (a system user of its own; its primary group is used). Default `sluice`.
    #[serde(default = "default_privsep_user")]
    pub user: String,
    /// Whether `sluice run` starts the proxy itself and restarts it when it ends (default true);
    /// false when a service manager runs `sluice proxy` (the packaged `sluice-proxy.service`).
    #[serde(default = "default_true")]
    pub spawn: bool,
    /// The privileged part's Unix socket (default `<state_dir>/privsep.sock`); only the proxy's
    /// user may use it.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// Most leaves the privileged part signs per minute (a burst of as many is allowed).
    #[serde(default = "default_leaves_per_minute")]
    pub leaves_per_minute: u32,
}

fn default_privsep_user() -> String {
    "sluice".into()
}

fn default_true() -> bool {
    true
}

fn default_leaves_per_minute() -> u32 {
    600
}

impl Default for PrivsepSettings {
    fn default() -> Self {
        Self {
            user: default_privsep_user(),
            spawn: true,
            socket: None,
            leaves_per_minute: default_leaves_per_minute(),
        }
    }
}

/// `[posture]`: how the measured posture checks read the system.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PostureSettings {
    /// The directory the checks read the system under (`/proc`, `/sys`, `/etc`, `/var/lib/dpkg`
    /// and the executables of processes), never following a link out of it. Default `/`: this
    /// host; another root (an image, a test tree) has no firewall to ask, so that check is unknown.
    #[serde(default = "default_posture_root")]
    pub root: PathBuf,
}

fn default_posture_root() -> PathBuf {
    PathBuf::from("/")
}

impl Default for PostureSettings {
    fn default() -> Self {
        Self {
            root: default_posture_root(),
        }
    }
}

/// `[gateway]`: which forwarded traffic is steered to the proxy, and how.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GatewaySettings {
    /// Turn gateway mode on.
    #[serde(default)]
    pub enabled: bool,
    /// Interfaces the LAN's traffic arrives on. With `client_cidrs` as well, both must match.
    #[serde(default)]
    pub lan_interfaces: Vec<String>,
    /// Client address blocks of the LAN. With `lan_interfaces` as well, both must match.
    #[serde(default)]
    pub client_cidrs: Vec<Cidr>,
    /// TCP destination ports steered (default 80 and 443).
    #[serde(default = "default_gateway_ports")]
    pub ports: Vec<u16>,
    /// Destinations never steered (the protected blocks of
    /// [`crate::steer::rules::PROTECTED`] never are either).
    #[serde(default)]
    pub bypass_destinations: Vec<Cidr>,
    /// Clients never steered.
    #[serde(default)]
    pub bypass_clients: Vec<Cidr>,
    /// Clients that are managed devices (their own agent inspects them; here they get the
    /// `managed` device tag). Other LAN clients are `unmanaged`, unless the collector reports an
    /// enrolled agent at their address.
    #[serde(default)]
    pub managed_clients: Vec<Cidr>,
    /// Port of the proxy's transparent listeners on 127.0.0.1 and ::1 (below 1024, so no user
    /// can hold it while the agent is away).
    #[serde(default = "default_gateway_port")]
    pub port: u16,
    /// The firewall mark of steered packets, routed to the local table below.
    #[serde(default = "default_gateway_mark")]
    pub mark: u32,
    /// The routing table that delivers marked packets locally.
    #[serde(default = "default_gateway_route_table")]
    pub route_table: u32,
    /// The name of Sluice's own nftables table (family `inet`).
    #[serde(default = "default_gateway_table")]
    pub table: String,
    /// `open` or `closed` when the proxy does not answer; default: `steer.fail_mode`.
    #[serde(default)]
    pub fail_mode: Option<FailMode>,
}

fn default_gateway_ports() -> Vec<u16> {
    vec![80, 443]
}
fn default_gateway_port() -> u16 {
    1002
}
fn default_gateway_mark() -> u32 {
    0x51cf
}
fn default_gateway_route_table() -> u32 {
    0x51c
}
fn default_gateway_table() -> String {
    "sluice".to_owned()
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            enabled: false,
            lan_interfaces: Vec::new(),
            client_cidrs: Vec::new(),
            ports: default_gateway_ports(),
            bypass_destinations: Vec::new(),
            bypass_clients: Vec::new(),
            managed_clients: Vec::new(),
            port: default_gateway_port(),
            mark: default_gateway_mark(),
            route_table: default_gateway_route_table(),
            table: default_gateway_table(),
            fail_mode: None,
        }
    }
}

/// `[device]`: the device posture policies see.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSettings {
    /// `managed` (default: the agent runs on an enrolled endpoint), `compliant`, or `unmanaged`
    /// (e.g. a gateway in front of devices nobody manages).
    #[serde(default = "default_posture")]
    pub posture: sluice_policy::model::Device,
}

fn default_posture() -> sluice_policy::model::Device {
    sluice_policy::model::Device::Managed
}

impl Default for DeviceSettings {
    fn default() -> Self {
        Self {
            posture: default_posture(),
        }
    }
}

/// `[report]`: where activity events go besides the log: a JSON lines file, and the collector
/// (through the durable spool under `<state_dir>/spool`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportSettings {
    /// Appends every activity event as one JSON line to this file (created 0600 when absent).
    #[serde(default)]
    pub events_file: Option<PathBuf>,
    /// The collector (`https://host:port`). Default: the one in `<state_dir>/report/enrollment.json`
    /// written by `sluice enroll`. Neither: events are not spooled or shipped.
    #[serde(default)]
    pub collector: Option<String>,
    /// The collector's CA certificate (PEM). Default: the enrollment's, else the web and
    /// system roots.
    #[serde(default)]
    pub collector_ca: Option<PathBuf>,
    /// Other collectors of the same organisation (sharing its database and its CA), tried in
    /// turn when the current one cannot be reached or fails: nothing is lost or stored twice,
    /// since every collector deduplicates by event id. Default none.
    #[serde(default)]
    pub collector_fallbacks: Vec<String>,
    /// The agent's credential. Default: `<state_dir>/report/credential` (written by `sluice enroll`).
    #[serde(default)]
    pub credential_file: Option<PathBuf>,
    /// Bound on the spool's size in bytes; beyond it the oldest segment is dropped (counted and
    /// reported). Default 256 MiB.
    #[serde(default = "default_spool_max_bytes")]
    pub spool_max_bytes: u64,
    /// Size of one spool segment in bytes. Default 4 MiB.
    #[serde(default = "default_spool_segment_bytes")]
    pub spool_segment_bytes: u64,
    /// Most events in one batch sent to the collector. Default 1000.
    #[serde(default = "default_batch_max_events")]
    pub batch_max_events: usize,
    /// Most bytes of events (before compression) in one batch. Default 1 MiB.
    #[serde(default = "default_batch_max_bytes")]
    pub batch_max_bytes: usize,
    /// First retry delay after a failed batch, milliseconds (doubles per failure). Default 500.
    #[serde(default = "default_retry_min_ms")]
    pub retry_min_ms: u64,
    /// Longest retry delay, milliseconds. Default 30000.
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
    /// Seconds between device posture events. Default 300.
    #[serde(default = "default_posture_interval_s")]
    pub posture_interval_s: u64,
    /// Seconds between agent status events. Default 60.
    #[serde(default = "default_status_interval_s")]
    pub status_interval_s: u64,
    /// The collector's release key (base64url X25519 public key, as `sluice-collector
    /// release-keys show` and `GET /api/v1/release-key` give it) that protected files' passwords
    /// are sealed to, pinned. Default: fetched from the collector and kept in
    /// `<state_dir>/release-key.pub`. Without either, `protect` cannot be carried out and such
    /// downloads are blocked.
    #[serde(default)]
    pub release_key: Option<String>,
    /// Where people get the passwords of protected files (the collector's portal), named in the
    /// responses that deliver them. Default: the collector's URL.
    #[serde(default)]
    pub portal_url: Option<String>,
}

fn default_spool_max_bytes() -> u64 {
    256 << 20
}
fn default_spool_segment_bytes() -> u64 {
    4 << 20
}
fn default_batch_max_events() -> usize {
    1000
}
fn default_batch_max_bytes() -> usize {
    1 << 20
}
fn default_retry_min_ms() -> u64 {
    500
}
fn default_retry_max_ms() -> u64 {
    30_000
}
fn default_posture_interval_s() -> u64 {
    300
}
fn default_status_interval_s() -> u64 {
    60
}

impl Default for ReportSettings {
    fn default() -> Self {
        Self {
            events_file: None,
            collector: None,
            collector_ca: None,
            collector_fallbacks: Vec::new(),
            credential_file: None,
            release_key: None,
            portal_url: None,
            spool_max_bytes: default_spool_max_bytes(),
            spool_segment_bytes: default_spool_segment_bytes(),
            batch_max_events: default_batch_max_events(),
            batch_max_bytes: default_batch_max_bytes(),
            retry_min_ms: default_retry_min_ms(),
            retry_max_ms: default_retry_max_ms(),
            posture_interval_s: default_posture_interval_s(),
            status_interval_s: default_status_interval_s(),
        }
    }
}

impl ReportSettings {
    /// Checks bounds and the collector URL.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(format!("report.{m}")));
        if self.spool_segment_bytes < 4096 {
            return bad("spool_segment_bytes must be at least 4096".into());
        }
        if self.spool_max_bytes < 2 * self.spool_segment_bytes {
            return bad(format!(
                "spool_max_bytes ({}) must be at least two segments ({})",
                self.spool_max_bytes,
                2 * self.spool_segment_bytes
            ));
        }
        if self.batch_max_events == 0 || self.batch_max_bytes < 1024 {
            return bad("batch_max_events must be > 0 and batch_max_bytes at least 1024".into());
        }
        if self.retry_min_ms == 0 || self.retry_max_ms < self.retry_min_ms {
            return bad("retry_min_ms must be > 0 and retry_max_ms at least retry_min_ms".into());
        }
        if let Some(k) = &self.release_key
            && let Err(e) = sluice_protocol::seal::SealingKey::from_base64(k)
        {
            return bad(format!(
                "release_key: {e} (expected the collector's base64url key)"
            ));
        }
        if let Some(u) = &self.portal_url
            && !(u.starts_with("https://") || u.starts_with("http://"))
        {
            return bad(format!("portal_url {u:?}: expected an http(s) URL"));
        }
        if self.posture_interval_s == 0 || self.status_interval_s == 0 {
            return bad("posture_interval_s and status_interval_s must be > 0".into());
        }
        for c in self.collector.iter().chain(&self.collector_fallbacks) {
            if !c.starts_with("https://") {
                return bad(format!("collector `{c}` must be an https:// URL"));
            }
        }
        Ok(())
    }
}

/// `[tls]`: the CA that signs intercepted sessions' certificates, and what upstream servers are
/// trusted with.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// CA certificate (PEM). Default: `<state_dir>/ca/ca.crt`, created by `sluice ca init`.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    /// CA key (PEM, mode 0600). Default: `<state_dir>/ca/ca.key`.
    #[serde(default)]
    pub ca_key: Option<PathBuf>,
    /// Extra CA certificates (PEM files) trusted for upstream servers, besides the bundled web
    /// roots and the system's.
    #[serde(default)]
    pub upstream_extra_cas: Vec<PathBuf>,
    /// Do not trust the bundled (Mozilla) web roots upstream.
    #[serde(default)]
    pub no_bundled_roots: bool,
    /// Do not trust the system's roots upstream.
    #[serde(default)]
    pub no_system_roots: bool,
    /// How many days a CA made by `sluice ca init` is valid (1 to 3650; `--days` overrides).
    /// Default 825 (about 27 months): trust stores are not re-done every few months, and a
    /// copied key is not good for a decade.
    #[serde(default = "default_ca_days")]
    pub ca_days: u32,
}

/// How long a CA made by `sluice ca init` is valid when neither `--days` nor `tls.ca_days` says:
/// about two years and three months. Long enough that trust stores are not re-done every few
/// months, short enough that a copied key is not good for a decade; leaves live seven days anyway.
pub const DEFAULT_CA_DAYS: u32 = 825;

/// The longest CA lifetime accepted (ten years).
pub const MAX_CA_DAYS: u32 = 3650;

fn default_ca_days() -> u32 {
    DEFAULT_CA_DAYS
}

impl Default for TlsSettings {
    fn default() -> Self {
        Self {
            ca_cert: None,
            ca_key: None,
            upstream_extra_cas: Vec::new(),
            no_bundled_roots: false,
            no_system_roots: false,
            ca_days: default_ca_days(),
        }
    }
}

impl Config {
    /// Where the CA certificate is read from.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.tls
            .ca_cert
            .clone()
            .unwrap_or_else(|| self.state_dir.join("ca/ca.crt"))
    }
    /// The privileged part's socket for the proxy.
    pub fn privsep_socket(&self) -> PathBuf {
        self.privsep
            .socket
            .clone()
            .unwrap_or_else(|| self.state_dir.join("privsep.sock"))
    }

    /// The interception CA's key (default `<state_dir>/ca/ca.key`).
    pub fn ca_key_path(&self) -> PathBuf {
        self.tls
            .ca_key
            .clone()
            .unwrap_or_else(|| self.state_dir.join("ca/ca.key"))
    }

    /// Where the privileged part keeps the bundle keys it learnt: beside the CA's key, in a
    /// directory the proxy cannot write.
    pub fn privileged_trust_path(&self) -> PathBuf {
        self.ca_key_path()
            .parent()
            .map_or_else(|| self.state_dir.join("ca"), std::path::Path::to_path_buf)
            .join("bundle-trust.json")
    }
}

/// A bundle URL is https://, or http:// to this host's loopback only (a bundle server beside the
/// agent): anything else on the network could be answered by whoever sits on the path, and while
/// the signature still holds, an attacker there could withhold fresh bundles unnoticed.
pub fn bundle_url_allowed(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("bundle.url `{url}`: {e}"))?;
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") => {
            let host = uri.host().unwrap_or("").trim_matches(['[', ']']);
            let loopback = host.eq_ignore_ascii_case("localhost")
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.to_canonical().is_loopback());
            if loopback {
                Ok(())
            } else {
                Err(format!(
                    "bundle.url `{url}`: http:// is allowed only to the loopback (127.0.0.0/8, \
                     ::1, localhost); use https://"
                ))
            }
        }
        _ => Err(format!("bundle.url `{url}`: expected an https:// URL")),
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/sluice")
}

/// Distribution settings (`[bundle]` in the agent's config).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleSettings {
    /// Where to fetch the bundle: https://, or http:// to the loopback only.
    #[serde(default)]
    pub url: Option<String>,
    /// A local bundle to use instead of a URL: a signed .tar.gz, or a directory holding its own
    /// `.signatures.json`.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// The public key (PEM) bundles must be signed with.
    pub public_key: PathBuf,
    /// Seconds a long poll may be held by the server (`Prefer: wait=N`).
    #[serde(default = "default_long_poll_s")]
    pub long_poll_s: u64,
    /// Seconds between polls when the server does not hold requests (±20% jitter).
    #[serde(default = "default_poll_s")]
    pub poll_s: u64,
    /// Accept a bundle whose revision is older than the active one.
    #[serde(default)]
    pub allow_downgrade: bool,
    /// Extra CA certificates (PEM) trusted for an https:// URL.
    #[serde(default)]
    pub extra_cas: Vec<PathBuf>,
    /// A file holding the agent's credential, sent as `Authorization: Bearer` (https:// only).
    /// Default: the enrollment's credential when the URL is on the enrolled collector.
    #[serde(default)]
    pub credential_file: Option<PathBuf>,
    /// Not read from the file: when the URL is on the enrolled collector, the same path on each
    /// of `report.collector_fallbacks`, tried in turn after a failed fetch.
    #[serde(skip)]
    pub fallback_urls: Vec<String>,
}

fn default_long_poll_s() -> u64 {
    60
}
fn default_poll_s() -> u64 {
    30
}

/// What happens to steered connections while the proxy is not healthy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// Connections go direct, uninspected (availability first).
    #[default]
    Open,
    /// Connections are refused (control first).
    Closed,
}

/// `[steer]`: how the agent attaches to the kernel and what it steers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SteerSettings {
    /// Turn steering on (default). Off: the agent loads nothing into the kernel.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// cgroup v2 path to attach to, relative to the v2 mount ("/" = the root, every process).
    #[serde(default = "default_cgroup")]
    pub cgroup: String,
    /// cgroup v2 path (relative to the mount) the agent moves itself into at start; its sockets,
    /// and those of anything else in it, are never steered. Must not be the attach cgroup itself.
    #[serde(default = "default_agent_cgroup")]
    pub agent_cgroup: String,
    /// Extra cgroups (relative to the mount) whose sockets are never steered.
    #[serde(default)]
    pub exempt_cgroups: Vec<String>,
    /// `SO_MARK` the agent puts on its upstream sockets; sockets with it are never steered.
    #[serde(default = "default_bypass_mark")]
    pub bypass_mark: u32,
    /// `open` or `closed`: see [`FailMode`]. It holds when the agent is gone too: the programs
    /// stay pinned, the heartbeat goes stale, and the kernel refuses (`closed`) or lets through
    /// (`open`) new connections to steered destinations until an agent is back.
    #[serde(default)]
    pub fail_mode: FailMode,
    /// Directory on the BPF filesystem where the steering links are pinned (default
    /// `/sys/fs/bpf/sluice/cgroup-<id of the attach cgroup>`; the BPF filesystem is mounted at
    /// `/sys/fs/bpf` when it is not yet). Owned by the agent: a new agent removes what it finds
    /// there once its own programs are attached.
    #[serde(default)]
    pub pin_dir: Option<String>,
    /// How often the agent refreshes the kernel heartbeat, in milliseconds.
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// A heartbeat older than this (milliseconds) puts the kernel in the fail mode.
    #[serde(default = "default_heartbeat_bound_ms")]
    pub heartbeat_bound_ms: u64,
    /// Destinations to steer. Default: every address on TCP ports 80 and 443. Loopback,
    /// link-local and cloud metadata blocks ([`crate::steer::rules::PROTECTED`]) are steered only
    /// by a rule whose block lies inside one of them.
    #[serde(default = "default_include")]
    pub include: Vec<SteerRule>,
    /// Destinations never steered, even when an include rule matches.
    #[serde(default)]
    pub exclude: Vec<SteerRule>,
}

fn yes() -> bool {
    true
}
fn default_cgroup() -> String {
    "/".to_owned()
}
fn default_agent_cgroup() -> String {
    "sluice-agent".to_owned()
}
fn default_bypass_mark() -> u32 {
    0x51ce
}
fn default_heartbeat_interval_ms() -> u64 {
    250
}
fn default_heartbeat_bound_ms() -> u64 {
    2000
}
fn default_include() -> Vec<SteerRule> {
    let web = vec![PortSpec::single(80), PortSpec::single(443)];
    vec![
        SteerRule {
            cidr: Cidr::from_str("0.0.0.0/0").unwrap_or(Cidr::ANY_V4),
            ports: web.clone(),
        },
        SteerRule {
            cidr: Cidr::from_str("::/0").unwrap_or(Cidr::ANY_V6),
            ports: web,
        },
    ]
}

impl Default for SteerSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            cgroup: default_cgroup(),
            agent_cgroup: default_agent_cgroup(),
            exempt_cgroups: Vec::new(),
            bypass_mark: default_bypass_mark(),
            fail_mode: FailMode::Open,
            pin_dir: None,
            heartbeat_interval_ms: default_heartbeat_interval_ms(),
            heartbeat_bound_ms: default_heartbeat_bound_ms(),
            include: default_include(),
            exclude: Vec::new(),
        }
    }
}

impl SteerSettings {
    /// Heartbeat refresh period.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }
    /// Heartbeat staleness bound.
    pub fn heartbeat_bound(&self) -> Duration {
        Duration::from_millis(self.heartbeat_bound_ms)
    }
}

/// One steering rule: an address block and the TCP ports it applies to.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SteerRule {
    /// Address block, e.g. `"203.0.113.0/24"`, `"2001:db8::/32"` or a single address.
    pub cidr: Cidr,
    /// Ports: numbers or `"lo-hi"` ranges. Empty means every port.
    #[serde(default)]
    pub ports: Vec<PortSpec>,
}

/// A port or an inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSpec {
    /// First port.
    pub lo: u16,
    /// Last port (inclusive).
    pub hi: u16,
}

impl PortSpec {
    /// A single port.
    pub const fn single(p: u16) -> Self {
        Self { lo: p, hi: p }
    }
}

impl<'de> Deserialize<'de> for PortSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(i64),
            Text(String),
        }
        let bad = |what: &str| {
            serde::de::Error::custom(format!("invalid port `{what}`: use 1-65535 or \"lo-hi\""))
        };
        let port = |v: i64, what: &str| {
            u16::try_from(v)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| bad(what))
        };
        match Raw::deserialize(d)? {
            Raw::Num(n) => Ok(PortSpec::single(port(n, &n.to_string())?)),
            Raw::Text(t) => {
                let (lo, hi) = t.split_once('-').unwrap_or((&t, &t));
                let lo = lo.trim().parse::<i64>().map_err(|_| bad(&t))?;
                let hi = hi.trim().parse::<i64>().map_err(|_| bad(&t))?;
                let (lo, hi) = (port(lo, &t)?, port(hi, &t)?);
                if lo > hi {
                    return Err(bad(&t));
                }
                Ok(PortSpec { lo, hi })
            }
        }
    }
}

/// `[proxy]`: the transparent listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySettings {
    /// Port of the listener on 127.0.0.1 and ::1 that steered connections are redirected to.
    /// 0: a port the system gives that is free on both (`/status` shows it as `proxy.port`). A
    /// port unprivileged users may bind (see `net.ipv4.ip_unprivileged_port_start`) is warned
    /// about at start: one could take it while no agent holds it.
    #[serde(default = "default_proxy_port")]
    pub port: u16,
    /// Most connections handled at once; further ones wait in the kernel's accept queue.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Time allowed to connect to the original destination, in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// A connection with no traffic either way for this long is closed, in seconds.
    #[serde(default = "default_idle_timeout_s")]
    pub idle_timeout_s: u64,
    /// Join the two sockets of a spliced connection in the kernel (a socket map and a stream
    /// verdict program), so its bytes never enter the proxy. Where the kernel cannot (or with
    /// `false`), the proxy copies them.
    #[serde(default = "default_true")]
    pub kernel_splice: bool,
    /// A client that sends nothing for this long (milliseconds) is taken to speak a
    /// server-speaks-first protocol and is spliced.
    #[serde(default = "default_client_first_timeout_ms")]
    pub client_first_timeout_ms: u64,
    /// Time allowed for the ClientHello and the TLS handshakes, in milliseconds.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// Time allowed for the origin to answer a request (its response head), in milliseconds;
    /// beyond it the client gets a 504 page.
    #[serde(default = "default_response_timeout_ms")]
    pub response_timeout_ms: u64,
    /// Time allowed for a request's headers to arrive, in milliseconds.
    #[serde(default = "default_header_timeout_ms")]
    pub header_timeout_ms: u64,
    /// Largest request or response head (all header bytes), in bytes.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Most header fields in a request head.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// Most concurrent HTTP/2 streams per client connection.
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// Idle upstream connections kept per (destination, name, protocol).
    #[serde(default = "default_max_idle_upstream")]
    pub max_idle_upstream: usize,
    /// HTTP/1.1 clients' requests reach TLS origins over HTTP/2 when the origin offers it
    /// (one process's requests then share a connection). Requests carrying a login bound to
    /// the connection (NTLM, Negotiate) and origins that ask for HTTP/1.1 stay on HTTP/1.1.
    /// `false`: the origin is offered what the client offered.
    #[serde(default = "yes")]
    pub upstream_http2: bool,
    /// Destination ports where plain HTTP to catalogued apps is handled (other plain traffic is
    /// spliced).
    #[serde(default = "default_plain_http_ports")]
    pub plain_http_ports: Vec<u16>,
    /// Compute the SHA-256 of every intercepted request and response body as it streams, and
    /// put it in the request record.
    #[serde(default)]
    pub hash_bodies: bool,
    /// Host patterns whose connections are refused outright (closed before any byte is relayed).
    #[serde(default)]
    pub reject_hosts: Vec<String>,
    /// Refuse a TLS connection whose ClientHello is encrypted (ECH) when its destination is no
    /// known app's address (default): its real server name is hidden, so it could be any app
    /// behind a shared front. Browsers on managed endpoints should have ECH turned off by policy
    /// (Chrome and Edge `EncryptedClientHelloEnabled = false`; Firefox
    /// `network.dns.echconfig.enabled = false`). `false` splices such connections (reported).
    #[serde(default = "yes")]
    pub refuse_ech: bool,
    /// Most body bytes held for inspection at once, over every connection. A body that would
    /// take more waits (see `inspect_wait_ms`) and then gets its app's not-inspectable action.
    #[serde(default = "default_inspect_budget_bytes")]
    pub inspect_budget_bytes: u64,
    /// Most body bytes one user (uid of the connecting process) may hold for inspection at once;
    /// past it their next body gets its app's not-inspectable action at once (an upload is
    /// refused with a page saying to try again), and other users are served from the rest.
    #[serde(default = "default_inspect_budget_bytes_per_uid")]
    pub inspect_budget_bytes_per_uid: u64,
    /// Most bytes of upload sessions (files an app sends over several requests: Graph and
    /// Google resumable uploads, tus, Box and Dropbox sessions, S3 multipart) held at once, over
    /// every session, until each file is complete and decided. A session that would take more
    /// gets its app's not-inspectable action at its end.
    #[serde(default = "default_upload_session_budget_bytes")]
    pub upload_session_budget_bytes: u64,
    /// Most bytes of upload sessions one user (uid of the connecting process) may hold at once.
    #[serde(default = "default_upload_session_budget_bytes_per_uid")]
    pub upload_session_budget_bytes_per_uid: u64,
    /// Most connections one user may have open through the proxy at once; past it their new
    /// connections are closed at once (counted, and reported as refused), so that one user
    /// cannot take every connection slot.
    #[serde(default = "default_max_connections_per_uid")]
    pub max_connections_per_uid: usize,
    /// How long, in milliseconds, a body may wait in all for room in the inspection budget.
    #[serde(default = "default_inspect_wait_ms")]
    pub inspect_wait_ms: u64,
    /// Most bodies parsed and scanned at once, each on a thread of the inspection pool (never on
    /// the proxy's async workers). 0: the number of CPUs.
    #[serde(default)]
    pub inspect_workers: usize,
}

fn default_inspect_budget_bytes() -> u64 {
    512 * 1024 * 1024
}
fn default_inspect_budget_bytes_per_uid() -> u64 {
    128 * 1024 * 1024
}
fn default_upload_session_budget_bytes() -> u64 {
    256 * 1024 * 1024
}
fn default_upload_session_budget_bytes_per_uid() -> u64 {
    128 * 1024 * 1024
}
fn default_max_connections_per_uid() -> usize {
    1024
}
fn default_inspect_wait_ms() -> u64 {
    5_000
}

fn default_client_first_timeout_ms() -> u64 {
    500
}
fn default_handshake_timeout_ms() -> u64 {
    10_000
}
fn default_response_timeout_ms() -> u64 {
    120_000
}
fn default_header_timeout_ms() -> u64 {
    30_000
}
fn default_max_header_bytes() -> usize {
    64 * 1024
}
fn default_max_headers() -> usize {
    100
}
fn default_max_concurrent_streams() -> u32 {
    100
}
fn default_max_idle_upstream() -> usize {
    32
}
fn default_plain_http_ports() -> Vec<u16> {
    vec![80]
}

/// Below 1024, a port only root (or `CAP_NET_BIND_SERVICE`) can bind: while no agent holds it
/// (a restart, a crash before the heartbeat goes stale) no user can put a listener there and
/// receive the connections the kernel still steers to it.
fn default_proxy_port() -> u16 {
    1001
}
fn default_max_connections() -> usize {
    10_000
}
fn default_connect_timeout_ms() -> u64 {
    10_000
}
fn default_idle_timeout_s() -> u64 {
    300
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            port: default_proxy_port(),
            max_connections: default_max_connections(),
            connect_timeout_ms: default_connect_timeout_ms(),
            idle_timeout_s: default_idle_timeout_s(),
            kernel_splice: true,
            client_first_timeout_ms: default_client_first_timeout_ms(),
            handshake_timeout_ms: default_handshake_timeout_ms(),
            response_timeout_ms: default_response_timeout_ms(),
            header_timeout_ms: default_header_timeout_ms(),
            max_header_bytes: default_max_header_bytes(),
            max_headers: default_max_headers(),
            max_concurrent_streams: default_max_concurrent_streams(),
            max_idle_upstream: default_max_idle_upstream(),
            upstream_http2: true,
            plain_http_ports: default_plain_http_ports(),
            reject_hosts: Vec::new(),
            refuse_ech: true,
            hash_bodies: false,
            inspect_budget_bytes: default_inspect_budget_bytes(),
            inspect_budget_bytes_per_uid: default_inspect_budget_bytes_per_uid(),
            upload_session_budget_bytes: default_upload_session_budget_bytes(),
            upload_session_budget_bytes_per_uid: default_upload_session_budget_bytes_per_uid(),
            max_connections_per_uid: default_max_connections_per_uid(),
            inspect_wait_ms: default_inspect_wait_ms(),
            inspect_workers: 0,
        }
    }
}

/// `[admin]`: loopback-only operational endpoints.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// Address of `/healthz`, `/readyz`, `/metrics` and `/status`. Must be a loopback address.
    /// Port 0: one the system gives; the address bound is written to `<state_dir>/admin.addr`
    /// either way.
    #[serde(default = "default_admin_listen")]
    pub listen: std::net::SocketAddr,
}

fn default_admin_listen() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 15090))
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
        }
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that the schema alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(i) = &self.icap {
            i.scanner()?;
        }
        if let Some(u) = self.bundle.as_ref().and_then(|b| b.url.as_deref()) {
            bundle_url_allowed(u).map_err(ConfigError::Invalid)?;
        }
        let s = &self.steer;
        if s.heartbeat_interval_ms == 0 {
            return Err(ConfigError::Invalid(
                "steer.heartbeat_interval_ms must be > 0".into(),
            ));
        }
        if s.heartbeat_bound_ms < 2 * s.heartbeat_interval_ms {
            return Err(ConfigError::Invalid(format!(
                "steer.heartbeat_bound_ms ({}) must be at least twice steer.heartbeat_interval_ms ({})",
                s.heartbeat_bound_ms, s.heartbeat_interval_ms
            )));
        }
        let norm = |p: &str| p.trim_matches('/').to_owned();
        if norm(&s.agent_cgroup).is_empty() {
            return Err(ConfigError::Invalid(
                "steer.agent_cgroup must name a cgroup of its own, not the root".into(),
            ));
        }
        if norm(&s.agent_cgroup) == norm(&s.cgroup) {
            return Err(ConfigError::Invalid(
                "steer.agent_cgroup must differ from steer.cgroup (it would exempt every process)"
                    .into(),
            ));
        }
        for p in std::iter::once(&s.agent_cgroup)
            .chain(&s.exempt_cgroups)
            .chain([&s.cgroup])
        {
            if p.split('/').any(|c| c == "..") {
                return Err(ConfigError::Invalid(format!(
                    "cgroup path `{p}` must not contain `..`"
                )));
            }
        }
        let g = &self.gateway;
        if g.enabled {
            if g.lan_interfaces.is_empty() && g.client_cidrs.is_empty() {
                return Err(ConfigError::Invalid(
                    "gateway: set lan_interfaces or client_cidrs (which traffic is the LAN's)"
                        .into(),
                ));
            }
            if g.ports.is_empty() || g.ports.contains(&0) {
                return Err(ConfigError::Invalid(
                    "gateway.ports must list ports 1-65535".into(),
                ));
            }
            if g.mark == 0 || g.mark == s.bypass_mark {
                return Err(ConfigError::Invalid(
                    "gateway.mark must be non-zero and differ from steer.bypass_mark".into(),
                ));
            }
            if g.table.is_empty()
                || !g
                    .table
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(ConfigError::Invalid(
                    "gateway.table must be a name of letters, digits, `_` and `-`".into(),
                ));
            }
            if g.port == 0 || (s.enabled && g.port == self.proxy.port) {
                return Err(ConfigError::Invalid(
                    "gateway.port must be a fixed port other than proxy.port".into(),
                ));
            }
            if g.route_table == 0 || g.route_table >= 253 && g.route_table <= 255 {
                return Err(ConfigError::Invalid(
                    "gateway.route_table must not be 0 or a system table (253-255)".into(),
                ));
            }
        }
        if self.tls.ca_days == 0 || self.tls.ca_days > MAX_CA_DAYS {
            return Err(ConfigError::Invalid(format!(
                "tls.ca_days must be 1 to {MAX_CA_DAYS}"
            )));
        }
        if self.proxy.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "proxy.max_connections must be > 0".into(),
            ));
        }
        if self.proxy.max_header_bytes < 1024 || self.proxy.max_headers == 0 {
            return Err(ConfigError::Invalid(
                "proxy.max_header_bytes must be at least 1024 and proxy.max_headers at least 1"
                    .into(),
            ));
        }
        let mut ids = std::collections::HashSet::new();
        for app in &self.apps {
            if app.id.is_empty() || !ids.insert(app.id.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "apps: id `{}` is empty or repeated",
                    app.id
                )));
            }
            if app.hosts.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "apps.{}: hosts must not be empty",
                    app.id
                )));
            }
            for h in app.hosts.iter().chain(&app.do_not_inspect) {
                sluice_net::HostPattern::parse(h)
                    .map_err(|e| ConfigError::Invalid(format!("apps.{}: {e}", app.id)))?;
            }
            let bundle_only = [
                ("identity", app.identity.is_some()),
                ("inspect_max_bytes", app.inspect_max_bytes.is_some()),
                ("not_inspectable", app.not_inspectable.is_some()),
                ("websocket", app.websocket.is_some()),
                ("activities", !app.activities.is_empty()),
            ];
            if let Some((field, _)) = bundle_only.iter().find(|(_, set)| *set) {
                return Err(ConfigError::Invalid(format!(
                    "apps.{}.{field}: set in a policy bundle's catalog.yaml, not in the agent's \
                     config (it only applies with the bundle's policies)",
                    app.id
                )));
            }
        }
        if self.proxy.inspect_budget_bytes < 1024 || self.proxy.inspect_budget_bytes_per_uid < 1024
        {
            return Err(ConfigError::Invalid(
                "proxy.inspect_budget_bytes and inspect_budget_bytes_per_uid must be at least 1024"
                    .into(),
            ));
        }
        if self.proxy.max_connections_per_uid == 0 {
            return Err(ConfigError::Invalid(
                "proxy.max_connections_per_uid must be at least 1".into(),
            ));
        }
        for h in &self.proxy.reject_hosts {
            sluice_net::HostPattern::parse(h)
                .map_err(|e| ConfigError::Invalid(format!("proxy.reject_hosts: {e}")))?;
        }
        self.report.validate()?;
        if !self.posture.root.is_absolute() {
            return Err(ConfigError::Invalid(format!(
                "posture.root ({}) must be an absolute path",
                self.posture.root.display()
            )));
        }
        if !self.admin.listen.ip().is_loopback() {
            return Err(ConfigError::Invalid(format!(
                "admin.listen ({}) must be a loopback address",
                self.admin.listen
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_steer_web_ports_everywhere() {
        let cfg = Config::parse("").expect("empty config is valid");
        assert_eq!(cfg.steer.include.len(), 2);
        assert_eq!(
            cfg.steer.include[0].ports,
            vec![PortSpec::single(80), PortSpec::single(443)]
        );
        assert_eq!(cfg.steer.fail_mode, FailMode::Open);
        assert_eq!(cfg.proxy.port, 1001);
    }

    #[test]
    fn parses_rules_ports_and_ranges() {
        let cfg = Config::parse(
            r#"
            [steer]
            fail_mode = "closed"
            include = [{ cidr = "10.1.2.3/8", ports = [443, "8000-8099"] }, { cidr = "2001:db8::1" }]
            exclude = [{ cidr = "10.9.0.0/16" }]
            "#,
        )
        .expect("valid");
        let r = &cfg.steer.include[0];
        assert_eq!(r.cidr.to_string(), "10.0.0.0/8", "host bits are cleared");
        assert_eq!(
            r.ports,
            vec![PortSpec::single(443), PortSpec { lo: 8000, hi: 8099 }]
        );
        assert_eq!(cfg.steer.include[1].cidr.prefix, 128);
        assert!(cfg.steer.include[1].ports.is_empty());
        assert_eq!(cfg.steer.fail_mode, FailMode::Closed);
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        for (text, needle) in [
            ("[steer]\nfail_mod = \"open\"", "unknown field"),
            (
                "[steer]\ninclude = [{ cidr = \"10.0.0.0/33\" }]",
                "prefix length",
            ),
            ("[steer]\ninclude = [{ cidr = \"nope\" }]", "not an IP"),
            (
                "[steer]\ninclude = [{ cidr = \"10.0.0.0/8\", ports = [0] }]",
                "invalid port",
            ),
            (
                "[steer]\ninclude = [{ cidr = \"10.0.0.0/8\", ports = [\"9-3\"] }]",
                "invalid port",
            ),
            (
                "[steer]\nheartbeat_bound_ms = 100\nheartbeat_interval_ms = 100",
                "at least twice",
            ),
            ("[steer]\nagent_cgroup = \"/\"", "not the root"),
            (
                "[steer]\ncgroup = \"a\"\nagent_cgroup = \"/a/\"",
                "must differ",
            ),
            ("[admin]\nlisten = \"0.0.0.0:1\"", "loopback"),
            (
                "[report]\ncollector = \"http://c:1\"",
                "must be an https:// URL",
            ),
            ("[report]\nspool_max_bytes = 4096", "at least two segments"),
            (
                "[[apps]]\nid = \"f\"\nhosts = [\"f.test\"]\nnot_inspectable = \"block\"",
                "apps.f.not_inspectable: set in a policy bundle",
            ),
            (
                "[[apps]]\nid = \"f\"\nhosts = [\"f.test\"]\nfail_mode = \"closed\"",
                "unknown field",
            ),
            ("[proxy]\ninspect_budget_bytes = 0", "inspect_budget_bytes"),
            ("[posture]\nroot = \"tree\"", "posture.root"),
            ("[posture]\nroots = \"/\"", "unknown field"),
        ] {
            let err = Config::parse(text).expect_err(text).to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn posture_root_defaults_to_this_host() {
        let cfg = Config::parse("").expect("empty config is valid");
        assert_eq!(cfg.posture.root, PathBuf::from("/"));
        let cfg = Config::parse("[posture]\nroot = \"/srv/image\"").expect("valid");
        assert_eq!(cfg.posture.root, PathBuf::from("/srv/image"));
    }

    #[test]
    fn cidr_containment() {
        let a: Cidr = "10.0.0.0/8".parse().expect("cidr");
        let b: Cidr = "10.1.0.0/16".parse().expect("cidr");
        let c: Cidr = "::/0".parse().expect("cidr");
        assert!(a.contains(&b) && !b.contains(&a));
        assert!(!c.contains(&a), "families never contain each other");
        assert!(Cidr::ANY_V4.contains(&a));
    }
}

#[cfg(test)]
mod bundle_url_tests {
    use super::bundle_url_allowed;

    #[test]
    fn bundle_urls_are_https_or_loopback_http() {
        for ok in [
            "https://collector.corp.example/api/v1/bundles/current",
            "http://127.0.0.1:8181/b.tar.gz",
            "http://127.9.9.9/b",
            "http://[::1]:80/b",
            "http://localhost/b",
        ] {
            assert!(bundle_url_allowed(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1/b",
            "http://bundles.corp.example/b",
            "http://[::ffff:10.0.0.1]/b",
            "ftp://127.0.0.1/b",
            "file:///etc/b",
        ] {
            assert!(bundle_url_allowed(bad).is_err(), "{bad}");
        }
    }
}
