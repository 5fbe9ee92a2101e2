//! Manifests: reading a directory of TOML files into a validated [`Project`].
//!
//! - [`model`]: the format's serde types (and the JSON schema's source).
//! - [`load`]: walking the directory, parsing each file, collecting *every*
//!   error as a diagnostic instead of stopping at the first.
//! - [`validate`]: the checks that need the whole directory (references,
//!   duplicates, paths, certificates, names).
//! - [`source`]: the text of each file, and key path → span lookups so a
//!   diagnostic can point at the offending key.
//! - [`diagnostic`]: the diagnostic type every manifest error is reported as.
//! - [`schema`]: the JSON schema, generated from the model.
//! - [`names`]: the naming rule shared by agents, bottles, projects and setup
//!   steps, chosen so derived machine names are always valid for smolvm.

pub mod diagnostic;
pub mod load;
pub mod model;
pub mod names;
pub mod schema;
pub mod source;
pub mod validate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use diagnostic::{Diagnostics, ManifestDiagnostic};
pub use model::{AgentSpec, BottleSpec, ManifestFile};
pub use source::{FileId, KeyPath, Sources};

/// A valid manifests directory, with every path resolved.
#[derive(Debug, Clone)]
pub struct Project {
    /// Project id (label `bottle.project`).
    pub name: String,
    /// Where the id came from, for `validate`'s summary.
    pub name_source: ProjectNameSource,
    /// The manifests directory, canonical.
    pub dir: PathBuf,
    pub bottles: BTreeMap<String, Bottle>,
    pub agents: BTreeMap<String, Agent>,
    /// The files read, for diagnostics raised after loading (cycles, plans).
    pub sources: Sources,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProjectNameSource {
    /// `[project] name` in the root `bottle.toml`.
    Declared,
    /// Derived from the directory containing the manifests directory.
    DirectoryName,
}

/// A bottle as declared, plus where it was declared and its resolved paths.
#[derive(Debug, Clone)]
pub struct Bottle {
    pub name: String,
    pub spec: BottleSpec,
    /// The file that declares it; its key path is `["bottle", name]`.
    pub file: FileId,
    pub image: Image,
    /// `ca.cert`, absolute and inside the manifests directory.
    pub ca_cert: Option<PathBuf>,
    pub volumes: Vec<Volume>,
    /// Each setup step's `inputs`, absolute, in the order of `spec.setup`.
    pub setup_inputs: Vec<Vec<PathBuf>>,
}

/// An agent as declared, plus where it was declared and its resolved paths.
#[derive(Debug, Clone)]
pub struct Agent {
    pub name: String,
    pub spec: AgentSpec,
    /// The file that declares it; its key path is `["agent", name]`.
    pub file: FileId,
    pub prompt: Prompt,
    /// Skill directories, absolute, in declaration order.
    pub skills: Vec<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// No prompt declared: an empty prompt file is still written.
    None,
    File(PathBuf),
    Text(String),
}

/// What `image` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Image {
    /// No image, or `"host"`: the local runtime uses the host's system
    /// directories read-only; smolvm uses its default image.
    Host,
    /// An OCI reference, passed through.
    Reference(String),
    /// An unpacked root filesystem directory (absolute).
    RootfsDir(PathBuf),
    /// A `docker save` archive (absolute).
    Archive(PathBuf),
}

/// A `HOST:GUEST[:ro]` volume with its host side resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub host: PathBuf,
    pub guest: String,
    pub read_only: bool,
}

impl Project {
    /// The smolvm machine name for an agent of this project.
    pub fn machine_name(&self, agent: &str) -> String {
        names::machine_name(&self.name, agent)
    }

    /// A path relative to the manifests directory, for stable hashing and
    /// display. Paths outside it are rejected at load time.
    pub fn relative<'a>(&self, path: &'a Path) -> &'a Path {
        path.strip_prefix(&self.dir).unwrap_or(path)
    }
}

/// Load and validate a manifests directory. Returns every problem found.
pub fn load_dir(dir: &Path) -> Result<Project, Diagnostics> {
    load::load_dir(dir)
}

/// [`load_dir`], with the part of the directory that loaded cleanly
/// beside the problems (see [`load::load_dir_partial`]).
pub fn load_dir_partial(dir: &Path) -> Result<Project, (Diagnostics, Option<Box<Project>>)> {
    load::load_dir_partial(dir)
}
