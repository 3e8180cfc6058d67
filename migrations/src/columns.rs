//! Column and table helpers shared by the migrations, so that every table follows the same conventions.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

pub fn id<T: IntoIden>(name: T) -> ColumnDef {
    ColumnDef::new(name).big_integer().not_null().auto_increment().primary_key().to_owned()
}

pub fn big<T: IntoIden>(name: T) -> ColumnDef {
    ColumnDef::new(name).big_integer().not_null().to_owned()
}

pub fn big_null<T: IntoIden>(name: T) -> ColumnDef {
    ColumnDef::new(name).big_integer().null().to_owned()
}

pub fn varchar<T: IntoIden>(name: T, len: u32) -> ColumnDef {
    ColumnDef::new(name).string_len(len).not_null().to_owned()
}

pub fn boolean<T: IntoIden>(name: T) -> ColumnDef {
    ColumnDef::new(name).boolean().not_null().to_owned()
}

/// A `CREATE TABLE` with the MySQL table options. On MySQL/MariaDB a binary collation keeps string
/// comparison and uniqueness case-sensitive, as on SQLite: `Admin` and `admin` are different users, and
/// base62 lookup ids differing only in case are different keys.
pub fn create_table<T: IntoTableRef>(backend: DatabaseBackend, table: T) -> TableCreateStatement {
    let mut stmt = Table::create();
    stmt.table(table);
    if backend == DatabaseBackend::MySql {
        stmt.engine("InnoDB").character_set("utf8mb4").collate("utf8mb4_bin");
    }
    stmt
}

pub fn index<T: IntoIden + Copy + 'static>(name: &str, table: T, columns: &[T], unique: bool) -> IndexCreateStatement {
    let mut stmt = Index::create();
    stmt.name(name).table(table);
    for column in columns {
        stmt.col(*column);
    }
    if unique {
        stmt.unique();
    }
    stmt
}
