//! What a watch prints: one line per event, as text or JSON.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use serde_json::json;

use crate::apply::{ActionReport, Outcome as ActionOutcome, Progress};
use crate::plan::Action;

/// The `format_version` of `watch --json` lines.
pub const WATCH_FORMAT: u32 = 1;

/// One line per event, as text with a timestamp or as a JSON object. Every
/// JSON line carries `format_version`, `ts`, `event`, `message` and, inside
/// a reconcile, its number as `reconcile`.
pub struct Logger {
    pub json: bool,
    /// The reconcile in progress (0 before the first).
    pub(super) current: AtomicU64,
}

impl Logger {
    pub fn new(json: bool) -> Self {
        Self {
            json,
            current: AtomicU64::new(0),
        }
    }

    pub fn log(&self, event: &str, message: &str, fields: serde_json::Value) {
        let ts = crate::time::rfc3339(SystemTime::now());
        if self.json {
            let mut obj = json!({ "format_version": WATCH_FORMAT, "ts": ts, "event": event, "message": message.trim_start() });
            let n = self.current.load(Ordering::Relaxed);
            if let Some(o) = obj.as_object_mut() {
                if n > 0 {
                    o.insert("reconcile".into(), n.into());
                }
                if let serde_json::Value::Object(extra) = fields {
                    o.extend(extra);
                }
            }
            println!("{obj}");
        } else {
            println!("{ts} {message}");
        }
    }

    fn action(&self, report: &ActionReport) {
        let a = &report.action;
        let who = a.agent.as_deref().unwrap_or(&a.machine);
        let (status, detail) = match &report.outcome {
            ActionOutcome::Done { seconds } => ("done", format!("{seconds:.2}s")),
            ActionOutcome::Failed { seconds, error } => {
                ("failed", format!("{seconds:.2}s: {error}"))
            }
            ActionOutcome::Skipped { reason } => ("skipped", reason.clone()),
            // Blocked actions are reported once per change by the loop.
            ActionOutcome::Blocked { .. } => return,
        };
        self.log(
            "action",
            &format!(
                "  {status} {who}: {} {} ({}) [{detail}]",
                a.op.verb(),
                a.op.step(),
                a.cause
            ),
            json!({ "agent": a.agent, "machine": a.machine, "action": a.op.verb(), "step": a.op.step(), "cause": a.cause, "status": status, "detail": detail }),
        );
    }
}

/// The progress of one reconcile: every action that ran, one line each;
/// not the ones held behind a blocked action (reported once, by the loop).
pub(super) struct ReconcileProgress<'a> {
    pub(super) log: &'a Logger,
    pub(super) held: HashSet<usize>,
}

impl Progress for ReconcileProgress<'_> {
    fn started(&self, _action: &Action, _running: usize, _total: usize) {}

    fn finished(&self, report: &ActionReport, _finished: usize, _total: usize) {
        let held = self.held.contains(&report.action.id)
            && matches!(
                report.outcome,
                ActionOutcome::Skipped { .. } | ActionOutcome::Blocked { .. }
            );
        if !held {
            self.log.action(report);
        }
    }
}
