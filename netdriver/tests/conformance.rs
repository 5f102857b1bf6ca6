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
