//! Image archives (`shoal image load FILE`), read and checked before
//! anything reaches containerd: an OCI image layout in a tar (`oci-layout`,
//! `index.json`, `blobs/sha256/…`), every blob a manifest needs present and
//! matching its digest and size. Pure: bytes in, images out.
//!
//! Image names are normalised as Docker does (`busybox` →
//! `docker.io/library/busybox:latest`), here and wherever an image is named.

use std::collections::BTreeMap;
use std::io::Read;

use serde::Deserialize;

/// OCI and Docker media types Shoal takes.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker's schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// The most an archive may hold, in bytes (it is read into memory).
pub const MAX_ARCHIVE: u64 = 1 << 30;

/// A content descriptor.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// What it is.
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Bytes.
    pub size: u64,
    /// Annotations.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Config {
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

/// One image of an archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveImage {
    /// Its normalised name.
    pub name: String,
    /// Its manifest.
    pub manifest: Descriptor,
    /// Its config.
    pub config: Descriptor,
    /// Its layers, bottom first.
    pub layers: Vec<Descriptor>,
    /// The digests of its layers uncompressed (the config's
    /// `rootfs.diff_ids`), bottom first.
    pub diff_ids: Vec<String>,
}

/// A checked archive: its images and the blobs they need, by digest.
#[derive(Debug, Default)]
pub struct Archive {
    /// The images, in the index's order.
    pub images: Vec<ArchiveImage>,
    /// Every blob an image needs (manifests, configs, layers).
    pub blobs: BTreeMap<String, Vec<u8>>,
}

/// Why an archive or a name is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArchiveError {
    /// Not a tar, or a damaged one.
    #[error("not an image archive: {0}")]
    NotATar(String),
    /// Neither an OCI layout nor a docker-archive.
    #[error(
        "not an image archive: no `oci-layout` and `index.json`, nor a docker-archive's `manifest.json`, in it"
    )]
    NotOci,
    /// Bigger than [`MAX_ARCHIVE`].
    #[error("the archive holds more than {} MiB", MAX_ARCHIVE >> 20)]
    TooBig,
    /// A JSON document that does not parse.
    #[error("{what} in the archive is not valid: {reason}")]
    BadJson {
        /// Which document.
        what: String,
        /// The parser's words.
        reason: String,
    },
    /// A blob a manifest names is missing.
    #[error("the archive lacks blob {0}")]
    Missing(String),
    /// A blob whose bytes do not match its digest or size.
    #[error("blob {0} in the archive does not match its digest or size (the archive is damaged)")]
    Mismatch(String),
    /// A digest that is not `sha256:` and 64 hex digits.
    #[error("unsupported digest `{0}`: only sha256 is taken")]
    Digest(String),
    /// A manifest of a kind Shoal does not run (an index of platforms…).
    #[error("manifest {digest} is a `{media_type}`, not an image manifest")]
    MediaType {
        /// The manifest.
        digest: String,
        /// What it is.
        media_type: String,
    },
    /// An image without a name.
    #[error(
        "image {0} in the archive has no name (annotation `io.containerd.image.name` or `org.opencontainers.image.ref.name`)"
    )]
    Unnamed(String),
    /// A malformed image name.
    #[error(
        "invalid image name `{0}`: use [REGISTRY/]REPOSITORY[:TAG], lower case, e.g. busybox:1.36"
    )]
    Name(String),
    /// No image at all.
    #[error("the archive holds no image")]
    Empty,
}

fn hex_of(digest: &str) -> Result<&str, ArchiveError> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .ok_or_else(|| ArchiveError::Digest(digest.to_owned()))?;
    Ok(hex)
}

/// `sha256:<hex>` of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    format!("sha256:{}", shoal_mesh::ids::to_hex(d.as_ref()))
}

/// Reads a tar into its regular files, by path (without a leading `./`).
fn files(reader: impl Read) -> Result<BTreeMap<String, Vec<u8>>, ArchiveError> {
    let mut tar = tar::Archive::new(reader);
    let mut out = BTreeMap::new();
    let mut total = 0u64;
    let entries = tar
        .entries()
        .map_err(|e| ArchiveError::NotATar(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| ArchiveError::NotATar(e.to_string()))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        total = total.saturating_add(entry.size());
        if total > MAX_ARCHIVE {
            return Err(ArchiveError::TooBig);
        }
        let path = entry
            .path()
            .map_err(|e| ArchiveError::NotATar(e.to_string()))?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_owned();
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry
            .read_to_end(&mut bytes)
            .map_err(|e| ArchiveError::NotATar(e.to_string()))?;
        out.insert(path, bytes);
    }
    Ok(out)
}

fn json<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, ArchiveError> {
    serde_json::from_slice(bytes).map_err(|e| ArchiveError::BadJson {
        what: what.to_owned(),
        reason: e.to_string(),
    })
}

/// One image of a docker-archive's `manifest.json`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Vec<String>,
    layers: Vec<String>,
}

/// A docker-archive's files (`docker save`: `manifest.json`, the config
/// and the layer tars by path) as the OCI layout of the same images: the
/// blobs by digest, a manifest per image, an index entry per tag.
fn docker_to_oci(
    files: BTreeMap<String, Vec<u8>>,
) -> Result<BTreeMap<String, Vec<u8>>, ArchiveError> {
    let entries: Vec<DockerEntry> = json("manifest.json", &files["manifest.json"])?;
    let mut index = Vec::new();
    let mut blobs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for e in entries {
        let mut blob = |path: &str, layer: bool| -> Result<serde_json::Value, ArchiveError> {
            let bytes = files
                .get(path)
                .cloned()
                .ok_or_else(|| ArchiveError::Missing(path.to_owned()))?;
            let media_type = match (layer, bytes.starts_with(&[0x1f, 0x8b])) {
                (false, _) => "application/vnd.oci.image.config.v1+json",
                (true, false) => "application/vnd.oci.image.layer.v1.tar",
                (true, true) => "application/vnd.oci.image.layer.v1.tar+gzip",
            };
            let digest = digest_of(&bytes);
            let d =
                serde_json::json!({"mediaType": media_type, "digest": digest, "size": bytes.len()});
            blobs.insert(digest, bytes);
            Ok(d)
        };
        let config = blob(&e.config, false)?;
        let mut layers = Vec::new();
        for l in &e.layers {
            layers.push(blob(l, true)?);
        }
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers,
        }))
        .map_err(|e| ArchiveError::NotATar(e.to_string()))?;
        let digest = digest_of(&manifest);
        if e.repo_tags.is_empty() {
            return Err(ArchiveError::Unnamed(digest));
        }
        for tag in &e.repo_tags {
            index.push(serde_json::json!({
                "mediaType": OCI_MANIFEST, "digest": digest, "size": manifest.len(),
                "annotations": {"io.containerd.image.name": tag},
            }));
        }
        blobs.insert(digest, manifest);
    }
    let mut out = BTreeMap::new();
    for (digest, bytes) in blobs {
        out.insert(format!("blobs/sha256/{}", hex_of(&digest)?), bytes);
    }
    out.insert(
        "oci-layout".into(),
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    );
    let index = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": index}))
        .map_err(|e| ArchiveError::NotATar(e.to_string()))?;
    out.insert("index.json".into(), index);
    Ok(out)
}

/// Reads and checks an image archive: an OCI layout, or a docker-archive
/// (read as the OCI layout of the same images).
pub fn read(reader: impl Read) -> Result<Archive, ArchiveError> {
    let mut files = files(reader)?;
    if !files.contains_key("oci-layout") || !files.contains_key("index.json") {
        if !files.contains_key("manifest.json") {
            return Err(ArchiveError::NotOci);
        }
        files = docker_to_oci(files)?;
    }
    let index: Index = json("index.json", &files["index.json"])?;
    let mut archive = Archive::default();
    let mut take = |d: &Descriptor| -> Result<Vec<u8>, ArchiveError> {
        let hex = hex_of(&d.digest)?;
        let bytes = files
            .get(&format!("blobs/sha256/{hex}"))
            .ok_or_else(|| ArchiveError::Missing(d.digest.clone()))?;
        if bytes.len() as u64 != d.size || digest_of(bytes) != d.digest {
            return Err(ArchiveError::Mismatch(d.digest.clone()));
        }
        archive.blobs.insert(d.digest.clone(), bytes.clone());
        Ok(bytes.clone())
    };
    let mut images = Vec::new();
    for m in &index.manifests {
        if m.media_type != OCI_MANIFEST && m.media_type != DOCKER_MANIFEST {
            return Err(ArchiveError::MediaType {
                digest: m.digest.clone(),
                media_type: m.media_type.clone(),
            });
        }
        let manifest: Manifest = json(&format!("manifest {}", m.digest), &take(m)?)?;
        let config: Config = json(
            &format!("config {}", manifest.config.digest),
            &take(&manifest.config)?,
        )?;
        if config.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(ArchiveError::BadJson {
                what: format!("config {}", manifest.config.digest),
                reason: format!(
                    "{} diff_ids for {} layers",
                    config.rootfs.diff_ids.len(),
                    manifest.layers.len()
                ),
            });
        }
        for d in &config.rootfs.diff_ids {
            hex_of(d)?;
        }
        for layer in &manifest.layers {
            take(layer)?;
        }
        let name = m
            .annotations
            .get("io.containerd.image.name")
            .or_else(|| m.annotations.get("org.opencontainers.image.ref.name"))
            .ok_or_else(|| ArchiveError::Unnamed(m.digest.clone()))?;
        images.push(ArchiveImage {
            name: normalize(name)?,
            manifest: m.clone(),
            config: manifest.config,
            layers: manifest.layers,
            diff_ids: config.rootfs.diff_ids,
        });
    }
    if images.is_empty() {
        return Err(ArchiveError::Empty);
    }
    archive.images = images;
    Ok(archive)
}

/// A manifest's config and layers (from containerd's content store).
pub fn parse_manifest(bytes: &[u8]) -> Result<(Descriptor, Vec<Descriptor>), ArchiveError> {
    let m: Manifest = json("the manifest", bytes)?;
    Ok((m.config, m.layers))
}

/// A config's layer diff IDs.
pub fn parse_diff_ids(bytes: &[u8]) -> Result<Vec<String>, ArchiveError> {
    let c: Config = json("the image config", bytes)?;
    Ok(c.rootfs.diff_ids)
}

/// The chain IDs of layers with `diff_ids` (the OCI image spec's: the
/// first is its diff ID, each next one the digest of the one below, a
/// space and its diff ID), which name their unpacked snapshots.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(below) => digest_of(format!("{below} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// An image name as Docker reads it: `busybox` is
/// `docker.io/library/busybox:latest`, `me/app:1` is `docker.io/me/app:1`,
/// a first component with a dot or a port (or `localhost`) is a registry.
pub fn normalize(name: &str) -> Result<String, ArchiveError> {
    let bad = || ArchiveError::Name(name.to_owned());
    if name.is_empty() || name.len() > 255 {
        return Err(bad());
    }
    let (rest, digest) = match name.split_once('@') {
        Some((r, d)) => (r, Some(hex_of(d).map_err(|_| bad())?.to_owned())),
        None => (name, None),
    };
    // A tag follows the last ':' after the last '/'.
    let slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (repo, tag) = match rest[slash..].find(':') {
        Some(i) => (&rest[..slash + i], Some(&rest[slash + i + 1..])),
        None => (rest, None),
    };
    let mut parts: Vec<&str> = repo.split('/').collect();
    let registry = if parts.len() > 1
        && (parts[0].contains('.') || parts[0].contains(':') || parts[0] == "localhost")
    {
        let r = parts.remove(0);
        let host_ok = r
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'));
        if !host_ok {
            return Err(bad());
        }
        r.to_owned()
    } else {
        "docker.io".to_owned()
    };
    if registry == "docker.io" && parts.len() == 1 {
        parts.insert(0, "library");
    }
    let component_ok = |c: &str| {
        !c.is_empty()
            && c.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
            })
            && c.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
    };
    if !parts.iter().all(|c| component_ok(c)) {
        return Err(bad());
    }
    let tag_ok = |t: &str| {
        (1..=128).contains(&t.len())
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            && t.bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
    };
    let mut out = format!("{registry}/{}", parts.join("/"));
    match (tag, &digest) {
        (Some(t), _) if !tag_ok(t) => return Err(bad()),
        (Some(t), _) => out = format!("{out}:{t}"),
        (None, None) => out.push_str(":latest"),
        (None, Some(_)) => {}
    }
    if let Some(d) = digest {
        out = format!("{out}@sha256:{d}");
    }
    Ok(out)
}

#[cfg(test)]
pub mod tests {
    use super::*;

    #[test]
    fn names_are_normalised_as_docker_does_and_bad_ones_refused() {
        for (given, want) in [
            ("busybox", "docker.io/library/busybox:latest"),
            ("busybox:1.36", "docker.io/library/busybox:1.36"),
            ("me/app:v2", "docker.io/me/app:v2"),
            ("lab.local/busybox:1", "lab.local/busybox:1"),
            ("10.210.0.1:5000/a/b", "10.210.0.1:5000/a/b:latest"),
            ("localhost/x:y", "localhost/x:y"),
            (
                "docker.io/library/busybox:latest",
                "docker.io/library/busybox:latest",
            ),
        ] {
            assert_eq!(normalize(given).unwrap(), want, "{given}");
        }
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            normalize(&format!("busybox@{d}")).unwrap(),
            format!("docker.io/library/busybox@{d}")
        );
        for bad in [
            "",
            "Busybox",
            "busybox:",
            "a//b",
            "-a",
            "busybox:-x",
            "a b",
            "busybox@sha256:zz",
            "busybox@md5:00",
            "ré/x",
            "x:y:z",
        ] {
            assert!(normalize(bad).is_err(), "{bad:?}");
        }
    }

    /// An OCI archive of one image named `name`, with one layer holding
    /// `files` (path, bytes), as a tar.
    pub fn archive(name: &str, files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut layer = tar::Builder::new(Vec::new());
        for (path, bytes) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o755);
            h.set_cksum();
            layer.append_data(&mut h, path, *bytes).unwrap();
        }
        let layer = layer.into_inner().unwrap();
        let layer_d = digest_of(&layer);
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [layer_d]},
        }))
        .unwrap();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest_of(&config), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_d, "size": layer.len()}],
        }))
        .unwrap();
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": digest_of(&manifest), "size": manifest.len(),
                "annotations": {"io.containerd.image.name": name}}],
        }))
        .unwrap();
        let mut out = tar::Builder::new(Vec::new());
        let mut add = |path: &str, bytes: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            out.append_data(&mut h, path, bytes).unwrap();
        };
        add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
        add("index.json", &index);
        for blob in [&layer, &config, &manifest] {
            add(&format!("blobs/sha256/{}", &digest_of(blob)[7..]), blob);
        }
        out.into_inner().unwrap()
    }

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let chains = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(chains[0], a);
        assert_eq!(chains[1], digest_of(format!("{a} {b}").as_bytes()));
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn an_archive_is_read_whole_and_every_blob_checked() {
        let bytes = archive("lab.local/tiny:1", &[("hello", b"hi")]);
        let a = read(&bytes[..]).unwrap();
        assert_eq!(a.images.len(), 1);
        let img = &a.images[0];
        assert_eq!(img.name, "lab.local/tiny:1");
        assert_eq!(a.blobs.len(), 3);
        assert_eq!(
            digest_of(&a.blobs[&img.manifest.digest]),
            img.manifest.digest
        );

        // A blob changed after the fact: refused, naming it.
        let layer = &img.layers[0].digest;
        let mut files = files(&bytes[..]).unwrap();
        files.insert(format!("blobs/sha256/{}", &layer[7..]), b"other".to_vec());
        let retar = |files: &BTreeMap<String, Vec<u8>>| {
            let mut out = tar::Builder::new(Vec::new());
            for (p, b) in files {
                let mut h = tar::Header::new_gnu();
                h.set_size(b.len() as u64);
                h.set_cksum();
                out.append_data(&mut h, p, &b[..]).unwrap();
            }
            out.into_inner().unwrap()
        };
        assert_eq!(
            read(&retar(&files)[..]).unwrap_err(),
            ArchiveError::Mismatch(layer.clone())
        );
        files.remove(&format!("blobs/sha256/{}", &layer[7..]));
        assert_eq!(
            read(&retar(&files)[..]).unwrap_err(),
            ArchiveError::Missing(layer.clone())
        );

        // Not an archive, a docker-archive, an unnamed or badly named image.
        assert!(matches!(
            read(&b"not a tar at all"[..]),
            Err(ArchiveError::NotATar(_) | ArchiveError::NotOci)
        ));
        let docker = retar(&BTreeMap::from([(
            "manifest.json".to_owned(),
            b"[]".to_vec(),
        )]));
        assert_eq!(read(&docker[..]).unwrap_err(), ArchiveError::Empty);

        // The same image as a docker-archive (`docker save` before Docker
        // 25): read as the same config and layer, under each of its tags.
        let oci = super::files(&bytes[..]).unwrap();
        let blob = |d: &str| oci[&format!("blobs/sha256/{}", &d[7..])].clone();
        let docker = BTreeMap::from([
            (
                "manifest.json".to_owned(),
                serde_json::to_vec(&serde_json::json!([{
                    "Config": "cfg.json",
                    "RepoTags": ["tiny:1", "lab.local/tiny:2"],
                    "Layers": ["abc/layer.tar"],
                }]))
                .unwrap(),
            ),
            ("cfg.json".to_owned(), blob(&img.config.digest)),
            ("abc/layer.tar".to_owned(), blob(&img.layers[0].digest)),
        ]);
        let d = read(&retar(&docker)[..]).unwrap();
        let names: Vec<&str> = d.images.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["docker.io/library/tiny:1", "lab.local/tiny:2"]);
        assert_eq!(d.images[0].config.digest, img.config.digest);
        assert_eq!(d.images[0].layers[0].digest, img.layers[0].digest);
        assert_eq!(d.images[0].diff_ids, img.diff_ids);
        let mut missing = docker.clone();
        missing.remove("abc/layer.tar");
        assert_eq!(
            read(&retar(&missing)[..]).unwrap_err(),
            ArchiveError::Missing("abc/layer.tar".into())
        );
        let bad_name = archive("Not A Name", &[("x", b"y")]);
        assert!(matches!(read(&bad_name[..]), Err(ArchiveError::Name(_))));
    }
}
