//! The manifest format, version 1, as serde types.
//!
//! These types are the single source of truth for the format: the loader
//! deserializes into them and `schemas/bottle.schema.json` is generated from
//! them (`bottle schema`). Doc comments become the schema's descriptions, so
//! they are written for manifest authors.
//!
//! Paths stay as written here (relative to the file that names them); the
//! loader resolves them into [`super::Project`].

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One manifest file. Every `*.toml` file under the manifests directory may
/// hold any mix of bottles and agents; names are unique across the directory.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "bottle manifest (format version 1)")]
pub struct ManifestFile {
    /// Project settings. Only allowed in `bottle.toml` at the root of the
    /// manifests directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<ProjectSpec>,

    /// Sandbox profiles ("bottles"), by name. Every agent that uses a bottle
    /// gets its own machine built from it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub bottle: BTreeMap<String, BottleSpec>,

    /// Agents, by name: who runs inside a bottle.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub agent: BTreeMap<String, AgentSpec>,
}

/// Project-wide settings (root `bottle.toml` only).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProjectSpec {
    /// The project id stamped on every machine (label `bottle.project`), so
    /// two manifest directories never touch each other's machines. Set it to
    /// keep the id stable when the directory is moved or cloned under another
    /// name; without it the id is derived from the name of the directory that
    /// contains the manifests directory. Same rule as agent names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A sandbox profile. Create-time settings (image, egress, secrets) replace
/// the machine when they change; cpus, memory, env and volumes are updated
/// in place with a restart.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BottleSpec {
    /// The guest root filesystem, passed to `smolvm machine create --image`:
    /// an OCI reference, a `docker save` archive or an unpacked rootfs
    /// directory (local paths are relative to this file). Omit it (or write
    /// `"host"`) on the local runtime to use the host's system directories
    /// read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// Virtual CPUs.
    #[serde(default = "default_cpus")]
    #[schemars(range(min = 1, max = 256))]
    pub cpus: u32,

    /// Memory in MiB.
    #[serde(default = "default_memory_mib")]
    #[schemars(range(min = 64))]
    pub memory_mib: u32,

    /// Guest user that runs the agent; its home is `/home/<user>`. Created in
    /// the guest if the image lacks it.
    #[serde(default = "default_user")]
    pub user: String,

    /// Environment variables set in the guest. Literal values only: anything
    /// secret belongs in `secrets`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,

    /// Secrets, by guest environment variable name, as references that are
    /// resolved on the host at each launch. Values never appear in a manifest,
    /// a plan, a log or a file bottle writes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, SecretRef>,

    /// Host directories shared with the guest, `HOST:GUEST` or
    /// `HOST:GUEST:ro`. A relative host path is relative to this file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,

    /// Network access. Without this table the guest has no network at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressSpec>,

    /// A CA certificate the guest must trust (the egress proxy's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<CaSpec>,

    /// Git access, only through a git gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<GitSpec>,

    /// The operator supervision endpoint, registered as an MCP server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervise: Option<SuperviseSpec>,

    /// User-defined provisioning steps, run as root in the guest in
    /// dependency order, and again whenever their command or inputs change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub setup: Vec<SetupSpec>,

    /// Settings that only the local (bubblewrap) runtime reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalSpec>,
}

pub fn default_cpus() -> u32 {
    2
}
pub fn default_memory_mib() -> u32 {
    2048
}
pub fn default_user() -> String {
    "node".to_owned()
}

/// A secret reference. Exactly one of `from_env` or `from_file`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    /// Name of a host environment variable holding the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_env: Option<String>,
    /// Absolute host path of a file holding the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_file: Option<String>,
}

/// Where the guest may connect. Hosts are resolved by smolvm when the
/// machine is created.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EgressSpec {
    /// Host names the guest may reach (`smolvm --allow-host`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_hosts: Vec<String>,
    /// Networks the guest may reach, in CIDR notation (`--allow-cidr`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_cidrs: Vec<String>,
}

/// A trusted CA certificate.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CaSpec {
    /// PEM certificate file, relative to this manifest. Installed into
    /// `/usr/local/share/ca-certificates/` and the guest trust store.
    pub cert: String,
}

/// Git access through a gateway: every remote's upstream URL is rewritten
/// (`url.<gateway>/<name>.git.insteadOf`) so clone, fetch and push all go
/// through the gateway.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GitSpec {
    /// Base URL of the git gateway, e.g. `http://10.8.0.2:9418`.
    pub gateway: String,
    /// Commit identity written to the agent user's `~/.gitconfig`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<GitUser>,
    /// Remotes the agent may use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote: Vec<GitRemote>,
}

/// `user.name` and `user.email` for commits made in the guest.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GitUser {
    pub name: String,
    pub email: String,
}

/// One git remote, reached as `<gateway>/<name>.git`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GitRemote {
    /// Name of the repository on the gateway.
    pub name: String,
    /// The real upstream URL the agent uses; rewritten to the gateway.
    pub upstream: String,
}

/// Operator supervision.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SuperviseSpec {
    /// URL of the operator's MCP endpoint (HTTP transport), registered as the
    /// `supervise` MCP server in the agent user's `~/.claude.json`.
    pub url: String,
}

/// A user-defined provisioning step.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetupSpec {
    /// Step name, unique within the bottle (same rule as agent names).
    pub name: String,
    /// Shell command run as root with `sh -c` in the guest.
    pub run: String,
    /// Steps this one runs after: built-in steps (`machine`, `ca`, `prompt`,
    /// `skills`, `git`) or other setup steps of this bottle. Every setup step
    /// runs after `machine`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    /// Host files or directories (relative to this manifest) the command
    /// depends on: when their content changes the step runs again. They are
    /// copied into the guest under `/opt/bottle/setup/<name>/`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<String>,
}

/// Local-runtime settings.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LocalSpec {
    /// The local runtime cannot enforce an egress allowlist. A bottle with an
    /// `egress` table is refused on it unless this is `true`, which gives the
    /// guest the host's network, unfiltered.
    #[serde(default)]
    pub allow_unfiltered_network: bool,
}

/// An agent: who runs inside a bottle.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    /// Name of the bottle (sandbox profile) the agent runs in.
    pub bottle: String,
    /// System prompt file, relative to this manifest. Mutually exclusive with
    /// `prompt_text`. The prompt file is always written to the guest; the
    /// agent gets `--append-system-prompt-file` only when it is non-empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// System prompt given inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_text: Option<String>,
    /// Skill directories, relative to this manifest, each copied whole to
    /// `~/.claude/skills/<directory name>/`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skills: Vec<String>,
}
