//! How a job travels to and from BSON documents, the indexes, and the driver's errors in the
//! store's words.

use mongodb::IndexModel;
use mongodb::bson::{self, Bson, Document, doc};
use mongodb::options::IndexOptions;

use crate::job::{JobId, JobRecord};
use crate::store::StoreError;
use crate::tenancy::DEFAULT_TENANT;

pub(super) fn index(keys: Document, name: &str) -> IndexModel {
    IndexModel::builder()
        .keys(keys)
        .options(IndexOptions::builder().name(name.to_string()).build())
        .build()
}

/// An array's listing walks its members by id; only jobs of an array have an entry.
pub(super) fn array_index() -> IndexModel {
    IndexModel::builder()
        .keys(doc! { "array_id": 1, "_id": -1 })
        .options(
            IndexOptions::builder()
                .name("array_id".to_string())
                .partial_filter_expression(doc! { "array_id": { "$exists": true } })
                .build(),
        )
        .build()
}

pub(super) fn unavailable(e: mongodb::error::Error) -> StoreError {
    StoreError::unavailable(e)
}

pub(super) fn not_final() -> Document {
    doc! { "$in": ["queued", "running"] }
}

/// Matches a tenant's jobs; documents stored before tenants have none and are the default
/// tenant's.
pub(super) fn tenant_filter(tenant: &str) -> Bson {
    if tenant == DEFAULT_TENANT {
        Bson::Document(doc! { "$in": [DEFAULT_TENANT, Bson::Null] })
    } else {
        Bson::String(tenant.to_string())
    }
}

pub(super) fn count_of(n: Option<&Bson>) -> u64 {
    match n {
        Some(Bson::Int32(n)) => *n as u64,
        Some(Bson::Int64(n)) => *n as u64,
        _ => 0,
    }
}

pub(super) fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    matches!(
        e.kind.as_ref(),
        mongodb::error::ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) if w.code == 11000
    )
}

pub(super) fn to_doc(job: &JobRecord) -> Result<Document, StoreError> {
    let mut d = bson::to_document(job).map_err(StoreError::corrupt)?;
    d.remove("id");
    d.insert("_id", job.id.to_string());
    // A string like `_id`, whatever BSON's serializer makes of a UUID: `list` filters on it.
    if let Some(array) = job.array_id {
        d.insert("array_id", array.to_string());
    }
    Ok(d)
}

/// The jobs an unordered `insert_many` found there already, when those are its only failures.
pub(super) fn existed_of(
    jobs: &[JobRecord],
    e: mongodb::error::Error,
) -> Result<Vec<JobId>, StoreError> {
    if let mongodb::error::ErrorKind::InsertMany(failure) = e.kind.as_ref()
        && failure.write_concern_error.is_none()
        && let Some(errors) = &failure.write_errors
        && errors.iter().all(|w| w.code == 11000)
    {
        return Ok(errors
            .iter()
            .filter_map(|w| jobs.get(w.index).map(|j| j.id))
            .collect());
    }
    Err(unavailable(e))
}

pub(super) fn from_doc(mut d: Document) -> Result<JobRecord, StoreError> {
    let id = d
        .remove("_id")
        .ok_or_else(|| StoreError::Corrupt("document without _id".into()))?;
    d.insert("id", id);
    bson::from_document(d).map_err(StoreError::corrupt)
}

pub(super) fn json_to_bson(v: &serde_json::Value) -> Result<Bson, StoreError> {
    bson::to_bson(v).map_err(StoreError::corrupt)
}
