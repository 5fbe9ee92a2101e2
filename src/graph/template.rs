//! The steps of a bottle, shared by every agent that uses it: which steps
//! exist, what each runs after, and in which order. A dependency cycle
//! (through `setup.after`) is found here, once per bottle.

use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;

use super::StepKind;
use crate::manifest::{Bottle, KeyPath, ManifestDiagnostic, Sources};

/// A step of a bottle's template.
#[derive(Debug, Clone)]
pub(crate) struct TemplateStep {
    pub kind: StepKind,
    /// Indices of the steps this one runs after, ascending.
    pub after: Vec<usize>,
}

/// A bottle's steps in a topological order (ties broken by the canonical
/// order machine, ca, prompt, skills, git, setup steps as declared,
/// supervise). `skills` is always in the template: it is dropped per agent
/// when the agent has none.
#[derive(Debug, Clone)]
pub(crate) struct Template {
    pub steps: Vec<TemplateStep>,
}

/// Where a dependency came from: the position of an `after` entry, or the
/// step table's own rules (which cannot be wrong, so carry no span).
#[derive(Debug, Clone, Copy)]
struct AfterEntry {
    setup: usize,
    /// `after` or `before`.
    key: &'static str,
    entry: usize,
}

impl Template {
    /// The template of `bottle`, or the cycle diagnostics that prevent one.
    pub fn new(sources: &Sources, bottle: &Bottle) -> Result<Template, Vec<ManifestDiagnostic>> {
        Self::build(sources, bottle, true)
    }

    /// With `after_supervise` false, `after = ["supervise"]` entries make no
    /// edge: the loader reports them on their own, and looks for the other
    /// cycles past them.
    pub(super) fn build(
        sources: &Sources,
        bottle: &Bottle,
        after_supervise: bool,
    ) -> Result<Template, Vec<ManifestDiagnostic>> {
        let spec = &bottle.spec;
        // The canonical order; built-ins come first so `after` can find them.
        let mut kinds = vec![StepKind::Machine];
        // Keyed on the resolved path (the loader sets it whenever `ca` is
        // declared), so the hash below always has a file to read.
        // A bottle with a gate trusts the project CA (the gate intercepts
        // TLS for hosts that carry secrets).
        if bottle.ca_cert.is_some() || crate::gate::reconcile::has_gate(spec) {
            kinds.push(StepKind::Ca);
        }
        kinds.push(StepKind::Prompt);
        kinds.push(StepKind::Skills);
        if spec.git.is_some() {
            kinds.push(StepKind::Git);
        }
        let first_setup = kinds.len();
        kinds.extend(spec.setup.iter().map(|s| StepKind::Setup(s.name.clone())));
        let supervise = spec
            .supervise
            .is_some()
            .then(|| kinds.push(StepKind::Supervise))
            .map(|()| kinds.len() - 1);

        let position = |kind: &StepKind| kinds.iter().position(|k| k == kind);
        let supervise_at = supervise;
        let machine = 0;

        let mut graph: DiGraph<(), Option<AfterEntry>> = DiGraph::with_capacity(kinds.len(), 0);
        for _ in &kinds {
            graph.add_node(());
        }
        let mut dep = |from: usize, to: usize, why: Option<AfterEntry>| {
            graph.add_edge(NodeIndex::new(from), NodeIndex::new(to), why);
        };
        for (i, kind) in kinds.iter().enumerate() {
            match kind {
                StepKind::Machine => {}
                StepKind::Ca | StepKind::Prompt | StepKind::Skills => dep(machine, i, None),
                StepKind::Git => {
                    dep(machine, i, None);
                    if let Some(ca) = position(&StepKind::Ca) {
                        dep(ca, i, None);
                    }
                }
                StepKind::Setup(_) => {
                    let s = i - first_setup;
                    dep(machine, i, None);
                    for (entry, name) in spec.setup[s].after.iter().enumerate() {
                        // An unknown name is the loader's to report, and an
                        // absent built-in (`ca` without a `ca` table) is
                        // trivially satisfied: either way, no edge.
                        let target = resolve_after(&kinds, first_setup, name)
                            .filter(|t| after_supervise || Some(*t) != supervise_at);
                        if let Some(target) = target {
                            dep(
                                target,
                                i,
                                Some(AfterEntry {
                                    setup: s,
                                    key: "after",
                                    entry,
                                }),
                            );
                        }
                    }
                    // `before` is `after` seen from the other side; `supervise`
                    // runs last anyway, and `machine` is the loader's to reject.
                    for (entry, name) in spec.setup[s].before.iter().enumerate() {
                        match resolve_after(&kinds, first_setup, name) {
                            Some(target) if target != machine && Some(target) != supervise_at => {
                                dep(
                                    i,
                                    target,
                                    Some(AfterEntry {
                                        setup: s,
                                        key: "before",
                                        entry,
                                    }),
                                );
                            }
                            _ => {}
                        }
                    }
                }
                StepKind::Supervise => {
                    for other in 0..kinds.len() {
                        if other != i {
                            dep(other, i, None);
                        }
                    }
                }
            }
        }

        let cycles = cycle_diagnostics(sources, bottle, &kinds, &graph, supervise);
        if !cycles.is_empty() {
            return Err(cycles);
        }

        // Kahn's algorithm, always taking the lowest ready index: the order
        // is a pure function of the bottle.
        let n = kinds.len();
        let mut indegree = vec![0usize; n];
        let mut after: Vec<Vec<usize>> = vec![Vec::new(); n];
        for e in graph.edge_references() {
            let (from, to) = (e.source().index(), e.target().index());
            if !after[to].contains(&from) {
                after[to].push(from);
                indegree[to] += 1;
            }
        }
        let mut ready: std::collections::BTreeSet<usize> =
            (0..n).filter(|&i| indegree[i] == 0).collect();
        let mut order = Vec::with_capacity(n);
        while let Some(i) = ready.pop_first() {
            order.push(i);
            for (j, deps) in after.iter().enumerate() {
                if deps.contains(&i) {
                    indegree[j] -= 1;
                    if indegree[j] == 0 {
                        ready.insert(j);
                    }
                }
            }
        }
        debug_assert_eq!(order.len(), n, "cycles were reported above");

        let mut new_index = vec![0usize; n];
        for (pos, &old) in order.iter().enumerate() {
            new_index[old] = pos;
        }
        let steps = order
            .iter()
            .map(|&old| {
                let mut deps: Vec<usize> = after[old].iter().map(|&d| new_index[d]).collect();
                deps.sort_unstable();
                TemplateStep {
                    kind: kinds[old].clone(),
                    after: deps,
                }
            })
            .collect();
        Ok(Template { steps })
    }
}

/// What an `after` entry names: a built-in step (which wins over a setup
/// step of the same name; the loader rejects such names) or a setup step.
fn resolve_after(kinds: &[StepKind], first_setup: usize, name: &str) -> Option<usize> {
    let builtin = match name {
        "machine" => Some(StepKind::Machine),
        "ca" => Some(StepKind::Ca),
        "prompt" => Some(StepKind::Prompt),
        "skills" => Some(StepKind::Skills),
        "git" => Some(StepKind::Git),
        "supervise" => Some(StepKind::Supervise),
        _ => None,
    };
    match builtin {
        Some(kind) => kinds.iter().position(|k| *k == kind),
        None => kinds[first_setup..]
            .iter()
            .position(|k| matches!(k, StepKind::Setup(s) if s == name))
            .map(|p| p + first_setup),
    }
}

/// One diagnostic per strongly connected component that holds a cycle, with
/// a label on every `after` entry inside it.
fn cycle_diagnostics(
    sources: &Sources,
    bottle: &Bottle,
    kinds: &[StepKind],
    graph: &DiGraph<(), Option<AfterEntry>>,
    supervise: Option<usize>,
) -> Vec<ManifestDiagnostic> {
    let name_of = |i: usize| match &kinds[i] {
        StepKind::Setup(name) => name.clone(),
        other => other.id(),
    };
    let mut sccs: Vec<Vec<NodeIndex>> = tarjan_scc(graph)
        .into_iter()
        .filter(|scc| scc.len() > 1 || graph.find_edge(scc[0], scc[0]).is_some())
        .collect();
    for scc in &mut sccs {
        scc.sort_unstable();
    }
    sccs.sort_unstable();

    let mut out = Vec::new();
    for scc in sccs {
        let inside = |n: NodeIndex| scc.binary_search(&n).is_ok();
        let cycle = find_cycle(graph, &scc);
        // Edges point from a step to those that run after it; say it the
        // way users write it, each step running after the next, starting
        // from the lowest.
        let mut names: Vec<String> = cycle.iter().rev().map(|&n| name_of(n.index())).collect();
        names.rotate_right(1);
        names.push(names[0].clone());
        let rest: Vec<String> = names[1..].iter().map(|n| format!("`{n}`")).collect();
        let path = format!(
            "`{}` runs after {}",
            names[0],
            rest.join(", which runs after ")
        );
        let mut diag = ManifestDiagnostic::new(
            "bottle::dependency-cycle",
            format!(
                "setup steps of bottle `{}` wait for each other in a cycle: {path}",
                bottle.name
            ),
        )
        .in_file(sources, bottle.file);

        let mut entries: Vec<(AfterEntry, usize, usize)> = graph
            .edge_references()
            .filter(|e| inside(e.source()) && inside(e.target()))
            .filter_map(|e| {
                e.weight()
                    .map(|w| (w, e.source().index(), e.target().index()))
            })
            .collect();
        entries.sort_by_key(|(w, _, _)| (w.setup, w.key, w.entry));
        for (w, target, step) in entries {
            let key = KeyPath::new()
                .key("bottle")
                .key(bottle.name.as_str())
                .key("setup")
                .index(w.setup)
                .key(w.key)
                .index(w.entry);
            let label = if w.key == "before" {
                format!("`{}` runs before `{}`", name_of(target), name_of(step))
            } else if Some(target) == supervise {
                format!(
                    "`{}` runs after `supervise`, which runs last",
                    name_of(step)
                )
            } else {
                format!("`{}` runs after `{}`", name_of(step), name_of(target))
            };
            diag = diag.value(sources, bottle.file, &key, label);
        }
        let help = if supervise.is_some_and(|s| inside(NodeIndex::new(s))) {
            "`supervise` always runs after every other step: remove it from `after`"
        } else {
            "remove one of the labelled `after`/`before` entries so the steps have an order to run in"
        };
        out.push(diag.help(help));
    }
    out
}

/// A cycle inside a strongly connected component (`scc` sorted), as the
/// nodes along edges from the lowest one: a breadth-first search for the
/// shortest way back to it.
fn find_cycle<E>(graph: &DiGraph<(), E>, scc: &[NodeIndex]) -> Vec<NodeIndex> {
    let start = scc[0];
    if graph.find_edge(start, start).is_some() {
        return vec![start];
    }
    let mut parent: std::collections::BTreeMap<NodeIndex, NodeIndex> = Default::default();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(n) = queue.pop_front() {
        let mut next: Vec<NodeIndex> = graph.neighbors(n).collect();
        next.sort_unstable();
        for m in next {
            if scc.binary_search(&m).is_err() {
                continue;
            }
            if m == start {
                let mut cycle = vec![n];
                let mut cur = n;
                while cur != start {
                    cur = parent[&cur];
                    cycle.push(cur);
                }
                cycle.reverse();
                return cycle;
            }
            if m != start && !parent.contains_key(&m) {
                parent.insert(m, n);
                queue.push_back(m);
            }
        }
    }
    // Unreachable for a real component; fall back to listing it.
    scc.to_vec()
}
