use proptest::prelude::*;

use super::*;

#[test]
fn routes_parse_with_their_defaults() {
    let r: HttpRoute = "host=A.Test".parse().unwrap();
    assert_eq!(
        r,
        HttpRoute {
            host: "a.test".into(),
            path: "/".into(),
            target: 80,
            sticky: false
        }
    );
    let r: HttpRoute = "host=b.test,path=/api/,target=8080,sticky=true"
        .parse()
        .unwrap();
    assert_eq!((r.path.as_str(), r.target, r.sticky), ("/api", 8080, true));
    assert_eq!(r.to_string(), "b.test/api → :8080 (sticky)");
    let k: RouteKey = "b.test/api".parse().unwrap();
    assert_eq!(k, r.key());
    assert_eq!("a.test".parse::<RouteKey>().unwrap().to_string(), "a.test");
}

#[test]
fn bad_routes_say_what_to_write() {
    for (text, says) in [
        ("path=/x", "no host"),
        ("host=a.test,host=b.test", "given twice"),
        ("host=a.test,port=80", "unknown key `port`"),
        ("host=a.test,target=0", "use 1 to 65535"),
        ("host=a.test,target=70000", "use 1 to 65535"),
        ("host=a.test,sticky=yes", "use true or false"),
        ("host=a.test:8080", "no port"),
        ("host=-a.test", "invalid host"),
        ("host=a..test", "invalid host"),
        ("host=a_b.test", "invalid host"),
        ("host=", "invalid host"),
        ("host=a.test,path=api", "must start with `/`"),
        ("host=a.test,path=/a/../b", "`..` segment"),
        ("host=a.test,path=/a//b", "empty"),
        ("host=a.test,path=/a b", "no spaces"),
        ("host=a.test,path=/a?b=1", "`?`"),
        ("host=a.test,path=/%2e%2e", "`%`"),
        ("host=a.test,sticky", "not KEY=VALUE"),
    ] {
        let e = text.parse::<HttpRoute>().unwrap_err();
        assert!(e.contains(says), "{text}: {e}");
    }
    let long = format!("host={}.test", "a".repeat(64));
    assert!(long.parse::<HttpRoute>().is_err());
    let long_path = format!("host=a.test,path=/{}", "a".repeat(MAX_PATH));
    assert!(long_path.parse::<HttpRoute>().unwrap_err().contains("over"));
}

#[test]
fn a_prefix_takes_its_own_segments_only() {
    assert!(under("/", "/anything"));
    assert!(under("/api", "/api"));
    assert!(under("/api", "/api/v1"));
    assert!(under("/api", "/api?x=1"));
    assert!(!under("/api", "/apix"));
    assert!(!under("/api", "/"));
}

#[test]
fn a_service_s_routes_are_checked_whole() {
    let r = |s: &str| s.parse::<HttpRoute>().unwrap();
    assert!(check(&[r("host=a.test"), r("host=a.test,path=/api")]).is_ok());
    let e = check(&[
        r("host=a.test,path=/api"),
        r("host=a.test,path=/api/,target=81"),
    ])
    .unwrap_err();
    assert!(e.contains("given twice"), "{e}");
    let many: Vec<HttpRoute> = (0..=MAX_ROUTES)
        .map(|i| r(&format!("host=h{i}.test")))
        .collect();
    assert!(check(&many).unwrap_err().contains("at most"));
    // From the log: not normalized is refused.
    let mut odd = r("host=a.test");
    odd.host = "A.test".into();
    assert!(check(&[odd]).is_err());
}

proptest! {
    /// Whatever is typed, parsing returns (never panics), and what it
    /// accepts passes the store's check.
    #[test]
    fn any_text_parses_or_is_refused(text in "\\PC{0,80}") {
        if let Ok(r) = text.parse::<HttpRoute>() {
            prop_assert!(check(&[r]).is_ok());
        }
        let _ = text.parse::<RouteKey>();
    }
}
