//! Scenario tests on the simulated network.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use shoal_gossip::sim::Sim;
use shoal_gossip::{GossipConfig, MemberState};
use shoal_mesh::NodeId;
use shoal_mesh::observed::{TableValue, VtepRecord};

fn vtep(n: u64) -> TableValue {
    TableValue::Vtep(VtepRecord {
        node: NodeId(n),
        addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, n as u8)),
    })
}

fn peer(n: u64) -> shoal_gossip::Peer {
    shoal_gossip::Peer {
        id: NodeId(n),
        addr: format!("sim:{n}").into(),
        generation: 1 << 16,
        bump: 0,
    }
}

/// Node 1 on its own, driven by hand.
fn lone_node() -> shoal_gossip::Gossip {
    shoal_gossip::Gossip::new(
        peer(1),
        GossipConfig::default(),
        1,
        1,
        Box::new(shoal_gossip::TestKeys(NodeId(1))),
    )
}

/// `cluster(n)` with every node attached to network `net`.
fn cluster_on_net(n: u64) -> Sim {
    let mut sim = cluster(n);
    for i in 1..=n {
        sim.with_node(NodeId(i), |g, now| g.join_network(now, "net"));
    }
    sim.run_for(500);
    sim
}

/// Crashes node `i`, and 1 s later starts it again (a new generation,
/// introduced to node 1) attached to `net`.
fn restart_on_net(sim: &mut Sim, i: u64) {
    sim.crash(NodeId(i));
    sim.run_for(1_000);
    sim.start(NodeId(i), &[NodeId(1)]);
    sim.with_node(NodeId(i), |g, now| g.join_network(now, "net"));
}

/// The keys node `i` sees in `net`.
fn keys_in(sim: &Sim, i: u64, net: &str) -> BTreeSet<String> {
    sim.nodes[&NodeId(i)]
        .gossip
        .snapshot(net)
        .into_iter()
        .map(|(k, _)| k.key)
        .collect()
}

/// Node `b`'s state in node `a`'s member list, if `a` tracks it.
fn member_state(sim: &Sim, a: u64, b: u64) -> Option<MemberState> {
    sim.nodes[&NodeId(a)]
        .gossip
        .members()
        .into_iter()
        .find(|m| m.node_id == NodeId(b))
        .map(|m| m.state)
}

fn cluster(n: u64) -> Sim {
    let mut sim = Sim::new(7, GossipConfig::default(), 1_000_000);
    sim.start(NodeId(1), &[]);
    for i in 2..=n {
        sim.start(NodeId(i), &[NodeId(1)]);
    }
    sim.run_for(3_000);
    sim
}

/// An idle node wakes for its probes and anti-entropy, not for SWIM's
/// periodic gossip while it has nothing to pass on; and once it has
/// something again (a crash to report), it passes it on as before.
#[test]
fn an_idle_node_wakes_only_for_its_probes_and_anti_entropy() {
    let mut sim = cluster_on_net(5);
    sim.run_for(30_000);
    for (_, n) in sim.nodes.iter() {
        assert_eq!(n.gossip.swim_backlog(), 0, "settled");
    }
    sim.timer_wakeups.clear();
    sim.run_for(10_000);
    let config = GossipConfig::default();
    // Per second: a probe and its round-trip timer each probe period, one
    // anti-entropy round, and the rare announces; not one gossip timer per
    // gossip interval (which would add 1000 / gossip_interval_ms).
    let probes = 2.0 * 1000.0 / config.probe_period_ms as f64;
    let most = ((probes + 1.0 + 1.0) * 10.0) as u64;
    for (id, w) in &sim.timer_wakeups {
        assert!(
            *w <= most,
            "node {id} woke {w} times in 10 idle seconds (at most {most})"
        );
    }
    sim.crash(NodeId(5));
    sim.run_for(5_000);
    for i in 1..=4 {
        assert_eq!(
            member_state(&sim, i, 5),
            Some(MemberState::Dead),
            "node {i}"
        );
    }
}

#[test]
fn entries_reach_every_member_and_a_crashed_owner_disappears() {
    let mut sim = cluster(5);
    for i in 1..=5 {
        sim.with_node(NodeId(i), |g, now| g.join_network(now, "net"));
    }
    sim.run_for(500);
    for i in 1..=5 {
        sim.with_node(NodeId(i), |g, now| {
            g.put(now, "net", "vteps", &i.to_string(), vtep(i)).unwrap()
        });
    }
    sim.run_for(500);
    for i in 1..=5 {
        let snap = sim.nodes[&NodeId(i)].gossip.snapshot("net");
        assert_eq!(snap.len(), 5, "node {i} sees {snap:?}");
    }
    sim.crash(NodeId(3));
    // Through suspicion to death, the count of alive members agrees with
    // the listing.
    let mut suspected = false;
    for _ in 0..40 {
        sim.run_for(100);
        for i in [1, 2, 4, 5] {
            let g = &sim.nodes[&NodeId(i)].gossip;
            let listed = g.members();
            suspected |= listed.iter().any(|m| m.state == MemberState::Suspect);
            let alive = listed.iter().filter(|m| m.state == MemberState::Alive);
            assert_eq!(g.alive_count(), alive.count(), "node {i}");
        }
    }
    assert!(suspected, "node 3 was suspected on the way");
    for i in [1, 2, 4, 5] {
        let g = &sim.nodes[&NodeId(i)].gossip;
        let keys: Vec<String> = g.snapshot("net").into_iter().map(|(k, _)| k.key).collect();
        assert_eq!(keys, vec!["1", "2", "4", "5"], "node {i}");
        let m = g
            .members()
            .into_iter()
            .find(|m| m.node_id == NodeId(3))
            .unwrap();
        assert_eq!(m.state, MemberState::Dead);
    }
}

#[test]
fn a_restarted_owner_replaces_its_old_state() {
    let mut sim = cluster_on_net(4);
    sim.with_node(NodeId(4), |g, now| {
        g.put(now, "net", "vteps", "old", vtep(4)).unwrap()
    });
    sim.run_for(500);
    restart_on_net(&mut sim, 4);
    sim.run_for(200);
    sim.with_node(NodeId(4), |g, now| {
        g.put(now, "net", "vteps", "new", vtep(4)).unwrap()
    });
    sim.run_for(5_000);
    for i in 1..=4 {
        let keys = keys_in(&sim, i, "net");
        assert_eq!(keys, BTreeSet::from(["new".to_owned()]), "node {i}");
    }
}

#[test]
fn entries_stay_inside_their_network() {
    let mut sim = cluster(3);
    sim.with_node(NodeId(1), |g, now| g.join_network(now, "a"));
    sim.with_node(NodeId(2), |g, now| g.join_network(now, "a"));
    sim.with_node(NodeId(3), |g, now| g.join_network(now, "b"));
    sim.run_for(500);
    sim.with_node(NodeId(1), |g, now| {
        g.put(now, "a", "vteps", "1", vtep(1)).unwrap()
    });
    sim.run_for(3_000);
    assert_eq!(sim.nodes[&NodeId(2)].gossip.snapshot("a").len(), 1);
    assert!(sim.nodes[&NodeId(3)].gossip.snapshot("a").is_empty());
    assert!(
        sim.nodes[&NodeId(3)]
            .gossip
            .tables()
            .all()
            .all(|(k, _)| k.network != "a"),
        "a non-member stores nothing of the network"
    );
}

#[test]
fn entries_from_a_non_member_of_the_network_are_rejected() {
    use shoal_gossip::Rejected;
    use shoal_gossip::message::{Message, TableMessage};
    use shoal_gossip::table::Entry;

    let mut g = lone_node();
    g.join_network(1, "a");
    let forged = Message::Table {
        sender: None,
        body: TableMessage::Entries {
            network: "a".into(),
            entries: vec![(
                shoal_gossip::core::entry_key("a", "vteps", "x").into(),
                Entry {
                    owner: NodeId(3),
                    version: 5,
                    value: Some(vtep(3)),
                    sig: vec![],
                }
                .into(),
            )],
        },
        certs: vec![],
    };
    let bytes = shoal_mesh::codec::encode(&forged).unwrap();
    let err = g.handle_message(2, NodeId(3), &bytes).unwrap_err();
    assert!(matches!(err, Rejected::NotInNetwork { .. }), "{err}");
    assert!(g.tables().all().all(|(k, _)| k.network != "a"));
    // A node the store removed is not heard at all.
    g.set_allowed([NodeId(1), NodeId(2)].into());
    assert!(matches!(
        g.handle_message(3, NodeId(3), &bytes),
        Err(Rejected::NotAllowed(_))
    ));
}

#[test]
fn entries_forged_for_another_owner_or_the_far_future_are_ignored_by_every_node() {
    use shoal_gossip::keys::test_signature;
    use shoal_gossip::message::{Message, TableMessage};
    use shoal_gossip::table::{Entry, signed_bytes};

    let mut sim = cluster_on_net(3);
    sim.with_node(NodeId(2), |g, now| {
        g.put(now, "net", "vteps", "2", vtep(2)).unwrap()
    });
    sim.run_for(500);
    // Node 3 (a member of the network) forges: node 2's entry deleted at a
    // higher version, a new entry in node 2's name (both signed by itself,
    // node 2's certificate attached), and one of its own at the end of time.
    let key = |k: &str| shoal_gossip::core::entry_key("net", "vteps", k);
    let forge = |k: &str, owner: u64, version: u64, value: Option<TableValue>| {
        let sig = test_signature(
            NodeId(3),
            &signed_bytes(&key(k), NodeId(owner), version, &value),
        );
        (
            key(k).into(),
            Entry {
                owner: NodeId(owner),
                version,
                value,
                sig,
            }
            .into(),
        )
    };
    let now = sim.with_node(NodeId(1), |_, now| now).unwrap();
    let entries = vec![
        forge("2", 2, (now + 1_000) << 16, None),
        forge("evil", 2, (now + 1_000) << 16, Some(vtep(9))),
        forge("3", 3, u64::MAX, Some(vtep(9))),
    ];
    let msg = Message::Table {
        sender: None,
        body: TableMessage::Entries {
            network: "net".into(),
            entries,
        },
        certs: vec![(NodeId(2), 2u64.to_le_bytes().to_vec().into())],
    };
    let bytes = shoal_mesh::codec::encode(&msg).unwrap();
    sim.with_node(NodeId(1), |g, now| {
        g.handle_message(now, NodeId(3), &bytes).unwrap()
    });
    sim.run_for(3_000);
    for i in 1..=3 {
        let g = &sim.nodes[&NodeId(i)].gossip;
        let snap = g.snapshot("net");
        assert_eq!(snap, vec![(key("2"), vtep(2))], "node {i}");
    }
    let rejected = &sim.nodes[&NodeId(1)].gossip.rejected;
    assert_eq!(rejected.get("bad_signature"), Some(&2), "{rejected:?}");
    assert_eq!(rejected.get("version_ahead"), Some(&1), "{rejected:?}");
}

#[test]
fn a_node_that_leaves_is_marked_left_and_its_entries_go() {
    let mut sim = cluster(4);
    for i in 1..=4 {
        sim.with_node(NodeId(i), |g, now| g.join_network(now, "net"));
    }
    sim.run_for(500);
    sim.with_node(NodeId(4), |g, now| {
        g.put(now, "net", "vteps", "4", vtep(4)).unwrap()
    });
    sim.run_for(500);
    assert_eq!(sim.nodes[&NodeId(1)].gossip.snapshot("net").len(), 1);
    sim.with_node(NodeId(4), |g, now| g.leave_cluster(now));
    sim.run_for(200);
    sim.crash(NodeId(4));
    sim.run_for(3_000);
    for i in 1..=3 {
        let g = &sim.nodes[&NodeId(i)].gossip;
        assert!(g.snapshot("net").is_empty(), "node {i}");
        let m = g
            .members()
            .into_iter()
            .find(|m| m.node_id == NodeId(4))
            .unwrap();
        assert_eq!(m.state, MemberState::Left, "node {i}");
    }
}

#[test]
fn a_swim_packet_speaks_for_its_sender_only() {
    use foca::{Codec, Header, PostcardCodec};
    use shoal_gossip::Rejected;
    use shoal_gossip::message::Message;

    let mut g = lone_node();
    let packet = |src: u64| {
        let header = Header {
            src: peer(src),
            src_incarnation: 0,
            dst: peer(1),
            message: foca::Message::Ping(1),
        };
        let mut data = Vec::new();
        PostcardCodec.encode_header(&header, &mut data).unwrap();
        data.push(0); // no signature
        shoal_mesh::codec::encode(&Message::Swim(data)).unwrap()
    };
    // Node 2 sending a ping in node 3's name.
    let err = g.handle_message(2, NodeId(2), &packet(3)).unwrap_err();
    assert!(matches!(err, Rejected::ForgedSender(_)), "{err}");
    assert!(g.handle_message(3, NodeId(2), &packet(2)).is_ok());
}

#[test]
fn a_rekeyed_node_writes_its_entries_again_and_every_node_follows() {
    let mut sim = cluster_on_net(3);
    sim.with_node(NodeId(2), |g, now| {
        g.put(now, "net", "vteps", "2", vtep(2)).unwrap()
    });
    sim.run_for(500);
    let key = shoal_gossip::core::entry_key("net", "vteps", "2");
    let version = |sim: &mut Sim, i: u64| {
        sim.with_node(NodeId(i), |g, _| g.tables().get(&key).map(|e| e.version))
            .flatten()
    };
    let before = version(&mut sim, 1).unwrap();
    sim.with_node(NodeId(2), |g, now| g.rekey(now));
    sim.run_for(500);
    for i in 1..=3 {
        assert!(version(&mut sim, i).unwrap() > before, "node {i}");
        let snap = sim.nodes[&NodeId(i)].gossip.snapshot("net");
        assert_eq!(snap, vec![(key.clone(), vtep(2))], "node {i}");
    }
}

/// A SWIM packet from node `src` (signed as node `src`, as its header must
/// be) carrying `updates`, each with the signature given.
fn swim_packet(
    src: &shoal_gossip::Peer,
    dst: &shoal_gossip::Peer,
    updates: &[(foca::Member<shoal_gossip::Peer>, Vec<u8>)],
) -> Vec<u8> {
    use foca::{Codec, Header, PostcardCodec};
    use shoal_gossip::message::Message;
    use shoal_gossip::swim::{SignedCodec, SwimTrust};
    let trust = SwimTrust::new(src.id, Box::new(shoal_gossip::TestKeys(src.id)));
    let mut codec = SignedCodec(std::sync::Arc::new(std::sync::Mutex::new(trust)));
    let header = Header {
        src: src.clone(),
        src_incarnation: 0,
        dst: dst.clone(),
        message: foca::Message::Gossip,
    };
    let mut data = Vec::new();
    codec.encode_header(&header, &mut data).unwrap();
    data.extend_from_slice(&(updates.len() as u16).to_be_bytes());
    for (m, sig) in updates {
        PostcardCodec.encode_member(m, &mut data).unwrap();
        data.push(sig.len() as u8);
        data.extend_from_slice(sig);
    }
    shoal_mesh::codec::encode(&Message::Swim(data)).unwrap()
}

#[test]
fn a_member_cannot_keep_a_dead_node_alive_or_take_its_identity() {
    use foca::{Member, State};
    let mut sim = cluster(4);
    let me = |sim: &Sim, n| sim.nodes[&NodeId(n)].gossip.me().clone();
    let (one, two, four) = (me(&sim, 1), me(&sim, 2), me(&sim, 4));
    sim.crash(NodeId(4));
    // Node 2 keeps telling node 1 that node 4 is alive, at ever higher
    // incarnations and under a newer identity, signed by itself or not.
    let newer = shoal_gossip::Peer {
        generation: u64::MAX,
        ..four.clone()
    };
    for round in 1..=30u16 {
        let own_sig = |p: &shoal_gossip::Peer, i| {
            shoal_gossip::keys::test_signature(NodeId(2), &shoal_gossip::swim::claim_bytes(p, i))
        };
        let lies = swim_packet(
            &two,
            &one,
            &[
                (
                    Member::new(peer(4), round, State::Alive),
                    own_sig(&peer(4), round),
                ),
                (Member::new(peer(4), round, State::Alive), Vec::new()),
                (
                    Member::new(newer.clone(), round, State::Alive),
                    own_sig(&newer, round),
                ),
            ],
        );
        sim.with_node(NodeId(1), |g, now| g.handle_message(now, NodeId(2), &lies))
            .unwrap()
            .unwrap();
        sim.run_for(100);
    }
    let g = &sim.nodes[&NodeId(1)].gossip;
    let seen = g
        .members()
        .into_iter()
        .find(|m| m.node_id == NodeId(4))
        .unwrap();
    assert_eq!(seen.state, MemberState::Dead, "{seen:?}");
    assert_eq!(seen.generation, four.generation);
    assert!(g.rejected["swim_unsigned_alive"] >= 90, "{:?}", g.rejected);
}

/// A member gossip learned of before the store listed it (its news was
/// dropped then) is up once the store lists it: SWIM would not say again.
#[test]
fn a_member_learned_before_the_store_listed_it_is_up_once_it_does() {
    let mut sim = Sim::new(7, GossipConfig::default(), 1_000_000);
    sim.start(NodeId(1), &[]);
    sim.start(NodeId(2), &[NodeId(1)]);
    sim.run_for(2_000);
    // Node 1's store knows nodes 1 and 2 only; node 3 joins through node 2.
    sim.with_node(NodeId(1), |g, _| {
        g.set_allowed([NodeId(1), NodeId(2)].into())
    });
    sim.start(NodeId(3), &[NodeId(2)]);
    sim.run_for(3_000);
    let state_of_3 = |sim: &mut Sim| {
        sim.with_node(NodeId(1), |g, _| {
            g.members()
                .into_iter()
                .find(|m| m.node_id == NodeId(3))
                .map(|m| m.state)
        })
        .flatten()
    };
    assert_ne!(state_of_3(&mut sim), Some(MemberState::Alive));
    // The store lists it now: alive at once, and said so.
    let said = sim
        .with_node(NodeId(1), |g, _| {
            g.set_allowed([NodeId(1), NodeId(2), NodeId(3)].into());
            std::iter::from_fn(|| g.poll_event()).any(|e| {
                matches!(e, shoal_gossip::Event::Member { node, state: MemberState::Alive } if node == NodeId(3))
            })
        })
        .unwrap();
    assert!(said);
    assert_eq!(state_of_3(&mut sim), Some(MemberState::Alive));
}

#[test]
fn a_write_in_a_large_network_spreads_with_a_few_sends_per_node() {
    let n = 80;
    let mut sim = cluster_on_net(n);
    let others = n as usize - 1;
    let fanout = shoal_gossip::core::TREE_FANOUT;
    assert!(others > shoal_gossip::core::DIRECT_PUSH_MAX);
    // Every node knows every member. (At 80 nodes this takes SWIM well
    // over 8 s of simulated time: claims about members whose certificates
    // a node does not hold yet wait, and the last ones come from periodic
    // announcements and probes.)
    sim.run_for(30_000);
    for i in 1..=n {
        assert_eq!(sim.nodes[&NodeId(i)].gossip.members().len(), n as usize);
    }
    let sent = |sim: &Sim| sim.messages_sent.get(&NodeId(1)).copied().unwrap_or(0);
    let before = sent(&sim);
    sim.with_node(NodeId(1), |g, now| {
        g.put(now, "net", "vteps", "1", vtep(1)).unwrap()
    });
    // The owner sends it to a few members, not to the 79 others.
    assert_eq!(sent(&sim) - before, fanout as u64);
    // Those send it on: every member has it well before anti-entropy's
    // first round (1 s), in simulated time.
    sim.run_for(150);
    for i in 1..=n {
        let snap = sim.nodes[&NodeId(i)].gossip.snapshot("net");
        assert_eq!(snap.len(), 1, "node {i} lacks the entry");
    }
    // Along the owner's tree: the 79 others got one message each, no
    // node sent more than the fan-out.
    let counts = |sim: &Sim| -> Vec<u64> {
        (1..=n)
            .map(|i| sim.messages_sent.get(&NodeId(i)).copied().unwrap_or(0))
            .collect()
    };
    let before = counts(&sim);
    sim.with_node(NodeId(5), |g, now| {
        g.put(now, "net", "vteps", "5", vtep(5)).unwrap()
    });
    sim.run_for(30);
    let sends: Vec<u64> = counts(&sim)
        .iter()
        .zip(&before)
        .map(|(after, before)| after - before)
        .collect();
    assert_eq!(sends.iter().sum::<u64>(), others as u64, "{sends:?}");
    assert!(sends.iter().all(|s| *s <= fanout as u64), "{sends:?}");
}

#[test]
fn a_broadcast_tree_reaches_every_member_once_with_bounded_fan_out() {
    use shoal_gossip::core::tree_children;
    let members: Vec<NodeId> = (1..=500).map(NodeId).collect();
    for owner in [NodeId(1), NodeId(250), NodeId(500)] {
        let mut got = std::collections::BTreeMap::new();
        let mut depth = std::collections::BTreeMap::from([(owner, 0)]);
        let mut todo = vec![owner];
        while let Some(at) = todo.pop() {
            let children = tree_children(owner, at, &members, 6).unwrap();
            assert!(children.len() <= 6);
            for c in children {
                *got.entry(c).or_insert(0) += 1;
                depth.insert(c, depth[&at] + 1);
                todo.push(c);
            }
        }
        assert_eq!(got.len(), 499, "every other member");
        assert!(got.values().all(|n| *n == 1), "once each");
        assert!(!got.contains_key(&owner));
        // log_6(500) ≈ 3.5: four hops at most.
        assert!(
            depth.values().all(|d| *d <= 4),
            "{:?}",
            depth.values().max()
        );
    }
    // Different owners, different trees: the owner's first children differ.
    let a = tree_children(NodeId(1), NodeId(1), &members, 6).unwrap();
    let b = tree_children(NodeId(2), NodeId(2), &members, 6).unwrap();
    assert_ne!(a, b);
    // Not a member (or the owner unknown): no tree.
    assert_eq!(tree_children(NodeId(1), NodeId(900), &members, 6), None);
    assert_eq!(tree_children(NodeId(900), NodeId(1), &members, 6), None);
}

#[test]
fn push_fanout_and_swim_retransmissions_grow_with_the_log_of_the_swarm() {
    use shoal_gossip::core::{max_transmissions, push_fanout};
    let cases = [
        (2, 2, 9),
        (33, 7, 11),
        (99, 8, 12),
        (999, 10, 14),
        (4_999, 12, 16),
    ];
    for (n, fanout, retransmissions) in cases {
        assert_eq!(push_fanout(n), fanout, "{n}");
        assert_eq!(max_transmissions(n as u32 + 1), retransmissions, "{n}");
    }
}

#[test]
fn a_node_the_directory_lists_is_learned_without_waiting_for_swim() {
    let mut sim = Sim::new(11, GossipConfig::default(), 1_000_000);
    sim.start(NodeId(1), &[]);
    // Node 2 knows node 1; node 1 has not heard of node 3, which knows
    // nobody.
    sim.start(NodeId(2), &[NodeId(1)]);
    sim.start(NodeId(3), &[]);
    sim.run_for(3_000);
    let knows = |sim: &Sim, a: u64, b: u64| member_state(sim, a, b) == Some(MemberState::Alive);
    assert!(!knows(&sim, 1, 3));
    let three = sim.nodes[&NodeId(3)].gossip.me().clone();
    let two = sim.nodes[&NodeId(2)].gossip.me().clone();
    let announced = sim
        .with_node(NodeId(1), |g, now| {
            g.directory(now, [two.clone(), three.clone()])
        })
        .unwrap();
    // Node 2 is known already: only node 3 is announced to.
    assert_eq!(announced, 1);
    sim.run_for(2_000);
    assert!(knows(&sim, 1, 3) && knows(&sim, 3, 1));
    // A listed node that never answers is announced to again only after
    // the retry time.
    let mut nine = three.clone();
    nine.id = NodeId(9);
    nine.addr = "sim:9".into();
    let tries = |sim: &mut Sim| {
        sim.with_node(NodeId(1), |g, now| {
            g.directory(now, [three.clone(), nine.clone()])
        })
        .unwrap()
    };
    assert_eq!(tries(&mut sim), 1);
    sim.run_for(1_000);
    assert_eq!(tries(&mut sim), 0);
    sim.run_for(shoal_gossip::core::DIRECTORY_RETRY_MS);
    assert_eq!(tries(&mut sim), 1);
}

#[test]
fn every_live_member_learns_each_death_within_seconds_at_five_percent_loss() {
    let n = 100;
    let mut sim = cluster(n);
    // The daemon gives the core the store's nodes, which size SWIM.
    let all: BTreeSet<NodeId> = (1..=n).map(NodeId).collect();
    for i in 1..=n {
        sim.with_node(NodeId(i), |g, _| g.set_allowed(all.clone()));
    }
    sim.run_for(5_000);
    sim.datagram_loss = 0.05;
    for c in 0..30 {
        let victim = NodeId(4 + c * 3);
        let took = sim.crash_and_detect(victim, 20_000);
        // A member that missed every copy of the death would learn it only
        // by probing the dead node itself (every n probe periods: 40 s).
        assert!(
            took.is_some_and(|ms| ms <= 5_000),
            "crash {c} ({victim}): dead everywhere after {took:?} ms"
        );
    }
}

#[test]
fn a_certificate_crosses_to_each_peer_once_and_again_after_it_restarts() {
    let mut sim = cluster_on_net(3);
    let sent = |sim: &Sim| sim.bytes_sent.get(&NodeId(1)).copied().unwrap_or(0);
    let put = |sim: &mut Sim, key: &str| {
        sim.with_node(NodeId(1), |g, now| {
            g.put(now, "net", "vteps", key, vtep(1)).unwrap()
        });
    };
    // Node 1's first write went out with its certificate (423 bytes)
    // while the cluster formed; a write now costs less than one.
    put(&mut sim, "a");
    let before = sent(&sim);
    put(&mut sim, "b");
    let one_write = sent(&sim) - before;
    assert!(one_write < 2 * 423, "two messages of {one_write} bytes");
    sim.run_for(500);
    // Node 2 restarts: it has no certificates; node 1 sends its own again,
    // and node 2 takes node 1's entries.
    restart_on_net(&mut sim, 2);
    sim.run_for(3_000);
    put(&mut sim, "c");
    sim.run_for(500);
    assert_eq!(
        keys_in(&sim, 2, "net"),
        BTreeSet::from(["a".to_owned(), "b".to_owned(), "c".to_owned()])
    );
    assert_eq!(
        sim.nodes[&NodeId(2)].gossip.rejected.get("no_certificate"),
        None,
        "{:?}",
        sim.nodes[&NodeId(2)].gossip.rejected
    );
}

#[test]
fn anti_entropy_takes_a_few_networks_a_round_and_reaches_them_all() {
    use shoal_gossip::core::{SYNC_NETWORKS_PER_ROUND, sync_round};
    let nets = |n: usize| -> BTreeSet<String> { (0..n).map(|i| format!("net{i:02}")).collect() };
    let (round, next) = sync_round(&nets(3), 7);
    assert_eq!(
        (round.len(), next),
        (3, 0),
        "a few networks: all, every round"
    );
    // Ten networks: four a round, each within three rounds.
    let mut seen = BTreeSet::new();
    let mut cursor = 0;
    for _ in 0..3 {
        let (round, next) = sync_round(&nets(10), cursor);
        assert_eq!(round.len(), SYNC_NETWORKS_PER_ROUND);
        seen.extend(round);
        cursor = next;
    }
    assert_eq!(seen, nets(10));

    // Writes lost in a short partition reach the other nodes on all twelve
    // networks by anti-entropy alone.
    let mut sim = cluster(3);
    for i in 1..=3 {
        sim.with_node(NodeId(i), |g, now| {
            for net in nets(12) {
                g.join_network(now, &net);
            }
        });
    }
    sim.run_for(2_000);
    sim.partition(vec![
        BTreeSet::from([NodeId(1)]),
        BTreeSet::from([NodeId(2), NodeId(3)]),
    ]);
    sim.with_node(NodeId(1), |g, now| {
        for net in nets(12) {
            g.put(now, &net, "vteps", "k", vtep(1)).unwrap();
        }
    });
    sim.run_for(200);
    sim.heal();
    sim.run_for(8_000);
    for i in [2, 3] {
        for net in nets(12) {
            assert_eq!(
                keys_in(&sim, i, &net),
                BTreeSet::from(["k".to_owned()]),
                "node {i}, {net}"
            );
        }
    }
}

#[test]
fn dead_members_and_their_entries_are_forgotten_in_order_of_death_after_the_ttl() {
    let config = GossipConfig {
        dead_owner_ttl_ms: 20_000,
        ..GossipConfig::default()
    };
    let mut sim = Sim::new(7, config, 1_000_000);
    sim.start(NodeId(1), &[]);
    for i in 2..=5 {
        sim.start(NodeId(i), &[NodeId(1)]);
    }
    sim.run_for(3_000);
    for i in 1..=5 {
        sim.with_node(NodeId(i), |g, now| {
            g.join_network(now, "net");
            g.put(now, "net", "vteps", &i.to_string(), vtep(i)).unwrap();
        });
    }
    sim.run_for(1_000);
    let knows = |sim: &Sim, i: u64, m: u64| member_state(sim, i, m).is_some();
    let holds = |sim: &Sim, i: u64, owner: u64| {
        sim.nodes[&NodeId(i)]
            .gossip
            .tables()
            .all()
            .any(|(_, e)| e.owner == NodeId(owner))
    };
    // Node 4 dies about 2 s after this, node 5 about 12 s after.
    sim.crash(NodeId(4));
    sim.run_for(10_000);
    sim.crash(NodeId(5));
    sim.run_for(4_000);
    for i in 1..=3 {
        assert!(
            knows(&sim, i, 4) && holds(&sim, i, 4),
            "node {i}: kept while it may return"
        );
        assert_eq!(keys_in(&sim, i, "net").len(), 3, "node {i}: both hidden");
    }
    // 24 s: past node 4's time to live, not node 5's.
    sim.run_for(10_000);
    for i in 1..=3 {
        assert!(
            !knows(&sim, i, 4) && !holds(&sim, i, 4),
            "node {i} forgot node 4"
        );
        assert!(
            knows(&sim, i, 5) && holds(&sim, i, 5),
            "node {i} still keeps node 5"
        );
    }
    sim.run_for(14_000);
    for i in 1..=3 {
        let g = &sim.nodes[&NodeId(i)].gossip;
        assert!(
            !knows(&sim, i, 5) && !holds(&sim, i, 5),
            "node {i} forgot node 5"
        );
        assert_eq!(g.members().len(), 3, "node {i}: itself and the two others");
        assert_eq!(g.live_count(), 2);
        assert_eq!(keys_in(&sim, i, "net").len(), 3);
    }
}

/// A swarm of 60 at 5 % loss that joins networks, writes, loses a node:
/// what every node sent, saw and holds, on `threads` threads.
fn sixty_nodes_on(threads: usize) -> (Vec<u64>, Vec<String>, Vec<String>, u64) {
    let mut sim = Sim::new(3, GossipConfig::default(), 1_000_000);
    sim.threads = threads;
    sim.record_events = true;
    sim.datagram_loss = 0.05;
    for i in 1..=60 {
        sim.start(NodeId(i), &[NodeId(1)]);
        let net = format!("net{}", i % 3);
        sim.with_node(NodeId(i), |g, now| g.join_network(now, &net));
    }
    sim.run_for(3_000);
    for i in 1..=60 {
        let net = format!("net{}", i % 3);
        sim.with_node(NodeId(i), |g, now| {
            g.put(now, &net, "vteps", &i.to_string(), vtep(i)).unwrap()
        });
    }
    sim.run_for(2_000);
    sim.crash(NodeId(17));
    sim.run_for(5_000);
    let sent: Vec<u64> = sim.bytes_sent.values().copied().collect();
    let events: Vec<String> = sim.events.iter().map(|e| format!("{e:?}")).collect();
    let held: Vec<String> = sim
        .nodes
        .iter()
        .filter(|(_, n)| n.up)
        .map(|(id, n)| {
            let net = format!("net{}", id.0 % 3);
            format!(
                "{id}: {:?} {:?}",
                n.gossip.members(),
                n.gossip.snapshot(&net)
            )
        })
        .collect();
    (sent, events, held, sim.split_steps)
}

#[test]
fn a_simulation_is_the_same_on_one_thread_or_two() {
    let (sent1, events1, held1, split1) = sixty_nodes_on(1);
    let (sent2, events2, held2, split2) = sixty_nodes_on(2);
    assert_eq!(split1, 0);
    assert!(split2 > 10, "only {split2} milliseconds ran on two threads");
    // The run did something: writes spread, the crash was seen.
    assert!(events1.iter().any(|e| e.contains("Dead")), "no death seen");
    assert!(held1.iter().all(|h| h.contains("Vtep")), "{held1:?}");
    assert_eq!(sent1, sent2, "bytes sent per node differ");
    assert_eq!(events1.len(), events2.len());
    assert_eq!(events1, events2, "events differ");
    assert_eq!(held1, held2, "what the nodes hold differs");
}

#[test]
fn every_member_passes_on_as_much_as_any_other_over_the_owners_trees() {
    use shoal_gossip::core::tree_children;
    // A network of 100 with gaps in its IDs, every member an owner.
    let members: Vec<NodeId> = (1..=100).map(|i| NodeId(i * 7 + i % 3)).collect();
    let mut sends: BTreeMap<NodeId, usize> = BTreeMap::new();
    for owner in &members {
        for me in &members {
            let children = tree_children(*owner, *me, &members, 6).unwrap();
            assert!(!children.contains(owner) && !children.contains(me));
            if me != owner {
                *sends.entry(*me).or_default() += children.len();
            }
        }
    }
    // 99 deliveries a write, 6 of them by the owner: 93 passed on per
    // write, spread evenly over the 100 members.
    assert_eq!(sends.values().sum::<usize>(), 100 * 93);
    assert!(sends.values().all(|s| *s == 93), "{sends:?}");
}

#[test]
fn in_every_probe_period_each_member_is_probed_by_exactly_one_other() {
    use shoal_gossip::core::probe_target;
    let ring: Vec<NodeId> = (1..=50).map(|i| NodeId(i * 3 + i % 2)).collect();
    let mut probed_by: BTreeMap<NodeId, BTreeSet<NodeId>> = BTreeMap::new();
    for round in 1_000..1_000 + 49 {
        let mut probed: BTreeMap<NodeId, usize> = BTreeMap::new();
        for me in &ring {
            let t = probe_target(&ring, *me, round).unwrap();
            assert_ne!(t, *me);
            *probed.entry(t).or_default() += 1;
            probed_by.entry(*me).or_default().insert(t);
        }
        assert_eq!(probed.len(), ring.len(), "round {round}: {probed:?}");
        assert!(probed.values().all(|c| *c == 1));
    }
    // Over n − 1 periods, each probes every other member.
    assert!(probed_by.values().all(|s| s.len() == ring.len() - 1));
    // Alone, or not in the ring: no target.
    assert_eq!(probe_target(&ring[..1], ring[0], 7), None);
    assert_eq!(probe_target(&ring, NodeId(1), 7), None);
}

#[test]
fn a_global_probe_to_a_member_sharing_no_network_carries_no_entry_or_certificate() {
    use shoal_gossip::message::{Message, TableMessage};
    let mut sim = cluster(4);
    for (i, net) in [(1, "a"), (2, "a"), (3, "b"), (4, "b")] {
        sim.with_node(NodeId(i), |g, now| g.join_network(now, net));
    }
    sim.run_for(5_000);
    sim.tap = Some((NodeId(1), NodeId(3)));
    sim.run_for(30_000);
    let (mut probes, mut with_entries) = (0, 0);
    for bytes in &sim.tapped {
        let Ok(Message::Table {
            sender,
            body,
            certs,
        }) = shoal_mesh::codec::decode::<Message>(bytes, 1 << 20)
        else {
            continue;
        };
        match body {
            TableMessage::Root { .. } | TableMessage::Digest { .. } => {
                probes += 1;
                assert!(sender.is_none() && certs.is_empty(), "{sender:?} {certs:?}");
            }
            _ => with_entries += 1,
        }
    }
    // Node 1 syncs the global scope with a random member each second:
    // about 10 of 30 with node 3, and nothing else to send it.
    assert!(
        probes >= 3,
        "{probes} probes in {} messages",
        sim.tapped.len()
    );
    assert_eq!(with_entries, 0);
}

/// Node `i`'s networks among `count`: consecutive nodes share them.
fn nets_of(i: u64, count: u64) -> Vec<String> {
    let mut nets: Vec<String> = (0..2).map(|k| format!("net{}", (i + k) % count)).collect();
    nets.dedup();
    nets
}

/// What node `i` holds: its members and their states, and the keys of
/// every entry (global and in its networks).
fn holdings(sim: &Sim, i: u64) -> (Vec<(NodeId, MemberState)>, BTreeSet<String>) {
    let g = &sim.nodes[&NodeId(i)].gossip;
    let members = g.members().iter().map(|m| (m.node_id, m.state)).collect();
    let keys = g
        .tables()
        .all()
        .map(|(k, _)| format!("{}/{}/{}", k.network, k.table, k.key))
        .collect();
    (members, keys)
}

/// A swarm started formed ([`Sim::start_formed`], how the scale bench
/// starts 5 000 nodes) holds what one formed by joining holds once it has
/// settled, has nothing left for SWIM to pass on, and then behaves alike:
/// writes reach every member of their network, a crash is seen by all.
#[test]
fn a_swarm_started_formed_holds_what_one_formed_by_joining_holds() {
    let n = 40;
    let count = 4;
    let mut joined = Sim::new(5, GossipConfig::default(), 1_000_000);
    for i in 1..=n {
        joined.start(NodeId(i), &[NodeId(1), NodeId(2)]);
        joined.with_node(NodeId(i), |g, now| {
            for net in nets_of(i, count) {
                g.join_network(now, &net);
            }
        });
        joined.run_for(50);
    }
    joined.run_for(30_000);
    let mut formed = Sim::new(5, GossipConfig::default(), 1_000_000);
    // Four nodes a millisecond, two on each thread.
    formed.threads = 2;
    let nodes: Vec<(NodeId, Vec<String>)> =
        (1..=n).map(|i| (NodeId(i), nets_of(i, count))).collect();
    assert_eq!(formed.start_formed(&nodes, 10), 0, "nothing refused");
    for (_, x) in formed.nodes.iter() {
        assert_eq!(x.gossip.swim_backlog(), 0, "nothing for SWIM to pass on");
        assert_eq!(x.gossip.alive_count(), n as usize);
    }
    formed.run_for(2_000);
    for sim in [&mut joined, &mut formed] {
        for i in 1..=n {
            sim.with_node(NodeId(i), |g, now| {
                for net in nets_of(i, count) {
                    g.put(now, &net, "vteps", &i.to_string(), vtep(i)).unwrap();
                }
            });
        }
        sim.datagram_loss = 0.05;
        sim.run_for(3_000);
    }
    for i in 1..=n {
        let (members, keys) = holdings(&formed, i);
        assert_eq!(
            (&members, &keys),
            (&holdings(&joined, i).0, &holdings(&joined, i).1),
            "node {i}"
        );
        assert_eq!(members.len(), n as usize);
        assert!(
            members.iter().all(|(_, s)| *s == MemberState::Alive),
            "node {i}: {members:?}"
        );
        // Its networks' members' entries and every node's `networks` entry.
        for net in nets_of(i, count) {
            let writers = (1..=n)
                .filter(|w| nets_of(*w, count).contains(&net))
                .count();
            assert_eq!(keys_in(&formed, i, &net).len(), writers, "node {i}, {net}");
        }
    }
    formed.crash(NodeId(7));
    formed.run_for(5_000);
    for i in (1..=n).filter(|i| *i != 7) {
        assert_eq!(
            member_state(&formed, i, 7),
            Some(MemberState::Dead),
            "node {i}"
        );
    }
}
