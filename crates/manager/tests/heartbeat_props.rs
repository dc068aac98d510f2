//! Property tests of heartbeat decoding: whatever a worker (or anyone holding a credential)
//! sends, `heartbeat::checked` answers — an error naming the field, or a heartbeat within bounds
//! with its interval clamped — and never panics.

use gpuq_common::engine::Heartbeat;
use gpuq_manager::heartbeat::{MAX_INTERVAL_MS, MAX_TEXT, MIN_INTERVAL_MS, checked};
use proptest::prelude::*;
use serde_json::{Value, json};

/// Text that is short and plausible, or long, or anything.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9-]{1,16}",
        "\\PC{0,300}",
        Just(String::new()),
        Just("http://worker-1:9001".to_string()),
        Just("http://user:pw@evil:1".to_string()),
    ]
}

fn heartbeat_json() -> impl Strategy<Value = Value> {
    (
        (text(), text(), text(), text(), text()),
        prop::collection::vec(text(), 0..70),
        prop::collection::vec(
            (
                any::<u32>(),
                text(),
                text(),
                prop::collection::vec(text(), 0..40),
            ),
            0..3,
        ),
        (any::<u64>(), any::<i64>(), any::<bool>()),
    )
        .prop_map(
            |(
                (engine, instance, version, backend, admin),
                pools,
                gpus,
                (interval, at, consuming),
            )| {
                let gpus: Vec<Value> = gpus
                    .into_iter()
                    .map(|(index, uuid, name, reasons)| {
                        json!({"index": index, "uuid": uuid, "name": name, "health": "healthy",
                        "reasons": reasons, "utilization_pct": 0, "memory_used_mb": 0,
                        "memory_total_mb": 1, "temperature_c": 0, "power_w": 0.0, "ecc_errors": 0,
                        "job": null, "fault": null})
                    })
                    .collect();
                json!({"engine_id": engine, "instance_id": instance, "version": version,
                "gpu_backend": backend, "pools": pools, "gpus": gpus, "running_jobs": [],
                "consuming": consuming, "jobs_processed": 0, "jobs_failed": 0, "avg_job_ms": 0.0,
                "admin_url": admin, "started_at_ms": at, "sent_at_ms": at,
                "heartbeat_interval_ms": interval})
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn a_heartbeat_is_refused_or_within_bounds_never_a_panic(v in heartbeat_json(), default in 1u64..120_000) {
        let Ok(hb) = serde_json::from_value::<Heartbeat>(v) else {
            return Ok(());
        };
        if let Ok(hb) = checked(hb, default) {
            prop_assert!((MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&hb.heartbeat_interval_ms));
            for t in [&hb.version, &hb.gpu_backend, &hb.admin_url] {
                prop_assert!(t.len() <= MAX_TEXT);
            }
            prop_assert!(hb.pools.iter().all(|p| p.len() <= MAX_TEXT));
            prop_assert!(!hb.admin_url.contains('@'), "credentials in {}", hb.admin_url);
        }
    }

    #[test]
    fn arbitrary_bytes_as_a_heartbeat_are_an_error_or_a_heartbeat(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(hb) = serde_json::from_slice::<Heartbeat>(&bytes) {
            let _ = checked(hb, 2000);
        }
    }
}
