//! `icap`: what scanning a 10 MB upload through the organisation's anti-virus adds. The scanner is
//! the real one the tests use (Debian's c-icap `virus_scan` over clamd, objects up to 64 MB
//! scanned), reached with the agent's own ICAP client (`sluice_net::icap::Scanner`, REQMOD, the
//! agent's default 1,024-byte preview), as the proxy does while it holds an upload. The baseline
//! is the same 10 MB sent as an HTTP upload over a loopback TCP connection to a server that reads
//! it whole and answers: what the upload costs without scanning. Rounds alternate the two; the
//! table gives p50 and p99 of each and the scan's added time as a ratio to the upload's.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::json;
use sluice_e2e::icap::Scanner as Daemons;
use sluice_net::icap::{Mode, Scanner, Verdict};

const SIZE: usize = 10 << 20;

fn pct(sorted: &[f64], p: usize) -> f64 {
    sorted
        .get((sorted.len() * p / 100).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0)
}

/// A server that reads each upload whole (by its Content-Length) and answers 201.
fn sink() -> Result<std::net::SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut r = BufReader::new(s.try_clone()?);
                let mut s = s;
                loop {
                    let mut len = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if r.read_line(&mut line)? == 0 {
                            return Ok(());
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    std::io::copy(&mut (&mut r).take(len as u64), &mut std::io::sink())?;
                    s.write_all(b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n")?;
                }
            });
        }
    });
    Ok(addr)
}

fn upload(conn: &mut TcpStream, reader: &mut BufReader<TcpStream>, body: &[u8]) -> Result<()> {
    write!(
        conn,
        "POST /upload HTTP/1.1\r\nhost: files.test\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )?;
    conn.write_all(body)?;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if !line.starts_with("HTTP/1.1 201") {
        bail!("the sink answered {line:?}");
    }
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        if line == "\r\n" {
            return Ok(());
        }
    }
}

pub fn run(args: &[String]) -> Result<()> {
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| "target/bench/icap.json".into());
    let rounds: usize = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .map_or(Ok(30), |v| v.parse())?;
    // Incompressible, and nothing a signature matches: a clean file the scanner reads whole.
    let mut body = vec![0u8; SIZE];
    aws_lc_rs::rand::fill(&mut body).map_err(|_| anyhow::anyhow!("random"))?;
    let daemons = Daemons::start().context("starting c-icap and clamd")?;
    let scanner = Scanner {
        addr: daemons.addr(),
        uri: daemons.service_uri("virus_scan"),
        preview: 1024,
        budget: Duration::from_secs(60),
    };
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: files.test\r\nContent-Type: application/octet-stream\r\nContent-Length: {SIZE}\r\n\r\n"
    );
    let addr = sink()?;
    let mut conn = TcpStream::connect(addr)?;
    conn.set_nodelay(true)?;
    let mut reader = BufReader::new(conn.try_clone()?);
    // Warm both (clamd loads lazily, the page cache fills).
    upload(&mut conn, &mut reader, &body)?;
    let v = scanner.scan(Mode::Reqmod, head.as_bytes(), &body)?;
    if v != Verdict::Clean {
        bail!("the clean file was flagged: {v:?}");
    }
    let (mut plain, mut scanned) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        upload(&mut conn, &mut reader, &body)?;
        plain.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        let v = scanner.scan(Mode::Reqmod, head.as_bytes(), &body)?;
        scanned.push(t.elapsed().as_secs_f64() * 1000.0);
        if v != Verdict::Clean {
            bail!("the clean file was flagged: {v:?}");
        }
    }
    // The scanner must have read the whole object: an EICAR at its end is found.
    let mut infected = body.clone();
    infected[SIZE - 100..SIZE - 100 + sluice_e2e::icap::EICAR.len()]
        .copy_from_slice(sluice_e2e::icap::EICAR);
    let found = matches!(
        scanner.scan(Mode::Reqmod, head.as_bytes(), &infected)?,
        Verdict::Infected(_)
    );
    if !found {
        bail!(
            "a 10 MB file with EICAR at its end was not flagged: the scanner did not read it whole"
        );
    }
    for v in [&mut plain, &mut scanned] {
        v.sort_by(f64::total_cmp);
    }
    let (p50, p99) = (pct(&plain, 50), pct(&plain, 99));
    let (s50, s99) = (pct(&scanned, 50), pct(&scanned, 99));
    println!(
        "icap: a 10 MB upload, {rounds} rounds (c-icap virus_scan over clamd, REQMOD, preview 1,024)"
    );
    println!("{:<48} {:>10} {:>12}", "figure", "ms", "vs baseline");
    println!(
        "{:<48} {:>10.1} {:>12}",
        "upload over loopback (baseline) p50", p50, "1.00x"
    );
    println!(
        "{:<48} {:>10.1} {:>12}",
        "upload over loopback (baseline) p99", p99, ""
    );
    println!(
        "{:<48} {:>10.1} {:>11.2}x",
        "ICAP scan added (the proxy holds the upload) p50",
        s50,
        s50 / p50.max(1e-9)
    );
    println!(
        "{:<48} {:>10.1} {:>11.2}x",
        "ICAP scan added p99",
        s99,
        s99 / p99.max(1e-9)
    );
    println!("an EICAR at the end of a 10 MB file is found: the scanner reads objects whole");
    let doc = json!({
        "bench": "icap",
        "bytes": SIZE,
        "rounds": rounds,
        "upload_p50_ms": p50, "upload_p99_ms": p99,
        "scan_p50_ms": s50, "scan_p99_ms": s99,
        "scan_vs_upload_p50": s50 / p50.max(1e-9),
        "eicar_at_end_found": found,
    });
    if let Some(d) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&doc)?)?;
    Ok(())
}
