//! `noop`: the smallest useful middleware. It runs on every request and changes nothing, so
//! timing the router with and without it measures the per-call cost of the middleware
//! boundary itself. Copy this crate to start a new middleware.

wit_bindgen::generate!({
    path: "../../wit",
    world: "middleware",
    // Patches are mostly empty: `..Default::default()` keeps call sites to the fields a hook
    // actually changes.
    additional_type_attributes: {
        "slime:router/types@0.1.0/request-patch": [#[derive(Default)]],
        "slime:router/types@0.1.0/response-patch": [#[derive(Default)]],
    },
});

use exports::slime::router::handler::Guest;
use slime::router::types::{
    ChunkAction, ChunkResult, FailureMode, Hooks, Manifest, Reply, Request, RequestAction,
    RequestPatch, Response, ResponsePatch,
};

struct Noop;

impl Guest for Noop {
    fn init(config: String) -> Result<Manifest, String> {
        // Reject config rather than ignore it: a typo in a flag should stop the router at
        // startup, not silently run a middleware configured differently than intended.
        if !config.is_empty() {
            return Err(format!("noop: takes no config, got `{config}`"));
        }
        Ok(Manifest {
            name: "noop".into(),
            hooks: Hooks::REQUEST,
            paths: Vec::new(),
            routes: Vec::new(),
            response_fields: Vec::new(),
            on_failure: FailureMode::FailOpen,
            stateful: false,
        })
    }

    fn on_request(_req: Request) -> RequestAction {
        // An empty patch crosses the boundary as a few zero words: this is the floor cost.
        RequestAction::Continue(RequestPatch::default())
    }

    // The router only calls hooks named in the manifest, but a component must export every
    // function of the world; these return the neutral value of each hook.
    fn on_response(_req: Request, _resp: Response, _stash: Option<Vec<u8>>) -> ResponsePatch {
        ResponsePatch::default()
    }

    fn on_response_chunk(
        _id: u64,
        _events: Vec<u8>,
        _last: bool,
        _stash: Option<Vec<u8>>,
    ) -> ChunkResult {
        ChunkResult {
            action: ChunkAction::Pass,
            stash: None,
        }
    }

    fn handle(_req: Request) -> Reply {
        Reply {
            status: 404,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }
}

export!(Noop);
