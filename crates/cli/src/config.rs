//! Where the services are and which secrets to send. Each setting comes from its flag, else its
//! `GPUQ_*` variable (clap merges those two), else `.dev/env` (written by `scripts/dev.sh up`,
//! found in the current directory or any parent), else the dev stack's default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gpuq_common::config::Secret;
use serde::Serialize;

use crate::cli::ConnArgs;

pub const DEFAULT_GATEWAY_URL: &str = "http://127.0.0.1:8080";
pub const DEFAULT_MANAGER_URL: &str = "http://127.0.0.1:8090";
pub const DEFAULT_WORKER_URLS: &str =
    "http://127.0.0.1:9001,http://127.0.0.1:9002,http://127.0.0.1:9003";

/// Where a setting's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A flag or its `GPUQ_*` variable.
    FlagOrEnv,
    DevEnv,
    Default,
    Unset,
}

#[derive(Debug, Clone)]
pub struct Setting<T> {
    pub value: T,
    pub source: Source,
}

/// The resolved connection settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub gateway_url: Setting<String>,
    pub api_key: Setting<Option<Secret>>,
    pub manager_url: Setting<String>,
    pub admin_token: Setting<Option<Secret>>,
    /// The manager's read-only token; reads fall back to the admin token without it.
    pub read_token: Setting<Option<Secret>>,
    pub worker_urls: Setting<Vec<String>>,
    /// The CA file `https://` service URLs are trusted with (besides the system's roots).
    pub tls_ca_file: Setting<Option<String>>,
    /// The `.dev/env` file that was read, if any.
    pub dev_env: Option<PathBuf>,
}

/// `KEY=value` lines of a `.dev/env` file.
#[derive(Debug, Clone, Default)]
pub struct DevEnv {
    pub path: Option<PathBuf>,
    pub vars: BTreeMap<String, String>,
}

impl DevEnv {
    /// Finds and reads `.dev/env` from `start` or its nearest parent that has one.
    pub fn discover(start: &Path) -> Self {
        let Some(path) = find_dev_env(start) else {
            return Self::default();
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Self {
                vars: parse_env_file(&text),
                path: Some(path),
            },
            Err(_) => Self::default(),
        }
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.vars
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

/// The nearest `.dev/env` at or above `start`.
pub fn find_dev_env(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .map(|dir| dir.join(".dev").join("env"))
        .find(|p| p.is_file())
}

/// Parses `KEY=value` lines: blank lines and `#` comments skipped, an `export ` prefix and one
/// pair of matching quotes around the value removed.
pub fn parse_env_file(text: &str) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if key.is_empty() || key.contains(char::is_whitespace) {
            continue;
        }
        let value = value.trim();
        let value = ['"', '\'']
            .iter()
            .find_map(|q| {
                value
                    .strip_prefix(*q)
                    .and_then(|v| v.strip_suffix(*q))
                    .filter(|_| value.len() >= 2)
            })
            .unwrap_or(value);
        vars.insert(key.to_string(), value.to_string());
    }
    vars
}

fn pick(
    flag: &Option<String>,
    dev: &DevEnv,
    key: &str,
    default: Option<&str>,
) -> Setting<Option<String>> {
    if let Some(v) = flag.as_deref().map(str::trim).filter(|v| !v.is_empty()) {
        return Setting {
            value: Some(v.to_string()),
            source: Source::FlagOrEnv,
        };
    }
    if let Some(v) = dev.get(key) {
        return Setting {
            value: Some(v.to_string()),
            source: Source::DevEnv,
        };
    }
    match default {
        Some(d) => Setting {
            value: Some(d.to_string()),
            source: Source::Default,
        },
        None => Setting {
            value: None,
            source: Source::Unset,
        },
    }
}

fn url(s: Setting<Option<String>>) -> Setting<String> {
    Setting {
        value: s
            .value
            .unwrap_or_default()
            .trim_end_matches('/')
            .to_string(),
        source: s.source,
    }
}

fn secret(s: Setting<Option<String>>) -> Setting<Option<Secret>> {
    Setting {
        value: s.value.map(Secret::new),
        source: s.source,
    }
}

/// Splits a comma-separated URL list, dropping blanks and trailing slashes.
pub fn split_urls(s: &str) -> Vec<String> {
    s.split(',')
        .map(|u| u.trim().trim_end_matches('/'))
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect()
}

impl Config {
    /// Applies the precedence flags/env > `.dev/env` > defaults.
    pub fn resolve(conn: &ConnArgs, dev: &DevEnv) -> Self {
        let workers = pick(
            &conn.worker_urls,
            dev,
            "GPUQ_WORKER_URLS",
            Some(DEFAULT_WORKER_URLS),
        );
        Self {
            gateway_url: url(pick(
                &conn.gateway_url,
                dev,
                "GPUQ_GATEWAY_URL",
                Some(DEFAULT_GATEWAY_URL),
            )),
            api_key: secret(pick(&conn.api_key, dev, "GPUQ_API_KEY", None)),
            manager_url: url(pick(
                &conn.manager_url,
                dev,
                "GPUQ_MANAGER_URL",
                Some(DEFAULT_MANAGER_URL),
            )),
            admin_token: secret(pick(&conn.admin_token, dev, "GPUQ_ADMIN_TOKEN", None)),
            read_token: secret(pick(&conn.read_token, dev, "GPUQ_READ_TOKEN", None)),
            worker_urls: Setting {
                value: split_urls(workers.value.as_deref().unwrap_or_default()),
                source: workers.source,
            },
            tls_ca_file: pick(&conn.tls_ca_file, dev, "GPUQ_TLS_CA_FILE", None),
            dev_env: dev.path.clone(),
        }
    }

    /// Reads `.dev/env` from the current directory upwards, then resolves.
    pub fn load(conn: &ConnArgs) -> Self {
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        Self::resolve(conn, &DevEnv::discover(&cwd))
    }

    /// The settings as JSON, secrets shown only as set/unset.
    pub fn to_json(&self) -> serde_json::Value {
        fn secret_json(s: &Setting<Option<Secret>>) -> serde_json::Value {
            serde_json::json!({"set": s.value.is_some(), "source": s.source})
        }
        serde_json::json!({
            "gateway_url": {"value": self.gateway_url.value, "source": self.gateway_url.source},
            "api_key": secret_json(&self.api_key),
            "manager_url": {"value": self.manager_url.value, "source": self.manager_url.source},
            "admin_token": secret_json(&self.admin_token),
            "read_token": secret_json(&self.read_token),
            "worker_urls": {"value": self.worker_urls.value, "source": self.worker_urls.source},
            "tls_ca_file": {"value": self.tls_ca_file.value, "source": self.tls_ca_file.source},
            "dev_env": self.dev_env,
        })
    }

    /// Human-readable settings, secrets masked.
    pub fn render(&self) -> String {
        fn src(s: Source) -> &'static str {
            match s {
                Source::FlagOrEnv => "flag/env",
                Source::DevEnv => ".dev/env",
                Source::Default => "default",
                Source::Unset => "unset",
            }
        }
        fn masked(s: &Setting<Option<Secret>>) -> String {
            match &s.value {
                Some(_) => format!("*** ({})", src(s.source)),
                None => "(not set)".to_string(),
            }
        }
        let dev = self
            .dev_env
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "(none found)".into());
        format!(
            "gateway_url  {} ({})\napi_key      {}\nmanager_url  {} ({})\nadmin_token  {}\nread_token   {}\nworker_urls  {} ({})\ntls_ca_file  {} ({})\ndev_env      {}\n",
            self.gateway_url.value,
            src(self.gateway_url.source),
            masked(&self.api_key),
            self.manager_url.value,
            src(self.manager_url.source),
            masked(&self.admin_token),
            masked(&self.read_token),
            self.worker_urls.value.join(","),
            src(self.worker_urls.source),
            self.tls_ca_file
                .value
                .as_deref()
                .unwrap_or("(system roots only)"),
            src(self.tls_ca_file.source),
            dev,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(text: &str) -> DevEnv {
        DevEnv {
            path: Some(PathBuf::from("/x/.dev/env")),
            vars: parse_env_file(text),
        }
    }

    #[test]
    fn env_file_lines_are_parsed_with_comments_exports_and_quotes() {
        let vars = parse_env_file(
            "# written by dev.sh\n\nGPUQ_GATEWAY_URL=http://127.0.0.1:18080\nexport GPUQ_API_KEY=\"k=1\"\nGPUQ_ADMIN_TOKEN='t'\nnot a line\nGPUQ_EMPTY=\n",
        );
        assert_eq!(vars["GPUQ_GATEWAY_URL"], "http://127.0.0.1:18080");
        assert_eq!(vars["GPUQ_API_KEY"], "k=1");
        assert_eq!(vars["GPUQ_ADMIN_TOKEN"], "t");
        assert_eq!(vars["GPUQ_EMPTY"], "");
        assert_eq!(vars.len(), 4);
    }

    #[test]
    fn defaults_apply_when_nothing_is_given() {
        let c = Config::resolve(&ConnArgs::default(), &DevEnv::default());
        assert_eq!(c.gateway_url.value, DEFAULT_GATEWAY_URL);
        assert_eq!(c.gateway_url.source, Source::Default);
        assert_eq!(c.manager_url.value, DEFAULT_MANAGER_URL);
        assert!(c.api_key.value.is_none());
        assert_eq!(c.api_key.source, Source::Unset);
        assert_eq!(c.worker_urls.value.len(), 3);
        assert_eq!(c.worker_urls.value[1], "http://127.0.0.1:9002");
    }

    #[test]
    fn dev_env_beats_defaults_and_flags_beat_dev_env() {
        let d = dev(
            "GPUQ_GATEWAY_URL=http://g:1/\nGPUQ_API_KEY=fromfile\nGPUQ_WORKER_URLS=http://w:1, http://w:2/\nGPUQ_MANAGER_URL=\n",
        );
        let c = Config::resolve(&ConnArgs::default(), &d);
        assert_eq!(c.gateway_url.value, "http://g:1");
        assert_eq!(c.gateway_url.source, Source::DevEnv);
        assert_eq!(c.api_key.value.as_ref().unwrap().expose(), "fromfile");
        assert_eq!(c.worker_urls.value, vec!["http://w:1", "http://w:2"]);
        // An empty value in the file does not hide the default.
        assert_eq!(c.manager_url.source, Source::Default);

        let flags = ConnArgs {
            gateway_url: Some("http://flag:2".into()),
            api_key: Some("fromflag".into()),
            ..ConnArgs::default()
        };
        let c = Config::resolve(&flags, &d);
        assert_eq!(c.gateway_url.value, "http://flag:2");
        assert_eq!(c.gateway_url.source, Source::FlagOrEnv);
        assert_eq!(c.api_key.value.as_ref().unwrap().expose(), "fromflag");
        assert_eq!(c.worker_urls.source, Source::DevEnv);
    }

    #[test]
    fn an_empty_flag_or_variable_counts_as_absent() {
        let flags = ConnArgs {
            api_key: Some(String::new()),
            ..ConnArgs::default()
        };
        let c = Config::resolve(&flags, &dev("GPUQ_API_KEY=k"));
        assert_eq!(c.api_key.source, Source::DevEnv);
    }

    #[test]
    fn dev_env_is_found_in_a_parent_directory() {
        let root = std::env::temp_dir().join(format!("gpuq-cli-test-{}", uuid::Uuid::new_v4()));
        let deep = root.join("a").join("b");
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::create_dir_all(root.join(".dev")).unwrap();
        std::fs::write(root.join(".dev/env"), "GPUQ_API_KEY=found\n").unwrap();
        let d = DevEnv::discover(&deep);
        assert_eq!(d.path.as_deref(), Some(root.join(".dev/env").as_path()));
        assert_eq!(d.vars["GPUQ_API_KEY"], "found");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn rendered_settings_never_show_secrets() {
        let c = Config::resolve(
            &ConnArgs::default(),
            &dev("GPUQ_API_KEY=supersecret\nGPUQ_ADMIN_TOKEN=tok"),
        );
        assert!(!c.render().contains("supersecret"));
        assert!(!c.to_json().to_string().contains("supersecret"));
        assert!(c.render().contains("*** (.dev/env)"));
    }
}
