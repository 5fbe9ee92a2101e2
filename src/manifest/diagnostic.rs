//! The diagnostic every manifest problem is reported as: a message, the file,
//! one or more labelled spans, and a help line that says what to do.

use std::sync::Arc;

use miette::{Diagnostic, LabeledSpan, NamedSource, SourceSpan};
use thiserror::Error;

use super::source::{FileId, KeyPath, Sources};

/// One problem in the manifests, pointing into one file. A problem that spans
/// two files (a name defined twice) carries the second place as `related`.
/// `code` is stable (`bottle::unknown-key`), for scripts and searches.
#[derive(Debug, Clone, Error)]
#[error("{message}")]
pub struct ManifestDiagnostic {
    pub message: String,
    pub code: &'static str,
    pub src: Option<NamedSource<Arc<str>>>,
    pub labels: Vec<LabeledSpan>,
    pub help: Option<String>,
    pub related: Vec<ManifestDiagnostic>,
}

// Written out rather than derived: the derive has no way to take the code
// from a field.
impl Diagnostic for ManifestDiagnostic {
    fn code<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        Some(Box::new(self.code))
    }

    fn help<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        self.help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn std::fmt::Display>)
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        self.src.as_ref().map(|s| s as &dyn miette::SourceCode)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        (!self.labels.is_empty())
            .then(|| Box::new(self.labels.iter().cloned()) as Box<dyn Iterator<Item = LabeledSpan>>)
    }

    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn Diagnostic> + 'a>> {
        (!self.related.is_empty()).then(|| {
            Box::new(self.related.iter().map(|d| d as &dyn Diagnostic))
                as Box<dyn Iterator<Item = &'a dyn Diagnostic> + 'a>
        })
    }
}

impl ManifestDiagnostic {
    /// A diagnostic with a message and a stable code (`bottle::unknown-key`).
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code,
            src: None,
            labels: Vec::new(),
            help: None,
            related: Vec::new(),
        }
    }

    /// Attach a file without a label (for whole-file problems).
    pub fn in_file(mut self, sources: &Sources, file: FileId) -> Self {
        self.src = Some(sources.named_source(file));
        self
    }

    /// Label an explicit span of `file`.
    pub fn span(
        mut self,
        sources: &Sources,
        file: FileId,
        span: impl Into<SourceSpan>,
        label: impl Into<String>,
    ) -> Self {
        self.src = Some(sources.named_source(file));
        self.labels
            .push(LabeledSpan::new_with_span(Some(label.into()), span.into()));
        self
    }

    /// Label the value at `path` in `file`.
    pub fn value(
        self,
        sources: &Sources,
        file: FileId,
        path: &KeyPath,
        label: impl Into<String>,
    ) -> Self {
        let span = sources.value_span(file, path).unwrap_or((0, 0).into());
        self.span(sources, file, span, label)
    }

    /// Label the key at `path` in `file`.
    pub fn key(
        self,
        sources: &Sources,
        file: FileId,
        path: &KeyPath,
        label: impl Into<String>,
    ) -> Self {
        let span = sources.key_span(file, path).unwrap_or((0, 0).into());
        self.span(sources, file, span, label)
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    pub fn related(mut self, other: ManifestDiagnostic) -> Self {
        self.related.push(other);
        self
    }
}

/// Every problem found in a manifests directory, in a stable order (file,
/// then position). Rendered as one report with each problem as a related
/// diagnostic, so a single run shows them all; a lone problem renders as
/// itself.
#[derive(Debug, Clone)]
pub struct Diagnostics {
    /// The manifests directory, as the user named it.
    pub dir: String,
    pub items: Vec<ManifestDiagnostic>,
}

impl Diagnostics {
    fn single(&self) -> Option<&ManifestDiagnostic> {
        match self.items.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }
}

impl std::fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.single() {
            Some(one) => one.fmt(f),
            None => write!(
                f,
                "{} found in {}",
                plural(self.items.len(), "problem"),
                self.dir
            ),
        }
    }
}

impl std::error::Error for Diagnostics {}

impl Diagnostic for Diagnostics {
    fn code<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        self.single().and_then(|d| d.code())
    }

    fn help<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        match self.single() {
            Some(one) => one.help(),
            None => Some(Box::new(
                "each problem is shown below: fix them, then run `bottle validate` again",
            )),
        }
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        self.single().and_then(|d| d.source_code())
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        self.single().and_then(|d| d.labels())
    }

    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn Diagnostic> + 'a>> {
        match self.single() {
            Some(one) => one.related(),
            None => Some(Box::new(self.items.iter().map(|d| d as &dyn Diagnostic))),
        }
    }
}

impl ManifestDiagnostic {
    /// As JSON for `--json` output: code, message, file, labels with line
    /// and column (1-based), help, related problems. Never the source text
    /// (a secret's value may sit on a labelled line).
    pub fn to_json(&self) -> serde_json::Value {
        let text = self.src.as_ref().map(|s| s.inner().as_ref());
        let labels: Vec<serde_json::Value> = self
            .labels
            .iter()
            .map(|l| {
                let (line, column) = text.map_or((None, None), |t| {
                    let (line, column) = line_column(t, l.offset());
                    (Some(line), Some(column))
                });
                serde_json::json!({
                    "label": l.label(),
                    "line": line,
                    "column": column,
                    "offset": l.offset(),
                    "length": l.len(),
                })
            })
            .collect();
        serde_json::json!({
            "code": self.code,
            "message": self.message,
            "file": self.src.as_ref().map(|s| s.name().to_owned()),
            "labels": labels,
            "help": self.help,
            "related": self.related.iter().map(Self::to_json).collect::<Vec<_>>(),
        })
    }
}

impl Diagnostics {
    /// Every problem as JSON (see [`ManifestDiagnostic::to_json`]).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "dir": self.dir,
            "message": self.to_string(),
            "problems": self.items.iter().map(ManifestDiagnostic::to_json).collect::<Vec<_>>(),
        })
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let offset = (0..=offset)
        .rev()
        .find(|&o| text.is_char_boundary(o))
        .unwrap_or(0);
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[start..].chars().count() + 1)
}

pub fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// The candidate closest to `word`, if it is close enough to be what the
/// user meant ("did you mean ..."): one edit away (a typo or a swap of two
/// letters), or a similar prefix (`memory` for `memory_mib`). Compares
/// case-insensitively so `CPUS` still finds `cpus`.
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let word = word.to_ascii_lowercase();
    candidates
        .into_iter()
        .filter_map(|c| {
            let lower = c.to_ascii_lowercase();
            let edits = strsim::damerau_levenshtein(&word, &lower);
            let jw = strsim::jaro_winkler(&word, &lower);
            let close =
                (edits <= 1 && word.len() >= 3) || (edits <= 2 && word.len() >= 6) || jw >= 0.85;
            close.then_some((edits, -jw, c))
        })
        .min_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)))
        .map(|(_, _, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        let keys = ["image", "cpus", "memory_mib", "user", "env", "secrets"];
        assert_eq!(suggest("cpu", keys), Some("cpus"));
        assert_eq!(suggest("memory", keys), Some("memory_mib"));
        assert_eq!(suggest("secret", keys), Some("secrets"));
        assert_eq!(suggest("CPUS", keys), Some("cpus"));
        assert_eq!(suggest("dve", ["dev", "ci"]), Some("dev"));
        assert_eq!(suggest("memroy_mib", keys), Some("memory_mib"));
        assert_eq!(suggest("cax", ["machine", "ca", "git"]), Some("ca"));
        assert_eq!(suggest("toolchain", keys), None);
        assert_eq!(suggest("x", ["y"]), None);
        assert_eq!(suggest("reviewer", ["dev", "ci"]), None);
    }
}
