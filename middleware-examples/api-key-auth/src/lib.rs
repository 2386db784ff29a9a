//! `api-key-auth`: lets a request through only with a known API key, sent as
//! `authorization: Bearer <key>` or `x-api-key: <key>`, and strips the key before the request
//! goes upstream so workers and their logs never see credentials.
//!
//! Config: `keys=k1,k2` (required), `paths=/generate,/retrieve_from_text` (default: every path).

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
use slime::router::types::{
    ChunkAction, ChunkResult, FailureMode, Hooks, Manifest, Reply, Request, RequestAction,
    RequestPatch, Response, ResponsePatch,
};

/// Accepted keys. The router calls `init` in every instance it builds (each pool member, each
/// rebuild after a trap), so a global set there is always present in the hooks.
static KEYS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();

struct ApiKeyAuth;

impl Guest for ApiKeyAuth {
    fn init(config: String) -> Result<Manifest, String> {
        let mut keys = None;
        let mut paths = Vec::new();
        for pair in config.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "keys" => keys = Some(split_list(value)),
                "paths" => paths = split_list(value),
                _ => {
                    return Err(format!(
                        "api-key-auth: unknown config key `{key}` (known: keys, paths)"
                    ));
                }
            }
        }
        let keys: Vec<Vec<u8>> = match keys {
            Some(keys) if !keys.is_empty() => keys.into_iter().map(String::into_bytes).collect(),
            _ => return Err("api-key-auth: `keys=k1,k2` is required".into()),
        };
        if *KEYS.get_or_init(|| keys.clone()) != keys {
            return Err("api-key-auth: init called again with different keys".into());
        }
        Ok(Manifest {
            name: "api-key-auth".into(),
            hooks: Hooks::REQUEST,
            // The host filters by path, so unprotected paths cost no call at all.
            paths,
            routes: Vec::new(),
            // A broken auth check must not let traffic through.
            response_fields: Vec::new(),
            on_failure: FailureMode::FailClosed,
            stateful: false,
        })
    }

    fn on_request(req: Request) -> RequestAction {
        // No keys means init never ran here: refuse rather than let the request through.
        let keys = KEYS.get().map_or(&[][..], Vec::as_slice);
        let presented = req
            .headers
            .iter()
            .filter_map(|(name, value)| match name.as_str() {
                "authorization" => bearer_token(value),
                "x-api-key" => Some(value.as_slice()),
                _ => None,
            });
        let mut authorised = false;
        for candidate in presented {
            // Check every key without stopping early, so timing reveals no key's prefix.
            authorised |= keys
                .iter()
                .fold(false, |hit, key| hit | constant_time_eq(candidate, key));
        }
        if !authorised {
            return RequestAction::Respond(Reply {
                status: 401,
                headers: vec![
                    ("content-type".into(), b"application/json".to_vec()),
                    ("www-authenticate".into(), b"Bearer".to_vec()),
                ],
                body: br#"{"error":"missing or invalid API key"}"#.to_vec(),
            });
        }
        RequestAction::Continue(RequestPatch {
            remove_headers: vec!["authorization".into(), "x-api-key".into()],
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

fn split_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// The token of `Bearer <token>`; the scheme is case-insensitive (RFC 9110 §11.1).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

export!(ApiKeyAuth);
