use sea_orm::entity::prelude::*;

/// A user's webhook: notifications are POSTed to `url`, signed with HMAC-SHA256 under the secret.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "webhooks")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    #[sea_orm(unique)]
    pub user_id: i64,
    pub url: String,
    /// Versioned ciphertext (`crate::crypto`) of the signing secret; never in a response after creation.
    #[sea_orm(column_type = "Text")]
    pub secret_enc: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub last_delivery_at_ms: Option<i64>,
    pub last_error: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
