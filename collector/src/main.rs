//! The `sluice-collector` command.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use sluice_collector::{Collector, config::Config, export, query, server::Server, store};
use tokio_util::sync::CancellationToken;

mod cli;

mod notify;

/// Prints a line; a closed stdout (`... | head`) is not an error worth a panic.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

const DEFAULT_CONFIG: &str = "/etc/sluice/collector.toml";

#[derive(Parser)]
#[command(
    name = "sluice-collector",
    version,
    about = "The Sluice collector: events, queries, bundles, portal"
)]
struct Cli {
    /// The collector's TOML configuration file.
    #[arg(long, short, global = true, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the state directory, the database, the TLS material, and the portal's `admin`
    /// account (its password is printed once).
    Init {
        /// The admin account's name.
        #[arg(long, default_value = "admin")]
        admin: String,
    },
    /// Serve the API and the portal.
    Run,
    /// How the collector is doing: whether it runs and answers on its loopback listener, the
    /// events stored, agents enrolled and last seen, the detection queue, open alerts,
    /// forwarding and connections. Exits non-zero when the running collector cannot be reached.
    Status {
        /// Print the figures as JSON.
        #[arg(long)]
        json: bool,
    },
    /// One-time enrollment tokens for agents.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Enrolled agents.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// API tokens for the query API.
    Apitoken {
        #[command(subcommand)]
        command: ApiTokenCommand,
    },
    /// Signed policy bundles.
    Bundle {
        #[command(subcommand)]
        command: BundleCommand,
    },
    /// The keys protected files' passwords are sealed to and kept under.
    ReleaseKeys {
        #[command(subcommand)]
        command: ReleaseKeysCommand,
    },
    /// Run a query against the local database and print the events (newest first).
    Query {
        /// The query (`user:alice@corp.example action:block since:24h`).
        query: String,
        /// Output format.
        #[arg(long, default_value = "jsonl", value_parser = ["jsonl", "csv"])]
        format: String,
        /// Most events to print (0: all).
        #[arg(long, default_value_t = 0)]
        limit: u64,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token and print it.
    Create {
        /// The agent group the enrolled agent joins (decides its bundle).
        #[arg(long, default_value = "default")]
        group: String,
        /// How long the token stays valid (`30m`, `24h`, `7d`).
        #[arg(long, default_value = "24h")]
        ttl: String,
    },
}

#[derive(Subcommand)]
enum AgentCommand {
    /// List enrolled agents.
    List,
    /// Revoke an agent: its calls are refused (403) from now on.
    Revoke {
        /// The agent id.
        id: String,
    },
}

#[derive(Subcommand)]
enum ApiTokenCommand {
    /// Create an API token and print it.
    Create {
        /// A name to recognise it by.
        #[arg(long, default_value = "api")]
        name: String,
    },
    /// List API tokens (names and dates; the tokens themselves are not kept).
    List,
    /// Revoke the API tokens named NAME.
    Revoke {
        /// The token's name.
        name: String,
    },
}

#[derive(Subcommand)]
enum ReleaseKeysCommand {
    /// Show the current key ids.
    Show,
    /// New sealing and vault keys: every kept password is re-encrypted under the new vault key
    /// and the old one is deleted; the previous sealing key is kept for boxes agents sealed
    /// before they fetched the new one. Safe while the collector runs.
    Rotate,
}

#[derive(Subcommand)]
enum BundleCommand {
    /// Verify a signed bundle (tar.gz) against the configured public key and publish it.
    Publish {
        /// The signed bundle.
        file: PathBuf,
        /// The agent group it is for.
        #[arg(long, default_value = "default")]
        group: String,
    },
    /// List published bundles.
    List,
}

fn open(cfg: &Path) -> Result<Collector> {
    let config = Config::load(cfg)?;
    Ok(Collector::open(config)?)
}

/// `sluice-collector --config FILE ARGS` as a user can paste it: the program as it was typed
/// when found on `PATH` (else its absolute path), the configuration as an absolute path.
fn this_command(config: &Path, args: &str) -> String {
    let word = |s: &str| {
        if !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@%".contains(&b))
        {
            s.to_owned()
        } else {
            format!("'{}'", s.replace('\'', r"'\''"))
        }
    };
    let typed = std::env::args()
        .next()
        .unwrap_or_else(|| "sluice-collector".into());
    let program = if typed.contains('/') {
        std::env::current_exe().map_or(typed, |p| p.to_string_lossy().into_owned())
    } else {
        typed
    };
    let config = std::fs::canonicalize(config).unwrap_or_else(|_| config.to_owned());
    format!(
        "{} --config {} {args}",
        word(&program),
        word(&config.to_string_lossy())
    )
}

fn random_password() -> Result<String> {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut b = [0u8; 20];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| anyhow::anyhow!("random generator failed"))?;
    Ok(b.iter()
        .map(|x| char::from(ALPHABET[usize::from(*x) % ALPHABET.len()]))
        .collect())
}

// SQLite, JSON parsing and the HTTP stack allocate many small buffers per event; mimalloc's
// thread-local free lists cost less than glibc malloc's (as in the agent).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-collector: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init { admin } => {
            let config = Config::load(&cli.config)?;
            std::fs::create_dir_all(&config.state_dir)
                .with_context(|| format!("creating {}", config.state_dir.display()))?;
            {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(
                    &config.state_dir,
                    std::fs::Permissions::from_mode(0o700),
                )?;
            }
            let ca = sluice_collector::tls::ensure_for(&config)?;
            let c = Collector::open(config)?;
            let password = random_password()?;
            sluice_collector::portal::set_admin_password(&c, &admin, &password)?;
            say!("state directory: {}", c.config.state_dir.display());
            say!(
                "CA certificate (give it to agents and browsers): {}",
                ca.display()
            );
            say!("portal account: {admin}");
            say!("password (shown once): {password}");
        }
        Command::Run => {
            let config = Config::load(&cli.config)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let state_dir = config.state_dir.clone();
                let c = Arc::new(Collector::open(config)?);
                // The identity provider's files are read now: a broken one stops the start
                // rather than the first sign-in.
                if let Some(oidc) = &c.oidc {
                    oidc.prepare().context("portal.oidc")?;
                }
                let server = Server::bind(c).await?;
                // Where the collector listens, for tools and tests when `listen` asks for any
                // port (replaced atomically).
                let addr = server.local_addr()?;
                let (file, tmp) = (
                    state_dir.join("listen.addr"),
                    state_dir.join("listen.addr.tmp"),
                );
                std::fs::write(&tmp, format!("{addr}\n"))
                    .and_then(|()| std::fs::rename(&tmp, &file))
                    .with_context(|| format!("writing {}", file.display()))?;
                // And where the portal listens, when it has an address of its own.
                if let Some(p) = server.portal_addr()? {
                    let (file, tmp) = (
                        state_dir.join("portal.addr"),
                        state_dir.join("portal.addr.tmp"),
                    );
                    std::fs::write(&tmp, format!("{p}\n"))
                        .and_then(|()| std::fs::rename(&tmp, &file))
                        .with_context(|| format!("writing {}", file.display()))?;
                }
                let shutdown = CancellationToken::new();
                let s2 = shutdown.clone();
                tokio::spawn(async move {
                    let mut term = match tokio::signal::unix::signal(
                        tokio::signal::unix::SignalKind::terminate(),
                    ) {
                        Ok(t) => t,
                        Err(e) => {
                            tracing::error!(error = %e, "SIGTERM handler");
                            return;
                        }
                    };
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                    tracing::info!("shutting down");
                    notify::notify("STOPPING=1");
                    s2.cancel();
                });
                // systemd (Type=notify, WatchdogSec=): serving from here on; alive while the
                // runtime turns.
                if let Some(every) = notify::watchdog_interval() {
                    tokio::spawn(notify::watchdog(every, shutdown.clone()));
                }
                notify::notify("READY=1");
                server.run(shutdown).await?;
                anyhow::Ok(())
            })?;
        }
        Command::Status { json } => cli::status::run(&cli.config, json)?,
        Command::Token {
            command: TokenCommand::Create { group, ttl },
        } => {
            let Some(ttl_ms) = query::duration_ms(&ttl) else {
                bail!("--ttl {ttl:?}: expected a duration such as 30m, 24h or 7d");
            };
            let c = open(&cli.config)?;
            say!("{}", c.store.create_enroll_token(&group, ttl_ms)?);
        }
        Command::Agent {
            command: AgentCommand::List,
        } => {
            let c = open(&cli.config)?;
            say!(
                "{:<28} {:<24} {:<12} {:<10} {:<24} state",
                "id",
                "hostname",
                "group",
                "version",
                "last seen"
            );
            for a in c.store.agents()? {
                say!(
                    "{:<28} {:<24} {:<12} {:<10} {:<24} {}",
                    a.id,
                    a.hostname,
                    a.group,
                    a.agent_version,
                    a.last_seen.map(export::rfc3339_ms).unwrap_or("-".into()),
                    if a.revoked_at.is_some() {
                        "revoked"
                    } else {
                        "active"
                    }
                );
            }
        }
        Command::Agent {
            command: AgentCommand::Revoke { id },
        } => {
            let c = open(&cli.config)?;
            if !c.store.revoke_agent(&id)? {
                bail!(
                    "no agent {id:?} (see `{}`)",
                    this_command(&cli.config, "agent list")
                );
            }
            say!("revoked {id}");
        }
        Command::ReleaseKeys { command } => {
            let c = open(&cli.config)?;
            let dir = c.config.state_dir.clone();
            let keys = match command {
                ReleaseKeysCommand::Show => sluice_collector::release::Keys::load_or_create(&dir)?,
                ReleaseKeysCommand::Rotate => {
                    let (keys, n) = sluice_collector::release::rotate(&c.store, &dir)?;
                    say!("re-encrypted {n} kept password(s)");
                    keys
                }
            };
            say!(
                "sealing key {} (agents fetch it from /api/v1/release-key)",
                keys.sealing_key().map(|k| k.id_hex()).unwrap_or_default()
            );
            say!("vault key {}", keys.vault_ids().join(", "));
            say!("kept in {} (mode 0600)", keys.path().display());
        }
        Command::Apitoken {
            command: ApiTokenCommand::Create { name },
        } => {
            let c = open(&cli.config)?;
            say!("{}", c.store.create_api_token(&name)?);
        }
        Command::Apitoken {
            command: ApiTokenCommand::List,
        } => {
            let c = open(&cli.config)?;
            for (name, created, revoked) in c.store.api_tokens()? {
                say!(
                    "{name}\tcreated {created}\t{}",
                    revoked.map_or("active".to_owned(), |r| format!("revoked {r}"))
                );
            }
        }
        Command::Apitoken {
            command: ApiTokenCommand::Revoke { name },
        } => {
            let c = open(&cli.config)?;
            match c.store.revoke_api_token(&name)? {
                0 => bail!(
                    "no active API token named {name:?} (see `{}`)",
                    this_command(&cli.config, "apitoken list")
                ),
                n => say!("revoked {n} API token(s) named {name}"),
            }
        }
        Command::Bundle {
            command: BundleCommand::Publish { file, group },
        } => {
            let c = open(&cli.config)?;
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let p = c.publish_bundle(&group, bytes)?;
            say!(
                "published revision {} for group {} (etag {}, {} bytes)",
                p.revision,
                p.group,
                p.etag,
                p.bytes
            );
        }
        Command::Bundle {
            command: BundleCommand::List,
        } => {
            let c = open(&cli.config)?;
            for b in c.store.bundles()? {
                say!(
                    "{:<6} {:<16} {:<24} {} {:>9} B  {}",
                    b.published.id,
                    b.published.group,
                    b.published.revision,
                    b.published.etag,
                    b.published.bytes,
                    export::rfc3339_ms(b.published_at)
                );
            }
        }
        Command::Query {
            query: text,
            format,
            limit,
        } => {
            let q = query::parse(&text)?.compile();
            let c = open(&cli.config)?;
            let csv = format == "csv";
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            use std::io::Write as _;
            if csv {
                out.write_all(export::csv_header().as_bytes())?;
            }
            let mut n = 0u64;
            let mut io_err = None;
            c.store
                .for_each_page(&q, 1000, |page: &[store::EventRow]| {
                    let mut s = String::new();
                    for r in page {
                        if limit > 0 && n >= limit {
                            break;
                        }
                        if csv {
                            export::csv_row(&mut s, r);
                        } else {
                            export::jsonl_row(&mut s, r);
                        }
                        n += 1;
                    }
                    if let Err(e) = out.write_all(s.as_bytes()) {
                        io_err = Some(e);
                        return false;
                    }
                    limit == 0 || n < limit
                })?;
            match io_err {
                Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                Some(e) => return Err(e.into()),
                None => {
                    let _ = out.flush();
                }
            }
        }
    }
    Ok(())
}
