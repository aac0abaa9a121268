//! Every command a Sluice program prints for a person to run works as printed.
//!
//! The commands are taken from the programs' real output where that is practical (`sluice ca
//! init` prints how to trust the CA, `sluice ca trust` how to take it out again, the collector's
//! "see `...`" hints) and run exactly as printed through `sh -c`. `cargo xtask up` is too big to
//! run here, so its printed `status` lines are read from its source, filled in with this test's
//! binary and configuration the way `up` fills them, and run against an agent the test starts.
//!
//! The trust-store test works on a tree of its own (`$SLUICE_TRUST_ROOT`): a temporary
//! ca-certificates layout and NSS databases made with `certutil -N`, one owned by another user. It
//! never needs the host's stores, and a guard puts the host's back as they were if anything
//! reached them anyway, failure or not.

#![allow(clippy::unwrap_used)]

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use sluice_e2e::{Agent, TempDir, bin, require_root, wait_until};

/// `sh -c LINE`, with `env` added.
fn shell(line: &str, env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(line);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("sh")
}

fn text(o: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The command after `prefix` on the first line of `out` that has it.
fn printed_after(out: &str, prefix: &str) -> String {
    out.lines()
        .find_map(|l| l.split_once(prefix).map(|(_, c)| c.trim().to_owned()))
        .unwrap_or_else(|| panic!("no line with {prefix:?} in:\n{out}"))
}

/// The command between backquotes after `prefix` (`see `sluice-collector ... agent list``).
fn quoted_after(out: &str, prefix: &str) -> String {
    let rest = out
        .split_once(prefix)
        .map(|(_, r)| r)
        .unwrap_or_else(|| panic!("no {prefix:?} in:\n{out}"));
    let rest = rest
        .trim_start()
        .strip_prefix('`')
        .expect("a quoted command");
    rest.split_once('`')
        .expect("closing backquote")
        .0
        .to_owned()
}

fn certutil(args: &[&str], db: &Path) -> Output {
    Command::new("certutil")
        .args(args)
        .arg("-d")
        .arg(format!("sql:{}", db.display()))
        .output()
        .expect("certutil (libnss3-tools) is installed by `cargo xtask test`")
}

fn new_nss_db(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    let o = certutil(&["-N", "--empty-password"], dir);
    assert!(o.status.success(), "certutil -N: {}", text(&o));
}

fn chown_tree(path: &Path, uid: u32, gid: u32) {
    let o = Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{gid}"))
        .arg(path)
        .output()
        .unwrap();
    assert!(o.status.success(), "chown: {}", text(&o));
}

/// Puts the host's system store back as it was when the test began: a `sluice-*.crt` that
/// appeared in /usr/local/share/ca-certificates is removed and the store refreshed, whether
/// the test passed or not. The tests aim never to need it.
struct HostStoreGuard {
    before: Vec<PathBuf>,
}

const HOST_LOCAL: &str = "/usr/local/share/ca-certificates";

fn sluice_files() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(HOST_LOCAL)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("sluice-"))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

impl HostStoreGuard {
    fn new() -> Self {
        Self {
            before: sluice_files(),
        }
    }
    fn changed(&self) -> bool {
        sluice_files() != self.before
    }
}

impl Drop for HostStoreGuard {
    fn drop(&mut self) {
        let extra: Vec<PathBuf> = sluice_files()
            .into_iter()
            .filter(|p| !self.before.contains(p))
            .collect();
        if !extra.is_empty() {
            for p in &extra {
                let _ = fs::remove_file(p);
            }
            let _ = Command::new("update-ca-certificates")
                .arg("--fresh")
                .stdout(Stdio::null())
                .status();
        }
    }
}

/// A ca-certificates tree and NSS databases under `root`: root's Chrome database, alice's
/// (uid 4242) Chrome database and Firefox profile.
fn trust_root(root: &Path) -> (PathBuf, PathBuf, PathBuf) {
    for d in [
        "etc/ssl/certs",
        "usr/share/ca-certificates",
        "usr/local/share/ca-certificates",
    ] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    // One CA of the distribution's, as on any real system (with none at all,
    // update-ca-certificates would leave the old bundle in place).
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "Some distribution CA");
    let other = p.self_signed(&key).unwrap();
    fs::create_dir_all(root.join("usr/share/ca-certificates/mozilla")).unwrap();
    fs::write(
        root.join("usr/share/ca-certificates/mozilla/Some_CA.crt"),
        other.pem(),
    )
    .unwrap();
    fs::write(
        root.join("etc/ca-certificates.conf"),
        "mozilla/Some_CA.crt\n",
    )
    .unwrap();
    let root_db = root.join("root/.pki/nssdb");
    let chrome = root.join("home/alice/.pki/nssdb");
    let firefox = root.join("home/alice/.mozilla/firefox/x1y2z3.default-release");
    for db in [&root_db, &chrome, &firefox] {
        new_nss_db(db);
    }
    chown_tree(&root.join("home/alice"), 4242, 4242);
    // Directories an unprivileged certutil must pass through.
    for d in [root.to_path_buf(), root.join("home")] {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
    }
    (root_db, chrome, firefox)
}

fn listed_in(db: &Path) -> Option<String> {
    let o = certutil(&["-L"], db);
    let list = String::from_utf8_lossy(&o.stdout).into_owned();
    list.lines()
        .find(|l| l.starts_with("Sluice interception CA"))
        .map(|l| {
            l.trim_start_matches("Sluice interception CA")
                .trim()
                .to_owned()
        })
}

fn all_owned_by(dir: &Path, uid: u32) {
    for e in fs::read_dir(dir).unwrap().flatten() {
        let m = fs::symlink_metadata(e.path()).unwrap();
        assert_eq!(
            m.uid(),
            uid,
            "{} must stay owned by uid {uid}",
            e.path().display()
        );
    }
}

/// `sluice ca init --org` prints how to trust the CA; that command, run as printed (under a
/// trust root of the test's), puts it in the system store and every NSS database, as their
/// owners; it prints how to take it out again, and that command, run as printed, does.
#[test]
#[ignore = "needs root"]
fn ca_init_and_ca_trust_print_commands_that_work() {
    require_root();
    let guard = HostStoreGuard::new();
    let host_bundle = fs::read("/etc/ssl/certs/ca-certificates.crt").ok();
    let t = TempDir::new("printed-trust");
    let root = t.join("root");
    let (root_db, chrome, firefox) = trust_root(&root);
    let cfg = t.join("agent.toml");
    fs::write(
        &cfg,
        format!(
            "state_dir = \"{}\"\n[steer]\nenabled = false\n\n[[apps]]\nid = \"files\"\n\
             hosts = [\"files.test\", \"*.corp.test\", \"10.9.9.9\"]\n",
            t.join("state").display()
        ),
    )
    .unwrap();

    let init = Command::new(bin("sluice"))
        .args([
            "ca", "init", "--org", "Test Org", "--days", "90", "--config",
        ])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", text(&init));
    let init_out = String::from_utf8_lossy(&init.stdout).into_owned();
    assert!(init_out.contains("valid for 90 days"), "{init_out}");
    assert!(
        init_out.contains("corp.test") && init_out.contains("files.test"),
        "{init_out}"
    );
    let trust = printed_after(&init_out, "trust it on this host:");

    let root_env: [(&str, &Path); 1] = [("SLUICE_TRUST_ROOT", &root)];
    let o = shell(&trust, &root_env);
    assert!(o.status.success(), "{trust}: {}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(
        out.lines().filter(|l| l.contains(": added")).count(),
        4,
        "system store + 3 NSS databases:\n{out}"
    );
    let local: Vec<PathBuf> = fs::read_dir(root.join("usr/local/share/ca-certificates"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(local.len(), 1, "{local:?}");
    let name = local[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("sluice-") && name.ends_with(".crt") && name.len() == 7 + 16 + 4);
    let ca_pem = fs::read_to_string(t.join("state/ca/ca.crt")).unwrap();
    let bundle = fs::read_to_string(root.join("etc/ssl/certs/ca-certificates.crt")).unwrap();
    let body: String = ca_pem.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(
        bundle.lines().collect::<String>().contains(&body),
        "the bundle holds the CA"
    );
    for db in [&root_db, &chrome, &firefox] {
        assert_eq!(listed_in(db).as_deref(), Some("C,,"), "{}", db.display());
    }
    all_owned_by(&chrome, 4242);
    all_owned_by(&firefox, 4242);
    all_owned_by(&root_db, 0);

    // Again: nothing to change, still success.
    let o = shell(&trust, &root_env);
    assert!(o.status.success(), "{}", text(&o));
    let again = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(
        again
            .lines()
            .filter(|l| l.contains("already trusted"))
            .count(),
        4,
        "{again}"
    );

    // The undo line, run exactly as printed (no environment: it names the root itself).
    let remove = printed_after(&out, "to take it out again:");
    let o = shell(&remove, &[]);
    assert!(o.status.success(), "{remove}: {}", text(&o));
    let removed = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(
        removed.lines().filter(|l| l.contains(": removed")).count(),
        4,
        "{removed}"
    );
    assert!(
        fs::read_dir(root.join("usr/local/share/ca-certificates"))
            .unwrap()
            .next()
            .is_none()
    );
    let bundle =
        fs::read_to_string(root.join("etc/ssl/certs/ca-certificates.crt")).unwrap_or_default();
    assert!(!bundle.lines().collect::<String>().contains(&body));
    for db in [&root_db, &chrome, &firefox] {
        assert_eq!(listed_in(db), None, "{}", db.display());
    }
    all_owned_by(&chrome, 4242);

    // A database its home's owner cannot write is an error line and a failure, not silence.
    let bob = root.join("home/bob/.pki/nssdb");
    new_nss_db(&bob);
    chown_tree(&root.join("home/bob"), 4343, 4343);
    chown_tree(&bob, 4444, 4444);
    {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&bob, fs::Permissions::from_mode(0o700)).unwrap();
    }
    let o = shell(&trust, &root_env);
    assert!(!o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        out.lines()
            .any(|l| l.starts_with("error: nss sql:") && l.contains("home/bob")),
        "{out}"
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("could not be changed"),
        "{}",
        text(&o)
    );
    assert_eq!(
        out.lines().filter(|l| l.contains(": added")).count(),
        4,
        "{out}"
    );
    assert_eq!(listed_in(&bob), None);

    // The host's own store was never touched.
    assert!(
        !guard.changed(),
        "the host's /usr/local/share/ca-certificates changed"
    );
    assert_eq!(
        fs::read("/etc/ssl/certs/ca-certificates.crt").ok(),
        host_bundle,
        "the host's bundle changed"
    );
}

/// The `status` lines `cargo xtask up` prints (read from its source), filled in as it fills
/// them, run against a running agent: they print the summary; `--json` the document; once the
/// agent is gone they fail with a clear message.
#[test]
#[ignore = "needs root"]
fn the_status_commands_xtask_up_prints_work() {
    require_root();
    let up = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../xtask/src/up.rs"))
        .expect("xtask/src/up.rs");
    // Each printed status command, as a template of the binary and the agent's config.
    let mut templates: Vec<String> = Vec::new();
    for line in up.lines().filter(|l| l.contains("status --config")) {
        let t = line
            .split_once(':')
            .map(|(_, r)| r)
            .unwrap_or(line)
            .trim()
            .trim_end_matches("\\n  \\")
            .trim_end_matches("\\n")
            .to_owned();
        // `agent: {} status --config {}; curl ...`: the command is the part before `;`.
        let t = t.split(';').next().unwrap_or(&t).trim().to_owned();
        let t = t.replace("{sluice}", "{}").replace("{acfg}", "{}");
        let t = t.trim_start_matches("ip netns exec sluice-gw ").to_owned();
        assert_eq!(
            t, "{} status --config {}",
            "a printed status command of xtask up changed shape: {line}"
        );
        templates.push(t);
    }
    assert!(
        templates.len() >= 2,
        "xtask up prints a status command for the host and for the branch demo"
    );
    // Its `ca trust` hint has the shape `sluice ca init` prints, which the trust test runs.
    let trust: Vec<&str> = up
        .lines()
        .filter(|l| l.contains("ca trust --config"))
        .collect();
    assert!(!trust.is_empty(), "xtask up says how to trust the CA");
    for l in trust {
        assert!(l.contains("{} ca trust --config {}"), "{l}");
    }
    let t = TempDir::new("printed-status");
    let config = format!(
        "state_dir = \"{}\"\n[steer]\nenabled = false\n[proxy]\nport = 0\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        t.join("state").display()
    );
    let mut agent = Agent::launch(&config, &t).expect("agent");
    let cfg = t.join("agent.toml");
    let line = templates[0]
        .replacen("{}", &bin("sluice").display().to_string(), 1)
        .replacen("{}", &cfg.display().to_string(), 1);
    let o = shell(&line, &[]);
    assert!(o.status.success(), "{line}: {}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.starts_with("sluice "), "{out}");
    assert!(out.contains(": ready"), "{out}");
    assert!(out.contains("mode         proxy only"), "{out}");
    assert!(
        out.contains(&format!("admin        {} (from", agent.admin)),
        "{out}"
    );
    assert!(out.contains("admin.addr"), "{out}");
    let o = shell(&format!("{line} --json"), &[]);
    assert!(o.status.success(), "{}", text(&o));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(doc["ready"], true);
    agent
        .signal_and_wait(nix::sys::signal::Signal::SIGTERM)
        .expect("stops");
    let o = shell(&line, &[]);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(err.contains("the agent is not reachable at"), "{err}");
}

/// The hints `sluice-collector` prints (`see `...``) run as printed; `sluice-collector status`
/// reports a stopped collector as such (non-zero) and a running one with its figures.
#[test]
fn the_collector_prints_commands_that_work_and_reports_its_status() {
    let t = TempDir::new("printed-collector");
    let cfg = t.join("collector.toml");
    fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\nca_days = 30\n",
            t.join("state").display()
        ),
    )
    .unwrap();
    let collector = |args: &[&str]| {
        Command::new(bin("sluice-collector"))
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .output()
            .unwrap()
    };
    let o = collector(&["init"]);
    assert!(o.status.success(), "{}", text(&o));

    for (args, want) in [
        (&["agent", "revoke", "ag_nobody"][..], "agent list"),
        (&["apitoken", "revoke", "nobody"][..], "apitoken list"),
    ] {
        let o = collector(args);
        assert!(!o.status.success(), "{}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        let hint = quoted_after(&err, "(see");
        assert!(hint.ends_with(want), "{hint}");
        let o = shell(&hint, &[]);
        assert!(o.status.success(), "{hint}: {}", text(&o));
    }

    // Not running: the store's figures, and a failure that says so.
    let o = collector(&["status"]);
    assert!(!o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        out.starts_with("sluice-collector: NOT reachable: ") && out.contains("listen.addr"),
        "{out}"
    );
    assert!(out.contains("0 events"), "{out}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("not reachable"));

    let mut run = Command::new(bin("sluice-collector"))
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(fs::File::create(t.join("collector.log")).unwrap())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = {
        let listening = wait_until(Duration::from_secs(20), || {
            t.join("state/listen.addr").exists() || run.try_wait().ok().flatten().is_some()
        });
        assert!(
            listening && run.try_wait().ok().flatten().is_none(),
            "collector: {}",
            fs::read_to_string(t.join("collector.log")).unwrap_or_default()
        );
        Kill(run)
    };
    let o = collector(&["status"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.starts_with("sluice-collector "), "{out}");
    assert!(out.contains(": running for"), "{out}");
    assert!(out.contains("0 enrolled"), "{out}");
    assert!(out.contains("queue 0 events waiting"), "{out}");
    let o = collector(&["status", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(doc["reachable"], true, "{doc}");
    assert_eq!(doc["store"]["events"], 0, "{doc}");
    // Its token is kept and reused: one `local-status` token however often it runs.
    let o = collector(&["apitoken", "list"]);
    let list = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(
        list.lines()
            .filter(|l| l.starts_with("local-status") && l.contains("active"))
            .count(),
        1,
        "{list}"
    );
}

/// Hints that name a command with placeholders (`FILE`, `TOKEN`) name real subcommands and
/// options: the program's own help lists them.
#[test]
fn hints_with_placeholders_name_real_options() {
    for (program, sub, options) in [
        // report: "not shipped until `sluice enroll --config FILE --token-file FILE`"
        ("sluice", &["enroll"][..], &["--config", "--token-file"][..]),
        // app: "create one with `sluice ca init --config FILE`"
        (
            "sluice",
            &["ca", "init"][..],
            &["--config", "--org", "--days"][..],
        ),
        (
            "sluice",
            &["ca", "trust"][..],
            &["--config", "--remove", "--root"][..],
        ),
        (
            "sluice",
            &["status"][..],
            &["--config", "--admin", "--json"][..],
        ),
        (
            "sluice-collector",
            &["token", "create"][..],
            &["--config"][..],
        ),
        (
            "sluice-collector",
            &["status"][..],
            &["--config", "--json"][..],
        ),
    ] {
        let o = Command::new(bin(program))
            .args(sub)
            .arg("--help")
            .output()
            .unwrap();
        assert!(o.status.success(), "{program} {sub:?} --help: {}", text(&o));
        let help = String::from_utf8_lossy(&o.stdout).into_owned();
        for opt in options {
            assert!(
                help.contains(opt),
                "{program} {} has no {opt}:\n{help}",
                sub.join(" ")
            );
        }
    }
}
