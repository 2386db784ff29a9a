//! The component: binds [`Cache`] to the `middleware` world of `wit/router.wit`.

use std::cell::RefCell;

use crate::cache::{Cache, Host, RequestOutcome};

wit_bindgen::generate!({
    path: "../../wit",
    world: "middleware",
    additional_type_attributes: {
        "slime:router/types@0.1.0/request-patch": [#[derive(Default)]],
        "slime:router/types@0.1.0/response-patch": [#[derive(Default)]],
    },
});

use exports::slime::router::handler::Guest;
use slime::router::host::{self as router_host, Level};
use slime::router::tokenizer;
use slime::router::types::{
    BodyEdit, ChunkAction, ChunkResult, FailureMode, Hooks, JsonEdit, Manifest, Reply, Request,
    RequestAction, RequestPatch, Response, ResponsePatch, Route,
};

thread_local! {
    /// The cache. The manifest asks for a stateful instance: one per router, calls serialised,
    /// and a new one (new `init`, empty cache) only after a call traps or times out.
    static CACHE: RefCell<Option<Cache>> = const { RefCell::new(None) };
}

/// Runs `f` on the cache, or returns `default` before `init`.
fn with_cache<R>(default: R, f: impl FnOnce(&mut Cache) -> R) -> R {
    CACHE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut guard) => match guard.as_mut() {
            Some(cache) => f(cache),
            None => default,
        },
        Err(_) => default,
    })
}

/// The router's imports.
struct RouterHost;

impl Host for RouterHost {
    fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        tokenizer::encode(text)
    }

    fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, String> {
        tokenizer::decode(ids, skip_special)
    }

    fn token_lengths(&self, ids: &[u32], skip_special: bool) -> Result<Vec<u32>, String> {
        tokenizer::token_lengths(ids, skip_special)
    }

    fn debug(&self, message: &str) {
        router_host::log(Level::Debug, message);
    }

    fn counter_add(&self, name: &str, value: u64) {
        router_host::counter_add(name, value);
    }

    fn gauge_set(&self, name: &str, value: i64) {
        router_host::gauge_set(name, value);
    }
}

fn json_reply(status: u16, body: Vec<u8>) -> Reply {
    Reply {
        status,
        headers: vec![("content-type".into(), b"application/json".to_vec())],
        body,
    }
}

struct RadixTreeMiddleware;

impl Guest for RadixTreeMiddleware {
    fn init(config: String) -> Result<Manifest, String> {
        let config = crate::config::parse(&config)?;
        // Runs in every instance the router creates: at startup and again when it rebuilds
        // this one after a trap. Each run starts an empty cache with a new id (the clock
        // only moves forward), so that stashes of requests the old instance rewrote are not
        // read as nodes of the new tree, and resets the gauges the old instance left.
        let resets = router_host::discarded();
        if resets > 0 {
            router_host::log(
                Level::Warn,
                &format!("radix-tree: a failure took the cache ({resets} so far); starting empty"),
            );
        }
        let mut cache = Cache::new(config, router_host::now_ns()).with_resets(resets);
        cache.publish(&RouterHost);
        CACHE.with(|cell| cell.replace(Some(cache)));
        Ok(Manifest {
            name: "radix-tree".into(),
            hooks: Hooks::REQUEST
                | Hooks::REQUEST_BODY
                | Hooks::RESPONSE
                | Hooks::RESPONSE_BODY
                | Hooks::RESPONSE_CHUNKS,
            paths: vec!["/generate".into()],
            routes: vec![
                Route {
                    method: "POST".into(),
                    path: "/retrieve_from_text".into(),
                },
                Route {
                    method: "GET".into(),
                    path: "/radix_tree/stats".into(),
                },
            ],
            // Only what `sglang::GenerateOutput` reads: SGLang answers can carry megabytes
            // of base64 `routed_experts`, which the host then never copies in here.
            response_fields: [
                "text",
                "output_ids",
                "meta_info.output_token_logprobs",
                "meta_info.weight_version",
                "meta_info.finish_reason",
                "meta_info.completion_tokens",
            ]
            .map(String::from)
            .to_vec(),
            // The cache only speeds up /generate and records it: if it traps, the request
            // still goes out with its `text` and SGLang tokenises it, so generation never
            // fails because of the cache. The cost is that the rebuilt instance starts empty.
            on_failure: FailureMode::FailOpen,
            stateful: true,
        })
    }

    fn on_request(req: Request) -> RequestAction {
        let Some(body) = req.body else {
            return RequestAction::Continue(RequestPatch::default());
        };
        let outcome = with_cache(RequestOutcome::Pass, |c| c.on_request(&body, &RouterHost));
        RequestAction::Continue(match outcome {
            RequestOutcome::Pass => RequestPatch::default(),
            RequestOutcome::Record { stash } => RequestPatch {
                stash: Some(stash),
                ..RequestPatch::default()
            },
            RequestOutcome::Rewrite { input_ids, stash } => RequestPatch {
                body: Some(BodyEdit::Json(vec![
                    JsonEdit::Remove("text".into()),
                    JsonEdit::SetIds(("input_ids".into(), input_ids)),
                ])),
                stash: Some(stash),
                ..RequestPatch::default()
            },
        })
    }

    fn on_response(_req: Request, resp: Response, stash: Option<Vec<u8>>) -> ResponsePatch {
        // Event streams come without a body and go through on_response_chunk.
        if let (Some(stash), Some(body)) = (stash, resp.body) {
            with_cache((), |c| {
                c.on_response(resp.status, &body, &stash, &RouterHost)
            });
        }
        // Never echo the body: an empty patch costs nothing to return.
        ResponsePatch::default()
    }

    fn on_response_chunk(
        _request_id: u64,
        events: Vec<u8>,
        last: bool,
        stash: Option<Vec<u8>>,
    ) -> ChunkResult {
        let stash = stash
            .and_then(|stash| with_cache(None, |c| c.on_chunk(&events, last, &stash, &RouterHost)));
        ChunkResult {
            action: ChunkAction::Pass,
            stash,
        }
    }

    fn handle(req: Request) -> Reply {
        let body = req.body.unwrap_or_default();
        let reply = with_cache(None, |c| {
            Some(c.handle(&req.method, &req.path, &body, &RouterHost))
        });
        match reply {
            Some(reply) => json_reply(reply.status, reply.body),
            None => json_reply(503, br#"{"error":"radix-tree: not initialised"}"#.to_vec()),
        }
    }
}

export!(RadixTreeMiddleware);
