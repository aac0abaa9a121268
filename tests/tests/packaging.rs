//! The Debian packages and their systemd units (`packaging/`, `cargo xtask package`):
//! `systemd-analyze verify` and `security` on the units (systemd need not be running), the
//! packaged configurations as the binaries load them, the collector's notifications to systemd
//! (`READY=1`, `WATCHDOG=1`, `STOPPING=1`), and, as root, both `.deb` files installed with dpkg
//! into a fresh Debian root, their maintainer scripts run there, then purged without a trace.
//!
//! The packages in the root-only test are made by cargo-deb from the test build (`cargo build
//! --workspace --bins`, stripped, quick compression), or taken from `$SLUICE_DEBS` (a directory
//! with the `.deb` files `cargo xtask package` made, e.g. `SLUICE_DEBS=target/debian`). The
//! Debian root is made once with mmdebstrap (variant `essential`, plus adduser) from the mirrors
//! this machine's apt uses, and cached as `target/packaging/debian-<codename>-essential.tar`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    fs,
    io::Read as _,
    os::unix::{fs::MetadataExt as _, net::UnixDatagram},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use sluice_e2e::{TempDir, bin, demo_app::workspace_root, require_root};

const UNITS: [&str; 3] = [
    "sluice-agent.service",
    "sluice-proxy.service",
    "sluice-collector.service",
];

/// `systemd-analyze security` rates an overall exposure below 5.0 "OK" or better (5.0 to 7.4 is
/// "MEDIUM").
const OK_BELOW: f64 = 5.0;

fn packaging() -> PathBuf {
    workspace_root().join("packaging")
}

fn unit_text(unit: &str) -> String {
    fs::read_to_string(packaging().join("systemd").join(unit)).unwrap()
}

fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("starting {shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

// ---------------------------------------------------------------------------------------------
// the units

#[test]
fn units_run_the_packaged_binaries_with_the_packaged_configs() {
    let exec = |unit: &str| {
        unit_text(unit)
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart=").map(str::to_owned))
            .unwrap()
    };
    assert_eq!(
        exec("sluice-agent.service"),
        "/usr/bin/sluice run --config /etc/sluice/agent.toml"
    );
    assert_eq!(
        exec("sluice-proxy.service"),
        "/usr/bin/sluice proxy --config /etc/sluice/agent.toml"
    );
    assert_eq!(
        exec("sluice-collector.service"),
        "/usr/bin/sluice-collector --config /etc/sluice/collector.toml run"
    );
    // The proxy keeps nothing: no capability, no way to gain one.
    let proxy = unit_text("sluice-proxy.service");
    for line in [
        "User=sluice",
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        "NoNewPrivileges=yes",
    ] {
        assert!(proxy.lines().any(|l| l == line), "{line} in the proxy unit");
    }
}

#[test]
fn units_pass_systemd_analyze_verify() {
    // verify wants each ExecStart= binary to exist: copies point at the built ones.
    let dir = TempDir::new("units-verify");
    let (sluice, collector) = (bin("sluice"), bin("sluice-collector"));
    let mut files = Vec::new();
    for unit in UNITS {
        let text = unit_text(unit)
            .replace(
                "/usr/bin/sluice-collector ",
                &format!("{} ", collector.display()),
            )
            .replace("/usr/bin/sluice ", &format!("{} ", sluice.display()));
        let path = dir.join(unit);
        fs::write(&path, text).unwrap();
        files.push(path);
    }
    let out = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&files));
    // Any finding (an unknown key, a bad value, a missing binary) is printed: none is expected.
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.trim().is_empty(), "systemd-analyze verify:\n{said}");
}

/// The overall exposure `systemd-analyze security --offline=yes` gives a unit file, with its
/// rating word.
fn exposure(unit: &str) -> (f64, String) {
    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(packaging().join("systemd").join(unit)));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level for"))
        .unwrap_or_else(|| panic!("no overall exposure for {unit}:\n{text}"));
    // "→ Overall exposure level for sluice-proxy.service: 1.3 OK 🙂"
    let mut words = line.rsplit(':').next().unwrap().split_whitespace();
    let figure = words.next().unwrap().parse().unwrap();
    (figure, words.next().unwrap_or_default().to_owned())
}

#[test]
fn proxy_and_collector_units_rate_ok_or_better() {
    for unit in UNITS {
        let (figure, rating) = exposure(unit);
        println!("systemd-analyze security {unit}: {figure:.1} {rating}");
        // The agent is root with capabilities by design; it is held to the same bound so that
        // a privilege added to it is a decision, with its line in the README's table.
        assert!(
            figure < OK_BELOW,
            "{unit}: exposure {figure} {rating}, want OK or better (below {OK_BELOW})"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// the packaged configurations

#[test]
fn packaged_agent_config_is_the_documented_default_with_the_units_two_changes() {
    let base_path = packaging().join("agent.toml");
    let deb_path = packaging().join("deb/agent.toml");
    for path in [&base_path, &deb_path] {
        run(Command::new(bin("sluice"))
            .args(["config", "check", "--config"])
            .arg(path));
    }
    let mut base = sluice::config::Config::load(&base_path).unwrap();
    let deb = sluice::config::Config::load(&deb_path).unwrap();
    // The proxy is sluice-proxy.service's, as the `sluice` user.
    assert!(!deb.privsep.spawn);
    assert_eq!(deb.privsep.user, "sluice");
    // The agent's cgroup is a child of its own (delegated) unit's.
    assert_eq!(
        deb.steer.agent_cgroup,
        "system.slice/sluice-agent.service/agent"
    );
    assert!(
        unit_text("sluice-agent.service")
            .lines()
            .any(|l| l == "Delegate=yes")
    );
    // Everything else is packaging/agent.toml's.
    base.privsep = deb.privsep.clone();
    base.steer.agent_cgroup = deb.steer.agent_cgroup.clone();
    assert_eq!(
        format!("{base:?}"),
        format!("{deb:?}"),
        "packaging/deb/agent.toml differs from packaging/agent.toml in more than \
         steer.agent_cgroup and [privsep]: carry the change over"
    );
}

/// The packaged collector.toml with its state in `dir` and a listener on any loopback port.
fn collector_config(dir: &Path) -> PathBuf {
    let text = fs::read_to_string(packaging().join("deb/collector.toml")).unwrap();
    for line in [
        "listen = \"127.0.0.1:8443\"",
        "state_dir = \"/var/lib/sluice-collector\"",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in collector.toml");
    }
    let text = text
        .replace("listen = \"127.0.0.1:8443\"", "listen = \"127.0.0.1:0\"")
        .replace(
            "state_dir = \"/var/lib/sluice-collector\"",
            &format!("state_dir = \"{}\"", dir.join("state").display()),
        );
    let path = dir.join("collector.toml");
    fs::write(&path, text).unwrap();
    path
}

#[test]
fn packaged_collector_config_loads() {
    let dir = TempDir::new("deb-collector-config");
    let config = collector_config(&dir);
    run(Command::new(bin("sluice-collector"))
        .arg("--config")
        .arg(&config)
        .args(["agent", "list"]));
}

// ---------------------------------------------------------------------------------------------
// the collector and systemd

/// A child killed and reaped on drop, so a failing test leaves no collector behind.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn collector_tells_systemd_ready_watchdog_and_stopping() {
    let dir = TempDir::new("collector-notify");
    let config = collector_config(&dir);
    let socket = dir.join("notify.sock");
    let rx = UnixDatagram::bind(&socket).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    // systemd would give WATCHDOG_USEC=30000000 (WatchdogSec=30); 0.4 s keeps the test short.
    let mut child = Running(
        Command::new(bin("sluice-collector"))
            .arg("--config")
            .arg(&config)
            .arg("run")
            .env("NOTIFY_SOCKET", &socket)
            .env("WATCHDOG_USEC", "400000")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut buf = [0u8; 256];
    let mut next = || -> String {
        let n = rx
            .recv(&mut buf)
            .expect("a notification from the collector");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };

    let started = Instant::now();
    let mut seen = vec![next()];
    // The first watchdog ping may come before READY=1 or after it.
    while !seen.iter().any(|s| s == "READY=1") {
        seen.push(next());
    }
    println!("READY=1 after {:?}", started.elapsed());
    // Ready means listening: the address it bound is written, and a connection is accepted.
    let addr = fs::read_to_string(dir.join("state/listen.addr")).unwrap();
    std::net::TcpStream::connect(addr.trim()).unwrap();

    // WATCHDOG=1 every half of WATCHDOG_USEC (timed from the second one after READY=1: the
    // first may have waited in the socket).
    assert_eq!(next(), "WATCHDOG=1", "after READY=1: {seen:?}");
    let since = Instant::now();
    let mut pings = 0;
    while pings < 3 {
        let s = next();
        assert_eq!(s, "WATCHDOG=1", "after READY=1: {seen:?}");
        pings += 1;
    }
    let every = since.elapsed() / 3;
    println!("WATCHDOG=1 about every {every:?}");
    assert!(
        every > Duration::from_millis(100) && every < Duration::from_millis(1000),
        "pings every {every:?}, want about 200 ms"
    );

    // SIGTERM: STOPPING=1, then a clean exit.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.0.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    loop {
        let s = next();
        if s == "STOPPING=1" {
            break;
        }
        assert_eq!(s, "WATCHDOG=1");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the collector did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.0.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    assert!(status.success(), "exit {status}:\n{stderr}");
}

// ---------------------------------------------------------------------------------------------
// installing and purging the packages

/// The two `.deb` files: `$SLUICE_DEBS`'s, else made now by cargo-deb from the test build.
fn debs() -> (PathBuf, PathBuf) {
    let dir = match std::env::var_os("SLUICE_DEBS") {
        // Relative to the workspace (tests run in tests/).
        Some(d) => workspace_root().join(d),
        None => {
            let out = workspace_root().join("target/packaging/debs-test");
            let _ = fs::remove_dir_all(&out);
            fs::create_dir_all(&out).unwrap();
            // Built binaries of this build (bin() fails with a hint when they are missing).
            let _ = (bin("sluice"), bin("sluice-collector"));
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            for package in ["sluice", "sluice-collector"] {
                run(Command::new(&cargo)
                    .current_dir(workspace_root())
                    .args(["deb", "-p", package, "--no-build", "--profile", "dev"])
                    .args(["--strip", "--fast", "--output"])
                    .arg(&out));
            }
            out
        }
    };
    let find = |name: &str| {
        fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{name}_")) && n.ends_with(".deb"))
            })
            .unwrap_or_else(|| panic!("no {name}_*.deb in {}", dir.display()))
    };
    (find("sluice"), find("sluice-collector"))
}

/// This machine's Debian release (`VERSION_CODENAME`), which the root is made of.
fn codename() -> String {
    let text = fs::read_to_string("/etc/os-release").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .filter(|v| !v.is_empty())
        .expect("VERSION_CODENAME in /etc/os-release")
}

/// A tarball of a minimal Debian root (Essential: yes packages and adduser), made once.
fn debian_root_tarball() -> PathBuf {
    let codename = codename();
    let dir = workspace_root().join("target/packaging");
    let tar = dir.join(format!("debian-{codename}-essential.tar"));
    if tar.exists() {
        return tar;
    }
    fs::create_dir_all(&dir).unwrap();
    // The mirrors this machine's apt uses (deb822 first, then the one-line format).
    let sources = [
        "/etc/apt/sources.list.d/debian.sources",
        "/etc/apt/sources.list",
    ]
    .into_iter()
    .map(Path::new)
    .find(|p| fs::metadata(p).is_ok_and(|m| m.len() > 0));
    let partial = dir.join(format!("debian-{codename}-essential.tar.partial"));
    let started = Instant::now();
    let mut cmd = Command::new("mmdebstrap");
    cmd.args([
        "--quiet",
        "--variant=essential",
        "--include=adduser",
        "--format=tar",
    ])
    .arg(&codename)
    .arg(&partial);
    if let Some(sources) = sources {
        cmd.arg(sources);
    }
    run(&mut cmd);
    fs::rename(&partial, &tar).unwrap();
    println!("made {} in {:?}", tar.display(), started.elapsed());
    tar
}

/// Mount points at or under `dir`, deepest first, as this process sees them.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    found
}

/// A Debian root extracted for one test and removed on drop. Its commands run in mount and
/// network namespaces of their own (their /proc mount ends with them; nothing they do reaches
/// this host's firewall or routes), so nothing stays mounted here; should something be anyway
/// (a command killed half-way), it is unmounted before the tree goes, and a tree that still has
/// a mount is left in place rather than removed through it.
struct DebianRoot {
    dir: PathBuf,
}

impl DebianRoot {
    fn new(tarball: &Path) -> Self {
        let dir = workspace_root().join(format!("target/packaging/root-{}", std::process::id()));
        let root = Self { dir };
        root.clean();
        fs::create_dir_all(&root.dir).unwrap();
        run(Command::new("tar")
            .args([
                "--extract",
                "--numeric-owner",
                "--same-permissions",
                "--file",
            ])
            .arg(tarball)
            .arg("--directory")
            .arg(&root.dir));
        root
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.join(p.trim_start_matches('/'))
    }

    /// Runs a command in the root (as root, with a clean environment) and returns its stdout.
    fn run(&self, args: &[&str]) -> String {
        let out = run(&mut self.command(args));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !stderr.trim().is_empty() {
            println!("{}: {}", args.join(" "), stderr.trim());
        }
        stdout
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--mount",
            "--net",
            "--propagation",
            "private",
            "--fork",
            "--",
        ])
        .args([
            "sh",
            "-c",
            r#"mount -t proc proc "$0/proc" && exec chroot "$0" "$@""#,
        ])
        .arg(&self.dir)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C")
        .env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    }

    /// The root's /etc/passwd (or /etc/group): name to fields.
    fn accounts(&self, file: &str) -> BTreeMap<String, Vec<String>> {
        fs::read_to_string(self.path(file))
            .unwrap()
            .lines()
            .filter_map(|l| {
                let fields: Vec<String> = l.split(':').map(str::to_owned).collect();
                Some((fields.first()?.clone(), fields))
            })
            .collect()
    }

    fn id(&self, file: &str, name: &str) -> u32 {
        self.accounts(file)
            .get(name)
            .unwrap_or_else(|| panic!("{name} in the root's {file}"))[2]
            .parse()
            .unwrap()
    }

    /// Every path under the root whose name mentions `needle`, outside `skip`.
    fn find(&self, needle: &str, skip: &[&str]) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut stack = vec![self.dir.clone()];
        while let Some(d) = stack.pop() {
            let Ok(entries) = fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                let rel = p.strip_prefix(&self.dir).unwrap().to_owned();
                if skip.iter().any(|s| rel.starts_with(s)) {
                    continue;
                }
                if e.file_name().to_string_lossy().contains(needle) {
                    found.push(rel);
                }
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(p);
                }
            }
        }
        found
    }

    fn clean(&self) {
        for m in mounts_under(&self.dir) {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        let left = mounts_under(&self.dir);
        if left.is_empty() {
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!(
                "{} left in place: still mounted there: {left:?}",
                self.dir.display()
            );
        }
    }
}

impl Drop for DebianRoot {
    fn drop(&mut self) {
        self.clean();
    }
}

/// Owner, group and permission bits of a path in the root (not following a last link).
fn owner_mode(p: &Path) -> (u32, u32, u32) {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

#[test]
#[ignore = "needs root"]
fn debs_install_and_purge_cleanly_in_a_fresh_debian_root() {
    require_root();
    let started = Instant::now();
    let (agent_deb, collector_deb) = debs();
    println!(
        "packages: {} {} ({:?})",
        agent_deb.display(),
        collector_deb.display(),
        started.elapsed()
    );
    let tarball = debian_root_tarball();
    let root = DebianRoot::new(&tarball);
    println!("root ready ({:?})", started.elapsed());
    for deb in [&agent_deb, &collector_deb] {
        fs::copy(deb, root.path("tmp").join(deb.file_name().unwrap())).unwrap();
    }
    let in_root = |deb: &Path| format!("/tmp/{}", deb.file_name().unwrap().to_string_lossy());
    let (agent_in, collector_in) = (in_root(&agent_deb), in_root(&collector_deb));

    // Install: the maintainer scripts make the users, the directories and the CA.
    println!(
        "{}",
        root.run(&["dpkg", "--install", &agent_in, &collector_in])
    );
    let status = root.run(&[
        "dpkg-query",
        "-W",
        "-f=${Package} ${db:Status-Status}\\n",
        "sluice",
        "sluice-collector",
    ]);
    assert_eq!(
        status, "sluice installed\nsluice-collector installed\n",
        "dpkg's view"
    );

    let passwd = root.accounts("etc/passwd");
    for user in ["sluice", "sluice-collector"] {
        let fields = passwd
            .get(user)
            .unwrap_or_else(|| panic!("user {user} in the root's /etc/passwd"));
        let uid: u32 = fields[2].parse().unwrap();
        assert!(uid < 1000, "{user} is a system user: {fields:?}");
        assert_eq!(fields[6], "/usr/sbin/nologin", "{user} has no login shell");
        assert_eq!(fields[5], "/nonexistent", "{user} has no home");
        assert!(!root.path(&fields[5]).exists());
        assert!(
            root.accounts("etc/group").contains_key(user),
            "group {user}"
        );
    }
    let sluice_uid = root.id("etc/passwd", "sluice");
    let sluice_gid = root.id("etc/group", "sluice");
    let collector_uid = root.id("etc/passwd", "sluice-collector");
    let collector_gid = root.id("etc/group", "sluice-collector");

    let expect = [
        ("usr/bin/sluice", (0, 0, 0o755)),
        ("usr/bin/sluice-collector", (0, 0, 0o755)),
        ("etc/sluice/agent.toml", (0, sluice_gid, 0o640)),
        ("etc/sluice/collector.toml", (0, collector_gid, 0o640)),
        ("var/lib/sluice", (sluice_uid, sluice_gid, 0o750)),
        ("var/lib/sluice/ca", (0, 0, 0o700)),
        ("var/lib/sluice/ca/ca.key", (0, 0, 0o600)),
        (
            "var/lib/sluice-collector",
            (collector_uid, collector_gid, 0o700),
        ),
    ];
    for (path, want) in expect {
        let got = owner_mode(&root.path(path));
        let show = |(uid, gid, mode): (u32, u32, u32)| format!("{uid}:{gid} {mode:04o}");
        assert_eq!(got, want, "/{path}: {}, want {}", show(got), show(want));
        println!("/{path}: {}", show(got));
    }
    assert!(root.path("var/lib/sluice/ca/ca.crt").is_file());
    for unit in UNITS {
        let installed = root.path("usr/lib/systemd/system").join(unit);
        assert_eq!(
            fs::read_to_string(&installed).unwrap(),
            unit_text(unit),
            "{unit} installed as packaging/systemd has it"
        );
        assert_eq!(owner_mode(&installed), (0, 0, 0o644));
    }
    // Enabled the debhelper way (systemd does not run here, so nothing was started).
    for link in [
        "etc/systemd/system/multi-user.target.wants/sluice-agent.service",
        "etc/systemd/system/sluice-agent.service.wants/sluice-proxy.service",
        "etc/systemd/system/multi-user.target.wants/sluice-collector.service",
    ] {
        assert!(
            fs::symlink_metadata(root.path(link)).is_ok_and(|m| m.file_type().is_symlink()),
            "/{link}"
        );
    }
    let conffiles = root.run(&["dpkg-query", "-W", "-f=${Conffiles}\\n", "sluice"]);
    assert!(conffiles.contains("/etc/sluice/agent.toml"), "{conffiles}");
    // The proxy's user reads the config; the agent's binary takes it.
    let as_sluice = format!("--userspec={sluice_uid}:{sluice_gid}");
    root.run(&[
        "chroot",
        &as_sluice,
        "/",
        "sluice",
        "config",
        "check",
        "--config",
        "/etc/sluice/agent.toml",
    ]);
    println!("installed and checked ({:?})", started.elapsed());

    // Remove (not purge) the agent: its configuration, state and user stay.
    root.run(&["dpkg", "--remove", "sluice"]);
    assert!(!root.path("usr/bin/sluice").exists());
    assert!(
        !root
            .path("usr/lib/systemd/system/sluice-agent.service")
            .exists()
    );
    assert!(root.path("etc/sluice/agent.toml").exists());
    assert!(root.path("var/lib/sluice/ca/ca.key").exists());
    assert!(root.accounts("etc/passwd").contains_key("sluice"));

    // Purge it while the collector is installed: the collector's config stays in /etc/sluice.
    root.run(&["dpkg", "--purge", "sluice"]);
    assert!(!root.path("etc/sluice/agent.toml").exists());
    assert!(root.path("etc/sluice/collector.toml").exists());
    assert!(!root.path("var/lib/sluice").exists());
    assert!(!root.accounts("etc/passwd").contains_key("sluice"));
    assert!(!root.accounts("etc/group").contains_key("sluice"));

    // Purge the collector: nothing of either is left.
    root.run(&["dpkg", "--purge", "sluice-collector"]);
    for gone in [
        "etc/sluice",
        "var/lib/sluice",
        "var/lib/sluice-collector",
        "var/log/sluice",
        "usr/bin/sluice",
        "usr/bin/sluice-collector",
    ] {
        assert!(
            fs::symlink_metadata(root.path(gone)).is_err(),
            "/{gone} is left"
        );
    }
    for file in ["etc/passwd", "etc/group", "etc/shadow", "etc/gshadow"] {
        let text = fs::read_to_string(root.path(file)).unwrap_or_default();
        assert!(
            !text.contains("sluice"),
            "/{file} still names sluice:\n{text}"
        );
    }
    let statoverride = fs::read_to_string(root.path("var/lib/dpkg/statoverride")).unwrap();
    assert!(!statoverride.contains("sluice"), "{statoverride}");
    // Units, enablement links, deb-systemd-helper's state: dpkg's own records aside, no path
    // names sluice any more (the .deb files copied in are /tmp's).
    let left = root.find("sluice", &["var/lib/dpkg", "tmp"]);
    assert!(left.is_empty(), "left behind: {left:?}");
    // dpkg forgets a purged package, or keeps it as not-installed.
    let out = root
        .command(&[
            "dpkg-query",
            "-W",
            "-f=${Package} ${db:Status-Status}\\n",
            "sluice",
            "sluice-collector",
        ])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.lines().all(|l| l.ends_with(" not-installed")),
        "{status}"
    );
    println!("purged without a trace ({:?})", started.elapsed());
}
