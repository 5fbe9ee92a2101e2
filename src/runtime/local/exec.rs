//! Running commands inside a running machine.
//!
//! A command joins the namespaces of the machine's init process (pid, ipc,
//! uts and net from a short-lived thread, so only the child is affected;
//! mount in the child itself, through `/proc/PID/ns` files), chroots to the init's root, drops the
//! capabilities a guest must not have, switches to the requested user and
//! execs. One fork and one exec: no helper process, which keeps the overhead
//! of an exec to a few milliseconds.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::runtime::MAX_EXEC_OUTPUT;

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::fs::{Mode, OFlags, ResolveFlags, openat2};
use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open};
use rustix::thread::{CapabilitySet, LinkNameSpaceType};

use super::accounts::{UserIds, lookup_user};
use super::sandbox::{InitProcess, secret_var};
use crate::runtime::SecretMount;

/// The capabilities a guest's root keeps (Docker's default set without
/// `MKNOD`: there is no device cgroup here to stop a guest from opening a
/// host disk through a device node it made). Everything else, `SYS_ADMIN`
/// first, is dropped from the bounding set.
pub const GUEST_CAPS: CapabilitySet = CapabilitySet::CHOWN
    .union(CapabilitySet::DAC_OVERRIDE)
    .union(CapabilitySet::FOWNER)
    .union(CapabilitySet::FSETID)
    .union(CapabilitySet::KILL)
    .union(CapabilitySet::SETGID)
    .union(CapabilitySet::SETUID)
    .union(CapabilitySet::SETPCAP)
    .union(CapabilitySet::NET_BIND_SERVICE)
    .union(CapabilitySet::NET_RAW)
    .union(CapabilitySet::SYS_CHROOT)
    .union(CapabilitySet::AUDIT_WRITE)
    .union(CapabilitySet::SETFCAP);

/// [`GUEST_CAPS`] as `setpriv --bounding-set` spells it.
const GUEST_CAPS_SETPRIV: &str = "-all,+chown,+dac_override,+fowner,+fsetid,+kill,+setgid,+setuid,\
+setpcap,+net_bind_service,+net_raw,+sys_chroot,+audit_write,+setfcap";

/// `PATH` for root, as in Debian's container images.
pub const ROOT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// `PATH` for other users (`ENV_PATH` of Debian's `login.defs`).
pub const USER_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games";

/// The largest guest account file read to look a user up.
const ACCOUNT_FILE_LIMIT: u64 = 16 << 20;

/// Handles on a running machine's init process.
pub struct Target {
    /// Keeps the init's pid from being reused while the handles are open.
    _pidfd: OwnedFd,
    /// The init's root directory (`/proc/PID/root`), the guest's `/`.
    pub root: OwnedFd,
    /// `/proc/PID/ns/{pid,ipc,uts,net}`, joined from a thread.
    thread_ns: [OwnedFd; 4],
    /// `/proc/PID/ns/mnt`, joined in the child.
    mnt_ns: OwnedFd,
    pub pid: u32,
}

impl Target {
    /// Open handles on `init` if it is still the recorded process.
    pub fn open(init: &InitProcess) -> Option<Self> {
        let pid = Pid::from_raw(init.pid as i32)?;
        let pidfd = pidfd_open(pid, PidfdFlags::empty()).ok()?;
        // The pidfd pins the process: if the start time matches now, the
        // pid is the init and not a process that reused it.
        if !init.is_alive() {
            return None;
        }
        let open = |what: &str, flags: OFlags| {
            rustix::fs::open(
                format!("/proc/{}/{what}", init.pid),
                flags | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .ok()
        };
        let root = open("root", OFlags::PATH | OFlags::DIRECTORY)?;
        let thread_ns = [
            open("ns/pid", OFlags::RDONLY)?,
            open("ns/ipc", OFlags::RDONLY)?,
            open("ns/uts", OFlags::RDONLY)?,
            open("ns/net", OFlags::RDONLY)?,
        ];
        let mnt_ns = open("ns/mnt", OFlags::RDONLY)?;
        // They were opened by pid: check it still was the init's.
        if !init.is_alive() {
            return None;
        }
        Some(Self {
            _pidfd: pidfd,
            root,
            thread_ns,
            mnt_ns,
            pid: init.pid,
        })
    }

    /// Read a file of the guest, resolving every symlink inside the guest.
    pub fn read_guest_file(&self, path: &str, limit: u64) -> io::Result<Vec<u8>> {
        let fd = openat2(
            &self.root,
            path.trim_start_matches('/'),
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        )?;
        let mut file = std::fs::File::from(fd);
        if !file.metadata()?.is_file() {
            return Err(io::Error::other("not a regular file"));
        }
        let mut out = Vec::new();
        (&mut file).take(limit).read_to_end(&mut out)?;
        Ok(out)
    }

    /// The values the init was started with for these secrets (see
    /// `LaunchSpec::secrets`), by guest variable name.
    pub fn secrets(&self, secrets: &[SecretMount]) -> BTreeMap<String, OsString> {
        let environ = std::fs::read(format!("/proc/{}/environ", self.pid)).unwrap_or_default();
        let wanted: BTreeMap<Vec<u8>, &str> = secrets
            .iter()
            .map(|s| (secret_var(&s.guest_env).into_bytes(), s.guest_env.as_str()))
            .collect();
        environ
            .split(|b| *b == 0)
            .filter_map(|entry| {
                let eq = entry.iter().position(|b| *b == b'=')?;
                let guest = wanted.get(&entry[..eq])?;
                Some((
                    (*guest).to_owned(),
                    OsString::from_vec(entry[eq + 1..].to_vec()),
                ))
            })
            .collect()
    }

    /// Whether `path` is a directory of the guest.
    pub fn guest_dir_exists(&self, path: &str) -> bool {
        let rel = path.trim_start_matches('/');
        let rel = if rel.is_empty() { "." } else { rel };
        openat2(
            &self.root,
            rel,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        )
        .is_ok()
    }

    /// Look a user up in the guest's own account files.
    pub fn lookup_user(&self, user: &str) -> Option<UserIds> {
        if user == "root" || user == "0" {
            // Root exists even in a guest whose passwd is broken.
            let passwd = self.read_guest_file("/etc/passwd", ACCOUNT_FILE_LIMIT).ok();
            let group = self.read_guest_file("/etc/group", ACCOUNT_FILE_LIMIT).ok();
            let from_files = passwd.zip(group).and_then(|(p, g)| {
                lookup_user(
                    &String::from_utf8_lossy(&p),
                    &String::from_utf8_lossy(&g),
                    "root",
                )
            });
            return Some(from_files.unwrap_or_else(UserIds::root));
        }
        let passwd = self
            .read_guest_file("/etc/passwd", ACCOUNT_FILE_LIMIT)
            .ok()?;
        let group = self
            .read_guest_file("/etc/group", ACCOUNT_FILE_LIMIT)
            .unwrap_or_default();
        lookup_user(
            &String::from_utf8_lossy(&passwd),
            &String::from_utf8_lossy(&group),
            user,
        )
    }
}

/// The clean environment a guest process starts from.
pub fn base_env(user: &UserIds) -> BTreeMap<OsString, OsString> {
    let path = if user.uid == 0 { ROOT_PATH } else { USER_PATH };
    [
        ("PATH", path),
        ("HOME", user.home.as_str()),
        ("USER", user.name.as_str()),
        ("LOGNAME", user.name.as_str()),
        ("SHELL", user.shell.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (OsString::from(k), OsString::from(v)))
    .collect()
}

/// A command ready to run.
pub struct Prepared {
    pub argv: Vec<OsString>,
    pub env: BTreeMap<OsString, OsString>,
    pub cwd: String,
    pub user: UserIds,
    pub stdin: Option<Vec<u8>>,
    pub timeout: Duration,
}

pub enum RunError {
    /// The command could not be started (no such program, bad directory).
    Spawn(io::Error),
    /// The deadline passed; the command's process group was killed.
    Timeout,
    /// It printed more than [`MAX_EXEC_OUTPUT`]; its process group was
    /// killed.
    TooLarge,
    /// A second Ctrl-C asked for the calls under way to end
    /// ([`crate::apply::aborted`]); its process group was killed.
    Cancelled,
    Io(io::Error),
}

pub struct RunOutput {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Run `prepared` in the machine and collect its output.
pub fn run(target: &Target, prepared: Prepared) -> Result<RunOutput, RunError> {
    let deadline = Instant::now() + prepared.timeout;
    let mut child = spawn_in(target, &prepared).map_err(RunError::Spawn)?;
    let result = pump(&mut child, prepared.stdin.as_deref(), deadline);
    match result {
        Ok((stdout, stderr)) => {
            let status = child.wait().map_err(RunError::Io)?;
            let status = status
                .code()
                .or_else(|| status.signal().map(|s| 128 + s))
                .unwrap_or(-1);
            Ok(RunOutput {
                status,
                stdout,
                stderr,
            })
        }
        Err(e) => {
            // Kill the whole process group, then the child itself in case
            // it left the group.
            if let Some(pid) = Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process_group(pid, Signal::KILL);
            }
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

fn spawn_in(target: &Target, p: &Prepared) -> io::Result<Child> {
    let Some(program) = p.argv.first() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty command"));
    };
    let cwd = CString::new(p.cwd.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in working directory"))?;
    let gids: Vec<rustix::process::Gid> = p
        .user
        .groups
        .iter()
        .map(|g| rustix::process::Gid::from_raw(*g))
        .collect();
    let uid = rustix::process::Uid::from_raw(p.user.uid);
    let gid = rustix::process::Gid::from_raw(p.user.gid);
    let mnt_raw: RawFd = target.mnt_ns.as_raw_fd();
    let root_raw: RawFd = target.root.as_raw_fd();

    let mut cmd = Command::new(program);
    cmd.args(&p.argv[1..])
        .env_clear()
        .envs(&p.env)
        .stdin(if p.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: the closure runs in the forked child before exec and only
    // makes system calls on data prepared before the fork (no allocation,
    // no locks). The two fds stay open in the parent until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            let mnt = BorrowedFd::borrow_raw(mnt_raw);
            let root = BorrowedFd::borrow_raw(root_raw);
            enter_guest(mnt, root, &cwd, &gids, uid, gid)
        });
    }

    // Entering a pid namespace only affects the children of the thread that
    // does it, and cannot be undone: do it on a thread of its own.
    std::thread::scope(|s| {
        s.spawn(|| {
            for ns in &target.thread_ns {
                rustix::thread::move_into_link_name_space(ns.as_fd(), None)?;
            }
            cmd.spawn()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("exec thread panicked")))
    })
}

/// In the child, before exec: join the mount namespace, chroot to the
/// guest's root, drop capabilities and switch user.
fn enter_guest(
    mnt_ns: BorrowedFd<'_>,
    root: BorrowedFd<'_>,
    cwd: &CString,
    gids: &[rustix::process::Gid],
    uid: rustix::process::Uid,
    gid: rustix::process::Gid,
) -> io::Result<()> {
    rustix::thread::move_into_link_name_space(mnt_ns, Some(LinkNameSpaceType::Mount))?;
    rustix::process::fchdir(root)?;
    rustix::process::chroot(c".")?;
    rustix::process::chdir(cwd.as_c_str())?;
    // An inherited directory fd would lead out of the chroot.
    cloexec_from(3, None)?;
    drop_capabilities()?;
    rustix::thread::set_thread_groups(gids)?;
    rustix::thread::set_thread_gid(gid)?;
    rustix::thread::set_thread_uid(uid)?;
    Ok(())
}

/// Mark every fd from `first` up close-on-exec, except `keep`, so nothing
/// of the bottle process that was opened without `O_CLOEXEC` reaches the
/// guest. Allocation-free, for `pre_exec`.
pub fn cloexec_from(first: u32, keep: Option<u32>) -> io::Result<()> {
    let ranges = match keep {
        Some(k) if k >= first => [(first, k.saturating_sub(1)), (k + 1, u32::MAX)],
        _ => [(first, u32::MAX), (1, 0)],
    };
    for (lo, hi) in ranges {
        if lo > hi {
            continue;
        }
        // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets a flag on
        // fds; it closes nothing.
        let r = unsafe { libc::syscall(libc::SYS_close_range, lo, hi, libc::CLOSE_RANGE_CLOEXEC) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Limit the bounding set to [`GUEST_CAPS`] and empty the inheritable and
/// ambient sets, so an exec'd root process gets at most [`GUEST_CAPS`].
fn drop_capabilities() -> io::Result<()> {
    for bit in 0..64u32 {
        let cap = CapabilitySet::from_bits_retain(1u64 << bit);
        if GUEST_CAPS.contains(cap) {
            continue;
        }
        match rustix::thread::remove_capability_from_bounding_set(cap) {
            // Beyond the kernel's last capability.
            Err(rustix::io::Errno::INVAL) => {}
            other => other?,
        }
    }
    let mut sets = rustix::thread::capabilities(None)?;
    sets.inheritable = CapabilitySet::empty();
    rustix::thread::set_capabilities(None, sets)?;
    rustix::thread::clear_ambient_capability_set()?;
    Ok(())
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(fd)?;
    rustix::fs::fcntl_setfl(fd, flags | OFlags::NONBLOCK)?;
    Ok(())
}

/// Read everything available from `r` without blocking. Returns false at
/// end of file.
fn read_available(r: &mut impl Read, out: &mut Vec<u8>) -> io::Result<bool> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        // Over the limit: the caller stops the command; read no more.
        if out.len() > MAX_EXEC_OUTPUT {
            return Ok(true);
        }
        match r.read(&mut buf) {
            Ok(0) => return Ok(false),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// How often a running command checks for a Ctrl-C that ends it.
const CANCEL_POLL: Duration = Duration::from_millis(100);

/// Feed stdin and collect stdout and stderr until the child exits or the
/// deadline passes. Output still buffered when the child exits is kept;
/// background processes that inherited the pipes are not waited for.
fn pump(
    child: &mut Child,
    input: Option<&[u8]>,
    deadline: Instant,
) -> Result<(Vec<u8>, Vec<u8>), RunError> {
    let child_pidfd = pidfd_open(Pid::from_child(child), PidfdFlags::empty())
        .map_err(|e| RunError::Io(e.into()))?;
    let mut stdin = child.stdin.take();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    for fd in [
        stdin.as_ref().map(|f| f.as_fd()),
        stdout.as_ref().map(|f| f.as_fd()),
        stderr.as_ref().map(|f| f.as_fd()),
    ]
    .into_iter()
    .flatten()
    {
        set_nonblocking(fd).map_err(RunError::Io)?;
    }
    let input = input.unwrap_or_default();
    let mut written = 0;
    let (mut out, mut err) = (Vec::new(), Vec::new());

    loop {
        if crate::apply::aborted() {
            return Err(RunError::Cancelled);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(RunError::Timeout);
        }
        // Wake up now and then to notice a Ctrl-C.
        let left = (deadline - now).min(CANCEL_POLL);
        let timeout = Timespec {
            tv_sec: left.as_secs() as _,
            tv_nsec: left.subsec_nanos() as _,
        };
        let (exited, out_ready, err_ready, in_ready);
        {
            let mut fds = vec![PollFd::new(&child_pidfd, PollFlags::IN)];
            let out_i = stdout.as_ref().map(|f| {
                fds.push(PollFd::new(f, PollFlags::IN));
                fds.len() - 1
            });
            let err_i = stderr.as_ref().map(|f| {
                fds.push(PollFd::new(f, PollFlags::IN));
                fds.len() - 1
            });
            let in_i = stdin.as_ref().map(|f| {
                fds.push(PollFd::new(f, PollFlags::OUT));
                fds.len() - 1
            });
            match poll(&mut fds, Some(&timeout)) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(RunError::Io(e.into())),
            }
            let ready = |i: Option<usize>| i.is_some_and(|i| !fds[i].revents().is_empty());
            exited = !fds[0].revents().is_empty();
            out_ready = ready(out_i);
            err_ready = ready(err_i);
            in_ready = ready(in_i);
        }
        if out_ready
            && let Some(f) = stdout.as_mut()
            && !read_available(f, &mut out).map_err(RunError::Io)?
        {
            stdout = None;
        }
        if err_ready
            && let Some(f) = stderr.as_mut()
            && !read_available(f, &mut err).map_err(RunError::Io)?
        {
            stderr = None;
        }
        if out.len() + err.len() > MAX_EXEC_OUTPUT {
            return Err(RunError::TooLarge);
        }
        if in_ready && let Some(f) = stdin.as_mut() {
            match f.write(&input[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The command stopped reading; what it did read is its business.
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => written = input.len(),
                Err(e) => return Err(RunError::Io(e)),
            }
        }
        if stdin.is_some() && written >= input.len() {
            // Closing stdin is the end-of-file the command waits for.
            stdin = None;
        }
        if exited {
            // Whatever the command wrote before exiting is in the pipes.
            if let Some(f) = stdout.as_mut() {
                read_available(f, &mut out).map_err(RunError::Io)?;
            }
            if let Some(f) = stderr.as_mut() {
                read_available(f, &mut err).map_err(RunError::Io)?;
            }
            if out.len() + err.len() > MAX_EXEC_OUTPUT {
                return Err(RunError::TooLarge);
            }
            return Ok((out, err));
        }
    }
}

/// The most secrets an interactive session carries: one fd each, 3 to 9
/// (`dash` redirects single-digit fds only).
pub const MAX_INTERACTIVE_SECRETS: usize = 7;

/// Quote for POSIX `sh`.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Build the argv of an interactive session: `nsenter` into the init's
/// namespaces, a clean environment (`env -i`), the user's working
/// directory, the guest capability set and user (`setpriv`). `secrets`
/// names the variables the init was started with (see
/// `LaunchSpec::secrets`): the host shell reads each from the init's
/// environment when the argv runs and passes it on an inherited fd, never
/// on an argv.
pub fn interactive_argv(
    nsenter: &str,
    init: &InitProcess,
    user: &UserIds,
    cwd: &str,
    env: &BTreeMap<String, String>,
    secrets: &[&str],
    argv: &[String],
) -> Vec<String> {
    let pid = init.pid;
    let mut inner: Vec<String> = vec![
        nsenter.to_owned(),
        format!("--target={pid}"),
        "--mount".into(),
        "--uts".into(),
        "--ipc".into(),
        "--net".into(),
        "--pid".into(),
        "--root".into(),
        "--wd".into(),
        "--".into(),
        "/usr/bin/env".into(),
        "-i".into(),
        "-C".into(),
        cwd.to_owned(),
    ];
    inner.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
    if !secrets.is_empty() {
        // In the guest: read each fd into its variable, close the fds.
        let mut script = String::new();
        let mut names = Vec::new();
        for (i, guest) in secrets.iter().enumerate() {
            let fd = 3 + i;
            // `printf x` keeps trailing newlines; the heredoc added one.
            script.push_str(&format!(
                "{guest}=$(cat <&{fd}; printf x) && {guest}=${{{guest}%x}} && \
                 {guest}=${{{guest}%?}} && exec {fd}<&- && "
            ));
            names.push(*guest);
        }
        script.push_str(&format!("export {} && exec \"$@\"", names.join(" ")));
        inner.extend([
            "/bin/sh".into(),
            "-c".into(),
            script,
            "bottle-secrets".into(),
        ]);
    }
    inner.extend([
        "/usr/bin/setpriv".into(),
        format!("--reuid={}", user.uid),
        format!("--regid={}", user.gid),
        "--init-groups".into(),
        "--inh-caps=-all".into(),
        format!("--bounding-set={GUEST_CAPS_SETPRIV}"),
        "--".into(),
    ]);
    inner.extend(argv.iter().cloned());
    if secrets.is_empty() {
        return inner;
    }

    // On the host: check the pid is still the machine's init (a printed
    // command may run after a restart), then take each value from the
    // init's environment into a heredoc on its own fd, and exec the rest.
    // `sed` appends `x` to a value it finds (so trailing newlines survive
    // `$(...)` and an empty value is told from a missing one); `tr` drops
    // the NUL that ends it.
    let environ = format!("/proc/{pid}/environ");
    let mut script = format!(
        "[ \"$(sed 's/.*) //' /proc/{pid}/stat 2>/dev/null | cut -d' ' -f20)\" = {start} ] || \
         {{ echo 'bottle: the machine is not running as it was when this command was made; attach again' >&2; exit 1; }}\n",
        start = init.start_time
    );
    for (i, guest) in secrets.iter().enumerate() {
        let fd = 3 + i;
        let delim = format!("BOTTLE_SECRET_{fd}");
        let var = secret_var(guest);
        script.push_str(&format!(
            "v=$(sed -zn 's/^{var}=\\(.*\\)/\\1x/p' {environ} | tr -d '\\000')\n\
             [ -n \"$v\" ] || {{ echo 'bottle: secret {guest} is not in the machine (was it started without it? stop and start the machine)' >&2; exit 1; }}\n\
             v=${{v%x}}\n\
             exec {fd}<<{delim}\n$v\n{delim}\n"
        ));
    }
    script.push_str("unset v\n");
    script.push_str("exec");
    for word in &inner {
        script.push(' ');
        script.push_str(&shell_quote(word));
    }
    script.push('\n');
    vec![
        "/bin/sh".into(),
        "-c".into(),
        script,
        "bottle-attach".into(),
    ]
}

/// An argv that only prints `message` and fails, for sessions that cannot
/// be opened (the trait's `interactive_argv` cannot return an error).
pub fn failing_argv(message: &str) -> Vec<String> {
    vec![
        "/bin/sh".into(),
        "-c".into(),
        "printf 'bottle: %s\\n' \"$1\" >&2; exit 1".into(),
        "bottle".into(),
        message.to_owned(),
    ]
}

/// `argv` as one line, for messages.
pub fn display_argv(argv: &[OsString]) -> String {
    let line = argv
        .iter()
        .map(|a| shell_quote(&String::from_utf8_lossy(OsStr::as_bytes(a))))
        .collect::<Vec<_>>()
        .join(" ");
    if line.len() > 200 {
        let mut cut = 200;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}...", &line[..cut])
    } else {
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_for_sh() {
        assert_eq!(shell_quote("abc/d.e"), "abc/d.e");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    fn init(pid: u32) -> InitProcess {
        InitProcess {
            pid,
            start_time: 4711,
            boot_id: "boot".into(),
        }
    }

    #[test]
    fn interactive_argv_reads_secrets_from_the_init_it_was_made_for() {
        let user = UserIds::root();
        let env = BTreeMap::from([("A".to_owned(), "1".to_owned())]);
        let argv = interactive_argv(
            "/usr/bin/nsenter",
            &init(42),
            &user,
            "/root",
            &env,
            &["TOKEN"],
            &["bash".to_owned()],
        );
        assert_eq!(argv[0], "/bin/sh");
        let script = &argv[2];
        // Only from pid 42, and only while pid 42 is the init that started.
        assert!(
            script.starts_with("[ \"$(sed 's/.*) //' /proc/42/stat"),
            "{script}"
        );
        assert!(script.contains(" = 4711 ]"), "{script}");
        assert!(
            script.contains("s/^BOTTLE_SECRET_TOKEN=\\(.*\\)/\\1x/p' /proc/42/environ"),
            "{script}"
        );
        assert!(script.contains("--target=42"));
        assert!(script.contains("A=1"));
        assert!(script.ends_with(" -- bash\n"), "{script}");
    }

    #[test]
    fn interactive_argv_without_secrets_is_plain() {
        let argv = interactive_argv(
            "nsenter",
            &init(7),
            &UserIds::root(),
            "/",
            &BTreeMap::new(),
            &[],
            &["true".to_owned()],
        );
        assert_eq!(argv[0], "nsenter");
        assert_eq!(argv.last().unwrap(), "true");
        assert!(argv.contains(&"--reuid=0".to_owned()));
    }
}
