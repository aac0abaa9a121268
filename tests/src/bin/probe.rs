//! `sluice-probe`: the client the end-to-end tests run inside test cgroups.
//!
//! - `sluice-probe tcp ADDR [--count N] [--concurrency C] [--check-pid]`: opens N connections (C at
//!   a time) and reads one line from each. Without `--check-pid` it prints each line. With it, each
//!   line must be the test proxy's `proxy dst=ADDR pid=OWN_PID ...`; it prints `ok N` or fails.
//! - `sluice-probe udp ADDR connect|sendto`: sends one datagram; prints `sent` or `refused ERR`.
//! - `sluice-probe udp ADDR roundtrip`: sends one datagram on a connected socket and waits up to
//!   3 s; prints `reply`, `refused ERR` (an ICMP unreachable came back) or `timeout`.
//! - `sluice-probe gen N`: writes N bytes of the test pattern to stdout.
//! - `sluice-probe transfer ADDR UP`: sends UP bytes of the test pattern, shuts its sending side
//!   down, reads to the end; prints `received N sha256 HEX`.
//! - `sluice-probe wss ADDR NAME CA_PEM`: WebSocket over TLS to ADDR with SNI NAME, trusting CA_PEM;
//!   sends a masked frame and prints `echo ok` when the same bytes come back.
//! - `sluice-probe idle ADDR NAME CA_PEM h2|http/1.1`: completes a TLS handshake, then sends
//!   nothing; prints `closed after N ms` when the server closes the connection (at most 30 s).
//! - `sluice-probe slowhello ADDR NAME CA_PEM MS`: connects, stays silent for MS milliseconds,
//!   then speaks HTTPS (trusting CA_PEM) and prints the response's status line.
//! - `sluice-probe hello ADDR garbage|truncated`: sends a bad ClientHello; prints `closed` when the
//!   server closes the connection.
//! - `sluice-probe replay ADDR PORT`: one socket, three connections, a line (or `closed`) printed
//!   from each: to ADDR; disconnected (`connect` with `AF_UNSPEC`) and connected straight to
//!   127.0.0.1:PORT; disconnected again and connected to ADDR again.

use std::{
    io::{BufRead as _, BufReader},
    net::{SocketAddr, TcpStream, UdpSocket},
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

fn flag_value(args: &[String], name: &str, default: usize) -> Result<usize, String> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{name} needs a number")),
        None => Ok(default),
    }
}

fn run(args: &[String]) -> Result<(), String> {
    if args.first().map(String::as_str) == Some("gen") {
        let n: u64 = args
            .get(1)
            .and_then(|a| a.parse().ok())
            .ok_or("usage: sluice-probe gen N")?;
        return gen_pattern(n);
    }
    let addr: SocketAddr = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .ok_or("usage: sluice-probe tcp|udp ADDR ...")?;
    match args.first().map(String::as_str) {
        Some("tcp") => tcp(addr, args),
        Some("replay") => replay(addr, args),
        Some("transfer") => transfer(addr, args),
        Some("wss") => wss(addr, args),
        Some("idle") => idle(addr, args),
        Some("slowhello") => slow_hello(addr, args),
        Some("hello") => bad_hello(addr, args.get(2).map(String::as_str).unwrap_or("garbage")),
        Some("udp") => udp(addr, args.get(2).map(String::as_str).unwrap_or("connect")),
        Some("dns") => dns(
            addr,
            args.get(2).map(String::as_str).unwrap_or("example.test"),
            args.get(3).is_some_and(|m| m == "connect"),
        ),
        _ => Err("usage: sluice-probe tcp|udp ADDR ...".into()),
    }
}

/// See the module documentation: a socket reused to reach the proxy's port without being steered.
fn replay(addr: SocketAddr, args: &[String]) -> Result<(), String> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, connect, setsockopt, socket,
        sockopt::ReceiveTimeout,
    };
    use std::os::fd::AsRawFd as _;
    let port: u16 = args
        .get(2)
        .and_then(|p| p.parse().ok())
        .ok_or("replay needs the proxy's port")?;
    let SocketAddr::V4(v4) = addr else {
        return Err("replay takes an IPv4 address".into());
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| e.to_string())?;
    setsockopt(&fd, ReceiveTimeout, &nix::sys::time::TimeVal::new(10, 0))
        .map_err(|e| e.to_string())?;
    let proxy = std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, port);
    for (i, to) in [v4, proxy, v4].into_iter().enumerate() {
        if i > 0 {
            // SAFETY: a sockaddr of family AF_UNSPEC, the size the call is given.
            let unspec = libc::sockaddr {
                sa_family: libc::AF_UNSPEC as libc::sa_family_t,
                sa_data: [0; 14],
            };
            let rc = unsafe {
                libc::connect(
                    fd.as_raw_fd(),
                    &raw const unspec,
                    std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(format!("disconnect: {}", std::io::Error::last_os_error()));
            }
        }
        connect(fd.as_raw_fd(), &SockaddrIn::from(to)).map_err(|e| format!("connect {to}: {e}"))?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            match nix::unistd::read(&fd, &mut byte) {
                Ok(1) if byte[0] != b'\n' => line.push(byte[0]),
                _ => break,
            }
        }
        if line.is_empty() {
            println!("closed");
        } else {
            println!("{}", String::from_utf8_lossy(&line));
        }
    }
    Ok(())
}

fn one_line(addr: SocketAddr) -> Result<String, String> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    Ok(line.trim_end().to_owned())
}

/// One line from `addr`, the connection made from `from` (bound first).
fn one_line_from(addr: SocketAddr, from: SocketAddr) -> Result<String, String> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, setsockopt, socket,
        sockopt::ReuseAddr,
    };
    let family = if from.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| format!("socket: {e}"))?;
    setsockopt(&fd, ReuseAddr, &true).map_err(|e| format!("SO_REUSEADDR: {e}"))?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(from),
    )
    .map_err(|e| format!("bind {from}: {e}"))?;
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )
    .map_err(|e| format!("connect {addr}: {e}"))?;
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    Ok(line.trim_end().to_owned())
}

fn tcp(addr: SocketAddr, args: &[String]) -> Result<(), String> {
    if let Some(i) = args.iter().position(|a| a == "--from") {
        let from: SocketAddr = args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .ok_or("--from needs an address:port")?;
        println!("{}", one_line_from(addr, from)?);
        return Ok(());
    }
    let count = flag_value(args, "--count", 1)?;
    let concurrency = flag_value(args, "--concurrency", 1)?.clamp(1, count.max(1));
    let check = args.iter().any(|a| a == "--check-pid");
    if !check {
        for _ in 0..count {
            println!("{}", one_line(addr)?);
        }
        return Ok(());
    }
    let me = std::process::id();
    let want_dst = format!("dst={addr}");
    let want_pid = format!("pid={me}");
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let next = next.clone();
            let (want_dst, want_pid) = (want_dst.clone(), want_pid.clone());
            std::thread::spawn(move || -> Result<usize, String> {
                let mut ok = 0;
                while next.fetch_add(1, Ordering::Relaxed) < count {
                    let line = one_line(addr)?;
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    if fields.first() != Some(&"proxy")
                        || !fields.contains(&want_dst.as_str())
                        || !fields.contains(&want_pid.as_str())
                    {
                        return Err(format!(
                            "mixed up: expected {want_dst} {want_pid}, got `{line}`"
                        ));
                    }
                    ok += 1;
                }
                Ok(ok)
            })
        })
        .collect();
    let mut total = 0;
    for w in workers {
        total += w.join().map_err(|_| "worker panicked".to_owned())??;
    }
    println!("ok {total}");
    Ok(())
}

/// Asks the DNS server at `addr` for the A records of `name`; prints the answer's size. With
/// `connected`, from a connected socket (as glibc's resolver does), else with `sendto` (as musl's
/// does).
fn dns(addr: SocketAddr, name: &str, connected: bool) -> Result<(), String> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let sock = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    if connected {
        sock.connect(addr)
            .and_then(|()| sock.send(&q))
            .map_err(|e| e.to_string())?;
    } else {
        sock.send_to(&q, addr).map_err(|e| e.to_string())?;
    }
    let mut buf = [0u8; 1500];
    let (n, _) = sock.recv_from(&mut buf).map_err(|e| e.to_string())?;
    println!("answer {n} bytes");
    Ok(())
}

fn udp(addr: SocketAddr, mode: &str) -> Result<(), String> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .map_err(|_| "bind addr")?;
    let sock = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
    let res = match mode {
        "connect" => sock.connect(addr).and_then(|()| sock.send(b"quic?")),
        "sendto" => sock.send_to(b"quic?", addr),
        "roundtrip" => {
            let start = std::time::Instant::now();
            let got = sock
                .connect(addr)
                .and_then(|()| sock.set_read_timeout(Some(Duration::from_secs(3))))
                .and_then(|()| sock.send(b"quic?"))
                .and_then(|_| sock.recv(&mut [0u8; 64]));
            let ms = start.elapsed().as_millis();
            match got {
                Ok(_) => println!("reply {ms}"),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    println!("timeout {ms}")
                }
                Err(e) => println!("refused {} {ms}", e.raw_os_error().unwrap_or(0)),
            }
            return Ok(());
        }
        other => return Err(format!("unknown udp mode {other}")),
    };
    match res {
        Ok(_) => println!("sent"),
        Err(e) => println!("refused {}", e.raw_os_error().unwrap_or(0)),
    }
    Ok(())
}

fn transfer(addr: SocketAddr, args: &[String]) -> Result<(), String> {
    use sha2::Digest as _;
    use std::io::{Read as _, Write as _};
    let up: u64 = args
        .get(2)
        .and_then(|a| a.parse().ok())
        .ok_or("usage: sluice-probe transfer ADDR UP")?;
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let sender = std::thread::spawn(move || -> Result<(), String> {
        let mut buf = vec![0u8; 256 * 1024];
        let mut off = 0u64;
        while off < up {
            let len = ((up - off) as usize).min(buf.len());
            sluice_e2e::pattern(off, &mut buf[..len]);
            w.write_all(&buf[..len])
                .map_err(|e| format!("sending: {e}"))?;
            off += len as u64;
        }
        w.shutdown(std::net::Shutdown::Write)
            .map_err(|e| format!("shutdown: {e}"))
    });
    let (mut n, mut h, mut buf) = (0u64, sha2::Sha256::new(), vec![0u8; 256 * 1024]);
    let mut r = &s;
    loop {
        let k = r.read(&mut buf).map_err(|e| format!("receiving: {e}"))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    sender.join().map_err(|_| "sender panicked")??;
    println!("received {n} sha256 {}", sluice_e2e::hex(&h.finalize()));
    Ok(())
}

fn gen_pattern(n: u64) -> Result<(), String> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < n {
        let len = ((n - off) as usize).min(buf.len());
        sluice_e2e::pattern(off, &mut buf[..len]);
        out.write_all(&buf[..len]).map_err(|e| e.to_string())?;
        off += len as u64;
    }
    out.flush().map_err(|e| e.to_string())
}

fn bad_hello(addr: SocketAddr, kind: &str) -> Result<(), String> {
    use std::io::{Read as _, Write as _};
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    let bytes: Vec<u8> = match kind {
        // A handshake record whose body is not a ClientHello.
        "garbage" => b"\x16\x03\x01\x00\x08garbage!".to_vec(),
        // A ClientHello record header promising more than is ever sent.
        "truncated" => b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(),
        // A well-formed ClientHello naming `cover.test` and carrying an encrypted_client_hello
        // extension (its payload is opaque to anyone but the real server).
        "ech" => client_hello("cover.test", true),
        // A well-formed ClientHello whose server name is only a dot.
        "dots" => client_hello(".", false),
        other => return Err(format!("unknown kind {other}")),
    };
    s.write_all(&bytes).map_err(|e| e.to_string())?;
    if kind == "truncated" {
        // Half-close: the peer must notice the ClientHello will never complete.
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => println!("closed"),
        Ok(n) => println!("got {n} bytes"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => println!("closed"),
        Err(e) => println!("error {e}"),
    }
    Ok(())
}

/// A TLS 1.3 ClientHello record naming `sni`, with an encrypted_client_hello extension when `ech`.
fn client_hello(sni: &str, ech: bool) -> Vec<u8> {
    fn ext(out: &mut Vec<u8>, ty: u16, data: &[u8]) {
        out.extend_from_slice(&ty.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(data);
    }
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[0x5a; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01]); // TLS_AES_128_GCM_SHA256
    body.extend_from_slice(&[1, 0]); // null compression
    let mut exts = Vec::new();
    let mut list = vec![0];
    list.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    list.extend_from_slice(sni.as_bytes());
    let mut names = (list.len() as u16).to_be_bytes().to_vec();
    names.extend_from_slice(&list);
    ext(&mut exts, 0, &names);
    ext(&mut exts, 43, &[2, 0x03, 0x04]); // supported_versions: TLS 1.3
    ext(&mut exts, 10, &[0, 2, 0, 0x1d]); // supported_groups: x25519
    ext(&mut exts, 13, &[0, 2, 0x04, 0x03]); // signature_algorithms: ecdsa_secp256r1_sha256
    let mut share = vec![0, 36, 0, 0x1d, 0, 32];
    share.extend_from_slice(&[9; 32]);
    ext(&mut exts, 51, &share); // key_share
    if ech {
        // encrypted_client_hello: outer, HPKE suite, config id, enc, payload (opaque here).
        let mut e = vec![0, 0, 1, 0, 1, 7, 0, 32];
        e.extend_from_slice(&[3; 32]);
        e.extend_from_slice(&[0, 64]);
        e.extend_from_slice(&[4; 64]);
        ext(&mut exts, 0xfe0d, &e);
    }
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![1, 0, (body.len() >> 8) as u8, body.len() as u8];
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

fn wss(addr: SocketAddr, args: &[String]) -> Result<(), String> {
    use std::io::{Read as _, Write as _};
    let name = args.get(2).ok_or("wss needs NAME")?.clone();
    let ca = args.get(3).ok_or("wss needs CA_PEM")?;
    let conn = tls_client(ca, &name, b"http/1.1")?;
    let tcp =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    write!(
        tls,
        "GET /ws HTTP/1.1\r\nHost: {name}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    // Read the response head byte by byte up to the blank line.
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tls.read_exact(&mut b)
            .map_err(|e| format!("read head: {e}"))?;
        head.push(b[0]);
        if head.len() > 16384 {
            return Err("response head too large".into());
        }
    }
    let head = String::from_utf8_lossy(&head).to_string();
    if !head.starts_with("HTTP/1.1 101") {
        return Err(format!("no upgrade: {head}"));
    }
    let want = sluice_e2e::websocket_accept(key);
    if !head.to_ascii_lowercase().contains(&format!(
        "sec-websocket-accept: {}",
        want.to_ascii_lowercase()
    )) {
        return Err(format!("bad accept in {head}"));
    }
    // A masked text frame, as a client must send.
    let payload = b"hello through sluice";
    let mask = [0x11u8, 0x22, 0x33, 0x44];
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, c)| c ^ mask[i % 4]));
    tls.write_all(&frame)
        .map_err(|e| format!("write frame: {e}"))?;
    let mut back = vec![0u8; frame.len()];
    tls.read_exact(&mut back)
        .map_err(|e| format!("read echo: {e}"))?;
    if back != frame {
        return Err("echo differs".into());
    }
    println!("echo ok");
    Ok(())
}

fn idle(addr: SocketAddr, args: &[String]) -> Result<(), String> {
    use std::io::Read as _;
    let name = args.get(2).ok_or("idle needs NAME")?.clone();
    let ca = args.get(3).ok_or("idle needs CA_PEM")?;
    let alpn = args.get(4).cloned().unwrap_or_else(|| "h2".into());
    let conn = tls_client(ca, &name, alpn.as_bytes())?;
    let tcp =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let start = std::time::Instant::now();
    // Reading drives the handshake; then whatever the server sends (an HTTP/2 SETTINGS or GOAWAY)
    // is drained until it closes.
    let mut buf = [0u8; 4096];
    loop {
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return Err("the server kept the idle connection open for 30 s".into());
            }
            Err(_) => break,
        }
    }
    println!("closed after {} ms", start.elapsed().as_millis());
    Ok(())
}

/// A TLS client connection to `name`, trusting the CA certificates in `ca`, offering `alpn`.
fn tls_client(ca: &str, name: &str, alpn: &[u8]) -> Result<rustls::ClientConnection, String> {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca).map_err(|e| e.to_string())? {
        roots
            .add(c.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let server =
        rustls_pki_types::ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
    rustls::ClientConnection::new(std::sync::Arc::new(cfg), server).map_err(|e| e.to_string())
}

fn slow_hello(addr: SocketAddr, args: &[String]) -> Result<(), String> {
    use std::io::{BufRead as _, Write as _};
    let name = args.get(2).ok_or("slowhello needs NAME")?.clone();
    let ca = args.get(3).ok_or("slowhello needs CA_PEM")?;
    let ms: u64 = args
        .get(4)
        .and_then(|v| v.parse().ok())
        .ok_or("slowhello needs MS")?;
    let conn = tls_client(ca, &name, b"http/1.1")?;
    let tcp =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(ms));
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    write!(
        tls,
        "GET /hello HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("handshake or write: {e}"))?;
    let mut line = String::new();
    std::io::BufReader::new(tls)
        .read_line(&mut line)
        .map_err(|e| format!("read: {e}"))?;
    println!("{}", line.trim_end());
    Ok(())
}
