//! Builds the guest workspaces for wasm32-wasip2 and writes `$OUT_DIR/paths.rs`, one constant
//! per component plus `ALL`. Each workspace keeps its own target dir, so the guests are built
//! once whether the router's tests, `build.sh` or a developer asked for them.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const TARGET: &str = "wasm32-wasip2";

/// Guest workspaces, relative to this crate.
const WORKSPACES: &[&str] = &["../../middleware-examples", "../guests"];

/// The interface every guest is generated from, relative to this crate.
const WIT: &str = "../../wit";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            // Cargo prints a failing build script's stderr, so this is what the user sees.
            eprintln!("error: guest-artifacts: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let manifest_dir = PathBuf::from(var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(var("OUT_DIR")?);

    println!("cargo:rerun-if-changed={WIT}");
    for workspace in WORKSPACES {
        rerun_if_workspace_changed(&manifest_dir, workspace)?;
    }

    ensure_target()?;

    let mut components = Vec::new();
    for workspace in WORKSPACES {
        let root = manifest_dir.join(workspace);
        let root = fs::canonicalize(&root).map_err(|e| format!("{}: {e}", root.display()))?;
        build(&root)?;
        components.extend(components_in(
            &root.join("target").join(TARGET).join("release"),
        )?);
    }
    components.sort();
    if let Some(pair) = components.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(format!(
            "two guest components are named {}: {} and {}",
            pair[0].0,
            pair[0].1.display(),
            pair[1].1.display()
        ));
    }

    fs::write(out_dir.join("paths.rs"), paths_rs(&components)?)
        .map_err(|e| format!("writing paths.rs: {e}"))
}

fn var(name: &str) -> Result<String, String> {
    env::var(name).map_err(|e| format!("${name}: {e}"))
}

/// Watches each member's sources and the workspace manifests, but not the workspace's target
/// dir: the nested build writes there, and watching it would rebuild on every run.
fn rerun_if_workspace_changed(manifest_dir: &Path, workspace: &str) -> Result<(), String> {
    println!("cargo:rerun-if-changed={workspace}/Cargo.toml");
    println!("cargo:rerun-if-changed={workspace}/Cargo.lock");
    let root = manifest_dir.join(workspace);
    let entries = fs::read_dir(&root).map_err(|e| format!("reading {}: {e}", root.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("reading {}: {e}", root.display()))?;
        if entry.file_name() != "target" && entry.path().join("Cargo.toml").is_file() {
            let member = entry.file_name();
            println!(
                "cargo:rerun-if-changed={workspace}/{}",
                member.to_string_lossy()
            );
        }
    }
    Ok(())
}

/// Installs the wasm32-wasip2 standard library when this toolchain lacks it.
fn ensure_target() -> Result<(), String> {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let output = Command::new(&rustc)
        .args(["--print", "target-libdir", "--target", TARGET])
        .output()
        .map_err(|e| format!("running {rustc}: {e}"))?;
    let libdir = String::from_utf8_lossy(&output.stdout);
    if output.status.success() && Path::new(libdir.trim()).is_dir() {
        return Ok(());
    }
    let status = Command::new("rustup")
        .args(["target", "add", TARGET])
        .status()
        .map_err(|e| format!("{TARGET} is not installed and rustup could not run: {e}"))?;
    if !status.success() {
        return Err(format!("`rustup target add {TARGET}` failed ({status})"));
    }
    Ok(())
}

/// `cargo build --release --target wasm32-wasip2` in `root`, with the environment of this build
/// script cleaned of what belongs to the outer build.
fn build(root: &Path) -> Result<(), String> {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(root)
        .args(["build", "--release", "--target", TARGET]);
    // Flags meant for the host build (coverage, sanitizers, target-cpu) break or slow a wasm
    // build; a target dir or target set for the outer build would put the guests elsewhere;
    // clippy's wrapper would lint the guests with the outer crate's settings.
    for name in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "CLIPPY_ARGS",
        "OUT_DIR",
    ] {
        cmd.env_remove(name);
    }
    // The outer package's features and cfgs describe the host build, not the guests'.
    for (name, _) in env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_FEATURE_") || name.starts_with("CARGO_CFG_") {
            cmd.env_remove(&*name);
        }
    }
    // CARGO_MAKEFLAGS stays: the nested cargo then takes its jobs from the outer jobserver
    // instead of starting as many again.
    let output = cmd
        .output()
        .map_err(|e| format!("running {cargo} in {}: {e}", root.display()))?;
    if !output.status.success() {
        return Err(format!(
            "`cargo build --release --target {TARGET}` in {} failed ({}):\n{}",
            root.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}

/// (file stem, path) of every component in a release dir.
fn components_in(dir: &Path) -> Result<Vec<(String, PathBuf)>, String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    let mut found = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| format!("reading {}: {e}", dir.display()))?
            .path();
        if path.extension().is_some_and(|ext| ext == "wasm")
            && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
        {
            found.push((stem.to_owned(), path.clone()));
        }
    }
    Ok(found)
}

fn paths_rs(components: &[(String, PathBuf)]) -> Result<String, String> {
    let mut out = String::new();
    let mut all = String::new();
    for (stem, path) in components {
        let path = path
            .to_str()
            .ok_or_else(|| format!("{} is not UTF-8", path.display()))?;
        let name = stem.to_ascii_uppercase().replace('-', "_");
        // `{:?}` writes a Rust string literal, escapes included.
        let _ = writeln!(
            out,
            "/// Path of `{stem}.wasm`.\npub const {name}: &str = {path:?};"
        );
        let _ = writeln!(all, "    ({stem:?}, {name}),");
    }
    let _ = writeln!(
        out,
        "/// Every component as (file stem, path), so a test can check each has a host test.\n\
         pub const ALL: &[(&str, &str)] = &[\n{all}];"
    );
    Ok(out)
}
