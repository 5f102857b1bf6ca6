//! Data-plane benchmarks:
//!
//! - programming one service's VIP with 10, 100, 1k and 10k backends through
//!   the Linux backend (whole table, then one backend change), as root in a
//!   fresh network namespace;
//! - first-packet latency (TCP connect through the VIP DNAT) with 100 and
//!   10k services in the verdict map, beside a naive linear rule chain;
//! - the embedded DNS server: queries per second and latency from one
//!   client socket (no root needed).
//!
//! `cargo bench -p shoal-netdriver --bench dataplane [-- lb|latency|dns]`

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_netdriver::linux::{Linux, create_netns, delete_netns};
use shoal_netdriver::model::{Ns, Op};
use shoal_netdriver::{Backend, dns};

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
}

fn backend(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + i + 1)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Removes the namespace on drop.
struct BenchNs(String);

impl Drop for BenchNs {
    fn drop(&mut self) {
        let _ = delete_netns(&self.0);
    }
}

async fn lb() {
    let ns = BenchNs(format!("shoal-bench{}-lb", std::process::id()));
    create_netns(&ns.0).expect("namespace");
    let mut b = Linux::new(None);
    let vip = Ipv4Addr::new(10, 63, 0, 1);
    println!(
        "| backends | whole table | one backend out or in (median of 10) | one backend replaced (median of 10) |"
    );
    println!("| --- | --- | --- | --- |");
    for n in [10u32, 100, 1_000, 10_000] {
        let all: Vec<Ipv4Addr> = (0..n).map(backend).collect();
        let full = Op::SetLb {
            ns: Ns::named(ns.0.clone()),
            lb: BTreeMap::from([(vip, all.iter().copied().collect())]),
            changed: BTreeSet::from([vip]),
            fresh: true,
        };
        let t = Instant::now();
        b.apply(&full).await.expect("program");
        let whole = t.elapsed();
        // One backend out, then back in, 10 times: the median change.
        let out_in = (0..10).map(|k| {
            let skip = usize::from(k % 2 == 0);
            all[skip..].iter().copied().collect()
        });
        let change = median_change(&mut b, &ns.0, vip, out_in).await;
        // One backend replaced by another (the count stays: map slots only).
        let replaced = (0..10u32).map(|k| {
            let mut set: BTreeSet<Ipv4Addr> = all[1..].iter().copied().collect();
            set.insert(backend(1_000_000 + k));
            set
        });
        let swap = median_change(&mut b, &ns.0, vip, replaced).await;
        let seen = b.observe("shoal-bench").await.expect("observe");
        let got = seen.namespaces[&Ns::named(ns.0.clone())].lb[&vip].len();
        assert_eq!(got as u32, n, "the kernel holds what was asked");
        println!(
            "| {n} | {:.1} ms | {:.2} ms | {:.2} ms |",
            ms(whole),
            ms(change),
            ms(swap)
        );
    }
}

/// The median time of applying each of `sets` in turn as VIP `vip`'s
/// backends in namespace `ns`.
async fn median_change(
    b: &mut Linux,
    ns: &str,
    vip: Ipv4Addr,
    sets: impl Iterator<Item = BTreeSet<Ipv4Addr>>,
) -> Duration {
    let mut times = Vec::new();
    for set in sets {
        let one = Op::SetLb {
            ns: Ns::named(ns),
            lb: BTreeMap::from([(vip, set)]),
            changed: BTreeSet::from([vip]),
            fresh: false,
        };
        let t = Instant::now();
        b.apply(&one).await.expect("change");
        times.push(t.elapsed());
    }
    times.sort();
    times[times.len() / 2]
}

/// Runs `nft -f -` in namespace `ns`.
fn nft(ns: &str, script: &str) {
    use std::io::Write;
    let mut c = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .args(["nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("nft");
    c.stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("write");
    assert!(c.wait().expect("nft").success(), "nft failed");
}

/// Median TCP connect time to `target` from inside namespace `ns`.
fn connect_latency(ns: &str, target: SocketAddr, listener_port: u16) -> Duration {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let f = std::fs::File::open(path).expect("ns");
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        // Up, and a route for the VIPs (in a sandbox they are on-link).
        for args in [
            &["link", "set", "lo", "up"][..],
            &["route", "add", "10.62.0.0/16", "dev", "lo"][..],
        ] {
            let _ = std::process::Command::new("ip").args(args).status();
        }
        let listener = std::net::TcpListener::bind(("127.0.0.1", listener_port)).expect("bind");
        let accept = std::thread::spawn(move || {
            for s in listener.incoming().take(500) {
                drop(s);
            }
        });
        let mut times = Vec::new();
        let mut lost = 0;
        for _ in 0..500 {
            let t = Instant::now();
            match std::net::TcpStream::connect_timeout(&target, Duration::from_millis(300)) {
                Ok(s) => {
                    times.push(t.elapsed());
                    drop(s);
                }
                Err(_) => lost += 1,
            }
        }
        drop(accept);
        assert!(times.len() > 400, "{lost} of 500 connections failed");
        times.sort();
        times[times.len() / 2]
    })
    .join()
    .expect("thread")
}

async fn latency() {
    println!("| services | verdict map (Shoal) | linear chain |");
    println!("| --- | --- | --- |");
    for n in [100u32, 10_000] {
        let mut results = Vec::new();
        for linear in [false, true] {
            let ns = BenchNs(format!(
                "shoal-bench{}-lat{}{}",
                std::process::id(),
                n,
                u8::from(linear)
            ));
            create_netns(&ns.0).expect("namespace");
            let vip = |i: u32| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 62, 0, 0)) + i + 1);
            let mut s = String::from("add table ip bench\n");
            s.push_str("add chain ip bench out { type nat hook output priority -100; }\n");
            if linear {
                for i in 0..n {
                    s.push_str(&format!(
                        "add rule ip bench out ip daddr {} dnat to 127.0.0.1\n",
                        vip(i)
                    ));
                }
            } else {
                s.push_str("add map ip bench vips { type ipv4_addr : verdict; }\n");
                s.push_str("add rule ip bench out ip daddr vmap @vips\n");
                s.push_str("add chain ip bench svc\nadd rule ip bench svc dnat to 127.0.0.1\n");
                let elems: Vec<String> = (0..n).map(|i| format!("{} : goto svc", vip(i))).collect();
                for chunk in elems.chunks(1_000) {
                    s.push_str(&format!(
                        "add element ip bench vips {{ {} }}\n",
                        chunk.join(", ")
                    ));
                }
            }
            nft(&ns.0, &s);
            // The last service: the worst case for the linear chain.
            let target = SocketAddr::from((vip(n - 1), 9000));
            results.push(connect_latency(&ns.0, target, 9000));
        }
        println!(
            "| {n} | {:.1} µs | {:.1} µs |",
            results[0].as_secs_f64() * 1e6,
            results[1].as_secs_f64() * 1e6
        );
    }
}

async fn dns_bench() {
    let records: dns::Records = (0..1_000)
        .map(|i| (format!("svc{i}"), vec![backend(i)]))
        .collect();
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = sock.local_addr().expect("addr");
    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(records));
    tokio::spawn(dns::serve_udp(sock, rx, dns::Relay::Refuse));
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    client.connect(addr).await.expect("connect");
    let query = |i: u16| {
        use hickory_proto::op::{Message, MessageType, OpCode, Query};
        use hickory_proto::rr::{Name, RecordType};
        let mut m = Message::new(i, MessageType::Query, OpCode::Query);
        let name = Name::from_ascii(format!("svc{}", i % 1000)).expect("name");
        m.add_query(Query::query(name, RecordType::A));
        m.to_vec().expect("encode")
    };
    let mut buf = vec![0u8; 1500];
    let mut times = Vec::new();
    let started = Instant::now();
    for i in 0..20_000u16 {
        let q = query(i);
        let t = Instant::now();
        client.send(&q).await.expect("send");
        client.recv(&mut buf).await.expect("recv");
        times.push(t.elapsed());
    }
    let secs = started.elapsed().as_secs_f64();
    times.sort();
    println!(
        "embedded DNS, one client, 1000 names: {:.0} queries/s, p50 {:.0} µs, p99 {:.0} µs",
        times.len() as f64 / secs,
        times[times.len() / 2].as_secs_f64() * 1e6,
        times[times.len() * 99 / 100].as_secs_f64() * 1e6
    );
}

#[tokio::main]
async fn main() {
    let only: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let want = |s: &str| only.as_deref().is_none_or(|o| o == s);
    if want("dns") {
        dns_bench().await;
    }
    if !is_root() {
        println!("skipped lb and latency: they need root (network namespaces, nftables)");
        return;
    }
    if want("lb") {
        lb().await;
    }
    if want("latency") {
        latency().await;
    }
}
