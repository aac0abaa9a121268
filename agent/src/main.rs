//! The `sluice` command.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

mod cli;

/// Prints a line; a closed stdout (`sluice ... | head`) is not an error worth a panic.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

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
    /// Run the agent (as root): attach steering, hold the CA key, and start the unprivileged
    /// proxy as `privsep.user` (restarting it when it ends).
    Run {
        /// The agent's TOML configuration file.
        #[arg(long, short, default_value = "/etc/sluice/agent.toml")]
        config: PathBuf,
    },
    /// Run the unprivileged proxy (as `privsep.user`, never root): it takes its sockets from
    /// `sluice run` over the privileged socket, enters its sandbox and serves. `sluice run`
    /// starts it itself unless `privsep.spawn = false` (a service manager runs it).
    Proxy {
        /// The agent's TOML configuration file.
        #[arg(long, short, default_value = "/etc/sluice/agent.toml")]
        config: PathBuf,
    },
    /// Enroll with a collector: present a one-time token, keep the credential (0600) and the
    /// agent id under `<state_dir>/report/`.
    Enroll {
        /// The agent's TOML configuration file (for `state_dir`).
        #[arg(long, short, default_value = "/etc/sluice/agent.toml")]
        config: PathBuf,
        /// The collector, `https://host:port` (default: `report.collector` from the config).
        #[arg(long)]
        collector: Option<String>,
        /// A file holding the one-time enrollment token (`sluice-collector token create`), or
        /// `-` to read it from standard input. Never on the command line, where every local user
        /// can read it.
        #[arg(long, value_name = "FILE|-")]
        token_file: PathBuf,
        /// The collector's CA certificate (PEM) (default: `report.collector_ca`, else the web
        /// and system roots).
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Replace an existing enrollment.
        #[arg(long)]
        force: bool,
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
    /// Create a bundle signing key pair (ES256): DIR/bundle-signing.key (0600) and .pub.
    Keygen {
        /// Where to write the keys.
        #[arg(long, short)]
        out: PathBuf,
    },
    /// The app catalogue of a bundle (its catalog.yaml and catalogue packs): what it
    /// recognises, and which activity the requests of a recorded browser session would be.
    Catalog {
        #[command(subcommand)]
        command: CatalogCommand,
    },
    /// Policy bundles: build, sign, verify, inspect.
    Bundle {
        #[command(subcommand)]
        command: BundleCommand,
    },
    /// Policies: run a bundle's tests, explain a decision.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Show what Sluice sees in a file (type, size, SHA-256, labels, DLP hits, or why it is not
    /// inspectable) as JSON; with --apply-label, write a label into it as a download would.
    Inspect {
        /// The file.
        file: PathBuf,
        /// Apply this label (an id, display name or GUID from the bundle's labels.yaml).
        #[arg(long, value_name = "NAME")]
        apply_label: Option<String>,
        /// Where to write the labeled file (required with --apply-label).
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// Replace an existing label of the same tenant.
        #[arg(long)]
        replace: bool,
        /// Permissions to write with the label (comma-separated, e.g. `view`).
        #[arg(long, value_delimiter = ',')]
        permissions: Vec<String>,
        /// The bundle (directory or archive) whose labels and DLP dictionaries apply. Default:
        /// $SLUICE_BUNDLE, else ./policies/default.
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Largest file inspected, in bytes.
        #[arg(long, default_value_t = 50 * 1024 * 1024)]
        max_bytes: u64,
    },
    /// Show the running agent's status for people: mode, attachment, fail mode, counters,
    /// bundle, collector and spool, posture and risk, last errors (from its loopback admin
    /// endpoint). Exits non-zero when the agent cannot be reached.
    Status {
        /// The agent's configuration file: the admin address is read from
        /// `<state_dir>/admin.addr` (written by the running agent), else `admin.listen`. Default:
        /// /etc/sluice/agent.toml when it exists, else 127.0.0.1:15090.
        #[arg(long, short, conflicts_with = "admin")]
        config: Option<PathBuf>,
        /// The admin endpoint's address, instead of reading it from a configuration.
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
        /// Print the agent's `/status` JSON document as it is.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a bundle (directory or archive) and run the tests it ships (tests/*.yaml).
    Test {
        /// Bundle source directory or .tar.gz.
        bundle: PathBuf,
    },
    /// For one input (a YAML file of facts), show which filters of which policy held.
    Explain {
        /// Bundle source directory or .tar.gz.
        bundle: PathBuf,
        /// `access` or `session`.
        #[arg(long)]
        kind: String,
        /// The input facts (YAML: app, user, device, source, client, process, activity, file).
        #[arg(long)]
        input: PathBuf,
    },
}

#[derive(Subcommand)]
enum CatalogCommand {
    /// Every app: id, name, hosts, do-not-inspect hosts, activities defined, where it is from.
    List {
        /// The bundle: a source directory (with the packs its .manifest selects) or an archive.
        #[arg(long, default_value = "policies/default")]
        bundle: PathBuf,
    },
    /// One app in full.
    Show {
        /// The app's id.
        app: String,
        /// The bundle: a source directory (with the packs its .manifest selects) or an archive.
        #[arg(long, default_value = "policies/default")]
        bundle: PathBuf,
    },
    /// Which activity each request of a recorded browser session (a HAR file) would be, for
    /// the requests to the app's hosts.
    Test {
        /// The app's id.
        app: String,
        /// The HAR file (as browsers' developer tools save it).
        har: PathBuf,
        /// The bundle: a source directory (with the packs its .manifest selects) or an archive.
        #[arg(long, default_value = "policies/default")]
        bundle: PathBuf,
    },
}

#[derive(Subcommand)]
enum BundleCommand {
    /// Pack a directory into a bundle (unsigned).
    Build {
        /// The bundle's source directory.
        dir: PathBuf,
        /// The archive to write.
        #[arg(long, short)]
        out: PathBuf,
        /// The revision, a whole number (overrides the directory's .manifest).
        #[arg(long)]
        revision: Option<String>,
        /// How long the bundle stays fresh: `30d`, `12h`, `90m` or seconds (default 30 days,
        /// unless the directory's .manifest has `expires_at`).
        #[arg(long)]
        expires_in: Option<String>,
        /// A public key (PEM) agents trust from this bundle on (key rotation; repeatable).
        #[arg(long)]
        trust_key: Vec<PathBuf>,
        /// A key id agents never trust again (repeatable).
        #[arg(long)]
        retire_key: Vec<String>,
    },
    /// Sign a bundle: the signature covers the SHA-256 of every file and names the key by its id.
    Sign {
        /// The bundle.
        bundle: PathBuf,
        /// The private key (PEM).
        #[arg(long)]
        key: PathBuf,
        /// Where to write the signed bundle (default: in place).
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Verify a bundle's signature, file list, revision and expiry.
    Verify {
        /// The bundle.
        bundle: PathBuf,
        /// A trusted public key (PEM); repeat for several (the signature names which).
        #[arg(long = "pub", required = true)]
        public: Vec<PathBuf>,
    },
    /// Print the id of a key (private or public PEM), as signatures name it.
    KeyId {
        /// The key file.
        key: PathBuf,
    },
    /// Show a bundle's manifest and files (verified when --pub is given).
    Inspect {
        /// The bundle.
        bundle: PathBuf,
        /// The public key (PEM).
        #[arg(long = "pub")]
        public: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create the CA (ECDSA P-256) where the config says (default `<state_dir>/ca`); the key is
    /// written with mode 0600. Refuses to overwrite an existing CA. With --org, an organisation
    /// CA whose name constraints permit only the catalogue's domains and addresses.
    Init {
        /// The agent's configuration file.
        #[arg(long, short, default_value = "/etc/sluice/agent.toml")]
        config: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "Sluice Interception CA")]
        name: String,
        /// Days the CA is valid (default: `tls.ca_days`, 825 unless configured; at most 3650).
        #[arg(long)]
        days: Option<u32>,
        /// Make an organisation CA: this organisation name (O=), and name constraints permitting
        /// only the catalogued hosts (the config's `[[apps]]`, --bundle's catalogue, --permit):
        /// `*.example.com` and `example.com` permit example.com and every name under it, IP
        /// addresses and CIDR blocks permit those addresses; no other leaf is valid.
        #[arg(long, value_name = "NAME")]
        org: Option<String>,
        /// A policy bundle (directory or .tar.gz) whose app catalogue the constraints permit.
        #[arg(long, value_name = "DIR", requires = "org")]
        bundle: Vec<PathBuf>,
        /// A further domain, address or CIDR block to permit (repeatable), e.g. a domain the
        /// catalogue will grow into.
        #[arg(long, value_name = "HOST", requires = "org")]
        permit: Vec<String>,
    },
    /// Put the CA certificate in this host's trust stores, or take it out with --remove: the
    /// system store (update-ca-certificates or update-ca-trust) and the NSS databases browsers
    /// use (~/.pki/nssdb and Firefox profiles of /root and every /home/*, with certutil run as
    /// their owner). Prints one line per store; exits non-zero when a store could not be changed.
    Trust {
        /// The agent's configuration file (for the CA certificate's path).
        #[arg(long, short, default_value = "/etc/sluice/agent.toml")]
        config: PathBuf,
        /// Take the CA out of the stores instead.
        #[arg(long)]
        remove: bool,
        /// Work on the stores under this directory instead of `/` (tests, images); also
        /// `$SLUICE_TRUST_ROOT`. Under another root no update-ca-certificates hooks run.
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
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
    sluice::memory::no_huge_pages();
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

/// Draws once from the random generator so that its entropy source is set up at start: aws-lc
/// seeds its generator from CPU jitter the first time it is used in a process, some 25 ms of
/// CPU that would otherwise fall on the first TLS handshake a client waits for.
fn seed_random() -> anyhow::Result<()> {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| anyhow::anyhow!("the random generator failed"))
}

/// The proxy's runtime. A process allowed one CPU only (its affinity, or its cgroup's CPU
/// quota) gets the single-threaded scheduler: with one worker, a work-stealing scheduler only adds
/// its cross-thread bookkeeping to every task switch.
fn proxy_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    // Unknown (the count cannot be read): the work-stealing scheduler, Tokio's own default.
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let (mut b, scheduler) = if cpus == 1 {
        (
            tokio::runtime::Builder::new_current_thread(),
            "single-threaded",
        )
    } else {
        (
            tokio::runtime::Builder::new_multi_thread(),
            "multi-threaded",
        )
    };
    tracing::info!(cpus, scheduler, "proxy runtime");
    b.enable_all().build()
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config } => {
            let cfg = Config::load(&config)?;
            seed_random()?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(sluice::app::run(config, cfg))
        }
        Command::Proxy { config } => {
            // Started through a descriptor (`/proc/self/fd/N`), the process would otherwise be
            // named after the descriptor's number in `ps`, `top` and `pgrep`.
            let _ = nix::sys::prctl::set_name(c"sluice-proxy");
            let cfg = Config::load(&config)?;
            if nix::unistd::geteuid().is_root() {
                anyhow::bail!(
                    "`sluice proxy` never runs as root: `sluice run` starts it as privsep.user (`{}`)",
                    cfg.privsep.user
                );
            }
            let (link, welcome, sockets) =
                sluice::privsep::client::Link::connect(&cfg.privsep_socket())?;
            let mut writable = vec![cfg.state_dir.clone()];
            writable.extend(cfg.report.events_file.clone());
            seed_random()?;
            let sandbox = sluice::privsep::sandbox::enter(&writable).map_err(anyhow::Error::msg)?;
            tracing::info!(
                uid = nix::unistd::getuid().as_raw(),
                landlock = %sandbox.landlock,
                syscalls = sandbox.syscalls,
                "proxy sandbox entered"
            );
            let rt = proxy_runtime()?;
            rt.block_on(sluice::app::run_proxy(
                config, cfg, link, welcome, sockets, sandbox,
            ))
        }
        Command::Enroll {
            config,
            collector,
            token_file,
            ca,
            force,
        } => {
            let token = read_token(&token_file)?;
            let cfg = Config::load(&config)?;
            let Some(collector) = collector.or_else(|| cfg.report.collector.clone()) else {
                anyhow::bail!("give --collector https://host:port (or set report.collector)");
            };
            let ca = ca.or_else(|| cfg.report.collector_ca.clone());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let e = rt.block_on(sluice::report::enroll::enroll(
                &cfg.state_dir,
                &collector,
                &token,
                ca.as_deref(),
                force,
            ))?;
            say!(
                "enrolled as {} (group {}) with {}; credential in {} (0600)",
                e.agent_id,
                if e.group.is_empty() { "-" } else { &e.group },
                e.collector,
                sluice::report::enroll::credential_path(&cfg.state_dir).display()
            );
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Check { config },
        } => {
            let cfg = Config::load(&config)?;
            say!("{cfg:#?}");
            say!("{}: ok", config.display());
            Ok(())
        }
        Command::Ca {
            command:
                CaCommand::Init {
                    config,
                    name,
                    days,
                    org,
                    bundle,
                    permit,
                },
        } => ca_init(CaInitArgs {
            config,
            name,
            days,
            org,
            bundle,
            permit,
        }),
        Command::Ca {
            command:
                CaCommand::Trust {
                    config,
                    remove,
                    root,
                },
        } => ca_trust(&config, remove, root),
        Command::Ca {
            command: CaCommand::Export { config },
        } => {
            let cfg = Config::load(&config)?;
            let ca = sluice::proxy::ca::Ca::load(&cfg.ca_cert_path(), &cfg.ca_key_path())?;
            {
                use std::io::Write as _;
                let _ = write!(std::io::stdout(), "{}", ca.cert_pem());
            }
            Ok(())
        }
        Command::Keygen { out } => {
            let (key, public) = sluice_policy::bundle::keygen(&out)?;
            let kid = sluice_policy::bundle::jws::VerifyingKey::from_pem(
                &std::fs::read_to_string(&public)?,
            )?
            .key_id();
            say!(
                "private key {} (0600, keep it with the central team)\npublic key  {} (give it to agents)\nkey id      {kid}",
                key.display(),
                public.display()
            );
            Ok(())
        }
        Command::Bundle { command } => bundle_command(command),
        Command::Catalog { command } => catalog_command(command),
        Command::Policy { command } => policy_command(command),
        Command::Inspect {
            file,
            apply_label,
            out,
            replace,
            permissions,
            bundle,
            max_bytes,
        } => inspect_command(InspectArgs {
            file,
            apply_label,
            out,
            replace,
            permissions,
            bundle,
            max_bytes,
        }),
        Command::Status {
            config,
            admin,
            json,
        } => status(config, admin, json),
    }
}

/// The enrollment token from `path` (`-`: standard input): its first line, at most 4 KiB read.
fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut buf = Vec::new();
    if path.as_os_str() == "-" {
        std::io::stdin().take(4096).read_to_end(&mut buf)?;
    } else {
        std::fs::File::open(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            .take(4096)
            .read_to_end(&mut buf)?;
    }
    let text = String::from_utf8(buf).map_err(|_| anyhow::anyhow!("the token is not text"))?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    anyhow::ensure!(
        !token.is_empty(),
        "no enrollment token in {}",
        if path.as_os_str() == "-" {
            "standard input".to_owned()
        } else {
            path.display().to_string()
        }
    );
    Ok(token)
}

/// `30d`, `12h`, `90m`, `45s` or plain seconds.
fn parse_duration_s(text: &str) -> anyhow::Result<u64> {
    let t = text.trim();
    let (num, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c),
        _ => (t, 's'),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("`{text}`: expected a number with d, h, m or s"))?;
    let mult = match unit {
        'd' => 86_400,
        'h' => 3600,
        'm' => 60,
        's' => 1,
        _ => anyhow::bail!("`{text}`: the unit is d, h, m or s"),
    };
    n.checked_mul(mult)
        .filter(|s| *s > 0)
        .ok_or_else(|| anyhow::anyhow!("`{text}`: out of range"))
}

fn read(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn bundle_command(command: BundleCommand) -> anyhow::Result<()> {
    use sluice_policy::bundle::{Archive, KeyRing, Limits, Rotation, build_with, jws};
    let verifying = |p: &std::path::Path| -> anyhow::Result<jws::VerifyingKey> {
        Ok(jws::VerifyingKey::from_pem(&String::from_utf8_lossy(
            &read(p)?,
        ))?)
    };
    match command {
        BundleCommand::Build {
            dir,
            out,
            revision,
            expires_in,
            trust_key,
            retire_key,
        } => {
            let expires_at = expires_in
                .as_deref()
                .map(parse_duration_s)
                .transpose()?
                .map(|s| sluice_policy::bundle::now_s() + s);
            let mut archive = build_with(&dir, revision.as_deref(), expires_at)?;
            if !trust_key.is_empty() || !retire_key.is_empty() {
                let mut rot: Rotation = match archive.files.get(sluice_policy::bundle::KEYS) {
                    Some(b) => serde_json::from_slice(b)?,
                    None => Rotation::default(),
                };
                for p in &trust_key {
                    rot.trust.push(verifying(p)?.to_pem());
                }
                rot.retire.extend(retire_key);
                archive.files.insert(
                    sluice_policy::bundle::KEYS.into(),
                    serde_json::to_vec_pretty(&rot)?,
                );
            }
            std::fs::write(&out, archive.write()?)?;
            say!(
                "wrote {} ({} files, unsigned)",
                out.display(),
                archive.files.len()
            );
        }
        BundleCommand::Sign { bundle, key, out } => {
            let mut archive = Archive::read(&read(&bundle)?, &Limits::default())?;
            let key = jws::SigningKey::from_pem(&String::from_utf8_lossy(&read(&key)?))?;
            archive.sign(&key)?;
            let out = out.unwrap_or(bundle);
            std::fs::write(&out, archive.write()?)?;
            say!(
                "signed {} ({} files) with key {}",
                out.display(),
                archive.files.len() - 1,
                key.key_id()?
            );
        }
        BundleCommand::Verify { bundle, public } => {
            let mut ring = KeyRing::default();
            for p in &public {
                ring.insert(verifying(p)?);
            }
            let v = Archive::read(&read(&bundle)?, &Limits::default())?
                .verify_with(&ring)?
                .fresh(sluice_policy::bundle::now_s())?;
            say!(
                "ok: revision {}, {} files, key {}, fresh until {}",
                v.manifest.revision,
                v.files.len(),
                v.key_id.as_deref().unwrap_or("-"),
                v.manifest.expires_at.unwrap_or(0)
            );
        }
        BundleCommand::KeyId { key } => {
            let text = String::from_utf8_lossy(&read(&key)?).into_owned();
            let kid = match jws::SigningKey::from_pem(&text) {
                Ok(k) => k.key_id()?,
                Err(_) => jws::VerifyingKey::from_pem(&text)?.key_id(),
            };
            say!("{kid}");
        }
        BundleCommand::Inspect { bundle, public } => {
            let archive = Archive::read(&read(&bundle)?, &Limits::default())?;
            let files: Vec<serde_json::Value> = archive
                .files
                .iter()
                .map(|(n, d)| serde_json::json!({ "name": n, "bytes": d.len() }))
                .collect();
            let verified = match public {
                Some(p) => Some(archive.clone().verify(&verifying(&p)?).map(|v| v.manifest)),
                None => None,
            };
            let doc = serde_json::json!({
                "files": files,
                "signed": archive.files.contains_key(sluice_policy::bundle::SIGNATURES),
                "verified": verified.as_ref().map(|r| r.is_ok()),
                "manifest": match &verified {
                    Some(Ok(m)) => serde_json::to_value(m)?,
                    Some(Err(e)) => serde_json::json!({ "error": e.to_string() }),
                    None => serde_json::json!("not verified: give --pub to read it"),
                },
            });
            say!("{}", serde_json::to_string_pretty(&doc)?);
        }
    }
    Ok(())
}

/// Loads and compiles a bundle from a directory or an archive (archives are not verified here:
/// `sluice bundle verify` does that).
fn load_policies(path: &std::path::Path) -> anyhow::Result<sluice_policy::PolicySet> {
    use sluice_policy::bundle::{Archive, Limits, MANIFEST};
    let archive = if path.is_dir() && path.join(MANIFEST).is_file() {
        // As `bundle build` packs it: with the catalogue packs its manifest selects.
        sluice_policy::bundle::build(path, None)?
    } else if path.is_dir() {
        Archive::from_dir(path)?
    } else {
        Archive::read(&read(path)?, &Limits::default())?
    };
    Ok(compile_files(archive.files)?)
}

/// Compiles a bundle's files (its signatures aside) under its manifest's revision.
fn compile_files(
    mut files: std::collections::BTreeMap<String, Vec<u8>>,
) -> Result<sluice_policy::PolicySet, sluice_policy::PolicyError> {
    use sluice_policy::bundle::{MANIFEST, Manifest};
    let revision = files
        .get(MANIFEST)
        .and_then(|m| serde_json::from_slice::<Manifest>(m).ok())
        .map(|m| m.revision)
        .unwrap_or_else(|| "unversioned".into());
    files.remove(sluice_policy::bundle::SIGNATURES);
    sluice_policy::PolicySet::compile(&revision, &files)
}

/// A bundle for `sluice catalog`: the bundle as it is, and, for a source directory, with the
/// catalogue packs beside it that its manifest does not select (so that what a pack recognises
/// can be seen before a bundle takes it). The ids of the apps only those packs add.
fn load_catalog(
    path: &std::path::Path,
) -> anyhow::Result<(sluice_policy::PolicySet, std::collections::BTreeSet<String>)> {
    use sluice_policy::bundle::MANIFEST;
    let own = load_policies(path)?;
    let packs = path.join("../catalog");
    if !path.join(MANIFEST).is_file() || !packs.is_dir() {
        return Ok((own, Default::default()));
    }
    let mut files = sluice_policy::bundle::build(path, None)?.files;
    let mut added = false;
    for e in std::fs::read_dir(&packs)? {
        let p = e?.path();
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !name.ends_with(".yaml") {
            continue;
        }
        let key = format!("catalog/{name}");
        if let std::collections::btree_map::Entry::Vacant(e) = files.entry(key) {
            e.insert(read(&p)?);
            added = true;
        }
    }
    if !added {
        return Ok((own, Default::default()));
    }
    // A pack whose ids clash with the bundle's own apps is left out: the bundle as it is.
    match compile_files(files) {
        Ok(all) => {
            let extra = all
                .apps
                .keys()
                .filter(|id| !own.apps.contains_key(*id))
                .cloned()
                .collect();
            Ok((all, extra))
        }
        Err(_) => Ok((own, Default::default())),
    }
}

fn catalog_command(command: CatalogCommand) -> anyhow::Result<()> {
    let app_of =
        |set: &sluice_policy::PolicySet, id: &str| -> anyhow::Result<sluice_policy::model::App> {
            set.apps.get(id).map(|a| a.app.clone()).ok_or_else(|| {
                let mut ids: Vec<&String> = set.apps.keys().collect();
                ids.sort();
                anyhow::anyhow!(
                    "no app `{id}` in the catalogue; it has: {}",
                    ids.iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
        };
    match command {
        CatalogCommand::List { bundle } => {
            let (set, available) = load_catalog(&bundle)?;
            let mut apps: Vec<&sluice_policy::model::App> =
                set.apps.values().map(|a| &a.app).collect();
            apps.sort_by(|a, b| a.id.cmp(&b.id));
            for a in apps {
                say!(
                    "{:<16} {:<28} {:>2} activities  hosts: {}{}{}",
                    a.id,
                    a.name.as_deref().unwrap_or(""),
                    a.activities.len(),
                    a.hosts.join(" "),
                    if a.do_not_inspect.is_empty() {
                        String::new()
                    } else {
                        format!("  do-not-inspect: {}", a.do_not_inspect.join(" "))
                    },
                    if available.contains(&a.id) {
                        "  (a pack beside the bundle, not selected by its manifest)"
                    } else {
                        ""
                    }
                );
            }
        }
        CatalogCommand::Show { app, bundle } => {
            let (set, available) = load_catalog(&bundle)?;
            let a = app_of(&set, &app)?;
            say!("{} ({})", a.id, a.name.as_deref().unwrap_or("-"));
            if available.contains(&a.id) {
                say!(
                    "not in this bundle: a pack beside it (add \"{}\" to `catalog` in the \
                     bundle's .manifest)",
                    a.id
                );
            }
            say!("hosts:          {}", a.hosts.join(" "));
            say!("do not inspect: {}", a.do_not_inspect.join(" "));
            for r in &a.references {
                say!("reference:      {r}");
            }
            say!("activities (the first that matches):");
            for d in &a.activities {
                let mut cond = Vec::new();
                for (k, v) in &d.query {
                    cond.push(format!("?{k}={v}"));
                }
                for (k, v) in &d.form {
                    cond.push(format!("form {k}={v}"));
                }
                if let Some(st) = d.session {
                    cond.push(session_step(st));
                }
                say!(
                    "  {:<9} {:<7} {}{}",
                    activity_name(d.activity),
                    d.method,
                    d.path,
                    if cond.is_empty() {
                        String::new()
                    } else {
                        format!("  ({})", cond.join(", "))
                    }
                );
            }
        }
        CatalogCommand::Test { app, har, bundle } => {
            let (set, _) = load_catalog(&bundle)?;
            let a = app_of(&set, &app)?;
            let patterns: Vec<sluice_net::HostPattern> = a
                .hosts
                .iter()
                .filter_map(|h| sluice_net::HostPattern::parse(h).ok())
                .collect();
            let doc: serde_json::Value = serde_json::from_slice(&read(&har)?)
                .map_err(|e| anyhow::anyhow!("{}: not a HAR file: {e}", har.display()))?;
            let entries = doc["log"]["entries"].as_array().ok_or_else(|| {
                anyhow::anyhow!("{}: not a HAR file (no log.entries)", har.display())
            })?;
            let (mut ours, mut defined) = (0usize, 0usize);
            for e in entries {
                let req = &e["request"];
                let method = req["method"].as_str().unwrap_or("GET").to_ascii_uppercase();
                let url = req["url"].as_str().unwrap_or("");
                let Ok(uri) = url.parse::<http::Uri>() else {
                    continue;
                };
                let host = uri.host().unwrap_or("").to_ascii_lowercase();
                if !patterns.iter().any(|p| p.matches(&host)) {
                    continue;
                }
                ours += 1;
                let query = sluice_policy::PolicySet::query_pairs(uri.query());
                let mime = req["postData"]["mimeType"].as_str().unwrap_or("");
                let text = req["postData"]["text"].as_str().unwrap_or("");
                let form: Vec<(String, String)> =
                    if mime.starts_with("application/x-www-form-urlencoded") {
                        sluice_policy::PolicySet::query_pairs(Some(text))
                    } else {
                        Vec::new()
                    };
                let (activity, how) =
                    match set.activity_for(&app, &method, uri.path(), &query, &form) {
                        Some(d) => {
                            defined += 1;
                            (
                                d.activity,
                                d.session.map_or_else(|| "defined".to_owned(), session_step),
                            )
                        }
                        None => {
                            let file_part = mime.starts_with("multipart/form-data")
                                && text.contains("filename=");
                            (
                                sluice_policy::PolicySet::generic_activity(
                                    &method,
                                    (!mime.is_empty()).then_some(mime),
                                    file_part,
                                    None,
                                    None,
                                ),
                                "generic".to_owned(),
                            )
                        }
                    };
                say!(
                    "{:<9} {:<26} {method} {}",
                    activity_name(activity),
                    how,
                    sluice::redact::url(url)
                );
            }
            say!(
                "{ours} requests to {app}'s hosts, {defined} matched a definition, {} by generic signs",
                ours - defined
            );
        }
    }
    Ok(())
}

/// An activity as bundles write it (`upload`).
fn activity_name(a: sluice_policy::model::Activity) -> String {
    serde_json::to_value(a)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// `session:s3-multipart/part`: an upload-session step as `catalog` prints it.
fn session_step(s: sluice_policy::model::SessionStep) -> String {
    let name = |v: serde_json::Result<serde_json::Value>| {
        v.ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    };
    format!(
        "session:{}/{}",
        name(serde_json::to_value(s.protocol)),
        name(serde_json::to_value(s.step))
    )
}

struct InspectArgs {
    file: PathBuf,
    apply_label: Option<String>,
    out: Option<PathBuf>,
    replace: bool,
    permissions: Vec<String>,
    bundle: Option<PathBuf>,
    max_bytes: u64,
}

fn inspect_command(a: InspectArgs) -> anyhow::Result<()> {
    use sluice_inspect::{self as inspect, Applied, LabelSpec, Limits};
    let bundle = a
        .bundle
        .or_else(|| std::env::var_os("SLUICE_BUNDLE").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("policies/default"));
    let set = load_policies(&bundle).map_err(|e| {
        e.context(format!(
            "loading the bundle {} (its labels and DLP dictionaries are used; choose one with --bundle)",
            bundle.display()
        ))
    })?;
    let limits = Limits {
        max_bytes: a.max_bytes,
        ..Limits::default()
    };
    let meta =
        std::fs::metadata(&a.file).map_err(|e| anyhow::anyhow!("{}: {e}", a.file.display()))?;
    if meta.len() > a.max_bytes {
        anyhow::bail!(
            "{} is {} bytes, larger than --max-bytes {} (not inspectable)",
            a.file.display(),
            meta.len(),
            a.max_bytes
        );
    }
    let bytes = read(&a.file)?;
    let name = a.file.file_name().map(|n| n.to_string_lossy().into_owned());
    let label_id = |guid: &str| set.label_id(guid).map(str::to_owned);
    let describe = |facts: &inspect::FileFacts| -> anyhow::Result<serde_json::Value> {
        let mut v = serde_json::to_value(facts)?;
        if let Some(labels) = v.get_mut("labels").and_then(|l| l.as_array_mut()) {
            for (l, f) in labels.iter_mut().zip(&facts.labels) {
                l["label_id"] = serde_json::json!(label_id(&f.guid));
            }
        }
        Ok(v)
    };
    let Some(wanted) = a.apply_label else {
        // An archive lists the files inside it (as uploads decide them) under `members`.
        let all = inspect::inspect_with_members(&bytes, name.as_deref(), &limits, &set.detectors);
        let mut v = describe(&all[0])?;
        if all.len() > 1 {
            v["members"] = all[1..]
                .iter()
                .map(&describe)
                .collect::<anyhow::Result<Vec<_>>>()?
                .into();
        }
        say!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    };
    let Some(out) = a.out else {
        anyhow::bail!("--apply-label needs -o OUT (the input file is never changed)");
    };
    let w = inspect::normalize_guid(&wanted);
    let Some(label) = set.labels.values().find(|l| {
        l.id == wanted
            || l.name.eq_ignore_ascii_case(&wanted)
            || inspect::normalize_guid(&l.guid) == w
    }) else {
        let known: Vec<&str> = set.labels.keys().map(String::as_str).collect();
        anyhow::bail!(
            "no label `{wanted}` in {} (known: {})",
            bundle.display(),
            known.join(", ")
        );
    };
    let spec = LabelSpec {
        guid: inspect::normalize_guid(&label.guid),
        tenant: inspect::normalize_guid(&label.tenant),
        name: label.name.clone(),
        method: "Privileged".into(),
        set_date: inspect::now_iso8601(),
        action_id: inspect::new_guid(),
        permissions: a.permissions,
    };
    let result = match inspect::apply_label(&bytes, &spec, a.replace, &limits)
        .map_err(|e| anyhow::anyhow!("{}: not labeled: {e}", a.file.display()))?
    {
        Applied::Labeled(v) => v,
        Applied::AlreadyLabeled(l) => anyhow::bail!(
            "{} already carries label {} of tenant {} (use --replace to replace it)",
            a.file.display(),
            label_id(&l.guid).unwrap_or(l.guid),
            l.tenant.unwrap_or_default()
        ),
    };
    std::fs::write(&out, &result).map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
    let facts = inspect::inspect_file(&result, name.as_deref(), &limits, &set.detectors);
    say!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "applied": label.id,
            "out": out,
            "result": describe(&facts)?,
        }))?
    );
    Ok(())
}

fn policy_command(command: PolicyCommand) -> anyhow::Result<()> {
    use sluice_policy::model::{Input, Kind};
    match command {
        PolicyCommand::Test { bundle } => {
            let set = load_policies(&bundle)?;
            let (passed, failures) = set.run_tests();
            for f in &failures {
                say!("FAIL {f}");
            }
            say!(
                "{} policies, {passed} tests passed, {} failed",
                set.len(),
                failures.len()
            );
            if !failures.is_empty() {
                anyhow::bail!("{} policy tests failed", failures.len());
            }
        }
        PolicyCommand::Explain {
            bundle,
            kind,
            input,
        } => {
            let set = load_policies(&bundle)?;
            let kind = match kind.as_str() {
                "access" => Kind::Access,
                "session" => Kind::Session,
                other => anyhow::bail!("--kind must be access or session, not `{other}`"),
            };
            let text = String::from_utf8(read(&input)?)?;
            let facts: Input = serde_norway::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", input.display()))?;
            let doc = serde_json::json!({
                "decision": set.decide(kind, &facts),
                "policies": set.explain(kind, &facts),
            });
            say!("{}", serde_json::to_string_pretty(&doc)?);
        }
    }
    Ok(())
}

/// A path or word as a shell reads it back: quoted when it holds anything but plain characters.
fn shell_word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@%".contains(&b));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// How to run this program again in a printed command: the name typed when it was found on
/// `PATH`, else its absolute path (a relative one would only work from this directory).
fn this_program() -> String {
    let typed = std::env::args().next().unwrap_or_else(|| "sluice".into());
    if !typed.contains('/') {
        return shell_word(&typed);
    }
    std::env::current_exe()
        .map(|p| shell_word(&p.to_string_lossy()))
        .unwrap_or_else(|_| shell_word(&typed))
}

/// A file as an absolute path for a printed command.
fn absolute(path: &std::path::Path) -> String {
    let p = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    shell_word(&p.to_string_lossy())
}

struct CaInitArgs {
    config: PathBuf,
    name: String,
    days: Option<u32>,
    org: Option<String>,
    bundle: Vec<PathBuf>,
    permit: Vec<String>,
}

fn ca_init(a: CaInitArgs) -> anyhow::Result<()> {
    use sluice::proxy::ca::{self, CaOptions, Permitted};
    let cfg = Config::load(&a.config)?;
    let cert = cfg.ca_cert_path();
    let dir = cert
        .parent()
        .ok_or_else(|| anyhow::anyhow!("bad CA path {}", cert.display()))?;
    if cert.file_name().and_then(|n| n.to_str()) != Some(ca::CA_CERT_FILE)
        || cfg.ca_key_path() != dir.join(ca::CA_KEY_FILE)
    {
        anyhow::bail!(
            "`ca init` writes {dir}/ca.crt and {dir}/ca.key; set tls.ca_cert/tls.ca_key to those names or leave them unset",
            dir = dir.display()
        );
    }
    let catalogue = |set: &sluice_policy::PolicySet| -> Vec<String> {
        let mut apps: Vec<_> = set.apps.values().map(|c| &c.app).collect();
        apps.sort_by(|x, y| x.id.cmp(&y.id));
        apps.iter().flat_map(|x| x.hosts.clone()).collect()
    };
    let permitted = match &a.org {
        None => None,
        Some(_) => {
            let mut hosts: Vec<String> = cfg.apps.iter().flat_map(|x| x.hosts.clone()).collect();
            // The configured bundle's catalogue, as the agent last verified it.
            if let Some(b) = &cfg.bundle {
                match sluice::bundle::read_last_good(
                    &cfg.state_dir,
                    &b.public_key,
                    &cfg.privileged_trust_path(),
                ) {
                    Ok(set) => {
                        say!(
                            "catalogue: the configured bundle's (revision {}, the last good one in {})",
                            set.revision,
                            cfg.state_dir.join("bundle").display()
                        );
                        hosts.extend(catalogue(&set));
                    }
                    Err(e) if a.bundle.is_empty() => say!(
                        "note: the configured bundle's catalogue is not on this host yet ({e}); \
                         give it with --bundle to permit its hosts"
                    ),
                    Err(_) => {}
                }
            }
            for b in &a.bundle {
                let set = load_policies(b).map_err(|e| {
                    e.context(format!(
                        "loading the bundle {} (its catalogue)",
                        b.display()
                    ))
                })?;
                hosts.extend(catalogue(&set));
            }
            hosts.extend(a.permit.iter().cloned());
            if hosts.is_empty() {
                anyhow::bail!(
                    "--org makes a CA that is valid only for catalogued hosts, and {} catalogues none: \
                     give --bundle DIR (a bundle with a catalog.yaml), [[apps]] in the config or --permit HOST",
                    a.config.display()
                );
            }
            Some(Permitted::from_hosts(hosts.iter().map(String::as_str))?)
        }
    };
    let opts = CaOptions {
        common_name: a.name,
        organization: a.org,
        days: a.days.unwrap_or(cfg.tls.ca_days),
        permitted,
    };
    let path = ca::init_with(dir, &opts)?;
    say!(
        "created {} (key {} is 0600 and never leaves this host), valid for {} days",
        path.display(),
        cfg.ca_key_path().display(),
        opts.days
    );
    if let Some(p) = &opts.permitted {
        say!("name constraints: valid only for {p} (and names under those domains)");
    }
    say!(
        "trust it on this host: {} ca trust --config {}",
        this_program(),
        absolute(&a.config)
    );
    Ok(())
}

fn ca_trust(config: &std::path::Path, remove: bool, root: Option<PathBuf>) -> anyhow::Result<()> {
    use cli::trust_store::{self, CaCert};
    let cfg = Config::load(config)?;
    let root = root
        .or_else(|| std::env::var_os(trust_store::ROOT_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/"));
    let ca = CaCert::read(&cfg.ca_cert_path())?;
    let lines = trust_store::apply(&ca, &root, remove);
    for l in &lines {
        say!("{l}");
    }
    let failed = lines.iter().filter(|l| l.result.is_err()).count();
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {} trust stores could not be changed (the error lines above say why)",
            lines.len()
        );
    }
    if !remove {
        let root_arg = if root == std::path::Path::new("/") {
            String::new()
        } else {
            format!(" --root {}", absolute(&root))
        };
        say!(
            "to take it out again: {} ca trust --remove --config {}{root_arg}",
            this_program(),
            absolute(config)
        );
    }
    Ok(())
}

fn status(
    config: Option<PathBuf>,
    admin: Option<std::net::SocketAddr>,
    json: bool,
) -> anyhow::Result<()> {
    use cli::status::{Target, fetch, render, target_from_config};
    const DEFAULT_CONFIG: &str = "/etc/sluice/agent.toml";
    let target = match (admin, config) {
        (Some(addr), _) => Target {
            addr,
            from: "--admin".into(),
        },
        (None, Some(c)) => target_from_config(&c)?,
        // The packaged configuration may be unreadable to this user: then the default address.
        (None, None) => {
            target_from_config(std::path::Path::new(DEFAULT_CONFIG)).unwrap_or_else(|e| Target {
                addr: std::net::SocketAddr::from(([127, 0, 0, 1], 15090)),
                from: format!("the default address; {DEFAULT_CONFIG}: {e:#}"),
            })
        }
    };
    let body = fetch(&target)?;
    if json {
        say!("{}", body.trim_end());
        return Ok(());
    }
    let doc: serde_json::Value = serde_json::from_str(&body).map_err(|e| {
        anyhow::anyhow!(
            "{} (from {}) answered /status with something that is not JSON: {e}",
            target.addr,
            target.from
        )
    })?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    say!("{}", render(&doc, now));
    say!("  {:<12} {} (from {})", "admin", target.addr, target.from);
    Ok(())
}
