//! A restarted server keeps its definitions, settings and table rows, and its views
//! run again.

use dstream_sql_tests::{TestServer, simple_rows};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = TestServer::start_in(&data).await.expect("server");
    let client = server.client().await.expect("connect");
    client
        .batch_execute(
            "SET batch_interval = '500ms';
             CREATE TABLE names (k TEXT, label TEXT);
             INSERT INTO names VALUES ('k0', 'zero'), ('k1', 'one');
             CREATE SOURCE s (k TEXT, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)
               WITH (connector = 'generator', rows_per_second = 10, key_cardinality = 2);
             CREATE MATERIALIZED VIEW labelled AS
               SELECT n.label, count(*) AS c FROM s JOIN names n ON s.k = n.k GROUP BY n.label;
             CREATE MATERIALIZED VIEW \"Windows\" AS
               SELECT window_start, count(*) AS c FROM TUMBLE(s, _interval, INTERVAL '1' SECOND)
               GROUP BY window_start EMIT ON WINDOW CLOSE;",
        )
        .await
        .expect("setup");
    let before = (
        simple_rows(&client, "SHOW SOURCES")
            .await
            .expect("show")
            .len(),
        simple_rows(&client, "SHOW MATERIALIZED VIEWS")
            .await
            .expect("show"),
    );
    drop(client);
    server.stop().await;

    let server = TestServer::start_in(&data).await.expect("restart");
    let client = server.client().await.expect("connect");
    assert_eq!(
        simple_rows(&client, "SHOW batch_interval")
            .await
            .expect("show"),
        vec![vec!["500ms"]]
    );
    assert_eq!(
        simple_rows(&client, "SELECT * FROM names ORDER BY k")
            .await
            .expect("rows"),
        vec![vec!["k0", "zero"], vec!["k1", "one"]]
    );
    assert_eq!(
        simple_rows(&client, "SHOW SOURCES")
            .await
            .expect("show")
            .len(),
        before.0
    );
    let views: Vec<String> = simple_rows(&client, "SHOW MATERIALIZED VIEWS")
        .await
        .expect("show")
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    let names_before: Vec<String> = before.1.iter().map(|r| r[0].clone()).collect();
    assert_eq!(views, names_before);
    client.batch_execute("ADVANCE 4").await.expect("advance");
    // 4 intervals of 500ms at 10 rows/s: 20 rows over two keys.
    let counts = simple_rows(&client, "SELECT sum(c) FROM labelled")
        .await
        .expect("rows");
    assert_eq!(counts, vec![vec!["20"]]);
    let windows = simple_rows(&client, "SELECT c FROM \"Windows\" ORDER BY window_start")
        .await
        .expect("rows");
    assert_eq!(windows, vec![vec!["10"], vec!["10"]]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_definition_that_cannot_be_restored_does_not_stop_the_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let files = dir.path().join("files");
    std::fs::create_dir(&files).expect("mkdir");
    std::fs::write(files.join("a.csv"), "x\n1\n").expect("file");
    let server = TestServer::start_in(&data).await.expect("server");
    let client = server.client().await.expect("connect");
    client
        .batch_execute(&format!(
            "CREATE TABLE lost (x BIGINT) WITH (connector = 'file', path = '{}', format = 'csv');
             CREATE TABLE kept (x BIGINT);",
            files.display()
        ))
        .await
        .expect("setup");
    drop(client);
    server.stop().await;
    std::fs::remove_dir_all(&files).expect("remove the table's directory");

    // The server starts without the broken table and keeps its definition.
    let server = TestServer::start_in(&data).await.expect("restart");
    let client = server.client().await.expect("connect");
    let tables = simple_rows(&client, "SHOW TABLES").await.expect("show");
    assert_eq!(tables, vec![vec!["kept", "memory"]]);
    drop(client);
    server.stop().await;
    let catalog = std::fs::read_to_string(data.join("catalog.json")).expect("catalog");
    assert!(
        catalog.contains("\"lost\""),
        "the definition is kept: {catalog}"
    );

    // It can be dropped by name.
    let server = TestServer::start_in(&data).await.expect("restart");
    let client = server.client().await.expect("connect");
    client.batch_execute("DROP TABLE lost").await.expect("drop");
    let catalog = std::fs::read_to_string(data.join("catalog.json")).expect("catalog");
    assert!(!catalog.contains("\"lost\""), "{catalog}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_catalog_write_changes_nothing() {
    let server = TestServer::start().await.expect("server");
    let client = server.client().await.expect("connect");
    client
        .batch_execute("CREATE TABLE before (a BIGINT)")
        .await
        .expect("create");
    // Make the next catalog write fail: a directory where the file must go.
    let catalog = server.data_dir.join("catalog.json");
    std::fs::remove_file(&catalog).expect("remove catalog file");
    std::fs::create_dir_all(catalog.join("blocker")).expect("block the catalog path");

    let err = client
        .batch_execute("CREATE TABLE after (a BIGINT)")
        .await
        .expect_err("the write fails");
    let err = dstream_sql_tests::PgError::from(err).to_string();
    assert!(err.contains("SQLSTATE 58030"), "an I/O error: {err}");
    let err = client
        .batch_execute("DROP TABLE before")
        .await
        .expect_err("the write fails");
    assert!(
        dstream_sql_tests::PgError::from(err)
            .to_string()
            .contains("58030")
    );
    let tables = simple_rows(&client, "SHOW TABLES").await.expect("show");
    assert_eq!(tables, vec![vec!["before", "memory"]], "nothing changed");

    std::fs::remove_dir_all(&catalog).expect("unblock");
    client
        .batch_execute("CREATE TABLE after (a BIGINT)")
        .await
        .expect("create");
    let tables = simple_rows(&client, "SHOW TABLES").await.expect("show");
    assert_eq!(tables.len(), 2);
    server.stop().await;
}
