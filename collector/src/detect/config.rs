//! The `[detection]` section of the collector's configuration: which detectors run, how
//! sensitive each is, whom it watches, and what an alert it raises does to the user's risk.
//!
//! ```toml
//! [detection]                    # enabled by default, every detector on with the defaults below
//! enabled = true
//! queue = 4096                   # batches of new events waiting for detection
//! history_days = 14              # baselines and known devices/processes/networks/countries
//! rebuild_max_events = 1000000   # newest stored events replayed at start to rebuild them
//! learning_events = 50           # a user's events before "new ..." detectors may alert
//! learning_s = 86400             # and the time since the user's first event
//!
//! [detection.mass_download]      # any detector: enabled, severity, window_s, floor,
//! floor = 100                    # baseline_multiplier, groups, exclude_groups, dedup_s,
//! baseline_multiplier = 10       # raise_risk
//! exclude_groups = ["backup"]
//! raise_risk = { level = "high", for_s = 3600 }  # the default for mass_download and
//!                                # impossible_travel; `level = "none"` turns it off
//!
//! [detection.geo]                # impossible travel and new country need a database
//! database = "/var/lib/GeoIP/GeoLite2-City.mmdb"
//! max_speed_kmh = 1000
//! min_distance_km = 300
//! ```
//!
//! Every detector takes the same settings table ([`RuleConfig`]); what a setting means for
//! each, and its default, is in [`Detector`]'s documentation. Defaults are resolved here
//! ([`DetectionConfig::rule`]) so the engine sees one complete [`Rule`] per detector.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sluice_policy::model::UserRisk;

/// An alert's severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth a look.
    Low,
    /// Worth a look today.
    Medium,
    /// Act now.
    High,
    /// Act now, and wake someone.
    Critical,
}

impl Severity {
    /// Every severity, lowest first.
    pub const ALL: [Severity; 4] = [Self::Low, Self::Medium, Self::High, Self::Critical];

    /// Its name (config, API, pages).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::Critical => "critical",
        }
    }

    /// The severity named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// The OCSF `severity_id` (2 low .. 5 critical).
    pub fn ocsf(self) -> u32 {
        match self {
            Self::Low => 2,
            Self::Medium => 3,
            Self::High => 4,
            Self::Critical => 5,
        }
    }

    /// The RFC 5424 severity (5 notice, 4 warning, 3 error, 2 critical).
    pub fn syslog(self) -> u8 {
        match self {
            Self::Low => 5,
            Self::Medium => 4,
            Self::High => 3,
            Self::Critical => 2,
        }
    }
}

/// The detectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Detector {
    /// Files downloaded by one user within `window_s` (default 600) reach
    /// `max(floor, baseline_multiplier × baseline)` (defaults 50 and 10; the baseline is the
    /// user's mean count per active window over `history_days`). Default severity high.
    MassDownload,
    /// As mass download, for uploads.
    MassUpload,
    /// As mass download, for deletions (default floor 30).
    MassDelete,
    /// Uploads blocked by policy for one user within `window_s` (default 600) reach `floor`
    /// (default 5; `baseline_multiplier` default 0: no baseline). Default severity medium.
    BlockedUploads,
    /// A device (`device.uid`) the user was never seen on, once the user has a history.
    /// Default severity medium.
    NewDevice,
    /// A process (path, else name) the user never used for that app, once the user has a
    /// history with the app. Default severity low.
    NewProcess,
    /// A network (the public address, else the client address, as a /24 or /48) the user was
    /// never seen from, once the user has a history. Default severity low.
    NewNetwork,
    /// A country (GeoIP) the user was never seen from, once the user has a history. Needs
    /// `[detection.geo]`. Default severity medium.
    NewCountry,
    /// Two events of one user from places further apart than `[detection.geo] max_speed_kmh`
    /// allows in the time between them (and at least `min_distance_km` apart). Needs
    /// `[detection.geo]`. Default severity high.
    ImpossibleTravel,
}

impl Detector {
    /// Every detector.
    pub const ALL: [Detector; 9] = [
        Self::MassDownload,
        Self::MassUpload,
        Self::MassDelete,
        Self::BlockedUploads,
        Self::NewDevice,
        Self::NewProcess,
        Self::NewNetwork,
        Self::NewCountry,
        Self::ImpossibleTravel,
    ];

    /// Its name (config table, API, pages).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MassDownload => "mass_download",
            Self::MassUpload => "mass_upload",
            Self::MassDelete => "mass_delete",
            Self::BlockedUploads => "blocked_uploads",
            Self::NewDevice => "new_device",
            Self::NewProcess => "new_process",
            Self::NewNetwork => "new_network",
            Self::NewCountry => "new_country",
            Self::ImpossibleTravel => "impossible_travel",
        }
    }

    /// The detector named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.as_str() == s)
    }

    /// The risk an alert of this detector raises unless configured otherwise: exfiltration in
    /// bulk and a stolen session raise the user's risk to high for an hour (the default bundle
    /// then blocks their Confidential and Highly Confidential downloads); the others only alert.
    fn default_raise(self) -> Option<RaiseRisk> {
        matches!(self, Self::MassDownload | Self::ImpossibleTravel).then_some(RaiseRisk {
            level: UserRisk::High,
            for_s: Some(3600),
        })
    }

    /// The defaults: severity, window_s, floor, baseline_multiplier, dedup_s.
    fn defaults(self) -> (Severity, u64, u64, f64, u64) {
        match self {
            Self::MassDownload | Self::MassUpload => (Severity::High, 600, 50, 10.0, 3600),
            Self::MassDelete => (Severity::High, 600, 30, 10.0, 3600),
            Self::BlockedUploads => (Severity::Medium, 600, 5, 0.0, 3600),
            Self::NewDevice => (Severity::Medium, 0, 0, 0.0, 86_400),
            Self::NewProcess | Self::NewNetwork => (Severity::Low, 0, 0, 0.0, 86_400),
            Self::NewCountry => (Severity::Medium, 0, 0, 0.0, 86_400),
            Self::ImpossibleTravel => (Severity::High, 0, 0, 0.0, 3600),
        }
    }
}

impl std::fmt::Display for Detector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Raising the user's risk when a detector opens an alert (lowered again when the alert is
/// resolved or dismissed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaiseRisk {
    /// The level: `low`, `medium`, `high` (a higher risk already there stays); `none` turns a
    /// detector's default raise off.
    pub level: UserRisk,
    /// For how long (seconds); without it, until the alert is closed or an admin lowers it.
    #[serde(default)]
    pub for_s: Option<u64>,
}

/// One detector's table (`[detection.<name>]`); every setting is optional, defaults per
/// detector (see [`Detector`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Whether it runs. Default true.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// The severity of its alerts.
    #[serde(default)]
    pub severity: Option<Severity>,
    /// The sliding window counted (seconds; volume detectors).
    #[serde(default)]
    pub window_s: Option<u64>,
    /// The least count in a window that alerts (volume detectors).
    #[serde(default)]
    pub floor: Option<u64>,
    /// Alert only when the count is also at least this many times the user's own baseline
    /// (volume detectors; 0: the floor alone).
    #[serde(default)]
    pub baseline_multiplier: Option<f64>,
    /// Only users in one of these groups (default: everyone).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Never users in one of these groups.
    #[serde(default)]
    pub exclude_groups: Vec<String>,
    /// A repeat for the same user within this long (seconds) of an open or acknowledged
    /// alert's last evidence adds to that alert instead of opening another.
    #[serde(default)]
    pub dedup_s: Option<u64>,
    /// Raise the user's risk when it opens an alert.
    #[serde(default)]
    pub raise_risk: Option<RaiseRisk>,
}

/// `[detection.geo]`: the GeoIP database behind new-country and impossible-travel.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeoConfig {
    /// A MaxMind DB file (GeoIP2 or GeoLite2 City, or Country: then no impossible travel).
    pub database: PathBuf,
    /// Faster than this between two events' places is impossible travel (km/h). Default 1000.
    #[serde(default = "default_speed")]
    pub max_speed_kmh: f64,
    /// Places closer than this never make impossible travel (GeoIP places are approximate).
    /// Default 300 km.
    #[serde(default = "default_min_distance")]
    pub min_distance_km: f64,
}

fn default_speed() -> f64 {
    1000.0
}
fn default_min_distance() -> f64 {
    300.0
}

/// `[detection]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectionConfig {
    /// Whether detection runs at all. Default true.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Batches of new events waiting for detection; when full, ingestion waits for room (a
    /// batch never skips detection; the waits are counted in `/api/v1/status`). Default 4096.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Days of history baselines are measured over. Default 14.
    #[serde(default = "default_history_days")]
    pub history_days: u32,
    /// At start the newest stored events (up to this many, within `history_days`) are replayed,
    /// without alerting, to rebuild baselines and what each user is known to use. Default
    /// 1,000,000; 0 starts from nothing.
    #[serde(default = "default_rebuild")]
    pub rebuild_max_events: u64,
    /// A user's events seen before the "new device / process / network / country" detectors
    /// may alert for them (for new process: the user's events with that app). Default 50.
    #[serde(default = "default_learning_events")]
    pub learning_events: u64,
    /// And the time since the user's first event (seconds). Default 86,400.
    #[serde(default = "default_learning_s")]
    pub learning_s: u64,
    /// Mass download.
    #[serde(default)]
    pub mass_download: RuleConfig,
    /// Mass upload.
    #[serde(default)]
    pub mass_upload: RuleConfig,
    /// Mass delete.
    #[serde(default)]
    pub mass_delete: RuleConfig,
    /// Repeated blocked uploads.
    #[serde(default)]
    pub blocked_uploads: RuleConfig,
    /// First activity from a new device.
    #[serde(default)]
    pub new_device: RuleConfig,
    /// A new process for an app.
    #[serde(default)]
    pub new_process: RuleConfig,
    /// A new network.
    #[serde(default)]
    pub new_network: RuleConfig,
    /// A new country (needs `geo`).
    #[serde(default)]
    pub new_country: RuleConfig,
    /// Impossible travel (needs `geo`).
    #[serde(default)]
    pub impossible_travel: RuleConfig,
    /// The GeoIP database.
    #[serde(default)]
    pub geo: Option<GeoConfig>,
}

fn yes() -> bool {
    true
}
fn default_queue() -> usize {
    4096
}
fn default_history_days() -> u32 {
    14
}
fn default_rebuild() -> u64 {
    1_000_000
}
fn default_learning_events() -> u64 {
    50
}
fn default_learning_s() -> u64 {
    86_400
}

impl Default for DetectionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            queue: default_queue(),
            history_days: default_history_days(),
            rebuild_max_events: default_rebuild(),
            learning_events: default_learning_events(),
            learning_s: default_learning_s(),
            mass_download: RuleConfig::default(),
            mass_upload: RuleConfig::default(),
            mass_delete: RuleConfig::default(),
            blocked_uploads: RuleConfig::default(),
            new_device: RuleConfig::default(),
            new_process: RuleConfig::default(),
            new_network: RuleConfig::default(),
            new_country: RuleConfig::default(),
            impossible_travel: RuleConfig::default(),
            geo: None,
        }
    }
}

/// One detector's settings, defaults resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Which.
    pub detector: Detector,
    /// Whether it runs.
    pub enabled: bool,
    /// Its alerts' severity.
    pub severity: Severity,
    /// Sliding window (ms).
    pub window_ms: u64,
    /// Least count that alerts.
    pub floor: u64,
    /// Times the baseline (0: none).
    pub baseline_multiplier: f64,
    /// Only these groups (empty: all).
    pub groups: Vec<String>,
    /// Never these groups.
    pub exclude_groups: Vec<String>,
    /// Deduplication span (ms).
    pub dedup_ms: u64,
    /// Risk raised with a new alert.
    pub raise_risk: Option<RaiseRisk>,
}

impl Rule {
    /// Whether a user in `groups` is watched by this rule.
    pub fn watches(&self, groups: &[String]) -> bool {
        if groups.iter().any(|g| self.exclude_groups.contains(g)) {
            return false;
        }
        self.groups.is_empty() || groups.iter().any(|g| self.groups.contains(g))
    }
}

impl DetectionConfig {
    /// The table of `d`.
    pub fn table(&self, d: Detector) -> &RuleConfig {
        match d {
            Detector::MassDownload => &self.mass_download,
            Detector::MassUpload => &self.mass_upload,
            Detector::MassDelete => &self.mass_delete,
            Detector::BlockedUploads => &self.blocked_uploads,
            Detector::NewDevice => &self.new_device,
            Detector::NewProcess => &self.new_process,
            Detector::NewNetwork => &self.new_network,
            Detector::NewCountry => &self.new_country,
            Detector::ImpossibleTravel => &self.impossible_travel,
        }
    }

    /// `d`'s settings with its defaults filled in.
    pub fn rule(&self, d: Detector) -> Rule {
        let t = self.table(d);
        let (severity, window_s, floor, mult, dedup_s) = d.defaults();
        let geo_ok =
            !matches!(d, Detector::NewCountry | Detector::ImpossibleTravel) || self.geo.is_some();
        Rule {
            detector: d,
            enabled: self.enabled && t.enabled.unwrap_or(true) && geo_ok,
            severity: t.severity.unwrap_or(severity),
            window_ms: t.window_s.unwrap_or(window_s).saturating_mul(1000),
            floor: t.floor.unwrap_or(floor),
            baseline_multiplier: t.baseline_multiplier.unwrap_or(mult),
            groups: t.groups.clone(),
            exclude_groups: t.exclude_groups.clone(),
            dedup_ms: t.dedup_s.unwrap_or(dedup_s).saturating_mul(1000),
            // `level = "none"` turns a default raise off.
            raise_risk: t
                .raise_risk
                .or_else(|| d.default_raise())
                .filter(|r| r.level != UserRisk::None),
        }
    }

    /// Checks the values (called by the configuration's own check).
    pub fn check(&self) -> Result<(), String> {
        if self.queue == 0 {
            return Err("detection.queue must be non-zero".into());
        }
        if self.history_days == 0 {
            return Err("detection.history_days must be non-zero".into());
        }
        for d in Detector::ALL {
            let t = self.table(d);
            let name = d.as_str();
            if t.window_s == Some(0) {
                return Err(format!("detection.{name}.window_s must be non-zero"));
            }
            if let Some(m) = t.baseline_multiplier
                && !(m.is_finite() && m >= 0.0)
            {
                return Err(format!(
                    "detection.{name}.baseline_multiplier must be a number >= 0"
                ));
            }
            if t.floor == Some(0) {
                return Err(format!("detection.{name}.floor must be at least 1"));
            }
            if let Some(r) = t.raise_risk
                && r.level == UserRisk::Suspended
            {
                return Err(format!(
                    "detection.{name}.raise_risk.level must be none, low, medium or high \
                     (suspending is an admin's decision)"
                ));
            }
        }
        if let Some(g) = &self.geo
            && !(g.max_speed_kmh.is_finite()
                && g.max_speed_kmh > 0.0
                && g.min_distance_km.is_finite()
                && g.min_distance_km >= 0.0)
        {
            return Err("detection.geo: max_speed_kmh must be > 0 and min_distance_km >= 0".into());
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<DetectionConfig, String> {
        let c: DetectionConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.check()?;
        Ok(c)
    }

    #[test]
    fn defaults_resolve_per_detector() {
        let c = parse("").unwrap();
        assert!(c.enabled);
        let md = c.rule(Detector::MassDownload);
        assert!(md.enabled);
        assert_eq!((md.floor, md.window_ms), (50, 600_000));
        assert_eq!(md.severity, Severity::High);
        assert_eq!(c.rule(Detector::MassDelete).floor, 30);
        assert_eq!(c.rule(Detector::BlockedUploads).floor, 5);
        // Geo detectors need a database.
        assert!(!c.rule(Detector::NewCountry).enabled);
        assert!(!c.rule(Detector::ImpossibleTravel).enabled);
        // Bulk exfiltration and a stolen session raise the user's risk by default; `none`
        // turns that off.
        assert_eq!(
            md.raise_risk,
            Some(RaiseRisk {
                level: UserRisk::High,
                for_s: Some(3600)
            })
        );
        assert!(c.rule(Detector::ImpossibleTravel).raise_risk.is_some());
        assert!(c.rule(Detector::NewDevice).raise_risk.is_none());
        let off = parse("[mass_download]\nraise_risk = { level = \"none\" }\n").unwrap();
        assert!(off.rule(Detector::MassDownload).raise_risk.is_none());
    }

    #[test]
    fn tables_override_and_are_checked() {
        let c = parse(
            "learning_events = 5\n[mass_download]\nfloor = 100\nseverity = \"critical\"\n\
             groups = [\"staff\"]\nexclude_groups = [\"backup\"]\n\
             raise_risk = { level = \"high\", for_s = 3600 }\n\
             [geo]\ndatabase = \"/x.mmdb\"\n",
        )
        .unwrap();
        let r = c.rule(Detector::MassDownload);
        assert_eq!((r.floor, r.severity), (100, Severity::Critical));
        assert_eq!(r.raise_risk.unwrap().level, UserRisk::High);
        assert!(r.watches(&["staff".into()]));
        assert!(!r.watches(&["staff".into(), "backup".into()]));
        assert!(!r.watches(&[]));
        assert!(c.rule(Detector::ImpossibleTravel).enabled);
        assert_eq!(c.geo.unwrap().max_speed_kmh, 1000.0);
        for (text, want) in [
            ("[mass_upload]\nwindow_s = 0\n", "window_s"),
            ("[mass_upload]\nflor = 3\n", "flor"),
            ("[mass_upload]\nseverity = \"huge\"\n", "huge"),
            (
                "[new_device]\nraise_risk = { level = \"suspended\" }\n",
                "raise_risk",
            ),
            (
                "[mass_delete]\nbaseline_multiplier = -1.0\n",
                "baseline_multiplier",
            ),
            ("queue = 0\n", "queue"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
        let off = parse("enabled = false\n").unwrap();
        assert!(!off.rule(Detector::NewDevice).enabled);
    }
}
