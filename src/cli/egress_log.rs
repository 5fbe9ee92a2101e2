//! `bottle egress-log [DIR]`: the gate's decisions, one line each.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use miette::Diagnostic;
use serde::Serialize;
use serde_json::{Map, Value};
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
    // An agent the manifests do not declare (any more) may still have lines
    // in the log; one that has none is a typo, not an empty history.
    let undeclared = args
        .agent
        .as_ref()
        .filter(|a| !project.agents.contains_key(*a))
        .map(|agent| session::UnknownTarget {
            agent: agent.clone(),
            known: crate::manifest::names::sorted_naturally(
                project.agents.keys().map(String::as_str),
            )
            .join(", "),
        });
    if args.follow
        && let Some(unknown) = undeclared
    {
        return Err(unknown.into());
    }
    let mut shown = 0usize;
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
                    if let Some(text) = render(&line, args.agent.as_deref(), args.json) {
                        shown += 1;
                        if writeln!(out, "{text}").is_err() {
                            return Ok(Outcome::Success);
                        }
                    }
                }
                let _ = out.flush();
                partial.drain(..complete);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !args.follow => {
                if let Some(unknown) = undeclared {
                    return Err(unknown.into());
                }
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
            return match undeclared {
                Some(unknown) if shown == 0 => Err(unknown.into()),
                _ => Ok(Outcome::Success),
            };
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// One log line as a JSON object (`None`: not one; the gate writes only
/// objects, but the file is in the state directory, not ours alone).
fn parse(line: &str) -> Option<Map<String, Value>> {
    match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(event)) => Some(event),
        _ => None,
    }
}

/// How much of the log's end `bottle status` reads: the log grows without
/// bound (agents make it grow), so status never reads all of it.
pub const TAIL_BYTES: u64 = 1 << 20;

/// The complete lines in the last `max` bytes of the file (a line cut by
/// that bound is dropped, as is an unfinished last line).
pub fn read_tail(path: &Path, max: u64) -> std::io::Result<Vec<String>> {
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    // One byte before the bound too: it says whether the tail begins a line.
    let start = len.saturating_sub(max.saturating_add(1));
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.take(len - start).read_to_end(&mut bytes)?;
    let from = if start == 0 && len <= max {
        0
    } else {
        bytes
            .iter()
            .position(|b| *b == b'\n')
            .map_or(bytes.len(), |i| i + 1)
    };
    let to = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    if to <= from {
        return Ok(Vec::new());
    }
    Ok(String::from_utf8_lossy(&bytes[from..to])
        .lines()
        .map(str::to_owned)
        .collect())
}

/// One denied egress request, as `bottle status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Denial {
    pub host: String,
    pub port: u64,
    pub rule: String,
    /// Unix seconds.
    pub ts: f64,
}

/// An agent's recent egress denials.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AgentDenials {
    /// Denials in the hour before now.
    pub last_hour: usize,
    /// The latest few, newest first.
    pub latest: Vec<Denial>,
}

/// How many of an agent's latest denials `bottle status` lists.
pub const LATEST: usize = 3;

/// Denied egress by agent name, from the log's lines (oldest first);
/// lines without an agent (no valid credential) belong to no one.
pub fn denials_by_agent(lines: &[String], now: f64) -> BTreeMap<String, AgentDenials> {
    let mut by_agent: BTreeMap<String, AgentDenials> = BTreeMap::new();
    for event in lines.iter().rev().filter_map(|l| parse(l)) {
        let field = |k: &str| event.get(k).and_then(Value::as_str).unwrap_or("");
        if field("kind") != "egress" || field("decision") != "denied" || field("agent").is_empty() {
            continue;
        }
        let ts = event.get("ts").and_then(Value::as_f64).unwrap_or(0.0);
        let entry = by_agent.entry(field("agent").to_owned()).or_default();
        if now - ts <= 3600.0 {
            entry.last_hour += 1;
        }
        if entry.latest.len() < LATEST {
            entry.latest.push(Denial {
                host: field("host").to_owned(),
                port: event.get("port").and_then(Value::as_u64).unwrap_or(0),
                rule: field("rule").to_owned(),
                ts,
            });
        }
    }
    by_agent
}

/// One log line as the user sees it (`None`: filtered out).
pub fn render(line: &str, agent: Option<&str>, json: bool) -> Option<String> {
    let Some(event) = parse(line) else {
        return (agent.is_none()).then(|| super::supervise::escape(line));
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
    // Hosts, reasons and git's messages are the agent's to choose (or
    // quote what it sent): one line each, and no control character of its
    // reaches the terminal.
    let text = super::supervise::escape(&text);
    let who = super::supervise::escape(&who);
    Some(format!("{when}  {kind:<9} {who:<20} {text}"))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::{denials_by_agent, read_tail, render};

    #[test]
    fn what_the_agent_chose_reaches_the_terminal_escaped_on_one_line() {
        let line = r#"{"ts":1,"kind":"egress","bottle":"dev","agent":"coder","decision":"denied","method":"CONNECT","host":"\u001b[2Jevil.example","port":443,"reason":"not allowed\nsecond line"}"#;
        let text = render(line, None, false).unwrap();
        assert!(!text.contains('\u{1b}'), "{text}");
        assert!(!text.contains('\n'), "{text}");
        assert!(text.contains(r"\u{1b}[2Jevil.example:443"), "{text}");
        assert!(text.contains(r"not allowed\nsecond line"), "{text}");
        let git = r#"{"ts":1,"kind":"git","bottle":"dev","agent":"coder","op":"advertise","reason":"fatal: dubious\nTo add an exception"}"#;
        let text = render(git, None, false).unwrap();
        assert!(!text.contains('\n'), "{text}");
        // Not JSON: shown escaped too.
        let text = render("\u{1b}]0;title\u{7}", None, false).unwrap();
        assert!(!text.contains('\u{1b}'), "{text}");
    }

    fn denied(agent: &str, host: &str, ts: f64) -> String {
        format!(
            r#"{{"ts":{ts},"kind":"egress","bottle":"dev","agent":"{agent}","decision":"denied","method":"CONNECT","host":"{host}","port":443,"rule":"allow_hosts","reason":"not allowed"}}"#
        )
    }

    #[test]
    fn a_huge_log_is_read_only_at_its_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gate.log");
        let mut file = std::fs::File::create(&path).unwrap();
        // 8 MiB of old lines, then a few recent ones.
        let old = denied("coder", "old.example", 1.0) + "\n";
        for _ in 0..(8 << 20) / old.len() {
            file.write_all(old.as_bytes()).unwrap();
        }
        let recent: Vec<String> = (0..5)
            .map(|i| denied("coder", &format!("new{i}.example"), 9000.0 + f64::from(i)))
            .collect();
        for line in &recent {
            writeln!(file, "{line}").unwrap();
        }
        write!(file, "{{\"unfinished").unwrap();
        drop(file);

        let tail = read_tail(&path, 4096).unwrap();
        // Only whole lines, all from the end: fewer than 4096 bytes of them.
        assert!(tail.iter().map(|l| l.len() + 1).sum::<usize>() <= 4096);
        assert!(tail.len() > recent.len(), "{}", tail.len());
        assert_eq!(tail[tail.len() - 5..], recent[..]);
        assert!(tail.iter().all(|l| l.starts_with('{') && l.ends_with('}')));

        let by_agent = denials_by_agent(&tail, 9004.0);
        let coder = &by_agent["coder"];
        let hosts: Vec<&str> = coder.latest.iter().map(|d| d.host.as_str()).collect();
        assert_eq!(hosts, ["new4.example", "new3.example", "new2.example"]);
        assert_eq!(coder.last_hour, 5);

        // A bound on a line boundary keeps that line; one past it drops it.
        let last = recent[4].len() as u64 + 1 + "{\"unfinished".len() as u64;
        assert_eq!(read_tail(&path, last).unwrap(), [recent[4].clone()]);
        assert!(read_tail(&path, last - 1).unwrap().is_empty());
        // A small file is read whole.
        let small = dir.path().join("small.log");
        std::fs::write(&small, format!("{}\n", recent[0])).unwrap();
        assert_eq!(read_tail(&small, 4096).unwrap(), [recent[0].clone()]);
    }

    #[test]
    fn denials_belong_to_their_own_agent() {
        let lines = vec![
            denied("coder", "a.example", 100.0),
            denied("reader", "b.example", 200.0),
            denied("", "anon.example", 300.0),
            r#"{"ts":400,"kind":"egress","agent":"coder","decision":"allowed","host":"ok.example","port":443}"#.to_owned(),
            "not json".to_owned(),
            denied("coder", "c.example", 4000.0),
        ];
        let by_agent = denials_by_agent(&lines, 4000.0);
        assert_eq!(by_agent.keys().collect::<Vec<_>>(), ["coder", "reader"]);
        let coder = &by_agent["coder"];
        assert_eq!(coder.last_hour, 1, "a.example is older than an hour");
        let hosts: Vec<&str> = coder.latest.iter().map(|d| d.host.as_str()).collect();
        assert_eq!(hosts, ["c.example", "a.example"]);
        assert_eq!(by_agent["reader"].latest[0].host, "b.example");
    }

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
