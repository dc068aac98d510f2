//! Property tests of the decoders that face the network: job requests (the gateway's body), job
//! messages (AMQP bodies a worker consumes) and AMQP headers. Whatever arrives — arbitrary bytes,
//! arbitrary JSON shaped like a job, arbitrary header values — they answer, never panic, and
//! what they accept is what the rules say.

use std::collections::BTreeMap;

use gpuq_common::amqp::{death_reason, header_str, header_u64};
use gpuq_common::job::{JobMessage, JobPayload, SubmitRequest};
use gpuq_common::job_env;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use proptest::prelude::*;
use serde_json::{Value, json};

/// Object keys: the request's and the params' real fields most of the time, anything else too.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "kind", "params", "gpus", "min_gpu_memory_mb", "pool", "ttl_s", "program", "args",
            "env", "timeout_s", "duration_ms", "progress_steps", "fail_times", "fail_probability",
            "always_fail", "hang_attempts", "crash_probability", "schema", "id", "tenant",
        ])
        .prop_map(str::to_string),
        1 => "\\PC{0,12}",
    ]
}

/// Any JSON value, with strings that are often the values the fields take.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON numbers are finite", |f| f.is_finite())
            .prop_map(Value::from),
        prop::sample::select(vec![
            "simulate", "command", "sh", "default", "gpu-a", "", "\0"
        ])
        .prop_map(Value::from),
        "\\PC{0,40}".prop_map(Value::from),
        ".{0,8}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A value a job field plausibly takes, or anything.
fn field_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => (0u64..2000).prop_map(Value::from),
        2 => (0.0f64..1.0).prop_map(Value::from),
        1 => any::<bool>().prop_map(Value::from),
        2 => prop::sample::select(vec!["sh", "default", "gpu-a", "x"]).prop_map(Value::from),
        1 => prop::collection::vec("\\PC{0,8}", 0..3).prop_map(Value::from),
        1 => json_value(),
    ]
}

/// A job request that is often valid, with arbitrary parts mixed in.
fn job_request() -> impl Strategy<Value = Value> {
    let fields = |names: &[&'static str]| {
        prop::collection::btree_map(
            prop_oneof![9 => prop::sample::select(names.to_vec()).prop_map(str::to_string), 1 => key()],
            field_value(),
            0..4,
        )
    };
    let simulate = [
        "duration_ms",
        "progress_steps",
        "fail_times",
        "fail_probability",
        "always_fail",
    ];
    let command = ["program", "args", "env", "timeout_s"];
    (
        prop::sample::select(vec!["simulate", "command"]),
        fields(&simulate),
        fields(&command),
        fields(&["gpus", "pool", "ttl_s", "min_gpu_memory_mb"]),
    )
        .prop_map(|(kind, sim, cmd, top)| {
            let mut params: serde_json::Map<String, Value> = if kind == "simulate" {
                sim.into_iter().collect()
            } else {
                cmd.into_iter().collect()
            };
            if kind == "command" {
                params.entry("program").or_insert(json!("sh"));
            }
            let mut req: serde_json::Map<String, Value> = top.into_iter().collect();
            req.insert("kind".into(), json!(kind));
            req.insert("params".into(), Value::Object(params));
            Value::Object(req)
        })
}

/// Decodes and validates as the gateway does.
fn validate(body: &Value) -> Option<(JobPayload, gpuq_common::job::JobPlacement)> {
    let req: SubmitRequest = serde_json::from_value(body.clone()).ok()?;
    req.validate().ok()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_as_a_job_message_are_an_error_or_a_message(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = JobMessage::from_bytes(&bytes);
    }

    #[test]
    fn arbitrary_json_as_a_job_message_is_an_error_or_a_message(v in json_value()) {
        let _ = JobMessage::from_bytes(&serde_json::to_vec(&v).unwrap());
    }

    #[test]
    fn a_valid_request_makes_a_message_that_decodes_to_itself(body in job_request()) {
        if let Some((payload, placement)) = validate(&body) {
            let msg = JobMessage::new(payload, placement);
            let back = JobMessage::from_bytes(&msg.to_bytes()).unwrap();
            prop_assert_eq!(back, msg);
        }
    }

    #[test]
    fn arbitrary_json_as_a_request_is_refused_or_accepted_never_a_panic(body in json_value()) {
        let _ = validate(&body);
    }

    #[test]
    fn a_command_is_accepted_only_with_env_names_the_sandbox_allows_and_no_nul(
        names in prop::collection::vec(prop_oneof![
            "[A-Z_]{1,12}",
            prop::sample::select(vec!["LD_PRELOAD", "PATH", "GPUQ_X", "HOME", "BASH_ENV", "A=B"]).prop_map(str::to_string),
        ], 0..6),
        args in prop::collection::vec("\\PC{0,8}|\0", 0..4),
    ) {
        let env: BTreeMap<String, String> = names.iter().map(|n| (n.clone(), "v".into())).collect();
        let body = json!({"kind": "command", "params": {"program": "sh", "args": args, "env": env}});
        let allowed = env.keys().all(|k| job_env::refusal(k).is_none())
            && args.iter().all(|a| !a.contains('\0'));
        prop_assert_eq!(validate(&body).is_some(), allowed, "{}", body);
    }

    #[test]
    fn arbitrary_header_values_are_read_or_ignored(
        n in any::<i64>(),
        s in "\\PC{0,16}",
        bytes in prop::collection::vec(any::<u8>(), 0..32),
        which in 0u8..6,
    ) {
        let value = match which {
            0 => AMQPValue::LongLongInt(n),
            1 => AMQPValue::LongString(LongString::from(bytes.clone())),
            2 => AMQPValue::ShortString(ShortString::from(s.clone())),
            3 => AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongLongInt(n)])),
            4 => {
                let mut death = FieldTable::default();
                death.insert("reason".into(), AMQPValue::LongString(LongString::from(bytes.clone())));
                AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)]))
            }
            _ => AMQPValue::Boolean(n % 2 == 0),
        };
        let mut headers = FieldTable::default();
        for key in ["x-delivery-count", "x-death", "x-gpuq-prior-deliveries"] {
            headers.insert(key.into(), value.clone());
        }
        let count = header_u64(Some(&headers), "x-delivery-count");
        if which == 0 {
            prop_assert_eq!(count, u64::try_from(n).ok());
        } else {
            prop_assert_eq!(count, None);
        }
        let _ = header_str(Some(&headers), "x-delivery-count");
        let reason = death_reason(Some(&headers));
        if which == 4 {
            prop_assert_eq!(reason, Some(String::from_utf8_lossy(&bytes).into_owned()));
        }
    }
}

/// The round-trip property above is only as good as the share of valid requests it sees.
#[test]
fn the_request_generator_makes_valid_requests_too() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = job_request();
    let valid = (0..512)
        .filter(|_| validate(&strategy.new_tree(&mut runner).unwrap().current()).is_some())
        .count();
    assert!(
        valid >= 20,
        "only {valid} of 512 generated requests are valid"
    );
}
