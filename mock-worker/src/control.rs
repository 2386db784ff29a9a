//! The RL loop's control calls, as an SGLang engine answers them: abort by rid, pause and
//! continue, and weight updates that change the reported version.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::{Response, StatusCode};
use serde_json::{Value, json};

use crate::body::{MockBody, json};
use crate::state::{State, lock};

const PATHS: &[&str] = &[
    "/abort_request",
    "/pause_generation",
    "/continue_generation",
    "/update_weights_from_disk",
    "/update_weights_from_distributed",
    "/update_weights_from_tensor",
    "/init_weights_update_group",
    "/release_memory_occupation",
    "/resume_memory_occupation",
];

pub(crate) fn handles(path: &str) -> bool {
    PATHS.contains(&path)
}

pub(crate) fn serve(state: &Arc<State>, path: &str, body: &[u8]) -> Response<MockBody> {
    let request: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        match serde_json::from_slice(body) {
            Ok(value) => value,
            Err(e) => return json(StatusCode::BAD_REQUEST, &json!({"error": e.to_string()})),
        }
    };
    match path {
        "/abort_request" => {
            let all = request.get("abort_all").and_then(Value::as_bool) == Some(true);
            let rid = request
                .get("rid")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let aborted = abort(state, |r| {
                all || (!rid.is_empty() && r.is_some_and(|r| r.starts_with(rid)))
            });
            json(
                StatusCode::OK,
                &json!({"success": true, "aborted": aborted}),
            )
        }
        "/pause_generation" => {
            state.paused.send_replace(true);
            json(
                StatusCode::OK,
                &json!({"message": "Generation paused", "status": "ok"}),
            )
        }
        "/continue_generation" => {
            state.paused.send_replace(false);
            json(
                StatusCode::OK,
                &json!({"message": "Generation continued", "status": "ok"}),
            )
        }
        "/update_weights_from_disk"
        | "/update_weights_from_distributed"
        | "/update_weights_from_tensor" => {
            // As SGLang: the reported version changes only when the update names one.
            let mut version = lock(&state.weight_version);
            if let Some(new) = request.get("weight_version").and_then(Value::as_str) {
                *version = new.to_owned();
            }
            json(
                StatusCode::OK,
                &json!({"success": true, "message": format!("weights updated to {version}"), "num_paused_requests": 0}),
            )
        }
        _ => json(StatusCode::OK, &json!({"success": true, "message": "ok"})),
    }
}

/// Aborts the running generations whose rid `matches`; returns how many.
fn abort(state: &State, matches: impl Fn(Option<&str>) -> bool) -> usize {
    let running = lock(&state.running);
    let mut count = 0;
    for generation in running.iter().filter(|g| matches(g.rid.as_deref())) {
        generation.flag.store(true, Ordering::Relaxed);
        generation.notify.notify_waiters();
        count += 1;
    }
    count
}
