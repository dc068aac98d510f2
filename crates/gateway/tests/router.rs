//! The gateway's HTTP contract, driven with `oneshot` and no broker or Redis: credentials, bad
//! inputs, the JSON error shape, the ops routes, and failing safe when a dependency is down.

mod support;

use std::time::Instant;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use support::{error_of, get, post_json, router_app};

#[tokio::test]
async fn requests_without_or_with_a_wrong_api_key_get_401_and_enqueue_nothing() {
    let app = router_app().await;
    let body = json!({"kind":"simulate"}).to_string();
    let cases = [
        Request::post("/v1/jobs")
            .header("content-type", "application/json")
            .body(Body::from(body.clone()))
            .unwrap(),
        Request::post("/v1/jobs")
            .header("content-type", "application/json")
            .header("authorization", "Bearer wrong")
            .body(Body::from(body.clone()))
            .unwrap(),
        Request::post("/v1/jobs")
            .header("content-type", "application/json")
            .header("authorization", "Basic dGVzdC1rZXk6")
            .body(Body::from(body))
            .unwrap(),
        Request::get("/v1/jobs").body(Body::empty()).unwrap(),
        Request::get("/v1/dead-letters")
            .header("authorization", "Bearer ")
            .body(Body::empty())
            .unwrap(),
    ];
    for req in cases {
        let what = format!("{} {}", req.method(), req.uri());
        let (status, headers, body) = app.send(req).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
        assert_eq!(error_of(&body).0, "unauthorized");
        assert_eq!(headers["www-authenticate"], "Bearer");
    }
    assert_eq!(app.job_count().await, 0);
}

#[tokio::test]
async fn malformed_json_is_a_400_in_the_json_error_shape() {
    let app = router_app().await;
    for raw in [
        r#"{"kind":"simulate""#,
        "not json",
        "",
        r#"{"kind":"simulate"} trailing"#,
    ] {
        let (status, headers, body) = app.send(post_json("/v1/jobs", raw)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{raw:?}: {body}");
        assert_eq!(error_of(&body).0, "bad_request");
        assert_eq!(headers["content-type"], "application/json");
    }
    let req = Request::post("/v1/jobs")
        .header("authorization", "Bearer test-key")
        .body(Body::from(r#"{"kind":"simulate"}"#))
        .unwrap();
    let (status, _, body) = app.send(req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_of(&body).1.contains("Content-Type"), "{body}");
    assert_eq!(app.job_count().await, 0);
}

#[tokio::test]
async fn wrong_types_unknown_kinds_and_unknown_fields_are_422_naming_the_field() {
    let app = router_app().await;
    let cases = [
        (json!({"kind":"simulate","gpus":"two"}), "gpus"),
        (json!({"kind":"teleport"}), "kind"),
        (json!({"kind":"simulate","colour":"blue"}), "colour"),
        (
            json!({"kind":"simulate","params":{"duration_ms":"long"}}),
            "params.duration_ms",
        ),
        (
            json!({"kind":"command","params":{"program":"x","args":"-v"}}),
            "params.args",
        ),
        (json!({"kind":"simulate","params":{"nope":1}}), "params"),
        (json!({"kind":"simulate","params":[1]}), "params"),
        (json!({"gpus":1}), "kind"),
    ];
    for (body, field) in cases {
        let (status, _, resp) = app.send(post_json("/v1/jobs", body.to_string())).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {resp}");
        let (code, message) = error_of(&resp);
        assert_eq!(code, "invalid_job");
        assert!(
            message.contains(field),
            "{body}: {message:?} should name {field:?}"
        );
    }
    assert_eq!(app.job_count().await, 0);
}

#[tokio::test]
async fn negative_or_absurd_values_are_422_naming_the_field() {
    let app = router_app().await;
    let cases = [
        (json!({"kind":"simulate","gpus":-1}), "gpus"),
        (json!({"kind":"simulate","gpus":0}), "gpus"),
        (json!({"kind":"simulate","gpus":100000}), "gpus"),
        (json!({"kind":"simulate","ttl_s":0}), "ttl_s"),
        (json!({"kind":"simulate","ttl_s":-5}), "ttl_s"),
        (
            json!({"kind":"simulate","min_gpu_memory_mb":99999999999u64}),
            "min_gpu_memory_mb",
        ),
        (json!({"kind":"simulate","pool":"a b"}), "pool"),
        (json!({"kind":"simulate","pool":""}), "pool"),
        (
            json!({"kind":"simulate","params":{"duration_ms":-1}}),
            "duration_ms",
        ),
        (
            json!({"kind":"simulate","params":{"duration_ms":999999999999u64}}),
            "duration_ms",
        ),
        (
            json!({"kind":"simulate","params":{"fail_probability":2.0}}),
            "fail_probability",
        ),
        (
            json!({"kind":"command","params":{"program":"/bin/sh"}}),
            "program",
        ),
        (
            json!({"kind":"command","params":{"program":"sh","env":{"CUDA_VISIBLE_DEVICES":"0"}}}),
            "env",
        ),
    ];
    for (body, field) in cases {
        let (status, _, resp) = app.send(post_json("/v1/jobs", body.to_string())).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {resp}");
        let (code, message) = error_of(&resp);
        assert_eq!(code, "invalid_job");
        assert!(
            message.contains(field),
            "{body}: {message:?} should name {field:?}"
        );
    }
    assert_eq!(app.job_count().await, 0);
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_in_the_json_error_shape() {
    let app = router_app().await;
    let max = app.state.max_body_bytes;
    let big = json!({"kind":"command","params":{"program":"x","args":["a".repeat(max)]}});
    let (status, headers, body) = app.send(post_json("/v1/jobs", big.to_string())).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(error_of(&body).0, "payload_too_large");
    assert_eq!(headers["content-type"], "application/json");
    // Streamed, without a Content-Length.
    let chunks: Vec<Result<String, std::io::Error>> = vec![
        Ok("{\"kind\":\"simulate\",\"params\":{\"x\":\"".into()),
        Ok("a".repeat(max)),
        Ok("\"}}".into()),
    ];
    let stream = Body::from_stream(futures_util::stream::iter(chunks));
    let (status, _, body) = app.send(post_json("/v1/jobs", stream)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(error_of(&body).0, "payload_too_large");
    assert_eq!(app.job_count().await, 0);
}

#[tokio::test]
async fn reads_check_ids_statuses_and_page_sizes() {
    let app = router_app().await;
    let bad = [
        "/v1/jobs/not-a-uuid",
        "/v1/jobs?status=exploded",
        "/v1/jobs?limit=0",
        "/v1/jobs?limit=1001",
        "/v1/jobs?limit=ten",
        "/v1/jobs?limit=-1",
        "/v1/jobs?cursor=nope",
        "/v1/jobs?pool=a%20b",
        "/v1/jobs?colour=blue",
        "/v1/dead-letters?limit=0",
        "/v1/dead-letters?status=queued",
    ];
    for uri in bad {
        let (status, _, body) = app.send(get(uri)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
        assert_eq!(error_of(&body).0, "bad_request", "{uri}");
    }
    let (status, _, body) = app.send(get("/v1/jobs?status=exploded")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        error_of(&body).1.contains("dead_lettered"),
        "lists the statuses: {body}"
    );

    let unknown = uuid::Uuid::now_v7();
    let (status, _, body) = app.send(get(&format!("/v1/jobs/{unknown}"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(error_of(&body).0, "not_found");
    let (status, _, body) = app
        .send(post_json(&format!("/v1/jobs/{unknown}/cancel"), ""))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _, body) = app
        .send(post_json(&format!("/v1/dead-letters/{unknown}/retry"), ""))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    for ok in [
        "/v1/jobs",
        "/v1/jobs?status=queued&pool=default&limit=1000",
        "/v1/dead-letters?limit=5",
    ] {
        let (status, _, body) = app.send(get(ok)).await;
        assert_eq!(status, StatusCode::OK, "{ok}: {body}");
        assert_eq!(body["jobs"], json!([]), "{ok}");
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let app = router_app().await;
    let (status, _, body) = app.send(get("/v2/nothing")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_of(&body).0, "not_found");
    let req = Request::delete("/v1/jobs")
        .header("authorization", "Bearer test-key")
        .body(Body::empty())
        .unwrap();
    let (status, _, body) = app.send(req).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(error_of(&body).0, "method_not_allowed");
}

#[tokio::test]
async fn the_openapi_document_lists_every_route_and_the_error_shape() {
    let app = router_app().await;
    let (status, _, doc) = app
        .send(Request::get("/openapi.json").body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, StatusCode::OK);
    let paths = doc["paths"].as_object().expect("paths");
    for (path, method) in [
        ("/v1/jobs", "post"),
        ("/v1/jobs", "get"),
        ("/v1/jobs/{id}", "get"),
        ("/v1/jobs/{id}/cancel", "post"),
        ("/v1/dead-letters", "get"),
        ("/v1/dead-letters/{id}/retry", "post"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
        ("/openapi.json", "get"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing"
        );
    }
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    for name in [
        "SubmitRequest",
        "SubmitResponse",
        "JobRecord",
        "JobPage",
        "ErrorBody",
    ] {
        assert!(schemas.contains_key(name), "schema {name} missing");
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    let submit = &doc["paths"]["/v1/jobs"]["post"]["responses"];
    for code in ["202", "200", "400", "401", "413", "422", "503"] {
        assert!(submit.get(code).is_some(), "POST /v1/jobs lacks {code}");
    }
}

#[tokio::test]
async fn healthz_answers_and_metrics_count_requests_by_route() {
    let app = router_app().await;
    let (status, _, body) = app
        .send(Request::get("/healthz").body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ok");
    let id = uuid::Uuid::now_v7();
    app.send(get(&format!("/v1/jobs/{id}"))).await;
    let (status, _, text) = app
        .send(Request::get("/metrics").body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, StatusCode::OK);
    let text = text.as_str().expect("text").to_string();
    assert!(
        text.contains(
            r#"gpuq_http_requests_total{method="GET",route="/v1/jobs/{id}",status="404"} 1"#
        ),
        "{text}"
    );
    assert!(
        !text.contains(&id.to_string()),
        "a job id leaked into a label"
    );
    assert!(text.contains("gpuq_build_info"));
}

#[tokio::test]
async fn an_idempotency_key_without_redis_is_a_clear_503_and_nothing_is_stored() {
    let app = router_app().await;
    let req = Request::post("/v1/jobs")
        .header("content-type", "application/json")
        .header("authorization", "Bearer test-key")
        .header("idempotency-key", "order-1")
        .body(Body::from(json!({"kind":"simulate"}).to_string()))
        .unwrap();
    let (status, headers, body) = app.send(req).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let (code, message) = error_of(&body);
    assert_eq!(code, "unavailable");
    assert!(
        message.contains("Idempotency-Key") && message.contains("Redis"),
        "{message}"
    );
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(app.job_count().await, 0);
}

#[tokio::test]
async fn a_bad_idempotency_key_is_a_400() {
    let app = router_app().await;
    for key in ["k".repeat(201), String::new()] {
        let req = Request::post("/v1/jobs")
            .header("content-type", "application/json")
            .header("authorization", "Bearer test-key")
            .header("idempotency-key", key.as_str())
            .body(Body::from(json!({"kind":"simulate"}).to_string()))
            .unwrap();
        let (status, _, body) = app.send(req).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(error_of(&body).1.contains("200"), "{body}");
    }
}

#[tokio::test]
async fn without_a_broker_a_submission_is_a_503_after_the_confirm_timeout_and_leaves_no_record() {
    let app = router_app().await;
    let started = Instant::now();
    let (status, _, body) = app
        .send(post_json(
            "/v1/jobs",
            json!({"kind":"simulate"}).to_string(),
        ))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let (code, message) = error_of(&body);
    assert_eq!(code, "unavailable");
    assert!(message.contains("broker"), "{message}");
    assert!(
        started.elapsed().as_millis() >= 250,
        "waited for a link first"
    );
    assert_eq!(
        app.job_count().await,
        0,
        "the record of a job that was never sent is deleted"
    );
    assert!(
        metrics_page(&app)
            .await
            .contains(r#"gpuq_publish_failures_total{reason="unavailable"} 1"#)
    );
}

/// The gateway's `/metrics` page.
async fn metrics_page(app: &support::RouterApp) -> String {
    let (_, _, text) = app
        .send(Request::get("/metrics").body(Body::empty()).unwrap())
        .await;
    text.as_str().unwrap().to_string()
}

#[tokio::test]
async fn without_a_broker_a_batch_is_a_503_saying_nothing_was_enqueued_and_leaves_no_record() {
    let app = router_app().await;
    let jobs: Vec<Value> = (0..200)
        .map(|i| json!({"kind":"simulate","params":{"duration_ms": i}}))
        .collect();
    let batch = json!({ "jobs": jobs }).to_string();
    // A batch is not held to a single submission's body limit.
    assert!(batch.len() > app.state.max_body_bytes);
    let (status, _, body) = app.send(post_json("/v1/jobs/batch", batch)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let (code, message) = error_of(&body);
    assert_eq!(code, "unavailable");
    assert!(
        message.contains("200 jobs 200 were refused") && message.ends_with("nothing was enqueued"),
        "{message}"
    );
    assert_eq!(app.job_count().await, 0, "every record withdrawn");
    assert!(
        metrics_page(&app)
            .await
            .contains(r#"gpuq_publish_failures_total{reason="unavailable"} 200"#)
    );
}

#[tokio::test]
async fn readyz_names_the_dependencies_that_are_down() {
    let app = router_app().await;
    let (status, _, body) = app
        .send(Request::get("/readyz").body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["checks"]["store"], "ok");
    assert_ne!(body["checks"]["broker"], "ok");
    assert_ne!(body["checks"]["redis"], "ok");
    let _: &Value = &body;
}
