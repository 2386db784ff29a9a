//! What the mock answers on each path.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::json;

use crate::body::{MockBody, full, json};
use crate::state::{InFlightCount, MockConfig, Seen, State, lock};
use crate::{control, generate};

pub(crate) async fn respond(
    config: &MockConfig,
    state: &Arc<State>,
    req: Request<Incoming>,
) -> Response<MockBody> {
    if let Some(answer) = probe(state, req.uri().path()) {
        return answer;
    }
    let count = InFlightCount::enter(state);
    let (parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|c| c.to_bytes()) else {
        return json(
            StatusCode::BAD_REQUEST,
            &json!({"error": "unreadable body"}),
        );
    };
    if config.record {
        lock(&state.seen).push(Seen {
            method: parts.method.clone(),
            path_and_query: parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned(),
            headers: parts.headers.clone(),
            body: body.clone(),
        });
    }
    let delay = header_number(&parts.headers, "x-mock-delay-ms")
        .map_or(config.delay, Duration::from_millis);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if let Some(status) = header_number(&parts.headers, "x-mock-status")
        .and_then(|s| u16::try_from(s).ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
    {
        return json(status, &json!({"error": "forced by x-mock-status"}));
    }
    match (&parts.method, parts.uri.path()) {
        (&Method::POST, "/mock/health") => {
            // `?healthy=false` makes /health answer 503 until `?healthy=true` (demos, chaos).
            let healthy = parts
                .uri
                .query()
                .is_none_or(|q| !q.contains("healthy=false"));
            state.healthy.store(healthy, Ordering::Relaxed);
            json(StatusCode::OK, &json!({"healthy": healthy}))
        }
        (&Method::POST, "/generate") => generate::generate(config, state, &body, count).await,
        (&Method::POST, path) if control::handles(path) => control::serve(state, path, &body),
        (&Method::GET, "/metrics") => metrics(state),
        (_, "/flush_cache") => json(StatusCode::OK, &json!({"success": true})),
        (_, "/echo") => echo(&parts, body),
        _ => json(
            StatusCode::NOT_FOUND,
            &json!({"error": format!("mock has no {}", parts.uri.path())}),
        ),
    }
}

/// The router's own probes: counted apart from requests and never recorded, so that tests
/// count only the traffic they sent.
fn probe(state: &State, path: &str) -> Option<Response<MockBody>> {
    let answer = match path {
        // A paused SGLang engine cannot run /health's probe generation, so it fails.
        "/health" | "/health_generate" if *state.paused.borrow() => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"error": "generation is paused"}),
        ),
        "/health" | "/health_generate" if state.healthy.load(Ordering::Relaxed) => {
            json(StatusCode::OK, &json!({}))
        }
        "/health" | "/health_generate" => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"error": "unhealthy"}),
        ),
        "/get_model_info" | "/model_info" => json(
            StatusCode::OK,
            &json!({"model_path": "mock", "tokenizer_path": null, "is_generation": true,
                    "weight_version": *lock(&state.weight_version)}),
        ),
        _ => return None,
    };
    state.probes.fetch_add(1, Ordering::Relaxed);
    Some(answer)
}

fn header_number(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.parse().ok()
}

fn echo(parts: &http::request::Parts, body: Bytes) -> Response<MockBody> {
    let mut response = Response::new(full(body));
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let headers = response.headers_mut();
    if let Some(content_type) = parts.headers.get(header::CONTENT_TYPE) {
        headers.insert(header::CONTENT_TYPE, content_type.clone());
    }
    if let Ok(method) = HeaderValue::from_str(parts.method.as_str()) {
        headers.insert("x-echo-method", method);
    }
    if let Ok(path) = HeaderValue::from_str(path) {
        headers.insert("x-echo-path", path);
    }
    response
}

/// A few of an SGLang engine's own metrics, in its naming and labels.
fn metrics(state: &State) -> Response<MockBody> {
    let load = |value: &std::sync::atomic::AtomicU64| value.load(Ordering::Relaxed);
    let running = state.generating.load(Ordering::Relaxed);
    let labels = r#"{model_name="mock",engine_type="unified",tp_rank="0",pp_rank="0"}"#;
    let mut text = String::new();
    for (name, kind, help, value) in [
        (
            "num_running_reqs",
            "gauge",
            "The number of running requests.",
            running as u64,
        ),
        (
            "num_queue_reqs",
            "gauge",
            "The number of requests in the waiting queue.",
            0,
        ),
        (
            "prompt_tokens_total",
            "counter",
            "Number of prefill tokens processed.",
            load(&state.prompt_tokens),
        ),
        (
            "generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            load(&state.generated_tokens),
        ),
        (
            "num_requests_total",
            "counter",
            "Number of requests processed.",
            load(&state.generations),
        ),
    ] {
        // prometheus_client's text format names a counter's family with its `_total`.
        text.push_str(&format!(
            "# HELP sglang:{name} {help}\n# TYPE sglang:{name} {kind}\nsglang:{name}{labels} {value}\n"
        ));
    }
    // Histograms, as an engine exports them: most of a real /metrics is their buckets.
    let requests = load(&state.generations);
    for (family, help) in [
        (
            "time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
        ),
        (
            "e2e_request_latency_seconds",
            "Histogram of End-to-end request latency in seconds",
        ),
    ] {
        text.push_str(&format!(
            "# HELP sglang:{family} {help}\n# TYPE sglang:{family} histogram\n"
        ));
        let labels = r#"model_name="mock",engine_type="unified""#;
        for le in [
            "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0", "30.0", "60.0", "+Inf",
        ] {
            text.push_str(&format!(
                "sglang:{family}_bucket{{{labels},le=\"{le}\"}} {requests}\n"
            ));
        }
        text.push_str(&format!(
            "sglang:{family}_sum{{{labels}}} 0.0\nsglang:{family}_count{{{labels}}} {requests}\n"
        ));
    }
    let mut response = Response::new(full(text));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}
