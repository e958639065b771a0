//! `dstream sql`: a psql-like client. Line editing and history, statements that span
//! lines until `;`, results as aligned tables, CSV or JSON, `\d`-style
//! meta-commands, `\timing`, `\watch`, `-c` and `-f`, a progress line for statements
//! that run long, and a live table of `SUBSCRIBE`.
//!
//! - [`input`]: splitting what is typed into statements and meta-commands.
//! - [`output`]: the formats results print in.
//! - [`live`]: `\watch` and the live table of a subscription.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures::{StreamExt, pin_mut};
use rustyline::DefaultEditor;
use rustyline::error::ReadlineError;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

mod input;
mod live;
mod output;

use input::{split_input, subscribed_view};
use live::{CLEAR_SCREEN, LiveTable, WatchArgs};
use output::{Format, render, results};

/// How long a statement runs before the progress line shows.
const PROGRESS_AFTER: Duration = Duration::from_secs(1);

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
    /// How results print: aligned tables, CSV or JSON (also `\pset format`).
    #[arg(long, value_enum, default_value_t = Format::Aligned)]
    format: Format,
    /// Print results as CSV (`--format csv`).
    #[arg(long)]
    csv: bool,
}

struct Shell {
    client: Client,
    timing: bool,
    format: Format,
    /// The last statement run, for `\watch`.
    last: Option<String>,
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
        format: if args.csv { Format::Csv } else { args.format },
        last: None,
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

/// Writes `text` to stdout now.
fn print_now(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// The progress line of a statement running for `elapsed`, drawn over itself.
fn draw_progress(elapsed: Duration) {
    let mut err = std::io::stderr().lock();
    let _ = write!(
        err,
        "\r\x1b[Krunning… {:.1} s (Ctrl-C cancels)",
        elapsed.as_secs_f64()
    );
    let _ = err.flush();
}

fn clear_progress() {
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "\r\x1b[K");
    let _ = err.flush();
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
        let ok = match subscribed_view(item) {
            Some(view) => self.subscribe(item, &view).await,
            None => {
                self.last = Some(item.to_string());
                self.statement(item).await
            }
        };
        if self.timing {
            println!("Time: {:.3} ms", started.elapsed().as_secs_f64() * 1000.0);
        }
        ok
    }

    /// Runs `sql` and prints its results.
    async fn statement(&mut self, sql: &str) -> bool {
        let types = self.column_types(sql).await;
        match self.query(sql).await {
            Some(messages) => {
                for printed in results(sql, messages, &types) {
                    print_now(&render(&printed, self.format));
                }
                true
            }
            None => false,
        }
    }

    /// For JSON, which types numbers and booleans: the types of the columns `sql`
    /// returns, from the statement prepared (none if it does not prepare, as for
    /// several statements at once: their values are then text).
    async fn column_types(&mut self, sql: &str) -> Vec<tokio_postgres::types::Type> {
        if self.format != Format::Json {
            return Vec::new();
        }
        match self.client.prepare(sql.trim_end_matches(';')).await {
            Ok(statement) => statement
                .columns()
                .iter()
                .map(|c| c.type_().clone())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Runs `sql`: its messages, or `None` after printing its error. On a terminal, a
    /// statement that runs long shows a progress line, and Ctrl-C cancels it.
    async fn query(&mut self, sql: &str) -> Option<Vec<SimpleQueryMessage>> {
        let progress = std::io::stderr().is_terminal();
        let started = Instant::now();
        let running = self.client.simple_query(sql);
        pin_mut!(running);
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let mut shown = false;
        let mut cancelled = false;
        let answer = loop {
            tokio::select! {
                answer = &mut running => break answer,
                _ = tick.tick() => {
                    if progress && started.elapsed() >= PROGRESS_AFTER {
                        draw_progress(started.elapsed());
                        shown = true;
                    }
                }
                _ = tokio::signal::ctrl_c(), if !cancelled => {
                    cancelled = true;
                    if let Err(e) = self.client.cancel_token().cancel_query(NoTls).await {
                        print_error(&e);
                    }
                }
            }
        };
        if shown {
            clear_progress();
        }
        match answer {
            Ok(messages) => Some(messages),
            Err(e) => {
                print_error(&e);
                None
            }
        }
    }

    /// `\watch`: runs the last statement again and again, every interval of the
    /// server (or `args.every`), redrawing its results, until Ctrl-C, an error, or
    /// `args.count` runs.
    async fn watch(&mut self, args: WatchArgs) -> bool {
        let Some(sql) = self.last.clone() else {
            eprintln!("\\watch cannot be used with an empty query");
            return false;
        };
        let every = match args.every {
            Some(every) => every,
            None => self.batch_interval().await,
        };
        let redraw = std::io::stdout().is_terminal();
        let types = self.column_types(&sql).await;
        let mut runs = 0u64;
        loop {
            let started = Instant::now();
            let Some(messages) = self.query(&sql).await else {
                return false;
            };
            let mut text = String::new();
            if redraw {
                text.push_str(CLEAR_SCREEN);
            }
            text.push_str(&format!(
                "{}  (every {:.1} s)  {}\n\n",
                chrono::Local::now().format("%a %b %e %H:%M:%S %Y"),
                every.as_secs_f64(),
                sql.trim_end_matches(';')
            ));
            for printed in results(&sql, messages, &types) {
                text.push_str(&render(&printed, self.format));
            }
            print_now(&text);
            runs = runs.saturating_add(1);
            if args.count.is_some_and(|count| runs >= count) {
                return true;
            }
            tokio::select! {
                _ = tokio::time::sleep(every.saturating_sub(started.elapsed())) => {}
                _ = tokio::signal::ctrl_c() => return true,
            }
        }
    }

    /// The server's `batch_interval` (1 s if it cannot be read).
    async fn batch_interval(&mut self) -> Duration {
        let text = match self.client.simple_query("SHOW batch_interval").await {
            Ok(messages) => messages.into_iter().find_map(|m| match m {
                SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
                _ => None,
            }),
            Err(_) => None,
        };
        text.and_then(|t| dstream_server::config::parse_duration(&t).ok())
            .unwrap_or(Duration::from_secs(1))
    }

    /// The columns of `view`, for the live table.
    async fn columns_of(&mut self, view: &str) -> Option<Vec<String>> {
        let messages = self
            .client
            .simple_query(&format!("DESCRIBE {view}"))
            .await
            .ok()?;
        Some(
            messages
                .into_iter()
                .filter_map(|m| match m {
                    SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
                    _ => None,
                })
                .collect(),
        )
    }

    /// Streams a subscription until Ctrl-C. On a terminal (aligned format) the view's
    /// rows are kept up to date and redrawn every interval; otherwise each change
    /// prints as a line (`_interval`, `op`, the view's columns, tab-separated).
    async fn subscribe(&mut self, sql: &str, view: &str) -> bool {
        let live = std::io::stdout().is_terminal() && self.format == Format::Aligned;
        let mut table = match live {
            true => self.columns_of(view).await.map(LiveTable::new),
            false => None,
        };
        let stream = match self.client.copy_out(sql.trim_end_matches(';')).await {
            Ok(s) => s,
            Err(e) => {
                print_error(&e);
                return false;
            }
        };
        pin_mut!(stream);
        if table.is_none() {
            println!("(streaming; press Ctrl-C to stop)");
        }
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
                    Some(Ok(bytes)) => match table.as_mut() {
                        Some(table) => {
                            table.apply(&String::from_utf8_lossy(&bytes));
                            print_now(&format!(
                                "{CLEAR_SCREEN}SUBSCRIBE TO {view} — as of {} ({} changes; Ctrl-C to stop)\n\n{}",
                                table.interval.as_deref().unwrap_or("the start"),
                                table.changes,
                                table.render()
                            ));
                        }
                        None => {
                            let mut out = std::io::stdout().lock();
                            let _ = out.write_all(&bytes);
                            let _ = out.flush();
                        }
                    },
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
        let args: Vec<&str> = parts.collect();
        let arg = args.first().copied();
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
            ("pset", Some("format")) => match args.get(1) {
                Some(name) => match Format::parse(name) {
                    Some(format) => {
                        self.format = format;
                        println!("Output format is {}.", format.name());
                        true
                    }
                    None => {
                        eprintln!("\\pset: allowed formats are aligned, csv, json");
                        false
                    }
                },
                None => {
                    println!("Output format is {}.", self.format.name());
                    true
                }
            },
            ("watch", _) => match WatchArgs::parse(&args) {
                Ok(watch) => self.watch(watch).await,
                Err(e) => {
                    eprintln!("{e}");
                    false
                }
            },
            ("i", Some(file)) => match std::fs::read_to_string(file) {
                Ok(text) => Box::pin(self.run_script(&text)).await == 0,
                Err(e) => {
                    eprintln!("{file}: {e}");
                    false
                }
            },
            ("?", _) => {
                println!(
                    "  \\d            list sources, tables and materialized views\n  \\d NAME       describe NAME\n  \\ds \\dt \\dm   list sources / tables / materialized views\n  \\pset format aligned|csv|json   how results print\n  \\timing [on|off]  show how long each statement takes\n  \\watch [SEC] [c=N]  run the last statement again every SEC seconds (default: every interval)\n  \\i FILE       run the statements of FILE\n  \\q            quit\n  Statements end with ';'. SUBSCRIBE TO view shows the view live until Ctrl-C."
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
