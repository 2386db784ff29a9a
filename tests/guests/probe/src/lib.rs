//! `probe`: a test guest whose behaviour is chosen by its config string, so that one component
//! can exercise every part of the pipeline. All keys are optional:
//!
//! | key | effect |
//! | --- | --- |
//! | `name=<s>` | manifest name (default `probe`) |
//! | `paths=/a,/b` | manifest path filter |
//! | `fail=open\|closed` | failure mode (default closed) |
//! | `stateful=1` | one long-lived instance |
//! | `tag=1` | appends its name to request header `x-pipeline` and response header `x-pipeline-resp` |
//! | `respond=<status>` | answers the request itself with `{"from":"<name>"}` |
//! | `hint_header=1` | `prefer(<x-route-to>)` |
//! | `hint_among=1` | `among(<x-route-among split on ','>)` (wins over `hint_header`) |
//! | `json_edit=1` | asks for the request body; sets `mw_seen`, `probe_ids`, removes `drop_me` |
//! | `replace_body=1` | request body becomes `{"replaced":true}` (wins over `json_edit`) |
//! | `set_path=<p>` | upstream path |
//! | `resp_json=1` | asks for the response body; sets `probe_resp` to the name |
//! | `chunks=upper\|drop` | upper-cases or drops SSE chunks; `upper` ends with a summary event |
//! | `route=<path>` | serves `POST <path>` with its name, body length, call count and workers |
//! | `counter=1` | `counter-add("probe_calls", 1)` and `gauge-set("probe_gauge", 7)` per request |
//! | `log=1` | logs `probe <name> saw <path>` at info |
//! | `stash=1` | stashes the request path, returns it as response header `x-stash` |
//!
//! Hooks are derived from the keys: a probe with no request-side key gets no `on-request`.

wit_bindgen::generate!({
    path: "../../../wit",
    world: "middleware",
    additional_type_attributes: {
        "slime:router/types@0.1.0/request-patch": [#[derive(Default)]],
        "slime:router/types@0.1.0/response-patch": [#[derive(Default)]],
    },
});

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use exports::slime::router::handler::Guest;
use serde_json::json;
use slime::router::host::{self, Level};
use slime::router::types::{
    BodyEdit, ChunkAction, ChunkResult, FailureMode, Headers, Hooks, JsonEdit, Manifest, Reply,
    Request, RequestAction, RequestPatch, Response, ResponsePatch, Route, RouteHint,
};
use slime::router::workers;

#[derive(Clone, Default, PartialEq)]
enum Chunks {
    #[default]
    Off,
    Upper,
    Drop,
}

#[derive(Clone, Default, PartialEq)]
struct Config {
    name: String,
    paths: Vec<String>,
    fail_open: bool,
    stateful: bool,
    tag: bool,
    respond: Option<u16>,
    hint_header: bool,
    hint_among: bool,
    json_edit: bool,
    replace_body: bool,
    set_path: Option<String>,
    resp_json: bool,
    chunks: Chunks,
    route: Option<String>,
    counter: bool,
    log: bool,
    stash: bool,
}

impl Config {
    fn parse(config: &str) -> Result<Self, String> {
        let mut c = Config {
            name: "probe".into(),
            ..Default::default()
        };
        for pair in config.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let flag = || match value {
                "1" | "true" => Ok(true),
                "0" | "false" => Ok(false),
                _ => Err(format!("probe: `{key}` takes 1 or 0, got `{value}`")),
            };
            match key {
                "name" => c.name = value.into(),
                "paths" => {
                    c.paths = value
                        .split(',')
                        .filter(|p| !p.is_empty())
                        .map(String::from)
                        .collect();
                }
                "fail" => {
                    c.fail_open = match value {
                        "open" => true,
                        "closed" => false,
                        _ => return Err(format!("probe: fail=open|closed, got `{value}`")),
                    }
                }
                "stateful" => c.stateful = flag()?,
                "tag" => c.tag = flag()?,
                "respond" => {
                    let status = value.parse().map_err(|e| format!("probe: respond: {e}"))?;
                    c.respond = Some(status);
                }
                "hint_header" => c.hint_header = flag()?,
                "hint_among" => c.hint_among = flag()?,
                "json_edit" => c.json_edit = flag()?,
                "replace_body" => c.replace_body = flag()?,
                "set_path" => c.set_path = Some(value.into()),
                "resp_json" => c.resp_json = flag()?,
                "chunks" => {
                    c.chunks = match value {
                        "upper" => Chunks::Upper,
                        "drop" => Chunks::Drop,
                        _ => return Err(format!("probe: chunks=upper|drop, got `{value}`")),
                    }
                }
                "route" => c.route = Some(value.into()),
                "counter" => c.counter = flag()?,
                "log" => c.log = flag()?,
                "stash" => c.stash = flag()?,
                _ => return Err(format!("probe: unknown config key `{key}`")),
            }
        }
        Ok(c)
    }

    fn hooks(&self) -> Hooks {
        let mut hooks = Hooks::empty();
        let on_request = self.tag
            || self.respond.is_some()
            || self.hint_header
            || self.hint_among
            || self.json_edit
            || self.replace_body
            || self.set_path.is_some()
            || self.counter
            || self.log
            || self.stash;
        hooks.set(Hooks::REQUEST, on_request);
        hooks.set(Hooks::REQUEST_BODY, self.json_edit);
        hooks.set(Hooks::RESPONSE, self.tag || self.resp_json || self.stash);
        hooks.set(Hooks::RESPONSE_BODY, self.resp_json);
        hooks.set(Hooks::RESPONSE_CHUNKS, self.chunks != Chunks::Off);
        hooks
    }
}

static CONFIG: OnceLock<Config> = OnceLock::new();

/// Calls into this instance since it was built (any hook but `init`): with `stateful=1` it
/// keeps counting across requests, and it restarts at 1 once the host rebuilds the instance.
static CALLS: AtomicU64 = AtomicU64::new(0);

fn config() -> &'static Config {
    CALLS.fetch_add(1, Ordering::Relaxed);
    // Hooks before init would be a host bug; the default makes it visible as a probe that
    // does nothing, rather than a trap that hides which call came first.
    static DEFAULT: OnceLock<Config> = OnceLock::new();
    CONFIG
        .get()
        .unwrap_or_else(|| DEFAULT.get_or_init(Config::default))
}

fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_slice())
}

/// `existing,name`, or `name` when there is no existing value.
fn append(existing: Option<&[u8]>, name: &str) -> Vec<u8> {
    match existing {
        Some(v) if !v.is_empty() => [v, b",", name.as_bytes()].concat(),
        _ => name.as_bytes().to_vec(),
    }
}

fn json_reply(status: u16, body: &serde_json::Value) -> Reply {
    Reply {
        status,
        headers: vec![("content-type".into(), b"application/json".to_vec())],
        body: body.to_string().into_bytes(),
    }
}

const CHUNK_STASH: &[u8] = b"chunks:";

fn chunk_count(stash: Option<&[u8]>) -> u64 {
    stash
        .and_then(|s| s.strip_prefix(CHUNK_STASH))
        .and_then(|n| std::str::from_utf8(n).ok())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

struct Probe;

impl Guest for Probe {
    fn init(config: String) -> Result<Manifest, String> {
        let c = Config::parse(&config)?;
        if *CONFIG.get_or_init(|| c.clone()) != c {
            return Err("probe: init called again with a different config".into());
        }
        Ok(Manifest {
            name: c.name.clone(),
            hooks: c.hooks(),
            paths: c.paths.clone(),
            routes: c
                .route
                .iter()
                .map(|path| Route {
                    method: "POST".into(),
                    path: path.clone(),
                })
                .collect(),
            response_fields: Vec::new(),
            on_failure: if c.fail_open {
                FailureMode::FailOpen
            } else {
                FailureMode::FailClosed
            },
            stateful: c.stateful,
        })
    }

    fn on_request(req: Request) -> RequestAction {
        let c = config();
        if c.counter {
            host::counter_add("probe_calls", 1);
            host::gauge_set("probe_gauge", 7);
        }
        if c.log {
            host::log(Level::Info, &format!("probe {} saw {}", c.name, req.path));
        }
        if let Some(status) = c.respond {
            return RequestAction::Respond(json_reply(status, &json!({ "from": c.name })));
        }
        let mut patch = RequestPatch::default();
        if c.tag {
            let value = append(header(&req.headers, "x-pipeline"), &c.name);
            patch.set_headers.push(("x-pipeline".into(), value));
        }
        if c.hint_header
            && let Some(url) = header(&req.headers, "x-route-to")
        {
            patch.route = Some(RouteHint::Prefer(String::from_utf8_lossy(url).into_owned()));
        }
        if c.hint_among
            && let Some(urls) = header(&req.headers, "x-route-among")
        {
            let urls = String::from_utf8_lossy(urls);
            patch.route = Some(RouteHint::Among(
                urls.split(',').map(|u| u.trim().to_owned()).collect(),
            ));
        }
        if c.json_edit {
            patch.body = Some(BodyEdit::Json(vec![
                JsonEdit::Set(("mw_seen".into(), "true".into())),
                JsonEdit::SetIds(("probe_ids".into(), vec![1, 2, 3])),
                JsonEdit::Remove("drop_me".into()),
            ]));
        }
        if c.replace_body {
            patch.body = Some(BodyEdit::Replace(br#"{"replaced":true}"#.to_vec()));
        }
        patch.set_path.clone_from(&c.set_path);
        if c.stash {
            patch.stash = Some(req.path.into_bytes());
        }
        RequestAction::Continue(patch)
    }

    fn on_response(_req: Request, resp: Response, stash: Option<Vec<u8>>) -> ResponsePatch {
        let c = config();
        let mut patch = ResponsePatch::default();
        if c.tag {
            let value = append(header(&resp.headers, "x-pipeline-resp"), &c.name);
            patch.set_headers.push(("x-pipeline-resp".into(), value));
        }
        if c.stash
            && let Some(path) = stash
        {
            patch.set_headers.push(("x-stash".into(), path));
        }
        if c.resp_json {
            let name = serde_json::Value::from(c.name.as_str()).to_string();
            patch.body = Some(BodyEdit::Json(vec![JsonEdit::Set((
                "probe_resp".into(),
                name,
            ))]));
        }
        patch
    }

    fn on_response_chunk(
        _id: u64,
        events: Vec<u8>,
        last: bool,
        stash: Option<Vec<u8>>,
    ) -> ChunkResult {
        let c = config();
        match c.chunks {
            Chunks::Off => ChunkResult {
                action: ChunkAction::Pass,
                stash: None,
            },
            Chunks::Drop => ChunkResult {
                action: ChunkAction::Drop,
                stash: None,
            },
            // The count lives in the stash, not a guest global, to prove the host carries it
            // from call to call for this one request.
            Chunks::Upper if last => {
                // Written by hand, not with `json!`, to keep the field order tests match on.
                let name = serde_json::Value::from(c.name.as_str());
                let seen = chunk_count(stash.as_deref());
                let summary = format!("data: {{\"probe_last\":{name},\"chunks\":{seen}}}\n\n");
                ChunkResult {
                    action: ChunkAction::Replace(summary.into_bytes()),
                    stash: None,
                }
            }
            Chunks::Upper => {
                let seen = chunk_count(stash.as_deref()) + 1;
                ChunkResult {
                    action: ChunkAction::Replace(events.to_ascii_uppercase()),
                    stash: Some([CHUNK_STASH, seen.to_string().as_bytes()].concat()),
                }
            }
        }
    }

    fn handle(req: Request) -> Reply {
        let c = config();
        let workers: Vec<_> = workers::list()
            .into_iter()
            .map(|w| json!({ "url": w.url, "live": w.live, "in_flight": w.in_flight }))
            .collect();
        json_reply(
            200,
            &json!({
                "from": c.name,
                "body_len": req.body.map_or(0, |b| b.len()),
                "calls": CALLS.load(Ordering::Relaxed),
                "workers": workers,
            }),
        )
    }
}

export!(Probe);
