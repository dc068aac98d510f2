//! Tenants: whom a gateway API key speaks for, what it may do, and the limits its jobs carry.
//!
//! `GPUQ_API_KEYS` is a comma-separated list of `TENANT:ROLE:KEY` or `TENANT:ROLE:sha256:HEX`
//! (the SHA-256 of the key, so a config file need not hold the key itself). A bare `KEY` is the
//! `default` tenant's `admin` key, as keys were before tenants. Roles: `submit` (submit, read,
//! cancel and re-drive the tenant's own jobs) and `admin` (every job of every tenant).
//!
//! `GPUQ_TENANT_LIMITS` is a comma-separated list of `TENANT:NAME=VALUE:…` with the names
//! `rate` (submissions per second), `burst`, `max_queued` (jobs not final yet, 0 = no cap) and
//! `max_gpus` (GPUs running the tenant's jobs at once, 0 = no limit); the tenant `*` sets every
//! tenant's defaults. The built-in defaults never bite a single user.
//!
//! A presented key is hashed and compared with every configured digest in constant time (fixed
//! 32-byte digests, so not even the key's length leaks).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

/// The tenant of bare keys, and of jobs stored before tenants.
pub const DEFAULT_TENANT: &str = "default";

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Submit jobs, and read, list, cancel, stream and re-drive the tenant's own.
    Submit,
    /// Everything, over every tenant's jobs.
    Admin,
}

impl Role {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "submit" => Some(Role::Submit),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// Who a request speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub tenant: String,
    pub role: Role,
}

impl Principal {
    /// Whether this caller may see (read, cancel, re-drive) a job of `tenant`.
    pub fn sees(&self, tenant: &str) -> bool {
        self.role == Role::Admin || self.tenant == tenant
    }

    /// The one tenant whose jobs a listing shows; `None` (every tenant) for an admin.
    pub fn scope(&self) -> Option<&str> {
        (self.role != Role::Admin).then_some(self.tenant.as_str())
    }
}

/// A tenant's quotas and rate limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Submissions per second (token bucket refill).
    pub rate_per_s: f64,
    /// Submissions allowed at once above the rate.
    pub burst: u32,
    /// Jobs not final yet (queued or running); `None`: no cap (the broker's queue length
    /// limit still applies), and the gateway does not count them.
    pub max_queued: Option<u64>,
    /// GPUs running the tenant's jobs at once, over the whole fleet.
    pub max_gpus: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            rate_per_s: 10_000.0,
            burst: 20_000,
            max_queued: None,
            max_gpus: None,
        }
    }
}

struct Key {
    principal: Principal,
    digest: [u8; 32],
}

/// The gateway's keys and every tenant's limits.
#[derive(Default)]
pub struct Tenants {
    keys: Vec<Key>,
    defaults: Limits,
    limits: BTreeMap<String, Limits>,
}

impl fmt::Debug for Tenants {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<_> = self
            .keys
            .iter()
            .map(|k| (&k.principal.tenant, k.principal.role))
            .collect();
        f.debug_struct("Tenants")
            .field("keys", &keys)
            .field("defaults", &self.defaults)
            .field("limits", &self.limits)
            .finish()
    }
}

impl Clone for Tenants {
    fn clone(&self) -> Self {
        Self {
            keys: self
                .keys
                .iter()
                .map(|k| Key {
                    principal: k.principal.clone(),
                    digest: k.digest,
                })
                .collect(),
            defaults: self.defaults,
            limits: self.limits.clone(),
        }
    }
}

/// A tenant name: 1 to 64 of `a-z`, `0-9`, `-`, `_`, `.`.
pub fn validate_tenant(name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tenant {name:?}: 1 to 64 of a-z, 0-9, '-', '_', '.'"
        ))
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn parse_hex_digest(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Tenants {
    /// Parses `GPUQ_API_KEYS` and `GPUQ_TENANT_LIMITS` (see the module's documentation).
    pub fn parse(api_keys: &str, limits: &str) -> Result<Self, String> {
        let mut keys: Vec<Key> = vec![];
        for entry in api_keys.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let key = parse_key(entry)?;
            if keys.iter().any(|k| k.digest == key.digest) {
                return Err(format!(
                    "the same key is given twice (tenant {})",
                    key.principal.tenant
                ));
            }
            keys.push(key);
        }
        let entries: Vec<(&str, &str)> = limits
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|e| e.split_once(':').unwrap_or((e, "")))
            .collect();
        let mut defaults = Limits::default();
        for (_, fields) in entries.iter().filter(|(t, _)| *t == "*") {
            defaults = parse_limits(defaults, fields)?;
        }
        let mut per_tenant = BTreeMap::new();
        for (tenant, fields) in entries.iter().filter(|(t, _)| *t != "*") {
            validate_tenant(tenant)?;
            per_tenant.insert((*tenant).to_string(), parse_limits(defaults, fields)?);
        }
        Ok(Self {
            keys,
            defaults,
            limits: per_tenant,
        })
    }

    /// No key at all: every request is refused.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The principal a bearer key speaks for, if it is one of the configured keys.
    pub fn authenticate(&self, token: &str) -> Option<Principal> {
        let digest = sha256(token.as_bytes());
        let mut found = None;
        for k in &self.keys {
            let eq = constant_time_eq(&digest, &k.digest);
            if eq && found.is_none() {
                found = Some(&k.principal);
            }
        }
        found.cloned()
    }

    /// Whether any tenant has a cap on unfinished jobs (else nobody needs them counted).
    pub fn caps_unfinished(&self) -> bool {
        self.defaults.max_queued.is_some() || self.limits.values().any(|l| l.max_queued.is_some())
    }

    pub fn limits(&self, tenant: &str) -> Limits {
        self.limits.get(tenant).copied().unwrap_or(self.defaults)
    }

    /// Every tenant that has a key, once.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .keys
            .iter()
            .map(|k| k.principal.tenant.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

fn parse_key(entry: &str) -> Result<Key, String> {
    let parts: Vec<&str> = entry.splitn(3, ':').collect();
    let (tenant, role, secret) = match parts.as_slice() {
        [bare] => (DEFAULT_TENANT, Role::Admin, *bare),
        [tenant, role, secret] => {
            validate_tenant(tenant)?;
            let role = Role::parse(role)
                .ok_or_else(|| format!("tenant {tenant}: role {role:?} is not submit or admin"))?;
            (*tenant, role, *secret)
        }
        _ => {
            return Err("an entry is TENANT:ROLE:KEY, TENANT:ROLE:sha256:HEX or a bare KEY".into());
        }
    };
    let digest = match secret.strip_prefix("sha256:") {
        Some(hex) => parse_hex_digest(hex)
            .ok_or_else(|| format!("tenant {tenant}: sha256: takes 64 hex digits"))?,
        None if secret.len() < 8 => {
            return Err(format!("tenant {tenant}: a key has at least 8 characters"));
        }
        None => sha256(secret.as_bytes()),
    };
    Ok(Key {
        principal: Principal {
            tenant: tenant.to_string(),
            role,
        },
        digest,
    })
}

fn parse_limits(mut l: Limits, fields: &str) -> Result<Limits, String> {
    for field in fields.split(':').filter(|f| !f.is_empty()) {
        let (name, value) = field
            .split_once('=')
            .ok_or_else(|| format!("limit {field:?}: NAME=VALUE"))?;
        let bad = || format!("limit {name}: {value:?} is not a number");
        match name {
            "rate" => {
                l.rate_per_s = value.parse().map_err(|_| bad())?;
                if !(l.rate_per_s > 0.0 && l.rate_per_s.is_finite()) {
                    return Err("limit rate: above 0".into());
                }
            }
            "burst" => l.burst = value.parse().map_err(|_| bad())?,
            "max_queued" => {
                let n: u64 = value.parse().map_err(|_| bad())?;
                l.max_queued = (n > 0).then_some(n);
            }
            "max_gpus" => {
                let n: u32 = value.parse().map_err(|_| bad())?;
                l.max_gpus = (n > 0).then_some(n);
            }
            other => {
                return Err(format!(
                    "limit {other:?}: one of rate, burst, max_queued, max_gpus"
                ));
            }
        }
    }
    if l.burst == 0 {
        return Err("limit burst: at least 1".into());
    }
    Ok(l)
}

/// The SHA-256 of a key, as `GPUQ_API_KEYS` takes it (`TENANT:ROLE:sha256:HEX`).
pub fn key_digest_hex(key: &str) -> String {
    sha256(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_their_tenant_and_role_hashed_or_not() {
        let hashed = key_digest_hex("team-b-secret");
        let t = Tenants::parse(
            &format!(
                "team-a:submit:team-a-secret, team-b:submit:sha256:{hashed},ops:admin:ops-secret"
            ),
            "",
        )
        .unwrap();
        let a = t.authenticate("team-a-secret").unwrap();
        assert_eq!((a.tenant.as_str(), a.role), ("team-a", Role::Submit));
        let b = t.authenticate("team-b-secret").unwrap();
        assert_eq!(b.tenant, "team-b");
        assert_eq!(t.authenticate("ops-secret").unwrap().role, Role::Admin);
        assert_eq!(t.authenticate("team-a-secreT"), None);
        assert_eq!(t.authenticate(""), None);
        assert_eq!(t.authenticate(&format!("sha256:{hashed}")), None);
        assert_eq!(t.names(), vec!["ops", "team-a", "team-b"]);
        assert!(!format!("{t:?}").contains("secret"));
    }

    #[test]
    fn a_bare_key_is_the_default_tenants_admin() {
        let t = Tenants::parse("legacy-key-1", "").unwrap();
        let p = t.authenticate("legacy-key-1").unwrap();
        assert_eq!(p.tenant, DEFAULT_TENANT);
        assert_eq!(p.role, Role::Admin);
        assert_eq!(p.scope(), None);
        assert!(Tenants::parse("", "").unwrap().is_empty());
    }

    #[test]
    fn bad_entries_are_refused() {
        for bad in [
            "Team:submit:longenough",
            "team:owner:longenough",
            "team:submit:short",
            "team:submit:sha256:abc",
            "a:b",
            "t1:submit:samesame1,t2:submit:samesame1",
        ] {
            assert!(Tenants::parse(bad, "").is_err(), "{bad}");
        }
        for bad in ["t:rate=0", "t:burst=0", "t:speed=1", "t:rate=x", "T:rate=1"] {
            assert!(Tenants::parse("", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn limits_fall_back_to_the_star_entry_then_the_defaults() {
        let t = Tenants::parse("", "team-b:rate=5:max_gpus=2, *:max_queued=100:burst=7").unwrap();
        let b = t.limits("team-b");
        assert_eq!(b.rate_per_s, 5.0);
        assert_eq!(b.max_gpus, Some(2));
        assert_eq!(b.max_queued, Some(100));
        assert_eq!(b.burst, 7);
        let other = t.limits("team-z");
        assert_eq!(other.rate_per_s, Limits::default().rate_per_s);
        assert_eq!(other.max_queued, Some(100));
        assert_eq!(other.max_gpus, None);
        assert_eq!(
            Tenants::parse("", "t:max_gpus=0")
                .unwrap()
                .limits("t")
                .max_gpus,
            None
        );
    }

    #[test]
    fn a_submit_key_sees_only_its_tenant() {
        let p = Principal {
            tenant: "a".into(),
            role: Role::Submit,
        };
        assert!(p.sees("a"));
        assert!(!p.sees("b"));
        assert_eq!(p.scope(), Some("a"));
    }
}
