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

/// Debian's `docker-registry` (distribution 2.8) on a loopback port, with htpasswd auth.
struct Registry {
    child: std::process::Child,
    host: String,
    data: std::path::PathBuf,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const REGISTRY_USER: &str = "flywheel";
const REGISTRY_PASSWORD: &str = "s3cret-for-tests";

fn registry_binary() -> Option<std::path::PathBuf> {
    ["/usr/bin/docker-registry", "/usr/local/bin/docker-registry"]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.is_file())
}

async fn start_registry(bin: &std::path::Path) -> Registry {
    let dir = scratch_dir("oci-registry");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let port = support::node::free_port();
    let hash = bcrypt::hash(REGISTRY_PASSWORD, 5).unwrap();
    std::fs::write(dir.join("htpasswd"), format!("{REGISTRY_USER}:{hash}\n")).unwrap();
    let data = dir.join("data");
    let config = format!(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\nauth:\n  htpasswd:\n    realm: flywheel-test\n    path: {}\n",
        data.display(),
        dir.join("htpasswd").display()
    );
    std::fs::write(dir.join("config.yml"), config).unwrap();
    let log = std::fs::File::create(dir.join("registry.log")).unwrap();
    let child = std::process::Command::new(bin)
        .arg("serve")
        .arg(dir.join("config.yml"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start docker-registry");
    let host = format!("127.0.0.1:{port}");
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&host).is_err() {
        assert!(std::time::Instant::now() < until, "the registry never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Registry { child, host, data }
}

/// `flywheel <args>` as a user runs it: (success, stdout, stderr).
async fn cli(args: Vec<String>, password: Option<&str>) -> (bool, String, String) {
    let password = password.map(str::to_string);
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_flywheel"));
        cmd.args(&args).env_remove("FLYWHEEL_REGISTRY_PASSWORD");
        if let Some(p) = password {
            cmd.env("FLYWHEEL_REGISTRY_PASSWORD", p);
        }
        cmd.output()
    })
    .await
    .unwrap()
    .expect("run flywheel");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_travel_through_a_real_registry_pinned_by_digest() {
    let Some(bin) = registry_binary() else {
        assert!(
            std::env::var_os("FLYWHEEL_REQUIRE_REGISTRY").is_none(),
            "docker-registry is required but not installed"
        );
        eprintln!("skipped: docker-registry is not installed (scripts/test.sh installs it)");
        return;
    };
    let registry = start_registry(&bin).await;
    let dir = scratch_dir("oci-cli");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("flywheel.toml");
    std::fs::write(
        &config,
        format!(
            "[[registries]]\nhost = \"{}\"\nusername = \"{REGISTRY_USER}\"\npassword_env = \"FLYWHEEL_REGISTRY_PASSWORD\"\ninsecure = true\n",
            registry.host
        ),
    )
    .unwrap();
    let component = dir.join("swap.wasm");
    std::fs::copy(guest_wasm("hostile"), &component).unwrap();
    std::fs::write(dir.join("swap.toml"), manifest("oci-1")).unwrap();
    let reference = format!("{}/plugins/swap:v1", registry.host);
    let push = |password: Option<&'static str>| {
        let args = vec![
            "plugin".into(),
            "push".into(),
            component.display().to_string(),
            reference.clone(),
            "-c".into(),
            config.display().to_string(),
        ];
        cli(args, password)
    };

    // Auth comes from the config: a wrong password is refused by the registry.
    let (ok, _, err) = push(Some("wrong")).await;
    assert!(!ok && err.to_lowercase().contains("auth"), "a push with a wrong password: {err}");
    let (ok, out, err) = push(Some(REGISTRY_PASSWORD)).await;
    assert!(ok, "push failed: {err}");
    let pinned = out.trim().to_string();
    let digest = pinned.rsplit_once('@').map(|(_, d)| d.to_string()).unwrap_or_default();
    assert!(
        pinned.starts_with(&format!("oci://{}/plugins/swap@sha256:", registry.host)) && digest.len() == 71,
        "{pinned}"
    );

    // Nodes have their own registry config (the password in the file, this time).
    let node_registries = vec![flywheel::config::RegistryConfig {
        host: registry.host.clone(),
        username: Some(REGISTRY_USER.into()),
        password: Some(REGISTRY_PASSWORD.into()),
        password_env: None,
        insecure: true,
    }];
    // A node pulls it (its own registry config) and serves it with the manifest it carried.
    let s = start(vec![tiny_manifest("tiny")], &[plugin("swap", "hostile", Some(&manifest("dir")))], |c| {
        c.auth.admin_key = Some("admin".into());
        c.registries = node_registries.clone();
    })
    .await;
    assert_eq!(served(&s).await, ("1".into(), "dir".into()));
    let (ok, out, err) = cli(
        vec![
            "deploy".into(),
            format!("oci://{reference}"),
            "--to".into(),
            s.url.clone(),
            "--admin-key".into(),
            "admin".into(),
            "-c".into(),
            config.display().to_string(),
            "--json".into(),
        ],
        Some(REGISTRY_PASSWORD),
    )
    .await;
    assert!(ok, "deploy by reference failed: {out}{err}");
    assert!(err.contains(&pinned["oci://".len()..]), "the CLI pins the tag before the nodes pull: {err}");
    let d: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!((d["status"].as_u64(), d["version"].as_u64()), (Some(201), Some(2)), "{d}");
    assert_eq!(served(&s).await, ("2".into(), "oci-1".into()));
    let v = admin(&s, http::Method::GET, "/admin/plugins/swap/versions", "").await.json();
    assert_eq!(v["versions"][1]["source"], pinned.as_str(), "{v}");

    // A node that pulls it at start, as the Kubernetes manifests do.
    let pulled = start(vec![tiny_manifest("tiny")], &[], |c| {
        c.auth.admin_key = Some("admin".into());
        c.registries = node_registries.clone();
        c.plugins.pull =
            vec![flywheel::config::PluginPull { name: "swap".into(), reference: pinned["oci://".len()..].to_string() }];
    })
    .await;
    assert_eq!(served(&pulled).await, ("1".into(), "oci-1".into()));
    drop(pulled);

    // Refusals, each leaving version 2 serving: a reference with nothing behind it, a
    // registry that serves bytes which do not match their digest.
    let pull = |name: &str, oci: String| {
        let body = serde_json::json!({ "oci": oci }).to_string();
        let req = http::Request::put(format!("{}/admin/plugins/{name}", s.url))
            .header("authorization", ADMIN)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        s.send(req)
    };
    let missing = pull("swap", format!("{}/plugins/swap:nope", registry.host)).await;
    assert_refused(&missing, 422, "no such artifact");
    let blob_hex = {
        use sha2::Digest;
        format!("{:x}", sha2::Sha256::digest(std::fs::read(&component).unwrap()))
    };
    let blob = registry.data.join(format!("docker/registry/v2/blobs/sha256/{}/{blob_hex}/data", &blob_hex[..2]));
    let mut bytes = std::fs::read(&blob).expect("the layer blob in the registry's storage");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let tampered = pull("other", pinned["oci://".len()..].to_string()).await;
    assert_refused(&tampered, 502, "digest");
    assert_eq!(s.post("/fn/other/ok", "").await.status, 404, "a tampered artifact went live");
    assert_eq!(served(&s).await, ("2".into(), "oci-1".into()));
}
