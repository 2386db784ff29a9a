//! The middleware flow against a fake tokenizer: ASCII chars are one token each, other chars
//! one token per UTF-8 byte (like byte-level BPE), a few words are one token (longest first,
//! so ` them` is one token, not ` the` + `m`), and `<|im_end|>` is a special token.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::*;

const EOS: u32 = 9_999;
const EOS_TEXT: &str = "<|im_end|>";
/// Word tokens, ids from 2000, longest first.
const WORDS: [&str; 3] = [" them", " the", " cat"];

fn word_id(word: usize) -> u32 {
    2_000 + word as u32
}

fn word_of(id: u32) -> Option<&'static str> {
    WORDS.get(id.checked_sub(2_000)? as usize).copied()
}

#[derive(Default)]
struct FakeHost {
    no_tokenizer: bool,
    /// Newlines tokenise to nothing, as whitespace does under WordPiece.
    silent_newlines: bool,
    counters: RefCell<BTreeMap<String, u64>>,
    gauges: RefCell<BTreeMap<String, i64>>,
    encoded: RefCell<Vec<String>>,
    decodes: Cell<usize>,
}

impl FakeHost {
    fn check(&self) -> Result<(), String> {
        if self.no_tokenizer {
            Err("no tokenizer configured".into())
        } else {
            Ok(())
        }
    }

    fn counter(&self, name: &str) -> u64 {
        self.counters.borrow().get(name).copied().unwrap_or(0)
    }
}

fn encode(text: &str) -> Vec<u32> {
    let mut ids = Vec::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if let Some(after) = rest.strip_prefix(EOS_TEXT) {
            ids.push(EOS);
            rest = after;
            continue;
        }
        if let Some(w) = WORDS.iter().position(|w| rest.starts_with(w)) {
            ids.push(word_id(w));
            rest = &rest[WORDS[w].len()..];
            continue;
        }
        if c.is_ascii() {
            ids.push(c as u32);
        } else {
            let mut buf = [0; 4];
            ids.extend(
                c.encode_utf8(&mut buf)
                    .bytes()
                    .map(|b| 1_000 + u32::from(b)),
            );
        }
        rest = &rest[c.len_utf8()..];
    }
    ids
}

impl Host for FakeHost {
    fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        self.check()?;
        self.encoded.borrow_mut().push(text.to_owned());
        if self.silent_newlines {
            return Ok(encode(&text.replace('\n', "")));
        }
        Ok(encode(text))
    }

    fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, String> {
        self.check()?;
        self.decodes.set(self.decodes.get() + 1);
        let mut bytes = Vec::new();
        for &id in ids {
            match (id, word_of(id)) {
                (EOS, _) if skip_special => {}
                (EOS, _) => bytes.extend_from_slice(EOS_TEXT.as_bytes()),
                (_, Some(word)) => bytes.extend_from_slice(word.as_bytes()),
                (0..=127, _) => bytes.push(id as u8),
                _ => bytes.push((id - 1_000) as u8),
            }
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn token_lengths(&self, ids: &[u32], skip_special: bool) -> Result<Vec<u32>, String> {
        self.check()?;
        Ok(ids
            .iter()
            .map(|&id| match (id, word_of(id)) {
                (EOS, _) if skip_special => 0,
                (EOS, _) => EOS_TEXT.len() as u32,
                (_, Some(word)) => word.len() as u32,
                _ => 1,
            })
            .collect())
    }

    fn debug(&self, _message: &str) {}

    fn counter_add(&self, name: &str, value: u64) {
        *self.counters.borrow_mut().entry(name.into()).or_default() += value;
    }

    fn gauge_set(&self, name: &str, value: i64) {
        self.gauges.borrow_mut().insert(name.into(), value);
    }
}

fn cache() -> Cache {
    Cache::new(Config::default(), 1)
}

fn generate(text: &str) -> Vec<u8> {
    json!({"text": text, "sampling_params": {"max_new_tokens": 16}})
        .to_string()
        .into_bytes()
}

/// A buffered SGLang response for `text` (+ EOS), with logprobs -0.5.
fn response(text: &str, version: &str) -> Vec<u8> {
    let mut ids = encode(text);
    ids.push(EOS);
    let lp: Vec<Value> = ids.iter().map(|&id| json!([-0.5, id, null])).collect();
    json!({
        "text": text,
        "output_ids": ids,
        "meta_info": {
            "finish_reason": {"type": "stop"},
            "weight_version": version,
            "output_token_logprobs": lp,
            "completion_tokens": ids.len(),
        }
    })
    .to_string()
    .into_bytes()
}

fn rewrite(outcome: RequestOutcome) -> (Vec<u32>, Vec<u8>) {
    match outcome {
        RequestOutcome::Rewrite { input_ids, stash } => (input_ids, stash),
        other => panic!("expected a rewrite, got {other:?}"),
    }
}

fn retrieve(cache: &Cache, host: &FakeHost, text: &str) -> (u16, Value) {
    let body = json!({ "text": text }).to_string();
    let reply = cache.handle("POST", "/retrieve_from_text", body.as_bytes(), host);
    let value = serde_json::from_slice(&reply.body).expect("JSON reply");
    (reply.status, value)
}

#[test]
fn multi_turn_rewrites_to_cached_ids() {
    let host = FakeHost::default();
    let mut cache = cache();
    let prompt = "Q: café?\n";
    let (ids, stash) = rewrite(cache.on_request(&generate(prompt), &host));
    assert_eq!(ids, encode(prompt), "a miss tokenises the whole text");
    cache.on_response(200, &response("Oui.", "3"), &stash, &host);
    assert_eq!(host.counter("radix_responses_cached"), 1);

    // Turn 2: the template writes the EOS out; the cached output keeps its real tokens.
    let turn2 = format!("{prompt}Oui.{EOS_TEXT}\nQ: more?\n");
    let (ids, stash) = rewrite(cache.on_request(&generate(&turn2), &host));
    let mut expect = encode(prompt);
    expect.extend(encode("Oui."));
    expect.push(EOS);
    expect.extend(encode("\nQ: more?\n"));
    assert_eq!(ids, expect, "cached prefix + tail, EOS not doubled");
    assert_eq!(
        host.encoded.borrow().last().map(String::as_str),
        Some("\nQ: more?\n"),
        "only the uncached tail is tokenised"
    );
    cache.on_response(200, &response("Non.", "3"), &stash, &host);

    // slime retrieves prompt + output text: tokens, mask and logprobs line up.
    let full = format!("{turn2}Non.");
    let (status, body) = retrieve(&cache, &host, &full);
    assert_eq!(status, 200);
    let mut tokens = expect.clone();
    tokens.extend(encode("Non."));
    tokens.push(EOS);
    assert_eq!(body["tokens"], json!(tokens));
    let n = tokens.len();
    let mask: Vec<u8> = (0..n)
        .map(|i| {
            let out1 = encode(prompt).len()..encode(prompt).len() + 5;
            let out2 = n - 5..n;
            u8::from(out1.contains(&i) || out2.contains(&i))
        })
        .collect();
    assert_eq!(body["loss_mask"], json!(mask));
    assert_eq!(body["token_length"], json!(n));
    assert_eq!(body["loss_mask_length"], json!(n));
    assert_eq!(body["response"], json!(full));
    let logp = body["rollout_logp"].as_array().expect("array");
    assert_eq!(logp.len(), n);
    assert_eq!(logp[n - 1], json!(-0.5));
    assert_eq!(logp[0], json!(0.0));
    let keys: Vec<&String> = body.as_object().expect("object").keys().collect();
    assert_eq!(
        keys.len(),
        8,
        "the keys slime reads, cached_tokens and cache_resets, got {keys:?}"
    );
    assert_eq!(body["cached_tokens"], json!(n));
    assert_eq!(body["cache_resets"], json!(0));
    assert!(host.counter("radix_hits") >= 1 && host.counter("radix_misses") == 1);
    assert!(host.gauges.borrow()["radix_tokens"] > 0);
}

#[test]
fn retrieve_is_read_only_and_tokenises_the_rest() {
    let host = FakeHost::default();
    let mut cache = cache();
    let (_, stash) = rewrite(cache.on_request(&generate("abc"), &host));
    cache.on_response(200, &response("de", "1"), &stash, &host);
    let before = cache.tree().stats();
    let (status, body) = retrieve(&cache, &host, "abcdeXY");
    assert_eq!(status, 200);
    assert_eq!(
        cache.tree().stats(),
        before,
        "no hit counted, nothing inserted"
    );
    let mut tokens = encode("abcde");
    tokens.push(EOS);
    tokens.extend(encode("XY"));
    assert_eq!(body["tokens"], json!(tokens));
    assert_eq!(body["loss_mask"], json!([0, 0, 0, 1, 1, 1, 0, 0]));

    // Uncached remainder without a tokenizer: 503 naming the flag.
    let none = FakeHost {
        no_tokenizer: true,
        ..FakeHost::default()
    };
    let (status, body) = retrieve(&cache, &none, "abcdeXY");
    assert_eq!(status, 503);
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("--hf-checkpoint"))
    );
    // Fully cached: no tokenizer needed.
    assert_eq!(retrieve(&cache, &none, "abcde").0, 200);
}

#[test]
fn retrieve_rejects_bad_bodies() {
    let host = FakeHost::default();
    let cache = cache();
    for body in [
        &b"not json"[..],
        b"{}",
        br#"{"text": 5}"#,
        br#"{"text": ""}"#,
        b"[]",
    ] {
        let reply = cache.handle("POST", "/retrieve_from_text", body, &host);
        assert_eq!(reply.status, 400, "{}", String::from_utf8_lossy(body));
        let v: Value = serde_json::from_slice(&reply.body).expect("JSON");
        assert!(v["error"].is_string());
    }
    assert_eq!(cache.handle("GET", "/nope", b"", &host).status, 404);
    let stats = cache.handle("GET", "/radix_tree/stats?x=1", b"", &host);
    assert_eq!(stats.status, 200);
    let v: Value = serde_json::from_slice(&stats.body).expect("JSON");
    assert_eq!(v["max_tokens"], json!(4_000_000));
    assert_eq!(v["keep_versions"], json!(3));
}

#[test]
fn passes_through_what_it_cannot_handle() {
    let host = FakeHost::default();
    let mut cache = cache();
    for body in [
        &br#"{"text": ["a", "b"]}"#[..],
        br#"{"input_ids": [[1], [2]]}"#,
        br#"{"text": ""}"#,
        br#"{"text": "a", "input_ids": [1]}"#,
        br#"{"sampling_params": {}}"#,
        b"[1, 2]",
        b"garbage",
    ] {
        assert_eq!(cache.on_request(body, &host), RequestOutcome::Pass);
    }
    let none = FakeHost {
        no_tokenizer: true,
        ..FakeHost::default()
    };
    assert_eq!(
        cache.on_request(&generate("hello"), &none),
        RequestOutcome::Pass
    );
    // No stash, no caching; a foreign stash is ignored.
    cache.on_response(200, &response("x", "1"), &[], &host);
    cache.on_response(200, &response("x", "1"), &[7, 7], &host);
    assert_eq!(cache.tree().stats().tokens, 0);
}

#[test]
fn input_ids_requests_are_recorded() {
    let host = FakeHost::default();
    let mut cache = cache();
    let ids = encode("héllo ");
    let body = json!({ "input_ids": ids }).to_string();
    let RequestOutcome::Record { stash } = cache.on_request(body.as_bytes(), &host) else {
        panic!("expected record");
    };
    cache.on_response(200, &response("world", "1"), &stash, &host);
    let (_, v) = retrieve(&cache, &host, "héllo world");
    let mut tokens = ids.clone();
    tokens.extend(encode("world"));
    tokens.push(EOS);
    assert_eq!(v["tokens"], json!(tokens));
    // é's two byte tokens are one piece: a retrieve stops after it, never between them.
    let (_, v) = retrieve(&cache, &host, "hé!");
    assert_eq!(v["tokens"], json!(encode("hé!")));
    assert_eq!(
        host.encoded.borrow().last().map(String::as_str),
        Some("!"),
        "h and é came from the cache"
    );
    // A later text request continuing the recorded trajectory reuses its tokens.
    let (input_ids, _) = rewrite(cache.on_request(&generate("héllo world!"), &host));
    assert_eq!(input_ids, [&tokens[..], &encode("!")].concat());
    assert_eq!(
        host.encoded.borrow().last().map(String::as_str),
        Some("!"),
        "prompt and output came from the cache"
    );
    // One that stops inside the recorded prompt is tokenised whole.
    let (input_ids, _) = rewrite(cache.on_request(&generate("hé?"), &host));
    assert_eq!(input_ids, encode("hé?"));
    assert_eq!(
        host.encoded.borrow().last().map(String::as_str),
        Some("hé?")
    );
}

#[test]
fn caches_aborts_and_skips_errors_and_evicted_prompts() {
    let host = FakeHost::default();
    let mut cache = Cache::new(
        Config {
            max_tokens: 20,
            keep_versions: None,
        },
        1,
    );
    let (_, stash) = rewrite(cache.on_request(&generate("abc"), &host));
    let aborted = json!({"text": "x", "output_ids": [120],
        "meta_info": {"finish_reason": {"type": "abort"}}});
    // A partial output: a resumed request (prompt + partial text) reuses its tokens.
    cache.on_response(200, aborted.to_string().as_bytes(), &stash, &host);
    assert_eq!(host.counter("radix_responses_cached"), 1);
    assert_eq!(
        retrieve(&cache, &host, "abcx").1["loss_mask"],
        json!([0, 0, 0, 1])
    );
    cache.on_response(500, br#"{"error": "x"}"#, &stash, &host);
    cache.on_response(200, b"not json", &stash, &host);
    assert_eq!(host.counter("radix_responses_skipped"), 2);
    // A long prompt pushes "abc" out of the 20-token budget before its response arrives.
    let (_, _) = rewrite(cache.on_request(&generate(&"z".repeat(18)), &host));
    cache.on_response(200, &response("de", "1"), &stash, &host);
    assert_eq!(host.counter("radix_responses_skipped"), 3);
    assert_eq!(host.counter("radix_responses_cached"), 1);
}

#[test]
fn stop_string_trimmed_output_is_one_piece() {
    let host = FakeHost::default();
    let mut cache = cache();
    let (_, stash) = rewrite(cache.on_request(&generate("Q"), &host));
    // The ids include a stop string "END" that the text does not.
    let ids = encode("okEND");
    let body = json!({"text": "ok", "output_ids": ids, "meta_info": {"weight_version": 7}});
    cache.on_response(200, body.to_string().as_bytes(), &stash, &host);
    assert_eq!(host.counter("radix_responses_cached"), 1);
    let (_, v) = retrieve(&cache, &host, "Qok");
    let mut tokens = encode("Q");
    tokens.extend(&ids);
    assert_eq!(v["tokens"], json!(tokens), "whole piece, all ids");
    // Only the whole output matches: "Qo" is not a piece boundary.
    let (_, v) = retrieve(&cache, &host, "Qo");
    assert_eq!(v["tokens"], json!(encode("Qo")));
    assert_eq!(cache.tree().newest_version(), Some("7"));
}

#[test]
fn outputs_decode_only_when_the_lengths_fit() {
    let host = FakeHost::default();
    let mut cache = cache();
    let (_, stash) = rewrite(cache.on_request(&generate("Q"), &host));
    // A stop string trimmed from the text: neither mode's lengths add up, so no decode.
    let body = json!({"text": "ok", "output_ids": encode("okEND"), "meta_info": {}});
    cache.on_response(200, body.to_string().as_bytes(), &stash, &host);
    assert_eq!(host.decodes.get(), 0);
    assert_eq!(host.counter("radix_responses_cached"), 1);
    // The usual output: one decode proves the split.
    let (_, stash) = rewrite(cache.on_request(&generate("R"), &host));
    cache.on_response(200, &response("de", "1"), &stash, &host);
    assert_eq!(host.decodes.get(), 1);
    let (_, v) = retrieve(&cache, &host, "Rd");
    assert_eq!(v["loss_mask"], json!([0, 1]), "split per token");
    // The lengths fit with specials kept: decoded both ways, as before.
    let (_, stash) = rewrite(cache.on_request(&generate("S"), &host));
    let mut ids = encode("x");
    ids.push(EOS);
    let body = json!({"text": format!("x{EOS_TEXT}"), "output_ids": ids});
    cache.on_response(200, body.to_string().as_bytes(), &stash, &host);
    assert_eq!(host.decodes.get(), 3);
    let (_, v) = retrieve(&cache, &host, "Sx");
    assert_eq!(v["tokens"], json!(encode("Sx")), "x is its own piece");
}

#[test]
fn text_that_is_not_utf8_passes_untouched() {
    let host = FakeHost::default();
    let mut cache = cache();
    let (_, stash) = rewrite(cache.on_request(&generate("cached "), &host));
    cache.on_response(200, &response("out", "1"), &stash, &host);
    let before = cache.tree().stats();
    // Bad bytes in the uncached rest, raw or after an escape; or the whole text uncached.
    for body in [
        &b"{\"text\": \"cached out\xff\"}"[..],
        b"{\"text\": \"cached out\\n\xc3(\"}",
        b"{\"text\": \"\xe2\x82\"}",
    ] {
        assert_eq!(cache.on_request(body, &host), RequestOutcome::Pass);
        assert!(
            serde_json::from_slice::<Value>(body).is_err(),
            "serde_json refuses it too"
        );
    }
    assert_eq!(cache.tree().stats(), before, "no hit, miss or insert");
    // A multi-byte character right after the cached prefix is fine.
    let (ids, _) = rewrite(cache.on_request(&generate("cached outé"), &host));
    assert_eq!(ids.len(), encode("cached out").len() + 1 + 2);
}

#[test]
fn responses_serde_json_reads_are_cached_the_same() {
    // The fast reader leaves `\u` surrogates to serde_json: same tree either way.
    let host = FakeHost::default();
    let mut fast = cache();
    let mut slow = cache();
    for (cache, escaped) in [(&mut fast, false), (&mut slow, true)] {
        let (_, stash) = rewrite(cache.on_request(&generate("Q"), &host));
        let mut body = String::from_utf8(response("a🦀", "1")).expect("UTF-8");
        if escaped {
            body = body.replace('🦀', "\\ud83e\\udd80");
        }
        assert_eq!(sglang::output(body.as_bytes()).is_none(), escaped);
        cache.on_response(200, body.as_bytes(), &stash, &host);
    }
    assert_eq!(host.counter("radix_responses_cached"), 2);
    assert_eq!(
        retrieve(&fast, &host, "Qa🦀"),
        retrieve(&slow, &host, "Qa🦀")
    );
    assert_eq!(fast.tree().stats(), slow.tree().stats());
}

#[test]
fn batch_outputs_share_the_prompt() {
    let host = FakeHost::default();
    let mut cache = cache();
    let (_, stash) = rewrite(cache.on_request(&generate("P:"), &host));
    let a: Value = serde_json::from_slice(&response("aa", "1")).expect("json");
    let b: Value = serde_json::from_slice(&response("bb", "1")).expect("json");
    let list = Value::Array(vec![a, b]).to_string();
    cache.on_response(200, list.as_bytes(), &stash, &host);
    assert_eq!(host.counter("radix_responses_cached"), 2);
    for out in ["aa", "bb"] {
        let (_, v) = retrieve(&cache, &host, &format!("P:{out}"));
        assert_eq!(v["loss_mask"], json!([0, 0, 1, 1, 1]));
    }
}

#[test]
fn streamed_responses_cache_the_last_event() {
    let host = FakeHost::default();
    let mut cache = cache();
    let (_, stash) = rewrite(cache.on_request(&generate("S:"), &host));
    let event = |text: &str, done: bool| {
        let mut ids = encode(text);
        if done {
            ids.push(EOS);
        }
        let lp: Vec<Value> = ids.iter().map(|&id| json!([-1.0, id, null])).collect();
        let finish = if done {
            json!({"type": "stop"})
        } else {
            Value::Null
        };
        let e = json!({"text": text, "output_ids": ids, "meta_info": {
            "output_token_logprobs": lp, "finish_reason": finish,
            "completion_tokens": ids.len()}});
        format!("data: {e}\n\n")
    };
    let mut stash = stash;
    let chunks = [event("h", false), event("hé", false) + &event("hé!", true)];
    for chunk in &chunks {
        if let Some(next) = cache.on_chunk(chunk.as_bytes(), false, &stash, &host) {
            stash = next;
        }
    }
    assert_eq!(
        cache.tree().stats().inserted_tokens,
        2,
        "nothing cached mid-stream"
    );
    assert_eq!(
        cache.on_chunk(b"data: [DONE]\n\n", true, &stash, &host),
        None
    );
    let (_, v) = retrieve(&cache, &host, "S:hé!");
    let mut tokens = encode("S:hé!");
    tokens.push(EOS);
    assert_eq!(v["tokens"], json!(tokens));
    assert_eq!(v["rollout_logp"][6], json!(-1.0));

    // Events that do not add up to `completion_tokens` are refused rather than cached wrongly.
    let (_, stash) = rewrite(cache.on_request(&generate("T:"), &host));
    let delta = json!({"text": "x", "output_ids": [120], "meta_info": {"completion_tokens": 9}});
    let stash = cache
        .on_chunk(
            format!("data: {delta}\n\n").as_bytes(),
            false,
            &stash,
            &host,
        )
        .expect("stash");
    cache.on_chunk(b"", true, &stash, &host);
    assert_eq!(host.counter("radix_responses_skipped"), 1);
}

#[test]
fn incremental_streams_add_up_their_deltas() {
    let host = FakeHost::default();
    let mut cache = cache();
    let (_, mut stash) = rewrite(cache.on_request(&generate("S:"), &host));
    let delta = |text: &str, total: usize| {
        let ids = encode(text);
        let lp: Vec<Value> = ids.iter().map(|&id| json!([-1.0, id, null])).collect();
        let e = json!({"text": text, "output_ids": ids, "meta_info": {
            "output_token_logprobs": lp, "completion_tokens": total, "weight_version": "3"}});
        format!("data: {e}\n\n")
    };
    for chunk in [delta("h", 1), delta("é", 3) + &delta("!", 4)] {
        if let Some(next) = cache.on_chunk(chunk.as_bytes(), false, &stash, &host) {
            stash = next;
        }
    }
    assert_eq!(
        cache.on_chunk(b"data: [DONE]\n\n", true, &stash, &host),
        None
    );
    assert_eq!(host.counter("radix_responses_cached"), 1);
    let (_, v) = retrieve(&cache, &host, "S:hé!");
    assert_eq!(v["tokens"], json!(encode("S:hé!")));
    assert_eq!(v["loss_mask"], json!([0, 0, 1, 1, 1, 1]));
    assert_eq!(v["rollout_logp"][5], json!(-1.0));
}

#[test]
fn a_tail_with_no_tokens_goes_as_the_cached_ids() {
    let host = FakeHost {
        silent_newlines: true,
        ..FakeHost::default()
    };
    let mut cache = cache();
    let (_, stash) = rewrite(cache.on_request(&generate("P:"), &host));
    cache.on_response(200, &response("ab", "1"), &stash, &host);
    let (input_ids, stash) = rewrite(cache.on_request(&generate("P:ab\n"), &host));
    let cached = [encode("P:ab"), vec![EOS]].concat();
    assert_eq!(input_ids, cached);
    // The newline joins the output's first piece, so the whole text is found.
    cache.on_response(200, &response("cd", "1"), &stash, &host);
    let (_, v) = retrieve(&cache, &host, "P:ab\ncd");
    assert_eq!(
        v["tokens"],
        json!([cached, encode("cd"), vec![EOS]].concat())
    );
    assert_eq!(v["loss_mask"], json!([0, 0, 1, 1, 1, 1, 1, 1]));
    assert_eq!(v["cached_tokens"], json!(8));
    // Nothing to send at all: SGLang gets the text.
    assert_eq!(
        cache.on_request(&generate("\n"), &host),
        RequestOutcome::Pass
    );
}

#[test]
fn media_requests_pass_through_and_are_counted() {
    let host = FakeHost::default();
    let mut cache = cache();
    for field in ["image_data", "video_data", "audio_data"] {
        let fast = json!({"text": "<image> what?", field: ["data:image/png;base64,AA=="]});
        // serde_json reads this one: the fast reader leaves `input_ids` to it.
        let slow = json!({"input_ids": [1, 2], field: "x"});
        for body in [fast, slow] {
            let body = body.to_string();
            assert_eq!(
                cache.on_request(body.as_bytes(), &host),
                RequestOutcome::Pass
            );
        }
    }
    assert_eq!(host.counter("radix_multimodal_skipped"), 6);
    assert_eq!(cache.tree().stats().tokens, 0);
    let stats: Value =
        serde_json::from_slice(&cache.handle("GET", "/radix_tree/stats", b"", &host).body)
            .expect("JSON");
    assert_eq!(stats["multimodal_skipped"], json!(6));
    // A null field is no media.
    let body = json!({"text": "hi", "image_data": null}).to_string();
    rewrite(cache.on_request(body.as_bytes(), &host));
}

#[test]
fn versions_flow_from_responses() {
    let host = FakeHost::default();
    let mut cache = Cache::new(
        Config {
            max_tokens: 1_000,
            keep_versions: Some(1),
        },
        1,
    );
    let (_, s1) = rewrite(cache.on_request(&generate("A"), &host));
    cache.on_response(200, &response("a", "1"), &s1, &host);
    let (_, s2) = rewrite(cache.on_request(&generate("B"), &host));
    cache.on_response(200, &response("b", "2"), &s2, &host);
    // Version 2 is the only one kept: "A..." (prompt and output at version 1) is gone.
    assert_eq!(retrieve(&cache, &host, "Aa").1["loss_mask"], json!([0, 0]));
    assert_eq!(
        retrieve(&cache, &host, "Bb").1["loss_mask"],
        json!([0, 1, 1])
    );
    assert!(host.counter("radix_version_evicted_tokens") > 0);
}

#[test]
fn rewrite_never_cuts_inside_another_segment() {
    let host = FakeHost::default();
    let mut cache = cache();
    // Turn 1 of a conversation: prompt, then the model's output " the cat" + EOS.
    let prompt = "U: pets?\nA:";
    let (ids, stash) = rewrite(cache.on_request(&generate(prompt), &host));
    assert_eq!(ids, encode(prompt));
    cache.on_response(200, &response(" the cat", "1"), &stash, &host);
    let mut output = encode(" the cat");
    assert_eq!(output, [word_id(1), word_id(2)]);
    output.push(EOS);

    // " the" is cached inside that output, but "them" must not become " the" + "m": the
    // prefix backs off to the end of the prompt, and " them" is tokenised fresh.
    let them = format!("{prompt} them all");
    assert_eq!(
        cache.tree().lookup_read_only(&them).len,
        prompt.len() + 4,
        "the piece-boundary match stops after \" the\""
    );
    let (ids, _) = rewrite(cache.on_request(&generate(&them), &host));
    assert_eq!(ids, encode(&them));
    assert!(ids.contains(&word_id(0)), "\" them\" is one token");
    assert_eq!(
        host.encoded.borrow().last().map(String::as_str),
        Some(" them all"),
        "the prompt came from the cache, the rest was tokenised"
    );
    // With no segment end on the path, the whole text is tokenised.
    let (ids, _) = rewrite(cache.on_request(&generate("U: pet"), &host));
    assert_eq!(ids, encode("U: pet"));
    assert_eq!(
        host.encoded.borrow().last().map(String::as_str),
        Some("U: pet")
    );

    // A true multi-turn continuation still reuses the prompt and the output's own tokens,
    // EOS included and not doubled.
    let turn2 = format!("{prompt} the cat{EOS_TEXT}\nU: more?\nA:");
    let (ids, stash) = rewrite(cache.on_request(&generate(&turn2), &host));
    let mut expect = encode(prompt);
    expect.extend(&output);
    expect.extend(encode("\nU: more?\nA:"));
    assert_eq!(ids, expect);
    assert_eq!(
        host.encoded.borrow().last().map(String::as_str),
        Some("\nU: more?\nA:")
    );
    cache.on_response(200, &response(" them", "1"), &stash, &host);

    // Another second turn: the longest piece match runs into the first one's "\nU: m", so
    // it backs off to the end of the output; the EOS seam guard still holds there.
    let other = format!("{prompt} the cat{EOS_TEXT}\nU: mine?\nA:");
    let output_end = prompt.len() + " the cat".len();
    assert_eq!(
        cache.tree().lookup_read_only(&other).len,
        output_end + EOS_TEXT.len() + "\nU: m".len()
    );
    let (ids, _) = rewrite(cache.on_request(&generate(&other), &host));
    let mut expect = encode(prompt);
    expect.extend(&output);
    expect.extend(encode("\nU: mine?\nA:"));
    assert_eq!(ids, expect);
    assert_eq!(
        host.encoded.borrow().last().map(String::as_str),
        Some("\nU: mine?\nA:")
    );

    // Turn 3 of the first conversation: everything up to turn 2's output is reused.
    let turn3 = format!("{turn2} them{EOS_TEXT}\nU: ok\nA:");
    let (ids, _) = rewrite(cache.on_request(&generate(&turn3), &host));
    let mut expect = encode(&turn2);
    expect.extend([word_id(0), EOS]);
    expect.extend(encode("\nU: ok\nA:"));
    assert_eq!(ids, expect);
    assert_eq!(
        host.encoded.borrow().last().map(String::as_str),
        Some("\nU: ok\nA:")
    );

    // /retrieve_from_text still returns the stored tokens wherever the cached text stops.
    let (_, v) = retrieve(&cache, &host, &format!("{prompt} the"));
    let mut tokens = encode(prompt);
    tokens.push(word_id(1));
    assert_eq!(v["tokens"], json!(tokens));
    assert_eq!(
        v["loss_mask"][tokens.len() - 1],
        json!(1),
        "the output's token"
    );
}

#[test]
fn samples_of_one_prompt_share_it() {
    let host = FakeHost::default();
    let mut cache = cache();
    let prompt = "Q: name the cat";
    let (first, _) = rewrite(cache.on_request(&generate(prompt), &host));
    let encoded = host.encoded.borrow().len();
    let inserted = cache.tree().stats().inserted_tokens;
    for _ in 0..3 {
        let (ids, _) = rewrite(cache.on_request(&generate(prompt), &host));
        assert_eq!(ids, first);
    }
    assert_eq!(host.encoded.borrow().len(), encoded, "no tokenisation");
    assert_eq!(cache.tree().stats().inserted_tokens, inserted);
}

#[test]
fn stashes_of_an_earlier_cache_are_ignored() {
    let host = FakeHost::default();
    let config = Config::default();
    let mut old = Cache::new(config, 1);
    let (_, stash) = rewrite(old.on_request(&generate("abc"), &host));
    // The instance is rebuilt: the new cache's first node takes the same slot.
    let mut new = Cache::new(config, 2);
    let (_, mine) = rewrite(new.on_request(&generate("xyz"), &host));
    let node = |stash: &[u8]| Stash::parse(stash).map(|s| s.node);
    assert_eq!(node(&stash), node(&mine), "same node ref");
    let tokens = new.tree().stats().tokens;
    new.on_response(200, &response("de", "1"), &stash, &host);
    assert_eq!(
        new.tree().stats().tokens,
        tokens,
        "nothing cached below \"xyz\""
    );
    assert_eq!(host.counter("radix_responses_skipped"), 1);
    // The same for a stream.
    let event = format!(
        "data: {}\n\n",
        String::from_utf8_lossy(&response("de", "1"))
    );
    assert_eq!(new.on_chunk(event.as_bytes(), false, &stash, &host), None);
    assert_eq!(new.on_chunk(b"", true, &stash, &host), None);
    assert_eq!(new.tree().stats().tokens, tokens);
    assert_eq!(host.counter("radix_responses_skipped"), 2);
    // Its own stash still works.
    new.on_response(200, &response("de", "1"), &mine, &host);
    assert_eq!(host.counter("radix_responses_cached"), 1);
}

#[test]
fn first_publish_sets_every_gauge() {
    let host = FakeHost::default();
    // What a failed instance left.
    host.gauge_set("radix_tokens", 12_345);
    host.gauge_set("radix_nodes", 67);
    let mut cache = cache();
    cache.publish(&host);
    let gauges = host.gauges.borrow().clone();
    assert_eq!(gauges["radix_tokens"], 0);
    assert_eq!(gauges["radix_nodes"], 0);
    assert!(gauges["radix_memory_bytes"] > 0);
    assert!(host.counters.borrow().is_empty(), "no counter moved");
}

/// A tokenizer for the benchmark: one token per 4 bytes of ASCII text, like English BPE.
struct ChunkHost;

impl Host for ChunkHost {
    fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        Ok(text
            .as_bytes()
            .chunks(4)
            .map(|c| {
                c.iter()
                    .fold(0u32, |h, &b| h.wrapping_mul(31) + u32::from(b))
                    % 150_000
            })
            .collect())
    }

    fn decode(&self, _ids: &[u32], _skip_special: bool) -> Result<String, String> {
        Err("not needed".into())
    }

    fn token_lengths(&self, ids: &[u32], _skip_special: bool) -> Result<Vec<u32>, String> {
        // Exact for all but the last chunk; the sum check makes a short tail one piece.
        Ok(vec![4; ids.len()])
    }

    fn debug(&self, _message: &str) {}
    fn counter_add(&self, _name: &str, _value: u64) {}
    fn gauge_set(&self, _name: &str, _value: i64) {}
}

/// `on_request` for /generate at ~1k and ~32k cached tokens with a new 12-token user turn:
/// parse, lookup, prefix ids, tokenise and insert the tail, metrics. Run with
/// `cargo test --release --lib -- --ignored --nocapture bench`.
#[test]
#[ignore = "benchmark"]
fn bench_on_request() {
    use std::time::{Duration, Instant};
    for &tokens in &[1_000usize, 32_000] {
        // Chat-like text with newlines, so the JSON string has escapes like real prompts.
        let turn = "<|im_start|>assistant\nThe answer is forty two, because the numbers say so.\n";
        let mut history = String::new();
        while history.len() < tokens * 4 {
            history.push_str(turn);
        }
        let build = || {
            let mut cache = cache();
            let (_, stash) = rewrite(cache.on_request(&generate(&history), &ChunkHost));
            cache.on_response(200, br#"{"text":"","output_ids":[]}"#, &stash, &ChunkHost);
            cache
        };
        let (batches, per_batch) = if tokens > 10_000 { (10, 20) } else { (50, 20) };
        let mut total = Duration::ZERO;
        let mut ids_len = 0;
        for _ in 0..batches {
            let mut cache = build();
            let bodies: Vec<Vec<u8>> = (0..per_batch)
                .map(|r| generate(&format!("{history}<|im_start|>user\nq{r:03}\n")))
                .collect();
            let start = Instant::now();
            for body in &bodies {
                let (ids, _) = rewrite(cache.on_request(body, &ChunkHost));
                ids_len = ids.len();
            }
            total += start.elapsed();
        }
        let per = total / (batches * per_batch) as u32;
        println!(
            "on_request, {ids_len} tokens ({} KB body): {per:?}",
            generate(&history).len() / 1024
        );
    }
}
