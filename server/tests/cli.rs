//! `dstream sql` against a running server: `-c`, `-f`, meta-commands, `\timing`,
//! aligned tables, CSV and JSON, `\watch`, and exit codes.

use std::process::Command;

mod support;

fn cli(port: u16, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dstream"))
        .args(["sql", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("run dstream sql");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_runs_commands_scripts_and_meta_commands() {
    let server = support::start().await;
    let (port, dir) = (server.port, &server.dir);
    let script = dir.path().join("setup.sql");
    std::fs::write(
        &script,
        "-- a script with a statement over several lines\n\
         CREATE SOURCE clicks (url TEXT)\n  WITH (connector = 'generator', rows_per_second = 4, key_cardinality = 2);\n\
         CREATE MATERIALIZED VIEW per_url AS\n  SELECT url, count(*) AS n FROM clicks GROUP BY url;\n\
         ADVANCE 1;\n",
    )
    .expect("script");
    let (ok, out, err) = tokio::task::spawn_blocking({
        let script = script.display().to_string();
        move || cli(port, &["-f", &script])
    })
    .await
    .expect("cli");
    assert!(ok, "{err}");
    assert!(out.contains("CREATE SOURCE"), "{out}");
    assert!(out.contains("CREATE MATERIALIZED VIEW"), "{out}");

    let (ok, out, _) = tokio::task::spawn_blocking(move || {
        cli(
            port,
            &[
                "-c",
                "\\timing on\nSELECT url, n FROM per_url ORDER BY url;",
            ],
        )
    })
    .await
    .expect("cli");
    assert!(ok);
    assert!(out.contains("| url | n |"), "{out}");
    assert!(out.contains("| k0  |") && out.contains("| k1  |"), "{out}");
    assert!(out.contains("(2 rows)"), "{out}");
    assert!(out.contains("Time: "), "{out}");

    let (ok, out, _) = tokio::task::spawn_blocking(move || cli(port, &["-c", "\\d per_url"]))
        .await
        .expect("cli");
    assert!(ok);
    assert!(out.contains("| url         | TEXT"), "{out}");

    let (ok, out, _) = tokio::task::spawn_blocking(move || cli(port, &["-c", "\\d"]))
        .await
        .expect("cli");
    assert!(ok);
    assert!(out.contains("clicks") && out.contains("per_url"), "{out}");

    let (ok, _, err) =
        tokio::task::spawn_blocking(move || cli(port, &["-c", "SELECT * FROM nowhere"]))
            .await
            .expect("cli");
    assert!(!ok, "a failing statement gives exit code 1");
    assert!(
        err.contains("relation \"nowhere\" does not exist") && err.contains("42P01"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_print_as_csv_and_json_and_watch_runs_again() {
    let server = support::start().await;
    let port = server.port;
    let setup = "CREATE TABLE t (id BIGINT, name TEXT, ok BOOLEAN);\n\
                 INSERT INTO t VALUES (1, 'a, \"b\"', true), (2, NULL, NULL);";
    let (ok, _, err) = tokio::task::spawn_blocking(move || cli(port, &["-c", setup]))
        .await
        .expect("cli");
    assert!(ok, "{err}");

    let query = "SELECT id, name, ok FROM t ORDER BY id;";
    let (ok, out, err) =
        tokio::task::spawn_blocking(move || cli(port, &["--format", "csv", "-c", query]))
            .await
            .expect("cli");
    assert!(ok, "{err}");
    assert_eq!(out, "id,name,ok\n1,\"a, \"\"b\"\"\",t\n2,,\n");
    let (ok, out, err) =
        tokio::task::spawn_blocking(move || cli(port, &["--format", "json", "-c", query]))
            .await
            .expect("cli");
    assert!(ok, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(
        rows,
        serde_json::json!([
            {"id": 1, "name": "a, \"b\"", "ok": true},
            {"id": 2, "name": null, "ok": null}
        ])
    );
    // \pset format switches within a session.
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        cli(
            port,
            &["-c", "\\pset format csv\nSELECT count(*) AS n FROM t;"],
        )
    })
    .await
    .expect("cli");
    assert!(ok, "{err}");
    assert!(out.ends_with("n\n2\n"), "{out}");

    // \watch runs the last statement again: three times, 0.2 s apart.
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        cli(
            port,
            &["-c", "SELECT count(*) AS n FROM t;\n\\watch 0.2 c=3"],
        )
    })
    .await
    .expect("cli");
    assert!(ok, "{err}");
    assert_eq!(out.matches("(every 0.2 s)").count(), 3, "{out}");
    assert_eq!(out.matches("| 2 |").count(), 4, "{out}");
    let (ok, _, err) = tokio::task::spawn_blocking(move || cli(port, &["-c", "\\watch 1"]))
        .await
        .expect("cli");
    assert!(
        !ok && err.contains("\\watch cannot be used with an empty query"),
        "{err}"
    );
}
