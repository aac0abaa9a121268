//! HTML building blocks of the portal: escaping, URL encoding and decoding, the page frame, the
//! one stylesheet, and times for people. Every value that reaches a page goes through [`esc`]
//! (element content and attribute values alike: both quote kinds are escaped).

use std::fmt::Write as _;

/// Escapes text for HTML element content and (double- or single-quoted) attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Controls other than tab and newline have no business in a page.
            c if c.is_control() && c != '\n' && c != '\t' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a URL component (everything but RFC 3986 unreserved characters).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Decodes a `application/x-www-form-urlencoded` component (`+` is a space); `None` on a bad
/// escape or invalid UTF-8. The API's own decoder, so the portal and the API read alike.
pub use crate::web::form_decode as url_decode;

/// Parses `a=1&b=2` (a query string or a urlencoded form). Undecodable pairs are skipped; at
/// most 64 pairs are read.
pub fn parse_pairs(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .take(64)
        .filter_map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((url_decode(k)?, url_decode(v)?))
        })
        .collect()
}

/// The first value of `name` among `pairs`.
pub fn get<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// `path?k=v&...` with the non-empty values encoded.
pub fn link(path: &str, params: &[(&str, &str)]) -> String {
    let mut s = path.to_owned();
    let mut first = true;
    for (k, v) in params.iter().filter(|(_, v)| !v.is_empty()) {
        s.push(if first { '?' } else { '&' });
        first = false;
        let _ = write!(s, "{}={}", url_encode(k), url_encode(v));
    }
    s
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS` UTC (`-` when out of range).
pub fn time_ms(ms: i64) -> String {
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000) else {
        return "-".into();
    };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// How long ago `ms` was, roughly (`42 s ago`, `5 min ago`, `3 h ago`, `2 d ago`).
pub fn ago(ms: i64, now: i64) -> String {
    let s = (now - ms).max(0) / 1000;
    match s {
        0..60 => format!("{s} s ago"),
        60..3600 => format!("{} min ago", s / 60),
        3600..86_400 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    }
}

/// A stored `|a|b|` list as `a, b`.
pub fn list(joined: &str) -> String {
    joined
        .split('|')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Which navigation entry is current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    /// The activity log.
    Activity,
    /// Devices.
    Devices,
    /// Bundles.
    Bundles,
    /// Users' risk and devices' marks.
    Risk,
    /// Alerts.
    Alerts,
    /// The signed-in person's own page.
    Me,
    /// None (login, errors).
    None,
}

/// The signed-in user and the session's CSRF token, for the page frame.
#[derive(Debug, Clone)]
pub struct Who<'a> {
    /// Admin name, or a member's e-mail address.
    pub user: &'a str,
    /// The session's CSRF token.
    pub csrf: &'a str,
    /// Whether the admin pages are theirs (members see only their own page in the navigation).
    pub admin: bool,
}

/// A hidden CSRF field.
pub fn csrf_field(token: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(token)
    )
}

/// The whole page: head, navigation (when signed in), `body`.
pub fn page(title: &str, nav: Nav, who: Option<&Who<'_>>, body: &str) -> String {
    let mut s = String::with_capacity(body.len() + 1024);
    let _ = write!(
        s,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · Sluice</title><link rel=\"stylesheet\" href=\"/portal.css\"></head><body>",
        esc(title)
    );
    if let Some(w) = who {
        let item = |n: Nav, href: &str, label: &str| {
            let cur = if n == nav {
                " aria-current=\"page\""
            } else {
                ""
            };
            format!("<a href=\"{href}\"{cur}>{label}</a>")
        };
        let items = if w.admin {
            format!(
                "{}{}{}{}{}",
                item(Nav::Activity, "/events", "Activity"),
                item(Nav::Alerts, "/alerts", "Alerts"),
                item(Nav::Devices, "/devices", "Devices"),
                item(Nav::Bundles, "/bundles", "Bundles"),
                item(Nav::Risk, "/risk", "Risk"),
            )
        } else {
            item(Nav::Me, "/me", "Your page")
        };
        let _ = write!(
            s,
            "<header><span class=\"brand\">Sluice</span><nav>{items}</nav>\
             <form class=\"who\" method=\"post\" action=\"/logout\">{}<a href=\"/me\" \
             class=\"me\">{}</a> <button type=\"submit\">Sign out</button></form></header>",
            csrf_field(w.csrf),
            esc(w.user)
        );
    }
    s.push_str("<main>");
    s.push_str(body);
    s.push_str("</main></body></html>");
    s
}

/// The portal's one stylesheet (served as `/portal.css`, so the content security policy needs no
/// inline styles).
pub const CSS: &str = "\
*{box-sizing:border-box}\
body{margin:0;font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;color:#1d2330;background:#f6f7f9}\
header{display:flex;align-items:center;gap:1.5em;padding:.6em 1.2em;background:#1d2330;color:#fff}\
header a{color:#cfd6e4;text-decoration:none;margin-right:1em}\
header a[aria-current]{color:#fff;font-weight:600;border-bottom:2px solid #6aa1ff}\
.brand{font-weight:700;letter-spacing:.05em}\
.who{margin-left:auto;display:flex;gap:.6em;align-items:center}\
main{padding:1em 1.2em;max-width:110em}\
h1{font-size:1.3em;margin:.2em 0 .6em}h2{font-size:1.05em;margin:1.2em 0 .4em}\
table{border-collapse:collapse;width:100%;background:#fff}\
th,td{text-align:left;padding:.35em .5em;border-bottom:1px solid #e3e6ec;vertical-align:top}\
th{background:#eef1f6;font-weight:600}\
td.num{text-align:right}\
tr:hover td{background:#f8fafd}\
input,select,button{font:inherit;padding:.3em .45em;border:1px solid #b9c0cc;border-radius:3px}\
button{background:#2b5fd9;color:#fff;border-color:#2b5fd9;cursor:pointer}\
button.quiet{background:#fff;color:#2b5fd9}\
form.filters{display:flex;flex-wrap:wrap;gap:.5em;align-items:flex-end;margin-bottom:.8em}\
form.filters label{display:flex;flex-direction:column;font-size:.85em;color:#4a5263}\
form.filters input[name=q]{width:34em}\
form.inline{display:inline}\
.error{background:#fdecec;border:1px solid #e8a3a3;color:#8a1c1c;padding:.6em .8em;margin:.6em 0}\
.note{color:#5b6475}\
.badge{display:inline-block;padding:0 .45em;border-radius:3px;font-size:.85em;background:#e3e6ec}\
.badge.block{background:#fbd5d5;color:#8a1c1c}.badge.allow{background:#d8f0dd;color:#1c5e2c}\
.badge.stale,.badge.revoked,.badge.behind{background:#fde9c8;color:#7a4a00}\
.badge.ok{background:#d8f0dd;color:#1c5e2c}\
.cols{display:flex;gap:2em;flex-wrap:wrap}.cols>section{flex:1 1 22em}\
pre{background:#fff;border:1px solid #e3e6ec;padding:.8em;overflow:auto;max-height:40em}\
dl.fields{display:grid;grid-template-columns:12em 1fr;gap:.2em 1em;background:#fff;padding:.8em}\
dl.fields dt{color:#4a5263}dl.fields dd{margin:0;word-break:break-all}\
.login{max-width:22em;margin:4em auto;background:#fff;padding:1.5em;border:1px solid #e3e6ec}\
.login label{display:block;margin:.6em 0}.login input{width:100%}\
a.oidc{display:block;text-align:center;padding:.45em;background:#2b5fd9;color:#fff;border-radius:3px;text-decoration:none}\
header a.me{color:#fff;margin-right:0}\
svg.chart{background:#fff;border:1px solid #e3e6ec;max-width:100%;height:auto}\
.pager{margin:.8em 0}\
";

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_and_both_quotes() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
        assert_eq!(esc("a\u{0}b\u{1b}c\nd"), "a\u{fffd}b\u{fffd}c\nd");
        // A value placed in an attribute cannot close it.
        let attr = format!("<input value=\"{}\">", esc("\" onfocus=\"x"));
        assert_eq!(attr, "<input value=\"&quot; onfocus=&quot;x\">");
    }

    #[test]
    fn url_components_round_trip() {
        let s = "user:\"a b\"&x=1/é";
        let enc = url_encode(s);
        assert!(!enc.contains(['&', '=', ' ', '"', '/']));
        assert_eq!(url_decode(&enc).unwrap(), s);
        assert_eq!(url_decode("a+b%20c").unwrap(), "a b c");
        assert_eq!(url_decode("%zz"), None);
        assert_eq!(url_decode("%4"), None);
        assert_eq!(url_decode("%ff"), None);
        let pairs = parse_pairs("q=user%3Aalice&empty=&bad=%zz&flag");
        assert_eq!(get(&pairs, "q"), Some("user:alice"));
        assert_eq!(get(&pairs, "empty"), Some(""));
        assert_eq!(get(&pairs, "bad"), None);
        assert_eq!(get(&pairs, "flag"), Some(""));
        assert_eq!(
            link("/events", &[("q", "a b"), ("before", ""), ("user", "x&y")]),
            "/events?q=a%20b&user=x%26y"
        );
    }

    #[test]
    fn times_for_people() {
        assert_eq!(time_ms(0), "1970-01-01 00:00:00");
        assert_eq!(time_ms(1_764_223_188_000), "2025-11-27 05:59:48");
        assert_eq!(time_ms(i64::MAX), "-");
        assert_eq!(ago(0, 5_000), "5 s ago");
        assert_eq!(ago(0, 7_200_000), "2 h ago");
        assert_eq!(list("|a|b|"), "a, b");
    }
}
