//! Every field a LogQL query of the dashboards uses is in the services' real JSON log lines, and
//! each query, run over those lines the way Loki would, finds lines.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use gpuq_e2e::{Stack, StackOptions};
use serde_json::{Value, json};

use super::files::*;
use super::logql::*;

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
