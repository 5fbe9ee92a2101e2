//! `bottle check`: the drift check for CI. Exit 0 in sync, 3 drift.

use clap::Args;
use serde::Serialize;

use super::{DirArg, GlobalArgs, Outcome, session};
use crate::plan::{Plan, PlanOptions};

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub dir: DirArg,

    /// Print the report as JSON (with `format_version`).
    #[arg(long)]
    pub json: bool,

    /// Only this agent (repeatable).
    #[arg(long = "target", value_name = "AGENT")]
    pub targets: Vec<String>,

    /// How many probes run at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub parallelism: u16,
}

#[derive(Debug, Serialize)]
struct DriftReport<'a> {
    format_version: u32,
    project: &'a str,
    in_sync: bool,
    /// The agents checked, when `--target` limited the check.
    #[serde(skip_serializing_if = "Option::is_none")]
    targets: Option<&'a [String]>,
    drift: Vec<Drift<'a>>,
    /// Supervise grants in force that the manifests do not declare (the
    /// same `grants` as `plan --json` and `status --json`).
    grants: Vec<crate::gate::supervise::grants::UndeclaredGrant>,
    /// Agents that could not be observed (the command exits 1).
    errors: &'a [crate::plan::PlanError],
    notes: &'a [String],
}

#[derive(Debug, Serialize)]
struct Drift<'a> {
    agent: Option<&'a str>,
    machine: &'a str,
    step: &'a str,
    action: &'a str,
    cause: &'a str,
    /// What changed in a prompt or setup input (see `plan`).
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    diff: &'a [String],
    /// Why `bottle apply` will not do it without a flag.
    #[serde(skip_serializing_if = "Option::is_none")]
    blocked: Option<&'a str>,
}

fn print_notes(report: &DriftReport) {
    for e in report.errors {
        println!("{e}");
    }
    for note in report.notes {
        println!("note: {note}");
    }
}

fn report(plan: &Plan) -> DriftReport<'_> {
    DriftReport {
        format_version: crate::plan::PLAN_FORMAT,
        project: &plan.project,
        in_sync: plan.is_empty() && plan.errors.is_empty(),
        targets: plan.targets.as_deref(),
        grants: Vec::new(),
        errors: &plan.errors,
        notes: &plan.notes,
        drift: plan
            .actions
            .iter()
            .map(|a| Drift {
                agent: a.agent.as_deref(),
                machine: &a.machine,
                step: a.op.step(),
                action: a.op.verb(),
                cause: &a.cause,
                diff: &a.diff,
                blocked: a.blocked.as_deref(),
            })
            .collect(),
    }
}

/// The flags `apply` needs for the blocked actions: ` --allow-replace`,
/// ` --prune`, both or none.
fn flags_needed(plan: &Plan) -> String {
    let mut flags = String::new();
    for (op, flag) in [
        (crate::plan::Op::Replace, " --allow-replace"),
        (crate::plan::Op::Delete, " --prune"),
    ] {
        // The planner blocks a replacement or a deletion for its flag only.
        if plan.blocked().any(|a| a.op == op) {
            flags.push_str(flag);
        }
    }
    flags
}

pub fn run(global: &GlobalArgs, args: CheckArgs) -> miette::Result<Outcome> {
    let options = PlanOptions {
        targets: (!args.targets.is_empty()).then(|| args.targets.clone()),
        ..PlanOptions::default()
    };
    let survey = session::json_error(
        args.json,
        session::load(&args.dir.dir).and_then(|desired| {
            session::survey(global, desired, &options, args.parallelism.into())
        }),
    )?;
    let mut report = report(&survey.plan);
    // A grant in force beyond the manifests: the world is wider than declared.
    report.grants =
        super::supervise::undeclared(global, &survey.desired, survey.plan.targets.as_deref())?;
    report.in_sync &= report.grants.is_empty();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("reports serialize")
        );
    } else if report.in_sync {
        print_notes(&report);
        match report.targets {
            Some(targets) => println!(
                "In sync: {} (the agents checked; --target left out the rest).",
                crate::plan::agents_match(targets)
            ),
            None => println!(
                "In sync: {} agent(s) match their manifests.",
                survey.desired.agents.len()
            ),
        }
    } else {
        if !report.drift.is_empty() {
            println!("Drift in project {}:", report.project);
        }
        for d in &report.drift {
            let who = d.agent.unwrap_or(d.machine);
            print!("  {who}: {} ({} needed): {}", d.step, d.action, d.cause);
            match d.blocked {
                Some(blocked) => println!("  [blocked: {blocked}]"),
                None => println!(),
            }
            for line in d.diff {
                println!("      | {line}");
            }
        }
        if !report.drift.is_empty() {
            println!(
                "{} difference(s); run `bottle apply{}` to converge.",
                report.drift.len(),
                flags_needed(&survey.plan)
            );
        }
        super::supervise::print_undeclared(&report.grants);
        print_notes(&report);
    }
    session::observation_errors(&survey.plan)?;
    Ok(if report.in_sync {
        Outcome::Success
    } else {
        Outcome::Drift
    })
}
