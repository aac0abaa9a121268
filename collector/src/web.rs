//! HTTP building blocks every handler shares, the portal's included: the response body type,
//! complete, JSON and problem responses, and query-string decoding. Imports nothing of the
//! collector's own, so the server, the portal and the exports all build on it.

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Response, StatusCode, header};

/// The response body type of every handler, the portal's included: a boxed, `Send + Sync`
/// body of `Bytes` whose errors are `std::io::Error`. Build one with [`full`], [`json`] or
/// `http_body_util::BodyExt::boxed` over any body with those types.
pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// A complete body.
pub fn full(bytes: impl Into<Bytes>) -> BoxBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A response with `status`, `content_type` and a complete body.
pub fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<BoxBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

/// A JSON response.
pub fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<BoxBody> {
    match serde_json::to_vec(value) {
        Ok(v) => respond(status, "application/json", v),
        Err(e) => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal error",
            &e.to_string(),
        ),
    }
}

/// An RFC 9457 `application/problem+json` response.
pub fn problem(status: StatusCode, title: &str, detail: &str) -> Response<BoxBody> {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    respond(
        status,
        "application/problem+json",
        serde_json::to_vec(&body).unwrap_or_default(),
    )
}

/// 404 as problem+json.
pub fn not_found() -> Response<BoxBody> {
    problem(
        StatusCode::NOT_FOUND,
        "Not found",
        "there is nothing at this address",
    )
}

/// Decodes `application/x-www-form-urlencoded` text (the query string).
/// A `%` not followed by two hex digits, or bytes that are not UTF-8, are refused (`None`).
pub fn form_decode(s: &str) -> Option<String> {
    let escapes_ok = s.split('%').skip(1).all(|rest| {
        rest.as_bytes()
            .get(..2)
            .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if !escapes_ok {
        return None;
    }
    let spaced = s.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .ok()
        .map(std::borrow::Cow::into_owned)
}
