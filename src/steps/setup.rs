//! Setup steps: the user's own commands, run as root with `sh -c`, again
//! whenever their command or inputs change. Their effects cannot be probed
//! or undone: removing a setup step only forgets it.

use std::time::Duration;

use super::{AgentCtx, GuestUser, StepResult, run_script, run_script_as, stage_tree};
use crate::ledger::LedgerEntry;
use crate::runtime::Runtime;

/// How long a setup command may run.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(30 * 60);

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
            "unpacking setup inputs",
            "rm -rf \"$2\" && mkdir -p \"$2\" && tar -xf \"$1\" -C \"$2\" && rm -f \"$1\"",
            &[&staged, &dir],
            "the image needs `tar`",
        )?;
    }
    run_script_as(
        rt,
        ctx.machine,
        None,
        &format!("setup step `{name}`"),
        "mkdir -p \"$1\" && cd \"$1\" && sh -c \"$2\"",
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
        "removing setup inputs",
        "rm -rf \"$1\"",
        &[&inputs_dir(name)],
        "check the guest's /opt/bottle",
    )?;
    Ok(())
}
