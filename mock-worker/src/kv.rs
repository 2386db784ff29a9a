//! A prefix-KV-cache cost model, in simulated time, so a rollout through the router shows
//! what prefix-aware routing saves without a GPU: a request's prompt costs prefill time only
//! for the tokens not already in this worker's cache.
//!
//! Like SGLang's scheduler: requests wait in a queue; when some wait and there is room, one
//! prefill batch runs (up to `max_running` requests and `max_prefill_tokens` uncached tokens)
//! and decoding pauses for it; otherwise one decode step makes one token for every running
//! request, taking longer the more requests run. The cache holds 16-token blocks under chained hashes with LRU eviction at
//! `capacity_tokens`; a prompt's cached prefix is its leading blocks found there, and a
//! finished request's prompt and output are inserted. Everything is timers, so the mock's
//! CPU stays low.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lru::LruCache;
use tokio::sync::{mpsc, oneshot};

/// Tokens per cache block.
pub const BLOCK: usize = 16;

/// The cost model's knobs.
#[derive(Clone, Copy, Debug)]
pub struct KvModel {
    /// Tokens the prefix cache holds.
    pub capacity_tokens: usize,
    /// Prefill time per uncached prompt token.
    pub prefill_per_token: Duration,
    /// Time of one decode step (one token for every running request) with none running...
    pub decode_step: Duration,
    /// ...plus this per running request: a bigger batch reads more KV per step.
    pub decode_per_request: Duration,
    /// Requests running at once; more wait in the queue.
    pub max_running: usize,
    /// Uncached tokens one prefill batch may take.
    pub max_prefill_tokens: usize,
}

/// A generation handed to the scheduler.
pub struct Job {
    /// The prompt's token ids.
    pub prompt: Vec<u32>,
    /// The output's token ids (known in advance: the mock's output is deterministic).
    pub output: Vec<u32>,
    /// Receives the prompt tokens found in the cache once the output is complete.
    pub done: oneshot::Sender<usize>,
}

/// A running worker's scheduler.
#[derive(Clone)]
pub struct Scheduler(mpsc::UnboundedSender<Job>);

impl Scheduler {
    /// Starts the scheduler task for one worker; `computed` counts the prompt tokens it
    /// had to prefill.
    pub fn start(model: KvModel, computed: Arc<AtomicU64>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(model, computed, rx));
        Self(tx)
    }

    /// Queues a generation; the answer says how many prompt tokens were cached.
    pub async fn generate(&self, prompt: Vec<u32>, output: Vec<u32>) -> Option<usize> {
        let (done, wait) = oneshot::channel();
        self.0
            .send(Job {
                prompt,
                output,
                done,
            })
            .ok()?;
        wait.await.ok()
    }
}

struct Running {
    job: Job,
    cached: usize,
    generated: usize,
}

async fn run(model: KvModel, computed: Arc<AtomicU64>, mut jobs: mpsc::UnboundedReceiver<Job>) {
    let blocks = NonZeroUsize::new(model.capacity_tokens / BLOCK).unwrap_or(NonZeroUsize::MIN);
    let mut cache = Cache(LruCache::new(blocks));
    let mut waiting: std::collections::VecDeque<Job> = Default::default();
    let mut running: Vec<Running> = Vec::new();
    loop {
        while let Ok(job) = jobs.try_recv() {
            waiting.push_back(job);
        }
        if waiting.is_empty() && running.is_empty() {
            match jobs.recv().await {
                Some(job) => waiting.push_back(job),
                None => return,
            }
            continue;
        }
        if !waiting.is_empty() && running.len() < model.max_running {
            let (batch, uncached) = admit(&model, &mut cache, &mut waiting, running.len());
            computed.fetch_add(uncached as u64, Ordering::Relaxed);
            tokio::time::sleep(model.prefill_per_token * uncached as u32).await;
            running.extend(batch);
            continue;
        }
        let batch = u32::try_from(running.len()).unwrap_or(u32::MAX);
        tokio::time::sleep(model.decode_step + model.decode_per_request * batch).await;
        running.retain_mut(|r| {
            r.generated += 1;
            if r.generated < r.job.output.len() {
                return true;
            }
            let mut all = std::mem::take(&mut r.job.prompt);
            all.extend_from_slice(&r.job.output);
            cache.insert(&all);
            let done = std::mem::replace(&mut r.job.done, oneshot::channel().0);
            let _ = done.send(r.cached);
            false
        });
    }
}

/// Takes waiting jobs into a prefill batch: their cached prefixes found, their prompts
/// inserted. Returns the batch and its uncached tokens.
fn admit(
    model: &KvModel,
    cache: &mut Cache,
    waiting: &mut std::collections::VecDeque<Job>,
    running: usize,
) -> (Vec<Running>, usize) {
    let (mut batch, mut uncached) = (Vec::new(), 0usize);
    while running + batch.len() < model.max_running {
        let Some(job) = waiting.front() else { break };
        let cached = cache.cached(&job.prompt);
        let cost = job.prompt.len() - cached;
        if !batch.is_empty() && uncached + cost > model.max_prefill_tokens {
            break;
        }
        let Some(job) = waiting.pop_front() else {
            break;
        };
        cache.insert(&job.prompt);
        uncached += cost;
        // A request with no output to make finishes after its prefill.
        let generated = usize::from(job.output.is_empty());
        batch.push(Running {
            job,
            cached,
            generated,
        });
    }
    (batch, uncached)
}

/// Block hashes -> nothing, least recently used evicted first.
struct Cache(LruCache<u64, ()>);

impl Cache {
    /// Chained hashes of the whole blocks of `ids`.
    fn hashes(ids: &[u32]) -> impl Iterator<Item = u64> + '_ {
        let mut hash = 0xcbf2_9ce4_8422_2325_u64;
        ids.chunks_exact(BLOCK).map(move |block| {
            for &id in block {
                hash = (hash ^ u64::from(id)).wrapping_mul(0x0000_0100_0000_01b3);
            }
            hash
        })
    }

    /// Prompt tokens in the cache: its leading whole blocks that are there (refreshed).
    fn cached(&mut self, prompt: &[u32]) -> usize {
        // The last token is always computed, as an engine needs its logits.
        let usable = &prompt[..prompt.len().saturating_sub(1)];
        Self::hashes(usable)
            .take_while(|h| self.0.get(h).is_some())
            .count()
            * BLOCK
    }

    fn insert(&mut self, ids: &[u32]) {
        for hash in Self::hashes(ids) {
            self.0.put(hash, ());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_prefix_is_leading_blocks_and_lru_evicts() {
        let mut cache = Cache(LruCache::new(NonZeroUsize::new(4).unwrap()));
        let a: Vec<u32> = (0..64).collect();
        assert_eq!(cache.cached(&a), 0);
        cache.insert(&a);
        assert_eq!(cache.cached(&a), 48, "the last token is never cached");
        let mut longer = a.clone();
        longer.extend(100..140);
        assert_eq!(cache.cached(&longer), 64);
        let mut other = a.clone();
        other[0] = 9;
        assert_eq!(
            cache.cached(&other),
            0,
            "a different first token shares nothing"
        );
        let b: Vec<u32> = (1000..1064).collect();
        cache.insert(&b);
        assert_eq!(
            cache.cached(&longer),
            0,
            "capacity 4 blocks: a's were evicted"
        );
    }
}
