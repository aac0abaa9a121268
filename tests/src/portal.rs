//! A collector whose portal signs people in at the test identity provider, and the browser
//! steps of that sign-in, for the end-to-end tests that go through the portal.

use std::{
    fs,
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::json;

use crate::{
    bin,
    browser::{Browser, Cdp},
    free_port,
    idp::Idp,
    wait_until,
};

/// The portal's session cookie.
pub const SESSION_COOKIE: &str = "__Host-sluice-session";

/// A running `sluice-collector` (killed when dropped).
#[derive(Debug)]
pub struct Collector {
    /// The process.
    pub child: Child,
    /// `https://127.0.0.1:PORT`.
    pub base: String,
    /// The collector's CA (PEM).
    pub ca: PathBuf,
    /// Its log (stderr).
    pub log: PathBuf,
    /// Its configuration file.
    pub config: PathBuf,
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Collector {
    /// What it logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `sluice-collector --config CONFIG ARGS` (the CLI, on the same state directory);
    /// its standard output.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(bin("sluice-collector"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "sluice-collector {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Starts a collector in `dir` whose portal signs people in at `idp` as `client_id` (with the
/// secret in `secret_file` when given); `group:sluice-admins` gets the admin pages.
pub fn start_collector(
    dir: &Path,
    idp: &Idp,
    client_id: &str,
    secret_file: Option<&Path>,
) -> Result<Collector> {
    start_collector_with(dir, idp, client_id, secret_file, "")
}

/// [`start_collector`] with `extra` top-level configuration lines (e.g. `bundle_public_key`).
pub fn start_collector_with(
    dir: &Path,
    idp: &Idp,
    client_id: &str,
    secret_file: Option<&Path>,
    extra: &str,
) -> Result<Collector> {
    let state = dir.join("state");
    let cfg = dir.join("collector.toml");
    // The callback URL is registered before the collector runs, so its port is chosen here.
    let port = free_port();
    let secret = secret_file
        .map(|f| format!("client_secret_file = \"{}\"\n", f.display()))
        .unwrap_or_default();
    fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{port}\"\nstate_dir = \"{}\"\n{extra}\n[portal.oidc]\n\
             issuer = \"{}\"\nclient_id = \"{client_id}\"\n{secret}\
             redirect_url = \"https://127.0.0.1:{port}/auth/oidc/callback\"\n\
             ca_file = \"{}\"\nadmins = [\"group:sluice-admins\", \"alice@corp.example\"]\n",
            state.display(),
            idp.issuer(),
            idp.ca_file().display()
        ),
    )?;
    run_collector(dir, &cfg, port)
}

/// Starts a collector in `dir` without a sign-in provider, configured with `extra` (top-level
/// lines, then any tables), on a free port.
pub fn start_plain(dir: &Path, extra: &str) -> Result<Collector> {
    let cfg = write_plain_config(dir, extra)?;
    let port = cfg.1;
    run_collector(dir, &cfg.0, port)
}

/// Writes `dir/collector.toml` for [`start_plain`] (listen on a free port, state in
/// `dir/state`); returns it and the port.
pub fn write_plain_config(dir: &Path, extra: &str) -> Result<(PathBuf, u16)> {
    let cfg = dir.join("collector.toml");
    let port = free_port();
    fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{port}\"\nstate_dir = \"{}\"\n{extra}\n",
            dir.join("state").display()
        ),
    )?;
    Ok((cfg, port))
}

/// Runs the collector configured by `cfg` (state in `dir/state`, listening on `port`) and waits
/// until it listens.
pub fn run_collector(dir: &Path, cfg: &Path, port: u16) -> Result<Collector> {
    let state = dir.join("state");
    let cfg = cfg.to_owned();
    let log = dir.join("collector.log");
    let child = Command::new(bin("sluice-collector"))
        .args(["run", "--config"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log)?)
        .spawn()?;
    let mut c = Collector {
        child,
        base: format!("https://127.0.0.1:{port}"),
        ca: state.join("tls/ca.pem"),
        log,
        config: cfg,
    };
    let mut exited = false;
    wait_until(Duration::from_secs(20), || {
        exited = c.child.try_wait().ok().flatten().is_some();
        exited
            || (state.join("listen.addr").exists()
                && TcpStream::connect(("127.0.0.1", port)).is_ok())
    });
    if exited || TcpStream::connect(("127.0.0.1", port)).is_err() {
        bail!("the collector did not listen: {}", c.log());
    }
    c.ca = crate::readable_copy(&c.ca, &dir.join("collector-ca.pem"))?;
    Ok(c)
}

/// The browser's portal session cookie, if it holds one (none also when the browser cannot
/// say).
pub fn session(cdp: &mut Cdp, c: &Collector) -> Option<String> {
    let cookies = cdp
        .call("Network.getCookies", json!({ "urls": [c.base.clone()] }))
        .ok()?;
    cookies["cookies"]
        .as_array()?
        .iter()
        .find(|k| k["name"] == SESSION_COOKIE)
        .map(|k| k["value"].as_str().unwrap_or_default().to_owned())
}

/// From the portal's sign-in page to the provider's form, and submits it with `email` and
/// `password` (or cancels when `password` is `None`). The page loaded next is the provider's
/// (a refused password) or the portal's callback.
pub fn sign_in(
    cdp: &mut Cdp,
    c: &Collector,
    idp: &Idp,
    email: &str,
    password: Option<&str>,
) -> Result<()> {
    cdp.navigate(&format!("{}/login", c.base))?;
    cdp.click_and_wait_load("#oidc-sign-in")?;
    let url = cdp.url()?;
    if !url.starts_with(&format!("{}/authorize?", idp.issuer())) {
        bail!("not at the provider's form: {url}");
    }
    cdp.fill("input[name=email]", email)?;
    match password {
        Some(p) => {
            cdp.fill("input[name=password]", p)?;
            cdp.click_and_wait_load("#sign-in")?;
        }
        None => cdp.click_and_wait_load("#cancel")?,
    }
    Ok(())
}

/// Waits until the page at `path` has loaded (the callback page moves on by itself).
pub fn wait_at(cdp: &mut Cdp, path: &str) -> Result<()> {
    cdp.wait_for(
        &format!(
            "document.readyState === 'complete' && location.pathname === {}",
            serde_json::to_string(path)?
        ),
        Duration::from_secs(20),
    )
    .map(drop)
    .with_context(|| format!("waiting for {path}"))
}

/// A headless Chromium trusting the collector's and the provider's CAs, with a DevTools session.
pub fn browser(dir: &Path, c: &Collector, idp: &Idp) -> Result<Cdp> {
    let b = Browser::new(&dir.join("profile"), Some(&c.ca))?;
    b.trust(idp.ca_file())?;
    Cdp::launch(&b)
}
