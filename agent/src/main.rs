//! The `sluice` command.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

// The proxy allocates and frees many small buffers per request (heads, TLS records, body frames);
// mimalloc's thread-local free lists measured fewer CPU cycles per request than glibc malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use sluice::config::Config;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Sluice: access and session control for the apps your people use"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: attach steering, start the proxy and the admin endpoints.
    Run {
        /// The agent's TOML configuration file.
        #[arg(long, short, default_value = "/etc/sluice/agent.toml")]
        config: PathBuf,
    },
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// The interception CA.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Print the running agent's status (from its admin endpoint).
    Status {
        /// The admin endpoint.
        #[arg(long, default_value = "127.0.0.1:15090")]
        admin: std::net::SocketAddr,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create the CA (ECDSA P-256) where the config says (default `<state_dir>/ca`); the key is
    /// written with mode 0600. Refuses to overwrite an existing CA.
    Init {
        /// The agent's configuration file.
        #[arg(long, short, default_value = "/etc/sluice/agent.toml")]
        config: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "Sluice Interception CA")]
        name: String,
    },
    /// Print the CA certificate (PEM) for trust stores.
    Export {
        /// The agent's configuration file.
        #[arg(long, short, default_value = "/etc/sluice/agent.toml")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Parse and validate a configuration file, then print it with defaults filled in.
    Check {
        /// The file.
        #[arg(long, short, default_value = "/etc/sluice/agent.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config } => {
            let cfg = Config::load(&config)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(sluice::app::run(config, cfg))
        }
        Command::Config {
            command: ConfigCommand::Check { config },
        } => {
            let cfg = Config::load(&config)?;
            println!("{cfg:#?}");
            println!("{}: ok", config.display());
            Ok(())
        }
        Command::Ca {
            command: CaCommand::Init { config, name },
        } => {
            let cfg = Config::load(&config)?;
            let cert = cfg.ca_cert_path();
            let dir = cert
                .parent()
                .ok_or_else(|| anyhow::anyhow!("bad CA path {}", cert.display()))?;
            if cert.file_name().and_then(|n| n.to_str()) != Some(sluice::proxy::ca::CA_CERT_FILE)
                || cfg.ca_key_path() != dir.join(sluice::proxy::ca::CA_KEY_FILE)
            {
                anyhow::bail!(
                    "`ca init` writes {dir}/ca.crt and {dir}/ca.key; set tls.ca_cert/tls.ca_key to those names or leave them unset",
                    dir = dir.display()
                );
            }
            let path = sluice::proxy::ca::init(dir, &name)?;
            println!(
                "created {} (key {} is 0600 and never leaves this host)",
                path.display(),
                cfg.ca_key_path().display()
            );
            Ok(())
        }
        Command::Ca {
            command: CaCommand::Export { config },
        } => {
            let cfg = Config::load(&config)?;
            let ca = sluice::proxy::ca::Ca::load(&cfg.ca_cert_path(), &cfg.ca_key_path())?;
            print!("{}", ca.cert_pem());
            Ok(())
        }
        Command::Status { admin } => {
            use std::io::{Read as _, Write as _};
            let mut s =
                std::net::TcpStream::connect_timeout(&admin, std::time::Duration::from_secs(3))?;
            s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
            write!(
                s,
                "GET /status HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
            )?;
            let mut resp = String::new();
            s.read_to_string(&mut resp)?;
            let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or(&resp);
            println!("{body}");
            Ok(())
        }
    }
}
