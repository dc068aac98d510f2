//! Every PromQL expression of the dashboards and alert rules, evaluated by a real Prometheus that
//! scrapes a stack running a workload: valid, returning data where the workload causes it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use anyhow::bail;
use gpuq_common::JobStatus;
use gpuq_e2e::{Stack, StackOptions, repo_root};
use serde_json::{Value, json};
use uuid::Uuid;

use super::files::*;
use super::prometheus::*;

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
