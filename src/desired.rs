//! The desired state: for each agent, its machine name, the spec labels its
//! machine must carry, and its steps in dependency order with their hashes.
//! Built once from the manifests and the graph; the planner compares it with
//! what was observed.

use std::collections::BTreeMap;

use crate::graph::{MachineHashes, StepGraph, StepKind};
use crate::manifest::Project;
use crate::steps::AgentCtx;

#[derive(Debug)]
pub struct Desired {
    pub project: Project,
    pub agents: BTreeMap<String, DesiredAgent>,
    by_machine: BTreeMap<String, String>,
    /// The project's gate, once [`Desired::attach_gate`] knows the state
    /// directory and the runtime (the runtime-facing commands).
    pub gate: Option<crate::gate::reconcile::DesiredGate>,
    /// The prompt and setup inputs as the manifests hold them now, by
    /// agent, for causes that show a diff; read before planning
    /// ([`crate::sent::desired_texts`]), empty until then.
    pub texts: BTreeMap<String, crate::sent::AgentTexts>,
}

#[derive(Debug, Clone)]
pub struct DesiredAgent {
    pub name: String,
    pub machine: String,
    /// The machine's create-time and in-place settings, hashed.
    pub machine_hashes: MachineHashes,
    /// In dependency order.
    pub steps: Vec<DesiredStep>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredStep {
    pub kind: StepKind,
    pub hash: String,
    /// Steps of the same agent this one runs after.
    pub after: Vec<StepKind>,
}

impl Desired {
    pub fn new(project: Project, graph: &StepGraph) -> Self {
        let mut agents = BTreeMap::new();
        let mut by_machine = BTreeMap::new();
        for name in project.agents.keys() {
            let machine_name = project.machine_name(name);
            let steps = graph
                .agent_steps(name)
                .map(|(id, step)| DesiredStep {
                    kind: step.kind.clone(),
                    hash: step.hash.clone(),
                    after: graph
                        .dependencies(id)
                        .into_iter()
                        .map(|d| graph.step(d).kind.clone())
                        .collect(),
                })
                .collect();
            let hashes = graph
                .machine_hashes(name)
                .expect("every agent has machine hashes")
                .clone();
            by_machine.insert(machine_name.clone(), name.clone());
            agents.insert(
                name.clone(),
                DesiredAgent {
                    name: name.clone(),
                    machine: machine_name,
                    machine_hashes: hashes,
                    steps,
                },
            );
        }
        Self {
            project,
            agents,
            by_machine,
            gate: None,
            texts: BTreeMap::new(),
        }
    }

    /// Know the gate: its kept state (ports, credentials; filled in memory
    /// where missing), its config, what each gated agent is given; and
    /// extend the hashes that depend on them (DESIGN.md section 9): the
    /// machine's spec hash by the guest's gate settings (a `gate` field),
    /// the `ca` step's by the project CA, the gate-served `git` and
    /// `supervise` steps' by their URLs.
    pub fn attach_gate(
        &mut self,
        state_dir: &std::path::Path,
        runtime: crate::runtime::RuntimeKind,
    ) -> Result<(), crate::gate::reconcile::GateError> {
        use crate::graph::hash;
        let mut gate = crate::gate::reconcile::DesiredGate::new(&self.project, state_dir, runtime)?;
        let ca = gate.ca_digest();
        for agent in self.agents.values_mut() {
            let Some(g) = gate.agents.get(&agent.name).cloned() else {
                continue;
            };
            let spec = &self.project.bottles[&self.project.agents[&agent.name].spec.bottle].spec;
            let mut env = hash::Enc::new(hash::SPEC_VERSION, "gate");
            env.str(&g.address).u64(g.env.len() as u64);
            for (k, v) in &g.env {
                env.str(k).str(v);
            }
            let field = hash::hex(&env.finish());
            let m = &mut agent.machine_hashes;
            m.spec_hash = hash::with_gate_inputs(&m.spec_hash, &[&field]);
            m.fields.insert("gate", hash::short(&field).to_owned());
            // Steps whose hash was extended here by what is known at plan
            // time (the gate's URLs and credentials), with their new hash: a
            // setup step after one of them is extended by it (its chain,
            // `hash::setup_after`, only saw the manifests' hash). Not `ca`:
            // a gate this apply starts mints the project CA after the plan,
            // so a setup step's recorded hash could not follow it.
            let mut extended: Vec<(StepKind, String)> = Vec::new();
            for step in &mut agent.steps {
                let input = match &step.kind {
                    StepKind::Setup(_) => {
                        let chained: Vec<String> = step
                            .after
                            .iter()
                            .filter_map(|k| extended.iter().find(|(e, _)| e == k))
                            .map(|(e, h)| format!("{} {h}", e.id()))
                            .collect();
                        if chained.is_empty() {
                            continue;
                        }
                        chained.join("\n")
                    }
                    StepKind::Ca => {
                        gate.ca_base.insert(agent.name.clone(), step.hash.clone());
                        ca.clone()
                    }
                    StepKind::Git if spec.git.as_ref().is_some_and(|g| g.gateway.is_none()) => {
                        g.git_base.clone()
                    }
                    StepKind::Supervise
                        if spec.supervise.as_ref().is_some_and(|s| s.url.is_none()) =>
                    {
                        g.supervise_url.clone()
                    }
                    _ => continue,
                };
                step.hash = hash::with_gate_inputs(&step.hash, &[&input]);
                if step.kind != StepKind::Ca {
                    extended.push((step.kind.clone(), step.hash.clone()));
                }
            }
        }
        self.gate = Some(gate);
        Ok(())
    }

    pub fn by_machine(&self, machine: &str) -> Option<&DesiredAgent> {
        self.by_machine.get(machine).map(|a| &self.agents[a])
    }

    pub fn ctx<'a>(&'a self, agent: &'a DesiredAgent) -> AgentCtx<'a> {
        let mut ctx = AgentCtx::new(
            &self.project,
            &self.project.agents[&agent.name],
            &agent.machine,
            &agent.machine_hashes,
        );
        ctx.gate = self.gate.as_ref().and_then(|g| g.agents.get(&agent.name));
        ctx
    }
}

impl DesiredAgent {
    pub fn step(&self, kind: &StepKind) -> Option<&DesiredStep> {
        self.steps.iter().find(|s| &s.kind == kind)
    }
}
