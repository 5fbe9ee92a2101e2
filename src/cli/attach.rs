//! `bottle attach`: open the agent's Claude Code session inside its bottle.

use clap::Args;
use miette::Diagnostic;
use thiserror::Error;

use super::{GlobalArgs, Outcome, session};
use crate::runtime::{ExecRequest, MachineState};
use crate::steps::{AgentCtx, prompt, sh_quote};

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// The agent to attach to.
    pub agent: String,

    /// Directory of manifests.
    #[arg(default_value = "manifests", value_name = "DIR")]
    pub dir: std::path::PathBuf,

    /// Print the command that would run (shell-quoted) instead of running
    /// it. The machine must be running, as for attaching.
    #[arg(long)]
    pub print_command: bool,
}

#[derive(Debug, Error, Diagnostic)]
pub enum AttachError {
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

    #[error("Claude Code (`claude`) is not installed in machine {machine} of agent `{agent}`")]
    #[diagnostic(
        code("bottle::claude-missing"),
        help(
            "`claude` is not on the agent user's PATH in the guest: use an image that has it, or \
             install it with a setup step of bottle `{bottle}`, e.g. `[[bottle.{bottle}.setup]]` \
             `name = \"claude\"` `run = \"npm install -g @anthropic-ai/claude-code\"`, then \
             `bottle apply`; `bottle exec {agent} -- sh` opens a shell to look around"
        )
    )]
    ClaudeMissing {
        agent: String,
        machine: String,
        bottle: String,
    },
}

/// The command `attach` runs inside the guest: Claude Code as the agent
/// user, with the prompt file only when the prompt is non-empty.
pub fn claude_argv(ctx: &AgentCtx) -> miette::Result<Vec<String>> {
    let mut argv = vec![
        "claude".to_owned(),
        "--dangerously-skip-permissions".to_owned(),
    ];
    let content = prompt::content(ctx)?;
    if !content.iter().all(u8::is_ascii_whitespace) {
        argv.push("--append-system-prompt-file".to_owned());
        argv.push(prompt::guest_path(ctx));
    }
    Ok(argv)
}

pub fn run(global: &GlobalArgs, args: AttachArgs) -> miette::Result<Outcome> {
    let desired = session::load(&args.dir)?;
    let agent = session::agent(&desired, &args.agent)?;
    let ctx = desired.ctx(agent);
    let mut request = ExecRequest::new(claude_argv(&ctx)?).as_user(ctx.user());
    request.workdir = Some(ctx.home());
    let rt = session::runtime(global)?;
    let state = session::machine_state(rt.as_ref(), &agent.machine)?;
    if state != Some(MachineState::Running) {
        return Err(AttachError::NotRunning {
            agent: agent.name.clone(),
            machine: agent.machine.clone(),
            state: state.map_or("absent".to_owned(), |s| s.to_string()),
        }
        .into());
    }
    if !args.print_command {
        // Without Claude Code the session would end at once with the
        // runtime's "failed to execute claude", exit 127: say so.
        let probe = ExecRequest::new(["sh", "-c", "command -v claude >/dev/null"])
            .as_user(ctx.user())
            .timeout(std::time::Duration::from_secs(60));
        let found = rt.exec(&agent.machine, &probe)?;
        if !found.success() {
            return Err(AttachError::ClaudeMissing {
                agent: agent.name.clone(),
                machine: agent.machine.clone(),
                bottle: agent_bottle(&desired, &agent.name),
            }
            .into());
        }
    }
    // Only now: the local runtime builds the command from the running
    // machine's namespaces.
    let argv = rt.interactive_argv(&agent.machine, &request);
    if args.print_command {
        println!(
            "{}",
            argv.iter()
                .map(|a| sh_quote(a))
                .collect::<Vec<_>>()
                .join(" ")
        );
        return Ok(Outcome::Success);
    }
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(&argv[0]).args(&argv[1..]).exec();
    Err(miette::miette!(
        help = "check that the runtime binary is installed",
        "could not run {}: {err}",
        argv[0]
    ))
}

fn agent_bottle(desired: &crate::desired::Desired, agent: &str) -> String {
    desired
        .project
        .agents
        .get(agent)
        .map_or_else(String::new, |a| a.spec.bottle.clone())
}
