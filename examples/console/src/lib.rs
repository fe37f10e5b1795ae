//! `console`: Flywheel's web console, a page served as a plugin.
//!
//! The HTML, CSS and JavaScript are compiled into the component (no CDN, no network): the
//! page talks to the host's own endpoints from the browser. The playground streams from the
//! OpenAI API (or any plugin speaking the `complete` protocol); the node view reads
//! `/admin/models`, `/admin/plugins`, `/admin/usage` and `/metrics` with the admin key the
//! operator types in, which stays in the page's memory.

use flywheel_guest::{export_plugin, Handler, HttpError, Request, Responder};

const INDEX: &str = include_str!("../web/index.html");
const APP_JS: &str = include_str!("../web/app.js");
const HTTP_JS: &str = include_str!("../web/http.js");
const SSE_JS: &str = include_str!("../web/sse.js");
const PLAYGROUND_JS: &str = include_str!("../web/playground.js");
const NODE_JS: &str = include_str!("../web/node.js");
const APP_CSS: &str = include_str!("../web/app.css");
const ICON: &str = include_str!("../web/icon.svg");

/// Only the page's own files and the host's endpoints; never framed by another site.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

struct Console;

/// The file at `path`, relative to where the console is mounted (`/console/` or `/fn/console/`).
fn file(path: &str) -> Option<(&'static str, &'static str)> {
    let rest = path.strip_prefix("/fn/console").or_else(|| path.strip_prefix("/console")).unwrap_or(path);
    match rest {
        "/" | "/index.html" => Some(("text/html; charset=utf-8", INDEX)),
        "/app.js" => Some(("text/javascript; charset=utf-8", APP_JS)),
        "/http.js" => Some(("text/javascript; charset=utf-8", HTTP_JS)),
        "/sse.js" => Some(("text/javascript; charset=utf-8", SSE_JS)),
        "/playground.js" => Some(("text/javascript; charset=utf-8", PLAYGROUND_JS)),
        "/node.js" => Some(("text/javascript; charset=utf-8", NODE_JS)),
        "/app.css" => Some(("text/css; charset=utf-8", APP_CSS)),
        "/icon.svg" => Some(("image/svg+xml", ICON)),
        _ => None,
    }
}

impl Handler for Console {
    fn handle(req: Request, res: Responder) -> Result<(), HttpError> {
        if req.method != "GET" {
            return Err(HttpError::new(405, "invalid_request_error", "the console only serves GET"));
        }
        let Some((content_type, body)) = file(req.path()) else {
            return Err(HttpError::not_found(format!("the console has no {}", req.path())));
        };
        res.send_with(
            200,
            &[
                ("content-type", content_type),
                ("cache-control", "no-cache"),
                ("content-security-policy", CSP),
                ("x-content-type-options", "nosniff"),
                ("referrer-policy", "no-referrer"),
            ],
            body.as_bytes(),
        )
    }
}

export_plugin!(Console);
