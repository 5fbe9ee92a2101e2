//! The skills step: each skill directory copied whole to
//! `~/.claude/skills/<directory name>/`, a stale copy replaced whole, a
//! skill removed from the manifest deleted. Modes are kept, read-only
//! directories included: they are made writable only to be replaced.

use super::{AgentCtx, Payload, Recorded, Step, StepCx, StepResult, Work, sh_quote, tar_paths};
use crate::ledger::LedgerEntry;

pub struct SkillsStep;

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
    probe_trees(ctx, |name| sh_quote(&format!("{dir}/{name}")))
}

/// The probe over each skill's tree, at the directory `at(name)` names (a
/// shell word), within the budget.
fn probe_trees(ctx: &AgentCtx, at: impl Fn(&str) -> String) -> String {
    let dirs: Vec<String> = names(ctx).iter().map(|name| at(name)).collect();
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
/// `$3` counts the declared names that follow; the rest are removed. A
/// directory is moved (and removed) writable, then given its mode back;
/// the unpacked copy goes on any failure, and so do copies earlier runs
/// left behind.
const INSTALL: &str = r#"set -e
archive="$1"; dir="$2"; keep="$3"; shift 3
umask 022
mkdir -p "$dir"
for old in "$dir"/.bottle-stage.*; do
  if [ -e "$old" ]; then chmod -R u+w "$old" 2>/dev/null || true; rm -rf "$old"; fi
done
stage=$(mktemp -d "$dir/.bottle-stage.XXXXXX")
trap 'chmod -R u+w "$stage" 2>/dev/null; rm -rf "$stage"' EXIT
# The archive's permission bits as they are (the tree digest covers them):
# without this the agent's umask would decide them.
(umask 0 && tar -xpf "$archive" -C "$stage")
i=0
for name in "$@"; do
  i=$((i+1))
  if [ -e "$dir/$name" ] || [ -L "$dir/$name" ]; then
    chmod -R u+w "$dir/$name" 2>/dev/null || true
    rm -rf "${dir:?}/$name"
  fi
  if [ "$i" -le "$keep" ]; then
    mode=$(stat -c %a "$stage/$name")
    chmod u+w "$stage/$name"
    mv "$stage/$name" "$dir/$name"
    chmod "$mode" "$dir/$name"
  fi
done
"#;

/// Root, in the payload directory: the staged archive for the user, the
/// user's install; then the same archive unpacked privately, for the
/// recorded digest.
const APPLY: &str = r#"set -e
staged=$(bottle_stage skills.tar)
body=$1; shift
bottle_as "$bottle_user" "$body" "$staged" "$@"
mkdir tree && tar -xpof skills.tar -C tree
"#;

impl Step for SkillsStep {
    fn noun(&self) -> String {
        "skills".into()
    }

    fn probe(&self, ctx: &AgentCtx) -> Option<String> {
        Some(probe(ctx))
    }

    fn drift_path(&self, ctx: &AgentCtx) -> String {
        skills_dir(ctx)
    }

    fn in_home(&self) -> bool {
        true
    }

    fn apply(&self, cx: &StepCx, entry: &mut LedgerEntry) -> StepResult<Work> {
        let ctx = cx.ctx;
        let names = names(ctx);
        let dir = skills_dir(ctx);
        let archive = tar_paths(ctx.agent.skills.iter().map(|p| p.as_path()), 0)?;
        let removed: Vec<String> = cx
            .previous
            .map(|p| p.detail_strings("skills"))
            .unwrap_or_default()
            .into_iter()
            .filter(|n| !names.contains(n))
            .collect();
        let mut args = vec![INSTALL.to_owned(), dir.clone(), names.len().to_string()];
        args.extend(names.iter().cloned());
        args.extend(removed);
        entry.paths = names.iter().map(|n| format!("{dir}/{n}")).collect();
        entry
            .detail
            .insert("skills".into(), serde_json::json!(names));
        Ok(Work::new(
            "installing skills",
            "check the agent user's ~/.claude/skills in the guest; the error above says what failed",
            APPLY,
        )
        .file(Payload::new("skills.tar", archive, 0o600))
        .args(args)
        .recorded(Recorded::Expected(probe_trees(ctx, |name| {
            format!("\"$P\"/tree/{}", sh_quote(name))
        }))))
    }

    fn undo(&self, cx: &StepCx, entry: &LedgerEntry) -> StepResult<Work> {
        Ok(super::remove_owned_paths(cx.ctx, entry))
    }
}
