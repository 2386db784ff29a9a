//! `affinity-router`: sends the requests of one session to the same worker while that worker
//! is not overloaded, so the worker's prefix (KV) cache is reused across turns of a rollout.
//!
//! The home worker is chosen by rendezvous (highest-random-weight) hashing of the session key
//! over the live workers: when a worker dies or joins, only the sessions homed on it move.
//! When the home worker has more than `slack` requests in flight above the least loaded live
//! worker, the request spills over to plain least in-flight: a warm cache is not worth a queue.
//!
//! Config: `header=x-session-id` (the session key's header), `slack=2`.

wit_bindgen::generate!({
    path: "../../wit",
    world: "middleware",
    additional_type_attributes: {
        "slime:router/types@0.1.0/request-patch": [#[derive(Default)]],
        "slime:router/types@0.1.0/response-patch": [#[derive(Default)]],
    },
});

use std::sync::OnceLock;

use exports::slime::router::handler::Guest;
use slime::router::host::{self, Level};
use slime::router::types::{
    ChunkAction, ChunkResult, FailureMode, Hooks, Manifest, Reply, Request, RequestAction,
    RequestPatch, Response, ResponsePatch, RouteHint,
};
use slime::router::workers;

#[derive(Clone, PartialEq)]
struct Config {
    header: String,
    slack: u32,
}

/// Set by `init`, which runs in every instance before any hook.
static CONFIG: OnceLock<Config> = OnceLock::new();

struct AffinityRouter;

impl Guest for AffinityRouter {
    fn init(config: String) -> Result<Manifest, String> {
        let mut parsed = Config {
            header: "x-session-id".into(),
            slack: 2,
        };
        for pair in config.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                // The host hands us lowercase header names.
                "header" if !value.is_empty() => parsed.header = value.to_ascii_lowercase(),
                "slack" => {
                    parsed.slack = value
                        .parse()
                        .map_err(|e| format!("affinity-router: slack=`{value}`: {e}"))?;
                }
                _ => {
                    return Err(format!(
                        "affinity-router: bad config `{pair}` (known: header=<name>, slack=<n>)"
                    ));
                }
            }
        }
        if *CONFIG.get_or_init(|| parsed.clone()) != parsed {
            return Err("affinity-router: init called again with a different config".into());
        }
        Ok(Manifest {
            name: "affinity-router".into(),
            hooks: Hooks::REQUEST,
            paths: Vec::new(),
            routes: Vec::new(),
            // Affinity is an optimisation: without it, the pool still routes correctly.
            response_fields: Vec::new(),
            on_failure: FailureMode::FailOpen,
            stateful: false,
        })
    }

    fn on_request(req: Request) -> RequestAction {
        let route = CONFIG.get().and_then(|config| {
            let (_, key) = req
                .headers
                .iter()
                .find(|(name, _)| *name == config.header)?;
            pick(key, config.slack)
        });
        RequestAction::Continue(RequestPatch {
            route,
            ..Default::default()
        })
    }

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

/// The hint for a session `key`: its home worker, or none to spill to least in-flight.
fn pick(key: &[u8], slack: u32) -> Option<RouteHint> {
    let workers = workers::list();
    let live = || workers.iter().filter(|w| w.live);
    let min_in_flight = live().map(|w| w.in_flight).min()?;
    let home = live().max_by_key(|w| weight(key, &w.url))?;
    if home.in_flight > min_in_flight.saturating_add(slack) {
        host::log(
            Level::Debug,
            &format!("session spills: home {} is busy", home.url),
        );
        return None;
    }
    // The final worker is chosen by the pool, so log the preference, not the outcome.
    host::log(Level::Debug, &format!("session prefers {}", home.url));
    Some(RouteHint::Prefer(home.url.clone()))
}

/// The rendezvous weight of (session, worker): FNV-1a over both, then a 64-bit finaliser so
/// that urls differing in one character still get unrelated weights. Hand-written rather than
/// `DefaultHasher`, whose output may change between Rust releases and would move sessions.
fn weight(key: &[u8], url: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    // 0xff never occurs in a UTF-8 url, so the last 0xff marks where the key ends.
    for &b in key.iter().chain(&[0xff]).chain(url.as_bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64's finaliser.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

export!(AffinityRouter);
