//! Measured device posture: the schema of a bundle's optional `posture.yaml`, its compiled form
//! ([`Posture`]), and the pure function that turns check results into posture tags.
//!
//! It lives in the policy crate because the central team writes it with the policies that use its
//! tags (`device_tags: [compliant]`), and the compiler must refuse a bundle whose posture file is
//! wrong before any of it is enforced. Measuring is the agent's (`sluice::posture`): this module
//! only says what to measure and what the results mean, so the collector and `sluice policy`
//! can read the same file without touching a system.
//!
//! ```yaml
//! interval_s: 300                 # re-evaluation period, seconds (10..=86400; default 300)
//! checks:                         # at most 64
//!   - id: disk                    # unique, [a-z0-9_-]{1,64}
//!     kind: disk_encrypted        # the root file system sits on dm-crypt (LUKS), directly or under LVM
//!   - id: firewall
//!     kind: firewall              # an nftables ruleset with at least one rule (outside Sluice's own table)
//!   - id: os
//!     kind: os_version            # /etc/os-release ID is one of `os` and VERSION_ID >= `min` (either may be left out)
//!     os: [debian, ubuntu]
//!     min: "12"
//!   - id: kernel
//!     kind: kernel_version        # /proc/sys/kernel/osrelease >= min
//!     min: "6.1"
//!   - id: updates
//!     kind: packages_updated      # the last dpkg install/upgrade is at most max_days old
//!     max_days: 30
//!   - id: secureboot
//!     kind: secure_boot           # booted with UEFI Secure Boot on
//!   - id: edr
//!     kind: process_running       # a process runs this executable (exact path), with this sha256 when given
//!     exe: /opt/edr/bin/edrd
//!     sha256: "…64 hex digits…"
//!   - id: no-tor
//!     kind: process_absent        # no process runs an executable matching `exe` (glob) or named `comm`
//!     exe: /usr/bin/tor
//!   - id: agent
//!     kind: agent_version         # the Sluice agent's version >= min
//!     min: "0.1.0"
//!   - id: bundle
//!     kind: bundle_fresh          # the active bundle was fetched and verified at most max_age_s ago
//!     max_age_s: 86400
//! rules:                          # at most 64
//!   - tag: compliant              # [a-z0-9-]{1,32}; not `managed` or `unmanaged`
//!     all_pass: [disk, firewall]  # every one of these passes
//!   - tag: needs-updates
//!     any_fail: [updates]         # at least one of these fails
//!     unknown: fail               # optional: count an unknown result as a failure (or `pass`)
//! ```
//!
//! Each check ends `pass`, `fail` or `unknown` (could not be measured) with a human reason. A rule
//! gives its tag when every condition it states holds (`all_pass` and `any_fail` together: both).
//! By default an unknown result satisfies neither condition: it is not a pass for `all_pass` (fail
//! closed) and not a failure for `any_fail`; `unknown: pass` or `unknown: fail` counts it as that
//! instead. Several rules may give the same tag: it is given when any of them holds.
//!
//! Versions are digits separated by dots (`"6.1"`, `"22.04"`, `12`), compared part by part with
//! missing parts as zeros; write them quoted, since YAML reads `6.10` as the number 6.1.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Deserializer, Serialize};

use super::{PolicyError, line_of};

/// The bundle file this module reads.
pub const FILE: &str = "posture.yaml";

/// Most checks, and most rules, one file may hold (each evaluation reads the system once per check).
pub const MAX_ITEMS: usize = 64;

/// Tags the agent gives itself from its configuration and enrolment; rules cannot give them.
pub const RESERVED_TAGS: [&str; 2] = ["managed", "unmanaged"];

/// `posture.yaml`, as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PostureFile {
    /// Seconds between evaluations (10 to 86400). Default 300.
    #[serde(default = "default_interval_s")]
    pub interval_s: u64,
    /// What to measure.
    #[serde(default)]
    pub checks: Vec<CheckDef>,
    /// Which tags the results give.
    #[serde(default)]
    pub rules: Vec<RuleDef>,
}

fn default_interval_s() -> u64 {
    300
}

impl Default for PostureFile {
    fn default() -> Self {
        Self {
            interval_s: default_interval_s(),
            checks: Vec::new(),
            rules: Vec::new(),
        }
    }
}

/// One check, as written: an id, a kind, and the fields that kind takes (the others must be
/// absent).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CheckDef {
    /// Unique among the checks; `[a-z0-9_-]{1,64}`. Rules and reports name the check by it.
    pub id: String,
    /// What is measured.
    pub kind: CheckKind,
    /// `os_version`: accepted `/etc/os-release` `ID`s (any, when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub os: Vec<String>,
    /// `os_version`, `kernel_version`, `agent_version`: the lowest accepted version.
    #[serde(
        default,
        deserialize_with = "version_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub min: Option<String>,
    /// `packages_updated`: most days since the last package install or upgrade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_days: Option<u64>,
    /// `process_running`: the executable's absolute path; `process_absent`: a glob over it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    /// `process_running`: the executable's SHA-256 (64 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// `process_running`: the user id the process must run as (real and effective), or `any`.
    /// Default 0: a security agent that runs as an ordinary user (a user starting the binary
    /// themselves) is not the agent.
    #[serde(
        default,
        deserialize_with = "uid_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub uid: Option<RunAs>,
    /// `process_absent`: a command name (`/proc/<pid>/comm`, at most 15 bytes; globs allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    /// `bundle_fresh`: the oldest accepted bundle, seconds since it was fetched and verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_s: Option<u64>,
}

/// Whom `process_running` accepts the process running as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RunAs {
    /// This user id (real and effective).
    Uid(u32),
    /// Anyone.
    Any,
}

/// `uid: 0` or `uid: any`.
fn uid_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<RunAs>, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = Option<RunAs>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a user id (0) or `any`")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            match v {
                "any" => Ok(Some(RunAs::Any)),
                _ => v
                    .parse()
                    .map(|u| Some(RunAs::Uid(u)))
                    .map_err(|_| E::custom(format!("`{v}` is neither a user id nor `any`"))),
            }
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            u32::try_from(v)
                .map(|u| Some(RunAs::Uid(u)))
                .map_err(|_| E::custom(format!("{v} is not a user id")))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
            u32::try_from(v)
                .map(|u| Some(RunAs::Uid(u)))
                .map_err(|_| E::custom(format!("{v} is not a user id")))
        }
    }
    d.deserialize_any(V)
}

/// A version written as a string or an integer; a float is refused (YAML reads `6.10` as 6.1).
fn version_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a version such as \"6.1\"")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_owned()))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Err(E::custom(format!(
                "the version {v} is a number: quote it (`min: \"6.10\"`), YAML would read 6.10 as 6.1"
            )))
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

/// What a check measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    /// The root file system sits on dm-crypt (LUKS), directly or under LVM.
    DiskEncrypted,
    /// An nftables ruleset with at least one rule is loaded.
    Firewall,
    /// The OS (`/etc/os-release` `ID`) and its `VERSION_ID`.
    OsVersion,
    /// The running kernel's release.
    KernelVersion,
    /// Days since the last package install or upgrade (dpkg).
    PackagesUpdated,
    /// UEFI Secure Boot is on.
    SecureBoot,
    /// A process runs an executable (with a given hash).
    ProcessRunning,
    /// No process runs an executable, or has a command name.
    ProcessAbsent,
    /// The Sluice agent's own version.
    AgentVersion,
    /// The active bundle's age.
    BundleFresh,
}

impl CheckKind {
    /// The name written in `posture.yaml` and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DiskEncrypted => "disk_encrypted",
            Self::Firewall => "firewall",
            Self::OsVersion => "os_version",
            Self::KernelVersion => "kernel_version",
            Self::PackagesUpdated => "packages_updated",
            Self::SecureBoot => "secure_boot",
            Self::ProcessRunning => "process_running",
            Self::ProcessAbsent => "process_absent",
            Self::AgentVersion => "agent_version",
            Self::BundleFresh => "bundle_fresh",
        }
    }
}

impl std::fmt::Display for CheckKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One rule, as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleDef {
    /// The tag given; `[a-z0-9-]{1,32}`, not `managed` or `unmanaged`.
    pub tag: String,
    /// Check ids that must all pass.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub all_pass: Vec<String>,
    /// Check ids of which at least one must fail.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub any_fail: Vec<String>,
    /// How an unknown result counts (absent: as neither a pass nor a failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unknown: Option<UnknownAs>,
}

/// How a rule counts a check whose result is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownAs {
    /// As a pass.
    Pass,
    /// As a failure.
    Fail,
}

/// A check's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    /// Measured and as required.
    Pass,
    /// Measured and not as required.
    Fail,
    /// Could not be measured (the reason says why).
    Unknown,
}

impl CheckStatus {
    /// `pass`, `fail` or `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Fail => "fail",
            Self::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for CheckStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A version: numeric parts, compared part by part with missing parts as zeros (`12` = `12.0`).
#[derive(Debug, Clone)]
pub struct Version(Vec<u64>);

impl Version {
    /// Most parts a version may have.
    const MAX_PARTS: usize = 8;

    /// A version as a bundle writes it: digits separated by dots, nothing else.
    pub fn parse(text: &str) -> Option<Self> {
        let parts: Vec<u64> = text
            .split('.')
            .map(|p| {
                (!p.is_empty() && p.len() <= 18 && p.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| p.parse().ok())
                    .flatten()
            })
            .collect::<Option<_>>()?;
        (parts.len() <= Self::MAX_PARTS).then_some(Self(parts))
    }

    /// The numeric prefix of a version a system reports (`6.12.48+deb13-amd64` is 6.12.48,
    /// `0.2.0-rc1` is 0.2.0); `None` when it does not start with a digit.
    pub fn parse_prefix(text: &str) -> Option<Self> {
        let mut parts = Vec::new();
        for p in text.trim().split('.') {
            let digits: &str = &p[..p.bytes().take_while(u8::is_ascii_digit).count()];
            if digits.is_empty() || digits.len() > 18 || parts.len() == Self::MAX_PARTS {
                break;
            }
            parts.push(digits.parse().ok()?);
            if digits.len() != p.len() {
                break;
            }
        }
        (!parts.is_empty()).then_some(Self(parts))
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let n = self.0.len().max(other.0.len());
        (0..n)
            .map(|i| {
                let a = self.0.get(i).copied().unwrap_or(0);
                let b = other.0.get(i).copied().unwrap_or(0);
                a.cmp(&b)
            })
            .find(|o| o.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal)
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Version {}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// What one compiled check measures, with its validated parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckSpec {
    /// The root file system sits on dm-crypt.
    DiskEncrypted,
    /// An nftables ruleset with at least one rule is loaded.
    Firewall,
    /// `/etc/os-release`: `ID` in `os` (any when empty), `VERSION_ID >= min` (when given).
    OsVersion {
        /// Accepted IDs, lower case.
        os: Vec<String>,
        /// The lowest accepted `VERSION_ID`.
        min: Option<Version>,
    },
    /// The kernel release is at least `min`.
    KernelVersion {
        /// The lowest accepted release.
        min: Version,
    },
    /// The last package install or upgrade is at most `max_days` old.
    PackagesUpdated {
        /// Most days.
        max_days: u64,
    },
    /// UEFI Secure Boot is on.
    SecureBoot,
    /// A process runs `exe` (and its contents hash to `sha256`, when given).
    ProcessRunning {
        /// The executable's absolute path.
        exe: String,
        /// Its SHA-256, 64 lower-case hex digits.
        sha256: Option<String>,
        /// Whom it must run as.
        run_as: RunAs,
    },
    /// No process runs an executable matching `exe` or has a command name matching `comm`.
    ProcessAbsent {
        /// A glob over executable paths.
        exe: Option<String>,
        /// A glob over command names.
        comm: Option<String>,
    },
    /// The agent's version is at least `min`.
    AgentVersion {
        /// The lowest accepted version.
        min: Version,
    },
    /// The active bundle was verified at most `max_age_s` ago.
    BundleFresh {
        /// Most seconds.
        max_age_s: u64,
    },
}

impl CheckSpec {
    /// The kind this spec is of.
    pub fn kind(&self) -> CheckKind {
        match self {
            Self::DiskEncrypted => CheckKind::DiskEncrypted,
            Self::Firewall => CheckKind::Firewall,
            Self::OsVersion { .. } => CheckKind::OsVersion,
            Self::KernelVersion { .. } => CheckKind::KernelVersion,
            Self::PackagesUpdated { .. } => CheckKind::PackagesUpdated,
            Self::SecureBoot => CheckKind::SecureBoot,
            Self::ProcessRunning { .. } => CheckKind::ProcessRunning,
            Self::ProcessAbsent { .. } => CheckKind::ProcessAbsent,
            Self::AgentVersion { .. } => CheckKind::AgentVersion,
            Self::BundleFresh { .. } => CheckKind::BundleFresh,
        }
    }
}

/// A compiled check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Its id.
    pub id: String,
    /// What it measures.
    pub spec: CheckSpec,
}

impl Check {
    /// What kind of check it is.
    pub fn kind(&self) -> CheckKind {
        self.spec.kind()
    }
}

/// A compiled rule: every id it names is a check of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The tag given.
    pub tag: String,
    /// Checks that must all pass (none: no such condition).
    pub all_pass: Vec<String>,
    /// Checks of which one must fail (none: no such condition).
    pub any_fail: Vec<String>,
    /// How an unknown result counts (`None`: as neither).
    pub unknown: Option<UnknownAs>,
}

impl Rule {
    /// Whether the rule holds for `results` (a check without a result is unknown).
    pub fn holds(&self, results: &BTreeMap<String, CheckStatus>) -> bool {
        let status = |id: &String| match results.get(id).copied() {
            Some(CheckStatus::Unknown) | None => match self.unknown {
                Some(UnknownAs::Pass) => CheckStatus::Pass,
                Some(UnknownAs::Fail) => CheckStatus::Fail,
                None => CheckStatus::Unknown,
            },
            Some(s) => s,
        };
        let all = self.all_pass.is_empty()
            || self
                .all_pass
                .iter()
                .all(|id| status(id) == CheckStatus::Pass);
        let any = self.any_fail.is_empty()
            || self
                .any_fail
                .iter()
                .any(|id| status(id) == CheckStatus::Fail);
        all && any
    }
}

/// A compiled `posture.yaml`: what the agent measures, how often, and which tags the results give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Posture {
    /// Seconds between evaluations.
    pub interval_s: u64,
    /// The checks, in file order.
    pub checks: Vec<Check>,
    /// The rules, in file order.
    pub rules: Vec<Rule>,
}

impl Posture {
    /// Parses and validates a `posture.yaml`; errors are located by line.
    pub fn from_yaml(text: &str) -> Result<Self, PolicyError> {
        let file: PostureFile = if text.trim().is_empty() {
            PostureFile::default()
        } else {
            serde_norway::from_str(text).map_err(|e| PolicyError {
                file: FILE.into(),
                line: e.location().map(|l| l.line()),
                message: e.to_string(),
            })?
        };
        compile(&file, text)
    }

    /// The tags the rules give for these results (a check without a result is unknown).
    pub fn tags(&self, results: &BTreeMap<String, CheckStatus>) -> BTreeSet<String> {
        self.rules
            .iter()
            .filter(|r| r.holds(results))
            .map(|r| r.tag.clone())
            .collect()
    }

    /// Every tag some rule may give.
    pub fn known_tags(&self) -> BTreeSet<String> {
        self.rules.iter().map(|r| r.tag.clone()).collect()
    }
}

/// The 1-based line of the `n`th (0-based) line holding `anchor`, then of `needle` from there.
fn line_nth(text: &str, anchor: &str, n: usize, needle: &str) -> Option<usize> {
    let start = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(anchor))
        .nth(n)
        .map_or(0, |(i, _)| i);
    let rest: String = text.lines().skip(start).collect::<Vec<_>>().join("\n");
    line_of(&rest, needle, needle).map(|l| l + start)
}

fn is_id(s: &str, max: usize, underscore: bool) -> bool {
    (1..=max).contains(&s.len())
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (underscore && b == b'_')
        })
}

fn compile(file: &PostureFile, text: &str) -> Result<Posture, PolicyError> {
    let err = |line: Option<usize>, message: String| PolicyError {
        file: FILE.into(),
        line,
        message,
    };
    if !(10..=86_400).contains(&file.interval_s) {
        return Err(err(
            line_of(text, "interval_s", "interval_s"),
            format!(
                "interval_s is {}: it must be between 10 and 86400 seconds",
                file.interval_s
            ),
        ));
    }
    if file.checks.len() > MAX_ITEMS || file.rules.len() > MAX_ITEMS {
        return Err(err(
            None,
            format!("at most {MAX_ITEMS} checks and {MAX_ITEMS} rules"),
        ));
    }
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    let mut checks = Vec::with_capacity(file.checks.len());
    for def in &file.checks {
        let counter = seen.entry(def.id.as_str()).or_insert(0);
        let nth = *counter;
        *counter += 1;
        let anchor = format!("id: {}", def.id);
        let at = |needle: &str| line_nth(text, &anchor, nth, needle);
        if nth > 0 {
            return Err(err(
                at(&def.id),
                format!("check `{}`: the id is used twice", def.id),
            ));
        }
        if !is_id(&def.id, 64, true) {
            return Err(err(
                at(&def.id),
                format!(
                    "check `{}`: an id is 1 to 64 of a-z, 0-9, `-` and `_`",
                    def.id
                ),
            ));
        }
        let spec = check(def).map_err(|(needle, m)| {
            err(
                at(needle.unwrap_or("kind")),
                format!("check `{}` ({}): {m}", def.id, def.kind),
            )
        })?;
        checks.push(Check {
            id: def.id.clone(),
            spec,
        });
    }
    let ids: BTreeSet<&str> = file.checks.iter().map(|c| c.id.as_str()).collect();
    let mut rules = Vec::with_capacity(file.rules.len());
    let mut tag_seen: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &file.rules {
        let counter = tag_seen.entry(r.tag.as_str()).or_insert(0);
        let nth = *counter;
        *counter += 1;
        let anchor = format!("tag: {}", r.tag);
        let at = |needle: &str| line_nth(text, &anchor, nth, needle);
        let bad = |needle: &str, m: String| err(at(needle), format!("rule `{}`: {m}", r.tag));
        if !is_id(&r.tag, 32, false) {
            return Err(bad(&r.tag, "a tag is 1 to 32 of a-z, 0-9 and `-`".into()));
        }
        if RESERVED_TAGS.contains(&r.tag.as_str()) {
            return Err(bad(
                &r.tag,
                format!(
                    "`{}` is reserved: the agent gives it from its enrolment and configuration",
                    r.tag
                ),
            ));
        }
        if r.all_pass.is_empty() && r.any_fail.is_empty() {
            return Err(bad(
                &r.tag,
                "a rule needs `all_pass`, `any_fail` or both".into(),
            ));
        }
        for id in r.all_pass.iter().chain(&r.any_fail) {
            if !ids.contains(id.as_str()) {
                return Err(bad(id, format!("check `{id}` is not in `checks`")));
            }
        }
        rules.push(Rule {
            tag: r.tag.clone(),
            all_pass: r.all_pass.clone(),
            any_fail: r.any_fail.clone(),
            unknown: r.unknown,
        });
    }
    Ok(Posture {
        interval_s: file.interval_s,
        checks,
        rules,
    })
}

/// Validates one check's fields for its kind; an error names the field to point at.
fn check(def: &CheckDef) -> Result<CheckSpec, (Option<&'static str>, String)> {
    let given: [(&'static str, bool); 8] = [
        ("os", !def.os.is_empty()),
        ("min", def.min.is_some()),
        ("max_days", def.max_days.is_some()),
        ("exe", def.exe.is_some()),
        ("sha256", def.sha256.is_some()),
        ("uid", def.uid.is_some()),
        ("comm", def.comm.is_some()),
        ("max_age_s", def.max_age_s.is_some()),
    ];
    let allowed: &[&str] = match def.kind {
        CheckKind::DiskEncrypted | CheckKind::Firewall | CheckKind::SecureBoot => &[],
        CheckKind::OsVersion => &["os", "min"],
        CheckKind::KernelVersion | CheckKind::AgentVersion => &["min"],
        CheckKind::PackagesUpdated => &["max_days"],
        CheckKind::ProcessRunning => &["exe", "sha256", "uid"],
        CheckKind::ProcessAbsent => &["exe", "comm"],
        CheckKind::BundleFresh => &["max_age_s"],
    };
    if let Some((field, _)) = given.iter().find(|(f, g)| *g && !allowed.contains(f)) {
        let takes = if allowed.is_empty() {
            "nothing but `id` and `kind`".to_owned()
        } else {
            allowed
                .iter()
                .map(|f| format!("`{f}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err((
            Some(field),
            format!("`{field}` does not apply (this kind takes {takes})"),
        ));
    }
    let min = |required: bool| -> Result<Option<Version>, (Option<&'static str>, String)> {
        match &def.min {
            None if required => Err((None, "`min` is required".into())),
            None => Ok(None),
            Some(m) => Version::parse(m).map(Some).ok_or_else(|| {
                (
                    Some("min"),
                    format!("`{m}` is not a version (digits separated by dots, e.g. \"6.1\")"),
                )
            }),
        }
    };
    Ok(match def.kind {
        CheckKind::DiskEncrypted => CheckSpec::DiskEncrypted,
        CheckKind::Firewall => CheckSpec::Firewall,
        CheckKind::SecureBoot => CheckSpec::SecureBoot,
        CheckKind::OsVersion => {
            let min = min(false)?;
            if def.os.is_empty() && min.is_none() {
                return Err((None, "give `os`, `min` or both".into()));
            }
            let mut os = Vec::new();
            for o in &def.os {
                let valid = !o.is_empty()
                    && o.len() <= 64
                    && o.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    });
                if !valid {
                    return Err((
                        Some("os"),
                        format!("`{o}` is not an os-release ID (lower case, e.g. debian)"),
                    ));
                }
                os.push(o.clone());
            }
            CheckSpec::OsVersion { os, min }
        }
        CheckKind::KernelVersion => CheckSpec::KernelVersion {
            min: min(true)?.unwrap_or(Version(vec![0])),
        },
        CheckKind::AgentVersion => CheckSpec::AgentVersion {
            min: min(true)?.unwrap_or(Version(vec![0])),
        },
        CheckKind::PackagesUpdated => CheckSpec::PackagesUpdated {
            max_days: def
                .max_days
                .ok_or((None, "`max_days` is required".into()))?,
        },
        CheckKind::BundleFresh => match def.max_age_s {
            None => return Err((None, "`max_age_s` is required".into())),
            Some(0) => return Err((Some("max_age_s"), "`max_age_s` must be > 0".into())),
            Some(s) => CheckSpec::BundleFresh { max_age_s: s },
        },
        CheckKind::ProcessRunning => {
            let exe = def.exe.clone().ok_or((None, "`exe` is required".into()))?;
            if !exe.starts_with('/') || exe.contains(['*', '?']) {
                return Err((
                    Some("exe"),
                    format!(
                        "`{exe}` must be an absolute path without globs (globs are for process_absent)"
                    ),
                ));
            }
            let sha256 = match &def.sha256 {
                None => None,
                Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    Some(h.to_ascii_lowercase())
                }
                Some(h) => {
                    return Err((
                        Some("sha256"),
                        format!("`{h}` is not a SHA-256 (64 hex digits)"),
                    ));
                }
            };
            CheckSpec::ProcessRunning {
                exe,
                sha256,
                run_as: def.uid.unwrap_or(RunAs::Uid(0)),
            }
        }
        CheckKind::ProcessAbsent => {
            if def.exe.is_none() && def.comm.is_none() {
                return Err((None, "give `exe`, `comm` or both".into()));
            }
            if let Some(e) = &def.exe
                && !e.starts_with(['/', '*'])
            {
                return Err((
                    Some("exe"),
                    format!("`{e}` must be an absolute path or a glob starting with `*`"),
                ));
            }
            if let Some(c) = &def.comm {
                let literal = c.bytes().filter(|b| *b != b'*').count();
                if c.is_empty() || literal > 15 {
                    return Err((
                        Some("comm"),
                        format!(
                            "`{c}`: a command name is 1 to 15 bytes (the kernel keeps no more)"
                        ),
                    ));
                }
            }
            CheckSpec::ProcessAbsent {
                exe: def.exe.clone(),
                comm: def.comm.clone(),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
interval_s: 60
checks:
  - id: disk
    kind: disk_encrypted
  - id: firewall
    kind: firewall
  - id: os
    kind: os_version
    os: [debian, ubuntu]
    min: "12"
  - id: kernel
    kind: kernel_version
    min: "6.1"
  - id: updates
    kind: packages_updated
    max_days: 30
  - id: secureboot
    kind: secure_boot
  - id: edr
    kind: process_running
    exe: /opt/edr/bin/edrd
    sha256: "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855"
  - id: no-tor
    kind: process_absent
    exe: /usr/bin/tor
  - id: agent
    kind: agent_version
    min: 0
  - id: bundle
    kind: bundle_fresh
    max_age_s: 86400
rules:
  - tag: compliant
    all_pass: [disk, firewall, os, kernel, updates, edr, no-tor, agent, bundle]
  - tag: needs-updates
    any_fail: [updates]
  - tag: unknown-is-bad
    any_fail: [secureboot]
    unknown: fail
"#;

    fn results(pairs: &[(&str, CheckStatus)]) -> BTreeMap<String, CheckStatus> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    fn err(text: &str) -> String {
        match Posture::from_yaml(text) {
            Ok(p) => panic!("compiled: {p:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn compiles_the_full_schema() {
        let p = Posture::from_yaml(FULL).expect("compiles");
        assert_eq!(p.interval_s, 60);
        assert_eq!(p.checks.len(), 10);
        assert_eq!(p.checks[2].kind(), CheckKind::OsVersion);
        assert_eq!(
            p.checks[6].spec,
            CheckSpec::ProcessRunning {
                exe: "/opt/edr/bin/edrd".into(),
                sha256: Some(
                    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".into()
                ),
                run_as: RunAs::Uid(0),
            }
        );
        let tags: Vec<String> = p.known_tags().into_iter().collect();
        assert_eq!(tags, ["compliant", "needs-updates", "unknown-is-bad"]);
        assert_eq!(Posture::from_yaml("").expect("empty").interval_s, 300);
    }

    #[test]
    fn rules_give_tags_and_unknown_fails_closed() {
        let p = Posture::from_yaml(FULL).expect("compiles");
        let ids = [
            "disk", "firewall", "os", "kernel", "updates", "edr", "no-tor", "agent", "bundle",
        ];
        let mut r = results(&ids.map(|i| (i, CheckStatus::Pass)));
        r.insert("secureboot".into(), CheckStatus::Pass);
        assert_eq!(p.tags(&r), BTreeSet::from(["compliant".to_owned()]));
        // An unknown is not a pass for all_pass, nor a failure for any_fail (by default).
        r.insert("updates".into(), CheckStatus::Unknown);
        assert!(p.tags(&r).is_empty());
        r.insert("updates".into(), CheckStatus::Fail);
        assert_eq!(p.tags(&r), BTreeSet::from(["needs-updates".to_owned()]));
        // `unknown: fail` counts a missing or unknown result as a failure.
        r.remove("secureboot");
        assert!(p.tags(&r).contains("unknown-is-bad"));
        // A rule with `unknown: pass` and both conditions.
        let rule = Rule {
            tag: "x".into(),
            all_pass: vec!["a".into()],
            any_fail: vec!["b".into()],
            unknown: Some(UnknownAs::Pass),
        };
        assert!(rule.holds(&results(&[("b", CheckStatus::Fail)])));
        assert!(!rule.holds(&results(&[("a", CheckStatus::Pass)])));
        assert!(rule.holds(&results(&[
            ("a", CheckStatus::Unknown),
            ("b", CheckStatus::Fail)
        ])));
    }

    #[test]
    fn the_bundle_compiler_reads_posture_yaml() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/default");
        let mut files = crate::bundle::Archive::from_dir(&dir)
            .expect("policies/default")
            .files;
        let set = crate::PolicySet::compile("1", &files).expect("the default bundle compiles");
        let posture = set.posture.expect("the default bundle has posture.yaml");
        assert!(posture.known_tags().contains("compliant"));
        files.insert(
            FILE.into(),
            b"checks:\n  - id: a\n    kind: firewall\nrules:\n  - tag: ok\n    all_pass: [b]\n"
                .to_vec(),
        );
        let e = crate::PolicySet::compile("1", &files).expect_err("a dangling check id");
        assert_eq!(e.file, FILE);
        assert_eq!(e.line, Some(6));
        files.remove(FILE);
        let set = crate::PolicySet::compile("1", &files).expect("posture.yaml is optional");
        assert!(set.posture.is_none());
        files.insert("postures.yaml".into(), Vec::new());
        let e = crate::PolicySet::compile("1", &files).expect_err("an unknown file");
        assert!(e.message.contains("posture.yaml"), "{e}");
    }

    #[test]
    fn versions_compare_by_parts() {
        let v = |s| Version::parse(s).expect("version");
        assert!(v("6.10") > v("6.9"));
        assert_eq!(v("12"), v("12.0"));
        assert!(v("22.04") >= v("22.4"));
        assert!(Version::parse("6.x").is_none());
        assert!(Version::parse("").is_none());
        assert!(Version::parse("1..2").is_none());
        let p = |s| Version::parse_prefix(s).expect("prefix");
        assert_eq!(p("6.12.48+deb13-amd64"), v("6.12.48"));
        assert_eq!(p("6.18.44-fc-v1147").to_string(), "6.18.44");
        assert_eq!(p("0.2.0-rc1"), v("0.2.0"));
        assert_eq!(p("13"), v("13"));
        assert!(Version::parse_prefix("trixie/sid").is_none());
    }

    #[test]
    fn errors_are_located_and_clear() {
        let cases: &[(&str, &str)] = &[
            (
                "checks:\n  - id: a\n    kind: warp_drive\n",
                "posture.yaml:3: checks[0].kind: unknown variant `warp_drive`",
            ),
            (
                "checks:\n  - id: a\n    kind: firewall\n  - id: a\n    kind: secure_boot\n",
                "posture.yaml:4: check `a`: the id is used twice",
            ),
            (
                "checks:\n  - id: k\n    kind: kernel_version\n    min: 6.x\n",
                "posture.yaml:4: check `k` (kernel_version): `6.x` is not a version",
            ),
            (
                "checks:\n  - id: k\n    kind: kernel_version\n    min: 6.10\n",
                "quote it",
            ),
            (
                "checks:\n  - id: k\n    kind: kernel_version\n",
                "posture.yaml:3: check `k` (kernel_version): `min` is required",
            ),
            (
                "checks:\n  - id: e\n    kind: process_running\n    exe: /x\n    sha256: abc\n",
                "posture.yaml:5: check `e` (process_running): `abc` is not a SHA-256",
            ),
            (
                "checks:\n  - id: e\n    kind: firewall\n    max_days: 3\n",
                "posture.yaml:4: check `e` (firewall): `max_days` does not apply",
            ),
            (
                "checks:\n  - id: e\n    kind: firewall\n    colour: red\n",
                "posture.yaml:4: checks[0]: unknown field `colour`",
            ),
            (
                "checks:\n  - id: a\n    kind: firewall\nrules:\n  - tag: managed\n    all_pass: [a]\n",
                "posture.yaml:5: rule `managed`: `managed` is reserved",
            ),
            (
                "checks:\n  - id: a\n    kind: firewall\nrules:\n  - tag: ok\n    all_pass: [a, b]\n",
                "posture.yaml:6: rule `ok`: check `b` is not in `checks`",
            ),
            (
                "checks:\n  - id: a\n    kind: firewall\nrules:\n  - tag: Not_OK\n    all_pass: [a]\n",
                "rule `Not_OK`: a tag is 1 to 32 of a-z",
            ),
            (
                "rules:\n  - tag: empty\n",
                "posture.yaml:2: rule `empty`: a rule needs `all_pass`, `any_fail` or both",
            ),
            ("interval_s: 1\n", "posture.yaml:1: interval_s is 1"),
            (
                "checks:\n  - id: t\n    kind: process_absent\n    comm: a-very-long-command-name\n",
                "a command name is 1 to 15 bytes",
            ),
            (
                "checks:\n  - id: t\n    kind: process_absent\n",
                "give `exe`, `comm` or both",
            ),
        ];
        for (text, want) in cases {
            let got = err(text);
            assert!(got.contains(want), "{text}\n  got: {got}\n  want: {want}");
        }
    }
}
