//! `bottle watch`: reconcile whenever the manifests change.

use std::sync::mpsc;
use std::time::Duration;

use clap::Args;
use miette::IntoDiagnostic;

use super::plan::ChangeArgs;
use super::{DirArg, GlobalArgs, Outcome, session};
use crate::lock::ProjectLock;
use crate::preflight;
use crate::watch::{self, Message, WatchOptions};

#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub dir: DirArg,

    #[command(flatten)]
    pub change: ChangeArgs,

    /// Milliseconds to wait for a burst of file events to settle before
    /// reconciling (editors write several events per save). At least 10:
    /// the debouncer polls every quarter of it.
    #[arg(long, value_name = "MS", default_value_t = 150, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub debounce: u64,

    /// Seconds between full resyncs, which repair drift made inside guests;
    /// 0 disables them.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub resync: u64,

    /// Log JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(global: &GlobalArgs, args: WatchArgs) -> miette::Result<Outcome> {
    let dir = args.dir.dir.clone();
    // The first load must succeed: there is no last good state to keep yet.
    let first = session::load(&dir)?;
    preflight::check(&first, session::runtime_kind(global))?;
    let state = session::state_dir(global)?;
    let _lock = ProjectLock::acquire(
        &session::lock_dir(global)?,
        &first.project.name,
        "watch",
        Duration::ZERO,
    )?;
    let rt = session::runtime(global)?;
    // Agents' requests to their operator, printed as they arrive.
    super::supervise::follow(
        crate::gate::paths::GatePaths::new(&state, &first.project.name),
        args.json,
    );

    let (tx, rx) = mpsc::channel();
    let stop = tx.clone();
    session::on_interrupt("stopping once the calls under way finish", move || {
        let _ = stop.send(Message::Stop);
    })?;
    let canonical = dir.canonicalize().into_diagnostic()?;
    // Bottle's own writes (lock files, the local runtime's machines) never
    // trigger anything, even with the state directory inside the manifests.
    let ignore = vec![state.canonicalize().unwrap_or(state.clone()), state];
    let mut watcher = watch::FsWatcher::start(&canonical, Duration::from_millis(args.debounce), tx)
        .map_err(|e| WatchFailed {
            dir: canonical.display().to_string(),
            error: e.to_string(),
        })?;
    let project = first.project.name.clone();
    drop(first);

    let options = WatchOptions {
        dir: canonical,
        project,
        allow_replace: args.change.allow_replace,
        prune: args.change.prune,
        parallelism: args.change.parallelism.into(),
        debounce: Duration::from_millis(args.debounce),
        resync: (args.resync > 0).then(|| Duration::from_secs(args.resync)),
        json: args.json,
        ignore,
    };
    let gate_state = session::state_dir(global)?;
    let load = || -> miette::Result<crate::desired::Desired> {
        let mut desired = session::load(&dir)?;
        preflight::check(&desired, session::runtime_kind(global))?;
        // Each resync observes the gate too: one that died is started again.
        desired.attach_gate(&gate_state, session::runtime_kind(global))?;
        Ok(desired)
    };
    watch::run(&options, rt.as_ref(), &load, rx, Some(&mut watcher))?;
    Ok(Outcome::Success)
}

#[derive(Debug, thiserror::Error, miette::Diagnostic)]
#[error("cannot watch {dir}: {error}")]
#[diagnostic(
    code("bottle::watch-failed"),
    help(
        "check that the directory is readable; on Linux, a large tree can exceed the inotify watch limit (raise fs.inotify.max_user_watches)"
    )
)]
struct WatchFailed {
    dir: String,
    error: String,
}
