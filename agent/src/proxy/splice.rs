//! Byte-for-byte relaying between a client and its original destination.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpSocket, TcpStream},
};

/// Makes a socket whose two ends are both on this host (a client steered here by the cgroup hooks,
/// an origin on loopback) send without TCP pacing: there is no link between them for pacing to
/// protect, and a pacing congestion control (BBR, the default on many hosts) would charge the
/// proxy a kernel timer for every burst of every transfer on that leg. Such sockets use CUBIC, or
/// Reno where CUBIC is not allowed to unprivileged processes (Reno always is). On a listening
/// socket it holds for every connection accepted from it. A refusal leaves the system's choice: a
/// cost, never a fault. Legs to other hosts keep the system's congestion control.
pub fn unpaced(socket: &impl std::os::fd::AsFd) {
    let s = socket2::SockRef::from(socket);
    for name in [&b"cubic"[..], b"reno"] {
        if s.set_tcp_congestion(name).is_ok() {
            return;
        }
    }
}

/// Connects to `dst` from a socket carrying `mark` (`SO_MARK`), so the kernel programs and any
/// gateway rules recognise the agent's own traffic. A destination on loopback is reached
/// [`unpaced`].
pub async fn connect_marked(
    dst: SocketAddr,
    mark: u32,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let socket = if dst.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if mark != 0 {
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Mark, &mark)
            .map_err(std::io::Error::from)?;
    }
    if dst.ip().to_canonical().is_loopback() {
        unpaced(&socket);
    }
    let stream = tokio::time::timeout(timeout, socket.connect(dst))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connect to {dst} timed out"),
            )
        })??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Copies both ways until both sides are done, or nothing moved either way for `idle`.
/// Returns (bytes client->origin, bytes origin->client).
pub async fn splice(client: TcpStream, upstream: TcpStream, idle: Duration) -> (u64, u64) {
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let up = pump(cr, uw, last.clone(), start, idle);
    let down = pump(ur, cw, last, start, idle);
    tokio::join!(up, down)
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    last: Arc<AtomicU64>,
    start: Instant,
    idle: Duration,
) -> u64 {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match tokio::time::timeout(idle, from.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => n,
            Err(_) => {
                // Quiet this way; keep going while the other direction is busy.
                let since = start
                    .elapsed()
                    .saturating_sub(Duration::from_nanos(last.load(Ordering::Relaxed)));
                if since >= idle {
                    break;
                }
                continue;
            }
        };
        last.store(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        total += n as u64;
    }
    let _ = to.shutdown().await;
    total
}
