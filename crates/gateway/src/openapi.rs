//! The OpenAPI document served at `/openapi.json`: every route, its bodies and the error shape.

use gpuq_common::events::{EventKind, EventPage, JobEvent, Progress};
use gpuq_common::http::{ErrorBody, ErrorDetail};
use gpuq_common::job::{JobKind, JobPlacement, JobRecord, JobStatus, SubmitRequest};
use gpuq_common::store::JobPage;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::routes::batch::{BatchRequest, BatchResponse};
use crate::routes::jobs::ArrayCancelResponse;
use crate::routes::{Readiness, SubmitResponse};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "gpuq gateway",
        description = "Submit GPU jobs and follow them. A job is accepted (202) only after the broker \
            confirmed it to a replicated queue. Every error is `{\"error\":{\"code\",\"message\"}}`."
    ),
    paths(
        crate::routes::jobs::submit_job,
        crate::routes::batch::submit_batch,
        crate::routes::jobs::list_jobs,
        crate::routes::jobs::get_job,
        crate::routes::jobs::cancel_job,
        crate::routes::events::job_events,
        crate::routes::dead_letters::list_dead_letters,
        crate::routes::dead_letters::retry_dead_letter,
        crate::routes::health::readyz,
        healthz,
        metrics,
        openapi_json,
    ),
    components(schemas(
        SubmitRequest, SubmitResponse, BatchRequest, BatchResponse, ArrayCancelResponse, JobRecord, JobPage, JobStatus, JobKind, JobPlacement,
        ErrorBody, ErrorDetail, Readiness, EventPage, JobEvent, EventKind, Progress
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "jobs", description = "Submit, read, list and cancel jobs"),
        (name = "dead letters", description = "Jobs the broker gave up on, and their re-drive"),
        (name = "ops", description = "Health, readiness, metrics, this document"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("One of the gateway's GPUQ_API_KEYS"))
                    .build(),
            ),
        );
    }
}

// Routes served by shared code (`gpuq_common::http::ops_routes`) or a closure, documented here.

/// The process answers.
#[utoipa::path(get, path = "/healthz", tag = "ops",
    responses((status = 200, description = "`{\"status\":\"ok\"}`", body = Object)))]
#[allow(dead_code)]
fn healthz() {}

/// Prometheus metrics (`gpuq_http_*`, `gpuq_jobs_submitted_total`, `gpuq_publish_*`, …).
#[utoipa::path(get, path = "/metrics", tag = "ops",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain", body = String)))]
#[allow(dead_code)]
fn metrics() {}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "ops",
    responses((status = 200, description = "OpenAPI 3.1", body = Object)))]
#[allow(dead_code)]
fn openapi_json() {}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn the_document_lists_exactly_the_routes_the_router_serves() {
        let doc = ApiDoc::openapi();
        let documented: BTreeSet<(String, String)> = serde_json::to_value(&doc.paths)
            .expect("paths serialize")
            .as_object()
            .expect("paths are an object")
            .iter()
            .flat_map(|(path, item)| {
                let methods: Vec<String> = item
                    .as_object()
                    .expect("a path item is an object")
                    .keys()
                    .filter(|k| ["get", "post", "put", "patch", "delete"].contains(&k.as_str()))
                    .cloned()
                    .collect();
                methods.into_iter().map(move |m| (m, path.clone()))
            })
            .collect();
        let served: BTreeSet<(String, String)> = crate::routes::served_routes()
            .into_iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        assert_eq!(documented, served);
    }
}
