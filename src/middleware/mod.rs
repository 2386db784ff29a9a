//! The WebAssembly middleware pipeline (stub until the host lands).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http::uri::PathAndQuery;

use crate::body::RouterBody;
use crate::config::Config;
use crate::error::RouterError;
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::proxy::{Answer, Outbound};
use crate::tokenizer::Tokenizer;

/// A request on its way through the pipeline.
pub struct Exchange {
    pub id: u64,
    pub out: Outbound,
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
        Self { id, out }
    }
}

pub struct Pipeline {}

impl Pipeline {
    pub fn load(
        _config: &Config,
        _pool: Arc<Pool>,
        _metrics: Arc<Metrics>,
        _tokenizer: Option<Arc<Tokenizer>>,
    ) -> anyhow::Result<Self> {
        Ok(Self {})
    }

    pub async fn on_request(
        &self,
        _ex: &mut Exchange,
    ) -> Result<Option<Response<RouterBody>>, RouterError> {
        Ok(None)
    }

    pub fn route_owner(&self, _ex: &Exchange) -> Option<usize> {
        None
    }

    pub async fn handle(
        &self,
        _owner: usize,
        _ex: Exchange,
    ) -> Result<Response<RouterBody>, RouterError> {
        Err(RouterError::NotFound("no such route".into()))
    }

    pub fn wants_response(&self, _ex: &Exchange) -> bool {
        false
    }

    pub async fn on_response(
        &self,
        _ex: Exchange,
        answer: Answer,
        idle: Option<Duration>,
    ) -> Result<Response<RouterBody>, RouterError> {
        Ok(crate::server::passthrough(answer, idle))
    }
}
