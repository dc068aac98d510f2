//! Jobs finished per second: successive samples of the finished-job count over the last minute,
//! turned into a rate for the status page and the overview.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use gpuq_common::job::JobStatus;
use serde::Serialize;
use utoipa::ToSchema;

/// Throughput is measured over this window.
const WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Throughput {
    /// Jobs that reached a final status per second, over `window_s`.
    pub finished_per_s: f64,
    /// The span actually measured (shorter right after the manager started).
    pub window_s: f64,
}

/// Successive samples of the finished-job count, to turn counts into a rate.
#[derive(Default)]
pub struct ThroughputTracker {
    samples: Mutex<VecDeque<(Instant, u64)>>,
}

impl ThroughputTracker {
    /// Samples the count of final jobs from a `count_by_status` answer.
    pub fn record(&self, counts: &BTreeMap<JobStatus, u64>) {
        let finished = counts
            .iter()
            .filter(|(s, _)| s.is_final())
            .map(|(_, n)| n)
            .sum();
        self.record_at(Instant::now(), finished);
    }

    pub fn record_at(&self, at: Instant, finished: u64) {
        let mut s = self.samples.lock().expect("throughput lock");
        if s.back()
            .is_some_and(|(t, _)| at.saturating_duration_since(*t) < Duration::from_millis(500))
        {
            return;
        }
        s.push_back((at, finished));
        // Keep one sample at least WINDOW old as the baseline.
        while s.len() > 2
            && s.get(1)
                .is_some_and(|(t, _)| at.saturating_duration_since(*t) >= WINDOW)
        {
            s.pop_front();
        }
    }

    pub fn rate(&self) -> Throughput {
        let s = self.samples.lock().expect("throughput lock");
        let (Some((t0, n0)), Some((t1, n1))) = (s.front(), s.back()) else {
            return Throughput {
                finished_per_s: 0.0,
                window_s: 0.0,
            };
        };
        let dt = t1.saturating_duration_since(*t0).as_secs_f64();
        if dt < 1.0 {
            return Throughput {
                finished_per_s: 0.0,
                window_s: dt,
            };
        }
        // Counts can fall (a dead letter re-driven goes back to queued): never a negative rate.
        Throughput {
            finished_per_s: n1.saturating_sub(*n0) as f64 / dt,
            window_s: dt,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_is_the_slope_of_finished_counts_over_the_last_minute() {
        let t = ThroughputTracker::default();
        let t0 = Instant::now();
        assert_eq!(t.rate().finished_per_s, 0.0);
        t.record_at(t0, 100);
        t.record_at(t0 + Duration::from_millis(100), 500); // too soon: ignored
        t.record_at(t0 + Duration::from_secs(10), 300);
        let r = t.rate();
        assert!((r.finished_per_s - 20.0).abs() < 1e-9, "{r:?}");
        for i in 1..=20u64 {
            t.record_at(t0 + Duration::from_secs(10 + i * 5), 300 + i * 50);
        }
        let r = t.rate();
        assert!(r.window_s <= 65.0, "{r:?}");
        assert!((r.finished_per_s - 10.0).abs() < 1e-9, "{r:?}");
        t.record_at(t0 + Duration::from_secs(200), 0);
        assert_eq!(t.rate().finished_per_s, 0.0);
    }
}
