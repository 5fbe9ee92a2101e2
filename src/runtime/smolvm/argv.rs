//! The argv of every smolvm call bottle makes, as pure functions: what the
//! driver runs is exactly what these tests see.
//!
//! Flags follow smolvm's clap definitions (`src/cli/machine.rs`). Secrets
//! are passed by reference only (`--secret-env GUEST=HOSTVAR`,
//! `--secret-file GUEST=/abs/path`); smolvm reads the values on the host at
//! each launch, so no value ever appears on an argv.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use crate::runtime::{
    CopyOptions, ExecRequest, MachineSpec, MachineUpdate, SecretSource, VolumeMount,
};

/// Builds an argv from words and paths.
#[derive(Default)]
pub(crate) struct Argv(Vec<OsString>);

impl Argv {
    fn new(words: &[&str]) -> Self {
        Self(words.iter().map(OsString::from).collect())
    }

    fn arg(&mut self, arg: impl Into<OsString>) -> &mut Self {
        self.0.push(arg.into());
        self
    }

    fn flag(&mut self, flag: &str, value: impl Into<OsString>) -> &mut Self {
        self.arg(flag).arg(value)
    }

    pub(crate) fn into_vec(self) -> Vec<OsString> {
        self.0
    }
}

pub(crate) fn list() -> Vec<OsString> {
    Argv::new(&["machine", "ls", "--json"]).into_vec()
}

pub(crate) fn create(spec: &MachineSpec) -> Vec<OsString> {
    let mut argv = Argv::new(&["machine", "create", "--name"]);
    argv.arg(&spec.name);
    for (key, value) in &spec.labels {
        argv.flag("--label", format!("{key}={value}"));
    }
    if let Some(image) = &spec.image {
        argv.flag("--image", image);
    }
    argv.flag("--cpus", spec.cpus.to_string());
    argv.flag("--mem", spec.memory_mib.to_string());
    for volume in &spec.volumes {
        argv.flag("-v", volume_arg(volume, true));
    }
    if let Some(egress) = &spec.egress {
        if egress.allow_hosts.is_empty() && egress.allow_cidrs.is_empty() {
            // An egress table that allows nothing. `--net` alone would mean
            // unrestricted egress, so fail closed: the guest has a network
            // stack but may only reach its own loopback.
            argv.arg("--outbound-localhost-only");
        }
        // Both imply `--net`.
        for host in &egress.allow_hosts {
            argv.flag("--allow-host", host);
        }
        for cidr in &egress.allow_cidrs {
            argv.flag("--allow-cidr", cidr);
        }
    }
    for (key, value) in &spec.env {
        argv.flag("-e", format!("{key}={value}"));
    }
    for secret in &spec.secrets {
        match &secret.source {
            SecretSource::HostEnv(var) => {
                argv.flag("--secret-env", format!("{}={var}", secret.guest_env));
            }
            SecretSource::HostFile(path) => {
                let mut arg = OsString::from(format!("{}=", secret.guest_env));
                arg.push(path);
                argv.flag("--secret-file", arg);
            }
        }
    }
    argv.into_vec()
}

/// `HOST:GUEST[:ro]`; `--remove-volume` takes `HOST:GUEST` without the mode.
fn volume_arg(volume: &VolumeMount, with_mode: bool) -> OsString {
    let mut arg = OsString::from(volume.host.as_os_str());
    arg.push(":");
    arg.push(&volume.guest);
    if with_mode && volume.read_only {
        arg.push(":ro");
    }
    arg
}

pub(crate) fn start(name: &str) -> Vec<OsString> {
    Argv::new(&["machine", "start", "--name", name]).into_vec()
}

pub(crate) fn stop(name: &str) -> Vec<OsString> {
    Argv::new(&["machine", "stop", "--name", name]).into_vec()
}

/// Always `-f`: without it smolvm asks for confirmation, reads end-of-file,
/// prints `Cancelled`, deletes nothing and exits 0.
pub(crate) fn delete(name: &str) -> Vec<OsString> {
    Argv::new(&["machine", "delete", "--name", name, "-f"]).into_vec()
}

pub(crate) fn update(name: &str, update: &MachineUpdate) -> Vec<OsString> {
    let mut argv = Argv::new(&["machine", "update", "--name", name]);
    if let Some(cpus) = update.cpus {
        argv.flag("--cpus", cpus.to_string());
    }
    if let Some(memory) = update.memory_mib {
        argv.flag("--mem", memory.to_string());
    }
    // smolvm applies removals before additions, so replacing a value or a
    // mount's mode in one call works.
    for key in &update.remove_env {
        argv.flag("--remove-env", key);
    }
    for (key, value) in &update.set_env {
        argv.flag("-e", format!("{key}={value}"));
    }
    for volume in &update.remove_volumes {
        argv.flag("--remove-volume", volume_arg(volume, false));
    }
    for volume in &update.add_volumes {
        argv.flag("-v", volume_arg(volume, true));
    }
    argv.into_vec()
}

/// How a command is made to start as root in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AsRoot {
    /// smolvm 1.14+: `exec --user root`.
    Flag,
    /// Before 1.14 smolvm runs exec as the image's `USER` (root on a bare
    /// VM or an image without `USER`) and cannot be told otherwise: the
    /// command is wrapped in [`ROOT_GUARD`], which refuses to run it as
    /// anyone else.
    Guard,
}

/// The guest argv: [`ROOT_GUARD`] first when `as_root` says so, then the
/// [`AS_USER`] wrapper when `request.user` is set, then the command.
fn guest_command(request: &ExecRequest, as_root: AsRoot) -> Vec<String> {
    let mut command = Vec::new();
    if as_root == AsRoot::Guard {
        command.extend([
            "sh".to_owned(),
            "-c".to_owned(),
            ROOT_GUARD.to_owned(),
            NOT_ROOT.to_owned(),
        ]);
    }
    if let Some(user) = &request.user {
        command.extend([
            "sh".to_owned(),
            "-c".to_owned(),
            AS_USER.to_owned(),
            user.clone(),
        ]);
    }
    command.extend(request.argv.iter().cloned());
    command
}

/// The first word of the line [`ROOT_GUARD`] prints when the command would
/// not run as root: `bottle-exec-not-root uid=1000 user=node`.
pub(crate) const NOT_ROOT: &str = "bottle-exec-not-root";

/// The exit status [`ROOT_GUARD`] uses (as `env` does for its own failures).
pub(crate) const NOT_ROOT_STATUS: i32 = 125;

/// Runs `"$@"` only as root: otherwise prints `$0` with the uid and user
/// name on stderr and exits 125. An image without `id` is let through (its
/// steps fail on `id` with their own message).
pub const ROOT_GUARD: &str = r#"u=$(id -u 2>/dev/null) || exec "$@"; if [ "$u" != 0 ]; then echo "$0 uid=$u user=$(id -un 2>/dev/null)" >&2; exit 125; fi; exec "$@""#;

/// Runs `"$@"` as the user named by `$0`: with `runuser` where the image
/// has it (util-linux), else with `su`, which busybox images (smolvm's
/// default Alpine) have. Both set HOME, USER and LOGNAME for the user.
/// Every `su` option comes before `--`, so options in the command itself
/// are never taken for su's own (util-linux su permutes its arguments).
pub const AS_USER: &str = r#"if command -v runuser >/dev/null 2>&1; then exec runuser -u "$0" -- "$@"; fi; exec su -s /bin/sh -c 'exec "$@"' -- "$0" sh "$@""#;

fn exec_options(argv: &mut Argv, request: &ExecRequest, as_root: AsRoot) {
    if as_root == AsRoot::Flag {
        argv.flag("--user", "root");
    }
    for (key, value) in &request.env {
        argv.flag("-e", format!("{key}={value}"));
    }
    if let Some(workdir) = &request.workdir {
        argv.flag("-w", workdir);
    }
}

pub(crate) fn exec(name: &str, request: &ExecRequest, as_root: AsRoot) -> Vec<OsString> {
    let mut argv = Argv::new(&["machine", "exec", "--name", name]);
    exec_options(&mut argv, request, as_root);
    argv.flag("--timeout", duration_arg(request.timeout));
    argv.arg("--");
    for word in guest_command(request, as_root) {
        argv.arg(word);
    }
    argv.into_vec()
}

/// `-it`: keep stdin open and allocate a terminal. No `--timeout`: an
/// attached session lasts as long as the user wants.
pub(crate) fn interactive(
    binary: &Path,
    name: &str,
    request: &ExecRequest,
    as_root: AsRoot,
) -> Vec<String> {
    let mut argv = Argv::new(&["machine", "exec", "--name", name, "-it"]);
    exec_options(&mut argv, request, as_root);
    argv.arg("--");
    for word in guest_command(request, as_root) {
        argv.arg(word);
    }
    std::iter::once(binary.to_string_lossy().into_owned())
        .chain(
            argv.into_vec()
                .into_iter()
                .map(|arg| arg.to_string_lossy().into_owned()),
        )
        .collect()
}

/// Whole seconds, rounded up so a sub-second timeout is not `0s`.
fn duration_arg(timeout: Duration) -> String {
    let seconds = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
    format!("{}s", seconds.max(1))
}

pub(crate) fn copy_in(
    name: &str,
    host_path: &Path,
    guest_path: &str,
    options: &CopyOptions,
) -> Vec<OsString> {
    let mut argv = Argv::new(&["machine", "cp"]);
    argv.flag("--mode", format!("{:o}", options.mode));
    argv.flag("--uid", options.uid.to_string());
    argv.flag("--gid", options.gid.to_string());
    argv.arg(host_path);
    argv.arg(format!("{name}:{guest_path}"));
    argv.into_vec()
}

/// Download: `cp NAME:/guest/path LOCAL`.
pub(crate) fn copy_out(name: &str, guest_path: &str, host_path: &Path) -> Vec<OsString> {
    let mut argv = Argv::new(&["machine", "cp"]);
    argv.arg(format!("{name}:{guest_path}"));
    argv.arg(host_path);
    argv.into_vec()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use super::*;
    use crate::runtime::{Egress, SecretMount};

    fn words(argv: Vec<OsString>) -> Vec<String> {
        argv.into_iter().map(|a| a.into_string().unwrap()).collect()
    }

    fn spec() -> MachineSpec {
        MachineSpec {
            name: "bottle-coder".into(),
            labels: BTreeMap::from([
                ("bottle.managed-by".into(), "bottle".into()),
                ("bottle.agent".into(), "coder".into()),
            ]),
            image: Some("/srv/rootfs".into()),
            cpus: 2,
            memory_mib: 2048,
            env: BTreeMap::from([("GIT_AUTHOR_NAME".into(), "Bottle Bot".into())]),
            volumes: vec![VolumeMount {
                host: "/home/u/ws".into(),
                guest: "/workspace".into(),
                read_only: true,
            }],
            egress: Some(Egress {
                allow_hosts: vec!["api.anthropic.com".into()],
                allow_cidrs: vec!["10.8.0.0/16".into()],
            }),
            allow_unfiltered_network: false,
            secrets: vec![
                SecretMount {
                    guest_env: "GITHUB_TOKEN".into(),
                    source: SecretSource::HostEnv("GH_PAT".into()),
                },
                SecretMount {
                    guest_env: "NPM_TOKEN".into(),
                    source: SecretSource::HostFile("/run/secrets/npm".into()),
                },
            ],
            gate_port: None,
        }
    }

    #[test]
    fn create_argv() {
        assert_eq!(
            words(create(&spec())).join(" "),
            "machine create --name bottle-coder \
             --label bottle.agent=coder --label bottle.managed-by=bottle \
             --image /srv/rootfs --cpus 2 --mem 2048 -v /home/u/ws:/workspace:ro \
             --allow-host api.anthropic.com --allow-cidr 10.8.0.0/16 \
             -e GIT_AUTHOR_NAME=Bottle Bot \
             --secret-env GITHUB_TOKEN=GH_PAT --secret-file NPM_TOKEN=/run/secrets/npm"
        );
    }

    #[test]
    fn create_network_variants() {
        let mut spec = spec();
        spec.egress = None;
        let argv = words(create(&spec));
        assert!(
            !argv
                .iter()
                .any(|a| a.contains("net") || a.starts_with("--allow")),
            "{argv:?}"
        );

        spec.egress = Some(Egress::default());
        let argv = words(create(&spec));
        assert!(
            argv.contains(&"--outbound-localhost-only".to_owned()),
            "{argv:?}"
        );
        assert!(!argv.contains(&"--net".to_owned()), "{argv:?}");
    }

    #[test]
    fn create_without_image_uses_smolvm_default() {
        let mut spec = spec();
        spec.image = None;
        assert!(!words(create(&spec)).contains(&"--image".to_owned()));
    }

    #[test]
    fn lifecycle_argv() {
        assert_eq!(words(start("a")), ["machine", "start", "--name", "a"]);
        assert_eq!(words(stop("a")), ["machine", "stop", "--name", "a"]);
        assert_eq!(
            words(delete("a")),
            ["machine", "delete", "--name", "a", "-f"]
        );
        assert_eq!(words(list()), ["machine", "ls", "--json"]);
    }

    #[test]
    fn update_argv() {
        let update = MachineUpdate {
            cpus: Some(4),
            memory_mib: Some(4096),
            set_env: BTreeMap::from([("A".into(), "1".into())]),
            remove_env: vec!["B".into()],
            add_volumes: vec![VolumeMount {
                host: PathBuf::from("/h"),
                guest: "/g".into(),
                read_only: true,
            }],
            remove_volumes: vec![VolumeMount {
                host: PathBuf::from("/h"),
                guest: "/g".into(),
                read_only: false,
            }],
        };
        assert_eq!(
            words(self::update("a", &update)).join(" "),
            "machine update --name a --cpus 4 --mem 4096 --remove-env B -e A=1 \
             --remove-volume /h:/g -v /h:/g:ro"
        );
    }

    #[test]
    fn exec_argv_as_root_and_as_a_user() {
        let mut request = ExecRequest::shell("id -un").timeout(Duration::from_millis(1500));
        request.env.insert("HOME".into(), "/home/node".into());
        request.workdir = Some("/workspace".into());
        assert_eq!(
            words(exec("a", &request, AsRoot::Flag)).join(" "),
            "machine exec --name a --user root -e HOME=/home/node -w /workspace --timeout 2s \
             -- sh -c id -un"
        );
        assert_eq!(
            words(exec("a", &request, AsRoot::Guard))[10..],
            ["--", "sh", "-c", ROOT_GUARD, NOT_ROOT, "sh", "-c", "id -un"]
        );
        let request = request.as_user("node");
        assert_eq!(
            words(exec("a", &request, AsRoot::Flag))[12..],
            ["--", "sh", "-c", AS_USER, "node", "sh", "-c", "id -un"]
        );
        assert_eq!(
            words(exec("a", &request, AsRoot::Guard))[10..],
            [
                "--", "sh", "-c", ROOT_GUARD, NOT_ROOT, "sh", "-c", AS_USER, "node", "sh", "-c",
                "id -un"
            ]
        );
    }

    #[test]
    fn interactive_argv_attaches_a_terminal_without_timeout() {
        let request =
            ExecRequest::new(["claude", "--dangerously-skip-permissions"]).as_user("node");
        assert_eq!(
            interactive(Path::new("/usr/bin/smolvm"), "a", &request, AsRoot::Flag),
            [
                "/usr/bin/smolvm",
                "machine",
                "exec",
                "--name",
                "a",
                "-it",
                "--user",
                "root",
                "--",
                "sh",
                "-c",
                AS_USER,
                "node",
                "claude",
                "--dangerously-skip-permissions"
            ]
        );
    }

    #[test]
    fn copy_argv() {
        let options = CopyOptions {
            mode: 0o600,
            uid: 1000,
            gid: 1000,
        };
        assert_eq!(
            words(copy_in(
                "a",
                Path::new("/tmp/p"),
                "/home/node/p.md",
                &options
            ))
            .join(" "),
            "machine cp --mode 600 --uid 1000 --gid 1000 /tmp/p a:/home/node/p.md"
        );
        assert_eq!(
            words(copy_out("a", "/etc/x", Path::new("/tmp/x"))).join(" "),
            "machine cp a:/etc/x /tmp/x"
        );
    }

    /// Both branches of the wrapper, for real: `runuser` (util-linux), and
    /// `su` as on busybox images, with arguments that look like su options.
    #[test]
    fn as_user_runs_the_command_as_the_user_through_runuser_or_su() {
        for path in ["/usr/sbin:/usr/bin:/sbin:/bin", "/usr/bin:/bin"] {
            let out = std::process::Command::new("sh")
                .args([
                    "-c",
                    AS_USER,
                    "nobody",
                    "sh",
                    "-c",
                    "echo \"$(id -un) $1 $2\"",
                    "x",
                    "-c",
                    "a b",
                ])
                .env("PATH", path)
                .output()
                .expect("sh runs");
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                "nobody -c a b\n",
                "PATH={path}: {out:?}"
            );
        }
    }

    /// The guard, for real: it runs the command as root and refuses, with
    /// its marker line and status, as anyone else.
    #[test]
    fn root_guard_runs_the_command_only_as_root() {
        let run = |user: Option<&str>| {
            let mut command = std::process::Command::new("sh");
            command.args(["-c", ROOT_GUARD, NOT_ROOT, "sh", "-c", "echo ran; exit 7"]);
            if let Some(user) = user {
                command = std::process::Command::new("setpriv");
                command.args([
                    "--reuid",
                    user,
                    "--regid",
                    user,
                    "--clear-groups",
                    "sh",
                    "-c",
                    ROOT_GUARD,
                    NOT_ROOT,
                    "sh",
                    "-c",
                    "echo ran; exit 7",
                ]);
            }
            command.output().expect("sh runs")
        };
        let as_root = run(None);
        assert_eq!(as_root.status.code(), Some(7), "{as_root:?}");
        assert_eq!(as_root.stdout, b"ran\n");
        let as_nobody = run(Some("65534"));
        assert_eq!(
            as_nobody.status.code(),
            Some(NOT_ROOT_STATUS),
            "{as_nobody:?}"
        );
        assert!(as_nobody.stdout.is_empty());
        assert!(
            String::from_utf8_lossy(&as_nobody.stderr)
                .starts_with("bottle-exec-not-root uid=65534 user="),
            "{as_nobody:?}"
        );
    }
}
