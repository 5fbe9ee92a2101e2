//! The supervise step: the operator's endpoint registered as the `supervise`
//! MCP server (HTTP transport) in the agent user's `~/.claude.json`, which is
//! where Claude Code reads user-scope MCP servers from. Every other key in
//! that file is preserved: Claude Code keeps its own state there.

use serde_json::{Map, Value, json};

use super::{AgentCtx, GuestUser, StepError, StepResult, digest, run_script, sh_quote, upload};
use crate::ledger::LedgerEntry;
use crate::runtime::{CopyOptions, Runtime};

pub const SERVER_NAME: &str = "supervise";

pub fn config_path(ctx: &AgentCtx) -> String {
    format!("{}/.claude.json", ctx.home())
}

/// Prints the whole config file: only our entry is digested, since Claude
/// Code rewrites the rest of it all the time.
pub fn probe(ctx: &AgentCtx) -> String {
    let f = sh_quote(&config_path(ctx));
    format!("if [ -f {f} ]; then cat {f}; fi")
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

fn canonical(v: &Value) -> String {
    // serde_json's Map is ordered by key (no preserve_order feature), so
    // serialization is canonical.
    v.to_string()
}

fn entry_value(url: &str) -> Value {
    json!({ "type": "http", "url": url })
}

fn read_config(ctx: &AgentCtx, rt: &dyn Runtime) -> StepResult<Map<String, Value>> {
    let text = run_script(
        rt,
        ctx.machine,
        "reading ~/.claude.json",
        &probe(ctx),
        &[],
        "check the guest",
    )?;
    if text.trim().is_empty() {
        return Ok(Map::new());
    }
    match serde_json::from_str::<Value>(&text) {
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

fn write_config(
    ctx: &AgentCtx,
    user: GuestUser,
    rt: &dyn Runtime,
    map: Map<String, Value>,
) -> StepResult<String> {
    let mut text = serde_json::to_string_pretty(&Value::Object(map)).expect("json serializes");
    text.push('\n');
    upload(
        rt,
        ctx.machine,
        text.as_bytes(),
        &config_path(ctx),
        &CopyOptions {
            mode: 0o600,
            uid: user.uid,
            gid: user.gid,
        },
    )?;
    Ok(text)
}

pub fn apply(
    ctx: &AgentCtx,
    user: GuestUser,
    rt: &dyn Runtime,
    entry: &mut LedgerEntry,
) -> StepResult<()> {
    let url = &ctx
        .bottle
        .spec
        .supervise
        .as_ref()
        .expect("the supervise step exists only when declared")
        .url;
    let mut map = read_config(ctx, rt)?;
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
    let written = write_config(ctx, user, rt, map)?;
    entry.digest = digest_of_config(&written);
    entry.paths = vec![config_path(ctx)];
    Ok(())
}

pub fn undo(
    _entry: &LedgerEntry,
    ctx: &AgentCtx,
    user: Option<GuestUser>,
    rt: &dyn Runtime,
) -> StepResult<()> {
    let mut map = read_config(ctx, rt)?;
    let removed = map
        .get_mut("mcpServers")
        .and_then(Value::as_object_mut)
        .and_then(|s| s.remove(SERVER_NAME))
        .is_some();
    if removed {
        let user = user.unwrap_or(GuestUser { uid: 0, gid: 0 });
        write_config(ctx, user, rt, map)?;
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
