use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;
use crate::ids::NetworkId;

fn spec(name: &str, driver: Driver) -> NetworkSpec {
    NetworkSpec::new(name, driver)
}

fn pool() -> Vec<Ipv4Net> {
    vec!["10.0.0.0/8".parse().unwrap()]
}

fn create(
    nets: &mut BTreeMap<NetworkId, Network>,
    id: &str,
    s: &NetworkSpec,
) -> Result<Network, NetworkError> {
    let n = allocate(id, s, nets, &pool(), 24, &[], 0)?;
    nets.insert(id.into(), n.clone());
    Ok(n)
}

#[test]
fn subnets_come_from_the_pool_around_existing_ones_and_vnis_from_4096() {
    let mut nets = BTreeMap::new();
    let mut ing = create(&mut nets, "i", &ingress_spec()).unwrap();
    ing.ingress = true;
    assert_eq!(ing.subnets[0].subnet.to_string(), "10.255.0.0/16");
    assert_eq!(ing.subnets[0].gateway.to_string(), "10.255.0.1");
    assert_eq!(ing.vni, Some(4096));
    let a = create(&mut nets, "a", &spec("a", Driver::Overlay)).unwrap();
    assert_eq!(a.subnets[0].subnet.to_string(), "10.0.0.0/24");
    assert_eq!(a.vni, Some(4097));
    let b = create(&mut nets, "b", &spec("b", Driver::Bridge)).unwrap();
    assert_eq!(b.subnets[0].subnet.to_string(), "10.0.1.0/24");
    assert_eq!(b.vni, None);
}

#[test]
fn a_subnet_from_the_pool_steers_clear_of_the_routes_to_avoid() {
    let nets = BTreeMap::new();
    // The node's underlay is 10.0.0.0/23 and a VPN has 10.0.4.0/22.
    let avoid: Vec<Ipv4Net> = vec![
        "10.0.0.0/23".parse().unwrap(),
        "10.0.4.0/22".parse().unwrap(),
    ];
    let a = allocate(
        "a",
        &spec("a", Driver::Overlay),
        &nets,
        &pool(),
        24,
        &avoid,
        0,
    )
    .unwrap();
    assert_eq!(a.subnets[0].subnet.to_string(), "10.0.2.0/24");
    // A pool with nothing clear says so, naming the way out.
    let small: Vec<Ipv4Net> = vec!["10.0.0.0/23".parse().unwrap()];
    let e = allocate(
        "a",
        &spec("a", Driver::Overlay),
        &nets,
        &small,
        24,
        &avoid,
        0,
    )
    .unwrap_err();
    assert!(e.to_string().contains("clear of this node's routes"), "{e}");
    assert!(e.to_string().contains("--subnet"), "{e}");
}

#[test]
fn overlaps_duplicates_and_bad_addresses_are_refused() {
    let mut nets = BTreeMap::new();
    let mut s = spec("a", Driver::Overlay);
    s.subnets = vec![SubnetSpec {
        subnet: "10.9.0.0/16".parse().unwrap(),
        gateway: None,
    }];
    create(&mut nets, "a", &s).unwrap();
    assert!(matches!(
        create(&mut nets, "x", &s),
        Err(NetworkError::Exists(_))
    ));
    let mut t = spec("b", Driver::Overlay);
    t.subnets = vec![SubnetSpec {
        subnet: "10.9.4.0/24".parse().unwrap(),
        gateway: None,
    }];
    let err = create(&mut nets, "b", &t).unwrap_err();
    assert_eq!(
        err.to_string(),
        "subnet 10.9.4.0/24 overlaps 10.9.0.0/16 of network `a`"
    );
    t.subnets = vec![SubnetSpec {
        subnet: "192.168.5.0/24".parse().unwrap(),
        gateway: Some("192.168.6.1".parse().unwrap()),
    }];
    assert!(matches!(
        create(&mut nets, "b", &t),
        Err(NetworkError::BadAddress(_))
    ));
    t.subnets[0].gateway = None;
    t.ip_range = Some("192.168.9.0/25".parse().unwrap());
    assert!(
        create(&mut nets, "b", &t)
            .unwrap_err()
            .to_string()
            .contains("--ip-range")
    );
    t.ip_range = Some("192.168.5.128/25".parse().unwrap());
    t.aux_addresses
        .insert("router".into(), "172.16.0.1".parse().unwrap());
    assert!(
        create(&mut nets, "b", &t)
            .unwrap_err()
            .to_string()
            .contains("--aux-address")
    );
    assert!(matches!(
        create(&mut nets, "b", &spec("bad name", Driver::Bridge)),
        Err(NetworkError::BadName(_))
    ));
}

#[test]
fn options_are_checked_per_driver() {
    let mut nets = BTreeMap::new();
    let mut s = spec("m", Driver::Macvlan);
    assert!(
        create(&mut nets, "m", &s)
            .unwrap_err()
            .to_string()
            .contains("-o parent")
    );
    s.options.insert("parent".into(), "eth0".into());
    s.options.insert("mtu".into(), "9000".into());
    assert_eq!(create(&mut nets, "m", &s).unwrap().mtu, Some(9000));
    let mut o = spec("o", Driver::Overlay);
    o.options.insert("vxlan-id".into(), "5000".into());
    assert_eq!(create(&mut nets, "o", &o).unwrap().vni, Some(5000));
    let mut o2 = spec("o2", Driver::Overlay);
    o2.options.insert("vxlan-id".into(), "5000".into());
    assert!(matches!(
        create(&mut nets, "o2", &o2),
        Err(NetworkError::VniInUse { .. })
    ));
    o2.options.insert("vxlan-id".into(), "99999999".into());
    assert!(matches!(
        create(&mut nets, "o2", &o2),
        Err(NetworkError::BadOption(_))
    ));
    let mut b = spec("b", Driver::Bridge);
    b.options.insert("parent".into(), "eth0".into());
    assert!(
        create(&mut nets, "b", &b)
            .unwrap_err()
            .to_string()
            .contains("not supported by the bridge driver")
    );
}

proptest! {
    /// Whatever is created and removed, no two networks share a subnet
    /// address, a name or a VNI.
    #[test]
    fn allocations_never_collide(ops in proptest::collection::vec((any::<bool>(), 0u8..20, proptest::option::of(0u8..4), any::<bool>()), 1..80)) {
        let mut nets = BTreeMap::new();
        for (i, (create_it, name, subnet, overlay)) in ops.into_iter().enumerate() {
            if create_it {
                let mut s = spec(&format!("n{name}"), if overlay { Driver::Overlay } else { Driver::Bridge });
                if let Some(k) = subnet {
                    s.subnets = vec![SubnetSpec { subnet: format!("10.0.{}.0/{}", k * 2, 23 + k % 2).parse().unwrap(), gateway: None }];
                }
                let _ = create(&mut nets, &format!("id{i}"), &s);
            } else if let Some(id) = nets.keys().nth(usize::from(name) % nets.len().max(1)).cloned() {
                nets.remove(&id);
            }
            let all: Vec<&Network> = nets.values().collect();
            let names: BTreeSet<&str> = all.iter().map(|n| n.spec.name.as_str()).collect();
            prop_assert_eq!(names.len(), all.len());
            let vnis: Vec<u32> = all.iter().filter_map(|n| n.vni).collect();
            prop_assert_eq!(vnis.iter().collect::<BTreeSet<_>>().len(), vnis.len());
            for (x, a) in all.iter().enumerate() {
                for b in &all[x + 1..] {
                    for sa in &a.subnets {
                        for sb in &b.subnets {
                            prop_assert!(!sa.subnet.overlaps(&sb.subnet), "{} and {}", sa.subnet, sb.subnet);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn what_would_be_stored_and_ignored_is_refused() {
    let ok = spec("web", Driver::Overlay);
    assert!(ok.check_supported().is_ok());
    let mut one = spec("web", Driver::Bridge);
    one.subnets.push(SubnetSpec {
        subnet: "10.1.0.0/24".parse().unwrap(),
        gateway: None,
    });
    assert!(one.check_supported().is_ok());
    // ipvlan: refused on every kernel, naming what to use instead.
    let e = spec("iv", Driver::Ipvlan).check_supported().unwrap_err();
    assert!(e.to_string().contains("-d macvlan"), "{e}");
    // A second subnet would never be programmed.
    let mut two = one.clone();
    two.subnets.push(SubnetSpec {
        subnet: "10.2.0.0/24".parse().unwrap(),
        gateway: None,
    });
    let e = two.check_supported().unwrap_err();
    assert!(e.to_string().contains("one --subnet (2 given)"), "{e}");
    // --attachable would mean nothing.
    let mut att = ok.clone();
    att.attachable = true;
    let e = att.check_supported().unwrap_err();
    assert!(
        e.to_string().contains("--attachable is not supported"),
        "{e}"
    );
}
