//! A YAML node tree that remembers the line of every node.
//!
//! serde-based YAML loaders stop at the first error and forget positions once a
//! value is parsed; the configuration walker needs both "every problem at once"
//! and a line number for semantic errors (duplicate route name, bad topic), so it
//! works on this small tree built from `yaml-rust2`'s marked events.

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// One YAML node with the 1-based line it starts on.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// 1-based line in the source file.
    pub line: usize,
    /// The value.
    pub kind: NodeKind,
}

/// The shape of a node.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeKind {
    /// A scalar; `quoted` is true for single- or double-quoted scalars, which are always strings.
    Scalar {
        /// Text of the scalar.
        value: String,
        /// Whether the scalar was quoted in the source.
        quoted: bool,
    },
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in source order.
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// The node's scalar text, if it is a scalar.
    pub fn as_scalar(&self) -> Option<&str> {
        match &self.kind {
            NodeKind::Scalar { value, .. } => Some(value),
            _ => None,
        }
    }

    /// Whether this scalar is YAML null (`~`, `null`, or empty plain scalar).
    pub fn is_null(&self) -> bool {
        matches!(&self.kind, NodeKind::Scalar { value, quoted: false } if value.is_empty() || value == "~" || value == "null" || value == "Null" || value == "NULL")
    }

    /// A short name of the node's type for error messages.
    pub fn type_name(&self) -> &'static str {
        match &self.kind {
            NodeKind::Scalar { .. } if self.is_null() => "null",
            NodeKind::Scalar { .. } => "a scalar",
            NodeKind::Seq(_) => "a list",
            NodeKind::Map(_) => "a mapping",
        }
    }
}

/// The node as JSON: plain scalars become numbers, booleans or null where they read as
/// such, quoted scalars stay strings; mapping keys are strings.
pub fn to_json(node: &Node) -> serde_json::Value {
    use serde_json::Value;
    match &node.kind {
        NodeKind::Scalar {
            value,
            quoted: true,
        } => Value::String(value.clone()),
        NodeKind::Scalar { .. } if node.is_null() => Value::Null,
        NodeKind::Scalar { value, .. } => match value.as_str() {
            "true" | "True" | "TRUE" => Value::Bool(true),
            "false" | "False" | "FALSE" => Value::Bool(false),
            v => v
                .parse::<i64>()
                .map(Value::from)
                .or_else(|_| v.parse::<f64>().map(Value::from))
                .unwrap_or_else(|_| Value::String(v.to_string())),
        },
        NodeKind::Seq(items) => Value::Array(items.iter().map(to_json).collect()),
        NodeKind::Map(entries) => Value::Object(
            entries
                .iter()
                .map(|(k, v)| (k.as_scalar().unwrap_or_default().to_string(), to_json(v)))
                .collect(),
        ),
    }
}

/// A YAML syntax error with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxError {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub col: usize,
    /// What the parser said.
    pub message: String,
}

/// Most nodes that aliases may add to a file (each alias copies its anchored node): a
/// "billion laughs" file of nested aliases is refused instead of growing without bound.
pub const MAX_ALIAS_NODES: usize = 100_000;
/// Most bytes that aliases may add to a file (scalar text, plus 64 bytes a node for the tree):
/// a long scalar copied by nested aliases is refused however few nodes it takes.
pub const MAX_ALIAS_BYTES: usize = 16 * 1024 * 1024;
/// What one node of the tree costs besides its text, for [`MAX_ALIAS_BYTES`].
const NODE_BYTES: usize = 64;
/// Deepest nesting of mappings and lists accepted.
pub const MAX_DEPTH: usize = 64;

/// Parses every document of a YAML stream. Empty documents are skipped.
pub fn parse_documents(text: &str) -> Result<Vec<Node>, SyntaxError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    parser.load(&mut builder, true).map_err(|e| SyntaxError {
        line: e.marker().line(),
        col: e.marker().col() + 1,
        message: e.info().to_string(),
    })?;
    if let Some(msg) = builder.error {
        return Err(msg);
    }
    Ok(builder.docs)
}

#[derive(Default)]
struct Builder {
    docs: Vec<Node>,
    stack: Vec<Partial>,
    /// Anchored nodes with their size in nodes and in bytes.
    anchors: Vec<(usize, Node, (usize, usize))>,
    /// Nodes added by aliases so far.
    alias_nodes: usize,
    /// Bytes added by aliases so far.
    alias_bytes: usize,
    error: Option<SyntaxError>,
}

/// Number of nodes in a tree, and its bytes (scalar text plus [`NODE_BYTES`] a node).
fn size(node: &Node) -> (usize, usize) {
    let add = |a: (usize, usize), b: (usize, usize)| (a.0 + b.0, a.1.saturating_add(b.1));
    let own = match &node.kind {
        NodeKind::Scalar { value, .. } => (0, value.len()),
        NodeKind::Seq(items) => items.iter().map(size).fold((0, 0), add),
        NodeKind::Map(entries) => entries
            .iter()
            .map(|(k, v)| add(size(k), size(v)))
            .fold((0, 0), add),
    };
    add((1, NODE_BYTES), own)
}

enum Partial {
    Seq(usize, usize, Vec<Node>),
    Map(usize, usize, Vec<(Node, Node)>, Option<Node>),
}

impl Builder {
    fn push_value(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => self.docs.push(node),
            Some(Partial::Seq(_, _, items)) => items.push(node),
            Some(Partial::Map(_, _, entries, pending_key)) => match pending_key.take() {
                None => *pending_key = Some(node),
                Some(key) => entries.push((key, node)),
            },
        }
    }

    fn remember(&mut self, anchor: usize, node: &Node) {
        if anchor > 0 {
            self.anchors.push((anchor, node.clone(), size(node)));
        }
    }

    fn fail(&mut self, mark: Marker, message: String) {
        self.error.get_or_insert(SyntaxError {
            line: mark.line(),
            col: mark.col() + 1,
            message,
        });
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let line = mark.line();
        if self.error.is_some() {
            // The file is refused: nothing more is built.
            return;
        }
        match ev {
            Event::Scalar(value, style, anchor, _tag) => {
                let quoted = matches!(
                    style,
                    TScalarStyle::SingleQuoted | TScalarStyle::DoubleQuoted
                );
                let node = Node {
                    line,
                    kind: NodeKind::Scalar { value, quoted },
                };
                self.remember(anchor, &node);
                self.push_value(node);
            }
            Event::SequenceStart(..) | Event::MappingStart(..) if self.stack.len() >= MAX_DEPTH => {
                self.fail(
                    mark,
                    format!("nested more than {MAX_DEPTH} levels deep; refused"),
                );
            }
            Event::SequenceStart(anchor, _) => self.stack.push(Partial::Seq(line, anchor, vec![])),
            Event::MappingStart(anchor, _) => {
                self.stack.push(Partial::Map(line, anchor, vec![], None))
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let node = match self.stack.pop() {
                    Some(Partial::Seq(line, anchor, items)) => {
                        let n = Node {
                            line,
                            kind: NodeKind::Seq(items),
                        };
                        self.remember(anchor, &n);
                        n
                    }
                    Some(Partial::Map(line, anchor, entries, _)) => {
                        let n = Node {
                            line,
                            kind: NodeKind::Map(entries),
                        };
                        self.remember(anchor, &n);
                        n
                    }
                    None => return,
                };
                self.push_value(node);
            }
            Event::Alias(id) => match self.anchors.iter().rev().find(|(a, _, _)| *a == id) {
                Some((_, _, (n, _))) if self.alias_nodes + n > MAX_ALIAS_NODES => {
                    let message = format!(
                        "aliases expand to more than {MAX_ALIAS_NODES} nodes (nested anchors and aliases, a \"billion laughs\" file?); refused"
                    );
                    self.fail(mark, message);
                }
                Some((_, _, (_, b))) if self.alias_bytes.saturating_add(*b) > MAX_ALIAS_BYTES => {
                    let message = format!(
                        "aliases expand to more than {} MiB (long values copied by nested aliases?); refused",
                        MAX_ALIAS_BYTES >> 20
                    );
                    self.fail(mark, message);
                }
                Some((_, node, (n, b))) => {
                    let node = node.clone();
                    self.alias_nodes += *n;
                    self.alias_bytes += *b;
                    self.push_value(node);
                }
                None => self.fail(mark, "alias refers to an unknown anchor".into()),
            },
            Event::DocumentEnd => {
                // A document that held only null/empty is dropped by the caller.
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentStart => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_recorded_for_nested_nodes() {
        let docs = parse_documents("a: 1\nb:\n  c: [x, y]\n---\nz: 'q'\n").unwrap();
        assert_eq!(docs.len(), 2);
        let NodeKind::Map(entries) = &docs[0].kind else {
            panic!("not a map")
        };
        assert_eq!(entries[1].0.line, 2);
        let NodeKind::Map(inner) = &entries[1].1.kind else {
            panic!("not a map")
        };
        assert_eq!(inner[0].0.line, 3);
        let NodeKind::Map(z) = &docs[1].kind else {
            panic!("not a map")
        };
        assert_eq!(
            z[0].1.kind,
            NodeKind::Scalar {
                value: "q".into(),
                quoted: true
            }
        );
    }

    #[test]
    fn syntax_errors_carry_a_position() {
        let err = parse_documents("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.line >= 1, "{err:?}");
    }

    #[test]
    fn nodes_convert_to_json_with_yaml_scalar_types() {
        let docs = parse_documents(
            "{field: severity, min: 3, ratio: 0.5, on: true, q: '3', n: ~, l: [a, 1]}",
        )
        .unwrap();
        assert_eq!(
            to_json(&docs[0]).to_string(),
            r#"{"field":"severity","l":["a",1],"min":3,"n":null,"on":true,"q":"3","ratio":0.5}"#
        );
    }

    #[test]
    fn an_alias_bomb_is_refused_quickly_with_bounded_memory() {
        // 10 levels of 9 aliases each: 9^10 (3.5 billion) nodes if expanded. This one is 861
        // bytes under an unknown key, as in the report.
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let started = std::time::Instant::now();
        let err =
            parse_documents(&format!("unknownKey:\n  {}", text.replace('\n', "\n  "))).unwrap_err();
        assert!(
            err.message.contains("aliases expand to more than"),
            "{err:?}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn deep_nesting_is_refused() {
        let text = format!("{}1{}", "[".repeat(100), "]".repeat(100));
        let err = parse_documents(&text).unwrap_err();
        assert!(
            err.message.contains("nested more than 64 levels"),
            "{err:?}"
        );
    }

    #[test]
    fn aliases_of_a_long_scalar_are_refused_by_their_bytes() {
        // The issue's file: a 10 KB scalar, 5 levels of 9 aliases (9^5 copies, 590 MB of
        // text in 59,000 nodes: under the node cap, far over the byte cap).
        let mut text = format!("a0: &a0 \"{}\"\n", "x".repeat(10_000));
        for level in 1..=5 {
            let refs = vec![format!("*a{}", level - 1); 9].join(", ");
            text.push_str(&format!("a{level}: &a{level} [{refs}]\n"));
        }
        assert!(text.len() < 21_000);
        let started = std::time::Instant::now();
        let err = parse_documents(&text).unwrap_err();
        assert!(err.message.contains("MiB"), "{}", err.message);
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn aliases_expand_to_the_anchored_node() {
        let docs = parse_documents("a: &x {k: v}\nb: *x\n").unwrap();
        let NodeKind::Map(entries) = &docs[0].kind else {
            panic!()
        };
        assert_eq!(entries[0].1.kind, entries[1].1.kind);
    }
}
