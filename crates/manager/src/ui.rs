//! The live status page (`GET /ui`): one self-contained HTML file (CSS and vanilla JS inline,
//! no build step, no network) compiled into the binary. It follows `/v1/events` and falls back
//! to polling `/v1/overview`.

use axum::http::header;
use axum::response::IntoResponse;

/// The page, embedded at compile time.
pub const PAGE: &str = include_str!("ui/index.html");

pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, csp()),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        PAGE,
    )
}

/// The page's Content-Security-Policy: nothing loaded from elsewhere, no framing, no forms, and
/// of inline code only the page's own script and style, named by their SHA-256, so an injected
/// script or style would not run.
pub fn csp() -> &'static str {
    static CSP: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "default-src 'none'; script-src '{}'; style-src '{}'; connect-src 'self'; \
             img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            inline_hash("script"),
            inline_hash("style"),
        )
    });
    CSP.as_str()
}

/// `sha256-…` of the text of the page's one `<tag>` element.
fn inline_hash(tag: &str) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let open = format!("<{tag}>");
    let start = PAGE.find(&open).expect("the page has the element") + open.len();
    let end = start + PAGE[start..].find(&format!("</{tag}>")).expect("closed");
    let digest = sha2::Sha256::digest(&PAGE.as_bytes()[start..end]);
    format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_names_exactly_one_script_and_one_style_of_the_page() {
        assert_eq!(PAGE.matches("<script>").count(), 1, "one inline script");
        assert_eq!(PAGE.matches("<style>").count(), 1, "one inline style");
        assert!(
            !PAGE.contains("<script src"),
            "nothing loaded from elsewhere"
        );
        let policy = csp();
        assert!(policy.contains("script-src 'sha256-"), "{policy}");
        assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
        assert!(!policy.contains("unsafe"), "{policy}");
    }
}
