//! The activity log end to end with the real parts: `sluice-collector` (SQLite, HTTPS), the agent
//! (`sluice run`, steering a test cgroup) enrolled with a one-time token and fetching its bundle
//! from the collector, curl in the cgroup against the demo app. The collector goes away for a
//! minute during traffic and comes back; the agent is killed with SIGKILL during a burst and
//! restarted. Every event the agent recorded before the kill, during the outage and after the
//! restart is stored exactly once; nothing is stored twice or invented.
#![allow(clippy::unwrap_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use sluice_e2e::{
    Agent, InCgroup, LineServer, TempDir, TestCgroup, bin,
    demo_app::{self, DemoApp, DemoOptions},
    free_port, require_root, wait_until,
};

const APP_IP: &str = "127.0.0.43";
/// A steered destination that is no app: what goes there is spliced.
const OTHER_IP: &str = "127.0.0.44";

fn run(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Collector {
    cfg: PathBuf,
    port: u16,
    log: PathBuf,
    child: Option<Child>,
}

impl Collector {
    fn start(&mut self) {
        let child = Command::new(bin("sluice-collector"))
            .args(["run", "--config"])
            .arg(&self.cfg)
            .stdout(Stdio::null())
            .stderr(
                fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.log)
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        self.child = Some(child);
        let port = self.port;
        assert!(
            wait_until(Duration::from_secs(20), || TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "collector did not listen: {}",
            fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }

    fn cli(&self, args: &[&str]) -> String {
        run(Command::new(bin("sluice-collector"))
            .arg("--config")
            .arg(&self.cfg)
            .args(args))
    }

    /// The ids of the stored activity events (class http and file), with their counts.
    fn stored(&self) -> BTreeMap<String, u32> {
        let mut m = BTreeMap::new();
        for line in self
            .cli(&["query", "class:http,file", "--format", "jsonl"])
            .lines()
        {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            *m.entry(v["id"].as_str().unwrap().to_owned()).or_default() += 1;
        }
        m
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The ids in the agent's events file, in order.
fn recorded(events: &Path) -> Vec<String> {
    fs::read_to_string(events)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["id"].as_str().map(str::to_owned))
        .collect()
}

/// `n` requests from one curl process in the cgroup (keep-alive), each an activity event.
struct Client<'a> {
    app: &'a DemoApp,
    cgroup: PathBuf,
    work: &'a Path,
    ca: PathBuf,
    token: String,
}

fn traffic(c: &Client<'_>, tag: &str, n: usize) -> Child {
    let (app, client, ca, token) = (c.app, c.cgroup.as_path(), c.ca.as_path(), c.token.as_str());
    let list = c.work.join(format!("urls-{tag}.txt"));
    let mut text = String::new();
    for i in 0..n {
        text.push_str(&format!(
            "url = \"{}/api/files?{tag}={i}\"\noutput = \"/dev/null\"\n",
            app.base_url()
        ));
    }
    fs::write(&list, text).unwrap();
    let args: Vec<String> = vec![
        "-sS".into(),
        "--max-time".into(),
        "5".into(),
        "--resolve".into(),
        format!("{}:{}:{APP_IP}", demo_app::HOST, app.addr().port()),
        "--cacert".into(),
        ca.display().to_string(),
        "-H".into(),
        format!("Cookie: {}={token}", demo_app::COOKIE),
        "-K".into(),
        list.display().to_string(),
    ];
    InCgroup::at(client)
        .command(Path::new("/usr/bin/curl"), &args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits until every id of `want` is stored; returns what is stored.
fn delivered(c: &Collector, want: &[String], within: Duration) -> BTreeMap<String, u32> {
    let mut stored = BTreeMap::new();
    wait_until(within, || {
        stored = c.stored();
        want.iter().all(|id| stored.contains_key(id))
    });
    stored
}

#[test]
#[ignore = "needs root"]
fn a_collector_outage_and_a_killed_agent_lose_and_double_nothing() {
    require_root();
    let dir = TempDir::new("activity-log");
    let outage = Duration::from_secs(
        std::env::var("SLUICE_OUTAGE_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    );

    // The collector, with the bundle key, and the default bundle published on it; it forwards
    // to a syslog receiver of the test's.
    let (key, _, public) = sluice_policy::bundle::jws::SigningKey::generate().unwrap();
    let public_path = dir.join("bundle.pub");
    fs::write(&public_path, public).unwrap();
    let syslog = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let syslog_addr = syslog.local_addr().unwrap();
    let syslog_bytes = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    {
        let sink = syslog_bytes.clone();
        std::thread::spawn(move || {
            for conn in syslog.incoming() {
                let Ok(mut conn) = conn else { return };
                let sink = sink.clone();
                std::thread::spawn(move || {
                    use std::io::Read as _;
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 {
                            return;
                        }
                        sink.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                });
            }
        });
    }
    let port = free_port();
    let state = dir.join("collector");
    let cfg = dir.join("collector.toml");
    fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{port}\"\nstate_dir = \"{}\"\nbundle_public_key = \"{}\"\n\
             [[forward.syslog]]\naddress = \"{syslog_addr}\"\n",
            state.display(),
            public_path.display()
        ),
    )
    .unwrap();
    let mut collector = Collector {
        cfg,
        port,
        log: dir.join("collector.log"),
        child: None,
    };
    let init = collector.cli(&["init"]);
    let admin_password = init
        .lines()
        .find_map(|l| l.strip_prefix("password (shown once): "))
        .expect("init printed the admin password")
        .trim()
        .to_owned();
    let mut archive = sluice_policy::bundle::build(
        &demo_app::workspace_root().join("policies/default"),
        Some("3"),
    )
    .unwrap();
    archive.sign(&key).unwrap();
    let bundle = dir.join("bundle.tar.gz");
    fs::write(&bundle, archive.write().unwrap()).unwrap();
    collector.cli(&[
        "bundle",
        "publish",
        bundle.to_str().unwrap(),
        "--group",
        "default",
    ]);
    collector.start();
    // The collector's state is its own (0700): the agent's proxy reads a copy of its CA.
    let collector_ca = sluice_e2e::readable_copy(
        &state.join("tls/ca.pem"),
        &state.parent().unwrap().join("collector-ca.pem"),
    )
    .unwrap();
    let url = format!("https://127.0.0.1:{port}");

    // The demo app and the agent, enrolled with a one-time token.
    let mut opts = DemoOptions::tls().unwrap();
    opts.listen = format!("{APP_IP}:0").parse().unwrap();
    let app = DemoApp::start(opts).unwrap();
    let other =
        LineServer::start(format!("{OTHER_IP}:0").parse().unwrap(), |_| "other".into()).unwrap();
    let cg = TestCgroup::new("actlog");
    let agent_dir = dir.join("agent");
    fs::create_dir_all(&agent_dir).unwrap();
    let events = agent_dir.join("events.jsonl");
    let config = format!(
        r#"
state_dir = "{state}"
[steer]
cgroup = "{cg}"
agent_cgroup = "{cg}/agent"
include = [{{ cidr = "{APP_IP}/32", ports = [{app_port}] }}, {{ cidr = "{OTHER_IP}/32", ports = [{other_port}] }}]
[proxy]
port = 0
[admin]
listen = "127.0.0.1:0"
[tls]
upstream_extra_cas = ["{app_ca}"]
no_system_roots = true
no_bundled_roots = true
[bundle]
url = "{url}/api/v1/bundles/current"
public_key = "{public}"
long_poll_s = 5
[report]
events_file = "{events}"
retry_max_ms = 5000
status_interval_s = 5
"#,
        state = agent_dir.join("state").display(),
        cg = cg.rel,
        app_port = app.addr().port(),
        other_port = other.addr.port(),
        app_ca = app.ca_file().unwrap().display(),
        public = public_path.display(),
        events = events.display(),
    );
    let agent_cfg = agent_dir.join("agent.toml");
    fs::write(&agent_cfg, &config).unwrap();
    let token = collector.cli(&["token", "create", "--group", "default"]);
    let token_file = agent_dir.join("enroll.token");
    fs::write(&token_file, token.trim()).unwrap();
    run(Command::new(bin("sluice"))
        .args(["enroll", "--config"])
        .arg(&agent_cfg)
        .args(["--collector", &url, "--token-file"])
        .arg(&token_file)
        .arg("--ca")
        .arg(&collector_ca));
    // The token was for one use.
    let again = Command::new(bin("sluice"))
        .args(["enroll", "--force", "--config"])
        .arg(&agent_cfg)
        .args(["--collector", &url, "--token-file"])
        .arg(&token_file)
        .arg("--ca")
        .arg(&collector_ca)
        .output()
        .unwrap();
    assert!(!again.status.success());

    let start_agent = || {
        let a = Agent::launch(&config, &agent_dir).unwrap();
        assert!(
            wait_until(Duration::from_secs(30), || a
                .status()
                .is_ok_and(|s| s["bundle"]["revision"].as_str() == Some("3"))),
            "the bundle did not come from the collector: {:?}",
            a.status()
        );
        a
    };
    let mut agent = start_agent();
    let out = run(Command::new(bin("sluice"))
        .args(["ca", "export", "--config"])
        .arg(&agent_cfg));
    let ca = dir.join("sluice-ca.pem");
    fs::write(&ca, out).unwrap();
    let (_, cgroup) = cg.child("client");
    let client = Client {
        app: &app,
        cgroup,
        work: &dir,
        ca,
        token: app.token_for("alice@corp.example").unwrap(),
    };

    // Traffic with the collector up, then during a minute without it.
    assert!(traffic(&client, "a", 200).wait().unwrap().success());
    collector.stop();
    let mut during = traffic(&client, "b", 300);
    std::thread::sleep(outage);
    assert!(during.wait().unwrap().success());
    let before_kill = recorded(&events);
    assert!(
        before_kill.len() >= 500,
        "{} events recorded",
        before_kill.len()
    );
    let status = agent.status().unwrap();
    assert!(
        status["report"]["spool"]["events"].as_u64().unwrap_or(0) >= 300,
        "the outage's events wait in the spool: {status}"
    );
    collector.start();
    let stored = delivered(&collector, &before_kill, Duration::from_secs(90));
    let missing: Vec<_> = before_kill
        .iter()
        .filter(|i| !stored.contains_key(*i))
        .collect();
    assert!(missing.is_empty(), "{} events never arrived", missing.len());
    // Each acknowledgement says where the collector saw the agent from: its public address.
    let status = agent.status().unwrap();
    assert_eq!(status["location"]["public"], "127.0.0.1", "{status}");
    // The sandboxed proxy hears the kernel's announcements of network changes.
    assert_eq!(status["location"]["watch"], "announcements", "{status}");

    // A burst of 10,000, with the agent killed in the middle of it, then restarted.
    let mut burst = traffic(&client, "c", 10_000);
    std::thread::sleep(Duration::from_secs(2));
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    let _ = burst.kill();
    let _ = burst.wait();
    let after_kill = recorded(&events).len();
    assert!(after_kill > before_kill.len(), "the burst recorded nothing");
    drop(agent);
    let agent = start_agent();
    let restart_mark = recorded(&events).len();
    assert!(traffic(&client, "d", 200).wait().unwrap().success());
    let all = recorded(&events);
    let after_restart: Vec<String> = all[restart_mark..].to_vec();
    assert!(after_restart.len() >= 200);
    let stored = delivered(&collector, &after_restart, Duration::from_secs(90));
    let missing: Vec<_> = after_restart
        .iter()
        .filter(|i| !stored.contains_key(*i))
        .collect();
    assert!(
        missing.is_empty(),
        "{} events after the restart never arrived",
        missing.len()
    );

    // Exactly once: no id twice; everything recorded before the kill is there; nothing the
    // agent did not record.
    let twice: Vec<_> = stored.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "stored twice: {twice:?}");
    assert!(before_kill.iter().all(|i| stored.contains_key(i)));
    let recorded_set: BTreeSet<&String> = all.iter().collect();
    let invented: Vec<_> = stored
        .keys()
        .filter(|k| !recorded_set.contains(k))
        .collect();
    assert!(
        invented.is_empty(),
        "stored but never recorded: {invented:?}"
    );
    // The burst's events that reached the spool before the kill were shipped after the restart.
    let burst_ids = &all[before_kill.len()..restart_mark];
    let burst_stored = burst_ids.iter().filter(|i| stored.contains_key(*i)).count();
    assert!(
        burst_stored > 0,
        "none of the burst's {} events arrived",
        burst_ids.len()
    );
    eprintln!(
        "recorded {} events; stored {}; burst: {} recorded, {} stored (the rest were not yet \
         spooled when the agent was killed)",
        all.len(),
        stored.len(),
        burst_ids.len(),
        burst_stored
    );

    // What the proxy did not inspect reaches the collector too, with who, where and why: a
    // connection to a steered destination that is no app (spliced), and plain bytes to the
    // app's TLS port (refused: the address is the app's).
    let inside = InCgroup::at(&client.cgroup);
    let line = inside
        .run(
            &bin("sluice-probe"),
            &["tcp".into(), other.addr.to_string()],
        )
        .unwrap();
    assert_eq!(line.trim(), "other");
    let plain = inside.run(
        Path::new("/usr/bin/curl"),
        &[
            "-sS".into(),
            "--max-time".into(),
            "10".into(),
            format!("http://{APP_IP}:{}/files", app.addr().port()),
        ],
    );
    assert!(
        plain.is_err(),
        "plain HTTP to the app's TLS port was answered: {plain:?}"
    );
    let mut found = (None, None);
    wait_until(Duration::from_secs(30), || {
        let out = collector.cli(&["query", "class:network", "--format", "jsonl"]);
        for l in out.lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            match v["sluice"]["action"].as_str() {
                Some("spliced") => found.0 = Some(v),
                Some("refused") => found.1 = Some(v),
                _ => {}
            }
        }
        found.0.is_some() && found.1.is_some()
    });
    let spliced = found
        .0
        .expect("a spliced connection event at the collector");
    assert_eq!(spliced["sluice"]["detail"], "server_first", "{spliced}");
    assert_eq!(spliced["dst_endpoint"]["ip"], OTHER_IP, "{spliced}");
    assert_eq!(
        spliced["actor"]["process"]["name"], "sluice-probe",
        "{spliced}"
    );
    // The executable and the user's name: what the proxy cannot read itself, asked of the
    // privileged part once per process.
    assert_eq!(
        spliced["actor"]["process"]["path"].as_str().map(Path::new),
        Some(bin("sluice-probe").as_path()),
        "{spliced}"
    );
    assert_eq!(spliced["actor"]["process"]["user"], "root", "{spliced}");
    let refused = found
        .1
        .expect("a refused connection event at the collector");
    assert_eq!(
        refused["sluice"]["detail"], "not_tls_to_app_address",
        "{refused}"
    );
    assert_eq!(refused["actor"]["process"]["name"], "curl", "{refused}");
    assert_eq!(refused["class_uid"], 4001, "{refused}");

    // The device is in the inventory with its posture.
    let devices = collector.cli(&["agent", "list"]);
    assert!(!devices.trim().is_empty());

    // A pre-signed link and a token in a URL: redacted in the agent's events file and log, the
    // collector's store, the portal, the export and the syslog output.
    const SECRETS: [&str; 3] = ["SECRETSIG1", "SECRETAMZ2", "SECRETTOK3"];
    let secret_url = format!(
        "{}/api/files?sig={}&X-Amz-Signature={}&token={}&page=77",
        app.base_url(),
        SECRETS[0],
        SECRETS[1],
        SECRETS[2]
    );
    let args: Vec<String> = vec![
        "-sS".into(),
        "--max-time".into(),
        "5".into(),
        "-o".into(),
        "/dev/null".into(),
        "--resolve".into(),
        format!("{}:{}:{APP_IP}", demo_app::HOST, app.addr().port()),
        "--cacert".into(),
        client.ca.display().to_string(),
        "-H".into(),
        format!("Cookie: {}={}", demo_app::COOKIE, client.token),
        secret_url,
    ];
    assert!(
        InCgroup::at(&client.cgroup)
            .command(Path::new("/usr/bin/curl"), &args)
            .status()
            .unwrap()
            .success()
    );
    let mut exported = String::new();
    assert!(
        wait_until(Duration::from_secs(30), || {
            exported = collector.cli(&["query", "page=77", "--format", "jsonl"]);
            exported.contains("page=77")
        }),
        "the event with the secret URL did not reach the collector"
    );
    let csv = collector.cli(&["query", "page=77", "--format", "csv"]);
    let stored: serde_json::Value = serde_json::from_str(exported.lines().next().unwrap()).unwrap();
    let stored_url = stored["http_request"]["url"].as_str().unwrap().to_owned();
    assert!(
        stored_url.ends_with("?sig=REDACTED&X-Amz-Signature=REDACTED&token=REDACTED&page=77"),
        "{stored_url}"
    );
    // The portal's page of the event, signed in as the admin.
    let cookie = dir.join("portal.cookies");
    let form = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    run(Command::new("curl")
        .args(["-sS", "--max-time", "20", "-o", "/dev/null", "--cacert"])
        .arg(&collector_ca)
        .arg("-c")
        .arg(&cookie)
        .args([
            "-H",
            &format!("cookie: __Host-sluice-login={form}"),
            "--data-urlencode",
            &format!("csrf={form}"),
            "--data-urlencode",
            "user=admin",
            "--data-urlencode",
            &format!("password={admin_password}"),
            &format!("{url}/login"),
        ]));
    let page = run(Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "20", "--cacert"])
        .arg(&collector_ca)
        .arg("-b")
        .arg(&cookie)
        .arg(format!("{url}/events/{}", stored["id"].as_str().unwrap())));
    assert!(
        page.contains("sig=REDACTED"),
        "the portal's event page: {page}"
    );
    let mut forwarded = String::new();
    assert!(
        wait_until(Duration::from_secs(20), || {
            forwarded = String::from_utf8_lossy(&syslog_bytes.lock().unwrap()).into_owned();
            forwarded.contains("page=77")
        }),
        "the event was not forwarded to syslog"
    );
    assert!(forwarded.contains("X-Amz-Signature=REDACTED"));
    let agent_events = fs::read_to_string(&events).unwrap();
    assert!(agent_events.contains("page=77") && agent_events.contains("token=REDACTED"));
    let agent_log = fs::read_to_string(&agent.log).unwrap_or_default();
    for s in SECRETS {
        for (where_, text) in [
            ("the collector's store and export", &exported),
            ("the CSV export", &csv),
            ("the portal", &page),
            ("the syslog output", &forwarded),
            ("the agent's events file", &agent_events),
            ("the agent's log", &agent_log),
        ] {
            assert!(!text.contains(s), "{s} in {where_}");
        }
    }
    drop(agent);
}
