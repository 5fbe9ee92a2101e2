//! notify behind a debouncer: the manifests directory and the directories
//! outside it that hold what the manifests reference.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::time::Duration;

use notify::{EventKind, RecommendedWatcher, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};

use super::Message;

/// How often the debouncer looks for events old enough to release: a
/// quarter of the debounce (its default; at least 5 ms). The debouncer
/// wakes up that often even when idle, which is most of a watch's idle CPU
/// (benches/watch.rs: 0.13% of a core at the default 150 ms; an eighth of
/// the debounce measured 0.43%, for 20 ms less latency).
pub fn debouncer_tick(debounce: Duration) -> Duration {
    (debounce / 4).max(Duration::from_millis(5)).min(debounce)
}

/// How long the loop waits after a batch for the rest of the same save.
pub(super) fn settle_window(debounce: Duration) -> Duration {
    debouncer_tick(debounce) + Duration::from_millis(5)
}

/// notify behind a debouncer: the manifests directory recursively, plus
/// directories outside it non-recursively (see [`WatchSet::outside_dirs`]).
/// Dropping it stops watching.
pub struct FsWatcher {
    debouncer: Debouncer<RecommendedWatcher, RecommendedCache>,
    root: PathBuf,
    /// Device and inode of the directory the root watch is on.
    root_id: Option<(u64, u64)>,
    /// The root itself was removed, moved or created (or events were lost)
    /// since it was last watched: watch it again at the next good load.
    /// Set by the event callback before it sends the batch, so the reload
    /// that batch triggers sees it.
    root_stale: Arc<AtomicBool>,
    outside: BTreeSet<PathBuf>,
}

/// Is this event about the watched root itself (not something inside it)
/// being removed, moved, or created (seen from a watched parent)?
fn touches_root_itself(event: &notify::Event, root: &Path) -> bool {
    use notify::event::ModifyKind;
    matches!(
        event.kind,
        EventKind::Remove(_) | EventKind::Create(_) | EventKind::Modify(ModifyKind::Name(_))
    ) && event.paths.iter().any(|p| p == root)
}

/// Device and inode of a directory, to tell when it was made anew.
fn dir_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl FsWatcher {
    /// Watch `root` (canonical); events go to `tx` as [`Message`]s.
    pub fn start(root: &Path, debounce: Duration, tx: Sender<Message>) -> notify::Result<Self> {
        let rescan_root = root.to_owned();
        let root_stale = Arc::new(AtomicBool::new(false));
        let stale = root_stale.clone();
        let tick = debouncer_tick(debounce);
        let mut debouncer =
            new_debouncer(debounce, Some(tick), move |result: DebounceEventResult| {
                let message = match result {
                    Ok(events) => {
                        let mut paths = Vec::new();
                        for event in events {
                            if event.need_rescan() {
                                // Events were lost (queue overflow): reload,
                                // and do not trust the root watch either.
                                paths.push(rescan_root.clone());
                                stale.store(true, Ordering::SeqCst);
                            }
                            if touches_root_itself(&event.event, &rescan_root) {
                                stale.store(true, Ordering::SeqCst);
                            }
                            // Reading files (bottle's own reloads and copies
                            // included) produces access events: only changes
                            // count.
                            if !matches!(event.event.kind, EventKind::Access(_)) {
                                paths.extend(event.event.paths);
                            }
                        }
                        if paths.is_empty() {
                            return;
                        }
                        Message::Files(paths)
                    }
                    Err(errors) => Message::WatchError(
                        errors
                            .iter()
                            .map(|e| e.to_string())
                            .collect::<Vec<_>>()
                            .join("; "),
                    ),
                };
                let _ = tx.send(message);
            })?;
        debouncer.watch(root, RecursiveMode::Recursive)?;
        Ok(Self {
            debouncer,
            root: root.to_owned(),
            root_id: dir_id(root),
            root_stale,
            outside: BTreeSet::new(),
        })
    }

    /// The manifests directory was found missing: whatever comes back at
    /// its path must be watched anew.
    pub fn mark_root_stale(&self) {
        self.root_stale.store(true, Ordering::SeqCst);
    }

    /// Watch the manifests directory again if it may not be the directory
    /// the watch was set on (deleted and made anew, or put back by a
    /// rename): the old watch went with the old directory. The inode alone
    /// cannot tell: ext4 gives `rm -rf m && mkdir m` the same number back,
    /// so a removal seen (by an event, or a load that found no directory)
    /// forces it. Returns what failed.
    pub fn follow_root(&mut self) -> Option<String> {
        let now = dir_id(&self.root);
        // Still missing: leave the mark for the load that finds it back.
        now?;
        let stale = self.root_stale.swap(false, Ordering::SeqCst);
        if !stale && now == self.root_id {
            return None;
        }
        // Fails when notify already dropped the watch of a deleted root.
        let _ = self.debouncer.unwatch(&self.root);
        self.root_id = now;
        self.debouncer
            .watch(&self.root, RecursiveMode::Recursive)
            .err()
            .map(|e| format!("cannot watch {}: {e}", self.root.display()))
    }

    /// Watch exactly these outside directories (non-recursively) from now
    /// on. Returns one message per directory that could not be watched.
    pub fn set_outside(&mut self, dirs: BTreeSet<PathBuf>) -> Vec<String> {
        let mut errors = Vec::new();
        let gone: Vec<PathBuf> = self.outside.difference(&dirs).cloned().collect();
        for dir in gone {
            // Unwatching an ancestor of the manifests directory would drop
            // the debouncer's bookkeeping for it too: keep those.
            if self.root.starts_with(&dir) {
                continue;
            }
            // A deleted directory is no longer watched anyway.
            let _ = self.debouncer.unwatch(&dir);
            self.outside.remove(&dir);
        }
        for dir in dirs {
            if self.outside.contains(&dir) {
                continue;
            }
            match self.debouncer.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.outside.insert(dir);
                }
                Err(e) => errors.push(format!("cannot watch {}: {e}", dir.display())),
            }
        }
        errors
    }

    /// The outside directories watched now.
    pub fn outside(&self) -> &BTreeSet<PathBuf> {
        &self.outside
    }
}
