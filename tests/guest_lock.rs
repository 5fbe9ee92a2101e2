//! The per-step guest lock, for real: `bottle` against the smolvm double
//! (fixture `tests/fixtures/e2e/`), with the guest's own `flock`, `runuser`
//! and `update-ca-certificates`.
//!
//! An apply killed while a step's command runs in the guest leaves that
//! command running (smolvm does not end it); the next apply must wait for it
//! instead of running the same step beside it. What the agent user or a
//! setup step runs must never hold the lock.

mod support;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use bottle::runtime::RuntimeError;
use bottle::runtime::RuntimeErrorKind;
use bottle::steps::txn::{self, Ledger, StepOutcome, TxnStep};
use bottle::steps::{self, LOCK_DIR, Work};
use support::Double;
use support::project::{Project, Run};

const CODER: &str = "bottle_e2e_coder";
const READER: &str = "bottle_e2e_reader";
const BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Where the guest's stand-in `update-ca-certificates` logs its runs.
const RUNS: &str = "/var/lib/e2e-update-ca.log";

fn project() -> Project {
    Project::with_double(
        "e2e",
        Double::new().with_env("BOTTLE_E2E_SECRET", "not-a-real-secret-guest-lock"),
    )
}

fn certificates(p: &Project) -> usize {
    p.double
        .sh(CODER, &format!("grep -c 'BEGIN CERTIFICATE' {BUNDLE}"))
        .trim()
        .parse()
        .unwrap()
}

/// Whether `step`'s lock is free in `machine` right now.
fn lock_is_free(p: &Project, machine: &str, step: &str) -> bool {
    let lock = steps::lock_path(LOCK_DIR, step);
    p.double.sh(
        machine,
        &format!("if flock -n {lock} true; then echo free; else echo held; fi"),
    ) == "free\n"
}

fn alive(p: &Project, machine: &str, pid: &str) -> bool {
    p.double
        .exec(machine, &["sh", "-c", &format!("kill -0 {}", pid.trim())])
        .status
        .success()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `bottle apply` in the background, killed (SIGKILL) when dropped.
struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `[n/N] done  agent: apply step (1.23s)` line of a step.
fn step_seconds(run: &Run, line: &str) -> f64 {
    let found = run
        .stderr
        .lines()
        .find(|l| l.contains(line))
        .unwrap_or_else(|| panic!("no {line:?} in\n{}", run.stderr));
    found
        .rsplit_once(" (")
        .and_then(|(_, t)| t.strip_suffix("s)"))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no time in {found:?}"))
}

#[test]
fn a_step_left_running_by_a_killed_apply_makes_the_next_apply_wait_for_it() {
    let p = project();
    p.bottle(&["apply"]).success();
    let expected = certificates(&p);
    assert!(expected > 1, "the system CAs and bottle's");

    // A slow `update-ca-certificates` (the real one, two seconds late)
    // that logs when each run starts and ends; /usr/local/sbin comes first
    // on root's PATH.
    let real = p
        .double
        .sh(CODER, "command -v update-ca-certificates")
        .trim()
        .to_owned();
    p.double.sh(
        CODER,
        &format!(
            "printf '#!/bin/sh\\necho \"start $$ $(date +%%s.%%N)\" >> {RUNS}\\nsleep 2\\n\
             {real} \"$@\"; s=$?\\necho \"end $$ $(date +%%s.%%N)\" >> {RUNS}\\nexit $s\\n' \
             > /usr/local/sbin/update-ca-certificates \
             && chmod 755 /usr/local/sbin/update-ca-certificates"
        ),
    );
    // Another certificate: the ca step applies again (in both applies).
    let other = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/graph/other-ca.pem"),
    )
    .unwrap();
    assert_ne!(other, p.read("certs/e2e-ca.pem"));
    p.write("certs/e2e-ca.pem", &other);

    // An apply killed while its `update-ca-certificates` runs in the guest.
    // Its smolvm call lives on (a process group of its own), as smolvm's
    // guest command does.
    let mut command = p.command(&["apply"]);
    command.stdout(Stdio::null()).stderr(Stdio::null());
    let mut killed = Background(command.spawn().expect("starting bottle apply"));
    wait_until(
        "the ca step to run in the guest",
        Duration::from_secs(60),
        || {
            !p.double
                .sh(CODER, &format!("cat {RUNS} 2>/dev/null || true"))
                .is_empty()
        },
    );
    killed.0.kill().unwrap();
    let status = killed.0.wait().unwrap();
    assert_eq!(status.code(), None, "killed before it finished");

    // The next apply runs the ca step only once the orphan is done.
    let next = p.bottle(&["apply"]);
    next.success();
    let runs = p.double.sh(CODER, &format!("cat {RUNS}"));
    // (what, pid, time)
    let runs: Vec<(&str, &str, f64)> = runs
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[0], f[1], f[2].parse().unwrap())
        })
        .collect();
    assert_eq!(runs.len(), 4, "two runs: {runs:?}");
    assert_eq!(
        runs.iter().map(|r| r.0).collect::<Vec<_>>(),
        ["start", "end", "start", "end"],
        "the two runs overlapped: {runs:?}"
    );
    assert_eq!(runs[0].1, runs[1].1, "{runs:?}");
    assert_eq!(runs[2].1, runs[3].1, "{runs:?}");
    assert_ne!(runs[0].1, runs[2].1, "{runs:?}");
    // And it did wait, rather than come late: its ca step lasted well
    // beyond its own run (the upload and ledger write take milliseconds).
    let own = runs[3].2 - runs[2].2;
    let step = step_seconds(&next, "coder: apply ca");
    assert!(
        step > own + 0.5,
        "step {step}s, own run {own}s: {runs:?}\n{}",
        next.stderr
    );

    // The bundle is whole: every system CA once, bottle's included.
    assert_eq!(certificates(&p), expected);
    p.bottle(&["check"]).success();
    assert!(lock_is_free(&p, CODER, "ca"));
}

#[test]
fn agent_user_and_setup_commands_never_hold_the_lock() {
    let p = project();
    p.bottle(&["apply"]).success();
    let rt = p.double.runtime();
    // `[` is the shell's own: /proc/self is the (sub)shell running it.
    let fd9 = "if [ -e /proc/self/fd/9 ]; then echo fd9 open; else echo fd9 closed; fi";

    // In a guest transaction, a root script holds its step's lock while it
    // runs, on fd 9; a script it runs as the agent user is the user's, with
    // its arguments, and has no fd 9: a process it leaves running does not
    // hold the lock.
    let root = Work::new(
        "checking the lock",
        "-",
        format!(
            "{{ id -un; {fd9}; if flock -n {} true; then echo free; else echo held; fi; }} > /tmp/root-check",
            steps::lock_path(LOCK_DIR, "lockcheck")
        ),
    );
    let user = Work::new("leaving a daemon", "-", "bottle_as node \"$1\" \"$2\"").args([
        format!(
            "{{ echo \"$(id -un) $1\"; {fd9}; }} > /tmp/agent-check; sleep 300 >/dev/null 2>&1 & echo $! > /tmp/agent-daemon"
        ),
        "arg one".to_owned(),
    ]);
    let step = |work: Work, after: Vec<usize>| TxnStep {
        step: "lockcheck".into(),
        work,
        ledger: Ledger::Remove,
        after,
    };
    let outcomes = txn::run(
        &rt,
        CODER,
        "node",
        &[step(root, vec![]), step(user, vec![0])],
    );
    assert!(
        outcomes.iter().all(|o| matches!(o, StepOutcome::Done)),
        "{outcomes:?}"
    );
    assert_eq!(
        p.double.sh(CODER, "cat /tmp/root-check"),
        "root\nfd9 open\nheld\n"
    );
    assert_eq!(
        p.double.sh(CODER, "cat /tmp/agent-check"),
        "node arg one\nfd9 closed\n"
    );
    let daemon = p.double.sh(CODER, "cat /tmp/agent-daemon");
    assert!(alive(&p, CODER, &daemon), "the agent's daemon runs");
    assert!(lock_is_free(&p, CODER, "lockcheck"));
    p.double.sh(CODER, &format!("kill {}", daemon.trim()));

    // A setup command that starts a daemon: the step, its ledger write
    // (same lock) and the next apply go through at once.
    p.edit(
        "bottles.toml",
        "[[bottle.plain.setup]]",
        "[[bottle.plain.setup]]\nname = \"daemon\"\n\
         run = \"sleep 300 >/dev/null 2>&1 & echo $! > /var/lib/setup-daemon\"\n\n\
         [[bottle.plain.setup]]",
    );
    let start = Instant::now();
    let applied = p.bottle(&["apply"]);
    applied.success();
    assert!(
        applied.stdout.contains("reader: apply setup:daemon"),
        "{}",
        applied.stdout
    );
    assert!(start.elapsed() < Duration::from_secs(60), "{applied:?}");
    let daemon = p.double.sh(READER, "cat /var/lib/setup-daemon");
    assert!(alive(&p, READER, &daemon), "the setup step's daemon runs");
    assert!(lock_is_free(&p, READER, "setup:daemon"));
    p.bottle(&["check"]).success();
    p.double.sh(READER, &format!("kill {}", daemon.trim()));
}

#[test]
fn a_taken_name_says_an_interrupted_run_may_still_be_creating_it() {
    use miette::Diagnostic;
    let error = RuntimeError::new("create", CODER, RuntimeErrorKind::AlreadyExists);
    assert_eq!(
        error.to_string(),
        "create bottle_e2e_coder: a machine with this name already exists"
    );
    let help = error.help().expect("a help line").to_string();
    for expected in [
        "an interrupted bottle run may still be creating it: wait a moment and run `bottle apply` again",
        "Only if `smolvm machine ls` shows bottle_e2e_coder without bottle's labels",
        "`smolvm machine delete --name bottle_e2e_coder -f`",
    ] {
        assert!(help.contains(expected), "{expected:?} in {help:?}");
    }
}
