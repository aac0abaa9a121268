//! Detection and alerts over the real HTTPS API (driven by `curl`, trusting the collector's own
//! CA): events ingested by an enrolled agent open alerts (mass download, impossible travel, new
//! country and network from a generated GeoIP database), repeats fold into the open alert, the
//! alerts API lists, filters, shows and changes them, a detector's `raise_risk` raises the user's
//! risk until the alert is resolved, a webhook with `send = "alerts"` receives alerts and no
//! events, and the portal's pages list an alert, show its evidence and change its state through
//! CSRF-protected forms.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    path::PathBuf,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use sluice_collector::{
    Collector,
    config::{Config, Send, WebhookTarget},
    detect::config::{GeoConfig, RaiseRisk},
    server::Server,
    store::now_ms,
};
use sluice_protocol::{
    Actor, CLASS_FILE_HOSTING, Device, Endpoint, EnrollResponse, Event, File, Process, Sluice, User,
};
use tokio_util::sync::CancellationToken;

mod common;
use common::{Kind, store_for};

static SEQ: AtomicUsize = AtomicUsize::new(0);

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "sluice-alerts-{name}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A MaxMind DB: 10.1/16 Berlin, 10.4/16 Tokyo.
fn write_mmdb(path: &std::path::Path) {
    use maxminddb_writer::{Database, metadata::IpVersion, paths::IpAddrWithMask};
    #[derive(serde::Serialize)]
    struct Names {
        en: String,
    }
    #[derive(serde::Serialize)]
    struct Country {
        iso_code: String,
    }
    #[derive(serde::Serialize)]
    struct City {
        names: Names,
    }
    #[derive(serde::Serialize)]
    struct Location {
        latitude: f64,
        longitude: f64,
    }
    #[derive(serde::Serialize)]
    struct Record {
        country: Country,
        city: City,
        location: Location,
    }
    let mut db = Database::default();
    db.metadata.ip_version = IpVersion::V6;
    db.metadata.binary_format_major_version = 2;
    db.metadata.database_type = "Test-City".into();
    db.metadata.build_epoch = 1_700_000_000;
    for (net, cc, city, lat, lon) in [
        ("::a01:0/112", "DE", "Berlin", 52.52, 13.405),
        ("::a04:0/112", "JP", "Tokyo", 35.676, 139.650),
    ] {
        let v = db
            .insert_value(Record {
                country: Country {
                    iso_code: cc.into(),
                },
                city: City {
                    names: Names { en: city.into() },
                },
                location: Location {
                    latitude: lat,
                    longitude: lon,
                },
            })
            .unwrap();
        db.insert_node(net.parse::<IpAddrWithMask>().unwrap(), v);
    }
    let mut out = Vec::new();
    db.write_to(&mut out).unwrap();
    std::fs::write(path, out).unwrap();
}

/// A webhook receiver on 127.0.0.1 answering 200 to every POST; keeps the JSON items.
fn webhook() -> (SocketAddr, Arc<Mutex<Vec<serde_json::Value>>>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let g = g.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 65536];
                loop {
                    // One request: headers, then Content-Length bytes.
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < end + 4 + len {
                        match s.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body: Vec<u8> = buf.drain(..end + 4 + len).skip(end + 4).collect();
                    if let Ok(serde_json::Value::Array(items)) = serde_json::from_slice(&body) {
                        g.lock().unwrap().extend(items);
                    }
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
                }
            });
        }
    });
    (addr, got)
}

struct Env {
    pg: Option<sluice_collector::store::cluster::LocalCluster>,
    dir: PathBuf,
    c: Arc<Collector>,
    addr: SocketAddr,
    ca: PathBuf,
    shutdown: CancellationToken,
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
}

impl Env {
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
            .arg(format!("https://localhost:{}{path}", self.addr.port()));
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .unwrap()
            .unwrap();
        assert!(
            out.status.success(),
            "curl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r = Reply {
            status: String::from_utf8_lossy(&out.stdout).trim().parse().unwrap(),
            headers: std::fs::read_to_string(&hdr).unwrap_or_default(),
            body: std::fs::read(&body).unwrap_or_default(),
        };
        let _ = std::fs::remove_file(hdr);
        let _ = std::fs::remove_file(body);
        r
    }

    async fn ingest(&self, credential: &str, events: &[Event]) {
        let mut body = String::new();
        for e in events {
            body.push_str(&serde_json::to_string(e).unwrap());
            body.push('\n');
        }
        let file = self
            .dir
            .join(format!("batch{}", SEQ.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&file, body).unwrap();
        let data = format!("@{}", file.display());
        let auth = format!("authorization: Bearer {credential}");
        let r = self
            .curl(
                "/api/v1/events",
                &[
                    "-H",
                    &auth,
                    "-H",
                    "content-type: application/x-ndjson",
                    "--data-binary",
                    &data,
                ],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let accepted = r.json()["accepted"].as_u64().unwrap();
        assert_eq!(accepted, events.len() as u64);
    }

    /// Waits until detection has looked at everything ingested.
    async fn settled(&self) {
        let t = Instant::now();
        while !self.c.detect.idle() {
            assert!(t.elapsed() < Duration::from_secs(60), "detection stuck");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn event(id: &str, time: u64, user: &str, activity: &str, ip: &str) -> Event {
    let mut e = Event::new(
        id.into(),
        time,
        CLASS_FILE_HOSTING,
        2,
        activity,
        Device {
            uid: "claimed".into(),
            hostname: "host-a".into(),
            posture: "managed".into(),
            ..Device::default()
        },
    );
    e.actor = Actor {
        user: Some(User {
            email_addr: user.into(),
            groups: vec!["staff".into()],
            guest: false,
        }),
        process: Some(Process {
            pid: 7,
            name: "firefox".into(),
            path: Some("/usr/bin/firefox".into()),
            uid: 1000,
            user: None,
        }),
    };
    e.src_endpoint = Some(Endpoint {
        ip: Some("192.168.1.20".into()),
        port: None,
        hostname: None,
        public_ip: Some(ip.into()),
    });
    if activity == "download" {
        e.files.push(File {
            name: Some(format!("{id}.docx")),
            ..File::default()
        });
    }
    e.sluice = Some(Sluice {
        app: "files".into(),
        activity: activity.into(),
        action: "allow".into(),
        decided_by: "session".into(),
        ..Sluice::default()
    });
    e
}

async fn start(kind: Kind) -> (Env, Arc<Mutex<Vec<serde_json::Value>>>) {
    let dir = temp_dir("api");
    let mmdb = dir.join("city.mmdb");
    write_mmdb(&mmdb);
    let (hook, got) = webhook();
    let mut config = Config::with_state_dir(dir.join("state"));
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.forward.webhook.push(WebhookTarget {
        url: format!("http://{hook}/alerts"),
        bearer_file: None,
        ca_file: None,
        batch: 100,
        send: Send::Alerts,
    });
    let d = &mut config.detection;
    d.geo = Some(GeoConfig {
        database: mmdb,
        max_speed_kmh: 1000.0,
        min_distance_km: 300.0,
    });
    d.mass_download.raise_risk = Some(RaiseRisk {
        level: sluice_policy::model::UserRisk::High,
        for_s: Some(3600),
    });
    let pg = store_for(kind, &dir, &mut config);
    let c = Arc::new(Collector::open(config).unwrap());
    let server = Server::bind(c.clone()).await.unwrap();
    let addr = server.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(server.run(shutdown.clone()));
    let ca = dir.join("state/tls/ca.pem");
    (
        Env {
            pg,
            dir,
            c,
            addr,
            ca,
            shutdown,
        },
        got,
    )
}

both!(ingested_events_open_alerts_that_the_api_and_portal_work_through);
async fn ingested_events_open_alerts_that_the_api_and_portal_work_through(kind: Kind) {
    let (env, hooked) = start(kind).await;
    let token = env.c.store.create_enroll_token("eng", 3_600_000).unwrap();
    let body = serde_json::json!({"token": token, "hostname": "host-a", "agent_version": "0.1.0"})
        .to_string();
    let r = env
        .curl(
            "/api/v1/enroll",
            &[
                "-H",
                "content-type: application/json",
                "--data-binary",
                &body,
            ],
        )
        .await;
    let agent: EnrollResponse = serde_json::from_slice(&r.body).unwrap();
    let api = env.c.store.create_api_token("soc").unwrap();
    let bearer = format!("authorization: Bearer {api}");

    // Two days of Bob's ordinary work from Berlin, then Tokyo half an hour later; Alice
    // downloads 60 files in a minute.
    let now = now_ms() as u64;
    let hour = 3_600_000;
    let mut history: Vec<Event> = (0..60)
        .map(|i| {
            event(
                &format!("bob-{i:03}"),
                now - 50 * hour + i * 45 * 60_000,
                "bob@corp.example",
                "view",
                "10.1.3.4",
            )
        })
        .collect();
    history.extend((0..10).map(|i| {
        event(
            &format!("alice-{i:03}"),
            now - 30 * hour + i * hour,
            "alice@corp.example",
            "view",
            "10.1.3.5",
        )
    }));
    env.ingest(&agent.credential, &history).await;
    let last_bob = history[59].time;
    let burst: Vec<Event> = (0..60)
        .map(|i| {
            event(
                &format!("dl-{i:03}"),
                now - 60_000 + i * 1000,
                "alice@corp.example",
                "download",
                "10.1.3.5",
            )
        })
        .collect();
    let tokyo = event(
        "bob-tokyo",
        last_bob + 30 * 60_000,
        "bob@corp.example",
        "view",
        "10.4.0.9",
    );
    env.ingest(&agent.credential, &burst).await;
    env.ingest(&agent.credential, std::slice::from_ref(&tokyo))
        .await;
    env.settled().await;

    // The API lists them, newest first, and filters.
    let r = env.curl("/api/v1/alerts", &["-H", &bearer]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let all = r.json()["alerts"].as_array().unwrap().clone();
    let mut kinds: Vec<(String, String)> = all
        .iter()
        .map(|a| {
            (
                a["user"].as_str().unwrap().to_owned(),
                a["detector"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            ("alice@corp.example", "mass_download"),
            ("bob@corp.example", "impossible_travel"),
            ("bob@corp.example", "new_country"),
            ("bob@corp.example", "new_network"),
        ]
        .map(|(u, d)| (u.to_owned(), d.to_owned()))
    );
    let r = env
        .curl(
            "/api/v1/alerts?detector=impossible_travel&severity=high&state=open&user=Bob@corp.example",
            &["-H", &bearer],
        )
        .await;
    let travel = r.json()["alerts"].as_array().unwrap().clone();
    assert_eq!(travel.len(), 1, "{}", r.text());
    assert!(
        travel[0]["title"].as_str().unwrap().contains("Tokyo, JP"),
        "{}",
        travel[0]
    );
    assert_eq!(
        env.curl("/api/v1/alerts?severity=huge", &["-H", &bearer])
            .await
            .status,
        400
    );
    assert_eq!(env.curl("/api/v1/alerts", &[]).await.status, 401);

    // One alert: its evidence is the burst, each event reachable by id and time.
    let md = all
        .iter()
        .find(|a| a["detector"] == "mass_download")
        .unwrap();
    let id = md["id"].as_str().unwrap().to_owned();
    let r = env
        .curl(&format!("/api/v1/alerts/{id}"), &["-H", &bearer])
        .await;
    assert_eq!(r.status, 200);
    let a = r.json();
    assert_eq!(
        (a["severity"].as_str(), a["count"].as_u64()),
        (Some("high"), Some(1))
    );
    let evidence = a["evidence"].as_array().unwrap();
    assert_eq!(evidence.len(), 50, "the window that tipped it");
    let ev = &evidence[0];
    let r = env
        .curl(
            &format!(
                "/api/v1/events/{}?time={}",
                ev["id"].as_str().unwrap(),
                ev["time"]
            ),
            &["-H", &bearer],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["actor"]["user"]["email_addr"],
        "alice@corp.example"
    );
    assert_eq!(
        env.curl("/api/v1/alerts/00000000000000000000", &["-H", &bearer])
            .await
            .status,
        404
    );

    // The detector raised Alice's risk, because of this alert.
    let risk = env.c.risk.state();
    let alice = risk
        .users
        .iter()
        .find(|u| u.user == "alice@corp.example")
        .unwrap();
    assert_eq!(alice.risk, "high");
    assert_eq!(alice.alert.as_deref(), Some(id.as_str()));

    // Another burst within the hour folds into the open alert.
    let again: Vec<Event> = (0..50)
        .map(|i| {
            event(
                &format!("dl2-{i:03}"),
                now + 10 * 60_000 + i * 1000,
                "alice@corp.example",
                "download",
                "10.1.3.5",
            )
        })
        .collect();
    env.ingest(&agent.credential, &again).await;
    env.settled().await;
    let r = env
        .curl("/api/v1/alerts?detector=mass_download", &["-H", &bearer])
        .await;
    let list = r.json()["alerts"].as_array().unwrap().clone();
    assert_eq!(list.len(), 1, "{}", r.text());
    assert_eq!(list[0]["count"], 2);

    // The portal: the list, the alert with its evidence linked, and the state forms.
    sluice_collector::portal::set_admin_password(&env.c, "admin", "correct horse battery").unwrap();
    let (session, s) =
        sluice_collector::portal::auth::create_session(&env.c.store, "admin").unwrap();
    let cookie = format!("cookie: __Host-sluice-session={session}");
    let r = env
        .curl(
            "/alerts?state=open&detector=mass_download",
            &["-H", &cookie],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let page = r.text();
    assert!(
        page.contains("href=\"/alerts\" aria-current=\"page\""),
        "nav"
    );
    assert!(page.contains(&format!("href=\"/alerts/{id}\"")), "{page}");
    assert!(!page.contains("impossible_travel</td>"), "filtered");
    let r = env.curl(&format!("/alerts/{id}"), &["-H", &cookie]).await;
    let page = r.text();
    assert_eq!(r.status, 200);
    assert!(page.contains("href=\"/events/dl-000\""), "evidence linked");
    assert!(page.contains("id=\"alert-acknowledged\"") && page.contains("id=\"alert-resolved\""));
    // A form without the session's token is refused.
    let r = env
        .curl(
            &format!("/alerts/{id}/state"),
            &["-H", &cookie, "--data", "state=acknowledged&csrf=forged"],
        )
        .await;
    assert_eq!(r.status, 403);
    let form = format!("state=acknowledged&csrf={}", s.csrf);
    let r = env
        .curl(
            &format!("/alerts/{id}/state"),
            &["-H", &cookie, "--data", &form],
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert!(
        r.headers
            .to_ascii_lowercase()
            .contains(&format!("location: /alerts/{id}"))
    );
    // The activity chart counts the alerts.
    let r = env.curl("/events", &["-H", &cookie]).await;
    assert!(r.text().contains("class=\"alert-mark\""), "{}", r.text());
    assert!(r.text().contains("alerts (4)"));

    // Resolving through the API lowers the risk it raised.
    let r = env
        .curl(
            &format!("/api/v1/alerts/{id}"),
            &[
                "-H",
                &bearer,
                "-H",
                "content-type: application/json",
                "--data",
                "{\"state\":\"resolved\"}",
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "resolved");
    assert_eq!(r.json()["state_by"], "token:soc");
    assert!(
        !env.c
            .risk
            .state()
            .users
            .iter()
            .any(|u| u.user == "alice@corp.example")
    );
    for (args, want) in [
        (
            vec!["-H", bearer.as_str(), "--data", "{\"state\":\"resolved\"}"],
            415,
        ),
        (
            vec![
                "-H",
                bearer.as_str(),
                "-H",
                "content-type: application/json",
                "--data",
                "{\"state\":\"gone\"}",
            ],
            400,
        ),
        (
            vec![
                "-H",
                "content-type: application/json",
                "--data",
                "{\"state\":\"resolved\"}",
            ],
            401,
        ),
    ] {
        let r = env.curl(&format!("/api/v1/alerts/{id}"), &args).await;
        assert_eq!(r.status, want, "{args:?}: {}", r.text());
    }

    // The activity log has each opening and change (app sluice, activity alert).
    let q = sluice_collector::query::parse("app:sluice activity:alert")
        .unwrap()
        .compile();
    let logged = env.c.store.count(&q).unwrap();
    assert_eq!(logged, 4 + 2, "four opened, one acknowledged, one resolved");

    // The webhook got alerts only: four openings and two changes.
    let t = Instant::now();
    loop {
        let got = hooked.lock().unwrap().clone();
        if got.len() >= 6 {
            assert!(got.iter().all(|v| v["type"] == "alert"), "{got:?}");
            let states: Vec<&str> = got
                .iter()
                .filter(|v| v["id"] == id.as_str())
                .map(|v| v["state"].as_str().unwrap())
                .collect();
            assert_eq!(states, ["open", "acknowledged", "resolved"]);
            assert_eq!(got.len(), 6, "{got:?}");
            println!(
                "alerts over the API: {} events ingested, 4 alerts, {} forwarded to the webhook",
                history.len() + burst.len() + again.len() + 1,
                got.len()
            );
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "webhook got {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
