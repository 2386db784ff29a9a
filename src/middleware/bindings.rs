//! Host bindings generated from `wit/router.wit`. Only what the rest of the host uses is
//! re-exported.

mod generated {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "middleware",
        exports: { default: async },
        // Arguments going into a guest borrow the host's data (headers, bodies) instead of
        // copying them into owned values first; the guest copy is the only one.
        ownership: Borrowing { duplicate_if_necessary: true },
    });
}

pub use generated::exports::slime::router::handler::Guest as Handler;
pub use generated::slime::router::types::{
    BodyEdit, ChunkAction, FailureMode, Hooks, JsonEdit, Manifest, Reply, Request, RequestAction,
    RequestPatch, Response, ResponsePatch, RouteHint,
};
pub use generated::slime::router::{host, tokenizer, types, workers};
pub use generated::{Middleware, MiddlewarePre};
