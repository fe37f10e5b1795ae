//! Random-weight GGUF models of a real architecture's shape.
//!
//! Tests load a tiny one in milliseconds; benchmarks on machines that real weights cannot
//! reach (a GPU node with no network) write one of a realistic size, whose speed is a real
//! model's of that shape. Weights come from a seeded PRNG, so a file is the same for a given
//! seed, and greedy outputs are reproducible.
//!
//! The vocabulary is SentencePiece-style: control tokens, 256 byte-fallback tokens, printable
//! ASCII, a few words whose every prefix is a piece, padded with unused tokens to the shape's
//! size. The chat template is ChatML.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

pub const BOS_ID: u32 = 1;
pub const EOS_ID: u32 = 2;
pub const IM_START_ID: u32 = 3;
pub const IM_END_ID: u32 = 4;

const ALIGNMENT: u64 = 32;
const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Words whose every left-to-right prefix is also in the vocabulary, so SPM merges reach them.
pub const WORDS: &[&str] = &[
    "the",
    "and",
    "hello",
    "world",
    "story",
    "once",
    "upon",
    "time",
    "there",
    "was",
    "cat",
    "dog",
    "json",
    "name",
    "value",
    "true",
    "false",
    "null",
    "number",
    "text",
    "user",
    "assistant",
    "system",
    "you",
    "are",
    "a",
    "helpful",
    "tell",
    "me",
    "about",
    "edge",
    "wasm",
    "model",
];

/// GGUF token types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    Normal = 1,
    Unknown = 2,
    Control = 3,
    Unused = 5,
    Byte = 6,
}

/// The base vocabulary, (piece, score, type): every shape has these, in this order.
pub fn base_vocab() -> Vec<(String, f32, TokenType)> {
    let mut v: Vec<(String, f32, TokenType)> = Vec::new();
    let push = |v: &mut Vec<(String, f32, TokenType)>, s: String, score: f32, t: TokenType| {
        if !v.iter().any(|(p, _, _)| *p == s) {
            v.push((s, score, t));
        }
    };
    push(&mut v, "<unk>".into(), 0.0, TokenType::Unknown);
    push(&mut v, "<s>".into(), 0.0, TokenType::Control);
    push(&mut v, "</s>".into(), 0.0, TokenType::Control);
    push(&mut v, "<|im_start|>".into(), 0.0, TokenType::Control);
    push(&mut v, "<|im_end|>".into(), 0.0, TokenType::Control);
    for b in 0..=255u8 {
        push(&mut v, format!("<0x{b:02X}>"), 0.0, TokenType::Byte);
    }
    push(&mut v, "\u{2581}".into(), -1.0, TokenType::Normal);
    for c in '!'..='~' {
        push(&mut v, c.to_string(), -2.0, TokenType::Normal);
    }
    push(&mut v, "\n".into(), -2.0, TokenType::Normal);
    for w in WORDS {
        let full: Vec<char> = format!("\u{2581}{w}").chars().collect();
        for end in 2..=full.len() {
            let piece: String = full[..end].iter().collect();
            // Longer pieces score higher so SPM prefers the longest merge.
            push(&mut v, piece, end as f32, TokenType::Normal);
        }
    }
    v
}

/// A llama-architecture shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub n_embd: u64,
    pub n_head: u64,
    pub n_head_kv: u64,
    pub n_ff: u64,
    pub n_layer: u64,
    /// At least the base vocabulary's size; unused tokens fill the rest.
    pub n_vocab: u64,
}

impl Shape {
    /// Loads in milliseconds; what the tests use.
    pub fn tiny() -> Self {
        Self { n_embd: 64, n_head: 4, n_head_kv: 2, n_ff: 128, n_layer: 2, n_vocab: 0 }
    }

    /// TinyLlama 1.1B: a 1B-class llama (22 layers, GQA 32/4, vocab 32,000).
    pub fn llama_1b() -> Self {
        Self { n_embd: 2048, n_head: 32, n_head_kv: 4, n_ff: 5632, n_layer: 22, n_vocab: 32_000 }
    }

    pub fn by_name(name: &str) -> Option<Self> {
        match name {
            "tiny" => Some(Self::tiny()),
            "llama-1b" => Some(Self::llama_1b()),
            _ => None,
        }
    }
}

/// How the weight matrices are stored (norms are always f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightType {
    F32,
    F16,
    Q8_0,
}

impl WeightType {
    pub fn by_name(name: &str) -> Option<Self> {
        match name {
            "f32" => Some(Self::F32),
            "f16" => Some(Self::F16),
            "q8_0" => Some(Self::Q8_0),
            _ => None,
        }
    }

    fn ggml_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 8,
        }
    }

    /// Bytes of one row of `n` values.
    fn row_bytes(self, n: u64) -> u64 {
        match self {
            Self::F32 => n * 4,
            Self::F16 => n * 2,
            Self::Q8_0 => n / Q8_0_BLOCK * (2 + Q8_0_BLOCK),
        }
    }
}

const Q8_0_BLOCK: u64 = 32;

/// SplitMix64: tiny, seeded, good enough for weights.
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-scale, scale).
    fn uniform(&mut self, scale: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        (unit * 2.0 - 1.0) * scale
    }
}

enum Value {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    F32Array(Vec<f32>),
    I32Array(Vec<i32>),
}

fn write_str(w: &mut impl Write, s: &str) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn write_array_head(w: &mut impl Write, item_type: u32, len: usize) -> io::Result<()> {
    w.write_all(&9u32.to_le_bytes())?;
    w.write_all(&item_type.to_le_bytes())?;
    w.write_all(&(len as u64).to_le_bytes())
}

fn write_value(w: &mut impl Write, v: &Value) -> io::Result<()> {
    match v {
        Value::U32(x) => {
            w.write_all(&4u32.to_le_bytes())?;
            w.write_all(&x.to_le_bytes())
        }
        Value::F32(x) => {
            w.write_all(&6u32.to_le_bytes())?;
            w.write_all(&x.to_le_bytes())
        }
        Value::Bool(x) => {
            w.write_all(&7u32.to_le_bytes())?;
            w.write_all(&[u8::from(*x)])
        }
        Value::Str(s) => {
            w.write_all(&8u32.to_le_bytes())?;
            write_str(w, s)
        }
        Value::StrArray(items) => {
            write_array_head(w, 8, items.len())?;
            items.iter().try_for_each(|s| write_str(w, s))
        }
        Value::F32Array(items) => {
            write_array_head(w, 6, items.len())?;
            items.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
        }
        Value::I32Array(items) => {
            write_array_head(w, 5, items.len())?;
            items.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
        }
    }
}

/// One tensor: its shape (row length first), and the range of its random values (`None`:
/// all ones, for norms).
struct TensorSpec {
    name: String,
    dims: Vec<u64>,
    scale: Option<f32>,
    stored: WeightType,
}

impl TensorSpec {
    fn bytes(&self) -> u64 {
        let rows: u64 = self.dims[1..].iter().product();
        rows * self.stored.row_bytes(self.dims[0])
    }
}

/// A random-weight model to write.
#[derive(Clone, Debug)]
pub struct SyntheticModel {
    pub shape: Shape,
    pub weights: WeightType,
    pub seed: u64,
    pub context_length: u32,
    pub chat_template: bool,
}

impl Default for SyntheticModel {
    fn default() -> Self {
        Self { shape: Shape::tiny(), weights: WeightType::F32, seed: 42, context_length: 4096, chat_template: true }
    }
}

/// Why a model cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("{0}")]
    Shape(String),
    #[error("writing {path}")]
    Io { path: String, source: io::Error },
}

impl SyntheticModel {
    pub fn n_vocab(&self) -> usize {
        self.vocab().len()
    }

    fn vocab(&self) -> Vec<(String, f32, TokenType)> {
        let mut v = base_vocab();
        for i in v.len() as u64..self.shape.n_vocab {
            v.push((format!("<unused{i}>"), 0.0, TokenType::Unused));
        }
        v
    }

    fn check(&self) -> Result<(), SynthError> {
        let s = &self.shape;
        let fail = |why: &str| Err(SynthError::Shape(format!("shape {s:?}: {why}")));
        if s.n_head == 0
            || s.n_head_kv == 0
            || !s.n_embd.is_multiple_of(s.n_head)
            || !s.n_head.is_multiple_of(s.n_head_kv)
        {
            return fail("n_embd must divide into n_head heads, and n_head into n_head_kv groups");
        }
        if self.weights == WeightType::Q8_0 && [s.n_embd, s.n_ff].iter().any(|d| !d.is_multiple_of(Q8_0_BLOCK)) {
            return fail("q8_0 rows must be a multiple of 32 values");
        }
        Ok(())
    }

    fn tensors(&self) -> Vec<TensorSpec> {
        let s = &self.shape;
        let (e, f, v) = (s.n_embd, s.n_ff, self.n_vocab() as u64);
        let kv = s.n_embd / s.n_head * s.n_head_kv;
        // The tiny model's scales keep its logits well separated, so greedy picks are stable;
        // wider models scale down as 1/sqrt(width) to keep activations in range.
        let k = (64.0 / e as f32).sqrt();
        let w = self.weights;
        let mut t = Vec::new();
        let mut push = |name: String, dims: Vec<u64>, scale: Option<f32>| {
            let stored = if dims.len() == 1 { WeightType::F32 } else { w };
            t.push(TensorSpec { name, dims, scale: scale.map(|x| x * k), stored });
        };
        push("token_embd.weight".into(), vec![e, v], Some(1.0));
        push("output_norm.weight".into(), vec![e], None);
        push("output.weight".into(), vec![e, v], Some(0.5));
        for i in 0..s.n_layer {
            push(format!("blk.{i}.attn_norm.weight"), vec![e], None);
            push(format!("blk.{i}.attn_q.weight"), vec![e, e], Some(0.25));
            push(format!("blk.{i}.attn_k.weight"), vec![e, kv], Some(0.25));
            push(format!("blk.{i}.attn_v.weight"), vec![e, kv], Some(0.25));
            push(format!("blk.{i}.attn_output.weight"), vec![e, e], Some(0.25));
            push(format!("blk.{i}.ffn_norm.weight"), vec![e], None);
            push(format!("blk.{i}.ffn_gate.weight"), vec![e, f], Some(0.25));
            push(format!("blk.{i}.ffn_up.weight"), vec![e, f], Some(0.25));
            push(format!("blk.{i}.ffn_down.weight"), vec![f, e], Some(0.18));
        }
        t
    }

    fn metadata(&self) -> Vec<(&'static str, Value)> {
        let s = &self.shape;
        let vocab = self.vocab();
        let mut meta: Vec<(&str, Value)> = vec![
            ("general.architecture", Value::Str("llama".into())),
            (
                "general.name",
                Value::Str(if *s == Shape::tiny() { "flywheel-tiny" } else { "flywheel-synthetic" }.into()),
            ),
            ("general.alignment", Value::U32(ALIGNMENT as u32)),
            ("llama.context_length", Value::U32(self.context_length)),
            ("llama.embedding_length", Value::U32(s.n_embd as u32)),
            ("llama.block_count", Value::U32(s.n_layer as u32)),
            ("llama.feed_forward_length", Value::U32(s.n_ff as u32)),
            ("llama.attention.head_count", Value::U32(s.n_head as u32)),
            ("llama.attention.head_count_kv", Value::U32(s.n_head_kv as u32)),
            ("llama.rope.dimension_count", Value::U32((s.n_embd / s.n_head) as u32)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            ("llama.vocab_size", Value::U32(vocab.len() as u32)),
            ("tokenizer.ggml.model", Value::Str("llama".into())),
            ("tokenizer.ggml.tokens", Value::StrArray(vocab.iter().map(|t| t.0.clone()).collect())),
            ("tokenizer.ggml.scores", Value::F32Array(vocab.iter().map(|t| t.1).collect())),
            ("tokenizer.ggml.token_type", Value::I32Array(vocab.iter().map(|t| t.2 as i32).collect())),
            ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
            ("tokenizer.ggml.bos_token_id", Value::U32(BOS_ID)),
            ("tokenizer.ggml.eos_token_id", Value::U32(EOS_ID)),
            ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
            ("tokenizer.ggml.add_eos_token", Value::Bool(false)),
        ];
        if self.chat_template {
            meta.push(("tokenizer.chat_template", Value::Str(CHATML.into())));
        }
        meta
    }

    /// Writes the model as GGUF v3, streaming its weights (a 1B model never sits in memory).
    pub fn write_to(&self, path: &Path) -> Result<(), SynthError> {
        self.check()?;
        let io = |source| SynthError::Io { path: path.display().to_string(), source };
        let file = File::create(path).map_err(io)?;
        let mut out = Counting { inner: BufWriter::with_capacity(1 << 20, file), written: 0 };
        self.write(&mut out).map_err(io)?;
        out.inner.into_inner().map_err(|e| io(e.into_error()))?.sync_all().map_err(io)
    }

    fn write(&self, out: &mut Counting<impl Write>) -> io::Result<()> {
        let meta = self.metadata();
        let tensors = self.tensors();
        out.write_all(b"GGUF")?;
        out.write_all(&3u32.to_le_bytes())?;
        out.write_all(&(tensors.len() as u64).to_le_bytes())?;
        out.write_all(&(meta.len() as u64).to_le_bytes())?;
        for (key, value) in &meta {
            write_str(out, key)?;
            write_value(out, value)?;
        }
        let mut offset = 0u64;
        for t in &tensors {
            write_str(out, &t.name)?;
            out.write_all(&(t.dims.len() as u32).to_le_bytes())?;
            for d in &t.dims {
                out.write_all(&d.to_le_bytes())?;
            }
            out.write_all(&t.stored.ggml_type().to_le_bytes())?;
            out.write_all(&offset.to_le_bytes())?;
            offset += t.bytes().div_ceil(ALIGNMENT) * ALIGNMENT;
        }
        out.pad()?;
        let mut rng = Rng(self.seed);
        let mut row = Vec::new();
        let mut encoded = Vec::new();
        for t in &tensors {
            let rows: u64 = t.dims[1..].iter().product();
            for _ in 0..rows {
                row.clear();
                row.extend((0..t.dims[0]).map(|_| t.scale.map_or(1.0, |s| rng.uniform(s))));
                encoded.clear();
                encode(t.stored, &row, &mut encoded);
                out.write_all(&encoded)?;
            }
            out.pad()?;
        }
        out.flush()
    }
}

/// One row in the tensor's stored type.
fn encode(stored: WeightType, row: &[f32], out: &mut Vec<u8>) {
    match stored {
        WeightType::F32 => row.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        WeightType::F16 => row.iter().for_each(|x| out.extend_from_slice(&half::f16::from_f32(*x).to_le_bytes())),
        WeightType::Q8_0 => {
            for block in row.chunks(Q8_0_BLOCK as usize) {
                let max = block.iter().fold(0f32, |m, x| m.max(x.abs()));
                let d = max / 127.0;
                let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
                out.extend(block.iter().map(|x| ((x * inv).round() as i8) as u8));
            }
        }
    }
}

/// A writer that knows its position, for GGUF's alignment padding.
struct Counting<W: Write> {
    inner: W,
    written: u64,
}

impl<W: Write> Counting<W> {
    fn pad(&mut self) -> io::Result<()> {
        let fill = self.written.next_multiple_of(ALIGNMENT) - self.written;
        self.write_all(&vec![0; fill as usize])
    }
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
