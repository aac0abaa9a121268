//! The proxy's hook points, driven through the real listener, TLS, HTTP stack and upstream by curl,
//! with a fixed origin source instead of kernel steering (no root needed): each hook can let the
//! message go on, rewrite it, or answer instead, and a held upload is refused before the origin
//! sees any of it.

use std::{
    process::Command,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, request, response};
use sluice::{
    admin::{Admin, AdminState},
    config::ProxySettings,
    event::ActivityEvent,
    proxy::{
        Proxy, ProxyStats,
        body::full,
        ca::{self, Ca},
        catalog::Catalog,
        hooks::{BodyPlan, BodyVerdict, Ended, Exchange, Flow, HeadVerdict, Hooks, Side, Unheld},
        record::{ConnectionRecord, Reporter, RequestRecord},
    },
};
use sluice_e2e::origin::{Origin, TestPki};

#[derive(Default)]
struct Collect(Mutex<Vec<RequestRecord>>);

impl Reporter for Collect {
    fn wants_requests(&self) -> bool {
        true
    }
    fn request(&self, rec: RequestRecord) {
        if let Ok(mut v) = self.0.lock() {
            v.push(rec);
        }
    }
    fn connection(&self, _rec: ConnectionRecord) {}
}

/// A gate that parks judgements until it is opened (or a bound passes, so a failing test never
/// hangs).
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    fn wait(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut open = self.open.lock().expect("gate");
        while !*open && Instant::now() < deadline {
            open = self
                .cv
                .wait_timeout(open, Duration::from_millis(200))
                .expect("gate")
                .0;
        }
    }
    fn release(&self) {
        *self.open.lock().expect("gate") = true;
        self.cv.notify_all();
    }
}

struct TestHooks {
    /// Flows finished, each once.
    finished: Arc<AtomicU64>,
    gate: Arc<Gate>,
}

fn answer(status: StatusCode, text: &str) -> Response<sluice::proxy::body::ProxyBody> {
    let mut r = Response::new(full(text.to_owned()));
    *r.status_mut() = status;
    r
}

/// One request's flow: what the test's query asks of it.
struct TestFlow {
    query: String,
    finished: Arc<AtomicU64>,
    gate: Arc<Gate>,
    judged_on: Option<std::thread::ThreadId>,
}

impl Flow for TestFlow {
    fn request_head(&mut self, head: &mut request::Parts) -> HeadVerdict {
        match head.uri.path() {
            "/blocked-head" => {
                HeadVerdict::Respond(answer(StatusCode::FORBIDDEN, "blocked by hook"))
            }
            "/rewrite-head" => {
                head.headers
                    .insert("x-hooked", HeaderValue::from_static("1"));
                if let Ok(uri) = "/headers".parse() {
                    head.uri = uri;
                }
                HeadVerdict::Continue
            }
            _ => HeadVerdict::Continue,
        }
    }

    fn request_body(&mut self, _head: &request::Parts) -> BodyPlan {
        match self.query.as_str() {
            "hold=block" | "hold=replace" | "hold=park" => BodyPlan::Hold { limit: 1 << 20 },
            "hold=small" => BodyPlan::Hold { limit: 10 },
            _ => BodyPlan::Pass,
        }
    }

    fn response_head(&mut self, head: &mut response::Parts) -> HeadVerdict {
        if self.query == "resp=header" {
            head.headers
                .insert("x-sluice-hooked", HeaderValue::from_static("yes"));
        }
        HeadVerdict::Continue
    }

    fn response_body(&mut self, _head: &response::Parts) -> BodyPlan {
        match self.query.as_str() {
            "resp=replace" => BodyPlan::Hold { limit: 1 << 20 },
            _ => BodyPlan::Pass,
        }
    }

    fn judge(&mut self, side: Side, body: &Bytes) -> BodyVerdict {
        self.judged_on = Some(std::thread::current().id());
        match (side, self.query.as_str()) {
            (Side::Request, "hold=block") if body.windows(6).any(|w| w == b"SECRET") => {
                BodyVerdict::Respond(answer(StatusCode::FORBIDDEN, "upload refused by hook"))
            }
            (Side::Request, "hold=replace") => {
                BodyVerdict::Replace(Bytes::from_static(b"replaced"))
            }
            (Side::Request, "hold=park") => {
                self.gate.wait();
                BodyVerdict::Pass
            }
            (Side::Response, "resp=replace") => {
                BodyVerdict::Replace(Bytes::from_static(b"hooked body"))
            }
            _ => BodyVerdict::Pass,
        }
    }

    fn unheld(&mut self, _side: Side, _why: Unheld) -> BodyVerdict {
        BodyVerdict::Respond(answer(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too large to inspect",
        ))
    }

    fn finish(self: Box<Self>, _ended: Ended) -> Option<ActivityEvent> {
        self.finished.fetch_add(1, Ordering::Relaxed);
        None
    }
}

impl Hooks for TestHooks {
    fn begin(&self, _ex: &Exchange<'_>, head: &request::Parts) -> Option<Box<dyn Flow>> {
        Some(Box::new(TestFlow {
            query: head.uri.query().unwrap_or("").to_owned(),
            finished: self.finished.clone(),
            gate: self.gate.clone(),
            judged_on: None,
        }))
    }
}

/// A proxy with the test hooks in front of a test origin, on `rt`.
struct Rig {
    port: u16,
    sluice_ca: std::path::PathBuf,
    reporter: Arc<Collect>,
    stats: Arc<ProxyStats>,
    finished: Arc<AtomicU64>,
    gate: Arc<Gate>,
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    origin: Origin,
    _dir: sluice_e2e::TempDir,
}

impl Rig {
    fn start(rt: &tokio::runtime::Runtime, name: &str, settings: ProxySettings) -> Self {
        let pki = TestPki::new(&["good.test"]).expect("pki");
        let origin = rt
            .block_on(Origin::start("127.0.0.31:0".parse().expect("addr"), &pki))
            .expect("origin");
        let dir = sluice_e2e::TempDir::new(name);
        ca::init(&dir.join("ca"), "Sluice Interception CA").expect("ca");
        let ca = Ca::load_dir(&dir.join("ca")).expect("ca loads");
        let sluice_ca = dir.join("sluice-ca.pem");
        std::fs::write(&sluice_ca, ca.cert_pem()).expect("ca pem");
        let test_ca = dir.join("test-ca.pem");
        std::fs::write(&test_ca, &pki.ca_pem).expect("test ca");
        let reporter = Arc::new(Collect::default());
        let (finished, gate) = (Arc::new(AtomicU64::new(0)), Arc::new(Gate::default()));
        let app: sluice_policy::model::App =
            serde_norway::from_str("id: demo\nhosts: [good.test]\n").expect("app");
        let catalog = Catalog::new([&app], &[]).expect("catalog");
        let stats = Arc::new(ProxyStats::default());
        let shared = sluice_e2e::fixed_proxy(
            origin.addr,
            "test",
            &dir.join("ca"),
            &test_ca,
            catalog,
            Arc::new(TestHooks {
                finished: finished.clone(),
                gate: gate.clone(),
            }),
            reporter.clone(),
            settings,
            stats.clone(),
        )
        .expect("proxy state");
        let shutdown = tokio_util::sync::CancellationToken::new();
        // The settings ask for any port; the system's stays bound by the proxy.
        let proxy = rt.block_on(Proxy::bind(shared)).expect("bind");
        let port = u16::try_from(stats.snapshot().port).expect("port");
        let task = rt.spawn(proxy.run(shutdown.clone()));
        Self {
            port,
            sluice_ca,
            reporter,
            stats,
            finished,
            gate,
            shutdown,
            task,
            origin,
            _dir: dir,
        }
    }

    fn curl_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("curl");
        c.args(["-sS", "--max-time", "20", "--cacert"])
            .arg(&self.sluice_ca)
            .args(["--resolve", &format!("good.test:{}:127.0.0.1", self.port)])
            .args(args);
        c
    }

    fn curl(&self, args: &[&str]) -> String {
        let out = self.curl_cmd(args).output().expect("curl runs");
        assert!(
            out.status.success(),
            "curl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn url(&self, p: &str) -> String {
        format!("https://good.test:{}{p}", self.port)
    }

    fn with_code(&self, args: &[&str]) -> (String, String) {
        let mut a = args.to_vec();
        a.extend(["-w", "\n%{http_code}"]);
        let out = self.curl(&a);
        out.rsplit_once('\n')
            .map(|(b, c)| (b.to_owned(), c.to_owned()))
            .expect("code")
    }

    fn stop(self, rt: &tokio::runtime::Runtime) {
        self.gate.release();
        self.shutdown.cancel();
        let _ = rt.block_on(self.task);
        drop(self.origin);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn hooks_pass_rewrite_or_answer_instead() {
    let rt = runtime();
    let settings = ProxySettings {
        port: 0,
        hash_bodies: true,
        ..ProxySettings::default()
    };
    let rig = Rig::start(&rt, "hooks", settings);
    let url = |p: &str| rig.url(p);

    for proto in ["--http1.1", "--http2"] {
        // Answer instead, from the request head: the origin never sees it.
        let (body, code) = rig.with_code(&[proto, &url("/blocked-head")]);
        assert_eq!((code.as_str(), body.as_str()), ("403", "blocked by hook"));
        // Rewrite the head: a header added, the path changed.
        let (body, code) = rig.with_code(&[proto, &url("/rewrite-head")]);
        assert_eq!(code, "200");
        assert!(body.contains("x-hooked"), "{body}");
        // A held upload refused before any byte reaches the origin.
        let (body, code) = rig.with_code(&[
            proto,
            "--data-binary",
            "top SECRET plans",
            &url("/echo?hold=block"),
        ]);
        assert_eq!(
            (code.as_str(), body.as_str()),
            ("403", "upload refused by hook")
        );
        // The same hook lets a clean body through unchanged.
        let (body, code) =
            rig.with_code(&[proto, "--data-binary", "hello", &url("/echo?hold=block")]);
        assert_eq!(code, "200");
        assert!(
            body.contains("2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"),
            "{body}"
        );
        // A held body replaced.
        let (body, _) = rig.with_code(&[
            proto,
            "--data-binary",
            "original",
            &url("/echo?hold=replace"),
        ]);
        let replaced = sluice_e2e::hex(&<sha2::Sha256 as sha2::Digest>::digest(b"replaced"));
        assert!(body.contains(&replaced), "{body}");
        // A body over the hold bound: the flow's unheld verdict answers.
        let (_, code) = rig.with_code(&[
            proto,
            "--data-binary",
            "more than ten bytes",
            &url("/echo?hold=small"),
        ]);
        assert_eq!(code, "413");
        // Response head rewritten, response body replaced, a streamed body counted whole.
        let head = rig.curl(&[
            proto,
            "-D",
            "-",
            "-o",
            "/dev/null",
            &url("/hello?resp=header"),
        ]);
        assert!(
            head.to_ascii_lowercase().contains("x-sluice-hooked: yes"),
            "{head}"
        );
        assert_eq!(
            rig.curl(&[proto, &url("/hello?resp=replace")]),
            "hooked body"
        );
        rig.curl(&[proto, "-o", "/dev/null", &url("/bytes/300000?resp=count")]);
        // A response without a body (empty, or to a HEAD) is delivered, not cut: nothing reads
        // a body that is known to be empty.
        let (body, code) = rig.with_code(&[proto, &url("/bytes/0")]);
        assert_eq!((code.as_str(), body.as_str()), ("200", ""));
        let (_, code) = rig.with_code(&[proto, "-I", &url("/bytes/5")]);
        assert_eq!(code, "200");
    }
    let log = rig.origin.requests();
    assert!(!log.iter().any(|l| l.contains("blocked-head")), "{log:?}");
    let posts = log.iter().filter(|l| l.starts_with("POST /echo")).count();
    assert_eq!(
        posts, 4,
        "only the passed and replaced uploads reached the origin: {log:?}"
    );
    let recs = rig.reporter.0.lock().expect("records");
    assert!(
        recs.iter()
            .any(|r| r.outcome == "answered" && r.url.ends_with("/blocked-head"))
    );
    assert_eq!(
        recs.iter()
            .filter(|r| r.outcome == "ok"
                && r.url.ends_with("/bytes/300000?resp=count")
                && r.bytes_down == 300_000)
            .count(),
        2
    );
    let empty: Vec<_> = recs
        .iter()
        .filter(|r| r.url.ends_with("/bytes/0") || r.url.ends_with("/bytes/5"))
        .map(|r| (r.method.as_str(), r.outcome.as_str(), r.bytes_down))
        .collect();
    assert_eq!(
        empty,
        [
            ("GET", "ok", 0),
            ("HEAD", "ok", 0),
            ("GET", "ok", 0),
            ("HEAD", "ok", 0)
        ],
        "{recs:?}"
    );
    // Every request's flow was finished exactly once, with its record: answered, replaced and
    // delivered alike.
    assert_eq!(recs.len(), 22, "{recs:?}");
    assert_eq!(rig.finished.load(Ordering::Relaxed), recs.len() as u64);
    // Held bodies were judged on the inspection pool.
    assert_eq!(rig.stats.snapshot().inspections, 8);
    drop(recs);
    rig.stop(&rt);
}

/// Inspections parked on the pool (more of them than the runtime has workers) stall neither
/// plain requests through the proxy nor the admin endpoint; a body that finds the inspection
/// budget spent waits its bounded time and gets the flow's unheld verdict.
#[test]
fn parked_inspections_stall_neither_requests_nor_admin() {
    let rt = runtime();
    let settings = ProxySettings {
        port: 0,
        inspect_workers: 4,
        // Room for the four parked bodies (each rounds up to one KiB), not a fifth.
        inspect_budget_bytes: 4 * 1024,
        inspect_wait_ms: 300,
        ..ProxySettings::default()
    };
    let rig = Rig::start(&rt, "hooks-parked", settings);
    let admin = rt
        .block_on(Admin::bind(
            "127.0.0.1:0".parse().expect("addr"),
            AdminState {
                remote: Default::default(),
                link: None,
                steering: false,
                sandbox: None,
                proxy: rig.stats.clone(),
                bundle: None,
                report: None,
                reloads: Default::default(),
                location: None,
                device: None,
            },
        ))
        .expect("admin binds");
    let admin_addr = admin.local_addr().expect("admin addr");
    let admin_stop = tokio_util::sync::CancellationToken::new();
    let admin_task = rt.spawn(admin.run(admin_stop.clone()));

    let parked: Vec<std::process::Child> = (0..4)
        .map(|i| {
            rig.curl_cmd(&[
                "--data-binary",
                &format!("parked upload {i}"),
                "-o",
                "/dev/null",
                &rig.url("/echo?hold=park"),
            ])
            .spawn()
            .expect("curl starts")
        })
        .collect();
    assert!(
        sluice_e2e::wait_until(Duration::from_secs(20), || {
            rig.stats.snapshot().inspecting == 4
        }),
        "four inspections parked: {:?}",
        rig.stats.snapshot()
    );
    // More parked inspections than async workers: requests and the admin endpoint still answer.
    for _ in 0..10 {
        let (body, code) = rig.with_code(&["--max-time", "10", &rig.url("/hello")]);
        assert_eq!(code, "200", "{body}");
    }
    let status = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .arg(format!("http://{admin_addr}/status"))
        .output()
        .expect("curl runs");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status is JSON");
    assert_eq!(status["proxy"]["inspecting"], 4, "{status}");
    assert_eq!(status["proxy"]["inspection_held_bytes"], 4096, "{status}");
    // The budget is spent: a fifth held body waits its bound, then is not held.
    let (body, code) = rig.with_code(&["--data-binary", "one more", &rig.url("/echo?hold=block")]);
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("413", "too large to inspect")
    );
    assert_eq!(rig.stats.snapshot().inspection_budget_timeouts, 1);

    rig.gate.release();
    for mut c in parked {
        assert!(c.wait().expect("curl ends").success());
    }
    // The budget is given back once the held bodies have left for the origin.
    assert!(
        sluice_e2e::wait_until(Duration::from_secs(10), || {
            let s = rig.stats.snapshot();
            s.inspecting == 0 && s.inspection_held_bytes == 0
        }),
        "{:?}",
        rig.stats.snapshot()
    );
    admin_stop.cancel();
    let _ = rt.block_on(admin_task);
    rig.stop(&rt);
}
