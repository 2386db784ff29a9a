//! Applying what a guest returns: request and response patches, its own replies, and the
//! projection of large bodies to the fields it reads. Bodies are edited field by field on the
//! host so a guest never sends a whole body back: unchanged fields keep their exact bytes,
//! token arrays arrive as u32 lists, and the result is serialised once.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Response, StatusCode};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::bindings::{self, BodyEdit, JsonEdit, Reply, RequestPatch, ResponsePatch};
use super::instance::{Failure, FailureKind};
use crate::body::RouterBody;
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

enum Value<'a> {
    Raw(&'a RawValue),
    Text(Box<RawValue>),
    /// JSON text the host wrote itself, so known valid.
    Json(Vec<u8>),
    Ids(Vec<u32>),
}

fn edit_json(body: &[u8], edits: Vec<JsonEdit>) -> Result<Bytes, EditError> {
    let Fields(mut fields) = serde_json::from_slice(body)
        .map_err(|e| EditError::NotAnObject(format!("request body must be a JSON object: {e}")))?;
    for edit in edits {
        match edit {
            JsonEdit::Remove(key) => fields.retain(|(k, _)| *k != key),
            JsonEdit::Set((key, text)) => {
                let value = RawValue::from_string(text).map_err(|e| {
                    EditError::Invalid(format!("json edit of {key:?} is not valid JSON: {e}"))
                })?;
                set(&mut fields, key, Value::Text(value));
            }
            JsonEdit::SetIds((key, ids)) => set(&mut fields, key, Value::Ids(ids)),
        }
    }
    Ok(Bytes::from(serialize(&fields)))
}

fn set<'a>(fields: &mut Vec<(Cow<'a, str>, Value<'a>)>, key: String, value: Value<'a>) {
    match fields.iter_mut().find(|(k, _)| *k == key) {
        Some(field) => field.1 = value,
        None => fields.push((Cow::Owned(key), value)),
    }
}

fn serialize(fields: &[(Cow<'_, str>, Value<'_>)]) -> Vec<u8> {
    let capacity = fields
        .iter()
        .map(|(k, v)| {
            k.len()
                + 4
                + match v {
                    Value::Raw(raw) => raw.get().len(),
                    Value::Text(raw) => raw.get().len(),
                    Value::Json(json) => json.len(),
                    Value::Ids(ids) => ids.len() * 7 + 2,
                }
        })
        .sum::<usize>()
        + 2;
    let mut out = Vec::with_capacity(capacity);
    out.push(b'{');
    for (i, (key, value)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        // Writing a str or a &[u32] into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, key.as_ref());
        out.push(b':');
        match value {
            Value::Raw(raw) => out.extend_from_slice(raw.get().as_bytes()),
            Value::Text(raw) => out.extend_from_slice(raw.get().as_bytes()),
            Value::Json(json) => out.extend_from_slice(json),
            Value::Ids(ids) => {
                let _ = serde_json::to_writer(&mut out, ids);
            }
        }
    }
    out.push(b'}');
    out
}

/// Bodies up to this size go to a guest whole even when it names its `response-fields`:
/// picking fields out of a short answer (a few µs of parsing) costs more than copying it.
pub const PROJECT_ABOVE: usize = 16 * 1024;

/// The fields of a JSON object named in `fields` (`name`, or `parent.child` one level down),
/// in body order, or of each object of a JSON list; `None` when `json` is neither. Lets a
/// middleware that reads a few fields of a /generate answer skip megabytes of base64
/// `routed_experts` it never looks at.
pub fn project(json: &[u8], fields: &[String]) -> Option<Vec<u8>> {
    match json.trim_ascii_start().first() {
        Some(b'{') => project_object(serde_json::from_slice(json).ok()?, fields),
        Some(b'[') => {
            let items: Vec<&RawValue> = serde_json::from_slice(json).ok()?;
            let mut out = vec![b'['];
            for (i, item) in items.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                match serde_json::from_str(item.get())
                    .ok()
                    .and_then(|f| project_object(f, fields))
                {
                    Some(projected) => out.extend_from_slice(&projected),
                    None => out.extend_from_slice(item.get().as_bytes()),
                }
            }
            out.push(b']');
            Some(out)
        }
        _ => None,
    }
}

fn project_object(Fields(top): Fields<'_>, fields: &[String]) -> Option<Vec<u8>> {
    let mut kept = Vec::new();
    for (key, value) in top {
        let Value::Raw(raw) = value else { continue };
        if fields.iter().any(|f| *f == key) {
            kept.push((key, value));
            continue;
        }
        let children: Vec<&str> = fields
            .iter()
            .filter_map(|f| f.strip_prefix(key.as_ref())?.strip_prefix('.'))
            .collect();
        if children.is_empty() {
            continue;
        }
        // A named parent that is not an object has no such children: leave it out.
        if let Ok(Fields(inner)) = serde_json::from_str::<Fields<'_>>(raw.get()) {
            let inner: Vec<_> = inner
                .into_iter()
                .filter(|(k, _)| children.contains(&k.as_ref()))
                .collect();
            kept.push((key, Value::Json(serialize(&inner))));
        }
    }
    Some(serialize(&kept))
}

/// [`project`] applied to the JSON of every `data:` line of server-sent events; other lines
/// (and `data: [DONE]`) pass unchanged.
pub fn project_events(events: &[u8], fields: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(events.len().min(64 * 1024));
    for line in events.split_inclusive(|&b| b == b'\n') {
        let projected = line
            .strip_prefix(b"data:")
            .map(|rest| rest.trim_ascii())
            .filter(|json| json.first() == Some(&b'{'))
            .and_then(|json| project(json, fields));
        match projected {
            Some(json) => {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(&json);
                out.push(b'\n');
            }
            None => out.extend_from_slice(line),
        }
    }
    out
}

/// A JSON object's fields in order, values left as raw text.
struct Fields<'a>(Vec<(Cow<'a, str>, Value<'a>)>);

impl<'de> de::Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(FieldsVisitor)
    }
}

struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Fields<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
        while let Some(Key(key)) = map.next_key()? {
            let value: &'de RawValue = map.next_value()?;
            fields.push((key, Value::Raw(value)));
        }
        Ok(Fields(fields))
    }
}

/// A key borrowed from the body unless it holds escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
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
    fn untouched_fields_keep_their_bytes() {
        let body = r#"{"text":"hi \u00e9","p":1e-7,"s":{"t":0.10},"a\"b":[1, 2]}"#;
        let out = edit(
            body,
            vec![
                JsonEdit::Remove("text".into()),
                JsonEdit::SetIds(("input_ids".into(), vec![1, 22, 333])),
            ],
        );
        assert_eq!(
            out,
            r#"{"p":1e-7,"s":{"t":0.10},"a\"b":[1, 2],"input_ids":[1,22,333]}"#
        );
    }

    #[test]
    fn projection_keeps_only_named_fields() {
        let fields = vec![
            "text".to_owned(),
            "meta_info.weight_version".to_owned(),
            "meta_info.x".to_owned(),
        ];
        let body = br#"{"text":"hi","output_ids":[1,2],"meta_info":{"routed_experts":"QUFB","weight_version":"7","x":1e-7}}"#;
        let out = String::from_utf8(project(body, &fields).unwrap()).unwrap();
        assert_eq!(
            out,
            r#"{"text":"hi","meta_info":{"weight_version":"7","x":1e-7}}"#
        );
        let list = br#"[{"text":"a","big":"zz"},{"text":"b"}]"#;
        assert_eq!(
            String::from_utf8(project(list, &fields).unwrap()).unwrap(),
            r#"[{"text":"a"},{"text":"b"}]"#
        );
        assert!(project(b"7", &fields).is_none());
        let events = b"data: {\"text\":\"a\",\"big\":\"zzz\"}\n\ndata: [DONE]\n\n";
        let out = String::from_utf8(project_events(events, &fields)).unwrap();
        assert_eq!(out, "data: {\"text\":\"a\"}\n\ndata: [DONE]\n\n");
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
