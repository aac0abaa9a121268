//! The `sluice` command.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
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
    /// Print the running agent's status (from its admin endpoint).
    Status {
        /// The admin endpoint.
        #[arg(long, default_value = "127.0.0.1:15090")]
        admin: std::net::SocketAddr,
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
