//! Test and benchmark harness: real `shoal daemon` processes on this
//! machine, each on its own loopback address (`127.A.B.N:2377`) with its own
//! state dir and API socket, driven through the real `shoal` CLI.
//!
//! This crate never links Shoal's code: what it checks is what a user of the
//! binary sees. Processes it starts are killed when the [`Cluster`] drops.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub mod attack;
pub mod bench;
pub mod failover;
pub mod images;
pub mod lab;
pub mod scale;
pub mod spec;

use anyhow::{Context, bail};
use serde_json::Value;

/// The `shoal` binary, built on first use if this test run has not built it.
pub fn shoal_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("SHOAL_BIN") {
            return PathBuf::from(p);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let profile = if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        };
        let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        build
            .current_dir(&root)
            .args(["build", "--quiet", "-p", "shoal-node", "--bin", "shoal"]);
        if profile == "release" {
            build.arg("--release");
        }
        let status = build.status().expect("cannot run cargo to build shoal");
        assert!(status.success(), "building the shoal binary failed");
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join("target"));
        target.join(profile).join("shoal")
    })
}

pub use shoal_netdriver::privilege::{is_root, root_or_skip};

/// `service create --name NAME --replicas N EXTRA… TOOLS shoal tool
/// http-echo --port 80`: containers of the tools image running the
/// built-in workload, one per replica (the hosts need
/// [`Cluster::load_tools`]).
pub fn echo_service(name: &str, replicas: usize, extra: &[&str]) -> Vec<String> {
    tools_service(
        name,
        replicas,
        extra,
        &["shoal", "tool", "http-echo", "--port", "80"],
    )
}

/// `service create --name NAME --replicas N EXTRA… TOOLS COMMAND…`:
/// containers of the tools image running `command`.
pub fn tools_service(name: &str, replicas: usize, extra: &[&str], command: &[&str]) -> Vec<String> {
    let mut args = create_args(name, replicas, extra);
    args.push(tools_image().reference.clone());
    args.extend(command.iter().map(|s| (*s).to_owned()));
    args
}

/// The image the end-to-end tests run: busybox (every applet), this
/// build's `shoal` (for `shoal tool http-echo|http-get|udp-send`) and
/// glibc's `getent`, with their libraries (see [`images::tools_layer`]).
pub struct ToolsImage {
    /// Its OCI archive, beside the `shoal` binary it holds.
    pub archive: PathBuf,
    /// `lab.local/tools:1@sha256:…`: a service naming it so runs exactly
    /// this image, and nothing asks a registry for it.
    pub reference: String,
}

/// The name the tools image is loaded under.
pub const TOOLS_IMAGE: &str = "lab.local/tools:1";

/// The tools image of this `shoal` binary, built on first use (once per
/// binary: later test processes reuse the file).
pub fn tools_image() -> &'static ToolsImage {
    static IMAGE: OnceLock<ToolsImage> = OnceLock::new();
    IMAGE.get_or_init(|| build_tools_image().expect("cannot build the tools image"))
}

fn build_tools_image() -> anyhow::Result<ToolsImage> {
    let bin = shoal_bin();
    let meta = std::fs::metadata(bin)?;
    let stamp = meta
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let archive = bin.with_file_name(format!("lab-tools-{}-{stamp}.tar", meta.len()));
    let digest_file = archive.with_extension("digest");
    if let (true, Ok(digest)) = (archive.exists(), std::fs::read_to_string(&digest_file)) {
        return Ok(ToolsImage {
            archive,
            reference: format!("{TOOLS_IMAGE}@{}", digest.trim()),
        });
    }
    let getent = Path::new("/usr/bin/getent");
    let layer = images::tools_layer(&[(bin, "/usr/local/bin/shoal"), (getent, "/usr/bin/getent")])?;
    let (bytes, digest) = images::oci_archive_and_digest(TOOLS_IMAGE, &layer, &["/bin/sh"])?;
    // Whole files only, for test processes building it at once.
    let tmp = archive.with_extension(format!("{}.tmp", std::process::id()));
    std::fs::write(&tmp, &bytes)?;
    std::fs::write(&digest_file, &digest)?;
    std::fs::rename(&tmp, &archive)?;
    // Earlier builds' images go.
    let stem = |p: &Path| {
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        name.split('.').next().unwrap_or_default().to_owned()
    };
    let ours = stem(&archive);
    for e in std::fs::read_dir(archive.parent().unwrap_or(Path::new(".")))?.flatten() {
        let theirs = stem(&e.path());
        if theirs.starts_with("lab-tools-") && theirs != ours {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(ToolsImage {
        archive,
        reference: format!("{TOOLS_IMAGE}@{digest}"),
    })
}

/// `service create --name NAME --replicas N EXTRA…`.
fn create_args(name: &str, replicas: usize, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["service", "create", "--name", name, "--replicas"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    args.push(replicas.to_string());
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

/// What the web containers of the lab run (busybox's `httpd`): each
/// answers with its task's name (its hostname) and its IPv4 addresses, as
/// `{"task": "web.1", "addresses": ["10.0.1.3", …]}`, like the built-in
/// `shoal tool http-echo`.
pub const WEB_SCRIPT: &str = r#"busybox mkdir -p /www && A=$(busybox ip -o -4 addr | busybox awk '$2 != "lo" { split($4, a, "/"); printf "%s\"%s\"", (n++ ? "," : ""), a[1] }') && echo "{\"task\":\"$(busybox hostname)\",\"addresses\":[$A]}" > /www/index.html && exec busybox httpd -f -p 80 -h /www"#;

/// `service create --name NAME --replicas N EXTRA… IMAGE sh -c WEB_SCRIPT`:
/// web containers of `image` (the lab's busybox), one per replica.
pub fn web_service(name: &str, replicas: usize, extra: &[&str], image: &str) -> Vec<String> {
    let mut args = create_args(name, replicas, extra);
    args.extend([image, "sh", "-c", WEB_SCRIPT].map(str::to_owned));
    args
}

/// A unique `127.A.B.0` prefix for each cluster of this process, so that
/// tests can run in parallel and beside other test runs.
fn next_prefix() -> (u8, u8) {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    (
        (100 + pid % 100) as u8,
        ((pid / 100 + n * 7) % 250 + 1) as u8,
    )
}

/// What a CLI call printed and returned.
#[derive(Debug)]
pub struct Run {
    /// Exit code (-1 if killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Whether it exited 0.
    pub fn ok(&self) -> bool {
        self.code == 0
    }

    /// Stdout as JSON.
    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("not JSON: {}\nstderr: {}", self.stdout, self.stderr))
    }
}

/// One host of the cluster.
pub struct Host {
    /// Its hostname (`node1`, …).
    pub name: String,
    /// Its loopback address.
    pub ip: Ipv4Addr,
    /// Its state dir.
    pub state_dir: PathBuf,
    /// Its API socket.
    pub socket: PathBuf,
    /// Its daemon's log.
    pub log: PathBuf,
    /// Its network namespace, when hosts are isolated (else the daemon
    /// runs in the machine's own, with the data plane off).
    pub netns: Option<String>,
    /// Its containerd's root, state, socket and log (started on demand by
    /// [`Cluster::start_containerd`]; the daemon always points there).
    pub containerd_dir: PathBuf,
    /// More arguments its daemon gets when (re)started.
    pub daemon_args: Vec<String>,
    child: Option<Child>,
    containerd: Option<Child>,
}

impl Host {
    /// Its daemon's process ID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `IP:2377`.
    pub fn addr(&self) -> String {
        format!("{}:2377", self.ip)
    }
}

/// Daemons on one machine.
pub struct Cluster {
    /// The hosts, `node1` first.
    pub hosts: Vec<Host>,
    /// Where the hosts' state dirs, sockets and logs live.
    base: PathBuf,
    /// A temporary `base`, removed on drop (tests).
    _tmp: Option<tempfile::TempDir>,
    /// For isolated hosts: the prefix of every namespace of this cluster.
    netns_prefix: Option<String>,
    /// A lab that outlives this process: nothing is torn down on drop, and
    /// daemons run in sessions of their own.
    keep: bool,
}

/// The lab registry's `HOST:PORT` on the underlay of a host at `host`:
/// `.254` of its /24, port 5000.
pub fn registry_on(host: Ipv4Addr) -> String {
    let [a, b, c, _] = host.octets();
    format!("{a}.{b}.{c}.254:5000")
}

/// skopeo's name for the kind of image archive `path` is: an OCI archive
/// has an `oci-layout` file, a docker-archive (`docker save`) a
/// `manifest.json`.
fn transport(path: &Path) -> anyhow::Result<&'static str> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut docker = false;
    for entry in tar::Archive::new(file)
        .entries()
        .with_context(|| format!("{} is not a tar archive", path.display()))?
    {
        let entry = entry.with_context(|| format!("{} is not a tar archive", path.display()))?;
        match entry.path()?.to_string_lossy().trim_start_matches("./") {
            "oci-layout" => return Ok("oci-archive"),
            "manifest.json" => docker = true,
            _ => {}
        }
    }
    if docker {
        return Ok("docker-archive");
    }
    bail!(
        "{} is not an image archive: it has neither oci-layout (OCI) nor manifest.json (docker save)",
        path.display()
    )
}

/// Runs `ip ARGS…`, failing with its error output.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A token bucket of `rate` on `dev`'s egress in namespace `ns` (burst
/// large enough for the veths' 64 KB GSO packets, so that nothing is
/// segmented to be shaped: the bucket counts their wire bytes).
pub fn shape(ns: &str, dev: &str, rate: &str) -> anyhow::Result<()> {
    let out = Command::new("tc")
        .args(["-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf"])
        .args(["rate", rate, "burst", "256kb", "latency", "20ms"])
        .output()?;
    if !out.status.success() {
        bail!(
            "tc: cannot shape {dev} in {ns} to `{rate}` (a rate like 5gbit): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Cluster {
    /// Starts `n` daemons, none of them in a swarm yet.
    pub fn start(n: usize) -> anyhow::Result<Self> {
        Self::start_configured(n, None)
    }

    /// Starts `n` daemons with the daemon configuration file `toml` (or
    /// none), none of them in a swarm yet.
    pub fn start_configured(n: usize, toml: Option<&str>) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("shoal-test-").tempdir()?;
        if let Some(text) = toml {
            std::fs::write(dir.path().join("daemon.toml"), text)?;
        }
        let (a, b) = next_prefix();
        let mut cluster = Cluster {
            hosts: Vec::new(),
            base: dir.path().to_owned(),
            _tmp: Some(dir),
            netns_prefix: None,
            keep: false,
        };
        for i in 1..=n {
            cluster.add_host(Ipv4Addr::new(127, a, b, i as u8), &format!("node{i}"), None)?;
        }
        for i in 0..n {
            cluster.start_daemon(i)?;
        }
        Ok(cluster)
    }

    /// Starts `n` daemons each in a network namespace of its own (a host),
    /// joined by veths to a bridge in another (the underlay,
    /// 10.210.0.0/24), with the data plane on. Needs root. Every namespace
    /// (the hosts', the underlay's, and the ones the daemons make) starts
    /// with a prefix unique to this cluster and is removed on drop.
    pub fn start_isolated(n: usize) -> anyhow::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = tempfile::Builder::new().prefix("shoal-test-").tempdir()?;
        let prefix = format!(
            "shoal-lab{}x{}-",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let cluster = Cluster {
            hosts: Vec::new(),
            base: dir.path().to_owned(),
            _tmp: Some(dir),
            netns_prefix: Some(prefix.clone()),
            keep: false,
        };
        cluster.build_isolated(&spec::LabSpec::nodes(n, n)?)
    }

    /// The hosts' namespaces on an underlay, and their daemons (with the
    /// spec's `[daemon]` settings, if any).
    fn build_isolated(self, spec: &spec::LabSpec) -> anyhow::Result<Self> {
        let prefix = self.netns_prefix.clone().unwrap_or_default();
        let mut cluster = self;
        if let Some(text) = spec.daemon_toml()? {
            std::fs::write(cluster.daemon_config(), text)?;
        }
        let ul = format!("{prefix}ul");
        ip(&["netns", "add", &ul])?;
        ip(&["-n", &ul, "link", "add", "ul0", "type", "bridge"])?;
        ip(&["-n", &ul, "link", "set", "ul0", "up"])?;
        for (i, h) in spec.hosts.iter().enumerate() {
            let ns = format!("{prefix}h{}", i + 1);
            ip(&["netns", "add", &ns])?;
            let port = format!("ul{}", i + 1);
            ip(&[
                "-n", &ul, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&["-n", &ul, "link", "set", &port, "master", "ul0", "up"])?;
            let cidr = format!("{}/{}", h.address, spec.underlay.1);
            ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            cluster.add_host(h.address, &h.name, Some(ns))?;
        }
        for i in 0..spec.hosts.len() {
            cluster.start_daemon(i)?;
        }
        Ok(cluster)
    }

    /// The `--config` file every daemon of this cluster gets, if it exists.
    fn daemon_config(&self) -> PathBuf {
        self.base.join("daemon.toml")
    }

    /// For an isolated host: the underlay's namespace and the host's port
    /// on its switch (the "wire" end of the host's cable).
    fn switch_port(&self, i: usize) -> Option<(String, String)> {
        let prefix = self.netns_prefix.as_ref()?;
        self.hosts[i].netns.as_ref()?;
        Some((format!("{prefix}ul"), format!("ul{}", i + 1)))
    }

    /// A host dies: its daemon, its containerd, its containers and every
    /// process it started are killed and, for isolated hosts, its underlay
    /// link is cut.
    pub fn kill_host(&mut self, i: usize) {
        self.kill(i);
        let base = self.hosts[i].state_dir.clone();
        kill_processes_under(&base);
        self.kill_containers(i);
        self.kill_containerd(i);
        if let Some((ul, port)) = self.switch_port(i) {
            let _ = ip(&["-n", &ul, "link", "set", &port, "down"]);
        }
    }

    /// Reconnects a host killed with [`Cluster::kill_host`] to the
    /// underlay and starts its daemon.
    pub fn revive_host(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some((ul, port)) = self.switch_port(i) {
            ip(&["-n", &ul, "link", "set", &port, "up"])?;
        }
        if self.hosts[i].containerd_dir.join("config.toml").exists() {
            self.start_containerd(i)?;
        }
        self.start_daemon(i)
    }

    /// Makes the underlay a wire of `rate` (tc's syntax: `5gbit`): a token
    /// bucket on the switch's port to every isolated host, so that what
    /// reaches a host is limited as by a NIC, and not by the CPU.
    pub fn shape_underlay(&self, rate: &str) -> anyhow::Result<()> {
        for i in 0..self.hosts.len() {
            let Some((ul, port)) = self.switch_port(i) else {
                bail!("host {} is not isolated: it has no wire to shape", i + 1);
            };
            shape(&ul, &port, rate)?;
        }
        Ok(())
    }

    /// Runs `program ARGS…` in host `i`'s network namespace (or here, for
    /// hosts that are not isolated).
    pub fn in_host(&self, i: usize, program: &str, args: &[&str]) -> Run {
        let mut cmd = match &self.hosts[i].netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg(program);
                c
            }
            None => Command::new(program),
        };
        match cmd.args(args).output() {
            Ok(o) => Run::from(o),
            Err(e) => Run {
                code: -1,
                stdout: String::new(),
                stderr: e.to_string(),
            },
        }
    }

    fn add_host(&mut self, ip: Ipv4Addr, name: &str, netns: Option<String>) -> anyhow::Result<()> {
        let base = self.base.join(name);
        std::fs::create_dir_all(&base)?;
        self.hosts.push(Host {
            name: name.to_owned(),
            ip,
            state_dir: base.join("state"),
            socket: base.join("shoal.sock"),
            log: base.join("daemon.log"),
            netns,
            containerd_dir: base.join("containerd"),
            daemon_args: Vec::new(),
            child: None,
            containerd: None,
        });
        Ok(())
    }

    /// Spawns host `i`'s daemon, its log appended to the host's log file.
    fn spawn_daemon(&self, i: usize) -> anyhow::Result<Child> {
        let h = &self.hosts[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&h.log)?;
        let mut cmd = match &h.netns {
            // Only the network namespace: the daemon's namespaces are then
            // visible from here, for the harness to clean up. A kept lab's
            // daemons get sessions of their own, to outlive `shoal-lab`.
            Some(ns) => {
                let mut c = Command::new(if self.keep { "setsid" } else { "nsenter" });
                if self.keep {
                    c.arg("nsenter");
                }
                c.arg(format!("--net=/run/netns/{ns}"))
                    .arg(shoal_bin())
                    .arg("daemon")
                    .arg("--netns-prefix")
                    .arg(format!("{ns}-"))
                    .arg("--insecure-registry")
                    .arg(registry_on(h.ip));
                c
            }
            None => {
                let mut c = Command::new(shoal_bin());
                c.arg("daemon").arg("--no-dataplane");
                c
            }
        };
        Ok(cmd
            .arg("--socket")
            .arg(&h.socket)
            .arg("--state-dir")
            .arg(&h.state_dir)
            .arg("--listen-addr")
            .arg(h.addr())
            .arg("--hostname")
            .arg(&h.name)
            .arg("--containerd-socket")
            .arg(h.containerd_dir.join("containerd.sock"))
            .args(&h.daemon_args)
            // To look closer at one run (`shoal-lab failover`, a test):
            // e.g. SHOAL_LOG_LEVEL=info,shoal::daemon::dataplane=debug.
            .args(
                std::env::var("SHOAL_LOG_LEVEL")
                    .ok()
                    .map(|l| ["--log-level".to_owned(), l])
                    .into_iter()
                    .flatten(),
            )
            .args(
                Some(self.daemon_config())
                    .filter(|p| p.exists())
                    .map(|p| [OsString::from("--config"), p.into_os_string()])
                    .into_iter()
                    .flatten(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .inspect(|child| {
                // For later `shoal-lab` runs (labs outlive this process).
                let _ = std::fs::write(self.pid_file(i), child.id().to_string());
            })?)
    }

    /// Starts the lab's registry (Debian's `docker-registry`) in the
    /// underlay's namespace, at `.254` of the underlay, port 5000, storing
    /// under this cluster's folder; returns its `HOST:PORT`, which every
    /// isolated host's daemon takes as an insecure registry. Needs root and
    /// an isolated cluster.
    pub fn start_registry(&mut self) -> anyhow::Result<String> {
        self.start_registry_with(None)
    }

    /// [`Cluster::start_registry`], asking for credentials when
    /// `htpasswd` (lines `USER:BCRYPT-HASH`) is given.
    pub fn start_registry_with(&mut self, htpasswd: Option<&str>) -> anyhow::Result<String> {
        let prefix = self
            .netns_prefix
            .clone()
            .context("the lab registry needs an isolated cluster")?;
        let addr = registry_on(self.hosts[0].ip);
        let (host, _) = addr.split_once(':').unwrap_or_default();
        let ul = format!("{prefix}ul");
        let first = self.hosts[0].netns.clone().unwrap_or_default();
        ip(&[
            "-n",
            &ul,
            "addr",
            "add",
            &format!("{host}/24"),
            "dev",
            "ul0",
        ])?;
        let dir = self.base.join("registry");
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("config.yml");
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.join("data").display()
        );
        if let Some(lines) = htpasswd {
            let file = dir.join("htpasswd");
            std::fs::write(&file, lines)?;
            yaml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: lab\n    path: {}\n",
                file.display()
            ));
        }
        std::fs::write(&config, yaml)?;
        let log = std::fs::File::create(dir.join("registry.log"))?;
        let mut cmd = Command::new(if self.keep { "setsid" } else { "ip" });
        if self.keep {
            cmd.arg("ip");
        }
        cmd.args(["netns", "exec", &ul, "docker-registry", "serve"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context(
                "cannot start the lab registry (install Debian's `docker-registry`: scripts/setup)",
            )?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            // Asked from the first host, as its daemon will.
            let up = Command::new("ip")
                .args(["netns", "exec", &first, "bash", "-c"])
                .arg(format!("exec 3<>/dev/tcp/{host}/5000"))
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if up {
                return Ok(addr);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "the lab registry did not answer within 15 s:\n{}",
            std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
        )
    }

    /// Pushes image archive `archive` (OCI or docker-archive) to the lab
    /// registry as `NAME:TAG` (Debian's `skopeo`, from the first host's
    /// namespace: the underlay's own namespace has no loopback up, so it
    /// cannot reach itself).
    pub fn push(&self, archive: &Path, name_tag: &str) -> anyhow::Result<()> {
        self.push_as(archive, name_tag, None)
    }

    /// [`Cluster::push`] with credentials `USER:PASSWORD`.
    pub fn push_as(
        &self,
        archive: &Path,
        name_tag: &str,
        creds: Option<&str>,
    ) -> anyhow::Result<()> {
        let addr = registry_on(self.hosts[0].ip);
        let first = self.hosts[0].netns.clone().unwrap_or_default();
        let mut skopeo = Command::new("ip");
        skopeo
            .args(["netns", "exec", &first, "skopeo", "copy", "--quiet"])
            .args(["--dest-tls-verify=false", "--insecure-policy"]);
        if let Some(creds) = creds {
            skopeo.arg(format!("--dest-creds={creds}"));
        }
        let out = skopeo
            .arg(format!("{}:{}", transport(archive)?, archive.display()))
            .arg(format!("docker://{addr}/{name_tag}"))
            .output()
            .context("cannot run skopeo (install Debian's `skopeo`: scripts/setup)")?;
        if !out.status.success() {
            bail!(
                "skopeo copy to {addr}/{name_tag}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Host `i`'s containerd socket.
    pub fn containerd_socket(&self, i: usize) -> PathBuf {
        self.hosts[i].containerd_dir.join("containerd.sock")
    }

    /// Every host runs containers of the tools image: a containerd of its
    /// own, and the image loaded (`shoal image load`) into it.
    pub fn load_tools(&mut self) -> anyhow::Result<()> {
        let image = tools_image();
        let path = image.archive.to_string_lossy().into_owned();
        for i in 0..self.hosts.len() {
            self.start_containerd(i)?;
            self.shoal_ok(i, &["image", "load", &path])?;
        }
        Ok(())
    }

    /// Starts a containerd of host `i`'s own (its root, state and socket
    /// under the host's folder, in the host's network namespace) and waits
    /// until it answers. Needs root and Debian's `containerd`.
    pub fn start_containerd(&mut self, i: usize) -> anyhow::Result<()> {
        let dir = self.hosts[i].containerd_dir.clone();
        std::fs::create_dir_all(&dir)?;
        let socket = self.containerd_socket(i);
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
                 [debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n",
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                sock = socket.display(),
            ),
        )?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("containerd.log"))?;
        // A kept lab's containerd gets a session of its own, as its daemons
        // do, to outlive `shoal-lab`.
        let mut cmd = Command::new(if self.keep { "setsid" } else { "nsenter" });
        if self.keep {
            cmd.arg("nsenter");
        }
        if let Some(ns) = &self.hosts[i].netns {
            cmd.arg(format!("--net=/run/netns/{ns}"));
        }
        cmd.arg("containerd");
        let child = cmd
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start containerd (install Debian's `containerd`: scripts/setup)")?;
        self.hosts[i].containerd = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let answered = Command::new("ctr")
                .arg("--address")
                .arg(&socket)
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if answered {
                return Ok(());
            }
            if let Some(status) = self.hosts[i]
                .containerd
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "containerd of {} exited with {status}:\n{}",
                    self.hosts[i].name,
                    std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd of {} did not answer within 15 s",
                    self.hosts[i].name
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `kill -9` host `i`'s containerd.
    pub fn kill_containerd(&mut self, i: usize) {
        if let Some(mut c) = self.hosts[i].containerd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the containers host `i`'s containerd started (by their init
    /// PIDs in its runtime's state, so also when containerd is gone) and
    /// unmounts their root filesystems: a container outlives its daemon and
    /// its containerd by design, but not its test or lab.
    pub fn kill_containers(&self, i: usize) {
        let runtime = self.hosts[i]
            .containerd_dir
            .join("state/io.containerd.runtime.v2.task");
        let bundles: Vec<PathBuf> = std::fs::read_dir(&runtime)
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|ns| std::fs::read_dir(ns.path()).into_iter().flatten().flatten())
            .map(|b| b.path())
            .collect();
        for b in &bundles {
            // Only a container's init (PID 1 of a PID namespace): the PID of
            // a container that ended may have been reused since.
            let pid = std::fs::read_to_string(b.join("init.pid"))
                .ok()
                .filter(|pid| {
                    std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).is_ok_and(
                        |st| {
                            st.lines()
                                .find_map(|l| l.strip_prefix("NSpid:"))
                                .is_some_and(|ids| {
                                    let ids: Vec<&str> = ids.split_whitespace().collect();
                                    ids.len() > 1 && ids.last() == Some(&"1")
                                })
                        },
                    )
                });
            if let Some(pid) = pid {
                let _ = Command::new("kill")
                    .args(["-KILL", pid.trim()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
        for b in &bundles {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(b.join("rootfs"))
                .stderr(Stdio::null())
                .status();
        }
    }

    fn pid_file(&self, i: usize) -> PathBuf {
        self.base.join(&self.hosts[i].name).join("daemon.pid")
    }

    /// Host `i`'s daemon's process ID from its pid file, if that process
    /// still runs this host's daemon (for hosts of an attached lab).
    fn pid_from_file(&self, i: usize) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.pid_file(i))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let dir = self.hosts[i].state_dir.to_string_lossy().into_owned();
        String::from_utf8_lossy(&cmdline)
            .contains(&dir)
            .then_some(pid)
    }

    /// Whether host `i`'s daemon runs.
    pub fn running(&self, i: usize) -> bool {
        self.hosts[i].child.is_some() || self.pid_from_file(i).is_some()
    }

    /// Starts host `i`'s daemon and waits until its API answers.
    pub fn start_daemon(&mut self, i: usize) -> anyhow::Result<()> {
        let child = self.spawn_daemon(i)?;
        self.hosts[i].child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if self.shoal(i, &["info"]).ok() {
                return Ok(());
            }
            if let Some(status) = self.hosts[i]
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "daemon {} exited with {status}:\n{}",
                    self.hosts[i].name,
                    self.log(i)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "daemon {} did not answer within 15 s:\n{}",
                    self.hosts[i].name,
                    self.log(i)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts a daemon for host `i` and returns how it exited if it exits
    /// within `wait` (for daemons expected to refuse to start).
    pub fn start_daemon_expecting_exit(
        &mut self,
        i: usize,
        wait: Duration,
    ) -> anyhow::Result<Option<i32>> {
        let mut child = self.spawn_daemon(i)?;
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(Some(status.code().unwrap_or(-1)));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.hosts[i].child = Some(child);
        Ok(None)
    }

    /// `kill -9` host `i`'s daemon.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.hosts[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        } else if let Some(pid) = self.pid_from_file(i) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.pid_from_file(i).is_some() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Stops host `i`'s daemon gracefully (SIGTERM) and waits for it.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.hosts[i].child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        } else if let Some(pid) = self.pid_from_file(i) {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.pid_from_file(i).is_some() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if self.pid_from_file(i).is_some() {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }

    /// Runs `shoal ARGS…` against host `i`'s daemon.
    pub fn shoal(&self, i: usize, args: &[&str]) -> Run {
        let out = Command::new(shoal_bin())
            .arg("--socket")
            .arg(&self.hosts[i].socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("cannot run the shoal CLI");
        Run::from(out)
    }

    /// Runs `shoal ARGS…` against host `i`'s daemon with `input` on its
    /// standard input.
    pub fn shoal_input(&self, i: usize, args: &[&str], input: &str) -> Run {
        use std::io::Write;
        let mut child = Command::new(shoal_bin())
            .arg("--socket")
            .arg(&self.hosts[i].socket)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run the shoal CLI");
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(input.as_bytes());
        }
        Run::from(child.wait_with_output().expect("cannot run the shoal CLI"))
    }

    /// Runs `shoal ARGS…` and fails unless it exits 0.
    pub fn shoal_ok(&self, i: usize, args: &[&str]) -> anyhow::Result<Run> {
        let r = self.shoal(i, args);
        if !r.ok() {
            bail!(
                "`shoal {}` on {} failed ({}): {}{}",
                args.join(" "),
                self.hosts[i].name,
                r.code,
                r.stdout,
                r.stderr
            );
        }
        Ok(r)
    }

    /// Runs `shoal ARGS…` on host `i` and panics unless it fails with
    /// `message` in its standard error.
    pub fn assert_refused(&self, i: usize, args: &[&str], message: &str) {
        let r = self.shoal(i, args);
        assert!(!r.ok(), "`shoal {}` must fail", args.join(" "));
        assert!(
            r.stderr.contains(message),
            "`shoal {}`: expected `{message}` in {}",
            args.join(" "),
            r.stderr
        );
    }

    /// What host `i`'s data plane looks like, for a failure to be understood
    /// afterwards: its daemon's view (`debug dataplane`), and for each of its
    /// namespaces (the host's and the daemon's) addresses, routes,
    /// neighbours, FDB, nftables rules and conntrack entries.
    pub fn kernel_snapshot(&self, i: usize) -> String {
        let mut out = String::new();
        let dp = self.shoal(i, &["debug", "dataplane", "--format", "json"]);
        out.push_str(&format!("== debug dataplane\n{}{}\n", dp.stdout, dp.stderr));
        let Some(host) = self.hosts[i].netns.clone() else {
            return out;
        };
        let mut spaces: Vec<String> = std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n == &host || n.starts_with(&format!("{host}-")))
            .collect();
        spaces.sort();
        for ns in spaces {
            for args in [
                &["ip", "-d", "addr"][..],
                &["ip", "route"],
                &["ip", "neigh"],
                &["bridge", "fdb"],
                &["nft", "list", "ruleset"],
                &["cat", "/proc/net/nf_conntrack"],
            ] {
                let r = std::process::Command::new("ip")
                    .args(["netns", "exec", &ns])
                    .args(args)
                    .output();
                let text = r
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_else(|e| e.to_string());
                out.push_str(&format!("== {ns}: {}\n{text}\n", args.join(" ")));
            }
        }
        out
    }

    /// The pid of task `task`'s process on host `i` (a container's init,
    /// or the third field of a host program's pid file), for entering its
    /// namespaces without its daemon.
    pub fn task_pid(&self, i: usize, task: &str) -> anyhow::Result<String> {
        // A container's: its init process, in its containerd's runtime state.
        let init = self.hosts[i]
            .containerd_dir
            .join("state/io.containerd.runtime.v2.task/shoal")
            .join(task)
            .join("init.pid");
        if let Ok(pid) = std::fs::read_to_string(&init) {
            return Ok(pid.trim().to_owned());
        }
        let path = self.hosts[i]
            .state_dir
            .join("tasks")
            .join(format!("{task}.pid"));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        text.split_whitespace()
            .nth(2)
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("{}: no pid in `{text}`", path.display()))
    }

    /// Host `i`'s daemon log so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.hosts[i].log).unwrap_or_default()
    }

    /// The last `lines` lines of host `i`'s daemon log, last first: what a
    /// failing test prints.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let log = self.log(i);
        let tail: Vec<&str> = log.lines().rev().take(lines).collect();
        tail.join("\n")
    }

    /// `swarm init` on host `i`.
    pub fn init(&self, i: usize) -> anyhow::Result<()> {
        self.shoal_ok(i, &["swarm", "init"]).map(drop)
    }

    /// The join token for `role` from manager `i`.
    pub fn token(&self, i: usize, role: &str) -> anyhow::Result<String> {
        Ok(self
            .shoal_ok(i, &["swarm", "join-token", "-q", role])?
            .stdout
            .trim()
            .to_owned())
    }

    /// Host `i` joins through manager `via` with `token`.
    pub fn join(&self, i: usize, token: &str, via: usize) -> anyhow::Result<()> {
        let addr = self.hosts[via].addr();
        self.shoal_ok(i, &["swarm", "join", "--token", token, &addr])
            .map(drop)
    }

    /// Forms a swarm: host 0 inits, hosts `1..managers` join as managers,
    /// the rest as workers.
    pub fn form(&self, managers: usize) -> anyhow::Result<()> {
        let roles: Vec<bool> = (0..self.hosts.len()).map(|i| i < managers).collect();
        self.form_roles(&roles)
    }

    /// Forms the swarm: the first host with `managers[i]` set creates it,
    /// the others join as managers or workers.
    pub fn form_roles(&self, managers: &[bool]) -> anyhow::Result<()> {
        let first = managers
            .iter()
            .position(|m| *m)
            .ok_or_else(|| anyhow::anyhow!("no manager"))?;
        self.init(first)?;
        let mt = self.token(first, "manager")?;
        let wt = self.token(first, "worker")?;
        for (i, m) in managers.iter().enumerate() {
            if i != first {
                self.join(i, if *m { &mt } else { &wt }, first)?;
            }
        }
        Ok(())
    }

    /// The tasks of `service` wanted and reported running, as host `i`
    /// sees them (`service ps --format json`).
    pub fn running_tasks(&self, i: usize, service: &str) -> anyhow::Result<Vec<Value>> {
        let ps = self
            .shoal_ok(i, &["service", "ps", "--format", "json", service])?
            .json()?;
        Ok(ps
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["state"] == "running" && t["desired_state"] == "running")
            .cloned()
            .collect())
    }

    /// `node ls --format json` on host `i`.
    pub fn node_ls(&self, i: usize) -> anyhow::Result<Vec<Value>> {
        let v = self
            .shoal_ok(i, &["node", "ls", "--format", "json"])?
            .json()?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// `service inspect SERVICE` on host `i`: the service's view.
    pub fn service_inspect(&self, i: usize, service: &str) -> anyhow::Result<Value> {
        let all = self.shoal_ok(i, &["service", "inspect", service])?.json()?;
        Ok(all[0].clone())
    }

    /// `info --format json` on host `i`.
    pub fn info(&self, i: usize) -> anyhow::Result<Value> {
        self.shoal_ok(i, &["info", "--format", "json"])?.json()
    }

    /// The index of the host whose daemon is the leader, as host `asking` sees it.
    pub fn leader(&self, asking: usize) -> anyhow::Result<Option<usize>> {
        let info = self.info(asking)?;
        let Some(leader) = info.get("leader").and_then(Value::as_str) else {
            return Ok(None);
        };
        let nodes = self.node_ls(asking)?;
        let name = nodes
            .iter()
            .find(|n| n["id"] == leader)
            .and_then(|n| n["hostname"].as_str())
            .map(str::to_owned);
        Ok(name.and_then(|n| self.hosts.iter().position(|h| h.name == n)))
    }

    /// Retries `get` until it succeeds or `timeout` passes (then its last
    /// error).
    pub fn wait_until_value<T>(
        &self,
        timeout: Duration,
        mut get: impl FnMut() -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            match get() {
                Ok(v) => return Ok(v),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Polls `check` until it returns `Ok(true)` or `timeout` passes; the
    /// last error or `what` is reported on timeout.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Cluster) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        loop {
            match check(self) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() > deadline {
                bail!("timed out after {timeout:?} waiting for {what}. {last}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Checks that `check` holds, again and again, for all of `window`:
    /// for what must *not* happen (a task replaced, a name answered too
    /// early), where there is no event to wait for. Fails at the first
    /// check that does not hold, saying when.
    pub fn holds_for(
        &self,
        what: &str,
        window: Duration,
        mut check: impl FnMut(&Cluster) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            match check(self) {
                Ok(true) => {}
                Ok(false) => bail!("{what} stopped holding after {:?}", start.elapsed()),
                Err(e) => bail!("{what}: cannot tell after {:?}: {e:#}", start.elapsed()),
            }
            if start.elapsed() >= window {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Kills, with their process groups, the processes whose command line
/// mentions `dir`: task shims (each leads the session of its task) left
/// behind by daemons that were killed.
pub fn kill_processes_under(dir: &Path) {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let name = p.file_name().to_string_lossy().into_owned();
        if name.parse::<u32>().is_err() || name == std::process::id().to_string() {
            continue;
        }
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{name}")])
                .stderr(Stdio::null())
                .status();
            let _ = Command::new("kill")
                .args(["-KILL", &name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Removes the `shoal` cgroups containers were put under, where they are
/// empty (one in use by another test is left alone: `rmdir` refuses it).
fn remove_empty_shoal_cgroups() {
    let mut dirs = vec![PathBuf::from("/sys/fs/cgroup/shoal")];
    if let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") {
        dirs.extend(controllers.flatten().map(|c| c.path().join("shoal")));
    }
    for d in dirs {
        let _ = std::fs::remove_dir(d);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        for i in 0..self.hosts.len() {
            self.kill(i);
            self.kill_containers(i);
            self.kill_containerd(i);
        }
        kill_processes_under(&self.base);
        remove_empty_shoal_cgroups();
        if let Some(prefix) = &self.netns_prefix
            && let Ok(entries) = std::fs::read_dir("/run/netns")
        {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(prefix.as_str()) {
                    let _ = Command::new("ip").args(["netns", "del", &name]).status();
                }
            }
        }
        if std::thread::panicking() {
            for (i, h) in self.hosts.iter().enumerate() {
                eprintln!("----- {} daemon log -----\n{}", h.name, self.log(i));
            }
        }
    }
}
