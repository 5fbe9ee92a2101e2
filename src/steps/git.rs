//! The git step: the agent user's `~/.gitconfig` rewrites every remote's
//! upstream URL to the gateway (`url.<gateway>/<name>.git.insteadOf`) and
//! sets the commit identity. Other settings in the file are left alone.

use super::{AgentCtx, Recorded, Step, StepCx, StepResult, Work, digest, entry_user, sh_quote};
use crate::ledger::LedgerEntry;
use crate::runtime::smolvm::AS_USER;

pub struct GitStep;

/// What git will actually use, as the agent user, outside any repository
/// (so every config file git reads for that user counts: the system's,
/// `~/.config/git/config`, `~/.gitconfig`, whatever they include): per
/// declared upstream, the URL `git ls-remote --get-url` resolves it to;
/// then the identity, when the manifest declares one. `$1` is `identity`
/// or `none`, the upstreams follow. Each git call is bounded in time (a
/// config that includes `/dev/zero` must not hang the probe).
const REPORT: &str = r#"cd / || exit 1
t=; if timeout 10 true >/dev/null 2>&1; then t="timeout 10"; fi
want="$1"; shift
for u in "$@"; do printf 'url %s %s\n' "$u" "$($t git ls-remote --get-url -- "$u" 2>/dev/null || echo '?')"; done
if [ "$want" = identity ]; then
  printf 'name %s\nemail %s\n' "$($t git config user.name 2>/dev/null)" "$($t git config user.email 2>/dev/null)"
fi
"#;

/// Runs [`REPORT`] as the agent user (the probe runs as root).
pub fn probe(ctx: &AgentCtx) -> String {
    let mut args = vec![identity_arg(ctx).to_owned()];
    args.extend(rewrites(ctx).into_iter().map(|(_, upstream)| upstream));
    let args: Vec<String> = args.iter().map(|a| sh_quote(a)).collect();
    format!(
        "HOME={} sh -c {} {} sh -c {} sh {}",
        sh_quote(&ctx.home()),
        sh_quote(AS_USER),
        sh_quote(ctx.user()),
        sh_quote(REPORT),
        args.join(" ")
    )
}

fn identity<'a>(ctx: &AgentCtx<'a>) -> Option<(&'a str, &'a str)> {
    ctx.bottle
        .spec
        .git
        .as_ref()
        .and_then(|g| g.user.as_ref())
        .map(|u| (u.name.as_str(), u.email.as_str()))
}

fn identity_arg(ctx: &AgentCtx) -> &'static str {
    if identity(ctx).is_some() {
        "identity"
    } else {
        "none"
    }
}

/// What [`probe`] prints when git uses what the manifest declares: every
/// upstream resolves to its remote on the gateway.
pub fn expected_probe(ctx: &AgentCtx) -> String {
    let mut out = String::new();
    for (section, upstream) in rewrites(ctx) {
        let base = section.strip_prefix("url.").unwrap_or(&section);
        out.push_str(&format!("url {upstream} {base}\n"));
    }
    if let Some((name, email)) = identity(ctx) {
        out.push_str(&format!("name {name}\nemail {email}\n"));
    }
    out
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

/// Exit status of [`CONFIGURE`] when git still resolves something else.
const NOT_CONVERGED: i32 = 3;

const CONFIGURE: &str = r#"set -e
# $1: number of old sections, then the old sections; then user name and
# email (empty: leave alone), then "unset" when bottle set an identity that
# the manifest no longer declares; then section/upstream pairs.
# A global config git cannot read in bounded time (a link to /dev/zero, a
# FIFO, a sparse file of terabytes) is the agent's doing: moved aside, so
# git reads a fresh one.
for f in "$HOME/.gitconfig" "$HOME/.config/git/config"; do
  if [ -L "$f" ] || { [ -e "$f" ] && { [ ! -f "$f" ] || [ "$(stat -c %s "$f")" -gt 1048576 ]; }; }; then
    mv -f "$f" "$f.bottle-unreadable"
  fi
done
n="$1"; shift
while [ "$n" -gt 0 ]; do git config --global --remove-section "$1" 2>/dev/null || true; shift; n=$((n-1)); done
name="$1"; email="$2"; unset_identity="$3"; shift 3
# Another file git reads for this user (~/.config/git/config, an include)
# may set what bottle sets: only ~/.gitconfig's values may stand.
others() {
  git config --show-origin --name-only "$@" 2>/dev/null | while IFS= read -r line; do
    origin=${line%%	*}; key=${line#*	}
    case "$origin" in file:*) printf '%s\t%s\n' "${origin#file:}" "$key" ;; esac
  done
}
for key in name email; do
  eval "value=\$$key"
  [ -n "$value" ] || continue
  others --get-regexp "^user\.$key\$" | while IFS='	' read -r file k; do
    [ "$file" = "$HOME/.gitconfig" ] || git config --file "$file" --unset-all "$k" || true
  done
  git config --global --replace-all "user.$key" "$value"
done
if [ "$unset_identity" = unset ]; then git config --global --unset-all user.name || true; git config --global --unset-all user.email || true; fi
s=; for x in "$@"; do
  if [ -z "$s" ]; then s=$x; continue; fi
  git config --global --add "$s.insteadOf" "$x"; s=
done
# Any other rewrite of a declared upstream, in any file git reads for this
# user, goes: git takes the first of equally long matches, so one read
# before ~/.gitconfig (or before bottle's line in it) would win.
s=; for x in "$@"; do
  if [ -z "$s" ]; then s=$x; continue; fi
  others --fixed-value --get-regexp '^url\..*\.insteadof$' "$x" | while IFS='	' read -r file k; do
    [ "$k" = "$s.insteadof" ] || git config --file "$file" --fixed-value --unset-all "$k" "$x" || true
  done
  s=
done
# Verified with the query the probe makes: recorded only if git agrees.
cd /
s=; bad=0; for x in "$@"; do
  if [ -z "$s" ]; then s=$x; continue; fi
  got=$(git ls-remote --get-url -- "$x" 2>/dev/null || true)
  if [ "$got" != "${s#url.}" ]; then echo "git resolves $x to ${got:-nothing}, not ${s#url.}" >&2; bad=1; fi
  s=
done
for key in name email; do
  eval "value=\$$key"
  [ -n "$value" ] || continue
  got=$(git config "user.$key" 2>/dev/null || true)
  if [ "$got" != "$value" ]; then echo "git's user.$key is ${got:-unset}, not $value" >&2; bad=1; fi
done
[ "$bad" = 0 ] || exit 3
"#;

/// Root: the user configures its own files (exit status [`NOT_CONVERGED`]
/// when git still resolves a declared upstream elsewhere).
const APPLY: &str = r#"body=$1; shift
bottle_as "$bottle_user" "$body" "$@"
"#;

impl Step for GitStep {
    fn noun(&self) -> String {
        "git configuration".into()
    }

    fn probe(&self, ctx: &AgentCtx) -> Option<String> {
        Some(probe(ctx))
    }

    fn drift_path(&self, ctx: &AgentCtx) -> String {
        format!("{}/.gitconfig", ctx.home())
    }

    fn in_home(&self) -> bool {
        true
    }

    fn apply(&self, cx: &StepCx, entry: &mut LedgerEntry) -> StepResult<Work> {
        let ctx = cx.ctx;
        let previous = cx.previous;
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
        let (name, email) = identity(ctx).unwrap_or(("", ""));
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
        let mut args: Vec<String> = vec![CONFIGURE.to_owned(), remove.len().to_string()];
        args.extend(remove);
        args.extend([name.to_owned(), email.to_owned(), unset.to_owned()]);
        for (section, upstream) in &rewrites {
            args.push(section.clone());
            args.push(upstream.clone());
        }
        entry.paths = vec![format!("{}/.gitconfig", ctx.home())];
        entry
            .detail
            .insert("sections".into(), serde_json::json!(sections));
        entry
            .detail
            .insert("identity".into(), serde_json::json!(!name.is_empty()));
        let help = format!(
            "the image needs `git` (2.30 or later); when git still resolves a declared remote \
             elsewhere (exit status {NOT_CONVERGED}), a git config file of user {} that bottle \
             cannot change sets it: see `git config --show-origin --get-regexp 'url|user'` as \
             that user",
            ctx.user()
        );
        // Verified in the guest with the probe's own query: recorded as
        // what the probe prints when git uses what the manifest declares.
        Ok(Work::new("configuring git", &help, APPLY)
            .args(args)
            .recorded(Recorded::Known(digest(&expected_probe(ctx)))))
    }

    fn undo(&self, cx: &StepCx, entry: &LedgerEntry) -> StepResult<Work> {
        let sections = entry.detail_strings("sections");
        let identity = entry
            .detail
            .get("identity")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let mut body = "for s in \"$@\"; do git config --global --remove-section \"$s\" 2>/dev/null || true; done\n".to_owned();
        if identity {
            body.push_str("git config --global --unset user.name || true; git config --global --unset user.email || true\n");
        }
        let mut args = vec![entry_user(entry, cx.ctx).to_owned(), body];
        args.extend(sections);
        Ok(Work::new(
            "removing the git configuration",
            "the image needs `git`",
            "u=$1; body=$2; shift 2; bottle_as \"$u\" \"$body\" \"$@\"",
        )
        .args(args))
    }
}

#[cfg(test)]
mod tests {
    //! CONFIGURE and REPORT run for real on the host's `sh` and `git`, in a
    //! temporary home.

    use super::*;
    use crate::steps::tests::{output, sh, text};
    use std::path::Path;

    const UP: &str = "git@github.com:acme/app.git";
    const SECTION: &str = "url.http://10.8.0.2:9418/app.git";

    fn in_home(home: &Path, script: &str, args: &[&str]) -> std::process::Output {
        let mut command = sh(script, args);
        command
            .env("HOME", home)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("GIT_CONFIG_GLOBAL");
        output(command)
    }

    fn configure(home: &Path) -> std::process::Output {
        in_home(
            home,
            CONFIGURE,
            &["0", "E2E Bot", "bot@example.com", "keep", SECTION, UP],
        )
    }

    fn report(home: &Path) -> String {
        let out = in_home(home, REPORT, &["identity", UP]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    }

    const CONVERGED: &str = "url git@github.com:acme/app.git http://10.8.0.2:9418/app.git\nname E2E Bot\nemail bot@example.com\n";

    #[test]
    fn rewrites_in_every_file_git_reads_are_seen_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path();
        let out = configure(home);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(report(home), CONVERGED);

        // The agent's own rewrites of the declared upstream: in the XDG
        // file (read before ~/.gitconfig), and in a file ~/.gitconfig
        // includes, with an identity of its own.
        std::fs::create_dir_all(home.join(".config/git")).unwrap();
        std::fs::write(
            home.join(".config/git/config"),
            format!("[url \"http://evil/x\"]\n\tinsteadOf = {UP}\n[user]\n\tname = Mallory\n"),
        )
        .unwrap();
        let inc = home.join("inc");
        std::fs::write(
            &inc,
            format!("[url \"http://evil 2/\"]\n\tinsteadOf = {UP}\n\tinsteadOf = https://keep.example/\n[user]\n\temail = m@evil\n"),
        )
        .unwrap();
        let mut gitconfig = std::fs::read_to_string(home.join(".gitconfig")).unwrap();
        gitconfig.push_str(&format!("[include]\n\tpath = {}\n", inc.display()));
        std::fs::write(home.join(".gitconfig"), gitconfig).unwrap();
        assert_eq!(
            report(home),
            "url git@github.com:acme/app.git http://evil/x\nname E2E Bot\nemail m@evil\n"
        );

        let out = configure(home);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(report(home), CONVERGED);
        // Only what conflicted went: the agent's other rewrite stays.
        let inc = std::fs::read_to_string(&inc).unwrap();
        assert!(inc.contains("https://keep.example/"), "{inc}");
        assert!(!inc.contains(UP), "{inc}");
    }

    #[test]
    fn a_global_config_git_cannot_read_in_bounded_time_is_moved_aside() {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path();
        std::fs::create_dir_all(home.join(".config/git")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", home.join(".gitconfig")).unwrap();
        std::fs::File::create(home.join(".config/git/config"))
            .unwrap()
            .set_len(2 << 40)
            .unwrap();
        // Bounded here too: without the guard git would read for ever.
        let out = in_home(
            home,
            "s=\"$1\"; shift; exec timeout 60 sh -c \"$s\" sh \"$@\"",
            &[
                CONFIGURE,
                "0",
                "E2E Bot",
                "bot@example.com",
                "keep",
                SECTION,
                UP,
            ],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(report(home), CONVERGED);
        assert!(home.join(".gitconfig.bottle-unreadable").is_symlink());
        assert!(home.join(".config/git/config.bottle-unreadable").exists());
    }

    #[test]
    fn a_rewrite_bottle_cannot_remove_fails_the_step() {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path();
        // A file git reads that the apply cannot change: here, an include
        // whose name git quotes in its origin (a real guest: a file owned
        // by someone else).
        let odd = home.join("odd\"name");
        std::fs::write(
            &odd,
            format!("[url \"http://evil/x\"]\n\tinsteadOf = {UP}\n"),
        )
        .unwrap();
        std::fs::write(
            home.join(".gitconfig"),
            format!(
                "[include]\n\tpath = \"{}\"\n",
                odd.display().to_string().replace('"', "\\\"")
            ),
        )
        .unwrap();
        let out = configure(home);
        assert_eq!(
            out.status.code(),
            Some(NOT_CONVERGED),
            "{}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains(&format!("git resolves {UP} to http://evil/x")),
            "{}",
            text(&out.stderr)
        );
    }
}
