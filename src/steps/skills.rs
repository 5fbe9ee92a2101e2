//! The skills step: each skill directory copied whole to
//! `~/.claude/skills/<directory name>/`, a stale copy replaced whole, a
//! skill removed from the manifest deleted. Modes are kept, read-only
//! directories included: they are made writable only to be replaced.

use super::{
    AgentCtx, GuestUser, Payload, Recorded, Step, StepCx, StepResult, Work, sh_quote, tar_paths,
};
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

/// Per skill: every entry's mode, owner and type, then every file's
/// content hash, so an edited, added or removed file, directory or link, a
/// `chmod` or a `chown`, all show. Sizes come first, from `stat` (nothing
/// read): over the budget, the probe says so and hashes nothing. Nothing
/// is followed: a skill reached through a link at any level (`~/.claude
/// -> /`, a skill that is a link) is reported as such at once, not walked.
pub fn probe(ctx: &AgentCtx) -> String {
    probe_trees(&names(ctx), &sh_quote(&ctx.home()), SKILLS_REL)
}

/// The skills directory, under the home.
const SKILLS_REL: &str = ".claude/skills";

/// The probe over each skill's tree, at `base`/`rel`/<name> (`base` a
/// shell word), within the budget.
fn probe_trees(names: &[String], base: &str, rel: &str) -> String {
    let at = |name: &str| match rel {
        "" => name.to_owned(),
        rel => format!("{rel}/{name}"),
    };
    let enter = |name: &str| super::enter_without_links(base, &at(name));
    let each = |body: &str| {
        let mut all = vec![":".to_owned()];
        all.extend(
            names
                .iter()
                .map(|name| format!("({} && {body})", enter(name))),
        );
        all.join("; ")
    };
    let listing = names
        .iter()
        .map(|name| {
            format!(
                "echo {n}; (if {enter}; then find . -exec stat -c '%a %u %g %F %n' {{}} + | LC_ALL=C sort; \
                 find . -type f -exec sha256sum {{}} + | LC_ALL=C sort -k2; \
                 elif [ -e {p} ] || [ -L {p} ]; then echo 'not a directory, or reached through a link'; else echo missing; fi)",
                n = sh_quote(&format!("== {name}")),
                enter = enter(name),
                p = format!("{base}/{}", sh_quote(&at(name))),
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    format!(
        "bottle_n=$( ({entries}) | head -n {over} | wc -l); \
         bottle_z=0; if [ \"$bottle_n\" -le {PROBE_ENTRIES} ]; then \
         bottle_z=$( ({sizes}) | awk '{{s+=$1}} END {{printf \"%.0f\\n\", s}}'); fi; \
         if [ \"$bottle_n\" -gt {PROBE_ENTRIES} ] || [ \"$bottle_z\" -gt {PROBE_BYTES} ]; then \
         echo \"over budget: $bottle_n entries, $bottle_z bytes\"; else {listing}; fi",
        entries = each("find ."),
        sizes = each("find . -type f -exec stat -c %s {} +"),
        over = PROBE_ENTRIES + 1,
    )
}

/// What [`probe`] prints once the declared skills are installed, from the
/// host's copies (what the archive carries: modes kept, links not
/// followed), every entry the agent user's. `None` when a name holds what
/// the probe's lines cannot show plainly (a newline, a backslash) or a
/// copy cannot be read.
pub fn expected_probe(ctx: &AgentCtx, user: GuestUser) -> Option<String> {
    expected_trees(&names(ctx), &ctx.agent.skills, user)
}

/// What the probe prints for the skills `names`, copied from `paths`.
fn expected_trees(
    names: &[String],
    paths: &[std::path::PathBuf],
    user: GuestUser,
) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = String::new();
    for (name, path) in names.iter().zip(paths) {
        // A declared path that is a link is copied as what it names.
        let root = std::fs::canonicalize(path).ok()?;
        let mut entries = Vec::new();
        walk(&root, ".", &mut entries)?;
        let mut stats = Vec::new();
        let mut sums = Vec::new();
        for (rel, meta) in &entries {
            let kind = meta.file_type();
            let what = if kind.is_symlink() {
                "symbolic link"
            } else if kind.is_dir() {
                "directory"
            } else if kind.is_file() && meta.len() == 0 {
                "regular empty file"
            } else if kind.is_file() {
                "regular file"
            } else {
                return None;
            };
            stats.push(format!(
                "{:o} {} {} {what} {rel}\n",
                meta.mode() & 0o7777,
                user.uid,
                user.gid
            ));
            if kind.is_file() {
                let hash = super::sha256_hex(&std::fs::read(root.join(rel)).ok()?);
                sums.push((rel.clone(), format!("{hash}  {rel}\n")));
            }
        }
        stats.sort();
        sums.sort();
        out.push_str(&format!("== {name}\n"));
        out.extend(stats);
        out.extend(sums.into_iter().map(|(_, line)| line));
    }
    Some(out)
}

/// `dir`'s entries under `rel` (`.`, then `./a`, ...), links not followed.
fn walk(
    dir: &std::path::Path,
    rel: &str,
    out: &mut Vec<(String, std::fs::Metadata)>,
) -> Option<()> {
    let meta = std::fs::symlink_metadata(dir.join(rel)).ok()?;
    let is_dir = meta.is_dir();
    out.push((rel.to_owned(), meta));
    if is_dir {
        for entry in std::fs::read_dir(dir.join(rel)).ok()? {
            let name = entry.ok()?.file_name().into_string().ok()?;
            if name.contains(['\n', '\\']) {
                return None;
            }
            walk(dir, &format!("{rel}/{name}"), out)?;
        }
    }
    Some(())
}

/// Run as the agent user in its `~/.claude/skills` (made a plain
/// directory of its own first): unpack into a fresh directory beside the
/// skills, then replace each declared skill whole and remove the ones that
/// left. `$2` counts the declared names that follow; the rest are removed.
/// A directory is moved (and removed) writable, then given its mode back;
/// a link where a skill goes is removed, never followed; the unpacked copy
/// goes on any failure, and so do copies earlier runs left behind.
const INSTALL: &str = r#"archive="$1"; keep="$2"; shift 2
umask 022
bottle_rm() {
  if [ -L "$1" ]; then rm -f "$1"
  elif [ -e "$1" ]; then chmod -R u+rwX "$1" 2>/dev/null || true; rm -rf "$1"; fi
}
for old in ./.bottle-stage.*; do bottle_rm "$old"; done
stage=$(mktemp -d "$PWD/.bottle-stage.XXXXXX")
trap 'chmod -R u+rwX "$stage" 2>/dev/null; rm -rf "$stage"' EXIT
# The archive's permission bits as they are (the tree digest covers them):
# without this the agent's umask would decide them.
(umask 0 && tar -xpf "$archive" -C "$stage")
i=0
for name in "$@"; do
  i=$((i+1))
  bottle_rm "./$name"
  if [ "$i" -le "$keep" ]; then
    mode=$(stat -c %a "$stage/$name")
    chmod u+w "$stage/$name"
    mv "$stage/$name" "./$name"
    chmod "$mode" "./$name"
  fi
done
"#;

/// Root, in the payload directory: the staged archive for the user, the
/// user's install; then the same archive unpacked privately and given to
/// the agent user (set-id bits put back, which `chown` clears), for the
/// recorded digest.
const APPLY: &str = r#"set -e
staged=$(bottle_stage skills.tar)
body=$1; shift
bottle_as "$bottle_user" "$body" "$staged" "$@"
mkdir tree && tar -xpof skills.tar -C tree
find tree -type f \( -perm -4000 -o -perm -2000 \) -exec stat -c '%a %n' {} + > setid
chown -hR "$bottle_uid:$bottle_gid" tree
while read -r mode path; do chmod "$mode" "$path"; done < setid
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

    fn expected_output(&self, ctx: &AgentCtx, user: Option<GuestUser>) -> Option<String> {
        expected_probe(ctx, user?)
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
        let mut args = vec![
            super::in_home_dir(SKILLS_REL, INSTALL),
            names.len().to_string(),
        ];
        args.extend(names.iter().cloned());
        args.extend(removed);
        entry.paths = names.iter().map(|n| format!("{dir}/{n}")).collect();
        entry
            .detail
            .insert("skills".into(), serde_json::json!(names));
        Ok(
            Work::new("installing skills", &super::home_help(cx.ctx), APPLY)
                .file(Payload::new("skills.tar", archive, 0o600))
                .args(args)
                .recorded(Recorded::Expected(probe_trees(&names, "\"$P\"/tree", ""))),
        )
    }

    fn undo(&self, cx: &StepCx, entry: &LedgerEntry) -> StepResult<Work> {
        Ok(super::remove_owned_paths(cx.ctx, entry))
    }
}

#[cfg(test)]
mod tests {
    //! The probe runs for real on the host's `sh` over a home made in a
    //! temporary directory, and is compared with what the host computes.

    use super::*;
    use crate::steps::tests::{output, sh, text};
    use std::os::unix::fs::{PermissionsExt, symlink};
    use std::path::{Path, PathBuf};

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A skill on the host: nested directories, an empty file, a link, an
    /// executable and a read-only directory.
    fn host_skill(root: &Path) -> PathBuf {
        let skill = root.join("host/review");
        std::fs::create_dir_all(skill.join("notes/deep")).unwrap();
        std::fs::write(skill.join("SKILL.md"), "Review carefully.\n").unwrap();
        std::fs::write(skill.join("notes/empty"), "").unwrap();
        std::fs::write(skill.join("notes/deep/run.sh"), "#!/bin/sh\n").unwrap();
        chmod(&skill.join("notes/deep/run.sh"), 0o755);
        symlink("../SKILL.md", skill.join("notes/link")).unwrap();
        chmod(&skill.join("notes/deep"), 0o555);
        skill
    }

    /// `skill` installed at `home/.claude/skills/review` as the apply's
    /// archive carries it.
    fn install(skill: &Path, home: &Path) {
        let skills = home.join(".claude/skills");
        std::fs::create_dir_all(&skills).unwrap();
        let archive = tar_paths(std::iter::once(skill), 0).unwrap();
        let mut unpack = tar::Archive::new(archive.as_slice());
        unpack.set_preserve_permissions(true);
        unpack.unpack(&skills).unwrap();
    }

    fn run_probe(home: &Path) -> String {
        let names = ["review".to_owned()];
        let script = probe_trees(&names, &sh_quote(home.to_str().unwrap()), SKILLS_REL);
        let out = output(sh(&script, &[]));
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    }

    fn me() -> GuestUser {
        GuestUser {
            uid: rustix::process::getuid().as_raw(),
            gid: rustix::process::getgid().as_raw(),
        }
    }

    /// What the host computes is what the probe prints in the guest: were
    /// it not, `check` would report drift after every apply.
    #[test]
    fn the_host_computes_what_the_probe_prints() {
        let tmp = tempfile::tempdir().unwrap();
        let skill = host_skill(tmp.path());
        let home = tmp.path().join("home");
        install(&skill, &home);
        let expected = expected_trees(&["review".into()], &[skill], me()).unwrap();
        let uid = me().uid;
        assert!(
            expected.contains(&format!("555 {uid} {} directory ./notes/deep\n", me().gid)),
            "{expected}"
        );
        assert_eq!(run_probe(&home), expected);
    }

    /// Item b: the owner is part of what the probe shows.
    #[test]
    fn a_chown_in_the_guest_shows() {
        let tmp = tempfile::tempdir().unwrap();
        let skill = host_skill(tmp.path());
        let home = tmp.path().join("home");
        install(&skill, &home);
        let before = run_probe(&home);
        std::os::unix::fs::lchown(
            home.join(".claude/skills/review/SKILL.md"),
            Some(4242),
            Some(4242),
        )
        .unwrap();
        let after = run_probe(&home);
        assert_ne!(before, after);
        assert!(
            after.contains("644 4242 4242 regular file ./SKILL.md"),
            "{after}"
        );
    }

    /// Item c: a skill, the skills directory or `~/.claude` made a link to
    /// `/` is reported at once, never walked.
    #[test]
    fn a_link_at_any_level_is_reported_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let skill = host_skill(tmp.path());
        let home = tmp.path().join("home");
        install(&skill, &home);
        let expected = expected_trees(&["review".into()], &[skill], me()).unwrap();
        let skills = home.join(".claude/skills");
        let real = tmp.path().join("moved");
        std::fs::rename(skills.join("review"), &real).unwrap();
        for (link, target) in [
            (skills.join("review"), Path::new("/")),
            // A link to the very tree bottle installed is a link too.
            (skills.join("review"), real.as_path()),
        ] {
            symlink(target, &link).unwrap();
            let out = run_probe(&home);
            assert_eq!(
                out, "== review\nnot a directory, or reached through a link\n",
                "{target:?}"
            );
            assert_ne!(out, expected);
            std::fs::remove_file(&link).unwrap();
        }
        std::fs::rename(&real, skills.join("review")).unwrap();
        // Links higher up: `~/.claude/skills -> /` and `~/.claude -> /`,
        // where `/` holds a `review` too.
        let root = tmp.path().join("fake-root");
        std::fs::create_dir_all(root.join("skills/review")).unwrap();
        std::fs::create_dir_all(root.join("review")).unwrap();
        let claude = home.join(".claude");
        std::fs::rename(&claude, tmp.path().join("claude-moved")).unwrap();
        std::fs::create_dir(&claude).unwrap();
        for (link, target) in [
            (claude.join("skills"), root.clone()),
            (claude.clone(), root.clone()),
        ] {
            if link == claude {
                std::fs::remove_dir(&claude).unwrap();
            }
            symlink(&target, &link).unwrap();
            assert_eq!(
                run_probe(&home),
                "== review\nnot a directory, or reached through a link\n",
                "{link:?}"
            );
            std::fs::remove_file(&link).unwrap();
        }
        // Nothing there at all.
        assert_eq!(run_probe(&home), "== review\nmissing\n");
    }
}
