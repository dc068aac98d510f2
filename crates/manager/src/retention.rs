//! Retention: final jobs submitted more than `GPUQ_RETENTION_DAYS` ago are deleted with their
//! event logs, in batches of `BATCH` with a pause between them, so that the store's writers
//! (workers recording results, gateways recording submissions) never wait long behind it.

use std::time::Duration;

use gpuq_common::job::now_ms;
use tokio_util::sync::CancellationToken;

use crate::state::AppState;

/// Jobs deleted in one store write.
pub const BATCH: u32 = 500;
/// Between two batches of one pass.
const PAUSE: Duration = Duration::from_millis(20);

/// How often a pass runs: a quarter of the retention, between 1 s and 10 min.
pub fn pass_every(retention: Duration) -> Duration {
    (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(600))
}

/// Deletes what is past `retention` every `pass_every(retention)` until `stop`.
pub async fn run(state: AppState, retention: Duration, stop: CancellationToken) {
    let deleted = gpuq_common::metrics::jobs_deleted(&state.0.prometheus);
    let every = pass_every(retention);
    tracing::info!(
        retention_s = retention.as_secs_f64(),
        every_s = every.as_secs_f64(),
        "retention on"
    );
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let cutoff = now_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        let mut pass = 0u64;
        loop {
            match state.store().delete_final_before(cutoff, BATCH).await {
                Ok(n) => {
                    deleted.inc_by(n);
                    pass += n;
                    if n < u64::from(BATCH) || stop.is_cancelled() {
                        break;
                    }
                    tokio::time::sleep(PAUSE).await;
                }
                Err(e) => {
                    tracing::warn!(error.message = %e, "retention: the store refused a deletion; next pass");
                    break;
                }
            }
        }
        if pass > 0 {
            tracing::info!(
                deleted = pass,
                "retention: final jobs past their retention deleted"
            );
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
