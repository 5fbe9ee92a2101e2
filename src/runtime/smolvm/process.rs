//! Running one `smolvm` command: through duct, with a deadline, output
//! captured, stdin closed.

use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use crate::runtime::{MAX_EXEC_OUTPUT, RuntimeErrorKind};

/// How long a killed command gets to be reaped before we stop waiting for it.
const REAP_GRACE: Duration = Duration::from_secs(5);

/// `smolvm machine ls --json`, as shown in messages.
pub(crate) fn display_command(binary: &Path, args: &[OsString]) -> String {
    let program = binary
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| binary.display().to_string());
    let mut shown = program;
    for arg in args {
        shown.push(' ');
        shown.push_str(&quote(&shorten(&arg.to_string_lossy())));
    }
    shown
}

/// Arguments longer than this are cut in messages: a step's whole script
/// travels as one argument, and an error repeated per step would otherwise
/// print kilobytes of it (enough to fill a pipe nobody reads yet).
const SHOWN_ARG: usize = 160;

fn shorten(arg: &str) -> std::borrow::Cow<'_, str> {
    if arg.len() <= SHOWN_ARG {
        return arg.into();
    }
    let mut end = SHOWN_ARG;
    while !arg.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &arg[..end], arg.len()).into()
}

/// Quote an argument for display only when it needs it, so messages stay
/// readable and can still be pasted into a shell.
fn quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=:/.,@%+".contains(c));
    if plain {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// Run `binary args...` to completion or until `timeout` passes.
///
/// stdin is `/dev/null`: smolvm's prompts (`delete` without `-f`) then read
/// end-of-file instead of waiting for an answer that never comes. The child
/// runs in a process group of its own so a hung command is killed together
/// with anything it started.
///
/// No call outlives bottle: the child gets SIGKILL when the thread that
/// started it goes away (`PR_SET_PDEATHSIG`), which is when bottle dies,
/// however it dies (a SIGKILLed `destroy` must not leave `machine delete`
/// calls running under the next `apply`). A child whose parent died before
/// the signal was armed exits at once instead of running.
pub(crate) fn run(
    binary: &Path,
    args: &[OsString],
    env: &[(OsString, OsString)],
    timeout: Duration,
) -> Result<Output, RuntimeErrorKind> {
    let io_error = |source| RuntimeErrorKind::Io {
        context: format!("running `{}`", display_command(binary, args)),
        source,
    };
    // Output is read here, at most MAX_EXEC_OUTPUT of it (a guest that
    // floods it must not cost bottle's memory), not captured by duct.
    let (out_r, out_w) = std::io::pipe().map_err(io_error)?;
    let (err_r, err_w) = std::io::pipe().map_err(io_error)?;
    let mut expression = duct::cmd(binary, args)
        .stdin_null()
        .stdout_file(out_w)
        .stderr_file(err_w)
        .unchecked()
        .before_spawn(|command| {
            command.process_group(0);
            die_with_parent(command);
            Ok(())
        });
    for (key, value) in env {
        expression = expression.env(key, value);
    }
    let handle = expression
        .start()
        .map_err(|source| RuntimeErrorKind::Spawn {
            command: display_command(binary, args),
            source,
        })?;
    // Our copies of the write ends: the readers see end-of-file once the
    // command (and whatever it left holding them) is gone.
    drop(expression);
    let over = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stdout = bounded_reader(out_r, over.clone());
    let stderr = bounded_reader(err_r, over.clone());
    let kill_group = || {
        for pid in handle.pids() {
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                // The group may already be gone; the kill below covers
                // the direct child either way.
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
        }
        let _ = handle.kill();
        let _ = handle.wait_timeout(REAP_GRACE);
    };
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        if let Some(output) = handle
            .wait_timeout(POLL.min(deadline.saturating_duration_since(std::time::Instant::now())))
            .map_err(io_error)?
        {
            break output.status;
        }
        if over.load(std::sync::atomic::Ordering::Relaxed) {
            kill_group();
            return Err(RuntimeErrorKind::OutputTooLarge {
                command: display_command(binary, args),
                limit: MAX_EXEC_OUTPUT,
            });
        }
        if crate::apply::aborted() {
            kill_group();
            return Err(RuntimeErrorKind::Cancelled {
                command: display_command(binary, args),
                note: GUEST_NOT_KILLED,
            });
        }
        if std::time::Instant::now() >= deadline {
            kill_group();
            return Err(RuntimeErrorKind::Timeout {
                command: display_command(binary, args),
                timeout,
            });
        }
    };
    let (stdout, stderr) = (stdout.join(), stderr.join());
    if over.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(RuntimeErrorKind::OutputTooLarge {
            command: display_command(binary, args),
            limit: MAX_EXEC_OUTPUT,
        });
    }
    Ok(Output {
        status,
        stdout: stdout.unwrap_or_default(),
        stderr: stderr.unwrap_or_default(),
    })
}

/// What killing a `smolvm` call does not do, for the cancelled error.
const GUEST_NOT_KILLED: &str = "smolvm does not end a command inside the machine when its \
`smolvm machine exec` is killed: it may still be running there (look with `bottle exec AGENT -- ps -ef`); ";

/// How often a running command is checked for too much output and for a
/// Ctrl-C that ends it.
const POLL: Duration = Duration::from_millis(50);

/// Read a pipe to its end, keeping at most [`MAX_EXEC_OUTPUT`] bytes (both
/// pipes together): past that, `over` is set and reading stops.
fn bounded_reader(
    mut pipe: std::io::PipeReader,
    over: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        use std::io::Read;
        let mut out = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    if out.len() > MAX_EXEC_OUTPUT {
                        over.store(true, std::sync::atomic::Ordering::Relaxed);
                        out.clear();
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        out
    })
}

/// Arm `PR_SET_PDEATHSIG` in the child between fork and exec.
fn die_with_parent(command: &mut std::process::Command) {
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs in the forked child before exec and only
    // makes async-signal-safe system calls (prctl, getppid, _exit).
    unsafe {
        command.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            if rustix::process::getppid() != Some(parent) {
                // The parent is already gone: the signal will never come.
                libc::_exit(137);
            }
            Ok(())
        });
    }
}

/// The exit status as a number: the code, or 128 + the signal that killed
/// the process, as shells report it.
pub(crate) fn status_code(output: &Output) -> i32 {
    output
        .status
        .code()
        .or_else(|| output.status.signal().map(|signal| 128 + signal))
        .unwrap_or(-1)
}

/// Whether the process was killed by a signal rather than exiting.
pub(crate) fn killed_by_signal(output: &Output) -> bool {
    output.status.signal().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_argument_is_shown_cut_with_its_size() {
        let script = "é".repeat(500);
        let args: Vec<OsString> = ["machine", "exec", "--", "sh", "-c", script.as_str()]
            .into_iter()
            .map(OsString::from)
            .collect();
        let shown = display_command(Path::new("/usr/bin/smolvm"), &args);
        assert!(shown.len() < 300, "{shown}");
        assert!(shown.ends_with("… (1000 bytes)'"), "{shown}");
        assert!(
            shown.starts_with("smolvm machine exec -- sh -c 'éé"),
            "{shown}"
        );
    }

    #[test]
    fn display_quotes_only_what_needs_it() {
        let args: Vec<OsString> = [
            "machine",
            "exec",
            "--name",
            "a",
            "--",
            "sh",
            "-c",
            "echo 'hi'",
        ]
        .into_iter()
        .map(Into::into)
        .collect();
        assert_eq!(
            display_command(Path::new("/usr/local/bin/smolvm"), &args),
            r"smolvm machine exec --name a -- sh -c 'echo '\''hi'\'''"
        );
    }

    #[test]
    fn a_hung_command_times_out_and_is_killed() {
        let started = std::time::Instant::now();
        let error = run(
            Path::new("/bin/sh"),
            &["-c".into(), "sleep 30 & sleep 30".into()],
            &[],
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(
            matches!(&error, RuntimeErrorKind::Timeout { command, .. } if command.starts_with("sh -c")),
            "{error:?}"
        );
        // The background `sleep` shares the pipes; without the group kill the
        // wait for output would last the full 30 s.
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_command_that_floods_its_output_is_stopped() {
        let error = run(
            Path::new("/bin/sh"),
            &["-c".into(), "yes flood".into()],
            &[],
            Duration::from_secs(300),
        )
        .unwrap_err();
        assert!(
            matches!(&error, RuntimeErrorKind::OutputTooLarge { limit, .. } if *limit == MAX_EXEC_OUTPUT),
            "{error:?}"
        );
        // Output under the limit is kept whole, both streams.
        let output = run(
            Path::new("/bin/sh"),
            &["-c".into(), "head -c 100000 /dev/zero; echo err >&2".into()],
            &[],
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(output.stdout.len(), 100_000);
        assert_eq!(output.stderr, b"err\n");
    }

    #[test]
    fn a_missing_binary_is_a_spawn_error() {
        let error = run(
            Path::new("/nonexistent/smolvm"),
            &[],
            &[],
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(matches!(error, RuntimeErrorKind::Spawn { .. }), "{error:?}");
    }

    #[test]
    fn signal_deaths_report_128_plus_signal() {
        let output = run(
            Path::new("/bin/sh"),
            &["-c".into(), "kill -9 $$".into()],
            &[],
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(status_code(&output), 137);
        assert!(killed_by_signal(&output));
    }
}
