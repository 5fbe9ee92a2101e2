//! The supervise step: the operator's endpoint registered as the `supervise`
//! MCP server (HTTP transport) in the agent user's `~/.claude.json`, which is
//! where Claude Code reads user-scope MCP servers from. Every other key in
//! that file is preserved: Claude Code keeps its own state there.

use serde_json::{Map, Value, json};

use super::{
    AgentCtx, Payload, Recorded, Step, StepCx, StepError, StepResult, Work, digest, entry_user,
    home_of, sh_quote,
};
use crate::ledger::LedgerEntry;

pub const SERVER_NAME: &str = "supervise";

pub struct SuperviseStep;

pub fn config_path(ctx: &AgentCtx) -> String {
    format!("{}/.claude.json", ctx.home())
}

/// The most of `~/.claude.json` bottle reads (the probe's section limit):
/// the agent may inflate the file, never bottle's memory or time.
const CONFIG_LIMIT: usize = crate::observe::SECTION_LIMIT;

/// Prints the config file (at most [`CONFIG_LIMIT`] bytes of it; a larger
/// one is observed as over the limit, and drift): only our entry is
/// digested, since Claude Code rewrites the rest of it all the time.
pub fn probe(ctx: &AgentCtx) -> String {
    let f = sh_quote(&config_path(ctx));
    format!("if [ -f {f} ]; then head -c {} {f}; fi", CONFIG_LIMIT + 1)
}

/// Digest of the `supervise` entry of a `~/.claude.json` text (missing file,
/// missing entry and unparsable file each digest differently).
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

fn entry_value(url: &str) -> Value {
    json!({ "type": "http", "url": url })
}

/// The file as observed, parsed (an absent or empty file is an empty
/// object; one over the probe's limit was never read whole).
fn parse_config(ctx: &AgentCtx, text: &str) -> StepResult<Map<String, Value>> {
    if text == crate::observe::OVER_LIMIT || text.len() > CONFIG_LIMIT {
        return Err(StepError::Other(
            format!(
                "{} in machine {} is larger than {} MiB",
                config_path(ctx),
                ctx.machine,
                CONFIG_LIMIT >> 20
            ),
            "Claude Code's config is small: remove or shrink the file in the guest; bottle \
             reads no more of it"
                .into(),
        ));
    }
    if text.trim().is_empty() {
        return Ok(Map::new());
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
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

/// Run as the user: `$1` the staged file, `$2` the config file, `$3` the
/// SHA-256 of the file bottle read (`absent`: none or empty). The file is
/// replaced by rename, so Claude Code never reads half of it, and only if
/// it is still what bottle read: Claude Code rewrites it, and bottle must
/// not write back an older copy of its state.
const WRITE: &str = r#"set -e
if [ -s "$2" ]; then now=$(sha256sum < "$2" | cut -c1-64); else now=absent; fi
if [ "$now" != "$3" ]; then echo "$2 changed since bottle read it" >&2; exit 1; fi
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

/// The work that writes `map` as `user`'s file, read as `observed`.
fn write_work(user: &str, observed: &str, map: Map<String, Value>, what: &str) -> (String, Work) {
    let mut text = serde_json::to_string_pretty(&Value::Object(map)).expect("json serializes");
    text.push('\n');
    let read = if observed.trim().is_empty() {
        "absent".to_owned()
    } else {
        super::sha256_hex(observed.as_bytes())
    };
    let work = Work::new(
        what,
        "run `bottle apply` again; check the agent user's ~/.claude.json in the guest",
        APPLY,
    )
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
        digest_of_config(output)
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
        let declared = ctx
            .bottle
            .spec
            .supervise
            .as_ref()
            .expect("the supervise step exists only when declared");
        // Without `url`, the bottle's gate serves it at a per-agent path.
        let url = match (&declared.url, ctx.gate) {
            (Some(url), _) => url.as_str(),
            (None, Some(gate)) => gate.supervise_url.as_str(),
            (None, None) => {
                return Err(StepError::Other(
                    format!(
                        "the gate's supervise endpoint of {} is unknown",
                        ctx.machine
                    ),
                    "run `bottle apply`, which starts the gate first".into(),
                ));
            }
        };
        let observed = cx.observed.unwrap_or_default();
        let mut map = parse_config(ctx, observed)?;
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
        let (written, work) = write_work(ctx.user(), observed, map, "writing ~/.claude.json");
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
        let mut map = parse_config(ctx, observed)?;
        let removed = map
            .get_mut("mcpServers")
            .and_then(Value::as_object_mut)
            .and_then(|s| s.remove(SERVER_NAME))
            .is_some();
        if !removed {
            return Ok(nothing());
        }
        Ok(write_work(
            user,
            observed,
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
}
