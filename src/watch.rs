//! Watch: reconcile whenever the manifests or the files they reference
//! change, and periodically to heal drift made inside guests.
//!
//! - Events come from notify behind a debouncer, on the manifests directory
//!   (recursively: editors save by rename, so watching single files misses
//!   saves) and on referenced paths outside it.
//! - Each batch reloads every manifest. Invalid manifests are reported and
//!   the last good desired state stays in force: nothing is created,
//!   replaced or deleted because of a half-saved file.
//! - Only agents whose desired state changed are reconciled (their step
//!   hashes cover file contents, so a prompt edit touches exactly the agents
//!   using that prompt, and a bottle change every agent in that bottle).
//! - Reconciles run on one thread, so they never overlap; events that arrive
//!   during one are drained into exactly one follow-up.
//! - A failed reconcile is retried with exponential backoff and jitter; a
//!   success resets it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant, SystemTime};

use notify::{EventKind, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, new_debouncer};
use serde_json::json;

use crate::apply::{self, ActionReport, Outcome as ActionOutcome, Progress};
use crate::desired::Desired;
use crate::plan::{self, Action, PlanOptions};
use crate::runtime::Runtime;

#[derive(Debug, Clone)]
pub struct WatchOptions {
    pub dir: PathBuf,
    pub allow_replace: bool,
    pub prune: bool,
    pub parallelism: usize,
    pub debounce: Duration,
    /// `None`: no periodic resync.
    pub resync: Option<Duration>,
    pub json: bool,
    /// Paths whose changes never trigger anything (bottle's state dir).
    pub ignore: Vec<PathBuf>,
}

/// Why a reconcile runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Trigger {
    Start,
    Files(BTreeSet<PathBuf>),
    Resync,
    Retry { attempt: u32 },
}

impl Trigger {
    fn describe(&self, dir: &Path) -> String {
        match self {
            Trigger::Start => "start".to_owned(),
            Trigger::Resync => "periodic resync".to_owned(),
            Trigger::Retry { attempt } => format!("retry #{attempt} after a failure"),
            Trigger::Files(paths) => {
                let names: Vec<String> = paths
                    .iter()
                    .take(5)
                    .map(|p| match p.strip_prefix(dir) {
                        Ok(rel) if rel.as_os_str().is_empty() => ".".to_owned(),
                        Ok(rel) => rel.display().to_string(),
                        Err(_) => p.display().to_string(),
                    })
                    .collect();
                let more = paths.len().saturating_sub(5);
                let more = if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                };
                format!("files changed: {}{more}", names.join(", "))
            }
        }
    }

    fn is_full(&self) -> bool {
        !matches!(self, Trigger::Files(_))
    }
}

/// Messages to the reconcile loop.
pub enum Message {
    Files(Vec<PathBuf>),
    WatchError(String),
    Stop,
}

/// Exponential backoff with jitter: 800 ms doubling to 30 s.
#[derive(Debug, Clone)]
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    pub const BASE: Duration = Duration::from_millis(800);
    pub const MAX: Duration = Duration::from_secs(30);

    pub fn new() -> Self {
        Self { attempt: 0 }
    }

    /// The delay before the next retry, and the attempt number.
    pub fn next_delay(&mut self) -> (Duration, u32) {
        self.attempt += 1;
        let exp = Self::BASE.saturating_mul(1 << (self.attempt - 1).min(10));
        let capped = exp.min(Self::MAX);
        // Up to ±20% jitter, so many watchers do not retry in lockstep.
        let jitter = 0.8 + fastrand::f64() * 0.4;
        (capped.mul_f64(jitter), self.attempt)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// Is this path noise: VCS internals, editor swap and backup files, or a
/// path bottle itself writes?
pub fn is_ignored(path: &Path, ignore: &[PathBuf]) -> bool {
    if ignore.iter().any(|i| path.starts_with(i)) {
        return true;
    }
    if path.components().any(|c| {
        matches!(
            c.as_os_str().to_str(),
            Some(".git" | ".hg" | ".svn" | ".jj")
        )
    }) {
        return true;
    }
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    name.ends_with('~')
        || name.starts_with(".#")
        || (name.starts_with('#') && name.ends_with('#'))
        || [".swp", ".swo", ".swx", ".tmp", ".bak", ".orig"].iter().any(|s| name.ends_with(s))
        || name == "4913" // vim's write test
        || name.starts_with(".goutputstream-")
}

/// What decides an agent's reconcile: its machine's spec and every step's
/// hash. Two equal fingerprints need no reconcile.
pub fn fingerprints(desired: &Desired) -> BTreeMap<String, String> {
    desired
        .agents
        .values()
        .map(|a| {
            let mut s = format!("{}\n", a.machine);
            for (k, v) in &a.spec_labels {
                s.push_str(&format!("{k}={v}\n"));
            }
            for step in &a.steps {
                s.push_str(&format!("{}={}\n", step.kind.id(), step.hash));
            }
            (a.name.clone(), s)
        })
        .collect()
}

/// One line per event, as text with a timestamp or as a JSON object.
pub struct Logger {
    pub json: bool,
}

impl Logger {
    pub fn log(&self, event: &str, message: &str, fields: serde_json::Value) {
        let ts = crate::time::rfc3339(SystemTime::now());
        if self.json {
            let mut obj = json!({ "ts": ts, "event": event, "message": message });
            if let (Some(o), serde_json::Value::Object(extra)) = (obj.as_object_mut(), fields) {
                o.extend(extra);
            }
            println!("{obj}");
        } else {
            println!("{ts} {message}");
        }
    }
}

impl Progress for Logger {
    fn started(&self, _action: &Action, _running: usize, _total: usize) {}

    fn finished(&self, report: &ActionReport, _finished: usize, _total: usize) {
        let a = &report.action;
        let who = a.agent.as_deref().unwrap_or(&a.machine);
        let (status, detail) = match &report.outcome {
            ActionOutcome::Done { seconds } => ("done", format!("{seconds:.2}s")),
            ActionOutcome::Failed { seconds, error } => {
                ("failed", format!("{seconds:.2}s: {error}"))
            }
            ActionOutcome::Skipped { reason } => ("skipped", reason.clone()),
            // Blocked actions are reported once per change by the loop.
            ActionOutcome::Blocked { .. } => return,
        };
        self.log(
            "action",
            &format!("  {status} {who}: {} {} ({}) [{detail}]", a.op.verb(), a.op.step(), a.cause),
            json!({ "agent": a.agent, "machine": a.machine, "action": a.op.verb(), "step": a.op.step(), "cause": a.cause, "status": status, "detail": detail }),
        );
    }
}

/// Loads the desired state; errors are already rendered diagnostics.
pub type Loader<'a> = dyn Fn() -> Result<Desired, miette::Report> + 'a;

/// The reconcile loop. Returns when a `Stop` message arrives.
pub fn run(
    options: &WatchOptions,
    rt: &dyn Runtime,
    load: &Loader,
    rx: Receiver<Message>,
) -> miette::Result<()> {
    let log = Logger { json: options.json };
    let mut state = LoopState {
        last_good: None,
        backoff: Backoff::new(),
        retry_at: None,
        resync_at: options.resync.map(|d| Instant::now() + d),
        reported_blocked: BTreeSet::new(),
        count: 0,
    };
    let mut next = Some(Trigger::Start);
    loop {
        if let Some(trigger) = next.take() {
            state.reconcile(options, rt, load, &log, trigger);
        }
        // Wait for events, a retry, or the resync, whichever comes first.
        let deadline = [state.retry_at, state.resync_at]
            .into_iter()
            .flatten()
            .min();
        let message = match deadline {
            Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match message {
            Ok(Message::Stop) | Err(RecvTimeoutError::Disconnected) => {
                log.log("stop", "stopping", json!({}));
                return Ok(());
            }
            Ok(Message::WatchError(e)) => log.log(
                "watch-error",
                &format!("watch error: {e}"),
                json!({ "error": e }),
            ),
            Ok(Message::Files(paths)) => {
                // Drain everything that queued meanwhile: one follow-up.
                let mut all: BTreeSet<PathBuf> = paths.into_iter().collect();
                while let Ok(m) = rx.try_recv() {
                    match m {
                        Message::Files(more) => all.extend(more),
                        Message::Stop => {
                            log.log("stop", "stopping", json!({}));
                            return Ok(());
                        }
                        Message::WatchError(e) => log.log(
                            "watch-error",
                            &format!("watch error: {e}"),
                            json!({ "error": e }),
                        ),
                    }
                }
                all.retain(|p| !is_ignored(p, &options.ignore));
                if !all.is_empty() {
                    next = Some(Trigger::Files(all));
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                if state.retry_at.is_some_and(|t| t <= now) {
                    state.retry_at = None;
                    next = Some(Trigger::Retry {
                        attempt: state.backoff.attempt,
                    });
                } else if state.resync_at.is_some_and(|t| t <= now) {
                    state.resync_at = options.resync.map(|d| now + d);
                    next = Some(Trigger::Resync);
                }
            }
        }
    }
}

struct LoopState {
    last_good: Option<Desired>,
    backoff: Backoff,
    retry_at: Option<Instant>,
    resync_at: Option<Instant>,
    /// Blocked actions already reported, so each is reported once per change.
    reported_blocked: BTreeSet<String>,
    count: u64,
}

impl LoopState {
    fn reconcile(
        &mut self,
        options: &WatchOptions,
        rt: &dyn Runtime,
        load: &Loader,
        log: &Logger,
        trigger: Trigger,
    ) {
        self.count += 1;
        let why = trigger.describe(&options.dir);
        let desired = match load() {
            Ok(d) => d,
            Err(report) => {
                log.log(
                    "invalid",
                    &format!("reconcile #{} ({why}): manifests are invalid; the last good state stays in force", self.count),
                    json!({ "reason": why, "diagnostics": format!("{report:?}") }),
                );
                if !options.json {
                    eprintln!("{report:?}");
                }
                return;
            }
        };
        let old = self
            .last_good
            .as_ref()
            .map(fingerprints)
            .unwrap_or_default();
        let new = fingerprints(&desired);
        let (targets, removed) = if trigger.is_full() || self.last_good.is_none() {
            (Vec::new(), false)
        } else {
            let changed: Vec<String> = new
                .iter()
                .filter(|(k, v)| old.get(*k) != Some(v))
                .map(|(k, _)| k.clone())
                .collect();
            let removed = old.keys().any(|k| !new.contains_key(k));
            if changed.is_empty() && !removed {
                log.log(
                    "skip",
                    &format!("reconcile #{} ({why}): no agent affected", self.count),
                    json!({ "reason": why }),
                );
                self.last_good = Some(desired);
                return;
            }
            (changed, removed)
        };
        let scope = if targets.is_empty() && !removed {
            "all agents".to_owned()
        } else if targets.is_empty() {
            "removed agents".to_owned()
        } else {
            format!("agents {}", targets.join(", "))
        };
        log.log(
            "reconcile",
            &format!("reconcile #{} ({why}): {scope}", self.count),
            json!({ "reason": why, "agents": targets }),
        );
        let full = targets.is_empty() && !removed;
        let plan_options = PlanOptions {
            allow_replace: options.allow_replace,
            prune: options.prune,
            include_undeclared: removed,
            targets: (!full).then(|| targets.clone()),
        };
        let snapshot = match crate::observe::observe(
            rt,
            &desired,
            plan_options.targets.as_deref(),
            options.parallelism,
        ) {
            Ok(s) => s,
            Err(e) => {
                self.fail(log, &format!("observe failed: {e}"));
                return;
            }
        };
        let plan = plan::plan(&desired, &snapshot, &plan_options);
        for action in plan.blocked() {
            let key = format!(
                "{}|{}|{}|{}",
                action.machine,
                action.op.verb(),
                action.op.step(),
                action.cause
            );
            if self.reported_blocked.insert(key) {
                log.log(
                    "blocked",
                    &format!(
                        "  blocked {}: {} {} ({}): {}",
                        action.agent.as_deref().unwrap_or(&action.machine),
                        action.op.verb(),
                        action.op.step(),
                        action.cause,
                        action.blocked.as_deref().unwrap_or_default()
                    ),
                    json!({ "agent": action.agent, "machine": action.machine, "action": action.op.verb(), "step": action.op.step(), "cause": action.cause }),
                );
            }
        }
        for e in &plan.errors {
            log.log(
                "error",
                &format!("  error {}: {}", e.agent, e.message),
                json!({ "agent": e.agent, "machine": e.machine, "error": e.message }),
            );
        }
        let report = apply::execute(&desired, &snapshot, &plan, rt, options.parallelism, log);
        self.last_good = Some(desired);
        if report.failed() > 0 || !plan.errors.is_empty() {
            self.fail(
                log,
                &format!(
                    "{} action(s) failed, {} agent(s) not observed",
                    report.failed(),
                    plan.errors.len()
                ),
            );
        } else {
            self.backoff.reset();
            self.retry_at = None;
            log.log(
                "done",
                &format!("reconcile #{} done: {} action(s) in {:.2}s", self.count, report.done(), report.seconds),
                json!({ "done": report.done(), "blocked": report.blocked(), "seconds": report.seconds }),
            );
        }
    }

    fn fail(&mut self, log: &Logger, what: &str) {
        let (delay, attempt) = self.backoff.next_delay();
        self.retry_at = Some(Instant::now() + delay);
        log.log(
            "failed",
            &format!(
                "reconcile #{} failed: {what}; retry #{attempt} in {:.1}s",
                self.count,
                delay.as_secs_f64()
            ),
            json!({ "error": what, "retry_in_seconds": delay.as_secs_f64() }),
        );
    }
}

/// Start notify (debounced) on `dir` and `extra` paths; events go to `tx`.
/// The returned debouncer must be kept alive while watching.
pub fn start_watcher(
    dir: &Path,
    extra: &[PathBuf],
    debounce: Duration,
    tx: Sender<Message>,
) -> notify::Result<impl Drop + use<>> {
    let mut debouncer = new_debouncer(debounce, None, move |result: DebounceEventResult| {
        let message = match result {
            Ok(events) => {
                // Reading files (bottle's own reloads included) produces
                // access events: only changes count.
                let paths: Vec<PathBuf> = events
                    .into_iter()
                    .filter(|e| !matches!(e.event.kind, EventKind::Access(_)))
                    .flat_map(|e| e.event.paths)
                    .collect();
                if paths.is_empty() {
                    return;
                }
                Message::Files(paths)
            }
            Err(errors) => Message::WatchError(
                errors
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
        };
        let _ = tx.send(message);
    })?;
    debouncer.watch(dir, RecursiveMode::Recursive)?;
    for path in extra {
        debouncer.watch(path, RecursiveMode::Recursive)?;
    }
    Ok(debouncer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_and_resets() {
        let mut b = Backoff::new();
        let (first, n) = b.next_delay();
        assert_eq!(n, 1);
        assert!(
            first >= Duration::from_millis(640) && first <= Duration::from_millis(960),
            "{first:?}"
        );
        for _ in 0..20 {
            let (d, _) = b.next_delay();
            assert!(d <= Backoff::MAX.mul_f64(1.2));
        }
        let (late, _) = b.next_delay();
        assert!(late >= Backoff::MAX.mul_f64(0.8));
        b.reset();
        assert!(b.next_delay().0 <= Duration::from_millis(960));
    }

    #[test]
    fn editor_noise_is_ignored() {
        let ignore = vec![PathBuf::from("/m/.state")];
        for noisy in [
            "/m/.git/index",
            "/m/a.toml~",
            "/m/.a.toml.swp",
            "/m/.#a.toml",
            "/m/4913",
            "/m/.state/lock",
            "/m/#a.toml#",
        ] {
            assert!(is_ignored(Path::new(noisy), &ignore), "{noisy}");
        }
        for real in [
            "/m/a.toml",
            "/m/prompts/reviewer.md",
            "/m/skills/x/SKILL.md",
        ] {
            assert!(!is_ignored(Path::new(real), &ignore), "{real}");
        }
    }
}
