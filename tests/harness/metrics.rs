//! Reading what the services expose: promtool's lint of a `/metrics` page, a family's sum, and
//! job records counted by status.

use std::collections::HashMap;

use gpuq_common::{JobRecord, JobStatus};

/// Lints a `/metrics` exposition with `promtool check metrics` (installed by scripts/test.sh):
/// naming rules, help texts, units. Returns promtool's complaints (empty when clean).
pub fn promtool_lint(text: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is installed by scripts/test.sh");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write metrics");
    let out = child.wait_with_output().expect("promtool ran");
    let mut complaints = String::from_utf8_lossy(&out.stdout).into_owned();
    complaints.push_str(&String::from_utf8_lossy(&out.stderr));
    if !out.status.success() && complaints.trim().is_empty() {
        complaints = format!("promtool exited with {}", out.status);
    }
    complaints.trim().to_string()
}

/// The sample at fraction `p` (0–1) of an ascending, non-empty list (the nearest index).
pub fn percentile(sorted: &[i64], p: f64) -> i64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Sum of every sample of a metric family in Prometheus text (0 when it has none).
pub fn sum_metric(text: &str, name: &str) -> f64 {
    gpuq_common::prom::sum_family(text, name).unwrap_or(0.0)
}

/// Counts of each final status.
pub fn by_status(records: &[JobRecord]) -> HashMap<JobStatus, usize> {
    let mut m = HashMap::new();
    for r in records {
        *m.entry(r.status).or_default() += 1;
    }
    m
}
