//! Middleware compiled into the router, so that `--slime-router-middleware-paths radix_tree`
//! works from a pip-installed binary with no `.wasm` file and no wasm toolchain.
//!
//! The components are the `middleware-examples` guests. The root build script gets them built
//! by `tests/guest-artifacts` (the same build the tests use) and passes each one's path in a
//! `SLIME_ROUTER_GUEST_<STEM>` variable, which `include_bytes!` embeds.

use std::borrow::Cow;
use std::path::Path;

use anyhow::bail;

/// Every built-in middleware: its name (the example's `.wasm` file stem) and its component.
const BUILTIN: &[(&str, &[u8])] = &[
    (
        "affinity_router",
        include_bytes!(env!("SLIME_ROUTER_GUEST_AFFINITY_ROUTER")),
    ),
    (
        "api_key_auth",
        include_bytes!(env!("SLIME_ROUTER_GUEST_API_KEY_AUTH")),
    ),
    (
        "chat_completions",
        include_bytes!(env!("SLIME_ROUTER_GUEST_CHAT_COMPLETIONS")),
    ),
    ("noop", include_bytes!(env!("SLIME_ROUTER_GUEST_NOOP"))),
    (
        "radix_tree",
        include_bytes!(env!("SLIME_ROUTER_GUEST_RADIX_TREE")),
    ),
    (
        "request_id",
        include_bytes!(env!("SLIME_ROUTER_GUEST_REQUEST_ID")),
    ),
];

/// SlimeRouter's Python middleware paths and the built-in that replaces each, so that slime
/// command lines written for the Python router run unchanged.
const LEGACY: &[(&str, &str)] = &[(
    "slime.router.middleware_hub.radix_tree_middleware:RadixTreeMiddleware",
    "radix_tree",
)];

/// The built-in names, in the order `--list-middleware` prints them.
pub fn names() -> impl Iterator<Item = &'static str> {
    BUILTIN.iter().map(|(name, _)| *name)
}

/// The component bytes for one `--slime-router-middleware-paths` entry (its `?config`
/// already cut off).
///
/// A path (containing `/`, ending in `.wasm`, or naming an existing file) is read from disk,
/// so a file always wins over a built-in of the same name. Anything else must be a built-in
/// name (`-` and `_` alike, as crate and file names differ) or a legacy SlimeRouter path.
pub fn component(spec: &str) -> anyhow::Result<Cow<'static, [u8]>> {
    if spec.contains('/') || spec.ends_with(".wasm") || Path::new(spec).is_file() {
        // Reading a FIFO or a device would block startup (or never end): refuse them.
        let meta =
            std::fs::metadata(spec).map_err(|e| anyhow::anyhow!("cannot read the file: {e}"))?;
        if !meta.is_file() {
            bail!("not a regular file");
        }
        return std::fs::read(spec)
            .map(Cow::Owned)
            .map_err(|e| anyhow::anyhow!("cannot read the file: {e}"));
    }
    match builtin(spec) {
        Some(bytes) => Ok(Cow::Borrowed(bytes)),
        None => bail!(
            "no such file, and not a built-in middleware (built-in: {})",
            names().collect::<Vec<_>>().join(", ")
        ),
    }
}

fn builtin(spec: &str) -> Option<&'static [u8]> {
    let name = LEGACY
        .iter()
        .find(|(legacy, _)| *legacy == spec)
        .map_or_else(|| spec.replace('-', "_"), |(_, name)| (*name).to_owned());
    BUILTIN
        .iter()
        .find(|(builtin, _)| *builtin == name)
        .map(|(_, bytes)| *bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_legacy_paths_resolve_to_embedded_components() {
        for name in names() {
            let bytes = component(name).unwrap();
            // Every component starts with the wasm magic number.
            assert_eq!(&bytes[..4], b"\0asm", "{name}");
        }
        let legacy = component(LEGACY[0].0).unwrap();
        assert_eq!(&*legacy, builtin("radix_tree").unwrap());
        assert_eq!(&*component("radix-tree").unwrap(), &*legacy);
    }

    #[test]
    fn unknown_names_list_the_builtins_and_paths_read_files() {
        let error = component("radix_treee").unwrap_err().to_string();
        assert!(error.contains("radix_tree, request_id"), "{error}");
        let error = component("./radix_tree").unwrap_err().to_string();
        assert!(error.starts_with("cannot read the file"), "{error}");
        let error = component("radix_tree.wasm").unwrap_err().to_string();
        assert!(error.starts_with("cannot read the file"), "{error}");
    }

    #[test]
    fn fifos_and_devices_are_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!("slime-router-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("guest.wasm");
        let _ = std::fs::remove_file(&fifo);
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        for path in [fifo.to_str().unwrap(), "/dev/null"] {
            let error = component(path).unwrap_err().to_string();
            assert_eq!(error, "not a regular file", "{path}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
