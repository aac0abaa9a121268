//! `sluice-bench proxy`: Sluice against a direct connection and three peers (hudsucker, the Rust
//! intercepting proxy library, mitmproxy's mitmdump and Squid with ssl-bump) in one run on loopback. Origin: nginx with TLS and HTTP/2. Client, origin
//! and proxy are pinned to one core (on two shared cores that is the only way figures repeat
//! within a few percent). Modes are interleaved within each repetition; medians are reported.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::{Value, json};
use sluice_e2e::{InCgroup, TestCgroup, free_port, loadgen, wait_until};

const ORIGIN: &str = "127.0.0.40:8443";
pub(crate) const HOST: &str = "bench.test";
pub(crate) const BIG: u64 = 100 * 1024 * 1024;
/// Transfers of BIG per direction and protocol in each repetition (`--transfers`): a GB each.
/// Over three the figures carried each connection's ramp-up (windows, buffers, what the phase
/// before left) and spread 5-16% between repetitions; over ten, 1-7%.
const TRANSFERS: usize = 10;
/// Default length of the 100 requests/s latency load (`--latency-secs`).
const LATENCY_SECS: &str = "10";
pub(crate) const CORE: &str = "0";

pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pinned(program: &str) -> Command {
    pinned_in(None, program)
}

/// `program` pinned to [`CORE`] in cgroup `cgroup` (joined before it starts, so every process it
/// forks is counted there too: the CPU figures read the cgroup's `cpu.stat`).
fn pinned_peer(cgroup: &Path, program: &str) -> Command {
    let mut c = Command::new("sh");
    c.args(["-c", "echo $$ > \"$0\" && exec taskset -c \"$@\""])
        .arg(cgroup.join("cgroup.procs"))
        .arg(CORE)
        .arg(program);
    c
}

/// `program` pinned to [`CORE`], in network namespace `netns` (its file) when given.
pub(crate) fn pinned_in(netns: Option<&Path>, program: &str) -> Command {
    let mut c = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns.display()))
                .args(["--", "taskset"]);
            c
        }
        None => Command::new("taskset"),
    };
    c.args(["-c", CORE, program]);
    c
}

pub(crate) fn port_open(addr: SocketAddr) -> bool {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

pub(crate) fn sh(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("{cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

/// Installs what the bench compares against (not needed by the tests).
fn install_peers(tools: &Path) -> Result<PathBuf> {
    let missing: Vec<&str> = ["nginx-light", "squid-openssl"]
        .into_iter()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if !missing.is_empty() {
        eprintln!("installing {}", missing.join(" "));
        sh(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["update", "-q"]))?;
        sh(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing))?;
        // The packages start their own services; the bench runs its own instances.
        let _ = Command::new("systemctl")
            .args(["stop", "nginx", "squid"])
            .status();
        let _ = Command::new("pkill").args(["-x", "nginx"]).status();
        let _ = Command::new("pkill").args(["-x", "squid"]).status();
    }
    let venv = tools.join("mitm");
    let mitmdump = venv.join("bin/mitmdump");
    if !mitmdump.exists() {
        eprintln!("installing mitmproxy into {}", venv.display());
        sh(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        sh(Command::new(venv.join("bin/pip")).args(["install", "-q", "mitmproxy==11.0.2"]))?;
    }
    Ok(mitmdump)
}

/// Builds the hudsucker driver (`tests/peers/hudsucker`, the published crate) in release.
fn build_hudsucker(root: &Path) -> Result<PathBuf> {
    let target = root.join("target/bench-tools/hudsucker");
    eprintln!("building the hudsucker peer");
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(["build", "--release", "--locked", "--manifest-path"])
        .arg(root.join("tests/peers/hudsucker/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target);
    // What the enclosing `cargo xtask` set describes the workspace's build, not this one's (and
    // would make every run rebuild it).
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str()
            && (k.starts_with("CARGO_") || k.starts_with("RUSTC") || k == "RUSTFLAGS")
            && k != "CARGO_HOME"
        {
            cmd.env_remove(k);
        }
    }
    sh(&mut cmd)?;
    Ok(target.join("release/sluice-bench-hudsucker"))
}

pub(crate) struct Pki {
    pub(crate) origin_ca: PathBuf,
    peer_ca_cert: PathBuf,
    peer_ca_key: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

pub(crate) fn pki(dir: &Path) -> Result<Pki> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256,
    };
    let ca = |cn: &str| -> Result<(String, KeyPair, CertificateParams)> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = p.self_signed(&key)?;
        Ok((cert.pem(), key, p))
    };
    let (origin_pem, origin_key, origin_params) = ca("Bench Origin CA")?;
    let issuer = Issuer::new(origin_params, origin_key);
    let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let leaf = CertificateParams::new(vec![HOST.to_owned()])?.signed_by(&leaf_key, &issuer)?;
    let (peer_pem, peer_key, _) = ca("Bench Peer CA")?;
    let w = |name: &str, text: &str| -> Result<PathBuf> {
        let p = dir.join(name);
        fs::write(&p, text)?;
        Ok(p)
    };
    Ok(Pki {
        origin_ca: w("origin-ca.pem", &origin_pem)?,
        cert: w("origin.pem", &format!("{}{}", leaf.pem(), origin_pem))?,
        key: w("origin.key", &leaf_key.serialize_pem())?,
        peer_ca_cert: w("peer-ca.pem", &peer_pem)?,
        peer_ca_key: w("peer-ca.key", &peer_key.serialize_pem())?,
    })
}

fn start_nginx(work: &Path, www: &Path, pki: &Pki) -> Result<Proc> {
    start_nginx_at(work, www, pki, ORIGIN, None)
}

/// nginx serving `www` (with `/1k`, `/100m` and PUT under `/upload/`) on `listen`, in network
/// namespace `netns` when given.
pub(crate) fn start_nginx_at(
    work: &Path,
    www: &Path,
    pki: &Pki,
    listen: &str,
    netns: Option<&Path>,
) -> Result<Proc> {
    fs::create_dir_all(www.join("upload"))?;
    let mut small = vec![0u8; 1024];
    sluice_e2e::pattern(0, &mut small);
    fs::write(www.join("1k"), &small)?;
    let mut big = vec![0u8; BIG as usize];
    sluice_e2e::pattern(0, &mut big);
    fs::write(www.join("100m"), &big)?;
    let conf = work.join("nginx.conf");
    fs::write(
        &conf,
        format!(
            r#"
user root;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
daemon off;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  client_body_temp_path {www}/.tmp;
  proxy_temp_path {work}/ngx-proxy;
  fastcgi_temp_path {work}/ngx-fcgi;
  uwsgi_temp_path {work}/ngx-uwsgi;
  scgi_temp_path {work}/ngx-scgi;
  server {{
    listen {listen} ssl http2;
    server_name {HOST};
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    root {www};
    location /upload/ {{ dav_methods PUT; client_max_body_size 0; client_body_buffer_size 1m; create_full_put_path on; }}
  }}
}}
"#,
            work = work.display(),
            www = www.display(),
            cert = pki.cert.display(),
            key = pki.key.display(),
        ),
    )?;
    fs::create_dir_all(www.join(".tmp"))?;
    let _ = fs::remove_file(work.join("nginx.pid"));
    let child = pinned_in(netns, "nginx")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .spawn()?;
    let p = Proc(child);
    let ready = || match netns {
        None => listen.parse().is_ok_and(port_open),
        Some(_) => fs::read_to_string(work.join("nginx.pid")).is_ok(),
    };
    if !wait_until(Duration::from_secs(10), ready) {
        bail!(
            "nginx did not start: {}",
            fs::read_to_string(work.join("nginx-error.log")).unwrap_or_default()
        );
    }
    Ok(p)
}

/// A running proxy under test: its process, the CA the client trusts, and how to reach it.
struct Running {
    proc: Option<Proc>,
    /// The cgroup holding all its processes (its CPU is read there).
    cgroup: Option<PathBuf>,
    ca: PathBuf,
    explicit: Option<SocketAddr>,
    /// The proxy resolves the origin's name itself (CONNECT by name).
    by_name: bool,
}

fn start_sluice(
    work: &Path,
    cg: &TestCgroup,
    pki: &Pki,
    hash: bool,
    sluice: &Path,
) -> Result<Running> {
    let dir = work.join(if hash { "sluice-hash" } else { "sluice" });
    fs::create_dir_all(&dir)?;
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let port = free_port();
    let origin: SocketAddr = ORIGIN.parse()?;
    let cfg = dir.join("agent.toml");
    fs::write(
        &cfg,
        format!(
            r#"
state_dir = "{state}"
[steer]
cgroup = "{cg}"
agent_cgroup = "{cg}/agent"
include = [{{ cidr = "{ip}/32", ports = [{oport}] }}]
[proxy]
port = {port}
hash_bodies = {hash}
{extra}
[admin]
listen = "{admin}"
[tls]
upstream_extra_cas = ["{ca}"]
no_system_roots = true
no_bundled_roots = true
[[apps]]
id = "bench"
hosts = ["{HOST}"]
"#,
            state = work.join("sluice-state").display(),
            extra = std::env::var("SLUICE_BENCH_PROXY_EXTRA").unwrap_or_default(),
            cg = cg.rel,
            ip = origin.ip(),
            oport = origin.port(),
            ca = pki.origin_ca.display(),
        ),
    )?;
    let exists = work.join("sluice-state/ca/ca.crt").exists();
    if !exists {
        sh(Command::new(sluice)
            .args(["ca", "init", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null()))?;
    }
    let ca = work.join("sluice-ca.pem");
    let out = Command::new(sluice)
        .args(["ca", "export", "--config"])
        .arg(&cfg)
        .output()?;
    fs::write(&ca, out.stdout)?;
    let child = pinned(sluice.to_str().ok_or_else(|| anyhow!("path"))?)
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
    let ready = wait_until(Duration::from_secs(20), || {
        std::net::TcpStream::connect(admin)
            .and_then(|mut s| {
                use std::io::{Read as _, Write as _};
                s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
                let mut r = String::new();
                s.read_to_string(&mut r)?;
                Ok(r.starts_with("HTTP/1.1 200"))
            })
            .unwrap_or(false)
    });
    if !ready {
        bail!(
            "sluice did not become ready: {}",
            fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
        );
    }
    Ok(Running {
        proc: Some(p),
        cgroup: Some(cg.dir.join("agent")),
        ca,
        explicit: None,
        by_name: false,
    })
}

fn start_mitmdump(work: &Path, peer_cg: &Path, mitmdump: &Path, pki: &Pki) -> Result<Running> {
    let conf = work.join("mitm-conf");
    fs::create_dir_all(&conf)?;
    let port = free_port();
    let child = pinned_peer(peer_cg, mitmdump.to_str().ok_or_else(|| anyhow!("path"))?)
        .args([
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            &port.to_string(),
            "-q",
        ])
        .args(["--set", &format!("confdir={}", conf.display())])
        .args([
            "--set",
            &format!("ssl_verify_upstream_trusted_ca={}", pki.origin_ca.display()),
        ])
        .stdout(Stdio::null())
        .stderr(fs::File::create(work.join("mitm.log"))?)
        .spawn()?;
    let ca = conf.join("mitmproxy-ca-cert.pem");
    let peer = Peer {
        name: "mitmdump",
        cgroup: peer_cg,
        log: &work.join("mitm.log"),
        ca: &ca,
        by_name: false,
    };
    peer.ready(
        child,
        SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(60),
        |addr| port_open(addr) && ca.exists(),
    )
}

fn start_hudsucker(work: &Path, peer_cg: &Path, bin: &Path, pki: &Pki) -> Result<Running> {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let child = pinned_peer(peer_cg, bin.to_str().ok_or_else(|| anyhow!("path"))?)
        .arg(addr.to_string())
        .arg(&pki.peer_ca_cert)
        .arg(&pki.peer_ca_key)
        .arg(&pki.origin_ca)
        .arg(format!("{HOST}={}", ORIGIN.parse::<SocketAddr>()?.ip()))
        .stdout(Stdio::null())
        .stderr(fs::File::create(work.join("hudsucker.log"))?)
        .spawn()?;
    let peer = Peer {
        name: "hudsucker",
        cgroup: peer_cg,
        log: &work.join("hudsucker.log"),
        ca: &pki.peer_ca_cert,
        by_name: true,
    };
    peer.ready(child, addr, Duration::from_secs(20), port_open)
}

/// An explicit (CONNECT) peer proxy being started.
struct Peer<'a> {
    name: &'a str,
    cgroup: &'a Path,
    /// Where it says why it did not start.
    log: &'a Path,
    /// The CA its client trusts.
    ca: &'a Path,
    by_name: bool,
}

impl Peer<'_> {
    /// Waits up to `wait` for `up(addr)`; the running peer, or its log in the error.
    fn ready(
        &self,
        child: Child,
        addr: SocketAddr,
        wait: Duration,
        up: impl Fn(SocketAddr) -> bool,
    ) -> Result<Running> {
        let p = Proc(child);
        if !wait_until(wait, || up(addr)) {
            bail!(
                "{} did not start: {}",
                self.name,
                fs::read_to_string(self.log).unwrap_or_default()
            );
        }
        Ok(Running {
            proc: Some(p),
            cgroup: Some(self.cgroup.to_owned()),
            ca: self.ca.to_owned(),
            explicit: Some(addr),
            by_name: self.by_name,
        })
    }
}

fn start_squid(work: &Path, peer_cg: &Path, pki: &Pki) -> Result<Running> {
    let dir = work.join("squid");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let db = dir.join("ssl_db");
    sh(Command::new("/usr/lib/squid/security_file_certgen")
        .args(["-c", "-s"])
        .arg(&db)
        .args(["-M", "16MB"])
        .stdout(Stdio::null()))?;
    let port = free_port();
    let conf = dir.join("squid.conf");
    fs::write(
        &conf,
        format!(
            r#"
http_port 127.0.0.1:{port} ssl-bump tls-cert={cert} tls-key={key} generate-host-certificates=on dynamic_cert_mem_cache_size=16MB
sslcrtd_program /usr/lib/squid/security_file_certgen -s {db} -M 16MB
sslcrtd_children 2 startup=1 idle=1
acl step1 at_step SslBump1
ssl_bump peek step1
ssl_bump bump all
tls_outgoing_options cafile={origin_ca}
http_access allow all
cache deny all
access_log none
cache_log {dir}/cache.log
pid_filename {dir}/squid.pid
coredump_dir {dir}
cache_effective_user proxy
workers 1
shutdown_lifetime 1 seconds
"#,
            cert = pki.peer_ca_cert.display(),
            key = pki.peer_ca_key.display(),
            db = db.display(),
            origin_ca = pki.origin_ca.display(),
            dir = dir.display(),
        ),
    )?;
    sh(Command::new("chown").args(["-R", "proxy:proxy"]).arg(&dir))?;
    for f in [&pki.peer_ca_cert, &pki.peer_ca_key, &pki.origin_ca] {
        sh(Command::new("chmod").arg("0644").arg(f))?;
    }
    let child = pinned_peer(peer_cg, "squid")
        .args(["-N", "-f"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let peer = Peer {
        name: "squid",
        cgroup: peer_cg,
        log: &dir.join("cache.log"),
        ca: &pki.peer_ca_cert,
        by_name: false,
    };
    peer.ready(
        child,
        SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(30),
        port_open,
    )
}

/// Runs the load generator for one mode, pinned, inside the bench cgroup; returns its figures.
fn run_loadgen(
    cg: &TestCgroup,
    run: &Running,
    only: &[&str],
    skip_h2: bool,
    secs: f64,
    latency_secs: f64,
    transfers: usize,
) -> Result<Value> {
    let me = std::env::current_exe()?;
    let mut args = vec![
        "loadgen".to_owned(),
        "--ca".into(),
        run.ca.display().to_string(),
        "--secs".into(),
        secs.to_string(),
        "--latency-secs".into(),
        latency_secs.to_string(),
        "--transfers".into(),
        transfers.to_string(),
    ];
    if let Some(p) = run.explicit {
        args.extend(["--proxy".into(), p.to_string()]);
    }
    if let Some(p) = &run.proc {
        args.extend(["--pid".into(), p.0.id().to_string()]);
    }
    if let Some(c) = &run.cgroup {
        args.extend(["--cgroup".into(), c.display().to_string()]);
    }
    args.extend(only.iter().map(|o| o.to_string()));
    if skip_h2 {
        args.push("--no-h2".into());
    }
    if run.by_name {
        args.push("--connect-by-name".into());
    }
    let mut full = vec!["-c".to_owned(), CORE.to_owned(), me.display().to_string()];
    full.extend(args);
    let out = InCgroup::at(&cg.dir).run(Path::new("taskset"), &full)?;
    Ok(serde_json::from_str(out.trim())?)
}

/// The latency figure measured with Sluice and the chosen explicit peers running together, the
/// requests (100 a second in all) taken by each in turn: `latency_alt_p50_ms` /
/// `latency_alt_p99_ms` in each one's result of repetition `rep`. Measured one after the other,
/// the proxies' latencies carry the machine's drift: on this kind of machine its CPU cost per
/// request moves by up to two times between runs a minute apart, every process alike.
#[allow(clippy::too_many_arguments)]
fn alternating_latency(
    work: &Path,
    cg: &TestCgroup,
    peers_cg: &TestCgroup,
    pki: &Pki,
    modes: &[&str],
    hudsucker: &Path,
    mitmdump: &Path,
    latency_secs: f64,
    results: &mut [(String, Vec<Value>)],
    rep: usize,
) -> Result<()> {
    let peers: Vec<&str> = modes
        .iter()
        .copied()
        .filter(|m| matches!(*m, "hudsucker" | "mitmdump" | "squid"))
        .collect();
    if !modes.contains(&"sluice") || peers.is_empty() {
        return Ok(());
    }
    eprintln!(
        "rep {}: alternating latency, sluice and {}",
        rep + 1,
        peers.join(", ")
    );
    let mut running = vec![(
        "sluice",
        start_sluice(work, cg, pki, false, &sluice_e2e::bin("sluice"))?,
    )];
    // The peers' own connections to the origin must not be steered to Sluice: they run outside
    // the steered cgroup here.
    for p in peers {
        let r = match p {
            "hudsucker" => start_hudsucker(work, &peers_cg.dir, hudsucker, pki)?,
            "mitmdump" => start_mitmdump(work, &peers_cg.dir, mitmdump, pki)?,
            _ => start_squid(work, &peers_cg.dir, pki)?,
        };
        running.push((p, r));
    }
    let me = std::env::current_exe()?;
    let mut full = vec![
        "-c".to_owned(),
        CORE.to_owned(),
        me.display().to_string(),
        "loadgen".into(),
        "--latency-secs".into(),
        latency_secs.to_string(),
    ];
    for (name, r) in &running {
        full.push("--pair-target".into());
        full.push(format!(
            "{name},{},{},{}",
            r.ca.display(),
            r.explicit.map_or("-".to_owned(), |a| a.to_string()),
            u8::from(r.by_name)
        ));
    }
    // In the bench cgroup: Sluice's connections are steered to it, the peers' go to them.
    let out = InCgroup::at(&cg.dir).run(Path::new("taskset"), &full)?;
    let v: Value = serde_json::from_str(out.trim())?;
    drop(running);
    for (mode, runs) in results.iter_mut() {
        if let (Some(fig), Some(Value::Object(run))) = (v.get(mode.as_str()), runs.get_mut(rep)) {
            run.insert("latency_alt_p50_ms".into(), fig["p50"].clone());
            run.insert("latency_alt_p99_ms".into(), fig["p99"].clone());
        }
    }
    Ok(())
}

/// Fixes the C allocator's thresholds, so that the client runs at the same speed whatever it
/// did before in the same process. glibc adjusts them the first time it frees a large mapped
/// block; until then it hands the top of the heap back and faults it in again around each
/// 64 KiB upload chunk. An upload measured alone then ran at about 700 MB/s direct, one measured
/// after a download at about 870; and a proxy's CPU per GB moves with the client's speed (a
/// proxy the client outruns pays, in its reads, for the client's loopback transmissions: Sluice's
/// upload measured 0.31-0.49 s/GB alone and 0.51-0.59 after a download).
fn steady_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: `mallopt` only sets allocator parameters; it is called before any other thread of
    // this process exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

/// The load generator process: every scenario for one mode, as one JSON object.
pub fn loadgen(args: &[String]) -> Result<()> {
    steady_allocator();
    let opt = |n: &str| option(args, n);
    let flag = |n: &str| args.iter().any(|a| a == n);
    if flag("--pair-target") {
        return loadgen_alternating(args);
    }
    let ca = PathBuf::from(opt("--ca").context("--ca")?);
    let proxy: Option<SocketAddr> = opt("--proxy").map(|p| p.parse()).transpose()?;
    let pid: Option<u32> = opt("--pid").map(|p| p.parse()).transpose()?;
    let secs: f64 = opt("--secs").unwrap_or_else(|| "3".into()).parse()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let origin: SocketAddr = opt("--origin").unwrap_or_else(|| ORIGIN.into()).parse()?;
    let mut t = loadgen::Target::new(origin, HOST, proxy, &ca)?;
    t.connect_by_name = flag("--connect-by-name");
    // CPU seconds of the proxy: its cgroup's (microseconds, every process it ever ran), else its
    // process tree's (clock ticks of the processes alive).
    let cgroup = opt("--cgroup").map(PathBuf::from);
    let cpu = || match &cgroup {
        Some(c) => loadgen::cgroup_cpu(c).unwrap_or(f64::NAN),
        None => pid.map(loadgen::tree_cpu).unwrap_or(0.0),
    };
    let mut out = serde_json::Map::new();
    if let Some(pid) = pid {
        // Idle: started and settled, nothing sent yet. The peak below is the load's alone.
        std::thread::sleep(Duration::from_secs(2));
        out.insert(
            "idle_rss_mib".into(),
            json!(loadgen::tree_rss_kib(pid) as f64 / 1024.0),
        );
        loadgen::tree_reset_hwm(pid);
    }
    rt.block_on(async {
        // `--only-requests`, `--only-connections`, `--only-latency`, `--only-transfers`: that
        // kind of figure alone (for profiling it); without any, every kind.
        let kinds = ["requests", "connections", "latency", "transfers"];
        let chosen: Vec<&str> = kinds
            .into_iter()
            .filter(|k| flag(&format!("--only-{k}")))
            .collect();
        let want = |kind: &str| chosen.is_empty() || chosen.contains(&kind);
        if want("requests") {
            let c0 = cpu();
            let h1 = loadgen::keepalive(&t, false, 8, 0, secs, "/1k").await?;
            let c1 = cpu();
            out.insert("keepalive_h1_rps".into(), json!(h1));
            out.insert(
                "cpu_us_per_request_h1".into(),
                json!((c1 - c0) * 1e6 / (h1 * secs)),
            );
            if !flag("--no-h2") {
                let c0 = cpu();
                let h2 = loadgen::keepalive(&t, true, 1, 32, secs, "/1k").await?;
                let c1 = cpu();
                out.insert("keepalive_h2_rps".into(), json!(h2));
                out.insert(
                    "cpu_us_per_request_h2".into(),
                    json!((c1 - c0) * 1e6 / (h2 * secs)),
                );
            }
        }
        if want("connections") {
            let c0 = cpu();
            let (conns, n) = loadgen::new_connections(&t, 8, secs, "/1k").await?;
            let c1 = cpu();
            out.insert("new_tls_conns_per_s".into(), json!(conns));
            out.insert(
                "cpu_us_per_connection".into(),
                json!((c1 - c0) * 1e6 / n.max(1) as f64),
            );
        }
        if want("latency") {
            // 100 requests a second for 10 s by default: the p99 is then the 10th-worst of 1,000
            // (over 3 s it would be the 3rd-worst of 300, one stray pause).
            let lat_secs: f64 = opt("--latency-secs")
                .unwrap_or_else(|| LATENCY_SECS.into())
                .parse()?;
            let lat = loadgen::latency(&t, 100.0, lat_secs, "/1k").await?;
            out.insert("latency_p50_ms".into(), json!(loadgen::quantile(&lat, 0.5)));
            out.insert(
                "latency_p99_ms".into(),
                json!(loadgen::quantile(&lat, 0.99)),
            );
        }
        if !want("transfers") {
            return anyhow::Ok(());
        }
        // Transfers over HTTP/1.1 and, where the proxy speaks it to clients, over HTTP/2.
        let transfers: usize = opt("--transfers")
            .map_or(Ok(TRANSFERS), |t| t.parse())
            .context("--transfers")?;
        let gb = (BIG * transfers as u64) as f64 / 1e9;
        // `--no-h2` / `--only-h2`, `--only-down` / `--only-up`: one protocol or direction alone
        // (for profiling it).
        let protocols: &[(bool, &str)] = if flag("--no-h2") {
            &[(false, "")]
        } else if flag("--only-h2") {
            &[(true, "_h2")]
        } else {
            &[(false, ""), (true, "_h2")]
        };
        for (h2, suffix) in protocols {
            if !flag("--only-up") {
                let c0 = cpu();
                let down = loadgen::download(&t, *h2, "/100m", "/1k", transfers).await?;
                let c1 = cpu();
                out.insert(format!("download{suffix}_mb_s"), json!(down));
                out.insert(
                    format!("cpu_s_per_gb_download{suffix}"),
                    json!((c1 - c0) / gb),
                );
            }
            if !flag("--only-down") {
                let c1 = cpu();
                let up = loadgen::upload(&t, *h2, "/upload/blob", BIG, "/1k", transfers).await?;
                let c2 = cpu();
                out.insert(format!("upload{suffix}_mb_s"), json!(up));
                out.insert(
                    format!("cpu_s_per_gb_upload{suffix}"),
                    json!((c2 - c1) / gb),
                );
            }
        }
        anyhow::Ok(())
    })?;
    if let Some(pid) = pid {
        let peak = loadgen::tree_hwm_kib(pid) as f64 / 1024.0;
        out.insert("peak_rss_mib".into(), json!(peak));
        if let Some(idle) = out.get("idle_rss_mib").and_then(Value::as_f64) {
            out.insert("peak_over_idle_mib".into(), json!(peak - idle));
        }
    }
    println!("{}", Value::Object(out));
    Ok(())
}

pub(crate) fn median(v: &mut Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

/// The load generator of the alternating latency figure: 100 requests a second in all, taken by
/// the proxies in turn (`--pair-target NAME,CA,PROXY|-,BY_NAME`, one per proxy); per proxy, its
/// p50 and p99 in milliseconds, as one JSON object.
fn loadgen_alternating(args: &[String]) -> Result<()> {
    let secs: f64 = option(args, "--latency-secs")
        .unwrap_or_else(|| LATENCY_SECS.into())
        .parse()?;
    let origin: SocketAddr = ORIGIN.parse()?;
    let mut names = Vec::new();
    let mut targets = Vec::new();
    for (i, a) in args.iter().enumerate() {
        if a != "--pair-target" {
            continue;
        }
        let spec = args
            .get(i + 1)
            .context("--pair-target NAME,CA,PROXY|-,BY_NAME")?;
        let [name, ca, proxy, by_name] = spec.split(',').collect::<Vec<_>>()[..] else {
            bail!("--pair-target {spec}: want NAME,CA,PROXY|-,BY_NAME");
        };
        let proxy: Option<SocketAddr> = (proxy != "-").then(|| proxy.parse()).transpose()?;
        let mut t = loadgen::Target::new(origin, HOST, proxy, Path::new(ca))?;
        t.connect_by_name = by_name == "1";
        names.push(name.to_owned());
        targets.push(t);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let lat = rt.block_on(loadgen::latency_alternating(&targets, 100.0, secs, "/1k"))?;
    let out: serde_json::Map<String, Value> = names
        .into_iter()
        .zip(lat)
        .map(|(n, l)| {
            let v = json!({
                "p50": loadgen::quantile(&l, 0.5),
                "p99": loadgen::quantile(&l, 0.99),
            });
            (n, v)
        })
        .collect();
    println!("{}", Value::Object(out));
    Ok(())
}

/// The value after `name` in `args`.
pub(crate) fn option(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// What every load benchmark takes: `--out` (default `target/bench/NAME.json`), `--reps`,
/// `--secs` (defaults 3 and 3); the workspace root is the one above `--out`'s `target/bench`.
pub(crate) struct RunArgs {
    pub(crate) out_path: PathBuf,
    pub(crate) reps: usize,
    pub(crate) secs: f64,
    pub(crate) root: PathBuf,
}

impl RunArgs {
    pub(crate) fn parse(args: &[String], name: &str) -> Result<Self> {
        let opt = |n: &str| option(args, n);
        let out_path = std::path::absolute(PathBuf::from(
            opt("--out").unwrap_or_else(|| format!("target/bench/{name}.json")),
        ))?;
        let root = out_path
            .parent()
            .and_then(Path::parent)
            .and_then(Path::parent)
            .unwrap_or(Path::new("."))
            .to_path_buf();
        Ok(Self {
            reps: opt("--reps").unwrap_or_else(|| "3".into()).parse()?,
            secs: opt("--secs").unwrap_or_else(|| "3".into()).parse()?,
            out_path,
            root,
        })
    }
}

/// The whole comparison.
pub fn run(args: &[String]) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the proxy benchmark attaches eBPF programs and runs servers: run it as root (cargo xtask bench proxy)"
        );
    }
    let opt = |n: &str| option(args, n);
    let RunArgs {
        out_path,
        reps,
        secs,
        root,
    } = RunArgs::parse(args, "proxy")?;
    let latency_secs: f64 = opt("--latency-secs")
        .unwrap_or_else(|| LATENCY_SECS.into())
        .parse()
        .context("--latency-secs")?;
    let transfers: usize = opt("--transfers")
        .map_or(Ok(TRANSFERS), |t| t.parse())
        .context("--transfers")?;
    let work = root.join("target/bench/proxy-work");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let mitmdump = install_peers(&root.join("target/bench-tools"))?;
    let www = PathBuf::from("/dev/shm/sluice-bench-www");
    let _ = fs::remove_dir_all(&www);
    let pki = pki(&work)?;
    let _nginx = start_nginx(&work, &www, &pki)?;
    let cg = TestCgroup::new("benchproxy");
    // The peers run in a cgroup of their own (Sluice's agent moves itself into `agent`).
    let (_, peer_cg) = cg.child("peer");
    // The peers of the alternating latency figure, outside the steered cgroup (Sluice runs then).
    let peers_cg = TestCgroup::new("benchproxy-peers");
    // `--alt PATH`: another build of `sluice`, measured as `sluice_alt` in the same run (to
    // compare two builds under the same conditions).
    let alt = opt("--alt").map(PathBuf::from);
    let all = [
        "direct",
        "sluice",
        "sluice_sha256",
        "hudsucker",
        "mitmdump",
        "squid",
        "sluice_alt",
    ];
    // `--modes direct,sluice` runs a subset (the direct baseline always runs: every ratio needs it).
    let chosen = opt("--modes");
    // `--only-transfers`, `--only-requests`, `--only-connections`, `--only-latency`: those
    // kinds of figure alone (for profiling them).
    let only: Vec<&str> = [
        "--only-transfers",
        "--only-requests",
        "--only-connections",
        "--only-latency",
        "--only-h2",
        "--only-down",
        "--only-up",
        "--no-h2",
    ]
    .into_iter()
    .filter(|o| args.iter().any(|a| a == o))
    .collect();
    let modes: Vec<&str> = all
        .iter()
        .copied()
        .filter(|m| {
            (*m != "sluice_alt" || alt.is_some())
                && (*m == "direct"
                    || chosen
                        .as_deref()
                        .is_none_or(|c| c.split(',').any(|x| x.trim() == *m)))
        })
        .collect();
    if let Some(c) = chosen.as_deref()
        && let Some(bad) = c.split(',').map(str::trim).find(|x| !all.contains(x))
    {
        bail!("unknown mode `{bad}`; known: {}", all.join(", "));
    }
    let hudsucker = match modes.contains(&"hudsucker") {
        true => build_hudsucker(&root)?,
        false => PathBuf::new(),
    };
    let mut results: Vec<(String, Vec<Value>)> =
        modes.iter().map(|m| (m.to_string(), Vec::new())).collect();
    for rep in 0..reps {
        // The direct baseline first, then the proxies in an order that turns with each
        // repetition: whichever runs first after the baseline measures lower on this machine
        // (up to a fifth, the same build against itself), so no proxy keeps that place.
        let proxies = modes.len() - 1;
        let order = std::iter::once(0).chain((0..proxies).map(|k| 1 + (k + rep) % proxies.max(1)));
        for i in order {
            let mode = &modes[i];
            eprintln!("rep {}/{reps}: {mode}", rep + 1);
            let running = match *mode {
                "direct" => Running {
                    proc: None,
                    cgroup: None,
                    ca: pki.origin_ca.clone(),
                    explicit: None,
                    by_name: false,
                },
                "sluice" => start_sluice(&work, &cg, &pki, false, &sluice_e2e::bin("sluice"))?,
                "sluice_sha256" => {
                    start_sluice(&work, &cg, &pki, true, &sluice_e2e::bin("sluice"))?
                }
                "sluice_alt" => start_sluice(
                    &work,
                    &cg,
                    &pki,
                    false,
                    alt.as_deref().unwrap_or(Path::new("sluice")),
                )?,
                "hudsucker" => start_hudsucker(&work, &peer_cg, &hudsucker, &pki)?,
                "mitmdump" => start_mitmdump(&work, &peer_cg, &mitmdump, &pki)?,
                _ => start_squid(&work, &peer_cg, &pki)?,
            };
            let v = run_loadgen(
                &cg,
                &running,
                match *mode {
                    "sluice_sha256" if only.is_empty() => &["--only-transfers"],
                    _ => &only,
                },
                *mode == "squid",
                secs,
                latency_secs,
                transfers,
            )
            .with_context(|| format!("{mode}, repetition {}", rep + 1))?;
            results[i].1.push(v);
            drop(running);
        }
        // Latency again with Sluice and the explicit peers up together, taking requests in
        // turn, so that each proxy's figure comes from the same seconds of the machine.
        if only.is_empty() || only.contains(&"--only-latency") {
            alternating_latency(
                &work,
                &cg,
                &peers_cg,
                &pki,
                &modes,
                &hudsucker,
                &mitmdump,
                latency_secs,
                &mut results,
                rep,
            )
            .with_context(|| format!("alternating latency, repetition {}", rep + 1))?;
        }
    }
    let _ = fs::remove_dir_all(&www);

    // (key, label, higher is better and shown against direct, a proxy CPU figure)
    let figures = [
        ("keepalive_h1_rps", "keep-alive 1 KiB req/s, HTTP/1.1", true),
        ("keepalive_h2_rps", "keep-alive 1 KiB req/s, HTTP/2", true),
        ("new_tls_conns_per_s", "new TLS connections/s", true),
        ("download_mb_s", "100 MiB download MB/s, HTTP/1.1", true),
        ("upload_mb_s", "100 MiB upload MB/s, HTTP/1.1", true),
        ("download_h2_mb_s", "100 MiB download MB/s, HTTP/2", true),
        ("upload_h2_mb_s", "100 MiB upload MB/s, HTTP/2", true),
        ("latency_p50_ms", "latency p50 at 100 req/s (ms)", false),
        ("latency_p99_ms", "latency p99 at 100 req/s (ms)", false),
        (
            "latency_alt_p50_ms",
            "latency p50, proxies in turn (ms)",
            false,
        ),
        (
            "latency_alt_p99_ms",
            "latency p99, proxies in turn (ms)",
            false,
        ),
        (
            "cpu_us_per_request_h1",
            "CPU per request, HTTP/1.1 (µs)",
            false,
        ),
        (
            "cpu_us_per_request_h2",
            "CPU per request, HTTP/2 (µs)",
            false,
        ),
        (
            "cpu_us_per_connection",
            "CPU per new connection (µs)",
            false,
        ),
        (
            "cpu_s_per_gb_download",
            "CPU per GB down, HTTP/1.1 (s)",
            false,
        ),
        ("cpu_s_per_gb_upload", "CPU per GB up, HTTP/1.1 (s)", false),
        (
            "cpu_s_per_gb_download_h2",
            "CPU per GB down, HTTP/2 (s)",
            false,
        ),
        ("cpu_s_per_gb_upload_h2", "CPU per GB up, HTTP/2 (s)", false),
        ("idle_rss_mib", "proxy idle RSS (MiB)", false),
        ("peak_rss_mib", "proxy peak RSS under load (MiB)", false),
        ("peak_over_idle_mib", "peak RSS over idle (MiB)", false),
    ];
    let mut table = serde_json::Map::new();
    for (key, _, _) in &figures {
        let mut row = serde_json::Map::new();
        for (mode, runs) in &results {
            let mut vals: Vec<f64> = runs.iter().filter_map(|r| r[*key].as_f64()).collect();
            if let Some(m) = median(&mut vals) {
                row.insert(mode.clone(), json!(m));
            }
        }
        table.insert(key.to_string(), Value::Object(row));
    }
    let get = |k: &str, m: &str| table.get(k).and_then(|r| r.get(m)).and_then(Value::as_f64);
    println!(
        "proxy: loopback, client + nginx origin + proxy pinned to core {CORE}, medians of {reps} repetitions, {secs}s per rate figure, {latency_secs}s of latency"
    );
    println!(
        "{:<38} {:>11} {:>18} {:>18} {:>16} {:>16} {:>16}",
        "figure", "direct", "sluice", "sluice+sha256", "hudsucker", "mitmdump", "squid"
    );
    let cell = |k: &str, m: &str, ratio: bool| -> String {
        match (get(k, m), get(k, "direct")) {
            (Some(v), Some(d)) if ratio && m != "direct" => format!("{v:.1} ({:.2}x)", v / d),
            (Some(v), _) => format!("{v:.3}"),
            _ => "n/a".into(),
        }
    };
    for (key, label, ratio) in &figures {
        println!(
            "{:<38} {:>11} {:>18} {:>18} {:>16} {:>16} {:>16}",
            label,
            cell(key, "direct", false),
            cell(key, "sluice", *ratio),
            cell(key, "sluice_sha256", *ratio),
            cell(key, "hudsucker", *ratio),
            cell(key, "mitmdump", *ratio),
            cell(key, "squid", *ratio)
        );
    }
    if alt.is_some() {
        for (key, label, ratio) in &figures {
            println!(
                "{:<38} {:>11} {:>18} {:>18}   (alt build)",
                label,
                cell(key, "direct", false),
                cell(key, "sluice", *ratio),
                cell(key, "sluice_alt", *ratio)
            );
        }
    }
    let added = |q: &str| get(q, "sluice").zip(get(q, "direct")).map(|(s, d)| s - d);
    let vs = |k: &str, peer: &str| get(k, "sluice").zip(get(k, peer)).map(|(s, p)| s / p);
    let mut ratios = serde_json::Map::new();
    for (key, _, ratio) in &figures {
        if *ratio {
            for m in ["sluice", "sluice_sha256", "hudsucker", "mitmdump", "squid"] {
                if let (Some(v), Some(d)) = (get(key, m), get(key, "direct")) {
                    ratios.insert(format!("{key}.{m}_vs_direct"), json!(v / d));
                }
            }
        }
        for peer in ["hudsucker", "mitmdump", "squid", "sluice_alt"] {
            if let Some(r) = vs(key, peer) {
                ratios.insert(format!("{key}.sluice_vs_{peer}"), json!(r));
            }
        }
    }
    if let (Some(p50), Some(p99)) = (added("latency_p50_ms"), added("latency_p99_ms")) {
        println!("added latency through sluice: p50 {p50:.3} ms, p99 {p99:.3} ms");
        ratios.insert("added_latency_p50_ms".into(), json!(p50));
        ratios.insert("added_latency_p99_ms".into(), json!(p99));
    }
    for peer in ["hudsucker", "mitmdump", "squid", "sluice_alt"] {
        let rates: Vec<String> = figures
            .iter()
            .filter(|(k, _, ratio)| *ratio && !k.starts_with("latency"))
            .filter_map(|(k, _, _)| vs(k, peer).map(|r| format!("{k} {r:.2}x")))
            .collect();
        // CPU per unit repeats far better than throughput on a shared machine: lower is better.
        let cpu: Vec<String> = figures
            .iter()
            .filter(|(k, _, _)| k.starts_with("cpu_") || k.ends_with("_mib"))
            .filter_map(|(k, _, _)| vs(k, peer).map(|r| format!("{k} {r:.2}x")))
            .collect();
        if !rates.is_empty() {
            println!(
                "sluice vs {peer}, rates (higher is better): {}",
                rates.join(", ")
            );
            println!(
                "sluice vs {peer}, CPU per unit (lower is better): {}",
                cpu.join(", ")
            );
        }
    }
    let json = json!({
        "bench": "proxy",
        "repetitions": reps,
        "seconds_per_rate_figure": secs,
        "seconds_of_latency": latency_secs,
        "medians": table,
        "ratios": ratios,
        "runs": results.iter().map(|(m, r)| (m.clone(), json!(r))).collect::<serde_json::Map<_, _>>(),
    });
    if let Some(d) = out_path.parent() {
        fs::create_dir_all(d)?;
    }
    fs::write(&out_path, serde_json::to_string_pretty(&json)?)?;
    Ok(())
}
