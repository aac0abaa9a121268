//! A real ICAP (RFC 3507) malware scanner for the tests of Sluice's upload and download scanning:
//! Debian's c-icap with its `virus_scan` service over a clamd of the test's own.
//!
//! Nothing of the host's is used but the binaries (packages `c-icap`, `libc-icap-mod-virus-scan`,
//! `clamav-daemon`, which `cargo xtask setup` installs): the official ClamAV databases are not
//! reachable from the test machines (no freshclam), so the scanner writes a signature database of
//! its own that detects the EICAR test file, and both daemons run in the foreground with configs,
//! sockets, pid files, logs and temporary files inside one temporary directory, on a free loopback
//! port. Neither needs root.

use std::{
    fmt::Write as _,
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::{net::UnixStream, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use sha2::{Digest as _, Sha256};

use crate::{TempDir, free_port, wait_until};

/// The standard EICAR anti-virus test file (68 bytes), which every scanner detects and which is
/// harmless.
pub const EICAR: &[u8] = br"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

/// The name of the body signature (EICAR anywhere in a scanned object). clamd reports it with
/// `.UNOFFICIAL` appended, as for any signature not from the official databases.
pub const EICAR_BODY_SIGNATURE: &str = "Sluice.Test.EICAR.Body";

/// The name of the hash signature (an object that is exactly the EICAR file).
pub const EICAR_HASH_SIGNATURE: &str = "Sluice.Test.EICAR.Hash";

/// How long each daemon may take to answer once started.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the daemons took to become ready, for the tests to print.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// From spawning clamd to its socket answering `PING` with `PONG` (database loaded).
    pub clamd_ready: Duration,
    /// From spawning c-icap to `virus_scan` answering `OPTIONS` with 200.
    pub icap_ready: Duration,
}

/// A running clamd and c-icap, killed (and their directory removed) on drop.
#[derive(Debug)]
pub struct Scanner {
    clamd: Option<Child>,
    icap: Option<Child>,
    addr: SocketAddr,
    timings: Timings,
    // Last, so the daemons are dead before their directory goes.
    dir: TempDir,
}

impl Scanner {
    /// Writes the database and configs, starts clamd and then c-icap, and waits until each
    /// answers.
    pub fn start() -> Result<Self> {
        // TempDir's name has only the pid: a handed-out port makes two scanners of one test
        // process distinct.
        let dir = TempDir::new(&format!("icap-{}", free_port()));
        let port = free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        for sub in ["db", "clamd-tmp", "icap-tmp"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        write_database(&dir.join("db"))?;
        let clamd_socket = dir.join("clamd.sock");
        fs::write(dir.join("clamd.conf"), clamd_conf(&dir))?;
        fs::write(dir.join("c-icap.conf"), icap_conf(&dir, port)?)?;

        let mut scanner = Self {
            clamd: None,
            icap: None,
            addr,
            timings: Timings {
                clamd_ready: Duration::ZERO,
                icap_ready: Duration::ZERO,
            },
            dir,
        };

        let started = Instant::now();
        scanner.clamd = Some(spawn(
            Command::new(program("clamd", &["/usr/sbin/clamd"])?)
                .arg("--config-file")
                .arg(scanner.dir.join("clamd.conf")),
            &scanner.dir.join("clamd.out"),
        )?);
        let clamd = scanner.clamd.as_mut().context("clamd")?;
        if !wait_ready(clamd, || clamd_ping(&clamd_socket)).with_context(|| {
            format!(
                "clamd:\n{}",
                tail(&scanner.dir, &["clamd.out", "clamd.log"])
            )
        })? {
            bail!(
                "clamd did not answer PING within {READY_TIMEOUT:?}:\n{}",
                tail(&scanner.dir, &["clamd.out", "clamd.log"])
            );
        }
        scanner.timings.clamd_ready = started.elapsed();

        let started = Instant::now();
        scanner.icap = Some(spawn(
            Command::new(program("c-icap", &["/usr/bin/c-icap"])?)
                .args(["-N", "-D", "-f"])
                .arg(scanner.dir.join("c-icap.conf")),
            &scanner.dir.join("c-icap.out"),
        )?);
        let icap = scanner.icap.as_mut().context("c-icap")?;
        if !wait_ready(icap, || icap_options(addr, "virus_scan").is_ok()).with_context(|| {
            format!(
                "c-icap:\n{}",
                tail(&scanner.dir, &["c-icap.out", "server.log"])
            )
        })? {
            bail!(
                "c-icap did not answer OPTIONS within {READY_TIMEOUT:?}:\n{}",
                tail(&scanner.dir, &["c-icap.out", "server.log"])
            );
        }
        scanner.timings.icap_ready = started.elapsed();
        Ok(scanner)
    }

    /// The ICAP listener (loopback).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URI of a service: `virus_scan` (the anti-virus, REQMOD and RESPMOD) or `echo` (c-icap's
    /// built-in service that returns the object unmodified).
    pub fn service_uri(&self, name: &str) -> String {
        format!("icap://{}/{name}", self.addr)
    }

    /// How long the daemons took to start.
    pub fn timings(&self) -> Timings {
        self.timings
    }

    /// The scanner's directory (configs, logs, the signature database).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The clamd socket c-icap scans through.
    pub fn clamd_socket(&self) -> PathBuf {
        self.dir.join("clamd.sock")
    }

    /// Kills c-icap (and its worker processes), leaving clamd: "the scanner is down" for the
    /// ICAP client. Connections to [`Self::addr`] are refused afterwards.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.icap.take() {
            kill_group(&mut child);
        }
    }

    /// The end of c-icap's and clamd's logs, for failure messages.
    pub fn logs(&self) -> String {
        tail(
            &self.dir,
            &[
                "c-icap.out",
                "server.log",
                "access.log",
                "clamd.out",
                "clamd.log",
            ],
        )
    }
}

impl Drop for Scanner {
    fn drop(&mut self) {
        self.stop();
        if let Some(mut child) = self.clamd.take() {
            kill_group(&mut child);
        }
    }
}

/// Sends `OPTIONS` for `service` and returns the response head when its status is 200.
pub fn icap_options(addr: SocketAddr, service: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "OPTIONS icap://{addr}/{service} ICAP/1.0\r\nHost: {addr}\r\nEncapsulated: null-body=0\r\n\r\n"
    )?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            bail!("OPTIONS: connection closed after {} bytes", head.len());
        }
        head.push(byte[0]);
        if head.len() > 64 * 1024 {
            bail!("OPTIONS: response head too long");
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    if !head.starts_with("ICAP/1.0 200") {
        bail!("OPTIONS {service}: {head}");
    }
    Ok(head)
}

/// clamd's `zPING` → `PONG` on its socket.
fn clamd_ping(socket: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut reply = Vec::new();
    s.write_all(b"zPING\0").is_ok() && s.read_to_end(&mut reply).is_ok() && reply == b"PONG\0"
}

/// A body signature (`.ndb`: EICAR at any offset of any file type) and a hash signature (`.hsb`:
/// sha256 and size of the exact file; `.hdb` would be md5, which no crate here computes).
fn write_database(db: &Path) -> Result<()> {
    let sha = Sha256::digest(EICAR);
    fs::write(
        db.join("sluice-test.hsb"),
        format!(
            "{}:{}:{EICAR_HASH_SIGNATURE}\n",
            hex::encode(sha),
            EICAR.len()
        ),
    )?;
    fs::write(
        db.join("sluice-test.ndb"),
        format!("{EICAR_BODY_SIGNATURE}:0:*:{}\n", hex::encode(EICAR)),
    )?;
    Ok(())
}

/// clamd's config: no `User` (it keeps the caller's, root or not), its own socket, database and
/// temporary directory; no TCP listener.
fn clamd_conf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "DatabaseDirectory {d}/db\n\
         LocalSocket {d}/clamd.sock\n\
         Foreground yes\n\
         TemporaryDirectory {d}/clamd-tmp\n\
         PidFile {d}/clamd.pid\n\
         LogFile {d}/clamd.log\n\
         LogTime yes\n"
    )
}

/// c-icap's config: loopback and `port`, a few threads, everything written inside `dir`, the
/// `echo` service and `virus_scan` over the clamd engine (`clamd_mod`) on the test's clamd.
fn icap_conf(dir: &Path, port: u16) -> Result<String> {
    let d = dir.display();
    let modules = modules_dir()?;
    let modules = modules.display();
    let mut conf = String::new();
    for line in [
        format!("PidFile {d}/c-icap.pid"),
        format!("CommandsSocket {d}/c-icap.ctl"),
        "Timeout 30".into(),
        "StartServers 1".into(),
        "MaxServers 2".into(),
        "MinSpareThreads 2".into(),
        "MaxSpareThreads 8".into(),
        "ThreadsPerChild 8".into(),
        "MaxRequestsPerChild 0".into(),
        format!("Port 127.0.0.1:{port}"),
        "ServerAdmin sluice-tests@localhost".into(),
        "ServerName sluice-test-scanner".into(),
        format!("TmpDir {d}/icap-tmp"),
        "MaxMemObject 131072".into(),
        "DebugLevel 1".into(),
        "Pipelining on".into(),
        format!("ModulesDir {modules}"),
        format!("ServicesDir {modules}"),
        "TemplateDir /usr/share/c_icap/templates/".into(),
        "TemplateDefaultLanguage en".into(),
        "LoadMagicFile /etc/c-icap/c-icap.magic".into(),
        format!("ServerLog {d}/server.log"),
        format!("AccessLog {d}/access.log"),
        "Service echo srv_echo.so".into(),
        "Module common clamd_mod.so".into(),
        format!("clamd_mod.ClamdSocket {d}/clamd.sock"),
        "Service virus_scan virus_scan.so".into(),
        "virus_scan.ScanFileTypes TEXT DATA EXECUTABLE ARCHIVE GIF JPEG MSOFFICE".into(),
        // Uploads and downloads of tens of megabytes are scanned whole (the bench sends 10 MB).
        "virus_scan.MaxObjectSize 64M".into(),
        // Without these two c-icap trickles the object back while it is still being scanned
        // (its defaults differ from the package's config): a detection then comes too late to
        // replace the response, which goes out as 200 with the body cut short and no
        // X-Infection-Found. Whole objects up to the largest scanned are held back until scanned.
        "virus_scan.SendPercentData 5".into(),
        "virus_scan.StartSendPercentDataAfter 64M".into(),
        "virus_scan.DefaultEngine clamd".into(),
        "virus_scan.Allow204Responces on".into(),
    ] {
        let _ = writeln!(conf, "{line}");
    }
    Ok(conf)
}

/// Where Debian puts c-icap's modules: `/usr/lib/<multiarch triplet>/c_icap`.
fn modules_dir() -> Result<PathBuf> {
    let mut candidates = vec![PathBuf::from("/usr/lib/c_icap")];
    if let Ok(entries) = fs::read_dir("/usr/lib") {
        candidates.extend(entries.flatten().map(|e| e.path().join("c_icap")));
    }
    candidates
        .into_iter()
        .find(|d| d.join("virus_scan.so").is_file() && d.join("clamd_mod.so").is_file())
        .context(
            "c-icap's virus_scan.so and clamd_mod.so not found under /usr/lib/*/c_icap: \
             install c-icap and libc-icap-mod-virus-scan (`cargo xtask setup`)",
        )
}

/// The program at the first existing path, else `name` on `PATH`.
fn program(name: &str, paths: &[&str]) -> Result<PathBuf> {
    if let Some(p) = paths.iter().map(PathBuf::from).find(|p| p.is_file()) {
        return Ok(p);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "{name} not found: install c-icap, libc-icap-mod-virus-scan and clamav-daemon \
                 (`cargo xtask setup`)"
            )
        })
}

/// Spawns `cmd` leading its own process group (c-icap forks workers), output to `log`.
fn spawn(cmd: &mut Command, log: &Path) -> Result<Child> {
    let out = fs::File::create(log)?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))
}

/// Waits until `ready`, failing early when the child exits.
fn wait_ready(child: &mut Child, mut ready: impl FnMut() -> bool) -> Result<bool> {
    let mut exited = None;
    let ok = wait_until(READY_TIMEOUT, || {
        if ready() {
            return true;
        }
        if let Ok(Some(status)) = child.try_wait() {
            exited = Some(status);
            return true;
        }
        false
    });
    if let Some(status) = exited {
        bail!("exited before it was ready: {status}");
    }
    Ok(ok)
}

/// Kills the child's whole process group (it leads one) and reaps the child.
fn kill_group(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The last lines of each of `files` in `dir`.
fn tail(dir: &Path, files: &[&str]) -> String {
    let mut out = String::new();
    for f in files {
        let text = fs::read_to_string(dir.join(f)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(20);
        let _ = writeln!(out, "--- {f}:");
        for l in &lines[from..] {
            let _ = writeln!(out, "{l}");
        }
    }
    out
}
