//! The path a request is routed on, as a worker routes it. Workers (uvicorn, Starlette)
//! percent-decode a path before matching it, so `/%67enerate` is `/generate` to them. The
//! router decodes once and goes on with the canonical spelling of the decoded path, so that
//! every check on the way (admin routes, middleware path filters, control endpoints) and the
//! worker see the same route. Paths whose decoding is ambiguous are refused: an encoded `/`
//! (one segment to a proxy, two to a worker), a NUL, or bytes that are not UTF-8.

use http::uri::{PathAndQuery, Uri};
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};

/// What stays encoded in a canonical path: what a path cannot hold, and `%` itself, so that
/// the worker's one decoding gives back exactly the path the router matched on.
const ENCODED: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// The admin route whose last segment is a percent-encoded worker url, slashes included; it
/// decodes that segment itself.
const RAW_SEGMENT_ROUTE: &str = "/workers/";

/// `uri` with its path in canonical form, or `None` when it is already (no `%` in it).
pub fn canonical(uri: &Uri) -> Result<Option<Uri>, String> {
    let raw = uri.path();
    if !raw.contains('%') || raw.starts_with(RAW_SEGMENT_ROUTE) {
        return Ok(None);
    }
    let lower = raw.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") {
        return Err(format!("path {raw:?} encodes a path separator"));
    }
    let decoded = percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| format!("path {raw:?} does not decode to UTF-8"))?;
    if decoded.contains('\0') {
        return Err(format!("path {raw:?} encodes a NUL"));
    }
    let mut text: String = utf8_percent_encode(&decoded, ENCODED).collect();
    if let Some(query) = uri.query() {
        text.push('?');
        text.push_str(query);
    }
    let path = PathAndQuery::try_from(text).map_err(|e| format!("path {raw:?}: {e}"))?;
    Ok(Some(Uri::from(path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(text: &str) -> Result<Option<String>, String> {
        let uri: Uri = text.parse().unwrap();
        canonical(&uri).map(|u| u.map(|u| u.to_string()))
    }

    #[test]
    fn decodes_once_like_a_worker() {
        assert_eq!(canon("/generate"), Ok(None));
        assert_eq!(canon("/%67enerate"), Ok(Some("/generate".into())));
        assert_eq!(
            canon("/%67enerate?a=%2F"),
            Ok(Some("/generate?a=%2F".into()))
        );
        // Decoded once, `%2567` is `%67`, which must reach the worker still meaning `%67`.
        assert_eq!(canon("/%2567"), Ok(Some("/%2567".into())));
        assert_eq!(canon("/caf%C3%A9"), Ok(Some("/caf%C3%A9".into())));
        assert_eq!(canon("/workers/http%3A%2F%2Fh%3A1"), Ok(None));
    }

    #[test]
    fn refuses_ambiguous_paths() {
        for bad in ["/gen%2Ferate", "/a%5cb", "/%00", "/%FF", "/x%c3"] {
            assert!(canon(bad).is_err(), "{bad}");
        }
    }
}
