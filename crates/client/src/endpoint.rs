//! What the typed service clients share: one keep-alive HTTP client, bearer auth, and errors that
//! carry the server's `{"error":{"code","message"}}`.

use std::time::Duration;

use gpuq_common::config::Secret;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// A failed call to a gpuq service.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("request to the {service} at {url} failed")]
    Transport {
        service: &'static str,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the {service} answered {status} {code}: {message}")]
    Api {
        service: &'static str,
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected answer from the {service} at {url}: {detail}")]
    Protocol {
        service: &'static str,
        url: String,
        detail: String,
    },
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Worth retrying: the service was unreachable, overloaded or waiting on a dependency.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Transport { .. } => true,
            ClientError::Api { status, .. } => matches!(status, 429 | 502 | 503 | 504),
            ClientError::Protocol { .. } => false,
        }
    }

    /// A short reason for counting rejections: `503 unavailable`, `transport`.
    pub fn short(&self) -> String {
        match self {
            ClientError::Transport { .. } => "transport error".into(),
            ClientError::Api { status, code, .. } => format!("{status} {code}"),
            ClientError::Protocol { .. } => "bad response".into(),
        }
    }

    /// What to tell a person about a 401/403.
    pub fn hint(&self) -> Option<&'static str> {
        match (self, self.status()) {
            (ClientError::Api { service, .. }, Some(401)) if *service == "gateway" => {
                Some("set GPUQ_API_KEY or --api-key (scripts/dev.sh up writes it to .dev/env)")
            }
            (ClientError::Api { service, .. }, Some(401)) if *service == "manager" => Some(
                "set GPUQ_READ_TOKEN (reads) or GPUQ_ADMIN_TOKEN (reads and actions), or --read-token / --admin-token",
            ),
            (ClientError::Api { .. }, Some(401 | 403)) => Some(
                "set GPUQ_ADMIN_TOKEN or --admin-token; worker faults also need GPUQ_FAULT_INJECTION=true on the worker",
            ),
            (ClientError::Transport { .. }, _) => {
                Some("is the stack up? (scripts/dev.sh up; gpuq config shows the URLs in use)")
            }
            _ => None,
        }
    }
}

/// One HTTP client for a whole run: keep-alive connections, no proxy (the fleet is reached
/// directly), bounded connect and request times; `https://` trusts the process's CA file
/// (`gpuq_common::tls::trust`).
pub fn http_client(max_idle_per_host: usize) -> reqwest::Client {
    gpuq_common::tls::http_client_builder()
        .pool_max_idle_per_host(max_idle_per_host)
        .tcp_nodelay(true)
        .no_proxy()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(30))
        .build()
        .expect("an HTTP client with a rustls configuration always builds")
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
}

/// A service's base URL and credentials.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub service: &'static str,
    pub base: String,
    token: Option<Secret>,
    http: reqwest::Client,
}

impl Endpoint {
    pub fn new(
        service: &'static str,
        http: reqwest::Client,
        base: &str,
        token: Option<Secret>,
    ) -> Self {
        Self {
            service,
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        }
    }

    /// The HTTP client it sends with.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let rb = self.http.request(method, self.url(path));
        match &self.token {
            Some(t) => rb.bearer_auth(t.expose()),
            None => rb,
        }
    }

    /// Sends, and turns any non-2xx answer into `ClientError::Api`.
    pub async fn send(&self, rb: RequestBuilder, path: &str) -> Result<Response, ClientError> {
        let resp = rb.send().await.map_err(|source| ClientError::Transport {
            service: self.service,
            url: self.url(path),
            source,
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        Err(api_error(self.service, status, &text))
    }

    /// Sends and decodes a JSON body.
    pub async fn json<T: DeserializeOwned>(
        &self,
        rb: RequestBuilder,
        path: &str,
    ) -> Result<T, ClientError> {
        let resp = self.send(rb, path).await?;
        self.decode(resp, path).await
    }

    pub async fn decode<T: DeserializeOwned>(
        &self,
        resp: Response,
        path: &str,
    ) -> Result<T, ClientError> {
        let bytes = resp
            .bytes()
            .await
            .map_err(|source| ClientError::Transport {
                service: self.service,
                url: self.url(path),
                source,
            })?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol {
            service: self.service,
            url: self.url(path),
            detail: e.to_string(),
        })
    }

    pub async fn text(&self, rb: RequestBuilder, path: &str) -> Result<String, ClientError> {
        let resp = self.send(rb, path).await?;
        resp.text().await.map_err(|source| ClientError::Transport {
            service: self.service,
            url: self.url(path),
            source,
        })
    }
}

/// The server's JSON error if it sent one, else the status and a bit of the body.
pub fn api_error(service: &'static str, status: StatusCode, body: &str) -> ClientError {
    match serde_json::from_str::<ErrorBody>(body) {
        Ok(b) => ClientError::Api {
            service,
            status: status.as_u16(),
            code: b.error.code,
            message: b.error.message,
        },
        Err(_) => ClientError::Api {
            service,
            status: status.as_u16(),
            code: status
                .canonical_reason()
                .unwrap_or("error")
                .to_ascii_lowercase()
                .replace(' ', "_"),
            message: body
                .chars()
                .take(200)
                .collect::<String>()
                .trim()
                .to_string(),
        },
    }
}

/// Percent-encodes a query value (RFC 3986 unreserved characters pass through).
pub fn encode_query_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `?a=1&b=x` from the pairs whose value is present.
pub fn query_string(pairs: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode_query_value(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_servers_json_error_is_carried() {
        let e = api_error(
            "gateway",
            StatusCode::UNPROCESSABLE_ENTITY,
            r#"{"error":{"code":"invalid","message":"gpus: must be 1 to 64"}}"#,
        );
        assert_eq!(
            e.to_string(),
            "the gateway answered 422 invalid: gpus: must be 1 to 64"
        );
        assert!(!e.is_transient());
    }

    #[test]
    fn a_non_json_error_keeps_the_status_and_some_text() {
        let e = api_error(
            "manager",
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream down\n",
        );
        assert_eq!(e.status(), Some(503));
        assert!(e.is_transient());
        assert_eq!(
            e.to_string(),
            "the manager answered 503 service_unavailable: upstream down"
        );
    }

    #[test]
    fn query_strings_skip_absent_values_and_escape_the_rest() {
        let q = query_string(&[
            ("status", Some("succeeded".into())),
            ("pool", None),
            ("cursor", Some("a b&c".into())),
        ]);
        assert_eq!(q, "?status=succeeded&cursor=a%20b%26c");
        assert_eq!(query_string(&[("x", None)]), "");
    }
}
