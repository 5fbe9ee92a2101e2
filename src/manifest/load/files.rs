//! Finding the manifests: the directory, and every `*.toml` under it.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use crate::manifest::ManifestDiagnostic;

/// The manifests directory, canonical.
pub(super) fn open_dir(dir: &Path) -> Result<PathBuf, Box<ManifestDiagnostic>> {
    let shown = dir.display();
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(Box::new(ManifestDiagnostic::new(
                "bottle::not-a-directory",
                format!("`{shown}` is a file, not a manifests directory"),
            )
            .help(
                "pass the directory that holds the manifests: every *.toml file under it is read",
            )));
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(Box::new(
                ManifestDiagnostic::new(
                    "bottle::no-directory",
                    format!("manifests directory `{shown}` does not exist"),
                )
                .help(
                    "give the directory that holds your *.toml manifests as the command's \
                     DIR argument; without one, bottle reads ./manifests",
                ),
            ));
        }
        Err(e) => {
            return Err(Box::new(
                ManifestDiagnostic::new(
                    "bottle::no-directory",
                    format!("cannot read manifests directory `{shown}`: {e}"),
                )
                .help("check the directory's permissions"),
            ));
        }
    }
    fs::canonicalize(dir).map_err(|e| {
        Box::new(
            ManifestDiagnostic::new(
                "bottle::no-directory",
                format!("cannot resolve manifests directory `{shown}`: {e}"),
            )
            .help("check the directory's permissions"),
        )
    })
}

/// Every `*.toml` file under `root`, as sorted relative paths.
pub(super) fn walk(root: &Path) -> Result<Vec<PathBuf>, Box<ManifestDiagnostic>> {
    fn visit(
        root: &Path,
        rel: &Path,
        out: &mut Vec<PathBuf>,
    ) -> Result<(), Box<ManifestDiagnostic>> {
        let dir = root.join(rel);
        let cannot_list = |e: std::io::Error| {
            Box::new(
                ManifestDiagnostic::new(
                    "bottle::unreadable-file",
                    format!("cannot list `{}`: {e}", dir.display()),
                )
                .help("check the directory's permissions"),
            )
        };
        for entry in fs::read_dir(&dir).map_err(cannot_list)? {
            let entry = entry.map_err(cannot_list)?;
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let rel = rel.join(&name);
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                visit(root, &rel, out)?;
            } else if rel.extension().is_some_and(|e| e == "toml")
                && (kind.is_file() || root.join(&rel).is_file())
            {
                out.push(rel);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    visit(root, Path::new(""), &mut out)?;
    out.sort();
    Ok(out)
}
