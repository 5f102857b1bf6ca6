//! The conformance suite every backend passes: the recording one always,
//! the Linux one inside a fresh network namespace when root
//! (`netdriver/tests/conformance.rs`). It drives a backend through the
//! reconciler and checks what it then observes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use shoal_mesh::network::Driver;
use shoal_mesh::plan::{EndpointPlan, LbPlan, NetworkPlan, NodePlan, Remote, SandboxPlan, mac_for};

use crate::model::{HOST, Kernel, Link, LinkKind, Ns, Op, diff};
use crate::render::{Names, VXLAN_PORT, render};
use crate::{Backend, reconcile};

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 90, 0, last)
}

fn remote(last: u8, vtep: u8) -> Remote {
    Remote {
        ip: ip(last),
        mac: mac_for(ip(last)),
        vtep: Ipv4Addr::new(192, 0, 2, vtep),
    }
}

fn sandbox(task: &str, last: u8) -> SandboxPlan {
    SandboxPlan {
        task: task.into(),
        name: format!("web.{last}"),
        endpoints: vec![EndpointPlan {
            network: "0123456789abcdef".into(),
            ip: ip(last),
            prefix: 24,
            mac: mac_for(ip(last)),
            gateway: ip(1),
        }],
        dns: BTreeMap::new(),
        egress: true,
    }
}

/// The sample service's VIP.
pub fn vip() -> Ipv4Addr {
    ip(100)
}

/// An overlay network with the given local tasks (ID, last octet) and
/// remote endpoints, and a service whose VIP balances over all of them.
pub fn sample_plan(tasks: &[(&str, u8)], remotes: &[Remote]) -> NodePlan {
    let mut p = NodePlan::default();
    let mut backends: Vec<Ipv4Addr> = tasks
        .iter()
        .map(|(_, l)| ip(*l))
        .chain(remotes.iter().map(|r| r.ip))
        .collect();
    backends.sort();
    p.networks.insert(
        "0123456789abcdef".into(),
        NetworkPlan {
            id: "0123456789abcdef".into(),
            name: "web".into(),
            driver: Driver::Overlay,
            vni: Some(4100),
            subnet: "10.90.0.0/24".parse().expect("subnet"),
            gateway: ip(1),
            mtu: 1450,
            internal: false,
            vtep: Ipv4Addr::new(192, 0, 2, 1),
            parent: None,
            remotes: remotes.iter().cloned().collect::<BTreeSet<_>>(),
            lbs: vec![LbPlan {
                service_id: "svc".into(),
                service: "web".into(),
                vip: vip(),
                backends,
            }],
        },
    );
    for (t, last) in tasks {
        p.sandboxes.insert((*t).into(), sandbox(t, *last));
    }
    p
}

/// `Err` with a description unless `actual` satisfies `wanted`.
fn converged(actual: &Kernel, wanted: &Kernel, prefix: &str, when: &str) -> Result<(), String> {
    let left = diff(actual, wanted, prefix);
    if left.is_empty() {
        Ok(())
    } else {
        Err(format!("{when}: the kernel still differs: {left:#?}"))
    }
}

async fn step<B: Backend>(
    b: &mut B,
    plan: &NodePlan,
    names: &Names,
    when: &str,
) -> Result<Vec<Op>, String> {
    let gateway = crate::render::Gateway::new("172.31.0.0/16".parse().expect("a CIDR"));
    let wanted = render(plan, names, VXLAN_PORT, Some(&gateway));
    let ops = reconcile(b, &wanted, &names.prefix)
        .await
        .map_err(|e| format!("{when}: {e}"))?;
    let seen = b
        .observe(&names.prefix)
        .await
        .map_err(|e| format!("{when}: {e}"))?;
    converged(&seen, &wanted, &names.prefix, when)?;
    Ok(ops)
}

/// Runs the suite against `b`, with namespaces under `names.prefix`.
/// Leaves nothing behind on success.
pub async fn run<B: Backend>(b: &mut B, names: &Names) -> Result<(), String> {
    let seen = converges_and_stays(b, names).await?;
    follows_a_new_remote(b, names).await?;
    puts_back_what_was_removed(b, names, &seen).await?;
    removes_leftovers(b, names).await?;
    removes_what_is_no_longer_planned(b, names).await
}

const T1: &str = "1111111111111111";
const T2: &str = "2222222222222222";

/// Two tasks, two remote endpoints.
fn base_plan() -> NodePlan {
    sample_plan(&[(T1, 2), (T2, 3)], &[remote(4, 2), remote(5, 3)])
}

/// [`base_plan`] and a third remote endpoint.
fn more_plan() -> NodePlan {
    sample_plan(
        &[(T1, 2), (T2, 3)],
        &[remote(4, 2), remote(5, 3), remote(6, 3)],
    )
}

/// From nothing to the plan, then again: nothing to do. Returns what the
/// backend then holds.
async fn converges_and_stays<B: Backend>(b: &mut B, names: &Names) -> Result<Kernel, String> {
    let (t1, base) = (T1, base_plan());
    let ops = step(b, &base, names, "first reconcile").await?;
    if ops.is_empty() {
        return Err("the first reconcile did nothing".into());
    }
    let again = step(b, &base, names, "second reconcile").await?;
    if !again.is_empty() {
        return Err(format!("not idempotent: {again:#?}"));
    }
    let seen = b.observe(&names.prefix).await.map_err(|e| e.to_string())?;
    let net = &seen.namespaces[&names.network("0123456789abcdef")];
    if net.fdb.len() != 2 || net.neigh.len() != 2 {
        return Err(format!("expected 2 FDB and 2 neighbour entries: {net:#?}"));
    }
    // Egress: a leg into the host's gateway bridge, isolated from the
    // other tasks', and a default route through it.
    let gw = &seen.namespaces[&names.task(t1)].links["gw0"];
    let port = &seen.namespaces[&HOST].links[&crate::render::gateway_port(t1)];
    if gw.addrs.is_empty() || !port.isolated || port.master.as_deref() != Some("shoalgw0") {
        return Err(format!("egress leg not as planned: {gw:#?} {port:#?}"));
    }
    if seen.namespaces[&names.task(t1)].routes.len() != 1 || !seen.namespaces[&HOST].forwarding {
        return Err("no default route or no forwarding".into());
    }
    let eth = &seen.namespaces[&names.task(t1)].links["eth0"];
    if !eth.addrs.contains(&(ip(2), 24))
        || eth.mac != Some(mac_for(ip(2)))
        || !eth.up
        || !matches!(eth.kind, LinkKind::Macvlan { .. })
    {
        return Err(format!("task interface not as planned: {eth:#?}"));
    }

    let lb = &seen.namespaces[&names.task(t1)].lb;
    if lb.get(&vip()).map(BTreeSet::len) != Some(4) {
        return Err(format!("the VIP should balance over 4 backends: {lb:?}"));
    }

    Ok(seen)
}

/// One more remote endpoint: one FDB and one neighbour entry, and one
/// small load-balancer change per task sandbox.
async fn follows_a_new_remote<B: Backend>(b: &mut B, names: &Names) -> Result<(), String> {
    let more = more_plan();
    let ops = step(b, &more, names, "a new remote endpoint").await?;
    let small = ops.len() == 4
        && ops.iter().any(|o| matches!(o, Op::AddFdb(..)))
        && ops.iter().any(|o| matches!(o, Op::AddNeigh(..)))
        && ops
            .iter()
            .filter(|o| matches!(o, Op::SetLb { fresh: false, changed, .. } if changed.len() == 1))
            .count()
            == 2;
    if !small {
        return Err(format!(
            "a new endpoint should be 4 small operations: {ops:#?}"
        ));
    }

    Ok(())
}

/// Something else deletes an FDB entry, a load balancer and a task's
/// interface, then the VXLAN device: all put back.
async fn puts_back_what_was_removed<B: Backend>(
    b: &mut B,
    names: &Names,
    seen: &Kernel,
) -> Result<(), String> {
    let (t1, t2, more) = (T1, T2, more_plan());
    let net_ns = names.network("0123456789abcdef");
    let fdb = seen.namespaces[&net_ns]
        .fdb
        .iter()
        .next()
        .cloned()
        .ok_or("no FDB entry")?;
    for op in [
        Op::SetLb {
            ns: names.task(t1),
            lb: BTreeMap::new(),
            changed: BTreeSet::new(),
            fresh: true,
        },
        Op::DelFdb(net_ns.clone(), fdb),
        Op::DelLink {
            ns: names.task(t2),
            name: "eth0".into(),
        },
    ] {
        b.apply(&op).await.map_err(|e| format!("tampering: {e}"))?;
    }
    step(b, &more, names, "after tampering").await?;
    // The VXLAN device goes, and with it the tasks' macvlans on it, its
    // FDB and neighbour entries: all put back, the device first.
    let gone = Op::DelLink {
        ns: net_ns.clone(),
        name: crate::render::VXLAN.into(),
    };
    b.apply(&gone)
        .await
        .map_err(|e| format!("tampering: {e}"))?;
    let seen = b.observe(&names.prefix).await.map_err(|e| e.to_string())?;
    if seen.namespaces[&names.task(t1)].links.contains_key("eth0") {
        return Err("a task's macvlan outlived its VXLAN device".into());
    }
    step(b, &more, names, "after the VXLAN device was deleted").await?;

    Ok(())
}

/// Leftovers of a crash: a stale namespace and a stale host link go.
async fn removes_leftovers<B: Backend>(b: &mut B, names: &Names) -> Result<(), String> {
    let more = more_plan();
    let stale_ns = format!("{}n-stale", names.prefix);
    let stale_link = Op::AddLink {
        ns: HOST,
        name: "shoalstale0".into(),
        link: Link {
            kind: LinkKind::Bridge,
            mtu: 1500,
            mac: None,
            master: None,
            addrs: BTreeSet::new(),
            up: false,
            isolated: false,
        },
    };
    for op in [Op::AddNetns(stale_ns.clone()), stale_link] {
        b.apply(&op).await.map_err(|e| format!("leftovers: {e}"))?;
    }
    step(b, &more, names, "with leftovers").await?;
    let seen = b.observe(&names.prefix).await.map_err(|e| e.to_string())?;
    let host_links: BTreeMap<_, _> = seen
        .namespaces
        .get(&HOST)
        .map(|h| h.links.clone())
        .unwrap_or_default();
    if seen.namespaces.contains_key(&Ns::named(stale_ns.clone()))
        || host_links.contains_key("shoalstale0")
    {
        return Err("leftovers were not removed".into());
    }

    Ok(())
}

/// A task goes: its sandbox goes (and its macvlan with it); nothing
/// planned: nothing left.
async fn removes_what_is_no_longer_planned<B: Backend>(
    b: &mut B,
    names: &Names,
) -> Result<(), String> {
    let (t1, t2) = (T1, T2);
    let fewer = sample_plan(&[(t1, 2)], &[remote(4, 2), remote(5, 3), remote(6, 3)]);
    step(b, &fewer, names, "a task removed").await?;
    let seen = b.observe(&names.prefix).await.map_err(|e| e.to_string())?;
    if seen.namespaces.contains_key(&names.task(t2)) {
        return Err("the removed task's sandbox is still there".into());
    }

    // Nothing planned: nothing left.
    step(b, &NodePlan::default(), names, "empty plan").await?;
    let seen = b.observe(&names.prefix).await.map_err(|e| e.to_string())?;
    if seen.namespaces.keys().any(|n| *n != HOST) {
        return Err(format!(
            "namespaces left: {:?}",
            seen.namespaces.keys().collect::<Vec<_>>()
        ));
    }
    Ok(())
}
