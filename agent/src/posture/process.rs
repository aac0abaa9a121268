//! The process checks: which executables run (`/proc/<pid>/exe`) under which command names
//! (`/proc/<pid>/comm`), and the SHA-256 of an executable.
//!
//! `/proc` is read once per evaluation, at most [`MAX_PROCESSES`] entries. With the root `/` an
//! executable is hashed through `/proc/<pid>/exe` itself, which opens the very file the process
//! runs (even one replaced or deleted since); with another root, the link's target is resolved
//! under the root ([`Root`]) and never outside it. Executables larger than [`MAX_HASH_BYTES`] are
//! not hashed (unknown). A command name is the process's own choice, so `comm` only serves
//! `process_absent`; `process_running` needs the executable's path.

use std::{
    collections::HashMap,
    io::Read,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use sluice_policy::{glob, posture::RunAs};

use super::{Outcome, fail, fs::Root, pass, unknown};

/// Most `/proc` entries read in one evaluation.
pub const MAX_PROCESSES: usize = 32_768;
/// Largest executable hashed.
pub const MAX_HASH_BYTES: u64 = 256 << 20;
/// Most distinct executables hashed for one check.
const MAX_HASHED: usize = 8;

/// The suffix the kernel adds to the link of an executable deleted (or replaced) since it ran.
const DELETED: &str = " (deleted)";

/// One process.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Proc {
    /// Its id.
    pub pid: u32,
    /// The executable's path on the measured system (`(deleted)` removed); `Err` when it could
    /// not be read, `Ok(None)` when there is none (kernel threads, processes gone meanwhile).
    pub exe: Result<Option<PathBuf>, String>,
    /// Whether the executable was deleted or replaced since the process started.
    pub deleted: bool,
    /// The command name, when readable.
    pub comm: Option<String>,
    /// Its real and effective user ids (`/proc/<pid>/status`), when readable.
    pub uids: Option<(u32, u32)>,
}

/// What `/proc` held.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Scan {
    /// The processes read.
    pub procs: Vec<Proc>,
    /// More than [`MAX_PROCESSES`] entries: the rest were not read.
    pub truncated: bool,
    /// Why `/proc` could not be listed.
    pub error: Option<String>,
}

impl Scan {
    /// Reads `/proc` under `root`.
    pub fn read(root: &Root) -> Self {
        if root.is_host()
            && let Some(h) = super::host_facts()
        {
            return h.processes().unwrap_or_else(|e| Self {
                error: Some(e),
                ..Self::default()
            });
        }
        let proc_dir = Path::new("/proc");
        let (names, truncated) = match root.list(proc_dir, MAX_PROCESSES) {
            Ok(l) => l,
            Err(e) => {
                return Self {
                    error: Some(e.to_string()),
                    ..Self::default()
                };
            }
        };
        let procs = names
            .iter()
            .filter_map(|n| n.to_str()?.parse::<u32>().ok())
            .map(|pid| {
                let dir = proc_dir.join(pid.to_string());
                let (exe, deleted) = exe_of(root, &dir);
                let comm = root
                    .read_string(&dir.join("comm"), 64)
                    .ok()
                    .map(|c| c.trim_end_matches('\n').to_owned());
                let uids = root
                    .read_string(&dir.join("status"), 16 * 1024)
                    .ok()
                    .and_then(|t| status_uids(&t));
                Proc {
                    pid,
                    exe,
                    deleted,
                    comm,
                    uids,
                }
            })
            .collect();
        Self {
            procs,
            truncated,
            error: None,
        }
    }

    /// Why a process may have been missed, when one may have.
    fn blind_spot(&self) -> Option<String> {
        if let Some(e) = &self.error {
            return Some(e.clone());
        }
        let unreadable: Vec<&String> = self
            .procs
            .iter()
            .filter_map(|p| p.exe.as_ref().err())
            .collect();
        if let Some(first) = unreadable.first() {
            return Some(match unreadable.len() {
                1 => format!("the executable of 1 process could not be read ({first})"),
                n => format!("the executables of {n} processes could not be read ({first})"),
            });
        }
        self.truncated
            .then(|| format!("more than {MAX_PROCESSES} processes: the rest were not read"))
    }
}

/// The real and effective user ids of a `/proc/<pid>/status` text.
fn status_uids(status: &str) -> Option<(u32, u32)> {
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let mut ids = line.split_whitespace().map(str::parse::<u32>);
    Some((ids.next()?.ok()?, ids.next()?.ok()?))
}

/// The executable of the process whose `/proc` directory is `dir`, and whether it was deleted.
///
/// The kernel's link names the file by its canonical path. In a prepared tree the link is
/// resolved under the root instead (a relative target from `dir`), so what a check compares and
/// hashes is what the tree holds there, and a target above the root is an error.
fn exe_of(root: &Root, dir: &Path) -> (Result<Option<PathBuf>, String>, bool) {
    let target = match root.read_link(&dir.join("exe")) {
        Ok(t) => t,
        Err(e) if e.is_not_found() => return (Ok(None), false),
        Err(e) => return (Err(e.to_string()), false),
    };
    let (target, deleted) = match target.to_string_lossy().strip_suffix(DELETED) {
        Some(t) => (PathBuf::from(t), true),
        None => (target, false),
    };
    if root.is_host() {
        return (Ok(Some(target)), deleted);
    }
    let path = dir.join(&target);
    match root.resolve(&path, true) {
        Ok(p) => (Ok(Some(p)), deleted),
        // The file is gone from the tree: its name still counts, within the root.
        Err(e) if e.is_not_found() => match lexical(&path) {
            Some(p) => (Ok(Some(p)), deleted),
            None => (
                Err(super::fs::FsError::Escapes { path }.to_string()),
                deleted,
            ),
        },
        Err(e) => (Err(e.to_string()), deleted),
    }
}

/// `path` with `.` and `..` applied; `None` when a `..` climbs above `/`.
fn lexical(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            std::path::Component::Normal(n) => out.push(n),
            // The guard pops: a `..` that finds nothing to pop climbs above `/`.
            std::path::Component::ParentDir if !out.pop() => return None,
            _ => {}
        }
    }
    Some(out)
}

/// A process runs `exe` (whose contents hash to `sha256`, when given).
/// The path is compared as written and resolved under the root (`/bin/x` on a merged-/usr
/// system is `/usr/bin/x`, the name the kernel gives).
pub(super) fn running(
    root: &Root,
    scan: &Scan,
    exe: &str,
    sha256: Option<&str>,
    run_as: RunAs,
) -> Outcome {
    let canonical = root.resolve(Path::new(exe), true).ok();
    let of_exe: Vec<&Proc> = scan
        .procs
        .iter()
        .filter(|p| {
            matches!(&p.exe, Ok(Some(e)) if e == Path::new(exe) || Some(e) == canonical.as_ref())
        })
        .collect();
    // A user starting the agent's binary themselves is not the agent.
    let matches: Vec<&Proc> = of_exe
        .iter()
        .copied()
        .filter(|p| match run_as {
            RunAs::Any => true,
            RunAs::Uid(u) => p.uids == Some((u, u)),
        })
        .collect();
    let Some(first) = matches.first() else {
        if let (RunAs::Uid(u), Some(p)) = (run_as, of_exe.first()) {
            return match p.uids {
                Some((real, eff)) => fail(format!(
                    "pid {} runs {exe} as uid {real} (effective {eff}), not {u}",
                    p.pid
                )),
                None => unknown(format!(
                    "pid {} runs {exe}, but its user could not be read",
                    p.pid
                )),
            };
        }
        return match scan.blind_spot() {
            Some(why) => unknown(format!("no process found running {exe}, but {why}")),
            None => fail(format!("no process runs {exe}")),
        };
    };
    let Some(want) = sha256 else {
        return pass(format!("pid {} runs {exe}", first.pid));
    };
    // One hash per file: processes of the same executable share it.
    let mut hashed: HashMap<(u64, u64), Result<String, String>> = HashMap::new();
    let mut wrong = None;
    let mut why_unknown = None;
    for p in matches {
        let r = match hash_of(root, p, &mut hashed) {
            Some(r) => r,
            None => break,
        };
        match r {
            Ok(h) if h == want => {
                let deleted = if p.deleted {
                    " (since deleted or replaced on disk)"
                } else {
                    ""
                };
                return pass(format!(
                    "pid {} runs {exe} with sha256 {want}{deleted}",
                    p.pid
                ));
            }
            Ok(h) => wrong = wrong.or(Some((p.pid, h))),
            Err(e) => why_unknown = why_unknown.or(Some(e)),
        }
    }
    match (why_unknown, wrong) {
        (Some(e), _) => unknown(format!("{exe} runs, but it could not be hashed: {e}")),
        (None, Some((pid, h))) => fail(format!(
            "pid {pid} runs {exe}, but its sha256 is {h}, not {want}"
        )),
        (None, None) => unknown(format!("{exe} runs, but none of its files could be hashed")),
    }
}

/// The SHA-256 of the file process `p` runs, cached per file; `None` once [`MAX_HASHED`]
/// distinct files were hashed.
fn hash_of(
    root: &Root,
    p: &Proc,
    cache: &mut HashMap<(u64, u64), Result<String, String>>,
) -> Option<Result<String, String>> {
    let exe = match &p.exe {
        Ok(Some(e)) => e.display().to_string(),
        _ => return Some(Err(format!("pid {} has no executable", p.pid))),
    };
    if root.is_host()
        && let Some(h) = super::host_facts()
    {
        use std::hash::Hasher as _;
        let mut hasher = std::hash::DefaultHasher::new();
        hasher.write(exe.as_bytes());
        // One hash per path here: the privileged part hashes the very file the process runs.
        let key = (u64::MAX, hasher.finish());
        if let Some(r) = cache.get(&key) {
            return Some(r.clone());
        }
        if cache.len() >= MAX_HASHED {
            return None;
        }
        let r = h.hash_exe(p.pid, Path::new(&exe), MAX_HASH_BYTES);
        cache.insert(key, r.clone());
        return Some(r);
    }
    let opened = if root.is_host() {
        // The process's own file, whatever now sits at its path.
        root.open(&Path::new("/proc").join(p.pid.to_string()).join("exe"))
    } else {
        root.open(Path::new(&exe))
    };
    let mut file = match opened {
        Ok(f) => f,
        Err(e) => return Some(Err(e.to_string())),
    };
    let meta = match file.metadata() {
        Ok(m) => m,
        Err(e) => return Some(Err(format!("{exe}: {e}"))),
    };
    let key = (meta.dev(), meta.ino());
    if let Some(r) = cache.get(&key) {
        return Some(r.clone());
    }
    if cache.len() >= MAX_HASHED {
        return None;
    }
    let r = if meta.len() > MAX_HASH_BYTES {
        Err(format!(
            "{exe} is {} bytes, more than the {} MiB hashed",
            meta.len(),
            MAX_HASH_BYTES >> 20
        ))
    } else {
        sha256(&mut file, MAX_HASH_BYTES).map_err(|e| format!("{exe}: {e}"))
    };
    cache.insert(key, r.clone());
    Some(r)
}

/// The SHA-256 of what `r` yields, lower-case hex; an error past `cap` bytes.
pub fn sha256(r: &mut impl Read, cap: u64) -> std::io::Result<String> {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        total += n as u64;
        if total > cap {
            return Err(std::io::Error::other(format!(
                "larger than {} MiB",
                cap >> 20
            )));
        }
        ctx.update(&buf[..n]);
    }
    Ok(hex::encode(ctx.finish()))
}

/// No process runs an executable matching `exe` or has a command name matching `comm`.
pub(super) fn absent(scan: &Scan, exe: Option<&str>, comm: Option<&str>) -> Outcome {
    let what = match (exe, comm) {
        (Some(e), Some(c)) => format!("{e} or named {c}"),
        (Some(e), None) => e.to_owned(),
        (None, Some(c)) => format!("named {c}"),
        (None, None) => return pass("nothing to look for"),
    };
    let found = scan.procs.iter().find(|p| {
        let by_exe =
            matches!((exe, &p.exe), (Some(g), Ok(Some(e))) if glob(g, &e.to_string_lossy()));
        let by_comm = matches!((comm, &p.comm), (Some(g), Some(c)) if glob(g, c));
        by_exe || by_comm
    });
    if let Some(p) = found {
        let runs = match &p.exe {
            Ok(Some(e)) => e.display().to_string(),
            _ => "?".into(),
        };
        return fail(format!(
            "pid {} runs {runs} (command {}), which matches {what}",
            p.pid,
            p.comm.as_deref().unwrap_or("?")
        ));
    }
    let blind = if exe.is_some() {
        scan.blind_spot()
    } else {
        scan.error.clone().or_else(|| {
            scan.truncated
                .then(|| format!("more than {MAX_PROCESSES} processes: the rest were not read"))
        })
    };
    match blind {
        Some(why) => unknown(format!("no process found matching {what}, but {why}")),
        None => pass(format!("no process runs {what}")),
    }
}

#[cfg(test)]
mod tests {
    use std::process::{Child, Command};

    use sluice_policy::posture::CheckStatus;

    use super::*;
    use crate::posture::tests::TempTree;

    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    /// A child process killed and reaped on drop.
    struct Sleeper(Child);
    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn file_sha256(p: &Path) -> String {
        sha256(&mut std::fs::File::open(p).expect("open"), MAX_HASH_BYTES).expect("hash")
    }

    #[test]
    fn a_real_process_with_the_right_and_the_wrong_hash() {
        let sleep = std::fs::canonicalize("/usr/bin/sleep")
            .or_else(|_| std::fs::canonicalize("/bin/sleep"))
            .expect("sleep(1) is installed");
        let exe = sleep.to_string_lossy().into_owned();
        let child = Sleeper(Command::new(&sleep).arg("30").spawn().expect("spawn sleep"));
        let pid = child.0.id();
        let root = Root::new(Path::new("/"));
        let scan = Scan::read(&root);
        assert!(
            scan.procs.iter().any(|p| p.pid == pid),
            "{pid} not in /proc"
        );
        let right = file_sha256(&sleep);
        let me = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|t| status_uids(&t))
            .expect("own uids");
        let as_me = RunAs::Uid(me.0);
        let o = running(&root, &scan, &exe, Some(&right), as_me);
        assert_eq!(o.0, CheckStatus::Pass, "{o:?}");
        let o = running(&root, &scan, &exe, Some(EMPTY_SHA256), as_me);
        assert_eq!(o.0, CheckStatus::Fail, "{o:?}");
        assert!(o.1.contains(&right), "{o:?}");
        assert_eq!(
            running(&root, &scan, &exe, None, as_me).0,
            CheckStatus::Pass
        );
        // Run as another user than the one required: not the agent.
        let o = running(&root, &scan, &exe, None, RunAs::Uid(me.0 + 4242));
        assert_eq!(o.0, CheckStatus::Fail, "{o:?}");
        assert!(o.1.contains("not"), "{o:?}");
        let o = absent(&scan, Some(&exe), None);
        assert_eq!(o.0, CheckStatus::Fail, "{o:?}");
        assert_eq!(absent(&scan, None, Some("slee?")).0, CheckStatus::Fail);
        drop(child);
        let scan = Scan::read(&root);
        assert!(!scan.procs.iter().any(|p| p.pid == pid));
        let o = running(&root, &scan, "/nonexistent/edrd", None, RunAs::Any);
        assert_ne!(o.0, CheckStatus::Pass, "{o:?}");
        let o = absent(&scan, None, Some("no-such-comm"));
        assert_eq!(o.0, CheckStatus::Pass, "{o:?}");
    }

    /// A tree with `/proc/<pid>` for each (pid, exe link target, comm).
    fn tree(procs: &[(u32, &str, &str)]) -> TempTree {
        let t = TempTree::new("proc");
        for (pid, exe, comm) in procs {
            t.link(&format!("proc/{pid}/exe"), exe);
            t.file(&format!("proc/{pid}/comm"), format!("{comm}\n"));
            t.file(
                &format!("proc/{pid}/status"),
                format!("Name:\t{comm}\nUid:\t0\t0\t0\t0\n"),
            );
        }
        t.dir("proc/2"); // a kernel thread: no exe link
        t.file("proc/2/comm", "kthreadd\n");
        t.file("proc/uptime", "1 1\n");
        t
    }

    #[test]
    fn a_prepared_tree_resolves_exe_under_the_root() {
        let t = tree(&[
            (10, "/opt/edr/bin/edrd", "edrd"),
            (11, "/usr/bin/tor (deleted)", "tor"),
            (12, "/usr/bin/av", "av"),
        ]);
        let edrd = t.file("opt/edr/bin/edrd", "the edr");
        t.file("usr/bin/av", "");
        t.link("bin", "usr/bin");
        let root = Root::new(&t.root());
        let scan = Scan::read(&root);
        assert_eq!(scan.procs.len(), 4);
        // Named through a link (merged /usr), hashed at its real path.
        assert_eq!(
            running(&root, &scan, "/bin/av", Some(EMPTY_SHA256), RunAs::Uid(0)).0,
            CheckStatus::Pass
        );
        let good = file_sha256(&edrd);
        assert_eq!(
            running(
                &root,
                &scan,
                "/opt/edr/bin/edrd",
                Some(&good),
                RunAs::Uid(0)
            ),
            pass(format!("pid 10 runs /opt/edr/bin/edrd with sha256 {good}"))
        );
        let o = running(
            &root,
            &scan,
            "/opt/edr/bin/edrd",
            Some(EMPTY_SHA256),
            RunAs::Uid(0),
        );
        assert_eq!(o.0, CheckStatus::Fail, "{o:?}");
        assert_eq!(
            running(&root, &scan, "/opt/other", None, RunAs::Uid(0)),
            fail("no process runs /opt/other")
        );
        // A deleted executable still counts as running; a missing file cannot be hashed.
        assert_eq!(
            running(&root, &scan, "/usr/bin/tor", None, RunAs::Uid(0)).0,
            CheckStatus::Pass
        );
        assert_eq!(
            running(
                &root,
                &scan,
                "/usr/bin/tor",
                Some(EMPTY_SHA256),
                RunAs::Uid(0)
            )
            .0,
            CheckStatus::Unknown
        );
        assert_eq!(
            absent(&scan, Some("/usr/bin/tor"), None).0,
            CheckStatus::Fail
        );
        assert_eq!(absent(&scan, Some("*/tor"), None).0, CheckStatus::Fail);
        assert_eq!(absent(&scan, None, Some("tor")).0, CheckStatus::Fail);
        assert_eq!(
            absent(&scan, Some("/usr/bin/nc"), Some("nc")),
            pass("no process runs /usr/bin/nc or named nc")
        );
    }

    #[test]
    fn the_agent_binary_started_by_a_user_is_not_the_agent() {
        let t = tree(&[(20, "/opt/edr/bin/edrd", "edrd")]);
        t.file(
            "proc/20/status",
            "Name:\tedrd\nUid:\t1000\t1000\t1000\t1000\n",
        );
        t.file("opt/edr/bin/edrd", "the edr");
        let root = Root::new(&t.root());
        let scan = Scan::read(&root);
        assert_eq!(
            running(&root, &scan, "/opt/edr/bin/edrd", None, RunAs::Uid(0)),
            fail("pid 20 runs /opt/edr/bin/edrd as uid 1000 (effective 1000), not 0")
        );
        assert_eq!(
            running(&root, &scan, "/opt/edr/bin/edrd", None, RunAs::Any).0,
            CheckStatus::Pass
        );
        // A setuid start (effective 0, real 1000) is not root either.
        t.file("proc/20/status", "Name:\tedrd\nUid:\t1000\t0\t0\t0\n");
        let scan = Scan::read(&root);
        assert_eq!(
            running(&root, &scan, "/opt/edr/bin/edrd", None, RunAs::Uid(0)).0,
            CheckStatus::Fail
        );
    }

    #[test]
    fn an_exe_link_escaping_the_root_is_refused() {
        let t = tree(&[(10, "../../../edrd", "edrd")]);
        let outside = t.outside("edrd", "outside the root");
        let root = Root::new(&t.root());
        let scan = Scan::read(&root);
        // Not read through the link: the process's exe is unreadable, so nothing is certain.
        let o = running(
            &root,
            &scan,
            &outside.to_string_lossy(),
            None,
            RunAs::Uid(0),
        );
        assert_eq!(o.0, CheckStatus::Unknown, "{o:?}");
        assert!(o.1.contains("escapes the posture root"), "{o:?}");
        let o = absent(&scan, Some("*edrd"), None);
        assert_eq!(o.0, CheckStatus::Unknown, "{o:?}");
        // A process whose exe is under the root but whose file links out of it.
        let t = tree(&[(10, "/opt/edrd", "edrd")]);
        t.outside("real-edrd", "outside");
        t.link("opt/edrd", "../../real-edrd");
        let root = Root::new(&t.root());
        let scan = Scan::read(&root);
        let o = running(&root, &scan, "/opt/edrd", Some(EMPTY_SHA256), RunAs::Uid(0));
        assert_eq!(o.0, CheckStatus::Unknown, "{o:?}");
        assert!(o.1.contains("escapes the posture root"), "{o:?}");
    }

    #[test]
    fn hashing_is_bounded() {
        let mut big = std::io::repeat(0).take(10 << 20);
        assert!(sha256(&mut big, 1 << 20).is_err());
        assert_eq!(
            sha256(&mut std::io::empty(), 1).expect("empty"),
            EMPTY_SHA256
        );
    }
}
