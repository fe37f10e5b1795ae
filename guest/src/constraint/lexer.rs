//! JSON's lexemes, one byte at a time: strings (valid UTF-8, no lone surrogates) and numbers.
//! Both automata, the syntax-only one and the schema one, lex through these.

/// What a byte did to a lexeme.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lexed {
    /// Consumed; the lexeme goes on.
    More,
    /// Consumed, and it ended the lexeme (a string's closing quote).
    End,
    /// Not part of the lexeme, which was already complete: the byte belongs to what follows
    /// (a number ends only when something else starts).
    After,
    /// The byte is invalid here.
    Reject,
}

/// Where a string is between its quotes: what the next byte must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) enum StrLex {
    #[default]
    Plain,
    /// After a backslash; `low`: this escape must be the low half of a surrogate pair.
    Backslash { low: bool },
    /// A `\u` escape: `left` hex digits still to come, `value` those seen so far.
    Unicode { left: u8, value: u16, low: bool },
    /// A high surrogate was escaped: a `\uDC00`..`\uDFFF` must follow at once, since a lone
    /// surrogate is not a character and strict parsers reject it.
    LowSurrogate,
    /// Inside a multi-byte UTF-8 character: `left` continuation bytes to come, the next one
    /// in `lo..=hi` (RFC 3629's table, which rules out overlong forms, encoded surrogates
    /// and code points past U+10FFFF).
    Utf8 { left: u8, lo: u8, hi: u8 },
}

impl StrLex {
    /// Feed one byte after the opening quote.
    pub(crate) fn step(&mut self, c: u8) -> Lexed {
        let next = match *self {
            StrLex::LowSurrogate if c == b'\\' => StrLex::Backslash { low: true },
            StrLex::LowSurrogate => return Lexed::Reject,
            StrLex::Backslash { low: true } if c == b'u' => StrLex::Unicode { left: 4, value: 0, low: true },
            StrLex::Backslash { low: true } => return Lexed::Reject,
            StrLex::Backslash { low: false } => match c {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => StrLex::Plain,
                b'u' => StrLex::Unicode { left: 4, value: 0, low: false },
                _ => return Lexed::Reject,
            },
            StrLex::Unicode { left, value, low } => {
                let Some(digit) = (c as char).to_digit(16) else { return Lexed::Reject };
                let value = value << 4 | digit as u16;
                // Reject a surrogate as soon as its leading digits show it: a low half
                // outside a pair, or anything but a low half inside one.
                let ok = match (low, 5 - left) {
                    (true, 1) => value == 0xD,
                    (true, 2) => (0xDC..=0xDF).contains(&value),
                    (false, 2) => !(0xDC..=0xDF).contains(&value),
                    _ => true,
                };
                if !ok {
                    return Lexed::Reject;
                }
                match left {
                    1 if !low && (0xD800..=0xDBFF).contains(&value) => StrLex::LowSurrogate,
                    1 => StrLex::Plain,
                    _ => StrLex::Unicode { left: left - 1, value, low },
                }
            }
            StrLex::Utf8 { left, lo, hi } => {
                if !(lo..=hi).contains(&c) {
                    return Lexed::Reject;
                }
                if left == 1 {
                    StrLex::Plain
                } else {
                    StrLex::Utf8 { left: left - 1, lo: 0x80, hi: 0xBF }
                }
            }
            StrLex::Plain => match c {
                b'"' => return Lexed::End,
                b'\\' => StrLex::Backslash { low: false },
                0..=0x1f => return Lexed::Reject,
                0x20..=0x7f => StrLex::Plain,
                0xC2..=0xDF => StrLex::Utf8 { left: 1, lo: 0x80, hi: 0xBF },
                0xE0 => StrLex::Utf8 { left: 2, lo: 0xA0, hi: 0xBF },
                0xE1..=0xEC | 0xEE..=0xEF => StrLex::Utf8 { left: 2, lo: 0x80, hi: 0xBF },
                0xED => StrLex::Utf8 { left: 2, lo: 0x80, hi: 0x9F },
                0xF0 => StrLex::Utf8 { left: 3, lo: 0x90, hi: 0xBF },
                0xF1..=0xF3 => StrLex::Utf8 { left: 3, lo: 0x80, hi: 0xBF },
                0xF4 => StrLex::Utf8 { left: 3, lo: 0x80, hi: 0x8F },
                // Continuation bytes without a lead, overlong leads, and bytes UTF-8 never uses.
                _ => return Lexed::Reject,
            },
        };
        *self = next;
        Lexed::More
    }

    /// Text that ends the string validly from here, closing quote included.
    pub(crate) fn closing(&self) -> String {
        let mut out = String::new();
        match *self {
            StrLex::Backslash { low: false } => out.push('n'),
            StrLex::Backslash { low: true } => out.push_str("udc00"),
            StrLex::LowSurrogate => out.push_str("\\udc00"),
            StrLex::Unicode { left, value, low } => {
                let digits = match (low, 4 - left) {
                    (true, 0) => "dc00",
                    (true, 1) => "c00",
                    _ => &"0000"[..left as usize],
                };
                out.push_str(digits);
                let whole = u32::from(value) << (4 * u32::from(left));
                if !low && (0xD800..=0xDBFF).contains(&whole) {
                    out.push_str("\\udc00");
                }
            }
            // The unfinished character's bytes decode as one U+FFFD, a whole character.
            StrLex::Utf8 { .. } | StrLex::Plain => {}
        }
        out.push('"');
        out
    }
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

/// How much of JSON's number grammar a value may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NumKind {
    /// Anything JSON allows.
    Json,
    /// A number an IEEE double holds: at most 16 digits before and after the point and two
    /// in the exponent. Past that a model is stuck repeating digits, and readers would
    /// overflow or round.
    Double,
    /// An integer of at most 16 digits: no fraction or exponent.
    Integer,
}

const MAX_DIGITS: u8 = 16;
const MAX_EXPONENT_DIGITS: u8 = 2;

/// A JSON number after its first byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NumLex {
    state: Num,
    kind: NumKind,
    /// Digits in the current part (integer, fraction or exponent).
    digits: u8,
}

impl NumLex {
    /// A number that starts with `c`, if it can.
    pub(crate) fn start(c: u8, kind: NumKind) -> Option<Self> {
        let state = match c {
            b'-' => Num::Minus,
            b'0' => Num::Zero,
            b'1'..=b'9' => Num::Int,
            _ => return None,
        };
        Some(Self { state, kind, digits: u8::from(c != b'-') })
    }

    pub(crate) fn complete(&self) -> bool {
        matches!(self.state, Num::Zero | Num::Int | Num::Frac | Num::ExpDigits)
    }

    /// Whether the current part may take another digit.
    fn room(&self) -> bool {
        let limit = match self.state {
            Num::Exp | Num::ExpSign | Num::ExpDigits => MAX_EXPONENT_DIGITS,
            _ => MAX_DIGITS,
        };
        self.kind == NumKind::Json || self.digits < limit
    }

    pub(crate) fn step(&mut self, c: u8) -> Lexed {
        let fraction = self.kind != NumKind::Integer;
        let digit = c.is_ascii_digit();
        let next = match (self.state, c) {
            _ if digit && !self.room() => None,
            (Num::Minus, b'0') => Some(Num::Zero),
            (Num::Minus, b'1'..=b'9') => Some(Num::Int),
            (Num::Int, b'0'..=b'9') => Some(Num::Int),
            (Num::Zero | Num::Int, b'.') if fraction => Some(Num::Dot),
            (Num::Dot | Num::Frac, b'0'..=b'9') => Some(Num::Frac),
            (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') if fraction => Some(Num::Exp),
            (Num::Exp, b'+' | b'-') => Some(Num::ExpSign),
            (Num::Exp | Num::ExpSign | Num::ExpDigits, b'0'..=b'9') => Some(Num::ExpDigits),
            _ => None,
        };
        let Some(next) = next else {
            return if self.complete() { Lexed::After } else { Lexed::Reject };
        };
        self.digits = if digit { self.digits.saturating_add(1) } else { 0 };
        self.state = next;
        Lexed::More
    }

    /// Text that completes the number from here.
    pub(crate) fn closing(&self) -> &'static str {
        if self.complete() {
            ""
        } else {
            "0"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lex_number(text: &str, kind: NumKind) -> Option<NumLex> {
        let mut bytes = text.bytes();
        let mut n = NumLex::start(bytes.next()?, kind)?;
        for c in bytes {
            if n.step(c) != Lexed::More {
                return None;
            }
        }
        Some(n)
    }

    #[test]
    fn integers_have_no_fraction_exponent_or_leading_zero() {
        for good in ["0", "-0", "7", "-123", "1234567890123456"] {
            assert!(lex_number(good, NumKind::Integer).is_some_and(|n| n.complete()), "{good}");
        }
        for bad in ["01", "1.5", "1e3", "12345678901234567", "--1", "-"] {
            assert!(!lex_number(bad, NumKind::Integer).is_some_and(|n| n.complete()), "{bad}");
        }
        let mut n = NumLex::start(b'4', NumKind::Integer).unwrap();
        assert_eq!(n.step(b','), Lexed::After);
    }

    #[test]
    fn doubles_stay_within_range() {
        for good in ["-1.5e-3", "0.1234567890123456", "1234567890123456.5E+99", "0e0"] {
            assert!(lex_number(good, NumKind::Double).is_some_and(|n| n.complete()), "{good}");
            assert!(good.parse::<f64>().is_ok_and(f64::is_finite));
        }
        for bad in ["1e999", "12345678901234567", "1.12345678901234567", "1.", "1e", "1e+"] {
            assert!(!lex_number(bad, NumKind::Double).is_some_and(|n| n.complete()), "{bad}");
        }
        assert!(lex_number("1e999", NumKind::Json).is_some_and(|n| n.complete()));
    }
}
