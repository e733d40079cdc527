//! Issue 13, the HTTP edge: hostile or careless input gets a clean 4xx naming the field, on the
//! real router over real HTTP (the fake trainer stands in for training: none of these jobs
//! should ever reach it).

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn assert_invalid(s: StatusCode, v: &Value, field: &str) {
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["code"], "invalid_value", "{v}");
    assert_eq!(v["error"]["field"], field, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_given_as_an_array_is_refused_naming_model() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeTrainer::new();
    let srv = TestServer::start(args_for(dir.path()), fake.clone()).await;
    for model in [json!([]), json!([48, 1, 2, 96])] {
        for preset in [None, Some("tiny")] {
            let mut body = json!({"name": "arr", "model": model});
            if let Some(p) = preset {
                body["config"] = json!(p);
            }
            let (s, v) = srv.post("/api/jobs", &body).await;
            assert_invalid(s, &v, "model");
            assert!(
                v["error"]["message"].as_str().unwrap().contains("object"),
                "{v}"
            );
        }
    }
    let (_, list) = srv.get("/api/jobs").await;
    assert_eq!(list["total"], 0, "no job was created: {list}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_object_in_any_spec_section_is_refused_naming_the_section() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), FakeTrainer::new()).await;
    for (section, bad) in [
        ("data", json!("train.tsv")),
        ("train", json!([8, 1])),
        ("amp", json!(true)),
        ("checkpoint", json!(500)),
        ("model", Value::Null),
    ] {
        let body = json!({"config": "tiny", "name": "x", section: bad});
        let (s, v) = srv.post("/api/jobs", &body).await;
        assert_invalid(s, &v, section);
    }
    // A wrong scalar type inside a section names the dotted field.
    let (s, v) = srv
        .post(
            "/api/jobs",
            &json!({"config": "tiny", "model": {"d_model": [128]}}),
        )
        .await;
    assert_invalid(s, &v, "model.d_model");
    let (s, v) = srv
        .post(
            "/api/jobs",
            &json!({"config": "tiny", "train": {"batch_size": "8"}}),
        )
        .await;
    assert_invalid(s, &v, "train.batch_size");
    srv.stop().await;
}

/// One raw HTTP/1.1 exchange: the status code of the answer (0 when the server closed without
/// one).
async fn raw_status(base: &str, request: &str) -> u16 {
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_half_its_headers_is_closed_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = args_for(dir.path());
    args.header_timeout_s = 1;
    let srv = TestServer::start(args, FakeTrainer::new()).await;
    let mut s = tokio::net::TcpStream::connect(srv.base.trim_start_matches("http://"))
        .await
        .unwrap();
    let t0 = Instant::now();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    let waited = t0.elapsed();
    assert!(read.is_ok(), "still open after 10 s");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
    // The server itself is fine.
    let (s, _) = srv.get("/healthz").await;
    assert_eq!(s, StatusCode::OK);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = args_for(dir.path());
    args.header_timeout_s = 1;
    let srv = TestServer::start(args, FakeTrainer::new()).await;
    let mut s = tokio::net::TcpStream::connect(srv.base.trim_start_matches("http://"))
        .await
        .unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Kept alive, then idle: closed by the server.
    let t0 = Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "idle connection still open after 10 s");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_wait_until_one_closes() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = args_for(dir.path());
    args.max_connections = 2;
    args.header_timeout_s = 60;
    let srv = TestServer::start(args, FakeTrainer::new()).await;
    let addr = srv.base.trim_start_matches("http://").to_string();
    let idle1 = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let _idle2 = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = tokio::net::TcpStream::connect(&addr).await.unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(700), third.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "a third connection was served past a cap of 2"
    );
    drop(idle1);
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), third.read_to_end(&mut out))
        .await
        .expect("served once a slot freed")
        .unwrap();
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_plain_post_is_refused_with_415_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), FakeTrainer::new()).await;
    for ct in ["text/plain", "application/x-www-form-urlencoded"] {
        let r = srv
            .client
            .post(srv.url("/api/jobs"))
            .header("content-type", ct)
            .body(fake_job("csrf").to_string())
            .send()
            .await
            .unwrap();
        let (s, v) = split(r).await;
        assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct}: {v}");
        assert_eq!(v["error"]["code"], "unsupported_media_type");
    }
    // A body without any content type is refused too; a bodiless POST is fine.
    let r = srv
        .client
        .post(srv.url("/api/jobs"))
        .body(fake_job("untyped").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let (_, list) = srv.get("/api/jobs").await;
    assert_eq!(list["total"], 0, "{list}");
    let r = srv
        .client
        .post(srv.url("/api/jobs/999/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_host_or_origin_is_refused_on_a_loopback_server() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), FakeTrainer::new()).await;
    let port = srv.base.rsplit(':').next().unwrap().to_string();
    let get =
        |host: &str| format!("GET /api/jobs HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    assert_eq!(raw_status(&srv.base, &get("evil.example")).await, 421);
    assert_eq!(
        raw_status(&srv.base, &get(&format!("evil.example:{port}"))).await,
        421
    );
    assert_eq!(
        raw_status(&srv.base, &get(&format!("localhost:{port}"))).await,
        200
    );
    // Cross-site browser request: allowed Host, foreign Origin.
    let r = srv
        .client
        .post(srv.url("/api/jobs"))
        .header("origin", "http://evil.example")
        .json(&fake_job("rebind"))
        .send()
        .await
        .unwrap();
    let (s, v) = split(r).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"]["code"], "forbidden_origin");
    // The status page's own origin is fine.
    let r = srv
        .client
        .post(srv.url("/api/jobs"))
        .header("origin", srv.base.clone())
        .json(&fake_job("same-origin"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    srv.stop().await;

    // --allowed-hosts replaces the loopback names.
    let mut args = args_for(dir.path());
    args.allowed_hosts = vec!["ampserve.internal".into()];
    let srv = TestServer::start(args, FakeTrainer::new()).await;
    assert_eq!(
        raw_status(&srv.base, &get(&format!("ampserve.internal:{port}"))).await,
        200
    );
    assert_eq!(raw_status(&srv.base, &get("127.0.0.1")).await, 421);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_translate_get_needs_the_token_like_the_post() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = args_for(dir.path());
    args.api_token = Some("s3cret".into());
    let srv = TestServer::start(args, FakeTrainer::new()).await;
    let (s, v) = srv.get("/api/translate?text=hello").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    for wrong in ["s3cre", "s3cret-and-more", ""] {
        let r = srv
            .client
            .get(srv.url("/api/translate?text=hello"))
            .bearer_auth(wrong)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{wrong}");
    }
    // With the token it reaches the handler (no model yet: 404 naming `model`).
    let r = srv
        .client
        .get(srv.url("/api/translate?text=hello"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    let (s, v) = split(r).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["error"]["field"], "model");
    // Plain reads stay open.
    let (s, _) = srv.get("/api/jobs").await;
    assert_eq!(s, StatusCode::OK);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_api_token_is_a_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = args_for(dir.path());
    args.api_token = Some(String::new());
    let err = match ampserve::app::build_app(&args, FakeTrainer::new()).await {
        Ok(_) => panic!("an empty token silently disabled auth"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("--api-token"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_path_errors_name_the_field_without_paths_or_existence_hints() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), FakeTrainer::new()).await;
    let mut messages = Vec::new();
    for path in [
        "/etc/passwd",
        "/nonexistent/corpus.tsv",
        "../shared/data",
        "nope.tsv",
    ] {
        let (s, v) = srv
            .post("/api/jobs", &json!({"data": {"train": path}}))
            .await;
        assert_invalid(s, &v, "data.train");
        messages.push(v["error"]["message"].as_str().unwrap().to_string());
    }
    let root = std::fs::canonicalize(dir.path()).unwrap();
    for m in &messages {
        assert_eq!(m, &messages[0], "every refusal reads the same");
        assert!(!m.contains(root.to_str().unwrap()), "{m}");
        assert!(!m.contains("/shared"), "{m}");
        assert!(!m.contains("exist") && !m.contains("outside"), "{m}");
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_methods_and_paths_add_no_new_metric_series() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), FakeTrainer::new()).await;
    let series = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("ampserve_http_"))
            .count()
    };
    let send = |m: String, path: String| {
        let c = srv.client.clone();
        let url = srv.url(&path);
        async move {
            let method = reqwest::Method::from_bytes(m.as_bytes()).unwrap();
            c.request(method, url).send().await.unwrap().status()
        }
    };
    send("BREW".into(), "/api/jobs".into()).await;
    send("GET".into(), "/no/such/path/0".into()).await;
    let base = srv.client.get(srv.url("/metrics")).send().await.unwrap();
    let before = series(&base.text().await.unwrap());
    for i in 0..20 {
        send(format!("BREW{i}"), "/api/jobs".into()).await;
        send("GET".into(), format!("/no/such/path/{i}")).await;
    }
    let text = srv
        .client
        .get(srv.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Only the /metrics request itself may have added its own series since.
    let after = series(&text);
    assert!(after <= before + 15, "{before} -> {after} series");
    assert!(!text.contains("BREW"), "raw method names in labels");
    assert!(text.contains("method=\"OTHER\""));
    srv.stop().await;
}
