//! The portal in headless Chromium against the real `sluice-collector` binary: events ingested
//! through the agent API (enrollment, gzip JSON Lines batch), then a person's session: sign in,
//! filter by user and action, open an event, export CSV, save a query, see a bad query's error,
//! devices and bundles, sign out; a screenshot of the filtered log is taken and checked together
//! with the table's rows at that moment. Once on SQLite, once on PostgreSQL (a cluster of the
//! test's own from Debian's packages). Needs the workspace binaries (`cargo build --bins`),
//! Chromium and certutil (`cargo xtask setup`), not root.

#![allow(clippy::unwrap_used)]

use std::{
    fs,
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use sluice_collector::store::cluster::LocalCluster;
use sluice_e2e::{
    TempDir, bin,
    browser::{Browser, Cdp, png_size},
    wait_until,
};

struct Collector {
    child: Child,
    base: String,
    ca: std::path::PathBuf,
    cfg: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `init` (returns the admin password) and `run` in `dir`, on PostgreSQL `postgres` when given.
fn start_collector(dir: &Path, postgres: Option<&str>) -> Result<(Collector, String)> {
    let state = dir.join("state");
    let cfg = dir.join("collector.toml");
    let mut text = format!(
        "listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n",
        state.display()
    );
    if let Some(conninfo) = postgres {
        text.push_str(&format!("[store]\npostgres = {conninfo:?}\n"));
    }
    fs::write(&cfg, text)?;
    let out = run(Command::new(bin("sluice-collector"))
        .args(["init", "--config"])
        .arg(&cfg))?;
    let password = out
        .lines()
        .find_map(|l| l.strip_prefix("password (shown once): "))
        .context("init printed no password")?
        .trim()
        .to_owned();
    let log = dir.join("collector.log");
    let child = Command::new(bin("sluice-collector"))
        .args(["run", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log)?)
        .spawn()?;
    // Any port: the collector says which in <state_dir>/listen.addr once it listens.
    let announced = state.join("listen.addr");
    let mut addr = None;
    let up = wait_until(Duration::from_secs(20), || {
        addr = fs::read_to_string(&announced)
            .ok()
            .and_then(|s| s.trim().parse::<std::net::SocketAddr>().ok());
        addr.is_some_and(|a| TcpStream::connect(a).is_ok())
    });
    let c = Collector {
        child,
        base: format!(
            "https://{}",
            addr.map(|a| a.to_string()).unwrap_or_default()
        ),
        ca: state.join("tls/ca.pem"),
        cfg,
        log,
    };
    if !up {
        bail!(
            "the collector did not listen: {}",
            fs::read_to_string(&c.log).unwrap_or_default()
        );
    }
    Ok((c, password))
}

fn curl(c: &Collector, args: &[&str]) -> Result<String> {
    run(Command::new("curl")
        .args(["-sS", "--fail-with-body", "--max-time", "20", "--cacert"])
        .arg(&c.ca)
        .args(args))
}

struct Ev<'a> {
    user: &'a str,
    activity: &'a str,
    action: &'a str,
    file: Option<&'a str>,
    minutes_ago: u64,
}

fn event(id: &str, now_ms: u64, e: &Ev<'_>) -> Value {
    let (class, activity_id) = match e.activity {
        "upload" => (6006, 1),
        "download" => (6006, 2),
        _ => (4002, 3),
    };
    let mut v = json!({
        "id": id,
        "schema": 1,
        "time": now_ms - e.minutes_ago * 60_000,
        "class_uid": class,
        "class_name": if class == 6006 { "File Hosting Activity" } else { "HTTP Activity" },
        "category_uid": class / 1000,
        "activity_id": activity_id,
        "activity_name": e.activity,
        "type_uid": class * 100 + activity_id,
        "severity_id": if e.action == "block" { 3 } else { 1 },
        "message": format!("{} {} on files", e.user, e.activity),
        "device": {"uid": "spoofed", "hostname": "laptop-7", "posture": "managed",
                   "os": "Linux 6.1", "agent_version": "0.1.0", "bundle_revision": "r1"},
        "actor": {"user": {"email_addr": e.user, "groups": ["staff"]},
                  "process": {"pid": 4242, "name": "curl", "uid": 1000}},
        "src_endpoint": {"ip": "10.1.2.3"},
        "http_request": {"http_method": if e.activity == "upload" { "POST" } else { "GET" },
                         "url": "https://files.test/files"},
        "sluice": {"app": "files", "activity": e.activity, "action": e.action,
                   "decided_by": "session", "policy": format!("{}-{}", e.activity, e.action),
                   "incident": format!("inc-{id}")},
    });
    if let Some(f) = e.file {
        v["files"] = json!([{"name": f, "size": 1234, "sha256": ""}]);
    }
    v
}

/// Enrolls an agent and ingests a batch through `POST /api/v1/events`; returns (agent id, ids).
fn ingest(c: &Collector, dir: &Path) -> Result<(String, Vec<(String, Value)>)> {
    let token = run(Command::new(bin("sluice-collector"))
        .args(["token", "create", "--config"])
        .arg(&c.cfg))?
    .trim()
    .to_owned();
    let enrolled: Value = serde_json::from_str(&curl(
        c,
        &[
            "-H",
            "content-type: application/json",
            "--data",
            &json!({"token": token, "hostname": "laptop-7", "agent_version": "0.1.0"}).to_string(),
            &format!("{}/api/v1/enroll", c.base),
        ],
    )?)?;
    let agent = enrolled["agent_id"]
        .as_str()
        .context("agent_id")?
        .to_owned();
    let credential = enrolled["credential"]
        .as_str()
        .context("credential")?
        .to_owned();

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let mut events = Vec::new();
    // Alice's three blocked uploads: what the filter must find, newest first.
    for (i, f) in ["q3-plan.docx", "payroll.xlsx", "roadmap.pdf"]
        .iter()
        .enumerate()
    {
        let id = format!("evt-alice-block-{i}");
        let e = event(
            &id,
            now,
            &Ev {
                user: "alice@corp.example",
                activity: "upload",
                action: "block",
                file: Some(f),
                minutes_ago: 10 + i as u64,
            },
        );
        events.push((id, e));
    }
    // Noise around them: other users, other actions, enough to need a second page.
    for i in 0..57u64 {
        let (user, activity, action) = match i % 4 {
            0 => ("alice@corp.example", "download", "allow"),
            1 => ("bob@corp.example", "upload", "block"),
            2 => ("carol@partner.example", "download", "protect"),
            _ => ("bob@corp.example", "view", "monitor"),
        };
        let id = format!("evt-noise-{i}");
        let e = event(
            &id,
            now,
            &Ev {
                user,
                activity,
                action,
                file: (activity != "view").then_some("notes.txt"),
                minutes_ago: 1 + i * 7,
            },
        );
        events.push((id, e));
    }
    let mut posture = event(
        "evt-posture-1",
        now,
        &Ev {
            user: "",
            activity: "other",
            action: "",
            file: None,
            minutes_ago: 0,
        },
    );
    posture["class_uid"] = json!(5001);
    posture["class_name"] = json!("Device Inventory Info");
    posture["category_uid"] = json!(5);
    posture["activity_id"] = json!(2);
    posture["type_uid"] = json!(500_102);
    posture["posture"] = json!({"posture": "managed", "kernel": "6.1.0", "os_name": "Debian GNU/Linux 12", "uptime_s": 100});
    posture["agent_status"] = json!({"state": "running", "steering": true, "proxy": true,
        "spool_events": 0, "spool_dropped": 0, "spool_corrupt": 0});
    posture.as_object_mut().unwrap().remove("sluice");
    posture.as_object_mut().unwrap().remove("actor");

    let mut body = String::new();
    for (_, e) in &events {
        body.push_str(&e.to_string());
        body.push('\n');
    }
    body.push_str(&posture.to_string());
    body.push('\n');
    let plain = dir.join("batch.jsonl");
    fs::write(&plain, body)?;
    run(Command::new("gzip").arg("-kf").arg(&plain))?;
    let answer: Value = serde_json::from_str(&curl(
        c,
        &[
            "-H",
            "content-encoding: gzip",
            "-H",
            "content-type: application/x-ndjson",
            "-H",
            &format!("authorization: Bearer {credential}"),
            "-H",
            "x-sluice-batch: portal-test-1",
            "--data-binary",
            &format!("@{}.gz", plain.display()),
            &format!("{}/api/v1/events", c.base),
        ],
    )?)?;
    assert_eq!(answer["accepted"], events.len() as u64 + 1, "{answer}");
    assert_eq!(answer["rejected"], 0, "{answer}");
    Ok((agent, events))
}

/// The rows of the activity table: (time, user, app, activity, action, policy, file, device).
fn table_rows(cdp: &mut Cdp) -> Vec<Vec<String>> {
    let v = cdp
        .eval(
            "[...document.querySelectorAll('#events tbody tr')].filter(r => r.cells.length === 8)\
             .map(r => [...r.cells].map(c => c.innerText.trim()))",
        )
        .unwrap();
    serde_json::from_value(v).unwrap()
}

#[test]
fn portal_in_a_real_browser_on_sqlite() {
    portal_in_a_real_browser(false);
}

#[test]
fn portal_in_a_real_browser_on_postgresql() {
    portal_in_a_real_browser(true);
}

fn portal_in_a_real_browser(postgres: bool) {
    let dir = TempDir::new(if postgres {
        "portal-e2e-pg"
    } else {
        "portal-e2e"
    });
    let pg = postgres.then(|| {
        let pg = LocalCluster::start(&dir.0.join("pg"), 5432, &[("fsync", "off")]).unwrap();
        pg.create_database("sluice").unwrap();
        pg
    });
    let conninfo = pg.as_ref().map(|p| p.conninfo("sluice"));
    let (c, password) = start_collector(&dir, conninfo.as_deref()).unwrap();
    let (agent, events) = ingest(&c, &dir).unwrap();

    let mut b = Browser::new(&dir.join("profile"), Some(&c.ca)).unwrap();
    b.window_size(1280, 900);
    let mut cdp = Cdp::launch(&b).unwrap();

    // Signed out, the log sends the browser to the sign-in form.
    cdp.navigate(&format!("{}/events", c.base)).unwrap();
    assert!(
        cdp.url().unwrap().ends_with("/login"),
        "{}",
        cdp.url().unwrap()
    );

    // A wrong password is refused on the page.
    cdp.fill("input[name=user]", "admin").unwrap();
    cdp.fill("input[name=password]", "not the password")
        .unwrap();
    cdp.click_and_wait_load("button[type=submit]").unwrap();
    assert!(
        cdp.text(".error")
            .unwrap()
            .contains("Wrong name or password"),
        "{}",
        cdp.html().unwrap()
    );

    // Sign in.
    cdp.fill("input[name=user]", "admin").unwrap();
    cdp.fill("input[name=password]", &password).unwrap();
    cdp.click_and_wait_load("button[type=submit]").unwrap();
    assert!(
        cdp.url().unwrap().ends_with("/events"),
        "{}",
        cdp.url().unwrap()
    );
    // The session cookie is not readable by scripts (HttpOnly).
    assert_eq!(cdp.eval("document.cookie").unwrap(), "");

    // Unfiltered: the newest 50 of 63 events (60 activities, 1 posture report and the two
    // sign-in attempts above, audit events of the portal), an "older" link to the rest.
    let rows = table_rows(&mut cdp);
    assert_eq!(rows.len(), 50);
    let audit: Vec<&Vec<String>> = rows.iter().filter(|r| r[2] == "portal").collect();
    assert_eq!(audit.len(), 2, "{rows:?}");
    assert!(
        audit.iter().all(|r| r[1] == "admin" && r[3] == "login"),
        "{audit:?}"
    );
    let mut actions: Vec<&str> = audit.iter().map(|r| r[4].as_str()).collect();
    actions.sort_unstable();
    assert_eq!(actions, ["allow", "block"]);
    assert!(cdp.eval("!!document.getElementById('older')").unwrap() == true);
    cdp.click_and_wait_load("#older").unwrap();
    assert_eq!(table_rows(&mut cdp).len(), 13);
    // The chart is drawn on the server: one SVG with bars.
    let bars = cdp
        .eval("document.querySelectorAll('svg.chart rect.act').length")
        .unwrap();
    assert!(bars.as_u64().unwrap() > 0, "{bars}");

    // Filter by user and action with the form's fields.
    cdp.navigate(&format!("{}/events", c.base)).unwrap();
    cdp.fill("input[name=user]", "alice@corp.example").unwrap();
    cdp.fill("select[name=action]", "block").unwrap();
    cdp.click_and_wait_load("form.filters button[type=submit]")
        .unwrap();
    let rows = table_rows(&mut cdp);
    let files: Vec<&str> = rows.iter().map(|r| r[6].as_str()).collect();
    assert_eq!(
        files,
        ["q3-plan.docx", "payroll.xlsx", "roadmap.pdf"],
        "{rows:?}"
    );
    for r in &rows {
        assert_eq!(r[1], "alice@corp.example");
        assert_eq!(r[2], "files");
        assert_eq!(r[3], "upload");
        assert_eq!(r[4], "block");
        assert_eq!(r[5], "upload-block");
        assert_eq!(r[7], "laptop-7");
    }
    assert!(cdp.eval("!document.getElementById('older')").unwrap() == true);

    // The screenshot of exactly this state, and the rows the page showed when it was taken.
    let png = dir.join("portal-activity.png");
    let size = cdp.screenshot(&png).unwrap();
    assert_eq!(size, (1280, 900));
    assert_eq!(png_size(&png).unwrap(), (1280, 900));
    let png_bytes = fs::metadata(&png).unwrap().len();
    assert!(
        png_bytes > 20_000,
        "a page with a table and a chart: {png_bytes} bytes"
    );
    let shown = cdp.text("#events").unwrap();
    for f in ["q3-plan.docx", "payroll.xlsx", "roadmap.pdf"] {
        assert!(shown.contains(f), "{shown}");
    }
    assert!(!shown.contains("notes.txt"), "{shown}");
    if let Ok(keep) = std::env::var("SLUICE_PORTAL_SCREENSHOT") {
        fs::copy(&png, keep).unwrap();
    }

    // Export CSV with the page's own link (same query, the session's cookie).
    let href = cdp
        .eval("document.getElementById('export-csv').href")
        .unwrap();
    let href = href.as_str().unwrap().to_owned();
    assert!(href.contains("format=csv"), "{href}");
    // The portal's content security policy lets no page script fetch anything, so the link is
    // fetched with the browser's own session cookie (HttpOnly: read through DevTools).
    let cookies = cdp
        .call("Network.getCookies", json!({"urls": [c.base.clone()]}))
        .unwrap();
    let session = cookies["cookies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "__Host-sluice-session")
        .unwrap();
    assert_eq!(session["httpOnly"], true);
    assert_eq!(session["secure"], true);
    assert_eq!(session["sameSite"], "Strict");
    let cookie = format!(
        "cookie: __Host-sluice-session={}",
        session["value"].as_str().unwrap()
    );
    let csv = curl(&c, &["-H", &cookie, &href]).unwrap();
    let lines: Vec<&str> = csv.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 4, "a header and three rows: {csv}");
    for (i, id) in [
        "evt-alice-block-0",
        "evt-alice-block-1",
        "evt-alice-block-2",
    ]
    .iter()
    .enumerate()
    {
        assert!(lines[i + 1].contains(id), "{csv}");
        assert!(lines[i + 1].contains("alice@corp.example"), "{csv}");
        assert!(lines[i + 1].contains("block"), "{csv}");
    }

    // Save the query; it is listed and leads back to the same rows.
    cdp.fill("input[name=name]", "alice blocked").unwrap();
    cdp.click_and_wait_load("form[action='/queries'] button")
        .unwrap();
    assert!(
        cdp.text("#saved-queries")
            .unwrap()
            .contains("alice blocked")
    );
    cdp.click_and_wait_load("#saved-queries a").unwrap();
    assert_eq!(table_rows(&mut cdp).len(), 3);

    // Open the first event: every field and the raw JSON.
    cdp.click_and_wait_load("#events tbody a").unwrap();
    assert!(cdp.url().unwrap().ends_with("/events/evt-alice-block-0"));
    let fields = cdp.text("#event-fields").unwrap();
    for want in [
        "evt-alice-block-0",
        "q3-plan.docx",
        "upload-block",
        "10.1.2.3",
        "curl",
        &agent,
    ] {
        assert!(fields.contains(want), "{want} in {fields}");
    }
    let raw: Value = serde_json::from_str(&cdp.text("#raw").unwrap()).unwrap();
    assert_eq!(raw["id"], "evt-alice-block-0");
    assert_eq!(
        raw["device"]["uid"], agent,
        "the collector stamps the agent's id"
    );
    assert_eq!(raw["sluice"]["incident"], events[0].1["sluice"]["incident"]);

    // A bad query is answered with a clear error on the page.
    cdp.navigate(&format!("{}/events?q=colour%3Ablue", c.base))
        .unwrap();
    let err = cdp.text("#query-error").unwrap();
    assert!(err.contains("colour") && err.contains("position"), "{err}");

    // A POST without the session's CSRF token, or with another one, is refused.
    for form in ["name=x&q=user%3Aa", "name=x&q=user%3Aa&csrf=0000"] {
        let status = curl(
            &c,
            &[
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                &cookie,
                "--data",
                form,
                &format!("{}/queries", c.base),
            ],
        )
        .unwrap_or_else(|e| e.to_string());
        assert!(status.contains("403"), "{status}");
    }
    // Without the session, the export is refused too.
    assert!(curl(&c, &[&href]).is_err());

    // Devices and bundles.
    cdp.navigate(&format!("{}/devices", c.base)).unwrap();
    let devices = cdp.text("#devices").unwrap();
    for want in [
        "laptop-7",
        agent.as_str(),
        "managed",
        "0.1.0",
        "r1",
        "running",
        "reporting",
    ] {
        assert!(devices.contains(want), "{want} in {devices}");
    }
    cdp.navigate(&format!("{}/bundles", c.base)).unwrap();
    assert!(
        cdp.text("#bundles")
            .unwrap()
            .contains("Nothing published yet")
    );
    assert!(cdp.text("#agent-bundles").unwrap().contains("laptop-7"));

    // Sign out: the session is gone.
    cdp.click_and_wait_load("form[action='/logout'] button")
        .unwrap();
    assert!(cdp.url().unwrap().ends_with("/login"));
    cdp.navigate(&format!("{}/events", c.base)).unwrap();
    assert!(cdp.url().unwrap().ends_with("/login"));
    cdp.close().unwrap();
}
