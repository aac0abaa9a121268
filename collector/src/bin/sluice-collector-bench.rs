//! `sluice-collector-bench`: the collector's store under load (`cargo xtask bench collector`).
//!
//! 1. Ingestion: 1,000,000 generated events, 1,000 per batch, through [`Store::ingest`] (JSON
//!    Lines parsing, validation, column derivation, one transaction per batch) into a fresh
//!    SQLite file. The baseline is the parsing alone, measured on the same batches, so the ratio
//!    shows what storing adds.
//! 2. Fill to 10,000,000 events (same function, 10,000 per batch), then 200 filtered queries
//!    (time range + user + action, first page of 100) with random users, actions and windows,
//!    timed end to end (parse, compile, search); p50 and p99. The baseline is the same windows
//!    with no user or action. Free-text queries over a one-hour window are timed too, since
//!    the store answers them with `LIKE` rather than an FTS index.
//!
//! 3. PostgreSQL (a cluster of the bench's own under `--dir`, Debian's server binaries,
//!    `shared_buffers` 1 GB): `--ingest` events through one collector (one store, batches of
//!    1,000) into a fresh database, then the same through two collectors at once (two stores with
//!    connections of their own, one thread each, batches dealt out in turn) into another, filled
//!    to `--total` by both, then the same queries as SQLite's and the database's size
//!    (`pg_database_size`). Ratios: one collector against SQLite's ingestion, two against one,
//!    queries and bytes per event against SQLite's. `--no-postgres` leaves it out.
//!
//! 4. Detection off and on: `--detect-events` (default 300,000) generated events, 1,000 per
//!    batch, ingested twice into fresh collectors (the server's path: [`Store::ingest`] collecting
//!    the new events, then handing them to detection's queue, whose thread runs the detectors and
//!    stores alerts), once with detection off and once on; the rate counts until detection has
//!    looked at every event. Then the same 200 filtered queries on each, p99. Off and on run
//!    interleaved twice, the better run of each counting. The ratio on/off is the price of
//!    detection (goal: at least 0.8x). The CPU time both take (every thread, less generating
//!    the batches) per 1,000 events is printed too: on a busy host it varies less than the rate.
//!
//! `--detection-only` runs part 3 alone (no 10M fill; for iterating on detection's cost); it
//! prints and writes the detection figures only.
//!
//! Prints a table and writes every figure to `--out` (default `target/bench/collector.json`).
//! The database lives under `--dir` (default `target/bench/collector-db`) and is removed at the
//! end unless `--keep`.

use std::{path::PathBuf, process::ExitCode, time::Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::json;
use sluice_collector::{
    Collector,
    config::Config,
    query,
    store::{IngestOptions, Store},
};
use sluice_protocol::{
    Actor, CLASS_FILE_HOSTING, CLASS_HTTP_ACTIVITY, Device, Endpoint, Event, File, HttpRequest,
    Process, Sluice, User,
};

/// A small, fast, deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const USERS: u64 = 2_000;
const DEVICES: u64 = 500;
const APPS: &[&str] = &[
    "files", "mail", "chat", "crm", "wiki", "drive", "hr", "finance", "code", "tickets",
];
const ACTIVITIES: &[&str] = &["view", "download", "upload", "share", "delete", "login"];
/// Weighted: mostly allowed.
const ACTIONS: &[&str] = &[
    "allow",
    "allow",
    "allow",
    "allow",
    "allow",
    "allow",
    "allow",
    "monitor",
    "monitor",
    "block",
    "protect",
    "apply-label",
];
/// Simulated history.
const SPAN_MS: i64 = 30 * 86_400_000;

fn user(i: u64) -> String {
    format!("user{i}@corp.example")
}

/// Event `n` of `total`, times spread evenly over the span ending at `end`.
fn event(rng: &mut Rng, n: u64, total: u64, end: i64) -> Event {
    let t = end - SPAN_MS + (n as i64 * SPAN_MS / total.max(1) as i64);
    // A batch comes from one agent, so one device and the few users of that device.
    let d = n / 1000 % DEVICES;
    let u = (d * 4 + rng.below(4)) % USERS;
    let app = APPS[rng.below(APPS.len() as u64) as usize];
    let activity = ACTIVITIES[rng.below(ACTIVITIES.len() as u64) as usize];
    let action = ACTIONS[rng.below(ACTIONS.len() as u64) as usize];
    let file = matches!(activity, "download" | "upload" | "share");
    let class = if file {
        CLASS_FILE_HOSTING
    } else {
        CLASS_HTTP_ACTIVITY
    };
    let mut e = Event::new(
        format!("{:016x}{:016x}", rng.next(), n),
        t as u64,
        class,
        if file { 2 } else { 3 },
        activity,
        Device {
            uid: format!("ag_{d:06}"),
            hostname: format!("host{d}"),
            posture: "managed".into(),
            os: "Linux 6.18.0".into(),
            agent_version: "0.1.0".into(),
            bundle_revision: Some("r42".into()),
        },
    );
    e.message = format!("{activity} on {app}: {action}");
    e.actor = Actor {
        user: Some(User {
            email_addr: user(u),
            groups: vec![format!("team{}", u % 40)],
            guest: false,
        }),
        process: Some(Process {
            pid: 1000 + (n % 30000) as u32,
            name: "firefox".into(),
            path: Some("/usr/bin/firefox".into()),
            uid: 1000,
            user: None,
        }),
    };
    e.src_endpoint = Some(Endpoint {
        ip: Some(format!("10.0.{}.{}", d / 250, d % 250)),
        port: None,
        hostname: None,
        public_ip: None,
    });
    e.http_request = Some(HttpRequest {
        http_method: if activity == "upload" { "POST" } else { "GET" }.into(),
        url: format!("https://{app}.corp.example/api/{}", rng.below(100_000)),
        user_agent: None,
    });
    if file {
        e.files.push(File {
            name: Some(format!("report-{}.docx", rng.below(10_000))),
            size: rng.below(1 << 20),
            r#type: Some("docx".into()),
            ..File::default()
        });
    }
    e.sluice = Some(Sluice {
        app: app.into(),
        activity: activity.into(),
        action: action.into(),
        decided_by: "session".into(),
        policy: (action != "allow").then(|| format!("p-{app}-{action}")),
        incident: format!("{:08x}", rng.next() as u32),
        ..Sluice::default()
    });
    e
}

fn batch(rng: &mut Rng, from: u64, n: u64, total: u64, end: i64) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(n as usize * 700);
    for i in from..from + n {
        serde_json::to_writer(&mut out, &event(rng, i, total, end))?;
        out.push(b'\n');
    }
    Ok(out)
}

fn pct(sorted: &[f64], p: usize) -> f64 {
    sorted
        .get((sorted.len() * p / 100).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0)
}

fn opt(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

// SQLite, JSON parsing and the HTTP stack allocate many small buffers per event; mimalloc's
// thread-local free lists cost less than glibc malloc's (as in the agent).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-collector-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!(
            "usage: sluice-collector-bench [--out FILE] [--dir DIR] [--ingest N] [--total N] [--queries N] [--detect-events N] [--detection-only] [--no-postgres] [--keep]"
        );
        return Ok(());
    }
    let out = PathBuf::from(opt(&args, "--out").unwrap_or("target/bench/collector.json".into()));
    let dir = PathBuf::from(opt(&args, "--dir").unwrap_or("target/bench/collector-db".into()));
    let ingest_n: u64 = opt(&args, "--ingest").unwrap_or("1000000".into()).parse()?;
    let total: u64 = opt(&args, "--total").unwrap_or("10000000".into()).parse()?;
    let queries: usize = opt(&args, "--queries").unwrap_or("200".into()).parse()?;
    let detect_n: u64 = opt(&args, "--detect-events")
        .unwrap_or("300000".into())
        .parse()?;
    let keep = args.iter().any(|a| a == "--keep");
    if total < ingest_n {
        bail!("--total must be at least --ingest");
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    if args.iter().any(|a| a == "--detection-only") {
        let end = sluice_collector::store::now_ms();
        let (off, on) = detection_pairs(&dir, detect_n, total, end, queries)?;
        let detect_ratio = print_detection(detect_n, &off, &on);
        let doc = json!({
            "bench": "collector",
            "detection": detection_json(detect_n, &off, &on, detect_ratio),
        });
        if let Some(d) = out.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(&out, serde_json::to_string_pretty(&doc)?)?;
        if !keep {
            let _ = std::fs::remove_dir_all(&dir);
        }
        return Ok(());
    }
    let store = Store::open(&dir.join("bench.db"))?;
    let end = sluice_collector::store::now_ms();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);

    // 1. Ingestion, 1,000 per batch; the parse-only baseline on the same bytes.
    println!(
        "collector: ingestion of {ingest_n} events in batches of 1,000 into a fresh SQLite file"
    );
    let (mut t_ingest, mut t_parse, mut stored) = (0f64, 0f64, 0u64);
    let mut n = 0u64;
    while n < ingest_n {
        let k = 1000.min(ingest_n - n);
        let body = batch(&mut rng, n, k, total, end)?;
        let t = Instant::now();
        let mut parsed = 0usize;
        for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            parsed += usize::from(serde_json::from_slice::<Event>(line).is_ok());
        }
        std::hint::black_box(parsed);
        t_parse += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let o = store.ingest(&body, IngestOptions::default())?;
        t_ingest += t.elapsed().as_secs_f64();
        stored += o.accepted;
        n += k;
    }
    if stored != ingest_n {
        bail!("stored {stored} of {ingest_n}");
    }
    let ingest_rate = ingest_n as f64 / t_ingest;
    let parse_rate = ingest_n as f64 / t_parse;
    // Idempotence costs: the same last batch again is all duplicates.
    let again = batch(&mut Rng(0x9e37_79b9_7f4a_7c15), 0, 1000, total, end)?;
    let t = Instant::now();
    let dup = store.ingest(&again, IngestOptions::default())?;
    let dup_rate = 1000.0 / t.elapsed().as_secs_f64();
    if dup.duplicates != 1000 {
        bail!("expected 1000 duplicates, got {}", dup.duplicates);
    }

    // 2. Fill, then queries.
    let t_fill = Instant::now();
    while n < total {
        let k = 10_000.min(total - n);
        let body = batch(&mut rng, n, k, total, end)?;
        store.ingest(&body, IngestOptions::default())?;
        n += k;
        if n.is_multiple_of(1_000_000) {
            eprintln!("  filled {n} ({:.0} s)", t_fill.elapsed().as_secs_f64());
        }
    }
    let fill_s = t_fill.elapsed().as_secs_f64();
    eprintln!("  filled in {fill_s:.0} s; querying");
    let db_bytes = store.disk_bytes()?;

    let qf = query_figures(&store, queries, end)?;
    let (p50, p99, b50, b99, x50, x99, rows) =
        (qf.p50, qf.p99, qf.b50, qf.b99, qf.x50, qf.x99, qf.rows);

    // 3. The shared store: PostgreSQL with one collector, then two.
    let pg = if args.iter().any(|a| a == "--no-postgres") {
        None
    } else {
        Some(postgres_stores(&dir, ingest_n, total, queries, end)?)
    };

    // 4. Detection off and on.
    let (off, on) = detection_pairs(&dir, detect_n, total, end, queries)?;

    println!("{:<44} {:>14} {:>12}", "figure", "value", "vs baseline");
    println!(
        "{:<44} {:>14.0} {:>12}",
        "parse only (baseline), events/s", parse_rate, "1.00x"
    );
    println!(
        "{:<44} {:>14.0} {:>11.2}x",
        "ingest 1M, 1,000/batch, events/s",
        ingest_rate,
        ingest_rate / parse_rate
    );
    println!(
        "{:<44} {:>14.0} {:>11.2}x",
        "re-ingest (all duplicates), events/s",
        dup_rate,
        dup_rate / parse_rate
    );
    println!(
        "{:<44} {:>14.0} {:>12}",
        format!("fill to {total}, 10,000/batch, events/s"),
        (total - ingest_n) as f64 / fill_s,
        ""
    );
    println!(
        "{:<44} {:>14.1} {:>12}",
        "time range only (baseline) p50 ms", b50, "1.00x"
    );
    println!(
        "{:<44} {:>14.1} {:>12}",
        "time range only (baseline) p99 ms", b99, ""
    );
    println!(
        "{:<44} {:>14.1} {:>11.2}x",
        "time + user + action p50 ms",
        p50,
        p50 / b50.max(1e-9)
    );
    println!(
        "{:<44} {:>14.1} {:>11.2}x",
        "time + user + action p99 ms",
        p99,
        p99 / b99.max(1e-9)
    );
    println!(
        "{:<44} {:>14.1} {:>12}",
        "free text, 1 h window p50 ms", x50, ""
    );
    println!(
        "{:<44} {:>14.1} {:>12}",
        "free text, 1 h window p99 ms", x99, ""
    );
    if let Some(pg) = &pg {
        print_postgres(pg, ingest_rate, p99, x99, db_bytes, total);
    }
    let detect_ratio = print_detection(detect_n, &off, &on);
    println!(
        "sqlite database {:.1} GiB for {total} events ({:.0} bytes per event); {rows} rows returned by {queries} filtered queries",
        db_bytes as f64 / f64::from(1u32 << 30),
        db_bytes as f64 / total as f64
    );
    println!(
        "targets: ingest >= 50,000 events/s: {}; filtered p99 <= 200 ms: {}",
        if ingest_rate >= 50_000.0 {
            "met"
        } else {
            "NOT met"
        },
        if p99 <= 200.0 { "met" } else { "NOT met" }
    );
    let doc = json!({
        "bench": "collector",
        "ingest": { "events": ingest_n, "batch": 1000, "events_per_s": ingest_rate,
            "parse_only_events_per_s": parse_rate, "duplicates_events_per_s": dup_rate },
        "fill": { "events": total, "batch": 10_000, "events_per_s": (total - ingest_n) as f64 / fill_s,
            "seconds": fill_s, "db_bytes": db_bytes },
        "query": { "queries": queries, "limit": 100, "p50_ms": p50, "p99_ms": p99,
            "baseline_time_only_p50_ms": b50, "baseline_time_only_p99_ms": b99,
            "free_text_1h_p50_ms": x50, "free_text_1h_p99_ms": x99, "rows": rows },
        "detection": detection_json(detect_n, &off, &on, detect_ratio),
        "postgres": pg.as_ref().map(PgFigures::json),
        "targets": { "ingest_events_per_s": 50_000, "query_p99_ms": 200,
            "two_collectors_vs_one": 1.8, "free_text_p99_ms": 200, "bytes_per_event": 400 },
    });
    if let Some(d) = out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&doc)?)?;
    drop(store);
    if !keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// Query latencies over a filled store.
struct QueryFigures {
    p50: f64,
    p99: f64,
    b50: f64,
    b99: f64,
    x50: f64,
    x99: f64,
    rows: usize,
}

/// `queries` filtered queries (time range + user + action, first page of 100) with the same
/// windows without user and action as the baseline, then 20 free-text queries over an hour.
fn query_figures(store: &Store, queries: usize, end: i64) -> Result<QueryFigures> {
    let mut qrng = Rng(0x51ce_c011_ec70_0001);
    let (mut filtered, mut base, mut rows) = (Vec::new(), Vec::new(), 0usize);
    for _ in 0..queries {
        let window = 3_600_000 * (1 + qrng.below(7 * 24)) as i64; // 1 h to 7 d
        let before = end - qrng.below((SPAN_MS - window) as u64) as i64;
        let after = before - window;
        let u = user(qrng.below(USERS));
        let action = ACTIONS[qrng.below(ACTIONS.len() as u64) as usize];
        let text = format!("user:{u} action:{action} after:{after} before:{before}");
        let t = Instant::now();
        let q = query::parse(&text)?.compile();
        let page = store.search(&q, 100, None)?;
        filtered.push(t.elapsed().as_secs_f64() * 1000.0);
        rows += page.events.len();
        let t = Instant::now();
        let q = query::parse(&format!("after:{after} before:{before}"))?.compile();
        let page = store.search(&q, 100, None)?;
        base.push(t.elapsed().as_secs_f64() * 1000.0);
        std::hint::black_box(page.events.len());
    }
    let mut text_times = Vec::new();
    for _ in 0..20 {
        let before = end - qrng.below((SPAN_MS - 3_600_000) as u64) as i64;
        let word = format!("report-{}", qrng.below(10_000));
        let t = Instant::now();
        let q = query::parse(&format!(
            "{word} after:{} before:{before}",
            before - 3_600_000
        ))?
        .compile();
        std::hint::black_box(store.search(&q, 100, None)?.events.len());
        text_times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    for v in [&mut filtered, &mut base, &mut text_times] {
        v.sort_by(f64::total_cmp);
    }
    Ok(QueryFigures {
        p50: pct(&filtered, 50),
        p99: pct(&filtered, 99),
        b50: pct(&base, 50),
        b99: pct(&base, 99),
        x50: pct(&text_times, 50),
        x99: pct(&text_times, 99),
        rows,
    })
}

/// Agents sending to one collector at once in the PostgreSQL part (a collector serves its agents
/// concurrently, each request on a connection of the pool).
const AGENTS_PER_COLLECTOR: usize = 2;

/// What PostgreSQL measured.
struct PgFigures {
    one: f64,
    two: f64,
    /// Every core's busy share while one collector, then two, ingested (percent).
    one_busy: f64,
    two_busy: f64,
    fill: f64,
    queries: QueryFigures,
    bytes: u64,
    total: u64,
    cpus: usize,
}

impl PgFigures {
    fn json(&self) -> serde_json::Value {
        let q = &self.queries;
        json!({
            "ingest_one_collector_events_per_s": self.one,
            "ingest_two_collectors_events_per_s": self.two,
            "cpu_busy_one_collector_percent": self.one_busy,
            "cpu_busy_two_collectors_percent": self.two_busy,
            "agents_per_collector": AGENTS_PER_COLLECTOR,
            "fill_two_collectors_events_per_s": self.fill,
            "query": { "p50_ms": q.p50, "p99_ms": q.p99, "baseline_time_only_p50_ms": q.b50,
                "baseline_time_only_p99_ms": q.b99, "free_text_1h_p50_ms": q.x50,
                "free_text_1h_p99_ms": q.x99, "rows": q.rows },
            "db_bytes": self.bytes, "events": self.total,
            "bytes_per_event": self.bytes as f64 / self.total.max(1) as f64,
            "cpus": self.cpus,
        })
    }
}

/// The CPU time all cores spent busy and in total since boot (`/proc/stat`), in ticks.
fn cpu_ticks() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// The share of every core's time spent busy since `before` ([`cpu_ticks`]), in percent.
fn busy_since(before: (u64, u64)) -> f64 {
    let now = cpu_ticks();
    100.0 * (now.0 - before.0) as f64 / (now.1 - before.1).max(1) as f64
}

/// Ingests `n` events from `from` into `stores`, each store (a collector) taking batches from
/// `agents` threads at once (a collector serves its agents concurrently): batches of
/// `per_batch`, dealt out in turn; events/s.
fn ingest_with(
    stores: &[Store],
    agents: usize,
    from: u64,
    n: u64,
    per_batch: u64,
    total: u64,
    end: i64,
) -> Result<f64> {
    let t = Instant::now();
    let lanes = (stores.len() * agents) as u64;
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..lanes)
            .map(|k| {
                let store = &stores[k as usize % stores.len()];
                s.spawn(move || -> Result<u64> {
                    let mut stored = 0u64;
                    let mut i = from + k * per_batch;
                    while i < from + n {
                        let count = per_batch.min(from + n - i);
                        // Each batch its own generator: the same events whoever stores them.
                        let body = batch(&mut Rng(0x9e37_79b9 ^ i), i, count, total, end)?;
                        stored += store.ingest(&body, IngestOptions::default())?.accepted;
                        i += per_batch * lanes;
                    }
                    Ok(stored)
                })
            })
            .collect();
        let mut stored = 0;
        for w in workers {
            stored += w
                .join()
                .map_err(|_| anyhow::anyhow!("an ingesting thread panicked"))??;
        }
        if stored != n {
            bail!("stored {stored} of {n}");
        }
        Ok(())
    })?;
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// PostgreSQL (a cluster of the bench's own, Debian's binaries): `ingest_n` events through one
/// collector into a fresh database, then through two (two stores with their own connections,
/// ingesting at once) into another, filled to `total`, then the same queries as SQLite's and the
/// database's size.
fn postgres_stores(
    dir: &std::path::Path,
    ingest_n: u64,
    total: u64,
    queries: usize,
    end: i64,
) -> Result<PgFigures> {
    use sluice_collector::store::cluster::LocalCluster;
    let cluster = LocalCluster::start(
        &dir.join("pg"),
        5432,
        &[
            ("shared_buffers", "1GB"),
            ("max_wal_size", "8GB"),
            ("checkpoint_timeout", "15min"),
        ],
    )?;
    for db in ["one", "two"] {
        cluster.create_database(db)?;
    }
    let open = |db: &str| Store::open_postgres(&cluster.conninfo(db), 4, 3650, &[]);
    println!(
        "collector: PostgreSQL, ingestion of {ingest_n} events in batches of 1,000: one collector, {AGENTS_PER_COLLECTOR} agents sending at once"
    );
    let cpu = cpu_ticks();
    let one = ingest_with(
        &[open("one")?],
        AGENTS_PER_COLLECTOR,
        0,
        ingest_n,
        1000,
        total,
        end,
    )?;
    let one_busy = busy_since(cpu);
    println!("collector: PostgreSQL, the same through two collectors at once");
    let two_stores = [open("two")?, open("two")?];
    let cpu = cpu_ticks();
    let two = ingest_with(
        &two_stores,
        AGENTS_PER_COLLECTOR,
        0,
        ingest_n,
        1000,
        total,
        end,
    )?;
    let two_busy = busy_since(cpu);
    let t_fill = Instant::now();
    let mut n = ingest_n;
    while n < total {
        let k = 1_000_000.min(total - n);
        ingest_with(&two_stores, AGENTS_PER_COLLECTOR, n, k, 10_000, total, end)?;
        n += k;
        eprintln!(
            "  postgresql filled {n} ({:.0} s)",
            t_fill.elapsed().as_secs_f64()
        );
    }
    let fill = (total - ingest_n) as f64 / t_fill.elapsed().as_secs_f64().max(1e-9);
    two_stores[0].with_read(|c| c.execute("VACUUM ANALYZE events", sluice_collector::args![]))?;
    let queries = query_figures(&two_stores[0], queries, end)?;
    let bytes = two_stores[0].disk_bytes()?;
    Ok(PgFigures {
        one,
        two,
        one_busy,
        two_busy,
        fill,
        queries,
        bytes,
        total,
        cpus: std::thread::available_parallelism().map_or(1, usize::from),
    })
}

fn print_postgres(
    pg: &PgFigures,
    sqlite_rate: f64,
    sqlite_p99: f64,
    sqlite_x99: f64,
    sqlite_bytes: u64,
    total: u64,
) {
    let q = &pg.queries;
    println!(
        "{:<44} {:>14.0} {:>11.2}x",
        "postgresql, one collector: ingest events/s",
        pg.one,
        pg.one / sqlite_rate.max(1e-9)
    );
    println!(
        "{:<44} {:>14.0} {:>11.2}x",
        "postgresql, two collectors: ingest events/s",
        pg.two,
        pg.two / pg.one.max(1e-9)
    );
    println!(
        "{:<44} {:>14.0} {:>12}",
        format!("postgresql, two: fill to {total}, events/s"),
        pg.fill,
        ""
    );
    println!(
        "{:<44} {:>14.1} {:>11.2}x",
        "postgresql: time + user + action p99 ms",
        q.p99,
        q.p99 / sqlite_p99.max(1e-9)
    );
    println!(
        "{:<44} {:>14.1} {:>12}",
        "postgresql: time range only p99 ms", q.b99, ""
    );
    println!(
        "{:<44} {:>14.1} {:>11.2}x",
        "postgresql: free text, 1 h window p99 ms",
        q.x99,
        q.x99 / sqlite_x99.max(1e-9)
    );
    println!(
        "{:<44} {:>14.0} {:>11.2}x",
        "postgresql: bytes per event",
        pg.bytes as f64 / total as f64,
        pg.bytes as f64 / sqlite_bytes.max(1) as f64
    );
    println!(
        "(ratios: one collector vs SQLite's ingestion, two collectors vs one, queries and size vs SQLite's; {} CPUs shared by the collectors and the server, busy {:.0}% with one collector, {:.0}% with two)",
        pg.cpus, pg.one_busy, pg.two_busy
    );
}

/// Detection off and on, interleaved twice (the first run of a process warms caches and the
/// allocator: a single off-then-on pair flattered whichever ran second); the better run of each
/// counts.
fn detection_pairs(
    dir: &std::path::Path,
    n: u64,
    total: u64,
    end: i64,
    queries: usize,
) -> Result<(DetectRun, DetectRun)> {
    let mut off = detection_run(dir, false, n, total, end, queries, 0)?;
    let mut on = detection_run(dir, true, n, total, end, queries, 0)?;
    off = off.best(detection_run(dir, false, n, total, end, queries, 1)?);
    on = on.best(detection_run(dir, true, n, total, end, queries, 1)?);
    Ok((off, on))
}

/// Prints the detection rows of the table; returns the ratio on/off.
fn print_detection(detect_n: u64, off: &DetectRun, on: &DetectRun) -> f64 {
    let detect_ratio = on.rate / off.rate.max(1e-9);
    println!(
        "{:<44} {:>14.0} {:>12}",
        format!("detection off (baseline): ingest {detect_n}, events/s"),
        off.rate,
        "1.00x"
    );
    println!(
        "{:<44} {:>14.0} {:>11.2}x",
        "detection on: ingest + detect, events/s", on.rate, detect_ratio
    );
    println!(
        "{:<44} {:>14.1} {:>12}",
        "detection off: filtered query p99 ms", off.p99, "1.00x"
    );
    println!(
        "{:<44} {:>14.1} {:>11.2}x",
        "detection on: filtered query p99 ms",
        on.p99,
        on.p99 / off.p99.max(1e-9)
    );
    println!(
        "{:<44} {:>14.1} {:>12}",
        "detection off: CPU ms per 1,000 events", off.cpu_ms_per_1k, "1.00x"
    );
    println!(
        "{:<44} {:>14.1} {:>11.2}x",
        "detection on: CPU ms per 1,000 events",
        on.cpu_ms_per_1k,
        on.cpu_ms_per_1k / off.cpu_ms_per_1k.max(1e-9)
    );
    println!(
        "detection on: {} alerts opened, {} repeats, {} events dropped from its queue; goal on/off >= 0.80x: {}",
        on.alerts,
        on.repeats,
        on.dropped,
        if detect_ratio >= 0.8 {
            "met"
        } else {
            "NOT met"
        }
    );
    detect_ratio
}

fn detection_json(
    detect_n: u64,
    off: &DetectRun,
    on: &DetectRun,
    detect_ratio: f64,
) -> serde_json::Value {
    json!({ "events": detect_n, "batch": 1000,
        "off": { "events_per_s": off.rate, "query_p99_ms": off.p99, "query_p50_ms": off.p50,
            "cpu_ms_per_1k_events": off.cpu_ms_per_1k },
        "on": { "events_per_s": on.rate, "query_p99_ms": on.p99, "query_p50_ms": on.p50,
            "cpu_ms_per_1k_events": on.cpu_ms_per_1k,
            "alerts": on.alerts, "repeats": on.repeats, "dropped": on.dropped },
        "ratio_on_off": detect_ratio, "goal_ratio": 0.8 })
}

/// This thread's CPU time so far (Linux: `schedstat`, in ns), or 0 when unknown.
fn thread_cpu_s() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0.0, |ns| ns as f64 / 1e9)
}

/// The process's CPU time so far (user + system, every thread, those ended too; Linux, in
/// USER_HZ ticks of 10 ms), or 0 when unknown.
fn cpu_s() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // After the command name (in parentheses): state is field 3, utime 14, stime 15.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            Some(ticks as f64 / 100.0)
        })
        .unwrap_or(0.0)
}

/// The figures of one detection run.
struct DetectRun {
    rate: f64,
    /// CPU seconds (all threads) per 1,000 events ingested (and looked at), less noisy than the
    /// rate on a busy host.
    cpu_ms_per_1k: f64,
    p50: f64,
    p99: f64,
    alerts: u64,
    repeats: u64,
    dropped: u64,
}

impl DetectRun {
    /// The faster ingestion and the lower p99 of two runs.
    fn best(self, other: DetectRun) -> DetectRun {
        DetectRun {
            rate: self.rate.max(other.rate),
            cpu_ms_per_1k: self.cpu_ms_per_1k.min(other.cpu_ms_per_1k),
            p50: self.p50.min(other.p50),
            p99: self.p99.min(other.p99),
            alerts: self.alerts.max(other.alerts),
            repeats: self.repeats.max(other.repeats),
            dropped: self.dropped.max(other.dropped),
        }
    }
}

/// Ingests `n` events into a fresh collector with detection `on` or off as the server does
/// (collect the new events, hand them to detection), waits for detection to finish, then times
/// `queries` filtered queries.
fn detection_run(
    dir: &std::path::Path,
    on: bool,
    n: u64,
    total: u64,
    end: i64,
    queries: usize,
    rep: u32,
) -> Result<DetectRun> {
    let state = dir.join(format!("detect-{}-{rep}", if on { "on" } else { "off" }));
    let mut config = Config::with_state_dir(state);
    config.detection.enabled = on;
    // The generated history is not replayed: the store starts empty.
    config.detection.rebuild_max_events = 0;
    let c = std::sync::Arc::new(Collector::open(config)?);
    let shutdown = tokio_util::sync::CancellationToken::new();
    c.detect.start(c.clone(), shutdown.clone());
    // Handing events over may wait for room in the queue, as the server's ingestion does.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    eprintln!(
        "  detection {}: ingesting {n} events",
        if on { "on" } else { "off" }
    );
    let mut rng = Rng(0xdead_beef_0000_0001);
    let mut elapsed = 0f64;
    // CPU time of the whole process, less generating the batches.
    let cpu0 = cpu_s();
    let mut generating = 0f64;
    let mut i = 0u64;
    while i < n {
        let k = 1000.min(n - i);
        let g = thread_cpu_s();
        let body = batch(&mut rng, i, k, total, end)?;
        generating += thread_cpu_s() - g;
        let t = Instant::now();
        let o = c.store.ingest(
            &body,
            IngestOptions {
                collect_parsed: c.detect.enabled(),
                ..IngestOptions::default()
            },
        )?;
        rt.block_on(c.detect.push(o.new_parsed));
        elapsed += t.elapsed().as_secs_f64();
        i += k;
    }
    let t = Instant::now();
    while on && !c.detect.idle() {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    elapsed += t.elapsed().as_secs_f64();
    let cpu = (cpu_s() - cpu0 - generating).max(0.0);
    let report = c.detect.report();
    let mut qrng = Rng(0x51ce_c011_ec70_0002);
    let mut times = Vec::new();
    for _ in 0..queries {
        let window = 3_600_000 * (1 + qrng.below(7 * 24)) as i64;
        let before = end - qrng.below((SPAN_MS - window) as u64) as i64;
        let u = user(qrng.below(USERS));
        let action = ACTIONS[qrng.below(ACTIONS.len() as u64) as usize];
        let text = format!(
            "user:{u} action:{action} after:{} before:{before}",
            before - window
        );
        let t = Instant::now();
        let q = query::parse(&text)?.compile();
        std::hint::black_box(c.store.search(&q, 100, None)?.events.len());
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    shutdown.cancel();
    // The detection thread holds the collector until it sees the shutdown; wait for it, so
    // closing this store (a WAL checkpoint) happens here and not during the next run.
    let t = Instant::now();
    while std::sync::Arc::strong_count(&c) > 1 && t.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    drop(c);
    Ok(DetectRun {
        rate: n as f64 / elapsed,
        cpu_ms_per_1k: cpu * 1e6 / n.max(1) as f64,
        p50: pct(&times, 50),
        p99: pct(&times, 99),
        alerts: report.alerts,
        repeats: report.repeats,
        dropped: report.dropped,
    })
}
