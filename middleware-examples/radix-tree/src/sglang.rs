//! The parts of SGLang's `/generate` JSON the cache reads. Every other field is skipped
//! without being built, and strings without escapes are borrowed from the body.
//!
//! Each shape has two readers. [`request_text`] and [`output`] use the fast
//! [`crate::json::Reader`] on what slime and SGLang send and return `None` for anything else;
//! that then goes through the serde types ([`GenerateRequest`], [`GenerateOutput`]) as it always
//! did. Where the fast readers answer, they give what serde_json gives (see [`crate::json`]; the
//! tests compare them on real bodies and mutations of them).

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::json::{Reader, Str};

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
    pub weight_version: Option<Raw<'a>>,
    /// `{"type": "stop" | "length" | "abort", ...}` or null.
    #[serde(borrow, default)]
    pub finish_reason: Option<Raw<'a>>,
    /// Output tokens so far; differs from the ids of an event when the server streams deltas
    /// (`--incremental-streaming-output`).
    #[serde(default)]
    pub completion_tokens: Option<u64>,
}

/// The JSON text of a value, borrowed from the body.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Raw<'a>(pub &'a str);

impl<'de: 'a, 'a> Deserialize<'de> for Raw<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        <&'de RawValue>::deserialize(deserializer).map(|raw| Raw(raw.get()))
    }
}

impl MetaInfo<'_> {
    /// The weight version as text, or `None` when absent or null.
    pub fn weight_version(&self) -> Option<Cow<'_, str>> {
        let raw = self.weight_version?.0;
        // A valid JSON string without escapes (a raw value always is valid) is its content.
        let plain = raw.strip_prefix('"').and_then(|r| r.strip_suffix('"'));
        if let Some(content) = plain.filter(|c| !c.contains('\\')) {
            return Some(Cow::Borrowed(content));
        }
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
        let Some(Raw(raw)) = self.finish_reason else {
            return false;
        };
        // No string in it can be "abort" without those letters or an escape: nothing to parse
        // for the usual `{"type": "length", ...}`.
        if !raw.contains("abort") && !raw.contains('\\') {
            return false;
        }
        match serde_json::from_str::<FinishReason<'_>>(raw) {
            Ok(reason) => reason.kind.is_some_and(|k| k.0 == "abort"),
            Err(_) => serde_json::from_str::<Text<'_>>(raw).is_ok_and(|t| t.0 == "abort"),
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

/// `text` of a single-prompt `/generate` body, unescaped: borrowed from `body`, or written to
/// `scratch`. `None` for any other body, or one the fast reader leaves to serde_json: parse that
/// with [`GenerateRequest`].
///
/// Unlike serde_json this does not check that the text is UTF-8. The cache checks the part it
/// does not find cached; the rest equals cached text, which is UTF-8 up to a character boundary
/// (see `Cache::on_request`).
pub fn request_text<'a>(body: &'a [u8], scratch: &'a mut Vec<u8>) -> Option<&'a [u8]> {
    let mut reader = Reader::new(body);
    let mut text = None;
    reader.object(|key, r| {
        match key {
            b"text" if text.is_none() => text = Some(r.string(scratch)?),
            // A duplicate `text` (an error for serde_json), or `input_ids` (recorded rather than
            // rewritten, or a batch): serde_json decides.
            b"text" | b"input_ids" => return None,
            _ => r.skip_value()?,
        }
        Some(())
    })?;
    reader.end()?;
    match text? {
        Str::Borrowed(bytes) => Some(bytes),
        Str::Unescaped => Some(scratch),
    }
}

/// One `/generate` output object (a response body or an SSE event) read by the fast reader;
/// `None` for anything it leaves to serde_json: parse that with [`GenerateOutput`].
pub fn output(json: &[u8]) -> Option<GenerateOutput<'_>> {
    let mut reader = Reader::new(json);
    // Outer `Some` once seen: like serde's derive, a duplicate field is an error.
    let (mut text, mut output_ids, mut meta_info) = (None, None, None);
    reader.object(|key, r| {
        match key {
            b"text" if text.is_none() => text = Some(optional(r, read_text)?),
            b"output_ids" if output_ids.is_none() => {
                output_ids = Some(optional(r, Reader::u32_list)?);
            }
            b"meta_info" if meta_info.is_none() => meta_info = Some(optional(r, read_meta)?),
            b"text" | b"output_ids" | b"meta_info" => return None,
            _ => r.skip_value()?,
        }
        Some(())
    })?;
    reader.end()?;
    Some(GenerateOutput {
        text: text.flatten(),
        output_ids: output_ids.flatten(),
        meta_info: meta_info.flatten(),
    })
}

/// An `Option` field: `null` is `None`, as for serde.
fn optional<'a, T>(
    r: &mut Reader<'a>,
    read: impl FnOnce(&mut Reader<'a>) -> Option<T>,
) -> Option<Option<T>> {
    if r.null() {
        Some(None)
    } else {
        read(r).map(Some)
    }
}

fn read_text<'a>(r: &mut Reader<'a>) -> Option<Text<'a>> {
    let mut unescaped = Vec::new();
    Some(Text(match r.string(&mut unescaped)? {
        Str::Borrowed(bytes) => Cow::Borrowed(std::str::from_utf8(bytes).ok()?),
        Str::Unescaped => Cow::Owned(String::from_utf8(unescaped).ok()?),
    }))
}

fn read_raw<'a>(r: &mut Reader<'a>) -> Option<Raw<'a>> {
    std::str::from_utf8(r.raw_value()?).ok().map(Raw)
}

fn read_meta<'a>(r: &mut Reader<'a>) -> Option<MetaInfo<'a>> {
    let (mut logprobs, mut version, mut finish, mut completion) = (None, None, None, None);
    r.object(|key, r| {
        match key {
            b"output_token_logprobs" if logprobs.is_none() => {
                logprobs = Some(optional(r, read_logprobs)?);
            }
            b"weight_version" if version.is_none() => version = Some(optional(r, read_raw)?),
            b"finish_reason" if finish.is_none() => finish = Some(optional(r, read_raw)?),
            b"completion_tokens" if completion.is_none() => {
                completion = Some(optional(r, Reader::u64)?);
            }
            b"output_token_logprobs"
            | b"weight_version"
            | b"finish_reason"
            | b"completion_tokens" => return None,
            _ => r.skip_value()?,
        }
        Some(())
    })?;
    Some(MetaInfo {
        output_token_logprobs: logprobs.flatten(),
        weight_version: version.flatten(),
        finish_reason: finish.flatten(),
        completion_tokens: completion.flatten(),
    })
}

/// `[[logprob, token_id, ...], ...]` as [`TokenLogprobs`]' serde impl reads it.
fn read_logprobs(r: &mut Reader<'_>) -> Option<TokenLogprobs> {
    // An entry is ~16-24 bytes (`[-0.125,68,null],`): a guess that rarely needs to grow.
    let guess = (r.remaining() / 16).min(4096);
    let mut out = TokenLogprobs {
        ids: Vec::with_capacity(guess),
        logprobs: Vec::with_capacity(guess),
    };
    r.list(|r| {
        // The usual entry in one pass; any other (a null logprob, token text) the general way.
        let mark = r.mark();
        if let Some((logprob, id)) = usual_entry(r) {
            out.logprobs.push(logprob);
            out.ids.push(id);
            return Some(());
        }
        r.rewind(mark);
        let mut items = 0;
        r.list(|r| {
            match items {
                0 => out
                    .logprobs
                    .push(if r.null() { 0.0 } else { r.f64()? as f32 }),
                1 => out.ids.push(u32::try_from(r.u64()?).ok()?),
                // SGLang's token text (when asked for) or null: ignored.
                _ if r.null() => {}
                _ => r.skip_value()?,
            }
            items += 1;
            Some(())
        })?;
        // serde_json needs the logprob and the id.
        (items >= 2).then_some(())
    })?;
    Some(out)
}

/// `[logprob, token_id, null]`.
fn usual_entry(r: &mut Reader<'_>) -> Option<(f32, u32)> {
    r.expect(b'[')?;
    let logprob = r.f64()? as f32;
    r.expect(b',')?;
    let id = u32::try_from(r.u64()?).ok()?;
    r.expect(b',')?;
    if !r.null() {
        return None;
    }
    r.expect(b']')?;
    Some((logprob, id))
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

    use crate::json::tests::{Rng, mutate, python_float, string, value};

    /// Everything the cache reads from an output, floats as bits.
    fn summary(out: &GenerateOutput<'_>) -> String {
        let meta = out.meta_info.as_ref().map(|m| {
            let lp = m.output_token_logprobs.as_ref().map(|lp| {
                let bits: Vec<u32> = lp.logprobs.iter().map(|x| x.to_bits()).collect();
                (lp.ids.clone(), bits)
            });
            (lp, m.weight_version, m.finish_reason, m.completion_tokens)
        });
        format!(
            "{:?}",
            (out.text.as_ref().map(|t| &t.0), &out.output_ids, meta)
        )
    }

    /// A member of a random extra field, e.g. `"e2e_latency": 0.5`.
    fn extra(rng: &mut Rng) -> String {
        let mut v = String::new();
        value(rng, 1, &mut v);
        format!(
            "{}:{v}",
            rng.pick(&["\"id\"", "\"x\"", "\"cached_tokens\"", "\"e2e_latency\""])
        )
    }

    fn random_output(rng: &mut Rng) -> String {
        let n = rng.below(20);
        let ids: Vec<String> = (0..n).map(|_| rng.below(200_000).to_string()).collect();
        let entries: Vec<String> = ids
            .iter()
            .map(|id| {
                let lp = match rng.below(6) {
                    0 => "null".to_owned(),
                    1 => "0".to_owned(),
                    _ => python_float(rng),
                };
                let third = rng.pick(&["null", "null", "\"\\u0120the\"", "\" x\""]);
                match rng.below(8) {
                    0 => format!("[{lp}, {id}]"),
                    _ => format!("[{lp},{id},{third}]"),
                }
            })
            .collect();
        let mut meta = vec![
            format!("\"output_token_logprobs\":[{}]", entries.join(",")),
            format!("\"completion_tokens\":{n}"),
            format!(
                "\"weight_version\":{}",
                rng.pick(&["\"default\"", "12", "null", "\"v\\u00e9\""])
            ),
            format!(
                "\"finish_reason\":{}",
                rng.pick(&[
                    "{\"type\":\"length\",\"length\":16}",
                    "{\"type\":\"abort\"}",
                    "null",
                    "{\"type\":\"stop\",\"matched\":\"\\n\"}"
                ])
            ),
        ];
        for _ in 0..rng.below(4) {
            meta.push(extra(rng));
        }
        meta.retain(|_| rng.below(8) != 0);
        let mut fields = vec![
            format!("\"text\":{}", string(rng)),
            format!("\"output_ids\":[{}]", ids.join(", ")),
            format!("\"meta_info\": {{{}}}", meta.join(",")),
        ];
        if rng.below(3) == 0 {
            fields.push(extra(rng));
        }
        fields.retain(|_| rng.below(10) != 0);
        let turn = rng.below(3).min(fields.len());
        fields.rotate_left(turn);
        format!("{{{}}}", fields.join(", "))
    }

    #[test]
    fn fast_output_agrees_with_serde() {
        let mut rng = Rng(3);
        let (mut fast, mut valid) = (0, 0);
        for i in 0..40_000 {
            let json = random_output(&mut rng);
            let bytes = if i % 2 == 0 {
                json.into_bytes()
            } else {
                mutate(&mut rng, json.as_bytes())
            };
            let serde = serde_json::from_slice::<GenerateOutput<'_>>(&bytes);
            let context = String::from_utf8_lossy(&bytes);
            valid += usize::from(serde.is_ok());
            match output(&bytes) {
                Some(out) => {
                    let serde = serde.unwrap_or_else(|e| panic!("serde refused {context}: {e}"));
                    assert_eq!(summary(&out), summary(&serde), "{context}");
                    fast += 1;
                }
                // Only `\u` surrogates in strings it returns are left to serde_json.
                None => assert!(
                    i % 2 == 1 || serde.is_err() || context.to_lowercase().contains("\\ud"),
                    "fell back on {context}"
                ),
            }
        }
        assert!(fast * 2 > valid, "fast path took {fast} of {valid}");
    }

    #[test]
    fn fast_request_agrees_with_serde() {
        let mut rng = Rng(9);
        let mut scratch = Vec::new();
        let (mut fast, mut valid) = (0, 0);
        for i in 0..40_000 {
            let mut fields = vec![
                format!("\"text\":{}", string(&mut rng)),
                "\"sampling_params\":{\"max_new_tokens\":16,\"stop\":[\"\\n\"]}".to_owned(),
                format!("\"return_logprob\":{}", rng.pick(&["true", "false"])),
            ];
            for _ in 0..rng.below(3) {
                fields.push(extra(&mut rng));
            }
            if rng.below(10) == 0 {
                fields.push("\"input_ids\":[1,2]".to_owned());
            }
            let turn = rng.below(fields.len());
            fields.rotate_left(turn);
            let body = format!("{{{}}}", fields.join(","));
            let bytes = if i % 2 == 0 {
                body.into_bytes()
            } else {
                mutate(&mut rng, body.as_bytes())
            };
            let serde = serde_json::from_slice::<GenerateRequest<'_>>(&bytes);
            let context = String::from_utf8_lossy(&bytes);
            let rewritable = serde
                .as_ref()
                .is_ok_and(|r| r.input_ids.is_none() && r.text.is_some());
            valid += usize::from(rewritable);
            let Some(text) = request_text(&bytes, &mut scratch) else {
                // Only `\u` surrogates in the text are left to serde_json.
                assert!(
                    i % 2 == 1 || !rewritable || context.to_lowercase().contains("\\ud"),
                    "fell back on {context}"
                );
                continue;
            };
            fast += 1;
            match std::str::from_utf8(text) {
                Ok(text) => {
                    let serde = serde.unwrap_or_else(|e| panic!("serde refused {context}: {e}"));
                    assert!(serde.input_ids.is_none(), "{context}");
                    assert_eq!(serde.text.map(|t| t.0).as_deref(), Some(text), "{context}");
                }
                // The caller checks UTF-8, which serde_json checks itself.
                Err(_) => assert!(serde.is_err(), "{context}"),
            }
        }
        assert!(fast * 2 > valid, "fast path took {fast} of {valid}");
        for pass in [
            &br#"{"text": ["a", "b"]}"#[..],
            br#"{"text": "a", "input_ids": [1]}"#,
            br#"{"text": "a", "text": "b"}"#,
            br#"{"text": null}"#,
            br#"{"sampling_params": {}}"#,
            b"[1, 2]",
            br#"{"text": "a"} x"#,
        ] {
            assert_eq!(request_text(pass, &mut scratch), None, "{pass:?}");
        }
        assert_eq!(
            request_text(br#"{"text":"a\nb\u00e9"}"#, &mut scratch),
            Some("a\nbé".as_bytes())
        );
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
