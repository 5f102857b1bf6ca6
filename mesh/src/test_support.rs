//! Fixtures shared by this crate's tests.

use crate::apply::{Command, apply};
use crate::network::{Driver, NetworkSpec};
use crate::service::{Attachment, EndpointMode, PortSpec, ServiceMode, ServiceSpec};
use crate::state::ClusterState;

pub use crate::fixtures::node;

/// A swarm of `nodes` nodes (pool 10.0.0.0/8 in /24s, ingress ID `ing`)
/// with an overlay network `web` (ID `web`).
pub fn swarm(nodes: u64) -> ClusterState {
    let mut s = ClusterState::default();
    let cluster = crate::fixtures::cluster_info("c");
    let init = Command::Init {
        cluster,
        first: node(1),
        ingress_id: "ing".into(),
    };
    apply(&mut s, &init).unwrap();
    for i in 2..=nodes {
        apply(&mut s, &Command::AddNode(node(i))).unwrap();
    }
    let web = Command::CreateNetwork {
        id: "web".into(),
        spec: NetworkSpec::new("web", Driver::Overlay),
        created_at_ms: 0,
        avoid: vec![],
    };
    apply(&mut s, &web).unwrap();
    s
}

/// Service `name`: 3 replicas of `http-echo` on `web`, publishing `ports`.
pub fn service(name: &str, ports: Vec<PortSpec>) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        mode: ServiceMode::Replicated(3),
        networks: vec![Attachment {
            network: "web".into(),
            aliases: vec![],
        }],
        ports,
        endpoint_mode: EndpointMode::Vip,
        constraints: vec![],
        env: Default::default(),
        command: vec!["http-echo".into()],
        labels: Default::default(),
        restart: Default::default(),
        update: Default::default(),
        container: None,
        ext: Default::default(),
    }
}
