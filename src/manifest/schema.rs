//! The JSON schema of the manifest format, generated from [`super::model`].

/// The schema as pretty-printed JSON, exactly as checked in at
/// `schemas/bottle.schema.json`.
pub fn schema_json() -> String {
    let schema = schemars::schema_for!(super::model::ManifestFile);
    let mut out = serde_json::to_string_pretty(&schema).expect("schema serializes");
    out.push('\n');
    out
}
