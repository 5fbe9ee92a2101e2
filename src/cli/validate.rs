//! `bottle validate`: load the manifests, build the provisioning graph
//! (which finds dependency cycles) and check what the chosen runtime
//! (`--runtime`) cannot do, exactly as `plan` would refuse it; report every
//! problem, or a one-line summary.

use clap::Args;

use super::{DirArg, GlobalArgs, Outcome, session};
use crate::desired::Desired;
use crate::manifest::names::sorted_naturally;
use crate::manifest::{self, ProjectNameSource, diagnostic::plural};

#[derive(Debug, Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub dir: DirArg,

    /// Print the result as JSON (with `format_version`): the summary, or
    /// `{"error": {...}}` with every problem and where it is.
    #[arg(long)]
    pub json: bool,
}

pub fn run(global: &GlobalArgs, args: ValidateArgs) -> miette::Result<Outcome> {
    let runtime = session::runtime_kind(global);
    let loaded = (|| -> miette::Result<_> {
        let project = manifest::load_dir(&args.dir.dir)?;
        let graph = crate::graph::build(&project)?;
        let steps = graph.len();
        let desired = Desired::new(project, &graph);
        // What `plan` refuses for this runtime; this host's secrets are
        // `plan`'s business (they may be provided later).
        let notes = crate::preflight::runtime_check(&desired, runtime)?;
        Ok((desired, steps, notes))
    })();
    let (desired, steps, notes) = session::json_error(args.json, loaded)?;
    let project = &desired.project;
    // The gate's warnings and notes about secrets (never errors).
    let advisories = crate::gate::reconcile::advisories(project);
    if args.json {
        let value = serde_json::json!({
            "format_version": crate::plan::PLAN_FORMAT,
            "valid": true,
            "dir": args.dir.dir.display().to_string(),
            "project": project.name,
            "project_name_declared": project.name_source == ProjectNameSource::Declared,
            "runtime": runtime,
            "agents": sorted_naturally(project.agents.keys().map(String::as_str)),
            "bottles": sorted_naturally(project.bottles.keys().map(String::as_str)),
            "steps": steps,
            "notes": notes,
            "advisories": advisories,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&value).expect("JSON serializes")
        );
        return Ok(Outcome::Success);
    }
    let origin = match project.name_source {
        ProjectNameSource::Declared => "",
        ProjectNameSource::DirectoryName => {
            " (named after the directory holding the manifests directory; \
             set [project] name in its bottle.toml to pin it)"
        }
    };
    println!(
        "{}: {}, {} valid ({}); project {}{origin}",
        args.dir.dir.display(),
        plural(project.agents.len(), "agent"),
        plural(project.bottles.len(), "bottle"),
        plural(steps, "provisioning step"),
        project.name,
    );
    for note in &notes {
        println!("note: {note}");
    }
    for advice in &advisories {
        println!("{advice}");
    }
    Ok(Outcome::Success)
}
