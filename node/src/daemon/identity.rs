//! The node's persisted identity in its state dir.
//!
//! ```text
//! STATE_DIR/node.json     node ID, cluster ID, addresses   (written last: the "member" marker)
//! STATE_DIR/ca.der        cluster CA certificate
//! STATE_DIR/node.der      this node's certificate
//! STATE_DIR/node.key      this node's private key           (0600)
//! STATE_DIR/manager.key   managers' sealing key, managers only (0600)
//! STATE_DIR/raft.key      the Raft data's encryption key        (0600)
//! STATE_DIR/keys.locked   the three keys sealed under the unlock key, in
//!                         place of the three files above (autolock)
//! STATE_DIR/raft/         Raft log (redb) and snapshot, sealed with raft.key
//! ```
//!
//! A node's secrets are kept either in the clear (`node.key`,
//! `manager.key`, `raft.key`) or, on an autolocked manager, together in
//! `keys.locked`; `node.key` decides which: when it exists the node is not
//! locked. Going locked writes `keys.locked` and then removes `node.key`
//! first; going unlocked writes the others, then `node.key`, then removes
//! `keys.locked`; so a crash in between leaves one complete set.

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
    /// The manager that admitted this node, and the address it was dialled
    /// at: where the store's feed comes from until the store names the
    /// managers (none for the node that ran `swarm init`).
    #[serde(default)]
    pub join_via: Option<(NodeId, SocketAddr)>,
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
    /// The unlock key the secrets are sealed under at rest (autolock).
    pub unlock_key: Option<[u8; 32]>,
    /// The key the Raft data is sealed with.
    pub raft_key: [u8; 32],
}

/// What `keys.locked` holds, sealed under the unlock key.
#[derive(Serialize, Deserialize)]
struct SealedKeys {
    node_key: Vec<u8>,
    manager_key: Option<[u8; 32]>,
    raft_key: [u8; 32],
}

/// A node's secrets, and the unlock key they are sealed under (if any).
#[derive(Clone)]
struct Held {
    node_key: Vec<u8>,
    manager_key: Option<[u8; 32]>,
    raft_key: [u8; 32],
    unlock_key: Option<[u8; 32]>,
}

impl Held {
    fn of(id: &Identity) -> Self {
        Held {
            node_key: id.tls.key_der.clone(),
            manager_key: id.manager_key,
            raft_key: id.raft_key,
            unlock_key: id.unlock_key,
        }
    }

    /// `keys.locked`'s content.
    fn sealed(&self, unlock: &[u8; 32]) -> Result<Vec<u8>, IdentityError> {
        let plain = shoal_mesh::codec::encode(&SealedKeys {
            node_key: self.node_key.clone(),
            manager_key: self.manager_key,
            raft_key: self.raft_key,
        })
        .map_err(|e| IdentityError::File {
            path: "keys.locked".into(),
            reason: e.to_string(),
        })?;
        Ok(super::pki::seal(unlock, &plain))
    }
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
    /// The node's keys are sealed under the swarm's unlock key.
    #[error("this manager is locked: its keys are sealed under the swarm's unlock key")]
    Locked,
    /// The key given does not open them.
    #[error(
        "invalid unlock key: it does not open this node's keys (if the key was rotated while this node was down, give the key from before the rotation)"
    )]
    WrongUnlockKey,
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

    /// Loads the identity; `Ok(None)` if there is none,
    /// [`IdentityError::Locked`] if its keys are sealed. A damaged file is
    /// an error naming it.
    pub fn load(&self) -> Result<Option<Identity>, IdentityError> {
        self.open(None)
    }

    /// `node.json` alone (a locked node says who it is).
    pub fn node_file(&self) -> Result<Option<NodeFile>, IdentityError> {
        let node_path = self.path("node.json");
        let text = match std::fs::read_to_string(&node_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(file_err(&node_path, e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| file_err(&node_path, e))
    }

    /// The CA and node certificates as saved (no key needed).
    pub fn certificates(&self) -> Result<(Vec<u8>, Vec<u8>), IdentityError> {
        Ok((self.read("ca.der")?, self.read("node.der")?))
    }

    fn read(&self, name: &str) -> Result<Vec<u8>, IdentityError> {
        let p = self.path(name);
        std::fs::read(&p).map_err(|e| file_err(&p, e))
    }

    /// Loads the identity, opening sealed keys with `unlock` (`swarm
    /// unlock`); without it, sealed keys are [`IdentityError::Locked`].
    pub fn open(&self, unlock: Option<&[u8; 32]>) -> Result<Option<Identity>, IdentityError> {
        self.finish_renewal()?;
        let Some(node) = self.node_file()? else {
            return Ok(None);
        };
        let (ca_der, cert_der) = self.certificates()?;
        let held = self.secrets(unlock)?;
        let tls = TlsIdentity {
            ca_der,
            cert_der,
            key_der: held.node_key,
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
        Ok(Some(Identity {
            node,
            tls,
            manager_key: held.manager_key,
            unlock_key: held.unlock_key,
            raft_key: held.raft_key,
        }))
    }

    /// The secrets, from the clear files or from `keys.locked`. A state dir
    /// from before the Raft data was encrypted gets a data key now.
    fn secrets(&self, unlock: Option<&[u8; 32]>) -> Result<Held, IdentityError> {
        match std::fs::read(self.path("node.key")) {
            Ok(node_key) => {
                let manager_key = self.clear_key("manager.key")?;
                let raft_key = match self.clear_key("raft.key")? {
                    Some(k) => k,
                    None => {
                        let k: [u8; 32] = rand::random();
                        self.write("raft.key", &k, true)?;
                        k
                    }
                };
                return Ok(Held {
                    node_key,
                    manager_key,
                    raft_key,
                    unlock_key: None,
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(file_err(&self.path("node.key"), e)),
        }
        let sealed = self.read("keys.locked")?;
        let unlock = unlock.ok_or(IdentityError::Locked)?;
        let plain =
            super::pki::unseal(unlock, &sealed).map_err(|_| IdentityError::WrongUnlockKey)?;
        let keys: SealedKeys = shoal_mesh::codec::decode(&plain, 1 << 16)
            .map_err(|e| file_err(&self.path("keys.locked"), e))?;
        // A crash while locking can leave clear keys behind.
        self.remove("manager.key")?;
        self.remove("raft.key")?;
        Ok(Held {
            node_key: keys.node_key,
            manager_key: keys.manager_key,
            raft_key: keys.raft_key,
            unlock_key: Some(*unlock),
        })
    }

    /// A 32-byte key kept in the clear, if its file exists.
    fn clear_key(&self, name: &str) -> Result<Option<[u8; 32]>, IdentityError> {
        let path = self.path(name);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(
                <[u8; 32]>::try_from(b.as_slice())
                    .map_err(|_| file_err(&path, "expected 32 bytes"))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(file_err(&path, e)),
        }
    }

    fn remove(&self, name: &str) -> Result<(), IdentityError> {
        match std::fs::remove_file(self.path(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(file_err(&self.path(name), e)),
        }
    }

    /// Writes a whole identity; `node.json` goes last so that a crash
    /// half-way leaves a state dir that is not a member.
    pub fn save(&self, id: &Identity) -> Result<(), IdentityError> {
        std::fs::create_dir_all(&self.0).map_err(|e| file_err(&self.0, e))?;
        self.write("ca.der", &id.tls.ca_der, false)?;
        self.write("node.der", &id.tls.cert_der, false)?;
        self.save_secrets(&Held::of(id))?;
        let json = serde_json::to_vec_pretty(&id.node)
            .map_err(|e| file_err(&self.path("node.json"), e))?;
        self.write("node.json", &json, false)
    }

    /// Replaces this node's certificate, key and the CA that issued it (a
    /// renewal), with `held` (which has the new key): all are written in
    /// full beside the old ones first, then renamed into place; a crash
    /// between the renames is finished by the next [`Self::load`].
    fn save_tls(&self, tls: &TlsIdentity, held: &Held) -> Result<(), IdentityError> {
        match &held.unlock_key {
            Some(unlock) => self.write("keys.locked.next", &held.sealed(unlock)?, true)?,
            None => self.write("node.key.next", &tls.key_der, true)?,
        }
        self.write("node.der.next", &tls.cert_der, false)?;
        self.write("ca.der.next", &tls.ca_der, false)?;
        self.finish_renewal()
    }

    /// Moves a renewal's files into place, if one was written.
    fn finish_renewal(&self) -> Result<(), IdentityError> {
        let mut renamed = false;
        for name in ["node.key", "keys.locked", "node.der", "ca.der"] {
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

    /// Writes the node's secrets in the clear or sealed (`held`'s unlock
    /// key), and removes the other form (see the module's notes on order).
    fn save_secrets(&self, held: &Held) -> Result<(), IdentityError> {
        match &held.unlock_key {
            Some(unlock) => {
                self.write("keys.locked", &held.sealed(unlock)?, true)?;
                self.remove("node.key")?;
                self.remove("manager.key")?;
                self.remove("raft.key")
            }
            None => {
                match &held.manager_key {
                    Some(k) => self.write("manager.key", k, true)?,
                    None => self.remove("manager.key")?,
                }
                self.write("raft.key", &held.raft_key, true)?;
                self.write("node.key", &held.node_key, true)?;
                self.remove("keys.locked")
            }
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
            "raft.key",
            "node.key",
            "keys.locked",
            "keys.locked.next",
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
/// The secrets this node holds (its key, the managers' key if it is a
/// manager, the unlock key they are sealed under when autolocked), kept in
/// the state dir on every change. Cheap to share: the liveness loop fetches
/// or drops the managers' key as the node's role changes, the autolock
/// loop seals or unseals, renewal replaces the node key, the peer server
/// hands the managers' key to managers and uses it to admit.
pub struct Secrets {
    dir: StateDir,
    held: std::sync::Mutex<Held>,
    /// Bumped when the managers' key changes.
    changed: tokio::sync::watch::Sender<()>,
}

impl Secrets {
    /// The secrets of `identity`, kept in `dir`.
    pub fn new(dir: StateDir, identity: &Identity) -> Self {
        Secrets {
            dir,
            held: std::sync::Mutex::new(Held::of(identity)),
            changed: tokio::sync::watch::Sender::new(()),
        }
    }

    /// Told when the managers' key changes.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<()> {
        self.changed.subscribe()
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The managers' key, if this node holds it.
    pub fn get(&self) -> Option<[u8; 32]> {
        self.held().manager_key
    }

    /// Stores or forgets the managers' key, on disk first.
    pub fn set(&self, key: Option<[u8; 32]>) -> Result<(), IdentityError> {
        self.change(|h| h.manager_key = key)?;
        self.changed.send_replace(());
        Ok(())
    }

    /// Applies `f` to the secrets, on disk first.
    fn change(&self, f: impl FnOnce(&mut Held)) -> Result<(), IdentityError> {
        let mut held = self.held();
        let mut next = held.clone();
        f(&mut next);
        self.dir.save_secrets(&next)?;
        *held = next;
        Ok(())
    }

    /// The unlock key the secrets are sealed under, if autolocked.
    pub fn unlock_key(&self) -> Option<[u8; 32]> {
        self.held().unlock_key
    }

    /// Seals the secrets under `key`, or keeps them in the clear (`None`).
    pub fn set_unlock_key(&self, key: Option<[u8; 32]>) -> Result<(), IdentityError> {
        self.change(|h| h.unlock_key = key)
    }

    /// Keeps a renewed certificate and its key.
    pub fn save_tls(&self, tls: &TlsIdentity) -> Result<(), IdentityError> {
        let mut held = self.held();
        let next = Held {
            node_key: tls.key_der.clone(),
            ..held.clone()
        };
        self.dir.save_tls(tls, &next)?;
        *held = next;
        Ok(())
    }

    /// The identity as saved, with the secrets held here (so also when
    /// they are sealed).
    pub fn identity(&self) -> Result<Option<Identity>, IdentityError> {
        let unlock = self.unlock_key();
        self.dir.open(unlock.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node7() -> NodeFile {
        NodeFile {
            node_id: NodeId(7),
            cluster_id: "c".into(),
            listen_addr: "127.0.0.1:2377".parse().unwrap(),
            advertise_addr: "127.0.0.1:2377".parse().unwrap(),
            join_managers: vec![],
            join_via: None,
        }
    }

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
            node: node7(),
            tls: TlsIdentity {
                ca_der: ca.0.clone(),
                cert_der: cert,
                key_der,
            },
            manager_key: None,
            unlock_key: None,
            raft_key: [1; 32],
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
        let held = Held {
            node_key: tls.key_der.clone(),
            manager_key: None,
            raft_key: [1; 32],
            unlock_key: None,
        };
        dir.save_tls(&tls, &held).unwrap();
        assert_eq!(dir.load().unwrap().unwrap().tls.cert_der, cert3);
    }

    #[test]
    fn sealed_keys_open_only_with_the_unlock_key_and_every_change_keeps_one_set() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir(tmp.path().to_owned());
        let ca = super::super::pki::new_ca().unwrap();
        let tls = super::super::transport::test_identity(&ca, NodeId(7));
        let unlock = [5u8; 32];
        let manager = [6u8; 32];
        let id = Identity {
            node: node7(),
            tls: tls.clone(),
            manager_key: Some(manager),
            unlock_key: Some(unlock),
            raft_key: [2; 32],
        };
        dir.save(&id).unwrap();
        let on_disk = |name: &str| dir.path(name).exists();
        assert!(on_disk("keys.locked") && !on_disk("node.key") && !on_disk("manager.key"));
        assert!(!on_disk("raft.key"));
        let sealed = std::fs::read(dir.path("keys.locked")).unwrap();
        assert!(!sealed.windows(32).any(|w| w == manager || w == [2; 32]));
        assert!(matches!(dir.load(), Err(IdentityError::Locked)));
        assert!(matches!(
            dir.open(Some(&[4u8; 32])),
            Err(IdentityError::WrongUnlockKey)
        ));
        let opened = dir.open(Some(&unlock)).unwrap().unwrap();
        assert_eq!(opened.tls.key_der, tls.key_der);
        assert_eq!(opened.manager_key, Some(manager));
        assert_eq!(opened.unlock_key, Some(unlock));
        assert_eq!(opened.raft_key, [2; 32]);
        assert_eq!(dir.node_file().unwrap().unwrap().node_id, NodeId(7));

        // A renewal while locked keeps the new key sealed.
        let secrets = Secrets::new(dir.clone(), &opened);
        let renewed = super::super::transport::test_identity(&ca, NodeId(7));
        secrets.save_tls(&renewed).unwrap();
        assert!(!on_disk("node.key"));
        let opened = dir.open(Some(&unlock)).unwrap().unwrap();
        assert_eq!(opened.tls.key_der, renewed.key_der);
        assert_eq!(
            secrets.identity().unwrap().unwrap().tls.cert_der,
            renewed.cert_der
        );

        // Unlocked: the clear files come back and the sealed one goes.
        secrets.set_unlock_key(None).unwrap();
        assert!(on_disk("node.key") && on_disk("manager.key") && !on_disk("keys.locked"));
        let loaded = dir.load().unwrap().unwrap();
        assert_eq!(
            (loaded.manager_key, loaded.unlock_key),
            (Some(manager), None)
        );

        // A crash while locking (sealed file written, clear node key not yet
        // removed) opens from the clear files; one after removing the node
        // key opens sealed, and the leftover managers' key is removed.
        secrets.set_unlock_key(Some(unlock)).unwrap();
        dir.write("node.key", &renewed.key_der, true).unwrap();
        dir.write("manager.key", &manager, true).unwrap();
        assert_eq!(dir.load().unwrap().unwrap().unlock_key, None);
        std::fs::remove_file(dir.path("node.key")).unwrap();
        assert!(matches!(dir.load(), Err(IdentityError::Locked)));
        dir.open(Some(&unlock)).unwrap().unwrap();
        assert!(!on_disk("manager.key"));

        // A state dir from before the data key gets one, kept.
        secrets.set_unlock_key(None).unwrap();
        std::fs::remove_file(dir.path("raft.key")).unwrap();
        let fresh = dir.load().unwrap().unwrap().raft_key;
        assert_eq!(dir.load().unwrap().unwrap().raft_key, fresh);
    }
}
