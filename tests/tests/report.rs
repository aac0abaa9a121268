//! Reporting end to end against an HTTPS collector stand-in ([`FakeCollector`]): the durable
//! spool survives `kill -9` mid-burst, a collector outage during traffic loses and doubles
//! nothing, a damaged spool record is skipped and counted, a full spool drops its oldest
//! segment first and counts it, a refused credential stops shipping without losing anything,
//! and enrollment keeps its credential 0600 and will not be overwritten without `--force`.
#![allow(clippy::unwrap_used)]

use std::{
    collections::{BTreeMap, HashSet},
    io::BufRead as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use sluice::{
    config::Config,
    event::{ActivityEvent, ProcessFacts},
    report::{
        ProbeFacts, ReportHandle, Reporting,
        ship::{ShipSettings, Shipper},
        spool::{MAGIC, Spool, SpoolOptions},
    },
};
use sluice_e2e::{TempDir, fake_collector::FakeCollector};
use sluice_policy::model::{Action, Activity, Client, Device, Kind};
use tokio_util::sync::CancellationToken;

const AGENT_CRED: &str = "agent-credential-1";

fn temp(tag: &str) -> TempDir {
    TempDir::new(&format!("report-{tag}"))
}

async fn collector(dir: &Path) -> (FakeCollector, PathBuf, PathBuf) {
    let c = FakeCollector::start(&[AGENT_CRED]).await.unwrap();
    let ca = dir.join("collector-ca.pem");
    std::fs::write(&ca, &c.ca_pem).unwrap();
    let cred = dir.join("credential");
    std::fs::write(&cred, format!("{AGENT_CRED}\n")).unwrap();
    (c, ca, cred)
}

fn ship_settings(c: &FakeCollector, ca: &Path, cred: &Path) -> ShipSettings {
    ShipSettings {
        fallbacks: Vec::new(),
        collector: c.url(),
        collector_ca: Some(ca.to_owned()),
        credential_file: cred.to_owned(),
        agent_id: "agent-test".into(),
        max_events: 1000,
        max_bytes: 1 << 20,
        retry_min: Duration::from_millis(100),
        retry_max: Duration::from_secs(1),
        timeout: Duration::from_secs(10),
    }
}

async fn wait_for(deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

fn payload(id: &str, n: u64) -> Vec<u8> {
    let mut e = sluice_protocol::Event::new(
        id.to_owned(),
        1_700_000_000_000 + n,
        sluice_protocol::CLASS_HTTP_ACTIVITY,
        sluice_protocol::http_activity::GET,
        "Get",
        sluice_protocol::Device::default(),
    );
    e.message = format!("event {n} with some text to give it a realistic size");
    serde_json::to_vec(&e).unwrap()
}

fn activity(i: u64) -> ActivityEvent {
    let upload = i.is_multiple_of(3);
    ActivityEvent {
        id: format!("act-{i}"),
        time: 1_700_000_000_000 + i,
        incident: format!("inc-{i}"),
        app: "files".into(),
        host: "files.example.com".into(),
        method: if upload { "POST" } else { "GET" }.into(),
        url: format!("https://files.example.com/item/{i}"),
        status: if upload { 403 } else { 200 },
        activity: if upload {
            Activity::Upload
        } else {
            Activity::View
        },
        action: if upload { Action::Block } else { Action::Allow },
        decided_by: Kind::Session,
        policy: upload.then(|| "block-unlabelled-uploads".to_owned()),
        matched: vec![],
        user: Some("alice@corp.example".into()),
        identity_error: None,
        device: Device::Managed,
        client: Client::Native,
        source: None,
        public_source: None,
        destination: Some("192.0.2.7:443".parse().expect("addr")),
        user_agent: Some("curl/8".into()),
        process: ProcessFacts {
            pid: 4242,
            exe: Some("/usr/bin/curl".into()),
            comm: "curl".into(),
            uid: 1000,
            user: Some("alice".into()),
        },
        files: vec![],
        dlp: BTreeMap::new(),
        label_applied: None,
        permissions: vec![],
        protected: vec![],
        detail: None,
    }
}

fn config(dir: &Path, c: &FakeCollector, ca: &Path, cred: &Path) -> Config {
    Config::parse(&format!(
        r#"
        state_dir = "{state}"
        [steer]
        enabled = false
        [report]
        collector = "{url}"
        collector_ca = "{ca}"
        credential_file = "{cred}"
        retry_min_ms = 100
        retry_max_ms = 1000
        status_interval_s = 1
        "#,
        state = dir.join("state").display(),
        url = c.url(),
        ca = ca.display(),
        cred = cred.display(),
    ))
    .unwrap()
}

fn start_reporting(
    cfg: &Config,
) -> (
    Arc<dyn sluice::proxy::record::Reporter>,
    ReportHandle,
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let reporting = Reporting::open(cfg, None)
        .unwrap()
        .expect("a collector is configured");
    let reporter = reporting.reporter();
    let handle = reporting.handle();
    let shutdown = CancellationToken::new();
    let probe: sluice::report::Probe = Arc::new(|| ProbeFacts {
        steering: false,
        proxy: true,
        degraded: false,
        last_error: None,
        bundle_expires_at: None,
        bundle_stale: false,
    });
    let task = tokio::spawn(reporting.run(probe, shutdown.clone()));
    (reporter, handle, shutdown, task)
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

/// The body of a GET on the agent's admin endpoint.
fn admin_get(admin: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// (a) `kill -9` during a burst of 10,000 appends: after a restart, every append that was
/// acknowledged is delivered exactly once, and so are the events appended after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_burst_loses_no_acknowledged_event() {
    let dir = temp("kill9");
    let spool_dir = dir.join("spool");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sluice-spool-writer"))
        .arg(&spool_dir)
        .args(["10000", "ev", "65536"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let lines = std::thread::spawn(move || {
        for l in std::io::BufReader::new(stdout).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut acked = HashSet::new();
    let mut done = false;
    let started = Instant::now();
    while acked.len() < 3000 && started.elapsed() < Duration::from_secs(60) {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) if l == "done" => {
                done = true;
                break;
            }
            Ok(l) => {
                acked.insert(l.trim_start_matches("ok ").to_owned());
            }
            Err(_) => break,
        }
    }
    child.kill().unwrap(); // SIGKILL
    let _ = child.wait();
    lines.join().unwrap();
    // Lines printed before the kill are acknowledged appends too.
    for l in rx.try_iter() {
        if l == "done" {
            done = true;
        } else {
            acked.insert(l.trim_start_matches("ok ").to_owned());
        }
    }
    assert!(!done, "the burst ended before the kill; nothing was tested");
    assert!(
        acked.len() >= 3000,
        "only {} appends acknowledged",
        acked.len()
    );
    assert!(acked.len() < 10_000);

    let (c, ca, cred) = collector(&dir).await;
    let (spool, reader) = Spool::open(
        &spool_dir,
        SpoolOptions {
            segment_bytes: 65536,
            ..SpoolOptions::default()
        },
    )
    .unwrap();
    let at_open = spool.stats();
    eprintln!(
        "{} of 10000 appends acknowledged before kill -9; spool at restart: {at_open:?}",
        acked.len()
    );
    assert!(at_open.events >= acked.len() as u64, "{at_open:?}");
    let shipper = Shipper::new(ship_settings(&c, &ca, &cred), reader);
    let status = shipper.status();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(shipper.run(shutdown.clone()));
    for n in 0..500u64 {
        spool
            .append(payload(&format!("after-{n}"), n))
            .await
            .unwrap();
    }
    let ok = wait_for(Duration::from_secs(60), || {
        let ids = c.ids();
        acked.iter().all(|id| ids.contains(id))
            && (0..500).all(|n| ids.contains(&format!("after-{n}")))
            && spool.stats().events == 0
    })
    .await;
    let ids = c.ids();
    let missing = acked.iter().filter(|id| !ids.contains(*id)).count();
    assert!(
        ok,
        "{missing} acknowledged events missing; status {:?}, spool {:?}",
        status.lock().unwrap(),
        spool.stats()
    );
    // Nothing unknown, nothing twice.
    for id in &ids {
        let known = id
            .strip_prefix("ev-")
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n < 10_000)
            || id
                .strip_prefix("after-")
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| n < 500);
        assert!(known, "unexpected event {id}");
    }
    assert!(
        c.received_twice().is_empty(),
        "sent twice: {:?}",
        c.received_twice()
    );
    assert_eq!(c.count(), at_open.events as usize + 500);
    // Acknowledged segments are gone: only the one being written remains.
    assert_eq!(segments(&spool_dir).len(), 1, "{:?}", segments(&spool_dir));
    shutdown.cancel();
    task.await.unwrap().unwrap();
    spool.close();
}

/// (b) The collector is down for a while during traffic: events keep spooling and are all
/// delivered, stored once each, after it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_outage_during_traffic_loses_and_doubles_nothing() {
    let outage = Duration::from_secs(
        std::env::var("SLUICE_OUTAGE_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20),
    );
    let dir = temp("outage");
    let (mut c, ca, cred) = collector(&dir).await;
    let cfg = config(&dir, &c, &ca, &cred);
    let (reporter, handle, shutdown, task) = start_reporting(&cfg);
    let total = 1200u64;
    let gap = (outage + Duration::from_secs(4)) / total as u32;
    let feeder = {
        let reporter = reporter.clone();
        tokio::spawn(async move {
            for i in 0..total {
                reporter.activity(activity(i));
                tokio::time::sleep(gap).await;
            }
        })
    };
    assert!(
        wait_for(Duration::from_secs(10), || c.count() > 20).await,
        "nothing shipped before the outage"
    );
    c.stop();
    let stopped_with = c.count();
    tokio::time::sleep(outage).await;
    let during = handle.snapshot();
    assert!(during.spool.events > 0, "events keep spooling: {during:?}");
    assert!(
        during.ship.failures > 0 && during.ship.state == "retrying",
        "{:?}",
        during.ship
    );
    c.restart().await.unwrap();
    feeder.await.unwrap();
    let want: HashSet<String> = (0..total).map(|i| format!("act-{i}")).collect();
    let ok = wait_for(Duration::from_secs(30), || {
        let ids = c.ids();
        want.iter().all(|id| ids.contains(id))
    })
    .await;
    let ids = c.ids();
    assert!(
        ok,
        "{} events missing after the outage; {:?}",
        want.iter().filter(|i| !ids.contains(*i)).count(),
        handle.snapshot()
    );
    assert!(
        stopped_with < want.len(),
        "the outage happened during traffic"
    );
    {
        let store = c.state.store.lock().unwrap();
        let acts = store
            .events
            .keys()
            .filter(|k| k.starts_with("act-"))
            .count();
        assert_eq!(acts, total as usize, "each activity stored exactly once");
        // The wire events are what the converter makes of the activities.
        let e = &store.events["act-3"];
        assert_eq!(e["class_uid"], 6006);
        assert_eq!(e["severity_id"], 3);
        assert_eq!(
            e["message"],
            "alice@corp.example upload files.example.com/item/3 to files: block (block-unlabelled-uploads)"
        );
        assert_eq!(store.events["act-4"]["class_uid"], 4002);
        // Posture at start and status events ship alongside.
        assert!(
            store
                .events
                .values()
                .any(|v| v["class_uid"] == 5001 && v["posture"]["kernel"].is_string())
        );
        assert!(
            store
                .events
                .values()
                .any(|v| v["agent_status"]["proxy"] == true)
        );
    }
    let snap = handle.snapshot();
    assert_eq!(snap.unspooled, 0);
    assert_eq!(snap.spool.dropped, 0);
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

/// (c) A damaged record (bytes flipped in a segment) and a torn tail are skipped and counted;
/// every other event is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_record_is_skipped_and_counted() {
    let dir = temp("corrupt");
    let spool_dir = dir.join("spool");
    {
        let (spool, reader) = Spool::open(&spool_dir, SpoolOptions::default()).unwrap();
        for n in 0..100u64 {
            spool.append(payload(&format!("c-{n}"), n)).await.unwrap();
        }
        spool.close();
        drop(reader);
    }
    let seg = segments(&spool_dir).pop().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let needle = br#""id":"c-50""#;
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    bytes[at + 8] ^= 0x20; // 'c' -> 'C': valid JSON, wrong checksum
    // A torn tail: a header promising more than is there.
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&500u32.to_le_bytes());
    bytes.extend_from_slice(&[0u8; 4]);
    bytes.extend_from_slice(b"{\"id\":");
    std::fs::write(&seg, &bytes).unwrap();

    let (c, ca, cred) = collector(&dir).await;
    let (spool, reader) = Spool::open(&spool_dir, SpoolOptions::default()).unwrap();
    let st = spool.stats();
    assert_eq!(st.corrupt, 2, "{st:?}");
    assert_eq!(st.events, 99, "{st:?}");
    let shipper = Shipper::new(ship_settings(&c, &ca, &cred), reader);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(shipper.run(shutdown.clone()));
    assert!(
        wait_for(Duration::from_secs(20), || c.count() >= 99
            && spool.stats().events == 0)
        .await
    );
    let ids = c.ids();
    assert_eq!(ids.len(), 99);
    assert!(!ids.contains("c-50") && !ids.contains("C-50"));
    assert!(
        (0..100)
            .filter(|n| *n != 50)
            .all(|n| ids.contains(&format!("c-{n}")))
    );
    assert_eq!(
        spool.stats().corrupt,
        2,
        "counted once, not again when shipped"
    );
    shutdown.cancel();
    task.await.unwrap().unwrap();
    spool.close();
}

/// (d) A full spool drops its oldest segment first and counts every event it dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_drops_the_oldest_segment_first_and_counts_it() {
    let dir = temp("bound");
    let spool_dir = dir.join("spool");
    let opts = SpoolOptions {
        segment_bytes: 4096,
        max_bytes: 16384,
        ..SpoolOptions::default()
    };
    let (spool, reader) = Spool::open(&spool_dir, opts).unwrap();
    let total = 300u64;
    for n in 0..total {
        spool.append(payload(&format!("d-{n}"), n)).await.unwrap();
    }
    let st = spool.stats();
    assert!(st.dropped > 0, "{st:?}");
    assert!(st.bytes <= 16384, "{st:?}");
    assert!(segments(&spool_dir).len() <= 4);
    assert_eq!(st.events + st.dropped, total, "{st:?}");
    let (c, ca, cred) = collector(&dir).await;
    let shipper = Shipper::new(ship_settings(&c, &ca, &cred), reader);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(shipper.run(shutdown.clone()));
    assert!(
        wait_for(Duration::from_secs(20), || c.count() as u64 == st.events
            && spool.stats().events == 0)
        .await
    );
    let mut got: Vec<u64> = c
        .ids()
        .iter()
        .map(|id| id.trim_start_matches("d-").parse().unwrap())
        .collect();
    got.sort_unstable();
    // What is left is the newest events, contiguous: the oldest went first.
    assert_eq!(got, (st.dropped..total).collect::<Vec<_>>());
    shutdown.cancel();
    task.await.unwrap().unwrap();
    spool.close();
}

/// (e) 401/403: shipping stops and the status says so; events keep spooling; once the
/// credential is replaced everything is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_credential_stops_shipping_and_loses_nothing() {
    let dir = temp("refused");
    let (c, ca, cred) = collector(&dir).await;
    std::fs::write(&cred, "not-a-known-credential\n").unwrap();
    let cfg = config(&dir, &c, &ca, &cred);
    let (reporter, handle, shutdown, task) = start_reporting(&cfg);
    for i in 0..50 {
        reporter.activity(activity(i));
    }
    assert!(
        wait_for(Duration::from_secs(10), || handle
            .snapshot()
            .ship
            .credential_refused)
        .await,
        "{:?}",
        handle.snapshot()
    );
    let snap = handle.snapshot();
    assert_eq!(snap.ship.state, "credential refused");
    assert!(
        snap.ship
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("401"),
        "{:?}",
        snap.ship
    );
    assert_eq!(c.count(), 0);
    assert!(snap.spool.events >= 50, "{snap:?}");
    // It does not hammer the collector while refused.
    let refused = c.state.refused.load(std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        c.state.refused.load(std::sync::atomic::Ordering::Relaxed),
        refused
    );

    // A new credential (as a new enrollment writes it) resumes shipping.
    c.state
        .credentials
        .lock()
        .unwrap()
        .insert("new-credential".into());
    std::fs::write(&cred, "new-credential\n").unwrap();
    let want: HashSet<String> = (0..50).map(|i| format!("act-{i}")).collect();
    assert!(
        wait_for(Duration::from_secs(15), || want.is_subset(&c.ids())).await,
        "{:?}",
        handle.snapshot()
    );
    let snap = handle.snapshot();
    assert!(!snap.ship.credential_refused);
    assert!(c.received_twice().is_empty());

    // Revoked: 403, the same stop.
    c.state
        .revoked
        .lock()
        .unwrap()
        .insert("new-credential".into());
    for i in 50..60 {
        reporter.activity(activity(i));
    }
    assert!(
        wait_for(Duration::from_secs(10), || handle
            .snapshot()
            .ship
            .credential_refused)
        .await
    );
    assert!(
        handle
            .snapshot()
            .ship
            .last_error
            .unwrap_or_default()
            .contains("403")
    );
    assert!(!c.ids().contains("act-55"));
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

/// (f) `sluice enroll` stores the credential 0600 with the agent id, refuses a second
/// enrollment without `--force`, and a used token is refused with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_stores_the_credential_privately_and_needs_force_to_replace_it() {
    let dir = temp("enroll");
    let (c, ca, _) = collector(&dir).await;
    c.add_token("tok-1");
    c.add_token("tok-2");
    let cfg_path = dir.join("agent.toml");
    let state = dir.join("state");
    std::fs::write(&cfg_path, format!("state_dir = \"{}\"\n", state.display())).unwrap();
    let sluice = sluice_e2e::bin("sluice");
    let enroll = |token: &str, force: bool| {
        let token_file = cfg_path.with_file_name(format!("{token}.token"));
        std::fs::write(&token_file, token).unwrap();
        let mut cmd = tokio::process::Command::new(&sluice);
        cmd.arg("enroll")
            .arg("--config")
            .arg(&cfg_path)
            .args(["--collector", &c.url(), "--token-file"])
            .arg(&token_file)
            .arg("--ca")
            .arg(&ca);
        if force {
            cmd.arg("--force");
        }
        cmd.output()
    };
    let out = enroll("tok-1", false).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cred_path = state.join("report/credential");
    let meta = std::fs::metadata(&cred_path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let first = std::fs::read_to_string(&cred_path)
        .unwrap()
        .trim()
        .to_owned();
    assert!(c.state.credentials.lock().unwrap().contains(&first));
    let enrollment: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("report/enrollment.json")).unwrap())
            .unwrap();
    assert_eq!(enrollment["agent_id"], "agent-1");
    assert_eq!(enrollment["collector"], c.url());
    assert!(
        enrollment["collector_ca"]
            .as_str()
            .unwrap()
            .ends_with("collector-ca.pem")
    );

    // A second enrollment is refused without --force, before the token is spent.
    let out = enroll("tok-2", false).await.unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already enrolled") && err.contains("--force"),
        "{err}"
    );
    assert!(c.state.tokens.lock().unwrap().contains("tok-2"));
    assert_eq!(std::fs::read_to_string(&cred_path).unwrap().trim(), first);

    // A used token is refused, and the enrollment in place is kept.
    let out = enroll("tok-1", true).await.unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("enrollment refused") && err.contains("401"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&cred_path).unwrap().trim(), first);

    let out = enroll("tok-2", true).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let second = std::fs::read_to_string(&cred_path)
        .unwrap()
        .trim()
        .to_owned();
    assert_ne!(first, second);

    // `run` finds the collector, its CA, the credential and the agent id from the enrollment.
    let cfg = Config::load(&cfg_path).unwrap();
    let t = sluice::report::target(&cfg).unwrap().unwrap();
    assert_eq!(t.collector, c.url());
    assert_eq!(t.agent_id, "agent-2");
    assert_eq!(t.credential_file, cred_path);
    assert!(t.collector_ca.is_some());
}

/// `sluice run` (steering off) after `sluice enroll`: posture and status events reach the
/// collector stamped with the agent id, `/status` and `/metrics` show the spool and shipping,
/// and SIGTERM stops it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_enrolls_runs_and_reports_its_posture_and_status() {
    let dir = temp("run");
    let (c, ca, _) = collector(&dir).await;
    c.add_token("tok-run");
    let state = dir.join("state");
    let cfg_text = format!(
        "state_dir = \"{}\"\n[steer]\nenabled = false\n[admin]\nlisten = \"127.0.0.1:0\"\n[report]\nstatus_interval_s = 1\n",
        state.display()
    );
    let cfg_path = dir.join("agent.toml");
    std::fs::write(&cfg_path, &cfg_text).unwrap();
    let token_file = dir.join("enroll.token");
    std::fs::write(&token_file, "tok-run\n").unwrap();
    let out = tokio::process::Command::new(sluice_e2e::bin("sluice"))
        .arg("enroll")
        .arg("--config")
        .arg(&cfg_path)
        .args(["--collector", &c.url(), "--token-file"])
        .arg(&token_file)
        .arg("--ca")
        .arg(&ca)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let agent_dir = dir.join("agent");
    let mut agent =
        tokio::task::spawn_blocking(move || sluice_e2e::Agent::launch(&cfg_text, &agent_dir))
            .await
            .unwrap()
            .unwrap();
    let device_events = |c: &FakeCollector| -> (usize, usize) {
        let store = c.state.store.lock().unwrap();
        let mine = store
            .events
            .values()
            .filter(|v| v["class_uid"] == 5001 && v["device"]["uid"] == "agent-1");
        let (mut posture, mut status) = (0, 0);
        for v in mine {
            if v["posture"].is_object() {
                posture += 1;
            }
            if v["agent_status"]["state"] == "running" {
                status += 1;
            }
        }
        (posture, status)
    };
    let ok = wait_for(Duration::from_secs(20), || {
        let (p, s) = device_events(&c);
        p >= 1 && s >= 2
    })
    .await;
    assert!(
        ok,
        "{:?}; log: {}",
        device_events(&c),
        std::fs::read_to_string(&agent.log).unwrap_or_default()
    );
    let admin = agent.admin;
    let (doc, metrics) = tokio::task::spawn_blocking(move || {
        let status = admin_get(admin, "/status");
        (
            serde_json::from_str::<serde_json::Value>(&status).unwrap(),
            admin_get(admin, "/metrics"),
        )
    })
    .await
    .unwrap();
    assert_eq!(doc["report"]["agent_id"], "agent-1", "{doc:#}");
    assert_eq!(doc["report"]["ship"]["state"], "ok", "{doc:#}");
    assert!(doc["report"]["spool"]["appended"].as_u64().unwrap() >= 3);
    assert!(metrics.contains("sluice_report_spool_events "), "{metrics}");
    assert!(
        metrics.contains("sluice_report_credential_refused 0"),
        "{metrics}"
    );
    let exit = tokio::task::spawn_blocking(move || {
        agent
            .signal_and_wait(nix::sys::signal::Signal::SIGTERM)
            .unwrap()
    })
    .await
    .unwrap();
    assert!(exit.success(), "{exit:?}");
}

/// A bundle URL on the collector is fetched with the agent's credential as a Bearer token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_fetches_carry_the_credential() {
    let dir = temp("bundle-auth");
    let (c, ca, cred) = collector(&dir).await;
    let (_, _, public) = sluice_policy::bundle::jws::SigningKey::generate().unwrap();
    let public_path = dir.join("bundle.pub");
    std::fs::write(&public_path, public).unwrap();
    let settings = sluice::bundle::BundleSettings {
        fallback_urls: Vec::new(),
        url: Some(format!("{}/api/v1/bundles/current", c.url())),
        file: None,
        public_key: public_path,
        long_poll_s: 1,
        poll_s: 30,
        allow_downgrade: false,
        extra_cas: vec![ca],
        credential_file: Some(cred),
    };
    let dist = Arc::new(sluice::bundle::Distributor::new(settings, &dir.join("state")).unwrap());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(dist.clone().run(shutdown.clone()));
    assert!(
        wait_for(Duration::from_secs(10), || !c
            .state
            .bundle_auth
            .lock()
            .unwrap()
            .is_empty())
        .await
    );
    assert_eq!(
        c.state.bundle_auth.lock().unwrap()[0].as_deref(),
        Some(format!("Bearer {AGENT_CRED}").as_str())
    );
    shutdown.cancel();
    task.await.unwrap().unwrap();
}
