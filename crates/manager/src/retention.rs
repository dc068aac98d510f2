//! Retention: final jobs submitted more than `GPUQ_RETENTION_DAYS` ago are deleted with their
//! event logs, `GPUQ_RETENTION_BATCH` (200) at a time with `GPUQ_RETENTION_PAUSE_MS` (150 ms)
//! between batches, so that the store's writers (workers recording results, gateways recording
//! submissions) never wait long behind it. The first pass runs when the manager starts (a
//! manager restarted more often than the pass interval still deletes), then every
//! `pass_every(retention)`.

use std::time::Duration;

use gpuq_common::job::now_ms;
use tokio_util::sync::CancellationToken;

use crate::state::AppState;

/// How often a pass runs: a quarter of the retention, between 1 s and 10 min.
pub fn pass_every(retention: Duration) -> Duration {
    (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(600))
}

/// Deletes what is past `retention` now and every `pass_every(retention)` until `stop`.
pub async fn run(state: AppState, retention: Duration, stop: CancellationToken) {
    let deleted = gpuq_common::metrics::jobs_deleted(&state.0.prometheus);
    let every = pass_every(retention);
    let (batch, pause) = (
        state.config().retention_batch,
        state.config().retention_pause,
    );
    tracing::info!(
        retention_s = retention.as_secs_f64(),
        every_s = every.as_secs_f64(),
        batch,
        pause_ms = pause.as_millis() as u64,
        "retention on"
    );
    loop {
        let cutoff = now_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        let pass = one_pass(&state, &deleted, cutoff, (batch, pause), &stop).await;
        if pass > 0 {
            tracing::info!(
                deleted = pass,
                "retention: final jobs past their retention deleted"
            );
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Deletes final jobs submitted before `cutoff`, `batch` a write (counted in `deleted`), until none is left (or the
/// store refuses, or `stop`); answers how many went.
async fn one_pass(
    state: &AppState,
    deleted: &prometheus::IntCounter,
    cutoff: i64,
    (batch, pause): (u32, Duration),
    stop: &CancellationToken,
) -> u64 {
    let mut pass = 0u64;
    loop {
        match state.store().delete_final_before(cutoff, batch).await {
            Ok(n) => {
                deleted.inc_by(n);
                pass += n;
                if n < u64::from(batch) || stop.is_cancelled() {
                    return pass;
                }
                tokio::time::sleep(pause).await;
            }
            Err(e) => {
                tracing::warn!(error.message = %e, "retention: the store refused a deletion; next pass");
                return pass;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_come_often_enough_for_short_retentions_and_rarely_for_long_ones() {
        assert_eq!(
            pass_every(Duration::from_secs(30 * 86_400)),
            Duration::from_secs(600)
        );
        assert_eq!(pass_every(Duration::from_secs(8)), Duration::from_secs(2));
        assert_eq!(
            pass_every(Duration::from_millis(100)),
            Duration::from_secs(1)
        );
    }
}
