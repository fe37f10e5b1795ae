//! JSON Schema, compiled for constrained decoding.
//!
//! The supported subset is what structured-output clients send: `type` (one or a list),
//! `properties`, `required`, `additionalProperties`, `items`, `minItems`, `maxItems`,
//! `enum`, `const`, `anyOf`/`oneOf`, and `$ref` into `$defs`/`definitions`; annotations
//! (`title`, `description`, `default`, `examples`, `$comment`, `$schema`, `$id`) are
//! allowed and change nothing. Any other keyword is refused by name rather than ignored,
//! because ignoring it would let through output the schema forbids.
//!
//! Two choices keep the automaton a single path with a small, copyable state: the branches
//! of an `anyOf` must be told apart by their first byte (a string or null, an object or an
//! array), and an object's output holds only its declared properties, which every schema
//! allows whatever it says of additional ones.

use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use serde_json::{Map, Value};

use super::schema_cursor::{Cursor, MAX_DEPTH};
use super::{Constraint, Vocab};

pub(crate) type NodeId = u16;

/// Built-in nodes, present in every schema.
pub(crate) const ANY: NodeId = 0;
pub(crate) const ANY_OBJECT: NodeId = 1;
pub(crate) const ANY_ARRAY: NodeId = 2;
pub(crate) const ANY_LITERAL: NodeId = 3;
pub(crate) const ANY_STRING: NodeId = 4;
pub(crate) const ANY_NUMBER: NodeId = 5;

/// Most alternatives an `enum` or an object's properties may have: they are tracked as
/// bits of one word.
const MAX_ALTERNATIVES: usize = 64;
/// Longest serialized literal or key, in bytes.
const MAX_LITERAL: usize = 4096;
/// Longest minimal value of any part of a schema: what closing output cut short may add.
const MAX_MINIMAL: usize = 64 << 10;

#[derive(Debug)]
pub(crate) enum Node {
    /// Any JSON value.
    Any,
    String,
    /// `integer`: no fraction or exponent.
    Number {
        integer: bool,
    },
    /// Exactly one of these serialized values (`enum`, `const`, `boolean`, `null`).
    Literals(Vec<Vec<u8>>),
    /// `props` keys are serialized with their quotes. With no declared properties, `free`
    /// is the schema of every member's value (`None`: the object must be empty).
    Object {
        props: Vec<(Vec<u8>, NodeId)>,
        required: u64,
        free: Option<NodeId>,
    },
    Array {
        items: NodeId,
        min: u32,
        max: u32,
    },
    /// One of these, chosen by the value's first byte.
    Choice(Vec<NodeId>),
}

/// A compiled schema: its nodes, and the bytes each can start with.
#[derive(Debug)]
pub(crate) struct Schema {
    pub(crate) nodes: Vec<Node>,
    pub(crate) root: NodeId,
    first: Vec<[u64; 4]>,
}

impl Schema {
    pub(crate) fn starts_with(&self, node: NodeId, c: u8) -> bool {
        self.first[node as usize][c as usize / 64] & (1 << (c % 64)) != 0
    }

    /// The shortest valid value of `node`, for closing output cut short.
    pub(crate) fn minimal(&self, node: NodeId, out: &mut String) {
        match &self.nodes[node as usize] {
            Node::Any => out.push_str("null"),
            Node::String => out.push_str("\"\""),
            Node::Number { .. } => out.push('0'),
            Node::Literals(values) => out.push_str(&String::from_utf8_lossy(&values[0])),
            Node::Object { props, required, .. } => {
                out.push('{');
                self.members(props, *required, false, out);
                out.push('}');
            }
            Node::Array { items, min, .. } => {
                out.push('[');
                for i in 0..*min {
                    if i > 0 {
                        out.push(',');
                    }
                    self.minimal(*items, out);
                }
                out.push(']');
            }
            Node::Choice(branches) => self.minimal(branches[0], out),
        }
    }

    /// `"key":value` for each property in `which`, with minimal values; `comma`: one goes
    /// before the first.
    pub(crate) fn members(&self, props: &[(Vec<u8>, NodeId)], which: u64, mut comma: bool, out: &mut String) {
        for (i, (key, value)) in props.iter().enumerate() {
            if which & (1 << i) != 0 {
                if comma {
                    out.push(',');
                }
                comma = true;
                out.push_str(&String::from_utf8_lossy(key));
                out.push(':');
                self.minimal(*value, out);
            }
        }
    }
}

/// Why a schema cannot be used, naming the keyword and where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchemaError {
    pub message: String,
}

impl std::fmt::Display for SchemaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for SchemaError {}

fn refuse<T>(at: &str, message: impl std::fmt::Display) -> Result<T, SchemaError> {
    let at = if at.is_empty() { "the schema's root" } else { at };
    Err(SchemaError { message: format!("{message} (at {at})") })
}

const ANNOTATIONS: &[&str] = &["title", "description", "default", "examples", "$comment", "$schema", "$id"];
const KEYWORDS: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "$ref",
    "$defs",
    "definitions",
];
const TYPES: &[&str] = &["null", "boolean", "integer", "number", "string", "object", "array"];

struct Compiler<'a> {
    root: &'a Value,
    nodes: Vec<Node>,
    /// `$ref` targets compiled so far, and those being compiled (a cycle).
    refs: HashMap<String, NodeId>,
    open_refs: HashSet<String>,
}

impl<'a> Compiler<'a> {
    fn add(&mut self, node: Node, at: &str) -> Result<NodeId, SchemaError> {
        if self.nodes.len() >= usize::from(u16::MAX) {
            return refuse(at, "the schema is too large");
        }
        self.nodes.push(node);
        Ok((self.nodes.len() - 1) as NodeId)
    }

    fn compile(&mut self, schema: &'a Value, at: &str) -> Result<NodeId, SchemaError> {
        let object = match schema {
            Value::Bool(true) => return Ok(ANY),
            Value::Bool(false) => return refuse(at, "a schema of false admits no value"),
            Value::Object(o) => o,
            _ => return refuse(at, "a schema must be an object or a boolean"),
        };
        for key in object.keys() {
            if !KEYWORDS.contains(&key.as_str()) && !ANNOTATIONS.contains(&key.as_str()) {
                return refuse(at, format!("the keyword {key:?} is not supported"));
            }
        }
        if let Some(target) = object.get("$ref") {
            return self.reference(object, target, at);
        }
        let choice = match (object.get("anyOf"), object.get("oneOf")) {
            (Some(_), Some(_)) => return refuse(at, "use anyOf or oneOf, not both"),
            (Some(b), None) => Some(("anyOf", b)),
            (None, Some(b)) => Some(("oneOf", b)),
            (None, None) => None,
        };
        if let Some((keyword, branches)) = choice {
            let constraining =
                |k: &&String| KEYWORDS.contains(&k.as_str()) && !matches!(k.as_str(), "$defs" | "definitions");
            if let Some(other) = object.keys().filter(constraining).find(|k| *k != keyword) {
                return refuse(at, format!("{keyword} cannot be combined with {other:?} here"));
            }
            let Some(list) = branches.as_array().filter(|l| !l.is_empty()) else {
                return refuse(at, format!("{keyword} must be a non-empty array of schemas"));
            };
            let mut ids = Vec::with_capacity(list.len());
            for (i, b) in list.iter().enumerate() {
                ids.push(self.compile(b, &format!("{at}/{keyword}/{i}"))?);
            }
            return self.choice(ids, keyword == "oneOf", at);
        }
        if object.contains_key("enum") || object.contains_key("const") {
            return self.literals(object, at);
        }
        let types: Vec<&str> = match object.get("type") {
            None => {
                let object_like =
                    ["properties", "required", "additionalProperties"].iter().any(|k| object.contains_key(*k));
                let array_like = ["items", "minItems", "maxItems"].iter().any(|k| object.contains_key(*k));
                match (object_like, array_like) {
                    (true, true) => return refuse(at, "give a type: the keywords here are for objects and arrays"),
                    (true, false) => vec!["object"],
                    (false, true) => vec!["array"],
                    (false, false) => return Ok(ANY),
                }
            }
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(list)) if !list.is_empty() => {
                let mut types = Vec::new();
                for t in list {
                    match t.as_str() {
                        Some(t) if !types.contains(&t) => types.push(t),
                        Some(t) => return refuse(at, format!("the type {t:?} is listed twice")),
                        None => return refuse(at, "type must be a string or a list of strings"),
                    }
                }
                types
            }
            Some(_) => return refuse(at, "type must be a string or a non-empty list of strings"),
        };
        if let Some(bad) = types.iter().find(|t| !TYPES.contains(t)) {
            return refuse(at, format!("unknown type {bad:?}"));
        }
        // "integer" is part of "number": listing both means any number.
        let types: Vec<&str> =
            if types.contains(&"number") { types.into_iter().filter(|t| *t != "integer").collect() } else { types };
        let mut ids = Vec::with_capacity(types.len());
        for t in &types {
            ids.push(self.typed(object, t, at)?);
        }
        if ids.len() == 1 {
            Ok(ids[0])
        } else {
            self.choice(ids, false, at)
        }
    }

    fn typed(&mut self, o: &'a Map<String, Value>, t: &str, at: &str) -> Result<NodeId, SchemaError> {
        let for_objects = ["properties", "required", "additionalProperties"];
        let for_arrays = ["items", "minItems", "maxItems"];
        let misplaced = |keys: &[&str]| keys.iter().find(|k| o.contains_key(**k)).map(|k| k.to_string());
        if t != "object" {
            if let Some(k) = misplaced(&for_objects).filter(|_| !o.get("type").is_some_and(Value::is_array)) {
                return refuse(at, format!("{k:?} applies to objects, but the type is {t:?}"));
            }
        }
        if t != "array" {
            if let Some(k) = misplaced(&for_arrays).filter(|_| !o.get("type").is_some_and(Value::is_array)) {
                return refuse(at, format!("{k:?} applies to arrays, but the type is {t:?}"));
            }
        }
        match t {
            "null" => self.add(Node::Literals(vec![b"null".to_vec()]), at),
            "boolean" => self.add(Node::Literals(vec![b"true".to_vec(), b"false".to_vec()]), at),
            "integer" => self.add(Node::Number { integer: true }, at),
            "number" => Ok(ANY_NUMBER),
            "string" => Ok(ANY_STRING),
            "object" => self.object(o, at),
            _ => self.array(o, at),
        }
    }

    fn object(&mut self, o: &'a Map<String, Value>, at: &str) -> Result<NodeId, SchemaError> {
        let props: Vec<(&'a String, &'a Value)> = match o.get("properties") {
            None => Vec::new(),
            Some(Value::Object(p)) => p.iter().collect(),
            Some(_) => return refuse(at, "properties must be an object"),
        };
        if props.len() > MAX_ALTERNATIVES {
            return refuse(at, format!("an object may declare at most {MAX_ALTERNATIVES} properties"));
        }
        let mut compiled = Vec::with_capacity(props.len());
        for &(name, schema) in &props {
            let key = serde_json::to_vec(name).map_err(|e| SchemaError { message: e.to_string() })?;
            if key.len() > MAX_LITERAL {
                return refuse(at, format!("a property name is longer than {MAX_LITERAL} bytes"));
            }
            let value = self.compile(schema, &format!("{at}/properties/{name}"))?;
            compiled.push((key, value));
        }
        let mut required = 0u64;
        match o.get("required") {
            None => {}
            Some(Value::Array(names)) => {
                for n in names {
                    let Some(n) = n.as_str() else { return refuse(at, "required must list property names") };
                    let Some(i) = props.iter().position(|(k, _)| *k == n) else {
                        return refuse(at, format!("the required property {n:?} is not declared in properties"));
                    };
                    required |= 1 << i;
                }
            }
            Some(_) => return refuse(at, "required must be an array of property names"),
        }
        let additional = match o.get("additionalProperties") {
            None | Some(Value::Bool(true)) => Some(ANY),
            Some(Value::Bool(false)) => None,
            Some(s @ Value::Object(_)) => Some(self.compile(s, &format!("{at}/additionalProperties"))?),
            Some(_) => return refuse(at, "additionalProperties must be a boolean or a schema"),
        };
        // Declared properties are all an object's output holds; only a map has free keys.
        let free = if compiled.is_empty() { additional } else { None };
        if compiled.is_empty() && free == Some(ANY) {
            return Ok(ANY_OBJECT);
        }
        self.add(Node::Object { props: compiled, required, free }, at)
    }

    fn array(&mut self, o: &'a Map<String, Value>, at: &str) -> Result<NodeId, SchemaError> {
        let items = match o.get("items") {
            None => ANY,
            Some(Value::Array(_)) => return refuse(at, "tuple items (an array of schemas) are not supported"),
            Some(s) => self.compile(s, &format!("{at}/items"))?,
        };
        let bound = |k: &str| -> Result<Option<u32>, SchemaError> {
            match o.get(k) {
                None => Ok(None),
                Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
                    Some(n) => Ok(Some(n)),
                    None => refuse(at, format!("{k} must be a non-negative integer")),
                },
            }
        };
        let (min, max) = (bound("minItems")?.unwrap_or(0), bound("maxItems")?.unwrap_or(u32::MAX));
        if min > max {
            return refuse(at, format!("minItems ({min}) is larger than maxItems ({max})"));
        }
        if items == ANY && min == 0 && max == u32::MAX {
            return Ok(ANY_ARRAY);
        }
        self.add(Node::Array { items, min, max }, at)
    }

    fn literals(&mut self, o: &Map<String, Value>, at: &str) -> Result<NodeId, SchemaError> {
        if let Some(k) =
            o.keys().find(|k| !matches!(k.as_str(), "enum" | "const" | "type") && KEYWORDS.contains(&k.as_str()))
        {
            return refuse(at, format!("enum and const cannot be combined with {k:?} here"));
        }
        let values: Vec<&Value> = match (o.get("enum"), o.get("const")) {
            (Some(_), Some(_)) => return refuse(at, "use enum or const, not both"),
            (Some(Value::Array(list)), None) if !list.is_empty() => list.iter().collect(),
            (Some(_), None) => return refuse(at, "enum must be a non-empty array"),
            (None, Some(v)) => vec![v],
            (None, None) => return refuse(at, "expected enum or const"),
        };
        let types: Vec<&str> = match o.get("type") {
            None => TYPES.to_vec(),
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(l)) => l.iter().filter_map(Value::as_str).collect(),
            Some(_) => return refuse(at, "type must be a string or a list of strings"),
        };
        let mut serialized = Vec::new();
        for v in values {
            if !types.iter().any(|t| is_of_type(v, t)) {
                return refuse(at, format!("the value {v} does not have the schema's type"));
            }
            let bytes = serde_json::to_vec(v).map_err(|e| SchemaError { message: e.to_string() })?;
            if bytes.len() > MAX_LITERAL {
                return refuse(at, format!("an enum or const value is longer than {MAX_LITERAL} bytes"));
            }
            if !serialized.contains(&bytes) {
                serialized.push(bytes);
            }
        }
        if serialized.len() > MAX_ALTERNATIVES {
            return refuse(at, format!("an enum may hold at most {MAX_ALTERNATIVES} values"));
        }
        self.add(Node::Literals(serialized), at)
    }

    fn reference(&mut self, o: &Map<String, Value>, target: &Value, at: &str) -> Result<NodeId, SchemaError> {
        if let Some(k) =
            o.keys().find(|k| KEYWORDS.contains(&k.as_str()) && !matches!(k.as_str(), "$ref" | "$defs" | "definitions"))
        {
            return refuse(at, format!("$ref cannot be combined with {k:?}"));
        }
        let Some(path) = target.as_str() else { return refuse(at, "$ref must be a string") };
        let name = path.strip_prefix("#/$defs/").or_else(|| path.strip_prefix("#/definitions/"));
        let Some(name) = name.filter(|n| !n.contains('/')) else {
            return refuse(at, format!("$ref {path:?}: only references to #/$defs/<name> are supported"));
        };
        if let Some(&id) = self.refs.get(path) {
            return Ok(id);
        }
        if !self.open_refs.insert(path.to_string()) {
            return refuse(at, format!("$ref {path:?} refers to itself: recursive schemas are not supported"));
        }
        let section = if path.starts_with("#/$defs/") { "$defs" } else { "definitions" };
        let Some(schema) = self.root.get(section).and_then(|d| d.get(name)) else {
            return refuse(at, format!("$ref {path:?} names no definition"));
        };
        let id = self.compile(schema, path.trim_start_matches('#'))?;
        self.open_refs.remove(path);
        self.refs.insert(path.to_string(), id);
        Ok(id)
    }

    /// Branches merged where one covers another, then checked to start differently, so a
    /// value's first byte picks its branch. `exclusive` (`oneOf`): a value two branches
    /// admit is refused rather than merged, since it would match more than one.
    fn choice(&mut self, branches: Vec<NodeId>, exclusive: bool, at: &str) -> Result<NodeId, SchemaError> {
        let overlap = |what: String| refuse(at, format!("the oneOf branches overlap: {what} matches more than one"));
        let mut flat = Vec::new();
        let mut literals: Vec<Vec<u8>> = Vec::new();
        for b in branches {
            match &self.nodes[b as usize] {
                Node::Choice(inner) => flat.extend(inner.iter().copied()),
                Node::Literals(values) => {
                    for v in values {
                        if !literals.contains(v) {
                            literals.push(v.clone());
                        } else if exclusive {
                            return overlap(String::from_utf8_lossy(v).into_owned());
                        }
                    }
                }
                _ => flat.push(b),
            }
        }
        if !literals.is_empty() {
            if literals.len() > MAX_ALTERNATIVES {
                return refuse(at, format!("the branches hold more than {MAX_ALTERNATIVES} values"));
            }
            // Literals that another branch admits anyway are left to it.
            let first = first_bytes(&self.nodes, &flat);
            if exclusive {
                if let Some(l) = literals.iter().find(|l| self.covered(&flat, l)) {
                    return overlap(String::from_utf8_lossy(l).into_owned());
                }
            }
            literals.retain(|l| !self.covered(&flat, l));
            if let Some(l) = literals.iter().find(|l| first[l[0] as usize / 64] & (1 << (l[0] % 64)) != 0) {
                return refuse(
                    at,
                    format!("the branches overlap: {} and another branch start alike", String::from_utf8_lossy(l)),
                );
            }
            if !literals.is_empty() {
                flat.push(self.add(Node::Literals(literals), at)?);
            }
        }
        for (i, &a) in flat.iter().enumerate() {
            for &b in &flat[i + 1..] {
                let (fa, fb) = (first_bytes(&self.nodes, &[a]), first_bytes(&self.nodes, &[b]));
                if (0..4).any(|w| fa[w] & fb[w] != 0) {
                    return refuse(
                        at,
                        "the branches overlap: each must start differently (for example a string and null, \
                         or an object and an array)",
                    );
                }
            }
        }
        if flat.len() == 1 {
            return Ok(flat[0]);
        }
        self.add(Node::Choice(flat), at)
    }

    /// Whether a branch of `flat` admits the serialized value `literal` whatever it holds.
    fn covered(&self, flat: &[NodeId], literal: &[u8]) -> bool {
        flat.iter().any(|&b| match &self.nodes[b as usize] {
            Node::Any => true,
            Node::String => literal[0] == b'"',
            Node::Number { integer: false } => literal[0] == b'-' || literal[0].is_ascii_digit(),
            Node::Number { integer: true } => {
                (literal[0] == b'-' || literal[0].is_ascii_digit())
                    && !literal.iter().any(|c| matches!(c, b'.' | b'e' | b'E'))
            }
            _ => false,
        })
    }
}

fn is_of_type(v: &Value, t: &str) -> bool {
    match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "string" => v.is_string(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        _ => false,
    }
}

fn set(bits: &mut [u64; 4], bytes: impl IntoIterator<Item = u8>) {
    for c in bytes {
        bits[c as usize / 64] |= 1 << (c % 64);
    }
}

/// The bytes values of any of `ids` can start with.
fn first_bytes(nodes: &[Node], ids: &[NodeId]) -> [u64; 4] {
    let mut bits = [0u64; 4];
    for &id in ids {
        match &nodes[id as usize] {
            Node::Any => set(&mut bits, b"{[\"-0123456789tfn".iter().copied()),
            Node::String => set(&mut bits, [b'"']),
            Node::Number { .. } => set(&mut bits, b"-0123456789".iter().copied()),
            Node::Literals(values) => set(&mut bits, values.iter().map(|v| v[0])),
            Node::Object { .. } => set(&mut bits, [b'{']),
            Node::Array { .. } => set(&mut bits, [b'[']),
            Node::Choice(branches) => {
                let inner = first_bytes(nodes, branches);
                for w in 0..4 {
                    bits[w] |= inner[w];
                }
            }
        }
    }
    bits
}

/// The longest chain of frames a value of `node` needs, memoized (definitions are shared,
/// so an unmemoized walk of a few nested `$ref`s is exponential).
fn depth(nodes: &[Node], node: NodeId, memo: &mut [Option<usize>]) -> usize {
    if let Some(d) = memo[node as usize] {
        return d;
    }
    let mut below = |id: NodeId| depth(nodes, id, memo);
    let d = match &nodes[node as usize] {
        // `Any` nests as deep as the cursor lets it, scalars at the limit.
        Node::Any => 1,
        Node::Object { props, free, .. } => {
            let mut d = 0;
            for (_, v) in props {
                d = d.max(below(*v));
            }
            if let Some(f) = free {
                d = d.max(below(*f));
            }
            1 + d
        }
        Node::Array { items, .. } => 1 + below(*items),
        Node::Choice(branches) => branches.iter().fold(0, |d, b| d.max(below(*b))),
        _ => 1,
    };
    memo[node as usize] = Some(d);
    d
}

/// The length of [`Schema::minimal`]'s output for `node`, memoized and saturating.
fn minimal_len(nodes: &[Node], node: NodeId, memo: &mut [Option<usize>]) -> usize {
    if let Some(n) = memo[node as usize] {
        return n;
    }
    let n = match &nodes[node as usize] {
        Node::Any => 4,
        Node::String => 2,
        Node::Number { .. } => 1,
        Node::Literals(values) => values[0].len(),
        Node::Object { props, required, .. } => {
            let mut n = 2usize;
            for (i, (key, value)) in props.iter().enumerate() {
                if required & (1 << i) != 0 {
                    n = n.saturating_add(key.len() + 2).saturating_add(minimal_len(nodes, *value, memo));
                }
            }
            n
        }
        Node::Array { items, min, .. } => {
            let item = minimal_len(nodes, *items, memo).saturating_add(1);
            item.saturating_mul(*min as usize).saturating_add(2)
        }
        Node::Choice(branches) => minimal_len(nodes, branches[0], memo),
    };
    memo[node as usize] = Some(n);
    n
}

impl Schema {
    /// Compile `schema`, whose root must be an object (as OpenAI's structured outputs ask).
    pub(crate) fn compile(schema: &Value) -> Result<Self, SchemaError> {
        let builtins = vec![
            Node::Any,
            Node::Object { props: Vec::new(), required: 0, free: Some(ANY) },
            Node::Array { items: ANY, min: 0, max: u32::MAX },
            Node::Literals(vec![b"true".to_vec(), b"false".to_vec(), b"null".to_vec()]),
            Node::String,
            Node::Number { integer: false },
        ];
        let mut c = Compiler { root: schema, nodes: builtins, refs: HashMap::new(), open_refs: HashSet::new() };
        let root = c.compile(schema, "")?;
        if !matches!(c.nodes[root as usize], Node::Object { .. }) {
            return refuse("", "the schema's root must be an object with type \"object\"");
        }
        if depth(&c.nodes, root, &mut vec![None; c.nodes.len()]) > MAX_DEPTH - 1 {
            return refuse("", format!("the schema nests deeper than {} levels", MAX_DEPTH - 1));
        }
        let mut memo = vec![None; c.nodes.len()];
        if (0..c.nodes.len()).any(|id| minimal_len(&c.nodes, id as NodeId, &mut memo) > MAX_MINIMAL) {
            return refuse("", format!("the smallest value of some part of the schema is over {MAX_MINIMAL} bytes"));
        }
        let first = (0..c.nodes.len()).map(|id| first_bytes(&c.nodes, &[id as NodeId])).collect();
        Ok(Schema { nodes: c.nodes, root, first })
    }
}

/// Output that validates against a JSON Schema (the subset in this module's documentation).
#[derive(Clone, Debug)]
pub struct SchemaConstraint {
    pub(super) schema: Rc<Schema>,
    cursor: Cursor,
}

impl SchemaConstraint {
    /// Compile `schema`; the error names the first keyword that cannot be honoured.
    pub fn new(schema: &Value) -> Result<Self, SchemaError> {
        let schema = Rc::new(Schema::compile(schema)?);
        let cursor = Cursor::new(schema.root);
        Ok(Self { schema, cursor })
    }
}

impl Constraint for SchemaConstraint {
    fn accepts(&self, bytes: &[u8]) -> bool {
        let mut c = self.cursor;
        !bytes.is_empty() && bytes.iter().all(|&b| c.step(&self.schema, b)) && c.at_char_boundary(&self.schema)
    }

    fn advance(&mut self, bytes: &[u8]) {
        let mut c = self.cursor;
        if bytes.iter().all(|&b| c.step(&self.schema, b)) {
            self.cursor = c;
        }
    }

    fn is_complete(&self) -> bool {
        self.cursor.is_done()
    }

    fn closing(&self) -> String {
        self.cursor.closing(&self.schema)
    }

    fn allowed(&self, vocab: &Vocab, out: &mut Vec<i32>) {
        let schema = &*self.schema;
        if self.cursor.in_plain_string() {
            vocab.scan_in_string(self.cursor, |c, b| c.step(schema, b), |c| c.at_char_boundary(schema), out);
        } else {
            vocab.scan(self.cursor, |c, b| c.step(schema, b), |c| c.at_char_boundary(schema), out);
        }
    }
}
