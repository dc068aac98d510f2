//! Job arrays: a request that says `"array": N` becomes N jobs sharing its kind, params and
//! placement. Each carries the array's id (its first job's) and its index 0..N-1 on its message
//! and record (a re-drive rebuilt from the record keeps them); the worker gives a `command` job
//! them in its environment, `GPUQ_ARRAY_ID` and `GPUQ_ARRAY_INDEX` (gpuq's names, which a job's
//! own `env` may not set: `job_env`).

use super::{ArrayMember, JobMessage, SubmitRequest, ValidationError};

/// The most jobs one array may have (and the most one batch may ask for, arrays counted whole).
pub const MAX_ARRAY: u32 = 1000;
/// The variable naming a `command` job's index in its array.
pub const ARRAY_INDEX_ENV: &str = "GPUQ_ARRAY_INDEX";
/// The variable naming a `command` job's array (the id of its first job).
pub const ARRAY_ID_ENV: &str = "GPUQ_ARRAY_ID";

impl SubmitRequest {
    /// How many jobs the request asks for: 1, or its array's size (an empty array, which
    /// `validate` refuses naming the field, counts as 1).
    pub fn job_count(&self) -> u32 {
        self.array.unwrap_or(1).max(1)
    }

    /// Validates the request and makes its jobs: one, or the members of its array in index
    /// order, the first one's id naming the array.
    pub fn expand(&self) -> Result<Vec<JobMessage>, ValidationError> {
        let (payload, placement) = self.validate()?;
        let Some(n) = self.array else {
            return Ok(vec![JobMessage::new(payload, placement)]);
        };
        let mut jobs: Vec<JobMessage> = Vec::with_capacity(n as usize);
        for index in 0..n {
            let mut msg = JobMessage::new(payload.clone(), placement.clone());
            let id = jobs.first().map_or(msg.id, |first| first.id);
            msg.array = Some(ArrayMember { id, index });
            jobs.push(msg);
        }
        Ok(jobs)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::job::JobPayload;

    fn req(v: serde_json::Value) -> SubmitRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn an_array_is_its_jobs_in_index_order_named_by_the_first() {
        let jobs = req(json!({"kind":"command","params":{"program":"sh"},"array":3}))
            .expand()
            .unwrap();
        assert_eq!(jobs.len(), 3);
        for (i, job) in jobs.iter().enumerate() {
            let member = job.array.unwrap();
            assert_eq!((member.id, member.index), (jobs[0].id, i as u32));
            // The worker sets the variables from the message; its params are the request's.
            let JobPayload::Command(p) = &job.payload else {
                panic!("a command job")
            };
            assert!(p.env.is_empty());
        }
        let ids: std::collections::HashSet<_> = jobs.iter().map(|j| j.id).collect();
        assert_eq!(ids.len(), 3);
        let plain = req(json!({"kind":"simulate"})).expand().unwrap();
        assert_eq!((plain.len(), plain[0].array), (1, None));
    }

    #[test]
    fn arrays_are_bounded_and_their_variables_are_gpuqs() {
        for n in [0, MAX_ARRAY + 1] {
            let e = req(json!({"kind":"simulate","array":n}))
                .expand()
                .unwrap_err();
            assert_eq!(e.field, "array");
        }
        assert_eq!(
            req(json!({"kind":"simulate","array":MAX_ARRAY}))
                .expand()
                .unwrap()
                .len(),
            MAX_ARRAY as usize
        );
        let e = req(json!({"kind":"command","params":{"program":"sh","env":{"GPUQ_ARRAY_INDEX":"7"}},"array":2}))
            .expand()
            .unwrap_err();
        assert_eq!(e.field, "params.env.GPUQ_ARRAY_INDEX");
    }
}
