//! The git step: the agent user's `~/.gitconfig` rewrites every remote's
//! upstream URL to the gateway for fetch and push
//! (`url.<gateway>/<name>.git.insteadOf` and `.pushInsteadOf`) and sets the
//! commit identity; any other rewrite of a declared upstream, in whatever
//! file git may read for that user, goes. Other settings are left alone.
//! Everything runs as the agent user, bounded in time.

use super::{AgentCtx, Recorded, Step, StepCx, StepResult, Work, digest, entry_user, sh_quote};
use crate::ledger::LedgerEntry;
use crate::runtime::smolvm::AS_USER;

pub struct GitStep;

/// Shell functions the probe and the apply share, run as the agent user
/// (never as root: root reading a config file would follow the agent's
/// includes). Every git call is bounded in time, and git reads no config
/// file before `walk` found it to be a small regular file: a FIFO, a
/// device or a sparse file of terabytes the agent puts where git reads
/// (`~/.gitconfig`, `~/.config/git/config`, an include) is named at once,
/// never waited on.
const LIB: &str = r#"cd / || exit 1
bottle_t=; if timeout -s KILL 10 true >/dev/null 2>&1; then bottle_t="timeout -s KILL 10"; fi
tab=$(printf '\t')
nl='
'
gc=$HOME/.gitconfig
xdg=${XDG_CONFIG_HOME:-$HOME/.config}/git/config
g() { $bottle_t git "$@" 2>/dev/null; }
# git on one file only: every git command first reads the whole config
# (with its includes), which `--file` alone does not stop.
gf() { $bottle_t env GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null HOME=/nonexistent XDG_CONFIG_HOME=/nonexistent git config --file "$@" 2>/dev/null; }
# Why git cannot read $1 in bounded time; nothing when it can (or when $1
# does not exist: git skips it).
unreadable() {
  if [ -f "$1" ]; then
    bottle_s=$(stat -L -c %s "$1" 2>/dev/null) || { echo "bottle cannot stat it"; return; }
    [ "$bottle_s" -le 1048576 ] || echo "it is larger than 1 MiB"
  elif [ -e "$1" ]; then echo "it is not a regular file"
  fi
}
# Every config file git may read for this user, includes followed whatever
# their condition (to git's depth of 10, at most 100 files): $files, one a
# line; those git cannot read in bounded time: $bad, one
# "FILE<tab>WHY<tab>INCLUDING FILE<tab>KEY<tab>VALUE" a line (the last
# three empty for a file git reads of itself).
walk() {
  files=; bad=; bottle_n=0
  bottle_q="0$tab$xdg$tab$tab$tab$nl""0$tab$gc$tab$tab$tab$nl"
  [ -n "$GIT_CONFIG_NOSYSTEM" ] || bottle_q="0$tab/etc/gitconfig$tab$tab$tab$nl$bottle_q"
  while [ -n "$bottle_q" ]; do
    bottle_i=${bottle_q%%"$nl"*}; bottle_q=${bottle_q#*"$nl"}
    bottle_d=${bottle_i%%"$tab"*}; bottle_r=${bottle_i#*"$tab"}
    f=${bottle_r%%"$tab"*}; from=${bottle_r#*"$tab"}
    case "$nl$files" in *"$nl$f$nl"*) continue ;; esac
    bottle_n=$((bottle_n+1)); [ $bottle_n -le 100 ] || break
    why=$(unreadable "$f")
    bottle_k=
    if [ -z "$why" ] && [ -f "$f" ]; then
      bottle_k=$(gf "$f" --name-only --get-regexp '^include(if\..*)?\.path$')
      case $? in 124|137) why="git did not read it within 10 seconds" ;; esac
      bottle_k=$(printf '%s\n' "$bottle_k" | sort -u)
    fi
    if [ -n "$why" ]; then bad="$bad$f$tab$why$tab$from$nl"; continue; fi
    [ -f "$f" ] || continue
    files="$files$f$nl"
    [ "$bottle_d" -lt 10 ] || continue
    while IFS= read -r k; do
      [ -n "$k" ] || continue
      bottle_v=$(gf "$f" --get-all "$k")
      while IFS= read -r v; do
        case $v in
          '') continue ;;
          "~") p=$HOME ;;
          "~/"*) p=$HOME/${v#"~/"} ;;
          /*) p=$v ;;
          "~"*) continue ;;
          *) p=${f%/*}/$v ;;
        esac
        bottle_q="$bottle_q$((bottle_d+1))$tab$p$tab$f$tab$k$tab$v$nl"
      done <<BOTTLE_V
$bottle_v
BOTTLE_V
    done <<BOTTLE_K
$bottle_k
BOTTLE_K
  done
}
# The rewrites of a declared upstream other than bottle's own (its section
# in ~/.gitconfig), in every file of $files: one
# "FILE<tab>KEY<tab>UPSTREAM" a line. "$@": section/upstream pairs.
others() {
  while IFS= read -r bottle_f; do
    [ -n "$bottle_f" ] || continue
    bottle_s=; for bottle_x in "$@"; do
      if [ -z "$bottle_s" ]; then bottle_s=$bottle_x; continue; fi
      bottle_k=$(gf "$bottle_f" --name-only --fixed-value --get-regexp '^url\..*\.(push)?insteadof$' "$bottle_x")
      while IFS= read -r k; do
        [ -n "$k" ] || continue
        if [ "$bottle_f" = "$gc" ] && { [ "$k" = "$bottle_s.insteadof" ] || [ "$k" = "$bottle_s.pushinsteadof" ]; }; then continue; fi
        printf '%s\t%s\t%s\n' "$bottle_f" "$k" "$bottle_x"
      done <<BOTTLE_K
$bottle_k
BOTTLE_K
      bottle_s=
    done
  done <<BOTTLE_F
$files
BOTTLE_F
}
# Where git pushes $1, asked of git itself: as the URL of a remote under a
# name no config file can know in advance, in an empty repository of the
# report's own ($bottle_g) (`git ls-remote --get-url` shows only where it
# fetches from; `pushInsteadOf` may send pushes elsewhere).
push_url() {
  bottle_o=$($bottle_t env GIT_DIR="$bottle_g" git -c "remote.$bottle_name.url=$1" remote -v 2>/dev/null) || { echo '?'; return; }
  while IFS= read -r l; do
    case $l in "$bottle_name$tab"*" (push)") l=${l#*"$tab"}; printf '%s\n' "${l% (push)}"; return ;; esac
  done <<BOTTLE_O
$bottle_o
BOTTLE_O
  echo '?'
}
# What git will use, as this user, outside any repository: the files it
# cannot read in bounded time (then nothing else: every git call would
# wait on them); the rewrites of declared upstreams besides bottle's; per
# upstream, where it fetches from (`git ls-remote --get-url`) and where it
# pushes; then the identity. $1: identity or none; then section/upstream
# pairs.
report() {
  bottle_w=$1; shift
  walk
  if [ -n "$bad" ]; then
    printf '%s' "$bad" | cut -f1,2 | sort -u | sed "s/^/unreadable$tab/"
    return
  fi
  others "$@" | sed "s/^/rewrite$tab/"
  bottle_g=$(mktemp -d 2>/dev/null) && mkdir "$bottle_g/objects" "$bottle_g/refs" && echo 'ref: refs/heads/main' > "$bottle_g/HEAD" || bottle_g=/nonexistent
  bottle_name=bottle$(od -An -N8 -tx1 /dev/urandom 2>/dev/null | tr -d ' \n')
  bottle_s=; for bottle_x in "$@"; do
    if [ -z "$bottle_s" ]; then bottle_s=$bottle_x; continue; fi
    printf 'url %s %s\n' "$bottle_x" "$(g ls-remote --get-url -- "$bottle_x" || echo '?')"
    printf 'push %s %s\n' "$bottle_x" "$(push_url "$bottle_x")"
    bottle_s=
  done
  [ "$bottle_g" = /nonexistent ] || rm -rf "$bottle_g"
  if [ "$bottle_w" = identity ]; then
    printf 'name %s\nemail %s\n' "$(g config user.name)" "$(g config user.email)"
  fi
}
"#;

/// The probe: [`report`](LIB) as the agent user.
fn report_script() -> String {
    format!("{LIB}report \"$@\"\n")
}

/// Runs [`report_script`] as the agent user (the probe runs as root, and
/// root reads no file of the agent's).
pub fn probe(ctx: &AgentCtx) -> String {
    let mut args = vec![identity_arg(ctx).to_owned()];
    for (section, upstream) in rewrites(ctx) {
        args.push(section);
        args.push(upstream);
    }
    let args: Vec<String> = args.iter().map(|a| sh_quote(a)).collect();
    format!(
        "HOME={} sh -c {} {} sh -c {} sh {}",
        sh_quote(&ctx.home()),
        sh_quote(AS_USER),
        sh_quote(ctx.user()),
        sh_quote(&report_script()),
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
/// upstream is fetched from and pushed to its remote on the gateway, and no
/// other rewrite of it is left anywhere git reads.
pub fn expected_probe(ctx: &AgentCtx) -> String {
    let mut out = String::new();
    for (section, upstream) in rewrites(ctx) {
        let base = section.strip_prefix("url.").unwrap_or(&section);
        out.push_str(&format!("url {upstream} {base}\npush {upstream} {base}\n"));
    }
    if let Some((name, email)) = identity(ctx) {
        out.push_str(&format!("name {name}\nemail {email}\n"));
    }
    out
}

/// What a drift of the git step is reported by, from its probe section as
/// observed: the files holding what git cannot read in bounded time or
/// another rewrite of a declared upstream, else `~/.gitconfig` (bottle's
/// own lines changed). Names come from the guest: control characters are
/// shown escaped, and at most a few are named.
/// ([`Step::drift_cause`]).
pub fn drift_cause(home: &str, observed: &str) -> String {
    const MAX: usize = 3;
    let mut causes: Vec<String> = Vec::new();
    let mut more = 0;
    for line in observed.lines() {
        let mut fields = line.split('\t');
        let cause = match (fields.next(), fields.next(), fields.next()) {
            (Some("unreadable"), Some(file), Some(why)) => {
                format!(
                    "{} ({why}: git cannot read it in bounded time)",
                    shown(file)
                )
            }
            // The key is left out: its URL may hold a credential.
            (Some("rewrite"), Some(file), Some(_key)) => format!(
                "{} (another rewrite of {})",
                shown(file),
                shown(fields.next().unwrap_or_default())
            ),
            _ => continue,
        };
        if causes.contains(&cause) {
            continue;
        }
        if causes.len() == MAX {
            more += 1;
        } else {
            causes.push(cause);
        }
    }
    if causes.is_empty() {
        return format!("{home}/.gitconfig");
    }
    let mut text = causes.join(", ");
    if more > 0 {
        text.push_str(&format!(" and {more} more"));
    }
    text
}

/// A guest-chosen name for a terminal: control characters escaped, cut
/// at 200 characters.
fn shown(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if i == 200 {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
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

/// Exit status of [`configure_script`] when git still uses something else.
const NOT_CONVERGED: i32 = 3;

/// The apply, as the agent user, after [`LIB`]. `$1`: the number of old
/// sections, then the old sections; then user name and email (empty: leave
/// alone), then "unset" when bottle set an identity that the manifest no
/// longer declares; then section/upstream pairs.
const CONFIGURE: &str = r#"n=$1; shift
while [ "$n" -gt 0 ]; do bottle_old="$bottle_old$1$nl"; shift; n=$((n-1)); done
name=$1; email=$2; unset_identity=$3; shift 3
# What git cannot read in bounded time is the agent's doing: ~/.gitconfig
# or ~/.config/git/config moved aside, an include's line taken out of the
# file that has it, so git reads the rest.
walk
printf '%s' "$bad" | while IFS= read -r l; do
  f=${l%%"$tab"*}; r=${l#*"$tab"}; r=${r#*"$tab"}
  parent=${r%%"$tab"*}; r=${r#*"$tab"}; key=${r%%"$tab"*}; value=${r#*"$tab"}
  if [ -n "$parent" ]; then gf "$parent" --fixed-value --unset-all "$key" "$value"
  elif [ "$f" = "$gc" ] || [ "$f" = "$xdg" ]; then mv -f "$f" "$f.bottle-unreadable" 2>/dev/null
  fi
done
# An include named in a file the user cannot change (the image's
# /etc/gitconfig): the file it names is moved aside, if the user can.
walk
printf '%s' "$bad" | cut -f1 | sort -u | while IFS= read -r f; do [ -d "$f" ] || mv -f "$f" "$f.bottle-unreadable" 2>/dev/null; done
walk
while IFS= read -r s; do [ -z "$s" ] || gf "$gc" --remove-section "$s"; done <<BOTTLE_OLD
$bottle_old
BOTTLE_OLD
# Another file git reads for this user (~/.config/git/config, an include)
# may set what bottle sets: only ~/.gitconfig's values may stand.
for key in name email; do
  eval "value=\$$key"
  [ -n "$value" ] || continue
  while IFS= read -r f; do
    [ -n "$f" ] && [ "$f" != "$gc" ] && [ "$f" != /etc/gitconfig ] || continue
    [ -z "$(gf "$f" --get-all "user.$key")" ] || gf "$f" --unset-all "user.$key"
  done <<BOTTLE_F
$files
BOTTLE_F
  gf "$gc" --replace-all "user.$key" "$value"
done
if [ "$unset_identity" = unset ]; then gf "$gc" --unset-all user.name; gf "$gc" --unset-all user.email; fi
s=; for x in "$@"; do
  if [ -z "$s" ]; then s=$x; continue; fi
  gf "$gc" --add "$s.insteadOf" "$x"
  gf "$gc" --add "$s.pushInsteadOf" "$x"
  s=
done
# Any other rewrite of a declared upstream, in any file git may read for
# this user, goes: git takes the first of equally long matches, so one
# read before bottle's would win, and a `pushInsteadOf` of any length
# decides where pushes go.
walk
others "$@" | while IFS="$tab" read -r f k x; do gf "$f" --fixed-value --unset-all "$k" "$x"; done
# Verified with the probe's own report: recorded only if git agrees.
if [ -n "$name" ]; then want=identity; else want=none; fi
out=$(report "$want" "$@")
fail=0
# URLs in messages without their credentials (the gate's is in bottle's).
hide() { printf '%s' "$1" | sed 's#://[^/@]*@#://***@#'; }
while IFS= read -r l; do
  case $l in
    unreadable"$tab"*) l=${l#*"$tab"}; echo "git cannot read ${l%%"$tab"*} in bounded time: ${l#*"$tab"}" >&2; fail=1 ;;
    rewrite"$tab"*) l=${l#*"$tab"}; f=${l%%"$tab"*}; l=${l#*"$tab"}
      echo "$(hide "${l%%"$tab"*}") = ${l#*"$tab"} in $f: user $(id -un 2>/dev/null) cannot remove it" >&2; fail=1 ;;
  esac
done <<BOTTLE_OUT
$out
BOTTLE_OUT
got() {
  while IFS= read -r l; do case $l in "$1 "*) printf '%s' "${l#"$1 "}"; return ;; esac; done <<BOTTLE_OUT
$out
BOTTLE_OUT
}
s=; for x in "$@"; do
  if [ -z "$s" ]; then s=$x; continue; fi
  r=$(got "url $x"); [ "$r" = "${s#url.}" ] || { echo "git resolves $x to $(hide "${r:-nothing}"), not $(hide "${s#url.}")" >&2; fail=1; }
  r=$(got "push $x"); [ "$r" = "${s#url.}" ] || { echo "git pushes $x to $(hide "${r:-nothing}"), not $(hide "${s#url.}")" >&2; fail=1; }
  s=
done
for key in name email; do
  eval "value=\$$key"
  [ -n "$value" ] || continue
  r=$(got "$key"); [ "$r" = "$value" ] || { echo "git's user.$key is ${r:-unset}, not $value" >&2; fail=1; }
done
[ "$fail" = 0 ] || exit 3
"#;

fn configure_script() -> String {
    format!("{LIB}{CONFIGURE}")
}

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

    fn drift_cause(&self, ctx: &AgentCtx, observed: Option<&str>) -> String {
        match observed {
            Some(observed) => drift_cause(&ctx.home(), observed),
            None => self.drift_path(ctx),
        }
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
        let mut args: Vec<String> = vec![configure_script(), remove.len().to_string()];
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
        // Bottle's lines are in ~/.gitconfig, unless git could not read it
        // (then none are read either).
        let mut body = format!(
            "{LIB}[ -z \"$(unreadable \"$gc\")\" ] || exit 0\n\
             for s in \"$@\"; do gf \"$gc\" --remove-section \"$s\"; done\n"
        );
        if identity {
            body.push_str("gf \"$gc\" --unset-all user.name; gf \"$gc\" --unset-all user.email\n");
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
    //! The apply and the probe run for real on the host's `sh` and `git`, in a
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
            &configure_script(),
            &["0", "E2E Bot", "bot@example.com", "keep", SECTION, UP],
        )
    }

    fn report(home: &Path) -> String {
        let out = in_home(home, &report_script(), &["identity", SECTION, UP]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    }

    const CONVERGED: &str = "url git@github.com:acme/app.git http://10.8.0.2:9418/app.git\n\
        push git@github.com:acme/app.git http://10.8.0.2:9418/app.git\n\
        name E2E Bot\nemail bot@example.com\n";

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
        let config = home.join(".config/git/config");
        let inc_name = inc.display();
        assert_eq!(
            report(home),
            format!(
                "rewrite\t{}\turl.http://evil/x.insteadof\t{UP}\n\
                 rewrite\t{inc_name}\turl.http://evil 2/.insteadof\t{UP}\n\
                 url {UP} http://evil/x\npush {UP} http://10.8.0.2:9418/app.git\n\
                 name E2E Bot\nemail m@evil\n",
                config.display()
            )
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
                &configure_script(),
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
    fn a_drift_names_the_files_that_hold_it() {
        let home = "/home/node";
        assert_eq!(
            drift_cause(home, "url a http://elsewhere\npush a http://gw/a.git\n"),
            "/home/node/.gitconfig"
        );
        let observed = "unreadable\t/home/node/fifo\tit is not a regular file\n\
                        rewrite\t/home/node/.config/git/config\turl.http://evil/.pushinsteadof\ta\n\
                        rewrite\t/home/node/inc\x1b[2J\turl.http://evil/.insteadof\ta\n\
                        rewrite\t/home/node/inc\x1b[2J\turl.http://evil/.insteadof\ta\n\
                        rewrite\t/etc/gitconfig\turl.x.insteadof\ta\n";
        assert_eq!(
            drift_cause(home, observed),
            "/home/node/fifo (it is not a regular file: git cannot read it in bounded time), \
             /home/node/.config/git/config (another rewrite of a), \
             /home/node/inc\\u{1b}[2J (another rewrite of a) and 1 more"
        );
    }

    /// The gate's credential is in the URL bottle's rewrite names: never
    /// in an error.
    #[test]
    fn a_failure_shows_no_credential() {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path();
        let section = "url.http://coder:s3cr3t-token@10.0.2.2:7000/git/app.git";
        // Here git reads another global file than the one bottle writes.
        let mut command = sh(&configure_script(), &["0", "", "", "keep", section, UP]);
        command
            .env("HOME", home)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env_remove("XDG_CONFIG_HOME");
        let out = output(command);
        assert_eq!(out.status.code(), Some(NOT_CONVERGED));
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(&format!(
                "git resolves {UP} to {UP}, not http://***@10.0.2.2:7000/git/app.git"
            )),
            "{stderr}"
        );
        assert!(!stderr.contains("s3cr3t"), "{stderr}");
    }
}
