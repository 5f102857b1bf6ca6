//! The node's persisted identity in its state dir.
//!
//! ```text
//! STATE_DIR/node.json     node ID, cluster ID, addresses   (written last: the "member" marker)
//! STATE_DIR/ca.der        cluster CA certificate
//! STATE_DIR/node.der      this node's certificate
//! STATE_DIR/node.key      this node's private key           (0600)
//! STATE_DIR/manager.key   managers' sealing key, managers only (0600)
//! STATE_DIR/raft/         Raft log (redb) and snapshot
//! ```

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use shoal_mesh::NodeId;

use super::transport::TlsIdentity;

/// The identity file's content.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeFile {
    /// This node's ID.
    pub node_id: NodeId,
    /// The cluster it belongs to.
    pub cluster_id: String,
    /// Where it listens.
    pub listen_addr: SocketAddr,
    /// What others dial.
    pub advertise_addr: SocketAddr,
    /// The swarm's managers when this node joined (empty for the node that
    /// ran `swarm init`): until its store arrives, it takes Raft traffic
    /// from these nodes only.
    #[serde(default)]
    pub join_managers: Vec<NodeId>,
}

/// A loaded identity.
#[derive(Clone)]
pub struct Identity {
    /// `node.json`.
    pub node: NodeFile,
    /// Certificates and key.
    pub tls: TlsIdentity,
    /// The managers' sealing key, if this node has it.
    pub manager_key: Option<[u8; 32]>,
}

/// Errors reading or writing the state dir.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file could not be read, parsed or written.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

fn file_err(path: &Path, e: impl ToString) -> IdentityError {
    IdentityError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// Paths in a state dir.
#[derive(Clone, Debug)]
pub struct StateDir(pub PathBuf);

impl StateDir {
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// The Raft store's folder.
    pub fn raft(&self) -> PathBuf {
        self.path("raft")
    }

    /// Loads the identity; `Ok(None)` if there is none. A damaged file is an
    /// error naming it.
    pub fn load(&self) -> Result<Option<Identity>, IdentityError> {
        self.finish_renewal()?;
        let node_path = self.path("node.json");
        let text = match std::fs::read_to_string(&node_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(file_err(&node_path, e)),
        };
        let node: NodeFile = serde_json::from_str(&text).map_err(|e| file_err(&node_path, e))?;
        let read = |name: &str| {
            let p = self.path(name);
            std::fs::read(&p).map_err(|e| file_err(&p, e))
        };
        let tls = TlsIdentity {
            ca_der: read("ca.der")?,
            cert_der: read("node.der")?,
            key_der: read("node.key")?,
        };
        let cert_id = super::pki::node_id_of(&tls.cert_der)
            .map_err(|e| file_err(&self.path("node.der"), e))?;
        if cert_id != node.node_id {
            return Err(file_err(
                &self.path("node.der"),
                format!(
                    "certificate is for node {cert_id}, but node.json says {}",
                    node.node_id
                ),
            ));
        }
        let mk_path = self.path("manager.key");
        let manager_key = match std::fs::read(&mk_path) {
            Ok(b) => Some(
                <[u8; 32]>::try_from(b.as_slice())
                    .map_err(|_| file_err(&mk_path, "expected 32 bytes"))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(file_err(&mk_path, e)),
        };
        Ok(Some(Identity {
            node,
            tls,
            manager_key,
        }))
    }

    /// Writes a whole identity; `node.json` goes last so that a crash
    /// half-way leaves a state dir that is not a member.
    pub fn save(&self, id: &Identity) -> Result<(), IdentityError> {
        std::fs::create_dir_all(&self.0).map_err(|e| file_err(&self.0, e))?;
        self.write("ca.der", &id.tls.ca_der, false)?;
        self.write("node.der", &id.tls.cert_der, false)?;
        self.write("node.key", &id.tls.key_der, true)?;
        self.save_manager_key(id.manager_key.as_ref())?;
        let json = serde_json::to_vec_pretty(&id.node)
            .map_err(|e| file_err(&self.path("node.json"), e))?;
        self.write("node.json", &json, false)
    }

    /// Replaces this node's certificate, key and the CA that issued it (a
    /// renewal): all are written in full beside the old ones first, then
    /// renamed into place; a crash between the renames is finished by the
    /// next [`Self::load`].
    pub fn save_tls(&self, tls: &TlsIdentity) -> Result<(), IdentityError> {
        self.write("node.key.next", &tls.key_der, true)?;
        self.write("node.der.next", &tls.cert_der, false)?;
        self.write("ca.der.next", &tls.ca_der, false)?;
        self.finish_renewal()
    }

    /// Moves a renewal's files into place, if one was written.
    fn finish_renewal(&self) -> Result<(), IdentityError> {
        let mut renamed = false;
        for name in ["node.key", "node.der", "ca.der"] {
            let next = self.path(&format!("{name}.next"));
            match std::fs::rename(&next, self.path(name)) {
                Ok(()) => renamed = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(file_err(&next, e)),
            }
        }
        if renamed {
            std::fs::File::open(&self.0)
                .and_then(|d| d.sync_all())
                .map_err(|e| file_err(&self.0, e))?;
        }
        Ok(())
    }

    /// Stores (or, with `None`, deletes) the managers' key.
    pub fn save_manager_key(&self, key: Option<&[u8; 32]>) -> Result<(), IdentityError> {
        match key {
            Some(k) => self.write("manager.key", k, true),
            None => match std::fs::remove_file(self.path("manager.key")) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(file_err(&self.path("manager.key"), e)),
            },
        }
    }

    fn write(&self, name: &str, bytes: &[u8], secret: bool) -> Result<(), IdentityError> {
        let path = self.path(name);
        let tmp = self.path(&format!(".{name}.tmp"));
        let mode = if secret { 0o600 } else { 0o644 };
        let result = (|| -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&tmp)?;
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&self.0)?.sync_all()
        })();
        result.map_err(|e| file_err(&path, e))
    }

    /// Removes everything the cluster membership put here (identity, keys,
    /// Raft store). The state dir itself stays.
    pub fn wipe(&self) -> Result<(), IdentityError> {
        let mut errors = Vec::new();
        // node.json first: from here on the dir is no longer a member.
        for name in [
            "node.json",
            "manager.key",
            "node.key",
            "node.der",
            "ca.der",
            "node.key.next",
            "node.der.next",
            "ca.der.next",
        ] {
            match std::fs::remove_file(self.path(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => errors.push(format!("{}: {e}", self.path(name).display())),
            }
        }
        match std::fs::remove_dir_all(self.raft()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("{}: {e}", self.raft().display())),
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(file_err(&self.0, errors.join("; ")))
        }
    }
}
/// The managers' key as this node holds it (or not), kept on disk too.
/// Cheap to share: the liveness loop fetches or drops it as the node's
/// role changes, the peer server hands it to managers and uses it to admit.
pub struct ManagerKey {
    dir: StateDir,
    key: std::sync::Mutex<Option<[u8; 32]>>,
}

impl ManagerKey {
    /// The key loaded from `dir` (`key`), saved there on every change.
    pub fn new(dir: StateDir, key: Option<[u8; 32]>) -> Self {
        ManagerKey {
            dir,
            key: std::sync::Mutex::new(key),
        }
    }

    /// The key, if this node holds it.
    pub fn get(&self) -> Option<[u8; 32]> {
        *self.key.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores or forgets the key, on disk first.
    pub fn set(&self, key: Option<[u8; 32]>) -> Result<(), IdentityError> {
        self.dir.save_manager_key(key.as_ref())?;
        *self.key.lock().unwrap_or_else(|p| p.into_inner()) = key;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewal_cut_short_between_its_renames_is_finished_at_the_next_load() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir(tmp.path().to_owned());
        let ca = super::super::pki::new_ca().unwrap();
        let issue = || {
            let id = super::super::transport::test_identity(&ca, NodeId(7));
            (id.cert_der, id.key_der)
        };
        let (cert, key_der) = issue();
        dir.save(&Identity {
            node: NodeFile {
                node_id: NodeId(7),
                cluster_id: "c".into(),
                listen_addr: "127.0.0.1:2377".parse().unwrap(),
                advertise_addr: "127.0.0.1:2377".parse().unwrap(),
                join_managers: vec![],
            },
            tls: TlsIdentity {
                ca_der: ca.0.clone(),
                cert_der: cert,
                key_der,
            },
            manager_key: None,
        })
        .unwrap();
        // A renewal that wrote both files, and renamed only the key.
        let (new_cert, new_key) = issue();
        dir.write("node.key.next", &new_key, true).unwrap();
        dir.write("node.der.next", &new_cert, false).unwrap();
        std::fs::rename(dir.path("node.key.next"), dir.path("node.key")).unwrap();
        let loaded = dir.load().unwrap().unwrap();
        assert_eq!(
            (loaded.tls.cert_der, loaded.tls.key_der),
            (new_cert, new_key)
        );
        assert!(!dir.path("node.der.next").exists());
        // And a whole one.
        let (cert3, key3) = issue();
        let tls = TlsIdentity {
            ca_der: ca.0.clone(),
            cert_der: cert3.clone(),
            key_der: key3,
        };
        dir.save_tls(&tls).unwrap();
        assert_eq!(dir.load().unwrap().unwrap().tls.cert_der, cert3);
    }
}
