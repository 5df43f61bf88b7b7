//! The web console: the static page at `/` and its assets under `/console/`, embedded in the
//! binary, with their content types and security and cache headers. It owns no data and no
//! auth: the page is public and calls the API from the browser with the key its user enters.

use super::error::ApiError;
use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

/// Same-origin everything, no inline script or style, no framing: the page only ever talks to
/// the server that sent it.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Browsers revalidate every time (a new binary serves new files under the same paths); the
/// `ETag` turns that into a 304 when nothing changed.
const CACHE_CONTROL: &str = "no-cache";

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const SVG: &str = "image/svg+xml";

/// Files under `/console/`: name, content type, bytes.
const ASSETS: [(&str, &str, &str); 9] = [
    ("app.js", JS, include_str!("../../console/app.js")),
    ("api.js", JS, include_str!("../../console/api.js")),
    ("adapters.js", JS, include_str!("../../console/adapters.js")),
    ("upload.js", JS, include_str!("../../console/upload.js")),
    ("playground.js", JS, include_str!("../../console/playground.js")),
    ("metrics.js", JS, include_str!("../../console/metrics.js")),
    ("chart.js", JS, include_str!("../../console/chart.js")),
    ("style.css", CSS, include_str!("../../console/style.css")),
    ("favicon.svg", SVG, include_str!("../../console/favicon.svg")),
];

const INDEX: &str = include_str!("../../console/index.html");

/// `GET /`: the console page.
pub async fn index(headers: HeaderMap) -> Response {
    file(&headers, HTML, INDEX)
}

/// `GET /console/{file}`: one of the page's assets; anything else is a 404 like any unknown route.
pub async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Result<Response, ApiError> {
    let (_, content_type, body) = ASSETS
        .iter()
        .find(|(n, _, _)| *n == name)
        .ok_or_else(|| ApiError::NotFound { what: "route", name: format!("/console/{name}") })?;
    Ok(file(&headers, content_type, body))
}

fn file(request: &HeaderMap, content_type: &'static str, body: &'static str) -> Response {
    let digest = Sha256::digest(body.as_bytes());
    let etag = format!("\"{}\"", digest[..12].iter().map(|b| format!("{b:02x}")).collect::<String>());
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut response = if fresh { StatusCode::NOT_MODIFIED.into_response() } else { body.into_response() };
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(CACHE_CONTROL));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    response
}
