//! A streamed `/generate` response put together from its SSE events, in a state the request's
//! stash keeps between chunks.
//!
//! SGLang's events are cumulative by default: each holds the text, ids and logprobs so far, so
//! the last one is the whole output. With `--incremental-streaming-output` each holds only what
//! is new (`completion_tokens` still counts everything), and the output is the sum of them all.
//! The first event looks the same either way; the second tells them apart (a delta carries
//! fewer tokens than `completion_tokens`). So only that one is parsed mid-stream: after it a
//! cumulative stream keeps its latest event, as raw bytes, and a delta stream appends every
//! event, read once when the stream ends. Parsing each cumulative event would cost time
//! growing with the output on every chunk.
//!
//! State layout: empty before any event, else a kind byte and the event(s), deltas joined by
//! `\n` (which no event payload holds).

use std::borrow::Cow;

use crate::sglang::{self, GenerateOutput, MetaInfo, Text, TokenLogprobs};

/// One event so far.
const FIRST: u8 = 1;
/// Cumulative events: the latest.
const LATEST: u8 = 2;
/// Delta events: all of them.
const DELTAS: u8 = 3;

/// Appends to `out` the state after `chunk`'s events arrive in `state`; false, appending
/// nothing, when the chunk holds no event.
pub fn push(state: &[u8], chunk: &[u8], out: &mut Vec<u8>) -> bool {
    let mut events = sglang::data_events(chunk).peekable();
    if events.peek().is_none() {
        return false;
    }
    let start = out.len();
    // The latest event is all a cumulative stream keeps: don't copy the one it replaces.
    let keep = if state.first() == Some(&LATEST) {
        1
    } else {
        state.len()
    };
    out.extend_from_slice(&state[..keep]);
    for event in events {
        let kind = out.get(start).copied();
        match kind {
            None => out.push(FIRST),
            Some(FIRST) if is_delta(event) => out[start] = DELTAS,
            Some(DELTAS) => {}
            _ => {
                out.truncate(start);
                out.push(LATEST);
            }
        }
        if out.len() > start + 1 {
            out.push(b'\n');
        }
        out.extend_from_slice(event);
    }
    true
}

/// True for an event that carries fewer tokens than the stream has produced.
fn is_delta(event: &[u8]) -> bool {
    let Some(out) = sglang::parse_output(event) else {
        return false;
    };
    let meta = out.meta_info.as_ref();
    let logprobs = meta.and_then(|m| m.output_token_logprobs.as_ref());
    let tokens = match (logprobs, &out.output_ids) {
        (Some(lp), _) if !lp.ids.is_empty() => lp.ids.len(),
        (_, Some(ids)) => ids.len(),
        _ => 0,
    };
    meta.and_then(|m| m.completion_tokens)
        .is_some_and(|n| n > tokens as u64)
}

/// What a stream's events amount to once it has ended.
#[derive(Debug)]
pub enum Whole<'a> {
    /// Cumulative events (or a single one): the last, to parse as a response body.
    Event(&'a [u8]),
    /// Delta events, added up.
    Summed(GenerateOutput<'a>),
}

/// The output of a stream whose events came in `state`; `None` when none came, or a delta
/// cannot be read.
pub fn finish(state: &[u8]) -> Option<Whole<'_>> {
    match state.split_first()? {
        (&(FIRST | LATEST), event) => Some(Whole::Event(event)),
        (&DELTAS, events) => sum(events).map(Whole::Summed),
        _ => None,
    }
}

/// Delta events added up: text, ids and logprobs joined; version, finish reason and
/// `completion_tokens` from the last event that has them.
fn sum(events: &[u8]) -> Option<GenerateOutput<'_>> {
    let mut text = String::new();
    let mut ids: Option<Vec<u32>> = None;
    let mut logprobs: Option<TokenLogprobs> = None;
    let mut meta = MetaInfo {
        output_token_logprobs: None,
        weight_version: None,
        finish_reason: None,
        completion_tokens: None,
    };
    for event in events.split(|&b| b == b'\n') {
        let out = sglang::parse_output(event)?;
        if let Some(Text(t)) = &out.text {
            text.push_str(t);
        }
        if let Some(new) = out.output_ids {
            ids.get_or_insert_default().extend(new);
        }
        let Some(m) = out.meta_info else { continue };
        if let Some(lp) = m.output_token_logprobs {
            let all = logprobs.get_or_insert_default();
            all.ids.extend(lp.ids);
            all.logprobs.extend(lp.logprobs);
        }
        meta.weight_version = m.weight_version.or(meta.weight_version);
        meta.finish_reason = m.finish_reason.or(meta.finish_reason);
        meta.completion_tokens = m.completion_tokens.or(meta.completion_tokens);
    }
    meta.output_token_logprobs = logprobs;
    Some(GenerateOutput {
        text: Some(Text(Cow::Owned(text))),
        output_ids: ids,
        meta_info: Some(meta),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// An SSE event with `ids` (logprobs -ids/8) of `total` tokens so far.
    fn event(text: &str, ids: &[u32], total: usize, version: &str) -> String {
        let lp: Vec<_> = ids
            .iter()
            .map(|&i| json!([-f64::from(i) / 8.0, i, null]))
            .collect();
        let e = json!({"text": text, "output_ids": ids, "meta_info": {
            "output_token_logprobs": lp, "completion_tokens": total,
            "weight_version": version, "finish_reason": null}});
        format!("data: {e}\n\n")
    }

    fn run(chunks: &[String]) -> Vec<u8> {
        let mut state = Vec::new();
        for chunk in chunks {
            let mut next = Vec::new();
            if push(&state, chunk.as_bytes(), &mut next) {
                state = next;
            }
        }
        state
    }

    #[test]
    fn cumulative_streams_keep_the_latest_event() {
        let chunks = [
            event("a", &[1], 1, "1"),
            event("ab", &[1, 2], 2, "1") + &event("abc", &[1, 2, 3], 3, "1"),
            "data: [DONE]\n\n".to_owned(),
        ];
        let state = run(&chunks);
        let last = event("abc", &[1, 2, 3], 3, "1");
        let Some(Whole::Event(e)) = finish(&state) else {
            panic!("{state:?}")
        };
        assert_eq!(e, sglang::last_data_event(last.as_bytes()).expect("event"));
        assert!(finish(&[]).is_none());
    }

    #[test]
    fn delta_streams_add_up() {
        let chunks = [
            event("a", &[1], 1, "1"),
            event("b", &[2], 2, "1") + &event("", &[], 2, "2"),
            event("cd", &[3, 4], 4, "2"),
        ];
        let state = run(&chunks);
        let Some(Whole::Summed(out)) = finish(&state) else {
            panic!("{state:?}")
        };
        assert_eq!(out.text.map(|t| t.0).as_deref(), Some("abcd"));
        assert_eq!(out.output_ids.as_deref(), Some(&[1, 2, 3, 4][..]));
        let meta = out.meta_info.expect("meta");
        let lp = meta.output_token_logprobs.as_ref().expect("logprobs");
        assert_eq!(lp.ids, [1, 2, 3, 4]);
        assert_eq!(lp.logprobs, [-0.125, -0.25, -0.375, -0.5]);
        assert_eq!(meta.completion_tokens, Some(4));
        assert_eq!(meta.weight_version().as_deref(), Some("2"));
        // A delta that cannot be read spoils the sum.
        let mut broken = state.clone();
        broken.extend_from_slice(b"\n{");
        assert!(finish(&broken).is_none());
    }
}
