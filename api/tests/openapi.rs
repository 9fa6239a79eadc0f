#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! `/openapi.json` is served, every `$ref` in it resolves, and operation ids are
//! unique (schemathesis in `.ci/fuzz-api` checks the answers against it).

mod common;

use axum::http::StatusCode;
use common::TestApp;
use serde_json::Value;

fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map {
                match (key.as_str(), inner) {
                    ("$ref", Value::String(target)) => out.push(target),
                    _ => refs(inner, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| refs(i, out)),
        _ => {}
    }
}

#[tokio::test]
async fn the_document_is_served_whole_and_consistent() {
    let app = TestApp::new().await;
    let (status, doc) = app.call("GET", "/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));

    let mut targets = Vec::new();
    refs(&doc, &mut targets);
    assert!(targets.len() > 50, "{} refs", targets.len());
    for target in targets {
        let pointer = target.strip_prefix('#').unwrap();
        assert!(doc.pointer(pointer).is_some(), "{target} does not resolve");
    }

    let mut ids = std::collections::HashSet::new();
    let paths = doc["paths"].as_object().unwrap();
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            let id = operation["operationId"].as_str().unwrap();
            assert!(
                ids.insert(id.to_string()),
                "{method} {path}: operationId {id} repeats"
            );
        }
    }
    for expected in [
        "/v1/projects",
        "/v1/projects/{id}/extensions/{name}",
        "/v1/jobs/{id}/attempts",
        "/v1/api_keys/{id}",
        "/v1/clusters/{id}/check-access",
        "/v1/databases",
        "/metrics",
    ] {
        assert!(paths.contains_key(expected), "{expected} is not documented");
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}
