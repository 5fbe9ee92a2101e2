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

    // Objects are checked (receive.fsckObjects): a commit without an
    // author is refused before any rule or upstream sees it.
    let tree = git_ok(&work, &["write-tree"]);
    let bad = {
        let mut child = std::process::Command::new("git")
            .args([
                "hash-object",
                "-t",
                "commit",
                "-w",
                "--literally",
                "--stdin",
            ])
            .current_dir(&work)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        write!(
            child.stdin.take().unwrap(),
            "tree {}\nparent {second}\n\nno author\n",
            tree.trim()
        )
        .unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let out = git(
        &work,
        &["push", "origin", &format!("{bad}:refs/heads/agent/x")],
    );
    assert!(!out.status.success(), "a malformed commit was accepted");
    assert!(
        stderr(&out).contains("unpacker error") || stderr(&out).contains("fsck"),
        "{}",
        stderr(&out)
    );
    assert_eq!(git_ok(&upstream, &["rev-parse", "agent/x"]).trim(), second);

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

    // Also with the older protocol (refs in the advertisement itself).
    let newer = commit(&seed, "n.txt", "newer upstream work\n");
    git_ok(&seed, &["push", "-q", &upstream.to_string_lossy(), "main"]);
    git_ok(
        &work,
        &["-c", "protocol.version=0", "fetch", "-q", "origin"],
    );
    assert_eq!(git_ok(&work, &["rev-parse", "origin/main"]).trim(), newer);
    let new = newer;

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

/// A read-only local upstream owned by someone else than the gate's git
/// user (root, as a user makes it with sudo), readable by everyone: git's
/// ownership check refused it ("dubious ownership", a 502 for the agent),
/// because the local transport's upload-pack never saw the gate's
/// `safe.directory`.
#[test]
fn a_readable_local_upstream_owned_by_another_user_is_served() {
    let f = Fixture::new();
    let upstream = f.upstream("upstream.git");
    let out = std::process::Command::new("chown")
        .args(["-R", "0:0"])
        .arg(&upstream)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    f.serve(&[remote("app", &upstream, &[])]);
    let clone = git(f.dir.path(), &["clone", "-q", &f.coder_url("app"), "work"]);
    assert!(clone.status.success(), "{}", stderr(&clone));
    assert_eq!(
        std::fs::read_to_string(f.path("work/README")).unwrap(),
        "hello from upstream\n"
    );
    // And the next fetch, from the mirror it made, follows upstream.
    let seed = f.path("upstream.git.seed");
    let new = commit(&seed, "n.txt", "new upstream work\n");
    git_ok(&seed, &["push", "-q", &upstream.to_string_lossy(), "main"]);
    git_ok(&f.path("work"), &["fetch", "-q", "origin"]);
    assert_eq!(
        git_ok(&f.path("work"), &["rev-parse", "origin/main"]).trim(),
        new
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

#[test]
fn git_runs_unprivileged_and_owns_the_mirror() {
    let f = Fixture::new();
    let upstream = f.upstream("upstream.git");
    f.serve(&[remote("app", &upstream, &["agent/*"])]);
    git_ok(f.dir.path(), &["clone", "-q", &f.coder_url("app"), "work"]);
    let work = f.path("work");
    commit(&work, "a.txt", "x\n");
    git_ok(&work, &["push", "-q", "origin", "HEAD:agent/x"]);
    let mirror = f.paths.mirrors().join("dev/app.git");
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(&mirror).unwrap().uid();
    // Every file git wrote (objects, refs) is the git user's, never root's.
    let out = std::process::Command::new("find")
        .arg(&mirror)
        .args(["-not", "-uid", &owner.to_string()])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
    match f.run_as {
        Some(r) => assert_eq!(owner, r.uid),
        None => assert_eq!(owner, rustix::process::geteuid().as_raw()),
    }
    assert_ne!(owner, 0, "the mirror is root's: git ran as root");
    // The policy hook is the gate's, out of the git user's reach.
    let hook = f.paths.mirrors().join("dev/.gate/app/hooks/pre-receive");
    let meta = std::fs::metadata(&hook).unwrap();
    assert_eq!(meta.mode() & 0o022, 0);
    if f.run_as.is_some() {
        assert_eq!(meta.uid(), 0);
    }
}

#[test]
fn ssh_upstreams_get_the_key_through_an_agent_and_never_a_file() {
    let f = Fixture::new();
    // The key: private to root, in a directory the git user cannot enter.
    let keys = f.path("keys");
    std::fs::create_dir(&keys).unwrap();
    std::fs::set_permissions(&keys, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let key = keys.join("deploy");
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "bottle-test", "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // An ssh upstream nobody listens on (a port bound and closed again).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut app = remote("app", std::path::Path::new("/unused"), &[]);
    app.upstream = format!("ssh://git@127.0.0.1:{port}/acme/app.git");
    app.credentials = Some(bottle::gate::config::GitCredentials::SshKey { path: key.clone() });
    app.host_key = Some(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl".into(),
    );
    assert!(f.serve(&[app]).is_empty());

    let out = git(f.dir.path(), &["clone", "-q", &f.coder_url("app"), "work"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("upstream cannot be reached"), "{err}");
    assert!(
        err.contains("Connection refused") || err.contains("connect"),
        "{err}"
    );

    // The declared host key is what ssh checks against.
    let gate = f.paths.mirrors().join("dev/.gate/app");
    let known = std::fs::read_to_string(gate.join("known_hosts")).unwrap();
    assert_eq!(
        known,
        format!(
            "[127.0.0.1]:{port} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n"
        )
    );
    if f.run_as.is_some() {
        // The gate's ssh-agent (the git user's) holds exactly that key.
        let listed = std::process::Command::new("ssh-add")
            .arg("-l")
            .env("SSH_AUTH_SOCK", gate.join("ssh/agent.sock"))
            .output()
            .unwrap();
        let fingerprint = std::process::Command::new("ssh-keygen")
            .arg("-lf")
            .arg(key.with_extension("pub"))
            .output()
            .unwrap();
        let fp = |o: &std::process::Output| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(1)
                .unwrap_or("")
                .to_owned()
        };
        assert!(listed.status.success(), "{listed:?}");
        assert_eq!(fp(&listed), fp(&fingerprint));
        assert_eq!(String::from_utf8_lossy(&listed.stdout).lines().count(), 1);
    }
    // The private key is in no file the gate wrote, nor its log.
    let secret = std::fs::read_to_string(&key).unwrap();
    let body: String = secret.lines().filter(|l| !l.starts_with("-----")).collect();
    let out = std::process::Command::new("grep")
        .args(["-rlF", &body[..40]])
        .arg(&f.paths.dir)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "", "the key leaked");
}

/// `git daemon` on 127.0.0.1 serving `base`, killed when dropped.
struct Daemon {
    child: std::process::Child,
    port: u16,
}

impl Daemon {
    fn start(base: &std::path::Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // git-daemon itself: `git daemon` would run it as a child of its
        // own, which killing `git` would leave running.
        let exec_path = git_ok(base, &["--exec-path"]);
        let child =
            std::process::Command::new(std::path::Path::new(exec_path.trim()).join("git-daemon"))
                .args([
                    "--listen=127.0.0.1",
                    &format!("--port={port}"),
                    "--reuseaddr",
                    "--export-all",
                    "--enable=receive-pack",
                    "--timeout=60",
                    "--max-connections=8",
                ])
                .arg(format!("--base-path={}", base.display()))
                .env("GIT_CONFIG_GLOBAL", fixture::global_config())
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("git daemon runs");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "git daemon did not listen"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Self { child, port }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn git_protocol_upstreams_and_a_stopped_daemon() {
    let f = Fixture::new();
    let upstream = f.upstream("upstream.git");
    let daemon = Daemon::start(f.dir.path());
    let mut app = remote("app", &upstream, &["agent/*"]);
    app.upstream = format!("git://127.0.0.1:{}/upstream.git", daemon.port);
    assert!(f.serve(&[app]).is_empty());

    git_ok(f.dir.path(), &["clone", "-q", &f.coder_url("app"), "work"]);
    let work = f.path("work");
    assert_eq!(
        git_ok(&work, &["rev-parse", "HEAD"]),
        git_ok(&upstream, &["rev-parse", "main"])
    );
    let c = commit(&work, "a.txt", "over git://\n");
    git_ok(&work, &["push", "-q", "origin", "HEAD:agent/x"]);
    assert_eq!(git_ok(&upstream, &["rev-parse", "agent/x"]).trim(), c);

    // The daemon stops: fetch and clone still work from the mirror.
    drop(daemon);
    git_ok(&work, &["fetch", "-q", "origin"]);
    assert_eq!(git_ok(&work, &["rev-parse", "origin/agent/x"]).trim(), c);
    git_ok(f.dir.path(), &["clone", "-q", &f.coder_url("app"), "again"]);
    // A push cannot reach upstream, so the gate refuses it.
    let out = git(&work, &["push", "origin", "HEAD:agent/y"]);
    assert!(
        !out.status.success(),
        "a push went through with upstream down: {}\n{:#?}\n{}",
        stderr(&out),
        pushes(&f),
        git_ok(&upstream, &["for-each-ref"])
    );
    assert!(
        stderr(&out).contains("upstream refused"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn reloads_change_what_is_served_without_a_restart() {
    let f = Fixture::new();
    let one = f.upstream("one.git");
    let two = f.upstream("two.git");
    let seed = f.path("two.git.seed");
    let two_head = commit(&seed, "two.txt", "only in two\n");
    git_ok(&seed, &["push", "-q", &two.to_string_lossy(), "main"]);
    f.own(&two);

    f.serve(&[remote("app", &one, &[])]);
    git_ok(f.dir.path(), &["clone", "-q", &f.coder_url("app"), "a"]);
    assert!(!f.path("a/two.txt").exists());

    // The upstream changes: the next clone is of the new one.
    f.serve(&[remote("app", &two, &[])]);
    git_ok(f.dir.path(), &["clone", "-q", &f.coder_url("app"), "b"]);
    assert_eq!(
        git_ok(&f.path("b"), &["rev-parse", "HEAD"]).trim(),
        two_head
    );

    // The remote goes: 404, and its mirror is removed.
    f.serve(&[]);
    let out = git(f.dir.path(), &["clone", "-q", &f.coder_url("app"), "c"]);
    assert!(!out.status.success());
    assert!(!f.paths.mirrors().join("dev/app.git").exists());
    assert!(!f.paths.mirrors().join("dev/.gate/app").exists());

    // What the gate cannot serve safely is refused at configure time, and
    // the rest is served.
    let mut bad_name = remote("../x", &one, &[]);
    bad_name.name = "../x".into();
    let mut bad_upstream = remote("ext", &one, &[]);
    bad_upstream.upstream = "ext::sh -c touch% /tmp/pwned".into();
    let bad_push = remote("glob", &one, &["agent/$(id)"]);
    let mut no_token = remote("tok", &one, &[]);
    no_token.upstream = "https://example.com/a.git".into();
    no_token.credentials = Some(bottle::gate::config::GitCredentials::Token {
        value_key: "MISSING".into(),
    });
    let problems = f.serve(&[
        bad_name,
        bad_upstream,
        bad_push,
        no_token,
        remote("app", &one, &[]),
    ]);
    assert_eq!(problems.len(), 4, "{problems:#?}");
    assert!(
        problems.iter().any(|p| p.contains("MISSING")),
        "{problems:#?}"
    );
    git_ok(f.dir.path(), &["clone", "-q", &f.coder_url("app"), "d"]);
    let out = git(f.dir.path(), &["clone", "-q", &f.coder_url("ext"), "e"]);
    assert!(!out.status.success());
    assert!(!std::path::Path::new("/tmp/pwned").exists());
}

/// The live `git http-backend` children of this test process serving
/// `remote` (other tests of this binary run git too).
fn backends_serving(remote: &str) -> usize {
    let me = std::process::id().to_string();
    let marker = format!("PATH_INFO=/{remote}.git/");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            let dir = e.path();
            let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
            // pid (comm) state ppid ...
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1));
            ppid == Some(me.as_str())
                && std::fs::read(dir.join("environ"))
                    .map(|env| {
                        env.split(|b| *b == 0)
                            .any(|v| v.starts_with(marker.as_bytes()))
                    })
                    .unwrap_or(false)
        })
        .count()
}

/// Attack: one agent opens many upload-pack requests and sends their
/// bodies a byte at a time (each may idle 300 s between bytes), holding
/// every slot git had for the whole gate: another bottle's agent got 503
/// after 30 s. Now each agent and each bottle has slots of its own.
#[test]
fn an_agent_holding_slow_requests_does_not_stall_another_bottles_git() {
    use std::io::Write;
    let f = Fixture::new();
    let upstream = f.upstream("upstream.git");
    let theirs = f.upstream("theirs.git");
    f.serve(&[remote("slowapp", &upstream, &[])]);
    let ops: std::collections::BTreeMap<String, bottle::gate::config::AgentCredentials> = [(
        "opsbot".to_owned(),
        bottle::gate::config::AgentCredentials {
            git_token: "tok-ops".into(),
            ..Default::default()
        },
    )]
    .into();
    assert!(
        f.gateway
            .configure(
                "ops",
                &[remote("theirs", &theirs, &[])],
                &ops,
                &Default::default()
            )
            .is_empty()
    );
    // The mirror exists first: the slow requests are plain upload-packs.
    git_ok(f.dir.path(), &["clone", "-q", &f.coder_url("slowapp"), "w"]);

    // Slow requests, one at a time, each until git no longer starts one
    // more for it (bounded).
    // coder:tok-coder
    let auth = "Y29kZXI6dG9rLWNvZGVy";
    let mut held = Vec::new();
    for _ in 0..40 {
        let before = backends_serving("slowapp");
        let mut s = std::net::TcpStream::connect(("127.0.0.1", f.port)).unwrap();
        write!(
            s,
            "POST /git/slowapp.git/git-upload-pack HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Authorization: Basic {auth}\r\nContent-Type: application/x-git-upload-pack-request\r\n\
             Content-Length: 100000\r\n\r\n0032want "
        )
        .unwrap();
        held.push(s);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while backends_serving("slowapp") <= before && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if backends_serving("slowapp") <= before {
            break;
        }
    }
    assert!(backends_serving("slowapp") >= 1);

    // Another bottle's agent still gets its refs.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let request = http::Request::builder()
        .method("GET")
        .uri("/git/theirs.git/info/refs?service=git-upload-pack")
        .header("authorization", "Basic b3BzYm90OnRvay1vcHM=")
        .body(bottle::gate::http::full(""))
        .unwrap();
    let response = runtime.block_on(f.gateway.handle("ops", request));
    assert_eq!(response.status(), 200, "{:?}", response);
    drop(held);
}

/// zlib without compression (stored blocks): what git inflates.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x78, 0x01];
    let chunks: Vec<&[u8]> = data.chunks(65535).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        out.push(u8::from(i + 1 == chunks.len()));
        let len = chunk.len() as u16;
        out.extend(len.to_le_bytes());
        out.extend((!len).to_le_bytes());
        out.extend(*chunk);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for byte in data {
        a = (a + u32::from(*byte)) % 65521;
        b = (b + a) % 65521;
    }
    out.extend(((b << 16) | a).to_be_bytes());
    out
}

/// A pack object header: type and inflated size.
fn pack_header(kind: u8, mut size: u64) -> Vec<u8> {
    let mut out = vec![(kind << 4) | (size & 15) as u8];
    size >>= 4;
    while size > 0 {
        *out.last_mut().unwrap() |= 0x80;
        out.push((size & 0x7f) as u8);
        size >>= 7;
    }
    out
}

fn varint(mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// A two-object pack of a few hundred bytes: a 64 KiB blob and a delta
/// on it whose every byte is a copy of all 64 KiB, `inflated` bytes in all.
fn delta_bomb(inflated: u64) -> Vec<u8> {
    let base = vec![b'A'; 65536];
    let mut delta = varint(base.len() as u64);
    delta.extend(varint(inflated));
    delta.extend(std::iter::repeat_n(0x80u8, (inflated / 65536) as usize));
    let mut pack = b"PACK".to_vec();
    pack.extend(2u32.to_be_bytes());
    pack.extend(2u32.to_be_bytes());
    let first = pack.len();
    pack.extend(pack_header(3, base.len() as u64));
    pack.extend(zlib_stored(&base));
    let second = pack.len();
    pack.extend(pack_header(6, delta.len() as u64));
    // The base's offset back from this object (git's offset encoding).
    let mut n = (second - first) as u64;
    let mut offset = vec![(n & 0x7f) as u8];
    n >>= 7;
    while n > 0 {
        n -= 1;
        offset.insert(0, 0x80 | (n & 0x7f) as u8);
        n >>= 7;
    }
    pack.extend(offset);
    pack.extend(zlib_stored(&delta));
    let mut sha = std::process::Command::new("sha1sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut sha.stdin.take().unwrap(), &pack).unwrap();
    let hex = String::from_utf8(sha.wait_with_output().unwrap().stdout).unwrap();
    let hex = hex.split_whitespace().next().unwrap();
    pack.extend((0..20).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()));
    pack
}

/// Attack: a push of a few hundred bytes (a delta of one-byte copies)
/// made git inflate it in memory: 1.25 GiB here, as much as the agent
/// likes (host memory exhaustion), since `receive.maxInputSize` counts
/// packed bytes. Now git that reads an agent's pack has bounded memory
/// and the push is refused before any ref moves.
#[test]
fn a_delta_bomb_is_refused_without_inflating_it() {
    use std::io::{Read, Write};
    let f = Fixture::new();
    let upstream = f.upstream("upstream.git");
    f.serve(&[remote("app", &upstream, &["agent/*"])]);
    git_ok(f.dir.path(), &["clone", "-q", &f.coder_url("app"), "w"]);

    let pack = delta_bomb(1280 << 20);
    assert!(pack.len() < 100 << 10, "{}", pack.len());
    let command = format!(
        "{} {} refs/heads/agent/bomb\0report-status\n",
        "0".repeat(40),
        "1".repeat(40)
    );
    let mut body = format!("{:04x}{command}0000", command.len() + 4).into_bytes();
    body.extend(&pack);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", f.port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(120)))
        .unwrap();
    write!(
        s,
        "POST /git/app.git/git-receive-pack HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Authorization: Basic Y29kZXI6dG9rLWNvZGVy\r\n\
         Content-Type: application/x-git-receive-pack-request\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(&body).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("unpack "), "{answer}");
    assert!(!answer.contains("unpack ok"), "{answer}");
    assert!(
        git(&upstream, &["rev-parse", "--verify", "agent/bomb"])
            .status
            .code()
            != Some(0)
    );
}
