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

pub mod config;
pub mod control;
pub mod git;
pub mod hosts;
pub mod http;
pub mod log;
pub mod paths;

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
