use serde_json::{Value, json};

use super::*;

fn meta(tools: bool, include_usage: bool) -> Meta {
    Meta {
        model: "m".into(),
        created: 1,
        stream: true,
        include_usage,
        tools,
        in_reasoning: false,
    }
}

/// SGLang's events for `pieces`: cumulative or deltas, the last with a finish reason.
fn events(pieces: &[&str], cumulative: bool) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut text = String::new();
    for (i, piece) in pieces.iter().enumerate() {
        text.push_str(piece);
        let n = i + 1;
        let finish = if n == pieces.len() {
            json!({"type": "stop", "matched": 2})
        } else {
            Value::Null
        };
        let (shown, ids): (&str, Vec<u32>) = if cumulative {
            (&text, (0..n as u32).collect())
        } else {
            (piece, vec![n as u32])
        };
        let event = json!({"text": shown, "output_ids": ids,
                           "meta_info": {"prompt_tokens": 10, "completion_tokens": n, "finish_reason": finish}});
        out.push(format!("data: {event}\n\n").into_bytes());
    }
    out.push(b"data: [DONE]\n\n".to_vec());
    out
}

/// The chunks' JSON objects, and whether `[DONE]` came last.
fn run(state: &mut StreamState, events: Vec<Vec<u8>>) -> (Vec<Value>, bool) {
    let mut text = String::new();
    let last = events.len() - 1;
    for (i, e) in events.into_iter().enumerate() {
        let out = state.on_events(9, &e, i == last);
        text.push_str(std::str::from_utf8(&out).unwrap_or_default());
    }
    let done = text.ends_with("data: [DONE]\n\n");
    let chunks = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| serde_json::from_str(e).ok())
        .collect();
    (chunks, done)
}

fn joined(chunks: &[Value], field: &str) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"][field].as_str())
        .collect()
}

#[test]
fn role_first_then_content_and_finish_then_done_in_both_stream_kinds() {
    for cumulative in [true, false] {
        let mut state = StreamState::new(meta(false, true), &Config::default());
        let (chunks, done) = run(&mut state, events(&["Hel", "lo", " world"], cumulative));
        assert!(done);
        assert_eq!(
            chunks[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        assert_eq!(joined(&chunks, "content"), "Hello world");
        let finish: Vec<&Value> = chunks
            .iter()
            .map(|c| &c["choices"][0]["finish_reason"])
            .collect();
        assert_eq!(finish.iter().filter(|f| !f.is_null()).count(), 1);
        let usage = chunks
            .last()
            .map(|c| c["usage"].clone())
            .unwrap_or_default();
        assert_eq!(
            usage,
            json!({"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13})
        );
        assert!(
            chunks.iter().all(|c| c["object"] == "chat.completion.chunk"
                && c["id"] == "chatcmpl-0000000000000009")
        );
    }
}

#[test]
fn reasoning_and_a_tool_call_stream_as_openai_does() {
    let pieces = [
        "<thi",
        "nk>\nhm",
        "m\n</think>\n\n",
        "<tool_",
        "call>\n{\"name\": \"f\", ",
        "\"arguments\": {\"a\": 1}}\n</tool_call>",
    ];
    let mut state = StreamState::new(meta(true, false), &Config::default());
    let (chunks, done) = run(&mut state, events(&pieces, true));
    assert!(done);
    assert_eq!(joined(&chunks, "reasoning_content"), "hmm");
    assert_eq!(joined(&chunks, "content"), "");
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"].get("tool_calls"))
        .collect();
    assert_eq!(
        calls,
        vec![
            &json!([{"index": 0, "id": "call_9_0", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}])
        ]
    );
    let last = chunks
        .last()
        .map(|c| c["choices"][0]["finish_reason"].clone());
    assert_eq!(last, Some(json!("tool_calls")));
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
}

#[test]
fn error_events_pass_through() {
    let mut state = StreamState::new(meta(false, false), &Config::default());
    let out = state.on_events(1, b"data: {\"error\": {\"message\": \"boom\"}}\n\n", false);
    assert_eq!(out, b"data: {\"error\": {\"message\": \"boom\"}}\n\n");
}

#[test]
fn token_sized_pieces_lose_nothing() {
    let text = "<think>\nTurn 1 asks me to think.\n</think>\n\nI thought about turn 1.";
    let mut pieces: Vec<String> = Vec::new();
    for (i, c) in text.char_indices() {
        if i % 2 == 0 {
            pieces.push(String::new());
        }
        if let Some(p) = pieces.last_mut() {
            p.push(c);
        }
    }
    let pieces: Vec<&str> = pieces.iter().map(String::as_str).collect();
    for cumulative in [true, false] {
        let mut state = StreamState::new(meta(false, false), &Config::default());
        let (chunks, done) = run(&mut state, events(&pieces, cumulative));
        assert!(done);
        assert_eq!(
            joined(&chunks, "reasoning_content"),
            "Turn 1 asks me to think."
        );
        assert_eq!(joined(&chunks, "content"), "I thought about turn 1.");
    }
}
