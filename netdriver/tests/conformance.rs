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

use shoal_netdriver::model::Ns;
use shoal_netdriver::privilege::root_or_skip;

/// Runs an nft script in namespace `ns` (changes behind the backend's back).
fn nft_in(ns: &Ns, script: &str) {
    let name = ns.name().expect("a named namespace");
    let mut nft = std::process::Command::new("ip")
        .args(["netns", "exec", name, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut nft.stdin.take().unwrap(), script.as_bytes()).unwrap();
    assert!(nft.wait().unwrap().success());
}

/// Removes the test's namespaces, also when the test fails.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for prefix in &self.0 {
            for ns in shoal_netdriver::linux::list_netns(prefix) {
                let _ = shoal_netdriver::linux::delete_netns(&ns);
            }
        }
    }
}

/// As root, a fresh namespace `shoal-TAGPID-a` (removed when the returned
/// guard goes) and a Linux backend; `None`, saying why, when not root.
fn one_namespace(tag: &str) -> Option<(String, Ns, Cleanup, shoal_netdriver::linux::Linux)> {
    if !root_or_skip("create network namespaces") {
        return None;
    }
    let prefix = format!("shoal-{tag}{}-", std::process::id());
    let ns = format!("{prefix}a");
    let cleanup = Cleanup(vec![prefix.clone()]);
    shoal_netdriver::linux::create_netns(&ns).unwrap();
    Some((
        prefix,
        Ns::named(ns),
        cleanup,
        shoal_netdriver::linux::Linux::new(None),
    ))
}

#[tokio::test]
async fn the_linux_backend_passes_the_suite_in_a_fresh_namespace() {
    if !root_or_skip("create network namespaces") {
        return;
    }
    let pid = std::process::id();
    // Not under the node's prefix, or the reconciler would own it.
    let host = format!("shoal-host{pid}");
    let node = format!("conf{pid}");
    let names = Names::for_node(&node);
    let _cleanup = Cleanup(vec![host.clone(), names.prefix.clone()]);
    shoal_netdriver::linux::create_netns(&host).unwrap();
    let mut b = shoal_netdriver::linux::Linux::new(Some(host.clone()));
    shoal_netdriver::conformance::run(&mut b, &names)
        .await
        .unwrap();
    assert!(shoal_netdriver::linux::list_netns(&names.prefix).is_empty());
}

#[tokio::test]
async fn vip_backend_changes_go_over_netlink_and_read_back_right() {
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::Ipv4Addr;

    use shoal_netdriver::Backend;
    use shoal_netdriver::model::Op;

    let Some((prefix, ns, _cleanup, mut b)) = one_namespace("nl") else {
        return;
    };
    let ip = |d: u8| Ipv4Addr::new(10, 1, 0, d);
    let (va, vb) = (Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3));
    let set = |l: &[u8]| l.iter().map(|d| ip(*d)).collect::<BTreeSet<_>>();
    let steps: Vec<(BTreeMap<Ipv4Addr, BTreeSet<Ipv4Addr>>, bool)> = vec![
        (
            BTreeMap::from([(va, set(&[1, 2, 3])), (vb, set(&[9]))]),
            true,
        ),
        // One replaced (same count), then shrinking, then growing.
        (
            BTreeMap::from([(va, set(&[1, 3, 4])), (vb, set(&[9]))]),
            false,
        ),
        (BTreeMap::from([(va, set(&[4])), (vb, set(&[9]))]), false),
        (
            BTreeMap::from([(va, set(&[4])), (vb, set(&[9, 10, 11]))]),
            false,
        ),
    ];
    for (lb, fresh) in &steps {
        let op = Op::SetLb {
            ns: ns.clone(),
            lb: lb.clone(),
            changed: BTreeSet::from([va, vb]),
            fresh: *fresh,
        };
        b.apply(&op).await.unwrap();
        let seen = b.observe(&prefix).await.unwrap();
        assert_eq!(&seen.namespaces[&ns].lb, lb);
    }
    assert_eq!(b.netlink_changes(), 3);

    // Someone removed the map behind our back: the netlink change is
    // refused, and `nft` rebuilds what is missing.
    let script = "delete element ip shoal vips { 10.0.0.2 }\n\
                  flush chain ip shoal svc_10_0_0_2\n\
                  delete chain ip shoal svc_10_0_0_2\n\
                  delete map ip shoal be_10_0_0_2\n";
    nft_in(&ns, script);
    let lb = BTreeMap::from([(va, set(&[4, 5])), (vb, set(&[9, 10, 11]))]);
    let op = Op::SetLb {
        ns: ns.clone(),
        lb: lb.clone(),
        changed: BTreeSet::from([va]),
        fresh: false,
    };
    b.apply(&op).await.unwrap();
    assert_eq!(b.netlink_changes(), 3);
    let seen = b.observe(&prefix).await.unwrap();
    assert_eq!(seen.namespaces[&ns].lb, lb);

    // A backend swapped behind our back (the layout we remember says all
    // is well): the table is read again and the slot put right.
    let swap = "delete element ip shoal be_10_0_0_3 { 1 }\n\
                add element ip shoal be_10_0_0_3 { 1 : 10.9.9.9 }\n";
    nft_in(&ns, swap);
    let seen = b.observe(&prefix).await.unwrap();
    assert_ne!(seen.namespaces[&ns].lb, lb);
    let op = Op::SetLb {
        ns: ns.clone(),
        lb: lb.clone(),
        changed: BTreeSet::from([vb]),
        fresh: false,
    };
    b.apply(&op).await.unwrap();
    assert_eq!(b.netlink_changes(), 4);
    let seen = b.observe(&prefix).await.unwrap();
    assert_eq!(seen.namespaces[&ns].lb, lb);

    // Nothing changed since: observing again runs no `nft` (the nf_tables
    // generation says so); any change there, here a table of someone
    // else's, moves the generation, and the tables are listed again.
    let listed = b.nft_listings();
    let again = b.observe(&prefix).await.unwrap();
    assert_eq!(again, seen);
    assert_eq!(
        b.nft_listings(),
        listed,
        "unchanged tables were listed again"
    );
    nft_in(&ns, "add table ip someone\n");
    let after = b.observe(&prefix).await.unwrap();
    assert_eq!(after.namespaces[&ns].lb, lb);
    assert!(
        b.nft_listings() > listed,
        "a changed namespace was not listed"
    );
}

#[tokio::test]
async fn port_forwarding_reads_back_from_the_kernel_and_is_put_right() {
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;

    use shoal_netdriver::Backend;
    use shoal_netdriver::model::{Kernel, Nat, Netns, Op, diff};

    let Some((prefix, ns, _cleanup, mut b)) = one_namespace("nat") else {
        return;
    };
    let ip = |d: u8| Ipv4Addr::new(10, 1, 0, d);
    let nat = Nat {
        dnat: BTreeMap::from([
            (("tcp".into(), 8080), (vec![ip(3), ip(4)], 80)),
            (("udp".into(), 5353), (vec![ip(3)], 53)),
        ]),
        local: true,
        snat: Some(("ig0".into(), ip(9))),
        masquerade: Some((Ipv4Addr::new(172, 30, 0, 0), 16, "shoalgw0".into())),
        untracked_udp: Some(4789),
    };
    let set = Op::SetNat {
        ns: ns.clone(),
        nat: Some(nat.clone()),
    };
    b.apply(&set).await.unwrap();
    let seen = b.observe(&prefix).await.unwrap();
    assert_eq!(seen.namespaces[&ns].nat.as_ref(), Some(&nat));
    assert!(seen.namespaces[&ns].nat_foreign.is_empty());
    let wanted = Kernel {
        namespaces: BTreeMap::from([(
            ns.clone(),
            Netns {
                nat: Some(nat.clone()),
                ..seen.namespaces[&ns].clone()
            },
        )]),
    };
    assert_eq!(diff(&seen, &wanted, &prefix), vec![]);

    // Behind Shoal's back, one backend of the published port is swapped
    // for another in both chains (as many rules as before): read back as
    // it is, so the reconciler writes the table again.
    let listing = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.to_string(),
            "nft",
            "-a",
            "list",
            "table",
            "ip",
            "shoal-nat",
        ])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    let (mut script, mut chain) = (String::new(), "");
    for line in listing.lines().map(str::trim) {
        if let Some(c) = line.strip_prefix("chain ") {
            chain = c.split_whitespace().next().unwrap();
        }
        if !line.contains("dport 8080") {
            continue;
        }
        let (rule, handle) = line.rsplit_once(" # handle ").unwrap();
        script.push_str(&format!(
            "replace rule ip shoal-nat {chain} handle {handle} {}\n",
            rule.replace("10.1.0.4", "10.9.9.9")
        ));
    }
    assert_eq!(script.lines().count(), 2, "{listing}");
    nft_in(&ns, &script);
    let seen = b.observe(&prefix).await.unwrap();
    let tcp = &seen.namespaces[&ns].nat.as_ref().unwrap().dnat[&("tcp".into(), 8080)];
    assert_eq!(tcp.0, vec![ip(3), Ipv4Addr::new(10, 9, 9, 9)]);
    assert_eq!(diff(&seen, &wanted, &prefix), vec![set.clone()]);
    b.apply(&set).await.unwrap();
    let seen = b.observe(&prefix).await.unwrap();
    assert_eq!(diff(&seen, &wanted, &prefix), vec![]);

    // A rule of someone else's in Shoal's table: named, and written away.
    nft_in(&ns, "add rule ip shoal-nat post counter accept\n");
    let seen = b.observe(&prefix).await.unwrap();
    let foreign = &seen.namespaces[&ns].nat_foreign;
    assert!(
        foreign.len() == 1 && foreign[0].starts_with("rule in chain post"),
        "{foreign:?}"
    );
    assert_eq!(diff(&seen, &wanted, &prefix), vec![set.clone()]);
    b.apply(&set).await.unwrap();
    let seen = b.observe(&prefix).await.unwrap();
    assert!(seen.namespaces[&ns].nat_foreign.is_empty());
}

#[tokio::test]
async fn a_backend_that_leaves_takes_its_unanswered_connections_with_it() {
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
    use std::path::PathBuf;
    use std::time::Duration;

    use shoal_netdriver::Backend;
    use shoal_netdriver::ctnl::{self, TCP, UDP};
    use shoal_netdriver::linux::in_netns;
    use shoal_netdriver::model::Op;

    let Some((_prefix, ns, _cleanup, mut b)) = one_namespace("ct") else {
        return;
    };
    let ip = |args: &str| {
        let mut c = std::process::Command::new("ip");
        c.args(["-n", &ns.to_string()])
            .args(args.split_whitespace());
        assert!(c.status().unwrap().success(), "ip {args}");
    };
    // Backends on a veth whose peer no one answers on: 10.1.0.3 never
    // answers (a dead node); 10.1.0.4 is this namespace's own, with a TCP
    // listener.
    ip("link set lo up");
    ip("link add d0 type veth peer name d1");
    ip("link set d1 up");
    ip("addr add 10.1.0.1/24 dev d0");
    ip("addr add 10.1.0.4/32 dev d0");
    ip("link set d0 up");
    ip("route add 10.0.0.0/24 dev d0");
    let path = Some(PathBuf::from(format!("/run/netns/{ns}")));
    let vip = Ipv4Addr::new(10, 0, 0, 2);
    let be = |d: u8| Ipv4Addr::new(10, 1, 0, d);
    let set_lb = |backends: &[u8], fresh: bool| Op::SetLb {
        ns: ns.clone(),
        lb: BTreeMap::from([(
            vip,
            backends.iter().map(|d| be(*d)).collect::<BTreeSet<_>>(),
        )]),
        changed: BTreeSet::from([vip]),
        fresh,
    };
    b.apply(&set_lb(&[3, 4], true)).await.unwrap();
    let table = |path: &Option<PathBuf>| {
        let fd = in_netns(path.clone(), shoal_netdriver::nfnl::open).unwrap();
        let mut out: Vec<(u8, u8, bool)> = ctnl::entries(&fd, 1)
            .unwrap()
            .into_iter()
            .filter(|e| e.orig_dst.0 == vip)
            .map(|e| (e.proto, e.reply_src.0.octets()[3], e.replied))
            .collect();
        out.sort();
        out
    };
    let count =
        |t: &[(u8, u8, bool)], want: (u8, u8, bool)| t.iter().filter(|e| **e == want).count();
    // Backends are picked at random: TCP connections until two are
    // answered (by the listener) and two are not, then UDP flows until two
    // went each way (at most 40 of each).
    let (_listener, _streams) = in_netns(path.clone(), move || {
        let listener = TcpListener::bind("10.1.0.4:80").unwrap();
        let to = SocketAddr::from((vip, 80));
        let (mut streams, mut lost) = (Vec::new(), 0);
        for _ in 0..40 {
            match TcpStream::connect_timeout(&to, Duration::from_millis(200)) {
                Ok(s) => streams.push(s),
                Err(_) => lost += 1,
            }
            if streams.len() >= 2 && lost >= 2 {
                break;
            }
        }
        Ok((listener, streams))
    })
    .unwrap();
    let mut udp = Vec::new();
    for _ in 0..40 {
        let t = table(&path);
        if count(&t, (UDP, 3, false)) >= 2 && count(&t, (UDP, 4, false)) >= 2 {
            break;
        }
        udp.push(
            in_netns(path.clone(), move || {
                let s = UdpSocket::bind("10.1.0.1:0").unwrap();
                s.send_to(b"hello", (vip, 53)).unwrap();
                Ok(s)
            })
            .unwrap(),
        );
    }
    let before = table(&path);
    for kind in [
        (TCP, 3, false),
        (TCP, 4, true),
        (UDP, 3, false),
        (UDP, 4, false),
    ] {
        assert!(count(&before, kind) >= 2, "{kind:?} in {before:?}");
    }
    assert_eq!(
        count(&before, (TCP, 3, true)) + count(&before, (TCP, 4, false)),
        0,
        "{before:?}"
    );
    // The clean-up runs on a thread of its own, just after the change.
    let settles = |want: Vec<(u8, u8, bool)>| {
        let since = std::time::Instant::now();
        let mut seen = table(&path);
        while seen != want && since.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(20));
            seen = table(&path);
        }
        assert_eq!(seen, want);
    };
    // 10.1.0.3 leaves: whatever was sent to it goes.
    b.apply(&set_lb(&[4], false)).await.unwrap();
    settles(before.iter().copied().filter(|e| e.1 == 4).collect());
    // 10.1.0.4 leaves too: its UDP flows go, its answered connections stay.
    b.apply(&set_lb(&[5], false)).await.unwrap();
    settles(
        before
            .iter()
            .copied()
            .filter(|e| *e == (TCP, 4, true))
            .collect(),
    );
}
