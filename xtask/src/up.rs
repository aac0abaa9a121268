//! `cargo xtask up` and `cargo xtask demo`: Sluice running on this host, end to end.
//!
//! `up` builds the release binaries, then, all under `target/sluice-up/` and kept across runs:
//! initialises the collector (`collector/`: database, TLS material, the portal's `admin` account
//! whose password is printed once and kept 0600 in `collector/admin-password`), makes the bundle
//! signing keys (`keys/`), builds and signs `policies/default` and publishes it for group
//! `default`, makes the demo app's certificates (`demo-app/`, so the agent can verify it
//! upstream), writes the agent's configuration (`agent.toml`: endpoint mode, bundle from the
//! collector, events reported to it) and its interception CA (`ca.pem`). It then hands over to
//! `run.sh`, which starts the collector, enrolls the agent with a one-time token (first run only),
//! starts the agent and waits. Ctrl-C reaches both (same terminal process group): the agent drains
//! and detaches from the kernel, the collector finishes its requests; the script waits for both.
//! (The hand-over is an `exec`, so no process is left that Ctrl-C would kill before its children
//! are done.)
//!
//! `up --postgres` stores everything in PostgreSQL instead: a cluster of its own under
//! `target/sluice-up/postgres` (Debian's server binaries; run as the `postgres` user when `up` is
//! root; only a Unix socket in that directory), started with `pg_ctl` and stopped by `run.sh` at
//! the end, and two collectors on it, `collector/` on 8443 and `collector-2/` on 8444 (with the
//! first's CA, server certificate and release keys, as production copies them); the agent ships
//! to the first and falls back to the second. Its portal password and enrollment are its own
//! (`collector/admin-password-postgres`), so switching between the two stores re-enrolls the
//! agent.
//!
//! `demo` needs `up` running in another terminal. It starts the demo app (`files.test`) on
//! 127.0.0.41:443, creates the cgroup `sluice-demo` (inside the agent's steered cgroup, the v2
//! root by default) and plays the scenarios with curl from inside it, so every request goes
//! through the agent: an unlabeled upload (blocked), a labeled upload (passes), a Highly
//! Confidential download (labeled and protected when the device is unmanaged: start `up` with
//! `--unmanaged` to see it), a guest's download (labeled view-only) and a form post with card
//! numbers (blocked). The events are then in the portal.

use std::{
    fs,
    net::TcpStream,
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, sh, step};

/// The collector's listener.
const COLLECTOR_ADDR: &str = "127.0.0.1:8443";
/// The second collector's (`up --postgres`).
const COLLECTOR_2_ADDR: &str = "127.0.0.1:8444";
/// The demo identity provider (the organisation's sign-in for the portal).
const IDP_ADDR: &str = "127.0.0.1:9443";
/// The agent's admin endpoint (packaging/agent.toml's default).
const AGENT_ADMIN: &str = "127.0.0.1:15090";
/// Where `demo` runs the demo app.
const DEMO_IP: &str = "127.0.0.41";
/// The cgroup (under the v2 root) `demo` runs its clients in.
const DEMO_CGROUP: &str = "sluice-demo";

fn run_out(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(())
}

fn toml_str(p: &Path) -> String {
    serde_json::Value::String(p.display().to_string()).to_string()
}

/// `cargo xtask up`.
pub fn up(root: &Path, config: Option<PathBuf>, unmanaged: bool, postgres: bool) -> Result<()> {
    step("build (release): sluice, sluice-collector, sluice-demo-app, sluice-demo-idp");
    sh(cargo().args([
        "build",
        "--release",
        "-p",
        "sluice",
        "-p",
        "sluice-collector",
        "-p",
        "sluice-e2e",
        "--bin",
        "sluice",
        "--bin",
        "sluice-collector",
        "--bin",
        "sluice-demo-app",
        "--bin",
        "sluice-demo-idp",
    ]))?;
    let rel = root.join("target/release");
    let sluice = rel.join("sluice");
    let collector = rel.join("sluice-collector");
    let dir = root.join("target/sluice-up");
    let cdir = dir.join("collector");
    fs::create_dir_all(&cdir)?;

    // The organisation's identity provider (the demo's people), its CA made once.
    let idp_dir = dir.join("idp");
    let idp_ca = idp_dir.join("idp-ca.pem");
    made_once(
        Command::new(rel.join("sluice-demo-idp"))
            .args(["--listen", "127.0.0.1:0", "--dir"])
            .arg(&idp_dir),
        &idp_ca,
    )?;

    // The store: SQLite in the collector's state, or PostgreSQL (a cluster of `up`'s own).
    let pg = if postgres {
        step("postgresql: a cluster under target/sluice-up/postgres");
        Some(start_postgres(&dir.join("postgres"))?)
    } else {
        None
    };
    let store_toml = match &pg {
        Some(p) => format!(
            "\n# Shared by the two collectors (`cargo xtask up --postgres`).\n[store]\npostgres = \"{}\"\n",
            p.conninfo
        ),
        None => String::new(),
    };
    // Which store the agent's enrollment belongs to: another one enrolls it again.
    let mode = if postgres { "postgres" } else { "sqlite" };
    let mode_file = dir.join("store");
    let agent_state = dir.join("state");
    // (No file: the runs before there was a choice, all on SQLite.)
    let previous = fs::read_to_string(&mode_file).unwrap_or_else(|_| "sqlite".into());
    if previous.trim() != mode {
        let _ = fs::remove_file(agent_state.join("report/credential"));
        let _ = fs::remove_file(agent_state.join("report/enrollment.json"));
    }
    fs::write(&mode_file, format!("{mode}\n"))?;

    step("collector");
    let (private_key, public_key) = signing_keys(&sluice, &dir.join("keys"))?;
    let ccfg = cdir.join("collector.toml");
    let state = cdir.join("state");
    fs::write(
        &ccfg,
        format!(
            "# Written by `cargo xtask up`.\nlisten = \"{COLLECTOR_ADDR}\"\nstate_dir = {}\nbundle_public_key = {}\n\n\
             # The organisation's sign-in: the demo identity provider (people: alice, bob, carol,\n\
             # dana; password `demo`; dana is an admin).\n[portal.oidc]\nissuer = \"https://{IDP_ADDR}\"\n\
             client_id = \"sluice-portal\"\nredirect_url = \"https://{COLLECTOR_ADDR}/auth/oidc/callback\"\n\
             ca_file = {}\nadmins = [\"group:sluice-admins\"]\n\n\
             # Demo-sized: ten downloads in five minutes is a mass download (the default is 50 in\n\
             # ten minutes, or ten times the user's own baseline); it raises the user's risk.\n\
             [detection.mass_download]\nfloor = 10\nwindow_s = 300\n{store_toml}",
            toml_str(&state),
            toml_str(&public_key),
            toml_str(&idp_ca),
        ),
    )?;
    let password_file = cdir.join(if postgres {
        "admin-password-postgres"
    } else {
        "admin-password"
    });
    let initialised = match &pg {
        Some(p) => p.initialised,
        None => state.join("collector.db").is_file(),
    };
    let mut new_password = None;
    if !initialised {
        let out = run_out(
            Command::new(&collector)
                .args(["init", "--config"])
                .arg(&ccfg),
        )?;
        let password = out
            .lines()
            .find_map(|l| l.strip_prefix("password (shown once): "))
            .context("sluice-collector init printed no password")?
            .trim()
            .to_owned();
        write_private(&password_file, &format!("{password}\n"))?;
        new_password = Some(password);
    }
    // The collector's state is its own (0700): the agent's unprivileged proxy reads a copy of
    // its CA (a public certificate).
    let collector_ca = dir.join("collector-ca.pem");
    fs::copy(state.join("tls/ca.pem"), &collector_ca)
        .context("copying the collector's CA certificate")?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&collector_ca, fs::Permissions::from_mode(0o644))?;
    }
    // The second collector: the first's configuration on another port, and its keys.
    let ccfg2 = match &pg {
        Some(_) => Some(second_collector(&dir, &ccfg, &state)?),
        None => None,
    };

    step("policy bundle: build, sign, publish (policies/default, group default)");
    let bundle = dir.join("default.tar.gz");
    // Revisions are numbers: the time of this `up`, so a later one is newer.
    let revision = SystemTime::now()
        .duration_since(UNIX_EPOCH)?
        .as_secs()
        .to_string();
    signed_default_bundle(root, &sluice, &bundle, &revision, &private_key)?;
    sh(Command::new(&collector)
        .args(["bundle", "publish"])
        .arg(&bundle)
        .args(["--group", "default", "--config"])
        .arg(&ccfg))?;

    // The demo app's certificates, made once, so the agent verifies it as an upstream.
    let demo_dir = dir.join("demo-app");
    let demo_ca = demo_dir.join("ca.pem");
    made_once(
        Command::new(rel.join("sluice-demo-app"))
            .args(["--listen", "127.0.0.1:0", "--cert-dir"])
            .arg(&demo_dir),
        &demo_ca,
    )?;

    step("agent");
    let url = format!("https://{COLLECTOR_ADDR}");
    let fallbacks = if postgres {
        format!("collector_fallbacks = [\"https://{COLLECTOR_2_ADDR}\"]\n")
    } else {
        String::new()
    };
    let acfg = match config {
        Some(c) => c,
        None => {
            let path = dir.join("agent.toml");
            let base = fs::read_to_string(root.join("packaging/agent.toml"))
                .context("reading packaging/agent.toml")?
                .replace(
                    "state_dir = \"/var/lib/sluice\"",
                    &format!("state_dir = {}", toml_str(&agent_state)),
                )
                // Loopback is steered only when a rule names it: the demo app's address.
                .replacen(
                    "include = [\n",
                    &format!(
                        "include = [\n  {{ cidr = \"{DEMO_IP}/32\", ports = [443] }},  # `cargo xtask demo`'s app\n"
                    ),
                    1,
                );
            if !base.contains(DEMO_IP) {
                bail!("packaging/agent.toml has no `include = [` list to add the demo app to");
            }
            let posture = if unmanaged { "unmanaged" } else { "managed" };
            let text = format!(
                "{base}\n# Added by `cargo xtask up`.\n[tls]\nupstream_extra_cas = [{demo_ca}]\n\n\
                 [device]\nposture = \"{posture}\"\n\n\
                 [bundle]\nurl = \"{url}/api/v1/bundles/current\"\npublic_key = {pubkey}\n\
                 extra_cas = [{cca}]\n\n\
                 [report]\ncollector = \"{url}\"\ncollector_ca = {cca}\nstatus_interval_s = 60\n{fallbacks}",
                demo_ca = toml_str(&demo_ca),
                pubkey = toml_str(&public_key),
                cca = toml_str(&collector_ca),
            );
            fs::write(&path, text)?;
            path
        }
    };
    sh(Command::new(&sluice)
        .args(["config", "check", "--config"])
        .arg(&acfg)
        .stdout(Stdio::null()))?;
    // The interception CA: created once, kept across runs (its key never leaves the state dir).
    let ca_pem = dir.join("ca.pem");
    let export = || {
        Command::new(&sluice)
            .args(["ca", "export", "--config"])
            .arg(&acfg)
            .output()
    };
    let mut out = export()?;
    if !out.status.success() {
        sh(Command::new(&sluice)
            .args(["ca", "init", "--config"])
            .arg(&acfg))?;
        out = export()?;
        if !out.status.success() {
            bail!(
                "sluice ca export failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    fs::write(&ca_pem, out.stdout)?;
    // A one-time enrollment token, used by run.sh when the agent is not enrolled yet.
    let token_file = dir.join("enroll-token");
    let enrolled = agent_state.join("report/credential").is_file();
    if !enrolled {
        let token = run_out(
            Command::new(&collector)
                .args(["token", "create", "--ttl", "1h", "--config"])
                .arg(&ccfg),
        )?;
        write_private(&token_file, token.trim())?;
    }

    step("Sluice is starting (Ctrl-C stops the agent and the collector)");
    let password_line = match &new_password {
        Some(p) => format!("{p}   (shown once; also in {})", password_file.display()),
        None => format!("in {}", password_file.display()),
    };
    eprintln!(
        "  portal:     {url}/  (trust {} in the browser, or accept it once)\n  \
         login:      admin / {password_line}\n  \
         sign-in:    \"Sign in with your organisation\" as alice, bob, carol or dana / demo \
         (the identity provider https://{IDP_ADDR}; trust {})\n  \
         trust:      {} (the interception CA clients must trust for intercepted apps; \
         {} ca trust --config {} puts it in this host's stores, --remove takes it out)\n  \
         agent:      {} status --config {}; curl -s http://{AGENT_ADMIN}/metrics\n  \
         logs:       {}/collector.log (the agent logs here)\n  \
         try it:     in another terminal, `sudo -E cargo xtask demo`\n{}",
        collector_ca.display(),
        idp_ca.display(),
        ca_pem.display(),
        sluice.display(),
        acfg.display(),
        sluice.display(),
        acfg.display(),
        dir.display(),
        match &pg {
            Some(p) => format!(
                "  store:      PostgreSQL ({}), log {}\n  \
                 collectors: https://{COLLECTOR_ADDR} and https://{COLLECTOR_2_ADDR} (the agent's \
                 fallback), one database\n",
                p.conninfo,
                p.log.display()
            ),
            None => String::new(),
        },
    );
    let script = dir.join("run.sh");
    fs::write(&script, RUN_SH.replace("IDP_ADDR", IDP_ADDR))?;
    let err = Command::new("sh")
        .arg(&script)
        .arg(&collector)
        .arg(&ccfg)
        .arg(&sluice)
        .arg(&acfg)
        .arg(&url)
        .arg(&collector_ca)
        .arg(&token_file)
        .arg(dir.join("collector.log"))
        .arg(rel.join("sluice-demo-idp"))
        .arg(&idp_dir)
        .arg(ccfg2.as_deref().unwrap_or(Path::new("")))
        .arg(pg.as_ref().map_or(Path::new(""), |p| p.stop.as_path()))
        .exec();
    Err(err).context("starting run.sh")
}

/// Starts the collector, enrolls the agent when it has no credential, starts the agent, and waits
/// for both; Ctrl-C (SIGINT from the terminal) reaches the children directly, SIGTERM is passed on.
const RUN_SH: &str = r#"#!/bin/sh
# Written by `cargo xtask up`: $1 collector, $2 its config, $3 sluice, $4 agent config, $5 URL,
# $6 collector CA, $7 enrollment token file, $8 collector log, $9 identity provider, ${10} its dir,
# ${11} the second collector's config and ${12} the script that stops PostgreSQL (`--postgres`;
# else empty).
set -u
collector=$1; ccfg=$2; sluice=$3; acfg=$4; url=$5; cca=$6; tokenf=$7; clog=$8; idp=$9; idpdir=${10}
ccfg2=${11:-}; pgstop=${12:-}
cpid=; apid=; ipid=; c2pid=
trap ':' INT
trap 'kill -TERM $apid $cpid $c2pid $ipid 2>/dev/null' TERM
"$idp" --dir "$idpdir" --listen IDP_ADDR >/dev/null 2>>"$clog" &
ipid=$!
"$collector" run --config "$ccfg" 2>>"$clog" &
cpid=$!
i=0
until curl -s -o /dev/null --cacert "$cca" "$url/login"; do
  i=$((i + 1))
  if [ $i -gt 150 ] || ! kill -0 $cpid 2>/dev/null; then
    echo "the collector did not start; see $clog" >&2
    kill $cpid 2>/dev/null; wait; exit 1
  fi
  sleep 0.2
done
echo "collector: listening on $url"
if [ -n "$ccfg2" ]; then
  "$collector" run --config "$ccfg2" 2>>"$clog" &
  c2pid=$!
  echo "second collector: $ccfg2"
fi
if [ -s "$tokenf" ]; then
  if ! "$sluice" enroll --config "$acfg" --collector "$url" --token-file "$tokenf" --ca "$cca"; then
    echo "enrollment failed" >&2; kill $cpid; wait; exit 1
  fi
  rm -f "$tokenf"
fi
"$sluice" run --config "$acfg" &
apid=$!
# `wait` returns early when a trapped signal arrives; wait again until both are gone.
while ! wait; do :; done
kill -TERM $ipid 2>/dev/null
while kill -0 $apid 2>/dev/null || kill -0 $cpid 2>/dev/null || kill -0 $ipid 2>/dev/null \
  || { [ -n "$c2pid" ] && kill -0 $c2pid 2>/dev/null; }; do wait; sleep 0.1; done
if [ -n "$pgstop" ]; then sh "$pgstop"; fi
echo "stopped"
"#;

/// The PostgreSQL cluster of `up --postgres`.
struct Postgres {
    /// How the collectors reach it.
    conninfo: String,
    /// Whether its database held the collector's tables already.
    initialised: bool,
    /// The server's log.
    log: PathBuf,
    /// A script that stops it (run by `run.sh` at the end).
    stop: PathBuf,
}

/// Makes (once) and starts a PostgreSQL cluster in `dir` from Debian's server binaries, with a
/// database `sluice` owned by its superuser `sluice`, reachable only through the Unix socket
/// in `dir/socket`. Root runs it as `postgres` (PostgreSQL refuses root).
fn start_postgres(dir: &Path) -> Result<Postgres> {
    let bin = fs::read_dir("/usr/lib/postgresql")
        .context("no PostgreSQL under /usr/lib/postgresql (apt-get install postgresql)")?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            Some((
                e.file_name().to_str()?.parse::<u32>().ok()?,
                e.path().join("bin"),
            ))
        })
        .filter(|(_, b)| b.join("pg_ctl").is_file())
        .max()
        .map(|(_, b)| b)
        .context("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")?;
    let root = crate::is_root();
    let as_owner = |prog: &str| {
        let mut c = if root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin.join(prog));
            c
        } else {
            Command::new(bin.join(prog))
        };
        c.current_dir("/");
        c
    };
    let (data, socket, log) = (
        dir.join("data"),
        dir.join("socket"),
        dir.join("postgres.log"),
    );
    fs::create_dir_all(&socket)?;
    if root {
        sh(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir))?;
        let reachable = Command::new("runuser")
            .args(["-u", "postgres", "--", "test", "-w"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        if !reachable {
            bail!(
                "the postgres user cannot reach {} (a directory above it is closed to other \
                 users): check out Sluice where other users may traverse, or open the path \
                 with chmod o+x",
                dir.display()
            );
        }
    }
    if !data.join("PG_VERSION").is_file() {
        run_out(
            as_owner("initdb")
                .args([
                    "--auth=trust",
                    "--username=sluice",
                    "--encoding=UTF8",
                    "--no-locale",
                    "-D",
                ])
                .arg(&data),
        )?;
    }
    let running = as_owner("pg_ctl")
        .arg("status")
        .arg("-D")
        .arg(&data)
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !running {
        run_out(
            as_owner("pg_ctl")
                .args(["start", "-w", "-t", "60", "-D"])
                .arg(&data)
                .arg("-l")
                .arg(&log)
                .arg("-o")
                .arg(format!(
                    "-k {} -c listen_addresses='' -p 5432",
                    socket.display()
                )),
        )?;
    }
    let psql = |sql: &str| {
        run_out(
            as_owner("psql")
                .args(["-h"])
                .arg(&socket)
                .args(["-p", "5432", "-U", "sluice", "-d", "postgres", "-tAc", sql]),
        )
    };
    if psql("SELECT 1 FROM pg_database WHERE datname = 'sluice'")?.trim() != "1" {
        psql("CREATE DATABASE sluice")?;
    }
    let conninfo = format!(
        "host={} port=5432 user=sluice dbname=sluice",
        socket.display()
    );
    let initialised = run_out(
        as_owner("psql")
            .args(["-h"])
            .arg(&socket)
            .args(["-p", "5432", "-U", "sluice", "-d", "sluice", "-tAc"])
            .arg("SELECT count(*) FROM pg_tables WHERE tablename = 'portal_admins'"),
    )?
    .trim()
        == "1";
    let stop = dir.join("stop.sh");
    fs::write(
        &stop,
        format!(
            "#!/bin/sh\n# Written by `cargo xtask up --postgres`: stops its PostgreSQL.\n{}{} stop -m fast -D {}\n",
            if root { "runuser -u postgres -- " } else { "" },
            bin.join("pg_ctl").display(),
            data.display()
        ),
    )?;
    Ok(Postgres {
        conninfo,
        initialised,
        log,
        stop,
    })
}

/// `collector-2/`: the first collector's configuration on [`COLLECTOR_2_ADDR`] with a state of
/// its own holding copies of the first's CA, server certificate and release keys.
fn second_collector(dir: &Path, ccfg: &Path, state: &Path) -> Result<PathBuf> {
    let cdir2 = dir.join("collector-2");
    let state2 = cdir2.join("state");
    fs::create_dir_all(state2.join("tls"))?;
    fs::set_permissions(&state2, fs::Permissions::from_mode(0o700))?;
    for e in fs::read_dir(state.join("tls"))? {
        let e = e?;
        fs::copy(e.path(), state2.join("tls").join(e.file_name()))?;
    }
    if state.join("release-keys.json").is_file() {
        fs::copy(
            state.join("release-keys.json"),
            state2.join("release-keys.json"),
        )?;
    }
    let text = fs::read_to_string(ccfg)?
        .replace(
            &format!("listen = \"{COLLECTOR_ADDR}\""),
            &format!("listen = \"{COLLECTOR_2_ADDR}\""),
        )
        .replace(&toml_str(state), &toml_str(&state2));
    let path = cdir2.join("collector.toml");
    fs::write(&path, text)?;
    Ok(path)
}

/// Runs `cmd` until it has made `file` (certificates made on a first start and kept), then stops
/// it; nothing to do when `file` exists.
fn made_once(cmd: &mut Command, file: &Path) -> Result<()> {
    if file.is_file() {
        return Ok(());
    }
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    let end = Instant::now() + Duration::from_secs(20);
    while !file.is_file() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    if !file.is_file() {
        bail!("{:?} made no {}", cmd.get_program(), file.display());
    }
    Ok(())
}

/// The bundle signing key pair in `keys` (made there once): (private, public).
fn signing_keys(sluice: &Path, keys: &Path) -> Result<(PathBuf, PathBuf)> {
    let private_key = keys.join("bundle-signing.key");
    if !private_key.is_file() {
        fs::create_dir_all(keys)?;
        sh(Command::new(sluice).args(["keygen", "--out"]).arg(keys))?;
    }
    Ok((private_key, keys.join("bundle-signing.pub")))
}

/// `policies/default` built into `out` as `revision` and signed with `private_key`.
fn signed_default_bundle(
    root: &Path,
    sluice: &Path,
    out: &Path,
    revision: &str,
    private_key: &Path,
) -> Result<()> {
    sh(Command::new(sluice)
        .args(["bundle", "build"])
        .arg(root.join("policies/default"))
        .arg("--out")
        .arg(out)
        .args(["--revision", revision])
        .stdout(Stdio::null()))?;
    sh(Command::new(sluice)
        .args(["bundle", "sign"])
        .arg(out)
        .arg("--key")
        .arg(private_key)
        .stdout(Stdio::null()))
}

/// `cargo xtask up --gateway`: a demo branch in network namespaces. `sluice-client` (a LAN
/// client, 10.90.1.2) routes through `sluice-gw` (the agent in gateway mode, 10.90.1.1 /
/// 10.90.2.1) to `sluice-app` (the demo app at 10.90.2.2:443). The default bundle, signed by
/// the key `up` keeps, comes from a file; events go to `target/sluice-up/gateway/events.jsonl`.
/// Ctrl-C stops the agent (which removes its rules) and the app, and removes the namespaces.
pub fn up_gateway(root: &Path) -> Result<()> {
    step("build (release): sluice, sluice-demo-app");
    sh(cargo().args([
        "build",
        "--release",
        "-p",
        "sluice",
        "-p",
        "sluice-e2e",
        "--bin",
        "sluice",
        "--bin",
        "sluice-demo-app",
    ]))?;
    let rel = root.join("target/release");
    let sluice = rel.join("sluice");
    let dir = root.join("target/sluice-up/gateway");
    fs::create_dir_all(&dir)?;
    let (private_key, public_key) = signing_keys(&sluice, &root.join("target/sluice-up/keys"))?;
    step("policy bundle: build and sign (policies/default)");
    let bundle = dir.join("default.tar.gz");
    signed_default_bundle(root, &sluice, &bundle, "1", &private_key)?;
    let app_dir = dir.join("demo-app");
    let events = dir.join("events.jsonl");
    let acfg = dir.join("agent.toml");
    fs::write(
        &acfg,
        format!(
            "# Written by `cargo xtask up --gateway`.\nstate_dir = {state}\n\n[steer]\nenabled = false\n\n\
             [gateway]\nenabled = true\nlan_interfaces = [\"gw-lan\"]\nclient_cidrs = [\"10.90.1.0/24\"]\n\n\
             [admin]\nlisten = \"127.0.0.1:15091\"\n\n\
             [tls]\nupstream_extra_cas = [{app_ca}]\n\n\
             [device]\nposture = \"managed\"\n\n\
             [bundle]\nfile = {bundle}\npublic_key = {pubkey}\n\n\
             [report]\nevents_file = {events}\n",
            state = toml_str(&dir.join("state")),
            app_ca = toml_str(&app_dir.join("ca.pem")),
            bundle = toml_str(&bundle),
            pubkey = toml_str(&public_key),
            events = toml_str(&events),
        ),
    )?;
    let export = || {
        Command::new(&sluice)
            .args(["ca", "export", "--config"])
            .arg(&acfg)
            .output()
    };
    if !export()?.status.success() {
        sh(Command::new(&sluice)
            .args(["ca", "init", "--config"])
            .arg(&acfg)
            .stdout(Stdio::null()))?;
    }
    let ca_pem = dir.join("ca.pem");
    fs::write(&ca_pem, export()?.stdout)?;
    step("demo branch: sluice-client -> sluice-gw (Sluice) -> sluice-app (files.test)");
    eprintln!(
        "  try it (as root, in another terminal):\n    \
         ip netns exec sluice-client curl --cacert {ca} --resolve files.test:443:10.90.2.2 \\\n      \
         -d 'user=alice@corp.example&password=demo' https://files.test/api/login\n    \
         ip netns exec sluice-client curl --cacert {ca} --resolve files.test:443:10.90.2.2 \\\n      \
         -H \"Authorization: Bearer TOKEN\" -H 'Accept: application/json' -F file=@README.md https://files.test/upload\n  \
         events:  tail -f {events}\n  \
         status:  ip netns exec sluice-gw {sluice} status --config {acfg}\n  \
         rules:   ip netns exec sluice-gw nft list table inet sluice\n",
        ca = ca_pem.display(),
        events = events.display(),
        sluice = sluice.display(),
        acfg = acfg.display(),
    );
    let script = dir.join("branch.sh");
    fs::write(&script, BRANCH_SH)?;
    let err = Command::new("sh")
        .arg(&script)
        .arg(&sluice)
        .arg(&acfg)
        .arg(rel.join("sluice-demo-app"))
        .arg(&app_dir)
        .arg(dir.join("agent.log"))
        .exec();
    Err(err).context("starting branch.sh")
}

/// Makes the branch's namespaces, starts the app and the agent, waits; on Ctrl-C or SIGTERM stops
/// both and removes the namespaces.
const BRANCH_SH: &str = r#"#!/bin/sh
# Written by `cargo xtask up --gateway`: $1 sluice, $2 agent config, $3 sluice-demo-app,
# $4 the app's certificate directory, $5 the agent's log.
set -u
sluice=$1; acfg=$2; app=$3; appdir=$4; alog=$5
apid=; gpid=
cleanup() {
  kill -TERM $gpid 2>/dev/null; wait $gpid 2>/dev/null
  kill -TERM $apid 2>/dev/null; wait $apid 2>/dev/null
  for n in sluice-client sluice-gw sluice-app; do ip netns del $n 2>/dev/null; done
  echo "stopped; namespaces removed"
}
trap ':' INT
trap 'kill -TERM $gpid $apid 2>/dev/null' TERM
for n in sluice-client sluice-gw sluice-app; do ip netns del $n 2>/dev/null; ip netns add $n; ip -n $n link set lo up; done
ip -n sluice-client link add lan0 type veth peer name gw-lan netns sluice-gw
ip -n sluice-gw link add gw-wan type veth peer name wan0 netns sluice-app
ip -n sluice-client addr add 10.90.1.2/24 dev lan0; ip -n sluice-client link set lan0 up
ip -n sluice-gw addr add 10.90.1.1/24 dev gw-lan; ip -n sluice-gw link set gw-lan up
ip -n sluice-gw addr add 10.90.2.1/24 dev gw-wan; ip -n sluice-gw link set gw-wan up
ip -n sluice-app addr add 10.90.2.2/24 dev wan0; ip -n sluice-app link set wan0 up
ip -n sluice-client route add default via 10.90.1.1
ip -n sluice-app route add default via 10.90.2.1
ip netns exec sluice-gw sysctl -qw net.ipv4.ip_forward=1
nsenter --net=/run/netns/sluice-app "$app" --listen 10.90.2.2:443 --cert-dir "$appdir" &
apid=$!
i=0
until [ -s "$appdir/ca.pem" ]; do
  i=$((i + 1)); if [ $i -gt 100 ]; then echo "the demo app did not start" >&2; cleanup; exit 1; fi
  sleep 0.2
done
nsenter --net=/run/netns/sluice-gw "$sluice" run --config "$acfg" 2>>"$alog" &
gpid=$!
echo "gateway: agent running (log: $alog); Ctrl-C stops the branch"
while ! wait $gpid; do kill -0 $gpid 2>/dev/null || break; done
cleanup
"#;

// ---------------------------------------------------------------------------------------------
// demo

struct Demo {
    cgroup: PathBuf,
    ca: PathBuf,
    base: String,
}

impl Demo {
    /// curl inside the demo cgroup: (HTTP status, body).
    fn curl(&self, args: &[&str]) -> Result<(u16, String)> {
        let script = format!(
            "echo $$ > '{}/cgroup.procs' || exit 97; exec \"$@\"",
            self.cgroup.display()
        );
        let out = Command::new("sh")
            .args(["-c", &script, "sh", "curl", "-sS", "--max-time", "30"])
            .args([
                "--resolve",
                &format!("files.test:443:{DEMO_IP}"),
                "--cacert",
            ])
            .arg(&self.ca)
            .args(["-w", "\n%{http_code}"])
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
        let code = code.trim().parse().unwrap_or(0);
        if code == 0 {
            bail!("curl failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok((code, body.to_owned()))
    }

    fn login(&self, user: &str) -> Result<String> {
        let (code, body) = self.curl(&[
            "--data",
            &format!("user={user}&password=demo"),
            &format!("{}/api/login", self.base),
        ])?;
        let v: serde_json::Value = serde_json::from_str(&body)
            .with_context(|| format!("login of {user} answered {code}: {body}"))?;
        v["token"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("login of {user} answered {code}: {body}"))
    }
}

/// The portal, as someone who signed in with their organisation's account (curl with a cookie
/// jar, through the identity provider's form, as a browser would).
struct Portal {
    jar: PathBuf,
    collector_ca: PathBuf,
    idp_ca: PathBuf,
}

impl Portal {
    /// curl with the jar: (status, body, the redirect target).
    fn curl(&self, ca: &Path, args: &[&str]) -> Result<(u16, String, String)> {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "30", "-c"])
            .arg(&self.jar)
            .arg("-b")
            .arg(&self.jar)
            .arg("--cacert")
            .arg(ca)
            .args(["-w", "\n%{http_code} %{redirect_url}"])
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, tail) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
        let (code, redirect) = tail.split_once(' ').unwrap_or((tail, ""));
        let code = code.trim().parse().unwrap_or(0);
        if code == 0 {
            bail!("curl failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok((code, body.to_owned(), redirect.trim().to_owned()))
    }

    /// Signs `email` in: the portal sends to the provider, the provider's form is posted, its
    /// redirect goes back to the portal's callback, which starts the session.
    fn sign_in(dir: &Path, email: &str) -> Result<Self> {
        let jar = dir.join(format!("demo-{email}.cookies"));
        let _ = fs::remove_file(&jar);
        let p = Self {
            jar,
            collector_ca: dir.join("collector/state/tls/ca.pem"),
            idp_ca: dir.join("idp/idp-ca.pem"),
        };
        let (_, _, to_idp) = p.curl(
            &p.collector_ca,
            &[&format!("https://{COLLECTOR_ADDR}/auth/oidc")],
        )?;
        let query = to_idp
            .split_once('?')
            .map(|(_, q)| q.to_owned())
            .with_context(|| format!("the portal did not send to the provider ({to_idp})"))?;
        let (_, _, back) = p.curl(
            &p.idp_ca,
            &[
                "--data",
                &format!("{query}&email={email}&password=demo&action=sign-in"),
                &format!("https://{IDP_ADDR}/authorize"),
            ],
        )?;
        if !back.contains("/auth/oidc/callback") {
            bail!("the provider did not send back to the portal ({back})");
        }
        let (code, body, _) = p.curl(&p.collector_ca, &[&back])?;
        if code != 200 || !body.contains("Signed in") {
            bail!("signing {email} in: HTTP {code}");
        }
        Ok(p)
    }

    fn get(&self, path: &str) -> Result<(u16, String)> {
        let (c, b, _) = self.curl(
            &self.collector_ca,
            &[&format!("https://{COLLECTOR_ADDR}{path}")],
        )?;
        Ok((c, b))
    }

    /// The password a protected file's page gives (the form's button pressed).
    fn reveal(&self, release: &str) -> Result<(u16, Option<String>)> {
        let (code, page) = self.get(&format!("/files/{release}"))?;
        let Some(csrf) = between(&page, "name=\"csrf\" value=\"", "\"") else {
            return Ok((code, None));
        };
        let (code, body, _) = self.curl(
            &self.collector_ca,
            &[
                "--data",
                &format!("csrf={csrf}"),
                &format!("https://{COLLECTOR_ADDR}/files/{release}/reveal"),
            ],
        )?;
        Ok((code, between(&body, "<code id=\"password\">", "</code>")))
    }
}

fn between(text: &str, start: &str, end: &str) -> Option<String> {
    let from = text.find(start)? + start.len();
    let len = text[from..].find(end)?;
    Some(text[from..from + len].to_owned())
}

fn report(what: &str, expect: &str, code: u16, ok: bool) {
    eprintln!(
        "  {} {what}: HTTP {code} (expected: {expect})",
        if ok { "✔" } else { "✘" }
    );
}

/// `cargo xtask demo`.
pub fn demo(root: &Path) -> Result<()> {
    let dir = root.join("target/sluice-up");
    if TcpStream::connect_timeout(
        &AGENT_ADMIN.parse().context("agent admin address")?,
        Duration::from_secs(1),
    )
    .is_err()
    {
        bail!("the agent is not running: start `cargo xtask up` in another terminal first");
    }
    crate::fixtures::fixtures(root, None, false)?;
    let fx = root.join("target/fixtures");

    step("demo app: files.test on 127.0.0.41:443");
    let mut app = Command::new(root.join("target/release/sluice-demo-app"))
        .args(["--listen", &format!("{DEMO_IP}:443"), "--cert-dir"])
        .arg(dir.join("demo-app"))
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("demo-app.log"))?)
        .spawn()
        .context("starting sluice-demo-app (built by `cargo xtask up`)")?;
    // A connect from here would be steered to the proxy and succeed before the app listens: look
    // for the app's listening socket instead.
    let end = Instant::now() + Duration::from_secs(10);
    while !listening(DEMO_IP, 443) {
        if Instant::now() > end {
            let _ = app.kill();
            bail!("the demo app did not listen; see target/sluice-up/demo-app.log");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // A cgroup inside the agent's steered cgroup (the v2 root by default).
    let cgroup = cgroup2_mount()?.join(DEMO_CGROUP);
    fs::create_dir_all(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
    let d = Demo {
        cgroup: cgroup.clone(),
        ca: dir.join("ca.pem"),
        base: "https://files.test".into(),
    };
    let result = scenarios(&d, &fx, &dir, root).and_then(|()| adaptive(&d, &fx, &dir));
    let _ = app.kill();
    let _ = app.wait();
    let _ = fs::remove_dir(&cgroup);
    result?;
    eprintln!(
        "\nThe events are in the portal: https://{COLLECTOR_ADDR}/events (try the query `app:files since:1h`)."
    );
    Ok(())
}

/// Whether a TCP socket listens on `ip:port` (IPv4), from `/proc/net/tcp`.
fn listening(ip: &str, port: u16) -> bool {
    let Ok(addr) = ip.parse::<std::net::Ipv4Addr>() else {
        return false;
    };
    // The kernel prints the address as the hex of its in-memory (network order) u32, read as a
    // little-endian number, and the port in host order.
    let want = format!("{:08X}:{port:04X}", u32::from_le_bytes(addr.octets()));
    fs::read_to_string("/proc/net/tcp").is_ok_and(|t| {
        t.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&want.as_str()) && f.get(3) == Some(&"0A")
        })
    })
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on
/// hybrid systems).
fn cgroup2_mount() -> Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next() == Some("cgroup2"))
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
        .context("no cgroup v2 hierarchy is mounted")
}

fn scenarios(d: &Demo, fx: &Path, dir: &Path, root: &Path) -> Result<()> {
    let up = |token: &str, file: &Path| -> Result<(u16, String)> {
        d.curl(&[
            "-H",
            &format!("authorization: Bearer {token}"),
            "-H",
            "accept: application/json",
            "-F",
            &format!("file=@{}", file.display()),
            &format!("{}/upload", d.base),
        ])
    };
    step("1. alice uploads an unlabeled document");
    let alice = d.login("alice")?;
    let (code, _) = up(&alice, &fx.join("plain.docx"))?;
    report(
        "unlabeled upload",
        "blocked (403) with a message on how to label it",
        code,
        code == 403,
    );

    step("2. alice uploads a labeled document");
    let (code, body) = up(&alice, &fx.join("confidential.docx"))?;
    report("labeled upload", "accepted (201)", code, code == 201);
    let (_, hc_body) = up(&alice, &fx.join("highly-confidential.docx"))?;
    let hc: serde_json::Value = serde_json::from_str(&hc_body).unwrap_or_default();
    let _ = body;

    step("3. a Highly Confidential download (encrypted on unmanaged devices)");
    let hc_out = dir.join("demo-highly-confidential.docx");
    let mut hc_release = None;
    if let Some(id) = hc["id"].as_str() {
        let head = dir.join("demo-hc.head");
        let (code, _) = d.curl(&[
            "-H",
            &format!("authorization: Bearer {alice}"),
            "-D",
            &head.display().to_string(),
            "-o",
            &hc_out.display().to_string(),
            &format!("{}/files/{id}/download", d.base),
        ])?;
        hc_release = release_of(&head);
        let encrypted = fs::read(&hc_out).is_ok_and(|b| b.starts_with(&[0xd0, 0xcf, 0x11, 0xe0]));
        report(
            "download",
            "200; encrypted when `up` runs with --unmanaged (a managed device gets it as stored)",
            code,
            code == 200,
        );
        match &hc_release {
            Some(r) if encrypted => eprintln!(
                "  the file is encrypted ({}); its password: https://{COLLECTOR_ADDR}/files/{r}",
                hc_out.display()
            ),
            _ => eprintln!("  delivered as stored (a managed device): nothing to release"),
        }
    } else {
        eprintln!("  the Highly Confidential upload was not stored ({hc_body}); skipped");
    }

    step("4. carol (a guest) downloads a file: encrypted for her alone, view-only");
    let carol = d.login("carol")?;
    let files = d.curl(&[
        "-H",
        &format!("authorization: Bearer {carol}"),
        &format!("{}/api/files", d.base),
    ])?;
    let list: serde_json::Value = serde_json::from_str(&files.1).unwrap_or_default();
    match list["files"].as_array().and_then(|a| a.first()) {
        Some(f) => {
            let id = f["id"].as_str().unwrap_or_default();
            let head = dir.join("demo-guest.head");
            let (code, _) = d.curl(&[
                "-H",
                &format!("authorization: Bearer {carol}"),
                "-D",
                &head.display().to_string(),
                "-o",
                "/dev/null",
                &format!("{}/files/{id}/download", d.base),
            ])?;
            report(
                "guest download",
                "200, encrypted, view-only, only carol gets its password (403 for a type that cannot be protected)",
                code,
                code == 200 || code == 403,
            );
            if let Some(r) = release_of(&head) {
                eprintln!("  carol's link: https://{COLLECTOR_ADDR}/files/{r}");
            }
        }
        None => eprintln!("  no file to download ({})", files.1),
    }

    step("5. bob posts a form with card numbers");
    let bob = d.login("bob")?;
    let (code, _) = d.curl(&[
        "-H",
        &format!("authorization: Bearer {bob}"),
        "--data-urlencode",
        &format!("with@{}", fx.join("cards.txt").display()),
        &format!("{}/files/1/share", d.base),
    ])?;
    report("card numbers in a form", "blocked (403)", code, code == 403);

    step("6. key release in the portal (the organisation's sign-in, as a browser would)");
    let Some(release) = hc_release else {
        eprintln!("  no protected file to release (run `cargo xtask up --unmanaged`)");
        return Ok(());
    };
    // The agent ships the event within seconds.
    let bob = Portal::sign_in(dir, "bob@corp.example")?;
    let end = Instant::now() + Duration::from_secs(30);
    let (code, password) = loop {
        let got = bob.reveal(&release)?;
        if got.1.is_some() || Instant::now() > end {
            break got;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    report(
        "bob (of the organisation) asks for the password",
        "200 and the password",
        code,
        password.is_some(),
    );
    if let Some(pw) = &password {
        let python = root.join("target/pyenv/bin/python");
        let opened = Command::new(&python)
            .args([
                "-c",
                "import io, sys, msoffcrypto\n\
                 f = msoffcrypto.OfficeFile(open(sys.argv[1], 'rb'))\n\
                 f.load_key(password=sys.argv[2], verify_password=True)\n\
                 f.decrypt(io.BytesIO())\n",
            ])
            .arg(&hc_out)
            .arg(pw)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        eprintln!(
            "  {} the password opens {} (msoffcrypto-tool)",
            if opened { "✔" } else { "✘" },
            hc_out.display()
        );
    }
    let carol_portal = Portal::sign_in(dir, "carol@corp.example")?;
    let (code, password) = carol_portal.reveal(&release)?;
    report(
        "carol (a guest) asks for the same password",
        "refused (403)",
        code,
        code == 403 && password.is_none(),
    );
    eprintln!(
        "  in a browser: https://{COLLECTOR_ADDR}/files/{release} (\"Sign in with your organisation\", bob / demo)"
    );
    Ok(())
}

/// Step 7: a mass download raises an alert that pauses the user's sensitive downloads on the
/// agent until an admin resolves it in the portal.
fn adaptive(d: &Demo, fx: &Path, dir: &Path) -> Result<()> {
    step("7. bob downloads ten Confidential files in a row: an alert, and his downloads pause");
    let alice = d.login("alice")?;
    let (_, body) = d.curl(&[
        "-H",
        &format!("authorization: Bearer {alice}"),
        "-H",
        "accept: application/json",
        "-F",
        &format!("file=@{}", fx.join("confidential.docx").display()),
        &format!("{}/upload", d.base),
    ])?;
    let stored: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let Some(id) = stored["id"].as_str() else {
        eprintln!("  the Confidential upload was not stored ({body}); skipped");
        return Ok(());
    };
    let bob = d.login("bob")?;
    let download = |token: &str| -> Result<(u16, String)> {
        d.curl(&[
            "-H",
            &format!("authorization: Bearer {token}"),
            "-H",
            "accept: text/plain",
            &format!("{}/files/{id}/download", d.base),
        ])
    };
    let mut passed = 0;
    for _ in 0..10 {
        if download(&bob)?.0 == 200 {
            passed += 1;
        }
    }
    eprintln!("  {passed} of 10 downloads delivered");
    let end = Instant::now() + Duration::from_secs(10);
    let (code, text) = loop {
        let got = download(&bob)?;
        if got.0 == 403 || Instant::now() > end {
            break got;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    report(
        "bob's next Confidential download",
        "blocked (403) within seconds, naming the alert",
        code,
        code == 403,
    );
    if let Some(line) = text.lines().find(|l| l.contains("alert")) {
        eprintln!("  {line}");
    }
    let (code, _) = download(&alice)?;
    report("alice downloads the same file", "200", code, code == 200);

    step("8. dana (an admin) resolves the alert in the portal: bob's downloads resume");
    let dana = Portal::sign_in(dir, "dana@corp.example")?;
    let (_, page) = dana.get("/alerts?user=bob%40corp.example&state=open")?;
    let Some(alert) = between(&page, "<a href=\"/alerts/", "\"") else {
        eprintln!("  no open alert for bob in the portal");
        return Ok(());
    };
    let (_, page) = dana.get(&format!("/alerts/{alert}"))?;
    let csrf = between(&page, "name=\"csrf\" value=\"", "\"").unwrap_or_default();
    let (code, _, _) = dana.curl(
        &dana.collector_ca,
        &[
            "--data",
            &format!("csrf={csrf}&state=resolved"),
            &format!("https://{COLLECTOR_ADDR}/alerts/{alert}/state"),
        ],
    )?;
    report(
        "resolve the alert",
        "303 to the alert's page",
        code,
        code == 303,
    );
    let end = Instant::now() + Duration::from_secs(10);
    let code = loop {
        let (code, _) = download(&bob)?;
        if code == 200 || Instant::now() > end {
            break code;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    report("bob downloads again", "200", code, code == 200);
    eprintln!("  the alert: https://{COLLECTOR_ADDR}/alerts/{alert} (sign in as dana / demo)");
    Ok(())
}

/// The release id a protected download's response names (`sluice-protected`), from a header
/// dump.
fn release_of(head: &Path) -> Option<String> {
    fs::read_to_string(head).ok()?.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("sluice-protected")
            .then(|| v.trim().to_owned())
    })
}
