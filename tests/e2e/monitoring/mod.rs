//! Static checks of the monitoring configuration, starting no service: the Prometheus configs and
//! alert rules (promtool), the alert rules' unit tests, the Grafana provisioning and dashboards,
//! the Loki and Promtail configs, and a cross-check of every metric name, label and variable a
//! dashboard or an alert uses against the families gpuq registers (`metrics::catalog`), the
//! labels the Prometheus configs attach, and what RabbitMQ 3.10's prometheus plugin exports.
//! The live evaluation of every expression is `observability::live_promql`'s.
//!
//! The checks sit one file per theme (what the files are held against, PromQL, the configs and
//! alert rules, the dashboards); the tests and the helpers the checks share are here.
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use gpuq_common::metrics::{Kind, catalog};
use gpuq_e2e::repo_root;
use regex::Regex;
use serde_json::{Value, json};

mod configs;
mod dashboards;
mod known;
mod promql;

use configs::*;
use dashboards::*;
use known::*;
use promql::*;

fn re(pattern: &str) -> Regex {
    Regex::new(pattern).expect("a valid pattern")
}

/// A YAML or JSON file of the checkout as JSON values (`None` and an error when unreadable).
fn load(errors: &mut Vec<String>, rel: &str) -> Value {
    let text = match std::fs::read_to_string(repo_root().join(rel)) {
        Ok(t) => t,
        Err(e) => {
            errors.push(format!("{rel}: cannot read: {e}"));
            return Value::Null;
        }
    };
    let parsed = if rel.ends_with(".json") {
        serde_json::from_str(&text).map_err(|e| e.to_string())
    } else {
        serde_yaml::from_str(&text).map_err(|e| e.to_string())
    };
    parsed.unwrap_or_else(|e| {
        errors.push(format!("{rel}: not valid: {e}"));
        Value::Null
    })
}

fn arr(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], Vec::as_slice)
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// Runs promtool with `args` in the checkout; its complaints, if it fails.
fn promtool(args: &[&str]) -> Option<String> {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("promtool (Debian package prometheus) is installed by scripts/test.sh");
    (!out.status.success()).then(|| {
        format!(
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn promtool_accepts_the_prometheus_configs_the_alert_rules_and_their_unit_tests() {
    let failures: Vec<String> = [
        vec!["check", "config", "deploy/prometheus/prometheus.yml"],
        vec!["check", "config", "deploy/prometheus/prometheus.local.yml"],
        vec!["check", "rules", "deploy/prometheus/alerts.yml"],
        vec!["test", "rules", "deploy/prometheus/alerts_test.yml"],
    ]
    .iter()
    .filter_map(|args| promtool(args))
    .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn dashboards_alerts_and_log_configs_use_only_what_gpuq_prometheus_and_promtail_provide() {
    let mut errors = vec![];
    let stream_labels = check_loki_and_promtail(&mut errors);
    let datasources = check_grafana_provisioning(&mut errors);
    let known = Known::of_catalog(stream_labels, datasources);
    assert!(
        !known.histograms.is_empty(),
        "the metric catalog lists no histogram"
    );
    check_prometheus_configs(&mut errors);
    check_alerts(&mut errors, &known);
    let recording = check_dashboards(&mut errors, &known);
    assert!(errors.is_empty(), "{}", errors.join("\n"));

    // promtool parses every dashboard PromQL expression, as a recording rule.
    assert!(
        !recording.is_empty(),
        "no dashboard PromQL expression found"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard_exprs.yml");
    let rules = json!({"groups": [{"name": "dashboard-expressions", "rules": recording}]});
    std::fs::write(&file, serde_yaml::to_string(&rules).unwrap()).unwrap();
    if let Some(complaint) = promtool(&["check", "rules", file.to_str().unwrap()]) {
        panic!("{complaint}");
    }
}

#[test]
fn the_promql_check_finds_unknown_metrics_labels_and_jobs() {
    let known = Known::of_catalog(BTreeSet::new(), BTreeMap::new());
    let mut errors = vec![];
    let good = r#"sum by (pool) (rate(gpuq_jobs_started_total{pool=~"$pool", job="gpuq-worker"}[5m])) > 0.5e1"#;
    check_promql(&mut errors, &known, "good", good);
    assert!(errors.is_empty(), "{errors:?}");
    for (bad, why) in [
        ("rate(gpuq_jobs_startd_total[5m])", "gpuq_jobs_startd_total"),
        (
            "gpuq_jobs_started_total{colour=\"red\"}",
            "no label \"colour\"",
        ),
        ("up{job=\"gpuq-gateways\"}", "matches no scrape job"),
        ("node_load1", "node_load1"),
    ] {
        let mut errors = vec![];
        check_promql(&mut errors, &known, "bad", bad);
        assert!(errors.iter().any(|e| e.contains(why)), "{bad}: {errors:?}");
    }
}
