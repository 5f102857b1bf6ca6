//! Whether this process may touch the kernel's network state, and what a
//! test does when it may not.

/// Whether this process runs as root (effective UID 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
}

/// For a test that needs root to do `what`: whether it may run. Without
/// root it prints why it is skipped and returns `false`, except when `CI`
/// is set: a CI run must never pass by skipping, so it panics, naming what
/// is missing.
pub fn root_or_skip(what: &str) -> bool {
    if is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("CI is set and this test needs root to {what}: run the suite as root");
    }
    eprintln!("skipped: needs root to {what}");
    false
}
