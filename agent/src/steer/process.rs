//! Who is behind a steered connection: pid to executable, uid to user name.
//!
//! Resolution happens in user space when the proxy claims a record, from `/proc` and the system's
//! user database. A process may have exited by then; the kernel's record (pid, uid, comm, cgroup)
//! stays authoritative and the resolved fields are simply absent.

use std::{ffi::OsStr, os::unix::ffi::OsStrExt as _, path::PathBuf};

use serde::Serialize;

/// What could be learned about the process from user space.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
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
    use std::os::unix::fs::MetadataExt as _;
    let exe = std::fs::read_link(format!("/proc/{tgid}/exe")).ok();
    let exe_inode = std::fs::metadata(format!("/proc/{tgid}/exe"))
        .ok()
        .map(|m| (m.dev(), m.ino()));
    let ppid = std::fs::read_to_string(format!("/proc/{tgid}/stat"))
        .ok()
        .and_then(|s| parse_ppid(&s));
    ProcessInfo {
        exe,
        exe_inode,
        ppid,
        user: None,
    }
}

/// The parent pid from `/proc/PID/stat`; the command name may contain spaces and parentheses, so
/// parse after the last `)`.
fn parse_ppid(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
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
    fn parses_ppid_after_odd_comm() {
        assert_eq!(parse_ppid("123 (a) b (c)) S 77 1 1"), Some(77));
        assert_eq!(parse_ppid("garbage"), None);
    }

    #[test]
    fn comm_is_trimmed_at_nul() {
        let mut c = [0u8; 16];
        c[..4].copy_from_slice(b"curl");
        assert_eq!(comm_str(&c), "curl");
        assert_eq!(comm_str(&[b'x'; 16]), "x".repeat(16));
    }
}
