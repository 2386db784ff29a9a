//! The routing decision of `--policy cache_aware` for one `/generate` with `input_ids`:
//! finding the prompt in the body, hashing its blocks, matching them against 4 workers'
//! indexes and recording them, at 1k and 32k tokens. Also prints the index's memory per
//! million cached tokens.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use http::HeaderMap;
use slime_router::metrics::Metrics;
use slime_router::policy::cache_aware::CacheAware;
use slime_router::policy::{Candidates, LoadBound, Policy, Routing};
use slime_router::pool::Pool;
use slime_router::worker::{Role, Tried, WorkerType, WorkerUrl};

/// No worker failed yet, as for a request's first pick.
static NONE_TRIED: Tried = Tried::new();

/// A slime-shaped body: `input_ids` written as Python's json.dumps writes them.
fn body(tokens: usize, salt: u32) -> String {
    let ids: Vec<String> = (0..tokens as u32)
        .map(|i| (1000 + (i * 7919 + salt) % 150_000).to_string())
        .collect();
    format!(
        r#"{{"input_ids": [{}], "sampling_params": {{"max_new_tokens": 64, "temperature": 1.0}}, "return_logprob": true}}"#,
        ids.join(", ")
    )
}

fn decision(c: &mut Criterion) {
    let metrics = Arc::new(Metrics::new());
    let pool = Pool::new(metrics.clone());
    for port in 0..4u16 {
        if let Ok(url) = WorkerUrl::parse(&format!("http://127.0.0.1:{}", 20000 + port)) {
            let _ = pool.add(url, WorkerType::Regular);
        }
    }
    let workers = pool.snapshot();
    let bound = LoadBound { abs: 16, rel: 1.5 };
    let headers = HeaderMap::new();
    for tokens in [1_000usize, 32_000] {
        let policy = CacheAware::new(bound, 4_000_000, &metrics);
        // Every worker holds 16 other trajectories of this length, and one worker this
        // request's prefix: the walk goes the whole way before it stops.
        for salt in 0..64 {
            let other = body(tokens, 1 + salt);
            let routing = Routing {
                path: "/generate",
                headers: &headers,
                body: other.as_bytes(),
            };
            let candidates = Candidates::new(&workers, &NONE_TRIED, Role::Regular);
            policy.choose(&routing, &candidates);
        }
        let request = body(tokens, 0);
        let routing = Routing {
            path: "/generate",
            headers: &headers,
            body: request.as_bytes(),
        };
        c.bench_function(&format!("cache_aware_decision/{tokens}_tokens"), |b| {
            b.iter(|| {
                let candidates = Candidates::new(&workers, &NONE_TRIED, Role::Regular);
                black_box(policy.choose(&routing, &candidates).map(|w| w.index()))
            })
        });
    }
    // Memory: one worker indexing a million tokens of distinct 32k-token prompts.
    let policy = CacheAware::new(bound, 4_000_000, &metrics);
    let one = &workers[..1];
    for salt in 0..32 {
        let prompt = body(32_000, 1000 + salt);
        let routing = Routing {
            path: "/generate",
            headers: &headers,
            body: prompt.as_bytes(),
        };
        policy.choose(&routing, &Candidates::new(one, &NONE_TRIED, Role::Regular));
    }
    let per_million = policy.memory_bytes() as f64 / 1.024;
    println!(
        "cache_aware index: {:.2} MiB per million cached tokens",
        per_million / (1 << 20) as f64
    );
}

criterion_group!(benches, decision);
criterion_main!(benches);
