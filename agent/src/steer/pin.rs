//! Pinned links: where the steering programs are kept in the BPF filesystem so that they, and the
//! fail mode they apply, outlive the agent's process.

use std::{
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use aya::programs::links::{FdLink, PinnedLink};

use super::{SteerError, chain};

/// Where the BPF filesystem is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
/// `statfs` magic of the BPF filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Makes sure `dir` is a directory on a BPF filesystem, mounting one at [`BPFFS`] when nothing
/// is mounted there yet.
pub fn prepare(dir: &Path) -> Result<(), SteerError> {
    let err = |what: String| SteerError::Load(format!("pin directory {}: {what}", dir.display()));
    if dir.starts_with(BPFFS) && !is_bpffs(Path::new(BPFFS)) {
        std::fs::create_dir_all(BPFFS).map_err(|e| err(e.to_string()))?;
        nix::mount::mount(
            Some("bpf"),
            BPFFS,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| err(format!("mounting the BPF filesystem at {BPFFS}: {e}")))?;
    }
    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    if !is_bpffs(dir) {
        return Err(err("not on a BPF filesystem".into()));
    }
    Ok(())
}

fn is_bpffs(p: &Path) -> bool {
    nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// The pins in `dir` now (a previous agent's).
pub fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

/// Pins `link` in `dir` under a name of its own (program, process, time), so a successor never
/// collides with it.
pub fn pin(link: FdLink, dir: &Path, program: &str) -> Result<PinnedLink, SteerError> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let path = dir.join(format!("{program}-{}-{nanos}", std::process::id()));
    link.pin(&path).map_err(|e| SteerError::Map {
        map: "pinned link",
        message: format!("{}: {}", path.display(), chain(&e)),
    })
}

/// Removes pinned links (their programs detach); how many were removed.
pub fn remove(paths: &[PathBuf]) -> usize {
    let mut n = 0;
    for p in paths {
        match PinnedLink::from_pin(p) {
            Ok(l) => {
                if l.unpin().is_ok() {
                    n += 1;
                }
            }
            // Not a link (or already gone): the file alone is removed.
            Err(_) => {
                let _ = std::fs::remove_file(p);
            }
        }
    }
    n
}

/// Links pinned during an attach: removed again if the attach does not complete.
#[derive(Debug, Default)]
pub struct Guard(Vec<PinnedLink>);

impl Guard {
    /// Adds a pinned link.
    pub fn push(&mut self, l: PinnedLink) {
        self.0.push(l);
    }

    /// The attach completed: the links are kept.
    pub fn keep(mut self) -> Vec<PinnedLink> {
        std::mem::take(&mut self.0)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        for l in self.0.drain(..) {
            let _ = l.unpin();
        }
    }
}
