//! The provisioning graph: one node per step per agent, edges "must happen
//! after", each node with a content hash of everything it depends on.
