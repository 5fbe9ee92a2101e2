//! A bottle itself: resources, user, image, volumes and CA certificate;
//! the rest of its checks are in the sibling modules it calls.

use std::collections::BTreeSet;
use std::path::{Component, Path};

use super::network::{check_egress, check_gate_settings, check_git};
use super::paths::{Expect, host_path, resolve_inside};
use super::secrets::check_env_and_secrets;
use super::setup::setup;
use super::{PemProblem, check_http_url, diag, normalize};
use crate::manifest::load::{Cx, Decl, Kind};
use crate::manifest::model::BottleSpec;
use crate::manifest::source::Want;
use crate::manifest::{Bottle, FileId, Image, KeyPath, Volume};

/// Check a bottle; its resolved form even when it has problems (the
/// loader still looks for cycles in its setup steps), `None` only when it
/// did not deserialize.
pub(super) fn bottle(cx: &mut Cx, d: &Decl<BottleSpec>) -> Option<Bottle> {
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

/// Reads the CA file and checks it is PEM certificates only.
pub(super) fn check_cert(
    cx: &mut Cx,
    file: FileId,
    path: &KeyPath,
    raw: &str,
    cert: &Path,
) -> bool {
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
