//! The JSON Schema is valid, accepts the example, and every field it names is documented.

use std::collections::BTreeSet;
use std::path::Path;

use secondsite_policy::{check_str, json_schema, yaml_to_json};
use serde_json::Value;

const EXAMPLE: &str = include_str!("../../examples/two-sites.yaml");
const POLICY_DOC: &str = include_str!("../../docs/policy.md");

#[test]
fn schema_is_valid_json_schema() {
    let schema = json_schema();
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    if let Err(e) = jsonschema::meta::validate(&schema) {
        panic!("the policy schema fails its meta-schema: {e}");
    }
}

#[test]
fn example_validates_against_the_schema() {
    let schema = json_schema();
    // A plain validator, as an editor would use: none of our code on the checking side.
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    let example = yaml_to_json(EXAMPLE).expect("example parses");
    let errors: Vec<String> = validator
        .iter_errors(&example)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
}

#[test]
fn schema_rejects_what_check_rejects() {
    // A broken document fails the plain validator too, so editors flag what `check` flags.
    let validator = jsonschema::validator_for(&json_schema()).expect("schema compiles");
    for (from, to) in [
        ("hold_time: 9 ", "hold_tme: 9 "),
        ("interval_ms: 25 ", "interval_ms: 2  "),
        ("mode: auto ", "mode: auto2"),
    ] {
        let text = EXAMPLE.replacen(from, to, 1);
        let value = yaml_to_json(&text).expect("parses");
        assert!(!validator.is_valid(&value), "schema accepted {to}");
        assert!(check_str(&text, Path::new("/")).policy.is_none());
    }
}

/// Every property path in the schema, like `sites[].bgp.peers[].hold_time`.
fn schema_paths(root: &Value, schema: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    let mut schema = schema;
    while let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        schema = root
            .pointer(r.trim_start_matches('#'))
            .expect("ref resolves");
    }
    if let Some(items) = schema.get("items") {
        schema_paths(root, items, &format!("{prefix}[]"), out);
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (key, sub) in props {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            out.insert(path.clone());
            schema_paths(root, sub, &path, out);
        }
    }
}

#[test]
fn every_field_is_documented() {
    let schema = json_schema();
    let mut paths = BTreeSet::new();
    schema_paths(&schema, &schema, "", &mut paths);
    assert!(
        paths.len() > 60,
        "found only {} fields: is the walk broken?",
        paths.len()
    );
    let missing: Vec<&String> = paths
        .iter()
        .filter(|p| !POLICY_DOC.contains(&format!("| `{p}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/policy.md has no table row for: {missing:?}"
    );
}

#[test]
fn every_field_has_a_description_for_editors() {
    let schema = json_schema();
    // Each property schema carries a description (from the doc comments of the types).
    fn walk(v: &Value, missing: &mut Vec<String>) {
        if let Some(props) = v.get("properties").and_then(Value::as_object) {
            for (k, sub) in props {
                if sub.get("description").is_none() {
                    missing.push(k.clone());
                }
            }
        }
        match v {
            Value::Object(m) => m.values().for_each(|x| walk(x, missing)),
            Value::Array(a) => a.iter().for_each(|x| walk(x, missing)),
            _ => {}
        }
    }
    let mut missing = Vec::new();
    walk(&schema, &mut missing);
    assert!(missing.is_empty(), "no description: {missing:?}");
}

#[test]
fn an_unknown_key_is_reported_at_the_line_it_is_on() {
    let lines: Vec<&str> = EXAMPLE.lines().collect();
    let mut tried = 0;
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let starts_key = |t: &str| {
            t.split_once(':').is_some_and(|(k, _)| {
                !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            })
        };
        // Insert a sibling key: before a `key:` line, or after a `- key:` line (inside the item).
        let (at, inserted_indent) = if let Some(rest) = trimmed.strip_prefix("- ") {
            if !starts_key(rest) {
                continue;
            }
            (i + 1, indent + 2)
        } else if starts_key(trimmed) {
            (i, indent)
        } else {
            continue;
        };
        let mut edited = lines.clone();
        let bogus = format!("{}zz_bogus_key: 1", " ".repeat(inserted_indent));
        edited.insert(at, &bogus);
        let report = check_str(&edited.join("\n"), Path::new("/"));
        let n = at + 1;
        let expected = format!("{n}:{}:", inserted_indent + 1);
        assert!(
            report.diagnostics.iter().any(|d| d
                .render("")
                .starts_with(&format!(":{expected} unknown key `zz_bogus_key`"))),
            "inserted at line {n}: {:?}",
            report.diagnostics
        );
        tried += 1;
    }
    assert!(tried > 60, "only {tried} insertion points");
}
