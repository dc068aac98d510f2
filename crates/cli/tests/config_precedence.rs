//! The real binary's settings precedence: flag > `GPUQ_*` variable > `.dev/env` (found in a parent
//! directory) > default, checked through `gpuq config --json`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn temp_tree() -> (PathBuf, PathBuf) {
    let root = std::env::temp_dir().join(format!("gpuq-cli-it-{}", uuid::Uuid::new_v4()));
    let deep = root.join("sub").join("dir");
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::create_dir_all(root.join(".dev")).unwrap();
    std::fs::write(
        root.join(".dev/env"),
        "GPUQ_GATEWAY_URL=http://file:1\nGPUQ_MANAGER_URL=http://file:2\nGPUQ_API_KEY=filekey\n",
    )
    .unwrap();
    (root, deep)
}

fn config(cwd: &Path, env: &[(&str, &str)], args: &[&str]) -> Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpuq"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("GPUQ_")) {
        cmd.env_remove(k);
    }
    cmd.current_dir(cwd)
        .envs(env.iter().copied())
        .args(args)
        .args(["config", "--json"]);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn flags_beat_variables_which_beat_the_dev_env_file_which_beats_defaults() {
    let (root, deep) = temp_tree();

    let c = config(&deep, &[("GPUQ_GATEWAY_URL", "http://env:1")], &[]);
    assert_eq!(c["gateway_url"]["value"], "http://env:1");
    assert_eq!(c["gateway_url"]["source"], "flag_or_env");
    assert_eq!(c["manager_url"]["value"], "http://file:2");
    assert_eq!(c["manager_url"]["source"], "dev_env");
    assert_eq!(c["api_key"]["set"], true);
    assert_eq!(c["api_key"]["source"], "dev_env");
    assert_eq!(c["worker_urls"]["source"], "default");
    assert_eq!(c["admin_token"]["set"], false);
    assert!(!c.to_string().contains("filekey"), "secrets never printed");

    let c = config(
        &deep,
        &[("GPUQ_GATEWAY_URL", "http://env:1")],
        &["--gateway-url", "http://flag:1"],
    );
    assert_eq!(c["gateway_url"]["value"], "http://flag:1");

    let c = config(&std::env::temp_dir(), &[], &[]);
    if c["dev_env"].is_null() {
        assert_eq!(c["gateway_url"]["value"], "http://127.0.0.1:8080");
        assert_eq!(c["gateway_url"]["source"], "default");
    }
    std::fs::remove_dir_all(root).unwrap();
}
