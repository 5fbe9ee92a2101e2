//! One smolvm writer at a time.
//!
//! smolvm keeps its machines in a SQLite database (WAL, `busy_timeout`
//! 15 s), but its writes are *deferred* transactions that read a row and
//! then write it (`reserve_vm_create` and `commit_reserved_vm` in `create`,
//! `remove_vm` in `delete`, `update_vm` in `update`, `stop` and after a
//! `start` has booted). SQLite cannot upgrade such a transaction once
//! another connection has committed since its read, and answers
//! `SQLITE_BUSY` at once, without waiting: two `create`s or `delete`s at
//! once fail about half the time with
//! `Error: database operation failed: reserve vm 'NAME': database is locked`
//! (exit 1, nothing done). `ls`, `status`, `exec` and `cp` only read.
//!
//! So bottle runs those calls one at a time per smolvm database (see
//! [`takes_turns`] for why `start` does not wait its turn):
//! each holds an exclusive `flock` on a file beside smolvm's data
//! directory, across the threads of one bottle process (each call opens the
//! file anew, and `flock` locks belong to the open file) and across bottle
//! processes, whatever their project or state directory. Writers that are
//! not bottle (a user's own `smolvm machine ...`) can still collide with
//! it, so a call that fails with the lock error is retried with bounded,
//! jittered backoff: smolvm did nothing in that call.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Verbs that take turns: the ones whose writes collide (`create` and
/// `delete` fail about half the time when two run at once). `start` writes
/// too (the machine's record, once it has booted) but is left out: a boot
/// can take minutes (an image pull) or hang until its deadline, and holding
/// every other writer of the host that long is worse than the rare
/// collision of its one short write, which is retried like any other.
pub(crate) fn takes_turns(verb: &str) -> bool {
    matches!(verb, "create" | "delete" | "update" | "stop")
}

/// smolvm's data directory for the environment it will run in:
/// `$SMOLVM_DATA_DIR/.local/share/smolvm` when set (smolvm re-roots all of
/// its state there), else `$XDG_DATA_HOME/smolvm`, else
/// `$HOME/.local/share/smolvm` (smolvm's `dirs::data_local_dir()`).
/// `lookup` reads a variable as smolvm will see it.
pub(crate) fn smolvm_data_dir(
    lookup: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Option<PathBuf> {
    let set = |name: &str| lookup(name).filter(|value| !value.is_empty());
    let local = if let Some(root) = set("SMOLVM_DATA_DIR") {
        PathBuf::from(root).join(".local/share")
    } else if let Some(xdg) = set("XDG_DATA_HOME") {
        PathBuf::from(xdg)
    } else {
        PathBuf::from(set("HOME")?).join(".local/share")
    };
    Some(local.join("smolvm"))
}

/// The lock file of one smolvm database: `bottle-writers.lock` beside
/// smolvm's own directory, so it never mixes with smolvm's files.
pub(crate) fn lock_path(data_dir: &Path) -> PathBuf {
    let name = data_dir
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "smolvm".to_owned());
    data_dir.with_file_name(format!("{name}.bottle-writers.lock"))
}

/// An exclusive `flock`, released when dropped (or when the process dies).
#[derive(Debug)]
pub(crate) struct WriterLock(#[allow(dead_code)] File);

/// Wait for the writer lock at `path`, creating the file (and its
/// directory) if needed.
pub(crate) fn lock(path: &Path) -> std::io::Result<WriterLock> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    loop {
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive) {
            Ok(()) => return Ok(WriterLock(file)),
            Err(rustix::io::Errno::INTR) => continue,
            Err(errno) => return Err(errno.into()),
        }
    }
}

/// Whether a failed call failed only because smolvm's database was locked
/// by another writer: smolvm's single `Error: database operation failed:
/// ...: database is locked` line (progress lines may come before it).
pub(crate) fn is_database_locked(status: i32, stderr: &str) -> bool {
    status == 1
        && super::output::smolvm_error(stderr).is_some_and(|message| {
            message.starts_with("database operation failed:")
                && message.ends_with("database is locked")
        })
}

/// How many times a call that hit the lock error is made in all.
pub(crate) const ATTEMPTS: u32 = 8;

/// The pause before attempt `attempt` (2, 3, ...): 25 ms doubling up to
/// 800 ms, each with up to as much again of jitter, so writers that
/// collided do not collide again in step. Worst case about 5 s in all.
pub(crate) fn backoff(attempt: u32) -> Duration {
    let base = 25u64 << attempt.saturating_sub(2).min(5);
    Duration::from_millis(base + fastrand::u64(0..=base))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::ffi::OsString;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn the_data_dir_follows_smolvm() {
        let all = [
            ("SMOLVM_DATA_DIR", "/d"),
            ("XDG_DATA_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(
            smolvm_data_dir(env(&all)).unwrap(),
            Path::new("/d/.local/share/smolvm")
        );
        assert_eq!(
            smolvm_data_dir(env(&all[1..])).unwrap(),
            Path::new("/x/smolvm")
        );
        assert_eq!(
            smolvm_data_dir(env(&[("SMOLVM_DATA_DIR", ""), ("HOME", "/h")])).unwrap(),
            Path::new("/h/.local/share/smolvm")
        );
        assert_eq!(smolvm_data_dir(env(&[])), None);
        assert_eq!(
            lock_path(Path::new("/h/.local/share/smolvm")),
            Path::new("/h/.local/share/smolvm.bottle-writers.lock")
        );
    }

    #[test]
    fn only_the_lock_error_is_retried() {
        let locked = "Error: database operation failed: reserve vm 'a': database is locked\n";
        assert!(is_database_locked(1, locked));
        assert!(is_database_locked(
            1,
            "Starting machine 'a' with 0 mount(s)...\nError: database operation failed: update vm 'a': database is locked\n"
        ));
        assert!(!is_database_locked(2, locked));
        assert!(!is_database_locked(
            1,
            "Error: config operation failed: create machine: machine 'a' already exists or is being created\n"
        ));
        assert!(!is_database_locked(
            1,
            "Error: agent operation failed: database is locked\n"
        ));
    }

    #[test]
    fn backoff_grows_and_stays_bounded() {
        let total: Duration = (2..=ATTEMPTS).map(backoff).sum();
        assert!(total <= Duration::from_secs(6), "{total:?}");
        assert!(backoff(2) <= Duration::from_millis(50));
        assert!(backoff(ATTEMPTS) >= Duration::from_millis(800));
    }

    /// Two opens of the lock file exclude each other, within one process
    /// (what the threads of one apply do) as across processes.
    #[test]
    fn the_lock_excludes_other_holders_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/smolvm.bottle-writers.lock");
        let held = lock(&path).unwrap();
        let other = OpenOptions::new().write(true).open(&path).unwrap();
        assert_eq!(
            rustix::fs::flock(&other, rustix::fs::FlockOperation::NonBlockingLockExclusive),
            Err(rustix::io::Errno::WOULDBLOCK)
        );
        drop(held);
        rustix::fs::flock(&other, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
    }
}
