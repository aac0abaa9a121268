//! `cargo xtask fixtures [--out DIR] [--force]`: the files the end-to-end tests upload and
//! download, made by the real tools (python-docx, openpyxl, python-pptx, pypdf, reportlab,
//! msoffcrypto-tool, LibreOffice) so the tests see what users' tools produce.
//!
//! Its own set-up is idempotent and quick when done: the LibreOffice and venv Debian packages are
//! installed only when `dpkg` says they are missing, and the Python venv at `target/pyenv` is
//! (re)built only when its recorded requirements differ from the pinned ones below. The files
//! themselves are made by `tests/fixtures/make_fixtures.py`, which skips the work when the
//! output's manifest already matches its generator and files.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{apt, sh, step};

/// Debian packages the generator (`zip` for the zip64 packages, `python3-uno` for the
/// password-protected legacy files) and `read_label.py --libreoffice` need.
const APT_PACKAGES: [&str; 6] = [
    "libreoffice-writer-nogui",
    "libreoffice-calc-nogui",
    "libreoffice-impress-nogui",
    "python3-uno",
    "python3-venv",
    "zip",
];

/// The venv's pinned requirements (PyPI); changing them rebuilds the venv.
const REQUIREMENTS: [&str; 7] = [
    "python-docx==1.2.0",
    "openpyxl==3.1.5",
    "python-pptx==1.0.2",
    "pypdf==6.1.1",
    "reportlab==4.4.4",
    "msoffcrypto-tool==5.4.2",
    "olefile==0.47",
];

/// The Debian interpreter the venv is made from (`python3-venv` belongs to it; a `python3`
/// earlier on PATH, e.g. from pyenv, may lack `ensurepip`).
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// Records, inside the venv, the requirements it was built with.
const STAMP: &str = "sluice-requirements.txt";

/// Sets up, then makes the fixtures into `out` (default `target/fixtures`).
pub fn fixtures(root: &Path, out: Option<PathBuf>, force: bool) -> Result<()> {
    let started = Instant::now();
    step("fixtures: set-up");
    apt(&APT_PACKAGES)?;
    let python = venv(&root.join("target/pyenv"))?;
    let out = out.unwrap_or_else(|| root.join("target/fixtures"));
    step(&format!("fixtures: making into {}", out.display()));
    let mut cmd = Command::new(&python);
    cmd.arg(root.join("tests/fixtures/make_fixtures.py"))
        .arg(&out)
        .arg("--labels")
        .arg(root.join("policies/default/labels.yaml"));
    if force {
        cmd.arg("--force");
    }
    sh(&mut cmd)?;
    eprintln!(
        "fixtures: done in {:.1} s (manifest: {})",
        started.elapsed().as_secs_f64(),
        out.join("manifest.json").display()
    );
    Ok(())
}

/// The venv's interpreter, after creating the venv or installing the pinned packages when the
/// venv's stamp does not list exactly [`REQUIREMENTS`].
fn venv(dir: &Path) -> Result<PathBuf> {
    let python = dir.join("bin/python");
    let wanted = REQUIREMENTS.join("\n") + "\n";
    let stamp = dir.join(STAMP);
    if python.exists() && fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        eprintln!("python venv: present ({})", dir.display());
        return Ok(python);
    }
    if !python.exists() {
        eprintln!("python venv: creating {}", dir.display());
        if !Path::new(SYSTEM_PYTHON).exists() {
            bail!("{SYSTEM_PYTHON} is missing: install Debian's python3");
        }
        sh(Command::new(SYSTEM_PYTHON)
            .args(["-m", "venv"])
            .arg(dir)
            .stdout(Stdio::null()))?;
    }
    eprintln!("python venv: installing {}", REQUIREMENTS.join(" "));
    sh(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
        ])
        .args(REQUIREMENTS))?;
    fs::write(&stamp, wanted).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(python)
}
