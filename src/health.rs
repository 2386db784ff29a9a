//! Background health probes. Every worker, dead ones included, is probed in parallel each
//! round with a client of its own, so probes never queue behind proxied traffic and dead
//! workers come back once they answer again.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::background::AbortOnDrop;
use crate::pool::Pool;
use crate::worker::{Transition, Worker};

#[derive(Clone)]
pub struct Prober {
    client: reqwest::Client,
    path: String,
    failure_threshold: u32,
    success_threshold: u32,
}

impl Prober {
    pub fn new(
        timeout: Duration,
        path: &str,
        failure_threshold: u32,
        success_threshold: u32,
    ) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .pool_max_idle_per_host(1)
            .no_proxy()
            .build()?;
        let path = if path.starts_with('/') {
            path.to_owned()
        } else {
            format!("/{path}")
        };
        Ok(Self {
            client,
            path,
            failure_threshold,
            success_threshold,
        })
    }

    /// Probes one worker and applies the result to its state.
    pub async fn probe(&self, worker: &Worker) {
        let url = format!("{}{}", worker.url(), self.path);
        let outcome = match self.client.get(&url).send().await {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => Err(format!("status {}", response.status())),
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(()) => {
                if worker.record_success(self.success_threshold) == Some(Transition::Revived) {
                    tracing::info!(worker = worker.url(), "worker live again");
                    worker.versions().poke();
                }
                if worker.weight_version().is_none()
                    && let Some(version) = read_version(&self.client, worker).await
                {
                    worker.observe_version(&version);
                }
            }
            Err(reason) if worker.is_paused() => {
                // A paused engine cannot run its health check; it is not dead.
                tracing::debug!(worker = worker.url(), %reason, "health probe failed while paused");
            }
            Err(reason) => {
                tracing::debug!(worker = worker.url(), %reason, "health probe failed");
                if worker.record_failure(self.failure_threshold) == Some(Transition::Died) {
                    tracing::warn!(worker = worker.url(), %reason, "worker DEAD: taken out of routing");
                }
            }
        }
    }

    /// Probes every registered worker at once and waits for all of them.
    pub async fn round(&self, pool: &Pool) {
        let mut probes = JoinSet::new();
        for worker in pool.snapshot().iter() {
            let (prober, worker) = (self.clone(), worker.clone());
            probes.spawn(async move { prober.probe(&worker).await });
        }
        while probes.join_next().await.is_some() {}
    }
}

/// The `weight_version` a worker's `/get_model_info` reports, if it answers with one.
pub async fn read_version(client: &reqwest::Client, worker: &Worker) -> Option<String> {
    let url = format!("{}/get_model_info", worker.url());
    let bytes = client.get(url).send().await.ok()?.bytes().await.ok()?;
    let info: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    match info.get("weight_version")? {
        serde_json::Value::String(version) => Some(version.clone()),
        serde_json::Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

/// Asks the health loop to probe a worker now, off the caller's path (used when a known
/// url is re-added). Cheap to clone; probes stay on the loop's own client and runtime.
#[derive(Clone)]
pub struct ProbeNow(mpsc::UnboundedSender<Arc<Worker>>);

impl ProbeNow {
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<Arc<Worker>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self(tx), rx)
    }

    pub fn request(&self, worker: Arc<Worker>) {
        let _ = self.0.send(worker);
    }
}

/// Runs probe rounds every `interval`, and single probes on request, until dropped. Rounds
/// and single probes are owned by this loop and aborted with it.
pub async fn run(
    prober: Prober,
    pool: Arc<Pool>,
    interval: Duration,
    mut now: mpsc::UnboundedReceiver<Arc<Worker>>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    // Rounds run beside the loop so a slow round never delays a requested probe; a round
    // still running when the next tick comes is not doubled.
    let mut round: Option<AbortOnDrop<()>> = None;
    let mut single = JoinSet::new();
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                if round.as_ref().is_none_or(AbortOnDrop::is_finished) {
                    let (prober, pool) = (prober.clone(), pool.clone());
                    round = Some(AbortOnDrop::spawn(async move { prober.round(&pool).await }));
                }
            }
            Some(worker) = now.recv() => {
                let prober = prober.clone();
                single.spawn(async move { prober.probe(&worker).await });
            }
            Some(_) = single.join_next(), if !single.is_empty() => {}
        }
    }
}
