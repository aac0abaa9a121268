//! The measured system's files, read through one root directory (`[posture] root`): `/` on a
//! device, a prepared tree in tests. Every path the checks use is the path *on the measured
//! system* (`/proc/self/mountinfo`); this module maps it under the root.
//!
//! With a root other than `/`, symbolic links are resolved here, one component at a time, as
//! if the root were `/` (an absolute target starts again at the root), and a `..` that would
//! climb above the root is refused: nothing outside the root is ever read. The last component is
//! opened with `O_NOFOLLOW`. The tree is trusted not to change while it is read (a prepared tree
//! or an image); with `/`, the kernel resolves paths itself, magic links of `/proc` included.

use std::{
    ffi::OsString,
    fs::File,
    io::Read,
    os::unix::fs::OpenOptionsExt,
    path::{Component, Path, PathBuf},
};

/// Most symbolic links followed in one lookup (the kernel's own limit).
const MAX_LINKS: u32 = 40;

/// Why a file of the measured system could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The operating system refused or failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path on the measured system.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A symbolic link leads above the root.
    #[error("{path} escapes the posture root (a `..` climbs above it)")]
    Escapes {
        /// The path on the measured system.
        path: PathBuf,
    },
    /// Too many symbolic links.
    #[error("{path}: more than {MAX_LINKS} symbolic links")]
    Loop {
        /// The path on the measured system.
        path: PathBuf,
    },
    /// The file is larger than the caller reads.
    #[error("{path} is larger than {cap} bytes")]
    TooLarge {
        /// The path on the measured system.
        path: PathBuf,
        /// The bound.
        cap: u64,
    },
}

impl FsError {
    /// Whether the file (or a directory on its way) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }

    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// The root the checks read the system through.
#[derive(Debug, Clone)]
pub struct Root {
    base: PathBuf,
    host: bool,
}

impl Root {
    /// The system under `base` (`/`: the running one).
    pub fn new(base: &Path) -> Self {
        let host = base.components().all(|c| matches!(c, Component::RootDir));
        Self {
            base: base.to_owned(),
            host,
        }
    }

    /// Whether the root is `/`: the running system, whose `/proc` describes this very host.
    pub fn is_host(&self) -> bool {
        self.host
    }

    /// Where `path` of the measured system is on this host, once resolved.
    fn host_path(&self, resolved: &Path) -> PathBuf {
        if self.host {
            return resolved.to_owned();
        }
        let rel: PathBuf = resolved
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect();
        self.base.join(rel)
    }

    /// `path` with every symbolic link resolved within the root (the last one too, when
    /// `follow_last`), as a path of the measured system.
    pub fn resolve(&self, path: &Path, follow_last: bool) -> Result<PathBuf, FsError> {
        if self.host {
            return Ok(if follow_last {
                std::fs::canonicalize(path).map_err(|e| FsError::io(path, e))?
            } else {
                path.to_owned()
            });
        }
        let mut todo: Vec<OsString> = Vec::new();
        push_front(&mut todo, path);
        let mut done: Vec<OsString> = Vec::new();
        let mut links = 0;
        while let Some(c) = todo.pop() {
            if c == ".." {
                if done.pop().is_none() {
                    return Err(FsError::Escapes {
                        path: path.to_owned(),
                    });
                }
                continue;
            }
            let here = self.base.join(done.iter().collect::<PathBuf>()).join(&c);
            let last = todo.is_empty();
            match std::fs::symlink_metadata(&here) {
                Ok(m) if m.file_type().is_symlink() && (follow_last || !last) => {
                    links += 1;
                    if links > MAX_LINKS {
                        return Err(FsError::Loop {
                            path: path.to_owned(),
                        });
                    }
                    let target = std::fs::read_link(&here).map_err(|e| FsError::io(path, e))?;
                    if target.is_absolute() {
                        done.clear();
                    }
                    push_front(&mut todo, &target);
                }
                Ok(_) => done.push(c),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(FsError::io(path, e));
                }
                Err(e) => return Err(FsError::io(path, e)),
            }
        }
        Ok(Path::new("/").join(done.iter().collect::<PathBuf>()))
    }

    /// Opens a file of the measured system for reading.
    pub fn open(&self, path: &Path) -> Result<File, FsError> {
        if self.host {
            return File::open(path).map_err(|e| FsError::io(path, e));
        }
        let host = self.host_path(&self.resolve(path, true)?);
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(host)
            .map_err(|e| FsError::io(path, e))
    }

    /// A whole file, refused when larger than `cap` bytes.
    pub fn read(&self, path: &Path, cap: u64) -> Result<Vec<u8>, FsError> {
        let mut out = Vec::new();
        self.open(path)?
            .take(cap.saturating_add(1))
            .read_to_end(&mut out)
            .map_err(|e| FsError::io(path, e))?;
        if out.len() as u64 > cap {
            return Err(FsError::TooLarge {
                path: path.to_owned(),
                cap,
            });
        }
        Ok(out)
    }

    /// A whole text file (invalid UTF-8 replaced), refused when larger than `cap` bytes.
    pub fn read_string(&self, path: &Path, cap: u64) -> Result<String, FsError> {
        self.read(path, cap)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    /// The metadata of a file or directory of the measured system (links followed).
    pub fn metadata(&self, path: &Path) -> Result<std::fs::Metadata, FsError> {
        let host = if self.host {
            path.to_owned()
        } else {
            self.host_path(&self.resolve(path, true)?)
        };
        std::fs::metadata(&host).map_err(|e| FsError::io(path, e))
    }

    /// The target of a symbolic link of the measured system, as written (not resolved).
    pub fn read_link(&self, path: &Path) -> Result<PathBuf, FsError> {
        let host = if self.host {
            path.to_owned()
        } else {
            self.host_path(&self.resolve(path, false)?)
        };
        std::fs::read_link(&host).map_err(|e| FsError::io(path, e))
    }

    /// The names in a directory of the measured system, at most `cap` of them (and whether
    /// there were more).
    pub fn list(&self, path: &Path, cap: usize) -> Result<(Vec<OsString>, bool), FsError> {
        let host = if self.host {
            path.to_owned()
        } else {
            self.host_path(&self.resolve(path, true)?)
        };
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&host).map_err(|e| FsError::io(path, e))? {
            if names.len() == cap {
                return Ok((names, true));
            }
            match entry {
                Ok(e) => names.push(e.file_name()),
                Err(e) => return Err(FsError::io(path, e)),
            }
        }
        Ok((names, false))
    }
}

/// Puts `path`'s components in front of the work list (which is popped from its end).
fn push_front(todo: &mut Vec<OsString>, path: &Path) {
    let comps: Vec<OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some("..".into()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect();
    todo.extend(comps.into_iter().rev());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_resolve_inside_the_root_and_never_above_it() {
        let t = crate::posture::tests::TempTree::new("fs");
        t.file("etc/real", "hello");
        t.outside("outside-secret", "no");
        t.link("etc/rel", "real");
        t.link("etc/abs", "/etc/real");
        t.link("etc/up", "../etc/real");
        t.link("etc/escape", "../../outside-secret");
        t.link("etc/loop", "loop");
        let root = Root::new(&t.root());
        let read = |p: &str| root.read_string(Path::new(p), 100);
        assert_eq!(read("/etc/rel").expect("rel"), "hello");
        assert_eq!(read("/etc/abs").expect("abs"), "hello");
        assert_eq!(read("/etc/up").expect("up"), "hello");
        assert_eq!(read("/etc/../etc/real").expect("dots"), "hello");
        assert!(matches!(read("/etc/escape"), Err(FsError::Escapes { .. })));
        assert!(matches!(read("/../x"), Err(FsError::Escapes { .. })));
        assert!(matches!(read("/etc/loop"), Err(FsError::Loop { .. })));
        assert!(read("/etc/none").is_err_and(|e| e.is_not_found()));
        assert!(matches!(
            root.read(Path::new("/etc/real"), 2),
            Err(FsError::TooLarge { .. })
        ));
        assert_eq!(
            root.read_link(Path::new("/etc/abs")).expect("link"),
            Path::new("/etc/real")
        );
        assert_eq!(
            root.resolve(Path::new("/etc/up"), true).expect("resolve"),
            Path::new("/etc/real")
        );
        assert!(!root.is_host());
        assert!(Root::new(Path::new("/")).is_host());
    }
}
