//! YAML text to a tree of values that remember where they start, within budgets.
//!
//! We read the event stream of `saphyr-parser` ourselves, instead of deserializing with a serde
//! YAML crate, for three reasons: every value and every key keeps its `line:column`, so semantic
//! errors found long after parsing still point at the text; scalars are resolved with the YAML 1.2
//! core schema (so `52:54:00:12:34:56` stays a string and `yes` is not a boolean); and hostile
//! input is bounded: nesting depth, node count and alias expansion ("billion laughs") all have
//! limits checked as the tree grows, so a bomb is refused after a few thousand nodes, not after
//! it has eaten the memory.
//!
//! Merge keys (`<<: *defaults`) are supported, as operators use them to share peer settings.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, Span, Tag};

use crate::diagnostic::{Diagnostic, Mark};

/// Deepest nesting accepted; the policy itself is at most 6 levels deep.
pub const MAX_DEPTH: usize = 64;
/// Most nodes a document may hold, aliases expanded.
pub const MAX_NODES: usize = 1_000_000;
/// Most nodes that aliases may add; a billion-laughs document passes this within a few levels.
pub const MAX_ALIAS_NODES: usize = 100_000;

/// A YAML value with the mark of its first character.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub kind: NodeKind,
    pub mark: Mark,
    /// Nodes in this subtree, itself included: what copying it for an alias costs.
    size: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum NodeKind {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<Entry>),
}

/// One `key: value` of a mapping; keys are always strings in a policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub key: String,
    pub key_mark: Mark,
    pub value: Node,
}

/// The parsed document, with the non-fatal findings (duplicate keys) made along the way.
#[derive(Debug)]
pub struct Parsed {
    pub root: Node,
    pub diagnostics: Vec<Diagnostic>,
}

/// Parses one YAML document. Syntax errors, budget overruns and unsupported constructs are
/// fatal (`Err`); duplicate keys are reported in `Parsed::diagnostics` and the first one kept.
pub fn parse(text: &str) -> Result<Parsed, Diagnostic> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    while let Some(event) = parser.next_event() {
        let (event, span) = event.map_err(|e| {
            let mark = mark_of(e.marker().line(), e.marker().col());
            if e.info().contains("recursion limit") {
                Diagnostic::error(mark, depth_message())
            } else {
                Diagnostic::error(mark, format!("YAML syntax error: {}", e.info()))
            }
        })?;
        builder.on_event(event, span)?;
    }
    let root = builder.root.ok_or_else(|| {
        Diagnostic::error(
            Mark::START,
            "the file is empty: a policy needs at least `version`, `sites`, `prefixes` and `groups`",
        )
    })?;
    Ok(Parsed {
        root,
        diagnostics: builder.diagnostics,
    })
}

fn depth_message() -> String {
    format!("nesting deeper than {MAX_DEPTH} levels: this is not a policy")
}

fn mark_of(line: usize, col0: usize) -> Mark {
    Mark::new(line.max(1), col0 + 1)
}

fn span_mark(span: &Span) -> Mark {
    mark_of(span.start.line(), span.start.col())
}

enum Frame {
    Seq {
        mark: Mark,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        mark: Mark,
        anchor: usize,
        entries: Vec<Entry>,
        seen: HashMap<String, Mark>,
        pending_key: Option<PendingKey>,
        merges: Vec<Node>,
    },
}

enum PendingKey {
    Key(String, Mark),
    Merge,
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    anchors: HashMap<usize, Node>,
    root: Option<Node>,
    documents: usize,
    nodes: usize,
    alias_nodes: usize,
    diagnostics: Vec<Diagnostic>,
}

impl Builder {
    fn on_event(&mut self, event: Event<'_>, span: Span) -> Result<(), Diagnostic> {
        let mark = span_mark(&span);
        match event {
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => Ok(()),
            Event::DocumentStart(_) => {
                self.documents += 1;
                if self.documents > 1 {
                    return Err(Diagnostic::error(
                        mark,
                        "a second YAML document: a policy file holds exactly one",
                    ));
                }
                Ok(())
            }
            Event::Scalar(text, style, anchor, tag) => {
                if self.awaiting_key() {
                    return self.on_key(&text, style, mark);
                }
                let kind = resolve_scalar(&text, style, tag.as_deref(), mark)?;
                self.complete(
                    Node {
                        kind,
                        mark,
                        size: 1,
                    },
                    anchor,
                )
            }
            Event::Alias(id) => {
                if self.awaiting_key() {
                    return Err(Diagnostic::error(mark, "an alias cannot be a mapping key"));
                }
                let mut node = self
                    .anchors
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| Diagnostic::error(mark, "alias to an unknown anchor"))?;
                self.alias_nodes += node.size;
                if self.alias_nodes > MAX_ALIAS_NODES {
                    return Err(Diagnostic::error(
                        mark,
                        format!(
                            "aliases expand to more than {MAX_ALIAS_NODES} nodes \
                             (a \"billion laughs\" document?)"
                        ),
                    ));
                }
                node.mark = mark;
                self.complete(node, 0)
            }
            Event::SequenceStart(anchor, tag) => {
                self.open(mark, tag.as_deref(), "seq")?;
                self.stack.push(Frame::Seq {
                    mark,
                    anchor,
                    items: Vec::new(),
                });
                Ok(())
            }
            Event::MappingStart(anchor, tag) => {
                self.open(mark, tag.as_deref(), "map")?;
                self.stack.push(Frame::Map {
                    mark,
                    anchor,
                    entries: Vec::new(),
                    seen: HashMap::new(),
                    pending_key: None,
                    merges: Vec::new(),
                });
                Ok(())
            }
            Event::SequenceEnd => match self.stack.pop() {
                Some(Frame::Seq {
                    mark,
                    anchor,
                    items,
                }) => {
                    let size = 1 + items.iter().map(|n| n.size).sum::<usize>();
                    let kind = NodeKind::Seq(items);
                    self.complete(Node { kind, mark, size }, anchor)
                }
                _ => Err(Diagnostic::error(mark, "unbalanced end of sequence")),
            },
            Event::MappingEnd => match self.stack.pop() {
                Some(Frame::Map {
                    mark,
                    anchor,
                    mut entries,
                    mut seen,
                    merges,
                    ..
                }) => {
                    apply_merges(&mut entries, &mut seen, merges)?;
                    let size = 1 + entries.iter().map(|e| e.value.size).sum::<usize>();
                    let kind = NodeKind::Map(entries);
                    self.complete(Node { kind, mark, size }, anchor)
                }
                _ => Err(Diagnostic::error(mark, "unbalanced end of mapping")),
            },
        }
    }

    fn awaiting_key(&self) -> bool {
        matches!(
            self.stack.last(),
            Some(Frame::Map {
                pending_key: None,
                ..
            })
        )
    }

    /// A collection starts: it may not be a key, nor nest too deep, nor carry a foreign tag.
    fn open(&mut self, mark: Mark, tag: Option<&Tag>, core: &str) -> Result<(), Diagnostic> {
        if self.awaiting_key() {
            return Err(Diagnostic::error(
                mark,
                "a mapping key must be a plain string, not a sequence or mapping",
            ));
        }
        if self.stack.len() >= MAX_DEPTH {
            return Err(Diagnostic::error(mark, depth_message()));
        }
        if let Some(tag) = tag
            && !(tag.is_yaml_core_schema() && tag.suffix == core)
        {
            return Err(unsupported_tag(tag, mark));
        }
        self.count_node(mark)
    }

    fn count_node(&mut self, mark: Mark) -> Result<(), Diagnostic> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(Diagnostic::error(
                mark,
                format!("more than {MAX_NODES} YAML nodes: this is not a policy"),
            ));
        }
        Ok(())
    }

    fn on_key(&mut self, text: &str, style: ScalarStyle, mark: Mark) -> Result<(), Diagnostic> {
        self.count_node(mark)?;
        let Some(Frame::Map {
            seen, pending_key, ..
        }) = self.stack.last_mut()
        else {
            unreachable!("on_key is only called when a mapping awaits a key");
        };
        if text == "<<" && style == ScalarStyle::Plain {
            *pending_key = Some(PendingKey::Merge);
            return Ok(());
        }
        if let Some(first) = seen.get(text) {
            self.diagnostics.push(Diagnostic::error(
                mark,
                format!("duplicate key `{text}` (first given at {first}); the first is kept"),
            ));
        } else {
            seen.insert(text.to_owned(), mark);
        }
        *pending_key = Some(PendingKey::Key(text.to_owned(), mark));
        Ok(())
    }

    /// A value is complete: remember its anchor, then place it in its parent (or as the root).
    fn complete(&mut self, node: Node, anchor: usize) -> Result<(), Diagnostic> {
        if node.size == 1 && !matches!(node.kind, NodeKind::Seq(_) | NodeKind::Map(_)) {
            self.count_node(node.mark)?;
        }
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => {
                self.root = Some(node);
            }
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map {
                entries,
                seen,
                pending_key,
                merges,
                ..
            }) => match pending_key.take() {
                Some(PendingKey::Merge) => merges.push(node),
                Some(PendingKey::Key(key, key_mark)) => {
                    // A duplicate was reported when its key was read; keep the first value.
                    if seen.get(&key) == Some(&key_mark) {
                        entries.push(Entry {
                            key,
                            key_mark,
                            value: node,
                        });
                    }
                }
                None => unreachable!("keys are consumed by on_key"),
            },
        }
        Ok(())
    }
}

/// `<<: *a` or `<<: [*a, *b]`: copies entries of the named mappings whose keys are not set here.
fn apply_merges(
    entries: &mut Vec<Entry>,
    seen: &mut HashMap<String, Mark>,
    merges: Vec<Node>,
) -> Result<(), Diagnostic> {
    for merge in merges {
        let sources = match merge.kind {
            NodeKind::Map(map) => vec![map],
            NodeKind::Seq(items) => items
                .into_iter()
                .map(|item| match item.kind {
                    NodeKind::Map(map) => Ok(map),
                    _ => Err(Diagnostic::error(
                        item.mark,
                        "a merge key (`<<`) takes a mapping or a list of mappings",
                    )),
                })
                .collect::<Result<_, _>>()?,
            _ => {
                return Err(Diagnostic::error(
                    merge.mark,
                    "a merge key (`<<`) takes a mapping or a list of mappings",
                ));
            }
        };
        for entry in sources.into_iter().flatten() {
            if !seen.contains_key(&entry.key) {
                seen.insert(entry.key.clone(), entry.key_mark);
                entries.push(entry);
            }
        }
    }
    Ok(())
}

fn unsupported_tag(tag: &Tag, mark: Mark) -> Diagnostic {
    Diagnostic::error(
        mark,
        format!(
            "unsupported YAML tag `{}{}`: a policy uses plain values",
            tag.handle, tag.suffix
        ),
    )
}

/// Resolves a scalar per the YAML 1.2 core schema; quoted scalars are always strings.
fn resolve_scalar(
    text: &str,
    style: ScalarStyle,
    tag: Option<&Tag>,
    mark: Mark,
) -> Result<NodeKind, Diagnostic> {
    let Some(tag) = tag else {
        return Ok(if style == ScalarStyle::Plain {
            resolve_plain(text, mark)?
        } else {
            NodeKind::Str(text.to_owned())
        });
    };
    if !tag.is_yaml_core_schema() {
        return Err(unsupported_tag(tag, mark));
    }
    let resolved = resolve_plain(text, mark)?;
    let ok = match tag.suffix.as_str() {
        "str" => return Ok(NodeKind::Str(text.to_owned())),
        "null" => matches!(resolved, NodeKind::Null),
        "bool" => matches!(resolved, NodeKind::Bool(_)),
        "int" => matches!(resolved, NodeKind::Int(_) | NodeKind::UInt(_)),
        "float" => match resolved {
            NodeKind::Int(i) => return Ok(NodeKind::Float(i as f64)),
            NodeKind::UInt(u) => return Ok(NodeKind::Float(u as f64)),
            NodeKind::Float(_) => true,
            _ => false,
        },
        _ => return Err(unsupported_tag(tag, mark)),
    };
    if ok {
        Ok(resolved)
    } else {
        Err(Diagnostic::error(
            mark,
            format!("`{text}` is not a valid !!{}", tag.suffix),
        ))
    }
}

fn resolve_plain(text: &str, mark: Mark) -> Result<NodeKind, Diagnostic> {
    Ok(match text {
        "" | "~" | "null" | "Null" | "NULL" => NodeKind::Null,
        "true" | "True" | "TRUE" => NodeKind::Bool(true),
        "false" | "False" | "FALSE" => NodeKind::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => NodeKind::Float(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => NodeKind::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => NodeKind::Float(f64::NAN),
        _ => {
            if let Some(kind) = resolve_int(text) {
                return kind.ok_or_else(|| {
                    Diagnostic::error(mark, format!("the number {text} is too large"))
                });
            }
            if is_core_float(text) {
                match text.parse::<f64>() {
                    Ok(f) => NodeKind::Float(f),
                    Err(_) => NodeKind::Str(text.to_owned()),
                }
            } else {
                NodeKind::Str(text.to_owned())
            }
        }
    })
}

/// `Some(Some(_))` for an integer that fits, `Some(None)` for one too large, `None` for no integer.
fn resolve_int(text: &str) -> Option<Option<NodeKind>> {
    let (digits, radix) = if let Some(hex) = text.strip_prefix("0x") {
        (hex, 16)
    } else if let Some(oct) = text.strip_prefix("0o") {
        (oct, 8)
    } else {
        (text, 10)
    };
    let body = if radix == 10 {
        digits.strip_prefix(['-', '+']).unwrap_or(digits)
    } else {
        digits
    };
    if body.is_empty() || !body.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    if let Ok(i) = i64::from_str_radix(digits, radix) {
        return Some(Some(NodeKind::Int(i)));
    }
    Some(u64::from_str_radix(digits, radix).ok().map(NodeKind::UInt))
}

/// The core schema's float pattern: `[-+]? ( \. [0-9]+ | [0-9]+ ( \. [0-9]* )? ) ( [eE] [-+]? [0-9]+ )?`
fn is_core_float(text: &str) -> bool {
    let s = text.strip_prefix(['-', '+']).unwrap_or(text);
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let digits = |t: &str| !t.is_empty() && t.chars().all(|c| c.is_ascii_digit());
    let mantissa_ok = match mantissa.split_once('.') {
        Some(("", frac)) => digits(frac),
        Some((int, frac)) => digits(int) && (frac.is_empty() || digits(frac)),
        None => digits(mantissa),
    };
    let exponent_ok = exponent.is_none_or(|e| digits(e.strip_prefix(['-', '+']).unwrap_or(e)));
    mantissa_ok && exponent_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(text: &str) -> Node {
        parse(text).expect("parses").root
    }

    #[test]
    fn scalars_follow_the_yaml_1_2_core_schema() {
        let NodeKind::Map(entries) = root(
            "a: 52:54:00:12:34:56\nb: yes\nc: 0x10\nd: 1.5\ne: ~\nf: '7'\ng: -3\nh: 1e3\ni: 65535:0\n",
        )
        .kind
        else {
            panic!("not a map")
        };
        let kinds: Vec<_> = entries.into_iter().map(|e| e.value.kind).collect();
        assert_eq!(
            kinds,
            vec![
                NodeKind::Str("52:54:00:12:34:56".into()),
                NodeKind::Str("yes".into()),
                NodeKind::Int(16),
                NodeKind::Float(1.5),
                NodeKind::Null,
                NodeKind::Str("7".into()),
                NodeKind::Int(-3),
                NodeKind::Float(1000.0),
                NodeKind::Str("65535:0".into()),
            ]
        );
    }

    #[test]
    fn marks_point_at_keys_and_values() {
        let NodeKind::Map(entries) = root("top:\n  inner: 5\n").kind else {
            panic!("not a map")
        };
        assert_eq!(entries[0].key_mark, Mark::new(1, 1));
        let NodeKind::Map(inner) = &entries[0].value.kind else {
            panic!("not a map")
        };
        assert_eq!(inner[0].key_mark, Mark::new(2, 3));
        assert_eq!(inner[0].value.mark, Mark::new(2, 10));
    }

    #[test]
    fn merge_keys_fill_in_missing_entries() {
        let NodeKind::Map(entries) = root("d: &d {x: 1, y: 2}\nm:\n  <<: *d\n  y: 3\n").kind else {
            panic!("not a map")
        };
        let NodeKind::Map(m) = &entries[1].value.kind else {
            panic!("not a map")
        };
        let pairs: Vec<_> = m.iter().map(|e| (e.key.as_str(), &e.value.kind)).collect();
        assert_eq!(
            pairs,
            vec![("y", &NodeKind::Int(3)), ("x", &NodeKind::Int(1))]
        );
    }

    #[test]
    fn duplicate_keys_are_reported_not_fatal() {
        let parsed = parse("a: 1\nb: 2\na: 3\n").expect("parses");
        assert_eq!(parsed.diagnostics.len(), 1);
        assert_eq!(parsed.diagnostics[0].mark, Mark::new(3, 1));
        assert!(parsed.diagnostics[0].message.contains("first given at 1:1"));
    }

    #[test]
    fn a_billion_laughs_is_refused_early() {
        let doc = include_str!("../tests/fixtures/billion-laughs.yaml");
        let err = parse(doc).unwrap_err();
        assert!(err.message.contains("billion laughs"), "{}", err.message);
    }

    #[test]
    fn deep_nesting_is_refused() {
        let err = parse(&"[".repeat(100)).unwrap_err();
        assert!(
            err.message.contains("nesting deeper than 64"),
            "{}",
            err.message
        );
        assert_eq!(err.mark, Mark::new(1, 65));
        // Far deeper input is stopped by the parser's own limit, also as an error.
        let err = parse(&"[".repeat(1_000_000)).unwrap_err();
        assert!(
            err.message.contains("nesting deeper than 64"),
            "{}",
            err.message
        );
    }

    #[test]
    fn two_documents_are_refused() {
        let err = parse("a: 1\n---\nb: 2\n").unwrap_err();
        assert_eq!(err.mark.line, 2);
    }

    #[test]
    fn foreign_tags_are_refused() {
        let err = parse("a: !python/object 1\n").unwrap_err();
        assert!(
            err.message.contains("unsupported YAML tag"),
            "{}",
            err.message
        );
    }
}
