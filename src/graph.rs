//! The provisioning graph: one node per step per agent, edges "must happen
//! after", each node with a content hash of everything it depends on.

use crate::manifest::{Diagnostics, Project};

/// The provisioning graph of a project.
#[derive(Debug)]
pub struct StepGraph {}

/// Build the graph; a dependency cycle is a diagnostic.
pub fn build(project: &Project) -> Result<StepGraph, Diagnostics> {
    let _ = project;
    todo!("graph")
}

impl StepGraph {
    pub fn to_dot(&self) -> String {
        todo!()
    }
    pub fn to_text(&self) -> String {
        todo!()
    }
}
