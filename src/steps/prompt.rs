//! The prompt step: the system prompt file in the agent user's home, always
//! written (empty when no prompt is declared), mode 0600, owned by the user.

use super::{AgentCtx, Payload, Recorded, Step, StepCx, StepError, StepResult, Work, sh_quote};
use crate::ledger::LedgerEntry;
use crate::manifest::Prompt;

pub struct PromptStep;

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

/// The probe of the file at `f` (a shell word).
fn probe_file(f: &str) -> String {
    format!(
        "if [ -f {f} ]; then stat -c '%a %u %g' {f}; bottle_s=$(stat -c %s {f}); \
         if [ \"$bottle_s\" -gt {PROBE_BYTES} ]; then echo \"over budget: $bottle_s bytes\"; \
         else sha256sum < {f}; fi; else echo missing; fi"
    )
}

pub fn probe(ctx: &AgentCtx) -> String {
    probe_file(&sh_quote(&guest_path(ctx)))
}

/// Run by the agent user: `$1` the staged copy, `$2` the prompt file.
const INSTALL: &str = r#"set -e
umask 077
d=$(dirname "$2")
mkdir -p "$d"
chmod 700 "$d"
cp "$1" "$2.tmp"
chmod 600 "$2.tmp"
mv -f "$2.tmp" "$2"
"#;

/// Root, in the payload directory: the staged copy for the user, the
/// user's install; then a private copy made as the file should be (the
/// user's, 0600) for the recorded digest.
const APPLY: &str = r#"set -e
staged=$(bottle_stage prompt)
bottle_as "$bottle_user" "$2" "$staged" "$1"
cp prompt expected && chown "$bottle_uid:$bottle_gid" expected && chmod 600 expected
"#;

impl Step for PromptStep {
    fn noun(&self) -> String {
        "prompt".into()
    }

    fn probe(&self, ctx: &AgentCtx) -> Option<String> {
        Some(probe(ctx))
    }

    fn drift_path(&self, ctx: &AgentCtx) -> String {
        guest_path(ctx)
    }

    fn in_home(&self) -> bool {
        true
    }

    fn apply(&self, cx: &StepCx, entry: &mut LedgerEntry) -> StepResult<Work> {
        let path = guest_path(cx.ctx);
        entry.paths = vec![path.clone()];
        Ok(Work::new(
            "writing the prompt file",
            "check the agent user's home directory in the guest",
            APPLY,
        )
        .file(Payload::new("prompt", content(cx.ctx)?, 0o600))
        .args([path, INSTALL.to_owned()])
        .recorded(Recorded::Expected(probe_file("\"$P/expected\""))))
    }

    fn undo(&self, cx: &StepCx, entry: &LedgerEntry) -> StepResult<Work> {
        Ok(super::remove_owned_paths(cx.ctx, entry))
    }
}
