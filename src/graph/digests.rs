//! Reading the files steps depend on: each distinct path once, however many
//! agents share it, on every core.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::hash::{self, Digest32, TreeError, TreeSize};
use crate::manifest::{FileId, KeyPath, ManifestDiagnostic, Project};

/// How a path is digested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    /// SHA-256 of a file's content (prompt, certificate).
    File,
    /// Tree digest of a file or directory (skills, setup inputs).
    Tree,
}

/// A key that names a path, to point a read error at.
#[derive(Debug, Clone)]
struct Site {
    file: FileId,
    key: KeyPath,
    what: &'static str,
}

/// What a probe reads in the guest, per agent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    pub prompt_bytes: u64,
    pub skill_bytes: u64,
    pub skill_entries: u64,
}

impl Budget {
    pub const PROBE: Budget = Budget {
        prompt_bytes: crate::steps::prompt::PROBE_BYTES,
        skill_bytes: crate::steps::skills::PROBE_BYTES,
        skill_entries: crate::steps::skills::PROBE_ENTRIES,
    };
}

/// Every path digest a project's steps need.
#[derive(Debug, Default)]
pub(crate) struct Digests {
    // Hash maps: ordered maps of paths compare component by component,
    // which showed in profiles of large projects.
    files: HashMap<PathBuf, Digest32>,
    trees: HashMap<PathBuf, Digest32>,
    /// What a probe of each path reads (for a file: its bytes, one entry).
    sizes: HashMap<(Kind, PathBuf), TreeSize>,
}

impl Digests {
    /// Read and digest every referenced file. Read errors become
    /// diagnostics, one per path, pointing at the first key that names it.
    pub fn compute(project: &Project) -> Result<Digests, Vec<ManifestDiagnostic>> {
        let jobs = collect(project);
        let results = run_parallel(&jobs, |((kind, path), sites)| {
            // Skills are hashed in the guest too, within a budget: larger
            // ones are refused below, without reading them here either.
            let budget = sites
                .iter()
                .any(|s| s.what == SKILL)
                .then_some(crate::steps::skills::PROBE_BYTES);
            digest(*kind, path, &project.dir, budget)
        });

        let mut digests = Digests::default();
        let mut problems = Vec::new();
        for (((kind, path), sites), result) in jobs.iter().zip(results) {
            match (result, kind) {
                (Ok((d, size)), Kind::File) => {
                    digests.files.insert(path.clone(), d);
                    digests.sizes.insert((*kind, path.clone()), size);
                }
                (Ok((d, size)), Kind::Tree) => {
                    digests.trees.insert(path.clone(), d);
                    digests.sizes.insert((*kind, path.clone()), size);
                }
                (Err(TreeError::TooLarge(size)), _) => {
                    // Never used: the agent's skills are over budget.
                    digests.trees.insert(path.clone(), [0; 32]);
                    digests.sizes.insert((*kind, path.clone()), size);
                }
                (Err(err), _) => problems.push(read_error(project, path, sites, &err)),
            }
        }
        if problems.is_empty() {
            problems.extend(digests.over_budget(project, &Budget::PROBE));
        }
        if problems.is_empty() {
            Ok(digests)
        } else {
            Err(problems)
        }
    }

    /// Agents whose prompt or skills are more than a probe reads in the
    /// guest (`steps::prompt::PROBE_BYTES`, `steps::skills::PROBE_BYTES`
    /// and `PROBE_ENTRIES`): the guest copy would always look drifted.
    pub(crate) fn over_budget(
        &self,
        project: &Project,
        budget: &Budget,
    ) -> Vec<ManifestDiagnostic> {
        let mut problems = Vec::new();
        for (name, agent) in &project.agents {
            let base = || KeyPath::new().key("agent").key(name.as_str());
            if let crate::manifest::Prompt::File(path) = &agent.prompt
                && let Some(size) = self.sizes.get(&(Kind::File, path.clone()))
                && size.bytes > budget.prompt_bytes
            {
                problems.push(
                    ManifestDiagnostic::new(
                        "bottle::too-large",
                        format!(
                            "the prompt file of agent `{name}` holds {} bytes, more than the {} a \
                             probe reads",
                            size.bytes, budget.prompt_bytes
                        ),
                    )
                    .value(
                        &project.sources,
                        agent.file,
                        &base().key("prompt"),
                        "this file",
                    )
                    .help("a system prompt is text: shorten it"),
                );
            }
            let total = agent
                .skills
                .iter()
                .filter_map(|p| self.sizes.get(&(Kind::Tree, p.clone())))
                .fold(TreeSize::default(), |a, b| TreeSize {
                    entries: a.entries.saturating_add(b.entries),
                    bytes: a.bytes.saturating_add(b.bytes),
                });
            if total.bytes > budget.skill_bytes || total.entries > budget.skill_entries {
                problems.push(
                    ManifestDiagnostic::new(
                        "bottle::too-large",
                        format!(
                            "the skills of agent `{name}` hold {} files and directories and {} \
                             bytes, more than a probe reads ({} entries, {} bytes)",
                            total.entries, total.bytes, budget.skill_entries, budget.skill_bytes
                        ),
                    )
                    .value(
                        &project.sources,
                        agent.file,
                        &base().key("skills"),
                        "these skills",
                    )
                    .help(
                        "bottle hashes every skill file in the guest at each check: keep data \
                         out of skill directories (a volume is the place for it)",
                    ),
                );
            }
        }
        problems
    }

    pub fn get(&self, kind: Kind, path: &Path) -> Option<&Digest32> {
        match kind {
            Kind::File => self.files.get(path),
            Kind::Tree => self.trees.get(path),
        }
    }
}

const SKILL: &str = "skill directory";

fn digest(
    kind: Kind,
    path: &Path,
    boundary: &Path,
    budget: Option<u64>,
) -> Result<(Digest32, TreeSize), TreeError> {
    match kind {
        Kind::File => {
            let (digest, bytes) = hash::file_digest_sized(path)?;
            Ok((digest, TreeSize { entries: 1, bytes }))
        }
        Kind::Tree => hash::tree_digest_sized(path, boundary, budget),
    }
}

/// Every (kind, path) the steps read, once, with the keys naming each.
fn collect(project: &Project) -> Vec<((Kind, PathBuf), Vec<Site>)> {
    struct Jobs<'p> {
        index: HashMap<(Kind, &'p Path), usize>,
        jobs: Vec<((Kind, PathBuf), Vec<Site>)>,
    }
    impl<'p> Jobs<'p> {
        fn add(
            &mut self,
            kind: Kind,
            path: &'p Path,
            file: FileId,
            key: KeyPath,
            what: &'static str,
        ) {
            let site = Site { file, key, what };
            match self.index.get(&(kind, path)) {
                Some(&i) => self.jobs[i].1.push(site),
                None => {
                    self.index.insert((kind, path), self.jobs.len());
                    self.jobs.push(((kind, path.to_owned()), vec![site]));
                }
            }
        }
    }
    let mut jobs = Jobs {
        index: HashMap::new(),
        jobs: Vec::new(),
    };
    for (name, bottle) in &project.bottles {
        let base = || KeyPath::new().key("bottle").key(name.as_str());
        if let Some(cert) = &bottle.ca_cert {
            let key = base().key("ca").key("cert");
            jobs.add(Kind::File, cert, bottle.file, key, "CA certificate");
        }
        for (s, inputs) in bottle.setup_inputs.iter().enumerate() {
            for (i, input) in inputs.iter().enumerate() {
                let key = base().key("setup").index(s).key("inputs").index(i);
                jobs.add(Kind::Tree, input, bottle.file, key, "setup input");
            }
        }
    }
    for (name, agent) in &project.agents {
        let base = || KeyPath::new().key("agent").key(name.as_str());
        if let crate::manifest::Prompt::File(path) = &agent.prompt {
            jobs.add(
                Kind::File,
                path,
                agent.file,
                base().key("prompt"),
                "prompt file",
            );
        }
        for (i, skill) in agent.skills.iter().enumerate() {
            let key = base().key("skills").index(i);
            jobs.add(Kind::Tree, skill, agent.file, key, SKILL);
        }
    }
    jobs.jobs
}

/// `f` over `items` on up to `available_parallelism` threads, results in
/// input order.
fn run_parallel<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(items.len());
    if threads <= 1 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let mut results: Vec<(usize, R)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        done.push((i, f(item)));
                    }
                    done
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("digest worker panicked"))
            .collect()
    });
    results.sort_unstable_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

fn read_error(
    project: &Project,
    path: &Path,
    sites: &[Site],
    err: &TreeError,
) -> ManifestDiagnostic {
    let first = &sites[0];
    let shown = String::from_utf8_lossy(&hash::normalised_path(project, path)).into_owned();
    let err = match err {
        TreeError::Io(err) => err,
        TreeError::TooLarge(_) => unreachable!("kept as a size, reported per agent"),
        TreeError::LinkEscapes { link, target } => {
            let link = String::from_utf8_lossy(link);
            let target = String::from_utf8_lossy(target);
            let mut message = format!(
                "{} `{shown}` holds a symbolic link that leads outside the manifests directory: \
                 `{link}` -> `{target}`",
                first.what
            );
            if sites.len() > 1 {
                message.push_str(&format!(" (named {} times)", sites.len()));
            }
            return ManifestDiagnostic::new("bottle::path-escapes", message)
                .value(
                    &project.sources,
                    first.file,
                    &first.key,
                    "copied into the guest from here",
                )
                .help(format!(
                    "bottle copies links into the guest as links, so a link may only point inside \
                     the manifests directory: replace `{shown}/{link}` with the file or directory \
                     itself, or remove it"
                ));
        }
    };
    let mut message = format!("cannot read {} `{shown}`: {err}", first.what);
    if sites.len() > 1 {
        message.push_str(&format!(" (named {} times)", sites.len()));
    }
    ManifestDiagnostic::new("bottle::unreadable-input", message)
        .value(&project.sources, first.file, &first.key, "named here")
        .help(format!(
            "make sure `{shown}` exists and is readable (it changed after the manifests were \
             checked, or holds something that is not a file, directory or symbolic link), \
             then run the command again"
        ))
}
