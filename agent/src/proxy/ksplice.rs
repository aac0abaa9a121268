//! The kernel splice: a connection the proxy does not inspect has its two sockets joined in the
//! kernel (a socket hash map with a stream verdict program, `sluice_splice`), so its bytes never
//! enter user space; the proxy only watches for the ends.
//!
//! Joining, without losing, doubling or reordering a byte:
//! 1. the caller has written what it read from the client (the ClientHello) to the origin; what
//!    the client sent since is read and written on too, until its receive queue is empty: the
//!    kernel hands whole queued packets to the verdict, also one a read took part of (its bytes
//!    would go twice);
//! 2. both sockets get a receive low-water mark larger than anything in flight, so data arriving
//!    meanwhile stays in their receive queues (the kernel calls a socket's data-ready hook, which
//!    the socket map takes over, only once that much is queued);
//! 3. the pair is recorded (each socket's cookie to the other's), then both sockets go into the
//!    socket map;
//! 4. the low-water marks go back to 1, which runs the data-ready hook at once: whatever queued
//!    goes through the verdict, in order, before anything newer.
//!
//! Ends: a side that sent its FIN (its state leaves ESTABLISHED) has its bytes counted by the
//! program once its receive queue is empty (the state changes before the verdict runs on the data
//! that came with the FIN); once the other socket has taken them all (acknowledged plus queued
//! equals the count), the other side is shut down for writing, as the user-space copy does. A reset, both sides done
//! or the idle timeout ends the splice; the pair is removed and the sockets closed.
//!
//! The maps are the privileged part's ([`crate::steer::splice`]); this process only looks up,
//! updates and deletes their elements (`bpf(2)` by hand: three commands on passed descriptors,
//! where a map library would also ask for object information the sandbox refuses).

use std::{
    io,
    os::fd::{AsRawFd as _, OwnedFd, RawFd},
    time::{Duration, Instant},
};

use nix::{
    poll::PollTimeout,
    sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags},
};
use sluice_common::SplicePeer;
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::TcpStream,
};

/// `bpf(2)` commands used here.
pub const BPF_MAP_LOOKUP_ELEM: u64 = 1;
/// See [`BPF_MAP_LOOKUP_ELEM`].
pub const BPF_MAP_UPDATE_ELEM: u64 = 2;
/// See [`BPF_MAP_LOOKUP_ELEM`].
pub const BPF_MAP_DELETE_ELEM: u64 = 3;
const BPF_NOEXIST: u64 = 1;

/// The receive low-water mark while joining (the kernel caps it at half the largest receive
/// buffer).
const HOLD_LOWAT: libc::c_int = 1 << 30;

/// How long the other side may take to send what a side sent before it ended.
const DRAIN_WAIT: Duration = Duration::from_secs(10);

/// The maps' descriptors, passed by the privileged part.
#[derive(Debug)]
pub struct Maps {
    sockets: OwnedFd,
    peers: OwnedFd,
}

#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

pub(crate) fn bpf(
    cmd: u64,
    fd: RawFd,
    key: *const u8,
    value: *const u8,
    flags: u64,
) -> io::Result<()> {
    let attr = ElemAttr {
        map_fd: fd as u32,
        pad: 0,
        key: key as u64,
        value: value as u64,
        flags,
    };
    // SAFETY: `attr` is the layout the kernel reads for element commands and lives across the
    // call; `key` and `value` point to objects of the map's key and value sizes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            &attr as *const ElemAttr,
            std::mem::size_of::<ElemAttr>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub(crate) fn cookie(fd: RawFd) -> io::Result<u64> {
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for the kernel to write.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut v).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

fn set_lowat(fd: RawFd, v: libc::c_int) -> io::Result<()> {
    // SAFETY: `v` is an int, as SO_RCVLOWAT takes.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const v).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A socket's TCP state and the bytes it has taken to send (acknowledged plus queued).
fn tcp_state(fd: RawFd) -> io::Result<(u8, u64)> {
    // `struct tcp_info` up to `tcpi_bytes_acked` (offset 120), as <linux/tcp.h> lays it out.
    let mut info = [0u8; 128];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for the kernel to write.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < info.len() {
        return Err(io::Error::other("TCP_INFO without tcpi_bytes_acked"));
    }
    let mut acked = [0u8; 8];
    acked.copy_from_slice(&info[120..128]);
    let mut outq: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes an int.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &raw mut outq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((
        info[0],
        u64::from_ne_bytes(acked) + u64::try_from(outq).unwrap_or(0),
    ))
}

/// TCP states (`<netinet/tcp.h>`).
const TCP_ESTABLISHED: u8 = 1;
const TCP_FIN_WAIT1: u8 = 4;
const TCP_FIN_WAIT2: u8 = 5;

/// The socket's peer has sent its FIN (or reset it).
fn peer_done(state: u8) -> bool {
    !matches!(state, TCP_ESTABLISHED | TCP_FIN_WAIT1 | TCP_FIN_WAIT2)
}

impl Maps {
    /// The maps from their descriptors (socket map first).
    pub fn new(sockets: OwnedFd, peers: OwnedFd) -> Self {
        Self { sockets, peers }
    }

    fn put_peer(&self, key: u64, peer: u64) -> io::Result<()> {
        let v = SplicePeer { peer, bytes: 0 };
        bpf(
            BPF_MAP_UPDATE_ELEM,
            self.peers.as_raw_fd(),
            (&raw const key).cast(),
            (&raw const v).cast(),
            BPF_NOEXIST,
        )
    }

    fn bytes(&self, key: u64) -> io::Result<u64> {
        let mut v = SplicePeer::default();
        bpf(
            BPF_MAP_LOOKUP_ELEM,
            self.peers.as_raw_fd(),
            (&raw const key).cast(),
            (&raw mut v).cast::<u8>(),
            0,
        )?;
        Ok(v.bytes)
    }

    fn put_socket(&self, key: u64, fd: RawFd) -> io::Result<()> {
        let v = fd as u32;
        bpf(
            BPF_MAP_UPDATE_ELEM,
            self.sockets.as_raw_fd(),
            (&raw const key).cast(),
            (&raw const v).cast(),
            BPF_NOEXIST,
        )
    }

    fn delete(&self, map: &OwnedFd, key: u64) {
        let _ = bpf(
            BPF_MAP_DELETE_ELEM,
            map.as_raw_fd(),
            (&raw const key).cast(),
            std::ptr::null(),
            0,
        );
    }
}

/// A joined pair: removed from both maps when dropped (also when the task is cancelled).
struct Pair<'a> {
    maps: &'a Maps,
    cookies: [u64; 2],
    sockets: [bool; 2],
    peers: [bool; 2],
}

impl Drop for Pair<'_> {
    fn drop(&mut self) {
        for i in 0..2 {
            if self.sockets[i] {
                self.maps.delete(&self.maps.sockets, self.cookies[i]);
            }
            if self.peers[i] {
                self.maps.delete(&self.maps.peers, self.cookies[i]);
            }
        }
    }
}

/// Why joining failed, with the sockets back (nothing was lost: the caller copies in user space).
#[derive(Debug)]
pub struct NotJoined {
    /// The client's socket.
    pub client: TcpStream,
    /// The origin's socket.
    pub upstream: TcpStream,
    /// Why.
    pub why: io::Error,
    /// Bytes of the client's written to the origin while trying (beyond the caller's prefix).
    pub written: u64,
}

/// Joins `client` and `upstream` (to which the caller has written `prefix` bytes of the client's)
/// in the kernel and waits until both sides are done or nothing moved for `idle`. Returns the
/// bytes client to origin (the prefix included) and origin to client.
pub async fn splice(
    maps: &Maps,
    client: TcpStream,
    mut upstream: TcpStream,
    prefix: u64,
    idle: Duration,
) -> Result<(u64, u64), NotJoined> {
    use tokio::io::AsyncWriteExt as _;
    // Empty the client's receive queue (see the module documentation): a read shorter than the
    // buffer took every packet queued, whole.
    let (first, mut prefix) = (prefix, prefix);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match client.try_read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Err(why) = upstream.write_all(&buf[..n]).await {
                    return Err(NotJoined {
                        written: prefix - first,
                        client,
                        upstream,
                        why,
                    });
                }
                prefix += n as u64;
                if n < buf.len() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(why) => {
                return Err(NotJoined {
                    written: prefix - first,
                    client,
                    upstream,
                    why,
                });
            }
        }
    }
    drop(buf);
    let fds = [client.as_raw_fd(), upstream.as_raw_fd()];
    let mut pair = Pair {
        maps,
        cookies: [0; 2],
        sockets: [false; 2],
        peers: [false; 2],
    };
    let joined = (|| -> io::Result<()> {
        pair.cookies = [cookie(fds[0])?, cookie(fds[1])?];
        for fd in fds {
            set_lowat(fd, HOLD_LOWAT)?;
        }
        for i in 0..2 {
            maps.put_peer(pair.cookies[i], pair.cookies[1 - i])?;
            pair.peers[i] = true;
        }
        // The origin's socket first: between the two inserts, data the kernel hands to the
        // verdict on the first socket inserted (only under memory pressure, the low-water mark
        // holds it otherwise) would find no partner. The origin has at most its first answer
        // queued; a client may be sending fast.
        for i in [1, 0] {
            maps.put_socket(pair.cookies[i], fds[i])?;
            pair.sockets[i] = true;
        }
        Ok(())
    })();
    if let Err(why) = joined {
        drop(pair);
        for fd in fds {
            let _ = set_lowat(fd, 1);
        }
        return Err(NotJoined {
            written: prefix - first,
            client,
            upstream,
            why,
        });
    }
    // From here on the kernel moves the bytes: what queued while joining goes first.
    for fd in fds {
        let _ = set_lowat(fd, 1);
    }
    // Out of tokio's reactor, watched for their ends only (see `Ends`).
    let ends = match Ends::watch(client, upstream) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "kernel splice: the sockets cannot be watched; closed");
            let up = maps.bytes(pair.cookies[0]).unwrap_or(0) + prefix;
            let down = maps.bytes(pair.cookies[1]).unwrap_or(0);
            return Ok((up, down));
        }
    };
    // Bytes each side has taken in total (the origin's: the prefix plus what the client sent).
    let taken = |i: usize| -> u64 {
        let from_other = maps.bytes(pair.cookies[1 - i]).unwrap_or(0);
        if i == 1 {
            from_other + prefix
        } else {
            from_other
        }
    };
    let mut ended = [false; 2];
    let mut shut = [false; 2];
    let tick_every = (idle / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
    let mut tick = tokio::time::interval(tick_every);
    let mut moved = (0u64, Instant::now());
    loop {
        tokio::select! {
            r = ends.changed() => {
                if let Err(e) = r { tracing::debug!(error = %e, "kernel splice: watching the ends failed"); break; }
            }
            _ = tick.tick() => {
                let total = maps.bytes(pair.cookies[0]).unwrap_or(0) + maps.bytes(pair.cookies[1]).unwrap_or(0);
                if total != moved.0 {
                    moved = (total, Instant::now());
                } else if moved.1.elapsed() >= idle {
                    tracing::debug!("kernel splice: idle");
                    break;
                }
            }
        }
        let mut failed = false;
        for i in 0..2 {
            match tcp_state(fds[i]) {
                Ok((state, _)) if !ended[i] && peer_done(state) => {
                    tracing::debug!(side = i, state, "kernel splice: a side ended");
                    ended[i] = true;
                    ends.forget(i);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(side = i, error = %e, "kernel splice: reading the state failed");
                    failed = true;
                }
            }
        }
        let errors = [sock_error(fds[0]), sock_error(fds[1])];
        if failed || errors[0] != 0 || errors[1] != 0 {
            tracing::debug!(?errors, "kernel splice: ended by an error");
            break;
        }
        // A side that ended: once the other socket has taken all it sent, its FIN goes on.
        for i in 0..2 {
            let other = 1 - i;
            if ended[i] && !shut[other] {
                // The FIN changes the state before the verdict has run on the data that came
                // with it: first the ended side's queue empties (each verdict counts, then
                // consumes), then the count is final.
                let deadline = Instant::now() + DRAIN_WAIT;
                while unread(fds[i]) > 0 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                let want = taken(other);
                loop {
                    match tcp_state(fds[other]) {
                        Ok((_, have)) if have >= want => break,
                        Ok(_) if Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        _ => break,
                    }
                }
                tracing::debug!(
                    side = i,
                    want,
                    have = ?tcp_state(fds[other]),
                    counted = ?(maps.bytes(pair.cookies[0]), maps.bytes(pair.cookies[1])),
                    prefix,
                    "kernel splice: passing the end on"
                );
                // SAFETY: a valid socket descriptor, owned by `ends`.
                unsafe { libc::shutdown(ends.streams[other].as_raw_fd(), libc::SHUT_WR) };
                shut[other] = true;
            }
        }
        if ended[0] && ended[1] {
            break;
        }
    }
    let up = maps.bytes(pair.cookies[0]).unwrap_or(0) + prefix;
    let down = maps.bytes(pair.cookies[1]).unwrap_or(0);
    drop(pair);
    Ok((up, down))
}

/// A joined pair's sockets, out of tokio's reactor and in an epoll instance of their own that
/// wakes the proxy for a socket's end (FIN: `EPOLLRDHUP`) or error (`EPOLLERR`, `EPOLLHUP`)
/// only. The socket map calls a socket's own data-ready hook after each verdict (a wake-up for
/// `EPOLLIN`), and the kernel's sends on it call its write-space hook (`EPOLLOUT`): registered
/// for reading, as a tokio stream is, the proxy's thread woke for each verdict to find nothing
/// to read, most of its CPU per spliced gigabyte (0.19-0.28 s). The kernel drops a wake-up that
/// names no registered interest before it reaches a waiter.
struct Ends {
    epoll: AsyncFd<EpollFd>,
    streams: [std::net::TcpStream; 2],
}

/// An epoll instance as tokio registers it.
struct EpollFd(Epoll);

impl std::os::fd::AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.0.as_raw_fd()
    }
}

impl Ends {
    fn watch(client: TcpStream, upstream: TcpStream) -> io::Result<Self> {
        let streams = [client.into_std()?, upstream.into_std()?];
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        for (i, s) in streams.iter().enumerate() {
            epoll.add(s, EpollEvent::new(EpollFlags::EPOLLRDHUP, i as u64))?;
        }
        // SAFETY: `EpollFd` owns the descriptor it returns, which stays open and the same until
        // the `AsyncFd` that owns it drops.
        let epoll = unsafe { AsyncFd::register_with_interest(EpollFd(epoll), Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Self { epoll, streams })
    }

    /// Waits until a socket may have ended; what the epoll instance holds is taken.
    async fn changed(&self) -> io::Result<()> {
        let mut guard = self.epoll.readable().await?;
        let mut events = [EpollEvent::empty(); 2];
        let _ = guard.get_inner().0.wait(&mut events, PollTimeout::ZERO);
        guard.clear_ready();
        Ok(())
    }

    /// Stops watching side `i` (it ended; its end stays readable).
    fn forget(&self, i: usize) {
        let _ = self.epoll.get_ref().0.delete(&self.streams[i]);
    }
}

/// Bytes in the socket's receive queue not yet consumed (by a read or the verdict).
fn unread(fd: RawFd) -> i32 {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes an int.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &raw mut n) } < 0 {
        return 0;
    }
    n
}

/// The socket's pending error (a reset), 0 for none.
fn sock_error(fd: RawFd) -> i32 {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for the kernel to write.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&raw mut v).cast(),
            &mut len,
        )
    };
    if r == 0 { v } else { -1 }
}
