//! `--policy cache_aware`: send a request to the worker that most recently received the
//! longest prefix of its prompt, where that worker's prefix KV cache most likely still holds
//! it, unless that worker is overloaded next to the least loaded one.
//!
//! The index is approximate, like SGLang's own: per worker, the chained block hashes of the
//! prompts it was sent ([`super::prefix`]), bounded by `--cache-capacity-tokens` with
//! (approximate) LRU eviction, as an engine's cache evicts. A block hash covers its whole
//! prefix, so the longest match is the first block missing from a worker, found with one hash
//! lookup per block and a bitmask of the workers still matching. Workers beyond the 64th
//! registered are not tracked and get load-only placement.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use rustc_hash::FxHashMap;

use super::least_in_flight::least_loaded;
use super::prefix::{self, Prompt};
use super::{Candidates, LoadBound, Policy, Routing};
use crate::metrics::Metrics;
use crate::worker::Worker;

/// Workers the index tracks at once (one bit each).
const SLOTS: usize = 64;

/// Prefix-aware placement with a load bound.
pub struct CacheAware {
    bound: LoadBound,
    capacity_tokens: u64,
    index: Mutex<Index>,
    matched_tokens: Histogram,
    memory: Gauge,
}

impl CacheAware {
    /// An empty index holding up to `capacity_tokens` per worker.
    pub fn new(bound: LoadBound, capacity_tokens: usize, metrics: &Metrics) -> Self {
        Self {
            bound,
            capacity_tokens: capacity_tokens as u64,
            index: Mutex::new(Index::default()),
            matched_tokens: metrics.prefix_match_tokens(),
            memory: metrics.prefix_index_bytes(),
        }
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Approximate bytes the index holds.
    pub fn memory_bytes(&self) -> usize {
        self.index().memory_bytes()
    }
}

impl Policy for CacheAware {
    fn name(&self) -> &'static str {
        "cache_aware"
    }

    fn choose<'w>(
        &self,
        routing: &Routing<'_>,
        candidates: &Candidates<'w>,
    ) -> Option<&'w Arc<Worker>> {
        let prompt = prefix::blocks(routing.path, routing.body);
        let mut index = self.index();
        let (owners, matched) = index.longest_match(&prompt.blocks, candidates);
        self.matched_tokens
            .observe(matched as f64 * f64::from(prompt.tokens_per_block));
        let min = candidates.min_load()?;
        let best = least_loaded(candidates.iter().filter(|w| index.owns(owners, w)));
        let chosen = match best {
            Some(best) if matched > 0 && !self.bound.overloaded(best.in_flight(), min) => best,
            _ => index.placement(candidates, self.bound, min)?,
        };
        index.record(
            chosen,
            &prompt,
            candidates.registered(),
            self.capacity_tokens,
        );
        self.memory
            .set(i64::try_from(index.memory_bytes()).unwrap_or(i64::MAX));
        Some(chosen)
    }

    fn sent_elsewhere(&self, routing: &Routing<'_>, worker: &Arc<Worker>) {
        let prompt = prefix::blocks(routing.path, routing.body);
        if prompt.blocks.is_empty() {
            return;
        }
        let mut index = self.index();
        index.record(worker, &prompt, &[], self.capacity_tokens);
        self.memory
            .set(i64::try_from(index.memory_bytes()).unwrap_or(i64::MAX));
    }
}

/// Which worker slots hold which blocks.
#[derive(Default)]
struct Index {
    /// Block hash -> bitmask of the slots holding it.
    owners: FxHashMap<u64, u64>,
    slots: Vec<Slot>,
    /// Bumped per recorded request: the LRU's clock.
    clock: u32,
}

/// One worker's blocks in approximate LRU order: `stamps` holds each block's last use and
/// token count, `queue` the blocks in the order they came. A use only updates the stamp; when
/// eviction meets a block used since it was queued, the block goes to the back instead (a
/// second chance), so a use costs one map update, not a queue move.
struct Slot {
    worker: usize,
    stamps: FxHashMap<u64, (u32, u32)>,
    queue: VecDeque<(u64, u32)>,
    tokens: u64,
}

impl Slot {
    fn new(worker: usize) -> Self {
        Self {
            worker,
            stamps: FxHashMap::default(),
            queue: VecDeque::new(),
            tokens: 0,
        }
    }
}

impl Index {
    fn slot_of(&self, worker: &Worker) -> Option<usize> {
        self.slots.iter().position(|s| s.worker == worker.index())
    }

    fn owns(&self, owners: u64, worker: &Worker) -> bool {
        self.slot_of(worker)
            .is_some_and(|slot| owners & (1 << slot) != 0)
    }

    /// Where a prompt no worker holds goes: among the workers within the load bound, the one
    /// whose index holds the fewest tokens, so new prompts (the first turns of GRPO groups)
    /// spread by how much each worker already caches rather than by a moment's in-flight
    /// count, which a half-arrived group makes look low.
    fn placement<'w>(
        &self,
        candidates: &Candidates<'w>,
        bound: LoadBound,
        min: usize,
    ) -> Option<&'w Arc<Worker>> {
        let cached = |w: &Worker| self.slot_of(w).map_or(0, |s| self.slots[s].tokens);
        let within = || {
            candidates
                .iter()
                .filter(move |w| !bound.overloaded(w.in_flight(), min))
        };
        let fewest = within().map(|w| cached(w)).min()?;
        least_loaded(within().filter(|w| cached(w) == fewest))
    }

    /// The slots holding the longest prefix of `blocks` among the candidates, and its length.
    fn longest_match(&self, blocks: &[u64], candidates: &Candidates<'_>) -> (u64, usize) {
        let mut mask = candidates
            .iter()
            .filter_map(|w| self.slot_of(w))
            .fold(0u64, |mask, slot| mask | (1 << slot));
        let (mut best, mut matched) = (0u64, 0usize);
        for (i, block) in blocks.iter().enumerate() {
            mask &= self.owners.get(block).copied().unwrap_or(0);
            if mask == 0 {
                break;
            }
            (best, matched) = (mask, i + 1);
        }
        (best, matched)
    }

    /// `worker` was sent `prompt`: its blocks become the most recent, and the oldest beyond
    /// `capacity` tokens are evicted. New blocks are queued deepest first, so of blocks of one
    /// age the deepest go first and a kept block's prefix is kept too, as an engine evicts
    /// leaves before their parents.
    fn record(
        &mut self,
        worker: &Worker,
        prompt: &Prompt,
        registered: &[Arc<Worker>],
        capacity: u64,
    ) {
        if prompt.blocks.is_empty() {
            return;
        }
        let Some(slot) = self
            .slot_of(worker)
            .or_else(|| self.assign(worker, registered))
        else {
            return;
        };
        self.clock = self.clock.wrapping_add(1);
        let (clock, bit, tokens) = (self.clock, 1u64 << slot, prompt.tokens_per_block);
        let owners = &mut self.owners;
        let entry = &mut self.slots[slot];
        for &block in prompt.blocks.iter().rev() {
            match entry.stamps.entry(block) {
                std::collections::hash_map::Entry::Occupied(mut used) => used.get_mut().0 = clock,
                std::collections::hash_map::Entry::Vacant(new) => {
                    new.insert((clock, tokens));
                    entry.queue.push_back((block, clock));
                    entry.tokens += u64::from(tokens);
                    *owners.entry(block).or_insert(0) |= bit;
                }
            }
        }
        while entry.tokens > capacity {
            let Some((block, queued)) = entry.queue.pop_front() else {
                break;
            };
            match entry.stamps.get(&block).copied() {
                Some((used, _)) if used != queued => entry.queue.push_back((block, used)),
                Some((_, tokens)) => {
                    entry.stamps.remove(&block);
                    entry.tokens -= u64::from(tokens);
                    forget(owners, block, bit);
                }
                None => {}
            }
        }
    }

    /// A slot for `worker`: a free one, else one whose worker is no longer registered.
    fn assign(&mut self, worker: &Worker, registered: &[Arc<Worker>]) -> Option<usize> {
        if self.slots.len() < SLOTS {
            self.slots.push(Slot::new(worker.index()));
            return Some(self.slots.len() - 1);
        }
        let gone = self
            .slots
            .iter()
            .position(|s| !registered.iter().any(|w| w.index() == s.worker))?;
        let old = std::mem::replace(&mut self.slots[gone], Slot::new(worker.index()));
        for block in old.stamps.keys() {
            forget(&mut self.owners, *block, 1 << gone);
        }
        Some(gone)
    }

    fn memory_bytes(&self) -> usize {
        // hashbrown: key + value + one control byte per bucket.
        let owners = self.owners.capacity() * (8 + 8 + 1);
        let slots: usize = self
            .slots
            .iter()
            .map(|s| s.stamps.capacity() * (8 + 8 + 1) + s.queue.capacity() * 16)
            .sum();
        owners + slots
    }
}

fn forget(owners: &mut FxHashMap<u64, u64>, block: u64, bit: u64) {
    if let Some(mask) = owners.get_mut(&block) {
        *mask &= !bit;
        if *mask == 0 {
            owners.remove(&block);
        }
    }
}
