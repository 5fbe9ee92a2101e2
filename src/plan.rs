//! Plan: a pure function of (desired state, observed snapshot, options) to
//! a DAG of actions, each with a cause a person understands.
//!
//! Same inputs, same plan, in a stable order: agents by name, each agent's
//! actions in dependency order, then deletions. Golden tests compare
//! [`Plan::render`]'s text.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::desired::{Desired, DesiredAgent, DesiredStep};
use crate::graph::StepKind;
use crate::ledger::LedgerEntry;
use crate::manifest::names::{natural_cmp, sorted_naturally};
use crate::observe::{Probe, Snapshot, is_ours};
use crate::runtime::{MachineInfo, MachineState, MachineUpdate};
use crate::steps::{
    self,
    machine::{
        self as machine_step, LABEL_AGENT, LABEL_MANAGED_BY, LABEL_PROJECT, LABEL_SPEC_FIELD,
        LABEL_SPEC_HASH, MANAGED_BY,
    },
};

pub const PLAN_FORMAT: u32 = 1;

/// What the user allowed.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    /// Replace machines whose create-time settings changed (their disk is
    /// lost).
    pub allow_replace: bool,
    /// Delete managed machines no agent declares any more.
    pub prune: bool,
    /// Limit the plan to these agents (`None`: all). Nothing is pruned when
    /// targets are given, unless `include_undeclared` is set.
    pub targets: Option<Vec<String>>,
    /// Plan deletions of undeclared machines even with targets (watch uses
    /// it when agents leave the manifests).
    pub include_undeclared: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Plan {
    pub format_version: u32,
    pub project: String,
    /// The agents planned for, when limited (`--target`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub targets: Option<Vec<String>>,
    pub actions: Vec<Action>,
    /// Things the user should know that are not actions.
    pub notes: Vec<String>,
    /// Agents whose state could not be observed: nothing is planned for
    /// them, and commands exit 1 (an unknown state is not drift).
    pub errors: Vec<PlanError>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanError {
    pub machine: String,
    pub agent: String,
    pub message: String,
}

/// The line every command prints for it.
impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.machine == "gate" && self.agent == "-" {
            return write!(f, "error: the project's gate: {}", self.message);
        }
        write!(
            f,
            "error: agent {} (machine {}): {}",
            self.agent, self.machine, self.message
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Action {
    pub id: usize,
    pub machine: String,
    /// The agent, when one declares this machine.
    pub agent: Option<String>,
    pub op: Op,
    pub cause: String,
    /// What changed, when the cause is an edited prompt or setup input: a
    /// short unified diff against what apply last sent (never for secrets).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub diff: Vec<String>,
    /// Ids of actions that must finish first.
    pub after: Vec<usize>,
    /// Why the action will not run without a flag, if it will not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Op {
    /// Create and start the machine, then create the agent user.
    Create,
    /// Delete and re-create the machine: its disk is lost.
    Replace,
    /// Start a machine that is not running (after `update`, if any); its
    /// steps are checked once it runs.
    Start {
        #[serde(skip)]
        update: MachineUpdate,
    },
    /// Stop, `update`, start.
    Restart {
        #[serde(skip)]
        update: MachineUpdate,
    },
    /// Apply one step.
    Apply {
        step: String,
        hash: String,
        #[serde(skip)]
        previous: Option<LedgerEntry>,
    },
    /// Undo a step that left the manifest.
    Undo {
        step: String,
        #[serde(skip)]
        entry: LedgerEntry,
    },
    /// Delete a managed machine no agent declares.
    Delete,
    /// Start, reload or stop the project's gate (DESIGN.md section 9).
    Gate {
        action: crate::gate::reconcile::GateOp,
    },
}

impl Op {
    pub fn verb(&self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Replace => "replace",
            Op::Start { .. } => "start",
            Op::Restart { .. } => "restart",
            Op::Apply { .. } => "apply",
            Op::Undo { .. } => "undo",
            Op::Delete => "delete",
            Op::Gate { action } => action.verb(),
        }
    }

    /// The step the action is about (`machine` for machine actions).
    pub fn step(&self) -> &str {
        match self {
            Op::Apply { step, .. } | Op::Undo { step, .. } => step,
            Op::Gate { .. } => "gate",
            _ => "machine",
        }
    }

    fn sigil(&self) -> char {
        match self {
            Op::Create => '+',
            Op::Replace => '±',
            Op::Start { .. } | Op::Restart { .. } | Op::Apply { .. } => '~',
            Op::Undo { .. } | Op::Delete => '-',
            Op::Gate { action } => action.sigil(),
        }
    }

    /// Does the action change the machine's lifecycle (and so gate every
    /// step of the agent)?
    pub fn is_lifecycle(&self) -> bool {
        matches!(
            self,
            Op::Create | Op::Replace | Op::Start { .. } | Op::Restart { .. } | Op::Delete
        )
    }
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    pub fn blocked(&self) -> impl Iterator<Item = &Action> {
        self.actions.iter().filter(|a| a.blocked.is_some())
    }

    /// The plan as text, one block per machine.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if self.actions.is_empty() && self.errors.is_empty() {
            match &self.targets {
                Some(targets) => writeln!(out, "No changes: {}.", agents_match(targets)),
                None => writeln!(out, "No changes: every agent matches its manifest."),
            }
            .ok();
        }
        // Steps line up in a column as wide as the longest step name.
        let width = self
            .actions
            .iter()
            .map(|a| a.op.step().len())
            .max()
            .unwrap_or(0)
            .max(9);
        let mut current: Option<&str> = None;
        for action in &self.actions {
            if current != Some(action.machine.as_str()) {
                if current.is_some() {
                    out.push('\n');
                }
                match &action.agent {
                    Some(agent) => writeln!(out, "agent {agent} (machine {})", action.machine),
                    None if matches!(action.op, Op::Gate { .. }) => {
                        writeln!(out, "gate of project {}", self.project)
                    }
                    None => writeln!(out, "machine {} (no agent declares it)", action.machine),
                }
                .ok();
                current = Some(&action.machine);
            }
            write!(
                out,
                "  {} {:<8} {:<width$} {}",
                action.op.sigil(),
                action.op.verb(),
                action.op.step(),
                action.cause
            )
            .ok();
            if let Some(blocked) = &action.blocked {
                write!(out, "  [blocked: {blocked}]").ok();
            }
            out.push('\n');
            for line in &action.diff {
                writeln!(out, "        | {line}").ok();
            }
        }
        for e in &self.errors {
            writeln!(out, "{e}").ok();
        }
        for note in &self.notes {
            writeln!(out, "note: {note}").ok();
        }
        if !self.actions.is_empty() {
            writeln!(out, "\n{}", self.summary()).ok();
        }
        out
    }

    /// `Plan: 1 to create, 4 to apply, 1 blocked.`
    pub fn summary(&self) -> String {
        let mut counts: BTreeMap<usize, (&str, usize)> = BTreeMap::new();
        for a in &self.actions {
            let (order, label) = match a.op {
                Op::Create => (0, "to create"),
                Op::Replace => (1, "to replace"),
                Op::Start { .. } => (2, "to start"),
                Op::Restart { .. } => (3, "to restart"),
                Op::Apply { .. } => (4, "to apply"),
                Op::Undo { .. } => (5, "to undo"),
                Op::Delete => (6, "to delete"),
                Op::Gate { action } => (7, action.summary()),
            };
            counts.entry(order).or_insert((label, 0)).1 += 1;
        }
        let mut parts: Vec<String> = counts.values().map(|(l, n)| format!("{n} {l}")).collect();
        let blocked = self.blocked().count();
        if blocked > 0 {
            parts.push(format!("{blocked} blocked"));
        }
        format!("Plan: {}.", parts.join(", "))
    }
}

/// `agent a matches its manifest` / `agents a, b match their manifests`.
pub fn agents_match(agents: &[String]) -> String {
    match agents {
        [one] => format!("agent {one} matches its manifest"),
        many => format!("agents {} match their manifests", many.join(", ")),
    }
}

/// Compare the desired state with the snapshot.
pub fn plan(desired: &Desired, snapshot: &Snapshot, options: &PlanOptions) -> Plan {
    let mut builder = Builder {
        plan: Plan {
            format_version: PLAN_FORMAT,
            project: desired.project.name.clone(),
            targets: options.targets.clone(),
            ..Plan::default()
        },
    };
    let targeted = |agent: &str| {
        options
            .targets
            .as_ref()
            .is_none_or(|t| t.iter().any(|a| a == agent))
    };
    let gate = plan_gate(&mut builder, desired, snapshot);
    for name in sorted_naturally(desired.agents.keys().map(String::as_str)) {
        let agent = &desired.agents[name];
        if !targeted(name) {
            continue;
        }
        plan_agent(&mut builder, desired, agent, snapshot, options);
    }
    if let Some(gate) = gate {
        crate::gate::reconcile::after_gate(&mut builder.plan, desired, gate);
    }
    if options.targets.is_none() || options.include_undeclared {
        plan_prune(&mut builder, desired, snapshot, options);
    }
    builder.plan
}

struct Builder {
    plan: Plan,
}

/// The gate's action (first in the plan, so its id is known to the
/// machines of gated bottles, which run after it), and its notes.
fn plan_gate(b: &mut Builder, desired: &Desired, snapshot: &Snapshot) -> Option<usize> {
    let (gate, health) = (desired.gate.as_ref()?, snapshot.gate.as_ref()?);
    b.plan.notes.extend(crate::gate::reconcile::notes(gate));
    match crate::gate::reconcile::gate_change(gate, health) {
        Ok(None) => None,
        Ok(Some((action, cause))) => {
            let id = b.plan.actions.len();
            b.plan.actions.push(Action {
                id,
                machine: "gate".to_owned(),
                agent: None,
                op: Op::Gate { action },
                cause,
                diff: Vec::new(),
                after: vec![],
                blocked: None,
            });
            Some(id)
        }
        Err(message) => {
            b.plan.errors.push(PlanError {
                machine: "gate".to_owned(),
                agent: "-".to_owned(),
                message,
            });
            None
        }
    }
}

impl Builder {
    fn error(&mut self, agent: &DesiredAgent, message: String) {
        self.plan.errors.push(PlanError {
            machine: agent.machine.clone(),
            agent: agent.name.clone(),
            message,
        });
    }

    fn push(
        &mut self,
        agent: &DesiredAgent,
        op: Op,
        cause: impl Into<String>,
        after: Vec<usize>,
    ) -> usize {
        let id = self.plan.actions.len();
        self.plan.actions.push(Action {
            id,
            machine: agent.machine.clone(),
            agent: Some(agent.name.clone()),
            op,
            cause: cause.into(),
            diff: Vec::new(),
            after,
            blocked: None,
        });
        id
    }
}

fn plan_agent(
    b: &mut Builder,
    desired: &Desired,
    agent: &DesiredAgent,
    snapshot: &Snapshot,
    options: &PlanOptions,
) {
    let Some(machine) = snapshot.machine(&agent.machine) else {
        let create = b.push(agent, Op::Create, "no machine yet", vec![]);
        plan_all_steps(b, agent, create, "new machine");
        return;
    };
    if !is_ours(machine, &desired.project.name) {
        let owner = describe_owner(machine);
        let id = b.push(
            agent,
            Op::Create,
            format!("the name is taken by a machine {owner}"),
            vec![],
        );
        b.plan.actions[id].blocked = Some("bottle never touches machines it does not manage; rename the agent or remove that machine".into());
        return;
    }
    // A state bottle cannot probe (a fork base, or one this version does
    // not know) is never counted as matching: its guest is unobservable.
    match &machine.state {
        MachineState::Frozen => {
            b.error(
                agent,
                "machine is frozen (a fork base): bottle cannot observe it and leaves it untouched; \
                 thaw it or delete it (`bottle destroy`) to let bottle manage the agent again"
                    .to_owned(),
            );
            return;
        }
        MachineState::Other(state) => {
            b.error(
                agent,
                format!(
                    "machine is in state `{state}`, which this version of bottle does not handle: \
                     its guest cannot be observed; check it with the runtime (`smolvm machine status`)"
                ),
            );
            return;
        }
        _ => {}
    }
    let changed = spec_fields_changed(agent, machine);
    let mut replace_blocked = false;
    if !changed.is_empty() {
        let cause = format!("spec-hash differs: {}", changed.join(", "));
        if plan_replace(b, agent, options, cause) == Replace::Planned {
            return;
        }
        replace_blocked = true;
    }
    let ctx = desired.ctx(agent);
    if machine.state != MachineState::Running {
        // smolvm updates only created or stopped machines; others are
        // started as they are and restarted once probed, if still needed.
        let updatable = matches!(machine.state, MachineState::Created | MachineState::Stopped);
        let (causes, update) = if updatable {
            let pending =
                machine_step::pending_update(&ctx, machine.cpus, machine.memory_mib, None, None);
            (pending.causes, pending.update)
        } else {
            (Vec::new(), MachineUpdate::default())
        };
        let mut cause = format!(
            "machine is {}; its steps are checked once it runs",
            machine.state
        );
        if !causes.is_empty() {
            cause = format!("{cause} (update first: {})", causes.join(", "));
        }
        if !replace_blocked {
            b.push(agent, Op::Start { update }, cause, vec![]);
        }
        return;
    }
    // Without a probe nothing can be compared: that is an error of
    // observation, never drift (and never a reason to restart anything).
    let probe = match snapshot.probes.get(&agent.machine) {
        Some(Probe {
            error: Some(error), ..
        }) => {
            b.error(agent, format!("could not probe the guest: {error}"));
            return;
        }
        Some(probe) => probe,
        None => {
            b.error(agent, "the running machine was not probed".to_owned());
            return;
        }
    };
    let recorded_machine = probe.ledger.get("machine");
    let pending = machine_step::pending_update(
        &ctx,
        machine.cpus,
        machine.memory_mib,
        recorded_machine,
        probe
            .sections
            .get(machine_step::SETTINGS_SECTION)
            .map(String::as_str),
    );
    if !pending.replace.is_empty() && !replace_blocked {
        if plan_replace(b, agent, options, pending.replace.join(", ")) == Replace::Planned {
            return;
        }
        replace_blocked = true;
    }
    if replace_blocked {
        // Steps need the agent user the machine step provisions: without
        // it (never provisioned, or a different user now) they wait too.
        let provisioned = recorded_machine
            .and_then(|e| e.detail_str("user"))
            .is_some_and(|u| u == ctx.user());
        if !provisioned {
            return;
        }
    }
    let machine_step::PendingUpdate { causes, update, .. } = pending;
    let gate = (!update.is_empty())
        .then(|| b.push(agent, Op::Restart { update }, causes.join(", "), vec![]));
    let steps = match (gate, replace_blocked) {
        (gate, true) => Steps::BesideBlockedReplace(gate),
        (Some(gate), false) => Steps::After(gate),
        (None, false) => Steps::All,
    };
    plan_steps(
        b,
        desired,
        agent,
        probe,
        snapshot.sent.get(&agent.name),
        steps,
    );
}

#[derive(PartialEq)]
enum Replace {
    /// Allowed: the replacement and every step after it are planned.
    Planned,
    /// Waiting for `--allow-replace`.
    Blocked,
}

/// A replacement of the agent's machine, for `cause`.
fn plan_replace(
    b: &mut Builder,
    agent: &DesiredAgent,
    options: &PlanOptions,
    cause: String,
) -> Replace {
    let id = b.push(agent, Op::Replace, cause, vec![]);
    if options.allow_replace {
        plan_all_steps(b, agent, id, "machine replaced");
        return Replace::Planned;
    }
    // Blocked: the replacement waits for the flag, but the machine that
    // exists still gets every other change (a prompt edit must not wait
    // on an unrelated egress change). The machine step itself is the
    // replacement's to redo; and when the agent user changed too, the
    // other steps need that new user first, so they wait as well.
    let steps = agent.steps.len().saturating_sub(1);
    let action = &mut b.plan.actions[id];
    action.cause = match steps {
        0 => action.cause.clone(),
        1 => format!("{} (then its step is applied again)", action.cause),
        n => format!("{} (then its {n} steps are applied again)", action.cause),
    };
    action.blocked = Some("replacing destroys the machine's disk; pass --allow-replace".into());
    Replace::Blocked
}

/// Which steps of a running machine `plan_steps` considers.
#[derive(Clone, Copy)]
enum Steps {
    All,
    /// All but the machine step, which the given restart re-provisions;
    /// every step waits for it.
    After(usize),
    /// The replacement is blocked (its machine step waits for it), after a
    /// restart if one is planned. Changed setup steps wait as well: they
    /// are commands meant for the machine as it will be (its image, env,
    /// secrets), and cannot be undone.
    BesideBlockedReplace(Option<usize>),
}

const SETUP_WAITS_FOR_REPLACE: &str = "setup commands run on the machine as declared; they wait for the replacement (--allow-replace)";

fn describe_owner(machine: &MachineInfo) -> String {
    match (
        machine.labels.get(LABEL_MANAGED_BY),
        machine.labels.get(LABEL_PROJECT),
    ) {
        (Some(m), Some(p)) if m == MANAGED_BY => format!("of bottle project `{p}`"),
        _ => "that bottle does not manage".to_owned(),
    }
}

/// Which create-time fields differ, by the machine's spec labels.
fn spec_fields_changed(agent: &DesiredAgent, machine: &MachineInfo) -> Vec<String> {
    let want = &agent.machine_hashes;
    if machine.labels.get(LABEL_SPEC_HASH) == Some(&want.spec_hash) {
        return Vec::new();
    }
    let mut fields: Vec<String> = want
        .fields
        .iter()
        .filter(|(field, hash)| {
            machine.labels.get(&format!("{LABEL_SPEC_FIELD}{field}")) != Some(*hash)
        })
        .map(|(field, _)| (*field).to_owned())
        .collect();
    if fields.is_empty() {
        fields.push("spec-hash".to_owned());
    }
    fields
}

/// Every step of a machine that is new or replaced.
fn plan_all_steps(b: &mut Builder, agent: &DesiredAgent, gate: usize, cause: &str) {
    let mut ids: BTreeMap<StepKind, usize> = BTreeMap::new();
    ids.insert(StepKind::Machine, gate);
    for step in agent.steps.iter().filter(|s| s.kind != StepKind::Machine) {
        let after = deps(step, &ids, Some(gate));
        let id = b.push(agent, apply_op(step, None), cause, after);
        ids.insert(step.kind.clone(), id);
    }
}

fn apply_op(step: &DesiredStep, previous: Option<&LedgerEntry>) -> Op {
    Op::Apply {
        step: step.kind.id(),
        hash: step.hash.clone(),
        previous: previous.cloned(),
    }
}

fn deps(step: &DesiredStep, ids: &BTreeMap<StepKind, usize>, gate: Option<usize>) -> Vec<usize> {
    let mut after: Vec<usize> = step
        .after
        .iter()
        .filter_map(|k| ids.get(k).copied())
        .collect();
    if let Some(g) = gate.filter(|g| !after.contains(g)) {
        after.push(g);
    }
    after.sort_unstable();
    after
}

/// Steps of a running, probed machine: apply what is missing, changed in the
/// manifest or drifted in the guest; undo what left the manifest.
fn plan_steps(
    b: &mut Builder,
    desired: &Desired,
    agent: &DesiredAgent,
    probe: &Probe,
    sent: Option<&crate::sent::AgentTexts>,
    which: Steps,
) {
    let ctx = desired.ctx(agent);
    let gate = match which {
        Steps::After(g) => Some(g),
        Steps::BesideBlockedReplace(g) => g,
        Steps::All => None,
    };
    let mut ids: BTreeMap<StepKind, usize> = BTreeMap::new();
    let user = probe
        .sections
        .get(&StepKind::Machine.id())
        .and_then(|s| steps::machine::user_from_probe(s));
    if let Some(g) = gate {
        ids.insert(StepKind::Machine, g);
    }
    for step in &agent.steps {
        if !matches!(which, Steps::All) && step.kind == StepKind::Machine {
            continue;
        }
        let id = step.kind.id();
        let recorded = probe.ledger.get(&id);
        let cause = match recorded {
            None => Some("not applied yet".to_owned()),
            Some(entry) if entry.detail_str("user").is_some_and(|u| u != ctx.user()) => {
                Some(format!(
                    "agent user changed: {} → {}",
                    entry.detail_str("user").unwrap_or_default(),
                    ctx.user()
                ))
            }
            Some(entry) if entry.hash != step.hash => {
                // A setup step's hash chains those of the steps it comes
                // after: name the one that runs again, if that is why.
                let rerun = match step.kind {
                    StepKind::Setup(_) => step
                        .after
                        .iter()
                        .find(|k| **k != StepKind::Machine && ids.contains_key(k)),
                    _ => None,
                };
                Some(match (&step.kind, rerun) {
                    (StepKind::Machine, _) => "machine settings changed in manifest".to_owned(),
                    (kind, Some(before)) => format!(
                        "{} runs after {}, which runs again",
                        describe(kind),
                        before.id()
                    ),
                    (kind, None) => format!("{} changed in manifest", describe(kind)),
                })
            }
            // The ledger's digest, and (for what the host knows) the
            // digest of what the guest should show: root in the guest can
            // edit the ledger.
            Some(entry) => match probe.digest(&id) {
                Some(observed)
                    if observed != entry.digest
                        || steps::expected_digest(&step.kind, &ctx, user)
                            .is_some_and(|want| want != observed) =>
                {
                    Some(format!(
                        "{} changed in guest: {}",
                        describe(&step.kind),
                        steps::drift_cause(
                            &step.kind,
                            &ctx,
                            probe.sections.get(&id).map(String::as_str)
                        )
                    ))
                }
                _ => None,
            },
        };
        if let Some(cause) = cause {
            let after = deps(step, &ids, gate);
            let action = b.push(agent, apply_op(step, recorded), cause, after);
            if let Some(entry) = recorded.filter(|e| e.hash != step.hash) {
                b.plan.actions[action].diff = text_diff(desired, agent, sent, step, &entry.hash);
            }
            if matches!(which, Steps::BesideBlockedReplace(_))
                && matches!(step.kind, StepKind::Setup(_))
            {
                b.plan.actions[action].blocked = Some(SETUP_WAITS_FOR_REPLACE.to_owned());
            }
            ids.insert(step.kind.clone(), action);
        }
    }
    for (id, entry) in &probe.ledger {
        let known = id
            .parse::<StepKind>()
            .ok()
            .is_some_and(|k| agent.step(&k).is_some());
        if !known {
            let cause = match id.parse::<StepKind>().ok() {
                Some(StepKind::Setup(name)) => format!(
                    "setup step `{name}` removed from manifest (its effects stay; bottle cannot undo a command)"
                ),
                Some(kind) => format!("{} removed from manifest", describe(&kind)),
                None => format!("unknown step `{id}` in the guest ledger"),
            };
            b.push(
                agent,
                Op::Undo {
                    step: id.clone(),
                    entry: entry.clone(),
                },
                cause,
                gate.into_iter().collect(),
            );
        }
    }
}

/// What changed in a prompt or a setup step's inputs since apply sent
/// them: the diff of bottle's copy of what it sent under the hash the
/// guest records (`recorded`) against the manifests' texts now. Nothing
/// when the copy is of another hash (made stale by another state directory
/// or by `watch`): a wrong diff is worse than none.
fn text_diff(
    desired: &Desired,
    agent: &DesiredAgent,
    sent: Option<&crate::sent::AgentTexts>,
    step: &DesiredStep,
    recorded: &str,
) -> Vec<String> {
    let id = step.kind.id();
    let old = sent
        .and_then(|s| s.steps.get(&id))
        .filter(|t| t.hash == recorded);
    let new = desired
        .texts
        .get(&agent.name)
        .and_then(|t| t.steps.get(&id))
        .filter(|t| t.hash == step.hash);
    match (old, new) {
        (Some(old), Some(new)) => crate::sent::diff(old, new),
        _ => Vec::new(),
    }
}

fn describe(kind: &StepKind) -> String {
    steps::step(kind).noun()
}

/// Managed machines of this project that no agent declares.
fn plan_prune(b: &mut Builder, desired: &Desired, snapshot: &Snapshot, options: &PlanOptions) {
    let mut machines: Vec<_> = snapshot.machines.iter().collect();
    machines.sort_by(|a, b| natural_cmp(&a.name, &b.name));
    for machine in machines {
        if !is_ours(machine, &desired.project.name) || desired.by_machine(&machine.name).is_some() {
            continue;
        }
        let agent = machine.labels.get(LABEL_AGENT).cloned().unwrap_or_default();
        // A replacement's trial machine, left by an interrupted run: never
        // started, it holds nothing, so it goes without --prune.
        let scratch = machine_step::is_scratch(&machine.name);
        let id = b.plan.actions.len();
        b.plan.actions.push(Action {
            id,
            machine: machine.name.clone(),
            agent: None,
            op: Op::Delete,
            cause: if scratch {
                format!("left by an interrupted replacement of agent `{agent}`'s machine")
            } else {
                format!("agent `{agent}` is no longer declared")
            },
            diff: Vec::new(),
            after: vec![],
            blocked: (!options.prune && !scratch)
                .then(|| "deleting destroys the machine's disk; pass --prune".to_owned()),
        });
    }
}
