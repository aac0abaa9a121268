//! Session controls end to end: the real agent (`sluice run`) with the default policy bundle
//! (signed, loaded from a file), steering a test cgroup; real curl inside it trusting the Sluice
//! CA; the demo file-sharing app over TLS as the origin; Office and PDF files made by the real
//! tools (`cargo xtask fixtures`), and the labels written into downloads read back by
//! python-docx / openpyxl / python-pptx / pypdf and opened by LibreOffice.
#![allow(clippy::unwrap_used)]

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use sluice_e2e::{
    Agent, Got, InCgroup, TempDir, TestCgroup, bin,
    demo_app::{self, DemoApp, DemoOptions},
    hex, require_root, wait_until,
};
use sluice_policy::bundle::{self, jws::SigningKey};
use sluice_protocol::{ProtectedFile, ReleaseSecrets, seal::OpeningKey};

const APP_IP: &str = "127.0.0.41";

struct Env {
    app: DemoApp,
    agent: Agent,
    cg: TestCgroup,
    dir: TempDir,
    sluice_ca: PathBuf,
    events: PathBuf,
    /// The release key the agent seals protected files' passwords to (pinned in its config).
    release: OpeningKey,
}

fn default_bundle() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/default")
}

fn env(tag: &str, posture: &str) -> Env {
    env_with(tag, posture, "")
}

/// `env`, with `proxy` added to the agent's `[proxy]` table.
fn env_with(tag: &str, posture: &str, proxy: &str) -> Env {
    env_opts(
        tag,
        posture,
        Opts {
            proxy,
            ..Opts::default()
        },
    )
}

/// How an environment differs from the default one.
#[derive(Default)]
struct Opts<'a> {
    /// Added to the agent's `[proxy]` table.
    proxy: &'a str,
    /// Files of the bundle replaced (name, text).
    bundle_files: Vec<(&'a str, String)>,
    /// Reports to this collector (`url`, CA file, and a function that enrolls the agent whose
    /// config is at the path given) instead of an events file with a pinned release key.
    collector: Option<Reporting<'a>>,
    /// Appended to the agent's config (whole tables).
    extra: &'a str,
}

/// A collector to report to: its URL, its CA, and how to enroll an agent (given its config).
type Reporting<'a> = (String, PathBuf, &'a dyn Fn(&Path));

fn env_opts(tag: &str, posture: &str, o: Opts<'_>) -> Env {
    let proxy = o.proxy;
    require_root();
    let mut opts = DemoOptions::tls().expect("demo options");
    opts.listen = format!("{APP_IP}:0").parse().expect("addr");
    let app = DemoApp::start(opts).expect("demo app");
    let cg = TestCgroup::new(tag);
    let dir = TempDir::new(&format!("session-{}", cg.rel.replace('/', "-")));

    // The default bundle, signed by a key of this test.
    let (key, _, public) = SigningKey::generate().expect("key");
    let public_path = dir.join("bundle.pub");
    std::fs::write(&public_path, public).expect("pub");
    let mut archive = bundle::build(&default_bundle(), Some("7")).expect("build");
    for (name, text) in &o.bundle_files {
        archive
            .files
            .insert((*name).to_owned(), text.clone().into_bytes());
    }
    archive.sign(&key).expect("sign");
    let bundle_path = dir.join("bundle.tar.gz");
    std::fs::write(&bundle_path, archive.write().expect("write")).expect("bundle");

    let app_ca = app.ca_file().expect("app CA file");
    let events = dir.join("events.jsonl");
    let release = OpeningKey::generate().expect("release key");
    let config = format!(
        r#"
state_dir = "{state}"
[steer]
cgroup = "{cg}"
agent_cgroup = "{cg}/agent"
include = [{{ cidr = "{ip}/32", ports = [{port}] }}]
[proxy]
port = 0
{proxy}
[admin]
listen = "127.0.0.1:0"
[tls]
upstream_extra_cas = ["{app_ca}"]
no_system_roots = true
no_bundled_roots = true
[bundle]
file = "{bundle}"
public_key = "{public}"
[device]
posture = "{posture}"
[report]
{report}
{extra}
"#,
        state = dir.join("state").display(),
        cg = cg.rel,
        ip = APP_IP,
        port = app.addr().port(),
        app_ca = app_ca.display(),
        bundle = bundle_path.display(),
        public = public_path.display(),
        proxy = proxy,
        extra = o.extra,
        report = match &o.collector {
            Some((url, ca, _)) => format!(
                "collector = \"{url}\"\ncollector_ca = \"{}\"\nretry_max_ms = 1000",
                ca.display()
            ),
            None => format!(
                "events_file = \"{}\"\nrelease_key = \"{}\"\nportal_url = \"https://portal.corp.example\"",
                events.display(),
                release.public().to_base64()
            ),
        },
    );
    if let Some((_, _, enroll)) = &o.collector {
        std::fs::write(dir.join("agent.toml"), &config).expect("config");
        enroll(&dir.join("agent.toml"));
    }
    let agent = Agent::launch(&config, &dir).expect("agent starts");
    let active = wait_until(Duration::from_secs(20), || {
        agent
            .status()
            .is_ok_and(|s| s["bundle"]["revision"].as_str() == Some("7"))
    });
    assert!(active, "the bundle was not activated: {:?}", agent.status());
    let out = std::process::Command::new(bin("sluice"))
        .args(["ca", "export", "--config"])
        .arg(dir.join("agent.toml"))
        .output()
        .expect("ca export");
    assert!(out.status.success());
    let sluice_ca = dir.join("sluice-ca.pem");
    std::fs::write(&sluice_ca, &out.stdout).expect("ca");
    Env {
        app,
        agent,
        cg,
        dir,
        sluice_ca,
        events,
        release,
    }
}

/// A response whose body was counted and hashed, not kept.
struct Streamed {
    status: u16,
    len: u64,
    sha256: String,
}

impl Env {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.app.base_url())
    }

    /// curl's arguments common to every request: the app's address, the Sluice CA, the
    /// response head to `head`, the body to `out` ("-" for stdout), and `user`'s session cookie.
    fn curl_args(&self, user: Option<&str>, head: &Path, out: &str, args: &[&str]) -> Vec<String> {
        let ip_port = format!("{}:{}:{APP_IP}", demo_app::HOST, self.app.addr().port());
        let mut all: Vec<String> = vec![
            "-sS".into(),
            "--max-time".into(),
            "120".into(),
            "--resolve".into(),
            ip_port,
            "--cacert".into(),
            self.sluice_ca.display().to_string(),
            "-D".into(),
            head.display().to_string(),
            "-o".into(),
            out.into(),
        ];
        if let Some(u) = user {
            let token = self.app.token_for(u).expect("token");
            all.push("-H".into());
            all.push(format!("Cookie: {}={token}", demo_app::COOKIE));
        }
        all.extend(args.iter().map(|s| (*s).to_owned()));
        all
    }

    /// A fresh file name in the test's directory.
    fn scratch(&self, what: &str) -> PathBuf {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        self.dir.join(format!("{what}-{n}"))
    }

    /// Runs curl in the steered cgroup as `user` (a session cookie from the app's identity
    /// provider), with `args` after the common ones.
    fn curl(&self, user: Option<&str>, args: &[&str]) -> Got {
        let (_, dir) = self.cg.child("client");
        let head = self.scratch("head");
        let body = self.scratch("body");
        let mut all = self.curl_args(user, &head, &body.display().to_string(), args);
        all.extend(["-w".into(), "%{http_code}".into()]);
        let out = InCgroup::at(&dir)
            .run(Path::new("/usr/bin/curl"), &all)
            .expect("curl");
        let got = Got {
            status: out.trim().parse().unwrap_or(0),
            headers: std::fs::read_to_string(&head).unwrap_or_default(),
            body: std::fs::read(&body).unwrap_or_default(),
        };
        let _ = std::fs::remove_file(head);
        let _ = std::fs::remove_file(body);
        got
    }

    /// A multipart upload (`form` as curl -F takes it: `file=@path`) to the app, as an API
    /// client that accepts JSON.
    fn upload_json(&self, user: Option<&str>, form: &str) -> Got {
        self.curl(
            user,
            &[
                "-H",
                "Accept: application/json",
                "-F",
                form,
                &self.url("/upload"),
            ],
        )
    }

    /// Like `curl`, for bodies too large to keep: `upload` bytes of the test pattern are fed
    /// to curl's stdin (`-T -` goes in `args`) and the response body is counted and hashed as
    /// it arrives. Nothing of either body touches the disk.
    fn curl_streamed(&self, user: Option<&str>, upload: u64, args: &[&str]) -> Streamed {
        let (got, ok) = self.curl_streamed_inner(user, upload, args);
        assert!(
            ok.is_ok(),
            "curl {args:?}: {}",
            ok.err().unwrap_or_default()
        );
        got
    }

    /// `curl_streamed` where curl may fail (the connection ended by a refusal mid-upload).
    fn curl_streamed_any(&self, user: Option<&str>, upload: u64, args: &[&str]) -> Streamed {
        self.curl_streamed_inner(user, upload, args).0
    }

    fn curl_streamed_inner(
        &self,
        user: Option<&str>,
        upload: u64,
        args: &[&str],
    ) -> (Streamed, Result<(), String>) {
        use sha2::Digest as _;
        use std::io::{Read as _, Write as _};
        let (_, dir) = self.cg.child("client");
        let head = self.scratch("head");
        let all = self.curl_args(user, &head, "-", args);
        let mut child = InCgroup::at(&dir)
            .command(Path::new("/usr/bin/curl"), &all)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("curl starts");
        let mut stdin = child.stdin.take().unwrap();
        let feeder = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            let mut at = 0u64;
            while at < upload {
                let n = (upload - at).min(buf.len() as u64) as usize;
                sluice_e2e::pattern(at, &mut buf[..n]);
                if stdin.write_all(&buf[..n]).is_err() {
                    break;
                }
                at += n as u64;
            }
        });
        let mut stderr = child.stderr.take().unwrap();
        let errs = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let mut stdout = child.stdout.take().unwrap();
        let mut hasher = sha2::Sha256::new();
        let mut len = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match stdout.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    hasher.update(&buf[..n]);
                    len += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => panic!("reading curl's output: {e}"),
            }
        }
        let status = child.wait().expect("curl ends");
        feeder.join().unwrap();
        let errs = errs.join().unwrap();
        let ok = if status.success() {
            Ok(())
        } else {
            Err(format!("{status}: {errs}"))
        };
        let headers = std::fs::read_to_string(&head).unwrap_or_default();
        let _ = std::fs::remove_file(head);
        // The last status line is the final response's (a 100 Continue may come first).
        let status = headers
            .lines()
            .rfind(|l| l.starts_with("HTTP/"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (
            Streamed {
                status,
                len,
                sha256: hex(&hasher.finalize()),
            },
            ok,
        )
    }

    /// The activity events written so far.
    fn events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The event of the request whose incident id is `incident` (waits for it).
    fn event_by_incident(&self, incident: &str) -> serde_json::Value {
        let mut found = None;
        wait_until(Duration::from_secs(10), || {
            found = self
                .events()
                .into_iter()
                .find(|e| e["incident"].as_str() == Some(incident));
            found.is_some()
        });
        found.unwrap_or_else(|| panic!("no event for incident {incident}: {:?}", self.events()))
    }

    /// The last event whose URL ends with `suffix` (waits for it).
    fn event_for(&self, method: &str, suffix: &str) -> serde_json::Value {
        let mut found = None;
        wait_until(Duration::from_secs(10), || {
            found = self.events().into_iter().rev().find(|e| {
                e["method"].as_str() == Some(method)
                    && e["url"].as_str().is_some_and(|u| u.ends_with(suffix))
            });
            found.is_some()
        });
        found.unwrap_or_else(|| panic!("no event for {method} {suffix}: {:?}", self.events()))
    }

    /// The protected files of event `ev` with their passwords, opened with the release key and
    /// the event's id (as the collector opens them).
    fn protected(&self, ev: &serde_json::Value) -> Vec<(ProtectedFile, ReleaseSecrets)> {
        let id = ev["id"].as_str().unwrap();
        ev["protected"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                let p: ProtectedFile = serde_json::from_value(p).unwrap();
                let plain = self.release.open(&p.binding(id), &p.sealed).unwrap();
                let secrets: ReleaseSecrets = serde_json::from_slice(&plain).unwrap();
                (p, secrets)
            })
            .collect()
    }

    fn agent_peak_rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.agent.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }
}

fn fixture(name: &str) -> PathBuf {
    demo_app::fixture(name).expect("fixtures (made by `cargo xtask fixtures`)")
}

/// The SHA-256 of the first `len` bytes of the test pattern.
fn pattern_sha256(len: u64) -> String {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        sluice_e2e::pattern(at, &mut buf[..n]);
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    hex(&hasher.finalize())
}

fn sha256_file(p: &Path) -> String {
    use sha2::Digest as _;
    hex(&sha2::Sha256::digest(std::fs::read(p).unwrap()))
}

#[test]
#[ignore = "needs root"]
fn an_unlabeled_upload_is_blocked_before_the_app_sees_it_with_a_message_for_each_client() {
    let e = env("sess-block", "managed");
    let plain = fixture("plain.docx");
    let form = format!("file=@{}", plain.display());
    let alice = Some("alice@corp.example");

    // An API client: problem+json, 403, the incident id in a header and in the body.
    let api = e.upload_json(alice, &form);
    assert_eq!(api.status, 403, "{}", api.text());
    assert_eq!(
        api.header("content-type").as_deref(),
        Some("application/problem+json")
    );
    let incident = api.header("x-sluice-incident").expect("incident header");
    let doc: serde_json::Value = serde_json::from_slice(&api.body).expect("problem+json");
    assert_eq!(doc["status"], 403);
    assert_eq!(doc["incident"].as_str(), Some(incident.as_str()));
    assert!(
        doc["detail"]
            .as_str()
            .unwrap()
            .contains("plain.docx was not uploaded"),
        "{doc}"
    );
    assert!(doc["hint"].as_str().unwrap().contains("Sensitivity menu"));

    // A browser: the HTML page saying what happened, why, how to fix it, and the incident.
    let page = e.curl(
        alice,
        &[
            "-H",
            "Accept: text/html,application/xhtml+xml",
            "-A",
            "Mozilla/5.0 (X11; Linux x86_64)",
            "-F",
            &form,
            &e.url("/upload"),
        ],
    );
    assert_eq!(page.status, 403);
    assert!(
        page.header("content-type")
            .unwrap()
            .starts_with("text/html")
    );
    let html = page.text();
    assert!(html.contains("Upload blocked: the file has no sensitivity label"));
    assert!(
        html.contains("apply the Confidential label")
            || html.contains("Apply the Confidential label")
    );
    assert!(html.contains(&page.header("x-sluice-incident").unwrap()));

    // A command-line client: plain text. A raw PUT through the API is refused the same way.
    let put = e.curl(
        alice,
        &[
            "-T",
            plain.to_str().unwrap(),
            &e.url("/api/files/plain.docx"),
        ],
    );
    assert_eq!(put.status, 403);
    assert!(
        put.header("content-type")
            .unwrap()
            .starts_with("text/plain")
    );
    assert!(put.text().contains("incident"));

    // The same document in the zip64 layout (as streaming writers and `zip -fz` make it) is
    // read and refused the same way, not waved through as not inspectable.
    let zip64 = fixture("zip64-plain.docx");
    let put = e.curl(
        alice,
        &[
            "-T",
            zip64.to_str().unwrap(),
            &e.url("/api/files/zip64-plain.docx"),
        ],
    );
    assert_eq!(put.status, 403, "{}", put.text());
    let ev = e.event_by_incident(&put.header("x-sluice-incident").expect("incident"));
    assert_eq!(ev["policy"], "block-unlabelled-uploads", "{ev}");
    assert!(ev["files"][0]["not_inspectable"].is_null(), "{ev}");

    // Zipping a document does not hide it: the archive's members are decided as files, and
    // the message names the one at fault.
    let zipped = fixture("zipped-plain.zip");
    let form_zip = format!("file=@{}", zipped.display());
    let got = e.upload_json(alice, &form_zip);
    assert_eq!(got.status, 403, "{}", got.text());
    assert!(
        got.text().contains("zipped-plain.zip/plain.docx"),
        "{}",
        got.text()
    );
    let ev = e.event_by_incident(&got.header("x-sluice-incident").expect("incident"));
    assert_eq!(ev["policy"], "block-unlabelled-uploads", "{ev}");
    let names: Vec<&str> = ev["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "zipped-plain.zip",
            "zipped-plain.zip/plain.docx",
            "zipped-plain.zip/plain.pdf"
        ],
        "{ev}"
    );

    // Legacy binary and OpenDocument files need a label too.
    for name in [
        "plain.doc",
        "plain.xls",
        "plain.ppt",
        "plain.odt",
        "plain.ods",
        "plain.odp",
    ] {
        let path = fixture(name);
        let put = e.curl(
            alice,
            &[
                "-T",
                path.to_str().unwrap(),
                &e.url(&format!("/api/files/{name}")),
            ],
        );
        assert_eq!(put.status, 403, "{name}: {}", put.text());
        let ev = e.event_by_incident(&put.header("x-sluice-incident").expect("incident"));
        assert_eq!(ev["policy"], "block-unlabelled-uploads", "{ev}");
        assert_eq!(ev["files"][0]["type"], &name[6..], "{ev}");
    }

    // The app never received any of them, by its own log.
    assert!(e.app.uploads().is_empty(), "{:?}", e.app.uploads());
    assert!(
        !e.app
            .requests()
            .iter()
            .any(|r| r.path.starts_with("/upload") || r.path.starts_with("/api/files/")),
        "{:?}",
        e.app.requests()
    );

    // Each refusal is an event with the facts it was decided on.
    let ev = e.event_by_incident(&incident);
    assert_eq!(ev["action"], "block");
    assert_eq!(ev["activity"], "upload");
    assert_eq!(ev["policy"], "block-unlabelled-uploads");
    assert_eq!(ev["user"], "alice@corp.example");
    assert_eq!(ev["files"][0]["type"], "docx");
    assert_eq!(ev["files"][0]["name"], "plain.docx");
    assert_eq!(
        ev["files"][0]["sha256"].as_str(),
        Some(sha256_file(&plain).as_str())
    );
    assert_eq!(ev["files"][0]["labels"].as_array().map(Vec::len), Some(0));
    assert_eq!(ev["process"]["comm"], "curl");
    assert_eq!(
        ev["destination"].as_str(),
        Some(format!("{APP_IP}:{}", e.app.addr().port()).as_str())
    );
}

#[test]
#[ignore = "needs root"]
fn labeled_office_and_pdf_uploads_pass_byte_for_byte() {
    let e = env("sess-pass", "managed");
    for name in [
        "confidential.docx",
        "confidential.xlsx",
        "confidential.pptx",
        "confidential.pdf",
        "lo-confidential.docx",
        "confidential.doc",
        "confidential.xls",
        "confidential.ppt",
        "confidential.odt",
        "confidential.ods",
        "confidential.odp",
        "zipped-confidential.zip",
    ] {
        let path = fixture(name);
        let form = format!("file=@{}", path.display());
        let got = e.upload_json(Some("bob@corp.example"), &form);
        assert!(
            got.status == 201 || got.status == 200,
            "{name}: {} {}",
            got.status,
            got.text()
        );
        let up = e
            .app
            .uploads()
            .into_iter()
            .find(|u| u.name == name)
            .unwrap_or_else(|| panic!("{name} did not reach the app"));
        assert_eq!(up.sha256, sha256_file(&path), "{name} changed on the way");
        let ev = e.event_for("POST", "/upload");
        assert_eq!(ev["action"], "monitor", "{ev}");
        assert_eq!(ev["files"][0]["name"], name);
        // An archive's members carry the labels (the archive itself has none).
        let last = ev["files"].as_array().and_then(|f| f.last()).unwrap();
        assert_eq!(
            last["labels"][0]["guid"], "4e1d2c3b-5a69-4b7c-8d9e-0f1a2b3c4d5e",
            "{ev}"
        );
    }
    // Through the API as a raw body too.
    let path = fixture("confidential.pdf");
    let got = e.curl(
        Some("bob@corp.example"),
        &["-T", path.to_str().unwrap(), &e.url("/api/files/c.pdf")],
    );
    assert!(got.status < 300, "{} {}", got.status, got.text());
    let up = e
        .app
        .uploads()
        .into_iter()
        .find(|u| u.name == "c.pdf")
        .unwrap();
    assert_eq!(up.sha256, sha256_file(&path));
}

/// A labeled document carried base64-encoded in request text is read and passes with its label
/// recorded, however the text dresses it: behind runs that decode to text, in JSON that escapes
/// every '/' (PHP's default), as base64 of a JSON document that carries it, in a text file
/// inside a zip archive.
#[test]
#[ignore = "needs root"]
fn labeled_documents_in_text_are_read_through_escapes_decoys_and_nesting() {
    use base64::Engine as _;
    let e = env("sess-b64", "managed");
    let doc = std::fs::read(fixture("confidential.docx")).unwrap();
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let inner = b64(&doc);
    let filler = b64("plain words ".repeat(40).as_bytes());
    let mut decoys = String::from("{");
    for i in 0..70 {
        decoys.push_str(&format!(r#""d{i}": "{filler}", "#));
    }
    decoys.push_str(&format!(r#""content": "{inner}"}}"#));
    let php = format!(r#"{{"content": "{}"}}"#, inner.replace('/', "\\/"));
    let nested = format!(
        r#"{{"note": "{}"}}"#,
        b64(format!(r#"{{"f": "{inner}"}}"#).as_bytes())
    );
    let zipped = zip_text(&e.dir, "notes.txt", &inner);
    let bodies = [
        ("decoys", decoys.into_bytes()),
        ("php", php.into_bytes()),
        ("nested", nested.into_bytes()),
        ("zip", zipped),
    ];
    for (what, body) in bodies {
        let path = e.dir.join(format!("{what}.body"));
        std::fs::write(&path, body).unwrap();
        let seq = e.last_seq();
        let before = e.events().len();
        let at = format!("@{}", path.display());
        let form = format!("file={at};filename=notes.zip");
        let url = e.url("/upload");
        let args: Vec<&str> = if what == "zip" {
            vec!["-F", &form, &url]
        } else {
            vec![
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                &at,
                &url,
            ]
        };
        let got = e.curl(Some("bob@corp.example"), &args);
        assert_ne!(got.status, 403, "{what}: {}", got.text());
        assert_eq!(
            e.app_requests_after(seq).len(),
            1,
            "{what}: did not reach the app"
        );
        let mut ev = serde_json::Value::Null;
        wait_until(Duration::from_secs(10), || {
            if let Some(found) = e.events().into_iter().skip(before).find(|v| {
                v["method"] == "POST" && v["url"].as_str().is_some_and(|u| u.ends_with("/upload"))
            }) {
                ev = found;
            }
            !ev.is_null()
        });
        assert_eq!(ev["activity"], "upload", "{what}: {ev}");
        assert_eq!(ev["action"], "monitor", "{what}: {ev}");
        // The body itself (the endpoint is an upload's) and the document found in it.
        let files = ev["files"].as_array().cloned().unwrap_or_default();
        let docx: Vec<_> = files.iter().filter(|f| f["type"] == "docx").collect();
        assert_eq!(docx.len(), 1, "{what}: {ev}");
        assert_eq!(
            docx[0]["sha256"].as_str(),
            Some(sha256_file(&fixture("confidential.docx")).as_str())
        );
        assert_eq!(
            docx[0]["labels"][0]["guid"], "4e1d2c3b-5a69-4b7c-8d9e-0f1a2b3c4d5e",
            "{what}: {ev}"
        );
    }
}

/// Downloads `name` (seeded into the app) as `user`; returns the file written by curl.
fn download(e: &Env, user: &str, name: &str, bytes: Vec<u8>) -> (Got, PathBuf) {
    let info = e.app.seed(name, bytes, "alice@corp.example").unwrap();
    let got = e.curl(
        Some(user),
        &[&e.url(&format!("/files/{}/download", info.id))],
    );
    assert_eq!(got.status, 200, "{}", got.text());
    let out = e.dir.join(format!("got-{user}-{name}"));
    std::fs::write(&out, &got.body).unwrap();
    (got, out)
}

/// Decrypts a protected PDF with qpdf into `out`; whether it opened.
fn pdf_decrypt(file: &Path, password: &str, out: &Path) -> bool {
    std::process::Command::new("qpdf")
        .arg(format!("--password={password}"))
        .arg("--decrypt")
        .arg(file)
        .arg(out)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Opens a protected download with the password its event's sealed box holds (and not with
/// another), and returns the decrypted file.
fn open_protected(e: &Env, file: &Path, secrets: &ReleaseSecrets) -> PathBuf {
    let pw = secrets.open_password.as_deref().expect("an open password");
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    let out = e.dir.join(format!("decrypted-{name}"));
    let wrong = e.dir.join(format!("wrong-{name}"));
    let is_pdf = std::fs::read(file).unwrap().starts_with(b"%PDF");
    let decrypt = if is_pdf {
        pdf_decrypt
    } else {
        demo_app::office_decrypt
    };
    assert!(
        decrypt(file, pw, &out),
        "{name} does not open with its password"
    );
    assert!(
        !decrypt(file, "not-the-password", &wrong),
        "{name} opens with a wrong one"
    );
    out
}

#[test]
#[ignore = "needs root"]
fn highly_confidential_downloads_to_an_unmanaged_device_and_guest_downloads_arrive_encrypted() {
    let e = env("sess-dl", "unmanaged");
    let hc_guid = "9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d";
    let conf_guid = "4e1d2c3b-5a69-4b7c-8d9e-0f1a2b3c4d5e";
    // The zip64 one is the same document as Info-ZIP's `zip -fz` lays it out.
    for name in [
        "highly-confidential.docx",
        "highly-confidential.pdf",
        "zip64-highly-confidential.docx",
    ] {
        let original = std::fs::read(fixture(name)).unwrap();
        let (got, out) = download(&e, "alice@corp.example", name, original.clone());
        // Nobody opens it without the password: the label is readable, the content is not.
        assert!(
            demo_app::read_label(&out, false).is_err(),
            "{name} opens without a password"
        );
        let ev = e.event_for("GET", "/download");
        assert_eq!(ev["action"], "protect", "{ev}");
        assert_eq!(ev["policy"], "protect-hc-downloads-unmanaged");
        assert_eq!(ev["label_applied"], "highly-confidential");
        assert_eq!(ev["files"][0]["name"], name);
        let protected = e.protected(&ev);
        assert_eq!(protected.len(), 1, "{ev}");
        let (p, secrets) = &protected[0];
        assert_eq!(p.template, "organisation-only");
        assert_eq!(p.open, "organisation");
        assert_eq!(p.rights, ["view", "print"]);
        assert_eq!(p.sha256, hex(&sha256(&std::fs::read(&out).unwrap())));
        assert_eq!(p.original_sha256, hex(&sha256(&original)));
        assert!(p.expires_at.is_some());
        // The response says where the password is given.
        assert_eq!(
            got.header("sluice-protected").as_deref(),
            Some(p.release_id.as_str())
        );
        // `sluice inspect` reads the label and the release id without the password.
        let facts = std::process::Command::new(bin("sluice"))
            .args(["inspect", "--bundle"])
            .arg(default_bundle())
            .arg(&out)
            .output()
            .unwrap();
        let facts: serde_json::Value = serde_json::from_slice(&facts.stdout).unwrap();
        assert_eq!(facts["encrypted"], true, "{facts}");
        assert_eq!(facts["release_id"], p.release_id.as_str(), "{facts}");
        assert_eq!(facts["labels"][0]["guid"], hc_guid, "{facts}");

        let plain = open_protected(&e, &out, secrets);
        // LibreOffice 7.4 does not load packages in `zip -fz`'s zip64 layout (the original
        // neither): python-docx reads that one.
        let libreoffice = name.ends_with(".docx") && !name.starts_with("zip64-");
        let read = demo_app::read_label(&plain, libreoffice).expect("opens");
        assert_eq!(read["label"], hc_guid, "{read}");
        assert_eq!(
            read["properties"][format!("MSIP_Label_{hc_guid}_Method")],
            "Privileged"
        );
        assert_eq!(
            read["properties"]["Sluice_Permissions"], "view,print",
            "{read}"
        );
        if libreoffice {
            assert_eq!(read["libreoffice"], true, "LibreOffice opens it: {read}");
        }
    }

    // OpenDocument has no standard encryption Sluice writes: not delivered, and the message
    // says which formats can be.
    let (got, _) = {
        let info = e
            .app
            .seed(
                "plan.odt",
                std::fs::read(fixture("highly-confidential.odt")).unwrap(),
                "alice@corp.example",
            )
            .unwrap();
        let got = e.curl(
            Some("alice@corp.example"),
            &[&e.url(&format!("/files/{}/download", info.id))],
        );
        (got, ())
    };
    assert_eq!(got.status, 403, "{}", got.text());
    assert!(
        got.text().contains("must arrive encrypted"),
        "{}",
        got.text()
    );
    let ev = e.event_for("GET", "/download");
    assert_eq!(ev["action"], "block", "{ev}");
    assert!(ev["protected"].as_array().is_none_or(Vec::is_empty), "{ev}");

    // An archive holding a Highly Confidential document: the document inside arrives
    // encrypted, the other member byte for byte.
    let name = "zipped-highly-confidential.zip";
    let (_, out) = download(
        &e,
        "alice@corp.example",
        name,
        std::fs::read(fixture(name)).unwrap(),
    );
    let unpacked = e.dir.join("unpacked");
    let status = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])",
        ])
        .arg(&out)
        .arg(&unpacked)
        .status()
        .expect("python3");
    assert!(status.success(), "the archive does not unpack");
    assert_eq!(
        std::fs::read(unpacked.join("plain.pdf")).unwrap(),
        std::fs::read(fixture("plain.pdf")).unwrap()
    );
    let ev = e.event_for("GET", "/download");
    assert_eq!(ev["action"], "protect", "{ev}");
    assert_eq!(
        ev["files"][1]["name"],
        format!("{name}/highly-confidential.docx"),
        "{ev}"
    );
    let protected = e.protected(&ev);
    assert_eq!(protected.len(), 1, "{ev}");
    let plain = open_protected(
        &e,
        &unpacked.join("highly-confidential.docx"),
        &protected[0].1,
    );
    let read = demo_app::read_label(&plain, true).expect("opens");
    assert_eq!(read["label"], hc_guid, "{read}");
    assert_eq!(read["libreoffice"], true, "{read}");

    // Asking for a byte range does not get an unprotected piece: the whole file arrives,
    // encrypted.
    let original = std::fs::read(fixture("highly-confidential.docx")).unwrap();
    let info = e
        .app
        .seed("ranged.docx", original.clone(), "alice@corp.example")
        .unwrap();
    let got = e.curl(
        Some("alice@corp.example"),
        &[
            "-r",
            "0-99",
            &e.url(&format!("/files/{}/download", info.id)),
        ],
    );
    assert_eq!(got.status, 200, "{}", got.text());
    assert!(
        got.body.starts_with(&[0xd0, 0xcf, 0x11, 0xe0]),
        "an encrypted package"
    );
    let out = e.dir.join("ranged.docx");
    std::fs::write(&out, &got.body).unwrap();
    let ev = e.event_for("GET", "/download");
    let protected = e.protected(&ev);
    let plain = open_protected(&e, &out, &protected[0].1);
    let read = demo_app::read_label(&plain, false).expect("opens");
    assert_eq!(read["label"], hc_guid, "{read}");

    // A guest's download of an unlabeled workbook, presentation and PDF arrives labeled
    // Confidential, encrypted for that guest alone, view only.
    for name in ["plain.xlsx", "plain.pptx", "plain.pdf"] {
        let original = std::fs::read(fixture(name)).unwrap();
        let (_, out) = download(&e, "carol@corp.example", name, original);
        let ev = e.event_for("GET", "/download");
        assert_eq!(ev["policy"], "guest-downloads-view-only", "{ev}");
        assert_eq!(ev["user"], "carol@corp.example");
        let protected = e.protected(&ev);
        let (p, secrets) = &protected[0];
        assert_eq!(p.template, "guest-view-only");
        assert_eq!(p.open, "downloader");
        assert_eq!(p.users, ["carol@corp.example"]);
        assert_eq!(p.rights, ["view"]);
        let plain = open_protected(&e, &out, secrets);
        let read = demo_app::read_label(&plain, false).expect("opens");
        assert_eq!(read["label"], conf_guid, "{name}: {read}");
        assert_eq!(
            read["properties"]["Sluice_Permissions"], "view",
            "{name}: {read}"
        );
        if name.ends_with(".pdf") {
            // View only: no printing, copying, changing or annotating.
            let show = std::process::Command::new("qpdf")
                .arg(format!(
                    "--password={}",
                    secrets.open_password.as_deref().unwrap()
                ))
                .arg("--show-encryption")
                .arg(&out)
                .output()
                .unwrap();
            let show = String::from_utf8_lossy(&show.stdout).into_owned();
            for what in [
                "print low resolution",
                "extract for any purpose",
                "modify other",
                "modify annotations",
            ] {
                assert!(
                    show.contains(&format!("{what}: not allowed")),
                    "{what}: {show}"
                );
            }
        }
    }

    // A legacy .doc cannot carry the view-only restriction, so a guest does not get it: the
    // message asks for another format.
    let doc = e
        .app
        .seed(
            "minutes.doc",
            std::fs::read(fixture("plain.doc")).unwrap(),
            "alice@corp.example",
        )
        .unwrap();
    let got = e.curl(
        Some("carol@corp.example"),
        &[&e.url(&format!("/files/{}/download", doc.id))],
    );
    assert_eq!(got.status, 403, "{}", got.text());
    assert!(
        got.text().contains("must arrive encrypted"),
        "{}",
        got.text()
    );
    let ev = e.event_for("GET", "/download");
    assert_eq!(ev["policy"], "block-unprotectable-guest-downloads", "{ev}");
    assert_eq!(ev["action"], "block");

    // Nor can a text file: it is blocked, never passed in clear, and the event says why.
    let text = b"meeting notes\n".to_vec();
    let info = e.app.seed("notes.txt", text, "alice@corp.example").unwrap();
    let got = e.curl(
        Some("carol@corp.example"),
        &[&e.url(&format!("/files/{}/download", info.id))],
    );
    assert_eq!(got.status, 403, "{}", got.text());
    assert!(!got.text().contains("meeting notes"));
    let ev = e.event_for("GET", "/download");
    assert_eq!(ev["action"], "block", "{ev}");
    assert!(
        ev["detail"]
            .as_str()
            .is_some_and(|d| d.contains("cannot be protected")),
        "{ev}"
    );

    // A member's download of an unlabeled file is not changed.
    let original = std::fs::read(fixture("plain.docx")).unwrap();
    let (_, out) = download(&e, "bob@corp.example", "plain.docx", original.clone());
    assert_eq!(std::fs::read(&out).unwrap(), original);
    assert_eq!(e.event_for("GET", "/download")["action"], "monitor");

    // No password is anywhere in the agent's state directory, spool or events in clear.
    let passwords: Vec<String> = e
        .events()
        .iter()
        .flat_map(|ev| e.protected(ev))
        .filter_map(|(_, s)| s.open_password)
        .collect();
    assert!(passwords.len() >= 7, "{passwords:?}");
    for file in walk(&e.dir.join("state"))
        .into_iter()
        .chain([e.events.clone()])
    {
        let bytes = std::fs::read(&file).unwrap_or_default();
        for pw in &passwords {
            assert!(
                !bytes.windows(pw.len()).any(|w| w == pw.as_bytes()),
                "a password in clear in {}",
                file.display()
            );
        }
    }
}

fn sha256(b: &[u8]) -> Vec<u8> {
    use sha2::Digest as _;
    sha2::Sha256::digest(b).to_vec()
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
#[ignore = "needs root"]
fn on_a_managed_device_highly_confidential_downloads_pass_unchanged() {
    let e = env("sess-managed", "managed");
    let original = std::fs::read(fixture("highly-confidential.docx")).unwrap();
    let (_, out) = download(&e, "alice@corp.example", "hc.docx", original.clone());
    assert_eq!(std::fs::read(&out).unwrap(), original);
    let ev = e.event_for("GET", "/download");
    assert_eq!(ev["action"], "monitor", "{ev}");
    assert_eq!(ev["device"], "managed");
    assert_eq!(
        ev["files"][0]["labels"][0]["guid"],
        "9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d"
    );
}

#[test]
#[ignore = "needs root"]
fn card_numbers_over_the_threshold_in_a_form_post_are_blocked_with_the_count() {
    let e = env("sess-dlp", "managed");
    let info = e
        .app
        .seed("notes.txt", b"hello".to_vec(), "alice@corp.example")
        .unwrap();
    let share = e.url(&format!("/files/{}/share", info.id));
    let cards = [
        "4111 1111 1111 1111",
        "5500-0000-0000-0004",
        "340000000000009",
        "6011000000000004",
        "4012888888881881",
        "5105105105105100",
    ];
    let message = format!(
        "with=dave@partner.example&message=cards: {}",
        cards.join(", ")
    );
    let got = e.curl(
        Some("alice@corp.example"),
        &["-H", "Accept: application/json", "--data", &message, &share],
    );
    assert_eq!(got.status, 403, "{}", got.text());
    let doc: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    assert!(
        doc["title"]
            .as_str()
            .unwrap()
            .contains("payment card numbers")
    );
    let ev = e.event_by_incident(&got.header("x-sluice-incident").unwrap());
    assert_eq!(ev["action"], "block");
    assert_eq!(ev["activity"], "share");
    assert_eq!(ev["policy"], "block-card-numbers");
    assert_eq!(ev["dlp"]["credit_card"], 6, "{ev}");
    assert!(
        !e.app.requests().iter().any(|r| r.path.ends_with("/share")),
        "the app saw the share"
    );

    // The same in a PDF printed by LibreOffice, whose text only its fonts' ToUnicode maps
    // give back, uploaded through the API.
    // So is a Word 97 file LibreOffice saved from the same text.
    for (name, kind) in [("cards.pdf", "pdf"), ("cards.doc", "doc")] {
        let path = fixture(name);
        let put = e.curl(
            Some("alice@corp.example"),
            &[
                "-T",
                path.to_str().unwrap(),
                &e.url(&format!("/api/files/{name}")),
            ],
        );
        assert_eq!(put.status, 403, "{name}: {}", put.text());
        let ev = e.event_by_incident(&put.header("x-sluice-incident").unwrap());
        assert_eq!(ev["policy"], "block-card-numbers", "{ev}");
        assert_eq!(ev["files"][0]["type"], kind, "{ev}");
        assert!(
            ev["files"][0]["dlp"]["credit_card"].as_u64().unwrap_or(0) >= 5,
            "{ev}"
        );
    }

    // Two cards are under the threshold: the share goes through and is recorded with its count.
    let few = format!(
        "with=dave@partner.example&message=cards: {}",
        cards[..2].join(", ")
    );
    let got = e.curl(Some("alice@corp.example"), &["--data", &few, &share]);
    assert!(got.status < 400, "{} {}", got.status, got.text());
    let ev = e.event_for("POST", "/share");
    assert_eq!(ev["action"], "monitor");
    assert_eq!(ev["dlp"]["credit_card"], 2, "{ev}");
}

#[test]
#[ignore = "needs root"]
fn a_zip_bomb_and_a_200_mib_file_get_the_not_inspectable_action_with_bounded_memory() {
    let e = env("sess-bounds", "managed");
    let before = e.agent_peak_rss_kib();

    // The bomb: not inspectable, and the default bundle blocks uploads it cannot inspect, with
    // a page that says why and what to do; the app never sees it.
    let bomb = fixture("bomb.docx");
    let form = format!("file=@{}", bomb.display());
    let got = e.upload_json(Some("bob@corp.example"), &form);
    assert_eq!(got.status, 403, "{}", got.text());
    assert!(got.text().contains("could not inspect"), "{}", got.text());
    let ev = e.event_for("POST", "/upload");
    assert_eq!(ev["action"], "block", "{ev}");
    assert_eq!(ev["files"][0]["not_inspectable"]["reason"], "bomb", "{ev}");
    assert!(!e.app.uploads().iter().any(|u| u.name == "bomb.docx"));

    // 200 MiB through the API: beyond the 50 MiB bound, refused at its first byte (its length
    // says it is too large) and recorded as too large. Both directions stream through curl's
    // stdin and stdout, so the test needs no disk space for them.
    const BIG: u64 = 200 << 20;
    let big_sha256 = pattern_sha256(BIG);
    let size = format!("Content-Length: {BIG}");
    let got = e.curl_streamed_any(
        Some("bob@corp.example"),
        BIG,
        &["-T", "-", "-H", &size, &e.url("/api/files/big.bin")],
    );
    // curl may see the connection end before it reads the refusal; the app must see nothing.
    assert!(got.status == 403 || got.status == 0, "{}", got.status);
    let ev = e.event_for("PUT", "/api/files/big.bin");
    assert_eq!(
        ev["files"][0]["not_inspectable"]["reason"], "too_large",
        "{ev}"
    );
    assert_eq!(ev["action"], "block");
    assert!(!e.app.uploads().iter().any(|u| u.name == "big.bin"));

    // Seeded into the app instead, for the way back.
    let mut big = vec![0u8; BIG as usize];
    sluice_e2e::pattern(0, &mut big);
    e.app.seed("big.bin", big, "bob@corp.example").unwrap();

    // And 200 MiB back down: delivered whole, not inspectable.
    let id = e
        .app
        .files()
        .into_iter()
        .find(|f| f.name == "big.bin")
        .unwrap()
        .id;
    let got = e.curl_streamed(
        Some("bob@corp.example"),
        0,
        &[&e.url(&format!("/files/{id}/download"))],
    );
    assert_eq!(got.status, 200);
    assert_eq!(got.len, BIG);
    assert_eq!(got.sha256, big_sha256);
    let ev = e.event_for("GET", "/download");
    assert_eq!(
        ev["files"][0]["not_inspectable"]["reason"], "too_large",
        "{ev}"
    );

    // Memory: the inspection bound (50 MiB held per body) plus bounded decompression, never
    // the size of the files.
    let grew_mib = e.agent_peak_rss_kib().saturating_sub(before) / 1024;
    assert!(grew_mib < 200, "agent peak RSS grew by {grew_mib} MiB");
}

#[test]
#[ignore = "needs root"]
fn a_browser_signed_in_through_the_proxy_gets_the_message_page_for_an_unlabeled_upload() {
    use sluice_e2e::browser::{Browser, Cdp};
    let e = env("sess-browser", "managed");
    let (_, client) = e.cg.child("browser");
    let mut b = Browser::new(&e.dir.join("profile"), Some(&e.sluice_ca)).expect("browser");
    b.host_rules(&format!("MAP {} {APP_IP}", demo_app::HOST))
        .in_cgroup(InCgroup::at(&client))
        .timeout(Duration::from_secs(60));
    let mut cdp = Cdp::launch(&b).expect("chromium");

    // Sign in through the app's own form, through the proxy (the Sluice CA is the only one the
    // profile trusts for this name).
    cdp.navigate(&e.url("/login")).expect("login page");
    cdp.fill("input[name=user]", "bob@corp.example").unwrap();
    cdp.fill("input[name=password]", demo_app::DEFAULT_PASSWORD)
        .unwrap();
    cdp.click_and_wait_load("button[type=submit]").unwrap();
    cdp.wait_for("location.pathname === '/files'", Duration::from_secs(20))
        .expect("signed in");

    // The upload form, submitted with a real file: first an unlabeled docx, then a labeled one.
    let submit = |name: &str| {
        let bytes = std::fs::read(fixture(name)).unwrap();
        format!(
            "<form id=f method=post action=/upload enctype=multipart/form-data>\
             <input type=file name=file id=i></form><script>\
             const b = Uint8Array.from(atob('{}'), c => c.charCodeAt(0));\
             const dt = new DataTransfer();\
             dt.items.add(new File([b], '{name}', {{type: 'application/vnd.openxmlformats-officedocument.wordprocessingml.document'}}));\
             document.getElementById('i').files = dt.files;\
             document.getElementById('f').submit();</script>",
            sluice_e2e::base64(&bytes)
        )
    };
    let page = cdp
        .run_in_origin(
            &submit("plain.docx"),
            "document.readyState === 'complete' && document.title.includes('Upload blocked')",
            Duration::from_secs(30),
        )
        .expect("the block page");
    assert!(page.contains("plain.docx was not uploaded"), "{page}");
    assert!(
        page.contains("Apply the Confidential label from the Sensitivity menu"),
        "{page}"
    );
    let shot = e.dir.join("blocked.png");
    cdp.screenshot(&shot).unwrap();
    assert!(std::fs::metadata(&shot).unwrap().len() > 1000);
    assert!(e.app.uploads().is_empty(), "{:?}", e.app.uploads());
    let ev = e.event_for("POST", "/upload");
    assert_eq!(ev["action"], "block");
    assert_eq!(ev["client"], "browser");
    assert_eq!(ev["user"], "bob@corp.example");
    assert!(page.contains(ev["incident"].as_str().unwrap()));

    cdp.navigate(&e.url("/files")).unwrap();
    let list = cdp
        .run_in_origin(
            &submit("confidential.docx"),
            "location.pathname === '/files' && document.readyState === 'complete' \
             && document.body.innerText.includes('confidential.docx')",
            Duration::from_secs(30),
        )
        .expect("the file list after the upload");
    assert!(list.contains("confidential.docx"));
    let up = e
        .app
        .uploads()
        .into_iter()
        .find(|u| u.name == "confidential.docx")
        .expect("the labeled upload reached the app");
    assert_eq!(up.sha256, sha256_file(&fixture("confidential.docx")));
    cdp.close().unwrap();
}

/// A browser that follows a link to a protected download is told first, on a short page, that
/// the file is encrypted and where its password is given; the page then fetches the file (the
/// encrypted copy, the very bytes the event's release names), which the password opens; the
/// copy's link works once.
#[test]
#[ignore = "needs root"]
fn a_browser_downloading_a_protected_file_is_told_where_its_password_is() {
    use sluice_e2e::browser::{Browser, Cdp};
    let e = env("sess-notice", "unmanaged");
    let (_, client) = e.cg.child("browser");
    let mut b = Browser::new(&e.dir.join("profile"), Some(&e.sluice_ca)).expect("browser");
    b.host_rules(&format!("MAP {} {APP_IP}", demo_app::HOST))
        .in_cgroup(InCgroup::at(&client))
        .timeout(Duration::from_secs(60));
    let mut cdp = Cdp::launch(&b).expect("chromium");
    let downloads = e.dir.join("downloads");
    std::fs::create_dir_all(&downloads).unwrap();
    cdp.browser_call(
        "Browser.setDownloadBehavior",
        serde_json::json!({ "behavior": "allow", "downloadPath": downloads }),
    )
    .expect("downloads allowed");

    cdp.navigate(&e.url("/login")).expect("login page");
    cdp.fill("input[name=user]", "alice@corp.example").unwrap();
    cdp.fill("input[name=password]", demo_app::DEFAULT_PASSWORD)
        .unwrap();
    cdp.click_and_wait_load("button[type=submit]").unwrap();
    cdp.wait_for("location.pathname === '/files'", Duration::from_secs(20))
        .expect("signed in");

    let original = std::fs::read(fixture("highly-confidential.docx")).unwrap();
    let info = e
        .app
        .seed("plan.docx", original, "alice@corp.example")
        .unwrap();
    cdp.navigate(&e.url(&format!("/files/{}/download", info.id)))
        .unwrap();
    let notice = cdp.text("#notice").expect("the notice");
    assert!(notice.contains("plan.docx is encrypted"), "{notice}");
    let ev = e.event_for("GET", "/download");
    assert_eq!(ev["action"], "protect", "{ev}");
    let protected = e.protected(&ev);
    let (p, secrets) = &protected[0];
    let access = cdp.eval("document.querySelector('a.access').href").unwrap();
    assert_eq!(
        access.as_str(),
        Some(format!("https://portal.corp.example/files/{}", p.release_id).as_str())
    );
    let link = cdp
        .eval("document.getElementById('download').href")
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned();
    // The page fetches the file by itself.
    let file = downloads.join("plan.docx");
    let arrived = wait_until(Duration::from_secs(30), || {
        file.exists() && !downloads.join("plan.docx.crdownload").exists()
    });
    assert!(
        arrived,
        "no download: {:?}",
        std::fs::read_dir(&downloads).unwrap().collect::<Vec<_>>()
    );
    let got = std::fs::read(&file).unwrap();
    assert!(
        got.starts_with(&[0xd0, 0xcf, 0x11, 0xe0]),
        "not the encrypted copy"
    );
    assert_eq!(
        hex(&sha256(&got)),
        p.sha256,
        "not the copy the release names"
    );
    open_protected(&e, &file, secrets);
    let fetched = e.event_for("GET", &link[link.find("/.sluice/").unwrap()..]);
    assert!(
        fetched["detail"]
            .as_str()
            .is_some_and(|d| d.contains(&p.release_id)),
        "{fetched}"
    );
    cdp.close().unwrap();
    // The copy's link works once.
    let again = e.curl(Some("alice@corp.example"), &[&link]);
    assert_eq!(again.status, 502, "{}", again.text());
    assert!(
        again.text().contains("expired or was used"),
        "{}",
        again.text()
    );
}

// ---------------------------------------------------------------------------------------------
// The insider suite: an unprivileged user (uid 65534) in the steered cgroup, signed in as bob,
// tries to get an unlabeled document into the app past the default bundle's upload control.
// Every attempt must end without the app seeing the request at all.

/// The unprivileged user the attempts run as.
const NOBODY: (u32, u32) = (65534, 65534);
/// Another unprivileged user, who must still be served.
const OTHER_USER: (u32, u32) = (65533, 65533);
/// Distinct names for curl's output files (calls may run at once).
static SCRATCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Env {
    /// A directory the unprivileged user can read and write, with `files` copied into it.
    fn user_dir(&self, files: &[(&str, &[u8])]) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = self.scratch("user");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        for (name, bytes) in files {
            let p = dir.join(name);
            std::fs::write(&p, bytes).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let ca = dir.join("ca.pem");
        std::fs::copy(&self.sluice_ca, &ca).unwrap();
        std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o644)).unwrap();
        dir
    }

    /// curl as the unprivileged user in the steered cgroup, bob's session cookie sent, the
    /// Sluice CA trusted (`-k` in `args` when the attempt needs it). `args` may name files of
    /// `dir`. Status 0 when curl got no response.
    fn curl_insider(&self, dir: &Path, args: &[&str]) -> Got {
        self.curl_as(NOBODY, "bob@corp.example", dir, args)
    }

    /// curl as local user `local` (uid, gid) signed in to the app as `user`.
    fn curl_as(&self, local: (u32, u32), user: &str, dir: &Path, args: &[&str]) -> Got {
        let (_, cg) = self.cg.child("insider");
        let n = SCRATCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let head = dir.join(format!("head-{n}"));
        let body = dir.join(format!("body-{n}"));
        let token = self.app.token_for(user).unwrap();
        let mut all: Vec<String> = vec![
            "-sS".into(),
            "--max-time".into(),
            "60".into(),
            "--cacert".into(),
            dir.join("ca.pem").display().to_string(),
            "--resolve".into(),
            format!("{}:{}:{APP_IP}", demo_app::HOST, self.app.addr().port()),
            "-D".into(),
            head.display().to_string(),
            "-o".into(),
            body.display().to_string(),
            "-w".into(),
            "%{http_code}".into(),
            "-H".into(),
            format!("Cookie: {}={token}", demo_app::COOKIE),
        ];
        all.extend(args.iter().map(|s| (*s).to_owned()));
        let run = InCgroup {
            cgroup: Some(cg),
            user: Some(local),
        };
        let out = run
            .command(Path::new("/usr/bin/curl"), &all)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("curl");
        let got = Got {
            status: String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .unwrap_or(0),
            headers: std::fs::read_to_string(&head).unwrap_or_default(),
            body: std::fs::read(&body).unwrap_or_default(),
        };
        let _ = std::fs::remove_file(head);
        let _ = std::fs::remove_file(body);
        got
    }

    /// The requests the app has answered since `seq`.
    fn app_requests_after(&self, seq: u64) -> Vec<demo_app::RequestRecord> {
        self.app
            .requests()
            .into_iter()
            .filter(|r| r.seq > seq)
            .collect()
    }

    fn last_seq(&self) -> u64 {
        self.app.requests().iter().map(|r| r.seq).max().unwrap_or(0)
    }
}

/// A zip archive made by Info-ZIP holding one text file.
fn zip_text(env_dir: &Path, name: &str, text: &str) -> Vec<u8> {
    let dir = env_dir.join("zip-text");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), text).unwrap();
    let ok = std::process::Command::new("zip")
        .current_dir(&dir)
        .args(["-q", "out.zip", name])
        .status()
        .unwrap();
    assert!(ok.success(), "zip");
    std::fs::read(dir.join("out.zip")).unwrap()
}

/// `plain.docx` base64-encoded, wrapped at 76 columns as MIME writes it.
fn base64_wrapped(bytes: &[u8]) -> String {
    use base64::Engine as _;
    let b = base64::engine::general_purpose::STANDARD.encode(bytes);
    b.as_bytes()
        .chunks(76)
        .map(|c| format!("{}\n", String::from_utf8_lossy(c)))
        .collect()
}

#[test]
#[ignore = "needs root"]
fn an_insider_cannot_get_an_unlabeled_document_in_by_header_games_encodings_or_archives() {
    use std::io::Write as _;
    let e = env("sess-insider", "managed");
    let doc = std::fs::read(fixture("plain.docx")).unwrap();
    let gz = {
        let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        w.write_all(&doc).unwrap();
        w.finish().unwrap()
    };
    let tar = {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(doc.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "report.docx", doc.as_slice())
            .unwrap();
        b.into_inner().unwrap()
    };
    let prefixed = [b"#!".as_slice(), &doc].concat();
    let json = format!(
        r#"{{"name": "report.txt", "content": "{}"}}"#,
        base64_wrapped(&doc).replace('\n', "")
    );
    let b64 = base64_wrapped(&doc).replace('\n', "");
    // Behind 70 runs that decode to text (there was a cap on runs searched per text).
    let decoys = {
        use base64::Engine as _;
        let filler = base64::engine::general_purpose::STANDARD.encode("plain words ".repeat(40));
        let mut j = String::from("{");
        for i in 0..70 {
            j.push_str(&format!(r#""d{i}": "{filler}", "#));
        }
        j + &format!(r#""content": "{b64}"}}"#)
    };
    // As PHP's json_encode writes it: every '/' escaped, which cuts the run in the raw text.
    let php = format!(r#"{{"content": "{}"}}"#, b64.replace('/', "\\/"));
    // Base64 of base64, and of a JSON document that carries it.
    let twice = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!(r#"{{"f": "{b64}"}}"#))
    };
    // A mail sent through a mail API: the raw message (the document attached, followed by the
    // closing boundary) base64url-encoded in a JSON field.
    let mail = {
        use base64::Engine as _;
        let mime = format!(
            "From: bob@corp.example\r\nTo: me@home.example\r\nSubject: q3\r\n\
             MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n\
             --b1\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--b1\r\n\
             Content-Type: application/octet-stream; name=\"q3.docx\"\r\n\
             Content-Transfer-Encoding: base64\r\n\r\n{}--b1--\r\n",
            base64_wrapped(&doc).replace('\n', "\r\n")
        );
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mime);
        format!(r#"{{"raw": "{raw}"}}"#)
    };
    // YAML: a block scalar, indented.
    let yaml = format!(
        "name: q3\ncontent: |\n{}kind: report\n",
        base64_wrapped(&doc)
            .lines()
            .map(|l| format!("  {l}\n"))
            .collect::<String>()
    );
    // An archive (Info-ZIP's) whose text member carries it.
    let zipped = zip_text(&e.dir, "notes.txt", &base64_wrapped(&doc));
    // The same JSON, gzip content-encoded.
    let php_gz = {
        let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        w.write_all(php.as_bytes()).unwrap();
        w.finish().unwrap()
    };
    let dir = e.user_dir(&[
        ("php.json.gz", &php_gz),
        ("mail.json", mail.as_bytes()),
        ("report.yaml", yaml.as_bytes()),
        ("notes.zip", &zipped),
        ("decoys.json", decoys.as_bytes()),
        ("php.json", php.as_bytes()),
        ("twice.txt", twice.as_bytes()),
        ("report.docx", &doc),
        ("report.docx.gz", &gz),
        ("report.tar", &tar),
        ("notes.txt", &prefixed),
        ("report.json", json.as_bytes()),
        ("report.b64", base64_wrapped(&doc).as_bytes()),
    ]);
    let f = |name: &str| dir.join(name).display().to_string();
    let at = |name: &str| format!("@{}", f(name));
    let upload = e.url("/upload");
    let api = e.url("/api/files/notes.txt");

    // Sanity: the user can reach the app through Sluice, and a labeled file would go in.
    let seq = e.last_seq();
    let ok = e.curl_insider(&dir, &[&e.url("/files")]);
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(e.app_requests_after(seq).len(), 1);

    let attempts: Vec<(&str, Vec<String>)> = vec![
        (
            "a file field without a file name",
            vec![
                "-F".into(),
                format!("file=<{}", f("report.docx")),
                upload.clone(),
            ],
        ),
        (
            "a form field of another name",
            vec![
                "-F".into(),
                format!("note={}", at("report.docx")),
                upload.clone(),
            ],
        ),
        (
            "a raw body called text/plain",
            vec![
                "-H".into(),
                "Content-Type: text/plain".into(),
                "--data-binary".into(),
                at("report.docx"),
                upload.clone(),
            ],
        ),
        (
            "a raw body called JSON",
            vec![
                "-H".into(),
                "Content-Type: application/json".into(),
                "--data-binary".into(),
                at("report.docx"),
                upload.clone(),
            ],
        ),
        (
            "a GET carrying the file",
            vec![
                "-X".into(),
                "GET".into(),
                "-H".into(),
                "Content-Type: application/octet-stream".into(),
                "--data-binary".into(),
                at("report.docx"),
                e.url("/files"),
            ],
        ),
        (
            "a PUT whose name says text",
            vec!["-T".into(), f("report.docx"), api.clone()],
        ),
        (
            "gzip content encoding",
            vec![
                "-H".into(),
                "Content-Encoding: gzip".into(),
                "-H".into(),
                "Content-Type: application/octet-stream".into(),
                "--data-binary".into(),
                at("report.docx.gz"),
                upload.clone(),
            ],
        ),
        (
            "an encoding Sluice does not read",
            vec![
                "-H".into(),
                "Content-Encoding: br".into(),
                "--data-binary".into(),
                at("report.docx"),
                upload.clone(),
            ],
        ),
        (
            "two encodings stacked",
            vec![
                "-H".into(),
                "Content-Encoding: identity".into(),
                "-H".into(),
                "Content-Encoding: gzip".into(),
                "--data-binary".into(),
                at("report.docx.gz"),
                upload.clone(),
            ],
        ),
        (
            "a tar archive",
            vec![
                "-F".into(),
                format!("file={}", at("report.tar")),
                upload.clone(),
            ],
        ),
        (
            "bytes put before the zip signature",
            vec!["-T".into(), f("notes.txt"), api.clone()],
        ),
        (
            "base64 in a JSON field",
            vec![
                "-H".into(),
                "Content-Type: application/json".into(),
                "--data-binary".into(),
                at("report.json"),
                upload.clone(),
            ],
        ),
        (
            "base64 as a text body",
            vec![
                "-H".into(),
                "Content-Type: text/plain".into(),
                "--data-binary".into(),
                at("report.b64"),
                upload.clone(),
            ],
        ),
        (
            "base64 in gzip-encoded JSON with every '/' escaped",
            vec![
                "-H".into(),
                "Content-Type: application/json".into(),
                "-H".into(),
                "Content-Encoding: gzip".into(),
                "--data-binary".into(),
                at("php.json.gz"),
                upload.clone(),
            ],
        ),
        (
            "attached to a raw mail message, base64url in JSON",
            vec![
                "-H".into(),
                "Content-Type: application/json".into(),
                "--data-binary".into(),
                at("mail.json"),
                upload.clone(),
            ],
        ),
        (
            "indented base64 in a YAML block",
            vec![
                "-H".into(),
                "Content-Type: application/yaml".into(),
                "--data-binary".into(),
                at("report.yaml"),
                upload.clone(),
            ],
        ),
        (
            "base64 in a text file inside a zip archive",
            vec![
                "-F".into(),
                format!("file={}", at("notes.zip")),
                upload.clone(),
            ],
        ),
        (
            "base64 behind runs that decode to text",
            vec![
                "-H".into(),
                "Content-Type: application/json".into(),
                "--data-binary".into(),
                at("decoys.json"),
                upload.clone(),
            ],
        ),
        (
            "base64 in JSON with every '/' escaped",
            vec![
                "-H".into(),
                "Content-Type: application/json".into(),
                "--data-binary".into(),
                at("php.json"),
                upload.clone(),
            ],
        ),
        (
            "base64 of JSON carrying base64, in a form field",
            vec![
                "-F".into(),
                format!("note=<{}", f("twice.txt")),
                upload.clone(),
            ],
        ),
        (
            "a multipart type with two boundaries",
            vec![
                "-H".into(),
                "Content-Type: multipart/form-data; boundary=aaa; boundary=bbb".into(),
                "--data-binary".into(),
                at("report.docx"),
                upload.clone(),
            ],
        ),
        (
            "a multipart type without a boundary",
            vec![
                "-H".into(),
                "Content-Type: multipart/form-data".into(),
                "--data-binary".into(),
                at("report.docx"),
                upload.clone(),
            ],
        ),
        (
            "two content types",
            vec![
                "-H".into(),
                "Content-Type: text/plain".into(),
                "-H".into(),
                "Content-Type: application/octet-stream".into(),
                "--data-binary".into(),
                at("report.docx"),
                upload.clone(),
            ],
        ),
        (
            "HTTP/2 with a file field of another name",
            vec![
                "--http2".into(),
                "-F".into(),
                format!("x={}", at("report.docx")),
                upload.clone(),
            ],
        ),
    ];
    for (what, args) in &attempts {
        let seq = e.last_seq();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let got = e.curl_insider(&dir, &args);
        let reached = e.app_requests_after(seq);
        assert!(
            reached.is_empty(),
            "{what}: the app saw {reached:?} (curl got {} {})",
            got.status,
            got.text()
        );
        assert!(
            got.status == 403 || got.status == 0,
            "{what}: {} {}",
            got.status,
            got.text()
        );
    }
}

#[test]
#[ignore = "needs root"]
fn an_insider_cannot_step_around_interception_with_names_or_websockets() {
    let e = env("sess-names", "managed");
    let doc = std::fs::read(fixture("plain.docx")).unwrap();
    let dir = e.user_dir(&[("report.docx", &doc)]);
    let form = format!("file=@{}", dir.join("report.docx").display());
    let port = e.app.addr().port();
    // The app is used once under its name: the agent now knows its address.
    let seq = e.last_seq();
    let ok = e.curl_insider(&dir, &[&e.url("/files")]);
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(e.app_requests_after(seq).len(), 1);

    let other = format!("https://other.test:{port}/upload");
    let other_resolve = format!("other.test:{port}:{APP_IP}");
    let by_ip = format!("https://{APP_IP}:{port}/upload");
    let plain = format!("http://{APP_IP}:{port}/upload");
    let host = format!("Host: {}:{port}", demo_app::HOST);
    let attempts: Vec<(&str, Vec<&str>)> = vec![
        (
            "another server name, the app's Host",
            vec![
                "-k",
                "--resolve",
                &other_resolve,
                "-H",
                &host,
                "-F",
                &form,
                &other,
            ],
        ),
        (
            "another server name throughout",
            vec!["-k", "--resolve", &other_resolve, "-F", &form, &other],
        ),
        (
            "no server name (the address)",
            vec!["-k", "-H", &host, "-F", &form, &by_ip],
        ),
        (
            "plain HTTP to the app's TLS port",
            vec!["-H", &host, "-F", &form, &plain],
        ),
    ];
    for (what, args) in &attempts {
        let seq = e.last_seq();
        let got = e.curl_insider(&dir, args);
        let reached = e.app_requests_after(seq);
        assert!(
            reached.is_empty(),
            "{what}: the app saw {reached:?} (curl got {} {})",
            got.status,
            got.text()
        );
    }
    // A WebSocket to the app is refused by the default bundle's catalogue, and recorded.
    let seq = e.last_seq();
    let ws = e.curl_insider(
        &dir,
        &[
            "-H",
            "Connection: Upgrade",
            "-H",
            "Upgrade: websocket",
            "-H",
            "Sec-WebSocket-Version: 13",
            "-H",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "--http1.1",
            &e.url("/ws"),
        ],
    );
    assert_eq!(ws.status, 403, "{}", ws.text());
    assert!(ws.text().contains("WebSocket"), "{}", ws.text());
    assert!(e.app_requests_after(seq).is_empty());
    let ev = e.event_for("GET", "/ws");
    assert_eq!(ev["action"], "block", "{ev}");
    assert_eq!(ev["detail"], "WebSocket upgrade", "{ev}");
    // The agent counted what it intercepted by address and what it refused.
    let status = e.agent.status().unwrap();
    let proxy = &status["proxy"];
    assert!(proxy["by_address"].as_u64().unwrap() >= 2, "{status}");
    assert!(proxy["refused"].as_u64().unwrap() >= 1, "{status}");
}

/// A flood of large uploads held at once by one user: past their share of the inspection
/// budget they get the limit page, the agent stays within its budget, and another user's
/// upload is still inspected and delivered.
#[test]
#[ignore = "needs root"]
fn a_flood_of_uploads_from_one_user_leaves_room_for_the_others() {
    const MIB: usize = 1 << 20;
    let e = env_with(
        "sess-flood",
        "managed",
        "inspect_budget_bytes = 67108864\ninspect_budget_bytes_per_uid = 12582912",
    );
    let before = e.agent_peak_rss_kib();
    // Text, so that a body held whole is inspected and passes: only the limit refuses.
    let text: Vec<u8> = "quarterly numbers, nothing secret\n"
        .repeat(6 * MIB / 34)
        .into_bytes();
    let labeled = std::fs::read(fixture("confidential.docx")).unwrap();
    let dir = e.user_dir(&[("flood.txt", &text), ("labeled.docx", &labeled)]);
    let flood: Vec<Got> = std::thread::scope(|s| {
        let flooders: Vec<_> = (0..8)
            .map(|i| {
                let (e, dir) = (&e, &dir);
                s.spawn(move || {
                    let url = e.url(&format!("/api/files/flood-{i}.txt"));
                    let file = dir.join("flood.txt").display().to_string();
                    e.curl_insider(dir, &["--limit-rate", "2M", "-T", &file, &url])
                })
            })
            .collect();
        // While the flood is held, another user uploads a labeled document.
        std::thread::sleep(Duration::from_millis(1500));
        let other = e.curl_as(
            OTHER_USER,
            "alice@corp.example",
            &dir,
            &[
                "-T",
                &dir.join("labeled.docx").display().to_string(),
                &e.url("/api/files/labeled.docx"),
            ],
        );
        assert_eq!(
            other.status,
            201,
            "the other user was not served: {}",
            other.text()
        );
        flooders.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let limited: Vec<&Got> = flood.iter().filter(|g| g.status == 403).collect();
    assert!(
        !limited.is_empty(),
        "no flood upload met the limit: {:?}",
        flood.iter().map(|g| g.status).collect::<Vec<_>>()
    );
    for g in &limited {
        assert!(
            g.text().contains("too many files in inspection at once"),
            "{}",
            g.text()
        );
    }
    assert!(
        flood.iter().any(|g| g.status == 201),
        "the user's uploads within their share were refused too"
    );
    assert!(e.app.uploads().iter().any(|u| u.name == "labeled.docx"));
    let st = e.agent.status().unwrap();
    assert!(
        st["proxy"]["inspection_user_refusals"].as_u64().unwrap() >= limited.len() as u64,
        "{st}"
    );
    let grew_mib = e.agent_peak_rss_kib().saturating_sub(before) / 1024;
    assert!(grew_mib < 160, "agent peak RSS grew by {grew_mib} MiB");
}

/// Two identities in one request (a member's token in the header, a guest's in the cookie: which
/// one the app believes is the app's business): the most restrictive outcome applies, here the
/// guests' view-only protection, and the event says why.
#[test]
#[ignore = "needs root"]
fn conflicting_identities_in_one_request_get_the_most_restrictive_outcome() {
    let e = env("sess-ids", "managed");
    let original = std::fs::read(fixture("plain.docx")).unwrap();
    let info = e
        .app
        .seed("shared.docx", original.clone(), "alice@corp.example")
        .unwrap();
    let url = e.url(&format!("/files/{}/download", info.id));
    // Alice alone, a member on a managed device: the file arrives unchanged.
    let got = e.curl(Some("alice@corp.example"), &[&url]);
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.body, original);
    // Alice's token in the header beside a guest's session cookie.
    let alice = e.app.token_for("alice@corp.example").unwrap();
    let bearer = format!("Authorization: Bearer {alice}");
    let got = e.curl(Some("carol@corp.example"), &["-H", &bearer, &url]);
    assert_eq!(got.status, 200, "{}", got.text());
    assert_ne!(got.body, original, "the guest rule did not apply");
    let facts = sluice_inspect::inspect_file(
        &got.body,
        Some("shared.docx"),
        &sluice_inspect::Limits::default(),
        &sluice_inspect::dlp::Detectors::default(),
    );
    assert!(
        facts.enabled_labels().next().is_some(),
        "no label written: {facts:?}"
    );
    let ev = e.event_for("GET", "/download");
    assert_eq!(ev["action"], "protect", "{ev}");
    assert!(
        ev["identity_error"]
            .as_str()
            .is_some_and(|m| m.contains("conflicting identities")),
        "{ev}"
    );
}

/// A DNS server for tests: answers every A query with `ip` (the question echoed, one answer
/// pointing at it). Stops when the returned flag is set.
fn dns_server(
    at: &str,
    ip: std::net::Ipv4Addr,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::net::SocketAddr,
) {
    let sock = std::net::UdpSocket::bind(at).expect("DNS port");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let addr = sock.local_addr().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = stop.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            if n < 12 {
                continue;
            }
            let mut r = buf[..n].to_vec();
            r[2] = 0x81; // response, recursion desired
            r[3] = 0x80; // recursion available, no error
            r[7] = 1; // one answer
            r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
            r.extend_from_slice(&ip.octets());
            let _ = sock.send_to(&r, from);
        }
    });
    (stop, addr)
}

/// The app's address is learned from a DNS answer a steered process received, before any
/// connection to the app: a first connection there under another name is already intercepted
/// (and refused for its name), never spliced to the app.
#[test]
#[ignore = "needs root"]
fn an_app_address_from_a_dns_answer_is_intercepted_whatever_name_follows() {
    let e = env("sess-dns", "managed");
    let doc = std::fs::read(fixture("plain.docx")).unwrap();
    let dir = e.user_dir(&[("report.docx", &doc)]);
    let (stop, dns) = dns_server("127.0.0.46:53", APP_IP.parse().unwrap());
    let port = e.app.addr().port();
    // A steered process (any user) resolves the app's name, from a socket that is not
    // connected (musl's resolver) and from a connected one (glibc's).
    let (_, cg) = e.cg.child("resolver");
    for how in ["sendto", "connect"] {
        let out = InCgroup {
            cgroup: Some(cg.clone()),
            user: Some(NOBODY),
        }
        .run(
            &bin("sluice-probe"),
            &[
                "dns".into(),
                dns.to_string(),
                demo_app::HOST.into(),
                how.into(),
            ],
        )
        .expect("resolves");
        assert!(out.starts_with("answer "), "{how}: {out}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // The kernel counts the answers before the agent's reader learns from them: wait for both.
    assert!(
        wait_until(Duration::from_secs(10), || e.agent.status().is_ok_and(
            |s| s["steer"]["counters"]["dns_answers"].as_u64().unwrap_or(0) >= 2
                && s["proxy"]["dns_learned"].as_u64().unwrap_or(0) >= 1
        )),
        "no DNS answer seen or learned from: {:?}",
        e.agent.status()
    );
    // Now, with no connection to the app made yet, another name at its address.
    let seq = e.last_seq();
    let form = format!("file=@{}", dir.join("report.docx").display());
    let got = e.curl_insider(
        &dir,
        &[
            "-k",
            "--resolve",
            &format!("other.test:{port}:{APP_IP}"),
            "-H",
            &format!("Host: {}:{port}", demo_app::HOST),
            "-F",
            &form,
            &format!("https://other.test:{port}/upload"),
        ],
    );
    assert!(
        e.app_requests_after(seq).is_empty(),
        "the app saw the upload ({})",
        got.status
    );
    assert_eq!(
        got.status,
        421,
        "{} {:?}\n{}",
        got.text(),
        e.agent.status(),
        std::fs::read_to_string(&e.agent.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("other.test") || l.contains("WARN") || l.contains("ERROR"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let st = e.agent.status().unwrap();
    assert_eq!(st["proxy"]["by_address"], 1, "{st}");
    assert_eq!(st["proxy"]["spliced"], 0, "{st}");
}

/// `chown -R uid:gid path`.
fn chown_r(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
    if path.is_dir() && !path.is_symlink() {
        for e in std::fs::read_dir(path).unwrap().flatten() {
            chown_r(&e.path(), uid, gid);
        }
    }
}

/// Chromium run by an ordinary user (uid 65534) in a steered cgroup, signed in to the app: a
/// page script that sends an unlabeled document with `fetch` as text, and opens a WebSocket to
/// the app, gets neither past Sluice.
#[test]
#[ignore = "needs root"]
fn an_ordinary_users_browser_cannot_send_the_file_by_script_or_websocket() {
    use sluice_e2e::browser::{Browser, Cdp};
    let e = env("sess-browser-insider", "managed");
    let (_, client) = e.cg.child("browser-insider");
    let profile = e.dir.join("profile-insider");
    let mut b = Browser::new(&profile, Some(&e.sluice_ca)).expect("browser");
    chown_r(&profile, NOBODY.0, NOBODY.1);
    {
        use std::os::unix::fs::PermissionsExt as _;
        // The test directory holds the profile: the user must be able to reach it.
        std::fs::set_permissions(e.dir.join("."), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    b.host_rules(&format!("MAP {} {APP_IP}", demo_app::HOST))
        .in_cgroup(InCgroup {
            cgroup: Some(client),
            user: Some(NOBODY),
        })
        .timeout(Duration::from_secs(60));
    let mut cdp = Cdp::launch(&b).expect("chromium");
    cdp.navigate(&e.url("/login")).expect("login page");
    cdp.fill("input[name=user]", "bob@corp.example").unwrap();
    cdp.fill("input[name=password]", demo_app::DEFAULT_PASSWORD)
        .unwrap();
    cdp.click_and_wait_load("button[type=submit]").unwrap();
    cdp.wait_for("location.pathname === '/files'", Duration::from_secs(20))
        .expect("signed in");

    let seq = e.last_seq();
    let bytes = std::fs::read(fixture("plain.docx")).unwrap();
    let ws_url = format!("wss://{}:{}/ws", demo_app::HOST, e.app.addr().port());
    let script = format!(
        "<title>running</title><script>\
         const b = Uint8Array.from(atob('{}'), c => c.charCodeAt(0));\
         let done = [];\
         fetch('/upload', {{method: 'POST', headers: {{'Content-Type': 'text/plain'}}, body: b}})\
           .then(r => done.push('fetch ' + r.status), () => done.push('fetch failed'))\
           .then(() => {{ if (done.length == 2) document.title = done.join(' / '); }});\
         const ws = new WebSocket('{ws_url}');\
         ws.onopen = () => {{ ws.send(b); done.push('ws open'); }};\
         ws.onclose = () => {{ done.push('ws closed'); if (done.length == 2) document.title = done.join(' / '); }};\
         </script>",
        sluice_e2e::base64(&bytes)
    );
    cdp.run_in_origin(
        &script,
        "document.title !== 'running' && document.title.includes('fetch')",
        Duration::from_secs(30),
    )
    .expect("the script ran");
    let title = cdp.eval("document.title").unwrap();
    let title = title.as_str().unwrap_or_default().to_owned();
    assert!(title.contains("fetch 403"), "{title}");
    assert!(!title.contains("ws open"), "{title}");
    // The browser's own requests (its favicon) may reach the app; the upload and the socket
    // must not.
    let reached: Vec<_> = e
        .app_requests_after(seq)
        .into_iter()
        .filter(|r| r.path == "/upload" || r.path == "/ws")
        .collect();
    assert!(reached.is_empty(), "the app saw {reached:?}");
    let ev = e.event_for("POST", "/upload");
    assert_eq!(ev["action"], "block", "{ev}");
    assert_eq!(ev["files"][0]["type"], "docx", "{ev}");
    assert_eq!(ev["process"]["uid"], NOBODY.0, "{ev}");
    cdp.close().unwrap();
}

/// Key release end to end: the agent (enrolled with a real collector, fetching its release key)
/// protects a Highly Confidential download to an unmanaged device and a guest's download; in
/// Chromium, people sign in to the collector's portal through OpenID Connect at the test
/// identity provider: a person of the organisation gets the first file's password (and opens
/// the file with it) and is refused the guest's; the guest follows the link to their file, signs
/// in, gets its password (qpdf opens the PDF with it) and is refused the other; someone outside
/// the organisation is refused both; once the guest's release expires the guest is refused too.
/// Every release and refusal is an event; no password is in clear in the agent's state
/// directory or the collector's database.
#[test]
#[ignore = "needs root"]
fn protected_files_are_released_in_the_portal_to_the_people_their_template_names() {
    use serde_json::json;
    use sluice_e2e::{
        idp::{DEMO_PASSWORD, Idp, IdpUser},
        portal::{browser, sign_in, start_collector_with, wait_at},
    };
    let dir = TempDir::new("release-e2e");
    let idp = Idp::start(
        &dir.join("idp"),
        vec![
            IdpUser::new(
                "alice@corp.example",
                DEMO_PASSWORD,
                "Alice",
                &["staff", "finance"],
            ),
            IdpUser::new("bob@corp.example", DEMO_PASSWORD, "Bob", &["staff"]),
            IdpUser::new(
                "carol@corp.example",
                DEMO_PASSWORD,
                "Carol",
                &["contractors"],
            ),
            IdpUser::new("mallory@elsewhere.example", DEMO_PASSWORD, "Mallory", &[]),
        ],
    )
    .unwrap();
    let cdir = dir.join("collector");
    std::fs::create_dir_all(&cdir).unwrap();
    let bundle_pub = dir.join("bundle.pub");
    let c = start_collector_with(
        &cdir,
        &idp,
        "sluice-portal",
        None,
        &format!("bundle_public_key = \"{}\"", bundle_pub.display()),
    )
    .unwrap();
    let enroll = |config: &Path| {
        let token = c.cli(&["token", "create", "--group", "default"]).unwrap();
        let token_file = config.with_file_name("enroll.token");
        std::fs::write(&token_file, token.trim()).unwrap();
        let out = std::process::Command::new(bin("sluice"))
            .args(["enroll", "--config"])
            .arg(config)
            .args(["--collector", &c.base, "--token-file"])
            .arg(&token_file)
            .arg("--ca")
            .arg(&c.ca)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    // The guest's release ends 40 seconds after the download.
    let labels = std::fs::read_to_string(default_bundle().join("labels.yaml"))
        .unwrap()
        .replace("expires_after: 7d", "expires_after: 40s");
    assert!(labels.contains("40s"));
    let e = env_opts(
        "release",
        "unmanaged",
        Opts {
            bundle_files: vec![("labels.yaml", labels)],
            collector: Some((c.base.clone(), c.ca.clone(), &enroll)),
            ..Opts::default()
        },
    );
    // The collector learns the organisation's directory from the bundle it publishes.
    std::fs::copy(e.dir.join("bundle.pub"), &bundle_pub).unwrap();
    c.cli(&[
        "bundle",
        "publish",
        e.dir.join("bundle.tar.gz").to_str().unwrap(),
    ])
    .unwrap();

    // Alice downloads a Highly Confidential document; Carol, a guest, a PDF.
    let keyed = wait_until(Duration::from_secs(30), || {
        e.dir.join("state/release-key.pub").exists()
    });
    assert!(keyed, "the agent did not fetch the release key");
    let original = std::fs::read(fixture("highly-confidential.docx")).unwrap();
    let (got, hc) = download(&e, "alice@corp.example", "plan.docx", original);
    let r1 = got.header("sluice-protected").expect("a release id");
    assert_eq!(
        got.header("link").as_deref(),
        Some(format!("<{}/files/{r1}>; rel=\"help\"", c.base).as_str())
    );
    let (got, pdf) = download(
        &e,
        "carol@corp.example",
        "terms.pdf",
        std::fs::read(fixture("plain.pdf")).unwrap(),
    );
    let guest_downloaded = std::time::Instant::now();
    let r2 = got.header("sluice-protected").expect("a release id");

    let mut cdp = browser(&dir, &c, &idp).unwrap();
    let reveal = |cdp: &mut sluice_e2e::browser::Cdp, id: &str| -> String {
        // The agent ships the event within seconds; until then the link is not known.
        let known = wait_until(Duration::from_secs(30), || {
            cdp.navigate(&format!("{}/files/{id}", c.base)).is_ok()
                && cdp.eval("!!document.querySelector('#reveal')").ok() == Some(json!(true))
        });
        assert!(
            known,
            "release {id} not offered: {}",
            cdp.html().unwrap_or_default()
        );
        cdp.click_and_wait_load("#reveal").unwrap();
        cdp.text("#password").unwrap()
    };
    let refused = |cdp: &mut sluice_e2e::browser::Cdp, id: &str| -> String {
        cdp.navigate(&format!("{}/files/{id}", c.base)).unwrap();
        assert!(
            cdp.eval("!!document.querySelector('#reveal')").unwrap() == json!(false),
            "{id} offered"
        );
        cdp.text("#refused").unwrap()
    };
    let sign_out = |cdp: &mut sluice_e2e::browser::Cdp| {
        cdp.navigate(&format!("{}/me", c.base)).unwrap();
        cdp.click_and_wait_load("#sign-out").unwrap();
    };

    // Bob, of the organisation: the Highly Confidential document's password opens it.
    sign_in(&mut cdp, &c, &idp, "bob@corp.example", Some(DEMO_PASSWORD)).unwrap();
    wait_at(&mut cdp, "/me").unwrap();
    let pw1 = reveal(&mut cdp, &r1);
    let plain = e.dir.join("bob-plan.docx");
    assert!(
        demo_app::office_decrypt(&hc, &pw1, &plain),
        "the released password opens it"
    );
    assert_eq!(
        demo_app::read_label(&plain, false).unwrap()["label"],
        "9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d"
    );
    // ... and not the guest's.
    let _ = wait_until(Duration::from_secs(30), || {
        refused(&mut cdp, &r2).contains("does not let you open it")
    });
    assert!(refused(&mut cdp, &r2).contains("does not let you open it"));
    cdp.navigate(&format!("{}/files", c.base)).unwrap();
    let list = cdp.text("#files").unwrap();
    assert!(
        list.contains("plan.docx") && !list.contains("terms.pdf"),
        "{list}"
    );
    sign_out(&mut cdp);

    // Carol follows her link: signed in, she is back at it, and the password opens the PDF.
    cdp.navigate(&format!("{}/files/{r2}", c.base)).unwrap();
    assert!(cdp.url().unwrap().ends_with("/login"));
    cdp.click_and_wait_load("#oidc-sign-in").unwrap();
    cdp.fill("input[name=email]", "carol@corp.example").unwrap();
    cdp.fill("input[name=password]", DEMO_PASSWORD).unwrap();
    cdp.click_and_wait_load("#sign-in").unwrap();
    wait_at(&mut cdp, &format!("/files/{r2}")).unwrap();
    let pw2 = reveal(&mut cdp, &r2);
    assert!(pdf_decrypt(&pdf, &pw2, &e.dir.join("carol-terms.pdf")));
    assert!(!pdf_decrypt(&pdf, &pw1, &e.dir.join("carol-wrong.pdf")));
    // A guest is not of the organisation.
    assert!(refused(&mut cdp, &r1).contains("does not let you open it"));
    sign_out(&mut cdp);

    // Someone outside the organisation gets neither.
    sign_in(
        &mut cdp,
        &c,
        &idp,
        "mallory@elsewhere.example",
        Some(DEMO_PASSWORD),
    )
    .unwrap();
    wait_at(&mut cdp, "/me").unwrap();
    for id in [&r1, &r2] {
        assert!(refused(&mut cdp, id).contains("does not let you open it"));
    }
    sign_out(&mut cdp);

    // After its expiry the guest's link gives nothing, to the guest too.
    let left = Duration::from_secs(42).saturating_sub(guest_downloaded.elapsed());
    std::thread::sleep(left);
    sign_in(
        &mut cdp,
        &c,
        &idp,
        "carol@corp.example",
        Some(DEMO_PASSWORD),
    )
    .unwrap();
    wait_at(&mut cdp, "/me").unwrap();
    assert!(refused(&mut cdp, &r2).contains("access to this file ended"));
    cdp.close().unwrap();

    // Every release and refusal is in the activity log.
    let log = c.cli(&["query", "app:portal"]).unwrap();
    let events: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    // (The portal's sign-ins are there too, as `login` activities.)
    let count = |user: &str, action: &str| {
        events
            .iter()
            .filter(|v| {
                v["actor"]["user"]["email_addr"] == user
                    && v["sluice"]["activity"] == "release"
                    && v["sluice"]["action"] == action
            })
            .count()
    };
    assert!(
        events.iter().any(|v| v["sluice"]["activity"] == "login"
            && v["actor"]["user"]["email_addr"] == "carol@corp.example"),
        "{log}"
    );
    assert_eq!(count("bob@corp.example", "allow"), 1, "{log}");
    assert!(count("bob@corp.example", "block") >= 1, "{log}");
    assert_eq!(count("carol@corp.example", "allow"), 1, "{log}");
    assert!(count("carol@corp.example", "block") >= 2, "{log}");
    assert!(count("mallory@elsewhere.example", "block") >= 2, "{log}");

    // No password in clear on the endpoint or in the collector's database.
    let mut files = walk(&e.dir.join("state"));
    files.extend(walk(&cdir.join("state")));
    for f in files {
        let bytes = std::fs::read(&f).unwrap_or_default();
        for pw in [&pw1, &pw2] {
            assert!(
                !bytes.windows(pw.len()).any(|w| w == pw.as_bytes()),
                "a password in clear in {}",
                f.display()
            );
        }
    }
}

/// A real collector with the test identity provider (alice is a portal admin) and an agent
/// enrolled to it on a `posture` device, with `bundle_files` replaced in the default bundle and
/// `collector_extra` in the collector's config; the bundle is published at the collector too.
struct Central {
    idp: sluice_e2e::idp::Idp,
    c: sluice_e2e::portal::Collector,
    e: Env,
    dir: TempDir,
    agent_id: String,
}

fn central(
    tag: &str,
    posture: &str,
    bundle_files: Vec<(&str, String)>,
    collector_extra: &str,
    proxy: &str,
) -> Central {
    use sluice_e2e::{
        idp::{DEMO_PASSWORD, Idp, IdpUser},
        portal::start_collector_with,
    };
    let dir = TempDir::new(&format!("central-{tag}"));
    let idp = Idp::start(
        &dir.join("idp"),
        vec![
            IdpUser::new(
                "alice@corp.example",
                DEMO_PASSWORD,
                "Alice",
                &["staff", "finance"],
            ),
            IdpUser::new("bob@corp.example", DEMO_PASSWORD, "Bob", &["staff"]),
        ],
    )
    .unwrap();
    let cdir = dir.join("collector");
    std::fs::create_dir_all(&cdir).unwrap();
    let bundle_pub = dir.join("bundle.pub");
    let c = start_collector_with(
        &cdir,
        &idp,
        "sluice-portal",
        None,
        &format!(
            "bundle_public_key = \"{}\"\n{collector_extra}",
            bundle_pub.display()
        ),
    )
    .unwrap();
    let enroll = |config: &Path| {
        let token = c.cli(&["token", "create", "--group", "default"]).unwrap();
        let token_file = config.with_file_name("enroll.token");
        std::fs::write(&token_file, token.trim()).unwrap();
        let out = std::process::Command::new(bin("sluice"))
            .args(["enroll", "--config"])
            .arg(config)
            .args(["--collector", &c.base, "--token-file"])
            .arg(&token_file)
            .arg("--ca")
            .arg(&c.ca)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    let e = env_opts(
        tag,
        posture,
        Opts {
            proxy,
            bundle_files,
            collector: Some((c.base.clone(), c.ca.clone(), &enroll)),
            extra: "",
        },
    );
    std::fs::copy(e.dir.join("bundle.pub"), &bundle_pub).unwrap();
    c.cli(&[
        "bundle",
        "publish",
        e.dir.join("bundle.tar.gz").to_str().unwrap(),
    ])
    .unwrap();
    let enrollment: serde_json::Value =
        serde_json::from_slice(&std::fs::read(e.dir.join("state/report/enrollment.json")).unwrap())
            .unwrap();
    let agent_id = enrollment["agent_id"].as_str().unwrap().to_owned();
    Central {
        idp,
        c,
        e,
        dir,
        agent_id,
    }
}

/// Polls `f` every 100 ms for up to `within`: how long it took to hold, or none.
fn time_until(within: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = std::time::Instant::now();
    while start.elapsed() < within {
        if f() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

#[test]
#[ignore = "needs root"]
fn a_device_quarantined_in_the_portal_is_cut_off_within_seconds_and_released_again() {
    use sluice_e2e::{
        idp::DEMO_PASSWORD,
        portal::{browser, sign_in, wait_at},
    };
    let k = central("quarantine", "managed", Vec::new(), "", "");
    let e = &k.e;
    let list = || e.curl(Some("bob@corp.example"), &[&e.url("/files")]);
    assert_eq!(list().status, 200);
    let mut cdp = browser(&k.dir, &k.c, &k.idp).unwrap();
    sign_in(
        &mut cdp,
        &k.c,
        &k.idp,
        "alice@corp.example",
        Some(DEMO_PASSWORD),
    )
    .unwrap();
    wait_at(&mut cdp, "/events").ok();
    // The device reports within seconds of starting; its page has the mark form.
    let listed = wait_until(Duration::from_secs(30), || {
        cdp.navigate(&format!("{}/devices/{}", k.c.base, k.agent_id))
            .is_ok()
            && cdp.eval("!!document.querySelector('#mark-form')").ok()
                == Some(serde_json::json!(true))
    });
    assert!(listed, "no device page: {}", cdp.html().unwrap_or_default());
    cdp.fill("#level", "quarantined").unwrap();
    cdp.fill("#reason", "reported stolen").unwrap();
    cdp.click_and_wait_load("#mark-submit").unwrap();
    let shown = cdp
        .text("#mark")
        .unwrap_or_else(|_| cdp.html().unwrap_or_default());
    assert!(shown.contains("quarantined"), "{shown}");
    let blocked = time_until(Duration::from_secs(10), || list().status == 403)
        .expect("the quarantine did not reach the agent within 10 s");
    eprintln!("quarantine reached the agent in {} ms", blocked.as_millis());
    let got = list();
    let text = got.text();
    assert!(
        text.contains("quarantined") && text.contains("reported stolen"),
        "{text}"
    );
    // Another user on this device is cut off too: it is the device that is marked.
    assert_eq!(
        e.curl(Some("alice@corp.example"), &[&e.url("/files")])
            .status,
        403
    );

    // Lifting it restores access.
    cdp.navigate(&format!("{}/devices/{}", k.c.base, k.agent_id))
        .unwrap();
    cdp.fill("#level", "none").unwrap();
    cdp.click_and_wait_load("#mark-submit").unwrap();
    time_until(Duration::from_secs(10), || list().status == 200)
        .expect("lifting the quarantine did not reach the agent");
    cdp.close().unwrap();

    // Both changes are in the activity log, with who made them.
    let log = k.c.cli(&["query", "app:sluice"]).unwrap();
    assert!(
        log.contains("quarantined") && log.contains("alice@corp.example"),
        "{log}"
    );
    assert!(log.contains("-> none"), "{log}");
}

/// A prepared system tree for the posture checks: `/` is ext4 on the device-mapper device
/// dm-1, which is LUKS when `encrypted`.
fn posture_tree(dir: &Path, encrypted: bool) {
    let w = |rel: &str, text: &str| {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    w(
        "proc/self/mountinfo",
        "22 1 0:21 / /proc rw - proc proc rw\n29 1 253:1 / / rw,relatime - ext4 /dev/mapper/root rw\n",
    );
    w("sys/devices/virtual/block/dm-1/dm/name", "root\n");
    set_encrypted(dir, encrypted);
    let link = dir.join("sys/dev/block/253:1");
    if !link.exists() {
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink("../../devices/virtual/block/dm-1", link).unwrap();
    }
}

fn set_encrypted(dir: &Path, encrypted: bool) {
    let uuid = if encrypted {
        "CRYPT-LUKS2-0f1e2d3c4b5a69788796a5b4c3d2e1f0-root\n"
    } else {
        "LVM-Xq2bHn0aVw8R3kTz\n"
    };
    let tmp = dir.join("sys/devices/virtual/block/dm-1/dm/uuid.tmp");
    std::fs::write(&tmp, uuid).unwrap();
    std::fs::rename(tmp, dir.join("sys/devices/virtual/block/dm-1/dm/uuid")).unwrap();
}

/// One client connection kept open (Python's http.client in the steered cgroup): each
/// `get(path)` is a request on it; the answer is the status, the local port (the same on every
/// request: the same session) and the body.
struct OpenSession {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

const OPEN_SESSION_PY: &str = r#"
import http.client, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[1])
conn = http.client.HTTPSConnection(sys.argv[2], int(sys.argv[3]), context=ctx)
conn._create_connection = lambda addr, *a, **k: __import__("socket").create_connection((sys.argv[4], addr[1]), *a, **k)
cookie = sys.argv[5]
for line in sys.stdin:
    conn.request("GET", line.strip(), headers={"Cookie": cookie, "Accept": "text/plain"})
    r = conn.getresponse()
    body = r.read().decode("utf-8", "replace").replace("\n", " ")
    print(r.status, conn.sock.getsockname()[1], body[:400], flush=True)
"#;

impl OpenSession {
    fn open(e: &Env, user: &str) -> Self {
        use std::process::Stdio;
        let (_, dir) = e.cg.child("session");
        let token = e.app.token_for(user).unwrap();
        let mut child = InCgroup::at(&dir)
            .command(
                Path::new("/usr/bin/python3"),
                &[
                    "-c".into(),
                    OPEN_SESSION_PY.into(),
                    e.sluice_ca.display().to_string(),
                    demo_app::HOST.into(),
                    e.app.addr().port().to_string(),
                    APP_IP.into(),
                    format!("{}={token}", demo_app::COOKIE),
                ],
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        Self {
            child,
            stdin,
            stdout,
        }
    }

    fn get(&mut self, path: &str) -> (u16, u16, String) {
        use std::io::{BufRead as _, Write as _};
        writeln!(self.stdin, "{path}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let mut parts = line.trim_end().splitn(3, ' ');
        let status = parts.next().unwrap_or("0").parse().unwrap_or(0);
        let port = parts.next().unwrap_or("0").parse().unwrap_or(0);
        (status, port, parts.next().unwrap_or("").to_owned())
    }
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
#[ignore = "needs root"]
fn a_device_measured_non_compliant_is_blocked_on_its_open_session_until_fixed() {
    let tree = TempDir::new("posture-root");
    posture_tree(&tree, true);
    let posture = "interval_s: 10\nchecks:\n  - id: disk\n    kind: disk_encrypted\nrules:\n  - tag: compliant\n    all_pass: [disk]\n".to_owned();
    let policy = "policies:\n  - id: block-noncompliant\n    kind: access\n    priority: 150\n    when:\n      devices: [managed]\n      not_device_tags: [compliant]\n    action: block\n    message: device-not-compliant\n".to_owned();
    let k = central(
        "posture",
        "managed",
        vec![
            ("posture.yaml", posture),
            ("policies/posture-test.yaml", policy),
        ],
        "",
        &format!("[posture]\nroot = \"{}\"", tree.display()),
    );
    let e = &k.e;
    let mut s = OpenSession::open(e, "bob@corp.example");
    // Measured compliant (at start): the session works.
    let first = time_until(Duration::from_secs(20), || s.get("/files").0 == 200);
    assert!(first.is_some(), "never compliant: {:?}", s.get("/files"));
    let (_, port, _) = s.get("/files");

    // The disk is found unencrypted: the next request of the same session is blocked.
    set_encrypted(&tree, false);
    let mut last = (0, 0, String::new());
    // Evaluated every 10 s: within 10 s (and the time one evaluation takes).
    let took = time_until(Duration::from_secs(20), || {
        last = s.get("/files");
        last.0 == 403
    })
    .unwrap_or_else(|| panic!("not blocked after the disk check failed: {last:?}"));
    eprintln!(
        "non-compliance applied to the open session in {} ms",
        took.as_millis()
    );
    assert_eq!(last.1, port, "the same connection");
    assert!(last.2.contains("device checks"), "{}", last.2);
    assert!(last.2.contains("disk: fail"), "{}", last.2);

    // The change is an event at the collector, with the failing check and no tag.
    let mut log = String::new();
    let reported = wait_until(Duration::from_secs(20), || {
        log =
            k.c.cli(&["query", "class:device"])
                .unwrap_or_else(|e| e.to_string());
        log.lines().any(|l| {
            serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
                v["posture"]["checks"][0]["status"] == "fail"
                    && v["posture"]["tags"]
                        .as_array()
                        .is_none_or(|t| !t.iter().any(|x| x == "compliant"))
            })
        })
    });
    assert!(reported, "no posture event with the failed check: {log}");

    // Fixed: the next evaluation lifts it, on the same session again.
    set_encrypted(&tree, true);
    let took = time_until(Duration::from_secs(20), || {
        last = s.get("/files");
        last.0 == 200
    })
    .unwrap_or_else(|| panic!("still blocked after the fix: {last:?}"));
    eprintln!("the fix applied in {} ms", took.as_millis());
    assert_eq!(last.1, port, "the same connection");
}

#[test]
#[ignore = "needs root"]
fn a_mass_download_raises_an_alert_that_blocks_that_user_until_it_is_resolved_in_the_portal() {
    use sluice_e2e::{
        idp::DEMO_PASSWORD,
        portal::{browser, sign_in, wait_at},
    };
    let k = central(
        "anomaly",
        "managed",
        Vec::new(),
        "[detection.mass_download]\nfloor = 8\nwindow_s = 300\n\
         raise_risk = { level = \"high\", for_s = 3600 }\n",
        "",
    );
    let e = &k.e;
    let confidential = std::fs::read(fixture("confidential.docx")).unwrap();
    let general = std::fs::read(fixture("plain.docx")).unwrap();
    let mut ids = Vec::new();
    for i in 0..12 {
        ids.push(
            e.app
                .seed(
                    &format!("plan-{i}.docx"),
                    confidential.clone(),
                    "alice@corp.example",
                )
                .unwrap()
                .id,
        );
    }
    let menu = e
        .app
        .seed("menu.docx", general, "alice@corp.example")
        .unwrap()
        .id;
    let get =
        |user: &str, id: &str| e.curl(Some(user), &[&e.url(&format!("/files/{id}/download"))]);
    // Bob's scripted burst: eight Confidential files (the detector's floor) in a few seconds.
    for id in &ids[..8] {
        let g = get("bob@corp.example", id);
        assert_eq!(g.status, 200, "{}", g.text());
    }
    let burst = std::time::Instant::now();
    // The alert reaches the agent: Bob's next Confidential download is blocked with the message.
    let mut last = None;
    let took = time_until(Duration::from_secs(10), || {
        let g = get("bob@corp.example", &ids[10]);
        let blocked = g.status == 403;
        last = Some(g);
        blocked
    });
    let last = last.unwrap();
    let took = took.unwrap_or_else(|| {
        panic!(
            "Bob was not blocked within 10 s of the burst ({}): {}",
            last.status,
            last.text()
        )
    });
    eprintln!(
        "mass download burst to block on the agent: {} ms",
        burst.elapsed().as_millis()
    );
    let _ = took;
    let text = last.text();
    assert!(
        text.contains("unusual activity") && text.contains("Mass download"),
        "{text}"
    );
    // Another user passes, and Bob still gets a General file.
    assert_eq!(get("alice@corp.example", &ids[10]).status, 200);
    assert_eq!(get("bob@corp.example", &menu).status, 200);

    // An admin resolves the alert in the portal: Bob's access comes back.
    let mut cdp = browser(&k.dir, &k.c, &k.idp).unwrap();
    sign_in(
        &mut cdp,
        &k.c,
        &k.idp,
        "alice@corp.example",
        Some(DEMO_PASSWORD),
    )
    .unwrap();
    wait_at(&mut cdp, "/events").ok();
    cdp.navigate(&format!("{}/alerts?user=bob%40corp.example", k.c.base))
        .unwrap();
    let list = cdp.text("#alerts").unwrap();
    assert!(
        list.contains("mass_download") || list.contains("Mass download"),
        "{list}"
    );
    cdp.click_and_wait_load("#alerts tr[data-alert] a").unwrap();
    let evidence = cdp.text("#evidence").unwrap();
    assert!(evidence.contains("plan-"), "{evidence}");
    cdp.click_and_wait_load("#alert-resolved").unwrap();
    let resolved = std::time::Instant::now();
    time_until(Duration::from_secs(10), || {
        get("bob@corp.example", &ids[11]).status == 200
    })
    .expect("resolving the alert did not restore Bob's downloads within 10 s");
    eprintln!(
        "alert resolved to access restored: {} ms",
        resolved.elapsed().as_millis()
    );
    cdp.close().unwrap();

    // The alert, the risk raised and lowered, are all in the activity log.
    let log = k.c.cli(&["query", "app:sluice"]).unwrap();
    assert!(log.contains("bob@corp.example"), "{log}");
    assert!(log.contains("-> high") && log.contains("-> none"), "{log}");
}

/// Malware scanning through ICAP with a real scanner (c-icap and ClamAV from Debian's packages,
/// with a signature for the EICAR test file the harness writes): a text file carrying EICAR is
/// blocked on upload (the app never sees it) and on download, with the message naming the
/// threat, and its event says what the scanner found; a clean file passes; with the scanner
/// stopped, the app's not-inspectable action applies to uploads.
#[test]
#[ignore = "needs root"]
fn files_the_malware_scanner_flags_are_blocked_both_ways_and_a_stopped_scanner_is_not_inspectable()
{
    use sluice_e2e::icap::{EICAR, EICAR_BODY_SIGNATURE, Scanner};
    let mut scanner = Scanner::start().expect("scanner");
    let extra = format!(
        "[icap]\nurl = \"{}\"\ntimeout_ms = 2000\npreview = 1024\n",
        scanner.service_uri("virus_scan")
    );
    let e = env_opts(
        "sess-icap",
        "managed",
        Opts {
            extra: &extra,
            ..Opts::default()
        },
    );
    let alice = Some("alice@corp.example");
    let mut infected = b"meeting notes\n".repeat(200);
    infected.extend_from_slice(EICAR);
    let dir = e.dir.join("icap-files");
    std::fs::create_dir_all(&dir).expect("dir");
    let bad = dir.join("notes.txt");
    std::fs::write(&bad, &infected).expect("file");
    let good = dir.join("clean.txt");
    std::fs::write(&good, b"meeting notes\n".repeat(200)).expect("file");

    let before = e.last_seq();
    let up = e.upload_json(alice, &format!("file=@{}", bad.display()));
    assert_eq!(up.status, 403, "{}", up.text());
    assert!(up.text().contains(EICAR_BODY_SIGNATURE), "{}", up.text());
    assert!(
        e.app_requests_after(before)
            .iter()
            .all(|r| r.method != "POST"),
        "the app saw the infected upload"
    );
    let incident = up.header("x-sluice-incident").expect("incident");
    let ev = e.event_by_incident(&incident);
    assert_eq!(ev["policy"], "block-malware", "{ev}");
    assert!(
        ev["files"][0]["malware"]
            .as_str()
            .is_some_and(|m| m.starts_with(EICAR_BODY_SIGNATURE)),
        "{ev}"
    );

    let ok = e.upload_json(alice, &format!("file=@{}", good.display()));
    assert!(
        ok.status < 300,
        "a clean file passes: {} {}",
        ok.status,
        ok.text()
    );

    let info = e
        .app
        .seed("invoice.txt", infected.clone(), "alice@corp.example")
        .expect("seed");
    let down = e.curl(alice, &[&e.url(&format!("/files/{}/download", info.id))]);
    assert_eq!(down.status, 403, "{}", down.text());
    assert!(
        down.text().contains("malware scanner found"),
        "{}",
        down.text()
    );
    assert!(
        !down.body.windows(EICAR.len()).any(|w| w == EICAR),
        "the file itself was delivered"
    );

    // The scanner stops: uploads get the app's not-inspectable action, saying why.
    scanner.stop();
    let started = std::time::Instant::now();
    let down_scan = e.upload_json(alice, &format!("file=@{}", good.display()));
    println!(
        "scanner stopped: upload answered {} in {:?}",
        down_scan.status,
        started.elapsed()
    );
    assert_eq!(down_scan.status, 403, "{}", down_scan.text());
    assert!(
        down_scan.text().contains("malware scan failed"),
        "{}",
        down_scan.text()
    );
}
