use serde_json::{Value, json};

use super::*;

/// trim_blocks eats the newline after each block tag, as in transformers.
const TEMPLATE: &str = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% if m.tool_calls %}{{ m.tool_calls | tojson }}{% endif %}\n{% endfor %}{% if tools %}[{{ tools | length }} tools]{% endif %}{% if add_generation_prompt %}<assistant>{% endif %}";

fn renderer() -> Renderer {
    match Renderer::new(TEMPLATE, None, None) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    }
}

fn generate(body: Value) -> Result<(Value, Meta), BadRequest> {
    let g = to_generate(body.to_string().as_bytes(), &renderer(), 7)?;
    let sent: Value =
        serde_json::from_slice(&g.body).map_err(|e| BadRequest::new(e.to_string(), None))?;
    Ok((sent, g.meta))
}

#[test]
fn maps_messages_and_sampling_to_generate() {
    let body = json!({
        "model": "m", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}],
        "max_tokens": 5, "max_completion_tokens": 9, "temperature": 0.5, "top_p": 0.9,
        "stop": ["\n\n"], "seed": 3, "rid": "r1", "tools": [{"type": "function", "function": {"name": "f"}}],
    });
    let (sent, meta) = generate(body).map_err(|e| e.message).expect("valid");
    assert_eq!(
        sent["text"],
        "<system>be brief<user>hi there[1 tools]<assistant>"
    );
    assert_eq!(
        sent["sampling_params"],
        json!({"max_new_tokens": 9, "temperature": 0.5, "top_p": 0.9, "stop": ["\n\n"], "sampling_seed": 3})
    );
    assert_eq!(
        (
            sent["return_logprob"].clone(),
            sent["stream"].clone(),
            sent["rid"].clone()
        ),
        (json!(true), json!(true), json!("r1"))
    );
    assert!(sent.get("messages").is_none());
    assert_eq!(
        meta,
        Meta {
            model: "m".into(),
            created: 7,
            stream: true,
            include_usage: true,
            tools: true,
            in_reasoning: false
        }
    );
}

#[test]
fn tool_choice_none_turns_tool_parsing_off() {
    let body = json!({"messages": [{"role": "user", "content": "x"}], "tools": [{}], "tool_choice": "none"});
    let (_, meta) = generate(body).map_err(|e| e.message).expect("valid");
    assert!(!meta.tools);
}

#[test]
fn bad_requests_name_the_problem() {
    let cases = [
        (json!({}), "`messages` is required"),
        (json!({"messages": []}), "`messages` is empty"),
        (
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            "unknown role `wizard`",
        ),
        (
            json!({"messages": [{"content": "x"}]}),
            "`role` must be a string",
        ),
        (json!({"messages": ["hi"]}), "must be an object"),
        (
            json!({"messages": [{"role": "user", "content": 5}]}),
            "`content` must be",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            "`image_url` are not supported",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "n": 2}),
            "only n=1",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "stop": 5}),
            "`stop` must be",
        ),
        (json!({"messages": "x"}), "not a chat completion request"),
    ];
    for (body, expected) in cases {
        match generate(body.clone()) {
            Err(e) => assert!(e.message.contains(expected), "{body}: {}", e.message),
            Ok(_) => panic!("{body} was accepted"),
        }
    }
    let error: Value =
        serde_json::from_slice(&BadRequest::new("m", Some("n")).body()).unwrap_or_default();
    assert_eq!(error["error"]["param"], "n");
    assert_eq!(error["error"]["type"], "invalid_request_error");
}

#[test]
fn retrieval_renders_without_a_generation_prompt() {
    let body = json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]});
    let text = retrieval_text(body.to_string().as_bytes(), &renderer());
    assert_eq!(
        text.map(|t| t.map_err(|e| e.message)),
        Some(Ok("<user>q<assistant>a".to_owned()))
    );
    assert!(retrieval_text(br#"{"text": "x"}"#, &renderer()).is_none());
    let bad = retrieval_text(br#"{"messages": [{"role": 1}]}"#, &renderer());
    assert!(matches!(bad, Some(Err(_))));
}
