//! Network namespaces for tests: named (`ip netns`), joined by veth pairs, removed on drop (with
//! everything in them: interfaces, routes, nftables tables).

use std::{
    path::PathBuf,
    process::{Command, Output},
};

use anyhow::{Result, bail};

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    /// Its name under `/run/netns`.
    pub name: String,
}

/// Runs `ip ARGS`, failing with its message.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Netns {
    /// Creates `name` (removing a stale one of that name first) with its loopback up.
    pub fn new(name: &str) -> Result<Self> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name])?;
        let ns = Self { name: name.into() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let out = self
            .command("sysctl", &["-qw", &format!("{key}={value}")])
            .output()?;
        if !out.status.success() {
            bail!("sysctl {key}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// A command run inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]).args(args);
        c
    }

    /// Runs `program` inside the namespace and returns its output.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<Output> {
        Ok(self.command(program, args).output()?)
    }

    /// The namespace's file, for `setns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `f` on a thread of its own that has entered the namespace: sockets it creates live
    /// there (and stay there when handed back).
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let path = self.path();
        std::thread::spawn(move || -> Result<T> {
            let fd = std::fs::File::open(&path)?;
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread in the namespace panicked"))?
    }

    /// Joins `self` and `other` with a veth pair named `a` (here) and `b` (there), both up.
    pub fn veth(&self, a: &str, other: &Netns, b: &str) -> Result<()> {
        self.ip(&[
            "link",
            "add",
            a,
            "type",
            "veth",
            "peer",
            "name",
            b,
            "netns",
            &other.name,
        ])?;
        self.ip(&["link", "set", a, "up"])?;
        other.ip(&["link", "set", b, "up"])?;
        Ok(())
    }

    /// Adds `cidr` (address/prefix) to `dev`, usable at once (no duplicate address detection).
    pub fn addr(&self, dev: &str, cidr: &str) -> Result<()> {
        if cidr.contains(':') {
            self.ip(&["-6", "addr", "add", cidr, "dev", dev, "nodad"])
        } else {
            self.ip(&["addr", "add", cidr, "dev", dev])
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
