//! The control plane as a user meets it: real daemons, real QUIC with mutual
//! TLS, real fsync, driven through the `shoal` CLI (issue 2's acceptance).

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use serde_json::Value;
use shoal_integration::Cluster;

const CONVERGE: Duration = Duration::from_secs(20);

fn count(nodes: &[Value], key: &str, value: &str) -> usize {
    nodes.iter().filter(|n| n[key] == value).count()
}

/// Every host's `node ls` lists all nodes with the right roles, all ready,
/// exactly one leader.
fn all_agree(c: &Cluster, managers: usize, up: &[usize]) -> anyhow::Result<bool> {
    for &i in up {
        let nodes = c.node_ls(i)?;
        if nodes.len() != c.hosts.len()
            || count(&nodes, "role", "manager") != managers
            || count(&nodes, "status", "ready") != c.hosts.len()
            || count(&nodes, "manager_status", "leader") != 1
        {
            anyhow::bail!(
                "{} sees {}",
                c.hosts[i].name,
                serde_json::to_string(&nodes)?
            );
        }
    }
    Ok(true)
}

fn ids(c: &Cluster, i: usize) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = c
        .node_ls(i)
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["hostname"].as_str().unwrap().to_owned(),
                n["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn five_nodes_form_a_swarm_survive_leader_loss_and_full_restart() {
    let mut c = Cluster::start(5).unwrap();
    c.form(3).unwrap();
    let all: Vec<usize> = (0..5).collect();
    c.wait_until("all five nodes to agree", CONVERGE, |c| {
        all_agree(c, 3, &all)
    })
    .unwrap();
    let workers = c.node_ls(4).unwrap();
    assert_eq!(
        count(&workers, "role", "worker"),
        2,
        "workers answer reads too"
    );

    // kill -9 the leader: another manager takes over and a write succeeds
    // through a surviving manager.
    let leader = c.leader(0).unwrap().expect("a leader");
    let survivor = (0..3).find(|i| *i != leader).unwrap();
    c.kill(leader);
    let target = c.hosts[survivor].name.clone();
    c.wait_until("a write through a surviving manager", CONVERGE, |c| {
        Ok(c.shoal(
            survivor,
            &["node", "update", "--label-add", "zone=east", &target],
        )
        .ok())
    })
    .unwrap();
    let new_leader = c.leader(survivor).unwrap().expect("a new leader");
    assert_ne!(new_leader, leader);

    // The killed daemon comes back as a follower with the full state.
    c.start_daemon(leader).unwrap();
    c.wait_until("the old leader to catch up", CONVERGE, |c| {
        let nodes = c.node_ls(leader)?;
        let labelled = nodes
            .iter()
            .any(|n| n["hostname"] == target.as_str() && n["labels"]["zone"] == "east");
        Ok(labelled && c.info(leader)?["is_leader"] == false)
    })
    .unwrap();
    c.wait_until("all five nodes to agree again", CONVERGE, |c| {
        all_agree(c, 3, &all)
    })
    .unwrap();

    // Stop all five, start them again: same swarm, IDs, labels and tokens.
    let before = ids(&c, 0);
    let worker_token = c.token(0, "worker").unwrap();
    let manager_token = c.token(0, "manager").unwrap();
    for i in 0..5 {
        c.stop(i);
    }
    for i in 0..5 {
        c.start_daemon(i).unwrap();
    }
    c.wait_until(
        "all five nodes to agree after a full restart",
        CONVERGE,
        |c| all_agree(c, 3, &all),
    )
    .unwrap();
    assert_eq!(ids(&c, 3), before);
    assert_eq!(c.token(1, "worker").unwrap(), worker_token);
    assert_eq!(c.token(2, "manager").unwrap(), manager_token);
    let nodes = c.node_ls(4).unwrap();
    assert!(
        nodes
            .iter()
            .any(|n| n["hostname"] == target.as_str() && n["labels"]["zone"] == "east")
    );
}

#[test]
fn bad_joins_are_refused_and_leave_nothing_behind() {
    let c = Cluster::start(3).unwrap();
    c.init(0).unwrap();
    let good = c.token(0, "worker").unwrap();
    let (prefix, _secret) = good.rsplit_once('-').unwrap();
    let wrong_secret = format!("{prefix}-{}", "0".repeat(32));
    let (_, secret) = good.rsplit_once('-').unwrap();
    let other_cluster = format!("SHOAL-1-{}-{secret}", "ab".repeat(32));
    let manager = c.hosts[0].addr();
    let unreachable = format!("{}:2399", c.hosts[2].ip);

    let cases: [(&str, &str, &str); 4] = [
        (&wrong_secret, &manager, "invalid join token"),
        (&other_cluster, &manager, "does not match the join token"),
        ("SHOAL-1-nonsense", &manager, "malformed join token"),
        (&good, &unreachable, "timed out"),
    ];
    for (token, addr, message) in cases {
        let r = c.shoal(1, &["swarm", "join", "--token", token, addr]);
        assert!(!r.ok(), "join with {token} via {addr} must fail");
        assert!(
            r.stderr.contains(message),
            "expected `{message}` in: {}",
            r.stderr
        );
        let left: Vec<_> = std::fs::read_dir(&c.hosts[1].state_dir)
            .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "the joiner's state dir must stay empty, has {left:?}"
        );
        assert_eq!(c.node_ls(0).unwrap().len(), 1, "the swarm must not change");
        assert_eq!(c.info(1).unwrap()["swarm"], "inactive");
    }

    // Rotation: the old token stops working, the new one works.
    let rotated = c
        .shoal_ok(0, &["swarm", "join-token", "--rotate", "-q", "worker"])
        .unwrap()
        .stdout
        .trim()
        .to_owned();
    assert_ne!(rotated, good);
    let r = c.shoal(1, &["swarm", "join", "--token", &good, &manager]);
    assert!(r.stderr.contains("invalid join token"), "{}", r.stderr);
    c.join(1, &rotated, 0).unwrap();
    assert_eq!(c.node_ls(1).unwrap().len(), 2);
}

#[test]
fn losing_quorum_fails_writes_fast_and_keeps_reads() {
    let mut c = Cluster::start(3).unwrap();
    c.form(3).unwrap();
    c.wait_until("three managers", CONVERGE, |c| all_agree(c, 3, &[0, 1, 2]))
        .unwrap();
    c.kill(1);
    c.kill(2);
    // Let liveness notice, so the message counts what is reachable.
    c.wait_until("the others to be down", CONVERGE, |c| {
        Ok(count(&c.node_ls(0)?, "status", "down") == 2)
    })
    .unwrap();
    let started = Instant::now();
    let r = c.shoal(0, &["node", "update", "--label-add", "k=v", "node1"]);
    let took = started.elapsed();
    assert!(!r.ok());
    assert!(
        r.stderr.contains("no quorum: 1 of 3 managers reachable"),
        "{}",
        r.stderr
    );
    assert!(
        took < Duration::from_secs(8),
        "a write without quorum must fail promptly, took {took:?}"
    );

    // Reads still answer, from the local copy, and say so.
    let ls = c.shoal(0, &["node", "ls"]);
    assert!(ls.ok());
    assert!(ls.stdout.contains("node2"));
    assert!(ls.stderr.contains("may be stale"), "{}", ls.stderr);

    c.start_daemon(1).unwrap();
    c.wait_until("writes to work again", CONVERGE, |c| {
        Ok(
            c.shoal(0, &["node", "update", "--label-add", "k=v", "node1"])
                .ok(),
        )
    })
    .unwrap();
}

#[test]
fn force_new_cluster_keeps_the_state_of_a_lone_survivor() {
    let mut c = Cluster::start(4).unwrap();
    c.form(3).unwrap();
    c.wait_until("four nodes", CONVERGE, |c| all_agree(c, 3, &[0, 1, 2, 3]))
        .unwrap();
    // The survivor is a follower; the leader is one of the two lost managers,
    // so that both ways an old manager comes back are seen: a voter asking
    // for votes, and a leader of an old term (openraft restores a leader at
    // start) sending entries nobody takes.
    let leader = c.leader(0).unwrap().expect("a leader");
    let survivor = (0..3).find(|i| *i != leader).unwrap();
    let other = (0..3).find(|i| *i != leader && *i != survivor).unwrap();
    c.shoal_ok(
        survivor,
        &["node", "update", "--label-add", "rack=r1", "node4"],
    )
    .unwrap();
    // A commit needs a majority, not the survivor: wait until it holds the
    // change, or recovering from it alone would rightly not have it.
    c.wait_until("the survivor to hold the label", CONVERGE, |c| {
        Ok(c.node_ls(survivor)?
            .iter()
            .any(|n| n["labels"]["rack"] == "r1"))
    })
    .unwrap();
    c.kill(leader);
    c.kill(other);
    let r = c
        .shoal_ok(survivor, &["swarm", "init", "--force-new-cluster"])
        .unwrap();
    assert!(r.stdout.contains("only manager"), "{}", r.stdout);
    let name = c.hosts[survivor].name.clone();
    c.shoal_ok(
        survivor,
        &["node", "update", "--label-add", "after=recovery", &name],
    )
    .unwrap();
    let nodes = c.node_ls(survivor).unwrap();
    assert_eq!(nodes.len(), 4, "every node is kept");
    assert_eq!(count(&nodes, "role", "manager"), 1);
    assert!(nodes.iter().any(|n| n["labels"]["rack"] == "r1"));
    // The worker follows the new swarm.
    c.wait_until("the worker to see the new manager set", CONVERGE, |c| {
        let n = c.node_ls(3)?;
        Ok(n.iter().any(|n| n["labels"]["after"] == "recovery"))
    })
    .unwrap();
    // The old managers come back as workers of the new swarm and can be promoted.
    for i in [leader, other] {
        c.start_daemon(i).unwrap();
    }
    for i in [leader, other] {
        let what = format!("{} to follow the new swarm", c.hosts[i].name);
        let followed = c.wait_until(&what, CONVERGE, |c| {
            Ok(c.node_ls(i)?
                .iter()
                .any(|n| n["labels"]["after"] == "recovery"))
        });
        if let Err(e) = followed {
            panic!("{e}\nits log, last lines first:\n{}", c.log_tail(i, 40));
        }
    }
    let old_leader = c.hosts[leader].name.clone();
    c.shoal_ok(survivor, &["node", "promote", &old_leader])
        .unwrap();
    c.wait_until("two managers", CONVERGE, |c| {
        Ok(c.info(survivor)?["raft"]["voters"].as_array().map(Vec::len) == Some(2))
    })
    .unwrap();
}

/// A worker's Raft does not tick (it is not a member: the feed brings it
/// the store); promoted, it ticks, so promoted workers elect a leader when
/// the one that promoted them dies.
#[test]
fn workers_promoted_to_managers_elect_a_leader_when_it_dies() {
    let mut c = Cluster::start(3).unwrap();
    c.form(1).unwrap();
    c.wait_until("three nodes", CONVERGE, |c| all_agree(c, 1, &[0, 1, 2]))
        .unwrap();
    for name in ["node2", "node3"] {
        c.shoal_ok(0, &["node", "promote", name]).unwrap();
    }
    // Every voter has taken the change that made the third one: until a
    // node has it, it counts votes with the joint configuration, whose old
    // half (two voters) has no majority without the leader (two managers
    // survive the loss of neither, in Raft as in Swarm).
    c.wait_until("three voters on every manager", CONVERGE, |c| {
        for i in 0..3 {
            if c.info(i)?["raft"]["voters"].as_array().map(Vec::len) != Some(3) {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .unwrap();
    c.kill(0);
    let leader = c.wait_until_value(CONVERGE, || {
        c.leader(1)?
            .filter(|l| *l != 0)
            .ok_or_else(|| anyhow::anyhow!("no leader"))
    });
    let leader = leader.unwrap_or_else(|e| {
        let logs: Vec<String> = (1..3)
            .map(|i| {
                format!(
                    "{}, last lines first:\n{}",
                    c.hosts[i].name,
                    c.log_tail(i, 400)
                )
            })
            .collect();
        panic!("{e}\n{}", logs.join("\n\n"))
    });
    assert!([1, 2].contains(&leader));
    c.shoal_ok(
        1,
        &["node", "update", "--label-add", "after=failover", "node3"],
    )
    .unwrap();
}

#[test]
fn node_commands_refuse_bad_requests_and_change_nothing() {
    let mut c = Cluster::start(3).unwrap();
    c.form(1).unwrap();
    c.wait_until("three nodes", CONVERGE, |c| all_agree(c, 1, &[0, 1, 2]))
        .unwrap();
    let before = c.node_ls(0).unwrap();
    let refused: [(&[&str], &str); 6] = [
        (&["node", "inspect", "nosuchnode"], "no such node"),
        (&["node", "promote", "node1"], "already a manager"),
        (&["node", "demote", "node1"], "last manager"),
        (&["node", "rm", "node2"], "is ready"),
        (
            &["node", "update", "--label-rm", "nokey", "node2"],
            "has no label",
        ),
        (&["swarm", "init"], "already part of a swarm"),
    ];
    for (args, message) in refused {
        c.assert_refused(0, args, message);
    }
    let r = c.shoal(0, &["swarm", "leave"]);
    assert!(r.stderr.contains("last manager"), "{}", r.stderr);
    assert_eq!(
        serde_json::to_string(&c.node_ls(0).unwrap()).unwrap(),
        serde_json::to_string(&before).unwrap(),
        "refused commands change nothing"
    );

    // Promote and demote by ID prefix.
    let id = before.iter().find(|n| n["hostname"] == "node2").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    c.shoal_ok(0, &["node", "promote", &id[..8]]).unwrap();
    c.wait_until("two voters", CONVERGE, |c| {
        Ok(c.info(1)?["raft"]["voters"].as_array().map(Vec::len) == Some(2))
    })
    .unwrap();
    c.shoal_ok(0, &["node", "demote", "node2"]).unwrap();

    // A worker leaves: it is gone from every node's list and its state dir is emptied.
    c.shoal_ok(2, &["swarm", "leave"]).unwrap();
    c.wait_until("node3 to be gone", CONVERGE, |c| {
        Ok(c.node_ls(0)?.len() == 2)
    })
    .unwrap();
    assert_eq!(c.info(2).unwrap()["swarm"], "inactive");
    assert!(!c.hosts[2].state_dir.join("node.json").exists());
    // The same daemon joins again at once, on the same port.
    let token = c.token(0, "worker").unwrap();
    c.join(2, &token, 0).unwrap();
    c.wait_until("node3 back", CONVERGE, |c| Ok(c.node_ls(0)?.len() == 3))
        .unwrap();
    c.shoal_ok(2, &["swarm", "leave"]).unwrap();
    c.wait_until("node3 gone again", CONVERGE, |c| {
        Ok(c.node_ls(0)?.len() == 2)
    })
    .unwrap();

    // A stopped worker can be removed without --force once it is down.
    c.stop(1);
    c.wait_until("node2 to be down", CONVERGE, |c| {
        Ok(c.node_ls(0)?
            .iter()
            .any(|n| n["hostname"] == "node2" && n["status"] == "down"))
    })
    .unwrap();
    c.shoal_ok(0, &["node", "rm", "node2"]).unwrap();
    assert_eq!(c.node_ls(0).unwrap().len(), 1);
}

#[test]
fn a_corrupt_state_dir_is_refused_naming_the_file() {
    let mut c = Cluster::start(1).unwrap();
    c.init(0).unwrap();
    c.stop(0);
    let log_file = c.hosts[0].state_dir.join("raft").join("raft-log.redb");
    std::fs::write(&log_file, vec![0x5au8; 8192]).unwrap();
    let code = c
        .start_daemon_expecting_exit(0, Duration::from_secs(10))
        .unwrap();
    assert!(
        matches!(code, Some(c) if c != 0),
        "the daemon must refuse to start"
    );
    assert!(c.log(0).contains("raft-log.redb"), "{}", c.log(0));

    std::fs::write(c.hosts[0].state_dir.join("node.json"), b"{ not json").unwrap();
    let code = c
        .start_daemon_expecting_exit(0, Duration::from_secs(10))
        .unwrap();
    assert!(matches!(code, Some(c) if c != 0));
    assert!(c.log(0).contains("node.json"), "{}", c.log(0));
}

/// Issue 16's bad input: a worker killed and restarted every couple of
/// seconds. Writes keep committing promptly, the managers' tasks stay
/// where they are (a flap is shorter than the 5 s grace), and `node ls`
/// shows the worker going down, counting its downs, and ready once it
/// stops flapping.
#[test]
fn a_flapping_worker_slows_nothing_and_node_ls_shows_it() {
    let mut c = Cluster::start(4).unwrap();
    c.form_roles(&[true, true, true, false]).unwrap();
    let all = [0, 1, 2, 3];
    c.wait_until("four nodes", CONVERGE, |c| all_agree(c, 3, &all))
        .unwrap();
    c.shoal_ok(
        0,
        &[
            "service",
            "create",
            "--name",
            "steady",
            "--detach",
            "--replicas",
            "3",
            "--constraint",
            "node.role==manager",
            "--",
            "sleep",
            "600",
        ],
    )
    .unwrap();
    c.wait_until("the managers' tasks", CONVERGE, |c| {
        Ok(c.running_tasks(0, "steady")?.len() == 3)
    })
    .unwrap();
    let ids = |c: &Cluster| -> Vec<String> {
        let mut v: Vec<String> = c
            .running_tasks(0, "steady")
            .unwrap()
            .iter()
            .map(|t| t["id"].as_str().unwrap().to_owned())
            .collect();
        v.sort();
        v
    };
    let before = ids(&c);
    let mut slowest = Duration::ZERO;
    let mut seen_down = false;
    for round in 0..5 {
        c.kill(3);
        // Down long enough for SWIM to notice, shorter than the grace.
        let down_until = Instant::now() + Duration::from_millis(3_500);
        while Instant::now() < down_until {
            let nodes = c.node_ls(0).unwrap();
            seen_down |= nodes
                .iter()
                .any(|n| n["hostname"] == "node4" && n["status"] == "down");
            std::thread::sleep(Duration::from_millis(200));
        }
        c.start_daemon(3).unwrap();
        let started = Instant::now();
        c.shoal_ok(
            0,
            &[
                "node",
                "update",
                "--label-add",
                &format!("round={round}"),
                "node1",
            ],
        )
        .unwrap();
        slowest = slowest.max(started.elapsed());
        std::thread::sleep(Duration::from_millis(1_500));
    }
    assert!(seen_down, "node ls never showed the flapping worker down");
    assert!(
        slowest < Duration::from_secs(3),
        "a write took {slowest:?} while a worker flapped"
    );
    c.wait_until("the worker to be ready again", CONVERGE, |c| {
        all_agree(c, 3, &all)
    })
    .unwrap();
    assert_eq!(ids(&c), before, "the managers' tasks did not move");
    let node4 = c
        .node_ls(0)
        .unwrap()
        .into_iter()
        .find(|n| n["hostname"] == "node4")
        .unwrap();
    assert!(
        node4["downs"].as_u64().unwrap() >= 3,
        "downs counted: {node4}"
    );
    let table = c.shoal_ok(0, &["node", "ls"]).unwrap().stdout;
    assert!(table.contains("ready (down "), "{table}");
}

/// A former manager whose log holds a committed entry the recovered swarm's
/// does not (it and another manager committed it while the one that later
/// recovered the swarm alone was down) cannot follow that swarm without
/// losing the entry: it stops following, says so and what to do, and can
/// leave and join again.
#[test]
fn a_former_manager_whose_log_diverged_says_so_and_can_leave_and_rejoin() {
    let mut c = Cluster::start(3).unwrap();
    c.form(3).unwrap();
    c.wait_until("three nodes", CONVERGE, |c| all_agree(c, 3, &[0, 1, 2]))
        .unwrap();
    // Every manager applied the whole log, the last membership change
    // included: until then the joint configuration may still need the
    // survivor for a commit.
    c.wait_until("three voters, the log applied everywhere", CONVERGE, |c| {
        let infos = (0..3)
            .map(|i| c.info(i))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let last = infos[0]["raft"]["last_log_index"].clone();
        Ok(infos.iter().all(|i| {
            i["raft"]["voters"].as_array().map(Vec::len) == Some(3)
                && i["raft"]["last_applied"] == last
                && i["raft"]["last_log_index"] == last
        }))
    })
    .unwrap();
    let leader = c.leader(0).unwrap().expect("a leader");
    let survivor = (0..3).find(|i| *i != leader).unwrap();
    let other = (0..3).find(|i| *i != leader && *i != survivor).unwrap();
    c.kill(survivor);
    // Committed by the two others: the survivor never receives it.
    let lost = c.hosts[leader].name.clone();
    // (A loaded machine may not confirm it in time: it is applied on the
    // leader, so committed, once the leader lists it.)
    c.wait_until("the label to be committed", CONVERGE, |c| {
        c.shoal(
            leader,
            &["node", "update", "--label-add", "lost=yes", &lost],
        );
        Ok(c.node_ls(leader)?
            .iter()
            .any(|n| n["labels"]["lost"] == "yes"))
    })
    .unwrap();
    c.kill(leader);
    c.kill(other);
    c.start_daemon(survivor).unwrap();
    c.shoal_ok(survivor, &["swarm", "init", "--force-new-cluster"])
        .unwrap();
    let nodes = c.node_ls(survivor).unwrap();
    assert!(nodes.iter().all(|n| n["labels"]["lost"].is_null()));
    c.start_daemon(leader).unwrap();
    let said = c.wait_until("the old leader to say its log diverged", CONVERGE, |c| {
        let info = c.info(leader)?;
        Ok(info["swarm"] == "error")
    });
    if let Err(e) = said {
        panic!(
            "{e}\nits log, last lines first:\n{}",
            c.log_tail(leader, 40)
        );
    }
    let info = c.info(leader).unwrap();
    let why = info["error"].as_str().unwrap();
    assert!(why.contains("shoal swarm leave --force"), "{why}");
    // Everything else says so too, and nothing is changed.
    let r = c.shoal(leader, &["node", "ls"]);
    assert!(!r.ok());
    assert!(r.stderr.contains("Raft core stopped"), "{}", r.stderr);
    // What the message says to do works.
    c.shoal_ok(leader, &["swarm", "leave", "--force"]).unwrap();
    c.shoal_ok(survivor, &["node", "rm", "--force", &lost])
        .unwrap();
    let token = c.token(survivor, "worker").unwrap();
    c.join(leader, &token, survivor).unwrap();
    c.wait_until("the old leader to follow the new swarm", CONVERGE, |c| {
        Ok(c.node_ls(leader)?.len() == 3)
    })
    .unwrap();
}
