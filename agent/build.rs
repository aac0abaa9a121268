//! Builds the eBPF object (`sluice-ebpf`) for the bpfel target with aya-build.
//!
//! Stable Rust is enough: `RUSTC_BOOTSTRAP=1` lets the nested build use `-Z build-std=core`.
//! With `AYA_BUILD_SKIP=1` (tools that only type-check, such as a clippy run on a machine without
//! bpf-linker) an empty object is written instead, and loading it fails with a clear error.

use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    let stub = out_dir.join("sluice-ebpf");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if matches!(env::var("AYA_BUILD_SKIP").as_deref(), Ok("1" | "true")) {
        fs::write(&stub, b"").context("writing the empty eBPF stub")?;
        return Ok(());
    }
    let manifest_dir = PathBuf::from(
        env::var_os("CARGO_MANIFEST_DIR").ok_or_else(|| anyhow!("CARGO_MANIFEST_DIR not set"))?,
    );
    let ebpf_dir = manifest_dir.join("../agent-ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non UTF-8 path {}", ebpf_dir.display()))?;
    println!("cargo:rerun-if-changed=../agent-common/src");
    // SAFETY: build scripts are single-threaded here; the variable is read by aya-build and
    // inherited by the nested cargo it spawns.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
    let toolchain = env::var("SLUICE_EBPF_TOOLCHAIN").unwrap_or_else(|_| "stable".to_owned());
    println!("cargo:rerun-if-env-changed=SLUICE_EBPF_TOOLCHAIN");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "sluice-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
