//! The git step: the agent user's `~/.gitconfig` rewrites every remote's
//! upstream URL to the gateway (`url.<gateway>/<name>.git.insteadOf`) and
//! sets the commit identity. Other settings in the file are left alone.

use super::{AgentCtx, StepResult, digest, entry_user, home_of, run_script_as, sh_quote};
use crate::ledger::LedgerEntry;
use crate::runtime::{ExecRequest, Runtime};

const QUERY: &str = r"^(url\..*\.insteadof|user\.(name|email))$";

pub fn probe(ctx: &AgentCtx) -> String {
    format!(
        "HOME={} git config --global --get-regexp '{QUERY}' 2>/dev/null | LC_ALL=C sort",
        sh_quote(&ctx.home())
    )
}

/// `(section, upstream)` pairs: `url.<gateway>/<name>.git` rewrites
/// `upstream`.
pub fn rewrites(ctx: &AgentCtx) -> Vec<(String, String)> {
    let Some(git) = &ctx.bottle.spec.git else {
        return Vec::new();
    };
    // Without `gateway`, the bottle's gate serves the remotes, and the URL
    // carries the agent's git credential (HTTP Basic).
    let gateway = match (&git.gateway, ctx.gate) {
        (Some(url), _) => url.trim_end_matches('/'),
        (None, Some(gate)) => gate.git_base.as_str(),
        (None, None) => return Vec::new(),
    };
    git.remote
        .iter()
        .map(|r| (format!("url.{gateway}/{}.git", r.name), r.upstream.clone()))
        .collect()
}

const CONFIGURE: &str = r#"set -e
# $1: number of old sections, then the old sections; then user name and
# email (empty: leave alone), then "unset" when bottle set an identity that
# the manifest no longer declares; then section/upstream pairs.
n="$1"; shift
while [ "$n" -gt 0 ]; do git config --global --remove-section "$1" 2>/dev/null || true; shift; n=$((n-1)); done
if [ -n "$1" ]; then git config --global user.name "$1"; fi
if [ -n "$2" ]; then git config --global user.email "$2"; fi
if [ "$3" = unset ]; then git config --global --unset user.name || true; git config --global --unset user.email || true; fi
shift 3
while [ $# -gt 0 ]; do git config --global --add "$1.insteadOf" "$2"; shift 2; done
"#;

pub fn apply(
    ctx: &AgentCtx,
    rt: &dyn Runtime,
    previous: Option<&LedgerEntry>,
    entry: &mut LedgerEntry,
) -> StepResult<Vec<String>> {
    let old = previous
        .map(|p| p.detail_strings("sections"))
        .unwrap_or_default();
    let rewrites = rewrites(ctx);
    let mut sections: Vec<String> = rewrites.iter().map(|(s, _)| s.clone()).collect();
    sections.dedup();
    // Remove the old and the new sections, so re-applying never duplicates.
    let mut remove: Vec<String> = old.clone();
    for s in &sections {
        if !remove.contains(s) {
            remove.push(s.clone());
        }
    }
    let count = remove.len().to_string();
    let (name, email) = ctx
        .bottle
        .spec
        .git
        .as_ref()
        .and_then(|g| g.user.as_ref())
        .map(|u| (u.name.as_str(), u.email.as_str()))
        .unwrap_or(("", ""));
    // Only an identity bottle set itself is ever removed.
    let had_identity = previous
        .and_then(|p| p.detail.get("identity"))
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let unset = if had_identity && name.is_empty() {
        "unset"
    } else {
        "keep"
    };
    let mut args: Vec<&str> = vec![&count];
    args.extend(remove.iter().map(String::as_str));
    args.extend([name, email, unset]);
    for (section, upstream) in &rewrites {
        args.push(section);
        args.push(upstream);
    }
    let user = Some(ctx.user());
    let script = format!(
        "export HOME={}\n{CONFIGURE}{}",
        sh_quote(&ctx.home()),
        probe(ctx)
    );
    let out = run_script_as(
        rt,
        ctx.machine,
        &entry.step,
        user,
        "configuring git",
        &script,
        &args,
        "the image needs `git`",
        ExecRequest::DEFAULT_TIMEOUT,
    )?;
    entry.digest = digest(&out);
    entry.paths = vec![format!("{}/.gitconfig", ctx.home())];
    entry
        .detail
        .insert("sections".into(), serde_json::json!(sections));
    entry
        .detail
        .insert("identity".into(), serde_json::json!(!name.is_empty()));
    Ok(Vec::new())
}

pub fn undo(entry: &LedgerEntry, ctx: &AgentCtx, rt: &dyn Runtime) -> StepResult<()> {
    let sections = entry.detail_strings("sections");
    let identity = entry
        .detail
        .get("identity")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let user = entry_user(entry, ctx);
    let mut script = format!("export HOME={}\n", sh_quote(&home_of(user)));
    script.push_str("for s in \"$@\"; do git config --global --remove-section \"$s\" 2>/dev/null || true; done\n");
    if identity {
        script.push_str("git config --global --unset user.name || true; git config --global --unset user.email || true\n");
    }
    let args: Vec<&str> = sections.iter().map(String::as_str).collect();
    run_script_as(
        rt,
        ctx.machine,
        &entry.step,
        Some(user),
        "removing the git configuration",
        &script,
        &args,
        "the image needs `git`",
        ExecRequest::DEFAULT_TIMEOUT,
    )?;
    Ok(())
}
