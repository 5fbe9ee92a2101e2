//! `bottle validate` as a user runs it: the real binary on fixture
//! directories, with every rendered diagnostic snapshotted exactly as the
//! CLI prints it (NO_COLOR, so plain text).
//!
//! Fixtures live in `tests/fixtures/invalid/<case>/`; cases that need
//! symlinks, a private key or a particular directory name are built in a
//! temporary directory, whose path is filtered out of the snapshot.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/invalid")
}

/// Run `bottle validate <dir>` in `cwd`; the exit code, stdout and stderr.
fn run_in(cwd: &Path, dir: &str) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bottle"))
        .arg("validate")
        .arg(dir)
        .current_dir(cwd)
        .env("NO_COLOR", "1")
        .env_remove("BOTTLE_RUNTIME")
        .env_remove("BOTTLE_SMOLVM")
        .env_remove("BOTTLE_STATE_DIR")
        .output()
        .expect("bottle runs");
    (
        out.status.code().expect("exited"),
        String::from_utf8(out.stdout).expect("utf-8 stdout"),
        String::from_utf8(out.stderr).expect("utf-8 stderr"),
    )
}

fn render(code: i32, stdout: &str, stderr: &str) -> String {
    format!("exit: {code}\n--- stdout\n{stdout}--- stderr\n{stderr}")
}

/// Validate a committed fixture, run from the fixtures directory so paths
/// in the output read `<case>/file.toml`.
fn validate(case: &str) -> String {
    let (code, stdout, stderr) = run_in(&fixtures(), case);
    assert_eq!(code, 1, "{case} should be invalid:\n{stdout}{stderr}");
    render(code, &stdout, &stderr)
}

/// Snapshot with the temporary directory's path filtered out.
fn snapshot_tmp(name: &str, tmp: &Path, output: &str) {
    let mut settings = insta::Settings::clone_current();
    let canonical = fs::canonicalize(tmp).unwrap();
    for path in [canonical.as_path(), tmp] {
        settings.add_filter(&regex_escape(&path.display().to_string()), "[TMP]");
    }
    settings.bind(|| insta::assert_snapshot!(name, output));
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let special = "\\.+*?()|[]{}^$#&-~".contains(c);
            special.then_some('\\').into_iter().chain([c])
        })
        .collect()
}

/// Copy a fixture into a fresh temporary directory (as `<tmp>/<case>`).
fn copy_fixture(case: &str) -> tempfile::TempDir {
    fn copy(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for entry in fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    copy(&fixtures().join(case), &tmp.path().join(case));
    tmp
}

#[test]
fn examples_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (code, stdout, stderr) = run_in(root, "manifests");
    assert_eq!(code, 0, "{stdout}{stderr}");
    insta::assert_snapshot!(render(code, &stdout, &stderr));
}

#[test]
fn derived_project_name_is_explained() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("Acme Tools").join("manifests");
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("dev.toml"),
        "[bottle.dev]\n\n[agent.reviewer]\nbottle = \"dev\"\n",
    )
    .unwrap();
    let (code, stdout, stderr) = run_in(&tmp.path().join("Acme Tools"), "manifests");
    assert_eq!(code, 0, "{stdout}{stderr}");
    insta::assert_snapshot!(render(code, &stdout, &stderr));
}

#[test]
fn syntax_error() {
    insta::assert_snapshot!(validate("syntax-error"));
}

#[test]
fn wrong_type() {
    insta::assert_snapshot!(validate("wrong-type"));
}

#[test]
fn wrong_shape() {
    insta::assert_snapshot!(validate("wrong-shape"));
}

#[test]
fn unknown_key() {
    insta::assert_snapshot!(validate("unknown-key"));
}

#[test]
fn unknown_bottle() {
    insta::assert_snapshot!(validate("unknown-bottle"));
}

#[test]
fn duplicate_name() {
    insta::assert_snapshot!(validate("duplicate-name"));
}

#[test]
fn missing_paths() {
    insta::assert_snapshot!(validate("missing-paths"));
}

#[test]
fn path_escape() {
    insta::assert_snapshot!(validate("path-escape"));
}

#[test]
fn symlink_escape() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    let dir = tmp.path().join("manifests");
    fs::create_dir_all(outside.join("skill")).unwrap();
    fs::write(outside.join("skill/SKILL.md"), "---\nname: x\n---\n").unwrap();
    fs::write(outside.join("prompt.md"), "outside\n").unwrap();
    fs::create_dir_all(dir.join("skills")).unwrap();
    std::os::unix::fs::symlink(outside.join("skill"), dir.join("skills/linked")).unwrap();
    std::os::unix::fs::symlink(outside.join("prompt.md"), dir.join("prompt.md")).unwrap();
    fs::write(
        dir.join("dev.toml"),
        "[bottle.dev]\n\n[agent.reviewer]\nbottle = \"dev\"\nprompt = \"prompt.md\"\n\
         skills = [\"skills/linked\"]\n",
    )
    .unwrap();
    let (code, stdout, stderr) = run_in(tmp.path(), "manifests");
    assert_eq!(code, 1);
    snapshot_tmp(
        "symlink_escape",
        tmp.path(),
        &render(code, &stdout, &stderr),
    );
}

#[test]
fn invalid_cert() {
    let tmp = copy_fixture("invalid-cert");
    // Written here rather than committed: a private-key block in the
    // repository would (rightly) trip secret scanners. Not a real key.
    let cert =
        fs::read_to_string(fixtures().join("../../../manifests/certs/egress-ca.pem")).unwrap();
    let key = format!(
        "-----BEGIN {0} KEY-----\nAAAA\n-----END {0} KEY-----\n",
        "PRIVATE"
    );
    fs::write(
        tmp.path().join("invalid-cert/certs/with-key.pem"),
        format!("{cert}{key}"),
    )
    .unwrap();
    let (code, stdout, stderr) = run_in(tmp.path(), "invalid-cert");
    assert_eq!(code, 1);
    assert!(!stderr.contains("AAAA"), "key material echoed:\n{stderr}");
    snapshot_tmp("invalid_cert", tmp.path(), &render(code, &stdout, &stderr));
}

#[test]
fn secrets() {
    let out = validate("secrets");
    // Literal values are reported, never shown, in messages or source lines.
    for value in ["literal-value-in-secrets", "literal-value-in-env"] {
        assert!(!out.contains(value), "secret value echoed:\n{out}");
    }
    insta::assert_snapshot!(out);
}

#[test]
fn secrets_in_any_shape_are_never_printed() {
    let out = validate("secret-shapes");
    assert!(!out.contains("leak"), "a secret value echoed:\n{out}");
    // The references themselves stay readable.
    assert!(out.contains("F_TOKEN"), "{out}");
    // An array is named as what it is, not read as `from_env` by position.
    assert!(
        out.contains("secret `B_TOKEN` in bottle `dev` is an array")
            && out.contains("`B_TOKEN = { from_env = \"HOST_VAR\" }`"),
        "{out}"
    );
    assert!(!out.contains("`from_env` of secret `B_TOKEN`"), "{out}");
    insta::assert_snapshot!(out);
}

#[test]
fn egress() {
    insta::assert_snapshot!(validate("egress"));
}

#[test]
fn image() {
    insta::assert_snapshot!(validate("image"));
}

#[test]
fn prompt_conflict() {
    insta::assert_snapshot!(validate("prompt-conflict"));
}

#[test]
fn invalid_names() {
    insta::assert_snapshot!(validate("invalid-names"));
}

#[test]
fn urls() {
    let out = validate("urls");
    assert!(
        !out.contains("not-a-real-password"),
        "password echoed:\n{out}"
    );
    insta::assert_snapshot!(out);
}

#[test]
fn setup_steps() {
    insta::assert_snapshot!(validate("setup"));
}

#[test]
fn git_remotes() {
    let out = validate("git-remotes");
    assert!(
        !out.contains("not-a-real-password"),
        "password echoed:\n{out}"
    );
    insta::assert_snapshot!(out);
}

#[test]
fn retired_keys() {
    insta::assert_snapshot!(validate("retired-keys"));
}

#[test]
fn project_table() {
    insta::assert_snapshot!(validate("project"));
}

#[test]
fn volumes_and_resources() {
    insta::assert_snapshot!(validate("volumes"));
}

#[test]
fn duplicate_skill_names() {
    // Each later skill of the same name is labelled against the first.
    insta::assert_snapshot!(validate("duplicate-skill"));
}

#[test]
fn every_error_in_one_run() {
    let out = validate("every-error");
    // Two files, four entities, eight problems, one report: a type error
    // in a bottle hides neither its literal secret nor its setup steps'
    // unknown `after` and cycle.
    assert!(out.contains("× 8 problems found in every-error"), "{out}");
    insta::assert_snapshot!(out);
}

#[test]
fn no_manifests() {
    insta::assert_snapshot!(validate("no-manifests"));
}

#[test]
fn no_agents() {
    insta::assert_snapshot!(validate("no-agents"));
}

#[test]
fn nonexistent_directory() {
    insta::assert_snapshot!(validate("does-not-exist"));
}

#[test]
fn file_instead_of_directory() {
    insta::assert_snapshot!(validate("no-manifests/README.md"));
}

/// What the loader hands the rest of the pipeline for the examples:
/// resolved, absolute paths and classified settings.
#[test]
fn examples_resolve_into_a_project() {
    use bottle::manifest::{Image, ProjectNameSource, Prompt, load_dir};

    let root = fs::canonicalize(Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap();
    let m = root.join("manifests");
    let project = load_dir(&m).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(project.name, "example");
    assert_eq!(project.name_source, ProjectNameSource::Declared);
    assert_eq!(project.dir, m);
    assert_eq!(project.machine_name("coder"), "bottle_example_coder");

    let dev = &project.bottles["dev"];
    assert_eq!(dev.image, Image::Host);
    assert_eq!(
        dev.ca_cert.as_deref(),
        Some(m.join("certs/egress-ca.pem").as_path())
    );
    assert_eq!(dev.volumes.len(), 1);
    assert_eq!(dev.volumes[0].host, m.join("workspace"));
    assert_eq!(dev.volumes[0].guest, "/workspace");
    assert!(dev.volumes[0].read_only);
    assert_eq!(
        dev.setup_inputs,
        vec![vec![], vec![m.join("scripts/check-tools.sh")], vec![]]
    );
    assert_eq!(project.sources.path(dev.file), m.join("bottles/dev.toml"));
    assert!(project.bottles["review"].volumes[0].read_only);

    let coder = &project.agents["coder"];
    assert_eq!(coder.prompt, Prompt::File(m.join("prompts/coder.md")));
    assert_eq!(coder.skills, vec![m.join("skills/commit-style")]);
    let security = &project.agents["security"];
    assert!(matches!(&security.prompt, Prompt::Text(t) if t.contains("security reviewer")));
    assert_eq!(
        security.skills,
        vec![m.join("skills/threat-model"), m.join("skills/rust-review")]
    );
    assert_eq!(
        project.relative(&coder.skills[0]),
        Path::new("skills/commit-style")
    );
}

/// Image values: "host" or absent, references, and local paths (a rootfs
/// directory or an archive file, relative to the manifest).
#[test]
fn images_are_classified() {
    use bottle::manifest::{Image, load_dir};

    let tmp = tempfile::tempdir().unwrap();
    let m = fs::canonicalize(tmp.path()).unwrap().join("manifests");
    fs::create_dir_all(m.join("rootfs/usr")).unwrap();
    fs::write(m.join("agent.tar"), "not really a tar").unwrap();
    fs::write(
        m.join("dev.toml"),
        "[bottle.a]\n[bottle.b]\nimage = \"host\"\n[bottle.c]\nimage = \"alpine:3.20\"\n\
         [bottle.d]\nimage = \"./rootfs\"\n[bottle.e]\nimage = \"./agent.tar\"\n\
         [agent.x]\nbottle = \"a\"\n",
    )
    .unwrap();
    let project = load_dir(&m).unwrap_or_else(|e| panic!("{e:?}"));
    let image = |b: &str| project.bottles[b].image.clone();
    assert_eq!(image("a"), Image::Host);
    assert_eq!(image("b"), Image::Host);
    assert_eq!(image("c"), Image::Reference("alpine:3.20".into()));
    assert_eq!(image("d"), Image::RootfsDir(m.join("rootfs")));
    assert_eq!(image("e"), Image::Archive(m.join("agent.tar")));
    // No bottle.toml: named after the directory holding `manifests`.
    let parent = m.parent().unwrap().file_name().unwrap().to_string_lossy();
    assert_eq!(
        Some(project.name.clone()),
        bottle::manifest::names::sanitize(&parent)
    );
    assert_eq!(
        project.name_source,
        bottle::manifest::ProjectNameSource::DirectoryName
    );
}

/// Hidden entries and symlinked directories are not read; nested
/// directories are, and a file's paths are relative to that file.
#[test]
fn walk_skips_hidden_entries_and_symlinked_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("manifests");
    let elsewhere = tmp.path().join("elsewhere");
    for dir in [m.join(".git"), m.join("team/prompts"), elsewhere.clone()] {
        fs::create_dir_all(dir).unwrap();
    }
    let garbage = "this is [not toml";
    fs::write(m.join(".git/config.toml"), garbage).unwrap();
    fs::write(m.join(".draft.toml"), garbage).unwrap();
    fs::write(elsewhere.join("x.toml"), garbage).unwrap();
    std::os::unix::fs::symlink(&elsewhere, m.join("team/linked")).unwrap();
    fs::write(m.join("team/prompts/r.md"), "Review.\n").unwrap();
    fs::write(
        m.join("team/agents.toml"),
        "[bottle.dev]\n\n[agent.reviewer]\nbottle = \"dev\"\nprompt = \"prompts/r.md\"\n",
    )
    .unwrap();
    let (code, stdout, stderr) = run_in(tmp.path(), "manifests");
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("1 agent, 1 bottle valid"), "{stdout}");
}

/// `validate` builds the graph too, so CI catches a dependency cycle
/// without a runtime.
#[test]
fn validate_reports_a_dependency_cycle() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/graph");
    let (code, stdout, stderr) = run_in(&dir, "cycle");
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stderr.contains("bottle::dependency-cycle"), "{stderr}");
    assert!(stderr.contains("`fetch` runs after `build`"), "{stderr}");
}

#[test]
fn a_writable_volume_holding_a_symlinked_manifest_is_refused() {
    // The manifests directory itself is not shared, but a manifest in it
    // is a symlink into a directory that is: the agent could rewrite it.
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    let shared = tmp.path().join("shared");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("agents.toml"), "[agent.a]\nbottle = \"dev\"\n").unwrap();
    std::os::unix::fs::symlink(shared.join("agents.toml"), m.join("agents.toml")).unwrap();
    let bottle = |mode: &str| {
        format!(
            "[project]\nname = \"p\"\n[bottle.dev]\nvolumes = [\"{}:/shared{mode}\"]\n",
            shared.display()
        )
    };
    std::fs::write(m.join("bottle.toml"), bottle("")).unwrap();
    let (code, stdout, stderr) = run_in(tmp.path(), "m");
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stderr.contains("bottle::writable-manifests"), "{stderr}");
    assert!(stderr.contains("holds a manifest"), "{stderr}");
    // Read-only, it is fine.
    std::fs::write(m.join("bottle.toml"), bottle(":ro")).unwrap();
    let (code, stdout, stderr) = run_in(tmp.path(), "m");
    assert_eq!(code, 0, "{stdout}{stderr}");
}

#[test]
fn after_supervise_is_reported_once_and_hides_no_other_cycle() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(
        m.join("bottle.toml"),
        "[project]\nname = \"p\"\n[bottle.dev.supervise]\nurl = \"http://op/\"\n\
         [[bottle.dev.setup]]\nname = \"a\"\nrun = \"true\"\nafter = [\"a\"]\n\
         [[bottle.dev.setup]]\nname = \"b\"\nrun = \"true\"\nafter = [\"supervise\"]\n\
         [agent.x]\nbottle = \"dev\"\n",
    )
    .unwrap();
    let (code, stdout, stderr) = run_in(tmp.path(), "m");
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert_eq!(
        stderr.matches("bottle::dependency-cycle").count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("`a` runs after `a`"), "{stderr}");
    assert_eq!(
        stderr.matches("× ").count(),
        3,
        "a summary and two problems: {stderr}"
    );
}

#[test]
fn gate_settings() {
    insta::assert_snapshot!(validate("gate"));
}

/// Every phase reports in one run: a syntax error in one file and an
/// unknown bottle in another hide neither what the chosen runtime cannot
/// do with a bottle that loaded cleanly, nor a link out of the manifests
/// directory inside a clean agent's skill (found while hashing what is
/// copied in). What depends on the broken parts is not checked.
#[test]
fn every_phase_in_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("phases");
    fs::create_dir_all(dir.join("skills/leaky")).unwrap();
    fs::write(dir.join("skills/leaky/SKILL.md"), "---\nname: leaky\n---\n").unwrap();
    std::os::unix::fs::symlink("/etc", dir.join("skills/leaky/out")).unwrap();
    fs::write(
        dir.join("bottle.toml"),
        "[project]\nname = \"phases\"\n\n[bottle.plain]\n\n\
         [bottle.pulled]\nimage = \"ghcr.io/acme/agent:1\"\n\n\
         [bottle.netted.egress]\nallow_cidrs = [\"10.8.0.0/16\"]\n",
    )
    .unwrap();
    fs::write(dir.join("broken.toml"), "[bottle.broken\ncpus = 2\n").unwrap();
    fs::write(
        dir.join("agents.toml"),
        "[agent.lost]\nbottle = \"nosuch\"\n\n\
         [agent.puller]\nbottle = \"pulled\"\n\n\
         [agent.netter]\nbottle = \"netted\"\n\n\
         [agent.skilled]\nbottle = \"plain\"\nskills = [\"skills/leaky\"]\n",
    )
    .unwrap();
    let validate = |runtime: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_bottle"))
            .args(["--runtime", runtime, "validate", "phases"])
            .current_dir(tmp.path())
            .env("NO_COLOR", "1")
            .env_remove("BOTTLE_SMOLVM")
            .env_remove("BOTTLE_STATE_DIR")
            .output()
            .expect("bottle runs");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        stderr
    };

    let smolvm = validate("smolvm");
    for code in [
        "bottle::toml-syntax",
        "bottle::unknown-bottle",
        "bottle::path-escapes",
        "bottle::image-needs-network",
    ] {
        assert!(smolvm.contains(code), "{code}:\n{smolvm}");
    }
    assert!(smolvm.contains("× 4 problems found in phases"), "{smolvm}");
    snapshot_tmp("every_phase_in_one_run", tmp.path(), &smolvm);

    let local = validate("local");
    for code in [
        "bottle::toml-syntax",
        "bottle::unknown-bottle",
        "bottle::path-escapes",
        "bottle::local-image",
        "bottle::local-egress",
    ] {
        assert!(local.contains(code), "{code}:\n{local}");
    }
    assert!(!local.contains("image-needs-network"), "{local}");
}

/// The only agent sits in a file that does not parse: its syntax error is
/// the problem, not "no agents declared" (which sent users looking for a
/// missing table).
#[test]
fn a_file_that_does_not_parse_is_not_reported_as_missing_agents() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("bottle.toml"),
        "[project]\nname = \"p\"\n[bottle.dev]\nvolumes = [[[\n[agent.a]\nbottle = \"dev\"\n",
    )
    .unwrap();
    let (code, _, stderr) = run_in(tmp.path(), ".");
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("bottle::toml-syntax"), "{stderr}");
    assert!(!stderr.contains("no agents declared"), "{stderr}");
}
