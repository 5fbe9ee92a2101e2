//! `bottle supervise`: the operator's side of supervise. List what agents
//! asked for, approve (for a while), deny, revoke. Decisions take effect in
//! the running gate at once: it re-reads the grants file when it changes.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use miette::Diagnostic;
use serde_json::{Value, json};
use thiserror::Error;

use super::{GlobalArgs, Outcome, session};
use crate::gate::log::GateLog;
use crate::gate::paths::GatePaths;
use crate::gate::supervise::grants::{
    UndeclaredGrant, declared_from_project, human_secs, undeclared_grants,
};
use crate::gate::supervise::store::{Kind, Record, Status, Store, now, parse_duration};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SuperviseArgs {
    #[command(subcommand)]
    pub action: Option<Action>,

    #[command(flatten)]
    pub list: ListArgs,
}

#[derive(Debug, Subcommand)]
pub enum Action {
    /// List requests, grants and messages (the default).
    List(ListArgs),
    /// Approve a pending request: its agent, and only it, may reach the
    /// host from now until the duration ends.
    Approve {
        /// The request's id (`bottle supervise list` shows it).
        id: String,
        #[command(flatten)]
        project: ProjectArgs,
        /// How long the grant lasts: `30m`, `2h`, `1d`, `1h30m`.
        #[arg(long = "for", value_name = "DURATION", default_value = "1h", value_parser = duration)]
        duration: u64,
    },
    /// Deny a pending request.
    Deny {
        id: String,
        #[command(flatten)]
        project: ProjectArgs,
        /// Why, for the agent (`request_status` shows it).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// End an approved grant now.
    Revoke {
        id: String,
        #[command(flatten)]
        project: ProjectArgs,
    },
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub project: ProjectArgs,

    /// Print a JSON array of objects (`id`, `bottle`, `agent`, `kind`,
    /// `host`, `reason`, `created_at`, `state`, and `until` when approved).
    #[arg(long)]
    pub json: bool,
}

/// Whose grants: the project of the manifests in DIR, or `--project`.
#[derive(Debug, Args)]
pub struct ProjectArgs {
    /// Directory of manifests: every `*.toml` under it is read.
    #[arg(default_value = "manifests", value_name = "DIR")]
    pub dir: PathBuf,

    /// The project id, instead of reading it from the manifests.
    #[arg(long, value_name = "NAME")]
    pub project: Option<String>,
}

fn duration(text: &str) -> Result<u64, String> {
    parse_duration(text).map_err(|why| format!("{why}; write e.g. `30m`, `2h` or `1d`"))
}

/// `--project` given something that cannot be a project id (exit 2).
#[derive(Debug, Error, Diagnostic)]
#[error("--project {name:?} is not a project id: it {why}")]
#[diagnostic(
    code("bottle::invalid-project-option"),
    help(
        "pass the project id as `bottle status` prints it (`[project] name` in the root bottle.toml): 1-48 lower-case letters, digits and '-', starting with a letter"
    )
)]
pub struct BadProject {
    name: String,
    why: &'static str,
}

pub fn run(global: &GlobalArgs, args: SuperviseArgs) -> miette::Result<Outcome> {
    match args.action {
        None => list(global, args.list),
        Some(Action::List(list_args)) => list(global, list_args),
        Some(Action::Approve {
            id,
            project,
            duration,
        }) => decide(global, &project, |store, now| {
            store.approve(&id, duration, now)
        }),
        Some(Action::Deny {
            id,
            project,
            reason,
        }) => decide(global, &project, |store, now| {
            store.deny(&id, reason.as_deref(), now)
        }),
        Some(Action::Revoke { id, project }) => {
            decide(global, &project, |store, now| store.revoke(&id, now))
        }
    }
}

fn gate_paths(global: &GlobalArgs, args: &ProjectArgs) -> miette::Result<(String, GatePaths)> {
    let project = match &args.project {
        Some(name) => {
            crate::manifest::names::check_name(name).map_err(|why| BadProject {
                name: name.clone(),
                why,
            })?;
            name.clone()
        }
        None => crate::manifest::load_dir(&args.dir)?.name,
    };
    let state = session::state_dir(global)?;
    let paths = GatePaths::new(&state, &project);
    Ok((project, paths))
}

fn list(global: &GlobalArgs, args: ListArgs) -> miette::Result<Outcome> {
    let (project, paths) = gate_paths(global, &args.project)?;
    let mut records = Store::new(&paths).load()?.records;
    // Oldest first; the file keeps the order they came in.
    records.sort_by_key(|r| r.created_at);
    let now = now();
    if args.json {
        let array: Vec<Value> = records.iter().map(|r| r.to_json(now)).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&array).expect("JSON serializes")
        );
        return Ok(Outcome::Success);
    }
    print!("{}", table(&project, &records, now));
    Ok(Outcome::Success)
}

/// The human listing.
pub fn table(project: &str, records: &[Record], now: u64) -> String {
    if records.is_empty() {
        return format!("No supervise requests in project `{project}`.\n");
    }
    let mut rows = vec![["ID", "AGENT", "WHAT", "REASON", "AGE", "STATE"].map(str::to_owned)];
    rows.extend(records.iter().map(|r| {
        let what = match r.kind {
            Kind::Egress => format!("egress {}", escape(r.host.as_deref().unwrap_or(""))),
            Kind::Message => "message".to_owned(),
        };
        [
            r.id.clone(),
            escape(&r.agent),
            what,
            shorten(&escape(&r.reason), 60),
            human_secs(now.saturating_sub(r.created_at)),
            state(r, now),
        ]
    }));
    super::status::table(&rows)
}

fn state(r: &Record, now: u64) -> String {
    match (r.status(now), &r.state) {
        (Status::Approved, _) => format!(
            "approved ({} left)",
            human_secs(r.until().unwrap_or(now).saturating_sub(now))
        ),
        (Status::Denied, crate::gate::supervise::store::State::Denied { deny_reason, .. }) => {
            match deny_reason {
                Some(why) => format!("denied: {}", shorten(&escape(why), 40)),
                None => "denied".into(),
            }
        }
        (status, _) => status.as_str().to_owned(),
    }
}

/// Text an agent wrote, safe on a terminal: control characters (and the
/// Unicode ones that reorder or hide text) as escapes, backslashes doubled.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control()
                || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}') =>
            {
                out.push_str(&format!("\\u{{{:x}}}", c as u32));
            }
            c => out.push(c),
        }
    }
    out
}

fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut s: String = text.chars().take(max - 1).collect();
    s.push('…');
    s
}

fn decide(
    global: &GlobalArgs,
    args: &ProjectArgs,
    change: impl FnOnce(&Store, u64) -> Result<Record, crate::gate::supervise::store::DecideError>,
) -> miette::Result<Outcome> {
    let (_project, paths) = gate_paths(global, args)?;
    let store = Store::new(&paths);
    let now = now();
    let record = change(&store, now)?;
    let host = escape(record.host.as_deref().unwrap_or(""));
    let agent = escape(&record.agent);
    let message = match record.status(now) {
        Status::Approved => format!(
            "Approved {}: agent `{agent}` may reach `{host}` for {} (until {}).",
            record.id,
            human_secs(record.until().unwrap_or(now) - now),
            utc(record.until().unwrap_or(now))
        ),
        Status::Denied => format!(
            "Denied {}: agent `{agent}` may not reach `{host}`.",
            record.id
        ),
        Status::Revoked => format!(
            "Revoked {}: agent `{agent}` may no longer reach `{host}`.",
            record.id
        ),
        other => format!("{} is {}.", record.id, other.as_str()),
    };
    // The decision goes in the gate log too (appended; the gate keeps its
    // own handle open). No gate directory yet: nothing to log beside.
    if paths.dir.is_dir()
        && let Ok(log) = GateLog::open(&paths.log())
    {
        let mut fields = json!({
            "bottle": record.bottle, "agent": record.agent, "id": record.id,
            "host": record.host, "event": "decision", "by": "operator",
            "state": record.status(now).as_str(),
        });
        if let (Some(o), Some(until)) = (fields.as_object_mut(), record.until()) {
            o.insert("until".into(), until.into());
        }
        log.event("supervise", fields);
    }
    println!("{message}");
    Ok(Outcome::Success)
}

/// Grants in force that the manifests do not declare, for the agents of
/// `targets` (every agent when `None`): `plan` and `status` show them,
/// `check` counts them as drift. No grants file yet: none.
pub fn undeclared(
    global: &GlobalArgs,
    desired: &crate::desired::Desired,
    targets: Option<&[String]>,
) -> miette::Result<Vec<UndeclaredGrant>> {
    let paths = GatePaths::new(&session::state_dir(global)?, &desired.project.name);
    let declared = declared_from_project(&desired.project);
    let mut grants = undeclared_grants(&paths, &declared, now())?;
    if let Some(targets) = targets {
        grants.retain(|g| targets.contains(&g.agent));
    }
    Ok(grants)
}

/// One line per grant, indented, then what to do about them.
pub fn print_undeclared(grants: &[UndeclaredGrant]) {
    if grants.is_empty() {
        return;
    }
    println!("Supervise grants in force that the manifests do not declare:");
    for g in grants {
        println!("  {g}");
    }
    println!(
        "{} grant(s); `apply` leaves them: `bottle supervise revoke ID` ends one, and declaring its host in the bottle's `egress.allow_hosts` retires it.",
        grants.len()
    );
}

/// For `watch`: print each new request and message as it arrives, from a
/// thread of its own that checks the grants file once a second (a `stat`;
/// a read only when it changed) for as long as the process runs.
pub fn follow(paths: GatePaths, json: bool) {
    let logger = crate::watch::Logger::new(json);
    // What is there now is not new: read before this returns.
    let mut follow = crate::gate::supervise::grants::Follow::new(&paths);
    let spawned = std::thread::Builder::new()
        .name("supervise-follow".into())
        .spawn(move || {
            let mut failing = false;
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
                match follow.poll() {
                    Ok(records) => {
                        failing = false;
                        for r in records {
                            let message = match r.kind {
                                Kind::Egress => format!(
                                    "supervise: agent {} asks for egress to {} ({}): `bottle supervise approve {}` or `deny {}`",
                                    escape(&r.agent),
                                    escape(r.host.as_deref().unwrap_or("")),
                                    shorten(&escape(&r.reason), 200),
                                    r.id,
                                    r.id
                                ),
                                Kind::Message => format!(
                                    "supervise: agent {} says: {}",
                                    escape(&r.agent),
                                    shorten(&escape(&r.reason), 400)
                                ),
                            };
                            let event = match r.kind {
                                Kind::Egress => "supervise_request",
                                Kind::Message => "supervise_message",
                            };
                            logger.log(event, &message, r.to_json(now()));
                        }
                    }
                    Err(e) if !failing => {
                        failing = true;
                        logger.log("supervise_error", &format!("supervise: {e}"), json!({}));
                    }
                    Err(_) => {}
                }
            }
        });
    if let Err(e) = spawned {
        crate::watch::Logger::new(json).log(
            "supervise_error",
            &format!("supervise: cannot follow requests: {e}"),
            json!({}),
        );
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC`.
fn utc(secs: u64) -> String {
    format!("{} UTC", crate::time::format_unix(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_text_cannot_drive_the_terminal() {
        assert_eq!(escape("a\x1b[2Jb\nc\\"), "a\\u{1b}[2Jb\\nc\\\\");
        assert_eq!(escape("x\u{202e}y"), "x\\u{202e}y");
        assert_eq!(escape("plain é"), "plain é");
    }
}
