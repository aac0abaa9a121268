//! One SQL interface over the two stores: SQLite (embedded, one machine) and PostgreSQL (shared
//! by several collectors).
//!
//! Statements are written once, in the subset both speak, with SQLite's numbered parameters
//! (`?1`, or bare `?` numbered in order) and double-quoted identifiers where a name is reserved
//! in PostgreSQL (`"user"`). For PostgreSQL a statement is translated once per connection and
//! prepared ([`pg_sql`]): `?N` becomes `$N`, and `LIKE` becomes `ILIKE`, because SQLite's `LIKE`
//! ignores ASCII case and the two stores must return the same rows for the same query. Where the
//! dialects differ beyond that (DDL, the scalar `max(a, b)`, bulk inserts), the caller asks
//! [`Conn::is_pg`] and writes each.
//!
//! Values cross as [`Val`] (read) and [`Param`] (bound: anything both drivers can bind). Rows are
//! read whole into [`Row`]s; integer columns of any width read as `i64`, booleans as 0 or 1, so a
//! row reads the same from either store.

use std::{cell::RefCell, collections::HashMap};

use postgres::types::{IsNull, ToSql, Type, to_sql_checked};

/// Errors of the SQL layer.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// SQLite.
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL.
    #[error("{}", pg_message(.0))]
    Postgres(#[from] postgres::Error),
    /// A statement that must return a row returned none.
    #[error("no row")]
    NoRow,
    /// A column does not hold what the caller reads.
    #[error("column {0}: {1}")]
    Type(usize, String),
    /// Stored data that cannot be read (a damaged event body).
    #[error("{0}")]
    Invalid(String),
}

fn pg_message(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("postgresql: {} ({})", d.message(), d.code().code()),
        None => {
            // The cause says what went wrong (a refused certificate, a closed socket).
            let mut text = format!("postgresql: {e}");
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                text.push_str(&format!(": {c}"));
                cause = c.source();
            }
            text
        }
    }
}

impl DbError {
    /// A unique (or primary key) constraint refused the row.
    pub fn is_unique_violation(&self) -> bool {
        match self {
            Self::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::ConstraintViolation
            }
            Self::Postgres(e) => e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION),
            _ => false,
        }
    }

    /// The connection itself failed (the server went away): the connection is not reused.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            Self::Postgres(e) => e.is_closed() || e.as_db_error().is_none() && e.code().is_none(),
            _ => false,
        }
    }
}

/// `Ok(None)` for [`DbError::NoRow`].
pub trait OptionalRow<T> {
    /// The row, none, or the error.
    fn optional(self) -> Result<Option<T>, DbError>;
}

impl<T> OptionalRow<T> for Result<T, DbError> {
    fn optional(self) -> Result<Option<T>, DbError> {
        match self {
            Ok(v) => Ok(Some(v)),
            Err(DbError::NoRow) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A value read from a column, or a dynamic parameter (the query language's).
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    /// NULL.
    Null,
    /// Any integer (or boolean, as 0 or 1).
    Int(i64),
    /// A float.
    Real(f64),
    /// Text.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
}

impl From<i64> for Val {
    fn from(v: i64) -> Self {
        Self::Int(v)
    }
}

impl From<String> for Val {
    fn from(v: String) -> Self {
        Self::Text(v)
    }
}

impl rusqlite::ToSql for Val {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Self::Null => ValueRef::Null,
            Self::Int(i) => ValueRef::Integer(*i),
            Self::Real(f) => ValueRef::Real(*f),
            Self::Text(s) => ValueRef::Text(s.as_bytes()),
            Self::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

impl ToSql for Val {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Self::Null => Ok(IsNull::Yes),
            Self::Int(i) => match *ty {
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                _ => i.to_sql(ty, out),
            },
            Self::Real(f) => f.to_sql(ty, out),
            Self::Text(s) => s.to_sql(ty, out),
            Self::Blob(b) => b.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        matches!(
            *ty,
            Type::INT2
                | Type::INT4
                | Type::INT8
                | Type::BOOL
                | Type::FLOAT8
                | Type::TEXT
                | Type::VARCHAR
                | Type::BPCHAR
                | Type::NAME
                | Type::UNKNOWN
                | Type::BYTEA
        )
    }

    to_sql_checked!();
}

/// Anything both drivers bind: integers (`i64`; PostgreSQL binds no unsigned type), text,
/// bytes, options of those, [`Val`].
pub trait Param: rusqlite::ToSql + ToSql + Sync {}
impl<T: rusqlite::ToSql + ToSql + Sync> Param for T {}

/// Parameters for a statement: `args![a, b]`.
#[macro_export]
macro_rules! args {
    () => { &[] as &[&dyn $crate::db::Param] };
    ($($p:expr),+ $(,)?) => { &[$(&$p as &dyn $crate::db::Param),+] as &[&dyn $crate::db::Param] };
}

/// A statement's parameters: `args![a, b]`, or an array of one type (`[id]`).
pub trait Args {
    /// Calls `f` with the parameters as a slice.
    fn with<R>(&self, f: impl FnOnce(&[&dyn Param]) -> R) -> R;
}

impl Args for [&dyn Param] {
    fn with<R>(&self, f: impl FnOnce(&[&dyn Param]) -> R) -> R {
        f(self)
    }
}

impl Args for Vec<&dyn Param> {
    fn with<R>(&self, f: impl FnOnce(&[&dyn Param]) -> R) -> R {
        f(self)
    }
}

impl<T: Args + ?Sized> Args for &T {
    fn with<R>(&self, f: impl FnOnce(&[&dyn Param]) -> R) -> R {
        (**self).with(f)
    }
}

impl<T: Param, const N: usize> Args for [T; N] {
    fn with<R>(&self, f: impl FnOnce(&[&dyn Param]) -> R) -> R {
        let v: Vec<&dyn Param> = self.iter().map(|p| p as &dyn Param).collect();
        f(&v)
    }
}

/// A statement to run several times (the statement caches make preparing cheap).
#[derive(Debug)]
pub struct Stmt<'s, 'a, 'c> {
    conn: &'s Conn<'a, 'c>,
    sql: String,
}

impl Stmt<'_, '_, '_> {
    /// Runs it; returns the rows it changed.
    pub fn execute(&mut self, params: impl Args) -> Result<u64, DbError> {
        self.conn.execute(&self.sql, params)
    }

    /// Its first row, turned into a `T` by `f`.
    pub fn query_row<T>(
        &mut self,
        params: impl Args,
        f: impl FnOnce(&Row) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        self.conn.query_row(&self.sql, params, f)
    }

    /// Its rows, each turned into a `T` by `f`.
    pub fn query_map<T>(
        &mut self,
        params: impl Args,
        f: impl FnMut(&Row) -> Result<T, DbError>,
    ) -> Result<std::vec::IntoIter<Result<T, DbError>>, DbError> {
        Ok(self
            .conn
            .query(&self.sql, params)?
            .iter()
            .map(f)
            .collect::<Vec<_>>()
            .into_iter())
    }
}

/// A row, read whole.
#[derive(Debug, Clone, PartialEq)]
pub struct Row(pub Vec<Val>);

/// What a column can be read as.
pub trait FromVal: Sized {
    /// Converts; `None` when the value is not of this kind.
    fn from_val(v: &Val) -> Option<Self>;
}

impl FromVal for i64 {
    fn from_val(v: &Val) -> Option<Self> {
        match v {
            Val::Int(i) => Some(*i),
            _ => None,
        }
    }
}

impl FromVal for f64 {
    fn from_val(v: &Val) -> Option<Self> {
        match v {
            Val::Real(f) => Some(*f),
            Val::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
}

impl FromVal for bool {
    fn from_val(v: &Val) -> Option<Self> {
        match v {
            Val::Int(i) => Some(*i != 0),
            _ => None,
        }
    }
}

impl FromVal for String {
    fn from_val(v: &Val) -> Option<Self> {
        match v {
            Val::Text(s) => Some(s.clone()),
            Val::Blob(b) => String::from_utf8(b.clone()).ok(),
            _ => None,
        }
    }
}

impl FromVal for Vec<u8> {
    fn from_val(v: &Val) -> Option<Self> {
        match v {
            Val::Blob(b) => Some(b.clone()),
            Val::Text(s) => Some(s.as_bytes().to_vec()),
            _ => None,
        }
    }
}

impl<T: FromVal> FromVal for Option<T> {
    fn from_val(v: &Val) -> Option<Self> {
        match v {
            Val::Null => Some(None),
            v => T::from_val(v).map(Some),
        }
    }
}

impl Row {
    /// Column `i` as `T`.
    pub fn get<T: FromVal>(&self, i: usize) -> Result<T, DbError> {
        let v = self
            .0
            .get(i)
            .ok_or_else(|| DbError::Type(i, "no such column".into()))?;
        T::from_val(v).ok_or_else(|| {
            DbError::Type(i, format!("{v:?} is not a {}", std::any::type_name::<T>()))
        })
    }

    fn from_lite(r: &rusqlite::Row<'_>, n: usize) -> rusqlite::Result<Self> {
        use rusqlite::types::ValueRef;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            out.push(match r.get_ref(i)? {
                ValueRef::Null => Val::Null,
                ValueRef::Integer(i) => Val::Int(i),
                ValueRef::Real(f) => Val::Real(f),
                ValueRef::Text(t) => Val::Text(String::from_utf8_lossy(t).into_owned()),
                ValueRef::Blob(b) => Val::Blob(b.to_vec()),
            });
        }
        Ok(Self(out))
    }

    fn from_pg(r: &postgres::Row) -> Result<Self, DbError> {
        let mut out = Vec::with_capacity(r.len());
        for (i, c) in r.columns().iter().enumerate() {
            let v = match *c.type_() {
                Type::INT8 => r.try_get::<_, Option<i64>>(i)?.map(Val::Int),
                Type::INT4 => r.try_get::<_, Option<i32>>(i)?.map(|v| Val::Int(v.into())),
                Type::INT2 => r.try_get::<_, Option<i16>>(i)?.map(|v| Val::Int(v.into())),
                Type::OID => r.try_get::<_, Option<u32>>(i)?.map(|v| Val::Int(v.into())),
                Type::BOOL => r.try_get::<_, Option<bool>>(i)?.map(|v| Val::Int(v.into())),
                Type::FLOAT8 => r.try_get::<_, Option<f64>>(i)?.map(Val::Real),
                Type::FLOAT4 => r.try_get::<_, Option<f32>>(i)?.map(|v| Val::Real(v.into())),
                Type::BYTEA => r.try_get::<_, Option<Vec<u8>>>(i)?.map(Val::Blob),
                Type::VOID => None,
                Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
                    r.try_get::<_, Option<String>>(i)?.map(Val::Text)
                }
                ref other => {
                    return Err(DbError::Type(
                        i,
                        format!("PostgreSQL type {other} is not read (cast it in the query)"),
                    ));
                }
            };
            out.push(v.unwrap_or(Val::Null));
        }
        Ok(Self(out))
    }
}

/// Translates a statement for PostgreSQL: `?N` to `$N`, a bare `?` to the next number, `LIKE` to
/// `ILIKE` (see the module documentation). Text inside single quotes is left alone.
pub fn pg_sql(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let b = sql.as_bytes();
    let mut i = 0;
    let mut next = 1usize;
    let mut quoted = false;
    while i < b.len() {
        let c = b[i];
        if c == b'\'' {
            quoted = !quoted;
            out.push('\'');
            i += 1;
            continue;
        }
        if quoted {
            // Copy the whole UTF-8 character.
            let len = utf8_len(c);
            out.push_str(&sql[i..i + len]);
            i += len;
            continue;
        }
        if c == b'?' {
            let start = i + 1;
            let mut end = start;
            while end < b.len() && b[end].is_ascii_digit() {
                end += 1;
            }
            if end > start {
                let n: usize = sql[start..end].parse().unwrap_or(0);
                next = next.max(n + 1);
                out.push('$');
                out.push_str(&sql[start..end]);
            } else {
                out.push('$');
                out.push_str(&next.to_string());
                next += 1;
            }
            i = end;
            continue;
        }
        if (c == b'L' || c == b'l')
            && sql.len() >= i + 4
            && b[i..i + 4].eq_ignore_ascii_case(b"like")
            && (i == 0 || !is_word(b[i - 1]))
            && b.get(i + 4).is_none_or(|n| !is_word(*n))
        {
            out.push_str("ILIKE");
            i += 4;
            continue;
        }
        let len = utf8_len(c);
        out.push_str(&sql[i..i + len]);
        i += len;
    }
    out
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn utf8_len(first: u8) -> usize {
    match first {
        0..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

/// Translates SQLite DDL for PostgreSQL: `INTEGER PRIMARY KEY` becomes an identity column,
/// `INTEGER` `BIGINT`, `BLOB` `BYTEA`, `REAL` `DOUBLE PRECISION`. The tables of the collector's
/// parts are written in that common form.
pub fn pg_ddl(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 64);
    let words: Vec<&str> = sql.split_inclusive(|c: char| !is_word_char(c)).collect();
    let mut i = 0;
    while i < words.len() {
        let w = words[i];
        let (word, rest) = w.split_at(w.trim_end_matches(|c: char| !is_word_char(c)).len());
        let upper = word.to_ascii_uppercase();
        if upper == "INTEGER" {
            // Look ahead for `PRIMARY KEY` (spaces in between).
            let tail: String = words[i + 1..words.len().min(i + 5)].concat();
            if tail
                .trim_start()
                .to_ascii_uppercase()
                .starts_with("PRIMARY KEY")
            {
                out.push_str("BIGINT GENERATED BY DEFAULT AS IDENTITY");
            } else {
                out.push_str("BIGINT");
            }
        } else if upper == "BLOB" {
            out.push_str("BYTEA");
        } else if upper == "REAL" {
            out.push_str("DOUBLE PRECISION");
        } else {
            out.push_str(word);
        }
        out.push_str(rest);
        i += 1;
    }
    out
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Runs `f`, which blocks on PostgreSQL's client (it drives its connection on a runtime of its
/// own, which cannot start inside another's context): on a worker of a multi-threaded Tokio
/// runtime through `block_in_place`, elsewhere (a blocking-pool thread, a plain thread) as is.
/// The store is meant to be called from blocking threads; this keeps a call from an async task
/// working (slowly) instead of panicking.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// A PostgreSQL connection with its prepared statements.
pub struct PgConn {
    /// The client.
    pub client: postgres::Client,
    /// Its prepared statements, by the statement's text before translation.
    pub stmts: HashMap<String, postgres::Statement>,
}

/// Prepared statements kept per connection; the query language makes statements without end,
/// so the cache is emptied when it is full.
const PG_STATEMENTS: usize = 256;

impl PgConn {
    /// Wraps a connected client.
    pub fn new(client: postgres::Client) -> Self {
        Self {
            client,
            stmts: HashMap::new(),
        }
    }
}

impl std::fmt::Debug for PgConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConn")
            .field("statements", &self.stmts.len())
            .finish()
    }
}

enum PgSide<'a, 'c> {
    Client(&'a mut postgres::Client),
    Tx(&'a mut postgres::Transaction<'c>),
}

struct PgCtx<'a, 'c> {
    side: PgSide<'a, 'c>,
    stmts: &'a mut HashMap<String, postgres::Statement>,
}

impl PgCtx<'_, '_> {
    fn statement(&mut self, sql: &str) -> Result<postgres::Statement, DbError> {
        if let Some(s) = self.stmts.get(sql) {
            return Ok(s.clone());
        }
        let text = pg_sql(sql);
        let st = match &mut self.side {
            PgSide::Client(c) => c.prepare(&text)?,
            PgSide::Tx(t) => t.prepare(&text)?,
        };
        if self.stmts.len() >= PG_STATEMENTS {
            self.stmts.clear();
        }
        self.stmts.insert(sql.to_owned(), st.clone());
        Ok(st)
    }

    fn execute(&mut self, sql: &str, params: &[&dyn Param]) -> Result<u64, DbError> {
        let st = self.statement(sql)?;
        let p: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| *p as _).collect();
        Ok(match &mut self.side {
            PgSide::Client(c) => c.execute(&st, &p)?,
            PgSide::Tx(t) => t.execute(&st, &p)?,
        })
    }

    fn query(&mut self, sql: &str, params: &[&dyn Param]) -> Result<Vec<Row>, DbError> {
        let st = self.statement(sql)?;
        let p: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| *p as _).collect();
        let rows = match &mut self.side {
            PgSide::Client(c) => c.query(&st, &p)?,
            PgSide::Tx(t) => t.query(&st, &p)?,
        };
        rows.iter().map(Row::from_pg).collect()
    }

    fn batch(&mut self, sql: &str) -> Result<(), DbError> {
        match &mut self.side {
            PgSide::Client(c) => c.batch_execute(sql)?,
            PgSide::Tx(t) => t.batch_execute(sql)?,
        }
        Ok(())
    }
}

enum Inner<'a, 'c> {
    Lite(&'a rusqlite::Connection),
    Pg(RefCell<PgCtx<'a, 'c>>),
}

/// A connection (or a transaction on one) of either store.
pub struct Conn<'a, 'c> {
    inner: Inner<'a, 'c>,
}

impl std::fmt::Debug for Conn<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_pg() {
            "Conn(postgresql)"
        } else {
            "Conn(sqlite)"
        })
    }
}

impl<'a> Conn<'a, 'a> {
    /// A SQLite connection (or transaction: `rusqlite::Transaction` derefs to it).
    pub fn lite(c: &'a rusqlite::Connection) -> Self {
        Self {
            inner: Inner::Lite(c),
        }
    }

    /// A PostgreSQL connection, outside a transaction (each statement commits).
    pub fn pg(c: &'a mut PgConn) -> Self {
        Self {
            inner: Inner::Pg(RefCell::new(PgCtx {
                side: PgSide::Client(&mut c.client),
                stmts: &mut c.stmts,
            })),
        }
    }
}

impl<'a, 'c> Conn<'a, 'c> {
    /// A PostgreSQL transaction, with the connection's statement cache.
    pub fn pg_tx(
        tx: &'a mut postgres::Transaction<'c>,
        stmts: &'a mut HashMap<String, postgres::Statement>,
    ) -> Self {
        Self {
            inner: Inner::Pg(RefCell::new(PgCtx {
                side: PgSide::Tx(tx),
                stmts,
            })),
        }
    }

    /// Whether this is PostgreSQL (for what the dialects write differently).
    pub fn is_pg(&self) -> bool {
        matches!(self.inner, Inner::Pg(_))
    }

    /// Runs a statement; returns the rows it changed.
    pub fn execute(&self, sql: &str, params: impl Args) -> Result<u64, DbError> {
        params.with(|params| self.execute_slice(sql, params))
    }

    fn execute_slice(&self, sql: &str, params: &[&dyn Param]) -> Result<u64, DbError> {
        match &self.inner {
            Inner::Lite(c) => {
                let mut st = c.prepare_cached(sql)?;
                let p: Vec<&dyn rusqlite::ToSql> = params.iter().map(|p| *p as _).collect();
                Ok(st.execute(&*p)? as u64)
            }
            Inner::Pg(ctx) => ctx.borrow_mut().execute(sql, params),
        }
    }

    /// Every row of a query.
    pub fn query(&self, sql: &str, params: impl Args) -> Result<Vec<Row>, DbError> {
        params.with(|params| self.query_slice(sql, params))
    }

    /// A statement to run (prepared and cached on first use).
    pub fn prepare<'s>(&'s self, sql: &str) -> Result<Stmt<'s, 'a, 'c>, DbError> {
        Ok(Stmt {
            conn: self,
            sql: sql.to_owned(),
        })
    }

    /// Same as [`Conn::prepare`] (every statement is cached).
    pub fn prepare_cached<'s>(&'s self, sql: &str) -> Result<Stmt<'s, 'a, 'c>, DbError> {
        self.prepare(sql)
    }

    fn query_slice(&self, sql: &str, params: &[&dyn Param]) -> Result<Vec<Row>, DbError> {
        match &self.inner {
            Inner::Lite(c) => {
                let mut st = c.prepare_cached(sql)?;
                let n = st.column_count();
                let p: Vec<&dyn rusqlite::ToSql> = params.iter().map(|p| *p as _).collect();
                let rows = st.query_map(&*p, |r| Row::from_lite(r, n))?;
                Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
            }
            Inner::Pg(ctx) => ctx.borrow_mut().query(sql, params),
        }
    }

    /// Every row of a query, each turned into a `T` by `f`.
    pub fn query_map<T>(
        &self,
        sql: &str,
        params: impl Args,
        f: impl FnMut(&Row) -> Result<T, DbError>,
    ) -> Result<Vec<T>, DbError> {
        self.query(sql, params)?.iter().map(f).collect()
    }

    /// The first row of a query, turned into a `T` by `f`; [`DbError::NoRow`] when there is
    /// none.
    pub fn query_row<T>(
        &self,
        sql: &str,
        params: impl Args,
        f: impl FnOnce(&Row) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        let rows = self.query(sql, params)?;
        f(rows.first().ok_or(DbError::NoRow)?)
    }

    /// Calls `f` with each row of a query as it comes (without reading them all first) until
    /// the end or until `f` returns false.
    pub fn for_each(
        &self,
        sql: &str,
        params: impl Args,
        mut f: impl FnMut(&Row) -> Result<bool, DbError>,
    ) -> Result<(), DbError> {
        params.with(|params| match &self.inner {
            Inner::Lite(c) => {
                let mut st = c.prepare_cached(sql)?;
                let n = st.column_count();
                let p: Vec<&dyn rusqlite::ToSql> = params.iter().map(|p| *p as _).collect();
                let mut rows = st.query(&*p)?;
                while let Some(r) = rows.next()? {
                    if !f(&Row::from_lite(r, n)?)? {
                        break;
                    }
                }
                Ok(())
            }
            Inner::Pg(ctx) => {
                let mut ctx = ctx.borrow_mut();
                let st = ctx.statement(sql)?;
                let p = params.iter().map(|p| *p as &(dyn ToSql + Sync));
                let mut rows = match &mut ctx.side {
                    PgSide::Client(c) => c.query_raw(&st, p)?,
                    PgSide::Tx(t) => t.query_raw(&st, p)?,
                };
                while let Some(r) = postgres::fallible_iterator::FallibleIterator::next(&mut rows)?
                {
                    if !f(&Row::from_pg(&r)?)? {
                        break;
                    }
                }
                Ok(())
            }
        })
    }

    /// Runs several statements without parameters (migrations).
    pub fn batch(&self, sql: &str) -> Result<(), DbError> {
        match &self.inner {
            Inner::Lite(c) => Ok(c.execute_batch(sql)?),
            Inner::Pg(ctx) => ctx.borrow_mut().batch(sql),
        }
    }

    /// The SQLite connection, for what only SQLite does.
    pub fn as_lite(&self) -> Option<&rusqlite::Connection> {
        match &self.inner {
            Inner::Lite(c) => Some(c),
            Inner::Pg(_) => None,
        }
    }

    /// Runs `f` on the PostgreSQL transaction or client, for what only PostgreSQL does (bulk
    /// inserts with arrays).
    pub fn with_pg<T>(
        &self,
        f: impl FnOnce(&mut dyn PgExec) -> Result<T, DbError>,
    ) -> Option<Result<T, DbError>> {
        match &self.inner {
            Inner::Lite(_) => None,
            Inner::Pg(ctx) => {
                let mut ctx = ctx.borrow_mut();
                Some(f(&mut *ctx))
            }
        }
    }
}

/// PostgreSQL statements with any parameter the driver binds (arrays included).
pub trait PgExec {
    /// Rows of a statement (prepared and cached like the others).
    fn query_pg(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, DbError>;
}

impl PgExec for PgCtx<'_, '_> {
    fn query_pg(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, DbError> {
        let st = self.statement(sql)?;
        let rows = match &mut self.side {
            PgSide::Client(c) => c.query(&st, params)?,
            PgSide::Tx(t) => t.query(&st, params)?,
        };
        rows.iter().map(Row::from_pg).collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn statements_translate_for_postgresql() {
        assert_eq!(
            pg_sql("SELECT a FROM t WHERE b = ?1 AND c LIKE ?2 ESCAPE '\\' LIMIT ?3"),
            "SELECT a FROM t WHERE b = $1 AND c ILIKE $2 ESCAPE '\\' LIMIT $3"
        );
        // Bare `?` number on from the largest so far; quoted text is left alone.
        assert_eq!(
            pg_sql("x = ?3 AND y = ? AND z = '?1 like' AND unlike = ?"),
            "x = $3 AND y = $4 AND z = '?1 like' AND unlike = $5"
        );
        assert_eq!(pg_sql("v = 'é?' AND w = ?"), "v = 'é?' AND w = $1");
    }

    #[test]
    fn ddl_translates_for_postgresql() {
        assert_eq!(
            pg_ddl("CREATE TABLE t(id INTEGER PRIMARY KEY, n INTEGER NOT NULL, b BLOB, r REAL);"),
            "CREATE TABLE t(id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, n BIGINT NOT \
             NULL, b BYTEA, r DOUBLE PRECISION);"
        );
    }

    #[test]
    fn rows_read_the_same_whatever_the_width() {
        let r = Row(vec![Val::Int(3), Val::Null, Val::Text("a".into())]);
        assert_eq!(r.get::<i64>(0).unwrap(), 3);
        assert!(r.get::<bool>(0).unwrap());
        assert_eq!(r.get::<Option<i64>>(1).unwrap(), None);
        assert_eq!(r.get::<String>(2).unwrap(), "a");
        assert!(r.get::<i64>(2).is_err());
        assert!(r.get::<i64>(9).is_err());
    }
}
