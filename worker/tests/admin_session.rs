#![allow(clippy::unwrap_used)] // test code: a failed set-up should panic
//! Every admin session a step opens, in the admin's database or a tenant's, searches
//! only the system catalog (then its own temporary schema): a search_path a database's
//! owner sets for its database does not reach it, so no object a tenant creates can
//! shadow a name the admin uses. Options the admin URL carries are kept.

use capy_shared::step::StepCluster;
use capy_worker::steps::{connect, connect_database};
use uuid::Uuid;

/// The test cluster as a step sees it, reached through `url`.
fn cluster_of(url: impl Into<String>) -> StepCluster {
    StepCluster {
        id: Uuid::nil(),
        name: "test".into(),
        admin_url: url.into(),
        allowed_extensions: Vec::new(),
        ca_pem: None,
        pooler_auth_user: None,
        engine: Default::default(),
    }
}

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
    let session = connect_database(&cluster_of(url), &database, "test database")
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
    let session = connect(&cluster_of(admin_url(&database))).await.unwrap();
    assert_eq!(schemas(&session).await.0, ["pg_catalog", "pg_temp"]);
    drop(session);

    setup
        .batch_execute(&format!("drop database {database} with (force)"))
        .await
        .unwrap();
}

/// A database whose settings make every session take another role (`ALTER DATABASE …
/// SET role`): the admin refuses to work there instead of acting as that role.
#[tokio::test]
async fn an_admin_session_that_starts_as_another_role_is_refused() {
    let suffix = Uuid::new_v4().simple().to_string();
    let database = format!("capy_{suffix}");
    let role = format!("capy_{suffix}_owner");
    let (setup, connection) =
        tokio_postgres::connect(&admin_url("postgres"), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    setup
        .batch_execute(&format!("create role {role} nologin"))
        .await
        .unwrap();
    setup
        .batch_execute(&format!("create database {database}"))
        .await
        .unwrap();
    // Without the setting the admin works there.
    connect_database(
        &cluster_of(admin_url("postgres")),
        &database,
        "test database",
    )
    .await
    .unwrap();
    setup
        .batch_execute(&format!("alter database {database} set role = {role}"))
        .await
        .unwrap();

    let refused = connect_database(
        &cluster_of(admin_url("postgres")),
        &database,
        "test database",
    )
    .await;
    let Err(refused) = refused else {
        panic!("an admin session running as another role was accepted")
    };
    assert!(!refused.transient, "{refused:?}");
    assert!(
        refused
            .message
            .contains(&format!("runs as role \"{role}\", not as")),
        "{refused:?}"
    );
    let refused = connect(&cluster_of(admin_url(&database))).await;
    let Err(refused) = refused else {
        panic!("an admin session running as another role was accepted")
    };
    assert!(refused.message.contains("runs as role"), "{refused:?}");

    setup
        .batch_execute(&format!("drop database {database} with (force)"))
        .await
        .unwrap();
    setup
        .batch_execute(&format!("drop role {role}"))
        .await
        .unwrap();
}
