//! File protection: a label written and the file encrypted in the standard format its type has,
//! so that everyday tools open it with the password and nothing else does.
//!
//! - PDF: the standard security handler, AES-256, revision 6 ([`crate::pdf::encrypt`]); the
//!   template's rights become the permission bits; an open password, or none when the template
//!   lets anyone open the file with restricted rights. The label and the release id stay in an
//!   XMP packet outside the encryption.
//! - OOXML (docx, xlsx, pptx): ECMA-376 agile encryption, AES-256 and SHA-512
//!   ([`crate::agile`]), in an OLE compound file that also holds, outside the encryption, the
//!   label as Office keeps it (a `LabelInfo` stream) and the label properties and the release id
//!   as document summary properties (`\x05DocumentSummaryInformation`). Password encryption of
//!   an Office file has no permission bits: the rights are written in the label's
//!   `Sluice_Permissions` property inside the package, and a template that lets anyone open the
//!   file cannot be honoured (an Office file has no "anyone opens, restricted" mode).
//! - Every other type is refused ([`NotInspectable::Unsupported`]): the policy then blocks the
//!   download, which is the documented choice for types no standard protects with rights.

use std::io::{Cursor, Write as _};

use crate::{
    Applied, FileType, LabelSpec, Limits, NotInspectable, agile, apply_label, label_properties,
    ole,
    pdf::{self, PdfProtection, PdfRights},
    sniff,
};

/// The document property naming a protected file's release (where to ask for its password).
pub const RELEASE_ID_PROPERTY: &str = "Sluice_ReleaseId";

/// What the holder of a protected file may do once it is open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rights {
    /// Print.
    pub print: bool,
    /// Copy or extract content.
    pub copy: bool,
    /// Change the document.
    pub edit: bool,
    /// Add or change annotations and comments.
    pub annotate: bool,
    /// Fill in forms.
    pub fill_forms: bool,
}

/// How one file is protected.
#[derive(Debug, Clone)]
pub struct Protection {
    /// The label written into the file (always replacing the tenant's label).
    pub label: LabelSpec,
    /// The password that opens the file; `None`: anyone may open it with the restricted
    /// rights (PDF only).
    pub open_password: Option<String>,
    /// The password that gives every right (PDF's owner password).
    pub owner_password: String,
    /// What opening with the open password allows.
    pub rights: Rights,
    /// The release this file's passwords are kept under.
    pub release_id: String,
}

/// Labels and encrypts `bytes` as `protection` says; the type is sniffed from the bytes.
pub fn protect(
    bytes: &[u8],
    protection: &Protection,
    limits: &Limits,
) -> Result<Vec<u8>, NotInspectable> {
    let kind = sniff::sniff(bytes);
    if !matches!(
        kind,
        FileType::Pdf | FileType::Docx | FileType::Xlsx | FileType::Pptx
    ) {
        return Err(NotInspectable::Unsupported(format!(
            "{} files cannot be protected",
            kind.as_str()
        )));
    }
    let labeled = match apply_label(bytes, &protection.label, true, limits)? {
        Applied::Labeled(b) => b,
        Applied::AlreadyLabeled(_) => bytes.to_vec(),
    };
    let mut metadata = label_properties(&protection.label);
    metadata.push((
        RELEASE_ID_PROPERTY.to_owned(),
        protection.release_id.clone(),
    ));
    if kind == FileType::Pdf {
        let r = protection.rights;
        return pdf::encrypt(
            &labeled,
            &PdfProtection {
                open_password: protection.open_password.as_deref(),
                owner_password: &protection.owner_password,
                rights: PdfRights {
                    print: r.print,
                    modify: r.edit,
                    copy: r.copy,
                    annotate: r.annotate,
                    fill_forms: r.fill_forms,
                },
                metadata,
            },
            limits,
        );
    }
    let Some(password) = protection.open_password.as_deref() else {
        return Err(NotInspectable::Unsupported(format!(
            "a {} file cannot be opened by anyone with restricted rights",
            kind.as_str()
        )));
    };
    let fail = |e: &dyn std::fmt::Display| NotInspectable::Malformed(format!("protecting: {e}"));
    let encrypted = agile::encrypt(&labeled, password).map_err(|e| fail(&e))?;
    // The label and the release id, outside the encryption.
    let mut cf = cfb::CompoundFile::open(Cursor::new(encrypted)).map_err(|e| fail(&e))?;
    let write = |cf: &mut cfb::CompoundFile<Cursor<Vec<u8>>>, path: &str, data: &[u8]| {
        cf.create_stream(path)
            .and_then(|mut s| s.write_all(data))
            .map_err(|e| fail(&e))
    };
    write(&mut cf, "/LabelInfo", &label_info_stream(&protection.label))?;
    write(
        &mut cf,
        "/\u{5}DocumentSummaryInformation",
        &ole::summary_stream(&metadata),
    )?;
    cf.flush().map_err(|e| fail(&e))?;
    Ok(cf.into_inner().into_inner())
}

/// The `LabelInfo` stream Office keeps outside an encrypted package: the label list XML
/// ([MS-OFFCRYPTO] 2.6.4), UTF-16LE with a byte order mark; content bit 8 says "encrypted".
fn label_info_stream(label: &LabelSpec) -> Vec<u8> {
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"utf-16\" standalone=\"yes\"?>\
         <clbl:labelList xmlns:clbl=\"http://schemas.microsoft.com/office/2020/mipLabelMetadata\">\
         <clbl:label id=\"{{{}}}\" enabled=\"1\" method=\"{}\" siteId=\"{{{}}}\" contentBits=\"8\" removed=\"0\"/>\
         </clbl:labelList>",
        label.guid,
        crate::xml::escape_attr(&label.method),
        label.tenant
    );
    let mut out = vec![0xff, 0xfe];
    for unit in xml.encode_utf16() {
        out.extend_from_slice(&unit.to_le_bytes());
    }
    out
}
