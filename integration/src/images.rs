//! Test images, built here from Debian packages (nothing is downloaded):
//! OCI image archives (`oci-layout`, `index.json`, `blobs/sha256/…` in a
//! tar) with one uncompressed layer.

use anyhow::Context;
use serde_json::json;

/// `sha256:<hex>` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A tar of `entries`, by path.
fn tar_of(entries: &[(&str, Entry)]) -> anyhow::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, entry) in entries {
        let mut h = tar::Header::new_gnu();
        match entry {
            Entry::File(bytes, mode) => {
                h.set_size(bytes.len() as u64);
                h.set_mode(*mode);
                h.set_cksum();
                b.append_data(&mut h, path, &bytes[..])?;
            }
            Entry::Link(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                h.set_mode(0o777);
                b.append_link(&mut h, path, target)?;
            }
        }
    }
    Ok(b.into_inner()?)
}

/// What a layer holds at a path.
pub enum Entry {
    /// A file and its mode.
    File(Vec<u8>, u32),
    /// A symbolic link to a target.
    Link(String),
}

/// An image's layer (a tar of `layer`) and config, running `cmd`.
fn layer_and_config(layer: &[(&str, Entry)], cmd: &[&str]) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let layer = tar_of(layer)?;
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Cmd": cmd },
        "rootfs": { "type": "layers", "diff_ids": [digest(&layer)] },
    }))?;
    Ok((layer, config))
}

/// A docker-archive (`docker save` before Docker 25) of one image tagged
/// `tags` whose only layer holds `layer`, running `cmd` by default.
pub fn docker_archive(
    tags: &[&str],
    layer: &[(&str, Entry)],
    cmd: &[&str],
) -> anyhow::Result<Vec<u8>> {
    let (layer, config) = layer_and_config(layer, cmd)?;
    let manifest = serde_json::to_vec(&json!([{
        "Config": "config.json",
        "RepoTags": tags,
        "Layers": ["layer0/layer.tar"],
    }]))?;
    let file = |b: &[u8]| Entry::File(b.to_vec(), 0o644);
    tar_of(&[
        ("manifest.json", file(&manifest)),
        ("config.json", file(&config)),
        ("layer0/layer.tar", file(&layer)),
    ])
}

/// An OCI archive of one image named `name` whose only layer holds
/// `layer`, running `cmd` by default.
pub fn oci_archive(name: &str, layer: &[(&str, Entry)], cmd: &[&str]) -> anyhow::Result<Vec<u8>> {
    let (layer, config) = layer_and_config(layer, cmd)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest(&config),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": digest(&layer),
            "size": layer.len(),
        }],
    }))?;
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest(&manifest),
            "size": manifest.len(),
            "annotations": { "io.containerd.image.name": name },
        }],
    }))?;
    let blob = |b: &[u8]| format!("blobs/sha256/{}", &digest(b)[7..]);
    let file = |b: &[u8]| Entry::File(b.to_vec(), 0o644);
    tar_of(&[
        ("oci-layout", file(br#"{"imageLayoutVersion":"1.0.0"}"#)),
        ("index.json", file(&index)),
        (&blob(&layer), file(&layer)),
        (&blob(&config), file(&config)),
        (&blob(&manifest), file(&manifest)),
    ])
}

/// The layer of a busybox image: Debian's `busybox-static`
/// (`/bin/busybox`, `/bin/sh`). Needs the package (scripts/setup).
pub fn busybox_layer() -> anyhow::Result<Vec<(&'static str, Entry)>> {
    let busybox = std::fs::read("/bin/busybox")
        .context("cannot read /bin/busybox: install Debian's busybox-static (scripts/setup)")?;
    Ok(vec![
        ("bin/busybox", Entry::File(busybox, 0o755)),
        ("bin/sh", Entry::Link("busybox".into())),
    ])
}

/// A busybox image named `name`, as an OCI archive.
pub fn busybox(name: &str) -> anyhow::Result<Vec<u8>> {
    oci_archive(name, &busybox_layer()?, &["/bin/sh"])
}

/// A busybox image tagged `tags`, as a docker-archive.
pub fn busybox_docker(tags: &[&str]) -> anyhow::Result<Vec<u8>> {
    docker_archive(tags, &busybox_layer()?, &["/bin/sh"])
}
