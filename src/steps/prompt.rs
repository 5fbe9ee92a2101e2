//! The prompt step: the system prompt file in the agent user's home, always
//! written (empty when no prompt is declared), mode 0600, owned by the user.

use super::{AgentCtx, GuestUser, StepError, StepResult, digest, run_as_agent, sh_quote, stage};
use crate::ledger::LedgerEntry;
use crate::manifest::Prompt;
use crate::runtime::Runtime;

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

/// The largest prompt file a probe hashes (sizes from `stat`, nothing
/// read): a larger one is the agent's (a sparse file of terabytes) and is
/// drift that the apply replaces. The manifests may not declare one as
/// large (the graph refuses it).
pub const PROBE_BYTES: u64 = 64 << 20;

pub fn probe(ctx: &AgentCtx) -> String {
    let f = sh_quote(&guest_path(ctx));
    format!(
        "if [ -f {f} ]; then stat -c '%a %u %g' {f}; bottle_s=$(stat -c %s {f}); \
         if [ \"$bottle_s\" -gt {PROBE_BYTES} ]; then echo \"over budget: $bottle_s bytes\"; \
         else sha256sum < {f}; fi; else echo missing; fi"
    )
}

const INSTALL: &str = r#"set -e
umask 077
d=$(dirname "$2")
mkdir -p "$d"
chmod 700 "$d"
cp "$1" "$2.tmp"
chmod 600 "$2.tmp"
mv -f "$2.tmp" "$2"
"#;

/// Returns the staged files for `record` to remove.
pub fn apply(
    ctx: &AgentCtx,
    user: GuestUser,
    rt: &dyn Runtime,
    entry: &mut LedgerEntry,
) -> StepResult<Vec<String>> {
    let path = guest_path(ctx);
    let staged = stage(rt, ctx.machine, &content(ctx)?, user)?;
    let out = run_as_agent(
        rt,
        ctx,
        &entry.step,
        ctx.user(),
        "writing the prompt file",
        &format!("{INSTALL}{}", probe(ctx)),
        &[&staged, &path],
        "check the agent user's home directory in the guest",
    )?;
    entry.digest = digest(&out);
    entry.paths = vec![path];
    Ok(vec![staged])
}
