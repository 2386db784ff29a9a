//! One middleware call through the pipeline: the no-op guest (the floor cost of the wasm
//! boundary) and the radix cache's /generate rewrite with 1k and 32k cached tokens.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::Request;
use slime_router::metrics::Metrics;
use slime_router::middleware::{Exchange, Pipeline, PipelineOptions};
use slime_router::pool::Pool;
use slime_router::tokenizer::Tokenizer;

fn exchange(body: &str) -> Exchange {
    let request = Request::post("/generate")
        .header("content-type", "application/json")
        .header("user-agent", "bench")
        .header("accept", "*/*")
        .body(())
        .unwrap_or_default();
    let (parts, ()) = request.into_parts();
    Exchange::new(1, parts, Bytes::from(body.to_owned()))
}

fn pipeline(
    rt: &tokio::runtime::Runtime,
    middleware: String,
    tokenizer: Option<Arc<Tokenizer>>,
) -> Pipeline {
    let options = PipelineOptions::new(vec![middleware]);
    let metrics = Arc::new(Metrics::new());
    let pool = Arc::new(Pool::new(metrics.clone()));
    match rt.block_on(Pipeline::load(&options, pool, metrics, tokenizer)) {
        Ok(pipeline) => pipeline,
        Err(e) => panic!("cannot load middleware: {e:#}"),
    }
}

/// A prompt of about `tokens` tokens of the fixture tokenizer.
fn prompt(tokens: usize) -> String {
    let words = "the quick brown fox jumps over the lazy dog and keeps running far away";
    let body: Vec<&str> = words.split(' ').cycle().take(tokens).collect();
    format!(
        "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
        body.join(" ")
    )
}

fn calls(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let noop = pipeline(&rt, guest_artifacts::NOOP.to_owned(), None);
    let body = r#"{"text":"hello","sampling_params":{"max_new_tokens":16},"stream":false}"#;
    c.bench_function("middleware_call/noop_on_request", |b| {
        b.iter_batched(
            || exchange(body),
            |mut ex| rt.block_on(noop.on_request(&mut ex)),
            BatchSize::SmallInput,
        )
    });

    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer.json");
    let tokenizer = Tokenizer::load(&fixture).map(Arc::new).ok();
    let radix = pipeline(&rt, guest_artifacts::RADIX_TREE.to_owned(), tokenizer);
    for tokens in [1_000, 32_000] {
        let prompt = prompt(tokens);
        // The first request caches the prompt (as the worker will see it); later turns reuse it.
        let first = serde_json::json!({"text": prompt}).to_string();
        let _ = rt.block_on(radix.on_request(&mut exchange(&first)));
        let turn =
            serde_json::json!({"text": format!("{prompt}<|im_start|>user\nnext<|im_end|>\n")})
                .to_string();
        c.bench_function(
            &format!("middleware_call/radix_rewrite/{tokens}_cached_tokens"),
            |b| {
                b.iter_batched(
                    || exchange(&turn),
                    |mut ex| rt.block_on(radix.on_request(&mut ex)),
                    BatchSize::SmallInput,
                )
            },
        );
    }
}

criterion_group!(benches, calls);
criterion_main!(benches);
