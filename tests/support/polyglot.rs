//! The Python and JavaScript example plugins, built with `scripts/build-plugin.sh` (which
//! installs their pinned toolchains) when their sources are newer than the last build.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// Python and JavaScript examples, by folder name.
pub const EXAMPLES: &[&str] = &["py-complete", "py-chat", "py-classify", "js-complete"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn newest(path: &Path) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.is_dir() {
            for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
                let p = entry.path();
                if p.file_name().is_some_and(|n| n != "__pycache__") {
                    newest = newest.max(self::newest(&p));
                }
            }
        } else if let Ok(m) = meta.modified() {
            newest = m;
        }
    }
    newest
}

/// The compile cache the builds fill and the test servers read (content-addressed, so it
/// is safe to share across test processes).
pub fn cache_dir() -> PathBuf {
    root().join("target/plugins/cache")
}

/// The built component of example `name` (`target/plugins/<name>.wasm`), rebuilt first when
/// its sources, the SDK, the WIT or the build scripts changed since.
pub fn example_wasm(name: &str) -> PathBuf {
    // One build at a time, so two tests never run the same toolchain on the same output.
    static BUILDING: Mutex<()> = Mutex::new(());
    let _one = BUILDING.lock().unwrap_or_else(|p| p.into_inner());
    let root = root();
    let out = root.join(format!("target/plugins/{name}.wasm"));
    let sdk = if name.starts_with("js-") { "guest/js" } else { "guest/python" };
    let sources = [format!("examples/{name}"), sdk.into(), "wit".into(), "scripts/build-plugin.sh".into()];
    let newest_source = sources.iter().map(|s| newest(&root.join(s))).max().unwrap_or(SystemTime::UNIX_EPOCH);
    let built = std::fs::metadata(&out).and_then(|m| m.modified()).ok();
    if built.is_some_and(|b| b >= newest_source) {
        return out;
    }
    let scratch = super::scratch_dir("polyglot-build");
    let status = std::process::Command::new("bash")
        .current_dir(&root)
        .arg("scripts/build-plugin.sh")
        .arg(format!("examples/{name}"))
        .arg(&scratch)
        .env("FLYWHEEL_BIN", env!("CARGO_BIN_EXE_flywheel"))
        .env("FLYWHEEL_CACHE_DIR", cache_dir())
        .status()
        .expect("run scripts/build-plugin.sh");
    assert!(status.success(), "building example {name} failed");
    out
}

/// Install example `name` with its manifest (plus `extra` manifest lines) in `dir`.
pub fn install_example(dir: &Path, name: &str, extra: &str) {
    std::fs::copy(example_wasm(name), dir.join(format!("{name}.wasm"))).expect("copy plugin");
    let manifest = std::fs::read_to_string(root().join(format!("examples/{name}/{name}.toml"))).unwrap_or_default();
    // Extra lines go before any table, so they stay top-level keys.
    let (head, tables) = match manifest.find("\n[") {
        Some(at) => manifest.split_at(at + 1),
        None => (manifest.as_str(), ""),
    };
    std::fs::write(dir.join(format!("{name}.toml")), format!("{head}{extra}\n{tables}")).expect("write manifest");
}
