//! Older shapes of store records, read when a current decode fails so
//! that state dirs and Raft logs written before a format change still
//! open. Each converts into the current shape; nothing writes them.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::Deserialize;

use crate::constraint::Constraint;
use crate::ids::{NetworkId, ServiceId};
use crate::service::{
    Attachment, ContainerSpec, EndpointMode, PortSpec, PublishedPort, RestartPolicy, Service,
    ServiceMode, ServiceSpec, UpdateConfig,
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
            ext: Default::default(),
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

/// [`ServiceSpec`] before [`crate::service::ServiceExt`] (HTTP routes).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct ServiceSpecV2 {
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
    #[serde(with = "crate::service::json_field")]
    container: Option<ContainerSpec>,
}

impl From<ServiceSpecV2> for ServiceSpec {
    fn from(v2: ServiceSpecV2) -> Self {
        ServiceSpec {
            name: v2.name,
            mode: v2.mode,
            networks: v2.networks,
            ports: v2.ports,
            endpoint_mode: v2.endpoint_mode,
            constraints: v2.constraints,
            env: v2.env,
            command: v2.command,
            labels: v2.labels,
            restart: v2.restart,
            update: v2.update,
            container: v2.container,
            ext: Default::default(),
        }
    }
}

impl ServiceSpecV2 {
    /// The old shape of `spec`, for tests of the fallback (its routes are
    /// dropped).
    pub fn from_current(spec: &ServiceSpec) -> Self {
        ServiceSpecV2 {
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
            container: spec.container.clone(),
        }
    }
}

/// [`Service`] before [`crate::service::ServiceExt`].
#[derive(Deserialize)]
pub struct ServiceV2 {
    id: ServiceId,
    spec: ServiceSpecV2,
    vips: BTreeMap<NetworkId, Ipv4Addr>,
    ports: Vec<PublishedPort>,
    created_at_ms: u64,
    version: u64,
    updated_at_ms: u64,
}

impl From<ServiceV2> for Service {
    fn from(v2: ServiceV2) -> Self {
        Service {
            id: v2.id,
            spec: v2.spec.into(),
            vips: v2.vips,
            ports: v2.ports,
            created_at_ms: v2.created_at_ms,
            version: v2.version,
            updated_at_ms: v2.updated_at_ms,
        }
    }
}
