//! `/metrics` in the Prometheus text format, queue gauges from the management API, the overview,
//! its event stream, and the status page.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use gpuq_common::engine::GpuHealth;

use crate::helpers::{ADMIN_TOKEN, READ_TOKEN, eventually, gpu, heartbeat, spawn_app};

/// Checks the exposition with `promtool check metrics` when it is installed, and always with a
/// small parser of the text format (every sample line is `name{labels} value`, after its TYPE).
fn assert_prometheus_text(text: &str) {
    let mut typed = std::collections::HashSet::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            typed.insert(parts.next().unwrap().to_string());
            assert!(
                matches!(
                    parts.next(),
                    Some("counter" | "gauge" | "histogram" | "summary" | "untyped")
                ),
                "{line}"
            );
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "{line}"
        );
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        assert!(typed.contains(family), "sample before its TYPE: {line}");
        if series.contains('{') {
            assert!(series.ends_with('}'), "{line}");
        }
    }
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        eprintln!("promtool not installed; checked the text format with the built-in parser only");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn metrics_show_engine_gpu_and_queue_gauges_in_the_prometheus_text_format() {
    let app = spawn_app().await;
    let dead_queue = format!("{}.dead", app.prefix);
    eventually(
        Duration::from_secs(60),
        "queue gauges from the management API",
        || async {
            let (_, m) = app.get_text("/metrics").await;
            m.contains(&format!(
                r#"gpuq_queue_consumers{{queue="{dead_queue}"}} 1"#
            ))
            .then_some(())
        },
    )
    .await;
    let hb = heartbeat(
        "w-m",
        "i1",
        vec![gpu(0, GpuHealth::Healthy), gpu(1, GpuHealth::Degraded)],
    );
    app.heartbeat(&hb).await;
    let (_, text) = app.get_text("/metrics").await;
    for series in [
        r#"gpuq_engine_state{engine="w-m",state="degraded"} 1"#,
        r#"gpuq_engine_state{engine="w-m",state="healthy"} 0"#,
        r#"gpuq_engine_running_jobs{engine="w-m"} 0"#,
        r#"gpuq_gpu_utilization_ratio{engine="w-m",gpu="1"} 0.5"#,
        r#"gpuq_gpu_memory_used_bytes{engine="w-m",gpu="0"} 2147483648"#,
        r#"gpuq_gpu_memory_total_bytes{engine="w-m",gpu="0"} 25769803776"#,
        r#"gpuq_gpu_temperature_celsius{engine="w-m",gpu="1"} 56"#,
        r#"gpuq_gpu_power_watts{engine="w-m",gpu="0"} 150"#,
        r#"gpuq_gpu_health{engine="w-m",gpu="1",state="degraded"} 1"#,
        r#"gpuq_broker_management_up 1"#,
        r#"gpuq_build_info{service="manager""#,
    ] {
        assert!(text.contains(series), "missing {series} in\n{text}");
    }
    assert!(
        text.contains(&format!(
            r#"gpuq_queue_messages{{queue="{}.jobs.default"}} 0"#,
            app.prefix
        )),
        "{text}"
    );
    assert!(
        text.contains(
            r#"gpuq_http_requests_total{method="POST",route="/v1/heartbeats",status="200"}"#
        ),
        "{text}"
    );
    assert_prometheus_text(&text);

    // GPU 1 disappears from the engine: its series go with it.
    app.heartbeat(&heartbeat("w-m", "i1", vec![gpu(0, GpuHealth::Healthy)]))
        .await;
    let (_, text) = app.get_text("/metrics").await;
    assert!(!text.contains(r#"engine="w-m",gpu="1""#), "{text}");
    assert!(
        text.contains(r#"gpuq_engine_state{engine="w-m",state="healthy"} 1"#),
        "{text}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn the_status_page_and_its_data_are_served_without_any_external_asset() {
    let app = spawn_app().await;
    app.heartbeat(&heartbeat(
        "w-u",
        "i1",
        vec![gpu(0, GpuHealth::Healthy), gpu(1, GpuHealth::Healthy)],
    ))
    .await;

    let r = app.http.get(app.url("/ui")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let page = r.text().await.unwrap();
    for needle in [
        r#"id="engines""#,
        r#"id="queues""#,
        r#"id="recent-jobs""#,
        r#"id="dead-letters""#,
        r#"id="throughput""#,
        r#"id="token-form""#,
        "data-engine",
        "data-gpu",
        "dataset.state",
        "fetch(\"/v1/events\", { cache: \"no-store\", headers: auth()",
        "fetch(\"/v1/overview\", { cache: \"no-store\", headers: auth()",
        "sessionStorage",
        "Bearer ",
    ] {
        assert!(page.contains(needle), "the page lacks {needle}");
    }
    assert!(
        !page.contains("https://") && !page.contains("http://"),
        "the page must load nothing external"
    );

    let (status, o) = app.get_json("/v1/overview").await;
    assert_eq!(status, 200);
    let engines = o["engines"].as_array().unwrap();
    assert_eq!(
        (
            engines.len(),
            engines[0]["id"].as_str(),
            engines[0]["state"].as_str()
        ),
        (1, Some("w-u"), Some("healthy"))
    );
    for s in [
        "queued",
        "running",
        "succeeded",
        "failed",
        "dead_lettered",
        "cancelled",
    ] {
        assert_eq!(o["job_counts"][s], 0, "{o}");
    }
    assert!(o["throughput"]["finished_per_s"].is_number());
    assert_eq!(o["broker_connected"], true);

    // The event stream (read token or admin token) sends an overview right away.
    let events = |token: &'static str| {
        app.http
            .get(app.url("/v1/events"))
            .bearer_auth(token)
            .send()
    };
    let mut r = events(READ_TOKEN).await.unwrap();
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut buf = String::new();
    let event = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(chunk) = r.chunk().await.unwrap() {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            if let Some(end) = buf.find("\n\n") {
                return buf[..end].to_string();
            }
        }
        panic!("the stream ended: {buf}");
    })
    .await
    .expect("an event within 5 s");
    assert!(event.starts_with("event: overview\ndata: "), "{event}");
    let data: serde_json::Value =
        serde_json::from_str(event.split_once("data: ").unwrap().1).unwrap();
    assert_eq!(data["engines"][0]["heartbeat"]["gpus"][1]["index"], 1);
    // Then the shared feed's ticks, to this stream and to a second one alike.
    let mut other = events(ADMIN_TOKEN).await.unwrap();
    for stream in [&mut r, &mut other] {
        let mut seen = String::new();
        let ticks = tokio::time::timeout(Duration::from_secs(8), async {
            while let Some(chunk) = stream.chunk().await.unwrap() {
                seen.push_str(&String::from_utf8_lossy(&chunk));
                if seen.matches("event: overview\n").count() >= 2 {
                    return;
                }
            }
            panic!("the stream ended: {seen}");
        })
        .await;
        assert!(ticks.is_ok(), "no second overview within 8 s: {seen}");
    }
    drop((r, other));

    let (status, doc) = app.get_json("/openapi.json").await;
    assert_eq!(status, 200);
    for p in [
        "/v1/heartbeats",
        "/v1/engines/{id}/drain",
        "/v1/engines/{id}/gpus/{gpu}/fault",
        "/v1/overview",
    ] {
        assert!(doc["paths"][p].is_object(), "openapi lacks {p}");
    }
    let (status, ready) = app.get_json("/readyz").await;
    assert_eq!(
        (status, ready["checks"]["broker"].as_bool()),
        (200, Some(true)),
        "{ready}"
    );
    assert_eq!(app.get_json("/healthz").await.0, 200);
    let (status, err) = app.get_json("/v1/nope").await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    app.cleanup().await;
}
