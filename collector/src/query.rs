//! The query language of the activity log, parsed into an AST that keeps each term's position, and
//! compiled to a SQL boolean expression over the `events` table with bound parameters (values
//! never enter the SQL text).
//!
//! ```text
//! user:alice@corp.example app:files action:block since:24h
//! -action:allow file:"Q3 plan*.docx" label:confidential "quarterly report"
//! ```
//! - Terms are separated by spaces and ANDed; `-` before a term negates it.
//! - `field:value`; values may be quoted (`"..."`, with `\"` and `\\`), `*` is a wildcard, and
//!   `a,b` (unquoted) means either.
//! - Fields: `user`, `group`, `app`, `activity`, `action`, `policy`, `device` (agent id or host
//!   name), `ip` (client or app address), `process` (name or path), `file` (file name), `label`
//!   (GUID, id or name), `class` (`http`, `file`, `device` or an OCSF class number).
//! - Time: `since:` and `until:` take a duration back from now (`30m`, `24h`, `7d`, `2w`) or an
//!   instant; `after:` and `before:` take an instant (RFC 3339 or Unix milliseconds).
//! - Anything else is free text matched inside URL, file names, user and message.

use crate::db::Val as Value;
use crate::store::terms;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// The fields a term may name.
pub const FIELDS: &[&str] = &[
    "user", "group", "app", "activity", "action", "policy", "device", "ip", "process", "file",
    "label", "class", "since", "until", "after", "before",
];

/// Most terms in one query.
pub const MAX_TERMS: usize = 64;
/// Longest query text (characters).
pub const MAX_LEN: usize = 4096;

/// A query that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("position {position}: {message}")]
pub struct QueryError {
    /// 1-based character position of the offending term.
    pub position: usize,
    /// What was wrong and what was expected.
    pub message: String,
}

/// A filter field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// `user`.
    User,
    /// `group`.
    Group,
    /// `app`.
    App,
    /// `activity`.
    Activity,
    /// `action`.
    Action,
    /// `policy`.
    Policy,
    /// `device`.
    Device,
    /// `ip`.
    Ip,
    /// `process`.
    Process,
    /// `file`.
    File,
    /// `label`.
    Label,
    /// `class`.
    Class,
}

/// What one term asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TermKind {
    /// `field:value[,value...]` (any of the values).
    Field {
        /// The field.
        field: Field,
        /// The values.
        values: Vec<String>,
    },
    /// Free text.
    Text(String),
    /// `time >= ms`.
    After(i64),
    /// `time <= ms`.
    Before(i64),
}

/// One term with where it started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Term {
    /// 1-based character position.
    pub position: usize,
    /// Negated with `-`.
    pub negated: bool,
    /// What it asks.
    pub kind: TermKind,
}

/// A parsed query.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// The terms, ANDed.
    pub terms: Vec<Term>,
}

/// A query compiled to SQL: `sql` is a boolean expression over `events` columns using anonymous
/// `?` parameters, bound in order from `params`.
#[derive(Debug, Clone, PartialEq)]
pub struct Compiled {
    /// The condition (`1` when the query is empty).
    pub sql: String,
    /// The values, in placeholder order.
    pub params: Vec<Value>,
}

impl Compiled {
    /// Matches every event.
    pub fn all() -> Self {
        Self {
            sql: "1 = 1".into(),
            params: Vec::new(),
        }
    }

    /// The parameters, to bind.
    pub fn args(&self) -> Vec<&dyn crate::db::Param> {
        self.params
            .iter()
            .map(|p| p as &dyn crate::db::Param)
            .collect()
    }
}

/// Parses `text` with "now" taken from the clock.
pub fn parse(text: &str) -> Result<Query, QueryError> {
    parse_at(text, crate::clock::now_ms())
}

struct Lexer<'a> {
    chars: Vec<char>,
    i: usize,
    _text: &'a str,
}

fn err(position: usize, message: impl Into<String>) -> QueryError {
    QueryError {
        position,
        message: message.into(),
    }
}

impl Lexer<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.i).copied()
    }

    /// A quoted string starting at the opening quote; returns its content.
    fn quoted(&mut self) -> Result<String, QueryError> {
        let start = self.i + 1;
        self.i += 1;
        let mut s = String::new();
        loop {
            match self.peek() {
                None => return Err(err(start, "unterminated quote: expected a closing \"")),
                Some('"') => {
                    self.i += 1;
                    break;
                }
                Some('\\') => {
                    self.i += 1;
                    match self.peek() {
                        Some(c @ ('"' | '\\')) => {
                            s.push(c);
                            self.i += 1;
                        }
                        _ => {
                            return Err(err(
                                self.i,
                                "a backslash in quotes must be followed by \" or \\",
                            ));
                        }
                    }
                }
                Some(c) => {
                    s.push(c);
                    self.i += 1;
                }
            }
        }
        if self.peek().is_some_and(|c| !c.is_whitespace()) {
            return Err(err(self.i + 1, "expected a space after the closing quote"));
        }
        Ok(s)
    }

    /// A bare word up to the next space (a `:` ends it when `stop_colon`).
    fn word(&mut self, stop_colon: bool) -> String {
        let mut s = String::new();
        while let Some(c) = self.peek() {
            if c.is_whitespace() || (stop_colon && c == ':') {
                break;
            }
            s.push(c);
            self.i += 1;
        }
        s
    }
}

/// Parses `text`, resolving relative times against `now_ms`.
pub fn parse_at(text: &str, now_ms: i64) -> Result<Query, QueryError> {
    if text.chars().count() > MAX_LEN {
        return Err(err(
            MAX_LEN,
            format!("query longer than {MAX_LEN} characters"),
        ));
    }
    let mut lx = Lexer {
        chars: text.chars().collect(),
        i: 0,
        _text: text,
    };
    let mut q = Query::default();
    loop {
        while lx.peek().is_some_and(char::is_whitespace) {
            lx.i += 1;
        }
        let Some(first) = lx.peek() else { break };
        let position = lx.i + 1;
        if q.terms.len() == MAX_TERMS {
            return Err(err(position, format!("more than {MAX_TERMS} terms")));
        }
        let mut negated = false;
        if first == '-' && lx.chars.get(lx.i + 1).is_some_and(|c| !c.is_whitespace()) {
            negated = true;
            lx.i += 1;
        }
        if lx.peek() == Some('"') {
            let t = lx.quoted()?;
            if t.trim().is_empty() {
                return Err(err(position, "empty quoted text"));
            }
            q.terms.push(Term {
                position,
                negated,
                kind: TermKind::Text(t),
            });
            continue;
        }
        let name_at = lx.i;
        let word = lx.word(true);
        if lx.peek() != Some(':') {
            // A bare word (free text).
            q.terms.push(Term {
                position,
                negated,
                kind: TermKind::Text(word),
            });
            continue;
        }
        lx.i += 1; // ':'
        let name = word.to_ascii_lowercase();
        let field_pos = name_at + 1;
        if name.is_empty() {
            return Err(err(field_pos, "expected a field name before `:`"));
        }
        let value_pos = lx.i + 1;
        let (values, quoted) = match lx.peek() {
            Some('"') => (vec![lx.quoted()?], true),
            Some(c) if !c.is_whitespace() => {
                let w = lx.word(false);
                (w.split(',').map(str::to_owned).collect::<Vec<_>>(), false)
            }
            _ => {
                return Err(err(value_pos, format!("expected a value after `{name}:`")));
            }
        };
        if !quoted && values.iter().any(String::is_empty) {
            return Err(err(
                value_pos,
                format!("empty value in the list after `{name}:`"),
            ));
        }
        let kind = match name.as_str() {
            "since" | "until" | "after" | "before" => {
                if negated {
                    return Err(err(position, format!("`{name}:` cannot be negated")));
                }
                let [v] = values.as_slice() else {
                    return Err(err(value_pos, format!("`{name}:` takes one value")));
                };
                let relative_ok = matches!(name.as_str(), "since" | "until");
                let ms = instant(v, now_ms, relative_ok).map_err(|m| err(value_pos, m))?;
                if matches!(name.as_str(), "since" | "after") {
                    TermKind::After(ms)
                } else {
                    TermKind::Before(ms)
                }
            }
            other => {
                let field = field_of(other).ok_or_else(|| {
                    err(
                        field_pos,
                        format!(
                            "unknown field \"{word}\"; fields are: {}",
                            FIELDS.join(", ")
                        ),
                    )
                })?;
                if field == Field::Class {
                    for v in &values {
                        class_of(v).ok_or_else(|| {
                            err(
                                value_pos,
                                format!(
                                    "unknown class \"{v}\"; expected http, file, device or a class number"
                                ),
                            )
                        })?;
                    }
                }
                TermKind::Field { field, values }
            }
        };
        q.terms.push(Term {
            position,
            negated,
            kind,
        });
    }
    Ok(q)
}

fn field_of(name: &str) -> Option<Field> {
    Some(match name {
        "user" => Field::User,
        "group" => Field::Group,
        "app" => Field::App,
        "activity" => Field::Activity,
        "action" => Field::Action,
        "policy" => Field::Policy,
        "device" => Field::Device,
        "ip" => Field::Ip,
        "process" => Field::Process,
        "file" => Field::File,
        "label" => Field::Label,
        "class" => Field::Class,
        _ => return None,
    })
}

fn class_of(v: &str) -> Option<i64> {
    match v.to_ascii_lowercase().as_str() {
        "http" => Some(i64::from(sluice_protocol::CLASS_HTTP_ACTIVITY)),
        "file" => Some(i64::from(sluice_protocol::CLASS_FILE_HOSTING)),
        "device" => Some(i64::from(sluice_protocol::CLASS_DEVICE_INVENTORY)),
        "network" | "connection" => Some(i64::from(sluice_protocol::CLASS_NETWORK_ACTIVITY)),
        n => n.parse::<u32>().ok().map(i64::from),
    }
}

/// Parses a duration such as `30m`, `24h`, `7d`, `2w`, `45s` into milliseconds.
pub fn duration_ms(v: &str) -> Option<i64> {
    let unit_at = v.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = v.split_at(unit_at);
    let n: i64 = n.parse().ok()?;
    let mul: i64 = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 7 * 86_400_000,
        _ => return None,
    };
    n.checked_mul(mul)
}

fn instant(v: &str, now_ms: i64, relative_ok: bool) -> Result<i64, String> {
    if relative_ok && let Some(d) = duration_ms(v) {
        return Ok(now_ms.saturating_sub(d));
    }
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return v
            .parse::<i64>()
            .map_err(|_| format!("\"{v}\" is out of range for Unix milliseconds"));
    }
    match OffsetDateTime::parse(v, &Rfc3339) {
        Ok(t) => i64::try_from(t.unix_timestamp_nanos() / 1_000_000)
            .map_err(|_| format!("\"{v}\" is out of range")),
        Err(_) if relative_ok => Err(format!(
            "bad time \"{v}\": expected a duration (30m, 24h, 7d, 2w), an RFC 3339 time or Unix milliseconds"
        )),
        Err(_) => Err(format!(
            "bad time \"{v}\": expected an RFC 3339 time (2026-01-31T12:00:00Z) or Unix milliseconds"
        )),
    }
}

/// `LIKE` pattern: `%`, `_` and `\` escaped (with `ESCAPE '\'`), `*` made a wildcard.
fn like_escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 2);
    for c in v.chars() {
        match c {
            '%' | '_' | '\\' => {
                s.push('\\');
                s.push(c);
            }
            '*' => s.push('%'),
            c => s.push(c),
        }
    }
    s
}

impl Query {
    /// The earliest and latest instants the time terms allow.
    pub fn time_range(&self) -> (Option<i64>, Option<i64>) {
        let mut lo = None;
        let mut hi = None;
        for t in &self.terms {
            match t.kind {
                TermKind::After(ms) => lo = Some(lo.map_or(ms, |l: i64| l.max(ms))),
                TermKind::Before(ms) => hi = Some(hi.map_or(ms, |h: i64| h.min(ms))),
                _ => {}
            }
        }
        (lo, hi)
    }

    /// Compiles to a SQL condition with bound parameters.
    pub fn compile(&self) -> Compiled {
        let mut parts = Vec::new();
        let mut params = Vec::new();
        for t in &self.terms {
            let cond = match &t.kind {
                TermKind::After(ms) => {
                    params.push(Value::Int(*ms));
                    "time >= ?".to_owned()
                }
                TermKind::Before(ms) => {
                    params.push(Value::Int(*ms));
                    "time <= ?".to_owned()
                }
                TermKind::Text(text) => {
                    let p = format!("%{}%", like_escape(text));
                    for _ in 0..4 {
                        params.push(Value::Text(p.clone()));
                    }
                    format!(
                        "(url LIKE ? ESCAPE '\\' OR file_names LIKE ? ESCAPE '\\' OR {} \
                         OR message LIKE ? ESCAPE '\\')",
                        terms::like("user_t", terms::USER)
                    )
                }
                TermKind::Field { field, values } => {
                    let alts: Vec<String> = values
                        .iter()
                        .map(|v| field_condition(*field, v, &mut params))
                        .collect();
                    if alts.len() == 1 {
                        alts.concat()
                    } else {
                        format!("({})", alts.join(" OR "))
                    }
                }
            };
            parts.push(if t.negated {
                format!("NOT {cond}")
            } else {
                cond
            });
        }
        if parts.is_empty() {
            return Compiled::all();
        }
        Compiled {
            sql: parts.join(" AND "),
            params,
        }
    }
}

fn field_condition(field: Field, raw: &str, params: &mut Vec<Value>) -> String {
    let wild = raw.contains('*');
    // Values stored lower case are compared lower case.
    let lowered = || raw.to_lowercase();
    // Term columns: the value (or pattern) is looked up in `terms`.
    let mut eq = |cols: &[&str], kind: i64, v: String| -> String {
        let conds: Vec<String> = cols
            .iter()
            .map(|c| {
                if wild {
                    params.push(Value::Text(like_escape(&v)));
                    terms::like(c, kind)
                } else {
                    params.push(Value::Text(v.clone()));
                    terms::eq(c, kind)
                }
            })
            .collect();
        if conds.len() == 1 {
            conds.concat()
        } else {
            format!("({})", conds.join(" OR "))
        }
    };
    match field {
        Field::User => eq(&["user_t"], terms::USER, lowered()),
        Field::Activity => eq(&["activity_t"], terms::ACTIVITY, lowered()),
        Field::Action => eq(&["action_t"], terms::ACTION, lowered()),
        Field::App => eq(&["app_t"], terms::APP, raw.to_owned()),
        Field::Policy => eq(&["policy_t"], terms::POLICY, raw.to_owned()),
        Field::Device => {
            let a = eq(&["device_t"], terms::DEVICE, raw.to_owned());
            let b = eq(&["host_t"], terms::HOST, raw.to_owned());
            format!("({a} OR {b})")
        }
        Field::Ip => eq(&["src_ip_t", "dst_ip_t"], terms::IP, raw.to_owned()),
        Field::Process => {
            let a = eq(&["process_t"], terms::PROCESS, raw.to_owned());
            let b = eq(&["path_t"], terms::PATH, raw.to_owned());
            format!("({a} OR {b})")
        }
        Field::Class => {
            params.push(Value::Int(class_of(raw).unwrap_or(-1)));
            "class_uid = ?".to_owned()
        }
        Field::File => {
            params.push(Value::Text(format!(
                "%|{}|%",
                like_escape(&raw.replace('|', "/"))
            )));
            "file_names LIKE ? ESCAPE '\\'".to_owned()
        }
        Field::Group | Field::Label => {
            let (col, kind) = match field {
                Field::Group => ("groups_t", terms::GROUPS),
                _ => ("labels_t", terms::LABELS),
            };
            params.push(Value::Text(format!(
                "%|{}|%",
                like_escape(&raw.replace('|', "/"))
            )));
            terms::like(col, kind)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn ok(q: &str) -> Query {
        parse_at(q, NOW).unwrap_or_else(|e| panic!("{q}: {e}"))
    }

    fn bad(q: &str) -> QueryError {
        parse_at(q, NOW)
            .err()
            .unwrap_or_else(|| panic!("{q} parsed"))
    }

    #[test]
    fn parses_the_contract_example() {
        let q = ok("user:alice@corp.example app:files action:block since:24h");
        assert_eq!(q.terms.len(), 4);
        assert_eq!(q.terms[2].position, 35);
        assert_eq!(
            q.terms[0].kind,
            TermKind::Field {
                field: Field::User,
                values: vec!["alice@corp.example".into()]
            }
        );
        assert_eq!(q.terms[3].kind, TermKind::After(NOW - 86_400_000));
        let c = q.compile();
        let t = |col, kind| {
            format!(
                "{col} = coalesce((SELECT id FROM terms WHERE kind = {kind} AND value = ?), -1)"
            )
        };
        assert_eq!(
            c.sql,
            format!(
                "{} AND {} AND {} AND time >= ?",
                t("user_t", terms::USER),
                t("app_t", terms::APP),
                t("action_t", terms::ACTION)
            )
        );
        assert_eq!(
            c.params,
            vec![
                Value::Text("alice@corp.example".into()),
                Value::Text("files".into()),
                Value::Text("block".into()),
                Value::Int(NOW - 86_400_000)
            ]
        );
    }

    #[test]
    fn quotes_negation_lists_wildcards_and_text() {
        let q = ok(r#"-action:allow,monitor file:"Q3 plan*.docx" "a \"b\"" report USER:Bob@X"#);
        let c = q.compile();
        let action = terms::eq("action_t", terms::ACTION);
        let text = format!(
            "(url LIKE ? ESCAPE '\\' OR file_names LIKE ? ESCAPE '\\' OR {} OR message LIKE ? \
             ESCAPE '\\')",
            terms::like("user_t", terms::USER)
        );
        assert_eq!(
            c.sql,
            format!(
                "NOT ({action} OR {action}) AND file_names LIKE ? ESCAPE '\\' AND {text} AND \
                 {text} AND {}",
                terms::eq("user_t", terms::USER)
            )
        );
        assert_eq!(c.params[2], Value::Text("%|Q3 plan%.docx|%".into()));
        assert_eq!(c.params[3], Value::Text("%a \"b\"%".into()));
        assert_eq!(c.params.last(), Some(&Value::Text("bob@x".into())));
        // LIKE metacharacters in values are escaped, never interpreted.
        let c = ok("user:a%b_c").compile();
        assert_eq!(c.params, vec![Value::Text("a%b_c".into())]);
        let c = ok("user:a%b*").compile();
        assert_eq!(c.params, vec![Value::Text("a\\%b%".into())]);
        // A SQL-looking value stays a value.
        let c = ok("app:x');DROP").compile();
        assert_eq!(c.sql, terms::eq("app_t", terms::APP));
        // Empty query matches all.
        assert_eq!(ok("   ").compile(), Compiled::all());
    }

    #[test]
    fn times_absolute_and_relative() {
        let q = ok("after:2026-01-31T12:00:00Z before:1800000000000 until:30m");
        assert_eq!(q.terms[0].kind, TermKind::After(1_769_860_800_000));
        assert_eq!(q.terms[1].kind, TermKind::Before(1_800_000_000_000));
        assert_eq!(q.terms[2].kind, TermKind::Before(NOW - 1_800_000));
        assert_eq!(
            q.time_range(),
            (Some(1_769_860_800_000), Some(NOW - 1_800_000))
        );
        assert_eq!(ok("class:file,5001").compile().params.len(), 2);
    }

    #[test]
    fn errors_name_the_position_and_what_was_expected() {
        let e = bad("app:files usr:alice");
        assert_eq!(e.position, 11);
        assert!(
            e.message
                .starts_with("unknown field \"usr\"; fields are: user, group"),
            "{e}"
        );
        assert_eq!(e.to_string().split(':').next(), Some("position 11"), "{e}");
        let e = bad("since:24x");
        assert_eq!(e.position, 7);
        assert!(e.message.contains("bad time \"24x\""), "{e}");
        let e = bad("after:24h");
        assert!(e.message.contains("RFC 3339"), "{e}");
        let e = bad("user:\"alice");
        assert_eq!(e.position, 6);
        assert!(e.message.contains("unterminated"), "{e}");
        let e = bad("user: alice");
        assert!(e.message.contains("expected a value after `user:`"), "{e}");
        let e = bad("-since:1h");
        assert!(e.message.contains("cannot be negated"), "{e}");
        let e = bad(":x");
        assert!(e.message.contains("field name"), "{e}");
        let e = bad("class:printer");
        assert!(e.message.contains("unknown class"), "{e}");
        let e = bad("action:block,");
        assert!(e.message.contains("empty value"), "{e}");
        let e = bad("\"ab\"cd");
        assert!(e.message.contains("space after"), "{e}");
        let e = bad("since:99999999999999999d");
        assert!(e.message.contains("bad time"), "{e}");
        let long = "a ".repeat(MAX_TERMS + 1);
        assert!(bad(&long).message.contains("terms"));
        // Positions count characters, not bytes.
        let e = bad("é usr:x");
        assert_eq!(e.position, 3);
    }
}
