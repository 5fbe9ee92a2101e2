//! The local runtime against real bubblewrap sandboxes. Needs root and
//! `bwrap` (CI has both).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bottle::runtime::local::LocalRuntime;
use bottle::runtime::{
    CopyOptions, Egress, ExecOutput, ExecRequest, MachineSpec, MachineState, MachineUpdate,
    Runtime, RuntimeErrorKind, SecretMount, SecretSource, VolumeMount,
};

/// A state directory whose machines are stopped when the test ends, even
/// when it fails.
struct Fixture {
    rt: LocalRuntime,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("bottle-local-test-")
            .tempdir()
            .unwrap();
        let rt = LocalRuntime::open(dir.path()).unwrap();
        Self { rt, dir }
    }

    fn spec(name: &str) -> MachineSpec {
        MachineSpec {
            name: name.to_owned(),
            cpus: 2,
            memory_mib: 2048,
            ..MachineSpec::default()
        }
    }

    /// Create and start a machine.
    fn up(&self, spec: MachineSpec) -> String {
        self.rt.create(&spec).unwrap();
        self.rt.start(&spec.name).unwrap();
        spec.name
    }

    fn sh(&self, name: &str, script: &str) -> ExecOutput {
        self.rt.exec(name, &ExecRequest::shell(script)).unwrap()
    }

    /// Run a script that must succeed; its stdout.
    fn ok(&self, name: &str, script: &str) -> String {
        let out = self.sh(name, script);
        assert!(
            out.success(),
            "`{script}` failed with {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn state(&self, name: &str) -> MachineState {
        self.rt
            .list()
            .unwrap()
            .into_iter()
            .find(|m| m.name == name)
            .unwrap()
            .state
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // A fresh runtime, in case the test's one is in a bad way.
        if let Ok(rt) = LocalRuntime::open(self.dir.path())
            && let Ok(machines) = rt.list()
        {
            for m in machines {
                let _ = rt.stop(&m.name);
            }
        }
    }
}

fn kind(e: bottle::runtime::RuntimeError) -> RuntimeErrorKind {
    e.kind
}

#[test]
fn lifecycle_states_and_errors() {
    let f = Fixture::new();
    assert!(f.rt.list().unwrap().is_empty());
    f.rt.create(&Fixture::spec("life")).unwrap();
    assert_eq!(f.state("life"), MachineState::Created);
    assert!(matches!(
        kind(f.rt.create(&Fixture::spec("life")).unwrap_err()),
        RuntimeErrorKind::AlreadyExists
    ));
    assert!(matches!(
        kind(f.rt.exec("life", &ExecRequest::shell("true")).unwrap_err()),
        RuntimeErrorKind::NotRunning
    ));
    assert!(matches!(
        kind(f.rt.start("nope").unwrap_err()),
        RuntimeErrorKind::NotFound
    ));
    assert!(matches!(
        kind(f.rt.exec("nope", &ExecRequest::shell("true")).unwrap_err()),
        RuntimeErrorKind::NotFound
    ));
    assert!(matches!(
        kind(f.rt.create(&Fixture::spec("bad--name")).unwrap_err()),
        RuntimeErrorKind::Unsupported(m) if m.contains("consecutive hyphens")
    ));

    f.rt.start("life").unwrap();
    assert_eq!(f.state("life"), MachineState::Running);
    // Starting a running machine is a no-op.
    f.rt.start("life").unwrap();
    assert_eq!(f.ok("life", "hostname"), "life\n");
    // Its own pid namespace: the shell is not pid 1 but few processes exist.
    let pids = f.ok("life", "ls /proc | grep -c '^[0-9]'");
    assert!(pids.trim().parse::<u32>().unwrap() < 10, "{pids}");
    let out = f.sh("life", "echo out; echo err >&2; exit 3");
    assert_eq!(out.status, 3);
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");

    // A missing program fails like in a shell.
    let out =
        f.rt.exec("life", &ExecRequest::new(["no-such-program"]))
            .unwrap();
    assert_eq!(out.status, 127);
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("no-such-program: "));
    let out =
        f.rt.exec("life", &ExecRequest::new(["/etc/hostname"]))
            .unwrap();
    assert_eq!(out.status, 126);

    f.rt.stop("life").unwrap();
    assert_eq!(f.state("life"), MachineState::Stopped);
    f.rt.stop("life").unwrap();
    assert!(matches!(
        kind(f.rt.exec("life", &ExecRequest::shell("true")).unwrap_err()),
        RuntimeErrorKind::NotRunning
    ));

    // Files survive a stop and start.
    f.rt.start("life").unwrap();
    f.ok("life", "echo kept > /root/kept");
    f.rt.stop("life").unwrap();
    f.rt.start("life").unwrap();
    assert_eq!(f.ok("life", "cat /root/kept"), "kept\n");
}

#[test]
fn list_is_sorted_and_reports_the_spec() {
    let f = Fixture::new();
    for name in ["zeta", "Alpha", "mid"] {
        let mut spec = Fixture::spec(name);
        spec.labels = BTreeMap::from([("bottle.managed-by".to_owned(), "bottle".to_owned())]);
        f.rt.create(&spec).unwrap();
    }
    let list = f.rt.list().unwrap();
    let names: Vec<_> = list.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["Alpha", "mid", "zeta"]);
    assert_eq!(list[0].cpus, Some(2));
    assert_eq!(list[0].memory_mib, Some(2048));
    assert!(!list[0].network);
    assert_eq!(list[0].labels["bottle.managed-by"], "bottle");
    let record = f.rt.record("mid").unwrap();
    assert!(record.created_at > 1_700_000_000);
    assert_eq!(record.state, MachineState::Created);
}

#[test]
fn state_survives_reopening_the_runtime() {
    let f = Fixture::new();
    f.up(Fixture::spec("persist"));
    let pid = f.rt.record("persist").unwrap().pid().unwrap();
    // A new runtime over the same directory, as a later bottle process.
    let again = LocalRuntime::open(f.dir.path()).unwrap();
    assert_eq!(
        again.record("persist").unwrap().state,
        MachineState::Running
    );
    assert_eq!(again.record("persist").unwrap().pid(), Some(pid));
    let out = again
        .exec("persist", &ExecRequest::shell("echo hi"))
        .unwrap();
    assert_eq!(out.stdout, b"hi\n");
    again.stop("persist").unwrap();
    assert_eq!(f.state("persist"), MachineState::Stopped);
    // Gone, a zombie its reaper has not collected yet (a PID 1 that is a
    // shell or cargo reaps late), or a reused pid that is not our init.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    assert!(
        stat.is_empty() || matches!(state, Some("Z" | "X")) || !stat.contains("(bwrap)"),
        "the init still runs: {stat}"
    );
}

#[test]
fn the_sandbox_outlives_a_killed_runtime_process() {
    // The sandbox must not be a child that dies with its parent: check its
    // init is not our child and has its own session.
    let f = Fixture::new();
    f.up(Fixture::spec("orphan"));
    let pid = f.rt.record("orphan").unwrap().pid().unwrap();
    let (init_ppid, init_sid) = parent_and_session(&pid.to_string());
    let (_, our_sid) = parent_and_session("self");
    assert_ne!(init_ppid, std::process::id());
    // Read from /proc rather than getsid(2): when this test's session leader
    // lives outside our PID namespace (CI containers), the kernel reports 0.
    assert_ne!(init_sid, our_sid);
    assert_ne!(
        init_sid, 0,
        "the sandbox's session leader must be visible to us"
    );
}

/// The parent pid and session id of `/proc/<pid>/stat`.
fn parent_and_session(pid: &str) -> (u32, u32) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    (fields[1].parse().unwrap(), fields[3].parse().unwrap())
}

#[test]
fn nothing_leaks_between_machines_or_to_the_host() {
    let f = Fixture::new();
    let a = f.up(Fixture::spec("leak-a"));
    let b = f.up(Fixture::spec("leak-b"));
    let marker = format!("bottle-leak-{}", std::process::id());
    for dir in [
        "/tmp",
        "/root",
        "/etc",
        "/usr/local/bin",
        "/var/tmp",
        "/opt",
        "/home",
    ] {
        f.ok(&a, &format!("echo x > {dir}/{marker}"));
        assert!(
            !Path::new(dir).join(&marker).exists(),
            "{dir} leaked to the host"
        );
        let out = f.sh(&b, &format!("test -e {dir}/{marker}"));
        assert_eq!(out.status, 1, "{dir} leaked to the other machine");
    }
    // The host's system directories are read-only.
    let out = f.sh(&a, &format!("touch /usr/bin/{marker}"));
    assert_ne!(out.status, 0);
    assert!(!Path::new("/usr/bin").join(&marker).exists());
    // /usr/local is the machine's own, empty but for the skeleton.
    assert_eq!(
        f.ok(&a, "ls /usr/local/bin | grep -v bottle-leak | wc -l")
            .trim(),
        "0"
    );
    assert!(
        f.ok(&a, "test -d /usr/local/share/ca-certificates && echo yes")
            .contains("yes")
    );
    // No secrets of the host's /etc.
    let shadow = f.ok(&a, "cat /etc/shadow");
    assert!(!shadow.contains('$'), "password hashes leaked: {shadow}");
    let out = f.sh(
        &a,
        "ls /etc/ssh/ssh_host_* 2>/dev/null; test -e /etc/machine-id",
    );
    assert!(out.stdout.is_empty());
    assert_ne!(out.status, 0);
    // Nor change host-wide kernel settings (writing the current value back
    // is harmless if this ever regresses).
    let out = f.sh(
        &a,
        "cat /proc/sys/vm/swappiness > /tmp/v && cat /tmp/v > /proc/sys/vm/swappiness",
    );
    assert_ne!(out.status, 0, "/proc/sys is writable");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Read-only"),
        "{out:?}"
    );
    // The guest's root cannot mount or make device nodes.
    let out = f.sh(&a, "mount -t tmpfs none /mnt");
    assert_ne!(out.status, 0);
    let out = f.sh(&a, "mknod /tmp/disk b 254 0");
    assert_ne!(out.status, 0);
}

#[test]
fn no_network_without_egress_and_unfiltered_with_it() {
    let f = Fixture::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let connect = format!("exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected");

    let closed = f.up(Fixture::spec("net-none"));
    let out =
        f.rt.exec(&closed, &ExecRequest::new(["bash", "-c", &connect]))
            .unwrap();
    assert_ne!(out.status, 0, "{}", String::from_utf8_lossy(&out.stdout));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("connected"));

    // Egress without the user's consent is refused, with the way out.
    let mut spec = Fixture::spec("net-egress");
    spec.egress = Some(Egress {
        allow_hosts: vec!["api.anthropic.com".to_owned()],
        allow_cidrs: vec![],
    });
    spec.labels
        .insert("bottle.bottle".to_owned(), "dev".to_owned());
    match kind(f.rt.create(&spec).unwrap_err()) {
        RuntimeErrorKind::Unsupported(m) => {
            assert!(
                m.contains("[bottle.dev.local] allow_unfiltered_network = true"),
                "{m}"
            );
            assert!(m.contains("smolvm"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    assert!(f.rt.list().unwrap().iter().all(|m| m.name != "net-egress"));

    // With consent, the host's network: the same connection works.
    spec.allow_unfiltered_network = true;
    let open = f.up(spec);
    assert!(
        f.rt.list()
            .unwrap()
            .iter()
            .any(|m| m.name == open && m.network)
    );
    let out =
        f.rt.exec(&open, &ExecRequest::new(["bash", "-c", &connect]))
            .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "connected\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A gated machine's network holds loopback only, where the gate's port
/// leads to the host's `127.0.0.1:<port>` and nothing else does.
#[test]
fn a_gated_machine_reaches_the_gate_port_and_nothing_else() {
    let dir = tempfile::Builder::new()
        .prefix("bottle-local-test-")
        .tempdir()
        .unwrap();
    let rt = LocalRuntime::open(dir.path())
        .unwrap()
        .with_relay(env!("CARGO_BIN_EXE_bottle").into());
    let f = Fixture { rt, dir };
    // The "gate": answers each connection with a line, then closes.
    let gate = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = gate.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        for conn in gate.incoming().take(2) {
            let mut conn = conn.unwrap();
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(&conn), &mut line).unwrap();
            conn.write_all(format!("gate saw {line}").as_bytes())
                .unwrap();
        }
    });
    // Another service on the host's loopback, which must stay out of reach.
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let other_port = other.local_addr().unwrap().port();

    let mut spec = Fixture::spec("gated");
    spec.gate_port = Some(port);
    let m = f.up(spec);
    assert!(
        f.rt.list()
            .unwrap()
            .iter()
            .any(|i| i.name == m && !i.network)
    );
    let talk = format!("exec 3<>/dev/tcp/127.0.0.1/{port} && echo \"hello $1\" >&3 && cat <&3");
    for who in ["one", "two"] {
        let out =
            f.rt.exec(
                &m,
                &ExecRequest::new(["bash", "-c", &talk, "bash", who]).as_user("nobody"),
            )
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("gate saw hello {who}\n"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    server.join().unwrap();
    for target in [
        format!("127.0.0.1/{other_port}"),
        "10.255.255.1/443".to_owned(),
        "1.1.1.1/443".to_owned(),
    ] {
        let out = f.sh(
            &m,
            &format!("timeout 5 bash -c 'exec 3<>/dev/tcp/{target}' && echo connected"),
        );
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("connected"),
            "{target} was reachable"
        );
    }
    // The relay ends with the machine.
    f.rt.stop(&m).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while relays(port) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(relays(port), 0, "the relay outlived its machine");
}

/// Running relays for `port`.
fn relays(port: u16) -> usize {
    let needle = format!("local-gate-relay\0--port\0{port}\0");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|c| String::from_utf8_lossy(c).contains(&needle))
        .count()
}

#[test]
fn copy_in_sets_mode_owner_and_content_atomically() {
    let f = Fixture::new();
    let m = f.up(Fixture::spec("copy"));
    let host = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(host.path(), "hello from the host\n").unwrap();
    f.ok(&m, "useradd -m agent");
    let uid: u32 = f.ok(&m, "id -u agent").trim().parse().unwrap();
    let gid: u32 = f.ok(&m, "id -g agent").trim().parse().unwrap();
    let opts = CopyOptions {
        mode: 0o640,
        uid,
        gid,
    };
    f.rt.copy_in(&m, host.path(), "/home/agent/new/dir/file.txt", &opts)
        .unwrap();
    assert_eq!(
        f.ok(&m, "stat -c '%a %U %G' /home/agent/new/dir/file.txt"),
        "640 agent agent\n"
    );
    assert_eq!(
        f.ok(&m, "cat /home/agent/new/dir/file.txt"),
        "hello from the host\n"
    );
    // Missing parents are created, owned by root.
    assert_eq!(
        f.ok(&m, "stat -c '%U %a' /home/agent/new/dir"),
        "root 755\n"
    );
    // No staging file is left behind.
    assert_eq!(f.ok(&m, "ls -A /home/agent/new/dir"), "file.txt\n");
    // Default options: root, 644.
    f.rt.copy_in(
        &m,
        host.path(),
        "/etc/bottle-test.conf",
        &CopyOptions::default(),
    )
    .unwrap();
    assert_eq!(
        f.ok(&m, "stat -c '%a %U' /etc/bottle-test.conf"),
        "644 root\n"
    );
    assert_eq!(
        f.rt.read_file(&m, "/etc/bottle-test.conf").unwrap(),
        b"hello from the host\n"
    );
    // Overwriting replaces the file.
    std::fs::write(host.path(), "v2").unwrap();
    f.rt.copy_in(
        &m,
        host.path(),
        "/etc/bottle-test.conf",
        &CopyOptions::default(),
    )
    .unwrap();
    assert_eq!(f.ok(&m, "cat /etc/bottle-test.conf"), "v2");
}

#[test]
fn guest_symlinks_never_reach_host_files() {
    let f = Fixture::new();
    let m = f.up(Fixture::spec("symlinks"));
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, "host secret").unwrap();
    // The guest points paths at a host location.
    f.ok(
        &m,
        &format!(
            "ln -s {v} /root/read-me && mkdir -p /root/d && ln -s {dir} /root/d/into",
            v = victim.display(),
            dir = outside.path().display()
        ),
    );
    let host = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(host.path(), "from the guest side").unwrap();
    // Writing through the link writes inside the guest (where the link
    // target does not exist), never to the host file.
    let _ = f.rt.copy_in(
        &m,
        host.path(),
        "/root/d/into/victim",
        &CopyOptions::default(),
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "host secret");
    let _ =
        f.rt.copy_in(&m, host.path(), "/root/read-me", &CopyOptions::default());
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "host secret");
    // Reading through a link resolves inside the guest.
    f.ok(
        &m,
        "ln -sf /etc/hostname /root/read-me2 && ln -sf /../../../../etc/hostname /root/up",
    );
    assert_eq!(f.rt.read_file(&m, "/root/read-me2").unwrap(), b"symlinks\n");
    assert_eq!(f.rt.read_file(&m, "/root/up").unwrap(), b"symlinks\n");
    f.ok(&m, &format!("ln -sf {} /root/host-link", victim.display()));
    assert!(f.rt.read_file(&m, "/root/host-link").is_err());
}

#[test]
fn useradd_and_exec_as_that_user() {
    let f = Fixture::new();
    let m = f.up(Fixture::spec("users"));
    f.ok(&m, "useradd -m -s /bin/bash agent");
    // The host's regular users are not in the guest: the first user gets
    // the first regular uid, as on a fresh Debian guest.
    assert_eq!(f.ok(&m, "id -u agent"), "1000\n");
    let out =
        f.rt.exec(
            &m,
            &ExecRequest::shell("id -un; echo $HOME $USER; pwd; touch ~/mine").as_user("agent"),
        )
        .unwrap();
    assert!(out.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "agent\n/home/agent agent\n/home/agent\n"
    );
    assert_eq!(f.ok(&m, "stat -c %U /home/agent/mine"), "agent\n");
    // The user has no capabilities and cannot touch root's files.
    let out =
        f.rt.exec(&m, &ExecRequest::shell("touch /etc/nope").as_user("agent"))
            .unwrap();
    assert_ne!(out.status, 0);
    // runuser works too, as with smolvm.
    assert_eq!(f.ok(&m, "runuser -u agent -- id -un"), "agent\n");
    // git config --global writes the user's own ~/.gitconfig.
    let out =
        f.rt.exec(
            &m,
            &ExecRequest::shell(
                "git config --global user.name Agent && git config --global user.name",
            )
            .as_user("agent"),
        )
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Agent\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        f.ok(&m, "cat /home/agent/.gitconfig")
            .contains("name = Agent")
    );
    // An unknown user is an error.
    assert!(matches!(
        kind(f.rt.exec(&m, &ExecRequest::shell("true").as_user("ghost")).unwrap_err()),
        RuntimeErrorKind::Unsupported(msg) if msg.contains("ghost")
    ));
    // Programs are found on the guest's PATH, not the host's.
    f.ok(&m, "printf '#!/bin/sh\\necho guest-only\\n' > /usr/local/bin/guest-only && chmod +x /usr/local/bin/guest-only");
    let out = f.rt.exec(&m, &ExecRequest::new(["guest-only"])).unwrap();
    assert_eq!(out.stdout, b"guest-only\n");
    // A working directory.
    let mut req = ExecRequest::shell("pwd");
    req.workdir = Some("/tmp".to_owned());
    assert_eq!(f.rt.exec(&m, &req).unwrap().stdout, b"/tmp\n");
}

#[test]
fn update_ca_certificates_in_the_guest_only() {
    let f = Fixture::new();
    let m = f.up(Fixture::spec("ca"));
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("ca.crt");
    let status = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=bottle-local-test-ca", "-keyout"])
        .arg(dir.path().join("ca.key"))
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let pem = std::fs::read_to_string(&cert).unwrap();
    let body_line = pem.lines().nth(2).unwrap().to_owned();

    f.rt.copy_in(
        &m,
        &cert,
        "/usr/local/share/ca-certificates/bottle-test.crt",
        &CopyOptions::default(),
    )
    .unwrap();
    let out = f.sh(&m, "update-ca-certificates");
    assert!(out.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bundle =
        f.rt.read_file(&m, "/etc/ssl/certs/ca-certificates.crt")
            .unwrap();
    assert!(String::from_utf8_lossy(&bundle).contains(&body_line));
    let host_bundle =
        std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt").unwrap_or_default();
    assert!(!host_bundle.contains(&body_line));
    assert!(f.ok(&m, "ls /etc/ssl/certs").contains("bottle-test.pem"));
}

#[test]
fn env_and_secrets_reach_the_process_but_no_argv() {
    let f = Fixture::new();
    let secret_value = format!("s3cr3t-{}", fastrand::u64(..));
    let file_value = format!("f1le-{}", fastrand::u64(..));
    let var = format!("BOTTLE_TEST_SECRET_{}", std::process::id());
    // SAFETY: set before any machine thread of this test runs; the name is
    // unique to this process.
    unsafe { std::env::set_var(&var, &secret_value) };
    let secret_file = tempfile::NamedTempFile::new().unwrap();
    // Trailing newlines are trimmed, as smolvm trims them.
    std::fs::write(secret_file.path(), format!("{file_value}\r\n")).unwrap();

    let mut spec = Fixture::spec("secrets");
    spec.env = BTreeMap::from([("FROM_MACHINE".to_owned(), "m".to_owned())]);
    spec.secrets = vec![
        SecretMount {
            guest_env: "API_TOKEN".to_owned(),
            source: SecretSource::HostEnv(var.clone()),
        },
        SecretMount {
            guest_env: "FILE_TOKEN".to_owned(),
            source: SecretSource::HostFile(secret_file.path().to_owned()),
        },
    ];
    let m = f.up(spec);
    // The host's environment does not leak in.
    unsafe { std::env::set_var("BOTTLE_HOST_ONLY", "leaked") };
    let mut req = ExecRequest::new([
        "sh",
        "-c",
        "echo \"$FROM_MACHINE $FROM_REQUEST $API_TOKEN $FILE_TOKEN ${BOTTLE_HOST_ONLY:-clean}\"; \
         cat /proc/[0-9]*/cmdline | tr '\\0' ' '",
    ]);
    req.env.insert("FROM_REQUEST".to_owned(), "r".to_owned());
    let out = f.rt.exec(&m, &req).unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mut lines = stdout.lines();
    assert_eq!(
        lines.next().unwrap(),
        format!("m r {secret_value} {file_value} clean")
    );
    let cmdlines: String = lines.collect();
    assert!(!cmdlines.contains(&secret_value), "{cmdlines}");
    assert!(!cmdlines.contains(&file_value));
    // Nor on the host's side.
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        assert!(!String::from_utf8_lossy(&cmdline).contains(&secret_value));
    }
    // Like smolvm, secrets are read on the host when the machine starts:
    // a rotated value reaches the guest at the next start, and an exec
    // needs no host variable.
    let rotated = format!("{secret_value}-rotated");
    unsafe { std::env::set_var(&var, &rotated) };
    assert_eq!(f.ok(&m, "echo $API_TOKEN"), format!("{secret_value}\n"));
    unsafe { std::env::remove_var(&var) };
    assert_eq!(f.ok(&m, "echo $API_TOKEN"), format!("{secret_value}\n"));
    // The interactive argv carries no secret value either.
    let argv = f.rt.interactive_argv(&m, &ExecRequest::new(["bash"]));
    assert!(!argv.join(" ").contains(&secret_value));
    assert!(!argv.join(" ").contains(&file_value));
    // Without its host variable the machine does not start; the error
    // names the variable.
    f.rt.stop(&m).unwrap();
    match kind(f.rt.start(&m).unwrap_err()) {
        RuntimeErrorKind::Unsupported(msg) => assert!(msg.contains(&var), "{msg}"),
        other => panic!("{other:?}"),
    }
    unsafe { std::env::set_var(&var, &rotated) };
    f.rt.start(&m).unwrap();
    assert_eq!(f.ok(&m, "echo $API_TOKEN"), format!("{rotated}\n"));
    // The init that holds the values (pids 1 and 2 of the guest: bwrap's
    // reaper and the sleeper) is readable by guest root, as in a VM, but
    // not by a guest user.
    f.ok(&m, "useradd -m agent");
    let init_env =
        "cat /proc/1/environ /proc/2/environ 2>/dev/null | tr '\\0' '\\n' | grep -c TOKEN";
    let as_root: u32 = f.ok(&m, init_env).trim().parse().unwrap();
    assert!(as_root > 0);
    let out =
        f.rt.exec(&m, &ExecRequest::shell(init_env).as_user("agent"))
            .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "0\n");
    unsafe { std::env::remove_var(&var) };
}

#[test]
fn a_secret_named_like_a_shell_variable_arrives_intact() {
    // The init holds secrets under prefixed names: its shell resets IFS.
    let f = Fixture::new();
    let var = format!("BOTTLE_TEST_IFS_{}", std::process::id());
    unsafe { std::env::set_var(&var, "not-whitespace") };
    let mut spec = Fixture::spec("ifs");
    spec.secrets = vec![SecretMount {
        guest_env: "IFS".to_owned(),
        source: SecretSource::HostEnv(var.clone()),
    }];
    let m = f.up(spec);
    unsafe { std::env::remove_var(&var) };
    let out =
        f.rt.exec(&m, &ExecRequest::new(["/usr/bin/printenv", "IFS"]))
            .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "not-whitespace\n");
    let argv =
        f.rt.interactive_argv(&m, &ExecRequest::new(["/usr/bin/printenv", "IFS"]));
    let out = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "not-whitespace\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A command made for this init does not run after a restart.
    f.rt.stop(&m).unwrap();
    unsafe { std::env::set_var(&var, "not-whitespace") };
    f.rt.start(&m).unwrap();
    unsafe { std::env::remove_var(&var) };
    let out = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("attach again"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn interactive_argv_runs_in_the_machine() {
    let f = Fixture::new();
    let var = format!("BOTTLE_TEST_ATTACH_{}", std::process::id());
    unsafe { std::env::set_var(&var, "attached-secret") };
    // A file secret's trailing newlines are trimmed, as smolvm trims them;
    // the ones inside stay.
    let secret_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret_file.path(), "two\nlines\n\n").unwrap();
    let mut spec = Fixture::spec("attach");
    spec.secrets = vec![
        SecretMount {
            guest_env: "TOKEN".to_owned(),
            source: SecretSource::HostEnv(var.clone()),
        },
        SecretMount {
            guest_env: "FILE_TOKEN".to_owned(),
            source: SecretSource::HostFile(secret_file.path().to_owned()),
        },
    ];
    let m = f.up(spec);
    // The value was read at start: the session needs no host variable.
    unsafe { std::env::remove_var(&var) };
    f.ok(&m, "useradd -m agent");
    let argv = f.rt.interactive_argv(
        &m,
        &ExecRequest::shell(
            "echo $(hostname) $(id -un) $(pwd) $TOKEN; grep CapBnd /proc/self/status; \
             printf '%s' \"$FILE_TOKEN\" | tr '\\n' +; echo",
        )
        .as_user("agent"),
    );
    let out = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = stdout.lines();
    assert_eq!(
        lines.next().unwrap(),
        "attach agent /home/agent attached-secret"
    );
    // The same reduced capability bounding set as exec.
    let bnd = lines.next().unwrap();
    let exec_bnd = f.ok(&m, "grep CapBnd /proc/self/status");
    assert_eq!(bnd, exec_bnd.trim());
    assert_eq!(lines.next().unwrap(), "two+lines");
    // A stopped machine gives an argv that fails with a message.
    f.rt.stop(&m).unwrap();
    let argv = f.rt.interactive_argv(&m, &ExecRequest::new(["true"]));
    let out = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not running"));
}

#[test]
fn timeout_kills_the_command() {
    let f = Fixture::new();
    let m = f.up(Fixture::spec("timeout"));
    let started = Instant::now();
    let err =
        f.rt.exec(
            &m,
            &ExecRequest::shell("sleep 30 & echo $! > /tmp/child; sleep 30")
                .timeout(Duration::from_millis(500)),
        )
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    match kind(err) {
        RuntimeErrorKind::Timeout { command, timeout } => {
            assert!(command.contains("sleep 30"), "{command}");
            assert_eq!(timeout, Duration::from_millis(500));
        }
        other => panic!("{other:?}"),
    }
    // The background child in the same process group died too.
    let out = f.sh(&m, "kill -0 $(cat /tmp/child)");
    assert_ne!(out.status, 0);
    // A command leaving a background process behind returns when it exits.
    let started = Instant::now();
    let out = f.sh(&m, "sleep 20 & echo started");
    assert_eq!(out.stdout, b"started\n");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn update_only_when_not_running() {
    let f = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("shared"), "from host").unwrap();
    let m = f.up(Fixture::spec("upd"));
    let update = MachineUpdate {
        cpus: Some(4),
        memory_mib: Some(4096),
        set_env: BTreeMap::from([("NEW".to_owned(), "1".to_owned())]),
        add_volumes: vec![VolumeMount {
            host: dir.path().to_owned(),
            guest: "/workspace/shared".to_owned(),
            read_only: true,
        }],
        ..MachineUpdate::default()
    };
    match kind(f.rt.update(&m, &update).unwrap_err()) {
        RuntimeErrorKind::Unsupported(msg) => {
            assert!(
                msg.contains("invalid vm state: expected stopped, got running"),
                "{msg}"
            )
        }
        other => panic!("{other:?}"),
    }
    f.rt.stop(&m).unwrap();
    f.rt.update(&m, &update).unwrap();
    let info =
        f.rt.list()
            .unwrap()
            .into_iter()
            .find(|i| i.name == m)
            .unwrap();
    assert_eq!((info.cpus, info.memory_mib), (Some(4), Some(4096)));
    assert_eq!(f.rt.record(&m).unwrap().volumes.len(), 1);
    f.rt.start(&m).unwrap();
    assert_eq!(
        f.ok(&m, "echo $NEW; cat /workspace/shared/shared"),
        "1\nfrom host"
    );
    // Read-only volume.
    assert_ne!(f.sh(&m, "touch /workspace/shared/x").status, 0);
    f.rt.stop(&m).unwrap();
    let update = MachineUpdate {
        remove_env: vec!["NEW".to_owned()],
        remove_volumes: update.add_volumes.clone(),
        ..MachineUpdate::default()
    };
    f.rt.update(&m, &update).unwrap();
    f.rt.start(&m).unwrap();
    assert_eq!(
        f.ok(&m, "echo ${NEW:-unset}; ls /workspace/shared | wc -l"),
        "unset\n0\n"
    );
}

#[test]
fn delete_removes_the_machine_directory() {
    let f = Fixture::new();
    let m = f.up(Fixture::spec("gone"));
    let dir: PathBuf = f.rt.machine_dir(&m);
    assert!(dir.join("root/etc/passwd").exists());
    let pid = f.rt.record(&m).unwrap().pid().unwrap();
    f.rt.delete(&m).unwrap();
    assert!(!dir.exists());
    assert!(f.rt.list().unwrap().is_empty());
    assert!(matches!(
        kind(f.rt.delete(&m).unwrap_err()),
        RuntimeErrorKind::NotFound
    ));
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(!stat.contains("(bwrap)") || stat.contains(") Z"));
    // Nothing else is left in the state directory.
    let left: Vec<_> = std::fs::read_dir(f.dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != "machines")
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A minimal rootfs: `sh`, `sleep` and `cat` with their libraries, and an
/// `/etc` of its own. Merged-usr (`/bin -> usr/bin`) or not (`/bin`,
/// `/lib`, `/lib64` real directories).
fn minimal_rootfs(r: &Path, merged: bool) {
    let put = |path: &Path, to: &Path| {
        let rel = path.strip_prefix("/").unwrap();
        let rel = rel.strip_prefix("usr").unwrap_or(rel);
        let dst = if merged {
            r.join("usr").join(rel)
        } else {
            r.join(rel)
        };
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(to, &dst).unwrap();
    };
    for (name, bin) in [
        ("sh", "/usr/bin/dash"),
        ("sleep", "/usr/bin/sleep"),
        ("cat", "/usr/bin/cat"),
    ] {
        put(&Path::new("/usr/bin").join(name), Path::new(bin));
        let ldd = std::process::Command::new("ldd").arg(bin).output().unwrap();
        for word in String::from_utf8_lossy(&ldd.stdout).split_whitespace() {
            if word.starts_with('/') {
                let lib = Path::new(word);
                let real = std::fs::canonicalize(lib).unwrap();
                put(lib, &real);
                put(&real, &real);
            }
        }
    }
    std::fs::create_dir_all(r.join("usr/local")).unwrap();
    for link in ["bin", "lib", "lib64", "sbin"] {
        if merged {
            std::os::unix::fs::symlink(format!("usr/{link}"), r.join(link)).unwrap();
        } else {
            std::fs::create_dir_all(r.join(link)).unwrap();
        }
    }
    std::fs::create_dir_all(r.join("etc")).unwrap();
    for file in ["passwd", "group"] {
        std::fs::copy(Path::new("/etc").join(file), r.join("etc").join(file)).unwrap();
    }
    std::fs::File::create(r.join("etc/rootfs-marker"))
        .unwrap()
        .write_all(b"from the rootfs\n")
        .unwrap();
    std::fs::create_dir_all(r.join("opt/tool")).unwrap();
}

#[test]
fn rootfs_image_provides_system_and_etc() {
    let f = Fixture::new();
    let rootfs = tempfile::tempdir().unwrap();
    let r = rootfs.path();
    minimal_rootfs(r, true);
    let mut spec = Fixture::spec("rootfs");
    spec.image = Some(r.to_string_lossy().into_owned());
    let m = f.up(spec);
    assert_eq!(f.ok(&m, "cat /etc/rootfs-marker"), "from the rootfs\n");
    // The rootfs's system, not the host's.
    let out = f.sh(&m, "test -e /etc/login.defs || echo no-login-defs; test -e /usr/bin/git || echo no-git; test -d /opt/tool && echo opt");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "no-login-defs\nno-git\nopt\n"
    );
    assert_eq!(f.rt.list().unwrap()[0].image.as_deref(), r.to_str());
    // Changes stay in the machine, not in the rootfs.
    f.ok(&m, "echo changed > /etc/rootfs-marker");
    assert_eq!(
        std::fs::read_to_string(r.join("etc/rootfs-marker")).unwrap(),
        "from the rootfs\n"
    );

    let mut spec = Fixture::spec("bad-image");
    spec.image = Some("debian:bookworm".to_owned());
    assert!(matches!(
        kind(f.rt.create(&spec).unwrap_err()),
        RuntimeErrorKind::Unsupported(msg) if msg.contains("rootfs")
    ));
}

#[test]
fn concurrent_creates_and_execs() {
    let f = Fixture::new();
    // Of several creates of one name, exactly one wins.
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| f.rt.create(&Fixture::spec("race"))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
    for r in results.into_iter().filter_map(Result::err) {
        assert!(matches!(r.kind, RuntimeErrorKind::AlreadyExists), "{r:?}");
    }
    f.rt.start("race").unwrap();
    // Execs from many threads at once, as the reconciler's pool does.
    std::thread::scope(|s| {
        for t in 0..8 {
            let f = &f;
            s.spawn(move || {
                for i in 0..15 {
                    let out = f.ok("race", &format!("echo {t}-{i}"));
                    assert_eq!(out, format!("{t}-{i}\n"));
                }
            });
        }
    });
    // Concurrent starts and stops leave a consistent state.
    f.rt.stop("race").unwrap();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| f.rt.start("race").unwrap());
        }
    });
    assert_eq!(f.state("race"), MachineState::Running);
    // One sandbox, not four: bwrap's outer process and the init, for this
    // machine's root.
    let root = f.rt.machine_dir("race").join("root");
    let root = root.to_string_lossy();
    let sandboxes = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            cmdline.contains("bwrap") && cmdline.contains(&*root)
        })
        .count();
    assert_eq!(sandboxes, 2);
    assert_eq!(f.rt.list().unwrap().len(), 1);
}

#[test]
fn volume_mount_points_do_not_follow_guest_symlinks() {
    let f = Fixture::new();
    let m = f.up(Fixture::spec("volsym"));
    let outside = tempfile::tempdir().unwrap();
    let volume = tempfile::tempdir().unwrap();
    // The guest turns /workspace into a link to a host directory, hoping
    // the next start creates and mounts there.
    f.ok(
        &m,
        &format!(
            "rm -rf /workspace && ln -s {} /workspace",
            outside.path().display()
        ),
    );
    f.rt.stop(&m).unwrap();
    let update = MachineUpdate {
        add_volumes: vec![VolumeMount {
            host: volume.path().to_owned(),
            guest: "/workspace/vol".to_owned(),
            read_only: false,
        }],
        ..MachineUpdate::default()
    };
    f.rt.update(&m, &update).unwrap();
    match kind(f.rt.start(&m).unwrap_err()) {
        RuntimeErrorKind::Unsupported(msg) => assert!(msg.contains("symlink"), "{msg}"),
        other => panic!("{other:?}"),
    }
    assert!(!outside.path().join("vol").exists());
    assert_eq!(f.state(&m), MachineState::Stopped);
    // System links the guest broke are put back at start.
    let update = MachineUpdate {
        remove_volumes: update.add_volumes.clone(),
        ..MachineUpdate::default()
    };
    f.rt.update(&m, &update).unwrap();
    f.rt.start(&m).unwrap();
    if let Ok(link) = std::fs::read_link("/bin") {
        f.ok(&m, "rm /bin && mkdir /bin");
        f.rt.stop(&m).unwrap();
        f.rt.start(&m).unwrap();
        assert_eq!(f.ok(&m, "readlink /bin").trim_end(), link.to_str().unwrap());
    }
    // Volumes on system directories are refused up front.
    let update = MachineUpdate {
        add_volumes: vec![VolumeMount {
            host: volume.path().to_owned(),
            guest: "/usr/lib/x".to_owned(),
            read_only: true,
        }],
        ..MachineUpdate::default()
    };
    f.rt.stop(&m).unwrap();
    assert!(matches!(
        kind(f.rt.update(&m, &update).unwrap_err()),
        RuntimeErrorKind::Unsupported(msg) if msg.contains("system directory")
    ));
}

#[test]
fn no_fd_of_the_host_process_reaches_the_guest() {
    // A directory fd opened without O_CLOEXEC would lead out of the chroot.
    let leak = rustix::fs::open(
        "/",
        rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::RDONLY,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    let f = Fixture::new();
    let m = f.up(Fixture::spec("fds"));
    // In an exec'd command: stdin, stdout, stderr and the one `ls` opens.
    let fds = f.ok(&m, "ls /proc/self/fd");
    assert_eq!(fds, "0\n1\n2\n3\n", "{fds}");
    // In the sandbox's own processes: no host directory.
    let links = f.ok(
        &m,
        "for p in /proc/[0-9]*; do ls -l $p/fd/ 2>/dev/null; done",
    );
    assert!(!links.contains("-> /\n"), "{links}");
    drop(leak);
}

#[test]
fn rootfs_without_merged_usr_binds_each_system_directory() {
    let f = Fixture::new();
    let rootfs = tempfile::tempdir().unwrap();
    let r = rootfs.path();
    minimal_rootfs(r, false);
    let mut spec = Fixture::spec("split-usr");
    spec.image = Some(r.to_string_lossy().into_owned());
    let m = f.up(spec);
    assert_eq!(f.ok(&m, "cat /etc/rootfs-marker"), "from the rootfs\n");
    assert_eq!(f.ok(&m, "test -L /bin || echo real"), "real\n");
    // Bound read-only, like /usr.
    assert_ne!(f.sh(&m, "cat /bin/sh > /bin/copy").status, 0);
    assert_ne!(f.sh(&m, "cat /bin/sh > /lib/copy").status, 0);
    assert!(!r.join("bin/copy").exists());
    assert!(!f.rt.machine_dir(&m).join("root/bin/sh").exists());
}
