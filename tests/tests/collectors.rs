//! Several collectors on one PostgreSQL (a cluster of the test's own, from Debian's packages):
//! the real `sluice-collector` twice, the second with the first's keys (its `tls/` and release
//! keys, as the production layout copies them), any of them serving any agent. A bundle
//! published through one, and a risk mark set through one's API, reach an agent long-polling the
//! other within a second. Agents' real spools and shippers (durable spool, gzip batches, retries) are split
//! between the two, each with the other as its fallback; one collector is killed with `kill -9`
//! during the burst, and every event is stored exactly once; an agent's real risk poller moves
//! to the other collector and gets the marks set there.
#![allow(clippy::unwrap_used)]

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sluice::report::{
    ship::{ShipSettings, ShipStatus, Shipper},
    spool::{Spool, SpoolOptions},
};
use sluice_collector::store::{Store, cluster::LocalCluster};
use sluice_e2e::{
    TempDir, bin,
    portal::{Collector, run_collector, write_plain_config},
};
use sluice_policy::bundle::{Archive, jws::SigningKey};
use tokio_util::sync::CancellationToken;

const AGENTS: usize = 6;
const EVENTS_PER_AGENT: u64 = 4_000;

/// Runs curl against `base + path`, trusting `ca`: (status, headers, body).
fn curl(ca: &Path, base: &str, path: &str, args: &[&str]) -> (u16, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30", "--cacert"])
        .arg(ca)
        .args(["-D", "-", "-w", "\n%{http_code}"])
        .args(args)
        .arg(format!("{base}{path}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (rest, code) = text.rsplit_once('\n').unwrap();
    let (headers, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    (
        code.trim().parse().unwrap(),
        headers.to_owned(),
        body.to_owned(),
    )
}

fn header(headers: &str, name: &str) -> Option<String> {
    headers.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

fn cli(config: &Path, args: &[&str]) -> String {
    let out = Command::new(bin("sluice-collector"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sluice-collector {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn signed_bundle(key: &SigningKey, revision: &str) -> Vec<u8> {
    let mut a = Archive::default();
    a.files.insert(
        ".manifest".into(),
        format!(
            "{{\"revision\":\"{revision}\",\"expires_at\":{}}}",
            sluice_policy::bundle::now_s() + 86_400
        )
        .into_bytes(),
    );
    a.files.insert(
        "data.yaml".into(),
        format!("rev: {revision}\n").into_bytes(),
    );
    a.sign(key).unwrap();
    a.write().unwrap()
}

fn event(agent: usize, n: u64, now: u64) -> Vec<u8> {
    let mut e = sluice_protocol::Event::new(
        format!("ev-{agent}-{n}"),
        now - n,
        sluice_protocol::CLASS_HTTP_ACTIVITY,
        sluice_protocol::http_activity::GET,
        "Get",
        sluice_protocol::Device::default(),
    );
    e.message = format!("agent {agent} event {n}: a page viewed on files.example.com");
    serde_json::to_vec(&e).unwrap()
}

struct Two {
    a: Collector,
    b: Collector,
    ca: PathBuf,
    key: SigningKey,
}

/// Collector `a` (initialised) and `b` (with `a`'s keys), both on database `conninfo`.
fn two_collectors(dir: &Path, conninfo: &str) -> Two {
    let (key, _, public) = SigningKey::generate().unwrap();
    let pubkey = dir.join("bundle.pub.pem");
    std::fs::write(&pubkey, public).unwrap();
    let extra = format!(
        "bundle_public_key = \"{}\"\n[detection]\nenabled = false\n[store]\npostgres = \"{conninfo}\"\n",
        pubkey.display()
    );
    let (da, db) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db).unwrap();
    let (cfg_a, port_a) = write_plain_config(&da, &extra).unwrap();
    let init = cli(&cfg_a, &["init"]);
    assert!(init.contains("ca.pem"), "{init}");
    // The second collector: the same CA and server certificate, the same release keys.
    copy_dir(&da.join("state/tls"), &db.join("state/tls"));
    for f in ["release-keys.json"] {
        if da.join("state").join(f).exists() {
            std::fs::copy(da.join("state").join(f), db.join("state").join(f)).unwrap();
        }
    }
    let (cfg_b, port_b) = write_plain_config(&db, &extra).unwrap();
    let a = run_collector(&da, &cfg_a, port_a).unwrap();
    let b = run_collector(&db, &cfg_b, port_b).unwrap();
    let ca = a.ca.clone();
    Two { a, b, ca, key }
}

fn enroll(ca: &Path, base: &str, token: &str, host: &str) -> sluice_protocol::EnrollResponse {
    let body =
        serde_json::json!({"token": token, "hostname": host, "agent_version": "0.1.0"}).to_string();
    let (status, _, text) = curl(
        ca,
        base,
        "/api/v1/enroll",
        &[
            "-H",
            "content-type: application/json",
            "--data-binary",
            &body,
        ],
    );
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_collectors_on_one_postgresql_serve_any_agent_and_lose_or_double_nothing() {
    let dir = TempDir::new("collectors");
    let mut pg = LocalCluster::start(&dir.0.join("pg"), 5432, &[]).unwrap();
    pg.create_database("sluice").unwrap();
    let conninfo = pg.conninfo("sluice");
    let two = two_collectors(&dir.0, &conninfo);
    let (ca, a_base, b_base) = (two.ca.clone(), two.a.base.clone(), two.b.base.clone());

    // Any collector serves any agent: a token made through one enrolls through the other.
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        let (made_on, enrolled_on) = if i % 2 == 0 {
            (&two.b, &a_base)
        } else {
            (&two.a, &b_base)
        };
        let token = made_on.cli(&["token", "create", "--group", "eng"]).unwrap();
        agents.push(enroll(&ca, enrolled_on, token.trim(), &format!("host-{i}")));
    }
    let auth = format!("authorization: Bearer {}", agents[0].credential);

    // A bundle published through `a` wakes a long poll held by `b` within a second.
    let v1 = dir.0.join("v1.tar.gz");
    std::fs::write(&v1, signed_bundle(&two.key, "1")).unwrap();
    two.a
        .cli(&["bundle", "publish", v1.to_str().unwrap(), "--group", "eng"])
        .unwrap();
    let (status, headers, _) = curl(&ca, &b_base, "/api/v1/bundles/current", &["-H", &auth]);
    assert_eq!(status, 200);
    let inm = format!("if-none-match: {}", header(&headers, "etag").unwrap());
    let poll = {
        let (ca, b_base, auth, inm) = (ca.clone(), b_base.clone(), auth.clone(), inm.clone());
        tokio::task::spawn_blocking(move || {
            let r = curl(
                &ca,
                &b_base,
                "/api/v1/bundles/current",
                &["-H", &auth, "-H", &inm, "-H", "prefer: wait=20"],
            );
            (r, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let v2 = dir.0.join("v2.tar.gz");
    std::fs::write(&v2, signed_bundle(&two.key, "2")).unwrap();
    // From before the publishing command starts: an upper bound.
    let published = Instant::now();
    two.a
        .cli(&["bundle", "publish", v2.to_str().unwrap(), "--group", "eng"])
        .unwrap();
    let ((status, headers, _), woken) = poll.await.unwrap();
    assert_eq!(status, 200, "{headers}");
    assert_eq!(
        header(&headers, "x-sluice-bundle-revision").as_deref(),
        Some("2")
    );
    let bundle_latency = woken.saturating_duration_since(published);
    assert!(
        bundle_latency < Duration::from_secs(1),
        "{bundle_latency:?}"
    );

    // A device marked through `a`'s API reaches a risk long poll held by `b` within a second.
    let admin = format!(
        "authorization: Bearer {}",
        two.a
            .cli(&["apitoken", "create", "--name", "soc"])
            .unwrap()
            .trim()
    );
    let (status, headers, _) = curl(&ca, &b_base, "/api/v1/risk", &["-H", &auth]);
    assert_eq!(status, 200);
    let inm = format!("if-none-match: {}", header(&headers, "etag").unwrap());
    let poll = {
        let (ca, b_base, auth) = (ca.clone(), b_base.clone(), auth.clone());
        tokio::task::spawn_blocking(move || {
            let r = curl(
                &ca,
                &b_base,
                "/api/v1/risk",
                &["-H", &auth, "-H", &inm, "-H", "prefer: wait=20"],
            );
            (r, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let marked = Instant::now();
    let (status, _, text) = curl(
        &ca,
        &a_base,
        &format!("/api/v1/risk/devices/{}", agents[0].agent_id),
        &[
            "-H",
            &admin,
            "-H",
            "content-type: application/json",
            "--data-binary",
            r#"{"level": "quarantined", "reason": "reported stolen"}"#,
        ],
    );
    assert_eq!(status, 200, "{text}");
    let ((status, _, body), woken) = poll.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("quarantined"), "{body}");
    let risk_latency = woken.saturating_duration_since(marked);
    assert!(risk_latency < Duration::from_secs(1), "{risk_latency:?}");

    // Agent 0's real risk poller: `a`, then `b` as its fallback.
    let device = Arc::new(sluice::device::DeviceState::default());
    let risk_dir = dir.0.join("risk-agent");
    std::fs::create_dir_all(&risk_dir).unwrap();
    std::fs::write(risk_dir.join("credential"), &agents[0].credential).unwrap();
    let stop_risk = CancellationToken::new();
    let risk_task = tokio::spawn(sluice::report::risk::poll(
        sluice::report::Target {
            collector: a_base.clone(),
            collector_ca: Some(ca.clone()),
            credential_file: risk_dir.join("credential"),
            agent_id: agents[0].agent_id.clone(),
            fallbacks: vec![b_base.clone()],
        },
        device.clone(),
        stop_risk.clone(),
    ));
    let marked = |d: &sluice::device::DeviceState, id: &str, level: &str| {
        format!("{:?}", d.risk()).contains(id) && format!("{:?}", d.risk()).contains(level)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !marked(&device, &agents[0].agent_id, "quarantined") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        marked(&device, &agents[0].agent_id, "quarantined"),
        "{:?}",
        device.risk()
    );

    // The burst: every agent's events are spooled; half ship to `a`, half to `b`, each with
    // the other as fallback.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let shutdown = CancellationToken::new();
    let mut statuses: Vec<Arc<Mutex<ShipStatus>>> = Vec::new();
    let mut tasks = Vec::new();
    let mut spools = Vec::new();
    let mut producers = Vec::new();
    for (i, agent) in agents.iter().enumerate() {
        let adir = dir.0.join(format!("agent-{i}"));
        std::fs::create_dir_all(&adir).unwrap();
        let cred = adir.join("credential");
        std::fs::write(&cred, format!("{}\n", agent.credential)).unwrap();
        let (spool, reader) = Spool::open(&adir.join("spool"), SpoolOptions::default()).unwrap();
        // The agent's traffic: its events arrive over about two seconds.
        let producer = spool.clone();
        producers.push(tokio::spawn(async move {
            for chunk in 0..EVENTS_PER_AGENT / 100 {
                for n in chunk * 100..(chunk + 1) * 100 {
                    producer.append(event(i, n, now)).await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
        let (primary, other) = if i % 2 == 0 {
            (&a_base, &b_base)
        } else {
            (&b_base, &a_base)
        };
        let shipper = Shipper::new(
            ShipSettings {
                collector: primary.clone(),
                collector_ca: Some(ca.clone()),
                fallbacks: vec![other.clone()],
                credential_file: cred,
                agent_id: agent.agent_id.clone(),
                max_events: 100,
                max_bytes: 1 << 20,
                retry_min: Duration::from_millis(50),
                retry_max: Duration::from_millis(500),
                timeout: Duration::from_secs(10),
            },
            reader,
        );
        statuses.push(shipper.status());
        tasks.push(tokio::spawn(shipper.run(shutdown.clone())));
        spools.push(spool);
    }
    let total = AGENTS as u64 * EVENTS_PER_AGENT;
    let acked = |statuses: &[Arc<Mutex<ShipStatus>>]| -> u64 {
        statuses.iter().map(|s| s.lock().unwrap().events).sum()
    };
    // `kill -9` of `a` once a fifth of the burst is in.
    let mut a = two.a;
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked(&statuses) < total / 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let at_kill = acked(&statuses);
    assert!(at_kill < total, "the burst ended before the kill");
    let status = Command::new("kill")
        .args(["-KILL", &a.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let _ = a.child.wait();
    for p in producers {
        p.await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked(&statuses) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let shipped: Vec<ShipStatus> = statuses.iter().map(|s| s.lock().unwrap().clone()).collect();
    // The risk poller moved to `b` too: a mark set there reaches the agent.
    let admin_b = format!(
        "authorization: Bearer {}",
        two.b
            .cli(&["apitoken", "create", "--name", "soc-b"])
            .unwrap()
            .trim()
    );
    let (status, _, text) = curl(
        &ca,
        &b_base,
        &format!("/api/v1/risk/devices/{}", agents[0].agent_id),
        &[
            "-H",
            &admin_b,
            "-H",
            "content-type: application/json",
            "--data-binary",
            r#"{"level": "untrusted", "reason": "unknown image"}"#,
        ],
    );
    assert_eq!(status, 200, "{text}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !marked(&device, &agents[0].agent_id, "untrusted") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        marked(&device, &agents[0].agent_id, "untrusted"),
        "{:?}",
        device.risk()
    );
    stop_risk.cancel();
    risk_task.await.unwrap().unwrap();
    assert_eq!(acked(&statuses), total, "{shipped:#?}\n{}", two.b.log());
    // Every agent that shipped to `a` moved to `b`.
    for (i, s) in shipped.iter().enumerate() {
        assert_eq!(s.collector, b_base, "agent {i}: {s:?}");
    }
    let failed: u64 = shipped.iter().map(|s| s.failures).sum();
    assert!(failed > 0, "no agent noticed the kill: {shipped:#?}");

    // Exactly once: every event, no other, none twice.
    let store = Store::open_postgres(&conninfo, 2, 90, &[]).unwrap();
    let (mut rows, mut ids, mut devices) = (0u64, HashSet::new(), HashSet::new());
    store
        .for_each_page(&sluice_collector::query::Compiled::all(), 1000, |page| {
            for e in page.iter().filter(|e| e.id.starts_with("ev-")) {
                rows += 1;
                ids.insert(e.id.clone());
                devices.insert(e.device_uid.clone());
            }
            true
        })
        .unwrap();
    let (distinct, agents_seen) = (ids.len(), devices.len());
    assert_eq!(rows, total);
    assert_eq!(distinct as u64, total);
    assert_eq!(agents_seen, AGENTS);
    let duplicates: u64 = shipped.iter().map(|s| s.duplicates).sum();
    let accepted: u64 = shipped.iter().map(|s| s.accepted).sum();
    assert_eq!(accepted + duplicates, total, "{shipped:#?}");
    println!(
        "collectors: bundle wake {bundle_latency:?}, risk wake {risk_latency:?}, {total} events \
         ({at_kill} acknowledged at the kill), {failed} failed attempts, {duplicates} re-sent \
         events recognised as duplicates"
    );
    drop(store);
    drop(spools);
    drop(a);
    drop(two.b);
    pg.stop();
}
