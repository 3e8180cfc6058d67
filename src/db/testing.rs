//! Throw-away databases for tests: an SQLite file in a temporary directory, or a uniquely named MariaDB
//! database that is dropped when the `TestDb` goes out of scope (also when the test panics).

use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};

/// The MariaDB server used by tests; `TOKEX_TEST_MYSQL_URL` overrides it (no database name in the URL).
fn mysql_server_url() -> String {
    std::env::var("TOKEX_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".to_string())
}

pub(crate) struct TestDb {
    pub db: DatabaseConnection,
    pub label: &'static str,
    url: String,
    mysql_name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("test.db").display());
        let db = migrated_pool(&url).await;
        Self { db, label: "sqlite", url, mysql_name: None, _dir: Some(dir) }
    }

    pub async fn mysql() -> Self {
        let server = mysql_server_url();
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let seq = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("tokex_t_db_{}_{nanos}_{seq}", std::process::id());
        let admin = Database::connect(&server).await.unwrap_or_else(|e| panic!("MariaDB at {server}: {e}"));
        admin
            .execute(Statement::from_string(admin.get_database_backend(), format!("CREATE DATABASE `{name}`")))
            .await
            .unwrap();
        admin.close().await.unwrap();
        let url = format!("{server}/{name}");
        let db = migrated_pool(&url).await;
        Self { db, label: "mariadb", url, mysql_name: Some(name), _dir: None }
    }

    /// One database per backend, so that a test runs the same assertions on both.
    pub async fn all() -> Vec<Self> {
        vec![Self::sqlite().await, Self::mysql().await]
    }

    /// Rolls back the newest `steps` migrations (all for None) and applies them again, on a connection of
    /// its own as `app::open_database` migrates, then replaces `db` with a new pool: a pooled SQLite
    /// connection can keep reading the schema from before a migration (seen as "index ... already exists"
    /// when the migrations ran through the pool). Handles cloned from the old `db` must not be used after.
    pub async fn remigrate(&mut self, steps: Option<u32>) {
        use migration::MigratorTrait;
        let migrator = super::connect(&self.url, 1).await.unwrap();
        migration::Migrator::down(&migrator, steps).await.unwrap();
        super::migrate(&migrator).await.unwrap();
        migrator.close().await.unwrap();
        self.db = super::connect(&self.url, 4).await.unwrap();
    }

    /// Drops the database now (the `Drop` fallback covers panics).
    pub async fn cleanup(mut self) {
        if let Some(name) = self.mysql_name.take() {
            drop_mysql_database(&name).await;
        }
    }
}

/// A pool of four on a database migrated through a connection of its own (see [`TestDb::remigrate`]).
async fn migrated_pool(url: &str) -> DatabaseConnection {
    let migrator = super::connect(url, 1).await.unwrap();
    super::migrate(&migrator).await.unwrap();
    migrator.close().await.unwrap();
    super::connect(url, 4).await.unwrap()
}

static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

async fn drop_mysql_database(name: &str) {
    if let Ok(admin) = Database::connect(&mysql_server_url()).await {
        let sql = format!("DROP DATABASE IF EXISTS `{name}`");
        let _ = admin.execute(Statement::from_string(admin.get_database_backend(), sql)).await;
        let _ = admin.close().await;
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.mysql_name.take() else { return };
        // Drop cannot await, and may run inside a runtime: use a separate thread with its own runtime.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                rt.block_on(drop_mysql_database(&name));
            }
        })
        .join();
    }
}
