//! The proxy's hook points, driven through the real listener, TLS, HTTP stack and upstream by curl,
//! with a fixed origin source instead of kernel steering (no root needed): each hook can let the
//! message go on, rewrite it, or answer instead, and a held upload is refused before the origin
//! sees any of it.

use std::{
    net::SocketAddr,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, request, response};
use sluice::{
    config::{AppSettings, ProxySettings},
    proxy::{
        OriginSource, Proxy, ProxyStats, Shared,
        body::full,
        ca::{self, Ca, CacheLimits, LeafCache},
        catalog::Catalog,
        hooks::{BodyInspector, BodyMode, BodyVerdict, Exchange, HeadVerdict, Hooks},
        record::{ConnectionRecord, Reporter, RequestRecord},
        upstream::{Upstream, root_store},
    },
    steer::{OriginRecord, ProcessInfo},
};
use sluice_e2e::{
    free_port,
    origin::{Origin, TestPki},
};

struct Fixed(SocketAddr);

impl OriginSource for Fixed {
    fn lookup(&self, _peer: SocketAddr) -> Option<OriginRecord> {
        Some(OriginRecord {
            dst: self.0,
            ipv6_socket: false,
            pid: 1,
            tgid: 1,
            uid: 0,
            gid: 0,
            comm: "test".into(),
            cgroup_id: 0,
            cookie: 0,
            age: Duration::ZERO,
            process: ProcessInfo::default(),
        })
    }
}

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

struct TestHooks {
    streamed: Arc<AtomicU64>,
}

fn answer(status: StatusCode, text: &str) -> Response<sluice::proxy::body::ProxyBody> {
    let mut r = Response::new(full(text.to_owned()));
    *r.status_mut() = status;
    r
}

struct Holder {
    limit: usize,
    seen: Vec<u8>,
    on_end: fn(&[u8]) -> BodyVerdict,
}

impl BodyInspector for Holder {
    fn mode(&self) -> BodyMode {
        BodyMode::Hold { limit: self.limit }
    }
    fn chunk(&mut self, data: &Bytes) {
        self.seen.extend_from_slice(data);
    }
    fn end(&mut self) -> BodyVerdict {
        (self.on_end)(&self.seen)
    }
    fn overflow(&mut self) -> BodyVerdict {
        BodyVerdict::Respond(answer(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too large to inspect",
        ))
    }
}

struct Counter(Arc<AtomicU64>);

impl BodyInspector for Counter {
    fn mode(&self) -> BodyMode {
        BodyMode::Stream
    }
    fn chunk(&mut self, data: &Bytes) {
        self.0.fetch_add(data.len() as u64, Ordering::Relaxed);
    }
    fn end(&mut self) -> BodyVerdict {
        BodyVerdict::Pass
    }
}

impl Hooks for TestHooks {
    fn request_head(&self, _ex: &Exchange<'_>, head: &mut request::Parts) -> HeadVerdict {
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

    fn request_body(
        &self,
        _ex: &Exchange<'_>,
        head: &request::Parts,
    ) -> Option<Box<dyn BodyInspector>> {
        let q = head.uri.query().unwrap_or("");
        let holder = |limit, on_end| -> Option<Box<dyn BodyInspector>> {
            Some(Box::new(Holder {
                limit,
                seen: Vec::new(),
                on_end,
            }))
        };
        match q {
            "hold=block" => holder(1 << 20, |b| {
                if b.windows(6).any(|w| w == b"SECRET") {
                    BodyVerdict::Respond(answer(StatusCode::FORBIDDEN, "upload refused by hook"))
                } else {
                    BodyVerdict::Pass
                }
            }),
            "hold=replace" => holder(1 << 20, |_| {
                BodyVerdict::Replace(Bytes::from_static(b"replaced"))
            }),
            "hold=small" => holder(10, |_| BodyVerdict::Pass),
            _ => None,
        }
    }

    fn response_head(
        &self,
        _ex: &Exchange<'_>,
        req: &request::Parts,
        head: &mut response::Parts,
    ) -> HeadVerdict {
        if req.uri.query() == Some("resp=header") {
            head.headers
                .insert("x-sluice-hooked", HeaderValue::from_static("yes"));
        }
        HeadVerdict::Continue
    }

    fn response_body(
        &self,
        _ex: &Exchange<'_>,
        req: &request::Parts,
        _head: &response::Parts,
    ) -> Option<Box<dyn BodyInspector>> {
        match req.uri.query() {
            Some("resp=replace") => Some(Box::new(Holder {
                limit: 1 << 20,
                seen: Vec::new(),
                on_end: |_| BodyVerdict::Replace(Bytes::from_static(b"hooked body")),
            })),
            Some("resp=count") => Some(Box::new(Counter(self.streamed.clone()))),
            _ => None,
        }
    }
}

#[test]
fn hooks_pass_rewrite_or_answer_instead() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let pki = TestPki::new(&["good.test"]).expect("pki");
    let origin = rt
        .block_on(Origin::start("127.0.0.31:0".parse().expect("addr"), &pki))
        .expect("origin");
    let dir = sluice_e2e::TempDir::new("hooks");
    ca::init(&dir.join("ca"), "Sluice Interception CA").expect("ca");
    let ca = Ca::load_dir(&dir.join("ca")).expect("ca loads");
    let sluice_ca = dir.join("sluice-ca.pem");
    std::fs::write(&sluice_ca, ca.cert_pem()).expect("ca pem");
    let test_ca = dir.join("test-ca.pem");
    std::fs::write(&test_ca, &pki.ca_pem).expect("test ca");

    let port = free_port();
    let settings = ProxySettings {
        port,
        hash_bodies: true,
        ..ProxySettings::default()
    };
    let streamed = Arc::new(AtomicU64::new(0));
    let reporter = Arc::new(Collect::default());
    let catalog = Catalog::new(
        &[AppSettings {
            id: "demo".into(),
            name: None,
            hosts: vec!["good.test".into()],
            do_not_inspect: vec![],
        }],
        &[],
    )
    .expect("catalog");
    let shared = Arc::new(Shared::new(
        Arc::new(Fixed(origin.addr)),
        Arc::new(ProxyStats::default()),
        Arc::new(catalog),
        Arc::new(LeafCache::new(
            Arc::new(ca),
            CacheLimits::default(),
            vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        )),
        Arc::new(Upstream::new(
            root_store(false, false, std::slice::from_ref(&test_ca)).expect("roots"),
            0,
            Duration::from_secs(5),
            Duration::from_secs(5),
            8,
        )),
        Arc::new(TestHooks {
            streamed: streamed.clone(),
        }),
        reporter.clone(),
        settings,
        0,
    ));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let proxy = rt.block_on(Proxy::bind(shared)).expect("bind");
    let task = rt.spawn(proxy.run(shutdown.clone()));

    let curl = |args: &[&str]| -> String {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "20", "--cacert"])
            .arg(&sluice_ca)
            .args(["--resolve", &format!("good.test:{port}:127.0.0.1")])
            .args(args)
            .output()
            .expect("curl runs");
        assert!(
            out.status.success(),
            "curl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let url = |p: &str| format!("https://good.test:{port}{p}");
    let with_code = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["-w", "\n%{http_code}"]);
        let out = curl(&a);
        let (body, code) = out
            .rsplit_once('\n')
            .map(|(b, c)| (b.to_owned(), c.to_owned()))
            .expect("code");
        (body, code)
    };

    for proto in ["--http1.1", "--http2"] {
        // Answer instead, from the request head: the origin never sees it.
        let (body, code) = with_code(&[proto, &url("/blocked-head")]);
        assert_eq!((code.as_str(), body.as_str()), ("403", "blocked by hook"));
        // Rewrite the head: a header added, the path changed.
        let (body, code) = with_code(&[proto, &url("/rewrite-head")]);
        assert_eq!(code, "200");
        assert!(body.contains("x-hooked"), "{body}");
        // A held upload refused before any byte reaches the origin.
        let (body, code) = with_code(&[
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
        let (body, code) = with_code(&[proto, "--data-binary", "hello", &url("/echo?hold=block")]);
        assert_eq!(code, "200");
        assert!(
            body.contains("2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"),
            "{body}"
        );
        // A held body replaced.
        let (body, _) = with_code(&[
            proto,
            "--data-binary",
            "original",
            &url("/echo?hold=replace"),
        ]);
        let replaced = sluice_e2e::hex(&<sha2::Sha256 as sha2::Digest>::digest(b"replaced"));
        assert!(body.contains(&replaced), "{body}");
        // A body over the hold bound: the inspector's overflow verdict answers.
        let (_, code) = with_code(&[
            proto,
            "--data-binary",
            "more than ten bytes",
            &url("/echo?hold=small"),
        ]);
        assert_eq!(code, "413");
        // Response head rewritten, response body replaced, response body streamed and seen.
        let head = curl(&[
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
        assert_eq!(curl(&[proto, &url("/hello?resp=replace")]), "hooked body");
        let before = streamed.load(Ordering::Relaxed);
        curl(&[proto, "-o", "/dev/null", &url("/bytes/300000?resp=count")]);
        assert_eq!(streamed.load(Ordering::Relaxed) - before, 300_000);
    }
    let log = origin.requests();
    assert!(!log.iter().any(|l| l.contains("blocked-head")), "{log:?}");
    let posts = log.iter().filter(|l| l.starts_with("POST /echo")).count();
    assert_eq!(
        posts, 4,
        "only the passed and replaced uploads reached the origin: {log:?}"
    );
    let recs = reporter.0.lock().expect("records");
    assert!(
        recs.iter()
            .any(|r| r.outcome == "answered" && r.url.ends_with("/blocked-head"))
    );
    assert!(recs.iter().any(|r| r.outcome == "ok"
        && r.url.ends_with("/bytes/300000?resp=count")
        && r.bytes_down == 300_000));
    drop(recs);
    shutdown.cancel();
    let _ = rt.block_on(task);
    drop(origin);
}
