//! What the checks share while loading: the sources, their parsed
//! documents, the problems found so far and cached file system lookups.

use std::collections::HashMap;
use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::Doc;
use crate::manifest::source::{Want, find};
use crate::manifest::{Diagnostics, FileId, KeyPath, ManifestDiagnostic, Sources, validate};

/// Problems found so far, each with where it sorts: by file, then position.
#[derive(Default)]
pub(in crate::manifest) struct Found {
    items: Vec<(Option<FileId>, usize, ManifestDiagnostic)>,
}

impl Found {
    pub fn push(&mut self, file: FileId, (offset, d): (usize, ManifestDiagnostic)) {
        self.items.push((Some(file), offset, d));
    }
    /// A problem that belongs to no file position (sorts first).
    pub fn global(&mut self, d: ManifestDiagnostic) {
        self.items.push((None, 0, d));
    }
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
    pub fn len(&self) -> usize {
        self.items.len()
    }
    pub fn into_diagnostics(mut self, dir: String) -> Diagnostics {
        self.items.sort_by_key(|(file, offset, _)| (*file, *offset));
        Diagnostics {
            dir,
            items: self.items.into_iter().map(|(_, _, d)| d).collect(),
        }
    }
}

/// What the loader knows about a path on the host.
#[derive(Debug, Clone)]
pub(in crate::manifest) struct FsInfo {
    pub canonical: PathBuf,
    pub is_dir: bool,
    pub is_file: bool,
}

/// Everything the checks need while loading: the sources, their parsed
/// documents (so spans need no re-parse), and what was found so far.
pub(in crate::manifest) struct Cx<'a> {
    pub sources: &'a Sources,
    pub docs: &'a [Doc<'a>],
    /// The manifests directory, canonical.
    pub root: &'a Path,
    /// Every manifest file, canonical (a symlinked one where it points).
    pub manifest_files: &'a [PathBuf],
    pub found: Found,
    /// Paths are often shared (one skill, many agents): stat each once.
    pub(super) fs: HashMap<PathBuf, Option<FsInfo>>,
    pub(super) certs: HashMap<PathBuf, Result<usize, validate::PemProblem>>,
}

impl Cx<'_> {
    /// The span of the key or value at `path` in `file`.
    pub fn span(&self, file: FileId, path: &KeyPath, want: Want) -> Range<usize> {
        find(&self.docs[file.0], &path.0, want).unwrap_or(0..0)
    }

    /// Report a problem labelled at the key or value at `path`.
    pub fn report(
        &mut self,
        file: FileId,
        path: &KeyPath,
        want: Want,
        d: ManifestDiagnostic,
        label: impl Into<String>,
    ) {
        let span = self.span(file, path, want);
        self.report_at(file, span, d, label);
    }

    /// Report a problem labelled at an explicit span.
    pub fn report_at(
        &mut self,
        file: FileId,
        span: Range<usize>,
        d: ManifestDiagnostic,
        label: impl Into<String>,
    ) {
        let start = span.start;
        let d = d.span(self.sources, file, span, label);
        self.found.push(file, (start, d));
    }

    /// Canonical path and kind of `path` (absolute, without `..`), or
    /// `None` when it does not exist. Resolves through the cached parent, so
    /// a thousand prompt files in one directory cost one `lstat` each rather
    /// than a `realpath` walk each. Iterative: a manifest's path may have
    /// thousands of components.
    pub fn stat(&mut self, path: &Path) -> Option<FsInfo> {
        // Longer than the kernel resolves (ENAMETOOLONG): it cannot exist,
        // and caching each of its ancestors would cost the square of its
        // length.
        if path.as_os_str().len() >= libc::PATH_MAX as usize {
            return None;
        }
        // The nearest ancestor already known (or the root, or a path that
        // is not absolute), then down from it one component at a time.
        let mut pending: Vec<(&Path, &std::ffi::OsStr)> = Vec::new();
        let mut at = path;
        let mut known = loop {
            if let Some(info) = self.fs.get(at) {
                break info.clone();
            }
            match (at.parent(), at.file_name()) {
                (Some(parent), Some(name)) => {
                    pending.push((at, name));
                    at = parent;
                }
                _ => {
                    let info = fs::canonicalize(at).ok().and_then(|canonical| {
                        let meta = fs::metadata(&canonical).ok()?;
                        Some(FsInfo {
                            canonical,
                            is_dir: meta.is_dir(),
                            is_file: meta.is_file(),
                        })
                    });
                    self.fs.insert(at.to_owned(), info.clone());
                    break info;
                }
            }
        };
        for (child, name) in pending.into_iter().rev() {
            known = known.and_then(|parent| {
                if !parent.is_dir {
                    return None;
                }
                let candidate = parent.canonical.join(name);
                let meta = fs::symlink_metadata(&candidate).ok()?;
                let (canonical, meta) = if meta.is_symlink() {
                    let canonical = fs::canonicalize(&candidate).ok()?;
                    let meta = fs::metadata(&canonical).ok()?;
                    (canonical, meta)
                } else {
                    (candidate, meta)
                };
                Some(FsInfo {
                    canonical,
                    is_dir: meta.is_dir(),
                    is_file: meta.is_file(),
                })
            });
            self.fs.insert(child.to_owned(), known.clone());
        }
        known
    }

    /// The verdict on a CA file, read and checked once however many
    /// bottles name it.
    pub fn cert(&mut self, path: &Path) -> Result<usize, validate::PemProblem> {
        if let Some(verdict) = self.certs.get(path) {
            return verdict.clone();
        }
        let verdict = match fs::metadata(path) {
            Ok(meta) if meta.len() > validate::MAX_CERT_BYTES => Err(
                validate::PemProblem::Unreadable("is larger than 1 MiB".to_owned()),
            ),
            _ => match fs::read(path) {
                Ok(bytes) => validate::check_pem(&bytes),
                Err(e) => Err(validate::PemProblem::Unreadable(format!(
                    "cannot be read: {e}"
                ))),
            },
        };
        self.certs.insert(path.to_owned(), verdict.clone());
        verdict
    }
}
