//! `sluice-risk-bench`: adaptive access's loop, timed (`cargo xtask bench collector` runs it
//! after the store's figures).
//!
//! A real collector (TLS listener, detection on, the mass-download detector raising the user's
//! risk) with `--agents` enrolled agents, each holding a long poll on `GET /api/v1/risk` as the
//! agent does. Each round a new user's burst of downloads arrives as one batch
//! (`POST /api/v1/events`); the figure is the time from sending it to each agent's long poll
//! being answered with that user at high risk. An agent decides its next request on the marks
//! it holds (an atomic swap), so this is the time from the anomalous event's arrival to the
//! agents' new decision. Then the alert is resolved through the API (`POST /api/v1/alerts/<id>`)
//! and the time to every agent's marks without the user is measured the same way.
//!
//! The baseline, measured in the same run on the same collector, is the round trip of the same
//! batch for a user the detector does not fire for (ingestion alone).

use std::{
    collections::BTreeMap,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http_body_util::Full;
use serde_json::json;
use sluice_collector::{Collector, client, config::Config, server::Server, tls};
use sluice_protocol::{
    Actor, CLASS_FILE_HOSTING, Device, Event, File, Sluice, User, risk::RiskState,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Downloads in one burst (the detector's floor is set to this).
const BURST: u64 = 6;

fn opt(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn pct(sorted: &[f64], p: usize) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = (sorted.len() * p).div_ceil(100).saturating_sub(1);
    sorted[i.min(sorted.len() - 1)]
}

fn main() -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run()))
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-risk-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The collector's base URL and how to reach it.
#[derive(Clone)]
struct Target {
    base: String,
    tls: tokio_rustls::TlsConnector,
}

impl Target {
    async fn call(
        &self,
        method: http::Method,
        path: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> Result<client::Reply> {
        let uri: http::Uri = format!("{}{path}", self.base).parse()?;
        let mut b = client::request(method, &uri)?;
        for (k, v) in headers {
            b = b.header(*k, v.as_str());
        }
        let req = b.body(Full::new(Bytes::from(body)))?;
        Ok(client::send(&uri, Some(&self.tls), req, 16 << 20).await?)
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// One download by `user` on agent `agent`.
fn download(agent: &str, user: &str, n: u64) -> Result<String> {
    let mut e = Event::new(
        format!("{user}-{n}-{}", now_ms()),
        now_ms(),
        CLASS_FILE_HOSTING,
        2,
        "Download",
        Device {
            uid: agent.to_owned(),
            hostname: "bench".into(),
            ..Device::default()
        },
    );
    e.actor = Actor {
        user: Some(User {
            email_addr: user.to_owned(),
            ..User::default()
        }),
        process: None,
    };
    e.files.push(File {
        name: Some(format!("plan-{n}.docx")),
        size: 40_000,
        ..File::default()
    });
    e.sluice = Some(Sluice {
        app: "files".into(),
        activity: "download".into(),
        action: "allow".into(),
        ..Sluice::default()
    });
    Ok(serde_json::to_string(&e)?)
}

async fn post_batch(t: &Target, credential: &str, lines: &[String]) -> Result<Duration> {
    let body = lines.join("\n").into_bytes();
    let start = Instant::now();
    let r = t
        .call(
            http::Method::POST,
            "/api/v1/events",
            &[
                ("authorization", format!("Bearer {credential}")),
                ("content-type", "application/x-ndjson".into()),
            ],
            body,
        )
        .await?;
    if r.status != http::StatusCode::OK {
        bail!("ingest answered {}", r.status);
    }
    Ok(start.elapsed())
}

/// One agent's long poll, forever: every answered state goes to `tx` with its arrival time.
async fn poller(
    t: Target,
    idx: usize,
    credential: String,
    tx: mpsc::UnboundedSender<(usize, Instant, RiskState)>,
    shutdown: CancellationToken,
) {
    let mut etag = String::from("\"none\"");
    loop {
        let headers = [
            ("authorization", format!("Bearer {credential}")),
            ("if-none-match", etag.clone()),
            ("prefer", "wait=25".into()),
        ];
        let call = t.call(http::Method::GET, "/api/v1/risk", &headers, Vec::new());
        let r = tokio::select! {
            () = shutdown.cancelled() => return,
            r = call => r,
        };
        match r {
            Ok(r) if r.status == http::StatusCode::OK => {
                let at = Instant::now();
                if let Some(v) = r
                    .headers
                    .get(http::header::ETAG)
                    .and_then(|v| v.to_str().ok())
                {
                    v.clone_into(&mut etag);
                }
                if let Ok(s) = serde_json::from_slice::<RiskState>(&r.body)
                    && tx.send((idx, at, s)).is_err()
                {
                    return;
                }
            }
            Ok(_) => {}
            // The collector going away as the bench ends is not an error.
            Err(_) if shutdown.is_cancelled() => return,
            Err(e) => {
                eprintln!("agent {idx}: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Waits until every agent has reported a state for which `done` holds; each one's delay
/// after `since`.
async fn all_see(
    rx: &mut mpsc::UnboundedReceiver<(usize, Instant, RiskState)>,
    agents: usize,
    since: Instant,
    done: impl Fn(&RiskState) -> bool,
) -> Result<Vec<f64>> {
    let mut seen: BTreeMap<usize, f64> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < agents {
        let Ok(Some((i, at, s))) = tokio::time::timeout_at(deadline, rx.recv()).await else {
            bail!(
                "only {} of {agents} agents saw the change within 30 s",
                seen.len()
            );
        };
        if done(&s) {
            seen.entry(i)
                .or_insert_with(|| at.saturating_duration_since(since).as_secs_f64() * 1e3);
        }
    }
    Ok(seen.into_values().collect())
}

async fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let agents: usize = opt(&args, "--agents").map_or(Ok(20), |v| v.parse())?;
    let rounds: usize = opt(&args, "--rounds").map_or(Ok(40), |v| v.parse())?;
    let out = opt(&args, "--out").unwrap_or_else(|| "target/bench/collector-loop.json".into());
    let dir = std::path::PathBuf::from(
        opt(&args, "--dir").unwrap_or_else(|| "target/bench/collector-loop".into()),
    );
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;

    let mut config = Config::with_state_dir(dir.join("state"));
    config.listen = "127.0.0.1:0".parse()?;
    let md = &mut config.detection.mass_download;
    md.floor = Some(BURST);
    md.window_s = Some(300);
    md.raise_risk = Some(toml::from_str("level = \"high\"\nfor_s = 3600")?);
    let c = Arc::new(Collector::open(config)?);
    let server = Server::bind(c.clone()).await?;
    let addr = server.local_addr()?;
    let shutdown = CancellationToken::new();
    tokio::spawn(server.run(shutdown.clone()));
    let ca = dir.join("state/tls/ca.pem");
    let tls = tokio_rustls::TlsConnector::from(
        tls::client_config(Some(&ca)).context("trusting the collector's CA")?,
    );
    let t = Target {
        base: format!("https://localhost:{}", addr.port()),
        tls,
    };
    let mut creds = Vec::new();
    for i in 0..agents {
        let token = c.store.create_enroll_token("default", 3_600_000)?;
        let e = c
            .store
            .enroll(&token, &format!("bench-{i}"), "0.1.0", 86_400_000)?;
        creds.push((e.agent_id, e.credential));
    }
    let api = c.store.create_api_token("bench")?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    for (i, (_, cred)) in creds.iter().enumerate() {
        tokio::spawn(poller(
            t.clone(),
            i,
            cred.clone(),
            tx.clone(),
            shutdown.clone(),
        ));
    }
    // Every agent holds the current (empty) state before the first round.
    all_see(&mut rx, agents, Instant::now(), |_| true).await?;

    let (agent, cred) = creds[0].clone();
    let mut raise = Vec::new();
    let mut lower = Vec::new();
    let mut baseline = Vec::new();
    for r in 0..rounds {
        // Baseline: the same batch size below the floor (nothing fires).
        let quiet = format!("quiet{r}@corp.example");
        let lines: Vec<String> = (0..BURST - 1)
            .map(|n| download(&agent, &quiet, n))
            .collect::<Result<_>>()?;
        baseline.push(post_batch(&t, &cred, &lines).await?.as_secs_f64() * 1e3);

        let user = format!("loop{r}@corp.example");
        let lines: Vec<String> = (0..BURST)
            .map(|n| download(&agent, &user, n))
            .collect::<Result<_>>()?;
        let sent = Instant::now();
        post_batch(&t, &cred, &lines).await?;
        let u = user.clone();
        raise.extend(
            all_see(&mut rx, agents, sent, move |s| {
                s.users.iter().any(|m| m.user == u && m.risk == "high")
            })
            .await?,
        );
        // Resolve the alert that raised it.
        let q = format!("/api/v1/alerts?user={}", user.replace('@', "%40"));
        let list = t
            .call(
                http::Method::GET,
                &q,
                &[("authorization", format!("Bearer {api}"))],
                Vec::new(),
            )
            .await?;
        let v: serde_json::Value = serde_json::from_slice(&list.body)?;
        let id = v["alerts"][0]["id"]
            .as_str()
            .or_else(|| v[0]["id"].as_str())
            .with_context(|| format!("no alert for {user}: {v}"))?
            .to_owned();
        let sent = Instant::now();
        let r = t
            .call(
                http::Method::POST,
                &format!("/api/v1/alerts/{id}"),
                &[
                    ("authorization", format!("Bearer {api}")),
                    ("content-type", "application/json".into()),
                ],
                json!({"state": "resolved"}).to_string().into_bytes(),
            )
            .await?;
        if !r.status.is_success() {
            bail!("resolving {id}: {}", r.status);
        }
        let u = user.clone();
        lower.extend(
            all_see(&mut rx, agents, sent, move |s| {
                !s.users.iter().any(|m| m.user == u)
            })
            .await?,
        );
    }
    shutdown.cancel();
    for v in [&mut raise, &mut lower, &mut baseline] {
        v.sort_by(f64::total_cmp);
    }
    let b50 = pct(&baseline, 50);
    let row = |name: &str, v: &[f64]| {
        println!(
            "{name:<48} {:>9.1} {:>9.1} {:>9.1} {:>8.2}x",
            pct(v, 50),
            pct(v, 99),
            v.last().copied().unwrap_or(0.0),
            pct(v, 50) / b50.max(1e-9)
        );
    };
    println!(
        "\nadaptive access loop: {agents} agents long-polling, {rounds} rounds (ms; ratio of p50 to the baseline's)"
    );
    println!(
        "{:<48} {:>9} {:>9} {:>9} {:>9}",
        "", "p50", "p99", "max", "vs base"
    );
    row("baseline: ingest round trip, no alert", &baseline);
    row("anomalous batch sent -> every agent's decision", &raise);
    row("alert resolved -> every agent's decision", &lower);
    let figures = json!({
        "agents": agents,
        "rounds": rounds,
        "baseline_ingest_ms": { "p50": b50, "p99": pct(&baseline, 99) },
        "anomaly_to_decision_ms": { "p50": pct(&raise, 50), "p99": pct(&raise, 99), "max": raise.last() },
        "resolve_to_decision_ms": { "p50": pct(&lower, 50), "p99": pct(&lower, 99), "max": lower.last() },
    });
    if let Some(p) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(&out, serde_json::to_vec_pretty(&figures)?)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
