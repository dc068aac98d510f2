//! One PromQL expression checked against what is known: its metric names, label matchers and
//! job names; dashboard variables found and substituted.

use super::*;

/// One PromQL expression's metric names, label matchers and job names.
pub(super) fn check_promql(errors: &mut Vec<String>, k: &Known, wher: &str, expr: &str) {
    let selector = re(r"([a-zA-Z_:][\w:]*)?\s*\{([^}]*)\}");
    let matcher = re(r#"(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)""#);
    for cap in selector.captures_iter(expr) {
        let metric = cap.get(1).map_or("", |m| m.as_str());
        for m in matcher.captures_iter(&cap[2]) {
            let (label, op, value) = (&m[1], &m[2], &m[3]);
            if label == "job" && (op == "=" || op == "=~") {
                let pat = if op == "=~" {
                    value.replace("\\\\", "\\")
                } else {
                    regex::escape(value)
                };
                let full = Regex::new(&format!("^(?:{pat})$"));
                if !full.is_ok_and(|r| JOBS.iter().any(|j| r.is_match(j))) {
                    errors.push(format!(
                        "{wher}: job matcher {label}{op}\"{value}\" matches no scrape job"
                    ));
                }
            }
            let base = k.histogram_series(metric);
            if !k.defined(metric) && base.is_none() {
                continue; // not gpuq's (or unknown: reported below)
            }
            let family = base.as_deref().unwrap_or(metric);
            let mut known = k.labels_of.get(family).cloned().unwrap_or_default();
            known.extend(TARGET_LABELS.iter().map(|l| l.to_string()));
            if metric.ends_with("_bucket") {
                known.insert("le".into());
            }
            if !known.contains(label) {
                errors.push(format!(
                    "{wher}: {metric} has no label {label:?} (it has {known:?})"
                ));
            }
        }
    }
    // Metric names: drop strings, selectors, ranges and grouping clauses; what is left and is
    // not a function call, keyword or number is a metric name.
    let mut rest = re(r#""(?:[^"\\]|\\.)*""#)
        .replace_all(expr, "\"\"")
        .into_owned();
    rest = re(r"\{[^}]*\}").replace_all(&rest, " ").into_owned();
    rest = re(r"\[[^\]]*\]").replace_all(&rest, " ").into_owned();
    rest = re(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
        .replace_all(&rest, " ")
        .into_owned();
    for cap in re(r"([a-zA-Z_:][\w:]*)(\s*\()?").captures_iter(&rest) {
        let m = cap.get(1).expect("a name");
        let before = rest[..m.start()].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.') {
            continue; // inside a number or a longer name
        }
        let name = m.as_str();
        if cap.get(2).is_some() || KEYWORDS.contains(&name) {
            continue;
        }
        if name.starts_with("gpuq_") {
            if !k.defined(name) && k.histogram_series(name).is_none() {
                errors.push(format!(
                    "{wher}: metric {name} is not a family any gpuq service registers"
                ));
            }
        } else if !PROCESS.contains(&name) && !RABBITMQ.contains(&name) && !OTHER.contains(&name) {
            errors.push(format!(
                "{wher}: metric {name} is neither gpuq's, process_*, up, nor a verified RabbitMQ \
                 3.10 plugin metric"
            ));
        }
    }
}

pub(super) fn variables(expr: &str) -> BTreeSet<String> {
    re(r"\$(\w+)|\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]")
        .captures_iter(expr)
        .filter_map(|c| c.get(1).or(c.get(2)).or(c.get(3)))
        .map(|m| m.as_str().to_string())
        .collect()
}

pub(super) fn substitute(expr: &str) -> String {
    re(r"\$(\w+)|\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]")
        .replace_all(expr, |c: &regex::Captures| {
            let name = c
                .get(1)
                .or(c.get(2))
                .or(c.get(3))
                .map_or("", |m| m.as_str());
            match name {
                "__rate_interval" | "__interval" => "1m",
                "engine" | "pool" | "worker" => ".*",
                "job_id" => "0190a5e2-0000-7000-8000-000000000000",
                _ => "x",
            }
            .to_string()
        })
        .into_owned()
}
