//! The real smolvm CLI, for contract tests: named by
//! `BOTTLE_TEST_REAL_SMOLVM`, each instance with a `SMOLVM_DATA_DIR` of its
//! own (smolvm re-roots all of its state there).
//!
//! ```ignore
//! let Some(real) = support::real::Real::new("my_test") else { return };
//! let runtime = real.runtime();
//! ```
//!
//! Without the variable, [`Real::new`] prints one line saying the test was
//! skipped and why, and returns `None`: a skipped test never passes
//! silently.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use bottle::runtime::smolvm::SmolvmRuntime;

pub const VAR: &str = "BOTTLE_TEST_REAL_SMOLVM";

pub struct Real {
    binary: PathBuf,
    data: tempfile::TempDir,
}

impl Real {
    /// The real smolvm with an empty data directory, or `None` (with a
    /// line on stderr) when `BOTTLE_TEST_REAL_SMOLVM` is not set.
    pub fn new(test: &str) -> Option<Self> {
        let Some(binary) = std::env::var_os(VAR).filter(|v| !v.is_empty()) else {
            // Straight to the process's stderr: the test harness captures
            // `eprintln!` of passing tests, and a skip must show.
            use std::io::Write;
            let line = format!(
                "SKIPPED {test}: {VAR} is not set (the path of a real smolvm CLI; \
                 .ci/run sets it when ../shared/tools/smolvm-1.9.2/smolvm exists)\n"
            );
            let _ = std::io::stderr().write_all(line.as_bytes());
            return None;
        };
        let binary = PathBuf::from(binary);
        assert!(
            binary.is_file(),
            "{VAR}={} is not a file: fix the variable or unset it",
            binary.display()
        );
        Some(Self {
            binary,
            data: tempfile::Builder::new()
                .prefix("smolvm-data-")
                .tempdir()
                .expect("a temporary SMOLVM_DATA_DIR"),
        })
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Its `SMOLVM_DATA_DIR`.
    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// bottle's driver over it.
    pub fn runtime(&self) -> SmolvmRuntime {
        SmolvmRuntime::new(Some(self.binary.clone()))
            .expect("the real smolvm is executable")
            .with_env("SMOLVM_DATA_DIR", self.data.path())
    }

    /// `smolvm ARGS` with this data directory, stdin closed.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .args(args)
            .env("SMOLVM_DATA_DIR", self.data.path())
            .stdin(Stdio::null());
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("running smolvm")
    }

    /// `machine ls --json`, parsed.
    pub fn list_json(&self) -> Vec<serde_json::Value> {
        let output = self.run(&["machine", "ls", "--json"]);
        assert!(
            output.status.success(),
            "ls: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("ls --json is JSON")
    }

    /// The names `ls` reports, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .list_json()
            .iter()
            .map(|m| m["name"].as_str().expect("a name").to_owned())
            .collect();
        names.sort();
        names
    }
}

/// No VM runs here, but a test that failed half-way may leave records:
/// the data directory goes with the test either way.
impl Drop for Real {
    fn drop(&mut self) {
        for name in self.names_quietly() {
            let _ = self.run(&["machine", "delete", "--name", &name, "-f"]);
        }
    }
}

impl Real {
    fn names_quietly(&self) -> Vec<String> {
        let output = self.run(&["machine", "ls", "--json"]);
        serde_json::from_slice::<Vec<serde_json::Value>>(&output.stdout)
            .unwrap_or_default()
            .iter()
            .filter_map(|m| m["name"].as_str().map(str::to_owned))
            .collect()
    }
}
