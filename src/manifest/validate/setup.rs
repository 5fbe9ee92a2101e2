//! A bottle's setup steps: names, order (`after`/`before`) and inputs.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::paths::{Expect, resolve_inside};
use super::{BUILTIN_STEPS, RESERVED_STEPS, diag, list};
use crate::manifest::diagnostic::suggest;
use crate::manifest::load::Cx;
use crate::manifest::model::SetupSpec;
use crate::manifest::source::Want;
use crate::manifest::{FileId, KeyPath, names};

/// Checks setup steps; returns each step's resolved inputs.
pub(super) fn setup(
    cx: &mut Cx,
    file: FileId,
    base: &KeyPath,
    what: &str,
    steps: &[SetupSpec],
    clean: bool,
) -> Vec<Vec<PathBuf>> {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, step) in steps.iter().enumerate() {
        let path = base.clone().key("setup").index(i).key("name");
        if let Err(why) = names::check_name(&step.name) {
            cx.report(
                file,
                &path,
                Want::Value,
                diag(
                    "bottle::invalid-name",
                    format!("setup step name `{}` in {what} {why}", step.name),
                    names::RULE,
                ),
                "invalid name",
            );
        } else if RESERVED_STEPS.contains(&step.name.as_str()) {
            cx.report(
                file,
                &path,
                Want::Value,
                diag(
                    "bottle::reserved-name",
                    format!(
                        "setup step `{}` in {what} takes a built-in step's name",
                        step.name
                    ),
                    format!(
                        "built-in steps are {}: pick another name",
                        list(RESERVED_STEPS.iter().copied())
                    ),
                ),
                "built-in step name",
            );
        } else if let Some(first) = seen.insert(step.name.as_str(), i) {
            let first_span = cx.span(
                file,
                &base.clone().key("setup").index(first).key("name"),
                Want::Value,
            );
            let d = diag(
                "bottle::duplicate-step",
                format!("setup step `{}` is declared twice in {what}", step.name),
                "setup step names are unique within a bottle: rename or remove one",
            )
            .span(cx.sources, file, first_span, "first declared here");
            cx.report(file, &path, Want::Value, d, "declared again");
        }
        if step.run.trim().is_empty() {
            cx.report(
                file,
                &base.clone().key("setup").index(i).key("run"),
                Want::Value,
                diag(
                    "bottle::empty-command",
                    format!("setup step `{}` in {what} has an empty `run`", step.name),
                    "give the shell command to run as root in the guest, \
                     e.g. `run = \"apt-get install -y ripgrep\"`",
                ),
                "empty command",
            );
        }
    }

    let step_names: Vec<&str> = seen.keys().copied().collect();
    for (i, step) in steps.iter().enumerate() {
        // `after` and `before` name steps alike; each has the one built-in
        // step it cannot name (nothing follows `supervise`, nothing
        // precedes `machine`).
        let orders = [
            (
                "after",
                &step.after,
                "supervise",
                "bottle::after-supervise",
                "supervise always runs last, after every setup step, so nothing can \
              come after it: remove `supervise` from `after`",
                "supervise runs last",
            ),
            (
                "before",
                &step.before,
                "machine",
                "bottle::before-machine",
                "every step runs in the machine, after it is created: remove `machine` from `before`",
                "everything runs after the machine",
            ),
        ];
        for (key, names, forbidden, code, forbidden_help, forbidden_label) in orders {
            for (j, name) in names.iter().enumerate() {
                let path = base.clone().key("setup").index(i).key(key).index(j);
                if name == forbidden {
                    cx.report(
                        file,
                        &path,
                        Want::Value,
                        diag(
                            code,
                            format!(
                                "setup step `{}` in {what} cannot run {key} `{forbidden}`",
                                step.name
                            ),
                            forbidden_help,
                        ),
                        forbidden_label,
                    );
                } else if clean
                    && !(BUILTIN_STEPS.contains(&name.as_str()) || name == "supervise")
                    && !step_names.contains(&name.as_str())
                {
                    // (Skipped when a step was dropped for an error: it may
                    // be the one named here.)
                    let builtins = || BUILTIN_STEPS.iter().copied().filter(|s| *s != forbidden);
                    let help = match suggest(name, builtins().chain(step_names.iter().copied())) {
                        Some(s) => format!("did you mean `{s}`?"),
                        None => format!(
                            "`{key}` names built-in steps ({}) or setup steps of this bottle{}",
                            list(builtins()),
                            if step_names.len() > 1 {
                                format!(
                                    " ({})",
                                    list(step_names.iter().copied().filter(|n| *n != step.name))
                                )
                            } else {
                                String::new()
                            }
                        ),
                    };
                    cx.report(
                        file,
                        &path,
                        Want::Value,
                        diag(
                            "bottle::unknown-step",
                            format!(
                                "setup step `{}` in {what} runs {key} `{name}`, which is not a step",
                                step.name
                            ),
                            help,
                        ),
                        "no such step",
                    );
                }
            }
        }
    }

    steps
        .iter()
        .enumerate()
        .map(|(i, step)| {
            step.inputs
                .iter()
                .enumerate()
                .filter_map(|(j, input)| {
                    let path = base.clone().key("setup").index(i).key("inputs").index(j);
                    resolve_inside(cx, file, &path, input, "setup input", Expect::Any, None)
                })
                .collect()
        })
        .collect()
}
