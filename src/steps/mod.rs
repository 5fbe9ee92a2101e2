//! What each provisioning step does inside a guest: apply, probe, undo.
//!
//! Every step kind owns one module implementing [`Step`], and [`step`] is
//! the one table from a [`StepKind`] to it; plan, observe and apply use
//! nothing else:
//! - `probe`: a shell fragment whose output describes what the step left in
//!   the guest. Observation runs the fragments of all of an agent's steps in
//!   one `exec`; the digest of a fragment's output is compared with the
//!   digest recorded in the ledger, which is how in-guest drift shows.
//! - `apply`: the [`Work`] that makes the guest match (its payload files,
//!   its root script, and how the recorded digest is found: [`Recorded`],
//!   always from what bottle sent), filling the ledger entry to record.
//! - `undo`: the [`Work`] that removes what the ledger entry says the step
//!   owns.
//!
//! The due steps of an agent run as one guest transaction ([`txn`]): one
//! upload, one exec. Every script a step runs in the guest holds the
//! step's lock ([`lock_preamble`]); probes take none. They only read: a
//! probe beside a step still running (left by a killed apply) may see its
//! work half done, and an apply then waits for that step before it redoes
//! it. A probe that waited for locks would hold up every `plan` and
//! `check` behind a stuck command.
//!
//! User data reaches guest shells only as positional arguments (`"$1"`),
//! never spliced into script text (probe fragments quote the few names
//! they need).

pub mod ca;
pub mod git;
pub mod machine;
pub mod prompt;
pub mod setup;
pub mod skills;
pub mod supervise;
pub mod txn;

use std::path::Path;
use std::time::Duration;

use miette::Diagnostic;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::graph::{MachineHashes, StepKind};
use crate::ledger::LedgerEntry;
use crate::manifest::{Agent, Bottle, Project};
use crate::runtime::{ExecRequest, RuntimeError};

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
#[cfg(test)]
fn locked_script(dir: &str, step: &str, wait_secs: u64, body: &str) -> String {
    format!("{}{body}", lock_preamble(dir, step, wait_secs))
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

/// An error's message and help, apart (a runtime error's message without
/// the wrapper's).
pub fn parts(e: &StepError) -> (String, String) {
    use miette::Diagnostic;
    let message = match e {
        StepError::Runtime(r) => r.to_string(),
        other => other.to_string(),
    };
    (message, e.help().map(|h| h.to_string()).unwrap_or_default())
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

/// What one step knows, behind one interface: the plan, observation and
/// the guest transaction use nothing else, so a new step is one module
/// implementing this trait and one row in [`step`].
pub trait Step: Send + Sync {
    /// What a cause calls it: `prompt`, `CA certificate`.
    fn noun(&self) -> String;

    /// A shell fragment whose output describes what the step left in the
    /// guest (`None`: it cannot be probed). Probes take no lock.
    fn probe(&self, ctx: &AgentCtx) -> Option<String>;

    /// The digest of a probe output, compared with the ledger's.
    fn probe_digest(&self, output: &str) -> String {
        digest(output)
    }

    /// The guest path a drift of this step is reported by.
    fn drift_path(&self, ctx: &AgentCtx) -> String;

    /// What a drift of this step is reported by, given its probe section
    /// as observed (`None`: not probed): by default [`Step::drift_path`].
    /// A step whose probe can tell where the difference lives (git: which
    /// config file) names that instead.
    fn drift_cause(&self, ctx: &AgentCtx, _observed: Option<&str>) -> String {
        self.drift_path(ctx)
    }

    /// What the probe prints when the guest holds exactly what the
    /// manifest declares, computed on the host (`None`: not known here).
    /// Compared with the observed output besides the ledger's digest,
    /// which root in the guest can edit. `user`: the agent user's ids as
    /// the machine step's probe shows them.
    fn expected_output(&self, _ctx: &AgentCtx, _user: Option<GuestUser>) -> Option<String> {
        None
    }

    /// Does the step write into the agent user's home (its ledger entry
    /// then records that user, to undo it from the right home)?
    fn in_home(&self) -> bool {
        false
    }

    /// The work that applies the step inside a guest transaction, filling
    /// `entry` with what the ledger must hold (paths, detail; the digest is
    /// the work's [`Recorded`]). `observed` is the step's probe section as
    /// observation found it, if it ran.
    fn apply(&self, cx: &StepCx, entry: &mut LedgerEntry) -> StepResult<Work>;

    /// The work that removes what `entry` says the step owns.
    fn undo(&self, cx: &StepCx, entry: &LedgerEntry) -> StepResult<Work>;
}

/// What a step's `apply` or `undo` is given.
pub struct StepCx<'a> {
    pub ctx: &'a AgentCtx<'a>,
    /// The ledger entry of the step as observed (`None`: never applied).
    pub previous: Option<&'a LedgerEntry>,
    /// The step's probe section as observed, if the probe ran.
    pub observed: Option<&'a str>,
}

/// The one table of steps.
pub fn step(kind: &StepKind) -> Box<dyn Step> {
    match kind {
        StepKind::Machine => Box::new(machine::MachineStep),
        StepKind::Ca => Box::new(ca::CaStep),
        StepKind::Prompt => Box::new(prompt::PromptStep),
        StepKind::Skills => Box::new(skills::SkillsStep),
        StepKind::Git => Box::new(git::GitStep),
        StepKind::Setup(name) => Box::new(setup::SetupStep(name.clone())),
        StepKind::Supervise => Box::new(supervise::SuperviseStep),
    }
}

/// What a step does inside a guest transaction. Its script runs as root,
/// in its own payload directory (`$P`, root-only), holding the step's
/// guest lock, with `args` as `"$@"`; helpers it may call are listed in
/// [`txn`].
#[derive(Debug, Clone, Default)]
pub struct Work {
    /// Files the script needs, by name under `$P` (one archive carries
    /// every step's files).
    pub files: Vec<Payload>,
    pub script: String,
    pub args: Vec<String>,
    /// How the digest recorded in the ledger is found.
    pub recorded: Recorded,
    /// How long the script may run (once it has its lock).
    pub timeout: Duration,
    /// What failed, for the error: `writing the prompt file`.
    pub what: String,
    pub help: String,
}

/// One file of a step's payload.
#[derive(Debug, Clone)]
pub struct Payload {
    pub name: String,
    pub bytes: Vec<u8>,
    pub mode: u32,
}

impl Payload {
    pub fn new(name: &str, bytes: Vec<u8>, mode: u32) -> Self {
        Self {
            name: name.to_owned(),
            bytes,
            mode,
        }
    }
}

/// The digest a step records: never what the guest shows back after the
/// agent could have touched it, but what bottle sent.
#[derive(Debug, Clone, Default)]
pub enum Recorded {
    /// Nothing to compare (setup commands).
    #[default]
    Nothing,
    /// Known on the host.
    Known(String),
    /// A root shell fragment, run over the step's own payload (`$P`) once
    /// the step succeeded, that prints what the step's probe prints when
    /// the guest holds exactly what was sent.
    Expected(String),
}

impl Work {
    pub fn new(what: &str, help: &str, script: impl Into<String>) -> Self {
        Self {
            script: script.into(),
            timeout: ExecRequest::DEFAULT_TIMEOUT,
            what: what.to_owned(),
            help: help.to_owned(),
            ..Self::default()
        }
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn file(mut self, payload: Payload) -> Self {
        self.files.push(payload);
        self
    }

    pub fn recorded(mut self, recorded: Recorded) -> Self {
        self.recorded = recorded;
        self
    }
}

/// The probe fragment of a step, or `None` for steps that cannot be probed.
pub fn probe_fragment(kind: &StepKind, ctx: &AgentCtx) -> Option<String> {
    step(kind).probe(ctx)
}

/// The digest of a step's probe output.
pub fn probe_digest(kind: &StepKind, output: &str) -> String {
    step(kind).probe_digest(output)
}

/// The digest a step's probe output has when the guest holds what the
/// manifest declares, computed on the host ([`Step::expected_output`]).
pub fn expected_digest(kind: &StepKind, ctx: &AgentCtx, user: Option<GuestUser>) -> Option<String> {
    let module = step(kind);
    module
        .expected_output(ctx, user)
        .map(|out| module.probe_digest(&out))
}

/// What a step's probe prints when the guest holds what the manifest
/// declares ([`Step::expected_output`]).
pub fn expected_output(kind: &StepKind, ctx: &AgentCtx, user: Option<GuestUser>) -> Option<String> {
    step(kind).expected_output(ctx, user)
}

/// The guest path a drifted step is reported by.
pub fn drift_path(kind: &StepKind, ctx: &AgentCtx) -> String {
    step(kind).drift_path(ctx)
}

/// What a drifted step is reported by, from its observed probe section.
pub fn drift_cause(kind: &StepKind, ctx: &AgentCtx, observed: Option<&str>) -> String {
    step(kind).drift_cause(ctx, observed)
}

/// The user a ledger entry's files belong to: recorded by the steps that
/// write into a home, else the agent's current user.
pub fn entry_user<'a>(entry: &'a LedgerEntry, ctx: &'a AgentCtx) -> &'a str {
    entry.detail_str("user").unwrap_or(ctx.user())
}

/// The work applying one step: its ledger entry (digest still to be
/// filled in the guest) and its script. When the agent user changed, what
/// the step left in the old user's home goes first, in the same script.
pub fn apply_work(
    kind: &StepKind,
    hash: &str,
    ctx: &AgentCtx,
    previous: Option<&LedgerEntry>,
    observed: Option<&str>,
) -> StepResult<(LedgerEntry, Work)> {
    let module = step(kind);
    let moved = previous.filter(|p| entry_user(p, ctx) != ctx.user());
    let undo_first = match moved {
        Some(p) => Some(module.undo(
            &StepCx {
                ctx,
                previous: Some(p),
                observed: None,
            },
            p,
        )?),
        None => None,
    };
    let mut entry = LedgerEntry::new(kind, hash);
    let cx = StepCx {
        ctx,
        previous: if moved.is_some() { None } else { previous },
        observed,
    };
    let mut work = module.apply(&cx, &mut entry)?;
    if module.in_home() {
        entry
            .detail
            .insert("user".into(), serde_json::json!(ctx.user()));
    }
    if let Some(undo) = undo_first {
        work = txn::chain(undo, work);
    }
    Ok((entry, work))
}

/// The work undoing a step that left the manifest (its ledger entry is
/// removed by the transaction).
pub fn undo_work(entry: &LedgerEntry, ctx: &AgentCtx, observed: Option<&str>) -> StepResult<Work> {
    match entry.step.parse::<StepKind>().ok() {
        // The machine step is never undone (the machine is deleted
        // instead); an unknown step from a newer bottle is only forgotten.
        Some(StepKind::Machine) | None => Ok(Work::new(
            "forgetting the step",
            "check the guest's /var/lib/bottle",
            "",
        )),
        Some(kind) => step(&kind).undo(
            &StepCx {
                ctx,
                previous: Some(entry),
                observed,
            },
            entry,
        ),
    }
}

/// Remove the files and directories a step owns in the agent's home, as the
/// user they belong to (the prompt file, the skill directories), making
/// read-only directories among them writable first. A link there is
/// removed, never followed (`chmod -R` follows one it is given).
pub fn remove_owned_paths(ctx: &AgentCtx, entry: &LedgerEntry) -> Work {
    Work::new(
        &format!("removing what the {} step left", entry.step),
        &home_help(ctx),
        "u=\"$1\"; shift; bottle_as \"$u\" 'for p do if [ -L \"$p\" ]; then rm -f \"$p\" || exit 1; \
         else chmod -R u+rwX \"$p\" 2>/dev/null; rm -rf \"$p\" || exit 1; fi; done' \"$@\"",
    )
    .args(std::iter::once(entry_user(entry, ctx).to_owned()).chain(entry.paths.iter().cloned()))
}

/// Shell that enters the directory `rel` (`/`-separated, bottle's own
/// names) under `base` (a shell word: a home, a payload directory) only
/// when nothing below `base` on the way is a symbolic link; its status
/// says whether it did. Probes run as root over what the agent user
/// controls: they never follow its links (a skill that is a link to `/`,
/// or `~/.claude -> /`, would have them hash the whole filesystem), and
/// `cd -P` then `pwd -P` tells a link at any level from the directory
/// itself. What the agent does afterwards moves only its own directory.
pub fn enter_without_links(base: &str, rel: &str) -> String {
    let rel = match rel {
        "" => String::new(),
        rel => format!("/{}", sh_quote(rel)),
    };
    format!(
        "bottle_b=$(cd -P {base} 2>/dev/null && pwd -P) && cd -P \"$bottle_b\"{rel} 2>/dev/null && \
         [ \"$(pwd -P)\" = \"$bottle_b\"{rel} ]"
    )
}

/// Shell for scripts the agent user runs (`bottle_as` bodies):
/// `bottle_home_dir REL` makes `$HOME/REL` (`/`-separated, bottle's own
/// names) a directory of the user's at every level and enters it. What the
/// agent put in the way is its own and goes: a symbolic link (`~/.claude
/// -> /etc`) or a file is removed, a directory it made read-only is made
/// writable again. What the user cannot repair (a directory another user
/// owns) fails naming the path and its owner.
pub const HOME_DIR_FN: &str = r#"bottle_home_dir() {
  cd "$HOME" || { echo "bottle: cannot enter $HOME" >&2; return 1; }
  [ -w . ] || chmod u+rwx . 2>/dev/null || true
  bottle_p=$HOME
  for bottle_c in $(printf '%s' "$1" | tr / ' '); do
    bottle_p=$bottle_p/$bottle_c
    if [ -L "$bottle_c" ] || { [ -e "$bottle_c" ] && [ ! -d "$bottle_c" ]; }; then
      rm -f "./$bottle_c" || { echo "bottle: $bottle_p is not a directory and the agent user cannot remove it" >&2; return 1; }
    fi
    [ -d "$bottle_c" ] || mkdir "./$bottle_c" || { echo "bottle: cannot create $bottle_p" >&2; return 1; }
    if [ "$(stat -c %u "./$bottle_c")" != "$(id -u)" ]; then
      echo "bottle: $bottle_p belongs to $(stat -c %U "./$bottle_c"), not to $(id -un): the agent user cannot repair it" >&2
      return 1
    fi
    chmod u+rwx "./$bottle_c" && cd "./$bottle_c" || { echo "bottle: cannot enter $bottle_p" >&2; return 1; }
  done
}
"#;

/// `body`, in the agent user's `sh`, with `cd` into `$HOME/rel` (made a
/// plain directory of the user's first, see [`HOME_DIR_FN`]).
pub fn in_home_dir(rel: &str, body: &str) -> String {
    format!(
        "set -e\n{HOME_DIR_FN}bottle_home_dir {}\n{body}",
        sh_quote(rel)
    )
}

/// The help of a step that writes in the agent user's home: the message
/// says what failed and where; what the user cannot repair there is
/// another user's, for root to remove.
pub fn home_help(ctx: &AgentCtx) -> String {
    format!(
        "the message above names what failed in the agent user's home; if the path it names \
         belongs to another user, remove it as root (`bottle exec --root {} -- rm -rf PATH`), \
         then run `bottle apply` again",
        ctx.agent.name
    )
}

/// A tar archive holding each path (file or directory) at its top level
/// under its own name, owned by root, with modification times and modes
/// kept (`clear` bits taken away). Symlinks are archived as links, never
/// followed; a file with more than one hard link is refused, since its
/// other name may be anywhere on the host.
pub fn tar_paths<'a>(paths: impl Iterator<Item = &'a Path>, clear: u32) -> StepResult<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for path in paths {
        let name = Path::new(path.file_name().unwrap_or_default());
        // A declared path that is itself a link (validation keeps it inside
        // the manifests directory) is copied as what it names.
        let resolved = match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
            }
            _ => path.to_path_buf(),
        };
        append_tree(&mut builder, &resolved, name, clear)?;
    }
    builder.into_inner().map_err(|e| {
        StepError::Other(
            format!("cannot build an archive: {e}"),
            "check free memory".into(),
        )
    })
}

fn append_tree(
    builder: &mut tar::Builder<Vec<u8>>,
    path: &Path,
    name: &Path,
    clear: u32,
) -> StepResult<()> {
    use std::os::unix::fs::MetadataExt;
    let unreadable = |e: std::io::Error| {
        StepError::Other(
            format!("cannot read {}: {e}", path.display()),
            "check that the path exists and is readable".into(),
        )
    };
    let meta = std::fs::symlink_metadata(path).map_err(unreadable)?;
    let mut header = tar::Header::new_gnu();
    header.set_metadata(&meta);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mode(meta.mode() & 0o7777 & !clear);
    let kind = meta.file_type();
    if kind.is_symlink() {
        let target = std::fs::read_link(path).map_err(unreadable)?;
        header.set_size(0);
        builder
            .append_link(&mut header, name, &target)
            .map_err(unreadable)?;
    } else if kind.is_dir() {
        header.set_size(0);
        builder
            .append_data(&mut header, name, std::io::empty())
            .map_err(unreadable)?;
        let mut entries: Vec<_> = std::fs::read_dir(path)
            .map_err(unreadable)?
            .collect::<Result<_, _>>()
            .map_err(unreadable)?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            append_tree(builder, &entry.path(), &name.join(entry.file_name()), clear)?;
        }
    } else if kind.is_file() {
        if meta.nlink() > 1 {
            return Err(StepError::Other(
                format!(
                    "{} has {} hard links: bottle copies no file that may also live outside \
                     the manifests directory",
                    path.display(),
                    meta.nlink()
                ),
                "replace the hard link with a copy of the file (`cp --remove-destination`)".into(),
            ));
        }
        let file = std::fs::File::open(path).map_err(unreadable)?;
        builder
            .append_data(&mut header, name, file)
            .map_err(unreadable)?;
    } else {
        return Err(StepError::Other(
            format!(
                "{} is neither a file, a directory nor a symlink",
                path.display()
            ),
            "remove it from the directory bottle copies".into(),
        ));
    }
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

    /// Item 24 of issue 9: a hard link inside a skill would copy a file
    /// from anywhere on the host's filesystem into the guest.
    #[test]
    fn a_hard_link_is_never_archived() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside-secret");
        std::fs::write(&outside, "host secret").unwrap();
        let skill = tmp.path().join("skill");
        std::fs::create_dir(&skill).unwrap();
        std::fs::write(skill.join("SKILL.md"), "ok").unwrap();
        std::fs::hard_link(&outside, skill.join("copied")).unwrap();
        let error = tar_paths(std::iter::once(skill.as_path()), 0).unwrap_err();
        assert!(error.to_string().contains("hard links"), "{error}");
        std::fs::remove_file(skill.join("copied")).unwrap();
        let archive = tar_paths(std::iter::once(skill.as_path()), 0o022).unwrap();
        let mut names = Vec::new();
        for entry in tar::Archive::new(archive.as_slice()).entries().unwrap() {
            let entry = entry.unwrap();
            let header = entry.header();
            assert_eq!((header.uid().unwrap(), header.gid().unwrap()), (0, 0));
            assert_eq!(header.mode().unwrap() & 0o022, 0);
            names.push(entry.path().unwrap().display().to_string());
        }
        assert_eq!(names, ["skill", "skill/SKILL.md"]);
    }
}
