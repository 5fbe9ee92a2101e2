//! The provisioning graph: one node per step per agent, edges "must happen
//! after" (DESIGN.md section 3), each node with a content hash of everything
//! the step depends on.
//!
//! - [`hash`]: the hash inputs of every step kind — a documented, versioned
//!   contract, since hashes are stored in machine labels and guest ledgers.
//! - `template`: a bottle's steps and their order, shared by its agents;
//!   where dependency cycles are found.
//! - `digests`: reading the referenced files, each once, in parallel.
//! - `render`: DOT and text output.
//!
//! Steps of different agents never depend on each other. Nodes are stored in
//! a deterministic topological order (agents by name; within an agent, ties
//! broken by machine, ca, prompt, skills, git, setup steps as declared,
//! supervise), so a [`StepId`]'s index is its position in that order.

mod digests;
pub mod hash;
mod render;
mod template;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use petgraph::Direction;
use petgraph::graph::{DiGraph, NodeIndex};

use crate::manifest::{Diagnostics, KeyPath, ManifestDiagnostic, Project, Prompt};
use digests::{Digests, Kind};
pub use hash::{MachineHashes, MutableSettings};
use template::Template;

/// What a step does; see DESIGN.md section 3.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StepKind {
    Machine,
    Ca,
    Prompt,
    Skills,
    Git,
    /// A user-defined setup step, by name.
    Setup(String),
    Supervise,
}

impl StepKind {
    /// The stable id: `machine`, `ca`, `prompt`, `skills`, `git`,
    /// `setup:<name>`, `supervise`. Stored in guest ledgers.
    pub fn id(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for StepKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StepKind::Machine => f.write_str("machine"),
            StepKind::Ca => f.write_str("ca"),
            StepKind::Prompt => f.write_str("prompt"),
            StepKind::Skills => f.write_str("skills"),
            StepKind::Git => f.write_str("git"),
            StepKind::Setup(name) => write!(f, "setup:{name}"),
            StepKind::Supervise => f.write_str("supervise"),
        }
    }
}

/// A string that is not a step id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a step id (machine, ca, prompt, skills, git, setup:<name>, supervise)")]
pub struct UnknownStep(pub String);

impl FromStr for StepKind {
    type Err = UnknownStep;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "machine" => StepKind::Machine,
            "ca" => StepKind::Ca,
            "prompt" => StepKind::Prompt,
            "skills" => StepKind::Skills,
            "git" => StepKind::Git,
            "supervise" => StepKind::Supervise,
            _ => match s.strip_prefix("setup:") {
                Some(name) if !name.is_empty() => StepKind::Setup(name.to_owned()),
                _ => return Err(UnknownStep(s.to_owned())),
            },
        })
    }
}

/// A node: which agent, which step, and the hash of the step's inputs. The
/// settings themselves are read from the [`Project`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub agent: String,
    pub kind: StepKind,
    /// Full hex SHA-256 (see [`hash`] for the inputs).
    pub hash: String,
}

impl Step {
    pub fn short_hash(&self) -> &str {
        hash::short(&self.hash)
    }
}

/// A node of a [`StepGraph`]; its index is its position in the graph's
/// topological order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StepId(NodeIndex);

impl StepId {
    pub fn index(self) -> usize {
        self.0.index()
    }
}

#[derive(Debug, Clone)]
struct AgentEntry {
    bottle: String,
    /// Its steps' indices (contiguous, in topological order).
    steps: Range<usize>,
}

/// The provisioning graph of a project. Edges point from a step to the
/// steps that run after it.
#[derive(Debug, Clone)]
pub struct StepGraph {
    graph: DiGraph<Step, ()>,
    agents: BTreeMap<String, AgentEntry>,
    machines: BTreeMap<String, MachineHashes>,
    /// A `gate` node per bottle that has a gate and an agent (DESIGN.md
    /// section 9): the hash of the gate settings its manifests declare.
    /// Every machine of the bottle's agents runs after it. Kept beside the
    /// per-agent steps: it belongs to no agent, and the plan turns it into
    /// the project gate's action.
    gates: BTreeMap<String, String>,
}

impl StepGraph {
    pub fn len(&self) -> usize {
        self.graph.node_count()
    }

    pub fn is_empty(&self) -> bool {
        self.graph.node_count() == 0
    }

    /// Every step, in topological order.
    pub fn steps(&self) -> impl ExactSizeIterator<Item = (StepId, &Step)> + '_ {
        self.graph
            .node_indices()
            .map(|n| (StepId(n), &self.graph[n]))
    }

    /// Agent names, sorted naturally (`a2` before `a10`).
    pub fn agents(&self) -> impl Iterator<Item = &str> + '_ {
        crate::manifest::names::sorted_naturally(self.agents.keys().map(String::as_str)).into_iter()
    }

    /// The bottle an agent runs in.
    pub fn bottle_of(&self, agent: &str) -> Option<&str> {
        self.agents.get(agent).map(|a| a.bottle.as_str())
    }

    /// An agent's steps in topological order (none for an unknown agent).
    pub fn agent_steps(&self, agent: &str) -> impl Iterator<Item = (StepId, &Step)> + '_ {
        let range = self.agents.get(agent).map_or(0..0, |a| a.steps.clone());
        range.map(|i| {
            let n = NodeIndex::new(i);
            (StepId(n), &self.graph[n])
        })
    }

    /// Look a step up by agent and kind.
    pub fn find(&self, agent: &str, kind: &StepKind) -> Option<StepId> {
        self.agent_steps(agent)
            .find(|(_, s)| s.kind == *kind)
            .map(|(id, _)| id)
    }

    pub fn get(&self, agent: &str, kind: &StepKind) -> Option<&Step> {
        self.find(agent, kind).map(|id| self.step(id))
    }

    pub fn step(&self, id: StepId) -> &Step {
        &self.graph[id.0]
    }

    /// The steps `id` runs after (directly), in topological order.
    pub fn dependencies(&self, id: StepId) -> Vec<StepId> {
        self.neighbors(id, Direction::Incoming)
    }

    /// The steps that run after `id` (directly), in topological order.
    pub fn dependents(&self, id: StepId) -> Vec<StepId> {
        self.neighbors(id, Direction::Outgoing)
    }

    fn neighbors(&self, id: StepId, dir: Direction) -> Vec<StepId> {
        let mut out: Vec<StepId> = self
            .graph
            .neighbors_directed(id.0, dir)
            .map(StepId)
            .collect();
        out.sort_unstable();
        out
    }

    /// The machine hashes of an agent's machine (its bottle's).
    pub fn machine_hashes(&self, agent: &str) -> Option<&MachineHashes> {
        self.machines.get(self.bottle_of(agent)?)
    }

    /// The `gate` nodes: bottle name → hash of its declared gate settings.
    pub fn gates(&self) -> &BTreeMap<String, String> {
        &self.gates
    }

    /// The bottle's `gate` node hash, when it has a gate.
    pub fn gate(&self, bottle: &str) -> Option<&str> {
        self.gates.get(bottle).map(String::as_str)
    }

    /// The underlying petgraph graph, for algorithms; node indices are
    /// [`StepId::index`].
    pub fn petgraph(&self) -> &DiGraph<Step, ()> {
        &self.graph
    }
}

/// The dependency cycles among a bottle's setup steps, one diagnostic
/// each; the loader reports them along with every other problem (and
/// `after = ["supervise"]` on its own, so that makes no cycle here).
pub(crate) fn setup_cycles(
    sources: &crate::manifest::Sources,
    bottle: &crate::manifest::Bottle,
) -> Vec<ManifestDiagnostic> {
    Template::build(sources, bottle, false)
        .err()
        .unwrap_or_default()
}

/// Build the graph of a loaded project, reading every file a step depends
/// on. Returns every problem found: dependency cycles (once per bottle) and
/// files that can no longer be read.
pub fn build(project: &Project) -> Result<StepGraph, Diagnostics> {
    let mut problems = Vec::new();

    let digests = Digests::compute(project).unwrap_or_else(|errs| {
        problems.extend(errs);
        Digests::default()
    });

    let mut templates = BTreeMap::new();
    for (name, bottle) in &project.bottles {
        // The loader reports cycles with every other manifest problem
        // (`setup_cycles`); a project built some other way is still checked.
        match Template::new(&project.sources, bottle) {
            Ok(t) => {
                templates.insert(name.as_str(), t);
            }
            Err(errs) => problems.extend(errs),
        }
    }

    // The loader guarantees these; a dangling reference must still not panic.
    for (name, agent) in &project.agents {
        if !project.bottles.contains_key(&agent.spec.bottle) {
            let key = KeyPath::new().key("agent").key(name.as_str()).key("bottle");
            problems.push(
                ManifestDiagnostic::new(
                    "bottle::unknown-bottle",
                    format!(
                        "agent `{name}` names bottle `{}`, which does not exist",
                        agent.spec.bottle
                    ),
                )
                .value(&project.sources, agent.file, &key, "no such bottle")
                .help("declare the bottle, or name one that exists"),
            );
        }
    }

    if !problems.is_empty() {
        sort_problems(&mut problems);
        return Err(Diagnostics {
            dir: project.dir.display().to_string(),
            items: problems,
        });
    }

    // Hashes that depend on the bottle only, once per bottle.
    let mut bottle_hashes: BTreeMap<&str, BottleHashes> = BTreeMap::new();
    let mut machines = BTreeMap::new();
    for (name, bottle) in &project.bottles {
        let machine = hash::machine_hashes(project, bottle);
        let template = &templates[name.as_str()];
        let hashes = template
            .steps
            .iter()
            .map(|t| {
                let user = bottle.spec.user.as_str();
                match &t.kind {
                    StepKind::Machine => Some(hash::machine_step(bottle, &machine)),
                    StepKind::Ca if crate::gate::reconcile::has_gate(&bottle.spec) => {
                        let declared = match bottle.ca_cert.as_deref() {
                            Some(cert) => Some((
                                hash::normalised_path(project, cert),
                                *digests.get(Kind::File, cert)?,
                            )),
                            None => None,
                        };
                        Some(hash::gate_ca_step(
                            declared.as_ref().map(|(p, d)| (p.as_slice(), d)),
                        ))
                    }
                    StepKind::Ca => {
                        let cert = bottle.ca_cert.as_deref()?;
                        let digest = digests.get(Kind::File, cert)?;
                        Some(hash::ca_step(&hash::normalised_path(project, cert), digest))
                    }
                    StepKind::Git => Some(hash::git_step(user, bottle.spec.git.as_ref()?)),
                    StepKind::Supervise => Some(hash::supervise_step(
                        user,
                        bottle.spec.supervise.as_ref()?.url.as_deref(),
                    )),
                    StepKind::Setup(name) => {
                        let s = bottle.spec.setup.iter().position(|s| s.name == *name)?;
                        let inputs: Vec<_> = bottle
                            .setup_inputs
                            .get(s)
                            .map_or(&[][..], Vec::as_slice)
                            .iter()
                            .map(|p| {
                                let d = digests.get(Kind::Tree, p)?;
                                Some((hash::normalised_path(project, p), *d))
                            })
                            .collect::<Option<_>>()?;
                        Some(hash::setup_step(&bottle.spec.setup[s], &inputs))
                    }
                    // Per agent.
                    StepKind::Prompt | StepKind::Skills => None,
                }
            })
            .collect();
        bottle_hashes.insert(name.as_str(), BottleHashes { hashes });
        machines.insert(name.clone(), machine);
    }

    let steps_per_agent = 8;
    let mut graph: DiGraph<Step, ()> = DiGraph::with_capacity(
        project.agents.len() * steps_per_agent,
        project.agents.len() * steps_per_agent * 2,
    );
    let mut agents = BTreeMap::new();
    for (name, agent) in &project.agents {
        let bottle_name = agent.spec.bottle.as_str();
        let bottle = &project.bottles[bottle_name];
        let template = &templates[bottle_name];
        let fixed = &bottle_hashes[bottle_name];
        let user = bottle.spec.user.as_str();
        let first = graph.node_count();
        // Template index → node, for the steps this agent has.
        let mut nodes: Vec<Option<NodeIndex>> = vec![None; template.steps.len()];
        for (i, t) in template.steps.iter().enumerate() {
            let hash = match &t.kind {
                StepKind::Prompt => {
                    let digest = match &agent.prompt {
                        Prompt::None => hash::bytes_digest(b""),
                        Prompt::Text(text) => hash::bytes_digest(text.as_bytes()),
                        Prompt::File(path) => *digests.get(Kind::File, path).expect("digested"),
                    };
                    hash::prompt_step(user, &digest)
                }
                StepKind::Skills if agent.skills.is_empty() => continue,
                StepKind::Skills => {
                    let skills: Vec<(Vec<u8>, hash::Digest32)> = agent
                        .skills
                        .iter()
                        .map(|p| {
                            let name = p.file_name().map(hash::os_bytes).unwrap_or_default();
                            let digest = *digests.get(Kind::Tree, p).expect("digested");
                            (name.into_owned(), digest)
                        })
                        .collect();
                    hash::skills_step(user, &skills)
                }
                // A setup step re-runs when a step it comes after re-ran:
                // their hashes are inputs of its own (see `hash::setup_after`).
                StepKind::Setup(setup) => {
                    let own = fixed.hashes[i].clone().expect("every input was digested");
                    let explicit_machine = bottle
                        .spec
                        .setup
                        .iter()
                        .find(|s| s.name == *setup)
                        .is_some_and(|s| s.after.iter().any(|a| a == "machine"));
                    let after: Vec<(String, String)> = t
                        .after
                        .iter()
                        .filter_map(|&dep| {
                            let kind = &template.steps[dep].kind;
                            // Everything runs after the machine step: only
                            // a declared `after = ["machine"]` makes it an input.
                            if *kind == StepKind::Machine && !explicit_machine {
                                return None;
                            }
                            let node = nodes[dep]?;
                            Some((kind.id(), graph[node].hash.clone()))
                        })
                        .collect();
                    hash::setup_after(&own, &after)
                }
                _ => fixed.hashes[i].clone().expect("every input was digested"),
            };
            let node = graph.add_node(Step {
                agent: name.clone(),
                kind: t.kind.clone(),
                hash,
            });
            for &dep in &t.after {
                if let Some(from) = nodes[dep] {
                    graph.add_edge(from, node, ());
                }
            }
            nodes[i] = Some(node);
        }
        agents.insert(
            name.clone(),
            AgentEntry {
                bottle: bottle_name.to_owned(),
                steps: first..graph.node_count(),
            },
        );
    }

    let gates = crate::gate::reconcile::gated_bottles(project)
        .into_iter()
        .map(|b| (b.to_owned(), hash::gate_node(&project.bottles[b])))
        .collect();
    Ok(StepGraph {
        graph,
        agents,
        machines,
        gates,
    })
}

struct BottleHashes {
    /// By template index; `None` for per-agent steps.
    hashes: Vec<Option<String>>,
}

/// A stable order: by file, then by the position of the first label.
fn sort_problems(problems: &mut [ManifestDiagnostic]) {
    problems.sort_by_cached_key(|d| {
        let file = d
            .src
            .as_ref()
            .map(|s| s.name().to_owned())
            .unwrap_or_default();
        let offset = d.labels.first().map_or(0, |l| l.offset());
        (file, offset)
    });
}

#[cfg(test)]
mod tests;
