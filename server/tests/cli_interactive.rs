//! `dstream sql` at a real terminal (tmux): the prompt, a statement typed over two
//! lines, history recalled with the up arrow, and \q.

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
        tmux(&[
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            "120",
            "-y",
            "40",
            &command,
        ]);
        // Ends the tmux session however the test ends.
        let _cleanup = KillOnDrop(session.to_string());
        wait_for(session, "dstream=>", 1);
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
