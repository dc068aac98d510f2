//! Every Grafana dashboard: datasources, variables, PromQL and LogQL queries.

use super::*;

/// The datasource uid a reference names, if it is a provisioned one of the right type.
pub(super) fn datasource(
    errors: &mut Vec<String>,
    k: &Known,
    wher: &str,
    r: &Value,
) -> Option<String> {
    let uid = r["uid"].as_str().filter(|u| k.datasources.contains_key(*u));
    let Some(uid) = uid else {
        errors.push(format!(
            "{wher}: datasource {r} is not a provisioned uid {:?}",
            k.datasources.keys()
        ));
        return None;
    };
    if let Some(t) = r["type"].as_str()
        && t != k.datasources[uid]
    {
        errors.push(format!(
            "{wher}: datasource type {t} != provisioned {}",
            k.datasources[uid]
        ));
    }
    Some(uid.to_string())
}

/// The dashboard's variables (checked).
pub(super) fn check_variables(
    errors: &mut Vec<String>,
    k: &Known,
    rel: &str,
    d: &Value,
) -> BTreeSet<String> {
    let mut defined = BTreeSet::new();
    for v in arr(&d["templating"]["list"]) {
        let name = s(&v["name"]);
        defined.insert(name.to_string());
        if !ALLOWED_VARS.contains(&name) {
            errors.push(format!(
                "{rel}: variable {name:?} is not one of {ALLOWED_VARS:?}"
            ));
        }
        if v["type"] != "query" {
            continue;
        }
        let wher = format!("{rel} variable {name}");
        let vds = datasource(errors, k, &wher, &v["datasource"]);
        let q = if v["query"].is_object() {
            s(&v["query"]["query"])
        } else {
            s(&v["query"])
        };
        let Some(m) = re(r"^\s*label_values\(\s*(.*?)\s*,\s*(\w+)\s*\)\s*$").captures(q) else {
            errors.push(format!(
                "{wher}: query {q:?} is not label_values(<selector>, <label>)"
            ));
            continue;
        };
        match vds.as_deref() {
            Some("prometheus") => {
                check_promql(errors, k, &wher, &m[1]);
                let metric = re(r"^[a-zA-Z_:][\w:]*")
                    .find(&m[1])
                    .map_or("", |x| x.as_str());
                let has = k.labels_of.get(metric).is_some_and(|l| l.contains(&m[2]))
                    || TARGET_LABELS.contains(&&m[2]);
                if !has {
                    errors.push(format!("{wher}: {} has no label {:?}", &m[1], &m[2]));
                }
            }
            Some("loki") if !k.stream_labels.contains(&m[2]) => {
                errors.push(format!("{wher}: {:?} is not a Promtail label", &m[2]));
            }
            _ => {}
        }
    }
    defined
}

pub(super) fn check_loki_query(errors: &mut Vec<String>, k: &Known, wher: &str, expr: &str) {
    for sel in re(r"\{([^}]*)\}").captures_iter(expr) {
        for l in re(r#"(\w+)\s*(?:=~|!~|!=|=)\s*""#).captures_iter(&sel[1]) {
            if !k.stream_labels.contains(&l[1]) {
                errors.push(format!(
                    "{wher}: stream selector label {:?} is not a Promtail label {:?}",
                    &l[1], k.stream_labels
                ));
            }
        }
    }
    if let Some((_, after)) = expr.split_once("| json") {
        for f in re(r"\|\s*(\w+)\s*(?:=~|!~|!=|=)").captures_iter(after) {
            if !LOG_FIELDS.contains(&&f[1]) {
                errors.push(format!(
                    "{wher}: filters on {:?}, not a field of gpuq's log lines",
                    &f[1]
                ));
            }
        }
    }
    for group in re(r"\b(?:by|without)\s*\(([^)]*)\)").captures_iter(expr) {
        for l in re(r"\w+").find_iter(&group[1]) {
            if !k.stream_labels.contains(l.as_str()) {
                errors.push(format!(
                    "{wher}: groups by {:?}, not a Promtail label",
                    l.as_str()
                ));
            }
        }
    }
}

/// Checks every dashboard; answers each PromQL expression as a recording rule (variables
/// substituted), for promtool to parse.
pub(super) fn check_dashboards(errors: &mut Vec<String>, k: &Known) -> Vec<Value> {
    let mut recording = vec![];
    let (mut uids, mut titles) = (BTreeMap::new(), BTreeMap::new());
    let dir = repo_root().join("grafana/dashboards");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("grafana/dashboards")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|f| f.ends_with(".json"))
        .collect();
    files.sort();
    for want in ["overview.json", "engines.json", "logs.json"] {
        if !files.iter().any(|f| f == want) {
            errors.push(format!("grafana/dashboards/{want} is missing"));
        }
    }
    for fname in &files {
        let rel = format!("grafana/dashboards/{fname}");
        let d = load(errors, &rel);
        for (key, seen) in [("uid", &mut uids), ("title", &mut titles)] {
            match d[key].as_str() {
                None | Some("") => errors.push(format!("{rel}: has no {key}")),
                Some(v) => {
                    if let Some(other) = seen.insert(v.to_string(), rel.clone()) {
                        errors.push(format!("{rel}: {key} {v:?} is also used by {other}"));
                    }
                }
            }
        }
        if d["schemaVersion"].as_u64().is_none_or(|v| v < 36) {
            errors.push(format!(
                "{rel}: schemaVersion {} (want 36 or later)",
                d["schemaVersion"]
            ));
        }
        let defined_vars = check_variables(errors, k, &rel, &d);
        let mut panels = vec![];
        for p in arr(&d["panels"]) {
            panels.push(p);
            panels.extend(arr(&p["panels"])); // collapsed rows keep their panels inside
        }
        let (mut ids, mut panel_titles) = (BTreeSet::new(), BTreeSet::new());
        for p in panels {
            if !ids.insert(p["id"].to_string()) {
                errors.push(format!("{rel}: panel id {} is used twice", p["id"]));
            }
            if p["type"] == "row" {
                continue;
            }
            let title = s(&p["title"]);
            let wher = format!("{rel} panel {title:?}");
            if title.is_empty() || !panel_titles.insert(title.to_string()) {
                errors.push(format!("{wher}: panel titles must be present and unique"));
            }
            let panel_ds = datasource(errors, k, &wher, &p["datasource"]);
            if arr(&p["targets"]).is_empty() {
                errors.push(format!("{wher}: has no query"));
            }
            for t in arr(&p["targets"]) {
                let expr = s(&t["expr"]);
                let target_ds = if t["datasource"].is_null() {
                    &p["datasource"]
                } else {
                    &t["datasource"]
                };
                let tds = datasource(errors, k, &wher, target_ds).or(panel_ds.clone());
                if expr.trim().is_empty() {
                    errors.push(format!("{wher}: target {} has no expr", t["refId"]));
                    continue;
                }
                let used = variables(expr);
                for v in &used {
                    if !ALLOWED_VARS.contains(&v.as_str()) {
                        errors.push(format!(
                            "{wher}: uses variable ${v}; only {ALLOWED_VARS:?} may be used"
                        ));
                    } else if !v.starts_with("__") && !defined_vars.contains(v) {
                        errors.push(format!(
                            "{wher}: uses ${v}, which the dashboard does not define"
                        ));
                    }
                }
                match tds.as_deref() {
                    Some("prometheus") => {
                        check_promql(errors, k, &wher, expr);
                        recording.push(json!({
                            "record": format!("gpuq:dashboard_expr_{}", recording.len()),
                            "expr": substitute(expr),
                            "labels": {"source": format!("{fname}: {title}")},
                        }));
                    }
                    Some("loki") => check_loki_query(errors, k, &wher, expr),
                    _ => {}
                }
            }
        }
    }
    recording
}
