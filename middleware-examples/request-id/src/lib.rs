//! `request-id`: gives every request an `x-request-id` the worker and the client both see, so a
//! line in the worker's log can be matched to the client's request. A client that already sent
//! one keeps it: tracing ids are assigned once, at the edge.

wit_bindgen::generate!({
    path: "../../wit",
    world: "middleware",
    additional_type_attributes: {
        "slime:router/types@0.1.0/request-patch": [#[derive(Default)]],
        "slime:router/types@0.1.0/response-patch": [#[derive(Default)]],
    },
});

use exports::slime::router::handler::Guest;
use slime::router::host;
use slime::router::types::{
    ChunkAction, ChunkResult, FailureMode, Hooks, Manifest, Reply, Request, RequestAction,
    RequestPatch, Response, ResponsePatch,
};

const HEADER: &str = "x-request-id";

struct RequestId;

impl Guest for RequestId {
    fn init(config: String) -> Result<Manifest, String> {
        if !config.is_empty() {
            return Err(format!("request-id: takes no config, got `{config}`"));
        }
        Ok(Manifest {
            name: "request-id".into(),
            hooks: Hooks::REQUEST | Hooks::RESPONSE,
            paths: Vec::new(),
            routes: Vec::new(),
            // A missing trace id is not worth failing a request over.
            response_fields: Vec::new(),
            on_failure: FailureMode::FailOpen,
            stateful: false,
        })
    }

    fn on_request(req: Request) -> RequestAction {
        // The id travels to `on-response` through the stash, not a guest global: instances are
        // pooled, so the response may be handled by a different instance than the request.
        if let Some((_, value)) = req.headers.iter().find(|(name, _)| name == HEADER) {
            return RequestAction::Continue(RequestPatch {
                stash: Some(value.clone()),
                ..Default::default()
            });
        }
        // The router's id is unique only for its lifetime; the clock keeps ids from two runs
        // of the router apart in logs that outlive both.
        let id = format!("{:016x}{:08x}", host::now_ns(), req.id).into_bytes();
        RequestAction::Continue(RequestPatch {
            set_headers: vec![(HEADER.into(), id.clone())],
            stash: Some(id),
            ..Default::default()
        })
    }

    fn on_response(_req: Request, _resp: Response, stash: Option<Vec<u8>>) -> ResponsePatch {
        // No stash means on-request did not run for this request (e.g. it failed open).
        let Some(id) = stash else {
            return ResponsePatch::default();
        };
        ResponsePatch {
            set_headers: vec![(HEADER.into(), id)],
            ..Default::default()
        }
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

export!(RequestId);
