//! Reading a manifests directory: every `*.toml` file, recursively, each
//! parsed entity by entity so one bad agent does not hide another's errors.

use std::path::Path;

use super::{Diagnostics, Project};

pub fn load_dir(dir: &Path) -> Result<Project, Diagnostics> {
    let _ = dir;
    todo!("manifest loader")
}
