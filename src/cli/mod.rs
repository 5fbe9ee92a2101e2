//! The command line: argument parsing, and one module per subcommand.
//!
//! Every subcommand returns `Result<Outcome>`; [`main`] turns that into the
//! exit codes of DESIGN.md section 5: 0 success or in sync, 1 error, 2 usage
//! (clap's own, and [`is_usage_error`]'s), 3 drift or pending changes. Nothing but a completed
//! comparison can produce 3.

mod apply;
mod attach;
mod check;
mod destroy;
mod egress_log;
mod exec;
mod gate;
mod graph;
mod plan;
mod schema;
mod session;
mod status;
mod supervise;
mod validate;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// What a command found, beyond plain success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done, or in sync.
    Success,
    /// The world differs from the manifests (`check`, `plan
    /// --detailed-exitcode`), or `apply` left blocked actions undone.
    Drift,
    /// Exit with this code: `exec` passes its command's status through.
    Exit(u8),
}

pub const EXIT_ERROR: u8 = 1;
/// clap's exit code for usage errors.
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_DRIFT: u8 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "bottle",
    version,
    about = "Keep sandboxed coding agents in the state their TOML manifests declare",
    long_about = "Keep sandboxed coding agents in the state their TOML manifests declare.\n\n\
        Each agent runs in its own smolvm microVM (a \"bottle\") provisioned with exactly \
        what its manifest grants: system prompt, skills, trusted CA, git gateway, operator \
        supervision, egress allowlist, secrets by reference. `bottle apply` makes the \
        machines match the manifests and changes nothing when they already do.",
    after_help = "Exit codes: 0 success or in sync, 1 error, 2 usage error, 3 drift or pending changes."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalArgs {
    /// Where machines run: `smolvm` microVMs, or `local` bubblewrap
    /// sandboxes (Linux without KVM, CI).
    #[arg(long, global = true, env = "BOTTLE_RUNTIME", value_enum, default_value_t = RuntimeChoice::Smolvm)]
    pub runtime: RuntimeChoice,

    /// Path of the smolvm binary [default: `smolvm` on PATH].
    #[arg(long, global = true, env = "BOTTLE_SMOLVM", value_name = "PATH")]
    pub smolvm: Option<PathBuf>,

    /// Where bottle keeps its lock and the local runtime's machines
    /// [default: $XDG_STATE_HOME/bottle, or ~/.local/state/bottle].
    #[arg(long, global = true, env = "BOTTLE_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RuntimeChoice {
    Smolvm,
    Local,
}

/// The manifests directory argument every command takes.
#[derive(Debug, Args)]
pub struct DirArg {
    /// Directory of manifests: every `*.toml` under it is read.
    #[arg(default_value = "manifests", value_name = "DIR")]
    pub dir: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check the manifests without touching any runtime (for CI on every
    /// pull request). Prints every problem found, not just the first.
    Validate(validate::ValidateArgs),

    /// Print the provisioning graph: one node per step per agent, edges
    /// "must happen after".
    Graph(graph::GraphArgs),

    /// Print the JSON schema of the manifest format (the one in
    /// `schemas/bottle.schema.json`).
    Schema(schema::SchemaArgs),

    /// Show what `apply` would do: every action with its cause.
    Plan(plan::PlanArgs),

    /// Make the machines match the manifests: create, start and provision
    /// what is missing or different, undo what was removed. Changes nothing
    /// when everything matches.
    #[command(
        after_help = "Ctrl-C starts nothing new and lets the calls under way finish; a second \
Ctrl-C ends them (a hung setup command is killed; on smolvm the command inside the machine may keep \
running) and exits 1 with the lock released; a third quits at once."
    )]
    Apply(apply::ApplyArgs),

    /// Drift check for CI: exit 0 when every agent matches its manifest, 3
    /// when something differs (each difference named with its cause).
    Check(check::CheckArgs),

    /// Each agent's machine, its state, and the state of each step.
    Status(status::StatusArgs),

    /// Delete this project's machines (all of them, or some agents').
    Destroy(destroy::DestroyArgs),

    /// Run the agent's Claude Code session in its machine.
    Attach(attach::AttachArgs),

    /// Run a command in the agent's machine as the agent user, with its
    /// HOME and environment: `bottle exec AGENT [DIR] -- CMD...` (`--root`
    /// for root, `-it` for a terminal). Exits with the command's status.
    Exec(exec::ExecArgs),

    /// Keep reconciling: whenever a manifest or a file it references
    /// changes, and periodically to repair drift inside guests.
    Watch(watch::WatchArgs),

    /// The project's gate, the host half of its bottles: egress proxy, git
    /// gateway, supervise.
    Gate(gate::GateArgs),

    /// Print the gate's decisions: every request allowed, denied or given a
    /// credential.
    EgressLog(egress_log::EgressLogArgs),

    /// What agents asked their operator for, through the gate's supervise
    /// endpoint: list (the default), approve, deny, revoke.
    Supervise(supervise::SuperviseArgs),

    /// Internal: the local runtime's relay from a machine's network to its
    /// bottle's gate (started by the runtime, with its socket on fd 3).
    #[command(hide = true)]
    LocalGateRelay(LocalGateRelayArgs),
}

#[derive(Debug, Args)]
pub struct LocalGateRelayArgs {
    #[arg(long)]
    port: u16,
    #[arg(long)]
    init_pid: u32,
    #[arg(long)]
    init_start: u64,
}

/// Parse arguments, run the command, return the process exit code.
pub fn main() -> ExitCode {
    install_error_renderer();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Validate(args) => validate::run(&cli.global, args),
        Command::Graph(args) => graph::run(&cli.global, args),
        Command::Schema(args) => schema::run(&cli.global, args),
        Command::Plan(args) => plan::run(&cli.global, args),
        Command::Apply(args) => apply::run(&cli.global, args),
        Command::Check(args) => check::run(&cli.global, args),
        Command::Status(args) => status::run(&cli.global, args),
        Command::Destroy(args) => destroy::run(&cli.global, args),
        Command::Attach(args) => attach::run(&cli.global, args),
        Command::Exec(args) => exec::run(&cli.global, args),
        Command::Watch(args) => watch::run(&cli.global, args),
        Command::Gate(args) => gate::run(&cli.global, args),
        Command::EgressLog(args) => egress_log::run(&cli.global, args),
        Command::LocalGateRelay(args) => {
            crate::runtime::local::relay::serve(args.port, args.init_pid, args.init_start)
                .map(|()| Outcome::Success)
                .map_err(|e| miette::miette!("the gate relay failed: {e}"))
        }
        Command::Supervise(args) => supervise::run(&cli.global, args),
    };
    match result {
        Ok(Outcome::Success) => ExitCode::SUCCESS,
        Ok(Outcome::Drift) => ExitCode::from(EXIT_DRIFT),
        Ok(Outcome::Exit(code)) => ExitCode::from(code),
        Err(report) => {
            eprintln!("{report:?}");
            ExitCode::from(if is_usage_error(&report) {
                EXIT_USAGE
            } else {
                EXIT_ERROR
            })
        }
    }
}

/// Mistakes on the command line that clap cannot see, exit 2 like its own:
/// an agent the manifests do not declare, a malformed `--project`. Told by
/// type, so an error that merely shares a code never passes for one.
fn is_usage_error(report: &miette::Report) -> bool {
    report.is::<session::UnknownTarget>()
        || report.is::<destroy::InvalidProjectOption>()
        || report.is::<supervise::BadProject>()
}

/// Diagnostics render with colour and Unicode on a terminal, and as plain
/// text elsewhere (CI logs, tests, pipes), at a width that does not depend on
/// the terminal so snapshots are stable.
fn install_error_renderer() {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let _ = miette::set_hook(Box::new(move |_| {
        let theme = if tty {
            miette::GraphicalTheme::unicode()
        } else {
            miette::GraphicalTheme::unicode_nocolor()
        };
        Box::new(
            miette::GraphicalReportHandler::new_themed(theme)
                .with_width(100)
                .with_links(false),
        )
    }));
}
