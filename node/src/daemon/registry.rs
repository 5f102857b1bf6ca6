//! Pulling images from OCI registries. containerd 1.6 has no server-side
//! pull, so Shoal fetches an image's manifest, config and layers itself
//! (`oci-client`: plain HTTPS, plain HTTP for the registries named with
//! `--insecure-registry`, credentials from a docker-style `config.json`
//! given with `--registry-auth-file`) and hands them to the same loader
//! as `image load` (`images.rs`), which checks every digest again.

use std::collections::BTreeMap;
use std::path::Path;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::archive::{self, Archive, ArchiveImage, Descriptor};

/// The manifest types Shoal reads.
const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// Why an image could not be resolved or fetched.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The registry has no such image (or tag).
    #[error("image not found: {0}")]
    NotFound(String),
    /// The registry refused the credentials, or asked for some.
    #[error(
        "the registry refused access to {name}: {reason} (give credentials with `shoal daemon --registry-auth-file`)"
    )]
    Denied {
        /// The image.
        name: String,
        /// What it said.
        reason: String,
    },
    /// The registry did not answer.
    #[error("registry {registry} does not answer: {reason}")]
    Unreachable {
        /// The registry.
        registry: String,
        /// What failed.
        reason: String,
    },
    /// What it sent is not an image Shoal can run.
    #[error("{name}: {reason}")]
    Bad {
        /// The image.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

/// The registries a node pulls from, and how.
#[derive(Clone, Debug, Default)]
pub struct Registries {
    /// Registries spoken to over plain HTTP (`HOST[:PORT]`).
    pub insecure: Vec<String>,
    /// Credentials per registry host.
    pub auth: BTreeMap<String, (String, String)>,
}

/// A docker `config.json`'s credentials: `auths.HOST.auth` (base64 of
/// `user:password`) or `auths.HOST.username`/`password`. Pure.
pub fn parse_auth_file(text: &str) -> Result<BTreeMap<String, (String, String)>, String> {
    use base64::Engine as _;
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let mut out = BTreeMap::new();
    let Some(auths) = v["auths"].as_object() else {
        return Ok(out);
    };
    for (host, entry) in auths {
        let host = host
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let pair = match entry["auth"].as_str() {
            Some(b64) => {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|e| format!("auths.{host}.auth is not base64: {e}"))?;
                let text =
                    String::from_utf8(raw).map_err(|_| format!("auths.{host}.auth is not text"))?;
                let (u, p) = text
                    .split_once(':')
                    .ok_or_else(|| format!("auths.{host}.auth is not user:password"))?;
                (u.to_owned(), p.to_owned())
            }
            None => match (entry["username"].as_str(), entry["password"].as_str()) {
                (Some(u), Some(p)) => (u.to_owned(), p.to_owned()),
                _ => continue,
            },
        };
        out.insert(host, pair);
    }
    Ok(out)
}

/// A blob being received: refuses bytes past the size its manifest gives,
/// so a registry cannot make the daemon hold more than it agreed to.
struct Capped {
    bytes: Vec<u8>,
    limit: usize,
}

impl tokio::io::AsyncWrite for Capped {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.bytes.len() + buf.len() > self.limit {
            return std::task::Poll::Ready(Err(std::io::Error::other(
                "the registry sent more bytes than the manifest gives",
            )));
        }
        self.bytes.extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl Registries {
    /// The daemon's settings: `insecure` registries and the credentials in
    /// `auth_file`, read now.
    pub fn new(insecure: &[String], auth_file: Option<&Path>) -> anyhow::Result<Self> {
        let auth = match auth_file {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    anyhow::anyhow!("cannot read --registry-auth-file {}: {e}", p.display())
                })?;
                parse_auth_file(&text)
                    .map_err(|e| anyhow::anyhow!("--registry-auth-file {}: {e}", p.display()))?
            }
            None => BTreeMap::new(),
        };
        Ok(Registries {
            insecure: insecure.to_vec(),
            auth,
        })
    }

    fn client(&self) -> Client {
        // reqwest (under oci-client) takes the process's default rustls
        // provider: ring, as the rest of the daemon uses (set once; a
        // second call changes nothing).
        let _ = rustls::crypto::ring::default_provider().install_default();
        Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(self.insecure.clone()),
            connect_timeout: Some(std::time::Duration::from_secs(5)),
            read_timeout: Some(std::time::Duration::from_secs(60)),
            ..Default::default()
        })
    }

    fn auth_for(&self, r: &Reference) -> RegistryAuth {
        match self.auth.get(r.registry()) {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        }
    }

    fn reference(name: &str) -> Result<Reference, PullError> {
        name.parse().map_err(|e| PullError::Bad {
            name: name.to_owned(),
            reason: format!("not an image reference: {e}"),
        })
    }

    fn error(name: &str, r: &Reference, e: OciDistributionError) -> PullError {
        use OciDistributionError as E;
        match e {
            E::ImageManifestNotFoundError(_) => PullError::NotFound(name.to_owned()),
            E::RegistryError { ref envelope, .. }
                if envelope
                    .errors
                    .iter()
                    .any(|x| format!("{:?}", x.code).contains("Unknown")) =>
            {
                PullError::NotFound(name.to_owned())
            }
            E::AuthenticationFailure(reason) | E::UnauthorizedError { url: reason } => {
                PullError::Denied {
                    name: name.to_owned(),
                    reason,
                }
            }
            E::RequestError(e) => PullError::Unreachable {
                registry: r.registry().to_owned(),
                reason: e.to_string(),
            },
            other => PullError::Bad {
                name: name.to_owned(),
                reason: other.to_string(),
            },
        }
    }

    /// The manifest digest `name` (normalised) names in its registry now.
    pub async fn resolve(&self, name: &str) -> Result<String, PullError> {
        let r = Self::reference(name)?;
        let (_, digest, _) = self
            .client()
            .pull_image_manifest_and_list_digest(&r, &self.auth_for(&r))
            .await
            .map_err(|e| Self::error(name, &r, e))?;
        Ok(digest)
    }

    /// Fetches image `name` (at `digest` when given) whole, checked as an
    /// archive is, at most [`archive::MAX_ARCHIVE`] bytes.
    pub async fn fetch(&self, name: &str, digest: Option<&str>) -> Result<Archive, PullError> {
        let bad = |reason: String| PullError::Bad {
            name: name.to_owned(),
            reason,
        };
        let r = Self::reference(name)?;
        let client = self.client();
        let auth = self.auth_for(&r);
        let digest = match digest {
            Some(d) => d.to_owned(),
            None => {
                let (_, d, _) = client
                    .pull_image_manifest_and_list_digest(&r, &auth)
                    .await
                    .map_err(|e| Self::error(name, &r, e))?;
                d
            }
        };
        let pinned = Reference::with_digest(
            r.registry().to_owned(),
            r.repository().to_owned(),
            digest.clone(),
        );
        let (raw, _) = client
            .pull_manifest_raw(&pinned, &auth, MANIFEST_TYPES)
            .await
            .map_err(|e| Self::error(name, &r, e))?;
        if archive::digest_of(&raw) != digest {
            return Err(bad(format!("its manifest does not match {digest}")));
        }
        let (config, layers) = archive::parse_manifest(&raw).map_err(|e| bad(e.to_string()))?;
        let total: u64 = layers.iter().map(|l| l.size).sum::<u64>() + config.size;
        if total > archive::MAX_ARCHIVE {
            return Err(bad(format!(
                "{} MiB, more than the {} MiB an image may have here",
                total >> 20,
                archive::MAX_ARCHIVE >> 20
            )));
        }
        let mut blobs = BTreeMap::from([(digest.clone(), raw.to_vec())]);
        for d in std::iter::once(&config).chain(&layers) {
            let mut bytes = Capped {
                bytes: Vec::with_capacity(usize::try_from(d.size).unwrap_or(0)),
                limit: usize::try_from(d.size).unwrap_or(usize::MAX),
            };
            let layer = oci_client::manifest::OciDescriptor {
                media_type: d.media_type.clone(),
                digest: d.digest.clone(),
                size: i64::try_from(d.size).unwrap_or(i64::MAX),
                ..Default::default()
            };
            client
                .pull_blob(&pinned, &layer, &mut bytes)
                .await
                .map_err(|e| Self::error(name, &r, e))?;
            if bytes.bytes.len() != bytes.limit {
                return Err(bad(format!(
                    "blob {} has {} bytes, not the {} its manifest says",
                    d.digest,
                    bytes.bytes.len(),
                    d.size
                )));
            }
            blobs.insert(d.digest.clone(), bytes.bytes);
        }
        let diff_ids =
            archive::parse_diff_ids(&blobs[&config.digest]).map_err(|e| bad(e.to_string()))?;
        let media_type = serde_json::from_slice::<serde_json::Value>(&raw)
            .ok()
            .and_then(|v| v["mediaType"].as_str().map(str::to_owned))
            .unwrap_or_else(|| MANIFEST_TYPES[0].to_owned());
        let manifest = Descriptor {
            media_type,
            digest,
            size: raw.len() as u64,
            annotations: BTreeMap::new(),
        };
        Ok(Archive {
            images: vec![ArchiveImage {
                name: name.split('@').next().unwrap_or(name).to_owned(),
                manifest,
                config,
                layers,
                diff_ids,
            }],
            blobs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_blob_longer_than_its_manifest_says_is_cut_off() {
        use tokio::io::AsyncWriteExt;
        let mut blob = Capped {
            bytes: Vec::new(),
            limit: 5,
        };
        blob.write_all(b"12345").await.unwrap();
        assert!(blob.write_all(b"6").await.is_err());
        assert_eq!(blob.bytes, b"12345");
    }

    #[test]
    fn docker_config_credentials_are_read_both_ways() {
        let text = r#"{"auths": {
            "https://lab.local:5000/": {"auth": "dXNlcjpwYXNz"},
            "other.example": {"username": "me", "password": "secret"},
            "empty.example": {}
        }}"#;
        let auth = parse_auth_file(text).unwrap();
        assert_eq!(auth["lab.local:5000"], ("user".into(), "pass".into()));
        assert_eq!(auth["other.example"], ("me".into(), "secret".into()));
        assert!(!auth.contains_key("empty.example"));
        assert!(parse_auth_file("nope").unwrap_err().contains("not JSON"));
        let bad = r#"{"auths": {"x": {"auth": "!!!"}}}"#;
        assert!(parse_auth_file(bad).unwrap_err().contains("not base64"));
    }
}
