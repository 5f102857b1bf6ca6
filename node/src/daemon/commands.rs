//! The local API's requests, carried out.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use openraft::BasicNode;

use serde_json::json;
use shoal_gossip::MemberState;
use shoal_mesh::state::{
    DEFAULT_CERT_EXPIRY_MS, JoinSecrets, MAX_CERT_EXPIRY_MS, MIN_CERT_EXPIRY_MS,
};
use shoal_mesh::{Availability, ClusterInfo, ClusterState, Command, JoinToken, Node, NodeId, Role};

use super::agent::{Daemon, NOT_IN_SWARM};
use super::autolock::UnlockKey;
use super::clock::now_ms;
use super::config::parse_advertise;
use super::gossip::GossipCmd;
use super::identity::{Identity, NodeFile};
use super::liveness::NodeStatus;
use super::member::Member;
use super::pki;
use super::transport::{TlsIdentity, join_call};
use crate::api::{ApiError, HostPort, Reply, Request};
use crate::views::{JoinTokenView, JoinedView, NodeChange, NodeView, SwarmInitView};
use shoal_mesh::wire::{self, JoinReply, JoinRequest};

/// How long `swarm join` waits for the manager.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

fn view(m: &Member, n: &Node, gossip: Option<MemberState>) -> NodeView {
    let status = m.status(n.id);
    let manager_status = (n.role == Role::Manager).then(|| {
        if m.leader() == Some(n.id) {
            "leader"
        } else if status == NodeStatus::Ready {
            "reachable"
        } else {
            "unreachable"
        }
        .to_owned()
    });
    let (resources, (nano_cpus, memory_bytes)) = m.state.read(|d| {
        (
            d.state.ext.node_resources.get(&n.id).copied(),
            shoal_mesh::orchestrator::reserved_on(&d.state, n.id),
        )
    });
    NodeView {
        resources,
        reserved: shoal_mesh::NodeResources {
            nano_cpus,
            memory_bytes,
        },
        id: n.id.to_string(),
        hostname: n.hostname.clone(),
        role: n.role,
        status,
        availability: n.availability,
        manager_status,
        addr: n.addr.clone(),
        labels: n.labels.clone(),
        gossip,
        downs: m.live.downs(n.id),
        is_self: n.id == m.id,
        joined_at_ms: n.joined_at_ms,
    }
}

/// Refuses `req` on a node that is in a swarm but not a manager of it (as
/// its copy of the store says) when only managers serve it. The managers
/// check again whatever reaches them.
async fn check_role(d: &Daemon, req: &Request) -> anyhow::Result<()> {
    if !req.needs_manager() {
        return Ok(());
    }
    let Some(m) = d.member.lock().await.clone() else {
        return Ok(()); // each request says it needs a swarm
    };
    let role = m.state.read(|s| s.state.nodes.get(&m.id).map(|n| n.role));
    if role == Some(Role::Manager) {
        Ok(())
    } else {
        Err(ApiError::not_in_swarm(crate::api::NOT_A_MANAGER))
    }
}

/// `--cert-expiry` checked against this manager's bounds: at least
/// `[pki] min_cert_expiry_s`, at most ten years.
fn check_cert_expiry(d: &Daemon, ms: u64) -> anyhow::Result<u64> {
    let min = d.cfg.pki.min_cert_expiry_s.max(MIN_CERT_EXPIRY_MS / 1000) * 1000;
    if !(min..=MAX_CERT_EXPIRY_MS).contains(&ms) {
        return Err(ApiError::invalid(format!(
            "--cert-expiry {ms} ms is out of bounds: use at least {} s and at most {} h, e.g. 2160h (90 days)",
            min / 1000,
            MAX_CERT_EXPIRY_MS / 3_600_000
        )));
    }
    Ok(ms)
}

/// `swarm update`: the swarm's settings (nodes pick a new certificate
/// validity up at their next renewal; autolock seals or unseals each
/// manager's keys as soon as it applies the change).
async fn swarm_update(
    d: &Daemon,
    cert_expiry_ms: Option<u64>,
    autolock: Option<bool>,
) -> anyhow::Result<Reply> {
    let m = d.member().await?;
    if cert_expiry_ms.is_none() && autolock.is_none() {
        return Err(ApiError::invalid(
            "nothing to update: give --cert-expiry DURATION or --autolock=true|false",
        ));
    }
    let mut said = Vec::new();
    if let Some(ms) = cert_expiry_ms {
        m.propose(Command::SetCertExpiry {
            ms: check_cert_expiry(d, ms)?,
        })
        .await?;
        said.push(format!(
            "node certificates are valid for {} s from their next renewal",
            ms / 1000
        ));
    }
    let mut unlock_key = None;
    if let Some(on) = autolock {
        unlock_key = super::unlock::set(&m, on).await?.map(|k| k.to_string());
        said.push(format!("autolock is {}", if on { "on" } else { "off" }));
    }
    Reply::of(&crate::views::SwarmUpdatedView {
        message: format!("Swarm updated: {}.", said.join("; ")),
        unlock_key,
    })
}

/// Carries out one API request.
pub async fn handle(d: &Arc<Daemon>, req: Request) -> Reply {
    if d.is_locked() && !req.served_when_locked() {
        let e = ApiError::locked(super::unlock::LOCKED);
        return Reply::err(super::kinds::kind_of(&e), format!("{e:#}"));
    }
    if let Err(e) = check_role(d, &req).await {
        return Reply::err(super::kinds::kind_of(&e), format!("{e:#}"));
    }
    let result = match req {
        Request::Info => info(d).await,
        Request::SwarmInit {
            force_new_cluster: true,
            ..
        } => super::recovery::force_new_cluster(d).await,
        Request::SwarmInit {
            advertise_addr,
            listen_addr,
            default_addr_pool,
            default_addr_pool_mask_length,
            cert_expiry_ms,
            autolock,
            ..
        } => {
            let pool = (&default_addr_pool[..], default_addr_pool_mask_length);
            let settings = (cert_expiry_ms, autolock);
            init(d, (advertise_addr, listen_addr), pool, settings).await
        }
        Request::SwarmUpdate {
            cert_expiry_ms,
            autolock,
        } => swarm_update(d, cert_expiry_ms, autolock).await,
        Request::ImageLoad { path } => image_load(d, path).await,
        Request::ImageLs => image_ls(d).await,
        Request::ImageRm { image } => image_rm(d, &image).await,
        Request::ImagePull { image } => image_pull(d, &image).await,
        Request::SwarmUnlock { key } => super::unlock::unlock(d, &key).await,
        Request::UnlockKey { rotate } => super::unlock::unlock_key(d, rotate).await,
        Request::NetworkCreate(spec) => super::networks::create(d, *spec).await,
        Request::NetworkLs => super::networks::ls(d).await,
        Request::ServiceCreate { spec, networks } => {
            super::services::create(d, *spec, &networks).await
        }
        Request::ServiceUpdate(args) => super::services::update(d, *args).await,
        Request::TaskExec { task } => super::services::task_exec(d, &task).await,
        Request::TaskExecIn {
            task,
            command,
            stdio,
        } => super::services::task_exec_in(d, &task, command, stdio).await,
        Request::ServiceLs => super::services::ls(d).await,
        Request::ServicePs { service } => super::services::ps(d, &service).await,
        Request::ServiceInspect { service } => super::services::inspect(d, &service).await,
        Request::ServiceRm { service } => super::services::rm(d, &service).await,
        Request::ServiceLogs { service, offsets } => {
            super::services::logs(d, &service, &offsets).await
        }
        Request::ServiceScale { service, replicas } => {
            super::services::scale(d, &service, replicas).await
        }
        Request::NetworkInspect { network } => super::networks::inspect(d, &network).await,
        Request::NetworkRm { network } => super::networks::rm(d, &network).await,
        Request::SwarmJoin {
            token,
            remote,
            advertise_addr,
            listen_addr,
        } => join(d, &token, remote, advertise_addr, listen_addr).await,
        Request::JoinToken { role, rotate } => join_token(d, role, rotate).await,
        Request::SwarmLeave { force } => leave(d, force).await,
        Request::NodeLs => node_ls(d).await,
        Request::NodeInspect { node } => node_inspect(d, &node).await,
        Request::NodePromote { node } => set_role(d, &node, Role::Manager).await,
        Request::NodeDemote { node } => set_role(d, &node, Role::Worker).await,
        Request::NodeUpdate {
            node,
            availability,
            label_add,
            label_rm,
        } => node_update(d, &node, availability, label_add, label_rm).await,
        Request::NodeRm { node, force } => node_rm(d, &node, force).await,
        Request::SwarmCa { rotate } => super::ca::swarm_ca(d, rotate).await,
        debug => debug_request(d, debug).await,
    };
    match result {
        Ok(reply) => reply,
        Err(e) => Reply::err(super::kinds::kind_of(&e), format!("{e:#}")),
    }
}

/// The `debug` requests.
async fn debug_request(d: &Arc<Daemon>, req: Request) -> anyhow::Result<Reply> {
    match req {
        Request::DebugDataplane { network } => debug_dataplane(d, network).await,
        Request::DebugRun {
            image,
            netns,
            args,
            limits,
        } => debug_run(d, &image, netns, (args, limits)).await,
        Request::DebugDns { task, name } => debug_dns(d, &task, &name).await,
        Request::DebugGossip { network } => gossip_ask(d, |tx| GossipCmd::Dump(network, tx))
            .await
            .map(Reply::ok),
        Request::DebugGossipJoin { network } => gossip_do(d, GossipCmd::Join(network)).await,
        Request::DebugGossipLeave { network } => gossip_do(d, GossipCmd::Leave(network)).await,
        Request::DebugGossipPut {
            network,
            table,
            key,
            value,
        } => gossip_ask(d, |reply| GossipCmd::Put {
            network,
            table,
            key,
            value,
            reply,
        })
        .await
        .and_then(|r| Ok(r.map(|()| Reply::ok(json!({})))?)),
        Request::DebugGossipDelete {
            network,
            table,
            key,
        } => gossip_ask(d, |reply| GossipCmd::Delete {
            network,
            table,
            key,
            reply,
        })
        .await
        .and_then(|r| Ok(r.map(|()| Reply::ok(json!({})))?)),
        other => Err(ApiError::invalid(format!("not a debug request: {other:?}"))),
    }
}

/// Warnings for reads served from a local copy that may be behind.
fn staleness(m: &Member) -> Vec<String> {
    let state = m.state.state();
    if state.cluster.is_some() && !state.nodes.contains_key(&m.id) {
        return vec![
            "this node has been removed from the swarm by a manager: run `shoal swarm leave` to reset it".to_owned(),
        ];
    }
    let (reachable, total) = m.manager_reachability(&state);
    let fresh =
        reachable > total / 2 && m.leader().is_some_and(|l| m.status(l) == NodeStatus::Ready);
    if fresh {
        Vec::new()
    } else {
        vec![format!(
            "no contact with a leader ({reachable} of {total} managers reachable): this is this node's local copy and may be stale"
        )]
    }
}

async fn info(d: &Daemon) -> anyhow::Result<Reply> {
    let containerd = d.engine.status().await;
    let Some(m) = d.member.lock().await.clone() else {
        if d.is_locked() {
            let node = d.dir.node_file().ok().flatten();
            return Ok(Reply::ok(json!({
                "swarm": "locked",
                "hostname": d.hostname,
                "node_id": node.as_ref().map(|n| n.node_id.to_string()),
                "cluster_id": node.map(|n| n.cluster_id),
                "containerd": containerd,
            })));
        }
        return Ok(Reply::ok(json!({
            "swarm": "inactive",
            "hostname": d.hostname,
            "containerd": containerd,
        })));
    };
    if let Some(why) = m.failed() {
        return Ok(Reply::ok(json!({
            "swarm": "error",
            "error": why,
            "hostname": d.hostname,
            "node_id": m.id.to_string(),
            "containerd": containerd,
        })));
    }
    let state = m.state.state();
    let metrics = m.raft.metrics().borrow().clone();
    let role = state.nodes.get(&m.id).map(|n| n.role);
    let warnings = m.sandboxes.warnings();
    // This node's certificate, as its state dir holds it, and which of the
    // CAs it knows issued it.
    let certificate = d.dir.certificates().ok().map(|(ca_der, cert_der)| {
        let mut cas = state.trusted_cas();
        cas.push(&ca_der);
        let issuer = cas.into_iter().find(|ca| pki::issued_by(&cert_der, ca));
        json!({
            "expires_at_ms": pki::expires_at_ms(&cert_der).ok(),
            "issuer_fingerprint": issuer.map(pki::fingerprint),
        })
    });
    let mut reply = Reply::ok(json!({
        "swarm": "active",
        "certificate": certificate,
        "node_id": m.id.to_string(),
        "hostname": d.hostname,
        "cluster_id": state.cluster.as_ref().map(|c| c.id.clone()),
        "role": role,
        "is_leader": m.leader() == Some(m.id),
        "leader": m.leader().map(|l| l.to_string()),
        "nodes": state.nodes.len(),
        "managers": state.managers().count(),
        "dataplane": m.sandboxes.status(),
        "dataplane_error": m.sandboxes.error(),
        "dataplane_warnings": warnings,
        "stalled_peers": m.quic.stalled.view(),
        "clock": m.live.clock_view(),
        "containerd": containerd,
        "raft": {
            "term": metrics.current_term,
            "last_log_index": metrics.last_log_index,
            "last_applied": metrics.last_applied.map(|l| l.index),
            "voters": metrics.membership_config.membership().voter_ids().map(|v| NodeId(v).to_string()).collect::<Vec<_>>(),
        },
    }));
    reply.warnings = warnings;
    if let Some(w) = m.live.clock_view()["warning"].as_str() {
        reply.warnings.push(w.to_owned());
    }
    Ok(reply)
}

/// Picks the listen and advertise addresses for init and join.
fn addresses(
    d: &Daemon,
    advertise: Option<HostPort>,
    listen: Option<HostPort>,
    route_to: Option<SocketAddr>,
) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let listen: SocketAddr = match listen {
        Some(l) => l.or_port(d.cfg.listen_addr.port()),
        None => d.cfg.listen_addr,
    };
    // The configuration file's advertise address is the daemon's own
    // setting (checked when the daemon started).
    let configured = || {
        let a = d.cfg.advertise_addr.as_deref()?;
        parse_advertise(a, listen.port()).ok()
    };
    let advertise = match advertise
        .map(|a| a.or_port(listen.port()))
        .or_else(configured)
    {
        Some(a) => a,
        None if !listen.ip().is_unspecified() => listen,
        None => {
            // The address this host would use to reach the manager.
            let ip = route_to.and_then(|r| {
                let s = std::net::UdpSocket::bind((listen.ip(), 0)).ok()?;
                s.connect(r).ok()?;
                s.local_addr().ok().map(|a| a.ip())
            });
            match ip {
                Some(ip) => SocketAddr::new(ip, listen.port()),
                None => {
                    return Err(ApiError::invalid(format!(
                        "cannot choose an address to advertise while listening on {listen}: pass --advertise-addr IP[:PORT]"
                    )));
                }
            }
        }
    };
    if advertise.ip().is_unspecified() {
        return Err(ApiError::invalid(format!(
            "the advertise address {advertise} is unspecified: pass a reachable --advertise-addr"
        )));
    }
    // Fail now, not after the cluster has counted us in, if the port is taken.
    std::net::UdpSocket::bind(listen).map_err(|e| {
        ApiError::conflict(format!(
            "cannot listen on {listen} (UDP): {e}; is another node using that port?"
        ))
    })?;
    Ok((listen, advertise))
}

/// `--default-addr-pool` and its mask, checked; 10.0.0.0/8 in /24s by default.
fn address_pool(
    pool: &[shoal_mesh::cidr::Ipv4Net],
    mask: Option<u8>,
) -> anyhow::Result<(Vec<shoal_mesh::cidr::Ipv4Net>, u8)> {
    let pool: Vec<shoal_mesh::cidr::Ipv4Net> = if pool.is_empty() {
        vec!["10.0.0.0/8".parse()?]
    } else {
        pool.to_vec()
    };
    let mask = mask.unwrap_or(24);
    if let Some(p) = pool.iter().find(|p| p.prefix_len() > mask) {
        return Err(ApiError::invalid(format!(
            "--default-addr-pool-mask-length {mask} is shorter than the pool {p}: use a length of at least {}",
            p.prefix_len()
        )));
    }
    if mask > 29 {
        return Err(ApiError::invalid(format!(
            "--default-addr-pool-mask-length {mask} leaves no room for tasks: use 29 or less"
        )));
    }
    Ok((pool, mask))
}

/// What `swarm init` makes before anything starts: the cluster's facts
/// (CA, sealed keys and token secrets), its first node, this node's
/// identity, and the two join tokens.
struct NewSwarm {
    cert_expiry_ms: u64,
    /// With `--autolock`: the unlock key, and sealed with the managers' key
    /// for the store.
    autolock: Option<(UnlockKey, Vec<u8>)>,
    cluster: ClusterInfo,
    first: Node,
    identity: Identity,
    worker: JoinToken,
    manager: JoinToken,
}

/// A new swarm's CA, keys and tokens, with this node as its first manager.
fn new_swarm(
    d: &Daemon,
    listen: SocketAddr,
    advertise: SocketAddr,
    (default_addr_pool, default_pool_mask): (Vec<shoal_mesh::cidr::Ipv4Net>, u8),
    (cert_expiry_ms, autolock): (u64, bool),
) -> anyhow::Result<NewSwarm> {
    let (ca_der, ca_key) = pki::new_ca()?;
    let (key_der, csr) = pki::new_key_and_csr()?;
    let node_id = NodeId(rand::random::<u64>().max(1));
    let validity = Duration::from_millis(cert_expiry_ms);
    let cert_der = pki::sign_node_csr(&ca_der, &ca_key, &csr, node_id, Role::Manager, validity)?;
    let manager_key: [u8; 32] = rand::random();
    let autolock = autolock.then(|| {
        let key = UnlockKey::random();
        (key, pki::seal(&manager_key, &key.0))
    });
    let fingerprint = pki::fingerprint(&ca_der);
    let token = || JoinToken {
        ca_fingerprint: fingerprint.clone(),
        secret: pki::new_secret(),
    };
    let (worker, manager) = (token(), token());
    let cluster_id = shoal_mesh::ids::to_hex(&rand::random::<[u8; 8]>());
    let cluster = ClusterInfo {
        id: cluster_id.clone(),
        created_at_ms: now_ms(),
        ca_cert_der: ca_der.clone(),
        ca_fingerprint: fingerprint.clone(),
        tokens: JoinSecrets {
            worker_hash: pki::secret_hash(&worker.secret),
            manager_hash: pki::secret_hash(&manager.secret),
            worker_sealed: pki::seal(&manager_key, worker.to_string().as_bytes()),
            manager_sealed: pki::seal(&manager_key, manager.to_string().as_bytes()),
        },
        sealed_ca_key: pki::seal(&manager_key, &ca_key),
        default_addr_pool,
        default_pool_mask,
    };
    let first = Node {
        id: node_id,
        hostname: d.hostname.clone(),
        role: Role::Manager,
        availability: Availability::Active,
        labels: Default::default(),
        addr: advertise.to_string(),
        joined_at_ms: now_ms(),
    };
    let identity = Identity {
        node: NodeFile {
            node_id,
            cluster_id,
            listen_addr: listen,
            advertise_addr: advertise,
            join_managers: Vec::new(),
            join_via: None,
        },
        tls: TlsIdentity {
            ca_der,
            cert_der,
            key_der,
        },
        manager_key: Some(manager_key),
        unlock_key: autolock.as_ref().map(|(k, _)| k.0),
        raft_key: rand::random(),
    };
    Ok(NewSwarm {
        cert_expiry_ms,
        autolock,
        cluster,
        first,
        identity,
        worker,
        manager,
    })
}

/// Starts the first member: Raft with this node as its only voter, then
/// the store's first entry. A member that fails to get there is stopped.
async fn bootstrap(d: &Daemon, new: &NewSwarm) -> anyhow::Result<Arc<Member>> {
    let m = d.start_member(new.identity.clone()).await?;
    let advertise = new.identity.node.advertise_addr;
    let boot = async {
        m.raft
            .initialize(std::collections::BTreeMap::from([(
                new.first.id.0,
                BasicNode::new(advertise.to_string()),
            )]))
            .await?;
        let ingress_id = shoal_mesh::ids::to_hex(&rand::random::<[u8; 8]>());
        m.propose(Command::Init {
            cluster: new.cluster.clone(),
            first: new.first.clone(),
            ingress_id: ingress_id.into(),
        })
        .await?;
        m.propose(Command::SetCertExpiry {
            ms: new.cert_expiry_ms,
        })
        .await?;
        if let Some((_, sealed)) = &new.autolock {
            m.propose(Command::SetAutolock {
                sealed_unlock_key: Some(sealed.clone()),
            })
            .await?;
        }
        anyhow::Ok(())
    };
    match boot.await {
        Ok(()) => Ok(m),
        Err(e) => {
            m.shutdown().await;
            Err(e)
        }
    }
}

async fn init(
    d: &Arc<Daemon>,
    (advertise, listen): (Option<HostPort>, Option<HostPort>),
    (pool, pool_mask): (&[shoal_mesh::cidr::Ipv4Net], Option<u8>),
    (cert_expiry_ms, autolock): (Option<u64>, bool),
) -> anyhow::Result<Reply> {
    let expiry = check_cert_expiry(d, cert_expiry_ms.unwrap_or(DEFAULT_CERT_EXPIRY_MS))?;
    let mut slot = d.member.lock().await;
    if let Some(m) = slot.as_ref() {
        let cluster = m
            .state
            .read(|s| s.state.cluster.as_ref().map(|c| c.id.clone()));
        return Err(ApiError::conflict(format!(
            "this node is already part of a swarm (cluster {}); run `shoal swarm leave` first",
            cluster.unwrap_or_default()
        )));
    }
    let pool = address_pool(pool, pool_mask)?;
    let (listen, advertise) = addresses(d, advertise, listen, None)?;
    let new = new_swarm(d, listen, advertise, pool, (expiry, autolock))?;
    d.dir.save(&new.identity)?;
    let m = match bootstrap(d, &new).await {
        Ok(m) => m,
        Err(e) => {
            let _ = d.dir.wipe();
            return Err(e.context("swarm init failed; nothing was kept"));
        }
    };
    *slot = Some(m);
    Reply::of(&SwarmInitView {
        node_id: new.first.id.to_string(),
        cluster_id: new.cluster.id.clone(),
        advertise_addr: advertise.to_string(),
        worker_token: new.worker.to_string(),
        manager_token: new.manager.to_string(),
        unlock_key: new.autolock.as_ref().map(|(k, _)| k.to_string()),
    })
}

async fn join(
    d: &Arc<Daemon>,
    token: &JoinToken,
    remote: HostPort,
    advertise: Option<HostPort>,
    listen: Option<HostPort>,
) -> anyhow::Result<Reply> {
    let remote_addr = remote.or_port(super::config::DEFAULT_PORT);
    let mut slot = d.member.lock().await;
    if slot.is_some() {
        return Err(ApiError::conflict(
            "this node is already part of a swarm; run `shoal swarm leave` first",
        ));
    }
    let (listen, advertise) = addresses(d, advertise, listen, Some(remote_addr))?;
    let (key_der, csr_der) = pki::new_key_and_csr()?;
    let req = shoal_mesh::codec::encode(&JoinRequest {
        secret: token.secret.clone(),
        csr_der,
        hostname: d.hostname.clone(),
        advertise_addr: advertise.to_string(),
    })?;
    let reply = join_call(remote_addr, &token.ca_fingerprint, &req, JOIN_TIMEOUT)
        .await
        .map_err(|e| match e {
            super::transport::QuicError::Timeout { secs, .. } => ApiError::unavailable(format!(
                "timed out after {secs:.0} s waiting for the manager at {remote_addr}: check the address and that its UDP port is reachable"
            )),
            other => ApiError::unavailable(format!("cannot join through {remote_addr}: {other}")),
        })?;
    let accepted = match shoal_mesh::codec::decode::<JoinReply>(&reply, 1 << 20)
        .context("the manager's answer is not a valid join reply")?
    {
        JoinReply::Accepted(a) => a,
        JoinReply::Refused(msg) => {
            return Err(ApiError::conflict(format!(
                "join refused by {remote_addr}: {msg}"
            )));
        }
    };
    let wire::JoinAccepted {
        node_id,
        cluster_id,
        role,
        cert_der,
        ca_der,
        manager_key,
        managers,
        via,
    } = accepted;
    if pki::fingerprint(&ca_der) != token.ca_fingerprint {
        return Err(ApiError::conflict(
            "the manager sent a CA that does not match the join token; refusing to join",
        ));
    }
    let identity = Identity {
        node: NodeFile {
            node_id,
            cluster_id: cluster_id.clone(),
            listen_addr: listen,
            advertise_addr: advertise,
            join_managers: managers,
            join_via: Some((via, remote_addr)),
        },
        tls: TlsIdentity {
            ca_der,
            cert_der,
            key_der,
        },
        manager_key,
        unlock_key: None,
        raft_key: rand::random(),
    };
    d.dir.save(&identity)?;
    let m = match d.start_member(identity).await {
        Ok(m) => m,
        Err(e) => {
            let _ = d.dir.wipe();
            return Err(
                e.context("joined, but cannot start this node's swarm state; nothing was kept")
            );
        }
    };
    // Wait until the store has reached us, so that `node ls` right after
    // `join` shows the swarm.
    let mut warnings = Vec::new();
    if !m
        .wait_for(Duration::from_secs(15), |s| s.nodes.contains_key(&node_id))
        .await
    {
        warnings.push(
            "joined, but the swarm's state has not reached this node yet; it will keep trying"
                .to_owned(),
        );
    }
    *slot = Some(m);
    let mut reply = Reply::of(&JoinedView {
        node_id: node_id.to_string(),
        cluster_id,
        role,
        advertise_addr: advertise.to_string(),
    })?;
    reply.warnings = warnings;
    Ok(reply)
}

fn require_manager(m: &Member, state: &ClusterState) -> anyhow::Result<()> {
    match state.nodes.get(&m.id).map(|n| n.role) {
        Some(Role::Manager) => Ok(()),
        _ => Err(ApiError::not_in_swarm(
            "this node is not a swarm manager: run this command on a manager",
        )),
    }
}

async fn join_token(d: &Daemon, role: Role, rotate: bool) -> anyhow::Result<Reply> {
    let m = d.member().await?;
    require_manager(&m, &m.state.state())?;
    let key = m.manager_key().ok_or_else(|| {
        ApiError::unavailable(
            "this manager has not received the managers' key yet; try again in a moment",
        )
    })?;
    if rotate {
        let fingerprint = m
            .state
            .read(|s| s.state.cluster.as_ref().map(|c| c.ca_fingerprint.clone()))
            .ok_or_else(|| ApiError::not_in_swarm(NOT_IN_SWARM))?;
        let token = JoinToken {
            ca_fingerprint: fingerprint,
            secret: pki::new_secret(),
        };
        m.propose(Command::RotateToken {
            role,
            hash: pki::secret_hash(&token.secret),
            sealed: pki::seal(&key, token.to_string().as_bytes()),
        })
        .await?;
    }
    let state = m.state.state();
    let cluster = state
        .cluster
        .as_ref()
        .ok_or_else(|| ApiError::not_in_swarm(NOT_IN_SWARM))?;
    let sealed = match role {
        Role::Manager => &cluster.tokens.manager_sealed,
        Role::Worker => &cluster.tokens.worker_sealed,
    };
    // The secret as sealed, with the CA as it is now (a CA rotation
    // changes every token's fingerprint, not its secret).
    let mut token: JoinToken = String::from_utf8(pki::unseal(&key, sealed)?)?.parse()?;
    token.ca_fingerprint.clone_from(&cluster.ca_fingerprint);
    let addr = state
        .nodes
        .get(&m.id)
        .map(|n| n.addr.clone())
        .unwrap_or_default();
    Reply::of(&JoinTokenView {
        role,
        token: token.to_string(),
        manager_addr: addr,
        rotated: rotate,
    })
}

/// Refuses to lose quorum: after `leaving` goes, a majority of the remaining
/// managers must still be reachable.
fn check_quorum_after(
    m: &Member,
    state: &ClusterState,
    leaving: NodeId,
    what: &str,
) -> anyhow::Result<()> {
    let remaining: Vec<&Node> = state.managers().filter(|n| n.id != leaving).collect();
    if remaining.len() == state.managers().count() {
        return Ok(());
    }
    let reachable = remaining
        .iter()
        .filter(|n| m.status(n.id) == NodeStatus::Ready)
        .count();
    let needed = remaining.len() / 2 + 1;
    if reachable < needed {
        return Err(ApiError::conflict(format!(
            "{what} would break quorum: {reachable} of the {} remaining managers are reachable and {needed} are needed. Use --force to do it anyway",
            remaining.len()
        )));
    }
    Ok(())
}

async fn leave(d: &Arc<Daemon>, force: bool) -> anyhow::Result<Reply> {
    let mut slot = d.member.lock().await;
    if d.is_locked() {
        return leave_locked(d).await;
    }
    let m = slot
        .clone()
        .ok_or_else(|| ApiError::not_in_swarm(NOT_IN_SWARM))?;
    let state = m.state.state();
    let me = state.nodes.get(&m.id);
    let mut warnings = Vec::new();
    let is_manager = me.is_some_and(|n| n.role == Role::Manager);
    if is_manager && state.managers().count() == 1 && !force {
        return Err(ApiError::conflict(
            "this node is the last manager of the swarm: leaving erases the swarm's state for good. Use --force to leave anyway",
        ));
    }
    if is_manager && !force {
        check_quorum_after(&m, &state, m.id, "leaving")?;
    }
    let last_manager = is_manager && state.managers().count() == 1;
    if me.is_some()
        && !last_manager
        && let Err(e) = m.propose(Command::RemoveNode(m.id)).await
    {
        if !force {
            return Err(anyhow!(e).context(
                "cannot leave (nothing changed); use --force to leave without telling the swarm",
            ));
        }
        warnings.push(format!("the swarm was not told of this departure ({e}); remove this node with `shoal node rm --force` on a manager"));
    }
    m.gossip.ask(GossipCmd::LeaveCluster).await;
    m.shutdown().await;
    *slot = None;
    super::executor::stop_all(&d.dir.0, &d.engine).await;
    super::dataplane::teardown(&m.sandboxes).await;
    d.dir.wipe()?;
    let mut reply = Reply::ok(json!({ "left": m.id.to_string() }));
    reply.warnings = warnings;
    Ok(reply)
}

/// An engine failure as the API reports it: containerd not answering is
/// "cannot answer now"; the rest is containerd's own refusal.
fn engine_error(e: super::engine::EngineError) -> anyhow::Error {
    use super::engine::EngineError;
    use super::registry::PullError;
    match e {
        EngineError::Unreachable { .. } | EngineError::Pull(PullError::Unreachable { .. }) => {
            ApiError::unavailable(e.to_string())
        }
        EngineError::Pull(PullError::NotFound(_)) => ApiError::not_found(e.to_string()),
        EngineError::Pull(PullError::Bad { .. }) => ApiError::invalid(e.to_string()),
        other => anyhow::Error::from(other),
    }
}

/// `image ls`.
async fn image_ls(d: &Daemon) -> anyhow::Result<Reply> {
    Reply::of(&d.engine.images().await.map_err(engine_error)?)
}

/// `image rm NAME`: the name as Docker reads it.
async fn image_rm(d: &Daemon, image: &str) -> anyhow::Result<Reply> {
    let name = super::archive::normalize(image).map_err(|e| ApiError::invalid(e.to_string()))?;
    if !d.engine.remove_image(&name).await.map_err(engine_error)? {
        return Err(ApiError::not_found(format!("no such image: {name}")));
    }
    Ok(Reply::ok(json!({ "removed": name })))
}

/// `image pull NAME`: the name as Docker reads it, from its registry.
async fn image_pull(d: &Daemon, image: &str) -> anyhow::Result<Reply> {
    let name = super::archive::normalize(image).map_err(|e| ApiError::invalid(e.to_string()))?;
    let (name, digest) = match name.split_once('@') {
        Some((n, dg)) => (n.to_owned(), Some(dg.to_owned())),
        None => (name, None),
    };
    Reply::of(
        &d.engine
            .pull(&name, digest.as_deref())
            .await
            .map_err(engine_error)?,
    )
}

/// `image load FILE`: reads and checks the archive (off the runtime's
/// workers), then writes it into containerd.
async fn image_load(d: &Daemon, path: std::path::PathBuf) -> anyhow::Result<Reply> {
    if !path.is_absolute() {
        return Err(ApiError::invalid(format!(
            "{}: give the archive's absolute path",
            path.display()
        )));
    }
    let file = std::fs::File::open(&path)
        .map_err(|e| ApiError::invalid(format!("cannot read {}: {e}", path.display())))?;
    let archive =
        tokio::task::spawn_blocking(move || super::archive::read(std::io::BufReader::new(file)))
            .await?
            .map_err(|e| ApiError::invalid(format!("{}: {e}", path.display())))?;
    Reply::of(&d.engine.load(&archive).await.map_err(engine_error)?)
}

/// `swarm leave --force` on a locked manager: its keys cannot be opened,
/// so it tells the swarm nothing (remove it with `node rm --force` on a
/// manager) and erases its state.
async fn leave_locked(d: &Daemon) -> anyhow::Result<Reply> {
    let node = d.dir.node_file()?.map(|n| n.node_id.to_string());
    super::executor::stop_all(&d.dir.0, &d.engine).await;
    d.dir.wipe()?;
    d.set_locked(false);
    let mut reply = Reply::ok(json!({ "left": node }));
    reply.warnings.push(
        "this locked manager left without telling the swarm: remove it with `shoal node rm --force` on a manager"
            .into(),
    );
    Ok(reply)
}

async fn debug_dataplane(d: &Daemon, network: Option<String>) -> anyhow::Result<Reply> {
    let m = d.member().await?;
    let v = super::dataplane::debug_dataplane(m.id, &m.sandboxes, network.as_deref()).await?;
    Ok(Reply::ok(v))
}

/// `debug run`: a one-off container, its output and exit status.
async fn debug_run(
    d: &Daemon,
    image: &str,
    netns: Option<std::path::PathBuf>,
    (args, limits): (Vec<String>, super::oci::Limits),
) -> anyhow::Result<Reply> {
    let image = super::archive::normalize(image).map_err(|e| ApiError::invalid(e.to_string()))?;
    if let Some(n) = &netns
        && !n.exists()
    {
        return Err(ApiError::invalid(format!(
            "--netns {}: no such network namespace",
            n.display()
        )));
    }
    let id = format!(
        "shoal-run-{}",
        shoal_mesh::ids::to_hex(&rand::random::<[u8; 6]>())
    );
    let dir = d.dir.0.join("run").join(&id);
    let one = super::containers::OneOff {
        id,
        image,
        args,
        netns,
        dir: dir.clone(),
        limits,
    };
    let ended = d.engine.run_once(&one).await;
    let _ = std::fs::remove_dir_all(&dir);
    match ended {
        Ok(e) => Reply::of(&e),
        Err(e @ super::engine::EngineError::NoImage(_)) => Err(ApiError::not_found(e.to_string())),
        Err(e @ super::engine::EngineError::Spec(_)) => Err(ApiError::invalid(e.to_string())),
        Err(e) => Err(engine_error(e)),
    }
}

async fn debug_dns(d: &Daemon, task: &str, name: &str) -> anyhow::Result<Reply> {
    let m = d.member().await?;
    Ok(Reply::ok(super::dataplane::debug_dns(
        &m.sandboxes,
        task,
        name,
    )?))
}

async fn gossip_ask<T>(
    d: &Daemon,
    make: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> GossipCmd,
) -> anyhow::Result<T> {
    let m = d.member().await?;
    m.gossip
        .ask(make)
        .await
        .ok_or_else(|| anyhow!("the gossip task did not answer; see the daemon log"))
}

async fn gossip_do(d: &Daemon, cmd: GossipCmd) -> anyhow::Result<Reply> {
    d.member().await?.gossip.send(cmd);
    Ok(Reply::ok(json!({})))
}

/// Gossip's view of every member, by node.
async fn gossip_states(m: &Member) -> BTreeMap<NodeId, MemberState> {
    m.gossip
        .ask(GossipCmd::Members)
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|i| (i.node_id, i.state))
        .collect()
}

async fn node_ls(d: &Daemon) -> anyhow::Result<Reply> {
    let m = d.member().await?;
    let state = m.state.state();
    let gossip = gossip_states(&m).await;
    let nodes: Vec<NodeView> = state
        .nodes
        .values()
        .map(|n| view(&m, n, gossip.get(&n.id).copied()))
        .collect();
    let mut reply = Reply::ok(serde_json::to_value(nodes)?);
    reply.warnings = staleness(&m);
    Ok(reply)
}

async fn node_inspect(d: &Daemon, reference: &str) -> anyhow::Result<Reply> {
    let m = d.member().await?;
    let state = m.state.state();
    let node = state.resolve_node(reference)?;
    let gossip = gossip_states(&m).await;
    let mut reply = Reply::ok(serde_json::to_value(view(
        &m,
        node,
        gossip.get(&node.id).copied(),
    ))?);
    reply.warnings = staleness(&m);
    Ok(reply)
}

async fn set_role(d: &Daemon, reference: &str, role: Role) -> anyhow::Result<Reply> {
    let m = d.member().await?;
    let state = m.state.state();
    let node = state.resolve_node(reference)?.clone();
    if role == Role::Worker && node.role == Role::Manager && state.managers().count() > 1 {
        check_quorum_after(&m, &state, node.id, "demoting this manager")?;
    }
    m.propose(Command::SetRole {
        node: node.id,
        role,
    })
    .await?;
    let verb = if role == Role::Manager {
        "promoted to a manager"
    } else {
        "demoted to a worker"
    };
    Ok(Reply::ok(serde_json::to_value(NodeChange {
        id: node.id.to_string(),
        message: Some(format!("node {} {verb}", node.hostname)),
    })?))
}

async fn node_update(
    d: &Daemon,
    reference: &str,
    availability: Option<Availability>,
    label_add: Vec<(String, String)>,
    label_rm: Vec<String>,
) -> anyhow::Result<Reply> {
    let m = d.member().await?;
    let node = m.state.state().resolve_node(reference)?.id;
    m.propose(Command::UpdateNode {
        node,
        availability,
        label_add,
        label_rm,
    })
    .await?;
    Reply::of(&NodeChange {
        id: node.to_string(),
        message: None,
    })
}

async fn node_rm(d: &Daemon, reference: &str, force: bool) -> anyhow::Result<Reply> {
    let m = d.member().await?;
    let state = m.state.state();
    let node = state.resolve_node(reference)?;
    if node.role == Role::Manager {
        return Err(ApiError::conflict(format!(
            "node {} is a manager: demote it first (`shoal node demote {}`)",
            node.hostname, node.id
        )));
    }
    if !force && m.status(node.id) != NodeStatus::Down {
        return Err(ApiError::conflict(format!(
            "node {} is {} (its daemon answers): run `shoal swarm leave` on it, or stop it, or use --force",
            node.hostname,
            m.status(node.id)
        )));
    }
    m.propose(Command::RemoveNode(node.id)).await?;
    Reply::of(&NodeChange {
        id: node.id.to_string(),
        message: None,
    })
}
