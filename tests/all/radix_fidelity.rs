//! The trajectory cache stays token-exact through the cases the RL loop produces (see each
//! test), under the shipped byte-level BPE and a WordPiece tokenizer the tests build.
//!
//! Every case runs once per tokenizer, as `<case>::bpe` and `<case>::wordpiece`: WordPiece
//! drops whitespace and joins words with spaces when decoding, so it reaches paths byte-level
//! BPE never does (text that tokenises to nothing, outputs whose text is not the sum of their
//! tokens' texts).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context as _, Result, anyhow, ensure};
use guest_artifacts::RADIX_TREE;
use mock_worker::{MockConfig, MockWorker, Seen, Tokenizer};
use serde_json::{Value, json};

use crate::common::{TestRouter, eventually, mock_with, mw, parse, router};

/// Runs `case(tokenizer)` as two tests, `case::bpe` and `case::wordpiece`.
macro_rules! under_both_tokenizers {
    ($case:ident) => {
        mod $case {
            #[tokio::test]
            async fn bpe() -> anyhow::Result<()> {
                super::$case(super::Vocab::Bpe).await
            }

            #[tokio::test]
            async fn wordpiece() -> anyhow::Result<()> {
                super::$case(super::Vocab::WordPiece).await
            }
        }
    };
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Vocab {
    /// tests/fixtures/tokenizer.json.
    Bpe,
    /// Built by [`wordpiece`].
    WordPiece,
}

/// Words the WordPiece vocabulary holds whole; any other word splits into characters.
const WORDS: &str = "user assistant Tell me about the fox The quick brown bro fox jumps over \
    lazy dog and keeps running far away It ran Then it slept then Foxes are A red Describe \
    picture more Never seen Question";

/// A tokenizer.json for one test: the fixture, or a WordPiece one written into a directory of
/// its own, removed on drop.
struct TokenizerFile {
    path: PathBuf,
    dir: Option<PathBuf>,
}

impl TokenizerFile {
    fn new(vocab: Vocab) -> Result<Self> {
        if vocab == Vocab::Bpe {
            let path =
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer.json");
            return Ok(Self { path, dir: None });
        }
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "slime-radix-fidelity-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        let file = Self {
            path: dir.join("tokenizer.json"),
            dir: Some(dir.clone()),
        };
        wordpiece(&dir, &file.path)?;
        Ok(file)
    }
}

impl Drop for TokenizerFile {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A BERT-style WordPiece tokenizer (no normaliser, so case and text are kept): every
/// printable ASCII character alone and as `##` continuation, so nothing is `[UNK]`, plus
/// [`WORDS`] whole, and the chat template's markers as special tokens.
fn wordpiece(dir: &Path, out: &Path) -> Result<()> {
    use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
    use tokenizers::models::wordpiece::WordPiece;
    use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
    use tokenizers::{AddedToken, Tokenizer};

    let mut vocab = vec!["[UNK]".to_owned()];
    for c in '!'..='~' {
        vocab.push(c.to_string());
        vocab.push(format!("##{c}"));
    }
    for word in WORDS.split_whitespace() {
        if !vocab.iter().any(|v| v == word) {
            vocab.push(word.to_owned());
        }
    }
    vocab.push("##wn".to_owned());
    let vocab_file = dir.join("vocab.txt");
    std::fs::write(&vocab_file, vocab.join("\n") + "\n")?;
    let model = WordPiece::from_file(vocab_file.to_str().context("temp path is not UTF-8")?)
        .unk_token("[UNK]".to_owned())
        .build()
        .map_err(|e| anyhow!("wordpiece: {e}"))?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
    tokenizer.with_decoder(Some(WordPieceDecoder::default()));
    tokenizer.add_special_tokens(&[
        AddedToken::from("<|im_start|>", true),
        AddedToken::from("<|im_end|>", true),
    ]);
    tokenizer
        .save(out, false)
        .map_err(|e| anyhow!("cannot save {}: {e}", out.display()))
}

struct Setup {
    tokenizer: Arc<Tokenizer>,
    worker: MockWorker,
    router: TestRouter,
    incremental: bool,
    _file: TokenizerFile,
}

/// A router with the radix cache in front of one mock worker, both on `vocab`'s tokenizer.
async fn setup(vocab: Vocab, mock: MockConfig) -> Result<Setup> {
    let file = TokenizerFile::new(vocab)?;
    let tokenizer = mock_worker::load_tokenizer(&file.path)?;
    let incremental = mock.incremental;
    let worker = mock_with(MockConfig {
        tokenizer: Some(tokenizer.clone()),
        ..mock
    })
    .await?;
    let (url, spec, path) = (worker.url(), mw(RADIX_TREE, ""), file.path.clone());
    let router = router(|c| {
        c.worker_urls = vec![url];
        c.slime_router_middleware_paths = vec![spec];
        c.hf_checkpoint = Some(path);
    })
    .await?;
    Ok(Setup {
        tokenizer,
        worker,
        router,
        incremental,
        _file: file,
    })
}

/// What one generation returned: a whole answer, or a stream's events put together.
#[derive(Debug, Default)]
struct Output {
    text: String,
    ids: Vec<u32>,
    logprobs: Vec<f64>,
    finish: Value,
}

impl Output {
    /// Takes in an answer or event: instead of what came before, or after it for the deltas
    /// of an incremental stream.
    fn absorb(&mut self, event: &Value, append: bool) {
        if !append {
            *self = Output::default();
        }
        self.text
            .push_str(event["text"].as_str().unwrap_or_default());
        self.ids.extend(ids(&event["output_ids"]));
        let logprobs = event["meta_info"]["output_token_logprobs"].as_array();
        self.logprobs
            .extend(logprobs.into_iter().flatten().filter_map(|e| e[0].as_f64()));
        self.finish = event["meta_info"]["finish_reason"].clone();
    }

    /// The logprobs as the cache stores them (f32).
    fn stored_logprobs(&self) -> Vec<f64> {
        self.logprobs.iter().map(|&l| l as f32 as f64).collect()
    }
}

/// Takes the whole `data:` events off the front of `pending`.
fn take_events(pending: &mut Vec<u8>) -> Result<Vec<Value>> {
    let Some(end) = pending.windows(2).rposition(|w| w == b"\n\n") else {
        return Ok(Vec::new());
    };
    let events: Vec<u8> = pending.drain(..end + 2).collect();
    std::str::from_utf8(&events)?
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|e| e.starts_with('{'))
        .map(|e| Ok(serde_json::from_str(e)?))
        .collect()
}

impl Setup {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(text).map_err(anyhow::Error::msg)
    }

    /// A `/generate` of `text` whose output is exactly `output`: what came back and the body
    /// the worker received.
    async fn turn(&self, text: &str, output: &[u32], stream: bool) -> Result<(Output, Value)> {
        self.worker.script_output(output.to_vec());
        let out = self.generate(&generate_body(text, stream)).await?;
        Ok((out, self.sent()?))
    }

    async fn generate(&self, body: &Value) -> Result<Output> {
        let (status, bytes) = self.router.post_raw("/generate", body.to_string()).await?;
        ensure!(
            status == 200,
            "{status}: {}",
            String::from_utf8_lossy(&bytes)
        );
        let mut out = Output::default();
        if body["stream"] == true {
            for event in take_events(&mut bytes.to_vec())? {
                out.absorb(&event, self.incremental);
            }
        } else {
            out.absorb(&parse(&bytes)?, false);
        }
        Ok(out)
    }

    /// The body of the last `/generate` the worker received.
    fn sent(&self) -> Result<Value> {
        parse(&self.last_generate()?.body)
    }

    /// The last `/generate` the worker received: the router's own probes (`/health`,
    /// `/get_model_info`) may have come after it.
    fn last_generate(&self) -> Result<Seen> {
        self.worker
            .seen()
            .into_iter()
            .rfind(|s| s.path_and_query == "/generate")
            .context("the worker saw no /generate")
    }

    async fn retrieve(&self, text: &str) -> Result<Value> {
        let (status, body) = self
            .router
            .post("/retrieve_from_text", &json!({"text": text}))
            .await?;
        ensure!(status == 200, "{status}: {body}");
        Ok(body)
    }

    async fn stats(&self) -> Result<Value> {
        Ok(self.router.get("/radix_tree/stats").await?.1)
    }
}

fn generate_body(text: &str, stream: bool) -> Value {
    json!({"text": text, "return_logprob": true, "stream": stream,
           "sampling_params": {"max_new_tokens": 64}})
}

fn ids(value: &Value) -> Vec<u32> {
    numbers(value).into_iter().map(|n| n as u32).collect()
}

fn numbers(value: &Value) -> Vec<u64> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

fn floats(value: &Value) -> Vec<f64> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

const PROMPT: &str = "<|im_start|>user\nTell me about the fox<|im_end|>\n<|im_start|>assistant\n";
const TURN_2: &str =
    "wn fox jumps<|im_end|>\n<|im_start|>user\nand then?<|im_end|>\n<|im_start|>assistant\n";

under_both_tokenizers!(a_turn_that_tokenises_to_nothing_is_still_rewritten);

/// A tool or user turn whose new text is only whitespace (nothing under WordPiece): the worker
/// still gets the cached tokens, and that turn's output is cached as model output.
async fn a_turn_that_tokenises_to_nothing_is_still_rewritten(vocab: Vocab) -> Result<()> {
    let s = setup(vocab, MockConfig::default()).await?;
    let output_1 = s.encode(" The quick brown fox")?;
    let (turn_1, _) = s.turn(PROMPT, &output_1, false).await?;
    for (separator, output) in [("\n", " It ran away."), (" ", " Then it slept.")] {
        let text = format!("{PROMPT}{}{separator}", turn_1.text);
        let (turn_2, sent) = s.turn(&text, &s.encode(output)?, false).await?;
        let exact = [s.encode(PROMPT)?, output_1.clone(), s.encode(separator)?].concat();
        ensure!(
            sent.get("text").is_none(),
            "{separator:?}: sent as text: {sent}"
        );
        ensure!(ids(&sent["input_ids"]) == exact, "{separator:?}: {sent}");

        let retrieved = s.retrieve(&format!("{text}{}", turn_2.text)).await?;
        ensure!(ids(&retrieved["tokens"]) == [&exact[..], &turn_2.ids].concat());
        let mask = numbers(&retrieved["loss_mask"]);
        let prompt = s.encode(PROMPT)?.len();
        let want: Vec<u64> = (0..mask.len())
            .map(|i| u64::from((prompt..prompt + output_1.len()).contains(&i) || i >= exact.len()))
            .collect();
        ensure!(mask == want, "{separator:?}: mask {mask:?}, want {want:?}");
        let logp = floats(&retrieved["rollout_logp"]);
        ensure!(
            logp[exact.len()..] == turn_2.stored_logprobs()[..],
            "{separator:?}: {logp:?}"
        );
    }
    Ok(())
}

under_both_tokenizers!(incremental_streams_are_cached);

/// With `--incremental-streaming-output` each event holds only the new tokens: the cache adds
/// them up, so the output is cached and the next turn reuses its tokens. Cumulative streams,
/// SGLang's default, still are too.
async fn incremental_streams_are_cached(vocab: Vocab) -> Result<()> {
    for incremental in [true, false] {
        let s = setup(
            vocab,
            MockConfig {
                incremental,
                ..MockConfig::default()
            },
        )
        .await?;
        let output_1 = s.encode(" The quick bro")?;
        let (turn_1, sent_1) = s.turn(PROMPT, &output_1, true).await?;
        ensure!(turn_1.ids == output_1, "the test reads the stream right");
        ensure!(ids(&sent_1["input_ids"]) == s.encode(PROMPT)?);

        let retrieved = s.retrieve(&format!("{PROMPT}{}", turn_1.text)).await?;
        let prompt = s.encode(PROMPT)?;
        let context = format!("incremental: {incremental}: {retrieved}");
        ensure!(
            ids(&retrieved["tokens"]) == [&prompt[..], &output_1].concat(),
            "{context}"
        );
        let ones = numbers(&retrieved["loss_mask"])
            .iter()
            .filter(|&&m| m == 1)
            .count();
        ensure!(ones == output_1.len(), "{context}");
        let logp = floats(&retrieved["rollout_logp"]);
        ensure!(
            logp[prompt.len()..] == turn_1.stored_logprobs()[..],
            "{context}"
        );

        let text_2 = format!("{PROMPT}{}{TURN_2}", turn_1.text);
        let (_, sent_2) = s.turn(&text_2, &s.encode(" It ran.")?, true).await?;
        let exact = [prompt, output_1, s.encode(TURN_2)?].concat();
        ensure!(
            ids(&sent_2["input_ids"]) == exact,
            "{context}: turn 2 sent {sent_2}"
        );
        let stats = s.stats().await?;
        ensure!(stats["responses_cached"] == 2, "{context}: {stats}");
        s.router.assert_counts_return_to_zero().await?;
    }
    Ok(())
}

under_both_tokenizers!(an_aborted_turn_resumes_token_exact);

/// A partial rollout: the turn is aborted mid-generation through the router, and resumed with
/// the prompt plus the partial text. The resumed request goes as the exact tokens, and the
/// partial tokens keep loss mask 1 and their logprobs.
async fn an_aborted_turn_resumes_token_exact(vocab: Vocab) -> Result<()> {
    for incremental in [false, true] {
        let s = setup(
            vocab,
            MockConfig {
                incremental,
                tokens_per_second: 20.0,
                ..MockConfig::default()
            },
        )
        .await?;
        let output = s.encode(" the quick brown fox jumps over the lazy dog and keeps running")?;
        let partial = s.abort_after(PROMPT, &output, 3).await?;
        let context = format!("incremental: {incremental}: {partial:?}");
        ensure!(partial.finish["type"] == "abort", "{context}");
        ensure!(
            partial.ids.len() >= 3 && partial.ids.len() < output.len(),
            "{context}"
        );
        ensure!(partial.ids == output[..partial.ids.len()], "{context}");
        eventually(5.0, async || {
            let stats = s.stats().await?;
            Ok(stats["responses_cached"].as_u64().unwrap_or(0)
                + stats["responses_skipped"].as_u64().unwrap_or(0)
                == 1)
        })
        .await?;

        let resumed = format!("{PROMPT}{}", partial.text);
        let rest = &output[partial.ids.len()..][..3];
        let (turn, sent) = s.turn(&resumed, rest, false).await?;
        let prompt = s.encode(PROMPT)?;
        let cached = [&prompt[..], &partial.ids].concat();
        ensure!(
            ids(&sent["input_ids"]) == cached,
            "{context}: resumed as {sent}"
        );

        let retrieved = s.retrieve(&format!("{resumed}{}", turn.text)).await?;
        ensure!(
            ids(&retrieved["tokens"]) == [&cached[..], rest].concat(),
            "{context}"
        );
        let mask = numbers(&retrieved["loss_mask"]);
        let want: Vec<u64> = (0..mask.len())
            .map(|i| u64::from(i >= prompt.len()))
            .collect();
        ensure!(mask == want, "{context}: mask {mask:?}");
        let logp = floats(&retrieved["rollout_logp"]);
        let want = [partial.stored_logprobs(), turn.stored_logprobs()].concat();
        ensure!(
            logp[prompt.len()..] == want[..],
            "{context}: logp {logp:?}, want {want:?}"
        );
    }
    Ok(())
}

impl Setup {
    /// Streams a generation of `text` (output `output`, paced by the mock) and aborts it
    /// through the router once `after` tokens have arrived; returns what it produced.
    async fn abort_after(&self, text: &str, output: &[u32], after: usize) -> Result<Output> {
        self.worker.script_output(output.to_vec());
        let mut body = generate_body(text, true);
        body["rid"] = json!("fidelity-abort-1");
        let mut response = self
            .router
            .client
            .post(self.router.url("/generate"))
            .body(body.to_string())
            .send()
            .await?;
        ensure!(response.status() == 200);
        let (mut pending, mut out, mut aborted) = (Vec::new(), Output::default(), false);
        while let Some(chunk) = response.chunk().await? {
            pending.extend_from_slice(&chunk);
            for event in take_events(&mut pending)? {
                out.absorb(&event, self.incremental);
            }
            if !aborted && out.ids.len() >= after {
                // By prefix, as SGLang matches rids.
                let (status, answer) = self
                    .router
                    .post("/abort_request", &json!({"rid": "fidelity-abort"}))
                    .await?;
                ensure!(status == 200, "{answer}");
                aborted = true;
            }
        }
        ensure!(aborted, "the stream ended before {after} tokens: {out:?}");
        Ok(out)
    }
}

under_both_tokenizers!(the_newest_weight_version_wins);

/// One text generated again after a weight update: the cached tokens take the newer
/// generation's logprobs, and a late answer of the older version does not take them back.
async fn the_newest_weight_version_wins(vocab: Vocab) -> Result<()> {
    let s = setup(
        vocab,
        MockConfig {
            weight_version: "1".to_owned(),
            ..MockConfig::default()
        },
    )
    .await?;
    let output = s.encode(" The fox ran far away.")?;
    let (v1, _) = s.turn(PROMPT, &output, false).await?;
    s.update_weights("2").await?;
    let (v2, _) = s.turn(PROMPT, &output, false).await?;
    ensure!(v2.text == v1.text && v2.ids == v1.ids, "same generation");
    ensure!(
        v2.logprobs != v1.logprobs,
        "the mock's logprobs follow the version"
    );
    let prompt = s.encode(PROMPT)?.len();
    let text = format!("{PROMPT}{}", v1.text);
    let logp = floats(&s.retrieve(&text).await?["rollout_logp"]);
    ensure!(
        logp[prompt..] == v2.stored_logprobs()[..],
        "{logp:?}, want version 2's"
    );

    // An engine still on version 1 answers late.
    s.update_weights("1").await?;
    let (late, _) = s.turn(PROMPT, &output, false).await?;
    ensure!(late.logprobs == v1.logprobs);
    let logp = floats(&s.retrieve(&text).await?["rollout_logp"]);
    ensure!(
        logp[prompt..] == v2.stored_logprobs()[..],
        "{logp:?}, want version 2's"
    );
    let stats = s.stats().await?;
    ensure!(stats["newest_version"] == "2", "{stats}");
    Ok(())
}

impl Setup {
    async fn update_weights(&self, version: &str) -> Result<()> {
        let body = json!({"model_path": "x", "weight_version": version});
        let (status, answer) = self.router.post("/update_weights_from_disk", &body).await?;
        ensure!(status == 200, "{answer}");
        ensure!(self.worker.weight_version() == version);
        Ok(())
    }
}

under_both_tokenizers!(multimodal_requests_pass_through_untouched);

/// SGLang expands image placeholders from `text`, so a request with image, video or audio
/// data reaches the worker byte for byte, is counted, and caches nothing a retrieve could
/// claim. A null field is no media.
async fn multimodal_requests_pass_through_untouched(vocab: Vocab) -> Result<()> {
    let s = setup(vocab, MockConfig::default()).await?;
    for (i, field) in ["image_data", "video_data", "audio_data"]
        .into_iter()
        .enumerate()
    {
        let text = format!("<|im_start|>user\n<image> Describe picture {i}<|im_end|>\n");
        let mut body = generate_body(&text, false);
        body[field] = json!(["data:image/png;base64,iVBORw0KGgo="]);
        let body = body.to_string();
        s.worker.script_output(s.encode(" A red fox.")?);
        let (status, answer) = s.router.post_raw("/generate", body.clone()).await?;
        ensure!(
            status == 200,
            "{field}: {}",
            String::from_utf8_lossy(&answer)
        );
        let seen = s.last_generate()?;
        ensure!(
            seen.body == body.as_bytes(),
            "{field}: sent {:?}",
            seen.body
        );

        let full = format!(
            "{text}{}",
            parse(&answer)?["text"].as_str().context("text")?
        );
        let retrieved = s.retrieve(&full).await?;
        ensure!(retrieved["cached_tokens"] == 0, "{field}: {retrieved}");
        ensure!(
            numbers(&retrieved["loss_mask"]).iter().all(|&m| m == 0),
            "{field}"
        );
    }
    let stats = s.stats().await?;
    ensure!(stats["multimodal_skipped"] == 3, "{stats}");
    ensure!(stats["responses_cached"] == 0, "{stats}");

    let mut body = generate_body(PROMPT, false);
    body["image_data"] = Value::Null;
    s.worker.script_output(s.encode(" ok")?);
    s.generate(&body).await?;
    let sent = s.sent()?;
    ensure!(ids(&sent["input_ids"]) == s.encode(PROMPT)?, "{sent}");
    ensure!(
        sent["image_data"].is_null() && sent.get("text").is_none(),
        "{sent}"
    );
    Ok(())
}

under_both_tokenizers!(retrieve_says_how_much_was_cached);

/// `cached_tokens` tells a miss (0) from a prompt-only text (all of it, mask 0), and from a
/// text with an uncached tail; slime's keys are unchanged.
async fn retrieve_says_how_much_was_cached(vocab: Vocab) -> Result<()> {
    let s = setup(vocab, MockConfig::default()).await?;
    let never = "<|im_start|>user\nNever seen<|im_end|>\n";
    let miss = s.retrieve(never).await?;
    ensure!(miss["cached_tokens"] == 0, "{miss}");
    ensure!(miss["token_length"] == s.encode(never)?.len(), "{miss}");

    let output = s.encode(" Foxes are quick.")?;
    let (turn, _) = s.turn(PROMPT, &output, false).await?;
    let prompt = s.encode(PROMPT)?.len();
    let whole = prompt + output.len();
    let full = s.retrieve(&format!("{PROMPT}{}", turn.text)).await?;
    ensure!(
        full["cached_tokens"] == whole && full["token_length"] == whole,
        "{full}"
    );
    let prompt_only = s.retrieve(PROMPT).await?;
    ensure!(prompt_only["cached_tokens"] == prompt, "{prompt_only}");
    ensure!(numbers(&prompt_only["loss_mask"]).iter().all(|&m| m == 0));
    let tail = s
        .retrieve(&format!("{PROMPT}{} and more", turn.text))
        .await?;
    ensure!(tail["cached_tokens"] == whole, "{tail}");
    ensure!(tail["token_length"].as_u64() > Some(whole as u64), "{tail}");

    // A prompt whose answer failed is cached without an output.
    let failed = "<|im_start|>user\nQuestion about the dog<|im_end|>\n";
    let response = s
        .router
        .client
        .post(s.router.url("/generate"))
        .header("x-mock-status", "500")
        .body(generate_body(failed, false).to_string())
        .send()
        .await?;
    ensure!(response.status() != 200);
    let retrieved = s.retrieve(failed).await?;
    ensure!(
        retrieved["cached_tokens"] == s.encode(failed)?.len(),
        "{retrieved}"
    );

    for key in ["tokens", "loss_mask", "rollout_logp"] {
        ensure!(
            full[key].as_array().map(Vec::len) == Some(whole),
            "{key}: {full}"
        );
    }
    ensure!(full["loss_mask_length"] == whole, "{full}");
    ensure!(
        full["response"] == format!("{PROMPT}{}", turn.text),
        "{full}"
    );
    Ok(())
}
