//! cgroup v2 discovery: where the unified hierarchy is mounted, cgroup ids, and moving a process.

use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use super::SteerError;

/// Finds the cgroup v2 mount point from `/proc/self/mountinfo` (the unified hierarchy may sit at
/// `/sys/fs/cgroup` or, on hybrid systems, at `/sys/fs/cgroup/unified`).
pub fn v2_mount() -> Result<PathBuf, SteerError> {
    let text = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| SteerError::Cgroup(format!("reading /proc/self/mountinfo: {e}")))?;
    parse_v2_mount(&text)
        .ok_or_else(|| SteerError::Cgroup("no cgroup2 filesystem is mounted".into()))
}

fn parse_v2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields: id parent major:minor root mount-point options [optional...] - fstype source ...
        let (pre, post) = line.split_once(" - ")?;
        let fstype = post.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount = pre.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape(mount)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as three octal digits.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Resolves a configured cgroup path (relative to the v2 mount, leading `/` allowed) to a directory.
pub fn resolve(mount: &Path, rel: &str) -> PathBuf {
    let rel = rel.trim_matches('/');
    if rel.is_empty() {
        mount.to_path_buf()
    } else {
        mount.join(rel)
    }
}

/// The cgroup v2 id of a cgroup directory: its inode number, which is what
/// `bpf_get_current_cgroup_id()` returns for tasks inside it on 64-bit kernels.
pub fn id(dir: &Path) -> Result<u64, SteerError> {
    fs::metadata(dir)
        .map(|m| m.ino())
        .map_err(|e| SteerError::Cgroup(format!("{}: {e}", dir.display())))
}

/// Creates the cgroup if missing and moves process `pid` (all its threads) into it.
pub fn enter(dir: &Path, pid: u32) -> Result<(), SteerError> {
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(SteerError::Cgroup(format!(
                "creating {}: {e}",
                dir.display()
            )));
        }
    }
    fs::write(dir.join("cgroup.procs"), pid.to_string())
        .map_err(|e| SteerError::Cgroup(format!("moving pid {pid} into {}: {e}", dir.display())))
}

/// The v2 cgroup path (relative to the mount) a process is in, from `/proc/PID/cgroup`.
pub fn of_process(pid: u32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_unified_mount_on_hybrid_and_pure_systems() {
        let hybrid = "30 25 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755\n\
                      33 30 0:29 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
                      34 30 0:30 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            parse_v2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure = "29 23 0:26 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(parse_v2_mount(pure), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(parse_v2_mount("1 0 0:1 / / rw - ext4 /dev/vda rw\n"), None);
        let spaced = "1 0 0:1 / /mnt/my\\040cg rw - cgroup2 none rw\n";
        assert_eq!(parse_v2_mount(spaced), Some(PathBuf::from("/mnt/my cg")));
    }

    #[test]
    fn resolves_relative_paths() {
        let m = Path::new("/sys/fs/cgroup");
        assert_eq!(resolve(m, "/"), m);
        assert_eq!(resolve(m, "/a/b/"), m.join("a/b"));
    }
}
