//! The ICAP scanner harness ([`sluice_e2e::icap::Scanner`]) against c-icap's own client: the EICAR
//! test file is reported infected in RESPMOD (downloads) and REQMOD (uploads), a clean file is
//! left unmodified (204), the `echo` service answers, and a stopped scanner refuses connections.
//! Needs c-icap, libc-icap-mod-virus-scan and clamav-daemon (`cargo xtask setup` installs them),
//! not root.

#![allow(clippy::unwrap_used)]

use std::{
    net::TcpStream,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use sluice_e2e::{
    TempDir, free_port,
    icap::{EICAR, EICAR_BODY_SIGNATURE, Scanner, icap_options},
    wait_until,
};

/// What `c-icap-client -v` printed, split into the ICAP status line and headers (continuation
/// lines of `X-Violations-Found` joined to it) and the encapsulated HTTP head.
#[derive(Debug)]
struct Reply {
    status: u16,
    icap_headers: Vec<String>,
    http_head: Vec<String>,
    body: String,
    elapsed: Duration,
    raw: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        let prefix = format!("{}:", name.to_ascii_lowercase());
        self.icap_headers
            .iter()
            .find(|h| h.to_ascii_lowercase().starts_with(&prefix))
            .map(|h| h[prefix.len()..].trim())
    }
}

/// Runs `c-icap-client` against `service` with `file`; `mode` is `-req URL` or `-resp URL`.
fn client(scanner: &Scanner, service: &str, file: &Path, mode: &[&str], extra: &[&str]) -> Reply {
    let out_file = file.with_extension("out");
    let _ = std::fs::remove_file(&out_file);
    let started = Instant::now();
    let out = Command::new("c-icap-client")
        .args(["-i", "127.0.0.1", "-p"])
        .arg(scanner.addr().port().to_string())
        .args(["-s", service, "-v", "-f"])
        .arg(file)
        .args(mode)
        .args(extra)
        .arg("-o")
        .arg(&out_file)
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    let raw = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "c-icap-client failed: {raw}");
    let mut icap_headers: Vec<String> = Vec::new();
    let mut http_head = Vec::new();
    let mut section = "";
    for line in raw.lines() {
        match line.trim_end() {
            "ICAP HEADERS:" => section = "icap",
            "RESPMOD HEADERS:" | "REQMOD HEADERS:" => section = "http",
            "" => section = "",
            l if l.starts_with('\t') => {
                let l = l.trim().to_owned();
                if section == "icap" {
                    // c-icap-client prints one header per line; RFC 3507's X-Violations-Found
                    // value spans lines (count, then filename, threat, id, resolution).
                    match icap_headers.last_mut() {
                        Some(last) if !l.contains(':') => {
                            last.push_str(" | ");
                            last.push_str(&l);
                        }
                        _ => icap_headers.push(l),
                    }
                } else if section == "http" {
                    http_head.push(l);
                }
            }
            _ => {}
        }
    }
    let status = icap_headers
        .first()
        .and_then(|s| s.strip_prefix("ICAP/1.0 "))
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no ICAP status line in: {raw}"));
    let body = std::fs::read_to_string(&out_file).unwrap_or_default();
    Reply {
        status,
        icap_headers,
        http_head,
        body,
        elapsed,
        raw,
    }
}

fn show(what: &str, r: &Reply) {
    eprintln!("== {what}: ICAP {} in {:?}", r.status, r.elapsed);
    for h in &r.icap_headers {
        eprintln!("   icap: {h}");
    }
    for h in &r.http_head {
        eprintln!("   http: {h}");
    }
    if !r.body.is_empty() {
        eprintln!("   body: {} bytes", r.body.len());
    }
}

#[test]
fn scanner_flags_eicar_passes_clean_and_refuses_when_stopped() {
    let t0 = Instant::now();
    let mut scanner = Scanner::start().unwrap();
    let timings = scanner.timings();
    eprintln!(
        "scanner up at {} in {:?} (clamd {:?}, c-icap {:?})",
        scanner.addr(),
        t0.elapsed(),
        timings.clamd_ready,
        timings.icap_ready
    );

    let options = icap_options(scanner.addr(), "virus_scan").unwrap();
    eprintln!("OPTIONS {}:\n{options}", scanner.service_uri("virus_scan"));
    assert!(options.contains("Methods: RESPMOD, REQMOD"), "{options}");
    let echo = icap_options(scanner.addr(), "echo").unwrap();
    assert!(echo.starts_with("ICAP/1.0 200"), "{echo}");

    let files = TempDir::new(&format!("icap-files-{}", free_port()));
    let eicar = files.join("eicar.com");
    std::fs::write(&eicar, EICAR).unwrap();
    // EICAR inside a larger object: the body signature, not the whole-file hash, must match.
    let embedded = files.join("embedded.txt");
    let mut bytes = b"report follows\n".repeat(200);
    bytes.extend_from_slice(EICAR);
    bytes.extend_from_slice(b"\nend\n");
    std::fs::write(&embedded, bytes).unwrap();
    let clean = files.join("clean.txt");
    std::fs::write(&clean, b"quarterly numbers, nothing to see\n".repeat(100)).unwrap();

    let download = ["-resp", "http://origin.test/files/report"];
    let upload = ["-req", "http://origin.test/upload"];
    for (mode_name, mode) in [("RESPMOD", &download), ("REQMOD", &upload)] {
        for (preview_name, extra) in [("preview", &[][..]), ("no preview", &["-nopreview"][..])] {
            for (file_name, file) in [("eicar", &eicar), ("embedded", &embedded)] {
                let r = client(&scanner, "virus_scan", file, mode, extra);
                show(&format!("{mode_name} {file_name} ({preview_name})"), &r);
                assert_eq!(r.status, 200, "{}\n{}", r.raw, scanner.logs());
                let infection = r.header("X-Infection-Found").unwrap_or_default();
                assert!(
                    infection.contains(&format!("Threat={EICAR_BODY_SIGNATURE}")),
                    "{}",
                    r.raw
                );
                let violations = r.header("X-Violations-Found").unwrap_or_default();
                assert!(violations.starts_with("1 "), "{violations:?}");
                assert!(violations.contains(EICAR_BODY_SIGNATURE), "{violations:?}");
                assert!(
                    r.http_head
                        .first()
                        .is_some_and(|l| l.contains(" 403 Forbidden")),
                    "{:?}",
                    r.http_head
                );
                assert!(r.body.contains("VIRUS FOUND"), "{}", r.body);
                assert!(r.body.contains(EICAR_BODY_SIGNATURE), "{}", r.body);
            }
            let r = client(&scanner, "virus_scan", &clean, mode, extra);
            show(&format!("{mode_name} clean ({preview_name})"), &r);
            assert_eq!(r.status, 204, "{}\n{}", r.raw, scanner.logs());
            assert!(r.header("X-Infection-Found").is_none(), "{}", r.raw);
        }
        // Without 204 allowed outside the preview, the clean object comes back whole.
        let r = client(
            &scanner,
            "virus_scan",
            &clean,
            mode,
            &["-nopreview", "-no204"],
        );
        show(&format!("{mode_name} clean (no preview, no 204)"), &r);
        assert_eq!(r.status, 200, "{}", r.raw);
        assert!(r.header("X-Infection-Found").is_none(), "{}", r.raw);
        assert_eq!(r.body.as_bytes(), std::fs::read(&clean).unwrap());
    }

    // The echo service returns even EICAR untouched: it scans nothing.
    let r = client(&scanner, "echo", &eicar, &download, &["-no204"]);
    show("echo RESPMOD eicar (no 204)", &r);
    assert!(r.header("X-Infection-Found").is_none(), "{}", r.raw);

    let addr = scanner.addr();
    let stopped = Instant::now();
    scanner.stop();
    assert!(
        wait_until(Duration::from_secs(5), || TcpStream::connect(addr)
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)),
        "c-icap still accepts on {addr} after stop()"
    );
    eprintln!("refused after stop() in {:?}", stopped.elapsed());
    let dir = scanner.dir().to_path_buf();
    drop(scanner);
    assert!(!dir.exists(), "{} left behind", dir.display());
    eprintln!("total {:?}", t0.elapsed());
}

/// Sluice's own ICAP client (`sluice_net::icap`) against the real scanner: the EICAR file is
/// named as a threat in RESPMOD and REQMOD (with a preview shorter than the file, so the
/// scanner asks for the rest), a clean file is clean, and a stopped scanner is an error within
/// the budget, never a verdict.
#[test]
fn sluices_icap_client_gets_the_scanners_verdicts() {
    use sluice_net::icap::{IcapError, Mode, Scanner as Client, Verdict};
    let mut scanner = Scanner::start().unwrap();
    let client = Client {
        addr: scanner.addr(),
        uri: scanner.service_uri("virus_scan"),
        preview: 16,
        budget: Duration::from_secs(5),
    };
    let mut infected = b"quarterly figures, attached\n".repeat(40);
    infected.extend_from_slice(EICAR);
    let clean = b"nothing to see here\n".repeat(100);
    let response = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n";
    let request = b"POST /upload HTTP/1.1\r\nHost: files.example\r\n\r\n";
    for (mode, head) in [(Mode::Respmod, &response[..]), (Mode::Reqmod, &request[..])] {
        for body in [EICAR, &infected[..]] {
            let started = Instant::now();
            let v = client.scan(mode, head, body).unwrap();
            println!(
                "{mode:?} {} bytes: {v:?} in {:?}",
                body.len(),
                started.elapsed()
            );
            match v {
                Verdict::Infected(t) => assert!(t.starts_with(EICAR_BODY_SIGNATURE), "{t}"),
                other => panic!("{mode:?}: EICAR not flagged: {other:?}"),
            }
        }
        let v = client.scan(mode, head, &clean).unwrap();
        assert_eq!(v, Verdict::Clean, "{mode:?}");
    }
    scanner.stop();
    let started = Instant::now();
    let e = client.scan(Mode::Respmod, response, EICAR).unwrap_err();
    assert!(matches!(e, IcapError::Io(_) | IcapError::Timeout(_)), "{e}");
    assert!(started.elapsed() < Duration::from_secs(6));
}
