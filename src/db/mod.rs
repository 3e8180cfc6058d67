//! Database access: the connection, migrations, the entities and the query functions. Nothing outside
//! this module builds SQL.

pub mod analytics;
pub mod buyer_keys;
pub mod disputes;
pub mod entities;
pub mod funds;
pub mod hosted_keys;
pub mod key_events;
pub mod ledger;
pub mod prices;
pub mod risk;
pub mod rollups;
pub mod sessions;
pub mod usage_records;
pub mod users;
pub mod webhooks;

#[cfg(test)]
pub(crate) mod testing;

use std::time::Duration;

use migration::MigratorTrait;
use sea_orm::sqlx::mysql::MySqlConnectOptions;
use sea_orm::sqlx::pool::PoolOptions;
use sea_orm::sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sea_orm::sqlx::{ConnectOptions as _, Connection as _};
use sea_orm::{DatabaseConnection, DbErr, RuntimeErr, SqlxMySqlConnector, SqlxSqliteConnector};

/// How long an SQLite writer waits for another writer's lock before failing with "database is locked".
/// The admin API and the usage writer write concurrently; their transactions are short, so waiting is
/// always better than failing.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(15);

/// Connects to `url` (`sqlite://path` or `mysql://...`) with a pool of at most `max_connections`.
///
/// For SQLite the parent directory is created and the file is created if missing (`mode=rwc` unless the
/// URL sets a mode); connections use WAL, so readers never block the writer, and wait for locks instead
/// of failing.
///
/// The sqlx pool is built here rather than by `sea_orm::Database::connect`, which cannot switch off
/// sqlx's idle timeout and maximum lifetime (see `pool_options`).
pub async fn connect(url: &str, max_connections: u32) -> Result<DatabaseConnection, DbErr> {
    let mut max_connections = max_connections.max(1);
    let Some(path) = sqlite_path(url) else {
        // Statement logs would flood the gateway's log at INFO; errors still surface as DbErr.
        let options = url.parse::<MySqlConnectOptions>().map_err(conn_err)?.disable_statement_logging();
        let pool = pool_options(max_connections).connect_with(options).await.map_err(conn_err)?;
        return Ok(SqlxMySqlConnector::from_sqlx_mysql_pool(pool));
    };
    if is_sqlite_memory(path) {
        // Every connection to `:memory:` is a separate, empty database.
        max_connections = 1;
    } else if let Some(parent) = std::path::Path::new(path).parent() {
        if !parent.as_os_str().is_empty() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| DbErr::Custom(format!("cannot create the directory {}: {e}", parent.display())))?;
        }
    }
    let options = with_default_sqlite_mode(url)
        .parse::<SqliteConnectOptions>()
        .map_err(conn_err)?
        .journal_mode(SqliteJournalMode::Wal)
        // NORMAL is durable in WAL mode except for the last transactions on power loss, and much faster
        // than FULL for the usage writer.
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(SQLITE_BUSY_TIMEOUT)
        .foreign_keys(true)
        .disable_statement_logging();
    if !is_sqlite_memory(path) {
        // Switching a new database to WAL needs it exclusively, and the pool opens its first connections at
        // once (the connect check and `min_connections`): one of them could fail with "database is locked"
        // without waiting for the busy timeout (seen once in CI). The mode is stored in the file: set it on
        // one connection first, and the pool's connections find it set.
        let first = options.connect().await.map_err(conn_err)?;
        first.close().await.map_err(conn_err)?;
    }
    let pool = pool_options(max_connections).connect_with(options).await.map_err(conn_err)?;
    Ok(SqlxSqliteConnector::from_sqlx_sqlite_pool(pool))
}

/// The pool without idle timeout and maximum lifetime, which sqlx sets by default (10 and 30 min).
///
/// Either one makes sqlx spawn a reaper task that starts with `for _ in 0..pool.num_idle()` and yields only
/// after the loop. The idle count is decremented by a thread that takes a connection which another thread
/// has pushed but not yet counted, so it can read as `usize::MAX` for a moment; a reaper that starts then
/// spins for good on a runtime worker without yielding (sqlx-core 0.8.6 pool/inner.rs; launchbadge/sqlx
/// #3645). In `serve` that burns a core; in a CLI command, whose runtime is dropped after the command has
/// printed its result, the shutdown waits for that worker forever and the process never exits. Seen in a
/// test as `token-exchange price list` taking longer than 60 s, reproduced by running CLI commands in
/// parallel (two hangs in 15,600 commands, both in this loop).
///
/// Without a reaper nothing is lost: SQLite connections do not go stale, and a MySQL connection the server
/// closed is found by the ping before every acquire (`test_before_acquire`, on by default) and replaced.
fn pool_options<DB: sea_orm::sqlx::Database>(max_connections: u32) -> PoolOptions<DB> {
    PoolOptions::new()
        .max_connections(max_connections)
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(30))
        .idle_timeout(None)
        .max_lifetime(None)
}

/// How sea-orm reports a failed connection.
fn conn_err(e: sea_orm::sqlx::Error) -> DbErr {
    DbErr::Conn(RuntimeErr::SqlxError(e))
}

/// An SQLite database that lives only as long as its one connection.
pub fn is_in_memory(url: &str) -> bool {
    sqlite_path(url).is_some_and(is_sqlite_memory)
}

/// Brings the schema up to date.
pub async fn migrate(db: &DatabaseConnection) -> Result<(), DbErr> {
    migration::Migrator::up(db, None).await
}

/// The file path of an SQLite URL, without its query; None for other databases.
fn sqlite_path(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("sqlite:")?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    Some(rest.split_once('?').map_or(rest, |(path, _)| path))
}

fn is_sqlite_memory(path: &str) -> bool {
    path.is_empty() || path == ":memory:"
}

fn with_default_sqlite_mode(url: &str) -> String {
    match url.split_once('?') {
        None => format!("{url}?mode=rwc"),
        Some((_, query)) if query.split('&').any(|p| p.starts_with("mode=")) => url.to_string(),
        Some((_, "")) => format!("{url}mode=rwc"),
        Some(_) => format!("{url}&mode=rwc"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_get_a_create_mode_unless_they_set_one() {
        assert_eq!(with_default_sqlite_mode("sqlite://a/b.db"), "sqlite://a/b.db?mode=rwc");
        assert_eq!(with_default_sqlite_mode("sqlite://a.db?cache=shared"), "sqlite://a.db?cache=shared&mode=rwc");
        assert_eq!(with_default_sqlite_mode("sqlite://a.db?mode=ro"), "sqlite://a.db?mode=ro");
        assert_eq!(with_default_sqlite_mode("sqlite://a.db?"), "sqlite://a.db?mode=rwc");
    }

    #[test]
    fn sqlite_paths_are_extracted() {
        assert_eq!(sqlite_path("sqlite://data/x.db?mode=rwc"), Some("data/x.db"));
        assert_eq!(sqlite_path("sqlite:///var/lib/x.db"), Some("/var/lib/x.db"));
        assert_eq!(sqlite_path("sqlite::memory:"), Some(":memory:"));
        assert_eq!(sqlite_path("mysql://root@localhost/x"), None);
    }

    #[tokio::test]
    async fn connect_creates_the_directory_and_uses_wal() {
        use sea_orm::{ConnectionTrait, Statement};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/deeper/tokex.db");
        let db = connect(&format!("sqlite://{}", path.display()), 4).await.unwrap();
        migrate(&db).await.unwrap();
        // Running the migrations twice is a no-op.
        migrate(&db).await.unwrap();
        assert!(path.exists());
        let row = db
            .query_one(Statement::from_string(db.get_database_backend(), "PRAGMA journal_mode"))
            .await
            .unwrap()
            .unwrap();
        let mode: String = row.try_get_by_index(0).unwrap();
        assert_eq!(mode, "wal");
    }

    /// No idle timeout or maximum lifetime, hence no sqlx reaper task that can spin forever (`pool_options`).
    #[tokio::test]
    async fn pools_have_no_reaper() {
        let dir = tempfile::tempdir().unwrap();
        let db = connect(&format!("sqlite://{}", dir.path().join("tokex.db").display()), 4).await.unwrap();
        let options = db.get_sqlite_connection_pool().options();
        assert_eq!((options.get_idle_timeout(), options.get_max_lifetime()), (None, None));
        assert_eq!((options.get_max_connections(), options.get_min_connections()), (4, 1));
        assert!(options.get_test_before_acquire());
        let test_db = testing::TestDb::mysql().await;
        let options = test_db.db.get_mysql_connection_pool().options();
        assert_eq!((options.get_idle_timeout(), options.get_max_lifetime()), (None, None));
        test_db.cleanup().await;
    }

    #[tokio::test]
    async fn migrations_run_on_mariadb() {
        let test_db = testing::TestDb::mysql().await;
        // TestDb already migrated; a second run must be a no-op.
        migrate(&test_db.db).await.unwrap();
        test_db.cleanup().await;
    }

    #[tokio::test]
    async fn migrations_can_be_rolled_back_and_reapplied() {
        for mut test_db in testing::TestDb::all().await {
            test_db.remigrate(None).await;
            test_db.cleanup().await;
        }
    }

    /// The admin API, the usage writer and the pool refresher share one SQLite file: concurrent writers
    /// must wait for each other, never fail with "database is locked".
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_sqlite_writers_wait_instead_of_failing() {
        use sea_orm::ActiveValue::Set;
        let t = testing::TestDb::sqlite().await;
        let key = hosted_keys::insert(&t.db, hosted_keys::tests::new_key(1, "uid-a")).await.unwrap();
        let mut tasks = Vec::new();
        for task in 0..8 {
            let db = t.db.clone();
            tasks.push(tokio::spawn(async move {
                for round in 0..15 {
                    let rows = (0..20)
                        .map(|i| usage_records::ActiveModel {
                            request_id: Set(format!("{task}-{round}-{i}")),
                            buyer_id: Set(1),
                            buyer_key_id: Set(1),
                            hosted_key_id: Set(Some(key.id)),
                            model: Set("m".into()),
                            endpoint: Set("chat.completions".into()),
                            prompt_tokens: Set(1),
                            completion_tokens: Set(1),
                            estimated: Set(false),
                            status_code: Set(200),
                            attempts: Set(1),
                            latency_ms: Set(1),
                            ttft_ms: Set(None),
                            request_bytes: Set(1),
                            response_bytes: Set(1),
                            client_disconnected: Set(false),
                            error_kind: Set(None),
                            created_at_ms: Set(round),
                            ..Default::default()
                        })
                        .collect();
                    usage_records::insert_batch(&db, rows).await?;
                    let outcome = hosted_keys::KeyOutcome {
                        key_id: key.id,
                        successes: 20,
                        failures: 0,
                        last_used_at_ms: Some(round),
                        last_failure_at_ms: None,
                        spent: 1,
                    };
                    hosted_keys::apply_outcomes(&db, &[outcome]).await?;
                    let name = format!("user-{task}-{round}");
                    users::insert(
                        &db,
                        users::NewUser { username: &name, password_hash: "h", roles: "buyer", now_ms: 1 },
                    )
                    .await?;
                    buyer_keys::list_usable(&db, 0).await?;
                }
                Ok::<_, DbErr>(())
            }));
        }
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let key = hosted_keys::find_for_owner(&t.db, 1, key.id).await.unwrap().unwrap();
        assert_eq!(key.success_count, 8 * 15 * 20);
        assert_eq!(key.remaining_balance, key.declared_balance - 8 * 15);
        assert_eq!(users::count(&t.db).await.unwrap(), 8 * 15);
    }
}
