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
use crate::runtime::{CopyOptions, ExecRequest, Runtime, RuntimeError};

/// Everything a step needs to know about the agent it provisions.
#[derive(Debug, Clone, Copy)]
pub struct AgentCtx<'a> {
    pub project: &'a Project,
    pub agent: &'a Agent,
    pub bottle: &'a Bottle,
    pub machine: &'a str,
    pub machine_hashes: &'a MachineHashes,
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

/// Run a root shell script in the guest with positional arguments; a
/// non-zero exit is an error that quotes the guest's stderr.
pub fn run_script(
    rt: &dyn Runtime,
    machine: &str,
    what: &str,
    script: &str,
    args: &[&str],
    help: &str,
) -> StepResult<String> {
    run_script_as(
        rt,
        machine,
        None,
        what,
        script,
        args,
        help,
        ExecRequest::DEFAULT_TIMEOUT,
    )
}

#[allow(clippy::too_many_arguments)]
pub fn run_script_as(
    rt: &dyn Runtime,
    machine: &str,
    user: Option<&str>,
    what: &str,
    script: &str,
    args: &[&str],
    help: &str,
    timeout: Duration,
) -> StepResult<String> {
    let mut argv = vec![
        "sh".to_owned(),
        "-c".to_owned(),
        script.to_owned(),
        "sh".to_owned(),
    ];
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    let mut request = ExecRequest::new(argv).timeout(timeout);
    request.user = user.map(str::to_owned);
    let out = rt.exec(machine, &request)?;
    if !out.success() {
        return Err(StepError::Guest {
            what: what.to_owned(),
            status: out.status,
            stderr: tail(&String::from_utf8_lossy(&out.stderr), 2000),
            help: help.to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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

/// Run a script as the agent user (home writes and removals).
pub fn run_as_agent(
    rt: &dyn Runtime,
    ctx: &AgentCtx,
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
        "removing the ledger entry",
        &ledger::remove_script(&entry.step),
        &[],
        "check the guest's /var/lib/bottle",
    )?;
    Ok(())
}
