//! The machine step: the machine exists with the declared settings, runs,
//! and the agent user exists in it.
//!
//! Creating, starting, updating and replacing are machine actions of the
//! plan; this module builds what they send to the runtime and provisions the
//! user once the machine runs.

use std::collections::BTreeMap;

use super::txn::{GID_PLACEHOLDER, UID_PLACEHOLDER};
use super::{AgentCtx, GuestUser, Recorded, Step, StepCx, StepResult, Work};
use crate::graph::MachineHashes;
use crate::ledger::{LEDGER_DIR, LedgerEntry};
use crate::manifest::{Bottle, Image};
use crate::runtime::{Egress, MachineSpec, MachineUpdate, SecretMount, SecretSource, VolumeMount};

/// Labels every managed machine carries.
pub const LABEL_MANAGED_BY: &str = "bottle.managed-by";
pub const LABEL_PROJECT: &str = "bottle.project";
pub const LABEL_AGENT: &str = "bottle.agent";
pub const LABEL_BOTTLE: &str = "bottle.bottle";
pub const LABEL_SPEC_HASH: &str = "bottle.spec-hash";
/// Prefix of the per-field hashes behind the spec hash, so a plan can say
/// which create-time setting changed.
pub const LABEL_SPEC_FIELD: &str = "bottle.spec.";
pub const MANAGED_BY: &str = "bottle";

/// The spec labels of a machine: the spec hash over its create-time
/// settings, and a short hash per field so a plan can say which one changed
/// (hash inputs: `graph::hash`).
pub fn spec_labels(hashes: &MachineHashes) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = hashes
        .fields
        .iter()
        .map(|(field, h)| (format!("{LABEL_SPEC_FIELD}{field}"), h.clone()))
        .collect();
    labels.insert(LABEL_SPEC_HASH.to_owned(), hashes.spec_hash.clone());
    labels
}

pub fn image_arg(image: &Image) -> Option<String> {
    match image {
        Image::Host => None,
        Image::Reference(r) => Some(r.clone()),
        Image::RootfsDir(p) | Image::Archive(p) => Some(p.display().to_string()),
    }
}

pub fn secret_mounts(bottle: &Bottle) -> Vec<SecretMount> {
    bottle
        .spec
        .secrets
        .iter()
        .filter_map(|(guest, r)| {
            let source = match (&r.from_env, &r.from_file) {
                (Some(var), _) => SecretSource::HostEnv(var.clone()),
                (None, Some(file)) => SecretSource::HostFile(file.into()),
                (None, None) => return None,
            };
            Some(SecretMount {
                guest_env: guest.clone(),
                source,
            })
        })
        .collect()
}

pub fn volume_mounts(bottle: &Bottle) -> Vec<VolumeMount> {
    bottle
        .volumes
        .iter()
        .map(|v| VolumeMount {
            host: v.host.clone(),
            guest: v.guest.clone(),
            read_only: v.read_only,
        })
        .collect()
}

/// What `create` sends for an agent's machine.
pub fn machine_spec(ctx: &AgentCtx) -> MachineSpec {
    let bottle = ctx.bottle;
    let mut labels = spec_labels(ctx.machine_hashes);
    labels.insert(LABEL_MANAGED_BY.into(), MANAGED_BY.into());
    labels.insert(LABEL_PROJECT.into(), ctx.project.name.clone());
    labels.insert(LABEL_AGENT.into(), ctx.agent.name.clone());
    labels.insert(LABEL_BOTTLE.into(), bottle.name.clone());
    MachineSpec {
        name: ctx.machine.to_owned(),
        labels,
        image: image_arg(&bottle.image),
        cpus: bottle.spec.cpus,
        memory_mib: bottle.spec.memory_mib,
        env: bottle.spec.env.clone(),
        volumes: volume_mounts(bottle),
        egress: bottle.spec.egress.as_ref().map(|e| Egress {
            allow_hosts: e.allow_hosts.clone(),
            allow_cidrs: e.allow_cidrs.clone(),
        }),
        allow_unfiltered_network: bottle
            .spec
            .local
            .as_ref()
            .is_some_and(|l| l.allow_unfiltered_network),
        secrets: secret_mounts(bottle),
    }
}

/// The name under which a replacement's settings are tried before the old
/// machine is deleted. Agent names hold no `_`, so it is no agent's
/// machine; it carries the project's labels, so one left behind by an
/// interrupted run is listed as undeclared (and pruned with `--prune`).
pub fn scratch_name(machine: &str) -> String {
    format!("{machine}{SCRATCH_SUFFIX}")
}

const SCRATCH_SUFFIX: &str = "_replace-check";

/// Is this the name of a replacement's trial machine?
pub fn is_scratch(machine: &str) -> bool {
    machine.ends_with(SCRATCH_SUFFIX)
}

/// The settings `machine update` changes in place, as recorded in the
/// machine's ledger entry (smolvm does not report them): the env keys and
/// hash, and the volumes (needed to remove them later).
pub fn mutable_detail(ctx: &AgentCtx) -> BTreeMap<String, serde_json::Value> {
    let env_keys: Vec<&String> = ctx.bottle.spec.env.keys().collect();
    let volumes: Vec<String> = volume_mounts(ctx.bottle)
        .iter()
        .map(VolumeMount::to_arg)
        .collect();
    let mut d = BTreeMap::new();
    d.insert("env_keys".into(), serde_json::json!(env_keys));
    d.insert(
        "env_hash".into(),
        serde_json::json!(ctx.machine_hashes.mutable.env),
    );
    d.insert("volumes".into(), serde_json::json!(volumes));
    d
}

/// Which in-place settings differ, as causes and the update that fixes
/// them. cpus and memory come from `ls`; env and volumes from the machine's
/// ledger entry when the machine runs (`None` otherwise).
pub fn pending_update(
    ctx: &AgentCtx,
    listed_cpus: Option<u32>,
    listed_memory: Option<u32>,
    recorded: Option<&LedgerEntry>,
) -> (Vec<String>, MachineUpdate) {
    let want = &ctx.machine_hashes.mutable;
    let mut causes = Vec::new();
    let mut update = MachineUpdate::default();
    if let Some(cpus) = listed_cpus.filter(|c| *c != want.cpus) {
        causes.push(format!("cpus {cpus} → {}", want.cpus));
        update.cpus = Some(want.cpus);
    }
    if let Some(mem) = listed_memory.filter(|m| *m != want.memory_mib) {
        causes.push(format!("memory_mib {mem} → {}", want.memory_mib));
        update.memory_mib = Some(want.memory_mib);
    }
    if let Some(entry) = recorded {
        let env = &ctx.bottle.spec.env;
        if entry.detail_str("env_hash") != Some(want.env.as_str()) {
            causes.push("env changed".into());
            update.remove_env = entry
                .detail_strings("env_keys")
                .into_iter()
                .filter(|k| !env.contains_key(k))
                .collect();
            update.set_env = env.clone();
        }
        let old = entry.detail_strings("volumes");
        let new = volume_mounts(ctx.bottle);
        let new_args: Vec<String> = new.iter().map(VolumeMount::to_arg).collect();
        if old != new_args {
            causes.push("volumes changed".into());
            update.add_volumes = new
                .into_iter()
                .filter(|v| !old.contains(&v.to_arg()))
                .collect();
            update.remove_volumes = old
                .iter()
                .filter(|v| !new_args.contains(v))
                .filter_map(|v| parse_volume_arg(v))
                .collect();
        }
    }
    (causes, update)
}

fn parse_volume_arg(arg: &str) -> Option<VolumeMount> {
    let (rest, read_only) = match arg.strip_suffix(":ro") {
        Some(r) => (r, true),
        None => (arg, false),
    };
    let (host, guest) = rest.rsplit_once(':')?;
    Some(VolumeMount {
        host: host.into(),
        guest: guest.to_owned(),
        read_only,
    })
}

/// `$1` the user, `$2` its home.
const ENSURE_USER: &str = r#"set -e
u="$1"; h="$2"
if ! id -u "$u" >/dev/null 2>&1; then
  if command -v useradd >/dev/null 2>&1; then useradd -m -d "$h" -s /bin/sh "$u"
  else adduser -D -h "$h" -s /bin/sh "$u"; fi
fi
mkdir -p "$h"
chown -h "$(id -u "$u"):$(id -g "$u")" "$h"
mkdir -p /var/lib/bottle/ledger && chmod 700 /var/lib/bottle /var/lib/bottle/ledger
"#;

pub struct MachineStep;

impl Step for MachineStep {
    fn noun(&self) -> String {
        "agent user".into()
    }

    fn probe(&self, ctx: &AgentCtx) -> Option<String> {
        Some(probe(ctx))
    }

    fn drift_path(&self, ctx: &AgentCtx) -> String {
        format!("user {}", ctx.user())
    }

    /// Make sure the agent user exists; the entry records its ids.
    fn apply(&self, cx: &StepCx, entry: &mut LedgerEntry) -> StepResult<Work> {
        let ctx = cx.ctx;
        let home = ctx.home();
        entry.paths = vec![home.clone(), LEDGER_DIR.to_owned()];
        entry.detail = mutable_detail(ctx);
        entry
            .detail
            .insert("user".into(), serde_json::json!(ctx.user()));
        entry
            .detail
            .insert("uid".into(), serde_json::json!(UID_PLACEHOLDER));
        entry
            .detail
            .insert("gid".into(), serde_json::json!(GID_PLACEHOLDER));
        Ok(Work::new(
            "creating the agent user",
            "the image needs `useradd` (shadow) or busybox `adduser`",
            ENSURE_USER,
        )
        .args([ctx.user().to_owned(), home])
        .recorded(Recorded::Expected(
            "printf '%s %s\\n' \"$bottle_uid\" \"$bottle_gid\"".into(),
        )))
    }

    fn undo(&self, _cx: &StepCx, _entry: &LedgerEntry) -> StepResult<Work> {
        Ok(Work::new("forgetting the machine step", "", ""))
    }
}

fn parse_ids(out: &str) -> Option<GuestUser> {
    let mut it = out.split_whitespace();
    Some(GuestUser {
        uid: it.next()?.parse().ok()?,
        gid: it.next()?.parse().ok()?,
    })
}

/// Prints the agent user's ids, or nothing when the user is missing.
pub fn probe(ctx: &AgentCtx) -> String {
    let u = super::sh_quote(ctx.user());
    format!("id -u {u} >/dev/null 2>&1 && echo \"$(id -u {u}) $(id -g {u})\"")
}

/// The user's ids as seen by a probe.
pub fn user_from_probe(output: &str) -> Option<GuestUser> {
    parse_ids(output)
}
