//! The checks that read the system's own files: disk encryption (mountinfo and sysfs), the OS
//! and kernel versions, the age of the last package change (dpkg) and Secure Boot (efivarfs).

use std::{
    path::{Path, PathBuf},
    time::SystemTime,
};

use sluice_policy::posture::Version;

use super::{
    Outcome, at_least, fail,
    fs::{FsError, Root},
    pass, unknown,
};

/// Bound on the small text files read here (os-release, osrelease, sysfs attributes).
const SMALL: u64 = 64 << 10;
/// Bound on `/proc/self/mountinfo`.
const MOUNTINFO: u64 = 4 << 20;
/// Most device-mapper layers walked below the root device.
const MAX_DEPTH: u32 = 8;
/// Most entries of a directory read here (dpkg's `info`, sysfs `slaves` and `block`).
const MAX_ENTRIES: usize = 200_000;

/// The root file system sits on dm-crypt, directly or under device-mapper layers (LVM).
pub(super) fn disk_encrypted(root: &Root) -> Outcome {
    let info = match root.read_string(Path::new("/proc/self/mountinfo"), MOUNTINFO) {
        Ok(t) => t,
        Err(e) => return unknown(e.to_string()),
    };
    let Some(mount) = root_mount(&info) else {
        return unknown("no file system is mounted at / in /proc/self/mountinfo");
    };
    let dev = match block_device(root, &mount) {
        Ok(d) => d,
        Err(why) => return unknown(why),
    };
    let name = dev
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match crypt_below(root, &dev, 0) {
        Ok(Some(crypt)) => pass(format!(
            "the root file system ({} on {}) is on dm-crypt ({crypt})",
            mount.fstype, mount.source
        )),
        Ok(None) => fail(format!(
            "the root file system ({} on {}, block device {name}) is not on dm-crypt",
            mount.fstype, mount.source
        )),
        Err(e) => unknown(e.to_string()),
    }
}

/// The mount of `/` (the last one listed: the one on top).
#[derive(Debug, PartialEq, Eq)]
struct Mount {
    dev: String,
    fstype: String,
    source: String,
}

fn root_mount(mountinfo: &str) -> Option<Mount> {
    mountinfo.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        if f.get(4) != Some(&"/") {
            return None;
        }
        let sep = f.iter().position(|x| *x == "-")?;
        Some(Mount {
            dev: (*f.get(2)?).to_owned(),
            fstype: (*f.get(sep + 1)?).to_owned(),
            source: (*f.get(sep + 2)?).to_owned(),
        })
    })
}

/// The root's block device in sysfs, as a resolved path of the measured system. Btrfs (and
/// others) report an anonymous `0:N` device; their mount source names the block device then.
fn block_device(root: &Root, m: &Mount) -> Result<PathBuf, String> {
    if !m.dev.starts_with("0:") {
        let link = Path::new("/sys/dev/block").join(&m.dev);
        return root.resolve(&link, true).map_err(|e| e.to_string());
    }
    let not_block = || {
        format!(
            "the root file system is {} on {} (device {}), not on a block device",
            m.fstype, m.source, m.dev
        )
    };
    if let Some(mapped) = m.source.strip_prefix("/dev/mapper/") {
        let (names, _) = root
            .list(Path::new("/sys/block"), MAX_ENTRIES)
            .map_err(|e| e.to_string())?;
        for n in names
            .iter()
            .filter(|n| n.to_string_lossy().starts_with("dm-"))
        {
            let dir = Path::new("/sys/block").join(n);
            let dm_name = root
                .read_string(&dir.join("dm/name"), SMALL)
                .unwrap_or_default();
            if dm_name.trim() == mapped {
                return root.resolve(&dir, true).map_err(|e| e.to_string());
            }
        }
        return Err(format!(
            "no device-mapper device is named {mapped} in /sys/block"
        ));
    }
    match m.source.strip_prefix("/dev/") {
        Some(name) if !name.is_empty() && !name.contains('/') => root
            .resolve(&Path::new("/sys/class/block").join(name), true)
            .map_err(|e| e.to_string()),
        _ => Err(not_block()),
    }
}

/// The dm-crypt device at or below `dev` (its `dm/name`, or `dm/uuid` when unnamed).
fn crypt_below(root: &Root, dev: &Path, depth: u32) -> Result<Option<String>, FsError> {
    if depth > MAX_DEPTH {
        return Ok(None);
    }
    let uuid = match root.read_string(&dev.join("dm/uuid"), SMALL) {
        Ok(u) => u,
        Err(e) if e.is_not_found() => String::new(),
        Err(e) => return Err(e),
    };
    if uuid.starts_with("CRYPT-") {
        let name = root
            .read_string(&dev.join("dm/name"), SMALL)
            .map(|n| n.trim().to_owned())
            .unwrap_or_default();
        return Ok(Some(if name.is_empty() {
            uuid.trim().to_owned()
        } else {
            name
        }));
    }
    let slaves = dev.join("slaves");
    let names = match root.list(&slaves, 64) {
        Ok((names, _)) => names,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e),
    };
    for n in names {
        let below = root.resolve(&slaves.join(n), true)?;
        if let Some(c) = crypt_below(root, &below, depth + 1)? {
            return Ok(Some(c));
        }
    }
    Ok(None)
}

/// A key of an os-release file, unquoted.
fn os_release_value(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let v = l.trim().strip_prefix(key)?.strip_prefix('=')?.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(v);
        Some(v.to_owned())
    })
}

/// `/etc/os-release` (else `/usr/lib/os-release`): `ID` in `os` and `VERSION_ID >= min`.
pub(super) fn os_version(root: &Root, os: &[String], min: Option<&Version>) -> Outcome {
    let text = match root.read_string(Path::new("/etc/os-release"), SMALL) {
        Ok(t) => t,
        Err(e) if e.is_not_found() => {
            match root.read_string(Path::new("/usr/lib/os-release"), SMALL) {
                Ok(t) => t,
                Err(e) => return unknown(e.to_string()),
            }
        }
        Err(e) => return unknown(e.to_string()),
    };
    let id = os_release_value(&text, "ID")
        .unwrap_or_else(|| "linux".into())
        .to_ascii_lowercase();
    if !os.is_empty() && !os.contains(&id) {
        return fail(format!("the OS is {id}, not {}", os.join(" or ")));
    }
    let Some(min) = min else {
        return pass(format!("the OS is {id}"));
    };
    match os_release_value(&text, "VERSION_ID") {
        None => unknown(format!(
            "os-release of {id} has no VERSION_ID (a rolling or testing release?)"
        )),
        Some(v) => at_least(&id, &v, min),
    }
}

/// `/proc/sys/kernel/osrelease >= min`.
pub(super) fn kernel_version(root: &Root, min: &Version) -> Outcome {
    match root.read_string(Path::new("/proc/sys/kernel/osrelease"), SMALL) {
        Ok(r) => at_least("kernel", r.trim(), min),
        Err(e) => unknown(e.to_string()),
    }
}

/// The last package install or upgrade (dpkg) is at most `max_days` before `now`: the newest
/// `/var/lib/dpkg/info/*.list` (dpkg rewrites a package's list on every unpack), else the
/// modification time of `/var/log/dpkg.log`, else of `/var/lib/dpkg/status`.
pub(super) fn packages_updated(root: &Root, max_days: u64, now: SystemTime) -> Outcome {
    let (when, source) = match last_package_change(root) {
        Ok(Some(found)) => found,
        Ok(None) => {
            return unknown(
                "no dpkg database under /var/lib/dpkg (only dpkg systems are measured)",
            );
        }
        Err(e) => return unknown(e.to_string()),
    };
    let days = now.duration_since(when).map_or(0, |d| d.as_secs() / 86_400);
    if days <= max_days {
        pass(format!(
            "the last package change was {days} days ago ({source}), at most {max_days}"
        ))
    } else {
        fail(format!(
            "the last package change was {days} days ago ({source}), more than {max_days}"
        ))
    }
}

fn last_package_change(root: &Root) -> Result<Option<(SystemTime, String)>, FsError> {
    let info = Path::new("/var/lib/dpkg/info");
    match root.list(info, MAX_ENTRIES) {
        Ok((names, _)) => {
            let newest = names
                .iter()
                .filter(|n| n.to_string_lossy().ends_with(".list"))
                .filter_map(|n| root.metadata(&info.join(n)).ok()?.modified().ok())
                .max();
            if let Some(t) = newest {
                return Ok(Some((t, "newest /var/lib/dpkg/info/*.list".into())));
            }
        }
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(e),
    }
    for p in ["/var/log/dpkg.log", "/var/lib/dpkg/status"] {
        match root.metadata(Path::new(p)) {
            Ok(m) => {
                let t = m.modified().map_err(|e| FsError::Io {
                    path: p.into(),
                    source: e,
                })?;
                return Ok(Some((t, format!("{p} modified"))));
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// The `SecureBoot` UEFI variable: 4 attribute bytes, then 1 when Secure Boot is on.
const SECURE_BOOT_VAR: &str =
    "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c";

/// Booted with UEFI Secure Boot on.
pub(super) fn secure_boot(root: &Root) -> Outcome {
    match root.read(Path::new(SECURE_BOOT_VAR), 64) {
        Ok(b) if b.len() == 5 && b[4] == 1 => pass("Secure Boot is on"),
        Ok(b) if b.len() == 5 && b[4] == 0 => fail("Secure Boot is off"),
        Ok(b) => unknown(format!(
            "the SecureBoot variable holds {} bytes, not the 5 expected",
            b.len()
        )),
        Err(e) if e.is_not_found() => secure_boot_absent(root),
        Err(e) => unknown(e.to_string()),
    }
}

/// Why there is no SecureBoot variable: no UEFI (fail), or efivarfs not visible (unknown).
fn secure_boot_absent(root: &Root) -> Outcome {
    let exists = |p: &str| match root.metadata(Path::new(p)) {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e.to_string()),
    };
    match (exists("/sys/firmware"), exists("/sys/firmware/efi")) {
        (Err(e), _) | (_, Err(e)) => unknown(e),
        (Ok(false), _) => unknown("/sys/firmware is absent: the firmware cannot be seen from here"),
        (Ok(true), Ok(false)) => fail("/sys/firmware/efi is absent: not booted with UEFI"),
        (Ok(true), Ok(true)) => match root.list(Path::new("/sys/firmware/efi/efivars"), 1) {
            Ok((names, _)) if names.is_empty() => {
                unknown("/sys/firmware/efi/efivars is empty: efivarfs is not mounted")
            }
            Ok(_) => fail("the firmware has no SecureBoot variable: no Secure Boot support"),
            Err(e) => unknown(e.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sluice_policy::posture::CheckStatus;

    use super::*;
    use crate::posture::tests::TempTree;

    fn status(o: &Outcome) -> CheckStatus {
        o.0
    }

    const MOUNTINFO_LVM: &str = "22 1 0:21 / /proc rw - proc proc rw\n\
        29 1 253:1 / / rw,relatime shared:1 - ext4 /dev/mapper/vg-root rw\n";

    /// sysfs for a root on `dm-1`, itself over `dm-0` (with `dm-0`'s uuid given).
    fn sysfs(t: &TempTree, dm0_uuid: &str) {
        t.file("sys/devices/virtual/block/dm-1/dm/uuid", "LVM-abc\n");
        t.file("sys/devices/virtual/block/dm-1/dm/name", "vg-root\n");
        t.link("sys/devices/virtual/block/dm-1/slaves/dm-0", "../../dm-0");
        t.file(
            "sys/devices/virtual/block/dm-0/dm/uuid",
            format!("{dm0_uuid}\n"),
        );
        t.file("sys/devices/virtual/block/dm-0/dm/name", "luks-1234\n");
        t.link(
            "sys/devices/virtual/block/dm-0/slaves/nvme0n1p3",
            "../../../../pci0000:00/nvme0n1/nvme0n1p3",
        );
        t.dir("sys/devices/pci0000:00/nvme0n1/nvme0n1p3");
        t.link("sys/dev/block/253:1", "../../devices/virtual/block/dm-1");
        t.link(
            "sys/dev/block/259:3",
            "../../devices/pci0000:00/nvme0n1/nvme0n1p3",
        );
        t.link("sys/block/dm-1", "../devices/virtual/block/dm-1");
        t.link(
            "sys/class/block/nvme0n1p3",
            "../../devices/pci0000:00/nvme0n1/nvme0n1p3",
        );
    }

    #[test]
    fn luks_under_lvm_passes_and_a_plain_partition_fails() {
        let t = TempTree::new("disk");
        sysfs(&t, "CRYPT-LUKS2-0123456789abcdef-luks-1234");
        t.file("proc/self/mountinfo", MOUNTINFO_LVM);
        let root = Root::new(&t.root());
        let o = disk_encrypted(&root);
        assert_eq!(status(&o), CheckStatus::Pass, "{o:?}");
        assert!(o.1.contains("luks-1234"), "{o:?}");

        // The same stack without dm-crypt below LVM.
        let t = TempTree::new("disk-plain");
        sysfs(&t, "LVM-def");
        t.file("proc/self/mountinfo", MOUNTINFO_LVM);
        let o = disk_encrypted(&Root::new(&t.root()));
        assert_eq!(status(&o), CheckStatus::Fail, "{o:?}");

        // A root straight on a partition.
        t.file(
            "proc/self/mountinfo",
            "29 1 259:3 / / rw - ext4 /dev/nvme0n1p3 rw\n",
        );
        let o = disk_encrypted(&Root::new(&t.root()));
        assert_eq!(status(&o), CheckStatus::Fail, "{o:?}");
        assert!(
            o.1.contains("nvme0n1p3 is not on dm-crypt") || o.1.contains("nvme0n1p3) is not"),
            "{o:?}"
        );

        // Btrfs: an anonymous device, the mount source names the mapper device.
        t.file(
            "proc/self/mountinfo",
            "29 1 0:35 /root / rw - btrfs /dev/mapper/vg-root rw\n",
        );
        assert_eq!(
            status(&disk_encrypted(&Root::new(&t.root()))),
            CheckStatus::Fail
        );
        t.file(
            "proc/self/mountinfo",
            "29 1 0:35 / / rw - overlay overlay rw\n",
        );
        let o = disk_encrypted(&Root::new(&t.root()));
        assert_eq!(status(&o), CheckStatus::Unknown, "{o:?}");
        assert!(o.1.contains("not on a block device"), "{o:?}");

        // No mountinfo at all.
        let empty = TempTree::new("disk-empty");
        assert_eq!(
            status(&disk_encrypted(&Root::new(&empty.root()))),
            CheckStatus::Unknown
        );
    }

    #[test]
    fn btrfs_on_luks_passes() {
        let t = TempTree::new("disk-btrfs");
        sysfs(&t, "CRYPT-LUKS2-0123-luks-1234");
        t.link("sys/block/dm-0", "../devices/virtual/block/dm-0");
        t.file(
            "proc/self/mountinfo",
            "29 1 0:35 /root / rw - btrfs /dev/mapper/luks-1234 rw\n",
        );
        let o = disk_encrypted(&Root::new(&t.root()));
        assert_eq!(status(&o), CheckStatus::Pass, "{o:?}");
    }

    #[test]
    fn os_and_kernel_versions() {
        let t = TempTree::new("os");
        t.file(
            "usr/lib/os-release",
            "PRETTY_NAME=\"Debian GNU/Linux 13 (trixie)\"\nID=debian\nVERSION_ID=\"13\"\n",
        );
        t.link("etc/os-release", "../usr/lib/os-release");
        t.file("proc/sys/kernel/osrelease", "6.12.48+deb13-amd64\n");
        let root = Root::new(&t.root());
        let v = |s| Version::parse(s).expect("version");
        let debian = ["debian".to_owned(), "ubuntu".to_owned()];
        let o = os_version(&root, &debian, Some(&v("12")));
        assert_eq!(o, pass("debian 13 >= 12"));
        assert_eq!(
            status(&os_version(&root, &debian, Some(&v("14")))),
            CheckStatus::Fail
        );
        assert_eq!(
            os_version(&root, &["fedora".to_owned()], None),
            fail("the OS is debian, not fedora")
        );
        assert_eq!(status(&os_version(&root, &[], None)), CheckStatus::Pass);
        assert_eq!(
            kernel_version(&root, &v("6.1")),
            pass("kernel 6.12.48+deb13-amd64 >= 6.1")
        );
        assert_eq!(
            status(&kernel_version(&root, &v("6.13"))),
            CheckStatus::Fail
        );
        // A rolling release has no VERSION_ID; an absent file is unknown.
        t.file("usr/lib/os-release", "ID=arch\n");
        assert_eq!(
            status(&os_version(&root, &[], Some(&v("1")))),
            CheckStatus::Unknown
        );
        let empty = Root::new(&TempTree::new("os-empty").root());
        assert_eq!(
            status(&os_version(&empty, &[], Some(&v("1")))),
            CheckStatus::Unknown
        );
        assert_eq!(
            status(&kernel_version(&empty, &v("1"))),
            CheckStatus::Unknown
        );
    }

    #[test]
    fn package_updates_by_dpkg_times() {
        let t = TempTree::new("dpkg");
        let now = SystemTime::now();
        let days = |d: u64| now - Duration::from_secs(d * 86_400 + 60);
        let set = |p: &Path, when: SystemTime| {
            std::fs::File::options()
                .write(true)
                .open(p)
                .expect("open")
                .set_modified(when)
                .expect("mtime");
        };
        let root = Root::new(&t.root());
        assert_eq!(
            status(&packages_updated(&root, 30, now)),
            CheckStatus::Unknown
        );
        let status_file = t.file("var/lib/dpkg/status", "Package: x\n");
        set(&status_file, days(100));
        let o = packages_updated(&root, 30, now);
        assert_eq!(status(&o), CheckStatus::Fail, "{o:?}");
        assert!(o.1.contains("100 days ago"), "{o:?}");
        let old = t.file("var/lib/dpkg/info/a.list", "/usr/bin/a\n");
        let recent = t.file("var/lib/dpkg/info/b.list", "/usr/bin/b\n");
        let other = t.file("var/lib/dpkg/info/b.md5sums", "");
        set(&old, days(90));
        set(&recent, days(3));
        set(&other, days(0));
        let o = packages_updated(&root, 30, now);
        assert_eq!(status(&o), CheckStatus::Pass, "{o:?}");
        assert!(o.1.contains("3 days ago"), "{o:?}");
        set(&recent, days(45));
        assert_eq!(status(&packages_updated(&root, 30, now)), CheckStatus::Fail);
    }

    #[test]
    fn secure_boot_on_off_absent() {
        let var = &SECURE_BOOT_VAR[1..];
        let t = TempTree::new("sb");
        let root = Root::new(&t.root());
        assert_eq!(status(&secure_boot(&root)), CheckStatus::Unknown);
        t.dir("sys/firmware/acpi");
        assert_eq!(
            secure_boot(&root),
            fail("/sys/firmware/efi is absent: not booted with UEFI")
        );
        t.dir("sys/firmware/efi/efivars");
        assert_eq!(status(&secure_boot(&root)), CheckStatus::Unknown);
        t.file(var, [6, 0, 0, 0, 1]);
        assert_eq!(secure_boot(&root), pass("Secure Boot is on"));
        t.file(var, [6, 0, 0, 0, 0]);
        assert_eq!(secure_boot(&root), fail("Secure Boot is off"));
        t.file(var, [6, 0]);
        assert_eq!(status(&secure_boot(&root)), CheckStatus::Unknown);
        std::fs::remove_file(t.root().join(var)).expect("rm");
        t.file(
            "sys/firmware/efi/efivars/Boot0000-8be4df61-93ca-11d2-aa0d-00e098032b8c",
            [0],
        );
        assert_eq!(status(&secure_boot(&root)), CheckStatus::Fail);
    }

    #[test]
    fn mountinfo_takes_the_top_root_mount() {
        let mi = "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n2 1 253:1 / / rw shared:1 - ext4 /dev/mapper/r rw\n";
        assert_eq!(
            root_mount(mi),
            Some(Mount {
                dev: "253:1".into(),
                fstype: "ext4".into(),
                source: "/dev/mapper/r".into()
            })
        );
        assert_eq!(root_mount("garbage"), None);
        assert_eq!(
            os_release_value("ID='x'\nVERSION_ID=\"1\"", "ID").as_deref(),
            Some("x")
        );
    }
}
