//! Watch: reconcile whenever the manifests or the files they reference
//! change, and periodically to heal drift made inside guests.
//!
//! - Events come from notify behind a debouncer, on the manifests directory
//!   (recursively: editors save by rename, so watching single files misses
//!   saves). Only events that can change the desired state count: a
//!   `*.toml` outside hidden directories, a referenced file or directory
//!   (prompt, skill, CA certificate, setup input, a manifest's symlink
//!   target), or the existence of a referenced host path (image, volume,
//!   secret file). Swap and backup files, VCS directories, bottle's state
//!   directory and agents writing to a volume inside the manifests directory
//!   trigger nothing.
//! - Things the manifests reference outside the manifests directory (a
//!   symlinked manifest's target, local images, volumes, secret files) are
//!   watched through their parent directory, non-recursively: their content
//!   is not an input (except a symlinked manifest's), their existence is.
//!   That set is recomputed after every good load.
//! - Each batch reloads every manifest. Invalid manifests are reported and
//!   the last good desired state stays in force: nothing is created,
//!   replaced or deleted because of a half-saved file. While invalid, the
//!   manifests are also re-read every few seconds, so creating a missing
//!   host path that nothing watched yet resumes work too; and the periodic
//!   resync still repairs drift inside guests against the last good state.
//!   Diagnostics are printed again only when they change or a file event
//!   triggered the reload (a save deserves an answer).
//! - Only agents whose desired state changed are reconciled (their step
//!   hashes cover file contents, so a prompt edit touches exactly the agents
//!   using that prompt, and a bottle change every agent in that bottle).
//! - Reconciles run on one thread, so they never overlap; events that arrive
//!   during one are drained into exactly one follow-up.
//! - A manifests directory deleted and made anew (or renamed away and
//!   back) is watched again once it loads.
//! - A failed reconcile is retried (in full) with exponential backoff and
//!   jitter; agents that failed stay owed a reconcile until one succeeds.
//! - Blocked actions (replacement without `--allow-replace`, pruning without
//!   `--prune`) are reported once per change, and the steps waiting behind
//!   them are not reported as skipped on every loop.
//!
//! Modules: `inputs` decides which paths matter, `watcher` turns
//! notify's events into [`Message`]s, this module's [`run`] is the event
//! loop (debounce, timers), `reconcile` is one pass of it, and `log`
//! prints what happens.

mod inputs;
mod log;
mod reconcile;
mod watcher;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::desired::Desired;
use crate::runtime::Runtime;

pub use inputs::{WatchSet, is_ignored};
pub use log::{Logger, WATCH_FORMAT};
pub use reconcile::fingerprints;
#[cfg(test)]
use reconcile::is_missing_directory;
use reconcile::{GATE_CHECK, LoopState};
use watcher::settle_window;
pub use watcher::{FsWatcher, debouncer_tick};

/// How often invalid manifests are re-read without an event.
pub const INVALID_RECHECK: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// The manifests directory, canonical (event paths are canonical).
    pub dir: PathBuf,
    /// The project id the lock was taken for: a load that renames the
    /// project is refused.
    pub project: String,
    pub allow_replace: bool,
    pub prune: bool,
    pub parallelism: usize,
    pub debounce: Duration,
    /// `None`: no periodic resync.
    pub resync: Option<Duration>,
    pub json: bool,
    /// Paths whose changes never trigger anything (bottle's state dir).
    pub ignore: Vec<PathBuf>,
}

/// Why a reconcile runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Trigger {
    Start,
    Files(BTreeSet<PathBuf>),
    Resync,
    Retry {
        attempt: u32,
    },
    /// Invalid manifests re-read without an event.
    Recheck,
}

impl Trigger {
    fn kind(&self) -> &'static str {
        match self {
            Trigger::Start => "start",
            Trigger::Files(_) => "files",
            Trigger::Resync => "resync",
            Trigger::Retry { .. } => "retry",
            Trigger::Recheck => "recheck",
        }
    }

    fn describe(&self, dir: &Path) -> String {
        match self {
            Trigger::Start => "start".to_owned(),
            Trigger::Resync => "periodic resync".to_owned(),
            Trigger::Recheck => "re-reading invalid manifests".to_owned(),
            Trigger::Retry { attempt } => format!("retry #{attempt} after a failure"),
            Trigger::Files(paths) => {
                let names = relative_names(paths, dir);
                let more = names.len().saturating_sub(5);
                let more = if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                };
                format!(
                    "files changed: {}{more}",
                    names[..names.len().min(5)].join(", ")
                )
            }
        }
    }

    fn files(&self, dir: &Path) -> Vec<String> {
        match self {
            Trigger::Files(paths) => relative_names(paths, dir),
            _ => Vec::new(),
        }
    }

    /// Does this trigger reconcile every agent (and prune)?
    fn is_full(&self) -> bool {
        matches!(
            self,
            Trigger::Start | Trigger::Resync | Trigger::Retry { .. }
        )
    }
}

fn relative_names(paths: &BTreeSet<PathBuf>, dir: &Path) -> Vec<String> {
    paths
        .iter()
        .map(|p| match p.strip_prefix(dir) {
            Ok(rel) if rel.as_os_str().is_empty() => ".".to_owned(),
            Ok(rel) => rel.display().to_string(),
            Err(_) => p.display().to_string(),
        })
        .collect()
}

/// Messages to the reconcile loop.
pub enum Message {
    Files(Vec<PathBuf>),
    WatchError(String),
    Stop,
}

/// Exponential backoff with jitter: 800 ms doubling to 30 s.
#[derive(Debug, Clone)]
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    pub const BASE: Duration = Duration::from_millis(800);
    pub const MAX: Duration = Duration::from_secs(30);

    pub fn new() -> Self {
        Self { attempt: 0 }
    }

    /// The delay before the next retry, and the attempt number.
    pub fn next_delay(&mut self) -> (Duration, u32) {
        self.attempt += 1;
        let exp = Self::BASE.saturating_mul(1 << (self.attempt - 1).min(10));
        let capped = exp.min(Self::MAX);
        // Up to ±20% jitter, so many watchers do not retry in lockstep.
        let jitter = 0.8 + fastrand::f64() * 0.4;
        (capped.mul_f64(jitter), self.attempt)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// Loads the desired state; errors are already rendered diagnostics.
pub type Loader<'a> = dyn Fn() -> Result<Desired, miette::Report> + 'a;
/// The reconcile loop. Returns when a `Stop` message arrives (or every
/// sender is gone). `watcher`, when given, is told which directories outside
/// the manifests directory to watch after each good load.
pub fn run(
    options: &WatchOptions,
    rt: &dyn Runtime,
    load: &Loader,
    rx: Receiver<Message>,
    mut watcher: Option<&mut FsWatcher>,
) -> miette::Result<()> {
    let log = Logger::new(options.json);
    log.log(
        "watching",
        &format!(
            "watching {} (debounce {} ms, resync {})",
            options.dir.display(),
            options.debounce.as_millis(),
            match options.resync {
                Some(d) => format!("every {} s", d.as_secs()),
                None => "off".to_owned(),
            }
        ),
        json!({ "dir": options.dir, "debounce_ms": options.debounce.as_millis() as u64, "resync_seconds": options.resync.map(|d| d.as_secs()) }),
    );
    let mut state = LoopState::new(options, rt, load, &log);
    let mut next = Some(Trigger::Start);
    loop {
        if let Some(trigger) = next.take() {
            state.reconcile(trigger, watcher.as_deref_mut());
        }
        // Wait for events, a retry, the resync or a recheck, whichever
        // comes first.
        let deadline = [
            state.retry_at,
            state.resync_at,
            state.recheck_at,
            state.gate_check_at,
        ]
        .into_iter()
        .flatten()
        .min();
        let message = match deadline {
            Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        let stop = |log: &Logger| {
            log.current.store(0, Ordering::Relaxed);
            log.log("stop", "stopping", json!({}));
        };
        match message {
            Ok(Message::Stop) | Err(RecvTimeoutError::Disconnected) => {
                stop(&log);
                return Ok(());
            }
            Ok(Message::WatchError(e)) => state.watch_error(&e),
            Ok(Message::Files(paths)) => {
                // Everything that queued meanwhile joins one follow-up; so
                // do batches that arrive within a tick of each other (the
                // debouncer releases each event once it is old enough, so
                // one save can straddle two ticks).
                let mut all: BTreeSet<PathBuf> =
                    paths.into_iter().filter(|p| state.relevant(p)).collect();
                let settle = settle_window(options.debounce);
                let give_up = Instant::now() + options.debounce.max(settle * 4);
                let mut quiet_until = Instant::now() + settle;
                loop {
                    let now = Instant::now();
                    let wait = if all.is_empty() {
                        Duration::ZERO
                    } else {
                        quiet_until.min(give_up).saturating_duration_since(now)
                    };
                    match rx.recv_timeout(wait) {
                        Ok(Message::Files(more)) => {
                            let before = all.len();
                            all.extend(more.into_iter().filter(|p| state.relevant(p)));
                            if all.len() > before {
                                quiet_until = Instant::now() + settle;
                            }
                        }
                        Ok(Message::Stop) => {
                            stop(&log);
                            return Ok(());
                        }
                        Ok(Message::WatchError(e)) => state.watch_error(&e),
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => {
                            stop(&log);
                            return Ok(());
                        }
                    }
                }
                if !all.is_empty() {
                    next = Some(Trigger::Files(all));
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                if state.retry_at.is_some_and(|t| t <= now) {
                    state.retry_at = None;
                    next = Some(Trigger::Retry {
                        attempt: state.backoff.attempt,
                    });
                } else if state.resync_at.is_some_and(|t| t <= now) {
                    next = Some(Trigger::Resync);
                } else if state.recheck_at.is_some_and(|t| t <= now) {
                    state.recheck_at = None;
                    next = Some(Trigger::Recheck);
                } else if state.gate_check_at.is_some_and(|t| t <= now) {
                    state.gate_check_at = Some(now + GATE_CHECK);
                    // A gate that died is started again by a full
                    // reconcile, without waiting for the next resync.
                    if state.gate_died() {
                        next = Some(Trigger::Resync);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_and_resets() {
        let mut b = Backoff::new();
        let (first, n) = b.next_delay();
        assert_eq!(n, 1);
        assert!(
            first >= Duration::from_millis(640) && first <= Duration::from_millis(960),
            "{first:?}"
        );
        for _ in 0..20 {
            let (d, _) = b.next_delay();
            assert!(d <= Backoff::MAX.mul_f64(1.2));
        }
        let (late, _) = b.next_delay();
        assert!(late >= Backoff::MAX.mul_f64(0.8));
        b.reset();
        assert!(b.next_delay().0 <= Duration::from_millis(960));
    }

    #[test]
    fn editor_noise_is_ignored() {
        let ignore = vec![PathBuf::from("/m/.state")];
        for noisy in [
            "/m/.git/index",
            "/m/a.toml~",
            "/m/.a.toml.swp",
            "/m/.#a.toml",
            "/m/4913",
            "/m/.state/lock",
            "/m/#a.toml#",
            "/m/prompts/.a.md.swn",
            "/m/a.toml___jb_tmp___",
        ] {
            assert!(is_ignored(Path::new(noisy), &ignore), "{noisy}");
        }
        for real in [
            "/m/a.toml",
            "/m/prompts/reviewer.md",
            "/m/skills/x/SKILL.md",
        ] {
            assert!(!is_ignored(Path::new(real), &ignore), "{real}");
        }
    }

    #[test]
    fn a_missing_manifests_directory_is_told_from_other_load_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let load = |dir: &Path| miette::Report::new(crate::manifest::load_dir(dir).unwrap_err());
        assert!(is_missing_directory(&load(&tmp.path().join("gone"))));
        // An empty directory: no manifests, but the directory is there.
        assert!(!is_missing_directory(&load(tmp.path())));
        std::fs::write(tmp.path().join("a.toml"), "[agent.a]\nbottle = 1\n").unwrap();
        assert!(!is_missing_directory(&load(tmp.path())));
    }

    fn set(root: &str, inputs: &[&str], exists: &[&str]) -> WatchSet {
        WatchSet {
            root: PathBuf::from(root),
            inputs: inputs.iter().map(PathBuf::from).collect(),
            exists: exists.iter().map(PathBuf::from).collect(),
        }
    }

    #[test]
    fn inputs_their_contents_and_their_directories_are_relevant() {
        let s = set(
            "/nonexistent/m",
            &[
                "/nonexistent/m/a.toml",
                "/nonexistent/m/prompts/p.md",
                "/nonexistent/m/skills/s",
            ],
            &[],
        );
        for yes in [
            "/nonexistent/m/a.toml",
            "/nonexistent/m/prompts/p.md",
            "/nonexistent/m/prompts",
            "/nonexistent/m/skills/s/SKILL.md",
            "/nonexistent/m/new.toml",
            "/nonexistent/m/agents/b.toml",
        ] {
            assert!(s.relevant(Path::new(yes)), "{yes}");
        }
        for no in [
            "/nonexistent/m/prompts/p.md~",
            "/nonexistent/m/prompts/other.md",
            "/nonexistent/m/.hidden/x.toml",
            "/nonexistent/m/.x.toml",
            "/nonexistent/m/skills/s2",
            "/nonexistent/elsewhere/a.toml",
        ] {
            assert!(!s.relevant(Path::new(no)), "{no}");
        }
    }

    #[test]
    fn only_the_existence_of_volumes_and_images_is_relevant() {
        let s = set(
            "/nonexistent/m",
            &[],
            &["/nonexistent/m/workspace", "/nonexistent/images/root"],
        );
        assert!(s.relevant(Path::new("/nonexistent/m/workspace")));
        assert!(s.relevant(Path::new("/nonexistent/images/root")));
        assert!(s.relevant(Path::new("/nonexistent/images")));
        // An agent writing to its workspace changes nothing bottle reads.
        assert!(!s.relevant(Path::new("/nonexistent/m/workspace/src/main.rs")));
        assert!(!s.relevant(Path::new("/nonexistent/images/root/etc/passwd")));
        // ...unless it writes a manifest there: the loader reads those.
        assert!(s.relevant(Path::new("/nonexistent/m/workspace/x.toml")));
    }

    #[test]
    fn outside_paths_are_watched_through_their_nearest_existing_parent() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("m");
        std::fs::create_dir_all(root.join("prompts")).unwrap();
        std::fs::create_dir_all(tmp.path().join("vol")).unwrap();
        let s = WatchSet {
            root: root.clone(),
            inputs: vec![root.join("a.toml"), tmp.path().join("shared/b.toml")],
            exists: vec![
                root.join("workspace"),
                tmp.path().join("vol/data"),
                tmp.path().join("missing/deeper/x"),
            ],
        };
        let dirs: Vec<PathBuf> = s.outside_dirs().into_iter().collect();
        assert_eq!(dirs, vec![tmp.path().to_owned(), tmp.path().join("vol")]);
    }
}
