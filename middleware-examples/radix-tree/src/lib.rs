//! `radix-tree`: the trajectory cache middleware for RL rollouts.
//!
//! Multi-turn rollouts send `/generate` with `text`; training needs the exact tokens the
//! model saw and produced, with logprobs and a loss mask. Re-tokenising the joined text later
//! drifts at token seams, so this middleware keeps text -> (tokens, logprobs, loss mask,
//! weight version) for every trajectory that goes through `/generate`, rewrites requests from
//! `text` to `input_ids` (cached prefix + tokenisation of only the rest), and serves
//! `POST /retrieve_from_text` and `GET /radix_tree/stats`.
//!
//! The cached prefix of a rewrite is the longest that ends where an earlier prompt or output
//! ended (a segment end), not the longest cached one: joining cached tokens to freshly
//! tokenised text inside a word would give the model a tokenisation a tokenizer never
//! produces (cached ` the`, new `them`: ` the` + `m` instead of ` them`). Multi-turn requests
//! still reuse everything up to the previous output's end and samples of one prompt share it;
//! see [`cache`]. `/retrieve_from_text` returns the stored tokens of the longest cached prefix
//! wherever it ends.
//!
//! State lives in one instance (the manifest is stateful). The router calls `init` in every
//! instance it creates, so a trap or timeout costs the cache (the rebuilt instance starts
//! empty) but nothing else: the new cache ignores stashes of requests the old one rewrote and
//! resets the gauges.
//!
//! Config (`--slime-router-middleware-paths radix_tree.wasm?max_tokens=4000000&keep_versions=3`):
//! see [`config::parse`].
//!
//! Metrics (`slime_router_middleware_counter_total{middleware="radix-tree",name=...}` counters,
//! `slime_router_middleware_gauge{...}` gauges), by name:
//! `radix_hits`, `radix_misses`, `radix_matched_tokens` (prompt tokens served from the
//! cache), `radix_inserted_tokens`, `radix_evicted_tokens`, `radix_version_evicted_tokens`,
//! `radix_responses_cached`, `radix_responses_skipped`, `radix_multimodal_skipped` (requests
//! with image, video or audio data, passed through untouched); gauges `radix_nodes`, `radix_tokens`,
//! `radix_memory_bytes`. `GET /radix_tree/stats` returns all of them as JSON.
//!
//! Layout: [`tree`] is the data structure (plain Rust, tested natively), [`cache`] the
//! middleware behaviour over a host trait, [`sglang`] the JSON it reads (through the fast
//! [`json`] reader, with serde_json as the fallback), [`stash`] what a request carries to its
//! response, [`stream`] a streamed response put together from its events, [`scan`] the byte
//! scans that grow with the prompt, and `guest` (wasm only) binds it to `wit/router.wit`.

pub mod cache;
pub mod config;
pub mod json;
pub mod scan;
pub mod sglang;
pub mod stash;
pub mod stream;
pub mod tree;

#[cfg(target_arch = "wasm32")]
mod guest;
