//! `sluice-demo-idp`: the test identity provider (`sluice_e2e::idp`) as a process, for
//! `cargo xtask demo` and manual trials of the portal's organisation sign-in. Runs until Ctrl-C
//! (or SIGTERM).
//!
//! ```text
//! sluice-demo-idp [--dir DIR] [--listen ADDR] [--users FILE]
//!                 [--client ID --client-secret-file FILE]
//! ```
//! Its CA is kept in DIR (`idp-ca.pem`, made on the first start and reused), so the collector's
//! `[portal.oidc] ca_file` and a browser can trust it once. Without `--users` the demo's people
//! sign in (password `demo`; dana is in `sluice-admins`). `--users` takes a JSON array of
//! `{"email", "password", "name", "groups"}`. With `--client`, that client id must authenticate
//! at the token endpoint with the secret in the file (a confidential client); other client ids
//! are public clients (PKCE only). It prints the issuer and a `[portal.oidc]` section to paste.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result, bail};
use sluice_e2e::idp::{ADMIN_GROUP, DEMO_PASSWORD, Idp, IdpUser};

const USAGE: &str = "usage: sluice-demo-idp [--dir DIR] [--listen ADDR] [--users FILE] \
                     [--client ID --client-secret-file FILE]";

#[derive(Debug)]
struct Args {
    dir: PathBuf,
    listen: SocketAddr,
    users: Option<PathBuf>,
    client: Option<String>,
    secret_file: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        dir: std::env::temp_dir().join("sluice-demo-idp"),
        listen: SocketAddr::from(([127, 0, 0, 1], 9443)),
        users: None,
        client: None,
        secret_file: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--dir" => args.dir = PathBuf::from(value("--dir")?),
            "--listen" => {
                let v = value("--listen")?;
                args.listen = v.parse().with_context(|| format!("--listen {v}"))?;
            }
            "--users" => args.users = Some(PathBuf::from(value("--users")?)),
            "--client" => args.client = Some(value("--client")?),
            "--client-secret-file" => {
                args.secret_file = Some(PathBuf::from(value("--client-secret-file")?));
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument `{other}`\n{USAGE}"),
        }
    }
    if args.client.is_some() != args.secret_file.is_some() {
        bail!("--client and --client-secret-file go together\n{USAGE}");
    }
    Ok(args)
}

fn run(args: Args) -> Result<()> {
    let (users, demo) = match &args.users {
        Some(f) => (IdpUser::from_json_file(f)?, false),
        None => (IdpUser::demo_users(), true),
    };
    let listing: Vec<String> = users
        .iter()
        .map(|u| format!("{} [{}]", u.email, u.groups.join(", ")))
        .collect();
    let idp = Idp::start_on(&args.dir, args.listen, users)?;
    let mut client_id = "sluice-portal".to_owned();
    let mut secret_line = String::new();
    if let (Some(id), Some(file)) = (&args.client, &args.secret_file) {
        let secret =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let secret = secret.trim();
        if secret.is_empty() {
            bail!("{} holds no secret", file.display());
        }
        idp.add_client(id, secret);
        client_id.clone_from(id);
        secret_line = format!("client_secret_file = \"{}\"\n", file.display());
    }
    println!("sluice-demo-idp: issuer {}", idp.issuer());
    println!("  CA certificate: {}", idp.ca_file().display());
    println!(
        "  users: {}{}",
        listing.join("; "),
        if demo {
            format!(" (password `{DEMO_PASSWORD}`)")
        } else {
            String::new()
        }
    );
    println!(
        "  for the collector's configuration (redirect_url: the collector's address):\n\n\
         [portal.oidc]\n\
         issuer = \"{}\"\n\
         client_id = \"{client_id}\"\n\
         {secret_line}\
         redirect_url = \"https://127.0.0.1:8443/auth/oidc/callback\"\n\
         ca_file = \"{}\"\n\
         admins = [\"group:{ADMIN_GROUP}\"]\n",
        idp.issuer(),
        idp.ca_file().display()
    );
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                r = tokio::signal::ctrl_c() => r?,
                _ = term.recv() => {}
            }
            anyhow::Ok(())
        })?;
    println!("sluice-demo-idp: stopping");
    drop(idp);
    Ok(())
}

fn main() -> ExitCode {
    match parse_args().and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-demo-idp: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
