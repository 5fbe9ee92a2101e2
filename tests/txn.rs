//! The guest transaction against a hostile agent, for real: `bottle`
//! against the smolvm double (fixture `tests/fixtures/e2e/`). Each test
//! here failed before one guest transaction per agent (issue 9, items 5, 7
//! and 24; issue 10's call counts).

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use support::project::Project;
use support::{Call, Double};

const CODER: &str = "bottle_e2e_coder";
const READER: &str = "bottle_e2e_reader";

fn project() -> Project {
    Project::with_double(
        "e2e",
        Double::new().with_env("BOTTLE_E2E_SECRET", "not-a-secret"),
    )
}

/// Does this call concern machine `name` (`--name NAME` or `NAME:/path`)?
fn names(call: &Call, name: &str) -> bool {
    call.args
        .iter()
        .any(|a| a == name || a.starts_with(&format!("{name}:")))
}

fn verbs_of(calls: &[Call], machine: &str) -> Vec<String> {
    calls
        .iter()
        .filter(|c| names(c, machine))
        .map(|c| c.verb.clone())
        .collect()
}

fn chmod(path: &std::path::Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Item 7: setup inputs from a developer's checkout (owned by uid 1000, the
/// agent user's uid in most images; group and other writable) land owned
/// by root and unwritable by the agent, which could otherwise rewrite what
/// root runs next.
#[test]
fn setup_inputs_are_roots_and_unwritable_by_the_agent() {
    let p = project();
    let input = p.path("setup/tools.txt");
    std::os::unix::fs::chown(&input, Some(1000), Some(1000)).unwrap();
    chmod(&input, 0o666);
    p.bottle(&["apply"]).success();
    assert_eq!(
        p.double.sh(
            CODER,
            "stat -c '%u %g %a' /opt/bottle/setup/tools /opt/bottle/setup/tools/tools.txt"
        ),
        "0 0 755\n0 0 644\n"
    );
    let write = p.double.exec(
        CODER,
        &[
            "runuser",
            "-u",
            "node",
            "--",
            "sh",
            "-c",
            "echo pwned >> /opt/bottle/setup/tools/tools.txt",
        ],
    );
    assert_ne!(
        write.status.code(),
        Some(0),
        "the agent wrote a setup input"
    );
    // Nothing bottle staged is left for the agent to find.
    assert_eq!(
        p.double.sh(
            CODER,
            "find /var/lib/bottle-stage /var/lib/bottle/txn -mindepth 1"
        ),
        ""
    );
}

/// Item 24: a read-only directory inside a skill installs, updates and
/// goes, leaving no staging directory behind.
#[test]
fn a_read_only_directory_in_a_skill_updates_and_goes() {
    let p = project();
    let notes = p.path("skills/review/notes");
    chmod(&notes, 0o555);
    p.bottle(&["apply"]).success();
    let skills = "/home/node/.claude/skills";
    assert_eq!(
        p.double
            .sh(CODER, &format!("stat -c '%a' {skills}/review/notes")),
        "555\n"
    );

    // An update of a file inside it.
    chmod(&notes, 0o755);
    p.write("skills/review/notes/unsafe.txt", "Never run rm -rf /.\n");
    chmod(&notes, 0o555);
    let update = p.bottle(&["apply"]);
    update.success();
    assert!(
        update.stdout.contains("apply    skills"),
        "{}",
        update.stdout
    );
    assert_eq!(
        p.double
            .sh(CODER, &format!("cat {skills}/review/notes/unsafe.txt")),
        "Never run rm -rf /.\n"
    );
    p.bottle(&["check"]).success();

    // Its removal.
    p.edit(
        "agents.toml",
        "skills = [\"skills/style\", \"skills/review\"]",
        "skills = [\"skills/style\"]",
    );
    p.bottle(&["apply"]).success();
    assert_eq!(
        p.double.sh(CODER, &format!("ls -A {skills}")),
        "style\n",
        "the skill and every staging directory are gone"
    );
    p.bottle(&["check"]).success();
}

/// Item 24: what interrupted runs staged (files an earlier bottle left in
/// /var/lib/bottle-stage, an archive never unpacked, the directories of a
/// transaction whose runner is gone) goes with the next transaction.
#[test]
fn leftovers_of_interrupted_runs_are_removed() {
    let p = project();
    p.bottle(&["apply"]).success();
    p.double.sh(
        CODER,
        "echo old > /var/lib/bottle-stage/Abc123leftover; \
         echo tar > /var/lib/bottle/txn/neverunpacked.tar; \
         mkdir -p /var/lib/bottle/txn/gone/p /var/lib/bottle-stage/gone; \
         touch /var/lib/bottle/txn/gone.lock",
    );
    p.write("prompts/coder.md", "A new prompt.\n");
    p.bottle(&["apply"]).success();
    assert_eq!(
        p.double.sh(
            CODER,
            "find /var/lib/bottle-stage /var/lib/bottle/txn -mindepth 1"
        ),
        ""
    );
}

/// Issue 10: a prompt edit costs one upload and one exec after the
/// observation. Item 5: the ledger records what bottle sent, not what the
/// agent rewrote right after: with the agent rewriting its prompt all the
/// time, `check` reports the drift.
#[test]
fn a_prompt_edit_is_one_transaction_and_records_what_was_sent() {
    let p = project();
    p.bottle(&["apply"]).success();
    // The agent rewrites its prompt file as fast as it can.
    p.double.sh(
        CODER,
        "runuser -u node -- sh -c 'while :; do printf mine > /home/node/.bottle/x && \
         mv -f /home/node/.bottle/x /home/node/.bottle/prompt.md; done' \
         >/dev/null 2>&1 & echo $! > /tmp/rewriter",
    );
    let start = p.double.calls().len();
    p.write("prompts/coder.md", "A new prompt.\n");
    let edit = p.bottle(&["apply"]);
    edit.success();
    let calls = p.double.calls().split_off(start);
    assert_eq!(
        verbs_of(&calls, CODER),
        ["exec", "cp", "exec"],
        "probe, then one transaction"
    );
    assert_eq!(verbs_of(&calls, READER), ["exec"], "probe only");
    assert_eq!(calls.len(), 5, "ls, two probes, cp, exec");
    std::thread::sleep(Duration::from_millis(300));
    p.double.sh(
        CODER,
        "pkill -P $(cat /tmp/rewriter); kill $(cat /tmp/rewriter); true",
    );
    assert_eq!(
        p.double.sh(CODER, "cat /home/node/.bottle/prompt.md"),
        "mine"
    );
    let check = p.bottle(&["check"]);
    check.code(3);
    assert!(
        check.stdout.contains("prompt changed in guest"),
        "{}",
        check.stdout
    );
    // And the next apply converges.
    p.bottle(&["apply"]).success();
    p.bottle(&["check"]).success();
}

/// A supervise server removed from the manifest leaves ~/.claude.json in
/// one transaction, edited from what observation read: Claude Code's own
/// keys stay.
#[test]
fn a_removed_supervise_server_leaves_the_file_claude_code_keeps() {
    let p = project();
    p.bottle(&["apply"]).success();
    p.double.sh(
        CODER,
        r#"runuser -u node -- sh -c 'printf "%s" "{\"numStartups\": 7, \"mcpServers\": {\"supervise\": {\"type\": \"http\", \"url\": \"http://10.8.0.2:9100/\"}, \"other\": {\"type\": \"stdio\", \"command\": \"x\"}}}" > /home/node/.claude.json'"#,
    );
    p.edit(
        "bottles.toml",
        "[bottle.dev.supervise]\nurl = \"http://10.8.0.2:9100/\"",
        "",
    );
    let start = p.double.calls().len();
    let removed = p.bottle(&["apply"]);
    removed.success();
    assert!(
        removed.stdout.contains("undo     supervise"),
        "{}",
        removed.stdout
    );
    let calls = p.double.calls().split_off(start);
    assert_eq!(verbs_of(&calls, CODER), ["exec", "cp", "exec"]);
    let config: serde_json::Value =
        serde_json::from_str(&p.double.sh(CODER, "cat /home/node/.claude.json")).unwrap();
    assert_eq!(
        config,
        serde_json::json!({"numStartups": 7, "mcpServers": {"other": {"type": "stdio", "command": "x"}}})
    );
    p.bottle(&["check"]).success();
}
