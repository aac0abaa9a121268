//! `sluice ca trust [--remove]`: the interception CA in (or out of) the trust stores of this host,
//! so clients accept the leaves the proxy mints.
//!
//! Two kinds of store:
//! - **The system store** (OpenSSL, GnuTLS, curl, Python, most command-line clients): Debian's
//!   `/usr/local/share/ca-certificates/sluice-<fingerprint>.crt` and `update-ca-certificates`, or
//!   on Fedora-like systems `/etc/pki/ca-trust/source/anchors/` and `update-ca-trust extract`.
//! - **NSS databases** (Chrome and Chromium: `~/.pki/nssdb`; Firefox: each profile under
//!   `~/.mozilla/firefox/`; their snap packages' copies too) of every home under `/home` and of
//!   `/root`, changed with `certutil` under the nickname [`NICKNAME`].
//!
//! `certutil` runs as the owner of the home it works in (uid and primary group, no other groups):
//! the databases stay owned by their user, and a link a user planted in their own home can only
//! lead `certutil` where that user could write anyway, never to a file only root may change.
//!
//! Everything is found under a root directory (`--root DIR` or `$SLUICE_TRUST_ROOT`, default `/`)
//! so that tests work on a tree of their own; under another root `update-ca-certificates` is
//! pointed at that tree's files and runs no hooks.
//!
//! One [`Line`] per store says what changed; a store that could not be changed is an error line,
//! never silence.

use std::{
    fs,
    io::Write as _,
    os::unix::{
        fs::{MetadataExt as _, PermissionsExt as _},
        process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

/// The nickname the CA has in NSS databases.
pub const NICKNAME: &str = "Sluice interception CA";

/// The environment variable that moves the root (`--root` wins).
pub const ROOT_ENV: &str = "SLUICE_TRUST_ROOT";

/// The CA to put in or take out.
#[derive(Debug, Clone)]
pub struct CaCert {
    /// PEM text.
    pub pem: String,
    /// DER.
    pub der: Vec<u8>,
}

impl CaCert {
    /// Reads the (first) certificate of a PEM file.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        use rustls_pki_types::pem::PemObject as _;
        let text = fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading the CA certificate {}: {e}", path.display()))?;
        let der = rustls_pki_types::CertificateDer::pem_slice_iter(text.as_bytes())
            .next()
            .ok_or_else(|| anyhow::anyhow!("{}: no certificate in it", path.display()))?
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(Self::from_der(der.to_vec()))
    }

    /// From DER (the PEM is made from it, so both always agree).
    pub fn from_der(der: Vec<u8>) -> Self {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
        let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(chunk));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
        Self { pem, der }
    }

    /// The first 8 bytes of the SHA-256 of the certificate, in hex: names the system store's file.
    pub fn short_fingerprint(&self) -> String {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &self.der);
        hex::encode(&d.as_ref()[..8])
    }

    /// The system store's file name for it.
    pub fn file_name(&self) -> String {
        format!("sluice-{}.crt", self.short_fingerprint())
    }
}

/// What happened to one store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The store (`system store /usr/local/...`, `nss sql:/home/alice/.pki/nssdb (alice)`).
    pub store: String,
    /// What changed, or why it could not.
    pub result: Result<String, String>,
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.result {
            Ok(what) => write!(f, "{}: {what}", self.store),
            Err(why) => write!(f, "error: {}: {why}", self.store),
        }
    }
}

/// Adds (or with `remove`, takes out) `ca` in every store under `root`.
pub fn apply(ca: &CaCert, root: &Path, remove: bool) -> Vec<Line> {
    let mut lines = vec![system_store(ca, root, remove)];
    let dbs = nss_databases(root);
    if dbs.is_empty() {
        lines.push(Line {
            store: "nss".into(),
            result: Ok(format!(
                "no browser certificate databases (~/.pki/nssdb, Firefox profiles) under {} and {}: nothing to change",
                root.join("root").display(),
                root.join("home/*").display()
            )),
        });
    }
    let certutil = find_program("certutil");
    for db in dbs {
        lines.push(nss_store(ca, &db, certutil.as_deref(), remove));
    }
    lines
}

/// A program on `PATH`, or in the sbin directories a non-root `PATH` may lack.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// Runs a command, its output captured: Ok(stdout) on success, Err(a line saying why).
fn run(cmd: &mut Command, input: Option<&[u8]>) -> Result<String, String> {
    let what = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: {e}"))?;
    if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(data)
            .map_err(|e| format!("{what}: writing its input: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{what}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let msg = stderr
            .lines()
            .chain(stdout.lines())
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" / ");
        Err(format!("{what} failed ({}): {msg}", out.status))
    }
}

// ------------------------------------------------------------------------------------------------
// The system store

fn system_store(ca: &CaCert, root: &Path, remove: bool) -> Line {
    let debian_dir = root.join("usr/local/share/ca-certificates");
    let update = find_program("update-ca-certificates");
    let anchors = root.join("etc/pki/ca-trust/source/anchors");
    if update.is_some() || debian_dir.is_dir() {
        let file = debian_dir.join(ca.file_name());
        let store = format!("system store {}", file.display());
        let result = match update {
            None => {
                Err("update-ca-certificates is not installed (Debian's ca-certificates)".into())
            }
            Some(update) => debian(ca, root, &debian_dir, &file, &update, remove),
        };
        return Line { store, result };
    }
    if root == Path::new("/") && anchors.is_dir() {
        let file = anchors.join(ca.file_name());
        let store = format!("system store {}", file.display());
        let result = match find_program("update-ca-trust") {
            None => Err("update-ca-trust is not installed".into()),
            Some(update) => fedora(ca, &file, &update, remove),
        };
        return Line { store, result };
    }
    Line {
        store: format!("system store under {}", root.display()),
        result: Err(
            "neither Debian's update-ca-certificates nor update-ca-trust is here: add the CA \
             (sluice ca export) to this system's store by hand"
                .into(),
        ),
    }
}

/// `update-ca-certificates`, pointed at `root`'s files when it is not `/` (hooks then do not run).
fn update_ca_certificates(update: &Path, root: &Path, fresh: bool) -> Command {
    let mut cmd = Command::new(update);
    if fresh {
        cmd.arg("--fresh");
    }
    if root != Path::new("/") {
        for (opt, rel) in [
            ("--certsconf", "etc/ca-certificates.conf"),
            ("--certsdir", "usr/share/ca-certificates"),
            ("--localcertsdir", "usr/local/share/ca-certificates"),
            ("--etccertsdir", "etc/ssl/certs"),
            ("--hooksdir", "etc/ca-certificates/update.d"),
        ] {
            cmd.arg(opt).arg(root.join(rel));
        }
    }
    cmd
}

/// The bundle `update-ca-certificates` writes, and whether it holds `ca`.
fn in_bundle(ca: &CaCert, root: &Path) -> Result<bool, String> {
    let bundle = root.join("etc/ssl/certs/ca-certificates.crt");
    match fs::read_to_string(&bundle) {
        Ok(text) => Ok(contains_cert(&text, &ca.der)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(format!("{}: {e}", bundle.display())),
    }
}

/// Whether PEM text holds the certificate `der`.
fn contains_cert(pem: &str, der: &[u8]) -> bool {
    use rustls_pki_types::pem::PemObject as _;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .flatten()
        .any(|c| c.as_ref() == der)
}

/// The summary line `update-ca-certificates` ends with (`1 added, 0 removed; done.`).
fn summary(out: &str) -> String {
    out.lines()
        .find(|l| l.contains(" added, "))
        .map_or_else(String::new, |l| {
            format!(
                " (update-ca-certificates: {})",
                l.trim().trim_end_matches('.')
            )
        })
}

fn debian(
    ca: &CaCert,
    root: &Path,
    dir: &Path,
    file: &Path,
    update: &Path,
    remove: bool,
) -> Result<String, String> {
    let io = |p: &Path| {
        let p = p.to_owned();
        move |e: std::io::Error| format!("{}: {e}", p.display())
    };
    if remove {
        if !file.exists() {
            return Ok("not present: nothing to remove".into());
        }
        fs::remove_file(file).map_err(io(file))?;
        // --fresh: a plain run keeps the now dangling link in /etc/ssl/certs.
        let out = run(&mut update_ca_certificates(update, root, true), None)?;
        if in_bundle(ca, root)? {
            return Err(format!(
                "removed {} but the CA is still in {}",
                file.display(),
                root.join("etc/ssl/certs/ca-certificates.crt").display()
            ));
        }
        return Ok(format!("removed{}", summary(&out)));
    }
    let current = fs::read(file).ok();
    if current.as_deref() == Some(ca.pem.as_bytes()) && in_bundle(ca, root)? {
        return Ok("already trusted: nothing to change".into());
    }
    fs::create_dir_all(dir).map_err(io(dir))?;
    let certs = root.join("etc/ssl/certs");
    fs::create_dir_all(&certs).map_err(io(&certs))?;
    let tmp = file.with_extension("tmp");
    fs::write(&tmp, &ca.pem)
        .and_then(|()| fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)))
        .and_then(|()| fs::rename(&tmp, file))
        .map_err(io(file))?;
    let out = run(&mut update_ca_certificates(update, root, false), None)?;
    if !in_bundle(ca, root)? {
        return Err(format!(
            "wrote {} but update-ca-certificates did not put it in {}",
            file.display(),
            certs.join("ca-certificates.crt").display()
        ));
    }
    Ok(format!("added{}", summary(&out)))
}

fn fedora(ca: &CaCert, file: &Path, update: &Path, remove: bool) -> Result<String, String> {
    let io = |e: std::io::Error| format!("{}: {e}", file.display());
    if remove {
        if !file.exists() {
            return Ok("not present: nothing to remove".into());
        }
        fs::remove_file(file).map_err(io)?;
        run(Command::new(update).arg("extract"), None)?;
        return Ok("removed (update-ca-trust extract)".into());
    }
    if fs::read(file).ok().as_deref() == Some(ca.pem.as_bytes()) {
        return Ok("already trusted: nothing to change".into());
    }
    fs::write(file, &ca.pem)
        .and_then(|()| fs::set_permissions(file, fs::Permissions::from_mode(0o644)))
        .map_err(io)?;
    run(Command::new(update).arg("extract"), None)?;
    Ok("added (update-ca-trust extract)".into())
}

// ------------------------------------------------------------------------------------------------
// NSS databases

/// One NSS database and whose it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NssDb {
    /// The directory holding `cert9.db`.
    pub dir: PathBuf,
    /// The home it is in.
    pub home: PathBuf,
    /// The home's owner: `certutil` runs as them.
    pub uid: u32,
    /// Their primary group.
    pub gid: u32,
    /// Their name (the uid when unknown).
    pub user: String,
}

/// Every NSS database (a directory with `cert9.db`) browsers use, in `/root` and `/home/*` under
/// `root`: `~/.pki/nssdb`, Firefox profiles, and the snap packages' copies of both.
pub fn nss_databases(root: &Path) -> Vec<NssDb> {
    let mut homes = vec![root.join("root")];
    if let Ok(rd) = fs::read_dir(root.join("home")) {
        let mut more: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        more.sort();
        homes.extend(more);
    }
    let mut out = Vec::new();
    for home in homes {
        // The home itself must be a directory, not a link (whose owner would say nothing).
        let Ok(meta) = fs::symlink_metadata(&home) else {
            continue;
        };
        if !meta.is_dir() {
            continue;
        }
        let (uid, mut gid) = (meta.uid(), meta.gid());
        let mut user = format!("uid {uid}");
        if root == Path::new("/")
            && let Ok(Some(u)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        {
            gid = u.gid.as_raw();
            user = u.name;
        } else if let Some(name) = home.file_name().and_then(|n| n.to_str()) {
            user = format!("{name}, uid {uid}");
        }
        let mut dirs = vec![
            home.join(".pki/nssdb"),
            home.join("snap/chromium/current/.pki/nssdb"),
        ];
        for profiles in [
            home.join(".mozilla/firefox"),
            home.join("snap/firefox/common/.mozilla/firefox"),
        ] {
            if let Ok(rd) = fs::read_dir(&profiles) {
                let mut p: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
                p.sort();
                dirs.extend(p);
            }
        }
        for dir in dirs {
            if dir.join("cert9.db").is_file() {
                out.push(NssDb {
                    dir,
                    home: home.clone(),
                    uid,
                    gid,
                    user: user.clone(),
                });
            }
        }
    }
    out
}

/// `certutil ARGS -d sql:DIR`, run as the database's user.
fn certutil(program: &Path, db: &NssDb, args: &[&str]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .arg("-d")
        .arg(format!("sql:{}", db.dir.display()))
        .env("HOME", &db.home)
        .current_dir(&db.dir);
    if nix::unistd::geteuid().as_raw() != db.uid {
        // std drops the supplementary groups too when it changes a root process's uid.
        cmd.uid(db.uid).gid(db.gid);
    }
    cmd
}

/// The certificates filed under [`NICKNAME`] (PEM), empty when there are none.
fn listed(program: &Path, db: &NssDb) -> Result<String, String> {
    match run(
        &mut certutil(program, db, &["-L", "-a", "-n", NICKNAME]),
        None,
    ) {
        Ok(pem) => Ok(pem),
        // certutil says "Could not find cert: NAME" with a failure status when there is none.
        Err(e) if e.contains("Could not find cert") => Ok(String::new()),
        Err(e) => Err(e),
    }
}

fn nss_store(ca: &CaCert, db: &NssDb, program: Option<&Path>, remove: bool) -> Line {
    let store = format!("nss sql:{} ({})", db.dir.display(), db.user);
    let result = match program {
        None => Err("certutil is not installed (Debian: libnss3-tools)".into()),
        Some(p) => nss_change(ca, db, p, remove).and_then(|what| {
            owned_by(db)?;
            Ok(what)
        }),
    };
    Line { store, result }
}

fn nss_change(ca: &CaCert, db: &NssDb, p: &Path, remove: bool) -> Result<String, String> {
    let before = listed(p, db)?;
    let ours = contains_cert(&before, &ca.der);
    if remove {
        if !ours {
            return Ok(if before.trim().is_empty() {
                "not present: nothing to remove".into()
            } else {
                format!("not present (another certificate named \"{NICKNAME}\" is left as it is)")
            });
        }
        // One `-D` removes one certificate of the nickname; an older Sluice CA may share it.
        for _ in 0..8 {
            run(&mut certutil(p, db, &["-D", "-n", NICKNAME]), None)?;
            if !contains_cert(&listed(p, db)?, &ca.der) {
                return Ok(format!("removed \"{NICKNAME}\""));
            }
        }
        return Err(format!("\"{NICKNAME}\" is still there after deleting it"));
    }
    if ours {
        return Ok("already trusted: nothing to change".into());
    }
    let mut replaced = false;
    // An older Sluice CA under the nickname goes: it is no longer the agent's.
    for _ in 0..8 {
        if listed(p, db)?.trim().is_empty() {
            break;
        }
        run(&mut certutil(p, db, &["-D", "-n", NICKNAME]), None)?;
        replaced = true;
    }
    run(
        &mut certutil(p, db, &["-A", "-a", "-n", NICKNAME, "-t", "C,,"]),
        Some(ca.pem.as_bytes()),
    )?;
    if !contains_cert(&listed(p, db)?, &ca.der) {
        return Err(format!(
            "certutil -A succeeded but \"{NICKNAME}\" is not listed"
        ));
    }
    Ok(if replaced {
        format!("added \"{NICKNAME}\" (C,,), replacing an older one")
    } else {
        format!("added \"{NICKNAME}\" (C,,)")
    })
}

/// The database's files must still belong to the home's owner.
fn owned_by(db: &NssDb) -> Result<(), String> {
    let rd = fs::read_dir(&db.dir).map_err(|e| format!("{}: {e}", db.dir.display()))?;
    let wrong: Vec<String> = rd
        .flatten()
        .filter_map(|e| {
            let m = fs::symlink_metadata(e.path()).ok()?;
            (m.uid() != db.uid).then(|| format!("{} (uid {})", e.path().display(), m.uid()))
        })
        .collect();
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "changed, but files are not owned by uid {}: {}",
            db.uid,
            wrong.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_file_names_and_pem() {
        let ca = CaCert::from_der(vec![1, 2, 3]);
        assert_eq!(ca.short_fingerprint().len(), 16);
        assert!(ca.file_name().starts_with("sluice-") && ca.file_name().ends_with(".crt"));
        assert!(ca.pem.starts_with("-----BEGIN CERTIFICATE-----\nAQID\n"));
        assert!(contains_cert(&ca.pem, &[1, 2, 3]));
        assert!(!contains_cert(&ca.pem, &[1, 2]));
    }

    #[test]
    fn summary_of_update_ca_certificates() {
        let out = "Updating certificates in /etc/ssl/certs...\n1 added, 0 removed; done.\n";
        assert_eq!(
            summary(out),
            " (update-ca-certificates: 1 added, 0 removed; done)"
        );
        assert_eq!(summary(""), "");
    }

    #[test]
    fn lines_read_as_results() {
        let ok = Line {
            store: "nss sql:/x".into(),
            result: Ok("added".into()),
        };
        let bad = Line {
            store: "nss sql:/y".into(),
            result: Err("certutil failed".into()),
        };
        assert_eq!(ok.to_string(), "nss sql:/x: added");
        assert_eq!(bad.to_string(), "error: nss sql:/y: certutil failed");
    }
}
