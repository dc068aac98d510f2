//! MongoDB backend (the compose default). Conditional writes are single-document updates
//! filtered on a non-final status, which MongoDB applies atomically: the first final result wins.

use std::collections::BTreeMap;

use async_trait::async_trait;
use futures_util::TryStreamExt;
use mongodb::bson::{Bson, Document, doc};
use mongodb::options::{CollectionOptions, ReturnDocument, WriteConcern};
use mongodb::{Client, Collection};

use super::{
    FinishOutcome, JobPage, JobStore, ListQuery, StartOutcome, StoreError, page, page_limit,
};
use crate::events::{EventKind, JobEvent, NewEvent, final_event, is_quiet_attempt};
use crate::job::{FinalOutcome, JobId, JobRecord, JobStatus};
use crate::tenancy::DEFAULT_TENANT;
use crate::topology::FIRST_DRIVE;

mod codec;

use codec::{
    array_index, count_of, existed_of, from_doc, index, is_duplicate_key, json_to_bson, not_final,
    tenant_filter, to_doc, unavailable,
};

pub struct MongoStore {
    jobs: Collection<Document>,
    /// Every job's event log: one document per event, `{job, offset}` unique.
    events: Collection<Document>,
}

/// The write concern of the jobs collection: the URL's, journaled unless the URL says otherwise.
///
/// A worker acks a job to the broker once its result is written, and the broker then forgets
/// the job: the result must be on disk by then. Without `j`, a standalone server acknowledges a
/// write once it is applied in memory and flushes its journal only every 100 ms, so a crash of
/// the server could lose a result nobody would ever recompute.
fn durable(url_concern: Option<&WriteConcern>) -> WriteConcern {
    let mut wc = url_concern.cloned().unwrap_or_default();
    wc.journal.get_or_insert(true);
    wc
}

impl MongoStore {
    /// Connects, picks the URL's database (default `gpuq`) and makes the indexes.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = Client::with_uri_str(url).await.map_err(unavailable)?;
        let db = client
            .default_database()
            .unwrap_or_else(|| client.database("gpuq"));
        let jobs = db.collection_with_options::<Document>(
            "jobs",
            CollectionOptions::builder()
                .write_concern(durable(db.write_concern()))
                .build(),
        );
        // Every list filter has an index ending in `_id` (newest first, from the cursor); the
        // counts by status are index-only counts on `status_id`; retention walks `created_at`.
        jobs.create_indexes([
            index(doc! { "status": 1, "_id": -1 }, "status_id"),
            index(doc! { "tenant": 1, "_id": -1 }, "tenant_id"),
            index(
                doc! { "tenant": 1, "status": 1, "_id": -1 },
                "tenant_status_id",
            ),
            index(doc! { "pool": 1, "_id": -1 }, "pool_id"),
            index(doc! { "created_at": -1 }, "created_at"),
            array_index(),
        ])
        .await
        .map_err(unavailable)?;
        let events = db.collection_with_options::<Document>(
            "job_events",
            CollectionOptions::builder()
                .write_concern(durable(db.write_concern()))
                .build(),
        );
        events
            .create_index(index(doc! { "job": 1, "offset": 1 }, "job_offset"))
            .await
            .map_err(unavailable)?;
        Ok(Self { jobs, events })
    }

    async fn insert_doc(&self, id: JobId, d: Document) -> Result<(), StoreError> {
        match self.jobs.insert_one(d).await {
            Ok(_) => Ok(()),
            Err(e) if is_duplicate_key(&e) => Err(StoreError::Conflict(id)),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn status_of(&self, id: JobId) -> Result<Option<JobStatus>, StoreError> {
        let d = self
            .jobs
            .find_one(doc! { "_id": id.to_string() })
            .projection(doc! { "status": 1 })
            .await
            .map_err(unavailable)?;
        Ok(d.and_then(|d| d.get_str("status").ok().and_then(JobStatus::parse)))
    }

    /// The final write; with `drive`, only while the job is still on that drive (a job never
    /// re-driven has no `drive` field and is on the first).
    async fn finish_where(
        &self,
        id: JobId,
        drive: Option<&str>,
        o: &FinalOutcome,
    ) -> Result<FinishOutcome, StoreError> {
        let mut set = doc! {
            "status": o.status.as_str(),
            "finished_at": o.finished_at,
            "result": match &o.result { Some(v) => json_to_bson(v)?, None => Bson::Null },
        };
        if let Some(e) = &o.error {
            set.insert("error", e.as_str());
        }
        if let Some(w) = &o.worker {
            set.insert("worker", w.as_str());
        }
        if let Some(a) = &o.attempt {
            set.insert("attempts", i64::from(a.attempts));
            set.insert(
                "gpus",
                a.gpus.iter().map(|g| i64::from(*g)).collect::<Vec<_>>(),
            );
            set.insert("started_at", a.started_at);
        }
        let mut filter = doc! { "_id": id.to_string(), "status": not_final() };
        match drive {
            None => {}
            // `null` also matches a document without the field.
            Some(FIRST_DRIVE) => {
                filter.insert("drive", doc! { "$in": [Bson::Null, FIRST_DRIVE] });
            }
            Some(d) => {
                filter.insert("drive", d);
            }
        }
        let before = self
            .jobs
            .find_one_and_update(filter, doc! { "$set": set })
            .projection(doc! { "event_seq": 1 })
            .await
            .map_err(unavailable)?;
        if let Some(before) = before {
            // A single quiet attempt leaves the log empty (its events are derived from the
            // record; see the SQLite store). Else: not one transaction with the outcome (a
            // standalone server has none), so a crash in between leaves the log without its
            // `final` event, which readers make up for from the record.
            if !(is_quiet_attempt(&o.events) && before.get("event_seq").is_none()) {
                let mut events = o.events.clone();
                events.push(final_event(o.status, o.error.as_deref(), o.finished_at));
                self.append_events(id, &events).await?;
            }
            return Ok(FinishOutcome::Stored);
        }
        Ok(match self.status_of(id).await? {
            Some(s) if s.is_final() => FinishOutcome::AlreadyFinal(s),
            Some(_) => FinishOutcome::Superseded,
            None => FinishOutcome::NotFound,
        })
    }
}

#[async_trait]
impl JobStore for MongoStore {
    async fn insert(&self, job: &JobRecord) -> Result<(), StoreError> {
        self.insert_doc(job.id, to_doc(job)?).await
    }

    async fn insert_owned(&self, job: &JobRecord, owner: &str) -> Result<(), StoreError> {
        let mut d = to_doc(job)?;
        d.insert("owner", owner);
        self.insert_doc(job.id, d).await
    }

    async fn insert_many(
        &self,
        jobs: &[JobRecord],
        owner: Option<&str>,
    ) -> Result<Vec<JobId>, StoreError> {
        let docs = jobs
            .iter()
            .map(|job| {
                let mut d = to_doc(job)?;
                if let Some(owner) = owner {
                    d.insert("owner", owner);
                }
                Ok(d)
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        if docs.is_empty() {
            return Ok(vec![]);
        }
        match self.jobs.insert_many(docs).ordered(false).await {
            Ok(_) => Ok(vec![]),
            Err(e) => existed_of(jobs, e),
        }
    }

    async fn adopt(&self, id: JobId, owner: &str) -> Result<Option<JobStatus>, StoreError> {
        let r = self
            .jobs
            .update_one(
                doc! { "_id": id.to_string(), "status": "queued" },
                doc! { "$set": { "owner": owner } },
            )
            .await
            .map_err(unavailable)?;
        if r.matched_count == 1 {
            return Ok(Some(JobStatus::Queued));
        }
        self.status_of(id).await
    }

    async fn withdraw(&self, id: JobId, owner: Option<&str>) -> Result<bool, StoreError> {
        // `null` also matches a document without the field (stored by `insert`).
        let owner = owner.map_or(Bson::Null, |o| Bson::String(o.to_string()));
        let r = self
            .jobs
            .delete_one(doc! { "_id": id.to_string(), "status": "queued", "owner": owner })
            .await
            .map_err(unavailable)?;
        Ok(r.deleted_count == 1)
    }

    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        self.jobs
            .find_one(doc! { "_id": id.to_string() })
            .await
            .map_err(unavailable)?
            .map(from_doc)
            .transpose()
    }

    async fn list(&self, q: &ListQuery) -> Result<JobPage, StoreError> {
        let limit = page_limit(q.limit);
        let mut filter = Document::new();
        if let Some(t) = &q.tenant {
            filter.insert("tenant", tenant_filter(t));
        }
        if let Some(s) = q.status {
            filter.insert("status", s.as_str());
        }
        if let Some(p) = &q.pool {
            filter.insert("pool", p.as_str());
        }
        if let Some(a) = q.array {
            filter.insert("array_id", a.to_string());
        }
        if let Some(c) = q.cursor {
            filter.insert("_id", doc! { "$lt": c.to_string() });
        }
        let cursor = self
            .jobs
            .find(filter)
            .sort(doc! { "_id": -1 })
            .limit(i64::from(limit) + 1)
            .await
            .map_err(unavailable)?;
        let docs: Vec<Document> = cursor.try_collect().await.map_err(unavailable)?;
        let jobs = docs
            .into_iter()
            .map(from_doc)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(page(jobs, limit))
    }

    async fn start_attempt(&self, job: &JobRecord) -> Result<StartOutcome, StoreError> {
        let set = doc! { "$set": {
            "status": "running",
            "attempts": i64::from(job.attempts),
            "worker": job.worker.clone(),
            "gpus": job.gpus.iter().map(|g| i64::from(*g)).collect::<Vec<_>>(),
            "started_at": job.started_at,
        }};
        for _ in 0..3 {
            let r = self
                .jobs
                .update_one(
                    doc! { "_id": job.id.to_string(), "status": not_final() },
                    set.clone(),
                )
                .await
                .map_err(unavailable)?;
            if r.matched_count == 1 {
                return Ok(StartOutcome::Started);
            }
            match self.status_of(job.id).await? {
                Some(s) if s.is_final() => return Ok(StartOutcome::AlreadyFinal(s)),
                Some(_) => continue,
                None => match self.jobs.insert_one(to_doc(job)?).await {
                    Ok(_) => return Ok(StartOutcome::Started),
                    Err(e) if is_duplicate_key(&e) => continue,
                    Err(e) => return Err(unavailable(e)),
                },
            }
        }
        Err(StoreError::Unavailable(
            format!("job {} changed under three attempts to start it", job.id).into(),
        ))
    }

    async fn record_error(&self, id: JobId, attempt: u32, error: &str) -> Result<(), StoreError> {
        self.jobs
            .update_one(
                doc! { "_id": id.to_string(), "status": not_final() },
                doc! {
                    "$set": { "error": error },
                    "$max": { "attempts": i64::from(attempt) },
                },
            )
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    async fn finish(&self, id: JobId, o: &FinalOutcome) -> Result<FinishOutcome, StoreError> {
        self.finish_where(id, None, o).await
    }

    async fn finish_drive(
        &self,
        id: JobId,
        drive: &str,
        o: &FinalOutcome,
    ) -> Result<FinishOutcome, StoreError> {
        self.finish_where(id, Some(drive), o).await
    }

    async fn reset_for_retry(&self, id: JobId, drive: &str) -> Result<bool, StoreError> {
        let r = self
            .jobs
            .update_one(
                doc! { "_id": id.to_string(), "status": "dead_lettered" },
                doc! { "$set": {
                    "status": "queued",
                    "finished_at": Bson::Null,
                    "result": Bson::Null,
                    "drive": drive,
                } },
            )
            .await
            .map_err(unavailable)?;
        Ok(r.modified_count == 1)
    }

    /// One count per status, each answered from the `status_id` index alone (no document is
    /// read), rather than grouping every document.
    async fn count_by_status(&self) -> Result<BTreeMap<JobStatus, u64>, StoreError> {
        let counts = futures_util::future::try_join_all(JobStatus::ALL.iter().map(|s| async {
            let n = self
                .jobs
                .count_documents(doc! { "status": s.as_str() })
                .await
                .map_err(unavailable)?;
            Ok::<_, StoreError>((*s, n))
        }))
        .await?;
        Ok(counts.into_iter().filter(|(_, n)| *n > 0).collect())
    }

    async fn append_events(&self, id: JobId, events: &[NewEvent]) -> Result<u64, StoreError> {
        if events.is_empty() {
            return Ok(0);
        }
        let n = events.len() as i64;
        let mut update = doc! { "$inc": { "event_seq": n } };
        if let Some(p) = events.iter().rev().find(|e| e.kind == EventKind::Progress) {
            update.insert("$set", doc! { "progress": json_to_bson(&p.data)? });
        }
        let Some(job) = self
            .jobs
            .find_one_and_update(doc! { "_id": id.to_string() }, update)
            .return_document(ReturnDocument::After)
            .projection(doc! { "event_seq": 1 })
            .await
            .map_err(unavailable)?
        else {
            return Ok(0);
        };
        let last = match job.get("event_seq") {
            Some(Bson::Int64(v)) => *v,
            Some(Bson::Int32(v)) => i64::from(*v),
            _ => return Err(StoreError::Corrupt(format!("event_seq of job {id}").into())),
        };
        let docs = events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                Ok(doc! {
                    "job": id.to_string(),
                    "offset": last - n + 1 + i as i64,
                    "kind": e.kind.as_str(),
                    "at_ms": e.at_ms,
                    "data": json_to_bson(&e.data)?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.events.insert_many(docs).await.map_err(unavailable)?;
        Ok(last as u64)
    }

    async fn events(&self, id: JobId, after: u64, limit: u32) -> Result<Vec<JobEvent>, StoreError> {
        let cursor = self
            .events
            .find(doc! { "job": id.to_string(), "offset": { "$gt": after as i64 } })
            .sort(doc! { "offset": 1 })
            .limit(i64::from(limit))
            .await
            .map_err(unavailable)?;
        let docs: Vec<Document> = cursor.try_collect().await.map_err(unavailable)?;
        docs.into_iter()
            .map(|d| {
                let corrupt = || StoreError::Corrupt(format!("an event of job {id}").into());
                Ok(JobEvent {
                    offset: d.get_i64("offset").map_err(|_| corrupt())? as u64,
                    kind: d
                        .get_str("kind")
                        .ok()
                        .and_then(EventKind::parse)
                        .ok_or_else(corrupt)?,
                    at_ms: d.get_i64("at_ms").map_err(|_| corrupt())?,
                    data: d
                        .get("data")
                        .map(|b| b.clone().into_relaxed_extjson())
                        .ok_or_else(corrupt)?,
                })
            })
            .collect()
    }

    async fn delete_final_before(&self, cutoff_ms: i64, limit: u32) -> Result<u64, StoreError> {
        let doomed: Vec<Document> = self
            .jobs
            .find(doc! {
                "created_at": { "$lt": cutoff_ms },
                "status": { "$nin": ["queued", "running"] },
            })
            .sort(doc! { "created_at": 1 })
            .limit(i64::from(limit))
            .projection(doc! { "_id": 1 })
            .await
            .map_err(unavailable)?
            .try_collect()
            .await
            .map_err(unavailable)?;
        let ids: Vec<Bson> = doomed
            .into_iter()
            .filter_map(|d| d.get("_id").cloned())
            .collect();
        if ids.is_empty() {
            return Ok(0);
        }
        // The log first: a crash in between leaves a job without its log, never a log without
        // its job.
        self.events
            .delete_many(doc! { "job": { "$in": ids.clone() } })
            .await
            .map_err(unavailable)?;
        let gone = self
            .jobs
            .delete_many(doc! { "_id": { "$in": ids } })
            .await
            .map_err(unavailable)?;
        Ok(gone.deleted_count)
    }

    /// Walks the unfinished jobs only (through `status_id`): a handful next to the final ones.
    async fn count_active_by_tenant(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let cursor = self
            .jobs
            .aggregate([
                doc! { "$match": { "status": not_final() } },
                doc! { "$group": {
                    "_id": { "$ifNull": ["$tenant", DEFAULT_TENANT] },
                    "n": { "$sum": 1 },
                } },
            ])
            .await
            .map_err(unavailable)?;
        let docs: Vec<Document> = cursor.try_collect().await.map_err(unavailable)?;
        Ok(docs
            .iter()
            .filter_map(|d| Some((d.get_str("_id").ok()?.to_string(), count_of(d.get("n")))))
            .collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.jobs
            .client()
            .database("admin")
            .run_command(doc! { "ping": 1 })
            .await
            .map(|_| ())
            .map_err(unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::options::{Acknowledgment, ClientOptions};

    async fn url_concern(url: &str) -> Option<WriteConcern> {
        ClientOptions::parse(url).await.unwrap().write_concern
    }

    #[tokio::test]
    async fn results_are_journaled_unless_the_url_says_otherwise() {
        let wc = durable(url_concern("mongodb://h:27017/gpuq").await.as_ref());
        assert_eq!((wc.w, wc.journal), (None, Some(true)));
        let wc = durable(
            url_concern("mongodb://h:27017/gpuq?w=majority")
                .await
                .as_ref(),
        );
        assert_eq!(
            (wc.w, wc.journal),
            (Some(Acknowledgment::Majority), Some(true))
        );
        let wc = durable(
            url_concern("mongodb://h:27017/gpuq?journal=false")
                .await
                .as_ref(),
        );
        assert_eq!(
            wc.journal,
            Some(false),
            "an operator's explicit choice stands"
        );
    }
}
