//! A LogQL reader for the dashboards' log queries: parsed, and run over the services' JSON log
//! lines the way Loki would, with labels as Promtail makes them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use gpuq_e2e::repo_root;
use regex::Regex;
use serde_json::Value;

/// A label or field matcher: `name op "value"`.
#[derive(Debug, Clone)]
pub struct Matcher {
    pub name: String,
    pub op: String,
    pub value: String,
}

impl Matcher {
    pub fn matches(&self, actual: &str) -> bool {
        match self.op.as_str() {
            "=" => actual == self.value,
            "!=" => actual != self.value,
            "=~" | "!~" => {
                let re = Regex::new(&format!("^(?:{})$", self.value))
                    .unwrap_or_else(|e| panic!("bad regex {:?}: {e}", self.value));
                re.is_match(actual) == (self.op == "=~")
            }
            op => panic!("unknown matcher op {op}"),
        }
    }
}

/// The parts of a LogQL query that name labels and fields.
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    pub selector: Vec<Matcher>,
    pub line_filters: Vec<(String, String)>,
    pub json: bool,
    pub field_filters: Vec<Matcher>,
    pub group_by: Vec<String>,
}

/// Reads `"…"` (with escapes) at the start of `s`: the value and the rest.
pub fn read_string(s: &str) -> Option<(String, &str)> {
    let rest = s.strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = rest.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                let (_, n) = chars.next()?;
                out.push(n);
            }
            '"' => return Some((out, &rest[i + 1..])),
            c => out.push(c),
        }
    }
    None
}

/// `name op "value"` at the start of `s`.
pub fn read_matcher(s: &str) -> Option<(Matcher, &str)> {
    let s = s.trim_start();
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    if end == 0 {
        return None;
    }
    let name = &s[..end];
    let s = s[end..].trim_start();
    let op = ["=~", "!~", "!=", "="]
        .into_iter()
        .find(|op| s.starts_with(op))?;
    let (value, rest) = read_string(s[op.len()..].trim_start())?;
    Some((
        Matcher {
            name: name.to_string(),
            op: op.to_string(),
            value,
        },
        rest,
    ))
}

pub fn parse_logql(expr: &str) -> LogQuery {
    let mut q = LogQuery::default();
    let open = expr
        .find('{')
        .unwrap_or_else(|| panic!("no stream selector: {expr}"));
    let mut s = &expr[open + 1..];
    loop {
        s = s.trim_start().trim_start_matches(',').trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            s = rest;
            break;
        }
        let (m, rest) = read_matcher(s).unwrap_or_else(|| panic!("bad selector in {expr}"));
        q.selector.push(m);
        s = rest;
    }
    loop {
        s = s.trim_start();
        if let Some(op) = ["|=", "!=", "|~", "!~"]
            .into_iter()
            .find(|o| s.starts_with(o))
        {
            let (v, rest) = read_string(s[2..].trim_start())
                .unwrap_or_else(|| panic!("bad line filter in {expr}"));
            q.line_filters.push((op.to_string(), v));
            s = rest;
        } else if let Some(rest) = s.strip_prefix('|') {
            let rest = rest.trim_start();
            if let Some(after) = rest.strip_prefix("json") {
                q.json = true;
                s = after;
            } else if let Some((m, after)) = read_matcher(rest) {
                q.field_filters.push(m);
                s = after;
            } else {
                panic!("unsupported LogQL stage in {expr}: |{rest}");
            }
        } else {
            break;
        }
    }
    let by = Regex::new(r"\b(?:by|without)\s*\(([^)]*)\)").unwrap();
    for c in by.captures_iter(expr) {
        q.group_by.extend(
            c[1].split(',')
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty()),
        );
    }
    q
}

/// One log line of one service's file.
pub struct LogLine {
    pub file: String,
    pub raw: String,
    pub fields: serde_json::Map<String, Value>,
}

impl LogLine {
    pub fn field(&self, name: &str) -> String {
        match self.fields.get(name) {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
        }
    }
}

/// Promtail's config: the stream labels it attaches, and which of them come from gpuq's JSON
/// fields (label -> field).
pub struct Promtail {
    pub labels: BTreeSet<String>,
    pub from_json: BTreeMap<String, String>,
}

pub fn promtail() -> Promtail {
    let text = std::fs::read_to_string(repo_root().join("loki/promtail.yml")).unwrap();
    let v: Value = serde_yaml::from_str(&text).unwrap();
    let mut labels = BTreeSet::new();
    let mut extracted: BTreeMap<String, String> = BTreeMap::new();
    let mut from_json = BTreeMap::new();
    for sc in v["scrape_configs"].as_array().into_iter().flatten() {
        for rc in sc["relabel_configs"].as_array().into_iter().flatten() {
            if let Some(t) = rc["target_label"].as_str() {
                labels.insert(t.to_string());
            }
        }
        // Stages before `output` read Docker's json-file envelope (its stream, the compose
        // labels): labels made from them are stream metadata, no field of gpuq's lines.
        let mut in_envelope = sc["pipeline_stages"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|stage| stage.get("output").is_some());
        for stage in sc["pipeline_stages"].as_array().into_iter().flatten() {
            if stage.get("output").is_some() {
                in_envelope = false;
                continue;
            }
            if in_envelope {
                if let Some(ls) = stage["labels"].as_object() {
                    labels.extend(ls.keys().cloned());
                }
                continue;
            }
            if let Some(exprs) = stage["json"]["expressions"].as_object() {
                for (k, e) in exprs {
                    let src = e.as_str().filter(|s| !s.is_empty()).unwrap_or(k);
                    extracted.insert(k.clone(), src.to_string());
                }
            }
            if let Some(ls) = stage["labels"].as_object() {
                for (k, src) in ls {
                    let key = src.as_str().filter(|s| !s.is_empty()).unwrap_or(k);
                    labels.insert(k.clone());
                    if let Some(field) = extracted.get(key) {
                        from_json.insert(k.clone(), field.clone());
                    }
                }
            }
        }
    }
    Promtail { labels, from_json }
}

impl LogQuery {
    /// Runs the query's selection over the lines as Loki would over Promtail's streams: the
    /// selector sees only stream labels (absent = ""), the line filters the raw line, the field
    /// filters the JSON fields.
    pub fn select<'a>(&self, lines: &'a [LogLine], p: &Promtail) -> Vec<&'a LogLine> {
        lines
            .iter()
            .filter(|l| {
                self.selector.iter().all(|m| {
                    let v = p
                        .from_json
                        .get(&m.name)
                        .map(|f| l.field(f))
                        .unwrap_or_default();
                    m.matches(&v)
                })
            })
            .filter(|l| {
                self.line_filters.iter().all(|(op, v)| match op.as_str() {
                    "|=" => l.raw.contains(v.as_str()),
                    "!=" => !l.raw.contains(v.as_str()),
                    "|~" | "!~" => Regex::new(v).unwrap().is_match(&l.raw) == (op == "|~"),
                    _ => unreachable!(),
                })
            })
            .filter(|l| {
                self.field_filters
                    .iter()
                    .all(|m| m.matches(&l.field(&m.name)))
            })
            .collect()
    }
}

/// Every line of the stack's service logs; the harness's own `restart N` notes are skipped,
/// anything else that is not a JSON object is an error.
pub fn read_logs(dir: &Path, services: &[String]) -> (Vec<LogLine>, Vec<String>) {
    let mut lines = vec![];
    let mut problems = vec![];
    for s in services {
        let text = std::fs::read_to_string(dir.join(format!("{s}.log"))).unwrap_or_default();
        if text.is_empty() {
            problems.push(format!("{s}.log is empty"));
        }
        for raw in text.lines() {
            if raw.starts_with("restart ") || raw.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Value>(raw) {
                Ok(Value::Object(fields)) => lines.push(LogLine {
                    file: s.clone(),
                    raw: raw.to_string(),
                    fields,
                }),
                _ => problems.push(format!("{s}.log: not a JSON object: {raw}")),
            }
        }
    }
    (lines, problems)
}
