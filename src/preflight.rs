//! Checks that need the environment bottle runs in, made before anything
//! touches a machine: what the chosen runtime cannot do, and secrets whose
//! source is missing on this host. Problems are manifest diagnostics (they
//! point at the key that asks for the impossible); things the user accepted
//! are notes shown with the plan.

use crate::desired::Desired;
use crate::manifest::{Diagnostics, KeyPath, ManifestDiagnostic};
use crate::runtime::RuntimeKind;

/// How to treat a secret whose source is missing on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrets {
    /// An error: the command is about to launch machines (apply, watch).
    Required,
    /// A note: the command only looks (plan, check, status).
    Noted,
}

/// Run every check; returns the notes, or every problem.
pub fn check(
    desired: &Desired,
    runtime: RuntimeKind,
    secrets: Secrets,
) -> Result<Vec<String>, Diagnostics> {
    let project = &desired.project;
    let mut notes = Vec::new();
    let mut problems = Vec::new();
    let used: std::collections::BTreeSet<&str> = project
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
        if runtime == RuntimeKind::Local && bottle.spec.egress.is_some() {
            if bottle
                .spec
                .local
                .as_ref()
                .is_some_and(|l| l.allow_unfiltered_network)
            {
                notes.push(format!(
                    "bottle `{}`: the local runtime cannot enforce the egress allowlist; its guests get the host's network, unfiltered",
                    bottle.name
                ));
            } else {
                problems.push(
                    ManifestDiagnostic::new(
                        "bottle::local-egress",
                        format!("the local runtime cannot enforce the egress allowlist of bottle `{}`", bottle.name),
                    )
                    .key(&project.sources, bottle.file, &at.clone().key("egress"), "an allowlist the local runtime cannot enforce")
                    .help(format!(
                        "use --runtime smolvm, or accept the host's network unfiltered with `[bottle.{}.local] allow_unfiltered_network = true`",
                        bottle.name
                    )),
                );
            }
        }
        for (name, reference) in &bottle.spec.secrets {
            let missing = match (&reference.from_env, &reference.from_file) {
                (Some(var), _) if std::env::var_os(var).is_none() => Some((
                    format!("host environment variable `{var}` is not set"),
                    format!(
                        "export {var} in the environment bottle runs in; its value is read at each launch and never stored"
                    ),
                )),
                (None, Some(file)) if std::fs::File::open(file).is_err() => Some((
                    format!("host file `{file}` cannot be read"),
                    format!("create {file}, readable by the user bottle runs as"),
                )),
                _ => None,
            };
            let Some((what, help)) = missing else {
                continue;
            };
            let message = format!("secret `{name}` of bottle `{}`: {what}", bottle.name);
            match secrets {
                Secrets::Noted => notes.push(format!("{message} (apply will refuse until it is)")),
                Secrets::Required => problems.push(
                    ManifestDiagnostic::new("bottle::secret-unavailable", message)
                        .value(
                            &project.sources,
                            bottle.file,
                            &at.clone().key("secrets").key(name),
                            "its source is missing on this host",
                        )
                        .help(help),
                ),
            }
        }
    }
    if problems.is_empty() {
        Ok(notes)
    } else {
        Err(Diagnostics {
            dir: project.dir.display().to_string(),
            items: problems,
        })
    }
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

    const EGRESS: &str = "[bottle.dev.egress]\nallow_hosts = [\"example.com\"]\n";
    const SECRET: &str =
        "secrets = { TOKEN = { from_env = \"BOTTLE_PREFLIGHT_TEST_NEVER_SET\" } }\n";

    #[test]
    fn the_local_runtime_refuses_egress_it_cannot_enforce() {
        let d = desired(EGRESS);
        let err = check(&d, RuntimeKind::Local, Secrets::Required).unwrap_err();
        assert_eq!(err.items[0].code, "bottle::local-egress");
        assert_eq!(
            check(&d, RuntimeKind::Smolvm, Secrets::Required).unwrap(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn accepted_unfiltered_network_is_noted_every_time() {
        let d = desired(&format!(
            "{EGRESS}[bottle.dev.local]\nallow_unfiltered_network = true\n"
        ));
        let notes = check(&d, RuntimeKind::Local, Secrets::Required).unwrap();
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains("unfiltered"), "{notes:?}");
    }

    #[test]
    fn a_missing_secret_source_is_an_error_to_apply_and_a_note_to_plan() {
        let d = desired(SECRET);
        let err = check(&d, RuntimeKind::Smolvm, Secrets::Required).unwrap_err();
        assert_eq!(err.items[0].code, "bottle::secret-unavailable");
        let notes = check(&d, RuntimeKind::Smolvm, Secrets::Noted).unwrap();
        assert!(
            notes[0].contains("BOTTLE_PREFLIGHT_TEST_NEVER_SET"),
            "{notes:?}"
        );
    }
}
