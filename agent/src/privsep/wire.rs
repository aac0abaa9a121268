//! The privilege split's frames and the proxy's requests: the bytes the privileged part parses
//! from a process that parses hostile input, kept free of the agent's other types so that the
//! fuzz target `privsep` reads this very file.

use std::{
    io::{Read, Write},
    net::SocketAddr,
};

use serde::{Deserialize, Serialize};

/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 8 << 20;
/// The protocol's version; both parts come from one binary, so a mismatch is a half-upgraded
/// install and is refused.
pub const VERSION: u32 = 2;

/// Errors of the privilege split's channel.
#[derive(Debug, thiserror::Error)]
pub enum PrivsepError {
    /// The socket failed.
    #[error("privileged part's socket: {0}")]
    Io(#[from] std::io::Error),
    /// A frame was too large or not the expected JSON.
    #[error("privileged part's protocol: {0}")]
    Protocol(String),
    /// The other side refused the request.
    #[error("refused by the privileged part: {0}")]
    Refused(String),
}

/// What the proxy asks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// The first request of the first connection: the listening sockets and what the proxy
    /// needs to start.
    Hello {
        /// [`VERSION`].
        version: u32,
    },
    /// What the proxy cannot read of a steered connection's process: its executable and
    /// parent, and the user's name.
    Process {
        /// The process id from the kernel's record.
        tgid: u32,
        /// The user id from the kernel's record.
        uid: u32,
    },
    /// Signs a leaf for `name` over the proxy's own public key.
    Sign {
        /// A host name or an IP address.
        name: String,
        /// The leaf's public key (SubjectPublicKeyInfo, DER).
        spki: Vec<u8>,
        /// The peer of the connection the leaf is for, when there is one.
        peer: Option<SocketAddr>,
        /// That connection's original destination.
        dst: Option<SocketAddr>,
    },
    /// Steering, gateway and supervision status for `/status` and status events.
    Status,
    /// The DNS answers steered processes received since the last call (raw messages, parsed
    /// by the proxy); waits up to a quarter of a second for one.
    Dns,
    /// The host's processes, for the posture checks.
    Processes,
    /// The SHA-256 of the executable process `pid` runs, if it is still `exe`.
    HashExe {
        /// The process.
        pid: u32,
        /// The executable it was seen running.
        exe: std::path::PathBuf,
        /// Largest file hashed.
        max_bytes: u64,
    },
    /// `nft -j list ruleset`, for the firewall posture check.
    Firewall,
}

/// Writes one frame.
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), PrivsepError> {
    let body = serde_json::to_vec(msg).map_err(|e| PrivsepError::Protocol(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(PrivsepError::Protocol(format!(
            "a frame of {} bytes is larger than {MAX_FRAME}",
            body.len()
        )));
    }
    let len = u32::try_from(body.len()).map_err(|e| PrivsepError::Protocol(e.to_string()))?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf)?;
    Ok(())
}

/// Reads one frame; `Ok(None)` on a clean end of stream before a frame.
pub fn read_frame<T: for<'de> Deserialize<'de>>(
    r: &mut impl Read,
) -> Result<Option<T>, PrivsepError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(PrivsepError::Protocol(format!(
            "a frame of {len} bytes is larger than {MAX_FRAME}"
        )));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| PrivsepError::Protocol(e.to_string()))
}
