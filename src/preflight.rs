//! Checks that need the environment bottle runs in, made before anything
//! touches a machine: what the chosen runtime cannot do, and secrets whose
//! source is missing on this host. Problems are manifest diagnostics (they
//! point at the key that asks for the impossible); things the user accepted
//! are notes shown with the plan.
//!
//! Secrets are read when a machine starts (as smolvm does at each launch),
//! so a missing one only stops a plan that starts machines of its bottle:
//! everything else, `plan`, `check` and `status` included, needs none.

use std::collections::BTreeSet;

use crate::desired::Desired;
use crate::manifest::{Bottle, Diagnostics, Image, KeyPath, ManifestDiagnostic, Project};
use crate::plan::{Op, Plan};
use crate::runtime::RuntimeKind;

/// What the runtime cannot do (an error) or does with the user's consent (a
/// note), and secrets missing on this host (a note); returns the notes, or
/// every problem.
pub fn check(desired: &Desired, runtime: RuntimeKind) -> Result<Vec<String>, Diagnostics> {
    check_with(desired, runtime, true)
}

/// What `validate` checks for the chosen runtime: everything [`check`]
/// refuses, with the notes that do not depend on this host's secrets.
pub fn runtime_check(desired: &Desired, runtime: RuntimeKind) -> Result<Vec<String>, Diagnostics> {
    check_with(desired, runtime, false)
}

/// [`runtime_check`] on the bottles of `project` that its agents use, as
/// notes and problems: for `validate`, also on the part of a directory
/// with other problems that loaded cleanly
/// ([`crate::manifest::load_dir_partial`]).
pub fn runtime_problems(
    project: &Project,
    runtime: RuntimeKind,
) -> (Vec<String>, Vec<ManifestDiagnostic>) {
    project_check(project, runtime, false)
}

fn check_with(
    desired: &Desired,
    runtime: RuntimeKind,
    secrets: bool,
) -> Result<Vec<String>, Diagnostics> {
    let project = &desired.project;
    let (notes, problems) = project_check(project, runtime, secrets);
    if problems.is_empty() {
        Ok(notes)
    } else {
        Err(Diagnostics {
            dir: project.dir.display().to_string(),
            items: problems,
        })
    }
}

fn project_check(
    project: &Project,
    runtime: RuntimeKind,
    secrets: bool,
) -> (Vec<String>, Vec<ManifestDiagnostic>) {
    let mut notes = Vec::new();
    let mut problems = Vec::new();
    let used: BTreeSet<&str> = project
        .agents
        .values()
        .map(|a| a.spec.bottle.as_str())
        .collect();
    for bottle in project
        .bottles
        .values()
        .filter(|b| used.contains(b.name.as_str()))
    {
        let at = KeyPath::new().key("bottle").key(&bottle.name);
        if runtime == RuntimeKind::Local
            && matches!(bottle.image, Image::Reference(_) | Image::Archive(_))
        {
            problems.push(
                ManifestDiagnostic::new(
                    "bottle::local-image",
                    format!("the local runtime cannot run the image of bottle `{}`", bottle.name),
                )
                .value(&project.sources, bottle.file, &at.clone().key("image"), "an image only smolvm can run")
                .help(
                    "the local runtime runs the host's system directories (`image = \"host\"`, the default) \
                     or an unpacked root filesystem directory: use one of those, or --runtime smolvm",
                ),
            );
        }
        if runtime == RuntimeKind::Smolvm && matches!(bottle.image, Image::Reference(_)) {
            // smolvm pulls an OCI image at start, from inside the machine and
            // under its egress policy, which bottle makes CIDRs only: the
            // gate's address (100.96.0.1/32) for a gated bottle, plus
            // `allow_cidrs`. Host names are the gate's, and the gate is no
            // registry mirror: only `allow_cidrs` can let a pull through.
            let cidrs = bottle
                .spec
                .egress
                .as_ref()
                .map_or(0, |e| e.allow_cidrs.len());
            if cidrs == 0 {
                problems.push(
                    ManifestDiagnostic::new(
                        "bottle::image-needs-network",
                        format!(
                            "bottle `{}` runs an OCI image that its machines cannot pull: smolvm pulls it \
                             from inside the machine, which reaches only {}",
                            bottle.name,
                            if crate::gate::reconcile::has_gate(&bottle.spec) {
                                "its gate"
                            } else {
                                "nothing (no egress)"
                            }
                        ),
                    )
                    .value(&project.sources, bottle.file, &at.clone().key("image"), "pulled from a registry")
                    .help(
                        "use a local image: an unpacked root filesystem directory, or a `docker save` \
                         archive (`docker save IMAGE -o agent.tar`, then `image = \"./agent.tar\"`); or \
                         list the registry's addresses (and its CDN's) in `egress.allow_cidrs`",
                    ),
                );
            } else {
                notes.push(format!(
                    "bottle `{}`: smolvm pulls its image at start through `egress.allow_cidrs` only \
                     (not through the gate): they must cover the registry and its CDN",
                    bottle.name
                ));
            }
        }
        // The local runtime enforces the gate (the guest's network holds
        // only it) but cannot filter networks: `allow_cidrs`, or a bottle
        // with a network and no gate, needs the host's network unfiltered.
        let unfilterable = bottle.spec.egress.as_ref().is_some_and(|e| {
            !e.allow_cidrs.is_empty() || !crate::gate::reconcile::has_gate(&bottle.spec)
        });
        if runtime == RuntimeKind::Local && unfilterable {
            if bottle
                .spec
                .local
                .as_ref()
                .is_some_and(|l| l.allow_unfiltered_network)
            {
                notes.push(format!(
                    "bottle `{}`: the local runtime cannot filter `allow_cidrs`; its guests get the host's network, unfiltered",
                    bottle.name
                ));
            } else {
                problems.push(
                    ManifestDiagnostic::new(
                        "bottle::local-egress",
                        format!("the local runtime cannot filter the networks of bottle `{}`", bottle.name),
                    )
                    .key(&project.sources, bottle.file, &at.clone().key("egress"), "networks the local runtime cannot filter")
                    .help(format!(
                        "use --runtime smolvm, or accept the host's network unfiltered with `[bottle.{}.local] allow_unfiltered_network = true`",
                        bottle.name
                    )),
                );
            }
        }
        for missing in missing_secrets(bottle).into_iter().filter(|_| secrets) {
            notes.push(format!(
                "secret `{}` of bottle `{}`: {} (its machines cannot start until then: {})",
                missing.name, bottle.name, missing.what, missing.help
            ));
        }
        for missing in missing_sources(bottle, true)
            .into_iter()
            .filter(|_| secrets)
        {
            notes.push(format!(
                "secret `{}` of bottle `{}`: {} (the gate goes on without it, keeping a value it \
                 already holds; the bottle's machines cannot start until then: {})",
                missing.name, bottle.name, missing.what, missing.help
            ));
        }
    }
    (notes, problems)
}

/// The actions of `plan` that start a machine (and would read its
/// secrets), with the bottle of that machine.
fn launches<'a>(desired: &'a Desired, plan: &Plan) -> Vec<(usize, &'a Bottle)> {
    let project = &desired.project;
    plan.actions
        .iter()
        .filter(|a| a.blocked.is_none())
        .filter(|a| {
            matches!(
                a.op,
                Op::Create | Op::Replace | Op::Start { .. } | Op::Restart { .. }
            )
        })
        .filter_map(|a| {
            let agent = project.agents.get(a.agent.as_ref()?)?;
            Some((a.id, project.bottles.get(&agent.spec.bottle)?))
        })
        .collect()
}

/// Who waits for a missing secret, for the blocked action's reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// `plan`, `apply`, `check`: run again once it is there.
    Command,
    /// A watch: its own environment never changes.
    Watch,
}

/// Block the actions that start a machine whose bottle has a secret
/// missing on this host: only those (and the actions after them) wait for
/// it, every other bottle's changes go ahead. A start that went ahead
/// would fail half-way (after a restart's stop, or a replacement's delete).
pub fn hold_launches_without_secrets(desired: &Desired, plan: &mut Plan, waiting: Waiting) {
    for (id, bottle) in launches(desired, plan) {
        // The machines' own, then the gate's (a secret with `hosts`): an
        // agent whose requests would carry a placeholder the gate cannot
        // replace waits for it as well.
        let missing = missing_secrets(bottle)
            .into_iter()
            .chain(missing_sources(bottle, true))
            .next();
        if let Some(missing) = missing {
            let then = match (waiting, missing.from_env) {
                (Waiting::Command, _) => {
                    "provide it and run `bottle apply` again (other agents are applied \
                     meanwhile; `--target AGENT` limits a run to some)"
                }
                // A watch's own environment never changes: a variable
                // needs a restart of the watch, a file only needs to appear.
                (Waiting::Watch, true) => "export it and restart `bottle watch`",
                (Waiting::Watch, false) => "it runs once the file is there",
            };
            plan.actions[id].blocked = Some(format!(
                "secret `{}` of bottle `{}`: {}, so the machine could not start; {then}",
                missing.name, bottle.name, missing.what
            ));
        }
    }
}

struct MissingSecret {
    name: String,
    what: String,
    help: String,
    /// A host environment variable (not a file).
    from_env: bool,
}

/// The secrets of `bottle` whose source cannot be read on this host now,
/// among those its machines read (a secret with `hosts` is the gate's).
fn missing_secrets(bottle: &Bottle) -> Vec<MissingSecret> {
    missing_sources(bottle, false)
}

/// The secrets whose source cannot be read now, among the gate's (`gate`)
/// or the machines'.
fn missing_sources(bottle: &Bottle, gate: bool) -> Vec<MissingSecret> {
    let mut out = Vec::new();
    for (name, reference) in &bottle.spec.secrets {
        if crate::gate::reconcile::is_gated_secret(reference) != gate {
            continue;
        }
        let (what, help) = match (&reference.from_env, &reference.from_file) {
            // A `from_env` that does not look like a variable name may be
            // a value pasted in its place: never printed.
            (Some(var), _)
                if std::env::var_os(var).is_none()
                    && !crate::manifest::load::conventional_env_name(var) =>
            {
                (
                    "the host environment variable its `from_env` names is not set (the name is \
                     not shown: it does not look like a variable name)"
                        .to_owned(),
                    "if a value was pasted into `from_env`, rotate it and name the variable that \
                     holds it instead, e.g. `from_env = \"GITHUB_TOKEN\"`"
                        .to_owned(),
                )
            }
            (Some(var), _) if std::env::var_os(var).is_none() => (
                format!("host environment variable `{var}` is not set"),
                format!(
                    "export {var} in the environment bottle runs in; its value is read when a machine starts and never stored"
                ),
            ),
            // Read by smolvm's rules, never blocking: a FIFO here would
            // hang every command (and `apply` holding the lock).
            (None, Some(file)) => match crate::secrets::read_secret_file(file.as_ref()) {
                Ok(_) => continue,
                Err(e) => (format!("host file `{file}` {e}"), e.help(file)),
            },
            _ => continue,
        };
        out.push(MissingSecret {
            name: name.clone(),
            what,
            help,
            from_env: reference.from_env.is_some(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(bottle_extra: &str) -> Desired {
        let tmp = tempfile::tempdir().unwrap();
        let m = tmp.path().join("m");
        std::fs::create_dir_all(&m).unwrap();
        std::fs::write(
            m.join("bottle.toml"),
            format!("[project]\nname = \"p\"\n[bottle.dev]\n{bottle_extra}\n[agent.a]\nbottle = \"dev\"\n"),
        )
        .unwrap();
        let project = crate::manifest::load_dir(&m).unwrap();
        let graph = crate::graph::build(&project).unwrap();
        Desired::new(project, &graph)
    }

    const EGRESS: &str = "[bottle.dev.egress]\nallow_cidrs = [\"10.8.0.0/16\"]\n";
    const GATED: &str = "[bottle.dev.egress]\nallow_hosts = [\"example.com\"]\n";
    const SECRET: &str =
        "secrets = { TOKEN = { from_env = \"BOTTLE_PREFLIGHT_TEST_NEVER_SET\" } }\n";

    #[test]
    fn the_local_runtime_refuses_egress_it_cannot_enforce() {
        let d = desired(EGRESS);
        let err = check(&d, RuntimeKind::Local).unwrap_err();
        assert_eq!(err.items[0].code, "bottle::local-egress");
        assert_eq!(
            check(&d, RuntimeKind::Smolvm).unwrap(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn the_local_runtime_enforces_a_gate_without_networks() {
        let d = desired(GATED);
        assert_eq!(check(&d, RuntimeKind::Local).unwrap(), Vec::<String>::new());
        let d = desired(&format!("{GATED}allow_cidrs = [\"10.8.0.0/16\"]\n"));
        let err = check(&d, RuntimeKind::Local).unwrap_err();
        assert_eq!(err.items[0].code, "bottle::local-egress");
    }

    #[test]
    fn the_local_runtime_refuses_an_image_it_cannot_run() {
        let d = desired("image = \"ghcr.io/acme/agent-base:1.2\"\n");
        let err = check(&d, RuntimeKind::Local).unwrap_err();
        assert_eq!(err.items[0].code, "bottle::local-image");
    }

    #[test]
    fn smolvm_refuses_an_oci_image_in_a_bottle_without_an_egress_table() {
        let d = desired("image = \"ghcr.io/acme/agent-base:1.2\"\n");
        let err = check(&d, RuntimeKind::Smolvm).unwrap_err();
        assert_eq!(err.items[0].code, "bottle::image-needs-network");
        // A gated bottle's machines reach only the gate: no pull either.
        let d = desired(
            "image = \"ghcr.io/acme/agent-base:1.2\"\n[bottle.dev.egress]\nallow_hosts = [\"ghcr.io\"]\n",
        );
        let err = check(&d, RuntimeKind::Smolvm).unwrap_err();
        assert_eq!(err.items[0].code, "bottle::image-needs-network");
        assert!(
            err.items[0].message.contains("its gate"),
            "{}",
            err.items[0].message
        );
        // Only `allow_cidrs` lets a pull through, and plan says what they must cover.
        let d = desired(&format!(
            "image = \"ghcr.io/acme/agent-base:1.2\"\n{EGRESS}"
        ));
        let notes = check(&d, RuntimeKind::Smolvm).unwrap();
        assert!(
            notes.iter().any(|n| n.contains("registry and its CDN")),
            "{notes:?}"
        );
        // A local image needs no network.
        let tmp = tempfile::tempdir().unwrap();
        let d = desired(&format!("image = \"{}\"\n", tmp.path().display()));
        check(&d, RuntimeKind::Smolvm).unwrap();
    }

    #[test]
    fn validate_leaves_out_this_hosts_secrets() {
        let d = desired(SECRET);
        assert_eq!(
            runtime_check(&d, RuntimeKind::Smolvm).unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(check(&d, RuntimeKind::Smolvm).unwrap().len(), 1);
    }

    #[test]
    fn accepted_unfiltered_network_is_noted_every_time() {
        let d = desired(&format!(
            "{EGRESS}[bottle.dev.local]\nallow_unfiltered_network = true\n"
        ));
        let notes = check(&d, RuntimeKind::Local).unwrap();
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains("unfiltered"), "{notes:?}");
    }

    #[test]
    fn a_missing_secret_is_a_note_and_an_error_only_to_a_plan_that_starts_its_machines() {
        let d = desired(SECRET);
        let notes = check(&d, RuntimeKind::Smolvm).unwrap();
        assert!(
            notes[0].contains("BOTTLE_PREFLIGHT_TEST_NEVER_SET"),
            "{notes:?}"
        );
        let snapshot = crate::observe::Snapshot::default();
        let fresh = crate::plan::plan(&d, &snapshot, &Default::default());
        // The create waits for it, and says how to go on.
        let mut held = fresh.clone();
        hold_launches_without_secrets(&d, &mut held, Waiting::Command);
        let reason = held.actions[0].blocked.as_deref().unwrap();
        assert!(
            reason.contains("BOTTLE_PREFLIGHT_TEST_NEVER_SET"),
            "{reason}"
        );
        assert!(reason.contains("--target"), "{reason}");
        // Only the create: the steps after it wait with it when applied.
        assert_eq!(held.blocked().count(), 1);
    }

    #[test]
    fn a_fifo_in_a_secrets_place_is_a_diagnostic_not_a_hang() {
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("token");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let d = desired(&format!(
            "secrets = {{ TOKEN = {{ from_file = \"{}\" }} }}\n",
            fifo.display()
        ));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let notes = check(&d, RuntimeKind::Smolvm).unwrap();
            let mut fresh = crate::plan::plan(&d, &Default::default(), &Default::default());
            hold_launches_without_secrets(&d, &mut fresh, Waiting::Command);
            let _ = tx.send((notes, fresh));
        });
        let (notes, held) = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("preflight never blocks on a secret file");
        assert!(
            notes[0].contains("is a FIFO, not a regular file"),
            "{notes:?}"
        );
        let reason = held.actions[0].blocked.as_deref().unwrap();
        assert!(reason.contains("is a FIFO"), "{reason}");
    }
}
