//! Constrained decoding: at each step only tokens that keep the output valid may be chosen.
//!
//! [`JsonConstraint`] is a pushdown automaton over JSON's syntax. For every step it tests
//! each vocabulary token's bytes against the current state and hands the survivors to the
//! host as `allowed_ids`, so the host's top-k only ranks valid continuations.

/// Decides which tokens may come next.
pub trait Constraint {
    /// Whether `bytes` may be appended now.
    fn accepts(&self, bytes: &[u8]) -> bool;
    /// Record that `bytes` were appended.
    fn advance(&mut self, bytes: &[u8]);
    /// Whether the output is complete (generation should stop).
    fn is_complete(&self) -> bool;
    /// Text that completes the output validly, for when the token budget runs out.
    fn closing(&self) -> String;
}

const MAX_DEPTH: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Esc {
    None,
    Backslash,
    /// Hex digits of a \u escape still to come.
    Unicode(u8),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigits,
}

impl Num {
    fn complete(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::ExpDigits)
    }
}

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
        esc: Esc,
    },
    Number(Num),
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
                self.mode = Mode::Str { key: false, esc: Esc::None };
                true
            }
            b'-' => {
                self.mode = Mode::Number(Num::Minus);
                true
            }
            b'0' => {
                self.mode = Mode::Number(Num::Zero);
                true
            }
            b'1'..=b'9' => {
                self.mode = Mode::Number(Num::Int);
                true
            }
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
            Mode::Str { key, esc } => self.step_string(c, key, esc),
            Mode::Number(n) => self.step_number(c, n),
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
                    self.mode = Mode::Str { key: true, esc: Esc::None };
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

    fn step_string(&mut self, c: u8, key: bool, esc: Esc) -> bool {
        let next = match esc {
            Esc::Backslash => match c {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Esc::None,
                b'u' => Esc::Unicode(4),
                _ => return false,
            },
            Esc::Unicode(n) => {
                if !c.is_ascii_hexdigit() {
                    return false;
                }
                if n == 1 {
                    Esc::None
                } else {
                    Esc::Unicode(n - 1)
                }
            }
            Esc::None => match c {
                b'"' => {
                    if key {
                        self.mode = Mode::Colon;
                    } else {
                        self.value_done();
                    }
                    return true;
                }
                b'\\' => Esc::Backslash,
                0..=0x1f => return false,
                _ => Esc::None,
            },
        };
        self.mode = Mode::Str { key, esc: next };
        true
    }

    fn step_number(&mut self, c: u8, n: Num) -> bool {
        let next = match (n, c) {
            (Num::Minus, b'0') => Num::Zero,
            (Num::Minus, b'1'..=b'9') => Num::Int,
            (Num::Int, b'0'..=b'9') => Num::Int,
            (Num::Zero | Num::Int, b'.') => Num::Dot,
            (Num::Dot | Num::Frac, b'0'..=b'9') => Num::Frac,
            (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Num::Exp,
            (Num::Exp, b'+' | b'-') => Num::ExpSign,
            (Num::Exp | Num::ExpSign | Num::ExpDigits, b'0'..=b'9') => Num::ExpDigits,
            _ if n.complete() => {
                // The number ended; this byte belongs to what follows it.
                self.value_done();
                return self.step(c);
            }
            _ => return false,
        };
        self.mode = Mode::Number(next);
        true
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

    fn closing(&self) -> String {
        let mut out = String::new();
        let mut s = *self;
        match s.mode {
            Mode::Done => return out,
            Mode::Str { key, esc } => {
                match esc {
                    Esc::Backslash => out.push('n'),
                    Esc::Unicode(n) => out.extend(std::iter::repeat_n('0', n as usize)),
                    Esc::None => {}
                }
                out.push('"');
                if key {
                    out.push_str(":null");
                }
            }
            Mode::Number(n) if !n.complete() => out.push('0'),
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

    #[test]
    fn multi_byte_tokens_are_checked_whole() {
        let c = feed("{\"a\":").unwrap();
        assert!(c.accepts(b" \"hi\""));
        assert!(!c.accepts(b"  1"));
        assert!(!c.accepts(b"}"));
    }
}
