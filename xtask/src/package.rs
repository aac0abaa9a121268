//! `cargo xtask package`: the Debian packages `sluice` (the agent and its proxy) and
//! `sluice-collector`, made by cargo-deb from `[package.metadata.deb]` in `agent/Cargo.toml` and
//! `collector/Cargo.toml`, with the units, default configs and maintainer scripts of
//! `packaging/`. cargo-deb itself is installed (a pinned release) when missing; the set-up of
//! `cargo xtask test` installs it too, for the packaging tests.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::{apt, bpf_linker, cargo, is_root, output, rust_src, sh, step};

/// The cargo-deb release the packages are made with.
pub const CARGO_DEB: &str = "3.8.0";

/// The packages, by the workspace crate whose `[package.metadata.deb]` describes each.
const PACKAGES: [&str; 2] = ["sluice", "sluice-collector"];

/// Installs cargo-deb when it is missing or another release.
pub fn cargo_deb(root: &Path) -> Result<()> {
    let version = output(cargo().args(["deb", "--version"]));
    if version.is_some_and(|v| v.split_whitespace().nth(1) == Some(CARGO_DEB)) {
        eprintln!("cargo-deb: {CARGO_DEB} present");
        return Ok(());
    }
    step(&format!("cargo-deb: installing {CARGO_DEB}"));
    sh(cargo()
        .args(["install", "cargo-deb", "--locked", "--version", CARGO_DEB])
        .arg("--target-dir")
        .arg(root.join("target/tools/cargo-deb")))
}

/// Builds both packages in release into `out` (default `target/debian`) and prints them with
/// the commands that install them.
pub fn package(root: &Path, out: Option<PathBuf>) -> Result<()> {
    step("set-up for packaging");
    // The agent's build compiles its eBPF programs (rust-src, bpf-linker).
    rust_src()?;
    bpf_linker(root)?;
    cargo_deb(root)?;
    // cargo-deb reads the binaries' library dependencies (`$auto`) with dpkg-shlibdeps.
    if output(Command::new("dpkg-shlibdeps").arg("--version")).is_none() {
        if is_root() {
            apt(&["dpkg-dev"])?;
        } else {
            bail!("dpkg-shlibdeps is missing: install dpkg-dev (apt-get install dpkg-dev)");
        }
    }

    let out = match out {
        Some(dir) if dir.is_relative() => root.join(dir),
        Some(dir) => dir,
        None => root.join("target/debian"),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut debs = Vec::new();
    for name in PACKAGES {
        step(&format!("package {name}: release build and .deb"));
        // Debug info stays out of the package: the release profile keeps some for benchmarks
        // and profiling, which would triple the size of what every host installs.
        let mut cmd = cargo();
        cmd.args(["deb", "--locked", "--strip", "-p", name, "--output"])
            .arg(&out)
            .stderr(Stdio::inherit());
        let shown = format!("{cmd:?}");
        let done = cmd.output().with_context(|| format!("starting {shown}"))?;
        if !done.status.success() {
            bail!("{shown} failed ({})", done.status);
        }
        // cargo-deb prints the path of the package it wrote, last.
        let stdout = String::from_utf8_lossy(&done.stdout);
        let deb = stdout
            .lines()
            .map(str::trim)
            .rfind(|l| l.ends_with(".deb"))
            .map(PathBuf::from)
            .with_context(|| format!("{shown} named no .deb on its output: {stdout}"))?;
        debs.push(deb);
    }

    step("packages");
    for deb in &debs {
        let size = std::fs::metadata(deb).map(|m| m.len()).unwrap_or(0);
        let fields = output(
            Command::new("dpkg-deb")
                .args([
                    "--show",
                    "--showformat=${Package} ${Version} ${Architecture}\\n",
                ])
                .arg(deb),
        )
        .unwrap_or_default();
        eprintln!(
            "  {}  ({}, {:.1} MiB)",
            rel(root, deb),
            fields.trim(),
            size as f64 / f64::from(1 << 20)
        );
    }
    let list = debs
        .iter()
        .map(|d| rel(root, d))
        .collect::<Vec<_>>()
        .join(" ");
    eprintln!(
        "\ninstall (as root; the README's \"Install from packages\" says more):\n  \
         dpkg -i {list}\n  \
         systemctl status sluice-agent sluice-proxy sluice-collector\n\
         config: /etc/sluice/agent.toml, /etc/sluice/collector.toml; \
         state: /var/lib/sluice, /var/lib/sluice-collector"
    );
    Ok(())
}

/// A path relative to the workspace when it is under it (shorter to paste).
fn rel(root: &Path, p: &Path) -> String {
    p.strip_prefix(root).unwrap_or(p).display().to_string()
}
