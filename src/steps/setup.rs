//! Setup steps: the user's own commands, run as root with `sh -c`, again
//! whenever their command or inputs change. Their effects cannot be probed
//! or undone: removing a setup step only forgets it.
//!
//! Their inputs are root's from the moment they land: packed with owner
//! root and without group or other write bits, unpacked by root in the
//! transaction's root-only directory, then moved into place. The agent
//! user can never rewrite what root then runs.

use std::time::Duration;

use super::{AgentCtx, Payload, Step, StepCx, StepResult, Work, tar_paths};
use crate::ledger::LedgerEntry;

pub struct SetupStep(pub String);

/// How long a setup command may run.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Where setup inputs live.
const SETUP_DIR: &str = "/opt/bottle/setup";

/// Runs the command `$2` in its inputs directory `$1`, with fds 8 and 9
/// (the transaction's and the step's locks) closed: a daemon the command
/// starts must not hold a lock once the step is over.
const RUN: &str = "mkdir -p \"$1\" && cd \"$1\" && sh -c \"$2\" 8>&- 9>&-";

/// Root, in the payload directory: the inputs (when there are any) go from
/// the root-only payload to their directory, then the command runs.
const APPLY: &str = r#"set -e
(umask 022 && mkdir -p /opt/bottle/setup) && chmod 755 /opt/bottle /opt/bottle/setup
rm -rf "$1"
if [ -f inputs.tar ]; then
  mkdir inputs && tar -xpof inputs.tar -C inputs && chmod 755 inputs && mv inputs "$1"
fi
set +e
"#;

pub fn inputs_dir(name: &str) -> String {
    format!("{SETUP_DIR}/{name}")
}

impl Step for SetupStep {
    fn noun(&self) -> String {
        format!("setup step `{}`", self.0)
    }

    fn probe(&self, _ctx: &AgentCtx) -> Option<String> {
        None
    }

    fn drift_path(&self, _ctx: &AgentCtx) -> String {
        inputs_dir(&self.0)
    }

    fn apply(&self, cx: &StepCx, entry: &mut LedgerEntry) -> StepResult<Work> {
        let ctx = cx.ctx;
        let name = &self.0;
        let index = ctx
            .bottle
            .spec
            .setup
            .iter()
            .position(|s| &s.name == name)
            .expect("setup steps in the graph are declared");
        let step = &ctx.bottle.spec.setup[index];
        let dir = inputs_dir(name);
        let inputs = ctx
            .bottle
            .setup_inputs
            .get(index)
            .cloned()
            .unwrap_or_default();
        let mut work = Work::new(
            &format!("setup step `{name}`"),
            &format!(
                "fix the command of [[bottle.{}.setup]] `{name}`; it runs as root with sh -c",
                ctx.bottle.name
            ),
            format!("{APPLY}{RUN}"),
        )
        .args([dir.clone(), step.run.clone()]);
        if !inputs.is_empty() {
            // No group or other write bit: only root may change them.
            let archive = tar_paths(inputs.iter().map(|p| p.as_path()), 0o022)?;
            work = work.file(Payload::new("inputs.tar", archive, 0o600));
        }
        work.timeout = SETUP_TIMEOUT;
        entry.paths = vec![dir];
        Ok(work)
    }

    fn undo(&self, _cx: &StepCx, _entry: &LedgerEntry) -> StepResult<Work> {
        Ok(Work::new(
            "removing setup inputs",
            "check the guest's /opt/bottle",
            "rm -rf \"$1\"",
        )
        .args([inputs_dir(&self.0)]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steps::locked_script;
    use crate::steps::tests::{daemon_of, is_free, output, sh, text};

    #[test]
    fn a_setup_command_does_not_inherit_the_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let locks = tmp.path().join("locks").to_str().unwrap().to_owned();
        let inputs = tmp.path().join("inputs").to_str().unwrap().to_owned();
        let command = "pwd; if [ -e /proc/$$/fd/9 ]; then echo fd9 open; else echo fd9 closed; fi; \
                       sleep 60 >/dev/null 2>&1 & echo \"daemon $!\"";
        let out = output(sh(
            &locked_script(&locks, "setup:daemon", 5, RUN),
            &[&inputs, command],
        ));
        assert!(out.status.success(), "{}", text(&out.stderr));
        let _daemon = daemon_of(&text(&out.stdout));
        assert!(
            text(&out.stdout).starts_with(&format!("{inputs}\nfd9 closed\n")),
            "{out:?}"
        );
        assert!(
            is_free(&locks, "setup:daemon"),
            "the command's daemon holds the lock"
        );
    }
}
