//! Test images, built here from Debian packages (nothing is downloaded):
//! OCI image archives (`oci-layout`, `index.json`, `blobs/sha256/…` in a
//! tar) with one uncompressed layer.

use std::path::Path;

use anyhow::Context;
use serde_json::json;

/// `sha256:<hex>` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A tar of `entries`, by path.
fn tar_of<S: AsRef<str>>(entries: &[(S, Entry)]) -> anyhow::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, entry) in entries {
        let path = path.as_ref();
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
fn layer_and_config<S: AsRef<str>>(
    layer: &[(S, Entry)],
    cmd: &[&str],
) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
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
    Ok(oci_archive_and_digest(name, layer, cmd)?.0)
}

/// [`oci_archive`], and the digest of the image's manifest (what a
/// service names with `NAME@DIGEST`).
pub fn oci_archive_and_digest<S: AsRef<str>>(
    name: &str,
    layer: &[(S, Entry)],
    cmd: &[&str],
) -> anyhow::Result<(Vec<u8>, String)> {
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
    let archive = tar_of(&[
        ("oci-layout", file(br#"{"imageLayoutVersion":"1.0.0"}"#)),
        ("index.json", file(&index)),
        (&blob(&layer), file(&layer)),
        (&blob(&config), file(&config)),
        (&blob(&manifest), file(&manifest)),
    ])?;
    Ok((archive, digest(&manifest)))
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

/// The layer of the tools image: busybox with every applet it lists linked
/// at its place (`/bin/ls`, `/sbin/ip`, `/usr/bin/wget` …), and host
/// programs `programs` (from, to: a path inside the image) with the shared
/// libraries `ldd` names for them, at the paths `ldd` gives. A program
/// is stripped of its symbols and debugging sections (`strip`, from binutils, which
/// Rust's linker brings).
pub fn tools_layer(programs: &[(&Path, &str)]) -> anyhow::Result<Vec<(String, Entry)>> {
    let mut out: Vec<(String, Entry)> = busybox_layer()?
        .into_iter()
        .map(|(p, e)| (p.to_owned(), e))
        .collect();
    let list = std::process::Command::new("/bin/busybox")
        .arg("--list-full")
        .output()
        .context("cannot run /bin/busybox --list-full")?;
    let mut seen: std::collections::BTreeSet<String> = out.iter().map(|(p, _)| p.clone()).collect();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim_start_matches('/');
        if applet.is_empty() || !seen.insert(applet.to_owned()) {
            continue;
        }
        let depth = applet.matches('/').count();
        let target = format!("{}bin/busybox", "../".repeat(depth));
        out.push((applet.to_owned(), Entry::Link(target)));
    }
    for (from, to) in programs {
        let stripped = tempfile::NamedTempFile::new()?;
        let strip = std::process::Command::new("strip")
            .arg("--strip-all")
            .arg("-o")
            .arg(stripped.path())
            .arg(from)
            .status()
            .context("cannot run strip (install binutils)")?;
        anyhow::ensure!(strip.success(), "strip {} failed", from.display());
        let to = to.trim_start_matches('/').to_owned();
        // The program replaces a busybox applet of that name, if any.
        if !seen.insert(to.clone()) {
            out.retain(|(p, _)| *p != to);
        }
        out.push((to, Entry::File(std::fs::read(stripped.path())?, 0o755)));
        for lib in shared_libraries(from)? {
            let at = lib.trim_start_matches('/').to_owned();
            if seen.insert(at.clone()) {
                let bytes = std::fs::read(&lib).with_context(|| format!("cannot read {lib}"))?;
                out.push((at, Entry::File(bytes, 0o755)));
            }
        }
    }
    Ok(out)
}

/// The shared libraries `ldd PROGRAM` names (absolute paths).
fn shared_libraries(program: &Path) -> anyhow::Result<Vec<String>> {
    let out = std::process::Command::new("ldd")
        .arg(program)
        .output()
        .context("cannot run ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" and
    // "\t/lib64/ld-linux-x86-64.so.2 (0x…)"; a static program has none.
    Ok(text
        .lines()
        .filter_map(|l| {
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| path.to_owned())
        })
        .collect())
}
