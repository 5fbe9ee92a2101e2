//! The advisory lock that keeps two applies (or an apply and a watch) of one
//! project from interleaving.
//!
//! An OS file lock (`flock`) on `<dir>/<project>.lock`, where `<dir>` lies
//! beside the machines it guards ([`lock_dir`]): smolvm's data directory for
//! smolvm, so two bottle processes with different state directories (another
//! `HOME`'s bottle state, CI) driving the same machines still exclude each
//! other. The kernel releases it when the holder dies, so a dead holder's
//! lock is simply taken over. The file's text names the holder for the
//! message a second caller gets.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use miette::Diagnostic;
use thiserror::Error;

use crate::runtime::RuntimeKind;

/// The directory holding project locks, beside the runtime's machine store
/// (`env` reads the environment bottle runs the runtime with):
///
/// - local runtime: its machines live in the state directory, and so does
///   the lock (`<state-dir>/locks`);
/// - smolvm: `bottle-locks/` in smolvm's data directory, found as smolvm
///   finds it (`$SMOLVM_DATA_DIR/.local/share/smolvm`,
///   `$XDG_DATA_HOME/smolvm`, `~/.local/share/smolvm`), whatever bottle's
///   state directory is. The smolvm double keeps its machines in
///   `$SMOLVM_DOUBLE_HOME`, so its lock lives there.
pub fn lock_dir(
    runtime: RuntimeKind,
    state_dir: &Path,
    env: &dyn Fn(&str) -> Option<OsString>,
) -> PathBuf {
    let var = |name: &str| env(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    let store = match runtime {
        RuntimeKind::Local => None,
        RuntimeKind::Smolvm => var("SMOLVM_DOUBLE_HOME")
            .or_else(|| var("SMOLVM_DATA_DIR").map(|d| d.join(".local/share/smolvm")))
            .or_else(|| var("XDG_DATA_HOME").map(|d| d.join("smolvm")))
            .or_else(|| var("HOME").map(|d| d.join(".local/share/smolvm"))),
    };
    match store {
        Some(store) => store.join("bottle-locks"),
        None => state_dir.join("locks"),
    }
}

#[derive(Debug, Error, Diagnostic)]
pub enum LockError {
    #[error("project `{project}` is locked by {holder}")]
    #[diagnostic(
        code(bottle::locked),
        help(
            "wait for it to finish (`--lock-wait SECONDS` waits that long), or stop it; \
             a holder that died releases the lock by itself"
        )
    )]
    Held { project: String, holder: String },

    #[error("cannot use the lock file {}: {source}", path.display())]
    #[diagnostic(
        code("bottle::lock-io"),
        help("check that this directory is writable by the user bottle runs as")
    )]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A held lock; released on drop.
#[derive(Debug)]
pub struct ProjectLock {
    file: File,
}

impl ProjectLock {
    /// Take the lock in `dir` (see [`lock_dir`]), waiting up to `wait` for
    /// the holder to finish.
    pub fn acquire(
        dir: &Path,
        project: &str,
        command: &str,
        wait: Duration,
    ) -> Result<Self, LockError> {
        let path = dir.join(format!("{project}.lock"));
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let deadline = Instant::now() + wait;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) => {
                    if Instant::now() >= deadline {
                        let mut holder = String::new();
                        let _ = file.read_to_string(&mut holder);
                        let holder = holder.trim();
                        return Err(LockError::Held {
                            project: project.to_owned(),
                            holder: if holder.is_empty() {
                                "another bottle process".to_owned()
                            } else {
                                holder.to_owned()
                            },
                        });
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
            }
        }
        let holder = format!(
            "`bottle {command}` (pid {}) since {}",
            std::process::id(),
            crate::time::rfc3339(std::time::SystemTime::now())
        );
        file.set_len(0)
            .and_then(|_| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(holder.as_bytes()))
            .map_err(io)?;
        Ok(Self { file })
    }
}

impl Drop for ProjectLock {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_named() {
        let dir = tempfile::tempdir().unwrap();
        let first = ProjectLock::acquire(dir.path(), "p", "apply", Duration::ZERO).unwrap();
        let err = ProjectLock::acquire(dir.path(), "p", "apply", Duration::ZERO).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        drop(first);
        ProjectLock::acquire(dir.path(), "p", "apply", Duration::ZERO).expect("released on drop");
    }

    #[test]
    fn other_projects_are_not_blocked() {
        let dir = tempfile::tempdir().unwrap();
        let _a = ProjectLock::acquire(dir.path(), "a", "apply", Duration::ZERO).unwrap();
        ProjectLock::acquire(dir.path(), "b", "apply", Duration::ZERO).unwrap();
    }

    #[test]
    fn smolvm_locks_live_with_smolvms_machines_not_with_the_state_dir() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        let home = env(&[("HOME", "/home/u")]);
        let a = lock_dir(RuntimeKind::Smolvm, Path::new("/a/state"), &home);
        let b = lock_dir(RuntimeKind::Smolvm, Path::new("/b/state"), &home);
        assert_eq!(a, b, "two state directories, one lock");
        assert_eq!(a, Path::new("/home/u/.local/share/smolvm/bottle-locks"));
        let data = env(&[("HOME", "/home/u"), ("SMOLVM_DATA_DIR", "/d")]);
        assert_eq!(
            lock_dir(RuntimeKind::Smolvm, Path::new("/s"), &data),
            Path::new("/d/.local/share/smolvm/bottle-locks")
        );
        let xdg = env(&[("HOME", "/home/u"), ("XDG_DATA_HOME", "/x")]);
        assert_eq!(
            lock_dir(RuntimeKind::Smolvm, Path::new("/s"), &xdg),
            Path::new("/x/smolvm/bottle-locks")
        );
        // The local runtime keeps its machines in the state directory.
        assert_eq!(
            lock_dir(RuntimeKind::Local, Path::new("/s"), &home),
            Path::new("/s/locks")
        );
    }
}
