//! Just enough of the Prometheus text format to read counters: the sum of one metric family's
//! samples across all label sets, or across those with one label value. The CLI reads workers'
//! `/metrics` with it, and so do the end-to-end tests.

/// Sum of every sample named exactly `name` (any labels); `None` when there is none.
/// Histogram and summary series (`name_bucket`, `name_sum`) are other names and never match.
pub fn sum_family(text: &str, name: &str) -> Option<f64> {
    sum_samples(text, name, |_| true)
}

/// Like [`sum_family`], over the samples whose label `label` is `value`.
pub fn sum_family_where(text: &str, name: &str, label: &str, value: &str) -> Option<f64> {
    sum_samples(text, name, |labels| {
        label_pairs(labels).any(|(k, v)| k == label && v == value)
    })
}

fn sum_samples(text: &str, name: &str, keep: impl Fn(&str) -> bool) -> Option<f64> {
    let mut total = None;
    for line in text.lines() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((sample_name, labels, value)) = parse_sample(line) else {
            continue;
        };
        if sample_name == name && value.is_finite() && keep(labels) {
            *total.get_or_insert(0.0) += value;
        }
    }
    total
}

/// `(name, labels, value)` of one sample line: `name{labels} value [timestamp]`; `labels` is
/// what is inside the braces (empty without them).
fn parse_sample(line: &str) -> Option<(&str, &str, f64)> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = "";
    if rest.starts_with('{') {
        let end = labels_end(rest)?;
        labels = &rest[1..end - 1];
        rest = &rest[end..];
    }
    let value = rest.split_whitespace().next()?;
    Some((name, labels, parse_value(value)?))
}

/// The `name="value"` pairs of a label set (values as written, escapes kept).
fn label_pairs(labels: &str) -> impl Iterator<Item = (&str, &str)> {
    let mut rest = labels;
    std::iter::from_fn(move || {
        rest = rest.trim_start_matches([',', ' ']);
        let eq = rest.find('=')?;
        let key = rest[..eq].trim();
        let quoted = rest[eq + 1..].trim_start().strip_prefix('"')?;
        let mut escaped = false;
        let close = quoted.char_indices().find_map(|(i, c)| match c {
            _ if escaped => {
                escaped = false;
                None
            }
            '\\' => {
                escaped = true;
                None
            }
            '"' => Some(i),
            _ => None,
        })?;
        rest = &quoted[close + 1..];
        Some((key, &quoted[..close]))
    })
}

/// Byte index just past the `}` closing the label set that `s` starts with; quoted label values
/// may hold `}` and escaped quotes.
fn labels_end(s: &str) -> Option<usize> {
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            '}' if !in_quotes => return Some(i + 1),
            _ => {}
        }
    }
    None
}

fn parse_value(v: &str) -> Option<f64> {
    match v {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => v.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP gpuq_duplicates_suppressed_total Deliveries of already finished jobs.
# TYPE gpuq_duplicates_suppressed_total counter
gpuq_duplicates_suppressed_total{pool="default"} 3
gpuq_duplicates_suppressed_total{pool="h100"} 2
gpuq_duplicates_suppressed_total_extra 100
gpuq_results_discarded_total 1 1700000000000
gpuq_odd{path="/a}b",q="x\"}y"} 7
gpuq_job_duration_seconds_bucket{pool="default",kind="simulate",le="+Inf"} 9
gpuq_job_duration_seconds_sum{pool="default",kind="simulate"} 1.5
process_start_time_seconds 1.7e9
"#;

    #[test]
    fn a_family_is_summed_across_its_labels() {
        assert_eq!(
            sum_family(TEXT, "gpuq_duplicates_suppressed_total"),
            Some(5.0)
        );
    }

    #[test]
    fn samples_without_labels_and_with_timestamps_are_read() {
        assert_eq!(sum_family(TEXT, "gpuq_results_discarded_total"), Some(1.0));
        assert_eq!(sum_family(TEXT, "process_start_time_seconds"), Some(1.7e9));
    }

    #[test]
    fn quoted_braces_and_quotes_inside_label_values_do_not_confuse_the_parser() {
        assert_eq!(sum_family(TEXT, "gpuq_odd"), Some(7.0));
    }

    #[test]
    fn a_family_is_summed_over_one_label_value() {
        let text = r#"gpuq_job_overhead_seconds_sum{pool="a",stage="start"} 0.5
gpuq_job_overhead_seconds_sum{pool="b",stage="start"} 0.25
gpuq_job_overhead_seconds_sum{pool="a",stage="finish"} 2
gpuq_job_overhead_seconds_sum{pool="x\"stage=\"start",stage="finish"} 4
gpuq_job_overhead_seconds_count{stage="start"} 3
"#;
        let sum = |stage| sum_family_where(text, "gpuq_job_overhead_seconds_sum", "stage", stage);
        assert_eq!(sum("start"), Some(0.75));
        assert_eq!(sum("finish"), Some(6.0));
        assert_eq!(sum("other"), None);
        assert_eq!(
            sum_family_where(text, "gpuq_job_overhead_seconds_count", "stage", "start"),
            Some(3.0)
        );
        assert_eq!(
            sum_family_where(TEXT, "gpuq_odd", "q", "x\\\"}y"),
            Some(7.0)
        );
    }

    #[test]
    fn an_absent_family_is_none_and_prefixes_do_not_match() {
        assert_eq!(sum_family(TEXT, "gpuq_redeliveries_total"), None);
        assert_eq!(sum_family(TEXT, "gpuq_job_duration_seconds"), None);
        assert_eq!(sum_family("", "x"), None);
    }
}
