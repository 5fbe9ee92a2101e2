//! `bottle graph` end to end: the real binary on fixture directories.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/graph")
        .join(name)
}

fn bottle(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bottle"))
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("BOTTLE_RUNTIME")
        .output()
        .expect("run bottle")
}

fn graph(dir: &Path, format: &str) -> String {
    let out = bottle(&["graph", dir.to_str().unwrap(), "--format", format]);
    assert!(
        out.status.success(),
        "bottle graph failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn text_format() {
    insta::assert_snapshot!(graph(&fixture("basic"), "text"));
}

#[test]
fn dot_format() {
    insta::assert_snapshot!(graph(&fixture("basic"), "dot"));
}

#[test]
fn dot_is_the_default_and_graphviz_draws_it() {
    let dot = graph(&fixture("basic"), "dot");
    let out = bottle(&["graph", fixture("basic").to_str().unwrap()]);
    assert_eq!(String::from_utf8(out.stdout).unwrap(), dot);

    let mut child = match Command::new("dot")
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(err) => panic!("graphviz `dot` is needed for this test: {err}"),
    };
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(dot.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.is_empty(), "dot: {stderr}");
    let svg = String::from_utf8(out.stdout).unwrap();
    assert!(svg.contains("<svg"));
    assert!(svg.contains("agent reviewer (bottle dev)"));
    assert!(svg.contains("setup:toolchain"));
}

#[test]
fn output_does_not_depend_on_where_the_directory_is() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("somewhere/else");
    support::project::copy_dir(&fixture("basic"), &copy);
    assert_eq!(graph(&copy, "text"), graph(&fixture("basic"), "text"));
}

#[test]
fn a_cycle_is_a_diagnostic_with_a_label_on_each_after_entry() {
    let out = bottle(&["graph", "tests/fixtures/graph/cycle"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    insta::assert_snapshot!(String::from_utf8(out.stderr).unwrap());
}

/// `before` orders a setup step ahead of built-in steps (tools an image
/// lacks), and takes part in cycle detection like `after`.
#[test]
fn before_puts_a_setup_step_ahead_of_built_in_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    std::fs::create_dir_all(&m).unwrap();
    let manifest = |extra: &str| {
        format!(
            "[project]\nname = \"b\"\n[bottle.alpine.git]\ngateway = \"http://10.0.0.1:9418\"\n\
             [[bottle.alpine.setup]]\nname = \"tools\"\nrun = \"apk add git\"\nbefore = [\"git\"]\n{extra}\
             [agent.a]\nbottle = \"alpine\"\n"
        )
    };
    std::fs::write(m.join("bottle.toml"), manifest("")).unwrap();
    let project = bottle::manifest::load_dir(&m).unwrap();
    let graph = bottle::graph::build(&project).unwrap();
    let git = graph.find("a", &bottle::graph::StepKind::Git).unwrap();
    let deps: Vec<String> = graph
        .dependencies(git)
        .into_iter()
        .map(|d| graph.step(d).kind.id())
        .collect();
    assert_eq!(deps, ["machine", "setup:tools"]);

    let cyclic = "[[bottle.alpine.setup]]\nname = \"late\"\nrun = \"true\"\nafter = [\"git\"]\nbefore = [\"tools\"]\n";
    std::fs::write(m.join("bottle.toml"), manifest(cyclic)).unwrap();
    // The loader reports the cycle, with any other problem of the manifests.
    let err = bottle::manifest::load_dir(&m).unwrap_err();
    let text = format!("{:?}", miette::Report::new(err));
    assert!(text.contains("`tools` runs before `git`"), "{text}");
    assert!(text.contains("`late` runs before `tools`"), "{text}");
}
