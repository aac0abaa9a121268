//! `sluice-bench gateway`: a branch in three network namespaces (client -> gateway -> origin,
//! veth pairs), the client's traffic forwarded by the gateway namespace. Four modes per
//! repetition, interleaved: plain forwarding (no agent: the baseline), the gateway agent
//! splicing (the origin is no app) with the sockets joined in the kernel, the same with the
//! proxy copying (`proxy.kernel_splice = false`), and the gateway agent intercepting (the
//! origin is an app, no policies). Origin: nginx with TLS and HTTP/2. Client, origin and agent pinned to one core,
//! as in `bench proxy`; medians are reported, as ratios to plain forwarding. Every mode of every
//! repetition gets a fresh branch (namespaces and nginx): connection tracking and TIME_WAIT
//! state left by one mode slowed the next one's new connections by up to 15x.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use sluice_e2e::{netns::Netns, wait_until};

use crate::bench_proxy::{CORE, Proc, RunArgs, median, pinned_in, pki, sh, start_nginx_at};

const ORIGIN: &str = "10.99.2.2:443";
const ADMIN: &str = "127.0.0.1:9901";

struct Branch {
    client: Netns,
    gw: Netns,
    origin: Netns,
}

fn branch() -> Result<Branch> {
    let client = Netns::new("sbgc")?;
    let gw = Netns::new("sbgg")?;
    let origin = Netns::new("sbgo")?;
    client.veth("lan0", &gw, "g-lan")?;
    gw.veth("g-wan", &origin, "wan0")?;
    client.addr("lan0", "10.99.1.2/24")?;
    gw.addr("g-lan", "10.99.1.1/24")?;
    gw.addr("g-wan", "10.99.2.1/24")?;
    origin.addr("wan0", "10.99.2.2/24")?;
    client.ip(&["route", "add", "default", "via", "10.99.1.1"])?;
    origin.ip(&["route", "add", "default", "via", "10.99.2.1"])?;
    gw.sysctl("net.ipv4.ip_forward", "1")?;
    Ok(Branch { client, gw, origin })
}

/// The gateway agent, intercepting when `intercept` (the origin's host is an app).
fn start_agent(
    work: &Path,
    b: &Branch,
    intercept: bool,
    kernel_splice: bool,
    origin_ca: &Path,
) -> Result<Proc> {
    let dir = work.join(if intercept { "intercept" } else { "splice" });
    fs::create_dir_all(&dir)?;
    let cfg = dir.join("agent.toml");
    let apps = if intercept {
        format!(
            "[[apps]]\nid = \"bench\"\nhosts = [\"{}\"]\n",
            crate::bench_proxy::HOST
        )
    } else {
        String::new()
    };
    fs::write(
        &cfg,
        format!(
            r#"
state_dir = "{state}"
[steer]
enabled = false
[gateway]
enabled = true
lan_interfaces = ["g-lan"]
[proxy]
kernel_splice = {kernel_splice}
[admin]
listen = "{ADMIN}"
[tls]
upstream_extra_cas = ["{ca}"]
no_system_roots = true
no_bundled_roots = true
{apps}"#,
            state = work.join("gw-state").display(),
            ca = origin_ca.display(),
        ),
    )?;
    let sluice = sluice_e2e::bin("sluice");
    if !work.join("gw-state/ca/ca.crt").exists() {
        sh(Command::new(&sluice)
            .args(["ca", "init", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null()))?;
    }
    let child = pinned_in(Some(&b.gw.path()), &sluice.display().to_string())
        .args(["run", "--config"])
        .arg(&cfg)
        .env(
            "SLUICE_LOG",
            std::env::var("SLUICE_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("agent.log"))?)
        .spawn()?;
    let p = Proc(child);
    let live = wait_until(Duration::from_secs(20), || {
        b.gw.run(
            "curl",
            &["-s", &format!("http://{ADMIN}/status"), "-o", "-"],
        )
        .ok()
        .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
        .is_some_and(|s| s["gateway"]["live"] == true)
    });
    if !live {
        bail!(
            "the gateway agent did not come up: {}",
            fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
        );
    }
    Ok(p)
}

/// The load generator in the client's namespace, pinned; `pid` is the agent (its CPU counted).
fn loadgen(b: &Branch, ca: &Path, pid: Option<u32>, secs: f64) -> Result<Value> {
    let me = std::env::current_exe()?;
    let mut c = pinned_in(Some(&b.client.path()), &me.display().to_string());
    c.args(["loadgen", "--origin", ORIGIN, "--ca"])
        .arg(ca)
        .args(["--secs", &secs.to_string()]);
    if let Some(p) = pid {
        c.args(["--pid", &p.to_string()]);
    }
    let out = c.output()?;
    if !out.status.success() {
        bail!("loadgen: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The whole comparison.
pub fn run(args: &[String]) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the gateway benchmark creates network namespaces: run it as root (cargo xtask bench gateway)"
        );
    }
    let RunArgs {
        out_path,
        reps,
        secs,
        root,
    } = RunArgs::parse(args, "gateway")?;
    let work = root.join("target/bench/gateway-work");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let www = PathBuf::from("/dev/shm/sluice-bench-gw-www");
    let _ = fs::remove_dir_all(&www);
    let pki = pki(&work)?;
    let ca_export = |intercept: bool| -> Result<PathBuf> {
        let dir = work.join(if intercept { "intercept" } else { "splice" });
        let out = Command::new(sluice_e2e::bin("sluice"))
            .args(["ca", "export", "--config"])
            .arg(dir.join("agent.toml"))
            .output()?;
        let p = work.join("sluice-ca.pem");
        fs::write(&p, out.stdout)?;
        Ok(p)
    };
    let modes = ["forward", "spliced", "spliced_user", "intercepted"];
    let mut results: Vec<Vec<Value>> = vec![Vec::new(); modes.len()];
    for rep in 0..reps {
        for (i, mode) in modes.iter().enumerate() {
            eprintln!("rep {}/{reps}: {mode}", rep + 1);
            let b = branch().context("the branch's namespaces")?;
            let nginx = start_nginx_at(&work, &www, &pki, ORIGIN, Some(&b.origin.path()))?;
            let v = match *mode {
                "forward" => loadgen(&b, &pki.origin_ca, None, secs)?,
                m => {
                    let intercept = m == "intercepted";
                    let agent =
                        start_agent(&work, &b, intercept, m != "spliced_user", &pki.origin_ca)?;
                    let ca = if intercept {
                        ca_export(true)?
                    } else {
                        pki.origin_ca.clone()
                    };
                    let v = loadgen(&b, &ca, Some(agent.0.id()), secs)
                        .with_context(|| format!("{m}, repetition {}", rep + 1))?;
                    drop(agent);
                    v
                }
            };
            drop(nginx);
            drop(b);
            results[i].push(v);
        }
    }
    let _ = fs::remove_dir_all(&www);
    let figures = [
        ("keepalive_h1_rps", "keep-alive 1 KiB req/s, HTTP/1.1", true),
        ("keepalive_h2_rps", "keep-alive 1 KiB req/s, HTTP/2", true),
        ("new_tls_conns_per_s", "new TLS connections/s", true),
        ("download_mb_s", "100 MiB download MB/s", true),
        ("upload_mb_s", "100 MiB upload MB/s", true),
        ("latency_p50_ms", "latency p50 at 100 req/s (ms)", false),
        ("latency_p99_ms", "latency p99 at 100 req/s (ms)", false),
        ("cpu_us_per_request_h1", "agent CPU per request (µs)", false),
        (
            "cpu_us_per_connection",
            "agent CPU per new connection (µs)",
            false,
        ),
        (
            "cpu_s_per_gb_download",
            "agent CPU per GB downloaded (s)",
            false,
        ),
        (
            "cpu_s_per_gb_upload",
            "agent CPU per GB uploaded (s)",
            false,
        ),
        ("peak_rss_mib", "agent peak RSS (MiB)", false),
    ];
    let mut table = serde_json::Map::new();
    for (key, _, _) in &figures {
        let mut row = serde_json::Map::new();
        for (m, runs) in modes.iter().zip(&results) {
            let mut vals: Vec<f64> = runs.iter().filter_map(|r| r[*key].as_f64()).collect();
            if let Some(v) = median(&mut vals) {
                row.insert((*m).to_owned(), json!(v));
            }
        }
        table.insert((*key).to_owned(), Value::Object(row));
    }
    let get = |k: &str, m: &str| table.get(k).and_then(|r| r.get(m)).and_then(Value::as_f64);
    println!(
        "gateway: client -> gateway -> nginx origin in network namespaces, pinned to core {CORE}, medians of {reps} repetitions, {secs}s per rate figure"
    );
    println!(
        "{:<38} {:>12} {:>20} {:>20} {:>20}",
        "figure", "forward", "spliced", "spliced (copy)", "intercepted"
    );
    let mut ratios = serde_json::Map::new();
    for (key, label, ratio) in &figures {
        let cell = |m: &str| -> String {
            match (get(key, m), get(key, "forward")) {
                (Some(v), Some(f)) if *ratio && m != "forward" => {
                    format!("{v:.1} ({:.2}x)", v / f)
                }
                (Some(v), _) => format!("{v:.3}"),
                _ => "n/a".into(),
            }
        };
        println!(
            "{:<38} {:>12} {:>20} {:>20} {:>20}",
            label,
            cell("forward"),
            cell("spliced"),
            cell("spliced_user"),
            cell("intercepted")
        );
        if *ratio {
            for m in ["spliced", "spliced_user", "intercepted"] {
                if let (Some(v), Some(f)) = (get(key, m), get(key, "forward")) {
                    ratios.insert(format!("{key}.{m}_vs_forward"), json!(v / f));
                }
            }
        }
    }
    let json = json!({
        "bench": "gateway",
        "repetitions": reps,
        "seconds_per_rate_figure": secs,
        "medians": table,
        "ratios": ratios,
        "runs": modes.iter().zip(&results).map(|(m, r)| ((*m).to_owned(), json!(r))).collect::<serde_json::Map<_, _>>(),
    });
    if let Some(d) = out_path.parent() {
        fs::create_dir_all(d)?;
    }
    fs::write(&out_path, serde_json::to_string_pretty(&json)?)?;
    Ok(())
}
