//! The double against the real smolvm: the same command sequences, run
//! against both (each from an empty state), must give the same exit codes,
//! the same JSON on stdout (`ls --json`, `status --json`; `created_at`
//! aside) and the same stderr. Prose on stdout is for people and is not
//! compared; bottle never reads it.
//!
//! Runs when `BOTTLE_TEST_REAL_SMOLVM` names the real CLI; otherwise each
//! test prints one SKIPPED line. Only what needs no booted VM is compared:
//! no VM boots on the build machines, so `start` (and `exec`/`cp` on a
//! running machine) cannot be.

mod support;

use std::path::Path;
use std::process::Output;

use support::Double;
use support::real::Real;

/// What one side answered to one command, normalised for comparison.
#[derive(Debug, PartialEq)]
struct Answer {
    code: Option<i32>,
    json: Option<serde_json::Value>,
    stderr: String,
}

fn answer(args: &[String], output: &Output) -> Answer {
    let json = args.iter().any(|a| a == "--json").then(|| {
        let mut value: serde_json::Value =
            serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null);
        let strip = |m: &mut serde_json::Value| {
            if let Some(object) = m.as_object_mut() {
                object.remove("created_at");
            }
        };
        match &mut value {
            serde_json::Value::Array(machines) => {
                machines.iter_mut().for_each(strip);
                // smolvm's order is no order: compare as sets.
                machines.sort_by_key(|m| m["name"].as_str().unwrap_or_default().to_owned());
            }
            other => strip(other),
        }
        value
    });
    Answer {
        code: output.status.code(),
        json: output.status.success().then_some(json).flatten(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Run `sequence` against both, from empty states, comparing each answer.
/// `{dir}` in an argument is a directory holding `a/`, `b/`, `c:x/` and a
/// `rootfs/`. Returns how many commands were compared.
fn compare(test: &str, sequence: &[&[&str]]) -> usize {
    let Some(real) = Real::new(test) else {
        return 0;
    };
    let double = Double::new().with_env("SMOLVM_DOUBLE_RESOLVE", "hosts");
    let dir = tempfile::tempdir().unwrap();
    for sub in ["a", "b", "c:x", "rootfs/usr/local"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
    }
    let dir_text = dir.path().display().to_string();
    let mut differences = Vec::new();
    for args in sequence {
        let args: Vec<String> = args.iter().map(|a| a.replace("{dir}", &dir_text)).collect();
        let words: Vec<&str> = args.iter().map(String::as_str).collect();
        let from_real = answer(&args, &real.run(&words));
        let from_double = answer(&args, &double.run(&words));
        if from_real != from_double {
            differences.push(format!(
                "smolvm {}\n  real:   {from_real:?}\n  double: {from_double:?}",
                args.join(" ")
            ));
        }
    }
    assert!(
        differences.is_empty(),
        "the double differs from smolvm:\n{}",
        differences.join("\n")
    );
    sequence.len()
}

/// 129 characters: one more than smolvm takes.
const LONG_NAME: &str = concat!(
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
);

#[test]
fn create_names_labels_and_listing() {
    compare(
        "create_names_labels_and_listing",
        &[
            &["machine", "ls", "--json"],
            &[
                "machine", "create", "--name", "a", "--label", "k=v", "--label", "empty=",
                "--label", "eq=a=b", "--label", "k=later", "--cpus", "2", "--mem", "512",
            ],
            &[
                "machine", "create", "--name", "b", "--cpus", "1", "--mem", "64",
            ],
            &["machine", "create", "--name", "Z_9"],
            &["machine", "ls", "--json"],
            &["machine", "status", "--name", "a", "--json"],
            &["machine", "create", "--name", "a"],
            &["machine", "create", "--name", "c", "--label", "novalue"],
            &["machine", "create", "--name", "c", "--label", "=v"],
            &["machine", "create", "--name", "a--b"],
            &["machine", "create", "--name", "-x"],
            &["machine", "create", "--name", "x-"],
            &["machine", "create", "--name", "x.y"],
            &["machine", "create", "--name", "a:b"],
            &["machine", "create", "--name", "_a"],
            &["machine", "create", "--name", ""],
            &["machine", "create", "--name", LONG_NAME],
            &["machine", "create", "myvm"],
            &["machine", "ls", "--json"],
        ],
    );
}

#[test]
fn resources_mounts_images_and_network() {
    compare(
        "resources_mounts_images_and_network",
        &[
            &["machine", "create", "--name", "r", "--cpus", "0"],
            &["machine", "create", "--name", "r", "--mem", "63"],
            &["machine", "create", "--name", "r", "--cpus", "256"],
            &[
                "machine", "create", "--name", "r", "--cpus", "20", "--mem", "10",
            ],
            &[
                "machine", "create", "--name", "big", "--cpus", "17", "--mem", "64",
            ],
            &[
                "machine",
                "create",
                "--name",
                "m",
                "-v",
                "{dir}/a:/w",
                "-v",
                "{dir}/b:/w",
            ],
            &[
                "machine",
                "create",
                "--name",
                "m",
                "-v",
                "{dir}/a:/w:ro",
                "-v",
                "{dir}/b:/w/",
            ],
            &[
                "machine",
                "create",
                "--name",
                "m",
                "-v",
                "/nonexistent-dir:/w",
            ],
            &["machine", "create", "--name", "m", "-v", "{dir}/a:relative"],
            &[
                "machine",
                "create",
                "--name",
                "m",
                "-v",
                "{dir}/c:x:/w",
                "-v",
                "{dir}/a:/a:ro",
            ],
            &["machine", "create", "--name", "img", "--image", "alpine"],
            &[
                "machine",
                "create",
                "--name",
                "img",
                "--image",
                "/nonexistent-image",
            ],
            &[
                "machine",
                "create",
                "--name",
                "img",
                "--image",
                "{dir}/rootfs",
            ],
            &[
                "machine",
                "create",
                "--name",
                "net1",
                "--allow-cidr",
                "100.96.0.1/32",
            ],
            &[
                "machine",
                "create",
                "--name",
                "net2",
                "--allow-cidr",
                "100.96.0.1/32",
                "--allow-cidr",
                "10.8.0.0/16",
            ],
            &[
                "machine",
                "create",
                "--name",
                "net3",
                "--outbound-localhost-only",
            ],
            &[
                "machine",
                "create",
                "--name",
                "net4",
                "--allow-host",
                "localhost",
            ],
            &[
                "machine",
                "create",
                "--name",
                "net5",
                "--allow-cidr",
                "nonsense",
            ],
            &["machine", "create", "--name", "net6", "--net"],
            &[
                "machine",
                "create",
                "--name",
                "env",
                "-e",
                "A=1",
                "-e",
                "B=x=y",
                "--secret-env",
                "T=HOST_VAR",
                "--secret-file",
                "F=/run/secrets/f",
            ],
            &[
                "machine",
                "create",
                "--name",
                "sec",
                "--secret-file",
                "F=relative",
            ],
            &["machine", "ls", "--json"],
        ],
    );
}

#[test]
fn unknown_names_and_machines_that_are_not_running() {
    compare(
        "unknown_names_and_machines_that_are_not_running",
        &[
            &["machine", "status", "--name", "ghost", "--json"],
            &["machine", "status", "--name", "ghost"],
            &["machine", "stop", "--name", "ghost"],
            &["machine", "start", "--name", "ghost"],
            &["machine", "delete", "--name", "ghost", "-f"],
            &["machine", "update", "--name", "ghost", "--cpus", "2"],
            &["machine", "exec", "--name", "ghost", "--", "true"],
            &["machine", "cp", "/etc/hostname", "ghost:/x"],
            &["machine", "cp", "ghost:/x", "/tmp/never-written"],
            &["machine", "create", "--name", "off"],
            &[
                "machine",
                "exec",
                "--name",
                "off",
                "--timeout",
                "2s",
                "-e",
                "A=1",
                "-w",
                "/",
                "--",
                "true",
            ],
            &["machine", "exec", "--name", "off", "-it", "--", "sh"],
            &[
                "machine",
                "cp",
                "--mode",
                "600",
                "--uid",
                "1000",
                "--gid",
                "1000",
                "/etc/hostname",
                "off:/x",
            ],
            &["machine", "cp", "off:/etc/hostname", "/tmp/never-written"],
            &["machine", "cp", "/etc/hostname", "/tmp/x"],
            &["machine", "exec", "-n", "off", "--", "true"],
            &["machine", "ls", "--json"],
        ],
    );
}

#[test]
fn update_stop_and_delete() {
    compare(
        "update_stop_and_delete",
        &[
            &[
                "machine",
                "create",
                "--name",
                "u",
                "-v",
                "{dir}/a:/a",
                "-e",
                "OLD=1",
            ],
            &["machine", "stop", "--name", "u"],
            &[
                "machine",
                "update",
                "--name",
                "u",
                "--cpus",
                "3",
                "--mem",
                "1024",
                "--remove-env",
                "OLD",
                "-e",
                "NEW=x=y",
                "--remove-volume",
                "{dir}/a:/a",
                "-v",
                "{dir}/a:/a:ro",
                "-v",
                "{dir}/b:/b",
            ],
            &["machine", "status", "--name", "u", "--json"],
            &["machine", "update", "--name", "u", "-v", "{dir}/c:x:/b"],
            &["machine", "update", "--name", "u", "--cpus", "0"],
            &["machine", "update", "--name", "u", "--mem", "10"],
            &["machine", "update", "--name", "u", "--cpus", "20"],
            &["machine", "update", "--name", "u", "--label", "k=v"],
            &["machine", "ls", "--json"],
            &["machine", "delete", "--name", "u"],
            &["machine", "ls", "--json"],
            &["machine", "delete", "--name", "u", "-f"],
            &["machine", "delete", "--name", "u", "-f"],
            &["machine", "ls", "--json"],
        ],
    );
}

/// The comparison itself can fail: a difference is found and named.
#[test]
fn a_difference_is_reported() {
    let Some(real) = Real::new("a_difference_is_reported") else {
        return;
    };
    let double = Double::new();
    let args = ["machine", "create", "--name", "a"];
    let owned: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let from_real = answer(&owned, &real.run(&args));
    // The double already has it: a different answer.
    double.run(&args);
    let from_double = answer(&owned, &double.run(&args));
    assert_ne!(from_real, from_double);
    assert!(Path::new(real.binary()).is_file());
}

/// `create` and `delete` killed at any point leave the name usable, as
/// smolvm's database transactions do: listed (and then deletable) or not
/// listed (and then creatable). A killed double `create` used to leave a
/// name nothing could list, delete or create. Runs on the double always,
/// and on the real smolvm when it is available.
#[test]
fn killed_creates_and_deletes_never_strand_a_name() {
    let double = Double::new();
    let real = Real::new("killed_creates_and_deletes_never_strand_a_name (real side)");
    type Side<'a> = (&'a str, Box<dyn Fn(&[&str]) -> std::process::Command + 'a>);
    let mut sides: Vec<Side<'_>> = vec![("double", Box::new(|args: &[&str]| double.command(args)))];
    if let Some(real) = &real {
        sides.push(("real", Box::new(move |args: &[&str]| real.command(args))));
    }
    for (side, command) in &sides {
        let run = |args: &[&str]| command(args).output().expect("runs");
        let listed = |name: &str| {
            let output = run(&["machine", "ls", "--json"]);
            let machines: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout)
                .unwrap_or_else(|e| panic!("{side}: ls --json: {e}: {output:?}"));
            machines.iter().any(|m| m["name"] == name)
        };
        for round in 0..6u64 {
            let name = format!("k{round}");
            for verb in ["create", "delete"] {
                let args: Vec<&str> = match verb {
                    "create" => vec!["machine", "create", "--name", &name],
                    _ => vec!["machine", "delete", "--name", &name, "-f"],
                };
                let mut child = command(&args)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap();
                // Kill at a different point each round, from at once to
                // after the call would have finished.
                std::thread::sleep(std::time::Duration::from_millis(round * round * 8));
                let _ = child.kill();
                child.wait().unwrap();
                // Whatever the kill left, the name is usable.
                if listed(&name) {
                    if verb == "create" {
                        continue;
                    }
                    let output = run(&["machine", "delete", "--name", &name, "-f"]);
                    assert!(output.status.success(), "{side} round {round}: {output:?}");
                } else if verb == "create" {
                    let output = run(&["machine", "create", "--name", &name]);
                    assert!(output.status.success(), "{side} round {round}: {output:?}");
                }
                // ...and a final delete cleans it up either way.
            }
            assert!(!listed(&name), "{side} round {round}: {name} still listed");
            let output = run(&["machine", "create", "--name", &name]);
            assert!(output.status.success(), "{side} round {round}: {output:?}");
            let output = run(&["machine", "delete", "--name", &name, "-f"]);
            assert!(output.status.success(), "{side} round {round}: {output:?}");
        }
    }
}
