//! The README's examples, run exactly as written (with the server on a free port instead of
//! 8080) against the default model and the example plugins.

mod support;

use std::path::Path;

use flywheel::config::Config;
use flywheel::server::Server;

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).expect("README.md")
}

/// The curl commands of the quick start (continued lines joined).
fn curl_commands(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim_end();
        if current.is_empty() && !line.starts_with("curl ") {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            current.push_str(head);
            continue;
        }
        current.push_str(line);
        out.push(std::mem::take(&mut current));
    }
    out
}

fn python_block(text: &str) -> String {
    let start = text.find("```python\n").expect("a python example") + "```python\n".len();
    let end = start + text[start..].find("```").expect("closing fence");
    text[start..end].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_examples_work_as_written() {
    let Some(model) = support::default_model_manifest() else {
        eprintln!("skipped: the default model is not fetched (python3 models/fetch.py)");
        return;
    };
    let root = support::scratch_dir("readme");
    let plugins = root.join("plugins");
    let _ = std::fs::remove_dir_all(&plugins);
    std::fs::create_dir_all(&plugins).unwrap();
    for name in ["complete", "json", "stream", "openai"] {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../examples/{name}/{name}.toml"));
        let manifest = std::fs::read_to_string(manifest).ok();
        support::server::install(&plugins, &support::server::plugin(name, name, manifest.as_deref()));
    }
    for name in support::polyglot::EXAMPLES {
        support::polyglot::install_example(&plugins, name, "");
    }
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.models.dir = model.file.parent().unwrap().parent().unwrap().to_path_buf();
    config.plugins.dir = plugins;
    config.plugins.cache_dir = support::polyglot::cache_dir();
    // The deploy examples use the admin key flywheel.example.toml suggests.
    config.auth.admin_key = Some("change-me".into());
    let server = Server::start(config).await.unwrap();
    let base = format!("http://{}", server.addr);

    let text = readme();
    let commands = curl_commands(&text);
    assert!(commands.len() >= 5, "{commands:?}");
    for cmd in commands {
        let cmd = cmd.replace("http://127.0.0.1:8080", &base);
        let out = tokio::task::spawn_blocking(move || {
            // From the repository root, where the README's paths start.
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            std::process::Command::new("sh").arg("-c").arg(&cmd).current_dir(root).output().map(|o| (cmd, o))
        })
        .await
        .unwrap()
        .unwrap();
        let (cmd, out) = out;
        assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        if cmd.contains("/metrics") {
            assert!(body.contains("flywheel_http_requests_total"), "{body}");
        } else if cmd.contains("\"stream\": true") {
            assert!(body.trim_end().ends_with("data: [DONE]"), "{cmd}: {body}");
        } else {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{cmd}: {e}: {body}"));
            assert!(v.get("error").is_none(), "{cmd}: {body}");
        }
    }

    let script = python_block(&text).replace("http://127.0.0.1:8080", &base);
    let out = tokio::task::spawn_blocking(move || std::process::Command::new("python3").arg("-c").arg(script).output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "python example failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).trim().lines().count() >= 2);
    server.shutdown().await.unwrap();
}
