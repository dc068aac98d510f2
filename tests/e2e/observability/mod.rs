//! Issue 5's "Must show", on the real binaries, the local RabbitMQ cluster and Redis:
//!
//! 1. A real Prometheus (Debian's `prometheus`) scrapes a stack that runs a workload (successes,
//!    a retried job, a failed job, dead letters, a worker crash, a lost ack, a GPU fault that
//!    interrupts a job), with the alert rules loaded. Then **every** PromQL expression of every
//!    Grafana panel, dashboard variable and alert rule goes through Prometheus's HTTP API: each is
//!    valid, each one tied to the workload returns data, and every metric name they use has
//!    series; a name that no service exports fails the test.
//! 2. Every field a LogQL query of the dashboards selects, filters or groups by is in the
//!    services' real JSON log lines, and each query, run over those lines the way Loki would
//!    (labels as Promtail makes them), finds lines. Promtail promotes only low-cardinality fields.
//! 3. Headless Chromium (Debian's `chromium`, driven over the DevTools protocol) opens the
//!    manager's `/ui`, sees every engine and GPU with its state, sees a GPU fault appear without a
//!    reload, and saves a screenshot to `test-artifacts/ui.png`.

// Test scenarios read as one story from top to bottom: exempt from the workspace's
// 100-line limit on functions (clippy::too_many_lines), which holds for everything else.
#![allow(clippy::too_many_lines)]

mod browser;
mod files;
mod logql;
mod prometheus;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use anyhow::bail;
use gpuq_common::JobStatus;
use gpuq_e2e::{Stack, StackOptions, repo_root};
use serde_json::{Value, json};
use uuid::Uuid;

use browser::*;
use files::*;
use logql::*;
use prometheus::*;

// =============================================================================================
// 1. Every PromQL expression, live
// =============================================================================================

/// Counters of events this workload does not cause: each needs an outage of the shared Redis
/// or job store (the disruptive suite's business), or a race that gpuq exists to prevent. The
/// services create a labelled counter's series at its first increment (they do not initialise
/// them at 0), so these may have no series at all here: an expression made only of them may
/// return nothing. Each must still be a metric that gpuq defines (checked against
/// crates/common/src/metrics.rs), so a misspelt name is not excused.
const NOT_CAUSED: &[(&str, &str)] = &[
    (
        "gpuq_results_discarded_total",
        "a job ran twice and the later result was discarded (what gpuq prevents)",
    ),
    (
        "gpuq_store_write_retries_total",
        "the job store refused a write (a store outage)",
    ),
    (
        "gpuq_dead_letters_unrecorded_total",
        "a dead letter without a job id, or whose stored record is corrupt",
    ),
    (
        "gpuq_redis_errors_total",
        "a Redis command failed (a Redis outage)",
    ),
    (
        "gpuq_lease_contended_total",
        "a live worker held the lease of a redelivered job (a race)",
    ),
];

/// Alerts whose condition the workload makes true (a dead letter; a GPU left overheated).
const ALERTS_THE_WORKLOAD_RAISES: &[&str] = &["GpuqDeadLettersGrowing", "GpuqGpuUnhealthy"];

/// What the workload did, for the later checks.
struct Workload {
    retried: Uuid,
    interrupted_on: String,
}

async fn workload(stack: &Stack) -> anyhow::Result<Workload> {
    let sim = |ms: u64| json!({"kind": "simulate", "params": {"duration_ms": ms}});
    // Redelivered jobs (a retry, a crash, a lost ack) run while GPUs are free, so that none is
    // given back: what this suite checks is which metrics and alerts each event moves.

    // A: successes, an idempotent replay, then a retry, a failure, two kinds of dead letter,
    // and a submission to a pool nobody serves (the broker returns it: a publish failure).
    let mut ok = stack.submit_many(20, 8, &sim(100)).await?;
    stack.wait_final(&ok, Duration::from_secs(60)).await?;
    let key = Uuid::new_v4().to_string();
    let mut replay = vec![];
    for _ in 0..2 {
        let r = stack
            .auth(stack.http.post(format!("{}/v1/jobs", stack.gateway_url)))
            .header("Idempotency-Key", &key)
            .json(&sim(50))
            .send()
            .await?;
        let code = r.status().as_u16();
        let v: Value = r.json().await?;
        replay.push((code, v["id"].as_str().unwrap_or("").to_string()));
    }
    if replay[0].0 != 202 || replay[1].0 != 200 || replay[0].1 != replay[1].1 {
        bail!("an Idempotency-Key replay did not answer 202 then 200 with one id: {replay:?}");
    }
    ok.push(replay[0].1.parse()?);
    let retried = stack
        .submit_ok(&json!({"kind": "simulate", "params": {"duration_ms": 50, "fail_times": 1}}))
        .await?;
    let failed = stack
        .submit_ok(
            &json!({"kind": "command", "params": {"program": "sh", "args": ["-c", "exit 3"]}}),
        )
        .await?;
    let poison = stack
        .submit_ok(&json!({"kind": "simulate", "params": {"always_fail": true}}))
        .await?;
    let too_big = stack
        .submit_ok(&json!({"kind": "simulate", "params": {"duration_ms": 10}, "gpus": 3}))
        .await?;
    let (code, body) = stack
        .submit(&json!({"kind": "simulate", "params": {"duration_ms": 10}, "pool": "nobody"}))
        .await?;
    if code != 422 {
        bail!("a job for a pool nobody serves answered {code}: {body}");
    }
    let mut all = ok.clone();
    all.extend([retried, failed, poison, too_big]);
    let recs = stack.wait_final(&all, Duration::from_secs(60)).await?;
    let status = |id: Uuid| recs.iter().find(|r| r.id == id).map(|r| r.status);
    for id in &ok {
        if status(*id) != Some(JobStatus::Succeeded) {
            bail!("job {id}: {:?}", status(*id));
        }
    }
    let want = [
        (retried, JobStatus::Succeeded),
        (failed, JobStatus::Failed),
        (poison, JobStatus::DeadLettered),
        (too_big, JobStatus::DeadLettered),
    ];
    for (id, s) in want {
        if status(id) != Some(s) {
            bail!("job {id}: {:?}, expected {s:?}", status(id));
        }
    }

    // B: worker-2 dies in the middle of a job (restart, redelivery, lease takeover), then
    // worker-1 loses an ack (the redelivery is suppressed as a duplicate). One after the other,
    // so that no job is returned twice within the delivery limit of 2.
    stack.arm_fault(1, "crash_mid_task", 1).await?;
    // Four jobs on six GPUs: round robin gives worker-2 one of them.
    let ids = stack.submit_many(4, 4, &sim(400)).await?;
    let recs = stack.wait_final(&ids, Duration::from_secs(60)).await?;
    if recs.iter().any(|r| r.status != JobStatus::Succeeded) {
        bail!("after a worker crash: {:?}", gpuq_e2e::by_status(&recs));
    }
    if stack.workers[1].restarts() == 0 {
        bail!("worker-2 did not crash (no job reached it?)");
    }
    stack.arm_fault(0, "duplicate_after_complete", 1).await?;
    let ids = stack.submit_many(4, 4, &sim(300)).await?;
    let recs = stack.wait_final(&ids, Duration::from_secs(60)).await?;
    if recs.iter().any(|r| r.status != JobStatus::Succeeded) {
        bail!("after a lost ack: {:?}", gpuq_e2e::by_status(&recs));
    }

    // C: a GPU overheats under a running job (GPUQ_FINISH_ON_UNHEALTHY=false): the job is
    // stopped, given back, and finishes elsewhere. The GPU stays unhealthy.
    let long = stack.submit_ok(&sim(3000)).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let (worker, gpu) = loop {
        let v = stack.job(long).await?;
        if v["status"] == "running"
            && let (Some(w), Some(g)) = (v["worker"].as_str(), v["gpus"][0].as_u64())
        {
            break (w.to_string(), u32::try_from(g)?);
        }
        if Instant::now() > deadline {
            bail!("job {long} never ran: {v}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    stack.gpu_fault(&worker, gpu, "overheat").await?;
    let r = stack
        .wait_final(&[long], Duration::from_secs(60))
        .await?
        .remove(0);
    if r.status != JobStatus::Succeeded {
        bail!("the interrupted job ended {:?}", r.status);
    }
    Ok(Workload {
        retried,
        interrupted_on: worker,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prometheus_evaluates_every_dashboard_and_alert_expression_against_a_live_workload() {
    let t0 = Instant::now();
    let (queries, variables) = dashboard_queries();
    let prom_queries: Vec<&PanelQuery> = queries.iter().filter(|q| q.ds == "prometheus").collect();
    let rules = alert_rules();
    assert!(!prom_queries.is_empty(), "no PromQL panel query found");
    let metrics_rs =
        std::fs::read_to_string(repo_root().join("crates/common/src/metrics.rs")).unwrap();
    for (name, why) in NOT_CAUSED {
        assert!(
            metrics_rs.contains(&format!("\"{name}\"")),
            "{name} ({why}) is not defined in crates/common/src/metrics.rs"
        );
    }

    let stack = Stack::start(StackOptions {
        fault_injection: true,
        env: vec![
            ("GPUQ_DELIVERY_LIMIT".into(), "2".into()),
            ("GPUQ_FINISH_ON_UNHEALTHY".into(), "false".into()),
        ],
        ..Default::default()
    })
    .await
    .unwrap();
    let prom = Prometheus::start(&stack).await.unwrap();
    stack
        .wait_engines_healthy(3, Duration::from_secs(30))
        .await
        .unwrap();
    let w = workload(&stack).await.unwrap();
    eprintln!(
        "workload done in {:?} (retried job {}, GPU fault on {})",
        t0.elapsed(),
        w.retried,
        w.interrupted_on
    );

    // The workload's marks reach Prometheus through the services (the manager via heartbeats
    // and its broker polls).
    let wait = Duration::from_secs(30);
    for expr in [
        r#"gpuq_gpu_health{state="unhealthy"} == 1"#,
        r#"gpuq_dead_letters_total{reason="delivery_limit"}"#,
        r#"gpuq_dead_letters_total{reason="unschedulable"}"#,
        r#"gpuq_engine_restarts_total{engine="worker-2"} > 0"#,
        r#"gpuq_publish_failures_total{reason="unroutable"}"#,
        r#"gpuq_jobs_completed_total{outcome="interrupted"}"#,
        r#"gpuq_deliveries_given_back_total{reason="interrupted"}"#,
        r#"gpuq_duplicates_suppressed_total"#,
        r#"gpuq_lease_takeovers_total"#,
        r#"gpuq_idempotent_replays_total"#,
        r#"gpuq_queue_consumers{queue=~".+\\.jobs\\.default"} > 0"#,
    ] {
        // The RabbitMQ management API's statistics (queue consumers) lag behind under load.
        let wait = if expr.starts_with("gpuq_queue") {
            3 * wait
        } else {
            wait
        };
        prom.wait_for(expr, wait)
            .await
            .unwrap_or_else(|e| panic!("{e}; logs in {}", stack.dir.display()));
    }
    let t_end = now_s();
    prom.wait_two_scrapes_after(t_end).await.unwrap();

    let mut failures: Vec<String> = vec![];
    let mut report: Vec<String> = vec![];

    // Every gpuq target is up; at least one RabbitMQ node answers its plugin.
    let up = prom.query("up").await.unwrap();
    for s in &up {
        let job = s.labels["job"].as_str().unwrap_or("");
        if job.starts_with("gpuq-") && s.value != "1" {
            failures.push(format!("target {} is down", s.labels));
        }
    }
    let gpuq_targets = up
        .iter()
        .filter(|s| {
            s.labels["job"]
                .as_str()
                .is_some_and(|j| j.starts_with("gpuq-"))
        })
        .count();
    if gpuq_targets != 5 {
        failures.push(format!("{gpuq_targets} gpuq targets, expected 5: {up:?}"));
    }
    if !up
        .iter()
        .any(|s| s.labels["job"] == "rabbitmq" && s.value == "1")
    {
        failures.push("no RabbitMQ node is scraped".into());
    }

    // Dashboard variables: each Prometheus `label_values` finds values; the engines the manager
    // names are the engines the worker targets are labelled with.
    let mut first_value: HashMap<String, String> = HashMap::new();
    for v in &variables {
        if v.kind != "query" || v.ds.as_deref() != Some("prometheus") {
            continue;
        }
        let Some((selector, label)) = label_values_query(&v.query) else {
            failures.push(format!(
                "{} variable {}: not label_values(): {}",
                v.file, v.name, v.query
            ));
            continue;
        };
        let values = prom
            .api(
                &format!("/api/v1/label/{label}/values"),
                &[("match[]", selector.clone())],
            )
            .await;
        match values {
            Ok(Value::Array(a)) if !a.is_empty() => {
                let vals: BTreeSet<&str> = a.iter().filter_map(Value::as_str).collect();
                if v.name == "engine" {
                    let want: BTreeSet<&str> = ["worker-1", "worker-2", "worker-3"].into();
                    if vals != want {
                        failures.push(format!(
                            "{} variable engine: {vals:?}, expected {want:?}",
                            v.file
                        ));
                    }
                }
                first_value
                    .entry(v.name.clone())
                    .or_insert_with(|| vals.iter().next().unwrap().to_string());
            }
            other => failures.push(format!(
                "{} variable {} ({}): no values: {other:?}",
                v.file, v.name, v.query
            )),
        }
    }
    for engine in ["worker-1", "worker-2", "worker-3"] {
        for expr in [
            format!(r#"gpuq_worker_gpu_slots{{engine="{engine}"}}"#),
            format!(r#"gpuq_gpu_health{{engine="{engine}"}}"#),
        ] {
            if prom.query(&expr).await.map_or(true, |r| r.is_empty()) {
                failures.push(format!("{expr} has no series: engine labels do not join"));
            }
        }
    }

    // Every panel query, with "All" selected (the variable's allValue, as Grafana sends it)
    // and with one concrete value of each variable.
    let mut all_vals: HashMap<&str, String> = HashMap::new();
    all_vals.insert("__rate_interval", "1m".into());
    all_vals.insert("__interval", "1m".into());
    all_vals.insert("job_id", w.retried.to_string());
    let mut one_vals = all_vals.clone();
    for v in &variables {
        if v.ds.as_deref() == Some("prometheus") {
            all_vals.insert(&v.name, v.all_value.clone().unwrap_or_else(|| ".*".into()));
            one_vals.insert(
                &v.name,
                first_value.get(&v.name).cloned().unwrap_or_default(),
            );
        }
    }
    let not_caused: BTreeSet<&str> = NOT_CAUSED.iter().map(|(n, _)| *n).collect();
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    let mut empty_allowed = vec![];
    for q in &prom_queries {
        let where_ = format!("{} / {}", q.file, q.panel);
        for m in metric_names(&q.expr) {
            names.entry(m).or_insert_with(|| where_.clone());
        }
        let expr = substitute(&q.expr, &all_vals);
        match prom.query(&expr).await {
            Err(e) => failures.push(format!("{where_}: invalid: {e}: {expr}")),
            Ok(r) => {
                let gpuq: BTreeSet<String> = metric_names(&q.expr)
                    .into_iter()
                    .filter(|m| m.starts_with("gpuq_"))
                    .collect();
                let may_be_empty =
                    !gpuq.is_empty() && gpuq.iter().all(|m| not_caused.contains(m.as_str()));
                if r.is_empty() {
                    if may_be_empty {
                        empty_allowed.push(format!("{where_}: {expr}"));
                    } else {
                        failures.push(format!("{where_}: returned no data: {expr}"));
                    }
                } else if !may_be_empty && r.iter().all(|s| s.number().is_nan()) {
                    failures.push(format!("{where_}: only NaN: {expr} = {r:?}"));
                }
            }
        }
        let expr = substitute(&q.expr, &one_vals);
        if let Err(e) = prom.query(&expr).await {
            failures.push(format!(
                "{where_} (one value per variable): invalid: {e}: {expr}"
            ));
        }
    }
    for v in &variables {
        if v.ds.as_deref() == Some("prometheus")
            && let Some((selector, _)) = label_values_query(&v.query)
        {
            for m in metric_names(&selector) {
                names
                    .entry(m)
                    .or_insert_with(|| format!("{} variable {}", v.file, v.name));
            }
        }
    }

    // Every alert rule: valid; the ones the workload raises return data; and the alerts are in
    // Prometheus's rule manager, evaluated without error, the raised ones pending or firing.
    let mut alert_data = vec![];
    for (name, expr) in &rules {
        for m in metric_names(expr) {
            names
                .entry(m)
                .or_insert_with(|| format!("alerts.yml {name}"));
        }
        match prom.query(expr).await {
            Err(e) => failures.push(format!("alert {name}: invalid: {e}")),
            Ok(r) => {
                if r.is_empty() && ALERTS_THE_WORKLOAD_RAISES.contains(&name.as_str()) {
                    failures.push(format!(
                        "alert {name}: the workload made its condition true, yet it returned nothing"
                    ));
                }
                alert_data.push(format!("{name}: {} series", r.len()));
            }
        }
    }
    let loaded = prom.api("/api/v1/rules", &[]).await.unwrap();
    let mut loaded_rules: BTreeMap<String, (String, String, String)> = BTreeMap::new();
    for g in loaded["groups"].as_array().into_iter().flatten() {
        for r in g["rules"].as_array().into_iter().flatten() {
            loaded_rules.insert(
                r["name"].as_str().unwrap_or("").into(),
                (
                    r["health"].as_str().unwrap_or("").into(),
                    r["lastError"].as_str().unwrap_or("").into(),
                    r["state"].as_str().unwrap_or("").into(),
                ),
            );
        }
    }
    for (name, _) in &rules {
        match loaded_rules.get(name) {
            None => failures.push(format!("alert {name} is not loaded by Prometheus")),
            Some((health, err, state)) => {
                if health != "ok" {
                    failures.push(format!("alert {name}: rule health {health}: {err}"));
                }
                if ALERTS_THE_WORKLOAD_RAISES.contains(&name.as_str())
                    && state != "pending"
                    && state != "firing"
                {
                    failures.push(format!(
                        "alert {name} is {state}, expected pending or firing"
                    ));
                }
            }
        }
    }

    // Every metric name anywhere has series, but for the events this workload does not cause.
    let mut not_caused_seen = vec![];
    for (name, first_use) in &names {
        let n = prom.series(name).await.unwrap();
        if n == 0 {
            if not_caused.contains(name.as_str()) {
                not_caused_seen.push(name.clone());
            } else {
                failures.push(format!(
                    "metric {name} (used by {first_use}) has no series: no service exports it"
                ));
            }
        }
    }

    report.push(format!(
        "{} PromQL panel queries (x2: All and one value), {} alert rules, {} metric names; \
         {} Prometheus variables",
        prom_queries.len(),
        rules.len(),
        names.len(),
        variables
            .iter()
            .filter(|v| v.ds.as_deref() == Some("prometheus"))
            .count()
    ));
    report.push(format!("alert expressions now: {}", alert_data.join(", ")));
    report.push(format!(
        "empty, allowed (events not caused): {empty_allowed:#?}"
    ));
    report.push(format!(
        "metrics without series, allowed: {not_caused_seen:?}"
    ));
    eprintln!("{}", report.join("\n"));
    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}\nlogs in {}",
        failures.len(),
        failures.join("\n"),
        stack.dir.display()
    );
    prom.stop().await;
    stack.stop().await;
    eprintln!("total {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_field_a_logql_query_uses_is_in_the_services_json_log_lines() {
    let (queries, variables) = dashboard_queries();
    let loki: Vec<&PanelQuery> = queries.iter().filter(|q| q.ds == "loki").collect();
    assert!(!loki.is_empty(), "no LogQL query in the dashboards");
    let pt = promtail();

    let stack = Stack::start_healthy(StackOptions {
        fault_injection: true,
        env: vec![("GPUQ_DELIVERY_LIMIT".into(), "2".into())],
        ..Default::default()
    })
    .await;
    // Successes, then a retried job and a dead letter, then a worker crash (an error line).
    // One batch at a time, on free GPUs (see `workload`).
    let mut ids = stack
        .submit_many(
            8,
            8,
            &json!({"kind": "simulate", "params": {"duration_ms": 50}}),
        )
        .await
        .unwrap();
    stack
        .wait_final(&ids, Duration::from_secs(60))
        .await
        .unwrap();
    let retried = stack
        .submit_ok(&json!({"kind": "simulate", "params": {"duration_ms": 50, "fail_times": 1}}))
        .await
        .unwrap();
    let poison = stack
        .submit_ok(&json!({"kind": "simulate", "params": {"always_fail": true}}))
        .await
        .unwrap();
    ids.extend([retried, poison]);
    stack
        .wait_final(&ids, Duration::from_secs(60))
        .await
        .unwrap();
    stack.arm_fault(2, "crash_mid_task", 1).await.unwrap();
    let crash = stack
        .submit_many(
            4,
            4,
            &json!({"kind": "simulate", "params": {"duration_ms": 400}}),
        )
        .await
        .unwrap();
    stack
        .wait_final(&crash, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(stack.workers[2].restarts() > 0, "worker-3 did not crash");
    let dir = stack.dir.clone();
    stack.stop().await;

    let services: Vec<String> = ["gateway", "manager", "worker-1", "worker-2", "worker-3"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (lines, mut failures) = read_logs(&dir, &services);

    // Every line: the fields every query relies on, the right service name, a known level.
    for l in &lines {
        for f in ["timestamp", "level", "service", "target", "message"] {
            if !l.fields.get(f).is_some_and(Value::is_string) {
                failures.push(format!("{}: no string {f}: {}", l.file, l.raw));
            }
        }
        let want_service = l.file.split('-').next().unwrap();
        if l.field("service") != want_service {
            failures.push(format!(
                "{}: service is not {want_service}: {}",
                l.file, l.raw
            ));
        }
        if !["trace", "debug", "info", "warn", "error"].contains(&l.field("level").as_str()) {
            failures.push(format!("{}: unknown level: {}", l.file, l.raw));
        }
        let wid = l.field("worker_id");
        if l.file.starts_with("worker-") && !wid.is_empty() && wid != l.file {
            failures.push(format!("{}: worker_id {wid}: {}", l.file, l.raw));
        }
    }

    // Every LogQL query: each label and field it names is in the lines it selects from, and,
    // run over the real lines with "All" selected and with each concrete value of its
    // variables, it finds lines.
    let worker_var = variables
        .iter()
        .find(|v| v.name == "worker" && v.ds.as_deref() == Some("loki"));
    let worker_all = worker_var
        .and_then(|v| v.all_value.clone())
        .unwrap_or_else(|| ".*".into());
    let mut worker_values: BTreeSet<String> = BTreeSet::new();
    for v in &variables {
        if v.ds.as_deref() != Some("loki") || v.kind != "query" {
            continue;
        }
        let (selector, label) = label_values_query(&v.query)
            .unwrap_or_else(|| panic!("{} variable {}: {}", v.file, v.name, v.query));
        if !pt.labels.contains(&label) {
            failures.push(format!(
                "{} variable {}: {label} is not a Promtail label",
                v.file, v.name
            ));
        }
        let q = parse_logql(&selector);
        let vals: BTreeSet<String> = q
            .select(&lines, &pt)
            .iter()
            .map(|l| {
                pt.from_json
                    .get(&label)
                    .map(|f| l.field(f))
                    .unwrap_or_default()
            })
            .filter(|s| !s.is_empty())
            .collect();
        if v.name == "worker" {
            worker_values = vals.clone();
        }
        if vals.is_empty() {
            failures.push(format!(
                "{} variable {}: no values in the logs",
                v.file, v.name
            ));
        }
    }
    let want_workers: BTreeSet<String> = ["worker-1", "worker-2", "worker-3"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if worker_var.is_some() && worker_values != want_workers {
        failures.push(format!(
            "the worker variable finds {worker_values:?}, expected {want_workers:?}"
        ));
    }
    let job_id = retried.to_string();
    let mut fields_used: BTreeSet<String> = BTreeSet::new();
    for pq in &loki {
        let where_ = format!("{} / {}", pq.file, pq.panel);
        let mut runs: Vec<(String, HashMap<&str, String>)> = vec![];
        let mut base: HashMap<&str, String> = HashMap::new();
        base.insert("__interval", "1m".into());
        base.insert("__rate_interval", "1m".into());
        base.insert("job_id", job_id.clone());
        let mut all = base.clone();
        all.insert("worker", worker_all.clone());
        runs.push(("All".into(), all));
        if pq.expr.contains("$worker") {
            for w in &want_workers {
                let mut one = base.clone();
                one.insert("worker", w.clone());
                runs.push((format!("worker={w}"), one));
            }
        }
        for (which, vals) in runs {
            let q = parse_logql(&substitute(&pq.expr, &vals));
            // Labels in the selector and groupings are stream labels (Promtail's); fields after
            // `| json` are the line's own.
            for m in &q.selector {
                fields_used.insert(m.name.clone());
                if !pt.labels.contains(&m.name) {
                    failures.push(format!("{where_}: {} is not a Promtail label", m.name));
                }
            }
            for g in &q.group_by {
                fields_used.insert(g.clone());
                if !pt.labels.contains(g) {
                    failures.push(format!("{where_}: groups by {g}, not a Promtail label"));
                }
            }
            if !q.field_filters.is_empty() && !q.json {
                failures.push(format!("{where_}: filters fields without | json"));
            }
            for m in &q.field_filters {
                fields_used.insert(m.name.clone());
            }
            // The lines the selector's service matchers allow: every field the query names
            // must occur among them.
            let of_services: Vec<&LogLine> = lines
                .iter()
                .filter(|l| {
                    q.selector
                        .iter()
                        .filter(|m| m.name == "service")
                        .all(|m| m.matches(&l.field("service")))
                })
                .collect();
            let named: BTreeSet<&String> = q
                .selector
                .iter()
                .map(|m| pt.from_json.get(&m.name).unwrap_or(&m.name))
                .chain(q.group_by.iter().map(|g| pt.from_json.get(g).unwrap_or(g)))
                .chain(q.field_filters.iter().map(|m| &m.name))
                .collect();
            for f in named {
                if !of_services
                    .iter()
                    .any(|l| l.fields.contains_key(f.as_str()))
                {
                    failures.push(format!(
                        "{where_} ({which}): field {f} is in none of the {} lines it selects from",
                        of_services.len()
                    ));
                }
            }
            let hits = q.select(&lines, &pt);
            if hits.is_empty() {
                failures.push(format!("{where_} ({which}): finds no line: {}", pq.expr));
            }
            if q.field_filters.iter().any(|m| m.name == "job_id") {
                // One job's lines: its retried attempt shows up as started, retried, started,
                // finished.
                if hits.len() < 3 || hits.iter().any(|l| l.field("job_id") != job_id) {
                    failures.push(format!(
                        "{where_}: job {job_id}: {} lines: {:?}",
                        hits.len(),
                        hits.iter().map(|l| &l.raw).collect::<Vec<_>>()
                    ));
                }
            }
        }
    }
    for f in ["job_id", "level", "service", "worker_id"] {
        if !fields_used.contains(f) {
            failures.push(format!(
                "no LogQL query uses {f} (the Logs dashboard should)"
            ));
        }
    }

    // Worker lines without a worker_id (e.g. written before the worker knows its id) must not
    // vanish from the worker panels when "All" workers are selected.
    let worker_lines: Vec<&LogLine> = lines
        .iter()
        .filter(|l| l.field("service") == "worker")
        .collect();
    let without: Vec<&LogLine> = worker_lines
        .iter()
        .copied()
        .filter(|l| l.field("worker_id").is_empty())
        .collect();
    let all_workers = Matcher {
        name: "worker_id".into(),
        op: "=~".into(),
        value: worker_all.clone(),
    };
    if !without.is_empty() && !all_workers.matches("") {
        failures.push(format!(
            "{} of {} worker lines have no worker_id, and the worker variable's \"All\" value \
             {worker_all:?} hides them, e.g. {}",
            without.len(),
            worker_lines.len(),
            without[0].raw
        ));
    }

    // Promtail: only low-cardinality fields become stream labels. Measured on the real lines:
    // a label taken from the JSON has a handful of values; a field with many values (job_id,
    // timestamp, message) is never a label.
    let mut distinct: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for l in &lines {
        for k in l.fields.keys() {
            distinct.entry(k.clone()).or_default().insert(l.field(k));
        }
    }
    for (label, field) in &pt.from_json {
        let n = distinct.get(field).map_or(0, BTreeSet::len);
        if n > 10 {
            failures.push(format!(
                "Promtail makes {field} a label; it took {n} values in one short run"
            ));
        }
        if n == 0 {
            failures.push(format!(
                "Promtail label {label} comes from field {field}, which no line has"
            ));
        }
    }
    for (field, values) in &distinct {
        if values.len() > 10 && pt.from_json.values().any(|f| f == field) {
            failures.push(format!(
                "high-cardinality field {field} is a Promtail label"
            ));
        }
    }
    for high in ["job_id", "timestamp", "message"] {
        if pt.labels.contains(high) {
            failures.push(format!("Promtail makes {high} a label"));
        }
        let n = distinct.get(high).map_or(0, BTreeSet::len);
        assert!(
            n > 10,
            "{high}: only {n} values; the run is too small to judge"
        );
    }
    eprintln!(
        "{} log lines; {} LogQL queries; fields used {fields_used:?}; Promtail labels {:?}; \
         label values {:?}; {} of {} worker lines without worker_id",
        lines.len(),
        loki.len(),
        pt.labels,
        pt.from_json
            .values()
            .map(|f| (f, distinct.get(f).map_or(0, BTreeSet::len)))
            .collect::<Vec<_>>(),
        without.len(),
        worker_lines.len()
    );
    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}\nlogs in {}",
        failures.len(),
        failures.join("\n"),
        dir.display()
    );
}

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
