#![allow(clippy::unwrap_used)] // test code: a failed set-up should panic
//! Every admin session a step opens, in the admin's database or a tenant's, searches
//! only the system catalog (then its own temporary schema): a search_path a database's
//! owner sets for its database does not reach it, so no object a tenant creates can
//! shadow a name the admin uses. Options the admin URL carries are kept.

use capy_worker::steps::{connect, connect_database};
use uuid::Uuid;

fn admin_url(database: &str) -> String {
    capy_testkit::cluster().unwrap().admin_url_for(database)
}

async fn schemas(client: &tokio_postgres::Client) -> (Vec<String>, String) {
    client
        .batch_execute("create temp table probe (x int)")
        .await
        .unwrap();
    let row = client
        .query_one(
            "select current_schemas(true)::text[], current_setting('statement_timeout')",
            &[],
        )
        .await
        .unwrap();
    let schemas: Vec<String> = row.get(0);
    // The session's own temporary schema is named per backend.
    let schemas = schemas
        .into_iter()
        .map(|s| {
            if s.starts_with("pg_temp_") {
                "pg_temp".into()
            } else {
                s
            }
        })
        .collect();
    (schemas, row.get(1))
}

#[tokio::test]
async fn admin_sessions_search_only_the_catalog_whatever_the_database_says() {
    let database = format!("capy_{}", Uuid::new_v4().simple());
    let (setup, connection) =
        tokio_postgres::connect(&admin_url("postgres"), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    setup
        .batch_execute(&format!("create database {database}"))
        .await
        .unwrap();
    setup
        .batch_execute(&format!(
            "alter database {database} set search_path = public, pg_catalog"
        ))
        .await
        .unwrap();

    // A plain session in that database takes the database's setting.
    let (plain, connection) = tokio_postgres::connect(&admin_url(&database), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    assert_eq!(schemas(&plain).await.0, ["pg_temp", "public", "pg_catalog"]);
    drop(plain);

    // The admin URL may carry options of its own: they are kept.
    let url = format!(
        "{}?options=-c%20statement_timeout%3D7s",
        admin_url("postgres")
    );
    let session = connect_database(&url, &database, "test database")
        .await
        .unwrap();
    assert_eq!(
        schemas(&session).await,
        (
            vec!["pg_catalog".to_string(), "pg_temp".to_string()],
            "7s".to_string()
        )
    );
    drop(session);
    let session = connect(&admin_url(&database), "test cluster")
        .await
        .unwrap();
    assert_eq!(schemas(&session).await.0, ["pg_catalog", "pg_temp"]);
    drop(session);

    setup
        .batch_execute(&format!("drop database {database} with (force)"))
        .await
        .unwrap();
}
