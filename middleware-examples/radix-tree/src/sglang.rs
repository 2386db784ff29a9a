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

/// Whether the fast reader ([`crate::json`]) reads bodies before serde_json. The `serde-only`
/// feature turns it off, to measure what it saves (bench/radix_ab.sh): about 40% of the
/// per-request cost with a 32k-token trajectory, nothing measurable at 1k.
pub const FAST_READER: bool = !cfg!(feature = "serde-only");

/// A single-prompt `/generate` request. Batch bodies (`text` or `input_ids` holding lists)
/// fail to parse and pass through untouched.
#[derive(Debug, Deserialize)]
pub struct GenerateRequest<'a> {
    #[serde(borrow, default)]
    pub text: Option<Text<'a>>,
    #[serde(default)]
    pub input_ids: Option<Vec<u32>>,
    /// Media fields: only whether they are there (not null) matters, see [`Prompt::Media`].
    #[serde(default)]
    pub image_data: Option<IgnoredAny>,
    #[serde(default)]
    pub video_data: Option<IgnoredAny>,
    #[serde(default)]
    pub audio_data: Option<IgnoredAny>,
}

impl GenerateRequest<'_> {
    /// True when the request carries image, video or audio data (a null field carries none).
    pub fn has_media(&self) -> bool {
        self.image_data.is_some() || self.video_data.is_some() || self.audio_data.is_some()
    }
}

/// The prompt of a single-prompt `/generate` body, as far as the cache is concerned.
#[derive(Debug, PartialEq)]
pub enum Prompt<'a> {
    /// `text`, unescaped, not checked as UTF-8 (see [`request_text`]).
    Text(&'a [u8]),
    /// Image, video or audio data: SGLang expands the placeholders in `text` into tokens the
    /// text does not show, so the request must reach the worker as it is and the text is no
    /// trajectory to cache.
    Media,
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

/// The prompt of a single-prompt `/generate` body: its `text`, unescaped (borrowed from `body`,
/// or written to `scratch`), or [`Prompt::Media`]. `None` for any other body, or one the fast
/// reader leaves to serde_json: parse that with [`GenerateRequest`].
///
/// Unlike serde_json this does not check that the text is UTF-8. The cache checks the part it
/// does not find cached; the rest equals cached text, which is UTF-8 up to a character boundary
/// (see `Cache::on_request`).
pub fn request_text<'a>(body: &'a [u8], scratch: &'a mut Vec<u8>) -> Option<Prompt<'a>> {
    let mut reader = Reader::new(body);
    let (mut text, mut media, mut media_seen) = (None, false, 0u8);
    reader.object(|key, r| {
        match key {
            b"text" if text.is_none() => text = Some(r.string(scratch)?),
            // A duplicate `text` (an error for serde_json), or `input_ids` (recorded rather than
            // rewritten, or a batch): serde_json decides.
            b"text" | b"input_ids" => return None,
            b"image_data" | b"video_data" | b"audio_data" => {
                let bit = match key[0] {
                    b'i' => 1,
                    b'v' => 2,
                    _ => 4,
                };
                // A duplicate is an error for serde_json.
                if media_seen & bit != 0 {
                    return None;
                }
                media_seen |= bit;
                if !r.null() {
                    r.skip_value()?;
                    media = true;
                }
            }
            _ => r.skip_value()?,
        }
        Some(())
    })?;
    reader.end()?;
    let text = match text? {
        Str::Borrowed(bytes) => bytes,
        Str::Unescaped => scratch,
    };
    if media {
        // serde_json refuses text that is not UTF-8, so such a body is not counted as media.
        return std::str::from_utf8(text).ok().map(|_| Prompt::Media);
    }
    Some(Prompt::Text(text))
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

/// One output object, by the fast reader or, when it declines, serde_json; `None` if neither
/// reads it.
pub fn parse_output(json: &[u8]) -> Option<GenerateOutput<'_>> {
    match output(json).filter(|_| FAST_READER) {
        Some(out) => Some(out),
        None => serde_json::from_slice(json).ok(),
    }
}

/// The payloads of the `data:` lines in `events` that are not empty or `[DONE]`, in order. A
/// payload never holds a newline.
pub fn data_events(events: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    events
        .split(|&b| b == b'\n')
        .filter_map(|line| line.strip_prefix(b"data:"))
        .map(|data| {
            let data = data.strip_prefix(b" ").unwrap_or(data);
            data.strip_suffix(b"\r").unwrap_or(data)
        })
        .filter(|data| !data.is_empty() && *data != b"[DONE]")
}

/// The payload of the last `data:` line in `events` that is not `[DONE]`.
pub fn last_data_event(events: &[u8]) -> Option<&[u8]> {
    data_events(events).next_back()
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
    fn output_reads_logprobs_version_and_finish_reason() {
        let body = br#"{"text":"hi","output_ids":[5,6],"meta_info":{"id":"x",
            "output_token_logprobs":[[-0.5,5,"h"],[null,6,null]],
            "finish_reason":{"type":"abort","message":"x"},"weight_version":12,
            "routed_experts":"AAAA","completion_tokens":2}}"#;
        let out: GenerateOutput = serde_json::from_slice(body).expect("parse");
        let meta = out.meta_info.expect("meta");
        let lp = meta.output_token_logprobs.as_ref().expect("logprobs");
        assert_eq!(lp.ids, [5, 6]);
        assert_eq!(lp.logprobs, [-0.5, 0.0]);
        assert_eq!(
            meta.finish_reason,
            Some(Raw(r#"{"type":"abort","message":"x"}"#))
        );
        assert_eq!(meta.weight_version().as_deref(), Some("12"));
        assert_eq!(meta.completion_tokens, Some(2));
        let body = br#"{"text":"hi","meta_info":{"finish_reason":null,"weight_version":"v3"}}"#;
        let out: GenerateOutput = serde_json::from_slice(body).expect("parse");
        let meta = out.meta_info.expect("meta");
        assert_eq!(meta.finish_reason, None);
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
            if rng.below(4) == 0 {
                let field = rng.pick(&["image_data", "video_data", "audio_data"]);
                let value = rng.pick(&["null", "[\"data:image/png;base64,AA==\"]", "\"x\"", "[]"]);
                fields.push(format!("\"{field}\":{value}"));
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
            let Some(prompt) = request_text(&bytes, &mut scratch) else {
                // Only `\u` surrogates in the text are left to serde_json.
                assert!(
                    i % 2 == 1 || !rewritable || context.to_lowercase().contains("\\ud"),
                    "fell back on {context}"
                );
                continue;
            };
            fast += 1;
            let Prompt::Text(text) = prompt else {
                let serde = serde.unwrap_or_else(|e| panic!("serde refused {context}: {e}"));
                assert!(serde.has_media() && serde.text.is_some(), "{context}");
                continue;
            };
            let media = serde.as_ref().is_ok_and(GenerateRequest::has_media);
            assert!(!media, "missed media in {context}");
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
            br#"{"text": "a", "image_data": null, "image_data": null}"#,
            br#"{"image_data": ["x"]}"#,
        ] {
            assert_eq!(request_text(pass, &mut scratch), None, "{pass:?}");
        }
        assert_eq!(
            request_text(br#"{"text":"a","audio_data":[]}"#, &mut scratch),
            Some(Prompt::Media)
        );
        assert_eq!(
            request_text(br#"{"video_data":null,"text":"a"}"#, &mut scratch),
            Some(Prompt::Text(b"a"))
        );
        assert_eq!(
            request_text(br#"{"text":"a\nb\u00e9"}"#, &mut scratch),
            Some(Prompt::Text("a\nbé".as_bytes()))
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
