//! From TOML to declarations: each file's top level, then each bottle and
//! agent deserialized into the model, every problem reported (a key that
//! fails is dropped and the rest retried) with help in TOML's words.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::Path;

use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use super::{Cx, Doc, ROOT_FILE};
use crate::manifest::diagnostic::suggest;
use crate::manifest::model::{AgentSpec, BottleSpec, ProjectSpec};
use crate::manifest::source::{Seg, Want};
use crate::manifest::{FileId, KeyPath, ManifestDiagnostic};
#[cfg(test)]
use {crate::manifest::source::find, toml::Spanned};

/// A declared bottle or agent.
pub(in crate::manifest) struct Decl<T> {
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
pub(in crate::manifest) struct Decls {
    pub project: Option<(FileId, ProjectSpec)>,
    pub bottles: Vec<Decl<BottleSpec>>,
    pub agents: Vec<Decl<AgentSpec>>,
    /// An `agent` key was seen, even a malformed one (then "no agents" would
    /// only repeat its error).
    pub saw_agent_table: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::manifest) enum Kind {
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
pub(super) fn read_file(
    cx: &mut Cx,
    file: FileId,
    rel: &Path,
    doc: &Doc,
    broken: bool,
    out: &mut Decls,
) {
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

/// Group declarations by name, in order of appearance.
pub(in crate::manifest) fn by_name<T>(decls: &[Decl<T>]) -> BTreeMap<&str, Vec<&Decl<T>>> {
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
