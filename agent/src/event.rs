//! The activity event: one per request in an inspected app, allowed or not, with the decision
//! and every fact it was made on.

use std::{collections::BTreeMap, net::IpAddr, time::SystemTime};

use serde::Serialize;

use sluice_inspect::FileFacts;
use sluice_policy::model::{Action, Activity, Client, Device, Kind};

/// What the session controls saw and did for one request.
#[derive(Debug, Clone, Serialize)]
pub struct ActivityEvent {
    /// Unique event id (a random GUID).
    pub id: String,
    /// When the request arrived, Unix milliseconds.
    pub time: u64,
    /// The request id, also the incident id shown to the user when blocked.
    pub incident: String,
    /// Catalogued app id.
    pub app: String,
    /// Host (SNI or Host).
    pub host: String,
    /// HTTP method.
    pub method: String,
    /// URL as asked.
    pub url: String,
    /// Status the origin answered (0: it was not asked, or did not answer).
    pub status: u16,
    /// The activity.
    pub activity: Activity,
    /// The action taken.
    pub action: Action,
    /// Which kind of policy decided (`access` or `session`).
    pub decided_by: Kind,
    /// The deciding policy (none: nothing matched, or the app's not-inspectable setting).
    pub policy: Option<String>,
    /// Every policy that matched.
    pub matched: Vec<String>,
    /// The user, from the app's identity source.
    pub user: Option<String>,
    /// Why an identity the request carried was not trusted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_error: Option<String>,
    /// Device posture.
    pub device: Device,
    /// Client kind.
    pub client: Client,
    /// The client's address: the device's own on its default route (an endpoint) or the LAN
    /// client's (a gateway).
    pub source: Option<IpAddr>,
    /// The public address the collector sees the device connect from (an endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_source: Option<IpAddr>,
    /// Where the connection was headed (the app's address).
    pub destination: Option<std::net::SocketAddr>,
    /// The client's user agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    /// The process that opened the connection (none for a gateway's LAN client).
    #[serde(skip_serializing_if = "ProcessFacts::is_none")]
    pub process: ProcessFacts,
    /// Files in the request or response.
    pub files: Vec<FileFacts>,
    /// DLP hits in form fields and text bodies (not files).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub dlp: BTreeMap<String, u32>,
    /// The label written into a download (label id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label_applied: Option<String>,
    /// Permissions written with it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub permissions: Vec<String>,
    /// Files `protect` encrypted, with their sealed passwords.
    pub protected: Vec<sluice_protocol::ProtectedFile>,
    /// Notes for people (why not inspectable, why a label was not written).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The process side of an event.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcessFacts {
    /// Process id (thread group).
    pub pid: u32,
    /// Executable path.
    pub exe: Option<String>,
    /// Command name.
    pub comm: String,
    /// User id.
    pub uid: u32,
    /// Local user name.
    pub user: Option<String>,
}

impl ProcessFacts {
    /// No process of this host (a gateway's LAN client).
    pub fn is_none(&self) -> bool {
        self.pid == 0 && self.comm.is_empty() && self.exe.is_none()
    }
}

/// Unix milliseconds of `t`.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
