//! The production runtime: the real `smolvm` CLI, driven through duct.
//!
//! Every call runs `smolvm machine ...` with stdin closed, output captured
//! and a deadline; a call that outlives it is killed and reported as
//! [`RuntimeErrorKind::Timeout`]. Failures are read from smolvm's
//! `Error: <message>` line: the ones the reconciler acts on become
//! [`NotFound`](RuntimeErrorKind::NotFound),
//! [`AlreadyExists`](RuntimeErrorKind::AlreadyExists) and
//! [`NotRunning`](RuntimeErrorKind::NotRunning); anything else is
//! [`CommandFailed`](RuntimeErrorKind::CommandFailed) with the command, its
//! status and its stderr. The exact CLI is in `smolvm-cli.md`; the argv of
//! every call is in `argv`.
//!
//! Calls whose writes to smolvm's state database collide take turns
//! (`serial`): one at a time per database, across threads and bottle
//! processes; a call that still meets smolvm's `database is locked` is
//! retried with backoff. The
//! smolvm version is read once (`version`): older than 1.8 is refused, and
//! before 1.14 every root command is guarded against running as the
//! image's `USER`.

mod argv;
pub use argv::{AS_USER, ROOT_GUARD};
mod output;
mod process;
mod serial;
mod version;
pub use version::Version;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use miette::Diagnostic;
use thiserror::Error;

use super::{
    CopyOptions, ExecOutput, ExecRequest, MachineInfo, MachineSpec, MachineState, MachineUpdate,
    Runtime, RuntimeError, RuntimeErrorKind, RuntimeKind,
};

/// The `smolvm` binary could not be used.
#[derive(Debug, Error, Diagnostic)]
pub enum SmolvmSetupError {
    #[error("`smolvm` was not found on PATH")]
    #[diagnostic(
        code("bottle::smolvm::not-found"),
        help(
            "install smolvm (https://github.com/smol-machines/smolvm), pass its path with \
             `--smolvm PATH` or BOTTLE_SMOLVM, or run the bottles in local sandboxes with \
             `--runtime local`"
        )
    )]
    NotOnPath,

    #[error("smolvm binary `{}` does not exist or is not executable", path.display())]
    #[diagnostic(
        code("bottle::smolvm::not-executable"),
        help(
            "point `--smolvm` / BOTTLE_SMOLVM at the smolvm executable, or run the bottles in \
             local sandboxes with `--runtime local`"
        )
    )]
    NotExecutable { path: PathBuf },
}

/// Drives the `smolvm` CLI.
#[derive(Debug, Clone)]
pub struct SmolvmRuntime {
    binary: PathBuf,
    call_timeout: Duration,
    start_timeout: Duration,
    exec_grace: Duration,
    env: Vec<(OsString, OsString)>,
    /// `smolvm --version`, read at the first call and shared by clones.
    version: Arc<OnceLock<Result<Version, VersionProblem>>>,
}

/// Why the version gate refused the binary (kept to answer every call).
#[derive(Debug, Clone)]
enum VersionProblem {
    TooOld(Version),
    Unreadable(String),
}

impl SmolvmRuntime {
    /// Deadline of every call but `start` and `exec`.
    pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(120);
    /// `start` pulls the image on first boot, so it gets longer.
    pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(900);
    /// `exec` gets its request's timeout (which smolvm enforces in the
    /// guest) plus this, for smolvm to connect and report.
    pub const DEFAULT_EXEC_GRACE: Duration = Duration::from_secs(30);

    /// Use `binary`, or `smolvm` found on PATH when `None`. A binary given
    /// without a directory (`smolvm-1.9`) is also looked up on PATH.
    pub fn new(binary: Option<PathBuf>) -> Result<Self, SmolvmSetupError> {
        let binary = match binary {
            Some(path) if path.components().count() > 1 || path.is_absolute() => {
                if is_executable(&path) {
                    std::path::absolute(&path).unwrap_or(path)
                } else {
                    return Err(SmolvmSetupError::NotExecutable { path });
                }
            }
            Some(name) => find_on_path(name.as_os_str())
                .ok_or(SmolvmSetupError::NotExecutable { path: name })?,
            None => find_on_path("smolvm".as_ref()).ok_or(SmolvmSetupError::NotOnPath)?,
        };
        Ok(Self {
            binary,
            call_timeout: Self::DEFAULT_CALL_TIMEOUT,
            start_timeout: Self::DEFAULT_START_TIMEOUT,
            exec_grace: Self::DEFAULT_EXEC_GRACE,
            env: Vec::new(),
            version: Arc::new(OnceLock::new()),
        })
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Set an environment variable for every smolvm call (on top of the
    /// inherited environment, which smolvm reads `--secret-env` values from).
    pub fn with_env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    fn command(&self, args: &[OsString]) -> String {
        process::display_command(&self.binary, args)
    }

    /// A variable as smolvm will see it: set for its calls, or inherited.
    fn smolvm_env(&self, name: &str) -> Option<OsString> {
        match self.env.iter().rev().find(|(key, _)| key == name) {
            Some((_, value)) => Some(value.clone()),
            None => std::env::var_os(name),
        }
    }

    /// The file whose `flock` bottle's writers of this smolvm database take
    /// turns on; `None` when smolvm's data directory cannot be told (no
    /// HOME): then only the retries guard against the lock error.
    pub fn writer_lock_path(&self) -> Option<PathBuf> {
        serial::smolvm_data_dir(|name| self.smolvm_env(name)).map(|dir| serial::lock_path(&dir))
    }

    /// The smolvm version, read once (`smolvm --version`) and gated.
    pub fn version(&self) -> Result<Version, RuntimeError> {
        let checked = self.version.get_or_init(|| {
            let args = [OsString::from("--version")];
            let output = process::run(&self.binary, &args, &self.env, self.call_timeout)
                .map_err(|kind| VersionProblem::Unreadable(kind.to_string()))?;
            let stdout = String::from_utf8_lossy(&output.stdout);
            let version = Version::parse(&stdout).ok_or_else(|| {
                VersionProblem::Unreadable(format!(
                    "`{}` printed {:?}, not `smolvm X.Y.Z`",
                    self.command(&args),
                    stdout.trim()
                ))
            })?;
            if version < Version::MINIMUM {
                return Err(VersionProblem::TooOld(version));
            }
            Ok(version)
        });
        checked.clone().map_err(|problem| {
            let kind = match problem {
                VersionProblem::TooOld(found) => RuntimeErrorKind::UnsupportedVersion {
                    binary: self.binary.display().to_string(),
                    found: found.to_string(),
                    minimum: Version::MINIMUM.to_string(),
                },
                VersionProblem::Unreadable(detail) => RuntimeErrorKind::Malformed {
                    command: format!("{} --version", self.binary.display()),
                    detail,
                },
            };
            RuntimeError::new("version", "-", kind)
        })
    }

    /// Whether `ls` reports `name` running (false when it cannot say).
    fn is_running(&self, name: &str) -> bool {
        let args = argv::list();
        self.run("list", "-", &args, self.call_timeout)
            .ok()
            .filter(|output| output.status.success())
            .and_then(|output| output::parse_list(&output.stdout, "").ok())
            .is_some_and(|machines| {
                machines
                    .iter()
                    .any(|m| m.name == name && m.state == MachineState::Running)
            })
    }

    fn as_root(&self, version: Version) -> argv::AsRoot {
        if version.has_exec_user() {
            argv::AsRoot::Flag
        } else {
            argv::AsRoot::Guard
        }
    }

    /// Run one call; its output whatever the exit status.
    fn run(
        &self,
        op: &'static str,
        machine: &str,
        args: &[OsString],
        timeout: Duration,
    ) -> Result<Output, RuntimeError> {
        process::run(&self.binary, args, &self.env, timeout)
            .map_err(|kind| RuntimeError::new(op, machine, kind))
    }

    /// Run one call that must succeed: after the version gate, taking turns
    /// with bottle's other writers when it writes, and again (with backoff)
    /// while smolvm answers that its database is locked.
    fn run_ok(
        &self,
        op: &'static str,
        machine: &str,
        args: Vec<OsString>,
        timeout: Duration,
    ) -> Result<Output, RuntimeError> {
        self.version()?;
        let lock_path = serial::takes_turns(op)
            .then(|| self.writer_lock_path())
            .flatten();
        let mut attempt = 1;
        loop {
            let guard = match &lock_path {
                Some(path) => Some(serial::lock(path).map_err(|source| {
                    RuntimeError::new(
                        op,
                        machine,
                        RuntimeErrorKind::Io {
                            context: format!("locking {}", path.display()),
                            source,
                        },
                    )
                })?),
                None => None,
            };
            let output = self.run(op, machine, &args, timeout)?;
            drop(guard);
            if output.status.success() {
                return Ok(output);
            }
            let status = process::status_code(&output);
            let stderr = String::from_utf8_lossy(&output.stderr);
            if serial::is_database_locked(status, &stderr) {
                // `start` writes the machine's record after it booted: a
                // machine that runs has started, whatever its last write
                // said; one that does not is started again.
                if op == "start" && self.is_running(machine) {
                    return Ok(output);
                }
                if attempt < serial::ATTEMPTS {
                    attempt += 1;
                    std::thread::sleep(serial::backoff(attempt));
                    continue;
                }
                let kind = RuntimeErrorKind::DatabaseLocked {
                    command: self.command(&args),
                    attempts: attempt,
                    stderr: stderr.trim().to_owned(),
                };
                return Err(RuntimeError::new(op, machine, kind));
            }
            let kind = output::classify(&self.command(&args), status, &stderr);
            return Err(RuntimeError::new(op, machine, kind));
        }
    }
}

impl Runtime for SmolvmRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Smolvm
    }

    fn list(&self) -> Result<Vec<MachineInfo>, RuntimeError> {
        let args = argv::list();
        let output = self.run_ok("list", "-", args.clone(), self.call_timeout)?;
        output::parse_list(&output.stdout, &self.command(&args))
            .map_err(|kind| RuntimeError::new("list", "-", kind))
    }

    fn create(&self, spec: &MachineSpec) -> Result<(), RuntimeError> {
        self.run_ok("create", &spec.name, argv::create(spec), self.call_timeout)
            .map(drop)
    }

    fn start(&self, name: &str) -> Result<(), RuntimeError> {
        self.run_ok("start", name, argv::start(name), self.start_timeout)
            .map(drop)
    }

    fn stop(&self, name: &str) -> Result<(), RuntimeError> {
        // Exits 0 on a machine that is not running.
        self.run_ok("stop", name, argv::stop(name), self.call_timeout)
            .map(drop)
    }

    fn update(&self, name: &str, update: &MachineUpdate) -> Result<(), RuntimeError> {
        if update.is_empty() {
            return Ok(());
        }
        self.run_ok(
            "update",
            name,
            argv::update(name, update),
            self.call_timeout,
        )
        .map(drop)
    }

    fn delete(&self, name: &str) -> Result<(), RuntimeError> {
        self.run_ok("delete", name, argv::delete(name), self.call_timeout)
            .map(drop)
    }

    fn exec(&self, name: &str, request: &ExecRequest) -> Result<ExecOutput, RuntimeError> {
        let version = self.version()?;
        let as_root = self.as_root(version);
        let args = argv::exec(name, request, as_root);
        let output = self.run("exec", name, &args, request.timeout + self.exec_grace)?;
        let status = process::status_code(&output);
        let stderr = String::from_utf8_lossy(&output.stderr);
        // A signal death is smolvm dying, not the command: the command's
        // status never reached us.
        if process::killed_by_signal(&output)
            || output::is_smolvm_exec_failure(status, &stderr)
            || output::is_usage_error(status, &stderr)
        {
            let kind = output::classify(&self.command(&args), status, &stderr);
            return Err(RuntimeError::new("exec", name, kind));
        }
        if as_root == argv::AsRoot::Guard
            && let Some((uid, user)) = output::not_root(status, &stderr)
        {
            let kind = RuntimeErrorKind::ExecNotRoot {
                uid,
                user,
                version: version.to_string(),
            };
            return Err(RuntimeError::new("exec", name, kind));
        }
        Ok(ExecOutput {
            status,
            stdout: output.stdout,
            stderr: output.stderr,
        })
    }

    fn copy_in(
        &self,
        name: &str,
        host_path: &Path,
        guest_path: &str,
        options: &CopyOptions,
    ) -> Result<(), RuntimeError> {
        check_guest_path("copy", name, guest_path)?;
        let io = |context: String| {
            move |source| RuntimeError::new("copy", name, RuntimeErrorKind::Io { context, source })
        };
        let host_path = std::path::absolute(host_path)
            .map_err(io(format!("resolving {}", host_path.display())))?;
        // smolvm reads `NAME:PATH` from whichever side has a colon, checking
        // the source first: a host path with a colon is copied to one without.
        let staged;
        let source = if host_path.as_os_str().as_encoded_bytes().contains(&b':') {
            staged = tempfile::NamedTempFile::new().map_err(io("staging a copy".into()))?;
            std::fs::copy(&host_path, staged.path())
                .map_err(io(format!("staging {}", host_path.display())))?;
            staged.path().to_path_buf()
        } else {
            host_path
        };
        self.run_ok(
            "copy",
            name,
            argv::copy_in(name, &source, guest_path, options),
            self.call_timeout,
        )
        .map(drop)
    }

    fn read_file(&self, name: &str, guest_path: &str) -> Result<Vec<u8>, RuntimeError> {
        check_guest_path("read", name, guest_path)?;
        let io = |context: &str| {
            let context = context.to_owned();
            move |source| RuntimeError::new("read", name, RuntimeErrorKind::Io { context, source })
        };
        let dir = tempfile::tempdir().map_err(io("creating a temporary directory"))?;
        let local = dir.path().join("file");
        self.run_ok(
            "read",
            name,
            argv::copy_out(name, guest_path, &local),
            self.call_timeout,
        )?;
        std::fs::read(&local).map_err(io(&format!("reading the copy of {guest_path}")))
    }

    fn interactive_argv(&self, name: &str, request: &ExecRequest) -> Vec<String> {
        // The version was read by the calls before (attach observes first);
        // a binary that cannot say keeps the guard.
        let as_root = self
            .version()
            .map_or(argv::AsRoot::Guard, |version| self.as_root(version));
        argv::interactive(&self.binary, name, request, as_root)
    }
}

fn check_guest_path(op: &'static str, name: &str, guest_path: &str) -> Result<(), RuntimeError> {
    if guest_path.starts_with('/') {
        Ok(())
    } else {
        Err(RuntimeError::new(
            op,
            name,
            RuntimeErrorKind::Unsupported(format!("guest path `{guest_path}` is not absolute")),
        ))
    }
}

fn find_on_path(name: &std::ffi::OsStr) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explicit_binary_must_be_executable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("smolvm");
        std::fs::write(&path, "#!/bin/sh\n").unwrap();
        let error = SmolvmRuntime::new(Some(path.clone())).unwrap_err();
        assert!(matches!(&error, SmolvmSetupError::NotExecutable { path: p } if *p == path));

        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            SmolvmRuntime::new(Some(path.clone())).unwrap().binary(),
            path
        );
    }

    #[test]
    fn a_bare_name_is_looked_up_on_path() {
        let runtime = SmolvmRuntime::new(Some("sh".into())).unwrap();
        assert!(runtime.binary().is_absolute());
        assert!(matches!(
            SmolvmRuntime::new(Some("no-such-smolvm-binary".into())),
            Err(SmolvmSetupError::NotExecutable { .. })
        ));
    }

    #[test]
    fn the_missing_binary_diagnostic_says_what_to_do() {
        let help = SmolvmSetupError::NotOnPath.help().unwrap().to_string();
        assert!(
            help.contains("--runtime local") && help.contains("--smolvm"),
            "{help}"
        );
    }

    /// A stand-in smolvm: prints `version` for `--version` (logging each
    /// time it is asked) and `[]` for anything else.
    fn fake_smolvm(dir: &Path, version: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("smolvm");
        let log = dir.join("asked");
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\nif [ \"$1\" = --version ]; then echo x >> '{}'; echo '{version}'; \
                 exit 0; fi\necho '[]'\n",
                log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn the_version_is_read_once_per_run_and_gates_every_call() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = SmolvmRuntime::new(Some(fake_smolvm(dir.path(), "smolvm 1.9.2"))).unwrap();
        let clone = runtime.clone();
        assert_eq!(runtime.version().unwrap(), Version(1, 9, 2));
        assert!(runtime.list().unwrap().is_empty());
        assert!(clone.list().unwrap().is_empty());
        let asked = std::fs::read_to_string(dir.path().join("asked")).unwrap();
        assert_eq!(asked.lines().count(), 1, "smolvm --version asked {asked:?}");
    }

    #[test]
    fn a_smolvm_older_than_1_8_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = SmolvmRuntime::new(Some(fake_smolvm(dir.path(), "smolvm 1.7.3"))).unwrap();
        let error = runtime.list().unwrap_err();
        match &error.kind {
            RuntimeErrorKind::UnsupportedVersion { found, minimum, .. } => {
                assert_eq!((found.as_str(), minimum.as_str()), ("1.7.3", "1.8.0"));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            error.to_string().contains("smolvm 1.7.3 is too old"),
            "{error}"
        );
        let help = error.help().unwrap().to_string();
        assert!(help.contains("upgrade smolvm"), "{help}");
        // Every call, not only the first.
        assert!(matches!(
            runtime.delete("a").unwrap_err().kind,
            RuntimeErrorKind::UnsupportedVersion { .. }
        ));
    }

    #[test]
    fn a_binary_that_is_not_smolvm_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = SmolvmRuntime::new(Some(fake_smolvm(dir.path(), "docker 27.0"))).unwrap();
        match runtime.list().unwrap_err().kind {
            RuntimeErrorKind::Malformed { detail, .. } => {
                assert!(detail.contains("docker 27.0"), "{detail}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_writer_lock_sits_beside_the_data_dir_smolvm_will_use() {
        let runtime = SmolvmRuntime::new(Some("sh".into()))
            .unwrap()
            .with_env("SMOLVM_DATA_DIR", "/srv/smolvm-data");
        assert_eq!(
            runtime.writer_lock_path().unwrap(),
            Path::new("/srv/smolvm-data/.local/share/smolvm.bottle-writers.lock")
        );
    }

    #[test]
    fn relative_guest_paths_are_refused_before_any_call() {
        let error = check_guest_path("copy", "a", "etc/x").unwrap_err();
        assert!(matches!(error.kind, RuntimeErrorKind::Unsupported(_)));
    }
}
