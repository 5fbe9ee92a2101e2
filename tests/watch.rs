//! `bottle watch` end to end: a real watch process (`--json`, a short
//! debounce) over the smolvm double, driven by editing files the way editors
//! save them, checked inside the guests and by counting the double's calls.
//!
//! Every test holds a `Machines` guard (declared first, dropped last) that
//! deletes whatever the double lists, and a `Watch` guard that kills the
//! watch process: nothing is left behind when an assertion fails.

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Call, Double, stderr, stdout};

const BOTTLE: &str = env!("CARGO_BIN_EXE_bottle");
/// Creating machines under a loaded CI box can be slow.
const STARTUP: Duration = Duration::from_secs(120);
const EVENT: Duration = Duration::from_secs(30);
/// Longer than the debounce, its settle window and a reload together.
const QUIET: Duration = Duration::from_millis(1200);

// --- fixture -------------------------------------------------------------

/// A manifests directory with agents `a` and `b` (bottle `dev`, prompt
/// files) and `c` (bottle `other`, inline prompt).
struct Project {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    dir: PathBuf,
    state: PathBuf,
    name: String,
}

const BOTTLES: &str = r#"
[bottle.dev]
cpus = 1
memory_mib = 256
env = { STAGE = "one" }

[bottle.other]
cpus = 1
memory_mib = 256
"#;

const AGENTS_AB: &str = r#"
[agent.a]
bottle = "dev"
prompt = "../prompts/a.md"

[agent.b]
bottle = "dev"
prompt = "../prompts/b.md"
"#;

const AGENT_C: &str = r#"
[agent.c]
bottle = "other"
prompt_text = "You are C."
"#;

impl Project {
    fn new(name: &str) -> Self {
        let tmp = tempfile::tempdir().expect("temporary directory");
        let root = tmp.path().canonicalize().expect("canonical temp dir");
        let dir = root.join("manifests");
        for sub in ["agents", "prompts"] {
            std::fs::create_dir_all(dir.join(sub)).expect("fixture directories");
        }
        let project = Self {
            _tmp: tmp,
            state: root.join("state"),
            dir,
            root,
            name: name.to_owned(),
        };
        project.write(
            "bottle.toml",
            &format!("[project]\nname = \"{name}\"\n{BOTTLES}"),
        );
        project.write("agents/ab.toml", AGENTS_AB);
        project.write("agents/c.toml", AGENT_C);
        project.write("prompts/a.md", "You are A, version 1.\n");
        project.write("prompts/b.md", "You are B, version 1.\n");
        project
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    fn write(&self, rel: &str, text: &str) {
        std::fs::write(self.path(rel), text).expect("writing a fixture file");
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).expect("reading a fixture file")
    }

    fn machine(&self, agent: &str) -> String {
        format!("bottle_{}_{agent}", self.name)
    }
}

// --- how editors save ----------------------------------------------------

type Save = fn(&Path, &str);

/// vim's default: probe the directory with `4913`, keep a backup by
/// renaming the original to `name~`, write a new file, drop the backup, and
/// leave a swap file around meanwhile.
fn save_like_vim(path: &Path, text: &str) {
    let dir = path.parent().unwrap();
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let swap = dir.join(format!(".{name}.swp"));
    std::fs::write(&swap, "swap").unwrap();
    std::fs::write(dir.join("4913"), "").unwrap();
    std::fs::remove_file(dir.join("4913")).unwrap();
    let backup = dir.join(format!("{name}~"));
    std::fs::rename(path, &backup).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::remove_file(&backup).unwrap();
    std::fs::remove_file(&swap).unwrap();
}

/// Write a temporary file next to the target, then rename it into place
/// (atomic replace: `sed -i`, many IDEs, `git checkout`).
fn save_by_rename(path: &Path, text: &str) {
    let tmp = path.with_file_name("sedT3mp0");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// --- the watch process ---------------------------------------------------

struct Watch {
    child: Child,
    events: Receiver<Value>,
    seen: Vec<Value>,
    stderr: Arc<Mutex<String>>,
}

impl Watch {
    fn start(double: &Double, project: &Project, flags: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(BOTTLE)
            .args([
                "--smolvm",
                Double::binary().to_str().unwrap(),
                "--state-dir",
            ])
            .arg(&project.state)
            .args(["watch", "--json", "--debounce", "100"])
            .args(flags)
            .arg(&project.dir)
            .env("SMOLVM_DOUBLE_HOME", double.home())
            .env("SMOLVM_DOUBLE_RESOLVE", "any")
            .envs(env.iter().copied())
            .env_remove("BOTTLE_RUNTIME")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting bottle watch");
        let (tx, events) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| Value::String(format!("not JSON: {line}")));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Self {
            child,
            events,
            seen: Vec::new(),
            stderr,
        }
    }

    fn report(&self) -> String {
        let events: Vec<String> = self.seen.iter().map(|e| e.to_string()).collect();
        format!(
            "events so far:\n{}\nstderr:\n{}",
            events.join("\n"),
            self.stderr.lock().unwrap()
        )
    }

    /// The next event, or `None` after `timeout`.
    fn next(&mut self, timeout: Duration) -> Option<Value> {
        match self.events.recv_timeout(timeout) {
            Ok(event) => {
                assert!(event.is_object(), "{event}\n{}", self.report());
                // Every line, so every test checks it.
                assert_eq!(event["format_version"], 1, "{event}");
                self.seen.push(event.clone());
                Some(event)
            }
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                // The process ended: give its stderr a moment to arrive.
                std::thread::sleep(Duration::from_millis(100));
                panic!("bottle watch exited\n{}", self.report())
            }
        }
    }

    /// Wait for the first event matching `want`, failing after `timeout`.
    fn wait(&mut self, what: &str, timeout: Duration, want: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left) {
                Some(event) if want(&event) => return event,
                Some(_) => {}
                None => panic!("no {what} within {timeout:?}\n{}", self.report()),
            }
        }
    }

    /// The next event that ends a reconcile: done, failed, skip or invalid.
    fn outcome(&mut self, timeout: Duration) -> Value {
        self.wait("reconcile outcome", timeout, |e| {
            matches!(event(e), "done" | "failed" | "skip" | "invalid")
        })
    }

    /// Every event in the next `period` (which should be quiet).
    fn events_during(&mut self, period: Duration) -> Vec<Value> {
        let deadline = Instant::now() + period;
        let mut got = Vec::new();
        while let Some(e) = self.next(deadline.saturating_duration_since(Instant::now())) {
            got.push(e);
        }
        got
    }

    fn assert_quiet(&mut self, after: &str) {
        let got = self.events_during(QUIET);
        assert!(
            got.is_empty(),
            "expected nothing after {after}, got {got:#?}\n{}",
            self.report()
        );
    }

    /// Whatever the process printed before it ended.
    fn rest(&mut self) {
        while let Ok(e) = self.events.recv_timeout(Duration::from_secs(2)) {
            assert_eq!(e["format_version"], 1, "{e}");
            self.seen.push(e);
        }
    }

    /// Ctrl-C, then wait for the process to end.
    fn interrupt(&mut self) -> ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        assert_eq!(rc, 0, "sending SIGINT");
        let deadline = Instant::now() + EVENT;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for bottle watch") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "bottle watch did not stop after SIGINT\n{}",
                self.report()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deletes every machine of the double when dropped.
struct Machines<'a>(&'a Double);

impl Drop for Machines<'_> {
    fn drop(&mut self) {
        let out = self.0.run(&["machine", "ls", "--json"]);
        let listed: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        for m in listed {
            if let Some(name) = m["name"].as_str() {
                let _ = self.0.run(&["machine", "delete", "--name", name, "-f"]);
            }
        }
    }
}

fn event(e: &Value) -> &str {
    e["event"].as_str().unwrap_or_default()
}

fn agents(e: &Value) -> Vec<String> {
    e["agents"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Run a shell command in a guest; its stdout.
fn guest(double: &Double, machine: &str, script: &str) -> String {
    let out = double.run(&[
        "machine", "exec", "--name", machine, "--", "sh", "-c", script,
    ]);
    assert!(out.status.success(), "exec in {machine}: {}", stderr(&out));
    stdout(&out)
}

fn prompt_in(double: &Double, machine: &str) -> String {
    guest(double, machine, "cat /home/node/.bottle/prompt.md")
}

fn machine_names(double: &Double) -> Vec<String> {
    let out = double.run(&["machine", "ls", "--json"]);
    let listed: Vec<Value> = serde_json::from_slice(&out.stdout).expect("ls --json");
    let mut names: Vec<String> = listed
        .iter()
        .filter_map(|m| m["name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    names
}

/// Calls since `mark` (an earlier `double.calls().len()`).
fn calls_since(double: &Double, mark: usize) -> Vec<Call> {
    double.calls().split_off(mark)
}

fn names_machine(call: &Call, machine: &str) -> bool {
    call.args
        .iter()
        .any(|a| a == machine || a.starts_with(&format!("{machine}:")))
}

fn is_probe(call: &Call) -> bool {
    call.verb == "exec" && call.args.iter().any(|a| a.contains("@@bottle-probe"))
}

/// Start a watch and wait for its first reconcile to finish cleanly.
fn started(double: &Double, project: &Project, flags: &[&str], env: &[(&str, &str)]) -> Watch {
    let mut watch = Watch::start(double, project, flags, env);
    let first = watch.wait("the first reconcile", EVENT, |e| event(e) == "reconcile");
    assert_eq!(first["trigger"], "start", "{first}");
    assert_eq!(first["full"], true);
    let done = watch.outcome(STARTUP);
    assert_eq!(event(&done), "done", "{done}\n{}", watch.report());
    watch
}

// --- tests ---------------------------------------------------------------

#[test]
fn a_prompt_edit_touches_one_step_of_one_agent_and_editor_noise_nothing() {
    let double = Double::new();
    let _machines = Machines(&double);
    let project = Project::new("wprompt");
    let mut watch = started(&double, &project, &[], &[]);
    let (ma, mb, mc) = (
        project.machine("a"),
        project.machine("b"),
        project.machine("c"),
    );
    assert_eq!(
        machine_names(&double),
        vec![ma.clone(), mb.clone(), mc.clone()]
    );
    assert_eq!(prompt_in(&double, &ma), "You are A, version 1.\n");
    assert_eq!(prompt_in(&double, &mc), "You are C.");

    // Three ways editors save; each is one reconcile of agent a's prompt.
    let saves: [(&str, Save); 3] = [
        ("vim", save_like_vim),
        ("rename", save_by_rename),
        ("in place", |p, t| std::fs::write(p, t).unwrap()),
    ];
    for (n, (how, save)) in saves.into_iter().enumerate() {
        let text = format!("You are A, version {}.\n", n + 2);
        let mark = double.calls().len();
        save(&project.path("prompts/a.md"), &text);
        let started = watch.wait("a reconcile", EVENT, |e| event(e) != "action");
        assert_eq!(
            event(&started),
            "reconcile",
            "{how}: {started}\n{}",
            watch.report()
        );
        assert_eq!(started["trigger"], "files");
        assert_eq!(agents(&started), ["a"], "{how}");
        assert_eq!(
            started["files"],
            serde_json::json!(["prompts/a.md"]),
            "{how}"
        );
        let action = watch.wait("the prompt action", EVENT, |e| event(e) != "blocked");
        assert_eq!(event(&action), "action", "{how}: {action}");
        assert_eq!(
            (
                &action["agent"],
                &action["action"],
                &action["step"],
                &action["status"]
            ),
            (
                &"a".into(),
                &"apply".into(),
                &"prompt".into(),
                &"done".into()
            ),
            "{how}"
        );
        let done = watch.outcome(EVENT);
        assert_eq!(event(&done), "done", "{how}: {done}");
        assert_eq!(done["done"], 1, "{how}");
        watch.assert_quiet(how);
        assert_eq!(prompt_in(&double, &ma), text, "{how}");

        // Exactly: one list, one probe of a's machine, one copy into it,
        // the prompt step's execs, nothing for b or c.
        let calls = calls_since(&double, mark);
        // The `prompt_in` exec above is ours, not bottle's.
        let calls: Vec<&Call> = calls[..calls.len() - 1].iter().collect();
        let count = |f: &dyn Fn(&Call) -> bool| calls.iter().filter(|c| f(c)).count();
        assert_eq!(count(&|c| c.verb == "ls"), 1, "{how}: {calls:#?}");
        assert_eq!(count(&|c| is_probe(c)), 1, "{how}: {calls:#?}");
        assert_eq!(count(&|c| is_probe(c) && names_machine(c, &ma)), 1);
        assert_eq!(count(&|c| c.verb == "cp" && names_machine(c, &ma)), 1);
        assert!(count(&|c| c.verb == "exec" && !is_probe(c) && names_machine(c, &ma)) >= 1);
        assert_eq!(
            count(&|c| names_machine(c, &mb) || names_machine(c, &mc)),
            0,
            "{how}: {calls:#?}"
        );
        assert_eq!(
            count(&|c| ["create", "start", "stop", "delete", "update"].contains(&c.verb.as_str())),
            0
        );
    }
    assert_eq!(prompt_in(&double, &mb), "You are B, version 1.\n");

    // Noise: swap and backup files, a file nothing references, VCS
    // internals, bottle's own state directory.
    let mark = double.calls().len();
    std::fs::write(project.path("prompts/.a.md.swp"), "x").unwrap();
    std::fs::write(project.path("prompts/a.md~"), "x").unwrap();
    std::fs::write(project.path("prompts/#a.md#"), "x").unwrap();
    std::fs::write(project.path("prompts/notes.txt"), "x").unwrap();
    std::fs::create_dir_all(project.path(".git/refs")).unwrap();
    std::fs::write(project.path(".git/HEAD"), "ref: refs/heads/main\n").unwrap();
    std::fs::write(project.path(".git/refs/x.toml"), "").unwrap();
    std::fs::write(project.path(".hidden.toml"), "this is not toml").unwrap();
    std::fs::create_dir_all(project.path("scratch")).unwrap();
    std::fs::write(project.path("scratch/readme"), "x").unwrap();
    watch.assert_quiet("editor and VCS noise");
    // Reading files (as bottle's reloads do) is no change either.
    let _ = project.read("prompts/a.md");
    watch.assert_quiet("reading a prompt");
    assert_eq!(calls_since(&double, mark).len(), 0);

    // A touch that changes nothing reloads, finds nothing, does nothing.
    let text = project.read("prompts/a.md");
    save_by_rename(&project.path("prompts/a.md"), &text);
    let skip = watch.outcome(EVENT);
    assert_eq!(event(&skip), "skip", "{skip}");
    assert_eq!(calls_since(&double, mark).len(), 0);
}

#[test]
fn a_bottle_change_reaches_every_agent_using_it_and_only_them() {
    let double = Double::new();
    let _machines = Machines(&double);
    let project = Project::new("wbottle");
    let mut watch = started(&double, &project, &[], &[]);
    let (ma, mb, mc) = (
        project.machine("a"),
        project.machine("b"),
        project.machine("c"),
    );
    assert_eq!(guest(&double, &ma, "echo $STAGE"), "one\n");

    let mark = double.calls().len();
    let text = project.read("bottle.toml").replace("\"one\"", "\"two\"");
    save_like_vim(&project.path("bottle.toml"), &text);
    let started = watch.wait("a reconcile", EVENT, |e| event(e) == "reconcile");
    assert_eq!(agents(&started), ["a", "b"], "{started}");
    assert_eq!(started["files"], serde_json::json!(["bottle.toml"]));
    let done = watch.outcome(EVENT);
    assert_eq!(event(&done), "done", "{done}\n{}", watch.report());
    let restarts: Vec<&Value> = watch
        .seen
        .iter()
        .filter(|e| event(e) == "action" && e["reconcile"] == started["reconcile"])
        .collect();
    assert_eq!(restarts.len(), 2, "{restarts:#?}");
    for r in &restarts {
        assert_eq!(
            (&r["action"], &r["status"]),
            (&"restart".into(), &"done".into())
        );
    }
    watch.assert_quiet("the bottle change");
    for m in [&ma, &mb] {
        assert_eq!(guest(&double, m, "echo $STAGE"), "two\n", "{m}");
    }
    let calls = calls_since(&double, mark);
    assert!(
        !calls
            .iter()
            .any(|c| names_machine(c, &mc) && c.verb != "exec"),
        "{calls:#?}"
    );
    assert_eq!(
        calls.iter().filter(|c| names_machine(c, &mc)).count(),
        0,
        "agent c uses another bottle: {calls:#?}"
    );
}

#[test]
fn invalid_manifests_keep_the_last_good_state_until_fixed() {
    let double = Double::new();
    let _machines = Machines(&double);
    let project = Project::new("winvalid");
    let mut watch = started(&double, &project, &[], &[]);
    let ma = project.machine("a");

    // Half-saved: agent c is gone from a file that no longer parses. Acting
    // on it would delete c's machine; nothing may happen.
    let mark = double.calls().len();
    save_by_rename(&project.path("agents/c.toml"), "[agent.c\nbottle = ");
    let invalid = watch.outcome(EVENT);
    assert_eq!(event(&invalid), "invalid", "{invalid}");
    assert_eq!(invalid["codes"], serde_json::json!(["bottle::toml-syntax"]));
    let diagnostics = invalid["diagnostics"].as_str().unwrap();
    assert!(diagnostics.contains("agents/c.toml"), "{diagnostics}");
    assert!(
        !diagnostics.contains('\u{1b}'),
        "no colour in JSON: {diagnostics:?}"
    );
    // Re-reading in the background reports nothing new.
    let later = watch.events_during(Duration::from_millis(2600));
    assert!(later.is_empty(), "{later:#?}");
    assert_eq!(
        calls_since(&double, mark).len(),
        0,
        "nothing touched the runtime"
    );

    // A second, different mistake is reported too (each batch reloads).
    save_by_rename(
        &project.path("agents/c.toml"),
        "[agent.c]\nbottle = \"nope\"\nprompt_text = \"x\"\n",
    );
    let invalid = watch.outcome(EVENT);
    assert_eq!(event(&invalid), "invalid", "{invalid}");
    assert_eq!(
        invalid["codes"],
        serde_json::json!(["bottle::unknown-bottle"])
    );

    // A prompt edit while invalid waits: the last good state stays.
    std::fs::write(project.path("prompts/a.md"), "You are A, fixed.\n").unwrap();
    let invalid = watch.outcome(EVENT);
    assert_eq!(event(&invalid), "invalid", "{invalid}");
    assert_eq!(prompt_in(&double, &ma), "You are A, version 1.\n");
    assert_eq!(
        machine_names(&double).len(),
        3,
        "no machine was created or deleted"
    );

    // Fixing the file resumes: only the agent whose input changed meanwhile.
    save_like_vim(&project.path("agents/c.toml"), AGENT_C);
    let resumed = watch.wait("the resumed reconcile", EVENT, |e| event(e) != "action");
    assert_eq!(
        event(&resumed),
        "reconcile",
        "{resumed}\n{}",
        watch.report()
    );
    assert!(
        resumed["reason"].as_str().unwrap().contains("valid again"),
        "{resumed}"
    );
    assert_eq!(agents(&resumed), ["a"]);
    assert_eq!(event(&watch.outcome(EVENT)), "done");
    assert_eq!(prompt_in(&double, &ma), "You are A, fixed.\n");

    // Renaming the project would manage other machines than the ones this
    // watch holds the lock for: refused like an invalid manifest.
    let bottles = project.read("bottle.toml");
    save_by_rename(
        &project.path("bottle.toml"),
        &bottles.replace("name = \"winvalid\"", "name = \"winvalid2\""),
    );
    let renamed = watch.outcome(EVENT);
    assert_eq!(event(&renamed), "invalid", "{renamed}");
    assert_eq!(
        renamed["codes"],
        serde_json::json!(["bottle::project-renamed"])
    );
    save_by_rename(&project.path("bottle.toml"), &bottles);
    assert_eq!(event(&watch.outcome(EVENT)), "skip");
    assert_eq!(machine_names(&double).len(), 3);

    // A referenced file renamed away is a missing path; renaming it back
    // changes nothing in any guest.
    std::fs::rename(project.path("prompts/b.md"), project.path("prompts/b.old")).unwrap();
    let invalid = watch.outcome(EVENT);
    assert_eq!(event(&invalid), "invalid", "{invalid}");
    assert_eq!(
        invalid["codes"],
        serde_json::json!(["bottle::missing-path"])
    );
    std::fs::rename(project.path("prompts/b.old"), project.path("prompts/b.md")).unwrap();
    let back = watch.outcome(EVENT);
    assert_eq!(event(&back), "skip", "{back}");
    watch.assert_quiet("the rename back");
}

#[test]
fn agents_added_renamed_and_removed_and_blocked_actions_reported_once() {
    let double = Double::new();
    let _machines = Machines(&double);
    let project = Project::new("wagents");
    let mut watch = started(&double, &project, &[], &[]);

    // A new manifest, saved by rename: only the new agent.
    std::fs::write(project.path("prompts/d.md"), "You are D.\n").unwrap();
    save_by_rename(
        &project.path("agents/d.toml"),
        "[agent.d]\nbottle = \"other\"\nprompt = \"../prompts/d.md\"\n",
    );
    let added = watch.wait("the new agent", EVENT, |e| {
        event(e) == "reconcile" && e["trigger"] == "files"
    });
    assert_eq!(agents(&added), ["d"], "{added}");
    assert_eq!(event(&watch.outcome(EVENT)), "done");
    let md = project.machine("d");
    assert_eq!(prompt_in(&double, &md), "You are D.\n");

    // Renaming the manifest moves no agent.
    let mark = double.calls().len();
    std::fs::rename(
        project.path("agents/d.toml"),
        project.path("agents/dd.toml"),
    )
    .unwrap();
    let renamed = watch.outcome(EVENT);
    assert_eq!(event(&renamed), "skip", "{renamed}");
    assert_eq!(
        renamed["files"],
        serde_json::json!(["agents/d.toml", "agents/dd.toml"])
    );

    assert_eq!(calls_since(&double, mark).len(), 0);

    // Removing it: without --prune the deletion is blocked and reported.
    std::fs::remove_file(project.path("agents/dd.toml")).unwrap();
    let removed = watch.wait("the removal", EVENT, |e| event(e) == "reconcile");
    assert_eq!(removed["removed"], true, "{removed}");
    let blocked = watch.wait("the blocked deletion", EVENT, |e| event(e) != "action");
    assert_eq!(event(&blocked), "blocked", "{blocked}\n{}", watch.report());
    assert_eq!(blocked["machine"], md.as_str());
    assert_eq!(blocked["action"], "delete");
    let done = watch.outcome(EVENT);
    assert_eq!(
        (event(&done), &done["blocked"]),
        ("done", &1.into()),
        "{done}"
    );
    // Later reconciles of other agents do not repeat it.
    std::fs::write(project.path("prompts/a.md"), "You are A, later.\n").unwrap();
    let later = watch.wait("a later reconcile", EVENT, |e| event(e) != "action");
    assert_eq!(
        (event(&later), agents(&later)),
        ("reconcile", vec!["a".to_owned()])
    );
    assert_eq!(event(&watch.outcome(EVENT)), "done");
    assert!(machine_names(&double).contains(&md), "not pruned");

    // The watch holds the project's lock.
    let apply = |flags: &[&str]| {
        Command::new(BOTTLE)
            .args([
                "--smolvm",
                Double::binary().to_str().unwrap(),
                "--state-dir",
            ])
            .arg(&project.state)
            .arg("apply")
            .args(flags)
            .arg(&project.dir)
            .env("SMOLVM_DOUBLE_HOME", double.home())
            .env("SMOLVM_DOUBLE_RESOLVE", "any")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .expect("running bottle apply")
    };
    let locked = apply(&["--prune"]);
    assert_eq!(locked.status.code(), Some(1), "{}", stderr(&locked));
    assert!(
        stderr(&locked).contains("is locked by"),
        "{}",
        stderr(&locked)
    );

    // Ctrl-C stops cleanly and releases the lock: apply --prune gets it.
    let status = watch.interrupt();
    assert!(status.success(), "{status:?}\n{}", watch.report());
    watch.rest();
    assert_eq!(
        watch.seen.last().map(event),
        Some("stop"),
        "{}",
        watch.report()
    );
    let apply = apply(&["--prune"]);
    assert!(
        apply.status.success(),
        "{}\n{}",
        stdout(&apply),
        stderr(&apply)
    );
    assert!(!machine_names(&double).contains(&md), "pruned by apply");
}

#[test]
fn a_failing_reconcile_backs_off_and_a_success_resets_it() {
    let double = Double::new();
    let _machines = Machines(&double);
    let project = Project::new("wretry");
    // The first reconcile copies three prompts; copies 4 and 5 fail, then 7
    // and 9.
    let mut watch = started(
        &double,
        &project,
        &[],
        &[("SMOLVM_DOUBLE_FAIL", "cp:4,cp:5,cp:7,cp:9")],
    );
    let ma = project.machine("a");

    std::fs::write(project.path("prompts/a.md"), "You are A, retried.\n").unwrap();
    let first = watch.outcome(EVENT);
    assert_eq!(event(&first), "failed", "{first}\n{}", watch.report());
    assert_eq!(first["retry"], 1);
    let delay = first["retry_in_seconds"].as_f64().unwrap();
    assert!((0.64..=0.96).contains(&delay), "{delay}");
    let retry = watch.wait("retry 1", EVENT, |e| event(e) == "reconcile");
    assert_eq!(retry["trigger"], "retry", "{retry}");
    assert_eq!(retry["full"], true);
    let second = watch.outcome(EVENT);
    assert_eq!(event(&second), "failed", "{second}");
    assert_eq!(second["retry"], 2);
    let delay = second["retry_in_seconds"].as_f64().unwrap();
    assert!((1.28..=1.92).contains(&delay), "{delay}");
    let retry = watch.wait("retry 2", EVENT, |e| event(e) == "reconcile");
    assert_eq!(retry["trigger"], "retry");
    let ok = watch.outcome(EVENT);
    assert_eq!(event(&ok), "done", "{ok}\n{}", watch.report());
    assert_eq!(prompt_in(&double, &ma), "You are A, retried.\n");
    watch.assert_quiet("a success");

    // The success reset the backoff: the next failure starts over.
    std::fs::write(project.path("prompts/a.md"), "You are A, again.\n").unwrap();
    let failed = watch.outcome(EVENT);
    assert_eq!(event(&failed), "failed", "{failed}");
    assert_eq!(failed["retry"], 1, "{failed}");
    assert_eq!(event(&watch.outcome(EVENT)), "done");
    assert_eq!(prompt_in(&double, &ma), "You are A, again.\n");

    // Another agent's success does not cancel the retry a is owed.
    std::fs::write(project.path("prompts/a.md"), "You are A, owed.\n").unwrap();
    let failed = watch.outcome(EVENT);
    assert_eq!(event(&failed), "failed", "{failed}");
    std::fs::write(project.path("prompts/b.md"), "You are B, meanwhile.\n").unwrap();
    let b = watch.wait("b's reconcile", EVENT, |e| event(e) == "reconcile");
    if b["trigger"] == "files" {
        assert_eq!(agents(&b), ["b"]);
        assert_eq!(event(&watch.outcome(EVENT)), "done");
        let retry = watch.wait("a's retry", EVENT, |e| event(e) == "reconcile");
        assert_eq!(retry["trigger"], "retry", "{retry}");
    }
    assert_eq!(event(&watch.outcome(EVENT)), "done", "{}", watch.report());
    assert_eq!(prompt_in(&double, &ma), "You are A, owed.\n");
    assert_eq!(
        prompt_in(&double, &project.machine("b")),
        "You are B, meanwhile.\n"
    );
}

#[test]
fn events_during_a_reconcile_queue_exactly_one_follow_up() {
    let double = Double::new();
    let _machines = Machines(&double);
    let project = Project::new("wqueue");
    // Every runtime call takes 400 ms: a prompt reconcile takes two
    // seconds, long enough to save other files several times meanwhile.
    let mut watch = started(
        &double,
        &project,
        &[],
        &[("SMOLVM_DOUBLE_LATENCY_MS", "400")],
    );
    std::fs::write(project.path("prompts/a.md"), "You are A, busy.\n").unwrap();
    let first = watch.wait("the first reconcile", EVENT, |e| event(e) == "reconcile");
    assert_eq!(agents(&first), ["a"]);
    for n in 0..4 {
        std::fs::write(project.path("prompts/b.md"), format!("You are B, {n}.\n")).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(event(&watch.outcome(EVENT)), "done");
    let follow = watch.wait("the follow-up", EVENT, |e| event(e) != "action");
    assert_eq!(event(&follow), "reconcile", "{follow}\n{}", watch.report());
    assert_eq!(agents(&follow), ["b"]);
    assert_eq!(follow["files"], serde_json::json!(["prompts/b.md"]));
    assert_eq!(event(&watch.outcome(EVENT)), "done");
    watch.assert_quiet("the one follow-up");
    assert_eq!(prompt_in(&double, &project.machine("b")), "You are B, 3.\n");

    // Never overlapping: each reconcile ends before the next starts.
    let mut open: Option<u64> = None;
    for e in &watch.seen {
        match event(e) {
            "reconcile" => {
                assert_eq!(open, None, "overlap at {e}");
                open = e["reconcile"].as_u64();
            }
            "done" | "failed" | "skip" => {
                assert_eq!(open, e["reconcile"].as_u64(), "{e}");
                open = None;
            }
            "action" => assert_eq!(open, e["reconcile"].as_u64(), "{e}"),
            _ => {}
        }
    }

    // Ctrl-C in the middle of a reconcile: the calls under way finish,
    // nothing new starts, the watch stops (exit 0) and leaves no call of
    // the double running behind it.
    std::fs::write(project.path("prompts/a.md"), "You are A, interrupted.\n").unwrap();
    watch.wait("a reconcile", EVENT, |e| event(e) == "reconcile");
    std::thread::sleep(Duration::from_millis(500));
    let status = watch.interrupt();
    assert!(status.success(), "{status:?}\n{}", watch.report());
    watch.rest();
    let tail: Vec<&str> = watch.seen.iter().rev().take(2).map(event).collect();
    assert_eq!(tail[0], "stop", "{}", watch.report());
    assert!(
        tail[1] == "interrupted" || tail[1] == "done",
        "{}",
        watch.report()
    );
    let left = double_calls_running(double.home());
    assert!(
        left.is_empty(),
        "smolvm-double calls left running: {left:?}"
    );
}

/// Processes of `smolvm-double` (calls, not the machines) using `home`.
fn double_calls_running(home: &Path) -> Vec<String> {
    let marker = format!("SMOLVM_DOUBLE_HOME={}", home.display());
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let exe = std::fs::read_link(entry.path().join("exe")).unwrap_or_default();
        if !exe.to_string_lossy().contains("smolvm-double") {
            continue;
        }
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        if environ
            .split(|b| *b == 0)
            .any(|var| var == marker.as_bytes())
        {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            found.push(format!(
                "{pid}: {}",
                String::from_utf8_lossy(&cmdline).replace('\0', " ")
            ));
        }
    }
    found
}

#[test]
fn a_resync_repairs_drift_made_inside_a_guest() {
    let double = Double::new();
    let _machines = Machines(&double);
    let project = Project::new("wdrift");
    let mut watch = started(&double, &project, &["--resync", "1"], &[]);
    let mb = project.machine("b");
    guest(
        &double,
        &mb,
        "echo 'You are someone else.' > /home/node/.bottle/prompt.md",
    );
    let repair = watch.wait("the repair", Duration::from_secs(10), |e| {
        event(e) == "action" && e["step"] == "prompt"
    });
    assert_eq!(repair["agent"], "b");
    assert!(
        repair["cause"]
            .as_str()
            .unwrap()
            .contains("changed in guest"),
        "{repair}"
    );
    let resync = watch
        .seen
        .iter()
        .rev()
        .find(|e| event(e) == "reconcile")
        .cloned()
        .unwrap();
    assert_eq!(resync["trigger"], "resync", "{resync}");
    assert_eq!(event(&watch.outcome(EVENT)), "done");
    assert_eq!(prompt_in(&double, &mb), "You are B, version 1.\n");

    // A create-time change without --allow-replace: blocked, reported once
    // (not on every resync), and the steps waiting behind it are not
    // reported as skipped each time either.
    let base = project.read("bottle.toml");
    let egress = |net: &str| format!("{base}\n[bottle.other.egress]\nallow_cidrs = [\"{net}\"]\n");
    save_by_rename(&project.path("bottle.toml"), &egress("10.1.0.0/16"));
    let blocked = watch.wait("the blocked replace", EVENT, |e| event(e) == "blocked");
    assert_eq!(
        (&blocked["agent"], &blocked["action"]),
        (&"c".into(), &"replace".into())
    );
    let from = watch.seen.len();
    let mut resyncs = 0;
    while resyncs < 3 {
        let e = watch.wait("resyncs", EVENT, |e| event(e) == "reconcile");
        if e["trigger"] == "resync" {
            resyncs += 1;
        }
    }
    let repeated: Vec<&Value> = watch.seen[from..]
        .iter()
        .filter(|e| matches!(event(e), "blocked" | "action"))
        .collect();
    assert!(repeated.is_empty(), "{repeated:#?}");
    assert!(machine_names(&double).contains(&project.machine("c")));

    // Another change to the same field is a new change: reported again.
    std::fs::write(project.path("bottle.toml"), egress("10.2.0.0/16")).unwrap();
    let again = watch.wait("the new blocked replace", EVENT, |e| event(e) == "blocked");
    assert_eq!(
        (&again["agent"], &again["action"]),
        (&"c".into(), &"replace".into())
    );
}

#[test]
fn paths_outside_the_manifests_directory_are_watched_and_the_set_follows_the_manifests() {
    let double = Double::new();
    let _machines = Machines(&double);
    let project = Project::new("woutside");
    // Agent c's manifest lives outside the manifests directory.
    let shared = project.root.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("c.toml"), AGENT_C).unwrap();
    std::fs::remove_file(project.path("agents/c.toml")).unwrap();
    std::os::unix::fs::symlink(shared.join("c.toml"), project.path("agents/c.toml")).unwrap();
    let mut watch = started(&double, &project, &[], &[]);
    let mc = project.machine("c");
    assert_eq!(prompt_in(&double, &mc), "You are C.");

    // Noise next to it is not a change.
    std::fs::write(shared.join("unrelated.txt"), "x").unwrap();
    watch.assert_quiet("a sibling of the outside manifest");

    save_like_vim(
        &shared.join("c.toml"),
        &AGENT_C.replace("You are C.", "You are C, from outside."),
    );
    let changed = watch.wait("the outside edit", EVENT, |e| event(e) == "reconcile");
    assert_eq!(agents(&changed), ["c"], "{changed}");
    assert_eq!(event(&watch.outcome(EVENT)), "done");
    assert_eq!(prompt_in(&double, &mc), "You are C, from outside.");

    // A volume outside, added while it does not exist yet: invalid. Nothing
    // watched it, but creating it resumes work (invalid manifests are
    // re-read every few seconds), and the agents of that bottle get it.
    let volume = project.root.join("data/shared-volume");
    let bottles = project.read("bottle.toml");
    save_by_rename(
        &project.path("bottle.toml"),
        &bottles.replace(
            "[bottle.other]\n",
            "[bottle.other]\nvolumes = [\"../data/shared-volume:/data\"]\n",
        ),
    );
    let invalid = watch.outcome(EVENT);
    assert_eq!(event(&invalid), "invalid", "{invalid}");
    std::fs::create_dir_all(&volume).unwrap();
    std::fs::write(volume.join("hello"), "from the host\n").unwrap();
    let resumed = watch.wait("the resumed reconcile", EVENT, |e| event(e) == "reconcile");
    assert_eq!(agents(&resumed), ["c"], "{resumed}");
    assert_eq!(event(&watch.outcome(EVENT)), "done", "{}", watch.report());
    assert_eq!(guest(&double, &mc, "cat /data/hello"), "from the host\n");
    // Now it is watched where it lives: writing inside it is the guest's
    // business, removing it is an invalid manifest.
    std::fs::write(volume.join("more"), "x").unwrap();
    watch.assert_quiet("a write inside the volume");
    std::fs::remove_dir_all(&volume).unwrap();
    let invalid = watch.outcome(EVENT);
    assert_eq!(event(&invalid), "invalid", "{invalid}");
    assert_eq!(
        invalid["codes"],
        serde_json::json!(["bottle::invalid-volume"])
    );
    std::fs::create_dir_all(&volume).unwrap();
    assert_eq!(event(&watch.outcome(EVENT)), "skip");

    // A manifest linked in later from yet another place is watched too.
    let elsewhere = project.root.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::write(
        elsewhere.join("d.toml"),
        "[agent.d]\nbottle = \"other\"\nprompt_text = \"You are D.\"\n",
    )
    .unwrap();
    std::os::unix::fs::symlink(elsewhere.join("d.toml"), project.path("agents/d.toml")).unwrap();
    let added = watch.wait("the new agent", EVENT, |e| event(e) == "reconcile");
    assert_eq!(agents(&added), ["d"], "{added}");
    assert_eq!(event(&watch.outcome(EVENT)), "done");
    save_by_rename(
        &elsewhere.join("d.toml"),
        "[agent.d]\nbottle = \"other\"\nprompt_text = \"You are D, edited.\"\n",
    );
    let edited = watch.wait("the edit elsewhere", EVENT, |e| event(e) == "reconcile");
    assert_eq!(agents(&edited), ["d"], "{edited}");
    assert_eq!(event(&watch.outcome(EVENT)), "done");
    assert_eq!(
        prompt_in(&double, &project.machine("d")),
        "You are D, edited."
    );

    // Unlinked, its old target is nobody's input any more.
    std::fs::remove_file(project.path("agents/d.toml")).unwrap();
    let removed = watch.wait("the removal", EVENT, |e| event(e) == "reconcile");
    assert_eq!(removed["removed"], true, "{removed}");
    assert_eq!(event(&watch.outcome(EVENT)), "done");
    std::fs::write(elsewhere.join("d.toml"), "[agent.d]\nbottle = \"gone\"\n").unwrap();
    let after: Vec<Value> = watch
        .events_during(QUIET)
        .into_iter()
        .filter(|e| event(e) != "blocked")
        .collect();
    assert!(after.is_empty(), "{after:#?}");
}

#[test]
fn text_mode_logs_timestamped_lines_and_diagnostics_on_stderr() {
    let double = Double::new();
    let _machines = Machines(&double);
    let project = Project::new("wtext");
    let mut child = Command::new(BOTTLE)
        .args([
            "--smolvm",
            Double::binary().to_str().unwrap(),
            "--state-dir",
        ])
        .arg(&project.state)
        .args(["watch", "--debounce", "100"])
        .arg(&project.dir)
        .env("SMOLVM_DOUBLE_HOME", double.home())
        .env("SMOLVM_DOUBLE_RESOLVE", "any")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting bottle watch");
    // Killed (if still running) before the machines are deleted.
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut err = child.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = err.read_to_string(&mut text);
        text
    });
    let mut child = Kill(child);
    let mut seen = Vec::new();
    let mut wait_line = |what: &str, timeout: Duration| {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no line with {what:?}; got {seen:#?}"));
            seen.push(line.clone());
            if line.contains(what) {
                return seen.clone();
            }
        }
    };
    let first = wait_line("reconcile #1 done", STARTUP);
    for line in &first {
        // `2026-11-27T08:41:53.319Z message`
        let (ts, message) = line.split_at(24);
        assert!(
            ts.len() == 24 && ts.as_bytes()[10] == b'T' && ts.ends_with('Z'),
            "{line}"
        );
        assert!(message.starts_with(' '), "{line}");
    }
    assert!(
        first[1].contains("reconcile #1 (start): all agents"),
        "{first:#?}"
    );
    assert!(
        first.iter().any(|l| l.contains("done a: create machine")),
        "one line per action: {first:#?}"
    );

    std::fs::write(project.path("bottle.toml"), "[project\n").unwrap();
    wait_line("manifests are invalid", EVENT);
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGINT) };
    let deadline = Instant::now() + EVENT;
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit after SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    let all = wait_line("stopping", EVENT);
    assert!(all.last().unwrap().ends_with(" stopping"), "{all:#?}");
    let stderr = errors.join().unwrap();
    assert!(stderr.contains("bottle::toml-syntax"), "{stderr}");
    assert!(stderr.contains("bottle.toml"), "{stderr}");
}

#[test]
fn while_invalid_a_resync_still_repairs_drift_but_creates_nothing() {
    let double = Double::new();
    let _machines = Machines(&double);
    let project = Project::new("wheld");
    let mut watch = started(&double, &project, &["--resync", "1"], &[]);
    let (ma, mb) = (project.machine("a"), project.machine("b"));

    // Half-saved: the file that declares agent c no longer parses.
    save_by_rename(&project.path("agents/c.toml"), "[agent.c\nbottle = ");
    // (A resync may finish first: the interval is one second.)
    watch.wait("the invalid manifests", EVENT, |e| event(e) == "invalid");

    // Meanwhile b's prompt drifts inside its guest and a's machine goes.
    guest(
        &double,
        &mb,
        "echo 'You are someone else.' > /home/node/.bottle/prompt.md",
    );
    let deleted = double.run(&["machine", "delete", "--name", &ma, "-f"]);
    assert!(deleted.status.success(), "{}", stderr(&deleted));

    // The resync repairs b against the last good state, but does not
    // re-create a's machine on the word of manifests that do not load. (A
    // resync can run between the two changes above, one second apart at
    // most: it repairs b with nothing blocked yet, or fails to probe a
    // being deleted. The next one runs a second later.)
    let mut done = Value::Null;
    for _ in 0..5 {
        let held = watch.wait("a resync of the last good state", EVENT, |e| {
            event(e) == "reconcile" && e["last_good"] == true
        });
        assert_eq!(held["trigger"], "resync", "{held}");
        done = watch.wait("its outcome", EVENT, |e| {
            matches!(event(e), "done" | "failed")
        });
        if event(&done) == "done" && done["blocked"].as_u64().unwrap() >= 1 {
            break;
        }
    }
    assert_eq!(event(&done), "done", "{}", watch.report());
    assert!(done["blocked"].as_u64().unwrap() >= 1, "{done}");
    assert_eq!(prompt_in(&double, &mb), "You are B, version 1.\n");
    let names = machine_names(&double);
    assert!(!names.contains(&ma), "{names:?}");
    assert!(names.contains(&project.machine("c")), "{names:?}");

    // Fixed: the next full reconcile brings a back.
    save_like_vim(&project.path("agents/c.toml"), AGENT_C);
    let create = watch.wait("a's machine re-created", EVENT, |e| {
        event(e) == "action" && e["action"] == "create"
    });
    assert_eq!(create["agent"], "a", "{create}");
    assert_eq!(create["status"], "done", "{create}");
}

/// While the manifests stay invalid, a resync does not repeat the same
/// diagnostics or spend a reconcile number on saying nothing new: each
/// resync of the last good state takes exactly one. A save still gets an
/// answer, even when it leaves the same problems.
#[test]
fn while_invalid_the_same_diagnostics_are_not_repeated_but_a_save_is_answered() {
    let double = Double::new();
    let _machines = Machines(&double);
    let project = Project::new("wrepeat");
    let mut watch = started(&double, &project, &["--resync", "1"], &[]);

    let broken = "[agent.c\nbottle = ";
    save_by_rename(&project.path("agents/c.toml"), broken);
    // (A resync under way may read the broken file first: the save is
    // answered after it.)
    let invalid = watch.wait("the invalid manifests", EVENT, |e| {
        event(e) == "invalid" && e["trigger"] == "files"
    });
    let first = invalid["reconcile"].as_u64().unwrap();

    let later = watch.events_during(Duration::from_millis(3500));
    let repeated: Vec<&Value> = later.iter().filter(|e| event(e) == "invalid").collect();
    assert!(repeated.is_empty(), "{repeated:#?}");
    let resyncs: Vec<u64> = later
        .iter()
        .filter(|e| event(e) == "reconcile")
        .map(|e| {
            assert_eq!(e["last_good"], true, "{e}");
            e["reconcile"].as_u64().unwrap()
        })
        .collect();
    assert!(resyncs.len() >= 2, "{}", watch.report());
    let expected: Vec<u64> = (first + 1..=first + resyncs.len() as u64).collect();
    assert_eq!(resyncs, expected, "one number per resync, none skipped");
    let numbered: BTreeSet<u64> = later
        .iter()
        .filter_map(|e| e["reconcile"].as_u64())
        .collect();
    assert_eq!(numbered, expected.iter().copied().collect(), "{later:#?}");

    // Saving the same mistake again is answered with the diagnostics.
    save_by_rename(&project.path("agents/c.toml"), broken);
    let again = watch.wait("the diagnostics again", EVENT, |e| event(e) == "invalid");
    assert_eq!(again["trigger"], "files", "{again}");
    assert_eq!(again["codes"], invalid["codes"]);
    assert_eq!(again["diagnostics"], invalid["diagnostics"]);
}

#[test]
fn a_manifests_directory_made_anew_is_watched_again() {
    let double = Double::new();
    let _machines = Machines(&double);
    let project = Project::new("wanew");
    let mut watch = started(&double, &project, &[], &[]);
    let ma = project.machine("a");

    // The directory goes (renamed away): invalid, nothing touched.
    let aside = project.root.join("manifests.old");
    std::fs::rename(&project.dir, &aside).unwrap();
    let gone = watch.wait("the missing directory", EVENT, |e| event(e) == "invalid");
    assert_eq!(gone["codes"], serde_json::json!(["bottle::no-directory"]));
    assert_eq!(machine_names(&double).len(), 3);

    // A new directory with the same content: nothing to do...
    support::project::copy_dir(&aside, &project.dir);
    let back = watch.wait("the directory back", EVENT, |e| event(e) != "invalid");
    assert_eq!(event(&back), "skip", "{back}");
    // ...and edits inside it are seen again.
    save_by_rename(&project.path("prompts/a.md"), "You are A, anew.\n");
    let edit = watch.wait("the prompt edit", EVENT, |e| event(e) == "reconcile");
    assert_eq!(agents(&edit), ["a"]);
    assert_eq!(event(&watch.outcome(EVENT)), "done");
    assert_eq!(prompt_in(&double, &ma), "You are A, anew.\n");
}

/// `rm -rf m && mkdir m && cp -r saved/. m`: on ext4 the new directory
/// usually gets the old one's inode number, so only the removal itself can
/// tell the watch that its directory is gone. Several times in a row, each
/// followed by an edit that must be seen; once with the directory missing
/// long enough for a reload to find it gone.
#[test]
fn a_manifests_directory_removed_and_recreated_in_place_is_watched_again() {
    let double = Double::new();
    let _machines = Machines(&double);
    let project = Project::new("wrmrf");
    let mut watch = started(&double, &project, &[], &[]);
    let ma = project.machine("a");

    for round in 1..=4 {
        let saved = project.root.join(format!("saved{round}"));
        support::project::copy_dir(&project.dir, &saved);
        std::fs::remove_dir_all(&project.dir).unwrap();
        if round == 2 {
            let gone = watch.wait("the missing directory", EVENT, |e| event(e) == "invalid");
            assert_eq!(gone["codes"], serde_json::json!(["bottle::no-directory"]));
        }
        support::project::copy_dir(&saved, &project.dir);
        // Whether the loop read the directory while it was gone or only
        // once it was back, it ends with nothing to do.
        let back = watch.wait("the directory back", EVENT, |e| {
            matches!(event(e), "skip" | "done" | "failed" | "reconcile")
        });
        assert_eq!(event(&back), "skip", "round {round}: {back}");

        let text = format!("You are A, round {round}.\n");
        save_by_rename(&project.path("prompts/a.md"), &text);
        let edit = watch.wait("the prompt edit", EVENT, |e| event(e) == "reconcile");
        assert_eq!(agents(&edit), ["a"], "round {round}");
        assert_eq!(event(&watch.outcome(EVENT)), "done", "round {round}");
        assert_eq!(prompt_in(&double, &ma), text);
    }
}

#[test]
fn a_start_that_needs_a_missing_secret_waits_with_the_machine_left_running() {
    let double = Double::new();
    let _machines = Machines(&double);
    let project = Project::new("wsecret");
    let secret = project.root.join("token");
    std::fs::write(&secret, "s3cret").unwrap();
    let base = project.read("bottle.toml");
    let with_secret = |cpus: u32| {
        base.replace(
            "[bottle.dev]\ncpus = 1\n",
            &format!(
                "[bottle.dev]\ncpus = {cpus}\nsecrets = {{ TOKEN = {{ from_file = \"{}\" }} }}\n",
                secret.display()
            ),
        )
    };
    project.write("bottle.toml", &with_secret(1));
    let mut watch = started(&double, &project, &["--resync", "2"], &[]);
    let ma = project.machine("a");

    // The secret file goes, then a change that needs a restart arrives: the
    // restart would stop the machine and fail to start it again.
    std::fs::remove_file(&secret).unwrap();
    save_by_rename(&project.path("bottle.toml"), &with_secret(2));
    let held = watch.wait("the held restart", EVENT, |e| event(e) == "blocked");
    assert_eq!(held["action"], "restart", "{held}");
    assert!(
        held["reason"].as_str().unwrap().contains("does not exist"),
        "{held}"
    );
    assert_eq!(
        double.machine_json(&ma).unwrap()["state"],
        "running",
        "the machine was left alone"
    );

    // The secret is back: a resync restarts it.
    std::fs::write(&secret, "s3cret").unwrap();
    let restart = watch.wait("the restart", EVENT, |e| {
        event(e) == "action" && e["action"] == "restart" && e["agent"] == "a"
    });
    assert_eq!(restart["status"], "done", "{restart}");
    assert_eq!(double.machine_json(&ma).unwrap()["cpus"], 2);
}
