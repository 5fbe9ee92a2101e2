//! The skills step: each skill directory copied whole to
//! `~/.claude/skills/<directory name>/`, a stale copy replaced whole, a
//! skill removed from the manifest deleted.

use super::{AgentCtx, GuestUser, StepResult, digest, run_script, sh_quote, upload_tree};
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

pub fn probe(ctx: &AgentCtx) -> String {
    let dir = skills_dir(ctx);
    names(ctx)
        .iter()
        .map(|name| {
            let d = sh_quote(&format!("{dir}/{name}"));
            format!(
                "echo {n}; if [ -d {d} ]; then (cd {d} && find . -type f -exec sha256sum {{}} + | LC_ALL=C sort -k2); else echo missing; fi",
                n = sh_quote(&format!("== {name}"))
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

const INSTALL: &str = r#"set -e
archive="$1"; dir="$2"; owner="$3"; shift 3
mkdir -p "$dir"
stage=$(mktemp -d "$dir/.bottle-stage.XXXXXX")
tar -xf "$archive" -C "$stage"
rm -f "$archive"
keep=1
for name in "$@"; do
  if [ "$name" = "--" ]; then keep=0; continue; fi
  rm -rf "${dir:?}/$name"
  if [ "$keep" = 1 ]; then mv "$stage/$name" "$dir/$name"; fi
done
rmdir "$stage"
chown "$owner" "$(dirname "$dir")" "$dir"
chown -R "$owner" "$dir"
"#;

pub fn apply(
    ctx: &AgentCtx,
    user: GuestUser,
    rt: &dyn Runtime,
    previous: Option<&LedgerEntry>,
    entry: &mut LedgerEntry,
) -> StepResult<()> {
    let names = names(ctx);
    let dir = skills_dir(ctx);
    let staged = format!("/tmp/bottle-skills-{}.tar", ctx.agent.name);
    upload_tree(rt, ctx.machine, &ctx.agent.skills, &staged)?;
    let removed: Vec<String> = previous
        .map(|p| p.detail_strings("skills"))
        .unwrap_or_default()
        .into_iter()
        .filter(|n| !names.contains(n))
        .collect();
    let owner = format!("{}:{}", user.uid, user.gid);
    let mut args: Vec<&str> = vec![&staged, &dir, &owner];
    args.extend(names.iter().map(String::as_str));
    args.push("--");
    args.extend(removed.iter().map(String::as_str));
    run_script(
        rt,
        ctx.machine,
        "installing skills",
        INSTALL,
        &args,
        "the image needs `tar` and `mktemp`",
    )?;
    let out = run_script(
        rt,
        ctx.machine,
        "probing skills",
        &probe(ctx),
        &[],
        "check the guest",
    )?;
    entry.digest = digest(&out);
    entry.paths = names.iter().map(|n| format!("{dir}/{n}")).collect();
    entry
        .detail
        .insert("skills".into(), serde_json::json!(names));
    Ok(())
}

pub fn undo(entry: &LedgerEntry, ctx: &AgentCtx, rt: &dyn Runtime) -> StepResult<()> {
    let args: Vec<&str> = entry.paths.iter().map(String::as_str).collect();
    run_script(
        rt,
        ctx.machine,
        "removing skills",
        "rm -rf \"$@\"",
        &args,
        "check the guest",
    )?;
    Ok(())
}
