//! `flywheel deploy` and `flywheel plugin push`: the fleet and registry side of the CLI.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use crate::load_config;

#[derive(Args)]
pub(crate) struct DeployArgs {
    /// The component (`<name>.wasm`, its `<name>.toml` beside it is the manifest), a folder
    /// holding one, or `oci://<registry>/<repo>:<tag>` (each node pulls it, pinned by
    /// digest); with `--rollback`, the plugin's name.
    plugin: PathBuf,
    /// Manifest to deploy with the component (instead of the `.toml` beside it).
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// Name to deploy under (default: the component's file name).
    #[arg(long)]
    name: Option<String>,
    /// Node base URLs (repeat the flag, or separate with commas).
    #[arg(long, value_delimiter = ',')]
    to: Vec<String>,
    /// A file of node URLs, one per line (`#` starts a comment).
    #[arg(long)]
    nodes: Option<PathBuf>,
    /// The nodes' `auth.admin_key`.
    #[arg(long, env = "FLYWHEEL_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
    /// Recorded with the version as who deployed it.
    #[arg(long, env = "USER", default_value = "flywheel-deploy")]
    deployed_by: String,
    /// Roll back instead: to this version, or (with no value) to the one before each node's live one.
    #[arg(long, num_args = 0..=1, default_missing_value = "previous")]
    rollback: Option<String>,
    /// Seconds to wait for each node.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
    /// Configuration file whose `[[registries]]` resolve an `oci://` reference (default:
    /// ./flywheel.toml if present).
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub(crate) async fn deploy(args: DeployArgs) -> anyhow::Result<()> {
    use flywheel::fleet::{node_list, Fleet, Upload};
    let nodes = node_list(&args.to, args.nodes.as_deref())?;
    let fleet = Fleet::new(args.admin_key.clone(), std::time::Duration::from_secs(args.timeout_s))?;
    let (action, outcomes) = match args.rollback.as_deref() {
        Some(to) => {
            let version = match to {
                "previous" => None,
                v => Some(v.parse::<u64>().with_context(|| format!("--rollback {v:?} is not a version number"))?),
            };
            let name = match &args.name {
                Some(n) => n.clone(),
                None => args.plugin.file_stem().and_then(|s| s.to_str()).unwrap_or("").to_string(),
            };
            ("rollback", fleet.rollback(&nodes, &name, version).await)
        }
        None => match args.plugin.to_str().filter(|p| p.starts_with(flywheel::oci::SCHEME)) {
            Some(reference) => {
                // Pinned here, once, so every node pulls the same artifact even if the tag moves.
                let registries = flywheel::oci::Registries::new(&load_config(args.config.as_deref())?.registries);
                let pinned = registries.resolve(reference).await?;
                eprintln!("deploying {pinned}");
                let name = match &args.name {
                    Some(n) => n.clone(),
                    None => flywheel::oci::parse_reference(reference)?
                        .repository()
                        .rsplit('/')
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                };
                let manifest = match &args.manifest {
                    Some(p) => {
                        Some(std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?)
                    }
                    None => None,
                };
                let pinned = format!("{}{pinned}", flywheel::oci::SCHEME);
                ("deploy", fleet.deploy_reference(&nodes, &name, &pinned, manifest.as_deref(), &args.deployed_by).await)
            }
            None => {
                let upload =
                    Upload::from_path(&args.plugin, args.manifest.as_deref(), args.name.as_deref(), &args.deployed_by)?;
                ("deploy", fleet.deploy(&nodes, &upload).await)
            }
        },
    };
    let failed = outcomes.iter().filter(|o| !o.ok()).count();
    if args.json {
        for o in &outcomes {
            println!("{}", serde_json::to_string(o)?);
        }
    } else {
        println!("{:<32} {:>6} {:>8} {:>8}  error", "node", "status", "version", "previous");
        let show = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        for o in &outcomes {
            let status = o.status.map_or("-".to_string(), |s| s.to_string());
            println!(
                "{:<32} {:>6} {:>8} {:>8}  {}",
                o.node,
                status,
                show(o.version),
                show(o.previous),
                o.error.as_deref().unwrap_or("")
            );
        }
    }
    anyhow::ensure!(failed == 0, "{action} failed on {failed} of {} nodes", outcomes.len());
    Ok(())
}

pub(crate) async fn push_plugin(
    wasm: &Path,
    reference: &str,
    manifest: Option<&Path>,
    config: Option<&Path>,
) -> anyhow::Result<()> {
    let upload = flywheel::fleet::Upload::from_path(wasm, manifest, None, "")?;
    let registries = flywheel::oci::Registries::new(&load_config(config)?.registries);
    let pinned = registries.push(reference, upload.component, upload.manifest.as_deref()).await?;
    println!("{}{pinned}", flywheel::oci::SCHEME);
    Ok(())
}
