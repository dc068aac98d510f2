//! The job contract's unit tests: what a submission may say, and what survives the message body.

use super::*;
use serde_json::json;

fn req(v: Value) -> Result<SubmitRequest, serde_json::Error> {
    serde_json::from_value(v)
}

#[test]
fn a_simulate_job_round_trips_through_the_message_body() {
    let r = req(
        json!({"kind":"simulate","params":{"duration_ms":50,"fail_times":2},"gpus":2,"ttl_s":600}),
    )
    .unwrap();
    let (payload, placement) = r.validate().unwrap();
    let msg = JobMessage::new(payload, placement);
    let bytes = msg.to_bytes();
    let text = String::from_utf8(bytes.clone()).unwrap();
    assert!(text.contains("\"schema\":1"), "{text}");
    assert_eq!(JobMessage::from_bytes(&bytes).unwrap(), msg);
    assert_eq!(msg.id.get_version_num(), 7);
}

#[test]
fn unknown_fields_kinds_and_absurd_values_are_refused() {
    assert!(req(json!({"kind":"simulate","bogus":1})).is_err());
    assert!(req(json!({"kind":"teleport"})).is_err());
    assert!(req(json!({"kind":"simulate","gpus":-1})).is_err());
    let bad = [
        json!({"kind":"simulate","gpus":0}),
        json!({"kind":"simulate","gpus":1000}),
        json!({"kind":"simulate","ttl_s":0}),
        json!({"kind":"simulate","pool":"a b"}),
        json!({"kind":"simulate","params":{"duration_ms":999999999999u64}}),
        json!({"kind":"simulate","params":{"fail_probability":2.0}}),
        json!({"kind":"simulate","params":{"nope":1}}),
        json!({"kind":"simulate","params":[1]}),
        json!({"kind":"command","params":{"program":"/bin/sh"}}),
        json!({"kind":"command","params":{"program":"sh","env":{"CUDA_VISIBLE_DEVICES":"0"}}}),
    ];
    for b in bad {
        assert!(req(b.clone()).unwrap().validate().is_err(), "accepted {b}");
    }
}

#[test]
fn nul_bytes_and_oversized_environments_of_a_command_are_refused_naming_the_field() {
    let field = |params: Value| {
        req(json!({"kind": "command", "params": params}))
            .unwrap()
            .validate()
            .map(drop)
            .unwrap_err()
            .field
    };
    assert_eq!(
        field(json!({"program": "sh", "args": ["-c", "a\0b"]})),
        "params.args[1]"
    );
    assert_eq!(
        field(json!({"program": "sh", "env": {"X": "a\0"}})),
        "params.env.X"
    );
    assert_eq!(field(json!({"program": "s\0h"})), "params.program");
    let many: serde_json::Map<String, Value> = (0..=MAX_ENV)
        .map(|i| (format!("V{i}"), json!("1")))
        .collect();
    assert_eq!(field(json!({"program": "sh", "env": many})), "params.env");
    let long = "x".repeat(MAX_ENV_BYTES);
    assert_eq!(
        field(json!({"program": "sh", "env": {"BIG": long}})),
        "params.env"
    );
    let fine = json!({"kind": "command", "params": {"program": "sh", "args": ["-c", "true"], "env": {"A": "1"}}});
    assert!(req(fine).unwrap().validate().is_ok());
}

#[test]
fn a_body_of_an_unknown_schema_version_is_refused() {
    let body = br#"{"schema":99,"id":"0190a0a0-0000-7000-8000-000000000000"}"#;
    assert!(JobMessage::from_bytes(body).unwrap_err().contains("schema"));
}

#[test]
fn only_terminal_statuses_are_final() {
    assert!(!JobStatus::Queued.is_final());
    assert!(!JobStatus::Running.is_final());
    assert!(JobStatus::DeadLettered.is_final());
    assert_eq!(
        JobStatus::parse("dead_lettered"),
        Some(JobStatus::DeadLettered)
    );
}
