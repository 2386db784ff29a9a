//! Which worker runs which request id. A generation body that carries `rid` (a string, or a
//! list for a batch) registers it for as long as the request is in flight, so that
//! `/abort_request {"rid": R}` reaches only the worker running R. A body without `rid` costs
//! one substring search and is never parsed; one with it is parsed for that field alone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use memchr::memmem;
use serde::Deserialize;

use crate::worker::Worker;

/// The rids of one request: what a generation or abort body names.
pub type RidList = Arc<[String]>;

/// The rids `body` names in its top-level `rid` field, if any.
pub fn of_body(body: &[u8]) -> Option<RidList> {
    memmem::find(body, b"\"rid\"")?;
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<Option<String>>),
    }
    #[derive(Deserialize)]
    struct RidField {
        rid: Option<OneOrMany>,
    }
    let rids: Vec<String> = match serde_json::from_slice::<RidField>(body).ok()?.rid? {
        OneOrMany::One(rid) => vec![rid],
        OneOrMany::Many(rids) => rids.into_iter().flatten().collect(),
    };
    (!rids.is_empty()).then(|| Arc::from(rids))
}

/// The rids in flight and the workers running them.
#[derive(Debug, Default)]
pub struct Rids {
    running: Mutex<HashMap<String, Vec<Arc<Worker>>>>,
}

impl Rids {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Vec<Arc<Worker>>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes that `workers` run `rids` until the guard drops.
    pub fn register(self: &Arc<Self>, rids: &RidList, workers: &[&Arc<Worker>]) -> RidGuard {
        let mut running = self.lock();
        for rid in rids.iter() {
            let entry = running.entry(rid.clone()).or_default();
            entry.extend(workers.iter().map(|w| Arc::clone(w)));
        }
        RidGuard {
            table: self.clone(),
            rids: rids.clone(),
            workers: workers.iter().map(|w| Arc::clone(w)).collect(),
        }
    }

    /// The workers running any of `rids`, each once; `None` when one of them is unknown, so
    /// that the caller falls back to asking every worker.
    pub fn workers(&self, rids: &[String]) -> Option<Vec<Arc<Worker>>> {
        let running = self.lock();
        let mut found: Vec<Arc<Worker>> = Vec::new();
        for rid in rids {
            for worker in running.get(rid)? {
                if !found.iter().any(|w| Arc::ptr_eq(w, worker)) {
                    found.push(worker.clone());
                }
            }
        }
        Some(found)
    }

    /// Whether no rid is in flight.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

/// One request's registration; dropping it forgets the request's rids on its workers.
#[derive(Debug)]
pub struct RidGuard {
    table: Arc<Rids>,
    rids: RidList,
    workers: Vec<Arc<Worker>>,
}

impl Drop for RidGuard {
    fn drop(&mut self) {
        let mut running = self.table.lock();
        for rid in self.rids.iter() {
            let Some(entry) = running.get_mut(rid) else {
                continue;
            };
            for worker in &self.workers {
                if let Some(at) = entry.iter().position(|w| Arc::ptr_eq(w, worker)) {
                    entry.swap_remove(at);
                }
            }
            if entry.is_empty() {
                running.remove(rid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::pool::Pool;
    use crate::worker::{WorkerType, WorkerUrl};

    #[test]
    fn rids_are_read_only_from_bodies_that_name_them() {
        let rids = |body: &str| of_body(body.as_bytes()).map(|r| r.to_vec());
        assert_eq!(rids(r#"{"text":"hi","rid":"a"}"#), Some(vec!["a".into()]));
        assert_eq!(
            rids(r#"{"rid":["a",null,"b"],"input_ids":[[1],[2],[3]]}"#),
            Some(vec!["a".into(), "b".into()])
        );
        assert_eq!(rids(r#"{"text":"no id"}"#), None);
        assert_eq!(rids(r#"{"text":"\"rid\" is only text"}"#), None);
        assert_eq!(rids(r#"{"rid":null}"#), None);
        assert_eq!(rids(r#"{"rid":"#), None);
    }

    #[test]
    fn guards_register_and_forget() {
        let pool = Pool::new(Arc::new(Metrics::new()));
        for port in [1, 2] {
            let url = WorkerUrl::parse(&format!("http://127.0.0.1:{port}")).unwrap();
            pool.add(url, WorkerType::Regular).unwrap();
        }
        let workers = pool.snapshot();
        let table = Arc::new(Rids::default());
        let ab: RidList = Arc::from(vec!["a".to_owned(), "b".to_owned()]);
        let a = table.register(&ab, &[&workers[0]]);
        let b: RidList = Arc::from(vec!["b".to_owned()]);
        let again = table.register(&b, &[&workers[1]]);
        assert_eq!(table.workers(&["a".into()]).unwrap().len(), 1);
        assert_eq!(table.workers(&["b".into()]).unwrap().len(), 2);
        assert!(table.workers(&["a".into(), "c".into()]).is_none());
        drop(a);
        assert!(table.workers(&["a".into()]).is_none());
        let left = table.workers(&["b".into()]).unwrap();
        assert_eq!(left[0].url(), workers[1].url());
        drop(again);
        assert!(table.is_empty());
    }
}
