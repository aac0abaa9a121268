//! Measured device posture: runs the checks of the active bundle's `posture.yaml`
//! ([`sluice_policy::posture::Posture`]) on this device and says, for each, pass, fail or unknown
//! with a human reason. The policy crate turns those results into tags
//! ([`Posture::tags`](sluice_policy::posture::Posture::tags)); the scheduler that re-evaluates
//! every `interval_s`, swaps the tags into the session controls and reports them lives with the
//! app. [`facts`] holds the unconditional facts the Device Inventory events carry.
//!
//! Everything is read through one root directory (`[posture] root`, `/` on a device; a prepared
//! tree in tests, see [`fs`]), never following a link out of it. Every read is bounded: files by
//! size, `/proc` by [`process::MAX_PROCESSES`], hashing by [`process::MAX_HASH_BYTES`]; what
//! cannot be read within the bounds is unknown, never guessed. [`evaluate`] blocks (it reads
//! files and hashes executables): call it on a blocking thread, or use [`run`]. The firewall is
//! the one fact that needs a command (`nft`), so it is measured beforehand, asynchronously, by
//! [`firewall::measure`] and passed in.

pub mod facts;
pub mod firewall;
pub mod fs;
pub mod process;
mod system;
pub mod watch;

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use sluice_policy::posture::{CheckKind, CheckSpec, CheckStatus, Posture, Version};

pub use firewall::FirewallFact;

/// How the host's processes and firewall are read when the checks run without the privilege to
/// read them (the unprivileged proxy, root `/`): through the privileged part, which may read every
/// `/proc/PID/exe` and ask nftables. The privileged part only gathers; the proxy interprets.
pub trait HostFacts: Send + Sync + std::fmt::Debug + 'static {
    /// The host's processes.
    fn processes(&self) -> Result<process::Scan, String>;
    /// The SHA-256 of the executable `pid` runs, if it is still `exe`.
    fn hash_exe(&self, pid: u32, exe: &std::path::Path, max_bytes: u64) -> Result<String, String>;
    /// `nft -j list ruleset`.
    fn firewall(&self) -> Result<String, String>;
}

static HOST_FACTS: std::sync::OnceLock<Arc<dyn HostFacts>> = std::sync::OnceLock::new();

/// From now on, the host (root `/`) is read through `facts`.
pub fn read_host_through(facts: Arc<dyn HostFacts>) {
    let _ = HOST_FACTS.set(facts);
}

/// The host's facts source, when one was set.
fn host_facts() -> Option<&'static Arc<dyn HostFacts>> {
    HOST_FACTS.get()
}

/// This agent's version, as `agent_version` checks compare it.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Longest [`run`] waits for one evaluation before calling every check unknown.
pub const EVALUATION_TIMEOUT: Duration = Duration::from_secs(60);

/// What the checks read besides the system's files.
#[derive(Debug, Clone)]
pub struct CheckEnv {
    /// The measured system's root (`[posture] root`; `/` is this host).
    pub root: PathBuf,
    /// The agent's version ([`AGENT_VERSION`]).
    pub agent_version: String,
    /// Seconds since the active bundle was fetched and verified (`None`: not known).
    pub bundle_age_s: Option<u64>,
    /// The firewall, as [`firewall::measure`] found it (`None`: not measured).
    pub firewall: Option<FirewallFact>,
}

impl CheckEnv {
    /// The system under `root`, with this agent's version and nothing else known.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            agent_version: AGENT_VERSION.to_owned(),
            bundle_age_s: None,
            firewall: None,
        }
    }
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    /// The check's id in `posture.yaml`.
    pub id: String,
    /// Its kind.
    pub kind: CheckKind,
    /// Pass, fail or unknown.
    pub status: CheckStatus,
    /// Why, for people (`kernel 6.12.48 >= 6.1`, `/sys/firmware/efi is absent: not booted
    /// with UEFI`).
    pub detail: String,
}

impl CheckResult {
    /// As the collector receives it.
    pub fn to_protocol(&self) -> sluice_protocol::PostureCheck {
        sluice_protocol::PostureCheck {
            id: self.id.clone(),
            kind: self.kind.as_str().to_owned(),
            status: self.status.as_str().to_owned(),
            detail: self.detail.clone(),
        }
    }
}

/// The statuses by check id, as [`Posture::tags`] takes them.
pub fn statuses(results: &[CheckResult]) -> BTreeMap<String, CheckStatus> {
    results.iter().map(|r| (r.id.clone(), r.status)).collect()
}

/// A status and its reason, as the checks produce them.
type Outcome = (CheckStatus, String);

fn pass(detail: impl Into<String>) -> Outcome {
    (CheckStatus::Pass, detail.into())
}
fn fail(detail: impl Into<String>) -> Outcome {
    (CheckStatus::Fail, detail.into())
}
fn unknown(detail: impl Into<String>) -> Outcome {
    (CheckStatus::Unknown, detail.into())
}

/// Runs every check of `spec` on the system under `env.root`, in file order. Blocks.
pub fn evaluate(spec: &Posture, env: &CheckEnv) -> Vec<CheckResult> {
    let root = fs::Root::new(&env.root);
    // Read once, for every process check, when the first one needs it.
    let mut processes: Option<process::Scan> = None;
    spec.checks
        .iter()
        .map(|check| {
            let (status, detail) = match &check.spec {
                CheckSpec::DiskEncrypted => system::disk_encrypted(&root),
                CheckSpec::Firewall => firewall::check(env.firewall.as_ref()),
                CheckSpec::OsVersion { os, min } => system::os_version(&root, os, min.as_ref()),
                CheckSpec::KernelVersion { min } => system::kernel_version(&root, min),
                CheckSpec::PackagesUpdated { max_days } => {
                    system::packages_updated(&root, *max_days, std::time::SystemTime::now())
                }
                CheckSpec::SecureBoot => system::secure_boot(&root),
                CheckSpec::ProcessRunning {
                    exe,
                    sha256,
                    run_as,
                } => {
                    let scan = processes.get_or_insert_with(|| process::Scan::read(&root));
                    process::running(&root, scan, exe, sha256.as_deref(), *run_as)
                }
                CheckSpec::ProcessAbsent { exe, comm } => {
                    let scan = processes.get_or_insert_with(|| process::Scan::read(&root));
                    process::absent(scan, exe.as_deref(), comm.as_deref())
                }
                CheckSpec::AgentVersion { min } => agent_version(&env.agent_version, min),
                CheckSpec::BundleFresh { max_age_s } => bundle_fresh(env.bundle_age_s, *max_age_s),
            };
            CheckResult {
                id: check.id.clone(),
                kind: check.kind(),
                status,
                detail,
            }
        })
        .collect()
}

/// [`evaluate`] on a blocking thread, bounded by [`EVALUATION_TIMEOUT`]; a thread that fails
/// or takes longer leaves every check unknown (the thread itself is left to finish).
pub async fn run(spec: Arc<Posture>, env: CheckEnv) -> Vec<CheckResult> {
    let task = {
        let spec = spec.clone();
        tokio::task::spawn_blocking(move || evaluate(&spec, &env))
    };
    let why = match tokio::time::timeout(EVALUATION_TIMEOUT, task).await {
        Ok(Ok(results)) => return results,
        Ok(Err(e)) => format!("the evaluation failed: {e}"),
        Err(_) => format!(
            "the evaluation took longer than {} s",
            EVALUATION_TIMEOUT.as_secs()
        ),
    };
    spec.checks
        .iter()
        .map(|c| CheckResult {
            id: c.id.clone(),
            kind: c.kind(),
            status: CheckStatus::Unknown,
            detail: why.clone(),
        })
        .collect()
}

/// `what version >= min`, or why not.
fn at_least(what: &str, raw: &str, min: &Version) -> Outcome {
    match Version::parse_prefix(raw) {
        None => unknown(format!("{what} `{raw}` is not a version")),
        Some(v) if v >= *min => pass(format!("{what} {raw} >= {min}")),
        Some(_) => fail(format!("{what} {raw} < {min}")),
    }
}

fn agent_version(version: &str, min: &Version) -> Outcome {
    at_least("agent", version, min)
}

fn bundle_fresh(age_s: Option<u64>, max_age_s: u64) -> Outcome {
    match age_s {
        None => unknown("the active bundle's age is not known"),
        Some(a) if a <= max_age_s => pass(format!(
            "the bundle was verified {a} s ago (at most {max_age_s} s)"
        )),
        Some(a) => fail(format!(
            "the bundle was verified {a} s ago, more than {max_age_s} s"
        )),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;

    use super::*;

    /// A directory tree under the system's temporary directory, removed on drop.
    pub(crate) struct TempTree(PathBuf);

    impl TempTree {
        pub(crate) fn new(tag: &str) -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("sluice-posture-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("root")).expect("temp dir");
            Self(dir)
        }
        /// The tree's root (its parent directory is outside the root).
        pub(crate) fn root(&self) -> PathBuf {
            self.0.join("root")
        }
        /// Writes a file next to the root, outside it.
        pub(crate) fn outside(&self, rel: &str, contents: impl AsRef<[u8]>) -> PathBuf {
            let p = self.0.join(rel);
            std::fs::write(&p, contents).expect("write");
            p
        }
        fn at(&self, rel: &str) -> PathBuf {
            let p = self.root().join(rel);
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).expect("mkdir");
            }
            p
        }
        pub(crate) fn file(&self, rel: &str, contents: impl AsRef<[u8]>) -> PathBuf {
            let p = self.at(rel);
            std::fs::write(&p, contents).expect("write");
            p
        }
        pub(crate) fn dir(&self, rel: &str) {
            std::fs::create_dir_all(self.root().join(rel)).expect("mkdir");
        }
        pub(crate) fn link(&self, rel: &str, target: &str) {
            std::os::unix::fs::symlink(target, self.at(rel)).expect("symlink");
        }
    }

    impl Drop for TempTree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    pub(crate) fn spec(yaml: &str) -> Posture {
        Posture::from_yaml(yaml).expect("posture.yaml")
    }

    #[test]
    fn agent_version_and_bundle_age() {
        let p = spec(
            "checks:\n  - id: agent\n    kind: agent_version\n    min: \"0.1.0\"\n  - id: new\n    kind: agent_version\n    min: \"99\"\n  - id: b\n    kind: bundle_fresh\n    max_age_s: 60\n",
        );
        let mut env = CheckEnv::new("/nonexistent");
        let r = evaluate(&p, &env);
        assert_eq!(r[0].status, CheckStatus::Pass, "{:?}", r[0]);
        assert_eq!(r[0].detail, format!("agent {AGENT_VERSION} >= 0.1.0"));
        assert_eq!(r[1].status, CheckStatus::Fail);
        assert_eq!(r[2].status, CheckStatus::Unknown);
        env.bundle_age_s = Some(10);
        assert_eq!(evaluate(&p, &env)[2].status, CheckStatus::Pass);
        env.bundle_age_s = Some(61);
        assert_eq!(evaluate(&p, &env)[2].status, CheckStatus::Fail);
        env.agent_version = "banana".into();
        assert_eq!(evaluate(&p, &env)[0].status, CheckStatus::Unknown);
        let proto = evaluate(&p, &env)[2].to_protocol();
        assert_eq!(
            (proto.kind.as_str(), proto.status.as_str()),
            ("bundle_fresh", "fail")
        );
        let tags = p.tags(&statuses(&evaluate(&p, &env)));
        assert!(tags.is_empty());
    }

    /// The checks on this very host (`--nocapture` prints them): one result per check, in order,
    /// each saying why; a kernel of this age passes, and `tor`, which does not run here, is not a failure.
    #[tokio::test]
    async fn this_host() {
        let p = Arc::new(spec(
            r#"
checks:
  - { id: disk, kind: disk_encrypted }
  - { id: firewall, kind: firewall }
  - { id: os, kind: os_version, min: "12" }
  - { id: kernel, kind: kernel_version, min: "5.15" }
  - { id: updates, kind: packages_updated, max_days: 30 }
  - { id: secureboot, kind: secure_boot }
  - { id: init, kind: process_running, exe: /usr/lib/systemd/systemd }
  - { id: no-tor, kind: process_absent, exe: "*/tor" }
"#,
        ));
        let mut env = CheckEnv::new("/");
        env.firewall = Some(firewall::measure(&env.root, &[]).await);
        let results = run(p, env).await;
        for r in &results {
            println!("{:<10} {:<8} {}", r.id, r.status, r.detail);
            assert!(!r.detail.is_empty(), "{} gives no reason", r.id);
        }
        let ids: Vec<&str> = results.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "disk",
                "firewall",
                "os",
                "kernel",
                "updates",
                "secureboot",
                "init",
                "no-tor"
            ]
        );
        assert_eq!(
            results[3].status,
            CheckStatus::Pass,
            "{}",
            results[3].detail
        );
        // No tor runs here: never a failure (unknown when a process's executable is unreadable).
        assert_ne!(
            results[7].status,
            CheckStatus::Fail,
            "{}",
            results[7].detail
        );
    }

    /// Every kind, on a prepared tree of a compliant device, then on a non-compliant one.
    #[test]
    fn a_prepared_device_is_compliant_then_not() {
        let t = TempTree::new("device");
        t.file(
            "proc/self/mountinfo",
            "29 1 253:0 / / rw - ext4 /dev/mapper/root rw\n",
        );
        t.file(
            "sys/devices/virtual/block/dm-0/dm/uuid",
            "CRYPT-LUKS2-abc-root\n",
        );
        t.link("sys/dev/block/253:0", "../../devices/virtual/block/dm-0");
        t.file("etc/os-release", "ID=debian\nVERSION_ID=\"13\"\n");
        t.file("proc/sys/kernel/osrelease", "6.12.48+deb13-amd64\n");
        t.file("var/lib/dpkg/info/libc6.list", "/lib\n");
        let sb = t.file(
            "sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c",
            [6, 0, 0, 0, 1],
        );
        t.file("opt/edr/bin/edrd", "");
        t.link("proc/77/exe", "/opt/edr/bin/edrd");
        t.file("proc/77/comm", "edrd\n");
        t.file("proc/77/status", "Name:\tedrd\nUid:\t0\t0\t0\t0\n");
        let p = spec(
            r#"
checks:
  - { id: disk, kind: disk_encrypted }
  - { id: firewall, kind: firewall }
  - { id: os, kind: os_version, os: [debian], min: "12" }
  - { id: kernel, kind: kernel_version, min: "6.1" }
  - { id: updates, kind: packages_updated, max_days: 30 }
  - { id: secureboot, kind: secure_boot }
  - id: edr
    kind: process_running
    exe: /opt/edr/bin/edrd
    sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
  - { id: no-tor, kind: process_absent, exe: "*/tor", comm: tor }
  - { id: agent, kind: agent_version, min: "0.0.1" }
  - { id: bundle, kind: bundle_fresh, max_age_s: 86400 }
rules:
  - tag: compliant
    all_pass: [disk, firewall, os, kernel, updates, secureboot, edr, no-tor, agent, bundle]
  - tag: needs-updates
    any_fail: [updates, kernel]
"#,
        );
        let mut env = CheckEnv::new(t.root());
        env.bundle_age_s = Some(30);
        env.firewall = Some(FirewallFact::Rules(4));
        let r = evaluate(&p, &env);
        for c in &r {
            assert_eq!(c.status, CheckStatus::Pass, "{c:?}");
        }
        assert_eq!(
            p.tags(&statuses(&r)),
            std::collections::BTreeSet::from(["compliant".to_owned()])
        );
        // Secure Boot off, tor running, the firewall not measured.
        std::fs::write(sb, [6, 0, 0, 0, 0]).expect("write");
        t.link("proc/78/exe", "/usr/bin/tor");
        t.file("proc/78/comm", "tor\n");
        env.firewall = None;
        let r = evaluate(&p, &env);
        let by_id: BTreeMap<_, _> = statuses(&r);
        assert_eq!(by_id["secureboot"], CheckStatus::Fail);
        assert_eq!(by_id["no-tor"], CheckStatus::Fail);
        assert_eq!(by_id["firewall"], CheckStatus::Unknown);
        assert!(p.tags(&by_id).is_empty());
    }

    #[tokio::test]
    async fn run_evaluates_on_a_blocking_thread() {
        let p = Arc::new(spec(
            "checks:\n  - id: b\n    kind: bundle_fresh\n    max_age_s: 60\nrules:\n  - tag: fresh\n    all_pass: [b]\n",
        ));
        let mut env = CheckEnv::new("/");
        env.bundle_age_s = Some(1);
        let r = run(p.clone(), env).await;
        assert_eq!(r.len(), 1);
        assert_eq!(
            p.tags(&statuses(&r)),
            std::collections::BTreeSet::from(["fresh".to_owned()])
        );
    }
}
