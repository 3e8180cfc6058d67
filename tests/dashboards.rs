//! The Grafana dashboards in `dashboards/` are importable and query only what the gateway exports.
//!
//! Every panel query and every template-variable query is parsed as PromQL (tests/dashboards/promql.rs)
//! and checked against a scrape of a real gateway: each selected series must belong to a `# TYPE` family
//! the gateway prints, each label in a matcher or a by()/without()/on() clause must be one that family's
//! samples carry (or `job`/`instance`, which Prometheus adds when it scrapes), counters must be rated and
//! gauges not, and histogram_quantile must keep `le`. A renamed metric or label fails this test.
//!
//! Why the test drives traffic first: the Prometheus client leaves a labelled family without samples out
//! of the exposition entirely, TYPE line included, so `tokex_fallback_requests_total` or
//! `tokex_webhook_deliveries_total` exist in a scrape only after a fallback key served a request or a
//! webhook was called. Comparing with source code instead would test a copy of the names, not what
//! Prometheus will see; so the gateway gets a healthy key, a failing key (failovers, a circuit that
//! opens, a risk-control pause, a webhook notification), a rate-limited key (cooldowns) and a fallback
//! key, and the scrape is polled until every family the dashboards read has appeared.

// A failed expectation is how a test fails; clippy counts only #[test] fns as tests.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;
#[path = "dashboards/promql.rs"]
mod promql;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{Backend, Gateway, StatusCode, TestEnv};
use promql::Schema;
use reqwest::Method;
use serde_json::{json, Value};

/// The datasource every panel and target uses: the `__inputs` entry on import, the datasource template
/// variable of the same name when the file is provisioned as it is.
const DATASOURCE_UID: &str = "${DS_PROMETHEUS}";
/// Grafana's own variables.
const BUILTIN_VARIABLES: [&str; 8] =
    ["__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms", "__from", "__to"];
/// Panel types the dashboards may use (each must be listed in `__requires`).
const PANEL_TYPES: [&str; 6] = ["row", "timeseries", "stat", "bargauge", "gauge", "table"];
/// How long the scenario waits for risk checks, webhook deliveries and the rest to show up in the scrape.
const SCRAPE_WAIT: Duration = Duration::from_secs(45);

struct Dashboard {
    file: String,
    json: Value,
}

fn load_dashboards() -> Vec<Dashboard> {
    let dir = common::repo_root().join("dashboards");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "expected the dashboards in {}, found {files:?}", dir.display());
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
            Dashboard { file: path.file_name().unwrap().to_string_lossy().into_owned(), json }
        })
        .collect()
}

/// Every panel, the panels of collapsed rows included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().map(Vec::as_slice).unwrap_or_default() {
        out.push(panel);
        out.extend(panel["panels"].as_array().map(Vec::as_slice).unwrap_or_default());
    }
    out
}

fn variables(dashboard: &Value) -> &[Value] {
    dashboard["templating"]["list"].as_array().map(Vec::as_slice).unwrap_or_default()
}

/// `$name`, `${name}` and `${name:format}` in a text.
fn variables_in(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        rest = &rest[at + 1..];
        let name: String = if let Some(braced) = rest.strip_prefix('{') {
            braced.split(['}', ':']).next().unwrap_or_default().to_owned()
        } else {
            rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect()
        };
        // `$1` in a label_replace replacement is a capture group, not a variable.
        if !name.is_empty() && !name.chars().all(|c| c.is_ascii_digit()) {
            out.push(name);
        }
    }
    out
}

/// One query of a dashboard: a panel target's `expr`, or a query variable's `label_values(...)`.
struct Query {
    place: String,
    expr: String,
    /// For `label_values(selector, label)`: the label whose values the variable lists.
    label_values: Option<String>,
}

fn queries(dashboard: &Dashboard) -> Vec<Query> {
    let mut out = Vec::new();
    for panel in panels(&dashboard.json) {
        for target in panel["targets"].as_array().map(Vec::as_slice).unwrap_or_default() {
            out.push(Query {
                place: format!(
                    "{}: panel {} \"{}\", target {}",
                    dashboard.file,
                    panel["id"],
                    panel["title"].as_str().unwrap_or_default(),
                    target["refId"].as_str().unwrap_or_default()
                ),
                expr: target["expr"].as_str().unwrap_or_default().to_owned(),
                label_values: None,
            });
        }
    }
    for variable in variables(&dashboard.json).iter().filter(|v| v["type"] == "query") {
        let query = variable["query"]["query"].as_str().or_else(|| variable["query"].as_str()).unwrap_or_default();
        let place = format!("{}: variable {}", dashboard.file, variable["name"].as_str().unwrap_or_default());
        let Some(args) = query.trim().strip_prefix("label_values(").and_then(|q| q.strip_suffix(')')) else {
            out.push(Query { place, expr: query.to_owned(), label_values: Some(String::new()) });
            continue;
        };
        let (selector, label) = split_last_argument(args);
        out.push(Query { place, expr: selector.trim().to_owned(), label_values: Some(label.trim().to_owned()) });
    }
    out
}

/// `tokex_x{a=~"b,c"}, model` → (`tokex_x{a=~"b,c"}`, `model`): the last comma outside quotes and brackets.
fn split_last_argument(args: &str) -> (&str, &str) {
    let (mut depth, mut quote, mut split) = (0i32, None, None);
    for (i, c) in args.char_indices() {
        match (quote, c) {
            (Some(q), _) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'' | '`') => quote = Some(c),
            (None, '(' | '{' | '[') => depth += 1,
            (None, ')' | '}' | ']') => depth -= 1,
            (None, ',') if depth == 0 => split = Some(i),
            _ => {}
        }
    }
    match split {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => ("", args),
    }
}

// --- the dashboard files --------------------------------------------------------------------------

fn is_prometheus_datasource(value: &Value) -> bool {
    value["type"] == "prometheus" && value["uid"] == DATASOURCE_UID
}

/// What makes a file importable into any Grafana and every panel usable.
fn structure_problems(dashboard: &Dashboard) -> Vec<String> {
    let d = &dashboard.json;
    let file = &dashboard.file;
    let mut problems = Vec::new();
    let mut problem = |message: String| problems.push(format!("{file}: {message}"));

    if d["title"].as_str().is_none_or(|t| t.trim().is_empty()) {
        problem("no title".to_owned());
    }
    if !d["uid"].as_str().is_some_and(|u| !u.is_empty() && u.len() <= 40) {
        problem(format!("uid {} must be 1 to 40 characters", d["uid"]));
    }
    if !d["schemaVersion"].as_u64().is_some_and(|v| (36..=41).contains(&v)) {
        problem(format!("schemaVersion {} (expected 36..=41)", d["schemaVersion"]));
    }
    if !d["id"].is_null() {
        problem("`id` must be null so that an import creates a new dashboard".to_owned());
    }
    let inputs = d["__inputs"].as_array().map(Vec::as_slice).unwrap_or_default();
    if !inputs
        .iter()
        .any(|i| i["name"] == "DS_PROMETHEUS" && i["type"] == "datasource" && i["pluginId"] == "prometheus")
    {
        problem("no __inputs entry DS_PROMETHEUS (type datasource, pluginId prometheus)".to_owned());
    }
    let required: BTreeSet<&str> = d["__requires"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|r| r["type"] == "panel")
        .filter_map(|r| r["id"].as_str())
        .collect();

    let defined: BTreeSet<String> = variables(d).iter().filter_map(|v| v["name"].as_str().map(str::to_owned)).collect();
    if !variables(d)
        .iter()
        .any(|v| v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource" && v["query"] == "prometheus")
    {
        problem("no datasource template variable DS_PROMETHEUS (query prometheus)".to_owned());
    }
    for variable in variables(d).iter().filter(|v| v["type"] == "query") {
        if !is_prometheus_datasource(&variable["datasource"]) {
            problem(format!("variable {} does not use the {DATASOURCE_UID} datasource", variable["name"]));
        }
    }
    let known = |name: &str| defined.contains(name) || BUILTIN_VARIABLES.contains(&name);
    for variable in variables(d) {
        for used in variables_in(&variable["query"].to_string()) {
            if !known(&used) {
                problem(format!("variable {} uses ${used}, which is not defined", variable["name"]));
            }
        }
    }

    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(String, [u64; 4])> = Vec::new();
    for panel in panels(d) {
        let name = format!("panel {} \"{}\"", panel["id"], panel["title"].as_str().unwrap_or_default());
        match panel["id"].as_u64() {
            Some(id) if ids.insert(id) => {}
            Some(id) => problem(format!("panel id {id} is used twice")),
            None => problem(format!("{name}: no numeric id")),
        }
        if panel["title"].as_str().is_none_or(|t| t.trim().is_empty()) {
            problem(format!("{name}: no title"));
        }
        let kind = panel["type"].as_str().unwrap_or_default();
        if !PANEL_TYPES.contains(&kind) {
            problem(format!("{name}: panel type {kind:?} is not one of {PANEL_TYPES:?}"));
        } else if kind != "row" && !required.contains(kind) {
            problem(format!("{name}: panel type {kind} is not listed in __requires"));
        }
        let grid = ["x", "y", "w", "h"].map(|k| panel["gridPos"][k].as_u64());
        match grid {
            [Some(x), Some(y), Some(w), Some(h)] if w > 0 && h > 0 && x + w <= 24 => {
                for (other, [ox, oy, ow, oh]) in &boxes {
                    if x < ox + ow && *ox < x + w && y < oy + oh && *oy < y + h {
                        problem(format!("{name} overlaps {other}"));
                    }
                }
                boxes.push((name.clone(), [x, y, w, h]));
            }
            _ => problem(format!("{name}: bad gridPos {}", panel["gridPos"])),
        }
        if kind == "row" {
            continue;
        }
        if !is_prometheus_datasource(&panel["datasource"]) {
            problem(format!("{name}: datasource {} is not {{prometheus, {DATASOURCE_UID}}}", panel["datasource"]));
        }
        let targets = panel["targets"].as_array().map(Vec::as_slice).unwrap_or_default();
        if targets.is_empty() {
            problem(format!("{name}: no targets"));
        }
        let mut refs = BTreeSet::new();
        for target in targets {
            let target_name = format!("{name} target {}", target["refId"].as_str().unwrap_or("?"));
            if !target["refId"].as_str().is_some_and(|r| refs.insert(r.to_owned())) {
                problem(format!("{target_name}: missing or repeated refId"));
            }
            if !is_prometheus_datasource(&target["datasource"]) {
                problem(format!(
                    "{target_name}: datasource {} is not {{prometheus, {DATASOURCE_UID}}}",
                    target["datasource"]
                ));
            }
            let expr = target["expr"].as_str().unwrap_or_default();
            if expr.trim().is_empty() {
                problem(format!("{target_name}: no expr"));
            }
            for used in variables_in(expr) {
                if !known(&used) {
                    problem(format!("{target_name}: uses ${used}, which is not defined"));
                }
            }
        }
    }
    problems
}

// --- the queries against a scrape -----------------------------------------------------------------

/// Problems of every query of every dashboard against `schema`, and the families the queries read.
fn query_problems(dashboards: &[Dashboard], schema: &Schema) -> (Vec<String>, BTreeSet<String>) {
    let mut problems = Vec::new();
    let mut families = BTreeSet::new();
    for dashboard in dashboards {
        for query in queries(dashboard) {
            let expr = match promql::parse(&query.expr) {
                Ok(expr) => expr,
                Err(e) => {
                    problems.push(format!("{}: does not parse: {e}", query.place));
                    continue;
                }
            };
            let checked = match &query.label_values {
                None => promql::check(&expr, schema),
                Some(label) => match &expr {
                    promql::Expr::Selector(selector) if !label.is_empty() => {
                        let checked = promql::check_lookup(selector, schema);
                        if checked.problems.is_empty() && !checked.labels.contains(label) {
                            problems.push(format!(
                                "{}: label_values lists `{label}`, which {} lacks (labels: {:?})",
                                query.place, query.expr, checked.labels
                            ));
                        }
                        checked
                    }
                    _ => {
                        problems.push(format!(
                            "{}: expected label_values(<selector>, <label>): {}",
                            query.place, query.expr
                        ));
                        continue;
                    }
                },
            };
            problems.extend(checked.problems.iter().map(|p| format!("{}: {p}\n    in {}", query.place, query.expr)));
            families.extend(checked.families);
        }
    }
    (problems, families)
}

/// Every problem of the dashboards against a scrape: queries, plus gateway metrics no dashboard shows.
fn all_problems(dashboards: &[Dashboard], exposition: &str) -> Vec<String> {
    let schema = Schema::from_exposition(exposition).unwrap_or_else(|e| panic!("the scrape does not parse: {e}"));
    let (mut problems, used) = query_problems(dashboards, &schema);
    for family in schema.families.keys().filter(|f| f.starts_with("tokex_")) {
        if !used.contains(family) {
            problems.push(format!("`{family}` is exported but no dashboard shows it"));
        }
    }
    problems
}

#[test]
fn dashboards_are_importable_grafana_json() {
    let dashboards = load_dashboards();
    let mut problems: Vec<String> = dashboards.iter().flat_map(structure_problems).collect();
    let mut uids = BTreeMap::new();
    for dashboard in &dashboards {
        if let Some(other) = uids.insert(dashboard.json["uid"].to_string(), &dashboard.file) {
            problems.push(format!("{} and {other} share the uid {}", dashboard.file, dashboard.json["uid"]));
        }
    }
    assert!(problems.is_empty(), "dashboard problems:\n{}", problems.join("\n"));
}

#[test]
fn every_dashboard_query_parses() {
    let dashboards = load_dashboards();
    let mut problems = Vec::new();
    let mut count = 0;
    for dashboard in &dashboards {
        for query in queries(dashboard) {
            count += 1;
            if let Err(e) = promql::parse(&query.expr) {
                problems.push(format!("{}: {e}", query.place));
            }
        }
    }
    assert!(problems.is_empty(), "queries that do not parse:\n{}", problems.join("\n"));
    assert!(count > 40, "only {count} queries found: is the extractor reading the panels?");
}

#[test]
fn label_values_arguments_split_at_the_last_top_level_comma() {
    assert_eq!(split_last_argument(r#"tokex_x{a=~"b,c", d="e"}, model"#), (r#"tokex_x{a=~"b,c", d="e"}"#, " model"));
    assert_eq!(split_last_argument("job"), ("", "job"));
    assert_eq!(
        variables_in(r#"x{a=~"$model", b="${DS_PROMETHEUS}"}[$__rate_interval] "$1""#),
        ["model", "DS_PROMETHEUS", "__rate_interval"]
    );
}

// --- the gateway ----------------------------------------------------------------------------------

const MODEL: &str = "gpt-4o-mini";
/// Served only by a key whose chat answers 500: failovers, an open circuit, a risk-control pause.
const FAILING_MODEL: &str = "gpt-4o";
/// Served only by a key that answers 429: a cooldown.
const LIMITED_MODEL: &str = "gpt-4.1";
/// Served only by a platform fallback key.
const FALLBACK_MODEL: &str = "gpt-4.1-mini";
const GOOD_KEY: &str = "sk-mock-dashboards-good-0123456789";
const FAILING_KEY: &str = "sk-mock-fail500-dashboards-0123456789";
const LIMITED_KEY: &str = "sk-mock-fail429-retry1-dashboards-0123456789";
const FALLBACK_KEY: &str = "sk-mock-dashboards-fallback-0123456789";

/// A webhook endpoint that accepts every delivery.
async fn webhook_receiver() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let app = axum::Router::new().route("/hook", axum::routing::post(|| async { StatusCode::NO_CONTENT }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the webhook receiver");
    let addr = listener.local_addr().expect("its address");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, task)
}

/// Sets up keys of every kind, sends traffic that exercises each of them, and returns the gateway.
async fn busy_gateway(env: &TestEnv) -> (Gateway, tokio::task::JoinHandle<()>) {
    let buyer = env.seller_and_buyer().await;
    env.add_seller_key("seller", GOOD_KEY, &[MODEL], 1_000_000_000).await;
    env.add_seller_key("seller", FAILING_KEY, &[FAILING_MODEL], 1_000_000_000).await;
    env.add_seller_key("seller", LIMITED_KEY, &[LIMITED_MODEL], 1_000_000_000).await;
    env.set_price(FALLBACK_MODEL, common::TEST_PROMPT_PRICE, common::TEST_COMPLETION_PRICE).await;
    env.create_user_without_credits("ops", &["admin"]).await;
    let gateway = env
        .start_gateway_with(&[
            ("TOKEX_ROUTING_CIRCUIT_FAILURES", "3"),
            ("TOKEX_ROUTING_COOLDOWN_MAX_MS", "1500"),
            ("TOKEX_RISK_CHECK_INTERVAL_MS", "1000"),
            ("TOKEX_RISK_SETTLE_DELAY_MS", "500"),
            ("TOKEX_RISK_FAILURE_MIN_ATTEMPTS", "3"),
            ("TOKEX_RISK_FAILURE_PAUSE_BPS", "5000"),
        ])
        .await;

    let admin = gateway.login("ops").await;
    let fallback = json!({
        "name": "dashboards fallback",
        "provider": "openai",
        "base_url": env.mock.base_url(),
        "models": [FALLBACK_MODEL],
        "api_key": FALLBACK_KEY,
        "priority": 1,
    });
    let reply = gateway.admin(Method::POST, "/api/v1/admin/fallback-keys", &admin, Some(&fallback)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let (hook, receiver) = webhook_receiver().await;
    let seller = gateway.login("seller").await;
    let url = format!("http://{hook}/hook");
    let reply = gateway.admin(Method::PUT, "/api/v1/seller/webhook", &seller, Some(&json!({ "url": url }))).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    for stream in [false, true, false, true] {
        let reply = gateway.chat(&buyer.key, MODEL, 5, stream).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    for stream in [false, true] {
        let reply = gateway.chat(&buyer.key, FALLBACK_MODEL, 3, stream).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    let reply = gateway.chat(&buyer.key, LIMITED_MODEL, 3, false).await;
    assert!(reply.status.is_server_error(), "{}", reply.text());
    // Three failures open the circuit (and are three failed attempts for risk control); the fourth
    // request finds no key to try.
    for _ in 0..4 {
        let reply = gateway.chat(&buyer.key, FAILING_MODEL, 3, false).await;
        assert!(reply.status.is_server_error(), "{}", reply.text());
    }
    let reply = gateway.chat("tkx-not-a-key", MODEL, 3, false).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    (gateway, receiver)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_only_use_metrics_and_labels_the_gateway_exports() {
    common::run_with_timeout(async {
        let dashboards = load_dashboards();
        let env = TestEnv::new(Backend::Sqlite).await;
        let (gateway, receiver) = busy_gateway(&env).await;

        // Risk checks, the pause, the notification and its delivery follow the traffic within seconds.
        let deadline = Instant::now() + SCRAPE_WAIT;
        let (exposition, problems) = loop {
            let exposition = gateway.metrics().await;
            let problems = all_problems(&dashboards, &exposition);
            if problems.is_empty() || Instant::now() >= deadline {
                break (exposition, problems);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        assert!(
            problems.is_empty(),
            "the dashboards do not match what the gateway exports ({} problems):\n{}\n\n\
             A metric missing from the scrape was renamed, removed, or has no samples yet: a labelled family \
             appears only once something increments it (extend busy_gateway if a new panel reads a new one).\n\
             The scrape:\n{exposition}",
            problems.len(),
            problems.join("\n")
        );

        // The checker has teeth: a renamed metric, a renamed label and a misspelt bucket are each caught.
        for (from, to, expect) in [
            ("tokex_requests_total{", "tokex_request_total{", "`tokex_request_total` is not a series"),
            (
                "sum by (model) (rate(tokex_credits_spent_total",
                "sum by (modle) (rate(tokex_credits_spent_total",
                "no label `modle`",
            ),
            ("le=\\\"1\\\"", "le=\\\"1.0\\\"", "no bucket le=\"1.0\""),
            ("status=\\\"paused\\\"", "state=\\\"paused\\\"", "has no label `state`"),
            ("tokex_holds_open{", "tokex_holds_opened{", "`tokex_holds_opened` is not a series"),
        ] {
            let mutated: Vec<Dashboard> = dashboards
                .iter()
                .map(|d| {
                    let text = serde_json::to_string(&d.json).unwrap().replacen(from, to, 1);
                    Dashboard { file: d.file.clone(), json: serde_json::from_str(&text).unwrap() }
                })
                .collect();
            let found = all_problems(&mutated, &exposition);
            assert!(
                found.iter().any(|p| p.contains(expect)),
                "replacing {from} with {to} must be reported ({expect}); got {found:#?}"
            );
        }
        drop(gateway);
        receiver.abort();
    })
    .await;
}
