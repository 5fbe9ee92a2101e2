//! Where a project's gate keeps its files.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct GatePaths {
    pub dir: PathBuf,
}

impl GatePaths {
    /// `<state-dir>/gate/<project>/`.
    pub fn new(state_dir: &Path, project: &str) -> Self {
        Self {
            dir: state_dir.join("gate").join(project),
        }
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn pid(&self) -> PathBuf {
        self.dir.join("gate.pid")
    }
    pub fn lock(&self) -> PathBuf {
        self.dir.join("gate.lock")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("gate.log")
    }
    pub fn control(&self) -> PathBuf {
        self.dir.join("control.sock")
    }
    /// Ports and agent credentials chosen once (`state.json`).
    pub fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    /// Supervise requests and grants.
    pub fn grants(&self) -> PathBuf {
        self.dir.join("grants.json")
    }
    /// Bare mirrors of git remotes, one per remote (`git/<bottle>/<name>.git`).
    pub fn mirrors(&self) -> PathBuf {
        self.dir.join("git")
    }
}
