//! The session controls (`sluice::session::Controls`) driven through the real proxy, TLS and HTTP
//! stack by real curl, without root: a fixed origin source stands in for kernel steering (as in
//! `hooks.rs`), the origin is the demo file-sharing app over TLS, and the policies are the default
//! bundle (`policies/default`) compiled as the agent compiles it, plus, where a test needs a
//! decision the default bundle only takes for addresses a rootless test cannot have, a small extra
//! policy file. The documents are made here with `sluice_inspect`'s writers, so the tests need no
//! generated fixtures. Every activity event the reporter receives is kept and checked.
#![allow(clippy::unwrap_used)]

use std::{
    path::PathBuf,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use sluice::{
    bundle::Active,
    config::ProxySettings,
    event::ActivityEvent,
    proxy::{
        Proxy, ProxyStats,
        ca::{self, Ca},
        catalog::Catalog,
        record::{ConnectionRecord, Reporter, RequestRecord},
    },
    session::Controls,
};
use sluice_e2e::{
    Got, TempDir,
    demo_app::{self, DemoApp, DemoOptions},
    wait_until,
};
use sluice_inspect::{Applied, FileFacts, FileType, LabelSpec, Limits, dlp::Detectors};
use sluice_policy::{
    PolicySet, bundle,
    model::{Action, Activity, Client, Device, Kind},
};

const CONFIDENTIAL: &str = "4e1d2c3b-5a69-4b7c-8d9e-0f1a2b3c4d5e";
const HIGHLY_CONFIDENTIAL: &str = "9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d";
const TENANT: &str = "8f6a7c1e-1d2b-4c3d-9e8f-0a1b2c3d4e5f";

/// Decisions the default bundle takes only for sources a rootless test cannot have (its access
/// block is for risky address ranges; the client here is always 127.0.0.1), so the tests that need
/// them add this file: contractors may not use the app at all, and downloads naming a project code
/// name are stopped.
const SEAM_POLICIES: (&str, &str) = (
    "policies/seam.yaml",
    r#"
policies:
  - id: block-contractors
    kind: access
    priority: 200
    description: Contractors do not use the file-sharing app.
    when:
      apps: [files]
      groups: [contractors]
    action: block
    message: contractors
  - id: block-codename-downloads
    kind: session
    priority: 100
    description: Documents naming a project code name are not downloaded.
    when:
      apps: [files]
      activities: [download]
      file:
        dlp: [{ detector: "keyword:project-codenames", min: 1 }]
    action: block
    message: codename-download
"#,
);

/// The messages of [`SEAM_POLICIES`], appended to the bundle's `templates.yaml`.
const SEAM_TEMPLATES: (&str, &str) = (
    "templates.yaml",
    r#"
  contractors:
    title: "Blocked: contractors do not use this app"
    text: "{app} is not open to contractors (policy {policy}, incident {incident})."
    fix: Ask your contact at the company to share the file another way.
  codename-download:
    title: "Download blocked: the file names a project code name"
    text: "{file} was not downloaded from {app}: it names a project code name. {fix} (incident {incident})"
    fix: Ask the file's owner for a copy without code names.
"#,
);

const SEAM: &[(&str, &str)] = &[SEAM_POLICIES, SEAM_TEMPLATES];

// ---------------------------------------------------------------------------------------------
// the rig

/// Keeps every request record and activity event the proxy reports.
#[derive(Default)]
struct Collect {
    requests: Mutex<Vec<RequestRecord>>,
    events: Mutex<Vec<ActivityEvent>>,
}

impl Reporter for Collect {
    fn wants_requests(&self) -> bool {
        true
    }
    fn request(&self, rec: RequestRecord) {
        self.requests.lock().unwrap().push(rec);
    }
    fn connection(&self, _rec: ConnectionRecord) {}
    fn activity(&self, ev: ActivityEvent) {
        self.events.lock().unwrap().push(ev);
    }
}

/// The default bundle as the agent compiles it (the files of `bundle::build` less the manifest
/// and signatures), with each of `extra` appended to the file of its name (a new file when there
/// is none).
fn policy_set(extra: &[(&str, &str)]) -> PolicySet {
    let dir = demo_app::workspace_root().join("policies/default");
    let mut files = bundle::build(&dir, Some("7"))
        .expect("the default bundle builds")
        .files;
    files.remove(bundle::MANIFEST);
    files.remove(bundle::SIGNATURES);
    for (name, text) in extra {
        let file = files.entry((*name).to_owned()).or_default();
        if !file.is_empty() && !file.ends_with(b"\n") {
            file.push(b'\n');
        }
        file.extend_from_slice(text.as_bytes());
    }
    PolicySet::compile("7", &files).expect("the bundle compiles")
}

/// The incident id of a page Sluice answered with.
trait Incident {
    fn incident(&self) -> String;
}

impl Incident for Got {
    fn incident(&self) -> String {
        self.header(sluice::proxy::pages::INCIDENT_HEADER)
            .unwrap_or_else(|| panic!("no incident header: {}", self.headers))
    }
}

/// The session controls in front of the demo app, on a runtime of the rig's own.
struct Rig {
    app: DemoApp,
    port: u16,
    sluice_ca: PathBuf,
    reporter: Arc<Collect>,
    shutdown: tokio_util::sync::CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    rt: tokio::runtime::Runtime,
    dir: TempDir,
    seq: AtomicU64,
    /// The release key `protect` seals passwords to.
    release: sluice_protocol::seal::OpeningKey,
}

impl Rig {
    fn start(tag: &str, device: Device, extra: &[(&str, &str)]) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let app = DemoApp::start(DemoOptions::tls().expect("demo options")).expect("demo app");
        let dir = TempDir::new(&format!("seam-{tag}"));
        ca::init(&dir.join("ca"), "Sluice Interception CA").expect("ca");
        let ca = Ca::load_dir(&dir.join("ca")).expect("ca loads");
        let sluice_ca = dir.join("sluice-ca.pem");
        std::fs::write(&sluice_ca, ca.cert_pem()).expect("ca pem");

        let set = policy_set(extra);
        let catalog = Catalog::in_force(&[], Some(&set), &[]).expect("catalog");
        let active = Active::default();
        active.store(Some(Arc::new(set)));

        let release = sluice_protocol::seal::OpeningKey::generate().expect("release key");
        let protector = Arc::new(sluice::session::Protector::new(Some(
            "https://collector.test".into(),
        )));
        protector.set_key(release.public().clone());
        let settings = ProxySettings {
            port: 0,
            ..ProxySettings::default()
        };
        let stats = Arc::new(ProxyStats::default());
        let reporter = Arc::new(Collect::default());
        let app_ca = app.ca_file().expect("the app's CA file");
        let shared = sluice_e2e::fixed_proxy(
            app.addr(),
            "curl",
            &dir.join("ca"),
            &app_ca,
            catalog,
            Arc::new(Controls::new(active, device).with_protector(protector)),
            reporter.clone(),
            settings,
            stats.clone(),
        )
        .expect("proxy state");
        let shutdown = tokio_util::sync::CancellationToken::new();
        // Any port: the system's stays bound by the proxy.
        let proxy = rt.block_on(Proxy::bind(shared)).expect("bind");
        let port = u16::try_from(stats.snapshot().port).expect("port");
        let task = Some(rt.spawn(proxy.run(shutdown.clone())));
        Self {
            app,
            port,
            sluice_ca,
            reporter,
            shutdown,
            task,
            rt,
            dir,
            seq: AtomicU64::new(0),
            release,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://{}:{}{path}", demo_app::HOST, self.port)
    }

    fn scratch(&self, what: &str) -> PathBuf {
        self.dir.join(format!(
            "{what}-{}",
            self.seq.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// A file in the rig's directory (for curl's `-F file=@` and `-T`).
    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// curl through the proxy as `user` (the app's session cookie; none: anonymous).
    fn curl(&self, user: Option<&str>, args: &[&str]) -> Got {
        self.try_curl(user, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Rig::curl`]; a failure of curl is an `Err` with its message.
    fn try_curl(&self, user: Option<&str>, args: &[&str]) -> Result<Got, String> {
        let (head, body) = (self.scratch("head"), self.scratch("body"));
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "30", "--cacert"])
            .arg(&self.sluice_ca)
            .args([
                "--resolve",
                &format!("{}:{}:127.0.0.1", demo_app::HOST, self.port),
            ])
            .arg("-D")
            .arg(&head)
            .arg("-o")
            .arg(&body)
            .args(["-w", "%{http_code}"]);
        if let Some(u) = user {
            let token = self.app.token_for(u).expect("token");
            cmd.args(["-H", &format!("Cookie: {}={token}", demo_app::COOKIE)]);
        }
        let out = cmd.args(args).output().expect("curl runs");
        let got = out.status.success().then(|| Got {
            status: String::from_utf8_lossy(&out.stdout).trim().parse().unwrap(),
            headers: std::fs::read_to_string(&head).unwrap(),
            body: std::fs::read(&body).unwrap(),
        });
        let _ = std::fs::remove_file(head);
        let _ = std::fs::remove_file(body);
        got.ok_or_else(|| {
            format!(
                "curl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })
    }

    fn events(&self) -> Vec<ActivityEvent> {
        self.reporter.events.lock().unwrap().clone()
    }

    /// The one event that `pick` chooses (waits for it; fails on none, or more than one).
    fn event(&self, what: &str, pick: impl Fn(&ActivityEvent) -> bool) -> ActivityEvent {
        let mut found = Vec::new();
        wait_until(Duration::from_secs(10), || {
            found = self.events().into_iter().filter(|e| pick(e)).collect();
            !found.is_empty()
        });
        assert_eq!(found.len(), 1, "events for {what}: {found:#?}");
        found.remove(0)
    }

    fn event_by_incident(&self, incident: &str) -> ActivityEvent {
        self.event(incident, |e| e.incident == incident)
    }

    /// The event of the request whose URL ends with `suffix` (a unique query in these tests).
    fn event_for(&self, suffix: &str) -> ActivityEvent {
        self.event(suffix, |e| e.url.ends_with(suffix))
    }

    /// Stops the proxy and waits for its task, so that nothing more is reported.
    fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = self.rt.block_on(task);
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop();
        self.app.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// documents

const CT: &str = r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"><Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/><Default Extension="xml" ContentType="application/xml"/><Override PartName="/word/document.xml" ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>"#;
const RELS: &str = r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" Target="word/document.xml"/></Relationships>"#;

fn facts(bytes: &[u8]) -> FileFacts {
    sluice_inspect::inspect_file(bytes, None, &Limits::default(), &Detectors::default())
}

/// A minimal Word document saying `text`, without a label.
fn docx(text: &str) -> Vec<u8> {
    let doc = format!(
        r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"><w:body><w:p><w:r><w:t>{text}</w:t></w:r></w:p></w:body></w:document>"#
    );
    let bytes = sluice_inspect::zip::build(&[
        ("[Content_Types].xml", CT.as_bytes()),
        ("_rels/.rels", RELS.as_bytes()),
        ("word/document.xml", doc.as_bytes()),
    ])
    .unwrap();
    let f = facts(&bytes);
    assert_eq!(f.kind, Some(FileType::Docx), "{f:?}");
    assert!(f.labels.is_empty() && f.not_inspectable.is_none(), "{f:?}");
    bytes
}

/// `bytes` with the label `guid` written as a user of Office would (method Standard).
fn labeled(bytes: &[u8], guid: &str, name: &str) -> Vec<u8> {
    let spec = LabelSpec {
        guid: guid.into(),
        tenant: TENANT.into(),
        name: name.into(),
        method: "Standard".into(),
        set_date: sluice_inspect::now_iso8601(),
        action_id: sluice_inspect::new_guid(),
        permissions: Vec::new(),
    };
    let Applied::Labeled(out) =
        sluice_inspect::apply_label(bytes, &spec, false, &Limits::default()).unwrap()
    else {
        panic!("the document was labeled already");
    };
    assert!(enabled_label(&out, guid), "{:?}", facts(&out));
    out
}

fn enabled_label(bytes: &[u8], guid: &str) -> bool {
    facts(bytes).enabled_labels().any(|l| l.guid == guid)
}

fn sha256(bytes: &[u8]) -> String {
    sluice_inspect::sha256_hex(bytes)
}

// ---------------------------------------------------------------------------------------------
// the tests

/// An access block answers from the request head: the app never sees the request (nor the
/// upload behind it), the event names the access policy and carries status 0. The same request
/// from a member goes through and its event carries the app's status.
#[test]
fn an_access_block_answers_before_the_app_sees_the_request() {
    let rig = Rig::start("access", Device::Managed, SEAM);
    let carol = Some("carol@corp.example");
    let labeled_doc = labeled(&docx("minutes"), CONFIDENTIAL, "Confidential");
    let path = rig.file("minutes.docx", &labeled_doc);

    for proto in ["--http1.1", "--http2"] {
        let view = rig.curl(carol, &[proto, &rig.url(&format!("/files?a={proto}"))]);
        assert_eq!(view.status, 403, "{}", view.text());
        let incident = view.incident();
        assert_eq!(
            view.text(),
            format!(
                "Blocked: contractors do not use this app\n\
                 Demo files is not open to contractors (policy block-contractors, incident \
                 {incident}).\n\
                 Ask your contact at the company to share the file another way.\n\
                 incident: {incident}\n"
            )
        );
        let ev = rig.event_by_incident(&incident);
        assert_eq!(
            (ev.action, ev.decided_by, ev.policy.as_deref(), ev.status),
            (Action::Block, Kind::Access, Some("block-contractors"), 0),
            "{ev:#?}"
        );
        assert_eq!(ev.user.as_deref(), Some("carol@corp.example"));
        assert_eq!(ev.activity, Activity::View);

        // An upload is refused on its head too, before any of its body is read. Over HTTP/2
        // the stream is then ended with RST_STREAM(NO_ERROR) while curl may still be sending, as
        // RFC 9113 §8.1 allows; curl (7.88 here) then fails its upload with error 92 instead of
        // showing the answer it received, so over HTTP/2 the page is checked only when curl
        // shows it. The decision and its event are checked either way.
        let url = rig.url(&format!("/api/files/carol.docx?a={proto}"));
        let args = [proto, "-T", path.to_str().unwrap(), &url];
        let suffix = format!("carol.docx?a={proto}");
        match rig.try_curl(carol, &args) {
            Ok(put) => {
                assert_eq!(put.status, 403, "{}", put.text());
                assert_eq!(rig.event_for(&suffix).incident, put.incident());
            }
            Err(e) if proto == "--http2" && e.contains("curl: (92)") => {}
            Err(e) => panic!("{e}"),
        }
        let ev = rig.event_for(&suffix);
        assert_eq!(
            (ev.action, ev.decided_by, ev.activity, ev.status),
            (Action::Block, Kind::Access, Activity::Upload, 0),
            "{ev:#?}"
        );
        assert!(ev.files.is_empty(), "no body was inspected: {ev:#?}");
    }
    assert!(
        rig.app.requests().is_empty(),
        "the app saw a blocked request: {:?}",
        rig.app.requests()
    );
    assert!(rig.app.uploads().is_empty());

    // A member passes the same access decision.
    let got = rig.curl(Some("alice@corp.example"), &[&rig.url("/files?a=alice")]);
    assert_eq!(got.status, 200, "{}", got.text());
    assert!(got.header(sluice::proxy::pages::INCIDENT_HEADER).is_none());
    let log = rig.app.requests();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(
        (log[0].path.as_str(), log[0].user.as_deref()),
        ("/files", Some("alice@corp.example"))
    );
    let ev = rig.event_for("?a=alice");
    assert_eq!((ev.action, ev.status), (Action::Monitor, 200), "{ev:#?}");
    assert_eq!(ev.policy.as_deref(), Some("monitor-every-activity"));
    assert!(
        ev.matched.iter().any(|m| m == "monitor-all-access"),
        "{ev:#?}"
    );
}

/// The same refused upload is answered in the form each kind of client can show: an HTML page
/// for a browser, problem+json for an API or XHR client, plain text for curl; each with the
/// incident id in a header and in the body, and an event of that incident saying block.
#[test]
fn a_blocked_upload_gets_the_page_for_each_client_kind() {
    let rig = Rig::start("pages", Device::Managed, &[]);
    let plain = docx("quarterly numbers");
    let form = format!("file=@{}", rig.file("plain.docx", &plain).display());
    let alice = Some("alice@corp.example");
    let browser_ua = "Mozilla/5.0 (X11; Linux x86_64)";
    let mut incidents = Vec::new();

    // (client, curl arguments, content type, event's client)
    let kinds: [(&str, &[&str], &str, Client); 4] = [
        (
            "browser",
            &[
                "-A",
                browser_ua,
                "-H",
                "Accept: text/html,application/xhtml+xml,*/*;q=0.8",
            ],
            "text/html; charset=utf-8",
            Client::Browser,
        ),
        (
            "api",
            &["-H", "Accept: application/json"],
            "application/problem+json",
            Client::Native,
        ),
        (
            "xhr",
            &["-A", browser_ua, "-H", "X-Requested-With: XMLHttpRequest"],
            "application/problem+json",
            Client::Browser,
        ),
        ("curl", &[], "text/plain; charset=utf-8", Client::Native),
    ];
    for (kind, extra, ctype, client) in kinds {
        let url = rig.url(&format!("/upload?client={kind}"));
        let mut args = extra.to_vec();
        args.extend(["-F", &form, &url]);
        let got = rig.curl(alice, &args);
        assert_eq!(got.status, 403, "{kind}: {}", got.text());
        assert_eq!(got.header("content-type").as_deref(), Some(ctype), "{kind}");
        let incident = got.incident();
        assert_eq!(incident.len(), 16, "{incident}");
        let text = got.text();
        match kind {
            "browser" => {
                assert!(
                    text.starts_with("<!doctype html>")
                        && text.contains(
                            "<title>Upload blocked: the file has no sensitivity label</title>"
                        )
                        && text.contains("plain.docx was not uploaded to Demo files")
                        && text.contains("Apply the Confidential label from the Sensitivity menu")
                        && text.contains(&format!("Sluice incident {incident}")),
                    "{text}"
                );
            }
            "api" | "xhr" => {
                let doc: serde_json::Value = serde_json::from_str(&text).expect("problem+json");
                assert_eq!(doc["status"], 403, "{doc}");
                assert_eq!(doc["incident"].as_str(), Some(incident.as_str()), "{doc}");
                assert_eq!(
                    doc["title"],
                    "Upload blocked: the file has no sensitivity label"
                );
                assert!(
                    doc["detail"]
                        .as_str()
                        .is_some_and(|d| d.starts_with("plain.docx was not uploaded")),
                    "{doc}"
                );
            }
            _ => {
                let lines: Vec<&str> = text.lines().collect();
                assert_eq!(
                    lines.first().copied(),
                    Some("Upload blocked: the file has no sensitivity label"),
                    "{text}"
                );
                assert_eq!(
                    lines.last().copied(),
                    Some(format!("incident: {incident}").as_str()),
                    "{text}"
                );
            }
        }
        let ev = rig.event_by_incident(&incident);
        assert_eq!(
            (ev.action, ev.activity, ev.policy.as_deref(), ev.status),
            (
                Action::Block,
                Activity::Upload,
                Some("block-unlabelled-uploads"),
                0
            ),
            "{kind}: {ev:#?}"
        );
        assert_eq!(ev.client, client, "{kind}");
        assert_eq!(ev.user.as_deref(), Some("alice@corp.example"));
        assert_eq!(ev.files.len(), 1, "{ev:#?}");
        assert_eq!(ev.files[0].name.as_deref(), Some("plain.docx"));
        assert_eq!(ev.files[0].sha256, sha256(&plain));
        assert!(ev.files[0].labels.is_empty());
        incidents.push(incident);
    }
    incidents.sort();
    incidents.dedup();
    assert_eq!(incidents.len(), 4, "each refusal has its own incident");
    assert!(rig.app.requests().is_empty(), "{:?}", rig.app.requests());
}

/// Held uploads: an unlabeled document, as a multipart form and as a raw PUT, over HTTP/1.1 and
/// HTTP/2, never reaches the app's store; a labeled one is stored byte for byte. A body that
/// cannot be inspected gets the app's not-inspectable action (monitor) and passes unchanged.
#[test]
fn held_uploads_reach_the_app_only_when_labeled() {
    let rig = Rig::start("uploads", Device::Managed, &[]);
    let bob = Some("bob@corp.example");
    let plain = docx("draft");
    let conf = labeled(&docx("final"), CONFIDENTIAL, "Confidential");
    let plain_path = rig.file("plain.docx", &plain);
    let conf_path = rig.file("confidential.docx", &conf);
    let json = ["-H", "Accept: application/json"];

    for proto in ["--http1.1", "--http2"] {
        let form = format!("file=@{}", plain_path.display());
        let got = rig.curl(
            bob,
            &[proto, json[0], json[1], "-F", &form, &rig.url("/upload")],
        );
        assert_eq!(got.status, 403, "{proto}: {}", got.text());
        let ev = rig.event_by_incident(&got.incident());
        assert_eq!((ev.action, ev.status), (Action::Block, 0), "{ev:#?}");
        let put = rig.curl(
            bob,
            &[
                proto,
                "-T",
                plain_path.to_str().unwrap(),
                &rig.url("/api/files/plain.docx"),
            ],
        );
        assert_eq!(put.status, 403, "{proto}: {}", put.text());
        let ev = rig.event_by_incident(&put.incident());
        assert_eq!(
            (ev.action, ev.policy.as_deref(), ev.status),
            (Action::Block, Some("block-unlabelled-uploads"), 0),
            "{ev:#?}"
        );
        assert_eq!(ev.files[0].name.as_deref(), Some("plain.docx"));
    }
    assert!(rig.app.uploads().is_empty(), "{:?}", rig.app.uploads());
    assert!(rig.app.files().is_empty(), "{:?}", rig.app.files());
    assert!(
        rig.app.requests().is_empty(),
        "the app saw a refused upload: {:?}",
        rig.app.requests()
    );

    for proto in ["--http1.1", "--http2"] {
        let form = format!("file=@{}", conf_path.display());
        let tag = &proto[2..];
        let got = rig.curl(
            bob,
            &[
                proto,
                json[0],
                json[1],
                "-F",
                &form,
                &rig.url(&format!("/upload?p={tag}")),
            ],
        );
        assert_eq!(got.status, 201, "{proto}: {}", got.text());
        let ev = rig.event_for(&format!("/upload?p={tag}"));
        assert_eq!(
            (ev.action, ev.activity, ev.status),
            (Action::Monitor, Activity::Upload, 201),
            "{ev:#?}"
        );
        assert_eq!(ev.files[0].labels[0].guid, CONFIDENTIAL);
        let name = format!("put-{tag}.docx");
        let put = rig.curl(
            bob,
            &[
                proto,
                "-T",
                conf_path.to_str().unwrap(),
                &rig.url(&format!("/api/files/{name}")),
            ],
        );
        assert_eq!(put.status, 201, "{proto}: {}", put.text());
        assert_eq!(rig.event_for(&name).status, 201);
    }
    let uploads = rig.app.uploads();
    assert_eq!(uploads.len(), 4, "{uploads:?}");
    for up in &uploads {
        assert_eq!(
            (up.size, up.sha256.as_str()),
            (conf.len() as u64, sha256(&conf).as_str())
        );
        assert_eq!(
            rig.app.file_bytes(&up.file_id).as_deref(),
            Some(conf.as_slice()),
            "{} changed on the way",
            up.name
        );
    }

    // A gzip-encoded body is decoded and judged by what it is: the unlabeled document again.
    let gz = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut e, &plain).unwrap();
        e.finish().unwrap()
    };
    let gz_path = rig.file("plain.docx.gz", &gz);
    let got = rig.curl(
        bob,
        &[
            "-H",
            "Content-Encoding: gzip",
            "-T",
            gz_path.to_str().unwrap(),
            &rig.url("/api/files/compressed.docx"),
        ],
    );
    assert_eq!(got.status, 403, "{}", got.text());
    assert!(
        got.text().contains("no sensitivity label"),
        "{}",
        got.text()
    );

    // An encoding Sluice does not read: not inspectable, which the default bundle blocks for
    // uploads, with a page that says why and what to do; the event's file says why.
    let got = rig.curl(
        bob,
        &[
            "-H",
            "Content-Encoding: br",
            "-T",
            gz_path.to_str().unwrap(),
            &rig.url("/api/files/encoded.docx"),
        ],
    );
    assert_eq!(got.status, 403, "{}", got.text());
    assert!(got.text().contains("could not inspect"), "{}", got.text());
    assert!(got.text().contains("without compressing"), "{}", got.text());
    let ev = rig.event_for("/api/files/encoded.docx");
    assert_eq!(
        (ev.action, ev.policy.as_deref()),
        (Action::Block, None),
        "{ev:#?}"
    );
    assert!(
        matches!(
            ev.files[0].not_inspectable,
            Some(sluice_inspect::NotInspectable::Unsupported(_))
        ),
        "{ev:#?}"
    );
    // The event says why for people too.
    assert!(
        ev.detail
            .as_deref()
            .is_some_and(|d| d.contains("content encoding `br`")),
        "{ev:#?}"
    );
    assert!(
        !rig.app
            .uploads()
            .iter()
            .any(|u| u.name == "compressed.docx" || u.name == "encoded.docx"),
        "a refused upload reached the app"
    );
}

/// Held downloads: to an unmanaged device a Highly Confidential document arrives encrypted, its
/// label readable outside the encryption, whatever the protocol, with its passwords sealed in
/// the event to the release key (they open with the event's id, and name the organisation);
/// a guest's download arrives labeled Confidential and encrypted for that guest alone; an
/// unlabeled document to a member arrives byte for byte.
#[test]
fn highly_confidential_downloads_to_an_unmanaged_device_arrive_encrypted() {
    let hc = labeled(
        &docx("acquisition plan"),
        HIGHLY_CONFIDENTIAL,
        "Highly Confidential",
    );
    let plain = docx("lunch menu");
    let rig = Rig::start("downloads", Device::Unmanaged, &[]);
    let hc_id = rig
        .app
        .seed("plan.docx", hc.clone(), "alice@corp.example")
        .unwrap()
        .id;
    let plain_id = rig
        .app
        .seed("menu.docx", plain.clone(), "alice@corp.example")
        .unwrap()
        .id;
    let opened = |ev: &sluice::event::ActivityEvent| -> (
        sluice_protocol::ProtectedFile,
        sluice_protocol::ReleaseSecrets,
    ) {
        assert_eq!(ev.protected.len(), 1, "{ev:#?}");
        let p = ev.protected[0].clone();
        let plain = rig
            .release
            .open(&p.binding(&ev.id), &p.sealed)
            .expect("the box opens with the event's id");
        (p, serde_json::from_slice(&plain).expect("secrets"))
    };

    for proto in ["--http1.1", "--http2"] {
        let q = format!("?p={}", &proto[2..]);
        let got = rig.curl(
            Some("alice@corp.example"),
            &[proto, &rig.url(&format!("/files/{hc_id}/download{q}"))],
        );
        assert_eq!(got.status, 200, "{proto}: {}", got.text());
        assert_eq!(
            got.header("content-length"),
            Some(got.body.len().to_string()),
            "{proto}"
        );
        let f = facts(&got.body);
        assert_eq!(f.kind, Some(FileType::Ole), "{f:?}");
        assert!(f.encrypted, "{f:?}");
        let label = f
            .enabled_labels()
            .find(|l| l.guid == HIGHLY_CONFIDENTIAL)
            .unwrap_or_else(|| panic!("{proto}: no Highly Confidential label: {f:?}"));
        assert_eq!(label.tenant.as_deref(), Some(TENANT));
        assert!(
            !got.body.windows(16).any(|w| w == b"acquisition plan"),
            "{proto}: the content in clear"
        );

        let ev = rig.event_for(&format!("/download{q}"));
        assert_eq!(
            (ev.action, ev.activity, ev.policy.as_deref()),
            (
                Action::Protect,
                Activity::Download,
                Some("protect-hc-downloads-unmanaged")
            ),
            "{ev:#?}"
        );
        assert_eq!(ev.label_applied.as_deref(), Some("highly-confidential"));
        assert_eq!(ev.permissions, ["view", "print"]);
        assert_eq!((ev.status, ev.device), (200, Device::Unmanaged));
        assert_eq!(ev.files[0].name.as_deref(), Some("plan.docx"));
        assert_eq!(ev.files[0].labels[0].guid, HIGHLY_CONFIDENTIAL);
        assert_eq!(
            ev.files[0].sha256,
            sha256(&hc),
            "the facts are the original's"
        );
        let (p, secrets) = opened(&ev);
        assert_eq!(f.release_id.as_deref(), Some(p.release_id.as_str()));
        assert_eq!(
            (p.open.as_str(), p.template.as_str()),
            ("organisation", "organisation-only")
        );
        assert_eq!(p.sha256, sha256(&got.body));
        assert!(secrets.open_password.is_some_and(|pw| pw.len() >= 24));
        assert_eq!(
            got.header("link"),
            Some(format!(
                "<https://collector.test/files/{}>; rel=\"help\"",
                p.release_id
            ))
        );
    }
    assert_eq!(
        rig.app.file_bytes(&hc_id).as_deref(),
        Some(hc.as_slice()),
        "the stored file is not touched"
    );

    // A guest gets a copy labeled Confidential, encrypted for that guest alone, view only.
    let got = rig.curl(
        Some("carol@corp.example"),
        &[&rig.url(&format!("/files/{plain_id}/download?who=carol"))],
    );
    assert_eq!(got.status, 200, "{}", got.text());
    let f = facts(&got.body);
    assert!(f.encrypted, "{f:?}");
    assert!(f.enabled_labels().any(|l| l.guid == CONFIDENTIAL), "{f:?}");
    let ev = rig.event_for("?who=carol");
    assert_eq!(
        (ev.action, ev.policy.as_deref(), ev.label_applied.as_deref()),
        (
            Action::Protect,
            Some("guest-downloads-view-only"),
            Some("confidential")
        ),
        "{ev:#?}"
    );
    assert_eq!(ev.permissions, ["view"]);
    let (p, _) = opened(&ev);
    assert_eq!(
        (p.open.as_str(), p.users.as_slice()),
        ("downloader", ["carol@corp.example".to_owned()].as_slice())
    );

    // A member's download of an unlabeled document is not changed.
    let got = rig.curl(
        Some("bob@corp.example"),
        &[&rig.url(&format!("/files/{plain_id}/download?who=bob"))],
    );
    assert_eq!((got.status, &got.body), (200, &plain));
    let ev = rig.event_for("?who=bob");
    assert_eq!(
        (ev.action, ev.label_applied.as_deref(), ev.status),
        (Action::Monitor, None, 200),
        "{ev:#?}"
    );
    drop(rig);

    // The same Highly Confidential download to a managed device passes unchanged.
    let rig = Rig::start("downloads-managed", Device::Managed, &[]);
    let id = rig
        .app
        .seed("plan.docx", hc.clone(), "alice@corp.example")
        .unwrap()
        .id;
    let got = rig.curl(
        Some("alice@corp.example"),
        &[&rig.url(&format!("/files/{id}/download?managed"))],
    );
    assert_eq!((got.status, &got.body), (200, &hc));
    let ev = rig.event_for("?managed");
    assert_eq!(
        (ev.action, ev.label_applied.as_deref(), ev.device),
        (Action::Monitor, None, Device::Managed),
        "{ev:#?}"
    );
    assert_eq!(ev.files[0].labels[0].guid, HIGHLY_CONFIDENTIAL);
}

/// One activity event per request, whatever its fate (passed, refused by the app, refused on its
/// head, on its request body or on its response body), over HTTP/1.1 and HTTP/2; its status is the
/// origin's (0 when the origin was never asked), and its incident is the request's id.
#[test]
fn every_request_is_one_event_with_the_origin_status() {
    let mut rig = Rig::start("events", Device::Managed, SEAM);
    let alice: Option<&'static str> = Some("alice@corp.example");
    let notes = rig
        .app
        .seed("notes.txt", b"hello".to_vec(), "alice@corp.example")
        .unwrap()
        .id;
    let secret = rig
        .app
        .seed(
            "falcon.docx",
            docx("Project Falcon budget"),
            "alice@corp.example",
        )
        .unwrap()
        .id;
    let menu = docx("lunch menu");
    let menu_id = rig
        .app
        .seed("menu.docx", menu.clone(), "alice@corp.example")
        .unwrap()
        .id;
    let plain_path = rig.file("plain.docx", &docx("draft"));
    let cards = "4111 1111 1111 1111, 5500-0000-0000-0004, 340000000000009, \
                 6011000000000004, 4012888888881881, 5105105105105100";
    let many = format!("with=dave@partner.example&message=cards: {cards}");
    let few = "with=dave@partner.example&message=cards: 4111 1111 1111 1111, 5500-0000-0000-0004";

    /// A request: who, curl's arguments before the URL, the path, the status the client gets,
    /// and the origin's (0: never asked).
    struct Case {
        user: Option<&'static str>,
        args: Vec<String>,
        path: String,
        client: u16,
        origin: u16,
    }
    let case = |user: Option<&'static str>, args: &[&str], path: String, client, origin| Case {
        user,
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        path,
        client,
        origin,
    };
    let plain_arg = plain_path.display().to_string();
    let cases = [
        // Passed, and answered by the app as it chose.
        case(alice, &[], "/files".into(), 200, 200),
        case(None, &[], "/api/files".into(), 401, 401),
        case(alice, &[], "/no/such/route".into(), 404, 404),
        case(
            alice,
            &["--data", few],
            format!("/files/{notes}/share"),
            200,
            200,
        ),
        case(alice, &[], format!("/files/{menu_id}/download"), 200, 200),
        // Refused on the head (access), on the request body (DLP in a form; an unlabeled
        // upload): the app was never asked.
        case(Some("carol@corp.example"), &[], "/files".into(), 403, 0),
        case(
            alice,
            &["--data", &many],
            format!("/files/{notes}/share"),
            403,
            0,
        ),
        case(
            alice,
            &["-T", &plain_arg],
            "/api/files/plain.docx".into(),
            403,
            0,
        ),
        // Refused on the response body: the app answered 200, the client gets the page.
        case(alice, &[], format!("/files/{secret}/download"), 403, 200),
    ];

    let mut sent = Vec::new();
    for proto in ["--http1.1", "--http2"] {
        for (i, c) in cases.iter().enumerate() {
            let tag = format!("?seam={proto}-{i}");
            let url = rig.url(&format!("{}{tag}", c.path));
            let mut args = vec![proto];
            args.extend(c.args.iter().map(String::as_str));
            args.push(&url);
            let got = rig.curl(c.user, &args);
            assert_eq!(got.status, c.client, "{url}: {}", got.text());
            match (c.client, c.path.ends_with("/download")) {
                (200, true) => assert_eq!(got.body, menu),
                (403, true) => assert!(
                    got.text().starts_with(
                        "Download blocked: the file names a project code name\n\
                                      falcon.docx was not downloaded from Demo files"
                    ),
                    "{}",
                    got.text()
                ),
                _ => {}
            }
            sent.push((tag, c));
        }
    }
    let n = sent.len();
    assert!(
        wait_until(Duration::from_secs(10), || rig.events().len() >= n),
        "{} events for {n} requests",
        rig.events().len()
    );
    // Nothing more can be reported once the proxy has stopped: the counts are final.
    rig.stop();
    let events = rig.events();
    let records = rig.reporter.requests.lock().unwrap().clone();
    assert_eq!(events.len(), n, "{events:#?}");
    assert_eq!(records.len(), n, "{records:#?}");
    for (tag, c) in &sent {
        let ev: Vec<&ActivityEvent> = events.iter().filter(|e| e.url.ends_with(tag)).collect();
        assert_eq!(ev.len(), 1, "{tag}: {ev:#?}");
        let ev = ev[0];
        assert_eq!(ev.status, c.origin, "{tag} {}: {ev:#?}", c.path);
        let rec: Vec<&RequestRecord> = records.iter().filter(|r| r.url.ends_with(tag)).collect();
        assert_eq!(rec.len(), 1, "{tag}: {rec:#?}");
        assert_eq!(rec[0].status, c.client, "{tag}: {:#?}", rec[0]);
        assert_eq!(ev.incident, rec[0].id, "{tag}");
        let blocked = c.client == 403;
        assert_eq!(ev.action == Action::Block, blocked, "{tag}: {ev:#?}");
        if c.path.ends_with("/share") {
            assert_eq!(ev.activity, Activity::Share, "{ev:#?}");
            assert_eq!(
                ev.dlp.get("credit_card"),
                Some(&(if blocked { 6 } else { 2 }))
            );
        }
    }
    // The app answered exactly the requests whose events carry its status, with that status.
    let mut answered: Vec<u16> = rig.app.requests().iter().map(|r| r.status).collect();
    let mut expected: Vec<u16> = sent
        .iter()
        .map(|(_, c)| c.origin)
        .filter(|&s| s != 0)
        .collect();
    answered.sort_unstable();
    expected.sort_unstable();
    assert_eq!(answered, expected);
    let by_policy = |p: &str| {
        events
            .iter()
            .filter(|e| e.policy.as_deref() == Some(p))
            .count()
    };
    assert_eq!(by_policy("block-contractors"), 2);
    assert_eq!(by_policy("block-card-numbers"), 2);
    assert_eq!(by_policy("block-unlabelled-uploads"), 2);
    assert_eq!(by_policy("block-codename-downloads"), 2);
}

/// A client that goes away in the middle of a download still ends its request once: one event
/// (the decision taken on the held body) and one record, whose outcome says the body was cut.
#[test]
fn a_download_cut_short_by_the_client_is_still_one_event() {
    let mut rig = Rig::start("cut", Device::Managed, &[]);
    // 40 MiB of incompressible bytes (more than the loopback socket buffers take): held, judged,
    // and then read slower than curl waits.
    let mut big = Vec::with_capacity(40 << 20);
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    while big.len() < 40 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        big.extend_from_slice(&x.to_le_bytes());
    }
    let id = rig
        .app
        .seed("big.bin", big, "alice@corp.example")
        .unwrap()
        .id;
    let path = format!("/files/{id}/download");
    let cut = rig.try_curl(
        Some("alice@corp.example"),
        &["--limit-rate", "256K", "--max-time", "2", &rig.url(&path)],
    );
    assert!(cut.is_err(), "curl was to give up before the end: {cut:?}");
    let ev = rig.event_for(&path);
    assert_eq!(
        (ev.status, ev.activity),
        (200, Activity::Download),
        "{ev:#?}"
    );
    rig.stop();
    let records: Vec<RequestRecord> = rig
        .reporter
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.url.ends_with(&path))
        .cloned()
        .collect();
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0].outcome, "aborted", "{:#?}", records[0]);
    assert!(records[0].bytes_down < 40 << 20, "{:#?}", records[0]);
    assert_eq!(
        rig.events()
            .iter()
            .filter(|e| e.url.ends_with(&path))
            .count(),
        1
    );
}
