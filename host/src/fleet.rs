//! The client side of the deploy API: push one plugin to many nodes, or roll them all back,
//! and report per node. `flywheel deploy` is a thin shell over this.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// What to push: the component, its manifest and the name to deploy it under.
#[derive(Debug)]
pub struct Upload {
    pub name: String,
    pub component: Vec<u8>,
    pub manifest: Option<String>,
    pub deployed_by: String,
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Input(String),
}

impl Upload {
    /// A `.wasm` file (its `.toml` beside it is the manifest unless `manifest` names one),
    /// or a folder holding exactly one `.wasm`.
    pub fn from_path(
        path: &Path,
        manifest: Option<&Path>,
        name: Option<&str>,
        deployed_by: &str,
    ) -> Result<Self, FleetError> {
        let read = |p: &Path| std::fs::read(p).map_err(|source| FleetError::Read { path: p.to_path_buf(), source });
        let wasm = if path.is_dir() {
            let entries =
                std::fs::read_dir(path).map_err(|source| FleetError::Read { path: path.to_path_buf(), source })?;
            let mut found: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
                .collect();
            match found.len() {
                1 => found.remove(0),
                0 => return Err(FleetError::Input(format!("{} holds no .wasm file", path.display()))),
                _ => return Err(FleetError::Input(format!("{} holds several .wasm files; name one", path.display()))),
            }
        } else {
            path.to_path_buf()
        };
        let manifest_path = match manifest {
            Some(m) => Some(m.to_path_buf()),
            None => Some(wasm.with_extension("toml")).filter(|p| p.is_file()),
        };
        let manifest = match manifest_path {
            Some(p) => Some(
                String::from_utf8(read(&p)?).map_err(|_| FleetError::Input(format!("{} is not UTF-8", p.display())))?,
            ),
            None => None,
        };
        let name = match name {
            Some(n) => n.to_string(),
            None => wasm
                .file_stem()
                .and_then(|s| s.to_str())
                .ok_or_else(|| FleetError::Input(format!("cannot name a plugin after {}", wasm.display())))?
                .to_string(),
        };
        Ok(Self { name, component: read(&wasm)?, manifest, deployed_by: deployed_by.to_string() })
    }
}

/// What one node answered.
#[derive(Debug, serde::Serialize)]
pub struct NodeOutcome {
    pub node: String,
    /// The HTTP status, if the node answered.
    pub status: Option<u16>,
    /// The version now live on that node.
    pub version: Option<u64>,
    pub previous: Option<u64>,
    /// The node's error message, or why it could not be reached.
    pub error: Option<String>,
}

impl NodeOutcome {
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

/// Node URLs from the command line and, optionally, a file with one per line (`#` comments).
pub fn node_list(to: &[String], file: Option<&Path>) -> Result<Vec<String>, FleetError> {
    let mut nodes: Vec<String> = to.to_vec();
    if let Some(f) = file {
        let text = std::fs::read_to_string(f).map_err(|source| FleetError::Read { path: f.to_path_buf(), source })?;
        nodes.extend(
            text.lines()
                .map(|l| l.split('#').next().unwrap_or("").trim())
                .filter(|l| !l.is_empty())
                .map(str::to_string),
        );
    }
    if nodes.is_empty() {
        return Err(FleetError::Input("no nodes: give --to <url> or --nodes <file>".into()));
    }
    for n in &nodes {
        if !(n.starts_with("http://") || n.starts_with("https://")) {
            return Err(FleetError::Input(format!("node {n:?} is not an http:// or https:// URL")));
        }
    }
    Ok(nodes.into_iter().map(|n| n.trim_end_matches('/').to_string()).collect())
}

/// The admin API's client.
pub struct Fleet {
    client: reqwest::Client,
    admin_key: Option<String>,
}

impl Fleet {
    pub fn new(admin_key: Option<String>, timeout: Duration) -> Result<Self, FleetError> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| FleetError::Input(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self { client, admin_key })
    }

    fn authorized(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.admin_key {
            Some(k) => req.bearer_auth(k),
            None => req,
        }
    }

    /// Deploy to every node at once.
    pub async fn deploy(&self, nodes: &[String], upload: &Upload) -> Vec<NodeOutcome> {
        let calls = nodes.iter().map(|node| {
            let mut form = reqwest::multipart::Form::new()
                .part(
                    "component",
                    reqwest::multipart::Part::bytes(upload.component.clone())
                        .file_name(format!("{}.wasm", upload.name)),
                )
                .text("deployed_by", upload.deployed_by.clone());
            if let Some(m) = &upload.manifest {
                form = form.text("manifest", m.clone());
            }
            let req = self.authorized(self.client.put(format!("{node}/admin/plugins/{}", upload.name))).multipart(form);
            outcome(node.clone(), req)
        });
        in_parallel(calls).await
    }

    /// Have every node pull `reference` (pinned by digest, so all pull the same bytes) and
    /// deploy it as `name`; `manifest` overrides the one the artifact carries.
    pub async fn deploy_reference(
        &self,
        nodes: &[String],
        name: &str,
        reference: &str,
        manifest: Option<&str>,
        deployed_by: &str,
    ) -> Vec<NodeOutcome> {
        let body = serde_json::json!({ "oci": reference, "manifest": manifest, "deployed_by": deployed_by });
        self.json_to_all(nodes, reqwest::Method::PUT, &format!("/admin/plugins/{name}"), body).await
    }

    /// Roll every node back to `version` (the version before each node's live one when `None`).
    pub async fn rollback(&self, nodes: &[String], name: &str, version: Option<u64>) -> Vec<NodeOutcome> {
        let body = serde_json::json!({ "version": version });
        self.json_to_all(nodes, reqwest::Method::POST, &format!("/admin/plugins/{name}/rollback"), body).await
    }

    /// The same JSON request to every node at once.
    async fn json_to_all(
        &self,
        nodes: &[String],
        method: reqwest::Method,
        path: &str,
        body: serde_json::Value,
    ) -> Vec<NodeOutcome> {
        let body = body.to_string();
        let calls = nodes.iter().map(|node| {
            let req = self
                .authorized(self.client.request(method.clone(), format!("{node}{path}")))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone());
            outcome(node.clone(), req)
        });
        in_parallel(calls).await
    }
}

/// Run the calls concurrently, in order of the nodes.
async fn in_parallel<F: std::future::Future<Output = NodeOutcome> + Send + 'static>(
    calls: impl Iterator<Item = F>,
) -> Vec<NodeOutcome> {
    let handles: Vec<_> = calls.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap_or_else(|e| NodeOutcome {
            node: String::new(),
            status: None,
            version: None,
            previous: None,
            error: Some(format!("the request task failed: {e}")),
        }));
    }
    out
}

async fn outcome(node: String, req: reqwest::RequestBuilder) -> NodeOutcome {
    let mut o = NodeOutcome { node, status: None, version: None, previous: None, error: None };
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            o.error = Some(format!("unreachable: {e}"));
            return o;
        }
    };
    o.status = Some(resp.status().as_u16());
    let ok = resp.status().is_success();
    let body = resp.text().await.unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
    if ok {
        o.version = v["version"]["version"].as_u64();
        o.previous = v["previous"].as_u64();
    } else {
        o.error = Some(v["error"]["message"].as_str().map(str::to_string).unwrap_or(body));
    }
    o
}
