//! Passes the path of every guest component to the compiler as `SLIME_ROUTER_GUEST_<STEM>`, so
//! that `src/middleware/builtin.rs` can `include_bytes!` the example middleware.
//!
//! The components come from the `guest-artifacts` build dependency, whose build script builds
//! the guest workspaces in their own target dirs (a nested cargo on this build's target dir
//! would wait forever for the lock this build holds). `include_bytes!` records each file as an
//! input, so a rebuilt guest rebuilds the router.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for (stem, path) in guest_artifacts::ALL {
        let name = stem.to_ascii_uppercase().replace('-', "_");
        println!("cargo:rustc-env=SLIME_ROUTER_GUEST_{name}={path}");
    }
}
