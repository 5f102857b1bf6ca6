//! Trust boundaries (issue 14): what a worker may do, checked where it is
//! served. The worker's own certificate and key are used directly against
//! the managers by an attack client over real QUIC.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Command as Process;
use std::time::Duration;

use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::{CommittedLeaderId, LogId, Vote};
use serde_json::Value;
use shoal_integration::Cluster;
use shoal_integration::attack::Attacker;
use shoal_mesh::task::{TaskReport, TaskState};
use shoal_mesh::wire::{ALPN_CTL, CtlReply, CtlRequest};
use shoal_mesh::{ApplyError, Command, NodeId, Role};
use shoal_raft::RaftRpc;

/// The tests here run one at a time: the flood loads the machine, and the
/// attack test checks that no election happened.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

const NOT_A_MANAGER: &str = "this node is not a swarm manager";
const CALLER_NOT_A_MANAGER: &str = "is not a swarm manager: only managers may change the swarm";

struct KillOnDrop(String);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Process::new("pkill").args(["-f", &self.0]).status();
    }
}

fn node_id(c: &Cluster, hostname: &str) -> NodeId {
    let nodes = c.node_ls(0).unwrap();
    let n = nodes.iter().find(|n| n["hostname"] == hostname).unwrap();
    NodeId(u64::from_str_radix(n["id"].as_str().unwrap(), 16).unwrap())
}

fn role_of(c: &Cluster, hostname: &str) -> Value {
    let nodes = c.node_ls(0).unwrap();
    nodes.iter().find(|n| n["hostname"] == hostname).unwrap()["role"].clone()
}

fn term(c: &Cluster, i: usize) -> u64 {
    c.info(i).unwrap()["raft"]["term"].as_u64().unwrap()
}

#[test]
fn a_worker_is_refused_every_change_on_its_node() {
    let _serial = serial();
    let c = Cluster::start(2).unwrap();
    c.form(1).unwrap();
    let writes: [&[&str]; 9] = [
        &["node", "promote", "node2"],
        &["swarm", "ca", "--rotate"],
        &["node", "update", "--availability", "drain", "node1"],
        &[
            "service", "create", "--detach", "--name", "x", "--", "sleep", "1",
        ],
        &["service", "scale", "x=2"],
        &["network", "create", "n"],
        &["swarm", "join-token", "manager"],
        &["swarm", "join-token", "-q", "worker"],
        &["service", "logs", "x"],
    ];
    for args in writes {
        let r = c.shoal(1, args);
        assert_eq!(r.code, 5, "`shoal {}`: {}", args.join(" "), r.stderr);
        assert!(r.stderr.contains(NOT_A_MANAGER), "{}", r.stderr);
    }
    // Reads of the worker's copy still work, and nothing changed.
    assert_eq!(role_of(&c, "node2"), "worker");
    // `info` shows the node's certificate: its expiry, and the CA that
    // signed it (the fingerprint join tokens pin).
    let token = c.token(0, "worker").unwrap();
    let cert = &c.info(1).unwrap()["certificate"];
    assert_eq!(cert["issuer_fingerprint"], token.split('-').nth(2).unwrap());
    assert!(
        cert["expires_at_ms"].as_i64().is_some_and(|t| t > 0),
        "{cert}"
    );
    let services = c
        .shoal_ok(1, &["service", "ls", "--format", "json"])
        .unwrap();
    assert_eq!(services.json().unwrap(), serde_json::json!([]));
    c.shoal_ok(1, &["network", "ls"]).unwrap();
}

#[test]
fn a_workers_key_used_directly_against_the_managers_changes_nothing() {
    let _serial = serial();
    let marker = format!("5{}", std::process::id() % 100_000 + 100_000);
    let _cleanup = KillOnDrop(format!("sleep {marker}"));
    let c = Cluster::start(3).unwrap();
    c.form_roles(&[true, true, false]).unwrap();
    // A task the worker does not run.
    c.shoal_ok(
        0,
        &[
            "service",
            "create",
            "--name",
            "pinned",
            "--constraint",
            "node.hostname==node1",
            "--",
            "sleep",
            &marker,
        ],
    )
    .unwrap();
    let ps = c
        .shoal_ok(0, &["service", "ps", "--format", "json", "pinned"])
        .unwrap();
    let task = ps.json().unwrap()[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(c.leader(0).unwrap(), Some(0));
    let worker_id = node_id(&c, "node3");
    let manager_id = node_id(&c, "node2");
    let leader: SocketAddr = c.hosts[0].addr().parse().unwrap();
    let follower: SocketAddr = c.hosts[1].addr().parse().unwrap();
    let worker = Attacker::with_identity_of(&c.hosts[2].state_dir).unwrap();
    let manager = Attacker::with_identity_of(&c.hosts[1].state_dir).unwrap();
    let token = c.token(0, "manager").unwrap();
    let term_before = term(&c, 0);

    // The attack client speaks the protocol: a member's ping is answered,
    // and a manager gets what a manager may have.
    assert!(matches!(
        worker.ctl(leader, &CtlRequest::Ping).unwrap(),
        CtlReply::Pong
    ));
    assert!(matches!(
        manager.ctl(leader, &CtlRequest::ManagerKey).unwrap(),
        CtlReply::ManagerKey(_)
    ));

    // Proposals: promote itself, rotate a token, force a new cluster, add a node.
    let proposals = [
        Command::SetRole {
            node: worker_id,
            role: Role::Manager,
        },
        Command::RotateToken {
            role: Role::Manager,
            hash: "00".repeat(32),
            sealed: vec![0; 48],
        },
        Command::ForceNewCluster { keep: worker_id },
        Command::RemoveNode(manager_id),
    ];
    for cmd in proposals {
        let what = format!("{cmd:?}");
        match worker
            .ctl(leader, &CtlRequest::Propose(Box::new(cmd)))
            .unwrap()
        {
            CtlReply::Refused(msg) => assert!(msg.contains(CALLER_NOT_A_MANAGER), "{what}: {msg}"),
            other => panic!("{what}: expected a refusal, got {other:?}"),
        }
    }
    match worker.ctl(leader, &CtlRequest::ManagerKey).unwrap() {
        CtlReply::Refused(msg) => assert!(msg.contains("only managers"), "{msg}"),
        other => panic!("the managers' key went to a worker: {other:?}"),
    }
    match worker
        .ctl(
            leader,
            &CtlRequest::TaskLog {
                task: task.clone(),
                offset: 0,
            },
        )
        .unwrap()
    {
        CtlReply::Refused(msg) => assert!(msg.contains("only managers"), "{msg}"),
        other => panic!("a task's output went to a worker: {other:?}"),
    }
    // A report on a task of another node: written as the worker's, refused.
    let report = TaskReport::new(task.as_str().into(), TaskState::Failed, "x".into(), None, 1);
    match worker.ctl(leader, &CtlRequest::ReportTask(report)).unwrap() {
        CtlReply::Applied(Err(ApplyError::NotAssigned { node, .. })) => {
            assert_eq!(node, worker_id)
        }
        other => panic!("expected NotAssigned, got {other:?}"),
    }

    // Raft: a vote at a far higher term, one that speaks for a manager,
    // and an append as a self-made leader; to the leader and a follower.
    let high = term_before + 10;
    let vote = |candidate: NodeId| {
        RaftRpc::Vote(VoteRequest::new(
            Vote::new(high, candidate.0),
            Some(LogId::new(
                CommittedLeaderId::new(high, candidate.0),
                1 << 40,
            )),
        ))
    };
    let append = || {
        RaftRpc::Append(AppendEntriesRequest {
            vote: Vote::new_committed(high, worker_id.0),
            prev_log_id: None,
            entries: vec![],
            leader_commit: None,
        })
    };
    for target in [leader, follower] {
        for rpc in [vote(worker_id), vote(manager_id), append()] {
            let reply = worker.raft(target, &rpc).unwrap();
            assert!(reply.is_none(), "{rpc:?} to {target} was served: {reply:?}");
        }
    }

    // Nothing changed: same roles, leader, term, token and task.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(role_of(&c, "node3"), "worker");
    assert_eq!(c.node_ls(0).unwrap().len(), 3);
    assert_eq!(c.leader(1).unwrap(), Some(0));
    assert_eq!(term(&c, 0), term_before);
    assert_eq!(term(&c, 1), term_before);
    assert_eq!(c.token(0, "manager").unwrap(), token);
    let ps = c
        .shoal_ok(0, &["service", "ps", "--format", "json", "pinned"])
        .unwrap();
    assert_eq!(ps.json().unwrap()[0]["state"], "running");
    // Each refusal is logged where it was served.
    let log = c.log(0);
    assert!(
        log.contains("proposal from a node that is not a manager refused"),
        "{log}"
    );
    assert!(log.contains("asked for the managers' key"), "{log}");
    assert!(log.contains("raft call refused"), "{log}");
    assert!(c.log(1).contains("raft call refused"));
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// What the flood may add to the daemon's memory: 4 join slots from one
/// address, each with a 4 MiB connection window, plus handshakes and
/// allocator slack.
const FLOOD_RSS_BOUND_MIB: u64 = 96;

#[test]
fn a_flood_of_anonymous_connections_costs_a_bounded_amount_and_joins_still_work() {
    let _serial = serial();
    let c = Cluster::start(2).unwrap();
    c.init(0).unwrap();
    let token = c.token(0, "worker").unwrap();
    let pid = c.hosts[0].pid().unwrap();
    let addr: SocketAddr = c.hosts[0].addr().parse().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let before = rss_kib(pid);
    // 200 connections × 100 streams × 16 MiB, from an address of its own.
    let flood = std::thread::spawn(move || {
        Attacker::anonymous("127.66.0.1".parse().unwrap())
            .unwrap()
            .flood(addr, 200, 100, 16 << 20, Duration::from_secs(10))
    });
    let mut peak = before;
    let sample = |peak: &mut u64| *peak = (*peak).max(rss_kib(pid));
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(100));
        sample(&mut peak);
    }
    // A legitimate join, while the flood goes on.
    c.join(1, &token, 0).unwrap();
    while !flood.is_finished() {
        sample(&mut peak);
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = flood.join().unwrap().unwrap();
    eprintln!("flood: {report:?}; RSS {before} KiB before, {peak} KiB at most");
    assert!(report.connected > 0, "the flood never reached the daemon");
    assert!(
        report.bytes_sent < 200 * (16 << 20),
        "the daemon took everything: {report:?}"
    );
    assert!(
        peak.saturating_sub(before) < FLOOD_RSS_BOUND_MIB << 10,
        "RSS grew by {} KiB (bound {FLOOD_RSS_BOUND_MIB} MiB)",
        peak - before
    );
    assert_eq!(c.node_ls(0).unwrap().len(), 2);
    assert!(c.running(0));
}

#[test]
fn a_removed_node_is_refused_at_the_handshake_and_never_comes_back() {
    let _serial = serial();
    let mut c = Cluster::start(3).unwrap();
    c.form_roles(&[true, true, false]).unwrap();
    let managers: Vec<SocketAddr> = (0..2).map(|i| c.hosts[i].addr().parse().unwrap()).collect();
    let removed = Attacker::with_identity_of(&c.hosts[2].state_dir).unwrap();
    let open = removed.session(managers[0], ALPN_CTL).unwrap();
    assert!(matches!(
        open.ctl(&CtlRequest::Ping).unwrap(),
        CtlReply::Pong
    ));
    c.stop(2);
    c.shoal_ok(0, &["node", "rm", "--force", "node3"]).unwrap();
    // Its open connection is closed (not answered with a refusal)…
    c.wait_until(
        "the removed node's connection to close",
        Duration::from_secs(10),
        |_| Ok(open.ctl(&CtlRequest::Ping).is_err()),
    )
    .unwrap();
    // …and every node refuses its certificate at the handshake.
    c.wait_until(
        "both managers to refuse it",
        Duration::from_secs(10),
        |_| {
            Ok(managers
                .iter()
                .all(|a| removed.ctl(*a, &CtlRequest::Ping).is_err()))
        },
    )
    .unwrap();
    for i in 0..2 {
        assert!(
            c.log(i)
                .contains("refused the certificate of a removed node"),
            "node{}: {}",
            i + 1,
            c.log(i)
        );
    }
    // Restarted with its old state dir, it stays out.
    c.start_daemon(2).unwrap();
    c.holds_for("node3 to stay out", Duration::from_secs(5), |c| {
        Ok((0..2).all(|i| {
            c.node_ls(i)
                .is_ok_and(|n| n.len() == 2 && n.iter().all(|n| n["hostname"] != "node3"))
        }))
    })
    .unwrap();
}

#[test]
fn past_the_store_quota_growth_is_refused_and_the_swarm_stays_usable() {
    let _serial = serial();
    let c = Cluster::start_configured(2, Some("[store]\nquota_mib = 1\n")).unwrap();
    c.form(2).unwrap();
    // About 210 KiB of environment per service.
    let env: Vec<String> = (0..7)
        .map(|i| format!("K{i}={}", "x".repeat(30_000)))
        .collect();
    let create = |c: &Cluster, name: &str, via: usize| {
        let mut args = vec![
            "service",
            "create",
            "--detach",
            "--replicas",
            "0",
            "--name",
            name,
        ];
        for e in &env {
            args.extend(["--env", e.as_str()]);
        }
        args.extend(["--", "true"]);
        c.shoal(via, &args)
    };
    let mut created = 0;
    let refused = loop {
        let r = create(&c, &format!("s{created}"), created % 2);
        if !r.ok() {
            break r;
        }
        created += 1;
        assert!(created < 10, "the quota never applied");
        std::thread::sleep(QUOTA_REMEASURE);
    };
    assert!(
        (4..=6).contains(&created),
        "{created} services fit in 1 MiB"
    );
    assert_eq!(refused.code, 4, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("store quota exceeded"),
        "{}",
        refused.stderr
    );
    // Reads, removals and the cluster's health are untouched.
    let ls = c
        .shoal_ok(1, &["service", "ls", "--format", "json"])
        .unwrap();
    assert_eq!(ls.json().unwrap().as_array().unwrap().len(), created);
    c.shoal_ok(0, &["service", "rm", "s0", "s1"]).unwrap();
    assert_eq!(c.leader(1).unwrap(), c.leader(0).unwrap());
    // The removed services' tasks leave the store as they shut down; the
    // next measurement after that finds room (a refused create changes
    // nothing, so it is tried again).
    c.wait_until("room again after removals", Duration::from_secs(15), |c| {
        Ok(create(c, "again", 1).ok())
    })
    .unwrap();
}

/// How long a quota measurement is kept (`daemon::quota::REMEASURE`), and a bit.
const QUOTA_REMEASURE: Duration = Duration::from_millis(1_100);

#[test]
fn certificates_expire_and_are_renewed_half_way_without_a_restart() {
    let _serial = serial();
    let mut c = Cluster::start_configured(2, Some("[pki]\nmin_cert_expiry_s = 10\n")).unwrap();
    // Below the configured minimum: refused, naming it.
    c.assert_refused(
        0,
        &["swarm", "init", "--cert-expiry", "5s"],
        "at least 10 s",
    );
    c.shoal_ok(0, &["swarm", "init", "--cert-expiry", "16s"])
        .unwrap();
    let token = c.token(0, "worker").unwrap();
    c.join(1, &token, 0).unwrap();
    let expiry = |c: &Cluster, i: usize| {
        c.info(i).unwrap()["certificate"]["expires_at_ms"]
            .as_i64()
            .unwrap()
    };
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    let first = [expiry(&c, 0), expiry(&c, 1)];
    assert!(first.iter().all(|e| e - now() <= 17_000), "{first:?}");
    // Keep the worker's first certificate and key, to try them once expired.
    let old = tempfile::tempdir().unwrap();
    for f in ["node.der", "node.key"] {
        std::fs::copy(c.hosts[1].state_dir.join(f), old.path().join(f)).unwrap();
    }
    // Both nodes renew at half-life (about 8 s in), without a restart.
    c.wait_until("both certificates renewed", Duration::from_secs(20), |c| {
        Ok(expiry(c, 0) > first[0] && expiry(c, 1) > first[1])
    })
    .unwrap();
    // Past the first certificates' expiry, new connections work with the
    // renewed ones: the manager restarts, and the worker is ready again.
    while now() < first[1] + 1_000 {
        std::thread::sleep(Duration::from_millis(200));
    }
    c.stop(0);
    c.start_daemon(0).unwrap();
    c.wait_until(
        "the worker to be ready again",
        Duration::from_secs(20),
        |c| Ok(c.node_ls(0)?.iter().all(|n| n["status"] == "ready")),
    )
    .unwrap();
    assert_eq!(role_of(&c, "node2"), "worker");
    // The first certificate, expired, is refused at the handshake.
    let expired = Attacker::with_identity_of(old.path()).unwrap();
    let manager: SocketAddr = c.hosts[0].addr().parse().unwrap();
    assert!(expired.ctl(manager, &CtlRequest::Ping).is_err());
    let renewed = Attacker::with_identity_of(&c.hosts[1].state_dir).unwrap();
    assert!(matches!(
        renewed.ctl(manager, &CtlRequest::Ping).unwrap(),
        CtlReply::Pong
    ));
    // `swarm update` changes the validity of the next renewals.
    c.assert_refused(
        0,
        &["swarm", "update", "--cert-expiry", "1s"],
        "at least 10 s",
    );
    c.shoal_ok(0, &["swarm", "update", "--cert-expiry", "2160h"])
        .unwrap();
}

#[test]
fn the_ca_rotates_under_traffic_and_the_old_ca_is_dropped() {
    let _serial = serial();
    let c = Cluster::start(4).unwrap();
    c.form_roles(&[true, true, false]).unwrap();
    let old_token = c.token(0, "worker").unwrap();
    let old_fp = old_token.split('-').nth(2).unwrap().to_owned();
    // The worker's certificate under the old CA, to try once it is dropped.
    let old = tempfile::tempdir().unwrap();
    for f in ["ca.der", "node.der", "node.key"] {
        std::fs::copy(c.hosts[2].state_dir.join(f), old.path().join(f)).unwrap();
    }
    // Traffic through the rotation: writes forwarded from the follower
    // manager to the leader, and reads on the worker.
    let term_before = term(&c, 0);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (rotated, failures, requests) = std::thread::scope(|scope| {
        let traffic = scope.spawn(|| {
            let (mut failures, mut n) = (Vec::new(), 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let label = format!("round={n}");
                for (i, args) in [
                    (1, vec!["node", "update", "--label-add", &label, "node3"]),
                    (2, vec!["node", "ls"]),
                ] {
                    let r = c.shoal(i, &args);
                    if !r.ok() {
                        failures.push(format!(
                            "`{}` on node{}: {}",
                            args.join(" "),
                            i + 1,
                            r.stderr
                        ));
                    }
                    n += 1;
                }
            }
            (failures, n)
        });
        std::thread::sleep(Duration::from_secs(1));
        let rotated = c.shoal_ok(0, &["swarm", "ca", "--rotate"]);
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (failures, n) = traffic.join().unwrap();
        (rotated.unwrap(), failures, n)
    });
    assert!(
        failures.is_empty(),
        "{} of {requests} requests failed: {failures:#?}",
        failures.len()
    );
    // The rotation cost no election.
    assert_eq!(
        term(&c, 0),
        term_before,
        "the leader changed during the rotation"
    );
    assert!(
        requests > 10,
        "only {requests} requests went through the rotation"
    );
    assert!(
        rotated.stdout.starts_with("-----BEGIN CERTIFICATE-----"),
        "{}",
        rotated.stdout
    );
    assert!(
        rotated.stderr.contains("CA rotation finished"),
        "{}",
        rotated.stderr
    );
    // Every node holds a certificate under the new CA, and the tokens pin it.
    let ca = c.shoal_ok(1, &["swarm", "ca"]).unwrap();
    assert_eq!(ca.stdout, rotated.stdout, "both managers show the new CA");
    let new_token = c.token(1, "worker").unwrap();
    let new_fp = new_token.split('-').nth(2).unwrap().to_owned();
    assert_ne!(new_fp, old_fp);
    assert_eq!(
        new_token.split('-').nth(3),
        old_token.split('-').nth(3),
        "the secret stays"
    );
    for i in 0..3 {
        let fp = &c.info(i).unwrap()["certificate"]["issuer_fingerprint"];
        assert_eq!(fp, new_fp.as_str(), "node{}", i + 1);
    }
    // A certificate under the old CA is refused at the handshake.
    let manager: SocketAddr = c.hosts[0].addr().parse().unwrap();
    let before = Attacker::with_identity_of(old.path()).unwrap();
    assert!(before.ctl(manager, &CtlRequest::Ping).is_err());
    let now = Attacker::with_identity_of(&c.hosts[2].state_dir).unwrap();
    assert!(matches!(
        now.ctl(manager, &CtlRequest::Ping).unwrap(),
        CtlReply::Pong
    ));
    // The old token names a CA the swarm no longer has; the new one joins.
    c.assert_refused(
        3,
        &["swarm", "join", "--token", &old_token, &c.hosts[0].addr()],
        "does not match the join token's fingerprint",
    );
    c.join(3, &new_token, 0).unwrap();
    // Everyone is ready, the new node too, and it has the store.
    c.wait_until("every node ready", Duration::from_secs(15), |c| {
        let nodes = c.node_ls(0)?;
        Ok(nodes.len() == 4
            && nodes.iter().all(|n| n["status"] == "ready")
            && c.node_ls(3)?.len() == 4)
    })
    .unwrap();
}

/// What of host `i`'s secrets is on its disk: (`node.key`, `manager.key`,
/// `raft.key`, `keys.locked`).
fn secrets_on_disk(c: &Cluster, i: usize) -> (bool, bool, bool, Option<Vec<u8>>) {
    let dir = &c.hosts[i].state_dir;
    (
        dir.join("node.key").exists(),
        dir.join("manager.key").exists(),
        dir.join("raft.key").exists(),
        std::fs::read(dir.join("keys.locked")).ok(),
    )
}

fn unlock_key_in(text: &str) -> String {
    text.split_whitespace()
        .find(|w| w.starts_with("SWMKEY-1-"))
        .unwrap_or_else(|| panic!("no unlock key in {text}"))
        .to_owned()
}

const LOCKED: &str = "this manager is locked";

#[test]
fn an_autolocked_manager_serves_nothing_until_unlocked() {
    let _serial = serial();
    let mut c = Cluster::start(3).unwrap();
    let init = c.shoal_ok(0, &["swarm", "init", "--autolock"]).unwrap();
    let key = unlock_key_in(&init.stdout);
    let mt = c.token(0, "manager").unwrap();
    let wt = c.token(0, "worker").unwrap();
    c.join(1, &mt, 0).unwrap();
    c.join(2, &wt, 0).unwrap();
    // Managers' keys are sealed at rest (the joined manager's as soon as it
    // has the store); the worker's are not.
    let sealed = |c: &Cluster, i| {
        let (node, manager, raft, locked) = secrets_on_disk(c, i);
        !node && !manager && !raft && locked.is_some()
    };
    c.wait_until("both managers' keys sealed", Duration::from_secs(10), |c| {
        Ok(sealed(c, 0) && sealed(c, 1))
    })
    .unwrap();
    assert_eq!(secrets_on_disk(&c, 2), (true, false, true, None));
    // The Raft data is sealed on every node (with its data key, itself
    // sealed under the unlock key on managers).
    c.shoal_ok(0, &["network", "create", "s3cr3tmarker"])
        .unwrap();
    c.wait_until("the network on every node", Duration::from_secs(10), |c| {
        Ok((0..3).all(|i| c.shoal(i, &["network", "inspect", "s3cr3tmarker"]).ok()))
    })
    .unwrap();
    for i in 0..3 {
        let log = std::fs::read(c.hosts[i].state_dir.join("raft/raft-log.redb")).unwrap();
        assert!(!log.windows(12).any(|w| w == b"s3cr3tmarker"), "host {i}");
    }
    let shown = c.shoal_ok(1, &["swarm", "unlock-key", "-q"]).unwrap();
    assert_eq!(shown.stdout.trim(), key);
    c.assert_refused(2, &["swarm", "unlock-key"], NOT_A_MANAGER);

    // Restarted, the manager is locked: it serves nothing but `info` and
    // `swarm unlock`.
    c.stop(1);
    c.start_daemon(1).unwrap();
    assert_eq!(c.info(1).unwrap()["swarm"], "locked");
    for args in [
        &["node", "ls"][..],
        &["service", "ls"],
        &["swarm", "unlock-key"],
    ] {
        let r = c.shoal(1, args);
        assert_eq!(r.code, 7, "`shoal {}`: {}", args.join(" "), r.stderr);
        assert!(r.stderr.contains(LOCKED), "{}", r.stderr);
    }
    // The other manager sees it go down: it does not answer its peers.
    c.wait_until("node2 down on node1", Duration::from_secs(30), |c| {
        let nodes = c.node_ls(0)?;
        Ok(nodes
            .iter()
            .any(|n| n["hostname"] == "node2" && n["status"] == "down"))
    })
    .unwrap();
    let wrong = format!("SWMKEY-1-{}", "ab".repeat(32));
    for (given, says) in [
        (wrong.as_str(), "invalid unlock key"),
        ("SWMKEY-1-nothex", "malformed unlock key"),
        ("", "no unlock key on standard input"),
    ] {
        let r = c.shoal_input(1, &["swarm", "unlock"], given);
        assert!(
            !r.ok() && r.stderr.contains(says),
            "{given:?}: {}",
            r.stderr
        );
    }
    assert_eq!(c.info(1).unwrap()["swarm"], "locked");
    let r = c.shoal_input(1, &["swarm", "unlock"], &format!("{key}\n"));
    assert!(
        r.ok() && r.stdout.contains("Swarm unlocked"),
        "{}",
        r.stderr
    );
    assert_eq!(c.info(1).unwrap()["swarm"], "active");
    c.wait_until("node2 ready again", Duration::from_secs(30), |c| {
        let nodes = c.node_ls(1)?;
        Ok(nodes.iter().all(|n| n["status"] == "ready"))
    })
    .unwrap();

    // A rotated key seals the managers' keys anew: after a restart only the
    // new key opens them.
    let before = secrets_on_disk(&c, 1).3;
    let rotated = c
        .shoal_ok(0, &["swarm", "unlock-key", "--rotate", "-q"])
        .unwrap();
    let new_key = rotated.stdout.trim().to_owned();
    assert_ne!(new_key, key);
    c.wait_until("node2 resealed", Duration::from_secs(10), |c| {
        Ok(secrets_on_disk(c, 1).3 != before)
    })
    .unwrap();
    c.stop(1);
    c.start_daemon(1).unwrap();
    let r = c.shoal_input(1, &["swarm", "unlock"], &key);
    assert!(r.stderr.contains("invalid unlock key"), "{}", r.stderr);
    let r = c.shoal_input(1, &["swarm", "unlock"], &new_key);
    assert!(r.ok(), "{}", r.stderr);
    assert_eq!(c.info(1).unwrap()["swarm"], "active");

    // Off: keys back in the clear, and a restart is not locked.
    c.shoal_ok(1, &["swarm", "update", "--autolock=false"])
        .unwrap();
    c.wait_until("keys in the clear", Duration::from_secs(10), |c| {
        Ok([0, 1]
            .iter()
            .all(|&i| secrets_on_disk(c, i) == (true, true, true, None)))
    })
    .unwrap();
    c.assert_refused(0, &["swarm", "unlock-key"], "autolock is not on");
    c.stop(0);
    c.start_daemon(0).unwrap();
    assert_eq!(c.info(0).unwrap()["swarm"], "active");
    let r = c.shoal_input(0, &["swarm", "unlock"], &new_key);
    assert!(r.stderr.contains("not locked"), "{}", r.stderr);
}
