//! Latency statistics: nearest-rank percentiles over millisecond samples.

use serde::Serialize;

/// The nearest-rank percentile `p` (0–100] of `sorted` (ascending): the smallest sample such that
/// at least p% of the samples are at or below it.
pub fn percentile(sorted: &[i64], p: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latency {
    pub count: usize,
    pub p50_ms: Option<i64>,
    pub p95_ms: Option<i64>,
    pub p99_ms: Option<i64>,
    pub max_ms: Option<i64>,
    pub mean_ms: Option<f64>,
}

impl Latency {
    pub fn from_samples(mut samples: Vec<i64>) -> Self {
        samples.sort_unstable();
        let mean = (!samples.is_empty())
            .then(|| samples.iter().map(|&v| v as f64).sum::<f64>() / samples.len() as f64);
        Self {
            count: samples.len(),
            p50_ms: percentile(&samples, 50.0),
            p95_ms: percentile(&samples, 95.0),
            p99_ms: percentile(&samples, 99.0),
            max_ms: samples.last().copied(),
            mean_ms: mean,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 95.0), Some(95));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        let v = [10, 20, 30, 40];
        assert_eq!(percentile(&v, 50.0), Some(20));
        assert_eq!(percentile(&v, 99.0), Some(40));
        assert_eq!(percentile(&v, 0.0), Some(10));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn a_summary_sorts_its_samples_first() {
        let l = Latency::from_samples(vec![30, 10, 20, 40]);
        assert_eq!(l.count, 4);
        assert_eq!(l.p50_ms, Some(20));
        assert_eq!(l.max_ms, Some(40));
        assert_eq!(l.mean_ms, Some(25.0));
        assert_eq!(Latency::from_samples(vec![]).p99_ms, None);
    }
}
