//! One reconcile pass of the loop: load, decide which agents changed,
//! observe, plan and apply them, and remember what failed, what is owed and
//! what was reported.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use miette::Diagnostic;
use serde_json::json;
use thiserror::Error;

use super::log::{Logger, ReconcileProgress};
use super::{
    Backoff, FsWatcher, INVALID_RECHECK, Loader, Trigger, WatchOptions, WatchSet, is_ignored,
};
use crate::apply;
use crate::desired::Desired;
use crate::plan::{self, Plan, PlanOptions};
use crate::runtime::Runtime;

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
pub(super) fn is_missing_directory(report: &miette::Report) -> bool {
    let code = |d: &dyn Diagnostic| {
        d.code()
            .is_some_and(|c| c.to_string() == "bottle::no-directory")
    };
    code(report.as_ref()) || report.related().is_some_and(|mut r| r.any(code))
}

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

pub(super) struct LoopState<'a> {
    options: &'a WatchOptions,
    rt: &'a dyn Runtime,
    load: &'a Loader<'a>,
    log: &'a Logger,
    last_good: Option<Desired>,
    /// What the last good load referenced.
    set: Option<WatchSet>,
    /// The diagnostics, while the manifests are invalid.
    invalid: Option<String>,
    pub(super) backoff: Backoff,
    pub(super) retry_at: Option<Instant>,
    pub(super) resync_at: Option<Instant>,
    pub(super) recheck_at: Option<Instant>,
    /// Agents owed a reconcile because one failed (`owed_all`: everything,
    /// pruning included).
    owed_all: bool,
    owed: BTreeSet<String>,
    /// Blocked actions already reported, by machine, so each is reported
    /// once per change.
    reported_blocked: BTreeMap<String, BTreeSet<String>>,
    count: u64,
    /// When to ask the gate whether it still runs.
    pub(super) gate_check_at: Option<Instant>,
}

/// How often `watch` asks the project's gate whether it still runs.
pub(super) const GATE_CHECK: Duration = Duration::from_secs(5);

impl<'a> LoopState<'a> {
    pub(super) fn new(
        options: &'a WatchOptions,
        rt: &'a dyn Runtime,
        load: &'a Loader<'a>,
        log: &'a Logger,
    ) -> Self {
        Self {
            options,
            rt,
            load,
            log,
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
        }
    }

    /// Whether the last good state wants a gate and none answers.
    pub(super) fn gate_died(&self) -> bool {
        let Some(gate) = self.last_good.as_ref().and_then(|d| d.gate.as_ref()) else {
            return false;
        };
        gate.is_needed()
            && crate::gate::reconcile::health(&gate.paths)
                == crate::gate::reconcile::GateHealth::NotRunning
    }

    pub(super) fn relevant(&self, path: &Path) -> bool {
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

    pub(super) fn watch_error(&self, error: &str) {
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

    pub(super) fn reconcile(&mut self, trigger: Trigger, watcher: Option<&mut FsWatcher>) {
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
