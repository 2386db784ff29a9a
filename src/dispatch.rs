//! One request's way through the router, in the order it happens: its path decoded as a
//! worker would route it; the router's own endpoints; else the body is read, `on-request`
//! hooks run (and may answer), a middleware may own the route, control calls fan out to the
//! workers, generation (its rids noted) goes to a prefill/decode pair when the pool has both,
//! and everything else is proxied to one worker; the answer goes back through the response
//! hooks.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;

use crate::admin;
use crate::app::App;
use crate::body::RouterBody;
use crate::control;
use crate::error::RouterError;
use crate::middleware::Exchange;
use crate::path;
use crate::pd;
use crate::proxy::{Answer, Proxy};
use crate::request::read_request;
use crate::rids;

/// One serving thread's view: the shared app and this thread's upstream client.
pub struct Local {
    /// Shared by every thread.
    pub app: Arc<App>,
    /// This thread's connections to the workers.
    pub proxy: Proxy,
}

/// Answers one request; every error becomes its JSON response here.
pub async fn handle(local: &Local, mut req: Request<Incoming>) -> Response<RouterBody> {
    match path::canonical(req.uri()) {
        Ok(Some(uri)) => *req.uri_mut() = uri,
        Ok(None) => {}
        Err(reason) => return RouterError::BadRequest(reason).into_response(),
    }
    let result = match admin::Route::of(req.uri().path()) {
        Some(route) => admin::serve(&local.app, route, req).await,
        None => proxied(local, req).await,
    };
    result.unwrap_or_else(|e| {
        if e.status().is_server_error() {
            tracing::warn!(error = %e, "request failed");
        } else {
            tracing::debug!(error = %e, "request rejected");
        }
        e.into_response()
    })
}

async fn proxied(
    local: &Local,
    req: Request<Incoming>,
) -> Result<Response<RouterBody>, RouterError> {
    let (app, proxy) = (&*local.app, &local.proxy);
    let pipeline = app.pipeline();
    let (parts, body) = req.into_parts();
    let body = read_request(&parts.headers, body, app.body_limit(), app.body_timeout()).await?;
    let mut exchange = Exchange::new(app.next_request_id(), parts, body);
    if let Some(reply) = pipeline.on_request(&mut exchange).await? {
        return Ok(reply);
    }
    if let Some(owner) = pipeline.route_owner(&exchange) {
        return pipeline.handle(owner, exchange).await;
    }
    if let Some(endpoint) = control::endpoint(exchange.out.path.path()) {
        return app
            .control()
            .serve(app.pool(), endpoint, &exchange.out)
            .await;
    }
    let generation = pd::is_generation(&exchange.out);
    if generation {
        exchange.out.rids = rids::of_body(&exchange.out.body);
    }
    let answer = if generation && app.pool().pairs_ready() {
        pd::send(app.pool(), proxy, &mut exchange.out).await?
    } else {
        proxy.send(app.pool(), &mut exchange.out).await?
    };
    if pipeline.wants_response(&exchange) {
        return pipeline
            .on_response(exchange, answer, proxy.timeout())
            .await;
    }
    Ok(passthrough(answer, proxy.timeout()))
}

/// The worker's response as it came, its body streamed with the lease attached.
fn passthrough(answer: Answer, idle_timeout: Option<Duration>) -> Response<RouterBody> {
    let (parts, incoming) = answer.response.into_parts();
    Response::from_parts(
        parts,
        RouterBody::upstream(incoming, answer.lease, idle_timeout),
    )
}
