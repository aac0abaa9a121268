//! The load generator of `cargo xtask bench proxy`: HTTP/1.1 and HTTP/2 over TLS with hyper and
//! rustls, either straight to the origin (direct, or transparently steered to Sluice) or through an
//! explicit proxy with CONNECT (mitmproxy, Squid). Each scenario returns its figure; the proxy's CPU
//! time over the scenario is read from `/proc` for the whole process tree given.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt as _, Empty, StreamBody, combinators::BoxBody};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ClientConfig;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};

type Body = BoxBody<Bytes, std::io::Error>;

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Where requests go.
#[derive(Clone)]
pub struct Target {
    /// The origin's address.
    pub addr: SocketAddr,
    /// SNI and Host.
    pub host: String,
    /// An explicit proxy to CONNECT through.
    pub proxy: Option<SocketAddr>,
    /// CONNECT to `host` and the port rather than to the address (a proxy that resolves the name
    /// itself, as a browser's proxy does).
    pub connect_by_name: bool,
    h1: Arc<ClientConfig>,
    h2: Arc<ClientConfig>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("addr", &self.addr)
            .field("proxy", &self.proxy)
            .finish()
    }
}

/// A connection's request sender.
#[allow(missing_debug_implementations)]
pub enum Sender {
    /// HTTP/1.1.
    H1(hyper::client::conn::http1::SendRequest<Body>),
    /// HTTP/2.
    H2(hyper::client::conn::http2::SendRequest<Body>),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Target {
    /// A target trusting the CA certificates in `ca_pem`.
    pub fn new(
        addr: SocketAddr,
        host: &str,
        proxy: Option<SocketAddr>,
        ca_pem: &std::path::Path,
    ) -> Result<Self> {
        use rustls_pki_types::pem::PemObject as _;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_file_iter(ca_pem)
            .with_context(|| format!("{}", ca_pem.display()))?
        {
            roots.add(c?)?;
        }
        let roots = Arc::new(roots);
        let cfg = |alpn: &[&[u8]]| -> Result<Arc<ClientConfig>> {
            let mut c = ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
            c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(Arc::new(c))
        };
        Ok(Self {
            addr,
            host: host.to_owned(),
            proxy,
            connect_by_name: false,
            h1: cfg(&[b"http/1.1"])?,
            h2: cfg(&[b"h2"])?,
        })
    }

    async fn tcp(&self) -> Result<TcpStream> {
        let Some(proxy) = self.proxy else {
            let s = TcpStream::connect(self.addr).await?;
            s.set_nodelay(true)?;
            return Ok(s);
        };
        let mut s = TcpStream::connect(proxy).await?;
        s.set_nodelay(true)?;
        // CONNECT to the address (the test name is not in DNS; the proxy learns it from SNI)
        // unless the proxy resolves the name itself.
        let hostport = match self.connect_by_name {
            true => format!("{}:{}", self.host, self.addr.port()),
            false => self.addr.to_string(),
        };
        s.write_all(format!("CONNECT {hostport} HTTP/1.1\r\nHost: {hostport}\r\n\r\n").as_bytes())
            .await?;
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut b).await? == 0 {
                bail!("proxy closed during CONNECT");
            }
            head.push(b[0]);
            if head.len() > 8192 {
                bail!("CONNECT answer too long");
            }
        }
        let line = String::from_utf8_lossy(&head);
        if !line.starts_with("HTTP/1.1 200") && !line.starts_with("HTTP/1.0 200") {
            bail!("CONNECT refused: {}", line.lines().next().unwrap_or(""));
        }
        Ok(s)
    }

    /// Opens a TLS connection speaking `h2` or HTTP/1.1.
    pub async fn connect(&self, h2: bool) -> Result<Sender> {
        let tcp = self.tcp().await?;
        let cfg = if h2 { self.h2.clone() } else { self.h1.clone() };
        let name = rustls_pki_types::ServerName::try_from(self.host.clone())?;
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await?;
        let io: Box<dyn Io> = Box::new(tls);
        let io = TokioIo::new(io);
        if h2 {
            let (s, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .initial_stream_window_size(4 * 1024 * 1024)
                .initial_connection_window_size(8 * 1024 * 1024)
                .handshake(io)
                .await?;
            tokio::spawn(conn);
            Ok(Sender::H2(s))
        } else {
            let (s, conn) = hyper::client::conn::http1::Builder::new()
                .handshake(io)
                .await?;
            tokio::spawn(conn);
            Ok(Sender::H1(s))
        }
    }

    fn request(&self, method: &str, path: &str, body: Body, h2: bool) -> Result<Request<Body>> {
        let uri = if h2 {
            format!("https://{}:{}{path}", self.host, self.addr.port())
        } else {
            path.to_owned()
        };
        let mut b = Request::builder().method(method).uri(uri);
        if !h2 {
            b = b.header(header::HOST, format!("{}:{}", self.host, self.addr.port()));
        }
        Ok(b.body(body)?)
    }
}

impl Sender {
    /// Sends a request and reads the whole response body; returns its length.
    pub async fn fetch(&mut self, t: &Target, method: &str, path: &str, body: Body) -> Result<u64> {
        let h2 = matches!(self, Sender::H2(_));
        let req = t.request(method, path, body, h2)?;
        let resp = match self {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
        };
        let status = resp.status();
        let mut body = resp.into_body();
        let mut n = 0u64;
        while let Some(f) = body.frame().await {
            if let Some(d) = f?.data_ref() {
                n += d.len() as u64;
            }
        }
        if !status.is_success() {
            bail!("{method} {path}: {status}");
        }
        Ok(n)
    }

    fn clone_h2(&self) -> Option<Sender> {
        match self {
            Sender::H2(s) => Some(Sender::H2(s.clone())),
            Sender::H1(_) => None,
        }
    }
}

/// CPU seconds (user + system) of `root` and all its descendants.
pub fn tree_cpu(root: u32) -> f64 {
    let tick = 100.0; // USER_HZ on Linux
    let mut total = 0u64;
    for pid in tree(root) {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            && let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..])
        {
            let f: Vec<&str> = rest.split_whitespace().collect();
            // After the command: state(0) ppid(1) ... utime(11) stime(12)
            let ut: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
            let st: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
            total += ut + st;
        }
    }
    total as f64 / tick
}

/// CPU seconds (user + system) used by every process that ever ran in cgroup directory `dir`
/// (`cpu.stat` `usage_usec`).
pub fn cgroup_cpu(dir: &std::path::Path) -> Option<f64> {
    let stat = std::fs::read_to_string(dir.join("cpu.stat")).ok()?;
    let usec: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))?
        .trim()
        .parse()
        .ok()?;
    Some(usec as f64 / 1e6)
}

/// Peak RSS (VmHWM, KiB) summed over the process tree.
pub fn tree_hwm_kib(root: u32) -> u64 {
    tree_status_kib(root, "VmHWM:")
}

/// RSS (VmRSS, KiB) summed over the process tree.
pub fn tree_rss_kib(root: u32) -> u64 {
    tree_status_kib(root, "VmRSS:")
}

/// Starts the tree's peak RSS over from its current RSS (`clear_refs` 5; as root), so that a
/// start-up peak does not count as one under load.
pub fn tree_reset_hwm(root: u32) {
    for pid in tree(root) {
        let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    }
}

fn tree_status_kib(root: u32, field: &str) -> u64 {
    tree(root)
        .into_iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .sum()
}

fn tree(root: u32) -> Vec<u32> {
    let mut parents = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                && let Some(ppid) = stat
                    .rfind(')')
                    .and_then(|i| stat[i + 2..].split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u32>().ok())
            {
                parents.push((pid, ppid));
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

/// Keep-alive requests per second for `secs`: HTTP/1.1 over `conns` connections, or HTTP/2 with
/// `streams` concurrent streams on one connection.
pub async fn keepalive(
    t: &Target,
    h2: bool,
    conns: usize,
    streams: usize,
    secs: f64,
    path: &str,
) -> Result<f64> {
    let mut senders = Vec::new();
    if h2 {
        let s = t.connect(true).await?;
        for _ in 0..streams {
            senders.push(s.clone_h2().ok_or_else(|| anyhow!("not h2"))?);
        }
    } else {
        for _ in 0..conns {
            senders.push(t.connect(false).await?);
        }
    }
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for mut s in senders {
        let (t, done, stop, path) = (t.clone(), done.clone(), stop.clone(), path.to_owned());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                s.fetch(&t, "GET", &path, empty()).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed_at_stop = start.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    for task in tasks {
        task.await??;
    }
    Ok(n as f64 / elapsed_at_stop)
}

/// New TLS connections per second (one request each), `conc` at a time.
pub async fn new_connections(t: &Target, conc: usize, secs: f64, path: &str) -> Result<(f64, u64)> {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (t, done, stop, path) = (t.clone(), done.clone(), stop.clone(), path.to_owned());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut s = t.connect(false).await?;
                s.fetch(&t, "GET", &path, empty()).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    for task in tasks {
        task.await??;
    }
    Ok((n as f64 / elapsed, n))
}

/// Downloads `path` `times` times on a warm connection (HTTP/2 when `h2`); the median MB/s
/// (10^6 bytes).
pub async fn download(t: &Target, h2: bool, path: &str, warm: &str, times: usize) -> Result<f64> {
    let mut s = t.connect(h2).await?;
    s.fetch(t, "GET", warm, empty()).await?;
    let mut rates = Vec::with_capacity(times);
    for _ in 0..times.max(1) {
        let start = Instant::now();
        let n = s.fetch(t, "GET", path, empty()).await?;
        rates.push(n as f64 / 1e6 / start.elapsed().as_secs_f64());
    }
    Ok(middle(rates))
}

/// Uploads `size` bytes of the test pattern with PUT to `path` on a warm connection (HTTP/2 when
/// `h2`), `times` times; the median MB/s.
pub async fn upload(
    t: &Target,
    h2: bool,
    path: &str,
    size: u64,
    warm: &str,
    times: usize,
) -> Result<f64> {
    let mut s = t.connect(h2).await?;
    s.fetch(t, "GET", warm, empty()).await?;
    let mut rates = Vec::with_capacity(times);
    for _ in 0..times.max(1) {
        let body = StreamBody::new(crate::origin::pattern_stream(size)).boxed();
        let start = Instant::now();
        s.fetch(t, "PUT", path, body).await?;
        rates.push(size as f64 / 1e6 / start.elapsed().as_secs_f64());
    }
    Ok(middle(rates))
}

/// The median of a few rates.
fn middle(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Open-loop requests at `rate` per second for `secs` over a few keep-alive connections; the
/// latency of each, from when it is sent to the end of its response, in milliseconds, sorted.
pub async fn latency(t: &Target, rate: f64, secs: f64, path: &str) -> Result<Vec<f64>> {
    let mut all = latency_alternating(std::slice::from_ref(t), rate, secs, path).await?;
    Ok(all.pop().unwrap_or_default())
}

/// Open-loop requests at `rate` per second in all, taking `targets` in turn (each round of `n`
/// requests gives each target one, in an order shuffled per round, so that no target always
/// follows the same other one and inherits what it left in the caches), for `secs` per target,
/// each target over a few keep-alive connections of its own; per target, the latency of each
/// request in milliseconds, sorted. Taken in turn, the targets see the same machine: its state
/// drifts over seconds (this one's CPU cost per request doubled and halved again between runs a
/// minute apart), which measured one after the other they would not share.
pub async fn latency_alternating(
    targets: &[Target],
    rate: f64,
    secs: f64,
    path: &str,
) -> Result<Vec<Vec<f64>>> {
    type Pool = Arc<(
        tokio::sync::mpsc::Sender<Sender>,
        tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Sender>>,
    )>;
    let mut pools: Vec<Pool> = Vec::with_capacity(targets.len());
    for t in targets {
        let (tx, rx) = tokio::sync::mpsc::channel::<Sender>(8);
        for _ in 0..4 {
            tx.send(t.connect(false).await?)
                .await
                .map_err(|_| anyhow!("pool"))?;
        }
        pools.push(Arc::new((tx, tokio::sync::Mutex::new(rx))));
    }
    let n = targets.len().max(1);
    let total = (rate * secs) as usize * n;
    let period = Duration::from_secs_f64(1.0 / rate);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total);
    // A fixed seed: every run takes the same orders.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut order: Vec<usize> = (0..n).collect();
    for i in 0..total {
        if i % n == 0 {
            // Fisher-Yates, xorshift64 for the draws.
            for j in (1..n).rev() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                order.swap(j, (seed % (j as u64 + 1)) as usize);
            }
        }
        let k = order[i % n];
        let at = start + period * i as u32;
        tokio::time::sleep_until(at).await;
        let (t, pool, path) = (targets[k].clone(), pools[k].clone(), path.to_owned());
        tasks.push((
            k,
            tokio::spawn(async move {
                let mut s = pool
                    .1
                    .lock()
                    .await
                    .recv()
                    .await
                    .ok_or_else(|| anyhow!("pool closed"))?;
                // From the moment the request is sent: the timer's granularity stays out of it.
                let sent = Instant::now();
                s.fetch(&t, "GET", &path, empty()).await?;
                let ms = sent.elapsed().as_secs_f64() * 1000.0;
                pool.0.send(s).await.map_err(|_| anyhow!("pool"))?;
                anyhow::Ok(ms)
            }),
        ));
    }
    let mut out = vec![Vec::with_capacity(total / n); n];
    for (k, task) in tasks {
        out[k].push(task.await??);
    }
    for v in &mut out {
        v.sort_by(|a, b| a.total_cmp(b));
    }
    Ok(out)
}

/// The `q` quantile of sorted values.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
