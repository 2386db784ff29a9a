//! Applying what a guest returns: request and response patches and its own replies. Bodies
//! are edited field by field on the host ([`crate::json`]) so a guest never sends a whole
//! body back: unchanged fields keep their exact bytes, token arrays arrive as u32 lists, and
//! the result is serialised once.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Response, StatusCode};
use serde_json::value::RawValue;

use super::bindings::{self, BodyEdit, JsonEdit, Reply, RequestPatch, ResponsePatch};
use super::instance::{Failure, FailureKind};
use crate::body::RouterBody;
use crate::json::Object;
use crate::policy::RouteHint;
use crate::proxy::Outbound;
use crate::worker::WorkerUrl;

/// Applies an `on-request` patch to the outgoing request; returns the stash it sets.
pub fn apply_request_patch(
    out: &mut Outbound,
    patch: RequestPatch,
) -> Result<Option<Vec<u8>>, Failure> {
    let invalid = |reason: String| Failure::new(FailureKind::InvalidPatch, reason);
    apply_headers(&mut out.headers, patch.set_headers, patch.remove_headers).map_err(invalid)?;
    if let Some(path) = patch.set_path {
        out.path = PathAndQuery::try_from(path.as_str())
            .ok()
            .filter(|p| p.as_str().starts_with('/'))
            .ok_or_else(|| invalid(format!("invalid path {path:?}")))?;
    }
    if let Some(edit) = patch.body {
        out.body = apply_body(&out.body, edit).map_err(|e| match e {
            EditError::NotAnObject(reason) => Failure::new(FailureKind::BadRequest, reason),
            EditError::Invalid(reason) => invalid(reason),
        })?;
    }
    if let Some(hint) = patch.route {
        out.hint = Some(route_hint(hint));
    }
    Ok(patch.stash)
}

/// Applies an `on-response` patch to the response head and, unless it streams, its buffered
/// body.
pub fn apply_response_patch(
    parts: &mut http::response::Parts,
    body: &mut Option<Bytes>,
    patch: ResponsePatch,
    streaming: bool,
) -> Result<(), Failure> {
    let invalid = |reason: String| Failure::new(FailureKind::InvalidPatch, reason);
    if let Some(status) = patch.set_status {
        parts.status = StatusCode::from_u16(status)
            .map_err(|_| invalid(format!("invalid status {status}")))?;
    }
    apply_headers(&mut parts.headers, patch.set_headers, patch.remove_headers).map_err(invalid)?;
    if let (Some(edit), false) = (patch.body, streaming) {
        let current = body.take().unwrap_or_default();
        let edited = apply_body(&current, edit).map_err(|e| match e {
            EditError::NotAnObject(reason) | EditError::Invalid(reason) => invalid(reason),
        })?;
        *body = Some(edited);
    }
    Ok(())
}

/// Hints name workers by url; canonical spelling makes `http://h:1/` match `http://h:1`.
fn route_hint(hint: bindings::RouteHint) -> RouteHint {
    let canonical = |url: String| {
        WorkerUrl::parse(&url)
            .map(|u| u.as_str().to_owned())
            .unwrap_or(url)
    };
    match hint {
        bindings::RouteHint::Prefer(url) => RouteHint::Prefer(canonical(url)),
        bindings::RouteHint::Among(urls) => {
            RouteHint::Among(urls.into_iter().map(canonical).collect())
        }
    }
}

/// The response a guest's own `reply` stands for.
pub fn reply_response(reply: Reply) -> Result<Response<RouterBody>, Failure> {
    let invalid = |reason: String| Failure::new(FailureKind::InvalidReply, reason);
    let status = StatusCode::from_u16(reply.status)
        .map_err(|_| invalid(format!("invalid status {}", reply.status)))?;
    let mut response = Response::new(RouterBody::full(Bytes::from(reply.body)));
    *response.status_mut() = status;
    apply_headers(response.headers_mut(), reply.headers, Vec::new()).map_err(invalid)?;
    response.headers_mut().remove(header::CONTENT_LENGTH);
    Ok(response)
}

/// Why a body edit could not be applied.
#[derive(Debug)]
enum EditError {
    /// The body is not a JSON object: the client's mistake (400).
    NotAnObject(String),
    /// The guest asked for something invalid: the middleware's fault.
    Invalid(String),
}

fn apply_headers(
    headers: &mut HeaderMap,
    set: Vec<(String, Vec<u8>)>,
    remove: Vec<String>,
) -> Result<(), String> {
    for name in remove {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("invalid header name {name:?}"))?;
        headers.remove(name);
    }
    for (name, value) in set {
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("invalid header name {name:?}"))?;
        let value = HeaderValue::from_bytes(&value)
            .map_err(|_| format!("invalid value for header {name}"))?;
        headers.insert(header, value);
    }
    Ok(())
}

fn apply_body(body: &[u8], edit: BodyEdit) -> Result<Bytes, EditError> {
    match edit {
        BodyEdit::Replace(bytes) => Ok(Bytes::from(bytes)),
        BodyEdit::Json(edits) => edit_json(body, edits),
    }
}

fn edit_json(body: &[u8], edits: Vec<JsonEdit>) -> Result<Bytes, EditError> {
    let mut object = Object::parse(body)
        .map_err(|e| EditError::NotAnObject(format!("request body must be a JSON object: {e}")))?;
    for edit in edits {
        match edit {
            JsonEdit::Remove(key) => {
                object.remove(&key);
            }
            JsonEdit::Set((key, text)) => {
                let value = RawValue::from_string(text).map_err(|e| {
                    EditError::Invalid(format!("json edit of {key:?} is not valid JSON: {e}"))
                })?;
                object.set_raw(key, value);
            }
            JsonEdit::SetIds((key, ids)) => object.set_ids(key, ids),
        }
    }
    Ok(Bytes::from(object.to_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edit(body: &str, edits: Vec<JsonEdit>) -> String {
        String::from_utf8(
            apply_body(body.as_bytes(), BodyEdit::Json(edits))
                .unwrap()
                .to_vec(),
        )
        .unwrap()
    }

    #[test]
    fn set_replaces_in_place_and_validates() {
        assert_eq!(
            edit(
                r#"{"a":1,"b":2}"#,
                vec![JsonEdit::Set(("a".into(), "true".into()))]
            ),
            r#"{"a":true,"b":2}"#
        );
        let bad = apply_body(
            b"{}",
            BodyEdit::Json(vec![JsonEdit::Set(("a".into(), "{".into()))]),
        );
        assert!(matches!(bad, Err(EditError::Invalid(_))));
        let not_object = apply_body(b"[1]", BodyEdit::Json(vec![]));
        assert!(matches!(not_object, Err(EditError::NotAnObject(_))));
    }
}
