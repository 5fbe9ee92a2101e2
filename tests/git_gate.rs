//! The git gateway end to end: a real `git` client against the gateway
//! behind an HTTP server on 127.0.0.1, upstreams as local bare repositories
//! (issue 12). Run as root, git runs as `nobody` (or `bottle-git`).

#[path = "support/git_fixture.rs"]
mod fixture;

use fixture::{Fixture, commit, git, git_ok, remote};
use serde_json::Value;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn pushes(f: &Fixture) -> Vec<Value> {
    f.log()
        .into_iter()
        .filter(|e| e["kind"] == "git" && e["op"] == "push")
        .collect()
}

#[test]
fn clone_and_push_follow_the_rules() {
    let f = Fixture::new();
    let upstream = f.upstream("upstream.git");
    assert!(
        f.serve(&[remote("app", &upstream, &["agent/*"])])
            .is_empty()
    );
    let upstream_main = git_ok(&upstream, &["rev-parse", "main"]);

    // Clone through the gate: upstream's commits.
    git_ok(f.dir.path(), &["clone", "-q", &f.coder_url("app"), "work"]);
    let work = f.path("work");
    assert_eq!(git_ok(&work, &["rev-parse", "HEAD"]), upstream_main);
    assert_eq!(
        std::fs::read_to_string(work.join("README")).unwrap(),
        "hello from upstream\n"
    );

    // A commit pushed to agent/x arrives upstream.
    let first = commit(&work, "a.txt", "one\n");
    git_ok(&work, &["push", "-q", "origin", "HEAD:agent/x"]);
    assert_eq!(git_ok(&upstream, &["rev-parse", "agent/x"]).trim(), first);
    let second = commit(&work, "a.txt", "two\n");
    git_ok(&work, &["push", "-q", "origin", "HEAD:agent/x"]);
    assert_eq!(git_ok(&upstream, &["rev-parse", "agent/x"]).trim(), second);

    // A push to main is refused, naming the rule; upstream's main unchanged.
    let out = git(&work, &["push", "origin", "HEAD:main"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("push to main refused") && err.contains("agent/*"),
        "{err}"
    );
    assert_eq!(git_ok(&upstream, &["rev-parse", "main"]), upstream_main);

    // A force push is refused; upstream keeps `second`.
    git_ok(&work, &["reset", "-q", "--hard", "HEAD~1"]);
    let third = commit(&work, "b.txt", "diverged\n");
    let out = git(&work, &["push", "--force", "origin", "HEAD:agent/x"]);
    assert!(!out.status.success(), "a force push went through");
    assert!(
        stderr(&out).contains("not a fast-forward"),
        "{}",
        stderr(&out)
    );
    assert_eq!(git_ok(&upstream, &["rev-parse", "agent/x"]).trim(), second);

    // A deletion is refused.
    let out = git(&work, &["push", "origin", ":agent/x"]);
    assert!(!out.status.success(), "a deletion went through");
    assert_eq!(git_ok(&upstream, &["rev-parse", "agent/x"]).trim(), second);

    // A tag is not a branch.
    git_ok(&work, &["tag", "agent/t"]);
    let out = git(&work, &["push", "origin", "refs/tags/agent/t"]);
    assert!(!out.status.success());
    assert!(
        git(&upstream, &["rev-parse", "--verify", "refs/tags/agent/t"])
            .status
            .code()
            != Some(0)
    );

    // Every decision is logged with agent, remote, ref, old and new ids.
    let log = pushes(&f);
    let zero = "0".repeat(40);
    let find = |decision: &str, r: &str, new: &str| {
        log.iter().any(|e| {
            e["decision"] == decision
                && e["ref"] == r
                && e["new"] == new
                && e["agent"] == "coder"
                && e["remote"] == "app"
                && e["bottle"] == "dev"
                && e["old"].is_string()
        })
    };
    assert!(find("accepted", "refs/heads/agent/x", &first), "{log:#?}");
    assert!(find("accepted", "refs/heads/agent/x", &second), "{log:#?}");
    assert!(find("refused", "refs/heads/main", &second), "{log:#?}");
    assert!(find("refused", "refs/heads/agent/x", &third), "{log:#?}");
    assert!(find("refused", "refs/heads/agent/x", &zero), "{log:#?}");
    let accepted = log.iter().find(|e| e["new"] == second.as_str()).unwrap();
    assert_eq!(accepted["old"], first.as_str());
}

#[test]
fn only_this_bottles_agents_and_declared_remotes() {
    let f = Fixture::new();
    let upstream = f.upstream("upstream.git");
    let readonly = f.upstream("readonly.git");
    f.serve(&[
        remote("app", &upstream, &["agent/*"]),
        remote("docs", &readonly, &[]),
    ]);
    let clone = |url: &str, to: &str| git(f.dir.path(), &["clone", "-q", url, to]);

    for (who, url) in [
        ("no credential", f.url(None, "app")),
        ("a wrong token", f.url(Some("coder:nope"), "app")),
        (
            "another agent's name",
            f.url(Some("opsbot:tok-coder"), "app"),
        ),
        (
            "another bottle's agent",
            f.url(Some("opsbot:tok-ops"), "app"),
        ),
    ] {
        let out = clone(&url, "x");
        assert!(!out.status.success(), "{who}: cloned");
        let err = stderr(&out);
        assert!(
            err.contains("Authentication failed")
                || err.contains("401")
                || err.contains("could not read Username"),
            "{who}: {err}"
        );
        assert!(!f.path("x").exists());
    }
    // The answer itself: 401 with a Basic challenge.
    let raw = http_get(f.port, "/git/app.git/info/refs?service=git-upload-pack");
    assert!(raw.starts_with("HTTP/1.1 401"), "{raw}");
    assert!(
        raw.to_ascii_lowercase().contains("www-authenticate: basic"),
        "{raw}"
    );

    let out = clone(&f.coder_url("nope"), "y");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not declared for bottle `dev`"),
        "{}",
        stderr(&out)
    );

    // A read-only remote clones but refuses pushes.
    git_ok(f.dir.path(), &["clone", "-q", &f.coder_url("docs"), "docs"]);
    let docs = f.path("docs");
    commit(&docs, "d.txt", "x\n");
    let out = git(&docs, &["push", "origin", "HEAD:agent/d"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("403"), "{}", stderr(&out));

    let log = f.log();
    assert!(log.iter().any(|e| e["status"] == 401), "{log:#?}");
    assert!(
        log.iter()
            .any(|e| e["status"] == 404 && e["remote"] == "nope" && e["agent"] == "coder"),
        "{log:#?}"
    );
}

#[test]
fn fetch_follows_upstream_and_survives_its_loss() {
    let f = Fixture::new();
    let upstream = f.upstream("upstream.git");
    f.serve(&[remote("app", &upstream, &["agent/*"])]);
    git_ok(f.dir.path(), &["clone", "-q", &f.coder_url("app"), "work"]);
    let work = f.path("work");

    // A new upstream commit is visible to the next fetch.
    let seed = f.path("upstream.git.seed");
    let new = commit(&seed, "n.txt", "new upstream work\n");
    git_ok(&seed, &["push", "-q", &upstream.to_string_lossy(), "main"]);
    git_ok(&work, &["fetch", "-q", "origin"]);
    assert_eq!(git_ok(&work, &["rev-parse", "origin/main"]).trim(), new);

    // Upstream gone: fetch still serves the mirror, and the log says so.
    std::fs::rename(&upstream, f.path("moved.git")).unwrap();
    git_ok(&work, &["fetch", "-q", "origin"]);
    git_ok(f.dir.path(), &["clone", "-q", &f.coder_url("app"), "again"]);
    assert_eq!(git_ok(&f.path("again"), &["rev-parse", "HEAD"]).trim(), new);
    let log = f.log();
    assert!(
        log.iter().any(|e| e["op"] == "advertise"
            && e["upstream_sync"]
                .as_str()
                .is_some_and(|s| s.starts_with("failed"))),
        "{log:#?}"
    );
}

#[test]
fn a_push_upstream_refuses_is_refused_with_its_message() {
    let f = Fixture::new();
    let upstream = f.upstream("upstream.git");
    let hook = upstream.join("hooks/pre-receive");
    std::fs::write(
        &hook,
        "#!/bin/sh\necho 'upstream policy: agent branches are frozen today' >&2\nexit 1\n",
    )
    .unwrap();
    f.own(&hook);
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    f.serve(&[remote("app", &upstream, &["agent/*"])]);
    git_ok(f.dir.path(), &["clone", "-q", &f.coder_url("app"), "work"]);
    let work = f.path("work");
    let c = commit(&work, "a.txt", "x\n");
    let out = git(&work, &["push", "origin", "HEAD:agent/x"]);
    assert!(
        !out.status.success(),
        "upstream refused but the gate accepted"
    );
    assert!(
        stderr(&out).contains("agent branches are frozen today"),
        "{}",
        stderr(&out)
    );
    assert!(
        git(&upstream, &["rev-parse", "--verify", "agent/x"])
            .status
            .code()
            != Some(0)
    );
    // Nor did the mirror take it: the next fetch does not show it.
    git_ok(&work, &["fetch", "-q", "origin"]);
    assert!(
        git(&work, &["rev-parse", "--verify", "origin/agent/x"])
            .status
            .code()
            != Some(0)
    );
    let log = pushes(&f);
    assert!(
        log.iter().any(|e| e["decision"] == "refused"
            && e["new"] == c.as_str()
            && e["reason"].as_str().unwrap().contains("frozen")),
        "{log:#?}"
    );
}

/// One raw GET on 127.0.0.1: the status line and headers.
fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}
