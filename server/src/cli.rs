//! `dstream sql`: a psql-like client. Line editing and history, statements that span
//! lines until `;`, aligned result tables, `\d`-style meta-commands, `\timing`, `-c`
//! and `-f`, and a live view of `SUBSCRIBE`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use comfy_table::{Table, presets};
use futures::{StreamExt, pin_mut};
use rustyline::DefaultEditor;
use rustyline::error::ReadlineError;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

/// Connection flags follow psql's (so `-h` is the host; help is `--help`).
#[derive(Args, Debug)]
#[command(disable_help_flag = true)]
pub struct SqlArgs {
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
    /// Server host.
    #[arg(short = 'h', long, env = "PGHOST", default_value = "127.0.0.1")]
    host: String,
    /// Server port.
    #[arg(short = 'p', long, env = "PGPORT", default_value_t = 6875)]
    port: u16,
    /// User name.
    #[arg(
        short = 'U',
        long = "username",
        env = "PGUSER",
        default_value = "dstream"
    )]
    user: String,
    /// Database name.
    #[arg(
        short = 'd',
        long = "dbname",
        env = "PGDATABASE",
        default_value = "dstream"
    )]
    dbname: String,
    /// Run a command (SQL or meta-command) and exit; may be given several times, like
    /// psql's, and runs after the files given with -f.
    #[arg(short = 'c', long = "command")]
    command: Vec<String>,
    /// Run the commands of a file and exit; may be given several times.
    #[arg(short = 'f', long = "file")]
    file: Vec<PathBuf>,
}

struct Shell {
    client: Client,
    timing: bool,
}

/// Runs the client; returns the process exit code.
pub async fn run(args: SqlArgs) -> anyhow::Result<i32> {
    let conninfo = format!(
        "host={} port={} user={} dbname={} application_name=dstream-sql",
        args.host, args.port, args.user, args.dbname
    );
    let (client, connection) = tokio_postgres::connect(&conninfo, NoTls)
        .await
        .with_context(|| format!("cannot connect to dstream at {}:{}", args.host, args.port))?;
    #[allow(clippy::disallowed_methods)] // aborted when the shell ends
    let connection = tokio::spawn(connection);
    let mut shell = Shell {
        client,
        timing: false,
    };
    let code = if !args.command.is_empty() || !args.file.is_empty() {
        let mut code = 0;
        for file in &args.file {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            code = shell.run_script(&text).await;
            if code != 0 {
                break;
            }
        }
        if code == 0 {
            for command in &args.command {
                code = shell.run_script(command).await;
                if code != 0 {
                    break;
                }
            }
        }
        code
    } else if std::io::stdin().is_terminal() {
        shell.interactive().await?
    } else {
        let text = std::io::read_to_string(std::io::stdin())?;
        shell.run_script(&text).await
    };
    drop(shell);
    connection.abort();
    Ok(code)
}

/// Splits input into complete statements and meta-commands; returns them and the
/// unfinished rest.
fn split_input(buffer: &str) -> (Vec<String>, String) {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut in_quote = false;
    let mut chars = buffer.chars().peekable();
    let mut at_line_start = true;
    while let Some(c) = chars.next() {
        if at_line_start && !in_quote && current.trim().is_empty() && c == '\\' {
            // A meta-command runs to the end of its line.
            let mut meta = String::from("\\");
            for m in chars.by_ref() {
                if m == '\n' {
                    break;
                }
                meta.push(m);
            }
            items.push(meta.trim().to_string());
            current.clear();
            at_line_start = true;
            continue;
        }
        at_line_start = c == '\n';
        if c == '-' && !in_quote && chars.peek() == Some(&'-') {
            // Comment to the end of the line.
            for m in chars.by_ref() {
                if m == '\n' {
                    break;
                }
            }
            current.push('\n');
            at_line_start = true;
            continue;
        }
        current.push(c);
        if c == '\'' {
            in_quote = !in_quote;
        } else if c == ';' && !in_quote {
            let stmt = current.trim().to_string();
            if stmt != ";" {
                items.push(stmt);
            }
            current.clear();
        }
    }
    (items, current)
}

/// A command tag for statements whose result has no rows, as psql prints it.
fn command_tag(statement: &str) -> String {
    let words: Vec<String> = statement
        .split_whitespace()
        .take(3)
        .map(|w| w.trim_end_matches(';').to_ascii_uppercase())
        .collect();
    match words.first().map(String::as_str) {
        Some("CREATE" | "DROP") if words.get(1).map(String::as_str) == Some("MATERIALIZED") => {
            words.join(" ")
        }
        Some("CREATE" | "DROP") => words.get(..2).unwrap_or(&words).join(" "),
        Some(first) => first.to_string(),
        None => String::new(),
    }
}

impl Shell {
    async fn interactive(&mut self) -> anyhow::Result<i32> {
        println!("dstream sql — type \\? for help, \\q to quit.");
        let mut editor = DefaultEditor::new()?;
        let history = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".dstream_history"));
        if let Some(h) = &history {
            let _ = editor.load_history(h);
        }
        let mut buffer = String::new();
        loop {
            let prompt = if buffer.trim().is_empty() {
                "dstream=> "
            } else {
                "dstream-> "
            };
            match editor.readline(prompt) {
                Ok(line) => {
                    if !line.trim().is_empty() {
                        let _ = editor.add_history_entry(line.as_str());
                    }
                    buffer.push_str(&line);
                    buffer.push('\n');
                    let (items, rest) = split_input(&buffer);
                    buffer = rest;
                    for item in items {
                        if item == "\\q" {
                            if let Some(h) = &history {
                                let _ = editor.save_history(h);
                            }
                            return Ok(0);
                        }
                        self.run_item(&item).await;
                    }
                }
                Err(ReadlineError::Interrupted) => buffer.clear(),
                Err(ReadlineError::Eof) => break,
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(h) = &history {
            let _ = editor.save_history(h);
        }
        Ok(0)
    }

    /// Runs every item of a script; stops at the first error (exit code 1).
    async fn run_script(&mut self, text: &str) -> i32 {
        let (mut items, rest) = split_input(text);
        if !rest.trim().is_empty() {
            items.push(rest.trim().to_string());
        }
        for item in items {
            if item == "\\q" {
                break;
            }
            if !self.run_item(&item).await {
                return 1;
            }
        }
        0
    }

    /// Runs one statement or meta-command; false on error.
    async fn run_item(&mut self, item: &str) -> bool {
        if let Some(meta) = item.strip_prefix('\\') {
            return self.meta(meta).await;
        }
        let started = Instant::now();
        let ok = if item
            .trim_start()
            .get(..9)
            .is_some_and(|w| w.eq_ignore_ascii_case("subscribe"))
        {
            self.subscribe(item).await
        } else {
            self.statement(item).await
        };
        if self.timing {
            println!("Time: {:.3} ms", started.elapsed().as_secs_f64() * 1000.0);
        }
        ok
    }

    async fn statement(&mut self, sql: &str) -> bool {
        match self.client.simple_query(sql).await {
            Ok(messages) => {
                print_messages(sql, messages);
                true
            }
            Err(e) => {
                print_error(&e);
                false
            }
        }
    }

    /// Prints a subscription's rows as they arrive, until Ctrl-C.
    async fn subscribe(&mut self, sql: &str) -> bool {
        let stream = match self.client.copy_out(sql.trim_end_matches(';')).await {
            Ok(s) => s,
            Err(e) => {
                print_error(&e);
                return false;
            }
        };
        pin_mut!(stream);
        println!("(streaming; press Ctrl-C to stop)");
        let mut cancelled = false;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c(), if !cancelled => {
                    // Ask the server to stop, then drain the stream so the connection
                    // is ready for the next statement.
                    cancelled = true;
                    if let Err(e) = self.client.cancel_token().cancel_query(NoTls).await {
                        print_error(&e);
                        return false;
                    }
                }
                chunk = stream.next() => match chunk {
                    Some(Ok(bytes)) => {
                        let mut out = std::io::stdout().lock();
                        let _ = out.write_all(&bytes);
                        let _ = out.flush();
                    }
                    Some(Err(_)) if cancelled => return true,
                    Some(Err(e)) => {
                        print_error(&e);
                        return false;
                    }
                    None => return true,
                }
            }
        }
    }

    async fn meta(&mut self, meta: &str) -> bool {
        let mut parts = meta.split_whitespace();
        let command = parts.next().unwrap_or("");
        let arg = parts.next();
        match (command, arg) {
            ("d", None) => {
                self.statement("SHOW SOURCES").await
                    && self.statement("SHOW TABLES").await
                    && self.statement("SHOW MATERIALIZED VIEWS").await
            }
            ("d" | "d+", Some(name)) => self.statement(&format!("DESCRIBE {name}")).await,
            ("ds", _) => self.statement("SHOW SOURCES").await,
            ("dt", _) => self.statement("SHOW TABLES").await,
            ("dm" | "dmv", _) => self.statement("SHOW MATERIALIZED VIEWS").await,
            ("timing", arg) => {
                self.timing = match arg {
                    Some("on") => true,
                    Some("off") => false,
                    _ => !self.timing,
                };
                println!("Timing is {}.", if self.timing { "on" } else { "off" });
                true
            }
            ("i", Some(file)) => match std::fs::read_to_string(file) {
                Ok(text) => Box::pin(self.run_script(&text)).await == 0,
                Err(e) => {
                    eprintln!("{file}: {e}");
                    false
                }
            },
            ("?", _) => {
                println!(
                    "  \\d            list sources, tables and materialized views\n  \\d NAME       describe NAME\n  \\ds \\dt \\dm   list sources / tables / materialized views\n  \\timing [on|off]  show how long each statement takes\n  \\i FILE       run the statements of FILE\n  \\q            quit\n  Statements end with ';'. SUBSCRIBE TO view streams until Ctrl-C."
                );
                true
            }
            _ => {
                eprintln!("invalid command \\{meta}; try \\? for help");
                false
            }
        }
    }
}

fn print_error(e: &tokio_postgres::Error) {
    match e.as_db_error() {
        Some(db) => eprintln!("ERROR:  {} (SQLSTATE {})", db.message(), db.code().code()),
        None => eprintln!("ERROR:  {e}"),
    }
}

fn print_messages(sql: &str, messages: Vec<SimpleQueryMessage>) {
    let mut table: Option<Table> = None;
    let mut rows = 0usize;
    for message in messages {
        match message {
            SimpleQueryMessage::RowDescription(columns) => {
                let mut t = Table::new();
                t.load_style(presets::ASCII_FULL_CONDENSED);
                t.set_header(columns.iter().map(|c| c.name().to_string()));
                table = Some(t);
                rows = 0;
            }
            SimpleQueryMessage::Row(row) => {
                if let Some(t) = table.as_mut() {
                    t.add_row((0..row.len()).map(|i| row.get(i).unwrap_or("NULL").to_string()));
                }
                rows = rows.saturating_add(1);
            }
            SimpleQueryMessage::CommandComplete(n) => match table.take() {
                Some(t) => {
                    println!("{t}");
                    println!("({rows} row{})\n", if rows == 1 { "" } else { "s" });
                }
                None => {
                    let tag = command_tag(sql);
                    if tag == "INSERT" {
                        println!("INSERT 0 {n}");
                    } else {
                        println!("{tag}");
                    }
                }
            },
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_splits_into_statements_and_meta_commands() {
        let (items, rest) = split_input("SELECT 'a;b';\n\\d foo\nSELECT 1 -- c;\n, 2;\nSELECT");
        assert_eq!(items, vec!["SELECT 'a;b';", "\\d foo", "SELECT 1 \n, 2;"]);
        assert_eq!(rest.trim(), "SELECT");
        assert_eq!(
            command_tag("create materialized view v as select 1"),
            "CREATE MATERIALIZED VIEW"
        );
        assert_eq!(command_tag("insert into t values (1)"), "INSERT");
    }
}
