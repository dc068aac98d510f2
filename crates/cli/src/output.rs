//! Output formatting shared by the commands: plain-text tables, durations, timestamps, progress
//! bars that only people see.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A left-aligned text table; columns two spaces apart, the last one not padded.
#[derive(Debug, Clone, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Self {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: vec![],
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let cols = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(cols) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let mut line = |cells: &[String]| {
            let mut s = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = cells.get(i).map(String::as_str).unwrap_or("");
                s.push_str(cell);
                if i + 1 < cols {
                    s.extend(std::iter::repeat_n(' ', width - cell.chars().count() + 2));
                }
            }
            out.push_str(s.trim_end());
            out.push('\n');
        };
        line(&self.headers);
        for row in &self.rows {
            line(row);
        }
        out
    }
}

/// `850ms`, `1.25s`, `2m05s`, `1h02m`.
pub fn fmt_ms(ms: i64) -> String {
    if ms < 0 {
        return format!("-{}", fmt_ms(-ms));
    }
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.2}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000),
        _ => format!("{}h{:02}m", ms / 3_600_000, (ms % 3_600_000) / 60_000),
    }
}

pub fn fmt_duration(d: Duration) -> String {
    fmt_ms(d.as_millis().min(i64::MAX as u128) as i64)
}

/// `2025-01-02 03:04:05.678Z` from milliseconds since the epoch (UTC).
pub fn fmt_ts(ms: i64) -> String {
    gpuq_common::telemetry::format_utc_ms(ms, ' ')
}

/// `3s ago` relative to `now_ms`.
pub fn fmt_age(now_ms: i64, then_ms: i64) -> String {
    format!("{} ago", fmt_ms((now_ms - then_ms).max(0)))
}

pub fn or_dash(s: Option<impl ToString>) -> String {
    s.map(|s| s.to_string()).unwrap_or_else(|| "-".into())
}

/// Shortens to `max` characters with an ellipsis.
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// Whether progress bars should be drawn: a person is watching stderr and asked for no JSON.
pub fn show_progress(json: bool) -> bool {
    !json && std::io::stderr().is_terminal()
}

/// A progress bar on stderr, or a hidden one.
pub fn progress_bar(len: u64, message: &str, visible: bool) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec})",
        )
        .expect("valid template"),
    );
    pb.set_message(message.to_string());
    pb
}

/// Prints a line for people: above the bar when one is drawn, else to stderr unless quiet.
pub fn note(pb: &ProgressBar, quiet: bool, line: &str) {
    if !pb.is_hidden() {
        pb.println(line);
    } else if !quiet {
        eprintln!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_pads_columns_to_the_widest_cell() {
        let mut t = Table::new(&["ID", "STATUS", "WORKER"]);
        t.row(vec!["a".into(), "succeeded".into(), "worker-1".into()]);
        t.row(vec!["bbbb".into(), "queued".into(), "-".into()]);
        assert_eq!(
            t.render(),
            "ID    STATUS     WORKER\na     succeeded  worker-1\nbbbb  queued     -\n"
        );
    }

    #[test]
    fn missing_cells_render_empty_and_lines_have_no_trailing_spaces() {
        let mut t = Table::new(&["A", "B", "C"]);
        t.row(vec!["x".into()]);
        assert_eq!(t.render(), "A  B  C\nx\n");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(fmt_ms(850), "850ms");
        assert_eq!(fmt_ms(1250), "1.25s");
        assert_eq!(fmt_ms(125_000), "2m05s");
        assert_eq!(fmt_ms(3_720_000), "1h02m");
        assert_eq!(fmt_ms(-5), "-5ms");
    }

    #[test]
    fn timestamps_are_utc_dates() {
        assert_eq!(fmt_ts(0), "1970-01-01 00:00:00.000Z");
        assert_eq!(fmt_ts(1_709_210_096_789), "2024-02-29 12:34:56.789Z");
    }

    #[test]
    fn long_text_is_truncated_with_an_ellipsis() {
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
    }
}
