//! Gossip between real daemons over QUIC (issue 3's acceptance).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::Value;
use shoal_integration::Cluster;

const CONVERGE: Duration = Duration::from_secs(20);

fn dump(c: &Cluster, i: usize) -> anyhow::Result<Value> {
    c.shoal_ok(i, &["debug", "gossip", "--format", "json"])?
        .json()
}

/// Visible `vteps` keys of `net1` on host `i`.
fn visible(c: &Cluster, i: usize) -> anyhow::Result<Vec<String>> {
    let d = dump(c, i)?;
    let entries = d["networks"]["net1"]["vteps"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut keys: Vec<String> = entries
        .iter()
        .filter(|e| e["visible"] == true)
        .map(|e| e["key"].as_str().unwrap_or_default().to_owned())
        .collect();
    keys.sort();
    Ok(keys)
}

fn member_state(c: &Cluster, i: usize, node_id: &str) -> anyhow::Result<String> {
    let d = dump(c, i)?;
    Ok(d["members"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["node_id"] == node_id)
        .and_then(|m| m["state"].as_str())
        .unwrap_or("unknown")
        .to_owned())
}

/// Each host `i` writes its own VTEP entry (key: its node ID `ids[i]`) in `net1`.
fn put_own_vteps(c: &Cluster, ids: &[String]) {
    for (i, id) in ids.iter().enumerate() {
        let value = format!(r#"{{"vtep":{{"node":"{id}","addr":"{}"}}}}"#, c.hosts[i].ip);
        c.wait_until("the put to be accepted", CONVERGE, |c| {
            Ok(
                c.shoal(i, &["debug", "gossip-put", "net1", "vteps", id, &value])
                    .ok(),
            )
        })
        .unwrap();
    }
}

#[test]
fn entries_spread_to_every_member_and_leave_with_a_dead_owner() {
    let mut c = Cluster::start(5).unwrap();
    c.form(3).unwrap();
    let ids: Vec<String> = (0..5)
        .map(|i| c.info(i).unwrap()["node_id"].as_str().unwrap().to_owned())
        .collect();
    c.wait_until("gossip to see all five alive", CONVERGE, |c| {
        for i in 0..5 {
            let nodes = c.node_ls(i)?;
            if nodes.iter().any(|n| n["gossip"] != "alive") {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .unwrap();
    for i in 0..5 {
        c.shoal_ok(i, &["debug", "gossip-join", "net1"]).unwrap();
    }
    put_own_vteps(&c, &ids);
    let mut all = ids.clone();
    all.sort();
    c.wait_until("every node to hold every entry", CONVERGE, |c| {
        for i in 0..5 {
            if visible(c, i)? != all {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .unwrap();

    // A delete reaches everyone.
    c.shoal_ok(4, &["debug", "gossip-delete", "net1", "vteps", &ids[4]])
        .unwrap();
    // kill -9: the dead node's entries leave every other node's tables.
    c.kill(3);
    let expected: Vec<String> = {
        let mut v = vec![ids[0].clone(), ids[1].clone(), ids[2].clone()];
        v.sort();
        v
    };
    c.wait_until(
        "the dead node's entries to vanish everywhere",
        CONVERGE,
        |c| {
            for i in [0, 1, 2, 4] {
                if visible(c, i)? != expected || member_state(c, i, &ids[3])? != "dead" {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .unwrap();

    // It restarts as a new generation and publishes afresh.
    c.start_daemon(3).unwrap();
    c.shoal_ok(3, &["debug", "gossip-join", "net1"]).unwrap();
    c.wait_until("the restarted node to be alive again", CONVERGE, |c| {
        Ok(member_state(c, 0, &ids[3])? == "alive")
    })
    .unwrap();
    let value = format!(
        r#"{{"vtep":{{"node":"{}","addr":"{}"}}}}"#,
        ids[3], c.hosts[3].ip
    );
    c.shoal_ok(
        3,
        &["debug", "gossip-put", "net1", "vteps", &ids[3], &value],
    )
    .unwrap();
    let mut back = expected.clone();
    back.push(ids[3].clone());
    back.sort();
    c.wait_until("its fresh entry everywhere", CONVERGE, |c| {
        for i in 0..4 {
            if visible(c, i)? != back {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .unwrap();
}

#[test]
fn bad_gossip_requests_get_clear_errors() {
    let c = Cluster::start(1).unwrap();
    c.init(0).unwrap();
    let r = c.shoal(
        0,
        &[
            "debug",
            "gossip-put",
            "nope",
            "vteps",
            "k",
            r#"{"vtep":{"node":"0000000000000001","addr":"10.0.0.1"}}"#,
        ],
    );
    assert!(
        r.stderr.contains("not attached to network `nope`"),
        "{}",
        r.stderr
    );
    c.shoal_ok(0, &["debug", "gossip-join", "n"]).unwrap();
    let r = c.shoal(
        0,
        &[
            "debug",
            "gossip-put",
            "n",
            "networks",
            "k",
            r#"{"networks":[]}"#,
        ],
    );
    assert!(r.stderr.contains("invalid table"), "{}", r.stderr);
    let r = c.shoal(0, &["debug", "gossip-put", "n", "vteps", "k", "{not json"]);
    assert!(r.stderr.contains("invalid value"), "{}", r.stderr);
}

#[test]
fn a_forged_entry_for_another_nodes_endpoint_is_ignored_by_every_node() {
    use shoal_gossip::core::entry_key;
    use shoal_gossip::message::{Message, TableMessage};
    use shoal_gossip::table::Entry;
    use shoal_integration::attack::Attacker;
    use shoal_mesh::NodeId;
    use shoal_mesh::observed::{TableValue, VtepRecord};

    let c = Cluster::start(3).unwrap();
    c.form(1).unwrap();
    let ids: Vec<String> = (0..3)
        .map(|i| c.info(i).unwrap()["node_id"].as_str().unwrap().to_owned())
        .collect();
    for i in 0..3 {
        c.shoal_ok(i, &["debug", "gossip-join", "net1"]).unwrap();
    }
    put_own_vteps(&c, &ids);
    let mut all = ids.clone();
    all.sort();
    c.wait_until("every node to hold every entry", CONVERGE, |c| {
        Ok((0..3).all(|i| visible(c, i).is_ok_and(|v| v == all)))
    })
    .unwrap();

    // node3, a member of net1, writes node2's entries: deletes its VTEP and
    // adds one in its name, a minute ahead, with node2's real certificate
    // attached but no signature of node2's.
    let victim: NodeId = ids[1].parse().unwrap();
    let ahead = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 60_000)
        << 16;
    let forged = |key: &str, value: Option<TableValue>| {
        (
            entry_key("net1", "vteps", key).into(),
            Entry {
                owner: victim,
                version: ahead,
                value,
                sig: vec![0x30; 70],
            }
            .into(),
        )
    };
    let evil = TableValue::Vtep(VtepRecord {
        node: victim,
        addr: "10.9.9.9".parse().unwrap(),
    });
    let msg = Message::Table {
        sender: None,
        body: TableMessage::Entries {
            network: "net1".into(),
            entries: vec![forged(&ids[1], None), forged("evil", Some(evil))],
        },
        certs: vec![(
            victim,
            std::fs::read(c.hosts[1].state_dir.join("node.der"))
                .unwrap()
                .into(),
        )],
    };
    let bytes = shoal_mesh::codec::encode(&msg).unwrap();
    let attacker = Attacker::with_identity_of(&c.hosts[2].state_dir).unwrap();
    for i in 0..2 {
        attacker
            .gossip(c.hosts[i].addr().parse().unwrap(), &bytes)
            .unwrap();
    }
    c.holds_for(
        "every node to keep node2's entry",
        Duration::from_secs(4),
        |c| Ok((0..3).all(|i| visible(c, i).is_ok_and(|v| v == all))),
    )
    .unwrap();
    for i in 0..2 {
        let rejected = &dump(&c, i).unwrap()["rejected"];
        assert!(
            rejected["bad_signature"].as_u64().is_some_and(|n| n >= 2),
            "node{}: {rejected}",
            i + 1
        );
    }
}
