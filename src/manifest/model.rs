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

use super::names::{ENV_NAME_PATTERN, NAME_PATTERN};

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
    /// gets its own machine built from it. Names: 1-48 lower-case letters,
    /// digits and '-', starting with a letter, no trailing '-', no '--'.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("propertyNames" = { "pattern": NAME_PATTERN, "maxLength": 48 }))]
    pub bottle: BTreeMap<String, BottleSpec>,

    /// Agents, by name: who runs inside a bottle. Each agent gets its own
    /// machine. Names follow the same rule as bottle names.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("propertyNames" = { "pattern": NAME_PATTERN, "maxLength": 48 }))]
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
    #[schemars(pattern(NAME_PATTERN), length(max = 48))]
    pub name: Option<String>,
}

/// A sandbox profile. Create-time settings (image, egress, secrets) replace
/// the machine when they change; cpus, memory, env and volumes are updated
/// in place with a restart.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BottleSpec {
    /// The guest root filesystem, passed to `smolvm machine create --image`:
    /// an OCI reference (`ghcr.io/acme/agent-base:1.2`), or a local path: a
    /// value starting with `.`, `/` or `~` is a path (relative to this file,
    /// `~/` is your home; it may lie outside the manifests directory but
    /// must exist): a directory is an unpacked root filesystem, a file a
    /// `docker save` archive. Default: absent, same as `"host"`: smolvm's
    /// default image, or on the local runtime the host's system directories
    /// read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// Virtual CPUs, 1 to 255 (smolvm's range). Default: 2.
    #[serde(default = "default_cpus")]
    #[schemars(range(min = 1, max = 255))]
    pub cpus: u32,

    /// Memory in MiB, at least 64. Default: 2048.
    #[serde(default = "default_memory_mib")]
    #[schemars(range(min = 64))]
    pub memory_mib: u32,

    /// Guest user that runs the agent; its home is `/home/<user>`. Created in
    /// the guest if the image lacks it. Not `root` (Claude Code refuses to
    /// skip permission prompts as root). Default: `node`.
    #[serde(default = "default_user")]
    #[schemars(pattern(r"^[a-z_][a-z0-9_-]{0,31}$"))]
    pub user: String,

    /// Environment variables set in the guest, by name. Literal values only,
    /// passed as written (`${VAR}` is not expanded): anything secret belongs
    /// in `secrets`. Default: none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("propertyNames" = { "pattern": ENV_NAME_PATTERN }))]
    pub env: BTreeMap<String, String>,

    /// Secrets, by guest environment variable name, as references that are
    /// resolved on the host at each launch. Values never appear in a manifest,
    /// a plan, a log or a file bottle writes. Default: none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("propertyNames" = { "pattern": ENV_NAME_PATTERN }))]
    pub secrets: BTreeMap<String, SecretRef>,

    /// Host paths shared with the guest, `HOST:GUEST` or `HOST:GUEST:ro`. A
    /// relative host path is relative to this file and `~/` is your home; it
    /// may lie outside the manifests directory (a deliberate share) but must
    /// exist. The guest path is absolute. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,

    /// Network access. Default: absent, and without this table the guest has
    /// no network at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressSpec>,

    /// A CA certificate the guest must trust (the egress proxy's). Default:
    /// absent, the image's trust store unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<CaSpec>,

    /// Git access, only through a git gateway. Default: absent, no git
    /// configuration written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<GitSpec>,

    /// The operator supervision endpoint, registered as an MCP server.
    /// Default: absent, not supervised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervise: Option<SuperviseSpec>,

    /// User-defined provisioning steps, run as root in the guest in
    /// dependency order, and again whenever their command or inputs change.
    /// Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub setup: Vec<SetupSpec>,

    /// Settings that only the local (bubblewrap) runtime reads. Default:
    /// absent, all settings at their defaults.
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

/// A secret reference. Exactly one of `from_env` or `from_file`; never the
/// value itself. With `hosts`, the value never enters the guest: the guest's
/// variable holds a random placeholder, and the bottle's gate puts the real
/// value in its place in the request headers it sends to those hosts only.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("oneOf" = [{ "required": ["from_env"] }, { "required": ["from_file"] }]))]
pub struct SecretRef {
    /// Name of a host environment variable holding the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(ENV_NAME_PATTERN))]
    pub from_env: Option<String>,
    /// Absolute host path of a file holding the value (`~` is not expanded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern("^/"))]
    pub from_file: Option<String>,
    /// Hosts the value may be sent to, in the grammar of
    /// `egress.allow_hosts` (`host`, `host:port`, `*.domain`). With them, the
    /// guest holds a placeholder and the gate adds the value on the way out,
    /// inside TLS it intercepts for these hosts only. Without them the value
    /// is in the guest's environment, where the agent can read it. Default:
    /// none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

/// Where the guest may connect. Hosts are enforced by the bottle's gate (an
/// HTTP proxy on the host: the guest gets `HTTPS_PROXY`), and can change
/// without touching a machine; networks are enforced by the runtime when the
/// machine is created. At least one host or network.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EgressSpec {
    /// Hosts the guest may reach through the gate: `host` (ports 443 and
    /// 80), `host:port`, or `*.domain` (any name below `domain`), no scheme
    /// or path. Nothing is added implicitly: list the hosts Claude Code needs
    /// too (`api.anthropic.com`). Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_hosts: Vec<String>,
    /// Networks the guest may reach, in CIDR notation (`--allow-cidr`), e.g.
    /// `10.8.0.0/16`; one address is `/32`. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_cidrs: Vec<String>,
    /// Networks in CIDR notation the gate may dial although they are
    /// internal (loopback, private, link-local, CGNAT, unspecified), which it
    /// otherwise never does whatever a name resolves to, e.g.
    /// `["10.8.0.0/16"]` for a registry on the office network. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_internal: Vec<String>,
}

/// A trusted CA certificate.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CaSpec {
    /// PEM certificate file, relative to this manifest and inside the
    /// manifests directory (certificates only, never a private key).
    /// Installed into `/usr/local/share/ca-certificates/` and the guest trust
    /// store.
    pub cert: String,
}

/// Git access through a gateway: every remote's upstream URL is rewritten
/// (`url.<gateway>/<name>.git.insteadOf`) so clone, fetch and push all go
/// through the gateway. Without `gateway`, the bottle's gate serves the
/// remotes itself, holding their credentials.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GitSpec {
    /// Base URL of an external git gateway, http or https, e.g.
    /// `http://10.8.0.2:9418` (no credentials, query or fragment). Default:
    /// absent, the bottle's gate serves the remotes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern("^[Hh][Tt][Tt][Pp][Ss]?://"))]
    pub gateway: Option<String>,
    /// Commit identity written to the agent user's `~/.gitconfig`. Default:
    /// absent, none written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<GitUser>,
    /// Remotes the agent may use, as `[[bottle.<name>.git.remote]]` tables.
    /// Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote: Vec<GitRemote>,
}

/// `user.name` and `user.email` for commits made in the guest.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GitUser {
    /// `user.name`, e.g. `Bottle Bot`.
    pub name: String,
    /// `user.email`, e.g. `bot@example.com`.
    pub email: String,
}

/// One git remote, reached as `<gateway>/<name>.git`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GitRemote {
    /// Name of the repository on the gateway: letters, digits, '.', '_' and
    /// '-', without the `.git` suffix (the URL adds it).
    #[schemars(pattern(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$"), length(max = 100))]
    pub name: String,
    /// The real upstream URL the agent uses (e.g.
    /// `git@github.com:acme/app.git`); rewritten to the gateway. ssh
    /// (`git@host:path`, `ssh://`), `https://`, `git://`, `file://` or an
    /// absolute path.
    pub upstream: String,
    /// How the gate authenticates to `upstream` (served by the gate only):
    /// `{ ssh_key = { from_file = "/abs/key" } }` or
    /// `{ token = { from_env = "GH_PAT" } }` for https. Resolved on the host;
    /// the guest never holds them. Default: absent, no credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<GitCredentialsSpec>,
    /// Branches the agent may push, as glob patterns (`agent/*`), fast
    /// forwards only (served by the gate only). Default: none, read-only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub push: Vec<String>,
    /// The upstream's ssh host key, as a `known_hosts` line (served by the
    /// gate only). Default: absent, the user's known hosts decide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key: Option<String>,
}

/// Credentials the gate uses for a remote's upstream. Exactly one of
/// `ssh_key` or `token`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("oneOf" = [{ "required": ["ssh_key"] }, { "required": ["token"] }]))]
pub struct GitCredentialsSpec {
    /// An ssh private key file on the host: `{ from_file = "/abs/path" }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_key: Option<KeyFile>,
    /// An https token, as a secret reference:
    /// `{ from_env = "GH_PAT" }` or `{ from_file = "/abs/path" }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<SecretRef>,
}

/// A key file on the host.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    /// Absolute host path of the file (`~` is not expanded).
    #[schemars(pattern("^/"))]
    pub from_file: String,
}

/// Operator supervision.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SuperviseSpec {
    /// URL of an external operator MCP endpoint (HTTP transport), http or
    /// https, registered as the `supervise` MCP server in the agent user's
    /// `~/.claude.json`. Default: absent, the bottle's gate serves it
    /// (`bottle supervise` answers the agent's requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern("^[Hh][Tt][Tt][Pp][Ss]?://"))]
    pub url: Option<String>,
}

/// A user-defined provisioning step.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetupSpec {
    /// Step name, unique within the bottle (same rule as agent names), and
    /// not a built-in step's name (`machine`, `ca`, `prompt`, `skills`,
    /// `git`, `supervise`).
    #[schemars(pattern(NAME_PATTERN), length(max = 48))]
    pub name: String,
    /// Shell command run as root with `sh -c` in the guest.
    #[schemars(length(min = 1))]
    pub run: String,
    /// Steps this one runs after: built-in steps (`machine`, `ca`, `prompt`,
    /// `skills`, `git`) or other setup steps of this bottle. Every setup step
    /// runs after `machine`, and `supervise` runs after every setup step, so
    /// it cannot be named here. Default: only `machine`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    /// Steps that run after this one: built-in steps (`ca`, `prompt`,
    /// `skills`, `git`) or other setup steps of this bottle, e.g. to install
    /// `git` and `ca-certificates` on an image without them before the `git`
    /// and `ca` steps use them. Not `machine`, which everything runs after.
    /// Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub before: Vec<String>,
    /// Host files or directories (relative to this manifest, inside the
    /// manifests directory) the command depends on: when their content
    /// changes the step runs again. They are copied into the guest under
    /// `/opt/bottle/setup/<name>/`. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<String>,
}

/// Local-runtime settings.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LocalSpec {
    /// The local runtime enforces egress through the gate (the guest's
    /// network holds only the gate), but cannot filter `allow_cidrs`. A
    /// bottle with `allow_cidrs` is refused on it unless this is `true`,
    /// which gives the guest the host's network, unfiltered, without the
    /// gate. Default: `false`.
    #[serde(default)]
    pub allow_unfiltered_network: bool,
}

/// An agent: who runs inside a bottle.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    /// Name of the bottle (sandbox profile) the agent runs in, declared in
    /// any manifest of the directory.
    pub bottle: String,
    /// System prompt file, relative to this manifest and inside the
    /// manifests directory. Mutually exclusive with `prompt_text`. The
    /// prompt file is always written to the guest; the agent gets
    /// `--append-system-prompt-file` only when it is non-empty. Default:
    /// absent, an empty prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// System prompt given inline. Mutually exclusive with `prompt`.
    /// Default: absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_text: Option<String>,
    /// Skill directories, relative to this manifest and inside the manifests
    /// directory, each holding a `SKILL.md` and copied whole to
    /// `~/.claude/skills/<directory name>/`. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skills: Vec<String>,
}
