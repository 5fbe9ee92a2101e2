//! What the gate serves: derived from the manifests by the reconciler, sent
//! to the gate over [`super::control`], kept in `config.json`.
//!
//! Secret *values* are never part of it: a [`GateConfig`] names each value
//! by a key, and the values travel beside it in a
//! [`super::control::Request::Reload`], read from the environment (or the
//! files) of the bottle process that sends it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub const CONFIG_FORMAT: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateConfig {
    pub format_version: u32,
    pub project: String,
    /// One listener per bottle that has a gate, by bottle name.
    pub bottles: BTreeMap<String, BottleGate>,
}

/// One bottle's listener and what it allows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BottleGate {
    /// The host-loopback port, chosen once and kept in the state directory.
    pub port: u16,
    /// `egress.allow_hosts`, in the grammar of [`super::hosts::HostPattern`].
    pub allow_hosts: Vec<String>,
    /// `egress.allow_internal`: CIDRs the gate may dial although they are
    /// loopback, private, link-local, CGNAT or unspecified.
    pub allow_internal: Vec<String>,
    /// Secrets the gate adds on the way out, by guest variable name.
    pub secrets: Vec<GateSecret>,
    /// The agents of this bottle and their credentials, by agent name.
    pub agents: BTreeMap<String, AgentCredentials>,
    /// Git remotes the gate serves (`git` without `gateway`).
    pub git: Vec<GateRemote>,
    /// Whether `/mcp/<token>` is served (`supervise` without `url`).
    pub supervise: bool,
}

/// A secret the guest holds only as a placeholder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateSecret {
    /// The guest variable (`ANTHROPIC_API_KEY`).
    pub name: String,
    /// Where the real value may go, in the grammar of `allow_hosts`.
    pub hosts: Vec<String>,
    /// The key of its value in a reload's `secrets` map.
    pub value_key: String,
}

/// One agent's credentials: random, per agent, kept in the state
/// directory so they survive gate restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentCredentials {
    /// The password of its proxy URL (`Proxy-Authorization: Basic`).
    pub proxy_token: String,
    /// The password of its git URL (HTTP Basic auth).
    pub git_token: String,
    /// The last path segment of its supervise URL (`/mcp/<token>`).
    pub mcp_token: String,
    /// Placeholder per secret name: what the guest's variable holds.
    pub placeholders: BTreeMap<String, String>,
}

/// A remote served by the git gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateRemote {
    pub name: String,
    /// What the agent uses and where the gate fetches and pushes.
    pub upstream: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<GitCredentials>,
    /// Branch patterns the agent may push (`agent/*`); empty: read-only.
    #[serde(default)]
    pub push: Vec<String>,
    /// A pinned ssh host key (`known_hosts` line format), if declared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GitCredentials {
    /// An ssh private key file on the host.
    SshKey { path: PathBuf },
    /// An https token; its value is in a reload's `secrets` map.
    Token { value_key: String },
}

impl GateConfig {
    /// The digest the gate reports in its health: the config it serves.
    pub fn hash(&self) -> String {
        let json = serde_json::to_vec(self).expect("gate configs serialize");
        crate::steps::sha256_hex(&json)
    }

    /// Resolve a proxy credential to the agent it belongs to, in `bottle`.
    pub fn agent_by_proxy_token(&self, bottle: &str, token: &str) -> Option<&str> {
        self.bottles.get(bottle).and_then(|b| {
            b.agents
                .iter()
                .find(|(_, c)| constant_time_eq(c.proxy_token.as_bytes(), token.as_bytes()))
                .map(|(name, _)| name.as_str())
        })
    }
}

/// Compare two credentials without leaking where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fresh random token: 32 characters of `[A-Za-z0-9]` (about 190 bits).
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    getrandom_fill(&mut bytes);
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    bytes
        .iter()
        .map(|b| ALPHABET[(*b as usize) % ALPHABET.len()] as char)
        .collect()
}

/// Fill from the kernel's CSPRNG (`fastrand` is not one).
fn getrandom_fill(buf: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .expect("reading /dev/urandom");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_url_safe() {
        let a = new_token();
        let b = new_token();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
    }

    #[test]
    fn proxy_tokens_resolve_only_within_their_bottle() {
        let mut config = GateConfig::default();
        let creds = AgentCredentials {
            proxy_token: "t1".into(),
            ..Default::default()
        };
        config.bottles.insert(
            "dev".into(),
            BottleGate {
                agents: [("coder".to_owned(), creds)].into(),
                ..Default::default()
            },
        );
        config.bottles.insert("ops".into(), BottleGate::default());
        assert_eq!(config.agent_by_proxy_token("dev", "t1"), Some("coder"));
        assert_eq!(config.agent_by_proxy_token("dev", "t2"), None);
        assert_eq!(config.agent_by_proxy_token("ops", "t1"), None);
    }
}
