//! The component: binds the request, response and stream conversions to the `middleware`
//! world of `wit/router.wit`.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::parse::{Parsed, Parser};
use crate::render::Renderer;
use crate::request::{self, BadRequest, Meta};
use crate::response::{self, Output};
use crate::stream::StreamState;

wit_bindgen::generate!({
    path: "../../wit",
    world: "middleware",
    additional_type_attributes: {
        "slime:router/types@0.1.0/request-patch": [#[derive(Default)]],
        "slime:router/types@0.1.0/response-patch": [#[derive(Default)]],
    },
});

use exports::slime::router::handler::Guest;
use slime::router::tokenizer;
use slime::router::types::{
    BodyEdit, ChunkAction, ChunkResult, FailureMode, Hooks, JsonEdit, Manifest, Reply, Request,
    RequestAction, RequestPatch, Response, ResponsePatch,
};

const CHAT: &str = "/v1/chat/completions";
const RETRIEVE: &str = "/retrieve_from_text";

thread_local! {
    /// Set by `init`; read-only afterwards, so the instances of the pool are interchangeable.
    static STATE: RefCell<Option<(Config, Renderer)>> = const { RefCell::new(None) };
}

fn with_state<R>(f: impl FnOnce(&Config, &Renderer) -> R) -> Option<R> {
    STATE.with(|cell| {
        cell.borrow()
            .as_ref()
            .map(|(config, renderer)| f(config, renderer))
    })
}

fn json_headers() -> Vec<(String, Vec<u8>)> {
    vec![("content-type".into(), b"application/json".to_vec())]
}

fn reply(status: u16, body: Vec<u8>) -> RequestAction {
    RequestAction::Respond(Reply {
        status,
        headers: json_headers(),
        body,
    })
}

fn bad(error: &BadRequest) -> RequestAction {
    reply(400, error.body())
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

struct ChatCompletions;

impl Guest for ChatCompletions {
    fn init(config: String) -> Result<Manifest, String> {
        let config = crate::config::parse(&config)?;
        let template = tokenizer::chat_template().map_err(|e| format!("chat-completions: {e}"))?;
        let renderer = Renderer::new(&template.source, template.bos_token, template.eos_token)
            .map_err(|e| format!("chat-completions: {e}"))?;
        STATE.with(|cell| cell.replace(Some((config, renderer))));
        Ok(Manifest {
            name: "chat-completions".into(),
            hooks: Hooks::REQUEST
                | Hooks::REQUEST_BODY
                | Hooks::RESPONSE
                | Hooks::RESPONSE_BODY
                | Hooks::RESPONSE_CHUNKS,
            paths: vec![CHAT.into(), RETRIEVE.into()],
            routes: Vec::new(),
            response_fields: [
                "text",
                "output_ids",
                "meta_info.prompt_tokens",
                "meta_info.completion_tokens",
                "meta_info.cached_tokens",
                "meta_info.finish_reason",
                "meta_info.weight_version",
            ]
            .map(String::from)
            .to_vec(),
            // Without this middleware a chat request would reach SGLang as chat and skip the
            // cache: better a clear 500 than an answer with untracked tokens.
            on_failure: FailureMode::FailClosed,
            stateful: false,
        })
    }

    fn on_request(req: Request) -> RequestAction {
        let body = req.body.unwrap_or_default();
        let path = req.path.split_once('?').map_or(&*req.path, |(p, _)| p);
        let action = with_state(|config, renderer| {
            match path {
            RETRIEVE => retrieve(&body, renderer),
            _ if req.method != "POST" => reply(
                405,
                br#"{"error":{"message":"use POST","type":"invalid_request_error","param":null,"code":null}}"#.to_vec(),
            ),
            _ => chat(&body, renderer, config),
        }
        });
        action.unwrap_or_else(|| {
            reply(
                503,
                br#"{"error":"chat-completions: not initialised"}"#.to_vec(),
            )
        })
    }

    fn on_response(req: Request, resp: Response, stash: Option<Vec<u8>>) -> ResponsePatch {
        let meta = stash.and_then(|s| serde_json::from_slice::<Meta>(&s).ok());
        let Some(meta) = meta.filter(|_| resp.status == 200) else {
            // SGLang's own errors (and requests not rewritten here) go back as they came.
            return ResponsePatch::default();
        };
        let Some(body) = resp.body else {
            // An event stream: its chunks come through on_response_chunk.
            let state = with_state(|config, _| StreamState::new(meta, config));
            return ResponsePatch {
                stash: state.and_then(|s| serde_json::to_vec(&s).ok()),
                ..ResponsePatch::default()
            };
        };
        let Ok(output) = serde_json::from_slice::<Output>(&body) else {
            return ResponsePatch::default();
        };
        let completion = with_state(|config, _| {
            let parser = Parser::new(config, meta.tools, meta.in_reasoning);
            let parsed = Parsed::of(parser, &output.text);
            response::completion(req.id, &meta, &output, parsed)
        });
        match completion {
            Some(completion) => ResponsePatch {
                set_headers: json_headers(),
                body: Some(BodyEdit::Replace(completion.to_string().into_bytes())),
                ..ResponsePatch::default()
            },
            None => ResponsePatch::default(),
        }
    }

    fn on_response_chunk(
        request_id: u64,
        events: Vec<u8>,
        last: bool,
        stash: Option<Vec<u8>>,
    ) -> ChunkResult {
        let state = stash.and_then(|s| serde_json::from_slice::<StreamState>(&s).ok());
        let Some(mut state) = state else {
            return ChunkResult {
                action: ChunkAction::Pass,
                stash: None,
            };
        };
        let out = state.on_events(request_id, &events, last);
        ChunkResult {
            action: ChunkAction::Replace(out),
            stash: serde_json::to_vec(&state).ok(),
        }
    }

    fn handle(_req: Request) -> Reply {
        Reply {
            status: 404,
            headers: json_headers(),
            body: br#"{"error":"chat-completions serves no routes"}"#.to_vec(),
        }
    }
}

/// `/v1/chat/completions`: rendered and sent on as `/generate` with `text`, which the cache
/// after this middleware turns into `input_ids`.
fn chat(body: &[u8], renderer: &Renderer, _config: &Config) -> RequestAction {
    match request::to_generate(body, renderer, unix_seconds()) {
        Ok(generate) => RequestAction::Continue(RequestPatch {
            set_path: Some("/generate".into()),
            set_headers: json_headers(),
            body: Some(BodyEdit::Replace(generate.body)),
            stash: serde_json::to_vec(&generate.meta).ok(),
            ..RequestPatch::default()
        }),
        Err(error) => bad(&error),
    }
}

/// `/retrieve_from_text` with `messages`: the rendered conversation replaces them as `text`.
fn retrieve(body: &[u8], renderer: &Renderer) -> RequestAction {
    match request::retrieval_text(body, renderer) {
        None => RequestAction::Continue(RequestPatch::default()),
        Some(Err(error)) => bad(&error),
        Some(Ok(text)) => RequestAction::Continue(RequestPatch {
            body: Some(BodyEdit::Json(vec![
                JsonEdit::Remove("messages".into()),
                JsonEdit::Remove("tools".into()),
                JsonEdit::Remove("chat_template_kwargs".into()),
                JsonEdit::Set(("text".into(), serde_json::Value::String(text).to_string())),
            ])),
            ..RequestPatch::default()
        }),
    }
}

export!(ChatCompletions);
