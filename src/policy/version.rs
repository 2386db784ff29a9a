//! `--version-policy any|latest|max-staleness:K`: which workers new requests may go to by
//! the weight version they run. `latest` allows only workers at the newest version a
//! registered worker of the role reports, `max-staleness:K` those at most K known versions
//! behind it; `any` (the default) does not look. A worker that reported no version counts as
//! the oldest. A dead worker's version still counts, so that its death does not make stale
//! workers current: requests wait for an updated worker instead.

use std::sync::Arc;

use crate::versions::Versions;
use crate::worker::{Role, Worker};

/// How far behind the newest weight version a worker may be to get new requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionPolicy {
    /// Any version.
    Any,
    /// At most this many versions behind (0: only the newest).
    Within(usize),
}

impl VersionPolicy {
    /// Parses `any`, `latest` or `max-staleness:K`.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "any" => Ok(Self::Any),
            "latest" => Ok(Self::Within(0)),
            other => other
                .strip_prefix("max-staleness:")
                .and_then(|k| k.parse().ok())
                .map(Self::Within)
                .ok_or_else(|| format!("expected any, latest or max-staleness:K, got {other:?}")),
        }
    }
}

/// The version bound of one pick.
#[derive(Debug, Clone, Copy)]
pub struct VersionGate<'a> {
    versions: &'a Versions,
    newest: Option<&'a str>,
    within: usize,
}

impl<'a> VersionGate<'a> {
    /// The gate `policy` sets for a pick of `role` among `workers`; none for `any`.
    pub fn new(
        policy: VersionPolicy,
        versions: &'a Versions,
        workers: &'a [Arc<Worker>],
        newest_of: &'a mut Option<Arc<str>>,
        role: Role,
    ) -> Option<Self> {
        let VersionPolicy::Within(within) = policy else {
            return None;
        };
        *newest_of = workers
            .iter()
            .filter(|w| w.kind().role() == role)
            .map(|w| w.weight_version())
            .max_by(|a, b| versions.cmp(a.as_deref(), b.as_deref()))
            .flatten();
        Some(Self {
            versions,
            newest: newest_of.as_deref(),
            within,
        })
    }

    /// Whether `worker`'s version is recent enough.
    pub fn allows(&self, worker: &Worker) -> bool {
        let version = worker.weight_version();
        self.versions.behind(version.as_deref(), self.newest) <= self.within
    }
}
