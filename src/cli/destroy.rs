//! `bottle destroy`: delete this project's machines (all, or some agents').

use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use clap::Args;
use miette::Diagnostic;
use thiserror::Error;

use super::{DirArg, GlobalArgs, Outcome, session};
use crate::lock::ProjectLock;
use crate::observe::is_ours;
use crate::steps::machine::LABEL_AGENT;

#[derive(Debug, Args)]
pub struct DestroyArgs {
    #[command(flatten)]
    pub dir: DirArg,

    /// Only these agents' machines [default: every machine of this project,
    /// declared or not].
    #[arg(long = "agent", value_name = "AGENT")]
    pub agents: Vec<String>,

    /// The project whose machines to delete, instead of reading it from the
    /// manifests (for when they are gone or broken).
    #[arg(long, value_name = "NAME")]
    pub project: Option<String>,

    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
}

#[derive(Debug, Error, Diagnostic)]
pub enum DestroyError {
    #[error("refusing to delete {count} machine(s) without confirmation")]
    #[diagnostic(
        code(bottle::confirm),
        help("there is no terminal to ask on; pass --yes to delete without asking")
    )]
    NoTerminal { count: usize },
    /// A state problem, not a usage one: the agent may be declared, its
    /// machine is simply not there (never applied, or already deleted).
    #[error("agent `{agent}` has no machine in project `{project}`")]
    #[diagnostic(code("bottle::no-machine"), help("{help}"))]
    NoMachine {
        agent: String,
        project: String,
        help: String,
    },
}

/// `--project` given something that cannot be a project id: a usage
/// error (exit 2), unlike an invalid name in a manifest.
#[derive(Debug, Error, Diagnostic)]
#[error("--project {name:?} is not a project id: it {why}")]
#[diagnostic(
    code("bottle::invalid-project-option"),
    help(
        "pass the project id as `bottle status` prints it (`[project] name` in the root bottle.toml): 1-48 lower-case letters, digits and '-', starting with a letter"
    )
)]
pub struct InvalidProjectOption {
    name: String,
    why: &'static str,
}

/// The manifests name the project whose machines to delete; when they do
/// not load, `--project` is the way around them. Their problems are shown
/// below in full.
#[derive(Debug, Error, Diagnostic)]
#[error("cannot tell whose machines to delete: the manifests in `{dir}` do not load")]
#[diagnostic(
    code("bottle::manifests-unreadable"),
    help(
        "fix the problems below, or pass `--project NAME` to delete this project's machines without reading the manifests (NAME is its id: `[project] name` in the root bottle.toml, the `bottle.project` label of its machines)"
    )
)]
pub struct ManifestsUnreadable {
    dir: String,
    #[related]
    problems: Vec<crate::manifest::ManifestDiagnostic>,
}

pub fn run(global: &GlobalArgs, args: DestroyArgs) -> miette::Result<Outcome> {
    // The agents the manifests declare, when they were read: naming another
    // one that has no machine either is a typo (usage), not a state problem.
    let (project_name, declared) = match &args.project {
        Some(name) => {
            crate::manifest::names::check_name(name).map_err(|why| InvalidProjectOption {
                name: name.clone(),
                why,
            })?;
            (name.clone(), None)
        }
        None => {
            let project = crate::manifest::load_dir(&args.dir.dir).map_err(|problems| {
                ManifestsUnreadable {
                    dir: args.dir.dir.display().to_string(),
                    problems: problems.items,
                }
            })?;
            let agents: Vec<String> =
                crate::manifest::names::sorted_naturally(project.agents.keys().map(String::as_str))
                    .into_iter()
                    .map(str::to_owned)
                    .collect();
            (project.name, Some(agents))
        }
    };
    let _lock = ProjectLock::acquire(
        &session::lock_dir(global)?,
        &project_name,
        "destroy",
        Duration::ZERO,
    )?;
    let rt = session::runtime(global)?;
    let machines: Vec<_> = rt
        .list()?
        .into_iter()
        .filter(|m| is_ours(m, &project_name))
        .collect();
    let agent_of =
        |m: &crate::runtime::MachineInfo| m.labels.get(LABEL_AGENT).cloned().unwrap_or_default();
    for agent in &args.agents {
        if machines.iter().any(|m| &agent_of(m) == agent) {
            continue;
        }
        if let Some(declared) = &declared
            && !declared.contains(agent)
        {
            return Err(session::UnknownTarget {
                agent: agent.clone(),
                known: declared.join(", "),
            }
            .into());
        }
        let mut owners: Vec<String> = machines.iter().map(agent_of).collect();
        owners.sort_by(|a, b| crate::manifest::names::natural_cmp(a, b));
        owners.dedup();
        let help = if owners.is_empty() {
            format!("project `{project_name}` has no machines: there is nothing to delete")
        } else {
            format!(
                "the machines of project `{project_name}` belong to: {} (`bottle status` shows them)",
                owners.join(", ")
            )
        };
        return Err(DestroyError::NoMachine {
            agent: agent.clone(),
            project: project_name.clone(),
            help,
        }
        .into());
    }
    let mut doomed: Vec<_> = machines
        .into_iter()
        .filter(|m| args.agents.is_empty() || args.agents.contains(&agent_of(m)))
        .collect();
    doomed.sort_by(|a, b| crate::manifest::names::natural_cmp(&a.name, &b.name));
    let gate = crate::gate::paths::GatePaths::new(&session::state_dir(global)?, &project_name);
    if doomed.is_empty() {
        println!("No machines of project {} to delete.", project_name);
        if args.agents.is_empty() {
            stop_gate(&gate)?;
        }
        return Ok(Outcome::Success);
    }
    println!(
        "Machines of project {} to delete (their disks are lost):",
        project_name
    );
    for m in &doomed {
        println!("  {} (agent {}, {})", m.name, agent_of(m), m.state);
    }
    if !args.yes {
        if !std::io::stdin().is_terminal() {
            return Err(DestroyError::NoTerminal {
                count: doomed.len(),
            }
            .into());
        }
        print!("Delete {} machine(s)? [y/N] ", doomed.len());
        std::io::stdout().flush().ok();
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer).ok();
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            println!("Cancelled; nothing was deleted.");
            return Ok(Outcome::Success);
        }
    }
    let mut failed = Vec::new();
    for m in &doomed {
        match rt.delete(&m.name) {
            Ok(()) => println!("deleted {}", m.name),
            Err(e) => {
                eprintln!("{:?}", miette::Report::new(e));
                failed.push(m.name.clone());
            }
        }
    }
    if failed.is_empty() {
        // The gate serves the project's machines: with the last one gone,
        // it goes too.
        let left = rt.list()?.into_iter().any(|m| is_ours(&m, &project_name));
        if !left {
            stop_gate(&gate)?;
        }
        Ok(Outcome::Success)
    } else {
        Err(miette::miette!(
            help = "run `bottle destroy` again",
            "could not delete: {}",
            failed.join(", ")
        ))
    }
}

/// Stop the project's gate, if one runs.
fn stop_gate(gate: &crate::gate::paths::GatePaths) -> miette::Result<()> {
    if crate::gate::reconcile::stop(gate)? {
        println!("stopped the gate");
    }
    Ok(())
}
