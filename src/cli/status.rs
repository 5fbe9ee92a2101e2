//! `bottle status`: each agent's machine, its state, and each step's state.

use clap::Args;
use serde::Serialize;

use super::{DirArg, GlobalArgs, Outcome, session};
use crate::gate::supervise::grants::UndeclaredGrant;
use crate::manifest::names::sorted_naturally;
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
    /// Supervise grants in force that the manifests do not declare, of
    /// every agent (the same `grants` as `plan --json` and `check --json`;
    /// an agent the manifests no longer declare has its grants only here).
    grants: Vec<UndeclaredGrant>,
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
    /// Egress the gate denied this agent, from the end of its log (absent
    /// when the project has no gate log or this agent no denial there).
    #[serde(skip_serializing_if = "Option::is_none")]
    denials: Option<super::egress_log::AgentDenials>,
    /// This agent's entries of the top-level `grants`.
    grants: Vec<UndeclaredGrant>,
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
        grants: super::supervise::undeclared(global, &survey.desired, None)?,
    };
    let mut denials = match &status.gate {
        Some(_) => recent_denials(global, &status.project),
        None => Default::default(),
    };
    for name in sorted_naturally(survey.desired.agents.keys().map(String::as_str)) {
        let agent = &survey.desired.agents[name];
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
            denials: denials.remove(&agent.name),
            grants: (status.grants.iter())
                .filter(|g| g.agent == agent.name)
                .cloned()
                .collect(),
        });
    }
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
    let now = now_secs();
    for a in &status.agents {
        let Some(d) = &a.denials else { continue };
        let latest: Vec<String> = d
            .latest
            .iter()
            .map(|x| {
                // The host is what the agent asked for: no control
                // characters of its choosing reach the terminal.
                let host: String = x
                    .host
                    .chars()
                    .map(|c| if c.is_control() { '?' } else { c })
                    .collect();
                format!("{host}:{} ({})", x.port, age(now - x.ts))
            })
            .collect();
        println!(
            "{}: {} egress denial{} in the last hour; latest: {}",
            a.agent,
            d.last_hour,
            if d.last_hour == 1 { "" } else { "s" },
            latest.join(", ")
        );
        println!("  (`bottle egress-log --agent {}` shows them all)", a.agent);
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

/// Denied egress by agent, from the last [`super::egress_log::TAIL_BYTES`]
/// of the project's gate log; none when there is no log (or it cannot be
/// read: status reports the gate's state, not its log's).
fn recent_denials(
    global: &GlobalArgs,
    project: &str,
) -> std::collections::BTreeMap<String, super::egress_log::AgentDenials> {
    let Ok(state) = session::state_dir(global) else {
        return Default::default();
    };
    let path = crate::gate::paths::GatePaths::new(&state, project).log();
    match super::egress_log::read_tail(&path, super::egress_log::TAIL_BYTES) {
        Ok(lines) => super::egress_log::denials_by_agent(&lines, now_secs()),
        Err(_) => Default::default(),
    }
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `42s ago`, `5m ago`, `3h ago`, `2d ago`.
fn age(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
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
    use super::{age, table};

    #[test]
    fn ages_read_in_their_largest_unit() {
        assert_eq!(age(-3.0), "0s ago");
        assert_eq!(age(59.9), "59s ago");
        assert_eq!(age(60.0), "1m ago");
        assert_eq!(age(7300.0), "2h ago");
        assert_eq!(age(90000.0), "1d ago");
    }

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
