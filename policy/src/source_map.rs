//! The parsed YAML as a JSON value, plus a map from JSON Pointer (RFC 6901) to source marks.
//!
//! Everything after parsing (schema validation, serde, semantic checks) speaks JSON Pointers
//! such as `/groups/0/vms/1/mac`; this map turns them back into `line:column`.

use std::collections::HashMap;

use serde_json::{Map, Number, Value};

use crate::diagnostic::{Diagnostic, Mark};
use crate::yaml::{Node, NodeKind};

#[derive(Debug, Clone, Copy)]
struct Marks {
    value: Mark,
    key: Option<Mark>,
}

/// Where each value (and each mapping key) of the document starts.
#[derive(Debug, Default)]
pub struct SourceMap {
    marks: HashMap<String, Marks>,
}

impl SourceMap {
    /// The mark of the value at `pointer`, or of its nearest ancestor that exists (a missing key
    /// is reported at the mapping that lacks it).
    pub fn value(&self, pointer: &str) -> Mark {
        let mut p = pointer;
        loop {
            if let Some(m) = self.marks.get(p) {
                return m.value;
            }
            match p.rfind('/') {
                Some(i) => p = &p[..i],
                None => return Mark::START,
            }
        }
    }

    /// The mark of the key that names the value at `pointer` (for unknown keys), else its value.
    pub fn key(&self, pointer: &str) -> Mark {
        match self.marks.get(pointer) {
            Some(Marks { key: Some(k), .. }) => *k,
            _ => self.value(pointer),
        }
    }
}

/// Appends one reference token to a JSON Pointer, escaped per RFC 6901.
pub fn pointer_push(pointer: &str, token: &str) -> String {
    format!("{pointer}/{}", token.replace('~', "~0").replace('/', "~1"))
}

/// Converts the YAML tree to JSON, recording marks. Non-finite floats have no JSON form and are
/// reported.
pub fn to_json(root: &Node) -> (Value, SourceMap, Vec<Diagnostic>) {
    let mut map = SourceMap::default();
    let mut diagnostics = Vec::new();
    let value = convert(root, String::new(), None, &mut map, &mut diagnostics);
    (value, map, diagnostics)
}

fn convert(
    node: &Node,
    pointer: String,
    key: Option<Mark>,
    map: &mut SourceMap,
    diagnostics: &mut Vec<Diagnostic>,
) -> Value {
    let value = match &node.kind {
        NodeKind::Null => Value::Null,
        NodeKind::Bool(b) => Value::Bool(*b),
        NodeKind::Int(i) => Value::Number((*i).into()),
        NodeKind::UInt(u) => Value::Number((*u).into()),
        NodeKind::Float(f) => match Number::from_f64(*f) {
            Some(n) => Value::Number(n),
            None => {
                diagnostics.push(Diagnostic::error(
                    node.mark,
                    "infinity and NaN are not allowed in a policy",
                ));
                Value::Null
            }
        },
        NodeKind::Str(s) => Value::String(s.clone()),
        NodeKind::Seq(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let p = pointer_push(&pointer, &i.to_string());
                    convert(item, p, None, map, diagnostics)
                })
                .collect(),
        ),
        NodeKind::Map(entries) => {
            let mut object = Map::new();
            for entry in entries {
                let p = pointer_push(&pointer, &entry.key);
                let v = convert(&entry.value, p, Some(entry.key_mark), map, diagnostics);
                object.insert(entry.key.clone(), v);
            }
            Value::Object(object)
        }
    };
    map.marks.insert(
        pointer,
        Marks {
            value: node.mark,
            key,
        },
    );
    value
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml::parse;

    #[test]
    fn pointers_resolve_to_marks() {
        let root = parse("sites:\n  - name: a\n    x/y: 1\n")
            .expect("parses")
            .root;
        let (value, map, diags) = to_json(&root);
        assert!(diags.is_empty());
        assert_eq!(value["sites"][0]["name"], "a");
        assert_eq!(map.value("/sites/0/name"), Mark::new(2, 11));
        assert_eq!(map.key("/sites/0/name"), Mark::new(2, 5));
        assert_eq!(map.key("/sites/0/x~1y"), Mark::new(3, 5));
        // A key that is not there is reported at the mapping that lacks it.
        assert_eq!(map.value("/sites/0/missing"), Mark::new(2, 5));
    }
}
