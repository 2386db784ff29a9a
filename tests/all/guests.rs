//! Every guest component has a host test, and broken components stop the router at startup
//! with a one-line error naming the file.

use std::process::Stdio;

use anyhow::Result;

#[test]
fn every_guest_component_has_a_host_test() -> Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/all");
    let mut sources = String::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.file_name().is_some_and(|n| n != "guests.rs") {
            sources.push_str(&std::fs::read_to_string(&path)?);
        }
    }
    for (stem, _) in guest_artifacts::ALL {
        let constant = stem.to_ascii_uppercase();
        assert!(
            sources.contains(&constant),
            "guest {stem} ({constant}) is used by no test"
        );
    }
    Ok(())
}

/// Runs the router binary with `args` and returns (exit success, stderr).
async fn start_binary(args: &[&str]) -> Result<(bool, String)> {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_slime-router"))
        .args(["--sglang-router-port", "0"])
        .args(args)
        .stdin(Stdio::null())
        .output();
    let output = tokio::time::timeout(std::time::Duration::from_secs(60), output).await??;
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

#[tokio::test]
async fn startup_refuses_missing_corrupt_or_incompatible_components() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("slime-router-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let corrupt = dir.join("corrupt.wasm");
    std::fs::write(&corrupt, b"this is not wasm")?;
    let core_module = dir.join("core.wasm");
    std::fs::write(&core_module, b"\0asm\x01\0\0\0")?;
    let missing = dir.join("missing.wasm");
    let init_error = format!("{}?mode=init-error", guest_artifacts::HOSTILE);
    let bad_config = format!("{}?no_such_key=1", guest_artifacts::NOOP);
    let cases = [
        (missing.display().to_string(), "missing.wasm"),
        (corrupt.display().to_string(), "corrupt.wasm"),
        (core_module.display().to_string(), "core.wasm"),
        (init_error, "hostile init error"),
        (bad_config, "noop"),
    ];
    for (spec, expect) in cases {
        let (ok, stderr) = start_binary(&["--slime-router-middleware-paths", &spec]).await?;
        assert!(!ok, "{spec} was accepted");
        let line = stderr.trim();
        assert_eq!(line.lines().count(), 1, "one line: {line}");
        assert!(line.contains(expect), "{spec}: {line}");
        assert!(
            line.starts_with("slime-router: middleware "),
            "names the middleware file: {line}"
        );
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
