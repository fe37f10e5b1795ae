//! The console plugin, in a real browser: headless Chromium (Debian's) driven over the
//! DevTools protocol by `tests/console/console.mjs` against a server with the default model.
//! Screenshots of each view land in `target/console-screenshots/` (test artifacts).

mod support;

use std::path::Path;
use std::time::Duration;

use support::server::{guest_wasm, plugin, start};
use support::*;

fn example_manifest(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../examples/{name}/{name}.toml")))
        .expect("example manifest")
}

/// The console page itself: its files, its headers, and what it refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_serves_its_page_with_a_strict_policy() {
    let console = example_manifest("console");
    let s = start(vec![tiny_manifest("tiny")], &[plugin("console", "console", Some(&console))], |c| {
        // Keys on the server: the page is still served (it holds no data).
        c.auth.api_keys = vec!["sk-test".into()];
    })
    .await;
    for (path, kind) in [
        ("/console/", "text/html"),
        ("/console/app.js", "text/javascript"),
        ("/console/app.css", "text/css"),
        ("/fn/console/", "text/html"),
    ] {
        let r = s.get(path).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        let ct = r.headers["content-type"].to_str().unwrap();
        assert!(ct.starts_with(kind), "{path}: {ct}");
        let csp = r.headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"), "{csp}");
    }
    let html = s.get("/console/").await.text();
    assert!(!html.contains("http://") && !html.contains("https://"), "no CDN, no network: {html}");
    assert_eq!(s.get("/console/nope.js").await.status, 404);
    assert_eq!(s.post("/console/", "{}").await.status, 405);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_in_a_real_browser() {
    let toolchain = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.flywheel/toolchains/browser");
    if !toolchain.join("node_modules/playwright-core").exists() || !Path::new("/usr/bin/chromium").exists() {
        assert!(
            std::env::var_os("FLYWHEEL_REQUIRE_BROWSER").is_none(),
            "Chromium and playwright-core are required: run scripts/browser-toolchain.sh"
        );
        eprintln!("skipped: run scripts/browser-toolchain.sh (scripts/test.sh does)");
        return;
    }
    let Some(mut smollm2) = default_model_manifest() else {
        panic!("the default model is missing: run python3 models/fetch.py smollm2 (scripts/test.sh does)");
    };
    // Timing matters here (Stop must land mid-answer), so the real model.
    smollm2.max_sequences = 4;
    smollm2.context_length = 2048;
    smollm2.batch_size = 512;
    let openai = example_manifest("openai");
    let console = example_manifest("console");
    let s = start(
        vec![smollm2],
        &[
            plugin("openai", "openai", Some(&openai)),
            plugin("console", "console", Some(&console)),
            plugin("complete", "complete", None),
        ],
        |c| c.auth.admin_key = Some("admin".into()),
    )
    .await;
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/console/console.mjs");
    let (url, v1, v2) = (s.url.clone(), guest_wasm("complete"), guest_wasm("stream"));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .arg(script)
            .arg(url)
            .arg("admin")
            .arg(&shots)
            .arg(v1)
            .arg(v2)
            .env("FLYWHEEL_BROWSER_TOOLCHAIN", toolchain)
            .output()
            .expect("run node")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(out.status.success(), "the browser test failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("\"passed\""), "{stdout}");
    // Whatever the page started, nothing is left running on the host.
    assert!(s.wait_idle(Duration::from_secs(5)).await, "sequences left open");
    s.shutdown().await;
}
