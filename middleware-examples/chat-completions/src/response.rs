//! OpenAI's answer from SGLang's: `chat.completion` whole, or the pieces of a
//! `chat.completion.chunk`.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::parse::{Parsed, ToolCall};
use crate::request::Meta;

/// What is read of a `/generate` answer or event.
#[derive(Deserialize, Default)]
pub struct Output {
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub output_ids: Option<Vec<u32>>,
    #[serde(default)]
    pub meta_info: MetaInfo,
}

#[derive(Deserialize, Default)]
pub struct MetaInfo {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub cached_tokens: Option<u64>,
    #[serde(default)]
    pub finish_reason: Option<Value>,
    #[serde(default)]
    pub weight_version: Option<Value>,
}

/// Names a completion: `chatcmpl-` and the router's request id.
pub fn completion_id(request_id: u64) -> String {
    format!("chatcmpl-{request_id:016x}")
}

/// OpenAI's `finish_reason` for SGLang's: `stop`, `length`, SGLang's `abort` kept (an RL
/// loop must tell a cut-short rollout apart), and `tool_calls` when the model called one.
pub fn finish_reason(sglang: Option<&Value>, called_tools: bool) -> Option<&'static str> {
    let kind = match sglang? {
        Value::Object(reason) => reason.get("type").and_then(Value::as_str),
        Value::String(kind) => Some(kind.as_str()),
        _ => None,
    };
    Some(match kind {
        Some("length") => "length",
        Some("abort") => "abort",
        _ if called_tools => "tool_calls",
        _ => "stop",
    })
}

/// OpenAI's `usage`, from the worker's own counts.
pub fn usage(meta: &MetaInfo) -> Value {
    let mut usage = json!({
        "prompt_tokens": meta.prompt_tokens,
        "completion_tokens": meta.completion_tokens,
        "total_tokens": meta.prompt_tokens + meta.completion_tokens,
    });
    if let Some(cached) = meta.cached_tokens {
        usage["prompt_tokens_details"] = json!({"cached_tokens": cached});
    }
    usage
}

/// One tool call as OpenAI writes it, with a stable id.
pub fn tool_call(request_id: u64, index: usize, call: &ToolCall) -> Value {
    json!({
        "index": index,
        "id": format!("call_{request_id:x}_{index}"),
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    })
}

/// The whole `chat.completion` for a non-streamed answer.
pub fn completion(request_id: u64, meta: &Meta, output: &Output, parsed: Parsed) -> Value {
    let called = !parsed.tool_calls.is_empty();
    let mut message = json!({"role": "assistant"});
    message["content"] = if called && parsed.content.is_empty() {
        Value::Null
    } else {
        Value::String(parsed.content)
    };
    if let Some(reasoning) = parsed.reasoning {
        message["reasoning_content"] = Value::String(reasoning);
    }
    if called {
        let calls = parsed.tool_calls.iter().enumerate();
        message["tool_calls"] = calls
            .map(|(i, call)| {
                let mut call = tool_call(request_id, i, call);
                // `index` belongs to streamed deltas only.
                call.as_object_mut().map(|c| c.remove("index"));
                call
            })
            .collect();
    }
    let finish = finish_reason(output.meta_info.finish_reason.as_ref(), called).unwrap_or("stop");
    let mut completion = json!({
        "id": completion_id(request_id),
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
        "usage": usage(&output.meta_info),
    });
    if let Some(version) = &output.meta_info.weight_version {
        completion["weight_version"] = version.clone();
    }
    completion
}

/// One `chat.completion.chunk` event with `delta` (or, with `usage`, no choices).
pub fn chunk(request_id: u64, meta: &Meta, delta: Value, finish: Option<&str>) -> Vec<u8> {
    let chunk = json!({
        "id": completion_id(request_id),
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
    });
    event(&chunk)
}

/// The usage chunk `stream_options.include_usage` asks for: no choices.
pub fn usage_chunk(request_id: u64, meta: &Meta, usage: Value) -> Vec<u8> {
    let chunk = json!({
        "id": completion_id(request_id),
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "choices": [],
        "usage": usage,
    });
    event(&chunk)
}

fn event(value: &Value) -> Vec<u8> {
    let mut out = b"data: ".to_vec();
    out.extend_from_slice(value.to_string().as_bytes());
    out.extend_from_slice(b"\n\n");
    out
}
