//! A PostgreSQL cluster of its own, made from the system's packages (Debian's `postgresql`):
//! for `cargo xtask up --postgres`, `sluice-collector-bench --postgres` and the tests. It listens
//! only on a Unix socket in its own directory and trusts whoever can reach that socket, so it is
//! for one machine's development and measurements; production runs PostgreSQL as the
//! organisation runs it (see the README's "Several collectors on PostgreSQL").
//!
//! PostgreSQL refuses to run as root: when started by root, the cluster runs as the `postgres`
//! user that the package creates, and its directories belong to that user.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Errors of the local cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No PostgreSQL server binaries.
    #[error(
        "no PostgreSQL server found under /usr/lib/postgresql/*/bin (install Debian's \
         `postgresql` package: `apt-get install postgresql`)"
    )]
    NotInstalled,
    /// A step failed.
    #[error("{0}")]
    Failed(String),
}

/// A running cluster; stopped (fast shutdown) when dropped.
#[derive(Debug)]
pub struct LocalCluster {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

/// The newest installed PostgreSQL's `bin` directory.
pub fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("postgres").exists() && bin.join("initdb").exists()).then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

/// The uid and gid of `name` in `/etc/passwd`.
fn user_ids(name: &str) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn failed(what: &str) -> impl Fn(std::io::Error) -> ClusterError + '_ {
    move |e| ClusterError::Failed(format!("{what}: {e}"))
}

impl LocalCluster {
    /// Makes a cluster in `dir` (which must not hold one yet, or holds one made by this) and
    /// starts it on a socket in `dir/socket` with `port` naming the socket; `settings` are
    /// server settings (`name`, `value`).
    pub fn start(dir: &Path, port: u16, settings: &[(&str, &str)]) -> Result<Self, ClusterError> {
        crate::db::blocking(|| Self::start_here(dir, port, settings))
    }

    fn start_here(dir: &Path, port: u16, settings: &[(&str, &str)]) -> Result<Self, ClusterError> {
        let bin = bin_dir().ok_or(ClusterError::NotInstalled)?;
        // The server runs in `dir`: its paths must not be relative to ours.
        let dir = &std::path::absolute(dir).map_err(failed("resolving the cluster's directory"))?;
        let owner = if is_root() {
            Some(user_ids("postgres").ok_or_else(|| {
                ClusterError::Failed(
                    "running as root, but there is no `postgres` user to run PostgreSQL as \
                     (Debian's postgresql package makes it)"
                        .into(),
                )
            })?)
        } else {
            None
        };
        let data = dir.join("data");
        let socket = dir.join("socket");
        for d in [dir, &socket] {
            std::fs::create_dir_all(d).map_err(failed("making the cluster's directory"))?;
            if let Some((u, g)) = owner {
                std::os::unix::fs::chown(d, Some(u), Some(g))
                    .map_err(failed("handing the cluster's directory to postgres"))?;
            }
        }
        if let Some((u, g)) = owner {
            use std::os::unix::process::CommandExt as _;
            let reachable = Command::new("test")
                .arg("-w")
                .arg(dir)
                .uid(u)
                .gid(g)
                .status()
                .is_ok_and(|s| s.success());
            if !reachable {
                return Err(ClusterError::Failed(format!(
                    "the postgres user cannot reach {} (a directory above it is closed to other \
                     users): put the cluster where other users may traverse",
                    dir.display()
                )));
            }
        }
        let command = |prog: &str| {
            let mut c = Command::new(bin.join(prog));
            if let Some((u, g)) = owner {
                use std::os::unix::process::CommandExt as _;
                c.uid(u).gid(g);
            }
            c.current_dir(dir);
            c
        };
        if !data.join("PG_VERSION").exists() {
            let out = command("initdb")
                .args([
                    "--auth=trust",
                    "--username=sluice",
                    "--encoding=UTF8",
                    "--no-locale",
                ])
                .arg("-D")
                .arg(&data)
                .stdin(Stdio::null())
                .output()
                .map_err(failed("running initdb"))?;
            if !out.status.success() {
                return Err(ClusterError::Failed(format!(
                    "initdb failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
        }
        let log = std::fs::File::create(dir.join("postgres.log"))
            .map_err(failed("making the server's log"))?;
        if let Some((u, g)) = owner {
            std::os::unix::fs::chown(dir.join("postgres.log"), Some(u), Some(g))
                .map_err(failed("handing the log to postgres"))?;
        }
        let mut cmd = command("postgres");
        cmd.arg("-D").arg(&data).arg("-k").arg(&socket).args([
            "-p",
            &port.to_string(),
            "-c",
            "listen_addresses=",
        ]);
        for (k, v) in settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        let err = log.try_clone().map_err(failed("opening the log"))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(failed("starting postgres"))?;
        let mut me = Self {
            dir: dir.to_owned(),
            port,
            child: Some(child),
        };
        me.wait_ready()?;
        Ok(me)
    }

    fn wait_ready(&mut self) -> Result<(), ClusterError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                let log =
                    std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default();
                return Err(ClusterError::Failed(format!(
                    "postgres exited ({status}): {}",
                    log.trim()
                )));
            }
            match self.conninfo("postgres").parse::<postgres::Config>() {
                Ok(cfg) if cfg.connect(postgres::NoTls).is_ok() => return Ok(()),
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::Failed(
                    "postgres did not accept connections within 60 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A cluster that also listens on a free loopback TCP port with TLS on, presenting the
    /// certificate chain `cert_pem` with the key `key_pem` (written into `dir`, the key 0600 and
    /// the server's); [`LocalCluster::tcp_conninfo`] reaches it there.
    pub fn start_tls(dir: &Path, cert_pem: &str, key_pem: &str) -> Result<Self, ClusterError> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(failed("finding a free port"))?
            .port();
        std::fs::create_dir_all(dir).map_err(failed("making the cluster's directory"))?;
        let dir = std::path::absolute(dir).map_err(failed("resolving the cluster's directory"))?;
        let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
        std::fs::write(&cert, cert_pem).map_err(failed("writing the certificate"))?;
        std::fs::write(&key, key_pem).map_err(failed("writing the key"))?;
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
                .map_err(failed("protecting the key"))?;
        }
        if is_root() {
            let (u, g) = user_ids("postgres")
                .ok_or_else(|| ClusterError::Failed("no `postgres` user".into()))?;
            for f in [&cert, &key] {
                std::os::unix::fs::chown(f, Some(u), Some(g))
                    .map_err(failed("handing the certificate to postgres"))?;
            }
        }
        let (cert, key) = (cert.display().to_string(), key.display().to_string());
        Self::start(
            &dir,
            port,
            &[
                ("listen_addresses", "127.0.0.1"),
                ("ssl", "on"),
                ("ssl_cert_file", &cert),
                ("ssl_key_file", &key),
            ],
        )
    }

    /// The connection string for database `db` over TCP to `host` (the cluster of
    /// [`LocalCluster::start_tls`]), with `extra` `key=value` pairs.
    pub fn tcp_conninfo(&self, host: &str, db: &str, extra: &str) -> String {
        format!(
            "host={host} port={} user=sluice dbname={db} {extra}",
            self.port
        )
    }

    /// The connection string for database `db` as the cluster's superuser `sluice`.
    pub fn conninfo(&self, db: &str) -> String {
        format!(
            "host={} port={} user=sluice dbname={db}",
            self.dir.join("socket").display(),
            self.port
        )
    }

    /// Creates database `name` (a plain identifier), unless it exists.
    pub fn create_database(&self, name: &str) -> Result<(), ClusterError> {
        crate::db::blocking(|| self.create_database_here(name))
    }

    fn create_database_here(&self, name: &str) -> Result<(), ClusterError> {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(ClusterError::Failed(format!("bad database name {name:?}")));
        }
        let pg = |e: postgres::Error| ClusterError::Failed(format!("postgresql: {e}"));
        let mut c = self
            .conninfo("postgres")
            .parse::<postgres::Config>()
            .map_err(pg)?
            .connect(postgres::NoTls)
            .map_err(pg)?;
        let exists = c
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
            .map_err(pg)?
            .is_some();
        if !exists {
            c.batch_execute(&format!("CREATE DATABASE {name}"))
                .map_err(pg)?;
        }
        Ok(())
    }

    /// The cluster's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops the server (fast shutdown: open transactions are rolled back).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop();
    }
}
