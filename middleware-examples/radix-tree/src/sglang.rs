//! The parts of SGLang's `/generate` JSON the cache reads. Every other field is skipped
//! without being built, and strings without escapes are borrowed from the body.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// A JSON string, borrowed from the body when it has no escapes.
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub struct Text<'a>(#[serde(borrow)] pub Cow<'a, str>);

/// A single-prompt `/generate` request. Batch bodies (`text` or `input_ids` holding lists)
/// fail to parse and pass through untouched.
#[derive(Debug, Deserialize)]
pub struct GenerateRequest<'a> {
    #[serde(borrow, default)]
    pub text: Option<Text<'a>>,
    #[serde(default)]
    pub input_ids: Option<Vec<u32>>,
}

/// One `/generate` output (a response body, one element of a batch, or one SSE event).
#[derive(Debug, Deserialize)]
pub struct GenerateOutput<'a> {
    #[serde(borrow, default)]
    pub text: Option<Text<'a>>,
    #[serde(default)]
    pub output_ids: Option<Vec<u32>>,
    #[serde(borrow, default)]
    pub meta_info: Option<MetaInfo<'a>>,
}

#[derive(Debug, Deserialize)]
pub struct MetaInfo<'a> {
    #[serde(default)]
    pub output_token_logprobs: Option<TokenLogprobs>,
    /// A string in SGLang; a number is taken as its decimal text.
    #[serde(borrow, default)]
    pub weight_version: Option<&'a RawValue>,
    /// `{"type": "stop" | "length" | "abort", ...}` or null.
    #[serde(borrow, default)]
    pub finish_reason: Option<&'a RawValue>,
    /// Output tokens so far; differs from the ids of an event when the server streams deltas
    /// (`--incremental-streaming-output`).
    #[serde(default)]
    pub completion_tokens: Option<u64>,
}

impl MetaInfo<'_> {
    /// The weight version as text, or `None` when absent or null.
    pub fn weight_version(&self) -> Option<Cow<'_, str>> {
        let raw = self.weight_version?.get();
        if raw.starts_with('"') {
            serde_json::from_str::<Text<'_>>(raw).ok().map(|t| t.0)
        } else if raw == "null" {
            None
        } else {
            Some(Cow::Borrowed(raw))
        }
    }

    /// True when the request was aborted: its output is not a trajectory to keep.
    pub fn aborted(&self) -> bool {
        #[derive(Deserialize)]
        struct FinishReason<'a> {
            #[serde(rename = "type", borrow)]
            kind: Option<Text<'a>>,
        }
        let Some(raw) = self.finish_reason else {
            return false;
        };
        match serde_json::from_str::<FinishReason<'_>>(raw.get()) {
            Ok(reason) => reason.kind.is_some_and(|k| k.0 == "abort"),
            Err(_) => serde_json::from_str::<Text<'_>>(raw.get()).is_ok_and(|t| t.0 == "abort"),
        }
    }
}

/// `output_token_logprobs` (`[[logprob, token_id, text|null], ...]`) read straight into two
/// arrays, with no value per entry.
#[derive(Debug, Default)]
pub struct TokenLogprobs {
    pub ids: Vec<u32>,
    pub logprobs: Vec<f32>,
}

impl<'de> Deserialize<'de> for TokenLogprobs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct List;
        impl<'de> Visitor<'de> for List {
            type Value = TokenLogprobs;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of [logprob, token_id, ...]")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TokenLogprobs, A::Error> {
                let n = seq.size_hint().unwrap_or(0);
                let mut out = TokenLogprobs {
                    ids: Vec::with_capacity(n),
                    logprobs: Vec::with_capacity(n),
                };
                while let Some(Entry(logprob, id)) = seq.next_element()? {
                    out.ids.push(id);
                    out.logprobs.push(logprob);
                }
                Ok(out)
            }
        }
        deserializer.deserialize_seq(List)
    }
}

/// One `[logprob, token_id, ...]` entry; a null logprob reads as 0.0, extra items are skipped.
struct Entry(f32, u32);

impl<'de> Deserialize<'de> for Entry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Items;
        impl<'de> Visitor<'de> for Items {
            type Value = Entry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("[logprob, token_id, ...]")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Entry, A::Error> {
                use serde::de::Error;
                let logprob: Option<f64> = seq
                    .next_element()?
                    .ok_or_else(|| A::Error::invalid_length(0, &self))?;
                let id: u32 = seq
                    .next_element()?
                    .ok_or_else(|| A::Error::invalid_length(1, &self))?;
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Entry(logprob.unwrap_or(0.0) as f32, id))
            }
        }
        deserializer.deserialize_seq(Items)
    }
}

/// The payload of the last `data:` line in `events` that is not `[DONE]`.
pub fn last_data_event(events: &[u8]) -> Option<&[u8]> {
    events
        .split(|&b| b == b'\n')
        .filter_map(|line| line.strip_prefix(b"data:"))
        .map(|data| {
            let data = data.strip_prefix(b" ").unwrap_or(data);
            data.strip_suffix(b"\r").unwrap_or(data)
        })
        .rfind(|data| !data.is_empty() && *data != b"[DONE]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_borrows_text() {
        let body = br#"{"text":"hello","sampling_params":{"max_new_tokens":8,"stop":["x"]}}"#;
        let req: GenerateRequest = serde_json::from_slice(body).expect("parse");
        assert!(matches!(req.text, Some(Text(Cow::Borrowed("hello")))));
        assert!(req.input_ids.is_none());
        let escaped: GenerateRequest =
            serde_json::from_slice(br#"{"text":"a\nb"}"#).expect("parse");
        assert_eq!(escaped.text.map(|t| t.0).as_deref(), Some("a\nb"));
        assert!(serde_json::from_slice::<GenerateRequest>(br#"{"text":["a","b"]}"#).is_err());
        assert!(serde_json::from_slice::<GenerateRequest>(br#"{"input_ids":[[1],[2]]}"#).is_err());
        assert!(serde_json::from_slice::<GenerateRequest>(b"[1]").is_err());
    }

    #[test]
    fn output_reads_logprobs_version_and_finish() {
        let body = br#"{"text":"hi","output_ids":[5,6],"meta_info":{"id":"x",
            "output_token_logprobs":[[-0.5,5,"h"],[null,6,null]],
            "finish_reason":{"type":"abort","message":"x"},"weight_version":12,
            "routed_experts":"AAAA","completion_tokens":2}}"#;
        let out: GenerateOutput = serde_json::from_slice(body).expect("parse");
        let meta = out.meta_info.expect("meta");
        let lp = meta.output_token_logprobs.as_ref().expect("logprobs");
        assert_eq!(lp.ids, [5, 6]);
        assert_eq!(lp.logprobs, [-0.5, 0.0]);
        assert!(meta.aborted());
        assert_eq!(meta.weight_version().as_deref(), Some("12"));
        assert_eq!(meta.completion_tokens, Some(2));
        let body = br#"{"text":"hi","meta_info":{"finish_reason":null,"weight_version":"v3"}}"#;
        let out: GenerateOutput = serde_json::from_slice(body).expect("parse");
        let meta = out.meta_info.expect("meta");
        assert!(!meta.aborted());
        assert_eq!(meta.weight_version().as_deref(), Some("v3"));
    }

    #[test]
    fn sse_last_event() {
        let events = b"data: {\"a\":1}\n\ndata: {\"a\":2}\r\n\r\ndata: [DONE]\n\n";
        assert_eq!(last_data_event(events), Some(&b"{\"a\":2}"[..]));
        assert_eq!(last_data_event(b"data: [DONE]\n\n"), None);
        assert_eq!(last_data_event(b""), None);
        assert_eq!(last_data_event(b": comment\n\n"), None);
    }
}
