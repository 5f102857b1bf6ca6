//! Tasks as containers (issue 15): the container engine, containerd, as a
//! node sees it. Every host runs a containerd of its own.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use shoal_integration::{Cluster, root_or_skip};

fn containerd_of(c: &Cluster, i: usize) -> serde_json::Value {
    c.info(i).unwrap()["containerd"].clone()
}

#[test]
fn a_node_shows_its_containerd_and_says_what_to_do_when_it_does_not_answer() {
    if !root_or_skip("run containerd") {
        return;
    }
    let mut c = Cluster::start(1).unwrap();
    let socket = c.containerd_socket(0).display().to_string();
    // Nothing started behind the user's back: no containerd, and info
    // says where it looked and what to do.
    let down = containerd_of(&c, 0);
    assert_eq!(down["socket"], socket.as_str());
    assert!(down["version"].is_null(), "{down}");
    let error = down["error"].as_str().unwrap();
    assert!(
        error.contains(&socket) && error.contains("--containerd-socket"),
        "{error}"
    );

    c.start_containerd(0).unwrap();
    let up = containerd_of(&c, 0);
    assert!(up["error"].is_null(), "{up}");
    assert!(up["version"].as_str().unwrap().starts_with("1."), "{up}");

    // containerd dies and comes back: the node notices both, in a swarm too.
    c.init(0).unwrap();
    c.kill_containerd(0);
    c.wait_until("containerd reported down", Duration::from_secs(10), |c| {
        Ok(containerd_of(c, 0)["error"].is_string())
    })
    .unwrap();
    c.start_containerd(0).unwrap();
    c.wait_until(
        "containerd reported up again",
        Duration::from_secs(10),
        |c| Ok(containerd_of(c, 0)["version"].is_string()),
    )
    .unwrap();
}
