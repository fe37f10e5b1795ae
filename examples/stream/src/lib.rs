//! `stream`: complete a prompt at temperature 0.7 and stream it — a whole plugin.
use flywheel_guest::{export_plugin, GenerateOptions, Handler, HttpError, Model, Request, Responder, Sampler};
use serde_json::json;

struct Stream;

impl Handler for Stream {
    fn handle(req: Request, res: Responder) -> Result<(), HttpError> {
        let body: serde_json::Value = req.json()?;
        let prompt = body["prompt"].as_str().ok_or_else(|| HttpError::bad_request("\"prompt\" is required"))?;
        let model = Model::open_requested(None)?;
        let tokens = model.tokenize(prompt)?;
        let sampler = Sampler::new().temperature(0.7);
        let mut generation = model.generate(&tokens, sampler, GenerateOptions::max_tokens(128))?;
        let mut sse = res.sse()?;
        while let Some(text) = generation.next_text()? {
            sse.send_json(&json!({ "text": text }))?;
        }
        sse.done()
    }
}

export_plugin!(Stream);
