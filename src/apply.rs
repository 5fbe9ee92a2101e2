//! Apply: walk the plan with bounded parallelism.
//!
//! Independent agents and independent steps run at once, at most
//! `parallelism` actions at a time. A failed action skips its dependents
//! (transitively) and everything independent still runs. Blocked actions do
//! not run and skip their dependents. Starting a stopped machine adds its
//! follow-up actions (the steps found out of date once it runs) to the same
//! walk.

use std::collections::{BTreeMap, HashMap};
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
use crate::steps::{self, AgentCtx, GuestUser, StepError, machine};

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
        users: Mutex::new(known_users(desired, snapshot)),
        setup: desired
            .agents
            .keys()
            .map(|a| (a.clone(), Mutex::new(())))
            .collect(),
    };
    let mut actions: Vec<Action> = plan.actions.clone();
    let mut outcomes: Vec<Option<Outcome>> = vec![None; actions.len()];
    let mut states: Vec<State> = vec![State::Pending; actions.len()];

    let (work_tx, work_rx) = mpsc::channel::<Action>();
    let work_rx = Mutex::new(work_rx);
    let (done_tx, done_rx) = mpsc::channel::<(usize, Outcome, Vec<Action>)>();

    std::thread::scope(|scope| {
        for _ in 0..parallelism.max(1) {
            let done_tx = done_tx.clone();
            let work_rx = &work_rx;
            let shared = &shared;
            scope.spawn(move || {
                loop {
                    let next = work_rx.lock().expect("work lock").recv();
                    let Ok(action) = next else { break };
                    let t = Instant::now();
                    let (outcome, follow_ups) = match run(desired, &action, rt, shared) {
                        Ok(follow_ups) => (
                            Outcome::Done {
                                seconds: secs(t.elapsed()),
                            },
                            follow_ups,
                        ),
                        Err(e) => (
                            Outcome::Failed {
                                seconds: secs(t.elapsed()),
                                error: render_error(&e),
                            },
                            Vec::new(),
                        ),
                    };
                    if done_tx.send((action.id, outcome, follow_ups)).is_err() {
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
                    continue; // settled meanwhile (interrupted)
                }
                states[i] = State::Running;
                running += 1;
                progress.started(&actions[i], running, actions.len());
                work_tx.send(actions[i].clone()).expect("workers alive");
            }
            if running == 0 {
                break;
            }
            let (id, outcome, follow_ups) = done_rx.recv().expect("workers alive");
            running -= 1;
            finished += 1;
            states[id] = State::Finished;
            let report = ActionReport {
                action: actions[id].clone(),
                outcome: outcome.clone(),
            };
            outcomes[id] = Some(outcome);
            // Follow-ups join the walk behind the action that found them.
            let base = actions.len();
            for (n, mut f) in follow_ups.into_iter().enumerate() {
                f.id = base + n;
                f.after = f.after.iter().map(|a| base + *a).collect();
                f.after.push(id);
                actions.push(f);
                outcomes.push(None);
                states.push(State::Pending);
            }
            progress.finished(&report, finished, actions.len());
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
    if let Some(help) = e.help() {
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

/// Agent users already known from the probes.
fn known_users(desired: &Desired, snapshot: &Snapshot) -> HashMap<String, GuestUser> {
    let mut users = HashMap::new();
    for agent in desired.agents.values() {
        let Some(probe) = snapshot.probes.get(&agent.machine) else {
            continue;
        };
        if let Some(user) = probe
            .sections
            .get("machine")
            .and_then(|s| machine::user_from_probe(s))
        {
            users.insert(agent.name.clone(), user);
        }
    }
    users
}

/// What actions running at once share, per agent.
struct Shared<'a> {
    /// What observation found, before this walk changed anything.
    snapshot: &'a Snapshot,
    /// The agent user's ids, once known.
    users: Mutex<HashMap<String, GuestUser>>,
    /// Setup commands of one agent never run at the same time (two package
    /// installs would fight over the package manager's lock); the graph
    /// still decides their order.
    setup: HashMap<String, Mutex<()>>,
}

fn run(
    desired: &Desired,
    action: &Action,
    rt: &dyn Runtime,
    shared: &Shared,
) -> Result<Vec<Action>, StepError> {
    let users = &shared.users;
    if let Op::Gate { action } = &action.op {
        crate::gate::reconcile::run(desired, *action)?;
        return Ok(Vec::new());
    }
    let Some(agent_name) = &action.agent else {
        // Only deletions concern machines no agent declares.
        delete_if_there(rt, &action.machine)?;
        return Ok(Vec::new());
    };
    let agent = &desired.agents[agent_name];
    let ctx = desired.ctx(agent);
    let set_user = |u: GuestUser| {
        users
            .lock()
            .expect("users lock")
            .insert(agent_name.clone(), u);
    };
    let machine_hash = || {
        agent
            .step(&StepKind::Machine)
            .map(|s| s.hash.clone())
            .unwrap_or_default()
    };
    match &action.op {
        Op::Create => {
            rt.create(&machine::machine_spec(&ctx))?;
            start_created(rt, &action.machine)?;
            set_user(provision_user(&ctx, &machine_hash(), rt)?);
        }
        Op::Replace => {
            check_replacement_creates(&ctx, rt, shared)?;
            rt.delete(&action.machine)?;
            rt.create(&machine::machine_spec(&ctx))?;
            start_created(rt, &action.machine)?;
            set_user(provision_user(&ctx, &machine_hash(), rt)?);
        }
        Op::Start { update } => {
            if !update.is_empty() {
                rt.update(&action.machine, update)?;
            }
            rt.start(&action.machine)?;
            return converge_after_start(desired, agent, rt, shared, update);
        }
        Op::Restart { update } => {
            rt.stop(&action.machine)?;
            if !update.is_empty() {
                rt.update(&action.machine, update)?;
            }
            rt.start(&action.machine)?;
            set_user(provision_user(&ctx, &machine_hash(), rt)?);
        }
        Op::Apply {
            step,
            hash,
            previous,
        } => {
            let kind: StepKind = step.parse().expect("planned steps parse");
            if kind == StepKind::Machine {
                set_user(provision_user(&ctx, hash, rt)?);
            } else {
                let user = users
                    .lock()
                    .expect("users lock")
                    .get(agent_name)
                    .copied()
                    .ok_or_else(|| {
                        StepError::Other(
                            format!("the agent user of {} is unknown", action.machine),
                            "run `bottle apply` again; the machine step will create it".into(),
                        )
                    })?;
                let _serial = matches!(kind, StepKind::Setup(_))
                    .then(|| shared.setup[agent_name].lock().expect("setup lock"));
                // The project CA as it is now (a gate this apply started
                // minted it after the plan was made).
                let ca_now = (kind == StepKind::Ca)
                    .then(|| desired.gate.as_ref()?.ca_hash(agent_name))
                    .flatten();
                let hash = ca_now.as_deref().unwrap_or(hash);
                steps::apply(&kind, hash, &ctx, user, previous.as_ref(), rt)?;
            }
        }
        Op::Undo { entry, .. } => steps::undo(entry, &ctx, rt)?,
        Op::Delete => rt.delete(&action.machine)?,
        Op::Gate { .. } => unreachable!("gate actions return above"),
    }
    Ok(Vec::new())
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

fn provision_user(ctx: &AgentCtx, hash: &str, rt: &dyn Runtime) -> Result<GuestUser, StepError> {
    let (user, entry) = machine::ensure_user(ctx, hash, rt)?;
    steps::record(rt, ctx.machine, &entry, &[])?;
    Ok(user)
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
    if let Some(user) = probe
        .sections
        .get("machine")
        .and_then(|s| machine::user_from_probe(s))
    {
        shared
            .users
            .lock()
            .expect("users lock")
            .insert(agent.name.clone(), user);
    }
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
