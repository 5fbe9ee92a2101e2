//! A smolvm double for integration tests: `smolvm-double` with a home of its
//! own, the driver pointed at it, and its call log.
//!
//! ```ignore
//! mod support;
//! let double = support::Double::new();
//! let runtime = double.runtime();          // SmolvmRuntime over the double
//! runtime.create(&spec)?;
//! assert_eq!(double.mutating_calls(), 1);
//! ```

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use bottle::runtime::smolvm::SmolvmRuntime;
use serde::Deserialize;

/// Verbs that change a machine. `exec` is counted apart: bottle's observe
/// step probes running machines with one `exec` each.
pub const MUTATING_VERBS: &[&str] = &["create", "start", "stop", "delete", "update", "cp"];

/// One line of the double's `calls.jsonl`.
#[derive(Debug, Clone, Deserialize)]
pub struct Call {
    pub verb: String,
    pub args: Vec<String>,
    /// `None` for a call that hung or was killed.
    pub exit: Option<i32>,
    #[serde(default)]
    pub note: Option<String>,
    pub time_ms: u64,
}

pub struct Double {
    home: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl Default for Double {
    fn default() -> Self {
        Self::new()
    }
}

impl Double {
    /// A double with an empty home, whose `--allow-host` names all resolve
    /// (`SMOLVM_DOUBLE_RESOLVE=any`): tests need no DNS.
    pub fn new() -> Self {
        Self {
            home: tempfile::tempdir().expect("temporary home"),
            env: vec![("SMOLVM_DOUBLE_RESOLVE".into(), "any".into())],
        }
    }

    /// Set a knob (or any variable) for every later call.
    pub fn with_env(mut self, key: &str, value: &str) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn binary() -> &'static Path {
        Path::new(env!("CARGO_BIN_EXE_smolvm-double"))
    }

    pub fn home(&self) -> &Path {
        self.home.path()
    }

    /// The production driver, running the double. `SMOLVM_DATA_DIR` is the
    /// double's home too, so the driver's writer lock (beside smolvm's data
    /// directory) is this double's own, not one shared by every test.
    pub fn runtime(&self) -> SmolvmRuntime {
        let mut runtime = SmolvmRuntime::new(Some(Self::binary().to_path_buf()))
            .expect("the double is built")
            .with_env("SMOLVM_DOUBLE_HOME", self.home.path())
            .with_env("SMOLVM_DATA_DIR", self.home.path());
        for (key, value) in &self.env {
            runtime = runtime.with_env(key, value);
        }
        runtime
    }

    /// `smolvm-double ARGS` with this double's home and knobs, stdin closed.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(Self::binary());
        command
            .args(args)
            .env("SMOLVM_DOUBLE_HOME", self.home.path())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("running smolvm-double")
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        let text =
            std::fs::read_to_string(self.home.path().join("calls.jsonl")).unwrap_or_default();
        text.lines()
            .map(|line| serde_json::from_str(line).expect("a call log line"))
            .collect()
    }

    pub fn count(&self, verb: &str) -> usize {
        self.calls().iter().filter(|call| call.verb == verb).count()
    }

    /// Calls that can change a machine (see [`MUTATING_VERBS`]).
    pub fn mutating_calls(&self) -> usize {
        self.calls()
            .iter()
            .filter(|call| MUTATING_VERBS.contains(&call.verb.as_str()))
            .count()
    }

    /// Make `ls`/`status` report `state` for `name` until the next `start`,
    /// `stop` or `delete` of it.
    pub fn force_state(&self, name: &str, state: &str) {
        let path = self.home.path().join("states.json");
        let mut states: serde_json::Map<String, serde_json::Value> = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        states.insert(name.into(), state.into());
        std::fs::write(&path, serde_json::Value::Object(states).to_string()).expect("states.json");
    }

    /// The data folder smolvm keeps per machine name.
    pub fn data_dir(&self, name: &str) -> PathBuf {
        self.home.path().join("data").join(name)
    }
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

// --- Added for the end-to-end tests (tests/e2e.rs, tests/cli.rs) -----------

pub mod project;
pub mod real;

impl Double {
    /// Set this double's home and knobs on a command (a `bottle` run that
    /// drives the double, say).
    pub fn apply_env(&self, command: &mut Command) {
        command
            .env("SMOLVM_DOUBLE_HOME", self.home.path())
            .env("SMOLVM_DATA_DIR", self.home.path())
            .envs(self.env.iter().map(|(k, v)| (k, v)));
    }

    /// `machine ls --json`, parsed.
    pub fn list_json(&self) -> Vec<serde_json::Value> {
        let output = self.run(&["machine", "ls", "--json"]);
        assert!(output.status.success(), "ls: {}", stderr(&output));
        serde_json::from_slice(&output.stdout).expect("ls --json is JSON")
    }

    /// One machine as `ls --json` reports it.
    pub fn machine_json(&self, name: &str) -> Option<serde_json::Value> {
        self.list_json()
            .into_iter()
            .find(|m| m["name"].as_str() == Some(name))
    }

    /// `machine exec --name NAME -- ARGV...` (as root, like smolvm).
    pub fn exec(&self, name: &str, argv: &[&str]) -> Output {
        let mut args = vec!["machine", "exec", "--name", name, "--"];
        args.extend_from_slice(argv);
        self.run(&args)
    }

    /// `sh -c SCRIPT` in the guest as root; its stdout, asserting success.
    pub fn sh(&self, name: &str, script: &str) -> String {
        let output = self.exec(name, &["sh", "-c", script]);
        assert!(
            output.status.success(),
            "`{script}` in {name} failed ({:?}): {}",
            output.status.code(),
            stderr(&output)
        );
        stdout(&output)
    }

    /// Delete every machine of this double, stopping it first (the sandbox
    /// processes of running machines outlive their home otherwise).
    /// Knobs are left out: a test's injected failure or hang must not
    /// keep its machines alive.
    pub fn delete_all_machines(&self) {
        let plain = |args: &[&str]| {
            Command::new(Self::binary())
                .args(args)
                .env("SMOLVM_DOUBLE_HOME", self.home.path())
                .env("SMOLVM_DOUBLE_RESOLVE", "any")
                .stdin(Stdio::null())
                .output()
        };
        let Ok(output) = plain(&["machine", "ls", "--json"]) else {
            return;
        };
        let machines: Vec<serde_json::Value> =
            serde_json::from_slice(&output.stdout).unwrap_or_default();
        for machine in machines {
            if let Some(name) = machine["name"].as_str() {
                let _ = plain(&["machine", "delete", "--name", name, "-f"]);
            }
        }
    }
}

/// Machines are bubblewrap sandboxes whose init outlives the test process:
/// whatever a test created goes with its double, even when the test fails.
impl Drop for Double {
    fn drop(&mut self) {
        self.delete_all_machines();
    }
}
