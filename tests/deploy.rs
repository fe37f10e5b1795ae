//! The deploy API end to end: uploads over real HTTP, versions, atomic swaps with requests
//! in flight, refused uploads that leave the live version serving, rollback and removal.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use support::server::{guest_wasm, plugin, start, Resp, TestServer};
use support::*;

const ADMIN: &str = "Bearer admin";

fn manifest(version: &str) -> String {
    format!("[config]\nVERSION = \"{version}\"\n")
}

/// A multipart upload as curl's `-F component=@… -F manifest=@…` sends it.
fn multipart(component: &[u8], manifest: Option<&str>, deployed_by: Option<&str>) -> (String, Vec<u8>) {
    let boundary = "flywheel-test-boundary-7d1c";
    let mut body = Vec::new();
    let mut part = |name: &str, filename: Option<&str>, bytes: &[u8]| {
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"").as_bytes());
        if let Some(f) = filename {
            body.extend_from_slice(format!("; filename=\"{f}\"").as_bytes());
        }
        body.extend_from_slice(b"\r\n\r\n");
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    };
    part("component", Some("plugin.wasm"), component);
    if let Some(m) = manifest {
        part("manifest", Some("plugin.toml"), m.as_bytes());
    }
    if let Some(who) = deployed_by {
        part("deployed_by", None, who.as_bytes());
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

async fn deploy(s: &TestServer, name: &str, component: &[u8], manifest: Option<&str>) -> Resp {
    let (content_type, body) = multipart(component, manifest, Some("ci@example"));
    let req = http::Request::put(format!("{}/admin/plugins/{name}", s.url))
        .header("authorization", ADMIN)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    s.send(req).await
}

async fn admin(s: &TestServer, method: http::Method, path: &str, body: &str) -> Resp {
    let req = http::Request::builder()
        .method(method)
        .uri(format!("{}{path}", s.url))
        .header("authorization", ADMIN)
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    s.send(req).await
}

/// What `/fn/swap/ok` answers: the served version (header) and the manifest's VERSION.
async fn served(s: &TestServer) -> (String, String) {
    let r = s.post("/fn/swap/ok", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let header = r.headers.get("x-flywheel-plugin-version").expect("version header").to_str().unwrap().to_string();
    (header, r.json()["version"].as_str().unwrap_or("").to_string())
}

fn hostile() -> Vec<u8> {
    std::fs::read(guest_wasm("hostile")).unwrap()
}

fn assert_refused(r: &Resp, status: u16, says: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let msg = r.json()["error"]["message"].as_str().unwrap_or("").to_string();
    assert!(msg.contains(says), "{msg:?} does not say {says:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_swap_atomically_and_roll_back() {
    let s = start(vec![tiny_manifest("tiny")], &[plugin("swap", "hostile", Some(&manifest("1")))], |c| {
        c.auth.admin_key = Some("admin".into());
        c.plugins.keep_versions = 3;
        c.plugins.max_component_mb = 2;
    })
    .await;
    // The file found in the directory is version 1.
    assert_eq!(served(&s).await, ("1".into(), "1".into()));
    let v = admin(&s, http::Method::GET, "/admin/plugins/swap/versions", "").await.json();
    assert_eq!((v["live"].as_u64(), v["versions"][0]["source"].as_str()), (Some(1), Some("directory")), "{v}");

    // Requests in flight on version 1 finish on it while version 2 goes live.
    let in_flight: Vec<_> = (0..3)
        .map(|_| {
            let c = s.client();
            tokio::spawn(async move { c.post("/fn/swap/sleep?ms=700", "").await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let r = deploy(&s, "swap", &hostile(), Some(&manifest("2"))).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let d = r.json();
    assert_eq!((d["version"]["version"].as_u64(), d["previous"].as_u64()), (Some(2), Some(1)), "{d}");
    assert_eq!(d["version"]["deployed_by"], "ci@example");
    assert_eq!(served(&s).await, ("2".into(), "2".into()));
    for r in in_flight {
        let r = r.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.headers["x-flywheel-plugin-version"], "1");
        assert_eq!(r.json()["version"], "1", "an in-flight request saw the new version");
    }

    // Bad uploads are refused with a reason, and version 2 keeps serving.
    let refusals = [
        (deploy(&s, "swap", b"not wasm at all", None).await, 422, "not a WebAssembly component"),
        (deploy(&s, "swap", &hostile(), Some("memory_limit_mb = \"lots\"")).await, 422, "memory_limit_mb"),
        (deploy(&s, "swap", &hostile(), Some("routes = [\"/admin/x\"]")).await, 422, "overlaps"),
        (
            deploy(
                &s,
                "swap",
                &wat::parse_str(r#"(component (import "example:missing/thing@1.0.0" (instance (export "f" (func)))))"#)
                    .unwrap(),
                None,
            )
            .await,
            422,
            "cannot link",
        ),
        (deploy(&s, "bad/name", &hostile(), None).await, 404, "no admin endpoint"),
        (deploy(&s, "swap", &vec![0u8; 3 << 20], None).await, 413, "larger than the limit"),
        (admin(&s, http::Method::PUT, "/admin/plugins/swap", "{}").await, 415, "multipart/form-data"),
    ];
    for (r, status, says) in &refusals {
        assert_refused(r, *status, says);
    }
    assert_eq!(served(&s).await, ("2".into(), "2".into()));

    // A third version, then back to version 1 by number and to the one before the live one.
    assert_eq!(deploy(&s, "swap", &hostile(), Some(&manifest("3"))).await.status, 201);
    assert_eq!(served(&s).await, ("3".into(), "3".into()));
    let r = admin(&s, http::Method::POST, "/admin/plugins/swap/rollback", r#"{"version": 1}"#).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(served(&s).await, ("1".into(), "1".into()));
    assert_refused(
        &admin(&s, http::Method::POST, "/admin/plugins/swap/rollback", "").await,
        409,
        "no kept version before",
    );
    assert_refused(
        &admin(&s, http::Method::POST, "/admin/plugins/swap/rollback", r#"{"version": 9}"#).await,
        404,
        "no version 9",
    );
    // Deploying what a kept version holds re-activates that version, no new number.
    assert_eq!(deploy(&s, "swap", &hostile(), Some(&manifest("3"))).await.json()["version"]["version"], 3);
    let r = admin(&s, http::Method::POST, "/admin/plugins/swap/rollback", "").await;
    assert_eq!(r.json()["version"]["version"], 2, "{}", r.text());
    assert_eq!(served(&s).await, ("2".into(), "2".into()));

    // The live version cannot be deleted; others can; only `keep_versions` are kept.
    assert_refused(&admin(&s, http::Method::DELETE, "/admin/plugins/swap/versions/2", "").await, 409, "is serving");
    assert_eq!(admin(&s, http::Method::DELETE, "/admin/plugins/swap/versions/3", "").await.status, 200);
    assert_eq!(deploy(&s, "swap", &hostile(), Some(&manifest("4"))).await.status, 201);
    assert_eq!(deploy(&s, "swap", &hostile(), Some(&manifest("5"))).await.status, 201);
    let v = admin(&s, http::Method::GET, "/admin/plugins/swap/versions", "").await.json();
    let kept: Vec<u64> = v["versions"].as_array().unwrap().iter().filter_map(|v| v["version"].as_u64()).collect();
    assert_eq!((kept, v["live"].as_u64()), (vec![2, 4, 5], Some(5)), "{v}");

    // A file dropped into the directory (hot reload) is recorded as a version too.
    std::fs::write(s.plugin_dir.join("swap.toml"), manifest("6")).unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while served(&s).await.1 != "6" {
        assert!(std::time::Instant::now() < until, "the directory change was not picked up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let v = admin(&s, http::Method::GET, "/admin/plugins/swap/versions", "").await.json();
    assert_eq!(v["versions"].as_array().unwrap().last().unwrap()["source"], "directory", "{v}");
    assert_eq!(served(&s).await, ("6".into(), "6".into()));

    // Removing stops serving; the versions stay, so a rollback brings it back.
    assert_eq!(admin(&s, http::Method::DELETE, "/admin/plugins/swap", "").await.status, 200);
    assert_eq!(s.post("/fn/swap/ok", "").await.status, 404);
    assert_eq!(admin(&s, http::Method::POST, "/admin/plugins/swap/rollback", r#"{"version": 5}"#).await.status, 200);
    assert_eq!(served(&s).await, ("5".into(), "5".into()));
    // A new name deploys from nothing.
    let r = deploy(&s, "fresh", &std::fs::read(guest_wasm("complete")).unwrap(), None).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let c = s.post("/fn/fresh", r#"{"model": "tiny", "prompt": "hi", "max_tokens": 2}"#).await;
    assert_eq!((c.status, c.headers["x-flywheel-plugin-version"].to_str().unwrap()), (200, "1"), "{}", c.text());
    s.shutdown().await;
}
