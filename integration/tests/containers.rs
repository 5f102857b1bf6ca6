//! Tasks as containers (issue 15): the container engine, containerd, as a
//! node sees it. Every host runs a containerd of its own.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use shoal_integration::{Cluster, images, root_or_skip};

/// `ctr -n shoal ARGS…` against host 0's containerd: its standard output.
fn ctr(c: &Cluster, args: &[&str]) -> String {
    ctr_on(c, 0, args)
}

/// `ctr -n shoal ARGS` against host `i`'s containerd; its output.
fn ctr_on(c: &Cluster, i: usize, args: &[&str]) -> String {
    let out = std::process::Command::new("ctr")
        .arg("--address")
        .arg(c.containerd_socket(i))
        .args(["-n", "shoal"])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `shoal debug run lab.local/busybox:1 -- /bin/sh -c SCRIPT` on host 0.
fn run_sh(c: &Cluster, script: &str) -> shoal_integration::Run {
    let args = [
        "debug",
        "run",
        "lab.local/busybox:1",
        "--",
        "/bin/sh",
        "-c",
        script,
    ];
    c.shoal(0, &args)
}

fn containerd_of(c: &Cluster, i: usize) -> serde_json::Value {
    c.info(i).unwrap()["containerd"].clone()
}

#[test]
fn a_node_shows_its_containerd_and_says_what_to_do_when_it_does_not_answer() {
    if !root_or_skip("run containerd") {
        return;
    }
    let mut c = Cluster::start(1).unwrap();
    let socket = c.containerd_socket(0).display().to_string();
    // Nothing started behind the user's back: no containerd, and info
    // says where it looked and what to do.
    let down = containerd_of(&c, 0);
    assert_eq!(down["socket"], socket.as_str());
    assert!(down["version"].is_null(), "{down}");
    let error = down["error"].as_str().unwrap();
    assert!(
        error.contains(&socket) && error.contains("--containerd-socket"),
        "{error}"
    );

    c.start_containerd(0).unwrap();
    let up = containerd_of(&c, 0);
    assert!(up["error"].is_null(), "{up}");
    assert!(up["version"].as_str().unwrap().starts_with("1."), "{up}");

    // containerd dies and comes back: the node notices both, in a swarm too.
    c.init(0).unwrap();
    c.kill_containerd(0);
    c.wait_until("containerd reported down", Duration::from_secs(10), |c| {
        Ok(containerd_of(c, 0)["error"].is_string())
    })
    .unwrap();
    c.start_containerd(0).unwrap();
    c.wait_until(
        "containerd reported up again",
        Duration::from_secs(10),
        |c| Ok(containerd_of(c, 0)["version"].is_string()),
    )
    .unwrap();
}

#[test]
fn an_image_archive_loads_into_the_nodes_containerd_and_a_bad_one_changes_nothing() {
    if !root_or_skip("run containerd") {
        return;
    }
    let mut c = Cluster::start(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("busybox.tar");
    std::fs::write(&archive, images::busybox("lab.local/busybox:1").unwrap()).unwrap();
    let path = archive.to_str().unwrap();
    // containerd not running: the load says so, as a retryable failure.
    let r = c.shoal(0, &["image", "load", path]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(
        r.stderr.contains("containerd does not answer"),
        "{}",
        r.stderr
    );

    c.start_containerd(0).unwrap();
    let r = c.shoal_ok(0, &["image", "load", path]).unwrap();
    assert!(
        r.stdout.contains("Loaded image: lab.local/busybox:1"),
        "{}",
        r.stdout
    );
    let ls = c
        .shoal_ok(0, &["image", "ls", "--format", "json"])
        .unwrap()
        .json()
        .unwrap();
    let manifest_digest = ls[0]["digest"].as_str().unwrap().to_owned();
    assert_eq!(ls.as_array().unwrap().len(), 1, "{ls}");
    assert_eq!(ls[0]["name"], "lab.local/busybox:1");
    // containerd itself holds the image and its blobs, in Shoal's namespace.
    let ctr = |args: &[&str]| ctr(&c, args);
    assert!(ctr(&["images", "ls", "-q"]).contains("lab.local/busybox:1"));
    let content = ctr(&["content", "ls", "-q"]);
    assert_eq!(content.lines().count(), 3, "{content}");
    assert!(content.contains(&manifest_digest));
    // Unpacked: one committed snapshot, named by the layer's chain ID, that
    // holds the image's files.
    let snaps = ctr(&["snapshots", "--snapshotter", "overlayfs", "ls"]);
    assert_eq!(
        snaps.lines().filter(|l| l.contains("Committed")).count(),
        1,
        "{snaps}"
    );
    let fs_root = c.hosts[0]
        .containerd_dir
        .join("root/io.containerd.snapshotter.v1.overlayfs/snapshots");
    let unpacked = std::fs::read_dir(&fs_root).unwrap().flatten().any(|e| {
        std::fs::metadata(e.path().join("fs/bin/busybox")).is_ok_and(|m| m.len() > 1_000_000)
    });
    assert!(
        unpacked,
        "no snapshot under {} holds bin/busybox",
        fs_root.display()
    );
    // Loading again is harmless; a short name is normalised as Docker does.
    c.shoal_ok(0, &["image", "load", path]).unwrap();
    std::fs::write(&archive, images::busybox("busybox").unwrap()).unwrap();
    let r = c.shoal_ok(0, &["image", "load", path]).unwrap();
    assert!(
        r.stdout.contains("docker.io/library/busybox:latest"),
        "{}",
        r.stdout
    );

    // A docker-archive, tagged twice; and removal by name.
    std::fs::write(
        &archive,
        images::busybox_docker(&["tools:1", "lab.local/tools:2"]).unwrap(),
    )
    .unwrap();
    let r = c.shoal_ok(0, &["image", "load", path]).unwrap();
    assert!(
        r.stdout.contains("docker.io/library/tools:1"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("lab.local/tools:2"), "{}", r.stdout);
    let r = c.shoal_ok(0, &["image", "rm", "tools:1"]).unwrap();
    assert!(
        r.stdout.contains("docker.io/library/tools:1"),
        "{}",
        r.stdout
    );
    let names = c.shoal_ok(0, &["image", "ls", "-q"]).unwrap().stdout;
    assert!(
        !names.contains("tools:1") && names.contains("lab.local/tools:2"),
        "{names}"
    );
    let r = c.shoal(0, &["image", "rm", "tools:1"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("no such image: docker.io/library/tools:1"),
        "{}",
        r.stderr
    );

    // Bad archives: a clear error, exit code 2, nothing added.
    let before = c.shoal_ok(0, &["image", "ls", "-q"]).unwrap().stdout;
    std::fs::write(&archive, b"this is not a tar").unwrap();
    for (file, says) in [
        (path, "not an image archive"),
        ("/nonexistent/x.tar", "cannot read /nonexistent/x.tar"),
    ] {
        let r = c.shoal(0, &["image", "load", file]);
        assert_eq!(r.code, 2, "{file}: {}", r.stderr);
        assert!(r.stderr.contains(says), "{file}: {}", r.stderr);
    }
    assert_eq!(
        c.shoal_ok(0, &["image", "ls", "-q"]).unwrap().stdout,
        before
    );
}

#[test]
fn a_container_runs_confined_and_limited_with_pid_1_and_nothing_of_the_host() {
    if !root_or_skip("run containerd and containers") {
        return;
    }
    let mut c = Cluster::start(1).unwrap();
    c.start_containerd(0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("busybox.tar");
    std::fs::write(&archive, images::busybox("lab.local/busybox:1").unwrap()).unwrap();
    c.shoal_ok(0, &["image", "load", archive.to_str().unwrap()])
        .unwrap();
    let script = "echo pid=$$; grep CapEff /proc/self/status; busybox ls /; \
                  busybox ps -o pid,comm; busybox hostname; busybox cat /etc/resolv.conf";
    let r = run_sh(&c, script);
    assert!(r.ok(), "{}", r.stderr);
    let out = r.stdout;
    assert!(out.contains("pid=1\n"), "{out}");
    // Docker's default capabilities: no CAP_SYS_ADMIN (bit 21).
    assert!(out.contains("CapEff:\t00000000a80425fb"), "{out}");
    // The image's root: nothing of the host's state dir or API socket.
    let root: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("CapEff"))
        .skip(1)
        .take_while(|l| !l.contains("PID"))
        .collect();
    assert!(
        root.contains(&"bin") && !root.contains(&"var") && !root.contains(&"run"),
        "{out}"
    );
    // Only its own processes.
    let procs = out
        .lines()
        .skip_while(|l| !l.contains("PID"))
        .skip(1)
        .take_while(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .count();
    assert_eq!(procs, 2, "{out}");
    assert!(out.contains("shoal-run-"), "{out}");
    assert!(out.contains("nameserver 127.0.0.11"), "{out}");

    // Limits: more memory than allowed is killed by the kernel (SIGKILL,
    // 137); more processes than allowed cannot fork.
    let hog = [
        "debug",
        "run",
        "--memory",
        "16m",
        "lab.local/busybox:1",
        "--",
    ];
    let r = c.shoal(
        0,
        &[
            &hog[..],
            &[
                "/bin/sh",
                "-c",
                "busybox dd if=/dev/zero of=/dev/null bs=64M count=1",
            ],
        ]
        .concat(),
    );
    assert_eq!(r.code, 137, "{}", r.stderr);
    let r = c.shoal(
        0,
        &[
            &hog[..],
            &[
                "/bin/sh",
                "-c",
                "busybox dd if=/dev/zero of=/dev/null bs=4M count=1",
            ],
        ]
        .concat(),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let forks = "busybox sleep 1 & busybox sleep 1 & busybox sleep 1 & wait";
    let run_forks = |limit: &[&str]| {
        let args = [
            &["debug", "run"][..],
            limit,
            &["lab.local/busybox:1", "--", "/bin/sh", "-c", forks],
        ];
        c.shoal(0, &args.concat())
    };
    let r = run_forks(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = run_forks(&["--pids-limit", "3"]);
    assert_ne!(
        r.code, 0,
        "4 processes ran under a limit of 3: {}",
        r.stderr
    );
    let r = c.shoal(
        0,
        &[
            "debug",
            "run",
            "--memory",
            "1m",
            "lab.local/busybox:1",
            "--",
            "true",
        ],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("at least 6m"), "{}", r.stderr);

    // The exit status comes back; an unknown image is named.
    let r = run_sh(&c, "exit 3");
    assert_eq!(r.code, 3, "{}", r.stderr);
    let r = c.shoal(0, &["debug", "run", "lab.local/nothing:1", "--", "true"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("no such image on this node: lab.local/nothing:1"),
        "{}",
        r.stderr
    );
    // Nothing is left in containerd.
    let out = std::process::Command::new("ctr")
        .arg("--address")
        .arg(c.containerd_socket(0))
        .args(["-n", "shoal", "containers", "ls", "-q"])
        .output()
        .unwrap();
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Two namespace hosts, each with its containerd and the busybox image
/// `lab.local/busybox:1` loaded, a swarm of them, and overlay `appnet`.
fn container_lab() -> Cluster {
    let mut c = Cluster::start_isolated(2).unwrap();
    for i in 0..2 {
        c.start_containerd(i).unwrap();
    }
    c.form(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("busybox.tar");
    std::fs::write(&archive, images::busybox("lab.local/busybox:1").unwrap()).unwrap();
    for i in 0..2 {
        c.shoal_ok(i, &["image", "load", archive.to_str().unwrap()])
            .unwrap();
    }
    c.shoal_ok(0, &["network", "create", "appnet"]).unwrap();
    c
}

/// `lab.local/busybox:1` loaded on host `i`.
fn load_busybox(c: &Cluster, i: usize) {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("busybox.tar");
    std::fs::write(&archive, images::busybox("lab.local/busybox:1").unwrap()).unwrap();
    c.shoal_ok(i, &["image", "load", archive.to_str().unwrap()])
        .unwrap();
}

/// Service `name`: `replicas` busybox containers sleeping an hour.
fn create_sleepers(c: &Cluster, name: &str, replicas: &str) {
    c.shoal_ok(
        0,
        &[
            "service",
            "create",
            "--name",
            name,
            "--replicas",
            replicas,
            "lab.local/busybox:1",
            "busybox",
            "sleep",
            "3600",
        ],
    )
    .unwrap();
}

/// Every task of `service`, by `service ps --format json` on host `i`.
fn service_ps(c: &Cluster, i: usize, service: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let ps = c
        .shoal_ok(i, &["service", "ps", "--format", "json", service])?
        .json()?;
    Ok(ps.as_array().cloned().unwrap_or_default())
}

/// The tasks of `service` that run, by `service ps --format json`.
fn running(c: &Cluster, i: usize, service: &str) -> Vec<serde_json::Value> {
    service_ps(c, i, service)
        .unwrap()
        .into_iter()
        .filter(|t| t["desired_state"] == "running" && t["state"] == "running")
        .collect()
}

/// The first task of `service` once it is in `state` (within `limit`).
fn first_task_when(c: &Cluster, service: &str, state: &str, limit: Duration) -> serde_json::Value {
    first_task_where(c, service, limit, |t| t["state"] == state)
}

/// The first task of `service` once `ok` holds for it (within `limit`).
fn first_task_where(
    c: &Cluster,
    service: &str,
    limit: Duration,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    c.wait_until_value(limit, || {
        let t = service_ps(c, 0, service)?
            .first()
            .cloned()
            .unwrap_or_default();
        anyhow::ensure!(ok(&t), "{t}");
        Ok(t)
    })
    .unwrap()
}

/// The container tasks containerd runs on host `i`: task ID → PID.
fn container_pids(c: &Cluster, i: usize) -> std::collections::BTreeMap<String, String> {
    ctr_on(c, i, &["tasks", "ls"])
        .lines()
        .skip(1)
        .filter(|l| l.contains("RUNNING"))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.to_owned(), f.next()?.to_owned()))
        })
        .collect()
}

#[test]
fn a_service_runs_its_image_as_containers_behind_the_mesh_and_outlives_its_daemon() {
    if !root_or_skip("run containerd, containers and network namespaces") {
        return;
    }
    let mut c = container_lab();
    let script = r#"busybox mkdir -p /www && echo "{\"task\":\"$(busybox hostname)\"}" > /www/index.html && echo started $(busybox hostname) && exec busybox httpd -f -p 80 -h /www"#;
    let created = c
        .shoal_ok(
            0,
            &[
                "service",
                "create",
                "--name",
                "web",
                "--replicas",
                "2",
                "--network",
                "appnet",
                "-p",
                "8080:80",
                "--limit-memory",
                "64m",
                "lab.local/busybox:1",
                "/bin/sh",
                "-c",
                script,
            ],
        )
        .unwrap();
    // Resolved from the node's own images: said so.
    assert!(
        created.stderr.contains("from this node's images"),
        "{}",
        created.stderr
    );
    let svc = c.service_inspect(0, "web").unwrap();
    assert_eq!(svc["container"]["image"], "lab.local/busybox:1", "{svc}");
    assert!(
        svc["container"]["digest"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:")),
        "{svc}"
    );
    let tasks = c
        .wait_until_value(Duration::from_secs(60), || {
            let t = running(&c, 0, "web");
            anyhow::ensure!(t.len() == 2, "{} of 2 tasks run", t.len());
            Ok(t)
        })
        .unwrap();
    let ids: std::collections::BTreeSet<String> = tasks
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect();
    // Each is a container in its node's containerd.
    let mut pids = std::collections::BTreeMap::new();
    for i in 0..2 {
        pids.extend(container_pids(&c, i));
    }
    let running_ids: std::collections::BTreeSet<String> = pids.keys().cloned().collect();
    assert_eq!(running_ids, ids, "{pids:?}");

    // Requests through the routing mesh reach both containers.
    let bin = shoal_integration::shoal_bin()
        .to_string_lossy()
        .into_owned();
    let url = format!("http://{}:8080/", c.hosts[1].ip);
    let mut seen = std::collections::BTreeSet::new();
    c.wait_until(
        "both tasks answer through the mesh",
        Duration::from_secs(60),
        |c| {
            let r = c.in_host(1, &bin, &["tool", "http-get", "--timeout", "2", &url]);
            anyhow::ensure!(r.ok(), "{}", r.stderr);
            let v: serde_json::Value = serde_json::from_str(&r.stdout)?;
            seen.insert(v["task"].as_str().unwrap_or_default().to_owned());
            Ok(seen.len() == 2)
        },
    )
    .unwrap();
    assert!(seen.contains("web.1") && seen.contains("web.2"), "{seen:?}");
    // Inside a task (`shoal exec`, through containerd): the container's
    // processes only, the image's root, nothing of the host, no
    // CAP_SYS_ADMIN.
    let t1 = tasks.iter().find(|t| t["name"] == "web.1").unwrap();
    let on = c
        .hosts
        .iter()
        .position(|h| h.name == t1["node"].as_str().unwrap())
        .unwrap();
    let state_dir = c.hosts[on].state_dir.display().to_string();
    let look = format!(
        "busybox ps -o pid,comm; grep CapEff /proc/self/status; \
         for p in /run/shoal {state_dir} {sock}; do test -e $p && echo found $p; done; \
         busybox cat /etc/hostname; exit 4",
        sock = c.hosts[on].socket.display()
    );
    let r = c.shoal(on, &["exec", "web.1", "--", "/bin/sh", "-c", &look]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    let procs: Vec<&str> = r
        .stdout
        .lines()
        .skip(1)
        .take_while(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    assert!(procs[0].trim_start().starts_with("1 "), "{}", r.stdout);
    assert_eq!(procs.len(), 3, "httpd, sh and ps only: {}", r.stdout);
    assert!(
        r.stdout.contains("CapEff:\t00000000a80425fb"),
        "{}",
        r.stdout
    );
    assert!(!r.stdout.contains("found"), "{}", r.stdout);
    assert!(r.stdout.contains("web.1\n"), "{}", r.stdout);

    // Their output is the service's log.
    let logs = c.shoal_ok(0, &["service", "logs", "web"]).unwrap();
    assert!(logs.stdout.contains("started web.1"), "{}", logs.stdout);
    assert!(logs.stdout.contains("started web.2"), "{}", logs.stdout);

    // kill -9 a daemon: its container goes on; restarted, the daemon
    // watches it again without restarting it.
    let before = container_pids(&c, 1);
    assert_eq!(before.len(), 1, "{before:?}");
    c.kill(1);
    assert_eq!(container_pids(&c, 1), before);
    c.start_daemon(1).unwrap();
    c.holds_for("the task stays as it was", Duration::from_secs(5), |c| {
        let now: std::collections::BTreeSet<String> = running(c, 0, "web")
            .iter()
            .map(|t| t["id"].as_str().unwrap().to_owned())
            .collect();
        Ok(now == ids)
    })
    .unwrap();
    assert_eq!(container_pids(&c, 1), before);

    // A task over its memory limit is killed by the kernel, and says so.
    c.shoal_ok(
        0,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "hog",
            "--restart-condition",
            "none",
            "--limit-memory",
            "16m",
            "lab.local/busybox:1",
            "busybox",
            "dd",
            "if=/dev/zero",
            "of=/dev/null",
            "bs=64M",
            "count=1",
        ],
    )
    .unwrap();
    let failed = first_task_when(&c, "hog", "failed", Duration::from_secs(60));
    assert!(
        failed["message"]
            .as_str()
            .is_some_and(|m| m.contains("out of memory")),
        "{failed}"
    );

    // Nodes report what they have; a reservation larger than any node
    // leaves the task pending, saying why.
    let nodes = c.node_ls(0).unwrap();
    assert!(
        nodes
            .iter()
            .all(|n| n["resources"]["memory_bytes"].as_u64().unwrap_or(0) > 1 << 30),
        "{nodes:?}"
    );
    let huge = |name: &str, mode: &str| {
        let args = [
            "service",
            "create",
            "--detach",
            "--name",
            name,
            "--mode",
            mode,
            "--reserve-memory",
            "1000g",
            "lab.local/busybox:1",
            "busybox",
            "sleep",
            "600",
        ];
        c.shoal_ok(0, &args).unwrap();
    };
    huge("huge", "replicated");
    let pending = first_task_when(&c, "huge", "pending", Duration::from_secs(30));
    assert_eq!(
        pending["error"], "no suitable node (insufficient memory on 2 nodes)",
        "{pending}"
    );
    // A global service too: its task waits, pending, on each node.
    huge("everywhere", "global");
    c.wait_until(
        "a pending global task on each node",
        Duration::from_secs(30),
        |c| {
            let all = service_ps(c, 0, "everywhere")?;
            let nodes: std::collections::BTreeSet<&str> =
                all.iter().filter_map(|t| t["node"].as_str()).collect();
            Ok(all.len() == 2
                && nodes.len() == 2
                && all.iter().all(|t| {
                    t["state"] == "pending"
                        && t["error"] == "no suitable node (insufficient memory on 1 node)"
                }))
        },
    )
    .unwrap();

    // Removed, the containers go.
    c.shoal_ok(0, &["service", "rm", "web", "hog", "huge", "everywhere"])
        .unwrap();
    c.wait_until("no containers left", Duration::from_secs(30), |c| {
        for i in 0..2 {
            let left = ctr_on(c, i, &["containers", "ls", "-q"]);
            anyhow::ensure!(left.trim().is_empty(), "node{}: {left}", i + 1);
        }
        Ok(true)
    })
    .unwrap();
}

/// The task of `service` named `name` (`SERVICE.SLOT`) that runs, if any.
fn running_named(c: &Cluster, service: &str, name: &str) -> Option<serde_json::Value> {
    running(c, 0, service)
        .into_iter()
        .find(|t| t["name"] == name)
}

#[test]
fn a_task_failing_its_health_check_leaves_the_mesh_and_is_replaced() {
    if !root_or_skip("run containerd, containers and network namespaces") {
        return;
    }
    let c = container_lab();
    let script = r#"busybox mkdir -p /www && echo "{\"task\":\"$(busybox hostname)\"}" > /www/index.html && busybox touch /www/ok && exec busybox httpd -f -p 80 -h /www"#;
    c.shoal_ok(
        0,
        &[
            "service",
            "create",
            "--name",
            "hc",
            "--replicas",
            "2",
            "--network",
            "appnet",
            "-p",
            "8081:80",
            "--health-cmd",
            "busybox test -e /www/ok",
            "--health-interval",
            "1s",
            "--health-retries",
            "2",
            "lab.local/busybox:1",
            "/bin/sh",
            "-c",
            script,
        ],
    )
    .unwrap();
    c.wait_until("both tasks healthy", Duration::from_secs(60), |c| {
        let t = running(c, 0, "hc");
        Ok(t.len() == 2 && t.iter().all(|t| t["health"] == "healthy"))
    })
    .unwrap();
    let bin = shoal_integration::shoal_bin()
        .to_string_lossy()
        .into_owned();
    let url = format!("http://{}:8081/", c.hosts[0].ip);
    let answer = |c: &Cluster| -> anyhow::Result<String> {
        let r = c.in_host(0, &bin, &["tool", "http-get", "--timeout", "2", &url]);
        anyhow::ensure!(r.ok(), "{}", r.stderr);
        let v: serde_json::Value = serde_json::from_str(&r.stdout)?;
        Ok(v["task"].as_str().unwrap_or_default().to_owned())
    };
    let mut seen = std::collections::BTreeSet::new();
    c.wait_until("both answer", Duration::from_secs(30), |c| {
        seen.insert(answer(c)?);
        Ok(seen.len() == 2)
    })
    .unwrap();

    // hc.1's check starts failing: within a few intervals it takes no more
    // connections, its task fails as unhealthy, and a new hc.1 replaces it.
    let first = running_named(&c, "hc", "hc.1").unwrap();
    let on = c
        .hosts
        .iter()
        .position(|h| h.name == first["node"].as_str().unwrap())
        .unwrap();
    c.shoal_ok(on, &["exec", "hc.1", "--", "busybox", "rm", "/www/ok"])
        .unwrap();
    c.wait_until("hc.1 out of the mesh", Duration::from_secs(15), |c| {
        // Ten answers in a row from hc.2 only.
        for _ in 0..10 {
            if answer(c)? != "hc.2" {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .unwrap();
    let old = first["id"].as_str().unwrap().to_owned();
    c.wait_until("hc.1 failed as unhealthy", Duration::from_secs(30), |c| {
        let t = service_ps(c, 0, "hc")?
            .into_iter()
            .find(|t| t["id"] == old.as_str());
        Ok(t.is_some_and(|t| {
            t["state"] == "failed"
                && t["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("unhealthy"))
        }))
    })
    .unwrap();
    c.wait_until(
        "a new hc.1 healthy and answering",
        Duration::from_secs(60),
        |c| {
            let now = running_named(c, "hc", "hc.1");
            let fresh = now.is_some_and(|t| t["id"] != old.as_str() && t["health"] == "healthy");
            Ok(fresh && answer(c)? == "hc.1")
        },
    )
    .unwrap();
}

/// The digest service `name` runs, by `service inspect`.
fn service_digest(c: &Cluster, name: &str) -> String {
    let v = c
        .shoal_ok(0, &["service", "inspect", name])
        .unwrap()
        .json()
        .unwrap();
    let v = if v.is_array() { v[0].clone() } else { v };
    v["container"]["digest"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn nodes_pull_what_a_service_names_from_the_lab_registry_and_a_moved_tag_changes_nothing_until_update()
 {
    if !root_or_skip("run containerd, a registry and network namespaces") {
        return;
    }
    let mut c = Cluster::start_isolated(2).unwrap();
    for i in 0..2 {
        c.start_containerd(i).unwrap();
    }
    let registry = c.start_registry().unwrap();
    c.form(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("busybox.tar");
    std::fs::write(&archive, images::busybox("lab/busybox:1").unwrap()).unwrap();
    c.push(&archive, "lab/busybox:1").unwrap();
    let image = format!("{registry}/lab/busybox:1");

    // An explicit pull, on node1 only.
    let r = c.shoal_ok(0, &["image", "pull", &image]).unwrap();
    assert!(r.stdout.contains(&image), "{}", r.stdout);
    let ls = c
        .shoal_ok(0, &["image", "ls", "--format", "json"])
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(ls[0]["name"], image.as_str(), "{ls}");
    let first = ls[0]["digest"].as_str().unwrap().to_owned();
    assert!(
        c.shoal_ok(1, &["image", "ls", "-q"])
            .unwrap()
            .stdout
            .trim()
            .is_empty()
    );

    // A service of it: the digest comes from the registry (no warning), and
    // node2, which has no image, pulls it to run its task.
    let r = c
        .shoal_ok(
            0,
            &[
                "service",
                "create",
                "--name",
                "pulled",
                "--replicas",
                "2",
                &image,
                "busybox",
                "sleep",
                "3600",
            ],
        )
        .unwrap();
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
    assert_eq!(service_digest(&c, "pulled"), first);
    c.wait_until("2 tasks running", Duration::from_secs(60), |c| {
        Ok(running(c, 0, "pulled").len() == 2)
    })
    .unwrap();
    let nodes: std::collections::BTreeSet<String> = running(&c, 0, "pulled")
        .iter()
        .map(|t| t["node"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(nodes.len(), 2, "one task on each node: {nodes:?}");
    let on_node2 = c
        .shoal_ok(1, &["image", "ls", "--format", "json"])
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(on_node2[0]["digest"], first.as_str(), "{on_node2}");

    // The tag moves to another image: the running service is unchanged.
    std::fs::write(
        &archive,
        images::oci_archive(
            "lab/busybox:1",
            &images::busybox_layer().unwrap(),
            &["/bin/sh", "-c", "moved"],
        )
        .unwrap(),
    )
    .unwrap();
    c.push(&archive, "lab/busybox:1").unwrap();
    let before: Vec<_> = running(&c, 0, "pulled")
        .iter()
        .map(|t| t["id"].clone())
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(service_digest(&c, "pulled"), first);
    let after: Vec<_> = running(&c, 0, "pulled")
        .iter()
        .map(|t| t["id"].clone())
        .collect();
    assert_eq!(before, after);

    // `service update --image` resolves the tag again and rolls out.
    c.shoal_ok(0, &["service", "update", "--image", &image, "pulled"])
        .unwrap();
    let moved = service_digest(&c, "pulled");
    assert!(moved.starts_with("sha256:") && moved != first, "{moved}");
    c.wait_until(
        "2 tasks of the new image running",
        Duration::from_secs(60),
        |c| {
            let tasks = running(c, 0, "pulled");
            Ok(tasks.len() == 2 && tasks.iter().all(|t| !before.contains(&t["id"])))
        },
    )
    .unwrap();

    // What the registry does not have is refused, and nothing is created.
    let missing = format!("{registry}/lab/nothing:1");
    let r = c.shoal(0, &["service", "create", "--name", "missing", &missing]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("not found"), "{}", r.stderr);
    assert_eq!(c.shoal(0, &["service", "inspect", "missing"]).code, 3);
    let ids = c.shoal_ok(0, &["service", "ls", "-q"]).unwrap().stdout;
    assert_eq!(ids.lines().count(), 1, "{ids}");
    let r = c.shoal(0, &["image", "pull", &missing]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("not found"), "{}", r.stderr);
}

#[test]
fn a_task_waits_with_the_reason_while_containerd_is_away_and_starts_once_it_answers() {
    if !root_or_skip("run containerd and network namespaces") {
        return;
    }
    let mut c = Cluster::start_isolated(1).unwrap();
    c.form(1).unwrap();
    // No containerd: the image cannot be resolved here, so the service
    // runs it by name, with a warning.
    let r = c
        .shoal_ok(
            0,
            &[
                "service",
                "create",
                "--detach",
                "--name",
                "late",
                "lab.local/busybox:1",
                "busybox",
                "sleep",
                "600",
            ],
        )
        .unwrap();
    assert!(r.stderr.contains("could not be resolved"), "{}", r.stderr);
    // The task waits on its node, saying why and when it tries again; it
    // neither fails nor is replaced, however long containerd is away.
    let waiting = first_task_where(&c, "late", Duration::from_secs(20), |t| {
        t["state"] == "assigned" && t["message"] != ""
    });
    let msg = waiting["message"].as_str().unwrap();
    assert!(
        msg.contains("waiting to start: containerd does not answer") && msg.contains("next try in"),
        "{msg}"
    );
    std::thread::sleep(Duration::from_secs(4));
    let ps = service_ps(&c, 0, "late").unwrap();
    assert_eq!(ps.len(), 1, "{ps:?}");
    assert_eq!(ps[0]["id"], waiting["id"], "{ps:?}");
    assert_eq!(ps[0]["state"], "assigned", "{ps:?}");

    // containerd comes, then the image: the same task runs.
    c.start_containerd(0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("busybox.tar");
    std::fs::write(&archive, images::busybox("lab.local/busybox:1").unwrap()).unwrap();
    c.shoal_ok(0, &["image", "load", archive.to_str().unwrap()])
        .unwrap();
    let ran = first_task_when(&c, "late", "running", Duration::from_secs(90));
    assert_eq!(ran["id"], waiting["id"]);
}

#[test]
fn a_registry_that_asks_for_credentials_gets_those_of_the_auth_file() {
    if !root_or_skip("run containerd, a registry and network namespaces") {
        return;
    }
    let mut c = Cluster::start_isolated(1).unwrap();
    c.start_containerd(0).unwrap();
    let hash = bcrypt::hash_with_salt("s3cret", 4, [7; 16]).unwrap();
    let registry = c
        .start_registry_with(Some(&format!(
            "lab:{}\n",
            hash.format_for_version(bcrypt::Version::TwoY)
        )))
        .unwrap();
    c.init(0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("busybox.tar");
    std::fs::write(&archive, images::busybox("lab/private:1").unwrap()).unwrap();
    c.push_as(&archive, "lab/private:1", Some("lab:s3cret"))
        .unwrap();
    let image = format!("{registry}/lab/private:1");

    // No credentials: refused, saying how to give them.
    let r = c.shoal(0, &["image", "pull", &image]);
    assert!(!r.ok(), "{r:?}");
    assert!(
        r.stderr.contains("refused access") && r.stderr.contains("--registry-auth-file"),
        "{}",
        r.stderr
    );
    // A service of it is created (its digest unknown, with a warning, as
    // Docker does), and its task waits, saying why.
    let r = c
        .shoal_ok(
            0,
            &[
                "service", "create", "--detach", "--name", "private", &image, "busybox", "sleep",
                "3600",
            ],
        )
        .unwrap();
    assert!(r.stderr.contains("could not be resolved"), "{}", r.stderr);
    first_task_where(&c, "private", Duration::from_secs(30), |t| {
        let m = t["message"].as_str().unwrap_or_default();
        t["state"] == "assigned" && m.contains("waiting to start") && m.contains("refused access")
    });

    // Wrong credentials: refused the same way.
    let auth = dir.path().join("config.json");
    let creds = |password: &str| {
        serde_json::json!({"auths": {registry.clone(): {"username": "lab", "password": password}}})
            .to_string()
    };
    std::fs::write(&auth, creds("wrong")).unwrap();
    c.hosts[0].daemon_args = vec![
        "--registry-auth-file".into(),
        auth.to_string_lossy().into_owned(),
    ];
    c.stop(0);
    c.start_daemon(0).unwrap();
    let r = c.shoal(0, &["image", "pull", &image]);
    assert!(r.stderr.contains("refused access"), "{r:?}");

    // The right ones: the waiting task pulls its image and runs.
    std::fs::write(&auth, creds("s3cret")).unwrap();
    c.stop(0);
    c.start_daemon(0).unwrap();
    first_task_when(&c, "private", "running", Duration::from_secs(60));
    let ls = c.shoal_ok(0, &["image", "ls"]).unwrap();
    assert!(ls.stdout.contains(&image), "{}", ls.stdout);
}

#[test]
fn a_containerd_restart_is_noticed_and_its_tasks_are_accounted_for() {
    if !root_or_skip("run containerd and containers") {
        return;
    }
    let mut c = Cluster::start_isolated(1).unwrap();
    c.start_containerd(0).unwrap();
    c.init(0).unwrap();
    load_busybox(&c, 0);
    create_sleepers(&c, "steady", "2");
    let before: Vec<String> = running(&c, 0, "steady")
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(before.len(), 2);
    let pids: Vec<String> = before.iter().map(|id| c.task_pid(0, id).unwrap()).collect();

    // containerd goes away and comes back: the containers ran on (their
    // shims hold them), and the node still counts them as its tasks.
    c.kill_containerd(0);
    c.wait_until("containerd reported down", Duration::from_secs(10), |c| {
        Ok(containerd_of(c, 0)["error"].is_string())
    })
    .unwrap();
    // One of them dies meanwhile.
    let _ = std::process::Command::new("kill")
        .args(["-9", &pids[1]])
        .status();
    c.holds_for(
        "no task replaced while containerd is away",
        Duration::from_secs(2),
        |c| Ok(running(c, 0, "steady").len() == 2),
    )
    .unwrap();
    c.start_containerd(0).unwrap();
    // Once it is back, the dead one is reported as it ended and replaced;
    // the other is the same task in the same container.
    c.wait_until(
        "the dead task reported and replaced",
        Duration::from_secs(30),
        |c| {
            let all = service_ps(c, 0, "steady")?;
            let dead = all.iter().find(|t| t["id"] == before[1].as_str());
            let live = running(c, 0, "steady");
            Ok(dead.is_some_and(|t| t["state"] == "failed")
                && live.len() == 2
                && live.iter().any(|t| t["id"] == before[0].as_str()))
        },
    )
    .unwrap();
    assert_eq!(
        c.task_pid(0, &before[0]).unwrap(),
        pids[0],
        "the live task's container was kept"
    );
    let dead = service_ps(&c, 0, "steady")
        .unwrap()
        .into_iter()
        .find(|t| t["id"] == before[1].as_str())
        .unwrap();
    assert!(
        dead["message"]
            .as_str()
            .unwrap_or_default()
            .contains("signal 9")
            || dead["error"]
                .as_str()
                .unwrap_or_default()
                .contains("signal 9"),
        "{dead}"
    );
}

#[test]
fn user_and_group_names_are_the_images() {
    if !root_or_skip("run containerd and containers") {
        return;
    }
    let mut c = Cluster::start_isolated(1).unwrap();
    c.start_containerd(0).unwrap();
    c.init(0).unwrap();
    let mut layer = images::busybox_layer().unwrap();
    let file = |text: &str| images::Entry::File(text.as_bytes().to_vec(), 0o644);
    layer.push((
        "etc/passwd",
        file("root:x:0:0:root:/root:/bin/sh\nwww:x:33:44::/srv:/bin/sh\n"),
    ));
    layer.push(("etc/group", file("root:x:0:\nweb:x:44:\nstaff:x:50:\n")));
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("users.tar");
    std::fs::write(
        &archive,
        images::oci_archive("lab.local/users:1", &layer, &["/bin/sh"]).unwrap(),
    )
    .unwrap();
    c.shoal_ok(0, &["image", "load", archive.to_str().unwrap()])
        .unwrap();
    let create = |name: &str, user: &str| {
        c.shoal(
            0,
            &[
                "service",
                "create",
                "--detach",
                "--name",
                name,
                "--user",
                user,
                "--stop-grace-period",
                "1s",
                "lab.local/users:1",
                "busybox",
                "sleep",
                "3600",
            ],
        )
    };
    // Names, as `docker run --user` reads them: the user's primary group,
    // or the one named.
    for (name, user, want) in [
        ("www", "www", "33 44"),
        ("staff", "www:staff", "33 50"),
        ("byuid", "33", "33 44"),
    ] {
        assert!(create(name, user).ok());
        let task = first_task_when(&c, name, "running", Duration::from_secs(30));
        let id = c
            .shoal_ok(
                0,
                &[
                    "exec",
                    task["name"].as_str().unwrap(),
                    "--",
                    "busybox",
                    "sh",
                    "-c",
                    "echo $(busybox id -u) $(busybox id -g)",
                ],
            )
            .unwrap();
        assert_eq!(id.stdout.trim(), want, "--user {user}");
    }
    // A name the image does not have: the task fails saying so.
    assert!(create("nobody", "nobody").ok());
    let failed = c
        .wait_until_value(Duration::from_secs(30), || {
            let ps = service_ps(&c, 0, "nobody")?;
            let failed = ps.iter().find(|t| t["state"] == "failed").cloned();
            failed.ok_or_else(|| anyhow::anyhow!("no failed task yet: {ps:?}"))
        })
        .unwrap();
    let message = failed["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("user `nobody`")
            && message.contains("no such user in the image's /etc/passwd"),
        "{failed}"
    );
}

/// A small tmpfs on a directory of its own, unmounted and removed when
/// dropped (declared before the cluster that uses it, it goes after it).
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn new(size: &str) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("shoal-test-tmpfs-")
            .tempdir()
            .unwrap();
        let mount = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "shoal-test"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(mount.success());
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

#[test]
fn a_disk_too_full_to_load_an_image_says_so_and_disturbs_nothing_running() {
    if !root_or_skip("mount a small tmpfs and run containerd") {
        return;
    }
    let disk = Tmpfs::new("16m");
    let mut c = Cluster::start_isolated(1).unwrap();
    // containerd's root (content and snapshots) on a 16 MiB disk.
    let dir = &c.hosts[0].containerd_dir;
    std::fs::create_dir_all(dir).unwrap();
    std::os::unix::fs::symlink(disk.0.path(), dir.join("root")).unwrap();
    c.start_containerd(0).unwrap();
    c.init(0).unwrap();
    load_busybox(&c, 0);
    create_sleepers(&c, "steady", "1");
    let task = running(&c, 0, "steady")[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let pid = c.task_pid(0, &task).unwrap();

    // An image larger than the disk: refused, naming the cause.
    let mut layer = images::busybox_layer().unwrap();
    layer.push(("data", images::Entry::File(vec![7; 24 << 20], 0o644)));
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.tar");
    std::fs::write(
        &big,
        images::oci_archive("lab.local/big:1", &layer, &["/bin/sh"]).unwrap(),
    )
    .unwrap();
    let r = c.shoal(0, &["image", "load", big.to_str().unwrap()]);
    assert!(!r.ok(), "{r:?}");
    assert!(r.stderr.contains("no space left on device"), "{}", r.stderr);
    let ls = c.shoal_ok(0, &["image", "ls"]).unwrap();
    assert!(!ls.stdout.contains("lab.local/big"), "{}", ls.stdout);
    // The running task is untouched.
    let now = running(&c, 0, "steady");
    assert_eq!(now.len(), 1);
    assert_eq!(now[0]["id"], task.as_str());
    assert_eq!(c.task_pid(0, &task).unwrap(), pid);
}
