//! `dstream sql` at a real terminal (tmux): the prompt, a statement typed over two
//! lines, history recalled with the up arrow, and \q; the live table of a
//! `SUBSCRIBE` redrawn as intervals commit; the progress line of a long statement,
//! and Ctrl-C cancelling it.

use std::process::Command;
use std::time::{Duration, Instant};

mod support;

/// Types `text` literally (tmux would take a trailing `;` as its own separator), then
/// presses Enter.
fn type_line(session: &str, text: &str) {
    let text = match text.strip_suffix(';') {
        Some(head) => format!("{head}\\;"),
        None => text.to_string(),
    };
    tmux(&["send-keys", "-t", session, "-l", &text]);
    tmux(&["send-keys", "-t", session, "Enter"]);
}

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux")
        .args(args)
        .output()
        .expect("tmux must be installed");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Kills a tmux session when dropped, so a failing test leaves none behind.
struct KillOnDrop(String);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .output();
    }
}

/// Starts `command` in a detached 120×40 tmux session named `session` and waits for
/// its prompt; the session is killed when the returned guard drops.
fn open_session(session: &str, command: &str) -> KillOnDrop {
    tmux(&[
        "new-session",
        "-d",
        "-s",
        session,
        "-x",
        "120",
        "-y",
        "40",
        command,
    ]);
    let guard = KillOnDrop(session.to_string());
    wait_for(session, "dstream=>", 1);
    guard
}

/// Polls on the blocking thread that drives tmux; never on an async worker.
#[allow(clippy::disallowed_methods)]
fn pause() {
    std::thread::sleep(Duration::from_millis(100));
}

/// Waits (bounded) until the pane shows `needle` `count` times.
fn wait_for(session: &str, needle: &str, count: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let screen = tmux(&["capture-pane", "-p", "-t", session]);
        if screen.matches(needle).count() >= count {
            return screen;
        }
        assert!(
            Instant::now() < deadline,
            "waiting for {needle:?}:\n{screen}"
        );
        pause();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_session_with_multi_line_statements_and_history() {
    let server = support::start().await;
    let dir = &server.dir;

    let session = format!("dstream-cli-{}", std::process::id());
    let command = format!(
        "HOME={} {} sql -p {}",
        dir.path().display(),
        env!("CARGO_BIN_EXE_dstream"),
        server.port
    );
    let session_for_blocking = session.clone();
    tokio::task::spawn_blocking(move || {
        let session = session_for_blocking.as_str();
        // Ends the tmux session however the test ends.
        let _cleanup = open_session(session, &command);
        // A statement over two lines: the continuation prompt, then the result.
        type_line(session, "SELECT 40 + 2");
        wait_for(session, "dstream->", 1);
        type_line(session, "AS answer;");
        let screen = wait_for(session, "(1 row)", 1);
        assert!(screen.contains("| answer |"), "{screen}");
        assert!(screen.contains("| 42     |"), "{screen}");
        // History: start the statement again, then go up past the line just typed to
        // the earlier `AS answer;`, which completes it.
        type_line(session, "SELECT 40 + 2");
        wait_for(session, "dstream->", 2);
        tmux(&["send-keys", "-t", session, "Up", "Up", "Enter"]);
        wait_for(session, "(1 row)", 2);
        type_line(session, "\\q");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Command::new("tmux")
            .args(["has-session", "-t", session])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
        {
            assert!(Instant::now() < deadline, "\\q did not end the session");
            pause();
        }
    })
    .await
    .expect("tmux session");
    let history = std::fs::read_to_string(dir.path().join(".dstream_history")).expect("history");
    assert!(history.contains("SELECT 40 + 2"), "{history}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_draws_a_live_table_and_a_long_statement_shows_progress() {
    let server = support::start().await;
    let (client, connection) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={} user=dstream", server.port),
        tokio_postgres::NoTls,
    )
    .await
    .expect("connect");
    #[allow(clippy::disallowed_methods)] // ends with the connection, when the test ends
    tokio::spawn(connection);
    client
        .batch_execute(
            "CREATE SOURCE clicks (url TEXT) \
               WITH (connector = 'generator', rows_per_second = 4, key_cardinality = 2);
             CREATE MATERIALIZED VIEW per_url AS SELECT url, count(*) AS n FROM clicks GROUP BY url;
             ADVANCE 1",
        )
        .await
        .expect("set up");
    // The view's rows as the live table draws them (counts stay under 10 here).
    let table_lines = async || -> Vec<String> {
        client
            .query("SELECT url, n FROM per_url ORDER BY url", &[])
            .await
            .expect("the view")
            .iter()
            .map(|row| {
                format!(
                    "| {:<3} | {} |",
                    row.get::<_, String>(0),
                    row.get::<_, i64>(1)
                )
            })
            .collect()
    };
    let before = table_lines().await;

    let session = format!("dstream-live-{}", std::process::id());
    let command = format!(
        "HOME={} {} sql -p {}",
        server.dir.path().display(),
        env!("CARGO_BIN_EXE_dstream"),
        server.port
    );
    let (typed_tx, typed_rx) = std::sync::mpsc::channel::<()>();
    let (advanced_tx, advanced_rx) = std::sync::mpsc::channel::<Vec<String>>();
    let driving = tokio::task::spawn_blocking({
        let session = session.clone();
        move || {
            let session = session.as_str();
            let _cleanup = open_session(session, &command);
            // The live table: the view's rows now, then as the next interval leaves them.
            type_line(session, "SUBSCRIBE TO per_url;");
            let screen = wait_for(session, "SUBSCRIBE TO per_url", 1);
            let screen = if screen.contains("(2 rows)") {
                screen
            } else {
                wait_for(session, "(2 rows)", 1)
            };
            assert!(screen.contains("| url | n |"), "{screen}");
            for line in &before {
                assert!(screen.contains(line.as_str()), "{line}: {screen}");
            }
            typed_tx.send(()).expect("the test goes on");
            let after = advanced_rx.recv().expect("advanced");
            let screen = wait_for(session, "as of 2026-01-01 00:00:01", 1);
            for line in &after {
                assert!(screen.contains(line.as_str()), "{line}: {screen}");
            }
            // (The live table cleared the screen: the prompt is the one after it.)
            tmux(&["send-keys", "-t", session, "C-c"]);
            wait_for(session, "dstream=>", 1);
            // A statement that would run for hours: the progress line, then Ctrl-C
            // cancels it and the prompt is back.
            type_line(
                session,
                "SELECT count(*) FROM generate_series(1, 100000) a, generate_series(1, 100000) b;",
            );
            wait_for(session, "running…", 1);
            tmux(&["send-keys", "-t", session, "C-c"]);
            let screen = wait_for(session, "dstream=>", 2);
            assert!(
                screen.contains("ERROR:") && screen.contains("57014"),
                "{screen}"
            );
            type_line(session, "\\q");
        }
    });
    // Once the table is drawn, the next interval changes it.
    tokio::task::spawn_blocking(move || typed_rx.recv())
        .await
        .expect("join")
        .expect("the table is drawn");
    client.batch_execute("ADVANCE 1").await.expect("advance");
    advanced_tx
        .send(table_lines().await)
        .expect("the terminal waits");
    driving.await.expect("tmux session");
}
