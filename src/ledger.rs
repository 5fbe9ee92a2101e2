//! The ledger: what bottle applied inside a guest.
//!
//! Each step, once it has succeeded, records one JSON file under
//! [`LEDGER_DIR`] in the guest: the hash of the inputs it applied, the digest
//! of what it left behind (so in-guest drift shows), the guest paths it owns
//! and what it needs to be undone. One file per step means steps of one agent
//! that run in parallel never race on a shared file, and a crash between two
//! steps leaves every finished step recorded.
//!
//! Ledger files hold hashes, paths and names, never secret values.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::graph::StepKind;

/// Where ledger entries live in the guest (root-only).
pub const LEDGER_DIR: &str = "/var/lib/bottle/ledger";

pub const LEDGER_FORMAT: u32 = 1;

/// One applied step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub format_version: u32,
    /// The step id (`machine`, `prompt`, `setup:toolchain`, ...).
    pub step: String,
    /// The desired-state hash of the step's inputs when it was applied.
    pub hash: String,
    /// Digest of the step's probe output right after it was applied; empty
    /// for steps whose effects cannot be probed (setup commands).
    #[serde(default)]
    pub digest: String,
    /// Guest paths the step owns (removed when it is undone).
    #[serde(default)]
    pub paths: Vec<String>,
    /// Step-specific facts needed to undo or compare it later.
    #[serde(default)]
    pub detail: BTreeMap<String, serde_json::Value>,
    /// Unix seconds.
    pub applied_at: u64,
}

impl LedgerEntry {
    pub fn new(step: &StepKind, hash: impl Into<String>) -> Self {
        Self {
            format_version: LEDGER_FORMAT,
            step: step.id(),
            hash: hash.into(),
            digest: String::new(),
            paths: Vec::new(),
            detail: BTreeMap::new(),
            applied_at: now_unix(),
        }
    }

    /// The guest file this entry is stored in.
    pub fn guest_path(step_id: &str) -> String {
        // Step ids are `name` or `setup:name` with names of [a-z0-9-]: a dot
        // keeps the file name unambiguous.
        format!("{LEDGER_DIR}/{}.json", step_id.replace(':', "."))
    }

    pub fn detail_str(&self, key: &str) -> Option<&str> {
        self.detail.get(key).and_then(|v| v.as_str())
    }

    pub fn detail_strings(&self, key: &str) -> Vec<String> {
        self.detail
            .get(key)
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Shell that writes one ledger entry atomically; the JSON comes as `$1`.
pub fn write_script(step_id: &str) -> String {
    let path = LedgerEntry::guest_path(step_id);
    format!(
        "umask 077; mkdir -p {LEDGER_DIR} && printf '%s\\n' \"$1\" > {path}.tmp && mv -f {path}.tmp {path}"
    )
}

/// Shell that removes one ledger entry.
pub fn remove_script(step_id: &str) -> String {
    format!("rm -f {}", LedgerEntry::guest_path(step_id))
}
