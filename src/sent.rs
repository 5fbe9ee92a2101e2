//! What apply last sent: host-side copies of the prompt and the setup
//! inputs, per project and agent, so a cause can show what changed as a
//! short unified diff ("prompt changed in manifest" and the lines).
//!
//! The guest's ledger keeps only hashes, and what the guest shows back is
//! the agent's to change: the copies are bottle's own, in the state
//! directory (`sent/<project>/<agent>.json`, mode 0600), each tagged with
//! the step hash it was sent under. A copy is used only while the guest's
//! ledger still records that hash, so a copy made stale by another state
//! directory or by `watch` never shows a wrong diff: the cause then just
//! says "changed". Files over [`MAX_TEXT`] or not UTF-8 are kept as "no
//! diff". Secrets are never read here: only the prompt and setup inputs.
//!
//! Reading happens before planning (into [`crate::desired::Desired::texts`]
//! and [`crate::observe::Snapshot::sent`]), so the plan stays a pure
//! function of its inputs.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::apply::{Outcome, Report};
use crate::desired::Desired;
use crate::graph::StepKind;
use crate::manifest::Prompt;
use crate::plan::Op;

/// The largest file kept (and diffed); larger ones are "changed" only.
pub const MAX_TEXT: u64 = 64 * 1024;
/// The most lines a cause's diff shows; past that, a `…` line.
pub const MAX_DIFF_LINES: usize = 20;
/// Unchanged lines shown around each change.
const CONTEXT: usize = 2;
/// The most files of one setup step's inputs kept.
const MAX_FILES: usize = 256;
/// The largest line-by-line comparison made (after the common start and
/// end are set aside): beyond it, no diff.
const MAX_CELLS: usize = 4_000_000;

/// One step's texts: file name → content (`None`: too large or not text).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepTexts {
    /// The step hash these texts were (or are to be) applied under.
    pub hash: String,
    pub files: BTreeMap<String, Option<String>>,
}

/// An agent's texts, by step id (`prompt`, `setup:NAME`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentTexts {
    pub steps: BTreeMap<String, StepTexts>,
}

/// The texts the manifests declare now, for every agent.
pub fn desired_texts(desired: &Desired) -> BTreeMap<String, AgentTexts> {
    let project = &desired.project;
    let mut out = BTreeMap::new();
    for (name, agent) in &desired.agents {
        let declared = &project.agents[name];
        let bottle = &project.bottles[&declared.spec.bottle];
        let mut texts = AgentTexts::default();
        for step in &agent.steps {
            let files = match &step.kind {
                StepKind::Prompt => {
                    let content = match &declared.prompt {
                        Prompt::None => Some(String::new()),
                        Prompt::Text(t) => (t.len() as u64 <= MAX_TEXT).then(|| t.clone()),
                        Prompt::File(p) => read_text(p),
                    };
                    BTreeMap::from([("prompt".to_owned(), content)])
                }
                StepKind::Setup(setup) => {
                    let index = bottle.spec.setup.iter().position(|s| &s.name == setup);
                    let inputs = index
                        .and_then(|i| bottle.setup_inputs.get(i))
                        .cloned()
                        .unwrap_or_default();
                    let mut files = BTreeMap::new();
                    for input in &inputs {
                        collect(&project.dir, input, &mut files);
                    }
                    files
                }
                _ => continue,
            };
            texts.steps.insert(
                step.kind.id(),
                StepTexts {
                    hash: step.hash.clone(),
                    files,
                },
            );
        }
        out.insert(name.clone(), texts);
    }
    out
}

/// The regular files at or under `path`, by their path in the manifests
/// directory; symlinks and special files are skipped (the loader refuses
/// the ones that matter).
fn collect(root: &Path, path: &Path, out: &mut BTreeMap<String, Option<String>>) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if out.len() >= MAX_FILES {
        return;
    }
    if meta.is_file() {
        let name = path.strip_prefix(root).unwrap_or(path);
        out.insert(name.display().to_string(), read_text(path));
    } else if meta.is_dir() {
        let Ok(entries) = std::fs::read_dir(path) else {
            return;
        };
        let mut children: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        children.sort();
        for child in children {
            collect(root, &child, out);
        }
    }
}

/// A regular file's text, if it is at most [`MAX_TEXT`] bytes of UTF-8.
/// Opened without following a symlink or blocking on a FIFO.
fn read_text(path: &Path) -> Option<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() || meta.len() > MAX_TEXT {
        return None;
    }
    let mut bytes = Vec::new();
    file.take(MAX_TEXT + 1).read_to_end(&mut bytes).ok()?;
    if bytes.len() as u64 > MAX_TEXT {
        return None;
    }
    String::from_utf8(bytes).ok()
}

/// The copies of one project, in `<state>/sent/<project>/`.
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(state_dir: &Path, project: &str) -> Self {
        Self {
            dir: state_dir.join("sent").join(project),
        }
    }

    fn path(&self, agent: &str) -> PathBuf {
        self.dir.join(format!("{agent}.json"))
    }

    /// An agent's copies; none when there are none or they do not read.
    pub fn load(&self, agent: &str) -> AgentTexts {
        let path = self.path(agent);
        // Bounded: every file at most MAX_TEXT, escaped at most 6x.
        let limit = (MAX_TEXT * 8) * (MAX_FILES as u64 + 1) * 4;
        let Some(text) = std::fs::File::open(&path).ok().and_then(|f| {
            let mut s = String::new();
            f.take(limit).read_to_string(&mut s).ok().map(|_| s)
        }) else {
            return AgentTexts::default();
        };
        serde_json::from_str(&text).unwrap_or_default()
    }

    /// Every agent's copies.
    pub fn load_all<'a>(
        &self,
        agents: impl IntoIterator<Item = &'a String>,
    ) -> BTreeMap<String, AgentTexts> {
        agents
            .into_iter()
            .map(|a| (a.clone(), self.load(a)))
            .collect()
    }

    /// Replace an agent's copies (0600, written whole then renamed).
    pub fn save(&self, agent: &str, texts: &AgentTexts) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        let path = self.path(agent);
        let tmp = self.dir.join(format!(".{agent}.json.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&serde_json::to_vec(texts).map_err(std::io::Error::other)?)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)
    }

    /// Keep what an apply sent: the texts of every prompt or setup step it
    /// applied (as planned: same hash), and forget the steps it undid.
    /// Best effort: a copy that cannot be written only costs a diff.
    pub fn record(&self, desired: &Desired, report: &Report) {
        let mut changed: BTreeMap<&str, AgentTexts> = BTreeMap::new();
        for done in &report.actions {
            if !matches!(done.outcome, Outcome::Done { .. }) {
                continue;
            }
            let Some(agent) = done.action.agent.as_deref() else {
                continue;
            };
            let texts = changed.entry(agent).or_insert_with(|| self.load(agent));
            match &done.action.op {
                Op::Apply { step, hash, .. } => {
                    if let Some(sent) = desired
                        .texts
                        .get(agent)
                        .and_then(|t| t.steps.get(step))
                        .filter(|t| &t.hash == hash)
                    {
                        texts.steps.insert(step.clone(), sent.clone());
                    }
                }
                Op::Undo { step, .. } => {
                    texts.steps.remove(step);
                }
                _ => {}
            }
        }
        for (agent, texts) in changed {
            let _ = self.save(agent, &texts);
        }
    }
}

/// The diff between what was sent and what the manifests hold now, as
/// lines for a cause: at most [`MAX_DIFF_LINES`], then `…`. Empty when
/// there is nothing to show.
pub fn diff(old: &StepTexts, new: &StepTexts) -> Vec<String> {
    let mut lines = Vec::new();
    let names: std::collections::BTreeSet<&String> =
        old.files.keys().chain(new.files.keys()).collect();
    for name in names {
        match (old.files.get(name), new.files.get(name)) {
            (Some(a), Some(b)) if a == b => {}
            (Some(Some(a)), Some(Some(b))) => {
                lines.push(format!("--- {name}"));
                lines.push(format!("+++ {name}"));
                match line_diff(a, b) {
                    Some(hunks) => lines.extend(hunks),
                    None => lines.push("(too many changes to show)".to_owned()),
                }
            }
            (Some(_), Some(_)) => lines.push(format!(
                "{name} changed (no diff: larger than {} KiB or not text)",
                MAX_TEXT >> 10
            )),
            (None, Some(_)) => lines.push(format!("{name} added")),
            (Some(_), None) => lines.push(format!("{name} removed")),
            (None, None) => {}
        }
    }
    if lines.len() > MAX_DIFF_LINES {
        lines.truncate(MAX_DIFF_LINES);
        lines.push("…".to_owned());
    }
    lines
}

/// A unified diff of two texts by lines (`@@` hunks with [`CONTEXT`]
/// lines around each change), or `None` when they differ too widely to
/// compare cheaply.
fn line_diff(a: &str, b: &str) -> Option<Vec<String>> {
    let a: Vec<&str> = a.lines().collect();
    let b: Vec<&str> = b.lines().collect();
    // Set the common start and end aside; compare the middle by LCS.
    let prefix = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let suffix = a[prefix..]
        .iter()
        .rev()
        .zip(b[prefix..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let (am, bm) = (&a[prefix..a.len() - suffix], &b[prefix..b.len() - suffix]);
    if am.len().saturating_mul(bm.len()) > MAX_CELLS {
        return None;
    }
    // lcs[i][j]: the longest common subsequence of am[i..] and bm[j..].
    let width = bm.len() + 1;
    let mut lcs = vec![0u32; (am.len() + 1) * width];
    for i in (0..am.len()).rev() {
        for j in (0..bm.len()).rev() {
            lcs[i * width + j] = if am[i] == bm[j] {
                lcs[(i + 1) * width + j + 1] + 1
            } else {
                lcs[(i + 1) * width + j].max(lcs[i * width + j + 1])
            };
        }
    }
    // The edit script over whole texts: (' ' | '-' | '+', line).
    let mut ops: Vec<(char, &str)> = a[..prefix].iter().map(|l| (' ', *l)).collect();
    let (mut i, mut j) = (0, 0);
    while i < am.len() || j < bm.len() {
        if i < am.len() && j < bm.len() && am[i] == bm[j] {
            ops.push((' ', am[i]));
            i += 1;
            j += 1;
        } else if i < am.len()
            && (j == bm.len() || lcs[(i + 1) * width + j] >= lcs[i * width + j + 1])
        {
            ops.push(('-', am[i]));
            i += 1;
        } else {
            ops.push(('+', bm[j]));
            j += 1;
        }
    }
    ops.extend(a[a.len() - suffix..].iter().map(|l| (' ', *l)));

    // Hunks: runs of changes with their context, merged when close.
    let changed: Vec<usize> = (0..ops.len()).filter(|&k| ops[k].0 != ' ').collect();
    let mut out = Vec::new();
    let mut k = 0;
    while k < changed.len() {
        let start = changed[k].saturating_sub(CONTEXT);
        let mut end = changed[k];
        while k + 1 < changed.len() && changed[k + 1] <= end + 2 * CONTEXT + 1 {
            k += 1;
            end = changed[k];
        }
        let end = (end + CONTEXT + 1).min(ops.len());
        // Line numbers: count each side's lines before the hunk.
        let before_a = ops[..start].iter().filter(|o| o.0 != '+').count();
        let before_b = ops[..start].iter().filter(|o| o.0 != '-').count();
        let len_a = ops[start..end].iter().filter(|o| o.0 != '+').count();
        let len_b = ops[start..end].iter().filter(|o| o.0 != '-').count();
        out.push(format!(
            "@@ -{} +{} @@",
            range(before_a, len_a),
            range(before_b, len_b)
        ));
        out.extend(ops[start..end].iter().map(|(c, l)| format!("{c}{l}")));
        k += 1;
    }
    Some(out)
}

/// `start,len` as unified diffs number lines (1-based; `start` is the line
/// before an empty range).
fn range(before: usize, len: usize) -> String {
    match len {
        0 => format!("{before},0"),
        1 => format!("{}", before + 1),
        n => format!("{},{n}", before + 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(files: &[(&str, Option<&str>)]) -> StepTexts {
        StepTexts {
            hash: "h".into(),
            files: files
                .iter()
                .map(|(n, t)| (n.to_string(), t.map(str::to_owned)))
                .collect(),
        }
    }

    #[test]
    fn a_one_line_edit_is_a_short_hunk() {
        let old = "a\nb\nc\nd\ne\nf\ng\n";
        let new = "a\nb\nc\nD\ne\nf\ng\n";
        let lines = diff(
            &texts(&[("prompt", Some(old))]),
            &texts(&[("prompt", Some(new))]),
        );
        assert_eq!(
            lines,
            [
                "--- prompt",
                "+++ prompt",
                "@@ -2,5 +2,5 @@",
                " b",
                " c",
                "-d",
                "+D",
                " e",
                " f"
            ]
        );
    }

    #[test]
    fn insertions_deletions_and_far_apart_changes() {
        let old: String = (1..=30).map(|i| format!("{i}\n")).collect();
        let new: String = (1..=30)
            .filter(|i| *i != 25)
            .flat_map(|i| {
                let extra = (i == 3).then(|| "new\n".to_owned());
                std::iter::once(format!("{i}\n")).chain(extra)
            })
            .collect();
        let lines = line_diff(&old, &new).unwrap();
        assert_eq!(
            lines,
            [
                "@@ -2,4 +2,5 @@",
                " 2",
                " 3",
                "+new",
                " 4",
                " 5",
                "@@ -23,5 +24,4 @@",
                " 23",
                " 24",
                "-25",
                " 26",
                " 27",
            ]
        );
        // Everything added to an empty file.
        assert_eq!(line_diff("", "x\n").unwrap(), ["@@ -0,0 +1 @@", "+x"]);
    }

    #[test]
    fn long_diffs_are_capped_and_unknown_content_is_only_changed() {
        let old: String = (0..100).map(|i| format!("old {i}\n")).collect();
        let new: String = (0..100).map(|i| format!("new {i}\n")).collect();
        let lines = diff(
            &texts(&[("p", Some(&old)), ("big", None)]),
            &texts(&[("p", Some(&new)), ("big", Some("x"))]),
        );
        assert_eq!(lines.len(), MAX_DIFF_LINES + 1);
        assert_eq!(lines.last().unwrap(), "…");
        assert!(lines[0].starts_with("big changed (no diff"), "{lines:?}");
        // Added and removed files are named; equal ones are not.
        let lines = diff(
            &texts(&[("same", Some("x")), ("gone", Some("y"))]),
            &texts(&[("same", Some("x")), ("new", Some("z"))]),
        );
        assert_eq!(lines, ["gone removed", "new added"]);
    }

    #[test]
    fn the_store_keeps_copies_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), "proj");
        assert_eq!(store.load("a"), AgentTexts::default());
        let mut texts = AgentTexts::default();
        texts.steps.insert(
            "prompt".into(),
            self::tests::texts(&[("prompt", Some("hi"))]),
        );
        store.save("a", &texts).unwrap();
        assert_eq!(store.load("a"), texts);
        let mode = std::fs::metadata(dir.path().join("sent/proj/a.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn large_and_binary_files_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'a'; MAX_TEXT as usize + 1]).unwrap();
        assert_eq!(read_text(&big), None);
        let bin = dir.path().join("bin");
        std::fs::write(&bin, [0xff, 0xfe]).unwrap();
        assert_eq!(read_text(&bin), None);
        let ok = dir.path().join("ok");
        std::fs::write(&ok, "text\n").unwrap();
        assert_eq!(read_text(&ok).as_deref(), Some("text\n"));
        // A FIFO is not waited on.
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert_eq!(read_text(&fifo), None);
    }
}
