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

mod values;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use super::diagnostic::suggest;
use super::load::{Cx, Decl, Decls, Kind};
use super::model::{AgentSpec, BottleSpec, SetupSpec};
use super::source::Want;
use super::{
    Agent, Bottle, FileId, Image, KeyPath, ManifestDiagnostic, Prompt, Volume, load, names,
};
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

/// Check a bottle; its resolved form even when it has problems (the
/// loader still looks for cycles in its setup steps), `None` only when it
/// did not deserialize.
fn bottle(cx: &mut Cx, d: &Decl<BottleSpec>) -> Option<Bottle> {
    let spec = d.spec.as_ref()?;
    let file = d.file;
    let base = d.path(Kind::Bottle);
    let what = Kind::Bottle.describe(&d.name);

    // smolvm's `--cpus` takes 1..=255.
    if !(1..=255).contains(&spec.cpus) {
        cx.report(
            file,
            &base.clone().key("cpus"),
            Want::Value,
            diag(
                "bottle::out-of-range",
                format!("`cpus` in {what} must be between 1 and 255"),
                "give the number of virtual CPUs, e.g. `cpus = 2`",
            ),
            "out of range",
        );
    }
    if spec.memory_mib < 64 {
        cx.report(
            file,
            &base.clone().key("memory_mib"),
            Want::Value,
            diag(
                "bottle::out-of-range",
                format!("`memory_mib` in {what} must be at least 64"),
                "give the guest memory in MiB, e.g. `memory_mib = 2048`",
            ),
            "too small",
        );
    }
    check_user(cx, file, &base, &what, &spec.user);
    let image = image(cx, file, &base, &what, spec.image.as_deref());
    check_env_and_secrets(cx, file, &base, &what, spec);
    let volumes = volumes(cx, file, &base, &what, &spec.volumes);
    check_egress(cx, file, &base, &what, spec, d.clean_at("egress"));
    check_gate_settings(cx, file, &base, &what, spec);

    let ca_cert = spec.ca.as_ref().and_then(|ca| {
        let path = base.clone().key("ca").key("cert");
        let cert = resolve_inside(
            cx,
            file,
            &path,
            &ca.cert,
            "CA certificate",
            Expect::File,
            None,
        )?;
        check_cert(cx, file, &path, &ca.cert, &cert).then_some(cert)
    });

    if let Some(git) = &spec.git {
        check_git(cx, file, &base, &what, git);
    }
    if let Some(url) = spec.supervise.as_ref().and_then(|s| s.url.as_ref()) {
        let path = base.clone().key("supervise").key("url");
        if let Err((problem, help)) = check_http_url(url, false) {
            cx.report(
                file,
                &path,
                Want::Value,
                diag(
                    "bottle::invalid-url",
                    format!("`supervise.url` in {what} {problem}"),
                    help,
                ),
                "invalid URL",
            );
        }
    }
    let setup_inputs = setup(cx, file, &base, &what, &spec.setup, d.clean_at("setup"));

    let bottle = Bottle {
        name: d.name.clone(),
        spec: spec.clone(),
        file,
        image: image.unwrap_or(Image::Host),
        ca_cert,
        volumes,
        setup_inputs,
    };
    // Setup steps that wait for each other in a cycle, found here with every
    // other problem rather than once the rest is fixed; not when a step was
    // dropped for an error (it may be the one that closes a cycle).
    if d.clean_at("setup") {
        for cycle in crate::graph::setup_cycles(cx.sources, &bottle) {
            let offset = cycle.labels.first().map_or(0, |l| l.offset());
            cx.found.push(file, (offset, cycle));
        }
    }
    Some(bottle)
}

fn check_user(cx: &mut Cx, file: FileId, base: &KeyPath, what: &str, user: &str) {
    let path = base.clone().key("user");
    if user == "root" {
        cx.report(
            file,
            &path,
            Want::Value,
            diag(
                "bottle::root-user",
                format!("{what} runs its agent as root"),
                "Claude Code refuses `--dangerously-skip-permissions` as root: \
                 use an ordinary user, e.g. `user = \"node\"` (created in the guest if missing)",
            ),
            "root",
        );
        return;
    }
    let valid = !user.is_empty()
        && user.len() <= 32
        && user.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && user
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !valid {
        cx.report(
            file,
            &path,
            Want::Value,
            diag(
                "bottle::invalid-user",
                format!("`user` in {what} is not a valid user name"),
                "user names are up to 32 lower-case letters, digits, '_' and '-', \
                 starting with a letter or '_', e.g. `user = \"node\"`",
            ),
            "invalid user name",
        );
    }
}

/// `image`: absent or `"host"`, a local path (starting with `.`, `/` or
/// `~`), or an OCI reference.
fn image(
    cx: &mut Cx,
    file: FileId,
    base: &KeyPath,
    what: &str,
    image: Option<&str>,
) -> Option<Image> {
    let raw = match image {
        None | Some("host") => return Some(Image::Host),
        Some(raw) => raw,
    };
    let path = base.clone().key("image");
    if raw.trim().is_empty() || raw.chars().any(char::is_whitespace) {
        cx.report(
            file,
            &path,
            Want::Value,
            diag(
                "bottle::invalid-image",
                format!("`image` in {what} is not an image reference or a path"),
                "write an OCI reference (`ghcr.io/acme/agent-base:1.2`), a local path starting \
                 with `./`, `/` or `~/`, or omit `image` to use the host's system directories \
                 on the local runtime",
            ),
            "invalid image",
        );
        return None;
    }
    if raw.starts_with('-') || raw.contains('\0') {
        // Passed to the runtime as an argument: a leading `-` reads as
        // one of its options (`--net`), a NUL cannot be passed at all.
        cx.report(
            file,
            &path,
            Want::Value,
            diag(
                "bottle::invalid-image",
                format!("`image` in {what} is not an image reference or a path"),
                "an image reference never starts with `-` (it would be read as an option) \
                 nor holds a NUL: write an OCI reference (`ghcr.io/acme/agent-base:1.2`) \
                 or a local path starting with `./`, `/` or `~/`",
            ),
            if raw.starts_with('-') {
                "looks like an option"
            } else {
                "holds a NUL character"
            },
        );
        return None;
    }
    if !raw.starts_with(['.', '/', '~']) {
        return Some(Image::Reference(raw.to_owned()));
    }
    let resolved = match host_path(cx, file, raw) {
        Ok(p) => p,
        Err(help) => {
            cx.report(
                file,
                &path,
                Want::Value,
                diag(
                    "bottle::invalid-path",
                    format!("`image` path in {what} cannot be resolved"),
                    help,
                ),
                "unresolvable path",
            );
            return None;
        }
    };
    match cx.stat(&resolved) {
        Some(info) if info.is_dir => Some(Image::RootfsDir(resolved)),
        Some(_) => Some(Image::Archive(resolved)),
        None => {
            cx.report(
                file,
                &path,
                Want::Value,
                diag(
                    "bottle::image-not-found",
                    format!("local image `{raw}` of {what} does not exist"),
                    "point it at an unpacked root filesystem directory or a `docker save` \
                     archive (relative to this file); an OCI reference never starts with \
                     `.`, `/` or `~`",
                ),
                "no such file or directory",
            );
            None
        }
    }
}

fn check_env_and_secrets(cx: &mut Cx, file: FileId, base: &KeyPath, what: &str, spec: &BottleSpec) {
    for (var, value) in &spec.env {
        let path = base.clone().key("env").key(var);
        if !is_env_name(var) {
            cx.report(
                file,
                &path,
                Want::Key,
                diag(
                    "bottle::invalid-env-name",
                    format!("`{var}` in {what}'s `env` is not a valid variable name"),
                    ENV_NAME_HELP,
                ),
                "invalid variable name",
            );
        }
        if value.contains('\0') {
            // An environment value is a C string: it cannot hold a NUL,
            // and the runtime would fail at spawn.
            cx.report(
                file,
                &path,
                Want::Value,
                diag(
                    "bottle::env-nul",
                    format!("`{var}` in {what}'s `env` holds a NUL character"),
                    "environment values cannot contain NUL (`\\u0000`): remove it",
                ),
                "holds a NUL character",
            );
        } else if spec.secrets.contains_key(var) {
            cx.report(
                file,
                &path,
                Want::Key,
                diag(
                    "bottle::env-secret-conflict",
                    format!("`{var}` is set in both `env` and `secrets` of {what}"),
                    "keep one: a secret reference in `secrets`, or a plain value in `env`",
                ),
                "also a secret",
            );
        } else if literal_secret(var, value) {
            cx.report(
                file,
                &path,
                Want::Value,
                diag(
                    "bottle::literal-secret",
                    format!("`{var}` in {what}'s `env` looks like a secret written as a literal"),
                    format!(
                        "move it to `secrets` as a reference: \
                         `{var} = {{ from_env = \"HOST_VAR\" }}`; if the value was committed, \
                         rotate it"
                    ),
                ),
                "literal value (not shown)",
            );
        } else if value.contains("${") {
            cx.report(
                file,
                &path,
                Want::Value,
                diag(
                    "bottle::env-interpolation",
                    format!("`{var}` in {what}'s `env` uses `${{...}}`, which is not expanded"),
                    format!(
                        "env values are passed literally; to pass a host variable into the guest, \
                         declare it in `secrets`: `{var} = {{ from_env = \"HOST_VAR\" }}`"
                    ),
                ),
                "not expanded",
            );
        }
    }

    for (var, secret) in &spec.secrets {
        let path = base.clone().key("secrets").key(var);
        if !is_env_name(var) {
            cx.report(
                file,
                &path,
                Want::Key,
                diag(
                    "bottle::invalid-env-name",
                    format!("secret `{var}` in {what} is not a valid variable name"),
                    format!("a secret is set as a guest environment variable; {ENV_NAME_HELP}"),
                ),
                "invalid variable name",
            );
        }
        match (&secret.from_env, &secret.from_file) {
            (Some(_), Some(_)) | (None, None) => {
                let both = secret.from_env.is_some();
                cx.report(
                    file,
                    &path,
                    Want::Value,
                    diag(
                        "bottle::secret-source",
                        format!(
                            "secret `{var}` in {what} names {} source",
                            if both { "more than one" } else { "no" }
                        ),
                        format!(
                            "give exactly one: `{var} = {{ from_env = \"HOST_VAR\" }}` or \
                             `{var} = {{ from_file = \"/abs/path\" }}`"
                        ),
                    ),
                    if both {
                        "both from_env and from_file"
                    } else {
                        "no from_env or from_file"
                    },
                );
            }
            (Some(env), None) if !is_env_name(env) => {
                cx.report(
                    file,
                    &path.clone().key("from_env"),
                    Want::Value,
                    diag(
                        "bottle::invalid-env-name",
                        format!(
                            "`from_env` of secret `{var}` in {what} is not a valid variable name"
                        ),
                        format!(
                            "name the host environment variable holding the value; {ENV_NAME_HELP}"
                        ),
                    ),
                    "invalid variable name",
                );
            }
            (None, Some(path_str)) if !Path::new(path_str).is_absolute() => {
                cx.report(
                    file,
                    &path.clone().key("from_file"),
                    Want::Value,
                    diag(
                        "bottle::relative-secret-file",
                        format!("`from_file` of secret `{var}` in {what} is not an absolute path"),
                        "secret files are read on the host at each launch: give an absolute path \
                         (`~` is not expanded), e.g. `from_file = \"/run/secrets/github\"`",
                    ),
                    "not absolute",
                );
            }
            _ => {}
        }
    }
}

fn volumes(cx: &mut Cx, file: FileId, base: &KeyPath, what: &str, raw: &[String]) -> Vec<Volume> {
    let mut out = Vec::new();
    let mut guests = BTreeSet::new();
    for (i, v) in raw.iter().enumerate() {
        let path = base.clone().key("volumes").index(i);
        let bad = |cx: &mut Cx, problem: String, help: &str, label: &str| {
            cx.report(
                file,
                &path,
                Want::Value,
                diag(
                    "bottle::invalid-volume",
                    format!("volume `{v}` in {what} {problem}"),
                    help,
                ),
                label,
            );
        };
        let parts: Vec<&str> = v.split(':').collect();
        let (host, guest, read_only) = match parts.as_slice() {
            [h, g] => (*h, *g, false),
            [h, g, "ro"] => (*h, *g, true),
            [h, g, "rw"] => (*h, *g, false),
            [_, _, mode] => {
                bad(
                    cx,
                    format!("has an unknown mode `{mode}`"),
                    "the mode is `ro` (read-only) or `rw` (the default): `./workspace:/workspace:ro`",
                    "unknown mode",
                );
                continue;
            }
            _ => {
                bad(
                    cx,
                    "is not HOST:GUEST".to_owned(),
                    "write `HOST:GUEST` or `HOST:GUEST:ro`, e.g. `./workspace:/workspace`",
                    "expected HOST:GUEST[:ro]",
                );
                continue;
            }
        };
        if host.is_empty() {
            bad(
                cx,
                "has no host path".to_owned(),
                "write `HOST:GUEST`, e.g. `./workspace:/workspace`",
                "empty host path",
            );
            continue;
        }
        let guest_problem = if !guest.starts_with('/') {
            Some("guest path is not absolute")
        } else if guest.trim_end_matches('/').is_empty() {
            Some("cannot mount over the guest's /")
        } else if Path::new(guest)
            .components()
            .any(|c| c == Component::ParentDir)
        {
            Some("guest path contains `..`")
        } else {
            None
        };
        if let Some(label) = guest_problem {
            bad(
                cx,
                "has an invalid guest path".to_owned(),
                "the guest side is an absolute path other than `/`, without `..`, \
                 e.g. `./workspace:/workspace`",
                label,
            );
            continue;
        }
        // `/work`, `/work/` and `/work/.` are one mount point.
        if !guests.insert(normalize(Path::new(guest))) {
            bad(
                cx,
                format!("mounts `{guest}` a second time"),
                "each guest path can hold one volume: remove or move one of them",
                "guest path already used",
            );
            continue;
        }
        let resolved = match host_path(cx, file, host) {
            Ok(p) => p,
            Err(help) => {
                bad(
                    cx,
                    "has an unresolvable host path".to_owned(),
                    &help,
                    "unresolvable path",
                );
                continue;
            }
        };
        let Some(info) = cx.stat(&resolved) else {
            bad(
                cx,
                format!("shares `{host}`, which does not exist"),
                "create it (volumes share existing host paths), or fix the path; \
                 a relative host path is relative to this file",
                "no such file or directory",
            );
            continue;
        };
        // An agent that can write into the manifests directory can write
        // manifests, which bottle (and a watch) would then apply: another
        // bottle with `/` as a volume, say.
        let root = cx.root;
        let holds_a_manifest = cx
            .manifest_files
            .iter()
            .any(|f| f.starts_with(&info.canonical));
        if !read_only
            && (info.canonical.starts_with(root)
                || root.starts_with(&info.canonical)
                || holds_a_manifest)
        {
            cx.report(
                file,
                &path,
                Want::Value,
                diag(
                    "bottle::writable-manifests",
                    format!("volume `{v}` in {what} lets the guest write manifests"),
                    "an agent that can write there can write manifests, and bottle would apply \
                     them: mount it read-only (`HOST:GUEST:ro`) or share a directory outside \
                     the manifests directory",
                ),
                if info.canonical.starts_with(root) {
                    "inside the manifests directory, writable"
                } else if root.starts_with(&info.canonical) {
                    "holds the manifests directory, writable"
                } else {
                    "holds a manifest (the target of a symlink), writable"
                },
            );
            continue;
        }
        out.push(Volume {
            host: resolved,
            guest: guest.to_owned(),
            read_only,
        });
    }
    out
}

fn check_egress(
    cx: &mut Cx,
    file: FileId,
    base: &KeyPath,
    what: &str,
    spec: &BottleSpec,
    clean: bool,
) {
    let Some(egress) = &spec.egress else { return };
    let path = base.clone().key("egress");
    if clean && egress.allow_hosts.is_empty() && egress.allow_cidrs.is_empty() {
        cx.report(
            file,
            &path,
            Want::Key,
            diag(
                "bottle::empty-egress",
                format!("the `egress` table of {what} allows nothing"),
                "list what the guest may reach in `allow_hosts` or `allow_cidrs`, \
                 or remove the table: without it the guest has no network at all",
            ),
            "empty egress table",
        );
    }
    for (i, host) in egress.allow_hosts.iter().enumerate() {
        // The gate's grammar: `host`, `host:port`, `*.domain`.
        if let Err((problem, help)) = crate::gate::hosts::HostPattern::parse(host) {
            cx.report(
                file,
                &path.clone().key("allow_hosts").index(i),
                Want::Value,
                diag(
                    "bottle::invalid-host",
                    format!("egress host `{host}` in {what} {problem}"),
                    help,
                ),
                "invalid host name",
            );
        }
    }
    for (i, cidr) in egress.allow_cidrs.iter().enumerate() {
        if let Err((problem, help)) = check_cidr(cidr) {
            cx.report(
                file,
                &path.clone().key("allow_cidrs").index(i),
                Want::Value,
                diag(
                    "bottle::invalid-cidr",
                    format!("egress network `{cidr}` in {what} {problem}"),
                    help,
                ),
                "invalid CIDR",
            );
        }
    }
}

/// What the gate reads: `egress.allow_internal`, a secret's `hosts`, a
/// git remote's `credentials`, `push` and `host_key` (which only the gate
/// uses, so they make no sense with an external `gateway`).
fn check_gate_settings(cx: &mut Cx, file: FileId, base: &KeyPath, what: &str, spec: &BottleSpec) {
    if let Some(egress) = &spec.egress {
        for (i, cidr) in egress.allow_internal.iter().enumerate() {
            if let Err((problem, help)) = check_cidr(cidr) {
                cx.report(
                    file,
                    &base.clone().key("egress").key("allow_internal").index(i),
                    Want::Value,
                    diag(
                        "bottle::invalid-cidr",
                        format!("internal network `{cidr}` in {what} {problem}"),
                        help,
                    ),
                    "invalid CIDR",
                );
            }
        }
    }
    for (var, secret) in &spec.secrets {
        for (i, host) in secret.hosts.iter().enumerate() {
            if let Err((problem, help)) = crate::gate::hosts::HostPattern::parse(host) {
                cx.report(
                    file,
                    &base.clone().key("secrets").key(var).key("hosts").index(i),
                    Want::Value,
                    diag(
                        "bottle::invalid-host",
                        format!("host `{host}` of secret `{var}` in {what} {problem}"),
                        help,
                    ),
                    "invalid host",
                );
            }
        }
    }
    let Some(git) = &spec.git else { return };
    for (i, remote) in git.remote.iter().enumerate() {
        let rpath = base.clone().key("git").key("remote").index(i);
        let gate_only = [
            ("credentials", remote.credentials.is_some()),
            ("push", !remote.push.is_empty()),
            ("host_key", remote.host_key.is_some()),
        ];
        if git.gateway.is_some() {
            for (key, _) in gate_only.iter().filter(|(_, set)| *set) {
                cx.report(
                    file,
                    &rpath.clone().key(*key),
                    Want::Key,
                    diag(
                        "bottle::gate-only",
                        format!(
                            "`{key}` of git remote `{}` in {what} is only read by bottle's gate, \
                             but `git.gateway` names an external one",
                            remote.name
                        ),
                        "remove `git.gateway` to let the bottle's gate serve the remote (it \
                         then holds the credentials and enforces `push`), or remove this key \
                         and configure your gateway",
                    ),
                    "unused with an external gateway",
                );
            }
        }
        if let Some(creds) = &remote.credentials {
            let cpath = rpath.clone().key("credentials");
            match (&creds.ssh_key, &creds.token) {
                (Some(_), Some(_)) | (None, None) => cx.report(
                    file,
                    &cpath,
                    Want::Value,
                    diag(
                        "bottle::git-credentials",
                        format!(
                            "the credentials of git remote `{}` in {what} name {} kind",
                            remote.name,
                            if creds.ssh_key.is_some() { "more than one" } else { "no" }
                        ),
                        "give exactly one: `credentials = { ssh_key = { from_file = \"/abs/key\" } }` \
                         or `credentials = { token = { from_env = \"GH_PAT\" } }`",
                    ),
                    "ssh_key or token",
                ),
                (Some(key), None) if !Path::new(&key.from_file).is_absolute() => cx.report(
                    file,
                    &cpath.clone().key("ssh_key").key("from_file"),
                    Want::Value,
                    diag(
                        "bottle::relative-secret-file",
                        format!(
                            "the ssh key of git remote `{}` in {what} is not an absolute path",
                            remote.name
                        ),
                        "the gate reads the key on the host: give an absolute path \
                         (`~` is not expanded), e.g. `from_file = \"/home/me/.ssh/app_deploy\"`",
                    ),
                    "not absolute",
                ),
                (None, Some(token)) => match (&token.from_env, &token.from_file) {
                    (Some(env), None) if !is_env_name(env) => cx.report(
                        file,
                        &cpath.clone().key("token").key("from_env"),
                        Want::Value,
                        diag(
                            "bottle::invalid-env-name",
                            format!(
                                "`from_env` of the token of git remote `{}` in {what} is not a \
                                 valid variable name",
                                remote.name
                            ),
                            format!("name the host variable holding the token; {ENV_NAME_HELP}"),
                        ),
                        "invalid variable name",
                    ),
                    (None, Some(f)) if !Path::new(f).is_absolute() => cx.report(
                        file,
                        &cpath.clone().key("token").key("from_file"),
                        Want::Value,
                        diag(
                            "bottle::relative-secret-file",
                            format!(
                                "the token file of git remote `{}` in {what} is not an absolute path",
                                remote.name
                            ),
                            "give an absolute path (`~` is not expanded)",
                        ),
                        "not absolute",
                    ),
                    (Some(_), None) | (None, Some(_)) if token.hosts.is_empty() => {}
                    _ => cx.report(
                        file,
                        &cpath.clone().key("token"),
                        Want::Value,
                        diag(
                            "bottle::secret-source",
                            format!(
                                "the token of git remote `{}` in {what} needs exactly one of \
                                 `from_env` or `from_file`, and no `hosts`",
                                remote.name
                            ),
                            "write `token = { from_env = \"GH_PAT\" }` or \
                             `token = { from_file = \"/abs/path\" }`",
                        ),
                        "one source",
                    ),
                },
                _ => {}
            }
        }
        for (j, glob) in remote.push.iter().enumerate() {
            let bad = glob.is_empty()
                || glob.starts_with('/')
                || glob.starts_with("refs/")
                || glob.contains("..")
                || glob
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || "~^:?[\\".contains(c));
            if bad {
                cx.report(
                    file,
                    &rpath.clone().key("push").index(j),
                    Want::Value,
                    diag(
                        "bottle::invalid-push",
                        format!(
                            "push pattern `{glob}` of git remote `{}` in {what} is not a branch pattern",
                            remote.name
                        ),
                        "name branches, with `*` for any part, e.g. `push = [\"agent/*\"]` \
                         (no `refs/`, spaces, `..` or `~^:?[\\`)",
                    ),
                    "invalid branch pattern",
                );
            }
        }
        if let Some(key) = &remote.host_key {
            let fields = key.split_whitespace().count();
            if key.contains('\n') || !(2..=3).contains(&fields) {
                cx.report(
                    file,
                    &rpath.clone().key("host_key"),
                    Want::Value,
                    diag(
                        "bottle::invalid-host-key",
                        format!(
                            "the host key of git remote `{}` in {what} is not one key",
                            remote.name
                        ),
                        "give the key as `ssh-keyscan` prints it, without the host: \
                         `host_key = \"ssh-ed25519 AAAAC3Nza...\"`",
                    ),
                    "not `TYPE BASE64`",
                );
            }
        }
    }
}

fn check_git(cx: &mut Cx, file: FileId, base: &KeyPath, what: &str, git: &super::model::GitSpec) {
    let path = base.clone().key("git");
    if let Some(Err((problem, help))) = git.gateway.as_deref().map(|g| check_http_url(g, true)) {
        cx.report(
            file,
            &path.clone().key("gateway"),
            Want::Value,
            diag(
                "bottle::invalid-url",
                format!("`git.gateway` in {what} {problem}"),
                help,
            ),
            "invalid URL",
        );
    }
    if let Some(user) = &git.user {
        let bad_name = user.name.trim().is_empty()
            || user
                .name
                .chars()
                .any(|c| c.is_control() || c == '<' || c == '>');
        if bad_name {
            cx.report(
                file,
                &path.clone().key("user").key("name"),
                Want::Value,
                diag(
                    "bottle::invalid-git-user",
                    format!("`git.user.name` in {what} is not a usable commit author name"),
                    "give a non-empty name without '<', '>' or control characters, \
                     e.g. `name = \"Bottle Bot\"`",
                ),
                "invalid name",
            );
        }
        let email = &user.email;
        let bad_email = !email.contains('@')
            || email.starts_with('@')
            || email.ends_with('@')
            || email
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '<' || c == '>');
        if bad_email {
            cx.report(
                file,
                &path.clone().key("user").key("email"),
                Want::Value,
                diag(
                    "bottle::invalid-git-user",
                    format!("`git.user.email` in {what} is not an email address"),
                    "give an address like `email = \"bot@example.com\"`",
                ),
                "not an email address",
            );
        }
    }
    let mut seen_names = BTreeSet::new();
    let mut seen_upstreams = BTreeSet::new();
    for (i, remote) in git.remote.iter().enumerate() {
        let rpath = path.clone().key("remote").index(i);
        if let Err((problem, help)) = check_repo_name(&remote.name) {
            cx.report(
                file,
                &rpath.clone().key("name"),
                Want::Value,
                diag(
                    "bottle::invalid-remote",
                    format!("git remote name `{}` in {what} {problem}", remote.name),
                    help,
                ),
                "invalid repository name",
            );
        } else if !seen_names.insert(remote.name.as_str()) {
            cx.report(
                file,
                &rpath.clone().key("name"),
                Want::Value,
                diag(
                    "bottle::duplicate-remote",
                    format!("git remote `{}` is declared twice in {what}", remote.name),
                    "each remote name maps to one repository on the gateway: remove one",
                ),
                "declared again",
            );
        }
        let upstream = remote.upstream.as_str();
        if upstream.starts_with('-') {
            // git would read it as an option (`--upload-pack=...`,
            // `--file=/etc/shadow`) wherever it is passed as an argument.
            cx.report(
                file,
                &rpath.clone().key("upstream"),
                Want::Value,
                diag(
                    "bottle::invalid-remote",
                    format!(
                        "the upstream of git remote `{}` in {what} starts with `-`",
                        remote.name
                    ),
                    "a URL never starts with `-` (git would read it as an option): \
                     give the URL the agent uses, e.g. `upstream = \"git@github.com:acme/app.git\"`",
                ),
                "looks like an option",
            );
        } else if upstream.trim().is_empty()
            || upstream
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            cx.report(
                file,
                &rpath.clone().key("upstream"),
                Want::Value,
                diag(
                    "bottle::invalid-remote",
                    format!("the upstream of git remote `{}` in {what} is not a URL", remote.name),
                    "give the URL the agent uses, e.g. `upstream = \"git@github.com:acme/app.git\"`",
                ),
                "invalid upstream",
            );
        } else if url_password(upstream).is_some() {
            cx.report(
                file,
                &rpath.clone().key("upstream"),
                Want::Value,
                diag(
                    "bottle::url-credentials",
                    format!(
                        "the upstream of git remote `{}` in {what} carries a password",
                        remote.name
                    ),
                    "remove the `user:password@` part: the gateway holds the credentials, \
                     and a manifest never does",
                ),
                "password in the URL (not shown)",
            );
        } else if !seen_upstreams.insert(upstream) {
            cx.report(
                file,
                &rpath.clone().key("upstream"),
                Want::Value,
                diag(
                    "bottle::duplicate-remote",
                    format!("upstream `{upstream}` is declared by two git remotes in {what}"),
                    "an upstream can be rewritten to only one gateway repository: remove one",
                ),
                "declared again",
            );
        }
    }
}

/// Checks setup steps; returns each step's resolved inputs.
fn setup(
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

fn list<'a>(items: impl Iterator<Item = &'a str>) -> String {
    items
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn agent(cx: &mut Cx, d: &Decl<AgentSpec>, bottles: &BTreeSet<&str>) -> Option<Agent> {
    let spec = d.spec.as_ref()?;
    let file = d.file;
    let base = d.path(Kind::Agent);
    let what = Kind::Agent.describe(&d.name);
    let before = cx.found.len();

    if !bottles.contains(spec.bottle.as_str()) {
        let help = match suggest(&spec.bottle, bottles.iter().copied()) {
            Some(s) => format!("did you mean `{s}`?"),
            None if bottles.is_empty() => format!(
                "declare it: `[bottle.{}]` in any manifest of the directory",
                spec.bottle
            ),
            None => format!("declared bottles: {}", list(bottles.iter().copied())),
        };
        cx.report(
            file,
            &base.clone().key("bottle"),
            Want::Value,
            diag(
                "bottle::unknown-bottle",
                format!(
                    "{what} runs in bottle `{}`, which is not declared",
                    spec.bottle
                ),
                help,
            ),
            "no such bottle",
        );
    }

    // The file is checked even beside `prompt_text`: whichever is kept, a
    // prompt file that is not there is a problem of its own.
    let prompt_file = spec.prompt.as_ref().map(|path| {
        let looks_like_text = path.contains('\n') || path.split_whitespace().count() > 3;
        let help = looks_like_text.then(|| {
            "`prompt` names a file; to give the prompt inline (as the old `prompt` did), \
             write `prompt_text = \"...\"`"
                .to_owned()
        });
        resolve_inside(
            cx,
            file,
            &base.clone().key("prompt"),
            path,
            "prompt file",
            Expect::File,
            help,
        )
    });
    let prompt = match (prompt_file, &spec.prompt_text) {
        (Some(_), Some(_)) => {
            let text_span = cx.span(file, &base.clone().key("prompt_text"), Want::Key);
            let d = diag(
                "bottle::prompt-conflict",
                format!("{what} has both `prompt` and `prompt_text`"),
                "keep one: `prompt` names a file, `prompt_text` gives the text inline",
            )
            .span(cx.sources, file, text_span, "and prompt_text");
            cx.report(
                file,
                &base.clone().key("prompt"),
                Want::Key,
                d,
                "prompt file",
            );
            None
        }
        (Some(resolved), None) => resolved.map(Prompt::File),
        (None, Some(text)) => Some(Prompt::Text(text.clone())),
        (None, None) => Some(Prompt::None),
    };

    let mut skills = Vec::new();
    let mut skill_names: BTreeMap<String, usize> = BTreeMap::new();
    for (i, skill) in spec.skills.iter().enumerate() {
        let path = base.clone().key("skills").index(i);
        let Some(dir) = resolve_inside(
            cx,
            file,
            &path,
            skill,
            "skill directory",
            Expect::Dir,
            Some(
                "skills are directories relative to this file, each holding a SKILL.md, \
                 e.g. `skills = [\"skills/rust-review\"]`"
                    .to_owned(),
            ),
        ) else {
            continue;
        };
        if cx.stat(&dir.join("SKILL.md")).is_none_or(|i| !i.is_file) {
            cx.report(
                file,
                &path,
                Want::Value,
                diag(
                    "bottle::skill-without-skill-md",
                    format!("skill directory `{skill}` of {what} has no SKILL.md"),
                    "Claude Code loads a skill from its SKILL.md: add one with YAML front matter \
                     (`name`, `description`) followed by the instructions",
                ),
                "no SKILL.md here",
            );
            continue;
        }
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // The first skill of that name stays the one others are compared to.
        let first = *skill_names.entry(name.clone()).or_insert(i);
        if first != i {
            let first_span = cx.span(file, &base.clone().key("skills").index(first), Want::Value);
            let d = diag(
                "bottle::duplicate-skill",
                format!("{what} has two skills named `{name}`"),
                "each skill is copied to ~/.claude/skills/<directory name>/: \
                 rename one of the directories or remove one",
            )
            .span(cx.sources, file, first_span, "first skill");
            cx.report(file, &path, Want::Value, d, "same directory name");
            continue;
        }
        skills.push(dir);
    }

    let prompt = prompt?;
    (cx.found.len() == before).then(|| Agent {
        name: d.name.clone(),
        spec: spec.clone(),
        file,
        prompt,
        skills,
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Expect {
    File,
    Dir,
    Any,
}

/// Resolve a path that is copied into the guest: relative to the manifest
/// naming it, and inside the manifests directory as written and after
/// symlinks. Returns the absolute path as written (symlinks kept, so a
/// linked skill keeps its name).
fn resolve_inside(
    cx: &mut Cx,
    file: FileId,
    path: &KeyPath,
    raw: &str,
    what: &str,
    expect: Expect,
    extra_help: Option<String>,
) -> Option<PathBuf> {
    if raw.trim().is_empty() {
        cx.report(
            file,
            path,
            Want::Value,
            diag(
                "bottle::empty-path",
                format!("{what} path is empty"),
                format!("name the {what} relative to this manifest"),
            ),
            "empty path",
        );
        return None;
    }
    let base = cx.sources.path(file).parent().unwrap_or(cx.root).to_owned();
    let lexical = normalize(&base.join(raw));
    if !lexical.starts_with(cx.root) {
        cx.report(
            file,
            path,
            Want::Value,
            diag(
                "bottle::path-escapes",
                format!("{what} `{raw}` is outside the manifests directory"),
                "bottle copies it into the guest, so it must live under the manifests \
                 directory: move it there and name it relative to this file",
            ),
            "leads outside the manifests directory",
        );
        return None;
    }
    let Some(info) = cx.stat(&lexical) else {
        let help = extra_help.unwrap_or_else(|| match similar(cx, &lexical, raw) {
            Some(s) => format!("did you mean `{s}`?"),
            None => "create it, or fix the path (relative to this file)".to_owned(),
        });
        cx.report(
            file,
            path,
            Want::Value,
            diag(
                "bottle::missing-path",
                format!("{what} `{raw}` does not exist"),
                help,
            ),
            "not found",
        );
        return None;
    };
    if !info.canonical.starts_with(cx.root) {
        cx.report(
            file,
            path,
            Want::Value,
            diag(
                "bottle::path-escapes",
                format!("{what} `{raw}` leads outside the manifests directory through a symlink"),
                "bottle copies it into the guest, so it must live under the manifests \
                 directory: replace the symlink with the real file or directory",
            ),
            "symlink to a path outside the manifests directory",
        );
        return None;
    }
    let kind_problem = match expect {
        Expect::File if !info.is_file => Some("is not a file"),
        Expect::Dir if !info.is_dir => Some("is not a directory"),
        Expect::Any if !info.is_file && !info.is_dir => Some("is not a file or directory"),
        _ => None,
    };
    if let Some(problem) = kind_problem {
        cx.report(
            file,
            path,
            Want::Value,
            diag(
                "bottle::wrong-path-kind",
                format!("{what} `{raw}` {problem}"),
                match expect {
                    Expect::Dir => "name a directory (relative to this file)",
                    _ => "name a regular file (relative to this file)",
                },
            ),
            problem,
        );
        return None;
    }
    Some(lexical)
}

/// A sibling of a missing path with a close name, as the user would write
/// it. Only runs when a path is missing, so listing the directory is fine.
fn similar(cx: &Cx, missing: &Path, raw: &str) -> Option<String> {
    let parent = missing.parent()?;
    let name = missing.file_name()?.to_string_lossy().into_owned();
    if !parent.starts_with(cx.root) {
        return None;
    }
    let entries: Vec<String> = std::fs::read_dir(parent)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    let best = suggest(&name, entries.iter().map(String::as_str))?;
    let prefix = raw.trim_end_matches('/');
    let prefix = &prefix[..prefix.len() - prefix.rsplit('/').next()?.len()];
    Some(format!("{prefix}{best}"))
}

/// A host path (volume or image): `~/` expanded, relative to the manifest.
fn host_path(cx: &Cx, file: FileId, raw: &str) -> Result<PathBuf, String> {
    let base = cx.sources.path(file).parent().unwrap_or(cx.root);
    let expanded = if raw == "~" || raw.starts_with("~/") {
        let home = std::env::var_os("HOME").ok_or_else(|| {
            "`~` needs $HOME, which is not set: write the absolute path".to_owned()
        })?;
        PathBuf::from(home).join(raw.trim_start_matches('~').trim_start_matches('/'))
    } else if raw.starts_with('~') {
        return Err("only `~/` (your home) is expanded: write the absolute path".to_owned());
    } else {
        base.join(raw)
    };
    Ok(normalize(&expanded))
}

/// Reads the CA file and checks it is PEM certificates only.
fn check_cert(cx: &mut Cx, file: FileId, path: &KeyPath, raw: &str, cert: &Path) -> bool {
    let (problem, help) = match cx.cert(cert) {
        Ok(_) => return true,
        Err(PemProblem::PrivateKey) => {
            cx.report(
                file,
                path,
                Want::Value,
                diag(
                    "bottle::ca-private-key",
                    format!("CA certificate `{raw}` contains a private key"),
                    "only the certificate goes into the guest: extract it \
                     (`openssl x509 -in FILE -out ca.pem`) and keep the key off this \
                     directory; if the key was committed, replace the CA",
                ),
                "holds a private key",
            );
            return false;
        }
        Err(PemProblem::Unreadable(problem)) => (problem, "give a PEM certificate file"),
        Err(PemProblem::Malformed(problem)) => (
            problem,
            "give the CA's certificate in PEM form: `-----BEGIN CERTIFICATE-----`, \
             base64 DER, `-----END CERTIFICATE-----` (convert a DER file with \
             `openssl x509 -inform der -in ca.der -out ca.pem`)",
        ),
    };
    cx.report(
        file,
        path,
        Want::Value,
        diag(
            "bottle::invalid-cert",
            format!("CA certificate `{raw}` is not a PEM certificate"),
            help,
        ),
        format!("this file {problem}"),
    );
    false
}
