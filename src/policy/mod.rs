//! Choosing a worker for one request. The pool hands a [`Policy`] the request's routing
//! inputs and the workers it may use (live, not yet tried for this request, narrowed by a
//! middleware's [`RouteHint`]); the policy picks one. Each policy is a file of its own.
//!
//! Which policy a router runs is wired in `app`, so this module imports none of its
//! policies and they import only it.
//!
//! Precedence: liveness first (a policy never sees a DEAD worker), then a middleware's hint
//! (it narrows the candidates when it names a usable worker), then the policy.

pub mod cache_aware;
pub mod least_in_flight;
pub mod prefix;
pub mod session;
pub mod version;

use std::sync::Arc;

use http::HeaderMap;

use crate::worker::{Role, Tried, Worker};
use version::VersionGate;

/// What a policy may read of the request it routes, after every `on-request` patch.
#[derive(Debug, Clone, Copy)]
pub struct Routing<'a> {
    /// Path without the query string.
    pub path: &'a str,
    /// Request headers (session keys live here).
    pub headers: &'a HeaderMap,
    /// The request body as it will be sent.
    pub body: &'a [u8],
}

impl Routing<'static> {
    /// Inputs that carry nothing: for callers with no request at hand (benchmarks, tests).
    pub fn none() -> Self {
        static EMPTY: std::sync::OnceLock<HeaderMap> = std::sync::OnceLock::new();
        Routing {
            path: "/",
            headers: EMPTY.get_or_init(HeaderMap::new),
            body: &[],
        }
    }
}

/// A middleware's steer for one pick (`route-hint` in the WIT); never overrides liveness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteHint {
    /// Use this worker when it is live.
    Prefer(String),
    /// Choose among these workers when any of them is live.
    Among(Vec<String>),
}

/// The workers one pick may choose from: live, of the role asked, not tried yet for this
/// request, and within the hint's urls when it narrowed them. Iterating allocates nothing.
#[derive(Debug, Clone, Copy)]
pub struct Candidates<'a> {
    workers: &'a [Arc<Worker>],
    tried: &'a Tried,
    role: Role,
    only: Option<&'a [String]>,
    gate: Option<VersionGate<'a>>,
}

impl<'a> Candidates<'a> {
    /// Every usable worker of `workers` with this role.
    pub fn new(workers: &'a [Arc<Worker>], tried: &'a Tried, role: Role) -> Self {
        Self {
            workers,
            tried,
            role,
            only: None,
            gate: None,
        }
    }

    /// These candidates, of them only the workers whose weight version `gate` allows.
    pub fn gated(self, gate: Option<VersionGate<'a>>) -> Self {
        Self { gate, ..self }
    }

    /// The usable workers, in registration order.
    pub fn iter(&self) -> impl Iterator<Item = &'a Arc<Worker>> + use<'a> {
        let Self {
            workers,
            tried,
            role,
            only,
            gate,
        } = *self;
        workers.iter().filter(move |w| {
            w.is_live()
                && w.kind().role() == role
                && !tried.contains(w)
                && gate.is_none_or(|g| g.allows(w))
                && only.is_none_or(|urls| urls.iter().any(|u| u == w.url()))
        })
    }

    /// These candidates narrowed to the hint's workers, or `None` when it names no usable one.
    pub fn narrowed(&self, hint: &'a RouteHint) -> Option<Self> {
        let only = match hint {
            RouteHint::Prefer(url) => std::slice::from_ref(url),
            RouteHint::Among(urls) => urls.as_slice(),
        };
        let narrowed = Self {
            only: Some(only),
            ..*self
        };
        narrowed.iter().next().is_some().then_some(narrowed)
    }
}

/// When affinity (a session's worker, a cached prefix) gives way to load: a worker is
/// overloaded when its in-flight count exceeds the least loaded candidate's by more than
/// `abs` and is more than `rel` times it (`--balance-abs-threshold`,
/// `--balance-rel-threshold`, as SGLang's router names them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadBound {
    /// Requests in flight above the least loaded worker's that are always tolerated.
    pub abs: usize,
    /// How many times the least loaded worker's count is always tolerated.
    pub rel: f64,
}

impl LoadBound {
    /// Whether a worker with `load` in flight is overloaded next to `min`.
    pub fn overloaded(&self, load: usize, min: usize) -> bool {
        load.saturating_sub(min) > self.abs && load as f64 > min as f64 * self.rel
    }
}

impl<'a> Candidates<'a> {
    /// The fewest requests in flight on any candidate.
    pub fn min_load(&self) -> Option<usize> {
        self.iter().map(|w| w.in_flight()).min()
    }

    /// The role every candidate has.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Whether `worker` is one of the candidates.
    pub fn contains(&self, worker: &Worker) -> bool {
        self.iter().any(|w| std::ptr::eq(&**w, worker))
    }

    /// Every registered worker, usable or not (to tell a DEAD worker from a removed one).
    pub fn registered(&self) -> &'a [Arc<Worker>] {
        self.workers
    }
}

/// Picks a worker among the candidates. Implementations keep whatever state they need
/// (an index of prefixes, say) behind `&self`; they are shared by every serving thread.
pub trait Policy: Send + Sync {
    /// The name `--policy` knows it by, for logs.
    fn name(&self) -> &'static str;

    /// One of `candidates`, or `None` when there is none.
    fn choose<'w>(
        &self,
        routing: &Routing<'_>,
        candidates: &Candidates<'w>,
    ) -> Option<&'w Arc<Worker>>;

    /// The request goes to `worker` without this policy choosing it (a session key kept it
    /// there): a policy that tracks what workers received keeps its state in step.
    fn sent_elsewhere(&self, _routing: &Routing<'_>, _worker: &Arc<Worker>) {}
}
