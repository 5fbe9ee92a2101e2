//! Checks that need more than serde: names, references between entities,
//! duplicates, paths (existence, escapes), certificates, URLs, networks and
//! secrets. Each problem is reported at the offending key or value, and the
//! valid entities are resolved into the [`Project`](super::Project) types.
//!
//! Path rules:
//! - Everything bottle copies into a guest (prompt files, skill directories,
//!   the CA certificate, setup inputs) must live under the manifests
//!   directory, both as written and after following symlinks.
//! - Volume hosts and local images are deliberate host paths: they may live
//!   anywhere (`~/` is the user's home), but they must exist, so a typo fails
//!   here rather than at machine creation.
//!
//! Modules: `bottle` (resources, user, image, volumes, CA), `secrets` (env
//! and secrets), `network` (egress, gate, git), `setup` (setup steps),
//! `agent` (bottle, prompt, skills), `paths` (resolving paths) and `values`
//! (the grammar of single values: hosts, CIDRs, URLs, PEM, names).

mod agent;
mod bottle;
mod network;
mod paths;
mod secrets;
mod setup;
mod values;

use std::collections::{BTreeMap, BTreeSet};

use super::load::{Cx, Decl, Decls, Kind};
use super::{Agent, Bottle, ManifestDiagnostic, load, names};
use agent::agent;
use bottle::bottle;
pub use values::{
    ENV_NAME_HELP, PemProblem, check_cidr, check_host, check_http_url, check_pem, check_repo_name,
    is_env_name, literal_secret, normalize, url_password,
};

/// Built-in provisioning steps a setup step may run after (DESIGN.md §3).
/// `supervise` is not among them: it runs after everything else.
pub const BUILTIN_STEPS: [&str; 5] = ["machine", "ca", "prompt", "skills", "git"];

/// Step names setup steps may not take.
const RESERVED_STEPS: [&str; 6] = ["machine", "ca", "prompt", "skills", "git", "supervise"];

/// A CA file larger than this is not a certificate (and is not read).
pub(super) const MAX_CERT_BYTES: u64 = 1 << 20;

/// Check every declared bottle and agent; the ones without a problem of
/// their own (agents only with such a bottle) are resolved. With no
/// problem anywhere that is all of them; otherwise checks that need one
/// entity only (`validate`'s runtime checks) still run on the clean ones.
pub(super) fn check(
    cx: &mut Cx,
    decls: &Decls,
) -> (BTreeMap<String, Bottle>, BTreeMap<String, Agent>) {
    duplicates(cx, Kind::Bottle, &decls.bottles);
    duplicates(cx, Kind::Agent, &decls.agents);

    let bottle_names: BTreeSet<&str> = decls.bottles.iter().map(|d| d.name.as_str()).collect();
    let mut bottles = BTreeMap::new();
    for d in &decls.bottles {
        let before = cx.found.len();
        check_entity_name(cx, Kind::Bottle, d);
        if let Some(b) = bottle(cx, d)
            && cx.found.len() == before
            && d.tainted.is_empty()
        {
            bottles.entry(d.name.clone()).or_insert(b);
        }
    }
    let mut agents = BTreeMap::new();
    for d in &decls.agents {
        let before = cx.found.len();
        check_entity_name(cx, Kind::Agent, d);
        if let Some(a) = agent(cx, d, &bottle_names)
            && cx.found.len() == before
            && d.tainted.is_empty()
            && bottles.contains_key(&a.spec.bottle)
        {
            agents.entry(d.name.clone()).or_insert(a);
        }
    }
    (bottles, agents)
}

/// The same name declared in two files: labelled in the first, with each
/// further definition as a related diagnostic in its own file.
fn duplicates<T>(cx: &mut Cx, kind: Kind, decls: &[Decl<T>]) {
    for (name, group) in load::by_name(decls) {
        let [first, rest @ ..] = group.as_slice() else {
            continue;
        };
        if rest.is_empty() {
            continue;
        }
        let mut d = ManifestDiagnostic::new(
            "bottle::duplicate-name",
            format!("{} is defined {} times", kind.describe(name), group.len()),
        )
        .help(format!(
            "{} names are unique across the whole manifests directory: \
             rename or remove all but one",
            kind.table()
        ));
        for other in rest {
            d = d.related(
                ManifestDiagnostic::new(
                    "bottle::duplicate-name",
                    format!("{} is defined again here", kind.describe(name)),
                )
                .span(
                    cx.sources,
                    other.file,
                    other.name_span.clone(),
                    "defined again here",
                ),
            );
        }
        cx.report_at(first.file, first.name_span.clone(), d, "first defined here");
    }
}

fn check_entity_name<T>(cx: &mut Cx, kind: Kind, d: &Decl<T>) {
    if let Err(why) = names::check_name(&d.name) {
        let d2 = ManifestDiagnostic::new(
            "bottle::invalid-name",
            format!("{} name `{}` {why}", kind.table(), d.name),
        )
        .help(name_help(&d.name));
        cx.report_at(d.file, d.name_span.clone(), d2, "invalid name");
    }
}

fn name_help(name: &str) -> String {
    match names::sanitize(name) {
        Some(s) if s != name => format!(
            "{}; they become part of machine names. e.g. `{s}`",
            names::RULE
        ),
        _ => format!("{}; they become part of machine names", names::RULE),
    }
}

/// Shorthand for a diagnostic with a help line.
fn diag(code: &'static str, message: String, help: impl Into<String>) -> ManifestDiagnostic {
    ManifestDiagnostic::new(code, message).help(help)
}

fn list<'a>(items: impl Iterator<Item = &'a str>) -> String {
    items
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ")
}
