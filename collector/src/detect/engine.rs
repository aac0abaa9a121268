//! The detectors themselves: per-user state built from the events as they arrive (in memory,
//! rebuilt from the store at start), and the findings an event makes. Pure: no store, no
//! clock but the events' own times, so every detector is tested on generated streams.
//!
//! Volume detectors (mass download/upload/delete, blocked uploads) keep a sliding window of the
//! user's counted events (a file counts once, an event without files once) and, for the
//! baseline, tumbling windows of the same length: the baseline is the user's mean count per
//! *active* window (one with at least one such event) over `history_days`, so a user who
//! downloads 30 files in every busy ten minutes has a baseline of 30 whatever their idle hours.
//! A window that alerts is emptied: the next alert (a repeat, folded into the open alert) needs
//! another full threshold. Windows that alerted do not teach, and a baseline needs five active
//! windows: one burst is no habit (else a first burst would set a baseline hiding the next).
//!
//! "New" detectors remember per user the devices, networks and countries, and per user and app
//! the processes, seen within the state's life; they alert only once the user (for processes,
//! the user with that app) has `learning_events` events spread over `learning_s`, so the first
//! days of a fresh install teach instead of alerting.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::IpAddr,
};

use serde::{Deserialize, Serialize};
use sluice_protocol::Event;

use super::{
    config::{DetectionConfig, Detector, Rule},
    geo::{Geo, distance_km},
};

/// Evidence kept with a finding (and an alert): an event and its time, so its page is one
/// index probe away.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// Event id.
    pub id: String,
    /// Event time, Unix ms.
    pub time: u64,
}

/// Most evidence events one finding carries.
pub const MAX_EVIDENCE: usize = 100;
/// Most entries one user's sliding window holds.
const MAX_WINDOW: usize = 20_000;
/// Most devices, networks, countries or processes remembered per user (then nothing more is
/// learnt, and nothing more is new).
const MAX_KNOWN: usize = 4096;
/// Most users with state (events may name anyone: a compromised agent must not grow it without
/// bound); past it the least recently active hundredth is forgotten.
pub const MAX_USERS: usize = 500_000;
const DAY_MS: u64 = 86_400_000;
/// Active windows needed before a user's baseline counts.
const MIN_ACTIVE: u64 = 5;

/// What a detector found in an event.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// Which detector.
    pub detector: Detector,
    /// The user (lower case).
    pub user: String,
    /// The device of the event that tipped it.
    pub device: String,
    /// That event's time (Unix ms).
    pub time: u64,
    /// One line.
    pub title: String,
    /// What was seen, with the figures.
    pub summary: String,
    /// The events.
    pub evidence: Vec<Evidence>,
}

/// A sliding window and the baseline of one count of one user.
#[derive(Debug, Default)]
struct Volume {
    window: VecDeque<(u64, u64, String)>,
    sum: u64,
    latest: u64,
    bucket: u64,
    bucket_n: u64,
    /// The current tumbling window alerted: it is not normal, so it does not teach.
    bucket_alerted: bool,
    /// `(day, count in closed active windows, active windows)`, oldest first.
    days: VecDeque<(u64, u64, u64)>,
}

impl Volume {
    /// Adds `n` at `t`; returns the window's count.
    fn add(&mut self, t: u64, n: u64, id: &str, window_ms: u64, history_ms: u64) -> u64 {
        let window_ms = window_ms.max(1);
        // Baseline: tumbling windows.
        let bucket = t / window_ms;
        if bucket > self.bucket {
            self.close_bucket(window_ms);
            self.bucket = bucket;
        }
        self.bucket_n += n;
        let oldest_day = t.saturating_sub(history_ms) / DAY_MS;
        while self.days.front().is_some_and(|d| d.0 < oldest_day) {
            self.days.pop_front();
        }
        // The sliding window, by the newest time seen (late events still count while inside).
        self.latest = self.latest.max(t);
        if t + window_ms > self.latest {
            self.window.push_back((t, n, id.to_owned()));
            self.sum += n;
        }
        while let Some(f) = self.window.front() {
            if f.0 + window_ms <= self.latest || self.window.len() > MAX_WINDOW {
                self.sum -= f.1;
                self.window.pop_front();
            } else {
                break;
            }
        }
        self.sum
    }

    fn close_bucket(&mut self, window_ms: u64) {
        if self.bucket_n == 0 || std::mem::take(&mut self.bucket_alerted) {
            self.bucket_n = 0;
            return;
        }
        let day = self.bucket.saturating_mul(window_ms) / DAY_MS;
        match self.days.back_mut() {
            Some(d) if d.0 == day => {
                d.1 += self.bucket_n;
                d.2 += 1;
            }
            _ => self.days.push_back((day, self.bucket_n, 1)),
        }
        self.bucket_n = 0;
    }

    /// The mean count per active window (closed windows that did not alert; none until there
    /// are [`MIN_ACTIVE`] of them: a handful of windows is no habit).
    fn baseline(&self) -> f64 {
        let (n, w) = self
            .days
            .iter()
            .fold((0u64, 0u64), |(n, w), d| (n + d.1, w + d.2));
        if w < MIN_ACTIVE {
            0.0
        } else {
            n as f64 / w as f64
        }
    }

    /// Empties the window, returning its evidence (newest last, at most [`MAX_EVIDENCE`]).
    fn drain(&mut self) -> Vec<Evidence> {
        let skip = self.window.len().saturating_sub(MAX_EVIDENCE);
        let ev = self
            .window
            .drain(..)
            .skip(skip)
            .map(|(time, _, id)| Evidence { id, time })
            .collect();
        self.sum = 0;
        self.bucket_alerted = true;
        ev
    }
}

#[derive(Debug, Default)]
struct AppState {
    events: u64,
    first: u64,
    processes: HashSet<String>,
}

#[derive(Debug)]
struct Where {
    time: u64,
    at: (f64, f64),
    label: String,
    id: String,
}

#[derive(Debug, Default)]
struct UserState {
    events: u64,
    first: u64,
    /// The newest event's time (which users are forgotten first when there are too many).
    last: u64,
    devices: HashSet<String>,
    networks: HashSet<Net>,
    countries: HashSet<String>,
    apps: HashMap<String, AppState>,
    last_place: Option<Where>,
    /// Downloads, uploads, deletions, blocked uploads.
    volumes: [Volume; 4],
}

const VOLUME: [Detector; 4] = [
    Detector::MassDownload,
    Detector::MassUpload,
    Detector::MassDelete,
    Detector::BlockedUploads,
];

/// The detectors' state.
#[derive(Debug)]
pub struct Engine {
    rules: Vec<Rule>,
    learning_events: u64,
    learning_ms: u64,
    history_ms: u64,
    geo: Option<Geo>,
    max_speed_kmh: f64,
    min_distance_km: f64,
    users: HashMap<String, UserState>,
}

/// A network as the new-network detector remembers it: a /24 or a /48, kept as its prefix
/// (every event is looked up, and a formatted name per event cost more than the lookup).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Net {
    V4([u8; 3]),
    V6([u16; 3]),
}

impl Net {
    fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                Self::V4([o[0], o[1], o[2]])
            }
            IpAddr::V6(v6) => {
                let s = v6.segments();
                Self::V6([s[0], s[1], s[2]])
            }
        }
    }
}

impl std::fmt::Display for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::V4(o) => write!(f, "{}.{}.{}.0/24", o[0], o[1], o[2]),
            Self::V6(s) => write!(f, "{:x}:{:x}:{:x}::/48", s[0], s[1], s[2]),
        }
    }
}

/// `a.b.c.0/24` or `x:x:x::/48` for an address.
pub fn network_of(ip: IpAddr) -> String {
    Net::of(ip).to_string()
}

fn insert_bounded(set: &mut HashSet<String>, key: &str) -> bool {
    if set.contains(key) || set.len() >= MAX_KNOWN {
        return false;
    }
    set.insert(key.to_owned());
    true
}

fn insert_bounded_net(set: &mut HashSet<Net>, key: Net) -> bool {
    if set.contains(&key) || set.len() >= MAX_KNOWN {
        return false;
    }
    set.insert(key);
    true
}

/// `s` in lower case, borrowed when it already is (as nearly every address is).
fn lower(s: &str) -> std::borrow::Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase() || !b.is_ascii()) {
        std::borrow::Cow::Owned(s.to_lowercase())
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

fn minutes(ms: u64) -> String {
    if ms.is_multiple_of(3_600_000) {
        format!("{} h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{} min", ms / 60_000)
    } else {
        format!("{} s", ms / 1000)
    }
}

impl Engine {
    /// Detectors as `cfg` sets them, with `geo` for the place detectors (without it they do
    /// not run).
    pub fn new(cfg: &DetectionConfig, geo: Option<Geo>) -> Self {
        let mut rules: Vec<Rule> = Detector::ALL.iter().map(|d| cfg.rule(*d)).collect();
        if geo.is_none() {
            for r in &mut rules {
                if matches!(
                    r.detector,
                    Detector::NewCountry | Detector::ImpossibleTravel
                ) {
                    r.enabled = false;
                }
            }
        }
        let (max_speed_kmh, min_distance_km) = cfg
            .geo
            .as_ref()
            .map_or((1000.0, 300.0), |g| (g.max_speed_kmh, g.min_distance_km));
        Self {
            rules,
            learning_events: cfg.learning_events,
            learning_ms: cfg.learning_s.saturating_mul(1000),
            history_ms: u64::from(cfg.history_days) * DAY_MS,
            geo,
            max_speed_kmh,
            min_distance_km,
            users: HashMap::new(),
        }
    }

    /// `d`'s settings.
    pub fn rule(&self, d: Detector) -> &Rule {
        let i = Detector::ALL.iter().position(|x| *x == d).unwrap_or(0);
        &self.rules[i]
    }

    /// Users with state.
    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// Forgets the least recently active hundredth of the users (at least one).
    fn forget_least_recent(&mut self) {
        let mut by_last: Vec<(u64, String)> = self
            .users
            .iter()
            .map(|(k, u)| (u.last, k.clone()))
            .collect();
        let n = (by_last.len() / 100).max(1);
        by_last.select_nth_unstable(n - 1);
        for (_, k) in by_last.into_iter().take(n) {
            self.users.remove(&k);
        }
        tracing::warn!(
            forgotten = n,
            kept = self.users.len(),
            "detection: too many users, the least recently active forgotten"
        );
    }

    /// Ends a replay of history: windows are emptied, so a burst replayed from the store (and
    /// alerted on before) does not alert again with the next live event.
    pub fn end_rebuild(&mut self) {
        for u in self.users.values_mut() {
            for v in &mut u.volumes {
                v.window.clear();
                v.sum = 0;
            }
        }
    }

    /// Learns from `e`; with `alert`, returns what it found (without, a replay of history).
    pub fn observe(&mut self, e: &Event, alert: bool) -> Vec<Finding> {
        let Some(user) = e.actor.user.as_ref().filter(|u| !u.email_addr.is_empty()) else {
            return Vec::new();
        };
        let sl = e.sluice.as_ref();
        let app = sl.map_or("", |s| s.app.as_str());
        // The collector's own records (alerts, risk, key release) are not user activity.
        if matches!(app, "sluice" | "portal") {
            return Vec::new();
        }
        let email = lower(&user.email_addr);
        let groups = &user.groups;
        let activity = match sl {
            Some(s) if !s.activity.is_empty() => s.activity.as_str(),
            _ => e.activity_name.as_str(),
        };
        let is = |name: &str| activity.eq_ignore_ascii_case(name);
        let blocked = sl.is_some_and(|s| s.action.eq_ignore_ascii_case("block"));
        let t = e.time;
        let mut out = Vec::new();
        let learning_events = self.learning_events;
        let learning_ms = self.learning_ms;
        let history_ms = self.history_ms;
        // Looked up by reference: a known user (nearly every event) costs no allocation.
        if !self.users.contains_key(&*email) {
            if self.users.len() >= MAX_USERS {
                self.forget_least_recent();
            }
            self.users.insert(
                email.clone().into_owned(),
                UserState {
                    first: t,
                    ..UserState::default()
                },
            );
        }
        let Some(u) = self.users.get_mut(&*email) else {
            return out;
        };
        u.first = u.first.min(t);
        u.last = u.last.max(t);
        let mature = u.events >= learning_events && t.saturating_sub(u.first) >= learning_ms;
        u.events += 1;
        let evidence = || {
            vec![Evidence {
                id: e.id.clone(),
                time: t,
            }]
        };
        let finding = |d: Detector, title: String, summary: String| Finding {
            detector: d,
            user: email.clone().into_owned(),
            device: e.device.uid.clone(),
            time: t,
            title,
            summary,
            evidence: evidence(),
        };
        let on = |d: Detector| {
            let r = &self.rules[Detector::ALL.iter().position(|x| *x == d).unwrap_or(0)];
            (alert && r.enabled && r.watches(groups)).then_some(r)
        };

        // Volumes.
        let files = (e.files.len() as u64).max(1);
        for (i, d) in VOLUME.iter().enumerate() {
            let counted = match d {
                Detector::MassDownload => is("download"),
                Detector::MassUpload => is("upload"),
                Detector::MassDelete => is("delete"),
                _ => is("upload") && blocked,
            };
            if !counted {
                continue;
            }
            let r = &self.rules[Detector::ALL.iter().position(|x| x == d).unwrap_or(0)];
            let n = if *d == Detector::BlockedUploads {
                1
            } else {
                files
            };
            let v = &mut u.volumes[i];
            let baseline = v.baseline();
            let sum = v.add(t, n, &e.id, r.window_ms, history_ms);
            let Some(r) = on(*d) else { continue };
            let by_baseline = (r.baseline_multiplier * baseline).ceil() as u64;
            let threshold = r.floor.max(by_baseline).max(1);
            if sum < threshold {
                continue;
            }
            let (what, unit) = match d {
                Detector::MassDownload => ("downloaded", "files"),
                Detector::MassUpload => ("uploaded", "files"),
                Detector::MassDelete => ("deleted", "items"),
                _ => ("had blocked", "uploads"),
            };
            let title = match d {
                Detector::MassDownload => {
                    format!("Mass download: {sum} files in {}", minutes(r.window_ms))
                }
                Detector::MassUpload => {
                    format!("Mass upload: {sum} files in {}", minutes(r.window_ms))
                }
                Detector::MassDelete => {
                    format!("Mass delete: {sum} items in {}", minutes(r.window_ms))
                }
                _ => format!(
                    "Repeated blocked uploads: {sum} in {}",
                    minutes(r.window_ms)
                ),
            };
            let summary = format!(
                "{email} {what} {sum} {unit} within {} (threshold {threshold}: floor {}, \
                 baseline {baseline:.1} per active window x {})",
                minutes(r.window_ms),
                r.floor,
                r.baseline_multiplier
            );
            let ev = v.drain();
            out.push(Finding {
                evidence: ev,
                ..finding(*d, title, summary)
            });
        }

        // New device.
        if !e.device.uid.is_empty()
            && insert_bounded(&mut u.devices, &e.device.uid)
            && mature
            && on(Detector::NewDevice).is_some()
        {
            let host = if e.device.hostname.is_empty() {
                String::new()
            } else {
                format!(" ({})", e.device.hostname)
            };
            out.push(finding(
                Detector::NewDevice,
                format!("New device {}{host}", e.device.uid),
                format!(
                    "{email} used device {}{host} for the first time ({} {app})",
                    e.device.uid,
                    activity.to_ascii_lowercase()
                ),
            ));
        }

        // New process for an app.
        // Apps are the catalogue's few; a flood of made-up names stops at the bound.
        if !app.is_empty()
            && (u.apps.len() < MAX_KNOWN || u.apps.contains_key(app))
            && let Some(p) = e.actor.process.as_ref()
        {
            let proc_key = p
                .path
                .as_deref()
                .filter(|s| !s.is_empty())
                .unwrap_or(&p.name);
            if !u.apps.contains_key(app) {
                u.apps.insert(
                    app.to_owned(),
                    AppState {
                        first: t,
                        ..AppState::default()
                    },
                );
            }
            let Some(a) = u.apps.get_mut(app) else {
                return out;
            };
            a.first = a.first.min(t);
            let app_mature =
                a.events >= learning_events && t.saturating_sub(a.first) >= learning_ms;
            a.events += 1;
            if !proc_key.is_empty()
                && insert_bounded(&mut a.processes, proc_key)
                && app_mature
                && on(Detector::NewProcess).is_some()
            {
                out.push(finding(
                    Detector::NewProcess,
                    format!("New process {proc_key} for {app}"),
                    format!("{email} reached {app} from {proc_key} for the first time"),
                ));
            }
        }

        // New network, new country, impossible travel.
        let addr = e.src_endpoint.as_ref().and_then(|s| {
            s.public_ip
                .as_deref()
                .and_then(|a| a.parse::<IpAddr>().ok())
                .or_else(|| s.ip.as_deref().and_then(|a| a.parse::<IpAddr>().ok()))
        });
        if let Some(ip) = addr {
            let net = Net::of(ip);
            if insert_bounded_net(&mut u.networks, net)
                && mature
                && on(Detector::NewNetwork).is_some()
            {
                out.push(finding(
                    Detector::NewNetwork,
                    format!("New network {net}"),
                    format!("{email} connected from {ip} (network {net}) for the first time"),
                ));
            }
            if let Some(place) = self.geo.as_ref().and_then(|g| g.lookup(ip)) {
                let label = place.label();
                if let Some(cc) = &place.country
                    && insert_bounded(&mut u.countries, cc)
                    && mature
                    && on(Detector::NewCountry).is_some()
                {
                    out.push(finding(
                        Detector::NewCountry,
                        format!("New country {cc}"),
                        format!("{email} connected from {ip} in {label}, a country not seen for them before"),
                    ));
                }
                if let Some(at) = place.coordinates {
                    if let Some(prev) = &u.last_place
                        && on(Detector::ImpossibleTravel).is_some()
                    {
                        let km = distance_km(prev.at, at);
                        let hours = (t.abs_diff(prev.time) as f64 / 3_600_000.0).max(1.0 / 3600.0);
                        let speed = km / hours;
                        if km >= self.min_distance_km && speed > self.max_speed_kmh {
                            let mut f = finding(
                                Detector::ImpossibleTravel,
                                format!("Impossible travel: {} to {label}", prev.label),
                                format!(
                                    "{email} was in {} and {hours:.2} h later in {label} ({ip}): \
                                     {km:.0} km, {speed:.0} km/h (more than {:.0} km/h)",
                                    prev.label, self.max_speed_kmh
                                ),
                            );
                            f.evidence.insert(
                                0,
                                Evidence {
                                    id: prev.id.clone(),
                                    time: prev.time,
                                },
                            );
                            out.push(f);
                        }
                    }
                    if u.last_place.as_ref().is_none_or(|p| t >= p.time) {
                        u.last_place = Some(Where {
                            time: t,
                            at,
                            label,
                            id: e.id.clone(),
                        });
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod bounds {
    use super::*;

    #[test]
    fn forgetting_keeps_the_recent_users() {
        let cfg = crate::detect::DetectionConfig::default();
        let mut e = Engine::new(&cfg, None);
        for i in 0..300u64 {
            e.users.insert(
                format!("u{i}"),
                UserState {
                    last: i,
                    ..UserState::default()
                },
            );
        }
        e.forget_least_recent();
        assert_eq!(e.users(), 297);
        assert!(!e.users.contains_key("u0") && !e.users.contains_key("u2"));
        assert!(e.users.contains_key("u3") && e.users.contains_key("u299"));
    }
}
