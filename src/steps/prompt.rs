//! The prompt step: the system prompt file in the agent user's home, always
//! written (empty when no prompt is declared), mode 0600, owned by the user.

use super::{
    AgentCtx, GuestUser, Payload, Recorded, Step, StepCx, StepError, StepResult, Work, sh_quote,
};
use crate::ledger::LedgerEntry;
use crate::manifest::Prompt;

pub struct PromptStep;

pub fn guest_path(ctx: &AgentCtx) -> String {
    format!("{}/{DIR}/{NAME}", ctx.home())
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

/// The probe of the file `name` in the directory `rel` under `base` (see
/// [`super::enter_without_links`]): a link at any level, or anything but
/// a regular file, is reported as such, never followed or read.
fn probe_file(base: &str, rel: &str, name: &str) -> String {
    let f = sh_quote(name);
    format!(
        "if {enter}; then \
         if [ -L {f} ]; then echo 'symbolic link'; elif [ -f {f} ]; then stat -c '%a %u %g' {f}; bottle_s=$(stat -c %s {f}); \
         if [ \"$bottle_s\" -gt {PROBE_BYTES} ]; then echo \"over budget: $bottle_s bytes\"; \
         else sha256sum < {f}; fi; elif [ -e {f} ]; then echo 'not a regular file'; else echo missing; fi; \
         else echo 'missing directory (or a link)'; fi",
        enter = super::enter_without_links(base, rel),
    )
}

/// What [`probe_file`] prints for the user's file holding `content`.
pub fn expected_probe(content: &[u8], user: GuestUser) -> String {
    format!(
        "600 {} {}\n{}  -\n",
        user.uid,
        user.gid,
        super::sha256_hex(content)
    )
}

/// Where the prompt file is, under the home.
const DIR: &str = ".bottle";
const NAME: &str = "prompt.md";

pub fn probe(ctx: &AgentCtx) -> String {
    probe_file(&sh_quote(&ctx.home()), DIR, NAME)
}

/// Run by the agent user in its `~/.bottle` (made a plain directory of its
/// own first): `$1` the staged copy. Whatever the agent put where the
/// file goes (a directory, a FIFO, a link) is replaced.
const INSTALL: &str = r#"chmod 700 .
for f in prompt.md.tmp prompt.md; do
  if [ -d "$f" ] && [ ! -L "$f" ]; then chmod -R u+rwX "./$f" 2>/dev/null || true; rm -rf "./$f"; fi
done
rm -f prompt.md.tmp
umask 077
cp "$1" prompt.md.tmp
chmod 600 prompt.md.tmp
mv -f prompt.md.tmp prompt.md
"#;

/// Root, in the payload directory: the staged copy for the user, the
/// user's install; then a private copy made as the file should be (the
/// user's, 0600) for the recorded digest.
const APPLY: &str = r#"set -e
staged=$(bottle_stage prompt)
bottle_as "$bottle_user" "$1" "$staged"
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

    /// The user's file, mode 0600, holding the declared prompt.
    fn expected_output(&self, ctx: &AgentCtx, user: Option<GuestUser>) -> Option<String> {
        let user = user?;
        let content = content(ctx).ok()?;
        Some(expected_probe(&content, user))
    }

    fn in_home(&self) -> bool {
        true
    }

    fn apply(&self, cx: &StepCx, entry: &mut LedgerEntry) -> StepResult<Work> {
        entry.paths = vec![guest_path(cx.ctx)];
        Ok(
            Work::new("writing the prompt file", &super::home_help(cx.ctx), APPLY)
                .file(Payload::new("prompt", content(cx.ctx)?, 0o600))
                .args([super::in_home_dir(DIR, INSTALL)])
                .recorded(Recorded::Expected(probe_file("\"$P\"", "", "expected"))),
        )
    }

    fn undo(&self, cx: &StepCx, entry: &LedgerEntry) -> StepResult<Work> {
        Ok(super::remove_owned_paths(cx.ctx, entry))
    }
}
