//! Paths in manifests: resolved relative to the file naming them, kept
//! inside the manifests directory where they are copied into a guest.

use std::path::{Path, PathBuf};

use super::{diag, normalize};
use crate::manifest::diagnostic::suggest;
use crate::manifest::load::Cx;
use crate::manifest::source::Want;
use crate::manifest::{FileId, KeyPath};

#[derive(Clone, Copy, PartialEq)]
pub(super) enum Expect {
    File,
    Dir,
    Any,
}

/// Resolve a path that is copied into the guest: relative to the manifest
/// naming it, and inside the manifests directory as written and after
/// symlinks. Returns the absolute path as written (symlinks kept, so a
/// linked skill keeps its name).
pub(super) fn resolve_inside(
    cx: &mut Cx,
    file: FileId,
    path: &KeyPath,
    raw: &str,
    what: &str,
    expect: Expect,
    extra_help: Option<String>,
) -> Option<PathBuf> {
    if raw.trim().is_empty() {
        cx.report(
            file,
            path,
            Want::Value,
            diag(
                "bottle::empty-path",
                format!("{what} path is empty"),
                format!("name the {what} relative to this manifest"),
            ),
            "empty path",
        );
        return None;
    }
    let base = cx.sources.path(file).parent().unwrap_or(cx.root).to_owned();
    let lexical = normalize(&base.join(raw));
    if !lexical.starts_with(cx.root) {
        cx.report(
            file,
            path,
            Want::Value,
            diag(
                "bottle::path-escapes",
                format!("{what} `{raw}` is outside the manifests directory"),
                "bottle copies it into the guest, so it must live under the manifests \
                 directory: move it there and name it relative to this file",
            ),
            "leads outside the manifests directory",
        );
        return None;
    }
    let Some(info) = cx.stat(&lexical) else {
        let help = extra_help.unwrap_or_else(|| match similar(cx, &lexical, raw) {
            Some(s) => format!("did you mean `{s}`?"),
            None => "create it, or fix the path (relative to this file)".to_owned(),
        });
        cx.report(
            file,
            path,
            Want::Value,
            diag(
                "bottle::missing-path",
                format!("{what} `{raw}` does not exist"),
                help,
            ),
            "not found",
        );
        return None;
    };
    if !info.canonical.starts_with(cx.root) {
        cx.report(
            file,
            path,
            Want::Value,
            diag(
                "bottle::path-escapes",
                format!("{what} `{raw}` leads outside the manifests directory through a symlink"),
                "bottle copies it into the guest, so it must live under the manifests \
                 directory: replace the symlink with the real file or directory",
            ),
            "symlink to a path outside the manifests directory",
        );
        return None;
    }
    let kind_problem = match expect {
        Expect::File if !info.is_file => Some("is not a file"),
        Expect::Dir if !info.is_dir => Some("is not a directory"),
        Expect::Any if !info.is_file && !info.is_dir => Some("is not a file or directory"),
        _ => None,
    };
    if let Some(problem) = kind_problem {
        cx.report(
            file,
            path,
            Want::Value,
            diag(
                "bottle::wrong-path-kind",
                format!("{what} `{raw}` {problem}"),
                match expect {
                    Expect::Dir => "name a directory (relative to this file)",
                    _ => "name a regular file (relative to this file)",
                },
            ),
            problem,
        );
        return None;
    }
    Some(lexical)
}

/// A sibling of a missing path with a close name, as the user would write
/// it. Only runs when a path is missing, so listing the directory is fine.
pub(super) fn similar(cx: &Cx, missing: &Path, raw: &str) -> Option<String> {
    let parent = missing.parent()?;
    let name = missing.file_name()?.to_string_lossy().into_owned();
    if !parent.starts_with(cx.root) {
        return None;
    }
    let entries: Vec<String> = std::fs::read_dir(parent)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    let best = suggest(&name, entries.iter().map(String::as_str))?;
    let prefix = raw.trim_end_matches('/');
    let prefix = &prefix[..prefix.len() - prefix.rsplit('/').next()?.len()];
    Some(format!("{prefix}{best}"))
}

/// A host path (volume or image): `~/` expanded, relative to the manifest.
pub(super) fn host_path(cx: &Cx, file: FileId, raw: &str) -> Result<PathBuf, String> {
    let base = cx.sources.path(file).parent().unwrap_or(cx.root);
    let expanded = if raw == "~" || raw.starts_with("~/") {
        let home = std::env::var_os("HOME").ok_or_else(|| {
            "`~` needs $HOME, which is not set: write the absolute path".to_owned()
        })?;
        PathBuf::from(home).join(raw.trim_start_matches('~').trim_start_matches('/'))
    } else if raw.starts_with('~') {
        return Err("only `~/` (your home) is expanded: write the absolute path".to_owned());
    } else {
        base.join(raw)
    };
    Ok(normalize(&expanded))
}
