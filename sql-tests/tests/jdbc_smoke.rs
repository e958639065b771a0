//! The PostgreSQL JDBC driver against dstream (Debian's libpostgresql-jdbc-java, which
//! scripts/test.sh installs), through a single-file Java program.

use std::path::Path;

use dstream_sql_tests::TestServer;
use tokio::process::Command;

const DRIVER: &str = "/usr/share/java/postgresql.jar";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jdbc_driver_runs_statements_and_prepared_queries() {
    assert!(
        Path::new(DRIVER).exists(),
        "{DRIVER} is missing: install libpostgresql-jdbc-java (scripts/test.sh does)"
    );
    let server = TestServer::start().await.expect("server");
    let program = Path::new(env!("CARGO_MANIFEST_DIR")).join("jdbc/JdbcSmoke.java");
    let output = Command::new("java")
        .args(["-cp", DRIVER])
        .arg(&program)
        .arg(server.addr.port().to_string())
        .output()
        .await
        .expect("java must be installed");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "java failed:\n{stdout}\n{stderr}");
    let rows: Vec<&str> = stdout.lines().filter(|l| l.starts_with("row ")).collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    assert!(
        rows[0].starts_with("row k0 ") && rows[0].ends_with(" true"),
        "{stdout}"
    );
    assert!(stdout.contains("total 20"), "{stdout}");
    assert!(stdout.contains("sqlstate 42P01"), "{stdout}");
    server.stop().await;
}
