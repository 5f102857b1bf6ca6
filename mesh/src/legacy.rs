//! Older shapes of store records, read when a current decode fails so
//! that state dirs and Raft logs written before a format change still
//! open. Each converts into the current shape; nothing writes them.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::Deserialize;

use crate::constraint::Constraint;
use crate::ids::{NetworkId, ServiceId};
use crate::service::{
    Attachment, EndpointMode, PortSpec, PublishedPort, RestartPolicy, Service, ServiceMode,
    ServiceSpec, UpdateConfig,
};

/// [`ServiceSpec`] before containers (every task a host process).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct ServiceSpecV1 {
    name: String,
    mode: ServiceMode,
    networks: Vec<Attachment>,
    ports: Vec<PortSpec>,
    endpoint_mode: EndpointMode,
    constraints: Vec<Constraint>,
    env: BTreeMap<String, String>,
    command: Vec<String>,
    labels: BTreeMap<String, String>,
    restart: RestartPolicy,
    update: UpdateConfig,
}

impl From<ServiceSpecV1> for ServiceSpec {
    fn from(v1: ServiceSpecV1) -> Self {
        ServiceSpec {
            name: v1.name,
            mode: v1.mode,
            networks: v1.networks,
            ports: v1.ports,
            endpoint_mode: v1.endpoint_mode,
            constraints: v1.constraints,
            env: v1.env,
            command: v1.command,
            labels: v1.labels,
            restart: v1.restart,
            update: v1.update,
            container: None,
        }
    }
}

impl ServiceSpecV1 {
    /// The old shape of `spec`, for tests of the fallback (the container
    /// settings are dropped).
    pub fn from_current(spec: &ServiceSpec) -> Self {
        ServiceSpecV1 {
            name: spec.name.clone(),
            mode: spec.mode.clone(),
            networks: spec.networks.clone(),
            ports: spec.ports.clone(),
            endpoint_mode: spec.endpoint_mode,
            constraints: spec.constraints.clone(),
            env: spec.env.clone(),
            command: spec.command.clone(),
            labels: spec.labels.clone(),
            restart: spec.restart,
            update: spec.update,
        }
    }
}

/// [`Service`] before containers.
#[derive(Deserialize)]
pub struct ServiceV1 {
    id: ServiceId,
    spec: ServiceSpecV1,
    vips: BTreeMap<NetworkId, Ipv4Addr>,
    ports: Vec<PublishedPort>,
    created_at_ms: u64,
    version: u64,
    updated_at_ms: u64,
}

impl From<ServiceV1> for Service {
    fn from(v1: ServiceV1) -> Self {
        Service {
            id: v1.id,
            spec: v1.spec.into(),
            vips: v1.vips,
            ports: v1.ports,
            created_at_ms: v1.created_at_ms,
            version: v1.version,
            updated_at_ms: v1.updated_at_ms,
        }
    }
}

/// Services of an old snapshot, in the current shape.
pub fn services(old: BTreeMap<ServiceId, ServiceV1>) -> BTreeMap<ServiceId, Service> {
    old.into_iter().map(|(id, s)| (id, s.into())).collect()
}
