//! Content hashes of provisioning steps: the documented contract.
//!
//! A step's hash covers everything that decides what the step leaves in the
//! guest, and nothing else. The reconciler records it in the guest ledger when
//! the step succeeds; a different hash means the step must run again. The
//! machine's create-time settings are also hashed on their own (the
//! `bottle.spec-hash` label): a change there means replacing the machine.
//!
//! # Encoding
//!
//! SHA-256, written as 64 lower-case hex digits (the short form is the first
//! [`SHORT_LEN`]). The input is a sequence of byte strings, each prefixed with
//! its length as a little-endian `u64`, so two different inputs can never
//! encode the same. It starts with a version tag and the step id, then each
//! input below as its name followed by its value(s). Lists whose order means
//! nothing in the guest are sorted; maps are sorted by key. Files enter as the
//! SHA-256 of their content. Paths of files in the manifests directory enter
//! relative to it, with `/` separators, so moving or cloning the directory
//! changes nothing.
//!
//! A step's hash covers its own inputs only, not those of the steps it runs
//! after: the graph orders steps, it does not chain their hashes (a replaced
//! machine starts with an empty ledger, so every step runs again anyway) —
//! except for setup steps, below: a command that runs after another one
//! re-runs when that one re-ran.
//!
//! # Step hashes, version `bottle-step-v1`
//!
//! | step | inputs, in order |
//! | --- | --- |
//! | `machine` | `spec`: the spec hash below; `cpus`; `memory_mib`; `env`: each `KEY`, `VALUE` by key; `volumes`: each absolute host path, guest path, read-only flag, in declaration order (the absolute path is what the machine mounts: moving the manifests directory re-points volumes inside it, an update and restart, never a replacement); `user` |
//! | `ca` | `cert`: path of the certificate relative to the manifests directory, SHA-256 of its content. With a gate: `gate`, then `cert` and the same, or `none`; extended (below) by the project CA's SHA-256 |
//! | `prompt` | `user`; `content`: SHA-256 of the prompt file's content, of `prompt_text`, or of the empty string when there is no prompt (the guest path is fixed, so the source path is not an input) |
//! | `skills` | `user`; `skills`: per skill directory, sorted by its name in the guest (the directory's own name): that name, its tree digest |
//! | `git` | `user`; `gateway` (`gate:` when the gate serves it); `identity`: none, or `user.name`, `user.email`; `remotes`: each `name`, `upstream`, sorted by name. Served by the gate: extended by the gateway URL with the agent's credential |
//! | `setup:<name>` | `name`; `run`; `inputs`: per input, sorted by path relative to the manifests directory: that path, its tree digest. Runs as root, so not the user. When it comes after other steps (its `after`, or another setup step's `before` naming it; `machine` only when named in `after`), that hash is chained: the hash of `setup-after`, `own` and the hash above, then `after` and per step it comes after, sorted by id, its id and its step hash. A step without any keeps the hash above |
//! | `supervise` | `user`; `url` (`gate:` when the gate serves it; then extended by the endpoint URL with the agent's token) |
//!
//! "Extended": inputs known only with the state directory (the gate's
//! ports, the agent's credentials, the project CA) are hashed after the
//! manifests' (`gate-inputs`: the step hash, then each input; a setup
//! step after an extended `git` or `supervise` step: one input, per such
//! step its id and extended hash, one a line); `plan`,
//! `apply` and `check` see them, `graph` and `validate` do not.
//!
//! `user` is the bottle's agent user: it decides the home directory and the
//! owner of what the step writes.
//!
//! # Spec hash, version `bottle-spec-v1`
//!
//! Over the create-time settings smolvm cannot change (`machine update` has
//! no flag for them), so a difference means replacement. Each field is hashed
//! on its own (so a plan can name the field that differs); the spec hash is
//! over the field names and full field hashes, sorted by name.
//!
//! | field | inputs |
//! | --- | --- |
//! | `image` | `host` (no image, or `"host"`); `oci`, the reference as written; `rootfs-dir` or `archive`, then the path: relative to the manifests directory when inside it, else absolute (`~/images/...`). The content of a local image is not hashed: give a changed image a new name to roll it out |
//! | `egress` | `gate` when the bottle has a gate (DESIGN.md section 9), else whether the `egress` table is present (absent: no network at all) |
//! | `egress.allow_hosts` | with a gate, `gate` (the gate enforces them, live); else the hosts, sorted, duplicates removed |
//! | `egress.allow_cidrs` | the CIDRs, sorted, duplicates removed |
//! | `secrets` | per guest variable, by name: the name, then `gate` for a secret with `hosts` (the guest holds a placeholder), else `env` and the host variable, or `file` and the host path |
//!
//! `local.allow_unfiltered_network` is not an input anywhere: it is a
//! permission the local runtime checks, not a setting of the machine.
//!
//! # Tree digest, version `bottle-tree-v1`
//!
//! For skill directories and setup inputs (a file or a directory). Every
//! entry under the root, the root included as the empty path, sorted by its
//! `/`-separated path relative to the root (bytewise): a kind, the path, then
//! for a directory and a file its permission bits (`mode & 0o7777`, as a
//! `u64`), for a file the SHA-256 of its content and for a symlink its
//! target (links are recorded, not followed; the root itself is followed).
//! Kinds: `d` directory, `f` file, `l` symlink. The guest copy gets the same
//! permission bits (a `chmod 600` on the host is a change to roll out);
//! owners and timestamps are not inputs: the guest copy gets its own. A link
//! that leads outside the manifests directory (followed as the kernel would)
//! is refused, as a path naming it would be.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Component, Path};

use sha2::{Digest, Sha256};

use crate::manifest::model::{EgressSpec, GitSpec, SecretRef, SetupSpec};
use crate::manifest::{Bottle, Image, Project};

/// Version tag of step hashes. Changing any input of any step means bumping
/// it (every step of every guest runs again once).
pub const STEP_VERSION: &str = "bottle-step-v1";
/// Version tag of the spec hash. Changing it replaces every machine.
pub const SPEC_VERSION: &str = "bottle-spec-v1";
/// Version tag of tree digests.
pub const TREE_VERSION: &str = "bottle-tree-v2";

/// Hex digits in a short hash (48 bits: plenty to tell versions apart).
pub const SHORT_LEN: usize = 12;

/// A raw SHA-256 digest.
pub type Digest32 = [u8; 32];

/// The first [`SHORT_LEN`] hex digits of a hash.
pub fn short(hash: &str) -> &str {
    &hash[..hash.len().min(SHORT_LEN)]
}

pub fn hex(digest: &Digest32) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0xf) as usize] as char);
    }
    out
}

/// The unambiguous encoder described in the module docs.
pub(crate) struct Enc(Sha256);

impl Enc {
    pub(crate) fn new(version: &str, what: &str) -> Self {
        let mut enc = Enc(Sha256::new());
        enc.str(version);
        enc.str(what);
        enc
    }

    pub(crate) fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
        self
    }

    pub(crate) fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    pub(crate) fn u64(&mut self, n: u64) -> &mut Self {
        self.bytes(&n.to_le_bytes())
    }

    pub(crate) fn digest(&mut self, d: &Digest32) -> &mut Self {
        self.bytes(d)
    }

    pub(crate) fn finish(self) -> Digest32 {
        self.0.finalize().into()
    }

    pub(crate) fn finish_hex(self) -> String {
        hex(&self.finish())
    }
}

/// SHA-256 of a file's content, streamed.
pub fn file_digest(path: &Path) -> io::Result<Digest32> {
    file_digest_sized(path).map(|(digest, _)| digest)
}

/// SHA-256 of a file's content, and how many bytes it holds.
pub fn file_digest_sized(path: &Path) -> io::Result<(Digest32, u64)> {
    let mut file = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let bytes = io::copy(&mut file, &mut hasher)?;
    Ok((hasher.finalize().into(), bytes))
}

pub fn bytes_digest(bytes: &[u8]) -> Digest32 {
    Sha256::digest(bytes).into()
}

/// Why a tree could not be digested.
#[derive(Debug)]
pub enum TreeError {
    Io(io::Error),
    /// A symbolic link below the root leads outside `boundary`: `link` is
    /// its path relative to the root, `target` what it points to.
    LinkEscapes {
        link: Vec<u8>,
        target: Vec<u8>,
    },
    /// The files hold more bytes than the budget given: nothing was hashed.
    TooLarge(TreeSize),
}

impl From<io::Error> for TreeError {
    fn from(e: io::Error) -> Self {
        TreeError::Io(e)
    }
}

/// The tree digest of a file or directory (see the module docs). Every
/// symbolic link below the root must lead inside `boundary` (the canonical
/// manifests directory): links are copied into the guest as links, so one
/// rule holds at every level, as it does for the root itself.
pub fn tree_digest(root: &Path, boundary: &Path) -> Result<Digest32, TreeError> {
    tree_digest_sized(root, boundary, None).map(|(digest, _)| digest)
}

/// How much a probe of a copied tree reads: its entries (the root
/// included) and the bytes of its files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeSize {
    pub entries: u64,
    pub bytes: u64,
}

/// [`tree_digest`], with the tree's size; with a `budget`, a tree whose
/// files hold more bytes (by their metadata) is not read at all.
pub fn tree_digest_sized(
    root: &Path,
    boundary: &Path,
    budget: Option<u64>,
) -> Result<(Digest32, TreeSize), TreeError> {
    enum Kind {
        Dir { mode: u32 },
        File { mode: u32 },
        Link(Vec<u8>),
    }
    let mut entries: Vec<(Vec<u8>, std::path::PathBuf, Kind)> = Vec::new();
    // The root is followed (the manifest named it); links below it are not.
    let root_meta = fs::metadata(root)?;
    let mut stack = Vec::new();
    if root_meta.is_dir() {
        entries.push((
            Vec::new(),
            root.to_owned(),
            Kind::Dir {
                mode: permissions(&root_meta),
            },
        ));
        stack.push((Vec::new(), root.to_owned()));
    } else {
        entries.push((
            Vec::new(),
            root.to_owned(),
            Kind::File {
                mode: permissions(&root_meta),
            },
        ));
    }
    while let Some((rel, dir)) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let mut child_rel = rel.clone();
            if !child_rel.is_empty() {
                child_rel.push(b'/');
            }
            child_rel.extend_from_slice(os_bytes(&entry.file_name()).as_ref());
            let path = entry.path();
            // Does not follow links; stats relative to the open directory.
            let meta = entry.metadata()?;
            let ft = meta.file_type();
            let kind = if ft.is_dir() {
                stack.push((child_rel.clone(), path.clone()));
                Kind::Dir {
                    mode: permissions(&meta),
                }
            } else if ft.is_file() {
                Kind::File {
                    mode: permissions(&meta),
                }
            } else if ft.is_symlink() {
                let target = fs::read_link(&path)?;
                let inside = fs::canonicalize(&dir)
                    .ok()
                    .and_then(|dir| resolve(&dir, &target, 40))
                    .is_some_and(|resolved| resolved.starts_with(boundary));
                if !inside {
                    return Err(TreeError::LinkEscapes {
                        link: child_rel,
                        target: os_bytes(target.as_os_str()).into_owned(),
                    });
                }
                Kind::Link(os_bytes(target.as_os_str()).into_owned())
            } else {
                return Err(TreeError::Io(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{} is not a file, a directory or a symbolic link",
                        path.display()
                    ),
                )));
            };
            entries.push((child_rel, path, kind));
        }
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));

    let mut size = TreeSize {
        entries: entries.len() as u64,
        bytes: 0,
    };
    if let Some(budget) = budget {
        let mut bytes = 0u64;
        for (_, path, kind) in &entries {
            if let Kind::File { .. } = kind {
                bytes = bytes.saturating_add(fs::metadata(path)?.len());
            }
        }
        if bytes > budget {
            return Err(TreeError::TooLarge(TreeSize { bytes, ..size }));
        }
    }
    let mut enc = Enc::new(TREE_VERSION, "tree");
    enc.u64(entries.len() as u64);
    for (rel, path, kind) in &entries {
        match kind {
            Kind::Dir { mode } => {
                enc.str("d").bytes(rel).u64((*mode).into());
            }
            Kind::File { mode } => {
                let (digest, bytes) = file_digest_sized(path)?;
                size.bytes = size.bytes.saturating_add(bytes);
                enc.str("f").bytes(rel).u64((*mode).into()).digest(&digest);
            }
            Kind::Link(target) => {
                enc.str("l").bytes(rel).bytes(target);
            }
        }
    }
    Ok((enc.finish(), size))
}

/// The permission bits a tree entry carries into the guest.
#[cfg(unix)]
fn permissions(meta: &fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o7777
}

#[cfg(not(unix))]
fn permissions(meta: &fs::Metadata) -> u32 {
    if meta.is_dir() { 0o755 } else { 0o644 }
}

/// Where `target`, read from a link in the canonical directory `dir`,
/// leads: resolved component by component as the kernel would, following
/// links on the way (at most `depth` of them); components that do not exist
/// are taken as written. `None` for a loop.
fn resolve(dir: &Path, target: &Path, depth: u32) -> Option<std::path::PathBuf> {
    let mut current = dir.to_owned();
    for component in target.components() {
        match component {
            Component::RootDir | Component::Prefix(_) => current = component.as_os_str().into(),
            Component::CurDir => {}
            Component::ParentDir => {
                current.pop();
            }
            Component::Normal(name) => {
                let next = current.join(name);
                match fs::symlink_metadata(&next) {
                    Ok(meta) if meta.is_symlink() => {
                        let inner = fs::read_link(&next).ok()?;
                        current = resolve(&current, &inner, depth.checked_sub(1)?)?;
                    }
                    _ => current = next,
                }
            }
        }
    }
    Some(current)
}

#[cfg(unix)]
pub(crate) fn os_bytes(s: &std::ffi::OsStr) -> std::borrow::Cow<'_, [u8]> {
    use std::os::unix::ffi::OsStrExt;
    std::borrow::Cow::Borrowed(s.as_bytes())
}

#[cfg(not(unix))]
pub(crate) fn os_bytes(s: &std::ffi::OsStr) -> std::borrow::Cow<'_, [u8]> {
    match s.to_string_lossy() {
        std::borrow::Cow::Borrowed(s) => std::borrow::Cow::Borrowed(s.as_bytes()),
        std::borrow::Cow::Owned(s) => std::borrow::Cow::Owned(s.into_bytes()),
    }
}

/// A path as a hash input: relative to the manifests directory with `/`
/// separators when inside it, else absolute.
pub fn normalised_path(project: &Project, path: &Path) -> Vec<u8> {
    let rel = project.relative(path);
    let mut out = Vec::new();
    for comp in rel.components() {
        match comp {
            Component::RootDir => {
                out.push(b'/');
                continue;
            }
            Component::CurDir => continue,
            Component::Prefix(p) => out.extend_from_slice(&os_bytes(p.as_os_str())),
            Component::ParentDir => out.extend_from_slice(b".."),
            Component::Normal(s) => out.extend_from_slice(&os_bytes(s)),
        }
        out.push(b'/');
    }
    if out.len() > 1 {
        out.pop();
    }
    out
}

/// The machine's hashes, split the way the reconciler needs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineHashes {
    /// Over the create-time settings (label `bottle.spec-hash`): when it
    /// differs, the machine must be replaced.
    pub spec_hash: String,
    /// Short hash of each create-time field, by name (`image`, `egress`,
    /// `egress.allow_hosts`, `egress.allow_cidrs`, `secrets`), so a plan can
    /// say which one differs.
    pub fields: BTreeMap<&'static str, String>,
    /// The settings `smolvm machine update` changes (with a restart).
    pub mutable: MutableSettings,
}

/// Settings of a machine that `smolvm machine update` can change. smolvm
/// reports cpus and memory (compare values); it does not report env or
/// volumes, so those are hashes bottle must remember.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MutableSettings {
    pub cpus: u32,
    pub memory_mib: u32,
    /// Short hash of the environment (by key: key, value).
    pub env: String,
    /// Short hash of the volumes (absolute host path, guest path, read-only;
    /// in order).
    pub volumes: String,
}

/// Field names of the spec hash, sorted.
pub const SPEC_FIELDS: [&str; 5] = [
    "egress",
    "egress.allow_cidrs",
    "egress.allow_hosts",
    "image",
    "secrets",
];

/// The machine hashes of a bottle.
pub fn machine_hashes(project: &Project, bottle: &Bottle) -> MachineHashes {
    let full = spec_field_hashes(project, bottle);
    let mut spec = Enc::new(SPEC_VERSION, "spec");
    for (name, digest) in &full {
        spec.str(name).digest(digest);
    }
    let fields = full
        .iter()
        .map(|(name, d)| (*name, short(&hex(d)).to_owned()))
        .collect();
    MachineHashes {
        spec_hash: spec.finish_hex(),
        fields,
        mutable: MutableSettings {
            cpus: bottle.spec.cpus,
            memory_mib: bottle.spec.memory_mib,
            env: short(&hex(&env_digest(&bottle.spec.env))).to_owned(),
            volumes: short(&hex(&volumes_digest(bottle))).to_owned(),
        },
    }
}

fn spec_field_hashes(project: &Project, bottle: &Bottle) -> BTreeMap<&'static str, Digest32> {
    let mut out = BTreeMap::new();

    let mut image = Enc::new(SPEC_VERSION, "image");
    match &bottle.image {
        Image::Host => image.str("host"),
        Image::Reference(r) => image.str("oci").str(r),
        Image::RootfsDir(p) => image.str("rootfs-dir").bytes(&normalised_path(project, p)),
        Image::Archive(p) => image.str("archive").bytes(&normalised_path(project, p)),
    };
    out.insert("image", image.finish());

    let egress = bottle.spec.egress.as_ref();
    let gated = crate::gate::reconcile::has_gate(&bottle.spec);
    let mut present = Enc::new(SPEC_VERSION, "egress");
    present.str(if gated {
        "gate"
    } else if egress.is_some() {
        "present"
    } else {
        "absent"
    });
    out.insert("egress", present.finish());
    let empty = EgressSpec::default();
    let egress = egress.unwrap_or(&empty);
    // With a gate, the hosts are the gate's to enforce (and change live):
    // the machine never sees them.
    let hosts = if gated {
        let mut enc = Enc::new(SPEC_VERSION, "egress.allow_hosts");
        enc.str("gate");
        enc.finish()
    } else {
        sorted_set_digest("egress.allow_hosts", &egress.allow_hosts)
    };
    out.insert("egress.allow_hosts", hosts);
    out.insert(
        "egress.allow_cidrs",
        sorted_set_digest("egress.allow_cidrs", &egress.allow_cidrs),
    );

    let mut secrets = Enc::new(SPEC_VERSION, "secrets");
    secrets.u64(bottle.spec.secrets.len() as u64);
    for (name, reference) in &bottle.spec.secrets {
        secrets.str(name);
        match reference {
            // The guest holds a placeholder: where the value comes from
            // and where it may go are the gate's alone.
            SecretRef { hosts, .. } if !hosts.is_empty() => secrets.str("gate"),
            SecretRef {
                from_env: Some(var),
                from_file: None,
                ..
            } => secrets.str("env").str(var),
            SecretRef {
                from_env: None,
                from_file: Some(path),
                ..
            } => secrets.str("file").str(path),
            // Invalid (rejected by the loader); still hashed unambiguously.
            SecretRef {
                from_env,
                from_file,
                ..
            } => secrets
                .str("invalid")
                .str(from_env.as_deref().unwrap_or(""))
                .str(from_file.as_deref().unwrap_or("")),
        };
    }
    out.insert("secrets", secrets.finish());
    debug_assert!(out.keys().copied().eq(SPEC_FIELDS));
    out
}

fn sorted_set_digest(what: &str, items: &[String]) -> Digest32 {
    let mut items: Vec<&str> = items.iter().map(String::as_str).collect();
    items.sort_unstable();
    items.dedup();
    let mut enc = Enc::new(SPEC_VERSION, what);
    enc.u64(items.len() as u64);
    for item in items {
        enc.str(item);
    }
    enc.finish()
}

fn env_digest(env: &BTreeMap<String, String>) -> Digest32 {
    let mut enc = Enc::new(STEP_VERSION, "env");
    enc.u64(env.len() as u64);
    for (k, v) in env {
        enc.str(k).str(v);
    }
    enc.finish()
}

fn volumes_digest(bottle: &Bottle) -> Digest32 {
    let mut enc = Enc::new(STEP_VERSION, "volumes");
    enc.u64(bottle.volumes.len() as u64);
    for v in &bottle.volumes {
        enc.bytes(&os_bytes(v.host.as_os_str()))
            .str(&v.guest)
            .str(if v.read_only { "ro" } else { "rw" });
    }
    enc.finish()
}

/// The `machine` step hash.
pub fn machine_step(bottle: &Bottle, hashes: &MachineHashes) -> String {
    let mut enc = Enc::new(STEP_VERSION, "machine");
    enc.str("spec").str(&hashes.spec_hash);
    enc.str("cpus").u64(bottle.spec.cpus.into());
    enc.str("memory_mib").u64(bottle.spec.memory_mib.into());
    enc.str("env").digest(&env_digest(&bottle.spec.env));
    enc.str("volumes").digest(&volumes_digest(bottle));
    enc.str("user").str(&bottle.spec.user);
    enc.finish_hex()
}

/// The `ca` step hash, from the certificate's path and content digest.
pub fn ca_step(cert_path: &[u8], cert: &Digest32) -> String {
    let mut enc = Enc::new(STEP_VERSION, "ca");
    enc.str("cert").bytes(cert_path).digest(cert);
    enc.finish_hex()
}

/// The `prompt` step hash, from the digest of the prompt's content.
pub fn prompt_step(user: &str, content: &Digest32) -> String {
    let mut enc = Enc::new(STEP_VERSION, "prompt");
    enc.str("user").str(user);
    enc.str("content").digest(content);
    enc.finish_hex()
}

/// The `skills` step hash, from each skill's guest name and tree digest.
pub fn skills_step(user: &str, skills: &[(Vec<u8>, Digest32)]) -> String {
    let mut skills: Vec<&(Vec<u8>, Digest32)> = skills.iter().collect();
    skills.sort();
    let mut enc = Enc::new(STEP_VERSION, "skills");
    enc.str("user").str(user);
    enc.str("skills").u64(skills.len() as u64);
    for (name, digest) in &skills {
        enc.bytes(name).digest(digest);
    }
    enc.finish_hex()
}

/// The `git` step hash.
pub fn git_step(user: &str, git: &GitSpec) -> String {
    let mut enc = Enc::new(STEP_VERSION, "git");
    enc.str("user").str(user);
    // `gate:` can be no http URL: the gate's own gateway, whose URL (with
    // the agent's credential) `Desired` adds to the hash.
    enc.str("gateway")
        .str(git.gateway.as_deref().unwrap_or("gate:"));
    enc.str("identity");
    match &git.user {
        None => enc.str("none"),
        Some(u) => enc.str("some").str(&u.name).str(&u.email),
    };
    let mut remotes: Vec<(&str, &str)> = git
        .remote
        .iter()
        .map(|r| (r.name.as_str(), r.upstream.as_str()))
        .collect();
    remotes.sort_unstable();
    enc.str("remotes").u64(remotes.len() as u64);
    for (name, upstream) in remotes {
        enc.str(name).str(upstream);
    }
    enc.finish_hex()
}

/// A `setup` step hash, from each input's normalised path and tree digest.
pub fn setup_step(setup: &SetupSpec, inputs: &[(Vec<u8>, Digest32)]) -> String {
    let mut inputs: Vec<&(Vec<u8>, Digest32)> = inputs.iter().collect();
    inputs.sort();
    inputs.dedup();
    let mut enc = Enc::new(STEP_VERSION, "setup");
    enc.str("name").str(&setup.name);
    enc.str("run").str(&setup.run);
    enc.str("inputs").u64(inputs.len() as u64);
    for (path, digest) in inputs {
        enc.bytes(path).digest(digest);
    }
    enc.finish_hex()
}

/// A setup step's hash with the hashes of the steps it comes after: its own
/// hash when there are none, else the hash of it and each `(id, hash)`,
/// sorted by id. A step it comes after that re-ran (a different hash) makes
/// it run again.
pub fn setup_after(own: &str, after: &[(String, String)]) -> String {
    if after.is_empty() {
        return own.to_owned();
    }
    let mut after: Vec<&(String, String)> = after.iter().collect();
    after.sort();
    let mut enc = Enc::new(STEP_VERSION, "setup-after");
    enc.str("own").str(own);
    enc.str("after").u64(after.len() as u64);
    for (id, hash) in after {
        enc.str(id).str(hash);
    }
    enc.finish_hex()
}

/// The `supervise` step hash; `None`: the gate's endpoint.
pub fn supervise_step(user: &str, url: Option<&str>) -> String {
    let mut enc = Enc::new(STEP_VERSION, "supervise");
    enc.str("user").str(user);
    enc.str("url").str(url.unwrap_or("gate:"));
    enc.finish_hex()
}

/// The `gate` node hash: the gate settings a bottle declares (allow_hosts,
/// allow_internal, secrets with hosts and their sources, git remotes served
/// by the gate, supervise served by it). Not stored anywhere: the running
/// gate reports the hash of the config it serves, which also holds ports
/// and credentials.
pub fn gate_node(bottle: &Bottle) -> String {
    let spec = &bottle.spec;
    let mut enc = Enc::new(STEP_VERSION, "gate");
    let egress = spec.egress.clone().unwrap_or_default();
    let mut hosts = egress.allow_hosts.clone();
    hosts.sort_unstable();
    hosts.dedup();
    enc.str("allow_hosts").u64(hosts.len() as u64);
    for h in &hosts {
        enc.str(h);
    }
    let mut internal = egress.allow_internal.clone();
    internal.sort_unstable();
    internal.dedup();
    enc.str("allow_internal").u64(internal.len() as u64);
    for c in &internal {
        enc.str(c);
    }
    let secrets: Vec<_> = spec
        .secrets
        .iter()
        .filter(|(_, s)| !s.hosts.is_empty())
        .collect();
    enc.str("secrets").u64(secrets.len() as u64);
    for (name, s) in secrets {
        enc.str(name)
            .str(s.from_env.as_deref().unwrap_or(""))
            .str(s.from_file.as_deref().unwrap_or(""));
        enc.u64(s.hosts.len() as u64);
        for h in &s.hosts {
            enc.str(h);
        }
    }
    let remotes = spec
        .git
        .as_ref()
        .filter(|g| g.gateway.is_none())
        .map_or(&[][..], |g| g.remote.as_slice());
    enc.str("git").u64(remotes.len() as u64);
    for r in remotes {
        let json = serde_json::to_string(r).expect("remotes serialize");
        enc.str(&json);
    }
    enc.str("supervise").str(
        if spec.supervise.as_ref().is_some_and(|s| s.url.is_none()) {
            "gate"
        } else {
            "no"
        },
    );
    enc.finish_hex()
}

/// The `ca` step hash of a bottle with a gate: the project CA (whose
/// digest `Desired` adds) and the declared certificate, if any.
pub fn gate_ca_step(declared: Option<(&[u8], &Digest32)>) -> String {
    let mut enc = Enc::new(STEP_VERSION, "ca");
    enc.str("gate");
    match declared {
        Some((path, digest)) => enc.str("cert").bytes(path).digest(digest),
        None => enc.str("none"),
    };
    enc.finish_hex()
}

/// A step hash with inputs only known with the state directory (the
/// gate's URLs and credentials, its CA): `hash` extended by them.
pub fn with_gate_inputs(hash: &str, inputs: &[&str]) -> String {
    let mut enc = Enc::new(STEP_VERSION, "gate-inputs");
    enc.str(hash);
    enc.u64(inputs.len() as u64);
    for i in inputs {
        enc.str(i);
    }
    enc.finish_hex()
}
