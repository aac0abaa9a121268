//! The cookie of a steered client's socket, from the kernel's socket diagnostics (`sock_diag`,
//! one exact lookup by the connection's two ends): the key of its origin record. The connect
//! hook records a steered connection under its socket's cookie; the proxy sees the client's
//! address and port as the peer of the connection it accepted and asks the kernel which socket
//! has those as its local end and the proxy's listener as its remote end. No program runs at the
//! connection's later steps, so a connection that is not steered costs the hooks nothing more
//! than its connect.
//!
//! Written by hand: one fixed 72-byte request and one field of the reply; the netlink crates
//! bring a generic message framework for that.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, OwnedFd},
    sync::Mutex,
};

use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, recv, send, socket,
};

/// `SOCK_DIAG_BY_FAMILY` (linux/sock_diag.h).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `NLMSG_ERROR` (linux/netlink.h).
const NLMSG_ERROR: u16 = 2;
/// `NLM_F_REQUEST`.
const NLM_F_REQUEST: u16 = 1;
/// `TCP_LISTEN`: an exact lookup that finds no connection falls back to a listener.
const TCP_LISTEN: u8 = 10;
const HEADER: usize = 16;
const REQUEST: usize = HEADER + 56;
/// Offsets in the reply: the socket id after the message's first four bytes.
const ID: usize = HEADER + 4;
const COOKIE: usize = ID + 40;

/// A `NETLINK_SOCK_DIAG` socket.
#[derive(Debug)]
pub struct Diag {
    fd: OwnedFd,
    seq: u32,
}

impl Diag {
    /// Opens the socket (no privilege needed: any process may look up a TCP socket).
    pub fn new() -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkSockDiag,
        )
        .map_err(io::Error::from)?;
        Ok(Self { fd, seq: 0 })
    }

    /// The cookie of the TCP socket of this network namespace whose local end is `local` and
    /// remote end `remote`; `None` when there is none (the client is gone).
    pub fn cookie(&mut self, local: SocketAddr, remote: SocketAddr) -> io::Result<Option<u64>> {
        self.seq = self.seq.wrapping_add(1);
        let req = request(self.seq, local, remote);
        send(self.fd.as_raw_fd(), &req, MsgFlags::empty()).map_err(io::Error::from)?;
        // The kernel answers an exact lookup within the send: the reply is queued already, so
        // the socket never blocks. Replies to earlier, abandoned requests are skipped.
        let mut buf = [0u8; 1024];
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT)
                .map_err(io::Error::from)?;
            match reply(&buf[..n], self.seq, &req)? {
                Reply::Stale => continue,
                Reply::Found(cookie) => return Ok(cookie),
            }
        }
    }
}

/// A [`Diag`] shared by threads, opened at the first lookup and again after a failure.
#[derive(Debug, Default)]
pub struct Cookies(Mutex<Option<Diag>>);

impl Cookies {
    /// The cookie of the client socket of a connection from `peer` accepted on `local`; `None`
    /// (logged) when it cannot be had.
    pub fn find(&self, peer: SocketAddr, local: SocketAddr) -> Option<u64> {
        let mut d = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if d.is_none() {
            *d = Diag::new()
                .map_err(|e| tracing::error!(error = %e, "no sock_diag socket: steered connections have no origin"))
                .ok();
        }
        match d.as_mut()?.cookie(peer, local) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "a sock_diag lookup failed");
                *d = None;
                None
            }
        }
    }
}

/// Whether this kernel answers the lookup: one of a loopback connection of this process's own.
/// Without the TCP diagnostics (`tcp_diag`), every steered connection would be refused for want
/// of an origin; steering says so when it attaches instead.
pub fn self_check() -> io::Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let server = listener.local_addr()?;
    let client = std::net::TcpStream::connect(server)?;
    let peer = client.local_addr()?;
    match Diag::new()?.cookie(peer, server)? {
        Some(_) => Ok(()),
        None => Err(io::Error::new(
            io::ErrorKind::NotFound,
            "no answer for a live connection",
        )),
    }
}

enum Reply {
    Stale,
    Found(Option<u64>),
}

fn addr_bytes(ip: IpAddr, v4: bool) -> [u8; 16] {
    let mut out = [0u8; 16];
    match ip.to_canonical() {
        IpAddr::V4(a) if v4 => out[..4].copy_from_slice(&a.octets()),
        IpAddr::V4(a) => out = a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => out = a.octets(),
    }
    out
}

/// An exact lookup of the TCP socket with ends `local` and `remote`. Both IPv4 (or IPv4-mapped)
/// ask as IPv4: an IPv6 socket connected to an IPv4-mapped address is found that way too.
fn request(seq: u32, local: SocketAddr, remote: SocketAddr) -> [u8; REQUEST] {
    let v4 = local.ip().to_canonical().is_ipv4() && remote.ip().to_canonical().is_ipv4();
    let mut r = [0u8; REQUEST];
    r[0..4].copy_from_slice(&(REQUEST as u32).to_ne_bytes());
    r[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    r[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    r[8..12].copy_from_slice(&seq.to_ne_bytes());
    // inet_diag_req_v2: family, protocol, extensions, pad, states.
    r[16] = if v4 { libc::AF_INET } else { libc::AF_INET6 } as u8;
    r[17] = libc::IPPROTO_TCP as u8;
    r[20..24].copy_from_slice(&u32::MAX.to_ne_bytes());
    // inet_diag_sockid: ports and addresses in network order, interface, cookie (none).
    r[24..26].copy_from_slice(&local.port().to_be_bytes());
    r[26..28].copy_from_slice(&remote.port().to_be_bytes());
    r[28..44].copy_from_slice(&addr_bytes(local.ip(), v4));
    r[44..60].copy_from_slice(&addr_bytes(remote.ip(), v4));
    r[64..72].copy_from_slice(&[0xff; 8]);
    r
}

fn reply(msg: &[u8], seq: u32, req: &[u8; REQUEST]) -> io::Result<Reply> {
    let field = |at: usize, len: usize| {
        msg.get(at..at + len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "a short sock_diag reply"))
    };
    let u32_at = |at: usize| -> io::Result<u32> {
        let b = field(at, 4)?;
        Ok(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    let kind = field(4, 2).map(|b| u16::from_ne_bytes([b[0], b[1]]))?;
    if u32_at(8)? != seq {
        return Ok(Reply::Stale);
    }
    match kind {
        NLMSG_ERROR => {
            let errno = u32_at(HEADER)? as i32;
            if errno == -libc::ENOENT {
                Ok(Reply::Found(None))
            } else {
                Err(io::Error::from_raw_os_error(-errno))
            }
        }
        SOCK_DIAG_BY_FAMILY => {
            // What was found must be the connection asked for: its ports and addresses as
            // requested (the kernel falls back to a listener on the local end), not listening.
            // An IPv6 socket connected to an IPv4-mapped address is found by an IPv4 request
            // and described with its IPv6 addresses.
            let family = field(HEADER, 1)?[0];
            let state = field(HEADER + 1, 1)?[0];
            let ends = |id: &[u8], family: u8| {
                let ip = |b: &[u8]| {
                    let mut o = [0u8; 16];
                    o.copy_from_slice(b);
                    if family == libc::AF_INET as u8 {
                        IpAddr::from([o[0], o[1], o[2], o[3]])
                    } else {
                        IpAddr::from(o).to_canonical()
                    }
                };
                (
                    [id[0], id[1], id[2], id[3]],
                    ip(&id[4..20]),
                    ip(&id[20..36]),
                )
            };
            if state == TCP_LISTEN || ends(field(ID, 36)?, family) != ends(&req[24..60], req[16]) {
                return Ok(Reply::Found(None));
            }
            let cookie = u64::from(u32_at(COOKIE)?) | (u64::from(u32_at(COOKIE + 4)?) << 32);
            Ok(Reply::Found(Some(cookie)))
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a sock_diag reply of type {other}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;

    fn cookie_of(s: &TcpStream) -> u64 {
        use std::os::fd::AsRawFd as _;
        crate::proxy::ksplice::cookie(s.as_raw_fd()).expect("SO_COOKIE")
    }

    #[test]
    fn finds_the_client_socket_of_a_connection_and_nothing_else() {
        for any in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = TcpListener::bind(any) else {
                continue; // no IPv6 here
            };
            let server = listener.local_addr().expect("addr");
            let client = TcpStream::connect(server).expect("connect");
            let (accepted, peer) = listener.accept().expect("accept");
            let mut diag = Diag::new().expect("a sock_diag socket");
            // The client's socket: local end `peer`, remote end the listener.
            let got = diag.cookie(peer, server).expect("lookup");
            assert_eq!(got, Some(cookie_of(&client)));
            assert_ne!(got, Some(cookie_of(&accepted)));
            // The accepted side is the reverse lookup.
            assert_eq!(
                diag.cookie(server, peer).expect("lookup"),
                Some(cookie_of(&accepted))
            );
            // A port nobody uses, and the listener's own address as a local end with no such
            // peer: nothing (not the listener).
            let mut gone = peer;
            gone.set_port(1);
            assert_eq!(diag.cookie(gone, server).expect("lookup"), None);
            let mut stranger = peer;
            stranger.set_port(peer.port().wrapping_add(1).max(1));
            assert_eq!(diag.cookie(server, stranger).expect("lookup"), None);
        }
    }

    #[test]
    fn an_ipv6_socket_connected_to_an_ipv4_mapped_address_is_found_as_ipv4() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let server = listener.local_addr().expect("addr");
        let mapped: SocketAddr = format!("[::ffff:127.0.0.1]:{}", server.port())
            .parse()
            .expect("addr");
        let Ok(client) = TcpStream::connect(mapped) else {
            return; // IPv6 disabled: no such socket can exist
        };
        let (_accepted, peer) = listener.accept().expect("accept");
        assert!(peer.is_ipv4());
        let mut diag = Diag::new().expect("a sock_diag socket");
        assert_eq!(
            diag.cookie(peer, server).expect("lookup"),
            Some(cookie_of(&client))
        );
    }
}
