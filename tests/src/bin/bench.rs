//! `sluice-bench`: benchmarks run by `cargo xtask bench NAME`. Each prints a table of ratios
//! against a baseline measured in the same run and writes every named figure to a JSON file.
//!
//! `steer`: the cost of `connect()` + `close()` on loopback for a client inside a cgroup, with no
//! programs attached (baseline), with Sluice's programs attached and a destination outside the
//! steering set, and with the destination steered to a listener that claims each origin record.
//! Rounds alternate the three modes so drift on the machine affects them alike; medians are kept.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    process::{ExitCode, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Instant,
};

use anyhow::{Context as _, Result, anyhow, bail};
use sluice::{
    config::{PortSpec, SteerRule, SteerSettings},
    steer::Steering,
};
use sluice_e2e::{InCgroup, TestCgroup, dual_stack_listeners};

mod bench_gateway;
mod bench_icap;
mod bench_inspect;
mod bench_policy;
mod bench_proxy;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("steer") => steer(&args),
        Some("steer-client") => steer_client(&args),
        Some("proxy") => bench_proxy::run(&args),
        Some("gateway") => bench_gateway::run(&args),
        Some("loadgen") => bench_proxy::loadgen(&args),
        Some("policy") => bench_policy::run(&args),
        Some("inspect") => bench_inspect::run(&args),
        Some("icap") => bench_icap::run(&args),
        _ => Err(anyhow!(
            "usage: sluice-bench steer [--out FILE] [--scale N] | proxy [--out FILE] [--reps N] [--secs S] | policy | inspect [--out FILE] [--reps N] | icap [--out FILE] [--rounds N]"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn opt<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// Runs in the cgroup: N sequential connect+close to ADDR; prints total nanoseconds.
fn steer_client(args: &[String]) -> Result<()> {
    let addr: SocketAddr = args.get(1).context("addr")?.parse()?;
    let n: u32 = args.get(2).context("count")?.parse()?;
    let start = Instant::now();
    for _ in 0..n {
        let s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
        // RST on close: no TIME_WAIT, so tens of thousands of runs do not exhaust ports.
        nix::sys::socket::setsockopt(
            &s,
            nix::sys::socket::sockopt::Linger,
            &libc::linger {
                l_onoff: 1,
                l_linger: 0,
            },
        )?;
        drop(s);
    }
    println!("{}", start.elapsed().as_nanos());
    Ok(())
}

type Current = Arc<Mutex<Option<Arc<Steering>>>>;

/// Accepts and drops connections on two blocking threads until stopped, claiming each origin
/// record first when steering is current. A deep backlog and no polling keep the accept queue from
/// overflowing, which would show up as one-second SYN retransmits in the client's timings.
fn sink(listener: TcpListener, steering: Current, stop: Arc<AtomicBool>) -> Result<Sink> {
    nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::new(4096)?)?;
    let addr = listener.local_addr()?;
    let listener = Arc::new(listener);
    let threads = (0..2)
        .map(|_| {
            let (listener, steering, stop) = (listener.clone(), steering.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((s, peer)) = listener.accept() {
                        let current = steering.lock().ok().and_then(|g| g.clone());
                        if let Some(st) = current {
                            let _ = st.lookup(peer);
                        }
                        drop(s);
                    }
                }
            })
        })
        .collect();
    Ok(Sink { addr, threads })
}

struct Sink {
    addr: SocketAddr,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Sink {
    /// Call after setting the stop flag: wakes each blocked accept, then joins.
    fn join(self) {
        for _ in &self.threads {
            let _ = TcpStream::connect(self.addr);
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn run_client(cg: &TestCgroup, addr: SocketAddr, n: u32) -> Result<f64> {
    let me = std::env::current_exe()?;
    let out = InCgroup::at(&cg.dir)
        .command(
            &me,
            &["steer-client".into(), addr.to_string(), n.to_string()],
        )
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("client failed: {}", out.status);
    }
    let total: f64 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    Ok(total / f64::from(n))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Single-address include prefixes loaded beside the bench's own two rules (the kernel's trie
/// holds `MAX_STEER_PREFIXES`, 4,096, per family).
const PREFIXES: u32 = 4_000;
/// App addresses held in the proxy's table during the run.
const APP_ADDRESSES: u32 = 10_000;

fn steer(args: &[String]) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the steer benchmark attaches eBPF programs: run it as root (cargo xtask bench steer)"
        );
    }
    let scale: u32 = opt(args, "--scale").unwrap_or("1").parse()?;
    let out = opt(args, "--out")
        .unwrap_or("target/bench/steer.json")
        .to_owned();
    let n = 4000 * scale.max(1);
    let rounds = 7;

    let cg = TestCgroup::new("bench");
    let stop = Arc::new(AtomicBool::new(false));
    // The not-steered destination.
    let plain = TcpListener::bind("127.0.0.1:0")?;
    let plain_addr = plain.local_addr()?;
    let current: Current = Arc::new(Mutex::new(None));
    let plain_sink = sink(plain, Arc::new(Mutex::new(None)), stop.clone())?;
    // The steered destination: nothing listens there; connects land on the proxy port.
    let steered_addr: SocketAddr = "127.0.0.11:9".parse()?;
    let (pv4, _pv6) = dual_stack_listeners()?;
    let proxy_port = pv4.local_addr()?.port();
    let settings = SteerSettings {
        cgroup: cg.rel.clone(),
        agent_cgroup: format!("{}/agent", cg.rel),
        heartbeat_bound_ms: 600_000,
        include: vec![
            SteerRule {
                cidr: "127.0.0.11/32".parse().map_err(|e: String| anyhow!(e))?,
                ports: vec![PortSpec::single(9)],
            },
            // A busy trie, as a real deployment has: the not-steered lookup walks it and misses.
            SteerRule {
                cidr: "10.0.0.0/8".parse().map_err(|e: String| anyhow!(e))?,
                ports: vec![PortSpec::single(443)],
            },
        ],
        ..SteerSettings::default()
    };
    // The include trie filled to near its capacity with single addresses (an app catalogue's
    // published ranges), so that the not-steered lookup walks a full trie.
    let mut settings = settings;
    for i in 0..PREFIXES {
        settings.include.push(SteerRule {
            cidr: format!("100.64.{}.{}/32", i / 256, i % 256)
                .parse()
                .map_err(|e: String| anyhow!(e))?,
            ports: vec![PortSpec::single(443)],
        });
    }
    // And 10,000 app addresses learned from DNS answers, held for the whole run: the table the
    // proxy keeps in user space (the connect hook never consults it, so its kernel cost is the
    // hooks' figures below; its user-space cost per lookup is measured apart).
    let apps = sluice::proxy::addresses::AppAddresses::default();
    for i in 0..APP_ADDRESSES {
        apps.learn(
            std::net::IpAddr::from((0x0a00_0000u32 + i).to_be_bytes()),
            "files",
        );
    }
    anyhow::ensure!(apps.len() == APP_ADDRESSES as usize, "app addresses loaded");

    // Warm-up (page cache, lazy binding, listener threads).
    run_client(&cg, plain_addr, n / 4)?;

    let mut base = Vec::new();
    let mut hooked = Vec::new();
    let mut steered = Vec::new();
    let proxy_sink = sink(pv4, current.clone(), stop.clone())?;
    for round in 0..rounds {
        base.push(run_client(&cg, plain_addr, n)?);
        let steering = Arc::new(Steering::attach(&settings, proxy_port)?);
        *current.lock().map_err(|_| anyhow!("poisoned"))? = Some(steering.clone());
        hooked.push(run_client(&cg, plain_addr, n)?);
        steered.push(run_client(&cg, steered_addr, n)?);
        let c = steering.counters();
        if c.steered < u64::from(n) {
            bail!(
                "round {round}: only {} of {n} connects were steered",
                c.steered
            );
        }
        *current.lock().map_err(|_| anyhow!("poisoned"))? = None;
        steering.detach()?;
    }
    // Where the not-steered connect's added cost goes: the hooks' own run time, from the
    // kernel's program statistics (on for this extra run only: they add to what they measure).
    let hooks = hook_times(&cg, &settings, proxy_port, plain_addr, n)?;
    stop.store(true, Ordering::Relaxed);
    plain_sink.join();
    proxy_sink.join();

    let (b, h, s) = (median(&mut base), median(&mut hooked), median(&mut steered));
    let (learn_new, learn_again, lookup) = address_costs(rounds);
    let parse = dns_parse_cost(rounds);
    let diag = diag_cost(rounds)?;
    println!(
        "steer: connect+close on loopback, client in a cgroup, {n} per run, median of {rounds} rounds; \
         {} include prefixes in the kernel, {} app addresses held",
        PREFIXES + 2,
        apps.len()
    );
    println!("{:<42} {:>12} {:>10}", "path", "ns/connect", "vs none");
    println!("{:<42} {:>12.0} {:>9.3}x", "no hooks (baseline)", b, 1.0);
    println!(
        "{:<42} {:>12.0} {:>9.3}x",
        "hooks attached, destination not steered",
        h,
        h / b
    );
    println!(
        "{:<42} {:>12.0} {:>9.3}x",
        "hooks attached, steered to a listener",
        s,
        s / b
    );
    println!(
        "app addresses (user space; the connect hook does not consult them, so its figures above \
         are their whole cost in the kernel):"
    );
    println!(
        "{:<42} {:>12.0} {:>9.4}x",
        "learn a new address (per DNS answer)",
        learn_new,
        learn_new / b
    );
    println!(
        "{:<42} {:>12.0} {:>9.4}x",
        "read a DNS answer (CNAME + A + AAAA)",
        parse,
        parse / b
    );
    println!(
        "{:<42} {:>12.0} {:>9.4}x",
        "learn a known address again",
        learn_again,
        learn_again / b
    );
    println!(
        "{:<42} {:>12.0} {:>9.4}x",
        "look up a connection's destination",
        lookup,
        lookup / b
    );
    println!("per steered connection, in the proxy:");
    println!(
        "{:<42} {:>12.0} {:>9.4}x",
        "find its record's key (sock_diag)",
        diag,
        diag / b
    );
    let in_hooks: f64 = hooks.iter().map(|h| h.ns_per_connect).sum();
    println!(
        "the hooks' own run time per not-steered connect (kernel program statistics): {in_hooks:.0} ns \
         ({:.3}x of a connect without hooks), of {:.0} ns measured above; the rest is the kernel \
         calling them",
        in_hooks / b,
        h - b
    );
    for hk in &hooks {
        println!(
            "  {:<20} {:>5.2} runs per connect, {:>5.0} ns per run, {:>5.0} ns per connect",
            hk.name, hk.runs_per_connect, hk.ns_per_run, hk.ns_per_connect
        );
    }
    let json = serde_json::json!({
        "hooks_ns_per_not_steered_connect": hooks.iter().map(|h| (h.name.clone(), serde_json::json!({
            "runs_per_connect": h.runs_per_connect,
            "ns_per_run": h.ns_per_run,
            "ns_per_connect": h.ns_per_connect,
        }))).collect::<serde_json::Map<_, _>>(),
        "bench": "steer",
        "app_addresses_ns": { "learn_new": learn_new, "learn_again": learn_again, "lookup": lookup, "dns_answer_read": parse },
        "record_key_sock_diag_ns": diag,
        "connects_per_run": n,
        "include_prefixes": PREFIXES + 2,
        "app_addresses": apps.len(),
        "rounds": rounds,
        "ns_per_connect": { "baseline_no_hooks": b, "hooked_not_steered": h, "hooked_steered": s },
        "ratio_vs_baseline": { "hooked_not_steered": h / b, "hooked_steered": s / b },
        "samples_ns": { "baseline_no_hooks": base, "hooked_not_steered": hooked, "hooked_steered": steered },
    });
    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&json)?)?;
    Ok(())
}

/// One program's share of a not-steered connect.
struct HookTime {
    name: String,
    runs_per_connect: f64,
    ns_per_run: f64,
    ns_per_connect: f64,
}

/// (run time in ns, runs) of every loaded program whose name starts `sluice_`, by program id
/// (`bpftool -j prog show`; statistics count while `kernel.bpf_stats_enabled` is 1).
fn program_stats() -> Result<std::collections::HashMap<u64, (String, u64, u64)>> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()?;
    anyhow::ensure!(out.status.success(), "bpftool prog show: {}", out.status);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let name = p["name"].as_str()?;
            name.starts_with("sluice_").then(|| {
                (
                    p["id"].as_u64().unwrap_or(0),
                    (
                        name.to_owned(),
                        p["run_time_ns"].as_u64().unwrap_or(0),
                        p["run_cnt"].as_u64().unwrap_or(0),
                    ),
                )
            })
        })
        .collect())
}

/// `n` connects to the not-steered `plain` with the hooks attached and the kernel's program
/// statistics on; each program's runs and run time per connect.
fn hook_times(
    cg: &TestCgroup,
    settings: &SteerSettings,
    proxy_port: u16,
    plain: SocketAddr,
    n: u32,
) -> Result<Vec<HookTime>> {
    const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
    let before = std::fs::read_to_string(STATS)?;
    std::fs::write(STATS, "1")?;
    let run = || -> Result<Vec<HookTime>> {
        let steering = Steering::attach(settings, proxy_port)?;
        let start = program_stats()?;
        let measured = run_client(cg, plain, n);
        let end = program_stats()?;
        steering.detach()?;
        measured?;
        let mut by_name: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
        for (id, (name, t, c)) in &end {
            let (t0, c0) = start.get(id).map(|(_, t, c)| (*t, *c)).unwrap_or((0, 0));
            let e = by_name.entry(name.clone()).or_default();
            e.0 += t.saturating_sub(t0);
            e.1 += c.saturating_sub(c0);
        }
        Ok(by_name
            .into_iter()
            .filter(|(_, (_, c))| *c > 0)
            .map(|(name, (t, c))| HookTime {
                name,
                runs_per_connect: c as f64 / f64::from(n),
                ns_per_run: t as f64 / c as f64,
                ns_per_connect: t as f64 / f64::from(n),
            })
            .collect())
    };
    let result = run();
    std::fs::write(STATS, before.trim())?;
    result
}

/// Nanoseconds per call of the app address table (full at 65,536 addresses): learning a new
/// address, learning a known one again, and looking up a destination (hits and misses), medians
/// of `rounds`.
fn address_costs(rounds: usize) -> (f64, f64, f64) {
    use sluice::proxy::addresses::{AppAddresses, MAX_ADDRESSES};
    use std::net::IpAddr;
    let ip = |i: u32| IpAddr::from((0x0a00_0000u32 + i).to_be_bytes());
    let n = MAX_ADDRESSES as u32;
    let (mut new, mut again, mut look) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let table = AppAddresses::default();
        let t = std::time::Instant::now();
        for i in 0..n - 1 {
            table.learn(ip(i), "files");
        }
        new.push(t.elapsed().as_nanos() as f64 / f64::from(n - 1));
        let t = std::time::Instant::now();
        for i in 0..n - 1 {
            table.learn(ip(i), "files");
        }
        again.push(t.elapsed().as_nanos() as f64 / f64::from(n - 1));
        let t = std::time::Instant::now();
        let mut hits = 0u32;
        for i in 0..2 * n {
            hits += u32::from(table.app_at(ip(i)).is_some());
        }
        look.push(t.elapsed().as_nanos() as f64 / f64::from(2 * n));
        assert_eq!(hits, n - 1, "lookups found what was learned");
    }
    (median(&mut new), median(&mut again), median(&mut look))
}

/// Nanoseconds for the proxy to find a steered connection's record key: the client socket's
/// cookie, one exact `sock_diag` lookup of the accepted connection's two ends (median of `rounds`
/// runs of 20,000 on one live loopback connection).
fn diag_cost(rounds: usize) -> Result<f64> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let server = listener.local_addr()?;
    let _client = std::net::TcpStream::connect(server)?;
    let (_accepted, peer) = listener.accept()?;
    let mut diag = sluice::steer::diag::Diag::new()?;
    let mut runs = Vec::new();
    for _ in 0..rounds {
        let t = std::time::Instant::now();
        for _ in 0..20_000 {
            anyhow::ensure!(
                diag.cookie(peer, server)?.is_some(),
                "the client's socket found"
            );
        }
        runs.push(t.elapsed().as_nanos() as f64 / 20_000.0);
    }
    Ok(median(&mut runs))
}

/// Nanoseconds to read one DNS answer (a CNAME, an A and an AAAA record) into names and
/// addresses, median of `rounds` runs of 20,000.
fn dns_parse_cost(rounds: usize) -> f64 {
    // files.example.com CNAME edge.cdn.test; edge.cdn.test A 192.0.2.7, AAAA 2001:db8::1.
    let mut msg: Vec<u8> = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 3, 0, 0, 0, 0];
    msg.extend_from_slice(b"\x05files\x07example\x03com\x00\x00\x01\x00\x01");
    msg.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 60, 0, 15]);
    msg.extend_from_slice(b"\x04edge\x03cdn\x04test\x00");
    let edge = 12 + 23 + 12;
    msg.extend_from_slice(&[
        0xc0, edge as u8, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 7,
    ]);
    msg.extend_from_slice(&[0xc0, edge as u8, 0, 28, 0, 1, 0, 0, 0, 60, 0, 16]);
    msg.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    let got = sluice_net::dns::answers(&msg).expect("the sample answer reads");
    assert_eq!(got.first().map(|(_, a)| a.len()), Some(2), "{got:?}");
    let n = 20_000u32;
    let mut runs = Vec::new();
    for _ in 0..rounds {
        let t = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(sluice_net::dns::answers(std::hint::black_box(&msg)).ok());
        }
        runs.push(t.elapsed().as_nanos() as f64 / f64::from(n));
    }
    median(&mut runs)
}
