//! The collector over real HTTPS, driven by the real `curl` (trusting the collector's own CA):
//! enrollment, authenticated gzip ingestion (idempotent), refusals, the query API, streamed
//! exports, bundles with ETag and long polling, SIEM forwarding, retention and the CLI.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use sluice_collector::{
    Collector,
    config::Config,
    server::Server,
    store::{IngestOptions, cluster::LocalCluster, now_ms},
};
use sluice_policy::bundle::{Archive, jws::SigningKey};
use sluice_protocol::{
    Actor, CLASS_DEVICE_INVENTORY, CLASS_FILE_HOSTING, Device, EnrollResponse, Event, File,
    IngestResponse, Posture, Sluice, User,
};
use tokio_util::sync::CancellationToken;

mod common;
use common::{Kind, store_for};

static SEQ: AtomicUsize = AtomicUsize::new(0);

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "sluice-collector-{name}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Env {
    pg: Option<LocalCluster>,
    dir: PathBuf,
    c: Arc<Collector>,
    addr: SocketAddr,
    ca: PathBuf,
    shutdown: CancellationToken,
    key: SigningKey,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(pg) = self.pg.as_mut() {
            pg.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A collector on an ephemeral port with a bundle key; `tweak` edits the config first.
async fn start(kind: Kind, name: &str, tweak: impl FnOnce(&mut Config)) -> Env {
    let dir = temp_dir(name);
    let (key, _, public) = SigningKey::generate().unwrap();
    let pubkey = dir.join("bundle.pub.pem");
    std::fs::write(&pubkey, public).unwrap();
    let mut config = Config::with_state_dir(dir.join("state"));
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.bundle_public_key = Some(pubkey);
    // These tests count the events they store: detection's alerts (events themselves) would
    // add to them (tests/alerts.rs covers detection).
    config.detection.enabled = false;
    tweak(&mut config);
    let pg = store_for(kind, &dir, &mut config);
    let c = Arc::new(Collector::open(config).unwrap());
    let server = Server::bind(c.clone()).await.unwrap();
    let addr = server.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(server.run(shutdown.clone()));
    let ca = dir.join("state/tls/ca.pem");
    Env {
        pg,
        dir,
        c,
        addr,
        ca,
        shutdown,
        key,
    }
}

struct Reply {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

impl Env {
    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    /// Runs curl against the collector (blocking thread); `args` come before the URL.
    async fn curl(&self, path: &str, args: &[&str]) -> Reply {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let hdr = self.dir.join(format!("h{n}"));
        let body = self.dir.join(format!("b{n}"));
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "60", "--cacert"])
            .arg(&self.ca)
            .arg("-D")
            .arg(&hdr)
            .arg("-o")
            .arg(&body)
            .args(["-w", "%{http_code}"])
            .args(args)
            .arg(self.url(path));
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .unwrap()
            .unwrap();
        assert!(
            out.status.success(),
            "curl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let r = Reply {
            status,
            headers: std::fs::read_to_string(&hdr).unwrap_or_default(),
            body: std::fs::read(&body).unwrap_or_default(),
        };
        let _ = std::fs::remove_file(hdr);
        let _ = std::fs::remove_file(body);
        r
    }

    async fn enroll(&self, token: &str) -> Reply {
        let body =
            serde_json::json!({"token": token, "hostname": "host-a", "agent_version": "0.1.0"})
                .to_string();
        self.curl(
            "/api/v1/enroll",
            &[
                "-H",
                "content-type: application/json",
                "--data-binary",
                &body,
            ],
        )
        .await
    }

    async fn new_agent(&self, group: &str) -> EnrollResponse {
        let token = self.c.store.create_enroll_token(group, 3_600_000).unwrap();
        let r = self.enroll(&token).await;
        assert_eq!(r.status, 200, "{}", r.text());
        serde_json::from_slice(&r.body).unwrap()
    }

    /// POSTs `lines` gzip'd as one batch with `credential`.
    async fn ingest(&self, credential: &str, lines: &[String]) -> Reply {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        for l in lines {
            gz.write_all(l.as_bytes()).unwrap();
            gz.write_all(b"\n").unwrap();
        }
        let file = self
            .dir
            .join(format!("batch{}", SEQ.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&file, gz.finish().unwrap()).unwrap();
        let data = format!("@{}", file.display());
        let auth = format!("authorization: Bearer {credential}");
        self.curl(
            "/api/v1/events",
            &[
                "-H",
                &auth,
                "-H",
                "content-encoding: gzip",
                "-H",
                "content-type: application/x-ndjson",
                "-H",
                "x-sluice-batch: b1",
                "--data-binary",
                &data,
            ],
        )
        .await
    }

    fn signed_bundle(&self, revision: &str) -> Vec<u8> {
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
        a.sign(&self.key).unwrap();
        a.write().unwrap()
    }
}

fn event(id: &str, time: u64, user: &str, action: &str, file: &str) -> Event {
    let mut e = Event::new(
        id.into(),
        time,
        CLASS_FILE_HOSTING,
        2,
        "Download",
        Device {
            uid: "claimed".into(),
            hostname: "host-a".into(),
            posture: "managed".into(),
            ..Device::default()
        },
    );
    e.message = format!("{user} download {file}: {action}");
    e.actor = Actor {
        user: Some(User {
            email_addr: user.into(),
            groups: vec!["finance".into()],
            guest: false,
        }),
        process: None,
    };
    e.files.push(File {
        name: Some(file.into()),
        ..File::default()
    });
    e.sluice = Some(Sluice {
        app: "files".into(),
        activity: "download".into(),
        action: action.into(),
        decided_by: "session".into(),
        incident: "i".into(),
        ..Sluice::default()
    });
    e
}

fn line(e: &Event) -> String {
    serde_json::to_string(e).unwrap()
}

both!(enroll_ingest_and_refusals);
async fn enroll_ingest_and_refusals(kind: Kind) {
    let env = start(kind, "ingest", |_| {}).await;
    // Enrollment: the token works once.
    let token = env.c.store.create_enroll_token("eng", 3_600_000).unwrap();
    let r = env.enroll(&token).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let agent: EnrollResponse = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(agent.group, "eng");
    assert!(agent.credential.len() >= 64);
    let again = env.enroll(&token).await;
    assert_eq!(again.status, 401, "{}", again.text());
    assert!(again.text().contains("already used"), "{}", again.text());
    assert_eq!(env.enroll("sle_forged").await.status, 401);

    // A batch of 100 distinct events, 10 of them repeated inside it, and one invalid line.
    let now = now_ms() as u64;
    let events: Vec<Event> = (0..100)
        .map(|i| {
            event(
                &format!("ev-{i:03}"),
                now - 1000 + i,
                "Alice@Corp.example",
                if i % 4 == 0 { "block" } else { "allow" },
                &format!("f{i}.docx"),
            )
        })
        .collect();
    let mut lines: Vec<String> = events.iter().map(line).collect();
    lines.extend(events[..10].iter().map(line));
    lines.push("{\"not\":\"an event\"}".into());
    let r = env.ingest(&agent.credential, &lines).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let resp: IngestResponse = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        (resp.accepted, resp.duplicates, resp.rejected),
        (100, 10, 1)
    );
    // The whole batch again (a retry after a lost answer): all duplicates.
    let r = env.ingest(&agent.credential, &lines).await;
    let resp: IngestResponse = serde_json::from_slice(&r.body).unwrap();
    assert_eq!((resp.accepted, resp.duplicates, resp.rejected), (0, 110, 1));
    let all = sluice_collector::query::parse("").unwrap().compile();
    assert_eq!(env.c.store.count(&all).unwrap(), 100);
    let mut ids = BTreeSet::new();
    env.c
        .store
        .for_each_page(&all, 7, |p| {
            for e in p {
                assert_eq!(e.device_uid, agent.agent_id, "device id is the agent's");
                ids.insert(e.id.clone());
            }
            true
        })
        .unwrap();
    let want: BTreeSet<String> = events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids, want);

    // A posture event updates the device inventory.
    let mut p = Event::new(
        "posture-1".into(),
        now,
        CLASS_DEVICE_INVENTORY,
        1,
        "Log",
        Device {
            uid: agent.agent_id.clone(),
            hostname: "host-a".into(),
            posture: "compliant".into(),
            os: "Linux 6.18.0".into(),
            agent_version: "0.1.1".into(),
            bundle_revision: Some("r7".into()),
        },
    );
    p.posture = Some(Posture {
        posture: "compliant".into(),
        kernel: "6.18.0".into(),
        os_name: "Debian GNU/Linux 13".into(),
        disk_encrypted: Some(true),
        firewall: Some(true),
        uptime_s: 10,
        addresses: vec!["10.9.8.7".into(), "not an address".into()],
        ..Default::default()
    });
    let r = env.ingest(&agent.credential, &[line(&p)]).await;
    assert_eq!(r.status, 200);
    let d = env
        .c
        .store
        .devices()
        .unwrap()
        .into_iter()
        .find(|d| d.uid == agent.agent_id)
        .unwrap();
    assert_eq!(
        (
            d.posture.as_str(),
            d.bundle_revision.as_str(),
            d.agent_version.as_str()
        ),
        ("compliant", "r7", "0.1.1")
    );
    assert!(!d.stale);
    assert!(d.posture_json.unwrap().contains("Debian"));

    // A gateway (another enrolled agent) learns where the endpoint is; the endpoint itself and
    // a caller without a credential do not get the list.
    let token = env
        .c
        .store
        .create_enroll_token("gateways", 3_600_000)
        .unwrap();
    let gw: EnrollResponse = serde_json::from_slice(&env.enroll(&token).await.body).unwrap();
    let r = env
        .curl(
            "/api/v1/lan-clients",
            &["-H", &format!("authorization: Bearer {}", gw.credential)],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        v["clients"],
        serde_json::json!([{"ip": "10.9.8.7", "agent_id": agent.agent_id, "posture": "compliant"}]),
        "{v}"
    );
    assert_eq!(env.curl("/api/v1/lan-clients", &[]).await.status, 401);

    // Refusals: no credential, an unknown one, a revoked agent; a non-gzip encoding; a bomb.
    let r = env.curl("/api/v1/events", &["--data-binary", "x"]).await;
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").is_some());
    assert_eq!(env.ingest("slc_unknown", &lines).await.status, 401);
    let r = env
        .curl(
            "/api/v1/bundles/current",
            &["-H", "authorization: Bearer nope"],
        )
        .await;
    assert_eq!(r.status, 401);
    let auth = format!("authorization: Bearer {}", agent.credential);
    let r = env
        .curl(
            "/api/v1/events",
            &[
                "-H",
                &auth,
                "-H",
                "content-encoding: br",
                "--data-binary",
                "x",
            ],
        )
        .await;
    assert_eq!(r.status, 415);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    for _ in 0..(129 << 10) {
        gz.write_all(&[b'\n'; 1024]).unwrap();
    }
    let bomb = env.dir.join("bomb.gz");
    std::fs::write(&bomb, gz.finish().unwrap()).unwrap();
    let r = env
        .curl(
            "/api/v1/events",
            &[
                "-H",
                &auth,
                "-H",
                "content-encoding: gzip",
                "--data-binary",
                &format!("@{}", bomb.display()),
            ],
        )
        .await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(env.c.store.revoke_agent(&agent.agent_id).unwrap());
    let r = env.ingest(&agent.credential, &lines).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("revoked"));
    assert_eq!(env.c.store.count(&all).unwrap(), 101);
}

both!(query_api_saved_queries_and_stats);
async fn query_api_saved_queries_and_stats(kind: Kind) {
    let env = start(kind, "query", |_| {}).await;
    let agent = env.new_agent("default").await;
    let now = now_ms() as u64;
    let mut lines = Vec::new();
    for i in 0..300u64 {
        let user = [
            "alice@corp.example",
            "bob@corp.example",
            "eve@partner.example",
        ][i as usize % 3];
        let action = if i % 5 == 0 { "block" } else { "allow" };
        lines.push(line(&event(
            &format!("q-{i}"),
            now - i * 60_000,
            user,
            action,
            &format!("plan {i}.docx"),
        )));
    }
    assert_eq!(env.ingest(&agent.credential, &lines).await.status, 200);
    let token = env.c.store.create_api_token("test").unwrap();
    let auth = format!("authorization: Bearer {token}");
    let get = |q: &str| format!("/api/v1/events?q={}&limit=50", encode(q));

    // Without auth: 401. With an agent credential: 401 (agents do not query).
    assert_eq!(env.curl(&get(""), &[]).await.status, 401);
    let agent_auth = format!("authorization: Bearer {}", agent.credential);
    assert_eq!(env.curl(&get(""), &["-H", &agent_auth]).await.status, 401);
    // A revoked API token is refused at once.
    let doomed = env.c.store.create_api_token("doomed").unwrap();
    let doomed_auth = format!("authorization: Bearer {doomed}");
    assert_eq!(env.curl(&get(""), &["-H", &doomed_auth]).await.status, 200);
    assert_eq!(env.c.store.revoke_api_token("doomed").unwrap(), 1);
    assert_eq!(env.curl(&get(""), &["-H", &doomed_auth]).await.status, 401);
    assert_eq!(env.c.store.revoke_api_token("doomed").unwrap(), 0);

    // user + action + time: 300 events, alice is every third, block every fifth: i % 15 == 0.
    let r = env
        .curl(
            &get("user:alice@corp.example action:block since:6h"),
            &["-H", &auth],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let evs = v["events"].as_array().unwrap();
    assert_eq!(evs.len(), 20);
    assert!(
        evs.iter()
            .all(|e| e["actor"]["user"]["email_addr"] == "alice@corp.example"
                && e["sluice"]["action"] == "block")
    );
    assert!(v["next"].is_null());
    // Newest first.
    let times: Vec<u64> = evs.iter().map(|e| e["time"].as_u64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]));

    // Pagination with the cursor walks every event once; count on request.
    let mut seen = BTreeSet::new();
    let mut path = format!(
        "/api/v1/events?q={}&limit=70&count=true",
        encode("-user:eve@partner.example")
    );
    let mut pages = 0;
    loop {
        let v = env.curl(&path, &["-H", &auth]).await.json();
        if pages == 0 {
            assert_eq!(v["count"], 200);
        }
        pages += 1;
        for e in v["events"].as_array().unwrap() {
            assert!(seen.insert(e["id"].as_str().unwrap().to_owned()));
        }
        match v["next"].as_str() {
            Some(n) => {
                path = format!(
                    "/api/v1/events?q={}&limit=70&before={n}",
                    encode("-user:eve@partner.example")
                )
            }
            None => break,
        }
    }
    assert_eq!((seen.len(), pages), (200, 3));

    // Free text, file names, negation, lists.
    let v = env
        .curl(&get("\"plan 15.docx\""), &["-H", &auth])
        .await
        .json();
    assert_eq!(v["events"].as_array().unwrap().len(), 1);
    let v = env
        .curl(&get("file:\"plan 1*.docx\" group:finance"), &["-H", &auth])
        .await
        .json();
    // plan 1, 10-19, 100-199
    assert_eq!(v["events"].as_array().unwrap().len(), 50);

    // Bad queries: 400 problem+json naming the position.
    let r = env.curl(&get("app:files usr:alice"), &["-H", &auth]).await;
    assert_eq!(r.status, 400);
    assert!(r.header("content-type").unwrap().contains("problem+json"));
    let detail = r.json()["detail"].as_str().unwrap().to_owned();
    assert!(
        detail.starts_with("position 11: unknown field \"usr\"; fields are: user, group"),
        "{detail}"
    );
    let r = env.curl(&get("since:3x"), &["-H", &auth]).await;
    assert_eq!(r.status, 400);
    assert!(r.json()["detail"].as_str().unwrap().contains("position 7"));
    let r = env
        .curl("/api/v1/events?before=garbage", &["-H", &auth])
        .await;
    assert_eq!(r.status, 400);

    // One event by id, with and without its time.
    let r = env.curl("/api/v1/events/q-7", &["-H", &auth]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["id"], "q-7");
    let t = r.json()["time"].as_u64().unwrap();
    let r = env
        .curl(&format!("/api/v1/events/q-7?time={t}"), &["-H", &auth])
        .await;
    assert_eq!(r.json()["id"], "q-7");
    assert_eq!(
        env.curl("/api/v1/events/none", &["-H", &auth]).await.status,
        404
    );

    // Saved queries.
    let body = r#"{"name":"alice blocks","query":"user:alice@corp.example action:block"}"#;
    let r = env
        .curl(
            "/api/v1/queries",
            &[
                "-H",
                &auth,
                "-H",
                "content-type: application/json",
                "--data-binary",
                body,
            ],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_i64().unwrap();
    let r = env
        .curl(
            "/api/v1/queries",
            &[
                "-H",
                &auth,
                "-H",
                "content-type: application/json",
                "--data-binary",
                body,
            ],
        )
        .await;
    assert_eq!(r.status, 409);
    let r = env
        .curl(
            "/api/v1/queries",
            &[
                "-H",
                &auth,
                "-H",
                "content-type: application/json",
                "--data-binary",
                r#"{"name":"bad","query":"usr:x"}"#,
            ],
        )
        .await;
    assert_eq!(r.status, 400);
    let r = env
        .curl("/api/v1/queries", &["-H", &auth, "--data-binary", body])
        .await;
    assert_eq!(r.status, 415, "form posts are refused (CSRF)");
    let v = env.curl("/api/v1/queries", &["-H", &auth]).await.json();
    assert_eq!(v["queries"][0]["name"], "alice blocks");
    let r = env
        .curl(
            &format!("/api/v1/queries/{id}"),
            &["-H", &auth, "-X", "DELETE"],
        )
        .await;
    assert_eq!(r.status, 204);
    let v = env.curl("/api/v1/queries", &["-H", &auth]).await.json();
    assert_eq!(v["queries"].as_array().unwrap().len(), 0);

    // Stats: 300 events over 300 minutes, 60 blocks, in hourly buckets.
    let v = env
        .curl(
            &format!("/api/v1/stats?q={}&bucket=1h", encode("since:6h")),
            &["-H", &auth],
        )
        .await
        .json();
    let buckets = v["buckets"].as_array().unwrap();
    let total: u64 = buckets
        .iter()
        .map(|b| b["activities"].as_u64().unwrap())
        .sum();
    let blocks: u64 = buckets.iter().map(|b| b["blocks"].as_u64().unwrap()).sum();
    assert_eq!((total, blocks), (300, 60));
    assert!(buckets.len() >= 5 && buckets.len() <= 7);
    assert_eq!(
        env.curl("/api/v1/stats?bucket=1ms", &["-H", &auth])
            .await
            .status,
        400
    );
    // Devices and status.
    let v = env.curl("/api/v1/devices", &["-H", &auth]).await.json();
    assert_eq!(v["devices"][0]["uid"], agent.agent_id.as_str());
    let v = env.curl("/api/v1/status", &["-H", &auth]).await.json();
    assert_eq!(v["ingest"]["accepted"], 300);
    assert_eq!(
        env.curl("/api/v1/nothing", &["-H", &auth]).await.status,
        404
    );
    assert_eq!(
        env.curl("/api/v1/devices", &["-H", &auth, "-X", "POST"])
            .await
            .status,
        405
    );
}

fn encode(q: &str) -> String {
    let mut s = String::new();
    for b in q.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            s.push(char::from(b));
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

both!(exports_stream_every_row);
async fn exports_stream_every_row(kind: Kind) {
    let env = start(kind, "export", |_| {}).await;
    let now = now_ms() as u64;
    let mut body = String::new();
    for i in 0..20_000u64 {
        let mut e = event(
            &format!("x-{i:05}"),
            now - i,
            "carol@corp.example",
            "allow",
            &format!("f,{i}.csv"),
        );
        if i == 7 {
            e.message = "=cmd|' /C calc'!A0 \"quoted\"\nsecond line".into();
        }
        body.push_str(&line(&e));
        body.push('\n');
    }
    let o = env
        .c
        .store
        .ingest(body.as_bytes(), IngestOptions::default())
        .unwrap();
    assert_eq!(o.accepted, 20_000);
    let token = env.c.store.create_api_token("export").unwrap();
    let auth = format!("authorization: Bearer {token}");

    let r = env
        .curl(
            "/api/v1/events/export?format=jsonl&q=user%3Acarol%40corp.example",
            &["-H", &auth, "--http2"],
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().contains("ndjson"));
    let text = r.text();
    let ids: BTreeSet<String> = text
        .lines()
        .map(|l| serde_json::from_str::<Event>(l).unwrap().id)
        .collect();
    assert_eq!(text.lines().count(), 20_000);
    assert_eq!(ids.len(), 20_000);

    let r = env
        .curl(
            "/api/v1/events/export?format=csv",
            &["-H", &auth, "--http1.1"],
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-disposition").unwrap().contains(".csv"));
    let text = r.text();
    assert!(text.starts_with("time,id,class_uid,activity,action,policy,app,user,"));
    // 20,000 records + header; record 7's message spans two physical lines.
    assert_eq!(text.split("\r\n").filter(|l| !l.is_empty()).count(), 20_001);
    assert!(text.contains("\"f,19999.csv\""));
    assert!(text.contains("\"'=cmd|' /C calc'!A0 \"\"quoted\"\"\nsecond line\""));
    let ids: BTreeSet<&str> = text
        .split("\r\n")
        .skip(1)
        .filter_map(|l| l.split(',').nth(1))
        .collect();
    assert_eq!(ids.len(), 20_000);
    let r = env
        .curl("/api/v1/events/export?format=xml", &["-H", &auth])
        .await;
    assert_eq!(r.status, 400);
}

both!(bundles_etag_and_long_poll);
async fn bundles_etag_and_long_poll(kind: Kind) {
    let env = start(kind, "bundles", |_| {}).await;
    let agent = env.new_agent("eng").await;
    let auth = format!("authorization: Bearer {}", agent.credential);
    let r = env.curl("/api/v1/bundles/current", &["-H", &auth]).await;
    assert_eq!(r.status, 404);

    // A bundle that does not verify is refused; a good one is served with its ETag.
    let mut forged = Archive::default();
    forged
        .files
        .insert(".manifest".into(), br#"{"revision":"9"}"#.to_vec());
    let (other, _, _) = SigningKey::generate().unwrap();
    forged.sign(&other).unwrap();
    assert!(
        env.c
            .publish_bundle("eng", forged.write().unwrap())
            .is_err()
    );
    let v1 = env.signed_bundle("1");
    env.c.publish_bundle("default", v1.clone()).unwrap();
    let r = env.curl("/api/v1/bundles/current", &["-H", &auth]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, v1, "falls back to the default group's bundle");
    let etag1 = r.header("etag").unwrap();
    let inm = format!("if-none-match: {etag1}");
    let r = env
        .curl("/api/v1/bundles/current", &["-H", &auth, "-H", &inm])
        .await;
    assert_eq!(r.status, 304);

    // A long poll is answered when a new bundle for the group is published.
    let t = Instant::now();
    let poll = {
        let (auth, inm) = (auth.clone(), inm.clone());
        let env_url = env.url("/api/v1/bundles/current");
        let ca = env.ca.clone();
        tokio::task::spawn_blocking(move || {
            Command::new("curl")
                .args(["-sS", "--max-time", "30", "--cacert"])
                .arg(ca)
                .args(["-H", &auth, "-H", &inm, "-H", "prefer: wait=20"])
                .args(["-o", "-", "-w", "\n%{http_code}"])
                .arg(env_url)
                .output()
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    let v2 = env.signed_bundle("2");
    env.c.publish_bundle("eng", v2.clone()).unwrap();
    let out = poll.await.unwrap();
    let elapsed = t.elapsed();
    assert!(
        out.stdout.ends_with(b"\n200"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(&out.stdout[..out.stdout.len() - 4], &v2[..]);
    assert!(
        elapsed >= Duration::from_millis(700) && elapsed < Duration::from_secs(10),
        "{elapsed:?}"
    );
    // A long poll with nothing new ends in 304 after the wait.
    let r = env.curl("/api/v1/bundles/current", &["-H", &auth]).await;
    let inm2 = format!("if-none-match: {}", r.header("etag").unwrap());
    let t = Instant::now();
    let r = env
        .curl(
            "/api/v1/bundles/current",
            &["-H", &auth, "-H", &inm2, "-H", "prefer: wait=1"],
        )
        .await;
    assert_eq!(r.status, 304);
    assert!(t.elapsed() >= Duration::from_millis(900));
}

/// Reads octet-counted frames from `s` until `n` have arrived.
fn read_frames(s: &mut std::net::TcpStream, n: usize) -> Vec<String> {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    try_read_frames(s, n).unwrap()
}

/// Reads octet-counted frames from `s` until `n` have arrived, or says why it could not.
fn try_read_frames(s: &mut impl std::io::Read, n: usize) -> Result<Vec<String>, String> {
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    let mut chunk = [0u8; 65536];
    while frames.len() < n {
        let k = s.read(&mut chunk).map_err(|e| e.to_string())?;
        if k == 0 {
            return Err("syslog connection closed".into());
        }
        buf.extend_from_slice(&chunk[..k]);
        while let Some(sp) = buf.iter().position(|b| *b == b' ') {
            let len: usize = std::str::from_utf8(&buf[..sp]).unwrap().parse().unwrap();
            if buf.len() < sp + 1 + len {
                break;
            }
            frames.push(String::from_utf8(buf[sp + 1..sp + 1 + len].to_vec()).unwrap());
            buf.drain(..sp + 1 + len);
        }
    }
    Ok(frames)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_to_syslog_and_webhook_with_retries() {
    let syslog = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hook = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (syslog_addr, hook_addr) = (syslog.local_addr().unwrap(), hook.local_addr().unwrap());
    let hook_dir = temp_dir("hook");
    let bearer = hook_dir.join("token");
    std::fs::write(&bearer, "hook-secret\n").unwrap();
    let env = start(Kind::Sqlite, "forward", |c| {
        c.forward
            .syslog
            .push(sluice_collector::config::SyslogTarget {
                address: syslog_addr.to_string(),
                tls: false,
                ca_file: None,
                server_name: None,
                send: Default::default(),
            });
        c.forward
            .webhook
            .push(sluice_collector::config::WebhookTarget {
                url: format!("http://{hook_addr}/ingest?src=sluice"),
                bearer_file: Some(bearer.clone()),
                ca_file: None,
                batch: 500,
                send: Default::default(),
            });
    })
    .await;
    // The webhook answers 503 first, then 200; it records every request.
    let hook_thread = std::thread::spawn(move || {
        let mut requests = Vec::new();
        for attempt in 0..2 {
            let (mut s, _) = hook.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 65536];
            let (head, body_len) = loop {
                let k = s.read(&mut chunk).unwrap();
                buf.extend_from_slice(&chunk[..k]);
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8(buf[..end].to_vec()).unwrap();
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap())
                        })
                        .unwrap();
                    buf.drain(..end + 4);
                    break (head, len);
                }
            };
            while buf.len() < body_len {
                let k = s.read(&mut chunk).unwrap();
                buf.extend_from_slice(&chunk[..k]);
            }
            let status = if attempt == 0 {
                "503 Service Unavailable"
            } else {
                "200 OK"
            };
            s.write_all(
                format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .unwrap();
            requests.push((head, String::from_utf8(buf).unwrap()));
        }
        requests
    });
    let agent = env.new_agent("default").await;
    let now = now_ms() as u64;
    let lines: Vec<String> = (0..3)
        .map(|i| {
            line(&event(
                &format!("fw-{i}"),
                now + i,
                "dave@corp.example",
                if i == 1 { "block" } else { "allow" },
                "a.pdf",
            ))
        })
        .collect();
    let r = env.ingest(&agent.credential, &lines).await;
    assert_eq!(r.status, 200);
    // A duplicate is not forwarded again.
    env.ingest(&agent.credential, &lines[..1]).await;

    let frames = tokio::task::spawn_blocking(move || {
        let (mut s, _) = syslog.accept().unwrap();
        read_frames(&mut s, 3)
    })
    .await
    .unwrap();
    assert_eq!(frames.len(), 3);
    for (i, f) in frames.iter().enumerate() {
        let pri = if i == 1 { "<132>1 " } else { "<134>1 " };
        assert!(f.starts_with(pri), "{f}");
        assert!(f.contains(&format!("[sluice@32473 id=\"fw-{i}\"")), "{f}");
        assert!(f.contains(" host-a sluice - 6006 "), "{f}");
        let json = &f[f.find("] {").unwrap() + 2..];
        assert_eq!(
            serde_json::from_str::<Event>(json).unwrap().id,
            format!("fw-{i}")
        );
    }

    let requests = tokio::task::spawn_blocking(move || hook_thread.join().unwrap())
        .await
        .unwrap();
    assert_eq!(requests.len(), 2, "the failed POST is retried");
    for (head, body) in &requests {
        assert!(
            head.starts_with("POST /ingest?src=sluice HTTP/1.1"),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("authorization: bearer hook-secret")
        );
        let arr: Vec<Event> = serde_json::from_str(body).unwrap();
        let ids: Vec<&str> = arr.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["fw-0", "fw-1", "fw-2"]);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stats = env.c.forward.stats();
    assert_eq!(stats[0].sent, 3);
    assert_eq!(stats[1].sent, 3);
    assert!(stats[1].failures >= 1);
    assert!(stats[1].last_error.as_deref().unwrap().contains("503"));
    let _ = std::fs::remove_dir_all(hook_dir);
}

both!(retention_deletes_old_events);
async fn retention_deletes_old_events(kind: Kind) {
    let dir = temp_dir("retention");
    let mut config = Config::with_state_dir(dir.join("state"));
    config.listen = "127.0.0.1:0".parse().unwrap();
    let mut pg = store_for(kind, &dir, &mut config);
    let c = Collector::open(config).unwrap();
    let now = now_ms() as u64;
    let day = 86_400_000u64;
    let mut body = String::new();
    for i in 0..12_000u64 {
        // 10,000 older than 90 days, 2,000 recent.
        let t = if i < 10_000 {
            now - 100 * day - i
        } else {
            now - i
        };
        body.push_str(&line(&event(&format!("r-{i}"), t, "u@x", "allow", "f")));
        body.push('\n');
    }
    c.store
        .ingest(body.as_bytes(), IngestOptions::default())
        .unwrap();
    let all = sluice_collector::query::parse("").unwrap().compile();
    assert_eq!(c.store.count(&all).unwrap(), 12_000);
    // The server's retention task runs at start (in batches of 5,000).
    let c = Arc::new(c);
    let server = Server::bind(c.clone()).await.unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(server.run(shutdown.clone()));
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.store.count(&all).unwrap() != 2_000 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    assert_eq!(c.store.count(&all).unwrap(), 2_000);
    let left = c
        .store
        .search(
            &sluice_collector::query::parse("before:1")
                .unwrap()
                .compile(),
            10,
            None,
        )
        .unwrap();
    assert!(left.events.is_empty());
    if let Some(pg) = pg.as_mut() {
        pg.stop();
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_sluice-collector")
}

fn cli(config: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin())
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

both!(cli_init_tokens_publish_and_query);
async fn cli_init_tokens_publish_and_query(kind: Kind) {
    let env = start(kind, "cli", |_| {}).await;
    let config = env.dir.join("collector.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\nbundle_public_key = \"{}\"\n{}",
            env.dir.join("state").display(),
            env.dir.join("bundle.pub.pem").display(),
            match &env.c.config.store.postgres {
                Some(p) => format!("[store]\npostgres = \"{p}\"\n"),
                None => String::new(),
            }
        ),
    )
    .unwrap();
    let (ok, out, err) = cli(&config, &["init"]);
    assert!(ok, "{err}");
    assert!(out.contains("password (shown once): "), "{out}");
    assert!(out.contains("ca.pem"));
    let (ok, token, err) = cli(
        &config,
        &["token", "create", "--group", "ops", "--ttl", "1h"],
    );
    assert!(ok, "{err}");
    let r = env.enroll(token.trim()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let agent: EnrollResponse = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(agent.group, "ops");
    let (ok, out, _) = cli(&config, &["agent", "list"]);
    assert!(
        ok && out.contains(&agent.agent_id) && out.contains("active"),
        "{out}"
    );

    // A long poll is woken by a bundle published from another process.
    let auth = format!("authorization: Bearer {}", agent.credential);
    let v1 = env.signed_bundle("10");
    env.c.publish_bundle("ops", v1).unwrap();
    let r = env.curl("/api/v1/bundles/current", &["-H", &auth]).await;
    let inm = format!("if-none-match: {}", r.header("etag").unwrap());
    let file = env.dir.join("v11.tar.gz");
    std::fs::write(&file, env.signed_bundle("11")).unwrap();
    let (cfg2, file2) = (config.clone(), file.clone());
    let publisher = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(500));
        cli(
            &cfg2,
            &[
                "bundle",
                "publish",
                file2.to_str().unwrap(),
                "--group",
                "ops",
            ],
        )
    });
    let t = Instant::now();
    let r = env
        .curl(
            "/api/v1/bundles/current",
            &["-H", &auth, "-H", &inm, "-H", "prefer: wait=20"],
        )
        .await;
    let (ok, out, err) = publisher.await.unwrap();
    assert!(ok, "{err}");
    assert!(out.contains("published revision 11"), "{out}");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-sluice-bundle-revision").as_deref(), Some("11"));
    assert!(t.elapsed() < Duration::from_secs(10));
    let (ok, _, err) = cli(&config, &["bundle", "publish", config.to_str().unwrap()]);
    assert!(!ok && err.contains("bundle"), "{err}");

    let (ok, out, err) = cli(&config, &["apitoken", "create", "--name", "ci"]);
    assert!(ok && out.starts_with("sla_"), "{err}");
    let now = now_ms() as u64;
    let lines: Vec<String> = (0..5)
        .map(|i| {
            line(&event(
                &format!("c-{i}"),
                now - i,
                "erin@corp.example",
                "block",
                "b.docx",
            ))
        })
        .collect();
    assert_eq!(env.ingest(&agent.credential, &lines).await.status, 200);
    let (ok, out, err) = cli(
        &config,
        &[
            "query",
            "user:erin@corp.example action:block",
            "--format",
            "csv",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 6, "{out}");
    let (ok, out, _) = cli(
        &config,
        &["query", "user:erin@corp.example", "--limit", "2"],
    );
    assert!(ok);
    assert_eq!(out.lines().count(), 2);
    let (ok, _, err) = cli(&config, &["query", "usr:x"]);
    assert!(
        !ok && err.contains("position 1: unknown field \"usr\""),
        "{err}"
    );
    let (ok, out, _) = cli(&config, &["agent", "revoke", &agent.agent_id]);
    assert!(ok && out.contains("revoked"));
    assert_eq!(env.ingest(&agent.credential, &lines).await.status, 403);
    let (ok, _, err) = cli(&config, &["agent", "revoke", "ag_nobody"]);
    assert!(!ok && err.contains("no agent"));
}

/// A TLS connection to the collector that trusts its CA and then says nothing.
async fn silent_tls(env: &Env) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&env.ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(env.addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake")
}

/// Whether the collector closes `s` within `within` (EOF or reset), reading whatever comes.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, within: Duration) -> bool {
    use tokio::io::AsyncReadExt as _;
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_bounds_and_idle_timeout() {
    let env = start(Kind::Sqlite, "conns", |c| {
        c.limits.max_connections = 6;
        c.limits.max_connections_per_address = 3;
        c.limits.idle_timeout_s = 2;
    })
    .await;
    let token = env.c.store.create_api_token("conns").unwrap();
    let auth = format!("authorization: Bearer {token}");
    let connect_from = |ip: &str| {
        let ip: std::net::IpAddr = ip.parse().unwrap();
        let addr = env.addr;
        async move {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind(SocketAddr::new(ip, 0)).unwrap();
            s.connect(addr).await.unwrap()
        }
    };

    // Three held from one address; the fourth from it is closed at once.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_from("127.0.0.1").await);
    }
    let mut fourth = connect_from("127.0.0.1").await;
    assert!(closed_within(&mut fourth, Duration::from_secs(5)).await);
    // Three more from a second address fill the collector; a third address is refused too.
    for _ in 0..3 {
        held.push(connect_from("127.0.0.2").await);
    }
    let mut seventh = connect_from("127.0.0.3").await;
    assert!(closed_within(&mut seventh, Duration::from_secs(5)).await);
    // The held ones are still open (nothing was sent, and the handshake bound is 10 s).
    assert!(!closed_within(&mut held[0], Duration::from_millis(300)).await);
    let stats = env.c.conns.stats();
    assert_eq!(stats["open"], 6, "{stats}");
    assert_eq!(stats["refused_address_limit"], 1, "{stats}");
    assert_eq!(stats["refused_total_limit"], 1, "{stats}");

    // Their places come back when they go.
    held.clear();
    wait_for(|| env.c.conns.stats()["open"] == 0).await;
    let r = env.curl("/api/v1/status", &["-H", &auth]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["connections"]["refused_total_limit"], 1, "{v}");
    assert_eq!(v["connections"]["max_per_address"], 3, "{v}");

    // A client that completes TLS and then says nothing is closed once idle...
    let mut silent = silent_tls(&env).await;
    assert!(closed_within(&mut silent, Duration::from_secs(15)).await);
    // At least this one (a curl starved of CPU for the idle bound on a loaded machine may be
    // another: the count is not asserted exactly).
    assert!(env.c.conns.stats()["closed_idle"].as_u64().unwrap_or(0) >= 1);

    // ...but a long poll longer than the idle bound is a request being handled: it gets its
    // answer (304 after the wait), not a closed connection.
    let agent = env.new_agent("eng").await;
    env.c.publish_bundle("eng", env.signed_bundle("1")).unwrap();
    let agent_auth = format!("authorization: Bearer {}", agent.credential);
    let r = env
        .curl("/api/v1/bundles/current", &["-H", &agent_auth])
        .await;
    let inm = format!("if-none-match: {}", r.header("etag").unwrap());
    let t = Instant::now();
    let r = env
        .curl(
            "/api/v1/bundles/current",
            &["-H", &agent_auth, "-H", &inm, "-H", "prefer: wait=4"],
        )
        .await;
    // The answer came after the whole wait: the connection was not cut as idle.
    assert_eq!(r.status, 304, "{}", r.text());
    assert!(t.elapsed() >= Duration::from_millis(3900));
}

/// Waits up to 10 s for `f` to hold.
async fn wait_for(f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "condition not met in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_to_syslog_over_tls_and_refuses_an_unverified_receiver() {
    use sluice_collector::config::SyslogTarget;
    // Two receivers with certificates for siem.test from their own CA; the collector trusts the
    // first one's CA only.
    let material = temp_dir("siem-tls");
    let (good_dir, other_dir) = (material.join("good"), material.join("other"));
    let names = vec!["siem.test".to_owned()];
    let good_ca = sluice_collector::tls::ensure(&good_dir, &names).unwrap();
    sluice_collector::tls::ensure(&other_dir, &names).unwrap();
    let good = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (good_addr, other_addr) = (good.local_addr().unwrap(), other.local_addr().unwrap());
    let target = |addr: SocketAddr| SyslogTarget {
        address: addr.to_string(),
        tls: true,
        ca_file: Some(good_ca.clone()),
        server_name: Some("siem.test".into()),
        send: Default::default(),
    };
    let env = start(Kind::Sqlite, "forward-tls", |c| {
        c.forward.syslog.push(target(good_addr));
        c.forward.syslog.push(target(other_addr));
    })
    .await;

    // Each receiver accepts one connection and reads RFC 5425 frames over TLS.
    let serve = |listener: std::net::TcpListener, dir: PathBuf, n: usize| {
        // The listener is handed back so that retries queue instead of being refused.
        std::thread::spawn(move || {
            let config = sluice_collector::tls::server_config(&dir).unwrap();
            let (tcp, _) = listener.accept().unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let conn = rustls::ServerConnection::new(config).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            (try_read_frames(&mut tls, n), listener)
        })
    };
    let good_rx = serve(good, good_dir, 2);
    let other_rx = serve(other, other_dir, 1);

    let agent = env.new_agent("default").await;
    let now = now_ms() as u64;
    let lines: Vec<String> = (0..2)
        .map(|i| {
            line(&event(
                &format!("tls-{i}"),
                now + i,
                "erin@corp.example",
                "allow",
                "b.pdf",
            ))
        })
        .collect();
    assert_eq!(env.ingest(&agent.credential, &lines).await.status, 200);

    let (frames, _good) = tokio::task::spawn_blocking(move || good_rx.join().unwrap())
        .await
        .unwrap();
    let frames = frames.expect("frames over TLS");
    for (i, f) in frames.iter().enumerate() {
        assert!(f.contains(&format!("[sluice@32473 id=\"tls-{i}\"")), "{f}");
    }
    // The receiver whose certificate does not chain to the configured CA gets no event: the
    // handshake fails on the collector's side and is reported.
    let (refused, _other) = tokio::task::spawn_blocking(move || other_rx.join().unwrap())
        .await
        .unwrap();
    assert!(refused.is_err(), "an unverified receiver got {refused:?}");
    wait_for(|| env.c.forward.stats()[0].sent == 2).await;
    wait_for(|| env.c.forward.stats()[1].failures >= 1).await;
    let stats = env.c.forward.stats();
    assert_eq!(stats[1].sent, 0);
    let why = stats[1].last_error.clone().unwrap_or_default();
    assert!(why.to_ascii_lowercase().contains("certificate"), "{why}");
    let _ = std::fs::remove_dir_all(material);
}

// A protected file's sealed passwords: the agent seals them to the key the collector serves;
// the collector keeps them encrypted under its vault key and takes them out of the stored
// event; a box moved to another event, or with its recipients changed, is not kept; rotating
// the keys re-encrypts what is kept and the passwords still come out.
both!(sealed_passwords_are_kept_bound_and_survive_a_rotation);
async fn sealed_passwords_are_kept_bound_and_survive_a_rotation(kind: Kind) {
    use sluice_collector::release;
    use sluice_protocol::{ProtectedFile, ReleaseSecrets, seal::SealingKey};

    let env = start(kind, "release", |_| {}).await;
    let agent = env.new_agent("default").await;
    let auth = format!("authorization: Bearer {}", agent.credential);
    assert_eq!(env.curl("/api/v1/release-key", &[]).await.status, 401);
    let r = env.curl("/api/v1/release-key", &["-H", &auth]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let key = SealingKey::from_base64(r.json()["public_key"].as_str().unwrap()).unwrap();
    assert_eq!(r.json()["key_id"], key.id_hex());
    let keys_file = env.dir.join("state").join(release::KEYS_FILE);
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&keys_file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let secrets = |n: u32| ReleaseSecrets {
        open_password: Some(format!("open-{n}")),
        owner_password: format!("owner-{n}"),
    };
    let protected = |event_id: &str, release: &str, n: u32, bind_to: &str| {
        let mut p = ProtectedFile {
            release_id: release.into(),
            name: Some("plan.pdf".into()),
            sha256: "aa".repeat(32),
            original_sha256: "bb".repeat(32),
            label: "highly-confidential".into(),
            template: "organisation-only".into(),
            open: "organisation".into(),
            rights: vec!["view".into(), "print".into()],
            expires_at: Some(now_ms() as u64 + 86_400_000),
            ..ProtectedFile::default()
        };
        let plain = serde_json::to_vec(&secrets(n)).unwrap();
        p.sealed = key.seal(&p.binding(bind_to), &plain).unwrap();
        let mut e = event(
            event_id,
            now_ms() as u64,
            "bob@corp.example",
            "protect",
            "plan.pdf",
        );
        e.sluice.as_mut().unwrap().protected.push(p);
        e
    };
    let good = protected("ev-rel-1", "rel-1", 1, "ev-rel-1");
    // Sealed for another event, then put in this one.
    let moved = protected("ev-rel-2", "rel-2", 2, "ev-other");
    // Sealed for organisation, then its recipients widened on the way.
    let mut widened = protected("ev-rel-3", "rel-3", 3, "ev-rel-3");
    widened.sluice.as_mut().unwrap().protected[0].open = "anyone".into();
    let r = env
        .ingest(
            &agent.credential,
            &[line(&good), line(&moved), line(&widened)],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["accepted"], 3, "{}", r.text());

    let kept = release::get(&env.c.store, "rel-1").unwrap().expect("kept");
    assert_eq!(kept.event_id, "ev-rel-1");
    assert_eq!(kept.downloader, "bob@corp.example");
    assert_eq!(kept.device_uid, agent.agent_id);
    for bad in ["rel-2", "rel-3"] {
        assert!(release::get(&env.c.store, bad).unwrap().is_none(), "{bad}");
    }
    let ring = env.c.release_keys.as_ref().unwrap();
    assert_eq!(
        release::secrets(&ring.get().unwrap(), &kept).unwrap(),
        secrets(1)
    );
    // The stored event has no sealed box, and neither the database nor the event holds a
    // password in clear.
    let stored = env.c.store.get_event("ev-rel-1").unwrap().unwrap().json;
    assert!(!stored.contains("sealed"), "{stored}");
    // Every file of the database: SQLite's and its log, or the PostgreSQL cluster's (its data
    // and its write-ahead log).
    let files = match kind {
        Kind::Sqlite => vec![
            env.dir.join("state/collector.db"),
            env.dir.join("state/collector.db-wal"),
        ],
        Kind::Postgres => files_under(&env.dir.join("pg/data")),
    };
    assert!(files.len() >= 2, "{files:?}");
    for f in files {
        let bytes = std::fs::read(&f).unwrap_or_default();
        assert!(
            !bytes.windows(6).any(|w| w == b"open-1"),
            "a password in clear in {}",
            f.display()
        );
    }

    let before = ring.get().unwrap().vault_ids();
    let (rotated, n) = release::rotate(&env.c.store, &env.dir.join("state")).unwrap();
    assert_eq!(n, 1);
    assert_ne!(rotated.vault_ids(), before);
    assert_eq!(rotated.vault_ids().len(), 1);
    // The running collector sees the new keys; the kept password decrypts under them.
    let now_keys = ring.get().unwrap();
    assert_eq!(now_keys.vault_ids(), rotated.vault_ids());
    let kept = release::get(&env.c.store, "rel-1").unwrap().unwrap();
    assert_eq!(release::secrets(&now_keys, &kept).unwrap(), secrets(1));
    // A box sealed to the previous sealing key still opens (agents learn the new key later).
    let late = protected("ev-rel-4", "rel-4", 4, "ev-rel-4");
    let r = env.ingest(&agent.credential, &[line(&late)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(release::get(&env.c.store, "rel-4").unwrap().is_some());
    let r = env.curl("/api/v1/release-key", &["-H", &auth]).await;
    assert_ne!(
        r.json()["key_id"],
        key.id_hex(),
        "the new sealing key is served"
    );
}

both!(risk_marks_long_poll_to_agents_and_refuse_bad_requests);
async fn risk_marks_long_poll_to_agents_and_refuse_bad_requests(kind: Kind) {
    let env = start(kind, "risk", |_| {}).await;
    let a = env.new_agent("default").await;
    let b = env.new_agent("default").await;
    let auth_a = format!("authorization: Bearer {}", a.credential);
    let auth_b = format!("authorization: Bearer {}", b.credential);
    let token = env.c.store.create_api_token("admin").unwrap();
    let admin = format!("authorization: Bearer {token}");
    let r = env.curl("/api/v1/risk", &["-H", &auth_a]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["users"], serde_json::json!([]));
    let etag = r.header("etag").unwrap();
    let inm = format!("if-none-match: {etag}");
    assert_eq!(
        env.curl("/api/v1/risk", &["-H", &auth_a, "-H", &inm])
            .await
            .status,
        304
    );

    // A long poll is answered as soon as an admin marks the device.
    let t = Instant::now();
    let poll = {
        let (auth, inm) = (auth_a.clone(), inm.clone());
        let url = env.url("/api/v1/risk");
        let ca = env.ca.clone();
        tokio::task::spawn_blocking(move || {
            Command::new("curl")
                .args(["-sS", "--max-time", "30", "--cacert"])
                .arg(ca)
                .args(["-H", &auth, "-H", &inm, "-H", "prefer: wait=20"])
                .args(["-o", "-", "-w", "\n%{http_code}"])
                .arg(url)
                .output()
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let path = format!("/api/v1/risk/devices/{}", a.agent_id);
    let mark = |body: &'static str| {
        let (path, admin) = (path.clone(), admin.clone());
        let env = &env;
        async move {
            env.curl(
                &path,
                &[
                    "-H",
                    &admin,
                    "-H",
                    "content-type: application/json",
                    "--data-binary",
                    body,
                ],
            )
            .await
        }
    };
    let r = mark(r#"{"level": "quarantined", "reason": "reported stolen"}"#).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let out = poll.await.unwrap();
    let waited = t.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with("\n200"), "{text}");
    let state: serde_json::Value = serde_json::from_str(&text[..text.len() - 4]).unwrap();
    assert_eq!(state["devices"][0]["mark"], "quarantined");
    assert_eq!(state["devices"][0]["reason"], "reported stolen");
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    // Another agent does not learn this device's mark; both learn users' risk.
    let r = env.curl("/api/v1/risk", &["-H", &auth_b]).await;
    assert_eq!(r.json()["devices"], serde_json::json!([]));
    let r = env
        .curl(
            "/api/v1/risk/users/Bob%40corp.example",
            &[
                "-H",
                &admin,
                "-H",
                "content-type: application/json",
                "--data-binary",
                r#"{"level": "risky", "reason": "phished", "for_s": 3600}"#,
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = env.curl("/api/v1/risk", &["-H", &auth_b]).await;
    assert_eq!(r.json()["users"][0]["user"], "bob@corp.example");
    assert_eq!(r.json()["users"][0]["risk"], "high");
    assert!(r.json()["users"][0]["expires_at"].as_u64().is_some());

    // Refusals: no credential, an agent's credential for a mark, a bad level, a bad body.
    assert_eq!(env.curl("/api/v1/risk", &[]).await.status, 401);
    let r = env
        .curl(
            &path,
            &[
                "-H",
                &auth_a,
                "-H",
                "content-type: application/json",
                "--data-binary",
                r#"{"level": "none"}"#,
            ],
        )
        .await;
    assert_eq!(r.status, 401, "an agent cannot lift its own mark");
    assert_eq!(mark(r#"{"level": "banished"}"#).await.status, 400);
    assert_eq!(mark(r#"{"level": "none", "extra": 1}"#).await.status, 400);
    assert_eq!(mark("not json").await.status, 400);
    // Lifting it is served too, and both changes are in the log.
    assert_eq!(mark(r#"{"level": "none"}"#).await.status, 200);
    let r = env.curl("/api/v1/risk", &["-H", &auth_a]).await;
    assert_eq!(r.json()["devices"], serde_json::json!([]));
    let q = format!("/api/v1/events?q={}&limit=50", encode("app:sluice"));
    let r = env.curl(&q, &["-H", &admin]).await;
    let log = r.text();
    assert!(
        log.contains("quarantined") && log.contains("token:admin") && log.contains("-> none"),
        "{log}"
    );
}

// A user cannot hide a burst behind a flood: with the detection queue at its smallest, a
// flood of other users' batches makes ingestion wait instead of skipping detection, and the
// burst still raises its alert (and the user's risk).
both!(a_flood_slows_ingestion_but_never_skips_detection);
async fn a_flood_slows_ingestion_but_never_skips_detection(kind: Kind) {
    let env = start(kind, "flood", |c| {
        c.detection.enabled = true;
        c.detection.queue = 1;
        c.detection.mass_download.floor = Some(20);
    })
    .await;
    let agent = env.new_agent("default").await;
    let now = now_ms() as u64;
    let mut floods = Vec::new();
    for b in 0..12u64 {
        let lines: Vec<String> = (0..400u64)
            .map(|i| {
                line(&event(
                    &format!("noise-{b}-{i}"),
                    now - 1000 + i,
                    &format!("noise{}@corp.example", (b * 400 + i) % 97),
                    "allow",
                    "n.docx",
                ))
            })
            .collect();
        floods.push(lines);
    }
    let burst: Vec<String> = (0..25u64)
        .map(|i| {
            line(&event(
                &format!("burst-{i}"),
                now + i,
                "mallory@corp.example",
                "allow",
                &format!("secret-{i}.docx"),
            ))
        })
        .collect();
    // The flood comes from many agents (one agent's own batches beyond its share are refused
    // before they are read: see the ingestion gate's test).
    let mut flooders = Vec::new();
    for _ in 0..floods.len() {
        flooders.push(env.new_agent("default").await.credential);
    }
    let env = Arc::new(env);
    let mut tasks = Vec::new();
    for (lines, cred) in floods.into_iter().zip(flooders) {
        let env = env.clone();
        tasks.push(tokio::spawn(async move {
            env.ingest(&cred, &lines).await.status
        }));
    }
    let burst_status = env.ingest(&agent.credential, &burst).await.status;
    assert_eq!(burst_status, 200);
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let mut found = false;
    for _ in 0..100 {
        let alerts = env.c.risk.state();
        if alerts
            .users
            .iter()
            .any(|u| u.user == "mallory@corp.example")
        {
            found = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = env.c.detect.report();
    assert!(found, "the burst went unseen: {report:?}");
    assert_eq!(report.dropped, 0, "{report:?}");
}
