// A JDBC client against dstream: DDL, ADVANCE, a prepared query with a parameter,
// typed getters, and an error with its SQLSTATE. Run by tests/jdbc_smoke.rs as
// `java -cp postgresql.jar JdbcSmoke.java PORT`; prints what it saw.
import java.sql.*;

public class JdbcSmoke {
    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://127.0.0.1:" + args[0] + "/dstream?user=jdbc&sslmode=disable";
        try (Connection conn = DriverManager.getConnection(url)) {
            try (Statement st = conn.createStatement()) {
                st.execute("CREATE SOURCE clicks (user_id BIGINT, url TEXT, ts TIMESTAMP) "
                        + "WITH (connector = 'generator', rows_per_second = 10, key_cardinality = 2, seed = 4)");
                st.execute("CREATE MATERIALIZED VIEW per_url AS "
                        + "SELECT url, count(*) AS n, max(ts) AS latest FROM clicks GROUP BY url");
                st.execute("ADVANCE 2");
            }
            long total = 0;
            try (PreparedStatement ps = conn.prepareStatement(
                    "SELECT url, n, latest FROM per_url WHERE n >= ? ORDER BY url")) {
                ps.setLong(1, 1);
                try (ResultSet rs = ps.executeQuery()) {
                    while (rs.next()) {
                        System.out.println("row " + rs.getString("url") + " " + rs.getLong("n")
                                + " " + (rs.getTimestamp("latest") != null));
                        total += rs.getLong("n");
                    }
                }
            }
            System.out.println("total " + total);
            try (Statement st = conn.createStatement()) {
                st.executeQuery("SELECT * FROM nowhere");
                System.out.println("no error");
            } catch (SQLException e) {
                System.out.println("sqlstate " + e.getSQLState());
            }
        }
    }
}
