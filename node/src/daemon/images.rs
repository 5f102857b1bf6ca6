//! Images in containerd, in Shoal's namespace: `shoal image load FILE`
//! writes a checked archive's blobs into containerd's content store (under
//! a lease, so that its garbage collector leaves them alone until the image
//! records point at them), unpacks each image's layers into snapshots
//! named by their chain IDs (containerd's diff and snapshot services, as
//! its own client does), and makes an image record per name; `shoal image
//! ls` lists the records.

use std::collections::HashMap;

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::diff_client::DiffClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    ApplyRequest, CreateImageRequest, CreateRequest, DeleteImageRequest, DeleteRequest,
    GetImageRequest, Image, Info, InfoRequest, ListImagesRequest, UpdateImageRequest,
    UpdateRequest, WriteAction, WriteContentRequest,
};
use containerd_client::tonic::{self, Code, Request};
use containerd_client::types::Descriptor;

use super::archive::{self, Archive};
use super::engine::{Engine, EngineError};
use crate::views::ImageView;

/// The containerd namespace Shoal's images, containers and snapshots live
/// in, apart from anything else on the host.
pub const NAMESPACE: &str = "shoal";

/// The snapshotter images are unpacked with.
pub const SNAPSHOTTER: &str = "overlayfs";

/// How long a load's lease outlives a daemon that died during the load:
/// then containerd's garbage collector takes what it held.
const LEASE_EXPIRY_S: u64 = 3600;

/// `secs` since the epoch as RFC 3339 in UTC (containerd's
/// `containerd.io/gc.expire` label). Pure.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// How much of a blob one write message carries.
const CHUNK: usize = 1 << 20;

/// `msg` for containerd: in Shoal's namespace, and under `lease` if given.
pub(crate) fn request<T>(msg: T, lease: Option<&str>) -> Request<T> {
    let mut req = Request::new(msg);
    let md = req.metadata_mut();
    md.insert(
        "containerd-namespace",
        tonic::metadata::MetadataValue::from_static(NAMESPACE),
    );
    if let Some(l) = lease.and_then(|l| l.parse().ok()) {
        md.insert("containerd-lease", l);
    }
    req
}

fn descriptor(d: &archive::Descriptor) -> Descriptor {
    Descriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size as i64,
        annotations: HashMap::new(),
    }
}

/// The garbage-collector labels that keep a manifest's config and layers
/// alive as long as the manifest is (containerd's `gc.ref.content`).
fn gc_labels(image: &archive::ArchiveImage) -> HashMap<String, String> {
    let mut labels = HashMap::from([(
        "containerd.io/gc.ref.content.config".to_owned(),
        image.config.digest.clone(),
    )]);
    for (i, l) in image.layers.iter().enumerate() {
        labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            l.digest.clone(),
        );
    }
    labels
}

impl Engine {
    pub(crate) fn failed(&self, what: &str, status: tonic::Status) -> EngineError {
        EngineError::Call {
            what: what.to_owned(),
            code: format!("{:?}", status.code()),
            message: status.message().to_owned(),
        }
    }

    /// Creates a lease (`prefix` and a random suffix) that holds what is
    /// made under it until it is deleted or, if its holder dies, for
    /// [`LEASE_EXPIRY_S`].
    pub(crate) async fn create_lease(&self, prefix: &str) -> Result<String, EngineError> {
        let lease = format!("{prefix}-{:016x}", rand::random::<u64>());
        LeasesClient::new(self.channel().await?)
            .create(request(
                CreateRequest {
                    id: lease.clone(),
                    labels: HashMap::from([(
                        "containerd.io/gc.expire".to_owned(),
                        rfc3339(super::clock::now_ms() / 1000 + LEASE_EXPIRY_S),
                    )]),
                },
                None,
            ))
            .await
            .map_err(|s| self.failed("create a lease", s))?;
        Ok(lease)
    }

    /// Deletes `lease` (best effort: an undeleted lease expires).
    pub(crate) async fn delete_lease(&self, lease: String) {
        let Ok(channel) = self.channel().await else {
            return;
        };
        let _ = LeasesClient::new(channel)
            .delete(request(
                DeleteRequest {
                    id: lease,
                    sync: false,
                },
                None,
            ))
            .await;
    }

    /// Writes `archive` into containerd and names its images; returns them.
    pub async fn load(&self, archive: &Archive) -> Result<Vec<ImageView>, EngineError> {
        let lease = self.create_lease("shoal-load").await?;
        let result = self.load_under(&lease, archive).await;
        // The image records now hold what they need; the lease can go.
        self.delete_lease(lease).await;
        result
    }

    async fn load_under(
        &self,
        lease: &str,
        archive: &Archive,
    ) -> Result<Vec<ImageView>, EngineError> {
        let channel = self.channel().await?;
        let mut labels: HashMap<String, HashMap<String, String>> = HashMap::new();
        for image in &archive.images {
            labels.insert(image.manifest.digest.clone(), gc_labels(image));
        }
        for (digest, bytes) in &archive.blobs {
            let blob_labels = labels.get(digest).cloned().unwrap_or_default();
            self.write_blob(lease, digest, bytes, blob_labels).await?;
        }
        for image in &archive.images {
            self.unpack(lease, image).await?;
        }
        let mut images = ImagesClient::new(channel);
        let mut out = Vec::new();
        for image in &archive.images {
            let record = Image {
                name: image.name.clone(),
                labels: HashMap::new(),
                target: Some(descriptor(&image.manifest)),
                created_at: None,
                updated_at: None,
            };
            let created = images
                .create(request(
                    CreateImageRequest {
                        image: Some(record.clone()),
                        source_date_epoch: None,
                    },
                    Some(lease),
                ))
                .await;
            match created {
                Ok(_) => {}
                // The name moves to this archive's image, as `docker load` does.
                Err(s) if s.code() == Code::AlreadyExists => {
                    images
                        .update(request(
                            UpdateImageRequest {
                                image: Some(record),
                                update_mask: None,
                                source_date_epoch: None,
                            },
                            Some(lease),
                        ))
                        .await
                        .map_err(|s| self.failed("update an image", s))?;
                }
                Err(s) => return Err(self.failed("create an image", s)),
            }
            out.push(ImageView {
                name: image.name.clone(),
                digest: image.manifest.digest.clone(),
                media_type: image.manifest.media_type.clone(),
            });
        }
        Ok(out)
    }

    /// Puts one blob into the content store, unless it is there already.
    async fn write_blob(
        &self,
        lease: &str,
        digest: &str,
        bytes: &[u8],
        labels: HashMap<String, String>,
    ) -> Result<(), EngineError> {
        let mut content = ContentClient::new(self.channel().await?);
        let info = content
            .info(request(
                InfoRequest {
                    digest: digest.to_owned(),
                },
                Some(lease),
            ))
            .await;
        if info.is_ok() {
            return Ok(());
        }
        let reference = format!("shoal-{digest}");
        let total = bytes.len() as i64;
        let mut msgs: Vec<WriteContentRequest> = bytes
            .chunks(CHUNK)
            .enumerate()
            .map(|(i, chunk)| WriteContentRequest {
                action: WriteAction::Write as i32,
                r#ref: reference.clone(),
                total,
                expected: digest.to_owned(),
                offset: (i * CHUNK) as i64,
                data: chunk.to_vec(),
                labels: HashMap::new(),
            })
            .collect();
        msgs.push(WriteContentRequest {
            action: WriteAction::Commit as i32,
            r#ref: reference,
            total,
            expected: digest.to_owned(),
            offset: total,
            data: Vec::new(),
            labels,
        });
        let stream = futures_util::stream::iter(msgs);
        let mut replies = content
            .write(request(stream, Some(lease)))
            .await
            .map_err(|s| self.failed("write a blob", s))?
            .into_inner();
        loop {
            match replies.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return Ok(()),
                // Committed by an earlier load: the content is there.
                Err(s) if s.code() == Code::AlreadyExists => return Ok(()),
                Err(s) => return Err(self.failed("write a blob", s)),
            }
        }
    }

    /// Unpacks `image`'s layers into snapshots named by their chain IDs
    /// (those already there are kept), then labels its config so that the
    /// garbage collector keeps the top snapshot while the image lives.
    async fn unpack(&self, lease: &str, image: &archive::ArchiveImage) -> Result<(), EngineError> {
        let channel = self.channel().await?;
        let mut snapshots = SnapshotsClient::new(channel.clone());
        let chains = archive::chain_ids(&image.diff_ids);
        let mut parent = String::new();
        for ((layer, diff_id), chain) in image.layers.iter().zip(&image.diff_ids).zip(&chains) {
            let stat = StatSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: chain.clone(),
            };
            if snapshots.stat(request(stat, Some(lease))).await.is_err() {
                self.apply_layer(lease, layer, diff_id, chain, &parent)
                    .await?;
            }
            parent.clone_from(chain);
        }
        let Some(top) = chains.last() else {
            return Ok(());
        };
        let label = format!("containerd.io/gc.ref.snapshot.{SNAPSHOTTER}");
        let info = Info {
            digest: image.config.digest.clone(),
            labels: HashMap::from([(label.clone(), top.clone())]),
            ..Default::default()
        };
        ContentClient::new(channel)
            .update(request(
                UpdateRequest {
                    info: Some(info),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec![format!("labels.{label}")],
                    }),
                },
                Some(lease),
            ))
            .await
            .map_err(|s| self.failed("label an image's config", s))?;
        Ok(())
    }

    /// Applies one layer on `parent` and commits it as `chain`; checks
    /// that it unpacked to `diff_id`. A half-made snapshot is removed.
    async fn apply_layer(
        &self,
        lease: &str,
        layer: &archive::Descriptor,
        diff_id: &str,
        chain: &str,
        parent: &str,
    ) -> Result<(), EngineError> {
        let channel = self.channel().await?;
        let mut snapshots = SnapshotsClient::new(channel.clone());
        let key = format!("shoal-extract-{:016x}-{chain}", rand::random::<u64>());
        let prepared = snapshots
            .prepare(request(
                PrepareSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: key.clone(),
                    parent: parent.to_owned(),
                    labels: HashMap::new(),
                },
                Some(lease),
            ))
            .await
            .map_err(|s| self.failed("prepare a snapshot", s))?
            .into_inner();
        let applied = DiffClient::new(channel)
            .apply(request(
                ApplyRequest {
                    diff: Some(descriptor(layer)),
                    mounts: prepared.mounts,
                    payloads: HashMap::new(),
                    sync_fs: true,
                },
                Some(lease),
            ))
            .await
            .map(|r| r.into_inner().applied.unwrap_or_default().digest);
        let committed = match applied {
            Ok(d) if d == diff_id => snapshots
                .commit(request(
                    CommitSnapshotRequest {
                        snapshotter: SNAPSHOTTER.into(),
                        name: chain.to_owned(),
                        key: key.clone(),
                        labels: HashMap::new(),
                    },
                    Some(lease),
                ))
                .await
                .map(drop)
                .or_else(|s| match s.code() {
                    // Another load committed the same layers meanwhile.
                    Code::AlreadyExists => Ok(()),
                    _ => Err(self.failed("commit a snapshot", s)),
                }),
            Ok(d) => Err(EngineError::Call {
                what: format!("unpack layer {}", layer.digest),
                code: "DataLoss".into(),
                message: format!("it unpacks to {d}, not to the config's {diff_id}"),
            }),
            Err(s) => Err(self.failed("unpack a layer", s)),
        };
        if committed.is_err() {
            let remove = RemoveSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key,
            };
            let _ = snapshots.remove(request(remove, Some(lease))).await;
        }
        committed
    }

    /// Removes the image record `name` (its content and snapshots go with
    /// containerd's garbage collection, unless another image holds them).
    /// `Ok(false)`: there is none.
    pub async fn remove_image(&self, name: &str) -> Result<bool, EngineError> {
        let mut images = ImagesClient::new(self.channel().await?);
        let req = DeleteImageRequest {
            name: name.to_owned(),
            sync: true,
            ..Default::default()
        };
        match images.delete(request(req, None)).await {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(self.failed("remove an image", s)),
        }
    }

    /// Pulls image `name` (normalised; at `digest` when given) from its
    /// registry into containerd, as `load` writes an archive.
    pub async fn pull(
        &self,
        name: &str,
        digest: Option<&str>,
    ) -> Result<Vec<ImageView>, EngineError> {
        // One pull at a time on a node: tasks of one image started together
        // wait for its first pull instead of fetching it each.
        let _one = self.pulling.lock().await;
        self.fetch_and_load(name, digest).await
    }

    /// Pulls image `name` for a task unless it is here (at `digest` when
    /// given), checked under the same lock as the pull, so that tasks
    /// of one missing image pull it once.
    pub async fn pull_missing(&self, name: &str, digest: Option<&str>) -> Result<(), EngineError> {
        let _one = self.pulling.lock().await;
        match (self.image_digest(name).await?, digest) {
            (Some(h), Some(d)) if h == d => Ok(()),
            (Some(_), None) => Ok(()),
            _ => self.fetch_and_load(name, digest).await.map(drop),
        }
    }

    /// The pull itself; the caller holds `pulling`.
    async fn fetch_and_load(
        &self,
        name: &str,
        digest: Option<&str>,
    ) -> Result<Vec<ImageView>, EngineError> {
        let archive = self.registries.fetch(name, digest).await?;
        self.load(&archive).await
    }

    /// The manifest digest image `name` names here, if it is here.
    pub async fn image_digest(&self, name: &str) -> Result<Option<String>, EngineError> {
        let got = ImagesClient::new(self.channel().await?)
            .get(request(
                GetImageRequest {
                    name: name.to_owned(),
                },
                None,
            ))
            .await;
        match got {
            Ok(r) => Ok(r
                .into_inner()
                .image
                .and_then(|i| i.target)
                .map(|t| t.digest)),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(self.failed("find an image", s)),
        }
    }

    /// Shoal's images in containerd.
    pub async fn images(&self) -> Result<Vec<ImageView>, EngineError> {
        let mut images = ImagesClient::new(self.channel().await?);
        let list = images
            .list(request(ListImagesRequest { filters: vec![] }, None))
            .await
            .map_err(|s| self.failed("list images", s))?
            .into_inner();
        let mut out: Vec<ImageView> = list
            .images
            .into_iter()
            .map(|i| {
                let target = i.target.unwrap_or_default();
                ImageView {
                    name: i.name,
                    digest: target.digest,
                    media_type: target.media_type,
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_written_as_rfc3339_in_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_258_096), "2026-12-03T00:34:56Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
    }
}
