//! Credentials in URLs stay out of events and logs: pre-signed links (S3's `X-Amz-Signature`,
//! Azure's SAS `sig`, Google's `X-Goog-Signature`), OAuth codes and tokens, API keys. Every URL
//! the agent records (the activity event's and the request record's, the events file, the
//! collector, its syslog and webhook forwarding, the agent's own log lines) passes through
//! [`url`]: the value of each query parameter whose name is on the list, or contains `token`,
//! `secret`, `password` or `signature`, becomes `REDACTED`. Names are compared without regard to
//! ASCII case and after percent-decoding, so `X%2DAmz%2DSignature` is caught too. A bundle adds
//! names in `catalog.yaml`'s `redact_query_params`; the defaults cannot be taken away.

use std::sync::{Arc, LazyLock};

use arc_swap::ArcSwap;

/// What a redacted value reads.
pub const REDACTED: &str = "REDACTED";

/// Names always redacted (lower case).
pub const DEFAULT_PARAMS: &[&str] = &[
    "sig",
    "signature",
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "x-goog-signature",
    "x-goog-credential",
    "token",
    "access_token",
    "id_token",
    "refresh_token",
    "code",
    "key",
    "api_key",
    "apikey",
    "api-key",
    "auth",
    "authorization",
    "password",
    "passwd",
    "pwd",
    "secret",
    "client_secret",
    "session",
    "sessionid",
    "jwt",
    "assertion",
    "samlresponse",
    "ticket",
    "otp",
    "tempauth",
];

/// Parts of a name that make it redacted wherever they appear in it.
const CONTAINED: &[&str] = &["token", "secret", "password", "signature"];

static EXTRA: LazyLock<ArcSwap<Vec<String>>> = LazyLock::new(|| ArcSwap::from_pointee(Vec::new()));

/// Adds the bundle's names (`catalog.yaml` `redact_query_params`) to the defaults.
pub fn set_extra(names: &[String]) {
    EXTRA.store(Arc::new(
        names
            .iter()
            .map(|n| n.trim().to_ascii_lowercase())
            .collect(),
    ));
}

fn secret(name: &str) -> bool {
    let decoded = percent_encoding::percent_decode_str(&name.replace('+', " "))
        .decode_utf8_lossy()
        .trim()
        .to_ascii_lowercase();
    DEFAULT_PARAMS.contains(&decoded.as_str())
        || CONTAINED.iter().any(|c| decoded.contains(c))
        || EXTRA.load().contains(&decoded)
}

/// `u` with the values of its secret query parameters replaced by [`REDACTED`].
pub fn url(u: &str) -> String {
    redacted_query(u).unwrap_or_else(|| u.to_owned())
}

/// As [`url`], for a URL already owned: returned as it is when it has no query.
pub fn url_owned(u: String) -> String {
    redacted_query(&u).unwrap_or(u)
}

/// `u` rebuilt with its secret query values redacted; `None` when it has no query.
fn redacted_query(u: &str) -> Option<String> {
    let (head, rest) = u.split_once('?')?;
    let (query, fragment) = match rest.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (rest, None),
    };
    let mut out = String::with_capacity(u.len());
    out.push_str(head);
    out.push('?');
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((name, _)) if secret(name) => {
                out.push_str(name);
                out.push('=');
                out.push_str(REDACTED);
            }
            _ => out.push_str(pair),
        }
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presigned_and_token_parameters_are_redacted_and_the_rest_kept() {
        let u = "https://bucket.s3.amazonaws.com/report.pdf?X-Amz-Algorithm=AWS4-HMAC-SHA256\
                 &X-Amz-Credential=AKIA%2F20261205&X-Amz-Signature=abc123&x-id=GetObject";
        assert_eq!(
            url(u),
            "https://bucket.s3.amazonaws.com/report.pdf?X-Amz-Algorithm=AWS4-HMAC-SHA256\
             &X-Amz-Credential=REDACTED&X-Amz-Signature=REDACTED&x-id=GetObject"
        );
        assert_eq!(
            url("https://acct.blob.core.windows.net/c/f?sv=2022-11-02&sp=r&sig=Zm9v%3D"),
            "https://acct.blob.core.windows.net/c/f?sv=2022-11-02&sp=r&sig=REDACTED"
        );
        assert_eq!(
            url("https://files.test/d?token=t1&page=2&my_refresh_token=x&SIG=y#top"),
            "https://files.test/d?token=REDACTED&page=2&my_refresh_token=REDACTED&SIG=REDACTED#top"
        );
        // Percent-encoded names are caught.
        assert_eq!(
            url("https://x.test/?X%2DAmz%2DSignature=s"),
            "https://x.test/?X%2DAmz%2DSignature=REDACTED"
        );
        // Nothing to do.
        assert_eq!(url("https://files.test/files"), "https://files.test/files");
        assert_eq!(
            url("https://files.test/?a&b=1"),
            "https://files.test/?a&b=1"
        );
        // The bundle's own names add to the defaults.
        set_extra(&["X-Files-Grant".into()]);
        assert_eq!(
            url("https://files.test/?x-files-grant=g&sig=s"),
            "https://files.test/?x-files-grant=REDACTED&sig=REDACTED"
        );
        set_extra(&[]);
    }
}
