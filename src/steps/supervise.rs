//! The supervise step: the operator's endpoint registered as the `supervise`
//! MCP server (HTTP transport) in the agent user's `~/.claude.json`, which is
//! where Claude Code reads user-scope MCP servers from. Every other key in
//! that file is preserved: Claude Code keeps its own state there.

use serde_json::{Map, Value, json};

use super::{
    AgentCtx, GuestUser, StepError, StepResult, digest, entry_user, home_of, run_as_agent,
    run_script, sh_quote, stage,
};
use crate::ledger::LedgerEntry;
use crate::runtime::Runtime;

pub const SERVER_NAME: &str = "supervise";

/// The step id, which names the guest lock every script of the step holds.
const STEP: &str = "supervise";

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

/// `~/.claude.json` of `user`, read by that user, with the user's ids.
fn read_config(
    ctx: &AgentCtx,
    user: &str,
    rt: &dyn Runtime,
) -> StepResult<(GuestUser, Map<String, Value>)> {
    let path = format!("{}/.claude.json", home_of(user));
    let out = run_as_agent(
        rt,
        ctx,
        STEP,
        user,
        "reading ~/.claude.json",
        &format!(
            "id -u; id -g; if [ -f \"$1\" ]; then head -c {} \"$1\"; fi",
            CONFIG_LIMIT + 1
        ),
        &[&path],
        "check the agent user's home directory in the guest",
    )?;
    let mut lines = out.splitn(3, '\n');
    let ids = (
        lines.next().and_then(|l| l.trim().parse().ok()),
        lines.next().and_then(|l| l.trim().parse().ok()),
    );
    let (Some(uid), Some(gid)) = ids else {
        return Err(StepError::Other(
            format!(
                "could not read the ids of user {user} in machine {}",
                ctx.machine
            ),
            "check that `id` works in the image".into(),
        ));
    };
    let text = lines.next().unwrap_or_default();
    if text.len() > CONFIG_LIMIT {
        return Err(StepError::Other(
            format!(
                "{path} in machine {} is larger than {} MiB",
                ctx.machine,
                CONFIG_LIMIT >> 20
            ),
            "Claude Code's config is small: remove or shrink the file in the guest; bottle \
             reads no more of it"
                .into(),
        ));
    }
    if text.trim().is_empty() {
        return Ok((GuestUser { uid, gid }, Map::new()));
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok((GuestUser { uid, gid }, map)),
        _ => Err(StepError::Other(
            format!("{path} in machine {} is not a JSON object", ctx.machine),
            "fix or remove the file in the guest; bottle will not overwrite it".into(),
        )),
    }
}

/// Write the file as the user, by rename, so Claude Code never reads half
/// of it. Returns the text written and the staged file.
fn write_config(
    ctx: &AgentCtx,
    user: &str,
    ids: GuestUser,
    rt: &dyn Runtime,
    map: Map<String, Value>,
) -> StepResult<(String, String)> {
    let mut text = serde_json::to_string_pretty(&Value::Object(map)).expect("json serializes");
    text.push('\n');
    let staged = stage(rt, ctx.machine, text.as_bytes(), ids)?;
    let path = format!("{}/.claude.json", home_of(user));
    run_as_agent(
        rt,
        ctx,
        STEP,
        user,
        "writing ~/.claude.json",
        "umask 077 && cp \"$1\" \"$2.bottle-tmp\" && mv -f \"$2.bottle-tmp\" \"$2\"",
        &[&staged, &path],
        "check the agent user's home directory in the guest",
    )?;
    Ok((text, staged))
}

/// Returns the staged files for `record` to remove.
pub fn apply(
    ctx: &AgentCtx,
    _user: GuestUser,
    rt: &dyn Runtime,
    entry: &mut LedgerEntry,
) -> StepResult<Vec<String>> {
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
    let (ids, mut map) = read_config(ctx, ctx.user(), rt)?;
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
    let (written, staged) = write_config(ctx, ctx.user(), ids, rt, map)?;
    entry.digest = digest_of_config(&written);
    entry.paths = vec![config_path(ctx)];
    Ok(vec![staged])
}

/// Remove the `supervise` server from the file of the user it was written
/// for; the staged copy is removed right away (no ledger entry follows).
pub fn undo(entry: &LedgerEntry, ctx: &AgentCtx, rt: &dyn Runtime) -> StepResult<()> {
    let user = entry_user(entry, ctx);
    let (ids, mut map) = read_config(ctx, user, rt)?;
    let removed = map
        .get_mut("mcpServers")
        .and_then(Value::as_object_mut)
        .and_then(|s| s.remove(SERVER_NAME))
        .is_some();
    if removed {
        let (_, staged) = write_config(ctx, user, ids, rt, map)?;
        run_script(
            rt,
            ctx.machine,
            STEP,
            "removing a staged file",
            "rm -f \"$1\"",
            &[&staged],
            "check the guest",
        )?;
    }
    Ok(())
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
