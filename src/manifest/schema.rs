//! The JSON schema of the manifest format, generated from [`super::model`].

use serde_json::Value;

/// The schema as pretty-printed JSON, exactly as checked in at
/// `schemas/bottle.schema.json`.
pub fn schema_json() -> String {
    let schema = schemars::schema_for!(super::model::ManifestFile);
    let mut value = schema.to_value();
    drop_null(&mut value);
    // Back into a Schema, which serializes keywords in a readable order.
    let schema = schemars::Schema::try_from(value).expect("still a schema");
    let mut out = serde_json::to_string_pretty(&schema).expect("schema serializes");
    out.push('\n');
    out
}

/// TOML has no null: an absent key is how a manifest says "none". schemars
/// describes `Option<T>` as "T or null"; keep only T so editors do not
/// offer null.
fn drop_null(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(Value::Array(types)) = map.get_mut("type") {
                types.retain(|t| t != "null");
                if let [only] = types.as_slice() {
                    let only = only.clone();
                    map.insert("type".into(), only);
                }
            }
            let is_null = |v: &Value| v.get("type").is_some_and(|t| t == "null");
            if let Some(Value::Array(any)) = map.get("anyOf")
                && let [a, b] = any.as_slice()
                && (is_null(a) || is_null(b))
            {
                let keep = if is_null(a) { b.clone() } else { a.clone() };
                map.remove("anyOf");
                if let Value::Object(keep) = keep {
                    for (k, v) in keep {
                        map.entry(k).or_insert(v);
                    }
                }
            }
            map.values_mut().for_each(drop_null);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_null),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn options_are_not_nullable() {
        let schema = super::schema_json();
        assert!(!schema.contains("\"null\""), "{schema}");
    }
}
