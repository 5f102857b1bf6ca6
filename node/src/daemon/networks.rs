//! `network create|ls|inspect|rm`: the CLI sends the spec as parsed; this
//! refuses what Shoal does not carry out and what clashes with this node's
//! routes, then lets the store's `apply` validate and allocate.

use anyhow::anyhow;
use shoal_mesh::cidr::Ipv4Net;
use shoal_mesh::network::{Driver, Network, NetworkSpec};
use shoal_mesh::{ClusterState, Command, NetworkId};

use super::agent::Daemon;
use super::clock::now_ms;
use crate::api::{ApiError, Reply};
use crate::views::{Named, NetworkView};

/// A network as `network ls` and `inspect` show it. Field names are stable.
pub fn view(n: &Network) -> NetworkView {
    NetworkView {
        id: n.id.to_string(),
        name: n.spec.name.clone(),
        driver: n.spec.driver,
        scope: if n.spec.driver == Driver::Overlay {
            "swarm"
        } else {
            "local"
        }
        .to_owned(),
        subnets: n.subnets.iter().map(|s| s.subnet.to_string()).collect(),
        gateways: n.subnets.iter().map(|s| s.gateway.to_string()).collect(),
        ip_range: n.spec.ip_range.map(|r| r.to_string()),
        aux_addresses: n.spec.aux_addresses.clone(),
        vni: n.vni,
        mtu: n.mtu,
        attachable: n.spec.attachable,
        internal: n.spec.internal,
        ingress: n.ingress,
        options: n.spec.options.clone(),
        labels: n.spec.labels.clone(),
        created_at_ms: n.created_at_ms,
    }
}

fn resolve<'a>(state: &'a ClusterState, reference: &str) -> anyhow::Result<&'a Network> {
    state.resolve_network(reference).ok_or_else(|| {
        ApiError::not_found(format!(
            "no such network: `{reference}` (use `shoal network ls` to see the networks)"
        ))
    })
}

/// Refuses, before anything is written, a driver this node's kernel lacks
/// or a parent interface it does not have (macvlan; ipvlan is refused on
/// every kernel by `NetworkSpec::check_supported`).
async fn check_driver(spec: &NetworkSpec) -> anyhow::Result<()> {
    let (name, config) = match spec.driver {
        Driver::Macvlan => ("macvlan", "CONFIG_MACVLAN"),
        _ => return Ok(()),
    };
    if !super::executor::is_root() {
        return Ok(());
    }
    if let Err(e) = shoal_netdriver::linux::probe_driver(name).await {
        return Err(ApiError::invalid(format!(
            "the {name} driver is not available in this node's kernel ({config} is off or the module is missing): {e}; use -d overlay or -d bridge"
        )));
    }
    if let Some(parent) = spec.options.get("parent")
        && !shoal_netdriver::linux::link_exists(parent).await
    {
        return Err(ApiError::invalid(format!(
            "parent interface `{parent}` does not exist on this node (-o parent=IFACE)"
        )));
    }
    Ok(())
}

/// This node's routes (not Shoal's, not the default one) and gateway
/// subnet that a network of `spec` must stay clear of: none for
/// macvlan/ipvlan, which are meant to share their parent's LAN, and none
/// when not root (nothing to program).
async fn routes_to_avoid(spec: &NetworkSpec, gateway: Option<&str>) -> Vec<(Ipv4Net, String)> {
    if spec.driver.shares_parent_lan() || !super::executor::is_root() {
        return Vec::new();
    }
    super::gateway::node_routes(gateway.and_then(|g| g.parse().ok()))
        .await
        .unwrap_or_else(|gateway_only| gateway_only)
}

/// The routes among `routes` that overlap the cluster's default address
/// pool: the only ones the pool's allocation has to steer around (a host
/// with a large routing table does not put it all into the store).
fn in_pool(state: &shoal_mesh::state::ClusterState, routes: &[(Ipv4Net, String)]) -> Vec<Ipv4Net> {
    let pool = state
        .cluster
        .as_ref()
        .map(|c| c.default_addr_pool.clone())
        .unwrap_or_default();
    routes
        .iter()
        .map(|(r, _)| *r)
        .filter(|r| pool.iter().any(|p| p.overlaps(r)))
        .collect()
}

/// Refuses an explicit subnet that overlaps a route of this node (its
/// underlay, a VPN…): tasks on it could not reach that part of the world,
/// and its traffic could leak onto it. (A subnet from the pool is chosen
/// around them: `Command::CreateNetwork::avoid`.)
fn check_host_routes(spec: &NetworkSpec, routes: &[(Ipv4Net, String)]) -> anyhow::Result<()> {
    for want in &spec.subnets {
        if let Some((route, dev)) = routes.iter().find(|(r, _)| r.overlaps(&want.subnet)) {
            return Err(ApiError::conflict(format!(
                "subnet {} overlaps this node's route {route} dev {dev}: choose another --subnet",
                want.subnet
            )));
        }
    }
    Ok(())
}

/// `network create`.
pub async fn create(d: &Daemon, spec: NetworkSpec) -> anyhow::Result<Reply> {
    let m = d.member().await?;
    spec.check_supported()?;
    check_driver(&spec).await?;
    let routes = routes_to_avoid(&spec, d.cfg.dataplane.gateway_subnet.as_deref()).await;
    check_host_routes(&spec, &routes)?;
    let id = NetworkId::new(shoal_mesh::ids::to_hex(&rand::random::<[u8; 8]>()));
    let name = spec.name.clone();
    m.propose(Command::CreateNetwork {
        id: id.clone(),
        spec,
        created_at_ms: now_ms(),
        avoid: in_pool(&m.state.state(), &routes),
    })
    .await?;
    m.wait_for(std::time::Duration::from_secs(5), |s| {
        s.networks.contains_key(&id)
    })
    .await;
    let state = m.state.state();
    let n = state.networks.get(&id).ok_or_else(|| {
        anyhow!("network `{name}` was created but has not reached this node's copy yet")
    })?;
    Reply::of(&view(n))
}

/// `network ls`.
pub async fn ls(d: &Daemon) -> anyhow::Result<Reply> {
    let m = d.member().await?;
    let state = m.state.state();
    let mut nets: Vec<&Network> = state.networks.values().collect();
    nets.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
    let views: Vec<NetworkView> = nets.into_iter().map(view).collect();
    Reply::of(&views)
}

/// `network inspect`.
pub async fn inspect(d: &Daemon, reference: &str) -> anyhow::Result<Reply> {
    let m = d.member().await?;
    let state = m.state.state();
    Reply::of(&view(resolve(&state, reference)?))
}

/// `network rm`.
pub async fn rm(d: &Daemon, reference: &str) -> anyhow::Result<Reply> {
    let m = d.member().await?;
    let state = m.state.state();
    let n = resolve(&state, reference)?;
    m.propose(Command::RemoveNetwork { id: n.id.clone() })
        .await?;
    Reply::of(&Named {
        id: n.id.to_string(),
        name: n.spec.name.clone(),
    })
}
