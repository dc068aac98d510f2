//! The dashboards and alert rules, as files: their queries, variables and metric names.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use gpuq_e2e::repo_root;
use regex::Regex;
use serde_json::Value;

/// One query of one panel.
#[derive(Debug, Clone)]
pub struct PanelQuery {
    pub file: String,
    pub panel: String,
    /// Data source uid: `prometheus` or `loki`.
    pub ds: String,
    pub expr: String,
}

/// One dashboard variable.
#[derive(Debug, Clone)]
pub struct Variable {
    pub file: String,
    pub name: String,
    pub kind: String,
    pub ds: Option<String>,
    pub query: String,
    pub all_value: Option<String>,
}

pub fn dashboards() -> Vec<(String, Value)> {
    let dir = repo_root().join("grafana/dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("grafana/dashboards")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no dashboard in {}", dir.display());
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("dashboard");
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            let v: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name} is not JSON: {e}"));
            (name, v)
        })
        .collect()
}

pub fn ds_uid(v: &Value) -> Option<String> {
    match v {
        Value::Object(m) => m.get("uid").and_then(Value::as_str).map(String::from),
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// Every panel query (rows' nested panels included) and every variable of every dashboard.
pub fn dashboard_queries() -> (Vec<PanelQuery>, Vec<Variable>) {
    let mut queries = vec![];
    let mut variables = vec![];
    for (file, d) in dashboards() {
        let mut panels: Vec<&Value> = vec![];
        for p in d["panels"].as_array().into_iter().flatten() {
            panels.push(p);
            panels.extend(p["panels"].as_array().into_iter().flatten());
        }
        for p in panels {
            let title = p["title"].as_str().unwrap_or("").to_string();
            for t in p["targets"].as_array().into_iter().flatten() {
                let Some(expr) = t["expr"].as_str() else {
                    continue;
                };
                let ds = ds_uid(&t["datasource"])
                    .or_else(|| ds_uid(&p["datasource"]))
                    .unwrap_or_else(|| panic!("{file} panel {title:?}: no data source"));
                assert!(
                    ds == "prometheus" || ds == "loki",
                    "{file} panel {title:?}: unknown data source {ds}"
                );
                queries.push(PanelQuery {
                    file: file.clone(),
                    panel: title.clone(),
                    ds,
                    expr: expr.to_string(),
                });
            }
        }
        for v in d["templating"]["list"].as_array().into_iter().flatten() {
            let query = match &v["query"] {
                Value::String(s) => s.clone(),
                Value::Object(m) => m
                    .get("query")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                _ => String::new(),
            };
            variables.push(Variable {
                file: file.clone(),
                name: v["name"].as_str().unwrap_or("").to_string(),
                kind: v["type"].as_str().unwrap_or("").to_string(),
                ds: ds_uid(&v["datasource"]),
                query,
                all_value: v["allValue"].as_str().map(String::from),
            });
        }
    }
    (queries, variables)
}

/// (alert name, expression) of every rule in deploy/prometheus/alerts.yml.
pub fn alert_rules() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_root().join("deploy/prometheus/alerts.yml"))
        .expect("alerts.yml");
    let v: Value = serde_yaml::from_str(&text).expect("alerts.yml is YAML");
    let mut out = vec![];
    for g in v["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            let name = r["alert"]
                .as_str()
                .or(r["record"].as_str())
                .expect("rule name");
            out.push((
                name.to_string(),
                r["expr"].as_str().expect("expr").to_string(),
            ));
        }
    }
    assert!(!out.is_empty(), "alerts.yml has no rule");
    out
}

/// `label_values(<selector>, <label>)` of a query variable.
pub fn label_values_query(q: &str) -> Option<(String, String)> {
    let re = Regex::new(r"^\s*label_values\(\s*(.*?)\s*,\s*(\w+)\s*\)\s*$").unwrap();
    let c = re.captures(q)?;
    Some((c[1].to_string(), c[2].to_string()))
}

/// Replaces Grafana variables (`$x`, `${x}`, `${x:fmt}`, `[[x]]`); an unknown variable panics.
pub fn substitute(expr: &str, vals: &HashMap<&str, String>) -> String {
    let re = Regex::new(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)").unwrap();
    re.replace_all(expr, |c: &regex::Captures| {
        let name = c.get(1).or(c.get(2)).or(c.get(3)).expect("group").as_str();
        vals.get(name)
            .unwrap_or_else(|| panic!("{expr}: unknown dashboard variable ${name}"))
            .clone()
    })
    .into_owned()
}

/// The expression without its string literals (label values, regexes).
pub fn strip_strings(expr: &str) -> String {
    let mut out = String::new();
    let (mut in_str, mut escaped) = (false, false);
    for c in expr.chars() {
        if in_str {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
                out.push_str("\"\"");
            }
            continue;
        }
        if c == '"' {
            in_str = true;
        } else {
            out.push(c);
        }
    }
    out
}

/// Metric names a PromQL expression uses: gpuq's, RabbitMQ's, the process collector's, `up`.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    strip_strings(expr)
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| {
            t.starts_with("gpuq_")
                || t.starts_with("rabbitmq_")
                || t.starts_with("process_")
                || *t == "up"
        })
        .map(String::from)
        .collect()
}
