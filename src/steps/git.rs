//! The git step: the agent user's `~/.gitconfig` rewrites every remote's
//! upstream URL to the gateway (`url.<gateway>/<name>.git.insteadOf`) and
//! sets the commit identity. Other settings in the file are left alone.

use super::{AgentCtx, Recorded, Step, StepCx, StepResult, Work, entry_user, sh_quote};
use crate::ledger::LedgerEntry;

pub struct GitStep;

const QUERY: &str = r"^(url\..*\.insteadof|user\.(name|email))$";

pub fn probe(ctx: &AgentCtx) -> String {
    probe_home(&sh_quote(&ctx.home()))
}

/// The probe of the git configuration of the home `home` (a shell word).
fn probe_home(home: &str) -> String {
    format!("HOME={home} git config --global --get-regexp '{QUERY}' 2>/dev/null | LC_ALL=C sort")
}

/// `(section, upstream)` pairs: `url.<gateway>/<name>.git` rewrites
/// `upstream`.
pub fn rewrites(ctx: &AgentCtx) -> Vec<(String, String)> {
    let Some(git) = &ctx.bottle.spec.git else {
        return Vec::new();
    };
    let gateway = git.gateway.trim_end_matches('/');
    git.remote
        .iter()
        .map(|r| (format!("url.{gateway}/{}.git", r.name), r.upstream.clone()))
        .collect()
}

const CONFIGURE: &str = r#"set -e
# $1: number of old sections, then the old sections; then user name and
# email (empty: leave alone), then "unset" when bottle set an identity that
# the manifest no longer declares; then section/upstream pairs.
n="$1"; shift
while [ "$n" -gt 0 ]; do git config --global --remove-section "$1" 2>/dev/null || true; shift; n=$((n-1)); done
if [ -n "$1" ]; then git config --global user.name "$1"; fi
if [ -n "$2" ]; then git config --global user.email "$2"; fi
if [ "$3" = unset ]; then git config --global --unset user.name || true; git config --global --unset user.email || true; fi
shift 3
while [ $# -gt 0 ]; do git config --global --add "$1.insteadOf" "$2"; shift 2; done
"#;

/// Root: the user configures its own file; then the same configuration is
/// written from nothing into a private home, for the recorded digest.
const APPLY: &str = r#"set -e
body=$1; shift
bottle_as "$bottle_user" "$body" "$@"
mkdir home && HOME="$P/home" sh -c "$body" sh "$@"
"#;

const HELP: &str = "the image needs `git`";

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
        let (name, email) = ctx
            .bottle
            .spec
            .git
            .as_ref()
            .and_then(|g| g.user.as_ref())
            .map(|u| (u.name.as_str(), u.email.as_str()))
            .unwrap_or(("", ""));
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
        Ok(Work::new("configuring git", HELP, APPLY)
            .args(args)
            .recorded(Recorded::Expected(probe_home("\"$P/home\""))))
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
            HELP,
            "u=$1; body=$2; shift 2; bottle_as \"$u\" \"$body\" \"$@\"",
        )
        .args(args))
    }
}
