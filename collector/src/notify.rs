//! systemd's notification protocol for `sluice-collector run`, run as a `Type=notify` service with
//! `WatchdogSec=` (packaging/systemd/sluice-collector.service): `READY=1` once the listener is
//! bound, `STOPPING=1` when it starts to drain, and `WATCHDOG=1` every half of `WATCHDOG_USEC`
//! while the async runtime turns, so that systemd restarts a collector whose workers are all
//! stuck. Outside systemd (no `NOTIFY_SOCKET`) nothing is sent.
//!
//! The protocol is one datagram per state line on the Unix socket `NOTIFY_SOCKET` names (a path,
//! or an abstract name after `@`): a few lines here rather than a libsystemd binding. The agent
//! has its own in `sluice::app`; the collector never imports the agent.

use std::{
    ffi::OsStr,
    io,
    os::{
        linux::net::SocketAddrExt as _,
        unix::{
            ffi::OsStrExt as _,
            net::{SocketAddr, UnixDatagram},
        },
    },
    path::Path,
    time::Duration,
};

use tokio_util::sync::CancellationToken;

/// Sends a state line (`READY=1`, `STOPPING=1`, `WATCHDOG=1`) to systemd when it asked for them.
pub fn notify(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&socket, state) {
        tracing::warn!(error = %e, state, "sd_notify failed");
    }
}

fn send(socket: &OsStr, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    match socket.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            let addr = SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        }
        None => {
            sock.send_to(state.as_bytes(), Path::new(socket))?;
        }
    }
    Ok(())
}

/// How often `WATCHDOG=1` is due when systemd asked for it: half of `WATCHDOG_USEC`, as
/// sd_watchdog_enabled(3) advises. `WATCHDOG_PID`, when set, must name this process (a child that
/// inherited the variables does not ping for its parent).
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    interval_from(usec.as_deref(), pid.as_deref(), std::process::id())
}

fn interval_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(me)
    {
        return None;
    }
    let usec = usec?.trim().parse::<u64>().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

/// Sends `WATCHDOG=1` every `every` until `shutdown`. It runs on the same runtime as the
/// listener and the ingest tasks: when none of its workers gets to this timer, systemd hears
/// nothing and restarts the collector.
pub async fn watchdog(every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => notify("WATCHDOG=1"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn sends_to_a_path_and_to_an_abstract_name() {
        let dir = std::env::temp_dir().join(format!("sluice-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        let name = format!("sluice-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        send(OsStr::new(&format!("@{name}")), "WATCHDOG=1").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_panic() {
        assert!(send(OsStr::new("/nonexistent/notify.sock"), "READY=1").is_err());
    }

    #[test]
    fn watchdog_interval_is_half_of_watchdog_usec_for_this_process_only() {
        assert_eq!(
            interval_from(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            interval_from(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(interval_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(interval_from(None, Some("7"), 7), None);
        assert_eq!(interval_from(Some("0"), None, 7), None);
        assert_eq!(interval_from(Some("soon"), None, 7), None);
        assert_eq!(
            interval_from(Some("1"), None, 7),
            Some(Duration::from_millis(1))
        );
    }
}
