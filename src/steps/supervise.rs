//! The supervise step: the operator's endpoint registered as the `supervise`
//! MCP server (HTTP transport) in the agent user's `~/.claude.json`, which is
//! where Claude Code reads user-scope MCP servers from. Every other key in
//! that file is preserved: Claude Code keeps its own state there.

use serde_json::{Map, Value, json};

use super::{
    AgentCtx, GuestUser, Payload, Recorded, Step, StepCx, StepError, StepResult, Work, digest,
    entry_user, home_of, sh_quote,
};
use crate::ledger::LedgerEntry;

pub const SERVER_NAME: &str = "supervise";

pub struct SuperviseStep;

pub fn config_path(ctx: &AgentCtx) -> String {
    format!("{}/.claude.json", ctx.home())
}

/// The most of `~/.claude.json` bottle reads (within the probe's section
/// limit, with the kind line before it): the agent may inflate the file,
/// never bottle's memory or time.
const CONFIG_LIMIT: usize = crate::observe::SECTION_LIMIT - 16;

/// Prints what is at the config path, on its first line (`file`, `link`
/// or `other`; nothing when nothing is there), then, for a regular file,
/// the file (at most [`CONFIG_LIMIT`] bytes of it; a larger one is
/// observed as over the limit, and drift). A link is never followed: root
/// reads no file the agent points it to (`~/.claude.json -> /etc/shadow`).
/// Only our entry is digested, since Claude Code rewrites the rest of the
/// file all the time.
pub fn probe(ctx: &AgentCtx) -> String {
    let f = sh_quote(&config_path(ctx));
    format!(
        "if [ -L {f} ]; then echo link; elif [ -f {f} ]; then echo file; head -c {} {f}; \
         elif [ -e {f} ]; then echo other; fi",
        CONFIG_LIMIT + 1
    )
}

/// What the probe found at the config path.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Found<'a> {
    /// Nothing, or an empty file (`WRITE`'s `-s` test).
    Absent,
    File(&'a str),
    /// A link, a directory, a FIFO: the agent's, replaced by a file.
    NotAFile,
    /// Over the probe's limit (or a section bottle cannot read).
    OverLimit,
}

fn found(section: &str) -> Found<'_> {
    if section == crate::observe::OVER_LIMIT {
        return Found::OverLimit;
    }
    match section.split_once('\n') {
        None if section.is_empty() => Found::Absent,
        Some(("file", "")) => Found::Absent,
        Some(("file", text)) if text.len() > CONFIG_LIMIT => Found::OverLimit,
        Some(("file", text)) => Found::File(text),
        Some(("link" | "other", _)) => Found::NotAFile,
        _ => Found::OverLimit,
    }
}

/// Digest of the `supervise` entry as the probe shows it (missing file,
/// missing entry, something other than a file and an unparsable file each
/// digest differently).
pub fn digest_of_section(section: &str) -> String {
    match found(section) {
        Found::Absent => digest("absent"),
        Found::File(text) => digest_of_config(text),
        Found::NotAFile => digest("not a file"),
        Found::OverLimit => digest("unparsable"),
    }
}

/// Digest of the `supervise` entry of a `~/.claude.json` text.
pub fn digest_of_config(text: &str) -> String {
    if text.trim().is_empty() {
        return digest("absent");
    }
    match serde_json::from_str::<Value>(text) {
        Ok(v) => match v.pointer(&format!("/mcpServers/{SERVER_NAME}")) {
            Some(entry) => digest(&format!("entry {}", canonical(entry))),
            None => digest("no entry"),
        },
        Err(_) => digest("unparsable"),
    }
}

/// JSON with object keys sorted at every level (the file keeps its own
/// order, so the digest must not depend on it).
fn canonical(v: &Value) -> String {
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                Value::Object(
                    keys.into_iter()
                        .map(|k| (k.clone(), sorted(&map[k])))
                        .collect(),
                )
            }
            Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    sorted(v).to_string()
}

/// The endpoint the server entry names: the declared `url`, or without
/// one, the bottle's gate's per-agent path (`None`: the gate is not known
/// yet). The step exists only when `supervise` is declared.
fn url<'a>(ctx: &AgentCtx<'a>) -> Option<&'a str> {
    let declared = ctx.bottle.spec.supervise.as_ref()?;
    match (&declared.url, ctx.gate) {
        (Some(url), _) => Some(url.as_str()),
        (None, Some(gate)) => Some(gate.supervise_url.as_str()),
        (None, None) => None,
    }
}

fn entry_value(url: &str) -> Value {
    json!({ "type": "http", "url": url })
}

/// The file as observed, parsed (an absent or empty file, or something
/// the agent put in its place, is an empty object; one over the probe's
/// limit was never read whole), and the token [`WRITE`] checks it by.
fn parse_config(ctx: &AgentCtx, section: &str) -> StepResult<(Map<String, Value>, String)> {
    let text = match found(section) {
        Found::OverLimit => {
            return Err(StepError::Other(
                format!(
                    "{} in machine {} is larger than {} MiB",
                    config_path(ctx),
                    ctx.machine,
                    crate::observe::SECTION_LIMIT >> 20
                ),
                "Claude Code's config is small: remove or shrink the file in the guest; bottle \
                 reads no more of it"
                    .into(),
            ));
        }
        Found::Absent => return Ok((Map::new(), "absent".into())),
        Found::NotAFile => return Ok((Map::new(), "other".into())),
        Found::File(text) => text,
    };
    let read = super::sha256_hex(text.as_bytes());
    if text.trim().is_empty() {
        return Ok((Map::new(), read));
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok((map, read)),
        _ => Err(StepError::Other(
            format!(
                "{} in machine {} is not a JSON object",
                config_path(ctx),
                ctx.machine
            ),
            "fix or remove the file in the guest; bottle will not overwrite it".into(),
        )),
    }
}

/// Run as the user: `$1` the staged file, `$2` the config file, `$3` what
/// bottle read there (the file's SHA-256; `absent`: none or empty;
/// `other`: a link, a directory, a FIFO). The file is replaced by rename,
/// so Claude Code never reads half of it, and only if it is still what
/// bottle read: Claude Code rewrites it, and bottle must not write back an
/// older copy of its state. What the agent put in its place goes (a link
/// itself, never what it points to).
const WRITE: &str = r#"set -e
if [ -L "$2" ] || { [ -e "$2" ] && [ ! -f "$2" ]; }; then now=other
elif [ -s "$2" ]; then now=$(sha256sum < "$2" | cut -c1-64); else now=absent; fi
if [ "$now" != "$3" ]; then echo "$2 changed since bottle read it" >&2; exit 1; fi
for f in "$2.bottle-tmp" "$2"; do
  if [ -d "$f" ] && [ ! -L "$f" ]; then chmod -R u+rwX "$f" 2>/dev/null || true; rm -rf "$f"; fi
done
rm -f "$2.bottle-tmp"
umask 077
cp "$1" "$2.bottle-tmp"
mv -f "$2.bottle-tmp" "$2"
"#;

/// Root, in the payload directory: `$1` the user, `$2` [`WRITE`], then
/// its `$2` and `$3`.
const APPLY: &str = r#"set -e
staged=$(bottle_stage config "$1")
bottle_as "$1" "$2" "$staged" "$3" "$4"
"#;

/// The work that writes `map` as `user`'s file, read as `read` (see
/// [`WRITE`]).
fn write_work(
    ctx: &AgentCtx,
    user: &str,
    read: String,
    map: Map<String, Value>,
    what: &str,
) -> (String, Work) {
    let mut text = serde_json::to_string_pretty(&Value::Object(map)).expect("json serializes");
    text.push('\n');
    let work = Work::new(what, &super::home_help(ctx), APPLY)
        .file(Payload::new("config", text.clone().into_bytes(), 0o600))
        .args([
            user.to_owned(),
            WRITE.to_owned(),
            format!("{}/.claude.json", home_of(user)),
            read,
        ]);
    (text, work)
}

impl Step for SuperviseStep {
    fn noun(&self) -> String {
        "supervise server".into()
    }

    fn probe(&self, ctx: &AgentCtx) -> Option<String> {
        Some(probe(ctx))
    }

    fn probe_digest(&self, output: &str) -> String {
        digest_of_section(output)
    }

    /// A file holding the declared entry (the rest of the file is Claude
    /// Code's and not digested).
    fn expected_output(&self, ctx: &AgentCtx, _user: Option<GuestUser>) -> Option<String> {
        let servers = json!({ SERVER_NAME: entry_value(url(ctx)?) });
        Some(format!("file\n{}", json!({ "mcpServers": servers })))
    }

    fn drift_path(&self, ctx: &AgentCtx) -> String {
        config_path(ctx)
    }

    fn in_home(&self) -> bool {
        true
    }

    /// The file as observation read it, with the `supervise` server set;
    /// written only if the guest's file is still the one read.
    fn apply(&self, cx: &StepCx, entry: &mut LedgerEntry) -> StepResult<Work> {
        let ctx = cx.ctx;
        let Some(url) = url(ctx) else {
            return Err(StepError::Other(
                format!(
                    "the gate's supervise endpoint of {} is unknown",
                    ctx.machine
                ),
                "run `bottle apply`, which starts the gate first".into(),
            ));
        };
        let (mut map, read) = parse_config(ctx, cx.observed.unwrap_or_default())?;
        let servers = map
            .entry("mcpServers")
            .or_insert_with(|| Value::Object(Map::new()));
        let Value::Object(servers) = servers else {
            return Err(StepError::Other(
                format!("`mcpServers` in {} is not an object", config_path(ctx)),
                "fix the file in the guest; bottle will not overwrite it".into(),
            ));
        };
        servers.insert(SERVER_NAME.into(), entry_value(url));
        let (written, work) = write_work(ctx, ctx.user(), read, map, "writing ~/.claude.json");
        entry.paths = vec![config_path(ctx)];
        Ok(work.recorded(Recorded::Known(digest_of_config(&written))))
    }

    /// Remove the `supervise` server from the file of the user it was
    /// written for, as observed. A file bottle did not observe (the agent
    /// user changed since) is left alone.
    fn undo(&self, cx: &StepCx, entry: &LedgerEntry) -> StepResult<Work> {
        let ctx = cx.ctx;
        let user = entry_user(entry, ctx);
        let nothing = || Work::new("removing the supervise server", "", "");
        let Some(observed) = cx.observed.filter(|_| user == ctx.user()) else {
            return Ok(nothing());
        };
        let (mut map, read) = parse_config(ctx, observed)?;
        let removed = map
            .get_mut("mcpServers")
            .and_then(Value::as_object_mut)
            .and_then(|s| s.remove(SERVER_NAME))
            .is_some();
        if !removed {
            return Ok(nothing());
        }
        Ok(write_work(
            ctx,
            user,
            read,
            map,
            "removing the supervise server from ~/.claude.json",
        )
        .1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_ignores_everything_but_the_supervise_entry() {
        let a = r#"{"numStartups": 3, "mcpServers": {"supervise": {"type": "http", "url": "http://x/"}}}"#;
        let b = r#"{"numStartups": 9, "mcpServers": {"supervise": {"url": "http://x/", "type": "http"}, "other": {}}}"#;
        assert_eq!(digest_of_config(a), digest_of_config(b));
    }

    #[test]
    fn digest_sees_a_changed_or_missing_entry() {
        let a = r#"{"mcpServers": {"supervise": {"type": "http", "url": "http://x/"}}}"#;
        let b = r#"{"mcpServers": {"supervise": {"type": "http", "url": "http://y/"}}}"#;
        assert_ne!(digest_of_config(a), digest_of_config(b));
        assert_ne!(digest_of_config(a), digest_of_config("{}"));
        assert_ne!(digest_of_config("{}"), digest_of_config(""));
    }

    /// The probe's first line says what is at the path: a file holding
    /// `link` is a file, and a link is never read.
    #[test]
    fn what_is_at_the_path_is_part_of_the_digest() {
        let entry = r#"{"mcpServers": {"supervise": {"type": "http", "url": "http://x/"}}}"#;
        assert_eq!(
            digest_of_section(&format!("file\n{entry}")),
            digest_of_config(entry)
        );
        assert_ne!(
            digest_of_section("link\n"),
            digest_of_section("file\nlink\n")
        );
        assert_ne!(digest_of_section("link\n"), digest_of_section(""));
        assert_eq!(digest_of_section(""), digest_of_section("file\n"));
        assert_eq!(found("other\n"), Found::NotAFile);
    }
}
