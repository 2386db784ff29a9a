//! Reading what an admin call carries: a worker url from the query or a JSON body, and a
//! worker named in the path.

use http::Request;
use hyper::body::Incoming;
use serde_json::{Map, Value};

use crate::error::RouterError;
use crate::request::read_request;

/// Admin bodies are a url or two; anything bigger is a mistake.
const ADMIN_BODY_LIMIT: usize = 1 << 20;
/// Admin bodies are a few bytes of JSON; one that takes longer than this is a stalled client.
const ADMIN_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

const URL_REQUIRED: &str = "worker_url is required (use query ?url=... or JSON body)";

/// The worker url from `?url=`/`?worker_url=`, else a JSON body `{"url"}`/`{"worker_url"}`.
pub async fn url_from_request(req: Request<Incoming>) -> Result<String, RouterError> {
    string_field(req, &["url", "worker_url"])
        .await?
        .ok_or_else(|| RouterError::BadRequest(URL_REQUIRED.to_owned()))
}

/// The first non-empty string under one of `names`: in the query, else in a JSON body (in
/// the order of `names`).
pub async fn string_field(
    req: Request<Incoming>,
    names: &[&str],
) -> Result<Option<String>, RouterError> {
    if let Some(query) = req.uri().query() {
        let found = form_urlencoded::parse(query.as_bytes())
            .find(|(k, v)| names.contains(&k.as_ref()) && !v.is_empty())
            .map(|(_, v)| v.into_owned());
        if found.is_some() {
            return Ok(found);
        }
    }
    let body = json_body(req).await?;
    Ok(names
        .iter()
        .find_map(|k| {
            body.get(*k)
                .and_then(Value::as_str)
                .filter(|v| !v.is_empty())
        })
        .map(str::to_owned))
}

/// A JSON object body; an empty body is an empty object.
pub async fn json_body(req: Request<Incoming>) -> Result<Map<String, Value>, RouterError> {
    let (parts, body) = req.into_parts();
    let bytes = read_request(&parts.headers, body, ADMIN_BODY_LIMIT, ADMIN_BODY_TIMEOUT).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(RouterError::BadRequest(
            "JSON body must be an object".to_owned(),
        )),
        Err(e) => Err(RouterError::BadRequest(format!("malformed JSON body: {e}"))),
    }
}

/// The percent-decoded path segment after `/workers/`: an id, or a url-encoded worker url.
pub fn worker_in_path(path: &str) -> Result<String, RouterError> {
    let encoded = path.trim_start_matches("/workers/");
    let decoded = percent_encoding::percent_decode_str(encoded)
        .decode_utf8()
        .map_err(|_| RouterError::BadRequest("worker in the path is not UTF-8".to_owned()))?;
    Ok(decoded.into_owned())
}
