//! Unit tests of the graph and its hashes, on directories read by the real
//! manifest loader.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::*;
use crate::manifest::FileId;

/// A manifests directory in a tempdir, next to a `cache` directory that a
/// volume can share from outside it.
struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("manifests");
        std::fs::create_dir(&dir).unwrap();
        std::fs::create_dir(tmp.path().join("cache")).unwrap();
        Fixture { _tmp: tmp, dir }
    }

    fn write(&self, rel: &str, content: &str) -> &Self {
        let path = self.dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
        self
    }

    fn project(&self) -> Project {
        load(&self.dir)
    }
}

fn load(dir: &Path) -> Project {
    match crate::manifest::load_dir(dir) {
        Ok(p) => p,
        Err(d) => panic!("{:?}", miette::Report::new(d)),
    }
}

const CERT: &str = include_str!("../../tests/fixtures/graph/basic/certs/egress-ca.pem");
const OTHER_CERT: &str = include_str!("../../tests/fixtures/graph/other-ca.pem");

fn hashes(graph: &StepGraph) -> BTreeMap<(String, String), String> {
    graph
        .steps()
        .map(|(_, s)| ((s.agent.clone(), s.kind.id()), s.hash.clone()))
        .collect()
}

const FULL: &str = r#"
[bottle.dev]
image = "ghcr.io/acme/agent-base:1.2"
cpus = 2
memory_mib = 2048
user = "node"
env = { GIT_AUTHOR_NAME = "Bottle Bot", EDITOR = "vi" }
secrets = { GITHUB_TOKEN = { from_env = "GH_PAT" }, NPM = { from_file = "/run/npm" } }
volumes = ["./workspace:/workspace:ro", "../cache:/cache:ro"]

[bottle.dev.egress]
allow_hosts = ["api.anthropic.com", "github.com"]
allow_cidrs = ["10.8.0.0/16"]

[bottle.dev.ca]
cert = "certs/egress-ca.pem"

[bottle.dev.git]
gateway = "http://10.8.0.2:9418"
user = { name = "Bottle Bot", email = "bot@example.com" }
[[bottle.dev.git.remote]]
name = "app"
upstream = "git@github.com:acme/app.git"
[[bottle.dev.git.remote]]
name = "lib"
upstream = "git@github.com:acme/lib.git"

[bottle.dev.supervise]
url = "http://10.8.0.2:9100/"

[[bottle.dev.setup]]
name = "toolchain"
run = "apt-get install -y ripgrep"
after = ["ca"]
inputs = ["setup/packages.txt", "setup/scripts"]

[[bottle.dev.setup]]
name = "cache"
run = "/opt/bottle/setup/cache/warm.sh"
after = ["toolchain", "git"]
"#;

const AGENTS: &str = r#"
[agent.reviewer]
bottle = "dev"
prompt = "prompts/reviewer.md"
skills = ["skills/rust-review", "skills/docs"]

[agent.writer]
bottle = "dev"
prompt_text = "You write docs."
"#;

fn full_fixture() -> Fixture {
    let f = Fixture::new();
    f.write("dev.toml", FULL)
        .write(
            "agents/team.toml",
            &AGENTS
                .replace("\"prompts/", "\"../prompts/")
                .replace("\"skills/", "\"../skills/"),
        )
        .write("certs/egress-ca.pem", CERT)
        .write("prompts/reviewer.md", "You review Rust.\n")
        .write("skills/rust-review/SKILL.md", "# Rust review\n")
        .write(
            "skills/rust-review/scripts/check.sh",
            "#!/bin/sh\ncargo clippy\n",
        )
        .write("skills/docs/SKILL.md", "# Docs\n")
        .write("setup/packages.txt", "ripgrep\n")
        .write("setup/scripts/warm.sh", "#!/bin/sh\n");
    std::fs::create_dir_all(f.dir.join("workspace")).unwrap();
    f
}

fn build_ok(project: &Project) -> StepGraph {
    match build(project) {
        Ok(g) => g,
        Err(d) => panic!("{:?}", miette::Report::new(d)),
    }
}

fn deps(graph: &StepGraph, agent: &str, kind: &str) -> Vec<String> {
    let id = graph.find(agent, &kind.parse().unwrap()).unwrap();
    graph
        .dependencies(id)
        .into_iter()
        .map(|d| graph.step(d).kind.id())
        .collect()
}

fn ids(graph: &StepGraph, agent: &str) -> Vec<String> {
    graph.agent_steps(agent).map(|(_, s)| s.kind.id()).collect()
}

// ---- structure -------------------------------------------------------------

#[test]
fn nodes_and_edges_follow_the_step_table() {
    let f = full_fixture();
    let graph = build_ok(&f.project());
    assert_eq!(
        ids(&graph, "reviewer"),
        [
            "machine",
            "ca",
            "prompt",
            "skills",
            "git",
            "setup:toolchain",
            "setup:cache",
            "supervise"
        ]
    );
    assert!(deps(&graph, "reviewer", "machine").is_empty());
    assert_eq!(deps(&graph, "reviewer", "ca"), ["machine"]);
    assert_eq!(deps(&graph, "reviewer", "prompt"), ["machine"]);
    assert_eq!(deps(&graph, "reviewer", "skills"), ["machine"]);
    assert_eq!(deps(&graph, "reviewer", "git"), ["machine", "ca"]);
    assert_eq!(
        deps(&graph, "reviewer", "setup:toolchain"),
        ["machine", "ca"]
    );
    assert_eq!(
        deps(&graph, "reviewer", "setup:cache"),
        ["machine", "git", "setup:toolchain"]
    );
    assert_eq!(
        deps(&graph, "reviewer", "supervise"),
        [
            "machine",
            "ca",
            "prompt",
            "skills",
            "git",
            "setup:toolchain",
            "setup:cache"
        ]
    );
    // No skills: no skills step, and supervise does not wait for one.
    assert!(graph.find("writer", &StepKind::Skills).is_none());
    assert!(!deps(&graph, "writer", "supervise").contains(&"skills".to_owned()));
    // Dependents mirror dependencies.
    let machine = graph.find("writer", &StepKind::Machine).unwrap();
    assert_eq!(
        graph.dependents(machine).len(),
        graph.agent_steps("writer").count() - 1
    );
    assert_eq!(graph.bottle_of("writer"), Some("dev"));
    assert_eq!(graph.agents().collect::<Vec<_>>(), ["reviewer", "writer"]);
}

#[test]
fn absent_sections_have_no_steps() {
    let f = Fixture::new();
    f.write("m.toml", "[bottle.bare]\n[agent.solo]\nbottle = \"bare\"\n");
    let graph = build_ok(&f.project());
    assert_eq!(ids(&graph, "solo"), ["machine", "prompt"]);
    assert_eq!(graph.len(), 2);
    assert!(graph.get("solo", &StepKind::Ca).is_none());
    assert!(graph.get("nobody", &StepKind::Machine).is_none());
    assert_eq!(graph.agent_steps("nobody").count(), 0);
}

#[test]
fn git_without_ca_runs_after_machine_only() {
    let f = Fixture::new();
    f.write(
        "m.toml",
        "[bottle.b.git]\ngateway = \"http://gw\"\n[agent.a]\nbottle = \"b\"\n",
    );
    let graph = build_ok(&f.project());
    assert_eq!(deps(&graph, "a", "git"), ["machine"]);
}

#[test]
fn order_is_topological_and_ids_are_positions() {
    let f = Fixture::new();
    // Declared out of order: `first` runs after `second`.
    f.write(
        "m.toml",
        r#"
[bottle.b]
[[bottle.b.setup]]
name = "first"
run = "true"
after = ["second", "prompt"]
[[bottle.b.setup]]
name = "second"
run = "true"
[agent.z]
bottle = "b"
[agent.a]
bottle = "b"
"#,
    );
    let graph = build_ok(&f.project());
    assert_eq!(
        ids(&graph, "a"),
        ["machine", "prompt", "setup:second", "setup:first"]
    );
    let all: Vec<_> = graph.steps().collect();
    assert_eq!(all.len(), 8);
    for (pos, (id, step)) in all.iter().enumerate() {
        assert_eq!(id.index(), pos);
        for dep in graph.dependencies(*id) {
            assert!(dep.index() < pos, "{} before its dependency", step.kind);
            assert_eq!(graph.step(dep).agent, step.agent, "no edge across agents");
        }
    }
    assert_eq!(all[0].1.agent, "a");
    assert_eq!(all[4].1.agent, "z");
}

#[test]
fn step_ids_round_trip() {
    for kind in [
        StepKind::Machine,
        StepKind::Ca,
        StepKind::Prompt,
        StepKind::Skills,
        StepKind::Git,
        StepKind::Setup("toolchain".into()),
        StepKind::Supervise,
    ] {
        assert_eq!(kind.id().parse::<StepKind>().unwrap(), kind);
    }
    assert_eq!(StepKind::Setup("x".into()).to_string(), "setup:x");
    assert!("setup:".parse::<StepKind>().is_err());
    assert!("network".parse::<StepKind>().is_err());
}

#[test]
fn after_naming_an_absent_or_unknown_step_does_not_panic() {
    let f = Fixture::new();
    f.write(
        "m.toml",
        r#"
[bottle.b]
[[bottle.b.setup]]
name = "s"
run = "true"
[agent.a]
bottle = "b"
"#,
    );
    // The loader rejects these names; the graph must still cope.
    let mut project = f.project();
    let after = &mut project.bottles.get_mut("b").unwrap().spec.setup[0].after;
    after.extend(["ca", "git", "nonexistent", "supervise"].map(String::from));
    let graph = build_ok(&project);
    assert_eq!(deps(&graph, "a", "setup:s"), ["machine"]);
}

// ---- cycles ----------------------------------------------------------------

fn cycle_fixture() -> Fixture {
    let f = Fixture::new();
    f.write(
        "m.toml",
        r#"[bottle.b]

[[bottle.b.setup]]
name = "one"
run = "true"
after = ["prompt", "three"]

[[bottle.b.setup]]
name = "two"
run = "true"
after = ["one"]

[[bottle.b.setup]]
name = "three"
run = "true"
after = ["two"]

[[bottle.b.setup]]
name = "fine"
run = "true"
after = ["one"]

[agent.a]
bottle = "b"

[agent.c]
bottle = "b"
"#,
    );
    f
}

#[test]
fn a_cycle_is_one_diagnostic_per_bottle_labelling_each_after_entry() {
    // The loader reports it, with every other problem of the manifests.
    let f = cycle_fixture();
    let err = crate::manifest::load_dir(&f.dir).unwrap_err();
    assert_eq!(err.items.len(), 1, "reported once, not once per agent");
    let d = &err.items[0];
    assert_eq!(d.code, "bottle::dependency-cycle");
    assert_eq!(
        d.message,
        "setup steps of bottle `b` wait for each other in a cycle: `one` runs after `three`, \
         which runs after `two`, which runs after `one`"
    );
    let text = std::fs::read_to_string(f.dir.join("m.toml")).unwrap();
    let labelled: Vec<(&str, String)> = d
        .labels
        .iter()
        .map(|l| {
            let span = &text[l.offset()..l.offset() + l.len()];
            (span, l.label().unwrap().to_owned())
        })
        .collect();
    assert_eq!(
        labelled,
        [
            ("\"three\"", "`one` runs after `three`".to_owned()),
            ("\"one\"", "`two` runs after `one`".to_owned()),
            ("\"two\"", "`three` runs after `two`".to_owned()),
        ]
    );
    assert!(d.help.as_deref().unwrap().contains("remove one"));
}

#[test]
fn a_step_after_itself_and_after_supervise_are_cycles() {
    let f = Fixture::new();
    f.write(
        "m.toml",
        r#"
[bottle.b.supervise]
url = "http://op/"
[[bottle.b.setup]]
name = "me"
run = "true"
[[bottle.b.setup]]
name = "late"
run = "true"
[agent.a]
bottle = "b"
"#,
    );
    // The loader rejects both (`after = ["supervise"]` outright, the other
    // as a cycle); should they ever reach the graph, they are cycles, not a
    // hang or a panic.
    let mut project = f.project();
    let setup = &mut project.bottles.get_mut("b").unwrap().spec.setup;
    setup[0].after.push("me".into());
    setup[1].after.push("supervise".into());
    let text = project
        .sources
        .get(FileId(0))
        .text
        .replace(
            "name = \"me\"\nrun = \"true\"\n",
            "name = \"me\"\nrun = \"true\"\nafter = [\"me\"]\n",
        )
        .replace(
            "name = \"late\"\nrun = \"true\"\n",
            "name = \"late\"\nrun = \"true\"\nafter = [\"supervise\"]\n",
        );
    let path = project.sources.path(FileId(0)).to_owned();
    let mut sources = crate::manifest::Sources::default();
    sources.add(path, "m.toml".into(), text.into());
    project.sources = sources;
    let err = build(&project).unwrap_err();
    assert_eq!(err.items.len(), 2);
    assert!(err.items[0].message.ends_with("`me` runs after `me`"));
    assert_eq!(err.items[0].labels.len(), 1);
    let late = &err.items[1];
    assert!(
        late.message.contains("`late` runs after `supervise`"),
        "{}",
        late.message
    );
    assert_eq!(late.labels.len(), 1);
    let label = &late.labels[0];
    let text = &project.sources.get(FileId(0)).text;
    assert_eq!(
        &text[label.offset()..label.offset() + label.len()],
        "\"supervise\""
    );
    assert!(
        late.help
            .as_deref()
            .unwrap()
            .contains("remove it from `after`")
    );
}

// ---- hash stability ----------------------------------------------------------

#[test]
fn hashes_are_stable_across_file_order_key_order_and_runs() {
    let f = full_fixture();
    let first = hashes(&build_ok(&f.project()));
    assert_eq!(first, hashes(&build_ok(&f.project())));

    // The same settings written in another order, in files that sort the
    // other way round (in the same directory: volumes mount absolute paths).
    let g = &f;
    let shuffled = FULL
        .replace(
            "env = { GIT_AUTHOR_NAME = \"Bottle Bot\", EDITOR = \"vi\" }",
            "env = { EDITOR = \"vi\", GIT_AUTHOR_NAME = \"Bottle Bot\" }",
        )
        .replace(
            "allow_hosts = [\"api.anthropic.com\", \"github.com\"]",
            "allow_hosts = [\"github.com\", \"api.anthropic.com\", \"github.com\"]",
        )
        .replace(
            "inputs = [\"setup/packages.txt\", \"setup/scripts\"]",
            "inputs = [\"setup/scripts\", \"setup/packages.txt\"]",
        );
    // Swap the two remotes.
    let shuffled = shuffled.replace(
        "name = \"app\"\nupstream = \"git@github.com:acme/app.git\"\n[[bottle.dev.git.remote]]\nname = \"lib\"\nupstream = \"git@github.com:acme/lib.git\"",
        "name = \"lib\"\nupstream = \"git@github.com:acme/lib.git\"\n[[bottle.dev.git.remote]]\nname = \"app\"\nupstream = \"git@github.com:acme/app.git\"",
    );
    assert_ne!(shuffled, FULL);
    let agents = AGENTS.replace(
        "skills = [\"skills/rust-review\", \"skills/docs\"]",
        "skills = [\"skills/docs\", \"skills/rust-review\"]",
    );
    std::fs::remove_file(g.dir.join("dev.toml")).unwrap();
    std::fs::remove_file(g.dir.join("agents/team.toml")).unwrap();
    g.write("z.toml", &agents).write(
        "nested/deeper/a.toml",
        &shuffled
            .replace("\"certs/", "\"../../certs/")
            .replace("\"setup/", "\"../../setup/")
            .replace("./workspace", "../../workspace")
            .replace("../cache", "../../../cache"),
    );
    let other = hashes(&build_ok(&g.project()));
    assert_eq!(first, other);
    assert!(!g.dir.join("dev.toml").exists());
}

#[test]
fn moving_the_manifests_directory_keeps_hashes_except_volume_mounts() {
    let f = full_fixture();
    let before_project = f.project();
    let before = build_ok(&before_project);
    let moved = f._tmp.path().join("elsewhere/renamed");
    std::fs::create_dir_all(moved.parent().unwrap().join("cache")).unwrap();
    std::fs::rename(&f.dir, &moved).unwrap();
    let after_project = load(&moved);
    let after = build_ok(&after_project);
    for ((id, a), (_, b)) in before.steps().zip(after.steps()) {
        if a.kind == StepKind::Machine {
            // `./workspace` is mounted from its new absolute place.
            assert_ne!(a.hash, b.hash);
        } else {
            assert_eq!(
                a.hash,
                b.hash,
                "{} of {} (#{})",
                a.kind,
                a.agent,
                id.index()
            );
        }
    }
    let (mb, ma) = (
        before.machine_hashes("reviewer").unwrap(),
        after.machine_hashes("reviewer").unwrap(),
    );
    assert_eq!(
        mb.spec_hash, ma.spec_hash,
        "moving must never replace a machine"
    );
    assert_ne!(mb.mutable.volumes, ma.mutable.volumes);
    assert_eq!(mb.mutable.env, ma.mutable.env);

    // Without volumes, every hash survives the move.
    let g = full_fixture();
    g.write(
        "dev.toml",
        &FULL.replace(
            "volumes = [\"./workspace:/workspace:ro\", \"../cache:/cache:ro\"]",
            "",
        ),
    );
    let before = hashes(&build_ok(&g.project()));
    let moved = g._tmp.path().join("moved");
    std::fs::rename(&g.dir, &moved).unwrap();
    assert_eq!(before, hashes(&build_ok(&load(&moved))));
}

// ---- hash sensitivity --------------------------------------------------------

/// Apply `change` to a fresh full fixture and return the steps of
/// `reviewer` whose hash changed.
fn changed_by(change: impl FnOnce(&Fixture)) -> Vec<String> {
    let f = full_fixture();
    let before = hashes(&build_ok(&f.project()));
    change(&f);
    let after = hashes(&build_ok(&f.project()));
    let mut changed: Vec<String> = before
        .iter()
        .filter(|((agent, _), _)| agent == "reviewer")
        .filter(|(k, v)| after.get(*k) != Some(*v))
        .map(|((_, step), _)| step.clone())
        .collect();
    changed.sort();
    changed
}

fn edit(f: &Fixture, file: &str, from: &str, to: &str) {
    let path = f.dir.join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{from:?} not in {file}");
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

#[cfg(unix)]
fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn each_input_changes_exactly_its_steps() {
    let m = "dev.toml";
    type Change = Box<dyn FnOnce(&Fixture)>;
    let cases: Vec<(&str, Change, &[&str])> = vec![
        (
            "image",
            Box::new(|f| edit(f, m, "base:1.2", "base:1.3")),
            &["machine"],
        ),
        (
            "cpus",
            Box::new(|f| edit(f, m, "cpus = 2", "cpus = 4")),
            &["machine"],
        ),
        (
            "memory",
            Box::new(|f| edit(f, m, "memory_mib = 2048", "memory_mib = 4096")),
            &["machine"],
        ),
        (
            "env",
            Box::new(|f| edit(f, m, "EDITOR = \"vi\"", "EDITOR = \"ed\"")),
            &["machine"],
        ),
        (
            "secret",
            Box::new(|f| edit(f, m, "\"GH_PAT\"", "\"GH_TOKEN\"")),
            &["machine"],
        ),
        (
            "volume",
            Box::new(|f| edit(f, m, "/cache:ro", "/cache")),
            &["machine"],
        ),
        (
            // The gate enforces them, live: no machine or step changes.
            "allow_hosts",
            Box::new(|f| edit(f, m, "\"github.com\"]", "\"gitlab.com\"]")),
            &[],
        ),
        (
            "allow_cidrs",
            Box::new(|f| edit(f, m, "10.8.0.0/16", "10.9.0.0/16")),
            &["machine"],
        ),
        (
            "user",
            Box::new(|f| edit(f, m, "user = \"node\"", "user = \"dev\"")),
            // `setup:cache` comes after `git`, which re-runs.
            &[
                "git",
                "machine",
                "prompt",
                "setup:cache",
                "skills",
                "supervise",
            ],
        ),
        (
            "cert content",
            Box::new(|f| {
                f.write("certs/egress-ca.pem", OTHER_CERT);
            }),
            // toolchain comes after ca, cache after toolchain.
            &["ca", "setup:cache", "setup:toolchain"],
        ),
        (
            "cert path",
            Box::new(|f| {
                let certs = f.dir.join("certs");
                std::fs::rename(certs.join("egress-ca.pem"), certs.join("proxy.pem")).unwrap();
                edit(f, m, "egress-ca.pem", "proxy.pem");
            }),
            &["ca", "setup:cache", "setup:toolchain"],
        ),
        (
            "skill directory name",
            Box::new(|f| {
                let skills = f.dir.join("skills");
                std::fs::rename(skills.join("docs"), skills.join("docs2")).unwrap();
                edit(f, "agents/team.toml", "skills/docs\"", "skills/docs2\"");
            }),
            &["skills"],
        ),
        (
            "prompt content",
            Box::new(|f| edit(f, "prompts/reviewer.md", "Rust", "Go")),
            &["prompt"],
        ),
        (
            "prompt file to identical text",
            Box::new(|f| {
                edit(
                    f,
                    "agents/team.toml",
                    "prompt = \"../prompts/reviewer.md\"",
                    "prompt_text = \"You review Rust.\\n\"",
                )
            }),
            &[],
        ),
        (
            "skill file content",
            Box::new(|f| edit(f, "skills/docs/SKILL.md", "Docs", "Documents")),
            &["skills"],
        ),
        (
            "skill file added",
            Box::new(|f| {
                f.write("skills/docs/extra.md", "");
            }),
            &["skills"],
        ),
        (
            "skill file renamed",
            Box::new(|f| {
                let scripts = f.dir.join("skills/rust-review/scripts");
                std::fs::rename(scripts.join("check.sh"), scripts.join("lint.sh")).unwrap()
            }),
            &["skills"],
        ),
        (
            "skill empty dir added",
            Box::new(|f| std::fs::create_dir(f.dir.join("skills/docs/empty")).unwrap()),
            &["skills"],
        ),
        #[cfg(unix)]
        (
            "skill exec bit",
            Box::new(|f| chmod(&f.dir.join("skills/rust-review/scripts/check.sh"), 0o755)),
            &["skills"],
        ),
        #[cfg(unix)]
        (
            "skill file mode without an exec bit",
            Box::new(|f| chmod(&f.dir.join("skills/docs/SKILL.md"), 0o600)),
            &["skills"],
        ),
        #[cfg(unix)]
        (
            "skill directory mode",
            Box::new(|f| chmod(&f.dir.join("skills/rust-review/scripts"), 0o700)),
            &["skills"],
        ),
        #[cfg(unix)]
        (
            "setup input mode",
            Box::new(|f| chmod(&f.dir.join("setup/packages.txt"), 0o600)),
            // cache comes after toolchain: it runs again too.
            &["setup:cache", "setup:toolchain"],
        ),
        #[cfg(unix)]
        (
            "skill symlink",
            Box::new(|f| {
                std::os::unix::fs::symlink("SKILL.md", f.dir.join("skills/docs/link")).unwrap()
            }),
            &["skills"],
        ),
        (
            "skill removed",
            Box::new(|f| edit(f, "agents/team.toml", ", \"../skills/docs\"", "")),
            &["skills"],
        ),
        (
            "gateway",
            Box::new(|f| edit(f, m, "10.8.0.2:9418", "10.8.0.3:9418")),
            &["git", "setup:cache"],
        ),
        (
            "git email",
            Box::new(|f| edit(f, m, "bot@example.com", "bot@example.org")),
            &["git", "setup:cache"],
        ),
        (
            "remote upstream",
            Box::new(|f| edit(f, m, "acme/lib.git", "acme/lib2.git")),
            &["git", "setup:cache"],
        ),
        (
            "supervise url",
            Box::new(|f| edit(f, m, "10.8.0.2:9100", "10.8.0.2:9101")),
            &["supervise"],
        ),
        (
            "setup run",
            Box::new(|f| edit(f, m, "-y ripgrep", "-y fd-find")),
            // cache comes after toolchain: it runs again too.
            &["setup:cache", "setup:toolchain"],
        ),
        (
            "setup input file",
            Box::new(|f| edit(f, "setup/packages.txt", "ripgrep", "fd")),
            &["setup:cache", "setup:toolchain"],
        ),
        (
            "setup input dir content",
            Box::new(|f| edit(f, "setup/scripts/warm.sh", "#!/bin/sh", "#!/bin/bash")),
            &["setup:cache", "setup:toolchain"],
        ),
        (
            "setup after: a step it no longer comes after",
            Box::new(|f| {
                edit(
                    f,
                    m,
                    "after = [\"toolchain\", \"git\"]",
                    "after = [\"toolchain\"]",
                )
            }),
            &["setup:cache"],
        ),
    ];
    for (what, change, expected) in cases {
        assert_eq!(changed_by(change), expected, "changing {what}");
    }
}

#[test]
fn removing_or_adding_a_section_changes_the_machine_spec_only_where_it_must() {
    let f = full_fixture();
    let before = build_ok(&f.project());
    edit(
        &f,
        "dev.toml",
        "[bottle.dev.egress]\nallow_hosts = [\"api.anthropic.com\", \"github.com\"]\nallow_cidrs = [\"10.8.0.0/16\"]\n",
        "",
    );
    let after = build_ok(&f.project());
    let (b, a) = (
        before.machine_hashes("reviewer").unwrap(),
        after.machine_hashes("reviewer").unwrap(),
    );
    assert_ne!(b.spec_hash, a.spec_hash);
    let differing: Vec<_> = b
        .fields
        .iter()
        .filter(|(k, v)| a.fields.get(*k) != Some(*v))
        .map(|(k, _)| *k)
        .collect();
    assert_eq!(
        differing,
        ["egress", "egress.allow_cidrs", "egress.allow_hosts"]
    );

    // An empty egress table (which the loader refuses) is not the same as
    // none.
    let mut project = f.project();
    project.bottles.get_mut("dev").unwrap().spec.egress = Some(Default::default());
    let empty = build_ok(&project);
    let e = empty.machine_hashes("reviewer").unwrap();
    assert_ne!(e.fields["egress"], a.fields["egress"]);
    assert_eq!(
        e.fields["egress.allow_hosts"],
        a.fields["egress.allow_hosts"]
    );
}

#[test]
fn mutable_settings_do_not_touch_the_spec_hash() {
    let f = full_fixture();
    let before = build_ok(&f.project())
        .machine_hashes("writer")
        .unwrap()
        .clone();
    edit(&f, "dev.toml", "cpus = 2", "cpus = 3");
    edit(&f, "dev.toml", "memory_mib = 2048", "memory_mib = 1024");
    edit(&f, "dev.toml", "EDITOR = \"vi\"", "EDITOR = \"ed\"");
    edit(&f, "dev.toml", "/cache:ro", "/cache");
    let after = build_ok(&f.project())
        .machine_hashes("writer")
        .unwrap()
        .clone();
    assert_eq!(before.spec_hash, after.spec_hash);
    assert_eq!(before.fields, after.fields);
    assert_eq!((after.mutable.cpus, after.mutable.memory_mib), (3, 1024));
    assert_ne!(before.mutable.env, after.mutable.env);
    assert_ne!(before.mutable.volumes, after.mutable.volumes);
}

// ---- golden values -----------------------------------------------------------

/// These values are stored in machine labels and guest ledgers. If this test
/// fails, the hash inputs changed: every existing machine would be REPLACED
/// (spec hash) or every step re-run (step hashes). If that is intended, bump
/// the version tag in `hash.rs`, update the contract table, then the values.
#[test]
fn golden_hashes() {
    let f = Fixture::new();
    f.write(
        "m.toml",
        r#"
[bottle.gold]
image = "ghcr.io/acme/agent-base:1.2"
cpus = 2
memory_mib = 2048
secrets = { GITHUB_TOKEN = { from_env = "GH_PAT" } }
[bottle.gold.egress]
allow_hosts = ["api.anthropic.com"]
allow_cidrs = ["10.8.0.0/16"]
[bottle.gold.supervise]
url = "http://10.8.0.2:9100/"
[agent.au]
bottle = "gold"
prompt_text = "Hello."
"#,
    );
    let graph = build_ok(&f.project());
    let m = graph.machine_hashes("au").unwrap();
    let got_spec = m.spec_hash.clone();
    let got_fields: Vec<String> = m.fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let got_steps: Vec<String> = graph
        .agent_steps("au")
        .map(|(_, s)| format!("{}={}", s.kind, s.hash))
        .collect();
    // `allow_hosts` gives this bottle a gate (DESIGN.md section 9): its
    // `egress` and `egress.allow_hosts` fields changed with that, on
    // purpose (machines created with `--allow-host` move to the gate by
    // replacement), and it gained a `ca` step. The other fields and steps
    // are as before the gate.
    let expected_spec = "bb425731e906e597cbe0dfeae5ffa7ea8f3a5f1f26813aa0041da851a2bb7634";
    let expected_fields = [
        "egress=85a1ec01f190",
        "egress.allow_cidrs=05a6a6481d1c",
        "egress.allow_hosts=ca9b0e4e4a53",
        "image=02c828f0d89b",
        "secrets=2b5f445f81a3",
    ];
    let expected_steps = [
        "machine=74e3241368adab92da86233b1f93e2e65a200be309560bb013d3b0a7858ad447",
        "ca=a0cccd0ab2a91194807e9473a9d9c0e0d2123a08af49f4d374157245f9591a6c",
        "prompt=b6527d898107fc3b44c60144e26099aa9ee925a04d8dfafbafe0041406beec96",
        "supervise=ec6cab3873f75a9dc8062aa274a40b57135e4d5c595ce0b4046d3a367e55e4d3",
    ];
    assert!(
        got_spec == expected_spec && got_fields == expected_fields && got_steps == expected_steps,
        "the hash inputs changed: every machine would be replaced and every step re-run.\n\
         got spec {got_spec}\n    fields {got_fields:#?}\n    steps {got_steps:#?}"
    );
    assert_eq!(m.mutable.cpus, 2);
}

#[test]
fn tree_digest_of_a_file_and_a_directory_differ() {
    let f = Fixture::new();
    f.write("one/x", "same");
    f.write("x", "same");
    let file = hash::tree_digest(&f.dir.join("x"), &f.dir).unwrap();
    let dir = hash::tree_digest(&f.dir.join("one"), &f.dir).unwrap();
    assert_ne!(file, dir);
    // A file's tree digest depends on its content, not its name.
    f.write("y", "same");
    assert_eq!(file, hash::tree_digest(&f.dir.join("y"), &f.dir).unwrap());
}

// ---- unreadable inputs ---------------------------------------------------------

#[test]
fn a_file_gone_after_loading_is_a_diagnostic_not_a_panic() {
    let f = full_fixture();
    let project = f.project();
    std::fs::remove_file(f.dir.join("prompts/reviewer.md")).unwrap();
    std::fs::remove_dir_all(f.dir.join("skills/docs")).unwrap();
    let err = build(&project).unwrap_err();
    let messages: Vec<&str> = err.items.iter().map(|d| d.message.as_str()).collect();
    assert_eq!(messages.len(), 2, "{messages:#?}");
    assert!(
        messages[0].starts_with("cannot read prompt file `prompts/reviewer.md`"),
        "{}",
        messages[0]
    );
    assert!(
        messages[1].starts_with("cannot read skill directory `skills/docs`"),
        "{}",
        messages[1]
    );
    assert!(
        err.items
            .iter()
            .all(|d| d.labels.len() == 1 && d.help.is_some())
    );
}

/// Links below a skill or a setup input follow the rule the loader applies
/// to the paths themselves: nothing outside the manifests directory.
#[cfg(unix)]
#[test]
fn nested_links_that_leave_the_manifests_directory_are_refused() {
    use std::os::unix::fs::symlink;
    let escaping: [(&str, &str); 5] = [
        ("skills/docs/shadow", "/etc/shadow"),
        ("skills/docs/etc", "../../../etc"),
        ("setup/scripts/passwd", "/etc/passwd"),
        // A dangling link, and one that climbs through another link.
        ("skills/rust-review/gone", "../../../nowhere/at/all"),
        ("skills/rust-review/up2", "up/../.."),
    ];
    for (link, target) in escaping {
        let f = full_fixture();
        // Inside the manifests directory: followed to check, never refused.
        symlink("..", f.dir.join("skills/rust-review/up")).unwrap();
        symlink("../docs/SKILL.md", f.dir.join("skills/rust-review/docs.md")).unwrap();
        symlink(target, f.dir.join(link)).unwrap();
        let err = build(&f.project()).unwrap_err();
        assert_eq!(err.items.len(), 1, "{link}: {:#?}", err.items);
        let d = &err.items[0];
        assert_eq!(d.code, "bottle::path-escapes", "{link}");
        let name = link.rsplit('/').next().unwrap();
        assert!(
            d.message.contains("outside the manifests directory")
                && d.message.contains(&format!("`{name}` -> `{target}`")),
            "{link}: {}",
            d.message
        );
        assert_eq!(d.labels.len(), 1, "{link}: points at the key");
        assert!(
            d.help.as_deref().unwrap_or("").contains("replace"),
            "{link}"
        );
    }
    // The links inside alone are fine.
    let f = full_fixture();
    symlink("..", f.dir.join("skills/rust-review/up")).unwrap();
    symlink("../docs/SKILL.md", f.dir.join("skills/rust-review/docs.md")).unwrap();
    build_ok(&f.project());
}

/// What a probe reads of an agent's skills in the guest is bounded; the
/// manifests may not declare more, or the guest would always look drifted.
#[test]
fn skills_larger_than_a_probe_reads_are_refused() {
    use super::digests::{Budget, Digests};
    let f = full_fixture();
    // Over the budget in all, not per skill (a smaller budget than the
    // real one, so the test reads little).
    f.write("skills/docs/data.bin", &"x".repeat(600));
    f.write("skills/rust-review/data.bin", &"x".repeat(600));
    let project = f.project();
    let digests = Digests::compute(&project).unwrap();
    let budget = Budget {
        prompt_bytes: 1 << 20,
        skill_bytes: 1000,
        skill_entries: 100,
    };
    let problems = digests.over_budget(&project, &budget);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert_eq!(problems[0].code, "bottle::too-large");
    assert!(
        problems[0]
            .message
            .starts_with("the skills of agent `reviewer` hold "),
        "{}",
        problems[0].message
    );
    assert_eq!(problems[0].labels.len(), 1);
    let entries = Budget {
        skill_bytes: 1 << 20,
        skill_entries: 5,
        ..budget
    };
    assert_eq!(digests.over_budget(&project, &entries).len(), 1);
    let prompt = Budget {
        prompt_bytes: 5,
        skill_bytes: 1 << 20,
        ..budget
    };
    assert!(
        digests.over_budget(&project, &prompt)[0]
            .message
            .starts_with("the prompt file of agent `reviewer` holds 17 bytes")
    );
    build_ok(&project);

    // A 2 TiB sparse file is refused without being read, here as in the
    // guest.
    std::fs::File::create(f.dir.join("skills/docs/data.bin"))
        .unwrap()
        .set_len(2 << 40)
        .unwrap();
    let err = build(&f.project()).unwrap_err();
    assert_eq!(err.items.len(), 1, "{:#?}", err.items);
    assert_eq!(err.items[0].code, "bottle::too-large");
}

// ---- rendering -----------------------------------------------------------------

#[test]
fn dot_draws_the_order_without_implied_edges() {
    let graph = build_ok(&full_fixture().project());
    let dot = graph.to_dot();
    let edges: Vec<&str> = dot
        .lines()
        .filter(|l| l.contains("->") && l.contains("reviewer/"))
        .map(str::trim)
        .collect();
    assert_eq!(
        edges,
        [
            // The bottle's gate comes before its agents' machines.
            r#""gate/dev" -> "reviewer/machine";"#,
            r#""reviewer/machine" -> "reviewer/ca";"#,
            r#""reviewer/machine" -> "reviewer/prompt";"#,
            r#""reviewer/machine" -> "reviewer/skills";"#,
            r#""reviewer/ca" -> "reviewer/git";"#,
            r#""reviewer/ca" -> "reviewer/setup:toolchain";"#,
            r#""reviewer/prompt" -> "reviewer/supervise";"#,
            r#""reviewer/skills" -> "reviewer/supervise";"#,
            r#""reviewer/git" -> "reviewer/setup:cache";"#,
            r#""reviewer/setup:toolchain" -> "reviewer/setup:cache";"#,
            r#""reviewer/setup:cache" -> "reviewer/supervise";"#,
        ]
    );
    assert_eq!(dot, graph.to_dot(), "deterministic");
}

#[test]
fn text_lists_every_direct_dependency() {
    let graph = build_ok(&full_fixture().project());
    let text = graph.to_text();
    let supervise = text
        .lines()
        .find(|l| l.trim_start().starts_with("supervise"))
        .unwrap();
    assert!(
        supervise.ends_with("after machine, ca, prompt, skills, git, setup:toolchain, setup:cache"),
        "{supervise}"
    );
    let f = full_fixture();
    let mut project = f.project();
    project.agents.clear();
    assert_eq!(build_ok(&project).to_text(), "no agents\n");
}
