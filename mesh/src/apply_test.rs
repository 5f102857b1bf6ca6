use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::state::ResolveError;

fn node(id: u64, role: Role) -> Node {
    Node {
        id: NodeId(id),
        hostname: format!("host{id}"),
        role,
        availability: Availability::Active,
        labels: BTreeMap::new(),
        addr: format!("127.0.0.{id}:2377"),
        joined_at_ms: id,
    }
}

fn info() -> ClusterInfo {
    ClusterInfo {
        id: "c1".into(),
        created_at_ms: 1,
        ca_cert_der: vec![0],
        ca_fingerprint: "fp".into(),
        tokens: JoinSecrets {
            worker_hash: "w".into(),
            manager_hash: "m".into(),
            worker_sealed: vec![1],
            manager_sealed: vec![2],
        },
        sealed_ca_key: vec![3],
        default_addr_pool: vec!["10.0.0.0/8".parse().unwrap()],
        default_pool_mask: 24,
    }
}

fn initialized() -> ClusterState {
    let mut s = ClusterState::default();
    apply(
        &mut s,
        &Command::Init {
            cluster: info(),
            first: node(1, Role::Manager),
            ingress_id: "ing".into(),
        },
    )
    .unwrap();
    s
}

#[test]
fn nothing_but_init_works_before_init() {
    let mut s = ClusterState::default();
    assert_eq!(
        apply(&mut s, &Command::AddNode(node(2, Role::Worker))),
        Err(ApplyError::NotInitialized)
    );
    assert_eq!(s, ClusterState::default());
}

#[test]
fn init_twice_is_refused() {
    let mut s = initialized();
    let before = s.clone();
    let err = apply(
        &mut s,
        &Command::Init {
            cluster: info(),
            first: node(9, Role::Manager),
            ingress_id: "ing2".into(),
        },
    );
    assert_eq!(err, Err(ApplyError::AlreadyInitialized("c1".into())));
    assert_eq!(s, before);
}

#[test]
fn promote_twice_and_demote_last_manager_are_refused() {
    let mut s = initialized();
    apply(&mut s, &Command::AddNode(node(2, Role::Worker))).unwrap();
    apply(
        &mut s,
        &Command::SetRole {
            node: NodeId(2),
            role: Role::Manager,
        },
    )
    .unwrap();
    assert_eq!(
        apply(
            &mut s,
            &Command::SetRole {
                node: NodeId(2),
                role: Role::Manager
            }
        ),
        Err(ApplyError::AlreadyRole {
            node: NodeId(2),
            role: Role::Manager
        })
    );
    apply(
        &mut s,
        &Command::SetRole {
            node: NodeId(1),
            role: Role::Worker,
        },
    )
    .unwrap();
    assert_eq!(
        apply(
            &mut s,
            &Command::SetRole {
                node: NodeId(2),
                role: Role::Worker
            }
        ),
        Err(ApplyError::LastManager(NodeId(2)))
    );
    assert_eq!(
        apply(&mut s, &Command::RemoveNode(NodeId(2))),
        Err(ApplyError::LastManager(NodeId(2)))
    );
    assert_eq!(s.managers().count(), 1);
}

#[test]
fn force_new_cluster_leaves_one_manager_and_keeps_the_rest() {
    let mut s = initialized();
    apply(&mut s, &Command::AddNode(node(2, Role::Manager))).unwrap();
    apply(&mut s, &Command::AddNode(node(3, Role::Worker))).unwrap();
    apply(&mut s, &Command::ForceNewCluster { keep: NodeId(2) }).unwrap();
    let managers: Vec<NodeId> = s.managers().map(|n| n.id).collect();
    assert_eq!(managers, vec![NodeId(2)]);
    assert_eq!(s.nodes.len(), 3);
}

#[test]
fn labels_are_added_and_removed_and_missing_ones_refused() {
    let mut s = initialized();
    apply(
        &mut s,
        &Command::UpdateNode {
            node: NodeId(1),
            availability: Some(Availability::Drain),
            label_add: vec![("zone".into(), "a".into())],
            label_rm: vec![],
        },
    )
    .unwrap();
    let n = &s.nodes[&NodeId(1)];
    assert_eq!(n.availability, Availability::Drain);
    assert_eq!(n.labels.get("zone").map(String::as_str), Some("a"));
    let before = s.clone();
    assert_eq!(
        apply(
            &mut s,
            &Command::UpdateNode {
                node: NodeId(1),
                availability: Some(Availability::Active),
                label_add: vec![],
                label_rm: vec!["nope".into()],
            },
        ),
        Err(ApplyError::NoSuchLabel {
            node: NodeId(1),
            key: "nope".into()
        })
    );
    assert_eq!(
        s, before,
        "a refused update changes nothing, not even availability"
    );
}

#[test]
fn token_rotation_replaces_only_that_role() {
    let mut s = initialized();
    apply(
        &mut s,
        &Command::RotateToken {
            role: Role::Worker,
            hash: "w2".into(),
            sealed: vec![9],
        },
    )
    .unwrap();
    let t = &s.cluster.as_ref().unwrap().tokens;
    assert_eq!(t.role_for_hash("w2"), Some(Role::Worker));
    assert_eq!(t.role_for_hash("w"), None);
    assert_eq!(t.role_for_hash("m"), Some(Role::Manager));
}

#[test]
fn nodes_resolve_by_id_prefix_and_hostname() {
    let mut s = initialized();
    apply(&mut s, &Command::AddNode(node(0x10, Role::Worker))).unwrap();
    apply(&mut s, &Command::AddNode(node(0x11, Role::Worker))).unwrap();
    assert_eq!(s.resolve_node("host16").unwrap().id, NodeId(0x10));
    assert_eq!(s.resolve_node("0000000000000011").unwrap().id, NodeId(0x11));
    assert_eq!(s.resolve_node("0000000000000001").unwrap().id, NodeId(1));
    assert!(matches!(
        s.resolve_node("00000000000000"),
        Err(ResolveError::Ambiguous { .. })
    ));
    assert!(matches!(
        s.resolve_node("nohost"),
        Err(ResolveError::NotFound(_))
    ));
}

fn arb_command() -> impl Strategy<Value = Command> {
    let id = (1u64..6).prop_map(NodeId);
    let role = prop_oneof![Just(Role::Manager), Just(Role::Worker)];
    prop_oneof![
        (1u64..6, role.clone()).prop_map(|(i, r)| Command::AddNode(node(i, r))),
        (id.clone(), role).prop_map(|(node, role)| Command::SetRole { node, role }),
        id.clone().prop_map(Command::RemoveNode),
        (id, any::<bool>(), any::<bool>()).prop_map(|(node, add, rm)| Command::UpdateNode {
            node,
            availability: None,
            label_add: if add {
                vec![("k".into(), "v".into())]
            } else {
                vec![]
            },
            label_rm: if rm { vec!["k".into()] } else { vec![] },
        }),
    ]
}

proptest! {
    /// Every replica that applies the same log reaches the same state; a
    /// refused command changes nothing; the swarm never loses its last manager.
    #[test]
    fn apply_is_deterministic_and_keeps_a_manager(cmds in proptest::collection::vec(arb_command(), 0..60)) {
        let mut a = initialized();
        let mut b = initialized();
        for cmd in &cmds {
            let before = a.clone();
            let ra = apply(&mut a, cmd);
            let rb = apply(&mut b, cmd);
            prop_assert_eq!(&ra, &rb);
            prop_assert_eq!(&a, &b);
            if ra.is_err() {
                prop_assert_eq!(&a, &before);
            }
            prop_assert!(a.managers().count() >= 1);
        }
    }
}
