//! A guest that misbehaves on purpose, one behaviour per path, so tests can prove the
//! host contains it. Never deploy this.

use std::io::Write;

use flywheel_guest::{export_plugin, GenerateOptions, Handler, HttpError, Model, Request, Responder, Sampler, Want};
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
                session.feed(&prompt, &Want::TopK { k: 1, allowed: None })?;
                spin_forever()
            }
            "bomb" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
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
            "nn-misuse" => res.json(200, &nn_misuse(query_param(&req, "other").unwrap_or("other"))),
            other => Err(HttpError::not_found(format!("no behaviour {other:?}"))),
        }
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
