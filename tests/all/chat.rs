//! `/v1/chat/completions` through the chat-completions middleware and the radix-tree cache
//! after it, against a mock worker that replies to the conversation in its prompt
//! (`MockConfig::chat`), with the test tokenizer and the chat templates of
//! tests/fixtures/chat-model (exact) and chat-model-drift (Qwen3's reasoning rule).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use guest_artifacts::{CHAT_COMPLETIONS, RADIX_TREE};
use mock_worker::{MockConfig, MockWorker, Tokenizer};
use serde_json::{Value, json};

use crate::common::{TestRouter, metric, mock_with, router};

const SYSTEM: &str = "Be brief.";

fn model_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

struct Chat {
    tokenizer: Arc<Tokenizer>,
    worker: MockWorker,
    router: TestRouter,
}

async fn setup(model: &str, mock: MockConfig) -> Result<Chat> {
    let dir = model_dir(model);
    let tokenizer = Arc::new(Tokenizer::load(&dir.join("tokenizer.json"))?);
    let worker = mock_with(MockConfig {
        tokenizer: Some(tokenizer.clone()),
        chat: true,
        ..mock
    })
    .await?;
    let url = worker.url();
    let router = router(|c| {
        c.worker_urls = vec![url];
        c.slime_router_middleware_paths = vec![CHAT_COMPLETIONS.into(), RADIX_TREE.into()];
        c.hf_checkpoint = Some(dir);
    })
    .await?;
    Ok(Chat {
        tokenizer,
        worker,
        router,
    })
}

impl Chat {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(text).map_err(anyhow::Error::msg)
    }

    /// A chat request whose (streamed) answer the caller reads.
    async fn stream(&self, body: &Value) -> Result<reqwest::Response> {
        let url = self.router.url("/v1/chat/completions");
        let request = self.router.client.post(url).body(body.to_string());
        Ok(request.send().await?)
    }

    async fn complete(&self, body: &Value) -> Result<(u16, Value)> {
        self.router.post("/v1/chat/completions", body).await
    }

    /// One non-streamed turn; returns the assistant message and the `/generate` body the
    /// worker got.
    async fn turn(&self, messages: &[Value], extra: Value) -> Result<(Value, Value)> {
        let mut body = json!({"model": "m", "messages": messages, "max_tokens": 200});
        for (k, v) in extra.as_object().into_iter().flatten() {
            body[k] = v.clone();
        }
        let (status, answer) = self.complete(&body).await?;
        anyhow::ensure!(status == 200, "{status}: {answer}");
        let seen = self.worker.last_seen().context("worker saw nothing")?;
        assert_eq!(seen.path_and_query, "/generate");
        let sent: Value = serde_json::from_slice(&seen.body)?;
        assert_eq!(answer["object"], "chat.completion");
        assert_eq!(
            answer["usage"]["prompt_tokens"].as_u64(),
            Some(ids(&sent["input_ids"]).len() as u64)
        );
        Ok((answer["choices"][0].clone(), sent))
    }

    async fn drift(&self) -> Result<f64> {
        let metrics = self
            .router
            .client
            .get(self.router.url("/metrics"))
            .send()
            .await?;
        let text = metrics.text().await?;
        let name =
            r#"slime_router_middleware_counter_total{middleware="radix-tree",name="radix_drift"}"#;
        Ok(metric(&text, name).unwrap_or(0.0))
    }
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect()
        })
        .unwrap_or_default()
}

fn user(content: &str) -> Value {
    json!({"role": "user", "content": content})
}

/// The model text behind an assistant message, as the exact template renders it.
fn model_text(message: &Value) -> String {
    let content = message["content"].as_str().unwrap_or_default();
    match message["reasoning_content"].as_str() {
        Some(r) => format!("<think>\n{r}\n</think>\n\n{content}"),
        None => content.to_owned(),
    }
}

#[tokio::test]
async fn a_plain_turn_goes_to_generate_as_input_ids_and_comes_back_as_openai() -> Result<()> {
    let chat = setup("chat-model", MockConfig::default()).await?;
    let messages = [
        json!({"role": "system", "content": SYSTEM}),
        user("hello there"),
    ];
    let extra = json!({"temperature": 0.5, "top_p": 0.9, "seed": 7, "stop": ["\n\n"],
                       "max_completion_tokens": 50});
    let (choice, sent) = chat.turn(&messages, extra).await?;
    let prompt = format!(
        "<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(ids(&sent["input_ids"]), chat.encode(&prompt)?);
    assert!(sent.get("text").is_none() && sent.get("messages").is_none());
    assert_eq!(sent["return_logprob"], true);
    assert_eq!(
        sent["sampling_params"],
        json!({"max_new_tokens": 50, "temperature": 0.5, "top_p": 0.9, "stop": ["\n\n"], "sampling_seed": 7})
    );
    assert_eq!(
        choice["message"],
        json!({"role": "assistant", "content": "Reply 1: you said hello there"})
    );
    assert_eq!(choice["finish_reason"], "stop");
    // A reply cut by max_tokens says so.
    let (choice, _) = chat.turn(&messages, json!({"max_tokens": 3})).await?;
    assert_eq!(choice["finish_reason"], "length");
    Ok(())
}

#[tokio::test]
async fn four_turns_extend_the_earlier_tokens_exactly() -> Result<()> {
    let chat = setup("chat-model", MockConfig::default()).await?;
    let mut messages = vec![json!({"role": "system", "content": SYSTEM})];
    let mut previous: Option<(Vec<u32>, String)> = None;
    for (turn, text) in ["hi", "please think it over", "and now?", "think again"]
        .iter()
        .enumerate()
    {
        messages.push(user(text));
        let (choice, sent) = chat.turn(&messages, json!({})).await?;
        let input = ids(&sent["input_ids"]);
        if let Some((earlier, output)) = &previous {
            // The earlier prompt, then the earlier output exactly (its EOS included), then
            // the new tail: nothing the model produced was tokenised again.
            let mut expected = earlier.clone();
            expected.extend(chat.encode(output)?);
            expected.extend(chat.encode("<|im_end|>")?);
            expected.extend(chat.encode(&format!(
                "\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
            ))?);
            assert_eq!(input, expected, "turn {}", turn + 1);
        }
        let message = choice["message"].clone();
        if text.contains("think") {
            let reasoning = message["reasoning_content"].as_str().unwrap_or_default();
            assert_eq!(reasoning, format!("Turn {} asks me to think.", turn + 1));
            assert_eq!(
                message["content"],
                format!("I thought about turn {}.", turn + 1)
            );
        }
        previous = Some((input, model_text(&message)));
        messages.push(message);
    }
    assert_eq!(chat.drift().await?, 0.0);

    // Exported by messages: 1 exactly on what the model generated, EOS included.
    let (status, exported) = chat
        .router
        .post("/retrieve_from_text", &json!({"messages": messages}))
        .await?;
    assert_eq!(status, 200, "{exported}");
    let tokens = ids(&exported["tokens"]);
    let mask: Vec<u64> = exported["loss_mask"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .collect();
    let (last_input, last_output) = previous.context("no turn")?;
    let mut expected = last_input.clone();
    let output_ids = [chat.encode(&last_output)?, chat.encode("<|im_end|>")?].concat();
    expected.extend(&output_ids);
    expected.extend(chat.encode("\n")?);
    assert_eq!(tokens, expected);
    assert_eq!(
        exported["cached_tokens"].as_u64(),
        Some((expected.len() - 1) as u64)
    );
    let generated = mask.iter().filter(|&&m| m == 1).count();
    let tail = &mask[last_input.len()..last_input.len() + output_ids.len()];
    assert!(tail.iter().all(|&m| m == 1) && mask[0] == 0 && mask[mask.len() - 1] == 0);
    assert!(
        generated > output_ids.len(),
        "earlier outputs are masked 1 too"
    );
    let logp = exported["rollout_logp"]
        .as_array()
        .context("rollout_logp")?;
    assert!(logp[last_input.len()].as_f64().is_some_and(|l| l < 0.0));
    Ok(())
}

#[tokio::test]
async fn a_tool_call_round_trip_stays_exact() -> Result<()> {
    let chat = setup("chat-model", MockConfig::default()).await?;
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "description": "Weather in a city", "parameters": {"type": "object",
        "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let mut messages = vec![user("What is the weather in Paris?")];
    let (choice, first) = chat.turn(&messages, json!({"tools": tools})).await?;
    assert_eq!(choice["finish_reason"], "tool_calls");
    let message = choice["message"].clone();
    assert_eq!(message["content"], Value::Null);
    let call = &message["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(
        call["function"],
        json!({"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"})
    );
    let call_id = call["id"].as_str().context("tool call id")?.to_owned();
    messages.push(message);
    messages.push(json!({"role": "tool", "tool_call_id": call_id, "content": "sunny, 21 C"}));
    let (choice, second) = chat.turn(&messages, json!({"tools": tools})).await?;
    assert_eq!(choice["message"]["content"], "The tool says: sunny, 21 C");
    assert_eq!(choice["finish_reason"], "stop");
    let mut expected = ids(&first["input_ids"]);
    expected.extend(chat.encode("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>")?);
    expected.extend(chat.encode("\n<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n")?);
    assert_eq!(ids(&second["input_ids"]), expected);
    assert_eq!(chat.drift().await?, 0.0);
    Ok(())
}

/// The `data:` objects of an event stream, and whether it ended with `[DONE]`.
fn events(body: &str) -> (Vec<Value>, bool) {
    let data: Vec<&str> = body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    let done = data.last() == Some(&"[DONE]");
    let objects = data
        .iter()
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect();
    (objects, done)
}

fn joined(chunks: &[Value], field: &str) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"][field].as_str())
        .collect()
}

#[tokio::test]
async fn streamed_chunks_flow_as_the_worker_generates() -> Result<()> {
    let mock = MockConfig {
        tokens_per_second: 50.0,
        ..MockConfig::default()
    };
    let chat = setup("chat-model", mock).await?;
    let body = json!({"model": "m", "messages": [user("think of a fox")], "stream": true,
                      "max_tokens": 100, "stream_options": {"include_usage": true}});
    let mut response = chat.stream(&body).await?;
    assert_eq!(response.status(), 200);
    let kind = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok());
    assert_eq!(kind, Some("text/event-stream"));
    let mut text = String::new();
    let mut while_generating = 0;
    while let Some(chunk) = response.chunk().await? {
        text.push_str(std::str::from_utf8(&chunk)?);
        // Events arrive while the worker is still generating, not all at the end.
        if chat.worker.in_flight() == 1 && text.contains("reasoning_content") {
            while_generating += 1;
        }
    }
    assert!(
        while_generating > 0,
        "no chunk arrived before the generation ended"
    );
    let (chunks, done) = events(&text);
    assert!(done, "[DONE] ends the stream");
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    assert_eq!(
        joined(&chunks, "reasoning_content"),
        "Turn 1 asks me to think."
    );
    assert_eq!(joined(&chunks, "content"), "I thought about turn 1.");
    let finishes: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, vec![&json!("stop")]);
    let usage = &chunks.last().context("no chunk")?["usage"];
    let sent: Value = serde_json::from_slice(&chat.worker.last_seen().context("seen")?.body)?;
    assert_eq!(
        usage["prompt_tokens"].as_u64(),
        Some(ids(&sent["input_ids"]).len() as u64)
    );
    assert!(usage["completion_tokens"].as_u64().is_some_and(|n| n > 5));
    assert_eq!(sent["stream"], true);

    // A streamed tool call: one delta with the whole call, then finish_reason tool_calls.
    let tools =
        json!([{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]);
    let body = json!({"messages": [user("weather please")], "tools": tools, "stream": true,
                      "max_tokens": 100});
    let (chunks, done) = events(&chat.stream(&body).await?.text().await?);
    assert!(done);
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"].get("tool_calls"))
        .collect();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0][0]["index"], 0);
    assert_eq!(
        calls[0][0]["function"]["arguments"],
        "{\"city\": \"Paris\"}"
    );
    assert_eq!(
        chunks
            .last()
            .map(|c| c["choices"][0]["finish_reason"].clone()),
        Some(json!("tool_calls"))
    );
    chat.router.assert_counts_return_to_zero().await
}

#[tokio::test]
async fn a_template_that_drops_earlier_reasoning_is_counted_as_drift() -> Result<()> {
    let chat = setup("chat-model-drift", MockConfig::default()).await?;
    let mut messages = vec![user("think about foxes")];
    let (choice, first) = chat.turn(&messages, json!({})).await?;
    let message = choice["message"].clone();
    assert!(message["reasoning_content"].is_string());
    assert_eq!(chat.drift().await?, 0.0);
    messages.push(message.clone());
    messages.push(user("go on"));
    let (_, second) = chat.turn(&messages, json!({})).await?;
    assert_eq!(
        chat.drift().await?,
        1.0,
        "the re-rendered turn left the cached output"
    );
    // The cache reused the prompt up to the divergence; the re-rendered reply is new prompt.
    let (earlier, now) = (ids(&first["input_ids"]), ids(&second["input_ids"]));
    assert_eq!(&now[..earlier.len()], &earlier[..]);
    let content = message["content"].as_str().unwrap_or_default();
    let rerendered = chat.encode(&format!(
        "{content}<|im_end|>\n<|im_start|>user\ngo on<|im_end|>\n<|im_start|>assistant\n"
    ))?;
    assert_eq!(&now[earlier.len()..], &rerendered[..]);

    // Retrieval tells the re-rendered reply apart: mask 0, as prompt. (Rendered with the
    // reply last, the template keeps its reasoning, and the cached output is found again.)
    let (status, exported) = chat
        .router
        .post("/retrieve_from_text", &json!({"messages": messages}))
        .await?;
    assert_eq!(status, 200);
    let mask = exported["loss_mask"].as_array().context("mask")?;
    assert!(mask.iter().all(|m| m == 0), "{exported}");
    Ok(())
}

#[tokio::test]
async fn bad_requests_get_400_json_and_reach_no_worker() -> Result<()> {
    let chat = setup("chat-model", MockConfig::default()).await?;
    let cases: [(&[u8], &str); 7] = [
        (b"not json", "not a chat completion request"),
        (br#"{"model": "m"}"#, "`messages` is required"),
        (br#"{"messages": [{"role": "wizard", "content": "x"}]}"#, "unknown role `wizard`"),
        (br#"{"messages": [{"role": "user", "content": "x"}], "n": 3}"#, "only n=1"),
        (br#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}"#, "text only"),
        (br#"{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "late"}]}"#,
         "a system message must come first"),
        (br#"{"messages": [{"role": "user"}]}"#, "failed to render"),
    ];
    for (body, expected) in cases {
        let (status, bytes) = chat
            .router
            .post_raw("/v1/chat/completions", body.to_vec())
            .await?;
        let answer: Value = serde_json::from_slice(&bytes)
            .with_context(|| String::from_utf8_lossy(&bytes).into_owned())?;
        assert_eq!(status, 400, "{answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(expected),
            "{expected:?} not in {message:?}"
        );
    }
    let (status, _) = chat.router.get("/v1/chat/completions").await?;
    assert_eq!(status, 405);
    let (status, answer) = chat
        .router
        .post("/retrieve_from_text", &json!({"messages": []}))
        .await?;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(
        chat.worker.requests(),
        0,
        "no bad request reached the worker"
    );
    // Other routes are unaffected: /generate with text still goes through the cache.
    let (status, answer) = chat
        .router
        .post(
            "/generate",
            &json!({"text": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"}),
        )
        .await?;
    assert_eq!(status, 200);
    assert_eq!(answer["text"], "Reply 1: you said hi");
    Ok(())
}
