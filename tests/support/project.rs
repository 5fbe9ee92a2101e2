//! A manifests directory copied from `tests/fixtures/`, the real `bottle`
//! binary driving a [`Double`] over it, and a guard that deletes every
//! machine of the double when the test ends (pass or fail).
//!
//! ```ignore
//! let p = Project::new("e2e");
//! p.bottle(&["apply"]).success();          // bottle apply <copy of the fixture>
//! p.double.sh("bottle_e2e_coder", "cat /home/node/.bottle/prompt.md");
//! ```

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::Double;

/// A `bottle` run: exit code and both streams.
#[derive(Debug, Clone)]
pub struct Run {
    pub args: Vec<String>,
    /// `None` when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from_output(args: Vec<String>, output: Output) -> Self {
        Self {
            args,
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Assert the exit code; returns the run for more checks.
    #[track_caller]
    pub fn code(&self, expected: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(expected),
            "`bottle {}` exited {:?}, expected {expected}\n--- stdout\n{}\n--- stderr\n{}",
            self.args.join(" "),
            self.code,
            self.stdout,
            self.stderr
        );
        self
    }

    #[track_caller]
    pub fn success(&self) -> &Self {
        self.code(0)
    }

    /// stdout then stderr.
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

pub struct Project {
    pub double: Double,
    dir: tempfile::TempDir,
    state: tempfile::TempDir,
    /// Every run so far, for checks over all output (secrets).
    runs: RefCell<Vec<Run>>,
}

impl Project {
    /// A copy of `tests/fixtures/<fixture>` with a fresh double.
    pub fn new(fixture: &str) -> Self {
        Self::with_double(fixture, Double::new())
    }

    pub fn with_double(fixture: &str, double: Double) -> Self {
        let dir = tempfile::tempdir().expect("temporary manifests dir");
        let source = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(fixture);
        copy_dir(&source, dir.path());
        Self {
            double,
            dir,
            state: tempfile::tempdir().expect("temporary state dir"),
            runs: RefCell::new(Vec::new()),
        }
    }

    pub fn binary() -> &'static Path {
        Path::new(env!("CARGO_BIN_EXE_bottle"))
    }

    /// The manifests directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    /// Write a file of the manifests directory (creating its parents).
    pub fn write(&self, relative: &str, text: &str) {
        let path = self.path(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    pub fn read(&self, relative: &str) -> String {
        std::fs::read_to_string(self.path(relative)).unwrap()
    }

    /// Replace `from` (which must occur) by `to` in a manifests file.
    #[track_caller]
    pub fn edit(&self, relative: &str, from: &str, to: &str) {
        let text = self.read(relative);
        assert!(text.contains(from), "{relative} has no {from:?}:\n{text}");
        self.write(relative, &text.replacen(from, to, 1));
    }

    /// `bottle --smolvm <double> --state-dir <tmp> ARGS... <manifests dir>`,
    /// stdin closed, ready for more environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = self.command_without_dir(args);
        command.arg(self.dir.path());
        command
    }

    /// Like [`Project::command`], without the manifests directory.
    pub fn command_without_dir(&self, args: &[&str]) -> Command {
        self.command_in_state_dir(self.state.path(), args)
    }

    /// `bottle` as another user of the same machines would run it: its own
    /// state directory (another `HOME`, CI), the same runtime.
    pub fn bottle_in_state_dir(&self, state: &Path, args: &[&str]) -> Run {
        let mut command = self.command_in_state_dir(state, args);
        command.arg(self.dir.path());
        self.run_command(args, command)
    }

    fn command_in_state_dir(&self, state: &Path, args: &[&str]) -> Command {
        let mut command = Command::new(Self::binary());
        command
            .arg("--smolvm")
            .arg(Double::binary())
            .arg("--state-dir")
            .arg(state)
            .args(args)
            .env_remove("BOTTLE_RUNTIME")
            .env_remove("BOTTLE_SMOLVM")
            .env_remove("BOTTLE_STATE_DIR")
            .env("COLUMNS", "100")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        self.double.apply_env(&mut command);
        command
    }

    /// Run `bottle ARGS... <manifests dir>`.
    pub fn bottle(&self, args: &[&str]) -> Run {
        self.run_command(args, self.command(args))
    }

    /// Run `bottle ARGS... <manifests dir>` with more environment (knobs).
    pub fn bottle_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut command = self.command(args);
        command.envs(env.iter().copied());
        self.run_command(args, command)
    }

    /// Run `bottle ARGS... <manifests dir>` without these variables (set by
    /// the double's knobs or the test's own environment).
    pub fn bottle_env_remove(&self, args: &[&str], remove: &[&str]) -> Run {
        let mut command = self.command(args);
        for key in remove {
            command.env_remove(key);
        }
        self.run_command(args, command)
    }

    /// Run `bottle ARGS...` (no manifests directory appended).
    pub fn bottle_raw(&self, args: &[&str]) -> Run {
        self.run_command(args, self.command_without_dir(args))
    }

    fn run_command(&self, args: &[&str], mut command: Command) -> Run {
        let output = command.output().expect("running bottle");
        let run = Run::from_output(args.iter().map(|a| a.to_string()).collect(), output);
        self.runs.borrow_mut().push(run.clone());
        run
    }

    /// Every run so far.
    pub fn runs(&self) -> Vec<Run> {
        self.runs.borrow().clone()
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        self.double.delete_all_machines();
    }
}

/// Copy a directory tree (files and directories only; `fs::copy` keeps
/// permission bits, so an executable skill script stays executable).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
