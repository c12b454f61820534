//! The inbox's files as the agent serves them: no token needed (they hold
//! no data), a Content-Security-Policy that allows only this origin's
//! script and style, nothing fetched from elsewhere. Its behaviour in a
//! real browser is tested end to end in tests/tests/inbox.rs.
mod api_support;

use api_support::*;
use qgate_agent::api::ApiOptions;
use reqwest::StatusCode;

#[tokio::test]
async fn the_inbox_is_served_with_a_strict_content_security_policy() {
    let api = start(ApiOptions::default()).await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let moved = client.get(api.url("/ui")).send().await.unwrap();
    assert_eq!(moved.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(moved.headers()["location"], "/ui/");
    for (path, kind) in [
        ("/ui/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
    ] {
        let res = client.get(api.url(path)).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{path}");
        let headers = res.headers().clone();
        assert!(
            headers["content-type"].to_str().unwrap().starts_with(kind),
            "{path}: {:?}",
            headers["content-type"]
        );
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'none'"), "{csp}");
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert_eq!(headers["x-content-type-options"], "nosniff");
        assert_eq!(headers["referrer-policy"], "no-referrer");
        let body = res.text().await.unwrap();
        for outside in ["http://", "https://", "//cdn", "@import"] {
            assert!(
                !body.contains(outside),
                "{path} refers elsewhere: {outside}"
            );
        }
    }
    // The data stays behind the token.
    let res = client.get(api.url("/v1/requests")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    api.shutdown().await;
}
