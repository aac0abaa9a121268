//! The proxy's side of the split: a small pool of connections to the privileged part, and the
//! process facts, leaf signing, status and host facts asked over them.

use std::{
    os::{fd::OwnedFd, unix::net::UnixStream},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use rustls_pki_types::CertificateDer;

use super::{PrivsepError, Request, Response, VERSION, Welcome, read_frame, write_frame};
use crate::{
    proxy::{ca::CaError, ca::LeafSigner, origins::ProcessFacts},
    steer::{SteerStatus, gateway::GatewayStatus, process::ProcessInfo},
};

/// Longest a request may wait for its answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Most idle connections kept.
const MAX_IDLE: usize = 16;

/// Connections to the privileged part.
#[derive(Debug)]
pub struct Link {
    path: PathBuf,
    idle: Mutex<Vec<UnixStream>>,
}

impl Link {
    /// Connects, says hello, and takes the listening sockets.
    pub fn connect(path: &Path) -> Result<(Arc<Self>, Welcome, Vec<OwnedFd>), PrivsepError> {
        let mut sock = UnixStream::connect(path).map_err(|e| {
            PrivsepError::Io(std::io::Error::new(
                e.kind(),
                format!("{}: {e} (is `sluice run` running?)", path.display()),
            ))
        })?;
        sock.set_read_timeout(Some(CALL_TIMEOUT))?;
        write_frame(&mut sock, &Request::Hello { version: VERSION })?;
        let welcome = match read_frame::<Response>(&mut sock)? {
            Some(Response::Welcome(w)) => w,
            Some(Response::Error(e)) => return Err(PrivsepError::Refused(e)),
            Some(other) => {
                return Err(PrivsepError::Protocol(format!(
                    "expected a welcome, got {other:?}"
                )));
            }
            None => {
                return Err(PrivsepError::Refused(
                    "the privileged part closed the connection (is this the proxy's user?)".into(),
                ));
            }
        };
        let fds = super::recv_fds(&sock, welcome.sockets.len())?;
        if fds.len() != welcome.sockets.len() {
            return Err(PrivsepError::Protocol(format!(
                "{} sockets announced, {} passed",
                welcome.sockets.len(),
                fds.len()
            )));
        }
        let link = Arc::new(Self {
            path: path.to_owned(),
            idle: Mutex::new(vec![sock]),
        });
        Ok((link, welcome, fds))
    }

    /// One request and its answer; an error answer is [`PrivsepError::Refused`].
    pub fn call(&self, req: &Request) -> Result<Response, PrivsepError> {
        let pooled = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut sock = match pooled {
            Some(s) => s,
            None => {
                let s = UnixStream::connect(&self.path)?;
                s.set_read_timeout(Some(CALL_TIMEOUT))?;
                s
            }
        };
        write_frame(&mut sock, req)?;
        // The answer in one read where it fits (the length and the body arrive together): the
        // privileged part sends nothing else on this connection until the next request.
        let resp = read_frame::<Response>(&mut std::io::BufReader::with_capacity(4096, &sock))?
            .ok_or_else(|| {
                PrivsepError::Io(std::io::Error::from(std::io::ErrorKind::UnexpectedEof))
            })?;
        {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < MAX_IDLE {
                idle.push(sock);
            }
        }
        match resp {
            Response::Error(e) => Err(PrivsepError::Refused(e)),
            r => Ok(r),
        }
    }

    /// Blocks until the privileged part goes away (its end of a connection closes).
    pub fn wait_gone(&self) -> Result<(), PrivsepError> {
        use std::io::Read as _;
        let mut sock = UnixStream::connect(&self.path)?;
        let mut b = [0u8; 1];
        loop {
            match sock.read(&mut b) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Ok(()),
            }
        }
    }

    /// Steering, gateway and supervision status.
    pub fn status(&self) -> Result<RemoteStatus, PrivsepError> {
        match self.call(&Request::Status)? {
            Response::Status(v) => serde_json::from_value(v)
                .map_err(|e| PrivsepError::Protocol(format!("status: {e}"))),
            other => Err(unexpected(&other)),
        }
    }

    /// DNS answers seen since the last call.
    pub fn dns(&self) -> Result<Vec<Vec<u8>>, PrivsepError> {
        match self.call(&Request::Dns)? {
            Response::Dns(v) => Ok(v),
            other => Err(unexpected(&other)),
        }
    }
}

fn unexpected(r: &Response) -> PrivsepError {
    PrivsepError::Protocol(format!("unexpected answer {r:?}"))
}

/// What the privileged part reports of itself.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RemoteStatus {
    /// Steering, when on.
    pub steer: Option<SteerStatus>,
    /// The gateway, when on.
    pub gateway: Option<GatewayStatus>,
    /// The proxy's supervision and the leaves signed.
    pub privsep: Option<super::server::Supervision>,
}

impl ProcessFacts for Link {
    fn process(&self, tgid: u32, uid: u32) -> ProcessInfo {
        match self.call(&Request::Process { tgid, uid }) {
            Ok(Response::Process(p)) => p,
            Ok(other) => {
                tracing::error!(answer = ?other, "privsep: unexpected answer to a process lookup");
                ProcessInfo::default()
            }
            Err(e) => {
                tracing::error!(error = %e, "privsep: process lookup failed");
                ProcessInfo::default()
            }
        }
    }
}

impl LeafSigner for Link {
    fn sign_leaf(
        &self,
        name: &str,
        spki: &[u8],
        conn: Option<crate::proxy::ca::Conn>,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let req = Request::Sign {
            name: name.to_owned(),
            spki: spki.to_vec(),
            peer: conn.map(|c| c.0),
            dst: conn.map(|c| c.1),
        };
        match self.call(&req) {
            Ok(Response::Signed(chain)) if !chain.is_empty() => {
                Ok(chain.into_iter().map(CertificateDer::from).collect())
            }
            Ok(other) => Err(CaError::Cert(format!("unexpected answer {other:?}"))),
            Err(e) => Err(CaError::Cert(e.to_string())),
        }
    }
}

impl crate::posture::HostFacts for Link {
    fn processes(&self) -> Result<crate::posture::process::Scan, String> {
        match self.call(&Request::Processes) {
            Ok(Response::Processes(s)) => Ok(s),
            Ok(other) => Err(unexpected(&other).to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    fn hash_exe(&self, pid: u32, exe: &Path, max_bytes: u64) -> Result<String, String> {
        let req = Request::HashExe {
            pid,
            exe: exe.to_owned(),
            max_bytes,
        };
        match self.call(&req) {
            Ok(Response::Hash(h)) => h,
            Ok(other) => Err(unexpected(&other).to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    fn firewall(&self) -> Result<String, String> {
        match self.call(&Request::Firewall) {
            Ok(Response::Firewall(f)) => f,
            Ok(other) => Err(unexpected(&other).to_string()),
            Err(e) => Err(e.to_string()),
        }
    }
}
