//! Prefill/decode disaggregation: a generation request goes to a prefill worker and a decode
//! worker at once, as SGLang's router dispatches it. The pair is on while at least one live
//! prefill and one live decode worker are registered.
//!
//! Both legs get the same body plus `bootstrap_host` (the prefill's host), `bootstrap_port`
//! (its registered port, or null) and `bootstrap_room` (a random integer in [0, 2^63), a list
//! of them for a batch), added as field edits so every other byte is kept. Each leg is picked
//! by the routing policy among its own role and holds its own in-flight slot. The client gets
//! the decode's answer, streamed as it comes; the prefill's is read to its end and dropped.
//! A connect failure on either leg (nothing was sent) moves the pair to other workers; any
//! other failure before the decode answers is a 502 naming the worker.

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::value::RawValue;

use crate::background::AbortOnDrop;
use crate::body::Lease;
use crate::error::RouterError;
use crate::json::Object;
use crate::policy::Routing;
use crate::pool::{NoPick, Pool};
use crate::proxy::{Answer, Failure, Outbound, Proxy};
use crate::upstream::Conn;
use crate::worker::{InFlight, Role, Tried, Worker, WorkerType};

/// Whether this request is a generation that a prefill/decode pair serves.
pub fn is_generation(out: &Outbound) -> bool {
    out.method == Method::POST
        && matches!(
            out.path.path(),
            "/generate" | "/v1/completions" | "/v1/chat/completions"
        )
}

/// Sends `out` to a prefill and a decode worker and answers with the decode's response.
pub async fn send(pool: &Pool, proxy: &Proxy, out: &mut Outbound) -> Result<Answer, RouterError> {
    Proxy::prepare(out);
    let object = Object::parse(&out.body).map_err(|e| {
        RouterError::BadRequest(format!(
            "a prefill/decode generation needs a JSON object body: {e}"
        ))
    })?;
    let rooms = batch_len(&object, out.path.path());
    let mut tried = Tried::default();
    let mut unreachable = None;
    let mut version_deadline = None;
    loop {
        let routing = Routing {
            path: out.path.path(),
            headers: &out.headers,
            body: &out.body,
        };
        let hint = out.hint.as_ref();
        // With no worker left to try, the client hears of the last one that failed.
        let mut no_worker = |role: &str| {
            unreachable
                .take()
                .unwrap_or(RouterError::NoLiveRole(role.to_owned()))
        };
        let picks = (
            pool.pick(&routing, hint, &tried, Role::Prefill),
            pool.pick(&routing, hint, &tried, Role::Decode),
        );
        let (prefill, decode) = match picks {
            (Ok(prefill), Ok(decode)) => (prefill, decode),
            (Err(NoPick::Version), _) | (_, Err(NoPick::Version)) => {
                proxy.await_version(pool, &mut version_deadline).await?;
                continue;
            }
            (Err(_), _) => return Err(no_worker("prefill")),
            (_, Err(_)) => return Err(no_worker("decode")),
        };
        let leg = Arc::new(Outbound {
            body: Bytes::from(with_bootstrap(object.clone(), prefill.worker(), rooms)),
            hint: None,
            ..out.clone()
        });
        let rids = proxy.register_rids(out, &[prefill.worker(), decode.worker()]);
        match pair(proxy, prefill, decode, leg).await {
            Ok(mut answer) => {
                answer.lease = answer.lease.with_rids(rids);
                return Ok(answer);
            }
            Err(Outcome::Retry(worker, error)) => {
                tracing::warn!(%error, "pair worker unreachable; re-pairing");
                unreachable = Some(error);
                tried.insert(&worker);
            }
            Err(Outcome::Fail(error)) => return Err(error),
        }
    }
}

/// Why a pair did not produce an answer.
enum Outcome {
    /// This worker could not be reached, so nothing of the pair ran there: pick again.
    Retry(Arc<Worker>, RouterError),
    Fail(RouterError),
}

type Leg =
    Pin<Box<dyn Future<Output = (InFlight, Result<(Response<Incoming>, Conn), Failure>)> + Send>>;

/// One leg on its own task-ready future, owning what it needs.
fn leg(proxy: &Proxy, out: &Arc<Outbound>, slot: InFlight) -> Leg {
    let (proxy, out) = (proxy.clone(), out.clone());
    Box::pin(async move {
        let result = proxy.attempt(&out, &slot).await;
        (slot, result)
    })
}

async fn pair(
    proxy: &Proxy,
    prefill: InFlight,
    decode: InFlight,
    out: Arc<Outbound>,
) -> Result<Answer, Outcome> {
    let mut permits = proxy.permits(2).await.map_err(Outcome::Fail)?;
    let prefill_permit = permits.split(1);
    let mut prefill_leg = leg(proxy, &out, prefill);
    let mut decode_leg = leg(proxy, &out, decode);
    let companion = tokio::select! {
        biased;
        (slot, result) = &mut decode_leg => {
            let (response, conn) = answered(proxy, &slot, result)?;
            // The decode answered first: the prefill leg finishes beside its stream.
            let lease = Lease::new(slot, permits, conn);
            let drain = async move {
                let (slot, result) = prefill_leg.await;
                if let (Ok((response, conn)), Some(permit)) = (result, prefill_permit) {
                    drain_prefill(response, Lease::new(slot, permit, conn)).await;
                }
            };
            let lease = lease.with_companion(AbortOnDrop::spawn(drain));
            return Ok(Answer { response, lease });
        }
        (slot, result) = &mut prefill_leg => {
            let (response, conn) = answered(proxy, &slot, result)?;
            let status = response.status();
            if status.is_server_error() {
                let url = slot.worker().url().to_owned();
                let reason = format!("prefill answered {status}");
                return Err(Outcome::Fail(RouterError::Upstream { url, reason }));
            }
            let Some(permit) = prefill_permit else {
                return Err(Outcome::Fail(RouterError::ShuttingDown));
            };
            let lease = Lease::new(slot, permit, conn);
            if status.is_client_error() {
                // The client's mistake: its answer says why; the decode leg is dropped.
                return Ok(Answer { response, lease });
            }
            AbortOnDrop::spawn(drain_prefill(response, lease))
        }
    };
    let (slot, result) = decode_leg.await;
    let (response, conn) = answered(proxy, &slot, result)?;
    let lease = Lease::new(slot, permits, conn).with_companion(companion);
    Ok(Answer { response, lease })
}

/// A leg's response head, or what its failure means for the pair.
fn answered(
    proxy: &Proxy,
    slot: &InFlight,
    result: Result<(Response<Incoming>, Conn), Failure>,
) -> Result<(Response<Incoming>, Conn), Outcome> {
    result.map_err(|failure| {
        let worker = slot.worker().clone();
        if let Failure::Local(_) = failure {
            return Outcome::Fail(failure.into_error(worker.url(), proxy.timeout()));
        }
        proxy.count_failure(&worker);
        let connect = matches!(failure, Failure::Connect(_));
        let error = failure.into_error(worker.url(), proxy.timeout());
        if connect {
            Outcome::Retry(worker, error)
        } else {
            Outcome::Fail(error)
        }
    })
}

/// Reads the prefill's answer to its end, so its connection is reused, and drops it.
async fn drain_prefill(response: Response<Incoming>, lease: Lease) {
    match response.into_body().collect().await {
        Ok(_) => lease.complete(),
        Err(e) => {
            let worker = lease.slot.worker().url().to_owned();
            tracing::debug!(worker, error = %e, "prefill answer cut short");
        }
    }
}

/// How many rooms the body needs: one per prompt of a batch, `None` for a single prompt.
fn batch_len(object: &Object<'_>, path: &str) -> Option<usize> {
    let key = if path == "/v1/completions" {
        "prompt"
    } else {
        "text"
    };
    fn items(raw: &RawValue) -> Option<Vec<&RawValue>> {
        serde_json::from_str(raw.get()).ok()
    }
    if let Some(list) = object.get(key).and_then(items) {
        let batch = key == "text" || list.first().is_some_and(|i| !is_number(i));
        return batch.then_some(list.len());
    }
    let ids = object.get("input_ids").and_then(items)?;
    ids.first()
        .is_some_and(|first| first.get().starts_with('['))
        .then_some(ids.len())
}

fn is_number(raw: &RawValue) -> bool {
    raw.get()
        .starts_with(|c: char| c == '-' || c.is_ascii_digit())
}

/// The body with the prefill's bootstrap fields and fresh rooms.
fn with_bootstrap(mut object: Object<'_>, prefill: &Worker, rooms: Option<usize>) -> Vec<u8> {
    let port = match prefill.kind() {
        WorkerType::Prefill {
            bootstrap_port: Some(port),
        } => port.to_string(),
        _ => "null".to_owned(),
    };
    // The host is a url's host (no quotes or backslashes), so it needs no escaping.
    object.set_json(
        "bootstrap_host",
        format!("\"{}\"", prefill.host()).into_bytes(),
    );
    object.set_json("bootstrap_port", port.into_bytes());
    let room = || fastrand::u64(..1 << 63).to_string();
    let rooms = match rooms {
        None => room(),
        Some(n) => format!("[{}]", (0..n).map(|_| room()).collect::<Vec<_>>().join(",")),
    };
    object.set_json("bootstrap_room", rooms.into_bytes());
    object.to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_counted() {
        let len = |body: &str, path| batch_len(&Object::parse(body.as_bytes()).unwrap(), path);
        assert_eq!(len(r#"{"text":"a"}"#, "/generate"), None);
        assert_eq!(len(r#"{"text":["a","b"]}"#, "/generate"), Some(2));
        assert_eq!(len(r#"{"input_ids":[1,2,3]}"#, "/generate"), None);
        assert_eq!(len(r#"{"input_ids":[[1],[2],[3]]}"#, "/generate"), Some(3));
        assert_eq!(len(r#"{"prompt":"a"}"#, "/v1/completions"), None);
        assert_eq!(len(r#"{"prompt":[1,2]}"#, "/v1/completions"), None);
        assert_eq!(len(r#"{"prompt":["a","b"]}"#, "/v1/completions"), Some(2));
        assert_eq!(
            len(r#"{"messages":[{"role":"user"}]}"#, "/v1/chat/completions"),
            None
        );
    }
}
