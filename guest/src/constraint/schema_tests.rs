//! The schema constraint against a real validator: random schemas from the supported
//! subset, random walks through each as a sampler would take them, and every output (or its
//! closing, when cut short) must parse and validate.

use serde_json::{json, Value};

use super::schema::{Node, NodeId, Schema, SchemaConstraint};
use super::test_rng::Rng;
use super::{Constraint, Vocab};

fn constraint(schema: &Value) -> SchemaConstraint {
    SchemaConstraint::new(schema).unwrap_or_else(|e| panic!("{schema}: {e}"))
}

/// Feed `text` a character at a time (a token may not end inside a literal's character).
fn feed(c: &mut SchemaConstraint, text: &str) -> bool {
    text.chars().all(|ch| {
        let mut buf = [0; 4];
        let bytes = ch.encode_utf8(&mut buf).as_bytes();
        let ok = c.accepts(bytes);
        c.advance(bytes);
        ok
    })
}

fn accepts_whole(schema: &Value, doc: &str) -> bool {
    let mut c = constraint(schema);
    feed(&mut c, doc) && c.is_complete()
}

fn validate(schema: &Value, text: &str) {
    let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?} does not parse: {e}\n{schema}"));
    let validator = jsonschema::validator_for(schema).unwrap_or_else(|e| panic!("{schema}: {e}"));
    if let Err(e) = validator.validate(&value) {
        panic!("{text} does not validate: {e}\nschema: {schema}");
    }
}

#[test]
fn unsupported_keywords_and_ambiguities_are_refused_by_name() {
    let cases = [
        (json!({"type": "object", "properties": {"a": {"type": "string", "format": "date"}}}), "\"format\""),
        (json!({"type": "object", "properties": {"a": {"type": "string", "pattern": "x+"}}}), "\"pattern\""),
        (json!({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0}}}), "\"minimum\""),
        (json!({"type": "object", "properties": {"a": {"allOf": [{}]}}}), "\"allOf\""),
        (json!({"type": "object", "required": ["ghost"], "properties": {}}), "\"ghost\""),
        (json!({"type": "string"}), "root must be an object"),
        (
            json!({"type": "object", "properties": {"a": {"anyOf": [{"type": "object"}, {"type": "object"}]}}}),
            "overlap",
        ),
        (
            json!({"type": "object", "properties": {"a": {"anyOf": [
                {"type": "array", "items": {"type": "string"}}, {"type": "array", "items": {"type": "integer"}}
            ]}}}),
            "overlap",
        ),
        (
            json!({"$defs": {"n": {"type": "object", "properties": {"n": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"}),
            "recursive",
        ),
        (json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}), "no definition"),
        (json!({"type": "object", "properties": {"a": {"type": "array", "minItems": 3, "maxItems": 1}}}), "minItems"),
        (json!({"type": "object", "properties": {"a": {"type": "strin"}}}), "unknown type"),
        (
            json!({"type": "object", "properties": {"a": {"type": "string", "enum": [1]}}}),
            "does not have the schema's type",
        ),
    ];
    for (schema, needle) in cases {
        match SchemaConstraint::new(&schema) {
            Ok(_) => panic!("{schema} was accepted"),
            Err(e) => assert!(e.message.contains(needle), "{schema}: {e} (expected {needle})"),
        }
    }
    // The place is named too.
    let e =
        SchemaConstraint::new(&json!({"type": "object", "properties": {"when": {"type": "string", "format": "date"}}}))
            .unwrap_err();
    assert!(e.message.contains("/properties/when"), "{e}");
}

#[test]
fn documents_are_held_to_their_schema() {
    let person = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 2},
            "pet": {"anyOf": [{"$ref": "#/$defs/pet"}, {"type": "null"}]},
            "score": {"type": ["number", "null"]},
        },
        "required": ["name", "tags"],
        "additionalProperties": false,
        "$defs": {"pet": {"type": "object", "properties": {"kind": {"const": "cat"}}, "required": ["kind"]}},
    });
    for good in [
        r#"{"name":"Ann","tags":["a"]}"#,
        r#"{"tags": ["b", "a"], "name": "Bo", "age": -3}"#,
        r#"{"name":"C","tags":["a"],"pet":{"kind":"cat"},"score":1.5e-3}"#,
        r#"{"name":"C","tags":["a"],"pet":null,"score":null}"#,
    ] {
        assert!(accepts_whole(&person, good), "rejected {good}");
        validate(&person, good);
    }
    for bad in [
        r#"{"name":"Ann"}"#,                       // tags required
        r#"{"name":"Ann","tags":[]}"#,             // minItems
        r#"{"name":"Ann","tags":["a","b","a"]}"#,  // maxItems
        r#"{"name":"Ann","tags":["c"]}"#,          // enum
        r#"{"name":1,"tags":["a"]}"#,              // type
        r#"{"name":"A","tags":["a"],"age":1.5}"#,  // integer
        r#"{"name":"A","tags":["a"],"x":1}"#,      // undeclared
        r#"{"name":"A","name":"B","tags":["a"]}"#, // repeated
        r#"{"name":"A","tags":["a"],"pet":{}}"#,   // nested required
        r#"{"name":"A","tags":["a"],}"#,           // trailing comma
    ] {
        assert!(!accepts_whole(&person, bad), "accepted {bad}");
    }
    // Literals that are prefixes of one another.
    let numbers = json!({"type": "object", "properties": {"n": {"enum": [1, 10, 100]}}, "required": ["n"]});
    for doc in [r#"{"n":1}"#, r#"{"n":10}"#, r#"{"n":100}"#] {
        assert!(accepts_whole(&numbers, doc), "{doc}");
    }
    assert!(!accepts_whole(&numbers, r#"{"n":1000}"#) && !accepts_whole(&numbers, r#"{"n":11}"#));
    // A token may not stop inside a character of a key or literal: the closing, written as
    // text, could not finish that character.
    let names = json!({"type": "object", "properties": {"名": {"const": "é"}}, "required": ["名"]});
    let c = constraint(&names);
    assert!(c.accepts(b"{\"\xE5\x90\x8D\"") && !c.accepts(b"{\"\xE5"));
    let mut c = constraint(&names);
    assert!(feed(&mut c, "{\"名\":\""));
    assert!(!c.accepts(b"\xC3") && c.accepts(b"\xC3\xA9"));
    assert_eq!(c.closing(), "é\"}");
}

#[test]
fn oneof_refuses_values_two_branches_admit() {
    for schema in [
        json!({"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}, {"const": "auto"}]}}}),
        json!({"type": "object", "properties": {"a": {"oneOf": [{"type": "null"}, {"type": "null"}]}}}),
        json!({"type": "object", "properties": {"a": {"oneOf": [{"enum": ["a", "b"]}, {"enum": ["b", "c"]}]}}}),
    ] {
        let e = SchemaConstraint::new(&schema).unwrap_err();
        assert!(e.message.contains("oneOf"), "{schema}: {e}");
    }
    // anyOf may overlap that way: the string branch covers the constant.
    constraint(&json!({"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}, {"const": "auto"}]}}}));
}

#[test]
fn hostile_schemas_are_refused_quickly() {
    // 64 properties, nine levels of definitions each referring to the one below: a naive
    // walk makes 64^9 calls.
    let mut defs = serde_json::Map::new();
    let props = |inner: Value| -> Value {
        let p: serde_json::Map<String, Value> = (0..64).map(|i| (format!("p{i}"), inner.clone())).collect();
        json!({"type": "object", "properties": p})
    };
    defs.insert("d0".into(), props(json!({"type": "string"})));
    for k in 1..=9 {
        defs.insert(format!("d{k}"), props(json!({"$ref": format!("#/$defs/d{}", k - 1)})));
    }
    let started = std::time::Instant::now();
    let result = SchemaConstraint::new(&json!({"$defs": defs, "$ref": "#/$defs/d9"}));
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    assert!(result.is_ok(), "{result:?}");
    let huge = json!({"type": "object", "properties": {"a": {"type": "array", "minItems": 4_000_000_000u64}}});
    assert!(SchemaConstraint::new(&huge).unwrap_err().message.contains("smallest value"));
    let long = json!({"type": "object", "properties": {"a": {"const": "x".repeat(70_000)}}});
    assert!(SchemaConstraint::new(&long).unwrap_err().message.contains("longer than"));
}

/// A random schema from the supported subset. `defs` collects definitions for `$ref`.
fn random_schema(rng: &mut Rng, depth: usize, defs: &mut serde_json::Map<String, Value>) -> Value {
    let names = ["a", "b", "name", "id", "é", "two words", "q\"uote", "n1", "ab"];
    let kinds = if depth >= 3 { 6 } else { 11 };
    match rng.below(kinds) {
        0 => json!({"type": "string", "description": "text"}),
        1 => json!({"type": "integer"}),
        2 => json!({"type": "number"}),
        3 => json!({"type": "boolean"}),
        4 => json!({"type": "null"}),
        5 => {
            let pool =
                [json!("x"), json!("yes"), json!("y"), json!(0), json!(-7), json!(1.5), json!(true), json!(null)];
            let n = 1 + rng.below(4);
            let mut values: Vec<Value> = Vec::new();
            for _ in 0..n {
                let v = pool[rng.below(pool.len())].clone();
                if !values.contains(&v) {
                    values.push(v);
                }
            }
            if values.len() == 1 && rng.chance(50) {
                json!({"const": values[0]})
            } else {
                json!({"enum": values})
            }
        }
        6 | 7 => random_object(rng, depth, defs, &names),
        8 => {
            let mut a = json!({"type": "array", "items": random_schema(rng, depth + 1, defs)});
            let min = rng.below(3);
            if rng.chance(50) {
                a["minItems"] = json!(min);
            }
            if rng.chance(50) {
                a["maxItems"] = json!(min + rng.below(3));
            }
            a
        }
        9 => {
            // Branches that start differently: a scalar or container, and null.
            let first = match rng.below(4) {
                0 => json!({"type": "string"}),
                1 => json!({"type": "integer"}),
                2 => random_object(rng, depth, defs, &names),
                _ => json!({"type": "array", "items": {"type": "boolean"}, "maxItems": 3}),
            };
            if rng.chance(50) {
                json!({"anyOf": [first, {"type": "null"}]})
            } else {
                json!({"anyOf": [{"type": "string"}, {"type": "array", "items": first}]})
            }
        }
        _ => {
            let def = random_schema(rng, depth + 1, defs);
            let name = format!("d{}", defs.len());
            defs.insert(name.clone(), def);
            json!({"$ref": format!("#/$defs/{name}")})
        }
    }
}

fn random_object(rng: &mut Rng, depth: usize, defs: &mut serde_json::Map<String, Value>, names: &[&str]) -> Value {
    let mut props = serde_json::Map::new();
    let mut required = Vec::new();
    for _ in 0..rng.below(5) {
        let name = names[rng.below(names.len())];
        props.insert(name.to_string(), random_schema(rng, depth + 1, defs));
        if rng.chance(60) && !required.contains(&name) {
            required.push(name);
        }
    }
    let mut o = json!({"type": "object", "properties": props, "required": required});
    match rng.below(3) {
        0 => o["additionalProperties"] = json!(false),
        1 => o["additionalProperties"] = json!(true),
        _ => {}
    }
    o
}

/// Token-like pieces for a schema's walks: its keys and literals whole and split,
/// structure, numbers, text and random bytes.
fn pieces(schema: &Schema) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = [
        "{", "}", "[", "]", ",", ":", "\"", " ", "\n", "{\"", "\":", "\",", "\"}", "\"]", "true", "fal", "se", "null",
        "0", "1", "42", "-", ".", "5", "e", "E+", "\\", "\\n", "\\u00e9", "abc", " word", "é", "😀", "9999999", ",\"",
    ]
    .iter()
    .map(|p| p.as_bytes().to_vec())
    .collect();
    for node in &schema.nodes {
        let words: Vec<&Vec<u8>> = match node {
            Node::Literals(values) => values.iter().collect(),
            Node::Object { props, .. } => props.iter().map(|(k, _)| k).collect(),
            _ => Vec::new(),
        };
        for w in words {
            out.push(w.clone());
            let cut = w.len() / 2;
            if cut > 0 {
                out.push(w[..cut].to_vec());
                out.push(w[cut..].to_vec());
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

#[test]
fn random_walks_through_random_schemas_validate() {
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let (mut completed, mut walks) = (0, 0);
    for _ in 0..300 {
        let mut defs = serde_json::Map::new();
        let mut schema = random_object(&mut rng, 0, &mut defs, &["a", "b", "id", "x y"]);
        if !defs.is_empty() {
            schema["$defs"] = Value::Object(defs);
        }
        let start = constraint(&schema);
        let vocab_pieces = pieces(&start.schema);
        let vocab = Vocab::new(vocab_pieces.clone());
        for _ in 0..10 {
            walks += 1;
            let mut c = start.clone();
            let mut out = Vec::new();
            for _ in 0..1 + rng.below(80) {
                let mut allowed = Vec::new();
                c.allowed(&vocab, &mut allowed);
                // The trie scan finds exactly what token-by-token checks find.
                let mut expected: Vec<i32> =
                    (0..vocab_pieces.len() as i32).filter(|&i| c.accepts(&vocab_pieces[i as usize])).collect();
                allowed.sort_unstable();
                expected.sort_unstable();
                assert_eq!(allowed, expected, "after {:?} in {schema}", String::from_utf8_lossy(&out));
                if allowed.is_empty() {
                    break;
                }
                let piece = &vocab_pieces[allowed[rng.below(allowed.len())] as usize];
                c.advance(piece);
                out.extend_from_slice(piece);
                if c.is_complete() {
                    break;
                }
            }
            if c.is_complete() {
                completed += 1;
                validate(&schema, std::str::from_utf8(&out).unwrap_or_else(|e| panic!("{out:?}: {e}")));
            }
            // What a client gets when the budget runs out here.
            let closed = format!("{}{}", String::from_utf8_lossy(&out), c.closing());
            validate(&schema, &closed);
            let mut reread = start.clone();
            assert!(feed(&mut reread, &closed) && reread.is_complete(), "the closing {closed:?} is not accepted back");
        }
    }
    assert!(completed * 10 > walks, "only {completed} of {walks} walks completed a document");
}

/// A random instance of `node`, as a serializer would write it.
fn instance(schema: &Schema, node: NodeId, rng: &mut Rng, depth: usize) -> Value {
    match &schema.nodes[node as usize] {
        Node::Any if depth > 4 => Value::Null,
        Node::Any => match rng.below(6) {
            0 => json!(rng.chance(50)),
            1 => json!("any"),
            2 => json!(rng.below(1000) as i64 - 500),
            3 => json!([1, "two", null]),
            4 => json!({"k": [true], "é": {"n": 1.25}}),
            _ => Value::Null,
        },
        Node::String => {
            let texts = ["", "plain", "quote \" and \\ slash", "é😀", "new\nline", "\u{1}"];
            json!(texts[rng.below(texts.len())])
        }
        Node::Number { integer: true } => json!(rng.next() as i64 >> rng.below(64).max(12)),
        Node::Number { integer: false } => json!((rng.below(2_000_001) as f64 - 1e6) / 128.0),
        Node::Literals(values) => serde_json::from_slice(&values[rng.below(values.len())]).unwrap_or(Value::Null),
        Node::Object { props, required, free } => {
            let mut o = serde_json::Map::new();
            for (i, (key, value)) in props.iter().enumerate() {
                if required & (1 << i) != 0 || rng.chance(50) {
                    let name: String = serde_json::from_slice(key).unwrap_or_default();
                    o.insert(name, instance(schema, *value, rng, depth + 1));
                }
            }
            if let Some(f) = free {
                for i in 0..rng.below(3) {
                    o.insert(format!("free{i}"), instance(schema, *f, rng, depth + 1));
                }
            }
            Value::Object(o)
        }
        Node::Array { items, min, max } => {
            let n = *min as usize + rng.below(3);
            let n = n.min(*max as usize);
            Value::Array((0..n).map(|_| instance(schema, *items, rng, depth + 1)).collect())
        }
        Node::Choice(branches) => instance(schema, branches[rng.below(branches.len())], rng, depth),
    }
}

/// The other direction: every valid instance, compact or spaced, is let through whole.
#[test]
fn every_serialized_instance_is_accepted() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for _ in 0..300 {
        let mut defs = serde_json::Map::new();
        let mut schema = random_object(&mut rng, 0, &mut defs, &["a", "b", "id", "x y"]);
        if !defs.is_empty() {
            schema["$defs"] = Value::Object(defs);
        }
        let c = constraint(&schema);
        for _ in 0..5 {
            let value = instance(&c.schema, c.schema.root, &mut rng, 0);
            let compact = serde_json::to_string(&value).unwrap_or_default();
            validate(&schema, &compact);
            let spaced = compact.replace("\":", "\": ").replace(",\"", ", \"");
            for text in [compact, spaced] {
                let mut walk = c.clone();
                assert!(feed(&mut walk, &text) && walk.is_complete(), "rejected {text}\nschema: {schema}");
            }
        }
    }
}
