//! Uploads: a request body held whole is taken apart (multipart parts, form fields, JSON, text,
//! or a raw file), every file in it (archive members included) inspected, and the most restrictive
//! session decision over them stands. Runs on the inspection pool.

use bytes::Bytes;
use sluice_inspect::{self as inspect, FileFacts, NotInspectable, dlp, multipart};
use sluice_policy::{
    PolicySet,
    model::{Action, Activity, Kind},
};

use super::{
    context::Context,
    decide::{Decided, Dlp, Record, most_restrictive},
};
use crate::proxy::hooks::BodyVerdict;

/// Most parts in a multipart body.
const MAX_PARTS: usize = 1_000;
/// Most fields in a URL-encoded form.
const MAX_FIELDS: usize = 10_000;

/// What is known of an upload before its body arrives.
#[derive(Debug, Clone, Copy)]
pub(super) struct Upload {
    /// The declared length.
    pub(super) declared: Option<u64>,
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
            facts,
            BodyVerdict::Pass,
        )
    }

    /// Judges a held request body.
    pub(super) fn judge(&self, cx: &Context, rec: &mut Record, body: &Bytes) -> BodyVerdict {
        let seen = body.len() as u64;
        if cx
            .request_encoding
            .as_deref()
            .is_some_and(|e| !e.trim().eq_ignore_ascii_case("identity"))
        {
            return self.unreadable(
                cx,
                rec,
                NotInspectable::Unsupported("compressed request bodies".into()),
                seen,
            );
        }
        let ctype = cx
            .request_type
            .as_deref()
            .unwrap_or("")
            .to_ascii_lowercase();
        let detectors = &cx.set.detectors;
        let mut files: Vec<FileFacts> = Vec::new();
        let mut text_dlp = Dlp::new();
        let mut add_hits = |h: dlp::Hits| {
            for (k, v) in h.counts {
                *text_dlp.entry(k).or_default() += v;
            }
        };
        let mut form = Vec::new();
        let mut has_file_part = false;
        // The boundary is case-sensitive: taken from the content type as sent.
        if let Some(boundary) = multipart::boundary(cx.request_type.as_deref().unwrap_or("")) {
            match multipart::parse(body, &boundary, MAX_PARTS) {
                Ok(parts) => {
                    for p in parts {
                        let data = body.get(p.data.clone()).unwrap_or(&[]);
                        let is_file = p.file_name.is_some()
                            || cx
                                .form_field
                                .as_deref()
                                .is_some_and(|f| p.name.as_deref() == Some(f));
                        if is_file {
                            has_file_part = true;
                            // An archive brings its members: each is decided as a file.
                            files.extend(inspect::inspect_with_members(
                                data,
                                p.file_name.as_deref(),
                                &cx.limits,
                                detectors,
                            ));
                        } else {
                            add_hits(detectors.scan(data));
                            if let Some(n) = p.name {
                                form.push((n, String::from_utf8_lossy(data).into_owned()));
                            }
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
        } else if ctype.starts_with("application/x-www-form-urlencoded") {
            form = multipart::parse_urlencoded(body, MAX_FIELDS);
            for (_, v) in &form {
                add_hits(detectors.scan(v.as_bytes()));
            }
        } else if ctype.contains("json") {
            add_hits(detectors.scan_json(body));
        } else if ctype.starts_with("text/") {
            add_hits(detectors.scan(body));
        } else if !body.is_empty() {
            // A raw body: a file when the definition says upload or the bytes are a file type.
            let mut all = inspect::inspect_with_members(
                body,
                cx.defined_name.as_deref(),
                &cx.limits,
                detectors,
            );
            let is_file_type = !matches!(
                all[0].kind,
                Some(inspect::FileType::Text | inspect::FileType::Json)
            );
            if cx.defined == Some(Activity::Upload) || is_file_type {
                files.append(&mut all);
            } else {
                for (k, v) in all.swap_remove(0).dlp {
                    *text_dlp.entry(k).or_default() += v;
                }
            }
        }
        // A form can name the activity (one endpoint for several actions).
        let activity = if !form.is_empty() {
            cx.set
                .activity(&cx.input.app, &cx.method, &cx.path, &form)
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
        // Each file is decided; the most restrictive decision stands (none: the request alone).
        let mut decisions: Vec<Decided> = files
            .iter()
            .map(|f| cx.decide_file(activity, Some(f), &text_dlp))
            .collect();
        let (d, name) = match most_restrictive(&decisions) {
            Some(i) => (decisions.swap_remove(i), files[i].name.clone()),
            None => (cx.decide_file(activity, None, &text_dlp), None),
        };
        rec.take(Kind::Session, activity, &d);
        rec.note(
            files
                .iter()
                .find_map(|f| f.not_inspectable.as_ref().map(|n| n.to_string())),
        );
        rec.files.extend(files);
        rec.dlp = text_dlp;
        if d.action == Action::Block {
            BodyVerdict::Respond(cx.block_page(&d, name.as_deref()))
        } else {
            BodyVerdict::Pass
        }
    }
}
