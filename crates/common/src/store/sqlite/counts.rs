//! Job counts without a scan: `job_counts` holds the number of jobs per (tenant, status), kept
//! by triggers on `jobs` in the transaction of every write that adds, removes or moves a job —
//! whichever code path (or gpuq version, or process sharing the file) makes it. The status page
//! and the gateway's `max_queued` quota read a handful of rows instead of counting a million.
//!
//! A database made before the counters gains them on open: the table, its triggers and the
//! counts of the jobs already there, in one transaction that holds the write lock, so no write
//! of another process falls between the count and the first trigger.

use std::collections::BTreeMap;

use rusqlite::{Connection, TransactionBehavior};

use super::conn::unavailable;
use crate::job::JobStatus;
use crate::store::StoreError;

/// The table and its triggers. `coalesce(…, 'default')`: jobs stored before tenants are the
/// default tenant's (`tenancy::DEFAULT_TENANT`). A row whose count falls to 0 stays (a tenant
/// has a handful of rows at most).
const COUNTERS: &str = "
CREATE TABLE job_counts (
    tenant TEXT NOT NULL,
    status TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (tenant, status)
) WITHOUT ROWID;
CREATE TRIGGER job_counts_insert AFTER INSERT ON jobs BEGIN
    INSERT INTO job_counts (tenant, status, n) VALUES (coalesce(new.tenant, 'default'), new.status, 1)
    ON CONFLICT (tenant, status) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER job_counts_delete AFTER DELETE ON jobs BEGIN
    UPDATE job_counts SET n = n - 1
    WHERE tenant = coalesce(old.tenant, 'default') AND status = old.status;
END;
CREATE TRIGGER job_counts_update AFTER UPDATE OF status, tenant ON jobs
WHEN old.status IS NOT new.status OR old.tenant IS NOT new.tenant BEGIN
    UPDATE job_counts SET n = n - 1
    WHERE tenant = coalesce(old.tenant, 'default') AND status = old.status;
    INSERT INTO job_counts (tenant, status, n) VALUES (coalesce(new.tenant, 'default'), new.status, 1)
    ON CONFLICT (tenant, status) DO UPDATE SET n = n + 1;
END;
";

/// What `COUNTERS` makes, by name: all of it must be there, else it is all made again.
const PARTS: [&str; 4] = [
    "job_counts",
    "job_counts_insert",
    "job_counts_delete",
    "job_counts_update",
];

/// Makes the counters where they are missing (or incomplete), counting the jobs already stored.
pub(super) fn ensure_counters(conn: &mut Connection) -> Result<(), StoreError> {
    let present = |c: &Connection| -> Result<bool, StoreError> {
        c.query_row(
            "SELECT count(*) FROM sqlite_master WHERE name IN (?1, ?2, ?3, ?4)",
            PARTS,
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n == PARTS.len() as i64)
        .map_err(unavailable)
    };
    if present(conn)? {
        return Ok(());
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(unavailable)?;
    // Another process may have made them while this one waited for the lock.
    if present(&tx)? {
        return Ok(());
    }
    tx.execute_batch(
        "DROP TRIGGER IF EXISTS job_counts_insert;
         DROP TRIGGER IF EXISTS job_counts_delete;
         DROP TRIGGER IF EXISTS job_counts_update;
         DROP TABLE IF EXISTS job_counts;",
    )
    .map_err(unavailable)?;
    tx.execute_batch(COUNTERS).map_err(unavailable)?;
    tx.execute(
        "INSERT INTO job_counts (tenant, status, n) \
         SELECT coalesce(tenant, 'default'), status, count(*) FROM jobs GROUP BY 1, 2",
        [],
    )
    .map_err(unavailable)?;
    tx.commit().map_err(unavailable)
}

/// Jobs per status, from the counters (statuses with none left out).
pub(super) fn by_status(c: &Connection) -> Result<BTreeMap<JobStatus, u64>, StoreError> {
    let mut st = c
        .prepare_cached("SELECT status, sum(n) FROM job_counts GROUP BY status HAVING sum(n) > 0")
        .map_err(unavailable)?;
    let rows = st
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .map_err(unavailable)?;
    let mut out = BTreeMap::new();
    for row in rows {
        // A status this version does not know (a newer one wrote it) is left out, not an error.
        let (s, n) = row.map_err(unavailable)?;
        if let Some(s) = JobStatus::parse(&s) {
            out.insert(s, n as u64);
        }
    }
    Ok(out)
}

/// Jobs not final yet (queued or running) per tenant, from the counters (tenants with none left
/// out).
pub(super) fn active_by_tenant(c: &Connection) -> Result<BTreeMap<String, u64>, StoreError> {
    let mut st = c
        .prepare_cached(concat!(
            "SELECT tenant, sum(n) FROM job_counts WHERE status IN ",
            not_final!(),
            " GROUP BY tenant HAVING sum(n) > 0"
        ))
        .map_err(unavailable)?;
    let rows = st
        .query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })
        .map_err(unavailable)?;
    rows.map(|row| row.map_err(unavailable)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::conn::{SCHEMA, open_conn};

    /// The counts as a full scan of `jobs` gives them.
    fn scanned(c: &Connection) -> Vec<(String, String, i64)> {
        let mut st = c
            .prepare(
                "SELECT coalesce(tenant, 'default'), status, count(*) FROM jobs GROUP BY 1, 2 ORDER BY 1, 2",
            )
            .unwrap();
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn counted(c: &Connection) -> Vec<(String, String, i64)> {
        let mut st = c
            .prepare("SELECT tenant, status, n FROM job_counts WHERE n <> 0 ORDER BY 1, 2")
            .unwrap();
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn add(c: &Connection, tenant: Option<&str>, status: &str) {
        c.execute(
            "INSERT INTO jobs (id, kind, params, pool, gpus_requested, status, created_at, tenant) \
             VALUES (?1, 'simulate', '{}', 'default', 1, ?2, 1, ?3)",
            rusqlite::params![uuid::Uuid::now_v7().to_string(), status, tenant],
        )
        .unwrap();
    }

    #[test]
    fn a_database_from_before_the_counters_gains_them_with_its_jobs_counted_and_keeps_them_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        let mut c = open_conn(path.to_str().unwrap()).unwrap();
        c.execute_batch(SCHEMA).unwrap();
        for (tenant, status) in [
            (None, "succeeded"),
            (Some("a"), "queued"),
            (Some("a"), "queued"),
            (Some("default"), "running"),
        ] {
            add(&c, tenant, status);
        }
        ensure_counters(&mut c).unwrap();
        assert_eq!(counted(&c), scanned(&c));
        assert_eq!(
            counted(&c),
            vec![
                ("a".into(), "queued".into(), 2),
                ("default".into(), "running".into(), 1),
                ("default".into(), "succeeded".into(), 1),
            ]
        );
        // Every kind of write moves the counts with it.
        add(&c, Some("b"), "queued");
        c.execute("UPDATE jobs SET status = 'running' WHERE tenant = 'a'", [])
            .unwrap();
        c.execute("UPDATE jobs SET attempts = 3", []).unwrap();
        c.execute("DELETE FROM jobs WHERE tenant IS NULL", [])
            .unwrap();
        c.execute("UPDATE jobs SET tenant = 'c' WHERE tenant = 'b'", [])
            .unwrap();
        assert_eq!(counted(&c), scanned(&c));
        assert_eq!(
            active_by_tenant(&c).unwrap(),
            BTreeMap::from([("a".into(), 2), ("c".into(), 1), ("default".into(), 1)])
        );
        assert_eq!(
            by_status(&c).unwrap(),
            BTreeMap::from([(JobStatus::Queued, 1), (JobStatus::Running, 3)])
        );
        // A second open finds them whole and leaves them; one with a trigger missing remakes all.
        ensure_counters(&mut c).unwrap();
        assert_eq!(counted(&c), scanned(&c));
        c.execute_batch("DROP TRIGGER job_counts_delete").unwrap();
        c.execute("DELETE FROM jobs WHERE tenant = 'c'", [])
            .unwrap();
        ensure_counters(&mut c).unwrap();
        assert_eq!(counted(&c), scanned(&c));
    }
}
