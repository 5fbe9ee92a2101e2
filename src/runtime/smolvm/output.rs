//! Reading what smolvm prints: `machine ls --json`, and the `Error: ...`
//! line of a failed command.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::runtime::{MachineInfo, MachineState, RuntimeErrorKind};

/// One element of `machine ls --json`, as far as bottle reads it. Every
/// field but the name may be missing or `null`; unknown fields are ignored,
/// since smolvm adds keys between releases.
#[derive(Debug, Deserialize)]
struct ListedMachine {
    name: String,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    cpus: Option<u32>,
    #[serde(default)]
    memory_mib: Option<u32>,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    network: Option<bool>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

impl From<ListedMachine> for MachineInfo {
    fn from(listed: ListedMachine) -> Self {
        MachineInfo {
            name: listed.name,
            state: parse_state(listed.state.as_deref().unwrap_or("")),
            cpus: listed.cpus,
            memory_mib: listed.memory_mib,
            image: listed.image,
            network: listed.network.unwrap_or(false),
            labels: listed.labels.unwrap_or_default(),
        }
    }
}

pub(crate) fn parse_state(state: &str) -> MachineState {
    match state {
        "created" => MachineState::Created,
        "running" => MachineState::Running,
        "stopped" => MachineState::Stopped,
        "failed" => MachineState::Failed,
        "unreachable" => MachineState::Unreachable,
        "frozen" => MachineState::Frozen,
        other => MachineState::Other(other.to_owned()),
    }
}

/// Parse `machine ls --json` into machines sorted by name (smolvm prints
/// them in no particular order).
pub(crate) fn parse_list(
    stdout: &[u8],
    command: &str,
) -> Result<Vec<MachineInfo>, RuntimeErrorKind> {
    let listed: Vec<ListedMachine> =
        serde_json::from_slice(stdout).map_err(|error| RuntimeErrorKind::Malformed {
            command: command.to_owned(),
            detail: format!("{error}; output began {:?}", excerpt(stdout)),
        })?;
    let mut machines: Vec<MachineInfo> = listed.into_iter().map(MachineInfo::from).collect();
    machines.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(pair) = machines
        .windows(2)
        .find(|pair| pair[0].name == pair[1].name)
    {
        return Err(RuntimeErrorKind::Malformed {
            command: command.to_owned(),
            detail: format!("machine `{}` is listed twice", pair[0].name),
        });
    }
    Ok(machines)
}

fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    text.chars().take(80).collect()
}

/// smolvm's own error message: the text after the last `Error: ` line on
/// stderr, if there is one.
pub(crate) fn smolvm_error(stderr: &str) -> Option<&str> {
    stderr
        .lines()
        .rev()
        .find_map(|line| line.strip_prefix("Error: "))
        .map(str::trim)
}

/// Prefixes of the messages smolvm's error type produces
/// (`src/data/errors.rs`). Used to tell smolvm failing from a command run by
/// `machine exec` that failed and happened to print `Error: `.
const SMOLVM_ERROR_PREFIXES: &[&str] = &[
    "vm not found:",
    "vm creation failed:",
    "invalid vm state:",
    "config operation failed:",
    "agent operation failed:",
    "database operation failed:",
    "database not available:",
    "storage operation failed:",
    "mount operation failed:",
    "mount source not found:",
    "invalid mount path:",
    "hypervisor not available:",
    "kvm not available:",
    "kvm permission denied:",
    "io operation failed:",
];

/// Whether a failed `machine exec` failed in smolvm rather than in the
/// command it ran: exit status 1 and a stderr that is only smolvm's
/// `Error: <known kind>` line.
pub(crate) fn is_smolvm_exec_failure(status: i32, stderr: &str) -> bool {
    let trimmed = stderr.trim();
    status == 1
        && !trimmed.contains('\n')
        && trimmed
            .strip_prefix("Error: ")
            .is_some_and(|message| SMOLVM_ERROR_PREFIXES.iter().any(|p| message.starts_with(p)))
}

/// Whether smolvm rejected its own command line (clap: exit 2, `error: `
/// then a `Usage:` line): a driver bug, never the guest command's failure.
pub(crate) fn is_usage_error(status: i32, stderr: &str) -> bool {
    status == 2 && stderr.starts_with("error: ") && stderr.contains("\nUsage: ")
}

/// The uid and user name from the line [`super::argv::ROOT_GUARD`] prints
/// when `machine exec` does not run as root: status 125 and that one line.
pub(crate) fn not_root(status: i32, stderr: &str) -> Option<(String, String)> {
    if status != super::argv::NOT_ROOT_STATUS {
        return None;
    }
    let rest = stderr
        .trim()
        .strip_prefix(super::argv::NOT_ROOT)?
        .strip_prefix(" uid=")?;
    if rest.contains('\n') {
        return None;
    }
    let (uid, user) = rest.split_once(" user=")?;
    Some((uid.to_owned(), user.to_owned()))
}

/// Map a failed command to an error kind, recognising the failures the
/// reconciler handles differently (documented in smolvm-cli.md).
pub(crate) fn classify(command: &str, status: i32, stderr: &str) -> RuntimeErrorKind {
    if is_usage_error(status, stderr) {
        return RuntimeErrorKind::Usage {
            command: command.to_owned(),
            stderr: stderr.lines().next().unwrap_or_default().trim().to_owned(),
        };
    }
    if let Some(message) = smolvm_error(stderr) {
        // `vm not found: NAME` (start, stop, delete, exec, cp) and
        // `... machine 'NAME' not found` (status, update).
        if message.starts_with("vm not found:")
            || (message.contains("machine '") && message.ends_with("' not found"))
        {
            return RuntimeErrorKind::NotFound;
        }
        if message.contains("already exists") {
            return RuntimeErrorKind::AlreadyExists;
        }
        if message.contains("is not running") {
            return RuntimeErrorKind::NotRunning;
        }
    }
    RuntimeErrorKind::CommandFailed {
        command: command.to_owned(),
        status,
        stderr: stderr.trim().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMAND: &str = "smolvm machine ls --json";

    #[test]
    fn parses_the_documented_shape_and_sorts_by_name() {
        let json = br#"[
          {"name": "t3", "state": "running", "cpus": 2, "memory_mib": 2048, "pid": 41,
           "mounts": 1, "ports": 0, "image": "local-dir:/srv/rootfs", "network": true,
           "labels": {"bottle.agent": "coder", "bottle.managed-by": "bottle"},
           "created_at": 1795764145, "storage_gb": null, "restart_policy": "never",
           "some_future_key": {"nested": [1, 2]}},
          {"name": "t2", "state": "created", "cpus": 4, "memory_mib": 8192, "pid": null,
           "image": null, "network": false, "labels": {}},
          {"name": "t4", "state": "frozen"}
        ]"#;
        let machines = parse_list(json, COMMAND).unwrap();
        let names: Vec<&str> = machines.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["t2", "t3", "t4"]);
        let t3 = &machines[1];
        assert_eq!(t3.state, MachineState::Running);
        assert_eq!(t3.cpus, Some(2));
        assert_eq!(t3.memory_mib, Some(2048));
        assert_eq!(t3.image.as_deref(), Some("local-dir:/srv/rootfs"));
        assert!(t3.network);
        assert_eq!(t3.labels["bottle.agent"], "coder");
        let t4 = &machines[2];
        assert_eq!(t4.state, MachineState::Frozen);
        assert_eq!((t4.cpus, t4.network), (None, false));
        assert!(t4.labels.is_empty());
    }

    #[test]
    fn every_documented_state_and_an_unknown_one() {
        for (text, state) in [
            ("created", MachineState::Created),
            ("running", MachineState::Running),
            ("stopped", MachineState::Stopped),
            ("failed", MachineState::Failed),
            ("unreachable", MachineState::Unreachable),
            ("frozen", MachineState::Frozen),
            ("hibernating", MachineState::Other("hibernating".into())),
        ] {
            assert_eq!(parse_state(text), state);
            assert_eq!(state.as_str(), text);
        }
    }

    #[test]
    fn empty_list_and_null_labels() {
        assert!(parse_list(b"[]\n", COMMAND).unwrap().is_empty());
        let machines = parse_list(br#"[{"name": "a", "labels": null}]"#, COMMAND).unwrap();
        assert!(machines[0].labels.is_empty());
        assert_eq!(machines[0].state, MachineState::Other(String::new()));
    }

    #[test]
    fn malformed_output_is_an_error_naming_the_command() {
        for bad in [
            &b"No machines found\n"[..],
            b"[{\"name\": \"a\"",
            b"{\"name\": \"a\"}",
            b"[{\"state\": \"running\"}]",
            b"[{\"name\": \"a\", \"cpus\": \"two\"}]",
            b"[{\"name\": \"a\"}, {\"name\": \"a\"}]",
        ] {
            let error = parse_list(bad, COMMAND).unwrap_err();
            assert!(
                matches!(&error, RuntimeErrorKind::Malformed { command, .. } if command == COMMAND),
                "{error:?}"
            );
        }
    }

    #[test]
    fn classifies_the_documented_errors() {
        let not_found = [
            "Error: vm not found: bottle-a\n",
            "Error: config operation failed: machine status: machine 'bottle-a' not found\n",
            "Error: config operation failed: update: machine 'bottle-a' not found\n",
        ];
        for stderr in not_found {
            assert!(
                matches!(classify("c", 1, stderr), RuntimeErrorKind::NotFound),
                "{stderr}"
            );
        }
        assert!(matches!(
            classify(
                "c",
                1,
                "Error: config operation failed: create machine: machine 'a' already exists or is being created\n"
            ),
            RuntimeErrorKind::AlreadyExists
        ));
        assert!(matches!(
            classify(
                "c",
                1,
                "Error: agent operation failed: connect: machine 'a' is not running. Use 'smolvm machine start --name a' first.\n"
            ),
            RuntimeErrorKind::NotRunning
        ));
        match classify(
            "smolvm machine update --name a",
            1,
            "Error: invalid vm state: expected stopped, got running\n",
        ) {
            RuntimeErrorKind::CommandFailed {
                command,
                status,
                stderr,
            } => {
                assert_eq!(command, "smolvm machine update --name a");
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
    fn only_the_error_line_counts() {
        // Progress text before the error line, as `start` prints it.
        let stderr = "Pulling image alpine...\nError: vm not found: a\n";
        assert_eq!(smolvm_error(stderr), Some("vm not found: a"));
        // A name merely containing "not running" in prose is not an error line.
        assert!(matches!(
            classify("c", 2, "warning: machine is not running yet\n"),
            RuntimeErrorKind::CommandFailed { .. }
        ));
    }

    #[test]
    fn the_not_root_line_is_read_only_with_its_status() {
        let line = "bottle-exec-not-root uid=1000 user=node\n";
        assert_eq!(
            not_root(125, line),
            Some(("1000".to_owned(), "node".to_owned()))
        );
        assert_eq!(not_root(1, line), None);
        assert_eq!(
            not_root(125, "other\nbottle-exec-not-root uid=1 user=x\n"),
            None
        );
        assert_eq!(not_root(125, "error\n"), None);
    }

    #[test]
    fn exec_failures_are_told_apart_from_command_failures() {
        assert!(is_smolvm_exec_failure(1, "Error: vm not found: a\n"));
        assert!(is_smolvm_exec_failure(
            1,
            "Error: agent operation failed: connect: machine 'a' is not running. Use 'smolvm machine start --name a' first.\n"
        ));
        // The command's own failures.
        assert!(!is_smolvm_exec_failure(
            1,
            "cat: /x: No such file or directory\n"
        ));
        assert!(!is_smolvm_exec_failure(2, "Error: vm not found: a\n"));
        assert!(!is_smolvm_exec_failure(1, "Error: bad input\n"));
        assert!(!is_smolvm_exec_failure(1, "line\nError: vm not found: a\n"));

        let clap = "error: unexpected argument '-n' found\n\nUsage: smolvm machine exec [OPTIONS] <COMMAND>...\n";
        assert!(is_usage_error(2, clap));
        match classify("smolvm machine exec -n a", 2, clap) {
            RuntimeErrorKind::Usage { command, stderr } => {
                assert_eq!(command, "smolvm machine exec -n a");
                assert_eq!(stderr, "error: unexpected argument '-n' found");
            }
            other => panic!("{other:?}"),
        }
        assert!(!is_usage_error(1, clap));
        assert!(!is_usage_error(2, "error: no such file\n"));
    }
}
