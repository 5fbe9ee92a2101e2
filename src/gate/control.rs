//! The gate's control socket: one JSON line in, one JSON line out.
//!
//! The socket lives in the gate's state directory with mode 0600, so only
//! the user who runs bottle can talk to it. A reload carries secret values:
//! they are read by the bottle process that sends it (`apply`, `watch`) and
//! exist afterwards only in the gate's memory.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::config::GateConfig;

/// How long a client waits for the gate to answer.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The largest line either side accepts.
pub const MAX_LINE: usize = 16 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Health,
    /// Serve `config` from now on, with these secret values (by
    /// `value_key`). Open connections are not dropped.
    Reload {
        config: GateConfig,
        secrets: BTreeMap<String, String>,
    },
    Stop,
}

/// Redacted: a reload's values never reach a log or a panic message.
impl Request {
    pub fn describe(&self) -> &'static str {
        match self {
            Request::Health => "health",
            Request::Reload { .. } => "reload",
            Request::Stop => "stop",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Response {
    Health(Health),
    Ok,
    Error { message: String },
}

/// What a running gate says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub pid: u32,
    /// [`GateConfig::hash`] of what it serves now.
    pub config_hash: String,
    /// Unix seconds when it started.
    pub started_at: u64,
    /// Unix seconds when it last read secret values (start or reload).
    pub secrets_read_at: u64,
    /// The port each bottle's listener is bound to.
    pub ports: BTreeMap<String, u16>,
    /// The values its config names that it does not hold (their keys:
    /// variable names and `file:` paths, never values).
    #[serde(default)]
    pub missing_secrets: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Nothing listens: no gate runs (or a dead one left its socket).
    #[error("no gate answers on {0}")]
    NotRunning(String),
    #[error("the gate's control socket {path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("the gate answered something bottle cannot read: {0}")]
    Protocol(String),
}

/// Send one request and read the answer.
pub fn call(socket: &Path, request: &Request) -> Result<Response, ControlError> {
    let path = socket.display().to_string();
    let io = |error| ControlError::Io {
        path: path.clone(),
        error,
    };
    let mut stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ControlError::NotRunning(path));
        }
        Err(e) => return Err(io(e)),
    };
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    let mut line = serde_json::to_vec(request).expect("control requests serialize");
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut answer = Vec::new();
    BufReader::new(stream.take_limit())
        .read_until(b'\n', &mut answer)
        .map_err(io)?;
    serde_json::from_slice(&answer).map_err(|e| ControlError::Protocol(e.to_string()))
}

trait TakeLimit {
    fn take_limit(self) -> std::io::Take<UnixStream>;
}

impl TakeLimit for UnixStream {
    fn take_limit(self) -> std::io::Take<UnixStream> {
        std::io::Read::take(self, MAX_LINE as u64)
    }
}
