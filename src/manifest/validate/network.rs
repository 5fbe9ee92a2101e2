//! What a bottle may reach: its egress allowlist, its gate's settings and
//! its git remotes.

use std::collections::BTreeSet;
use std::path::Path;

use super::{
    ENV_NAME_HELP, check_cidr, check_http_url, check_repo_name, diag, is_env_name, url_password,
};
use crate::manifest::load::Cx;
use crate::manifest::model::BottleSpec;
use crate::manifest::source::Want;
use crate::manifest::{FileId, KeyPath};

pub(super) fn check_egress(
    cx: &mut Cx,
    file: FileId,
    base: &KeyPath,
    what: &str,
    spec: &BottleSpec,
    clean: bool,
) {
    let Some(egress) = &spec.egress else { return };
    let path = base.clone().key("egress");
    if clean && egress.allow_hosts.is_empty() && egress.allow_cidrs.is_empty() {
        cx.report(
            file,
            &path,
            Want::Key,
            diag(
                "bottle::empty-egress",
                format!("the `egress` table of {what} allows nothing"),
                "list what the guest may reach in `allow_hosts` or `allow_cidrs`, \
                 or remove the table: without it the guest has no network at all",
            ),
            "empty egress table",
        );
    }
    for (i, host) in egress.allow_hosts.iter().enumerate() {
        // The gate's grammar: `host`, `host:port`, `*.domain`.
        if let Err((problem, help)) = crate::gate::hosts::HostPattern::parse(host) {
            cx.report(
                file,
                &path.clone().key("allow_hosts").index(i),
                Want::Value,
                diag(
                    "bottle::invalid-host",
                    format!("egress host `{host}` in {what} {problem}"),
                    help,
                ),
                "invalid host name",
            );
        }
    }
    for (i, cidr) in egress.allow_cidrs.iter().enumerate() {
        if let Err((problem, help)) = check_cidr(cidr) {
            cx.report(
                file,
                &path.clone().key("allow_cidrs").index(i),
                Want::Value,
                diag(
                    "bottle::invalid-cidr",
                    format!("egress network `{cidr}` in {what} {problem}"),
                    help,
                ),
                "invalid CIDR",
            );
        }
    }
}

/// What the gate reads: `egress.allow_internal`, a secret's `hosts`, a
/// git remote's `credentials`, `push` and `host_key` (which only the gate
/// uses, so they make no sense with an external `gateway`).
pub(super) fn check_gate_settings(
    cx: &mut Cx,
    file: FileId,
    base: &KeyPath,
    what: &str,
    spec: &BottleSpec,
) {
    if let Some(egress) = &spec.egress {
        for (i, cidr) in egress.allow_internal.iter().enumerate() {
            if let Err((problem, help)) = check_cidr(cidr) {
                cx.report(
                    file,
                    &base.clone().key("egress").key("allow_internal").index(i),
                    Want::Value,
                    diag(
                        "bottle::invalid-cidr",
                        format!("internal network `{cidr}` in {what} {problem}"),
                        help,
                    ),
                    "invalid CIDR",
                );
            }
        }
    }
    for (var, secret) in &spec.secrets {
        for (i, host) in secret.hosts.iter().enumerate() {
            if let Err((problem, help)) = crate::gate::hosts::HostPattern::parse(host) {
                cx.report(
                    file,
                    &base.clone().key("secrets").key(var).key("hosts").index(i),
                    Want::Value,
                    diag(
                        "bottle::invalid-host",
                        format!("host `{host}` of secret `{var}` in {what} {problem}"),
                        help,
                    ),
                    "invalid host",
                );
            }
        }
    }
    let Some(git) = &spec.git else { return };
    for (i, remote) in git.remote.iter().enumerate() {
        let rpath = base.clone().key("git").key("remote").index(i);
        let gate_only = [
            ("credentials", remote.credentials.is_some()),
            ("push", !remote.push.is_empty()),
            ("host_key", remote.host_key.is_some()),
        ];
        if git.gateway.is_some() {
            for (key, _) in gate_only.iter().filter(|(_, set)| *set) {
                cx.report(
                    file,
                    &rpath.clone().key(*key),
                    Want::Key,
                    diag(
                        "bottle::gate-only",
                        format!(
                            "`{key}` of git remote `{}` in {what} is only read by bottle's gate, \
                             but `git.gateway` names an external one",
                            remote.name
                        ),
                        "remove `git.gateway` to let the bottle's gate serve the remote (it \
                         then holds the credentials and enforces `push`), or remove this key \
                         and configure your gateway",
                    ),
                    "unused with an external gateway",
                );
            }
        }
        if let Some(creds) = &remote.credentials {
            let cpath = rpath.clone().key("credentials");
            match (&creds.ssh_key, &creds.token) {
                (Some(_), Some(_)) | (None, None) => cx.report(
                    file,
                    &cpath,
                    Want::Value,
                    diag(
                        "bottle::git-credentials",
                        format!(
                            "the credentials of git remote `{}` in {what} name {} kind",
                            remote.name,
                            if creds.ssh_key.is_some() { "more than one" } else { "no" }
                        ),
                        "give exactly one: `credentials = { ssh_key = { from_file = \"/abs/key\" } }` \
                         or `credentials = { token = { from_env = \"GH_PAT\" } }`",
                    ),
                    "ssh_key or token",
                ),
                (Some(key), None) if !Path::new(&key.from_file).is_absolute() => cx.report(
                    file,
                    &cpath.clone().key("ssh_key").key("from_file"),
                    Want::Value,
                    diag(
                        "bottle::relative-secret-file",
                        format!(
                            "the ssh key of git remote `{}` in {what} is not an absolute path",
                            remote.name
                        ),
                        "the gate reads the key on the host: give an absolute path \
                         (`~` is not expanded), e.g. `from_file = \"/home/me/.ssh/app_deploy\"`",
                    ),
                    "not absolute",
                ),
                (None, Some(token)) => match (&token.from_env, &token.from_file) {
                    (Some(env), None) if !is_env_name(env) => cx.report(
                        file,
                        &cpath.clone().key("token").key("from_env"),
                        Want::Value,
                        diag(
                            "bottle::invalid-env-name",
                            format!(
                                "`from_env` of the token of git remote `{}` in {what} is not a \
                                 valid variable name",
                                remote.name
                            ),
                            format!("name the host variable holding the token; {ENV_NAME_HELP}"),
                        ),
                        "invalid variable name",
                    ),
                    (None, Some(f)) if !Path::new(f).is_absolute() => cx.report(
                        file,
                        &cpath.clone().key("token").key("from_file"),
                        Want::Value,
                        diag(
                            "bottle::relative-secret-file",
                            format!(
                                "the token file of git remote `{}` in {what} is not an absolute path",
                                remote.name
                            ),
                            "give an absolute path (`~` is not expanded)",
                        ),
                        "not absolute",
                    ),
                    (Some(_), None) | (None, Some(_)) if token.hosts.is_empty() => {}
                    _ => cx.report(
                        file,
                        &cpath.clone().key("token"),
                        Want::Value,
                        diag(
                            "bottle::secret-source",
                            format!(
                                "the token of git remote `{}` in {what} needs exactly one of \
                                 `from_env` or `from_file`, and no `hosts`",
                                remote.name
                            ),
                            "write `token = { from_env = \"GH_PAT\" }` or \
                             `token = { from_file = \"/abs/path\" }`",
                        ),
                        "one source",
                    ),
                },
                _ => {}
            }
        }
        for (j, glob) in remote.push.iter().enumerate() {
            let bad = glob.is_empty()
                || glob.starts_with('/')
                || glob.starts_with("refs/")
                || glob.contains("..")
                || glob
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || "~^:?[\\".contains(c));
            if bad {
                cx.report(
                    file,
                    &rpath.clone().key("push").index(j),
                    Want::Value,
                    diag(
                        "bottle::invalid-push",
                        format!(
                            "push pattern `{glob}` of git remote `{}` in {what} is not a branch pattern",
                            remote.name
                        ),
                        "name branches, with `*` for any part, e.g. `push = [\"agent/*\"]` \
                         (no `refs/`, spaces, `..` or `~^:?[\\`)",
                    ),
                    "invalid branch pattern",
                );
            }
        }
        if let Some(key) = &remote.host_key {
            let fields = key.split_whitespace().count();
            if key.contains('\n') || !(2..=3).contains(&fields) {
                cx.report(
                    file,
                    &rpath.clone().key("host_key"),
                    Want::Value,
                    diag(
                        "bottle::invalid-host-key",
                        format!(
                            "the host key of git remote `{}` in {what} is not one key",
                            remote.name
                        ),
                        "give the key as `ssh-keyscan` prints it, without the host: \
                         `host_key = \"ssh-ed25519 AAAAC3Nza...\"`",
                    ),
                    "not `TYPE BASE64`",
                );
            }
        }
    }
}

pub(super) fn check_git(
    cx: &mut Cx,
    file: FileId,
    base: &KeyPath,
    what: &str,
    git: &crate::manifest::model::GitSpec,
) {
    let path = base.clone().key("git");
    if let Some(Err((problem, help))) = git.gateway.as_deref().map(|g| check_http_url(g, true)) {
        cx.report(
            file,
            &path.clone().key("gateway"),
            Want::Value,
            diag(
                "bottle::invalid-url",
                format!("`git.gateway` in {what} {problem}"),
                help,
            ),
            "invalid URL",
        );
    }
    if let Some(user) = &git.user {
        let bad_name = user.name.trim().is_empty()
            || user
                .name
                .chars()
                .any(|c| c.is_control() || c == '<' || c == '>');
        if bad_name {
            cx.report(
                file,
                &path.clone().key("user").key("name"),
                Want::Value,
                diag(
                    "bottle::invalid-git-user",
                    format!("`git.user.name` in {what} is not a usable commit author name"),
                    "give a non-empty name without '<', '>' or control characters, \
                     e.g. `name = \"Bottle Bot\"`",
                ),
                "invalid name",
            );
        }
        let email = &user.email;
        let bad_email = !email.contains('@')
            || email.starts_with('@')
            || email.ends_with('@')
            || email
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '<' || c == '>');
        if bad_email {
            cx.report(
                file,
                &path.clone().key("user").key("email"),
                Want::Value,
                diag(
                    "bottle::invalid-git-user",
                    format!("`git.user.email` in {what} is not an email address"),
                    "give an address like `email = \"bot@example.com\"`",
                ),
                "not an email address",
            );
        }
    }
    let mut seen_names = BTreeSet::new();
    let mut seen_upstreams = BTreeSet::new();
    for (i, remote) in git.remote.iter().enumerate() {
        let rpath = path.clone().key("remote").index(i);
        if let Err((problem, help)) = check_repo_name(&remote.name) {
            cx.report(
                file,
                &rpath.clone().key("name"),
                Want::Value,
                diag(
                    "bottle::invalid-remote",
                    format!("git remote name `{}` in {what} {problem}", remote.name),
                    help,
                ),
                "invalid repository name",
            );
        } else if !seen_names.insert(remote.name.as_str()) {
            cx.report(
                file,
                &rpath.clone().key("name"),
                Want::Value,
                diag(
                    "bottle::duplicate-remote",
                    format!("git remote `{}` is declared twice in {what}", remote.name),
                    "each remote name maps to one repository on the gateway: remove one",
                ),
                "declared again",
            );
        }
        let upstream = remote.upstream.as_str();
        if upstream.starts_with('-') {
            // git would read it as an option (`--upload-pack=...`,
            // `--file=/etc/shadow`) wherever it is passed as an argument.
            cx.report(
                file,
                &rpath.clone().key("upstream"),
                Want::Value,
                diag(
                    "bottle::invalid-remote",
                    format!(
                        "the upstream of git remote `{}` in {what} starts with `-`",
                        remote.name
                    ),
                    "a URL never starts with `-` (git would read it as an option): \
                     give the URL the agent uses, e.g. `upstream = \"git@github.com:acme/app.git\"`",
                ),
                "looks like an option",
            );
        } else if upstream.trim().is_empty()
            || upstream
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            cx.report(
                file,
                &rpath.clone().key("upstream"),
                Want::Value,
                diag(
                    "bottle::invalid-remote",
                    format!("the upstream of git remote `{}` in {what} is not a URL", remote.name),
                    "give the URL the agent uses, e.g. `upstream = \"git@github.com:acme/app.git\"`",
                ),
                "invalid upstream",
            );
        } else if url_password(upstream).is_some() {
            cx.report(
                file,
                &rpath.clone().key("upstream"),
                Want::Value,
                diag(
                    "bottle::url-credentials",
                    format!(
                        "the upstream of git remote `{}` in {what} carries a password",
                        remote.name
                    ),
                    "remove the `user:password@` part: the gateway holds the credentials, \
                     and a manifest never does",
                ),
                "password in the URL (not shown)",
            );
        } else if !seen_upstreams.insert(upstream) {
            cx.report(
                file,
                &rpath.clone().key("upstream"),
                Want::Value,
                diag(
                    "bottle::duplicate-remote",
                    format!("upstream `{upstream}` is declared by two git remotes in {what}"),
                    "an upstream can be rewritten to only one gateway repository: remove one",
                ),
                "declared again",
            );
        }
    }
}
