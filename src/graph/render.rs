//! The graph as Graphviz DOT and as a readable listing. Both are pure
//! functions of the graph, so the same manifests always print the same.

use std::fmt::Write;

use super::StepGraph;

impl StepGraph {
    /// Graphviz DOT: one cluster per agent, one box per step labelled with
    /// its id and short hash, arrows from a step to those that run after it.
    /// `bottle graph | dot -Tsvg > graph.svg` draws it.
    pub fn to_dot(&self) -> String {
        let mut out = String::new();
        out.push_str("digraph bottle {\n");
        out.push_str("  rankdir=LR;\n");
        out.push_str("  node [shape=box, fontname=\"monospace\"];\n");
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
            for (id, step) in self.agent_steps(agent) {
                for dep in self.dependents(id) {
                    let from = format!("{agent}/{}", step.kind);
                    let to = format!("{agent}/{}", self.step(dep).kind);
                    let _ = writeln!(out, "    {} -> {};", quote(&from), quote(&to));
                }
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
