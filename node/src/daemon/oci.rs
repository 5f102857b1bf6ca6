//! The OCI runtime spec of a task's container, decided here, purely: what
//! runs (the image's entrypoint, command, environment, user and working
//! directory, overridden by the service's), and how it is confined, with
//! Docker's defaults: its own PID, mount, UTS and IPC namespaces, the
//! task's network namespace from the data plane, Docker's default
//! capability set, `no_new_privs`, Docker's masked and read-only `/proc`
//! and `/sys` paths, and nothing of the host mounted but the task's
//! `resolv.conf`, `hosts` and `hostname` files.
//!
//! The spec is written with typed structs of the subset Shoal emits
//! (serialised as the runtime spec's JSON) rather than the `oci-spec`
//! crate, whose builders bring regex and four proc-macro crates to the
//! build for the same JSON.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// `PATH` when neither the image nor the service sets one (Docker's).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Docker's default capability set: what a container's root may do.
pub const DEFAULT_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Paths of `/proc` and `/sys` hidden from the container (Docker's).
pub const MASKED_PATHS: [&str; 11] = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Paths of `/proc` the container may read but not write (Docker's).
pub const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// What an image says about running it (its config's `config`, Docker's
/// names).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ImageConfig {
    /// `ENTRYPOINT`.
    pub entrypoint: Option<Vec<String>>,
    /// `CMD`.
    pub cmd: Option<Vec<String>>,
    /// `ENV`, as `KEY=VALUE`.
    pub env: Option<Vec<String>>,
    /// `USER`.
    pub user: Option<String>,
    /// `WORKDIR`.
    pub working_dir: Option<String>,
    /// `HEALTHCHECK`.
    pub healthcheck: Option<ImageHealth>,
}

/// An image's `HEALTHCHECK` (durations in nanoseconds; 0 is unset).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ImageHealth {
    /// `["CMD", …]`, `["CMD-SHELL", …]` or `["NONE"]`.
    pub test: Option<Vec<String>>,
    /// Between checks.
    pub interval: u64,
    /// One check's limit.
    pub timeout: u64,
    /// Grace after the start.
    pub start_period: u64,
    /// Failures in a row.
    pub retries: u64,
}

impl ImageHealth {
    /// As a service's check reads it.
    pub fn check(&self) -> shoal_mesh::service::HealthCheck {
        let ms = |ns: u64| (ns > 0).then_some(ns / 1_000_000);
        shoal_mesh::service::HealthCheck {
            test: self.test.clone(),
            interval_ms: ms(self.interval),
            timeout_ms: ms(self.timeout),
            retries: (self.retries > 0).then_some(self.retries),
            start_period_ms: ms(self.start_period),
        }
    }
}

#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    config: ImageConfig,
}

impl ImageConfig {
    /// The run settings of an image config blob.
    pub fn from_json(bytes: &[u8]) -> Result<Self, SpecError> {
        serde_json::from_slice::<ConfigFile>(bytes)
            .map(|c| c.config)
            .map_err(|e| SpecError::ImageConfig(e.to_string()))
    }
}

/// What the service and the node say about one task's container.
#[derive(Clone, Debug, Default)]
pub struct TaskRun {
    /// The container's hostname (the task's name, or `--hostname`).
    pub hostname: String,
    /// `--entrypoint`, replacing the image's (and then its `CMD` too).
    pub entrypoint: Option<Vec<String>>,
    /// The service's command, replacing the image's `CMD`.
    pub args: Vec<String>,
    /// `--env`, as `KEY=VALUE`, over the image's.
    pub env: Vec<String>,
    /// `--user`: `USER[:GROUP]`, each a name or a number.
    pub user: Option<String>,
    /// The image's `/etc/passwd` and `/etc/group`, for user and group
    /// names.
    pub accounts: Accounts,
    /// `--workdir`.
    pub workdir: Option<String>,
    /// The network namespace to join (a task's, under `/run/netns`); a new,
    /// empty one when `None`.
    pub netns: Option<PathBuf>,
    /// The files bound read-only at `/etc/resolv.conf`, `/etc/hosts` and
    /// `/etc/hostname`.
    pub etc: EtcFiles,
    /// The cgroup the container goes into.
    pub cgroup: String,
    /// Resource limits.
    pub limits: Limits,
}

/// An image's `/etc/passwd` and `/etc/group` (empty when it has none).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Accounts {
    /// `/etc/passwd`.
    pub passwd: String,
    /// `/etc/group`.
    pub group: String,
}

/// The most of an image's `/etc/passwd` or `/etc/group` that is read.
pub const MAX_ACCOUNTS_FILE: u64 = 1024 * 1024;

impl Accounts {
    /// UID and primary GID of `who` (a name or a UID), by `/etc/passwd`.
    fn user(&self, who: &str) -> Option<(u32, u32)> {
        self.passwd.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let (uid, gid) = (f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?);
            (f[0] == who || f[2] == who).then_some((uid, gid))
        })
    }

    /// The GID of group `name`, by `/etc/group`.
    fn group(&self, name: &str) -> Option<u32> {
        self.group.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&name)).then(|| f.get(2)?.parse().ok())?
        })
    }
}

/// `--limit-memory`, `--limit-cpu`, `--limit-pids`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Bytes of memory (swap included: none beyond it).
    pub memory: Option<u64>,
    /// CPU time, in billionths of a CPU.
    pub nano_cpus: Option<u64>,
    /// Processes and threads.
    pub pids: Option<i64>,
}

/// The CFS period CPU limits are quotas of (Docker's, 100 ms).
pub const CPU_PERIOD_US: u64 = 100_000;

/// Files the node writes for a task and binds into its container.
#[derive(Clone, Debug, Default)]
pub struct EtcFiles {
    /// `/etc/resolv.conf` (pointing at the embedded DNS, 127.0.0.11).
    pub resolv_conf: PathBuf,
    /// `/etc/hosts`.
    pub hosts: PathBuf,
    /// `/etc/hostname`.
    pub hostname: PathBuf,
}

/// Why no spec can be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// Nothing to run.
    #[error("no command to run: the image has no ENTRYPOINT or CMD; give one after the image")]
    NoCommand,
    /// A user or group that the image does not know.
    #[error("user `{0}` (from --user or the image's USER): {1}")]
    User(String, String),
    /// A relative working directory.
    #[error("--workdir `{0}` must be an absolute path")]
    Workdir(String),
    /// An environment entry without `=`.
    #[error("environment entry `{0}` is not KEY=VALUE")]
    Env(String),
    /// The image's config does not parse.
    #[error("the image's config is not valid: {0}")]
    ImageConfig(String),
}

/// The runtime spec (the subset Shoal sets; JSON as the OCI runtime spec).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    /// `1.0.2`.
    pub oci_version: String,
    /// What runs.
    pub process: Process,
    /// The root filesystem (containerd mounts the snapshot at `rootfs`).
    pub root: Root,
    /// The hostname.
    pub hostname: String,
    /// Mounts.
    pub mounts: Vec<Mount>,
    /// Linux specifics.
    pub linux: Linux,
}

/// `process`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Process {
    /// No terminal.
    pub terminal: bool,
    /// Who.
    pub user: User,
    /// The command line.
    pub args: Vec<String>,
    /// `KEY=VALUE`.
    pub env: Vec<String>,
    /// Working directory.
    pub cwd: String,
    /// Capabilities.
    pub capabilities: Capabilities,
    /// Resource limits.
    pub rlimits: Vec<Rlimit>,
    /// `no_new_privs`.
    pub no_new_privileges: bool,
}

/// `process.user`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct User {
    /// UID.
    pub uid: u32,
    /// GID.
    pub gid: u32,
}

/// `process.capabilities`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    /// Bounding set.
    pub bounding: Vec<String>,
    /// Effective set.
    pub effective: Vec<String>,
    /// Permitted set.
    pub permitted: Vec<String>,
}

/// `process.rlimits[]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rlimit {
    /// `RLIMIT_…`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Hard.
    pub hard: u64,
    /// Soft.
    pub soft: u64,
}

/// `root`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Root {
    /// Relative to the bundle.
    pub path: String,
    /// Read-only.
    pub readonly: bool,
}

/// `mounts[]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mount {
    /// Where in the container.
    pub destination: String,
    /// Filesystem type.
    #[serde(rename = "type")]
    pub kind: String,
    /// What.
    pub source: String,
    /// Options.
    pub options: Vec<String>,
}

/// `linux`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Linux {
    /// Namespaces.
    pub namespaces: Vec<Namespace>,
    /// Hidden paths.
    pub masked_paths: Vec<String>,
    /// Read-only paths.
    pub readonly_paths: Vec<String>,
    /// The cgroup.
    pub cgroups_path: String,
    /// Device access.
    pub resources: Resources,
}

/// `linux.namespaces[]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Namespace {
    /// `pid`, `mount`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// An existing namespace to join.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// `linux.resources`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Resources {
    /// Device cgroup rules.
    pub devices: Vec<DeviceRule>,
    /// Memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryLimit>,
    /// CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuLimit>,
    /// Processes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pids: Option<PidsLimit>,
}

/// `linux.resources.memory`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MemoryLimit {
    /// Bytes.
    pub limit: i64,
    /// Memory and swap together: the same, so no swap.
    pub swap: i64,
}

/// `linux.resources.cpu`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CpuLimit {
    /// Microseconds per period.
    pub quota: i64,
    /// The period, in microseconds.
    pub period: u64,
}

/// `linux.resources.pids`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PidsLimit {
    /// Processes and threads.
    pub limit: i64,
}

/// The cgroup limits of `limits`.
fn resources(limits: &Limits) -> Resources {
    Resources {
        devices: devices(),
        memory: limits.memory.map(|m| MemoryLimit {
            limit: m as i64,
            swap: m as i64,
        }),
        cpu: limits.nano_cpus.map(|n| CpuLimit {
            quota: (n.saturating_mul(CPU_PERIOD_US) / 1_000_000_000).max(1_000) as i64,
            period: CPU_PERIOD_US,
        }),
        pids: limits.pids.map(|limit| PidsLimit { limit }),
    }
}

/// `linux.resources.devices[]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceRule {
    /// Allow or deny.
    pub allow: bool,
    /// `c`, `b` or absent for all.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Major number, absent for any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub major: Option<i64>,
    /// Minor number, absent for any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minor: Option<i64>,
    /// `rwm`.
    pub access: String,
}

fn mount(destination: &str, kind: &str, source: &str, options: &[&str]) -> Mount {
    Mount {
        destination: destination.into(),
        kind: kind.into(),
        source: source.into(),
        options: options.iter().map(|o| (*o).to_owned()).collect(),
    }
}

fn bind_ro(destination: &str, source: &Path) -> Mount {
    Mount {
        destination: destination.into(),
        kind: "bind".into(),
        source: source.display().to_string(),
        options: vec!["rbind".into(), "ro".into(), "nosuid".into(), "nodev".into()],
    }
}

/// The command line, as Docker composes it: `--entrypoint` replaces the
/// image's entrypoint and drops its `CMD`; the service's command replaces
/// `CMD`.
fn args(image: &ImageConfig, run: &TaskRun) -> Result<Vec<String>, SpecError> {
    let (entrypoint, image_cmd) = match &run.entrypoint {
        Some(e) => (e.clone(), Vec::new()),
        None => (
            image.entrypoint.clone().unwrap_or_default(),
            image.cmd.clone().unwrap_or_default(),
        ),
    };
    let cmd = if run.args.is_empty() {
        image_cmd
    } else {
        run.args.clone()
    };
    let all: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if all.is_empty() {
        return Err(SpecError::NoCommand);
    }
    Ok(all)
}

/// The environment: the image's, the service's over it by key, `PATH`
/// and `HOSTNAME` as Docker sets them.
fn env(image: &ImageConfig, run: &TaskRun) -> Result<Vec<String>, SpecError> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut set = |entry: &str| -> Result<(), SpecError> {
        let (k, v) = entry
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| SpecError::Env(entry.to_owned()))?;
        match out.iter_mut().find(|(key, _)| key == k) {
            Some(slot) => slot.1 = v.to_owned(),
            None => out.push((k.to_owned(), v.to_owned())),
        }
        Ok(())
    };
    set(&format!("PATH={DEFAULT_PATH}"))?;
    set(&format!("HOSTNAME={}", run.hostname))?;
    for e in image.env.iter().flatten() {
        set(e)?;
    }
    for e in &run.env {
        set(e)?;
    }
    Ok(out.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
}

/// `USER[:GROUP]`, names looked up in the image's `/etc/passwd` and
/// `/etc/group` as Docker does: a user's group is its primary group, or
/// 0 for a UID the image does not list; root when unset.
fn user(image: &ImageConfig, run: &TaskRun) -> Result<User, SpecError> {
    let given = run
        .user
        .clone()
        .or_else(|| image.user.clone())
        .filter(|u| !u.is_empty());
    let Some(text) = given else {
        return Ok(User { uid: 0, gid: 0 });
    };
    let bad = |why: &str| SpecError::User(text.clone(), why.to_owned());
    let (who, group) = match text.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (text.as_str(), None),
    };
    let a = &run.accounts;
    let (uid, primary) = match (who.parse::<u32>(), a.user(who)) {
        (_, Some(found)) => found,
        (Ok(uid), None) => (uid, 0),
        (Err(_), None) => return Err(bad("no such user in the image's /etc/passwd")),
    };
    let gid = match group {
        None => primary,
        Some(g) => match (g.parse::<u32>(), a.group(g)) {
            (Ok(gid), _) => gid,
            (Err(_), Some(gid)) => gid,
            (Err(_), None) => return Err(bad("no such group in the image's /etc/group")),
        },
    };
    Ok(User { uid, gid })
}

/// Docker's device rules: nothing but the usual character devices.
fn devices() -> Vec<DeviceRule> {
    let allow = |major: i64, minor: Option<i64>| DeviceRule {
        allow: true,
        kind: Some("c".into()),
        major: Some(major),
        minor,
        access: "rwm".into(),
    };
    let mut rules = vec![DeviceRule {
        allow: false,
        kind: None,
        major: None,
        minor: None,
        access: "rwm".into(),
    }];
    for (major, minor) in [
        (1, 3),
        (1, 5),
        (1, 7),
        (1, 8),
        (1, 9),
        (5, 0),
        (5, 1),
        (5, 2),
    ] {
        rules.push(allow(major, Some(minor)));
    }
    rules.push(allow(136, None));
    rules
}

/// The spec of a task's container.
pub fn runtime_spec(image: &ImageConfig, run: &TaskRun) -> Result<Spec, SpecError> {
    let cwd = run
        .workdir
        .clone()
        .or_else(|| image.working_dir.clone())
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "/".into());
    if !cwd.starts_with('/') {
        return Err(SpecError::Workdir(cwd));
    }
    let caps: Vec<String> = DEFAULT_CAPS.iter().map(|c| (*c).to_owned()).collect();
    let ns = |kind: &str| Namespace {
        kind: kind.into(),
        path: None,
    };
    Ok(Spec {
        oci_version: "1.0.2".into(),
        process: Process {
            terminal: false,
            user: user(image, run)?,
            args: args(image, run)?,
            env: env(image, run)?,
            cwd,
            capabilities: Capabilities {
                bounding: caps.clone(),
                effective: caps.clone(),
                permitted: caps,
            },
            // Inherited from containerd's shim (a fixed RLIMIT_NOFILE above
            // the host's hard limit would fail the start).
            rlimits: Vec::new(),
            no_new_privileges: true,
        },
        root: Root {
            path: "rootfs".into(),
            readonly: false,
        },
        hostname: run.hostname.clone(),
        mounts: vec![
            mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
            mount(
                "/dev",
                "tmpfs",
                "tmpfs",
                &["nosuid", "strictatime", "mode=755", "size=65536k"],
            ),
            mount(
                "/dev/pts",
                "devpts",
                "devpts",
                &[
                    "nosuid",
                    "noexec",
                    "newinstance",
                    "ptmxmode=0666",
                    "mode=0620",
                    "gid=5",
                ],
            ),
            mount(
                "/dev/shm",
                "tmpfs",
                "shm",
                &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            ),
            mount(
                "/dev/mqueue",
                "mqueue",
                "mqueue",
                &["nosuid", "noexec", "nodev"],
            ),
            mount(
                "/sys",
                "sysfs",
                "sysfs",
                &["nosuid", "noexec", "nodev", "ro"],
            ),
            mount(
                "/sys/fs/cgroup",
                "cgroup",
                "cgroup",
                &["nosuid", "noexec", "nodev", "relatime", "ro"],
            ),
            bind_ro("/etc/resolv.conf", &run.etc.resolv_conf),
            bind_ro("/etc/hosts", &run.etc.hosts),
            bind_ro("/etc/hostname", &run.etc.hostname),
        ],
        linux: Linux {
            namespaces: vec![
                ns("pid"),
                ns("ipc"),
                ns("uts"),
                ns("mount"),
                Namespace {
                    kind: "network".into(),
                    path: run.netns.as_ref().map(|p| p.display().to_string()),
                },
            ],
            masked_paths: MASKED_PATHS.iter().map(|p| (*p).to_owned()).collect(),
            readonly_paths: READONLY_PATHS.iter().map(|p| (*p).to_owned()).collect(),
            cgroups_path: run.cgroup.clone(),
            resources: resources(&run.limits),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    fn run() -> TaskRun {
        TaskRun {
            hostname: "web.1.abc".into(),
            netns: Some("/run/netns/shoal-1-t".into()),
            etc: EtcFiles {
                resolv_conf: "/var/lib/shoal/tasks/t/resolv.conf".into(),
                hosts: "/var/lib/shoal/tasks/t/hosts".into(),
                hostname: "/var/lib/shoal/tasks/t/hostname".into(),
            },
            cgroup: "/shoal/t".into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_command_line_is_composed_as_docker_composes_it() {
        let image = ImageConfig {
            entrypoint: Some(strings(&["/entry"])),
            cmd: Some(strings(&["--serve"])),
            ..Default::default()
        };
        let spec = |r: &TaskRun, i: &ImageConfig| runtime_spec(i, r).map(|s| s.process.args);
        assert_eq!(
            spec(&run(), &image).unwrap(),
            strings(&["/entry", "--serve"])
        );
        let with_args = TaskRun {
            args: strings(&["--debug"]),
            ..run()
        };
        assert_eq!(
            spec(&with_args, &image).unwrap(),
            strings(&["/entry", "--debug"])
        );
        let with_entry = TaskRun {
            entrypoint: Some(strings(&["/bin/sh", "-c"])),
            ..run()
        };
        assert_eq!(
            spec(&with_entry, &image).unwrap(),
            strings(&["/bin/sh", "-c"])
        );
        let cmd_only = ImageConfig {
            cmd: Some(strings(&["/bin/sh"])),
            ..Default::default()
        };
        assert_eq!(spec(&run(), &cmd_only).unwrap(), strings(&["/bin/sh"]));
        assert_eq!(
            spec(&run(), &ImageConfig::default()).unwrap_err(),
            SpecError::NoCommand
        );
    }

    #[test]
    fn user_and_group_names_come_from_the_images_files() {
        let image = ImageConfig {
            cmd: Some(strings(&["x"])),
            user: Some("www-data".into()),
            ..Default::default()
        };
        let accounts = Accounts {
            passwd: "root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33::/var/www:/bin/false\nbad:x:notanumber:1::/:\nshort:x\n".into(),
            group: "root:x:0:\nstaff:x:50:www-data\nbroken\n".into(),
        };
        let with = |user: Option<&str>| TaskRun {
            user: user.map(str::to_owned),
            accounts: accounts.clone(),
            ..run()
        };
        let user_of = |r: &TaskRun| runtime_spec(&image, r).map(|s| s.process.user);
        assert_eq!(user_of(&with(None)), Ok(User { uid: 33, gid: 33 }));
        assert_eq!(
            user_of(&with(Some("www-data:staff"))),
            Ok(User { uid: 33, gid: 50 })
        );
        // A listed UID takes its primary group; numbers are taken as given.
        assert_eq!(user_of(&with(Some("33"))), Ok(User { uid: 33, gid: 33 }));
        assert_eq!(user_of(&with(Some("7:8"))), Ok(User { uid: 7, gid: 8 }));
        assert_eq!(
            user_of(&with(Some("root:50"))),
            Ok(User { uid: 0, gid: 50 })
        );
        for (bad, why) in [
            ("nobody", "no such user in the image's /etc/passwd"),
            ("bad", "no such user"),
            ("short", "no such user"),
            ("www-data:wheel", "no such group in the image's /etc/group"),
            ("www-data:broken", "no such group"),
        ] {
            let e = user_of(&with(Some(bad))).unwrap_err();
            assert!(e.to_string().contains(why), "{bad}: {e}");
            assert!(e.to_string().contains(&format!("user `{bad}`")), "{e}");
        }
        // Without the files (an image with no /etc), only numbers work.
        let bare = TaskRun {
            user: Some("www-data".into()),
            ..run()
        };
        assert!(user_of(&bare).is_err());
    }

    #[test]
    fn the_environment_user_and_workdir_follow_image_then_service() {
        let image = ImageConfig {
            cmd: Some(strings(&["x"])),
            env: Some(strings(&["A=image", "PATH=/opt/bin", "B=kept"])),
            user: Some("1000".into()),
            working_dir: Some("/app".into()),
            ..Default::default()
        };
        let s = runtime_spec(&image, &run()).unwrap();
        assert_eq!(
            s.process.env,
            strings(&["PATH=/opt/bin", "HOSTNAME=web.1.abc", "A=image", "B=kept"])
        );
        // A UID the image does not list gets group 0, as with Docker.
        assert_eq!(s.process.user, User { uid: 1000, gid: 0 });
        assert_eq!(s.process.cwd, "/app");
        let r = TaskRun {
            env: strings(&["A=service", "C=x=y"]),
            user: Some("10:20".into()),
            workdir: Some("/srv".into()),
            ..run()
        };
        let s = runtime_spec(&image, &r).unwrap();
        assert!(s.process.env.contains(&"A=service".to_owned()));
        assert!(s.process.env.contains(&"C=x=y".to_owned()));
        assert_eq!(s.process.user, User { uid: 10, gid: 20 });
        assert_eq!(s.process.cwd, "/srv");
        let defaults = runtime_spec(
            &ImageConfig {
                cmd: Some(strings(&["x"])),
                ..Default::default()
            },
            &run(),
        )
        .unwrap();
        assert_eq!(defaults.process.user, User { uid: 0, gid: 0 });
        assert_eq!(defaults.process.cwd, "/");
        assert!(defaults.process.env[0] == format!("PATH={DEFAULT_PATH}"));

        for (bad, want) in [
            (
                TaskRun {
                    user: Some("www-data".into()),
                    ..run()
                },
                "www-data",
            ),
            (
                TaskRun {
                    user: Some("1:x".into()),
                    ..run()
                },
                "1:x",
            ),
            (
                TaskRun {
                    workdir: Some("app".into()),
                    ..run()
                },
                "app",
            ),
            (
                TaskRun {
                    env: strings(&["NOEQUALS"]),
                    ..run()
                },
                "NOEQUALS",
            ),
            (
                TaskRun {
                    env: strings(&["=v"]),
                    ..run()
                },
                "=v",
            ),
        ] {
            let e = runtime_spec(&image, &bad).unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
        }
    }

    #[test]
    fn the_container_is_confined_as_docker_confines_it() {
        let image = ImageConfig {
            cmd: Some(strings(&["x"])),
            ..Default::default()
        };
        let s = runtime_spec(&image, &run()).unwrap();
        let caps = &s.process.capabilities;
        assert_eq!(caps.bounding.len(), 14);
        for set in [&caps.bounding, &caps.effective, &caps.permitted] {
            assert!(
                !set.iter()
                    .any(|c| c == "CAP_SYS_ADMIN" || c == "CAP_NET_ADMIN")
            );
        }
        assert!(s.process.no_new_privileges);
        let kinds: Vec<&str> = s.linux.namespaces.iter().map(|n| n.kind.as_str()).collect();
        assert_eq!(kinds, ["pid", "ipc", "uts", "mount", "network"]);
        assert_eq!(
            s.linux.namespaces[4].path.as_deref(),
            Some("/run/netns/shoal-1-t")
        );
        assert!(s.linux.namespaces[..4].iter().all(|n| n.path.is_none()));
        // Of the host, only the task's three files are bound, read-only.
        let binds: Vec<&Mount> = s.mounts.iter().filter(|m| m.kind == "bind").collect();
        assert_eq!(binds.len(), 3);
        assert!(binds.iter().all(|m| m.options.contains(&"ro".to_owned())
            && m.source.starts_with("/var/lib/shoal/tasks/t/")));
        assert!(s.linux.masked_paths.contains(&"/proc/kcore".to_owned()));
        assert!(s.linux.readonly_paths.contains(&"/proc/sys".to_owned()));
        assert!(!s.linux.resources.devices[0].allow);
        assert_eq!(s.linux.resources.memory, None);

        // Limits, as runc reads them.
        let limited = TaskRun {
            limits: Limits {
                memory: Some(32 << 20),
                nano_cpus: Some(500_000_000),
                pids: Some(64),
            },
            ..run()
        };
        let v = serde_json::to_value(runtime_spec(&image, &limited).unwrap()).unwrap();
        let r = &v["linux"]["resources"];
        assert_eq!(r["memory"]["limit"], 32 << 20);
        assert_eq!(r["memory"]["swap"], 32 << 20);
        assert_eq!(r["cpu"]["quota"], 50_000);
        assert_eq!(r["cpu"]["period"], 100_000);
        assert_eq!(r["pids"]["limit"], 64);

        // The JSON is the runtime spec's.
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["ociVersion"], "1.0.2");
        assert_eq!(v["process"]["noNewPrivileges"], true);
        assert_eq!(v["linux"]["cgroupsPath"], "/shoal/t");
        assert_eq!(v["linux"]["namespaces"][4]["type"], "network");
        assert!(v["linux"]["namespaces"][0].get("path").is_none());
        assert_eq!(v["linux"]["maskedPaths"][2], "/proc/kcore");
        assert_eq!(v["mounts"][0]["type"], "proc");
        assert!(v["linux"]["resources"]["devices"][0].get("major").is_none());
    }

    #[test]
    fn an_image_config_reads_dockers_names() {
        let cfg = br#"{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/e"],"Cmd":["c"],"Env":["A=1"],"User":"5","WorkingDir":"/w"}}"#;
        let c = ImageConfig::from_json(cfg).unwrap();
        assert_eq!(c.entrypoint, Some(strings(&["/e"])));
        assert_eq!(c.cmd, Some(strings(&["c"])));
        assert_eq!(c.env, Some(strings(&["A=1"])));
        assert_eq!(c.user.as_deref(), Some("5"));
        assert_eq!(c.working_dir.as_deref(), Some("/w"));
        assert_eq!(
            ImageConfig::from_json(br#"{"os":"linux"}"#).unwrap(),
            ImageConfig::default()
        );
        assert!(ImageConfig::from_json(b"nope").is_err());
    }
}
