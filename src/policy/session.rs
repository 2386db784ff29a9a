//! Session keys, honoured under every policy: the first request of a key is placed by the
//! routing policy, later ones go to the same worker while it is live and not overloaded
//! (see [`LoadBound`]). A key whose worker is overloaded, DEAD or removed moves to the
//! policy's choice and is pinned there, so no request fails because its pinned worker died.
//! Pins expire after `--session-idle-secs` unused and are bounded in number
//! (`--max-sessions`, least recently used first).
//!
//! slime sends `X-SMG-Routing-Key: <sample session id>` on every turn; `X-Session-ID` and
//! the headers of `--routing-key-headers` are keys too. Pins are kept per role, so a key of a
//! prefill/decode pair keeps both of its workers.

use std::fmt;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http::HeaderName;
use lru::LruCache;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::{Candidates, LoadBound, Policy, Routing};
use crate::metrics::{Metrics, SessionCounters, WorkerLabel};
use crate::worker::{Role, Worker};

/// Header names that carry a session key by default.
pub const DEFAULT_HEADERS: &[&str] = &["x-smg-routing-key", "x-session-id"];

/// The session pins and how they move.
pub struct Sessions {
    headers: Vec<HeaderName>,
    bound: LoadBound,
    idle: Duration,
    pins: Arc<Mutex<LruCache<String, Pins>>>,
    counters: SessionCounters,
}

/// A key's worker per role.
#[derive(Default)]
struct Pins([Option<Pin>; 3]);

struct Pin {
    worker: usize,
    url: Arc<str>,
    used: Instant,
}

/// Why a key's request did not go to its pinned worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    New,
    Overload,
    Dead,
    Removed,
    Expired,
}

impl Sessions {
    /// Pins keyed by `headers` (lowercase names), at most `max` of them.
    pub fn new(
        headers: Vec<HeaderName>,
        bound: LoadBound,
        idle: Duration,
        max: NonZeroUsize,
        metrics: &Metrics,
    ) -> Self {
        let pins = Arc::new(Mutex::new(LruCache::new(max)));
        metrics.register_collector(Box::new(PinnedGauge(pins.clone())));
        Self {
            headers,
            bound,
            idle,
            pins,
            counters: metrics.session_counters(),
        }
    }

    fn pins(&self) -> MutexGuard<'_, LruCache<String, Pins>> {
        lock(&self.pins)
    }

    /// The request's session key, if it carries one.
    pub fn key<'r>(&self, routing: &Routing<'r>) -> Option<&'r str> {
        self.headers.iter().find_map(|name| {
            let value = routing.headers.get(name)?.to_str().ok()?.trim();
            (!value.is_empty()).then_some(value)
        })
    }

    /// The worker for a request of session `key`: its pinned one, or the policy's choice,
    /// which becomes the pin.
    pub fn pick<'w>(
        &self,
        key: &str,
        routing: &Routing<'_>,
        candidates: &Candidates<'w>,
        policy: &dyn Policy,
    ) -> Option<&'w Arc<Worker>> {
        let role = role_index(candidates.role());
        let now = Instant::now();
        let cause = {
            let mut pins = self.pins();
            self.expire(&mut pins, now);
            let pin = pins.get_mut(key).and_then(|p| p.0[role].as_mut());
            match pin {
                None => Cause::New,
                Some(pin) => match self.kept(pin, candidates) {
                    Ok(worker) => {
                        pin.used = now;
                        drop(pins);
                        self.counters.hits.inc();
                        policy.sent_elsewhere(routing, worker);
                        return Some(worker);
                    }
                    Err(cause) => cause,
                },
            }
        };
        let chosen = policy.choose(routing, candidates)?;
        self.pin(key, role, chosen, now);
        self.count(cause);
        Some(chosen)
    }

    /// The pinned worker when it may serve this request, else why not.
    fn kept<'w>(&self, pin: &Pin, candidates: &Candidates<'w>) -> Result<&'w Arc<Worker>, Cause> {
        let Some(worker) = candidates.iter().find(|w| w.index() == pin.worker) else {
            let registered = candidates
                .registered()
                .iter()
                .any(|w| w.index() == pin.worker);
            return Err(if registered {
                Cause::Dead
            } else {
                Cause::Removed
            });
        };
        let min = candidates.min_load().unwrap_or(0);
        if self.bound.overloaded(worker.in_flight(), min) {
            return Err(Cause::Overload);
        }
        Ok(worker)
    }

    fn pin(&self, key: &str, role: usize, worker: &Worker, now: Instant) {
        let pin = Pin {
            worker: worker.index(),
            url: Arc::from(worker.url()),
            used: now,
        };
        let mut pins = self.pins();
        if let Some(pins) = pins.get_mut(key) {
            pins.0[role] = Some(pin);
            return;
        }
        let mut entry = Pins::default();
        entry.0[role] = Some(pin);
        pins.push(key.to_owned(), entry);
    }

    /// Drops pins unused for longer than the idle time (the least recently used come first).
    fn expire(&self, pins: &mut LruCache<String, Pins>, now: Instant) {
        while let Some((_, oldest)) = pins.peek_lru() {
            let used = oldest.0.iter().flatten().map(|p| p.used).max();
            if used.is_some_and(|used| now.duration_since(used) < self.idle) {
                break;
            }
            pins.pop_lru();
            self.counters.moves(Cause::Expired.label()).inc();
        }
    }

    fn count(&self, cause: Cause) {
        match cause {
            Cause::New => self.counters.new.inc(),
            other => self.counters.moves(other.label()).inc(),
        };
    }

    /// Forgets `key` (`POST /finish_session`); false if it had no pin.
    pub fn finish(&self, key: &str) -> bool {
        self.pins().pop(key).is_some()
    }
}

impl Cause {
    fn label(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Overload => "overload",
            Self::Dead => "dead",
            Self::Removed => "removed",
            Self::Expired => "expired",
        }
    }
}

fn role_index(role: Role) -> usize {
    match role {
        Role::Regular => 0,
        Role::Prefill => 1,
        Role::Decode => 2,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `sessions{worker}`: keys pinned to each worker, counted at scrape time.
struct PinnedGauge(Arc<Mutex<LruCache<String, Pins>>>);

impl fmt::Debug for PinnedGauge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PinnedGauge")
    }
}

impl Collector for PinnedGauge {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let family = Family::<WorkerLabel, Gauge>::default();
        for (_, pins) in lock(&self.0).iter() {
            for pin in pins.0.iter().flatten() {
                let label = WorkerLabel {
                    worker: pin.url.to_string(),
                };
                family.get_or_create(&label).inc();
            }
        }
        let help = "Session keys pinned to each worker";
        let metric = encoder.encode_descriptor("sessions", help, None, family.metric_type())?;
        family.encode(metric)
    }
}
