//! `cargo xtask fuzz [TARGET] [--time S]`: builds the cargo-fuzz targets in `fuzz/` (their own
//! workspace) and runs each, or the one named, for S seconds; `cargo xtask test` runs each
//! briefly ([`smoke`]). A crash fails the run, its input is left in `fuzz/artifacts/TARGET/`.
//!
//! Each target's corpus, `fuzz/corpus/TARGET` (not committed), is seeded before a run from the
//! small hand-made seeds in `fuzz/seeds/TARGET` and from the files `cargo xtask fixtures` made
//! with the real tools in `target/fixtures` (Office, OpenDocument and PDF files, archives; upload
//! bodies wrapping them; a bundle of `policies/default`). cargo-fuzz itself is installed when
//! missing, its build under `target/tools`; the targets build into `target/fuzz`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, output, sh, step};

/// Every target, as `fuzz/Cargo.toml` names them.
pub const TARGETS: [&str; 20] = [
    "client_hello",
    "dns",
    "embedded",
    "multipart",
    "zip",
    "ooxml",
    "odf",
    "ole",
    "pdf",
    "bundle",
    "query",
    "seal",
    "oidc",
    "detect",
    "privsep",
    "icap",
    "codec",
    "redact",
    "upload_wire",
    "records",
];

/// Seconds each target runs in `cargo xtask test`.
pub const SMOKE_SECONDS: u64 = 10;

/// The cargo-fuzz release the runs are made with.
const CARGO_FUZZ: &str = "0.13.2";

/// Largest input libFuzzer makes for a target (the targets ignore larger ones too).
fn max_len(target: &str) -> usize {
    match target {
        "client_hello" => 64 * 1024 + 1024,
        "query" => 16 * 1024 + 64,
        "dns" => 512,
        "seal" => 4096,
        "oidc" => 16 * 1024,
        "detect" => 64 * 1024,
        "embedded" => 256 * 1024,
        "multipart" => 256 * 1024,
        "codec" => 64 * 1024,
        "records" => 128 * 1024,
        _ => 1 << 20,
    }
}

/// Which fixtures (by extension) seed a file target.
fn fixture_kinds(target: &str) -> &'static [&'static str] {
    match target {
        "zip" => &["zip", "docx", "odt"],
        "ooxml" => &["docx", "xlsx", "pptx"],
        "odf" => &["odt", "ods", "odp"],
        "ole" => &["doc", "xls", "ppt"],
        "pdf" => &["pdf"],
        _ => &[],
    }
}

/// Builds and runs `target` (all when `None`) for `seconds` each.
pub fn fuzz(root: &Path, target: Option<&str>, seconds: u64) -> Result<()> {
    let targets: Vec<&str> = match target {
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => bail!("unknown fuzz target `{t}`; known: {}", TARGETS.join(", ")),
        None => TARGETS.to_vec(),
    };
    cargo_fuzz(root)?;
    step("fuzz: build");
    let started = Instant::now();
    let mut build = fuzz_command(root, "build");
    build.args(target);
    sh(&mut build)?;
    eprintln!("built in {:.0} s", started.elapsed().as_secs_f64());
    for t in &targets {
        let corpus = seed(root, t)?;
        step(&format!("fuzz {t}: {seconds} s"));
        let mut run = fuzz_command(root, "run");
        run.arg(t)
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-max_len={}", max_len(t)))
            // A hang past the inspectors' own deadline (5 s in the targets) is a finding.
            .arg("-timeout=30")
            .arg("-print_final_stats=1");
        sh(&mut run).with_context(|| {
            format!(
                "fuzz target `{t}` failed; the input is in {}",
                root.join("fuzz/artifacts").join(t).display()
            )
        })?;
    }
    eprintln!(
        "\nfuzzing: {} target(s), {seconds} s each, no crash",
        targets.len()
    );
    Ok(())
}

/// What `cargo xtask test` runs: the fuzz crate's format check (the workspace's leaves it out),
/// then every target for [`SMOKE_SECONDS`].
pub fn smoke(root: &Path) -> Result<()> {
    sh(cargo()
        .args(["fmt", "--manifest-path"])
        .arg(root.join("fuzz/Cargo.toml"))
        .args(["--", "--check"]))?;
    fuzz(root, None, SMOKE_SECONDS)
}

/// `cargo fuzz SUBCOMMAND` on the fuzz workspace, built into `target/fuzz`.
fn fuzz_command(root: &Path, subcommand: &str) -> Command {
    let mut cmd = cargo();
    // AddressSanitizer needs -Zsanitizer (nightly-only): stable plus RUSTC_BOOTSTRAP, as for eBPF.
    cmd.env("RUSTC_BOOTSTRAP", "1")
        .args(["fuzz", subcommand, "--fuzz-dir"])
        .arg(root.join("fuzz"))
        .arg("--target-dir")
        .arg(root.join("target/fuzz"))
        // Builds a third faster than cargo-fuzz's single unit, and fuzzes as fast here.
        .args(["--codegen-units", "16"]);
    cmd
}

/// Installs cargo-fuzz when it is missing or another release.
fn cargo_fuzz(root: &Path) -> Result<()> {
    let version = output(cargo().args(["fuzz", "--version"]));
    if version.is_some_and(|v| v.split_whitespace().nth(1) == Some(CARGO_FUZZ)) {
        eprintln!("cargo-fuzz: {CARGO_FUZZ} present");
        return Ok(());
    }
    step(&format!("cargo-fuzz: installing {CARGO_FUZZ}"));
    sh(cargo()
        .args(["install", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ])
        .arg("--target-dir")
        .arg(root.join("target/tools/cargo-fuzz")))
}

/// Fills `fuzz/corpus/TARGET` from the committed seeds and the fixtures; returns its path.
fn seed(root: &Path, target: &str) -> Result<PathBuf> {
    let corpus = root.join("fuzz/corpus").join(target);
    fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let mut added = 0usize;
    let mut put = |name: &str, data: &[u8]| -> Result<()> {
        if data.len() <= max_len(target) {
            let path = corpus.join(name);
            fs::write(&path, data).with_context(|| format!("writing {}", path.display()))?;
            added += 1;
        }
        Ok(())
    };
    let seeds = root.join("fuzz/seeds").join(target);
    for (name, path) in files_in(&seeds)? {
        put(&format!("seed-{name}"), &fs::read(&path)?)?;
    }
    let fixtures = root.join("target/fixtures");
    let made = files_in(&fixtures)?;
    let kinds = fixture_kinds(target);
    for (name, path) in &made {
        let ext = name.rsplit('.').next().unwrap_or_default();
        if kinds.contains(&ext) {
            put(&format!("fixture-{name}"), &fs::read(path)?)?;
        }
        // Upload bodies: a fixture as a form's file field, next to a text field.
        if target == "multipart" && fs::metadata(path)?.len() <= 64 * 1024 {
            put(
                &format!("fixture-{name}.form"),
                &form_body(name, &fs::read(path)?),
            )?;
        }
    }
    if target == "bundle" {
        let archive = corpus.join("policies-default.tar.gz");
        sh(Command::new("tar")
            .arg("-czf")
            .arg(&archive)
            .arg("-C")
            .arg(root.join("policies/default"))
            .arg("."))?;
        added += 1;
    }
    if made.is_empty() && !kinds.is_empty() {
        eprintln!(
            "fuzz {target}: no fixtures in {} (`cargo xtask fixtures` makes them); seeds only",
            fixtures.display()
        );
    }
    eprintln!("fuzz {target}: {added} seed(s) put in {}", corpus.display());
    Ok(corpus)
}

/// The regular files in `dir` (none when it does not exist), by name.
fn files_in(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e?;
        if e.file_type()?.is_file() {
            out.push((e.file_name().to_string_lossy().into_owned(), e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// An input of the `multipart` target: the `Content-Type` line, then a form body carrying `data`
/// as the file `name`.
fn form_body(name: &str, data: &[u8]) -> Vec<u8> {
    let b = "----sluice-fuzz";
    let mut out = format!(
        "multipart/form-data; boundary={b}\n--{b}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\n\
         quarterly figures\r\n--{b}\r\nContent-Disposition: form-data; name=\"file\"; \
         filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(format!("\r\n--{b}--\r\n").as_bytes());
    out
}
