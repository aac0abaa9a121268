//! The privilege split: what crosses between the privileged part (`sluice run`, root) and the
//! unprivileged proxy (`sluice proxy`, its own user).
//!
//! The privileged part is small: it loads and attaches the eBPF programs and owns their maps,
//! installs the nftables rules, reads other users' `/proc` entries, holds the interception CA's
//! key and signs leaves with it, applies the fail mode (the kernel heartbeat) and supervises the
//! proxy. The proxy parses every byte a user or a website sends (TLS, HTTP, archives, documents,
//! DNS answers, bundles, the collector's replies) and holds no capability and no CA key: a parser
//! bug there is a bug in a process that can read the steered traffic it is handed and write its
//! own state, not root on the endpoint.
//!
//! The two talk over a Unix stream socket ([`crate::config::Config::privsep_socket`]) that only
//! the proxy's user may use (checked with `SO_PEERCRED` on every connection). Each message is a
//! frame: a 4-byte big-endian length and a JSON document of at most [`MAX_FRAME`] bytes. The
//! proxy asks, the privileged part answers; the first exchange ([`Request::Hello`]) also hands
//! over the listening sockets (`SCM_RIGHTS`), so the proxy binds nothing itself and needs no
//! capability for ports below 1024 or for `IP_TRANSPARENT`.

pub mod client;
pub mod sandbox;
pub mod server;
mod wire;

pub use wire::{MAX_FRAME, PrivsepError, Request, VERSION, read_frame, write_frame};

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    os::unix::net::UnixStream,
};

use serde::{Deserialize, Serialize};

/// What the privileged part answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// The answer to [`Request::Hello`]; the listening sockets follow as `SCM_RIGHTS`.
    Welcome(Welcome),
    /// A process's facts.
    Process(crate::steer::process::ProcessInfo),
    /// A signed leaf: the leaf and the CA certificate (DER).
    Signed(Vec<Vec<u8>>),
    /// Status for `/status`.
    Status(serde_json::Value),
    /// Raw DNS messages.
    Dns(Vec<Vec<u8>>),
    /// The process table.
    Processes(crate::posture::process::Scan),
    /// A SHA-256 (hex), or why there is none.
    Hash(Result<String, String>),
    /// `nft -j list ruleset`'s output, or why there is none.
    Firewall(Result<String, String>),
    /// The request was refused or failed.
    Error(String),
}

/// The start-up facts the proxy gets with its sockets.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Welcome {
    /// [`VERSION`].
    pub version: u32,
    /// The interception CA's certificate (PEM): the last certificate of every leaf's chain.
    pub ca_cert_pem: String,
    /// The bytes the privileged part's heartbeat probe sends first; a connection that sends
    /// them is answered with [`crate::proxy::PROBE_REPLY`].
    pub probe_token: String,
    /// What each passed socket is, in order.
    pub sockets: Vec<Passed>,
    /// The endpoint listeners' port, when endpoint steering is on.
    pub endpoint_port: Option<u16>,
    /// The gateway's transparent listeners' port, when gateway mode is on.
    pub gateway_port: Option<u16>,
    /// Whether endpoint steering is attached (DNS answers and origins are available).
    pub steering: bool,
}

/// A listening socket handed to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Passed {
    /// An endpoint listener (loopback, steered by the cgroup hooks).
    Endpoint,
    /// A gateway transparent listener (TPROXY).
    Gateway,
    /// The admin endpoints' listener (`admin.listen`).
    Admin,
    /// The kernel splice's socket map.
    SpliceSockets,
    /// The kernel splice's pairs map.
    SplicePeers,
    /// The steering's origins map, read-only.
    Origins,
}

/// Sends `fds` with one marker byte (`SCM_RIGHTS`).
pub fn send_fds(sock: &UnixStream, fds: &[RawFd]) -> Result<(), PrivsepError> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let iov = [std::io::IoSlice::new(b"F")];
    let cmsg = [ControlMessage::ScmRights(fds)];
    sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
        .map_err(|e| PrivsepError::Io(e.into()))?;
    Ok(())
}

/// Receives up to `max` descriptors sent with [`send_fds`].
pub fn recv_fds(sock: &UnixStream, max: usize) -> Result<Vec<OwnedFd>, PrivsepError> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 12]);
    if max > 12 {
        return Err(PrivsepError::Protocol("more than 12 descriptors".into()));
    }
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| PrivsepError::Io(e.into()))?;
    let mut out = Vec::new();
    for c in msg.cmsgs().map_err(|e| PrivsepError::Io(e.into()))? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: the kernel just installed `fd` in this process for this message; it is
                // owned by nothing else.
                out.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if msg.bytes != 1 {
        return Err(PrivsepError::Protocol("no sockets were passed".into()));
    }
    Ok(out)
}

/// The uid and pid of the process at the other end of `sock`.
pub fn peer_cred(sock: &UnixStream) -> Result<(u32, i32), PrivsepError> {
    let c = nix::sys::socket::getsockopt(sock, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| PrivsepError::Io(e.into()))?;
    Ok((c.uid(), c.pid()))
}

/// The uid and gid of a user name (or a number).
pub fn lookup_user(name: &str) -> Result<(u32, u32), String> {
    if let Ok(uid) = name.parse::<u32>() {
        let user =
            nix::unistd::User::from_uid(uid.into()).map_err(|e| format!("uid {uid}: {e}"))?;
        return Ok((uid, user.map_or(uid, |u| u.gid.as_raw())));
    }
    match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => Ok((u.uid.as_raw(), u.gid.as_raw())),
        Ok(None) => Err(format!(
            "the proxy's user `{name}` does not exist: create it (`useradd --system --no-create-home --shell /usr/sbin/nologin {name}`) or set privsep.user"
        )),
        Err(e) => Err(format!("looking up the user `{name}`: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn frames_round_trip_and_oversized_ones_are_refused() {
        let (mut a, mut b) = UnixStream::pair().expect("pair");
        write_frame(
            &mut a,
            &Request::Process {
                tgid: 4000,
                uid: 1000,
            },
        )
        .expect("write");
        let got: Request = read_frame(&mut b).expect("read").expect("frame");
        assert!(matches!(
            got,
            Request::Process {
                tgid: 4000,
                uid: 1000
            }
        ));
        a.write_all(&(MAX_FRAME as u32 + 1).to_be_bytes())
            .expect("write");
        assert!(matches!(
            read_frame::<Request>(&mut b),
            Err(PrivsepError::Protocol(_))
        ));
        drop(a);
        assert!(read_frame::<Request>(&mut b).expect("eof").is_none());
    }

    #[test]
    fn sockets_pass_with_their_marker() {
        let (a, b) = UnixStream::pair().expect("pair");
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        send_fds(&a, &[l.as_raw_fd()]).expect("send");
        let fds = recv_fds(&b, 1).expect("recv");
        assert_eq!(fds.len(), 1);
        let got = std::net::TcpListener::from(fds.into_iter().next().expect("fd"));
        assert_eq!(got.local_addr().expect("addr").port(), port);
        assert_eq!(peer_cred(&a).expect("cred").1, std::process::id() as i32);
    }
}
