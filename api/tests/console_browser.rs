#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! The operator console in a real browser: Debian's headless Chromium driven through
//! chromedriver (WebDriver), against the API and a worker running as real processes.
//! One browser session walks through issue 15's scenarios: sign in, follow a job to
//! `completed` without reloading, cancel, a failing job's stderr (carrying an XSS
//! payload that must stay text), retry, a read-only key (no cancel button; 403 when it
//! forces one), the admin's clusters and sign-out. It writes the screenshots in
//! `docs/screenshots/` and prints the page weight and first paint.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use capy_api::admin::{self, KeyGrant};
use capy_testkit::{free_port, ChildGuard, ProcessStack};
use common::http::{text, Api};
use common::TestApp;
use fantoccini::{Client, ClientBuilder, Locator};
use futures::FutureExt as _;
use serde_json::{json, Value};

/// What the failing step prints: markup that would run script if the console ever put
/// step output into the DOM as HTML.
const XSS_STDOUT: &str = "<script>window.__xss=1</script>";
const XSS_STDERR: &str = "step failed: <img src=x onerror=window.__xss=2>";

/// A program on PATH (or in /usr/bin), or a panic naming the Debian packages.
fn program(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is missing: the console's browser tests need Debian's `chromium` and \
                 `chromium-driver` packages (apt-get install chromium chromium-driver)"
            )
        })
}

/// chromedriver on a free port, killed with the test, and a session of headless
/// Chromium with a fresh profile.
struct Browser {
    client: Client,
    _driver: ChildGuard,
    profile: PathBuf,
}

impl Browser {
    async fn start() -> Self {
        let chromium = program("chromium");
        let chromedriver = program("chromedriver");
        let port = free_port().unwrap();
        let driver = ChildGuard(
            Command::new(&chromedriver)
                .arg(format!("--port={port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting chromedriver"),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile =
            std::env::temp_dir().join(format!("capy-chromium-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&profile).unwrap();
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless=new",
                    // Tests may run as root, where Chromium's sandbox cannot start.
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--window-size=1280,1000",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }),
        );
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("starting a headless Chromium session through chromedriver");
        Self {
            client,
            _driver: driver,
            profile,
        }
    }
}

/// Evaluates `expression` in the page until it is truthy; answers its value.
async fn wait_for(c: &Client, expression: &str, what: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    let script = format!("try {{ return ({expression}); }} catch (e) {{ return null; }}");
    loop {
        let value = c.execute(&script, vec![]).await.unwrap();
        let truthy = match &value {
            Value::Null => false,
            Value::Bool(b) => *b,
            Value::Number(n) => n.as_f64() != Some(0.0),
            Value::String(s) => !s.is_empty(),
            _ => true,
        };
        if truthy {
            return value;
        }
        if Instant::now() > deadline {
            let page = c
                .execute("return document.body.innerText", vec![])
                .await
                .unwrap_or_default();
            panic!("timed out waiting for {what} ({expression}); the page shows:\n{page}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn js(c: &Client, script: &str) -> Value {
    c.execute(script, vec![]).await.unwrap()
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .click()
        .await
        .unwrap();
}

async fn text_of(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .text()
        .await
        .unwrap()
}

/// Navigates inside the page (a hash change: no reload).
async fn open(c: &Client, hash: &str) {
    c.execute("location.hash = arguments[0];", vec![json!(hash)])
        .await
        .unwrap();
}

async fn sign_in(c: &Client, key: &str) {
    wait_for(
        c,
        "document.querySelector('[data-testid=key-input]')",
        "the sign-in form",
    )
    .await;
    let input = c
        .find(Locator::Css("[data-testid=key-input]"))
        .await
        .unwrap();
    input.send_keys(key).await.unwrap();
    click(c, "[data-testid=sign-in]").await;
    wait_for(
        c,
        "document.querySelector('[data-testid=identity-scopes]')",
        "the signed-in header",
    )
    .await;
    // The key is in session storage, not in the page or its address.
    let shown = c
        .execute(
            "return document.documentElement.outerHTML.includes(arguments[0]) \
             || [...document.querySelectorAll('input')].some((i) => i.value === arguments[0]) \
             || location.href.includes(arguments[0])",
            vec![json!(key)],
        )
        .await
        .unwrap();
    assert_eq!(shown, json!(false));
}

async fn sign_out(c: &Client) {
    click(c, "[data-testid=sign-out]").await;
    wait_for(
        c,
        "document.querySelector('[data-testid=sign-in-form]')",
        "the sign-in form after sign-out",
    )
    .await;
    assert_eq!(
        js(c, "return [sessionStorage.length, localStorage.length]").await,
        json!([0, 0])
    );
    assert_eq!(
        js(c, "return document.querySelector('#top').hidden").await,
        json!(true)
    );
}

/// Waits until the job page shows `state`.
async fn job_state_is(c: &Client, state: &str) {
    wait_for(
        c,
        &format!(
            "document.querySelector('[data-testid=job-state]') && \
             document.querySelector('[data-testid=job-state]').textContent === '{state}'"
        ),
        &format!("the job page to show {state}"),
    )
    .await;
}

async fn screenshot(c: &Client, name: &str) {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/screenshots");
    std::fs::create_dir_all(&folder).unwrap();
    let png = c.screenshot().await.unwrap();
    std::fs::write(folder.join(name), png).unwrap();
}

/// POST from inside the page, with the key the page holds: what a user forcing a
/// button the console does not show would send.
async fn fetch_from_page(c: &Client, method: &str, path: &str) -> u64 {
    let script = "const done = arguments[arguments.length - 1];
        fetch(arguments[1], { method: arguments[0], headers: {
            Authorization: 'Bearer ' + sessionStorage.getItem('capy.console.key') } })
          .then((r) => done(r.status), (e) => done(-1));";
    c.execute_async(script, vec![json!(method), json!(path)])
        .await
        .unwrap()
        .as_u64()
        .unwrap()
}

struct Fixture {
    api: Api,
    url: String,
    admin_key: String,
    read_only_key: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_in_a_real_browser() {
    let started = Instant::now();
    let app = TestApp::new().await;
    let (_, read_only_key) = admin::create_api_key(
        &app.db.pool,
        &KeyGrant {
            name: "read-only".into(),
            organization_id: Some(app.organization_id),
            scopes: Some(vec!["read".into()]),
            ..KeyGrant::default()
        },
    )
    .await
    .unwrap();
    // project.update fails printing markup; an extension enable runs until cancelled.
    let steps = format!(
        "project.update=echo '{XSS_STDOUT}'; echo '{XSS_STDERR}' >&2; exit 3,\
         project.extension_enable=sleep 60"
    );
    let env = [
        ("CAPY_RETRY_BASE_DELAY_MS", "50".to_string()),
        ("CAPY_POLL_INTERVAL_MS", "100".to_string()),
        ("CAPY_STEP_COMMANDS", steps),
    ];
    let processes = ProcessStack::start(&app.db.url, 1, &env).await.unwrap();
    let fixture = Fixture {
        api: Api::new(&processes.api_url, &app.key),
        url: processes.api_url.clone(),
        admin_key: app.admin_key.clone(),
        read_only_key,
    };
    measure_page_weight(&fixture).await;

    let browser = Browser::start().await;
    let outcome = std::panic::AssertUnwindSafe(scenarios(&browser.client, &fixture))
        .catch_unwind()
        .await;
    let _ = browser.client.clone().close().await;
    let _ = std::fs::remove_dir_all(&browser.profile);
    eprintln!("console browser test: {:?}", started.elapsed());
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// Bytes of the page, its script and its stylesheet as served, and the headers that
/// make it safe.
async fn measure_page_weight(f: &Fixture) {
    let http = reqwest::Client::new();
    let mut total = 0;
    for path in ["/console/", "/console/app.js", "/console/app.css"] {
        let response = http.get(format!("{}{path}", f.url)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let csp = response
            .headers()
            .get("content-security-policy")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
            "{csp}"
        );
        let bytes = response.bytes().await.unwrap().len();
        eprintln!("page weight: {path} {bytes} bytes");
        total += bytes;
    }
    eprintln!("page weight: {total} bytes in all (uncompressed)");
}

async fn scenarios(c: &Client, f: &Fixture) {
    // Sign in with the organization's key; the header shows its organization and scopes.
    c.goto(&format!("{}/console/", f.url)).await.unwrap();
    wait_for(
        c,
        "document.querySelector('[data-testid=key-input]')",
        "the sign-in form",
    )
    .await;
    // Paint entries are recorded after the frame: wait for both.
    let paint = wait_for(
        c,
        "performance.getEntriesByType('paint').length >= 2 && \
         performance.getEntriesByType('paint').map((e) => [e.name, Math.round(e.startTime)])",
        "the paint timings",
    )
    .await;
    let navigation = js(
        c,
        "const n = performance.getEntriesByType('navigation')[0]; \
         return n ? { dom_content_loaded: Math.round(n.domContentLoadedEventEnd), \
                      load: Math.round(n.loadEventEnd) } : null",
    )
    .await;
    eprintln!("first paint (ms since navigation start): {paint} navigation: {navigation}");
    sign_in(c, &f.api.key).await;
    let scopes = text_of(c, "[data-testid=identity-scopes]").await;
    assert!(
        scopes.contains("read") && scopes.contains("write"),
        "{scopes}"
    );
    assert!(js(
        c,
        "return document.querySelector('[data-testid=nav-clusters]') === null"
    )
    .await
    .as_bool()
    .unwrap());
    assert!(!c.current_url().await.unwrap().as_str().contains("capy_"));

    // A project created through the API: its job followed to `completed` on its page,
    // with no reload (a flag set on the page survives).
    let (status, created) = f.api.post("/v1/projects", json!({"name": "shop"})).await;
    assert_eq!(status, 202, "{created}");
    let project = text(&created["project"]["id"]).to_string();
    let create_job = text(&created["job"]["id"]).to_string();
    open(c, &format!("#/jobs/{create_job}")).await;
    js(c, "window.__sameDocument = true; return null").await;
    job_state_is(c, "completed").await;
    wait_for(
        c,
        "document.querySelectorAll('[data-testid=attempt]').length === 1",
        "the create's attempt",
    )
    .await;
    assert_eq!(js(c, "return window.__sameDocument").await, json!(true));
    let stdout = text_of(c, "[data-testid=attempt-stdout]").await;
    assert!(stdout.contains("is ready"), "{stdout}");

    // Cancel a running job from its page.
    let (status, enable) = f
        .api
        .post(
            &format!("/v1/projects/{project}/extensions"),
            json!({"name": "pgcrypto"}),
        )
        .await;
    assert_eq!(status, 202, "{enable}");
    let enable_job = text(&enable["job"]["id"]).to_string();
    open(c, &format!("#/jobs/{enable_job}")).await;
    job_state_is(c, "claimed").await;
    wait_for(
        c,
        "document.querySelector('[data-testid=attempt-running]').textContent.includes('worker-1')",
        "the running attempt and its worker",
    )
    .await;
    click(c, "[data-testid=cancel-job]").await;
    job_state_is(c, "cancelled").await;
    wait_for(
        c,
        "document.querySelector('[data-testid=retry-job]')",
        "a retry button on the cancelled job",
    )
    .await;

    // A failing job: its stderr readable in the viewer, its markup shown as text.
    js(c, "window.__xss = 0; return null").await;
    let (status, patched) = f
        .api
        .request(
            reqwest::Method::PATCH,
            &format!("/v1/projects/{project}"),
            Some(json!({"max_connections": 7})),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    let update_job = text(&patched["job"]["id"]).to_string();
    open(c, &format!("#/jobs/{update_job}")).await;
    job_state_is(c, "failed").await;
    wait_for(
        c,
        "document.querySelectorAll('[data-testid=attempt]').length === 1",
        "the failed attempt",
    )
    .await;
    let stderr = text_of(c, "[data-testid=attempt-stderr]").await;
    assert!(stderr.contains(XSS_STDERR), "{stderr}");
    let stdout = text_of(c, "[data-testid=attempt-stdout]").await;
    assert!(stdout.contains(XSS_STDOUT), "{stdout}");
    let viewer = js(
        c,
        "const s = getComputedStyle(document.querySelector('[data-testid=attempt-stderr]')); \
         return [s.whiteSpace, s.overflowY, s.maxHeight, s.fontFamily]",
    )
    .await;
    assert_eq!(viewer[0], "pre", "{viewer}");
    assert_eq!(viewer[1], "auto", "{viewer}");
    assert_ne!(viewer[2], "none", "{viewer}");
    assert!(
        viewer[3].as_str().unwrap().contains("monospace"),
        "{viewer}"
    );
    assert_eq!(
        js(
            c,
            "return document.querySelectorAll('#app img, #app script').length"
        )
        .await,
        json!(0)
    );

    // Retry it: a second attempt, failing the same way, appears on the same page.
    click(c, "[data-testid=retry-job]").await;
    wait_for(
        c,
        "document.querySelectorAll('[data-testid=attempt]').length === 2",
        "the retried job's second attempt",
    )
    .await;
    job_state_is(c, "failed").await;
    assert_eq!(js(c, "return window.__xss").await, json!(0));
    screenshot(c, "job.png").await;

    // The project's page: its state, settings, jobs, and credentials only on a click.
    open(c, &format!("#/projects/{project}")).await;
    wait_for(
        c,
        "document.querySelectorAll('[data-testid=project-jobs] [data-testid=job-row]').length === 3",
        "the project's three jobs",
    )
    .await;
    assert_eq!(text_of(c, "[data-testid=project-name]").await, "shop");
    assert!(js(
        c,
        "return document.querySelector('[data-testid=connection-string]') === null"
    )
    .await
    .as_bool()
    .unwrap());
    wait_for(
        c,
        "!document.querySelector('[data-testid=extensions]').textContent.includes('Loading')",
        "the extensions",
    )
    .await;
    screenshot(c, "project.png").await;
    click(c, "[data-testid=show-credentials]").await;
    let connection = wait_for(
        c,
        "document.querySelector('[data-testid=connection-string]').textContent",
        "the connection string",
    )
    .await;
    assert!(
        connection.as_str().unwrap().starts_with("postgres"),
        "{connection}"
    );

    // The jobs list: filtered, refreshed live (a job queued after it opened appears).
    open(c, "#/jobs?type=project.extension_enable").await;
    wait_for(
        c,
        &format!("document.querySelector('[data-job-id=\"{enable_job}\"]')"),
        "the filtered jobs list",
    )
    .await;
    let (status, again) = f
        .api
        .post(
            &format!("/v1/projects/{project}/extensions"),
            json!({"name": "pgcrypto"}),
        )
        .await;
    assert_eq!(status, 202, "{again}");
    let running_job = text(&again["job"]["id"]).to_string();
    wait_for(
        c,
        &format!("document.querySelector('[data-job-id=\"{running_job}\"]')"),
        "the new job in the live list",
    )
    .await;
    assert_eq!(
        js(
            c,
            "return [...document.querySelectorAll('[data-testid=job-row] td:nth-child(2)')]\
             .every((td) => td.textContent === 'project.extension_enable')"
        )
        .await,
        json!(true)
    );

    // A malformed address is a page error, and the console still navigates after it.
    open(c, "#/jobs/%E0").await;
    wait_for(
        c,
        "document.querySelector('[data-testid=error]').textContent",
        "an error for a malformed address",
    )
    .await;
    open(c, "#/jobs/..").await;
    wait_for(
        c,
        "document.body.innerText.includes('That is not an id.')",
        "a non-id refused",
    )
    .await;
    open(c, &format!("#/jobs/{running_job}")).await;
    wait_for(
        c,
        "document.querySelector('[data-testid=job-state]')",
        "the job page after a bad address",
    )
    .await;

    // Sign out: the key is gone from the tab.
    sign_out(c).await;

    // A read-only key: no cancel or retry buttons, no credentials; forcing a cancel is 403.
    sign_in(c, &f.read_only_key).await;
    open(c, &format!("#/jobs/{running_job}")).await;
    wait_for(
        c,
        "['pending', 'claimed'].includes(document.querySelector('[data-testid=job-state]').textContent)",
        "the running job as the read-only key",
    )
    .await;
    assert_eq!(
        js(
            c,
            "return document.querySelectorAll('[data-testid=cancel-job], [data-testid=retry-job]').length"
        )
        .await,
        json!(0)
    );
    assert_eq!(
        fetch_from_page(c, "POST", &format!("/v1/jobs/{running_job}/cancel")).await,
        403
    );
    open(c, &format!("#/projects/{project}")).await;
    wait_for(
        c,
        "document.querySelector('[data-testid=credentials]').textContent.includes('credentials:read')",
        "no credentials for the read-only key",
    )
    .await;
    assert!(js(
        c,
        "return document.querySelector('[data-testid=show-credentials]') === null"
    )
    .await
    .as_bool()
    .unwrap());
    let (status, body) = f
        .api
        .request(
            reqwest::Method::POST,
            &format!("/v1/jobs/{running_job}/cancel"),
            None,
        )
        .await;
    assert!(status == 200 || status == 202, "{status} {body}");
    sign_out(c).await;

    // The admin: clusters with an access check, and the fleet's overview.
    sign_in(c, &f.admin_key).await;
    open(c, "#/clusters").await;
    wait_for(
        c,
        "document.querySelector('[data-testid=check-access]')",
        "the clusters",
    )
    .await;
    click(c, "[data-testid=check-access]").await;
    wait_for(
        c,
        "document.querySelector('[data-testid=access-report] dl')",
        "the access report",
    )
    .await;
    let report = text_of(c, "[data-testid=access-report]").await;
    assert!(report.contains("reachable"), "{report}");
    // The fleet's queue: depth, the last hour's chart, per-type rows, the worker.
    open(c, "#/overview").await;
    wait_for(
        c,
        "document.querySelector('[data-testid=depth-pending] .stat-value')",
        "the overview",
    )
    .await;
    wait_for(
        c,
        "document.querySelectorAll('[data-testid=chart] rect.bar').length > 0",
        "the chart's bars",
    )
    .await;
    let types = text_of(c, "[data-testid=by-type]").await;
    assert!(
        types.contains("project.create") && types.contains("project.update"),
        "{types}"
    );
    let workers = wait_for(
        c,
        "[...document.querySelectorAll('[data-testid=worker-row]')].map((r) => r.textContent).join(' ')",
        "the workers seen",
    )
    .await;
    assert!(workers.as_str().unwrap().contains("worker-1"), "{workers}");
    assert_eq!(
        js(
            c,
            "return document.querySelector('[data-testid=queue-missing]')"
        )
        .await,
        Value::Null
    );
    screenshot(c, "overview.png").await;

    // Sign-out forgets the key: nothing in session storage, the sign-in form shown,
    // and a reload stays signed out.
    sign_out(c).await;
    c.refresh().await.unwrap();
    wait_for(
        c,
        "document.querySelector('[data-testid=sign-in-form]')",
        "the sign-in form after a reload",
    )
    .await;
    assert_eq!(js(c, "return sessionStorage.length").await, json!(0));
}
