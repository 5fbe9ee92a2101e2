//! Golden tests of the planner: a fixed desired state (tests/fixtures/plan)
//! against hand-made snapshots, compared as the text `bottle plan` prints.

use std::collections::BTreeMap;
use std::path::Path;

use bottle::desired::Desired;
use bottle::ledger::LedgerEntry;
use bottle::observe::{Probe, Snapshot};
use bottle::plan::{PlanOptions, plan};
use bottle::runtime::{MachineInfo, MachineState};
use bottle::steps::{GuestUser, machine, probe_digest};

fn desired() -> Desired {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/plan");
    let project = bottle::manifest::load_dir(&dir).expect("fixture is valid");
    let graph = bottle::graph::build(&project).expect("fixture graph builds");
    Desired::new(project, &graph)
}

/// A machine as `ls` reports it for `agent`, with the labels bottle gave it.
fn listed(desired: &Desired, agent: &str, state: MachineState) -> MachineInfo {
    let a = &desired.agents[agent];
    let ctx = desired.ctx(a);
    let spec = machine::machine_spec(&ctx);
    MachineInfo {
        name: a.machine.clone(),
        state,
        cpus: Some(spec.cpus),
        memory_mib: Some(spec.memory_mib),
        image: None,
        network: spec.egress.is_some(),
        labels: spec.labels,
    }
}

/// The agent user's ids in every fixture guest.
const AGENT_USER: GuestUser = GuestUser {
    uid: 1000,
    gid: 1000,
};

/// What the probe of an agent whose every step is applied and untouched
/// would report.
fn probed(desired: &Desired, agent: &str) -> Probe {
    let a = &desired.agents[agent];
    let mut probe = Probe::default();
    for step in &a.steps {
        let id = step.kind.id();
        let ctx = desired.ctx(a);
        let section = match step.kind {
            bottle::graph::StepKind::Supervise => format!(
                "file\n{}",
                r#"{"mcpServers": {"supervise": {"type": "http", "url": "http://10.8.0.2:9100/"}}}"#
            ),
            // The prompt and the skills are what the host knows: the
            // guest shows them as the host computes they should be.
            bottle::graph::StepKind::Prompt => format!(
                "600 1000 1000\n{}  -\n",
                bottle::steps::sha256_hex(&bottle::steps::prompt::content(&ctx).unwrap())
            ),
            bottle::graph::StepKind::Skills => {
                bottle::steps::expected_output(&step.kind, &ctx, Some(AGENT_USER))
                    .expect("the host knows what its skills look like in the guest")
            }
            _ => format!("state of {id}\n"),
        };
        let mut entry = LedgerEntry::new(&step.kind, step.hash.clone());
        entry.applied_at = 1_795_764_145;
        if !matches!(step.kind, bottle::graph::StepKind::Setup(_)) {
            entry.digest = probe_digest(&step.kind, &section);
            probe.sections.insert(id.clone(), section);
        }
        if step.kind == bottle::graph::StepKind::Machine {
            // As the machine step records it: the settings, and the user.
            entry.detail = machine::mutable_detail(&ctx);
            entry
                .detail
                .insert("user".into(), serde_json::json!(ctx.user()));
            probe.sections.insert(id.clone(), "1000 1000\n".into());
            entry.digest = probe_digest(&step.kind, "1000 1000\n");
        }
        probe.ledger.insert(id, entry);
    }
    probe
}

/// Every agent running and in sync.
fn in_sync(desired: &Desired) -> Snapshot {
    let mut machines: Vec<MachineInfo> = desired
        .agents
        .keys()
        .map(|a| listed(desired, a, MachineState::Running))
        .collect();
    machines.sort_by(|a, b| a.name.cmp(&b.name));
    let probes = desired
        .agents
        .values()
        .map(|a| (a.machine.clone(), probed(desired, &a.name)))
        .collect::<BTreeMap<_, _>>();
    Snapshot {
        machines,
        probes,
        ..Snapshot::default()
    }
}

fn render(desired: &Desired, snapshot: &Snapshot, options: &PlanOptions) -> String {
    plan(desired, snapshot, options).render()
}

fn machine_of<'a>(snapshot: &'a mut Snapshot, name: &str) -> &'a mut MachineInfo {
    snapshot
        .machines
        .iter_mut()
        .find(|m| m.name == name)
        .expect("machine listed")
}

#[test]
fn fresh_project_creates_every_machine_and_step() {
    let d = desired();
    insta::assert_snapshot!(render(&d, &Snapshot::default(), &PlanOptions::default()));
}

#[test]
fn nothing_to_do_when_everything_matches() {
    let d = desired();
    insta::assert_snapshot!(render(&d, &in_sync(&d), &PlanOptions::default()), @"No changes: every agent matches its manifest.");
}

#[test]
fn a_step_changed_in_the_manifest_is_applied_again() {
    let d = desired();
    let mut out = String::new();
    for step in [
        "ca",
        "prompt",
        "skills",
        "git",
        "setup:toolchain",
        "supervise",
        "machine",
    ] {
        let mut s = in_sync(&d);
        let probe = s.probes.get_mut("bottle_golden_reviewer").unwrap();
        probe.ledger.get_mut(step).unwrap().hash = "an older hash".into();
        out.push_str(&format!(
            "## {step}\n{}\n",
            render(&d, &s, &PlanOptions::default())
        ));
    }
    insta::assert_snapshot!(out);
}

#[test]
fn a_step_drifted_in_the_guest_is_applied_again() {
    let d = desired();
    let mut out = String::new();
    for step in ["ca", "prompt", "skills", "git", "supervise", "machine"] {
        let mut s = in_sync(&d);
        let probe = s.probes.get_mut("bottle_golden_reviewer").unwrap();
        let edited = match step {
            "supervise" => {
                "file\n{\"mcpServers\": {\"supervise\": {\"type\": \"http\", \"url\": \"http://evil/\"}}}"
            }
            _ => "edited inside the guest\n",
        };
        probe.sections.insert(step.into(), edited.into());
        out.push_str(&format!(
            "## {step}\n{}\n",
            render(&d, &s, &PlanOptions::default())
        ));
    }
    insta::assert_snapshot!(out);
}

#[test]
fn a_step_that_left_the_manifest_is_undone() {
    let d = desired();
    let mut s = in_sync(&d);
    // coder declares no skills, but its guest still has some; and a setup
    // step that was removed.
    let probe = s.probes.get_mut("bottle_golden_coder").unwrap();
    let mut skills = LedgerEntry::new(&bottle::graph::StepKind::Skills, "h");
    skills.paths = vec!["/home/node/.claude/skills/review".into()];
    probe.ledger.insert("skills".into(), skills);
    let old = bottle::graph::StepKind::Setup("old-tool".into());
    probe.ledger.insert(old.id(), LedgerEntry::new(&old, "h"));
    insta::assert_snapshot!(render(&d, &s, &PlanOptions::default()));
}

#[test]
fn an_immutable_setting_changed_means_replacement_only_when_allowed() {
    let d = desired();
    let mut s = in_sync(&d);
    let m = machine_of(&mut s, "bottle_golden_reviewer");
    m.labels.insert("bottle.spec-hash".into(), "0000".into());
    m.labels
        .insert("bottle.spec.egress.allow_hosts".into(), "0000".into());
    let blocked = render(&d, &s, &PlanOptions::default());
    let allowed = render(
        &d,
        &s,
        &PlanOptions {
            allow_replace: true,
            ..PlanOptions::default()
        },
    );
    // A blocked replacement holds back nothing else: the machine that
    // exists still gets a changed prompt, which does not wait for it.
    let probe = s.probes.get_mut("bottle_golden_reviewer").unwrap();
    probe.ledger.get_mut("prompt").unwrap().hash = "an older hash".into();
    let planned = plan(&d, &s, &PlanOptions::default());
    let prompt = planned
        .actions
        .iter()
        .find(|a| a.op.step() == "prompt")
        .expect("the prompt change is planned");
    assert!(
        prompt.after.is_empty() && prompt.blocked.is_none(),
        "{prompt:?}"
    );
    let with_prompt = planned.render();
    // An in-place change still restarts the machine, and the prompt waits
    // for it; a changed setup command waits for the replacement.
    machine_of(&mut s, "bottle_golden_reviewer").cpus = Some(7);
    let probe = s.probes.get_mut("bottle_golden_reviewer").unwrap();
    probe.ledger.get_mut("setup:toolchain").unwrap().hash = "an older hash".into();
    let with_restart = render(&d, &s, &PlanOptions::default());
    let planned = plan(&d, &s, &PlanOptions::default());
    let restart = planned
        .actions
        .iter()
        .position(|a| a.op.verb() == "restart");
    let prompt = planned.actions.iter().find(|a| a.op.step() == "prompt");
    assert_eq!(prompt.map(|p| p.after.clone()), restart.map(|r| vec![r]));
    // A machine whose agent user was never provisioned: the steps need it.
    let probe = s.probes.get_mut("bottle_golden_reviewer").unwrap();
    probe.ledger.remove("machine");
    let unprovisioned = render(&d, &s, &PlanOptions::default());
    insta::assert_snapshot!(format!(
        "## without --allow-replace\n{blocked}\n## with --allow-replace\n{allowed}\n\
         ## blocked, and the prompt changed\n{with_prompt}\n\
         ## blocked, with cpus and a setup command changed too\n{with_restart}\n\
         ## blocked, the agent user never provisioned\n{unprovisioned}"
    ));
}

#[test]
fn stopped_and_unreachable_machines_are_started() {
    let d = desired();
    let mut s = in_sync(&d);
    let coder = machine_of(&mut s, "bottle_golden_coder");
    coder.state = MachineState::Stopped;
    coder.memory_mib = Some(4096);
    let reviewer = machine_of(&mut s, "bottle_golden_reviewer");
    reviewer.state = MachineState::Unreachable;
    reviewer.cpus = Some(4);
    s.probes.clear();
    insta::assert_snapshot!(render(&d, &s, &PlanOptions::default()));
}

#[test]
fn changed_resources_restart_a_running_machine() {
    let d = desired();
    let mut s = in_sync(&d);
    machine_of(&mut s, "bottle_golden_coder").memory_mib = Some(4096);
    let probe = s.probes.get_mut("bottle_golden_coder").unwrap();
    probe
        .ledger
        .get_mut("machine")
        .unwrap()
        .detail
        .insert("env_hash".into(), "old".into());
    insta::assert_snapshot!(render(&d, &s, &PlanOptions::default()));
    // The cause names what changed: variables (never their values) and
    // volumes.
    let machine = s
        .probes
        .get_mut("bottle_golden_coder")
        .unwrap()
        .ledger
        .get_mut("machine")
        .unwrap();
    let mut keys = machine.detail_strings("env_keys");
    keys.push("OLD_VAR".into());
    machine
        .detail
        .insert("env_keys".into(), serde_json::json!(keys));
    let mut volumes = machine.detail_strings("volumes");
    volumes.push("/srv/old:/data:ro".into());
    machine
        .detail
        .insert("volumes".into(), serde_json::json!(volumes));
    let text = render(&d, &s, &PlanOptions::default());
    assert!(
        text.contains("env changed: -OLD_VAR, volumes changed: -/srv/old:/data:ro"),
        "{text}"
    );
}

#[test]
fn undeclared_machines_are_pruned_only_when_allowed_and_foreign_ones_never() {
    let d = desired();
    let mut s = in_sync(&d);
    let mut gone = listed(&d, "coder", MachineState::Running);
    gone.name = "bottle_golden_retired".into();
    gone.labels.insert("bottle.agent".into(), "retired".into());
    let mut foreign = listed(&d, "coder", MachineState::Running);
    foreign.name = "bottle_other_coder".into();
    foreign
        .labels
        .insert("bottle.project".into(), "other".into());
    let mut unmanaged = foreign.clone();
    unmanaged.name = "hand-made".into();
    unmanaged.labels.clear();
    s.machines.extend([gone, foreign, unmanaged]);
    s.machines.sort_by(|a, b| a.name.cmp(&b.name));
    let blocked = render(&d, &s, &PlanOptions::default());
    let allowed = render(
        &d,
        &s,
        &PlanOptions {
            prune: true,
            ..PlanOptions::default()
        },
    );
    let targeted = render(
        &d,
        &s,
        &PlanOptions {
            prune: true,
            targets: Some(vec!["coder".into()]),
            ..PlanOptions::default()
        },
    );
    insta::assert_snapshot!(format!(
        "## without --prune\n{blocked}\n## with --prune\n{allowed}\n## with --prune --target coder\n{targeted}"
    ));
}

#[test]
fn a_name_taken_by_another_project_is_never_touched() {
    let d = desired();
    let mut s = in_sync(&d);
    let m = machine_of(&mut s, "bottle_golden_coder");
    m.labels
        .insert("bottle.project".into(), "someone-else".into());
    s.probes.remove("bottle_golden_coder");
    insta::assert_snapshot!(render(&d, &s, &PlanOptions::default()));
}

#[test]
fn a_guest_that_cannot_be_probed_is_an_error_not_drift() {
    let d = desired();
    let mut s = in_sync(&d);
    s.probes.get_mut("bottle_golden_coder").unwrap().error = Some("exec timed out".into());
    let p = plan(&d, &s, &PlanOptions::default());
    assert!(
        p.actions.is_empty(),
        "nothing is planned on an unknown state"
    );
    assert_eq!(p.errors.len(), 1);
    insta::assert_snapshot!(p.render());
}

#[test]
fn frozen_and_unknown_state_machines_are_never_in_sync() {
    let d = desired();
    for state in [MachineState::Frozen, MachineState::Other("paused".into())] {
        let mut s = in_sync(&d);
        machine_of(&mut s, "bottle_golden_coder").state = state.clone();
        s.probes.remove("bottle_golden_coder");
        let p = plan(&d, &s, &PlanOptions::default());
        assert!(p.actions.is_empty(), "{state}: nothing is planned");
        assert_eq!(p.errors.len(), 1, "{state}: an error, never in sync");
        assert_eq!(p.errors[0].agent, "coder");
        assert!(
            p.errors[0].message.contains(state.as_str()),
            "{:?}",
            p.errors
        );
    }
}

#[test]
fn plans_are_deterministic() {
    let d = desired();
    let s = in_sync(&d);
    let a =
        serde_json::to_string(&plan(&d, &Snapshot::default(), &PlanOptions::default())).unwrap();
    let b =
        serde_json::to_string(&plan(&d, &Snapshot::default(), &PlanOptions::default())).unwrap();
    assert_eq!(a, b);
    assert!(plan(&d, &s, &PlanOptions::default()).is_empty());
}

#[test]
fn a_changed_agent_user_is_named_as_the_cause() {
    let d = desired();
    let mut s = in_sync(&d);
    let probe = s.probes.get_mut("bottle_golden_reviewer").unwrap();
    for step in ["prompt", "skills"] {
        let entry = probe.ledger.get_mut(step).unwrap();
        entry.detail.insert("user".into(), "olduser".into());
    }
    insta::assert_snapshot!(render(&d, &s, &PlanOptions::default()), @r"
    agent reviewer (machine bottle_golden_reviewer)
      ~ apply    prompt    agent user changed: olduser → node
      ~ apply    skills    agent user changed: olduser → node

    Plan: 2 to apply.
    ");
}

/// The fixture's `dev` bottle has a gate (it declares `allow_hosts`): with
/// the gate's state directory known, the plan starts or reloads the gate
/// before anything of its agents, and notes how smolvm reaches it.
#[test]
fn the_gate_is_started_or_reloaded_before_the_machines_of_its_bottle() {
    use bottle::gate::control::Health;
    use bottle::gate::reconcile::GateHealth;
    let state = tempfile::tempdir().unwrap();
    let gated = || {
        let mut d = desired();
        d.attach_gate(state.path(), bottle::runtime::RuntimeKind::Smolvm)
            .unwrap();
        d
    };
    let d = gated();
    let gate = d.gate.as_ref().unwrap();
    let running = |hash: String| {
        GateHealth::Running(Health {
            pid: 4242,
            config_hash: hash,
            started_at: 1,
            secrets_read_at: 2,
            ports: BTreeMap::new(),
            missing_secrets: Vec::new(),
        })
    };
    let mut out = String::new();

    // Nothing yet: the gate starts first, every create waits for it.
    let fresh = Snapshot {
        gate: Some(GateHealth::NotRunning),
        ..Snapshot::default()
    };
    let planned = plan(&d, &fresh, &PlanOptions::default());
    assert_eq!(planned.actions[0].op.step(), "gate");
    for a in planned.actions.iter().filter(|a| a.op.verb() == "create") {
        assert_eq!(a.after, [0], "{a:?}");
    }
    out.push_str(&format!("## fresh\n{}\n", planned.render()));

    // Machines in sync, gate serving this config: nothing to do.
    let mut s = in_sync(&d);
    s.gate = Some(running(gate.config.hash()));
    let planned = plan(&d, &s, &PlanOptions::default());
    assert!(planned.actions.is_empty(), "{}", planned.render());

    // The gate died: it is started again, and no machine is touched.
    s.gate = Some(GateHealth::NotRunning);
    out.push_str(&format!(
        "## gate not running\n{}\n",
        render(&d, &s, &PlanOptions::default())
    ));

    // It serves another config (allow_hosts was edited since it was last
    // sent): a reload naming what changed, and no machine is touched.
    let mut before = gate.config.clone();
    before.bottles.get_mut("dev").unwrap().allow_hosts = vec!["old.example.com".into()];
    std::fs::create_dir_all(&gate.paths.dir).unwrap();
    std::fs::write(gate.paths.config(), serde_json::to_vec(&before).unwrap()).unwrap();
    s.gate = Some(running(before.hash()));
    out.push_str(&format!(
        "## gate config differs\n{}\n",
        render(&d, &s, &PlanOptions::default())
    ));

    // Something answers on the control socket, but not as a gate: an error,
    // never drift.
    s.gate = Some(GateHealth::Error(
        "the gate answered something bottle cannot read".into(),
    ));
    out.push_str(&format!(
        "## gate unreadable\n{}\n",
        render(&d, &s, &PlanOptions::default())
    ));

    // A machine created without the gate's settings (before the gate, or
    // with other credentials): it moves to the gate by replacement.
    let ungated = desired();
    let mut s = in_sync(&d);
    s.gate = Some(running(gate.config.hash()));
    let old = listed(&ungated, "coder", MachineState::Running);
    let name = old.name.clone();
    *machine_of(&mut s, &name) = old;
    out.push_str(&format!(
        "## a machine without the gate's settings\n{}",
        render(&d, &s, &PlanOptions::default())
    ));
    insta::assert_snapshot!(out);
}

/// What `smolvm machine update` changed outside bottle shows in the guest's
/// view of its settings (the probe's machine-settings section), and is a
/// restart with the update that puts the manifest's settings back.
#[test]
fn env_changed_in_the_guest_is_a_restart() {
    let d = desired();
    let sha = |text: &str| bottle::steps::sha256_hex(text.as_bytes());
    let mut s = in_sync(&d);
    let probe = s.probes.get_mut("bottle_golden_coder").unwrap();
    // As the manifest says: nothing to do.
    probe.sections.insert(
        machine::SETTINGS_SECTION.into(),
        format!("env EDITOR {}\n", sha("vi\n")),
    );
    assert!(plan(&d, &s, &PlanOptions::default()).is_empty());
    for observed in [
        format!("env EDITOR {}\n", sha("nano\n")),
        "env EDITOR unset\n".into(),
    ] {
        let probe = s.probes.get_mut("bottle_golden_coder").unwrap();
        probe
            .sections
            .insert(machine::SETTINGS_SECTION.into(), observed);
        let plan = plan(&d, &s, &PlanOptions::default());
        assert_eq!(
            plan.render(),
            "agent coder (machine bottle_golden_coder)\n  \
             ~ restart  machine   env changed in guest: EDITOR\n\nPlan: 1 to restart.\n"
        );
        let bottle::plan::Op::Restart { update } = &plan.actions[0].op else {
            panic!("{:?}", plan.actions[0].op);
        };
        assert_eq!(update.set_env["EDITOR"], "vi");
    }
}

/// Root in the guest can edit the ledger: a prompt, skills or supervise
/// server changed in the guest, with the ledger's digest rewritten to
/// match, is still drift, since the host knows what the guest should show.
#[test]
fn a_ledger_edited_in_the_guest_cannot_hide_what_the_host_knows() {
    let d = desired();
    for (step, edited, path) in [
        ("prompt", "600 1000 1000\nfeed  -\n", ".bottle/prompt.md"),
        ("skills", "== review\nmissing\n", ".claude/skills"),
        (
            "supervise",
            r#"file
{"mcpServers": {"supervise": {"type": "http", "url": "http://evil/"}}}"#,
            ".claude.json",
        ),
    ] {
        let mut s = in_sync(&d);
        let probe = s.probes.get_mut("bottle_golden_reviewer").unwrap();
        probe.sections.insert(step.into(), edited.into());
        let kind: bottle::graph::StepKind = step.parse().unwrap();
        probe.ledger.get_mut(step).unwrap().digest = probe_digest(&kind, edited);
        let planned = plan(&d, &s, &PlanOptions::default());
        let noun = bottle::steps::step(&kind).noun();
        assert_eq!(
            planned
                .actions
                .iter()
                .map(|a| (a.op.step().to_owned(), a.cause.clone()))
                .collect::<Vec<_>>(),
            [(
                step.to_owned(),
                format!("{noun} changed in guest: /home/node/{path}")
            )],
            "{}",
            planned.render()
        );
    }
}
