//! The default policy: the worker with the fewest requests in flight, ties broken uniformly
//! at random, so light load spreads instead of always landing on the first registered worker.

use std::sync::Arc;

use super::{Candidates, Policy, Routing};
use crate::worker::Worker;

/// Least in flight with random ties (`--policy least_in_flight`).
#[derive(Debug, Default)]
pub struct LeastInFlight;

impl Policy for LeastInFlight {
    fn name(&self) -> &'static str {
        "least_in_flight"
    }

    fn choose<'w>(
        &self,
        _routing: &Routing<'_>,
        candidates: &Candidates<'w>,
    ) -> Option<&'w Arc<Worker>> {
        least_loaded(candidates.iter())
    }
}

/// The least loaded of `workers`, ties broken by reservoir sampling (one pass, no allocation).
pub fn least_loaded<'a>(workers: impl Iterator<Item = &'a Arc<Worker>>) -> Option<&'a Arc<Worker>> {
    let mut best: Option<&Arc<Worker>> = None;
    let (mut best_load, mut ties) = (usize::MAX, 0usize);
    for worker in workers {
        let load = worker.in_flight();
        if load < best_load {
            (best, best_load, ties) = (Some(worker), load, 1);
        } else if load == best_load {
            ties += 1;
            if fastrand::usize(..ties) == 0 {
                best = Some(worker);
            }
        }
    }
    best
}
