//! Watch: reconcile whenever the manifests or the files they reference
//! change, and periodically to heal drift made inside guests.
//!
//! - Events come from notify behind a debouncer, on the manifests directory
//!   (recursively: editors save by rename, so watching single files misses
//!   saves). Only events that can change the desired state count: a
//!   `*.toml` outside hidden directories, a referenced file or directory
//!   (prompt, skill, CA certificate, setup input, a manifest's symlink
//!   target), or the existence of a referenced host path (image, volume,
//!   secret file). Swap and backup files, VCS directories, bottle's state
//!   directory and agents writing to a volume inside the manifests directory
//!   trigger nothing.
//! - Things the manifests reference outside the manifests directory (a
//!   symlinked manifest's target, local images, volumes, secret files) are
//!   watched through their parent directory, non-recursively: their content
//!   is not an input (except a symlinked manifest's), their existence is.
//!   That set is recomputed after every good load.
//! - Each batch reloads every manifest. Invalid manifests are reported and
//!   the last good desired state stays in force: nothing is created,
//!   replaced or deleted because of a half-saved file. While invalid, the
//!   manifests are also re-read every few seconds, so creating a missing
//!   host path that nothing watched yet resumes work too; and the periodic
//!   resync still repairs drift inside guests against the last good state.
//!   Diagnostics are printed again only when they change or a file event
//!   triggered the reload (a save deserves an answer).
//! - Only agents whose desired state changed are reconciled (their step
//!   hashes cover file contents, so a prompt edit touches exactly the agents
//!   using that prompt, and a bottle change every agent in that bottle).
//! - Reconciles run on one thread, so they never overlap; events that arrive
//!   during one are drained into exactly one follow-up.
//! - A manifests directory deleted and made anew (or renamed away and
//!   back) is watched again once it loads.
//! - A failed reconcile is retried (in full) with exponential backoff and
//!   jitter; agents that failed stay owed a reconcile until one succeeds.
//! - Blocked actions (replacement without `--allow-replace`, pruning without
//!   `--prune`) are reported once per change, and the steps waiting behind
//!   them are not reported as skipped on every loop.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant, SystemTime};

use miette::Diagnostic;
use notify::{EventKind, RecommendedWatcher, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use serde_json::json;
use thiserror::Error;

use crate::apply::{self, ActionReport, Outcome as ActionOutcome, Progress};
use crate::desired::Desired;
use crate::manifest::{Image, Project, Prompt};
use crate::plan::{self, Action, Plan, PlanOptions};
use crate::runtime::Runtime;

/// How often invalid manifests are re-read without an event.
pub const INVALID_RECHECK: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// The manifests directory, canonical (event paths are canonical).
    pub dir: PathBuf,
    /// The project id the lock was taken for: a load that renames the
    /// project is refused.
    pub project: String,
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
    Retry {
        attempt: u32,
    },
    /// Invalid manifests re-read without an event.
    Recheck,
}

impl Trigger {
    fn kind(&self) -> &'static str {
        match self {
            Trigger::Start => "start",
            Trigger::Files(_) => "files",
            Trigger::Resync => "resync",
            Trigger::Retry { .. } => "retry",
            Trigger::Recheck => "recheck",
        }
    }

    fn describe(&self, dir: &Path) -> String {
        match self {
            Trigger::Start => "start".to_owned(),
            Trigger::Resync => "periodic resync".to_owned(),
            Trigger::Recheck => "re-reading invalid manifests".to_owned(),
            Trigger::Retry { attempt } => format!("retry #{attempt} after a failure"),
            Trigger::Files(paths) => {
                let names = relative_names(paths, dir);
                let more = names.len().saturating_sub(5);
                let more = if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                };
                format!(
                    "files changed: {}{more}",
                    names[..names.len().min(5)].join(", ")
                )
            }
        }
    }

    fn files(&self, dir: &Path) -> Vec<String> {
        match self {
            Trigger::Files(paths) => relative_names(paths, dir),
            _ => Vec::new(),
        }
    }

    /// Does this trigger reconcile every agent (and prune)?
    fn is_full(&self) -> bool {
        matches!(
            self,
            Trigger::Start | Trigger::Resync | Trigger::Retry { .. }
        )
    }
}

fn relative_names(paths: &BTreeSet<PathBuf>, dir: &Path) -> Vec<String> {
    paths
        .iter()
        .map(|p| match p.strip_prefix(dir) {
            Ok(rel) if rel.as_os_str().is_empty() => ".".to_owned(),
            Ok(rel) => rel.display().to_string(),
            Err(_) => p.display().to_string(),
        })
        .collect()
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
/// path bottle itself writes? Checked before relevance, and the only filter
/// while the manifests are invalid.
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
        || [
            ".swp",
            ".swo",
            ".swn",
            ".swx",
            ".tmp",
            ".bak",
            ".orig",
            ".crswap",
            ".kate-swp",
            "___jb_tmp___",
            "___jb_old___",
        ]
        .iter()
        .any(|s| name.ends_with(s))
        || name == "4913" // vim's write test
        || name.starts_with(".goutputstream-")
}

/// The paths whose changes can change the desired state, from a good load.
#[derive(Debug, Clone, Default)]
pub struct WatchSet {
    root: PathBuf,
    /// Content is an input: manifests (and their symlink targets), prompt
    /// files, skill directories, CA certificates, setup inputs; each as
    /// named and, when different, resolved.
    inputs: Vec<PathBuf>,
    /// Only existence matters: local images, volumes, secret files.
    exists: Vec<PathBuf>,
}

impl WatchSet {
    pub fn of(project: &Project) -> Self {
        let mut inputs = Vec::new();
        let mut push = |path: &Path| {
            inputs.push(path.to_owned());
            if let Ok(real) = path.canonicalize()
                && real != path
            {
                inputs.push(real);
            }
        };
        for (_, file) in project.sources.iter() {
            push(&file.path);
        }
        for agent in project.agents.values() {
            if let Prompt::File(path) = &agent.prompt {
                push(path);
            }
            for skill in &agent.skills {
                push(skill);
            }
        }
        let mut exists = Vec::new();
        for bottle in project.bottles.values() {
            if let Some(cert) = &bottle.ca_cert {
                push(cert);
            }
            for input in bottle.setup_inputs.iter().flatten() {
                push(input);
            }
            if let Image::RootfsDir(path) | Image::Archive(path) = &bottle.image {
                exists.push(path.clone());
            }
            exists.extend(bottle.volumes.iter().map(|v| v.host.clone()));
            exists.extend(
                bottle
                    .spec
                    .secrets
                    .values()
                    .filter_map(|s| s.from_file.as_ref().map(PathBuf::from)),
            );
        }
        inputs.sort();
        inputs.dedup();
        exists.sort();
        exists.dedup();
        Self {
            root: project.dir.clone(),
            inputs,
            exists,
        }
    }

    /// Can a change at `path` change the desired state?
    pub fn relevant(&self, path: &Path) -> bool {
        // The path itself, something inside it, or a directory holding it
        // (a renamed or deleted `prompts/`).
        if self
            .inputs
            .iter()
            .any(|i| path.starts_with(i) || i.starts_with(path))
        {
            return true;
        }
        if self.exists.iter().any(|e| e.starts_with(path)) {
            return true;
        }
        // A manifest the last load did not read: the loader reads every
        // `*.toml` outside hidden entries, including in a directory moved in
        // whole (which produces one event, for the directory).
        let Ok(rel) = path.strip_prefix(&self.root) else {
            return false;
        };
        if rel
            .components()
            .any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
        {
            return false;
        }
        if path.extension().is_some_and(|e| e == "toml") {
            return true;
        }
        std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) && holds_manifest(path)
    }

    /// Directories to watch non-recursively for the referenced paths that
    /// live outside the manifests directory: the parent of each (the
    /// nearest existing ancestor, for a missing one).
    pub fn outside_dirs(&self) -> BTreeSet<PathBuf> {
        self.inputs
            .iter()
            .chain(&self.exists)
            .filter(|p| !p.starts_with(&self.root))
            .filter_map(|p| {
                let mut dir = p.parent()?;
                while !dir.is_dir() {
                    dir = dir.parent()?;
                }
                Some(dir.to_owned())
            })
            .collect()
    }
}

/// Does this directory hold a `*.toml` the loader would read?
fn holds_manifest(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|entry| {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            return false;
        }
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => holds_manifest(&path),
            Ok(_) => path.extension().is_some_and(|e| e == "toml"),
            Err(_) => false,
        }
    })
}

/// What decides an agent's reconcile: its machine's spec and every step's
/// hash. Two equal fingerprints need no reconcile.
pub fn fingerprints(desired: &Desired) -> BTreeMap<String, String> {
    desired
        .agents
        .values()
        .map(|a| {
            let mut s = format!("{}\n", a.machine);
            // The spec hash covers every create-time field.
            s.push_str(&format!("spec={}\n", a.machine_hashes.spec_hash));
            for step in &a.steps {
                s.push_str(&format!("{}={}\n", step.kind.id(), step.hash));
            }
            // What its bottle's gate serves (an `allow_hosts` edit changes
            // no machine or step, only the gate).
            let bottle = &desired.project.agents[&a.name].spec.bottle;
            if let Some(gate) = desired
                .gate
                .as_ref()
                .and_then(|g| g.config.bottles.get(bottle))
            {
                let json = serde_json::to_vec(gate).expect("gate configs serialize");
                s.push_str(&format!("gate={}\n", crate::steps::sha256_hex(&json)));
            }
            (a.name.clone(), s)
        })
        .collect()
}

/// The `format_version` of `watch --json` lines.
pub const WATCH_FORMAT: u32 = 1;

/// One line per event, as text with a timestamp or as a JSON object. Every
/// JSON line carries `format_version`, `ts`, `event`, `message` and, inside
/// a reconcile, its number as `reconcile`.
pub struct Logger {
    pub json: bool,
    /// The reconcile in progress (0 before the first).
    current: AtomicU64,
}

impl Logger {
    pub fn new(json: bool) -> Self {
        Self {
            json,
            current: AtomicU64::new(0),
        }
    }

    pub fn log(&self, event: &str, message: &str, fields: serde_json::Value) {
        let ts = crate::time::rfc3339(SystemTime::now());
        if self.json {
            let mut obj = json!({ "format_version": WATCH_FORMAT, "ts": ts, "event": event, "message": message.trim_start() });
            let n = self.current.load(Ordering::Relaxed);
            if let Some(o) = obj.as_object_mut() {
                if n > 0 {
                    o.insert("reconcile".into(), n.into());
                }
                if let serde_json::Value::Object(extra) = fields {
                    o.extend(extra);
                }
            }
            println!("{obj}");
        } else {
            println!("{ts} {message}");
        }
    }

    fn action(&self, report: &ActionReport) {
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
            &format!(
                "  {status} {who}: {} {} ({}) [{detail}]",
                a.op.verb(),
                a.op.step(),
                a.cause
            ),
            json!({ "agent": a.agent, "machine": a.machine, "action": a.op.verb(), "step": a.op.step(), "cause": a.cause, "status": status, "detail": detail }),
        );
    }
}

/// The progress of one reconcile: every action that ran, one line each;
/// not the ones held behind a blocked action (reported once, by the loop).
struct ReconcileProgress<'a> {
    log: &'a Logger,
    held: HashSet<usize>,
}

impl Progress for ReconcileProgress<'_> {
    fn started(&self, _action: &Action, _running: usize, _total: usize) {}

    fn finished(&self, report: &ActionReport, _finished: usize, _total: usize) {
        let held = self.held.contains(&report.action.id)
            && matches!(
                report.outcome,
                ActionOutcome::Skipped { .. } | ActionOutcome::Blocked { .. }
            );
        if !held {
            self.log.action(report);
        }
    }
}

/// Blocked actions and everything that depends on them (plan ids; every
/// action's dependencies come before it).
fn held_actions(plan: &Plan) -> HashSet<usize> {
    let mut held = HashSet::new();
    for action in &plan.actions {
        if action.blocked.is_some() || action.after.iter().any(|d| held.contains(d)) {
            held.insert(action.id);
        }
    }
    held
}

/// Did the load fail because the manifests directory is not there?
fn is_missing_directory(report: &miette::Report) -> bool {
    let code = |d: &dyn Diagnostic| {
        d.code()
            .is_some_and(|c| c.to_string() == "bottle::no-directory")
    };
    code(report.as_ref()) || report.related().is_some_and(|mut r| r.any(code))
}

/// Loads the desired state; errors are already rendered diagnostics.
pub type Loader<'a> = dyn Fn() -> Result<Desired, miette::Report> + 'a;

#[derive(Debug, Error, Diagnostic)]
#[error("the project id changed from `{locked}` to `{now}` while watching")]
#[diagnostic(
    code("bottle::project-renamed"),
    help(
        "a watch holds the lock of the project it started with: stop this watch (Ctrl-C) and start it again to manage project `{now}`; the machines of `{locked}` are left as they are"
    )
)]
struct ProjectRenamed {
    locked: String,
    now: String,
}

/// The reconcile loop. Returns when a `Stop` message arrives (or every
/// sender is gone). `watcher`, when given, is told which directories outside
/// the manifests directory to watch after each good load.
pub fn run(
    options: &WatchOptions,
    rt: &dyn Runtime,
    load: &Loader,
    rx: Receiver<Message>,
    mut watcher: Option<&mut FsWatcher>,
) -> miette::Result<()> {
    let log = Logger::new(options.json);
    log.log(
        "watching",
        &format!(
            "watching {} (debounce {} ms, resync {})",
            options.dir.display(),
            options.debounce.as_millis(),
            match options.resync {
                Some(d) => format!("every {} s", d.as_secs()),
                None => "off".to_owned(),
            }
        ),
        json!({ "dir": options.dir, "debounce_ms": options.debounce.as_millis() as u64, "resync_seconds": options.resync.map(|d| d.as_secs()) }),
    );
    let mut state = LoopState {
        options,
        rt,
        load,
        log: &log,
        last_good: None,
        set: None,
        invalid: None,
        backoff: Backoff::new(),
        retry_at: None,
        resync_at: None,
        recheck_at: None,
        gate_check_at: Some(Instant::now() + GATE_CHECK),
        owed_all: false,
        owed: BTreeSet::new(),
        reported_blocked: BTreeMap::new(),
        count: 0,
    };
    let mut next = Some(Trigger::Start);
    loop {
        if let Some(trigger) = next.take() {
            state.reconcile(trigger, watcher.as_deref_mut());
        }
        // Wait for events, a retry, the resync or a recheck, whichever
        // comes first.
        let deadline = [
            state.retry_at,
            state.resync_at,
            state.recheck_at,
            state.gate_check_at,
        ]
        .into_iter()
        .flatten()
        .min();
        let message = match deadline {
            Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        let stop = |log: &Logger| {
            log.current.store(0, Ordering::Relaxed);
            log.log("stop", "stopping", json!({}));
        };
        match message {
            Ok(Message::Stop) | Err(RecvTimeoutError::Disconnected) => {
                stop(&log);
                return Ok(());
            }
            Ok(Message::WatchError(e)) => state.watch_error(&e),
            Ok(Message::Files(paths)) => {
                // Everything that queued meanwhile joins one follow-up; so
                // do batches that arrive within a tick of each other (the
                // debouncer releases each event once it is old enough, so
                // one save can straddle two ticks).
                let mut all: BTreeSet<PathBuf> =
                    paths.into_iter().filter(|p| state.relevant(p)).collect();
                let settle = settle_window(options.debounce);
                let give_up = Instant::now() + options.debounce.max(settle * 4);
                let mut quiet_until = Instant::now() + settle;
                loop {
                    let now = Instant::now();
                    let wait = if all.is_empty() {
                        Duration::ZERO
                    } else {
                        quiet_until.min(give_up).saturating_duration_since(now)
                    };
                    match rx.recv_timeout(wait) {
                        Ok(Message::Files(more)) => {
                            let before = all.len();
                            all.extend(more.into_iter().filter(|p| state.relevant(p)));
                            if all.len() > before {
                                quiet_until = Instant::now() + settle;
                            }
                        }
                        Ok(Message::Stop) => {
                            stop(&log);
                            return Ok(());
                        }
                        Ok(Message::WatchError(e)) => state.watch_error(&e),
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => {
                            stop(&log);
                            return Ok(());
                        }
                    }
                }
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
                    next = Some(Trigger::Resync);
                } else if state.recheck_at.is_some_and(|t| t <= now) {
                    state.recheck_at = None;
                    next = Some(Trigger::Recheck);
                } else if state.gate_check_at.is_some_and(|t| t <= now) {
                    state.gate_check_at = Some(now + GATE_CHECK);
                    // A gate that died is started again by a full
                    // reconcile, without waiting for the next resync.
                    if state.gate_died() {
                        next = Some(Trigger::Resync);
                    }
                }
            }
        }
    }
}

struct LoopState<'a> {
    options: &'a WatchOptions,
    rt: &'a dyn Runtime,
    load: &'a Loader<'a>,
    log: &'a Logger,
    last_good: Option<Desired>,
    /// What the last good load referenced.
    set: Option<WatchSet>,
    /// The diagnostics, while the manifests are invalid.
    invalid: Option<String>,
    backoff: Backoff,
    retry_at: Option<Instant>,
    resync_at: Option<Instant>,
    recheck_at: Option<Instant>,
    /// Agents owed a reconcile because one failed (`owed_all`: everything,
    /// pruning included).
    owed_all: bool,
    owed: BTreeSet<String>,
    /// Blocked actions already reported, by machine, so each is reported
    /// once per change.
    reported_blocked: BTreeMap<String, BTreeSet<String>>,
    count: u64,
    /// When to ask the gate whether it still runs.
    gate_check_at: Option<Instant>,
}

/// How often `watch` asks the project's gate whether it still runs.
const GATE_CHECK: Duration = Duration::from_secs(5);

impl LoopState<'_> {
    /// Whether the last good state wants a gate and none answers.
    fn gate_died(&self) -> bool {
        let Some(gate) = self.last_good.as_ref().and_then(|d| d.gate.as_ref()) else {
            return false;
        };
        gate.is_needed()
            && crate::gate::reconcile::health(&gate.paths)
                == crate::gate::reconcile::GateHealth::NotRunning
    }

    fn relevant(&self, path: &Path) -> bool {
        if is_ignored(path, &self.options.ignore) {
            return false;
        }
        // While invalid (or before any good load) the references are not
        // known: anything may be the fix.
        match &self.set {
            Some(set) if self.invalid.is_none() => set.relevant(path),
            _ => true,
        }
    }

    fn watch_error(&self, error: &str) {
        self.log.log(
            "watch-error",
            &format!("watch error: {error}"),
            json!({ "error": error }),
        );
    }

    fn begin(&mut self) -> u64 {
        self.count += 1;
        self.log.current.store(self.count, Ordering::Relaxed);
        self.count
    }

    fn reconcile(&mut self, trigger: Trigger, watcher: Option<&mut FsWatcher>) {
        let options = self.options;
        let why = trigger.describe(&options.dir);
        let files = trigger.files(&options.dir);
        if trigger.is_full() {
            self.resync_at = options.resync.map(|d| Instant::now() + d);
        }
        let loaded = (self.load)().and_then(|d| {
            if d.project.name == options.project {
                Ok(d)
            } else {
                Err(ProjectRenamed {
                    locked: options.project.clone(),
                    now: d.project.name.clone(),
                }
                .into())
            }
        });
        let desired = match loaded {
            Ok(d) => d,
            Err(report) => {
                if let Some(watcher) = watcher
                    && is_missing_directory(&report)
                {
                    watcher.mark_root_stale();
                }
                self.invalid(&trigger, &why, &files, &report);
                if trigger == Trigger::Resync {
                    self.resync_last_good();
                }
                return;
            }
        };
        let recovered = self.invalid.take().is_some();
        self.recheck_at = None;
        let set = WatchSet::of(&desired.project);
        if let Some(watcher) = watcher {
            if let Some(error) = watcher.follow_root() {
                self.watch_error(&error);
            }
            for error in watcher.set_outside(set.outside_dirs()) {
                self.watch_error(&error);
            }
        }
        self.set = Some(set);

        let n = self.begin();
        let why = if recovered {
            format!("{why}; manifests are valid again")
        } else {
            why
        };
        let full = trigger.is_full() || self.last_good.is_none();
        let (targets, removed) = if full {
            (None, false)
        } else {
            let old = self
                .last_good
                .as_ref()
                .map(fingerprints)
                .unwrap_or_default();
            let new = fingerprints(&desired);
            let changed: Vec<String> = new
                .iter()
                .filter(|(k, v)| old.get(*k) != Some(v))
                .map(|(k, _)| k.clone())
                .collect();
            let removed = old.keys().any(|k| !new.contains_key(k));
            if changed.is_empty() && !removed {
                self.log.log(
                    "skip",
                    &format!("reconcile #{n} ({why}): no agent affected"),
                    json!({ "trigger": trigger.kind(), "reason": why, "files": files }),
                );
                self.last_good = Some(desired);
                self.settle();
                return;
            }
            (Some(changed), removed)
        };
        let scope = match (&targets, removed) {
            (None, _) => "all agents".to_owned(),
            (Some(t), true) if t.is_empty() => "removed agents".to_owned(),
            (Some(t), removed) => format!(
                "agent{} {}{}",
                if t.len() == 1 { "" } else { "s" },
                t.join(", "),
                if removed { ", and removed agents" } else { "" }
            ),
        };
        self.log.log(
            "reconcile",
            &format!("reconcile #{n} ({why}): {scope}"),
            json!({ "trigger": trigger.kind(), "reason": why, "files": files, "full": full, "agents": targets.clone().unwrap_or_default(), "removed": removed }),
        );
        let plan_options = PlanOptions {
            allow_replace: options.allow_replace,
            prune: options.prune,
            include_undeclared: removed,
            targets: targets.clone(),
        };
        let outcome = self.observe_plan_apply(&desired, &plan_options, |state, plan| {
            state.report_blocked(&desired, plan, targets.as_deref(), removed);
        });
        let (plan, report) = match outcome {
            Ok(done) => done,
            Err(e) => {
                self.last_good = Some(desired);
                self.owe(targets.as_deref(), removed);
                self.fail(&e);
                return;
            }
        };
        self.last_good = Some(desired);
        if apply::cancelled() {
            // Ctrl-C: the calls under way finished, nothing new started;
            // the loop stops next, so no retry is scheduled.
            self.log.log(
                "interrupted",
                &format!(
                    "reconcile #{n} interrupted: {} action(s) done in {:.2}s",
                    report.done(),
                    report.seconds
                ),
                json!({ "done": report.done(), "seconds": report.seconds }),
            );
            return;
        }
        if let Some(what) = failures(&plan, &report) {
            self.owe(targets.as_deref(), removed);
            self.fail(&what);
            return;
        }
        match &targets {
            None => {
                self.owed_all = false;
                self.owed.clear();
            }
            Some(t) => {
                for agent in t {
                    self.owed.remove(agent);
                }
            }
        }
        self.log_done(n, &report, "blocked");
        self.settle();
    }

    /// `reconcile #N done: ...`, naming blocked actions `blocked`.
    fn log_done(&self, n: u64, report: &apply::Report, blocked: &str) {
        self.log.log(
            "done",
            &format!(
                "reconcile #{n} done: {} action(s) in {:.2}s{}",
                report.done(),
                report.seconds,
                match report.blocked() {
                    0 => String::new(),
                    b => format!(", {b} {blocked}"),
                }
            ),
            json!({ "done": report.done(), "blocked": report.blocked(), "seconds": report.seconds }),
        );
    }

    /// Observe the agents in scope, plan, let `prepare` look at or adjust
    /// the plan, then apply it. Agents whose guest could not be probed get
    /// nothing planned (an unknown state is not drift); they are logged
    /// here and left to the caller to retry.
    fn observe_plan_apply(
        &mut self,
        desired: &Desired,
        plan_options: &PlanOptions,
        prepare: impl FnOnce(&mut Self, &mut Plan),
    ) -> Result<(Plan, apply::Report), String> {
        let snapshot = crate::observe::observe(
            self.rt,
            desired,
            plan_options.targets.as_deref(),
            self.options.parallelism,
        )
        .map_err(|e| format!("observe failed: {e}"))?;
        let mut plan = plan::plan(desired, &snapshot, plan_options);
        // A start that would fail for a missing secret waits (a restart
        // would stop the machine first, a replacement delete it).
        crate::preflight::hold_launches_without_secrets(
            desired,
            &mut plan,
            crate::preflight::Waiting::Watch,
        );
        prepare(self, &mut plan);
        for e in &plan.errors {
            self.log.log(
                "error",
                &format!("  error {}: {}", e.agent, e.message),
                json!({ "agent": e.agent, "machine": e.machine, "error": e.message }),
            );
        }
        let progress = ReconcileProgress {
            log: self.log,
            held: held_actions(&plan),
        };
        let report = apply::execute(
            desired,
            &snapshot,
            &plan,
            self.rt,
            self.options.parallelism,
            &progress,
        );
        Ok((plan, report))
    }

    /// The periodic resync while the manifests are invalid: the last good
    /// state stays in force, so drift inside guests is still repaired
    /// against it; but nothing is created, replaced or deleted on the word
    /// of manifests that no longer load. A failure waits for the next
    /// resync (or the fix) rather than a retry.
    fn resync_last_good(&mut self) {
        let Some(desired) = self.last_good.take() else {
            return;
        };
        let n = self.begin();
        let why = "periodic resync; manifests are invalid";
        self.log.log(
            "reconcile",
            &format!(
                "reconcile #{n} ({why}): all agents as last loaded; nothing is created, replaced or deleted"
            ),
            json!({ "trigger": "resync", "reason": why, "files": [], "full": true, "agents": [], "removed": false, "last_good": true }),
        );
        let plan_options = PlanOptions::default();
        let outcome = self.observe_plan_apply(&desired, &plan_options, |_, plan| {
            for action in &mut plan.actions {
                if matches!(action.op, plan::Op::Create | plan::Op::Replace | plan::Op::Delete) {
                    action.blocked = Some(
                        "the manifests are invalid: nothing is created, replaced or deleted until they are fixed"
                            .to_owned(),
                    );
                }
            }
        });
        self.last_good = Some(desired);
        let failed = match outcome {
            // Ctrl-C: the loop stops next.
            Ok(_) if apply::cancelled() => return,
            Err(e) => Some(e),
            Ok((plan, report)) => failures(&plan, &report).or_else(|| {
                self.log_done(n, &report, "held until the manifests are fixed");
                None
            }),
        };
        if let Some(what) = failed {
            self.log.log(
                "failed",
                &format!("reconcile #{n} failed: {what}; the next resync tries again"),
                json!({ "error": what, "retry": null }),
            );
        }
    }

    /// After a reconcile that did not fail: reset the backoff once nothing
    /// is owed, else make sure a retry is coming.
    fn settle(&mut self) {
        if !self.owed_all && self.owed.is_empty() {
            self.backoff.reset();
            self.retry_at = None;
        } else if self.retry_at.is_none() {
            let (delay, _) = self.backoff.next_delay();
            self.retry_at = Some(Instant::now() + delay);
        }
    }

    fn owe(&mut self, targets: Option<&[String]>, removed: bool) {
        match targets {
            Some(t) if !removed => self.owed.extend(t.iter().cloned()),
            _ => self.owed_all = true,
        }
    }

    fn invalid(&mut self, trigger: &Trigger, why: &str, files: &[String], report: &miette::Report) {
        let mut text = String::new();
        let _ =
            miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor())
                .with_width(100)
                .with_links(false)
                .render_report(&mut text, report.as_ref());
        self.recheck_at = Some(Instant::now() + INVALID_RECHECK);
        // A re-read nobody asked for (recheck, resync, retry) finding the
        // same problems says nothing new, and is no reconcile of its own;
        // a save is answered even when it changed nothing.
        let saved = matches!(trigger, Trigger::Files(_));
        if !saved && self.invalid.as_deref() == Some(text.as_str()) {
            return;
        }
        let mut codes: Vec<String> = report.code().map(|c| c.to_string()).into_iter().collect();
        if let Some(related) = report.related() {
            codes.extend(related.filter_map(|d| d.code().map(|c| c.to_string())));
        }
        let n = self.begin();
        self.log.log(
            "invalid",
            &format!(
                "reconcile #{n} ({why}): manifests are invalid; nothing changes until they are fixed (the last good state stays in force)"
            ),
            json!({ "trigger": trigger.kind(), "reason": why, "files": files, "codes": codes, "diagnostics": text }),
        );
        if !self.options.json {
            eprintln!("{report:?}");
        }
        self.invalid = Some(text);
    }

    /// Report each blocked action once per change: an action already
    /// reported for the same desired spec is not reported again until it
    /// stops being blocked.
    fn report_blocked(
        &mut self,
        desired: &Desired,
        plan: &Plan,
        targets: Option<&[String]>,
        removed: bool,
    ) {
        let in_scope = |machine: &str| match targets {
            None => true,
            Some(t) => match desired.by_machine(machine) {
                Some(agent) => t.contains(&agent.name),
                None => removed,
            },
        };
        let previous = std::mem::take(&mut self.reported_blocked);
        let mut reported: BTreeMap<String, BTreeSet<String>> = previous
            .iter()
            .filter(|(m, _)| !in_scope(m))
            .map(|(m, k)| (m.clone(), k.clone()))
            .collect();
        let held = held_actions(plan);
        for action in plan.blocked() {
            let spec = action
                .agent
                .as_ref()
                .and_then(|a| desired.agents.get(a))
                .map(|a| a.machine_hashes.spec_hash.as_str())
                .unwrap_or_default();
            let key = format!(
                "{}|{}|{}|{spec}",
                action.op.verb(),
                action.op.step(),
                action.cause
            );
            let seen = previous
                .get(&action.machine)
                .is_some_and(|keys| keys.contains(&key));
            reported
                .entry(action.machine.clone())
                .or_default()
                .insert(key);
            if seen {
                continue;
            }
            let waiting = plan
                .actions
                .iter()
                .filter(|a| {
                    a.machine == action.machine && a.id != action.id && held.contains(&a.id)
                })
                .count();
            let waiting_note = match waiting {
                0 => String::new(),
                n => format!(" ({n} dependent action(s) wait for it)"),
            };
            self.log.log(
                "blocked",
                &format!(
                    "  blocked {}: {} {} ({}): {}{waiting_note}",
                    action.agent.as_deref().unwrap_or(&action.machine),
                    action.op.verb(),
                    action.op.step(),
                    action.cause,
                    action.blocked.as_deref().unwrap_or_default()
                ),
                json!({ "agent": action.agent, "machine": action.machine, "action": action.op.verb(), "step": action.op.step(), "cause": action.cause, "reason": action.blocked, "waiting": waiting }),
            );
        }
        self.reported_blocked = reported;
    }

    fn fail(&mut self, what: &str) {
        let (delay, attempt) = self.backoff.next_delay();
        self.retry_at = Some(Instant::now() + delay);
        self.log.log(
            "failed",
            &format!(
                "reconcile #{} failed: {what}; retry #{attempt} in {:.1}s",
                self.count,
                delay.as_secs_f64()
            ),
            json!({ "error": what, "retry": attempt, "retry_in_seconds": delay.as_secs_f64() }),
        );
    }
}

/// What went wrong in a reconcile that ran, if anything.
fn failures(plan: &Plan, report: &apply::Report) -> Option<String> {
    (report.failed() > 0 || !plan.errors.is_empty()).then(|| {
        format!(
            "{} action(s) failed, {} agent(s) not observed",
            report.failed(),
            plan.errors.len()
        )
    })
}

/// How often the debouncer looks for events old enough to release: a
/// quarter of the debounce (its default; at least 5 ms). The debouncer
/// wakes up that often even when idle, which is most of a watch's idle CPU
/// (benches/watch.rs: 0.13% of a core at the default 150 ms; an eighth of
/// the debounce measured 0.43%, for 20 ms less latency).
pub fn debouncer_tick(debounce: Duration) -> Duration {
    (debounce / 4).max(Duration::from_millis(5)).min(debounce)
}

/// How long the loop waits after a batch for the rest of the same save.
fn settle_window(debounce: Duration) -> Duration {
    debouncer_tick(debounce) + Duration::from_millis(5)
}

/// notify behind a debouncer: the manifests directory recursively, plus
/// directories outside it non-recursively (see [`WatchSet::outside_dirs`]).
/// Dropping it stops watching.
pub struct FsWatcher {
    debouncer: Debouncer<RecommendedWatcher, RecommendedCache>,
    root: PathBuf,
    /// Device and inode of the directory the root watch is on.
    root_id: Option<(u64, u64)>,
    /// The root itself was removed, moved or created (or events were lost)
    /// since it was last watched: watch it again at the next good load.
    /// Set by the event callback before it sends the batch, so the reload
    /// that batch triggers sees it.
    root_stale: Arc<AtomicBool>,
    outside: BTreeSet<PathBuf>,
}

/// Is this event about the watched root itself (not something inside it)
/// being removed, moved, or created (seen from a watched parent)?
fn touches_root_itself(event: &notify::Event, root: &Path) -> bool {
    use notify::event::ModifyKind;
    matches!(
        event.kind,
        EventKind::Remove(_) | EventKind::Create(_) | EventKind::Modify(ModifyKind::Name(_))
    ) && event.paths.iter().any(|p| p == root)
}

/// Device and inode of a directory, to tell when it was made anew.
fn dir_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl FsWatcher {
    /// Watch `root` (canonical); events go to `tx` as [`Message`]s.
    pub fn start(root: &Path, debounce: Duration, tx: Sender<Message>) -> notify::Result<Self> {
        let rescan_root = root.to_owned();
        let root_stale = Arc::new(AtomicBool::new(false));
        let stale = root_stale.clone();
        let tick = debouncer_tick(debounce);
        let mut debouncer =
            new_debouncer(debounce, Some(tick), move |result: DebounceEventResult| {
                let message = match result {
                    Ok(events) => {
                        let mut paths = Vec::new();
                        for event in events {
                            if event.need_rescan() {
                                // Events were lost (queue overflow): reload,
                                // and do not trust the root watch either.
                                paths.push(rescan_root.clone());
                                stale.store(true, Ordering::SeqCst);
                            }
                            if touches_root_itself(&event.event, &rescan_root) {
                                stale.store(true, Ordering::SeqCst);
                            }
                            // Reading files (bottle's own reloads and copies
                            // included) produces access events: only changes
                            // count.
                            if !matches!(event.event.kind, EventKind::Access(_)) {
                                paths.extend(event.event.paths);
                            }
                        }
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
        debouncer.watch(root, RecursiveMode::Recursive)?;
        Ok(Self {
            debouncer,
            root: root.to_owned(),
            root_id: dir_id(root),
            root_stale,
            outside: BTreeSet::new(),
        })
    }

    /// The manifests directory was found missing: whatever comes back at
    /// its path must be watched anew.
    pub fn mark_root_stale(&self) {
        self.root_stale.store(true, Ordering::SeqCst);
    }

    /// Watch the manifests directory again if it may not be the directory
    /// the watch was set on (deleted and made anew, or put back by a
    /// rename): the old watch went with the old directory. The inode alone
    /// cannot tell: ext4 gives `rm -rf m && mkdir m` the same number back,
    /// so a removal seen (by an event, or a load that found no directory)
    /// forces it. Returns what failed.
    pub fn follow_root(&mut self) -> Option<String> {
        let now = dir_id(&self.root);
        // Still missing: leave the mark for the load that finds it back.
        now?;
        let stale = self.root_stale.swap(false, Ordering::SeqCst);
        if !stale && now == self.root_id {
            return None;
        }
        // Fails when notify already dropped the watch of a deleted root.
        let _ = self.debouncer.unwatch(&self.root);
        self.root_id = now;
        self.debouncer
            .watch(&self.root, RecursiveMode::Recursive)
            .err()
            .map(|e| format!("cannot watch {}: {e}", self.root.display()))
    }

    /// Watch exactly these outside directories (non-recursively) from now
    /// on. Returns one message per directory that could not be watched.
    pub fn set_outside(&mut self, dirs: BTreeSet<PathBuf>) -> Vec<String> {
        let mut errors = Vec::new();
        let gone: Vec<PathBuf> = self.outside.difference(&dirs).cloned().collect();
        for dir in gone {
            // Unwatching an ancestor of the manifests directory would drop
            // the debouncer's bookkeeping for it too: keep those.
            if self.root.starts_with(&dir) {
                continue;
            }
            // A deleted directory is no longer watched anyway.
            let _ = self.debouncer.unwatch(&dir);
            self.outside.remove(&dir);
        }
        for dir in dirs {
            if self.outside.contains(&dir) {
                continue;
            }
            match self.debouncer.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.outside.insert(dir);
                }
                Err(e) => errors.push(format!("cannot watch {}: {e}", dir.display())),
            }
        }
        errors
    }

    /// The outside directories watched now.
    pub fn outside(&self) -> &BTreeSet<PathBuf> {
        &self.outside
    }
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
            "/m/prompts/.a.md.swn",
            "/m/a.toml___jb_tmp___",
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

    #[test]
    fn a_missing_manifests_directory_is_told_from_other_load_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let load = |dir: &Path| miette::Report::new(crate::manifest::load_dir(dir).unwrap_err());
        assert!(is_missing_directory(&load(&tmp.path().join("gone"))));
        // An empty directory: no manifests, but the directory is there.
        assert!(!is_missing_directory(&load(tmp.path())));
        std::fs::write(tmp.path().join("a.toml"), "[agent.a]\nbottle = 1\n").unwrap();
        assert!(!is_missing_directory(&load(tmp.path())));
    }

    fn set(root: &str, inputs: &[&str], exists: &[&str]) -> WatchSet {
        WatchSet {
            root: PathBuf::from(root),
            inputs: inputs.iter().map(PathBuf::from).collect(),
            exists: exists.iter().map(PathBuf::from).collect(),
        }
    }

    #[test]
    fn inputs_their_contents_and_their_directories_are_relevant() {
        let s = set(
            "/nonexistent/m",
            &[
                "/nonexistent/m/a.toml",
                "/nonexistent/m/prompts/p.md",
                "/nonexistent/m/skills/s",
            ],
            &[],
        );
        for yes in [
            "/nonexistent/m/a.toml",
            "/nonexistent/m/prompts/p.md",
            "/nonexistent/m/prompts",
            "/nonexistent/m/skills/s/SKILL.md",
            "/nonexistent/m/new.toml",
            "/nonexistent/m/agents/b.toml",
        ] {
            assert!(s.relevant(Path::new(yes)), "{yes}");
        }
        for no in [
            "/nonexistent/m/prompts/p.md~",
            "/nonexistent/m/prompts/other.md",
            "/nonexistent/m/.hidden/x.toml",
            "/nonexistent/m/.x.toml",
            "/nonexistent/m/skills/s2",
            "/nonexistent/elsewhere/a.toml",
        ] {
            assert!(!s.relevant(Path::new(no)), "{no}");
        }
    }

    #[test]
    fn only_the_existence_of_volumes_and_images_is_relevant() {
        let s = set(
            "/nonexistent/m",
            &[],
            &["/nonexistent/m/workspace", "/nonexistent/images/root"],
        );
        assert!(s.relevant(Path::new("/nonexistent/m/workspace")));
        assert!(s.relevant(Path::new("/nonexistent/images/root")));
        assert!(s.relevant(Path::new("/nonexistent/images")));
        // An agent writing to its workspace changes nothing bottle reads.
        assert!(!s.relevant(Path::new("/nonexistent/m/workspace/src/main.rs")));
        assert!(!s.relevant(Path::new("/nonexistent/images/root/etc/passwd")));
        // ...unless it writes a manifest there: the loader reads those.
        assert!(s.relevant(Path::new("/nonexistent/m/workspace/x.toml")));
    }

    #[test]
    fn outside_paths_are_watched_through_their_nearest_existing_parent() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("m");
        std::fs::create_dir_all(root.join("prompts")).unwrap();
        std::fs::create_dir_all(tmp.path().join("vol")).unwrap();
        let s = WatchSet {
            root: root.clone(),
            inputs: vec![root.join("a.toml"), tmp.path().join("shared/b.toml")],
            exists: vec![
                root.join("workspace"),
                tmp.path().join("vol/data"),
                tmp.path().join("missing/deeper/x"),
            ],
        };
        let dirs: Vec<PathBuf> = s.outside_dirs().into_iter().collect();
        assert_eq!(dirs, vec![tmp.path().to_owned(), tmp.path().join("vol")]);
    }
}
