//! What the runtime-facing commands share: loading the desired state,
//! opening the runtime, the state directory, progress output.

use std::path::{Path, PathBuf};

use miette::Diagnostic;
use thiserror::Error;

use super::{GlobalArgs, RuntimeChoice};
use crate::apply::{ActionReport, Outcome as ActionOutcome, Progress};
use crate::desired::{Desired, DesiredAgent};
use crate::manifest;
use crate::observe::Snapshot;
use crate::plan::{Action, Plan, PlanOptions};
use crate::preflight;
use crate::runtime::{Runtime, RuntimeKind};

/// Load manifests and build the desired state.
pub fn load(dir: &Path) -> miette::Result<Desired> {
    let project = manifest::load_dir(dir)?;
    let graph = crate::graph::build(&project)?;
    Ok(Desired::new(project, &graph))
}

/// With `--json`, an error met before any result is printed goes to stdout
/// too, as `{"format_version": 1, "error": {...}}` (every manifest problem
/// with its file, line and column), besides the usual report on stderr.
pub fn json_error<T>(json: bool, result: miette::Result<T>) -> miette::Result<T> {
    if let (true, Err(report)) = (json, &result) {
        println!(
            "{}",
            serde_json::to_string_pretty(&error_json(report)).expect("JSON serializes")
        );
    }
    result
}

/// An error as the JSON object of [`json_error`].
pub fn error_json(report: &miette::Report) -> serde_json::Value {
    let error = match report.downcast_ref::<manifest::Diagnostics>() {
        Some(problems) => {
            let mut error = problems.to_json();
            error["kind"] = "invalid-manifests".into();
            error
        }
        None => serde_json::json!({
            "kind": "error",
            "code": report.code().map(|c| c.to_string()),
            "message": report.to_string(),
            "help": report.help().map(|h| h.to_string()),
        }),
    };
    serde_json::json!({ "format_version": crate::plan::PLAN_FORMAT, "error": error })
}

/// The state directory: `--state-dir`, `$XDG_STATE_HOME/bottle` or
/// `~/.local/state/bottle`.
pub fn state_dir(global: &GlobalArgs) -> miette::Result<PathBuf> {
    if let Some(dir) = &global.state_dir {
        return Ok(dir.clone());
    }
    if let Some(xdg) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(xdg).join("bottle"));
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".local/state/bottle")),
        None => Err(NoStateDir.into()),
    }
}

/// Where this project's lock lives: beside the machines the chosen runtime
/// drives (see [`crate::lock::lock_dir`]).
pub fn lock_dir(global: &GlobalArgs) -> miette::Result<PathBuf> {
    Ok(crate::lock::lock_dir(
        runtime_kind(global),
        &state_dir(global)?,
        &|name| std::env::var_os(name),
    ))
}

#[derive(Debug, Error, Diagnostic)]
#[error("no state directory: neither --state-dir, XDG_STATE_HOME nor HOME is set")]
#[diagnostic(
    code("bottle::no-state-dir"),
    help("pass --state-dir DIR or set BOTTLE_STATE_DIR")
)]
struct NoStateDir;

pub fn runtime_kind(global: &GlobalArgs) -> RuntimeKind {
    match global.runtime {
        RuntimeChoice::Smolvm => RuntimeKind::Smolvm,
        RuntimeChoice::Local => RuntimeKind::Local,
    }
}

/// Open the runtime the user chose.
/// The state the runtime reports for one machine, `None` when it has no
/// such machine (for the commands that run something in it).
pub fn machine_state(
    rt: &dyn Runtime,
    machine: &str,
) -> miette::Result<Option<crate::runtime::MachineState>> {
    Ok(rt
        .list()?
        .into_iter()
        .find(|m| m.name == machine)
        .map(|m| m.state))
}

pub fn runtime(global: &GlobalArgs) -> miette::Result<Box<dyn Runtime>> {
    match global.runtime {
        RuntimeChoice::Smolvm => Ok(Box::new(crate::runtime::smolvm::SmolvmRuntime::new(
            global.smolvm.clone(),
        )?)),
        RuntimeChoice::Local => {
            let dir = state_dir(global)?.join("local");
            let mut rt = crate::runtime::local::LocalRuntime::open(&dir)?;
            // Gated machines reach their gate through a relay this
            // executable serves.
            if let Ok(exe) = std::env::current_exe() {
                rt = rt.with_relay(exe);
            }
            Ok(Box::new(rt))
        }
    }
}

/// Ctrl-C, the same for every command that runs actions: the first one
/// lets the runtime calls under way finish and starts nothing new
/// (`then` runs after that is requested); a second one ends the calls
/// under way (their process groups are killed, the actions fail as
/// cancelled, the lock is released as the command returns); a third one
/// quits at once (the kernel releases the lock with the process).
pub fn on_interrupt(message: &'static str, then: impl Fn() + Send + 'static) -> miette::Result<()> {
    let mut interrupts = 0u32;
    ctrlc::set_handler(move || {
        interrupts += 1;
        match interrupts {
            1 => {
                crate::apply::request_cancel();
                eprintln!("{message} (Ctrl-C again to end them now)");
                then();
            }
            2 => {
                crate::apply::request_abort();
                eprintln!(
                    "interrupted again: ending the calls under way (Ctrl-C again to quit at once)"
                );
            }
            _ => std::process::exit(130),
        }
    })
    .map_err(|e| {
        miette::miette!(
            help = "this is a bug; please report it",
            "cannot handle Ctrl-C: {e}"
        )
    })
}

/// Progress as plain lines on stderr: a counter, the action, its outcome;
/// and, while an action runs long (a setup command that hangs), a line
/// every [`Lines::every`] saying what is still running and how to stop it.
pub struct Lines {
    running: std::sync::Arc<std::sync::Mutex<RunningActions>>,
    stop: std::sync::mpsc::Sender<()>,
}

type RunningActions = std::collections::BTreeMap<usize, (String, std::time::Instant)>;

impl Lines {
    /// How often a still-running action is reported.
    pub fn every() -> std::time::Duration {
        std::env::var("BOTTLE_PROGRESS_SECONDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(
                std::time::Duration::from_secs(30),
                std::time::Duration::from_secs,
            )
    }

    pub fn new() -> Self {
        let running: std::sync::Arc<std::sync::Mutex<RunningActions>> = Default::default();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let every = Self::every();
        let watched = running.clone();
        std::thread::spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every)
            {
                let now = std::time::Instant::now();
                for (what, since) in watched.lock().expect("progress lock").values() {
                    let seconds = now.duration_since(*since).as_secs();
                    if seconds >= every.as_secs() {
                        eprintln!("         {}", still_running(what, seconds));
                    }
                }
            }
        });
        Self { running, stop }
    }

    /// The actions under way, for the Ctrl-C message.
    pub fn running(&self) -> Vec<String> {
        self.running
            .lock()
            .expect("progress lock")
            .values()
            .map(|(what, _)| what.clone())
            .collect()
    }
}

impl Default for Lines {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        let _ = self.stop.send(());
    }
}

fn still_running(what: &str, seconds: u64) -> String {
    format!(
        "still running {what} ({}m {:02}s; Ctrl-C stops starting anything new, a second Ctrl-C ends it)",
        seconds / 60,
        seconds % 60
    )
}

impl Progress for Lines {
    fn started(&self, action: &Action, _running: usize, _total: usize) {
        let who = action.agent.as_deref().unwrap_or(&action.machine);
        self.running.lock().expect("progress lock").insert(
            action.id,
            (
                format!("{who}: {} {}", action.op.verb(), action.op.step()),
                std::time::Instant::now(),
            ),
        );
    }

    fn finished(&self, report: &ActionReport, finished: usize, total: usize) {
        self.running
            .lock()
            .expect("progress lock")
            .remove(&report.action.id);
        let a = &report.action;
        let who = a.agent.as_deref().unwrap_or(&a.machine);
        let line = match &report.outcome {
            ActionOutcome::Done { seconds } => format!(
                "done     {who}: {} {} ({seconds:.2}s)",
                a.op.verb(),
                a.op.step()
            ),
            ActionOutcome::Failed { seconds, error } => {
                format!(
                    "FAILED   {who}: {} {} ({seconds:.2}s): {error}",
                    a.op.verb(),
                    a.op.step()
                )
            }
            ActionOutcome::Skipped { reason } => {
                format!("skipped  {who}: {} {}: {reason}", a.op.verb(), a.op.step())
            }
            ActionOutcome::Blocked { reason } => {
                format!("blocked  {who}: {} {}: {reason}", a.op.verb(), a.op.step())
            }
        };
        // The counter keeps its width, so the columns after it line up.
        let width = total.to_string().len();
        eprintln!("[{finished:>width$}/{total}] {line}");
    }
}

/// Everything a runtime-facing command starts from: the desired state,
/// the runtime, one observation, and the plan derived from them.
pub struct Survey {
    pub desired: Desired,
    pub runtime: Box<dyn Runtime>,
    pub snapshot: Snapshot,
    pub plan: Plan,
}

pub fn survey(
    global: &GlobalArgs,
    mut desired: Desired,
    options: &PlanOptions,
    parallelism: usize,
) -> miette::Result<Survey> {
    for target in options.targets.iter().flatten() {
        agent(&desired, target)?;
    }
    let notes = preflight::check(&desired, runtime_kind(global))?;
    desired.attach_gate(&state_dir(global)?, runtime_kind(global))?;
    let runtime = runtime(global)?;
    let mut snapshot = crate::observe::observe(
        runtime.as_ref(),
        &desired,
        options.targets.as_deref(),
        parallelism,
    )?;
    // For causes that show what changed in a prompt or setup input.
    desired.texts = crate::sent::desired_texts(&desired);
    // Without a state directory there are no copies: causes just say
    // "changed".
    if let Ok(state) = state_dir(global) {
        snapshot.sent =
            crate::sent::Store::new(&state, &desired.project.name).load_all(desired.agents.keys());
    }
    let mut plan = crate::plan::plan(&desired, &snapshot, options);
    // A missing secret holds back only the starts of its bottle's machines.
    preflight::hold_launches_without_secrets(&desired, &mut plan, preflight::Waiting::Command);
    plan.notes.extend(notes);
    once_each(&mut plan.notes);
    Ok(Survey {
        desired,
        runtime,
        snapshot,
        plan,
    })
}

/// Keep the first of identical notes: each is shown once per command.
pub fn once_each(notes: &mut Vec<String>) {
    let mut seen = std::collections::HashSet::new();
    notes.retain(|n| seen.insert(n.clone()));
}

/// The declared agent named `name`, or a diagnostic listing the declared
/// ones.
pub fn agent<'a>(desired: &'a Desired, name: &str) -> Result<&'a DesiredAgent, UnknownTarget> {
    desired.agents.get(name).ok_or_else(|| UnknownTarget {
        agent: name.to_owned(),
        known: crate::manifest::names::sorted_naturally(desired.agents.keys().map(String::as_str))
            .join(", "),
    })
}

/// Fail (exit 1) when some agents could not be observed; call after
/// printing what was found, so the rest of the report is not lost.
pub fn observation_errors(plan: &Plan) -> Result<(), ObservationFailed> {
    if plan.errors.is_empty() {
        return Ok(());
    }
    Err(ObservationFailed {
        agents: plan
            .errors
            .iter()
            .map(|e| e.agent.clone())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

#[derive(Debug, Error, Diagnostic)]
#[error("could not observe agent(s) {agents}; their state is unknown")]
#[diagnostic(
    code("bottle::observe-failed"),
    help(
        "the errors above say why; check the runtime (e.g. `smolvm machine ls --json`) and the machines, then run again"
    )
)]
pub struct ObservationFailed {
    pub agents: String,
}

#[derive(Debug, Error, Diagnostic)]
#[error("no agent named `{agent}` in the manifests")]
#[diagnostic(code("bottle::unknown-target"), help("declared agents: {known}"))]
pub struct UnknownTarget {
    pub agent: String,
    pub known: String,
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_note_is_shown_once() {
        let mut notes = vec![
            "b".to_owned(),
            "a".to_owned(),
            "b".to_owned(),
            "a".to_owned(),
        ];
        super::once_each(&mut notes);
        assert_eq!(notes, ["b", "a"]);
    }
}
