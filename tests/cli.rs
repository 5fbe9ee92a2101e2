//! The command line's full output (stdout, stderr, exit code), as a user
//! sees it: help texts, and plan/apply/check/status on the e2e fixture
//! through the smolvm double. Durations, temporary paths and timestamps are
//! filtered out; `apply` runs with one worker so its progress lines come in
//! a stable order (tests/e2e.rs covers real parallelism).

mod support;

use support::project::{Project, Run};

/// `exit: N`, then both streams.
fn transcript(run: &Run) -> String {
    format!(
        "exit: {}\n--- stdout\n{}--- stderr\n{}",
        run.code.map_or("killed".to_owned(), |c| c.to_string()),
        run.stdout,
        run.stderr
    )
}

/// What changes from one run to the next, replaced by placeholders.
fn filters(p: &Project) -> Vec<(String, String)> {
    vec![
        (
            regex_escape(&p.dir().display().to_string()),
            "[MANIFESTS]".into(),
        ),
        (
            regex_escape(&p.state_dir().display().to_string()),
            "[STATE]".into(),
        ),
        (
            regex_escape(&support::Double::binary().display().to_string()),
            "[SMOLVM]".into(),
        ),
        (r"\(\d+\.\d+s".into(), "(<secs>".into()),
        (r"in \d+\.\d+s\.".into(), "in <secs>.".into()),
        (
            r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}".into(),
            "<yyyy-mm-dd hh:mm:ss>".into(),
        ),
        (r"\(\d+[smhd] ago\)".into(), "(<age>)".into()),
        (r"127\.0\.0\.1:\d+".into(), "127.0.0.1:<port>".into()),
    ]
}

fn regex_escape(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let special = "\\.+*?()|[]{}^$".contains(c);
            special.then_some('\\').into_iter().chain([c])
        })
        .collect()
}

macro_rules! snapshot {
    ($p:expr, $name:expr, $run:expr) => {{
        let filters = filters($p);
        let filters: Vec<(&str, &str)> = filters
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        insta::with_settings!({ filters => filters, prepend_module_to_snapshot => true }, {
            insta::assert_snapshot!($name, transcript(&$run));
        });
    }};
}

#[test]
fn help_texts() {
    let p = Project::new("e2e");
    snapshot!(&p, "help", p.bottle_raw(&["--help"]));
    snapshot!(&p, "apply_help", p.bottle_raw(&["apply", "--help"]));
}

#[test]
fn plan_apply_check_status_of_a_project() {
    let p = Project::with_double(
        "e2e",
        support::Double::new().with_env("BOTTLE_E2E_SECRET", "not-a-real-secret-cli"),
    );
    snapshot!(&p, "plan_fresh", p.bottle(&["plan"]));
    snapshot!(
        &p,
        "apply_fresh",
        p.bottle(&["apply", "--parallelism", "1"])
    );
    snapshot!(&p, "apply_again", p.bottle(&["apply"]));

    // Drift in the guest, and a manifest change.
    p.double.sh(
        "bottle_e2e_coder",
        "echo tampered >> /home/node/.bottle/prompt.md",
    );
    p.edit("agents.toml", "skills = [\"skills/style\"]", "skills = []");
    snapshot!(&p, "check_drift", p.bottle(&["check"]));
    snapshot!(&p, "status_drift", p.bottle(&["status"]));
}

/// Names up to the 48 characters the format allows: every column of the
/// status table is as wide as its longest cell, so the columns still line up.
#[test]
fn status_columns_fit_long_names() {
    const PROJECT: &str = "a-project-whose-name-takes-all-forty-eight-chars";
    const AGENT: &str = "reader-whose-name-is-just-as-long-as-it-may-be-x";
    let p = Project::new("e2e");
    p.edit(
        "bottle.toml",
        "name = \"e2e\"",
        &format!("name = \"{PROJECT}\""),
    );
    p.edit("agents.toml", "[agent.reader]", &format!("[agent.{AGENT}]"));
    let run = p.bottle(&["status"]);
    run.success();

    let lines: Vec<&str> = run.stdout.lines().collect();
    let header = lines[1];
    let starts: Vec<usize> = ["MACHINE", "STATE", "LAST APPLIED", "STEPS"]
        .iter()
        .map(|h| header.find(h).unwrap())
        .collect();
    for row in &lines[2..4] {
        for &at in &starts {
            assert!(
                row.as_bytes()[at - 1] == b' ' && row.as_bytes()[at] != b' ',
                "a column starts at {at}:\n{header}\n{row}"
            );
        }
    }
    snapshot!(&p, "status_long_names", run);
}

/// Exit 2 is for mistakes on the command line only: an agent the manifests
/// do not declare, a malformed `--project`. A declared agent whose machine
/// is already gone is the world's state, exit 1.
#[test]
fn usage_errors_exit_2_and_state_problems_1() {
    let p = Project::new("e2e");
    // A typo in an agent name.
    p.bottle(&["plan", "--target", "nobody"]).code(2);
    p.bottle(&["destroy", "--agent", "nobody", "--yes"]).code(2);
    // Declared, but it has no machine (never applied, or destroyed).
    let gone = p.bottle(&["destroy", "--agent", "reader", "--yes"]);
    gone.code(1);
    snapshot!(&p, "destroy_agent_without_machine", gone);
    let gone = p.bottle_raw(&["destroy", "--project", "e2e", "--agent", "reader", "--yes"]);
    gone.code(1);
    assert!(
        gone.stderr.contains("bottle::no-machine"),
        "{}",
        gone.stderr
    );
    // A project id that cannot be one.
    let bad = p.bottle_raw(&["destroy", "--project", "bad_name!", "--yes"]);
    bad.code(2);
    snapshot!(&p, "destroy_bad_project", bad);
    let empty = p.bottle_raw(&["destroy", "--project", "", "--yes"]);
    empty.code(2);
    assert!(
        empty.stderr.contains("bottle::invalid-project-option"),
        "{}",
        empty.stderr
    );
}

/// `destroy` with broken manifests still fails (it cannot tell whose
/// machines to delete), shows what is broken, and says how to go without
/// the manifests.
#[test]
fn destroy_with_broken_manifests_points_to_project() {
    let p = Project::new("e2e");
    p.write("agents.toml", "[agent.coder\nbottle = ");
    let broken = p.bottle(&["destroy", "--yes"]);
    broken.code(1);
    assert!(
        broken.stderr.contains("--project NAME"),
        "{}",
        broken.stderr
    );
    assert!(
        broken.stderr.contains("bottle::toml-syntax"),
        "{}",
        broken.stderr
    );
    snapshot!(&p, "destroy_broken_manifests", broken);
    p.bottle_raw(&["destroy", "--project", "e2e", "--yes"])
        .success();
}

/// bottle without a usable smolvm: the smolvm setup errors, with their
/// (kebab-case, like every other) codes.
#[test]
fn smolvm_missing_or_not_executable() {
    let p = Project::new("e2e");
    let empty = tempfile::tempdir().unwrap();
    let status = |smolvm: Option<&str>| {
        let mut command = std::process::Command::new(Project::binary());
        if let Some(path) = smolvm {
            command.args(["--smolvm", path]);
        }
        let output = command
            .arg("--state-dir")
            .arg(p.state_dir())
            .arg("status")
            .arg(p.dir())
            .env_remove("BOTTLE_RUNTIME")
            .env_remove("BOTTLE_SMOLVM")
            .env_remove("BOTTLE_STATE_DIR")
            .env("PATH", empty.path())
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        support::project::Run {
            args: Vec::new(),
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    };
    let not_found = status(None);
    assert!(
        not_found.stderr.contains("bottle::smolvm::not-found"),
        "{}",
        not_found.stderr
    );
    snapshot!(&p, "smolvm_not_on_path", not_found);
    let not_executable = status(Some("/nonexistent/smolvm"));
    assert!(
        not_executable
            .stderr
            .contains("bottle::smolvm::not-executable"),
        "{}",
        not_executable.stderr
    );
    snapshot!(&p, "smolvm_not_executable", not_executable);
}

/// Diagnostic codes are kebab-case segments after `bottle::`: a code is an
/// interface (scripts and `--json` consumers match on it), so one spelling.
#[test]
fn every_diagnostic_code_is_kebab_case() {
    fn visit(dir: &std::path::Path, bad: &mut Vec<String>, seen: &mut usize) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                visit(&path, bad, seen);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for (at, _) in text.match_indices("bottle::") {
                // Codes are string literals or `code(bottle::...)`; Rust
                // paths (`use bottle::runtime`) and prose are neither.
                let before = &text[..at];
                if !(before.ends_with('"') || before.ends_with("code(")) {
                    continue;
                }
                let code: String = text[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || "_:-".contains(*c))
                    .collect();
                *seen += 1;
                let kebab = code["bottle::".len()..].split("::").all(|segment| {
                    !segment.is_empty()
                        && segment
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                });
                if !kebab {
                    bad.push(format!("{}: {code}", path.display()));
                }
            }
        }
    }
    let (mut bad, mut seen) = (Vec::new(), 0);
    visit(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut bad,
        &mut seen,
    );
    assert!(seen > 50, "found only {seen} codes: is the scan broken?");
    assert!(bad.is_empty(), "not kebab-case:\n{}", bad.join("\n"));
}

/// The README's Commands table names every option of `apply` (the command
/// people script), so none exists only in `--help`.
#[test]
fn the_readme_names_every_apply_option() {
    let p = Project::new("e2e");
    let help = p.bottle_raw(&["apply", "--help"]);
    help.success();
    let options = help.stdout.split("Global options:").next().unwrap();
    let readme =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .unwrap();
    let row = readme
        .lines()
        .find(|l| l.starts_with("| `apply [DIR]`"))
        .expect("README's Commands table has an apply row");
    let flags: Vec<&str> = options
        .split_whitespace()
        .filter(|w| w.starts_with("--") && *w != "--help")
        .collect();
    assert!(flags.len() >= 6, "{flags:?}");
    for flag in flags {
        assert!(
            row.contains(&format!("`{flag}")),
            "README's apply row does not name {flag}:\n{row}"
        );
    }
}

#[test]
fn a_reader_that_goes_away_ends_bottle_quietly() {
    // `bottle schema | head -1`: the pipe closes before bottle writes. The
    // read end is closed before bottle starts, so the race is never won by
    // a write landing in the pipe's buffer first.
    use std::os::unix::process::ExitStatusExt;
    let p = Project::new("e2e");
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = p
        .command_without_dir(&["schema"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(output.status.signal(), Some(libc::SIGPIPE), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stderr), "", "no panic");
}

#[test]
fn validate_checks_what_plan_would_refuse_for_the_chosen_runtime() {
    let p = Project::new("e2e");
    // The e2e fixture's `dev` bottle has an egress allowlist: the local
    // runtime cannot enforce it, and `plan` refuses; so does `validate`.
    let local = p.bottle(&["--runtime", "local", "validate"]);
    local.code(1);
    assert!(
        local.stderr.contains("bottle::local-egress"),
        "{}",
        local.stderr
    );
    let plan = p.bottle(&["--runtime", "local", "plan"]);
    plan.code(1);
    assert!(
        plan.stderr.contains("bottle::local-egress"),
        "{}",
        plan.stderr
    );
    p.bottle(&["validate"]).success();
    // smolvm cannot pull an OCI image without network.
    p.edit(
        "bottles.toml",
        "[bottle.plain]\n",
        "[bottle.plain]\nimage = \"ghcr.io/acme/agent-base:1.2\"\n",
    );
    for command in ["validate", "plan"] {
        let run = p.bottle(&[command]);
        run.code(1);
        assert!(
            run.stderr.contains("bottle::image-needs-network"),
            "{command}: {}",
            run.stderr
        );
    }
}

/// `bottle status` shows each agent's recent egress denials from the gate
/// log (its end only), its own and no other agent's; nothing without a log.
#[test]
fn status_shows_recent_denials_per_agent() {
    let p = Project::new("gated");
    p.edit(
        "bottle.toml",
        "prompt_text = \"You code.\"",
        "prompt_text = \"You code.\"\n\n[agent.reader]\nbottle = \"dev\"\nprompt_text = \"You read.\"",
    );
    // A gate, but no log yet: nothing about denials.
    let before = p.bottle(&["status"]);
    before.success();
    assert!(!before.stdout.contains("denial"), "{}", before.stdout);
    let json: serde_json::Value =
        serde_json::from_str(&p.bottle(&["status", "--json"]).stdout).unwrap();
    assert!(json["agents"][0].get("denials").is_none(), "{json}");

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let denied = |agent: &str, host: &str, port: u16, ago: f64| {
        format!(
            r#"{{"ts":{},"kind":"egress","bottle":"dev","agent":"{agent}","decision":"denied","method":"CONNECT","host":"{host}","port":{port},"rule":"allow_hosts","reason":"not in allow_hosts"}}"#,
            now - ago
        )
    };
    let lines = [
        denied("coder", "old.example", 443, 7200.0),
        denied("coder", "evil.example", 443, 600.0),
        denied("reader", "\\u001b[2Jclear.example", 443, 550.0),
        denied("reader", "reader-only.example", 8443, 500.0),
        r#"{"ts":0,"kind":"egress","bottle":"dev","agent":"coder","decision":"allowed","method":"CONNECT","host":"api.example.com","port":443,"rule":"allow_hosts: api.example.com","mode":"intercept"}"#.to_owned(),
        denied("", "no-credential.example", 443, 300.0),
        denied("coder", "exfil.example", 80, 120.0),
        denied("coder", "paste.example", 443, 60.0),
    ];
    let paths = bottle::gate::paths::GatePaths::new(p.state_dir(), "gated");
    std::fs::create_dir_all(paths.log().parent().unwrap()).unwrap();
    std::fs::write(paths.log(), lines.join("\n") + "\n").unwrap();

    let run = p.bottle(&["status"]);
    run.success();
    // Ages depend on how long the run took: compare without them.
    let text = strip_ages(&run.stdout);
    assert!(
        text.contains(
            "coder: 3 egress denials in the last hour; latest: paste.example:443, exfil.example:80, evil.example:443\n  (`bottle egress-log --agent coder` shows them all)"
        ),
        "{}",
        run.stdout
    );
    assert!(
        text.contains(
            "reader: 2 egress denials in the last hour; latest: reader-only.example:8443, ?[2Jclear.example:443\n"
        ),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains("no-credential"), "{}", run.stdout);
    assert!(!run.stdout.contains("old.example"), "{}", run.stdout);
    assert!(!run.stdout.contains('\u{1b}'), "{}", run.stdout);
    snapshot!(&p, "status_denials", run);

    let run = p.bottle(&["status", "--json"]);
    run.success();
    let json: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let agent = |name: &str| {
        json["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["agent"] == name)
            .unwrap_or_else(|| panic!("no {name}: {json}"))
            .clone()
    };
    let coder = agent("coder")["denials"].clone();
    assert_eq!(coder["last_hour"], 3, "{json}");
    let hosts: Vec<&str> = coder["latest"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["host"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, ["paste.example", "exfil.example", "evil.example"]);
    assert_eq!(coder["latest"][1]["port"], 80);
    assert_eq!(coder["latest"][1]["rule"], "allow_hosts");
    let reader = agent("reader")["denials"].clone();
    assert_eq!(reader["last_hour"], 2, "{json}");
    assert_eq!(reader["latest"][0]["host"], "reader-only.example");

    // `egress-log`: the agent's host arrives escaped; an agent that is
    // neither declared nor in the log is a typo (exit 2), not an empty
    // history.
    let run = p.bottle(&["egress-log", "--agent", "reader"]);
    run.success();
    assert!(
        run.stdout.contains(r"\u{1b}[2Jclear.example:443"),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains('\u{1b}'), "{}", run.stdout);
    let run = p.bottle(&["egress-log", "--agent", "readr"]);
    run.code(2);
    assert!(
        run.stderr.contains("no agent named `readr`"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("declared agents: coder, reader"),
        "{}",
        run.stderr
    );
    assert_eq!(reader["latest"].as_array().unwrap().len(), 2);
}

/// `text` without its ` (5m ago)` ages.
fn strip_ages(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(open) = rest.find(" (") {
        let close = rest[open..].find(')').map(|i| open + i);
        match close {
            Some(close) if rest[open..close].ends_with(" ago") => {
                out.push_str(&rest[..open]);
                rest = &rest[close + 1..];
            }
            _ => {
                out.push_str(&rest[..open + 2]);
                rest = &rest[open + 2..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[test]
fn json_output_when_manifests_do_not_load() {
    let p = Project::new("e2e");
    let valid = p.bottle(&["validate", "--json"]);
    valid.success();
    let v: serde_json::Value = serde_json::from_str(&valid.stdout).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(v["project"], "e2e");
    assert_eq!(v["agents"], serde_json::json!(["coder", "reader"]));

    p.edit("bottles.toml", "cpus = 2", "cpus = 0");
    for command in [
        &["validate", "--json"][..],
        &["plan", "--json"],
        &["check", "--json"],
        &["status", "--json"],
    ] {
        let run = p.bottle(command);
        run.code(1);
        let v: serde_json::Value = serde_json::from_str(&run.stdout)
            .unwrap_or_else(|e| panic!("{command:?}: {e}: {}", run.stdout));
        assert_eq!(v["format_version"], 1);
        let error = &v["error"];
        assert_eq!(error["kind"], "invalid-manifests", "{command:?}: {v}");
        let problem = &error["problems"][0];
        assert_eq!(problem["code"], "bottle::out-of-range", "{v}");
        assert!(
            problem["file"].as_str().unwrap().ends_with("bottles.toml"),
            "{v}"
        );
        assert_eq!(problem["labels"][0]["line"], 5, "{v}");
        assert_eq!(problem["labels"][0]["column"], 8, "{v}");
        // The usual report still goes to stderr.
        assert!(
            run.stderr.contains("bottle::out-of-range"),
            "{}",
            run.stderr
        );
    }
}

#[test]
fn a_value_pasted_into_from_env_is_never_printed() {
    const PASTED: &str = "ghp_pAsTeDvAlUe1234567890";
    let p = Project::new("e2e");
    p.edit(
        "bottles.toml",
        "\"BOTTLE_E2E_SECRET\"",
        &format!("\"{PASTED}\""),
    );
    for args in [
        &["validate"][..],
        &["plan"],
        &["plan", "--json"],
        &["check"],
        &["status"],
    ] {
        let run = p.bottle(args);
        assert!(
            !run.all().contains(PASTED),
            "{args:?} printed it:\n{}",
            run.all()
        );
    }
    let plan = p.bottle(&["plan"]);
    assert!(
        plan.stdout.contains("does not look like a variable name"),
        "{}",
        plan.stdout
    );
}

/// Declining `destroy`'s prompt is the user's choice, not an error: exit 0.
/// The prompt needs a terminal: `script` (util-linux) provides one.
#[test]
fn declining_destroys_prompt_exits_0() {
    use std::io::Write;
    let p = Project::with_double(
        "e2e",
        support::Double::new().with_env("BOTTLE_E2E_SECRET", "not-a-real-secret-cli"),
    );
    p.bottle(&["apply", "--target", "reader"]).success();
    let q = |s: &std::path::Path| bottle::steps::sh_quote(&s.display().to_string());
    let command = format!(
        "{} --smolvm {} --state-dir {} destroy {}",
        q(Project::binary()),
        q(support::Double::binary()),
        q(p.state_dir()),
        q(p.dir())
    );
    let mut script = std::process::Command::new("script");
    script
        .args(["-qec", &command, "/dev/null"])
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    p.double.apply_env(&mut script);
    let mut child = script.spawn().expect("script (util-linux) runs");
    child.stdin.take().unwrap().write_all(b"n\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Delete 1 machine(s)? [y/N]"), "{stdout}");
    assert!(
        stdout.contains("Cancelled; nothing was deleted."),
        "{stdout}"
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert_eq!(p.double.list_json().len(), 1, "nothing was deleted");
}

/// A machine bottle cannot observe (frozen, or in a state it does not
/// know) is never counted as in sync: `check` names it and exits 1.
#[test]
fn a_frozen_machine_is_never_in_sync() {
    let p = Project::with_double(
        "e2e",
        support::Double::new().with_env("BOTTLE_E2E_SECRET", "not-a-real-secret-cli"),
    );
    p.bottle(&["apply", "--target", "reader"]).success();
    p.bottle(&["check", "--target", "reader"]).success();
    for state in ["frozen", "hibernating"] {
        std::fs::write(
            p.double.home().join("states.json"),
            format!("{{\"bottle_e2e_reader\": \"{state}\"}}"),
        )
        .unwrap();
        let check = p.bottle(&["check", "--target", "reader"]);
        check.code(1);
        assert!(
            !check.stdout.contains("In sync"),
            "{state}: {}",
            check.stdout
        );
        assert!(
            check
                .stdout
                .contains("error: agent reader (machine bottle_e2e_reader)")
                && check.stdout.contains(state),
            "{state}: {}",
            check.stdout
        );
        assert!(
            check.stderr.contains("bottle::observe-failed"),
            "{}",
            check.stderr
        );
    }
}

/// A supervise grant the manifests do not declare is in `plan --json`,
/// `status --json` and `check --json` as the same `grants` array (agent,
/// bottle, host, id, reason, until), in `status` also under its agent, and
/// in none of them for another `--target`.
#[test]
fn plan_status_and_check_show_undeclared_grants_alike() {
    use bottle::gate::paths::GatePaths;
    use bottle::gate::supervise::store::{Store, now};
    let p = Project::with_double(
        "e2e",
        support::Double::new().with_env("BOTTLE_E2E_SECRET", "not-a-real-secret-grants"),
    );
    let json = |args: &[&str]| -> serde_json::Value {
        let run = p.bottle(args);
        serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {run:?}"))
    };
    // None yet: an empty array, present in all three.
    for command in ["plan", "status", "check"] {
        assert_eq!(json(&[command, "--json"])["grants"], serde_json::json!([]));
    }

    let store = Store::new(&GatePaths::new(p.state_dir(), "e2e"));
    let who = bottle::gate::AgentIdentity {
        bottle: "dev".into(),
        agent: "coder".into(),
    };
    let asked = store
        .request_egress(&who, "extra.example", "fetch a crate", now())
        .unwrap();
    let approved = store.approve(&asked.id, 1800, now()).unwrap();

    let plan = json(&["plan", "--json"]);
    let grants = plan["grants"].clone();
    assert_eq!(
        grants,
        serde_json::json!([{
            "id": asked.id,
            "bottle": "dev",
            "agent": "coder",
            "host": "extra.example",
            "reason": "fetch a crate",
            "until": approved.until().unwrap(),
        }]),
        "{plan}"
    );
    let status = json(&["status", "--json"]);
    assert_eq!(status["grants"], grants, "{status}");
    let agent = |name: &str| {
        status["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["agent"] == name)
            .unwrap_or_else(|| panic!("no {name}: {status}"))
            .clone()
    };
    assert_eq!(agent("coder")["grants"], grants, "{status}");
    assert_eq!(agent("reader")["grants"], serde_json::json!([]), "{status}");
    let check = json(&["check", "--json"]);
    assert_eq!(check["grants"], grants, "{check}");

    // Another agent's plan and check are not about this grant.
    for command in ["plan", "check"] {
        let other = json(&[command, "--json", "--target", "reader"]);
        assert_eq!(other["grants"], serde_json::json!([]), "{other}");
    }
}

/// Names with numbers are listed as a person counts: a1, a2, a10 (not a1,
/// a10, a2) in `plan`, `status`, `validate` and `graph`, text and JSON.
#[test]
fn agents_are_listed_in_natural_order() {
    let p = Project::with_double(
        "e2e",
        support::Double::new().with_env("BOTTLE_E2E_SECRET", "not-a-real-secret-order"),
    );
    p.write(
        "more.toml",
        "[agent.a10]\nbottle = \"plain\"\n\n[agent.a2]\nbottle = \"plain\"\n\n[agent.a1]\nbottle = \"plain\"\n",
    );
    let expected = ["a1", "a2", "a10", "coder", "reader"];
    let in_order = |text: &str, pattern: &dyn Fn(&str) -> String| {
        let at: Vec<usize> = expected
            .iter()
            .map(|a| {
                text.find(&pattern(a))
                    .unwrap_or_else(|| panic!("no {a}: {text}"))
            })
            .collect();
        assert!(at.is_sorted(), "{at:?}: {text}");
    };
    let json = |args: &[&str]| -> serde_json::Value {
        serde_json::from_str(&p.bottle(args).stdout).unwrap()
    };
    let names = |values: &serde_json::Value, key: &str| -> Vec<String> {
        let mut names: Vec<String> = values
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v[key].as_str().map(str::to_owned))
            .collect();
        names.dedup();
        names
    };

    in_order(&p.bottle(&["plan"]).stdout, &|a| format!("agent {a} ("));
    assert_eq!(
        names(&json(&["plan", "--json"])["actions"], "agent"),
        expected
    );
    assert_eq!(
        json(&["validate", "--json"])["agents"],
        serde_json::json!(expected)
    );
    in_order(&p.bottle(&["graph"]).stdout, &|a| format!("agent {a} ("));
    p.bottle(&["apply"]).success();
    in_order(&p.bottle(&["status"]).stdout, &|a| format!("\n{a} "));
    assert_eq!(
        names(&json(&["status", "--json"])["agents"], "agent"),
        expected
    );
}
