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
    pub src: Option<Snippet>,
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
        // On a long line a label is cut to a window's width (see
        // [`Snippet`]): the renderer never sees a span it cannot show.
        let clamp = move |l: &LabeledSpan| match &self.src {
            Some(src) => src.clamp(l),
            None => l.clone(),
        };
        (!self.labels.is_empty()).then(|| {
            Box::new(self.labels.iter().map(clamp)) as Box<dyn Iterator<Item = LabeledSpan>>
        })
    }

    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn Diagnostic> + 'a>> {
        (!self.related.is_empty()).then(|| {
            Box::new(self.related.iter().map(|d| d as &dyn Diagnostic))
                as Box<dyn Iterator<Item = &'a dyn Diagnostic> + 'a>
        })
    }
}

/// A manifest file as a diagnostic shows it. A line longer than
/// [`LONG_LINE`] bytes is shown as a window around the label (no context
/// lines), so a 100 KB single-line array costs a few lines of output, and a
/// label past column 65,535 (where miette's renderer panics) is shown at a
/// small column of its window while the header keeps the real line and
/// column.
#[derive(Debug, Clone)]
pub struct Snippet(pub NamedSource<Arc<str>>);

/// Lines longer than this are shown as a window.
pub const LONG_LINE: usize = 200;
/// Bytes shown before a label on a long line, and at most after its start.
const BEFORE: usize = 60;
const AFTER: usize = 100;

impl Snippet {
    pub fn name(&self) -> &str {
        self.0.name()
    }

    pub fn inner(&self) -> &Arc<str> {
        self.0.inner()
    }

    /// The line holding byte `offset`: (start, end) offsets, without the
    /// newline.
    fn line_at(&self, offset: usize) -> (usize, usize) {
        let text: &str = self.inner();
        let offset = offset.min(text.len());
        let start = text.as_bytes()[..offset]
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |i| i + 1);
        let end = text.as_bytes()[offset..]
            .iter()
            .position(|b| *b == b'\n')
            .map_or(text.len(), |i| offset + i);
        (start, end)
    }

    /// A label on a long line, cut to what its window shows.
    fn clamp(&self, label: &LabeledSpan) -> LabeledSpan {
        let (start, end) = self.line_at(label.offset());
        if end - start <= LONG_LINE {
            return label.clone();
        }
        let text: &str = self.inner();
        let from = floor_boundary(text, label.offset());
        let to = floor_boundary(text, (from + label.len()).min(end).min(from + AFTER));
        LabeledSpan::new(label.label().map(str::to_owned), from, to - from)
    }
}

fn floor_boundary(text: &str, mut at: usize) -> usize {
    at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

impl miette::SourceCode for Snippet {
    fn read_span<'a>(
        &'a self,
        span: &SourceSpan,
        context_lines_before: usize,
        context_lines_after: usize,
    ) -> Result<Box<dyn miette::SpanContents<'a> + 'a>, miette::MietteError> {
        let text: &str = self.inner();
        let (line_start, line_end) = self.line_at(span.offset());
        // Are the lines around the span (its context) all short?
        let mut first = line_start;
        for _ in 0..context_lines_before {
            if first == 0 {
                break;
            }
            first = self.line_at(first - 1).0;
        }
        let span_end = (span.offset() + span.len()).min(text.len());
        let mut last = span_end;
        for _ in 0..=context_lines_after {
            last = self.line_at(last).1;
            if last < text.len() {
                last += 1;
            }
        }
        let long = text[first..last.min(text.len())]
            .split('\n')
            .any(|l| l.len() > LONG_LINE);
        if !long {
            return self
                .0
                .read_span(span, context_lines_before, context_lines_after);
        }
        // A window of the span's own line. A span wider than a window (two
        // labels merged) is refused: the renderer then shows each label
        // on its own.
        if span_end > line_end || span.len() > BEFORE + AFTER {
            return Err(miette::MietteError::OutOfBounds);
        }
        // Without context (the header's line and column) the data starts
        // at the span, as miette's own sources do.
        let before = if context_lines_before == 0 { 0 } else { BEFORE };
        let from = floor_boundary(text, span.offset().saturating_sub(before).max(line_start));
        let to = floor_boundary(text, (span.offset() + AFTER).max(span_end).min(line_end));
        let line = text.as_bytes()[..line_start]
            .iter()
            .filter(|b| **b == b'\n')
            .count();
        // The column (in bytes, as miette counts) of the data's start: the
        // span's own when the header asks for it (no context).
        Ok(Box::new(miette::MietteSpanContents::new_named(
            self.name().to_owned(),
            &text.as_bytes()[from..to],
            (from, to - from).into(),
            line,
            text[line_start..from].len(),
            1,
        )))
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
        self.src = Some(Snippet(sources.named_source(file)));
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
        self.src = Some(Snippet(sources.named_source(file)));
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

/// At most this many problems are rendered, and at most
/// [`SHOWN_PER_CODE`] of one kind: 5,000 bad entries on one line must not
/// print 200 MB. (`--json` lists them all; it never prints source lines.)
pub const SHOWN: usize = 50;
pub const SHOWN_PER_CODE: usize = 10;

impl Diagnostics {
    fn single(&self) -> Option<&ManifestDiagnostic> {
        match self.items.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }

    /// The problems rendered: the first [`SHOWN_PER_CODE`] of each code,
    /// [`SHOWN`] in all, in order.
    pub fn shown(&self) -> Vec<&ManifestDiagnostic> {
        let mut per_code: std::collections::BTreeMap<&str, usize> = Default::default();
        self.items
            .iter()
            .filter(|d| {
                let n = per_code.entry(d.code).or_default();
                *n += 1;
                *n <= SHOWN_PER_CODE
            })
            .take(SHOWN)
            .collect()
    }
}

impl std::fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.single() {
            Some(one) => one.fmt(f),
            None => {
                write!(
                    f,
                    "{} found in {}",
                    plural(self.items.len(), "problem"),
                    self.dir
                )?;
                let shown = self.shown().len();
                if shown < self.items.len() {
                    write!(f, " ({shown} shown)")?;
                }
                Ok(())
            }
        }
    }
}

/// The last of a capped list of problems.
#[derive(Debug, Error)]
#[error(
    "more problems are not shown (each kind is shown at most {SHOWN_PER_CODE} times, {SHOWN} in all)"
)]
struct Omitted;

impl Diagnostic for Omitted {
    fn code<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        Some(Box::new("bottle::problems-omitted"))
    }

    fn help<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        Some(Box::new(
            "fix the problems shown and run `bottle validate` again, or list every one with \
             `bottle validate --json`",
        ))
    }
}

static OMITTED: Omitted = Omitted;

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
            None => {
                let shown = self.shown();
                let omitted =
                    (shown.len() < self.items.len()).then_some(&OMITTED as &dyn Diagnostic);
                Some(Box::new(
                    shown
                        .into_iter()
                        .map(|d| d as &dyn Diagnostic)
                        .chain(omitted),
                ))
            }
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
