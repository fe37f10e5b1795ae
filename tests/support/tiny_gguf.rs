//! Writes a tiny llama-architecture GGUF model that llama.cpp loads in milliseconds.
//!
//! Random f32 weights from a seeded PRNG, an SPM vocabulary with control tokens,
//! 256 byte-fallback tokens, printable ASCII and a few merged word pieces, and a
//! ChatML chat template. Deterministic for a given seed, so greedy outputs are
//! reproducible across runs.

use std::io::{self, Write};
use std::path::Path;

pub const N_EMBD: usize = 64;
pub const N_HEAD: usize = 4;
pub const N_HEAD_KV: usize = 2;
pub const N_FF: usize = 128;
pub const N_LAYER: usize = 2;
pub const BOS_ID: u32 = 1;
pub const EOS_ID: u32 = 2;
pub const IM_START_ID: u32 = 3;
pub const IM_END_ID: u32 = 4;

const ALIGNMENT: usize = 32;
const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Words whose every left-to-right prefix is also in the vocabulary, so SPM merges reach them.
const WORDS: &[&str] = &[
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

#[derive(Clone, Copy)]
enum TokenType {
    Normal = 1,
    Unknown = 2,
    Control = 3,
    Byte = 6,
}

/// The vocabulary: (piece, score, type).
pub fn vocab() -> Vec<(String, f32, i32)> {
    let mut v: Vec<(String, f32, i32)> = Vec::new();
    let push = |v: &mut Vec<(String, f32, i32)>, s: String, score: f32, t: TokenType| {
        if !v.iter().any(|(p, _, _)| *p == s) {
            v.push((s, score, t as i32));
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
    for c in ' '..='~' {
        if c != ' ' {
            push(&mut v, c.to_string(), -2.0, TokenType::Normal);
        }
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

struct Tensor {
    name: String,
    dims: Vec<u64>,
    data: Vec<f32>,
}

fn write_str(w: &mut impl Write, s: &str) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
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
            w.write_all(&9u32.to_le_bytes())?;
            w.write_all(&8u32.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|s| write_str(w, s))
        }
        Value::F32Array(items) => {
            w.write_all(&9u32.to_le_bytes())?;
            w.write_all(&6u32.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
        }
        Value::I32Array(items) => {
            w.write_all(&9u32.to_le_bytes())?;
            w.write_all(&5u32.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
        }
    }
}

/// Options for the generated model.
#[derive(Clone, Debug)]
pub struct TinyModel {
    pub seed: u64,
    pub context_length: u32,
    pub chat_template: bool,
}

impl Default for TinyModel {
    fn default() -> Self {
        Self { seed: 42, context_length: 4096, chat_template: true }
    }
}

impl TinyModel {
    pub fn n_vocab(&self) -> usize {
        vocab().len()
    }

    /// Serialize the model as GGUF v3.
    pub fn to_bytes(&self) -> Vec<u8> {
        let vocab = vocab();
        let n_vocab = vocab.len();
        let n_embd_kv = N_EMBD / N_HEAD * N_HEAD_KV;
        let mut rng = Rng(self.seed);

        let mut meta: Vec<(&str, Value)> = vec![
            ("general.architecture", Value::Str("llama".into())),
            ("general.name", Value::Str("flywheel-tiny".into())),
            ("general.alignment", Value::U32(ALIGNMENT as u32)),
            ("llama.context_length", Value::U32(self.context_length)),
            ("llama.embedding_length", Value::U32(N_EMBD as u32)),
            ("llama.block_count", Value::U32(N_LAYER as u32)),
            ("llama.feed_forward_length", Value::U32(N_FF as u32)),
            ("llama.attention.head_count", Value::U32(N_HEAD as u32)),
            ("llama.attention.head_count_kv", Value::U32(N_HEAD_KV as u32)),
            ("llama.rope.dimension_count", Value::U32((N_EMBD / N_HEAD) as u32)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            ("llama.vocab_size", Value::U32(n_vocab as u32)),
            ("tokenizer.ggml.model", Value::Str("llama".into())),
            ("tokenizer.ggml.tokens", Value::StrArray(vocab.iter().map(|t| t.0.clone()).collect())),
            ("tokenizer.ggml.scores", Value::F32Array(vocab.iter().map(|t| t.1).collect())),
            ("tokenizer.ggml.token_type", Value::I32Array(vocab.iter().map(|t| t.2).collect())),
            ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
            ("tokenizer.ggml.bos_token_id", Value::U32(BOS_ID)),
            ("tokenizer.ggml.eos_token_id", Value::U32(EOS_ID)),
            ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
            ("tokenizer.ggml.add_eos_token", Value::Bool(false)),
        ];
        if self.chat_template {
            meta.push(("tokenizer.chat_template", Value::Str(CHATML.into())));
        }

        let mut tensors = Vec::new();
        let mut tensor = |name: String, dims: Vec<u64>, scale: Option<f32>| {
            let n: u64 = dims.iter().product();
            let data = match scale {
                Some(s) => (0..n).map(|_| rng.uniform(s)).collect(),
                None => vec![1.0; n as usize],
            };
            tensors.push(Tensor { name, dims, data });
        };
        let (e, f, v, kv) = (N_EMBD as u64, N_FF as u64, n_vocab as u64, n_embd_kv as u64);
        // Large-ish scales keep logits well separated, so greedy picks are stable.
        tensor("token_embd.weight".into(), vec![e, v], Some(1.0));
        tensor("output_norm.weight".into(), vec![e], None);
        tensor("output.weight".into(), vec![e, v], Some(0.5));
        for i in 0..N_LAYER {
            tensor(format!("blk.{i}.attn_norm.weight"), vec![e], None);
            tensor(format!("blk.{i}.attn_q.weight"), vec![e, e], Some(0.25));
            tensor(format!("blk.{i}.attn_k.weight"), vec![e, kv], Some(0.25));
            tensor(format!("blk.{i}.attn_v.weight"), vec![e, kv], Some(0.25));
            tensor(format!("blk.{i}.attn_output.weight"), vec![e, e], Some(0.25));
            tensor(format!("blk.{i}.ffn_norm.weight"), vec![e], None);
            tensor(format!("blk.{i}.ffn_gate.weight"), vec![e, f], Some(0.25));
            tensor(format!("blk.{i}.ffn_up.weight"), vec![e, f], Some(0.25));
            tensor(format!("blk.{i}.ffn_down.weight"), vec![f, e], Some(0.18));
        }

        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(meta.len() as u64).to_le_bytes());
        for (key, value) in &meta {
            write_str(&mut out, key).expect("write to Vec");
            write_value(&mut out, value).expect("write to Vec");
        }
        let mut offset = 0u64;
        for t in &tensors {
            write_str(&mut out, &t.name).expect("write to Vec");
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&0u32.to_le_bytes()); // GGML_TYPE_F32
            out.extend_from_slice(&offset.to_le_bytes());
            let bytes = (t.data.len() * 4) as u64;
            offset += bytes.div_ceil(ALIGNMENT as u64) * ALIGNMENT as u64;
        }
        pad(&mut out);
        for t in &tensors {
            for x in &t.data {
                out.extend_from_slice(&x.to_le_bytes());
            }
            pad(&mut out);
        }
        out
    }

    pub fn write_to(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, self.to_bytes())
    }
}

fn pad(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(ALIGNMENT) {
        out.push(0);
    }
}

/// A Hugging Face `tokenizer.json` (word-level, whitespace-split) over the tiny vocabulary:
/// each word of `WORDS` maps to the id of its `▁word` piece, anything else to `<unk>`.
pub fn tokenizer_json() -> String {
    let vocab = vocab();
    let mut entries = vec![("<unk>".to_string(), 0usize)];
    for w in WORDS {
        let piece = format!("\u{2581}{w}");
        if let Some(id) = vocab.iter().position(|(p, _, _)| *p == piece) {
            entries.push((w.to_string(), id));
        }
    }
    let vocab_json: Vec<String> = entries.iter().map(|(w, id)| format!("{w:?}: {id}")).collect();
    format!(
        r#"{{
  "version": "1.0",
  "truncation": null,
  "padding": null,
  "added_tokens": [
    {{"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}}
  ],
  "normalizer": null,
  "pre_tokenizer": {{"type": "Whitespace"}},
  "post_processor": null,
  "decoder": null,
  "model": {{"type": "WordLevel", "vocab": {{{}}}, "unk_token": "<unk>"}}
}}"#,
        vocab_json.join(", ")
    )
}

/// The tiny vocabulary as a Hugging Face `tokenizer.json` in the style of Llama's
/// SentencePiece conversions: `▁` for spaces, byte fallback, and a decoder that drops the
/// leading space of the text.
pub fn spm_tokenizer_json() -> String {
    let vocab = vocab();
    let pieces: Vec<String> =
        vocab.iter().enumerate().map(|(id, (p, _, _))| format!("{}: {id}", json_str(p))).collect();
    format!(
        r#"{{"version": "1.0", "truncation": null, "padding": null,
  "added_tokens": [{}],
  "normalizer": {{"type": "Sequence", "normalizers": [{{"type": "Prepend", "prepend": "▁"}},
    {{"type": "Replace", "pattern": {{"String": " "}}, "content": "▁"}}]}},
  "pre_tokenizer": null, "post_processor": null,
  "decoder": {{"type": "Sequence", "decoders": [{{"type": "Replace", "pattern": {{"String": "▁"}}, "content": " "}},
    {{"type": "ByteFallback"}}, {{"type": "Fuse"}}, {{"type": "Strip", "content": " ", "start": 1, "stop": 0}}]}},
  "model": {{"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
    "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
    "vocab": {{{}}}, "merges": []}}
}}"#,
        added_tokens(&vocab),
        pieces.join(", ")
    )
}

/// The tiny vocabulary as a GPT-2 style byte-level `tokenizer.json`: each piece's bytes
/// spelled in byte-level symbols (a piece whose bytes another piece already spells is left
/// out, as a byte-level vocabulary holds each spelling once).
pub fn byte_level_tokenizer_json() -> String {
    let vocab = vocab();
    let symbols = byte_level_symbols();
    let mut seen = std::collections::HashSet::new();
    let mut pieces = Vec::new();
    for (id, (p, _, kind)) in vocab.iter().enumerate() {
        if *kind == TokenType::Control as i32 || *kind == TokenType::Unknown as i32 {
            continue;
        }
        let bytes: Vec<u8> = match p.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')) {
            Some(hex) => vec![u8::from_str_radix(hex, 16).expect("byte token")],
            None => p.replace('\u{2581}', " ").into_bytes(),
        };
        let spelled: String = bytes.iter().map(|&b| symbols[b as usize]).collect();
        if seen.insert(spelled.clone()) {
            pieces.push(format!("{}: {id}", json_str(&spelled)));
        }
    }
    format!(
        r#"{{"version": "1.0", "truncation": null, "padding": null,
  "added_tokens": [{}],
  "normalizer": null,
  "pre_tokenizer": {{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}},
  "post_processor": null,
  "decoder": {{"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}},
  "model": {{"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
    "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
    "vocab": {{{}}}, "merges": []}}
}}"#,
        added_tokens(&vocab),
        pieces.join(", ")
    )
}

fn added_tokens(vocab: &[(String, f32, i32)]) -> String {
    let special: Vec<String> = vocab
        .iter()
        .enumerate()
        .filter(|(_, (_, _, kind))| *kind == TokenType::Control as i32 || *kind == TokenType::Unknown as i32)
        .map(|(id, (p, _, _))| {
            format!(
                r#"{{"id": {id}, "content": {}, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}}"#,
                json_str(p)
            )
        })
        .collect();
    special.join(", ")
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest are moved,
/// in order, to U+0100 and up.
fn byte_level_symbols() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut moved = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("latin-1")
            } else {
                moved += 1;
                char::from_u32(0xff + moved).expect("moved byte")
            }
        })
        .collect()
}
