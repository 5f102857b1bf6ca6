use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;
use crate::apply::{Command, apply};
use crate::ipam::allocate_ip;
use crate::network::{Driver, NetworkSpec, SubnetSpec, allocate};

fn net(subnet: &str, ip_range: Option<&str>, aux: &[Ipv4Addr]) -> Network {
    let mut spec = NetworkSpec::new("n", Driver::Overlay);
    spec.subnets = vec![SubnetSpec {
        subnet: subnet.parse().unwrap(),
        gateway: None,
    }];
    spec.ip_range = ip_range.map(|r| r.parse().unwrap());
    spec.aux_addresses = aux
        .iter()
        .enumerate()
        .map(|(i, ip)| (format!("a{i}"), *ip))
        .collect();
    allocate("id", &spec, &BTreeMap::new(), &[], 24, &[], 0).unwrap()
}

#[test]
fn runs_merge_and_split() {
    let ip = |d: u8| Ipv4Addr::new(10, 0, 0, d);
    let mut r = Runs::default();
    for d in [3, 1, 2, 5] {
        r.insert(ip(d));
    }
    assert_eq!(
        r.runs,
        BTreeMap::from([
            (u32::from(ip(1)), u32::from(ip(3))),
            (u32::from(ip(5)), u32::from(ip(5)))
        ])
    );
    r.insert(ip(4));
    assert_eq!(
        r.runs,
        BTreeMap::from([(u32::from(ip(1)), u32::from(ip(5)))])
    );
    // A second holder of 3: removing one keeps 3 in use.
    r.insert(ip(3));
    r.remove(ip(3));
    assert_eq!(r.runs.len(), 1);
    r.remove(ip(3));
    assert_eq!(
        r.runs,
        BTreeMap::from([
            (u32::from(ip(1)), u32::from(ip(2))),
            (u32::from(ip(4)), u32::from(ip(5)))
        ])
    );
    // The ends of the address space.
    r.insert(Ipv4Addr::new(255, 255, 255, 255));
    r.insert(Ipv4Addr::new(0, 0, 0, 0));
    r.remove(Ipv4Addr::new(255, 255, 255, 255));
    r.remove(Ipv4Addr::new(0, 0, 0, 0));
    assert_eq!(r.runs.len(), 2);
}

#[test]
fn a_service_s_tasks_and_the_addresses_follow_every_change() {
    let mut s = crate::test_support::swarm(3);
    let web = s.networks["web"].clone();
    let first = s.free_address(&web).unwrap();
    let spec = crate::test_support::service("api", vec![]);
    apply(
        &mut s,
        &Command::CreateService {
            id: "api".into(),
            spec,
            created_at_ms: 0,
        },
    )
    .unwrap();
    assert_eq!(s.services["api"].vips["web"], first);
    for i in 0..3 {
        apply(
            &mut s,
            &Command::AddTask {
                id: format!("t{i}").into(),
                service_id: "api".into(),
                slot: Some(i),
                node: None,
                message: String::new(),
                restarts: 0,
                now_ms: 0,
            },
        )
        .unwrap();
    }
    let ids = |s: &ClusterState| -> Vec<String> {
        s.tasks_of(&"api".into())
            .map(|t| t.id.to_string())
            .collect()
    };
    assert_eq!(ids(&s), ["t0", "t1", "t2"]);
    let t1 = s.tasks["t1"].addresses["web"];
    apply(&mut s, &Command::RemoveTask { id: "t1".into() }).unwrap();
    assert_eq!(ids(&s), ["t0", "t2"]);
    // The freed address is the lowest free again, as a state decoded
    // without its index finds too.
    assert_eq!(s.free_address(&web), Ok(t1));
    let decoded: ClusterState =
        crate::codec::decode(&crate::codec::encode(&s).unwrap(), 1 << 20).unwrap();
    assert!(decoded.index.0.get().is_none());
    assert_eq!(decoded.free_address(&web), Ok(t1));
    apply(&mut s, &Command::RemoveService { id: "api".into() }).unwrap();
    assert!(s.tasks.is_empty());
    assert_eq!(ids(&s), Vec::<String>::new());
    assert_eq!(s.free_address(&web), Ok(first));
    assert!(!s.holds_addresses(&web));
}

proptest! {
    /// The runs find the address a walk of every address would.
    #[test]
    fn the_lowest_free_address_is_the_one_a_walk_finds(
        prefix in 26u8..=30,
        range in proptest::option::of(0u8..4),
        aux in proptest::collection::vec(0u8..64, 0..3),
        ops in proptest::collection::vec((any::<bool>(), 0u8..64), 0..200),
    ) {
        let subnet = format!("10.1.0.0/{prefix}");
        let ip_range = range.map(|q| format!("10.1.0.{}/{}", u32::from(q) << (32 - prefix - 2), prefix + 2));
        let size = 1u8 << (32 - prefix);
        let aux: Vec<Ipv4Addr> = aux.iter().map(|a| Ipv4Addr::new(10, 1, 0, a % size)).collect();
        let n = net(&subnet, ip_range.as_deref(), &aux);
        let mut runs = Runs::default();
        let mut used = BTreeSet::new();
        for (add, last) in ops {
            // Addresses inside and just outside the network.
            let ip = Ipv4Addr::new(10, 1, 0, last);
            if add {
                if used.insert(ip) {
                    runs.insert(ip);
                }
            } else if used.remove(&ip) {
                runs.remove(ip);
            }
            prop_assert_eq!(lowest_free(&n, &[&runs]), allocate_ip(&n, &used));
        }
    }
}

#[test]
fn a_node_s_view_holds_what_it_runs_and_nothing_else() {
    let mut s = crate::test_support::swarm(3);
    for (svc, node) in [("a", 2), ("b", 3)] {
        apply(
            &mut s,
            &Command::CreateService {
                id: svc.into(),
                spec: crate::test_support::service(svc, vec![]),
                created_at_ms: 0,
            },
        )
        .unwrap();
        apply(
            &mut s,
            &Command::AddTask {
                id: format!("{svc}1").into(),
                service_id: svc.into(),
                slot: Some(1),
                node: Some(NodeId(node)),
                message: String::new(),
                restarts: 0,
                now_ms: 0,
            },
        )
        .unwrap();
    }
    let view = s.node_view(NodeId(2));
    assert_eq!(view.tasks.keys().collect::<Vec<_>>(), ["a1"]);
    assert_eq!(view.services.keys().collect::<Vec<_>>(), ["a"]);
    assert_eq!(view.nodes.keys().collect::<Vec<_>>(), [&NodeId(2)]);
    assert_eq!(view.networks, s.networks);
    assert_eq!(view.tasks["a1"], s.tasks["a1"]);
    assert_eq!(view.task_name(&view.tasks["a1"]), "a.1");
    assert_eq!(view.tasks_on(NodeId(2)).count(), 1);
}
