//! The graph as Graphviz DOT and as a readable listing. Both are pure
//! functions of the graph, so the same manifests always print the same.

use std::fmt::Write;

use super::{StepGraph, StepId};

impl StepGraph {
    /// Graphviz DOT: one cluster per agent, one box per step labelled with
    /// its id and short hash, arrows from a step to those that run after it.
    /// Arrows implied by others are left out (`supervise` runs after every
    /// step, but only the last ones point at it), so the picture shows the
    /// order without the clutter. `bottle graph | dot -Tsvg > graph.svg`
    /// draws it.
    pub fn to_dot(&self) -> String {
        let mut out = String::new();
        out.push_str("digraph bottle {\n");
        out.push_str("  rankdir=LR;\n");
        out.push_str("  node [shape=box, fontname=\"monospace\"];\n");
        for (bottle, hash) in self.gates() {
            let id = format!("gate/{bottle}");
            let label = format!("gate of bottle {bottle}\n{}", super::hash::short(hash));
            let _ = writeln!(
                out,
                "  {} [label={}, shape=hexagon];",
                quote(&id),
                quote(&label)
            );
            for agent in self.agents().filter(|a| self.bottle_of(a) == Some(bottle)) {
                let to = format!("{agent}/machine");
                let _ = writeln!(out, "  {} -> {};", quote(&id), quote(&to));
            }
        }
        for agent in self.agents() {
            let bottle = self.bottle_of(agent).unwrap_or_default();
            let _ = writeln!(out, "  subgraph {} {{", quote(&format!("cluster_{agent}")));
            let _ = writeln!(
                out,
                "    label={};",
                quote(&format!("agent {agent} (bottle {bottle})"))
            );
            for (_, step) in self.agent_steps(agent) {
                let id = format!("{agent}/{}", step.kind);
                let label = format!("{}\n{}", step.kind, step.short_hash());
                let _ = writeln!(out, "    {} [label={}];", quote(&id), quote(&label));
            }
            for (from, to) in self.reduced_edges(agent) {
                let from = format!("{agent}/{}", self.step(from).kind);
                let to = format!("{agent}/{}", self.step(to).kind);
                let _ = writeln!(out, "    {} -> {};", quote(&from), quote(&to));
            }
            out.push_str("  }\n");
        }
        out.push_str("}\n");
        out
    }

    /// Per agent, each step in topological order with its short hash and the
    /// steps it runs after.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for agent in self.agents() {
            if !out.is_empty() {
                out.push('\n');
            }
            let bottle = self.bottle_of(agent).unwrap_or_default();
            let _ = writeln!(out, "agent {agent} (bottle {bottle})");
            if let Some(gate) = self.gate(bottle) {
                let _ = writeln!(
                    out,
                    "  (gate of bottle {bottle}  {}, before machine)",
                    super::hash::short(gate)
                );
            }
            let width = self
                .agent_steps(agent)
                .map(|(_, s)| s.kind.to_string().len())
                .max()
                .unwrap_or(0);
            for (id, step) in self.agent_steps(agent) {
                let deps: Vec<String> = self
                    .dependencies(id)
                    .into_iter()
                    .map(|d| self.step(d).kind.to_string())
                    .collect();
                let kind = step.kind.to_string();
                let line = if deps.is_empty() {
                    format!("  {kind:<width$}  {}", step.short_hash())
                } else {
                    format!(
                        "  {kind:<width$}  {}  after {}",
                        step.short_hash(),
                        deps.join(", ")
                    )
                };
                out.push_str(&line);
                out.push('\n');
            }
        }
        if out.is_empty() {
            out.push_str("no agents\n");
        }
        out
    }
}

impl StepGraph {
    /// The transitive reduction of an agent's edges, in topological order:
    /// an edge is dropped when its target is reachable another way.
    fn reduced_edges(&self, agent: &str) -> Vec<(StepId, StepId)> {
        let ids: Vec<StepId> = self.agent_steps(agent).map(|(id, _)| id).collect();
        let Some(first) = ids.first().map(|id| id.index()) else {
            return Vec::new();
        };
        let n = ids.len();
        // Steps of an agent are contiguous and in topological order, so
        // reachability fills in from the last step back.
        let mut reach = vec![vec![false; n]; n];
        for i in (0..n).rev() {
            for d in self.dependents(ids[i]) {
                // Dependents come later in the order: d > i.
                let d = d.index() - first;
                reach[i][d] = true;
                let (head, tail) = reach.split_at_mut(d);
                for (r, &via) in head[i].iter_mut().zip(tail[0].iter()) {
                    *r |= via;
                }
            }
        }
        let mut edges = Vec::new();
        for &from in &ids {
            let direct = self.dependents(from);
            for &to in &direct {
                let t = to.index() - first;
                let implied = direct
                    .iter()
                    .any(|&other| other != to && reach[other.index() - first][t]);
                if !implied {
                    edges.push((from, to));
                }
            }
        }
        edges
    }
}

/// A DOT double-quoted string; `\n` in `s` becomes a centred line break.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
