//! The gate log: one JSON object per line, every egress, git and supervise
//! decision. Read by `bottle egress-log`, `bottle status` and tests.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

use serde_json::{Map, Value};

pub struct GateLog {
    file: Mutex<File>,
}

impl GateLog {
    /// Open (create, mode 0600) for appending.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(Self {
            file: Mutex::new(file),
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
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = file.write_all(line.as_bytes()) {
            eprintln!("bottle gate: cannot write the gate log: {e}");
        }
    }
}

fn now_secs() -> f64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_millis() as f64) / 1000.0
}
