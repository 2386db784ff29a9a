//! The WebAssembly middleware pipeline. Each `--slime-router-middleware-paths` entry is a
//! component (see `wit/router.wit`): `on-request` hooks run in load order before the worker
//! is chosen, response hooks in reverse order after it answers, and a middleware may serve
//! routes of its own.

mod bindings;
mod edit;
mod engine;
mod host;
mod instance;
mod stream;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, Response, StatusCode, header};
use http_body_util::BodyExt;

use self::bindings::{Hooks, Reply, Request, RequestAction, RequestPatch, ResponsePatch};
use self::edit::{EditError, PROJECT_ABOVE, apply_body, apply_headers, project};
use self::engine::Engine;
use self::host::{HookTimers, Shared};
use self::instance::{Factory, Failure, Guest};
use crate::body::RouterBody;
use crate::config::Config;
use crate::error::RouterError;
use crate::metrics::Metrics;
use crate::pool::{Pool, RouteHint, WorkerUrl};
use crate::proxy::{Answer, Outbound};
use crate::tokenizer::Tokenizer;

/// A request on its way through the pipeline.
pub struct Exchange {
    pub id: u64,
    pub out: Outbound,
    /// Per-middleware bytes kept between hooks (`request-patch.stash`), by load index.
    stashes: Vec<Option<Vec<u8>>>,
}

impl Exchange {
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
        };
        Self {
            id,
            out,
            stashes: Vec::new(),
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

pub struct Pipeline {
    guests: Vec<Arc<Guest>>,
    metrics: Arc<Metrics>,
    _engine: Option<Engine>,
}

/// Paths the router serves itself; a middleware may not claim them.
const RESERVED: &[&str] = &[
    "/add_worker",
    "/remove_worker",
    "/list_workers",
    "/workers",
    "/metrics",
];

impl Pipeline {
    /// Compiles, instantiates and initialises every middleware in `config`, in order.
    pub async fn load(
        config: &Config,
        pool: Arc<Pool>,
        metrics: Arc<Metrics>,
        tokenizer: Option<Arc<Tokenizer>>,
    ) -> anyhow::Result<Self> {
        let specs = &config.slime_router_middleware_paths;
        if specs.is_empty() {
            return Ok(Self {
                guests: Vec::new(),
                metrics,
                _engine: None,
            });
        }
        let memory_cap = usize::try_from(config.middleware_memory_mib << 20).unwrap_or(usize::MAX);
        let deadline = Duration::from_secs_f64(config.middleware_deadline_ms / 1000.0);
        let engine = Engine::new(specs.len(), memory_cap, deadline)?;
        let mut guests: Vec<Arc<Guest>> = Vec::new();
        for spec in specs {
            let (file, guest_config) = spec.split_once('?').unwrap_or((spec, ""));
            let load = async {
                let pre = engine.prepare(Path::new(file))?;
                let factory = |name: String, metrics: Arc<Metrics>| Factory {
                    engine: engine.wasmtime().clone(),
                    epochs: engine.epochs().clone(),
                    pre: pre.clone(),
                    config: guest_config.to_owned(),
                    shared: Arc::new(Shared {
                        timers: HookTimers::new(&metrics, &name),
                        name,
                        metrics,
                        pool: pool.clone(),
                        tokenizer: tokenizer.clone(),
                    }),
                    memory_cap,
                    deadline,
                };
                // A first instance reads the manifest; it reports into throwaway metrics,
                // since its name (the file's) is not the one the middleware gives itself.
                let probe = Guest::load(factory(file_stem(file), Arc::new(Metrics::new()))).await?;
                let name = probe.manifest.name.clone();
                validate(&probe, &guests)?;
                Guest::load(factory(name, metrics.clone())).await
            };
            let guest = load.await.with_context(|| format!("middleware {file}"))?;
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
            metrics,
            _engine: Some(engine),
        })
    }

    fn report(&self, guest: &Guest, hook: &str, failure: &Failure) {
        self.metrics.middleware_failure(guest.name(), failure.kind);
        tracing::warn!(
            middleware = guest.name(),
            hook,
            kind = failure.kind,
            reason = %failure.reason,
            fail_open = guest.fails_open(),
            "middleware failed; instance will be rebuilt"
        );
    }

    fn failed(&self, guest: &Guest, hook: &str, failure: Failure) -> Result<(), RouterError> {
        self.report(guest, hook, &failure);
        if guest.fails_open() {
            return Ok(());
        }
        Err(RouterError::Middleware {
            name: guest.name().to_owned(),
            reason: failure.reason,
        })
    }

    /// Runs the request hooks; `Some` is a middleware's own answer.
    pub async fn on_request(
        &self,
        ex: &mut Exchange,
    ) -> Result<Option<Response<RouterBody>>, RouterError> {
        for (index, guest) in self.guests.iter().enumerate() {
            let hooks = Hooks::REQUEST | Hooks::REQUEST_BODY;
            if !guest.wants_any(hooks) || !guest.applies_to(ex.out.path.path()) {
                continue;
            }
            let started = Instant::now();
            let headers = wit_headers(&ex.out.headers);
            let request = ex.wit_request(&headers, guest.wants(Hooks::REQUEST_BODY));
            let input = request.body.map_or(0, <[u8]>::len);
            let action = guest
                .call(input, async |slot| {
                    let (handler, store) = slot.parts();
                    handler.call_on_request(store, request).await
                })
                .await;
            let outcome = match action {
                Ok(RequestAction::Continue(patch)) => {
                    apply_request_patch(ex, index, patch).map(|()| None)
                }
                Ok(RequestAction::Respond(reply)) => {
                    reply_response(reply).map(Some).map_err(|reason| Failure {
                        kind: "invalid-reply",
                        reason,
                    })
                }
                Err(failure) => Err(failure),
            };
            guest
                .timers()
                .request
                .observe(started.elapsed().as_secs_f64());
            match outcome {
                Ok(Some(response)) => return Ok(Some(response)),
                Ok(None) => {}
                Err(Failure {
                    kind: "bad-request",
                    reason,
                }) => return Err(RouterError::BadRequest(reason)),
                Err(failure) => self.failed(guest, "on-request", failure)?,
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

    pub async fn handle(
        &self,
        owner: usize,
        ex: Exchange,
    ) -> Result<Response<RouterBody>, RouterError> {
        let guest = &self.guests[owner];
        let started = Instant::now();
        let headers = wit_headers(&ex.out.headers);
        let request = ex.wit_request(&headers, true);
        let result = guest
            .call(ex.out.body.len(), async |slot| {
                let (handler, store) = slot.parts();
                handler.call_handle(store, request).await
            })
            .await
            .and_then(|reply| {
                reply_response(reply).map_err(|reason| Failure {
                    kind: "invalid-reply",
                    reason,
                })
            });
        guest
            .timers()
            .handle
            .observe(started.elapsed().as_secs_f64());
        result.map_err(|failure| {
            self.report(guest, "handle", &failure);
            RouterError::Middleware {
                name: guest.name().to_owned(),
                reason: failure.reason,
            }
        })
    }

    fn response_guests(&self, path: &str) -> impl Iterator<Item = (usize, &Arc<Guest>)> {
        let any = Hooks::RESPONSE | Hooks::RESPONSE_BODY | Hooks::RESPONSE_CHUNKS;
        self.guests
            .iter()
            .enumerate()
            .rev()
            .filter(move |(_, g)| g.manifest.hooks.intersects(any) && g.applies_to(path))
    }

    pub fn wants_response(&self, ex: &Exchange) -> bool {
        self.response_guests(ex.out.path.path()).next().is_some()
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
        let path = ex.out.path.path().to_owned();
        let streaming = is_event_stream(&parts.headers);
        let wants_body = !streaming
            && self
                .response_guests(&path)
                .any(|(_, g)| g.wants(Hooks::RESPONSE_BODY));
        let (mut body, mut incoming, mut lease) = (None, Some(incoming), Some(answer.lease));
        if wants_body {
            let collected = incoming.take().map(|b| b.collect());
            let bytes = match collected {
                Some(collect) => collect
                    .await
                    .map_err(|e| upstream_error(&lease, e))?
                    .to_bytes(),
                None => Bytes::new(),
            };
            if let Some(lease) = lease.take() {
                lease.complete();
            }
            body = Some(bytes);
        }
        let mut stashes = std::mem::take(&mut ex.stashes);
        let request_headers = wit_headers(&ex.out.headers);
        let head = ex.wit_request(&request_headers, false);
        let mut chunk_hooks = Vec::new();
        for (index, guest) in self.response_guests(&path) {
            let mut stash = stashes.get_mut(index).and_then(Option::take);
            if guest.wants_any(Hooks::RESPONSE | Hooks::RESPONSE_BODY) {
                let started = Instant::now();
                let with_body = guest.wants(Hooks::RESPONSE_BODY);
                let response_headers = wit_headers(&parts.headers);
                let fields = &guest.manifest.response_fields;
                let projected = body
                    .as_deref()
                    .filter(|b| with_body && !fields.is_empty() && b.len() > PROJECT_ABOVE)
                    .and_then(|b| project(b, fields));
                let response = bindings::Response {
                    worker: &worker,
                    status: parts.status.as_u16(),
                    headers: &response_headers,
                    body: projected
                        .as_deref()
                        .or(body.as_deref())
                        .filter(|_| with_body),
                };
                let input = response.body.map_or(0, <[u8]>::len);
                let patch = guest
                    .call(input, async |slot| {
                        let (handler, store) = slot.parts();
                        handler
                            .call_on_response(store, head.clone(), response, stash.as_deref())
                            .await
                    })
                    .await;
                let applied = patch.and_then(|mut patch| {
                    if let Some(new) = patch.stash.take() {
                        stash = Some(new);
                    }
                    apply_response_patch(&mut parts, &mut body, patch, streaming)
                });
                guest
                    .timers()
                    .response
                    .observe(started.elapsed().as_secs_f64());
                if let Err(failure) = applied {
                    self.failed(guest, "on-response", failure)?;
                }
            }
            if streaming && guest.wants(Hooks::RESPONSE_CHUNKS) {
                chunk_hooks.push(stream::ChunkHook {
                    guest: guest.clone(),
                    stash,
                });
            }
        }
        let body = match (body, incoming, lease) {
            (Some(bytes), _, _) => {
                parts.headers.remove(header::CONTENT_LENGTH);
                RouterBody::full(bytes)
            }
            (None, Some(incoming), Some(lease)) if !chunk_hooks.is_empty() => {
                parts.headers.remove(header::CONTENT_LENGTH);
                stream::spawn(
                    chunk_hooks,
                    ex.id,
                    incoming,
                    lease,
                    idle,
                    self.metrics.clone(),
                )
            }
            (None, Some(incoming), Some(lease)) => RouterBody::upstream(incoming, lease, idle),
            _ => RouterBody::empty(),
        };
        Ok(Response::from_parts(parts, body))
    }
}

fn upstream_error(lease: &Option<crate::body::Lease>, error: hyper::Error) -> RouterError {
    let url = lease
        .as_ref()
        .map(|l| l.slot.worker().url().to_owned())
        .unwrap_or_default();
    RouterError::Upstream {
        url,
        reason: error.to_string(),
    }
}

fn apply_request_patch(
    ex: &mut Exchange,
    index: usize,
    patch: RequestPatch,
) -> Result<(), Failure> {
    let invalid = |reason: String| Failure {
        kind: "invalid-patch",
        reason,
    };
    apply_headers(&mut ex.out.headers, patch.set_headers, patch.remove_headers).map_err(invalid)?;
    if let Some(path) = patch.set_path {
        ex.out.path = PathAndQuery::try_from(path.as_str())
            .ok()
            .filter(|p| p.as_str().starts_with('/'))
            .ok_or_else(|| invalid(format!("invalid path {path:?}")))?;
    }
    if let Some(edit) = patch.body {
        ex.out.body = apply_body(&ex.out.body, edit).map_err(|e| match e {
            EditError::NotAnObject(reason) => Failure {
                kind: "bad-request",
                reason,
            },
            EditError::Invalid(reason) => invalid(reason),
        })?;
    }
    if let Some(hint) = patch.route {
        ex.out.hint = Some(route_hint(hint));
    }
    if let Some(stash) = patch.stash {
        ex.set_stash(index, stash);
    }
    Ok(())
}

fn apply_response_patch(
    parts: &mut http::response::Parts,
    body: &mut Option<Bytes>,
    patch: ResponsePatch,
    streaming: bool,
) -> Result<(), Failure> {
    let invalid = |reason: String| Failure {
        kind: "invalid-patch",
        reason,
    };
    if let Some(status) = patch.set_status {
        parts.status = StatusCode::from_u16(status)
            .map_err(|_| invalid(format!("invalid status {status}")))?;
    }
    apply_headers(&mut parts.headers, patch.set_headers, patch.remove_headers).map_err(invalid)?;
    if let (Some(edit), false) = (patch.body, streaming) {
        let current = body.take().unwrap_or_default();
        let edited = apply_body(&current, edit).map_err(|e| match e {
            EditError::NotAnObject(reason) | EditError::Invalid(reason) => invalid(reason),
        })?;
        *body = Some(edited);
    }
    Ok(())
}

/// Hints name workers by url; canonical spelling makes `http://h:1/` match `http://h:1`.
fn route_hint(hint: bindings::RouteHint) -> RouteHint {
    let canonical = |url: String| {
        WorkerUrl::parse(&url)
            .map(|u| u.as_str().to_owned())
            .unwrap_or(url)
    };
    match hint {
        bindings::RouteHint::Prefer(url) => RouteHint::Prefer(canonical(url)),
        bindings::RouteHint::Among(urls) => {
            RouteHint::Among(urls.into_iter().map(canonical).collect())
        }
    }
}

fn reply_response(reply: Reply) -> Result<Response<RouterBody>, String> {
    let status = StatusCode::from_u16(reply.status)
        .map_err(|_| format!("invalid status {}", reply.status))?;
    let mut response = Response::new(RouterBody::full(Bytes::from(reply.body)));
    *response.status_mut() = status;
    apply_headers(response.headers_mut(), reply.headers, Vec::new())?;
    response.headers_mut().remove(header::CONTENT_LENGTH);
    Ok(response)
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
