//! The detectors on generated activity: one test per detector, the alerts' store (dedup, states,
//! the activity log), and a realistic stream (50 users over several days, each with their own
//! volumes, devices, processes and networks) with planted anomalies that must all be found, and
//! no alert at all on the same stream without them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

use sluice_protocol::{
    Actor, CLASS_FILE_HOSTING, CLASS_HTTP_ACTIVITY, Device, Endpoint, Event, File, Process, Sluice,
    User,
};

use super::{
    alerts::{self, Raised, State},
    config::{DetectionConfig, Detector, GeoConfig},
    engine::{Engine, Finding, network_of},
    geo::{Geo, testdb},
};
use crate::store::{IngestOptions, Store};

const T0: u64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
const MIN: u64 = 60_000;
const HOUR: u64 = 3_600_000;
const DAY: u64 = 86_400_000;

/// An event as an agent would send it.
#[derive(Clone)]
struct Ev {
    user: String,
    groups: Vec<String>,
    device: String,
    app: String,
    activity: String,
    action: String,
    files: usize,
    process: String,
    ip: String,
    public_ip: Option<String>,
}

impl Ev {
    fn new(user: &str) -> Self {
        Self {
            user: user.into(),
            groups: vec!["staff".into()],
            device: "ag_laptop".into(),
            app: "files".into(),
            activity: "view".into(),
            action: "allow".into(),
            files: 0,
            process: "/usr/bin/firefox".into(),
            ip: "10.1.0.5".into(),
            public_ip: None,
        }
    }
    fn act(mut self, activity: &str, files: usize) -> Self {
        self.activity = activity.into();
        self.files = files;
        self
    }
    fn at(&self, seq: u64, t: u64) -> Event {
        let file = self.files > 0;
        let mut e = Event::new(
            format!("e{seq:08}"),
            t,
            if file {
                CLASS_FILE_HOSTING
            } else {
                CLASS_HTTP_ACTIVITY
            },
            if file { 2 } else { 3 },
            &self.activity,
            Device {
                uid: self.device.clone(),
                hostname: format!("host-{}", self.device),
                posture: "managed".into(),
                ..Device::default()
            },
        );
        e.actor = Actor {
            user: Some(User {
                email_addr: self.user.clone(),
                groups: self.groups.clone(),
                guest: false,
            }),
            process: Some(Process {
                pid: 4242,
                name: self.process.rsplit('/').next().unwrap_or("").into(),
                path: Some(self.process.clone()),
                uid: 1000,
                user: None,
            }),
        };
        e.src_endpoint = Some(Endpoint {
            ip: Some(self.ip.clone()),
            port: Some(50_000),
            hostname: None,
            public_ip: self.public_ip.clone(),
        });
        for i in 0..self.files {
            e.files.push(File {
                name: Some(format!("doc-{seq}-{i}.docx")),
                size: 1000,
                ..File::default()
            });
        }
        e.sluice = Some(Sluice {
            app: self.app.clone(),
            activity: self.activity.clone(),
            action: self.action.clone(),
            decided_by: "session".into(),
            ..Sluice::default()
        });
        e
    }
}

fn cfg(text: &str) -> DetectionConfig {
    let c: DetectionConfig = toml::from_str(text).unwrap();
    c.check().unwrap();
    c
}

/// Feeds `(template, time)` pairs; returns the findings.
fn feed(engine: &mut Engine, events: &[(Ev, u64)]) -> Vec<Finding> {
    let mut out = Vec::new();
    for (i, (ev, t)) in events.iter().enumerate() {
        out.extend(engine.observe(&ev.at(i as u64, *t), true));
    }
    out
}

fn detectors(f: &[Finding]) -> Vec<Detector> {
    f.iter().map(|f| f.detector).collect()
}

/// `n` events of `ev`, one every `step` ms from `from`.
fn run(ev: &Ev, from: u64, n: u64, step: u64) -> Vec<(Ev, u64)> {
    (0..n).map(|i| (ev.clone(), from + i * step)).collect()
}

fn geo_db(tag: &str) -> (std::path::PathBuf, Geo) {
    let dir = std::env::temp_dir().join(format!("sluice-detect-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("city.mmdb");
    testdb::write(&path);
    let g = Geo::open(&path).unwrap();
    (path, g)
}

#[test]
fn mass_download_floor_and_own_baseline() {
    let mut e = Engine::new(&cfg(""), None);
    let dl = Ev::new("alice@corp.example").act("download", 1);
    // 49 files in five minutes: under the floor of 50.
    let f = feed(&mut e, &run(&dl, T0, 49, 6_000));
    assert!(f.is_empty(), "{f:?}");
    // The 50th tips it; the evidence is the window's events.
    let f = feed(&mut e, &[(dl.clone(), T0 + 49 * 6_000)]);
    assert_eq!(detectors(&f), [Detector::MassDownload]);
    assert_eq!(f[0].evidence.len(), 50);
    assert!(f[0].title.contains("50 files"), "{}", f[0].title);
    // An event with many files counts each file.
    let many = Ev::new("carol@corp.example").act("download", 60);
    let f = feed(&mut e, &[(many, T0)]);
    assert_eq!(detectors(&f), [Detector::MassDownload]);

    // Bob downloads about 40 files in every busy ten minutes, every day for a week.
    let mut e = Engine::new(&cfg(""), None);
    let bob = Ev::new("bob@corp.example").act("download", 1);
    let mut hist = Vec::new();
    for day in 0..7 {
        for w in 0..20 {
            let start = T0 + day * DAY + 8 * HOUR + w * 20 * MIN;
            hist.extend(run(&bob, start, 40, 10_000));
        }
    }
    assert!(feed(&mut e, &hist).is_empty());
    // 120 in ten minutes is over the floor but not 10x his own baseline (400).
    let day8 = T0 + 8 * DAY + 9 * HOUR;
    assert!(feed(&mut e, &run(&bob, day8, 120, 4_000)).is_empty());
    // 420 is.
    let f = feed(&mut e, &run(&bob, day8 + HOUR, 420, 1_000));
    assert_eq!(detectors(&f), [Detector::MassDownload]);
    assert!(f[0].summary.contains("baseline 40."), "{}", f[0].summary);
}

#[test]
fn mass_upload_and_delete_and_groups() {
    let c = cfg(
        "[mass_upload]\nfloor = 20\nwindow_s = 60\nbaseline_multiplier = 0\nexclude_groups = [\"backup\"]\n\
                 [mass_delete]\ngroups = [\"staff\"]\n",
    );
    let mut e = Engine::new(&c, None);
    let up = Ev::new("u@corp.example").act("upload", 1);
    // 20 uploads over two minutes: never 20 within one.
    assert!(feed(&mut e, &run(&up, T0, 20, 6_500)).is_empty());
    let f = feed(&mut e, &run(&up, T0 + HOUR, 20, 2_000));
    assert_eq!(detectors(&f), [Detector::MassUpload]);
    let mut backup = Ev::new("svc@corp.example").act("upload", 1);
    backup.groups = vec!["backup".into()];
    assert!(feed(&mut e, &run(&backup, T0, 100, 100)).is_empty());

    let del = Ev::new("d@corp.example").act("delete", 0);
    let f = feed(&mut e, &run(&del, T0, 30, 1_000));
    assert_eq!(detectors(&f), [Detector::MassDelete]);
    let mut guest = del.clone();
    guest.user = "g@partner.example".into();
    guest.groups = vec!["guests".into()];
    assert!(feed(&mut e, &run(&guest, T0, 100, 1_000)).is_empty());
}

#[test]
fn repeated_blocked_uploads() {
    let mut e = Engine::new(&cfg(""), None);
    let mut up = Ev::new("m@corp.example").act("upload", 1);
    // Allowed uploads do not count; four blocks do not reach five.
    assert!(feed(&mut e, &run(&up, T0, 10, 1_000)).is_empty());
    up.action = "block".into();
    assert!(feed(&mut e, &run(&up, T0 + MIN, 4, 30_000)).is_empty());
    let f = feed(&mut e, &[(up.clone(), T0 + 4 * MIN)]);
    assert_eq!(detectors(&f), [Detector::BlockedUploads]);
    assert_eq!(f[0].evidence.len(), 5);
    // Spread over more than the window: nothing.
    let mut e = Engine::new(&cfg(""), None);
    assert!(feed(&mut e, &run(&up, T0, 10, 3 * MIN)).is_empty());
}

/// 60 events over two days: a history.
fn history(ev: &Ev) -> Vec<(Ev, u64)> {
    run(ev, T0, 60, 48 * HOUR / 60)
}

#[test]
fn new_device_only_after_learning() {
    let mut e = Engine::new(&cfg(""), None);
    let a = Ev::new("n@corp.example");
    // A fresh user's first devices teach.
    let mut other = a.clone();
    other.device = "ag_desktop".into();
    assert!(feed(&mut e, &[(a.clone(), T0), (other, T0 + MIN)]).is_empty());
    assert!(feed(&mut e, &history(&a)).is_empty());
    let mut new = a.clone();
    new.device = "ag_unknown".into();
    let f = feed(&mut e, &[(new.clone(), T0 + 3 * DAY)]);
    assert_eq!(detectors(&f), [Detector::NewDevice]);
    assert!(f[0].title.contains("ag_unknown"));
    assert_eq!(f[0].device, "ag_unknown");
    // Known now.
    assert!(feed(&mut e, &[(new, T0 + 3 * DAY + HOUR)]).is_empty());
    // Many events in one hour are not a history.
    let mut e = Engine::new(&cfg(""), None);
    let b = Ev::new("quick@corp.example");
    assert!(feed(&mut e, &run(&b, T0, 200, 1_000)).is_empty());
    let mut nb = b.clone();
    nb.device = "ag_2".into();
    assert!(feed(&mut e, &[(nb, T0 + HOUR)]).is_empty());
}

#[test]
fn new_process_per_app() {
    let mut e = Engine::new(&cfg(""), None);
    let a = Ev::new("p@corp.example");
    assert!(feed(&mut e, &history(&a)).is_empty());
    // The same process for another app the user barely used: the app has no history.
    let mut other_app = a.clone();
    other_app.app = "crm".into();
    other_app.process = "/usr/bin/curl".into();
    assert!(feed(&mut e, &[(other_app, T0 + 3 * DAY)]).is_empty());
    let mut curl = a.clone();
    curl.process = "/usr/bin/curl".into();
    let f = feed(&mut e, &[(curl, T0 + 3 * DAY)]);
    assert_eq!(detectors(&f), [Detector::NewProcess]);
    assert!(f[0].title.contains("/usr/bin/curl") && f[0].title.contains("files"));
}

#[test]
fn new_network_by_prefix() {
    assert_eq!(network_of("10.0.7.9".parse().unwrap()), "10.0.7.0/24");
    assert_eq!(
        network_of("::ffff:10.0.7.9".parse().unwrap()),
        "10.0.7.0/24"
    );
    assert_eq!(
        network_of("2001:db8:aa:bb::1".parse().unwrap()),
        "2001:db8:aa::/48"
    );
    let mut e = Engine::new(&cfg(""), None);
    let a = Ev::new("w@corp.example");
    assert!(feed(&mut e, &history(&a)).is_empty());
    let mut same = a.clone();
    same.ip = "10.1.0.200".into();
    assert!(feed(&mut e, &[(same, T0 + 3 * DAY)]).is_empty());
    // The public address wins over the client's.
    let mut nat = a.clone();
    nat.public_ip = Some("2001:db8:aa:bb::1".into());
    let f = feed(&mut e, &[(nat.clone(), T0 + 3 * DAY)]);
    assert_eq!(detectors(&f), [Detector::NewNetwork]);
    assert!(f[0].title.contains("2001:db8:aa::/48"));
    nat.public_ip = Some("2001:db8:aa:cc::9".into());
    assert!(feed(&mut e, &[(nat, T0 + 3 * DAY)]).is_empty());
}

#[test]
fn new_country_and_impossible_travel() {
    let (path, g) = geo_db("geo");
    let mut c = cfg("");
    c.geo = Some(GeoConfig {
        database: path,
        max_speed_kmh: 1000.0,
        min_distance_km: 300.0,
    });
    let mut e = Engine::new(&c, Some(g));
    let berlin = Ev::new("t@corp.example"); // 10.1.0.5
    assert!(feed(&mut e, &history(&berlin)).is_empty());
    // Munich (DE, about 500 km) five hours later: neither.
    let mut munich = berlin.clone();
    munich.ip = "10.2.0.5".into();
    let t = T0 + 3 * DAY;
    let f = feed(
        &mut e,
        &[(berlin.clone(), t), (munich.clone(), t + 5 * HOUR)],
    );
    assert_eq!(detectors(&f), [Detector::NewNetwork]);
    // New York an hour later: impossible, and a new country.
    let mut ny = berlin.clone();
    ny.public_ip = Some("10.3.9.9".into());
    ny.ip = "192.168.1.10".into();
    let f = feed(&mut e, &[(ny.clone(), t + 6 * HOUR)]);
    let got: BTreeSet<Detector> = detectors(&f).into_iter().collect();
    assert_eq!(
        got,
        [
            Detector::NewNetwork,
            Detector::NewCountry,
            Detector::ImpossibleTravel
        ]
        .into_iter()
        .collect()
    );
    let travel = f
        .iter()
        .find(|f| f.detector == Detector::ImpossibleTravel)
        .unwrap();
    assert!(travel.title.contains("Munich, DE") && travel.title.contains("New York, US"));
    assert_eq!(travel.evidence.len(), 2, "both ends are evidence");
    // Back to Berlin two days later: a known country, a possible trip.
    assert!(feed(&mut e, &[(berlin, t + 2 * DAY)]).is_empty());
    // Without a database, neither detector runs.
    let mut plain = Engine::new(&cfg(""), None);
    assert!(!plain.rule(Detector::ImpossibleTravel).enabled);
    assert!(feed(&mut plain, &[(ny, t)]).is_empty());
}

#[test]
fn a_replay_teaches_without_alerting() {
    let mut e = Engine::new(&cfg(""), None);
    let dl = Ev::new("r@corp.example").act("download", 1);
    for (i, (ev, t)) in run(&dl, T0, 45, 1_000).iter().enumerate() {
        assert!(e.observe(&ev.at(i as u64, *t), false).is_empty());
    }
    e.end_rebuild();
    // The replayed burst no longer counts toward the window.
    assert!(feed(&mut e, &run(&dl, T0 + 50_000, 10, 1_000)).is_empty());
    // Collector's own events are not activity.
    let mut own = Ev::new("r@corp.example").act("download", 100);
    own.app = "sluice".into();
    assert!(feed(&mut e, &[(own, T0)]).is_empty());
}

fn store(tag: &str) -> (std::path::PathBuf, Store) {
    let dir = std::env::temp_dir().join(format!("sluice-alerts-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let s = Store::open_with(&dir.join("db.sqlite"), crate::portal::MIGRATIONS).unwrap();
    (dir, s)
}

#[test]
fn alerts_dedup_states_and_log() {
    let (dir, s) = store("dedup");
    let c = cfg("[mass_download]\nbaseline_multiplier = 0\n");
    let rule = c.rule(Detector::MassDownload);
    let mut e = Engine::new(&c, None);
    let dl = Ev::new("a@corp.example").act("download", 1);
    let f1 = feed(&mut e, &run(&dl, T0, 50, 1_000)).remove(0);
    let Raised::New(a) = alerts::raise(&s, &rule, &f1).unwrap() else {
        panic!("first is new")
    };
    assert_eq!(
        (a.count, a.evidence.len(), a.state.as_str()),
        (1, 50, "open")
    );
    // A second burst within dedup_s adds to it.
    let f2 = feed(&mut e, &run(&dl, T0 + 20 * MIN, 50, 1_000)).remove(0);
    let Raised::Repeat(b) = alerts::raise(&s, &rule, &f2).unwrap() else {
        panic!("second is a repeat")
    };
    assert_eq!(b.id, a.id);
    assert_eq!((b.count, b.evidence.len()), (2, 100));
    // Another detector or user is another alert.
    let mut other = f2.clone();
    other.user = "z@corp.example".into();
    assert!(matches!(
        alerts::raise(&s, &rule, &other).unwrap(),
        Raised::New(_)
    ));
    // Acknowledged still collects; resolved does not.
    alerts::set_state(&s, &a.id, State::Acknowledged, "admin").unwrap();
    assert!(matches!(
        alerts::raise(&s, &rule, &f2).unwrap(),
        Raised::Repeat(_)
    ));
    let (after, before) = alerts::set_state(&s, &a.id, State::Resolved, "admin")
        .unwrap()
        .unwrap();
    assert_eq!(
        (before, after.state.as_str()),
        (State::Acknowledged, "resolved")
    );
    assert_eq!(after.state_by.as_deref(), Some("admin"));
    assert!(matches!(
        alerts::raise(&s, &rule, &f2).unwrap(),
        Raised::New(_)
    ));
    // Past dedup_s: a new alert even while the old one is open.
    let mut late = f2.clone();
    late.user = "z@corp.example".into();
    late.time += 2 * HOUR;
    assert!(matches!(
        alerts::raise(&s, &rule, &late).unwrap(),
        Raised::New(_)
    ));
    assert!(
        alerts::set_state(&s, "nope", State::Resolved, "x")
            .unwrap()
            .is_none()
    );
    // Filters.
    let all = alerts::list(&s, &alerts::Filter::default(), 100).unwrap();
    assert_eq!(all.len(), 4);
    let f = alerts::Filter {
        user: Some("Z@corp.example".into()),
        state: Some(State::Open),
        ..alerts::Filter::default()
    };
    assert_eq!(alerts::list(&s, &f, 100).unwrap().len(), 2);
    let f = alerts::Filter {
        state: Some(State::Resolved),
        ..alerts::Filter::default()
    };
    assert_eq!(alerts::list(&s, &f, 100).unwrap()[0].id, a.id);
    // The log: one event per record.
    alerts::record(&s, &after, "admin");
    let n = s
        .count(
            &crate::query::parse("app:sluice activity:alert user:a@corp.example")
                .unwrap()
                .compile(),
        )
        .unwrap();
    assert_eq!(n, 1);
    // Forwarded form.
    let v: serde_json::Value = serde_json::from_slice(&alerts::forward_json(&after)).unwrap();
    assert_eq!(v["type"], "alert");
    assert_eq!(v["state"], "resolved");
    assert_eq!(v["severity"], "high");
    // The chart's buckets.
    let b = alerts::per_bucket(&s, HOUR as i64, T0 as i64, (T0 + DAY) as i64).unwrap();
    assert_eq!(b.iter().map(|x| x.1).sum::<u64>(), 4);
    drop(s);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_batch_of_findings_is_stored_together() {
    let (dir, s) = store("batch");
    let c = cfg("[mass_download]\nbaseline_multiplier = 0\n");
    let rule = c.rule(Detector::MassDownload);
    let mut e = Engine::new(&c, None);
    let dl = Ev::new("a@corp.example").act("download", 1);
    let f1 = feed(&mut e, &run(&dl, T0, 50, 1_000)).remove(0);
    let f2 = feed(&mut e, &run(&dl, T0 + 20 * MIN, 50, 1_000)).remove(0);
    let mut f3 = f2.clone();
    f3.user = "z@corp.example".into();
    // In one transaction, a later finding still folds into the alert an earlier one opened.
    let raised =
        alerts::raise_all(&s, &[(&rule, &f1), (&rule, &f2), (&rule, &f3)], "detector").unwrap();
    let [Raised::New(a), Raised::Repeat(b), Raised::New(z)] = &raised[..] else {
        panic!("{raised:?}")
    };
    assert_eq!((b.id.as_str(), b.count), (a.id.as_str(), 2));
    assert_ne!(z.id, a.id);
    assert_eq!(
        alerts::list(&s, &alerts::Filter::default(), 10)
            .unwrap()
            .len(),
        2
    );
    // Each alert opened is in the activity log, written with it.
    let logged = s
        .count(
            &crate::query::parse("app:sluice activity:alert")
                .unwrap()
                .compile(),
        )
        .unwrap();
    assert_eq!(logged, 2);
    drop(s);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn ingestion_hands_over_the_new_events_only() {
    let (dir, s) = store("handover");
    let line = |i: u64| {
        let mut l = serde_json::to_vec(&Ev::new("h@corp.example").at(i, T0 + i)).unwrap();
        l.push(b'\n');
        l
    };
    let opts = IngestOptions {
        collect_parsed: true,
        ..IngestOptions::default()
    };
    let first: Vec<u8> = (0..3).flat_map(line).collect();
    let o = s.ingest(&first, opts).unwrap();
    assert_eq!(o.new_parsed.len(), 3);
    assert!(o.new_events.is_empty(), "JSON only when asked for");
    // Again with one more: the stored ones are duplicates, not handed over twice.
    let again: Vec<u8> = (0..4).flat_map(line).collect();
    let o = s.ingest(&again, opts).unwrap();
    assert_eq!((o.accepted, o.duplicates), (1, 3));
    let ids: Vec<&str> = o.new_parsed.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["e00000003"]);
    // Within a caller's transaction: the same outcome, committed with it.
    let o = s.with_write(|tx| s.ingest_in(tx, &line(4), opts)).unwrap();
    assert_eq!(o.new_parsed.len(), 1);
    let q = crate::query::parse("user:h@corp.example")
        .unwrap()
        .compile();
    assert_eq!(s.count(&q).unwrap(), 5);
    drop(s);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn case_does_not_split_a_user_or_an_activity() {
    let mut e = Engine::new(&cfg(""), None);
    let lower = Ev::new("alice@corp.example").act("download", 1);
    let upper = Ev::new("Alice@Corp.Example").act("Download", 1);
    let events: Vec<(Ev, u64)> = (0..50)
        .map(|i| {
            let ev = if i % 2 == 0 { &lower } else { &upper };
            (ev.clone(), T0 + i * 1_000)
        })
        .collect();
    let f = feed(&mut e, &events);
    assert_eq!(detectors(&f), [Detector::MassDownload]);
    assert_eq!(f[0].user, "alice@corp.example");
    assert_eq!(e.users(), 1);
}

// ---------------------------------------------------------------------------------------------
// a realistic stream

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const USERS: u64 = 50;
const DAYS: u64 = 6;
const APPS: &[&str] = &["files", "drive", "crm", "mail"];

/// One user's habits.
struct Habits {
    email: String,
    /// Files downloaded per day (uploads a third, deletions a tenth).
    per_day: u64,
    devices: Vec<String>,
    /// Per app, the processes used for it.
    processes: Vec<(&'static str, Vec<String>)>,
    /// Client addresses (a home and an office network in one city).
    nets: Vec<String>,
}

fn habits(u: u64) -> Habits {
    let city = if u.is_multiple_of(2) { 1 } else { 2 }; // 10.1/16 Berlin, 10.2/16 Munich
    let mut devices = vec![format!("ag_{u:03}a")];
    if u.is_multiple_of(3) {
        devices.push(format!("ag_{u:03}b"));
    }
    let processes = APPS
        .iter()
        .map(|app| {
            let mut p = vec!["/usr/bin/firefox".to_owned()];
            if *app == "drive" && u.is_multiple_of(5) {
                p.push("/usr/bin/rclone".into());
            }
            if *app == "mail" {
                p.push("/usr/bin/thunderbird".into());
            }
            (*app, p)
        })
        .collect();
    Habits {
        email: format!("user{u:02}@corp.example"),
        per_day: 10 + 15 * (u % 10),
        devices,
        processes,
        nets: vec![
            format!("10.{city}.{}.{}", u, 10 + u % 200),
            format!("10.{city}.{}.{}", 100 + u, 20 + u % 200),
        ],
    }
}

fn template(h: &Habits, rng: &mut Rng, activity: &str, files: usize) -> Ev {
    let (app, procs) = &h.processes[rng.below(h.processes.len() as u64) as usize];
    let mut e = Ev::new(&h.email).act(activity, files);
    e.app = (*app).into();
    e.process = procs[rng.below(procs.len() as u64) as usize].clone();
    e.device = h.devices[rng.below(h.devices.len() as u64) as usize].clone();
    e
}

/// A planted anomaly: the user, the detector that must find it, and the detectors it may also
/// trip (travel to a new place is also a new network and country).
struct Plant {
    user: String,
    detector: Detector,
    also: Vec<Detector>,
    events: Vec<(Ev, u64)>,
}

fn plants() -> Vec<Plant> {
    let h = |u: u64| habits(u);
    let day4 = T0 + 4 * DAY;
    let mut out = Vec::new();
    let mut p = |u: u64, detector: Detector, also: Vec<Detector>, events: Vec<(Ev, u64)>| {
        out.push(Plant {
            user: h(u).email,
            detector,
            also,
            events,
        });
    };
    let base = |u: u64| {
        let hb = h(u);
        let mut e = Ev::new(&hb.email);
        e.device = hb.devices[0].clone();
        e.ip = hb.nets[0].clone();
        e
    };
    p(
        3,
        Detector::MassDownload,
        vec![],
        run(&base(3).act("download", 1), day4 + 14 * HOUR, 150, 2_000),
    );
    p(
        7,
        Detector::MassUpload,
        vec![],
        run(&base(7).act("upload", 1), day4 + 10 * HOUR, 120, 4_000),
    );
    p(
        11,
        Detector::MassDelete,
        vec![],
        run(&base(11).act("delete", 0), day4 + 15 * HOUR, 80, 3_000),
    );
    let mut blocked = base(13).act("upload", 1);
    blocked.action = "block".into();
    p(
        13,
        Detector::BlockedUploads,
        vec![],
        run(&blocked, day4 + 11 * HOUR, 8, 45_000),
    );
    let mut dev = base(17);
    dev.device = "ag_stranger".into();
    p(
        17,
        Detector::NewDevice,
        vec![],
        vec![(dev, day4 + 10 * HOUR + 7 * MIN)],
    );
    let mut proc_ = base(19);
    proc_.app = "drive".into();
    proc_.process = "/tmp/.cache/x/exfil".into();
    p(
        19,
        Detector::NewProcess,
        vec![],
        vec![(proc_, day4 + 11 * HOUR + 3 * MIN)],
    );
    let mut net = base(23); // Munich user, a new /24 in Munich
    net.ip = "10.2.250.9".into();
    p(
        23,
        Detector::NewNetwork,
        vec![],
        vec![(net, day4 + 12 * HOUR + 30 * MIN)],
    );
    let mut tokyo = base(29); // Munich user, half an hour after their last event, in Tokyo
    tokyo.ip = "192.168.0.7".into();
    tokyo.public_ip = Some("10.4.1.1".into());
    p(
        29,
        Detector::ImpossibleTravel,
        vec![Detector::NewCountry, Detector::NewNetwork],
        vec![(tokyo, day4 + 17 * HOUR + 30 * MIN)],
    );
    let mut paris = base(31); // at night, hours after the day's work: a possible trip
    paris.public_ip = Some("192.0.2.44".into());
    p(
        31,
        Detector::NewCountry,
        vec![Detector::NewNetwork],
        vec![(paris, day4 + 23 * HOUR)],
    );
    out
}

/// 50 users over six days of working hours; with `plant`, the anomalies above mixed in. Time
/// ordered, as agents ship them.
fn stream(plant: bool) -> (Vec<Event>, usize) {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut events: Vec<(u64, Ev)> = Vec::new();
    for u in 0..USERS {
        let h = habits(u);
        // The first minutes of the first day go through every device, process and network the
        // user has, as a new install sees them.
        let mut t = T0 + 8 * HOUR + u * MIN;
        for d in &h.devices {
            for (app, procs) in &h.processes {
                for p in procs {
                    for n in &h.nets {
                        let mut e = Ev::new(&h.email);
                        e.device = d.clone();
                        e.app = (*app).into();
                        e.process = p.clone();
                        e.ip = n.clone();
                        events.push((t, e));
                        t += 5_000;
                    }
                }
            }
        }
        for day in 0..DAYS {
            // Office on even days, home on odd ones.
            let ip = &h.nets[(day % 2) as usize];
            let work = T0 + day * DAY + 9 * HOUR;
            let mut add = |rng: &mut Rng, activity: &str, files: usize, n: u64| {
                for _ in 0..n {
                    let mut e = template(&h, rng, activity, files);
                    e.ip = ip.clone();
                    events.push((work + rng.below(8 * HOUR), e));
                }
            };
            add(&mut rng, "view", 0, h.per_day);
            add(&mut rng, "download", 1, h.per_day);
            add(&mut rng, "upload", 1, h.per_day / 3);
            add(&mut rng, "delete", 0, h.per_day / 10);
            add(&mut rng, "login", 0, 2);
            // Now and then an upload blocked for its label.
            for _ in 0..rng.below(3) {
                let mut e = template(&h, &mut rng, "upload", 1);
                e.ip = ip.clone();
                e.action = "block".into();
                events.push((work + rng.below(8 * HOUR), e));
            }
        }
    }
    let mut planted = 0;
    if plant {
        for p in plants() {
            planted += 1;
            for (e, t) in p.events {
                events.push((t, e));
            }
        }
    }
    events.sort_by_key(|(t, _)| *t);
    let out = events
        .iter()
        .enumerate()
        .map(|(i, (t, e))| e.at(i as u64, *t))
        .collect();
    (out, planted)
}

/// The findings of a stream, folded per (user, detector) as the alerts' deduplication folds
/// them.
fn detect_stream(events: &[Event]) -> BTreeMap<(String, Detector), usize> {
    let (path, g) = geo_db("stream");
    let mut c = cfg("");
    c.geo = Some(GeoConfig {
        database: path,
        max_speed_kmh: 1000.0,
        min_distance_km: 300.0,
    });
    let mut engine = Engine::new(&c, Some(g));
    let mut found: BTreeMap<(String, Detector), usize> = BTreeMap::new();
    for e in events {
        for f in engine.observe(e, true) {
            *found.entry((f.user, f.detector)).or_default() += 1;
        }
    }
    found
}

#[test]
fn realistic_stream_finds_every_plant_and_nothing_else() {
    let (clean, _) = stream(false);
    let clean_found = detect_stream(&clean);
    let (events, planted) = stream(true);
    let found = detect_stream(&events);
    let plants = plants();
    let mut hit = 0;
    for p in &plants {
        if found.contains_key(&(p.user.clone(), p.detector)) {
            hit += 1;
        } else {
            eprintln!("MISSED: {} {}", p.user, p.detector);
        }
    }
    let expected: BTreeSet<(String, Detector)> = plants
        .iter()
        .flat_map(|p| {
            std::iter::once(p.detector)
                .chain(p.also.iter().copied())
                .map(|d| (p.user.clone(), d))
        })
        .collect();
    let false_alerts: Vec<_> = found.keys().filter(|k| !expected.contains(k)).collect();
    println!(
        "realistic stream: {} users, {DAYS} days, {} events ({} without plants); \
         {planted} plants, {hit} found, {} alerts in all, {} false alerts with plants, \
         {} alerts on the stream without plants",
        USERS,
        events.len(),
        clean.len(),
        found.len(),
        false_alerts.len(),
        clean_found.len(),
    );
    assert!(events.len() > 20_000, "{}", events.len());
    assert!(
        clean_found.is_empty(),
        "alerts without plants: {clean_found:?}"
    );
    assert_eq!(hit, plants.len(), "found: {found:?}");
    assert!(false_alerts.is_empty(), "false alerts: {false_alerts:?}");
}
