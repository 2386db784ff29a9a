//! A mock SGLang worker for tests, demos and benchmarks: `/generate` (text or input_ids,
//! deterministic output in SGLang's response shape, SSE when `stream: true`), `/health`
//! (switchable), `/get_model_info`, `/abort_request`, `/flush_cache`, and `/echo`, which
//! answers with the request body byte for byte. It binds before it returns its URL, so a
//! test never sleeps waiting for it.
//!
//! Per-request knobs (headers): `x-mock-delay-ms` delays the answer, `x-mock-status` forces
//! a status. `POST /mock/health?healthy=false` makes `/health` answer 503 (and `=true` undoes
//! it), for demos of the router's health checks.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::body::RouterBody;
use crate::tokenizer::Tokenizer;

/// The continuation every mock generation draws from.
const PHRASE: &str = " the quick brown fox jumps over the lazy dog and keeps running far away";

/// How the mock behaves; defaults answer at once.
#[derive(Clone, Default)]
pub struct MockConfig {
    /// Delay before every answer.
    pub delay: Duration,
    /// Fraction of /generate requests answered with 500.
    pub failure_rate: f64,
    /// Pace of streamed tokens (0 = as fast as possible); also paces non-streamed answers.
    pub tokens_per_second: f64,
    /// `meta_info.weight_version` to report.
    pub weight_version: String,
    /// Encode/decode with a real tokenizer; without one a token is a byte.
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// Keep every request for [`MockWorker::seen`] (tests); off for long benchmark runs.
    pub record: bool,
    /// Bytes of base64-like `meta_info.routed_experts` per answer (MoE routing replay makes
    /// SGLang answers megabytes long); 0 leaves the field out.
    pub routed_experts_bytes: usize,
}

/// One request as the mock received it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Default)]
struct State {
    healthy: AtomicBool,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    requests: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
    scripted: Mutex<Option<Vec<u32>>>,
}

/// A running mock worker; dropping it stops it.
pub struct MockWorker {
    addr: SocketAddr,
    config: MockConfig,
    state: Arc<State>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl MockWorker {
    /// Starts on an ephemeral loopback port.
    pub async fn start(config: MockConfig) -> std::io::Result<Self> {
        Self::start_on(
            "127.0.0.1:0".parse().map_err(std::io::Error::other)?,
            config,
        )
        .await
    }

    pub async fn start_on(addr: SocketAddr, config: MockConfig) -> std::io::Result<Self> {
        let state = Arc::new(State::default());
        state.healthy.store(true, Ordering::Relaxed);
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let server = Some(tokio::spawn(serve(listener, config.clone(), state.clone())));
        Ok(Self {
            addr,
            config,
            state,
            server,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Kills the worker: stops listening and drops every open connection mid-request.
    pub fn kill(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }

    /// Serves again on the same port after [`kill`](Self::kill).
    pub async fn restart(&mut self) -> std::io::Result<()> {
        self.kill();
        let listener = TcpListener::bind(self.addr).await?;
        self.server = Some(tokio::spawn(serve(
            listener,
            self.config.clone(),
            self.state.clone(),
        )));
        Ok(())
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.state.healthy.store(healthy, Ordering::Relaxed);
    }

    /// The next /generate answers with exactly these output ids.
    pub fn script_output(&self, ids: Vec<u32>) {
        *lock(&self.state.scripted) = Some(ids);
    }

    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::Relaxed)
    }

    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::Relaxed)
    }

    /// Every request received so far (kept only with `MockConfig::record`).
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.state.seen).clone()
    }

    pub fn last_seen(&self) -> Option<Seen> {
        lock(&self.state.seen).last().cloned()
    }
}

impl Drop for MockWorker {
    fn drop(&mut self) {
        self.kill();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Loads a tokenizer for the mock (same file the router gets), for tests and demos.
pub fn load_tokenizer(path: &Path) -> anyhow::Result<Arc<Tokenizer>> {
    Ok(Arc::new(Tokenizer::load(path)?))
}

async fn serve(listener: TcpListener, config: MockConfig, state: Arc<State>) {
    // Connection tasks live in this set so aborting the server drops them all (a "kill").
    let mut connections = JoinSet::new();
    let config = Arc::new(config);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (config, state) = (config.clone(), state.clone());
        let service = service_fn(move |req| {
            let (config, state) = (config.clone(), state.clone());
            async move { Ok::<_, Infallible>(respond(&config, &state, req).await) }
        });
        connections.spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

struct InFlightCount(Arc<State>);

impl InFlightCount {
    fn enter(state: &Arc<State>) -> Self {
        let now = state.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        state.max_in_flight.fetch_max(now, Ordering::Relaxed);
        state.requests.fetch_add(1, Ordering::Relaxed);
        Self(state.clone())
    }
}

impl Drop for InFlightCount {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn respond(
    config: &MockConfig,
    state: &Arc<State>,
    req: Request<Incoming>,
) -> Response<RouterBody> {
    let count = InFlightCount::enter(state);
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return json(
                StatusCode::BAD_REQUEST,
                &json!({"error": "unreadable body"}),
            );
        }
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    if config.record {
        lock(&state.seen).push(Seen {
            method: parts.method.clone(),
            path_and_query,
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
        .and_then(|s| StatusCode::from_u16(s as u16).ok())
    {
        return json(status, &json!({"error": "forced by x-mock-status"}));
    }
    match (parts.method.clone(), parts.uri.path()) {
        (Method::POST, "/mock/health") => {
            // `?healthy=false` makes /health answer 503 until `?healthy=true` (demos, chaos).
            let healthy = parts
                .uri
                .query()
                .is_none_or(|q| !q.contains("healthy=false"));
            state.healthy.store(healthy, Ordering::Relaxed);
            json(StatusCode::OK, &json!({"healthy": healthy}))
        }
        (_, "/health" | "/health_generate") => {
            if state.healthy.load(Ordering::Relaxed) {
                json(StatusCode::OK, &json!({}))
            } else {
                json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"error": "unhealthy"}),
                )
            }
        }
        (Method::POST, "/generate") => generate(config, state, &body, count).await,
        (_, "/get_model_info") => json(
            StatusCode::OK,
            &json!({"model_path": "mock", "tokenizer_path": null, "is_generation": true}),
        ),
        (_, "/abort_request" | "/flush_cache") => json(StatusCode::OK, &json!({"success": true})),
        (_, "/echo") => echo(&parts, body),
        _ => json(
            StatusCode::NOT_FOUND,
            &json!({"error": format!("mock has no {}", parts.uri.path())}),
        ),
    }
}

fn header_number(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.parse().ok()
}

fn echo(parts: &http::request::Parts, body: Bytes) -> Response<RouterBody> {
    let mut response = Response::new(RouterBody::full(body));
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let headers = response.headers_mut();
    if let Some(content_type) = parts.headers.get(header::CONTENT_TYPE) {
        headers.insert(header::CONTENT_TYPE, content_type.clone());
    }
    headers.extend(
        [
            (
                header::HeaderName::from_static("x-echo-method"),
                HeaderValue::from_str(parts.method.as_str()).ok(),
            ),
            (
                header::HeaderName::from_static("x-echo-path"),
                HeaderValue::from_str(path).ok(),
            ),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?))),
    );
    response
}

fn json(status: StatusCode, value: &Value) -> Response<RouterBody> {
    let mut response = Response::new(RouterBody::full(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// What one generation produces, before it is shaped into JSON.
struct Generation {
    prompt_tokens: usize,
    ids: Vec<u32>,
    texts: Vec<String>,
    logprob: bool,
    weight_version: String,
    routed_experts: Option<String>,
}

impl Generation {
    /// SGLang's response for the first `n` tokens (streams send cumulative events).
    fn to_json(&self, n: usize, finished: bool) -> Value {
        let ids = &self.ids[..n];
        let mut meta = json!({
            "id": "mock",
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": n,
            "cached_tokens": 0,
            "weight_version": self.weight_version,
            "finish_reason": if finished { json!({"type": "length", "length": n}) } else { Value::Null },
        });
        if self.logprob {
            let logprobs: Vec<Value> = ids
                .iter()
                .enumerate()
                .map(|(i, id)| json!([mock_logprob(i), id, null]))
                .collect();
            meta["output_token_logprobs"] = Value::Array(logprobs);
        }
        if let Some(experts) = &self.routed_experts {
            meta["routed_experts"] = Value::String(experts.clone());
        }
        json!({"text": self.texts[..n].concat(), "output_ids": ids, "meta_info": meta})
    }
}

/// A deterministic, clearly non-zero logprob for output position `i`.
pub fn mock_logprob(i: usize) -> f64 {
    -0.125 * (1 + i % 7) as f64
}

async fn generate(
    config: &MockConfig,
    state: &Arc<State>,
    body: &[u8],
    count: InFlightCount,
) -> Response<RouterBody> {
    let request: Value = match serde_json::from_slice(body) {
        Ok(value @ Value::Object(_)) => value,
        _ => {
            return json(
                StatusCode::BAD_REQUEST,
                &json!({"error": "body must be a JSON object"}),
            );
        }
    };
    if config.failure_rate > 0.0 && fastrand::f64() < config.failure_rate {
        return json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({"error": "mock failure"}),
        );
    }
    let generation = match plan(config, state, &request) {
        Ok(generation) => generation,
        Err(error) => return json(StatusCode::BAD_REQUEST, &json!({"error": error})),
    };
    let pace = (config.tokens_per_second > 0.0)
        .then(|| Duration::from_secs_f64(1.0 / config.tokens_per_second));
    if request.get("stream").and_then(Value::as_bool) == Some(true) {
        return stream(generation, pace, count);
    }
    if let Some(pace) = pace {
        tokio::time::sleep(pace * generation.ids.len() as u32).await;
    }
    json(
        StatusCode::OK,
        &generation.to_json(generation.ids.len(), true),
    )
}

fn plan(config: &MockConfig, state: &State, request: &Value) -> Result<Generation, String> {
    let prompt = match (request.get("text"), request.get("input_ids")) {
        (Some(Value::String(text)), _) => encode(config, text)?,
        (_, Some(Value::Array(ids))) => ids
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|id| u32::try_from(id).ok())
                    .ok_or("input_ids must be u32")
            })
            .collect::<Result<Vec<u32>, _>>()?,
        _ => return Err("request needs text or input_ids".to_owned()),
    };
    let max_new = request
        .pointer("/sampling_params/max_new_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(16) as usize;
    let ids = match lock(&state.scripted).take() {
        Some(ids) => ids,
        None => {
            let start = prompt.iter().fold(prompt.len(), |h, &id| {
                h.wrapping_mul(31).wrapping_add(id as usize)
            }) % PHRASE.len();
            let phrase = format!("{}{}", &PHRASE[start..], PHRASE);
            let mut ids = encode(config, &phrase)?;
            ids.truncate(max_new);
            ids
        }
    };
    let texts = ids
        .iter()
        .map(|&id| decode(config, &[id]))
        .collect::<Result<Vec<_>, _>>()?;
    let texts = fix_split_chars(config, &ids, texts)?;
    let logprob = request.get("return_logprob").and_then(Value::as_bool) == Some(true);
    let weight_version = if config.weight_version.is_empty() {
        "default".to_owned()
    } else {
        config.weight_version.clone()
    };
    let routed_experts = (config.routed_experts_bytes > 0)
        .then(|| "QUJD".repeat(config.routed_experts_bytes.div_ceil(4)));
    Ok(Generation {
        prompt_tokens: prompt.len(),
        ids,
        texts,
        logprob,
        weight_version,
        routed_experts,
    })
}

/// Per-token texts must concatenate to the decoded whole; tokens that split a character
/// decode badly alone, so give the whole text to the last token in that case.
fn fix_split_chars(
    config: &MockConfig,
    ids: &[u32],
    texts: Vec<String>,
) -> Result<Vec<String>, String> {
    let whole = decode(config, ids)?;
    if texts.concat() == whole {
        return Ok(texts);
    }
    let mut fixed = vec![String::new(); ids.len()];
    if let Some(last) = fixed.last_mut() {
        *last = whole;
    }
    Ok(fixed)
}

fn encode(config: &MockConfig, text: &str) -> Result<Vec<u32>, String> {
    match &config.tokenizer {
        Some(tokenizer) => tokenizer.encode(text),
        None => Ok(text.bytes().map(u32::from).collect()),
    }
}

fn decode(config: &MockConfig, ids: &[u32]) -> Result<String, String> {
    match &config.tokenizer {
        Some(tokenizer) => tokenizer.decode(ids, true),
        None => {
            let bytes: Vec<u8> = ids
                .iter()
                .map(|&id| u8::try_from(id).unwrap_or(b'?'))
                .collect();
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
    }
}

fn stream(
    generation: Generation,
    pace: Option<Duration>,
    count: InFlightCount,
) -> Response<RouterBody> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let _count = count;
        let total = generation.ids.len();
        for n in 1..=total {
            if let Some(pace) = pace {
                tokio::time::sleep(pace).await;
            }
            let event = format!("data: {}\n\n", generation.to_json(n, n == total));
            if tx.send(Ok(Frame::data(Bytes::from(event)))).await.is_err() {
                return;
            }
        }
        let _ = tx
            .send(Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n"))))
            .await;
    });
    let mut response = Response::new(RouterBody::Channel(rx));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    response
}
