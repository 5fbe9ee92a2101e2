//! The gate: the host half of a bottle (DESIGN.md section 9).
//!
//! One gate process per project (`bottle gate run DIR`, or started detached
//! by `apply`), with one listener per bottle on host loopback. A listener
//! serves, on one port:
//! - HTTP proxy requests, CONNECT and absolute-form (egress: the allowlist,
//!   TLS interception with the project CA for hosts that carry secrets, the
//!   real secret value put in place of the agent's placeholder);
//! - `/git/<remote>.git/...`: git smart HTTP through `git http-backend`;
//! - `/mcp/<agent-token>`: supervise, MCP over streamable HTTP.
//!
//! The gate tells agents apart by credentials, never by source address (on
//! smolvm every guest reaches every host-loopback port from the host's own
//! loopback): a proxy token in `Proxy-Authorization`, a git token in HTTP
//! Basic auth, an MCP token in the path. Each is per agent and random.
//!
//! # The interface with the reconciler
//!
//! The reconciler and the gate share only what is in this module's
//! [`config`] and [`control`]:
//! - [`config::GateConfig`] is derived from the manifests (and the ports and
//!   tokens kept in the state directory). It names secrets, never holds
//!   their values.
//! - The gate's state directory is `<state-dir>/gate/<project>/`
//!   ([`paths::GatePaths`]): `config.json` (the last config sent, 0600),
//!   `ca.pem` and `ca.key` (0600, never copied anywhere), `gate.pid`,
//!   `gate.lock` (held by the running gate), `gate.log` (JSON lines, every
//!   egress, git and supervise decision), `control.sock` (0600).
//! - [`control`] is a Unix socket speaking one JSON line each way:
//!   `health`, `reload` (a new config and the secret values read by the
//!   bottle process that sends it: values travel only over this socket
//!   and live only in the gate's memory), `stop`.
//!
//! # Driving the gate (what the reconciler calls)
//!
//! - CA for the `ca` step: [`ca::ensure`]`(&paths)` returns the project
//!   CA's certificate PEM, minting the CA first if there is none.
//! - Health: [`control::call`]`(&paths.control(), &Request::Health)`;
//!   `Err(ControlError::NotRunning)` means no gate; a `config_hash` other
//!   than [`config::GateConfig::hash`] of the desired config means stale.
//! - Start: [`server::start_detached`]`(bottle_exe, state_dir, &config,
//!   &secrets)` runs `bottle --state-dir S gate run --config-from-stdin` in
//!   its own session, hands it the config and values on a pipe, and returns
//!   its [`control::Health`] once it serves that config (`ports` has each
//!   bottle's port: a config port 0 means "any free port").
//! - Reload: `control::call(&paths.control(), &Request::Reload { config,
//!   secrets })` → `Response::Ok`, or `Response::Error { message }` with
//!   nothing changed (a port in use, another project, a newer format).
//! - Stop: [`server::stop`]`(&paths, wait)` asks it to stop and waits until
//!   it released `gate.lock`; `Ok(false)` when none was running.
//! - Secret values by `value_key`: a gate run by a service manager reads
//!   `file:<path>` keys from the file and any other key from its own
//!   environment ([`server::secrets_from_env`]), so a `from_env` secret's
//!   key should be its variable's name.

pub mod ca;
pub mod config;
pub mod control;
mod egress;
pub mod hosts;
pub mod http;
pub mod log;
pub mod net;
pub mod paths;
pub mod reconcile;
pub mod server;
pub mod supervise;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// Who is asking: resolved from a credential, never from an address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AgentIdentity {
    pub bottle: String,
    pub agent: String,
}

/// Egress beyond the declared allowlist, granted at run time (supervise).
/// The egress proxy asks it after the declared rules said no.
pub trait ExtraEgress: Send + Sync {
    fn allows(&self, who: &AgentIdentity, host: &str, port: u16) -> bool;
}

/// No run-time grants at all.
pub struct NoGrants;

impl ExtraEgress for NoGrants {
    fn allows(&self, _who: &AgentIdentity, _host: &str, _port: u16) -> bool {
        false
    }
}

/// An endpoint a listener serves besides egress: the git gateway
/// (`/git/...`) and supervise (`/mcp/...`).
///
/// # The routing hook
///
/// A listener answers origin-form requests (`GET /git/x.git/info/refs`, not
/// proxy requests) itself: it first checks the `Host` header against the
/// listener's own addresses (`127.0.0.1:<port>`, `localhost:<port>`,
/// `100.96.0.1:<port>`, `host.smolvm.internal:<port>`; anything else is
/// 403, which stops DNS rebinding), then hands requests whose path starts
/// with `/git/` to [`Endpoints::git`] and `/mcp/` to [`Endpoints::mcp`],
/// whole (path included, body streaming). Without an endpoint the answer is
/// 404. The endpoint resolves the agent itself from its own credential
/// ([`EndpointContext::agent_by_git_token`], the MCP token in the path:
/// [`EndpointContext::agent_by_mcp_token`]), answers 401/403 without one,
/// and logs its decisions in [`EndpointContext::log`] (kind `git` or
/// `supervise`). It sees the config and secret values of the moment the
/// request arrived, so a reload takes effect at the next request.
///
/// To plug one in, set its field in [`plugins`] (one line each).
pub trait Endpoint: Send + Sync {
    fn serve(
        &self,
        context: EndpointContext,
        request: http::Request,
    ) -> Pin<Box<dyn Future<Output = http::Response> + Send>>;

    /// Serve `config` from now on, with these secret values (by
    /// `value_key`): called when the gate starts and on every reload,
    /// before the first request that sees the new config. Returns the
    /// problems found (the gate logs them; the endpoint serves the rest).
    fn configure(
        &self,
        config: &config::GateConfig,
        secrets: &BTreeMap<String, String>,
    ) -> Vec<String> {
        let _ = (config, secrets);
        Vec::new()
    }
}

/// What an endpoint knows about the request it serves.
#[derive(Clone)]
pub struct EndpointContext {
    /// The bottle whose listener received the request.
    pub bottle: String,
    /// What the gate serves now.
    pub config: Arc<config::GateConfig>,
    /// Secret values by `value_key` (git tokens among them). Never log them.
    pub secrets: Arc<BTreeMap<String, String>>,
    pub log: Arc<log::GateLog>,
    pub paths: paths::GatePaths,
}

impl EndpointContext {
    /// This bottle's settings (always present: the listener exists for it).
    pub fn bottle_gate(&self) -> Option<&config::BottleGate> {
        self.config.bottles.get(&self.bottle)
    }

    /// The agent of this bottle whose git token is `token`.
    pub fn agent_by_git_token(&self, token: &str) -> Option<AgentIdentity> {
        self.agent_where(|c| config::constant_time_eq(c.git_token.as_bytes(), token.as_bytes()))
    }

    /// The agent of this bottle whose MCP token is `token`.
    pub fn agent_by_mcp_token(&self, token: &str) -> Option<AgentIdentity> {
        self.agent_where(|c| config::constant_time_eq(c.mcp_token.as_bytes(), token.as_bytes()))
    }

    fn agent_where(
        &self,
        pred: impl Fn(&config::AgentCredentials) -> bool,
    ) -> Option<AgentIdentity> {
        let gate = self.bottle_gate()?;
        gate.agents
            .iter()
            .find(|(_, c)| pred(c))
            .map(|(agent, _)| AgentIdentity {
                bottle: self.bottle.clone(),
                agent: agent.clone(),
            })
    }
}

/// The parts other modules plug into the gate process.
pub struct Endpoints {
    /// `/git/...` (the git gateway).
    pub git: Option<Arc<dyn Endpoint>>,
    /// `/mcp/...` (supervise).
    pub mcp: Option<Arc<dyn Endpoint>>,
    /// Run-time egress grants (supervise).
    pub grants: Arc<dyn ExtraEgress>,
}

impl Default for Endpoints {
    fn default() -> Self {
        Self {
            git: None,
            mcp: None,
            grants: Arc::new(NoGrants),
        }
    }
}

impl Endpoints {
    /// Tell every endpoint what the gate serves from now on (start and
    /// every reload); the problems they found, each prefixed by its part.
    pub fn configure(
        &self,
        config: &config::GateConfig,
        secrets: &BTreeMap<String, String>,
    ) -> Vec<String> {
        let mut problems = Vec::new();
        for (part, endpoint) in [("git", &self.git), ("supervise", &self.mcp)] {
            if let Some(e) = endpoint {
                problems.extend(
                    e.configure(config, secrets)
                        .into_iter()
                        .map(|p| format!("{part}: {p}")),
                );
            }
        }
        problems
    }
}

/// What the gate process of the project in `paths` serves besides egress:
/// supervise at `/mcp/<token>`, whose grants the egress proxy consults.
pub fn plugins(paths: &paths::GatePaths, log: Arc<log::GateLog>) -> Endpoints {
    let supervise = Arc::new(supervise::Supervise::new(paths, log));
    Endpoints {
        git: None,
        mcp: Some(Arc::new(SuperviseEndpoint(supervise.clone()))),
        grants: supervise,
    }
}

/// Supervise as the listener's `/mcp/` endpoint: the path's one segment
/// after `/mcp/` is the agent's MCP token (supervise resolves the agent
/// from it, among the agents of the listener's bottle).
struct SuperviseEndpoint(Arc<supervise::Supervise>);

impl Endpoint for SuperviseEndpoint {
    fn serve(
        &self,
        context: EndpointContext,
        request: http::Request,
    ) -> Pin<Box<dyn Future<Output = http::Response> + Send>> {
        let token = request
            .uri()
            .path()
            .strip_prefix("/mcp/")
            .map(|t| t.strip_suffix('/').unwrap_or(t))
            .filter(|t| !t.is_empty() && !t.contains('/'))
            .map(str::to_owned);
        match token {
            Some(token) => Box::pin(self.0.handle(&context.bottle, &token, request)),
            None => Box::pin(std::future::ready(http::text(
                ::http::StatusCode::NOT_FOUND,
                "bottle gate: supervise is served at /mcp/<token>",
            ))),
        }
    }

    fn configure(
        &self,
        config: &config::GateConfig,
        _secrets: &BTreeMap<String, String>,
    ) -> Vec<String> {
        self.0.configure_all(config);
        Vec::new()
    }
}
