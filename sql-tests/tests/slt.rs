//! Runs every `sql-tests/slt/*.slt` file against a fresh dstream server over pgwire.
//! `DSTREAM_SLT_COMPLETE=1` rewrites the files' expected output instead.

use std::path::{Path, PathBuf};

use dstream_sql_tests::{PgDb, TestServer};
use sqllogictest::{Runner, default_column_validator, default_normalizer, default_validator};

fn slt_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("slt");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "slt"))
        .collect();
    files.sort();
    if let Ok(filter) = std::env::var("DSTREAM_SLT") {
        files.retain(|f| f.to_string_lossy().contains(&filter));
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqllogictest_files() {
    let complete = std::env::var("DSTREAM_SLT_COMPLETE").is_ok_and(|v| v == "1");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut failures = Vec::new();
    let files = slt_files();
    assert!(!files.is_empty(), "no .slt files found");
    for file in &files {
        let server = TestServer::start().await.expect("start server");
        let addr = server.addr;
        let mut runner = Runner::new(move || async move { PgDb::connect(addr).await });
        runner.set_var("FIXTURES".into(), fixtures.display().to_string());
        runner.set_var("DATA_DIR".into(), server.data_dir.display().to_string());
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let result = if complete {
            runner
                .update_test_file(
                    file,
                    " ",
                    default_validator,
                    default_normalizer,
                    default_column_validator,
                )
                .await
                .map_err(|e| e.to_string())
        } else {
            runner
                .run_file_async(file)
                .await
                .map_err(|e| e.display(true).to_string())
        };
        match result {
            Ok(()) => println!("ok   {name}"),
            Err(e) => {
                println!("FAIL {name}\n{e}");
                failures.push(name);
            }
        }
        server.stop().await;
    }
    assert!(failures.is_empty(), "failing .slt files: {failures:?}");
}
