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

/// What a probe may read of an agent's skills, in all: bytes of file
/// content hashed, and entries listed. The manifests may not declare more
/// (the graph refuses it); a guest holding more is the agent's doing (a
/// 2 TiB sparse file, a million files) and is drift, not a probe that
/// hashes for minutes and fails, so `apply` replaces the skills whole.
pub const PROBE_BYTES: u64 = 256 << 20;
pub const PROBE_ENTRIES: u64 = 100_000;

/// Per skill: every entry's mode and type, then every file's content hash,
/// so an edited, added or removed file, directory or link all show. Sizes
/// come first, from `stat` (nothing read): over the budget, the probe says
/// so and hashes nothing.
pub fn probe(ctx: &AgentCtx) -> String {
    let dir = skills_dir(ctx);
    let dirs: Vec<String> = names(ctx)
        .iter()
        .map(|name| sh_quote(&format!("{dir}/{name}")))
        .collect();
    let listing = names(ctx)
        .iter()
        .zip(&dirs)
        .map(|(name, d)| {
            format!(
                "echo {n}; if [ -d {d} ]; then (cd {d} && find . -exec stat -c '%a %F %n' {{}} + | LC_ALL=C sort; \
                 find . -type f -exec sha256sum {{}} + | LC_ALL=C sort -k2); else echo missing; fi",
                n = sh_quote(&format!("== {name}"))
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let dirs = dirs.join(" ");
    format!(
        "bottle_n=$(for d in {dirs}; do [ -d \"$d\" ] && find \"$d\"; done | head -n {over} | wc -l); \
         bottle_b=0; if [ \"$bottle_n\" -le {PROBE_ENTRIES} ]; then \
         bottle_b=$(for d in {dirs}; do [ -d \"$d\" ] && find \"$d\" -type f -exec stat -c %s {{}} +; done | awk '{{s+=$1}} END {{printf \"%.0f\\n\", s}}'); fi; \
         if [ \"$bottle_n\" -gt {PROBE_ENTRIES} ] || [ \"$bottle_b\" -gt {PROBE_BYTES} ]; then \
         echo \"over budget: $bottle_n entries, $bottle_b bytes\"; else {listing}; fi",
        over = PROBE_ENTRIES + 1,
    )
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
