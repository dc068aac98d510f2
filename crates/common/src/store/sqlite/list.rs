//! `GET /v1/jobs` on SQLite: every combination of filters walks one index in id order from the
//! cursor (keyset pagination, never OFFSET), so a page costs about its own rows however many jobs
//! the store holds. The index is named (`INDEXED BY`), not left to the planner: without
//! statistics it could walk a tenant's million jobs to find an array's ten, and a query the
//! index cannot serve fails loudly instead of scanning.

use crate::job::ListQuery;
use crate::tenancy::DEFAULT_TENANT;

/// The listing indexes, made after the columns are added to old files. A tenant is matched
/// by `coalesce(tenant, 'default')` (jobs stored before tenants have none), so its indexes are
/// on that expression; only jobs of an array have an entry in `jobs_array_id`. Indexes with a
/// status cost every status change a write each: two (`jobs_status_id`, `jobs_tenant_status_id`).
pub(super) const LIST_INDEXES: &str = "
DROP INDEX IF EXISTS jobs_tenant_id;
DROP INDEX IF EXISTS jobs_status_tenant;
CREATE INDEX IF NOT EXISTS jobs_tenant_key_id ON jobs(coalesce(tenant, 'default'), id);
CREATE INDEX IF NOT EXISTS jobs_tenant_status_id ON jobs(coalesce(tenant, 'default'), status, id);
CREATE INDEX IF NOT EXISTS jobs_pool_id ON jobs(pool, id);
CREATE INDEX IF NOT EXISTS jobs_array_id ON jobs(array_id, id) WHERE array_id IS NOT NULL;
";

/// The index a query walks: the one with the most of its filters in front of `id`. An array
/// has few members, so it goes first whatever else is asked.
fn index_for(q: &ListQuery) -> Option<&'static str> {
    Some(match (&q.array, &q.tenant, &q.status, &q.pool) {
        (Some(_), ..) => "jobs_array_id",
        (None, Some(_), Some(_), _) => "jobs_tenant_status_id",
        (None, Some(_), None, _) => "jobs_tenant_key_id",
        (None, None, Some(_), _) => "jobs_status_id",
        (None, None, None, Some(_)) => "jobs_pool_id",
        // The table itself is ordered by id.
        (None, None, None, None) => return None,
    })
}

/// The statement and its arguments for one page of `limit` jobs (one more row is read to
/// know whether a next page exists).
pub(super) fn list_sql(q: &ListQuery, limit: u32) -> (String, Vec<String>) {
    let mut sql = format!("SELECT {} FROM jobs", columns!());
    if let Some(index) = index_for(q) {
        sql.push_str(" INDEXED BY ");
        sql.push_str(index);
    }
    sql.push_str(" WHERE 1=1");
    let mut args: Vec<String> = vec![];
    let mut filter = |sql: &mut String, cond: &str, arg: String| {
        args.push(arg);
        sql.push_str(&format!(" AND {cond} = ?{}", args.len()));
    };
    if let Some(t) = &q.tenant {
        filter(
            &mut sql,
            &format!("coalesce(tenant, '{DEFAULT_TENANT}')"),
            t.clone(),
        );
    }
    if let Some(s) = q.status {
        filter(&mut sql, "status", s.as_str().into());
    }
    if let Some(p) = &q.pool {
        filter(&mut sql, "pool", p.clone());
    }
    if let Some(a) = q.array {
        filter(&mut sql, "array_id", a.to_string());
    }
    if let Some(cur) = q.cursor {
        args.push(cur.to_string());
        sql.push_str(&format!(" AND id < ?{}", args.len()));
    }
    sql.push_str(&format!(" ORDER BY id DESC LIMIT {}", limit + 1));
    (sql, args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobStatus;
    use crate::store::SqliteStore;

    #[test]
    fn every_combination_of_filters_walks_an_index_in_id_order_without_sorting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        let path = path.to_str().unwrap();
        let _store = SqliteStore::open(path).unwrap();
        let conn = rusqlite::Connection::open(path).unwrap();
        for bits in 0..32u8 {
            let on = |i: u8| bits & (1 << i) != 0;
            let q = ListQuery {
                tenant: on(0).then(|| "team-a".to_string()),
                status: on(1).then_some(JobStatus::Running),
                pool: on(2).then(|| "default".to_string()),
                array: on(3).then(uuid::Uuid::now_v7),
                cursor: on(4).then(uuid::Uuid::now_v7),
                limit: 100,
            };
            let (sql, args) = list_sql(&q, 100);
            let mut st = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap_or_else(|e| panic!("{q:?}: {e}"));
            let plan: Vec<String> = st
                .query_map(rusqlite::params_from_iter(args.iter()), |r| r.get(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let plan = plan.join(" | ");
            assert!(!plan.contains("TEMP B-TREE"), "{q:?} sorts: {plan}");
            match index_for(&q) {
                Some(index) => assert!(plan.contains(index), "{q:?}: {plan}"),
                // The primary key, in id order, from the cursor when there is one.
                None => assert!(
                    plan.contains("SCAN jobs") || plan.contains("SEARCH jobs USING PRIMARY KEY"),
                    "{q:?}: {plan}"
                ),
            }
            if q.cursor.is_some() {
                assert!(plan.contains("id<?"), "{q:?} starts at the cursor: {plan}");
            }
        }
    }
}
