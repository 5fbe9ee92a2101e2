//! The diagnostic every manifest problem is reported as: a message, the file,
//! one or more labelled spans, and a help line that says what to do.

use std::sync::Arc;

use miette::{Diagnostic, LabeledSpan, NamedSource, SourceSpan};
use thiserror::Error;

use super::source::{FileId, KeyPath, Sources};

/// One problem in the manifests, pointing into one file. A problem that spans
/// two files (a name defined twice) carries the second place as `related`.
#[derive(Debug, Clone, Error, Diagnostic)]
#[error("{message}")]
pub struct ManifestDiagnostic {
    pub message: String,
    #[diagnostic(code)]
    pub code: &'static str,
    #[source_code]
    pub src: Option<NamedSource<Arc<str>>>,
    #[label(collection)]
    pub labels: Vec<LabeledSpan>,
    #[help]
    pub help: Option<String>,
    #[related]
    pub related: Vec<ManifestDiagnostic>,
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
/// diagnostic, so a single run shows them all.
#[derive(Debug, Clone, Error)]
#[error("{} found in {}", plural(self.items.len(), "problem"), self.dir)]
pub struct Diagnostics {
    /// The manifests directory, as the user named it.
    pub dir: String,
    pub items: Vec<ManifestDiagnostic>,
}

impl Diagnostic for Diagnostics {
    fn help<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        Some(Box::new(
            "fix the problems above, then run `bottle validate` again",
        ))
    }

    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn Diagnostic> + 'a>> {
        Some(Box::new(self.items.iter().map(|d| d as &dyn Diagnostic)))
    }
}

pub fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}
