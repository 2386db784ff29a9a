//! slime-router: a drop-in replacement for slime's SlimeRouter, with least-in-flight
//! routing, health checks and a pipeline of sandboxed WebAssembly middleware.
//!
//! The data path, in the order a request meets it: [`server`] accepts and routes,
//! [`middleware`] runs the guest pipeline, [`pool`] picks a worker, [`proxy`] forwards and
//! streams the answer back in a [`body::RouterBody`]. Beside it: [`admin`], [`fanout`],
//! [`health`], [`metrics`], [`tokenizer`].

pub mod admin;
pub mod body;
pub mod config;
pub mod error;
pub mod fanout;
pub mod health;
pub mod listen;
pub mod metrics;
pub mod middleware;
pub mod pool;
pub mod proxy;
pub mod server;
pub mod tokenizer;
pub mod upstream;

pub use config::Config;
pub use server::RunningRouter;
