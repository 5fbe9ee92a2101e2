//! What `ls` and `status` print.

use std::collections::BTreeMap;
use std::io::Write;

use bottle::runtime::MachineInfo;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::home::Meta;

/// One machine as `ls --json` and `status --json` print it: smolvm 1.9.2's
/// keys and value types, in its (sorted) key order. Fields the double has no
/// counterpart for (GPUs, forks, restarts, health checks) carry smolvm's
/// values for a machine that uses none of them.
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    cmd: Vec<String>,
    cpus: Option<u32>,
    created_at: u64,
    cuda: bool,
    cuda_fork_pool_size: Option<u32>,
    cuda_vram_limit_mib: Option<u64>,
    entrypoint: Vec<String>,
    ephemeral: bool,
    forkable: bool,
    forkpoint_held: bool,
    gpu: bool,
    gpu_vram_mib: Option<u32>,
    health_cmd: Option<Vec<String>>,
    health_interval_secs: Option<u64>,
    health_retries: Option<u32>,
    health_startup_grace_secs: Option<u64>,
    health_timeout_secs: Option<u64>,
    image: Option<&'a str>,
    labels: &'a BTreeMap<String, String>,
    memory_mib: Option<u32>,
    mounts: usize,
    name: &'a str,
    network: bool,
    overlay_gb: Option<u64>,
    /// The VMM's process id. The local runtime has no VMM process, so this is
    /// always `null`, as smolvm prints it for a machine that is not running.
    pid: Option<i32>,
    ports: usize,
    restart_count: u32,
    restart_max_retries: u32,
    restart_policy: &'static str,
    pub state: &'a str,
    storage_gb: Option<u64>,
}

impl<'a> Record<'a> {
    pub fn new(info: &'a MachineInfo, meta: &'a Meta, state: &'a str) -> Self {
        Record {
            cmd: Vec::new(),
            cpus: info.cpus,
            created_at: meta.created_at,
            cuda: false,
            cuda_fork_pool_size: None,
            cuda_vram_limit_mib: None,
            entrypoint: Vec::new(),
            ephemeral: false,
            forkable: false,
            forkpoint_held: false,
            gpu: false,
            gpu_vram_mib: None,
            health_cmd: None,
            health_interval_secs: None,
            health_retries: None,
            health_startup_grace_secs: None,
            health_timeout_secs: None,
            image: meta.image.as_deref(),
            labels: &info.labels,
            memory_mib: info.memory_mib,
            mounts: meta.mounts.len(),
            name: &info.name,
            network: meta.network,
            overlay_gb: meta.overlay_gb,
            pid: None,
            ports: 0,
            restart_count: 0,
            restart_max_retries: 0,
            restart_policy: "never",
            state,
            storage_gb: meta.storage_gb,
        }
    }
}

/// smolvm lists machines in no particular order. The double orders them by
/// a hash of the name, so a caller that forgets to sort sees the mistake.
pub fn unsorted(records: &mut [Record<'_>]) {
    records.sort_by_cached_key(|record| Sha256::digest(record.name.as_bytes()));
}

/// `SMOLVM_DOUBLE_BAD_JSON`: cut the output short, as a crash half-way
/// through printing would.
pub fn write_json(out: &mut dyn Write, value: &impl Serialize, bad: bool) -> std::io::Result<()> {
    let mut text = serde_json::to_string_pretty(value).expect("records serialise");
    if bad {
        text.truncate(text.len() / 2);
        text.push_str(",\"");
    }
    writeln!(out, "{text}")
}

/// The prose table of `ls` (never parsed by bottle).
pub fn write_table(
    out: &mut dyn Write,
    records: &[Record<'_>],
    verbose: bool,
) -> std::io::Result<()> {
    if records.is_empty() {
        return writeln!(out, "No machines found");
    }
    writeln!(
        out,
        "{:<20} {:<12} {:>5} {:>10} {:>7} {:>7} {:>8} {:>8}",
        "NAME", "STATE", "CPUS", "MEMORY", "MOUNTS", "PORTS", "STORAGE", "OVERLAY"
    )?;
    writeln!(out, "{}", "-".repeat(88))?;
    for record in records {
        let name: String = record.name.chars().take(18).collect();
        writeln!(
            out,
            "{:<20} {:<12} {:>5} {:>10} {:>7} {:>7} {:>8} {:>8}",
            name,
            record.state,
            record.cpus.map(|c| c.to_string()).unwrap_or_default(),
            record
                .memory_mib
                .map(|m| format!("{m} MiB"))
                .unwrap_or_default(),
            record.mounts,
            record.ports,
            format!("{} GiB", record.storage_gb.unwrap_or(20)),
            format!("{} GiB", record.overlay_gb.unwrap_or(10)),
        )?;
        if verbose {
            for (key, value) in record.labels {
                writeln!(out, "  Label: {key}={value}")?;
            }
            writeln!(out, "  Created: {}", record.created_at)?;
            writeln!(out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use bottle::runtime::MachineState;

    use super::*;

    /// The keys smolvm-cli.md documents for `ls --json`.
    const DOCUMENTED_KEYS: &[&str] = &[
        "name",
        "state",
        "cpus",
        "memory_mib",
        "pid",
        "mounts",
        "ports",
        "image",
        "network",
        "labels",
        "created_at",
        "storage_gb",
        "overlay_gb",
        "entrypoint",
        "cmd",
        "ephemeral",
        "gpu",
        "gpu_vram_mib",
        "cuda",
        "forkable",
        "cuda_fork_pool_size",
        "cuda_vram_limit_mib",
        "forkpoint_held",
        "restart_policy",
        "restart_max_retries",
        "restart_count",
        "health_cmd",
        "health_interval_secs",
        "health_timeout_secs",
        "health_retries",
        "health_startup_grace_secs",
    ];

    fn info() -> MachineInfo {
        MachineInfo {
            name: "bottle-coder".into(),
            state: MachineState::Created,
            cpus: Some(2),
            memory_mib: Some(2048),
            image: Some("/srv/rootfs".into()),
            network: true,
            labels: BTreeMap::from([("b".into(), "2".into()), ("a".into(), "1".into())]),
        }
    }

    #[test]
    fn the_documented_keys_in_sorted_order_with_their_types() {
        let info = info();
        let meta = Meta {
            created_at: 1795764145,
            image: Some("local-dir:/srv/rootfs".into()),
            network: true,
            ..Meta::default()
        };
        let text = serde_json::to_string(&Record::new(&info, &meta, "created")).unwrap();
        // Keys in the order printed.
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let printed: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut documented = DOCUMENTED_KEYS.to_vec();
        documented.sort_unstable();
        assert_eq!(printed, documented);
        let positions: Vec<usize> = documented
            .iter()
            .map(|key| text.find(&format!("\"{key}\":")).unwrap())
            .collect();
        assert!(
            positions.is_sorted(),
            "keys are not printed in sorted order: {text}"
        );
        assert!(text.find("\"a\":\"1\"").unwrap() < text.find("\"b\":\"2\"").unwrap());

        assert_eq!(value["cpus"], 2);
        assert_eq!(value["memory_mib"], 2048);
        assert_eq!(value["pid"], serde_json::Value::Null);
        assert_eq!(value["mounts"], 0);
        assert_eq!(value["image"], "local-dir:/srv/rootfs");
        assert_eq!(value["created_at"], 1795764145u64);
        assert_eq!(value["restart_policy"], "never");
        assert_eq!(value["entrypoint"], serde_json::json!([]));
    }

    #[test]
    fn bad_json_does_not_parse() {
        let mut out = Vec::new();
        write_json(&mut out, &vec![1, 2, 3], true).unwrap();
        assert!(serde_json::from_slice::<serde_json::Value>(&out).is_err());
    }
}
