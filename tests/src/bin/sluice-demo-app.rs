//! `sluice-demo-app`: the demo file-sharing app (`files.test`) as a process, for `cargo xtask demo`
//! and manual trials. Runs until Ctrl-C (or SIGTERM).
//!
//! ```text
//! sluice-demo-app [--listen ADDR] [--cert-dir DIR | --plain] [--password PW]
//!                 [--store-limit BYTES]
//! ```
//! With `--cert-dir`, the TLS certificates are loaded from DIR or, when absent, made there
//! (`ca.pem`, `files.test.pem`, `files.test.key`); without it a fresh PKI is made in a temporary
//! directory. The CA's path is printed so clients can trust it. The request and upload log is at
//! `GET /_log`.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result, bail};
use sluice_e2e::demo_app::{DemoApp, DemoOptions, DemoPki};

const USAGE: &str = "usage: sluice-demo-app [--listen ADDR] [--cert-dir DIR | --plain] \
                     [--password PW] [--store-limit BYTES]";

#[derive(Debug)]
struct Args {
    listen: SocketAddr,
    cert_dir: Option<PathBuf>,
    plain: bool,
    password: Option<String>,
    store_limit: Option<u64>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
        cert_dir: None,
        plain: false,
        password: None,
        store_limit: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--listen" => {
                let v = value("--listen")?;
                args.listen = v.parse().with_context(|| format!("--listen {v}"))?;
            }
            "--cert-dir" => args.cert_dir = Some(PathBuf::from(value("--cert-dir")?)),
            "--plain" => args.plain = true,
            "--password" => args.password = Some(value("--password")?),
            "--store-limit" => {
                let v = value("--store-limit")?;
                args.store_limit = Some(v.parse().with_context(|| format!("--store-limit {v}"))?);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument `{other}`\n{USAGE}"),
        }
    }
    if args.plain && args.cert_dir.is_some() {
        bail!("--plain and --cert-dir exclude each other\n{USAGE}");
    }
    Ok(args)
}

async fn run(args: Args) -> Result<()> {
    let mut opts = DemoOptions::plain()?;
    opts.listen = args.listen;
    if let Some(pw) = args.password {
        opts.password = pw;
    }
    if let Some(limit) = args.store_limit {
        opts.store_limit = limit;
    }
    let mut ca_path = None;
    if !args.plain {
        let pki = match &args.cert_dir {
            Some(dir) => {
                let pki = DemoPki::load_or_create(dir)?;
                ca_path = Some(dir.join(DemoPki::CA_FILE));
                pki
            }
            None => DemoPki::generate()?,
        };
        opts.tls = Some(pki);
    }
    let users: Vec<String> = opts
        .users
        .iter()
        .map(|u| format!("{}{}", u.email, if u.guest { " (guest)" } else { "" }))
        .collect();
    let password = opts.password.clone();
    let app = DemoApp::start_async(opts).await?;
    let ca_path = ca_path.or_else(|| app.ca_file());
    println!(
        "sluice-demo-app: serving {} on {}",
        app.base_url(),
        app.addr()
    );
    if let Some(ca) = &ca_path {
        println!("  CA certificate: {}", ca.display());
    }
    println!("  users: {} (password `{password}`)", users.join(", "));
    println!(
        "  try: curl {} {}/login",
        app.curl_args().join(" "),
        app.base_url()
    );
    println!("  log: {}/_log", app.base_url());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    println!("sluice-demo-app: stopping");
    drop(app);
    Ok(())
}

fn main() -> ExitCode {
    let result = parse_args().and_then(|args| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(run(args))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-demo-app: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
