//! Device posture facts for the Device Inventory events: kernel, OS, firewall, disk encryption,
//! uptime, as `report/` sends them (re-exported there as `report::posture`). These are the
//! unconditional facts of the running system; the bundle's measured checks are the parent
//! module's. Each fact is "unknown" (None) rather than guessed when it cannot be read.

use std::{path::Path, time::Duration};

use sluice_protocol::Posture;

/// Collects the facts now. `posture` is the device's tag (`managed`, ...).
pub async fn collect(posture: &str) -> Posture {
    let firewall = firewall().await;
    let (kernel, os_name, disk_encrypted, uptime_s) = tokio::task::spawn_blocking(|| {
        (
            read_trim("/proc/sys/kernel/osrelease"),
            os_name(Path::new("/etc/os-release")),
            root_encrypted(),
            uptime(),
        )
    })
    .await
    .unwrap_or_default();
    Posture {
        posture: posture.to_owned(),
        kernel,
        os_name,
        disk_encrypted,
        firewall,
        uptime_s,
        addresses: Vec::new(),
        checks: Vec::new(),
        tags: Vec::new(),
    }
}

fn read_trim(p: &str) -> String {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// `PRETTY_NAME` of an os-release file.
pub fn os_name(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    parse_os_release(&text)
}

fn parse_os_release(text: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim().trim_matches('"').trim_matches('\'').to_owned())
        .unwrap_or_else(|| "Linux".into())
}

fn uptime() -> u64 {
    read_trim("/proc/uptime")
        .split_whitespace()
        .next()
        .and_then(|s| s.parse::<f64>().ok())
        .map_or(0, |f| f as u64)
}

/// Whether an nftables ruleset is loaded: `nft list ruleset` prints something. None when `nft`
/// is missing or not allowed (it needs CAP_NET_ADMIN).
async fn firewall() -> Option<bool> {
    if let Some(h) = super::host_facts() {
        let h = h.clone();
        let json = tokio::task::spawn_blocking(move || h.firewall())
            .await
            .ok()?
            .ok()?;
        return match super::firewall::count_rules(json.as_bytes(), &[]) {
            super::FirewallFact::Rules(n) => Some(n > 0),
            super::FirewallFact::Unknown(_) => None,
        };
    }
    let out = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::process::Command::new("nft")
            .args(["list", "ruleset"])
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .ok()?
    .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(out.stdout.iter().any(|b| !b.is_ascii_whitespace()))
}

/// Whether the root file system sits on dm-crypt (directly or under LVM). None when the root is
/// not a block device (a container's overlay) or sysfs cannot tell.
fn root_encrypted() -> Option<bool> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let dev = root_device(&info)?;
    if dev.starts_with("0:") {
        return None;
    }
    let sys = Path::new("/sys/dev/block").join(&dev);
    let sys = std::fs::canonicalize(sys).ok()?;
    Some(crypt_below(&sys, 0))
}

/// `major:minor` of the file system mounted at `/`.
fn root_device(mountinfo: &str) -> Option<String> {
    mountinfo.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(4) == Some(&"/")).then(|| f.get(2).map(|s| (*s).to_owned()))?
    })
}

fn crypt_below(dev: &Path, depth: u32) -> bool {
    if depth > 8 {
        return false;
    }
    let uuid = std::fs::read_to_string(dev.join("dm/uuid")).unwrap_or_default();
    if uuid.starts_with("CRYPT-") {
        return true;
    }
    // A partition's parent holds `slaves` only for dm devices; walk them (LVM on LUKS).
    let Ok(entries) = std::fs::read_dir(dev.join("slaves")) else {
        return false;
    };
    entries
        .flatten()
        .any(|e| std::fs::canonicalize(e.path()).is_ok_and(|p| crypt_below(&p, depth + 1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pretty_name_and_root_device() {
        assert_eq!(
            parse_os_release("NAME=x\nPRETTY_NAME=\"Debian GNU/Linux 13 (trixie)\"\n"),
            "Debian GNU/Linux 13 (trixie)"
        );
        assert_eq!(parse_os_release(""), "Linux");
        let mi = "22 1 0:21 / /proc rw - proc proc rw\n29 1 253:1 / / rw,relatime - ext4 /dev/mapper/root rw\n";
        assert_eq!(root_device(mi).as_deref(), Some("253:1"));
        assert_eq!(root_device("garbage"), None);
    }
}
