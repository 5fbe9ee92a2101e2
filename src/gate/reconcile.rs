//! The reconciler's side of the gate: which bottles have one, the config
//! derived from the manifests, the ports and credentials chosen once and
//! kept in the state directory, what guests are given to reach it, and the
//! gate's lifecycle (health, start, reload, stop) over [`super::control`].
//!
//! # Kept in `state.json` (0600)
//! Each bottle's port (a free port on host loopback, chosen the first time
//! the bottle has a gate) and each agent's credentials (proxy, git and MCP
//! tokens; one placeholder per secret with `hosts`), so guests keep their
//! URLs and placeholders across gate restarts. They are chosen in memory by
//! whichever command needs them and written only by the command that starts
//! or reloads the gate (`apply`, `watch`), before any machine is created
//! with them.
//!
//! # Starting the gate
//! `apply` runs the current bottle executable as
//! `bottle --state-dir STATE gate run DIR` (the foreground form a service
//! manager runs), detached (`setsid`, stdio to `gate.log`'s neighbour
//! `gate.out`), waits until its control socket answers `health`, then sends
//! `reload` with the config and the secret values. Values are read by the
//! process that sends them, from its environment and files: never argv,
//! never a file bottle writes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::config::{
    AgentCredentials, BottleGate, CONFIG_FORMAT, GateConfig, GateRemote, GateSecret,
    GitCredentials, new_token,
};
use super::control::{self, ControlError, Health, Request, Response};
use super::paths::GatePaths;
use crate::manifest::model::{BottleSpec, SecretRef};
use crate::manifest::{Bottle, Project};
use crate::runtime::RuntimeKind;

/// The guest's gateway address on smolvm, relayed to host loopback.
pub const SMOLVM_GATE_IP: &str = "100.96.0.1";
/// Its name in smolvm guests.
pub const SMOLVM_GATE_NAME: &str = "host.smolvm.internal";
/// The one network a gated smolvm guest may reach besides `allow_cidrs`.
pub const SMOLVM_GATE_CIDR: &str = "100.96.0.1/32";
/// The guest's trust bundle (what `update-ca-certificates` writes).
pub const TRUST_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

pub const STATE_FORMAT: u32 = 1;

/// Whether a bottle gets a gate: it declares `egress.allow_hosts`, a secret
/// with `hosts`, `git` without `gateway`, or `supervise` without `url`.
pub fn has_gate(spec: &BottleSpec) -> bool {
    spec.egress
        .as_ref()
        .is_some_and(|e| !e.allow_hosts.is_empty())
        || spec.secrets.values().any(|s| !s.hosts.is_empty())
        || spec.git.as_ref().is_some_and(|g| g.gateway.is_none())
        || spec.supervise.as_ref().is_some_and(|s| s.url.is_none())
}

/// Whether a secret stays on the host (the guest gets a placeholder).
pub fn is_gated_secret(secret: &SecretRef) -> bool {
    !secret.hosts.is_empty()
}

/// Bottles with a gate that some agent uses, by name.
pub fn gated_bottles(project: &Project) -> BTreeSet<&str> {
    project
        .agents
        .values()
        .map(|a| a.spec.bottle.as_str())
        .filter(|b| project.bottles.get(*b).is_some_and(|b| has_gate(&b.spec)))
        .collect()
}

/// Ports and credentials chosen once (`state.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateState {
    pub format_version: u32,
    /// Host-loopback port per bottle.
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
    /// Credentials per agent.
    #[serde(default)]
    pub agents: BTreeMap<String, AgentCredentials>,
}

impl GateState {
    /// The state as kept, or empty when there is none. A file that cannot
    /// be read is an error (choosing new credentials would cut every guest
    /// off from its gate).
    pub fn load(paths: &GatePaths) -> Result<Self, GateError> {
        match fs::read(paths.state()) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| GateError::State {
                path: paths.state(),
                message: format!("unreadable: {e}"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(GateError::State {
                path: paths.state(),
                message: e.to_string(),
            }),
        }
    }

    /// Choose what is missing for the project's gated bottles and their
    /// agents (ports free now on 127.0.0.1, fresh tokens and placeholders),
    /// and drop placeholders of secrets that no longer have `hosts`.
    /// Returns whether anything changed. Ports and credentials of bottles
    /// and agents that left are kept: they come back with the same ones.
    pub fn fill(&mut self, project: &Project) -> bool {
        let before = self.clone();
        self.format_version = STATE_FORMAT;
        let gated = gated_bottles(project);
        for bottle in &gated {
            if !self.ports.contains_key(*bottle) {
                let taken: BTreeSet<u16> = self.ports.values().copied().collect();
                if let Some(port) = free_port(&taken) {
                    self.ports.insert((*bottle).to_owned(), port);
                }
            }
        }
        for (name, agent) in &project.agents {
            if !gated.contains(agent.spec.bottle.as_str()) {
                continue;
            }
            let bottle = &project.bottles[&agent.spec.bottle];
            let creds = self
                .agents
                .entry(name.clone())
                .or_insert_with(|| AgentCredentials {
                    proxy_token: new_token(),
                    git_token: new_token(),
                    mcp_token: new_token(),
                    placeholders: BTreeMap::new(),
                });
            let wanted: BTreeSet<&String> = bottle
                .spec
                .secrets
                .iter()
                .filter(|(_, s)| is_gated_secret(s))
                .map(|(n, _)| n)
                .collect();
            creds.placeholders.retain(|k, _| wanted.contains(k));
            for secret in wanted {
                creds
                    .placeholders
                    .entry(secret.clone())
                    .or_insert_with(new_placeholder);
            }
        }
        *self != before
    }

    /// Write `state.json` (0600, atomically).
    pub fn save(&self, paths: &GatePaths) -> Result<(), GateError> {
        write_private(
            paths,
            &paths.state(),
            &serde_json::to_vec_pretty(self).unwrap(),
        )
    }
}

/// A placeholder: random, never derived from the value it stands for, and
/// recognisable in a request the gate did not intercept.
pub fn new_placeholder() -> String {
    format!("bottle-placeholder-{}", new_token())
}

/// A port that is free on 127.0.0.1 now and not already given to another
/// bottle.
fn free_port(taken: &BTreeSet<u16>) -> Option<u16> {
    for _ in 0..32 {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .ok()?
            .port();
        if !taken.contains(&port) {
            return Some(port);
        }
    }
    None
}

/// `dir` (0700) and `path` in it (0600), written whole or not at all.
fn write_private(paths: &GatePaths, path: &Path, bytes: &[u8]) -> Result<(), GateError> {
    let err = |e: std::io::Error| GateError::State {
        path: path.to_owned(),
        message: e.to_string(),
    };
    fs::create_dir_all(&paths.dir).map_err(err)?;
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&paths.dir, fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    let tmp = paths.dir.join(format!(".tmp-{}", new_token()));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err)
}

/// Derive what the gate serves from the manifests and the kept state. A
/// bottle or agent the state has nothing for yet (no free port) is left
/// out; `fill` first.
pub fn derive_config(project: &Project, state: &GateState) -> GateConfig {
    let mut config = GateConfig {
        format_version: CONFIG_FORMAT,
        project: project.name.clone(),
        bottles: BTreeMap::new(),
    };
    for name in gated_bottles(project) {
        let bottle = &project.bottles[name];
        let Some(&port) = state.ports.get(name) else {
            continue;
        };
        let spec = &bottle.spec;
        let egress = spec.egress.clone().unwrap_or_default();
        let secrets = spec
            .secrets
            .iter()
            .filter(|(_, s)| is_gated_secret(s))
            .map(|(n, s)| GateSecret {
                name: n.clone(),
                hosts: s.hosts.clone(),
                value_key: value_key(s),
            })
            .collect();
        let agents = project
            .agents
            .iter()
            .filter(|(_, a)| a.spec.bottle == name)
            .filter_map(|(n, _)| Some((n.clone(), state.agents.get(n)?.clone())))
            .collect();
        let git = spec
            .git
            .as_ref()
            .filter(|g| g.gateway.is_none())
            .map(|g| {
                g.remote
                    .iter()
                    .map(|r| GateRemote {
                        name: r.name.clone(),
                        upstream: r.upstream.clone(),
                        credentials: r.credentials.as_ref().and_then(|c| {
                            match (&c.ssh_key, &c.token) {
                                (Some(key), _) => Some(GitCredentials::SshKey {
                                    path: PathBuf::from(&key.from_file),
                                }),
                                (None, Some(token)) => Some(GitCredentials::Token {
                                    value_key: value_key(token),
                                }),
                                (None, None) => None,
                            }
                        }),
                        push: r.push.clone(),
                        host_key: r.host_key.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        config.bottles.insert(
            name.to_owned(),
            BottleGate {
                port,
                allow_hosts: egress.allow_hosts,
                allow_internal: egress.allow_internal,
                secrets,
                agents,
                git,
                supervise: spec.supervise.as_ref().is_some_and(|s| s.url.is_none()),
            },
        );
    }
    config
}

/// The key of a value in a reload: the host variable's name for
/// `from_env`, `file:<path>` for `from_file`, which is also how a gate run
/// by a service manager (`bottle gate run DIR`) finds the value itself.
pub fn value_key(reference: &SecretRef) -> String {
    match (&reference.from_env, &reference.from_file) {
        (Some(var), _) => var.clone(),
        (None, Some(path)) => format!("file:{path}"),
        (None, None) => String::new(),
    }
}

/// A value the gate needs that cannot be read on this host now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingValue {
    pub bottle: String,
    /// `secret `X`` or `the token of git remote `app``.
    pub what: String,
    /// `host environment variable `V` is not set`, ...
    pub why: String,
}

/// Where each value `config` names comes from: value key → (bottle, what
/// it is, its reference).
pub fn value_refs(
    project: &Project,
    config: &GateConfig,
) -> BTreeMap<String, (String, String, SecretRef)> {
    let mut refs = BTreeMap::new();
    for (name, gate) in &config.bottles {
        let Some(bottle) = project.bottles.get(name) else {
            continue;
        };
        for secret in &gate.secrets {
            if let Some(reference) = bottle.spec.secrets.get(&secret.name) {
                refs.insert(
                    secret.value_key.clone(),
                    (
                        name.clone(),
                        format!("secret `{}`", secret.name),
                        reference.clone(),
                    ),
                );
            }
        }
        for remote in &gate.git {
            let Some(GitCredentials::Token { value_key }) = &remote.credentials else {
                continue;
            };
            let reference = bottle.spec.git.as_ref().and_then(|g| {
                g.remote
                    .iter()
                    .find(|r| r.name == remote.name)
                    .and_then(|r| r.credentials.as_ref()?.token.as_ref())
            });
            if let Some(reference) = reference {
                refs.insert(
                    value_key.clone(),
                    (
                        name.clone(),
                        format!("the token of git remote `{}`", remote.name),
                        reference.clone(),
                    ),
                );
            }
        }
    }
    refs
}

/// Read every value, from this process's environment and files. Values
/// live only in the returned map (and then in the gate's memory).
pub fn read_values(
    refs: &BTreeMap<String, (String, String, SecretRef)>,
) -> (BTreeMap<String, String>, Vec<MissingValue>) {
    let mut values = BTreeMap::new();
    let mut missing = Vec::new();
    for (key, (bottle, what, reference)) in refs {
        match read_reference(reference) {
            Ok(v) => {
                values.insert(key.clone(), v);
            }
            Err(why) => missing.push(MissingValue {
                bottle: bottle.clone(),
                what: what.clone(),
                why,
            }),
        }
    }
    (values, missing)
}

fn read_reference(reference: &SecretRef) -> Result<String, String> {
    match (&reference.from_env, &reference.from_file) {
        (Some(var), _) => std::env::var(var)
            .map_err(|_| format!("host environment variable `{var}` is not set (or not UTF-8)")),
        // The one reader of secret files: never blocks (a FIFO would hang
        // apply), regular files only, no link, 1 MiB at most.
        (None, Some(file)) => {
            let bytes = crate::secrets::read_secret_file(std::path::Path::new(file))
                .map_err(|e| format!("host file `{file}` {e}"))?;
            String::from_utf8(bytes).map_err(|_| format!("host file `{file}` is not UTF-8 text"))
        }
        (None, None) => Err("it names no source".to_owned()),
    }
}

/// What a guest is given to reach its bottle's gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentGate {
    pub runtime: RuntimeKind,
    /// The host-loopback port of the bottle's listener.
    pub port: u16,
    /// `host:port` as the guest dials it.
    pub address: String,
    /// Variables set in the guest at create: proxy, CA bundle, placeholders.
    pub env: BTreeMap<String, String>,
    /// `http://<agent>:<git_token>@<address>/git`, for `git` without
    /// `gateway`.
    pub git_base: String,
    /// `http://<address>/mcp/<mcp_token>`, for `supervise` without `url`.
    pub supervise_url: String,
    /// The project CA the guest must trust.
    pub ca_cert: PathBuf,
}

/// `host:port` of the gate as a guest of `runtime` dials it.
pub fn guest_address(runtime: RuntimeKind, port: u16) -> String {
    match runtime {
        RuntimeKind::Smolvm => format!("{SMOLVM_GATE_IP}:{port}"),
        RuntimeKind::Local => format!("127.0.0.1:{port}"),
    }
}

/// What agent `agent` of a gated bottle gets, or `None` when the state has
/// no port or credentials for it yet.
pub fn agent_gate(
    paths: &GatePaths,
    runtime: RuntimeKind,
    state: &GateState,
    bottle: &Bottle,
    agent: &str,
) -> Option<AgentGate> {
    let port = *state.ports.get(&bottle.name)?;
    let creds = state.agents.get(agent)?;
    let address = guest_address(runtime, port);
    let proxy = format!("http://{agent}:{}@{address}", creds.proxy_token);
    let no_proxy = match runtime {
        RuntimeKind::Smolvm => {
            format!("localhost,127.0.0.1,::1,{SMOLVM_GATE_IP},{SMOLVM_GATE_NAME}")
        }
        RuntimeKind::Local => "localhost,127.0.0.1,::1".to_owned(),
    };
    let mut env = BTreeMap::new();
    for var in ["HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"] {
        env.insert(var.to_owned(), proxy.clone());
    }
    for var in ["NO_PROXY", "no_proxy"] {
        env.insert(var.to_owned(), no_proxy.clone());
    }
    for var in [
        "NODE_EXTRA_CA_CERTS",
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "GIT_SSL_CAINFO",
    ] {
        env.insert(var.to_owned(), TRUST_BUNDLE.to_owned());
    }
    for (secret, placeholder) in &creds.placeholders {
        env.insert(secret.clone(), placeholder.clone());
    }
    Some(AgentGate {
        runtime,
        port,
        git_base: format!("http://{agent}:{}@{address}/git", creds.git_token),
        supervise_url: format!("http://{address}/mcp/{}", creds.mcp_token),
        address,
        env,
        ca_cert: paths.ca_cert(),
    })
}

/// What observation found about the project's gate.
#[derive(Debug, Clone, PartialEq)]
pub enum GateHealth {
    /// Nothing answers on the control socket.
    NotRunning,
    Running(Health),
    /// Something answered, but not as a gate does (or not in time).
    Error(String),
}

/// Ask the gate for its health.
pub fn health(paths: &GatePaths) -> GateHealth {
    match control::call(&paths.control(), &Request::Health) {
        Ok(Response::Health(h)) => GateHealth::Running(h),
        Ok(Response::Error { message }) => GateHealth::Error(message),
        Ok(other) => GateHealth::Error(format!("unexpected answer to health: {other:?}")),
        Err(ControlError::NotRunning(_)) => GateHealth::NotRunning,
        Err(e) => GateHealth::Error(e.to_string()),
    }
}

/// The config last sent to the gate (`config.json`), if any.
pub fn recorded_config(paths: &GatePaths) -> Option<GateConfig> {
    serde_json::from_slice(&fs::read(paths.config()).ok()?).ok()
}

/// Why the running gate's config differs from `want`, per bottle, in words
/// (`allow_hosts changed`), comparing with the config last sent. Empty when
/// nothing can be named (the causes then say only that the hash differs).
pub fn config_differences(recorded: Option<&GateConfig>, want: &GateConfig) -> Vec<String> {
    let Some(have) = recorded else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (name, w) in &want.bottles {
        let Some(h) = have.bottles.get(name) else {
            out.push(format!("bottle {name} added"));
            continue;
        };
        let mut what = Vec::new();
        if h.port != w.port {
            what.push("port");
        }
        if h.allow_hosts != w.allow_hosts {
            what.push("allow_hosts");
        }
        if h.allow_internal != w.allow_internal {
            what.push("allow_internal");
        }
        if h.secrets != w.secrets {
            what.push("secrets");
        }
        if h.agents.keys().ne(w.agents.keys()) {
            what.push("agents");
        } else if h.agents != w.agents {
            what.push("agent credentials");
        }
        if h.git != w.git {
            what.push("git remotes");
        }
        if h.supervise != w.supervise {
            what.push("supervise");
        }
        if !what.is_empty() {
            out.push(format!("bottle {name}: {} changed", what.join(", ")));
        }
    }
    for name in have
        .bottles
        .keys()
        .filter(|b| !want.bottles.contains_key(*b))
    {
        out.push(format!("bottle {name} removed"));
    }
    out
}

#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum GateError {
    #[error("the gate's state file {}: {message}", path.display())]
    #[diagnostic(
        code("bottle::gate-state"),
        help(
            "fix or remove the file; removing it gives every agent new credentials and ports, \
             so their machines must be replaced (--allow-replace)"
        )
    )]
    State { path: PathBuf, message: String },

    #[error("the gate did not start: {message}")]
    #[diagnostic(
        code("bottle::gate-start"),
        help("its output is in {log}; run `bottle gate run` in the foreground to see it fail")
    )]
    Start { message: String, log: String },

    #[error("the gate refused its config: {0}")]
    #[diagnostic(
        code("bottle::gate-reload"),
        help("this is a bug in bottle (the gate and the reconciler disagree); please report it")
    )]
    Refused(String),

    #[error("cannot talk to the gate: {message}")]
    #[diagnostic(
        code("bottle::gate-control"),
        help("check `bottle status`; stop a stuck gate with `kill $(cat {pid})`")
    )]
    Control { message: String, pid: String },
}

impl GateError {
    fn control(paths: &GatePaths, e: impl std::fmt::Display) -> Self {
        GateError::Control {
            message: e.to_string(),
            pid: paths.pid().display().to_string(),
        }
    }
}

/// Send `config` with `values` to the running gate, and record it as the
/// config last sent.
pub fn reload(
    paths: &GatePaths,
    config: &GateConfig,
    values: BTreeMap<String, String>,
) -> Result<(), GateError> {
    let request = Request::Reload {
        config: config.clone(),
        secrets: values,
    };
    match control::call(&paths.control(), &request) {
        Ok(Response::Ok) => {}
        Ok(Response::Error { message }) => return Err(GateError::Refused(message)),
        Ok(other) => {
            return Err(GateError::control(
                paths,
                format!("unexpected answer to reload: {other:?}"),
            ));
        }
        Err(e) => return Err(GateError::control(paths, e)),
    }
    // The gate records what it accepted in `config.json` itself.
    Ok(())
}

/// Start the gate detached (`bottle --state-dir STATE gate run
/// --config-from-stdin` in its own session, outliving this process), with
/// the config and values on a pipe; returns once it serves them. The
/// project CA is minted first, if there is none.
pub fn start(
    bottle: &Path,
    state_dir: &Path,
    paths: &GatePaths,
    config: &GateConfig,
    values: &BTreeMap<String, String>,
) -> Result<u32, GateError> {
    let log = paths.dir.join("gate.err").display().to_string();
    let start_err = |message: String| GateError::Start {
        message,
        log: log.clone(),
    };
    super::ca::ensure(paths).map_err(|e| start_err(format!("the project CA: {e}")))?;
    super::server::start_detached(bottle, state_dir, config, values)
        .map(|h| h.pid)
        .map_err(|e| start_err(e.to_string()))
}

/// Ask the gate to stop and wait until it has; one not running is what
/// was wanted (`Ok(false)`).
pub fn stop(paths: &GatePaths) -> Result<bool, GateError> {
    super::server::stop(paths, Duration::from_secs(10)).map_err(|e| GateError::control(paths, e))
}

/// The gate as the runtime-facing commands see it: where its files are,
/// the state (filled in memory), the config the manifests call for, and
/// what each agent of a gated bottle is given.
#[derive(Debug, Clone)]
pub struct DesiredGate {
    pub paths: GatePaths,
    pub state_dir: PathBuf,
    /// The manifests directory.
    pub manifests: PathBuf,
    pub runtime: RuntimeKind,
    pub state: GateState,
    /// Whether `state` holds choices not yet written to `state.json`.
    pub state_changed: bool,
    pub config: GateConfig,
    /// By agent name, for the agents of gated bottles.
    pub agents: BTreeMap<String, AgentGate>,
    /// Where the values the config names come from.
    pub value_refs: BTreeMap<String, (String, String, SecretRef)>,
    /// The `ca` step hash from the manifests, per gated agent, which the
    /// project CA's digest extends (see [`DesiredGate::ca_hash`]).
    pub ca_base: BTreeMap<String, String>,
}

impl DesiredGate {
    /// Load the kept state and fill what is missing (in memory).
    pub fn new(
        project: &Project,
        state_dir: &Path,
        runtime: RuntimeKind,
    ) -> Result<Self, GateError> {
        let paths = GatePaths::new(state_dir, &project.name);
        let mut state = GateState::load(&paths)?;
        let state_changed = state.fill(project);
        for bottle in gated_bottles(project) {
            if !state.ports.contains_key(bottle) {
                return Err(GateError::State {
                    path: paths.state(),
                    message: format!("no free port on 127.0.0.1 for the gate of bottle {bottle}"),
                });
            }
        }
        let config = derive_config(project, &state);
        let agents = project
            .agents
            .iter()
            .filter_map(|(name, agent)| {
                let bottle = project.bottles.get(&agent.spec.bottle)?;
                if !has_gate(&bottle.spec) {
                    return None;
                }
                Some((
                    name.clone(),
                    agent_gate(&paths, runtime, &state, bottle, name)?,
                ))
            })
            .collect();
        let value_refs = value_refs(project, &config);
        Ok(Self {
            ca_base: BTreeMap::new(),
            value_refs,
            paths,
            state_dir: state_dir.to_owned(),
            manifests: project.dir.clone(),
            runtime,
            state,
            state_changed,
            config,
            agents,
        })
    }

    /// Whether any bottle of the project has a gate.
    pub fn is_needed(&self) -> bool {
        !self.config.bottles.is_empty()
    }

    /// The SHA-256 of the project CA as the gate minted it, or `none` before
    /// it has.
    pub fn ca_digest(&self) -> String {
        match fs::read(self.paths.ca_cert()) {
            Ok(bytes) => crate::steps::sha256_hex(&bytes),
            Err(_) => "none".to_owned(),
        }
    }

    /// The `ca` step hash of a gated agent with the project CA as it is
    /// now: a gate started by this apply mints the CA after the plan was
    /// made, and the ledger must record what the next plan computes.
    pub fn ca_hash(&self, agent: &str) -> Option<String> {
        let base = self.ca_base.get(agent)?;
        Some(crate::graph::hash::with_gate_inputs(
            base,
            &[&self.ca_digest()],
        ))
    }

    /// Start the gate (or reload the running one) with the config and the
    /// values read now; writes the state first, so the credentials machines
    /// are about to be created with are kept.
    pub fn start_or_reload(&self, running: bool) -> Result<(), GateError> {
        self.state.save(&self.paths)?;
        // A value this host cannot read now does not stop the gate: the
        // other bottles' agents are served, a running gate keeps the value
        // it holds, and the plan holds the machines that need it
        // (`preflight::hold_launches_without_secrets`).
        let (values, _missing) = read_values(&self.value_refs);
        if running {
            reload(&self.paths, &self.config, values)
        } else {
            let bottle = std::env::current_exe().map_err(|e| GateError::Start {
                message: format!("cannot find the bottle executable: {e}"),
                log: self.paths.dir.join("gate.err").display().to_string(),
            })?;
            start(&bottle, &self.state_dir, &self.paths, &self.config, &values).map(|_| ())
        }
    }
}

/// What the plan does to the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GateOp {
    /// Start it (detached), then send it its config and values.
    Start,
    /// Send the running gate its new config and the values read now; no
    /// open connection is dropped.
    Reload,
    /// No bottle has a gate any more.
    Stop,
}

impl GateOp {
    pub fn verb(self) -> &'static str {
        match self {
            GateOp::Start => "start",
            GateOp::Reload => "reload",
            GateOp::Stop => "stop",
        }
    }

    pub fn sigil(self) -> char {
        match self {
            GateOp::Start => '+',
            GateOp::Reload => '~',
            GateOp::Stop => '-',
        }
    }

    pub fn summary(self) -> &'static str {
        match self {
            GateOp::Start => "gate to start",
            GateOp::Reload => "gate to reload",
            GateOp::Stop => "gate to stop",
        }
    }
}

/// What must happen to the gate, with its cause; `Err` when its state is
/// unknown (an error of observation, never drift).
pub fn gate_change(
    gate: &DesiredGate,
    health: &GateHealth,
) -> Result<Option<(GateOp, String)>, String> {
    match (gate.is_needed(), health) {
        (_, GateHealth::Error(e)) => Err(format!("the gate does not answer as a gate: {e}")),
        (true, GateHealth::NotRunning) => Ok(Some((GateOp::Start, "gate not running".into()))),
        (true, GateHealth::Running(h)) if h.config_hash != gate.config.hash() => {
            let differences =
                config_differences(recorded_config(&gate.paths).as_ref(), &gate.config);
            let cause = if differences.is_empty() {
                "gate config differs".to_owned()
            } else {
                format!("gate config differs: {}", differences.join("; "))
            };
            Ok(Some((GateOp::Reload, cause)))
        }
        // A value the gate lacks (this host could not read it when the
        // gate last started or reloaded) that this host can read now.
        (true, GateHealth::Running(h)) => Ok(h
            .missing_secrets
            .iter()
            .find_map(|key| {
                let (bottle, what, reference) = gate.value_refs.get(key)?;
                read_reference(reference).ok()?;
                Some(format!(
                    "the gate lacks {what} of bottle `{bottle}`, which can be read now"
                ))
            })
            .map(|cause| (GateOp::Reload, cause))),
        (false, GateHealth::Running(_)) => {
            Ok(Some((GateOp::Stop, "no bottle has a gate any more".into())))
        }
        (false, GateHealth::NotRunning) => Ok(None),
    }
}

/// Notes the plan shows about the gate.
pub fn notes(gate: &DesiredGate) -> Vec<String> {
    if gate.is_needed() && gate.runtime == RuntimeKind::Smolvm {
        vec![format!(
            "gated guests reach the gate at {SMOLVM_GATE_IP}; smolvm 1.9 relays every port of that \
             address to the host's loopback, so they can also reach any other service listening \
             on 127.0.0.1 there (the gate accepts only its agents' credentials)"
        )]
    } else {
        Vec::new()
    }
}

/// Make every action of a gated bottle's agent that waits for nothing wait
/// for the gate's action `gate`: guests are created with its port and
/// credentials, and the ca step installs the CA it mints.
pub fn after_gate(plan: &mut crate::plan::Plan, desired: &crate::desired::Desired, gate: usize) {
    let Some(g) = &desired.gate else { return };
    for action in &mut plan.actions {
        let gated = action
            .agent
            .as_ref()
            .is_some_and(|a| g.agents.contains_key(a));
        if gated && action.id != gate && action.after.is_empty() {
            action.after.push(gate);
        }
    }
}

/// Apply the gate's action.
pub fn run(desired: &crate::desired::Desired, op: GateOp) -> Result<(), crate::steps::StepError> {
    use miette::Diagnostic;
    let Some(gate) = &desired.gate else {
        return Ok(());
    };
    let result = match op {
        GateOp::Start => gate.start_or_reload(false),
        GateOp::Reload => gate.start_or_reload(true),
        GateOp::Stop => stop(&gate.paths).map(|_| ()),
    };
    result.map_err(|e| {
        let help = e.help().map(|h| h.to_string()).unwrap_or_default();
        crate::steps::StepError::Other(e.to_string(), help)
    })
}

/// The gate as `bottle status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct GateStatus {
    /// `running`, `stale` (serving another config), `not running`, or
    /// `unknown` (something else answers).
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Listener port per bottle.
    pub ports: BTreeMap<String, u16>,
    /// Unix seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    /// Unix seconds when it last read secret values.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secrets_read_at: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl GateStatus {
    /// `None` when the project has no gate and none runs.
    pub fn of(gate: Option<&DesiredGate>, health: Option<&GateHealth>) -> Option<Self> {
        let (gate, health) = (gate?, health?);
        let mut status = Self {
            state: String::new(),
            pid: None,
            ports: gate
                .config
                .bottles
                .iter()
                .map(|(b, g)| (b.clone(), g.port))
                .collect(),
            started_at: None,
            secrets_read_at: None,
            error: None,
        };
        match health {
            GateHealth::NotRunning if !gate.is_needed() => return None,
            GateHealth::NotRunning => status.state = "not running".into(),
            GateHealth::Error(e) => {
                status.state = "unknown".into();
                status.error = Some(e.clone());
            }
            GateHealth::Running(h) => {
                status.state = if h.config_hash == gate.config.hash() {
                    "running".into()
                } else {
                    "stale".into()
                };
                status.pid = Some(h.pid);
                status.ports = h.ports.clone();
                status.started_at = Some(h.started_at);
                status.secrets_read_at = Some(h.secrets_read_at);
            }
        }
        Some(status)
    }
}

impl std::fmt::Display for GateStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "gate: {}", self.state)?;
        if let Some(pid) = self.pid {
            write!(f, " (pid {pid})")?;
        }
        if !self.ports.is_empty() {
            let ports: Vec<String> = self
                .ports
                .iter()
                .map(|(b, p)| format!("{b} 127.0.0.1:{p}"))
                .collect();
            // The ports kept for a gate that is not running are where it
            // will listen once started, not where anything listens now.
            let what = if self.pid.is_some() {
                "listening for"
            } else {
                "to listen for"
            };
            write!(f, ", {what} {}", ports.join(", "))?;
        }
        if let Some(at) = self.started_at {
            write!(f, ", started {}", crate::time::format_unix(at))?;
        }
        if let Some(at) = self.secrets_read_at {
            write!(f, ", secret values read {}", crate::time::format_unix(at))?;
        }
        match (self.state.as_str(), &self.error) {
            (_, Some(e)) => write!(f, ": {e}"),
            ("not running" | "stale", _) => write!(f, " (`bottle apply` fixes it)"),
            _ => Ok(()),
        }
    }
}

/// What `validate` says about a project's secrets beyond errors: a secret
/// whose `hosts` include a git upstream's host (the agent could push there
/// with it, around the git gateway's policy: a warning), and a secret
/// without `hosts`, which the agent can read (a note).
pub fn advisories(project: &Project) -> Vec<String> {
    let mut out = Vec::new();
    for (name, bottle) in &project.bottles {
        let spec = &bottle.spec;
        let upstream_hosts: Vec<(String, &str)> = spec
            .git
            .iter()
            .flat_map(|g| g.remote.iter())
            .filter_map(|r| Some((upstream_host(&r.upstream)?, r.name.as_str())))
            .collect();
        for (var, secret) in &spec.secrets {
            if secret.hosts.is_empty() {
                out.push(format!(
                    "note: secret `{var}` of bottle `{name}` has no `hosts`: its value is in the \
                     guest's environment, where the agent can read it (and send it anywhere its \
                     egress allows); with `hosts = [...]` the guest holds a placeholder and the \
                     gate adds the value for those hosts only"
                ));
                continue;
            }
            let patterns = super::hosts::HostList::parse(&secret.hosts);
            for (host, remote) in &upstream_hosts {
                if let Some(p) = patterns.0.iter().find(|p| {
                    p.matches(host, p.port().unwrap_or(443))
                        || (!p.is_wildcard() && p.name() == host)
                }) {
                    out.push(format!(
                        "warning: secret `{var}` of bottle `{name}` may be sent to `{p}`, the host \
                         of git remote `{remote}`'s upstream: the agent could use it to push \
                         there around the git gateway's rules; give the gateway its own \
                         credentials (`credentials = {{ token = ... }}`) and leave that host out"
                    ));
                }
            }
        }
    }
    out
}

/// The host of a git upstream URL (`git@host:path`, `ssh://[user@]host[:port]/`,
/// `https://host/`), lower case; `None` for a local path.
pub fn upstream_host(upstream: &str) -> Option<String> {
    let rest = match upstream.split_once("://") {
        Some(("file", _)) => return None,
        Some((_, rest)) => rest.split('/').next()?,
        None if upstream.starts_with('/') => return None,
        None => upstream.split(':').next()?,
    };
    let host = rest.rsplit('@').next()?;
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => host.split(':').next()?,
    };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;
    use std::sync::{Arc, Mutex};

    fn project(text: &str) -> (tempfile::TempDir, Project) {
        let tmp = tempfile::tempdir().unwrap();
        let m = tmp.path().join("m");
        fs::create_dir_all(&m).unwrap();
        fs::write(
            m.join("bottle.toml"),
            format!("[project]\nname = \"p\"\n{text}"),
        )
        .unwrap();
        let project = crate::manifest::load_dir(&m).unwrap();
        (tmp, project)
    }

    /// Tests that set the secret's host variable take turns: the
    /// environment is the process's, and test threads share it.
    static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

    const GATED: &str = r#"
[bottle.dev]
secrets = { API_KEY = { from_env = "BOTTLE_GATE_TEST_KEY", hosts = ["api.example.com"] }, PLAIN = { from_env = "BOTTLE_GATE_TEST_PLAIN" } }
[bottle.dev.egress]
allow_hosts = ["api.example.com", "*.example.org"]
allow_internal = ["127.0.0.0/8"]
[bottle.dev.supervise]
[bottle.nets.egress]
allow_cidrs = ["10.8.0.0/16"]
[agent.a]
bottle = "dev"
[agent.b]
bottle = "dev"
[agent.c]
bottle = "nets"
"#;

    #[test]
    fn a_bottle_has_a_gate_for_hosts_gated_secrets_or_gate_served_git_and_supervise() {
        let (_t, p) = project(GATED);
        assert!(has_gate(&p.bottles["dev"].spec));
        assert!(!has_gate(&p.bottles["nets"].spec));
        assert_eq!(gated_bottles(&p), BTreeSet::from(["dev"]));
        let (_t, p) = project("[bottle.x.git]\n[agent.a]\nbottle = \"x\"\n");
        assert!(has_gate(&p.bottles["x"].spec));
        let (_t, p) = project(
            "[bottle.x.git]\ngateway = \"http://10.0.0.1:1\"\n[bottle.x.supervise]\nurl = \"http://10.0.0.1:2/\"\n[agent.a]\nbottle = \"x\"\n",
        );
        assert!(!has_gate(&p.bottles["x"].spec));
    }

    #[test]
    fn ports_and_credentials_are_chosen_once_and_kept() {
        let (_t, p) = project(GATED);
        let mut state = GateState::default();
        assert!(state.fill(&p));
        let port = state.ports["dev"];
        assert!(port > 0);
        assert!(!state.ports.contains_key("nets"), "no gate, no port");
        assert_eq!(state.agents.keys().collect::<Vec<_>>(), ["a", "b"]);
        let a = state.agents["a"].clone();
        assert_ne!(a.proxy_token, state.agents["b"].proxy_token);
        assert_ne!(
            a.placeholders["API_KEY"],
            state.agents["b"].placeholders["API_KEY"]
        );
        assert!(
            !a.placeholders.contains_key("PLAIN"),
            "a secret without hosts is the guest's"
        );
        // Kept across a save and a load, and a second fill changes nothing.
        let dir = tempfile::tempdir().unwrap();
        let paths = GatePaths::new(dir.path(), "p");
        state.save(&paths).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(paths.state()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut again = GateState::load(&paths).unwrap();
        assert!(!again.fill(&p));
        assert_eq!(again, state);
    }

    #[test]
    fn a_placeholder_is_random_not_derived_from_the_value() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: tests of this module set only their own variables.
        unsafe { std::env::set_var("BOTTLE_GATE_TEST_KEY", "sk-real-value-1") };
        let (_t, p) = project(GATED);
        let (mut one, mut two) = (GateState::default(), GateState::default());
        one.fill(&p);
        two.fill(&p);
        let (x, y) = (
            &one.agents["a"].placeholders["API_KEY"],
            &two.agents["a"].placeholders["API_KEY"],
        );
        assert_ne!(x, y);
        assert!(!x.contains("sk-real-value-1"));
        assert!(x.starts_with("bottle-placeholder-"));
    }

    #[test]
    fn the_config_names_values_and_never_holds_them() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: as above.
        unsafe { std::env::set_var("BOTTLE_GATE_TEST_KEY", "sk-real-value-2") };
        let (_t, p) = project(GATED);
        let mut state = GateState::default();
        state.fill(&p);
        let config = derive_config(&p, &state);
        assert_eq!(config.bottles.keys().collect::<Vec<_>>(), ["dev"]);
        let dev = &config.bottles["dev"];
        assert_eq!(dev.allow_hosts, ["api.example.com", "*.example.org"]);
        assert_eq!(dev.allow_internal, ["127.0.0.0/8"]);
        assert!(dev.supervise);
        assert_eq!(
            dev.secrets,
            [GateSecret {
                name: "API_KEY".into(),
                hosts: vec!["api.example.com".into()],
                value_key: "BOTTLE_GATE_TEST_KEY".into(),
            }]
        );
        let json = serde_json::to_string(&config).unwrap();
        assert!(!json.contains("sk-real-value-2"));
        let (values, missing) = read_values(&value_refs(&p, &config));
        assert!(missing.is_empty(), "{missing:?}");
        assert_eq!(values["BOTTLE_GATE_TEST_KEY"], "sk-real-value-2");
        assert_eq!(values.len(), 1, "only the gate's secrets are read");
    }

    #[test]
    fn guests_dial_the_gate_at_the_runtimes_address_with_their_own_credential() {
        let (_t, p) = project(GATED);
        let mut state = GateState::default();
        state.fill(&p);
        let paths = GatePaths::new(Path::new("/s"), "p");
        let port = state.ports["dev"];
        let a = agent_gate(&paths, RuntimeKind::Smolvm, &state, &p.bottles["dev"], "a").unwrap();
        let token = &state.agents["a"].proxy_token;
        assert_eq!(a.address, format!("100.96.0.1:{port}"));
        assert_eq!(
            a.env["HTTPS_PROXY"],
            format!("http://a:{token}@100.96.0.1:{port}")
        );
        assert_eq!(a.env["http_proxy"], a.env["HTTPS_PROXY"]);
        assert!(a.env["NO_PROXY"].split(',').any(|h| h == "100.96.0.1"));
        for var in [
            "NODE_EXTRA_CA_CERTS",
            "SSL_CERT_FILE",
            "REQUESTS_CA_BUNDLE",
            "GIT_SSL_CAINFO",
        ] {
            assert_eq!(a.env[var], TRUST_BUNDLE);
        }
        assert_eq!(a.env["API_KEY"], state.agents["a"].placeholders["API_KEY"]);
        assert!(!a.env.contains_key("PLAIN"));
        assert_eq!(
            a.supervise_url,
            format!(
                "http://100.96.0.1:{port}/mcp/{}",
                state.agents["a"].mcp_token
            )
        );
        let local = agent_gate(&paths, RuntimeKind::Local, &state, &p.bottles["dev"], "a").unwrap();
        assert_eq!(local.address, format!("127.0.0.1:{port}"));
        assert!(local.env["NO_PROXY"].split(',').any(|h| h == "127.0.0.1"));
    }

    /// A stand-in gate: answers the control protocol on a Unix socket from
    /// a thread, serving the last config it was sent.
    /// What the stand-in serves: the last config and values it was sent.
    type Served = Arc<Mutex<Option<(GateConfig, BTreeMap<String, String>)>>>;

    struct StandIn {
        served: Served,
        _thread: std::thread::JoinHandle<()>,
    }

    fn stand_in(paths: &GatePaths) -> StandIn {
        fs::create_dir_all(&paths.dir).unwrap();
        // Unlocked: a stop is over once the stand-in answered it.
        fs::write(paths.lock(), "").unwrap();
        let listener = UnixListener::bind(paths.control()).unwrap();
        let served: Served = Default::default();
        let shared = served.clone();
        let config_path = paths.config();
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming().take(16) {
                let Ok(mut stream) = stream else { break };
                let mut line = String::new();
                BufReader::new(&stream).read_line(&mut line).unwrap();
                let request: Request = serde_json::from_str(&line).unwrap();
                let mut stop = false;
                let response = match request {
                    Request::Health => {
                        let served = shared.lock().unwrap();
                        Response::Health(Health {
                            pid: 4242,
                            config_hash: served.as_ref().map_or(String::new(), |(c, _)| c.hash()),
                            started_at: 1,
                            secrets_read_at: 2,
                            missing_secrets: Vec::new(),
                            ports: served.as_ref().map_or(BTreeMap::new(), |(c, _)| {
                                c.bottles.iter().map(|(b, g)| (b.clone(), g.port)).collect()
                            }),
                        })
                    }
                    Request::Reload { config, secrets } => {
                        // As the gate does: it records what it accepted.
                        fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
                        *shared.lock().unwrap() = Some((config, secrets));
                        Response::Ok
                    }
                    Request::Stop => {
                        stop = true;
                        Response::Ok
                    }
                };
                let mut out = serde_json::to_vec(&response).unwrap();
                out.push(b'\n');
                stream.write_all(&out).unwrap();
                if stop {
                    break;
                }
            }
        });
        StandIn {
            served,
            _thread: thread,
        }
    }

    #[test]
    fn health_reload_and_stop_speak_the_control_protocol() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: as above.
        unsafe { std::env::set_var("BOTTLE_GATE_TEST_KEY", "sk-real-value-3") };
        let (_t, p) = project(GATED);
        let dir = tempfile::tempdir().unwrap();
        let gate = DesiredGate::new(&p, dir.path(), RuntimeKind::Local).unwrap();
        assert!(gate.state_changed, "nothing kept yet");
        assert_eq!(health(&gate.paths), GateHealth::NotRunning);
        assert_eq!(
            gate_change(&gate, &GateHealth::NotRunning).unwrap(),
            Some((GateOp::Start, "gate not running".to_owned()))
        );

        let stand_in = stand_in(&gate.paths);
        let GateHealth::Running(h) = health(&gate.paths) else {
            panic!("the stand-in answers")
        };
        let (op, cause) = gate_change(&gate, &GateHealth::Running(h))
            .unwrap()
            .unwrap();
        assert_eq!(
            (op, cause.as_str()),
            (GateOp::Reload, "gate config differs")
        );

        // A reload sends the config and the values read now, keeps the
        // state and records the config sent.
        gate.start_or_reload(true).unwrap();
        let (config, values) = stand_in.served.lock().unwrap().clone().unwrap();
        assert_eq!(config, gate.config);
        assert_eq!(values["BOTTLE_GATE_TEST_KEY"], "sk-real-value-3");
        assert_eq!(GateState::load(&gate.paths).unwrap(), gate.state);
        assert_eq!(recorded_config(&gate.paths).as_ref(), Some(&gate.config));
        let recorded = fs::read_to_string(gate.paths.config()).unwrap();
        assert!(
            !recorded.contains("sk-real-value-3"),
            "values are never written"
        );
        let state = fs::read_to_string(gate.paths.state()).unwrap();
        assert!(!state.contains("sk-real-value-3"));

        let GateHealth::Running(h) = health(&gate.paths) else {
            panic!()
        };
        assert_eq!(h.config_hash, gate.config.hash());
        assert_eq!(gate_change(&gate, &GateHealth::Running(h)).unwrap(), None);

        // An allow_hosts edit: a reload naming what changed, same ports
        // and credentials.
        let mut edited = p.clone();
        edited
            .bottles
            .get_mut("dev")
            .unwrap()
            .spec
            .egress
            .as_mut()
            .unwrap()
            .allow_hosts
            .push("pypi.org".into());
        let gate2 = DesiredGate::new(&edited, dir.path(), RuntimeKind::Local).unwrap();
        assert!(!gate2.state_changed);
        assert_eq!(gate2.agents, gate.agents, "guests keep their URLs");
        let GateHealth::Running(h) = health(&gate.paths) else {
            panic!()
        };
        let (op, cause) = gate_change(&gate2, &GateHealth::Running(h))
            .unwrap()
            .unwrap();
        assert_eq!(op, GateOp::Reload);
        assert_eq!(
            cause,
            "gate config differs: bottle dev: allow_hosts changed"
        );

        assert!(stop(&gate.paths).unwrap());
    }

    #[test]
    fn a_value_the_gate_lacks_is_a_reload_once_this_host_can_read_it() {
        let keys = tempfile::tempdir().unwrap();
        let key = keys.path().join("k");
        let (_t, p) = project(&format!(
            "[bottle.dev]\nsecrets = {{ K = {{ from_file = \"{}\", hosts = [\"x.example.com\"] }} }}\n[agent.a]\nbottle = \"dev\"\n",
            key.display()
        ));
        let dir = tempfile::tempdir().unwrap();
        let gate = DesiredGate::new(&p, dir.path(), RuntimeKind::Local).unwrap();
        let lacking = |missing: Vec<String>| {
            GateHealth::Running(crate::gate::control::Health {
                pid: 1,
                config_hash: gate.config.hash(),
                started_at: 1,
                secrets_read_at: 1,
                ports: BTreeMap::new(),
                missing_secrets: missing,
            })
        };
        let value_key = gate.value_refs.keys().next().unwrap().clone();
        // Still unreadable here: nothing to send.
        assert_eq!(
            gate_change(&gate, &lacking(vec![value_key.clone()])),
            Ok(None)
        );
        fs::write(&key, "v\n").unwrap();
        let (op, cause) = gate_change(&gate, &lacking(vec![value_key]))
            .unwrap()
            .unwrap();
        assert_eq!(op, GateOp::Reload);
        assert!(
            cause.contains("of bottle `dev`, which can be read now"),
            "{cause}"
        );
        assert_eq!(gate_change(&gate, &lacking(Vec::new())), Ok(None));
        // A FIFO is never opened (it would block until a writer came).
        fs::remove_file(&key).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &key,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert!(read_reference(&gate.value_refs.values().next().unwrap().2).is_err());
    }

    #[test]
    fn upstream_hosts_and_the_git_warning() {
        assert_eq!(
            upstream_host("git@github.com:acme/app.git").as_deref(),
            Some("github.com")
        );
        assert_eq!(
            upstream_host("ssh://git@Git.Example:2222/x").as_deref(),
            Some("git.example")
        );
        assert_eq!(
            upstream_host("https://github.com/acme/docs.git").as_deref(),
            Some("github.com")
        );
        assert_eq!(upstream_host("/srv/repos/app.git"), None);
        assert_eq!(upstream_host("file:///srv/app.git"), None);
        let (_t, p) = project(
            "[bottle.dev]\nsecrets = { GH = { from_env = \"X\", hosts = [\"github.com\"] }, P = { from_env = \"Y\" } }\n[bottle.dev.git]\n[[bottle.dev.git.remote]]\nname = \"app\"\nupstream = \"git@github.com:acme/app.git\"\n[agent.a]\nbottle = \"dev\"\n",
        );
        let advice = advisories(&p);
        assert_eq!(advice.len(), 2, "{advice:#?}");
        assert!(
            advice
                .iter()
                .any(|a| a.starts_with("warning: secret `GH`") && a.contains("`app`"))
        );
        assert!(advice.iter().any(|a| a.starts_with("note: secret `P`")));
    }

    /// A setup step after the gate-served `git` step re-runs when that
    /// step's gate inputs (the agent's git credential) change, as it does
    /// after a manifest change to it; one not after it is left alone.
    #[test]
    fn a_setup_step_after_the_gate_served_git_step_follows_its_gate_inputs() {
        let (_t, p) = project(
            "[bottle.dev.egress]\nallow_hosts = [\"api.example.com\"]\n[bottle.dev.git]\n[[bottle.dev.git.remote]]\nname = \"app\"\nupstream = \"git@github.com:acme/app.git\"\n[[bottle.dev.setup]]\nname = \"hooks\"\nrun = \"true\"\nafter = [\"git\"]\n[[bottle.dev.setup]]\nname = \"tools\"\nrun = \"true\"\n[agent.a]\nbottle = \"dev\"\n",
        );
        let hashes = |state: &Path| {
            let graph = crate::graph::build(&p).unwrap();
            let mut d = crate::desired::Desired::new(p.clone(), &graph);
            d.attach_gate(state, RuntimeKind::Local).unwrap();
            let of = |id: &str| {
                d.agents["a"]
                    .steps
                    .iter()
                    .find(|s| s.kind.id() == id)
                    .unwrap()
                    .hash
                    .clone()
            };
            (of("git"), of("setup:hooks"), of("setup:tools"))
        };
        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (git1, hooks1, tools1) = hashes(one.path());
        let (git2, hooks2, tools2) = hashes(two.path());
        // Each state directory holds its own credentials (chosen in memory
        // when missing): the git step differs, and so does the setup after it.
        assert_ne!(git1, git2);
        assert_ne!(hooks1, hooks2);
        assert_eq!(tools1, tools2);
    }
}
