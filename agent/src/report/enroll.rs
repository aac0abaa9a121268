//! Enrollment: the agent presents a one-time token to the collector and keeps the credential it
//! gets back (mode 0600) with the agent id, the collector's URL and CA, under
//! `<state_dir>/report/`.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, header};
use serde::{Deserialize, Serialize};
use sluice_protocol::{EnrollRequest, EnrollResponse};

use super::{
    ReportError,
    client::{self as collector_client, MAX_ANSWER},
};

/// The enrollment path.
pub const ENROLL_PATH: &str = "/api/v1/enroll";

/// What `enrollment.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enrollment {
    /// The agent id the collector issued.
    pub agent_id: String,
    /// The collector (`https://host:port`).
    pub collector: String,
    /// The collector's CA (PEM) as given at enrollment.
    #[serde(default)]
    pub collector_ca: Option<PathBuf>,
    /// The agent group (decides its bundle).
    #[serde(default)]
    pub group: String,
    /// When (Unix seconds).
    #[serde(default)]
    pub enrolled_at: u64,
    /// When the credential was issued (at enrollment or its last renewal; Unix seconds).
    #[serde(default)]
    pub credential_issued_at: Option<u64>,
    /// When the collector stops accepting it (Unix seconds); absent: never said.
    #[serde(default)]
    pub credential_expires_at: Option<u64>,
}

/// `<state_dir>/report`.
pub fn report_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("report")
}

/// Where the credential is kept.
pub fn credential_path(state_dir: &Path) -> PathBuf {
    report_dir(state_dir).join("credential")
}

/// Where the enrollment is kept.
pub fn enrollment_path(state_dir: &Path) -> PathBuf {
    report_dir(state_dir).join("enrollment.json")
}

/// Reads the enrollment, if there is one.
pub fn load(state_dir: &Path) -> Result<Option<Enrollment>, ReportError> {
    let path = enrollment_path(state_dir);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| ReportError::Config(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ReportError::Io { path, source }),
    }
}

/// Writes `bytes` to `path` atomically with `mode` (temporary file, fsync, rename, dir fsync).
pub fn write_private(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ReportError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| ReportError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path
        .parent()
        .ok_or_else(|| ReportError::Config(format!("{}: no directory", path.display())))?;
    {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Enrolls with `collector` using `token`. Refuses to replace an existing enrollment unless
/// `force`.
pub async fn enroll(
    state_dir: &Path,
    collector: &str,
    token: &str,
    ca: Option<&Path>,
    force: bool,
) -> Result<Enrollment, ReportError> {
    if !force && enrollment_path(state_dir).exists() {
        let existing = load(state_dir)?;
        return Err(ReportError::Config(format!(
            "already enrolled{} ({}); use --force to enroll again",
            existing
                .map(|e| format!(" as {} with {}", e.agent_id, e.collector))
                .unwrap_or_default(),
            enrollment_path(state_dir).display()
        )));
    }
    let ca = match ca {
        Some(p) => Some(std::fs::canonicalize(p).map_err(|source| ReportError::Io {
            path: p.to_owned(),
            source,
        })?),
        None => None,
    };
    let mut client = collector_client::collector(collector, ca.as_deref())?;
    let hostname = super::convert::DeviceInfo::local("").hostname;
    let req = EnrollRequest {
        token: token.trim().to_owned(),
        hostname,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let body = serde_json::to_vec(&req).map_err(|e| ReportError::Http(e.to_string()))?;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    let answer = client
        .request(
            Method::POST,
            ENROLL_PATH,
            headers,
            Bytes::from(body),
            Duration::from_secs(30),
            MAX_ANSWER,
        )
        .await?;
    if answer.status != StatusCode::OK {
        let text: String = String::from_utf8_lossy(&answer.body[..answer.body.len().min(500)])
            .chars()
            .filter(|c| !c.is_control())
            .collect();
        return Err(ReportError::Refused(format!(
            "enrollment refused: the collector answered {}: {text}",
            answer.status
        )));
    }
    let resp: EnrollResponse = serde_json::from_slice(&answer.body)
        .map_err(|e| ReportError::Http(format!("enrollment answer: {e}")))?;
    if resp.credential.trim().is_empty()
        || resp.agent_id.is_empty()
        || resp.credential.chars().any(|c| c.is_control() || c == ' ')
    {
        return Err(ReportError::Http(
            "enrollment answer: empty or unusable credential or agent id".into(),
        ));
    }
    // The collector's CA is kept in the agent's state: the proxy, which talks to the collector,
    // reads it there whatever the permissions of the file enrolment was given.
    let collector_ca = match &ca {
        Some(p) => {
            let pem = std::fs::read(p).map_err(|source| ReportError::Io {
                path: p.clone(),
                source,
            })?;
            let kept = state_dir.join("report/collector-ca.pem");
            write_private(&kept, &pem, 0o644)?;
            Some(kept)
        }
        None => None,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let enrollment = Enrollment {
        agent_id: resp.agent_id,
        collector: client.base().to_owned(),
        collector_ca,
        group: resp.group,
        enrolled_at: now,
        credential_issued_at: Some(now),
        credential_expires_at: resp.credential_expires_at,
    };
    write_private(
        &credential_path(state_dir),
        format!("{}\n", resp.credential).as_bytes(),
        0o600,
    )?;
    let json =
        serde_json::to_vec_pretty(&enrollment).map_err(|e| ReportError::Http(e.to_string()))?;
    write_private(&enrollment_path(state_dir), &json, 0o600)?;
    Ok(enrollment)
}
