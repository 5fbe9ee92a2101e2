//! `bottle validate`: load the manifests and build the provisioning graph
//! (which finds dependency cycles), report every problem, or a one-line
//! summary.

use clap::Args;

use super::{DirArg, GlobalArgs, Outcome};
use crate::manifest::{self, ProjectNameSource, diagnostic::plural};

#[derive(Debug, Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub dir: DirArg,
}

pub fn run(_global: &GlobalArgs, args: ValidateArgs) -> miette::Result<Outcome> {
    let project = manifest::load_dir(&args.dir.dir)?;
    let graph = crate::graph::build(&project)?;
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
        plural(graph.len(), "provisioning step"),
        project.name,
    );
    for advice in crate::gate::reconcile::advisories(&project) {
        println!("{advice}");
    }
    Ok(Outcome::Success)
}
