//! SGLang's `/generate` events turned into OpenAI's `chat.completion.chunk` events, with the
//! state between chunks kept in the request's stash.
//!
//! SGLang's events are cumulative by default (each holds the text so far) and deltas with
//! `--incremental-streaming-output`; an event whose `output_ids` fall short of
//! `completion_tokens` is a delta. The role goes first, then reasoning, content and tool
//! calls as the parser settles them, then a chunk with `finish_reason`, the usage chunk when
//! `stream_options.include_usage` asked for it, and `data: [DONE]`.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::config::Config;
use crate::parse::{Delta, Parser};
use crate::request::Meta;
use crate::response::{self, MetaInfo, Output};

/// A stream's progress.
#[derive(Serialize, Deserialize)]
pub struct StreamState {
    pub meta: Meta,
    parser: Parser,
    /// Bytes of the (cumulative) text already parsed.
    consumed: usize,
    started: bool,
    finished: bool,
    done: bool,
    tool_calls: usize,
    usage: Option<Value>,
}

impl StreamState {
    pub fn new(meta: Meta, config: &Config) -> Self {
        let parser = Parser::new(config, meta.tools, meta.in_reasoning);
        StreamState {
            meta,
            parser,
            consumed: 0,
            started: false,
            finished: false,
            done: false,
            tool_calls: 0,
            usage: None,
        }
    }

    /// The bytes to send the client for `events` (whole `data: ...\n\n` events).
    pub fn on_events(&mut self, request_id: u64, events: &[u8], last: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for event in events.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let Some(data) = event.strip_prefix(b"data:") else {
                continue;
            };
            let data = data.trim_ascii();
            if data == b"[DONE]" {
                self.end(request_id, &mut out);
                continue;
            }
            match serde_json::from_slice::<Output>(data) {
                Ok(output) if !is_error(data) => self.output(request_id, output, &mut out),
                // An error event (or one we cannot read) reaches the client as it came.
                _ => {
                    out.extend_from_slice(b"data: ");
                    out.extend_from_slice(data);
                    out.extend_from_slice(b"\n\n");
                }
            }
        }
        if last && !self.done && self.started {
            self.end(request_id, &mut out);
        }
        out
    }

    fn output(&mut self, request_id: u64, output: Output, out: &mut Vec<u8>) {
        if self.finished {
            return;
        }
        let piece = self.piece(&output);
        if !self.started {
            self.started = true;
            let role = json!({"role": "assistant", "content": ""});
            out.extend(response::chunk(request_id, &self.meta, role, None));
        }
        self.usage = Some(response::usage(&output.meta_info));
        let mut deltas = Vec::new();
        self.parser.push(piece, &mut deltas);
        if output
            .meta_info
            .finish_reason
            .as_ref()
            .is_some_and(|r| !r.is_null())
        {
            self.parser.finish(&mut deltas);
            self.send(request_id, deltas, out);
            self.finish(request_id, &output.meta_info, out);
        } else {
            self.send(request_id, deltas, out);
        }
    }

    /// What `output` adds to the text so far.
    fn piece<'o>(&mut self, output: &'o Output) -> &'o str {
        let ids = output.output_ids.as_ref().map(Vec::len);
        let delta = ids.is_some_and(|n| (n as u64) < output.meta_info.completion_tokens);
        if delta {
            self.consumed += output.text.len();
            return &output.text;
        }
        let piece = output.text.get(self.consumed..).unwrap_or("");
        self.consumed = self.consumed.max(output.text.len());
        piece
    }

    fn send(&mut self, request_id: u64, deltas: Vec<Delta>, out: &mut Vec<u8>) {
        for delta in deltas {
            let delta = match delta {
                Delta::Reasoning(text) => json!({"reasoning_content": text}),
                Delta::Content(text) => json!({"content": text}),
                Delta::ToolCall(call) => {
                    let call = response::tool_call(request_id, self.tool_calls, &call);
                    self.tool_calls += 1;
                    json!({"tool_calls": [call]})
                }
            };
            out.extend(response::chunk(request_id, &self.meta, delta, None));
        }
    }

    fn finish(&mut self, request_id: u64, meta: &MetaInfo, out: &mut Vec<u8>) {
        self.finished = true;
        let called = self.tool_calls > 0;
        let reason = response::finish_reason(meta.finish_reason.as_ref(), called).unwrap_or("stop");
        let chunk = response::chunk(request_id, &self.meta, json!({}), Some(reason));
        out.extend(chunk);
    }

    /// `[DONE]`: finishes a stream that never said why it ended, then the usage and `[DONE]`.
    fn end(&mut self, request_id: u64, out: &mut Vec<u8>) {
        if self.done {
            return;
        }
        if !self.finished {
            let mut deltas = Vec::new();
            self.parser.finish(&mut deltas);
            self.send(request_id, deltas, out);
            self.finish(request_id, &MetaInfo::default(), out);
        }
        if self.meta.include_usage
            && let Some(usage) = self.usage.take()
        {
            out.extend(response::usage_chunk(request_id, &self.meta, usage));
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
        self.done = true;
    }
}

fn is_error(data: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Probe {
        error: Option<serde::de::IgnoredAny>,
    }
    serde_json::from_slice::<Probe>(data).is_ok_and(|p| p.error.is_some())
}

#[cfg(test)]
mod tests;
