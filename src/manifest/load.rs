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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::ErrorKind;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use super::diagnostic::suggest;
use super::model::{AgentSpec, BottleSpec, ProjectSpec};
use super::source::{Seg, Want, find};
use super::{
    Diagnostics, FileId, KeyPath, ManifestDiagnostic, Project, ProjectNameSource, Sources, names,
    validate,
};

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
    let mut texts = Vec::with_capacity(files.len());
    for rel in &files {
        let display = Path::new(dir).join(rel).display().to_string();
        let text = match fs::read(root.join(rel)).map(String::from_utf8) {
            Ok(Ok(text)) => text,
            Ok(Err(_)) => {
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
    if decls.agents.is_empty() && !decls.saw_agent_table {
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

/// The manifests directory, canonical.
fn open_dir(dir: &Path) -> Result<PathBuf, Box<ManifestDiagnostic>> {
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
fn walk(root: &Path) -> Result<Vec<PathBuf>, Box<ManifestDiagnostic>> {
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

/// `text` with the values of literal secrets (`bottle.*.secrets.*` strings,
/// secret-looking `env` values) replaced by `*`, byte for byte so every span
/// stays valid. The quotes stay, so labels still point at something.
fn mask_secrets(text: &str, doc: &Doc) -> String {
    let mut ranges = Vec::new();
    let bottles = doc.get_ref().get("bottle").map(|b| b.get_ref());
    if let Some(DeValue::Table(bottles)) = bottles {
        for bottle in bottles.values() {
            if let Some(DeValue::Table(secrets)) =
                bottle.get_ref().get("secrets").map(|s| s.get_ref())
            {
                ranges.extend(
                    secrets
                        .values()
                        .filter(|v| v.get_ref().is_str())
                        .map(|v| v.span()),
                );
            }
            // Passwords in URLs: reported as errors, shown masked.
            let git = bottle.get_ref().get("git").map(|g| g.get_ref());
            let urls = [
                git.and_then(|g| g.get("gateway")),
                bottle
                    .get_ref()
                    .get("supervise")
                    .and_then(|s| s.get_ref().get("url")),
            ];
            let remotes = git
                .and_then(|g| g.get("remote"))
                .and_then(|r| r.get_ref().as_array());
            let upstreams = remotes
                .into_iter()
                .flat_map(|r| r.iter())
                .map(|r| r.get_ref().get("upstream"));
            for url in urls.into_iter().chain(upstreams).flatten() {
                // Only plain one-line strings, whose text maps byte for byte
                // to the value (after the opening quote).
                if let Some(s) = url.get_ref().as_str()
                    && let Some(pw) = validate::url_password(s)
                    && url.span().len() == s.len() + 2
                {
                    let at = url.span().start + 1;
                    // `mask` keeps the first and last byte: widen by one.
                    ranges.push(at + pw.start - 1..at + pw.end + 1);
                }
            }
            if let Some(DeValue::Table(env)) = bottle.get_ref().get("env").map(|s| s.get_ref()) {
                ranges.extend(
                    env.iter()
                        .filter(|(k, v)| {
                            v.get_ref()
                                .as_str()
                                .is_some_and(|v| validate::literal_secret(k.get_ref(), v))
                        })
                        .map(|(_, v)| v.span()),
                );
            }
        }
    }
    ranges.extend(secret_positions(text));
    if ranges.is_empty() {
        return text.to_owned();
    }
    let mut bytes = text.as_bytes().to_vec();
    for r in ranges {
        let inner = r.start + 1..r.end.saturating_sub(1).max(r.start + 1);
        for b in bytes.get_mut(inner).into_iter().flatten() {
            if *b != b'\n' {
                *b = b'*';
            }
        }
    }
    // Multi-byte characters became several ASCII bytes: still UTF-8.
    String::from_utf8(bytes).unwrap_or_default()
}

/// The string literals (quotes included) in a secret's position, whatever
/// its shape, found in the text itself so a file that does not parse (a
/// duplicate key) or a misshapen value (a `value` key, an array, a typo'd
/// `secret` table) is masked too: every string under a key or table whose
/// name (past an entity's own name) contains `secret`. Kept: a `from_env`
/// that is a variable name, a `from_file` that is an absolute path (the
/// references themselves, which diagnostics need to show) and a `hosts`
/// entry shaped like a host or URL.
pub(crate) fn secret_positions(text: &str) -> Vec<std::ops::Range<usize>> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut section_secret = false;
    // Within a key's value: whether it is a secret's, the bracket depth,
    // and the last key seen (inside an inline table).
    let mut value_secret = false;
    let mut depth = 0usize;
    let mut key = String::new();
    let mut at_line_start = true;
    let mut in_value = false;
    let secretish = |segments: &[String], skip_name: bool| {
        segments
            .iter()
            .enumerate()
            .filter(|(i, _)| !(skip_name && *i == 1))
            .any(|(_, s)| s.to_ascii_lowercase().contains("secret"))
    };
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'\n' => {
                if depth == 0 {
                    in_value = false;
                    value_secret = false;
                }
                at_line_start = true;
                i += 1;
                continue;
            }
            b' ' | b'\t' | b'\r' => {
                i += 1;
                continue;
            }
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            _ => {}
        }
        let line_start = std::mem::replace(&mut at_line_start, false);
        if line_start && !in_value && c == b'[' {
            // A table header: `[a.b.c]` or `[[a.b]]`.
            let end = bytes[i..]
                .iter()
                .position(|b| *b == b'\n')
                .map_or(bytes.len(), |p| i + p);
            let header = text.get(i..end).unwrap_or("").trim_start_matches('[');
            let header = header.split(']').next().unwrap_or("");
            let segments: Vec<String> = split_key(header);
            section_secret = secretish(&segments, true);
            i = end;
            continue;
        }
        if c == b'"' || c == b'\'' {
            let end = string_end(bytes, i);
            if in_value && value_secret {
                let value = text.get(i + 1..end.saturating_sub(1)).unwrap_or("");
                let reference = match key.as_str() {
                    "from_env" => conventional_env_name(value),
                    "from_file" => {
                        value.contains('/')
                            && !value.chars().any(|c| c.is_whitespace() || c.is_control())
                    }
                    // Where a gated secret may go: host names, not values
                    // (anything that does not look like one stays masked).
                    "hosts" => {
                        value.contains('.')
                            && value
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || ".-*:/[]".contains(c))
                    }
                    _ => false,
                };
                if !reference {
                    out.push(i..end);
                }
            } else if !in_value || depth > 0 {
                // A quoted key.
                key = text
                    .get(i + 1..end.saturating_sub(1))
                    .unwrap_or("")
                    .to_owned();
            }
            i = end;
            continue;
        }
        match c {
            b'=' => {
                if !in_value {
                    in_value = true;
                    let segments = split_key(&key);
                    value_secret = section_secret || secretish(&segments, false);
                }
                i += 1;
            }
            b'[' | b'{' => {
                depth += 1;
                i += 1;
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b',' => i += 1,
            _ => {
                // A bare key (or a bare value: number, boolean, date).
                let start = i;
                while i < bytes.len()
                    && !matches!(
                        bytes[i],
                        b'=' | b' ' | b'\t' | b'\n' | b'\r' | b',' | b'}' | b']' | b'#'
                    )
                {
                    i += 1;
                }
                let word = text.get(start..i).unwrap_or("");
                // A key before the value, or one inside an inline table.
                let key_in_table = depth > 0
                    && bytes[i..].iter().find(|b| !matches!(b, b' ' | b'\t')) == Some(&b'=');
                if !in_value || key_in_table {
                    key = word.to_owned();
                }
            }
        }
    }
    out
}

/// A `from_env` value shown as written: an upper-case variable name
/// (`GITHUB_TOKEN`). Anything else may be a value pasted in its place.
pub fn conventional_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// `a.b."c.d"` as its segments.
fn split_key(key: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut quote = None;
    for c in key.chars() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '.') => out.push(String::new()),
            (None, c) if c.is_whitespace() => {}
            (_, c) => out.last_mut().expect("one segment").push(c),
        }
    }
    out
}

/// The byte after the string literal starting at `start` (a quote), or the
/// end of the line for an unterminated one.
fn string_end(bytes: &[u8], start: usize) -> usize {
    let q = bytes[start];
    let triple = bytes.len() >= start + 3 && bytes[start + 1] == q && bytes[start + 2] == q;
    let mut i = start + if triple { 3 } else { 1 };
    while i < bytes.len() {
        let c = bytes[i];
        if c == b'\\' && q == b'"' {
            i += 2;
            continue;
        }
        if !triple && c == b'\n' {
            return i;
        }
        if c == q {
            if !triple {
                return i + 1;
            }
            if bytes.len() >= i + 3 && bytes[i + 1] == q && bytes[i + 2] == q {
                return i + 3;
            }
        }
        i += 1;
    }
    bytes.len()
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

/// Problems found so far, each with where it sorts: by file, then position.
#[derive(Default)]
pub(super) struct Found {
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
pub(super) struct FsInfo {
    pub canonical: PathBuf,
    pub is_dir: bool,
    pub is_file: bool,
}

/// Everything the checks need while loading: the sources, their parsed
/// documents (so spans need no re-parse), and what was found so far.
pub(super) struct Cx<'a> {
    pub sources: &'a Sources,
    pub docs: &'a [Doc<'a>],
    /// The manifests directory, canonical.
    pub root: &'a Path,
    /// Every manifest file, canonical (a symlinked one where it points).
    pub manifest_files: &'a [PathBuf],
    pub found: Found,
    /// Paths are often shared (one skill, many agents): stat each once.
    fs: HashMap<PathBuf, Option<FsInfo>>,
    certs: HashMap<PathBuf, Result<usize, validate::PemProblem>>,
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
    /// than a `realpath` walk each.
    pub fn stat(&mut self, path: &Path) -> Option<FsInfo> {
        if let Some(info) = self.fs.get(path) {
            return info.clone();
        }
        let info = match (path.parent(), path.file_name()) {
            (Some(parent), Some(name)) => self.stat(parent).and_then(|parent| {
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
            }),
            // The root, or a path that is not absolute.
            _ => fs::canonicalize(path).ok().and_then(|canonical| {
                let meta = fs::metadata(&canonical).ok()?;
                Some(FsInfo {
                    canonical,
                    is_dir: meta.is_dir(),
                    is_file: meta.is_file(),
                })
            }),
        };
        self.fs.insert(path.to_owned(), info.clone());
        info
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

/// A declared bottle or agent.
pub(super) struct Decl<T> {
    pub name: String,
    pub file: FileId,
    /// Span of the name where it is declared (`dev` in `[bottle.dev]`).
    pub name_span: Range<usize>,
    /// `None` when the entity did not deserialize (already reported).
    pub spec: Option<T>,
    /// The top-level keys of the entity under which a problem was
    /// reported (`"*"`: the entity as a whole). Reported keys are missing
    /// from `spec`, so checks that look at what is *absent* under them are
    /// skipped.
    pub tainted: BTreeSet<String>,
}

impl<T> Decl<T> {
    /// Whether nothing under `key` was reported (and dropped).
    pub fn clean_at(&self, key: &str) -> bool {
        !self.tainted.contains(key) && !self.tainted.contains(WHOLE)
    }
}

/// `Decl::tainted` for a problem that is not under one key.
const WHOLE: &str = "*";

/// The top-level key a path inside an entity starts with.
fn top_key(path: &[Seg]) -> String {
    match path.first() {
        Some(Seg::Key(k)) => k.clone(),
        _ => WHOLE.to_owned(),
    }
}

impl<T> Decl<T> {
    /// Key path of the entity in its file (`bottle.dev`).
    pub fn path(&self, kind: Kind) -> KeyPath {
        KeyPath::new().key(kind.table()).key(&self.name)
    }
}

#[derive(Default)]
pub(super) struct Decls {
    pub project: Option<(FileId, ProjectSpec)>,
    pub bottles: Vec<Decl<BottleSpec>>,
    pub agents: Vec<Decl<AgentSpec>>,
    /// An `agent` key was seen, even a malformed one (then "no agents" would
    /// only repeat its error).
    pub saw_agent_table: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Project,
    Bottle,
    Agent,
}

impl Kind {
    pub fn table(self) -> &'static str {
        match self {
            Kind::Project => "project",
            Kind::Bottle => "bottle",
            Kind::Agent => "agent",
        }
    }
    /// "bottle `dev`", for messages.
    pub fn describe(self, name: &str) -> String {
        match self {
            Kind::Project => "`[project]`".to_owned(),
            _ => format!("{} `{name}`", self.table()),
        }
    }
}

const TOP_KEYS: [&str; 3] = ["project", "bottle", "agent"];

/// Read one file's top level: `[project]`, `[bottle.*]`, `[agent.*]`.
fn read_file(cx: &mut Cx, file: FileId, rel: &Path, doc: &Doc, broken: bool, out: &mut Decls) {
    let DeValue::Table(top) = doc.get_ref() else {
        return;
    };
    for (key, value) in top.iter() {
        let path = KeyPath::new().key(key.get_ref().as_ref());
        match key.get_ref().as_ref() {
            "project" if broken => {}
            "project" if rel != Path::new(ROOT_FILE) => {
                cx.report_at(
                    file,
                    key.span(),
                    ManifestDiagnostic::new(
                        "bottle::misplaced-project",
                        "`[project]` is only allowed in the root bottle.toml",
                    )
                    .help(format!(
                        "move this table to `{ROOT_FILE}` at the top of the manifests directory: \
                         there is one project per directory"
                    )),
                    "not the root bottle.toml",
                );
            }
            "project" => {
                if let Some((spec, _)) = entity::<ProjectSpec>(cx, file, Kind::Project, "", value) {
                    out.project = Some((file, spec));
                }
            }
            "bottle" | "agent" => {
                out.saw_agent_table |= key.get_ref() == "agent";
                let kind = if key.get_ref() == "bottle" {
                    Kind::Bottle
                } else {
                    Kind::Agent
                };
                let DeValue::Table(entities) = value.get_ref() else {
                    if !broken {
                        cx.report(
                            file,
                            &path,
                            Want::Value,
                            ManifestDiagnostic::new(
                                "bottle::wrong-type",
                                format!("`{}` must be a table of {}s", kind.table(), kind.table()),
                            )
                            .help(format!(
                                "declare each {0} as its own table: `[{0}.<name>]`",
                                kind.table()
                            )),
                            format!("not a table of {}s", kind.table()),
                        );
                    }
                    continue;
                };
                for (name, value) in entities.iter() {
                    let (name_str, span) = (name.get_ref().as_ref(), name.span());
                    match kind {
                        Kind::Bottle => out
                            .bottles
                            .push(decl(cx, file, kind, name_str, span, value, !broken)),
                        _ => out
                            .agents
                            .push(decl(cx, file, kind, name_str, span, value, !broken)),
                    }
                }
            }
            _ if broken => {}
            other => {
                let d = match retired(None, &[], other) {
                    Some((message, help)) => {
                        ManifestDiagnostic::new("bottle::retired-key", message).help(help)
                    }
                    None => ManifestDiagnostic::new(
                        "bottle::unknown-key",
                        format!("unknown top-level key `{other}`"),
                    )
                    .help(match suggest(other, TOP_KEYS) {
                        Some(s) => format!("did you mean `{s}`?"),
                        None => "a manifest holds `[bottle.<name>]` and `[agent.<name>]` \
                                 tables (and `[project]` in the root bottle.toml)"
                            .to_owned(),
                    }),
                };
                cx.report_at(file, key.span(), d, "unknown key");
            }
        }
    }
}

/// One declared bottle or agent. Its spec is deserialized (and its
/// problems reported) only when `parse`; otherwise only its name counts.
fn decl<T: DeserializeOwned>(
    cx: &mut Cx,
    file: FileId,
    kind: Kind,
    name: &str,
    name_span: Range<usize>,
    raw: &Doc,
    parse: bool,
) -> Decl<T> {
    let spec = if parse {
        entity::<T>(cx, file, kind, name, raw)
    } else {
        None
    };
    Decl {
        name: name.to_owned(),
        file,
        name_span,
        tainted: spec
            .as_ref()
            .map(|s| s.1.clone())
            .unwrap_or_else(|| BTreeSet::from([WHOLE.to_owned()])),
        spec: spec.map(|s| s.0),
    }
}

/// Deserialize one entity (`[project]`, `[bottle.X]` or `[agent.X]`),
/// reporting every problem in it, not just serde's first: after each error
/// the offending key is dropped and deserialization is retried. Returns the
/// spec and the top-level keys under which something was reported.
fn entity<T: DeserializeOwned>(
    cx: &mut Cx,
    file: FileId,
    kind: Kind,
    name: &str,
    raw: &Doc,
) -> Option<(T, BTreeSet<String>)> {
    let what = kind.describe(name);
    let base = match kind {
        Kind::Project => KeyPath::new().key("project"),
        _ => KeyPath::new().key(kind.table()).key(name),
    };
    if !matches!(raw.get_ref(), DeValue::Table(_)) {
        cx.report_at(
            file,
            raw.span(),
            ManifestDiagnostic::new("bottle::wrong-type", format!("{what} must be a table")).help(
                format!(
                    "declare it as a table: `[{}]` on its own line, then its keys",
                    base
                ),
            ),
            "not a table",
        );
        return None;
    }

    let mut value = raw.clone();
    let mut tainted = precheck(cx, file, kind, &what, &mut value);
    // Keys dropped after an error, by their table's path, so that the
    // "missing field" a dropped required key causes is not reported too.
    let mut dropped: Vec<(Vec<Seg>, String)> = Vec::new();
    for _ in 0..64 {
        let e = match T::deserialize(ValueDeserializer::from(value.clone())) {
            // With errors reported, the rest of the entity is still checked
            // (the dropped keys take their defaults): more problems in one run.
            Ok(spec) => return Some((spec, tainted)),
            Err(e) => e,
        };
        let span = e.span().unwrap_or_else(|| raw.span());
        let hit = locate(&value, &span);
        let message = e.message();
        tainted.insert(hit.as_ref().map_or(WHOLE.to_owned(), |h| top_key(&h.path)));

        if let Some(field) = between(message, "missing field `", "`") {
            let table = hit.as_ref().map(|h| h.path.clone()).unwrap_or_default();
            if !dropped.iter().any(|(t, k)| *t == table && k == field) {
                let mut path = table.clone();
                path.push(Seg::Key(field.to_owned()));
                let pattern = pattern(kind, &path);
                let where_ = context(&what, &base, &table);
                let help = match example(&pattern) {
                    Some(ex) => format!("add it, e.g. `{ex}`"),
                    None => format!("add `{field}`"),
                };
                cx.report_at(
                    file,
                    header_span(&span, cx.sources.get(file).text.as_ref()),
                    ManifestDiagnostic::new(
                        "bottle::missing-key",
                        format!("{where_} is missing the required key `{field}`"),
                    )
                    .help(help),
                    format!("`{field}` missing here"),
                );
            }
            // A nested table (`[[bottle.x.setup]]`, `git.user`) is dropped
            // whole and the rest of the entity still checked; an entity
            // missing a required key has nothing more worth checking.
            if table.is_empty() || !remove(&mut value, &table) {
                return None;
            }
            let (parent, key) = split_last(&table);
            if let Some(Seg::Key(k)) = key {
                dropped.push((parent.to_vec(), k.clone()));
            }
            continue;
        }

        let Some(hit) = hit else {
            cx.report_at(
                file,
                span,
                ManifestDiagnostic::new("bottle::invalid-value", format!("in {what}: {message}"))
                    .help("see schemas/bottle.schema.json for the format"),
                "here",
            );
            return None;
        };
        let (parent, key) = split_last(&hit.path);
        let where_ = context(&what, &base, parent);

        if let Some(field) = between(message, "unknown field `", "`") {
            let d = match retired(Some(kind), parent, field) {
                Some((message, help)) => {
                    ManifestDiagnostic::new("bottle::retired-key", message).help(help)
                }
                None => {
                    let expected: Vec<&str> = message
                        .split_once("expected")
                        .map(|(_, rest)| rest.split('`').skip(1).step_by(2).collect())
                        .unwrap_or_default();
                    let help = match suggest(field, expected.iter().copied()) {
                        Some(s) => format!("did you mean `{s}`?"),
                        None if expected.is_empty() => "remove it: this table takes no keys".into(),
                        None => format!(
                            "remove it, or use one of the keys allowed here: {}",
                            expected
                                .iter()
                                .map(|k| format!("`{k}`"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    };
                    ManifestDiagnostic::new(
                        "bottle::unknown-key",
                        format!("unknown key `{field}` in {where_}"),
                    )
                    .help(help)
                }
            };
            cx.report_at(file, hit.key_span.clone(), d, "unknown key");
        } else if let Some(expected) = message
            .strip_prefix("invalid type: ")
            .or_else(|| message.strip_prefix("invalid value: "))
            .and_then(|m| m.split_once(", expected ").map(|(_, exp)| exp))
        {
            // serde's text quotes the value; rebuild it from types alone so a
            // secret written in the wrong place is never echoed.
            let expected = toml_type(expected);
            let found = a_type(hit.value.get_ref().type_str());
            let invalid = message.starts_with("invalid value");
            let pattern = pattern(kind, &hit.path);
            // An array element is named by its array, in the array's table.
            let (key_name, where_) = match key {
                Some(Seg::Index(_)) => {
                    let (table, array) = split_last(parent);
                    let array = match array {
                        Some(Seg::Key(a)) => a.as_str(),
                        _ => "an array",
                    };
                    (
                        format!("an element of `{array}`"),
                        context(&what, &base, table),
                    )
                }
                Some(Seg::Key(k)) => (format!("`{k}`"), where_),
                None => (format!("`{}`", KeyPath(hit.path.clone())), where_),
            };
            let message = if invalid {
                format!("invalid value for {key_name} in {where_}: expected {expected}")
            } else {
                format!("wrong type for {key_name} in {where_}: expected {expected}, found {found}")
            };
            let array_of_tables = matches!(pattern.as_str(), "bottle.setup" | "bottle.git.remote");
            let help = match example(&pattern) {
                // `[bottle.x.setup]` where `[[bottle.x.setup]]` was meant.
                _ if array_of_tables && found == "a table" => {
                    let mut full = base.clone();
                    full.0.extend(hit.path.iter().cloned());
                    format!("declare each entry with double brackets: `[[{full}]]`")
                }
                Some(ex) => format!("write it as {expected}, e.g. `{ex}`"),
                None => format!("write it as {expected}"),
            };
            let label = if invalid {
                format!("not {expected}")
            } else {
                format!("this is {found}")
            };
            cx.report_at(
                file,
                hit.value.span(),
                ManifestDiagnostic::new("bottle::wrong-type", message).help(help),
                label,
            );
        } else {
            // Other serde messages carry no values of ours.
            cx.report_at(
                file,
                hit.value.span(),
                ManifestDiagnostic::new("bottle::invalid-value", format!("in {where_}: {message}"))
                    .help("see schemas/bottle.schema.json for the format"),
                "here",
            );
        }

        if let Some(Seg::Key(k)) = key {
            dropped.push((parent.to_vec(), k.clone()));
        }
        let path = hit.path;
        if !remove(&mut value, &path) {
            return None;
        }
    }
    None
}

/// Remove from the sub-table `key` of `table` (when it is a table) the
/// entries whose value matches `pred`, returning their names and spans.
fn take_entries<'a>(
    table: &mut DeTable<'a>,
    key: &str,
    pred: fn(&DeValue<'a>) -> bool,
) -> Vec<(String, Range<usize>)> {
    let Some(sub) = table.get_mut(key) else {
        return Vec::new();
    };
    let DeValue::Table(sub) = sub.get_mut() else {
        return Vec::new();
    };
    let taken: Vec<_> = sub
        .iter()
        .filter(|(_, v)| pred(v.get_ref()))
        .map(|(k, v)| (k.get_ref().to_string(), v.span()))
        .collect();
    for (k, _) in &taken {
        sub.remove(k.as_str());
    }
    taken
}

/// Checks done on the raw value before deserializing, for mistakes that
/// deserve a better message than serde's: literal secrets (whose values
/// must never be echoed), retired shapes (`supervise = true`), secrets
/// written into `env`. Each offending key is removed from `value`.
/// Returns the top-level keys under which something was reported.
fn precheck(
    cx: &mut Cx,
    file: FileId,
    kind: Kind,
    what: &str,
    value: &mut Doc,
) -> BTreeSet<String> {
    let mut tainted = BTreeSet::new();
    if kind != Kind::Bottle {
        return tainted;
    }
    let DeValue::Table(table) = value.get_mut() else {
        return tainted;
    };

    for (var, span) in take_entries(table, "secrets", DeValue::is_str) {
        tainted.insert("secrets".to_owned());
        cx.report_at(
            file,
            span,
            ManifestDiagnostic::new(
                "bottle::literal-secret",
                format!("secret `{var}` in {what} is written as a literal value"),
            )
            .help(format!(
                "manifests hold references, never secret values: write \
                 `{var} = {{ from_env = \"HOST_VAR\" }}` (a host environment variable) or \
                 `{var} = {{ from_file = \"/abs/path\" }}`; if the value was committed, \
                 rotate it"
            )),
            "secret value in the manifest (not shown)",
        );
    }

    // serde would read an array as the reference's fields in order
    // (`["x"]` as `from_env = "x"`) and blame a variable name.
    for (var, span) in take_entries(table, "secrets", DeValue::is_array) {
        tainted.insert("secrets".to_owned());
        cx.report_at(
            file,
            span,
            ManifestDiagnostic::new(
                "bottle::wrong-type",
                format!(
                    "secret `{var}` in {what} is an array; a secret is a table naming its source"
                ),
            )
            .help(format!(
                "write `{var} = {{ from_env = \"HOST_VAR\" }}` (a host environment variable) or \
                 `{var} = {{ from_file = \"/abs/path\" }}`, not an array; manifests hold \
                 references, never secret values: if a value was committed, rotate it"
            )),
            "this is an array (not shown)",
        );
    }

    for (var, span) in take_entries(table, "env", DeValue::is_table) {
        tainted.insert("env".to_owned());
        cx.report_at(
            file,
            span,
            ManifestDiagnostic::new(
                "bottle::retired-key",
                format!("`env.{var}` in {what} is a table; env values are plain strings"),
            )
            .help(format!(
                "a value taken from the host or kept secret belongs in `secrets`: \
                 `secrets = {{ {var} = {{ from_env = \"HOST_VAR\" }} }}`"
            )),
            "not a string",
        );
    }

    // serde reads a struct from an array too (by position), which gives
    // baffling errors: an array where a table belongs is reported here.
    for key in ["egress", "ca", "git", "supervise", "local"] {
        let Some(value) = table.get(key).filter(|v| v.get_ref().is_array()) else {
            continue;
        };
        tainted.insert(key.to_owned());
        let span = value.span();
        table.remove(key);
        let help = match key {
            "egress" => "list hosts and networks in a table: `[bottle.<name>.egress]` with \
                         `allow_hosts = [\"api.anthropic.com\"]` and `allow_cidrs = [...]`"
                .to_owned(),
            _ => format!(
                "write it as a table, e.g. `{}`",
                example(&format!("bottle.{key}")).unwrap_or_default()
            ),
        };
        cx.report_at(
            file,
            span,
            ManifestDiagnostic::new(
                "bottle::wrong-type",
                format!("wrong type for `{key}` in {what}: expected a table, found an array"),
            )
            .help(help),
            "this is an array",
        );
    }

    if let Some(supervise) = table.get("supervise")
        && let Some(on) = supervise.get_ref().as_bool()
    {
        tainted.insert("supervise".to_owned());
        let span = supervise.span();
        table.remove("supervise");
        cx.report_at(
            file,
            span,
            ManifestDiagnostic::new(
                "bottle::retired-key",
                format!("`supervise = {on}` in {what}: supervise is now a table"),
            )
            .help(if on {
                "name the operator's MCP endpoint instead: `[bottle.<name>.supervise]` with \
                 `url = \"http://10.8.0.2:9100/\"`"
            } else {
                "remove the key: a bottle without a `supervise` table is not supervised"
            }),
            "a boolean",
        );
    }
    tainted
}

/// Retired or renamed keys of the tool bottle descends from (claude-bottle),
/// with the precise migration. `parent` is the path of the table holding
/// `key`, relative to the entity; `kind` is `None` at a file's top level.
fn retired(kind: Option<Kind>, parent: &[Seg], key: &str) -> Option<(String, String)> {
    let parent: Vec<&str> = parent
        .iter()
        .filter_map(|s| match s {
            Seg::Key(k) => Some(k.as_str()),
            Seg::Index(_) => None,
        })
        .collect();
    let hit = |m: &str, h: &str| Some((m.to_owned(), h.to_owned()));
    match (kind, parent.as_slice(), key) {
        (None, [], "bottles") => hit(
            "`[bottles.<name>]` was renamed to `[bottle.<name>]`",
            "rename the table: `[bottle.dev]` instead of `[bottles.dev]`",
        ),
        (None, [], "agents") => hit(
            "`[agents.<name>]` was renamed to `[agent.<name>]`",
            "rename the table: `[agent.reviewer]` instead of `[agents.reviewer]`",
        ),
        (Some(Kind::Bottle), ["egress"], "allowlist") => hit(
            "`egress.allowlist` was renamed to `egress.allow_hosts`",
            "rename it to `allow_hosts`; the Claude Code hosts are no longer added implicitly, \
             so list every host the agent needs (e.g. \"api.anthropic.com\")",
        ),
        (Some(Kind::Bottle), ["git"], "remotes") => hit(
            "`git.remotes` was renamed to `git.remote`",
            "declare each remote as `[[bottle.<name>.git.remote]]` with `name` and `upstream`",
        ),
        (
            Some(Kind::Bottle),
            ["git", "remote"],
            "identity_file" | "identity" | "ssh_key" | "known_hosts",
        ) => hit(
            &format!("`{key}` is gone: the gate holds the SSH keys now"),
            "declare the key as `credentials = { ssh_key = { from_file = \"/abs/key\" } }` \
             (read by bottle's gate on the host, never given to the guest) and pin the host \
             with `host_key`",
        ),
        (Some(Kind::Bottle), [], "credential_proxy" | "credentials" | "routes") => hit(
            &format!("`{key}` is gone: credentials are passed as secret references"),
            "declare each credential in `secrets`, e.g. \
             `secrets = { GITHUB_TOKEN = { from_env = \"GH_PAT\" } }`",
        ),
        _ => None,
    }
}

/// Where a serde error points: the key path (relative to the entity), the
/// key's span (or the element's, for array elements) and the value.
struct Hit<'v, 'a> {
    path: Vec<Seg>,
    key_span: Range<usize>,
    value: &'v Doc<'a>,
}

/// Find the entry whose key or value has exactly `span`, deepest first.
fn locate<'v, 'a>(root: &'v Doc<'a>, span: &Range<usize>) -> Option<Hit<'v, 'a>> {
    fn go<'v, 'a>(
        node: &'v Doc<'a>,
        span: &Range<usize>,
        path: &mut Vec<Seg>,
    ) -> Option<Hit<'v, 'a>> {
        let children: Vec<(Seg, Range<usize>, &'v Doc<'a>)> = match node.get_ref() {
            DeValue::Table(t) => t
                .iter()
                .map(|(k, v)| (Seg::Key(k.get_ref().to_string()), k.span(), v))
                .collect(),
            DeValue::Array(a) => a
                .iter()
                .enumerate()
                .map(|(i, v)| (Seg::Index(i), v.span(), v))
                .collect(),
            _ => return None,
        };
        for (seg, key_span, value) in children {
            path.push(seg);
            let inside = value.span().start <= span.start && span.end <= value.span().end;
            // A `[[header]]` table's span is its header; its keys follow it.
            let nested = matches!(value.get_ref(), DeValue::Table(_) | DeValue::Array(_));
            if (inside || nested)
                && let Some(hit) = go(value, span, path)
            {
                return Some(hit);
            }
            if key_span == *span || value.span() == *span {
                return Some(Hit {
                    path: path.clone(),
                    key_span,
                    value,
                });
            }
            path.pop();
        }
        None
    }
    if root.span() == *span {
        return Some(Hit {
            path: Vec::new(),
            key_span: span.clone(),
            value: root,
        });
    }
    go(root, span, &mut Vec::new())
}

/// Remove the entry at `path` from `value`; `false` if there was none.
fn remove(value: &mut Doc, path: &[Seg]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut node = value;
    for seg in parents {
        node = match (seg, node.get_mut()) {
            (Seg::Key(k), DeValue::Table(t)) => match t.get_mut(k.as_str()) {
                Some(v) => v,
                None => return false,
            },
            (Seg::Index(i), DeValue::Array(a)) => match a.get_mut(*i) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match (last, node.get_mut()) {
        (Seg::Key(k), DeValue::Table(t)) => t.remove(k.as_str()).is_some(),
        (Seg::Index(i), DeValue::Array(a)) if *i < a.len() => {
            let mut kept = toml::de::DeArray::new();
            for (j, v) in a.iter().enumerate() {
                if j != *i {
                    kept.push(v.clone());
                }
            }
            *a = kept;
            true
        }
        _ => false,
    }
}

fn split_last(path: &[Seg]) -> (&[Seg], Option<&Seg>) {
    match path.split_last() {
        Some((last, parent)) => (parent, Some(last)),
        None => (path, None),
    }
}

/// "bottle `dev`" or "`bottle.dev.egress`", for the table at `rel`.
fn context(what: &str, base: &KeyPath, rel: &[Seg]) -> String {
    if rel.is_empty() {
        what.to_owned()
    } else {
        let mut full = base.clone();
        full.0.extend(rel.iter().cloned());
        format!("`{full}`")
    }
}

/// A table's span for a label: the `[header]` line rather than the whole
/// table when the span covers more than one line.
fn header_span(span: &Range<usize>, text: &str) -> Range<usize> {
    let slice = text.get(span.clone()).unwrap_or("");
    match slice.find('\n') {
        Some(n) => span.start..span.start + n,
        None => span.clone(),
    }
}

fn between<'m>(s: &'m str, start: &str, end: &str) -> Option<&'m str> {
    let rest = &s[s.find(start)? + start.len()..];
    Some(&rest[..rest.find(end)?])
}

/// serde's "expected ..." in TOML's words.
fn toml_type(expected: &str) -> String {
    match expected {
        "u8" | "u16" | "u32" | "u64" | "usize" => "a positive integer".into(),
        "a sequence" => "an array".into(),
        "a map" => "a table".into(),
        "a boolean" => "`true` or `false`".into(),
        e if e.starts_with("struct ") => "a table".into(),
        e => e.into(),
    }
}

/// "a string", "an integer" for a TOML type name.
fn a_type(ty: &str) -> String {
    match ty {
        "integer" | "array" => format!("an {ty}"),
        _ => format!("a {ty}"),
    }
}

/// The key path with names and indices abstracted: `bottle.setup.after`,
/// `bottle.secrets.*`, to look up examples.
fn pattern(kind: Kind, path: &[Seg]) -> String {
    let mut out = kind.table().to_owned();
    let keys = path.iter().filter_map(|s| match s {
        Seg::Key(k) => Some(k.as_str()),
        Seg::Index(_) => None,
    });
    for (depth, k) in keys.enumerate() {
        // `env` and `secrets` are maps keyed by user-chosen variable names.
        let map_key = depth == 1
            && kind == Kind::Bottle
            && matches!(path.first(), Some(Seg::Key(m)) if m == "env" || m == "secrets");
        out.push('.');
        out.push_str(if map_key { "*" } else { k });
    }
    out
}

/// An example of a key, for help lines.
fn example(pattern: &str) -> Option<&'static str> {
    Some(match pattern {
        "project.name" => "name = \"example\"",
        "bottle.image" => "image = \"ghcr.io/acme/agent-base:1.2\"",
        "bottle.cpus" => "cpus = 2",
        "bottle.memory_mib" => "memory_mib = 2048",
        "bottle.user" => "user = \"node\"",
        "bottle.env" => "env = { GIT_AUTHOR_NAME = \"Bottle Bot\" }",
        "bottle.env.*" => "NAME = \"value\"",
        "bottle.secrets" => "secrets = { GITHUB_TOKEN = { from_env = \"GH_PAT\" } }",
        "bottle.secrets.*" => "GITHUB_TOKEN = { from_env = \"GH_PAT\" }",
        "bottle.secrets.*.from_env" => "from_env = \"GH_PAT\"",
        "bottle.secrets.*.from_file" => "from_file = \"/run/secrets/github\"",
        "bottle.volumes" => "volumes = [\"./workspace:/workspace\"]",
        "bottle.egress" => "[bottle.<name>.egress] allow_hosts = [\"api.anthropic.com\"]",
        "bottle.egress.allow_hosts" => "allow_hosts = [\"api.anthropic.com\"]",
        "bottle.egress.allow_cidrs" => "allow_cidrs = [\"10.8.0.0/16\"]",
        "bottle.ca" => "[bottle.<name>.ca] cert = \"certs/egress-ca.pem\"",
        "bottle.ca.cert" => "cert = \"certs/egress-ca.pem\"",
        "bottle.git" => "[bottle.<name>.git] gateway = \"http://10.8.0.2:9418\"",
        "bottle.git.gateway" => "gateway = \"http://10.8.0.2:9418\"",
        "bottle.git.user" => "user = { name = \"Bottle Bot\", email = \"bot@example.com\" }",
        "bottle.git.user.name" => "name = \"Bottle Bot\"",
        "bottle.git.user.email" => "email = \"bot@example.com\"",
        "bottle.git.remote" => "[[bottle.<name>.git.remote]] name = \"app\"",
        "bottle.git.remote.name" => "name = \"app\"",
        "bottle.git.remote.upstream" => "upstream = \"git@github.com:acme/app.git\"",
        "bottle.supervise" => "[bottle.<name>.supervise] url = \"http://10.8.0.2:9100/\"",
        "bottle.supervise.url" => "url = \"http://10.8.0.2:9100/\"",
        "bottle.setup" => "[[bottle.<name>.setup]] name = \"toolchain\"",
        "bottle.setup.name" => "name = \"toolchain\"",
        "bottle.setup.run" => "run = \"apt-get install -y ripgrep\"",
        "bottle.setup.after" => "after = [\"ca\"]",
        "bottle.setup.inputs" => "inputs = [\"scripts/install.sh\"]",
        "bottle.local" => "[bottle.<name>.local] allow_unfiltered_network = true",
        "bottle.local.allow_unfiltered_network" => "allow_unfiltered_network = true",
        "agent.bottle" => "bottle = \"dev\"",
        "agent.prompt" => "prompt = \"prompts/reviewer.md\"",
        "agent.prompt_text" => "prompt_text = \"You review Rust code.\"",
        "agent.skills" => "skills = [\"skills/rust-review\"]",
        _ => return None,
    })
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

/// Group declarations by name, in order of appearance.
pub(super) fn by_name<T>(decls: &[Decl<T>]) -> BTreeMap<&str, Vec<&Decl<T>>> {
    let mut out: BTreeMap<&str, Vec<&Decl<T>>> = BTreeMap::new();
    for d in decls {
        out.entry(d.name.as_str()).or_default().push(d);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> Doc<'_> {
        let t = DeTable::parse(text).unwrap();
        let span = t.span();
        Spanned::new(span, DeValue::Table(t.into_inner()))
    }

    #[test]
    fn locates_keys_values_and_array_elements() {
        let text = "[bottle.dev]\ncpu = 3\nvolumes = [\"a\", 1]\n[[bottle.dev.setup]]\nname = 1\n";
        let d = doc(text);
        let key = text.find("cpu").unwrap();
        let hit = locate(&d, &(key..key + 3)).unwrap();
        assert_eq!(KeyPath(hit.path).to_string(), "bottle.dev.cpu");

        let one = text.find("1]").unwrap();
        let hit = locate(&d, &(one..one + 1)).unwrap();
        assert_eq!(KeyPath(hit.path).to_string(), "bottle.dev.volumes[1]");

        let n = text.rfind('1').unwrap();
        let hit = locate(&d, &(n..n + 1)).unwrap();
        assert_eq!(KeyPath(hit.path).to_string(), "bottle.dev.setup[0].name");
    }

    #[test]
    fn removes_keys_and_elements() {
        let text = "[bottle.dev]\ncpu = 3\nvolumes = [\"a\", 1]\n";
        let mut d = doc(text);
        let path = |p: &[&str]| -> Vec<Seg> { p.iter().map(|k| Seg::Key((*k).into())).collect() };
        assert!(remove(&mut d, &path(&["bottle", "dev", "cpu"])));
        assert!(!remove(&mut d, &path(&["bottle", "dev", "cpu"])));
        let mut vols = path(&["bottle", "dev", "volumes"]);
        vols.push(Seg::Index(1));
        assert!(remove(&mut d, &vols));
        vols.pop();
        let arr = find(&d, &vols, Want::Value).unwrap();
        assert_eq!(&text[arr], "[\"a\", 1]");
        let DeValue::Table(t) = d.get_ref() else {
            panic!()
        };
        let dev = t["bottle"].get_ref().get("dev").unwrap();
        assert_eq!(
            dev.get_ref()
                .get("volumes")
                .unwrap()
                .get_ref()
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn patterns_abstract_names_and_indices() {
        let p = |segs: &[Seg]| pattern(Kind::Bottle, segs);
        let k = |s: &str| Seg::Key(s.into());
        assert_eq!(
            p(&[k("setup"), Seg::Index(2), k("after")]),
            "bottle.setup.after"
        );
        assert_eq!(
            p(&[k("secrets"), k("TOKEN"), k("from_env")]),
            "bottle.secrets.*.from_env"
        );
        assert_eq!(p(&[k("env"), k("A")]), "bottle.env.*");
        assert_eq!(p(&[k("git"), k("user"), k("name")]), "bottle.git.user.name");
    }
}
