//! The text of each manifest file, and lookups from a key path
//! (`agent.reviewer.skills[1]`) to the span of that key or value, so that
//! every diagnostic can carry a label on the offending text.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use miette::{NamedSource, SourceSpan};

/// Index of a file in [`Sources`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileId(pub usize);

/// One segment of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// A path to a key or value inside one TOML document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(pub Vec<Seg>);

impl KeyPath {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.0.push(Seg::Key(key.into()));
        self
    }
    pub fn index(mut self, index: usize) -> Self {
        self.0.push(Seg::Index(index));
        self
    }
}

impl std::fmt::Display for KeyPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// One manifest file as read.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// Absolute path.
    pub path: PathBuf,
    /// Path relative to the manifests directory, as shown to users.
    pub display: String,
    pub text: Arc<str>,
}

/// Every file read from a manifests directory.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    files: Vec<SourceFile>,
}

impl Sources {
    pub fn add(&mut self, path: PathBuf, display: String, text: Arc<str>) -> FileId {
        self.files.push(SourceFile {
            path,
            display,
            text,
        });
        FileId(self.files.len() - 1)
    }

    pub fn get(&self, id: FileId) -> &SourceFile {
        &self.files[id.0]
    }

    pub fn iter(&self) -> impl Iterator<Item = (FileId, &SourceFile)> {
        self.files.iter().enumerate().map(|(i, f)| (FileId(i), f))
    }

    pub fn path(&self, id: FileId) -> &Path {
        &self.files[id.0].path
    }

    /// The file as miette source code, named by its display path.
    pub fn named_source(&self, id: FileId) -> NamedSource<Arc<str>> {
        let file = &self.files[id.0];
        NamedSource::new(file.display.clone(), file.text.clone()).with_language("toml")
    }

    /// Span of the *value* at `path`, or of the nearest ancestor that exists.
    pub fn value_span(&self, id: FileId, path: &KeyPath) -> Option<SourceSpan> {
        lookup(&self.files[id.0].text, path, Want::Value)
    }

    /// Span of the *key* at `path` (for unknown or duplicate keys), falling
    /// back to the value span for array elements.
    pub fn key_span(&self, id: FileId, path: &KeyPath) -> Option<SourceSpan> {
        lookup(&self.files[id.0].text, path, Want::Key)
    }
}

/// Whether a lookup wants the span of a key or of its value.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Want {
    Key,
    Value,
}

/// Re-parses the text with spans; only called when a diagnostic is built
/// after loading, so the happy path pays nothing for it. Uses the same
/// parser as the loader, so spans agree with load-time diagnostics.
fn lookup(text: &str, path: &KeyPath, want: Want) -> Option<SourceSpan> {
    let (doc, _) = toml::de::DeTable::parse_recoverable(text);
    let span = doc.span();
    let root = toml::Spanned::new(span, toml::de::DeValue::Table(doc.into_inner()));
    find(&root, &path.0, want).map(Into::into)
}

/// The span of the key or value at `path` under `root`, or of the nearest
/// ancestor that exists (so a label still lands somewhere useful). Array
/// elements have no key: asking for one gives the element's span.
pub fn find(
    root: &toml::Spanned<toml::de::DeValue<'_>>,
    path: &[Seg],
    want: Want,
) -> Option<std::ops::Range<usize>> {
    use toml::de::DeValue;

    let mut node = root;
    let mut best = (root.span().end > 0).then(|| root.span());
    let last = path.len().saturating_sub(1);
    for (i, seg) in path.iter().enumerate() {
        let next = match (seg, node.get_ref()) {
            (Seg::Key(k), DeValue::Table(t)) => match t.get_key_value(k.as_str()) {
                Some((key, value)) => {
                    if i == last && want == Want::Key {
                        return Some(key.span());
                    }
                    value
                }
                None => break,
            },
            (Seg::Index(n), DeValue::Array(a)) => match a.get(*n) {
                Some(value) => value,
                None => break,
            },
            _ => break,
        };
        best = Some(next.span());
        node = next;
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "[bottle.dev]\ncpus = 2\n\n[[bottle.dev.setup]]\nname = \"a\"\nrun = \"x\"\n\n\
                        [[bottle.dev.setup]]\nname = \"b\"\nrun = \"y\"\nafter = [\"a\", \"b\"]\n";

    fn sources() -> (Sources, FileId) {
        let mut s = Sources::default();
        let id = s.add("/m/dev.toml".into(), "m/dev.toml".into(), TEXT.into());
        (s, id)
    }

    fn text(span: SourceSpan) -> &'static str {
        &TEXT[span.offset()..span.offset() + span.len()]
    }

    #[test]
    fn finds_keys_and_values_in_arrays_of_tables() {
        let (s, id) = sources();
        let after = KeyPath::new()
            .key("bottle")
            .key("dev")
            .key("setup")
            .index(1)
            .key("after");
        assert_eq!(text(s.key_span(id, &after).unwrap()), "after");
        assert_eq!(text(s.value_span(id, &after).unwrap()), "[\"a\", \"b\"]");
        assert_eq!(
            text(s.value_span(id, &after.clone().index(1)).unwrap()),
            "\"b\""
        );
        assert_eq!(after.to_string(), "bottle.dev.setup[1].after");
    }

    #[test]
    fn falls_back_to_the_nearest_ancestor() {
        let (s, id) = sources();
        let missing = KeyPath::new()
            .key("bottle")
            .key("dev")
            .key("setup")
            .index(0)
            .key("after");
        assert_eq!(
            text(s.value_span(id, &missing).unwrap()),
            "[[bottle.dev.setup]]"
        );
        let cpus = KeyPath::new().key("bottle").key("dev").key("cpus");
        assert_eq!(text(s.value_span(id, &cpus).unwrap()), "2");
    }
}
