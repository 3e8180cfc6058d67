//! Reports, time series and CSV exports end to end (docs/reports.md): real traffic through the gateway
//! against the mock upstream, then every figure of the reports is compared with the usage records the
//! gateway wrote; the exports are parsed back; each user sees only their own data; parameters and roles
//! are checked.

// A failed expectation is how a test fails; clippy counts only #[test] fns as tests.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[macro_use]
mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use common::{expected_seller_share, Backend, BuyerKeyOptions, Gateway, Reply, StatusCode, TestEnv, UsageRecord};
use reqwest::Method;
use serde_json::{json, Value};

const MODEL_A: &str = "gpt-4o-mini";
const MODEL_B: &str = "gpt-4o";
/// A model nobody serves (the request is refused with 404 and recorded with this name): quotes, a comma
/// and a leading `=` exercise the CSV quoting and the formula guard.
const ODD_MODEL: &str = "=odd,\"model\"";
const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;
const MEMO: &str = "top-up, \"Q3\"";

backend_tests!(reports_series_and_exports_agree_with_the_usage_records, exports_page_through_many_records);

#[path = "../bench/analytics/bench.rs"]
mod bench;

async fn call(gateway: &Gateway, path: &str, token: &str) -> Reply {
    gateway.admin(Method::GET, path, token, None).await
}

fn ok(reply: &Reply) -> Value {
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()
}

fn assert_error(reply: &Reply, status: StatusCode, code: &str) {
    assert_eq!(reply.status, status, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
}

/// RFC 4180: fields separated by commas, lines by CRLF, quoted fields with doubled quotes.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    assert!(text.ends_with("\r\n"), "the file ends with CRLF: {text:?}");
    let (mut rows, mut row, mut field) = (Vec::new(), Vec::new(), String::new());
    let (mut quoted, mut was_quoted) = (false, false);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                c => field.push(c),
            }
            continue;
        }
        match c {
            '"' => {
                assert!(field.is_empty() && !was_quoted, "a quote inside an unquoted field: {text:?}");
                quoted = true;
                was_quoted = true;
            }
            ',' => {
                row.push(std::mem::take(&mut field));
                was_quoted = false;
            }
            '\r' => {
                assert_eq!(chars.next(), Some('\n'), "CR without LF");
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
                was_quoted = false;
            }
            '\n' => panic!("a bare LF ends a line: {text:?}"),
            c => field.push(c),
        }
    }
    assert!(!quoted, "an unterminated quoted field");
    rows
}

/// The CSV answer as one map per row (header name -> field), with its header row.
fn csv_rows(reply: &Reply, file: &str) -> (Vec<String>, Vec<HashMap<String, String>>) {
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.headers["content-type"], "text/csv; charset=utf-8");
    let disposition = reply.headers["content-disposition"].to_str().unwrap();
    assert_eq!(disposition, format!("attachment; filename=\"{file}\""));
    let mut rows = parse_csv(&reply.text());
    let header = rows.remove(0);
    for row in &rows {
        assert_eq!(row.len(), header.len(), "{row:?}");
    }
    let maps = rows.into_iter().map(|row| header.iter().cloned().zip(row).collect()).collect();
    (header, maps)
}

fn paid(r: &UsageRecord) -> i64 {
    r.cost_credits - r.unpaid_credits
}

fn sum(records: &[&UsageRecord], f: impl Fn(&UsageRecord) -> i64) -> i64 {
    records.iter().map(|r| f(r)).sum()
}

fn total_points(series: &Value, field: &str) -> i64 {
    series["points"].as_array().unwrap().iter().map(|p| p[field].as_i64().unwrap()).sum()
}

/// Asserts a dense series: consecutive buckets of `bucket` ms from `from`, the last one containing `to`.
fn assert_dense(series: &Value, bucket: i64) {
    let points = series["points"].as_array().unwrap();
    let (from, to) = (series["from"].as_i64().unwrap(), series["to"].as_i64().unwrap());
    assert_eq!(from % bucket, 0, "{series}");
    for (i, p) in points.iter().enumerate() {
        assert_eq!(p["t"].as_i64().unwrap(), from + i as i64 * bucket, "{series}");
    }
    let last = points.last().unwrap()["t"].as_i64().unwrap();
    assert!(last <= to && to < last + bucket, "{series}");
}

async fn reports_series_and_exports_agree_with_the_usage_records(backend: Backend) {
    let env = TestEnv::new(backend).await;
    env.migrate().await;
    env.create_user_without_credits("boss", &["admin"]).await;
    let seller_id = env.create_user("seller", &["seller"]).await;
    let buyer_id = env.create_user("buyer", &["buyer"]).await;
    // Buys and sells: both halves of the user report, each with its own data only.
    let both_id = env.create_user("both", &["buyer", "seller"]).await;
    let seller_key = env.add_seller_key("seller", "sk-seller-a", &[MODEL_A, MODEL_B], 1_000_000_000).await;
    let idle_key = env.add_seller_key("seller", "sk-seller-idle", &["gpt-4.1-mini"], 1_000_000_000).await;
    let both_key = env.add_seller_key("both", "sk-both", &[MODEL_B], 1_000_000_000).await;
    let main = env.issue_buyer_key("buyer", BuyerKeyOptions { name: Some("main"), ..Default::default() }).await;
    let batch = env.issue_buyer_key("buyer", BuyerKeyOptions { name: Some("batch, jobs"), ..Default::default() }).await;
    let both_buyer_key = env.issue_buyer_key("both", BuyerKeyOptions::default()).await;
    let gateway = env.start_gateway().await;
    let admin = gateway.login("boss").await;
    let buyer = gateway.login("buyer").await;
    let both = gateway.login("both").await;
    let seller = gateway.login("seller").await;

    // A grant with a memo to quote in the transactions export, and an escrow for `both`.
    let grant = gateway
        .admin(
            Method::POST,
            &format!("/api/v1/admin/users/{buyer_id}/credits"),
            &admin,
            Some(&json!({"amount": 1_000, "memo": MEMO})),
        )
        .await;
    assert_eq!(grant.status, StatusCode::OK, "{}", grant.text());
    let escrow = gateway.admin(Method::POST, "/api/v1/buyer/escrows", &both, Some(&json!({"amount": 5_000_000}))).await;
    assert_eq!(escrow.status, StatusCode::CREATED, "{}", escrow.text());
    let escrow_id = escrow.json()["id"].as_i64().unwrap();

    // Traffic: stream and non-stream, two models, two buyer keys, and a refused request.
    let mut sent = 0;
    for (key, model, tokens, stream) in [
        (&main.key, MODEL_A, 5, false),
        (&main.key, MODEL_A, 7, true),
        (&main.key, MODEL_B, 3, false),
        (&batch.key, MODEL_A, 4, true),
        (&batch.key, MODEL_B, 9, false),
        (&both_buyer_key.key, MODEL_B, 6, false),
        (&both_buyer_key.key, MODEL_A, 2, true),
    ] {
        let reply = gateway.chat(key, model, tokens, stream).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        sent += 1;
    }
    let refused = gateway.chat(&main.key, ODD_MODEL, 2, false).await;
    assert_eq!(refused.status, StatusCode::NOT_FOUND, "{}", refused.text());
    let records = env.wait_exact_usage_records(sent + 1).await;
    let all: Vec<&UsageRecord> = records.iter().collect();
    let of_buyer = |id: i64| records.iter().filter(|r| r.buyer_id == id).collect::<Vec<_>>();
    let served_by = |keys: &[i64]| {
        records.iter().filter(|r| r.hosted_key_id.is_some_and(|k| keys.contains(&k))).collect::<Vec<_>>()
    };
    assert!(records.iter().all(|r| r.unpaid_credits == 0), "{records:#?}");
    assert_eq!(of_buyer(both_id).len(), 2);

    // A dispute of the escrow: the platform report counts it.
    let dispute = gateway
        .admin(
            Method::POST,
            "/api/v1/buyer/disputes",
            &both,
            Some(&json!({"escrow_id": escrow_id, "reason": "not what I paid for"})),
        )
        .await;
    assert_eq!(dispute.status, StatusCode::CREATED, "{}", dispute.text());

    // --- the platform report
    let report = ok(&call(&gateway, "/api/v1/analytics/platform", &admin).await);
    assert_eq!(report["window_days"], 7, "{report}");
    assert_eq!(
        report["orders"],
        json!({"total": 1, "active": 1, "completed": 0, "disputed": 1, "dispute_rate_bps": 10_000})
    );
    assert_eq!(report["recent"]["requests"].as_i64(), Some(all.len() as i64), "{report}");
    assert_eq!(report["recent"]["volume_credits"].as_i64(), Some(sum(&all, paid)), "{report}");
    assert_eq!(
        report["recent"]["tokens"].as_i64(),
        Some(sum(&all, |r| r.prompt_tokens + r.completion_tokens)),
        "{report}"
    );
    let platform_share = sum(&all, |r| paid(r) - expected_seller_share(paid(r)));
    assert_eq!(report["recent"]["platform_credits"].as_i64(), Some(platform_share), "{report}");
    assert!(report["recent"]["transactions"].as_i64().unwrap() >= sent as i64, "{report}");
    assert_eq!(report["keys"], json!({"active": 3, "by_status": {"active": 3}}), "{report}");
    assert_eq!(report["fallback"], json!({"requests": 0, "total_requests": all.len(), "share_bps": 0}));
    assert_eq!(report["disputes"], json!({"open": 1, "refunded": 0, "rejected": 0, "refunded_credits": 0}));
    let by_model = report["by_model"].as_array().unwrap();
    assert_eq!(by_model.len(), 3, "{report}");
    for row in by_model {
        let model = row["model"].as_str().unwrap();
        let of_model: Vec<&UsageRecord> = records.iter().filter(|r| r.model == model).collect();
        let expected = json!({
            "model": model,
            "requests": of_model.len(),
            "failed_requests": of_model.iter().filter(|r| r.status_code >= 400).count(),
            "prompt_tokens": sum(&of_model, |r| r.prompt_tokens),
            "completion_tokens": sum(&of_model, |r| r.completion_tokens),
            "cost_credits": sum(&of_model, |r| r.cost_credits),
            "platform_credits": sum(&of_model, |r| paid(r) - expected_seller_share(paid(r))),
            "fallback_requests": 0,
        });
        assert_eq!(row, &expected);
    }
    let requests: Vec<i64> = by_model.iter().map(|m| m["requests"].as_i64().unwrap()).collect();
    assert!(requests.windows(2).all(|w| w[0] >= w[1]), "by requests, most first: {requests:?}");
    assert_eq!(by_model[2]["model"], ODD_MODEL);
    assert_eq!(by_model[2]["failed_requests"], 1);

    // --- user reports
    let mine = ok(&call(&gateway, "/api/v1/analytics/user", &buyer).await);
    assert_eq!(mine["seller"], Value::Null, "{mine}");
    let bought = of_buyer(buyer_id);
    let report = &mine["buyer"];
    assert_eq!(report["spent_credits"].as_i64(), Some(sum(&bought, paid)), "{mine}");
    assert_eq!(report["requests"].as_i64(), Some(bought.len() as i64), "{mine}");
    assert_eq!(report["escrows"], json!([]), "{mine}");
    let by_key = report["by_key"].as_array().unwrap();
    assert_eq!(by_key.len(), 2, "{mine}");
    for row in by_key {
        let key_id = row["buyer_key_id"].as_i64().unwrap();
        let of_key: Vec<&UsageRecord> = bought.iter().copied().filter(|r| r.buyer_key_id == key_id).collect();
        let name = if key_id == main.id { "main" } else { "batch, jobs" };
        let expected = json!({
            "buyer_key_id": key_id,
            "name": name,
            "requests": of_key.len(),
            "prompt_tokens": sum(&of_key, |r| r.prompt_tokens),
            "completion_tokens": sum(&of_key, |r| r.completion_tokens),
            "cost_credits": sum(&of_key, |r| r.cost_credits),
        });
        assert_eq!(row, &expected);
    }
    let models: BTreeSet<&str> =
        report["by_model"].as_array().unwrap().iter().map(|m| m["model"].as_str().unwrap()).collect();
    assert_eq!(models, BTreeSet::from([MODEL_A, MODEL_B, ODD_MODEL]));
    for row in report["by_model"].as_array().unwrap() {
        let of_model: Vec<&UsageRecord> = bought.iter().copied().filter(|r| r.model == row["model"]).collect();
        assert_eq!(row["requests"].as_i64(), Some(of_model.len() as i64));
        assert_eq!(row["cost_credits"].as_i64(), Some(sum(&of_model, |r| r.cost_credits)));
        assert_eq!(row["completion_tokens"].as_i64(), Some(sum(&of_model, |r| r.completion_tokens)));
    }

    // The seller: every key, the idle one with zeros; earnings are the seller's share of what was paid.
    let theirs = ok(&call(&gateway, "/api/v1/analytics/user", &seller).await);
    assert_eq!(theirs["buyer"], Value::Null, "{theirs}");
    let served = served_by(&[seller_key]);
    let earned = sum(&served, |r| expected_seller_share(paid(r)));
    assert!(earned > 0);
    assert_eq!(theirs["seller"]["earned_credits"].as_i64(), Some(earned), "{theirs}");
    assert_eq!(theirs["seller"]["earned_last_7_days"].as_i64(), Some(earned), "{theirs}");
    assert_eq!(theirs["seller"]["requests"].as_i64(), Some(served.len() as i64), "{theirs}");
    let keys = theirs["seller"]["keys"].as_array().unwrap();
    assert_eq!(keys.iter().map(|k| k["id"].as_i64().unwrap()).collect::<Vec<_>>(), [seller_key, idle_key]);
    let (used, idle) = (&keys[0], &keys[1]);
    assert_eq!(used["requests"].as_i64(), Some(served.len() as i64), "{used}");
    assert_eq!(used["earned_credits"].as_i64(), Some(earned), "{used}");
    assert_eq!(used["success_count"].as_i64(), Some(served.len() as i64), "{used}");
    assert_eq!(used["prompt_tokens"].as_i64(), Some(sum(&served, |r| r.prompt_tokens)), "{used}");
    assert!(used["last_used_at_ms"].as_i64().is_some(), "{used}");
    assert_eq!((used["status"].as_str(), used["provider"].as_str()), (Some("active"), Some("openai")), "{used}");
    assert_eq!(
        (idle["requests"].as_i64(), idle["earned_credits"].as_i64(), &idle["last_used_at_ms"]),
        (Some(0), Some(0), &Value::Null),
        "{idle}"
    );

    // Buyer and seller at once: each half has only that user's data.
    let report = ok(&call(&gateway, "/api/v1/analytics/user", &both).await);
    let bought_both = of_buyer(both_id);
    assert_eq!(report["buyer"]["requests"].as_i64(), Some(2), "{report}");
    assert_eq!(report["buyer"]["spent_credits"].as_i64(), Some(sum(&bought_both, paid)), "{report}");
    let escrows = report["buyer"]["escrows"].as_array().unwrap();
    assert_eq!(escrows.len(), 1, "{report}");
    assert_eq!((escrows[0]["id"].as_i64(), escrows[0]["amount"].as_i64()), (Some(escrow_id), Some(5_000_000)));
    // Both requests were paid from the escrow's holds.
    assert_eq!(escrows[0]["spent"].as_i64(), Some(sum(&bought_both, paid)), "{report}");
    assert!(escrows[0]["remaining"].as_i64().unwrap() <= 5_000_000 - sum(&bought_both, paid), "{report}");
    let served_both = served_by(&[both_key]);
    assert_eq!(report["seller"]["requests"].as_i64(), Some(served_both.len() as i64), "{report}");
    assert_eq!(report["seller"]["keys"].as_array().unwrap().len(), 1, "{report}");
    // A range that ends before the traffic: nothing.
    let early = ok(&call(&gateway, "/api/v1/analytics/user?from=0&to=1000", &buyer).await);
    assert_eq!(
        (early["buyer"]["requests"].as_i64(), early["buyer"]["by_key"].as_array().map(Vec::len)),
        (Some(0), Some(0))
    );

    // --- time series
    let hourly = ok(&call(&gateway, "/api/v1/analytics/timeseries?granularity=hour", &admin).await);
    assert_eq!((hourly["scope"].as_str(), hourly["granularity"].as_str()), (Some("platform"), Some("hour")));
    assert_eq!(hourly["model"], Value::Null);
    assert_dense(&hourly, HOUR);
    assert_eq!(hourly["points"].as_array().unwrap().len(), 49, "48 hours back, both ends' buckets");
    assert_eq!(total_points(&hourly, "requests"), all.len() as i64);
    assert_eq!(total_points(&hourly, "prompt_tokens"), sum(&all, |r| r.prompt_tokens));
    assert_eq!(total_points(&hourly, "completion_tokens"), sum(&all, |r| r.completion_tokens));
    assert_eq!(total_points(&hourly, "spend_credits"), sum(&all, |r| r.cost_credits));
    assert_eq!(total_points(&hourly, "earnings_credits"), platform_share);
    let empty = hourly["points"].as_array().unwrap().iter().filter(|p| p["requests"] == 0).count();
    assert!(empty >= 47, "empty hours are zeros: {hourly}");
    let now = common::now_ms();
    let daily = ok(&call(
        &gateway,
        &format!("/api/v1/analytics/timeseries?granularity=day&from={}&to={now}&model={MODEL_A}", now - 3 * DAY),
        &admin,
    )
    .await);
    assert_dense(&daily, DAY);
    assert_eq!(daily["points"].as_array().unwrap().len(), 4, "{daily}");
    assert_eq!(daily["model"], MODEL_A);
    let of_a: Vec<&UsageRecord> = records.iter().filter(|r| r.model == MODEL_A).collect();
    assert_eq!(total_points(&daily, "requests"), of_a.len() as i64);
    assert_eq!(total_points(&daily, "spend_credits"), sum(&of_a, |r| r.cost_credits));
    // Buyers default to their own requests, sellers to what their keys served.
    let own = ok(&call(&gateway, "/api/v1/analytics/timeseries?granularity=hour", &buyer).await);
    assert_eq!(own["scope"], "buyer");
    assert_eq!(total_points(&own, "requests"), bought.len() as i64);
    assert_eq!(total_points(&own, "spend_credits"), sum(&bought, |r| r.cost_credits));
    assert_eq!(total_points(&own, "earnings_credits"), 0);
    let sold = ok(&call(&gateway, "/api/v1/analytics/timeseries?granularity=day", &seller).await);
    assert_eq!((sold["scope"].as_str(), sold["points"].as_array().map(Vec::len)), (Some("seller"), Some(31)));
    assert_eq!(total_points(&sold, "requests"), served.len() as i64);
    assert_eq!(total_points(&sold, "earnings_credits"), earned);
    let as_seller = ok(&call(&gateway, "/api/v1/analytics/timeseries?granularity=hour&scope=seller", &both).await);
    assert_eq!(total_points(&as_seller, "requests"), served_both.len() as i64);
    let as_buyer = ok(&call(&gateway, "/api/v1/analytics/timeseries?granularity=hour", &both).await);
    assert_eq!((as_buyer["scope"].as_str(), total_points(&as_buyer, "requests")), (Some("buyer"), 2));

    // --- CSV exports
    let (header, rows) = csv_rows(&call(&gateway, "/api/v1/exports/usage.csv", &admin).await, "usage.csv");
    assert_eq!(
        header.join(","),
        "request_id,created_at_ms,model,endpoint,buyer_id,buyer_key_id,hosted_key_id,status_code,prompt_tokens,\
         completion_tokens,estimated,cost_credits,unpaid_credits,fallback,attempts,latency_ms,ttft_ms"
    );
    assert_eq!(rows.len(), records.len());
    for (row, record) in rows.iter().zip(&records) {
        assert_eq!(row["request_id"], record.request_id);
        assert_eq!(row["created_at_ms"], record.created_at_ms.to_string());
        assert_eq!(row["cost_credits"], record.cost_credits.to_string());
        assert_eq!(row["prompt_tokens"], record.prompt_tokens.to_string());
        assert_eq!(row["status_code"], record.status_code.to_string());
        assert_eq!(row["hosted_key_id"], record.hosted_key_id.map(|k| k.to_string()).unwrap_or_default());
        assert_eq!(row["ttft_ms"], record.ttft_ms.map(|k| k.to_string()).unwrap_or_default());
        assert_eq!(row["fallback"], "false");
        // Caller text that a spreadsheet would run as a formula gets a leading quote; the rest is verbatim.
        let model = if record.model.starts_with('=') { format!("'{}", record.model) } else { record.model.clone() };
        assert_eq!(row["model"], model);
    }
    assert!(rows.iter().any(|r| r["model"] == format!("'{ODD_MODEL}")), "the odd model parses back");
    // Isolation: a buyer's export has their requests only, a seller's those their keys served.
    let ids = |rows: &[HashMap<String, String>]| rows.iter().map(|r| r["request_id"].clone()).collect::<BTreeSet<_>>();
    let expect = |records: &[&UsageRecord]| records.iter().map(|r| r.request_id.clone()).collect::<BTreeSet<_>>();
    let (_, mine) = csv_rows(&call(&gateway, "/api/v1/exports/usage.csv", &buyer).await, "usage.csv");
    assert_eq!(ids(&mine), expect(&bought));
    let (_, theirs) = csv_rows(&call(&gateway, "/api/v1/exports/usage.csv", &seller).await, "usage.csv");
    assert_eq!(ids(&theirs), expect(&served));
    let (_, as_seller) = csv_rows(&call(&gateway, "/api/v1/exports/usage.csv?scope=seller", &both).await, "usage.csv");
    assert_eq!(ids(&as_seller), expect(&served_both));
    let first = records[2].created_at_ms;
    let (_, later) =
        csv_rows(&call(&gateway, &format!("/api/v1/exports/usage.csv?from={first}"), &admin).await, "usage.csv");
    assert_eq!(ids(&later), expect(&all.iter().copied().filter(|r| r.created_at_ms >= first).collect::<Vec<_>>()));

    // Transactions: the buyer's wallet, escrow and hold postings only; the memo parses back.
    let db = env.connect_db().await;
    let owned = |user: i64| {
        let db = db.clone();
        async move {
            use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
            use token_exchange::db::entities::accounts;
            accounts::Entity::find()
                .filter(accounts::Column::OwnerId.eq(user))
                .all(&db)
                .await
                .unwrap()
                .into_iter()
                .map(|a| (a.id.to_string(), a.kind))
                .collect::<BTreeMap<_, _>>()
        }
    };
    let (header, postings) =
        csv_rows(&call(&gateway, "/api/v1/exports/transactions.csv", &buyer).await, "transactions.csv");
    assert_eq!(
        header.join(","),
        "posting_id,entry_id,created_at_ms,kind,request_id,account_id,account_kind,amount,memo"
    );
    let accounts = owned(buyer_id).await;

    for p in &postings {
        assert_eq!(accounts.get(&p["account_id"]), Some(&p["account_kind"]), "{p:?}");
        assert!(["wallet", "escrow", "hold"].contains(&p["account_kind"].as_str()), "{p:?}");
    }
    assert!(postings.iter().any(|p| p["kind"] == "grant" && p["memo"] == MEMO && p["amount"] == "1000"));
    // Settle entries are per usage writer batch: the buyer's hold debits in them add up to what the billed
    // requests paid.
    let settled: i64 =
        postings.iter().filter(|p| p["kind"] == "settle").map(|p| p["amount"].parse::<i64>().unwrap()).sum();
    let billed: i64 = bought.iter().map(|r| r.cost_credits - r.unpaid_credits).sum();
    assert!(billed > 0);
    assert_eq!(settled, -billed);
    // The seller's wallet: their earnings, nothing of the buyers'.
    let (_, earnings) =
        csv_rows(&call(&gateway, "/api/v1/exports/transactions.csv", &seller).await, "transactions.csv");
    let seller_accounts = owned(seller_id).await;
    assert!(!earnings.is_empty());
    for p in &earnings {
        assert_eq!(seller_accounts.get(&p["account_id"]).map(String::as_str), Some("wallet"), "{p:?}");
    }
    let settled_total: i64 =
        earnings.iter().filter(|p| p["kind"] == "settle").map(|p| p["amount"].parse::<i64>().unwrap()).sum();
    assert_eq!(settled_total, earned);
    let (_, everything) =
        csv_rows(&call(&gateway, "/api/v1/exports/transactions.csv", &admin).await, "transactions.csv");
    assert!(everything.len() > postings.len() + earnings.len());
    let balance: i64 = everything.iter().map(|p| p["amount"].parse::<i64>().unwrap()).sum();
    assert_eq!(balance, 0, "all postings sum to zero");

    // --- parameters and roles
    for (path, token, status, code) in [
        ("/api/v1/analytics/platform", &buyer, StatusCode::FORBIDDEN, "forbidden"),
        ("/api/v1/analytics/platform?days=0", &admin, StatusCode::BAD_REQUEST, "invalid_request"),
        ("/api/v1/analytics/platform?days=91", &admin, StatusCode::BAD_REQUEST, "invalid_request"),
        ("/api/v1/analytics/platform?window=3", &admin, StatusCode::BAD_REQUEST, "invalid_request"),
        ("/api/v1/analytics/user", &admin, StatusCode::FORBIDDEN, "forbidden"),
        ("/api/v1/analytics/user?from=10&to=5", &buyer, StatusCode::BAD_REQUEST, "invalid_request"),
        ("/api/v1/analytics/timeseries", &buyer, StatusCode::BAD_REQUEST, "invalid_request"),
        ("/api/v1/analytics/timeseries?granularity=week", &buyer, StatusCode::BAD_REQUEST, "invalid_request"),
        ("/api/v1/analytics/timeseries?granularity=hour&scope=all", &admin, StatusCode::BAD_REQUEST, "invalid_request"),
        (
            "/api/v1/analytics/timeseries?granularity=hour&from=10&to=5",
            &admin,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        ("/api/v1/analytics/timeseries?granularity=hour&from=0", &admin, StatusCode::BAD_REQUEST, "invalid_request"),
        ("/api/v1/analytics/timeseries?granularity=hour&from=-5", &admin, StatusCode::BAD_REQUEST, "invalid_request"),
        ("/api/v1/analytics/timeseries?granularity=hour&scope=platform", &buyer, StatusCode::FORBIDDEN, "forbidden"),
        ("/api/v1/analytics/timeseries?granularity=hour&scope=seller", &buyer, StatusCode::FORBIDDEN, "forbidden"),
        ("/api/v1/analytics/timeseries?granularity=hour&scope=buyer", &seller, StatusCode::FORBIDDEN, "forbidden"),
        ("/api/v1/analytics/timeseries?granularity=hour&scope=buyer", &admin, StatusCode::FORBIDDEN, "forbidden"),
        ("/api/v1/exports/usage.csv?scope=platform", &buyer, StatusCode::FORBIDDEN, "forbidden"),
        ("/api/v1/exports/usage.csv?scope=seller", &buyer, StatusCode::FORBIDDEN, "forbidden"),
        ("/api/v1/exports/transactions.csv?from=9&to=1", &buyer, StatusCode::BAD_REQUEST, "invalid_request"),
        ("/api/v1/exports/transactions.csv?scope=platform", &seller, StatusCode::FORBIDDEN, "forbidden"),
        ("/api/v1/analytics/user", &"not-a-token".to_string(), StatusCode::UNAUTHORIZED, "unauthorized"),
    ] {
        assert_error(&call(&gateway, path, token).await, status, code);
    }
    // The most buckets a series may have.
    let span = format!("/api/v1/analytics/timeseries?granularity=hour&from={}&to={now}", now - 1_999 * HOUR);
    assert_eq!(ok(&call(&gateway, &span, &admin).await)["points"].as_array().unwrap().len(), 2_000);
}

/// More records than one export page: every row exactly once, in id order, across pages.
async fn exports_page_through_many_records(backend: Backend) {
    let env = TestEnv::new(backend).await;
    env.migrate().await;
    env.create_user_without_credits("boss", &["admin"]).await;
    let buyer_id = env.create_user_without_credits("buyer", &["buyer"]).await;
    let gateway = env.start_gateway().await;
    let admin = gateway.login("boss").await;
    let buyer = gateway.login("buyer").await;
    const N: i64 = 2_345;
    let values: Vec<String> = (0..N)
        .map(|i| {
            // Every third record is another buyer's.
            let owner = if i % 3 == 0 { buyer_id + 1000 } else { buyer_id };
            format!(
                "('bulk-{i:05}', {owner}, 1, NULL, 'm,{}', 'chat.completions', {i}, 1, FALSE, 200, 1, 5, NULL, 1, 1, \
                 FALSE, NULL, {}, 0, 0, NULL, FALSE)",
                i % 4,
                1_000 + i
            )
        })
        .collect();
    env.execute_sql(&format!(
        "INSERT INTO usage_records (request_id, buyer_id, buyer_key_id, hosted_key_id, model, endpoint, \
         prompt_tokens, completion_tokens, estimated, status_code, attempts, latency_ms, ttft_ms, request_bytes, \
         response_bytes, client_disconnected, error_kind, created_at_ms, cost_credits, unpaid_credits, hold_id, \
         fallback) VALUES {}",
        values.join(", ")
    ))
    .await;
    let (_, rows) = csv_rows(&call(&gateway, "/api/v1/exports/usage.csv", &admin).await, "usage.csv");
    let ids: Vec<String> = rows.iter().map(|r| r["request_id"].clone()).collect();
    let expected: Vec<String> = (0..N).map(|i| format!("bulk-{i:05}")).collect();
    assert_eq!(ids, expected);
    assert!(rows.iter().all(|r| r["model"].starts_with("m,")));
    let (_, mine) = csv_rows(&call(&gateway, "/api/v1/exports/usage.csv", &buyer).await, "usage.csv");
    let expected: Vec<String> = (0..N).filter(|i| i % 3 != 0).map(|i| format!("bulk-{i:05}")).collect();
    assert_eq!(mine.iter().map(|r| r["request_id"].clone()).collect::<Vec<_>>(), expected);
    // A period: created_at_ms 1,000 + i for i in 1,000..=1,999.
    let (_, period) =
        csv_rows(&call(&gateway, "/api/v1/exports/usage.csv?from=2000&to=2999", &admin).await, "usage.csv");
    assert_eq!(period.len(), 1_000);
    assert_eq!((period[0]["request_id"].as_str(), period[999]["request_id"].as_str()), ("bulk-01000", "bulk-01999"));
    let (_, none) = csv_rows(&call(&gateway, "/api/v1/exports/usage.csv?from=999999", &admin).await, "usage.csv");
    assert!(none.is_empty());
}

/// The figures of docs/reports.md: `bench/analytics/run.sh` runs this with `TOKEX_BENCH_RECORDS` (default
/// 1,000,000) records on `TOKEX_BENCH_BACKENDS` (default `sqlite,mariadb`) and writes the tables to
/// `TOKEX_BENCH_OUT`. Timings are reported, never asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run by bench/analytics/run.sh"]
async fn one_million_usage_records() {
    use sea_orm::ConnectionTrait;
    let n: usize = std::env::var("TOKEX_BENCH_RECORDS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let backends = std::env::var("TOKEX_BENCH_BACKENDS").unwrap_or_else(|_| "sqlite,mariadb".into());
    let mut report = String::new();
    for backend in backends.split(',') {
        match backend.trim() {
            "sqlite" => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}", dir.path().join("bench.db").display());
                let db = token_exchange::db::connect(&url, 4).await.unwrap();
                token_exchange::db::migrate(&db).await.unwrap();
                report.push_str(&bench::run(&db, "SQLite", n).await);
                db.close().await.unwrap();
            }
            "mariadb" => {
                let server =
                    std::env::var("TOKEX_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into());
                let name = format!("tokex_bench_{}", std::process::id());
                let admin = sea_orm::Database::connect(format!("{server}/test")).await.unwrap();
                admin.execute_unprepared(&format!("CREATE DATABASE `{name}`")).await.unwrap();
                let db = token_exchange::db::connect(&format!("{server}/{name}"), 4).await.unwrap();
                token_exchange::db::migrate(&db).await.unwrap();
                report.push_str(&bench::run(&db, "MariaDB", n).await);
                db.close().await.unwrap();
                if std::env::var("TOKEX_BENCH_KEEP").is_err() {
                    admin.execute_unprepared(&format!("DROP DATABASE `{name}`")).await.unwrap();
                } else {
                    eprintln!("kept the MariaDB database {name}");
                }
            }
            other => panic!("unknown backend {other:?} in TOKEX_BENCH_BACKENDS"),
        }
    }
    eprintln!("{report}");
    if let Ok(path) = std::env::var("TOKEX_BENCH_OUT") {
        std::fs::write(path, report).unwrap();
    }
}
