//! The central plane under attack, against the real `sluice-collector` binary with real clients
//! (curl): a burst of parallel wrong passwords from many addresses, what an enrolled agent may
//! and may not claim, and what it may make the collector hold. Needs the workspace binaries
//! (`cargo build --bins`); not root.

#![allow(clippy::unwrap_used)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use sluice_e2e::{
    TempDir, bin,
    portal::{Collector, run_collector, write_plain_config},
    wait_until,
};

/// `sluice-collector init`: the admin password it prints once.
fn init(cfg: &Path) -> String {
    let out = Command::new(bin("sluice-collector"))
        .args(["init", "--config"])
        .arg(cfg)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("password (shown once): "))
        .expect("init printed the password")
        .trim()
        .to_owned()
}

/// Where the collector answers and the CA it is verified with.
#[derive(Debug, Clone)]
struct Api {
    base: String,
    ca: PathBuf,
}

impl Api {
    fn of(c: &Collector) -> Self {
        Self {
            base: c.base.clone(),
            ca: c.ca.clone(),
        }
    }
}

/// curl against the collector: (status, headers, body).
fn curl(c: &Api, source: Option<&str>, args: &[&str]) -> (u16, String, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "60", "-D", "-", "--cacert"])
        .arg(&c.ca)
        .args(["-w", "\n%{http_code}"]);
    if let Some(s) = source {
        cmd.args(["--interface", s]);
    }
    let out = cmd.args(args).stdin(Stdio::null()).output().unwrap();
    parse_curl(&String::from_utf8_lossy(&out.stdout))
}

fn parse_curl(text: &str) -> (u16, String, String) {
    let (rest, code) = text.rsplit_once('\n').unwrap_or(("", text));
    let (head, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    (
        code.trim().parse().unwrap_or(0),
        head.to_owned(),
        body.to_owned(),
    )
}

/// The double-submit token of the sign-in form: any 64 hex digits, in the cookie and the form.
const FORM: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn sign_in_args(base: &str, user: &str, password: &str) -> Vec<String> {
    vec![
        "-H".into(),
        format!("cookie: __Host-sluice-login={FORM}"),
        "--data-urlencode".into(),
        format!("csrf={FORM}"),
        "--data-urlencode".into(),
        format!("user={user}"),
        "--data-urlencode".into(),
        format!("password={password}"),
        format!("{base}/login"),
    ]
}

fn sign_in(c: &Api, source: &str, user: &str, password: &str) -> (u16, String) {
    let args = sign_in_args(&c.base, user, password);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, head, _) = curl(c, Some(source), &args);
    (code, head)
}

fn status_of(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Enrolls an agent as `host`: (agent id, credential).
fn enroll(c: &Collector, host: &str) -> (String, String) {
    let token = c.cli(&["token", "create"]).unwrap();
    let api = Api::of(c);
    let body = json!({"token": token.trim(), "hostname": host, "agent_version": "0.1.0"});
    let (code, _, text) = curl(
        &api,
        None,
        &[
            "-H",
            "content-type: application/json",
            "--data-binary",
            &body.to_string(),
            &format!("{}/api/v1/enroll", c.base),
        ],
    );
    assert_eq!(code, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    (
        v["agent_id"].as_str().unwrap().to_owned(),
        v["credential"].as_str().unwrap().to_owned(),
    )
}

/// A minimal valid HTTP Activity event.
fn event(id: &str, time_ms: u64, user: &str) -> Value {
    json!({
        "id": id, "schema": 1, "time": time_ms, "class_uid": 4002,
        "class_name": "HTTP Activity", "category_uid": 4, "activity_id": 3,
        "activity_name": "view", "type_uid": 400_203, "severity_id": 1,
        "message": format!("{user} viewed"),
        "device": {"uid": "", "hostname": "laptop", "posture": "managed", "os": "Linux",
                   "agent_version": "0.1.0"},
        "actor": {"user": {"email_addr": user}},
        "sluice": {"app": "files", "activity": "view", "action": "allow",
                   "decided_by": "session", "incident": format!("inc-{id}")},
    })
}

fn post_events(c: &Api, credential: &str, batch: &str, lines: &[Value]) -> (u16, String) {
    let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let (code, _, text) = curl(
        c,
        None,
        &[
            "-H",
            "content-type: application/x-ndjson",
            "-H",
            &format!("authorization: Bearer {credential}"),
            "-H",
            &format!("x-sluice-batch: {batch}"),
            "--data-binary",
            &body,
            &format!("{}/api/v1/events", c.base),
        ],
    );
    (code, text)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// 200 parallel wrong passwords for one account, each from an address of its own: at most the
/// configured number are checked, the account locks (the right password too is refused while
/// it holds), and works again once the lock ends; the collector's memory stays within the
/// bounded checks' share, ingestion keeps going during the burst, and every checked sign-in,
/// failure and the lockout are audit events in the activity log.
#[test]
fn a_parallel_password_burst_is_checked_at_most_the_limit_and_locks_the_account() {
    const PER_ACCOUNT: usize = 10;
    const LOCK_S: u64 = 4;
    let dir = TempDir::new("signin-burst");
    let (cfg, port) = write_plain_config(
        &dir.0,
        &format!(
            "[portal.sign_in]\nmax_failures_per_account = {PER_ACCOUNT}\nlockout_s = {LOCK_S}\n\
             concurrent_hashes = 2\nwaiting_hashes = 8\n"
        ),
    )
    .unwrap();
    let password = init(&cfg);
    let collector = run_collector(&dir.0, &cfg, port).unwrap();
    let pid = collector.child.id();
    let (_, credential) = enroll(&collector, "ingesting-laptop");
    let c = Api::of(&collector);
    // Warm: one event stored, so the baseline includes the ingestion path's memory.
    let (code, text) = post_events(&c, &credential, "warm", &[event("warm-1", now_ms(), "w@x")]);
    assert_eq!(code, 200, "{text}");
    let rss_before_kib = status_of(pid, "VmRSS:");

    // Ingestion beside the burst: a batch every 100 ms until the burst is over.
    let done = Arc::new(AtomicBool::new(false));
    let ingest = {
        let (done, c, credential) = (done.clone(), c.clone(), credential.clone());
        std::thread::spawn(move || {
            let mut results = Vec::new();
            let mut i = 0;
            while !done.load(Ordering::Relaxed) && i < 600 {
                let id = format!("during-{i}");
                results.push(post_events(
                    &c,
                    &credential,
                    &id,
                    &[event(&id, now_ms(), "d@x")],
                ));
                i += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            results
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let burst: Vec<_> = (0..200u32)
        .map(|i| {
            let source = format!("127.0.{}.{}", 1 + i / 200, 2 + i % 200);
            let mut cmd = Command::new("curl");
            cmd.args([
                "-sS",
                "--max-time",
                "60",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .arg("--cacert")
            .arg(&c.ca)
            .args(["--interface", &source])
            .args(sign_in_args(&c.base, "admin", "not the password"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
            cmd.spawn().unwrap()
        })
        .collect();
    let codes: Vec<u16> = burst
        .into_iter()
        .map(|ch| {
            let out = ch.wait_with_output().unwrap();
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .unwrap_or(0)
        })
        .collect();
    let burst_s = started.elapsed().as_secs_f64();
    let hwm_kib = status_of(pid, "VmHWM:");
    // Locked now: the right password is refused too.
    let (code, head) = sign_in(&c, "127.0.3.1", "admin", &password);
    assert_eq!(code, 429, "the right password during the lock: {head}");
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    done.store(true, Ordering::Relaxed);
    let during = ingest.join().unwrap();

    let wrong = codes.iter().filter(|&&s| s == 401).count();
    let refused = codes.iter().filter(|&&s| s == 429).count();
    eprintln!(
        "burst of 200 in {burst_s:.1} s: {wrong} checked and wrong (401), {refused} refused (429); \
         RSS {rss_before_kib} KiB before, peak {hwm_kib} KiB; {} ingestion batches during it",
        during.len()
    );
    assert_eq!(wrong + refused, 200, "every attempt answered: {codes:?}");
    assert!(
        (1..=PER_ACCOUNT).contains(&wrong),
        "{wrong} passwords checked, the limit is {PER_ACCOUNT}"
    );
    // Memory: two argon2 checks at a time (19 MiB each) and 200 TLS connections, not 200 checks.
    let bound_kib = rss_before_kib + 2 * 19 * 1024 + 64 * 1024;
    assert!(
        hwm_kib <= bound_kib,
        "peak {hwm_kib} KiB over {bound_kib} KiB (before: {rss_before_kib} KiB)"
    );
    assert!(!during.is_empty());
    for (code, text) in &during {
        assert_eq!(*code, 200, "an ingestion batch during the burst: {text}");
    }

    // After the lock, the right password works (from any address).
    std::thread::sleep(Duration::from_secs(LOCK_S + 1));
    let (code, head) = sign_in(&c, "127.0.3.2", "admin", &password);
    assert_eq!(code, 303, "the right password after the lock: {head}");
    let session = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("set-cookie: __host-sluice-session=")
                .then(|| {
                    l.split_once('=')
                        .unwrap()
                        .1
                        .split(';')
                        .next()
                        .unwrap()
                        .to_owned()
                })
        })
        .expect("a session cookie");

    // What the collector counted, and the audit trail in the activity log.
    let cookie = format!("cookie: __Host-sluice-session={session}");
    let (code, _, text) = curl(
        &c,
        None,
        &["-H", &cookie, &format!("{}/api/v1/status", c.base)],
    );
    assert_eq!(code, 200, "{text}");
    let st: Value = serde_json::from_str(&text).unwrap();
    let si = &st["sign_in"];
    assert_eq!(si["checked"].as_u64(), Some(wrong as u64 + 1), "{si}");
    assert_eq!(si["lockouts"], 1, "{si}");
    assert_eq!(si["succeeded"], 1, "{si}");
    let found = wait_until(Duration::from_secs(10), || {
        let (_, _, text) = curl(
            &c,
            None,
            &[
                "-H",
                &cookie,
                &format!("{}/api/v1/events?q=app:portal&limit=500", c.base),
            ],
        );
        serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["events"].as_array().map(|a| a.len()))
            == Some(wrong + 2)
    });
    let (_, _, text) = curl(
        &c,
        None,
        &[
            "-H",
            &cookie,
            &format!("{}/api/v1/events?q=app:portal&limit=500", c.base),
        ],
    );
    let v: Value = serde_json::from_str(&text).unwrap();
    let events = v["events"].as_array().unwrap();
    assert!(found, "audit events: {text}");
    let count = |activity: &str, action: &str| {
        events
            .iter()
            .filter(|e| e["sluice"]["activity"] == activity && e["sluice"]["action"] == action)
            .count()
    };
    assert_eq!(count("login", "block"), wrong, "{text}");
    assert_eq!(count("lockout", "block"), 1, "{text}");
    assert_eq!(count("login", "allow"), 1, "{text}");
    let lock = events
        .iter()
        .find(|e| e["sluice"]["activity"] == "lockout")
        .unwrap();
    assert_eq!(lock["class_uid"], 3001, "{lock}");
    assert_eq!(lock["actor"]["user"]["email_addr"], "admin", "{lock}");
    let ok = events
        .iter()
        .find(|e| e["sluice"]["action"] == "allow")
        .unwrap();
    assert_eq!(ok["class_uid"], 3002, "{ok}");
    assert_eq!(ok["src_endpoint"]["ip"], "127.0.3.2", "{ok}");
}

/// The query API's events for `q`, with an API token.
fn search(c: &Api, token: &str, q: &str) -> Vec<Value> {
    let (code, _, text) = curl(
        c,
        None,
        &[
            "-G",
            "-H",
            &format!("authorization: Bearer {token}"),
            "--data-urlencode",
            &format!("q={q}"),
            "--data-urlencode",
            "limit=1000",
            &format!("{}/api/v1/events", c.base),
        ],
    );
    assert_eq!(code, 200, "{text}");
    serde_json::from_str::<Value>(&text).unwrap()["events"]
        .as_array()
        .unwrap()
        .clone()
}

/// An enrolled agent forging another device's id and host name, or far-future and far-past
/// times: its events are stored under its own identity at the receive time, flagged with what
/// they claimed. A gzip bomb is refused; 100 concurrent 16 MiB posts from one agent are
/// refused past its share (and hold only that share's memory) while another agent's batches,
/// posted meanwhile, are all stored.
#[test]
fn an_agent_is_trusted_for_its_own_device_only_and_cannot_crowd_out_another() {
    let dir = TempDir::new("agent-trust");
    let (cfg, port) = write_plain_config(&dir.0, "").unwrap();
    let collector = run_collector(&dir.0, &cfg, port).unwrap();
    let pid = collector.child.id();
    let c = Api::of(&collector);
    let (a_id, a_cred) = enroll(&collector, "laptop-a");
    let (b_id, b_cred) = enroll(&collector, "laptop-b");
    let token = collector
        .cli(&["apitoken", "create", "--name", "soc"])
        .unwrap()
        .trim()
        .to_owned();

    // A claims to be B, from the future and from long ago.
    let now = now_ms();
    let mut forged = event("forged-1", now, "mallory@corp.example");
    forged["device"]["uid"] = json!(b_id);
    forged["device"]["hostname"] = json!("laptop-b");
    let mut future = event("future-1", now + 365 * 86_400_000, "mallory@corp.example");
    future["device"]["hostname"] = json!("laptop-a");
    let mut past = event("past-1", now - 400 * 86_400_000, "mallory@corp.example");
    past["device"]["hostname"] = json!("laptop-a");
    let mut honest = event("honest-1", now - 1000, "alice@corp.example");
    honest["device"]["hostname"] = json!("laptop-a");
    // A flag of its own is not taken either.
    honest["received"] = json!({"time": 1, "flags": []});
    let (code, text) = post_events(&c, &a_cred, "forge", &[forged, future, past, honest]);
    assert_eq!(code, 200, "{text}");
    let after = now_ms();
    let stored = search(&c, &token, "");
    let by_id = |id: &str| {
        stored
            .iter()
            .find(|e| e["id"] == id)
            .unwrap_or_else(|| panic!("{id} not stored: {stored:?}"))
            .clone()
    };
    let f = by_id("forged-1");
    assert_eq!(f["device"]["uid"], a_id.as_str(), "{f}");
    assert_eq!(f["device"]["hostname"], "laptop-a", "{f}");
    assert_eq!(
        f["received"]["flags"],
        json!(["device_uid", "hostname"]),
        "{f}"
    );
    assert_eq!(f["received"]["claimed_device_uid"], b_id.as_str(), "{f}");
    assert_eq!(f["received"]["claimed_hostname"], "laptop-b", "{f}");
    for (id, flag) in [("future-1", "time_future"), ("past-1", "time_past")] {
        let e = by_id(id);
        let t = e["time"].as_u64().unwrap();
        assert!(
            (now..=after).contains(&t),
            "{id} kept its claimed time: {e}"
        );
        assert_eq!(e["received"]["flags"], json!([flag]), "{e}");
        assert!(e["received"]["claimed_time"].as_u64().is_some(), "{e}");
    }
    let h = by_id("honest-1");
    assert!(h.get("received").is_none(), "{h}");
    assert_eq!(h["time"].as_u64(), Some(now - 1000));
    // The future event does not sit on top of the log: the newest is one of this batch at the
    // receive time, not a year ahead.
    assert!(stored[0]["time"].as_u64().unwrap() <= after);

    // A gzip bomb: 1 GiB of zeros in about 1 MiB.
    let bomb = dir.0.join("bomb.gz");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c 1073741824 /dev/zero | gzip -1 > {}",
            bomb.display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    let (code, _, text) = curl(
        &c,
        None,
        &[
            "-H",
            "content-encoding: gzip",
            "-H",
            &format!("authorization: Bearer {a_cred}"),
            "--data-binary",
            &format!("@{}", bomb.display()),
            &format!("{}/api/v1/events", c.base),
        ],
    );
    assert_eq!(code, 413, "the bomb: {text}");
    assert!(text.contains("inflated"), "{text}");
    // The same bomb with a trailer that lies about its size: inflated up to the bound, no
    // further.
    let mut lying = std::fs::read(&bomb).unwrap();
    let n = lying.len();
    lying[n - 4..].copy_from_slice(&1000u32.to_le_bytes());
    let liar = dir.0.join("liar.gz");
    std::fs::write(&liar, lying).unwrap();
    let (code, _, text) = curl(
        &c,
        None,
        &[
            "-H",
            "content-encoding: gzip",
            "-H",
            &format!("authorization: Bearer {a_cred}"),
            "--data-binary",
            &format!("@{}", liar.display()),
            &format!("{}/api/v1/events", c.base),
        ],
    );
    assert_eq!(code, 413, "the lying bomb: {text}");
    assert!(text.contains("inflated"), "{text}");

    // 100 concurrent posts of 16 MiB (lines that are no events) from A, while B posts.
    let big = dir.0.join("big.jsonl");
    {
        use std::io::Write as _;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&big).unwrap());
        let line = format!("{{\"junk\": \"{}\"}}\n", "x".repeat(1000));
        let mut written = 0;
        while written + line.len() <= 16 << 20 {
            f.write_all(line.as_bytes()).unwrap();
            written += line.len();
        }
    }
    let rss_before_kib = status_of(pid, "VmRSS:");
    // The peak from here on (the bombs' is behind us).
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    let flood: Vec<_> = (0..100)
        .map(|i| {
            let mut cmd = Command::new("curl");
            cmd.args([
                "-sS",
                "--max-time",
                "120",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .arg("--cacert")
            .arg(&c.ca)
            .args([
                "-H",
                "content-type: application/x-ndjson",
                "-H",
                &format!("authorization: Bearer {a_cred}"),
                "-H",
                &format!("x-sluice-batch: flood-{i}"),
                "-X",
                "POST",
                "-T",
            ])
            .arg(&big)
            .arg(format!("{}/api/v1/events", c.base))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
            cmd.spawn().unwrap()
        })
        .collect();
    let mut b_results = Vec::new();
    for i in 0..5 {
        let id = format!("b-during-{i}");
        let mut e = event(&id, now_ms(), "bob@corp.example");
        e["device"]["hostname"] = json!("laptop-b");
        b_results.push(post_events(&c, &b_cred, &id, &[e]));
    }
    let codes: Vec<u16> = flood
        .into_iter()
        .map(|ch| {
            let out = ch.wait_with_output().unwrap();
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .unwrap_or(0)
        })
        .collect();
    let hwm_kib = status_of(pid, "VmHWM:");
    let handled = codes.iter().filter(|&&s| s == 200).count();
    let refused = codes.iter().filter(|&&s| s == 429).count();
    eprintln!(
        "flood of 100 x 16 MiB: {handled} handled, {refused} refused (429); RSS {rss_before_kib} \
         KiB before, peak {hwm_kib} KiB"
    );
    // curl may report a refused upload as a failed transfer (the collector answers before
    // reading the body): the collector's own count says what it refused.
    let (_, _, text) = curl(
        &c,
        None,
        &[
            "-H",
            &format!("authorization: Bearer {token}"),
            &format!("{}/api/v1/status", c.base),
        ],
    );
    let st: Value = serde_json::from_str(&text).unwrap();
    let refused_agent = st["ingest_gate"]["refused_agent"].as_u64().unwrap() as usize;
    eprintln!("the collector refused {refused_agent} of A's posts for its share");
    assert_eq!(handled + refused_agent, 100, "{codes:?} {st}");
    assert!(refused_agent >= 50, "{refused_agent} of 100 refused");
    assert!(
        codes.iter().all(|&s| s == 200 || s == 429 || s == 0),
        "{codes:?}"
    );
    for (code, text) in &b_results {
        assert_eq!(*code, 200, "B's batch during A's flood: {text}");
    }
    // Two of A's batches at a time, each its body and its parse: far from 100 x 16 MiB.
    assert!(
        hwm_kib <= rss_before_kib + 256 * 1024,
        "peak {hwm_kib} KiB (before {rss_before_kib} KiB)"
    );
    let b_stored = search(&c, &token, "user:bob@corp.example");
    assert_eq!(b_stored.len(), 5, "{b_stored:?}");
    assert!(b_stored.iter().all(|e| e["device"]["uid"] == b_id.as_str()));
}

/// Credentials expire and the agent renews its own (the agent's renewal task against the real
/// collector) without a new enrollment: after twice the credential's life the agent still
/// posts, the credential it replaced works for the grace only, an agent that does not renew is
/// refused once its credential expires, and a revoked agent stops being served at once, a long
/// poll it held included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_expire_are_renewed_by_the_agent_and_revoked_at_once() {
    use sluice::report::{Target, enroll, renew};
    const LIFE_S: u64 = 6;
    let dir = TempDir::new("agent-credentials");
    let (cfg, port) = write_plain_config(
        &dir.0,
        &format!("[agents]\ncredential_lifetime_s = {LIFE_S}\n"),
    )
    .unwrap();
    let collector = run_collector(&dir.0, &cfg, port).unwrap();
    let c = Api::of(&collector);
    let admin = collector
        .cli(&["apitoken", "create", "--name", "soc"])
        .unwrap()
        .trim()
        .to_owned();

    // The agent enrolls as it does in `sluice enroll`.
    let state = dir.0.join("agent-state");
    let token = collector.cli(&["token", "create"]).unwrap();
    let enrolled = enroll::enroll(&state, &c.base, token.trim(), Some(&c.ca), false)
        .await
        .unwrap();
    let e = enroll::load(&state).unwrap().unwrap();
    let issued = e.credential_issued_at.unwrap();
    assert_eq!(
        e.credential_expires_at.map(|x| x - issued),
        Some(LIFE_S),
        "{e:?}"
    );
    let target = Target {
        collector: c.base.clone(),
        collector_ca: enrolled.collector_ca.clone(),
        credential_file: enroll::credential_path(&state),
        agent_id: enrolled.agent_id.clone(),
        fallbacks: Vec::new(),
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap().trim().to_owned();
    let first = read(&target.credential_file);
    let host = e.agent_id.clone();
    let post = |cred: &str, id: &str| {
        let (code, text) = post_events(&c, cred, id, &[event(id, now_ms(), "alice@corp.example")]);
        (code, text)
    };
    assert_eq!(post(&first, "cred-0").0, 200);

    let stop = tokio_util::sync::CancellationToken::new();
    let renewing = tokio::spawn(renew::keep_fresh(
        target.clone(),
        state.clone(),
        stop.clone(),
    ));
    // Renewed half way, without a new enrollment; and again.
    let mut seen = vec![first.clone()];
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2 * LIFE_S + 2) {
        let now = read(&target.credential_file);
        if !seen.contains(&now) {
            seen.push(now);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(seen.len() >= 3, "renewed {} times", seen.len() - 1);
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&target.credential_file)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    // Past twice the first credential's life: the current one is accepted, the first is not.
    let current = read(&target.credential_file);
    let (code, text) = tokio::task::block_in_place(|| post(&current, "cred-1"));
    assert_eq!(code, 200, "{text}");
    let (code, text) = tokio::task::block_in_place(|| post(&first, "cred-2"));
    assert_eq!(code, 401, "the first credential, long replaced: {text}");
    assert_eq!(enroll::load(&state).unwrap().unwrap().agent_id, host);

    // Revoked: refused at once, and a long poll held from before is answered with the refusal.
    let auth = format!("authorization: Bearer {current}");
    let (code, head, _) = curl(&c, None, &["-H", &auth, &format!("{}/api/v1/risk", c.base)]);
    assert_eq!(code, 200);
    let etag = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("etag:")
                .then(|| l[5..].trim().to_owned())
        })
        .unwrap();
    let poll = {
        let (c, auth) = (c.clone(), auth.clone());
        std::thread::spawn(move || {
            curl(
                &c,
                None,
                &[
                    "-H",
                    &auth,
                    "-H",
                    &format!("if-none-match: {etag}"),
                    "-H",
                    "prefer: wait=30",
                    &format!("{}/api/v1/risk", c.base),
                ],
            )
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    renewing.await.unwrap().unwrap();
    collector.cli(&["agent", "revoke", &host]).unwrap();
    let (code, text) = tokio::task::block_in_place(|| post(&current, "cred-3"));
    assert_eq!(code, 403, "a revoked agent's batch: {text}");
    // Something for the poll to wake on.
    let (code, _, text) = curl(
        &c,
        None,
        &[
            "-H",
            &format!("authorization: Bearer {admin}"),
            "-H",
            "content-type: application/json",
            "--data-binary",
            r#"{"level": "untrusted", "reason": "test"}"#,
            &format!("{}/api/v1/risk/devices/someone-else", c.base),
        ],
    );
    assert_eq!(code, 200, "{text}");
    let (code, _, text) = poll.join().unwrap();
    assert_eq!(code, 403, "the long poll of a revoked agent: {text}");

    // An agent that does not renew is refused once its credential's life is over.
    let token = collector.cli(&["token", "create"]).unwrap();
    let (_, lazy) = enroll_with(&c, token.trim(), "lazy-host");
    assert_eq!(tokio::task::block_in_place(|| post(&lazy, "lazy-0")).0, 200);
    tokio::time::sleep(Duration::from_secs(LIFE_S + 1)).await;
    let (code, text) = tokio::task::block_in_place(|| post(&lazy, "lazy-1"));
    assert_eq!(code, 401, "{text}");
    assert!(text.contains("expired"), "{text}");
}

/// Enrolls with a token made already: (agent id, credential).
fn enroll_with(c: &Api, token: &str, host: &str) -> (String, String) {
    let body = json!({"token": token, "hostname": host, "agent_version": "0.1.0"});
    let (code, _, text) = curl(
        c,
        None,
        &[
            "-H",
            "content-type: application/json",
            "--data-binary",
            &body.to_string(),
            &format!("{}/api/v1/enroll", c.base),
        ],
    );
    assert_eq!(code, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    (
        v["agent_id"].as_str().unwrap().to_owned(),
        v["credential"].as_str().unwrap().to_owned(),
    )
}

/// A bundle URL over plain HTTP to anything but the loopback is a configuration error that names
/// the setting; https:// and loopback http:// are accepted.
#[test]
fn an_http_bundle_url_off_the_loopback_is_refused_at_configuration() {
    let dir = TempDir::new("bundle-url");
    let check = |url: &str| {
        let cfg = dir.0.join("agent.toml");
        std::fs::write(
            &cfg,
            format!("[bundle]\nurl = \"{url}\"\npublic_key = \"/etc/sluice/bundle.pub.pem\"\n"),
        )
        .unwrap();
        Command::new(bin("sluice"))
            .args(["config", "check", "--config"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    for bad in [
        "http://bundles.corp.example/api/v1/bundles/current",
        "http://10.1.2.3:8443/b.tar.gz",
    ] {
        let out = check(bad);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad} accepted");
        assert!(
            err.contains("bundle.url") && err.contains("http:// is allowed only to the loopback"),
            "{err}"
        );
    }
    for good in [
        "https://collector.corp.example:8443/api/v1/bundles/current",
        "http://127.0.0.1:8181/b.tar.gz",
        "http://[::1]:8181/b.tar.gz",
    ] {
        let out = check(good);
        assert!(
            out.status.success(),
            "{good}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `portal.listen`: the portal and the admins' API on an address of their own, with HSTS; the
/// agents' API on `listen`, and neither serves the other's routes.
#[test]
fn the_portal_listens_apart_from_the_agents_api_with_hsts() {
    let dir = TempDir::new("portal-apart");
    let portal_port = sluice_e2e::free_port();
    let (cfg, port) = write_plain_config(
        &dir.0,
        &format!("[portal]\nlisten = \"127.0.0.1:{portal_port}\"\n"),
    )
    .unwrap();
    init(&cfg);
    let collector = run_collector(&dir.0, &cfg, port).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::read_to_string(
            dir.0.join("state/portal.addr")
        )
        .is_ok_and(|a| a.trim() == format!("127.0.0.1:{portal_port}"))),
        "portal.addr"
    );
    let agents = Api::of(&collector);
    let portal = Api {
        base: format!("https://127.0.0.1:{portal_port}"),
        ca: agents.ca.clone(),
    };
    let get = |api: &Api, path: &str| curl(api, None, &[&format!("{}{path}", api.base)]);
    // The portal: its pages, with HSTS, and the admins' API.
    let (code, head, body) = get(&portal, "/login");
    assert_eq!(code, 200, "{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("strict-transport-security: max-age=31536000"),
        "{head}"
    );
    assert_eq!(
        get(&portal, "/api/v1/events?q=").0,
        401,
        "the query API asks who"
    );
    // Not on the agents' listener.
    assert_eq!(get(&agents, "/login").0, 404);
    assert_eq!(get(&agents, "/api/v1/events?q=").0, 404);
    assert_eq!(get(&agents, "/api/v1/status").0, 404);
    // The agents' API: enrollment and ingestion on `listen` only.
    let (_, credential) = enroll(&collector, "laptop-apart");
    let (code, text) = post_events(
        &agents,
        &credential,
        "b1",
        &[event("apart-1", now_ms(), "a@x")],
    );
    assert_eq!(code, 200, "{text}");
    let (code, _) = post_events(
        &portal,
        &credential,
        "b2",
        &[event("apart-2", now_ms(), "a@x")],
    );
    assert_eq!(code, 404, "ingestion on the portal's listener");
    let token = collector.cli(&["token", "create"]).unwrap();
    let body = json!({"token": token.trim(), "hostname": "h", "agent_version": "0.1.0"});
    let (code, _, _) = curl(
        &portal,
        None,
        &[
            "-H",
            "content-type: application/json",
            "--data-binary",
            &body.to_string(),
            &format!("{}/api/v1/enroll", portal.base),
        ],
    );
    assert_eq!(code, 404, "enrollment on the portal's listener");
    // `sluice-collector status` asks the portal's listener.
    let out = collector.cli(&["status"]).unwrap();
    assert!(out.contains(": running for"), "{out}");
    assert!(out.contains("portal.addr"), "{out}");
}

/// `sluice` with `args`: (success, stdout, stderr).
fn sluice(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin("sluice"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The key ceremony exactly as the README gives it, with the real `sluice` and
/// `sluice-collector`: key A (the collector's `bundle_public_key`) introduces key B in revision
/// 43, B retires A in 44, after which the collector refuses a bundle signed by A; an expired
/// bundle and a text revision are refused with their own errors.
#[test]
fn the_key_ceremony_rotates_the_collectors_bundle_key_from_a_to_b() {
    let dir = TempDir::new("key-ceremony");
    let d = |p: &str| dir.0.join(p).display().to_string();
    for k in ["keys-a", "keys-b"] {
        let (ok, out, err) = sluice(&["keygen", "-o", &d(k)]);
        assert!(ok && out.contains("key id      k-"), "{out}{err}");
    }
    let (cfg, port) = write_plain_config(
        &dir.0,
        &format!(
            "bundle_public_key = \"{}\"\n",
            d("keys-a/bundle-signing.pub")
        ),
    )
    .unwrap();
    let collector = run_collector(&dir.0, &cfg, port).unwrap();
    let policies = sluice_e2e::demo_app::workspace_root().join("policies/default");
    let policies = policies.to_str().unwrap();
    let publish = |file: &str| {
        let out = Command::new(bin("sluice-collector"))
            .arg("--config")
            .arg(&cfg)
            .args(["bundle", "publish", file, "--group", "default"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let build_sign = |rev: &str, extra: &[&str], key: &str| -> String {
        let out = d(&format!("r{rev}.tar.gz"));
        let mut args = vec!["bundle", "build", policies, "-o", &out, "--revision", rev];
        args.extend_from_slice(extra);
        let (ok, o, e) = sluice(&args);
        assert!(ok, "build {rev}: {o}{e}");
        let key = d(key);
        let (ok, o, e) = sluice(&["bundle", "sign", &out, "--key", &key]);
        assert!(ok, "sign {rev}: {o}{e}");
        out
    };
    let b_pub = d("keys-b/bundle-signing.pub");
    let (_, a_kid, _) = sluice(&["bundle", "key-id", &d("keys-a/bundle-signing.pub")]);
    let a_kid = a_kid.trim().to_owned();
    // 43: A introduces B.
    let r43 = build_sign("43", &["--trust-key", &b_pub], "keys-a/bundle-signing.key");
    let (ok, err) = publish(&r43);
    assert!(ok, "{err}");
    // Before 43 was published, B's bundle would not have been; now 44, signed by B, retires A.
    let r44 = build_sign("44", &["--retire-key", &a_kid], "keys-b/bundle-signing.key");
    let (ok, out, err) = sluice(&["bundle", "verify", &r44, "--pub", &b_pub]);
    assert!(ok && out.contains("revision 44"), "{out}{err}");
    let (ok, err) = publish(&r44);
    assert!(ok, "{err}");
    // A is retired: its bundles are refused, by name.
    let r45 = build_sign("45", &[], "keys-a/bundle-signing.key");
    let (ok, err) = publish(&r45);
    assert!(!ok, "A's bundle published after A was retired");
    assert!(
        err.contains(&format!("key `{a_kid}`, which is not trusted")),
        "{err}"
    );
    // Expired: refused with its time.
    let r46 = build_sign("46", &["--expires-in", "1s"], "keys-b/bundle-signing.key");
    std::thread::sleep(Duration::from_millis(2100));
    let (ok, err) = publish(&r46);
    assert!(!ok && err.contains("expired at"), "{err}");
    // A text revision is refused when it is built.
    let (ok, _, err) = sluice(&[
        "bundle",
        "build",
        policies,
        "-o",
        &d("x.tar.gz"),
        "--revision",
        "46a",
    ]);
    assert!(!ok && err.contains("is not a whole number"), "{err}");
    // What the collector publishes: 43 and 44, nothing after.
    let out = collector.cli(&["bundle", "list"]).unwrap();
    let mut revisions: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    revisions.sort_unstable();
    assert_eq!(revisions, ["43", "44"], "{out}");
}

/// An agent reporting its bundle stale (past its signed expiry, still enforced) is marked so on
/// the portal's device list; one whose bundle is fresh is not.
#[test]
fn the_portal_shows_a_device_whose_bundle_is_stale() {
    let dir = TempDir::new("stale-bundle");
    let (cfg, port) = write_plain_config(&dir.0, "").unwrap();
    let password = init(&cfg);
    let collector = run_collector(&dir.0, &cfg, port).unwrap();
    let c = Api::of(&collector);
    for (host, stale) in [("laptop-stale", true), ("laptop-fresh", false)] {
        let (id, cred) = enroll(&collector, host);
        let mut e = event(&format!("status-{host}"), now_ms(), "");
        e["class_uid"] = json!(5001);
        e["class_name"] = json!("Device Inventory Info");
        e["category_uid"] = json!(5);
        e["activity_id"] = json!(2);
        e["type_uid"] = json!(500_102);
        e["device"] = json!({"uid": id, "hostname": host, "posture": "managed", "os": "Linux",
                             "agent_version": "0.1.0", "bundle_revision": "7"});
        e["agent_status"] = json!({"state": "running", "steering": true, "proxy": true,
            "spool_events": 0, "spool_dropped": 0, "spool_corrupt": 0,
            "bundle_expires_at": 1000, "bundle_stale": stale});
        e.as_object_mut().unwrap().remove("sluice");
        e.as_object_mut().unwrap().remove("actor");
        let (code, text) = post_events(&c, &cred, host, &[e]);
        assert_eq!(code, 200, "{text}");
    }
    let (code, head) = sign_in(&c, "127.0.0.1", "admin", &password);
    assert_eq!(code, 303, "{head}");
    let session = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("set-cookie: __host-sluice-session=")
                .then(|| {
                    l.split_once('=')
                        .unwrap()
                        .1
                        .split(';')
                        .next()
                        .unwrap()
                        .to_owned()
                })
        })
        .unwrap();
    let (code, _, page) = curl(
        &c,
        None,
        &[
            "-H",
            &format!("cookie: __Host-sluice-session={session}"),
            &format!("{}/devices", c.base),
        ],
    );
    assert_eq!(code, 200);
    let row = |host: &str| {
        page.split("<tr>")
            .find(|r| r.contains(host))
            .unwrap_or_else(|| panic!("{host} not listed: {page}"))
            .to_owned()
    };
    assert!(
        row("laptop-stale").contains("stale bundle"),
        "{}",
        row("laptop-stale")
    );
    assert!(
        !row("laptop-fresh").contains("stale bundle"),
        "{}",
        row("laptop-fresh")
    );
}
