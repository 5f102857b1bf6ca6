//! The conformance suite against the recording backend (always) and the
//! Linux backend (as root, inside a fresh network namespace).

#![allow(clippy::unwrap_used)]

use shoal_netdriver::recording::Recording;
use shoal_netdriver::render::Names;

#[tokio::test]
async fn the_recording_backend_passes_the_suite() {
    let mut b = Recording::default();
    let names = Names::for_node("00000000000000aa");
    shoal_netdriver::conformance::run(&mut b, &names)
        .await
        .unwrap();
    assert!(b.kernel.namespaces.values().all(|n| n.links.is_empty()));
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
}

/// Removes the test's namespaces, also when the test fails.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for prefix in &self.0 {
            for ns in shoal_netdriver::linux::list_netns(prefix) {
                let _ = shoal_netdriver::linux::delete_netns(&ns);
            }
        }
    }
}

#[tokio::test]
async fn the_linux_backend_passes_the_suite_in_a_fresh_namespace() {
    if !is_root() {
        eprintln!("skipped: needs root to create network namespaces");
        return;
    }
    let pid = std::process::id();
    // Not under the node's prefix, or the reconciler would own it.
    let host = format!("shoal-host{pid}");
    let node = format!("conf{pid}");
    let names = Names::for_node(&node);
    let _cleanup = Cleanup(vec![host.clone(), names.prefix.clone()]);
    shoal_netdriver::linux::create_netns(&host).unwrap();
    let mut b = shoal_netdriver::linux::Linux::new(Some(host.clone()));
    shoal_netdriver::conformance::run(&mut b, &names)
        .await
        .unwrap();
    assert!(shoal_netdriver::linux::list_netns(&names.prefix).is_empty());
}
