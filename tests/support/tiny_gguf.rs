//! The tiny llama-architecture model the tests load in milliseconds (the host's synthetic
//! model writer, tiny shape, f32, seed 42), and Hugging Face tokenizers over its vocabulary.

use flywheel::synthetic::{base_vocab, TokenType, WORDS};
#[allow(unused_imports)] // Each test binary uses some of these.
pub use flywheel::synthetic::{SyntheticModel as TinyModel, BOS_ID, EOS_ID, IM_START_ID};

fn vocab() -> Vec<(String, f32, TokenType)> {
    base_vocab()
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
        if matches!(kind, TokenType::Control | TokenType::Unknown) {
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

fn added_tokens(vocab: &[(String, f32, TokenType)]) -> String {
    let special: Vec<String> = vocab
        .iter()
        .enumerate()
        .filter(|(_, (_, _, kind))| matches!(kind, TokenType::Control | TokenType::Unknown))
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
