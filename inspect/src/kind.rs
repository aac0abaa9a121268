//! The file types Sluice tells apart. Sniffing ([`super::sniff`]) and each format's reader name
//! them; this module depends on none of them.

use serde::Serialize;

/// A file type, sniffed from the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileType {
    /// Word document (OOXML package with `word/document.xml`).
    Docx,
    /// Excel workbook (OOXML package with `xl/workbook.xml`).
    Xlsx,
    /// PowerPoint presentation (OOXML package with `ppt/presentation.xml`).
    Pptx,
    /// PDF.
    Pdf,
    /// OpenDocument text (a package whose `mimetype` says so).
    Odt,
    /// OpenDocument spreadsheet.
    Ods,
    /// OpenDocument presentation.
    Odp,
    /// Legacy binary Word document (OLE compound file with a `WordDocument` stream).
    Doc,
    /// Legacy binary Excel workbook (OLE compound file with a `Workbook` or `Book` stream).
    Xls,
    /// Legacy binary PowerPoint presentation (OLE compound file with a `PowerPoint Document`
    /// stream).
    Ppt,
    /// Any other OLE compound file: an encrypted OOXML package, or one that does not parse.
    Ole,
    /// Any other zip archive (or a corrupt one).
    Zip,
    /// PNG image.
    Png,
    /// JPEG image.
    Jpeg,
    /// GIF image.
    Gif,
    /// JSON text (object or array).
    Json,
    /// XML text (starting with an XML declaration).
    Xml,
    /// HTML text.
    Html,
    /// Other UTF-8 text.
    Text,
    /// Anything not recognised.
    Binary,
}

impl FileType {
    /// Text, JSON, XML and HTML: read as text (DLP-scanned, searched for files carried
    /// base64-encoded); everything else is a file.
    pub fn is_text(self) -> bool {
        matches!(self, Self::Text | Self::Json | Self::Xml | Self::Html)
    }

    /// Every type, in declaration order.
    pub const ALL: [FileType; 20] = [
        FileType::Docx,
        FileType::Xlsx,
        FileType::Pptx,
        FileType::Pdf,
        FileType::Odt,
        FileType::Ods,
        FileType::Odp,
        FileType::Doc,
        FileType::Xls,
        FileType::Ppt,
        FileType::Ole,
        FileType::Zip,
        FileType::Png,
        FileType::Jpeg,
        FileType::Gif,
        FileType::Json,
        FileType::Xml,
        FileType::Html,
        FileType::Text,
        FileType::Binary,
    ];

    /// The short name (as serialised and as policies write it): `docx`, ..., `binary`.
    pub fn as_str(self) -> &'static str {
        match self {
            FileType::Docx => "docx",
            FileType::Xlsx => "xlsx",
            FileType::Pptx => "pptx",
            FileType::Pdf => "pdf",
            FileType::Odt => "odt",
            FileType::Ods => "ods",
            FileType::Odp => "odp",
            FileType::Doc => "doc",
            FileType::Xls => "xls",
            FileType::Ppt => "ppt",
            FileType::Ole => "ole",
            FileType::Zip => "zip",
            FileType::Png => "png",
            FileType::Jpeg => "jpeg",
            FileType::Gif => "gif",
            FileType::Json => "json",
            FileType::Xml => "xml",
            FileType::Html => "html",
            FileType::Text => "text",
            FileType::Binary => "binary",
        }
    }

    /// The MIME type.
    pub fn mime(self) -> &'static str {
        match self {
            FileType::Docx => {
                "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
            }
            FileType::Xlsx => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
            FileType::Pptx => {
                "application/vnd.openxmlformats-officedocument.presentationml.presentation"
            }
            FileType::Pdf => "application/pdf",
            FileType::Odt => "application/vnd.oasis.opendocument.text",
            FileType::Ods => "application/vnd.oasis.opendocument.spreadsheet",
            FileType::Odp => "application/vnd.oasis.opendocument.presentation",
            FileType::Doc => "application/msword",
            FileType::Xls => "application/vnd.ms-excel",
            FileType::Ppt => "application/vnd.ms-powerpoint",
            FileType::Ole => "application/x-ole-storage",
            FileType::Zip => "application/zip",
            FileType::Png => "image/png",
            FileType::Jpeg => "image/jpeg",
            FileType::Gif => "image/gif",
            FileType::Json => "application/json",
            FileType::Xml => "application/xml",
            FileType::Html => "text/html",
            FileType::Text => "text/plain",
            FileType::Binary => "application/octet-stream",
        }
    }

    /// Whether this is an OOXML Office document (docx, xlsx, pptx).
    pub fn is_office(self) -> bool {
        matches!(self, FileType::Docx | FileType::Xlsx | FileType::Pptx)
    }

    /// The type with this short name (ASCII case ignored; `jpg`, `htm`, `txt` accepted too).
    pub fn from_name(name: &str) -> Option<FileType> {
        let name = name.trim().to_ascii_lowercase();
        let alias = match name.as_str() {
            "jpg" => "jpeg",
            "htm" => "html",
            "txt" => "text",
            other => other,
        };
        FileType::ALL.into_iter().find(|t| t.as_str() == alias)
    }
}

impl std::fmt::Display for FileType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
