//! `POST /finish_session {"key": K}`: forgets a session key's pinned workers, so a rollout
//! that is done with a trajectory frees its pin before it expires. `session_id` and
//! `routing_key` are accepted for the key too, and `?key=` in the query.

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use super::input::string_field;
use crate::app::App;
use crate::body::RouterBody;
use crate::error::{RouterError, json_response};

const KEY_FIELDS: &[&str] = &["key", "session_id", "routing_key"];

/// Drops the key's pins; `finished` says whether it had any.
pub async fn finish(
    app: &App,
    req: Request<Incoming>,
) -> Result<Response<RouterBody>, RouterError> {
    let key = string_field(req, KEY_FIELDS).await?.ok_or_else(|| {
        RouterError::BadRequest("a session key is required: {\"key\": \"...\"}".to_owned())
    })?;
    let finished = app.pool().sessions().is_some_and(|s| s.finish(&key));
    Ok(json_response(
        StatusCode::OK,
        &json!({"status": "success", "key": key, "finished": finished}),
    ))
}
