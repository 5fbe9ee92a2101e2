//! `bottle validate`: load the manifests, build the provisioning graph
//! (which finds dependency cycles) and check what the chosen runtime
//! (`--runtime`) cannot do, exactly as `plan` would refuse it; report every
//! problem, or a one-line summary.

use clap::Args;

use std::path::Path;

use super::{DirArg, GlobalArgs, Outcome, session};
use crate::manifest::names::sorted_naturally;
use crate::manifest::{self, Diagnostics, Project, ProjectNameSource, diagnostic::plural};
use crate::runtime::RuntimeKind;

#[derive(Debug, Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub dir: DirArg,

    /// Print the result as JSON (with `format_version`): the summary, or
    /// `{"error": {...}}` with every problem and where it is.
    #[arg(long)]
    pub json: bool,
}

/// Every problem `plan` would refuse for `runtime`, in one report: the
/// manifests' own, then the provisioning graph's (what is copied into a
/// guest cannot be read) and the runtime's. The last two need one bottle or
/// agent at a time, so they run on every bottle and agent that loaded
/// cleanly even when others did not; what depends on a broken one is not
/// checked until it is fixed. Valid: the project, its number of
/// provisioning steps and the runtime's notes (this host's secrets are
/// `plan`'s business: they may be provided later).
fn check(dir: &Path, runtime: RuntimeKind) -> Result<(Project, usize, Vec<String>), Diagnostics> {
    let (problems, project) = match manifest::load_dir_partial(dir) {
        Ok(project) => (None, project),
        Err((problems, Some(clean))) => (Some(problems), *clean),
        Err((problems, None)) => return Err(problems),
    };
    let (notes, refused) = crate::preflight::runtime_problems(&project, runtime);
    let (steps, mut later) = match crate::graph::build(&project) {
        Ok(graph) => (graph.len(), Vec::new()),
        Err(unbuilt) => (0, unbuilt.items),
    };
    later.extend(refused);
    match problems {
        None if later.is_empty() => Ok((project, steps, notes)),
        None => Err(Diagnostics {
            dir: dir.display().to_string(),
            items: later,
        }),
        Some(mut problems) => {
            problems.items.extend(later);
            Err(problems)
        }
    }
}

pub fn run(global: &GlobalArgs, args: ValidateArgs) -> miette::Result<Outcome> {
    let runtime = session::runtime_kind(global);
    let checked = check(&args.dir.dir, runtime).map_err(miette::Report::new);
    let (project, steps, notes) = session::json_error(args.json, checked)?;
    let project = &project;
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
