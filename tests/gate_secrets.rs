//! A secret with `hosts` whose value this host cannot read (issue 9 item
//! 21, for the gate's secrets): only the bottle that needs it waits, the
//! gate serves every other bottle, and a running gate keeps a value it
//! already holds when a later apply cannot read it.

mod support;

use bottle::gate::paths::GatePaths;
use support::Double;
use support::project::Project;

struct StopGate(GatePaths);

impl Drop for StopGate {
    fn drop(&mut self) {
        let _ = bottle::gate::reconcile::stop(&self.0);
    }
}

fn manifest(key_file: &std::path::Path, dev_hosts: &str) -> String {
    format!(
        r#"[project]
name = "gated"

[bottle.dev]
user = "node"
secrets = {{ API_KEY = {{ from_file = "{}", hosts = ["api.example.com"] }} }}

[bottle.dev.egress]
allow_hosts = [{dev_hosts}]

[bottle.other]
user = "node"

[bottle.other.egress]
allow_hosts = ["example.org"]

[agent.coder]
bottle = "dev"

[agent.carol]
bottle = "other"
"#,
        key_file.display()
    )
}

/// The `missing_secrets` of the gate's latest accepted config.
fn missing_in_gate(paths: &GatePaths) -> Vec<String> {
    let log = std::fs::read_to_string(paths.log()).unwrap();
    let last = log
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["event"] == "config")
        .expect("the gate logged a config");
    last["missing_secrets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

fn machines(p: &Project) -> Vec<String> {
    let mut names: Vec<String> = p
        .double
        .list_json()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_gate_secret_missing_on_this_host_holds_only_its_bottle() {
    let p = Project::with_double("gated", Double::new());
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("api-key");
    p.write("bottle.toml", &manifest(&key, r#""api.example.com""#));
    let paths = GatePaths::new(p.state_dir(), "gated");
    let _stop = StopGate(paths.clone());

    // No value: the gate starts for both bottles, carol's machine is
    // created, coder's waits for the secret and says how to go on.
    let run = p.bottle(&["apply"]);
    run.code(3);
    assert!(
        run.all().contains("secret `API_KEY` of bottle `dev`"),
        "{}",
        run.all()
    );
    assert!(run.all().contains("--target"), "{}", run.all());
    assert_eq!(machines(&p), ["bottle_gated_carol"], "{}", run.all());
    assert!(
        matches!(
            bottle::gate::reconcile::health(&paths),
            bottle::gate::reconcile::GateHealth::Running(_)
        ),
        "{}",
        run.all()
    );
    assert_eq!(missing_in_gate(&paths).len(), 1);

    // The value appears: coder's machine is created, the gate holds it.
    std::fs::write(&key, "sk-gate-secret-value-1\n").unwrap();
    p.bottle(&["apply"]).success();
    assert_eq!(machines(&p), ["bottle_gated_carol", "bottle_gated_coder"]);
    assert!(missing_in_gate(&paths).is_empty());

    // Gone again from this host, and the gate reloads for another reason:
    // the value it holds stays (nothing starts that would need it).
    std::fs::remove_file(&key).unwrap();
    p.write(
        "bottle.toml",
        &manifest(&key, r#""api.example.com", "pypi.org""#),
    );
    let run = p.bottle(&["apply"]);
    run.success();
    assert!(run.all().contains("gate"), "{}", run.all());
    assert!(missing_in_gate(&paths).is_empty(), "{}", run.all());
    assert!(!run.all().contains("sk-gate-secret-value-1"));
}
