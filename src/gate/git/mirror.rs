//! One remote's files under `<mirrors>/<bottle>/`:
//!
//! ```text
//! <remote>.git/              the bare mirror, owned by the git user
//! .gate/<remote>/            the gate's, root-owned (0755)
//!     hooks/pre-receive      the push policy (0755)
//!     known_hosts            ssh upstreams: the host keys ssh accepts
//!     upstream               the upstream the mirror was made from
//!     run/                   git user (0700): one decisions file per push
//!     ssh/                   git user (0700): the ssh-agent's socket
//! ```
//!
//! When the gate runs as root, git runs as the git user in a private mount
//! namespace where `<mirrors>/<bottle>` is bound at the gateway's view point
//! (an empty directory under the temporary directory): the git user never
//! needs to traverse the gate's state directory (which may be 0700), and
//! sees no other bottle's mirrors. Paths handed to git are in that view.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use super::{Confine, RunAs, upstream};

/// The longest an upstream fetch (or the first clone) may take.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
pub struct Layout {
    /// `<mirrors>/<bottle>`.
    pub bottle_dir: PathBuf,
    /// Where git sees `bottle_dir`.
    pub view: PathBuf,
    pub remote: String,
}

impl Layout {
    pub fn mirror(&self) -> PathBuf {
        self.bottle_dir.join(format!("{}.git", self.remote))
    }
    pub fn gate_dir(&self) -> PathBuf {
        self.bottle_dir.join(".gate").join(&self.remote)
    }
    pub fn hooks(&self) -> PathBuf {
        self.gate_dir().join("hooks")
    }
    pub fn run_dir(&self) -> PathBuf {
        self.gate_dir().join("run")
    }
    pub fn ssh_dir(&self) -> PathBuf {
        self.gate_dir().join("ssh")
    }
    pub fn known_hosts(&self) -> PathBuf {
        self.gate_dir().join("known_hosts")
    }
    pub fn upstream_file(&self) -> PathBuf {
        self.gate_dir().join("upstream")
    }
    /// The mirror as git sees it.
    pub fn mirror_view(&self) -> PathBuf {
        self.view.join(format!("{}.git", self.remote))
    }
    /// A path under the gate dir as git sees it.
    pub fn view_of(&self, leaf: &str) -> String {
        format!("{}/.gate/{}/{leaf}", self.view.display(), self.remote)
    }
}

/// Create `dir` (and parents) with `mode`, owned by `owner` if given.
pub fn make_dir(dir: &Path, mode: u32, owner: Option<RunAs>) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
    if let Some(o) = owner {
        std::os::unix::fs::chown(dir, Some(o.uid), Some(o.gid))?;
    }
    Ok(())
}

/// Write `contents` to `path` (replacing it atomically) with `mode`.
pub fn write_file(path: &Path, contents: &str, mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents.as_bytes())?;
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path)
}

/// What a git command run by the gate printed.
#[derive(Debug)]
pub struct Ran {
    pub ok: bool,
    pub stderr: String,
}

/// Run `git args...` confined with `env` (the environment is cleared
/// first), killed after `timeout`.
pub async fn git(
    confine: &Confine,
    args: &[&str],
    env: &[(String, String)],
    timeout: Duration,
) -> Ran {
    let mut cmd = tokio::process::Command::new("git");
    cmd.args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    super::confine(cmd.as_std_mut(), confine);
    cmd.process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Ran {
                ok: false,
                stderr: format!("cannot run git: {e}"),
            };
        }
    };
    let group = super::cgi::KillGroup(child.id());
    let mut err = child.stderr.take().expect("piped");
    let work = async {
        let mut e = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = err.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let room = (64usize << 10).saturating_sub(e.len());
            e.extend_from_slice(&buf[..n.min(room)]);
        }
        let status = child.wait().await;
        (status, e)
    };
    let result = tokio::time::timeout(timeout, work).await;
    if result.is_ok() {
        group.disarm();
    }
    match result {
        Ok((status, e)) => Ran {
            ok: status.map(|s| s.success()).unwrap_or(false),
            stderr: String::from_utf8_lossy(&e).into_owned(),
        },
        Err(_) => Ran {
            ok: false,
            stderr: format!("git {} took longer than {timeout:?}", args[0]),
        },
    }
}

/// The pre-receive hook: the push policy, then the push to upstream.
///
/// It trusts nothing the agent sends beyond what receive-pack has already
/// checked (ref names are valid, ids are hex): the rules and the upstream
/// are written into the script by the gate; its environment is the gate's
/// (the CGI environment is built from scratch, never from request headers
/// beyond the content type and encoding).
pub fn pre_receive_hook(bottle: &str, remote: &str, upstream: &str, patterns: &[String]) -> String {
    let q = upstream::shell_quote;
    let rule = patterns.join(", ");
    let mut arms = String::new();
    for p in patterns {
        // `*` matches anything (`/` too); everything else literally.
        let glob: String = p
            .split('*')
            .map(|lit| {
                if lit.is_empty() {
                    String::new()
                } else {
                    q(lit)
                }
            })
            .collect::<Vec<_>>()
            .join("*");
        arms.push_str(&format!("      {glob}) ;;\n"));
    }
    format!(
        r#"#!/bin/sh
# Written by bottle's gate for {bottle_q} remote {remote_q}; rewritten on every
# reload. Runs as the gate's git user in the mirror before any ref changes.
set -u
set -f
upstream={upstream_q}
remote={remote_q}
rule={rule_q}
decisions=${{BOTTLE_GIT_DECISIONS:-/dev/null}}
note() {{ printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$decisions"; }}
refused=0
specs=''
accepted=''
while read -r old new ref; do
  why=''
  case "$ref" in
    refs/heads/*) branch=${{ref#refs/heads/}} ;;
    *) branch=$ref; why="only branches may be pushed, and $ref is not a branch" ;;
  esac
  if [ -z "$why" ]; then
    case "$branch" in
{arms}      *) why="push to $branch refused: remote $remote allows pushes only to branches matching: $rule" ;;
    esac
  fi
  if [ -z "$why" ]; then
    case "$new" in
      *[!0]*) ;;
      *) why="deleting $branch is refused: the gate never deletes branches" ;;
    esac
  fi
  if [ -z "$why" ]; then
    cur=$(git rev-parse -q --verify "$ref^{{commit}}" 2>/dev/null) || cur=''
    case "$old" in *[!0]*) was=$old ;; *) was='' ;; esac
    if [ "$(git cat-file -t "$new" 2>/dev/null)" != commit ]; then
      why="$branch must point at a commit"
    elif [ "$cur" != "$was" ]; then
      why="$branch moved since you fetched it: fetch, rebase onto it and push again"
    elif [ -n "$cur" ] && ! git merge-base --is-ancestor "$cur" "$new" 2>/dev/null; then
      why="$branch: not a fast-forward; force pushes are refused (rebase onto the remote branch instead)"
    fi
  fi
  if [ -n "$why" ]; then
    printf 'bottle gate: %s\n' "$why" >&2
    note refused "$ref" "$old" "$new" "$why"
    refused=1
  else
    specs="$specs $new:$ref"
    accepted="$accepted $old:$new:$ref"
  fi
done
if [ "$refused" = 1 ]; then
  for a in $accepted; do
    o=${{a%%:*}}; rest=${{a#*:}}; n=${{rest%%:*}}; r=${{rest#*:}}
    note refused "$r" "$o" "$n" "another ref in the same push was refused"
  done
  exit 1
fi
[ -n "$specs" ] || exit 0
out="$decisions.upstream"
# The quarantine is this push's; upstream (a local one) must not inherit it.
if env -u GIT_QUARANTINE_PATH git push --quiet --no-verify -- "$upstream" $specs >"$out" 2>&1; then
  verdict=accepted
  why='pushed upstream'
else
  verdict=refused
  why="upstream refused: $(tr '\t\n' '  ' <"$out" | cut -c1-800)"
  printf 'bottle gate: the upstream refused the push:\n' >&2
fi
cat "$out" >&2
rm -f "$out"
for a in $accepted; do
  o=${{a%%:*}}; rest=${{a#*:}}; n=${{rest%%:*}}; r=${{rest#*:}}
  note "$verdict" "$r" "$o" "$n" "$why"
done
[ "$verdict" = accepted ]
"#,
        bottle_q = bottle,
        remote_q = q(remote),
        upstream_q = q(upstream),
        rule_q = q(if rule.is_empty() { "(none)" } else { &rule }),
    )
}

/// A push pattern the hook can hold: a branch glob of `[A-Za-z0-9._/-]`
/// and `*`.
pub fn check_pattern(p: &str) -> Result<(), String> {
    if p.is_empty()
        || p.starts_with('-')
        || p.starts_with('/')
        || p.contains("..")
        || !p
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._/-*".contains(c))
    {
        return Err(format!(
            "push pattern `{p}` is not a branch glob (letters, digits, `._/-` and `*`)"
        ));
    }
    Ok(())
}

/// A name usable as a path component: `[A-Za-z0-9._-]`, not starting with
/// `.` or `-`.
pub fn check_name(kind: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        && !name.ends_with(".git");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{kind} name `{name}` cannot be served (letters, digits, `._-`, not starting with `.` or `-`, not ending in `.git`)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_and_names() {
        assert!(check_pattern("agent/*").is_ok());
        assert!(check_pattern("feature-*/x").is_ok());
        for bad in ["", "-x", "a b", "a/../b", "a$(x)", "a'b", "[ab]", "/x"] {
            assert!(check_pattern(bad).is_err(), "{bad}");
        }
        assert!(check_name("remote", "app").is_ok());
        assert!(check_name("remote", "my_app-2.x").is_ok());
        for bad in ["", ".gate", "-x", "a/b", "..", "app.git", "a b"] {
            assert!(check_name("remote", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hook_quotes_what_it_embeds() {
        let hook = pre_receive_hook("dev", "app", "/srv/it's.git", &["agent/*".into()]);
        assert!(hook.contains("upstream='/srv/it'\\''s.git'"));
        assert!(hook.contains("      'agent/'*) ;;"));
        let hook = pre_receive_hook("dev", "app", "/srv/a.git", &["*-wip".into(), "x".into()]);
        assert!(hook.contains("      *'-wip') ;;"));
        assert!(hook.contains("      'x') ;;"));
    }
}
