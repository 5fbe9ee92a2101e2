//! Which paths matter: editor and VCS noise is ignored, and a good load
//! names the files and directories whose changes can change the desired
//! state.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::manifest::{Image, Project, Prompt};

/// Is this path noise: VCS internals, editor swap and backup files, or a
/// path bottle itself writes? Checked before relevance, and the only filter
/// while the manifests are invalid.
pub fn is_ignored(path: &Path, ignore: &[PathBuf]) -> bool {
    if ignore.iter().any(|i| path.starts_with(i)) {
        return true;
    }
    if path.components().any(|c| {
        matches!(
            c.as_os_str().to_str(),
            Some(".git" | ".hg" | ".svn" | ".jj")
        )
    }) {
        return true;
    }
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    name.ends_with('~')
        || name.starts_with(".#")
        || (name.starts_with('#') && name.ends_with('#'))
        || [
            ".swp",
            ".swo",
            ".swn",
            ".swx",
            ".tmp",
            ".bak",
            ".orig",
            ".crswap",
            ".kate-swp",
            "___jb_tmp___",
            "___jb_old___",
        ]
        .iter()
        .any(|s| name.ends_with(s))
        || name == "4913" // vim's write test
        || name.starts_with(".goutputstream-")
}

/// The paths whose changes can change the desired state, from a good load.
#[derive(Debug, Clone, Default)]
pub struct WatchSet {
    pub(super) root: PathBuf,
    /// Content is an input: manifests (and their symlink targets), prompt
    /// files, skill directories, CA certificates, setup inputs; each as
    /// named and, when different, resolved.
    pub(super) inputs: Vec<PathBuf>,
    /// Only existence matters: local images, volumes, secret files.
    pub(super) exists: Vec<PathBuf>,
}

impl WatchSet {
    pub fn of(project: &Project) -> Self {
        let mut inputs = Vec::new();
        let mut push = |path: &Path| {
            inputs.push(path.to_owned());
            if let Ok(real) = path.canonicalize()
                && real != path
            {
                inputs.push(real);
            }
        };
        for (_, file) in project.sources.iter() {
            push(&file.path);
        }
        for agent in project.agents.values() {
            if let Prompt::File(path) = &agent.prompt {
                push(path);
            }
            for skill in &agent.skills {
                push(skill);
            }
        }
        let mut exists = Vec::new();
        for bottle in project.bottles.values() {
            if let Some(cert) = &bottle.ca_cert {
                push(cert);
            }
            for input in bottle.setup_inputs.iter().flatten() {
                push(input);
            }
            if let Image::RootfsDir(path) | Image::Archive(path) = &bottle.image {
                exists.push(path.clone());
            }
            exists.extend(bottle.volumes.iter().map(|v| v.host.clone()));
            exists.extend(
                bottle
                    .spec
                    .secrets
                    .values()
                    .filter_map(|s| s.from_file.as_ref().map(PathBuf::from)),
            );
        }
        inputs.sort();
        inputs.dedup();
        exists.sort();
        exists.dedup();
        Self {
            root: project.dir.clone(),
            inputs,
            exists,
        }
    }

    /// Can a change at `path` change the desired state?
    pub fn relevant(&self, path: &Path) -> bool {
        // The path itself, something inside it, or a directory holding it
        // (a renamed or deleted `prompts/`).
        if self
            .inputs
            .iter()
            .any(|i| path.starts_with(i) || i.starts_with(path))
        {
            return true;
        }
        if self.exists.iter().any(|e| e.starts_with(path)) {
            return true;
        }
        // A manifest the last load did not read: the loader reads every
        // `*.toml` outside hidden entries, including in a directory moved in
        // whole (which produces one event, for the directory).
        let Ok(rel) = path.strip_prefix(&self.root) else {
            return false;
        };
        if rel
            .components()
            .any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
        {
            return false;
        }
        if path.extension().is_some_and(|e| e == "toml") {
            return true;
        }
        std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) && holds_manifest(path)
    }

    /// Directories to watch non-recursively for the referenced paths that
    /// live outside the manifests directory: the parent of each (the
    /// nearest existing ancestor, for a missing one).
    pub fn outside_dirs(&self) -> BTreeSet<PathBuf> {
        self.inputs
            .iter()
            .chain(&self.exists)
            .filter(|p| !p.starts_with(&self.root))
            .filter_map(|p| {
                let mut dir = p.parent()?;
                while !dir.is_dir() {
                    dir = dir.parent()?;
                }
                Some(dir.to_owned())
            })
            .collect()
    }
}

/// Does this directory hold a `*.toml` the loader would read?
fn holds_manifest(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|entry| {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            return false;
        }
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => holds_manifest(&path),
            Ok(_) => path.extension().is_some_and(|e| e == "toml"),
            Err(_) => false,
        }
    })
}
