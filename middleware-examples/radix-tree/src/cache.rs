//! The middleware's behaviour over the [`RadixTree`], written against a [`Host`] trait rather
//! than the wasm bindings so that it runs natively in tests with a fake tokenizer.
//!
//! Flow for one `/generate` with `text`:
//! 1. `on_request`: longest cached prefix that ends at a segment end (see below) -> its ids;
//!    tokenise only the rest; insert the rest as prompt (mask 0) so the prompt is cached as
//!    the worker sees it; rewrite the body to `input_ids`; stash the prompt's [`NodeRef`]
//!    ([`Stash`]). A rest that tokenises to nothing still goes as the cached ids, and waits in
//!    the stash for the output. Requests with media data pass through untouched.
//! 2. `on_response` / `on_response_chunk`: insert the output (mask 1, logprobs, the worker's
//!    `weight_version`) below the stashed node, aborted (partial) outputs included; a stream's
//!    events are put together first, cumulative or incremental ([`crate::stream`]). An output
//!    of a newer version than the same cached output gives it its logprobs.
//!
//! Where the cached prefix may end: the rewrite joins cached ids to a fresh tokenisation of
//! the rest, which cuts the text in two, and a cut inside a word gives a tokenisation the
//! tokenizer never produces: with ` the` cached, `them` becomes ` the` + `m` where
//! tokenising the whole text gives ` them`. So the rewrite only joins at a *segment end*,
//! where an earlier prompt or output ended ([`RadixTree::lookup_segment`]): it backs off from
//! the longest cached prefix to the last segment end on that path, or to nothing (the whole
//! text is tokenised). What the cache is for still works: a multi-turn request (previous
//! prompt + previous output + new text) reuses everything up to the previous output's end,
//! and the `n` samples of one prompt share it whole; only a prefix that stops inside someone
//! else's prompt or output is no longer used. A segment end is a cut that was made before,
//! so a text continuing one mid-word (a cached prompt ending in ` the`, a new one in
//! ` them`) is still cut there; after an output that is right, since the model produced
//! exactly those tokens and the next turn extends them.
//!
//! `/retrieve_from_text` instead takes the longest prefix ending on any piece boundary: it
//! must return the stored tokens for whatever cached text it is given.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::scan::bytes_eq;
use crate::sglang::{self, FAST_READER, GenerateOutput, GenerateRequest, Prompt, Text};
use crate::stash::Stash;
use crate::stream::{self, Whole};
use crate::tree::{
    Config, DEFAULT_VERSION, Location, NodeRef, PieceEnd, Pieces, RadixTree, Stats,
    pieces_from_lengths,
};

/// What the cache needs from the router: the tokenizer, logging and metrics.
pub trait Host {
    /// `tokenizer.encode`.
    fn encode(&self, text: &str) -> Result<Vec<u32>, String>;
    /// `tokenizer.decode`.
    fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, String>;
    /// `tokenizer.token-lengths`.
    fn token_lengths(&self, ids: &[u32], skip_special: bool) -> Result<Vec<u32>, String>;
    /// Logs at debug level.
    fn debug(&self, message: &str);
    /// Adds to a counter (`slime_router_middleware_counter_total{name=...}`).
    fn counter_add(&self, name: &str, value: u64);
    /// Sets a gauge (`slime_router_middleware_gauge{name=...}`).
    fn gauge_set(&self, name: &str, value: i64);
}

/// What to do with a `/generate` request.
#[derive(Debug, PartialEq)]
pub enum RequestOutcome {
    /// Forward it untouched and cache nothing.
    Pass,
    /// Forward it untouched; `stash` names the prompt's node for the response.
    Record { stash: Vec<u8> },
    /// Replace `text` with `input_ids`; `stash` names the prompt's node for the response.
    Rewrite { input_ids: Vec<u32>, stash: Vec<u8> },
}

/// A JSON reply of `handle`.
#[derive(Debug, PartialEq)]
pub struct JsonReply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl JsonReply {
    fn error(status: u16, message: &str) -> Self {
        #[derive(Serialize)]
        struct Error<'a> {
            error: &'a str,
        }
        let body = serde_json::to_vec(&Error { error: message })
            .unwrap_or_else(|_| br#"{"error":"radix-tree: error"}"#.to_vec());
        JsonReply { status, body }
    }

    fn ok<T: Serialize>(value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => JsonReply { status: 200, body },
            Err(e) => Self::error(500, &format!("radix-tree: cannot serialise reply: {e}")),
        }
    }
}

/// Responses seen by the cache, by outcome, and requests it left alone for their media.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Responses {
    cached: u64,
    /// Not cached: error status, unparsable body, no output, prompt evicted, or the request
    /// went through an earlier cache (see [`Cache::new`]).
    skipped: u64,
    /// Requests with image, video or audio data, passed through untouched (see
    /// [`Prompt::Media`]); their responses are not counted above.
    multimodal: u64,
    /// Prompts that went on past a cached model output without following it: the text
    /// re-rendered what the model produced differently (a template that drops earlier
    /// `<think>` blocks), so the rest was tokenised anew as prompt.
    drift: u64,
}

/// The trajectory cache middleware.
#[derive(Debug)]
pub struct Cache {
    tree: RadixTree,
    /// Tells this cache's stashes from an earlier one's: see [`Cache::new`].
    id: u64,
    responses: Responses,
    /// What the metrics last showed, to publish deltas; `None` before the first publish,
    /// which sets every gauge.
    published: Option<(Stats, Responses, usize)>,
    /// Token id -> its text if it decodes to nothing with special tokens skipped.
    specials: BTreeMap<u32, Option<String>>,
    /// Where a request's `text` is unescaped when it has escapes, kept between requests.
    scratch: Vec<u8>,
    /// Earlier caches of this router lost to a failure (see [`Cache::with_resets`]).
    resets: u64,
}

/// Largest `scratch` kept between requests (a ~200k-token prompt); a larger one is freed.
const SCRATCH_KEEP: usize = 1 << 20;

impl Cache {
    /// An empty cache.
    ///
    /// `id` must differ from that of any earlier cache in the same router. The router calls
    /// `init` in every instance it creates, and rebuilds the (stateful, single) instance after
    /// a trap, so a new cache may start while requests rewritten by the old one are still at
    /// a worker. Their stashes name nodes of the old tree, and the same slot in the new tree
    /// may hold anything: a stash with another id is ignored. The guest passes the host's
    /// `now-ns` at `init`.
    pub fn new(config: Config, id: u64) -> Self {
        Cache {
            tree: RadixTree::new(config),
            id,
            responses: Responses::default(),
            published: None,
            specials: BTreeMap::new(),
            scratch: Vec::new(),
            resets: 0,
        }
    }

    /// This cache replaces `resets` earlier ones that a failure took (the host's
    /// `discarded`): their trajectories are gone, and retrieval says so in `cache_resets`, so
    /// that text cached before is not silently read as prompt.
    pub fn with_resets(self, resets: u64) -> Self {
        Cache { resets, ..self }
    }

    /// The tree, for inspection.
    pub fn tree(&self) -> &RadixTree {
        &self.tree
    }

    /// `on-request` for `/generate`: rewrites `text` to cached-prefix ids + tail ids, or
    /// records `input_ids`. Anything else (batches, no tokenizer, bad JSON) passes through:
    /// SGLang tokenises it as before, only uncached.
    ///
    /// The body is read by [`sglang::request_text`], or by serde_json when that declines. The
    /// fast reader does not check that the text is UTF-8, and neither does this up front: a
    /// prompt is mostly cached text, so only the rest is checked, by
    /// [`RadixTree::lookup_segment_utf8`]. A body whose text is not UTF-8 passes through
    /// untouched, as when serde_json refuses it.
    pub fn on_request(&mut self, body: &[u8], host: &impl Host) -> RequestOutcome {
        let mut scratch = std::mem::take(&mut self.scratch);
        let fast = if FAST_READER {
            sglang::request_text(body, &mut scratch)
        } else {
            None
        };
        let outcome = match fast {
            Some(Prompt::Text(text)) => self.rewrite(text, host),
            Some(Prompt::Media) => Some(self.skip_media(host)),
            None => self.parsed_request(body, host),
        };
        if scratch.capacity() <= SCRATCH_KEEP {
            self.scratch = scratch;
        }
        let Some(outcome) = outcome else {
            host.debug("radix-tree: not a single-prompt /generate body; passed through");
            return RequestOutcome::Pass;
        };
        self.publish(host);
        outcome
    }

    /// [`Cache::on_request`] through serde_json; `None` for a body it refuses.
    fn parsed_request(&mut self, body: &[u8], host: &impl Host) -> Option<RequestOutcome> {
        let request = serde_json::from_slice::<GenerateRequest<'_>>(body).ok()?;
        if request.has_media() {
            return Some(self.skip_media(host));
        }
        match (request.text, request.input_ids) {
            (Some(Text(text)), None) => self.rewrite(text.as_bytes(), host),
            (None, Some(ids)) if !ids.is_empty() => Some(self.record(&ids, host)),
            _ => Some(RequestOutcome::Pass),
        }
    }

    /// A request with media: passed through untouched and counted, nothing cached.
    fn skip_media(&mut self, host: &impl Host) -> RequestOutcome {
        host.debug("radix-tree: /generate with media data; passed through");
        self.responses.multimodal += 1;
        RequestOutcome::Pass
    }

    /// The rewrite of a request's `text`; `None`, changing nothing, if it is not UTF-8.
    fn rewrite(&mut self, text: &[u8], host: &impl Host) -> Option<RequestOutcome> {
        if text.is_empty() {
            return Some(RequestOutcome::Pass);
        }
        // Not the longest cached prefix but the longest ending at a segment end, so that the
        // text is only cut where it was cut before (see the module docs).
        let (found, tail) = self.tree.lookup_segment_utf8(text)?;
        if !tail.is_empty() && self.tree.output_follows(&found.at) {
            self.responses.drift += 1;
            host.debug("radix-tree: prompt diverged from a cached output (drift); rest tokenised as prompt");
        }
        let mut input_ids = Vec::with_capacity(found.tokens + tail.len() / 3 + 1);
        if !self.tree.extend_ids(&found.at, &mut input_ids) {
            return Some(RequestOutcome::Pass);
        }
        let matched = &text[..found.len];
        let Some((node, pending)) = self.insert_tail(matched, found.at, tail, &mut input_ids, host)
        else {
            return Some(RequestOutcome::Pass);
        };
        // No ids at all (a text of only whitespace under WordPiece): SGLang refuses empty
        // `input_ids`, so let it see the text.
        let stash = node
            .filter(|_| !input_ids.is_empty())
            .and_then(|node| Stash::encode(self.id, node, pending));
        Some(match stash {
            Some(stash) => RequestOutcome::Rewrite { input_ids, stash },
            None => RequestOutcome::Pass,
        })
    }

    /// Inserts the uncached `tail` of a prompt at `at` (where `matched` ends) and appends its
    /// ids to `input_ids`. Returns the prompt's node (`None` if `at` went stale) and the text
    /// at its end that no token stands for, or `None` to pass the request through.
    fn insert_tail<'t>(
        &mut self,
        matched: &[u8],
        at: Location,
        tail: &'t str,
        input_ids: &mut Vec<u32>,
        host: &impl Host,
    ) -> Option<(Option<NodeRef>, &'t str)> {
        if tail.is_empty() {
            return Some((self.tree.insert(&at, &Pieces::EMPTY, None), ""));
        }
        let covered = self.covered_by_last_token(matched, input_ids, tail, host);
        let new_text = &tail[covered..];
        let tail_ids = match host.encode(new_text) {
            Ok(ids) => ids,
            Err(e) => {
                host.debug(&format!("radix-tree: cannot tokenise; passed through: {e}"));
                return None;
            }
        };
        if tail_ids.is_empty() {
            // The tail has no token (whitespace under WordPiece), so the worker gets the cached
            // ids alone, as tokenising the whole text would give. A piece needs a token, so the
            // tail waits in the stash and joins the output's first piece.
            return Some((self.tree.insert(&at, &Pieces::EMPTY, None), tail));
        }
        // Without lengths the tail is cached as one piece: correct, only not splittable.
        let lengths = host.token_lengths(&tail_ids, false).unwrap_or_default();
        let mut ends = pieces_from_lengths(new_text, &tail_ids, &lengths);
        // The covered text joins the first piece: its token is the prefix's last one.
        for end in &mut ends {
            end.text += covered as u32;
        }
        let Some(pieces) = Pieces::new(tail, &tail_ids, &ends) else {
            host.debug("radix-tree: cannot cut the tail into pieces; passed through");
            return None;
        };
        input_ids.extend_from_slice(&tail_ids);
        // The prompt carries the newest version seen: it is what the worker runs now.
        Some((self.tree.insert(&at, &pieces, None), ""))
    }

    /// Bytes at the start of `tail` that the prefix's last token already stands for.
    ///
    /// An output is cached with the text SGLang returns, which skips special tokens, so its
    /// EOS (`<|im_end|>`) has no text of its own. A chat template that renders the next turn
    /// writes that EOS out as text right after the output; tokenising it again would give the
    /// worker the EOS twice. So when the prefix ends in such a token (its text is not at the
    /// end of the matched text) and the tail starts with its text, that text is not tokenised.
    /// The prefix is the one after the back-off to a segment end, so an output's EOS is its
    /// last token whenever the match stops at that output's end.
    fn covered_by_last_token(
        &mut self,
        matched: &[u8],
        prefix_ids: &[u32],
        tail: &str,
        host: &impl Host,
    ) -> usize {
        let Some(&last) = prefix_ids.last() else {
            return 0;
        };
        let special = match self.specials.get(&last) {
            Some(known) => known.clone(),
            None => {
                let text = silent_text(last, host);
                // Bounded: the last ids of prefixes are mostly a few EOS tokens.
                if self.specials.len() >= 1024 {
                    self.specials.clear();
                }
                self.specials.insert(last, text.clone());
                text
            }
        };
        match special {
            Some(s) if tail.len() > s.len() => covered(&s, matched, tail),
            _ => 0,
        }
    }

    fn record(&mut self, ids: &[u32], host: &impl Host) -> RequestOutcome {
        let text = match host.decode(ids, false) {
            Ok(text) => text,
            Err(e) => {
                host.debug(&format!(
                    "radix-tree: cannot decode input_ids; not cached: {e}"
                ));
                return RequestOutcome::Pass;
            }
        };
        let lengths = host.token_lengths(ids, false).unwrap_or_default();
        let ends = pieces_from_lengths(&text, ids, &lengths);
        let Some(pieces) = Pieces::new(&text, ids, &ends) else {
            return RequestOutcome::Pass;
        };
        let node = self.tree.insert(&Location::ROOT, &pieces, None);
        match node.and_then(|node| Stash::encode(self.id, node, "")) {
            Some(stash) => RequestOutcome::Record { stash },
            None => RequestOutcome::Pass,
        }
    }

    /// `on-response` with a buffered body: caches the output below the stashed prompt.
    pub fn on_response(&mut self, status: u16, body: &[u8], stash: &[u8], host: &impl Host) {
        let Some(stash) = Stash::parse(stash) else {
            return;
        };
        if status == 200 && stash.cache == self.id {
            self.record_outputs(&stash, body, false, host);
        } else {
            self.responses.skipped += 1;
        }
        self.publish(host);
    }

    /// `on-response-chunk`: keeps the stream's events in the stash (see [`crate::stream`]) and
    /// caches their output once the stream ends. Returns the new stash, if it changed.
    pub fn on_chunk(
        &mut self,
        events: &[u8],
        last: bool,
        stash: &[u8],
        host: &impl Host,
    ) -> Option<Vec<u8>> {
        let parsed = Stash::parse(stash)?;
        if parsed.cache != self.id {
            if last {
                self.responses.skipped += 1;
                self.publish(host);
            }
            return None;
        }
        let mut next = Vec::with_capacity(stash.len() + events.len());
        next.extend_from_slice(&stash[..parsed.head_len]);
        let changed = stream::push(parsed.stream, events, &mut next);
        if !last {
            return changed.then_some(next);
        }
        let state = if changed {
            &next[parsed.head_len..]
        } else {
            parsed.stream
        };
        match stream::finish(state) {
            Some(Whole::Event(event)) => self.record_outputs(&parsed, event, true, host),
            Some(Whole::Summed(out)) => self.record_output(&parsed, &out, true, host),
            None => {
                host.debug("radix-tree: stream had no readable output; not cached");
                self.responses.skipped += 1;
            }
        }
        self.publish(host);
        None
    }

    /// Caches the output(s) in a response body: one object, or a list for `n > 1` sampling.
    fn record_outputs(&mut self, stash: &Stash<'_>, json: &[u8], streamed: bool, host: &impl Host) {
        let first = json.iter().find(|b| !b.is_ascii_whitespace());
        let recorded = match first {
            Some(b'{') => sglang::parse_output(json)
                .map(|out| self.record_output(stash, &out, streamed, host))
                .ok_or(()),
            Some(b'[') => serde_json::from_slice::<Vec<GenerateOutput<'_>>>(json)
                .map(|outs| {
                    for out in &outs {
                        self.record_output(stash, out, streamed, host);
                    }
                })
                .map_err(|_| ()),
            _ => {
                self.responses.skipped += 1;
                return;
            }
        };
        if recorded.is_err() {
            host.debug("radix-tree: response is not /generate output JSON; not cached");
            self.responses.skipped += 1;
        }
    }

    fn record_output(
        &mut self,
        stash: &Stash<'_>,
        out: &GenerateOutput<'_>,
        streamed: bool,
        host: &impl Host,
    ) {
        let cached = self.try_record_output(stash, out, streamed, host);
        if cached {
            self.responses.cached += 1;
        } else {
            self.responses.skipped += 1;
        }
    }

    /// Caches one output below the stashed prompt. An aborted output is cached like any
    /// other: slime resumes a partial rollout with the prompt plus the partial text, which then
    /// goes to the worker as the exact tokens, and trains on them with their logprobs.
    fn try_record_output(
        &mut self,
        stash: &Stash<'_>,
        out: &GenerateOutput<'_>,
        streamed: bool,
        host: &impl Host,
    ) -> bool {
        let meta = out.meta_info.as_ref();
        let logprobs = meta.and_then(|m| m.output_token_logprobs.as_ref());
        let (ids, logprobs) = match logprobs {
            Some(lp) if !lp.ids.is_empty() => (&lp.ids[..], Some(&lp.logprobs[..])),
            _ => match &out.output_ids {
                Some(ids) => (&ids[..], None),
                None => return false,
            },
        };
        // Events that do not add up to what the server counts (a delta stream read as
        // cumulative) would cache the wrong output.
        if streamed
            && meta
                .and_then(|m| m.completion_tokens)
                .is_some_and(|n| n != ids.len() as u64)
        {
            host.debug("radix-tree: stream events do not add up; output not cached");
            return false;
        }
        let Some(Text(text)) = &out.text else {
            return false;
        };
        let ends = output_pieces(text, ids, host);
        let (text, ends) = after_pending(stash.pending, text, ends);
        let version = meta
            .and_then(|m| m.weight_version())
            .unwrap_or(Cow::Borrowed(DEFAULT_VERSION));
        let pieces = Pieces::new(&text, ids, &ends)
            .and_then(|p| match logprobs {
                Some(lp) => p.with_logprobs(lp),
                None => Some(p),
            })
            .map(|p| p.with_loss_mask(true));
        // No pieces: empty text (e.g. only an EOS), which no text lookup could find.
        let Some(pieces) = pieces.filter(|p| !p.is_empty()) else {
            return false;
        };
        // None: the prompt was evicted while the worker generated.
        self.tree
            .insert_below(stash.node, &pieces, Some(&version))
            .is_some()
    }

    /// `handle`: `POST /retrieve_from_text` and `GET /radix_tree/stats`.
    pub fn handle(&self, method: &str, path: &str, body: &[u8], host: &impl Host) -> JsonReply {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        match (method, path) {
            ("POST", "/retrieve_from_text") => self.retrieve(body, host),
            ("GET", "/radix_tree/stats") => self.stats(),
            _ => JsonReply::error(404, &format!("radix-tree: no route {method} {path}")),
        }
    }

    /// Tokens, loss mask and logprobs of `text`: the cached prefix with its stored values, the
    /// rest tokenised as prompt (mask 0, logprob 0.0), and `cached_tokens`, how many came from
    /// the cache, so that a miss is told from a text that is all prompt. Read-only.
    ///
    /// The prefix is the longest on any piece boundary, not only at a segment end as for
    /// `/generate`: the caller wants the tokens the model saw and produced for as much of the
    /// text as is cached, wherever it stops.
    fn retrieve(&self, body: &[u8], host: &impl Host) -> JsonReply {
        #[derive(Deserialize)]
        struct Request<'a> {
            #[serde(borrow, default)]
            text: Option<&'a RawValue>,
        }
        #[derive(Serialize)]
        struct Response<'a> {
            tokens: &'a [u32],
            /// Leading tokens that came from the cache: 0 for a miss, all of them for a text
            /// cached whole, prompt or not.
            cached_tokens: usize,
            response: &'a str,
            loss_mask: &'a [u8],
            token_length: usize,
            loss_mask_length: usize,
            rollout_logp: &'a [f32],
            /// Caches lost to a failure before this one: text cached before the last loss
            /// comes back as prompt (mask 0).
            cache_resets: u64,
        }
        let Ok(request) = serde_json::from_slice::<Request<'_>>(body) else {
            return JsonReply::error(400, r#"radix-tree: body must be JSON like {"text": "..."}"#);
        };
        let Some(raw) = request.text else {
            return JsonReply::error(400, "radix-tree: missing `text`");
        };
        let Ok(Text(text)) = serde_json::from_str::<Text<'_>>(raw.get()) else {
            return JsonReply::error(400, "radix-tree: `text` must be a string");
        };
        if text.is_empty() {
            return JsonReply::error(400, "radix-tree: `text` is empty");
        }
        let found = self.tree.lookup_read_only(&text);
        let mut tokens = Vec::with_capacity(found.tokens + (text.len() - found.len) / 3 + 1);
        self.tree.extend_ids(&found.at, &mut tokens);
        // A rendered conversation writes each output's EOS out; its token is cached already.
        let eos = tokens.last().and_then(|&id| silent_text(id, host));
        let skip = eos.map_or(0, |s| {
            covered(&s, &text.as_bytes()[..found.len], &text[found.len..])
        });
        let rest = &text[found.len + skip..];
        let rest_ids = if rest.is_empty() {
            Vec::new()
        } else {
            match host.encode(rest) {
                Ok(ids) => ids,
                Err(e) => {
                    return JsonReply::error(
                        503,
                        &format!(
                            "radix-tree: {} bytes of the text are not cached and tokenising them \
                             needs a tokenizer (start the router with --hf-checkpoint): {e}",
                            rest.len()
                        ),
                    );
                }
            }
        };
        let n = found.tokens + rest_ids.len();
        let (mut loss_mask, mut logp) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for segment in self.tree.path_tokens(&found.at).unwrap_or_default() {
            for t in segment {
                loss_mask.push(t.loss_mask());
                logp.push(t.logprob());
            }
        }
        tokens.extend_from_slice(&rest_ids);
        loss_mask.resize(tokens.len(), 0);
        logp.resize(tokens.len(), 0.0);
        JsonReply::ok(&Response {
            tokens: &tokens,
            cached_tokens: found.tokens,
            response: &text,
            loss_mask: &loss_mask,
            token_length: tokens.len(),
            loss_mask_length: loss_mask.len(),
            rollout_logp: &logp,
            cache_resets: self.resets,
        })
    }

    fn stats(&self) -> JsonReply {
        #[derive(Serialize)]
        struct Body<'a> {
            nodes: u64,
            tokens: u64,
            text_bytes: u64,
            memory_bytes: usize,
            max_tokens: usize,
            keep_versions: Option<usize>,
            versions: u64,
            newest_version: Option<&'a str>,
            hits: u64,
            misses: u64,
            matched_tokens: u64,
            inserted_tokens: u64,
            evicted_nodes: u64,
            evicted_tokens: u64,
            version_evicted_nodes: u64,
            version_evicted_tokens: u64,
            responses_cached: u64,
            responses_skipped: u64,
            multimodal_skipped: u64,
            drift: u64,
            resets: u64,
        }
        let s = self.tree.stats();
        let config = self.tree.config();
        JsonReply::ok(&Body {
            nodes: s.nodes,
            tokens: s.tokens,
            text_bytes: s.text_bytes,
            memory_bytes: self.tree.memory_bytes(),
            max_tokens: config.max_tokens,
            keep_versions: config.keep_versions.filter(|&k| k > 0),
            versions: s.versions,
            newest_version: self.tree.newest_version(),
            hits: s.hits,
            misses: s.misses,
            matched_tokens: s.matched_tokens,
            inserted_tokens: s.inserted_tokens,
            evicted_nodes: s.evicted_nodes,
            evicted_tokens: s.evicted_tokens,
            version_evicted_nodes: s.version_evicted_nodes,
            version_evicted_tokens: s.version_evicted_tokens,
            responses_cached: self.responses.cached,
            responses_skipped: self.responses.skipped,
            multimodal_skipped: self.responses.multimodal,
            drift: self.responses.drift,
            resets: self.resets,
        })
    }

    /// Publishes what changed since the last call: counter deltas, then gauges; every gauge
    /// on the first call, so that a new cache replaces the values a failed one left.
    pub fn publish(&mut self, host: &impl Host) {
        let (s, r) = (self.tree.stats(), self.responses);
        let first = self.published.is_none();
        let (ps, pr, p_memory) = self.published.unwrap_or_default();
        let counters = [
            ("radix_hits", s.hits, ps.hits),
            ("radix_misses", s.misses, ps.misses),
            ("radix_matched_tokens", s.matched_tokens, ps.matched_tokens),
            (
                "radix_inserted_tokens",
                s.inserted_tokens,
                ps.inserted_tokens,
            ),
            ("radix_evicted_tokens", s.evicted_tokens, ps.evicted_tokens),
            (
                "radix_version_evicted_tokens",
                s.version_evicted_tokens,
                ps.version_evicted_tokens,
            ),
            ("radix_responses_cached", r.cached, pr.cached),
            ("radix_responses_skipped", r.skipped, pr.skipped),
            ("radix_multimodal_skipped", r.multimodal, pr.multimodal),
            ("radix_drift", r.drift, pr.drift),
        ];
        for (name, now, before) in counters {
            if now > before {
                host.counter_add(name, now - before);
            }
        }
        let memory = self.tree.memory_bytes();
        let gauges = [
            ("radix_nodes", s.nodes, ps.nodes),
            ("radix_tokens", s.tokens, ps.tokens),
            ("radix_memory_bytes", memory as u64, p_memory as u64),
        ];
        for (name, now, before) in gauges {
            if now != before || first {
                host.gauge_set(name, i64::try_from(now).unwrap_or(i64::MAX));
            }
        }
        self.published = Some((s, r, memory));
    }
}

/// The text of token `id` when it decodes to nothing with special tokens skipped (an EOS).
fn silent_text(id: u32, host: &impl Host) -> Option<String> {
    let skipped = host.token_lengths(&[id], true).is_ok_and(|l| l == [0]);
    if !skipped {
        return None;
    }
    host.decode(&[id], false).ok().filter(|t| !t.is_empty())
}

/// Bytes at the start of `tail` that `special`, the text of the token ending `matched`
/// (which the cached text leaves out), stands for.
fn covered(special: &str, matched: &[u8], tail: &str) -> usize {
    if tail.starts_with(special) && !matched.ends_with(special.as_bytes()) {
        special.len()
    } else {
        0
    }
}

/// An output's `text` and piece ends after `pending`, the end of its prompt that no token stands
/// for: that text joins the first piece, whose first token is the first to follow it.
fn after_pending<'t>(
    pending: &str,
    text: &'t str,
    mut ends: Vec<PieceEnd>,
) -> (Cow<'t, str>, Vec<PieceEnd>) {
    if pending.is_empty() || ends.is_empty() {
        return (Cow::Borrowed(text), ends);
    }
    let Ok(shift) = u32::try_from(pending.len()) else {
        return (Cow::Borrowed(text), Vec::new());
    };
    for end in &mut ends {
        match end.text.checked_add(shift) {
            Some(moved) => end.text = moved,
            None => return (Cow::Borrowed(text), Vec::new()),
        }
    }
    (Cow::Owned(format!("{pending}{text}")), ends)
}

/// Pieces of a model output: token lengths when the ids decode to exactly `text` (with
/// special tokens skipped, as SGLang does by default, or kept), else one piece (e.g. a stop
/// string trimmed from `text`).
///
/// The lengths come first: when neither mode's lengths fit `text` (e.g. a stop string was
/// trimmed from it), the result is one piece whatever the ids decode to, so nothing is
/// decoded. Otherwise the decodes decide as they always did, in the same order.
fn output_pieces(text: &str, ids: &[u32], host: &impl Host) -> Vec<PieceEnd> {
    let ends = |skip_special| {
        let lengths = host.token_lengths(ids, skip_special).unwrap_or_default();
        pieces_from_lengths(text, ids, &lengths)
    };
    let whole = pieces_from_lengths(text, ids, &[]);
    let skipped = ends(true);
    let mut kept = None;
    if skipped == whole {
        let k = ends(false);
        if k == whole {
            return whole;
        }
        kept = Some(k);
    }
    let decodes_to_text = |skip_special| {
        host.decode(ids, skip_special)
            .is_ok_and(|d| bytes_eq(d.as_bytes(), text.as_bytes()))
    };
    if decodes_to_text(true) {
        return skipped;
    }
    if decodes_to_text(false) {
        return kept.unwrap_or_else(|| ends(false));
    }
    whole
}

#[cfg(test)]
mod tests;
