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
        "/v1/projects/{id}/preview-databases",
        "/v1/preview-databases/{id}",
        "/v1/preview-databases/{id}/extend",
        "/v1/preview-databases/{id}/reset",
        "/v1/preview-databases/{id}/connections",
        "/metrics",
    ] {
        assert!(paths.contains_key(expected), "{expected} is not documented");
    }
    let tagged = |path: &str, method: &str| paths[path][method]["tags"][0].clone();
    assert_eq!(
        tagged("/v1/projects/{id}/preview-databases", "post"),
        "previews"
    );
    assert_eq!(tagged("/v1/preview-databases/{id}", "delete"), "previews");
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

/// The document as the API builds it (no database needed).
fn document() -> Value {
    serde_json::to_value(capy_api::openapi()).unwrap()
}

/// The schema of property `field` of component `component`.
fn property<'a>(doc: &'a Value, component: &str, field: &str) -> &'a Value {
    &doc["components"]["schemas"][component]["properties"][field]
}

fn pattern(schema: &Value) -> regex::Regex {
    let text = schema["pattern"]
        .as_str()
        .unwrap_or_else(|| panic!("no pattern in {schema}"));
    regex::Regex::new(text).unwrap()
}

#[test]
fn every_post_states_the_idempotency_key_header() {
    let doc = document();
    let mut posts = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        let Some(post) = item.get("post") else {
            continue;
        };
        posts += 1;
        let headers: Vec<&Value> = post["parameters"]
            .as_array()
            .map(|p| p.iter().filter(|p| p["in"] == "header").collect())
            .unwrap_or_default();
        assert_eq!(headers.len(), 1, "POST {path}: {headers:?}");
        let header = headers[0];
        assert_eq!(header["name"], "Idempotency-Key", "POST {path}");
        assert_eq!(header["required"], false, "POST {path}");
        assert_eq!(header["schema"]["pattern"], "^[!-~]{1,255}$", "POST {path}");
        assert_eq!(header["schema"]["maxLength"], 255, "POST {path}");
    }
    assert!(posts >= 10, "{posts} POST operations");
}

#[test]
fn constraints_the_server_enforces_are_stated() {
    let doc = document();
    for component in ["CreateProject", "UpdateProject", "CreatePreview"] {
        for field in ["statement_timeout", "idle_transaction_timeout"] {
            assert_eq!(
                property(&doc, component, field)["pattern"],
                capy_shared::ident::DURATION_PATTERN,
                "{component}.{field}"
            );
        }
        let name = property(&doc, component, "name");
        assert_eq!(
            name["pattern"], "^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$",
            "{component}"
        );
        let connections = property(&doc, component, "max_connections");
        assert_eq!(
            (&connections["minimum"], &connections["maximum"]),
            (&1.into(), &1000.into())
        );
    }
    let grace = property(&doc, "RotateCredentials", "grace_hours");
    assert_eq!(
        (&grace["minimum"], &grace["maximum"], &grace["default"]),
        (&0.into(), &720.into(), &24.into()),
        "{grace}"
    );
    assert_eq!(
        doc["components"]["schemas"]["RotateCredentials"]["additionalProperties"],
        false
    );
    let credentials = &doc["components"]["schemas"]["Credentials"]["required"];
    // `database` and `ssl_mode` are left out for engines without them (Redis).
    for field in [
        "engine",
        "host",
        "port",
        "username",
        "password",
        "connection_string",
    ] {
        assert!(
            credentials.as_array().unwrap().contains(&field.into()),
            "{credentials}"
        );
    }
    let create = &doc["components"]["schemas"]["CreateProject"];
    assert_eq!(create["required"], serde_json::json!(["name"]));
    assert_eq!(create["additionalProperties"], false);
    let preview = &doc["components"]["schemas"]["CreatePreview"];
    assert_eq!(preview["required"], serde_json::json!(["mode"]));
    assert_eq!(preview["additionalProperties"], false);
    let mode = &doc["components"]["schemas"]["PreviewMode"]["enum"];
    assert_eq!(mode, &serde_json::json!(["clone", "empty"]));
    let extend = &doc["components"]["schemas"]["ExtendPreview"];
    assert_eq!(extend["required"], serde_json::json!(["ttl_hours"]));
    assert_eq!(property(&doc, "ExtendPreview", "ttl_hours")["minimum"], 1);

    // `ref` is required and not null; request bodies that must be objects are required.
    let database = &doc["components"]["schemas"]["CreateDatabase"];
    assert_eq!(database["required"], serde_json::json!(["ref"]));
    assert_eq!(property(&doc, "CreateDatabase", "ref")["type"], "string");
    for path in [
        "/v1/projects",
        "/v1/databases",
        "/v1/api_keys",
        "/v1/organizations",
    ] {
        let body = &doc["paths"][path]["post"]["requestBody"];
        assert_eq!(body["required"], true, "POST {path}");
    }
    for (component, field) in [
        ("CreateApiKey", "name"),
        ("CreateOrganization", "name"),
        ("CreateDatabase", "ref"),
    ] {
        let schema = property(&doc, component, field);
        assert!(schema["pattern"].as_str().is_some(), "{component}.{field}");
    }
    let scopes = property(&doc, "CreateApiKey", "scopes");
    assert_eq!(scopes["minItems"], 1);
    assert_eq!(
        scopes["items"]["enum"],
        serde_json::json!(capy_api::auth::SCOPES)
    );
    let extension = &doc["paths"]["/v1/projects/{id}/extensions/{name}"]["delete"];
    assert_eq!(
        extension["parameters"][1]["schema"]["pattern"],
        "^[a-z0-9_-]{1,63}$"
    );

    // Every list states what its cursor may be.
    for (path, item) in doc["paths"].as_object().unwrap() {
        let Some(parameters) = item["get"]["parameters"].as_array() else {
            continue;
        };
        if let Some(cursor) = parameters.iter().find(|p| p["name"] == "cursor") {
            assert!(
                cursor["schema"]["pattern"].is_string(),
                "GET {path}: {cursor}"
            );
        }
    }
}

/// Samples of a field: what the server does with each must be what the document's
/// pattern says (accepted when it matches, a 400 when not).
struct Agreement {
    what: &'static str,
    pattern: regex::Regex,
}

impl Agreement {
    async fn check(&self, samples: &[&str], call: impl AsyncFn(&str) -> (StatusCode, Value)) {
        for sample in samples {
            let (status, body) = call(sample).await;
            let stated = self.pattern.is_match(sample);
            assert_eq!(
                status != StatusCode::BAD_REQUEST,
                stated,
                "{}: {sample:?} matches the pattern: {stated}; the server answered {status} {body}",
                self.what
            );
        }
    }
}

const TEXT_SAMPLES: &[&str] = &[
    "",
    " ",
    "a",
    "acme",
    " acme ",
    "\tacme\n",
    "ac me",
    "ac\tme",
    "ac\u{7f}me",
    "ac\u{85}me",
    "\u{85}acme\u{3000}",
    "\u{feff}acme",
    "Äpfel",
    "30s",
    "0",
    "999999999",
    "1000000000",
    "500ms",
    "999999s",
    "1000000s",
    "9999min",
    "99h",
    "100h",
    "9d",
    "24d",
    "1w",
    "-1",
    "30 s",
    "_x",
    "x-y_z",
    "Project-1",
];

#[tokio::test]
async fn the_server_takes_exactly_what_the_document_states() {
    let app = TestApp::new().await;
    let doc = document();
    let long = "n".repeat(100);
    let longer = "n".repeat(101);
    let padded = format!("  {long}  ");
    let mut samples = TEXT_SAMPLES.to_vec();
    samples.extend([long.as_str(), longer.as_str(), padded.as_str()]);
    let missing = uuid::Uuid::now_v7();

    // Checked before the project is looked up: valid values find no project (404).
    for field in ["statement_timeout", "name"] {
        let agreement = Agreement {
            what: field,
            pattern: pattern(property(&doc, "UpdateProject", field)),
        };
        agreement
            .check(&samples, async |sample| {
                let body = serde_json::json!({ field: sample }).to_string();
                let path = format!("/v1/projects/{missing}");
                app.call("PATCH", &path, Some(&app.key), Some(&body)).await
            })
            .await;
    }
    let agreement = Agreement {
        what: "organization name",
        pattern: pattern(property(&doc, "CreateOrganization", "name")),
    };
    agreement
        .check(&samples, async |sample| {
            let body = serde_json::json!({ "name": sample }).to_string();
            let key = Some(app.admin_key.as_str());
            app.call("POST", "/v1/organizations", key, Some(&body))
                .await
        })
        .await;
    let agreement = Agreement {
        what: "API key name",
        pattern: pattern(property(&doc, "CreateApiKey", "name")),
    };
    agreement
        .check(&samples, async |sample| {
            let body = serde_json::json!({ "name": sample }).to_string();
            app.call("POST", "/v1/api_keys", Some(&app.key), Some(&body))
                .await
        })
        .await;
    let cursor = query_parameter(&doc, "/v1/projects", "cursor");
    let agreement = Agreement {
        what: "cursor",
        pattern: pattern(cursor),
    };
    let id = missing.to_string();
    let mut cursors = vec![id.as_str(), "", "x", "eA"];
    let upper = id.to_uppercase();
    let simple = missing.simple().to_string();
    cursors.extend([upper.as_str(), simple.as_str()]);
    agreement
        .check(&cursors, async |sample| {
            let path = format!("/v1/projects?cursor={}", urlencode(sample));
            app.call("GET", &path, Some(&app.key), None).await
        })
        .await;
}

/// A query parameter of a list, as the document states it.
fn query_parameter<'a>(doc: &'a Value, path: &str, name: &str) -> &'a Value {
    let parameters = doc["paths"][path]["get"]["parameters"].as_array().unwrap();
    let found = parameters.iter().find(|p| p["name"] == name);
    &found.unwrap_or_else(|| panic!("GET {path} has no {name}"))["schema"]
}

/// Text filters reach SQL only as the document allows: a NUL is a 400, not a 500.
#[tokio::test]
async fn list_filters_take_what_the_document_states() {
    let app = TestApp::new().await;
    let doc = document();
    let agreement = Agreement {
        what: "jobs' type filter",
        pattern: pattern(query_parameter(&doc, "/v1/jobs", "type")),
    };
    let samples = [
        "\0",
        "project.create\0",
        "project.create",
        "capy.noop",
        "",
        "Project",
        "a b",
        "\u{e9}",
    ];
    agreement
        .check(&samples, async |sample| {
            let path = format!("/v1/jobs?type={}", urlencode(sample));
            app.call("GET", &path, Some(&app.key), None).await
        })
        .await;
}

fn urlencode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

#[tokio::test]
async fn the_idempotency_key_header_is_checked_as_stated() {
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    let app = TestApp::new().await;
    let doc = document();
    let header = &doc["paths"]["/v1/jobs/{id}/cancel"]["post"]["parameters"][1];
    let agreement = Agreement {
        what: "Idempotency-Key",
        pattern: pattern(&header["schema"]),
    };
    let longest = "~".repeat(255);
    let longer = "~".repeat(256);
    let samples = [
        "",
        "a",
        "a b",
        "!",
        "key-1",
        "\t",
        longest.as_str(),
        longer.as_str(),
    ];
    let path = format!("/v1/jobs/{}/cancel", uuid::Uuid::now_v7());
    agreement
        .check(&samples, async |sample| {
            let request = Request::builder()
                .method("POST")
                .uri(&path)
                .header("authorization", format!("Bearer {}", app.key))
                .header("idempotency-key", sample)
                .body(Body::empty())
                .unwrap();
            let response = capy_api::router(app.state.clone())
                .oneshot(request)
                .await
                .unwrap();
            let status = response.status();
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            (status, serde_json::from_slice(&bytes).unwrap())
        })
        .await;
}

/// Requests the document allows that the server once refused: an integer written as
/// `5.0` (JSON Schema's `integer`), and a `null` claim body (the body is optional).
#[tokio::test]
async fn requests_the_document_allows_are_not_refused() {
    let app = TestApp::new().await;
    let missing = uuid::Uuid::now_v7();
    let project = format!("/v1/projects/{missing}");
    for (body, expected) in [
        (r#"{"storage_limit_bytes": 5.0}"#, StatusCode::NOT_FOUND),
        (r#"{"max_connections": 20.0}"#, StatusCode::NOT_FOUND),
        (r#"{"max_connections": 2.5}"#, StatusCode::BAD_REQUEST),
        (r#"{"storage_limit_bytes": 1e30}"#, StatusCode::BAD_REQUEST),
    ] {
        let (status, answer) = app
            .call("PATCH", &project, Some(&app.key), Some(body))
            .await;
        assert_eq!(status, expected, "PATCH {body}: {answer}");
    }
    let rotate = format!("/v1/projects/{missing}/credentials/rotate");
    for body in ["{}", r#"{"grace_hours": 5.0}"#, r#"{"grace_hours": null}"#] {
        let (status, answer) = app.call("POST", &rotate, Some(&app.key), Some(body)).await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "rotate with {body}: {answer}"
        );
    }
    let claim = format!("/v1/databases/{missing}/claim");
    for body in ["null", "{}", r#"{"name": null}"#] {
        let (status, answer) = app.call("POST", &claim, Some(&app.key), Some(body)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "claim with {body}: {answer}");
    }
}
