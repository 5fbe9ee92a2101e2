//! `bottle gate run [DIR]`: the project's gate in the foreground (for a
//! service manager; `apply` starts the same process detached).

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{GlobalArgs, Outcome, session};
use crate::gate::server::{self, Initial};

#[derive(Debug, Args)]
pub struct GateArgs {
    #[command(subcommand)]
    pub command: GateCommand,
}

#[derive(Debug, Subcommand)]
pub enum GateCommand {
    /// Run the project's gate in the foreground until SIGTERM, SIGINT or a
    /// `stop` on its control socket. It serves the config in its state
    /// directory (`config.json`, written by the gate on every config it
    /// accepts), with each secret's value read from this process's
    /// environment (the variable its `value_key` names), and takes new
    /// configs from `bottle apply` without a restart.
    Run(RunArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Directory of manifests (names the project) [default: manifests].
    #[arg(value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// Read the first config and its secret values from stdin, as one
    /// control `reload` line (how `apply` starts the gate); DIR is not read.
    #[arg(long, hide = true)]
    pub config_from_stdin: bool,
}

pub fn run(global: &GlobalArgs, args: GateArgs) -> miette::Result<Outcome> {
    let GateCommand::Run(args) = args.command;
    let state = session::state_dir(global)?;
    if args.config_from_stdin {
        server::run(&state, None, Initial::Stdin)?;
    } else {
        let dir = args.dir.unwrap_or_else(|| PathBuf::from("manifests"));
        let project = crate::manifest::load_dir(&dir)?;
        server::run(&state, Some(&project.name), Initial::StateDir)?;
    }
    Ok(Outcome::Success)
}
