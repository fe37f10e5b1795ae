//! Where output stands in a compiled schema: a stack of frames, one per open value, small
//! enough to copy for every byte a vocabulary scan tries.

use super::lexer::{Lexed, NumKind, NumLex, StrLex};
use super::schema::{Node, NodeId, Schema, ANY, ANY_ARRAY, ANY_LITERAL, ANY_NUMBER, ANY_OBJECT, ANY_STRING};

/// Values nest at most this deep (frames on the stack).
pub(crate) const MAX_DEPTH: usize = 12;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Before the value's first byte.
    Start,
    Str(StrLex),
    Num(NumLex),
    /// Matching serialized literals: the alternatives still possible, bytes matched so far.
    Literal {
        alive: u64,
        pos: u16,
    },
    /// After `{` (`first`) or a `,`: a key next, or `}` right after `{`. `seen`: properties
    /// already written.
    Key {
        seen: u64,
        first: bool,
    },
    /// Inside a declared property's key.
    KeyName {
        seen: u64,
        alive: u64,
        pos: u16,
    },
    /// Inside a free key (an object without declared properties).
    FreeKey(StrLex),
    /// After a key: `:` next, then the value of property `prop` (`FREE` for a free key).
    Colon {
        seen: u64,
        prop: u8,
    },
    /// After a member's value: `,` or `}`.
    Member {
        seen: u64,
    },
    /// After `[` (`first`) or a `,`, with `count` items written.
    Items {
        count: u32,
        first: bool,
    },
    /// After an item: `,` or `]`.
    AfterItem {
        count: u32,
    },
}

const FREE: u8 = u8::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Frame {
    node: NodeId,
    phase: Phase,
}

const EMPTY: Frame = Frame { node: ANY, phase: Phase::Start };

#[derive(Clone, Copy, Debug)]
pub(crate) struct Cursor {
    frames: [Frame; MAX_DEPTH],
    depth: u8,
    /// The last byte was a blank: at most one in a row, so a model cannot stall in them.
    blank: bool,
}

fn bit(i: usize) -> u64 {
    1 << i
}

impl Cursor {
    pub(crate) fn new(root: NodeId) -> Self {
        let mut frames = [EMPTY; MAX_DEPTH];
        frames[0] = Frame { node: root, phase: Phase::Start };
        Self { frames, depth: 1, blank: false }
    }

    pub(crate) fn is_done(&self) -> bool {
        self.depth == 0
    }

    /// Not inside a character of a literal or key: their closing is written as text, so a
    /// token may not stop in the middle of one of their characters.
    pub(crate) fn at_char_boundary(&self, schema: &Schema) -> bool {
        let Some(top) = (self.depth as usize).checked_sub(1).map(|i| self.frames[i]) else { return true };
        let next = match (top.phase, &schema.nodes[top.node as usize]) {
            (Phase::Literal { alive, pos }, Node::Literals(values)) => {
                values[alive.trailing_zeros() as usize].get(pos as usize).copied()
            }
            (Phase::KeyName { alive, pos, .. }, Node::Object { props, .. }) => {
                props[alive.trailing_zeros() as usize].0.get(pos as usize).copied()
            }
            _ => None,
        };
        !next.is_some_and(|b| (0x80..=0xBF).contains(&b))
    }

    /// Inside a string's text, outside any escape or character.
    pub(crate) fn in_plain_string(&self) -> bool {
        self.depth > 0
            && matches!(
                self.frames[self.depth as usize - 1].phase,
                Phase::Str(StrLex::Plain) | Phase::FreeKey(StrLex::Plain)
            )
    }

    fn top(&mut self) -> &mut Frame {
        &mut self.frames[self.depth as usize - 1]
    }

    fn pop(&mut self) {
        self.depth -= 1;
    }

    /// Open a child value of `node` above the current frame.
    fn push(&mut self, node: NodeId) -> bool {
        if self.depth as usize >= MAX_DEPTH {
            return false;
        }
        self.frames[self.depth as usize] = Frame { node, phase: Phase::Start };
        self.depth += 1;
        true
    }

    /// Feed one byte; false if no value of the schema can continue with it.
    pub(crate) fn step(&mut self, schema: &Schema, c: u8) -> bool {
        let blank = matches!(c, b' ' | b'\n' | b'\t' | b'\r');
        let after_blank = std::mem::replace(&mut self.blank, false);
        // A byte that ends a number (or a literal) belongs to the value around it: go on
        // with the parent.
        loop {
            if self.depth == 0 {
                return false;
            }
            let Frame { node, phase } = *self.top();
            let lexed = match phase {
                Phase::Str(mut lex) => match lex.step(c) {
                    Lexed::More => {
                        self.top().phase = Phase::Str(lex);
                        return true;
                    }
                    Lexed::End => {
                        self.pop();
                        return true;
                    }
                    Lexed::After | Lexed::Reject => return false,
                },
                Phase::Num(mut n) => {
                    let lexed = n.step(c);
                    if lexed == Lexed::More {
                        self.top().phase = Phase::Num(n);
                    }
                    lexed
                }
                Phase::Literal { alive, pos } => self.literal(schema, node, alive, pos, c),
                Phase::KeyName { seen, alive, pos } => return self.key_name(schema, node, seen, alive, pos, c),
                Phase::FreeKey(mut lex) => {
                    return match lex.step(c) {
                        Lexed::More => {
                            self.top().phase = Phase::FreeKey(lex);
                            true
                        }
                        Lexed::End => {
                            self.top().phase = Phase::Colon { seen: 0, prop: FREE };
                            true
                        }
                        Lexed::After | Lexed::Reject => false,
                    }
                }
                _ if blank => {
                    self.blank = true;
                    // None before the document, none right after a key.
                    let document_start = self.depth == 1 && phase == Phase::Start;
                    let after_key = matches!(phase, Phase::Colon { .. });
                    return !(document_start || after_key || after_blank);
                }
                Phase::Start => return self.start(schema, node, c),
                Phase::Key { seen, first } => return self.key(schema, node, seen, first, c),
                Phase::Colon { seen, prop } => {
                    if c != b':' {
                        return false;
                    }
                    let Node::Object { props, free, .. } = &schema.nodes[node as usize] else { return false };
                    let (value, seen) = match (prop, free) {
                        (FREE, Some(f)) => (*f, seen),
                        (FREE, None) => return false,
                        (i, _) => (props[i as usize].1, seen | bit(i as usize)),
                    };
                    self.top().phase = Phase::Member { seen };
                    return self.push(value);
                }
                Phase::Member { seen } => return self.member(schema, node, seen, c),
                Phase::Items { count, first } => return self.item(schema, node, count, first, c),
                Phase::AfterItem { count } => {
                    let Node::Array { min, max, .. } = schema.nodes[node as usize] else { return false };
                    return match c {
                        b',' if count < max => {
                            self.top().phase = Phase::Items { count, first: false };
                            true
                        }
                        b']' if count >= min => {
                            self.pop();
                            true
                        }
                        _ => false,
                    };
                }
            };
            match lexed {
                Lexed::More => return true,
                Lexed::End => {
                    self.pop();
                    return true;
                }
                Lexed::After => self.pop(),
                Lexed::Reject => return false,
            }
        }
    }

    /// The first byte of a value of `node`.
    fn start(&mut self, schema: &Schema, node: NodeId, c: u8) -> bool {
        match &schema.nodes[node as usize] {
            Node::Choice(branches) => match branches.iter().find(|b| schema.starts_with(**b, c)) {
                Some(&b) => {
                    self.top().node = b;
                    self.start(schema, b, c)
                }
                None => false,
            },
            Node::Any => {
                let concrete = match c {
                    b'{' => ANY_OBJECT,
                    b'[' => ANY_ARRAY,
                    b'"' => ANY_STRING,
                    b'-' | b'0'..=b'9' => ANY_NUMBER,
                    b't' | b'f' | b'n' => ANY_LITERAL,
                    _ => return false,
                };
                self.top().node = concrete;
                self.start(schema, concrete, c)
            }
            Node::String if c == b'"' => {
                self.top().phase = Phase::Str(StrLex::Plain);
                true
            }
            Node::Number { integer } => {
                match NumLex::start(c, if *integer { NumKind::Integer } else { NumKind::Double }) {
                    Some(n) => {
                        self.top().phase = Phase::Num(n);
                        true
                    }
                    None => false,
                }
            }
            Node::Literals(values) => {
                let alive = values.iter().enumerate().filter(|(_, v)| v[0] == c).fold(0, |m, (i, _)| m | bit(i));
                if alive == 0 {
                    return false;
                }
                match literal_progress(values, alive, 1) {
                    Progress::Finished => self.pop(),
                    Progress::Open => self.top().phase = Phase::Literal { alive, pos: 1 },
                }
                true
            }
            // A container needs room for its members' frames.
            Node::Object { .. } if c == b'{' && (self.depth as usize) < MAX_DEPTH => {
                self.top().phase = Phase::Key { seen: 0, first: true };
                true
            }
            Node::Array { .. } if c == b'[' && (self.depth as usize) < MAX_DEPTH => {
                self.top().phase = Phase::Items { count: 0, first: true };
                true
            }
            _ => false,
        }
    }

    fn literal(&mut self, schema: &Schema, node: NodeId, alive: u64, pos: u16, c: u8) -> Lexed {
        let Node::Literals(values) = &schema.nodes[node as usize] else { return Lexed::Reject };
        let p = pos as usize;
        let next = (0..values.len())
            .filter(|&i| alive & bit(i) != 0 && values[i].get(p) == Some(&c))
            .fold(0, |m, i| m | bit(i));
        if next != 0 {
            return match literal_progress(values, next, p + 1) {
                Progress::Finished => Lexed::End,
                Progress::Open => {
                    self.top().phase = Phase::Literal { alive: next, pos: pos + 1 };
                    Lexed::More
                }
            };
        }
        // A literal that could have gone on (`1` where `10` is also allowed) ends here.
        if (0..values.len()).any(|i| alive & bit(i) != 0 && values[i].len() == p) {
            Lexed::After
        } else {
            Lexed::Reject
        }
    }

    fn key(&mut self, schema: &Schema, node: NodeId, seen: u64, first: bool, c: u8) -> bool {
        let Node::Object { props, required, free } = &schema.nodes[node as usize] else { return false };
        match c {
            b'"' if !props.is_empty() => {
                let alive = unseen(props.len(), seen);
                if alive == 0 {
                    return false;
                }
                self.top().phase = Phase::KeyName { seen, alive, pos: 1 };
                true
            }
            b'"' if free.is_some() => {
                self.top().phase = Phase::FreeKey(StrLex::Plain);
                true
            }
            b'}' if first && required & !seen == 0 => {
                self.pop();
                true
            }
            _ => false,
        }
    }

    fn key_name(&mut self, schema: &Schema, node: NodeId, seen: u64, alive: u64, pos: u16, c: u8) -> bool {
        let Node::Object { props, .. } = &schema.nodes[node as usize] else { return false };
        let p = pos as usize;
        let next = (0..props.len())
            .filter(|&i| alive & bit(i) != 0 && props[i].0.get(p) == Some(&c))
            .fold(0u64, |m, i| m | bit(i));
        if next == 0 {
            return false;
        }
        // Keys end with their closing quote, which no other byte of a key can be: the one
        // that reaches its end is the key written.
        match (0..props.len()).find(|&i| next & bit(i) != 0 && props[i].0.len() == p + 1) {
            Some(i) => self.top().phase = Phase::Colon { seen, prop: i as u8 },
            None => self.top().phase = Phase::KeyName { seen, alive: next, pos: pos + 1 },
        }
        true
    }

    fn member(&mut self, schema: &Schema, node: NodeId, seen: u64, c: u8) -> bool {
        let Node::Object { props, required, free } = &schema.nodes[node as usize] else { return false };
        match c {
            b',' if unseen(props.len(), seen) != 0 || (props.is_empty() && free.is_some()) => {
                self.top().phase = Phase::Key { seen, first: false };
                true
            }
            b'}' if required & !seen == 0 => {
                self.pop();
                true
            }
            _ => false,
        }
    }

    fn item(&mut self, schema: &Schema, node: NodeId, count: u32, first: bool, c: u8) -> bool {
        let Node::Array { items, min, max } = schema.nodes[node as usize] else { return false };
        if c == b']' {
            if first && count >= min {
                self.pop();
                return true;
            }
            return false;
        }
        if count >= max {
            return false;
        }
        self.top().phase = Phase::AfterItem { count: count + 1 };
        self.push(items) && self.start(schema, items, c)
    }

    /// Text that completes the output validly from here.
    pub(crate) fn closing(&self, schema: &Schema) -> String {
        let mut out = String::new();
        for frame in self.frames[..self.depth as usize].iter().rev() {
            let node = &schema.nodes[frame.node as usize];
            match (frame.phase, node) {
                (Phase::Start, _) => schema.minimal(frame.node, &mut out),
                (Phase::Str(lex), _) => out.push_str(&lex.closing()),
                (Phase::Num(n), _) => out.push_str(n.closing()),
                (Phase::Literal { alive, pos }, Node::Literals(values)) => {
                    let i = alive.trailing_zeros() as usize;
                    out.push_str(&String::from_utf8_lossy(&values[i][pos as usize..]));
                }
                (Phase::Key { seen, first }, Node::Object { props, required, free }) => {
                    let missing = required & !seen;
                    if missing != 0 {
                        schema.members(props, missing, false, &mut out);
                    } else if !first {
                        // After a comma a member must follow: the first one not yet written,
                        // or a free one.
                        match unseen(props.len(), seen) {
                            0 => {
                                out.push_str("\"\":");
                                schema.minimal(free.unwrap_or(ANY), &mut out);
                            }
                            left => schema.members(props, left & left.wrapping_neg(), false, &mut out),
                        }
                    }
                    out.push('}');
                }
                (Phase::KeyName { seen, alive, pos }, Node::Object { props, required, .. }) => {
                    let i = alive.trailing_zeros() as usize;
                    out.push_str(&String::from_utf8_lossy(&props[i].0[pos as usize..]));
                    out.push(':');
                    schema.minimal(props[i].1, &mut out);
                    schema.members(props, required & !(seen | bit(i)), true, &mut out);
                    out.push('}');
                }
                (Phase::FreeKey(lex), Node::Object { free, .. }) => {
                    out.push_str(&lex.closing());
                    out.push(':');
                    schema.minimal(free.unwrap_or(ANY), &mut out);
                    out.push('}');
                }
                (Phase::Colon { seen, prop }, Node::Object { props, required, free }) => {
                    out.push(':');
                    let (value, seen) = match prop {
                        FREE => (free.unwrap_or(ANY), seen),
                        i => (props[i as usize].1, seen | bit(i as usize)),
                    };
                    schema.minimal(value, &mut out);
                    schema.members(props, required & !seen, true, &mut out);
                    out.push('}');
                }
                (Phase::Member { seen }, Node::Object { props, required, .. }) => {
                    schema.members(props, required & !seen, true, &mut out);
                    out.push('}');
                }
                (Phase::Items { count, first }, Node::Array { items, min, .. }) => {
                    // After a comma an item must follow.
                    let needed = if first { min.saturating_sub(count) } else { min.saturating_sub(count).max(1) };
                    for i in 0..needed {
                        if i > 0 {
                            out.push(',');
                        }
                        schema.minimal(*items, &mut out);
                    }
                    out.push(']');
                }
                (Phase::AfterItem { count }, Node::Array { items, min, .. }) => {
                    for _ in count..*min {
                        out.push(',');
                        schema.minimal(*items, &mut out);
                    }
                    out.push(']');
                }
                // A phase always belongs to its node's kind.
                _ => {}
            }
        }
        out
    }
}

/// Bits of the properties not yet written.
fn unseen(count: usize, seen: u64) -> u64 {
    let all = if count >= 64 { u64::MAX } else { bit(count) - 1 };
    all & !seen
}

enum Progress {
    /// Every possible alternative has been matched whole.
    Finished,
    /// Some alternative goes on.
    Open,
}

fn literal_progress(values: &[Vec<u8>], alive: u64, matched: usize) -> Progress {
    if (0..values.len()).any(|i| alive & bit(i) != 0 && values[i].len() > matched) {
        Progress::Open
    } else {
        Progress::Finished
    }
}
