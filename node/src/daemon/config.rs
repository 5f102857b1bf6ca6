//! The daemon's configuration: flags, or the same keys in a TOML file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_gossip::GossipConfig;
use shoal_raft::RaftTiming;

/// Default QUIC port.
pub const DEFAULT_PORT: u16 = 2377;

/// Everything `shoal daemon` is configured with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    /// Where the node keeps its identity, keys and the Raft store.
    pub state_dir: PathBuf,
    /// The local API socket.
    pub socket: PathBuf,
    /// QUIC listen address (UDP).
    pub listen_addr: SocketAddr,
    /// What other nodes dial: `IP` or `IP:PORT`.
    pub advertise_addr: Option<String>,
    /// This node's name; defaults to the system's hostname.
    pub hostname: Option<String>,
    /// `error`, `warn`, `info`, `debug` or `trace` (or a tracing filter).
    pub log_level: String,
    /// Raft timing.
    pub raft: RaftTimingConfig,
    /// Gossip timing.
    pub gossip: GossipTimingConfig,
    /// Task placement.
    pub orchestrator: OrchestratorConfig,
    /// The data plane.
    pub dataplane: DataplaneConfig,
    /// The replicated store.
    pub store: StoreConfig,
    /// Certificates.
    pub pki: PkiConfig,
    /// containerd's API socket (the container engine Shoal drives; it is
    /// never started by Shoal).
    pub containerd_socket: PathBuf,
    /// Registries pulled from over plain HTTP (`HOST[:PORT]`).
    pub insecure_registries: Vec<String>,
    /// A docker-style `config.json` with registry credentials.
    pub registry_auth_file: Option<PathBuf>,
}

/// `[pki]`: node certificates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PkiConfig {
    /// The shortest `--cert-expiry` this manager takes, in seconds (an
    /// hour; lower only to watch renewals in tests, down to 10).
    pub min_cert_expiry_s: u64,
}

impl Default for PkiConfig {
    fn default() -> Self {
        PkiConfig {
            min_cert_expiry_s: 3600,
        }
    }
}

/// `[store]`: the replicated store's limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// The store quota, in MiB of encoded state: past it, a manager refuses
    /// writes that would grow the state (removals still go through), as
    /// etcd's `--quota-backend-bytes` does. At most 12, so that a snapshot
    /// always stays under the 16 MiB a node reads back.
    pub quota_mib: u64,
}

/// The largest store quota, in MiB.
pub const MAX_QUOTA_MIB: u64 = 12;

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            quota_mib: MAX_QUOTA_MIB,
        }
    }
}

/// `[dataplane]`: the kernel state this node programs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataplaneConfig {
    /// Program overlays and sandboxes (needs root). When off, tasks run in
    /// bare network namespaces with loopback only.
    pub enabled: bool,
    /// Names of this node's network namespaces start with it (default
    /// `shoal-<node ID>-`); it must start with `shoal`.
    pub netns_prefix: Option<String>,
    /// VXLAN UDP port (`--data-path-port`).
    pub data_path_port: u16,
    /// The underlay's MTU, if not the MTU of the interface holding the
    /// advertise address.
    pub underlay_mtu: Option<u32>,
    /// The host-local subnet of the gateway bridge tasks reach beyond
    /// their networks through (masqueraded); must not be used elsewhere.
    /// By default the first of 172.31.0.0/16, 172.30.0.0/16 … 172.16.0.0/16,
    /// then 192.168.240.0/20 … 192.168.0.0/20, that no route of the host
    /// overlaps (the one in use is kept across restarts while it stays
    /// clear).
    pub gateway_subnet: Option<String>,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        DataplaneConfig {
            enabled: true,
            netns_prefix: None,
            data_path_port: 4789,
            underlay_mtu: None,
            gateway_subnet: None,
        }
    }
}

/// `[orchestrator]`: how the leader reacts to lost nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrchestratorConfig {
    /// How long a node gossip declares dead keeps its tasks before they are
    /// rescheduled elsewhere (a node back within it keeps them).
    pub reschedule_grace_ms: u64,
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        OrchestratorConfig {
            reschedule_grace_ms: 5_000,
        }
    }
}

/// Gossip timing in milliseconds (see `shoal_gossip::GossipConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GossipTimingConfig {
    /// How often each member probes another.
    pub probe_period_ms: u64,
    /// Direct probe timeout before indirect probes.
    pub probe_rtt_ms: u64,
    /// How long a suspect may refute before it is declared dead.
    pub suspect_to_down_ms: u64,
    /// How often membership news is gossiped.
    pub gossip_interval_ms: u64,
    /// How often each network runs anti-entropy.
    pub sync_interval_ms: u64,
}

impl Default for GossipTimingConfig {
    fn default() -> Self {
        let g = GossipConfig::default();
        GossipTimingConfig {
            probe_period_ms: g.probe_period_ms,
            probe_rtt_ms: g.probe_rtt_ms,
            suspect_to_down_ms: g.suspect_to_down_ms,
            gossip_interval_ms: g.gossip_interval_ms,
            sync_interval_ms: g.sync_interval_ms,
        }
    }
}

impl GossipTimingConfig {
    /// The gossip core's configuration.
    pub fn config(&self) -> GossipConfig {
        GossipConfig {
            probe_period_ms: self.probe_period_ms,
            probe_rtt_ms: self.probe_rtt_ms,
            suspect_to_down_ms: self.suspect_to_down_ms,
            gossip_interval_ms: self.gossip_interval_ms,
            sync_interval_ms: self.sync_interval_ms,
            ..GossipConfig::default()
        }
    }
}

/// Raft timing in milliseconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftTimingConfig {
    /// Leader heartbeat interval.
    pub heartbeat_ms: u64,
    /// Election timeout, lower bound.
    pub election_min_ms: u64,
    /// Election timeout, upper bound.
    pub election_max_ms: u64,
}

impl Default for RaftTimingConfig {
    fn default() -> Self {
        let t = RaftTiming::default();
        RaftTimingConfig {
            heartbeat_ms: t.heartbeat.as_millis() as u64,
            election_min_ms: t.election_min.as_millis() as u64,
            election_max_ms: t.election_max.as_millis() as u64,
        }
    }
}

impl RaftTimingConfig {
    /// As durations.
    pub fn timing(&self) -> RaftTiming {
        RaftTiming {
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            election_min: Duration::from_millis(self.election_min_ms),
            election_max: Duration::from_millis(self.election_max_ms),
        }
    }
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            state_dir: PathBuf::from("/var/lib/shoal"),
            socket: PathBuf::from("/run/shoal/shoal.sock"),
            listen_addr: SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
            advertise_addr: None,
            hostname: None,
            log_level: "info".into(),
            raft: RaftTimingConfig::default(),
            gossip: GossipTimingConfig::default(),
            orchestrator: OrchestratorConfig::default(),
            dataplane: DataplaneConfig::default(),
            store: StoreConfig::default(),
            pki: PkiConfig::default(),
            containerd_socket: PathBuf::from(super::engine::DEFAULT_SOCKET),
            insecure_registries: Vec::new(),
            registry_auth_file: None,
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The file is not valid TOML for this struct.
    #[error("invalid config file {path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// The advertise address is not `IP` or `IP:PORT`.
    #[error("invalid advertise address `{0}`: use IP or IP:PORT, e.g. 192.168.1.10:2377")]
    Advertise(String),
    /// Raft timings out of order.
    #[error(
        "invalid raft timing: need 0 < heartbeat_ms < election_min_ms < election_max_ms (got {0}, {1}, {2})"
    )]
    RaftTiming(u64, u64, u64),
    /// Gossip timings that cannot work.
    #[error(
        "invalid gossip timing: need 0 < probe_rtt_ms < probe_period_ms, and suspect_to_down_ms, gossip_interval_ms, sync_interval_ms > 0"
    )]
    GossipTiming,
    /// A gateway subnet that is not a CIDR.
    #[error("invalid gateway_subnet `{0}`: use a CIDR such as 172.31.0.0/16")]
    GatewaySubnet(String),
    /// A namespace prefix Shoal may not use.
    #[error(
        "invalid netns_prefix `{0}`: it must start with `shoal` and hold only letters, digits and `-`"
    )]
    NetnsPrefix(String),
    /// A minimum certificate validity under 10 s.
    #[error("invalid [pki] min_cert_expiry_s {0}: use at least 10")]
    MinCertExpiry(u64),
    /// A store quota out of range.
    #[error("invalid [store] quota_mib {0}: use 1 to {MAX_QUOTA_MIB}")]
    Quota(u64),
    /// Hostname empty or with whitespace.
    #[error("invalid hostname `{0}`: it must be non-empty and contain no whitespace")]
    Hostname(String),
}

impl DaemonConfig {
    /// Reads a TOML config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    /// Checks the values that can be checked without the network.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(a) = &self.advertise_addr {
            parse_advertise(a, self.listen_addr.port())?;
        }
        let r = &self.raft;
        if !(0 < r.heartbeat_ms
            && r.heartbeat_ms < r.election_min_ms
            && r.election_min_ms < r.election_max_ms)
        {
            return Err(ConfigError::RaftTiming(
                r.heartbeat_ms,
                r.election_min_ms,
                r.election_max_ms,
            ));
        }
        if let Some(p) = &self.dataplane.netns_prefix
            && !(p.starts_with("shoal") && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        {
            return Err(ConfigError::NetnsPrefix(p.clone()));
        }
        if let Some(g) = &self.dataplane.gateway_subnet
            && g.parse::<shoal_mesh::cidr::Ipv4Net>().is_err()
        {
            return Err(ConfigError::GatewaySubnet(g.clone()));
        }
        let g = &self.gossip;
        if !(0 < g.probe_rtt_ms
            && g.probe_rtt_ms < g.probe_period_ms
            && g.suspect_to_down_ms > 0
            && g.gossip_interval_ms > 0
            && g.sync_interval_ms > 0)
        {
            return Err(ConfigError::GossipTiming);
        }
        if let Some(h) = &self.hostname
            && (h.is_empty() || h.chars().any(char::is_whitespace))
        {
            return Err(ConfigError::Hostname(h.clone()));
        }
        if self.pki.min_cert_expiry_s < 10 {
            return Err(ConfigError::MinCertExpiry(self.pki.min_cert_expiry_s));
        }
        if !(1..=MAX_QUOTA_MIB).contains(&self.store.quota_mib) {
            return Err(ConfigError::Quota(self.store.quota_mib));
        }
        Ok(())
    }
}

/// Parses `IP` or `IP:PORT`; a bare IP gets `default_port`.
pub fn parse_advertise(text: &str, default_port: u16) -> Result<SocketAddr, ConfigError> {
    if let Ok(sa) = text.parse::<SocketAddr>() {
        return Ok(sa);
    }
    text.parse::<std::net::IpAddr>()
        .map(|ip| SocketAddr::new(ip, default_port))
        .map_err(|_| ConfigError::Advertise(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_toml_file_overrides_defaults_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shoal.toml");
        std::fs::write(
            &p,
            "state_dir = \"/tmp/x\"\nlisten_addr = \"127.0.0.1:4000\"\n[raft]\nheartbeat_ms = 20\n",
        )
        .unwrap();
        let c = DaemonConfig::load(&p).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.listen_addr.port(), 4000);
        assert_eq!(c.raft.heartbeat_ms, 20);
        assert_eq!(
            c.raft.election_min_ms,
            RaftTimingConfig::default().election_min_ms
        );
        std::fs::write(&p, "statedir = \"/tmp/x\"\n").unwrap();
        let err = DaemonConfig::load(&p).unwrap_err().to_string();
        assert!(err.contains("statedir"), "{err}");
    }

    #[test]
    fn the_example_config_in_the_repository_is_valid() {
        let text = include_str!("../../../cluster-configs/daemon.example.toml");
        let c: DaemonConfig = toml::from_str(text).unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.raft,
            RaftTimingConfig::default(),
            "the example shows the defaults"
        );
        assert_eq!(c.orchestrator, OrchestratorConfig::default());
        assert_eq!(c.store, StoreConfig::default());
        assert_eq!(c.pki, PkiConfig::default());
    }

    #[test]
    fn validation_names_the_problem() {
        let mut c = DaemonConfig {
            advertise_addr: Some("not-an-ip".into()),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("not-an-ip"));
        c.advertise_addr = Some("10.0.0.1".into());
        c.validate().unwrap();
        assert_eq!(
            parse_advertise("10.0.0.1", 2377).unwrap().to_string(),
            "10.0.0.1:2377"
        );
        for quota in [0, MAX_QUOTA_MIB + 1] {
            let c = DaemonConfig {
                store: StoreConfig { quota_mib: quota },
                ..Default::default()
            };
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("quota_mib") && e.contains("1 to 12"), "{e}");
        }
        c.raft.heartbeat_ms = 500;
        assert!(matches!(c.validate(), Err(ConfigError::RaftTiming(..))));
    }
}
