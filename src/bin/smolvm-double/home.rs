//! The double's state directory, `$SMOLVM_DOUBLE_HOME`:
//!
//! ```text
//! calls.jsonl        one JSON line per call: verb, args, exit, time
//! counters.json      calls per verb, for SMOLVM_DOUBLE_FAIL
//! states.json        {"NAME": "unreachable"}: states forced by tests
//! machines/NAME.json what smolvm reports and the local runtime does not hold
//! data/NAME/         the machine's data folder (see `touch_data_dir`)
//! local/             the local runtime's state (the machines themselves)
//! locks/             flock files: one per machine, `.global` for counters,
//!                    `.database` for writers (see `write_transaction`)
//! ```

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::failure::Failure;
use crate::parse::{Mount, SecretRef};

pub const HOME_VAR: &str = "SMOLVM_DOUBLE_HOME";

pub struct Home {
    root: PathBuf,
}

/// What smolvm records about a machine that bottle's runtime interface does
/// not carry, kept beside the local runtime's own state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Meta {
    pub created_at: u64,
    /// The image as `ls` reports it (`local-dir:/abs/path` for a directory).
    pub image: Option<String>,
    pub mounts: Vec<Mount>,
    pub network: bool,
    pub allowed_cidrs: Option<Vec<String>>,
    pub dns_filter_hosts: Option<Vec<String>>,
    pub secret_refs: BTreeMap<String, SecretRef>,
    pub init: Vec<String>,
    pub workdir: Option<String>,
    pub storage_gb: Option<u64>,
    pub overlay_gb: Option<u64>,
}

/// An exclusive `flock`, released on drop.
pub struct Lock(#[allow(dead_code)] File);

impl Home {
    /// `$SMOLVM_DOUBLE_HOME`, or `$XDG_DATA_HOME/smolvm-double`, or
    /// `~/.local/share/smolvm-double`.
    pub fn open() -> Result<Self, Failure> {
        let root = match std::env::var_os(HOME_VAR) {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => default_root().ok_or_else(|| {
                Failure::double(format!(
                    "set {HOME_VAR}: neither XDG_DATA_HOME nor HOME is set"
                ))
            })?,
        };
        Self::at(root)
    }

    /// The home in `root`, created if missing.
    pub fn at(root: PathBuf) -> Result<Self, Failure> {
        for dir in ["machines", "data", "local", "locks"] {
            std::fs::create_dir_all(root.join(dir)).map_err(|error| {
                Failure::double(format!("creating {}: {error}", root.join(dir).display()))
            })?;
        }
        Ok(Self { root })
    }

    pub fn local_dir(&self) -> PathBuf {
        self.root.join("local")
    }

    pub fn data_dir(&self, name: &str) -> PathBuf {
        self.root.join("data").join(name)
    }

    fn meta_path(&self, name: &str) -> PathBuf {
        self.root.join("machines").join(format!("{name}.json"))
    }

    /// Lock one machine's record (or, with `None`, the home-wide files)
    /// against concurrent calls.
    pub fn lock(&self, name: Option<&str>) -> Result<Lock, Failure> {
        let path = self.root.join("locks").join(match name {
            Some(name) => format!("{name}.lock"),
            None => ".global".to_owned(),
        });
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|error| Failure::double(format!("opening {}: {error}", path.display())))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|error| Failure::double(format!("locking {}: {error}", path.display())))?;
        Ok(Lock(file))
    }

    /// smolvm's state database takes one writer at a time and fails the
    /// others at once (their deferred SQLite transactions cannot wait):
    /// `database operation failed: WHAT: database is locked`, nothing done.
    /// The double holds this lock over each mutating call's changes, so
    /// overlapping writers fail the same way (deterministically, where
    /// smolvm fails about half of them).
    pub fn write_transaction(&self, what: &str) -> Result<Lock, Failure> {
        let path = self.root.join("locks").join(".database");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|error| Failure::double(format!("opening {}: {error}", path.display())))?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Lock(file)),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(Failure::new(format!(
                "database operation failed: {what}: database is locked"
            ))),
            Err(error) => Err(Failure::double(format!(
                "locking {}: {error}",
                path.display()
            ))),
        }
    }

    pub fn meta(&self, name: &str) -> Result<Option<Meta>, Failure> {
        let path = self.meta_path(name);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|error| Failure::double(format!("reading {}: {error}", path.display()))),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(Failure::double(format!(
                "reading {}: {error}",
                path.display()
            ))),
        }
    }

    pub fn write_meta(&self, name: &str, meta: &Meta) -> Result<(), Failure> {
        let json = serde_json::to_vec_pretty(meta).expect("metadata serialises");
        write_atomically(&self.meta_path(name), &json)
    }

    pub fn remove_meta(&self, name: &str) -> Result<(), Failure> {
        remove_if_present(&self.meta_path(name))
    }

    /// smolvm creates a machine's data folder whenever a command addresses
    /// the name, even one that does not exist (`status`, `exec`, `cp` and
    /// `stop` leave an empty folder behind). The double does the same; the
    /// folder is not a machine and never appears in `ls`.
    pub fn touch_data_dir(&self, name: &str) {
        let _ = std::fs::create_dir_all(self.data_dir(name));
    }

    pub fn remove_data_dir(&self, name: &str) {
        let _ = std::fs::remove_dir_all(self.data_dir(name));
    }

    /// The states tests forced on machines, by name.
    pub fn forced_states(&self) -> BTreeMap<String, String> {
        std::fs::read(self.root.join("states.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// Drop a forced state: `start`, `stop` and `delete` recover a machine.
    pub fn clear_forced_state(&self, name: &str) -> Result<(), Failure> {
        let _lock = self.lock(None)?;
        let mut states = self.forced_states();
        if states.remove(name).is_some() {
            let json = serde_json::to_vec_pretty(&states).expect("states serialise");
            write_atomically(&self.root.join("states.json"), &json)?;
        }
        Ok(())
    }

    /// Count this call of `verb` and return its number, starting at 1.
    pub fn count_call(&self, verb: &str) -> Result<u64, Failure> {
        let _lock = self.lock(None)?;
        let path = self.root.join("counters.json");
        let mut counters: BTreeMap<String, u64> = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        let count = counters.entry(verb.to_owned()).or_default();
        *count += 1;
        let number = *count;
        let json = serde_json::to_vec(&counters).expect("counters serialise");
        write_atomically(&path, &json)?;
        Ok(number)
    }

    /// Append one line to `calls.jsonl`. `exit` is `None` for a call that
    /// hangs or is killed before it can exit. One `write` of a line opened
    /// for appending, so concurrent calls never interleave their lines.
    pub fn log_call(&self, verb: &str, args: &[String], exit: Option<i32>, note: Option<&str>) {
        let mut line = serde_json::json!({
            "time_ms": now_millis(),
            "pid": std::process::id(),
            "verb": verb,
            "args": args,
            "exit": exit,
        });
        if let Some(note) = note {
            line["note"] = note.into();
        }
        let mut text = line.to_string();
        text.push('\n');
        if let Ok(mut file) = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("calls.jsonl"))
        {
            let _ = file.write_all(text.as_bytes());
        }
    }
}

fn default_root() -> Option<PathBuf> {
    let data = std::env::var_os("XDG_DATA_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".local/share")))?;
    Some(data.join("smolvm-double"))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    let failure =
        |error: std::io::Error| Failure::double(format!("writing {}: {error}", path.display()));
    let dir = path.parent().expect("home files have a parent");
    let mut temp = tempfile::NamedTempFile::new_in(dir).map_err(failure)?;
    temp.write_all(bytes).map_err(failure)?;
    temp.persist(path).map_err(|error| failure(error.error))?;
    Ok(())
}

fn remove_if_present(path: &Path) -> Result<(), Failure> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(Failure::double(
            format!("removing {}: {error}", path.display()),
        )),
        _ => Ok(()),
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}
