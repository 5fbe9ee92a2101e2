//! `bottle egress-log [DIR]`: the gate's decisions, one line each.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use miette::Diagnostic;
use serde_json::Value;
use thiserror::Error;

use super::{DirArg, GlobalArgs, Outcome, session};
use crate::gate::paths::GatePaths;

#[derive(Debug, Args)]
pub struct EgressLogArgs {
    #[command(flatten)]
    pub dir: DirArg,

    /// Only this agent's requests.
    #[arg(long, value_name = "AGENT")]
    pub agent: Option<String>,

    /// Keep printing decisions as the gate makes them.
    #[arg(long, short = 'f')]
    pub follow: bool,

    /// Print the log's JSON lines as they are.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Error, Diagnostic)]
#[error("no gate log for project `{project}` ({})", path.display())]
#[diagnostic(
    code("bottle::no-gate-log"),
    help(
        "the gate writes it from its first start: run `bottle apply` for a project whose bottles declare egress, secrets with hosts, git or supervise (or pass --follow to wait for it)"
    )
)]
struct NoLog {
    project: String,
    path: PathBuf,
}

pub fn run(global: &GlobalArgs, args: EgressLogArgs) -> miette::Result<Outcome> {
    let project = crate::manifest::load_dir(&args.dir.dir)?;
    let paths = GatePaths::new(&session::state_dir(global)?, &project.name);
    let path = paths.log();
    let mut offset = 0u64;
    let mut partial = Vec::new();
    let stdout = std::io::stdout();
    loop {
        match std::fs::File::open(&path) {
            Ok(mut file) => {
                let len = file.metadata().map(|m| m.len()).unwrap_or(0);
                if len < offset {
                    // Truncated or replaced: start again from its beginning.
                    offset = 0;
                    partial.clear();
                }
                file.seek(SeekFrom::Start(offset))
                    .and_then(|_| {
                        Read::by_ref(&mut file)
                            .take(len - offset)
                            .read_to_end(&mut partial)
                    })
                    .map_err(|e| miette::miette!("reading {}: {e}", path.display()))?;
                offset = len;
                let complete = partial
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(0, |i| i + 1);
                let mut out = stdout.lock();
                for line in BufReader::new(&partial[..complete]).lines() {
                    let Ok(line) = line else { continue };
                    if let Some(text) = render(&line, args.agent.as_deref(), args.json)
                        && writeln!(out, "{text}").is_err()
                    {
                        return Ok(Outcome::Success);
                    }
                }
                let _ = out.flush();
                partial.drain(..complete);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !args.follow => {
                return Err(NoLog {
                    project: project.name.clone(),
                    path,
                }
                .into());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(miette::miette!("reading {}: {e}", path.display())),
        }
        if !args.follow {
            return Ok(Outcome::Success);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// One log line as the user sees it (`None`: filtered out).
pub fn render(line: &str, agent: Option<&str>, json: bool) -> Option<String> {
    let Ok(Value::Object(event)) = serde_json::from_str::<Value>(line) else {
        return (agent.is_none()).then(|| line.to_owned());
    };
    let field = |k: &str| event.get(k).and_then(Value::as_str).unwrap_or("");
    if let Some(want) = agent
        && field("agent") != want
    {
        return None;
    }
    if json {
        return Some(line.to_owned());
    }
    let ts = event.get("ts").and_then(Value::as_f64).unwrap_or(0.0);
    let when = crate::time::format_unix(ts as u64);
    let kind = field("kind");
    let who = match (field("bottle"), field("agent")) {
        ("", _) => "-".to_owned(),
        (b, "") => format!("{b}/?"),
        (b, a) => format!("{b}/{a}"),
    };
    let text = if kind == "egress" {
        let port = event.get("port").and_then(Value::as_u64).unwrap_or(0);
        let target = format!("{} {}:{port}", field("method"), field("host"));
        let detail = match field("decision") {
            "allowed" => format!("{} ({})", field("mode"), field("rule")),
            "credential_added" => {
                let headers: Vec<&str> = event
                    .get("headers")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                format!("{} in {}", field("secret"), headers.join(", "))
            }
            _ => field("reason").to_owned(),
        };
        format!("{:<16} {target}  {detail}", field("decision"))
    } else {
        let rest: Vec<String> = event
            .iter()
            .filter(|(k, _)| !["ts", "kind", "bottle", "agent"].contains(&k.as_str()))
            .map(|(k, v)| match v {
                Value::String(s) => format!("{k}={s}"),
                v => format!("{k}={v}"),
            })
            .collect();
        rest.join(" ")
    };
    Some(format!("{when}  {kind:<9} {who:<20} {text}"))
}

#[cfg(test)]
mod tests {
    use super::render;

    #[test]
    fn egress_decisions_read_as_one_line_each() {
        let allowed = r#"{"ts":1764668508.5,"kind":"egress","bottle":"dev","agent":"coder","decision":"allowed","method":"CONNECT","host":"api.anthropic.com","port":443,"rule":"allow_hosts: api.anthropic.com","mode":"tunnel"}"#;
        assert_eq!(
            render(allowed, None, false).unwrap(),
            "2025-12-02 09:41:48  egress    dev/coder            allowed          CONNECT api.anthropic.com:443  tunnel (allow_hosts: api.anthropic.com)"
        );
        let added = r#"{"ts":0,"kind":"egress","bottle":"dev","agent":"coder","decision":"credential_added","method":"GET","host":"h","port":443,"secret":"K","headers":["x-api-key"]}"#;
        assert!(
            render(added, None, false)
                .unwrap()
                .ends_with("credential_added GET h:443  K in x-api-key")
        );
        assert_eq!(render(added, Some("other"), false), None);
        assert_eq!(render(added, Some("coder"), true).unwrap(), added);
        let gate = r#"{"ts":0,"kind":"gate","event":"started","pid":7}"#;
        assert!(
            render(gate, None, false)
                .unwrap()
                .ends_with("gate      -                    event=started pid=7")
        );
        assert_eq!(render(gate, Some("coder"), false), None);
    }
}
