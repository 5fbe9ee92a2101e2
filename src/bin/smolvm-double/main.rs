//! A test double that speaks smolvm's CLI, backed by bottle's local runtime.
fn main() {}
