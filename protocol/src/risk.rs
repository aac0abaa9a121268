//! The risk channel: what the collector knows that changes decisions on every agent (a user's
//! risk, raised by an alert or set by an admin; a device's mark). Agents long-poll
//! `GET /api/v1/risk` (ETag, `If-None-Match`, `Prefer: wait=N`, as for bundles) and decide every
//! request on the newest [`RiskState`] they hold. Levels travel as names (`high`, `quarantined`)
//! so an agent older than the collector reads an unknown one as the highest it knows (fail
//! closed), never as none.

use serde::{Deserialize, Serialize};

/// Everything marked now: every user with a risk above none and every marked device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RiskState {
    /// Increases with every change (the ETag is derived from it).
    pub revision: u64,
    /// Users at risk, by e-mail (lowercase).
    #[serde(default)]
    pub users: Vec<UserMark>,
    /// Marked devices, by agent id.
    #[serde(default)]
    pub devices: Vec<DeviceMark>,
}

/// A user's risk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserMark {
    /// E-mail, lowercase.
    pub user: String,
    /// `low`, `medium`, `high` or `suspended`.
    pub risk: String,
    /// Why, for the block message (`alert 3f2a…: mass download, 42 files in 300 s`).
    pub reason: String,
    /// The alert that raised it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert: Option<String>,
    /// When it lapses (unix seconds); none: until lowered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

/// A device's mark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceMark {
    /// The agent id (`device.uid` of its events).
    pub device: String,
    /// `untrusted` or `quarantined`.
    pub mark: String,
    /// Why.
    pub reason: String,
    /// When it lapses (unix seconds); none: until lifted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

/// A change asked of the collector (`POST /api/v1/risk/users/<email>`,
/// `POST /api/v1/risk/devices/<id>`): the level (`none` lifts it), why, and for how long.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarkRequest {
    /// The level or mark (`none` lifts it).
    pub level: String,
    /// Why (shown to the user in block messages).
    #[serde(default)]
    pub reason: String,
    /// Seconds it lasts; none: until lifted.
    #[serde(default)]
    pub for_s: Option<u64>,
}
