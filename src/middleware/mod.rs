//! The WebAssembly middleware pipeline. Each `--slime-router-middleware-paths` entry is a
//! component (see `wit/router.wit`): `on-request` hooks run in load order before the worker
//! is chosen, response hooks in reverse order after it answers, and a middleware may serve
//! routes of its own.

mod bindings;
pub mod builtin;
mod edit;
mod engine;
mod host;
mod instance;
mod stream;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, Response, header};
use http_body_util::BodyExt;

use self::bindings::{Hooks, Request, RequestAction};
use self::edit::{apply_request_patch, apply_response_patch, reply_response};
use self::engine::Engine;
use self::host::{Hook, HookTimers, Shared};
use self::instance::{Factory, Failure, FailureKind, Guest};
use crate::body::{Lease, RouterBody};
use crate::error::RouterError;
use crate::json::{PROJECT_ABOVE, project};
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::proxy::{Answer, Outbound};
use crate::tokenizer::Tokenizer;

/// A request on its way through the pipeline.
pub struct Exchange {
    /// Router-assigned, unique for the router's lifetime.
    pub id: u64,
    /// The request as it will go to a worker (patched by `on-request` hooks).
    pub out: Outbound,
    /// Per-middleware bytes kept between hooks (`request-patch.stash`), by load index.
    stashes: Vec<Option<Vec<u8>>>,
    /// By load index, whether the middleware's `paths` selected the request as it reached
    /// that middleware. An earlier one may rewrite the path (chat completions to `/generate`),
    /// and the response goes back through everyone the request went through.
    selected: Vec<bool>,
}

impl Exchange {
    /// The client's request, not yet seen by any middleware.
    pub fn new(id: u64, parts: http::request::Parts, body: Bytes) -> Self {
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let out = Outbound {
            method: parts.method,
            path,
            headers: parts.headers,
            body,
            hint: None,
            rids: None,
        };
        Self {
            id,
            out,
            stashes: Vec::new(),
            selected: Vec::new(),
        }
    }

    fn set_stash(&mut self, index: usize, stash: Vec<u8>) {
        if self.stashes.len() <= index {
            self.stashes.resize_with(index + 1, || None);
        }
        self.stashes[index] = Some(stash);
    }

    /// The request as a guest sees it, borrowing `headers` (from [`wit_headers`]).
    fn wit_request<'a>(
        &'a self,
        headers: &'a [(&'a str, &'a [u8])],
        with_body: bool,
    ) -> Request<'a> {
        Request {
            id: self.id,
            method: self.out.method.as_str(),
            path: self.out.path.as_str(),
            headers,
            body: with_body.then_some(&self.out.body[..]),
        }
    }
}

/// How middleware is loaded and bounded.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// `path.wasm`, a built-in name (see [`builtin`]), either followed by `?config`, in
    /// pipeline order.
    pub specs: Vec<String>,
    /// Linear memory cap per instance, in bytes.
    pub memory_cap: usize,
    /// Guest CPU time per call, before the allowance for its input.
    pub deadline: Duration,
}

impl PipelineOptions {
    /// These middleware with the router's default limits (256 MiB, 5 ms).
    pub fn new(specs: Vec<String>) -> Self {
        Self {
            specs,
            memory_cap: 256 << 20,
            deadline: Duration::from_millis(5),
        }
    }
}

/// The loaded middleware, in pipeline order.
pub struct Pipeline {
    guests: Vec<Arc<Guest>>,
    _engine: Option<Engine>,
}

/// Paths the router serves itself; a middleware may not claim them.
const RESERVED: &[&str] = &[
    "/add_worker",
    "/remove_worker",
    "/list_workers",
    "/workers",
    "/metrics",
    "/engine_metrics",
    "/finish_session",
];

/// Everything a response hook reads besides its own stash.
struct ResponseView<'a> {
    head: Request<'a>,
    worker: &'a str,
    streaming: bool,
}

impl Pipeline {
    /// Compiles, instantiates and initialises every middleware of `options`, in order.
    pub async fn load(
        options: &PipelineOptions,
        pool: Arc<Pool>,
        metrics: Arc<Metrics>,
        tokenizer: Option<Arc<Tokenizer>>,
    ) -> anyhow::Result<Self> {
        if options.specs.is_empty() {
            return Ok(Self {
                guests: Vec::new(),
                _engine: None,
            });
        }
        let loader = Loader {
            engine: Engine::new(options.specs.len(), options.memory_cap, options.deadline)?,
            options,
            pool,
            metrics,
            tokenizer,
        };
        let mut guests: Vec<Arc<Guest>> = Vec::new();
        for spec in &options.specs {
            let (file, config) = spec.split_once('?').unwrap_or((spec, ""));
            let guest = loader
                .load(file, config, &guests)
                .await
                .with_context(|| format!("middleware {file}"))?;
            tracing::info!(
                middleware = guest.name(),
                file,
                stateful = guest.manifest.stateful,
                routes = guest.manifest.routes.len(),
                "middleware loaded"
            );
            guests.push(Arc::new(guest));
        }
        Ok(Self {
            guests,
            _engine: Some(loader.engine),
        })
    }

    /// A failure's effect on the request: skipped when the middleware fails open.
    fn failed(&self, guest: &Guest, failure: Failure) -> Result<(), RouterError> {
        match failure.kind {
            FailureKind::BadRequest => Err(RouterError::BadRequest(failure.reason)),
            _ if guest.fails_open() => Ok(()),
            _ => Err(RouterError::Middleware {
                name: guest.name().to_owned(),
                reason: failure.reason,
            }),
        }
    }

    /// Runs the request hooks; `Some` is a middleware's own answer.
    pub async fn on_request(
        &self,
        ex: &mut Exchange,
    ) -> Result<Option<Response<RouterBody>>, RouterError> {
        for (index, guest) in self.guests.iter().enumerate() {
            let applies = guest.applies_to(ex.out.path.path());
            ex.selected.push(applies);
            if !applies || !guest.wants_any(Hooks::REQUEST | Hooks::REQUEST_BODY) {
                continue;
            }
            let headers = wit_headers(&ex.out.headers);
            let request = ex.wit_request(&headers, guest.wants(Hooks::REQUEST_BODY));
            let input = request.body.map_or(0, <[u8]>::len);
            let action = guest
                .hook(
                    Hook::Request,
                    input,
                    async |slot| {
                        let (handler, store) = slot.parts();
                        handler.call_on_request(store, request).await
                    },
                    Ok,
                )
                .await;
            let outcome = action.and_then(|action| match action {
                RequestAction::Continue(patch) => {
                    let stash = apply_request_patch(&mut ex.out, patch)?;
                    if let Some(stash) = stash {
                        ex.set_stash(index, stash);
                    }
                    Ok(None)
                }
                RequestAction::Respond(reply) => reply_response(reply).map(Some),
            });
            match outcome {
                Ok(Some(response)) => return Ok(Some(response)),
                Ok(None) => {}
                Err(failure) => self.failed(guest, failure)?,
            }
        }
        Ok(None)
    }

    /// The middleware that serves this method and path itself, if any.
    pub fn route_owner(&self, ex: &Exchange) -> Option<usize> {
        let (method, path) = (ex.out.method.as_str(), ex.out.path.path());
        self.guests.iter().position(|g| {
            g.manifest
                .routes
                .iter()
                .any(|r| r.path == path && r.method.eq_ignore_ascii_case(method))
        })
    }

    /// Serves a route a middleware declared (see [`Pipeline::route_owner`]).
    pub async fn handle(
        &self,
        owner: usize,
        ex: Exchange,
    ) -> Result<Response<RouterBody>, RouterError> {
        let guest = &self.guests[owner];
        let headers = wit_headers(&ex.out.headers);
        let request = ex.wit_request(&headers, true);
        guest
            .hook(
                Hook::Handle,
                ex.out.body.len(),
                async |slot| {
                    let (handler, store) = slot.parts();
                    handler.call_handle(store, request).await
                },
                reply_response,
            )
            .await
            .map_err(|failure| RouterError::Middleware {
                name: guest.name().to_owned(),
                reason: failure.reason,
            })
    }

    /// The middleware with response hooks that the request went through, in reverse order.
    fn response_guests<'a>(
        &'a self,
        selected: &'a [bool],
    ) -> impl Iterator<Item = (usize, &'a Arc<Guest>)> {
        let any = Hooks::RESPONSE | Hooks::RESPONSE_BODY | Hooks::RESPONSE_CHUNKS;
        self.guests.iter().enumerate().rev().filter(move |(i, g)| {
            g.manifest.hooks.intersects(any) && selected.get(*i) == Some(&true)
        })
    }

    /// Whether any middleware has a response hook for this request.
    pub fn wants_response(&self, ex: &Exchange) -> bool {
        self.response_guests(&ex.selected).next().is_some()
    }

    /// Runs the response hooks (reverse load order) and builds the client's response.
    pub async fn on_response(
        &self,
        mut ex: Exchange,
        answer: Answer,
        idle: Option<Duration>,
    ) -> Result<Response<RouterBody>, RouterError> {
        let (mut parts, incoming) = answer.response.into_parts();
        let worker = answer.lease.slot.worker().url().to_owned();
        let selected = std::mem::take(&mut ex.selected);
        let streaming = is_event_stream(&parts.headers);
        let wants_body = !streaming
            && self
                .response_guests(&selected)
                .any(|(_, g)| g.wants(Hooks::RESPONSE_BODY));
        let (mut body, mut upstream) = (None, Some((incoming, answer.lease)));
        if wants_body && let Some((incoming, lease)) = upstream.take() {
            body = Some(buffer(incoming, lease, idle).await?);
        }
        let mut stashes = std::mem::take(&mut ex.stashes);
        let request_headers = wit_headers(&ex.out.headers);
        let view = ResponseView {
            head: ex.wit_request(&request_headers, false),
            worker: &worker,
            streaming,
        };
        let mut chunk_hooks = Vec::new();
        for (index, guest) in self.response_guests(&selected) {
            let mut stash = stashes.get_mut(index).and_then(Option::take);
            if guest.wants_any(Hooks::RESPONSE | Hooks::RESPONSE_BODY) {
                let result = response_hook(guest, &view, &mut parts, &mut body, &mut stash).await;
                if let Err(failure) = result {
                    self.failed(guest, failure)?;
                }
            }
            if streaming && guest.wants(Hooks::RESPONSE_CHUNKS) {
                chunk_hooks.push(stream::ChunkHook {
                    guest: guest.clone(),
                    stash,
                });
            }
        }
        let body = self.client_body(&mut parts, body, upstream, chunk_hooks, ex.id, idle);
        Ok(Response::from_parts(parts, body))
    }

    /// The body the client gets: the buffered (maybe edited) one, the worker's stream through
    /// the chunk hooks, or the worker's stream untouched.
    fn client_body(
        &self,
        parts: &mut http::response::Parts,
        body: Option<Bytes>,
        upstream: Option<(hyper::body::Incoming, Lease)>,
        chunk_hooks: Vec<stream::ChunkHook>,
        request_id: u64,
        idle: Option<Duration>,
    ) -> RouterBody {
        match (body, upstream) {
            (Some(bytes), _) => {
                parts.headers.remove(header::CONTENT_LENGTH);
                RouterBody::full(bytes)
            }
            (None, Some((incoming, lease))) if !chunk_hooks.is_empty() => {
                parts.headers.remove(header::CONTENT_LENGTH);
                stream::spawn(chunk_hooks, request_id, incoming, lease, idle)
            }
            (None, Some((incoming, lease))) => RouterBody::upstream(incoming, lease, idle),
            (None, None) => RouterBody::empty(),
        }
    }
}

/// What loading every middleware shares.
struct Loader<'a> {
    engine: Engine,
    options: &'a PipelineOptions,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    tokenizer: Option<Arc<Tokenizer>>,
}

impl Loader<'_> {
    /// Compiles one middleware and makes its first instance, which reads the manifest.
    async fn load(&self, file: &str, config: &str, loaded: &[Arc<Guest>]) -> anyhow::Result<Guest> {
        let pre = self.engine.prepare(&builtin::component(file)?)?;
        let factory = |name: String, metrics: Arc<Metrics>| Factory {
            engine: self.engine.wasmtime().clone(),
            epochs: self.engine.epochs().clone(),
            pre: pre.clone(),
            config: config.to_owned(),
            shared: Arc::new(Shared {
                timers: HookTimers::new(&metrics, &name),
                name,
                metrics,
                pool: self.pool.clone(),
                tokenizer: self.tokenizer.clone(),
                discarded: std::sync::atomic::AtomicU64::new(0),
            }),
            memory_cap: self.options.memory_cap,
            deadline: self.options.deadline,
        };
        // A first instance reads the manifest; it reports into throwaway metrics, since its
        // name (the file's) is not the one the middleware gives itself.
        let probe = Guest::load(factory(file_stem(file), Arc::new(Metrics::new()))).await?;
        let name = probe.manifest.name.clone();
        validate(&probe, loaded)?;
        Guest::load(factory(name, self.metrics.clone())).await
    }
}

/// Reads the worker's whole body through the same body type the client would get, so the
/// response timeout between chunks, the pause exemption, version scanning and connection
/// reuse apply as they do to a body streamed through.
async fn buffer(
    incoming: hyper::body::Incoming,
    lease: Lease,
    idle: Option<Duration>,
) -> Result<Bytes, RouterError> {
    let url = lease.slot.worker().url().to_owned();
    match RouterBody::upstream(incoming, lease, idle).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(RouterError::Upstream {
            url,
            reason: e.to_string(),
        }),
    }
}

/// One middleware's `on-response`: hands it the head (and, when it asks, the body or the
/// fields it reads), then applies its patch and keeps the stash it sets.
async fn response_hook(
    guest: &Guest,
    view: &ResponseView<'_>,
    parts: &mut http::response::Parts,
    body: &mut Option<Bytes>,
    stash: &mut Option<Vec<u8>>,
) -> Result<(), Failure> {
    let with_body = guest.wants(Hooks::RESPONSE_BODY);
    let fields = &guest.manifest.response_fields;
    let projected = body
        .as_deref()
        .filter(|b| with_body && !fields.is_empty() && b.len() > PROJECT_ABOVE)
        .and_then(|b| project(b, fields));
    let response_headers = wit_headers(&parts.headers);
    let response = bindings::Response {
        worker: view.worker,
        status: parts.status.as_u16(),
        headers: &response_headers,
        body: projected
            .as_deref()
            .or(body.as_deref())
            .filter(|_| with_body),
    };
    let input = response.body.map_or(0, <[u8]>::len);
    let current = stash.as_deref();
    let head = view.head.clone();
    let patch = guest
        .hook(
            Hook::Response,
            input,
            async |slot| {
                let (handler, store) = slot.parts();
                handler
                    .call_on_response(store, head, response, current)
                    .await
            },
            Ok,
        )
        .await?;
    let mut patch = patch;
    let new_stash = patch.stash.take();
    drop(response_headers);
    apply_response_patch(parts, body, patch, view.streaming)?;
    if let Some(new) = new_stash {
        *stash = Some(new);
    }
    Ok(())
}

fn wit_headers(headers: &HeaderMap) -> Vec<(&str, &[u8])> {
    headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_bytes()))
        .collect()
}

fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"))
}

fn file_stem(file: &str) -> String {
    Path::new(file)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or(file)
        .to_owned()
}

/// Rejects manifests the router cannot honour, at startup rather than on traffic.
fn validate(guest: &Guest, loaded: &[Arc<Guest>]) -> anyhow::Result<()> {
    let manifest = &guest.manifest;
    if manifest.name.trim().is_empty() {
        bail!("manifest name is empty");
    }
    for path in &manifest.paths {
        if !path.starts_with('/') {
            bail!("manifest path {path:?} must start with '/'");
        }
    }
    for route in &manifest.routes {
        if !route.path.starts_with('/') || route.path.contains('?') {
            bail!(
                "route path {:?} must start with '/' and carry no query",
                route.path
            );
        }
        if http::Method::from_bytes(route.method.as_bytes()).is_err() {
            bail!("route method {:?} is not an HTTP method", route.method);
        }
        if RESERVED.contains(&route.path.as_str()) || route.path.starts_with("/workers/") {
            bail!("route {} is served by the router itself", route.path);
        }
        let taken = loaded.iter().find(|g| {
            g.manifest
                .routes
                .iter()
                .any(|r| r.path == route.path && r.method.eq_ignore_ascii_case(&route.method))
        });
        if let Some(other) = taken {
            bail!(
                "route {} {} is already served by middleware {}",
                route.method,
                route.path,
                other.name()
            );
        }
    }
    Ok(())
}
