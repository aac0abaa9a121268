//! Support code for Sluice's end-to-end tests and benchmarks: cgroups that remove themselves,
//! running a command inside a cgroup (optionally as another user), small line servers, and the
//! paths of the workspace's built binaries.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

pub mod browser;
pub mod bundle_server;
pub mod demo_app;
pub mod fake_collector;
pub mod icap;
pub mod idp;
pub mod loadgen;
pub mod netns;
pub mod origin;
pub mod portal;
pub mod saas;

const PATTERN_BLOCK: usize = 64 * 1024;

fn pattern_block() -> &'static [u8] {
    static BLOCK: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BLOCK.get_or_init(|| {
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        (0..PATTERN_BLOCK)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    })
}

/// Fills `buf` with the deterministic test stream starting at byte `offset`: a fixed pseudo-random
/// 64 KiB block whose first 8 bytes are replaced by the block's index, so reordered, repeated or
/// lost blocks change the hash.
pub fn pattern(offset: u64, buf: &mut [u8]) {
    let block = pattern_block();
    let mut pos = 0usize;
    while pos < buf.len() {
        let abs = offset + pos as u64;
        let index = abs / PATTERN_BLOCK as u64;
        let within = (abs % PATTERN_BLOCK as u64) as usize;
        let n = (PATTERN_BLOCK - within).min(buf.len() - pos);
        let dst = &mut buf[pos..pos + n];
        dst.copy_from_slice(&block[within..within + n]);
        let idx = index.to_be_bytes();
        for (i, b) in idx.iter().enumerate() {
            if i >= within && i < within + n {
                dst[i - within] = *b;
            }
        }
        pos += n;
    }
}

/// SHA-256 (hex) of the first `n` bytes of [`pattern`].
pub fn pattern_sha256(n: u64) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < n {
        let len = ((n - off) as usize).min(buf.len());
        pattern(off, &mut buf[..len]);
        h.update(&buf[..len]);
        off += len as u64;
    }
    hex(&h.finalize())
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// `Sec-WebSocket-Accept` for a key (RFC 6455: base64(SHA-1(key + GUID))).
pub fn websocket_accept(key: &str) -> String {
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
    );
    base64(digest.as_ref())
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    sluice_policy::bundle::jws::b64(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_position_dependent_and_seekable() {
        let mut whole = vec![0u8; 3 * PATTERN_BLOCK + 100];
        pattern(0, &mut whole);
        let mut part = vec![0u8; 1000];
        pattern(PATTERN_BLOCK as u64 - 3, &mut part);
        assert_eq!(&part[..], &whole[PATTERN_BLOCK - 3..PATTERN_BLOCK + 997]);
        assert_ne!(
            &whole[..PATTERN_BLOCK],
            &whole[PATTERN_BLOCK..2 * PATTERN_BLOCK]
        );
    }

    #[test]
    fn websocket_accept_matches_rfc6455() {
        assert_eq!(
            websocket_accept("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(base64(b"ab"), "YWI=");
    }
}

/// A copy of `src` (a public certificate) at `dst` that any user may read: the agent's
/// unprivileged proxy reads the collector's CA, whose own directory is the collector's alone.
pub fn readable_copy(src: &Path, dst: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::copy(src, dst)?;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o644))?;
    Ok(dst.to_owned())
}

/// Fails the calling test clearly when not run as root: root-only tests must never pass by
/// skipping.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (eBPF, cgroups); run it through `cargo xtask test`"
    );
}

/// The cgroup v2 mount point.
pub fn cgroup_mount() -> PathBuf {
    sluice::steer::cgroup::v2_mount().expect("a cgroup v2 hierarchy is mounted")
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A cgroup v2 created for one test and removed (with anything left inside killed) on drop.
#[derive(Debug)]
pub struct TestCgroup {
    /// Absolute directory.
    pub dir: PathBuf,
    /// Path relative to the v2 mount, as the agent's config takes it.
    pub rel: String,
}

impl TestCgroup {
    /// Creates `sluice-test-<pid>-<n>-<tag>` under the v2 root.
    pub fn new(tag: &str) -> Self {
        let rel = format!(
            "sluice-test-{}-{}-{tag}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let dir = cgroup_mount().join(&rel);
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        Self { dir, rel }
    }

    /// A child cgroup (created), relative path and absolute directory.
    pub fn child(&self, name: &str) -> (String, PathBuf) {
        let dir = self.dir.join(name);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        (format!("{}/{name}", self.rel), dir)
    }

    /// The cgroup v2 id.
    pub fn id(&self) -> u64 {
        sluice::steer::cgroup::id(&self.dir).expect("cgroup id")
    }
}

fn remove_tree(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&e.path());
        }
    }
    // Kill whatever a failed test left inside, then wait until the cgroup empties.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        let pids: Vec<i32> = procs
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if pids.is_empty() || Instant::now() > deadline {
            break;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = fs::remove_dir(dir);
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Links an agent left pinned for this cgroup (one killed by the test) go first.
        if let Ok(id) = sluice::steer::cgroup::id(&self.dir) {
            let pins = Path::new(sluice::steer::pin::BPFFS)
                .join("sluice")
                .join(format!("cgroup-{id}"));
            sluice::steer::pin::remove(&sluice::steer::pin::entries(&pins));
            let _ = fs::remove_dir(&pins);
        }
        remove_tree(&self.dir);
    }
}

/// The directory holding the workspace's built binaries (`target/debug` or `target/release`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary; fails with a hint when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace binaries first (`cargo build --workspace --bins`, which `cargo xtask test` does)",
        p.display()
    );
    p
}

/// A temporary directory removed on drop, so a failing test cleans up too.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates (afresh) `sluice-<tag>-<pid>` under the system temporary directory.
    pub fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("sluice-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap_or_else(|e| panic!("creating {}: {e}", d.display()));
        Self(d)
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A copy of a binary that any user can execute; removed on drop.
#[derive(Debug)]
pub struct TempBin {
    /// The executable.
    pub path: PathBuf,
    dir: PathBuf,
}

impl Drop for TempBin {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Copies a binary into a fresh 0755 directory under /tmp, so another user can execute it even when
/// the checkout's directories are private.
pub fn world_executable_copy(src: &Path) -> TempBin {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = std::env::temp_dir().join(format!(
        "sluice-e2e-bin-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&dir).expect("temp dir");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod dir");
    let dst = dir.join(src.file_name().expect("file name"));
    fs::copy(src, &dst).expect("copy binary");
    fs::set_permissions(&dst, fs::Permissions::from_mode(0o755)).expect("chmod binary");
    TempBin { path: dst, dir }
}

/// How to run a command inside a cgroup.
#[derive(Debug, Clone, Default)]
pub struct InCgroup {
    /// The cgroup directory to enter before exec (None: stay where the test runs).
    pub cgroup: Option<PathBuf>,
    /// Run as this uid/gid (through `setpriv`), after entering the cgroup as root.
    pub user: Option<(u32, u32)>,
}

impl InCgroup {
    /// Inside `dir`.
    pub fn at(dir: &Path) -> Self {
        Self {
            cgroup: Some(dir.to_path_buf()),
            user: None,
        }
    }

    /// Builds the command: `sh` moves itself into the cgroup, then execs the program, so the
    /// program is inside from its first instruction.
    pub fn command(&self, program: &Path, args: &[String]) -> Command {
        let mut cmd = Command::new("sh");
        let mut script = String::new();
        if let Some(cg) = &self.cgroup {
            script.push_str(&format!(
                "echo $$ > '{}/cgroup.procs' || exit 97; ",
                cg.display()
            ));
        }
        script.push_str("exec ");
        if let Some((uid, gid)) = self.user {
            script.push_str(&format!(
                "setpriv --reuid={uid} --regid={gid} --clear-groups -- "
            ));
        }
        script.push_str("\"$@\"");
        cmd.arg("-c").arg(script).arg("sh").arg(program).args(args);
        cmd
    }

    /// Runs to completion and returns stdout; fails with stderr on a non-zero exit.
    pub fn run(&self, program: &Path, args: &[String]) -> Result<String> {
        let out = self
            .command(program, args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", program.display()))?;
        if !out.status.success() {
            bail!(
                "{} {:?} exited with {}: {}{}",
                program.display(),
                args,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// A TCP server on `addr` answering every connection with one line computed from its peer
/// address, on its own threads; stops on drop.
pub struct LineServer {
    /// The bound address.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl std::fmt::Debug for LineServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LineServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl LineServer {
    /// Binds `addr` (port 0 for any) and serves `reply(peer)` to each connection.
    pub fn start<F>(addr: SocketAddr, reply: F) -> Result<Self>
    where
        F: Fn(SocketAddr) -> String + Send + Sync + 'static,
    {
        let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        Self::serve(listener, reply)
    }

    /// Serves on an already bound listener.
    pub fn serve<F>(listener: TcpListener, reply: F) -> Result<Self>
    where
        F: Fn(SocketAddr) -> String + Send + Sync + 'static,
    {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let reply = Arc::new(reply);
        let stop2 = stop.clone();
        let handle = thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, peer)) => {
                        let reply = reply.clone();
                        thread::spawn(move || {
                            let _ = s.set_nonblocking(false);
                            let line = reply(peer);
                            let _ = s.write_all(format!("{line}\n").as_bytes());
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(2))
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(Self {
            addr,
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for LineServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Binds the same free port on 127.0.0.1 and ::1 (the proxy's two listeners).
pub fn dual_stack_listeners() -> Result<(TcpListener, TcpListener)> {
    for _ in 0..50 {
        let v4 = TcpListener::bind("127.0.0.1:0")?;
        let port = v4.local_addr()?.port();
        if let Ok(v6) = TcpListener::bind(("::1", port))
            && hand_out(port)
        {
            return Ok((v4, v6));
        }
    }
    Err(anyhow!("no port free on both 127.0.0.1 and ::1"))
}

/// Reads one line from `addr` with a deadline (direct, from the test process).
pub fn read_line(addr: SocketAddr) -> Result<String> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line.trim_end().to_owned())
}

/// Waits until `f` returns true or the deadline passes.
pub fn wait_until(deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// A running `sluice run` process, killed on drop if still running.
#[derive(Debug)]
pub struct Agent {
    /// The child.
    pub child: Child,
    /// Its admin address.
    pub admin: SocketAddr,
    /// Where its log goes.
    pub log: PathBuf,
    /// The network namespace it runs in (none: the test's).
    pub netns: Option<String>,
}

impl Agent {
    /// Starts `sluice run` with `config_text`, whose `admin.listen` and `proxy.port` may ask for
    /// any port (`127.0.0.1:0`, `0`): the ports are the system's and stay bound by the agent;
    /// the admin address is read from `<state_dir>/admin.addr` once the agent writes it. Waits
    /// until `/readyz` answers 200.
    pub fn launch(config_text: &str, dir: &Path) -> Result<Self> {
        Self::launch_in(config_text, dir, None)
    }

    /// As [`Agent::launch`], run inside network namespace `netns` (`ip netns exec`); the admin
    /// endpoint is then reached from a thread that enters it.
    pub fn launch_in(config_text: &str, dir: &Path, netns: Option<&str>) -> Result<Self> {
        let cfg = sluice::config::Config::parse(config_text)
            .map_err(|e| anyhow!("the test's agent config: {e}"))?;
        let announced = cfg.state_dir.join("admin.addr");
        let _ = fs::remove_file(&announced);
        let placeholder = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut agent = Self::spawn(config_text, placeholder, dir, netns)?;
        let found = wait_until(Duration::from_secs(20), || {
            fs::read_to_string(&announced)
                .ok()
                .and_then(|s| s.trim().parse::<SocketAddr>().ok())
                .is_some_and(|a| {
                    agent.admin = a;
                    true
                })
        });
        if !found {
            let _ = agent.child.kill();
            let _ = agent.child.wait();
            bail!(
                "the agent did not write {}: {}",
                announced.display(),
                fs::read_to_string(&agent.log).unwrap_or_default()
            );
        }
        agent.wait_ready()?;
        Ok(agent)
    }

    /// The port the agent's proxy listens on, from `/status`.
    pub fn proxy_port(&self) -> Result<u16> {
        let st = self.status()?;
        st["proxy"]["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| anyhow!("no proxy port in /status: {st}"))
    }

    fn spawn(
        config_text: &str,
        admin: SocketAddr,
        dir: &Path,
        netns: Option<&str>,
    ) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let cfg = dir.join("agent.toml");
        fs::write(&cfg, config_text)?;
        let log = dir.join("agent.log");
        // The agent needs its interception CA; create it once per state directory.
        let st = Command::new(bin("sluice"))
            .args(["ca", "init", "--config"])
            .arg(&cfg)
            .output()?;
        if !st.status.success() && !String::from_utf8_lossy(&st.stderr).contains("already exists") {
            bail!(
                "sluice ca init failed: {}",
                String::from_utf8_lossy(&st.stderr)
            );
        }
        let mut cmd = match netns {
            // nsenter changes the network namespace only (`ip netns exec` would remount /sys
            // and hide the cgroup mounts) and execs the agent: the child is the agent itself.
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}"))
                    .arg("--")
                    .arg(bin("sluice"));
                c
            }
            None => Command::new(bin("sluice")),
        };
        let child = cmd
            .args(["run", "--config"])
            .arg(&cfg)
            .env("SLUICE_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()?;
        Ok(Agent {
            child,
            admin,
            log,
            netns: netns.map(str::to_owned),
        })
    }

    fn wait_ready(&mut self) -> Result<()> {
        let ready = wait_until(Duration::from_secs(20), || {
            self.http_get("/readyz").is_ok_and(|(code, _)| code == 200)
        });
        if !ready {
            let _ = self.child.kill();
            let _ = self.child.wait();
            bail!(
                "agent did not become ready: {}",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// GET on the admin endpoint: (status code, body).
    pub fn http_get(&self, path: &str) -> Result<(u16, String)> {
        use std::io::Read as _;
        let mut s = match &self.netns {
            None => TcpStream::connect_timeout(&self.admin, Duration::from_secs(2))?,
            Some(ns) => {
                let (ns, admin) = (PathBuf::from("/run/netns").join(ns), self.admin);
                thread::spawn(move || -> Result<TcpStream> {
                    nix::sched::setns(fs::File::open(ns)?, nix::sched::CloneFlags::CLONE_NEWNET)?;
                    Ok(TcpStream::connect_timeout(&admin, Duration::from_secs(2))?)
                })
                .join()
                .map_err(|_| anyhow!("the admin connection's thread panicked"))??
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let code = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow!("bad response: {resp}"))?;
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((code, body))
    }

    /// The `/status` document.
    pub fn status(&self) -> Result<serde_json::Value> {
        let (_, body) = self.http_get("/status")?;
        Ok(serde_json::from_str(&body)?)
    }

    /// Sends a signal and waits (bounded) for the exit.
    pub fn signal_and_wait(
        &mut self,
        sig: nix::sys::signal::Signal,
    ) -> Result<std::process::ExitStatus> {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig)?;
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > end {
                bail!("agent did not exit after {sig}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // A clean stop removes the agent's pinned links; a kill would leave them (fail mode).
        if self.child.try_wait().ok().flatten().is_none()
            && self
                .signal_and_wait(nix::sys::signal::Signal::SIGTERM)
                .is_err()
        {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A free loopback TCP port for an admin endpoint.
pub fn free_port() -> u16 {
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        if hand_out(port) {
            return port;
        }
    }
    panic!("no free port that this process has not handed out already");
}

/// Records `port` as handed out to a test; false when it was already. A port is released by
/// its probe listener before the test binds it, and the kernel may give the same port to the
/// next probe: two parts of one test (an admin endpoint and a proxy listener, say) would then
/// collide.
fn hand_out(port: u16) -> bool {
    static HANDED_OUT: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<u16>>> =
        std::sync::OnceLock::new();
    HANDED_OUT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(port)
}

/// The programs `bpftool` lists as attached to a cgroup (names).
pub fn attached_programs(dir: &Path) -> Vec<String> {
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(dir)
        .output()
        .expect("bpftool runs (installed by cargo xtask setup)");
    assert!(
        out.status.success(),
        "bpftool failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_str(text.trim()).expect("bpftool JSON");
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// What curl got: the status, the response head as text, and the body.
#[derive(Debug)]
pub struct Got {
    /// Status code.
    pub status: u16,
    /// The response head (status line and fields), as curl wrote it.
    pub headers: String,
    /// The body.
    pub body: Vec<u8>,
}

impl Got {
    /// A field of the response head, by name (any case).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// An origin source for tests of the proxy without kernel steering: every accepted connection
/// was headed to `dst`, opened by a process named `comm`.
#[derive(Debug, Clone)]
pub struct FixedOrigin {
    /// The original destination.
    pub dst: SocketAddr,
    /// The process's command name.
    pub comm: String,
}

impl sluice::proxy::OriginSource for FixedOrigin {
    fn lookup(&self, _peer: SocketAddr, _local: SocketAddr) -> Option<sluice::steer::OriginRecord> {
        Some(sluice::steer::OriginRecord {
            dst: self.dst,
            ipv6_socket: false,
            pid: 1,
            tgid: 1,
            uid: 0,
            gid: 0,
            comm: self.comm.clone(),
            cgroup_id: 0,
            cookie: 0,
            age: Duration::ZERO,
            process: sluice::steer::ProcessInfo::default(),
            lan_client: None,
        })
    }
}

/// The shared state of an in-process proxy in front of `origin` (a [`FixedOrigin`] seen as
/// `comm`): leaves from the CA in `ca_dir`, upstream trust in `origin_ca` (PEM) alone.
#[allow(clippy::too_many_arguments)]
pub fn fixed_proxy(
    origin: SocketAddr,
    comm: &str,
    ca_dir: &Path,
    origin_ca: &Path,
    catalog: sluice::proxy::catalog::Catalog,
    hooks: Arc<dyn sluice::proxy::hooks::Hooks>,
    reporter: Arc<dyn sluice::proxy::record::Reporter>,
    settings: sluice::config::ProxySettings,
    stats: Arc<sluice::proxy::ProxyStats>,
) -> Result<Arc<sluice::proxy::Shared>> {
    use sluice::proxy::{
        ca::{Ca, CacheLimits, LeafCache},
        upstream::Upstream,
    };
    let ca = Ca::load_dir(ca_dir)?;
    Ok(Arc::new(sluice::proxy::Shared::new(
        Arc::new(FixedOrigin {
            dst: origin,
            comm: comm.to_owned(),
        }),
        stats,
        Arc::new(catalog),
        Arc::new(LeafCache::new(
            Arc::new(ca),
            CacheLimits::default(),
            vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        )),
        Arc::new(Upstream::new(
            sluice::trust::root_store(false, false, &[origin_ca.to_owned()])?,
            0,
            Duration::from_secs(5),
            Duration::from_secs(5),
            8,
        )),
        hooks,
        reporter,
        settings,
        0,
    )))
}
