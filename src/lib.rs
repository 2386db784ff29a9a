//! slime-router: a drop-in replacement for slime's SlimeRouter, with least-in-flight
//! routing, health checks and a pipeline of sandboxed WebAssembly middleware.
//!
//! The data path, in the order a request meets it: `server` accepts, `dispatch` routes it
//! (the router's own endpoints in `admin`), `request` reads its body, `middleware` runs the
//! guest pipeline, [`pool`] picks a worker with a [`policy`], `proxy` forwards over
//! `upstream` connections and `body` streams the answer back. Beside it: `health`,
//! `control` (the RL loop's fanned-out calls, with `rids` and `versions`), [`metrics`],
//! [`tokenizer`].
//!
//! The public surface is what the binary, the integration tests and the benchmarks use:
//! [`RunningRouter`] and its [`Config`], and the pieces the micro-benchmarks drive directly.
#![warn(missing_docs)]

mod admin;
mod app;
mod background;
mod body;
pub mod chat_template;
pub mod config;
mod control;
mod dispatch;
mod engine_metrics;
mod error;
mod health;
mod json;
mod listen;
pub mod metrics;
pub mod middleware;
mod parse_errors;
mod path;
mod pd;
pub mod policy;
pub mod pool;
mod proxy;
mod request;
mod rids;
mod server;
pub mod tokenizer;
mod upstream;
mod versions;
pub mod worker;
mod worker_hosts;
mod worker_stream;

pub use config::Config;
pub use server::RunningRouter;
