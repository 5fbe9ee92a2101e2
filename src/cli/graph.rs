//! `bottle graph`: print the provisioning graph as DOT or text.

use clap::{Args, ValueEnum};

use super::{DirArg, GlobalArgs, Outcome};

#[derive(Debug, Args)]
pub struct GraphArgs {
    #[command(flatten)]
    pub dir: DirArg,

    /// Output format: `dot` for Graphviz (`bottle graph | dot -Tsvg`), `text`
    /// for a readable list of steps, their short hashes and dependencies.
    #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
    pub format: GraphFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GraphFormat {
    Dot,
    Text,
}

pub fn run(_global: &GlobalArgs, args: GraphArgs) -> miette::Result<Outcome> {
    let project = crate::manifest::load_dir(&args.dir.dir)?;
    let graph = crate::graph::build(&project).map_err(|mut diagnostics| {
        // Name the directory as the user did, like the loader's diagnostics.
        diagnostics.dir = args.dir.dir.display().to_string();
        diagnostics
    })?;
    let out = match args.format {
        GraphFormat::Dot => graph.to_dot(),
        GraphFormat::Text => graph.to_text(),
    };
    print!("{out}");
    Ok(Outcome::Success)
}
