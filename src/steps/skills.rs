//! The skills step: each skill directory copied whole to
//! `~/.claude/skills/<directory name>/`, a stale copy replaced whole, a
//! skill removed from the manifest deleted.

use super::{AgentCtx, GuestUser, StepResult, digest, run_as_agent, sh_quote, stage_tree};
use crate::ledger::LedgerEntry;
use crate::runtime::Runtime;

pub fn skills_dir(ctx: &AgentCtx) -> String {
    format!("{}/.claude/skills", ctx.home())
}

/// Skill names in declaration order: each directory's own name.
pub fn names(ctx: &AgentCtx) -> Vec<String> {
    ctx.agent
        .skills
        .iter()
        .map(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect()
}

/// Per skill: every entry's mode and type, then every file's content hash,
/// so an edited, added or removed file, directory or link all show.
pub fn probe(ctx: &AgentCtx) -> String {
    let dir = skills_dir(ctx);
    names(ctx)
        .iter()
        .map(|name| {
            let d = sh_quote(&format!("{dir}/{name}"));
            format!(
                "echo {n}; if [ -d {d} ]; then (cd {d} && find . -exec stat -c '%a %F %n' {{}} + | LC_ALL=C sort; \
                 find . -type f -exec sha256sum {{}} + | LC_ALL=C sort -k2); else echo missing; fi",
                n = sh_quote(&format!("== {name}"))
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Run as the agent user: unpack into a fresh directory beside the skills,
/// then replace each declared skill whole and remove the ones that left.
/// `$3` counts the declared names that follow; the rest are removed.
const INSTALL: &str = r#"set -e
archive="$1"; dir="$2"; keep="$3"; shift 3
mkdir -p "$dir"
stage=$(mktemp -d "$dir/.bottle-stage.XXXXXX")
# The archive's permission bits as they are (the tree digest covers them):
# without this the agent's umask would decide them.
(umask 0 && tar -xf "$archive" -C "$stage")
i=0
for name in "$@"; do
  i=$((i+1))
  rm -rf "${dir:?}/$name"
  if [ "$i" -le "$keep" ]; then mv "$stage/$name" "$dir/$name"; fi
done
rmdir "$stage"
"#;

/// Returns the staged files for `record` to remove.
pub fn apply(
    ctx: &AgentCtx,
    user: GuestUser,
    rt: &dyn Runtime,
    previous: Option<&LedgerEntry>,
    entry: &mut LedgerEntry,
) -> StepResult<Vec<String>> {
    let names = names(ctx);
    let dir = skills_dir(ctx);
    let staged = stage_tree(rt, ctx.machine, &ctx.agent.skills, user)?;
    let removed: Vec<String> = previous
        .map(|p| p.detail_strings("skills"))
        .unwrap_or_default()
        .into_iter()
        .filter(|n| !names.contains(n))
        .collect();
    let keep = names.len().to_string();
    let mut args: Vec<&str> = vec![&staged, &dir, &keep];
    args.extend(names.iter().map(String::as_str));
    args.extend(removed.iter().map(String::as_str));
    let out = run_as_agent(
        rt,
        ctx,
        &entry.step,
        ctx.user(),
        "installing skills",
        &format!("{INSTALL}{}", probe(ctx)),
        &args,
        "the image needs `tar` and `mktemp`",
    )?;
    entry.digest = digest(&out);
    entry.paths = names.iter().map(|n| format!("{dir}/{n}")).collect();
    entry
        .detail
        .insert("skills".into(), serde_json::json!(names));
    Ok(vec![staged])
}
