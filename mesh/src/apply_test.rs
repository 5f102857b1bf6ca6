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

mod world {
    //! `apply` over arbitrary sequences of every kind of command, on a
    //! small world of IDs so that commands meet: whatever the log holds, no
    //! panic, replicas agree, a refusal changes nothing, and the state's
    //! invariants hold.

    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;
    use crate::network::{Driver, NetworkSpec};
    use crate::service::{
        Attachment, EndpointMode, PortSpec, Protocol, PublishMode, ServiceMode, ServiceSpec,
    };
    use crate::task::{TaskReport, TaskState};

    fn service(name: &str, nets: &[&str], replicas: u64, publish: bool) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            mode: ServiceMode::Replicated(replicas),
            networks: nets
                .iter()
                .map(|n| Attachment {
                    network: (*n).into(),
                    aliases: vec![],
                })
                .collect(),
            ports: publish
                .then_some(PortSpec {
                    mode: PublishMode::Ingress,
                    published: Some(8080),
                    target: 80,
                    protocol: Protocol::Tcp,
                })
                .into_iter()
                .collect(),
            endpoint_mode: EndpointMode::Vip,
            constraints: vec![],
            env: BTreeMap::new(),
            command: vec!["true".into()],
            labels: BTreeMap::new(),
            restart: Default::default(),
            update: Default::default(),
            container: None,
            ext: Default::default(),
        }
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        let node = || (1u64..5).prop_map(NodeId);
        let net = || prop_oneof![Just("web"), Just("db"), Just("ing")];
        let svc = || prop_oneof![Just("a"), Just("b"), Just("c")];
        let task = || (0u8..8).prop_map(|i| TaskId::from(format!("t{i}")));
        let state = prop_oneof![
            Just(TaskState::Starting),
            Just(TaskState::Running),
            Just(TaskState::Failed),
            Just(TaskState::Complete),
        ];
        prop_oneof![
            (2u64..5).prop_map(|i| Command::AddNode(crate::fixtures::node(i))),
            node().prop_map(Command::RemoveNode),
            net().prop_map(|n| Command::CreateNetwork {
                id: n.into(),
                spec: NetworkSpec::new(n, Driver::Overlay),
                created_at_ms: 0,
                avoid: vec![],
            }),
            net().prop_map(|n| Command::RemoveNetwork { id: n.into() }),
            (
                svc(),
                proptest::sample::subsequence(vec!["web", "db"], 0..=2),
                0u64..4,
                any::<bool>()
            )
                .prop_map(|(s, nets, r, p)| Command::CreateService {
                    id: s.into(),
                    spec: service(s, &nets, r, p),
                    created_at_ms: 0,
                }),
            svc().prop_map(|s| Command::RemoveService { id: s.into() }),
            (svc(), 0u64..4).prop_map(|(s, r)| Command::ScaleService {
                id: s.into(),
                replicas: r
            }),
            (
                task(),
                svc(),
                proptest::option::of(1u64..4),
                proptest::option::of(node())
            )
                .prop_map(|(id, s, slot, node)| Command::AddTask {
                    id,
                    service_id: s.into(),
                    slot,
                    node,
                    message: String::new(),
                    restarts: 0,
                    now_ms: 1,
                }),
            (task(), node()).prop_map(|(id, node)| Command::AssignTask {
                id,
                node,
                now_ms: 2
            }),
            (node(), task(), state).prop_map(|(node, id, st)| Command::ReportTask {
                node,
                report: TaskReport::new(id, st, String::new(), None, 3),
            }),
            task().prop_map(|id| Command::ShutdownTask { id, now_ms: 4 }),
            task().prop_map(|id| Command::RemoveTask { id }),
        ]
    }

    /// What must hold of any state `apply` produced.
    fn invariants(s: &ClusterState) -> Result<(), TestCaseError> {
        for (net_id, net) in &s.networks {
            let mut seen = BTreeSet::new();
            let vips = s.services.values().filter_map(|v| v.vips.get(net_id));
            let tasks = s.tasks.values().filter_map(|t| t.addresses.get(net_id));
            let nodes = s.ingress_addrs.values().filter(|_| net.ingress);
            for ip in vips.chain(tasks).chain(nodes) {
                prop_assert!(seen.insert(*ip), "{ip} twice on {net_id}");
            }
            // The index finds what a walk of the whole store finds.
            prop_assert_eq!(
                s.free_address(net),
                crate::ipam::allocate_ip(net, &crate::service::used_addresses(s, net_id))
            );
        }
        for id in s.services.keys() {
            let walked: Vec<&TaskId> = s
                .tasks
                .values()
                .filter(|t| t.service_id == *id)
                .map(|t| &t.id)
                .collect();
            let indexed: Vec<&TaskId> = s.tasks_of(id).map(|t| &t.id).collect();
            prop_assert_eq!(walked, indexed);
        }
        for n in s.nodes.keys() {
            let walked: Vec<&TaskId> = s
                .tasks
                .values()
                .filter(|t| t.node == Some(*n))
                .map(|t| &t.id)
                .collect();
            let indexed: Vec<&TaskId> = s.tasks_on(*n).map(|t| &t.id).collect();
            prop_assert_eq!(walked, indexed);
        }
        for id in s.networks.keys() {
            let walked: Vec<&TaskId> = s
                .tasks
                .values()
                .filter(|t| t.addresses.contains_key(id))
                .map(|t| &t.id)
                .collect();
            let indexed: Vec<&TaskId> = s.tasks_in(id).map(|t| &t.id).collect();
            prop_assert_eq!(walked, indexed);
        }
        for t in s.tasks.values() {
            prop_assert!(
                s.services.contains_key(&t.service_id),
                "orphan task {}",
                t.id
            );
            for n in t.addresses.keys() {
                prop_assert!(
                    s.networks.contains_key(n),
                    "task {} on a gone network",
                    t.id
                );
            }
        }
        prop_assert!(s.nodes.keys().all(|n| !s.revoked.contains(n)));
        prop_assert!(s.managers().count() >= 1);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        #[test]
        fn any_log_keeps_the_state_whole(cmds in proptest::collection::vec(arb_command(), 0..80)) {
            let mut a = crate::test_support::swarm(2);
            let mut b = a.clone();
            for cmd in &cmds {
                let before = a.clone();
                let ra = apply(&mut a, cmd);
                prop_assert_eq!(&ra, &apply(&mut b, cmd));
                prop_assert_eq!(&a, &b);
                if ra.is_err() {
                    prop_assert_eq!(&a, &before, "{:?} refused but changed the state", cmd);
                }
                // Nothing is placed on a node the store does not have, and
                // a node's report only lands on its own task.
                match (cmd, &ra) {
                    (Command::AddTask { node: Some(n), .. }, Ok(_))
                    | (Command::AssignTask { node: n, .. }, Ok(_)) => {
                        prop_assert!(a.nodes.contains_key(n), "task placed on {n}, not a member");
                    }
                    (Command::ReportTask { node, report }, Ok(_)) => {
                        prop_assert_eq!(a.tasks[&report.id].node, Some(*node));
                    }
                    _ => {}
                }
                invariants(&a)?;
            }
        }
    }
}

#[test]
fn certificate_validity_is_bounded_and_defaults_to_ninety_days() {
    use crate::state::{DEFAULT_CERT_EXPIRY_MS, MAX_CERT_EXPIRY_MS, MIN_CERT_EXPIRY_MS};
    let mut s = initialized();
    assert_eq!(s.cert_expiry_ms, DEFAULT_CERT_EXPIRY_MS);
    assert_eq!(DEFAULT_CERT_EXPIRY_MS, 90 * 86_400_000);
    for bad in [0, MIN_CERT_EXPIRY_MS - 1, MAX_CERT_EXPIRY_MS + 1] {
        let before = s.clone();
        let e = apply(&mut s, &Command::SetCertExpiry { ms: bad }).unwrap_err();
        assert!(e.to_string().starts_with("--cert-expiry"), "{e}");
        assert_eq!(s, before);
    }
    apply(&mut s, &Command::SetCertExpiry { ms: 3_600_000 }).unwrap();
    assert_eq!(s.cert_expiry_ms, 3_600_000);
}
