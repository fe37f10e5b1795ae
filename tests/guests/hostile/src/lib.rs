//! A guest that misbehaves on purpose, one behaviour per path, so tests can prove the
//! host contains it. Never deploy this.

use std::io::Write;

use flywheel_guest::{
    export_plugin, GenerateOptions, Handler, HttpError, Model, Request, Responder, Sampler, TextDecoder, Want,
};
use serde_json::json;

struct Hostile;

fn query_param<'a>(req: &'a Request, key: &str) -> Option<&'a str> {
    req.query()?.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

fn first_model() -> Result<Model, HttpError> {
    let name = Model::available().into_iter().next().ok_or_else(|| HttpError::new(503, "server_error", "no model"))?;
    Ok(Model::open(&name)?)
}

fn spin_forever() -> ! {
    let mut x: u64 = 1;
    loop {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}

impl Handler for Hostile {
    fn handle(req: Request, res: Responder) -> Result<(), HttpError> {
        let path = req.path().rsplit('/').next().unwrap_or("").to_string();
        match path.as_str() {
            "ok" => res.json(200, &json!({ "ok": true, "version": std::env::var("VERSION").ok() })),
            "loop" => spin_forever(),
            "loop-holding-context" => {
                let model = first_model()?;
                let mut session = model.session()?;
                let prompt = model.tokenize("hello world, once upon a time")?;
                session.feed(&prompt, &Want::TopK { k: 1, allowed: None, logprobs: false })?;
                spin_forever()
            }
            "bomb" => memory_bomb(),
            "read-file" => {
                let r = std::fs::read_to_string("/etc/passwd");
                let dir = std::fs::read_dir("/").map(|d| d.count());
                res.json(
                    200,
                    &json!({ "file": r.is_ok(), "file_error": r.err().map(|e| e.to_string()), "dir": dir.is_ok() }),
                )
            }
            "socket" => {
                let port = query_param(&req, "port").unwrap_or("80");
                let r = std::net::TcpStream::connect(format!("127.0.0.1:{port}"));
                res.json(200, &json!({ "connected": r.is_ok(), "error": r.err().map(|e| e.to_string()) }))
            }
            "http-out" => {
                let authority = query_param(&req, "authority").unwrap_or("example.com");
                let r = outgoing_get(authority);
                res.json(200, &json!({ "sent": r.is_ok(), "result": match r { Ok(s) | Err(s) => s } }))
            }
            "trap-mid" => {
                let model = first_model()?;
                let prompt = model.tokenize("once upon a time")?;
                let mut generation = model.generate(&prompt, Sampler::greedy(), GenerateOptions::max_tokens(64))?;
                let mut sse = res.sse()?;
                for _ in 0..3 {
                    let text = generation.next_text()?.unwrap_or_default();
                    sse.send_json(&json!({ "text": text }))?;
                }
                panic!("hostile guest: deliberate trap in the middle of generation");
            }
            "cut" => {
                // Streams a few events, then fails the way `how` says, after the head is sent.
                let how = query_param(&req, "how").unwrap_or("panic").to_string();
                let mut sse = res.sse()?;
                for i in 0..3 {
                    sse.send_json(&json!({ "part": i }))?;
                }
                cut_stream(&how, sse)
            }
            "probe-memory" => {
                // Allocates fallibly until the host refuses to grow memory, then answers.
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                let mut refused = false;
                for _ in 0..100_000 {
                    let mut block = Vec::new();
                    if block.try_reserve_exact(1 << 20).is_err() {
                        refused = true;
                        break;
                    }
                    block.resize(1 << 20, 1u8);
                    hoard.push(block);
                }
                let held = hoard.len() << 20;
                let memory_bytes = core::arch::wasm32::memory_size(0) * 65536;
                drop(hoard);
                res.json(200, &json!({ "refused": refused, "held_bytes": held, "memory_bytes": memory_bytes }))
            }
            "decode" => {
                // Streams token sequences through the SDK's incremental decoder, piece by
                // piece, for comparison with whole-sequence decodes.
                let model = match query_param(&req, "model") {
                    Some(name) => Model::open(name)?,
                    None => first_model()?,
                };
                let body: serde_json::Value = req.json()?;
                let ids = |v: &serde_json::Value| -> Vec<i32> {
                    v.as_array()
                        .map(|a| a.iter().filter_map(|t| t.as_i64()).map(|t| t as i32).collect())
                        .unwrap_or_default()
                };
                let context = ids(&body["context"]);
                let decode = |tokens: &[i32]| model.detokenize(tokens);
                let mut streams = Vec::new();
                for sequence in body["sequences"].as_array().into_iter().flatten() {
                    let mut decoder = TextDecoder::new(&context);
                    let mut pieces = Vec::new();
                    for token in ids(sequence) {
                        pieces.push(decoder.push(token, decode)?);
                    }
                    pieces.push(decoder.finish(decode)?);
                    streams.push(pieces);
                }
                res.json(200, &json!({ "pieces": streams }))
            }
            "contexts" => {
                let model = first_model()?;
                let mut held = Vec::new();
                let mut error = None;
                for _ in 0..1000 {
                    match model.session() {
                        Ok(s) => held.push(s),
                        Err(e) => {
                            error = Some(e.to_string());
                            break;
                        }
                    }
                }
                res.json(200, &json!({ "opened": held.len(), "error": error }))
            }
            "sleep" => {
                let ms: u64 = query_param(&req, "ms").and_then(|v| v.parse().ok()).unwrap_or(500);
                let pollable = wasip2::clocks::monotonic_clock::subscribe_duration(ms * 1_000_000);
                pollable.block();
                res.json(200, &json!({ "version": std::env::var("VERSION").ok() }))
            }
            "stderr" => {
                let _ = writeln!(std::io::stderr(), "hostile guest writes to stderr");
                res.json(200, &json!({ "ok": true }))
            }
            "tensor-hoard" => {
                // Host-side tensors count against the memory limit too.
                use flywheel_guest::bindings::wasi::nn::tensor::{Tensor, TensorType};
                let mut hoard = Vec::new();
                loop {
                    hoard.push(Tensor::new(&[1 << 18], TensorType::Fp32, &vec![0u8; 1 << 20]));
                }
            }
            "handle-hoard" => {
                // Handles live in the host's resource table: never dropping them must not
                // grow the host without bound.
                use flywheel_guest::bindings::wasi::nn::graph::load_by_name;
                loop {
                    if let Err(e) = load_by_name("no-such-model") {
                        std::mem::forget(e);
                    }
                }
            }
            "nn-misuse" => res.json(200, &nn_misuse(query_param(&req, "other").unwrap_or("other"))),
            "fuzz" => {
                let seed = query_param(&req, "seed").and_then(|v| v.parse().ok()).unwrap_or(1);
                let iters = query_param(&req, "iters").and_then(|v| v.parse().ok()).unwrap_or(500);
                res.json(200, &fuzz::run(seed, iters))
            }
            other => Err(HttpError::not_found(format!("no behaviour {other:?}"))),
        }
    }
}

/// Allocates until the allocator gives up (which aborts: a trap at the memory limit).
fn memory_bomb() -> ! {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        hoard.push(vec![1u8; 1 << 20]);
        std::hint::black_box(&hoard);
    }
}

/// Ends a started stream badly.
fn cut_stream(how: &str, mut sse: flywheel_guest::SseStream) -> Result<(), HttpError> {
    match how {
        "panic" => panic!("hostile guest: deliberate panic mid-stream"),
        "trap" => {
            // A wasm trap that is not a panic: a load far past the end of linear memory.
            let far = std::hint::black_box(0xffff_fff0usize) as *const u64;
            let v = unsafe { std::ptr::read_volatile(far) };
            sse.send_json(&json!({ "unreachable": v }))?;
            Ok(())
        }
        "deadline" => loop {
            // A slow streamer: one event every 100 ms until the deadline stops it.
            wasip2::clocks::monotonic_clock::subscribe_duration(100_000_000).block();
            sse.send_json(&json!({ "part": "more" }))?;
        },
        "memory" => memory_bomb(),
        "flood" => {
            // Holds a sequence in the KV cache and writes as fast as the client reads: a
            // client that stops reading stalls it with the sequence held.
            let model = first_model()?;
            let mut session = model.session()?;
            session.feed(
                &model.tokenize("hello world, once upon a time")?,
                &Want::TopK { k: 1, allowed: None, logprobs: false },
            )?;
            let chunk = "x".repeat(60_000);
            loop {
                sse.send_data(&chunk)?;
            }
        }
        "fail" => {
            sse.fail(&HttpError::new(500, "server_error", "hostile guest: failed mid-stream"));
            Ok(())
        }
        // Returning an error with the stream open drops it unfinished.
        _ => Err(HttpError::new(500, "server_error", "hostile guest: error mid-stream")),
    }
}

/// A plain GET through wasi:http/outgoing-handler; Ok(status) or Err(why not).
fn outgoing_get(authority: &str) -> Result<String, String> {
    use wasip2::http::outgoing_handler;
    use wasip2::http::types::{Fields, OutgoingRequest, Scheme};
    let req = OutgoingRequest::new(Fields::new());
    req.set_scheme(Some(&Scheme::Http)).map_err(|()| "bad scheme".to_string())?;
    req.set_authority(Some(authority)).map_err(|()| "bad authority".to_string())?;
    req.set_path_with_query(Some("/")).map_err(|()| "bad path".to_string())?;
    let future = outgoing_handler::handle(req, None).map_err(|e| format!("{e:?}"))?;
    future.subscribe().block();
    match future.get() {
        Some(Ok(Ok(resp))) => Ok(resp.status().to_string()),
        Some(Ok(Err(e))) => Err(format!("{e:?}")),
        Some(Err(())) => Err("response already taken".into()),
        None => Err("no response".into()),
    }
}

use flywheel_guest::wasip2;

/// Every way to misuse wasi-nn, with the error code each one got.
fn nn_misuse(disallowed: &str) -> serde_json::Value {
    use flywheel_guest::bindings::wasi::nn::graph::{load, load_by_name, ExecutionTarget, GraphEncoding};
    use flywheel_guest::bindings::wasi::nn::tensor::{Tensor, TensorType};
    let code = |r: Result<(), flywheel_guest::bindings::wasi::nn::errors::Error>| match r {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("{:?}: {}", e.code(), e.data()),
    };
    let mut out = serde_json::Map::new();
    out.insert("unknown_model".into(), json!(code(load_by_name("no-such-model").map(|_| ()))));
    out.insert("disallowed_model".into(), json!(code(load_by_name(disallowed).map(|_| ()))));
    out.insert(
        "load_bytes".into(),
        json!(code(load(&[vec![0u8; 4]], GraphEncoding::Ggml, ExecutionTarget::Cpu).map(|_| ()))),
    );
    let name = Model::available().into_iter().next().unwrap_or_default();
    let Ok(graph) = load_by_name(&name) else { return json!(out) };
    let Ok(ctx) = graph.init_execution_context() else { return json!(out) };
    let ids = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let compute = |inputs: Vec<(String, Tensor)>| code(ctx.compute(inputs).map(|_| ()));
    out.insert(
        "wrong_type".into(),
        json!(compute(vec![("input_ids".into(), Tensor::new(&[2], TensorType::Fp32, &ids(&[1, 2])))])),
    );
    out.insert(
        "wrong_shape".into(),
        json!(compute(vec![("input_ids".into(), Tensor::new(&[2, 2], TensorType::I32, &ids(&[1, 2, 3, 4])))])),
    );
    out.insert(
        "short_data".into(),
        json!(compute(vec![("input_ids".into(), Tensor::new(&[3], TensorType::I32, &ids(&[1, 2])))])),
    );
    out.insert(
        "token_out_of_range".into(),
        json!(compute(vec![("input_ids".into(), Tensor::new(&[1], TensorType::I32, &ids(&[9_999_999])))])),
    );
    out.insert(
        "unknown_input".into(),
        json!(compute(vec![("pixels".into(), Tensor::new(&[1], TensorType::I32, &ids(&[1])))])),
    );
    out.insert(
        "missing_input_ids".into(),
        json!(compute(vec![("top_k".into(), Tensor::new(&[1], TensorType::I32, &ids(&[1])))])),
    );
    out.insert(
        "top_k_zero".into(),
        json!(compute(vec![
            ("input_ids".into(), Tensor::new(&[1], TensorType::I32, &ids(&[1]))),
            ("top_k".into(), Tensor::new(&[1], TensorType::I32, &ids(&[0]))),
        ])),
    );
    let context = flywheel_guest::bindings::flywheel::llm::model::info(&name).map(|i| i.context_length).unwrap_or(0);
    let too_many: Vec<i32> = vec![1; context as usize + 1];
    out.insert(
        "context_full".into(),
        json!(compute(vec![(
            "input_ids".into(),
            Tensor::new(&[too_many.len() as u32], TensorType::I32, &ids(&too_many))
        )])),
    );
    out.insert(
        "valid_after_errors".into(),
        json!(compute(vec![("input_ids".into(), Tensor::new(&[2], TensorType::I32, &ids(&[1, 2])))])),
    );
    json!(out)
}

export_plugin!(Hostile);

/// Random calls across the wasi-nn and flywheel:llm boundary. Every call must come back
/// with a value or an error, never a trap.
mod fuzz {
    use std::collections::BTreeMap;

    use flywheel_guest::bindings::flywheel::llm::model as llm;
    use flywheel_guest::bindings::wasi::nn::graph::{load_by_name, Graph};
    use flywheel_guest::bindings::wasi::nn::inference::GraphExecutionContext;
    use flywheel_guest::bindings::wasi::nn::tensor::{Tensor, TensorType};
    use serde_json::json;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len() as u64) as usize]
        }
    }

    const TYPES: [TensorType; 7] = [
        TensorType::Fp16,
        TensorType::Fp32,
        TensorType::Fp64,
        TensorType::Bf16,
        TensorType::U8,
        TensorType::I32,
        TensorType::I64,
    ];

    fn int(rng: &mut Rng, vocab: i64) -> i32 {
        match rng.below(6) {
            0 => -(rng.below(1000) as i32) - 1,
            1 => i32::MAX - rng.below(3) as i32,
            2 => vocab as i32 + rng.below(10) as i32,
            _ => rng.below(vocab.max(1) as u64) as i32,
        }
    }

    fn tensor(rng: &mut Rng, vocab: i64) -> Tensor {
        let ty = *rng.pick(&TYPES);
        let rank = rng.below(4) as usize;
        let dims: Vec<u32> = (0..rank)
            .map(|_| match rng.below(5) {
                0 => 0,
                1 => 1,
                2 => rng.below(300) as u32,
                3 => u32::MAX - rng.below(2) as u32,
                _ => rng.below(8) as u32,
            })
            .collect();
        let count: u64 = dims.iter().map(|&d| u64::from(d)).product();
        let matching = rng.below(3) != 0 && count <= 4096;
        let len = if matching { (count * 4) as usize } else { rng.below(2048) as usize };
        let mut data = Vec::with_capacity(len);
        while data.len() + 4 <= len {
            data.extend_from_slice(&int(rng, vocab).to_le_bytes());
        }
        data.resize(len, rng.below(256) as u8);
        Tensor::new(&dims, ty, &data)
    }

    fn ids_tensor(ids: &[i32]) -> Tensor {
        let data: Vec<u8> = ids.iter().flat_map(|x| x.to_le_bytes()).collect();
        Tensor::new(&[ids.len() as u32], TensorType::I32, &data)
    }

    /// Well-formed inputs, so the valid paths (top-k, allowed ids, full logits) get exercised.
    fn valid_inputs(rng: &mut Rng, vocab: i64) -> Vec<(String, Tensor)> {
        let ids: Vec<i32> = (0..1 + rng.below(6)).map(|_| rng.below(vocab as u64) as i32).collect();
        let mut inputs = vec![("input_ids".to_string(), ids_tensor(&ids))];
        if rng.below(4) != 0 {
            inputs.push(("top_k".into(), ids_tensor(&[1 + rng.below(100) as i32])));
            if rng.below(2) == 0 {
                let allowed: Vec<i32> = (0..1 + rng.below(50)).map(|_| rng.below(vocab as u64) as i32).collect();
                inputs.push(("allowed_ids".into(), ids_tensor(&allowed)));
            }
        }
        inputs
    }

    fn name(rng: &mut Rng) -> String {
        match rng.below(8) {
            0..=3 => "input_ids".into(),
            4 => "top_k".into(),
            5 => "allowed_ids".into(),
            6 => String::new(),
            _ => (0..rng.below(12)).map(|_| (b'a' + rng.below(26) as u8) as char).collect(),
        }
    }

    fn text(rng: &mut Rng) -> String {
        let bytes: Vec<u8> = (0..rng.below(64)).map(|_| rng.below(256) as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn run(seed: u64, iters: usize) -> serde_json::Value {
        let mut rng = Rng(seed);
        let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
        let mut note = |k: String| *outcomes.entry(k).or_default() += 1;
        let models = llm::list_models();
        let model = models.first().cloned().unwrap_or_default();
        let vocab = llm::info(&model).map(|i| i64::from(i.vocab_size)).unwrap_or(1);
        let mut graphs: Vec<Graph> = Vec::new();
        let mut contexts: Vec<GraphExecutionContext> = Vec::new();
        for _ in 0..iters {
            match rng.below(10) {
                0 => {
                    let n = if rng.below(2) == 0 { model.clone() } else { text(&mut rng) };
                    match load_by_name(&n) {
                        Ok(g) => {
                            graphs.push(g);
                            note("load:ok".into());
                        }
                        Err(e) => note(format!("load:{:?}", e.code())),
                    }
                }
                1 => {
                    if let Some(g) = graphs.first() {
                        match g.init_execution_context() {
                            Ok(c) => {
                                contexts.push(c);
                                note("open:ok".into());
                            }
                            Err(e) => note(format!("open:{:?}", e.code())),
                        }
                    }
                }
                2 => {
                    if !contexts.is_empty() {
                        let i = rng.below(contexts.len() as u64) as usize;
                        drop(contexts.swap_remove(i));
                        note("close".into());
                    }
                }
                3 => {
                    let ids: Vec<i32> = (0..rng.below(40)).map(|_| int(&mut rng, vocab)).collect();
                    let r = match rng.below(4) {
                        0 => llm::tokenize(&model, &text(&mut rng), rng.below(2) == 0, rng.below(2) == 0).map(|_| ()),
                        1 => llm::detokenize(&model, &ids, rng.below(2) == 0).map(|_| ()),
                        2 => llm::token_bytes(&model, &ids, rng.below(2) == 0).map(|_| ()),
                        _ => {
                            let roles = ["user", "assistant", "system", "", "tool"];
                            let msgs: Vec<llm::ChatMessage> = (0..rng.below(4))
                                .map(|_| llm::ChatMessage {
                                    role: rng.pick(&roles).to_string(),
                                    content: text(&mut rng),
                                })
                                .collect();
                            llm::apply_chat_template(&model, &msgs, rng.below(2) == 0).map(|_| ())
                        }
                    };
                    note(match r {
                        Ok(()) => "llm:ok".into(),
                        Err(e) => format!("llm:{:?}", e.code),
                    });
                }
                _ => {
                    if contexts.is_empty() {
                        continue;
                    }
                    let i = rng.below(contexts.len() as u64) as usize;
                    let inputs: Vec<(String, Tensor)> = if rng.below(3) == 0 {
                        valid_inputs(&mut rng, vocab)
                    } else {
                        (0..rng.below(4)).map(|_| (name(&mut rng), tensor(&mut rng, vocab))).collect()
                    };
                    match contexts[i].compute(inputs) {
                        Ok(outputs) => {
                            for (_, t) in &outputs {
                                let _ = (t.dimensions(), t.ty(), t.data().len());
                            }
                            note("compute:ok".into());
                        }
                        Err(e) => note(format!("compute:{:?}", e.code())),
                    }
                }
            }
        }
        json!({ "iterations": iters, "outcomes": outcomes })
    }
}
