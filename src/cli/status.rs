//! `bottle status`: each agent's machine, its state, and each step's state.

use clap::Args;
use serde::Serialize;

use super::{DirArg, GlobalArgs, Outcome, session};
use crate::plan::{Op, PlanOptions};
use crate::runtime::MachineState;

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub dir: DirArg,

    /// Print as JSON (with `format_version`).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Status {
    format_version: u32,
    project: String,
    agents: Vec<AgentStatus>,
    /// Managed machines of this project no agent declares.
    undeclared: Vec<String>,
    /// The project's gate, when it has or had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    gate: Option<crate::gate::reconcile::GateStatus>,
    /// Supervise grants in force that the manifests do not declare.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    grants: Vec<crate::gate::supervise::grants::UndeclaredGrant>,
}

#[derive(Debug, Serialize)]
struct AgentStatus {
    agent: String,
    machine: String,
    /// `absent`, or the runtime's state.
    state: String,
    steps: Vec<StepStatus>,
    /// Unix seconds of the latest recorded step.
    last_applied: Option<u64>,
}

#[derive(Debug, Serialize)]
struct StepStatus {
    step: String,
    /// `ok`, `pending` or `unknown` (machine not running).
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    cause: Option<String>,
}

pub fn run(global: &GlobalArgs, args: StatusArgs) -> miette::Result<Outcome> {
    let survey = session::json_error(
        args.json,
        session::load(&args.dir.dir)
            .and_then(|desired| session::survey(global, desired, &PlanOptions::default(), 8)),
    )?;
    let mut status = Status {
        format_version: crate::plan::PLAN_FORMAT,
        project: survey.desired.project.name.clone(),
        agents: Vec::new(),
        undeclared: Vec::new(),
        gate: crate::gate::reconcile::GateStatus::of(
            survey.desired.gate.as_ref(),
            survey.snapshot.gate.as_ref(),
        ),
        grants: Vec::new(),
    };
    for agent in survey.desired.agents.values() {
        let machine = survey.snapshot.machine(&agent.machine);
        let probe = survey.snapshot.probes.get(&agent.machine);
        let error = survey.plan.errors.iter().find(|e| e.agent == agent.name);
        // Steps of a machine that could not be probed are unknown, not ok.
        let running = machine.is_some_and(|m| m.state == MachineState::Running) && error.is_none();
        let mut steps: Vec<StepStatus> = agent
            .steps
            .iter()
            .map(|s| {
                let id = s.kind.id();
                let action = survey
                    .plan
                    .actions
                    .iter()
                    .find(|a| a.agent.as_deref() == Some(&agent.name) && a.op.step() == id);
                let lifecycle = survey
                    .plan
                    .actions
                    .iter()
                    .find(|a| a.agent.as_deref() == Some(&agent.name) && a.op.is_lifecycle());
                match (action, running) {
                    (Some(a), _) => StepStatus {
                        step: id,
                        state: "pending",
                        cause: Some(a.cause.clone()),
                    },
                    (None, true) => StepStatus {
                        step: id,
                        state: "ok",
                        cause: None,
                    },
                    (None, false) => StepStatus {
                        step: id,
                        state: "unknown",
                        cause: lifecycle
                            .map(|a| a.cause.clone())
                            .or_else(|| error.map(|e| e.message.clone())),
                    },
                }
            })
            .collect();
        // Steps that left the manifest but are still in the guest: their
        // undo is pending too (`check` reports them as drift).
        steps.extend(
            survey
                .plan
                .actions
                .iter()
                .filter(|a| {
                    a.agent.as_deref() == Some(&agent.name) && matches!(a.op, Op::Undo { .. })
                })
                .map(|a| StepStatus {
                    step: a.op.step().to_owned(),
                    state: "pending",
                    cause: Some(a.cause.clone()),
                }),
        );
        status.agents.push(AgentStatus {
            agent: agent.name.clone(),
            machine: agent.machine.clone(),
            state: machine.map_or("absent".to_owned(), |m| m.state.to_string()),
            steps,
            last_applied: probe.and_then(|p| p.ledger.values().map(|e| e.applied_at).max()),
        });
    }
    status.grants = super::supervise::undeclared(global, &survey.desired, None)?;
    status.undeclared = survey
        .plan
        .actions
        .iter()
        .filter(|a| a.agent.is_none() && !matches!(a.op, Op::Gate { .. }))
        .map(|a| a.machine.clone())
        .collect();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).expect("status serializes")
        );
        session::observation_errors(&survey.plan)?;
        return Ok(Outcome::Success);
    }
    println!("project {}", status.project);
    let mut rows =
        vec![["AGENT", "MACHINE", "STATE", "LAST APPLIED (UTC)", "STEPS"].map(str::to_owned)];
    for a in &status.agents {
        let steps: Vec<String> = a
            .steps
            .iter()
            .map(|s| match s.state {
                "ok" => s.step.clone(),
                other => format!("{}({other})", s.step),
            })
            .collect();
        let last = a
            .last_applied
            .map_or("-".to_owned(), crate::time::format_unix);
        rows.push([
            a.agent.clone(),
            a.machine.clone(),
            a.state.clone(),
            last,
            steps.join(" "),
        ]);
    }
    print!("{}", table(&rows));
    if let Some(gate) = &status.gate {
        println!("{gate}");
    }
    for m in &status.undeclared {
        println!(
            "{m}: managed by this project but no agent declares it (`bottle apply --prune` deletes it)"
        );
    }
    super::supervise::print_undeclared(&status.grants);
    for e in &survey.plan.errors {
        println!("{e}");
    }
    session::observation_errors(&survey.plan)?;
    Ok(Outcome::Success)
}

/// Rows as aligned columns, each as wide as its widest cell (names go up
/// to 48 characters, machine names past 100), three spaces apart like
/// `kubectl get`; the last column is not padded.
pub(super) fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0; N];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 < N {
                line.push_str(&format!("{cell:<width$}   ", width = widths[i]));
            } else {
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::table;

    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let rows = [
            ["A", "MACHINE", "STEPS"].map(str::to_owned),
            ["a-long-name", "m", "x y"].map(str::to_owned),
            ["b", "", ""].map(str::to_owned),
        ];
        assert_eq!(
            table(&rows),
            "A             MACHINE   STEPS\n\
             a-long-name   m         x y\n\
             b\n"
        );
    }
}
