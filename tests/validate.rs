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
fn every_error_in_one_run() {
    let out = validate("every-error");
    // Two files, four entities, five problems, one report.
    assert!(out.contains("× 5 problems found in every-error"), "{out}");
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
