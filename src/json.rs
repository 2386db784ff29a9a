//! A JSON object's top-level fields, edited without touching the bytes of the others: the
//! middleware's body edits, the bootstrap fields of prefill/decode pairs and the router's own
//! field removals all change a few fields of a body that may be megabytes long. Untouched
//! values keep their exact text; the object is serialised once.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// A JSON object body as its fields, in order, values left as raw text until changed.
#[derive(Clone)]
pub struct Object<'a> {
    fields: Vec<(Cow<'a, str>, Value<'a>)>,
}

/// A field's value: as it came, or as set.
#[derive(Clone)]
enum Value<'a> {
    Raw(&'a RawValue),
    Text(Box<RawValue>),
    /// JSON text the host wrote itself, so known valid.
    Json(Vec<u8>),
    Ids(Vec<u32>),
}

impl<'a> Object<'a> {
    /// The fields of `body`, which must be one JSON object.
    pub fn parse(body: &'a [u8]) -> Result<Self, serde_json::Error> {
        let Fields(fields) = serde_json::from_slice(body)?;
        Ok(Self { fields })
    }

    /// The raw text of a field as it came in (not one set since).
    pub fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.fields.iter().find_map(|(k, v)| match v {
            Value::Raw(raw) if k == key => Some(*raw),
            _ => None,
        })
    }

    /// Removes the field; true if it was there.
    pub fn remove(&mut self, key: &str) -> bool {
        let before = self.fields.len();
        self.fields.retain(|(k, _)| k != key);
        self.fields.len() != before
    }

    /// Sets a field to JSON text checked by the caller (`RawValue` is valid by construction).
    pub fn set_raw(&mut self, key: impl Into<String>, value: Box<RawValue>) {
        self.set(key.into(), Value::Text(value));
    }

    /// Sets a field to JSON text the router wrote itself (so known valid).
    pub fn set_json(&mut self, key: impl Into<String>, json: Vec<u8>) {
        self.set(key.into(), Value::Json(json));
    }

    /// Sets a field to an array of unsigned integers.
    pub fn set_ids(&mut self, key: impl Into<String>, ids: Vec<u32>) {
        self.set(key.into(), Value::Ids(ids));
    }

    fn set(&mut self, key: String, value: Value<'a>) {
        match self.fields.iter_mut().find(|(k, _)| *k == key) {
            Some(field) => field.1 = value,
            None => self.fields.push((Cow::Owned(key), value)),
        }
    }

    /// The object's JSON text.
    pub fn to_bytes(&self) -> Vec<u8> {
        serialize(&self.fields)
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

    #[test]
    fn untouched_fields_keep_their_bytes() {
        let body = br#"{"text":"hi \u00e9","p":1e-7,"s":{"t":0.10},"a\"b":[1, 2]}"#;
        let mut object = Object::parse(body).unwrap();
        assert!(object.remove("text"));
        assert!(!object.remove("text"));
        object.set_ids("input_ids", vec![1, 22, 333]);
        assert_eq!(object.get("p").map(|v| v.get()), Some("1e-7"));
        assert_eq!(
            String::from_utf8(object.to_bytes()).unwrap(),
            r#"{"p":1e-7,"s":{"t":0.10},"a\"b":[1, 2],"input_ids":[1,22,333]}"#
        );
        assert!(Object::parse(b"[1]").is_err());
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
}
