//! The radix-tree trajectory cache end to end: router + mock worker + a byte-level BPE
//! tokenizer (tests/fixtures/tokenizer.json, made by examples/make_tokenizer.rs).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use guest_artifacts::RADIX_TREE;
use mock_worker::Tokenizer;
use mock_worker::{MockConfig, MockWorker, mock_logprob};
use serde_json::{Value, json};

use crate::common::{TestRouter, mock_with, mw, router};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer.json")
}

struct Setup {
    tokenizer: Arc<Tokenizer>,
    worker: MockWorker,
    router: TestRouter,
}

async fn setup(config: &str) -> Result<Setup> {
    setup_with(config, MockConfig::default()).await
}

async fn setup_with(config: &str, mock: MockConfig) -> Result<Setup> {
    let tokenizer = Arc::new(Tokenizer::load(&fixture())?);
    let worker = mock_with(MockConfig {
        tokenizer: Some(tokenizer.clone()),
        ..mock
    })
    .await?;
    let (url, spec) = (worker.url(), mw(RADIX_TREE, config));
    let router = router(|c| {
        c.worker_urls = vec![url];
        c.slime_router_middleware_paths = vec![spec];
        c.hf_checkpoint = Some(fixture());
    })
    .await?;
    Ok(Setup {
        tokenizer,
        worker,
        router,
    })
}

impl Setup {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(text).map_err(anyhow::Error::msg)
    }

    /// One `/generate` turn whose model output is exactly `output` (ids); returns the
    /// output text and the body the worker received.
    async fn turn(&self, text: &str, output: &[u32], stream: bool) -> Result<(String, Value)> {
        self.worker.script_output(output.to_vec());
        let body = json!({"text": text, "return_logprob": true, "stream": stream, "sampling_params": {"max_new_tokens": 64}});
        let response = self
            .router
            .client
            .post(self.router.url("/generate"))
            .body(body.to_string())
            .send()
            .await?;
        assert_eq!(response.status().as_u16(), 200);
        let bytes = response.bytes().await?;
        let answer: Value = if stream {
            let text = std::str::from_utf8(&bytes)?;
            let last = text
                .split("\n\n")
                .filter(|e| e.starts_with("data: {"))
                .last()
                .context("no event")?;
            serde_json::from_str(&last["data: ".len()..])?
        } else {
            crate::common::parse(&bytes)?
        };
        let sent =
            crate::common::parse(&self.worker.last_seen().context("worker saw nothing")?.body)?;
        Ok((answer["text"].as_str().context("text")?.to_owned(), sent))
    }

    async fn retrieve(&self, text: &str) -> Result<Value> {
        let (status, body) = self
            .router
            .post("/retrieve_from_text", &json!({"text": text}))
            .await?;
        assert_eq!(status, 200, "{body}");
        Ok(body)
    }
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_u64().map(|n| n as u32))
                .collect()
        })
        .unwrap_or_default()
}

const PROMPT: &str = "<|im_start|>user\nTell me about the fox<|im_end|>\n<|im_start|>assistant\n";
const TURN_2: &str =
    "wn fox jumps<|im_end|>\n<|im_start|>user\nand then?<|im_end|>\n<|im_start|>assistant\n";

#[tokio::test]
async fn multi_turn_reaches_the_worker_token_exact() -> Result<()> {
    let s = setup("").await?;
    // Turn 1 ends mid-word (" bro"); the user's next text continues it ("wn fox").
    let output_1 = s.encode(" The quick bro")?;
    let (text_1, sent_1) = s.turn(PROMPT, &output_1, false).await?;
    assert_eq!(
        ids(&sent_1["input_ids"]),
        s.encode(PROMPT)?,
        "turn 1 goes as input_ids"
    );
    assert!(sent_1.get("text").is_none(), "text is removed: {sent_1}");
    assert_eq!(
        sent_1["sampling_params"]["max_new_tokens"], 64,
        "other fields are kept"
    );

    let turn_2 = format!("{PROMPT}{text_1}{TURN_2}");
    let output_2 = s.encode(" It ran away.")?;
    let (_, sent_2) = s.turn(&turn_2, &output_2, false).await?;
    let exact: Vec<u32> = [s.encode(PROMPT)?, output_1.clone(), s.encode(TURN_2)?].concat();
    assert_ne!(
        s.encode(&turn_2)?,
        exact,
        "re-tokenising the joined text drifts at the seam"
    );
    assert_eq!(
        ids(&sent_2["input_ids"]),
        exact,
        "the worker sees the tokens it produced"
    );

    let retrieved = s.retrieve(&format!("{PROMPT}{text_1}")).await?;
    let prompt_len = s.encode(PROMPT)?.len();
    assert_eq!(
        ids(&retrieved["tokens"]),
        [s.encode(PROMPT)?, output_1.clone()].concat()
    );
    let mask: Vec<u64> = retrieved["loss_mask"]
        .as_array()
        .context("mask")?
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert_eq!(
        mask,
        [vec![0; prompt_len], vec![1; output_1.len()]].concat()
    );
    let logp: Vec<f64> = retrieved["rollout_logp"]
        .as_array()
        .context("logp")?
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    let want: Vec<f64> = (0..output_1.len())
        .map(|i| mock_logprob(i) as f32 as f64)
        .collect();
    assert_eq!(&logp[..prompt_len], vec![0.0; prompt_len].as_slice());
    assert_eq!(&logp[prompt_len..], want.as_slice());
    assert_eq!(retrieved["token_length"], prompt_len + output_1.len());
    assert_eq!(retrieved["loss_mask_length"], prompt_len + output_1.len());
    assert_eq!(retrieved["response"], format!("{PROMPT}{text_1}"));
    Ok(())
}

#[tokio::test]
async fn retrieve_tokenises_only_the_uncached_remainder_and_is_read_only() -> Result<()> {
    let s = setup("").await?;
    let output = s.encode(" Foxes are quick.")?;
    let (text, _) = s.turn(PROMPT, &output, false).await?;
    let stats_before = s.router.get("/radix_tree/stats").await?.1;
    let tail = " Unseen tail text";
    let retrieved = s.retrieve(&format!("{PROMPT}{text}{tail}")).await?;
    let want: Vec<u32> = [s.encode(PROMPT)?, output.clone(), s.encode(tail)?].concat();
    assert_eq!(ids(&retrieved["tokens"]), want);
    let mask = retrieved["loss_mask"].as_array().context("mask")?;
    assert!(
        mask[mask.len() - s.encode(tail)?.len()..]
            .iter()
            .all(|m| m == 0),
        "uncached text has mask 0"
    );
    let stats_after = s.router.get("/radix_tree/stats").await?.1;
    for key in ["nodes", "tokens", "inserted_tokens"] {
        assert_eq!(
            stats_before[key], stats_after[key],
            "retrieve changed {key}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn streamed_turns_are_cached() -> Result<()> {
    let s = setup("").await?;
    let output = s.encode(" Streaming works.")?;
    let (text, sent) = s.turn(PROMPT, &output, true).await?;
    assert_eq!(ids(&sent["input_ids"]), s.encode(PROMPT)?);
    let retrieved = s.retrieve(&format!("{PROMPT}{text}")).await?;
    assert_eq!(
        ids(&retrieved["tokens"]),
        [s.encode(PROMPT)?, output.clone()].concat()
    );
    let ones = retrieved["loss_mask"]
        .as_array()
        .context("mask")?
        .iter()
        .filter(|m| *m == 1)
        .count();
    assert_eq!(
        ones,
        output.len(),
        "the streamed output is cached as model output"
    );
    s.router.assert_counts_return_to_zero().await
}

#[tokio::test]
async fn retrieve_rejects_bad_input_with_400_json() -> Result<()> {
    let s = setup("").await?;
    for body in ["", "{", "{}", r#"{"text": ""}"#, r#"{"text": 5}"#, "[1]"] {
        let (status, bytes) = s
            .router
            .post_raw("/retrieve_from_text", body.to_owned())
            .await?;
        assert_eq!(status, 400, "{body:?}");
        assert!(
            crate::common::parse(&bytes)?["error"].is_string(),
            "{body:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn eviction_keeps_memory_bounded_over_a_long_run() -> Result<()> {
    let s = setup("max_tokens=400").await?;
    for i in 0..120 {
        let prompt =
            format!("<|im_start|>user\nQuestion number {i} about the lazy dog<|im_end|>\n");
        let output = s.encode(&format!(" Answer {i} is 42."))?;
        s.turn(&prompt, &output, false).await?;
        if i % 20 == 19 {
            let stats = s.router.get("/radix_tree/stats").await?.1;
            assert!(
                stats["tokens"].as_u64().context("tokens")? <= 400,
                "{stats}"
            );
        }
    }
    let stats = s.router.get("/radix_tree/stats").await?.1;
    assert!(
        stats["evicted_tokens"].as_u64().context("evicted")? > 0,
        "{stats}"
    );
    // The most recent trajectory survived eviction.
    let last_prompt = "<|im_start|>user\nQuestion number 119 about the lazy dog<|im_end|>\n";
    let retrieved = s.retrieve(last_prompt).await?;
    assert_eq!(ids(&retrieved["tokens"]), s.encode(last_prompt)?);
    Ok(())
}

#[tokio::test]
async fn requests_with_input_ids_pass_through_unchanged() -> Result<()> {
    let s = setup("").await?;
    s.worker.script_output(s.encode(" ok")?);
    let body = r#"{"input_ids": [1, 2, 3], "sampling_params": {"temperature": 1e-7}}"#;
    let (status, _) = s.router.post_raw("/generate", body).await?;
    assert_eq!(status, 200);
    assert_eq!(
        &s.worker.last_seen().context("seen")?.body[..],
        body.as_bytes()
    );
    Ok(())
}

#[tokio::test]
async fn concurrent_conversations_stay_token_exact() -> Result<()> {
    let s = Arc::new(setup("").await?);
    let mut conversations = tokio::task::JoinSet::new();
    for i in 0..12 {
        let s = s.clone();
        conversations.spawn(async move {
            let mut text = format!("<|im_start|>user\nQuestion {i}: what does the fox do?<|im_end|>\n<|im_start|>assistant\n");
            let mut exact = s.encode(&text)?;
            let mut outputs = 0;
            for turn in 0..3 {
                if turn > 0 {
                    let tail = format!("<|im_end|>\n<|im_start|>user\nand then {turn}?<|im_end|>\n<|im_start|>assistant\n");
                    exact.extend(s.encode(&tail)?);
                    text.push_str(&tail);
                }
                let body = json!({"text": text, "return_logprob": true, "sampling_params": {"max_new_tokens": 6 + i}});
                let (status, answer) = s.router.post("/generate", &body).await?;
                anyhow::ensure!(status == 200, "{answer}");
                exact.extend(ids(&answer["output_ids"]));
                outputs += answer["output_ids"].as_array().map_or(0, Vec::len);
                text.push_str(answer["text"].as_str().context("text")?);
            }
            let retrieved = s.retrieve(&text).await?;
            anyhow::ensure!(ids(&retrieved["tokens"]) == exact, "conversation {i} drifted");
            let ones = retrieved["loss_mask"].as_array().context("mask")?.iter().filter(|m| *m == 1).count();
            anyhow::ensure!(ones == outputs, "conversation {i}: {ones} output tokens, want {outputs}");
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(done) = conversations.join_next().await {
        done??;
    }
    for seen in s.worker.seen() {
        let body = crate::common::parse(&seen.body)?;
        assert!(
            body.get("text").is_none() && body["input_ids"].is_array(),
            "sent as text: {body}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn megabytes_of_routed_experts_never_enter_the_cache() -> Result<()> {
    // MoE routing replay makes every answer megabytes long; the cache names the fields it
    // reads, so only those cross into the guest and its deadline is never at risk.
    let s = setup_with(
        "",
        MockConfig {
            routed_experts_bytes: 16 << 20,
            ..MockConfig::default()
        },
    )
    .await?;
    let output = s.encode(" Experts routed.")?;
    s.worker.script_output(output.clone());
    let body = json!({"text": PROMPT, "return_logprob": true});
    let response = s
        .router
        .client
        .post(s.router.url("/generate"))
        .body(body.to_string())
        .send()
        .await?;
    let bytes = response.bytes().await?;
    let answer = crate::common::parse(&bytes)?;
    let experts = answer["meta_info"]["routed_experts"]
        .as_str()
        .context("routed_experts")?;
    assert!(
        experts.len() >= 16 << 20,
        "the client gets the whole answer"
    );
    let text = answer["text"].as_str().context("text")?;
    let retrieved = s.retrieve(&format!("{PROMPT}{text}")).await?;
    assert_eq!(
        ids(&retrieved["tokens"]),
        [s.encode(PROMPT)?, output].concat(),
        "the output was cached"
    );
    let metrics = s
        .router
        .client
        .get(s.router.url("/metrics"))
        .send()
        .await?
        .text()
        .await?;
    assert!(!metrics.contains("middleware_failures_total{"), "{metrics}");
    Ok(())
}

#[tokio::test]
async fn a_lost_cache_is_counted_and_shows_in_retrieval() -> Result<()> {
    // A 32 MiB body cannot be copied into a cache capped at 24 MiB: the call traps, the
    // request goes on without the cache (fail-open), and the instance, the cache with it, is
    // discarded. Retrieval must not then pass cached text off as prompt without a word.
    let tokenizer = Arc::new(Tokenizer::load(&fixture())?);
    let worker = mock_with(MockConfig {
        tokenizer: Some(tokenizer),
        ..MockConfig::default()
    })
    .await?;
    let url = worker.url();
    let r = router(|c| {
        c.worker_urls = vec![url];
        c.slime_router_middleware_paths = vec![RADIX_TREE.into()];
        c.hf_checkpoint = Some(fixture());
        c.middleware_memory_mib = 24;
    })
    .await?;
    let prompt = "<|im_start|>user\nTell me about the fox<|im_end|>\n";
    let (status, answer) = r.post("/generate", &json!({"text": prompt})).await?;
    assert_eq!(status, 200);
    let full = format!("{prompt}{}", answer["text"].as_str().unwrap_or_default());
    let (_, before) = r
        .post("/retrieve_from_text", &json!({"text": full}))
        .await?;
    assert!(
        before["cached_tokens"].as_u64().is_some_and(|n| n > 0),
        "{before}"
    );
    assert_eq!(before["cache_resets"], 0);

    let huge = format!("{{\"text\": \"{}", "x".repeat(32 << 20));
    let (status, _) = r.post_raw("/generate", huge).await?;
    assert_eq!(
        status, 400,
        "the worker, not the cache, refused the unfinished JSON"
    );
    let metrics = r.client.get(r.url("/metrics")).send().await?.text().await?;
    let lost = r#"slime_router_middleware_state_lost_total{middleware="radix-tree"}"#;
    assert_eq!(
        crate::common::metric(&metrics, lost),
        Some(1.0),
        "{metrics}"
    );

    let (_, after) = r
        .post("/retrieve_from_text", &json!({"text": full}))
        .await?;
    assert_eq!(after["cached_tokens"], 0, "{after}");
    assert_eq!(after["cache_resets"], 1, "{after}");
    Ok(())
}
