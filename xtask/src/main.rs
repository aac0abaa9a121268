//! Developer and operator tasks: `cargo xtask setup | test | bench NAME | up | demo | fixtures |
//! fuzz | package`.
//!
//! Every task that needs the toolchain or system packages first runs the idempotent set-up, so a
//! fresh machine needs nothing but this repository and Rust: Debian packages (nftables, bpftool,
//! curl, iproute2), the `rust-src` component, and bpf-linker built against the LLVM that ships
//! inside the Rust toolchain (Debian's LLVM is too old for it).

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{Context as _, Result, anyhow, bail};
use clap::{Parser, Subcommand};

mod fixtures;
mod fuzz;
mod package;
mod up;

#[derive(Parser)]
#[command(name = "xtask", about = "Sluice developer and operator tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent, quick when all is there).
    Setup,
    /// Set up, then run fmt, clippy (warnings denied) and every test, root-only ones included,
    /// then each fuzz target briefly.
    Test,
    /// Set up, build in release, and run a benchmark (`steer`, `proxy`, `gateway`, `policy`,
    /// `inspect`, `collector`); writes
    /// target/bench/NAME.json. Arguments after `--` go to the benchmark (e.g. `-- --reps 5`).
    Bench {
        /// Which benchmark.
        name: String,
        /// Passed to the benchmark.
        #[arg(last = true)]
        extra: Vec<String>,
    },
    /// Set up, build in release, and run the collector and the agent on this host (state in
    /// target/sluice-up) until Ctrl-C; prints the portal URL, the admin login and the CA to trust.
    Up {
        /// Use this agent config instead of the generated default.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Report this device as unmanaged (`[device] posture`), so Highly Confidential downloads
        /// are labeled and protected.
        #[arg(long)]
        unmanaged: bool,
        /// Bring up a demo branch instead: network namespaces `sluice-client` -> `sluice-gw`
        /// (the agent in gateway mode) -> `sluice-app` (the demo app), until Ctrl-C.
        #[arg(long, conflicts_with_all = ["config", "unmanaged"])]
        gateway: bool,
        /// Store everything in PostgreSQL (Debian's packages: a cluster under
        /// target/sluice-up/postgres) and run two collectors on it (8443 and 8444), the agent
        /// shipping to the first with the second as its fallback.
        #[arg(long, conflicts_with = "gateway")]
        postgres: bool,
    },
    /// Play the four scenarios against the demo app through the running agent (`up` must be
    /// running); the events land in the portal.
    Demo,
    /// Make the end-to-end tests' files with the real tools (installs LibreOffice and a Python
    /// venv when missing); quick when they are up to date.
    Fixtures {
        /// Output directory (default target/fixtures; relative to the workspace root).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Remake the files even when they are up to date.
        #[arg(long)]
        force: bool,
    },
    /// Build the cargo-fuzz targets in fuzz/ and run each (or TARGET) for --time seconds, their
    /// corpora seeded from fuzz/seeds and target/fixtures; installs cargo-fuzz when missing.
    Fuzz {
        /// One target (all when omitted).
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(fuzz::TARGETS))]
        target: Option<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        time: u64,
    },
    /// Build the Debian packages `sluice` (agent and proxy, their systemd units, the default
    /// config) and `sluice-collector` in release with cargo-deb (installed when missing).
    Package {
        /// Where the .deb files go (default target/debian; relative to the workspace root).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let root = workspace_root()?;
    env::set_current_dir(&root)?;
    match cli.task {
        Task::Setup => setup(&root),
        Task::Test => {
            disk_note(&root);
            setup(&root)?;
            // Office and PDF files made by the real tools, for the inspection tests.
            fixtures::fixtures(&root, None, false)?;
            test(&root)
        }
        Task::Bench { name, extra } => {
            setup(&root)?;
            bench(&root, &name, &extra)
        }
        Task::Up {
            config,
            unmanaged,
            gateway,
            postgres,
        } => {
            setup(&root)?;
            if gateway {
                up::up_gateway(&root)
            } else {
                up::up(&root, config, unmanaged, postgres)
            }
        }
        Task::Demo => up::demo(&root),
        Task::Fixtures { out, force } => fixtures::fixtures(&root, out, force),
        Task::Fuzz { target, time } => fuzz::fuzz(&root, target.as_deref(), time),
        Task::Package { out } => package::package(&root, out),
    }
}

fn workspace_root() -> Result<PathBuf> {
    let manifest =
        env::var_os("CARGO_MANIFEST_DIR").ok_or_else(|| anyhow!("run through `cargo xtask`"))?;
    Path::new(&manifest)
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow!("xtask has no parent directory"))
}

fn step(what: &str) {
    eprintln!("\n==> {what}");
}

/// Runs a command, failing with its name when it fails.
fn sh(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

// ---------------------------------------------------------------------------------------------
// set-up

/// `chromium` and `libnss3-tools` (certutil) are for the tests that drive a real browser
/// (`sluice_e2e::browser`).
const APT_PACKAGES: [&str; 16] = [
    "nftables",
    "bpftool",
    "curl",
    "iproute2",
    "util-linux",
    "chromium",
    "libnss3-tools",
    // A real multipart client for the upload-session tests (S3).
    "rclone",
    // Reads the encryption of protected PDFs in the tests.
    "qpdf",
    // The packaging tests: `systemd-analyze verify` and `security` on the units (systemd need
    // not run), a Debian root to install the packages into, and cargo-deb's dpkg-shlibdeps.
    "systemd",
    "mmdebstrap",
    "dpkg-dev",
    // A real ICAP (RFC 3507) malware scanner for the upload/download scanning tests: c-icap's
    // virus_scan service over clamd, run by the tests in the foreground with their own configs
    // and a signature database they write (no freshclam, no service of the host's).
    "c-icap",
    "libc-icap-mod-virus-scan",
    "clamav-daemon",
    // The collector's shared store: the tests and `cargo xtask up --postgres` start clusters of
    // their own from the server's binaries (the package's own cluster is not used).
    "postgresql",
];

fn setup(root: &Path) -> Result<()> {
    step("set-up");
    if !is_root() {
        bail!(
            "Sluice's set-up and tests need root: they install packages, attach eBPF programs and create \
             cgroups. Run as root (e.g. `sudo -E cargo xtask test`)."
        );
    }
    apt(&APT_PACKAGES)?;
    rust_src()?;
    bpf_linker(root)?;
    // The packaging tests build the .deb files from the test build.
    package::cargo_deb(root)?;
    cgroup_v2()?;
    proxy_user()?;
    Ok(())
}

/// The unprivileged proxy's system user (`privsep.user`), as the package creates it on install.
fn proxy_user() -> Result<()> {
    if output(Command::new("id").args(["-u", "sluice"])).is_some() {
        eprintln!("proxy user sluice: present");
        return Ok(());
    }
    eprintln!("proxy user sluice: creating");
    sh(Command::new("useradd").args([
        "--system",
        "--no-create-home",
        "--home-dir",
        "/nonexistent",
        "--shell",
        "/usr/sbin/nologin",
        "sluice",
    ]))
}

fn apt(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        eprintln!("apt packages: present");
        return Ok(());
    }
    eprintln!("apt packages: installing {}", missing.join(" "));
    let apt_get = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        c.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        c
    };
    sh(apt_get(&["update", "-q"]).stdout(Stdio::null()))?;
    let mut install = apt_get(&["install", "-y", "-q", "--no-install-recommends"]);
    install.args(&missing).stdout(Stdio::null());
    sh(&mut install)
}

fn rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args(["component", "list", "--installed"]))
        .is_some_and(|s| s.lines().any(|l| l.starts_with("rust-src")));
    if installed {
        eprintln!("rust-src: present");
        return Ok(());
    }
    eprintln!("rust-src: installing");
    sh(Command::new("rustup").args(["component", "add", "rust-src"]))
}

/// The toolchain's own libLLVM: (sysroot lib dir, link name such as `LLVM-22-rust-1.95.0-stable`,
/// LLVM major).
fn toolchain_llvm() -> Result<(PathBuf, String, String)> {
    let sysroot = output(Command::new("rustc").args(["--print", "sysroot"]))
        .ok_or_else(|| anyhow!("rustc --print sysroot failed"))?;
    let lib = PathBuf::from(sysroot.trim()).join("lib");
    for entry in std::fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_prefix("lib").and_then(|n| n.strip_suffix(".so"))
            && let Some(rest) = stem.strip_prefix("LLVM-")
            && stem.contains("-rust-")
        {
            let major = rest.split('-').next().unwrap_or_default().to_owned();
            return Ok((lib, stem.to_owned(), major));
        }
    }
    bail!(
        "no libLLVM-*-rust-*.so in {}: the Rust toolchain is incomplete",
        lib.display()
    )
}

fn bpf_linker(root: &Path) -> Result<()> {
    let (lib, link_name, major) = toolchain_llvm()?;
    // The shared object's soname embeds the toolchain version, e.g. libLLVM.so.22.1-rust-1.95.0-stable.
    let version_tag = link_name
        .split("-rust-")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let current = output(Command::new("bpf-linker").arg("--version")).is_some()
        && output(Command::new("sh").args(["-c", "ldd \"$(command -v bpf-linker)\""])).is_some_and(
            |s| {
                s.lines()
                    .any(|l| l.contains("libLLVM") && l.contains(&format!("rust-{version_tag}")))
            },
        );
    if current {
        eprintln!("bpf-linker: present, linked against this toolchain's LLVM {major}");
        return Ok(());
    }
    eprintln!("bpf-linker: building against the toolchain's LLVM {major} (about a minute)");
    let lib_s = lib.display().to_string();
    let rustflags = format!("-L {lib_s} -C link-arg=-l{link_name} -C link-arg=-Wl,-rpath,{lib_s}");
    sh(Command::new("cargo")
        .env("RUSTFLAGS", rustflags)
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            &format!("llvm-{major},no-llvm-linking"),
            "--target-dir",
        ])
        .arg(root.join("target/tools/bpf-linker")))
}

fn cgroup_v2() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    if mounts.lines().any(|l| {
        l.split(" - ")
            .nth(1)
            .is_some_and(|t| t.starts_with("cgroup2 "))
    }) {
        eprintln!("cgroup v2: mounted");
        return Ok(());
    }
    bail!(
        "no cgroup v2 hierarchy is mounted; Sluice's endpoint steering needs one (mount -t cgroup2 none /sys/fs/cgroup/unified)"
    )
}

// ---------------------------------------------------------------------------------------------
// test

/// Says how much disk is free where the build goes, and warns when the build and the tests'
/// scratch files may not fit (a full disk fails tests in ways that look like their own bugs).
fn disk_note(root: &Path) {
    const WANT_GIB: u64 = 4;
    let out = Command::new("df").arg("-Pk").arg(root).output();
    let free_kib = out.ok().and_then(|o| {
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        text.lines()
            .nth(1)?
            .split_whitespace()
            .nth(3)?
            .parse::<u64>()
            .ok()
    });
    match free_kib {
        Some(k) if k < WANT_GIB << 20 => eprintln!(
            "disk: WARNING only {:.1} GiB free under {}; the build and the tests want about {WANT_GIB} GiB",
            k as f64 / f64::from(1 << 20),
            root.display()
        ),
        Some(k) => eprintln!(
            "disk: {:.1} GiB free under {}",
            k as f64 / f64::from(1 << 20),
            root.display()
        ),
        None => eprintln!("disk: could not tell the free space (df)"),
    }
}

/// True on CI (`CI=true`): a fresh clone built once, where disk matters more than rebuild time.
fn on_ci() -> bool {
    env::var("CI").is_ok_and(|v| v == "true")
}

fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    if on_ci() {
        // Incremental state is kept for rebuilds that a one-shot run never does (2 GiB of it).
        cmd.env("CARGO_INCREMENTAL", "0");
    }
    cmd
}

fn test(root: &Path) -> Result<()> {
    step("cargo fmt --check");
    sh(cargo().args(["fmt", "--all", "--", "--check"]))?;
    step("cargo clippy (warnings denied)");
    sh(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("build (the end-to-end tests run the built binaries)");
    sh(cargo().args(["build", "--workspace", "--bins"]))?;
    step("tests, root-only ones included");
    // Every test runs, ignored-for-root ones too; a test that cannot run fails rather than skips.
    sh(cargo().args([
        "test",
        "--workspace",
        "--no-fail-fast",
        "--",
        "--include-ignored",
    ]))?;
    if on_ci() {
        // Nothing after this point reads the debug build; the sanitized fuzz build is as large,
        // and a run should not need room for both.
        let debug = root.join("target/debug");
        step(&format!(
            "CI: removing {} before the fuzz build",
            debug.display()
        ));
        std::fs::remove_dir_all(&debug).with_context(|| format!("removing {}", debug.display()))?;
        disk_note(root);
    }
    step("fuzz targets, briefly (a crash fails)");
    fuzz::smoke(root)?;
    eprintln!("\nall checks passed");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// bench

fn bench(root: &Path, name: &str, extra: &[String]) -> Result<()> {
    let known = [
        "steer",
        "proxy",
        "gateway",
        "policy",
        "inspect",
        "collector",
        "icap",
    ];
    if !known.contains(&name) {
        bail!("unknown benchmark `{name}`; known: {}", known.join(", "));
    }
    if name == "collector" {
        step("bench collector: building in release");
        sh(cargo().args([
            "build",
            "--release",
            "-p",
            "sluice-collector",
            "--bin",
            "sluice-collector-bench",
            "--bin",
            "sluice-risk-bench",
        ]))?;
        let out = root.join("target/bench/collector.json");
        std::fs::create_dir_all(root.join("target/bench"))?;
        step("bench collector");
        sh(
            Command::new(root.join("target/release/sluice-collector-bench"))
                .arg("--out")
                .arg(&out)
                .arg("--dir")
                .arg(root.join("target/bench/collector-work"))
                .args(extra),
        )?;
        eprintln!("figures written to {}", out.display());
        // The adaptive-access loop: anomaly at the collector to every agent's new decision.
        let out = root.join("target/bench/collector-loop.json");
        step("bench collector: the adaptive access loop");
        sh(Command::new(root.join("target/release/sluice-risk-bench"))
            .arg("--out")
            .arg(&out)
            .arg("--dir")
            .arg(root.join("target/bench/collector-loop")))?;
        eprintln!("figures written to {}", out.display());
        return Ok(());
    }
    step(&format!("bench {name}: building in release"));
    sh(cargo().args([
        "build",
        "--release",
        "-p",
        "sluice",
        "-p",
        "sluice-e2e",
        "--bins",
    ]))?;
    if name == "inspect" {
        // Its files start from the fixtures made by the real tools.
        fixtures::fixtures(root, None, false)?;
    }
    let out = root.join("target/bench").join(format!("{name}.json"));
    std::fs::create_dir_all(root.join("target/bench"))?;
    step(&format!("bench {name}"));
    sh(Command::new(root.join("target/release/sluice-bench"))
        .arg(name)
        .arg("--out")
        .arg(&out)
        .args(extra))?;
    eprintln!("figures written to {}", out.display());
    Ok(())
}
