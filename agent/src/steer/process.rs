//! Who is behind a steered connection: pid to executable, uid to user name.
//!
//! Resolution happens in user space when the proxy claims a record, from `/proc` and the system's
//! user database. A process may have exited by then; the kernel's record (pid, uid, comm, cgroup)
//! stays authoritative and the resolved fields are simply absent.

use std::{ffi::OsStr, os::unix::ffi::OsStrExt as _, path::PathBuf};

use serde::Serialize;

/// What could be learned about the process from user space.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ProcessInfo {
    /// Path of the executable (`/proc/PID/exe`), when the process still runs.
    pub exe: Option<PathBuf>,
    /// Device and inode of the executable, so rules need not trust the path alone.
    pub exe_inode: Option<(u64, u64)>,
    /// The parent process id, when known.
    pub ppid: Option<u32>,
    /// User name of the uid, from the user database.
    pub user: Option<String>,
}

/// Resolves what it can; never fails.
pub fn resolve(tgid: u32, uid: u32) -> ProcessInfo {
    ProcessInfo {
        user: user_name(uid),
        ..resolve_without_user(tgid)
    }
}

/// Resolves the executable and parent from `/proc`; leaves `user` empty.
pub fn resolve_without_user(tgid: u32) -> ProcessInfo {
    let stat = read_stat(tgid);
    resolve_rest(
        tgid,
        stat.as_deref().and_then(parse_stat).map(|(ppid, _)| ppid),
    )
}

fn resolve_rest(tgid: u32, ppid: Option<u32>) -> ProcessInfo {
    use std::os::unix::fs::MetadataExt as _;
    let exe = std::fs::read_link(format!("/proc/{tgid}/exe")).ok();
    let exe_inode = std::fs::metadata(format!("/proc/{tgid}/exe"))
        .ok()
        .map(|m| (m.dev(), m.ino()));
    ProcessInfo {
        exe,
        exe_inode,
        ppid,
        user: None,
    }
}

/// (parent pid, start time in clock ticks since boot) of process `tgid`, while it runs: the
/// pair that tells one process from a later one given the same pid.
pub fn parent_and_start(tgid: u32) -> Option<(u32, u64)> {
    read_stat(tgid).as_deref().and_then(parse_stat)
}

/// `/proc/PID/stat` in one `read` (procfs produces the whole line at once; a line that fills the
/// buffer is read on to its end). This runs for every steered connection: `read_to_string` would
/// add a `statx` and grow its buffer through several small reads.
fn read_stat(tgid: u32) -> Option<String> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(format!("/proc/{tgid}/stat")).ok()?;
    let mut buf = vec![0u8; 1024];
    let n = f.read(&mut buf).ok()?;
    buf.truncate(n);
    if n == 1024 {
        f.read_to_end(&mut buf).ok()?;
    }
    String::from_utf8(buf).ok()
}

/// (parent pid, start time in clock ticks since boot) from `/proc/PID/stat`; the command name may
/// contain spaces and parentheses, so fields are counted after the last `)`.
fn parse_stat(stat: &str) -> Option<(u32, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // state(0) ppid(1) ... starttime(19)
    Some((f.get(1)?.parse().ok()?, f.get(19)?.parse().ok()?))
}

/// Resolved processes, keyed by pid and validated by start time: a reused pid is a new process
/// (different start time) and is resolved afresh, so nothing is ever attributed to the wrong
/// executable. Saves the `readlink` and `stat` of `/proc/PID/exe` for every connection after a
/// process's first.
#[derive(Debug, Default)]
pub struct ProcessCache {
    entries: std::sync::Mutex<std::collections::HashMap<u32, (u64, ProcessInfo)>>,
}

impl ProcessCache {
    /// Most processes remembered; the cache starts over when full.
    const MAX: usize = 4096;

    /// Like [`resolve_without_user`], from the cache when the process is the same one.
    pub fn resolve(&self, tgid: u32) -> ProcessInfo {
        let Some((ppid, start)) = read_stat(tgid).as_deref().and_then(parse_stat) else {
            // Gone already: nothing to resolve, nothing to cache.
            return ProcessInfo::default();
        };
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, info)) = entries.get(&tgid)
            && *s == start
        {
            return info.clone();
        }
        drop(entries);
        let info = resolve_rest(tgid, Some(ppid));
        entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= Self::MAX {
            entries.clear();
        }
        entries.insert(tgid, (start, info.clone()));
        info
    }
}

/// The user name of a uid, through the system's user database (NSS), so directory users resolve.
pub fn user_name(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

/// A NUL-padded kernel `comm` as text.
pub fn comm_str(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    OsStr::from_bytes(&comm[..end])
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_this_process() {
        let me = std::process::id();
        let info = resolve(me, nix::unistd::getuid().as_raw());
        assert_eq!(info.exe, std::env::current_exe().ok());
        assert!(info.exe_inode.is_some());
        assert_eq!(info.ppid, Some(nix::unistd::getppid().as_raw() as u32));
        assert_eq!(user_name(0).as_deref(), Some("root"));
    }

    #[test]
    fn parses_stat_after_odd_comm() {
        let stat = "123 (a) b (c)) S 77 1 1 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 4242 1000 10";
        assert_eq!(parse_stat(stat), Some((77, 4242)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn the_cache_answers_for_the_same_process_only() {
        let cache = ProcessCache::default();
        let me = std::process::id();
        let first = cache.resolve(me);
        assert_eq!(first.exe, std::env::current_exe().ok());
        assert_eq!(cache.resolve(me), first);
        // A cached entry with another start time (a reused pid) is not trusted.
        cache.entries.lock().expect("lock").insert(
            me,
            (
                0,
                ProcessInfo {
                    exe: Some("/bin/false".into()),
                    ..ProcessInfo::default()
                },
            ),
        );
        assert_eq!(cache.resolve(me).exe, std::env::current_exe().ok());
        assert_eq!(
            cache.resolve(u32::MAX - 1),
            ProcessInfo::default(),
            "no such process"
        );
    }

    #[test]
    fn comm_is_trimmed_at_nul() {
        let mut c = [0u8; 16];
        c[..4].copy_from_slice(b"curl");
        assert_eq!(comm_str(&c), "curl");
        assert_eq!(comm_str(&[b'x'; 16]), "x".repeat(16));
    }
}
