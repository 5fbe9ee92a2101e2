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

#[derive(Clone, Copy, PartialEq)]
enum Want {
    Key,
    Value,
}

/// Re-parses the text with spans; only called when a diagnostic is built,
/// so the happy path pays nothing for it.
fn lookup(text: &str, path: &KeyPath, want: Want) -> Option<SourceSpan> {
    use toml_edit::{Item, Table, Value};

    #[derive(Clone, Copy)]
    enum Node<'a> {
        Item(&'a Item),
        Table(&'a Table),
        Value(&'a Value),
    }
    impl<'a> Node<'a> {
        fn span(self) -> Option<std::ops::Range<usize>> {
            match self {
                Node::Item(i) => i.span(),
                Node::Table(t) => t.span(),
                Node::Value(v) => v.span(),
            }
        }
        fn child(self, key: &str) -> Option<(Option<std::ops::Range<usize>>, Node<'a>)> {
            let (k, item) = match self {
                Node::Item(Item::Table(t)) | Node::Table(t) => t.get_key_value(key)?,
                Node::Item(Item::Value(Value::InlineTable(t)))
                | Node::Value(Value::InlineTable(t)) => t.get_key_value(key)?,
                _ => return None,
            };
            Some((k.span(), Node::Item(item)))
        }
        fn index(self, n: usize) -> Option<Node<'a>> {
            match self {
                Node::Item(Item::ArrayOfTables(a)) => a.get(n).map(Node::Table),
                Node::Item(Item::Value(Value::Array(a))) | Node::Value(Value::Array(a)) => {
                    a.get(n).map(Node::Value)
                }
                _ => None,
            }
        }
    }

    let doc = toml_edit::Document::parse(text).ok()?;
    let mut node = Node::Item(doc.as_item());
    let mut best = None;
    let last = path.0.len().saturating_sub(1);
    for (i, seg) in path.0.iter().enumerate() {
        let next = match seg {
            Seg::Key(k) => match node.child(k) {
                Some((key_span, child)) => {
                    if i == last && want == Want::Key && key_span.is_some() {
                        return key_span.map(Into::into);
                    }
                    child
                }
                None => break,
            },
            Seg::Index(n) => match node.index(*n) {
                Some(child) => child,
                None => break,
            },
        };
        if let Some(span) = next.span() {
            best = Some(span);
        }
        node = next;
    }
    best.map(Into::into)
}
