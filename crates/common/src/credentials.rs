//! Worker credentials: a worker speaks for one engine only. The manager holds the fleet secret
//! (`GPUQ_WORKER_SECRET`); a worker is given `hex(HMAC-SHA256(secret, engine_id))` as its
//! `GPUQ_WORKER_TOKEN`, and the manager recomputes it for the engine a heartbeat names and
//! compares in constant time. Operator tokens are never worker credentials, and the reverse.

use hmac::{KeyInit, Mac};
use sha2::Sha256;

use crate::config::Secret;

type HmacSha256 = hmac::Hmac<Sha256>;

fn mac(secret: &Secret, engine_id: &str) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret.expose().as_bytes())
        .expect("HMAC takes a key of any size");
    mac.update(engine_id.as_bytes());
    mac
}

/// The credential of engine `engine_id` under the fleet secret: 64 lower-case hex digits.
/// `None` when the secret is empty (no credential can be derived from nothing).
pub fn worker_token(secret: &Secret, engine_id: &str) -> Option<Secret> {
    if secret.is_empty() {
        return None;
    }
    let tag = mac(secret, engine_id).finalize().into_bytes();
    Some(Secret::new(
        tag.iter().map(|b| format!("{b:02x}")).collect::<String>(),
    ))
}

/// Whether `token` is engine `engine_id`'s credential under `secret`, compared in constant time
/// (`verify_slice`). An empty secret accepts nothing.
pub fn verify_worker_token(secret: &Secret, engine_id: &str, token: &str) -> bool {
    if secret.is_empty() {
        return false;
    }
    let Some(tag) = decode_hex(token) else {
        return false;
    };
    mac(secret, engine_id).verify_slice(&tag).is_ok()
}

/// Exactly 64 hex digits (either case) → 32 bytes.
fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_the_hex_hmac_sha256_of_the_engine_id() {
        // RFC 4231, test case 2: key "Jefe", data "what do ya want for nothing?".
        let t = worker_token(&Secret::new("Jefe"), "what do ya want for nothing?").unwrap();
        assert_eq!(
            t.expose(),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(worker_token(&Secret::default(), "worker-1").is_none());
    }

    #[test]
    fn a_token_speaks_for_its_own_engine_under_its_own_secret_only() {
        let secret = Secret::new("fleet-secret");
        let t1 = worker_token(&secret, "worker-1").unwrap();
        let t1 = t1.expose();
        assert!(verify_worker_token(&secret, "worker-1", t1));
        assert!(verify_worker_token(
            &secret,
            "worker-1",
            &t1.to_ascii_uppercase()
        ));
        assert!(
            !verify_worker_token(&secret, "worker-2", t1),
            "another engine"
        );
        assert!(
            !verify_worker_token(&Secret::new("other"), "worker-1", t1),
            "another fleet"
        );
        assert!(
            !verify_worker_token(&Secret::default(), "worker-1", t1),
            "no secret"
        );
        let mut flipped = t1.to_string();
        flipped.replace_range(0..1, if t1.starts_with('0') { "1" } else { "0" });
        assert!(
            !verify_worker_token(&secret, "worker-1", &flipped),
            "one digit off"
        );
        for bad in [
            "",
            "fleet-secret",
            &t1[..62],
            &format!("{t1}00"),
            &"zz".repeat(32),
        ] {
            assert!(!verify_worker_token(&secret, "worker-1", bad), "{bad:?}");
        }
    }
}
