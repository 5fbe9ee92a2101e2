//! The machine step: the machine exists with the declared settings, runs,
//! and the agent user exists in it.
//!
//! Creating, starting, updating and replacing are machine actions of the
//! plan; this module builds what they send to the runtime and provisions the
//! user once the machine runs.

use std::collections::BTreeMap;

use super::txn::{GID_PLACEHOLDER, UID_PLACEHOLDER, fill_placeholder};
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
    let mut spec = MachineSpec {
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
        gate_port: None,
    };
    if let Some(gate) = ctx.gate {
        gated_spec(&mut spec, bottle, gate);
    }
    spec
}

/// A gated bottle's machine (DESIGN.md section 9): no `allow_hosts` (the
/// gate enforces them), the gate reachable, the proxy, CA and placeholder
/// variables set, and no secret with `hosts` given to the guest. The
/// bottle's own `env` wins over the gate's variables.
fn gated_spec(spec: &mut MachineSpec, bottle: &Bottle, gate: &crate::gate::reconcile::AgentGate) {
    use crate::gate::reconcile::{SMOLVM_GATE_CIDR, is_gated_secret};
    let cidrs = bottle
        .spec
        .egress
        .as_ref()
        .map(|e| e.allow_cidrs.clone())
        .unwrap_or_default();
    spec.egress = match gate.runtime {
        crate::runtime::RuntimeKind::Smolvm => Some(Egress {
            allow_hosts: Vec::new(),
            allow_cidrs: std::iter::once(SMOLVM_GATE_CIDR.to_owned())
                .chain(cidrs)
                .collect(),
        }),
        crate::runtime::RuntimeKind::Local => (!cidrs.is_empty()).then(|| Egress {
            allow_hosts: Vec::new(),
            allow_cidrs: cidrs,
        }),
    };
    spec.gate_port = Some(gate.port);
    let mut env = gate.env.clone();
    env.extend(bottle.spec.env.clone());
    spec.env = env;
    spec.secrets.retain(|m| {
        !bottle
            .spec
            .secrets
            .get(&m.guest_env)
            .is_some_and(is_gated_secret)
    });
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

/// The probe section that shows the in-place settings as the guest sees
/// them (smolvm does not report env or volumes, and `smolvm machine
/// update` changes them without bottle): not a step of its own, the
/// machine step's.
pub const SETTINGS_SECTION: &str = "machine-settings";

/// Prints, per declared env variable (by name), the SHA-256 of its value
/// in a command's environment (`unset` without it), then per declared
/// volume whether its guest path is mounted read-only, read-write or not
/// at all (the topmost mount there, from `/proc/self/mountinfo`). Values
/// are hashed, never printed.
pub fn settings_probe(ctx: &AgentCtx) -> String {
    let mut out = String::new();
    for key in ctx.bottle.spec.env.keys() {
        let k = super::sh_quote(key);
        out.push_str(&format!(
            "if bottle_v=$(printenv {k}); then printf 'env %s %s\\n' {k} \"$(printf '%s\\n' \"$bottle_v\" | sha256sum | cut -c1-64)\"; \
             else printf 'env %s unset\\n' {k}; fi\n"
        ));
    }
    for volume in &ctx.bottle.volumes {
        out.push_str(&format!(
            "bottle_g={} awk '$5 == ENVIRON[\"bottle_g\"] {{ split($6, o, \",\"); m = o[1] }} \
             END {{ printf \"vol %s %s\\n\", ENVIRON[\"bottle_g\"], (m == \"\" ? \"absent\" : m) }}' /proc/self/mountinfo\n",
            super::sh_quote(&mountinfo_escape(&volume.guest))
        ));
    }
    out.push_str(&sources_probe(ctx));
    out
}

/// Per declared volume, a fingerprint of what is mounted at its guest path
/// (the mount's device, root, file system type and source, hashed): the
/// machine step records it once it has provisioned the machine, so a
/// mount of another host directory there (read-only or not) shows.
fn sources_probe(ctx: &AgentCtx) -> String {
    let mut out = String::new();
    for volume in &ctx.bottle.volumes {
        out.push_str(&format!(
            "bottle_g={}; export bottle_g; bottle_s=$(awk '$5 == ENVIRON[\"bottle_g\"] {{ for (i = 7; i < NF && $i != \"-\"; i++) ; s = $3 \" \" $4 \" \" $(i+1) \" \" $(i+2) }} \
             END {{ print s }}' /proc/self/mountinfo); \
             printf 'src %s %s\\n' \"$bottle_g\" \"$(printf '%s\\n' \"$bottle_s\" | sha256sum | cut -c1-64)\"\n",
            super::sh_quote(&mountinfo_escape(&volume.guest))
        ));
    }
    out
}

/// The `src` lines of a settings or provisioning output, by guest path.
fn parse_sources(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("src "))
        .filter_map(|rest| rest.rsplit_once(' '))
        .map(|(path, fp)| (path.to_owned(), fp.to_owned()))
        .collect()
}

/// A path as `/proc/self/mountinfo` writes it (space, tab, newline and
/// backslash octal-escaped).
fn mountinfo_escape(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        match c {
            ' ' | '\t' | '\n' | '\\' => out.push_str(&format!("\\{:03o}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// What [`settings_probe`] prints for a guest whose settings match the
/// manifest, line by line, keyed by what each line is about.
fn expected_settings(ctx: &AgentCtx) -> BTreeMap<String, String> {
    let mut lines = BTreeMap::new();
    for (key, value) in &ctx.bottle.spec.env {
        let printed = format!("{}\n", value.trim_end_matches('\n'));
        lines.insert(format!("env {key}"), super::sha256_hex(printed.as_bytes()));
    }
    for volume in &ctx.bottle.volumes {
        let mode = if volume.read_only { "ro" } else { "rw" };
        lines.insert(
            format!("vol {}", mountinfo_escape(&volume.guest)),
            mode.to_owned(),
        );
    }
    lines
}

/// The observed section, keyed like [`expected_settings`].
fn parse_settings(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| {
            let (subject, value) = line.rsplit_once(' ')?;
            Some((subject.to_owned(), value.to_owned()))
        })
        .collect()
}

/// What differs in a machine's in-place settings.
#[derive(Debug, Default)]
pub struct PendingUpdate {
    /// What differs that `update` fixes, one cause each.
    pub causes: Vec<String>,
    pub update: MachineUpdate,
    /// What differs that only a new machine fixes: a volume re-pointed
    /// outside bottle at another host directory. smolvm removes a volume
    /// only by its exact `HOST:GUEST` and reports no volumes, so the mount
    /// cannot be named to remove; adding the declared one beside it is
    /// refused (`duplicate mount target`).
    pub replace: Vec<String>,
}

/// Which in-place settings differ, as causes and the update that fixes
/// them. cpus and memory come from `ls`; env and volumes from the machine's
/// ledger entry when the machine runs (`None` otherwise), and from what the
/// guest shows ([`SETTINGS_SECTION`], when probed): a change made outside
/// bottle is drift too.
pub fn pending_update(
    ctx: &AgentCtx,
    listed_cpus: Option<u32>,
    listed_memory: Option<u32>,
    recorded: Option<&LedgerEntry>,
    observed: Option<&str>,
) -> PendingUpdate {
    let want = &ctx.machine_hashes.mutable;
    let mut causes = Vec::new();
    let mut replace = Vec::new();
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
            let old_keys = entry.detail_strings("env_keys");
            update.remove_env = old_keys
                .iter()
                .filter(|k| !env.contains_key(*k))
                .cloned()
                .collect();
            update.set_env = env.clone();
            // Name the variables: added, removed, or (same names) changed
            // values. Values are never shown.
            let added: Vec<&str> = env
                .keys()
                .filter(|k| !old_keys.contains(k))
                .map(String::as_str)
                .collect();
            let mut names: Vec<String> = added.iter().map(|k| format!("+{k}")).collect();
            names.extend(update.remove_env.iter().map(|k| format!("-{k}")));
            causes.push(if names.is_empty() {
                "env changed: a value of an existing variable".to_owned()
            } else {
                format!("env changed: {}", names.join(", "))
            });
        }
        let old = entry.detail_strings("volumes");
        let new = volume_mounts(ctx.bottle);
        let new_args: Vec<String> = new.iter().map(VolumeMount::to_arg).collect();
        if old != new_args {
            update.add_volumes = new
                .into_iter()
                .filter(|v| !old.contains(&v.to_arg()))
                .collect();
            update.remove_volumes = old
                .iter()
                .filter(|v| !new_args.contains(v))
                .filter_map(|v| parse_volume_arg(v))
                .collect();
            let mut named: Vec<String> = update
                .add_volumes
                .iter()
                .map(|v| format!("+{}", v.to_arg()))
                .collect();
            named.extend(
                update
                    .remove_volumes
                    .iter()
                    .map(|v| format!("-{}", v.to_arg())),
            );
            causes.push(if named.is_empty() {
                "volumes changed: their order".to_owned()
            } else {
                format!("volumes changed: {}", named.join(", "))
            });
        }
    }
    if let Some(observed) = observed {
        let sources = parse_sources(observed);
        let observed = parse_settings(observed);
        let differs = |subject: &String, want: &String| observed.get(subject) != Some(want);
        let expected = expected_settings(ctx);
        let env: Vec<&str> = expected
            .iter()
            .filter(|(subject, want)| subject.starts_with("env ") && differs(subject, want))
            .map(|(subject, _)| &subject[4..])
            .collect();
        // A manifest change already sets the whole env (and volumes it
        // adds are not mounted yet): only what else differs is drift.
        if !env.is_empty() && update.set_env.is_empty() {
            causes.push(format!("env changed in guest: {}", env.join(", ")));
            update.set_env = ctx.bottle.spec.env.clone();
        }
        // A volume mounted otherwise than declared is removed and added
        // again, as declared (a mount of another host directory at the
        // same guest path is the runtime's to refuse or replace).
        for volume in volume_mounts(ctx.bottle) {
            let subject = format!("vol {}", mountinfo_escape(&volume.guest));
            let escaped = mountinfo_escape(&volume.guest);
            // Only what is mounted has a source: an absent volume is added.
            let mounted = observed
                .get(&subject)
                .is_some_and(|mode| mode.as_str() != "absent");
            let source_changed = mounted
                && recorded
                    .and_then(|e| e.detail.get("volume_sources"))
                    .and_then(|s| s.get(&escaped))
                    .and_then(|v| v.as_str())
                    .is_some_and(|was| sources.get(&escaped).is_some_and(|now| now != was));
            let mode_changed = expected
                .get(&subject)
                .is_some_and(|want| differs(&subject, want));
            if update.add_volumes.contains(&volume) || !(mode_changed || source_changed) {
                continue;
            }
            let what = match observed.get(&subject).map(String::as_str) {
                Some(mode) if mode_changed && source_changed => {
                    format!("{mode}, another source is mounted")
                }
                Some(mode) if mode_changed => mode.to_owned(),
                Some(_) => "another source is mounted".to_owned(),
                None => "not probed".to_owned(),
            };
            if source_changed {
                replace.push(format!(
                    "volume {} changed in guest: {what} (the runtime does not say which host \
                     directory, so it cannot be unmounted by an update)",
                    volume.guest
                ));
                continue;
            }
            causes.push(format!("volume {} changed in guest: {what}", volume.guest));
            if !update.remove_volumes.contains(&volume) {
                update.remove_volumes.push(volume.clone());
            }
            if !update.add_volumes.contains(&volume) {
                update.add_volumes.push(volume);
            }
        }
    }
    PendingUpdate {
        causes,
        update,
        replace,
    }
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
        // What is mounted at each volume's guest path, fingerprinted in
        // the guest once the machine is provisioned (`fill`, line by line
        // in the volumes' order): a mount of another source later shows.
        let sources: BTreeMap<String, String> = ctx
            .bottle
            .volumes
            .iter()
            .enumerate()
            .map(|(i, v)| {
                (
                    mountinfo_escape(&v.guest),
                    fill_placeholder(&format!("src{i}")),
                )
            })
            .collect();
        entry
            .detail
            .insert("volume_sources".into(), serde_json::json!(sources));
        let script = format!(
            "{ENSURE_USER}( :\n{}) | awk '{{ print \"src\" (NR - 1), $NF }}' > fill\n",
            sources_probe(ctx)
        );
        Ok(Work::new(
            "creating the agent user",
            "the image needs `useradd` (shadow) or busybox `adduser`",
            script,
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
