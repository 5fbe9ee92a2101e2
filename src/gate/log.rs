//! The gate log: one JSON object per line, every egress, git and supervise
//! decision. Read by `bottle egress-log`, `bottle status` and tests.
//!
//! Agents make it grow (every request is a line), so it is bounded: past
//! [`MAX_LOG_BYTES`] the file becomes `gate.log.1` (replacing the one
//! before) and a new one starts. Events no credential vouches for (anyone
//! who reaches a listener causes them) go through [`GateLog::unidentified`],
//! which writes the first [`UNIDENTIFIED_PER_MINUTE`] of each minute and
//! then one in [`UNIDENTIFIED_SAMPLE`], with the count.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{Map, Value};

/// The size past which the log is rotated.
pub const MAX_LOG_BYTES: u64 = 64 << 20;
/// Unidentified events written in full each minute.
pub const UNIDENTIFIED_PER_MINUTE: u64 = 100;
/// Beyond those, one in this many is written.
pub const UNIDENTIFIED_SAMPLE: u64 = 1000;

pub struct GateLog {
    sink: Mutex<Sink>,
    /// Unidentified events: (minute, count in it).
    unidentified: Mutex<(u64, u64)>,
}

struct Sink {
    file: File,
    path: PathBuf,
    written: u64,
    max: u64,
}

impl Sink {
    fn open(path: &Path) -> std::io::Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
    }

    fn write(&mut self, line: &[u8]) -> std::io::Result<()> {
        if self.written > 0 && self.written + line.len() as u64 > self.max {
            let mut old = self.path.clone().into_os_string();
            old.push(".1");
            std::fs::rename(&self.path, &old)?;
            self.file = Self::open(&self.path)?;
            self.written = 0;
        }
        self.file.write_all(line)?;
        self.written += line.len() as u64;
        Ok(())
    }
}

impl GateLog {
    /// Open (create, mode 0600) for appending.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Self::with_max(path, MAX_LOG_BYTES)
    }

    /// [`GateLog::open`], rotated past `max` bytes.
    pub fn with_max(path: &Path, max: u64) -> std::io::Result<Self> {
        let file = Sink::open(path)?;
        let written = file.metadata()?.len();
        Ok(Self {
            sink: Mutex::new(Sink {
                file,
                path: path.to_owned(),
                written,
                max,
            }),
            unidentified: Mutex::new((0, 0)),
        })
    }

    /// Append one event: `kind` (`egress`, `git`, `supervise`, `gate`) and
    /// its fields, with the time (`ts`, Unix seconds with milliseconds).
    /// Never pass a secret value. A failed write is reported on stderr and
    /// does not stop the request it describes.
    pub fn event(&self, kind: &str, fields: Value) {
        let mut object = Map::new();
        object.insert("ts".into(), Value::from(now_secs()));
        object.insert("kind".into(), Value::from(kind));
        if let Value::Object(fields) = fields {
            object.extend(fields);
        }
        let mut line = Value::Object(object).to_string();
        line.push('\n');
        let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = sink.write(line.as_bytes()) {
            eprintln!("bottle gate: cannot write the gate log: {e}");
        }
    }

    /// [`GateLog::event`] for an event no credential vouches for (a
    /// request without a valid one, or for a foreign `Host`): written in
    /// full up to [`UNIDENTIFIED_PER_MINUTE`] a minute, then one in
    /// [`UNIDENTIFIED_SAMPLE`] with `"similar": N`, the count this minute.
    pub fn unidentified(&self, kind: &str, fields: Value) {
        let minute = now_secs() as u64 / 60;
        let n = {
            let mut seen = self.unidentified.lock().unwrap_or_else(|e| e.into_inner());
            if seen.0 != minute {
                *seen = (minute, 0);
            }
            seen.1 += 1;
            seen.1
        };
        if n <= UNIDENTIFIED_PER_MINUTE {
            self.event(kind, fields);
        } else if (n - UNIDENTIFIED_PER_MINUTE).is_multiple_of(UNIDENTIFIED_SAMPLE) {
            let mut fields = fields;
            if let Value::Object(f) = &mut fields {
                f.insert("similar".into(), Value::from(n));
            }
            self.event(kind, fields);
        }
    }
}

fn now_secs() -> f64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_millis() as f64) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Attack: every request an agent makes is a line, and the log had no
    /// bound (one connection of pipelined requests without a credential
    /// grew it 1.9 MB/s). Now it is rotated: at most twice its bound.
    #[test]
    fn the_log_is_rotated_past_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gate.log");
        let log = GateLog::with_max(&path, 10_000).unwrap();
        for i in 0..2000 {
            log.event("egress", json!({"decision": "denied", "n": i}));
        }
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let old = dir.path().join("gate.log.1");
        assert!(size(&path) <= 10_000, "{}", size(&path));
        assert!(size(&old) <= 10_000 && size(&old) > 0, "{}", size(&old));
        let last = std::fs::read_to_string(&path).unwrap();
        assert!(last.ends_with("\"n\":1999}\n"), "{last}");
        // Reopened, it goes on counting from the file's size.
        drop(log);
        let log = GateLog::with_max(&path, 10_000).unwrap();
        for i in 0..200 {
            log.event("egress", json!({"n": i}));
        }
        assert!(size(&path) <= 10_000);
    }

    #[test]
    fn unidentified_events_are_sampled_past_a_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gate.log");
        let log = GateLog::open(&path).unwrap();
        let total = UNIDENTIFIED_PER_MINUTE + 2 * UNIDENTIFIED_SAMPLE;
        for _ in 0..total {
            log.unidentified("egress", json!({"decision": "denied"}));
        }
        let lines = std::fs::read_to_string(&path).unwrap();
        let n = lines.lines().count() as u64;
        // A minute may turn while it runs: at most twice the bound.
        assert!(n <= 2 * (UNIDENTIFIED_PER_MINUTE + 2), "{n}");
        assert!(n >= UNIDENTIFIED_PER_MINUTE, "{n}");
    }
}
