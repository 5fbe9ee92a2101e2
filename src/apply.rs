//! Apply: walk the plan with bounded parallelism.
//!
//! Independent agents run at once, at most `parallelism` at a time. The
//! due steps of one agent run as one guest transaction ([`txn`]): one
//! upload and one exec, after the machine's lifecycle calls when a machine
//! is created, replaced or restarted (the agent user is then provisioned
//! first in the same transaction). Inside it, a failed step skips its
//! dependents and independent steps still run; each action still gets its
//! own outcome. Blocked actions do not run and skip their dependents.
//! Starting a stopped machine adds its follow-up actions (the steps found
//! out of date once it runs) to the same walk.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::desired::{Desired, DesiredAgent};
use crate::graph::StepKind;
use crate::observe::{self, Snapshot};
use crate::plan::{self, Action, Op, Plan, PlanOptions};
use crate::runtime::{MachineState, MachineUpdate, Runtime, RuntimeError, RuntimeErrorKind};
use crate::steps::txn::{self, Ledger, StepOutcome, TxnStep};
use crate::steps::{self, AgentCtx, StepError, machine};

static CANCEL: AtomicBool = AtomicBool::new(false);

/// Ask running walks to start nothing new (Ctrl-C): actions under way
/// finish, so no runtime call is left running behind bottle's back, and
/// the rest is reported as skipped.
pub fn request_cancel() {
    CANCEL.store(true, Ordering::SeqCst);
}

pub fn cancelled() -> bool {
    CANCEL.load(Ordering::SeqCst)
}

static ABORT: AtomicBool = AtomicBool::new(false);

/// Ask the runtime calls under way to end now (a second Ctrl-C): their wait
/// loops kill the command's process group and return
/// [`RuntimeErrorKind::Cancelled`], so the action fails, the walk ends and
/// the lock is released. Implies [`request_cancel`].
pub fn request_abort() {
    request_cancel();
    ABORT.store(true, Ordering::SeqCst);
}

/// Whether the runtime calls under way are to be killed.
pub fn aborted() -> bool {
    ABORT.load(Ordering::SeqCst)
}

/// How an action ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    Done { seconds: f64 },
    Failed { seconds: f64, error: String },
    Skipped { reason: String },
    Blocked { reason: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct ActionReport {
    pub action: Action,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// Everything an apply did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub actions: Vec<ActionReport>,
    pub seconds: f64,
}

impl Report {
    pub fn failed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Failed { .. }))
    }
    pub fn blocked(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Blocked { .. }))
    }
    pub fn done(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Done { .. }))
    }
    fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.actions.iter().filter(|a| f(&a.outcome)).count()
    }
}

/// Receives progress as actions start and finish.
pub trait Progress: Sync {
    fn started(&self, action: &Action, running: usize, total: usize);
    fn finished(&self, report: &ActionReport, finished: usize, total: usize);
}

/// Discards progress.
pub struct Quiet;

impl Progress for Quiet {
    fn started(&self, _: &Action, _: usize, _: usize) {}
    fn finished(&self, _: &ActionReport, _: usize, _: usize) {}
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    Pending,
    /// Its dependencies are done; waiting for a free worker.
    Ready,
    Running,
    Finished,
}

/// Execute a plan.
pub fn execute(
    desired: &Desired,
    snapshot: &Snapshot,
    plan: &Plan,
    rt: &dyn Runtime,
    parallelism: usize,
    progress: &dyn Progress,
) -> Report {
    let started_at = Instant::now();
    let shared = Shared {
        snapshot,
        probes: Mutex::new(BTreeMap::new()),
    };
    let mut actions: Vec<Action> = plan.actions.clone();
    let mut outcomes: Vec<Option<Outcome>> = vec![None; actions.len()];
    let mut states: Vec<State> = vec![State::Pending; actions.len()];

    let (work_tx, work_rx) = mpsc::channel::<Vec<Action>>();
    let work_rx = Mutex::new(work_rx);
    type Done = (Vec<(usize, Outcome)>, Vec<Action>);
    let (done_tx, done_rx) = mpsc::channel::<Done>();

    std::thread::scope(|scope| {
        for _ in 0..parallelism.max(1) {
            let done_tx = done_tx.clone();
            let work_rx = &work_rx;
            let shared = &shared;
            scope.spawn(move || {
                loop {
                    let next = work_rx.lock().expect("work lock").recv();
                    let Ok(batch) = next else { break };
                    let done = run_batch(desired, &batch, rt, shared);
                    if done_tx.send(done).is_err() {
                        break;
                    }
                }
            });
        }
        drop(done_tx);

        let workers = parallelism.max(1);
        let mut queue: std::collections::VecDeque<usize> = Default::default();
        let mut running = 0usize;
        let mut finished = 0usize;
        loop {
            // Settle everything that can be decided without running it.
            loop {
                let mut changed = false;
                for i in 0..actions.len() {
                    if !matches!(states[i], State::Pending | State::Ready) {
                        continue;
                    }
                    let decided = if let Some(reason) = &actions[i].blocked {
                        Some(Outcome::Blocked {
                            reason: reason.clone(),
                        })
                    } else if cancelled() {
                        Some(Outcome::Skipped {
                            reason: "interrupted before it started".to_owned(),
                        })
                    } else {
                        actions[i].after.iter().find_map(|&d| match &outcomes[d] {
                            Some(Outcome::Done { .. }) | None => None,
                            Some(_) => Some(Outcome::Skipped {
                                reason: format!(
                                    "{} {} did not complete",
                                    actions[d].op.verb(),
                                    actions[d].op.step()
                                ),
                            }),
                        })
                    };
                    if let Some(outcome) = decided {
                        states[i] = State::Finished;
                        finished += 1;
                        let report = ActionReport {
                            action: actions[i].clone(),
                            outcome: outcome.clone(),
                        };
                        progress.finished(&report, finished, actions.len());
                        outcomes[i] = Some(outcome);
                        changed = true;
                    }
                }
                if !changed {
                    break;
                }
            }
            for i in 0..actions.len() {
                let ready = states[i] == State::Pending
                    && actions[i]
                        .after
                        .iter()
                        .all(|&d| matches!(outcomes[d], Some(Outcome::Done { .. })));
                if ready {
                    states[i] = State::Ready;
                    queue.push_back(i);
                }
            }
            // In the order they became ready, and no more than there are
            // workers: an action handed to a busy worker's channel could not
            // be kept from starting by a Ctrl-C.
            while running < workers {
                let Some(i) = queue.pop_front() else { break };
                if states[i] != State::Ready {
                    continue; // settled meanwhile (interrupted), or in a batch
                }
                let batch = batch_of(&actions, &states, &outcomes, i);
                for &b in &batch {
                    states[b] = State::Running;
                    progress.started(&actions[b], running + 1, actions.len());
                }
                running += 1;
                work_tx
                    .send(batch.iter().map(|&b| actions[b].clone()).collect())
                    .expect("workers alive");
            }
            if running == 0 {
                break;
            }
            let (done, follow_ups) = done_rx.recv().expect("workers alive");
            running -= 1;
            let origin = done.first().map(|(id, _)| *id).unwrap_or_default();
            // Follow-ups join the walk behind the action that found them.
            let base = actions.len();
            for (n, mut f) in follow_ups.into_iter().enumerate() {
                f.id = base + n;
                f.after = f.after.iter().map(|a| base + *a).collect();
                f.after.push(origin);
                actions.push(f);
                outcomes.push(None);
                states.push(State::Pending);
            }
            for (id, outcome) in done {
                finished += 1;
                states[id] = State::Finished;
                let report = ActionReport {
                    action: actions[id].clone(),
                    outcome: outcome.clone(),
                };
                outcomes[id] = Some(outcome);
                progress.finished(&report, finished, actions.len());
            }
        }
        drop(work_tx);
    });

    Report {
        actions: actions
            .into_iter()
            .zip(outcomes)
            .map(|(action, outcome)| ActionReport {
                action,
                outcome: outcome.unwrap_or(Outcome::Skipped {
                    reason: "not reached".into(),
                }),
            })
            .collect(),
        seconds: secs(started_at.elapsed()),
    }
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

fn render_error(e: &StepError) -> String {
    use miette::Diagnostic;
    let mut s = e.to_string();
    if let StepError::Runtime(r) = e {
        s = r.to_string();
    }
    if let Some(help) = e.help().map(|h| h.to_string()).filter(|h| !h.is_empty()) {
        s.push_str(&format!(" (help: {help})"));
    }
    s
}

/// Before a replacement deletes the old machine (and its disk), create a
/// machine with the new settings under a scratch name and delete it again:
/// smolvm checks the settings when it creates a machine, and resolves the
/// egress host names then (failing without DNS). A replacement that cannot
/// be created keeps the old machine.
fn check_replacement_creates(
    ctx: &AgentCtx,
    rt: &dyn Runtime,
    shared: &Shared,
) -> Result<(), StepError> {
    let mut spec = machine::machine_spec(ctx);
    spec.name = machine::scratch_name(ctx.machine);
    // One left behind by an interrupted replacement (a prune may be
    // deleting it at the same time).
    if shared.snapshot.machine(&spec.name).is_some() {
        delete_if_there(rt, &spec.name)?;
    }
    rt.create(&spec).map_err(|e| {
        StepError::Other(
            format!(
                "the machine's new settings cannot be created, so the old machine and its disk \
                 were kept: {e}"
            ),
            "fix what the runtime's message names (an egress host that does not resolve \
             here, an image that cannot be found), then run `bottle apply --allow-replace` again"
                .to_owned(),
        )
    })?;
    delete_if_there(rt, &spec.name)?;
    Ok(())
}

/// Delete a machine; one already gone is what was wanted.
fn delete_if_there(rt: &dyn Runtime, machine: &str) -> Result<(), RuntimeError> {
    match rt.delete(machine) {
        Err(e) if matches!(e.kind, RuntimeErrorKind::NotFound) => Ok(()),
        other => other,
    }
}

/// What actions running at once share.
struct Shared<'a> {
    /// What observation found, before this walk changed anything.
    snapshot: &'a Snapshot,
    /// Probes made during the walk (of machines it started), by machine.
    probes: Mutex<BTreeMap<String, observe::Probe>>,
}

impl Shared<'_> {
    /// A step's probe section, as last observed.
    fn observed(&self, machine: &str, step: &str) -> Option<String> {
        if let Some(probe) = self.probes.lock().expect("probes lock").get(machine) {
            return probe.sections.get(step).cloned();
        }
        self.snapshot
            .probes
            .get(machine)
            .and_then(|p| p.sections.get(step).cloned())
    }
}

/// Does this lifecycle action leave a machine whose agent user must be
/// provisioned (the machine step) before its steps?
fn provisions(op: &Op) -> bool {
    matches!(op, Op::Create | Op::Replace | Op::Restart { .. })
}

fn is_step(op: &Op) -> bool {
    matches!(op, Op::Apply { .. } | Op::Undo { .. })
}

/// The actions that run with the ready action `i` as one unit: a machine
/// that is created, replaced or restarted, or a step, together with every
/// pending step of the same agent whose dependencies are done or in the
/// unit (they run in one guest transaction). Anything else runs alone.
fn batch_of(
    actions: &[Action],
    states: &[State],
    outcomes: &[Option<Outcome>],
    i: usize,
) -> Vec<usize> {
    let head = &actions[i];
    let mut batch = vec![i];
    if head.agent.is_none() || !(provisions(&head.op) || is_step(&head.op)) {
        return batch;
    }
    for (j, action) in actions.iter().enumerate() {
        if j == i
            || action.agent != head.agent
            || !is_step(&action.op)
            || action.blocked.is_some()
            || !matches!(states[j], State::Pending | State::Ready)
        {
            continue;
        }
        let ready = action
            .after
            .iter()
            .all(|d| batch.contains(d) || matches!(outcomes[*d], Some(Outcome::Done { .. })));
        if ready {
            batch.push(j);
        }
    }
    batch
}

/// What a unit's head did to the machine.
enum Lifecycle {
    /// The head is a step: no lifecycle call.
    None,
    /// The machine runs; its agent user is provisioned first.
    Provision,
    /// The lifecycle calls failed: the unit's steps are skipped.
    Failed(StepError),
    /// The head runs alone (start, delete), with these follow-ups.
    Alone(Result<Vec<Action>, StepError>),
}

fn lifecycle(
    desired: &Desired,
    agent: &DesiredAgent,
    ctx: &AgentCtx,
    head: &Action,
    rt: &dyn Runtime,
    shared: &Shared,
) -> Lifecycle {
    let calls = || -> Result<(), StepError> {
        match &head.op {
            Op::Create => {
                rt.create(&machine::machine_spec(ctx))?;
                start_created(rt, &head.machine)?;
            }
            Op::Replace => {
                check_replacement_creates(ctx, rt, shared)?;
                rt.delete(&head.machine)?;
                rt.create(&machine::machine_spec(ctx))?;
                start_created(rt, &head.machine)?;
            }
            Op::Restart { update } => {
                rt.stop(&head.machine)?;
                if !update.is_empty() {
                    rt.update(&head.machine, update)?;
                }
                rt.start(&head.machine)?;
            }
            _ => {}
        }
        Ok(())
    };
    match &head.op {
        Op::Create | Op::Replace | Op::Restart { .. } => match calls() {
            Ok(()) => Lifecycle::Provision,
            Err(e) => Lifecycle::Failed(e),
        },
        Op::Start { update } => Lifecycle::Alone((|| {
            if !update.is_empty() {
                rt.update(&head.machine, update)?;
            }
            rt.start(&head.machine)?;
            converge_after_start(desired, agent, rt, shared, update)
        })()),
        Op::Delete => Lifecycle::Alone(
            rt.delete(&head.machine)
                .map(|()| Vec::new())
                .map_err(Into::into),
        ),
        Op::Gate { action } => {
            Lifecycle::Alone(crate::gate::reconcile::run(desired, *action).map(|()| Vec::new()))
        }
        Op::Apply { .. } | Op::Undo { .. } => Lifecycle::None,
    }
}

/// Run one unit: its lifecycle calls, then its steps as one guest
/// transaction. Every action of the unit gets its outcome; follow-ups
/// (of a started machine) come after them.
fn run_batch(
    desired: &Desired,
    batch: &[Action],
    rt: &dyn Runtime,
    shared: &Shared,
) -> (Vec<(usize, Outcome)>, Vec<Action>) {
    let t = Instant::now();
    let head = &batch[0];
    let failed = |e: &StepError| Outcome::Failed {
        seconds: secs(t.elapsed()),
        error: render_error(e),
    };
    if let Op::Gate { action } = &head.op {
        let outcome = match crate::gate::reconcile::run(desired, *action) {
            Ok(()) => Outcome::Done {
                seconds: secs(t.elapsed()),
            },
            Err(e) => failed(&e),
        };
        return (vec![(head.id, outcome)], Vec::new());
    }
    let Some(agent_name) = &head.agent else {
        // Only deletions concern machines no agent declares.
        let outcome = match delete_if_there(rt, &head.machine) {
            Ok(()) => Outcome::Done {
                seconds: secs(t.elapsed()),
            },
            Err(e) => failed(&e.into()),
        };
        return (vec![(head.id, outcome)], Vec::new());
    };
    let agent = &desired.agents[agent_name];
    let ctx = desired.ctx(agent);
    let provision = match lifecycle(desired, agent, &ctx, head, rt, shared) {
        Lifecycle::Alone(result) => {
            let (outcome, follow_ups) = match result {
                Ok(follow_ups) => (
                    Outcome::Done {
                        seconds: secs(t.elapsed()),
                    },
                    follow_ups,
                ),
                Err(e) => (failed(&e), Vec::new()),
            };
            return (vec![(head.id, outcome)], follow_ups);
        }
        Lifecycle::Failed(e) => {
            let mut done = vec![(head.id, failed(&e))];
            let reason = format!("{} {} did not complete", head.op.verb(), head.op.step());
            done.extend(batch[1..].iter().map(|a| {
                (
                    a.id,
                    Outcome::Skipped {
                        reason: reason.clone(),
                    },
                )
            }));
            return (done, Vec::new());
        }
        Lifecycle::Provision => true,
        Lifecycle::None => false,
    };

    // The transaction's steps: the head's machine step when it provisions,
    // then the unit's steps. `owners[n]` is the unit index of transaction
    // step n; `slot` the transaction index of an action id.
    let fresh = matches!(head.op, Op::Create | Op::Replace);
    let mut txn_steps: Vec<TxnStep> = Vec::new();
    let mut owners: Vec<usize> = Vec::new();
    let mut early: BTreeMap<usize, Outcome> = BTreeMap::new();
    let mut slot: BTreeMap<usize, usize> = BTreeMap::new();
    for (k, action) in batch.iter().enumerate() {
        let built = if provision && k == 0 {
            let hash = agent
                .step(&StepKind::Machine)
                .map(|s| s.hash.clone())
                .unwrap_or_default();
            steps::apply_work(&StepKind::Machine, &hash, &ctx, None, None)
                .map(|(entry, work)| (StepKind::Machine.id(), work, Ledger::Write(entry)))
        } else {
            match &action.op {
                Op::Apply {
                    step,
                    hash,
                    previous,
                } => {
                    let kind: StepKind = step.parse().expect("planned steps parse");
                    // The project CA as it is now (a gate this apply
                    // started minted it after the plan was made).
                    let ca_now = (kind == StepKind::Ca)
                        .then(|| desired.gate.as_ref()?.ca_hash(agent_name))
                        .flatten();
                    let hash = ca_now.as_deref().unwrap_or(hash);
                    // A new disk holds nothing observation saw.
                    let observed = (!fresh)
                        .then(|| shared.observed(&action.machine, step))
                        .flatten();
                    steps::apply_work(&kind, hash, &ctx, previous.as_ref(), observed.as_deref())
                        .map(|(entry, work)| (step.clone(), work, Ledger::Write(entry)))
                }
                Op::Undo { step, entry } => {
                    let observed = shared.observed(&action.machine, step);
                    steps::undo_work(entry, &ctx, observed.as_deref())
                        .map(|work| (step.clone(), work, Ledger::Remove))
                }
                _ => unreachable!("only steps join a transaction"),
            }
        };
        // A dependency in the unit that never reached the transaction.
        let lost = action
            .after
            .iter()
            .find(|d| early.contains_key(d))
            .and_then(|d| batch.iter().find(|a| a.id == *d));
        if let Some(dep) = lost {
            let reason = format!("{} {} did not complete", dep.op.verb(), dep.op.step());
            early.insert(action.id, Outcome::Skipped { reason });
            continue;
        }
        match built {
            Ok((step, work, ledger)) => {
                let mut after: Vec<usize> = action
                    .after
                    .iter()
                    .filter_map(|d| slot.get(d).copied())
                    .collect();
                // A provisioned machine's steps all need its user.
                if provision && k > 0 {
                    after.push(0);
                }
                after.sort_unstable();
                after.dedup();
                slot.insert(action.id, txn_steps.len());
                owners.push(k);
                txn_steps.push(TxnStep {
                    step,
                    work,
                    ledger,
                    after,
                });
            }
            Err(e) => {
                early.insert(action.id, failed(&e));
            }
        }
    }
    let results = txn::run(rt, &head.machine, ctx.user(), &txn_steps);
    let seconds = secs(t.elapsed());
    let mut by_unit: BTreeMap<usize, Outcome> = BTreeMap::new();
    for (n, result) in results.into_iter().enumerate() {
        let outcome = match result {
            StepOutcome::Done => Outcome::Done { seconds },
            StepOutcome::Failed(e) => Outcome::Failed {
                seconds,
                error: render_error(&e),
            },
            StepOutcome::Skipped(dep) => {
                let dep = &batch[owners[dep]];
                Outcome::Skipped {
                    reason: format!("{} {} did not complete", dep.op.verb(), dep.op.step()),
                }
            }
        };
        by_unit.insert(owners[n], outcome);
    }
    let done = batch
        .iter()
        .enumerate()
        .map(|(k, action)| {
            let outcome = early
                .remove(&action.id)
                .or_else(|| by_unit.remove(&k))
                .unwrap_or(Outcome::Skipped {
                    reason: "not reached".into(),
                });
            (action.id, outcome)
        })
        .collect();
    (done, Vec::new())
}

/// Start a machine this action just created. A failure says that the
/// machine exists (the next apply starts it rather than creating it again),
/// keeping the runtime's own help.
fn start_created(rt: &dyn Runtime, name: &str) -> Result<(), StepError> {
    rt.start(name).map_err(|error| {
        use miette::Diagnostic;
        let help = error
            .help()
            .map(|help| help.to_string())
            .unwrap_or_else(|| {
                "fix the cause above and run `bottle apply` again: it starts the machine".into()
            });
        StepError::Other(
            format!("created {name}, but it did not start: {error}"),
            help,
        )
    })
}

/// A machine that was not running has just started: probe it and plan its
/// steps, as observation would have.
fn converge_after_start(
    desired: &Desired,
    agent: &DesiredAgent,
    rt: &dyn Runtime,
    shared: &Shared,
    update: &MachineUpdate,
) -> Result<Vec<Action>, StepError> {
    // The machine as observed, now running with the update applied: no
    // second `ls` is needed to know that.
    let mut machine = shared
        .snapshot
        .machine(&agent.machine)
        .cloned()
        .expect("only observed machines are started");
    machine.state = MachineState::Running;
    machine.cpus = update.cpus.or(machine.cpus);
    machine.memory_mib = update.memory_mib.or(machine.memory_mib);
    let listed = vec![machine];
    let probe = observe::probe_one(rt, desired, agent, &agent.machine);
    shared
        .probes
        .lock()
        .expect("probes lock")
        .insert(agent.machine.clone(), probe.clone());
    let snapshot = Snapshot {
        machines: listed,
        probes: BTreeMap::from([(agent.machine.clone(), probe)]),
        // Not observed: the gate's action is the first plan's.
        ..Snapshot::default()
    };
    let options = PlanOptions {
        targets: Some(vec![agent.name.clone()]),
        ..PlanOptions::default()
    };
    let plan = plan::plan(desired, &snapshot, &options);
    if let Some(error) = plan.errors.first() {
        return Err(StepError::Other(
            format!("started, but {}", error.message),
            "run `bottle apply` again once the machine answers".into(),
        ));
    }
    Ok(plan.actions)
}
