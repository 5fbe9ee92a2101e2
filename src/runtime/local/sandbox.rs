//! Starting, probing and stopping a machine's bubblewrap sandbox.
//!
//! `start` runs `setsid -f bwrap ...`: the sandbox is reparented away from
//! the caller at once and survives it. bwrap reports the pid of the
//! sandbox's init (pid 1 of its pid namespace) on `--info-fd`; the command
//! it runs says `ready` on stdout once the root is assembled, then sleeps.
//! `stop` SIGKILLs that init, which takes every process of the namespace
//! with it.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};
use serde::{Deserialize, Serialize};

use super::seed::{SystemEntry, VIRTUAL_DIRS, make_dir, system_entries};

/// The init process of a running machine, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitProcess {
    pub pid: u32,
    /// Field 22 of `/proc/PID/stat` (clock ticks since boot): tells the
    /// init apart from a later process that reused its pid.
    pub start_time: u64,
    /// The kernel's boot id when the init started: after a reboot a pid and
    /// a start time can both repeat.
    pub boot_id: String,
}

impl InitProcess {
    /// Whether the recorded init is still running.
    pub fn is_alive(&self) -> bool {
        self.boot_id == boot_id()
            && proc_stat(self.pid).is_some_and(|(state, start)| {
                start == self.start_time && state != 'Z' && state != 'X'
            })
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`).
pub fn boot_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    })
}

/// State letter and start time of a process, from `/proc/PID/stat`.
pub fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: the
    // fields after it start after the last `)`.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// The init's environment variable that holds secret `guest_env`. Prefixed,
/// so no name a secret may have (`PATH`, `HOME`, `IFS`...) is overwritten by
/// the init's own variables or reset by its shell.
pub fn secret_var(guest_env: &str) -> String {
    format!("BOTTLE_SECRET_{guest_env}")
}

/// Everything `launch` needs about a machine.
pub struct LaunchSpec<'a> {
    pub bwrap: &'a Path,
    pub setsid: &'a Path,
    /// The machine's persistent root.
    pub root: &'a Path,
    /// `/` for the host's system directories, or a rootfs.
    pub sys_root: &'a Path,
    pub hostname: &'a str,
    pub network: bool,
    pub volumes: &'a [(PathBuf, String, bool)],
    pub log: &'a Path,
    pub timeout: Duration,
    /// Secret values, read on the host at this start (as smolvm does at
    /// each launch), under their [`secret_var`] names. They live in the
    /// init's environment, which the host's root and the guest's root can
    /// read (a guest user cannot), and nowhere on disk; every exec takes
    /// them from there.
    pub secrets: &'a [(String, OsString)],
}

#[derive(Debug)]
pub enum LaunchError {
    Spawn(io::Error),
    /// bwrap failed; its message from the log.
    Failed(String),
    /// A volume cannot be mounted; what to fix.
    Volume(String),
    Timeout,
    Io(io::Error),
}

impl From<io::Error> for LaunchError {
    fn from(e: io::Error) -> Self {
        LaunchError::Io(e)
    }
}

/// The command the sandbox runs: report readiness, then hold the
/// namespaces open.
const INIT_SCRIPT: &str = "echo ready && exec sleep infinity >/dev/null";

/// Parts of `/proc` that act on the whole host, bound read-only.
const PROC_READ_ONLY: [&str; 5] = [
    "/proc/sys",
    "/proc/sysrq-trigger",
    "/proc/irq",
    "/proc/bus",
    "/proc/fs",
];

/// bwrap's arguments, after `--info-fd N`.
pub fn bwrap_args(spec: &LaunchSpec<'_>, entries: &[(&str, SystemEntry)]) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |items: &[&dyn AsRef<std::ffi::OsStr>]| {
        a.extend(items.iter().map(|i| i.as_ref().to_owned()));
    };
    push(&[&"--unshare-pid", &"--unshare-ipc", &"--unshare-uts"]);
    if !spec.network {
        push(&[&"--unshare-net"]);
    }
    push(&[
        &"--hostname",
        &spec.hostname,
        &"--new-session",
        &"--cap-drop",
        &"ALL",
    ]);
    push(&[&"--bind", &spec.root, &"/"]);
    push(&[&"--ro-bind", &spec.sys_root.join("usr"), &"/usr"]);
    for (name, entry) in entries {
        if *entry == SystemEntry::Dir && *name != "usr" {
            push(&[
                &"--ro-bind",
                &spec.sys_root.join(name),
                &Path::new("/").join(name),
            ]);
        }
    }
    push(&[&"--bind", &spec.root.join("usr/local"), &"/usr/local"]);
    push(&[&"--proc", &"/proc"]);
    // Host-wide kernel settings (`/proc/sys/kernel/core_pattern` runs a
    // host program as root) and triggers: read-only, whether or not bwrap
    // managed to cover them itself.
    for dir in PROC_READ_ONLY {
        push(&[&"--ro-bind-try", &dir, &dir]);
    }
    push(&[&"--dev", &"/dev", &"--ro-bind", &"/sys", &"/sys"]);
    push(&[
        &"--tmpfs",
        &"/run",
        &"--perms",
        &"1777",
        &"--dir",
        &"/run/lock",
    ]);
    for (host, guest, read_only) in spec.volumes {
        let kind = if *read_only { "--ro-bind" } else { "--bind" };
        push(&[&kind, host, guest]);
    }
    push(&[&"--chdir", &"/", &"--", &"/bin/sh", &"-c", &INIT_SCRIPT]);
    a
}

/// Start the sandbox and wait until it is ready.
pub fn launch(spec: &LaunchSpec<'_>) -> Result<InitProcess, LaunchError> {
    let entries = system_entries(spec.sys_root)?;
    prepare_mount_points(spec.root, &entries)?;
    for (host, guest, _) in spec.volumes {
        prepare_volume_point(spec.root, host, guest).map_err(LaunchError::Volume)?;
    }

    let (mut info_r, info_w) = io::pipe()?;
    let (mut ready_r, ready_w) = io::pipe()?;
    let log = File::create(spec.log)?;
    let info_fd = info_w.as_raw_fd();

    let mut cmd = Command::new(spec.setsid);
    cmd.arg("-f")
        .arg(spec.bwrap)
        .arg("--info-fd")
        .arg(info_fd.to_string())
        .args(bwrap_args(spec, &entries))
        .env_clear()
        .envs(spec.secrets.iter().map(|(k, v)| (k, v)))
        .env("PATH", super::exec::ROOT_PATH)
        .env("HOME", "/root")
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::from(ready_w))
        .stderr(Stdio::from(log));
    // SAFETY: fcntl and close_range on fd numbers known before the fork;
    // nothing else.
    unsafe {
        cmd.pre_exec(move || {
            // Let the info pipe cross exec; every other fd stays close-on-exec.
            super::exec::cloexec_from(3, Some(info_fd as u32))?;
            let fd = std::os::fd::BorrowedFd::borrow_raw(info_fd);
            rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
            Ok(())
        });
    }
    // `setsid -f` forks bwrap off and exits at once.
    let status = cmd.spawn().map_err(LaunchError::Spawn)?.wait()?;
    // `cmd` holds the parent's copies of the write ends: drop them so the
    // pipes see end-of-file when bwrap dies.
    drop(cmd);
    drop(info_w);
    if !status.success() {
        return Err(LaunchError::Failed(read_log(spec.log)));
    }

    let deadline = Instant::now() + spec.timeout;
    let info = read_until(&mut info_r, deadline, |buf| buf.contains(&b'}'))?;
    let pid = parse_child_pid(&info);
    let ready = match pid {
        Some(_) => read_until(&mut ready_r, deadline, |buf| buf.contains(&b'\n'))?,
        None => Vec::new(),
    };
    let init = pid.and_then(|pid| {
        proc_stat(pid).map(|(_, start_time)| InitProcess {
            pid,
            start_time,
            boot_id: boot_id().to_owned(),
        })
    });
    match init {
        Some(init) if ready.starts_with(b"ready\n") => Ok(init),
        _ => {
            if let Some(init) = init {
                let _ = kill(&init, Duration::from_secs(5));
            }
            if Instant::now() >= deadline {
                return Err(LaunchError::Timeout);
            }
            // Give bwrap a moment to finish writing its message.
            std::thread::sleep(Duration::from_millis(20));
            Err(LaunchError::Failed(read_log(spec.log)))
        }
    }
}

fn parse_child_pid(info: &[u8]) -> Option<u32> {
    let end = info.iter().position(|b| *b == b'}')? + 1;
    let value: serde_json::Value = serde_json::from_slice(&info[..end]).ok()?;
    value.get("child-pid")?.as_u64()?.try_into().ok()
}

fn read_log(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let text = text.trim();
    if text.is_empty() {
        "the sandbox exited during start without a message".to_owned()
    } else {
        text.to_owned()
    }
}

/// Read from `r` until `done(buffer)`, end of file or the deadline.
fn read_until(
    r: &mut io::PipeReader,
    deadline: Instant,
    done: impl Fn(&[u8]) -> bool,
) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !done(&buf) {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let left = deadline - now;
        let ts = Timespec {
            tv_sec: left.as_secs() as _,
            tv_nsec: left.subsec_nanos() as _,
        };
        let mut fds = [PollFd::new(r, PollFlags::IN)];
        match poll(&mut fds, Some(&ts)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
        match r.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(buf)
}

/// Make sure the mount points of the system and kernel directories are
/// real directories of the machine root, and the merged-usr links are the
/// source's. The guest owns its root and may have replaced any of them
/// with a symlink while running; bwrap would follow such a link when
/// mounting. Nothing of the guest runs now, so there is no race.
fn prepare_mount_points(root: &Path, entries: &[(&str, SystemEntry)]) -> io::Result<()> {
    let mut dirs: Vec<&str> = vec!["usr"];
    dirs.extend(VIRTUAL_DIRS);
    for (name, entry) in entries {
        match entry {
            SystemEntry::Dir => dirs.push(name),
            SystemEntry::Symlink(target) => {
                let path = root.join(name);
                match fs::symlink_metadata(&path) {
                    Ok(m) if m.file_type().is_symlink() && fs::read_link(&path)? == *target => {}
                    Ok(m) => {
                        remove_entry(&path, &m)?;
                        std::os::unix::fs::symlink(target, &path)?;
                    }
                    Err(_) => std::os::unix::fs::symlink(target, &path)?,
                }
            }
        }
    }
    for name in dirs {
        ensure_real_dir(&root.join(name))?;
    }
    ensure_real_dir(&root.join("usr/local"))?;
    Ok(())
}

fn ensure_real_dir(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(m) => {
            remove_entry(path, &m)?;
            make_dir(path, 0o755)
        }
        Err(_) => make_dir(path, 0o755),
    }
}

/// Remove a file, a symlink or an empty directory; refuse a directory with
/// content (the guest's data).
fn remove_entry(path: &Path, meta: &fs::Metadata) -> io::Result<()> {
    if meta.is_dir() {
        fs::remove_dir(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "{} should be a system link but is a directory with content: {e}",
                    path.display()
                ),
            )
        })
    } else {
        fs::remove_file(path)
    }
}

/// Create the mount point of a volume in the machine root without following
/// any symlink on the way. Volumes under `/run` are mounted on the fresh
/// tmpfs and need nothing here.
fn prepare_volume_point(root: &Path, host: &Path, guest: &str) -> Result<(), String> {
    let host_meta = fs::metadata(host).map_err(|e| {
        format!(
            "volume {}:{guest}: the host path cannot be used: {e}",
            host.display()
        )
    })?;
    let rel = Path::new(guest.trim_start_matches('/'));
    if rel.starts_with("run") {
        return Ok(());
    }
    let comps: Vec<_> = rel.components().collect();
    let mut path = root.to_path_buf();
    for (i, comp) in comps.iter().enumerate() {
        let Component::Normal(part) = comp else {
            return Err(format!(
                "volume guest path {guest} must be absolute and plain"
            ));
        };
        path.push(part);
        let last = i + 1 == comps.len();
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!(
                    "cannot mount volume at {guest}: /{} is a symlink in the machine; remove it",
                    rel.iter()
                        .take(i + 1)
                        .map(|p| p.to_string_lossy())
                        .collect::<Vec<_>>()
                        .join("/")
                ));
            }
            Ok(m) if last && host_meta.is_dir() != m.is_dir() => {
                return Err(format!(
                    "cannot mount volume at {guest}: the host path and the guest path are not both directories"
                ));
            }
            Ok(m) if !last && !m.is_dir() => {
                return Err(format!(
                    "cannot mount volume at {guest}: a parent is not a directory"
                ));
            }
            Ok(_) => {}
            Err(_) if last && !host_meta.is_dir() => {
                super::seed::write_file(&path, b"", 0o644, 0, 0).map_err(|e| e.to_string())?
            }
            Err(_) => make_dir(&path, 0o755).map_err(|e| e.to_string())?,
        }
    }
    Ok(())
}

/// SIGKILL the init (and so its whole pid namespace) and wait for it.
/// Succeeds if it is already gone.
pub fn kill(init: &InitProcess, timeout: Duration) -> io::Result<()> {
    let Some(pid) = Pid::from_raw(init.pid as i32) else {
        return Ok(());
    };
    let pidfd = match pidfd_open(pid, PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::SRCH) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    // The pidfd pins the process; check it is still our init.
    if !init.is_alive() {
        return Ok(());
    }
    pidfd_send_signal(&pidfd, Signal::KILL)?;
    let deadline = Instant::now() + timeout;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("process {} did not exit after SIGKILL", init.pid),
            ));
        }
        let left = deadline - now;
        let ts = Timespec {
            tv_sec: left.as_secs() as _,
            tv_nsec: left.subsec_nanos() as _,
        };
        let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
        match poll(&mut fds, Some(&ts)) {
            Ok(n) if n > 0 => return Ok(()),
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_stat() {
        let (state, start) = proc_stat(std::process::id()).unwrap();
        assert!(state == 'R' || state == 'S', "{state}");
        assert!(start > 0);
    }

    #[test]
    fn liveness_needs_pid_start_time_and_boot() {
        let pid = std::process::id();
        let (_, start_time) = proc_stat(pid).unwrap();
        let me = InitProcess {
            pid,
            start_time,
            boot_id: boot_id().to_owned(),
        };
        assert!(me.is_alive());
        let reused = InitProcess {
            start_time: start_time + 1,
            ..me.clone()
        };
        assert!(!reused.is_alive());
        let rebooted = InitProcess {
            boot_id: "another-boot".to_owned(),
            ..me
        };
        assert!(!rebooted.is_alive());
    }

    #[test]
    fn parses_bwrap_info() {
        let info = b"{\n    \"child-pid\": 14950,\n    \"ipc-namespace\": 1\n}";
        assert_eq!(parse_child_pid(info), Some(14950));
        assert_eq!(parse_child_pid(b"{}"), None);
    }

    #[test]
    fn args_isolate_unless_networked() {
        let spec = LaunchSpec {
            bwrap: Path::new("/usr/bin/bwrap"),
            setsid: Path::new("/usr/bin/setsid"),
            root: Path::new("/s/m/root"),
            sys_root: Path::new("/"),
            hostname: "m",
            network: false,
            volumes: &[(PathBuf::from("/h"), "/workspace/h".to_owned(), true)],
            log: Path::new("/s/m/init.log"),
            secrets: &[],
            timeout: Duration::from_secs(1),
        };
        let entries = [
            ("bin", SystemEntry::Symlink("usr/bin".into())),
            ("lib64", SystemEntry::Dir),
        ];
        let args: Vec<String> = bwrap_args(&spec, &entries)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let line = args.join(" ");
        assert!(line.contains("--unshare-net"));
        assert!(line.contains("--bind /s/m/root / --ro-bind /usr /usr"));
        assert!(line.contains("--ro-bind /lib64 /lib64"));
        assert!(!line.contains("/bin /bin"));
        assert!(line.contains("--ro-bind /h /workspace/h"));
        let spec = LaunchSpec {
            network: true,
            ..spec
        };
        let line = bwrap_args(&spec, &entries)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(!line.contains("--unshare-net"));
    }
}
