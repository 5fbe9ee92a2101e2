//! `bottle apply`: make the machines match the manifests.

use std::time::Duration;

use clap::Args;

use super::plan::SelectArgs;
use super::{DirArg, GlobalArgs, Outcome, session};
use crate::apply::{self, Outcome as ActionOutcome, Report};
use crate::lock::ProjectLock;

#[derive(Debug, Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub dir: DirArg,

    /// Observe and print the plan, change nothing.
    #[arg(long)]
    pub dry_run: bool,

    #[command(flatten)]
    pub select: SelectArgs,

    /// How long to wait for another apply of this project to finish.
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    pub lock_wait: u64,
}

pub fn run(global: &GlobalArgs, args: ApplyArgs) -> miette::Result<Outcome> {
    let options = args.select.options();
    let parallelism = usize::from(args.select.change.parallelism);
    // The lock is taken before observing, so the plan cannot be stale.
    let desired = session::load(&args.dir.dir)?;
    let _lock = if args.dry_run {
        None
    } else {
        Some(ProjectLock::acquire(
            &session::lock_dir(global)?,
            &desired.project.name,
            "apply",
            Duration::from_secs(args.lock_wait),
        )?)
    };
    let survey = session::survey(global, desired, &options, parallelism)?;
    print!("{}", survey.plan.render());
    if args.dry_run || survey.plan.is_empty() {
        session::observation_errors(&survey.plan)?;
        return Ok(Outcome::Success);
    }
    eprintln!();
    let progress = std::sync::Arc::new(session::Lines::new());
    let running = progress.clone();
    session::on_interrupt("interrupted: finishing the actions under way", move || {
        for what in running.running() {
            eprintln!("         waiting for {what}");
        }
    })?;
    let report = apply::execute(
        &survey.desired,
        &survey.snapshot,
        &survey.plan,
        survey.runtime.as_ref(),
        parallelism,
        progress.as_ref(),
    );
    // What was sent, for the next plan's diffs.
    crate::sent::Store::new(&session::state_dir(global)?, &survey.desired.project.name)
        .record(&survey.desired, &report);
    print!("\n{}", render_summary(&report));
    if apply::cancelled() {
        return Err(Interrupted {
            ended: apply::aborted(),
        }
        .into());
    }
    session::observation_errors(&survey.plan)?;
    Ok(outcome(&report)?)
}

/// Exit 1 if anything failed, 3 if something was blocked, else 0.
fn outcome(report: &Report) -> Result<Outcome, ApplyFailed> {
    if report.failed() > 0 {
        return Err(ApplyFailed {
            failed: report.failed(),
        });
    }
    Ok(if report.blocked() > 0 {
        Outcome::Drift
    } else {
        Outcome::Success
    })
}

#[derive(Debug, thiserror::Error, miette::Diagnostic)]
#[error(
    "interrupted: {}",
    if *ended {
        "the actions under way were cancelled, the rest did not start"
    } else {
        "the actions under way finished, the rest did not start"
    }
)]
#[diagnostic(
    code(bottle::interrupted),
    help("run `bottle apply` again to finish; what completed is kept")
)]
pub struct Interrupted {
    /// A second Ctrl-C ended the runtime calls under way.
    pub ended: bool,
}

#[derive(Debug, thiserror::Error, miette::Diagnostic)]
#[error("{failed} action(s) failed")]
#[diagnostic(
    code("bottle::apply-failed"),
    help("fix the errors listed above and run `bottle apply` again; completed work is kept")
)]
pub struct ApplyFailed {
    pub failed: usize,
}

/// What changed, failed, was skipped or blocked, with durations.
pub fn render_summary(report: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    type Select = fn(&ActionOutcome) -> bool;
    let sections: [(&str, Select); 4] = [
        ("Changed", |o| matches!(o, ActionOutcome::Done { .. })),
        ("Failed", |o| matches!(o, ActionOutcome::Failed { .. })),
        ("Skipped", |o| matches!(o, ActionOutcome::Skipped { .. })),
        ("Blocked", |o| matches!(o, ActionOutcome::Blocked { .. })),
    ];
    for (title, select) in sections {
        let rows: Vec<_> = report
            .actions
            .iter()
            .filter(|a| select(&a.outcome))
            .collect();
        if rows.is_empty() {
            continue;
        }
        writeln!(out, "{title}:").ok();
        for r in rows {
            let a = &r.action;
            let who = a.agent.as_deref().unwrap_or(&a.machine);
            let detail = match &r.outcome {
                ActionOutcome::Done { seconds } => format!("{seconds:.2}s"),
                ActionOutcome::Failed { seconds, error } => format!("{seconds:.2}s: {error}"),
                ActionOutcome::Skipped { reason } | ActionOutcome::Blocked { reason } => {
                    reason.clone()
                }
            };
            writeln!(out, "  {who}: {} {} ({detail})", a.op.verb(), a.op.step()).ok();
        }
    }
    writeln!(
        out,
        "Apply: {} done, {} failed, {} skipped, {} blocked in {:.1}s.",
        report.done(),
        report.failed(),
        report
            .actions
            .iter()
            .filter(|a| matches!(a.outcome, ActionOutcome::Skipped { .. }))
            .count(),
        report.blocked(),
        report.seconds
    )
    .ok();
    out
}
