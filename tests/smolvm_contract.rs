//! The smolvm driver against the smolvm double: the contract between what
//! bottle sends and what smolvm (as the double reproduces it) answers. And
//! the double's CLI itself, exactly as smolvm-cli.md documents smolvm's.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bottle::runtime::{
    CopyOptions, Egress, ExecRequest, MachineSpec, MachineState, MachineUpdate, Runtime,
    RuntimeErrorKind, SecretMount, SecretSource,
};
use support::{Double, stderr, stdout};

fn spec(name: &str) -> MachineSpec {
    MachineSpec {
        name: name.into(),
        labels: BTreeMap::from([
            ("bottle.managed-by".into(), "bottle".into()),
            ("bottle.agent".into(), name.into()),
        ]),
        cpus: 2,
        memory_mib: 1024,
        ..MachineSpec::default()
    }
}

fn kind_of<T: std::fmt::Debug>(
    result: Result<T, bottle::runtime::RuntimeError>,
) -> RuntimeErrorKind {
    result.expect_err("the call should fail").kind
}

// --- The driver over the double ---------------------------------------------

#[test]
fn created_machines_are_listed_with_their_labels_sorted_by_name() {
    let double = Double::new();
    let runtime = double.runtime();
    let names = ["t3", "t1", "t5", "t2", "t4", "t6"];
    for name in names {
        runtime.create(&spec(name)).unwrap();
    }
    let machines = runtime.list().unwrap();
    let listed: Vec<&str> = machines.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(listed, ["t1", "t2", "t3", "t4", "t5", "t6"]);
    let t3 = &machines[2];
    assert_eq!(t3.state, MachineState::Created);
    assert_eq!(t3.labels, spec("t3").labels);
    assert_eq!(
        (t3.cpus, t3.memory_mib, t3.network),
        (Some(2), Some(1024), false)
    );

    // smolvm's own order is not the name order: the sort is the driver's.
    let raw: Vec<serde_json::Value> =
        serde_json::from_str(&stdout(&double.run(&["machine", "ls", "--json"]))).unwrap();
    let raw_names: Vec<&str> = raw.iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_ne!(raw_names, listed);
}

#[test]
fn egress_and_secrets_reach_smolvm_as_flags_and_references_only() {
    let secret = "s3cr3t-value-that-must-not-leak";
    let double = Double::new().with_env("BOTTLE_CONTRACT_SECRET", secret);
    let runtime = double.runtime();
    let mut with_network = spec("net");
    with_network.egress = Some(Egress {
        allow_hosts: vec!["api.anthropic.com".into()],
        allow_cidrs: vec!["10.8.0.0/16".into()],
    });
    with_network.secrets = vec![SecretMount {
        guest_env: "TOKEN".into(),
        source: SecretSource::HostEnv("BOTTLE_CONTRACT_SECRET".into()),
    }];
    runtime.create(&with_network).unwrap();
    assert!(runtime.list().unwrap()[0].network);

    let create = double
        .calls()
        .into_iter()
        .find(|c| c.verb == "create")
        .unwrap();
    let argv = create.args.join(" ");
    assert!(
        argv.contains("--allow-host api.anthropic.com --allow-cidr 10.8.0.0/16"),
        "{argv}"
    );
    assert!(
        argv.contains("--secret-env TOKEN=BOTTLE_CONTRACT_SECRET"),
        "{argv}"
    );

    // The value reaches the guest at launch...
    runtime.start("net").unwrap();
    let output = runtime
        .exec("net", &ExecRequest::shell("printf %s \"$TOKEN\""))
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout), secret);
    // ...and no argv bottle made, nor anything in the double's home, holds it.
    let log = std::fs::read_to_string(double.home().join("calls.jsonl")).unwrap();
    assert!(!log.contains(secret));
    for entry in std::fs::read_dir(double.home().join("machines")).unwrap() {
        assert!(
            !std::fs::read_to_string(entry.unwrap().path())
                .unwrap()
                .contains(secret)
        );
    }
}

#[test]
fn copied_files_have_their_content_mode_and_owner() {
    let double = Double::new();
    let runtime = double.runtime();
    runtime.create(&spec("files")).unwrap();
    runtime.start("files").unwrap();

    let host = double.home().join("prompt with: colon.md");
    std::fs::write(&host, "You review Rust.\n").unwrap();
    let options = CopyOptions {
        mode: 0o600,
        uid: 1234,
        gid: 2345,
    };
    runtime
        .copy_in("files", &host, "/srv/bottle/new/dir/prompt.md", &options)
        .unwrap();

    let cat = runtime
        .exec(
            "files",
            &ExecRequest::new(["cat", "/srv/bottle/new/dir/prompt.md"]),
        )
        .unwrap();
    assert!(cat.success(), "{cat:?}");
    assert_eq!(cat.stdout, b"You review Rust.\n");
    let stat = runtime
        .exec(
            "files",
            &ExecRequest::new(["stat", "-c", "%a %u %g", "/srv/bottle/new/dir/prompt.md"]),
        )
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&stat.stdout).trim(),
        "600 1234 2345"
    );
    assert_eq!(
        runtime
            .read_file("files", "/srv/bottle/new/dir/prompt.md")
            .unwrap(),
        b"You review Rust.\n"
    );
}

#[test]
fn exec_reports_status_output_env_workdir_and_user() {
    let double = Double::new();
    let runtime = double.runtime();
    runtime.create(&spec("exec")).unwrap();
    runtime.start("exec").unwrap();

    let mut request = ExecRequest::shell("echo out; echo err >&2; echo \"$GREETING\"; pwd; exit 3");
    request.env.insert("GREETING".into(), "hello".into());
    request.workdir = Some("/tmp".into());
    let output = runtime.exec("exec", &request).unwrap();
    assert_eq!(output.status, 3);
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "out\nhello\n/tmp\n"
    );
    assert_eq!(String::from_utf8_lossy(&output.stderr), "err\n");

    let whoami = runtime
        .exec("exec", &ExecRequest::new(["id", "-un"]).as_user("nobody"))
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&whoami.stdout).trim(),
        "nobody",
        "{whoami:?}"
    );
}

#[test]
fn update_changes_cpus_and_memory_of_a_stopped_machine_only() {
    let double = Double::new();
    let runtime = double.runtime();
    runtime.create(&spec("upd")).unwrap();
    let update = MachineUpdate {
        cpus: Some(3),
        memory_mib: Some(3072),
        ..MachineUpdate::default()
    };
    runtime.update("upd", &update).unwrap();
    let machine = &runtime.list().unwrap()[0];
    assert_eq!((machine.cpus, machine.memory_mib), (Some(3), Some(3072)));

    // An empty update makes no call at all.
    let before = double.count("update");
    runtime.update("upd", &MachineUpdate::default()).unwrap();
    assert_eq!(double.count("update"), before);

    runtime.start("upd").unwrap();
    match kind_of(runtime.update("upd", &update)) {
        RuntimeErrorKind::CommandFailed {
            command,
            status,
            stderr,
        } => {
            assert!(
                command.starts_with("smolvm-double machine update --name upd"),
                "{command}"
            );
            assert_eq!(status, 1);
            assert_eq!(
                stderr,
                "Error: invalid vm state: expected stopped, got running"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn lifecycle_and_delete() {
    let double = Double::new();
    let runtime = double.runtime();
    runtime.create(&spec("life")).unwrap();
    // Stopping a machine that is not running succeeds.
    runtime.stop("life").unwrap();
    runtime.start("life").unwrap();
    assert_eq!(runtime.list().unwrap()[0].state, MachineState::Running);
    runtime.stop("life").unwrap();
    assert_eq!(runtime.list().unwrap()[0].state, MachineState::Stopped);
    runtime.start("life").unwrap();
    // Delete stops a running machine first, and needs no answer (-f).
    runtime.delete("life").unwrap();
    assert!(runtime.list().unwrap().is_empty());
    assert!(
        double
            .calls()
            .iter()
            .any(|c| c.verb == "delete" && c.args.contains(&"-f".into()))
    );
}

#[test]
fn documented_failures_map_to_their_kinds() {
    let double = Double::new();
    let runtime = double.runtime();
    runtime.create(&spec("here")).unwrap();

    assert!(matches!(
        kind_of(runtime.create(&spec("here"))),
        RuntimeErrorKind::AlreadyExists
    ));
    for result in [
        runtime.start("gone"),
        runtime.stop("gone"),
        runtime.delete("gone"),
    ] {
        assert!(matches!(kind_of(result), RuntimeErrorKind::NotFound));
    }
    assert!(matches!(
        kind_of(runtime.update(
            "gone",
            &MachineUpdate {
                cpus: Some(1),
                ..Default::default()
            }
        )),
        RuntimeErrorKind::NotFound
    ));
    assert!(matches!(
        kind_of(runtime.exec("gone", &ExecRequest::shell("true"))),
        RuntimeErrorKind::NotFound
    ));

    // `here` exists but is not running.
    let host = double.home().join("f");
    std::fs::write(&host, "x").unwrap();
    assert!(matches!(
        kind_of(runtime.exec("here", &ExecRequest::shell("true"))),
        RuntimeErrorKind::NotRunning
    ));
    assert!(matches!(
        kind_of(runtime.copy_in("here", &host, "/f", &CopyOptions::default())),
        RuntimeErrorKind::NotRunning
    ));
    assert!(matches!(
        kind_of(runtime.read_file("here", "/etc/hostname")),
        RuntimeErrorKind::NotRunning
    ));

    // A state smolvm may report and bottle must not mistake for running.
    runtime.start("here").unwrap();
    double.force_state("here", "unreachable");
    assert_eq!(runtime.list().unwrap()[0].state, MachineState::Unreachable);
    assert!(matches!(
        kind_of(runtime.exec("here", &ExecRequest::shell("true"))),
        RuntimeErrorKind::NotRunning
    ));
    runtime.start("here").unwrap();
    assert_eq!(runtime.list().unwrap()[0].state, MachineState::Running);

    // A command failing in the guest is not a runtime error.
    let output = runtime
        .exec("here", &ExecRequest::new(["cat", "/nonexistent"]))
        .unwrap();
    assert_eq!(output.status, 1);
    assert!(matches!(
        kind_of(runtime.read_file("here", "/nonexistent")),
        RuntimeErrorKind::CommandFailed { .. }
    ));
}

#[test]
fn a_hung_call_times_out_naming_the_command() {
    let double = Double::new().with_env("SMOLVM_DOUBLE_HANG", "ls");
    let runtime = double
        .runtime()
        .with_call_timeout(Duration::from_millis(500));
    let started = Instant::now();
    match kind_of(runtime.list()) {
        RuntimeErrorKind::Timeout { command, timeout } => {
            assert_eq!(command, "smolvm-double machine ls --json");
            assert_eq!(timeout, Duration::from_millis(500));
        }
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // The call was made, and never finished.
    let calls = double.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].exit, None);
}

#[test]
fn malformed_json_is_reported_as_such() {
    let double = Double::new();
    double.runtime().create(&spec("m")).unwrap();
    let double = double.with_env("SMOLVM_DOUBLE_BAD_JSON", "1");
    let runtime = double.runtime();
    match kind_of(runtime.list()) {
        RuntimeErrorKind::Malformed { command, .. } => {
            assert_eq!(command, "smolvm-double machine ls --json")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_nth_call_of_a_verb_fails_when_asked_to() {
    let double = Double::new().with_env("SMOLVM_DOUBLE_FAIL", "create:2");
    let runtime = double.runtime();
    runtime.create(&spec("first")).unwrap();
    match kind_of(runtime.create(&spec("second"))) {
        RuntimeErrorKind::CommandFailed { status, stderr, .. } => {
            assert_eq!(status, 1);
            assert!(
                stderr.contains("injected failure of call 2 of `create`"),
                "{stderr}"
            );
        }
        other => panic!("{other:?}"),
    }
    runtime.create(&spec("second")).unwrap();
    let names: Vec<String> = runtime
        .list()
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names, ["first", "second"]);
    assert_eq!(double.count("create"), 3);
    assert_eq!(double.mutating_calls(), 3);
}

#[test]
fn an_exec_that_dies_midway_is_an_error_not_a_result() {
    let double = Double::new().with_env("SMOLVM_DOUBLE_EXEC_DIE", "2");
    let runtime = double.runtime();
    runtime.create(&spec("die")).unwrap();
    runtime.start("die").unwrap();
    runtime.exec("die", &ExecRequest::shell("true")).unwrap();
    match kind_of(runtime.exec(
        "die",
        &ExecRequest::shell("echo done > /tmp/ran; echo 0123456789"),
    )) {
        RuntimeErrorKind::CommandFailed { status, .. } => assert_eq!(status, 137),
        other => panic!("{other:?}"),
    }
    // The command itself ran.
    let ran = runtime
        .exec("die", &ExecRequest::new(["cat", "/tmp/ran"]))
        .unwrap();
    assert_eq!(ran.stdout, b"done\n");
}

#[test]
fn reads_make_no_mutating_calls() {
    let double = Double::new();
    let runtime = double.runtime();
    runtime.create(&spec("r")).unwrap();
    runtime.start("r").unwrap();
    let before = double.mutating_calls();
    runtime.list().unwrap();
    runtime.exec("r", &ExecRequest::shell("true")).unwrap();
    runtime.read_file("r", "/etc/hostname").unwrap();
    // read_file is a download: `cp`, counted as mutating by verb alone.
    assert_eq!(double.mutating_calls(), before + 1);
    assert_eq!(double.count("ls"), 1);
    assert_eq!(double.count("exec"), 1);
}

// --- The double's CLI, as smolvm-cli.md documents smolvm's -------------------

fn assert_error(output: &std::process::Output, message: &str) {
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert_eq!(stderr(output), format!("Error: {message}\n"));
}

#[test]
fn usage_errors_exit_2_with_clap_text() {
    let double = Double::new();
    for (args, unexpected) in [
        (
            &["machine", "update", "--name", "a", "--label", "k=v"][..],
            "'--label'",
        ),
        (&["machine", "exec", "-n", "a", "--", "true"], "'-n'"),
        (&["machine", "create", "myvm"], "'myvm'"),
    ] {
        let output = double.run(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let text = stderr(&output);
        assert!(
            text.starts_with(&format!("error: unexpected argument {unexpected} found")),
            "{text}"
        );
        assert!(text.contains("\nUsage: smolvm machine "), "{text}");
    }
}

#[test]
fn create_errors_have_smolvm_texts() {
    let double = Double::new().with_env("SMOLVM_DOUBLE_RESOLVE", "hosts");
    assert!(
        double
            .run(&["machine", "create", "--name", "dup"])
            .status
            .success()
    );
    assert_error(
        &double.run(&["machine", "create", "--name", "dup"]),
        "config operation failed: create machine: machine 'dup' already exists or is being created",
    );
    assert_error(
        &double.run(&["machine", "create", "--name", "x", "--label", "novalue"]),
        "config operation failed: --label: expected KEY=VALUE, got 'novalue'",
    );
    assert_error(
        &double.run(&["machine", "create", "--name", "x", "--label", "=value"]),
        "config operation failed: --label: label key cannot be empty (in '=value')",
    );
    assert_error(
        &double.run(&["machine", "create", "--name", "a--b"]),
        "config operation failed: create machine: machine name cannot contain consecutive hyphens",
    );
    assert_error(
        &double.run(&[
            "machine",
            "create",
            "--name",
            "x",
            "--allow-host",
            "api.anthropic.com",
        ]),
        "config operation failed: --allow-host: failed to resolve 'api.anthropic.com': \
         failed to lookup address information: Name or service not known",
    );
    let resolvable = Double::new()
        .with_env("SMOLVM_DOUBLE_RESOLVE", "hosts")
        .with_env("SMOLVM_DOUBLE_HOSTS", "api.anthropic.com=160.79.104.10");
    assert!(
        resolvable
            .run(&[
                "machine",
                "create",
                "--name",
                "x",
                "--allow-host",
                "api.anthropic.com"
            ])
            .status
            .success()
    );
}

#[test]
fn delete_without_force_deletes_nothing() {
    let double = Double::new();
    assert!(
        double
            .run(&["machine", "create", "--name", "keep"])
            .status
            .success()
    );
    let output = double.run(&["machine", "delete", "--name", "keep"]);
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(stderr(&output), "Delete machine 'keep'? [y/N] ");
    assert_eq!(stdout(&output), "Cancelled\n");
    let listed = stdout(&double.run(&["machine", "ls", "--json"]));
    assert!(listed.contains("\"name\": \"keep\""), "{listed}");

    assert_error(
        &double.run(&["machine", "delete", "--name", "nope", "-f"]),
        "vm not found: nope",
    );
}

#[test]
fn stop_of_a_machine_that_is_not_running_exits_0() {
    let double = Double::new();
    assert!(
        double
            .run(&["machine", "create", "--name", "idle"])
            .status
            .success()
    );
    let output = double.run(&["machine", "stop", "--name", "idle"]);
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(
        stdout(&output),
        "Machine 'idle' is not running (state: created)\n"
    );
}

#[test]
fn status_of_an_unknown_name_leaves_a_folder_but_no_machine() {
    let double = Double::new();
    assert_error(
        &double.run(&["machine", "status", "--name", "ghost", "--json"]),
        "config operation failed: machine status: machine 'ghost' not found",
    );
    assert!(!double.data_dir("ghost").exists());
    assert_error(
        &double.run(&["machine", "status", "--name", "ghost"]),
        "vm not found: ghost",
    );
    assert!(double.data_dir("ghost").is_dir());
    assert_eq!(
        stdout(&double.run(&["machine", "ls", "--json"])).trim(),
        "[]"
    );

    assert!(
        double
            .run(&["machine", "create", "--name", "seen"])
            .status
            .success()
    );
    let status: serde_json::Value = serde_json::from_slice(
        &double
            .run(&["machine", "status", "--name", "seen", "--json"])
            .stdout,
    )
    .unwrap();
    assert_eq!(status["name"], "seen");
    assert_eq!(status["state"], "created");
    assert_eq!(status["labels"], serde_json::json!({}));
}

#[test]
fn exec_and_cp_on_a_stopped_machine() {
    let double = Double::new();
    assert!(
        double
            .run(&["machine", "create", "--name", "off"])
            .status
            .success()
    );
    let not_running = "agent operation failed: connect: machine 'off' is not running. \
                       Use 'smolvm machine start --name off' first.";
    assert_error(
        &double.run(&["machine", "exec", "--name", "off", "--", "true"]),
        not_running,
    );
    assert_error(
        &double.run(&["machine", "cp", "/etc/hostname", "off:/x"]),
        not_running,
    );
    assert_error(
        &double.run(&["machine", "exec", "--name", "ghost", "--", "true"]),
        "vm not found: ghost",
    );
}

// --- The driver and the CLI against the real smolvm ---------------------------
//
// Run when BOTTLE_TEST_REAL_SMOLVM names a real smolvm CLI (.ci/run sets it);
// otherwise each test prints one SKIPPED line. No VM boots on the build
// machines: `start` fails after its checks, and `exec`/`cp` answer "not
// running" after parsing their arguments, so what is verified is everything
// up to booting: argv, validation, error texts, state, `ls --json`.

use bottle::runtime::smolvm::Version;
use bottle::runtime::{Egress as RealEgress, VolumeMount};
use support::real::Real;

/// A rootfs directory as `image` (smolvm reports it as `local-dir:PATH`).
fn rootfs(dir: &std::path::Path) -> String {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("usr/local")).unwrap();
    root.display().to_string()
}

#[test]
fn real_version_is_read_once_and_supported() {
    let Some(real) = Real::new("real_version_is_read_once_and_supported") else {
        return;
    };
    let runtime = real.runtime();
    let version = runtime.version().unwrap();
    assert!(version >= Version::MINIMUM, "{version}");
    // 1.9.2 has no `exec --user`: bottle guards its root commands instead.
    assert_eq!(version.has_exec_user(), version >= Version(1, 14, 0));
}

/// Every shape of `machine create` the driver builds, accepted by the real
/// parser and validation, and read back from the real `ls --json`.
#[test]
fn real_accepts_every_create_argv_and_lists_what_was_created() {
    let Some(real) = Real::new("real_accepts_every_create_argv_and_lists_what_was_created") else {
        return;
    };
    let runtime = real.runtime();
    let dir = tempfile::tempdir().unwrap();
    let (ws, cache) = (dir.path().join("ws"), dir.path().join("cache: x"));
    std::fs::create_dir_all(&ws).unwrap();
    std::fs::create_dir_all(&cache).unwrap();
    let secret_file = dir.path().join("token");
    std::fs::write(&secret_file, "t0ken\n").unwrap();

    let mut full = spec("full");
    full.labels.insert("bottle.hash".into(), "a=b==c".into());
    full.labels.insert("bottle.empty".into(), String::new());
    full.image = Some(rootfs(dir.path()));
    full.env = BTreeMap::from([
        ("GIT_AUTHOR_NAME".into(), "Bottle Bot".into()),
        ("EQ".into(), "a=b".into()),
        ("EMPTY".into(), String::new()),
    ]);
    full.volumes = vec![
        VolumeMount {
            host: ws.clone(),
            guest: "/workspace".into(),
            read_only: true,
        },
        VolumeMount {
            host: cache.clone(),
            guest: "/cache".into(),
            read_only: false,
        },
    ];
    full.secrets = vec![
        SecretMount {
            guest_env: "GITHUB_TOKEN".into(),
            source: SecretSource::HostEnv("BOTTLE_CONTRACT_TOKEN".into()),
        },
        SecretMount {
            guest_env: "NPM_TOKEN".into(),
            source: SecretSource::HostFile(secret_file.clone()),
        },
    ];
    // The gate's shape: its address only, plus the bottle's CIDRs.
    full.egress = Some(RealEgress {
        allow_hosts: vec![],
        allow_cidrs: vec!["100.96.0.1/32".into(), "10.8.0.0/16".into()],
    });
    let mut hosts = spec("hosts");
    hosts.egress = Some(RealEgress {
        allow_hosts: vec!["localhost".into()],
        allow_cidrs: vec![],
    });
    let mut closed = spec("closed");
    closed.egress = Some(RealEgress::default());
    let mut big = spec("big");
    (big.cpus, big.memory_mib) = (255, 64);
    for machine in [&full, &hosts, &closed, &big, &spec("bare")] {
        runtime
            .create(machine)
            .unwrap_or_else(|e| panic!("{}: {e}", machine.name));
    }

    let listed = runtime.list().unwrap();
    let names: Vec<&str> = listed.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["bare", "big", "closed", "full", "hosts"]);
    let by_name = |name: &str| listed.iter().find(|m| m.name == name).unwrap();
    let got = by_name("full");
    assert_eq!(got.labels, full.labels, "labels with `=` and empty values");
    assert_eq!(got.state, MachineState::Created);
    assert_eq!((got.cpus, got.memory_mib), (Some(2), Some(1024)));
    assert_eq!(
        got.image.as_deref(),
        Some(format!("local-dir:{}", full.image.as_deref().unwrap()).as_str())
    );
    assert!(got.network);
    assert!(by_name("hosts").network && by_name("closed").network);
    assert!(!by_name("bare").network);
    assert_eq!(by_name("bare").image, None);
    assert_eq!(
        (by_name("big").cpus, by_name("big").memory_mib),
        (Some(255), Some(64))
    );
    // smolvm counts mounts; bottle keeps the rest itself.
    let raw = real.list_json();
    let full_raw = raw.iter().find(|m| m["name"] == "full").unwrap();
    assert_eq!(full_raw["mounts"], 2);
}

/// `update` with every flag the driver uses, on a created machine; `stop`
/// of a machine that never ran; `delete`; then the failures bottle tells
/// apart, with the real texts.
#[test]
fn real_update_stop_delete_and_error_kinds() {
    let Some(real) = Real::new("real_update_stop_delete_and_error_kinds") else {
        return;
    };
    let runtime = real.runtime();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let mut machine = spec("upd");
    machine.env.insert("OLD".into(), "1".into());
    machine.volumes = vec![VolumeMount {
        host: a.clone(),
        guest: "/a".into(),
        read_only: false,
    }];
    runtime.create(&machine).unwrap();

    let update = MachineUpdate {
        cpus: Some(3),
        memory_mib: Some(3072),
        set_env: BTreeMap::from([("NEW".into(), "x=y".into())]),
        remove_env: vec!["OLD".into()],
        add_volumes: vec![
            VolumeMount {
                host: a.clone(),
                guest: "/a".into(),
                read_only: true,
            },
            VolumeMount {
                host: b.clone(),
                guest: "/b".into(),
                read_only: false,
            },
        ],
        remove_volumes: vec![VolumeMount {
            host: a.clone(),
            guest: "/a".into(),
            read_only: false,
        }],
    };
    runtime.update("upd", &update).unwrap();
    let got = &runtime.list().unwrap()[0];
    assert_eq!((got.cpus, got.memory_mib), (Some(3), Some(3072)));
    assert_eq!(real.list_json()[0]["mounts"], 2);

    // Stopping a machine that never ran succeeds (exit 0).
    runtime.stop("upd").unwrap();
    assert_eq!(runtime.list().unwrap()[0].state, MachineState::Created);

    // Not found, from every verb that can say it.
    assert!(matches!(
        kind_of(runtime.create(&spec("upd"))),
        RuntimeErrorKind::AlreadyExists
    ));
    for result in [
        runtime.start("gone"),
        runtime.stop("gone"),
        runtime.delete("gone"),
        runtime.update("gone", &update),
    ] {
        assert!(matches!(kind_of(result), RuntimeErrorKind::NotFound));
    }
    assert!(matches!(
        kind_of(runtime.exec("gone", &ExecRequest::shell("true"))),
        RuntimeErrorKind::NotFound
    ));
    // Not running: exec and cp, in every argv shape the driver builds
    // (the real parser accepts each before it finds no VM).
    let mut request = ExecRequest::shell("id -un").timeout(Duration::from_millis(1500));
    request.env.insert("HOME".into(), "/home/node".into());
    request.workdir = Some("/workspace".into());
    for request in [request.clone(), request.as_user("node")] {
        assert!(matches!(
            kind_of(runtime.exec("upd", &request)),
            RuntimeErrorKind::NotRunning
        ));
    }
    let file = dir.path().join("f");
    std::fs::write(&file, "x").unwrap();
    let options = CopyOptions {
        mode: 0o600,
        uid: 1000,
        gid: 1000,
    };
    assert!(matches!(
        kind_of(runtime.copy_in("upd", &file, "/home/node/f", &options)),
        RuntimeErrorKind::NotRunning
    ));
    assert!(matches!(
        kind_of(runtime.read_file("upd", "/etc/hostname")),
        RuntimeErrorKind::NotRunning
    ));
    // The interactive argv (attach) parses too.
    let argv = runtime.interactive_argv("upd", &ExecRequest::new(["claude"]).as_user("node"));
    let output = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .env("SMOLVM_DATA_DIR", real.data_dir())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(stderr(&output).contains("is not running"), "{output:?}");

    runtime.delete("upd").unwrap();
    assert!(runtime.list().unwrap().is_empty());
}

/// A command line smolvm refuses is bottle's fault, and says so.
#[test]
fn real_usage_errors_are_reported_as_bottle_built_argv() {
    let Some(real) = Real::new("real_usage_errors_are_reported_as_bottle_built_argv") else {
        return;
    };
    let output = real.run(&["machine", "update", "--name", "a", "--label", "k=v"]);
    assert_eq!(output.status.code(), Some(2));
    // The same text the driver classifies (tested in output.rs), and the
    // help that blames the argv, not the runtime.
    let text = stderr(&output);
    assert!(
        text.starts_with("error: unexpected argument '--label' found"),
        "{text}"
    );
    let kind = RuntimeErrorKind::Usage {
        command: "smolvm machine update".into(),
        stderr: text.lines().next().unwrap().into(),
    };
    let help = miette::Diagnostic::help(&kind).unwrap().to_string();
    assert!(help.starts_with("bottle built a command"), "{help}");
}

/// Where no VM boots, `start` fails after its checks and the machine stays
/// `created`: a failure bottle reports as such, not as a missing machine.
#[test]
fn real_start_fails_here_and_leaves_the_machine_created() {
    let Some(real) = Real::new("real_start_fails_here_and_leaves_the_machine_created") else {
        return;
    };
    let runtime = real.runtime();
    runtime.create(&spec("boot")).unwrap();
    match kind_of(runtime.start("boot")) {
        RuntimeErrorKind::CommandFailed {
            command,
            status,
            stderr,
            ..
        } => {
            assert_eq!(status, 1);
            assert!(command.ends_with("machine start --name boot"), "{command}");
            // Progress on stderr, then smolvm's error line.
            assert!(stderr.starts_with("Starting machine 'boot'"), "{stderr}");
            assert!(stderr.contains("\nError: "), "{stderr}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(runtime.list().unwrap()[0].state, MachineState::Created);
}

/// Many creates, then many deletes, at once through one driver: smolvm
/// alone fails about half of these with `database is locked`.
#[test]
fn real_parallel_creates_and_deletes_all_succeed() {
    let Some(real) = Real::new("real_parallel_creates_and_deletes_all_succeed") else {
        return;
    };
    let runtime = real.runtime();
    let names: Vec<String> = (0..16).map(|i| format!("p{i:02}")).collect();
    std::thread::scope(|scope| {
        for name in &names {
            let runtime = &runtime;
            scope.spawn(move || runtime.create(&spec(name)).unwrap());
        }
    });
    assert_eq!(real.names(), names);
    std::thread::scope(|scope| {
        for name in &names {
            let runtime = &runtime;
            scope.spawn(move || runtime.delete(name).unwrap());
        }
    });
    assert!(real.names().is_empty());
}

/// A project of `agents` agents in one minimal bottle, in a new directory.
fn write_project(name: &str, agents: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut text = format!(
        "[project]\nname = \"{name}\"\n\n[bottle.b]\ncpus = 1\nmemory_mib = 512\nuser = \"agent\"\n"
    );
    for i in 0..agents {
        text.push_str(&format!("\n[agent.a{i:02}]\nbottle = \"b\"\n"));
    }
    std::fs::write(dir.path().join("bottle.toml"), text).unwrap();
    dir
}

/// `bottle --smolvm REAL --state-dir STATE apply --parallelism 8 DIR`,
/// started (not waited for).
fn spawn_real_apply(
    real: &Real,
    project: &std::path::Path,
    state: &std::path::Path,
) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_bottle"))
        .arg("--smolvm")
        .arg(real.binary())
        .arg("--state-dir")
        .arg(state)
        .args(["apply", "--parallelism", "8"])
        .arg(project)
        .env("SMOLVM_DATA_DIR", real.data_dir())
        .env_remove("BOTTLE_RUNTIME")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running bottle")
}

/// What a user hit first: at the default `--parallelism 8`, about half of
/// the creates failed with `database is locked`. Ten fresh applies of 12
/// agents each: every machine created, no lock failure. The starts fail
/// here (no VM boots), and say that the machine was created.
#[test]
fn real_apply_of_12_agents_at_parallelism_8_creates_all_of_them() {
    if Real::new("real_apply_of_12_agents_at_parallelism_8_creates_all_of_them").is_none() {
        return;
    }
    let project = write_project("par", 12);
    for run in 0..10 {
        let real = Real::new("").unwrap();
        let state = tempfile::tempdir().unwrap();
        let output = spawn_real_apply(&real, project.path(), state.path())
            .wait_with_output()
            .unwrap();
        let all = format!("{}{}", stdout(&output), stderr(&output));
        assert!(!all.contains("database is locked"), "run {run}:\n{all}");
        let expected: Vec<String> = (0..12).map(|i| format!("bottle_par_a{i:02}")).collect();
        assert_eq!(real.names(), expected, "run {run}:\n{all}");
        assert_eq!(output.status.code(), Some(1), "run {run}:\n{all}");
        assert!(
            all.contains("created bottle_par_a00, but it did not start"),
            "run {run}:\n{all}"
        );
    }
}

/// Two bottle processes, two projects, one smolvm: they take turns too,
/// in each of ten rounds.
#[test]
fn real_two_projects_applying_at_once_create_all_machines() {
    if Real::new("real_two_projects_applying_at_once_create_all_machines").is_none() {
        return;
    }
    let (one, two) = (write_project("one", 12), write_project("two", 12));
    for round in 0..10 {
        let real = Real::new("").unwrap();
        let (state_one, state_two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let first = spawn_real_apply(&real, one.path(), state_one.path());
        let second = spawn_real_apply(&real, two.path(), state_two.path());
        let outputs = [
            first.wait_with_output().unwrap(),
            second.wait_with_output().unwrap(),
        ];
        for output in &outputs {
            let all = format!("{}{}", stdout(output), stderr(output));
            assert!(!all.contains("database is locked"), "round {round}:\n{all}");
        }
        let names = real.names();
        assert_eq!(names.len(), 24, "round {round}: {names:?}");
        assert_eq!(
            names
                .iter()
                .filter(|n| n.starts_with("bottle_one_"))
                .count(),
            12
        );
    }
}

// --- No runtime call outlives bottle -----------------------------------------

fn alive(pid: u32) -> bool {
    // A zombie has exited: only a process that can still run counts.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        })
        .unwrap_or(false)
}

/// A SIGKILLed bottle must not leave its smolvm calls running (a killed
/// `destroy` left `machine delete` calls that removed the machines the
/// next `apply` had just checked): they die with it.
#[test]
fn smolvm_calls_die_with_a_killed_bottle() {
    let project = support::project::Project::with_double(
        "e2e",
        Double::new().with_env("BOTTLE_E2E_SECRET", "s"),
    );
    let double = &project.double;
    // Every `create` hangs: bottle is killed while its calls are under way.
    let mut command = project.command(&["apply", "--parallelism", "4"]);
    command
        .env("SMOLVM_DOUBLE_HANG", "create")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut bottle = command.spawn().unwrap();
    let hung = || -> Vec<u32> {
        let text = std::fs::read_to_string(double.home().join("calls.jsonl")).unwrap_or_default();
        text.lines()
            .filter(|line| line.contains("SMOLVM_DOUBLE_HANG"))
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter_map(|call| call["pid"].as_u64().map(|pid| pid as u32))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while hung().is_empty() {
        assert!(Instant::now() < deadline, "no create call started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pids = hung();
    assert!(
        pids.iter().all(|pid| alive(*pid)),
        "the calls run while bottle does"
    );
    bottle.kill().unwrap();
    bottle.wait().unwrap();
    // The kernel delivers the parent-death signal as bottle exits; give
    // the scheduler a bounded while to run it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while pids.iter().any(|pid| alive(*pid)) {
        assert!(
            Instant::now() < deadline,
            "smolvm calls outlived the killed bottle: {:?}",
            pids.iter().filter(|pid| alive(**pid)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// --- exec as the image's USER (smolvm 1.6 to 1.13) ---------------------------

/// smolvm 1.9.2 runs `exec` as an image's `USER`, and bottle's root steps
/// then fail in confusing ways. The driver finds out before the command
/// runs and says what to do.
#[test]
fn exec_that_does_not_run_as_root_is_refused_before_the_command_runs() {
    let double = Double::new().with_env("SMOLVM_DOUBLE_EXEC_USER", "nobody");
    let runtime = double.runtime();
    runtime.create(&spec("img")).unwrap();
    runtime.start("img").unwrap();
    for request in [
        ExecRequest::shell("touch /tmp/ran"),
        ExecRequest::shell("touch /tmp/ran").as_user("nobody"),
    ] {
        let error = runtime.exec("img", &request).unwrap_err();
        match &error.kind {
            RuntimeErrorKind::ExecNotRoot { uid, user, version } => {
                assert_eq!((uid.as_str(), user.as_str()), ("65534", "nobody"));
                assert_eq!(version, "1.9.2");
            }
            other => panic!("{other:?}"),
        }
        let help = miette::Diagnostic::help(&error).unwrap().to_string();
        assert!(
            help.contains("USER root") && help.contains("1.14"),
            "{help}"
        );
    }
    // The command itself never ran.
    let check = double.run(&[
        "machine", "exec", "--name", "img", "--", "test", "-e", "/tmp/ran",
    ]);
    assert_eq!(check.status.code(), Some(1), "{check:?}");
}

/// The same through the CLI: `apply` fails early naming the cause.
#[test]
fn apply_on_an_image_whose_user_is_not_root_says_what_to_do() {
    let project = support::project::Project::with_double(
        "e2e",
        Double::new()
            .with_env("BOTTLE_E2E_SECRET", "s")
            .with_env("SMOLVM_DOUBLE_EXEC_USER", "nobody"),
    );
    let run = project.bottle(&["apply"]);
    run.code(1);
    let all = run.all();
    assert!(
        all.contains("commands run in this machine as uid 65534 (nobody), not as root"),
        "{all}"
    );
    assert!(all.contains("USER root"), "{all}");
}

/// A machine that was created but did not start is reported as such, and
/// the next apply starts it rather than creating it again.
#[test]
fn a_failed_start_after_create_says_the_machine_exists() {
    let project = support::project::Project::with_double(
        "e2e",
        Double::new()
            .with_env("BOTTLE_E2E_SECRET", "s")
            .with_env("SMOLVM_DOUBLE_FAIL", "start:1,start:2"),
    );
    let first = project.bottle(&["apply"]);
    first.code(1);
    let all = first.all();
    assert!(
        all.contains("created bottle_e2e_coder, but it did not start")
            && all.contains("created bottle_e2e_reader, but it did not start"),
        "{all}"
    );
    assert_eq!(project.double.count("create"), 2);
    let plan = project.bottle(&["plan"]);
    assert!(!plan.all().contains("no machine yet"), "{}", plan.all());
    project.bottle(&["apply"]).success();
    // Started, not created again.
    assert_eq!(project.double.count("create"), 2);
}

// --- database is locked --------------------------------------------------------

/// Hold the double's state database as another writer would.
fn hold_database(double: &Double) -> std::fs::File {
    std::fs::create_dir_all(double.home().join("locks")).unwrap();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(double.home().join("locks/.database"))
        .unwrap();
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive).unwrap();
    file
}

/// A writer that is not bottle holds smolvm's database: bottle's call
/// fails with `database is locked`, is retried, and succeeds once the
/// other writer is done; none is lost.
#[test]
fn a_call_that_meets_the_lock_error_is_retried_until_it_succeeds() {
    let double = Double::new();
    let runtime = double.runtime();
    runtime.create(&spec("first")).unwrap();
    let held = hold_database(&double);
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(held);
    });
    runtime.create(&spec("second")).unwrap();
    release.join().unwrap();
    let creates: Vec<_> = double
        .calls()
        .into_iter()
        .filter(|c| c.verb == "create")
        .collect();
    assert!(
        creates.len() >= 3,
        "the second create was retried: {creates:?}"
    );
    assert!(
        creates[1..creates.len() - 1]
            .iter()
            .all(|c| c.exit == Some(1))
    );
    let names: Vec<String> = runtime
        .list()
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names, ["first", "second"]);
}

/// The lock error that outlasts every retry is reported as such.
#[test]
fn a_database_that_stays_locked_is_reported_after_the_retries() {
    let double = Double::new();
    let runtime = double.runtime();
    let _held = hold_database(&double);
    let error = runtime.create(&spec("never")).unwrap_err();
    match &error.kind {
        RuntimeErrorKind::DatabaseLocked {
            attempts, stderr, ..
        } => {
            assert_eq!(*attempts, 8);
            assert!(stderr.ends_with("database is locked"), "{stderr}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(double.count("create"), 8);
    assert!(runtime.list().unwrap().is_empty());
}

/// `start` writes the machine's record after it has booted: when that
/// write meets the lock error, the machine runs, and it has started.
#[test]
fn a_start_whose_last_write_meets_the_lock_has_started() {
    let double = Double::new();
    let runtime = double.runtime();
    runtime.create(&spec("boots")).unwrap();
    let _held = hold_database(&double);
    runtime.start("boots").unwrap();
    assert_eq!(double.count("start"), 1);
    assert_eq!(runtime.list().unwrap()[0].state, MachineState::Running);
}
