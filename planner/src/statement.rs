//! The dstream SQL dialect: the statements dstream adds to standard SQL, and a parser
//! that reads a script into [`Statement`]s.
//!
//! dstream's own statements (`CREATE SOURCE`, `CREATE MATERIALIZED VIEW ... EMIT ON
//! WINDOW CLOSE`, `SHOW`, `SUBSCRIBE`, `ADVANCE`, ...) are parsed here on top of
//! sqlparser's [`Parser`]; everything else is parsed by sqlparser as PostgreSQL and
//! handed to DataFusion unchanged as [`Statement::Sql`].

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use datafusion::sql::sqlparser::ast::{self, ColumnDef, Expr, Ident, Query};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::parser::Parser;
use datafusion::sql::sqlparser::tokenizer::Token;

use crate::duration::parse_duration;
use crate::error::{Error, Result};

/// One parsed statement.
#[derive(Clone, Debug, PartialEq)]
pub enum Statement {
    CreateSource(Box<CreateSource>),
    CreateMaterializedView(CreateMaterializedView),
    Show(ShowKind),
    Describe(String),
    Drop(DropObject),
    /// `EXPLAIN CREATE MATERIALIZED VIEW ...`: the stream plan and stage DAG.
    ExplainView(CreateMaterializedView),
    /// `SET batch_interval = '1s'`.
    SetBatchInterval(Duration),
    /// `ADVANCE [n]`: run n intervals on the manual clock.
    Advance(u64),
    /// `SUBSCRIBE [TO] view`: stream the view's changelog.
    Subscribe(String),
    /// A standard SQL statement (SELECT, CREATE TABLE, INSERT, SET, ...), for DataFusion.
    Sql(Box<ast::Statement>),
}

/// `CREATE SOURCE name (columns, [WATERMARK FOR col AS expr]) WITH (options)`.
#[derive(Clone, Debug, PartialEq)]
pub struct CreateSource {
    pub name: String,
    pub if_not_exists: bool,
    pub columns: Vec<ColumnDef>,
    pub watermark: Option<WatermarkClause>,
    pub options: BTreeMap<String, String>,
}

/// `WATERMARK FOR column AS expr`: rows whose `column` is behind the watermark are late.
#[derive(Clone, Debug, PartialEq)]
pub struct WatermarkClause {
    pub column: String,
    pub expr: Expr,
}

/// `CREATE MATERIALIZED VIEW name AS query [EMIT ON WINDOW CLOSE]`.
#[derive(Clone, Debug, PartialEq)]
pub struct CreateMaterializedView {
    pub name: String,
    pub if_not_exists: bool,
    pub query: Box<Query>,
    pub emit: EmitMode,
}

/// When a continuous query emits its results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmitMode {
    /// Every interval emits the changes it made (a changelog); the default.
    OnUpdate,
    /// A window's rows are emitted once, when the watermark closes the window.
    OnWindowClose,
}

impl fmt::Display for EmitMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EmitMode::OnUpdate => "on update",
            EmitMode::OnWindowClose => "on window close",
        })
    }
}

/// The kinds of catalog objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectKind {
    Source,
    Table,
    MaterializedView,
}

impl ObjectKind {
    /// How the kind is named in messages: "source", "table", "materialized view".
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Source => "source",
            ObjectKind::Table => "table",
            ObjectKind::MaterializedView => "materialized view",
        }
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `SHOW SOURCES | TABLES | MATERIALIZED VIEWS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShowKind {
    Sources,
    Tables,
    MaterializedViews,
}

/// `DROP SOURCE | TABLE | MATERIALIZED VIEW [IF EXISTS] name [CASCADE | RESTRICT]`.
#[derive(Clone, Debug, PartialEq)]
pub struct DropObject {
    pub kind: ObjectKind,
    pub name: String,
    pub if_exists: bool,
    /// Drop the views that read the object too (else dropping it is refused).
    pub cascade: bool,
}

/// The most intervals one `ADVANCE` runs.
pub const MAX_ADVANCE: u64 = 1_000_000;

/// Parses a script of `;`-separated statements.
pub fn parse_statements(sql: &str) -> Result<Vec<Statement>> {
    let dialect = PostgreSqlDialect {};
    let mut parser = Parser::new(&dialect).try_with_sql(sql)?;
    let mut statements = Vec::new();
    loop {
        while parser.consume_token(&Token::SemiColon) {}
        if parser.peek_token().token == Token::EOF {
            break;
        }
        statements.push(parse_one(&mut parser)?);
        let next = parser.peek_token();
        match next.token {
            Token::SemiColon | Token::EOF => {}
            other => {
                return Err(Error::Syntax(format!(
                    "expected end of statement, found: {other} at {}",
                    next.span.start
                )));
            }
        }
    }
    Ok(statements)
}

/// Parses exactly one statement (a trailing `;` is allowed).
pub fn parse_statement(sql: &str) -> Result<Statement> {
    let mut statements = parse_statements(sql)?;
    match statements.len() {
        1 => Ok(statements.remove(0)),
        0 => Err(Error::Syntax("empty statement".into())),
        n => Err(Error::Syntax(format!("expected one statement, found {n}"))),
    }
}

fn parse_one(p: &mut Parser) -> Result<Statement> {
    if peek_words(p, &["CREATE", "SOURCE"]) {
        advance(p, 2);
        return Ok(Statement::CreateSource(Box::new(parse_create_source(p)?)));
    }
    if peek_words(p, &["CREATE", "MATERIALIZED", "VIEW"]) {
        advance(p, 3);
        return Ok(Statement::CreateMaterializedView(parse_create_view(p)?));
    }
    if peek_words(p, &["EXPLAIN", "CREATE", "MATERIALIZED", "VIEW"]) {
        advance(p, 4);
        return Ok(Statement::ExplainView(parse_create_view(p)?));
    }
    if peek_words(p, &["SHOW", "SOURCES"]) {
        advance(p, 2);
        return Ok(Statement::Show(ShowKind::Sources));
    }
    if peek_words(p, &["SHOW", "TABLES"]) {
        advance(p, 2);
        return Ok(Statement::Show(ShowKind::Tables));
    }
    if peek_words(p, &["SHOW", "MATERIALIZED", "VIEWS"]) {
        advance(p, 3);
        return Ok(Statement::Show(ShowKind::MaterializedViews));
    }
    if peek_words(p, &["DESCRIBE"]) || peek_words(p, &["DESC"]) {
        advance(p, 1);
        return Ok(Statement::Describe(parse_name(p)?));
    }
    if peek_words(p, &["DROP", "SOURCE"]) {
        advance(p, 2);
        return parse_drop(p, ObjectKind::Source);
    }
    if peek_words(p, &["DROP", "TABLE"]) {
        advance(p, 2);
        return parse_drop(p, ObjectKind::Table);
    }
    if peek_words(p, &["DROP", "MATERIALIZED", "VIEW"]) {
        advance(p, 3);
        return parse_drop(p, ObjectKind::MaterializedView);
    }
    if peek_words(p, &["SET", "BATCH_INTERVAL"]) {
        advance(p, 2);
        if !p.consume_token(&Token::Eq) {
            p.expect_keyword(Keyword::TO)?;
        }
        let value = parse_option_value(p)?;
        return Ok(Statement::SetBatchInterval(parse_duration(&value)?));
    }
    if peek_words(p, &["ADVANCE"]) {
        advance(p, 1);
        let n = match p.peek_token().token {
            Token::Number(_, _) => p.parse_literal_uint()?,
            _ => 1,
        };
        if n == 0 || n > MAX_ADVANCE {
            return Err(Error::Invalid(format!(
                "ADVANCE takes between 1 and {MAX_ADVANCE} intervals"
            )));
        }
        return Ok(Statement::Advance(n));
    }
    if peek_words(p, &["SUBSCRIBE"]) {
        advance(p, 1);
        if peek_words(p, &["TO"]) {
            advance(p, 1);
        }
        return Ok(Statement::Subscribe(parse_name(p)?));
    }
    Ok(Statement::Sql(Box::new(p.parse_statement()?)))
}

fn parse_create_source(p: &mut Parser) -> Result<CreateSource> {
    let if_not_exists = p.parse_keywords(&[Keyword::IF, Keyword::NOT, Keyword::EXISTS]);
    let name = parse_name(p)?;
    p.expect_token(&Token::LParen)?;
    let mut columns = Vec::new();
    let mut watermark = None;
    loop {
        if peek_words(p, &["WATERMARK", "FOR"]) {
            advance(p, 2);
            if watermark.is_some() {
                return Err(Error::Syntax("only one WATERMARK clause is allowed".into()));
            }
            let column = normalize_ident(&p.parse_identifier()?);
            p.expect_keyword(Keyword::AS)?;
            let expr = p.parse_expr()?;
            watermark = Some(WatermarkClause { column, expr });
        } else {
            columns.push(p.parse_column_def()?);
        }
        if p.consume_token(&Token::Comma) {
            continue;
        }
        p.expect_token(&Token::RParen)?;
        break;
    }
    let options = parse_with_options(p)?;
    Ok(CreateSource {
        name,
        if_not_exists,
        columns,
        watermark,
        options,
    })
}

fn parse_create_view(p: &mut Parser) -> Result<CreateMaterializedView> {
    let if_not_exists = p.parse_keywords(&[Keyword::IF, Keyword::NOT, Keyword::EXISTS]);
    let name = parse_name(p)?;
    p.expect_keyword(Keyword::AS)?;
    let query = p.parse_query()?;
    let emit = if peek_words(p, &["EMIT", "ON", "WINDOW", "CLOSE"]) {
        advance(p, 4);
        EmitMode::OnWindowClose
    } else if peek_words(p, &["EMIT", "ON", "UPDATE"]) {
        advance(p, 3);
        EmitMode::OnUpdate
    } else {
        EmitMode::OnUpdate
    };
    Ok(CreateMaterializedView {
        name,
        if_not_exists,
        query,
        emit,
    })
}

fn parse_drop(p: &mut Parser, kind: ObjectKind) -> Result<Statement> {
    let if_exists = p.parse_keywords(&[Keyword::IF, Keyword::EXISTS]);
    let name = parse_name(p)?;
    let cascade = p.parse_keyword(Keyword::CASCADE);
    if !cascade {
        let _ = p.parse_keyword(Keyword::RESTRICT);
    }
    Ok(Statement::Drop(DropObject {
        kind,
        name,
        if_exists,
        cascade,
    }))
}

/// `WITH (key = value, ...)`; keys are case-insensitive, values are strings, numbers or
/// bare words.
pub(crate) fn parse_with_options(p: &mut Parser) -> Result<BTreeMap<String, String>> {
    let mut options = BTreeMap::new();
    if !p.parse_keyword(Keyword::WITH) {
        return Ok(options);
    }
    p.expect_token(&Token::LParen)?;
    if p.consume_token(&Token::RParen) {
        return Ok(options);
    }
    loop {
        let mut key = p.parse_identifier()?.value.to_ascii_lowercase();
        while p.consume_token(&Token::Period) {
            key.push('.');
            key.push_str(&p.parse_identifier()?.value.to_ascii_lowercase());
        }
        p.expect_token(&Token::Eq)?;
        let value = parse_option_value(p)?;
        if options.insert(key.clone(), value).is_some() {
            return Err(Error::Syntax(format!("option '{key}' is given twice")));
        }
        if p.consume_token(&Token::Comma) {
            continue;
        }
        p.expect_token(&Token::RParen)?;
        return Ok(options);
    }
}

fn parse_option_value(p: &mut Parser) -> Result<String> {
    let token = p.next_token();
    match token.token {
        Token::SingleQuotedString(s) => Ok(s),
        Token::Number(n, _) => Ok(n),
        Token::Word(w) => Ok(w.value),
        Token::Minus => match p.next_token().token {
            Token::Number(n, _) => Ok(format!("-{n}")),
            other => Err(Error::Syntax(format!("expected a number, found: {other}"))),
        },
        other => Err(Error::Syntax(format!(
            "expected an option value, found: {other} at {}",
            token.span.start
        ))),
    }
}

/// An object name as stored in the catalog: unquoted identifiers are lower-cased,
/// quoted ones kept as written (PostgreSQL rules).
fn parse_name(p: &mut Parser) -> Result<String> {
    let name = p.parse_object_name(false)?;
    let [part] = name.0.as_slice() else {
        return Err(Error::Unsupported(format!(
            "qualified names such as {name} are not supported; dstream has one schema"
        )));
    };
    match part {
        ast::ObjectNamePart::Identifier(ident) => Ok(normalize_ident(ident)),
        other => Err(Error::Syntax(format!("invalid name {other}"))),
    }
}

/// Lower-cases an unquoted identifier, as PostgreSQL does.
pub fn normalize_ident(ident: &Ident) -> String {
    match ident.quote_style {
        Some(_) => ident.value.clone(),
        None => ident.value.to_ascii_lowercase(),
    }
}

fn peek_words(p: &Parser, words: &[&str]) -> bool {
    let tokens = p.peek_tokens::<4>();
    words
        .iter()
        .zip(tokens.iter())
        .all(|(word, token)| match token {
            Token::Word(w) => w.quote_style.is_none() && w.value.eq_ignore_ascii_case(word),
            _ => false,
        })
}

fn advance(p: &mut Parser, n: usize) {
    for _ in 0..n {
        p.next_token();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_create_source_with_watermark_and_options() -> Result<()> {
        let stmt = parse_statement(
            "CREATE SOURCE bids (auction BIGINT, price BIGINT, date_time TIMESTAMP, \
             WATERMARK FOR date_time AS date_time - INTERVAL '4' SECOND) \
             WITH (connector = 'generator', rows_per_second = 100)",
        )?;
        let Statement::CreateSource(src) = stmt else {
            panic!("expected CREATE SOURCE, got {stmt:?}");
        };
        assert_eq!(src.name, "bids");
        assert_eq!(src.columns.len(), 3);
        let wm = src.watermark.as_ref().map(|w| w.column.as_str());
        assert_eq!(wm, Some("date_time"));
        assert_eq!(src.options["connector"], "generator");
        assert_eq!(src.options["rows_per_second"], "100");
        Ok(())
    }

    #[test]
    fn parses_view_with_emit_clause_and_a_script() -> Result<()> {
        let stmts = parse_statements(
            "CREATE MATERIALIZED VIEW v AS SELECT a, count(*) FROM s GROUP BY a \
             EMIT ON WINDOW CLOSE; ADVANCE 3; SHOW MATERIALIZED VIEWS; select 1",
        )?;
        assert_eq!(stmts.len(), 4);
        assert!(matches!(&stmts[0], Statement::CreateMaterializedView(v)
            if v.emit == EmitMode::OnWindowClose && v.name == "v"));
        assert_eq!(stmts[1], Statement::Advance(3));
        assert_eq!(stmts[2], Statement::Show(ShowKind::MaterializedViews));
        assert!(matches!(stmts[3], Statement::Sql(_)));
        Ok(())
    }

    #[test]
    fn reports_syntax_errors_with_position() {
        let err = parse_statement("CREATE SOURCE s (a BIGINT WITH (x = 1)").map(|_| ());
        assert!(matches!(err, Err(Error::Syntax(_))), "{err:?}");
        let err = parse_statement("SELEC 1").map(|_| ());
        assert!(matches!(err, Err(Error::Syntax(_))), "{err:?}");
    }
}

/// Quotes an identifier if PostgreSQL would not read it back unchanged.
pub fn quote_ident(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

impl fmt::Display for CreateSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CREATE SOURCE ")?;
        if self.if_not_exists {
            write!(f, "IF NOT EXISTS ")?;
        }
        write!(f, "{} (", quote_ident(&self.name))?;
        let mut parts: Vec<String> = self.columns.iter().map(|c| c.to_string()).collect();
        if let Some(wm) = &self.watermark {
            parts.push(format!(
                "WATERMARK FOR {} AS {}",
                quote_ident(&wm.column),
                wm.expr
            ));
        }
        write!(f, "{})", parts.join(", "))?;
        if !self.options.is_empty() {
            let options: Vec<String> = self
                .options
                .iter()
                .map(|(k, v)| format!("{k} = {}", quote_literal(v)))
                .collect();
            write!(f, " WITH ({})", options.join(", "))?;
        }
        Ok(())
    }
}

impl fmt::Display for CreateMaterializedView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CREATE MATERIALIZED VIEW ")?;
        if self.if_not_exists {
            write!(f, "IF NOT EXISTS ")?;
        }
        write!(f, "{} AS {}", quote_ident(&self.name), self.query)?;
        if self.emit == EmitMode::OnWindowClose {
            write!(f, " EMIT ON WINDOW CLOSE")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod display_tests {
    use super::*;

    #[test]
    fn create_statements_print_as_sql_that_parses_back() -> Result<()> {
        for sql in [
            "CREATE SOURCE \"Bids\" (a BIGINT, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) WITH (connector = 'generator', seed = '7')",
            "CREATE MATERIALIZED VIEW v AS SELECT a, count(*) AS n FROM s GROUP BY a EMIT ON WINDOW CLOSE",
        ] {
            let stmt = parse_statement(sql)?;
            let printed = match &stmt {
                Statement::CreateSource(s) => s.to_string(),
                Statement::CreateMaterializedView(v) => v.to_string(),
                other => panic!("unexpected {other:?}"),
            };
            assert_eq!(printed, sql);
            assert_eq!(parse_statement(&printed)?, stmt);
        }
        Ok(())
    }
}
