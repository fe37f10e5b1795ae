//! Tool calls: `tools`, `tool_choice` and `parallel_tool_calls` in, `tool_calls` out.
//!
//! The models served here have no tool syntax of their own that their GGUF templates render,
//! so tools are described in a system message (the format is in the README), and a call is
//! the answer `{"name": "<function>", "arguments": {...}}`. With `tool_choice` `required` or
//! a named function, decoding is constrained to such a call whose arguments follow the
//! function's parameter schema, so they always parse and validate. With `auto` the model
//! chooses: an answer that is such a call (checked against the schema) becomes a tool call,
//! anything else is text.

use flywheel_guest::{Constraint, HttpError, SchemaConstraint, Vocab};
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolSpec {
    #[serde(rename = "type")]
    kind: String,
    function: FunctionSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FunctionSpec {
    name: String,
    description: Option<String>,
    parameters: Option<Value>,
    /// Arguments always follow the schema when decoding is constrained; `strict` asks no more.
    #[serde(rename = "strict")]
    _strict: Option<bool>,
}

pub struct Tool {
    pub name: String,
    description: Option<String>,
    parameters: Value,
    /// The whole call, `{"name": <const>, "arguments": <parameters>}`, compiled.
    call: SchemaConstraint,
}

#[derive(Clone, PartialEq, Eq)]
pub enum Choice {
    None,
    Auto,
    Required,
    Named(String),
}

pub struct Tools {
    pub tools: Vec<Tool>,
    pub choice: Choice,
}

fn bad(param: &str, message: impl Into<String>) -> HttpError {
    HttpError::bad_request(message).with_param(param)
}

/// The request's tools, or `None` when it has none.
pub fn parse(
    tools: Option<&Value>,
    choice: Option<&Value>,
    parallel: Option<bool>,
) -> Result<Option<Tools>, HttpError> {
    let specs: Vec<ToolSpec> = match tools {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => flywheel_guest::from_json_value(v).map_err(|e| HttpError { param: Some("tools".into()), ..e })?,
    };
    let choice =
        match choice {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(match s.as_str() {
                "none" => Choice::None,
                "auto" => Choice::Auto,
                "required" => Choice::Required,
                other => return Err(bad("tool_choice", format!("unknown tool_choice {other:?}"))),
            }),
            Some(v) => match v.pointer("/function/name").and_then(Value::as_str) {
                Some(name) if v["type"] == "function" => Some(Choice::Named(name.to_string())),
                _ => return Err(bad(
                    "tool_choice",
                    "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\"}}",
                )),
            },
        };
    if specs.is_empty() {
        return match (choice, parallel) {
            (None, None) => Ok(None),
            (Some(_), _) => Err(bad("tool_choice", "tool_choice is only allowed when tools are given")),
            (None, Some(_)) => {
                Err(bad("parallel_tool_calls", "parallel_tool_calls is only allowed when tools are given"))
            }
        };
    }
    let mut compiled = Vec::with_capacity(specs.len());
    for (i, spec) in specs.into_iter().enumerate() {
        let param = format!("tools[{i}]");
        if spec.kind != "function" {
            return Err(bad(&param, format!("tools of type {:?} are not supported; use \"function\"", spec.kind)));
        }
        let f = spec.function;
        let valid_name = !f.name.is_empty()
            && f.name.len() <= 64
            && f.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid_name {
            return Err(bad(&param, "function names are 1 to 64 letters, digits, _ or -"));
        }
        if compiled.iter().any(|t: &Tool| t.name == f.name) {
            return Err(bad(&param, format!("the function {:?} is declared twice", f.name)));
        }
        let parameters = f.parameters.unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        let call_schema = json!({
            "type": "object",
            "properties": {"name": {"const": f.name}, "arguments": parameters},
            "required": ["name", "arguments"],
            "additionalProperties": false,
        });
        let call = SchemaConstraint::new(&call_schema)
            .map_err(|e| bad(&param, format!("{param}.function.parameters: {}", e.message)))?;
        compiled.push(Tool { name: f.name, description: f.description, parameters, call });
    }
    let choice = choice.unwrap_or(Choice::Auto);
    if let Choice::Named(name) = &choice {
        if !compiled.iter().any(|t| &t.name == name) {
            return Err(bad("tool_choice", format!("tool_choice names {name:?}, which is not among the tools")));
        }
    }
    Ok(Some(Tools { tools: compiled, choice }))
}

impl Tools {
    /// The system message that describes the tools (none for `tool_choice: none`).
    pub fn system_prompt(&self) -> Option<String> {
        if self.choice == Choice::None {
            return None;
        }
        let list: Vec<Value> = self
            .tools
            .iter()
            .map(|t| json!({"name": t.name, "description": t.description, "parameters": t.parameters}))
            .collect();
        let how = match &self.choice {
            Choice::Named(name) => format!("Call the function {name:?} now."),
            Choice::Required => "Call one of them now.".to_string(),
            _ => "If one of them helps, call it; otherwise answer normally.".to_string(),
        };
        Some(format!(
            "You can call these functions:\n{}\nTo call a function, answer with only a JSON object \
             {{\"name\": <function name>, \"arguments\": <arguments object>}}. {how}",
            Value::Array(list)
        ))
    }

    /// The constraint `required` or a named function asks for.
    pub fn constraint(&self) -> Option<Box<dyn Constraint>> {
        let calls: Vec<SchemaConstraint> = match &self.choice {
            Choice::Required => self.tools.iter().map(|t| t.call.clone()).collect(),
            Choice::Named(name) => self.tools.iter().filter(|t| &t.name == name).map(|t| t.call.clone()).collect(),
            Choice::None | Choice::Auto => return None,
        };
        Some(Box::new(AnyCall { calls }))
    }

    /// The call `text` makes, if it is one: a known function with arguments that follow its
    /// schema. Returns the name and the arguments as compact JSON.
    pub fn call_in(&self, text: &str) -> Option<(String, String)> {
        let value: Value = serde_json::from_str(text.trim()).ok()?;
        let name = value.get("name")?.as_str()?;
        let tool = self.tools.iter().find(|t| t.name == name)?;
        let arguments = value.get("arguments")?;
        let compact = serde_json::to_string(&json!({"name": name, "arguments": arguments})).ok()?;
        let mut check = tool.call.clone();
        let valid = compact.chars().all(|c| {
            let mut buf = [0; 4];
            let bytes = c.encode_utf8(&mut buf).as_bytes();
            let ok = check.accepts(bytes);
            check.advance(bytes);
            ok
        }) && check.is_complete();
        valid.then(|| (name.to_string(), serde_json::to_string(arguments).unwrap_or_default()))
    }
}

/// Output that is a call of one of several functions: each call's automaton runs side by
/// side until the output rules it out (the name does, at the latest).
struct AnyCall {
    calls: Vec<SchemaConstraint>,
}

impl Constraint for AnyCall {
    fn accepts(&self, bytes: &[u8]) -> bool {
        self.calls.iter().any(|c| c.accepts(bytes))
    }

    fn advance(&mut self, bytes: &[u8]) {
        if self.accepts(bytes) {
            self.calls.retain(|c| c.accepts(bytes));
            for c in &mut self.calls {
                c.advance(bytes);
            }
        }
    }

    fn is_complete(&self) -> bool {
        self.calls.iter().any(|c| c.is_complete())
    }

    fn closing(&self) -> String {
        self.calls.first().map(|c| c.closing()).unwrap_or_default()
    }

    fn allowed(&self, vocab: &Vocab, out: &mut Vec<i32>) {
        if let [only] = self.calls.as_slice() {
            return only.allowed(vocab, out);
        }
        for c in &self.calls {
            c.allowed(vocab, out);
        }
        out.sort_unstable();
        out.dedup();
    }
}

/// A call as the history holds it, rendered the way the model is asked to write calls.
pub fn render_call(name: &str, arguments: &str) -> String {
    let arguments: Value = serde_json::from_str(arguments).unwrap_or(Value::String(arguments.to_string()));
    json!({"name": name, "arguments": arguments}).to_string()
}

/// A fresh call id, as OpenAI writes them.
pub fn call_id() -> String {
    let a = flywheel_guest::wasip2::random::random::get_random_u64();
    format!("call_{a:016x}")
}
