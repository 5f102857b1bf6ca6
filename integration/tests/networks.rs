//! Networks through the CLI on a real swarm (issue 4, networks part).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::Value;
use shoal_integration::Cluster;

fn networks(c: &Cluster, i: usize) -> Vec<Value> {
    c.shoal_ok(i, &["network", "ls", "--format", "json"])
        .unwrap()
        .json()
        .unwrap()
        .as_array()
        .cloned()
        .unwrap()
}

#[test]
fn networks_are_allocated_in_the_store_and_bad_ones_refused() {
    let c = Cluster::start(3).unwrap();
    c.shoal_ok(
        0,
        &[
            "swarm",
            "init",
            "--default-addr-pool",
            "172.30.0.0/16",
            "--default-addr-pool-mask-length",
            "26",
        ],
    )
    .unwrap();
    let m = c.token(0, "manager").unwrap();
    let t = c.token(0, "worker").unwrap();
    c.join(1, &m, 0).unwrap();
    c.join(2, &t, 0).unwrap();

    // ingress exists from init.
    let nets = networks(&c, 0);
    assert_eq!(nets.len(), 1);
    assert_eq!(nets[0]["name"], "ingress");
    assert_eq!(nets[0]["subnets"][0], "10.255.0.0/16");
    assert_eq!(nets[0]["vni"], 4096);

    // Not through a worker; through a follower manager (forwarded to the
    // leader), seen everywhere, carved from the configured pool, with the
    // next VNI.
    c.assert_refused(
        2,
        &["network", "create", "web"],
        "this node is not a swarm manager",
    );
    c.shoal_ok(1, &["network", "create", "web"]).unwrap();
    c.shoal_ok(
        1,
        &[
            "network",
            "create",
            "-d",
            "bridge",
            "--subnet",
            "192.168.60.0/24",
            "--gateway",
            "192.168.60.254",
            "local",
        ],
    )
    .unwrap();
    c.wait_until(
        "every node to see both networks",
        Duration::from_secs(20),
        |c| Ok((0..3).all(|i| networks(c, i).len() == 3)),
    )
    .unwrap();
    let web = c
        .shoal_ok(0, &["network", "inspect", "web"])
        .unwrap()
        .json()
        .unwrap()[0]
        .clone();
    assert_eq!(web["subnets"][0], "172.30.0.0/26");
    assert_eq!(web["gateways"][0], "172.30.0.1");
    assert_eq!(web["vni"], 4097);
    assert_eq!(web["driver"], "overlay");

    let refused: [(&[&str], &str); 7] = [
        (&["network", "create", "web"], "already exists"),
        (
            &["network", "create", "--subnet", "192.168.60.128/25", "x"],
            "overlaps 192.168.60.0/24 of network `local`",
        ),
        (
            &["network", "create", "--subnet", "10.1.0.1/16", "x"],
            "host bits are set",
        ),
        (
            &["network", "create", "--subnet", "nonsense", "x"],
            "invalid CIDR",
        ),
        (
            &["network", "create", "-d", "macvlan", "x"],
            "-o parent=IFACE",
        ),
        (
            &["network", "create", "-o", "vxlan-id=4097", "x"],
            "VXLAN ID 4097 is already used by network `web`",
        ),
        (&["network", "rm", "nosuch"], "no such network"),
    ];
    for (args, message) in refused {
        c.assert_refused(1, args, message);
    }
    // The exit code tells the kind of refusal: 2 bad input, 3 not found,
    // 4 refused by the swarm's state.
    for (args, code) in [
        (&["network", "create", "--subnet", "nonsense", "x"][..], 2),
        (
            &["network", "create", "-d", "ipvlan", "-o", "parent=lo", "x"][..],
            2,
        ),
        (&["network", "rm", "nosuch"][..], 3),
        (&["network", "create", "web"][..], 4),
    ] {
        let r = c.shoal(1, args);
        assert_eq!(r.code, code, "`shoal {}`: {r:?}", args.join(" "));
    }
    assert_eq!(networks(&c, 0).len(), 3, "refusals change nothing");

    c.shoal_ok(0, &["network", "rm", "web"]).unwrap();
    c.wait_until("web to be gone everywhere", Duration::from_secs(20), |c| {
        Ok((0..3).all(|i| networks(c, i).len() == 2))
    })
    .unwrap();
    // Its subnet and VNI are free again.
    c.shoal_ok(0, &["network", "create", "web2"]).unwrap();
    let web2 = c
        .shoal_ok(0, &["network", "inspect", "web2"])
        .unwrap()
        .json()
        .unwrap()[0]
        .clone();
    assert_eq!(web2["subnets"][0], "172.30.0.0/26");
    assert_eq!(web2["vni"], 4097);
}

#[test]
fn drivers_the_kernel_lacks_and_missing_parents_are_refused_at_once() {
    if !shoal_integration::root_or_skip("probe kernel drivers") {
        return;
    }
    let c = Cluster::start(1).unwrap();
    c.init(0).unwrap();
    // ipvlan: refused on every kernel (its tasks would get no interface),
    // naming what to use instead; nothing is stored.
    let r = c.shoal(
        0,
        &["network", "create", "-d", "ipvlan", "-o", "parent=lo", "iv"],
    );
    assert!(!r.ok(), "{r:?}");
    assert!(r.stderr.contains("-d macvlan"), "{r:?}");
    // A second subnet and --attachable are refused too.
    let r = c.shoal(
        0,
        &[
            "network",
            "create",
            "--subnet",
            "10.91.0.0/24",
            "--subnet",
            "10.92.0.0/24",
            "two",
        ],
    );
    assert!(r.stderr.contains("one --subnet (2 given)"), "{r:?}");
    let r = c.shoal(0, &["network", "create", "--attachable", "att"]);
    assert!(r.stderr.contains("--attachable is not supported"), "{r:?}");
    let ls = c
        .shoal_ok(0, &["network", "ls", "--format", "json"])
        .unwrap();
    for name in ["iv", "two", "att"] {
        assert!(!ls.stdout.contains(&format!("\"{name}\"")), "{}", ls.stdout);
    }
    let r = c.shoal(
        0,
        &[
            "network",
            "create",
            "-d",
            "macvlan",
            "-o",
            "parent=nosuch0",
            "mv",
        ],
    );
    assert!(!r.ok());
    eprintln!("{}", r.stderr.trim());
    assert!(
        r.stderr
            .contains("parent interface `nosuch0` does not exist")
            || r.stderr.contains("CONFIG_MACVLAN"),
        "{r:?}"
    );
    // Nothing was created.
    let nets = c
        .shoal_ok(0, &["network", "ls", "--format", "json"])
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(nets.as_array().unwrap().len(), 1, "{nets}");
    assert!(
        std::fs::read_dir("/run/netns")
            .map(|d| d
                .flatten()
                .all(|e| !e.file_name().to_string_lossy().starts_with("shoal-probe")))
            .unwrap_or(true),
        "probe namespaces are removed"
    );
}
