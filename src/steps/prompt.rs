//! The prompt step: the system prompt file in the agent user's home, always
//! written (empty when no prompt is declared), mode 0600, owned by the user.

use super::{AgentCtx, GuestUser, StepError, StepResult, digest, run_script, sh_quote, upload};
use crate::ledger::LedgerEntry;
use crate::manifest::Prompt;
use crate::runtime::{CopyOptions, Runtime};

pub fn guest_path(ctx: &AgentCtx) -> String {
    format!("{}/.bottle/prompt.md", ctx.home())
}

/// The prompt text the agent should get.
pub fn content(ctx: &AgentCtx) -> StepResult<Vec<u8>> {
    match &ctx.agent.prompt {
        Prompt::None => Ok(Vec::new()),
        Prompt::Text(t) => Ok(t.clone().into_bytes()),
        Prompt::File(p) => std::fs::read(p).map_err(|e| {
            StepError::Other(
                format!("cannot read prompt file {}: {e}", p.display()),
                "check that the file exists and is readable".into(),
            )
        }),
    }
}

pub fn probe(ctx: &AgentCtx) -> String {
    let f = sh_quote(&guest_path(ctx));
    format!("if [ -f {f} ]; then stat -c '%a %u %g' {f}; sha256sum < {f}; else echo missing; fi")
}

pub fn apply(
    ctx: &AgentCtx,
    user: GuestUser,
    rt: &dyn Runtime,
    entry: &mut LedgerEntry,
) -> StepResult<()> {
    let path = guest_path(ctx);
    let bytes = content(ctx)?;
    upload(
        rt,
        ctx.machine,
        &bytes,
        &path,
        &CopyOptions {
            mode: 0o600,
            uid: user.uid,
            gid: user.gid,
        },
    )?;
    // The copy creates `.bottle` as root; the user must own its own dir.
    let dir = format!("{}/.bottle", ctx.home());
    let out = run_script(
        rt,
        ctx.machine,
        "setting the prompt file's owner",
        &format!("chown \"$1\" \"$2\" && chmod 700 \"$2\" && {}", probe(ctx)),
        &[&format!("{}:{}", user.uid, user.gid), &dir],
        "check the agent user's home directory in the guest",
    )?;
    entry.digest = digest(&out);
    entry.paths = vec![path];
    Ok(())
}

pub fn undo(entry: &LedgerEntry, ctx: &AgentCtx, rt: &dyn Runtime) -> StepResult<()> {
    let args: Vec<&str> = entry.paths.iter().map(String::as_str).collect();
    run_script(
        rt,
        ctx.machine,
        "removing the prompt file",
        "rm -f \"$@\"",
        &args,
        "check the guest",
    )?;
    Ok(())
}
