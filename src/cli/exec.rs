//! `bottle exec AGENT [DIR] -- CMD...`: run a command in the agent's
//! machine as the agent user, with its `HOME` and environment (`--root`
//! for root, `-it` for a terminal); the command's exit status is bottle's.

use std::io::Write;
use std::time::Duration;

use clap::Args;
use miette::Diagnostic;
use thiserror::Error;

use super::{GlobalArgs, Outcome, session};
use crate::runtime::{ExecRequest, MachineState};

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The agent whose machine runs the command.
    pub agent: String,

    /// Directory of manifests.
    #[arg(default_value = "manifests", value_name = "DIR")]
    pub dir: std::path::PathBuf,

    /// Run as root instead of the agent user.
    #[arg(long)]
    pub root: bool,

    /// Attach a terminal (keep stdin open, allocate a tty).
    #[arg(short = 'i', long = "interactive", requires = "tty")]
    pub interactive: bool,

    /// With `-i` (`-it`): allocate a terminal.
    #[arg(short = 't', long = "tty", requires = "interactive")]
    pub tty: bool,

    /// Without a terminal: how long the command may run.
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    pub timeout: u64,

    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Error, Diagnostic)]
pub enum ExecError {
    #[error("machine {machine} of agent `{agent}` is {state}")]
    #[diagnostic(
        code("bottle::not-running"),
        help("run `bottle apply --target {agent}` first")
    )]
    NotRunning {
        agent: String,
        machine: String,
        state: String,
    },
}

/// The request `exec` runs: the agent user (or root) in its home, with
/// `HOME`, `USER` and `LOGNAME` set as a login would set them.
pub fn request(user: &str, command: &[String], timeout: Duration) -> ExecRequest {
    let home = crate::steps::home_of(user);
    let mut request = ExecRequest::new(command.iter().cloned()).timeout(timeout);
    for (key, value) in [("HOME", home.as_str()), ("USER", user), ("LOGNAME", user)] {
        request.env.insert(key.to_owned(), value.to_owned());
    }
    request.workdir = Some(home.clone());
    if user != "root" {
        request = request.as_user(user);
    }
    request
}

pub fn run(global: &GlobalArgs, args: ExecArgs) -> miette::Result<Outcome> {
    let desired = session::load(&args.dir)?;
    let agent = session::agent(&desired, &args.agent)?;
    let ctx = desired.ctx(agent);
    let user = if args.root { "root" } else { ctx.user() };
    let request = request(user, &args.command, Duration::from_secs(args.timeout));
    let rt = session::runtime(global)?;
    let state = session::machine_state(rt.as_ref(), &agent.machine)?;
    if state != Some(MachineState::Running) {
        return Err(ExecError::NotRunning {
            agent: agent.name.clone(),
            machine: agent.machine.clone(),
            state: state.map_or("absent".to_owned(), |s| s.to_string()),
        }
        .into());
    }
    if args.interactive {
        // The runtime's own terminal session replaces bottle: its exit
        // status is the command's.
        let argv = rt.interactive_argv(&agent.machine, &request);
        use std::os::unix::process::CommandExt;
        let err = std::process::Command::new(&argv[0]).args(&argv[1..]).exec();
        return Err(miette::miette!(
            help = "check that the runtime binary is installed",
            "could not run {}: {err}",
            argv[0]
        ));
    }
    let output = rt.exec(&agent.machine, &request)?;
    std::io::stdout().write_all(&output.stdout).ok();
    std::io::stdout().flush().ok();
    std::io::stderr().write_all(&output.stderr).ok();
    Ok(Outcome::Exit(exit_code(output.status)))
}

/// A guest status as a process exit code: 0..=255 as is, anything else
/// (a signal, a runtime's negative code) 1.
fn exit_code(status: i32) -> u8 {
    u8::try_from(status).unwrap_or(1)
}
