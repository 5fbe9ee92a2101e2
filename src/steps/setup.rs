//! Setup steps: the user's own commands, run as root with `sh -c`, again
//! whenever their command or inputs change. Their effects cannot be probed
//! or undone: removing a setup step only forgets it.

use std::time::Duration;

use super::{AgentCtx, GuestUser, StepResult, run_script, run_script_as, stage_tree};
use crate::graph::StepKind;
use crate::ledger::LedgerEntry;
use crate::runtime::Runtime;

/// How long a setup command may run.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Runs the command `$2` in its inputs directory `$1`, with fd 9 (the
/// step's guest lock) closed: a daemon the command starts must not hold the
/// lock once the step is over.
const RUN: &str = "mkdir -p \"$1\" && cd \"$1\" && sh -c \"$2\" 9>&-";

pub fn inputs_dir(name: &str) -> String {
    format!("/opt/bottle/setup/{name}")
}

pub fn apply(
    ctx: &AgentCtx,
    name: &str,
    rt: &dyn Runtime,
    entry: &mut LedgerEntry,
) -> StepResult<Vec<String>> {
    let index = ctx
        .bottle
        .spec
        .setup
        .iter()
        .position(|s| s.name == name)
        .expect("setup steps in the graph are declared");
    let step = &ctx.bottle.spec.setup[index];
    let dir = inputs_dir(name);
    let inputs = ctx
        .bottle
        .setup_inputs
        .get(index)
        .cloned()
        .unwrap_or_default();
    if !inputs.is_empty() {
        let root = GuestUser { uid: 0, gid: 0 };
        let staged = stage_tree(rt, ctx.machine, &inputs, root)?;
        run_script(
            rt,
            ctx.machine,
            &entry.step,
            "unpacking setup inputs",
            "rm -rf \"$2\" && mkdir -p \"$2\" && tar -xf \"$1\" -C \"$2\" && rm -f \"$1\"",
            &[&staged, &dir],
            "the image needs `tar`",
        )?;
    }
    run_script_as(
        rt,
        ctx.machine,
        &entry.step,
        None,
        &format!("setup step `{name}`"),
        RUN,
        &[&dir, &step.run],
        &format!(
            "fix the command of [[bottle.{}.setup]] `{name}`; it runs as root with sh -c",
            ctx.bottle.name
        ),
        SETUP_TIMEOUT,
    )?;
    entry.paths = vec![dir];
    Ok(Vec::new())
}

pub fn undo(name: &str, ctx: &AgentCtx, rt: &dyn Runtime) -> StepResult<()> {
    run_script(
        rt,
        ctx.machine,
        &StepKind::Setup(name.to_owned()).id(),
        "removing setup inputs",
        "rm -rf \"$1\"",
        &[&inputs_dir(name)],
        "check the guest's /opt/bottle",
    )?;
    Ok(())
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
