//! Any bytes a peer sends to the gossip core: decoded with limits, judged,
//! never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_gossip::{Gossip, GossipConfig, Peer, TestKeys};
use shoal_mesh::NodeId;

fuzz_target!(|data: &[u8]| {
    let me = Peer {
        id: NodeId(1),
        addr: "127.0.0.1:2377".into(),
        generation: 1 << 16,
        bump: 0,
    };
    let mut g = Gossip::new(me, GossipConfig::default(), 1, 1, Box::new(TestKeys(NodeId(1))));
    g.join_network(1, "net");
    let _ = g.handle_message(2, NodeId(2), data);
    g.handle_timeout(10_000);
});
