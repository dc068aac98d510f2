//! The manager's `/ui` in headless Chromium: every engine and GPU with its state, a GPU fault
//! appearing without a reload, a screenshot in test-artifacts/ui.png.

use std::time::{Duration, Instant};

use gpuq_e2e::{Stack, StackOptions, repo_root};
use serde_json::json;
use uuid::Uuid;

use super::browser::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_status_page_shows_every_engine_and_gpu_and_a_fault_without_reloading() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    stack
        .wait_engines_healthy(3, Duration::from_secs(30))
        .await
        .unwrap();
    let mut chromium = Chromium::launch(&stack.dir).await.unwrap();
    let mut page = chromium.page().await.unwrap();
    for m in ["Page.enable", "Runtime.enable"] {
        page.call(m, json!({})).await.unwrap();
    }
    page.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 1400, "height": 900, "deviceScaleFactor": 1, "mobile": false}),
    )
    .await
    .unwrap();
    let url = format!("{}/ui", stack.manager_url);
    let nav = page
        .call("Page.navigate", json!({"url": url}))
        .await
        .unwrap();
    assert!(nav.get("errorText").is_none(), "navigating to {url}: {nav}");

    // The page shows nothing until it is given a token; the read token is enough to watch.
    wait_ui(
        &mut page,
        "the page asking for a token",
        Duration::from_secs(10),
        |ui| ui["conn"] == "locked" && ui["engines"].as_array().is_none_or(Vec::is_empty),
    )
    .await
    .unwrap();
    page.eval(&format!(
        "document.querySelector('#token').value = {:?}; \
         document.querySelector('#token-form').requestSubmit(); true",
        stack.read_token
    ))
    .await
    .unwrap();

    // Every engine, each with both GPUs, all healthy, on the live stream.
    let engines = ["worker-1", "worker-2", "worker-3"];
    let ui = wait_ui(
        &mut page,
        "three healthy engines with two healthy GPUs each, live",
        Duration::from_secs(30),
        |ui| {
            ui["conn"] == "sse"
                && engines.iter().all(|e| {
                    ["0", "1"]
                        .iter()
                        .all(|g| gpu_of(ui, e, g).is_some_and(|g| g["health"] == "healthy"))
                })
        },
    )
    .await
    .unwrap();
    let height = ui["innerHeight"].as_f64().unwrap_or(0.0);
    for e in engines {
        let card = ui["engines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == e)
            .unwrap();
        assert_eq!(card["state"], "healthy", "{card:#}");
        assert_eq!(card["badge"], "healthy", "{card:#}");
        let text = card["text"].as_str().unwrap_or("");
        assert!(
            text.contains(e) && text.contains("GPU 0") && text.contains("GPU 1"),
            "{text}"
        );
        let top = card["top"].as_f64().unwrap_or(f64::MAX);
        assert!(
            card["height"].as_f64().unwrap_or(0.0) > 0.0 && top < height,
            "engine {e} is not on the first screen: {card:#}"
        );
        for g in card["gpus"].as_array().unwrap() {
            assert_eq!(g["badge"], "healthy", "{g:#}");
            assert!(g["height"].as_f64().unwrap_or(0.0) > 0.0, "{g:#}");
        }
    }

    // A state change, seen by the same page load: a marker set now survives (no reload), the
    // page keeps rendering updates, and the overheated GPU turns unhealthy.
    let marker = Uuid::new_v4().to_string();
    page.eval(&format!("window.__gpuqTestMarker = {marker:?}; true"))
        .await
        .unwrap();
    let before = page.eval(UI_STATE_JS).await.unwrap();
    stack.gpu_fault("worker-2", 1, "overheat").await.unwrap();
    let after = wait_ui(
        &mut page,
        "GPU 1 of worker-2 unhealthy",
        Duration::from_secs(20),
        |ui| gpu_of(ui, "worker-2", "1").is_some_and(|g| g["health"] == "unhealthy"),
    )
    .await
    .unwrap();
    assert_eq!(after["marker"], json!(marker), "the page was reloaded");
    assert!(
        after["updates"].as_u64() > before["updates"].as_u64(),
        "{before:#} -> {after:#}"
    );
    let g = gpu_of(&after, "worker-2", "1").unwrap();
    assert_eq!(g["badge"], "unhealthy", "{g:#}");
    assert_eq!(g["state"], "unhealthy", "{g:#}");
    assert!(
        g["why"].as_str().unwrap_or("").contains("overheat"),
        "the page does not say why: {g:#}"
    );
    assert_eq!(
        gpu_of(&after, "worker-2", "0").map(|g| g["health"].clone()),
        Some(json!("healthy"))
    );
    let top_level_navigations = page
        .events("Page.frameNavigated")
        .iter()
        .filter(|e| e["params"]["frame"]["parentId"].is_null())
        .count();
    assert_eq!(top_level_navigations, 1, "one page load only");
    let exceptions = page.events("Runtime.exceptionThrown");
    assert!(exceptions.is_empty(), "the page threw: {exceptions:#?}");

    // Jobs run meanwhile show up too, with the queue they went through.
    let ids = stack
        .submit_many(
            3,
            3,
            &json!({"kind": "simulate", "params": {"duration_ms": 50}}),
        )
        .await
        .unwrap();
    stack
        .wait_final(&ids, Duration::from_secs(30))
        .await
        .unwrap();
    let queue = format!("{}.jobs.default", stack.prefix);
    let shown = wait_ui(
        &mut page,
        "the three jobs succeeded and the jobs queue",
        Duration::from_secs(20),
        |ui| {
            ui["queues"]
                .as_array()
                .is_some_and(|q| q.contains(&json!(queue)))
                && ids.iter().all(|id| {
                    ui["jobs"].as_array().is_some_and(|j| {
                        j.iter()
                            .any(|j| j["id"] == id.to_string() && j["status"] == "succeeded")
                    })
                })
        },
    )
    .await
    .unwrap();
    assert_eq!(shown["marker"], json!(marker), "the page was reloaded");
    assert_eq!(
        gpu_of(&shown, "worker-2", "1").map(|g| g["health"].clone()),
        Some(json!("unhealthy"))
    );

    // A job view, opened from its row: its progress and metrics, live; its output needs the admin
    // token (this page holds the read token).
    let script = "i=0; for f in 0.25 0.5 0.75 1; do i=$((i+1)); echo \"##gpuq:progress {\\\"fraction\\\": $f, \\\"message\\\": \\\"quarter $i\\\", \\\"metrics\\\": {\\\"loss\\\": $i}}\"; echo out $i; sleep 0.7; done";
    let watched = stack
        .submit_ok(&json!({"kind": "command", "params": {"program": "sh", "args": ["-c", script]}}))
        .await
        .unwrap();
    let view_js = format!(
        "(() => {{ const row = document.querySelector('#recent-jobs tr[data-job=\"{watched}\"]'); \
           if (row && document.querySelector('#job-view').hidden) row.click(); \
           const v = document.querySelector('#job-view'); \
           return {{ open: !v.hidden, job: v.dataset.job || '', status: v.dataset.status || '', \
             fraction: v.dataset.fraction || '', message: document.querySelector('#jv-message').textContent, \
             loss: (document.querySelector('#jv-metrics tr[data-metric=\"loss\"] td:last-child') || {{}}).textContent || '', \
             output: document.querySelector('#jv-output').textContent }}; }})()"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen_running = false;
    let view = loop {
        let v = page.eval(&view_js).await.unwrap();
        seen_running |= v["status"] == "running" && v["fraction"] != "";
        if v["status"] == "succeeded" && v["fraction"] == "1" {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "the job view never showed the job done: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(view["job"], json!(watched.to_string()));
    assert!(
        seen_running,
        "the view showed the job's progress while it ran"
    );
    assert_eq!(view["message"], "quarter 4");
    assert_eq!(view["loss"], "4");
    let output = view["output"].as_str().unwrap();
    assert!(
        output.contains("attempt 1 on worker-") && output.contains("succeeded"),
        "{output}"
    );
    assert!(
        !output.contains("out 1") && output.contains("need the admin token"),
        "{output}"
    );

    // The screenshot, with the fault on it.
    let shot = page
        .call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": false}),
        )
        .await
        .unwrap();
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 20_000);
    let artifacts = repo_root().join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    std::fs::write(artifacts.join("ui.png"), &png).unwrap();
    std::fs::write(stack.dir.join("ui.png"), &png).unwrap();
    eprintln!(
        "screenshot: {} ({} bytes)",
        artifacts.join("ui.png").display(),
        png.len()
    );

    chromium.kill();
    let _ = chromium.child.wait().await;
    stack.stop().await;
}
