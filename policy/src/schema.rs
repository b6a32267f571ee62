//! The JSON Schema of the policy, and the structural check built on it.
//!
//! The schema is generated from the Rust types (schemars), so it cannot drift from them. The
//! structural check runs the parsed document through it (the jsonschema crate) and turns every
//! violation into a located, plain-words diagnostic: unknown keys with a "did you mean", wrong
//! types, out-of-range numbers, missing keys, bad addresses. It reports all of them at once,
//! where serde alone would stop at the first.

use std::sync::OnceLock;

use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::{ValidationError, Validator};
use serde_json::Value;

use crate::diagnostic::Diagnostic;
use crate::model::{Community, Endpoint, InterfaceAddress, MacAddress, Name, Policy, Prefix};
use crate::source_map::{SourceMap, pointer_push};
use crate::suggest::did_you_mean;

/// The policy's JSON Schema (draft 2020-12), as `secondsite policy schema` prints it.
pub fn json_schema() -> Value {
    let generator = schemars::generate::SchemaSettings::draft2020_12().into_generator();
    let mut schema = generator.into_root_schema_for::<Policy>().to_value();
    if let Value::Object(root) = &mut schema {
        root.insert(
            "$id".into(),
            Value::String("https://secondsite.dev/schema/policy-v1.json".into()),
        );
    }
    schema
}

/// Whether a string is in a given `format`.
type FormatCheck = fn(&str) -> bool;

/// The custom `format`s of the schema, each with the check that the structural pass applies.
fn formats() -> [(&'static str, FormatCheck); 6] {
    [
        (Prefix::FORMAT, |s| s.parse::<Prefix>().is_ok()),
        (InterfaceAddress::FORMAT, |s| {
            s.parse::<InterfaceAddress>().is_ok()
        }),
        (MacAddress::FORMAT, |s| s.parse::<MacAddress>().is_ok()),
        (Community::FORMAT, |s| s.parse::<Community>().is_ok()),
        (Endpoint::FORMAT, |s| s.parse::<Endpoint>().is_ok()),
        ("ip", |s| s.parse::<std::net::IpAddr>().is_ok()),
    ]
}

/// What a value of each `format` should look like, for messages.
fn expected_for_format(format: &str) -> &'static str {
    match format {
        Prefix::FORMAT => Prefix::EXPECTED,
        InterfaceAddress::FORMAT => InterfaceAddress::EXPECTED,
        MacAddress::FORMAT => MacAddress::EXPECTED,
        Community::FORMAT => Community::EXPECTED,
        Endpoint::FORMAT => Endpoint::EXPECTED,
        "ipv4" => "an IPv4 address (like 10.0.1.2)",
        "ipv6" => "an IPv6 address (like 2001:db8::1)",
        "ip" => "an IP address (like 203.0.113.10 or 2001:db8::10)",
        _ => "in the expected format",
    }
}

struct Compiled {
    schema: Value,
    validator: Validator,
}

fn compiled() -> &'static Compiled {
    static COMPILED: OnceLock<Compiled> = OnceLock::new();
    COMPILED.get_or_init(|| {
        let schema = json_schema();
        let mut options = jsonschema::options().should_validate_formats(true);
        for (name, check) in formats() {
            options = options.with_format(name, check);
        }
        let validator = options
            .build(&schema)
            .expect("the schema generated from our own types compiles");
        Compiled { schema, validator }
    })
}

/// Checks the document's shape against the schema; every violation becomes a diagnostic.
pub fn check_structure(instance: &Value, map: &SourceMap) -> Vec<Diagnostic> {
    let compiled = compiled();
    compiled
        .validator
        .iter_errors(instance)
        .flat_map(|error| describe(&compiled.schema, instance, map, &error))
        .collect()
}

fn describe(
    root: &Value,
    instance: &Value,
    map: &SourceMap,
    error: &ValidationError<'_>,
) -> Vec<Diagnostic> {
    let pointer = error.instance_path().as_str().to_owned();
    let here = map.value(&pointer);
    let what = dotted(&pointer);
    // How to name the offending value in a sentence: `sites[0].name`, or the whole policy.
    let subject = if pointer.is_empty() {
        "the policy".to_owned()
    } else {
        format!("`{what}`")
    };
    let value = instance.pointer(&pointer).unwrap_or(&Value::Null);
    let message = match error.kind() {
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            let allowed = allowed_keys(root, &pointer);
            return unexpected
                .iter()
                .map(|key| {
                    let mark = map.key(&pointer_push(&pointer, key));
                    let place = if pointer.is_empty() {
                        "at the top level".to_owned()
                    } else {
                        format!("in `{what}`")
                    };
                    let hint = match did_you_mean(key, allowed.iter().map(String::as_str)) {
                        Some(s) => format!("; did you mean `{s}`?"),
                        None => format!("; expected one of: {}", allowed.join(", ")),
                    };
                    Diagnostic::error(mark, format!("unknown key `{key}` {place}{hint}"))
                })
                .collect();
        }
        ValidationErrorKind::Required { property } => {
            let key = property.as_str().unwrap_or_default();
            if pointer.is_empty() {
                format!("missing top-level key `{key}`")
            } else {
                format!("missing key `{key}` in `{what}`")
            }
        }
        ValidationErrorKind::Type { kind } => {
            let expected = match kind {
                TypeKind::Single(t) => article(t.as_str()),
                TypeKind::Multiple(set) => set
                    .iter()
                    .map(|t| article(t.as_str()))
                    .collect::<Vec<_>>()
                    .join(" or "),
            };
            let hint = match value.as_str() {
                Some("yes" | "no" | "on" | "off" | "y" | "n") if expected.contains("boolean") => {
                    " (YAML 1.2: write true or false)"
                }
                _ => "",
            };
            format!("{subject} must be {expected}, found {}{hint}", found(value))
        }
        ValidationErrorKind::Minimum { limit } => {
            format!("{subject} must be at least {limit}, found {value}")
        }
        ValidationErrorKind::Maximum { limit } => {
            format!("{subject} must be at most {limit}, found {value}")
        }
        ValidationErrorKind::MinItems { limit } => {
            let n = value.as_array().map_or(0, Vec::len);
            format!(
                "{subject} needs at least {limit} {}, found {n}",
                items(*limit)
            )
        }
        ValidationErrorKind::MaxItems { limit } => {
            format!("{subject} may have at most {limit} {}", items(*limit))
        }
        ValidationErrorKind::MinLength { limit } => {
            format!("{subject} must be at least {limit} characters long")
        }
        ValidationErrorKind::MaxLength { limit } => {
            format!("{subject} must be at most {limit} characters long, found {value}")
        }
        ValidationErrorKind::Enum { options } => {
            let options: Vec<&str> = options
                .as_array()
                .map(|o| o.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let list = options
                .iter()
                .map(|o| format!("`{o}`"))
                .collect::<Vec<_>>()
                .join(", ");
            let hint = value
                .as_str()
                .and_then(|v| did_you_mean(v, options.iter().copied()))
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            format!("{subject} must be one of {list}, found {value}{hint}")
        }
        ValidationErrorKind::Format { format } => {
            format!("{subject}: {value} is not {}", expected_for_format(format))
        }
        ValidationErrorKind::Pattern { pattern } => {
            let expected = if pattern == Name::PATTERN {
                Name::EXPECTED
            } else {
                "in the expected form"
            };
            format!("{subject}: {value} is not {expected}")
        }
        _ => format!("{subject}: {error}"),
    };
    vec![Diagnostic::error(here, message)]
}

/// `/sites/0/bgp/peers/1` -> `sites[0].bgp.peers[1]`.
pub fn dotted(pointer: &str) -> String {
    let mut out = String::new();
    for token in pointer.split('/').skip(1) {
        let token = token.replace("~1", "/").replace("~0", "~");
        if token.chars().all(|c| c.is_ascii_digit()) && !token.is_empty() {
            out.push_str(&format!("[{token}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&token);
        }
    }
    if out.is_empty() {
        out.push_str("(top level)");
    }
    out
}

fn article(json_type: &str) -> String {
    match json_type {
        "object" => "a mapping".into(),
        "array" => "a list".into(),
        "integer" => "an integer".into(),
        "null" => "empty".into(),
        other => format!("a {other}"),
    }
}

fn items(n: u64) -> &'static str {
    if n == 1 { "item" } else { "items" }
}

/// Describes a found value for a type error: `a string ("abc")`, `a list`.
fn found(value: &Value) -> String {
    match value {
        Value::Null => "nothing (null)".into(),
        Value::Bool(b) => format!("a boolean ({b})"),
        Value::Number(n) if n.is_f64() => format!("a number ({n})"),
        Value::Number(n) => format!("an integer ({n})"),
        Value::String(s) => format!("a string ({s:?})"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "a mapping".into(),
    }
}

/// The keys the schema allows in the object at `pointer`.
fn allowed_keys(root: &Value, pointer: &str) -> Vec<String> {
    let mut schema = resolve(root, root);
    for token in pointer.split('/').skip(1) {
        let next = if token.chars().all(|c| c.is_ascii_digit()) {
            schema.get("items")
        } else {
            schema.get("properties").and_then(|p| p.get(token))
        };
        match next {
            Some(s) => schema = resolve(root, s),
            None => return Vec::new(),
        }
    }
    schema
        .get("properties")
        .and_then(Value::as_object)
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default()
}

/// Follows a local `$ref` (`#/$defs/Name`) and skips the `null` branch of an `anyOf`.
fn resolve<'a>(root: &'a Value, mut schema: &'a Value) -> &'a Value {
    for _ in 0..16 {
        if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
            match reference.strip_prefix('#').and_then(|p| root.pointer(p)) {
                Some(target) => schema = target,
                None => return schema,
            }
        } else if let Some(branches) = schema.get("anyOf").and_then(Value::as_array) {
            match branches
                .iter()
                .find(|b| b.get("type") != Some(&"null".into()))
            {
                Some(branch) => schema = branch,
                None => return schema,
            }
        } else {
            return schema;
        }
    }
    schema
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotted_paths_read_like_yaml() {
        assert_eq!(dotted("/sites/0/bgp/peers/1"), "sites[0].bgp.peers[1]");
        assert_eq!(dotted(""), "(top level)");
    }

    #[test]
    fn allowed_keys_follow_refs() {
        let schema = json_schema();
        let keys = allowed_keys(&schema, "/sites/0/bgp/peers/0");
        assert!(keys.contains(&"hold_time".to_owned()), "{keys:?}");
        assert!(keys.contains(&"bfd".to_owned()));
    }
}
