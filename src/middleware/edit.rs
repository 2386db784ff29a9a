//! Applying a guest's patches. Bodies are edited field by field on the host so a guest never
//! sends a whole body back: unchanged fields keep their exact bytes, token arrays arrive as
//! u32 lists, and the result is serialised once.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::bindings::{BodyEdit, JsonEdit};

/// Why a body edit could not be applied.
#[derive(Debug)]
pub enum EditError {
    /// The body is not a JSON object: the client's mistake (400).
    NotAnObject(String),
    /// The guest asked for something invalid: the middleware's fault.
    Invalid(String),
}

pub fn apply_headers(
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

pub fn apply_body(body: &[u8], edit: BodyEdit) -> Result<Bytes, EditError> {
    match edit {
        BodyEdit::Replace(bytes) => Ok(Bytes::from(bytes)),
        BodyEdit::Json(edits) => edit_json(body, edits),
    }
}

enum Value<'a> {
    Raw(&'a RawValue),
    Text(Box<RawValue>),
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
            Value::Ids(ids) => {
                let _ = serde_json::to_writer(&mut out, ids);
            }
        }
    }
    out.push(b'}');
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
