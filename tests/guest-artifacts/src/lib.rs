//! Paths of the middleware components the router's tests load.
//!
//! The build script builds the `middleware-examples` and `tests/guests` workspaces for
//! `wasm32-wasip2` and defines one constant per component, named by its upper-cased file stem
//! (`NOOP`, `API_KEY_AUTH`, `PROBE`, ...), holding the absolute path of its `.wasm` file. A
//! new guest crate in either workspace gets its constant with no change here.

include!(concat!(env!("OUT_DIR"), "/paths.rs"));

#[cfg(test)]
mod tests {
    use super::ALL;

    #[test]
    fn every_component_exists() {
        assert!(
            ALL.len() >= 6,
            "expected the example and test guests, got {ALL:?}"
        );
        for (name, path) in ALL {
            assert!(
                std::path::Path::new(path).is_file(),
                "{name}: {path} is missing"
            );
        }
    }
}
