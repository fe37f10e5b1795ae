//! Plugins as OCI artifacts, in the WebAssembly layout `wkg` and Spin use (one
//! `application/wasm` layer, an `application/vnd.wasm.config.v0+json` config), through
//! `oci-wasm` on `oci-client`. The plugin's manifest rides along as a manifest annotation
//! (base64: `oci-client` writes canonical JSON, which leaves newlines unescaped, and
//! registries reject those), so the artifact stays a plain Wasm artifact other tools can pull.
//!
//! Pulls are pinned: a tag is resolved to its manifest digest first, the manifest is
//! fetched by that digest, and `oci-client` checks every byte it receives against the
//! digests it asked for; a registry that serves anything else is refused.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use oci_wasm::{WasmClient, WasmConfig, WASM_LAYER_MEDIA_TYPE, WASM_MANIFEST_CONFIG_MEDIA_TYPE};

use crate::config::RegistryConfig;

/// The manifest annotation that carries the plugin's `<name>.toml`, base64-encoded.
pub const MANIFEST_ANNOTATION: &str = "dev.flywheel.plugin.manifest";
/// The scheme `flywheel deploy` takes for a registry reference.
pub const SCHEME: &str = "oci://";

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The reference or the artifact is not something we can deploy.
    #[error("{0}")]
    Invalid(String),
    /// The registry could not be reached, refused us, or served bytes that do not match.
    #[error("registry: {0}")]
    Registry(String),
}

/// A plugin pulled from a registry.
#[derive(Debug)]
pub struct Pulled {
    pub component: Vec<u8>,
    pub manifest: Option<String>,
    /// `registry/repository@sha256:…`: exactly what was pulled.
    pub pinned: String,
}

/// A registry client with the auth and transport `registries` configures.
pub struct Registries {
    client: WasmClient,
    registries: Vec<RegistryConfig>,
}

/// `oci://host/repo:tag` or `host/repo:tag`, parsed.
pub fn parse_reference(text: &str) -> Result<Reference, OciError> {
    let bare = text.strip_prefix(SCHEME).unwrap_or(text);
    bare.parse::<Reference>().map_err(|e| OciError::Invalid(format!("{text:?} is not an OCI reference: {e}")))
}

fn registry_error(e: oci_client::errors::OciDistributionError) -> OciError {
    use oci_client::errors::{OciDistributionError as E, OciErrorCode};
    let not_found = match &e {
        E::ImageManifestNotFoundError(_) => true,
        E::RegistryError { envelope, .. } => {
            envelope.errors.iter().any(|e| matches!(e.code, OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown))
        }
        _ => false,
    };
    if not_found {
        // Asked for something that is not there: the caller's mistake, not the registry's.
        return OciError::Invalid(format!("no such artifact in the registry: {e}"));
    }
    OciError::Registry(e.to_string())
}

impl Registries {
    pub fn new(registries: &[RegistryConfig]) -> Self {
        let plain_http = registries.iter().filter(|r| r.insecure).map(|r| r.host.clone()).collect();
        let config = ClientConfig { protocol: ClientProtocol::HttpsExcept(plain_http), ..Default::default() };
        Self { client: WasmClient::new(Client::new(config)), registries: registries.to_vec() }
    }

    fn auth(&self, reference: &Reference) -> Result<RegistryAuth, OciError> {
        let host = reference.resolve_registry();
        let Some(r) = self.registries.iter().find(|r| r.host == host || r.host == reference.registry()) else {
            return Ok(RegistryAuth::Anonymous);
        };
        match (&r.username, r.password().map_err(OciError::Invalid)?) {
            (Some(user), Some(password)) => Ok(RegistryAuth::Basic(user.clone(), password)),
            (None, None) => Ok(RegistryAuth::Anonymous),
            _ => Err(OciError::Invalid(format!("registry {}: set both username and password", r.host))),
        }
    }

    /// Push a component (and its manifest) as a Wasm artifact; returns the pinned reference.
    pub async fn push(&self, reference: &str, component: Vec<u8>, manifest: Option<&str>) -> Result<String, OciError> {
        let reference = parse_reference(reference)?;
        let auth = self.auth(&reference)?;
        let (config, layer) = WasmConfig::from_raw_component(component, None)
            .map_err(|e| OciError::Invalid(format!("not a WebAssembly component: {e:#}")))?;
        let mut annotations = BTreeMap::new();
        if let Some(m) = manifest {
            annotations.insert(MANIFEST_ANNOTATION.to_string(), BASE64.encode(m));
        }
        annotations.insert("org.opencontainers.image.created".into(), config.created.to_rfc3339());
        self.client
            .push(&reference, &auth, layer, config, Some(annotations))
            .await
            .map_err(|e| OciError::Registry(format!("{e:#}")))?;
        self.pin(&reference, &auth).await
    }

    /// The reference pinned to the manifest digest a tag names now (a digest stays as it is).
    pub async fn resolve(&self, reference: &str) -> Result<String, OciError> {
        let reference = parse_reference(reference)?;
        let auth = self.auth(&reference)?;
        self.pin(&reference, &auth).await
    }

    async fn pin(&self, reference: &Reference, auth: &RegistryAuth) -> Result<String, OciError> {
        let digest = match reference.digest() {
            Some(d) => d.to_string(),
            None => self.client.fetch_manifest_digest(reference, auth).await.map_err(registry_error)?,
        };
        Ok(format!("{}/{}@{digest}", reference.registry(), reference.repository()))
    }

    /// Pull a plugin, pinned by digest, refusing layers over `max_bytes` before fetching them.
    pub async fn pull(&self, reference: &str, max_bytes: usize) -> Result<Pulled, OciError> {
        let tagged = parse_reference(reference)?;
        let auth = self.auth(&tagged)?;
        let pinned = self.pin(&tagged, &auth).await?;
        let reference = parse_reference(&pinned)?;
        let (manifest, _digest) = self.client.pull_image_manifest(&reference, &auth).await.map_err(registry_error)?;
        if manifest.config.media_type != WASM_MANIFEST_CONFIG_MEDIA_TYPE {
            return Err(OciError::Invalid(format!(
                "{pinned} is not a Wasm artifact: its config is {:?}, not {WASM_MANIFEST_CONFIG_MEDIA_TYPE}",
                manifest.config.media_type
            )));
        }
        let [layer] = manifest.layers.as_slice() else {
            return Err(OciError::Invalid(format!(
                "{pinned} has {} layers; a Wasm artifact has exactly one",
                manifest.layers.len()
            )));
        };
        if layer.media_type != WASM_LAYER_MEDIA_TYPE {
            return Err(OciError::Invalid(format!(
                "{pinned}'s layer is {:?}, not {WASM_LAYER_MEDIA_TYPE}",
                layer.media_type
            )));
        }
        if usize::try_from(layer.size).map_or(true, |s| s > max_bytes) {
            return Err(OciError::Invalid(format!(
                "{pinned}'s component is {} bytes, over the {max_bytes}-byte limit (plugins.max_component_mb)",
                layer.size
            )));
        }
        let mut component = Vec::with_capacity(usize::try_from(layer.size).unwrap_or(0));
        self.client.pull_blob(&reference, layer, &mut component).await.map_err(registry_error)?;
        if component.len() > max_bytes {
            return Err(OciError::Invalid(format!("{pinned}'s component is larger than its manifest says")));
        }
        let manifest = match manifest.annotations.as_ref().and_then(|a| a.get(MANIFEST_ANNOTATION)) {
            None => None,
            Some(encoded) => {
                Some(BASE64.decode(encoded).ok().and_then(|b| String::from_utf8(b).ok()).ok_or_else(|| {
                    OciError::Invalid(format!("{pinned}'s {MANIFEST_ANNOTATION} is not base64 UTF-8 text"))
                })?)
            }
        };
        Ok(Pulled { component, manifest, pinned })
    }
}
