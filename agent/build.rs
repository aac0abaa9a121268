//! Builds the eBPF object (`sluice-ebpf`) for the bpfel target with aya-build.
//!
//! Stable Rust is enough: `RUSTC_BOOTSTRAP=1` lets the nested build use `-Z build-std=core`.
//! With `AYA_BUILD_SKIP=1` (tools that only type-check, such as a clippy run on a machine without
//! bpf-linker) an empty object is written instead, and loading it fails with a clear error.
//!
//! aya-build relays every line of the nested cargo (`Compiling ...`, each compiler message) as a
//! `cargo:warning`, which would show as a wall of warnings on every build that runs this script.
//! So the script runs itself a second time (`SLUICE_EBPF_INNER=1`) to do the build, reads what that
//! run prints, keeps it in `$OUT_DIR/ebpf-build.log`, and passes on only cargo's directives (the
//! `rerun-if-changed` lines that make a change under `agent-ebpf/` or `agent-common/src` rebuild
//! the object). A successful build prints nothing, or one line when the eBPF crate has compiler
//! warnings; a failed one prints the whole log.

use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{Context as _, anyhow, bail};

const INNER: &str = "SLUICE_EBPF_INNER";

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    if env::var_os(INNER).is_some() {
        return build();
    }
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    println!("cargo:rerun-if-env-changed=SLUICE_EBPF_TOOLCHAIN");
    println!("cargo:rerun-if-changed=../agent-common/src");
    if matches!(env::var("AYA_BUILD_SKIP").as_deref(), Ok("1" | "true")) {
        fs::write(out_dir.join("sluice-ebpf"), b"").context("writing the empty eBPF stub")?;
        return Ok(());
    }
    let me = env::current_exe().context("the build script's own path")?;
    let out = Command::new(&me)
        .env(INNER, "1")
        .output()
        .with_context(|| format!("running {} for the eBPF build", me.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let log = out_dir.join("ebpf-build.log");
    let mut text = String::new();
    let mut warnings = 0;
    for line in stdout.lines() {
        match line
            .strip_prefix("cargo:warning=")
            .or_else(|| line.strip_prefix("cargo::warning="))
        {
            Some(w) => {
                if w.starts_with("warning:") {
                    warnings += 1;
                }
                text.push_str(w);
                text.push('\n');
            }
            // rerun-if-changed and any other directive: cargo must see them.
            None if line.starts_with("cargo:") => println!("{line}"),
            None => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    text.push_str(&stderr);
    fs::write(&log, &text).with_context(|| format!("writing {}", log.display()))?;
    if !out.status.success() {
        eprintln!("{text}");
        bail!(
            "the eBPF build failed ({}); its output is above and in {}",
            out.status,
            log.display()
        );
    }
    if warnings > 0 {
        println!(
            "cargo:warning=the eBPF crate has {warnings} compiler warning(s): see {}",
            log.display()
        );
    }
    Ok(())
}

/// The build itself (the inner run): aya-build prints what it prints.
fn build() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(
        env::var_os("CARGO_MANIFEST_DIR").ok_or_else(|| anyhow!("CARGO_MANIFEST_DIR not set"))?,
    );
    let ebpf_dir = manifest_dir.join("../agent-ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non UTF-8 path {}", ebpf_dir.display()))?;
    // SAFETY: build scripts are single-threaded here; the variable is read by aya-build and
    // inherited by the nested cargo it spawns.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
    let toolchain = env::var("SLUICE_EBPF_TOOLCHAIN").unwrap_or_else(|_| "stable".to_owned());
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "sluice-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
