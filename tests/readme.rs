//! The README's manifest example is a real, valid manifest.

use std::fs;
use std::path::Path;

fn readme_manifest() -> String {
    let readme =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let start = readme
        .find("```toml\n#:schema")
        .expect("README has a TOML example")
        + "```toml\n".len();
    let end = start + readme[start..].find("```").unwrap();
    readme[start..end].to_owned()
}

#[test]
fn the_readme_example_validates() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("manifests");
    let data = tmp.path().join("data");
    for dir in [
        "certs",
        "prompts",
        "rootfs",
        "skills/rust-review",
        "scripts",
        "workspace",
    ] {
        fs::create_dir_all(m.join(dir)).unwrap();
    }
    fs::create_dir_all(&data).unwrap();
    let example = readme_manifest().replace("/srv/data", data.to_str().unwrap());
    fs::write(m.join("bottle.toml"), example).unwrap();
    let cert = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/certs/egress-ca.pem");
    fs::copy(cert, m.join("certs/egress-ca.pem")).unwrap();
    fs::write(m.join("prompts/reviewer.md"), "Review.\n").unwrap();
    fs::write(
        m.join("skills/rust-review/SKILL.md"),
        "---\nname: rust-review\ndescription: Review Rust\n---\nReview.\n",
    )
    .unwrap();
    fs::write(m.join("scripts/tools.sh"), "#!/bin/sh\n").unwrap();
    let project = bottle::manifest::load_dir(&m)
        .map_err(|e| format!("{:?}", miette::Report::new(e)))
        .unwrap();
    let graph = bottle::graph::build(&project).unwrap();
    assert_eq!(project.name, "acme");
    assert_eq!(
        graph.agent_steps("reviewer").count(),
        7,
        "machine ca prompt skills git setup:toolchain supervise"
    );
    // And smolvm, the default runtime, runs it as written (`validate`).
    let desired = bottle::desired::Desired::new(project, &graph);
    if let Err(d) = bottle::preflight::runtime_check(&desired, bottle::runtime::RuntimeKind::Smolvm)
    {
        panic!("{:?}", miette::Report::new(d));
    }
}
