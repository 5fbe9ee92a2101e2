//! `bottle plan`: show what `apply` would do.

use clap::Args;
use serde::Serialize;

use super::{DirArg, GlobalArgs, Outcome, session};
use crate::gate::supervise::grants::UndeclaredGrant;
use crate::plan::PlanOptions;

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub dir: DirArg,

    /// Print the plan as JSON (with `format_version`).
    #[arg(long)]
    pub json: bool,

    /// Exit 3 when the plan has changes, 0 when it has none (1 is an error).
    #[arg(long)]
    pub detailed_exitcode: bool,

    #[command(flatten)]
    pub select: SelectArgs,
}

/// Flags that shape a plan, shared by `plan` and `apply`.
#[derive(Debug, Args, Clone, Default)]
pub struct SelectArgs {
    /// Only this agent (repeatable). Nothing is pruned with a target.
    #[arg(long = "target", value_name = "AGENT")]
    pub targets: Vec<String>,

    #[command(flatten)]
    pub change: ChangeArgs,
}

/// What a reconcile may destroy, and how many calls it runs at once:
/// shared by `plan`, `apply` and `watch`.
#[derive(Debug, Args, Clone, Default)]
pub struct ChangeArgs {
    /// Replace machines whose create-time settings (image, egress, secrets)
    /// changed; replacement destroys the machine's disk. Without it those
    /// replacements are blocked (`plan` and `apply` show them; `watch`
    /// reports each once).
    #[arg(long)]
    pub allow_replace: bool,

    /// Delete managed machines of this project that no agent declares any
    /// more. Without it those deletions are blocked (`plan` and `apply` show
    /// them; `watch` reports each once).
    #[arg(long)]
    pub prune: bool,

    /// How many runtime calls run at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub parallelism: u16,
}

impl SelectArgs {
    pub fn options(&self) -> PlanOptions {
        PlanOptions {
            allow_replace: self.change.allow_replace,
            prune: self.change.prune,
            targets: (!self.targets.is_empty()).then(|| self.targets.clone()),
            include_undeclared: false,
        }
    }
}

/// `plan --json`: the plan, and the supervise grants in force that the
/// manifests do not declare (the same `grants` as `status` and `check`).
#[derive(Serialize)]
struct PlanJson<'a> {
    #[serde(flatten)]
    plan: &'a crate::plan::Plan,
    grants: Vec<UndeclaredGrant>,
}

pub fn run(global: &GlobalArgs, args: PlanArgs) -> miette::Result<Outcome> {
    let survey = session::json_error(
        args.json,
        session::load(&args.dir.dir).and_then(|desired| {
            session::survey(
                global,
                desired,
                &args.select.options(),
                args.select.change.parallelism.into(),
            )
        }),
    )?;
    // Not actions: `apply` neither adds nor removes a grant.
    let grants =
        super::supervise::undeclared(global, &survey.desired, survey.plan.targets.as_deref())?;
    if args.json {
        let json = PlanJson {
            plan: &survey.plan,
            grants,
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&json).expect("plans serialize")
        );
    } else {
        print!("{}", survey.plan.render());
        super::supervise::print_undeclared(&grants);
    }
    session::observation_errors(&survey.plan)?;
    if args.detailed_exitcode && !survey.plan.is_empty() {
        return Ok(Outcome::Drift);
    }
    Ok(Outcome::Success)
}
