//! `sluice-probe`: the client the end-to-end tests run inside test cgroups.
//!
//! - `sluice-probe tcp ADDR [--count N] [--concurrency C] [--check-pid]`: opens N connections (C at
//!   a time) and reads one line from each. Without `--check-pid` it prints each line. With it, each
//!   line must be the test proxy's `proxy dst=ADDR pid=OWN_PID ...`; it prints `ok N` or fails.
//! - `sluice-probe udp ADDR connect|sendto`: sends one datagram; prints `sent` or `refused ERR`.

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
    let addr: SocketAddr = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .ok_or("usage: sluice-probe tcp|udp ADDR ...")?;
    match args.first().map(String::as_str) {
        Some("tcp") => tcp(addr, args),
        Some("udp") => udp(addr, args.get(2).map(String::as_str).unwrap_or("connect")),
        _ => Err("usage: sluice-probe tcp|udp ADDR ...".into()),
    }
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

fn tcp(addr: SocketAddr, args: &[String]) -> Result<(), String> {
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
        other => return Err(format!("unknown udp mode {other}")),
    };
    match res {
        Ok(_) => println!("sent"),
        Err(e) => println!("refused {}", e.raw_os_error().unwrap_or(0)),
    }
    Ok(())
}
