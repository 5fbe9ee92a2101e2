//! What each provisioning step does inside a guest: apply, probe, undo.
//!
//! Every step kind owns one module with the same three pieces:
//! - `probe`: a shell fragment whose output describes what the step left in
//!   the guest. Observation runs the fragments of all of an agent's steps in
//!   one `exec`; the digest of a fragment's output is compared with the digest
//!   recorded in the ledger right after the step was applied, which is how
//!   in-guest drift shows.
//! - `apply`: make the guest match, then return the ledger entry to record.
//! - `undo`: remove what the ledger entry says the step owns.
//!
//! Every script a step runs in the guest holds the step's lock
//! ([`lock_preamble`]); probes take none. They only read: a probe beside a
//! step still running (left by a killed apply) may see its work half done,
//! and an apply then waits for that step before it redoes it. A probe that
//! waited for locks would hold up every `plan` and `check` behind a stuck
//! command.
//!
//! User data reaches guest shells only as positional arguments (`"$1"`),
//! never spliced into script text.

pub mod ca;
pub mod git;
pub mod machine;
pub mod prompt;
pub mod setup;
pub mod skills;
pub mod supervise;

use std::path::Path;
use std::time::Duration;

use miette::Diagnostic;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::graph::{MachineHashes, StepKind};
use crate::ledger::{self, LedgerEntry};
use crate::manifest::{Agent, Bottle, Project};
use crate::runtime::smolvm::AS_USER;
use crate::runtime::{CopyOptions, ExecRequest, Runtime, RuntimeError};

/// Everything a step needs to know about the agent it provisions.
#[derive(Debug, Clone, Copy)]
pub struct AgentCtx<'a> {
    pub project: &'a Project,
    pub agent: &'a Agent,
    pub bottle: &'a Bottle,
    pub machine: &'a str,
    pub machine_hashes: &'a MachineHashes,
    /// How the guest reaches its bottle's gate, when the bottle has one
    /// (known with the state directory: `None` for a bottle without a
    /// gate, or before the gate's state is loaded).
    pub gate: Option<&'a crate::gate::reconcile::AgentGate>,
}

impl<'a> AgentCtx<'a> {
    pub fn new(
        project: &'a Project,
        agent: &'a Agent,
        machine: &'a str,
        machine_hashes: &'a MachineHashes,
    ) -> Self {
        let bottle = &project.bottles[&agent.spec.bottle];
        Self {
            project,
            agent,
            bottle,
            machine,
            machine_hashes,
            gate: None,
        }
    }

    pub fn user(&self) -> &str {
        &self.bottle.spec.user
    }

    /// The agent user's home: `/root` for root, `/home/<user>` otherwise.
    pub fn home(&self) -> String {
        home_of(self.user())
    }
}

pub fn home_of(user: &str) -> String {
    if user == "root" {
        "/root".to_owned()
    } else {
        format!("/home/{user}")
    }
}

/// The agent user's numeric ids in the guest, learnt by the machine step
/// (or from its ledger entry) and needed to own copied files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestUser {
    pub uid: u32,
    pub gid: u32,
}

/// A step that could not be applied or undone.
#[derive(Debug, Error, Diagnostic)]
pub enum StepError {
    #[error(transparent)]
    #[diagnostic(transparent)]
    Runtime(#[from] RuntimeError),

    #[error("{what} failed in the guest (exit status {status}){}", output_suffix(.stderr))]
    #[diagnostic(help("{help}"))]
    Guest {
        what: String,
        status: i32,
        stderr: String,
        help: String,
    },

    #[error("machine {machine} has no `flock`, which bottle needs to run its steps one at a time")]
    #[diagnostic(help(
        "use an image that has `flock` (util-linux on Debian and Ubuntu, busybox's applet on \
         Alpine): every step needs it, setup steps included, so none can install it"
    ))]
    NoFlock { machine: String },

    #[error(
        "the {step} step is still running in machine {machine}, left by an interrupted bottle run \
         (waited {waited}s for its lock {lock})"
    )]
    #[diagnostic(help(
        "wait for that command to finish (`smolvm machine exec --name {machine} -- ps`), \
         then run `bottle apply` again"
    ))]
    StepBusy {
        machine: String,
        step: String,
        waited: u64,
        lock: String,
    },

    #[error("{0}")]
    #[diagnostic(help("{1}"))]
    Other(String, String),
}

pub type StepResult<T> = Result<T, StepError>;

/// `: <stderr>`, or a plain statement that there was none.
fn output_suffix(stderr: &str) -> String {
    match stderr.trim() {
        "" => ", with no error output".to_owned(),
        text => format!(": {text}"),
    }
}

/// Where the per-step locks live in the guest (root-only, 0700).
pub const LOCK_DIR: &str = "/var/lib/bottle/locks";

/// How long a step waits for its lock: the same step left running in the
/// guest by an interrupted bottle run (smolvm does not end a command whose
/// `machine exec` was killed). The exec's timeout grows by as much, so the
/// step itself keeps its whole budget once it has the lock.
pub const LOCK_WAIT: Duration = ExecRequest::DEFAULT_TIMEOUT;

/// Exit statuses of the lock preamble, told apart from the script's own by
/// the marker its message starts with.
const NO_FLOCK_STATUS: i32 = 97;
const LOCK_BUSY_STATUS: i32 = 98;
const LOCK_MARKER: &str = "bottle-lock:";

/// The guest file of a step's lock. Setup steps share one: within a run
/// they never run at once (two package installs fight over the package
/// manager's lock), and a command one of them left running must not meet
/// another's in the next run either.
pub fn lock_path(dir: &str, step: &str) -> String {
    match step.split_once(':') {
        Some(("setup", _)) => format!("{dir}/setup"),
        _ => format!("{dir}/{step}"),
    }
}

/// Shell that takes the exclusive lock of `step` on fd 9, waiting up to
/// `wait_secs` for it, before anything else runs. Everything a bottle
/// script does in the guest (apply, undo, the ledger write or removal that
/// follows) holds its step's lock, so a command left running by a killed
/// apply makes the next apply's same step wait instead of running beside it
/// (two `update-ca-certificates` at once garble the trust bundle). Polls
/// with `flock -n`: busybox `flock` has no `-w`. Commands the step runs for
/// the user (the agent user's, a setup step's) get fd 9 closed, so nothing
/// they leave running can hold the lock after the script ends.
pub fn lock_preamble(dir: &str, step: &str, wait_secs: u64) -> String {
    let path = sh_quote(&lock_path(dir, step));
    let dir = sh_quote(dir);
    format!(
        "command -v flock >/dev/null 2>&1 || {{ echo '{LOCK_MARKER} no flock' >&2; exit {NO_FLOCK_STATUS}; }}\n\
         (umask 077 && mkdir -p {dir}) && exec 9>{path} || exit 1\n\
         bottle_lock_waited=0\n\
         until flock -n 9; do\n\
         \x20 if [ \"$bottle_lock_waited\" -ge {wait_secs} ]; then echo '{LOCK_MARKER} busy' >&2; exit {LOCK_BUSY_STATUS}; fi\n\
         \x20 bottle_lock_waited=$((bottle_lock_waited+1)); sleep 1\n\
         done\n\
         unset bottle_lock_waited\n"
    )
}

/// `body` as a root script holding `step`'s lock.
fn locked_script(dir: &str, step: &str, wait_secs: u64, body: &str) -> String {
    format!("{}{body}", lock_preamble(dir, step, wait_secs))
}

/// A root script that holds `step`'s lock and runs `$2` as the user `$1`
/// (through `as_user`, which runs `"$@"` as the user named by `$0`) with
/// the rest of its arguments. Not `exec`: the shell must stay, holding the
/// lock, while the user's command runs without fd 9.
fn locked_user_script(dir: &str, step: &str, wait_secs: u64, as_user: &str) -> String {
    format!(
        "{}bottle_user=\"$1\"; bottle_body=\"$2\"; shift 2\n\
         sh -c {} \"$bottle_user\" sh -c \"$bottle_body\" sh \"$@\" 9>&-\n",
        lock_preamble(dir, step, wait_secs),
        sh_quote(as_user)
    )
}

/// Run a root shell script in the guest with positional arguments, holding
/// `step`'s guest lock; a non-zero exit is an error that quotes the guest's
/// stderr.
pub fn run_script(
    rt: &dyn Runtime,
    machine: &str,
    step: &str,
    what: &str,
    script: &str,
    args: &[&str],
    help: &str,
) -> StepResult<String> {
    run_script_as(
        rt,
        machine,
        step,
        None,
        what,
        script,
        args,
        help,
        ExecRequest::DEFAULT_TIMEOUT,
    )
}

/// Run a script holding `step`'s guest lock, as root or as `user`. The
/// exec itself is always root's: only root can take the lock (the agent
/// user must not be able to hold it), and the script drops to the user
/// with smolvm's own wrapper ([`AS_USER`]).
#[allow(clippy::too_many_arguments)]
pub fn run_script_as(
    rt: &dyn Runtime,
    machine: &str,
    step: &str,
    user: Option<&str>,
    what: &str,
    script: &str,
    args: &[&str],
    help: &str,
    timeout: Duration,
) -> StepResult<String> {
    let wait = LOCK_WAIT.as_secs();
    let mut argv = vec!["sh".to_owned(), "-c".to_owned()];
    match user {
        None => argv.extend([locked_script(LOCK_DIR, step, wait, script), "sh".to_owned()]),
        Some(user) => argv.extend([
            locked_user_script(LOCK_DIR, step, wait, AS_USER),
            "sh".to_owned(),
            user.to_owned(),
            script.to_owned(),
        ]),
    }
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    let out = rt.exec(
        machine,
        &ExecRequest::new(argv).timeout(timeout + LOCK_WAIT),
    )?;
    if !out.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if let Some(error) = lock_failure(machine, step, out.status, &stderr) {
            return Err(error);
        }
        return Err(StepError::Guest {
            what: what.to_owned(),
            status: out.status,
            stderr: tail(&stderr, 2000),
            help: help.to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The lock preamble's own failures, which say nothing about the step.
fn lock_failure(machine: &str, step: &str, status: i32, stderr: &str) -> Option<StepError> {
    let message = stderr.lines().last()?.strip_prefix(LOCK_MARKER)?.trim();
    match (status, message) {
        (NO_FLOCK_STATUS, "no flock") => Some(StepError::NoFlock {
            machine: machine.to_owned(),
        }),
        (LOCK_BUSY_STATUS, "busy") => Some(StepError::StepBusy {
            machine: machine.to_owned(),
            // Setup steps share their lock: any of them may hold it.
            step: match step.split_once(':') {
                Some(("setup", _)) => "setup".to_owned(),
                _ => step.to_owned(),
            },
            waited: LOCK_WAIT.as_secs(),
            lock: lock_path(LOCK_DIR, step),
        }),
        _ => None,
    }
}

/// Copy bytes into the guest (through a private host temp file, since
/// runtimes copy files).
pub fn upload(
    rt: &dyn Runtime,
    machine: &str,
    bytes: &[u8],
    guest_path: &str,
    options: &CopyOptions,
) -> StepResult<()> {
    use std::io::Write;
    let mut tmp = tempfile::NamedTempFile::new().map_err(|e| {
        StepError::Other(
            format!("cannot create a temporary file: {e}"),
            "check that the temporary directory is writable".into(),
        )
    })?;
    tmp.write_all(bytes)
        .and_then(|_| tmp.flush())
        .map_err(|e| {
            StepError::Other(
                format!("cannot write a temporary file: {e}"),
                "check free space in the temporary directory".into(),
            )
        })?;
    rt.copy_in(machine, tmp.path(), guest_path, options)?;
    Ok(())
}

/// Upload a host file.
pub fn upload_file(
    rt: &dyn Runtime,
    machine: &str,
    host: &Path,
    guest_path: &str,
    options: &CopyOptions,
) -> StepResult<()> {
    rt.copy_in(machine, host, guest_path, options)?;
    Ok(())
}

/// Pack `paths` into one archive and [`stage`] it for `user` (root for
/// setup inputs).
pub fn stage_tree(
    rt: &dyn Runtime,
    machine: &str,
    paths: &[std::path::PathBuf],
    user: GuestUser,
) -> StepResult<String> {
    stage(
        rt,
        machine,
        &tar_paths(paths.iter().map(|p| p.as_path()))?,
        user,
    )
}

/// A tar archive holding each path (file or directory) at its top level
/// under its own name, with modification times kept (owners are set in the
/// guest). Symlinks are archived as links, never followed, so nothing
/// outside a skill directory is copied.
pub fn tar_paths<'a>(paths: impl Iterator<Item = &'a Path>) -> StepResult<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    for path in paths {
        let name = path.file_name().unwrap_or_default();
        let result = if path.is_dir() {
            builder.append_dir_all(name, path)
        } else {
            builder.append_path_with_name(path, name)
        };
        result.map_err(|e| {
            StepError::Other(
                format!("cannot read {}: {e}", path.display()),
                "check that the path exists and is readable".into(),
            )
        })?;
    }
    builder.into_inner().map_err(|e| {
        StepError::Other(
            format!("cannot build an archive: {e}"),
            "check free memory".into(),
        )
    })
}

/// Where files bound for the agent's home are staged (created by the
/// machine step, mode 0711: enterable, not listable).
pub const STAGE_DIR: &str = "/var/lib/bottle-stage";

/// Stage `bytes` for the agent user: a file under an unguessable name in
/// [`STAGE_DIR`], owned by the user, mode 0600. Everything that lands in the
/// agent's home is written *by the agent user* from such a file, so a
/// symlink the agent planted in its home can never make root write, chown
/// or delete anything outside it.
pub fn stage(rt: &dyn Runtime, machine: &str, bytes: &[u8], user: GuestUser) -> StepResult<String> {
    let name: String = std::iter::repeat_with(fastrand::alphanumeric)
        .take(24)
        .collect();
    let path = format!("{STAGE_DIR}/{name}");
    let owner = CopyOptions {
        mode: 0o600,
        uid: user.uid,
        gid: user.gid,
    };
    upload(rt, machine, bytes, &path, &owner)?;
    Ok(path)
}

/// Run a script as the agent user (home writes and removals), holding
/// `step`'s guest lock.
#[allow(clippy::too_many_arguments)]
pub fn run_as_agent(
    rt: &dyn Runtime,
    ctx: &AgentCtx,
    step: &str,
    user_name: &str,
    what: &str,
    script: &str,
    args: &[&str],
    help: &str,
) -> StepResult<String> {
    let script = format!("export HOME={}\n{script}", sh_quote(&home_of(user_name)));
    run_script_as(
        rt,
        ctx.machine,
        step,
        Some(user_name),
        what,
        &script,
        args,
        help,
        ExecRequest::DEFAULT_TIMEOUT,
    )
}

/// Record a ledger entry in the guest, removing staged files.
pub fn record(
    rt: &dyn Runtime,
    machine: &str,
    entry: &LedgerEntry,
    staged: &[String],
) -> StepResult<()> {
    let json = serde_json::to_string(entry).expect("ledger entries serialize");
    let mut args = vec![json.as_str()];
    args.extend(staged.iter().map(String::as_str));
    run_script(
        rt,
        machine,
        &entry.step,
        "recording the ledger entry",
        &format!("{}\nshift; rm -f \"$@\"", ledger::write_script(&entry.step)),
        &args,
        "check free space in the guest's /var",
    )?;
    Ok(())
}

/// The digest of a probe fragment's output, byte for byte: the probe
/// hex-encodes each section, so it sees exactly what the apply script saw.
pub fn digest(output: &str) -> String {
    sha256_hex(output.as_bytes())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(bytes);
    let out = h.finalize();
    let mut s = String::with_capacity(64);
    for b in out {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Quote a string for a POSIX shell.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c))
    {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn tail(s: &str, max: usize) -> String {
    let s = s.trim();
    if s.len() <= max {
        return s.to_owned();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &s[start..])
}

/// The probe fragment of a step, or `None` for steps that cannot be probed.
pub fn probe_fragment(kind: &StepKind, ctx: &AgentCtx) -> Option<String> {
    match kind {
        StepKind::Machine => Some(machine::probe(ctx)),
        StepKind::Ca => Some(ca::probe(ctx)),
        StepKind::Prompt => Some(prompt::probe(ctx)),
        StepKind::Skills => Some(skills::probe(ctx)),
        StepKind::Git => Some(git::probe(ctx)),
        StepKind::Setup(_) => None,
        StepKind::Supervise => Some(supervise::probe(ctx)),
    }
}

/// The digest of a step's probe output.
pub fn probe_digest(kind: &StepKind, output: &str) -> String {
    match kind {
        StepKind::Supervise => supervise::digest_of_config(output),
        _ => digest(output),
    }
}

/// The guest path a drifted step is reported by.
pub fn drift_path(kind: &StepKind, ctx: &AgentCtx) -> String {
    match kind {
        StepKind::Machine => format!("user {}", ctx.user()),
        StepKind::Ca => ca::cert_path(ctx),
        StepKind::Prompt => prompt::guest_path(ctx),
        StepKind::Skills => skills::skills_dir(ctx),
        StepKind::Git => format!("{}/.gitconfig", ctx.home()),
        StepKind::Setup(name) => setup::inputs_dir(name),
        StepKind::Supervise => supervise::config_path(ctx),
    }
}

/// The user a ledger entry's files belong to: recorded by the steps that
/// write into a home, else the agent's current user.
pub fn entry_user<'a>(entry: &'a LedgerEntry, ctx: &'a AgentCtx) -> &'a str {
    entry.detail_str("user").unwrap_or(ctx.user())
}

/// Apply one (non-machine) step and record it in the ledger.
pub fn apply(
    kind: &StepKind,
    hash: &str,
    ctx: &AgentCtx,
    user: GuestUser,
    previous: Option<&LedgerEntry>,
    rt: &dyn Runtime,
) -> StepResult<()> {
    // The agent user changed: what the step left in the old user's home
    // goes first, or it would be orphaned there.
    let previous = match previous {
        Some(p) if entry_user(p, ctx) != ctx.user() => {
            undo_step(p, ctx, rt)?;
            None
        }
        other => other,
    };
    let mut entry = LedgerEntry::new(kind, hash);
    let staged = match kind {
        StepKind::Machine => unreachable!("the machine step is applied by the machine actions"),
        StepKind::Ca => ca::apply(ctx, rt, &mut entry)?,
        StepKind::Prompt => prompt::apply(ctx, user, rt, &mut entry)?,
        StepKind::Skills => skills::apply(ctx, user, rt, previous, &mut entry)?,
        StepKind::Git => git::apply(ctx, rt, previous, &mut entry)?,
        StepKind::Setup(name) => setup::apply(ctx, name, rt, &mut entry)?,
        StepKind::Supervise => supervise::apply(ctx, user, rt, &mut entry)?,
    };
    if matches!(
        kind,
        StepKind::Prompt | StepKind::Skills | StepKind::Git | StepKind::Supervise
    ) {
        entry
            .detail
            .insert("user".into(), serde_json::json!(ctx.user()));
    }
    record(rt, ctx.machine, &entry, &staged)
}

/// Remove the files and directories a step owns in the agent's home, as the
/// user they belong to (the prompt file, the skill directories).
fn remove_owned_paths(entry: &LedgerEntry, ctx: &AgentCtx, rt: &dyn Runtime) -> StepResult<()> {
    let args: Vec<&str> = entry.paths.iter().map(String::as_str).collect();
    run_as_agent(
        rt,
        ctx,
        &entry.step,
        entry_user(entry, ctx),
        &format!("removing what the {} step left", entry.step),
        "rm -rf \"$@\"",
        &args,
        "check the agent user's home directory in the guest",
    )?;
    Ok(())
}

/// Undo what a step left in the guest (its ledger entry stays).
fn undo_step(entry: &LedgerEntry, ctx: &AgentCtx, rt: &dyn Runtime) -> StepResult<()> {
    match entry.step.parse::<StepKind>().ok() {
        Some(StepKind::Ca) => ca::undo(entry, ctx, rt),
        Some(StepKind::Prompt | StepKind::Skills) => remove_owned_paths(entry, ctx, rt),
        Some(StepKind::Git) => git::undo(entry, ctx, rt),
        Some(StepKind::Setup(name)) => setup::undo(&name, ctx, rt),
        Some(StepKind::Supervise) => supervise::undo(entry, ctx, rt),
        // The machine step is never undone (the machine is deleted instead);
        // an unknown step from a newer bottle is only forgotten.
        Some(StepKind::Machine) | None => Ok(()),
    }
}

/// Undo a step that left the manifest, then forget it.
pub fn undo(entry: &LedgerEntry, ctx: &AgentCtx, rt: &dyn Runtime) -> StepResult<()> {
    undo_step(entry, ctx, rt)?;
    run_script(
        rt,
        ctx.machine,
        &entry.step,
        "removing the ledger entry",
        &ledger::remove_script(&entry.step),
        &[],
        "check the guest's /var/lib/bottle",
    )?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    //! The lock scripts run for real, on the host's `sh` and `flock`, in a
    //! temporary lock directory; the runtime only carries them.

    use super::*;
    use std::fs::{File, OpenOptions};
    use std::process::{Command, Output, Stdio};
    use std::time::Instant;

    pub(crate) fn sh(script: &str, args: &[&str]) -> Command {
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(script)
            .arg("sh")
            .args(args)
            .stdin(Stdio::null());
        command
    }

    pub(crate) fn output(mut command: Command) -> Output {
        command.output().expect("running sh")
    }

    pub(crate) fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    fn lock_file(dir: &str, step: &str) -> File {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(lock_path(dir, step))
            .unwrap()
    }

    /// Hold a step's lock as an interrupted run's command would.
    fn hold(dir: &str, step: &str) -> File {
        let file = lock_file(dir, step);
        file.try_lock().expect("the lock is free");
        file
    }

    pub(crate) fn is_free(dir: &str, step: &str) -> bool {
        lock_file(dir, step).try_lock().is_ok()
    }

    /// A process a script left running (its pid printed), ended when the
    /// test ends, pass or fail.
    pub(crate) struct Daemon(pub(crate) i32);

    impl Drop for Daemon {
        fn drop(&mut self) {
            if let Some(pid) = rustix::process::Pid::from_raw(self.0) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }

    pub(crate) fn daemon_of(stdout: &str) -> Daemon {
        Daemon(
            stdout
                .lines()
                .find_map(|l| l.strip_prefix("daemon "))
                .expect("the script printed its daemon's pid")
                .parse()
                .unwrap(),
        )
    }

    fn temp_dir() -> (tempfile::TempDir, String) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("locks").to_str().unwrap().to_owned();
        (tmp, dir)
    }

    #[test]
    fn a_script_waits_for_its_step_lock_and_runs_once_it_is_free() {
        let (_tmp, dir) = temp_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let held = hold(&dir, "ca");
        // Another step's lock is another file: nothing waits for it.
        let other = output(sh(&locked_script(&dir, "prompt", 30, "echo ran"), &[]));
        assert_eq!(text(&other.stdout), "ran\n");

        let start = Instant::now();
        let mut waiting = sh(&locked_script(&dir, "ca", 30, "echo \"ran $1\""), &["once"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        assert!(
            waiting.try_wait().unwrap().is_none(),
            "the script ran while its step's lock was held"
        );
        drop(held);
        let out = waiting.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "ran once\n");
        assert!(start.elapsed() >= Duration::from_millis(1500));
        assert!(is_free(&dir, "ca"), "released when the script ends");
    }

    #[test]
    fn a_script_gives_up_when_its_step_lock_stays_held() {
        let (_tmp, dir) = temp_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let _held = hold(&dir, "setup:tools");
        let out = output(sh(&locked_script(&dir, "setup:tools", 1, "echo ran"), &[]));
        assert_eq!(out.status.code(), Some(LOCK_BUSY_STATUS));
        assert_eq!(text(&out.stdout), "", "the step never ran");
        let error = lock_failure("m1", "setup:tools", LOCK_BUSY_STATUS, &text(&out.stderr))
            .expect("recognised as the lock's own failure");
        let StepError::StepBusy { ref lock, .. } = error else {
            panic!("{error:?}");
        };
        assert_eq!(lock, "/var/lib/bottle/locks/setup");
        assert_eq!(
            error.to_string(),
            "the setup step is still running in machine m1, left by an interrupted \
             bottle run (waited 120s for its lock /var/lib/bottle/locks/setup)"
        );
        // The same status from the step's own command is the step's failure.
        assert!(lock_failure("m1", "ca", LOCK_BUSY_STATUS, "busy\n").is_none());
    }

    #[test]
    fn a_guest_without_flock_fails_naming_flock() {
        let (tmp, dir) = temp_dir();
        // An empty PATH: `command -v` finds no flock (nor anything else).
        let mut command = sh(&locked_script(&dir, "ca", 5, "echo ran"), &[]);
        command.env("PATH", tmp.path());
        let out = output(command);
        assert_eq!(out.status.code(), Some(NO_FLOCK_STATUS));
        assert_eq!(text(&out.stdout), "");
        let error = lock_failure("m1", "ca", NO_FLOCK_STATUS, &text(&out.stderr))
            .expect("recognised as the lock's own failure");
        assert!(matches!(error, StepError::NoFlock { .. }), "{error:?}");
        assert!(error.to_string().contains("`flock`"), "{error}");
        let help = miette::Diagnostic::help(&error).unwrap().to_string();
        assert!(help.contains("util-linux"), "{help}");
    }

    #[test]
    fn the_lock_directory_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let (_tmp, dir) = temp_dir();
        let out = output(sh(&locked_script(&dir, "ca", 5, "echo ran"), &[]));
        assert!(out.status.success(), "{}", text(&out.stderr));
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn agent_user_commands_do_not_inherit_the_lock() {
        let (_tmp, dir) = temp_dir();
        // What the agent runs starts a process that outlives the script.
        let body = "echo \"as $1\"; if [ -e /proc/$$/fd/9 ]; then echo fd9 open; else echo fd9 closed; fi; \
                    sleep 60 >/dev/null 2>&1 & echo \"daemon $!\"";

        // A root script's commands do inherit it (the check can fail)...
        let out = output(sh(&locked_script(&dir, "prompt", 5, body), &["root"]));
        let _daemon = daemon_of(&text(&out.stdout));
        assert!(text(&out.stdout).contains("fd9 open"), "{out:?}");
        assert!(!is_free(&dir, "prompt"), "the root daemon holds it");

        // ...the agent user's never do, so its daemon cannot hold the lock.
        // `exec "$@"` stands for smolvm's AS_USER wrapper, which drops to
        // the user named by $0 (the e2e tests run the real one).
        let script = locked_user_script(&dir, "skills", 5, "exec \"$@\"");
        let out = output(sh(&script, &["node", body, "agent"]));
        assert!(out.status.success(), "{}", text(&out.stderr));
        let _daemon = daemon_of(&text(&out.stdout));
        assert!(
            text(&out.stdout).starts_with("as agent\nfd9 closed\n"),
            "{out:?}"
        );
        assert!(is_free(&dir, "skills"), "the agent's daemon holds the lock");
    }

    #[test]
    fn agent_user_scripts_keep_their_exit_status_and_output() {
        let (_tmp, dir) = temp_dir();
        let script = locked_user_script(&dir, "git", 5, "exec \"$@\"");
        let out = output(sh(
            &script,
            &[
                "node",
                "echo \"$#:$1:$2\"; echo oops >&2; exit 3",
                "a b",
                "",
            ],
        ));
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(text(&out.stdout), "2:a b:\n");
        assert_eq!(text(&out.stderr), "oops\n");
        assert!(lock_failure("m1", "git", 3, "oops\n").is_none());
    }
}
