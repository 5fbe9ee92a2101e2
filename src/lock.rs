//! The advisory lock that keeps two applies (or an apply and a watch) of one
//! project from interleaving.
//!
//! An OS file lock (`flock`) on `<state-dir>/locks/<project>.lock`: the
//! kernel releases it when the holder dies, so a dead holder's lock is simply
//! taken over. The file's text names the holder for the message a second
//! caller gets.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use miette::Diagnostic;
use thiserror::Error;

#[derive(Debug, Error, Diagnostic)]
pub enum LockError {
    #[error("project `{project}` is locked by {holder}")]
    #[diagnostic(
        code(bottle::locked),
        help("wait for it to finish, or stop it; a holder that died releases the lock by itself")
    )]
    Held { project: String, holder: String },

    #[error("cannot use the lock file {}: {source}", path.display())]
    #[diagnostic(
        code("bottle::lock-io"),
        help("check that the state directory (--state-dir) is writable")
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
    /// Take the lock, waiting up to `wait` for the holder to finish.
    pub fn acquire(
        state_dir: &Path,
        project: &str,
        command: &str,
        wait: Duration,
    ) -> Result<Self, LockError> {
        let dir = state_dir.join("locks");
        let path = dir.join(format!("{project}.lock"));
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
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
}
