//! Answers the proxy gives instead of the origin's: HTML for browsers, problem+json for API and
//! XHR clients, plain text for command-line clients; the incident id in a header and in the body.

use http::{HeaderMap, HeaderValue, Response, StatusCode, header};

use super::body::{ProxyBody, full};

/// Header carrying the incident id.
pub const INCIDENT_HEADER: &str = "x-sluice-incident";

/// How the client wants to be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    /// A browser navigating (Accept has text/html).
    Browser,
    /// An API or XHR client (Accept has json, or it is an XHR).
    Api,
    /// Anything else (curl, scripts).
    Text,
}

impl ClientKind {
    /// From the request headers.
    pub fn of(headers: &HeaderMap) -> Self {
        let accept = headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let xhr = headers
            .get("x-requested-with")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("xmlhttprequest"));
        if xhr || accept.contains("json") {
            Self::Api
        } else if accept.contains("text/html") {
            Self::Browser
        } else {
            Self::Text
        }
    }
}

/// A page: what happened, why, and what to do.
#[derive(Debug, Clone)]
pub struct Page<'a> {
    /// HTTP status.
    pub status: StatusCode,
    /// Short title.
    pub title: &'a str,
    /// What happened and why.
    pub detail: &'a str,
    /// What the user can do about it.
    pub hint: &'a str,
    /// Incident id.
    pub incident: &'a str,
}

/// `s` escaped for HTML text and attribute values.
pub fn html_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '&' => o.push_str("&amp;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// Renders `page` for `kind`.
pub fn render(page: &Page<'_>, kind: ClientKind) -> Response<ProxyBody> {
    let (ctype, body) = match kind {
        ClientKind::Browser => (
            "text/html; charset=utf-8",
            format!(
                "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title></head>\
                 <body style=\"font-family:sans-serif;max-width:40em;margin:3em auto\">\
                 <h1>{t}</h1><p>{d}</p><p>{h}</p><p><small>Sluice incident {i}</small></p></body></html>\n",
                t = html_escape(page.title),
                d = html_escape(page.detail),
                h = html_escape(page.hint),
                i = html_escape(page.incident)
            ),
        ),
        ClientKind::Api => (
            "application/problem+json",
            serde_json::json!({
                "type": "about:blank",
                "title": page.title,
                "status": page.status.as_u16(),
                "detail": page.detail,
                "hint": page.hint,
                "incident": page.incident,
            })
            .to_string(),
        ),
        ClientKind::Text => (
            "text/plain; charset=utf-8",
            format!(
                "{}\n{}\n{}\nincident: {}\n",
                page.title, page.detail, page.hint, page.incident
            ),
        ),
    };
    let mut resp = Response::new(full(body));
    *resp.status_mut() = page.status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(page.incident) {
        h.insert(INCIDENT_HEADER, v);
    }
    resp
}

/// A new incident / request id: 16 hex digits, unique per process run and unpredictable across
/// runs (a random 32-bit prefix drawn once, then a counter), without a CSPRNG call per request.
pub fn new_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static PREFIX: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| {
        let mut b = [0u8; 4];
        if rustls::crypto::aws_lc_rs::default_provider()
            .secure_random
            .fill(&mut b)
            .is_err()
        {
            b = (std::process::id()).to_be_bytes();
        }
        u64::from(u32::from_be_bytes(b)) << 32
    });
    let n = prefix | (COUNTER.fetch_add(1, Ordering::Relaxed) & 0xffff_ffff);
    // Not `format!`: an id is made per request, and this is one allocation without the
    // formatting machinery.
    hex::encode(n.to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_sixteen_hex_digits_and_differ() {
        let a = new_id();
        let b = new_id();
        assert_eq!(a.len(), 16);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a, b);
        // The counter is the low half: consecutive ids differ by one there.
        let (pa, na) = a.split_at(8);
        let (pb, nb) = b.split_at(8);
        assert_eq!(pa, pb);
        let n = |s: &str| u64::from_str_radix(s, 16).expect("hex");
        assert_eq!(n(nb), n(na) + 1);
    }

    #[test]
    fn answers_fit_the_client_and_escape_html() {
        let page = Page {
            status: StatusCode::BAD_GATEWAY,
            title: "Blocked <x>",
            detail: "d",
            hint: "h",
            incident: "abc",
        };
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_static("text/html,*/*"));
        let r = render(&page, ClientKind::of(&h));
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        assert_eq!(r.headers()[INCIDENT_HEADER], "abc");
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        assert_eq!(ClientKind::of(&h), ClientKind::Api);
        assert_eq!(ClientKind::of(&HeaderMap::new()), ClientKind::Text);
        assert!(html_escape("<a href='x'>&").contains("&lt;a href=&#39;x&#39;&gt;&amp;"));
        assert_eq!(new_id().len(), 16);
        assert_ne!(new_id(), new_id());
    }
}
