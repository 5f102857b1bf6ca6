//! Running a container of an image through containerd: the image's
//! unpacked snapshot, the runtime spec from `oci`, a container and its task
//! (runc through containerd's v2 shim), output to files. Today this serves
//! `shoal debug run` (a one-off container, as `docker run --rm`); the
//! executor will run tasks with it (issue 15).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use containerd_client::services::v1::container::Runtime;
use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{PrepareSnapshotRequest, RemoveSnapshotRequest};
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{
    Container, CreateContainerRequest, CreateTaskRequest, DeleteContainerRequest,
    DeleteProcessRequest, DeleteTaskRequest, ExecProcessRequest, GetContainerRequest,
    GetImageRequest, GetRequest, KillRequest, ListContainersRequest, ReadContentRequest,
    ResizePtyRequest, StartRequest, WaitRequest,
};
use containerd_client::tonic::Code;

use super::archive;
use super::engine::{Engine, EngineError, command_error};
use super::images::{SNAPSHOTTER, request};
use super::oci::{self, EtcFiles, ImageConfig, TaskRun};

/// The runtime spec's type, as containerd stores it.
const SPEC_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// An exec'd process's spec's type.
const PROCESS_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";

/// A one-off container.
pub struct OneOff {
    /// Its ID (also its snapshot's key and its hostname).
    pub id: String,
    /// The image's normalised name.
    pub image: String,
    /// The command, replacing the image's `CMD`.
    pub args: Vec<String>,
    /// The network namespace it joins (a new one when `None`).
    pub netns: Option<PathBuf>,
    /// Where its `/etc` files and output go.
    pub dir: PathBuf,
    /// Its resource limits.
    pub limits: oci::Limits,
}

/// A container to create and start.
pub struct NewContainer<'a> {
    /// Its ID (also its snapshot's key).
    pub id: &'a str,
    /// The image's normalised name.
    pub image: &'a str,
    /// The manifest digest the image must have, if the service fixed one.
    pub digest: Option<&'a str>,
    /// What the service and the node say about it.
    pub run: TaskRun,
    /// Where its standard output goes (appended).
    pub stdout: PathBuf,
    /// And its standard error (may be the same file).
    pub stderr: PathBuf,
    /// Labels on the container record.
    pub labels: HashMap<String, String>,
}

/// One of Shoal's containers, as containerd has it.
#[derive(Debug, Clone)]
pub struct Found {
    /// Its ID.
    pub id: String,
    /// Its labels.
    pub labels: HashMap<String, String>,
    /// Whether its task runs.
    pub running: bool,
}

/// How a one-off container ended.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Ended {
    /// Its exit status.
    pub exit_status: u32,
    /// What it wrote to standard output.
    pub stdout: String,
    /// And to standard error.
    pub stderr: String,
}

/// The files bound at `/etc/resolv.conf`, `/etc/hosts` and `/etc/hostname`,
/// written in `dir`.
fn write_etc(dir: &Path, hostname: &str) -> std::io::Result<EtcFiles> {
    std::fs::create_dir_all(dir)?;
    write_etc_files(
        EtcFiles {
            resolv_conf: dir.join("resolv.conf"),
            hosts: dir.join("hosts"),
            hostname: dir.join("hostname"),
        },
        hostname,
        None,
    )
}

/// Where an exec'd process's input and output go.
pub enum ExecIo<'a> {
    /// Output and errors appended to files (which may be one); no input.
    Files(&'a Path, &'a Path),
    /// A client's FIFOs: input read from `stdin` when given, output
    /// written to `stdout`, errors to `stderr` (on a terminal, both go to
    /// `stdout`); on a terminal of `terminal`'s size (columns, rows; 0
    /// when unknown) when given.
    Fifos {
        /// Input.
        stdin: Option<&'a Path>,
        /// Output.
        stdout: &'a Path,
        /// Errors, off a terminal.
        stderr: Option<&'a Path>,
        /// The terminal's size, when on one.
        terminal: Option<(u16, u16)>,
    },
}

/// File `path` of a snapshot whose `mounts` containerd gave (an overlay
/// of layer directories, or a bind of one), as the container will see it:
/// from the topmost directory that has it, at most
/// [`oci::MAX_ACCOUNTS_FILE`] of it; empty when none has it or it is not
/// a regular file (a symbolic link is not followed: it would point into
/// the host). Whiteouts are not read: a file an upper layer deleted may
/// be found in a lower one.
pub fn read_from_layers(mounts: &[containerd_client::types::Mount], path: &str) -> String {
    use std::io::Read;
    'layers: for dir in layer_dirs(mounts) {
        // No component may be a symbolic link (`etc -> /` would lead into
        // the host's files).
        let mut file = dir;
        let parts: Vec<&str> = path.split('/').collect();
        for (i, part) in parts.iter().enumerate() {
            file.push(part);
            match std::fs::symlink_metadata(&file) {
                Err(_) => continue 'layers,
                Ok(m) if i + 1 < parts.len() && m.is_dir() => {}
                Ok(m) if i + 1 == parts.len() && m.is_file() => {}
                Ok(_) => return String::new(),
            }
        }
        let mut text = Vec::new();
        let read = std::fs::File::open(&file)
            .and_then(|f| f.take(oci::MAX_ACCOUNTS_FILE).read_to_end(&mut text));
        return read.map_or_else(
            |_| String::new(),
            |_| String::from_utf8_lossy(&text).into_owned(),
        );
    }
    String::new()
}

/// The directories of a snapshot's mounts, topmost first: an overlay's
/// `upperdir` then its `lowerdir`s, or a bind mount's source. Pure.
pub fn layer_dirs(mounts: &[containerd_client::types::Mount]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for m in mounts {
        if m.r#type == "bind" {
            out.push(PathBuf::from(&m.source));
            continue;
        }
        let option = |key: &str| {
            m.options
                .iter()
                .find_map(|o| o.strip_prefix(key).map(str::to_owned))
        };
        out.extend(option("upperdir=").map(PathBuf::from));
        if let Some(lower) = option("lowerdir=") {
            out.extend(lower.split(':').map(PathBuf::from));
        }
    }
    out
}

/// `/etc/hosts` of a container named `hostname` whose address is
/// `address` (as Docker writes it: its own name maps to its address, so
/// that it resolves to what the other tasks reach it at), 127.0.1.1 when
/// it has none. Pure.
pub fn hosts_file(hostname: &str, address: Option<std::net::Ipv4Addr>) -> String {
    let own = address.map_or_else(|| "127.0.1.1".to_owned(), |a| a.to_string());
    format!("127.0.0.1\tlocalhost\n::1\tlocalhost\n{own}\t{hostname}\n")
}

/// Writes the files `etc` names for a container named `hostname` at
/// `address`.
pub fn write_etc_files(
    etc: EtcFiles,
    hostname: &str,
    address: Option<std::net::Ipv4Addr>,
) -> std::io::Result<EtcFiles> {
    std::fs::write(&etc.resolv_conf, "nameserver 127.0.0.11\noptions ndots:0\n")?;
    std::fs::write(&etc.hosts, hosts_file(hostname, address))?;
    std::fs::write(&etc.hostname, format!("{hostname}\n"))?;
    Ok(etc)
}

impl Engine {
    /// A blob of the content store, whole.
    async fn read_blob(&self, digest: &str) -> Result<Vec<u8>, EngineError> {
        let mut content = ContentClient::new(self.channel().await?);
        let req = ReadContentRequest {
            digest: digest.to_owned(),
            offset: 0,
            size: 0,
        };
        let mut stream = content
            .read(request(req, None))
            .await
            .map_err(|s| self.failed("read a blob", s))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|s| self.failed("read a blob", s))?
        {
            out.extend_from_slice(&chunk.data);
        }
        Ok(out)
    }

    /// An image's run settings, the chain ID of its top snapshot and its
    /// manifest digest.
    async fn image_for_run(
        &self,
        name: &str,
    ) -> Result<(ImageConfig, String, String), EngineError> {
        let mut images = ImagesClient::new(self.channel().await?);
        let got = images
            .get(request(
                GetImageRequest {
                    name: name.to_owned(),
                },
                None,
            ))
            .await;
        let image = match got {
            Ok(r) => r.into_inner().image.unwrap_or_default(),
            Err(s) if s.code() == Code::NotFound => {
                return Err(EngineError::NoImage(name.to_owned()));
            }
            Err(s) => return Err(self.failed("find an image", s)),
        };
        let bad = |e: String| EngineError::Call {
            what: format!("read image {name}"),
            code: "DataLoss".into(),
            message: e,
        };
        let digest = image.target.unwrap_or_default().digest;
        let manifest = self.read_blob(&digest).await?;
        let (config, _) = archive::parse_manifest(&manifest).map_err(|e| bad(e.to_string()))?;
        let config = self.read_blob(&config.digest).await?;
        let diff_ids = archive::parse_diff_ids(&config).map_err(|e| bad(e.to_string()))?;
        let top = archive::chain_ids(&diff_ids).pop().unwrap_or_default();
        let run = ImageConfig::from_json(&config).map_err(|e| bad(e.to_string()))?;
        Ok((run, top, digest))
    }

    /// Image `name`'s own health check, if it has one.
    pub async fn image_health(
        &self,
        name: &str,
    ) -> Result<Option<shoal_mesh::service::HealthCheck>, EngineError> {
        let (image, _, _) = self.image_for_run(name).await?;
        Ok(image.healthcheck.map(|h| h.check()))
    }

    /// Creates and starts container `c` (its snapshot, the container and
    /// its task); what it made is removed again when a step fails. Returns
    /// the image's run settings.
    pub async fn start(&self, c: NewContainer<'_>) -> Result<ImageConfig, EngineError> {
        let (image, top, digest) = self.image_for_run(c.image).await?;
        if let Some(want) = c.digest
            && want != digest
        {
            return Err(EngineError::OtherImage {
                name: c.image.to_owned(),
                want: want.to_owned(),
                have: digest,
            });
        }
        // The new snapshot is held by a lease until the container refers
        // to it: else containerd's garbage collector may take it between
        // the two calls.
        let lease = self.create_lease("shoal-run").await?;
        let result = self.create_and_start(&c, &lease, &top, &image).await;
        self.delete_lease(lease).await;
        if result.is_err() {
            self.remove_container(c.id).await;
        }
        result.map(|()| image)
    }

    /// Runs `c` to its end and removes it.
    pub async fn run_once(&self, c: &OneOff) -> Result<Ended, EngineError> {
        let io = |e: std::io::Error| EngineError::Call {
            what: format!("write {}", c.dir.display()),
            code: "Io".into(),
            message: e.to_string(),
        };
        let run = TaskRun {
            hostname: c.id.clone(),
            args: c.args.clone(),
            netns: c.netns.clone(),
            etc: write_etc(&c.dir, &c.id).map_err(io)?,
            cgroup: format!("/shoal/{}", c.id),
            limits: c.limits,
            ..Default::default()
        };
        let started = self
            .start(NewContainer {
                id: &c.id,
                image: &c.image,
                digest: None,
                run,
                stdout: c.dir.join("stdout"),
                stderr: c.dir.join("stderr"),
                labels: HashMap::new(),
            })
            .await;
        let result = match started {
            Ok(_) => self.wait(&c.id).await,
            Err(e) => Err(e),
        };
        self.remove_container(&c.id).await;
        let ended = result?;
        let read = |name: &str| std::fs::read_to_string(c.dir.join(name)).unwrap_or_default();
        Ok(Ended {
            exit_status: ended,
            stdout: read("stdout"),
            stderr: read("stderr"),
        })
    }

    async fn create_and_start(
        &self,
        c: &NewContainer<'_>,
        lease: &str,
        top: &str,
        image: &ImageConfig,
    ) -> Result<(), EngineError> {
        let channel = self.channel().await?;
        let mounts = SnapshotsClient::new(channel.clone())
            .prepare(request(
                PrepareSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: c.id.to_owned(),
                    parent: top.to_owned(),
                    labels: HashMap::new(),
                },
                Some(lease),
            ))
            .await
            .map_err(|s| self.failed("prepare the container's snapshot", s))?
            .into_inner()
            .mounts;
        // User and group names are the image's: read from its layers.
        let mut run = c.run.clone();
        run.accounts = oci::Accounts {
            passwd: read_from_layers(&mounts, "etc/passwd"),
            group: read_from_layers(&mounts, "etc/group"),
        };
        let spec = oci::runtime_spec(image, &run).map_err(EngineError::Spec)?;
        let spec = serde_json::to_vec(&spec).unwrap_or_default();
        let container = Container {
            id: c.id.to_owned(),
            image: c.image.to_owned(),
            labels: c.labels.clone(),
            runtime: Some(Runtime {
                name: "io.containerd.runc.v2".into(),
                options: None,
            }),
            spec: Some(prost_types::Any {
                type_url: SPEC_TYPE.into(),
                value: spec,
            }),
            snapshotter: SNAPSHOTTER.into(),
            snapshot_key: c.id.to_owned(),
            ..Default::default()
        };
        ContainersClient::new(channel.clone())
            .create(request(
                CreateContainerRequest {
                    container: Some(container),
                },
                Some(lease),
            ))
            .await
            .map_err(|s| self.failed("create a container", s))?;
        let file = |p: &Path| format!("file://{}", p.display());
        let mut tasks = TasksClient::new(channel);
        tasks
            .create(request(
                CreateTaskRequest {
                    container_id: c.id.to_owned(),
                    rootfs: mounts,
                    stdout: file(&c.stdout),
                    stderr: file(&c.stderr),
                    ..Default::default()
                },
                None,
            ))
            .await
            .map_err(|s| {
                command_error(s.message()).unwrap_or_else(|| self.failed("create a task", s))
            })?;
        let start = StartRequest {
            container_id: c.id.to_owned(),
            exec_id: String::new(),
        };
        tasks.start(request(start, None)).await.map_err(|s| {
            command_error(s.message()).unwrap_or_else(|| self.failed("start a task", s))
        })?;
        Ok(())
    }

    /// Waits for container `id`'s task to end; its exit status.
    pub async fn wait(&self, id: &str) -> Result<u32, EngineError> {
        let wait = WaitRequest {
            container_id: id.to_owned(),
            exec_id: String::new(),
        };
        let status = TasksClient::new(self.channel().await?)
            .wait(request(wait, None))
            .await
            .map_err(|s| self.failed("wait for a task", s))?
            .into_inner()
            .exit_status;
        Ok(status)
    }

    /// Sends `signal` to container `id`'s process (to all its processes
    /// when `all`).
    pub async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<(), EngineError> {
        let kill = KillRequest {
            container_id: id.to_owned(),
            exec_id: String::new(),
            signal,
            all,
        };
        TasksClient::new(self.channel().await?)
            .kill(request(kill, None))
            .await
            .map_err(|s| self.failed("signal a task", s))?;
        Ok(())
    }

    /// Runs `args` inside running container `id` as its own process runs
    /// (user, capabilities, working directory and environment from the
    /// container's spec, plus `env`), its input and output as `io` says;
    /// waits at most `limit` (then kills it); its exit status, `None` on
    /// timeout.
    pub async fn exec(
        &self,
        id: &str,
        args: &[String],
        env: &[String],
        io: ExecIo<'_>,
        limit: Option<std::time::Duration>,
    ) -> Result<Option<u32>, EngineError> {
        let channel = self.channel().await?;
        let container = ContainersClient::new(channel.clone())
            .get(request(GetContainerRequest { id: id.to_owned() }, None))
            .await
            .map_err(|s| self.failed("find the task's container", s))?
            .into_inner()
            .container
            .unwrap_or_default();
        let spec: serde_json::Value =
            serde_json::from_slice(&container.spec.unwrap_or_default().value).unwrap_or_default();
        let mut process = spec["process"].clone();
        process["args"] = serde_json::json!(args);
        let terminal = matches!(
            io,
            ExecIo::Fifos {
                terminal: Some(_),
                ..
            }
        );
        process["terminal"] = serde_json::json!(terminal);
        if let Some(vars) = process["env"].as_array_mut() {
            vars.extend(env.iter().map(|e| serde_json::json!(e)));
        }
        let exec_id = format!("shoal-exec-{:016x}", rand::random::<u64>());
        // containerd's shim appends to a `file://` path, and opens a plain
        // path as a FIFO.
        let file = |p: &Path| format!("file://{}", p.display());
        let fifo = |p: Option<&Path>| p.map(|p| p.display().to_string()).unwrap_or_default();
        let (stdin, stdout, stderr, size) = match io {
            ExecIo::Files(out, err) => (String::new(), file(out), file(err), None),
            ExecIo::Fifos {
                stdin,
                stdout,
                stderr,
                terminal,
            } => (fifo(stdin), fifo(Some(stdout)), fifo(stderr), terminal),
        };
        let mut tasks = TasksClient::new(channel);
        let exec = ExecProcessRequest {
            container_id: id.to_owned(),
            stdin,
            stdout,
            stderr,
            terminal,
            spec: Some(prost_types::Any {
                type_url: PROCESS_TYPE.into(),
                value: serde_json::to_vec(&process).unwrap_or_default(),
            }),
            exec_id: exec_id.clone(),
        };
        tasks.exec(request(exec, None)).await.map_err(|s| {
            command_error(s.message()).unwrap_or_else(|| self.failed("exec in a container", s))
        })?;
        let result = self
            .start_and_wait(&mut tasks, id, &exec_id, size, limit)
            .await;
        let delete = DeleteProcessRequest {
            container_id: id.to_owned(),
            exec_id,
        };
        let _ = tasks.delete_process(request(delete, None)).await;
        result
    }

    async fn start_and_wait(
        &self,
        tasks: &mut TasksClient<containerd_client::tonic::transport::Channel>,
        id: &str,
        exec_id: &str,
        size: Option<(u16, u16)>,
        limit: Option<std::time::Duration>,
    ) -> Result<Option<u32>, EngineError> {
        let start = StartRequest {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
        };
        tasks.start(request(start, None)).await.map_err(|s| {
            command_error(s.message()).unwrap_or_else(|| self.failed("start an exec'd process", s))
        })?;
        if let Some((width, height)) = size.filter(|(w, h)| *w > 0 && *h > 0) {
            let resize = ResizePtyRequest {
                container_id: id.to_owned(),
                exec_id: exec_id.to_owned(),
                width: width.into(),
                height: height.into(),
            };
            // The terminal keeps its default size if this fails.
            let _ = tasks.resize_pty(request(resize, None)).await;
        }
        let wait = WaitRequest {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
        };
        let mut waiting = tasks.clone();
        let waited = waiting.wait(request(wait, None));
        let limit = limit.unwrap_or(std::time::Duration::MAX);
        match tokio::time::timeout(limit, waited).await {
            Ok(r) => Ok(Some(
                r.map_err(|s| self.failed("wait for an exec'd process", s))?
                    .into_inner()
                    .exit_status,
            )),
            Err(_) => {
                let kill = KillRequest {
                    container_id: id.to_owned(),
                    exec_id: exec_id.to_owned(),
                    signal: 9,
                    all: false,
                };
                let _ = tasks.kill(request(kill, None)).await;
                Ok(None)
            }
        }
    }

    /// Shoal's containers here: ID, labels, and whether their task runs.
    pub async fn containers(&self) -> Result<Vec<Found>, EngineError> {
        let channel = self.channel().await?;
        let list = ContainersClient::new(channel.clone())
            .list(request(ListContainersRequest { filters: vec![] }, None))
            .await
            .map_err(|s| self.failed("list containers", s))?
            .into_inner()
            .containers;
        let mut tasks = TasksClient::new(channel);
        let mut out = Vec::new();
        for c in list {
            let got = tasks
                .get(request(
                    GetRequest {
                        container_id: c.id.clone(),
                        exec_id: String::new(),
                    },
                    None,
                ))
                .await;
            let running = match got {
                Ok(r) => r.into_inner().process.is_some_and(|p| {
                    p.status == containerd_client::types::v1::Status::Running as i32
                        || p.status == containerd_client::types::v1::Status::Created as i32
                }),
                Err(s) if s.code() == Code::NotFound => false,
                Err(s) => return Err(self.failed("look at a task", s)),
            };
            out.push(Found {
                id: c.id,
                labels: c.labels,
                running,
            });
        }
        Ok(out)
    }

    /// Removes container `id`: its task, itself, its snapshot (what is not
    /// there is skipped).
    pub async fn remove_container(&self, id: &str) {
        let Ok(channel) = self.channel().await else {
            return;
        };
        let task = DeleteTaskRequest {
            container_id: id.to_owned(),
        };
        let _ = TasksClient::new(channel.clone())
            .delete(request(task, None))
            .await;
        let container = DeleteContainerRequest { id: id.to_owned() };
        let _ = ContainersClient::new(channel.clone())
            .delete(request(container, None))
            .await;
        let snapshot = RemoveSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: id.to_owned(),
        };
        let _ = SnapshotsClient::new(channel)
            .remove(request(snapshot, None))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::hosts_file;
    use crate::daemon::engine::{EngineError, command_error};

    #[test]
    fn a_containers_name_maps_to_its_address_as_docker_writes_it() {
        let at = hosts_file("web.1", Some("10.0.1.3".parse().unwrap()));
        assert_eq!(
            at,
            "127.0.0.1\tlocalhost\n::1\tlocalhost\n10.0.1.3\tweb.1\n"
        );
        assert!(hosts_file("web.1", None).ends_with("127.0.1.1\tweb.1\n"));
    }

    #[test]
    fn an_images_account_files_are_read_from_its_topmost_layer_never_through_a_link() {
        use containerd_client::types::Mount;
        let tmp = tempfile::tempdir().unwrap();
        let layer = |name: &str, passwd: Option<&str>| {
            let dir = tmp.path().join(name);
            std::fs::create_dir_all(dir.join("etc")).unwrap();
            if let Some(p) = passwd {
                std::fs::write(dir.join("etc/passwd"), p).unwrap();
            }
            dir.display().to_string()
        };
        let (upper, top, base) = (
            layer("upper", None),
            layer("top", Some("top")),
            layer("base", Some("base")),
        );
        let overlay = Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                "index=off".into(),
                format!("workdir={}/work", tmp.path().display()),
                format!("upperdir={upper}"),
                format!("lowerdir={top}:{base}"),
            ],
            ..Default::default()
        };
        let dirs = super::layer_dirs(std::slice::from_ref(&overlay));
        assert_eq!(dirs.len(), 3);
        assert_eq!(
            super::read_from_layers(std::slice::from_ref(&overlay), "etc/passwd"),
            "top"
        );
        assert_eq!(super::read_from_layers(&[overlay], "etc/group"), "");
        let bind = Mount {
            r#type: "bind".into(),
            source: base,
            options: vec!["ro".into(), "rbind".into()],
            ..Default::default()
        };
        assert_eq!(super::read_from_layers(&[bind], "etc/passwd"), "base");
        // A hostile layer whose etc is a link to the host's: nothing read.
        let evil = tmp.path().join("evil");
        std::fs::create_dir_all(&evil).unwrap();
        std::os::unix::fs::symlink("/etc", evil.join("etc")).unwrap();
        let link = Mount {
            r#type: "bind".into(),
            source: evil.display().to_string(),
            ..Default::default()
        };
        assert_eq!(super::read_from_layers(&[link], "etc/passwd"), "");
    }

    #[test]
    fn runcs_words_for_a_missing_program_are_made_plain() {
        let missing = "failed to create shim task: OCI runtime create failed: runc create failed: unable to start container process: exec: \"/nonexistent/program\": stat /nonexistent/program: no such file or directory: unknown";
        let e = command_error(missing).unwrap();
        assert!(
            matches!(&e, EngineError::Command { program, .. } if program == "/nonexistent/program")
        );
        assert!(
            e.to_string().starts_with(
                "cannot start `/nonexistent/program`: no such executable in the image"
            ),
            "{e}"
        );
        let path = "OCI runtime exec failed: exec failed: unable to start container process: exec: \"curl\": executable file not found in $PATH: unknown";
        assert!(
            command_error(path)
                .unwrap()
                .to_string()
                .contains("`curl`: no such executable")
        );
        let mode =
            "unable to start container process: exec: \"/etc/passwd\": permission denied: unknown";
        assert!(
            command_error(mode)
                .unwrap()
                .to_string()
                .contains("not executable")
        );
        assert!(command_error("failed to mount rootfs: no space left on device").is_none());
        assert!(command_error("exec: \"unterminated").is_none());
    }
}
