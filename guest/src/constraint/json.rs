//! [`JsonConstraint`]: a pushdown automaton over JSON's syntax alone.

use super::lexer::{Lexed, NumKind, NumLex, StrLex};
use super::{Constraint, Vocab};

const MAX_DEPTH: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// A value is expected (start, after ':' or after ',' in an array).
    Value,
    /// After '[': a value or ']'.
    ArrayStart,
    /// After '{': a key or '}'.
    ObjectStart,
    /// After ',' in an object: a key.
    Key,
    /// After a key: ':'.
    Colon,
    /// After a value inside a container: ',' or the closing bracket.
    AfterValue,
    Str {
        key: bool,
        lex: StrLex,
    },
    Number(NumLex),
    Literal {
        which: u8,
        pos: u8,
    },
    Done,
}

const LITERALS: [&[u8]; 3] = [b"true", b"false", b"null"];

/// Syntactically valid JSON whose top level is an object (or, with [`JsonConstraint::any`],
/// an object or an array). Nesting is limited to 32 levels and whitespace to one character
/// at a time, so a model cannot stall in endless blanks.
#[derive(Clone, Copy, Debug)]
pub struct JsonConstraint {
    stack: [u8; MAX_DEPTH],
    depth: u8,
    mode: Mode,
    last_was_space: bool,
    object_only: bool,
}

impl Default for JsonConstraint {
    fn default() -> Self {
        Self::object()
    }
}

impl JsonConstraint {
    /// A JSON object (what OpenAI's `response_format: json_object` promises).
    pub fn object() -> Self {
        Self { stack: [0; MAX_DEPTH], depth: 0, mode: Mode::Value, last_was_space: false, object_only: true }
    }

    /// A JSON object or array.
    pub fn any() -> Self {
        Self { object_only: false, ..Self::object() }
    }

    fn top(&self) -> Option<u8> {
        (self.depth > 0).then(|| self.stack[self.depth as usize - 1])
    }

    fn value_done(&mut self) {
        self.mode = if self.depth == 0 { Mode::Done } else { Mode::AfterValue };
    }

    fn push(&mut self, c: u8) -> bool {
        if self.depth as usize >= MAX_DEPTH {
            return false;
        }
        self.stack[self.depth as usize] = c;
        self.depth += 1;
        true
    }

    fn pop(&mut self, close: u8) -> bool {
        let open = if close == b'}' { b'{' } else { b'[' };
        if self.top() != Some(open) {
            return false;
        }
        self.depth -= 1;
        self.value_done();
        true
    }

    /// Start a value with byte `c`.
    fn start_value(&mut self, c: u8) -> bool {
        let top_level = self.depth == 0;
        match c {
            b'{' => {
                self.push(b'{') && {
                    self.mode = Mode::ObjectStart;
                    true
                }
            }
            b'[' if !(top_level && self.object_only) => {
                self.push(b'[') && {
                    self.mode = Mode::ArrayStart;
                    true
                }
            }
            // Scalars only inside containers: a bare top-level scalar has no clear end.
            _ if top_level => false,
            b'"' => {
                self.mode = Mode::Str { key: false, lex: StrLex::Plain };
                true
            }
            b'-' | b'0'..=b'9' => match NumLex::start(c, NumKind::Json) {
                Some(n) => {
                    self.mode = Mode::Number(n);
                    true
                }
                None => false,
            },
            b't' | b'f' | b'n' => {
                let which = match c {
                    b't' => 0,
                    b'f' => 1,
                    _ => 2,
                };
                self.mode = Mode::Literal { which, pos: 1 };
                true
            }
            _ => false,
        }
    }

    /// Feed one byte; false if it breaks the syntax.
    fn step(&mut self, c: u8) -> bool {
        let space = matches!(c, b' ' | b'\n' | b'\t' | b'\r');
        let was_space = self.last_was_space;
        self.last_was_space = false;
        match self.mode {
            Mode::Done => false,
            Mode::Str { key, mut lex } => match lex.step(c) {
                Lexed::More => {
                    self.mode = Mode::Str { key, lex };
                    true
                }
                Lexed::End if key => {
                    self.mode = Mode::Colon;
                    true
                }
                Lexed::End => {
                    self.value_done();
                    true
                }
                Lexed::After | Lexed::Reject => false,
            },
            Mode::Number(mut n) => match n.step(c) {
                Lexed::More | Lexed::End => {
                    self.mode = Mode::Number(n);
                    true
                }
                Lexed::After => {
                    // The number ended; this byte belongs to what follows it.
                    self.value_done();
                    self.step(c)
                }
                Lexed::Reject => false,
            },
            Mode::Literal { which, pos } => {
                let lit = LITERALS[which as usize];
                if lit.get(pos as usize) != Some(&c) {
                    return false;
                }
                if pos as usize + 1 == lit.len() {
                    self.value_done();
                } else {
                    self.mode = Mode::Literal { which, pos: pos + 1 };
                }
                true
            }
            _ if space => {
                self.last_was_space = true;
                // At most one blank in a row; none before the first byte.
                let leading = self.mode == Mode::Value && self.depth == 0;
                !(was_space || leading)
            }
            Mode::Value => self.start_value(c),
            Mode::ArrayStart => {
                if c == b']' {
                    self.pop(b']')
                } else {
                    self.start_value(c)
                }
            }
            Mode::ObjectStart | Mode::Key => match c {
                b'"' => {
                    self.mode = Mode::Str { key: true, lex: StrLex::Plain };
                    true
                }
                b'}' if self.mode == Mode::ObjectStart => self.pop(b'}'),
                _ => false,
            },
            Mode::Colon => {
                if c == b':' {
                    self.mode = Mode::Value;
                    true
                } else {
                    false
                }
            }
            Mode::AfterValue => match (c, self.top()) {
                (b',', Some(b'{')) => {
                    self.mode = Mode::Key;
                    true
                }
                (b',', Some(b'[')) => {
                    self.mode = Mode::Value;
                    true
                }
                (b'}', _) | (b']', _) => self.pop(c),
                _ => false,
            },
        }
    }
}

impl Constraint for JsonConstraint {
    fn accepts(&self, bytes: &[u8]) -> bool {
        if bytes.is_empty() {
            return false;
        }
        let mut s = *self;
        bytes.iter().all(|&b| s.step(b))
    }

    fn advance(&mut self, bytes: &[u8]) {
        let mut s = *self;
        if bytes.iter().all(|&b| s.step(b)) {
            *self = s;
        }
    }

    fn is_complete(&self) -> bool {
        self.mode == Mode::Done
    }

    fn allowed(&self, vocab: &Vocab, out: &mut Vec<i32>) {
        if matches!(self.mode, Mode::Str { lex: StrLex::Plain, .. }) {
            vocab.scan_in_string(*self, |s, b| s.step(b), |_| true, out);
        } else {
            vocab.scan(*self, |s, b| s.step(b), |_| true, out);
        }
    }

    fn closing(&self) -> String {
        let mut out = String::new();
        let mut s = *self;
        match s.mode {
            Mode::Done => return out,
            Mode::Str { key, lex } => {
                out.push_str(&lex.closing());
                if key {
                    out.push_str(":null");
                }
            }
            Mode::Number(n) => out.push_str(n.closing()),
            Mode::Literal { which, pos } => {
                out.push_str(std::str::from_utf8(&LITERALS[which as usize][pos as usize..]).unwrap_or(""));
            }
            Mode::Colon => out.push_str(":null"),
            Mode::Key => out.push_str("\"\":null"),
            Mode::Value if s.depth == 0 => out.push_str(if s.object_only { "{}" } else { "[]" }),
            Mode::Value => out.push_str("null"),
            _ => {}
        }
        while let Some(open) = s.top() {
            out.push(if open == b'{' { '}' } else { ']' });
            s.depth -= 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::constraint::test_rng::Rng;

    fn feed(text: &str) -> Option<JsonConstraint> {
        let mut c = JsonConstraint::any();
        for b in text.bytes() {
            if !c.accepts(&[b]) {
                return None;
            }
            c.advance(&[b]);
        }
        Some(c)
    }

    #[test]
    fn accepts_valid_documents() {
        for doc in [
            r#"{"a": 1, "b": [true, false, null], "c": {"d": "x\"y\u00e9"}}"#,
            r#"[1, -2.5e+3, 0, 0.25, {"k": []}]"#,
            "{}",
            "[]",
        ] {
            let c = feed(doc).unwrap_or_else(|| panic!("rejected {doc}"));
            assert!(c.is_complete(), "{doc} not complete");
        }
    }

    #[test]
    fn rejects_invalid_prefixes() {
        for bad in
            ["{a", "[01", "{\"a\" 1}", "[1,]", "{\"a\":tru }", "  {}", "{\"a\":1}}", "\"top\"", "{\"x\":\"\u{1}\"}"]
        {
            assert!(feed(bad).is_none(), "accepted {bad}");
        }
        assert!(JsonConstraint::object().accepts(b"{") && !JsonConstraint::object().accepts(b"["));
    }

    #[test]
    fn closing_completes_any_prefix() {
        let doc = r#"{"key": [1, {"n": -12.5e3, "s": "a\u00e9b\n", "t": true}, null], "z": false}"#;
        for end in 1..doc.len() {
            let Some(c) = feed(&doc[..end]) else { continue };
            let closed = format!("{}{}", &doc[..end], c.closing());
            let full = feed(&closed).unwrap_or_else(|| panic!("closing of {:?} gave invalid {closed:?}", &doc[..end]));
            assert!(full.is_complete(), "{closed:?} incomplete");
            serde_json::from_str::<serde_json::Value>(&closed).unwrap_or_else(|e| panic!("{closed:?}: {e}"));
        }
    }

    fn feed_bytes(c: &mut JsonConstraint, bytes: &[u8]) -> bool {
        let ok = c.accepts(bytes);
        c.advance(bytes);
        ok
    }

    #[test]
    fn strings_must_be_valid_utf8_without_lone_surrogates() {
        let bad: &[&[u8]] = &[
            b"\x80",             // continuation without a lead
            b"\xC0\xAF",         // overlong '/'
            b"\xC1\xBF",         // overlong
            b"\xE0\x80\x80",     // overlong NUL
            b"\xED\xA0\x80",     // U+D800 encoded
            b"\xF0\x80\x80\x80", // overlong
            b"\xF4\x90\x80\x80", // past U+10FFFF
            b"\xF5\x80\x80\x80", // lead UTF-8 never uses
            b"\xFF",             // never valid
            b"\xC3(",            // lead then ASCII
            b"\xE2\x82\"",       // string closed inside a character
            br#"\ud800""#,       // lone high surrogate
            br#"\udc00"#,        // lone low surrogate
            br#"\ud800\u0041"#,  // high followed by a non-low escape
            br#"\ud800x"#,       // high followed by a plain byte
            br#"\ud83d\ud83d"#,  // two highs
            br#"\ud83d\n"#,      // high followed by another escape
        ];
        for b in bad {
            let mut c = feed("{\"a\":\"").unwrap();
            let all_ok = b.iter().all(|&x| feed_bytes(&mut c, &[x]));
            assert!(!all_ok, "accepted {:?}", String::from_utf8_lossy(b));
            assert!(!feed("{\"a\":\"").unwrap().accepts(b), "accepted whole {:?}", String::from_utf8_lossy(b));
        }
        for good in ["é", "€", "😀", "\u{10FFFF}", r"\ud83d\ude00", r"\uD7FF", r"\uE000", r"\uFFFF", r"\u00e9"] {
            let doc = format!("{{\"a\":\"{good}\"}}");
            let c = feed(&doc).unwrap_or_else(|| panic!("rejected {doc}"));
            assert!(c.is_complete());
            serde_json::from_str::<serde_json::Value>(&doc).unwrap();
        }
    }

    #[test]
    fn closing_completes_unfinished_escapes_and_characters() {
        for prefix in [
            r#"{"a":"\"#,
            r#"{"a":"\u"#,
            r#"{"a":"\ud"#,
            r#"{"a":"\ud8"#,
            r#"{"a":"\ud83"#,
            r#"{"a":"\ud83d"#,
            r#"{"a":"\ud83d\"#,
            r#"{"a":"\ud83d\u"#,
            r#"{"a":"\ud83d\ud"#,
            r#"{"a":"\ud83d\ude"#,
            r#"{"a":"\uDBFF\uDF"#,
        ] {
            let c = feed(prefix).unwrap_or_else(|| panic!("rejected {prefix}"));
            let closed = format!("{prefix}{}", c.closing());
            assert!(feed(&closed).is_some_and(|c| c.is_complete()), "{closed}");
            serde_json::from_str::<serde_json::Value>(&closed).unwrap_or_else(|e| panic!("{closed}: {e}"));
        }
        // A character cut after its lead byte: the lead decodes as U+FFFD, then the closing.
        let mut c = feed("{\"a\":\"").unwrap();
        assert!(feed_bytes(&mut c, b"\xF0\x9F"));
        let closed = format!("{}{}", String::from_utf8_lossy(b"{\"a\":\"\xF0\x9F"), c.closing());
        serde_json::from_str::<serde_json::Value>(&closed).unwrap_or_else(|e| panic!("{closed}: {e}"));
    }

    /// Token-like pieces a model might propose: structure, literals, escapes (surrogates
    /// among them), whole and split multi-byte characters, and bytes UTF-8 forbids.
    fn pieces() -> Vec<Vec<u8>> {
        let text: &[&str] = &[
            "{", "}", "[", "]", ",", ":", "\"", " ", "\n", "{\"", "\":", "\",", "\"}", "true", "fal", "se", "null",
            "0", "1", "42", "-", ".", "5", "e", "E+", "\\", "\\n", "\\\"", "u", "\\u", "d8", "3d", "D83D", "de00",
            "dc", "DFFF", "\\ud83d", "\\ude00", "00e9", "abc", " word", "é", "€", "😀", "日本",
        ];
        let mut out: Vec<Vec<u8>> = text.iter().map(|t| t.as_bytes().to_vec()).collect();
        for raw in [
            &b"\xF0\x9F"[..],
            b"\x98\x80",
            b"\xE2",
            b"\x82\xAC",
            b"\xC3",
            b"\xA9",
            b"\xED\xA0",
            b"\x80",
            b"\xC0",
            b"\xFF",
            b"\xF4\x90",
        ] {
            out.push(raw.to_vec());
        }
        out
    }

    /// Random walks through the constraint, as a sampler would take them: whatever it lets
    /// through, plus its closing when the walk stops early, is strict JSON.
    #[test]
    fn random_constrained_outputs_parse_strictly() {
        let pieces = pieces();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut completed = 0;
        for walk in 0..3000 {
            let mut c = if walk % 2 == 0 { JsonConstraint::object() } else { JsonConstraint::any() };
            let mut out = Vec::new();
            let steps = 1 + rng.below(60);
            for _ in 0..steps {
                let mut candidates: Vec<Vec<u8>> = pieces.clone();
                candidates.push(vec![rng.next() as u8]);
                candidates.retain(|p| c.accepts(p));
                if candidates.is_empty() {
                    break;
                }
                let p = &candidates[rng.below(candidates.len())];
                c.advance(p);
                out.extend_from_slice(p);
                if c.is_complete() {
                    break;
                }
            }
            if c.is_complete() {
                completed += 1;
                let text = std::str::from_utf8(&out).unwrap_or_else(|e| panic!("{out:?}: {e}"));
                strict_parse(text);
            }
            // What a stream shows when the budget runs out here.
            let closed = format!("{}{}", String::from_utf8_lossy(&out), c.closing());
            let first = strict_parse(&closed);
            assert!(first == '{' || (walk % 2 == 1 && first == '['), "{closed:?}");
        }
        assert!(completed > 100, "only {completed} walks completed a document");
    }

    /// Parses `text` strictly and returns its first character. JSON's grammar allows numbers
    /// past f64's range (`1e999`), which serde_json's `Value` refuses: those are checked for
    /// syntax only.
    fn strict_parse(text: &str) -> char {
        if let Err(e) = serde_json::from_str::<serde_json::Value>(text) {
            assert!(e.to_string().starts_with("number out of range"), "{text:?}: {e}");
            serde_json::from_str::<serde::de::IgnoredAny>(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        }
        text.chars().next().unwrap_or(' ')
    }

    fn random_value(rng: &mut Rng, depth: u32) -> serde_json::Value {
        use serde_json::Value;
        match rng.below(if depth >= 4 { 5 } else { 7 }) {
            0 => Value::Null,
            1 => Value::Bool(rng.below(2) == 0),
            2 => serde_json::json!(rng.next() as i64 >> rng.below(60)),
            3 => serde_json::json!((rng.next() as f64 / u64::MAX as f64 - 0.5) * 10f64.powi(rng.below(40) as i32 - 20)),
            4 => Value::String(
                (0..rng.below(8))
                    .map(|_| match rng.below(4) {
                        0 => char::from_u32(rng.below(0x80) as u32).unwrap_or('a'),
                        1 => char::from_u32(0x80 + rng.below(0x800) as u32).unwrap_or('é'),
                        2 => char::from_u32(0x10000 + rng.below(0x100000) as u32).unwrap_or('😀'),
                        _ => char::from_u32(rng.below(0x11_0000) as u32).unwrap_or('\u{FFFD}'),
                    })
                    .collect(),
            ),
            5 => Value::Array((0..rng.below(4)).map(|_| random_value(rng, depth + 1)).collect()),
            _ => Value::Object((0..rng.below(4)).map(|i| (format!("k{i}"), random_value(rng, depth + 1))).collect()),
        }
    }

    /// The other direction: every document a strict serializer writes is let through.
    #[test]
    fn every_serialized_document_is_accepted() {
        let mut rng = Rng(0xD1B5_4A32_D192_ED03);
        for _ in 0..2000 {
            let doc = serde_json::Value::Object(
                (0..1 + rng.below(4)).map(|i| (format!("f{i}"), random_value(&mut rng, 1))).collect(),
            );
            let compact = serde_json::to_string(&doc).unwrap();
            let spaced = compact.replace("\":", "\": ").replace(",\"", ", \"");
            for text in [ascii_escaped(&compact), spaced, compact] {
                let mut c = JsonConstraint::object();
                let ok = text.as_bytes().iter().all(|&b| feed_bytes(&mut c, &[b]));
                assert!(ok && c.is_complete(), "rejected {text:?}");
            }
        }
    }

    /// `text` with every non-ASCII character written as `\u` escapes (a surrogate pair past
    /// the BMP), as serializers with ASCII output do. Such characters only occur in strings.
    fn ascii_escaped(text: &str) -> String {
        let mut out = String::new();
        for ch in text.chars() {
            if ch.is_ascii() {
                out.push(ch);
            } else {
                for unit in ch.encode_utf16(&mut [0; 2]) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
        out
    }

    #[test]
    fn multi_byte_tokens_are_checked_whole() {
        let c = feed("{\"a\":").unwrap();
        assert!(c.accepts(b" \"hi\""));
        assert!(!c.accepts(b"  1"));
        assert!(!c.accepts(b"}"));
    }
}
