//! Reading a manifests directory: every `*.toml` file, recursively, each
//! parsed once into a spanned document and then deserialized entity by
//! entity, so one bad agent does not hide another's errors.
//!
//! Rules (DESIGN.md section 2, and the choices made here):
//! - Files are found recursively, in sorted order of their relative paths.
//!   Hidden entries (`.git`, `.cache.toml`) are skipped, and so are symlinked
//!   directories (no loops, nothing outside the directory); a symlinked file
//!   is read as if it stood where the link is.
//! - `[project]` is only allowed in the root `bottle.toml`. Without `[project]
//!   name` the project id is derived from the name of the directory that
//!   *contains* the manifests directory (`~/src/acme/manifests` → `acme`), so
//!   it is the repository's name in the usual layout; pin it with `[project]
//!   name` to keep it stable across clones under other names.
//!
//! Modules: `files` finds and opens them, `mask` hides literal secrets in
//! the text diagnostics show, `entity` turns each file's TOML into bottle
//! and agent declarations (reporting every problem), and `cx` holds what the
//! checks share while loading; `super::validate` checks the declarations.

mod cx;
mod entity;
mod files;
mod mask;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::manifest::model::ProjectSpec;
use crate::manifest::source::Want;
use crate::manifest::{
    Diagnostics, FileId, KeyPath, ManifestDiagnostic, Project, ProjectNameSource, Sources, names,
    validate,
};

pub(super) use cx::{Cx, Found};
use entity::read_file;
pub(super) use entity::{Decl, Decls, Kind, by_name};
use files::{open_dir, walk};
pub use mask::conventional_env_name;
use mask::mask_secrets;

/// A parsed file: its root table as a spanned value.
pub(super) type Doc<'a> = Spanned<DeValue<'a>>;

/// The one file that may hold `[project]`.
pub const ROOT_FILE: &str = "bottle.toml";

pub fn load_dir(dir: &Path) -> Result<Project, Diagnostics> {
    load_dir_partial(dir).map_err(|(problems, _)| problems)
}

/// [`load_dir`], and with its problems the part of the directory that has
/// none of its own, when any was read: the bottles and agents that passed
/// every check (agents only with such a bottle), for checks that need no
/// more than them (`validate` runs the runtime's on them). Its `name` is
/// empty when the project's name did not load.
pub fn load_dir_partial(dir: &Path) -> Result<Project, (Diagnostics, Option<Box<Project>>)> {
    let shown = dir.display().to_string();
    let fail = |d: ManifestDiagnostic| {
        Err((
            Diagnostics {
                dir: shown.clone(),
                items: vec![d],
            },
            None,
        ))
    };

    let root = match open_dir(dir) {
        Ok(root) => root,
        Err(d) => return fail(*d),
    };
    let files = match walk(&root) {
        Ok(files) => files,
        Err(d) => return fail(*d),
    };
    if files.is_empty() {
        return fail(
            ManifestDiagnostic::new(
                "bottle::no-manifests",
                format!("no *.toml manifests in `{shown}`"),
            )
            .help(
                "declare at least one bottle and one agent in a .toml file there, \
                 e.g. `[bottle.dev]` and `[agent.reviewer]` with `bottle = \"dev\"` \
                 (see the repository's manifests/ for a working set)",
            ),
        );
    }

    let mut found = Found::default();
    let mut unreadable = false;
    let mut texts = Vec::with_capacity(files.len());
    for rel in &files {
        let display = Path::new(dir).join(rel).display().to_string();
        let text = match fs::read(root.join(rel)).map(String::from_utf8) {
            Ok(Ok(text)) => text,
            Ok(Err(_)) => {
                unreadable = true;
                found.global(
                    ManifestDiagnostic::new(
                        "bottle::unreadable-file",
                        format!("`{display}` is not UTF-8 text"),
                    )
                    .help("manifests are TOML, which is UTF-8: re-save the file as UTF-8"),
                );
                String::new()
            }
            Err(e) => {
                unreadable = true;
                found.global(
                    ManifestDiagnostic::new(
                        "bottle::unreadable-file",
                        format!("cannot read `{display}`: {e}"),
                    )
                    .help("check the file's permissions"),
                );
                String::new()
            }
        };
        texts.push(text);
    }

    let mut docs = Vec::with_capacity(texts.len());
    let mut syntax = Vec::with_capacity(texts.len());
    for text in &texts {
        let (doc, errors) = DeTable::parse_recoverable(text);
        // Recovery after the first syntax error mostly produces echoes of it,
        // so report the first one and use the rest of the file only for the
        // names it declares (which keeps references to them from failing).
        syntax.push(
            errors
                .into_iter()
                .min_by_key(|e| e.span().map_or(0, |s| s.start)),
        );
        let span = doc.span();
        docs.push(Spanned::new(span, DeValue::Table(doc.into_inner())));
    }

    // Diagnostics show source lines: literal secrets are masked in the text
    // they render from, before any diagnostic exists.
    let mut sources = Sources::default();
    for ((rel, text), doc) in files.iter().zip(&texts).zip(&docs) {
        let display = Path::new(dir).join(rel).display().to_string();
        sources.add(root.join(rel), display, mask_secrets(text, doc).into());
    }
    for (i, e) in syntax.iter().enumerate() {
        if let Some(e) = e {
            found.push(FileId(i), syntax_error(&sources, FileId(i), e, &texts[i]));
        }
    }

    // Where the manifests really are: a symlinked one may live outside.
    let manifest_files: Vec<PathBuf> = files
        .iter()
        .filter_map(|rel| root.join(rel).canonicalize().ok())
        .collect();
    let mut cx = Cx {
        sources: &sources,
        docs: &docs,
        root: &root,
        manifest_files: &manifest_files,
        found,
        fs: HashMap::new(),
        certs: HashMap::new(),
    };
    let mut decls = Decls::default();
    for (i, doc) in docs.iter().enumerate() {
        read_file(
            &mut cx,
            FileId(i),
            &files[i],
            doc,
            syntax[i].is_some(),
            &mut decls,
        );
    }

    let name = project_name(&mut cx, &root, decls.project.take());
    let (bottles, agents) = validate::check(&mut cx, &decls);
    // A file that does not parse (or cannot be read) may hold the agents:
    // its own diagnostic says what to fix, "no agents" would mislead.
    let all_read = syntax.iter().all(Option::is_none) && !unreadable;
    if decls.agents.is_empty() && !decls.saw_agent_table && all_read {
        cx.found.global(
            ManifestDiagnostic::new(
                "bottle::no-agents",
                format!("no agents declared in `{shown}`"),
            )
            .help(format!(
                "declare one, e.g. `[agent.reviewer]` with `bottle = \"{}\"`: \
                 every agent gets its own machine built from its bottle",
                decls.bottles.first().map_or("dev", |b| b.name.as_str())
            )),
        );
    }

    let found = std::mem::take(&mut cx.found);
    drop(cx);
    drop(docs);
    let valid = name.is_some() && found.is_empty();
    let (name, name_source) = name.unwrap_or((String::new(), ProjectNameSource::Declared));
    // Valid manifests hold no literal secrets, so nothing was masked.
    let project = Project {
        name,
        name_source,
        dir: root,
        bottles,
        agents,
        sources,
    };
    if valid {
        Ok(project)
    } else {
        Err((found.into_diagnostics(shown), Some(Box::new(project))))
    }
}

fn syntax_error(
    sources: &Sources,
    file: FileId,
    e: &toml::de::Error,
    text: &str,
) -> (usize, ManifestDiagnostic) {
    let span = e.span().unwrap_or(0..0);
    let start = span.start.min(text.len());
    let mut message = e.message().to_owned();
    // toml's messages read "unclosed inline table, expected `}`".
    if let Some((what, expected)) = message.clone().split_once(", expected ") {
        message = format!("{what} (expected {expected})");
    }
    let d = ManifestDiagnostic::new("bottle::toml-syntax", "TOML syntax error")
        .span(sources, file, span, message)
        .help(
            "fix the TOML syntax here; the file's other errors are reported once it parses \
             (TOML reference: https://toml.io)",
        );
    (start, d)
}
/// The project id: declared in the root `bottle.toml`, or derived from the
/// directory containing the manifests directory.
fn project_name(
    cx: &mut Cx,
    root: &Path,
    declared: Option<(FileId, ProjectSpec)>,
) -> Option<(String, ProjectNameSource)> {
    if let Some((file, ProjectSpec { name: Some(name) })) = declared {
        if let Err(why) = names::check_name(&name) {
            let path = KeyPath::new().key("project").key("name");
            cx.report(
                file,
                &path,
                Want::Value,
                ManifestDiagnostic::new(
                    "bottle::invalid-name",
                    format!("project name `{name}` {why}"),
                )
                .help(match names::sanitize(&name) {
                    Some(s) => format!("{}; e.g. `{s}`", names::RULE),
                    None => names::RULE.to_owned(),
                }),
                "invalid project name",
            );
            return None;
        }
        return Some((name, ProjectNameSource::Declared));
    }
    let parent = root.parent().and_then(Path::file_name);
    match parent.and_then(|p| names::sanitize(&p.to_string_lossy())) {
        Some(name) => Some((name, ProjectNameSource::DirectoryName)),
        None => {
            cx.found.global(
                ManifestDiagnostic::new(
                    "bottle::no-project-name",
                    format!(
                        "cannot derive a project name from `{}`",
                        root.parent().unwrap_or(root).display()
                    ),
                )
                .help(format!(
                    "declare one in the root {ROOT_FILE}: `[project]` then `name = \"example\"` \
                     ({})",
                    names::RULE
                )),
            );
            None
        }
    }
}
