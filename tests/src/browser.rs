//! Headless Chromium for tests that involve a page: one-shot runs (`--dump-dom`, `--screenshot`)
//! and a small Chrome DevTools Protocol client for scripted sessions (log in, click, type, read
//! the DOM, take screenshots).
//!
//! A [`Browser`] is a private profile directory: Chromium's `--user-data-dir` lives in it, and it
//! is the `HOME` Chromium runs with, so the NSS database Chromium reads trust anchors from
//! (`$HOME/.pki/nssdb`) is the profile's own. A test CA is trusted by adding it there with
//! `certutil` (package `libnss3-tools`), which is how a person trusts a CA on Linux; nothing runs
//! with `--ignore-certificate-errors`, so a test through the browser checks the certificate chain
//! the way a user's browser would.
//!
//! The DevTools client ([`Cdp`]) speaks over `--remote-debugging-pipe`: Chromium reads
//! NUL-terminated JSON messages on its fd 3 and writes them on its fd 4. The harness hands it the
//! two pipes as stdin and stdout of a tiny `sh` wrapper that moves them to fds 3 and 4 before
//! `exec`, so no WebSocket library and no `unsafe` `pre_exec` are needed, and the same command can
//! be wrapped to run inside a cgroup ([`Browser::in_cgroup`]).
//!
//! Every run is bounded: one-shot runs and each DevTools call have a deadline, and Chromium is
//! started in a process group of its own that is killed whole when a run times out, when
//! [`Cdp::close`] finds it still running, or when a [`Cdp`] is dropped. Chromium runs with
//! `--no-sandbox` (tests run as root, where Chromium's sandbox refuses to start).

use std::{
    collections::VecDeque,
    fs,
    io::{Read as _, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::InCgroup;

/// How long a one-shot run or a DevTools session waits for anything by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// The default virtual-time budget of [`Browser::dump_dom`] (time for the page's scripts and
/// the requests they start).
pub const DEFAULT_BUDGET: Duration = Duration::from_secs(5);
/// The default window (and viewport) size.
pub const DEFAULT_WINDOW: (u32, u32) = (1280, 800);
/// The condition [`Browser::run_page`] waits for: the page navigated away from its `file:` URL
/// and the new document loaded, or the page set `window.sluiceDone = true`.
pub const NAVIGATED_OR_DONE: &str = "(location.protocol !== 'file:' && document.readyState === 'complete') || window.sluiceDone === true";

/// The largest DevTools message accepted (a full-page screenshot is a few MiB of base64).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// DevTools events kept for [`Cdp::wait_event`] (the oldest are dropped beyond it).
const MAX_EVENTS: usize = 10_000;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A headless Chromium with a private profile (see the module doc).
#[derive(Debug, Clone)]
pub struct Browser {
    program: PathBuf,
    profile: PathBuf,
    host_rules: Vec<String>,
    wrapper: Option<InCgroup>,
    timeout: Duration,
    budget: Duration,
    window: (u32, u32),
    extra_args: Vec<String>,
}

/// The Chromium binary: Debian's real executable (its `/usr/bin/chromium` launcher script adds
/// flags of its own and is fragile), else whatever `chromium`-like program is on `PATH`.
pub fn chromium_program() -> Result<PathBuf> {
    let direct = Path::new("/usr/lib/chromium/chromium");
    if direct.is_file() {
        return Ok(direct.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    bail!(
        "Chromium is not installed: `apt-get install chromium libnss3-tools` (`cargo xtask setup` does it)"
    )
}

impl Browser {
    /// A browser whose profile (user data, `HOME`, NSS database) is `profile_dir` (created), with
    /// `trust_ca` (a PEM file) added to its NSS database as a trusted CA for TLS servers.
    pub fn new(profile_dir: &Path, trust_ca: Option<&Path>) -> Result<Self> {
        let program = chromium_program()?;
        fs::create_dir_all(profile_dir)
            .with_context(|| format!("creating {}", profile_dir.display()))?;
        let profile = profile_dir
            .canonicalize()
            .with_context(|| format!("resolving {}", profile_dir.display()))?;
        let browser = Self {
            program,
            profile,
            host_rules: Vec::new(),
            wrapper: None,
            timeout: DEFAULT_TIMEOUT,
            budget: DEFAULT_BUDGET,
            window: DEFAULT_WINDOW,
            extra_args: Vec::new(),
        };
        browser.init_nssdb()?;
        if let Some(ca) = trust_ca {
            browser.trust(ca)?;
        }
        Ok(browser)
    }

    /// The profile directory.
    pub fn profile(&self) -> &Path {
        &self.profile
    }

    /// The NSS database directory (`<profile>/.pki/nssdb`).
    pub fn nssdb(&self) -> PathBuf {
        self.profile.join(".pki/nssdb")
    }

    fn certutil(&self) -> Command {
        let mut c = Command::new("certutil");
        c.arg("-d")
            .arg(format!("sql:{}", self.nssdb().display()))
            .stdin(Stdio::null());
        c
    }

    fn init_nssdb(&self) -> Result<()> {
        let db = self.nssdb();
        if db.join("cert9.db").is_file() {
            return Ok(());
        }
        fs::create_dir_all(&db).with_context(|| format!("creating {}", db.display()))?;
        run_tool(self.certutil().args(["-N", "--empty-password"]))
            .context("creating the profile's NSS database (is libnss3-tools installed?)")
    }

    /// Trusts one more CA (PEM file) for TLS servers in this profile.
    pub fn trust(&self, ca_pem: &Path) -> Result<()> {
        let pem = fs::read(ca_pem).with_context(|| format!("reading {}", ca_pem.display()))?;
        let nick = format!(
            "sluice-test-{}",
            &crate::hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &pem).as_ref())[..16]
        );
        run_tool(
            self.certutil()
                .args(["-A", "-t", "C,,", "-n", &nick, "-i"])
                .arg(ca_pem),
        )
        .with_context(|| format!("trusting {} in the profile", ca_pem.display()))
    }

    /// Adds a host resolver rule (`--host-resolver-rules`), e.g. `MAP files.test 127.0.0.41`.
    pub fn host_rules(&mut self, rule: &str) -> &mut Self {
        self.host_rules.push(rule.to_owned());
        self
    }

    /// Runs Chromium inside a cgroup (optionally as another user) from its first instruction.
    pub fn in_cgroup(&mut self, how: InCgroup) -> &mut Self {
        self.wrapper = Some(how);
        self
    }

    /// The deadline of one-shot runs and of each DevTools wait (default [`DEFAULT_TIMEOUT`]).
    pub fn timeout(&mut self, timeout: Duration) -> &mut Self {
        self.timeout = timeout;
        self
    }

    /// The virtual-time budget of [`Browser::dump_dom`] (default [`DEFAULT_BUDGET`]).
    pub fn budget(&mut self, budget: Duration) -> &mut Self {
        self.budget = budget;
        self
    }

    /// The window and viewport size (default [`DEFAULT_WINDOW`]).
    pub fn window_size(&mut self, width: u32, height: u32) -> &mut Self {
        self.window = (width, height);
        self
    }

    /// One more command-line argument for every run.
    pub fn arg(&mut self, arg: &str) -> &mut Self {
        self.extra_args.push(arg.to_owned());
        self
    }

    /// The arguments every run gets (before the run's own).
    pub fn base_args(&self) -> Vec<String> {
        let (w, h) = self.window;
        let mut args = vec![
            "--headless=new".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            format!("--user-data-dir={}", self.profile.join("chromium").display()),
            "--no-first-run".to_owned(),
            "--no-default-browser-check".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-extensions".to_owned(),
            "--disable-default-apps".to_owned(),
            "--metrics-recording-only".to_owned(),
            "--password-store=basic".to_owned(),
            "--use-mock-keychain".to_owned(),
            "--mute-audio".to_owned(),
            "--hide-scrollbars".to_owned(),
            // A test page on file:// or a public name talks to loopback addresses on purpose.
            "--disable-features=HttpsUpgrades,LocalNetworkAccessChecks,PrivateNetworkAccessSendPreflights,PrivateNetworkAccessRespectPreflightResults,MediaRouter,Translate".to_owned(),
            format!("--window-size={w},{h}"),
        ];
        if !self.host_rules.is_empty() {
            args.push(format!(
                "--host-resolver-rules={}",
                self.host_rules.join(", ")
            ));
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// The Chromium command with [`Browser::base_args`], the profile's environment and the cgroup
    /// wrapper applied, in a process group of its own; add the run's arguments and spawn it.
    pub fn command(&self) -> Command {
        self.build(&[], false)
    }

    fn build(&self, extra: &[String], pipe: bool) -> Command {
        let mut args: Vec<String> = self.base_args();
        args.extend(extra.iter().cloned());
        let (program, args) = if pipe {
            // fds 0 and 1 (the harness's pipes) become Chromium's fds 3 and 4.
            let mut a = vec![
                "-c".to_owned(),
                "exec \"$@\" 3<&0 4>&1 </dev/null >/dev/null".to_owned(),
                "sh".to_owned(),
                self.program.display().to_string(),
            ];
            a.extend(args);
            (PathBuf::from("/bin/sh"), a)
        } else {
            (self.program.clone(), args)
        };
        let mut cmd = match &self.wrapper {
            Some(w) => w.command(&program, &args),
            None => {
                let mut c = Command::new(&program);
                c.args(&args);
                c
            }
        };
        cmd.env("HOME", &self.profile)
            .env("XDG_CONFIG_HOME", self.profile.join(".config"))
            .env("XDG_CACHE_HOME", self.profile.join(".cache"))
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .stdin(Stdio::null())
            .process_group(0);
        cmd
    }

    fn log_path(&self, what: &str) -> PathBuf {
        self.profile.join(format!(
            "chromium-{what}-{}.log",
            SEQ.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// Runs a one-shot Chromium with `extra` arguments to completion (bounded): its stdout.
    fn one_shot(&self, extra: &[String]) -> Result<Vec<u8>> {
        let log = self.log_path("run");
        let mut child = self
            .build(extra, false)
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("starting Chromium")?;
        let mut stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout pipe"))?;
        let reader = thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = (&mut stdout).take(MAX_MESSAGE as u64).read_to_end(&mut buf);
            buf
        });
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break Some(st);
            }
            if Instant::now() > deadline {
                break None;
            }
            thread::sleep(Duration::from_millis(25));
        };
        // Whatever Chromium left behind (helpers holding the pipe) goes with its group.
        kill_group(&mut child);
        let out = reader.join().unwrap_or_default();
        match status {
            None => bail!(
                "Chromium did not finish within {:?}: {}",
                self.timeout,
                log_tail(&log)
            ),
            Some(st) if !st.success() => {
                bail!("Chromium exited with {st}: {}", log_tail(&log))
            }
            Some(_) => Ok(out),
        }
    }

    /// Loads `url`, lets its scripts run for the virtual-time budget, and returns the DOM
    /// (`--dump-dom`).
    pub fn dump_dom(&self, url: &str) -> Result<String> {
        let out = self.one_shot(&[
            "--dump-dom".to_owned(),
            format!("--virtual-time-budget={}", self.budget.as_millis()),
            url.to_owned(),
        ])?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Loads `url` in a `width`×`height` window and writes a PNG screenshot of it to `out_png`
    /// (`--screenshot`); checks that a PNG of that size was written.
    pub fn screenshot(&self, url: &str, out_png: &Path, width: u32, height: u32) -> Result<()> {
        let _ = fs::remove_file(out_png);
        let out_png = absolute(out_png)?;
        self.one_shot(&[
            format!("--screenshot={}", out_png.display()),
            format!("--window-size={width},{height}"),
            format!("--virtual-time-budget={}", self.budget.as_millis()),
            url.to_owned(),
        ])?;
        let size = png_size(&out_png)?;
        if size != (width, height) {
            bail!(
                "the screenshot {} is {}x{}, not {width}x{height}",
                out_png.display(),
                size.0,
                size.1
            );
        }
        Ok(())
    }

    /// Writes `html` to a file in the profile, loads it in a fresh browser session (the file's
    /// scripts run; e.g. they build a `File` with `DataTransfer` and submit a form), waits for
    /// [`NAVIGATED_OR_DONE`] and returns the final DOM (`document.documentElement.outerHTML`).
    ///
    /// A page on `file:` is cross-site to every server, so `SameSite=Lax`/`Strict` cookies are not
    /// sent with its POSTs; to script a page inside an app's origin (logged in), use
    /// [`Cdp::navigate`] then [`Cdp::run_in_origin`].
    pub fn run_page(&self, html: &str, timeout: Duration) -> Result<String> {
        let mut cdp = Cdp::launch(self)?;
        let dom = cdp.run_page(html, NAVIGATED_OR_DONE, timeout);
        let closed = cdp.close();
        let dom = dom?;
        closed?;
        Ok(dom)
    }

    /// Starts a DevTools session ([`Cdp::launch`]).
    pub fn cdp(&self) -> Result<Cdp> {
        Cdp::launch(self)
    }
}

/// Runs a small tool (certutil) to completion, failing with its stderr.
fn run_tool(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn absolute(p: &Path) -> Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    })
}

/// Kills the child's whole process group (it leads one) and reaps the child.
fn kill_group(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The last lines of a Chromium log, for error messages (D-Bus noise left out).
fn log_tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains("dbus") && !l.trim().is_empty())
        .collect();
    let start = lines.len().saturating_sub(15);
    format!("(log {}) {}", log.display(), lines[start..].join("\n"))
}

/// The width and height of a PNG file (from its IHDR chunk).
pub fn png_size(path: &Path) -> Result<(u32, u32)> {
    let mut head = [0u8; 24];
    fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .with_context(|| format!("reading {}", path.display()))?;
    if &head[..8] != b"\x89PNG\r\n\x1a\n" || &head[12..16] != b"IHDR" {
        bail!("{} is not a PNG", path.display());
    }
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    Ok((be(&head[16..20]), be(&head[20..24])))
}

/// A `file://` URL for an absolute path (bytes outside the unreserved set percent-encoded).
pub fn file_url(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt as _;
    let mut url = String::from("file://");
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            url.push(b as char);
        } else {
            url.push_str(&format!("%{b:02X}"));
        }
    }
    url
}

/// A JavaScript string literal for `s` (JSON is valid JavaScript).
pub fn js_string(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

// ---------------------------------------------------------------------------------------------
// DevTools over a pipe

/// A Chromium driven through the DevTools protocol over `--remote-debugging-pipe`, attached to
/// one page (tab) of its own. Calls block (with deadlines); usable from sync and async tests alike
/// (in an async test, from `spawn_blocking` or a multi-thread runtime).
#[derive(Debug)]
pub struct Cdp {
    child: Child,
    to_browser: Option<ChildStdin>,
    from_browser: mpsc::Receiver<Result<Value, String>>,
    reader: Option<thread::JoinHandle<()>>,
    next_id: u64,
    session: String,
    events: VecDeque<Value>,
    timeout: Duration,
    log: PathBuf,
    pages: PathBuf,
}

impl Cdp {
    /// Starts `browser`'s Chromium with a DevTools pipe, opens a page of its own sized to the
    /// browser's window, and attaches to it.
    pub fn launch(browser: &Browser) -> Result<Self> {
        let log = browser.log_path("cdp");
        let mut child = browser
            .build(
                &[
                    "--remote-debugging-pipe".to_owned(),
                    "about:blank".to_owned(),
                ],
                true,
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("starting Chromium")?;
        let to_browser = child.stdin.take();
        let stdout = child.stdout.take();
        let (tx, rx) = mpsc::channel();
        let reader = stdout.map(|out| thread::spawn(move || read_messages(out, tx)));
        let mut cdp = Self {
            child,
            to_browser,
            from_browser: rx,
            reader,
            next_id: 0,
            session: String::new(),
            events: VecDeque::new(),
            timeout: browser.timeout,
            log,
            pages: browser.profile.join("pages"),
        };
        let target = cdp
            .browser_call("Target.createTarget", json!({ "url": "about:blank" }))
            .context("Chromium did not answer on its DevTools pipe")?;
        let target_id = target["targetId"]
            .as_str()
            .ok_or_else(|| anyhow!("Target.createTarget answered without a targetId"))?
            .to_owned();
        let attached = cdp.browser_call(
            "Target.attachToTarget",
            json!({ "targetId": target_id, "flatten": true }),
        )?;
        cdp.session = attached["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow!("Target.attachToTarget answered without a sessionId"))?
            .to_owned();
        cdp.call("Page.enable", json!({}))?;
        let (w, h) = browser.window;
        cdp.set_viewport(w, h)?;
        Ok(cdp)
    }

    /// The deadline of each wait (from the browser's; changeable per session).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn send(&mut self, session: Option<&str>, method: &str, params: Value) -> Result<u64> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = Value::String(s.to_owned());
        }
        let mut bytes = serde_json::to_vec(&msg)?;
        bytes.push(0);
        let pipe = self
            .to_browser
            .as_mut()
            .ok_or_else(|| anyhow!("the DevTools session is closed"))?;
        pipe.write_all(&bytes)
            .and_then(|()| pipe.flush())
            .with_context(|| {
                format!("sending {method} (Chromium gone? {})", log_tail(&self.log))
            })?;
        Ok(id)
    }

    fn push_event(&mut self, ev: Value) {
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(ev);
    }

    /// Receives until the answer to `id` (events in between are kept).
    fn answer(&mut self, id: u64, method: &str) -> Result<Value> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("{method}: no answer within {:?}", self.timeout);
            }
            let msg = match self.from_browser.recv_timeout(left) {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => bail!("{method}: {e}"),
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!(
                        "{method}: Chromium closed its DevTools pipe: {}",
                        log_tail(&self.log)
                    )
                }
            };
            match msg.get("id").and_then(Value::as_u64) {
                Some(got) if got == id => {
                    if let Some(err) = msg.get("error") {
                        bail!("{method}: {err}");
                    }
                    return Ok(msg.get("result").cloned().unwrap_or(Value::Null));
                }
                Some(_) => {} // the late answer to a call that timed out
                None => self.push_event(msg),
            }
        }
    }

    /// A DevTools call on the browser target (no session), e.g. `Browser.getVersion`.
    pub fn browser_call(&mut self, method: &str, params: Value) -> Result<Value> {
        let id = self.send(None, method, params)?;
        self.answer(id, method)
    }

    /// A DevTools call on the page's session, e.g. `Page.reload`; returns its `result`.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        let session = self.session.clone();
        let id = self.send(Some(&session), method, params)?;
        self.answer(id, method)
    }

    /// Forgets the events received so far (before an action whose events are awaited).
    pub fn clear_events(&mut self) {
        while let Ok(msg) = self.from_browser.try_recv() {
            if let Ok(m) = msg
                && m.get("id").is_none()
            {
                self.push_event(m);
            }
        }
        self.events.clear();
    }

    /// Waits for an event of the page's session named `method` (received since the last
    /// [`Cdp::clear_events`]) and returns its `params`.
    pub fn wait_event(&mut self, method: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self.events.iter().position(|e| {
                e["method"] == method && e["sessionId"].as_str() == Some(&self.session)
            }) {
                let ev = self.events.remove(pos).unwrap_or(Value::Null);
                return Ok(ev.get("params").cloned().unwrap_or(Value::Null));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no {method} within {timeout:?}");
            }
            match self.from_browser.recv_timeout(left) {
                Ok(Ok(m)) if m.get("id").is_none() => self.push_event(m),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => bail!("waiting for {method}: {e}"),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!(
                    "waiting for {method}: Chromium closed its DevTools pipe: {}",
                    log_tail(&self.log)
                ),
            }
        }
    }

    /// Sets the viewport (CSS pixels, scale 1).
    pub fn set_viewport(&mut self, width: u32, height: u32) -> Result<()> {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        )?;
        Ok(())
    }

    /// Navigates the page to `url` and waits for its load event; a failed navigation (for
    /// example `net::ERR_CERT_AUTHORITY_INVALID`) is an error naming the reason.
    pub fn navigate(&mut self, url: &str) -> Result<()> {
        self.clear_events();
        let r = self.call("Page.navigate", json!({ "url": url }))?;
        if let Some(err) = r.get("errorText").and_then(Value::as_str)
            && !err.is_empty()
        {
            bail!("navigating to {url}: {err}");
        }
        let timeout = self.timeout;
        self.wait_event("Page.loadEventFired", timeout)
            .with_context(|| format!("loading {url}"))?;
        Ok(())
    }

    /// Evaluates `js` in the page (promises awaited, as a user gesture) and returns its value as
    /// JSON (`null` for `undefined`); a thrown exception is an error carrying its message.
    pub fn eval(&mut self, js: &str) -> Result<Value> {
        let r = self.call(
            "Runtime.evaluate",
            json!({
                "expression": js,
                "returnByValue": true,
                "awaitPromise": true,
                "userGesture": true,
            }),
        )?;
        if let Some(ex) = r.get("exceptionDetails") {
            let text = ex["exception"]["description"]
                .as_str()
                .or_else(|| ex["text"].as_str())
                .unwrap_or("exception");
            bail!("evaluating `{}`: {text}", abbreviate(js));
        }
        Ok(r["result"].get("value").cloned().unwrap_or(Value::Null))
    }

    /// Evaluates `js` every 100 ms until its value is truthy (and returns it), across navigations
    /// (errors while a new document loads count as "not yet"); an error after `timeout`.
    pub fn wait_for(&mut self, js: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            match self.eval(js) {
                Ok(v) if truthy(&v) => return Ok(v),
                Ok(v) => last = format!("last value {v}"),
                Err(e) => last = format!("last error {e:#}"),
            }
            if Instant::now() > deadline {
                let url = self
                    .eval("location.href")
                    .map(|v| v.to_string())
                    .unwrap_or_default();
                bail!(
                    "`{}` did not become true within {timeout:?} ({last}; page {url})",
                    abbreviate(js)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `js` (typically a click or a form submission) and waits for the next load event of
    /// the page (a navigation it caused).
    pub fn eval_and_wait_load(&mut self, js: &str) -> Result<Value> {
        self.clear_events();
        let v = self.eval(js)?;
        let timeout = self.timeout;
        self.wait_event("Page.loadEventFired", timeout)
            .with_context(|| format!("after `{}`", abbreviate(js)))?;
        Ok(v)
    }

    /// Sets the value of the element matched by a CSS `selector` (an input) and fires `input`
    /// and `change`, as typing would.
    pub fn fill(&mut self, selector: &str, value: &str) -> Result<()> {
        let js = format!(
            "(() => {{ const e = document.querySelector({s}); if (!e) throw new Error('no element ' + {s}); \
             e.focus(); e.value = {v}; e.dispatchEvent(new Event('input', {{bubbles: true}})); \
             e.dispatchEvent(new Event('change', {{bubbles: true}})); return true; }})()",
            s = js_string(selector),
            v = js_string(value)
        );
        self.eval(&js).map(drop)
    }

    /// Clicks the element matched by `selector` (without waiting for anything).
    pub fn click(&mut self, selector: &str) -> Result<()> {
        self.eval(&click_js(selector)).map(drop)
    }

    /// Clicks the element matched by `selector` and waits for the page it loads.
    pub fn click_and_wait_load(&mut self, selector: &str) -> Result<()> {
        self.eval_and_wait_load(&click_js(selector)).map(drop)
    }

    /// The `innerText` of the element matched by `selector` (an error when there is none).
    pub fn text(&mut self, selector: &str) -> Result<String> {
        let v = self.eval(&format!(
            "(() => {{ const e = document.querySelector({s}); if (!e) throw new Error('no element ' + {s}); return e.innerText; }})()",
            s = js_string(selector)
        ))?;
        Ok(v.as_str().unwrap_or_default().to_owned())
    }

    /// The page's URL.
    pub fn url(&mut self) -> Result<String> {
        Ok(self
            .eval("location.href")?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// The current DOM (`document.documentElement.outerHTML`).
    pub fn html(&mut self) -> Result<String> {
        Ok(self
            .eval("document.documentElement.outerHTML")?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// Writes `html` to a file in the profile, loads it in this page (cookies of this session
    /// kept), waits until `done_js` is truthy, and returns the final DOM.
    pub fn run_page(&mut self, html: &str, done_js: &str, timeout: Duration) -> Result<String> {
        fs::create_dir_all(&self.pages)?;
        let file = self.pages.join(format!(
            "page-{}-{}.html",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::write(&file, html).with_context(|| format!("writing {}", file.display()))?;
        let url = file_url(&file);
        let r = self.call("Page.navigate", json!({ "url": url }))?;
        if let Some(err) = r.get("errorText").and_then(Value::as_str)
            && !err.is_empty()
        {
            bail!("loading {url}: {err}");
        }
        self.wait_for(done_js, timeout)?;
        self.html()
    }

    /// Replaces the current document with `html` while keeping its URL and origin (so the
    /// page's scripts run as the app's own pages do: same-origin requests, `SameSite` cookies
    /// sent), waits until `done_js` is truthy and returns the final DOM.
    pub fn run_in_origin(
        &mut self,
        html: &str,
        done_js: &str,
        timeout: Duration,
    ) -> Result<String> {
        self.eval(&format!(
            "document.open(); document.write({}); document.close(); true",
            js_string(html)
        ))?;
        self.wait_for(done_js, timeout)?;
        self.html()
    }

    /// Writes a PNG screenshot of the viewport to `path`; returns its size.
    pub fn screenshot(&mut self, path: &Path) -> Result<(u32, u32)> {
        let r = self.call("Page.captureScreenshot", json!({ "format": "png" }))?;
        let data = r["data"]
            .as_str()
            .ok_or_else(|| anyhow!("Page.captureScreenshot answered without data"))?;
        let png = sluice_policy::bundle::jws::b64_decode(data)
            .ok_or_else(|| anyhow!("Page.captureScreenshot: bad base64"))?;
        fs::write(path, &png).with_context(|| format!("writing {}", path.display()))?;
        png_size(path)
    }

    /// Closes the browser (`Browser.close`, then the pipe), waits for it to exit (bounded) and
    /// kills its process group if anything is left.
    pub fn close(mut self) -> Result<()> {
        let polite = self.browser_call("Browser.close", json!({}));
        self.to_browser = None;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut exited = false;
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                exited = true;
                break;
            }
            thread::sleep(Duration::from_millis(25));
        }
        kill_group(&mut self.child);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        // Browser.close may lose its answer to the exit; only a browser that stayed is an error.
        if !exited {
            bail!(
                "Chromium did not exit after Browser.close ({:?}): {}",
                polite.err(),
                log_tail(&self.log)
            );
        }
        Ok(())
    }
}

impl Drop for Cdp {
    fn drop(&mut self) {
        self.to_browser = None;
        kill_group(&mut self.child);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

fn click_js(selector: &str) -> String {
    format!(
        "(() => {{ const e = document.querySelector({s}); if (!e) throw new Error('no element ' + {s}); e.click(); return true; }})()",
        s = js_string(selector)
    )
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

fn abbreviate(js: &str) -> String {
    let mut s: String = js.chars().take(120).collect();
    if s.len() < js.len() {
        s.push('…');
    }
    s
}

/// Splits Chromium's fd-4 stream into NUL-terminated JSON messages.
fn read_messages(mut from: impl std::io::Read, tx: mpsc::Sender<Result<Value, String>>) {
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut chunk = &buf[..n];
        while let Some(end) = memchr_nul(chunk) {
            pending.extend_from_slice(&chunk[..end]);
            chunk = &chunk[end + 1..];
            let msg = serde_json::from_slice::<Value>(&pending)
                .map_err(|e| format!("bad DevTools message: {e}"));
            pending.clear();
            if tx.send(msg).is_err() {
                return;
            }
        }
        pending.extend_from_slice(chunk);
        if pending.len() > MAX_MESSAGE {
            let _ = tx.send(Err(format!(
                "a DevTools message exceeds {MAX_MESSAGE} bytes"
            )));
            return;
        }
    }
}

fn memchr_nul(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == 0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn messages_split_on_nul_across_reads() {
        let (tx, rx) = mpsc::channel();
        let data: &[u8] = b"{\"id\":1}\0{\"method\":\"x\",\"params\":{}}\0{\"id\":";
        read_messages(data, tx);
        let got: Vec<_> = rx.iter().collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].as_ref().unwrap()["id"], 1);
        assert_eq!(got[1].as_ref().unwrap()["method"], "x");
    }

    #[test]
    fn bad_message_is_reported_not_fatal() {
        let (tx, rx) = mpsc::channel();
        read_messages(&b"nope\0{\"id\":2}\0"[..], tx);
        let got: Vec<_> = rx.iter().collect();
        assert!(got[0].is_err());
        assert_eq!(got[1].as_ref().unwrap()["id"], 2);
    }

    #[test]
    fn file_urls_are_encoded() {
        assert_eq!(
            file_url(Path::new("/tmp/a b/p#1.html")),
            "file:///tmp/a%20b/p%231.html"
        );
        assert_eq!(js_string("a'\"</script>"), "\"a'\\\"</script>\"");
    }

    #[test]
    fn truthiness_follows_javascript() {
        assert!(!truthy(&json!(0)));
        assert!(!truthy(&json!("")));
        assert!(!truthy(&Value::Null));
        assert!(truthy(&json!("x")));
        assert!(truthy(&json!([])));
    }
}
