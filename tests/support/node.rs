//! Flywheel nodes as real processes (the `flywheel` binary with a config file), for tests
//! that kill them or measure their memory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::server::{install, plugin};

pub struct Node {
    pub child: Child,
    pub port: u16,
    pub dir: PathBuf,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// A node serving the tiny model (`max_sequences` of them) with the openai and complete
/// plugins; `extra` as for [`spawn_node_serving`].
pub fn spawn_node(name: &str, max_sequences: usize, extra: &str) -> Node {
    let manifest = format!(
        "name = \"tiny\"\nfile = \"{}\"\nthreads = 1\ncontext_length = 256\nmax_sequences = {max_sequences}\nbatch_size = 512\nmax_queue = 4096\n",
        super::tiny_model_path().display()
    );
    spawn_node_serving(name, &[("tiny", &manifest)], extra)
}

/// A node serving these models (name, manifest text with an absolute `file`) with the
/// openai and complete plugins. `extra` goes into its flywheel.toml right after the
/// `[models]` keys, so it may set more of them (`keep_alive`) or start tables of its own.
pub fn spawn_node_serving(name: &str, models: &[(&str, &str)], extra: &str) -> Node {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = super::scratch_dir(&format!("node-{name}-{n}"));
    let models_dir = dir.join("models");
    let plugins = dir.join("plugins");
    let _ = std::fs::remove_dir_all(&plugins);
    let _ = std::fs::remove_dir_all(&models_dir);
    std::fs::create_dir_all(&models_dir).expect("models dir");
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    for (model, manifest) in models {
        std::fs::write(models_dir.join(format!("{model}.toml")), manifest).expect("manifest");
    }
    let load: Vec<String> = models.iter().map(|(m, _)| format!("{m:?}")).collect();
    install(&plugins, &plugin("openai", "openai", Some("routes = [\"/v1/\"]\nmax_concurrency = 1024\n")));
    install(&plugins, &plugin("complete", "complete", None));
    let port = free_port();
    let config = dir.join("flywheel.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nmax_in_flight = 1024\nmax_queue = 4096\n[models]\ndir = \"models\"\nload = [{}]\n{extra}\n[plugins]\ndir = \"plugins\"\ncache_dir = \"cache\"\n[auth]\nadmin_key = \"admin\"\n[log]\nlevel = \"warn\"\n",
            load.join(", ")
        ),
    )
    .expect("config");
    let log = std::fs::File::create(dir.join("node.log")).expect("log");
    let child = Command::new(env!("CARGO_BIN_EXE_flywheel"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn flywheel");
    Node { child, port, dir }
}

impl Node {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub async fn wait_ready(&self) {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let req = http::Request::get(format!("{}/readyz", self.url())).body(Full::new(Bytes::new())).expect("req");
            if client.request(req).await.is_ok_and(|r| r.status() == 200) {
                return;
            }
            assert!(Instant::now() < until, "node on port {} never became ready: {}", self.port, self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default()
    }

    /// `/admin/models` of this node.
    pub async fn models(&self) -> serde_json::Value {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let req = http::Request::get(format!("{}/admin/models", self.url()))
            .header("authorization", "Bearer admin")
            .body(Full::new(Bytes::new()))
            .expect("req");
        let resp = client.request(req).await.expect("admin request");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        serde_json::from_slice(&body).expect("json")
    }

    /// Resident memory of the process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The nginx binary, if installed.
pub fn nginx_binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"].iter().map(PathBuf::from).find(|p| p.exists())
}

/// nginx in the foreground with the repository's deploy/nginx/flywheel.conf, its upstream
/// pointed at `backends` and listening on `port`.
pub fn spawn_nginx(nginx: &Path, port: u16, backends: &[u16]) -> Child {
    // A folder of its own: tests of one process run side by side, and two nginx sharing a
    // config file or pid file would start each other's configuration.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = super::scratch_dir(&format!("nginx-{n}"));
    for sub in ["tmp", "logs"] {
        std::fs::create_dir_all(dir.join(sub)).expect("nginx dir");
    }
    let site = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nginx/flywheel.conf"))
        .expect("deploy/nginx/flywheel.conf");
    let mut out = String::new();
    let mut servers_written = false;
    for line in site.lines() {
        let t = line.trim_start();
        if t.starts_with("server 10.0.0.") {
            if !servers_written {
                for b in backends {
                    out.push_str(&format!("    server 127.0.0.1:{b} max_fails=1 fail_timeout=10s;\n"));
                }
                servers_written = true;
            }
        } else if t.starts_with("listen ") {
            out.push_str(&format!("    listen 127.0.0.1:{port};\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(servers_written, "deploy/nginx/flywheel.conf has no upstream servers to replace");
    let d = dir.display();
    let root = if std::env::var("USER").as_deref() == Ok("root") || is_root() { "user root;\n" } else { "" };
    let conf = format!(
        "{root}worker_processes 1;\nerror_log {d}/logs/error.log warn;\npid {d}/nginx.pid;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log {d}/logs/access.log;\n  client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n  fastcgi_temp_path {d}/tmp/fastcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n{out}}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), conf).expect("nginx.conf");
    Command::new(nginx)
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nginx")
}

/// nginx as `spawn_nginx` starts it, on a port that was free a moment ago. Another test of
/// the same process may take that port in between (nginx then retries its bind for a few
/// seconds and gives up), so a few ports are tried, each until nginx accepts connections.
pub fn spawn_nginx_on_a_free_port(nginx: &Path, backends: &[u16]) -> (Child, u16) {
    for _ in 0..5 {
        let port = free_port();
        let mut child = spawn_nginx(nginx, port, backends);
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if !matches!(child.try_wait(), Ok(None)) {
                break;
            }
            if answers_as_nginx(port) {
                return (child, port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("nginx could not listen on a free port in five tries");
}

/// Whether what listens on `port` is an nginx (its `Server` header says so), not whatever
/// else took the port first.
fn answers_as_nginx(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 1024];
    let n = stream.read(&mut head).unwrap_or(0);
    String::from_utf8_lossy(&head[..n]).to_ascii_lowercase().contains("server: nginx")
}

fn is_root() -> bool {
    // /proc/self/status "Uid:" real uid is 0.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:")).map(|v| v.split_whitespace().next() == Some("0")))
        .unwrap_or(false)
}
