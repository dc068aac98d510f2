//! A job array as a whole: cancelling every unfinished job of one. (An array is made in
//! `batch.rs`; its jobs are listed by `GET /v1/jobs?array=`.)

use futures_util::StreamExt;
use gpuq_common::job::{JobId, ListQuery};
use gpuq_common::store::MAX_PAGE;
use gpuq_common::tenancy::Principal;
use tracing::instrument;

use super::{JobError, cancel};
use crate::state::SharedState;

/// Cancels in flight at once: a large array is cancelled in seconds, not minutes.
const CONCURRENT_CANCELS: usize = 16;

/// Cancels every job of the array `array_id` that is not final yet, as `cancel` would one by
/// one; answers those cancelled and how many were final already. An array `who` may not see
/// is "not found", like one that does not exist. On a failure midway the jobs cancelled so far
/// stay cancelled: asking again finishes the work.
#[instrument(skip_all, fields(array_id = %array_id, tenant = %who.tenant))]
pub async fn cancel_array(
    state: &SharedState,
    who: &Principal,
    array_id: JobId,
) -> Result<(Vec<JobId>, u32), JobError> {
    let mut members = vec![];
    let mut cursor = None;
    loop {
        let page = state
            .store
            .list(&ListQuery {
                tenant: who.scope().map(str::to_string),
                array: Some(array_id),
                limit: MAX_PAGE,
                cursor,
                ..Default::default()
            })
            .await?;
        members.extend(page.jobs.into_iter().map(|j| (j.id, j.status.is_final())));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    if members.is_empty() {
        return Err(JobError::NotFound(array_id));
    }
    let mut already_final = members.iter().filter(|(_, done)| *done).count() as u32;
    let open = members
        .into_iter()
        .filter(|(_, done)| !done)
        .map(|(id, _)| id);
    let outcomes: Vec<_> = futures_util::stream::iter(open)
        .map(|id| async move { (id, cancel(state, who, id).await) })
        .buffered(CONCURRENT_CANCELS)
        .collect()
        .await;
    let mut cancelled = vec![];
    for (id, outcome) in outcomes {
        match outcome {
            Ok(_) => cancelled.push(id),
            // It ended between the listing and its cancel.
            Err(JobError::AlreadyFinal { .. }) => already_final += 1,
            Err(e) => return Err(e),
        }
    }
    tracing::info!(
        cancelled = cancelled.len(),
        already_final,
        "array cancelled"
    );
    Ok((cancelled, already_final))
}
