//! Uploads: a request body held whole is taken apart (multipart parts, form fields, JSON, text,
//! or a raw file), every file in it (archive members included) inspected, and the most restrictive
//! session decision over them stands. Runs on the inspection pool.

use bytes::Bytes;
use sluice_inspect::{
    self as inspect, FileFacts, FileType, NotInspectable, embedded, multipart, sniff::sniff,
};
use sluice_policy::{
    PolicySet,
    model::{Action, Activity, Kind},
};

use super::{
    context::Context,
    decide::{Decided, Dlp, Record, most_restrictive},
    download::{coding, decode},
};
use crate::proxy::hooks::{BodyVerdict, Side};

/// Most parts in a multipart body.
const MAX_PARTS: usize = 1_000;
/// Most fields in a URL-encoded form.
const MAX_FIELDS: usize = 10_000;

/// What is known of an upload before its body arrives.
#[derive(Debug, Clone, Copy)]
pub(super) struct Upload {
    /// The declared length.
    pub(super) declared: Option<u64>,
    /// The request sends a byte range of something (`Content-Range`) outside any upload
    /// session Sluice follows.
    pub(super) partial: bool,
}

impl Upload {
    /// An upload whose body cannot be inspected: the not-inspectable path.
    pub(super) fn unreadable(
        &self,
        cx: &Context,
        rec: &mut Record,
        why: NotInspectable,
        seen: u64,
    ) -> BodyVerdict {
        let facts = FileFacts {
            name: cx.defined_name.clone(),
            size: self.declared.unwrap_or(seen),
            not_inspectable: Some(why),
            ..FileFacts::default()
        };
        rec.unreadable(
            cx,
            cx.defined.unwrap_or(Activity::Upload),
            Side::Request,
            facts,
            BodyVerdict::Pass,
        )
    }

    /// Judges a held request body by its bytes: decoded first when its encoding is one Sluice
    /// reads, then taken apart; every piece (the body, each part, each form value, each base64
    /// run in text) is sniffed, and whatever is a file is inspected as one whatever the headers,
    /// names or form fields say of it.
    pub(super) fn judge(&self, cx: &Context, rec: &mut Record, raw: &Bytes) -> BodyVerdict {
        let seen = raw.len() as u64;
        if self.partial && seen > 0 {
            // A piece of a file cannot be judged as the file; a session not followed cannot
            // be put together.
            return self.unreadable(
                cx,
                rec,
                NotInspectable::Unsupported(
                    "a byte range of a file (Content-Range) outside any upload session Sluice \
                     follows"
                        .into(),
                ),
                seen,
            );
        }
        let body: Bytes = match coding(cx.request_encoding.as_deref()) {
            Err(e) => return self.unreadable(cx, rec, NotInspectable::Unsupported(e), seen),
            Ok(None) => raw.clone(),
            Ok(Some(enc)) => match decode(raw, enc, cx.limits.max_bytes) {
                Ok(v) => Bytes::from(v),
                Err(e) => return self.unreadable(cx, rec, e, seen),
            },
        };
        if cx.request_type_repeated {
            return self.unreadable(
                cx,
                rec,
                NotInspectable::Malformed("the request carries more than one Content-Type".into()),
                seen,
            );
        }
        let ctype = cx
            .request_type
            .as_deref()
            .unwrap_or("")
            .to_ascii_lowercase();
        let mut pieces = Pieces::new(cx);
        let mut form = Vec::new();
        let mut has_file_part = false;
        // The boundary is case-sensitive: taken from the content type as sent.
        if let Some(boundary) = multipart::boundary(cx.request_type.as_deref().unwrap_or("")) {
            match multipart::parse(&body, &boundary, MAX_PARTS) {
                Ok(parts) => {
                    for p in parts {
                        let data = body.get(p.data.clone()).unwrap_or(&[]);
                        let named_file = p.file_name.is_some()
                            || cx
                                .form_field
                                .as_deref()
                                .is_some_and(|f| p.name.as_deref() == Some(f));
                        if pieces.add(data, p.file_name.as_deref(), named_file) {
                            has_file_part = true;
                        } else if let Some(n) = p.name {
                            form.push((n, String::from_utf8_lossy(data).into_owned()));
                        }
                    }
                }
                Err(e) => {
                    return self.unreadable(
                        cx,
                        rec,
                        NotInspectable::Malformed(format!("multipart body: {e}")),
                        seen,
                    );
                }
            }
        } else if ctype.trim_start().starts_with("multipart/") {
            // A server may find a boundary where Sluice finds none or two: not inspectable.
            return self.unreadable(
                cx,
                rec,
                NotInspectable::Malformed(
                    "a multipart body without exactly one valid boundary".into(),
                ),
                seen,
            );
        } else if ctype.starts_with("application/x-www-form-urlencoded") && textual(&body) {
            form = multipart::parse_urlencoded(&body, MAX_FIELDS);
            for (_, v) in &form {
                pieces.add(v.as_bytes(), None, false);
            }
        } else if !body.is_empty() {
            // Any other body is one piece: a file when its bytes (or the definition) say so.
            let named = cx.defined == Some(Activity::Upload);
            pieces.add(&body, cx.defined_name.as_deref(), named);
        }
        let Pieces {
            files,
            dlp: text_dlp,
            ..
        } = pieces;
        // A request that carries a file is an upload, whatever endpoint it goes to (an insider
        // would otherwise send the file to one defined as something else). Else a form can name
        // the activity (one endpoint for several actions).
        let activity = if !files.is_empty() {
            Some(Activity::Upload)
        } else if !form.is_empty() {
            cx.set
                .activity_for(&cx.input.app, &cx.method, &cx.path, &cx.query, &form)
                .map(|d| d.activity)
                .or(cx.defined)
        } else {
            cx.defined
        }
        .unwrap_or_else(|| {
            PolicySet::generic_activity(
                &cx.method,
                Some(&ctype),
                has_file_part || !files.is_empty(),
                None,
                None,
            )
        });
        conclude(cx, rec, activity, files, text_dlp).0
    }

    /// Judges a file an upload session sent in parts, put together: inspected as the file it
    /// is, named as the session named it. The verdict and the decision that stands.
    pub(super) fn judge_whole(
        cx: &Context,
        rec: &mut Record,
        file: &[u8],
        name: Option<&str>,
    ) -> (BodyVerdict, Decided) {
        let mut pieces = Pieces::new(cx);
        pieces.add(file, name, true);
        let Pieces { files, dlp, .. } = pieces;
        conclude(cx, rec, Activity::Upload, files, dlp)
    }
}

/// Decides the files of a request of `activity`, each on its own; the most restrictive decision
/// stands (no file: the request alone).
fn conclude(
    cx: &Context,
    rec: &mut Record,
    activity: Activity,
    files: Vec<FileFacts>,
    text_dlp: Dlp,
) -> (BodyVerdict, Decided) {
    let mut decisions: Vec<Decided> = files
        .iter()
        .map(|f| cx.decide_file(activity, Side::Request, Some(f), &text_dlp))
        .collect();
    let (d, name, why) = match most_restrictive(&decisions) {
        Some(i) => (
            decisions.swap_remove(i),
            files[i].name.clone(),
            files[i].not_inspectable.clone(),
        ),
        None => (
            cx.decide_file(activity, Side::Request, None, &text_dlp),
            None,
            None,
        ),
    };
    rec.take(Kind::Session, activity, &d);
    rec.note(
        files
            .iter()
            .find_map(|f| f.not_inspectable.as_ref().map(|n| n.to_string())),
    );
    rec.files.extend(files);
    rec.dlp = text_dlp;
    let v = if d.action == Action::Block {
        BodyVerdict::Respond(cx.block_page_why(&d, name.as_deref(), why.as_ref()))
    } else {
        BodyVerdict::Pass
    };
    (v, d)
}

/// The pieces of one request body: the files found in it and the DLP hits of its text.
struct Pieces<'a> {
    cx: &'a Context,
    files: Vec<FileFacts>,
    dlp: Dlp,
    /// The search for base64-encoded files, its bounds shared by every text of the request
    /// (archive members' included).
    search: embedded::Search,
}

impl<'a> Pieces<'a> {
    fn new(cx: &'a Context) -> Self {
        Self {
            cx,
            files: Vec::new(),
            dlp: Dlp::new(),
            search: embedded::Search::new(
                usize::try_from(cx.limits.max_bytes).unwrap_or(usize::MAX),
            ),
        }
    }

    /// Adds one piece; true when it was taken as a file. A piece is a file when `named` (the
    /// request says so) or when its bytes are not text; text is scanned for DLP and searched
    /// for base64-encoded files.
    fn add(&mut self, data: &[u8], name: Option<&str>, named: bool) -> bool {
        let text = textual(data);
        if named || !text {
            // A text file is inspected (and DLP-scanned) as the file it is.
            self.file(data, name);
            if !text {
                return true;
            }
        } else {
            self.scan_text(data);
        }
        // Text may carry a file base64-encoded.
        let before = self.search.cut().is_some();
        let mut carried = Vec::new();
        let mut texts = Dlp::new();
        let detectors = &self.cx.set.detectors;
        let any = self.search.text(data, &mut |f| match f {
            embedded::Found::Text(t) => add_hits(&mut texts, detectors, t),
            embedded::Found::File(b) => carried.push(b),
        });
        for (k, v) in texts {
            *self.dlp.entry(k).or_default() += v;
        }
        for b in carried {
            self.file(&b, Some(name.unwrap_or(EMBEDDED_NAME)));
        }
        if !before && let Some(why) = self.search.cut() {
            // The text was not searched to its end: not inspectable, never clean.
            self.files.push(FileFacts {
                name: Some(name.unwrap_or(EMBEDDED_NAME).to_owned()),
                not_inspectable: Some(why.clone()),
                ..FileFacts::default()
            });
        }
        any || named
    }

    /// Inspects one file (an archive's members too, and the files their text carries).
    fn file(&mut self, data: &[u8], name: Option<&str>) {
        let cx = self.cx;
        let mut found =
            inspect::inspect_upload(data, name, &cx.limits, &cx.set.detectors, &mut self.search);
        refuse_unknown(&mut found);
        if let Some(first) = found.first_mut() {
            cx.scan(Side::Request, data, first);
        }
        self.files.append(&mut found);
    }

    /// Adds the DLP hits of a text.
    fn scan_text(&mut self, data: &[u8]) {
        add_hits(&mut self.dlp, &self.cx.set.detectors, data);
    }
}

/// Adds the DLP hits of `text` to `dlp`.
fn add_hits(dlp: &mut Dlp, detectors: &inspect::dlp::Detectors, text: &[u8]) {
    let hits = if sniff(text) == FileType::Json {
        detectors.scan_json(text)
    } else {
        detectors.scan(text)
    };
    for (k, v) in hits.counts {
        *dlp.entry(k).or_default() += v;
    }
}

/// The name given to a file found base64-encoded in a request's text that had no name.
const EMBEDDED_NAME: &str = "(base64 in the request)";

/// Text, JSON, XML and HTML are read as text; everything else is a file.
fn textual(data: &[u8]) -> bool {
    sniff(data).is_text()
}

/// A file of a type Sluice cannot read (an unknown binary, a tar or 7z archive, a file with
/// bytes put before its signature) could be any document: it is not inspectable, never "clean".
fn refuse_unknown(found: &mut [FileFacts]) {
    for f in found {
        if f.kind == Some(FileType::Binary) && f.not_inspectable.is_none() && f.size > 0 {
            f.not_inspectable = Some(NotInspectable::Unsupported(
                "a binary file of a type Sluice cannot read".into(),
            ));
        }
    }
}
