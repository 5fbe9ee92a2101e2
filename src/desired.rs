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
            texts: BTreeMap::new(),
        }
    }

    pub fn by_machine(&self, machine: &str) -> Option<&DesiredAgent> {
        self.by_machine.get(machine).map(|a| &self.agents[a])
    }

    pub fn ctx<'a>(&'a self, agent: &'a DesiredAgent) -> AgentCtx<'a> {
        AgentCtx::new(
            &self.project,
            &self.project.agents[&agent.name],
            &agent.machine,
            &agent.machine_hashes,
        )
    }
}

impl DesiredAgent {
    pub fn step(&self, kind: &StepKind) -> Option<&DesiredStep> {
        self.steps.iter().find(|s| &s.kind == kind)
    }
}
