//! The verbs' logic over an in-memory runtime: smolvm's texts, orders of
//! checks and state rules. The end-to-end behaviour over the local runtime is
//! tested through the binary in `tests/smolvm_contract.rs`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use bottle::runtime::{
    CopyOptions, ExecOutput, ExecRequest, MachineInfo, MachineSpec, MachineState, MachineUpdate,
    Runtime, RuntimeError, RuntimeErrorKind, RuntimeKind,
};
use clap::Parser;

use super::*;
use crate::cli::{Cli, Command};
use crate::knobs::Resolve;

/// A machine in memory: its spec, its state, its files by guest path.
type FakeMachine = (MachineSpec, MachineState, BTreeMap<String, Vec<u8>>);

/// Machines in memory: enough to drive every verb.
#[derive(Default)]
struct Fake {
    machines: Mutex<BTreeMap<String, FakeMachine>>,
}

fn missing(op: &'static str, name: &str) -> RuntimeError {
    RuntimeError::new(op, name, RuntimeErrorKind::NotFound)
}

impl Runtime for Fake {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Local
    }

    fn list(&self) -> Result<Vec<MachineInfo>, RuntimeError> {
        Ok(self
            .machines
            .lock()
            .unwrap()
            .values()
            .map(|(spec, state, _)| MachineInfo {
                name: spec.name.clone(),
                state: state.clone(),
                cpus: Some(spec.cpus),
                memory_mib: Some(spec.memory_mib),
                image: spec.image.clone(),
                network: spec.egress.is_some(),
                labels: spec.labels.clone(),
            })
            .collect())
    }

    fn create(&self, spec: &MachineSpec) -> Result<(), RuntimeError> {
        let mut machines = self.machines.lock().unwrap();
        if machines.contains_key(&spec.name) {
            return Err(RuntimeError::new(
                "create",
                &spec.name,
                RuntimeErrorKind::AlreadyExists,
            ));
        }
        machines.insert(
            spec.name.clone(),
            (spec.clone(), MachineState::Created, BTreeMap::new()),
        );
        Ok(())
    }

    fn start(&self, name: &str) -> Result<(), RuntimeError> {
        let mut machines = self.machines.lock().unwrap();
        let machine = machines
            .get_mut(name)
            .ok_or_else(|| missing("start", name))?;
        machine.1 = MachineState::Running;
        Ok(())
    }

    fn stop(&self, name: &str) -> Result<(), RuntimeError> {
        let mut machines = self.machines.lock().unwrap();
        let machine = machines
            .get_mut(name)
            .ok_or_else(|| missing("stop", name))?;
        if machine.1 == MachineState::Running {
            machine.1 = MachineState::Stopped;
        }
        Ok(())
    }

    fn update(&self, name: &str, update: &MachineUpdate) -> Result<(), RuntimeError> {
        let mut machines = self.machines.lock().unwrap();
        let machine = machines
            .get_mut(name)
            .ok_or_else(|| missing("update", name))?;
        if let Some(cpus) = update.cpus {
            machine.0.cpus = cpus;
        }
        if let Some(memory) = update.memory_mib {
            machine.0.memory_mib = memory;
        }
        machine
            .0
            .volumes
            .retain(|v| !update.remove_volumes.contains(v));
        machine.0.volumes.extend(update.add_volumes.iter().cloned());
        Ok(())
    }

    fn delete(&self, name: &str) -> Result<(), RuntimeError> {
        self.machines
            .lock()
            .unwrap()
            .remove(name)
            .map(drop)
            .ok_or_else(|| missing("delete", name))
    }

    fn exec(&self, name: &str, request: &ExecRequest) -> Result<ExecOutput, RuntimeError> {
        let machines = self.machines.lock().unwrap();
        let machine = machines.get(name).ok_or_else(|| missing("exec", name))?;
        let (status, stdout) = match request.argv.iter().map(String::as_str).collect::<Vec<_>>()[..]
        {
            ["false"] => (1, Vec::new()),
            ["cat", path] => (0, machine.2.get(path).cloned().unwrap_or_default()),
            ["env"] => (
                0,
                request
                    .env
                    .iter()
                    .map(|(k, v)| format!("{k}={v}\n"))
                    .collect::<String>()
                    .into_bytes(),
            ),
            _ => (0, format!("{}\n", request.argv.join(" ")).into_bytes()),
        };
        Ok(ExecOutput {
            status,
            stdout,
            stderr: b"to stderr\n".to_vec(),
        })
    }

    fn copy_in(
        &self,
        name: &str,
        host_path: &Path,
        guest_path: &str,
        options: &CopyOptions,
    ) -> Result<(), RuntimeError> {
        let bytes = std::fs::read(host_path).unwrap();
        let mut machines = self.machines.lock().unwrap();
        let machine = machines
            .get_mut(name)
            .ok_or_else(|| missing("copy", name))?;
        machine.2.insert(guest_path.to_owned(), bytes);
        machine.2.insert(
            format!("{guest_path}#mode"),
            format!("{:o}", options.mode).into_bytes(),
        );
        Ok(())
    }

    fn read_file(&self, name: &str, guest_path: &str) -> Result<Vec<u8>, RuntimeError> {
        let machines = self.machines.lock().unwrap();
        let machine = machines.get(name).ok_or_else(|| missing("read", name))?;
        machine.2.get(guest_path).cloned().ok_or_else(|| {
            RuntimeError::new(
                "read",
                name,
                RuntimeErrorKind::Unsupported("no such file".into()),
            )
        })
    }

    fn interactive_argv(&self, _: &str, _: &ExecRequest) -> Vec<String> {
        Vec::new()
    }
}

struct Harness {
    dir: tempfile::TempDir,
    home: Home,
    fake: Fake,
    knobs: Knobs,
}

/// One call: its exit (or `Error: ` text), stdout and stderr.
#[derive(Debug)]
struct Call {
    result: Result<Exit, String>,
    out: String,
    err: String,
}

impl Call {
    fn ok(&self) -> &str {
        assert_eq!(self.result, Ok(Exit::Code(0)), "{self:?}");
        &self.out
    }

    fn error(&self) -> String {
        self.result
            .as_ref()
            .expect_err(&format!("{self:?}"))
            .clone()
    }
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path().to_path_buf()).unwrap();
        Self {
            dir,
            home,
            fake: Fake::default(),
            knobs: Knobs::default(),
        }
    }

    fn call_with_input(&self, args: &[&str], input: &str) -> Call {
        let cli = Cli::try_parse_from(["smolvm", "machine"].iter().chain(args)).unwrap();
        let Command::Machine(command) = cli.command else {
            panic!("not a machine command")
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut input = input.as_bytes();
        let mut io = Io {
            out: &mut out,
            err: &mut err,
            input: &mut input,
        };
        let double = Double {
            home: &self.home,
            runtime: &self.fake,
            knobs: &self.knobs,
            call: 1,
        };
        let result = double
            .run(command, &mut io)
            .map_err(|failure| failure.to_string());
        Call {
            result,
            out: String::from_utf8(out).unwrap(),
            err: String::from_utf8(err).unwrap(),
        }
    }

    fn call(&self, args: &[&str]) -> Call {
        self.call_with_input(args, "")
    }

    fn listed(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(self.call(&["ls", "--json"]).ok()).unwrap()
    }

    fn names(&self) -> Vec<String> {
        self.listed()
            .iter()
            .map(|m| m["name"].as_str().unwrap().to_owned())
            .collect()
    }

    fn force_state(&self, name: &str, state: &str) {
        std::fs::write(
            self.dir.path().join("states.json"),
            serde_json::json!({ name: state }).to_string(),
        )
        .unwrap();
    }
}

#[test]
fn create_then_list_reports_what_smolvm_reports() {
    let h = Harness::new();
    let rootfs = tempfile::tempdir().unwrap();
    let image = rootfs.path().to_str().unwrap();
    let out = h
        .call(&[
            "create",
            "--name",
            "bottle-a",
            "--label",
            "bottle.agent=a",
            "--label",
            "k=x=y",
            "--image",
            image,
            "--cpus",
            "2",
            "--mem",
            "2048",
            "--allow-cidr",
            "10.8.0.0/16",
        ])
        .ok()
        .to_owned();
    assert!(
        out.starts_with("Created machine: bottle-a\n  CPUs: 2, Memory: 2048 MiB\n"),
        "{out}"
    );
    let listed = h.listed();
    assert_eq!(listed.len(), 1);
    let machine = &listed[0];
    assert_eq!(machine["state"], "created");
    assert_eq!(
        machine["labels"],
        serde_json::json!({"bottle.agent": "a", "k": "x=y"})
    );
    assert_eq!(machine["cpus"], 2);
    assert_eq!(machine["memory_mib"], 2048);
    assert_eq!(machine["network"], true);
    let canonical = rootfs.path().canonicalize().unwrap();
    assert_eq!(
        machine["image"],
        format!("local-dir:{}", canonical.display())
    );
    assert!(machine["created_at"].as_u64().unwrap() > 1_700_000_000);
    // smolvm's defaults, and no network without egress flags.
    h.call(&["create", "--name", "plain"]).ok();
    let plain = h
        .listed()
        .into_iter()
        .find(|m| m["name"] == "plain")
        .unwrap();
    assert_eq!(
        (plain["cpus"].as_u64(), plain["memory_mib"].as_u64()),
        (Some(4), Some(8192))
    );
    assert_eq!(plain["network"], false);
    assert_eq!(plain["image"], serde_json::Value::Null);
}

/// `--allow-cidr 100.96.0.1/32` (a gated bottle's egress): the runtime
/// gives the machine a network of its own (no egress of the host's) and
/// the gateway; `ls` still reports a network. Other allow-lists give the
/// host's network.
#[test]
fn the_gateway_cidr_gets_a_network_of_its_own() {
    let h = Harness::new();
    h.call(&[
        "create",
        "--name",
        "gated",
        "--allow-cidr",
        "100.96.0.1",
        "--allow-cidr",
        "10.8.0.0/16",
    ])
    .ok();
    h.call(&["create", "--name", "open", "--allow-cidr", "10.8.0.0/16"])
        .ok();
    let machines = h.fake.machines.lock().unwrap();
    let gated = &machines["gated"].0;
    assert_eq!(gated.egress, None);
    assert!(!gated.allow_unfiltered_network);
    assert_eq!(gated.gate_port, Some(crate::gateway::ANY_PORT));
    let open = &machines["open"].0;
    assert_eq!(
        open.egress.as_ref().map(|e| e.allow_cidrs.clone()),
        Some(vec!["10.8.0.0/16".to_owned()])
    );
    assert!(open.allow_unfiltered_network);
    assert_eq!(open.gate_port, None);
    drop(machines);
    for machine in h.listed() {
        assert_eq!(machine["network"], true, "{machine}");
    }
}

#[test]
fn ls_is_not_sorted_by_name() {
    let h = Harness::new();
    let names = ["t1", "t2", "t3", "t4", "t5", "t6"];
    for name in names {
        h.call(&["create", "--name", name]).ok();
    }
    let listed = h.names();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(sorted, names);
    assert_ne!(listed, sorted, "the double must not hide a missing sort");
    // Stable from one call to the next.
    assert_eq!(h.names(), listed);
}

#[test]
fn create_errors_in_smolvm_order() {
    let h = Harness::new();
    h.call(&["create", "--name", "a"]).ok();
    assert_eq!(
        h.call(&["create", "--name", "a"]).error(),
        "config operation failed: create machine: machine 'a' already exists or is being created"
    );
    // Labels are checked before the name and before existence.
    assert_eq!(
        h.call(&["create", "--name", "a", "--label", "novalue"])
            .error(),
        "config operation failed: --label: expected KEY=VALUE, got 'novalue'"
    );
    assert_eq!(
        h.call(&["create", "--name", "a--b", "--label", "=v"])
            .error(),
        "config operation failed: --label: label key cannot be empty (in '=v')"
    );
    assert_eq!(
        h.call(&["create", "--name", "a--b"]).error(),
        "config operation failed: create machine: machine name cannot contain consecutive hyphens"
    );
    // `--allow-host` is resolved first of all, and without DNS it fails.
    assert_eq!(
        h.call(&["create", "--name", "a", "--allow-host", "api.anthropic.com"])
            .error(),
        "config operation failed: --allow-host: failed to resolve 'api.anthropic.com': \
         failed to lookup address information: Name or service not known"
    );
    assert_eq!(h.names(), ["a"]);
}

/// Seen against smolvm 1.9.2: resources are checked (after labels, before
/// the name), a vCPU count above 16 is a warning on stderr, two volumes
/// with one guest path and a registry image without network are refused,
/// and a host path may contain `:`.
#[test]
fn resources_mounts_and_images_as_smolvm_checks_them() {
    let h = Harness::new();
    assert_eq!(
        h.call(&["create", "--name", "a--b", "--cpus", "0"]).error(),
        "config operation failed: validate resources: CPU count must be at least 1"
    );
    let call = h.call(&["create", "--name", "a", "--cpus", "20", "--mem", "63"]);
    assert_eq!(
        call.error(),
        "config operation failed: validate resources: memory must be at least 64 MiB (got 63 MiB)"
    );
    let warning = "warning: requested 20 vCPUs but the hypervisor supports at most 16; \
                   the VM will run with 16 vCPUs\n";
    assert_eq!(call.err, warning);
    let call = h.call(&["create", "--name", "big", "--cpus", "20", "--mem", "64"]);
    call.ok();
    assert_eq!(call.err, warning);
    assert_eq!(h.listed()[0]["cpus"], 20);

    let dir = h.dir.path().join("with:colon");
    std::fs::create_dir_all(&dir).unwrap();
    let (one, two) = (
        format!("{}:/w", dir.display()),
        format!("{}:/w/:ro", h.dir.path().display()),
    );
    assert_eq!(
        h.call(&["create", "--name", "m", "-v", &one, "-v", &two])
            .error(),
        "mount operation failed: validate mounts: duplicate mount target: /w/ is specified more than once"
    );
    h.call(&["create", "--name", "m", "-v", &one]).ok();
    let meta = h.home.meta("m").unwrap().unwrap();
    assert_eq!(meta.mounts[0].target, "/w");
    assert_eq!(meta.mounts[0].source, dir.canonicalize().unwrap());
    assert_eq!(
        h.call(&[
            "create",
            "--name",
            "r",
            "-v",
            &format!("{}:rel", dir.display())
        ])
        .error(),
        "mount operation failed: validate guest path: target path on guest should be an \
         absolute directory: rel"
    );

    let error = h
        .call(&["create", "--name", "img", "--image", "alpine"])
        .error();
    assert!(
        error.starts_with(
            "config operation failed: create machine: image 'alpine' must be pulled from a \
             registry, but this machine has no network"
        ),
        "{error}"
    );
    assert_eq!(sorted(h.names()), ["big", "m"]);
}

fn sorted(mut names: Vec<String>) -> Vec<String> {
    names.sort();
    names
}

/// A create killed after recording the machine and before making it leaves
/// a record nothing lists; the next create of the name must not be refused
/// for it (smolvm drops a dead creator's reservation the same way).
#[test]
fn a_record_left_by_a_killed_create_does_not_hold_the_name() {
    let h = Harness::new();
    h.home.write_meta("a", &Meta::default()).unwrap();
    assert!(h.names().is_empty());
    assert_eq!(
        h.call(&["delete", "--name", "a", "-f"]).error(),
        "vm not found: a"
    );
    h.call(&["create", "--name", "a", "--label", "k=v"]).ok();
    assert_eq!(h.names(), ["a"]);
    assert_eq!(h.listed()[0]["labels"]["k"], "v");
}

/// While another writer holds smolvm's database, every mutating verb fails
/// with smolvm's text and does nothing; reads go on.
#[test]
fn overlapping_writers_fail_with_database_is_locked() {
    let h = Harness::new();
    h.call(&["create", "--name", "a"]).ok();
    h.call(&["create", "--name", "b"]).ok();
    h.call(&["start", "--name", "b"]).ok();
    let held = h.home.write_transaction("test").unwrap();
    for (args, what) in [
        (&["create", "--name", "c"][..], "reserve vm 'c'"),
        (&["delete", "--name", "a", "-f"], "remove vm 'a'"),
        (&["update", "--name", "a", "--cpus", "2"], "update vm 'a'"),
        (&["stop", "--name", "b"], "update vm 'b'"),
        (&["start", "--name", "a"], "update vm 'a'"),
    ] {
        assert_eq!(
            h.call(args).error(),
            format!("database operation failed: {what}: database is locked"),
            "{args:?}"
        );
    }
    assert_eq!(sorted(h.names()), ["a", "b"]);
    // `start` fails at its last write, after the boot: both run.
    assert_eq!(
        h.listed()
            .iter()
            .filter(|m| m["state"] == "running")
            .count(),
        2
    );
    h.call(&["exec", "--name", "b", "--", "true"]);
    drop(held);
    h.call(&["create", "--name", "c"]).ok();
    h.call(&["delete", "--name", "a", "-f"]).ok();
    assert_eq!(sorted(h.names()), ["b", "c"]);
}

#[test]
fn allow_host_is_resolved_and_recorded() {
    let mut h = Harness::new();
    h.knobs.resolve = Resolve::Any;
    h.call(&["create", "--name", "a", "--allow-host", "api.anthropic.com"])
        .ok();
    let meta = h.home.meta("a").unwrap().unwrap();
    assert_eq!(
        meta.dns_filter_hosts,
        Some(vec!["api.anthropic.com".to_owned()])
    );
    assert!(meta.allowed_cidrs.unwrap()[0].starts_with("192.0.2."));
    assert!(meta.network);
}

#[test]
fn lifecycle_texts() {
    let h = Harness::new();
    h.call(&["create", "--name", "a"]).ok();
    assert_eq!(
        h.call(&["stop", "--name", "a"]).ok(),
        "Machine 'a' is not running (state: created)\n"
    );
    let started = h.call(&["start", "--name", "a"]);
    assert_eq!(started.ok(), "Machine 'a' running\n");
    // smolvm prints its progress on stderr.
    assert_eq!(started.err, "Starting machine 'a'...\n");
    assert_eq!(h.listed()[0]["state"], "running");
    assert_eq!(
        h.call(&["start", "--name", "a"]).ok(),
        "Machine 'a' already running\n"
    );
    assert_eq!(
        h.call(&["stop", "-n", "a"]).ok(),
        "Stopping machine 'a'...\nStopped machine: a\n"
    );
    assert_eq!(
        h.call(&["stop", "-n", "a"]).ok(),
        "Machine 'a' is not running (state: stopped)\n"
    );
    assert_eq!(
        h.call(&["start", "--name", "nope"]).error(),
        "vm not found: nope"
    );
}

/// As smolvm 1.9.2 does (seen against the real binary): prose `status`,
/// `exec`, `stop` and `cp` of an unknown name say `vm not found` and leave
/// a data folder; `status --json`, `update`, `delete` leave none.
#[test]
fn unknown_names_leave_a_folder_that_is_not_a_machine() {
    let h = Harness::new();
    for (args, error) in [
        (&["status", "--name", "ghost1"][..], "vm not found: ghost1"),
        (
            &["exec", "--name", "ghost2", "--", "true"],
            "vm not found: ghost2",
        ),
        (&["stop", "--name", "ghost3"], "vm not found: ghost3"),
        (
            &["cp", "/etc/hostname", "ghost4:/x"],
            "vm not found: ghost4",
        ),
    ] {
        assert_eq!(h.call(args).error(), error);
    }
    for ghost in ["ghost1", "ghost2", "ghost3", "ghost4"] {
        assert!(h.home.data_dir(ghost).is_dir(), "{ghost}");
    }
    assert!(h.names().is_empty());
    assert_eq!(
        h.call(&["status", "--name", "ghost7", "--json"]).error(),
        "config operation failed: machine status: machine 'ghost7' not found"
    );
    assert_eq!(
        h.call(&["update", "--name", "ghost5", "--cpus", "2"])
            .error(),
        "config operation failed: update: machine 'ghost5' not found"
    );
    assert_eq!(
        h.call(&["delete", "--name", "ghost6", "-f"]).error(),
        "vm not found: ghost6"
    );
    for ghost in ["ghost5", "ghost6", "ghost7"] {
        assert!(!h.home.data_dir(ghost).exists(), "{ghost}");
    }
}

#[test]
fn delete_without_force_asks_and_cancels() {
    let h = Harness::new();
    h.call(&["create", "--name", "a"]).ok();
    h.call(&["start", "--name", "a"]).ok();
    let call = h.call(&["delete", "--name", "a"]);
    assert_eq!(call.err, "Delete machine 'a'? [y/N] ");
    assert_eq!(call.ok(), "Stopping machine 'a'...\nCancelled\n");
    // Nothing deleted; as smolvm does, the machine was stopped first.
    assert_eq!(h.listed()[0]["state"], "stopped");
    assert_eq!(
        h.call_with_input(&["delete", "--name", "a"], "n\n").out,
        "Cancelled\n"
    );
    assert_eq!(h.names(), ["a"]);

    let call = h.call_with_input(&["delete", "--name", "a"], "y\n");
    assert!(call.ok().ends_with("Deleted machine: a\n"));
    assert!(h.names().is_empty());
    assert!(h.home.meta("a").unwrap().is_none());
    assert!(!h.home.data_dir("a").exists());
}

#[test]
fn update_rules() {
    let h = Harness::new();
    let dir = tempfile::tempdir().unwrap();
    let volume = format!("{}:/ws", dir.path().display());
    h.call(&[
        "create", "--name", "a", "--cpus", "2", "--mem", "1024", "-v", &volume,
    ])
    .ok();
    let out = h
        .call(&["update", "--name", "a", "--cpus", "3", "--mem", "3072"])
        .ok()
        .to_owned();
    assert!(
        out.contains("  cpus: 2 → 3\n  memory: 1024 MiB → 3072 MiB\n"),
        "{out}"
    );
    let machine = &h.listed()[0];
    assert_eq!(
        (machine["cpus"].as_u64(), machine["memory_mib"].as_u64()),
        (Some(3), Some(3072))
    );
    assert_eq!(machine["mounts"], 1);

    // Replace the mount's mode in one call: removal first, then the add.
    h.call(&[
        "update",
        "--name",
        "a",
        "--remove-volume",
        &volume,
        "-v",
        &format!("{volume}:ro"),
    ])
    .ok();
    let meta = h.home.meta("a").unwrap().unwrap();
    assert_eq!(meta.mounts.len(), 1);
    assert!(meta.mounts[0].read_only);
    assert_eq!(
        h.call(&["update", "--name", "a", "-e", "novalue"]).error(),
        "config operation failed: update: invalid env format 'novalue': expected KEY=VALUE"
    );
    assert_eq!(
        h.call(&["update", "--name", "a"]).ok(),
        "No changes specified.\n"
    );

    h.call(&["start", "--name", "a"]).ok();
    assert_eq!(
        h.call(&["update", "--name", "a", "--cpus", "1"]).error(),
        "invalid vm state: expected stopped, got running"
    );
}

#[test]
fn exec_and_cp_need_a_running_machine() {
    let h = Harness::new();
    h.call(&["create", "--name", "a", "-w", "/work"]).ok();
    let not_running = "agent operation failed: connect: machine 'a' is not running. \
                       Use 'smolvm machine start --name a' first.";
    assert_eq!(
        h.call(&["exec", "--name", "a", "--", "true"]).error(),
        not_running
    );
    assert_eq!(
        h.call(&["cp", "/etc/hostname", "a:/x"]).error(),
        not_running
    );

    h.call(&["start", "--name", "a"]).ok();
    let call = h.call(&["exec", "--name", "a", "--", "echo", "hi"]);
    assert_eq!((call.ok(), call.err.as_str()), ("echo hi\n", "to stderr\n"));
    assert_eq!(
        h.call(&["exec", "--name", "a", "--", "false"]).result,
        Ok(Exit::Code(1))
    );

    let host = h.dir.path().join("upload");
    std::fs::write(&host, "content").unwrap();
    h.call(&["cp", "--mode", "600", host.to_str().unwrap(), "a:/etc/x"])
        .ok();
    assert_eq!(
        h.call(&["exec", "--name", "a", "--", "cat", "/etc/x"]).ok(),
        "content"
    );
    assert_eq!(
        h.call(&["exec", "--name", "a", "--", "cat", "/etc/x#mode"])
            .ok(),
        "600"
    );
    let back = h.dir.path().join("download");
    h.call(&["cp", "a:/etc/x", back.to_str().unwrap()]).ok();
    assert_eq!(std::fs::read_to_string(&back).unwrap(), "content");

    assert_eq!(
        h.call(&["cp", "--mode", "600", "a:/etc/x", back.to_str().unwrap()])
            .error(),
        "config operation failed: cp: --mode/--uid/--gid apply to uploads only (host -> machine)"
    );
    assert_eq!(
        h.call(&["cp", "/a", "/b"]).error(),
        "config operation failed: cp: one of SRC or DST must use machine:path syntax (e.g., myvm:/workspace/file)"
    );
}

#[test]
fn exec_secrets_are_resolved_on_the_host() {
    let h = Harness::new();
    h.call(&["create", "--name", "a"]).ok();
    h.call(&["start", "--name", "a"]).ok();
    // PATH is set in every test environment; its value stands in for a secret.
    let out = h
        .call(&[
            "exec",
            "--name",
            "a",
            "--secret-env",
            "TOKEN=PATH",
            "-e",
            "A=1",
            "--",
            "env",
        ])
        .ok()
        .to_owned();
    assert!(
        out.contains(&format!("TOKEN={}\n", std::env::var("PATH").unwrap())),
        "{out}"
    );
    assert!(out.contains("A=1\n"));
}

#[test]
fn forced_states() {
    let h = Harness::new();
    h.call(&["create", "--name", "a"]).ok();
    h.call(&["start", "--name", "a"]).ok();
    h.force_state("a", "unreachable");
    assert_eq!(h.listed()[0]["state"], "unreachable");
    let status: serde_json::Value =
        serde_json::from_str(h.call(&["status", "--name", "a", "--json"]).ok()).unwrap();
    assert_eq!(status["state"], "unreachable");
    assert!(
        h.call(&["exec", "--name", "a", "--", "true"])
            .error()
            .contains("is not running")
    );
    assert_eq!(
        h.call(&["update", "--name", "a", "--cpus", "1"]).error(),
        "invalid vm state: expected stopped, got unreachable"
    );
    // start recovers it.
    h.call(&["start", "--name", "a"]).ok();
    assert_eq!(h.listed()[0]["state"], "running");
}
