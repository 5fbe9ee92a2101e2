//! The checked-in JSON schema: current, complete, and agreeing with the
//! loader. Validation uses the `jsonschema` crate (a dev-dependency only),
//! so the schema is checked by a real validator, as editors will use it.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

const REGENERATE: &str = "cargo run -- schema > schemas/bottle.schema.json";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn checked_in() -> Value {
    let text = fs::read_to_string(root().join("schemas/bottle.schema.json")).unwrap_or_else(|e| {
        panic!("schemas/bottle.schema.json: {e}; create it with `{REGENERATE}`")
    });
    serde_json::from_str(&text).expect("the checked-in schema is JSON")
}

fn validator() -> jsonschema::Validator {
    jsonschema::validator_for(&checked_in()).expect("the checked-in schema is a valid schema")
}

/// Problems `instance` has against the schema, one line each.
fn errors(validator: &jsonschema::Validator, instance: &Value) -> Vec<String> {
    validator
        .iter_errors(instance)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

fn toml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            toml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path);
        }
    }
}

#[test]
fn checked_in_schema_is_current() {
    let generated = bottle::manifest::schema::schema_json();
    let file = fs::read_to_string(root().join("schemas/bottle.schema.json")).unwrap_or_default();
    assert!(
        generated == file,
        "schemas/bottle.schema.json is stale: the manifest model changed. Regenerate it with\n\n    \
         {REGENERATE}\n\nand commit the result."
    );
}

#[test]
fn every_example_manifest_matches_the_schema() {
    let validator = validator();
    let mut files = Vec::new();
    toml_files(&root().join("manifests"), &mut files);
    assert!(
        files.len() >= 5,
        "expected the example set, found {files:?}"
    );
    for file in files {
        let text = fs::read_to_string(&file).unwrap();
        let doc: Value =
            toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let problems = errors(&validator, &doc);
        assert!(
            problems.is_empty(),
            "{}:\n{}",
            file.display(),
            problems.join("\n")
        );

        // Editors find the schema through the directive on the first line.
        let first = text.lines().next().unwrap_or_default();
        let target = first
            .strip_prefix("#:schema ")
            .unwrap_or_else(|| panic!("{} does not start with `#:schema <path>`", file.display()));
        let resolved = file.parent().unwrap().join(target);
        assert_eq!(
            fs::canonicalize(&resolved).ok(),
            fs::canonicalize(root().join("schemas/bottle.schema.json")).ok(),
            "{}: `#:schema {target}` does not lead to schemas/bottle.schema.json",
            file.display()
        );
    }
}

#[test]
fn every_key_is_described() {
    fn walk(node: &Value, path: &str, missing: &mut Vec<String>) {
        match node {
            Value::Object(map) => {
                if let Some(Value::Object(props)) = map.get("properties") {
                    for (key, prop) in props {
                        if prop.get("description").is_none() {
                            missing.push(format!("{path}/{key}"));
                        }
                    }
                }
                for (key, child) in map {
                    walk(child, &format!("{path}/{key}"), missing);
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, path, missing)),
            _ => {}
        }
    }
    let mut missing = Vec::new();
    walk(&checked_in(), "", &mut missing);
    assert!(
        missing.is_empty(),
        "keys without a description: {missing:?}"
    );
}

#[test]
fn schema_rejects_what_the_loader_rejects() {
    let validator = validator();
    let bad = [
        json!({ "bottle": { "dev": { "cpu": 2 } } }),
        json!({ "bottle": { "dev": { "cpus": "two" } } }),
        json!({ "bottle": { "dev": { "cpus": 0 } } }),
        json!({ "bottle": { "dev": { "secrets": { "TOKEN": "literal" } } } }),
        json!({ "bottle": { "dev": { "secrets": { "TOKEN": {} } } } }),
        json!({ "bottle": { "dev": { "secrets": { "TOKEN": { "from_env": "A", "from_file": "/f" } } } } }),
        json!({ "bottle": { "dev": { "secrets": { "TOKEN": { "from_file": "rel/path" } } } } }),
        json!({ "bottle": { "dev": { "env": { "A-B": "x" } } } }),
        json!({ "bottle": { "dev": { "git": { "gateway": "ssh://x" } } } }),
        json!({ "bottle": { "dev": { "setup": [{ "name": "Build", "run": "make" }] } } }),
        json!({ "bottle": { "dev": { "user": "Node User" } } }),
        json!({ "agent": { "reviewer": { "prompt": "p.md" } } }),
        json!({ "bottles": { "dev": {} } }),
    ];
    for doc in bad {
        assert!(!validator.is_valid(&doc), "schema accepts {doc}");
    }
    let good = json!({
        "project": { "name": "example" },
        "bottle": { "dev": {
            "secrets": { "TOKEN": { "from_env": "HOST_TOKEN" } },
            "git": { "gateway": "https://gw.example", "remote": [{ "name": "app", "upstream": "x" }] },
            "setup": [{ "name": "tools", "run": "true", "after": ["ca"] }]
        } },
        "agent": { "reviewer": { "bottle": "dev" } }
    });
    assert_eq!(errors(&validator, &good), Vec::<String>::new());
}

#[test]
fn schema_name_pattern_is_the_loader_rule() {
    let validator = validator();
    let long = "a".repeat(48);
    let too_long = "a".repeat(49);
    for name in [
        "dev",
        "a",
        "code-review",
        "r2d2",
        &long,
        "",
        "Dev",
        "1abc",
        "-a",
        "a-",
        "a--b",
        "a_b",
        "a.b",
        &too_long,
    ] {
        let doc = json!({ "agent": { name: { "bottle": "dev" } } });
        assert_eq!(
            validator.is_valid(&doc),
            bottle::manifest::names::check_name(name).is_ok(),
            "schema and loader disagree on {name:?}"
        );
    }
}
