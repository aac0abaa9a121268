//! Downloads: which responses are downloads, how their bodies are asked for (whole, in encodings
//! Sluice decodes), and the judgement of a held download: inspected (archive members included),
//! decided, and the label the decision asks for written into the file (or into the members of an
//! archive). Judging runs on the inspection pool.

use std::io::Read as _;

use bytes::Bytes;
use http::{HeaderMap, header, response};
use sluice_inspect::{self as inspect, Applied, FileFacts, LabelSpec, NotInspectable, multipart};
use sluice_policy::{
    PolicySet,
    model::{Action, Activity, Kind},
};

use super::{
    context::{Context, content_length, header_str},
    decide::{Decided, Dlp, Record, most_restrictive},
};
use crate::proxy::{
    hooks::{BodyVerdict, HeadVerdict, Side},
    pages::html_escape,
};

/// The message template of a download that must be protected and cannot be.
const CANNOT_PROTECT: &str = "download-cannot-be-protected";

/// A response body that is held as a download.
#[derive(Debug, Clone)]
pub(super) struct Download {
    pub(super) name: Option<String>,
    pub(super) encoding: Option<Encoding>,
}

/// Content codings Sluice decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Encoding {
    Gzip,
    Deflate,
}

pub(super) fn encoding_of(h: &HeaderMap) -> Result<Option<Encoding>, String> {
    if h.get_all(header::CONTENT_ENCODING).iter().count() > 1 {
        return Err("more than one Content-Encoding".into());
    }
    coding(header_str(h, header::CONTENT_ENCODING))
}

/// The coding a `Content-Encoding` value names; an error for one Sluice does not decode (a list
/// of codings included).
pub(super) fn coding(value: Option<&str>) -> Result<Option<Encoding>, String> {
    match value.map(|v| v.trim().to_ascii_lowercase()) {
        None => Ok(None),
        Some(v) if v.is_empty() || v == "identity" => Ok(None),
        Some(v) if v == "gzip" || v == "x-gzip" => Ok(Some(Encoding::Gzip)),
        Some(v) if v == "deflate" => Ok(Some(Encoding::Deflate)),
        Some(v) => Err(format!("content encoding `{v}` is not inspected")),
    }
}

/// Decodes a held body, bounded by `max` output bytes.
pub(super) fn decode(data: &[u8], enc: Encoding, max: u64) -> Result<Vec<u8>, NotInspectable> {
    let mut out = Vec::new();
    let res = match enc {
        Encoding::Gzip => flate2::read::MultiGzDecoder::new(data)
            .take(max + 1)
            .read_to_end(&mut out),
        Encoding::Deflate => flate2::read::ZlibDecoder::new(data)
            .take(max + 1)
            .read_to_end(&mut out),
    };
    match res {
        Err(e) => Err(NotInspectable::Malformed(format!(
            "the body could not be decoded: {e}"
        ))),
        Ok(_) if out.len() as u64 > max => Err(NotInspectable::TooLarge(max)),
        Ok(_) => Ok(out),
    }
}

/// Keeps only the content codings Sluice decodes (gzip, deflate, identity) in Accept-Encoding.
pub(super) fn narrow_accept_encoding(headers: &mut HeaderMap) {
    let Some(v) = header_str(headers, header::ACCEPT_ENCODING) else {
        return;
    };
    let kept: Vec<&str> = v
        .split(',')
        .map(str::trim)
        .filter(|t| {
            let coding = t
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            matches!(coding.as_str(), "gzip" | "x-gzip" | "deflate" | "identity")
        })
        .collect();
    let value = if kept.is_empty() {
        "identity".to_owned()
    } else {
        kept.join(", ")
    };
    if let Ok(h) = http::HeaderValue::from_str(&value) {
        headers.insert(header::ACCEPT_ENCODING, h);
    }
}

/// The response head: whether this response is a download to hold. One that cannot be held
/// (an encoding Sluice does not decode, a declared size past the bound) takes the
/// not-inspectable path at once.
pub(super) fn response_head(
    cx: &Context,
    rec: &mut Record,
    head: &mut response::Parts,
) -> (HeadVerdict, Option<Download>) {
    let disposition = header_str(&head.headers, header::CONTENT_DISPOSITION);
    let rtype = header_str(&head.headers, header::CONTENT_TYPE);
    let is_download = head.status.is_success()
        && cx.method != "HEAD"
        && (cx.defined == Some(Activity::Download)
            || (cx.defined.is_none()
                && PolicySet::generic_activity(&cx.method, None, false, disposition, rtype)
                    == Activity::Download));
    if !is_download {
        return (HeadVerdict::Continue, None);
    }
    let name = cx
        .defined_name
        .clone()
        .or_else(|| disposition.and_then(multipart::disposition_file_name));
    let unreadable = match encoding_of(&head.headers) {
        Err(e) => Some(NotInspectable::Unsupported(e)),
        Ok(_) if content_length(&head.headers).is_some_and(|n| n > cx.limits.max_bytes) => {
            Some(NotInspectable::TooLarge(cx.limits.max_bytes))
        }
        Ok(_) => None,
    };
    if let Some(why) = unreadable {
        let facts = FileFacts {
            name,
            size: content_length(&head.headers).unwrap_or(0),
            not_inspectable: Some(why),
            ..FileFacts::default()
        };
        let verdict = match rec.unreadable(
            cx,
            Activity::Download,
            Side::Response,
            facts,
            BodyVerdict::Pass,
        ) {
            BodyVerdict::Respond(r) => HeadVerdict::Respond(r),
            _ => HeadVerdict::Continue,
        };
        return (verdict, None);
    }
    let encoding = encoding_of(&head.headers).ok().flatten();
    if encoding.is_some() {
        // The client gets the decoded body (possibly labeled): the encoding no longer applies.
        head.headers.remove(header::CONTENT_ENCODING);
        head.headers.remove(header::CONTENT_LENGTH);
    }
    for h in ["content-md5", "digest", "repr-digest", "content-digest"] {
        head.headers.remove(h);
    }
    (HeadVerdict::Continue, Some(Download { name, encoding }))
}

impl Download {
    /// A download that was not held (past the bound, or no room in the inspection budget).
    pub(super) fn unheld(
        &self,
        cx: &Context,
        rec: &mut Record,
        why: NotInspectable,
        seen: u64,
    ) -> BodyVerdict {
        if self.encoding.is_some() {
            // The encoding header is gone and the rest cannot be decoded on the fly: refuse
            // rather than deliver bytes the client would misread.
            return BodyVerdict::Respond(cx.undeliverable(&format!(
                "The compressed download could not be inspected: {why}."
            )));
        }
        let facts = FileFacts {
            name: self.name.clone(),
            size: seen,
            not_inspectable: Some(why),
            ..FileFacts::default()
        };
        rec.unreadable(
            cx,
            Activity::Download,
            Side::Response,
            facts,
            BodyVerdict::Pass,
        )
    }

    /// Judges a held download.
    pub(super) fn judge(&self, cx: &Context, rec: &mut Record, raw: &Bytes) -> BodyVerdict {
        let (body, decoded) = match self.encoding {
            None => (raw.clone(), false),
            Some(enc) => match decode(raw, enc, cx.limits.max_bytes) {
                Ok(v) => (Bytes::from(v), true),
                Err(e) => {
                    return BodyVerdict::Respond(
                        cx.undeliverable(&format!("The download could not be decoded: {e}")),
                    );
                }
            },
        };
        // An archive brings its members: each is decided as a file, the most restrictive
        // decision stands, and members whose decision writes a label get it inside the archive.
        let mut files = inspect::inspect_with_members(
            &body,
            self.name.as_deref(),
            &cx.limits,
            &cx.set.detectors,
        );
        if let Some(first) = files.first_mut() {
            cx.scan(Side::Response, &body, first);
        }
        let decisions: Vec<Decided> = files
            .iter()
            .map(|f| cx.decide_file(Activity::Download, Side::Response, Some(f), &Dlp::new()))
            .collect();
        let worst = most_restrictive(&decisions).unwrap_or(0);
        let mut d = decisions[worst].clone();
        let mut out: Option<Vec<u8>> = None;
        if matches!(d.action, Action::ApplyLabel | Action::Protect) {
            let event_id = rec.event_id();
            let mut protected = Vec::new();
            let written = if files.len() > 1 {
                label_members(
                    cx,
                    &body,
                    &mut files,
                    &decisions,
                    (&event_id, &mut protected),
                )
            } else {
                label_file(cx, &body, &mut files[0], &d, (&event_id, &mut protected))
            };
            if written.is_ok() {
                rec.protected.append(&mut protected);
            }
            match written {
                Ok(Some(v)) => {
                    out = Some(v);
                    rec.label_applied = label_for(cx, &d).map(|(id, spec)| (id, spec.permissions));
                }
                Ok(None) => {}
                // A file that cannot be protected is never delivered in clear: blocked, with
                // the message that says so.
                Err(e) if d.action == Action::Protect => {
                    files[0].not_inspectable.get_or_insert(e);
                    d.action = Action::Block;
                    if cx.set.templates.contains_key(CANNOT_PROTECT) {
                        d.message = Some(CANNOT_PROTECT.into());
                    }
                }
                // The label cannot be written: the file is handled as one that cannot be
                // inspected, and the decision taken is that action, not the one the policy meant.
                Err(e) => {
                    files[0].not_inspectable.get_or_insert(e);
                    d.action = cx.not_inspectable_download;
                }
            }
        }
        rec.take(Kind::Session, Activity::Download, &d);
        // The block page names the file at fault (a member of an archive, when it is one).
        let name = files[worst].name.clone();
        let first_name = files[0].name.clone();
        let why = files[worst].not_inspectable.clone();
        rec.note(
            files
                .iter()
                .find_map(|f| f.not_inspectable.as_ref().map(|n| n.to_string())),
        );
        rec.files.extend(files);
        if d.action == Action::Block {
            return BodyVerdict::Respond(cx.block_page_why(&d, name.as_deref(), why.as_ref()));
        }
        match out {
            // A browser that navigated to a protected download gets a short notice first: what
            // the file is and where its password is given; the notice fetches the file.
            Some(v)
                if d.action == Action::Protect
                    && cx.kind == crate::proxy::pages::ClientKind::Browser
                    && !rec.protected.is_empty() =>
            {
                let releases: Vec<String> =
                    rec.protected.iter().map(|p| p.release_id.clone()).collect();
                let name = first_name.or_else(|| self.name.clone());
                match cx
                    .protector
                    .hold(v.clone().into(), name.clone(), releases.clone())
                {
                    Some(token) => {
                        rec.note(Some(
                            "a notice shown to the browser before the protected file".into(),
                        ));
                        BodyVerdict::Respond(notice_page(cx, name.as_deref(), &releases, &token))
                    }
                    None => BodyVerdict::Replace(v.into()),
                }
            }
            Some(v) => BodyVerdict::Replace(v.into()),
            None if decoded => BodyVerdict::Replace(body),
            None => BodyVerdict::Pass,
        }
    }
}

/// The notice a browser sees before a protected file: its name, where its password is given,
/// and the link (followed at once) that fetches the file from the proxy.
fn notice_page(
    cx: &Context,
    name: Option<&str>,
    releases: &[String],
    token: &str,
) -> http::Response<crate::proxy::body::ProxyBody> {
    let link = format!("{}{token}", super::protect::NOTICE_PATH);
    let access: String = releases
        .iter()
        .filter_map(|r| cx.protector.access_url(r))
        .map(|u| {
            format!(
                "<li><a class=\"access\" href=\"{u}\">{u}</a></li>",
                u = html_escape(&u)
            )
        })
        .collect();
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"2; url={link}\">\
         <title>A protected file</title></head>\
         <body style=\"font-family:sans-serif;max-width:40em;margin:3em auto\">\
         <h1>This file is protected</h1>\
         <p id=\"notice\"><strong>{file}</strong> is encrypted: it opens only with its password, \
         which the people it is meant for get by signing in with their organisation's account \
         at:</p><ul>{access}</ul>\
         <p>Your download starts in a moment; if it does not, \
         <a id=\"download\" href=\"{link}\">download it</a>.</p>\
         <p><small>Sluice incident {incident}</small></p></body></html>\n",
        file = html_escape(name.unwrap_or("The file")),
        incident = html_escape(&cx.incident),
    );
    let mut resp = http::Response::new(crate::proxy::body::full(body));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    for r in releases {
        if let Ok(v) = http::HeaderValue::from_str(r) {
            h.append("sluice-protected", v);
        }
    }
    resp
}

/// The protected copy a notice's link fetches: the file as an attachment under its name.
pub(super) fn held_copy_response(
    copy: super::protect::HeldCopy,
) -> http::Response<crate::proxy::body::ProxyBody> {
    let len = copy.body.len();
    let ctype = if copy.body.starts_with(b"%PDF") {
        "application/pdf"
    } else {
        "application/octet-stream"
    };
    let name = copy.name.unwrap_or_else(|| "protected".into());
    let name = name.rsplit('/').next().unwrap_or("protected");
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let encoded = percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC);
    let mut resp = http::Response::new(crate::proxy::body::full(copy.body));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, http::HeaderValue::from_static(ctype));
    h.insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    h.insert(header::CONTENT_LENGTH, http::HeaderValue::from(len));
    if let Ok(v) = http::HeaderValue::from_str(&format!(
        "attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}"
    )) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    for r in &copy.releases {
        if let Ok(v) = http::HeaderValue::from_str(r) {
            h.append("sluice-protected", v);
        }
    }
    resp
}

/// Where protected files are recorded: the event's id (their passwords are sealed bound to it)
/// and the records.
type Protected<'a> = (&'a str, &'a mut Vec<sluice_protocol::ProtectedFile>);

/// Writes the label decision `d` asks for into one file: its new bytes, or `None` when it
/// already carries the label. A `protect` also encrypts the file (see `protect`) and records
/// it in `protected`.
fn label_file(
    cx: &Context,
    body: &[u8],
    facts: &mut FileFacts,
    d: &Decided,
    protected: Protected<'_>,
) -> Result<Option<Vec<u8>>, NotInspectable> {
    let Some((label_id, spec)) = label_for(cx, d) else {
        let e = NotInspectable::Unsupported(format!(
            "label `{}` is not in the bundle's label catalogue",
            d.label.as_deref().unwrap_or("")
        ));
        facts.not_inspectable = Some(e.clone());
        return Err(e);
    };
    if d.action == Action::Protect {
        let Some(template) = d.protection.as_ref() else {
            let e = NotInspectable::Unsupported("protect without a protection template".into());
            facts.not_inspectable = Some(e.clone());
            return Err(e);
        };
        let job = super::protect::Job {
            protector: &cx.protector,
            template,
            label_id: &label_id,
            spec,
            downloader: cx.input.user.as_deref(),
            event_id: protected.0,
            now_ms: cx.time,
            limits: &cx.limits,
        };
        return match super::protect::protect(job, body, facts) {
            Ok((bytes, record)) => {
                protected.1.push(record);
                Ok(Some(bytes))
            }
            Err(e) => {
                facts.not_inspectable = Some(e.clone());
                Err(e)
            }
        };
    }
    // Any existing label stays unless the policy says to replace it.
    let same = facts.enabled_labels().any(|l| l.guid == spec.guid);
    let replace = d.replace_label || (d.action == Action::Protect && same);
    match inspect::apply_label(body, &spec, replace, &cx.limits) {
        Ok(Applied::Labeled(v)) => Ok(Some(v)),
        Ok(Applied::AlreadyLabeled(_)) => Ok(None),
        Err(e) => {
            facts.not_inspectable = Some(e.clone());
            Err(e)
        }
    }
}

/// Writes into an archive the labels its members' decisions ask for: the members are replaced in
/// place, every other entry is copied raw. `files` are the archive and its members as
/// [`inspect::inspect_with_members`] gave them. A member inside an inner archive cannot be
/// rewritten, nor can one whose type takes no label: the archive is then not inspectable (and the
/// member says why).
fn label_members(
    cx: &Context,
    body: &[u8],
    files: &mut [FileFacts],
    decisions: &[Decided],
    protected: Protected<'_>,
) -> Result<Option<Vec<u8>>, NotInspectable> {
    let (event_id, records) = protected;
    let limits = &cx.limits;
    let prefix = format!("{}/", files[0].name.as_deref().unwrap_or("archive.zip"));
    let archive = inspect::zip::Archive::parse(body, limits)?;
    let mut budget = inspect::zip::Budget::new(limits);
    let mut replace: Vec<(String, Vec<u8>)> = Vec::new();
    for (f, d) in files.iter_mut().zip(decisions).skip(1) {
        if !matches!(d.action, Action::ApplyLabel | Action::Protect) {
            continue;
        }
        let entry = f
            .name
            .as_deref()
            .and_then(|n| n.strip_prefix(&prefix))
            .filter(|e| archive.contains(e))
            .map(str::to_owned);
        let Some(entry) = entry else {
            let e = NotInspectable::Unsupported("files inside an archive inside an archive".into());
            f.not_inspectable = Some(e.clone());
            return Err(e);
        };
        let data = archive.read(&entry, &mut budget)?;
        if let Some(v) = label_file(cx, &data, f, d, (event_id, &mut *records))? {
            replace.push((entry, v));
        }
    }
    if replace.is_empty() {
        return Ok(None);
    }
    let (names, data): (Vec<String>, Vec<Vec<u8>>) = replace.into_iter().unzip();
    let refs: Vec<(&str, Vec<u8>)> = names.iter().map(String::as_str).zip(data).collect();
    archive.rewrite(&refs, &[]).map(Some)
}

/// The label spec a decision writes: the bundle's label, with the rights of the protection
/// template when the action is `protect`.
fn label_for(cx: &Context, d: &Decided) -> Option<(String, LabelSpec)> {
    let id = d.label.as_ref()?;
    let l = cx.set.labels.get(id)?;
    let permissions = match (&d.protection, d.action) {
        (Some(t), Action::Protect) => {
            let mut r: Vec<String> = t.rights.iter().map(|r| r.as_str().to_owned()).collect();
            if !r.iter().any(|r| r == "view") {
                r.insert(0, "view".into());
            }
            r
        }
        _ => Vec::new(),
    };
    Some((
        id.clone(),
        LabelSpec {
            guid: inspect::normalize_guid(&l.guid),
            tenant: inspect::normalize_guid(&l.tenant),
            name: l.name.clone(),
            method: "Privileged".into(),
            set_date: inspect::now_iso8601(),
            action_id: inspect::new_guid(),
            permissions,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_decodable_codings_are_offered() {
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCEPT_ENCODING,
            "gzip, deflate, br, zstd;q=0.9"
                .parse()
                .unwrap_or_else(|_| unreachable!()),
        );
        narrow_accept_encoding(&mut h);
        assert_eq!(h[header::ACCEPT_ENCODING], "gzip, deflate");
        h.insert(
            header::ACCEPT_ENCODING,
            "br".parse().unwrap_or_else(|_| unreachable!()),
        );
        narrow_accept_encoding(&mut h);
        assert_eq!(h[header::ACCEPT_ENCODING], "identity");
    }

    #[test]
    fn encodings_and_bounded_decoding() {
        let mut h = HeaderMap::new();
        assert_eq!(encoding_of(&h), Ok(None));
        h.insert(
            header::CONTENT_ENCODING,
            "gzip".parse().unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(encoding_of(&h), Ok(Some(Encoding::Gzip)));
        h.insert(
            header::CONTENT_ENCODING,
            "br".parse().unwrap_or_else(|_| unreachable!()),
        );
        assert!(encoding_of(&h).is_err());
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &vec![b'a'; 100_000]).unwrap_or_else(|_| unreachable!());
        let gz = gz.finish().unwrap_or_else(|_| unreachable!());
        assert_eq!(
            decode(&gz, Encoding::Gzip, 100_000).map(|v| v.len()),
            Ok(100_000)
        );
        assert_eq!(
            decode(&gz, Encoding::Gzip, 1000),
            Err(NotInspectable::TooLarge(1000))
        );
        assert!(decode(b"not gzip", Encoding::Gzip, 1000).is_err());
    }
}
