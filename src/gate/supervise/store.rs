//! The grants store: every supervise request, grant and operator message of
//! a project, in `<state-dir>/gate/<project>/grants.json`.
//!
//! Two kinds of process write it: the gate (an agent's `request_egress`,
//! `message_operator`) and `bottle supervise approve|deny|revoke`. Every
//! change is a read-modify-write under an exclusive `flock` on
//! `grants.lock` beside it, and lands by an atomic rename of a 0600 file, so
//! readers (the egress check, `bottle supervise list`, `check`) never lock
//! and never see half a file.
//!
//! What an agent writes is bounded (size, count, rate); the file as a whole
//! is bounded too (at most [`MAX_RECORDS`] records: the oldest settled ones
//! are dropped first).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use miette::Diagnostic;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::gate::AgentIdentity;
use crate::gate::hosts::HostPattern;
use crate::gate::paths::GatePaths;

pub const GRANTS_FORMAT: u32 = 1;
/// The longest `reason` an agent may give, in bytes.
pub const MAX_REASON: usize = 1000;
/// The longest `message_operator` text, in bytes.
pub const MAX_MESSAGE: usize = 4000;
/// The longest host an agent may request (a DNS name is at most 253).
pub const MAX_HOST: usize = 260;
/// Pending egress requests per agent.
pub const MAX_PENDING_PER_AGENT: usize = 10;
/// Requests and messages per agent in any [`RATE_WINDOW_SECS`].
pub const MAX_PER_WINDOW: usize = 10;
pub const RATE_WINDOW_SECS: u64 = 60;
/// Records kept in the file; beyond it the oldest settled ones go.
pub const MAX_RECORDS: usize = 500;
/// A file larger than this is not read (it cannot be one bottle wrote).
pub const MAX_FILE_BYTES: u64 = 8 << 20;
/// The longest grant `--for` accepts.
pub const MAX_GRANT_SECS: u64 = 365 * 86_400;

/// `grants.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantsFile {
    pub format_version: u32,
    pub records: Vec<Record>,
}

impl Default for GrantsFile {
    fn default() -> Self {
        Self {
            format_version: GRANTS_FORMAT,
            records: Vec::new(),
        }
    }
}

/// One request (or message) and what became of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Short, unique within the project (`k3v9tq`).
    pub id: String,
    pub bottle: String,
    pub agent: String,
    pub kind: Kind,
    /// The requested host (`kind = egress`), in the grammar of
    /// `allow_hosts`, normalized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Why the agent asks; for a message, its text. Written by the agent:
    /// escape before showing it on a terminal.
    pub reason: String,
    /// Unix seconds.
    pub created_at: u64,
    #[serde(flatten)]
    pub state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Egress,
    Message,
}

/// What the operator (or the manifests) decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    /// Waiting for the operator.
    Pending,
    /// In force until `until` (Unix seconds); expired after.
    Approved {
        decided_at: u64,
        until: u64,
    },
    Denied {
        decided_at: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deny_reason: Option<String>,
    },
    Revoked {
        decided_at: u64,
    },
    /// The manifests now allow the host: the grant retired as declared.
    Declared {
        decided_at: u64,
    },
    /// A message to the operator (nothing to decide).
    Delivered,
}

/// The state as shown: [`State`] with expiry applied at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    Approved,
    Expired,
    Denied,
    Revoked,
    Declared,
    Delivered,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Approved => "approved",
            Status::Expired => "expired",
            Status::Denied => "denied",
            Status::Revoked => "revoked",
            Status::Declared => "declared",
            Status::Delivered => "delivered",
        }
    }
}

impl Record {
    pub fn status(&self, now: u64) -> Status {
        match &self.state {
            State::Pending => Status::Pending,
            State::Approved { until, .. } if *until > now => Status::Approved,
            State::Approved { .. } => Status::Expired,
            State::Denied { .. } => Status::Denied,
            State::Revoked { .. } => Status::Revoked,
            State::Declared { .. } => Status::Declared,
            State::Delivered => Status::Delivered,
        }
    }

    /// An approved egress grant that has not expired.
    pub fn in_force(&self, now: u64) -> bool {
        self.kind == Kind::Egress && self.status(now) == Status::Approved
    }

    pub fn who(&self) -> AgentIdentity {
        AgentIdentity {
            bottle: self.bottle.clone(),
            agent: self.agent.clone(),
        }
    }

    pub fn is(&self, who: &AgentIdentity) -> bool {
        self.bottle == who.bottle && self.agent == who.agent
    }

    /// When it expires, if approved.
    pub fn until(&self) -> Option<u64> {
        match self.state {
            State::Approved { until, .. } => Some(until),
            _ => None,
        }
    }

    /// The JSON the CLI and the MCP tools show: the record, plus its state
    /// with expiry applied.
    pub fn to_json(&self, now: u64) -> serde_json::Value {
        let mut value = serde_json::to_value(self).expect("records serialize");
        if let Some(object) = value.as_object_mut() {
            object.insert("state".into(), self.status(now).as_str().into());
            object.entry("host").or_insert(serde_json::Value::Null);
        }
        value
    }
}

/// Unix seconds now.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[derive(Debug, Error, Diagnostic)]
pub enum StoreError {
    #[error("cannot {action} the supervise grants `{path}`: {error}")]
    #[diagnostic(
        code("bottle::grants-io"),
        help("check that the state directory exists and that you own it")
    )]
    Io {
        action: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the supervise grants `{path}` cannot be read: {problem}")]
    #[diagnostic(
        code("bottle::grants-corrupt"),
        help(
            "bottle writes this file itself; if it was edited by hand, fix or remove it (removing it forgets every request and grant)"
        )
    )]
    Corrupt { path: PathBuf, problem: String },
}

/// Why an agent's request was not recorded: said to the agent as is.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refused {
    #[error("`{host}` {problem}: {help}")]
    BadHost {
        host: String,
        problem: String,
        help: String,
    },
    #[error("{what} is {len} bytes long; at most {max} are accepted")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error(
        "you already have {MAX_PENDING_PER_AGENT} pending requests; wait for the operator to decide them"
    )]
    TooManyPending,
    #[error(
        "at most {MAX_PER_WINDOW} requests and messages per {RATE_WINDOW_SECS} seconds; try again later"
    )]
    RateLimited,
}

/// Why an operator's decision was not recorded.
#[derive(Debug, Clone, PartialEq, Eq, Error, Diagnostic)]
pub enum DecisionError {
    #[error("no supervise request `{id}` in project `{project}`")]
    #[diagnostic(
        code("bottle::unknown-request"),
        help("`bottle supervise list` shows the requests and their ids")
    )]
    UnknownId { id: String, project: String },
    #[error("request `{id}` is already {state}")]
    #[diagnostic(code("bottle::already-decided"), help("{help}"))]
    AlreadyDecided {
        id: String,
        state: &'static str,
        help: String,
    },
    #[error("`{id}` is a message to the operator, not a request")]
    #[diagnostic(
        code("bottle::not-a-request"),
        help("messages need no decision; `bottle supervise list` shows them")
    )]
    NotARequest { id: String },
}

/// Either failure of an operator's decision.
#[derive(Debug, Error, Diagnostic)]
pub enum DecideError {
    #[error(transparent)]
    #[diagnostic(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    #[diagnostic(transparent)]
    Decision(#[from] DecisionError),
}

/// Either failure of an agent's request.
#[derive(Debug, Error)]
pub enum RequestError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Refused(#[from] Refused),
}

/// A project's grants file and its lock.
#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
    lock: PathBuf,
    project: String,
}

impl Store {
    pub fn new(paths: &GatePaths) -> Self {
        let project = paths
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self {
            path: paths.grants(),
            lock: paths.dir.join("grants.lock"),
            project,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current file; none yet is an empty one. Takes no lock.
    pub fn load(&self) -> Result<GrantsFile, StoreError> {
        read_file(&self.path)
    }

    /// Read, change and write back under the lock. `change` returning an
    /// error writes nothing; returning `(false, _)` writes nothing either.
    pub fn update<T, E>(
        &self,
        change: impl FnOnce(&mut GrantsFile) -> Result<(bool, T), E>,
    ) -> Result<T, E>
    where
        E: From<StoreError>,
    {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|error| self.io("create the directory of", error))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&self.lock)
            .map_err(|error| StoreError::Io {
                action: "lock",
                path: self.lock.clone(),
                error,
            })?;
        lock_within(&lock, LOCK_WAIT).map_err(|error| StoreError::Io {
            action: "lock",
            path: self.lock.clone(),
            error,
        })?;
        let mut file = self.load()?;
        let (changed, out) = change(&mut file)?;
        if changed {
            prune(&mut file, now());
            self.write(&file)?;
        }
        drop(lock);
        Ok(out)
    }

    fn write(&self, file: &GrantsFile) -> Result<(), StoreError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let mut json = serde_json::to_vec_pretty(file).expect("grants serialize");
        json.push(b'\n');
        // tempfile creates 0600.
        let mut tmp = tempfile::Builder::new()
            .prefix(".grants.")
            .tempfile_in(dir)
            .map_err(|error| self.io("write", error))?;
        tmp.write_all(&json)
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(|error| self.io("write", error))?;
        tmp.persist(&self.path)
            .map_err(|e| self.io("write", e.error))?;
        Ok(())
    }

    fn io(&self, action: &'static str, error: std::io::Error) -> StoreError {
        StoreError::Io {
            action,
            path: self.path.clone(),
            error,
        }
    }

    /// An agent asks for `host` (`request_egress`). A pending request or a
    /// grant in force of the same agent for the same host is returned
    /// instead of a new one.
    pub fn request_egress(
        &self,
        who: &AgentIdentity,
        host: &str,
        reason: &str,
        now: u64,
    ) -> Result<Record, RequestError> {
        let host = check_host(host)?;
        check_text("reason", reason, MAX_REASON, false)?;
        self.update(|file| {
            if let Some(existing) = file.records.iter().find(|r| {
                r.is(who)
                    && r.kind == Kind::Egress
                    && matches!(r.status(now), Status::Pending | Status::Approved)
                    && r.host.as_deref() == Some(host.as_str())
            }) {
                return Ok((false, existing.clone()));
            }
            let pending = file
                .records
                .iter()
                .filter(|r| r.is(who) && r.state == State::Pending)
                .count();
            if pending >= MAX_PENDING_PER_AGENT {
                return Err(Refused::TooManyPending.into());
            }
            rate_limit(file, who, now)?;
            let record = Record {
                id: new_id(file),
                bottle: who.bottle.clone(),
                agent: who.agent.clone(),
                kind: Kind::Egress,
                host: Some(host),
                reason: reason.to_owned(),
                created_at: now,
                state: State::Pending,
            };
            file.records.push(record.clone());
            Ok((true, record))
        })
    }

    /// An agent's message to the operator (`message_operator`).
    pub fn message(
        &self,
        who: &AgentIdentity,
        text: &str,
        now: u64,
    ) -> Result<Record, RequestError> {
        check_text("the message", text, MAX_MESSAGE, true)?;
        self.update(|file| {
            rate_limit(file, who, now)?;
            let record = Record {
                id: new_id(file),
                bottle: who.bottle.clone(),
                agent: who.agent.clone(),
                kind: Kind::Message,
                host: None,
                reason: text.to_owned(),
                created_at: now,
                state: State::Delivered,
            };
            file.records.push(record.clone());
            Ok((true, record))
        })
    }

    /// Approve a pending request for `secs` from `now`.
    pub fn approve(&self, id: &str, secs: u64, now: u64) -> Result<Record, DecideError> {
        self.decide(id, now, |record| match record.status(now) {
            Status::Pending => Ok(State::Approved {
                decided_at: now,
                until: now.saturating_add(secs),
            }),
            other => Err(already(id, other, "approve")),
        })
    }

    pub fn deny(&self, id: &str, reason: Option<&str>, now: u64) -> Result<Record, DecideError> {
        self.decide(id, now, |record| match record.status(now) {
            Status::Pending => Ok(State::Denied {
                decided_at: now,
                deny_reason: reason.map(str::to_owned),
            }),
            other => Err(already(id, other, "deny")),
        })
    }

    /// End an approved grant now (a pending request is denied instead).
    pub fn revoke(&self, id: &str, now: u64) -> Result<Record, DecideError> {
        self.decide(id, now, |record| match record.status(now) {
            Status::Approved => Ok(State::Revoked { decided_at: now }),
            other => Err(already(id, other, "revoke")),
        })
    }

    fn decide(
        &self,
        id: &str,
        _now: u64,
        next: impl FnOnce(&Record) -> Result<State, DecisionError>,
    ) -> Result<Record, DecideError> {
        let project = self.project.clone();
        // An unknown id creates nothing (not even the directory).
        if !self.load()?.records.iter().any(|r| r.id == id) {
            return Err(DecisionError::UnknownId {
                id: id.to_owned(),
                project,
            }
            .into());
        }
        self.update(|file| {
            let record = file
                .records
                .iter_mut()
                .find(|r| r.id == id)
                .ok_or_else(|| DecisionError::UnknownId {
                    id: id.to_owned(),
                    project,
                })?;
            if record.kind == Kind::Message {
                return Err(DecisionError::NotARequest { id: id.to_owned() }.into());
            }
            record.state = next(record)?;
            Ok::<_, DecideError>((true, record.clone()))
        })
    }

    /// Retire every grant in force (and every pending request) whose host
    /// `declared` says the manifests now allow, as `declared`. Returns the
    /// records retired. Writes only when there is one.
    pub fn retire_declared(
        &self,
        declared: impl Fn(&Record) -> bool,
        now: u64,
    ) -> Result<Vec<Record>, StoreError> {
        let retire = |r: &Record| {
            r.kind == Kind::Egress
                && matches!(r.status(now), Status::Approved | Status::Pending)
                && declared(r)
        };
        if !self.load()?.records.iter().any(retire) {
            return Ok(Vec::new());
        }
        self.update(|file| {
            let mut retired = Vec::new();
            for record in file.records.iter_mut().filter(|r| retire(r)) {
                record.state = State::Declared { decided_at: now };
                retired.push(record.clone());
            }
            Ok::<_, StoreError>((!retired.is_empty(), retired))
        })
    }
}

/// How long a writer waits for another to finish: writers hold the lock
/// for one read and one write, so only a stuck process makes this run out.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Take `file`'s exclusive `flock`, giving up after `wait`.
fn lock_within(file: &File, wait: std::time::Duration) -> std::io::Result<()> {
    use rustix::fs::{FlockOperation, flock};
    let deadline = std::time::Instant::now() + wait;
    loop {
        match flock(file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(()),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK || e == rustix::io::Errno::INTR => {
                if std::time::Instant::now() >= deadline {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("another bottle process has held it for {}s", wait.as_secs()),
                    ));
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn already(id: &str, state: Status, verb: &str) -> DecisionError {
    let help = match (state, verb) {
        (Status::Pending, "revoke") => {
            format!("it was never approved; `bottle supervise deny {id}` refuses it")
        }
        (Status::Approved, _) => {
            format!("it is in force; `bottle supervise revoke {id}` ends it")
        }
        (Status::Expired, _) => {
            "it has expired; the agent can ask again with `request_egress`".to_owned()
        }
        (Status::Declared, _) => {
            "the manifests allow its host now; remove it from `allow_hosts` to take it back".into()
        }
        _ => format!(
            "only a pending request can be approved or denied, and only an approved one revoked; \
             this one is {}",
            state.as_str()
        ),
    };
    DecisionError::AlreadyDecided {
        id: id.to_owned(),
        state: state.as_str(),
        help,
    }
}

fn read_file(path: &Path) -> Result<GrantsFile, StoreError> {
    let io = |action, error| StoreError::Io {
        action,
        path: path.to_owned(),
        error,
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(GrantsFile::default()),
        Err(e) => return Err(io("read", e)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io("read", e))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(StoreError::Corrupt {
            path: path.to_owned(),
            problem: format!("it is larger than {MAX_FILE_BYTES} bytes"),
        });
    }
    let file: GrantsFile = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
        path: path.to_owned(),
        problem: e.to_string(),
    })?;
    if file.format_version != GRANTS_FORMAT {
        return Err(StoreError::Corrupt {
            path: path.to_owned(),
            problem: format!(
                "format version {} (this bottle reads {GRANTS_FORMAT})",
                file.format_version
            ),
        });
    }
    Ok(file)
}

/// A host as `request_egress` accepts it, normalized.
pub fn check_host(host: &str) -> Result<String, Refused> {
    if host.len() > MAX_HOST {
        return Err(Refused::TooLong {
            what: "host",
            len: host.len(),
            max: MAX_HOST,
        });
    }
    HostPattern::parse(host.trim())
        .map(|p| p.to_string())
        .map_err(|(problem, help)| Refused::BadHost {
            host: host.chars().take(80).collect(),
            problem,
            help,
        })
}

fn check_text(what: &'static str, text: &str, max: usize, required: bool) -> Result<(), Refused> {
    if text.len() > max {
        return Err(Refused::TooLong {
            what,
            len: text.len(),
            max,
        });
    }
    if required && text.trim().is_empty() {
        return Err(Refused::Empty { what });
    }
    Ok(())
}

fn rate_limit(file: &GrantsFile, who: &AgentIdentity, now: u64) -> Result<(), Refused> {
    let recent = file
        .records
        .iter()
        .filter(|r| r.is(who) && r.created_at.saturating_add(RATE_WINDOW_SECS) > now)
        .count();
    if recent >= MAX_PER_WINDOW {
        return Err(Refused::RateLimited);
    }
    Ok(())
}

/// Six characters of `[a-z2-9]` without look-alikes, unique in the file.
fn new_id(file: &GrantsFile) -> String {
    const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";
    loop {
        let id: String = (0..6)
            .map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char)
            .collect();
        if !file.records.iter().any(|r| r.id == id) {
            return id;
        }
    }
}

/// Keep at most [`MAX_RECORDS`]: drop the oldest records that are neither
/// pending nor in force.
fn prune(file: &mut GrantsFile, now: u64) {
    let mut excess = file.records.len().saturating_sub(MAX_RECORDS);
    if excess == 0 {
        return;
    }
    let mut settled: Vec<(u64, usize)> = file
        .records
        .iter()
        .enumerate()
        .filter(|(_, r)| !matches!(r.status(now), Status::Pending | Status::Approved))
        .map(|(i, r)| (r.created_at, i))
        .collect();
    settled.sort();
    let mut drop = vec![false; file.records.len()];
    for (_, i) in settled {
        if excess == 0 {
            break;
        }
        drop[i] = true;
        excess -= 1;
    }
    let mut i = 0;
    file.records.retain(|_| {
        let keep = !drop[i];
        i += 1;
        keep
    });
}

/// Parse a grant duration: a number and a unit, `s`, `m`, `h` or `d`
/// (`30m`, `2h`, `1d`); several may follow each other (`1h30m`).
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("it is empty".into());
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(format!("`{c}` is not a unit (s, m, h, d)")),
        };
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("a number must come before `{c}`"))?;
        digits.clear();
        total = total.saturating_add(n.saturating_mul(unit));
    }
    if !digits.is_empty() {
        return Err(format!("`{digits}` has no unit (s, m, h, d)"));
    }
    if total == 0 {
        return Err("it is zero".into());
    }
    if total > MAX_GRANT_SECS {
        return Err("it is longer than 365 days".into());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let paths = GatePaths::new(dir.path(), "proj");
        (dir, Store::new(&paths))
    }

    fn who(agent: &str) -> AgentIdentity {
        AgentIdentity {
            bottle: "dev".into(),
            agent: agent.into(),
        }
    }

    #[test]
    fn a_request_is_pending_until_decided_and_expires() {
        let (_d, s) = store();
        let r = s
            .request_egress(&who("coder"), "Example.COM.", "docs", 1000)
            .unwrap();
        assert_eq!(r.host.as_deref(), Some("example.com"));
        assert_eq!(r.status(1000), Status::Pending);
        let a = s.approve(&r.id, 60, 1010).unwrap();
        assert_eq!(a.status(1069), Status::Approved);
        assert!(a.in_force(1069));
        assert_eq!(a.status(1070), Status::Expired);
        let err = s.approve(&r.id, 60, 1020).unwrap_err();
        assert!(matches!(
            err,
            DecideError::Decision(DecisionError::AlreadyDecided {
                state: "approved",
                ..
            })
        ));
        assert_eq!(s.revoke(&r.id, 1030).unwrap().status(1030), Status::Revoked);
        assert!(matches!(
            s.revoke(&r.id, 1031).unwrap_err(),
            DecideError::Decision(DecisionError::AlreadyDecided {
                state: "revoked",
                ..
            })
        ));
        assert!(matches!(
            s.deny("nope", None, 1).unwrap_err(),
            DecideError::Decision(DecisionError::UnknownId { .. })
        ));
    }

    #[test]
    fn the_file_is_private_and_survives_a_reload() {
        use std::os::unix::fs::PermissionsExt;
        let (_d, s) = store();
        let r = s
            .request_egress(&who("coder"), "a.example", "x", 5)
            .unwrap();
        let mode = std::fs::metadata(s.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(s.load().unwrap().records, vec![r]);
    }

    #[test]
    fn agents_are_bounded_in_size_count_and_rate() {
        let (_d, s) = store();
        let coder = who("coder");
        let long = "x".repeat(MAX_REASON + 1);
        assert!(matches!(
            s.request_egress(&coder, "a.example", &long, 0),
            Err(RequestError::Refused(Refused::TooLong { .. }))
        ));
        assert!(matches!(
            s.request_egress(&coder, "https://a.example/x", "", 0),
            Err(RequestError::Refused(Refused::BadHost { .. }))
        ));
        // The same host twice is one request.
        let a = s.request_egress(&coder, "a.example", "", 0).unwrap();
        let b = s.request_egress(&coder, "a.example", "again", 0).unwrap();
        assert_eq!(a.id, b.id);
        for i in 1..MAX_PER_WINDOW {
            s.request_egress(&coder, &format!("h{i}.example"), "", 0)
                .unwrap();
        }
        assert!(matches!(
            s.request_egress(&coder, "late.example", "", 1),
            Err(RequestError::Refused(Refused::TooManyPending))
        ));
        // Another agent is not limited by this one.
        s.request_egress(&who("other"), "a.example", "", 1).unwrap();
        // A minute later, still too many pending.
        assert!(matches!(
            s.request_egress(&coder, "late.example", "", 100),
            Err(RequestError::Refused(Refused::TooManyPending))
        ));
        // Messages are rate limited, not pending.
        let (_d2, s2) = store();
        for _ in 0..MAX_PER_WINDOW {
            s2.message(&coder, "hi", 0).unwrap();
        }
        assert!(matches!(
            s2.message(&coder, "hi", 59),
            Err(RequestError::Refused(Refused::RateLimited))
        ));
        s2.message(&coder, "hi", 60).unwrap();
        assert!(matches!(
            s2.message(&coder, " ", 600),
            Err(RequestError::Refused(Refused::Empty { .. }))
        ));
    }

    #[test]
    fn the_file_keeps_pending_and_in_force_records_when_pruned() {
        let mut file = GrantsFile::default();
        for i in 0..(MAX_RECORDS as u64 + 5) {
            file.records.push(Record {
                id: format!("r{i}"),
                bottle: "b".into(),
                agent: "a".into(),
                kind: Kind::Message,
                host: None,
                reason: String::new(),
                created_at: i,
                state: if i == 0 {
                    State::Pending
                } else {
                    State::Delivered
                },
            });
        }
        prune(&mut file, 10);
        assert_eq!(file.records.len(), MAX_RECORDS);
        assert_eq!(file.records[0].id, "r0");
        assert_eq!(file.records[1].id, "r6");
    }

    #[test]
    fn two_writers_lose_nothing() {
        let (_d, s) = store();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..5 {
                        let who = who(&format!("agent{t}"));
                        s.request_egress(&who, &format!("h{i}.example"), "", 0)
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(s.load().unwrap().records.len(), 20);
    }

    #[test]
    fn a_stuck_writer_is_waited_for_then_reported() {
        let (_d, s) = store();
        s.request_egress(&who("coder"), "a.example", "", 0).unwrap();
        let held = File::open(&s.lock).unwrap();
        rustix::fs::flock(&held, rustix::fs::FlockOperation::LockExclusive).unwrap();
        let other = OpenOptions::new().write(true).open(&s.lock).unwrap();
        let err = lock_within(&other, std::time::Duration::from_millis(50)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        drop(held);
        lock_within(&other, std::time::Duration::from_millis(50)).unwrap();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30m"), Ok(1800));
        assert_eq!(parse_duration("2h"), Ok(7200));
        assert_eq!(parse_duration("1d"), Ok(86_400));
        assert_eq!(parse_duration("1h30m"), Ok(5400));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("0m").is_err());
        assert!(parse_duration("5w").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("400d").is_err());
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_an_empty_store() {
        let (_d, s) = store();
        std::fs::create_dir_all(s.path().parent().unwrap()).unwrap();
        std::fs::write(s.path(), "{not json").unwrap();
        assert!(matches!(s.load(), Err(StoreError::Corrupt { .. })));
    }
}
