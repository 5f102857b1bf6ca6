//! The embedded DNS server every task sandbox sees at 127.0.0.11 (UDP and
//! TCP, port 53). Its sockets are opened inside the sandbox's network
//! namespace and served by the daemon, each with the records of that task
//! (the planner's `SandboxPlan::dns`): service names, `tasks.NAME`, aliases
//! and task names of the networks the task is on. Other names are relayed
//! to the host's resolvers, unless the task has no way out (every network
//! it is on is `--internal`): then they are refused. Answers carry a short
//! TTL, so that clients follow the cluster within seconds.
//!
//! Hostile input: a query that does not parse gets FORMERR (or is dropped
//! if it has no header), one larger than [`MAX_QUERY`] is dropped, UDP
//! answers over 512 bytes are truncated with TC set. A relayed query goes
//! out under a random ID on a socket connected to the upstream, and only a
//! response with that ID is taken. Relays in flight ([`MAX_RELAYS`]) and
//! TCP connections ([`MAX_TCP`]) are bounded in the whole daemon, and a
//! TCP connection that is idle or slow is closed.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, SemaphorePermit, watch};

/// Name → addresses.
pub type Records = BTreeMap<String, Vec<Ipv4Addr>>;

/// The embedded resolver's address in every sandbox.
pub const ADDRESS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);
/// TTL of our answers, in seconds.
pub const TTL: u32 = 5;
/// Largest query accepted (UDP or TCP).
pub const MAX_QUERY: usize = 4096;
/// Largest UDP answer without truncation.
const UDP_LIMIT: usize = 512;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// What to do with a query.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Not ours: relay to an upstream resolver.
    Forward,
    /// Say nothing (not even a header to answer to).
    Drop,
}

fn encode(m: &Message) -> Outcome {
    match m.to_vec() {
        Ok(b) => Outcome::Reply(b),
        Err(_) => Outcome::Drop,
    }
}

/// An error answer to the query whose header starts `query`, if it has one.
pub fn error_reply(query: &[u8], code: ResponseCode) -> Outcome {
    if query.len() < 12 {
        return Outcome::Drop;
    }
    let id = u16::from_be_bytes([query[0], query[1]]);
    encode(&Message::error_msg(id, OpCode::Query, code))
}

/// Answers `query` from `records`.
pub fn answer(query: &[u8], records: &Records) -> Outcome {
    if query.len() > MAX_QUERY {
        return Outcome::Drop;
    }
    let Ok(req) = Message::from_vec(query) else {
        return error_reply(query, ResponseCode::FormErr);
    };
    if req.metadata.message_type != MessageType::Query {
        return Outcome::Drop;
    }
    if req.metadata.op_code != OpCode::Query {
        return encode(&Message::error_msg(
            req.metadata.id,
            req.metadata.op_code,
            ResponseCode::NotImp,
        ));
    }
    let [q] = req.queries.as_slice() else {
        return encode(&Message::error_msg(
            req.metadata.id,
            OpCode::Query,
            ResponseCode::FormErr,
        ));
    };
    let name = q.name().to_lowercase().to_ascii();
    let key = name.trim_end_matches('.');
    let Some(ips) = records.get(key) else {
        return Outcome::Forward;
    };
    let mut resp = Message::response(req.metadata.id, OpCode::Query);
    resp.metadata.authoritative = true;
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.add_query(q.clone());
    if matches!(q.query_type(), RecordType::A | RecordType::ANY) {
        for ip in ips {
            resp.add_answer(Record::from_rdata(q.name().clone(), TTL, RData::A(A(*ip))));
        }
    }
    encode(&resp)
}

/// Cuts a UDP answer to what fits in 512 bytes, setting TC.
fn fit_udp(reply: Vec<u8>) -> Vec<u8> {
    if reply.len() <= UDP_LIMIT {
        return reply;
    }
    let Ok(mut m) = Message::from_vec(&reply) else {
        return reply;
    };
    m.metadata.truncation = true;
    while let Ok(b) = m.to_vec() {
        if b.len() <= UDP_LIMIT || m.answers.is_empty() {
            return b;
        }
        m.answers.pop();
    }
    reply
}

/// The resolvers named in `resolv.conf` text, 127.0.0.11 left out.
pub fn upstreams(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<std::net::IpAddr>().ok())
        .filter(|ip| *ip != std::net::IpAddr::V4(ADDRESS))
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// Where names that are not the swarm's go.
#[derive(Clone, Debug)]
pub enum Relay {
    /// To these resolvers (the host's).
    To(Arc<Vec<SocketAddr>>),
    /// Nowhere: the sandbox has no way out (every network it is on is
    /// `--internal`), so other names are refused.
    Refuse,
}

/// Relays in flight in the whole daemon, each with a socket of its own;
/// past it, a query to relay is answered SERVFAIL at once.
pub const MAX_RELAYS: usize = 256;
static RELAYS: Semaphore = Semaphore::const_new(MAX_RELAYS);
/// TCP connections served at once in the whole daemon; past it, new ones
/// are closed at once.
pub const MAX_TCP: usize = 128;
static TCP_CONNS: Semaphore = Semaphore::const_new(MAX_TCP);
/// How long a TCP connection may sit between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// How long reading one query's bytes, or writing an answer, may take.
const TCP_IO: Duration = Duration::from_secs(2);

/// What to do with one query, decided without waiting.
enum Step {
    Reply(Vec<u8>),
    Relay(SemaphorePermit<'static>, Arc<Vec<SocketAddr>>),
    Drop,
}

fn step(query: &[u8], records: &Records, relay: &Relay) -> Step {
    match answer(query, records) {
        Outcome::Reply(b) => Step::Reply(b),
        Outcome::Drop => Step::Drop,
        Outcome::Forward => {
            let code = match relay {
                Relay::Refuse => ResponseCode::Refused,
                Relay::To(ups) => match RELAYS.try_acquire() {
                    Ok(permit) => return Step::Relay(permit, ups.clone()),
                    Err(_) => ResponseCode::ServFail,
                },
            };
            match error_reply(query, code) {
                Outcome::Reply(b) => Step::Reply(b),
                _ => Step::Drop,
            }
        }
    }
}

/// Relays `query` to the first upstream that answers, under an ID of our
/// own: only a response with that ID, from the upstream's address (the
/// socket is connected to it), is taken; it goes back under the client's ID.
async fn forward(query: &[u8], upstreams: &[SocketAddr]) -> Outcome {
    if query.len() < 12 {
        return Outcome::Drop;
    }
    let ours: u16 = rand::random();
    let mut relayed = query.to_vec();
    relayed[..2].copy_from_slice(&ours.to_be_bytes());
    for up in upstreams {
        let bind: SocketAddr = if up.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let Ok(sock) = tokio::net::UdpSocket::bind(bind).await else {
            continue;
        };
        if sock.connect(up).await.is_err() || sock.send(&relayed).await.is_err() {
            continue;
        }
        let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
        let mut buf = vec![0u8; 65_535];
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            if is_answer_to(&buf[..n], ours) {
                buf.truncate(n);
                buf[..2].copy_from_slice(&query[..2]);
                return Outcome::Reply(buf);
            }
            tracing::debug!(upstream = %up, "ignored a DNS reply that does not answer our query");
        }
    }
    error_reply(query, ResponseCode::ServFail)
}

/// Whether `reply` is a response (QR set) with ID `id`.
fn is_answer_to(reply: &[u8], id: u16) -> bool {
    reply.len() >= 12 && u16::from_be_bytes([reply[0], reply[1]]) == id && reply[2] & 0x80 != 0
}

/// Serves DNS over UDP on `sock` until the task is aborted. Swarm names are
/// answered in the loop; only relays run on their own, at most
/// [`MAX_RELAYS`] in the daemon.
pub async fn serve_udp(
    sock: tokio::net::UdpSocket,
    records: watch::Receiver<Arc<Records>>,
    relay: Relay,
) {
    let sock = Arc::new(sock);
    let mut buf = vec![0u8; MAX_QUERY + 1];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        let query = &buf[..n];
        let next = step(query, &records.borrow(), &relay);
        match next {
            Step::Reply(b) => {
                let _ = sock.send_to(&fit_udp(b), from).await;
            }
            Step::Relay(permit, ups) => {
                let (sock, query) = (sock.clone(), query.to_vec());
                tokio::spawn(async move {
                    if let Outcome::Reply(b) = forward(&query, &ups).await {
                        let _ = sock.send_to(&fit_udp(b), from).await;
                    }
                    drop(permit);
                });
            }
            Step::Drop => {}
        }
    }
}

/// Serves DNS over TCP on `listener` until the task is aborted: at most
/// [`MAX_TCP`] connections in the daemon, each closed when idle for
/// [`TCP_IDLE`] or slow to send a query or take an answer.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    records: watch::Receiver<Arc<Records>>,
    relay: Relay,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let Ok(permit) = TCP_CONNS.try_acquire() else {
            continue; // dropped: closed at once
        };
        let (records, relay) = (records.clone(), relay.clone());
        tokio::spawn(async move {
            serve_tcp_connection(stream, records, relay).await;
            drop(permit);
        });
    }
}

async fn serve_tcp_connection(
    mut stream: tokio::net::TcpStream,
    records: watch::Receiver<Arc<Records>>,
    relay: Relay,
) {
    use tokio::time::timeout;
    loop {
        let mut len = [0u8; 2];
        if !matches!(
            timeout(TCP_IDLE, stream.read_exact(&mut len)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let len = usize::from(u16::from_be_bytes(len));
        if len > MAX_QUERY {
            return;
        }
        let mut query = vec![0u8; len];
        if !matches!(
            timeout(TCP_IO, stream.read_exact(&mut query)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let next = step(&query, &records.borrow(), &relay);
        let reply = match next {
            Step::Reply(b) => b,
            Step::Relay(_permit, ups) => match forward(&query, &ups).await {
                Outcome::Reply(b) => b,
                _ => return,
            },
            Step::Drop => return,
        };
        let Ok(n) = u16::try_from(reply.len()) else {
            return;
        };
        let write = async {
            stream.write_all(&n.to_be_bytes()).await?;
            stream.write_all(&reply).await
        };
        if !matches!(timeout(TCP_IO, write).await, Ok(Ok(()))) {
            return;
        }
    }
}

/// Opens UDP and TCP sockets on 127.0.0.11:53 inside the network namespace
/// at `netns` (a `/run/netns` path), for the daemon to serve.
pub fn bind_in(
    netns: &std::path::Path,
) -> std::io::Result<(std::net::UdpSocket, std::net::TcpListener)> {
    let io = |e: std::io::Error| crate::DpError::Io {
        what: "embedded DNS".into(),
        source: e,
    };
    crate::linux::in_netns(Some(netns.to_owned()), move || {
        let addr = SocketAddr::from((ADDRESS, 53));
        let udp = std::net::UdpSocket::bind(addr).map_err(io)?;
        let tcp = std::net::TcpListener::bind(addr).map_err(io)?;
        udp.set_nonblocking(true).map_err(io)?;
        tcp.set_nonblocking(true).map_err(io)?;
        Ok((udp, tcp))
    })
    .map_err(|e| std::io::Error::other(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::new(7, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    fn records() -> Records {
        BTreeMap::from([
            ("web".to_owned(), vec![Ipv4Addr::new(10, 0, 0, 2)]),
            (
                "tasks.web".to_owned(),
                (3..=5).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect(),
            ),
        ])
    }

    fn reply(o: Outcome) -> Message {
        match o {
            Outcome::Reply(b) => Message::from_vec(&b).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn known_names_are_answered_case_insensitively() {
        let m = reply(answer(&query("WEB.", RecordType::A), &records()));
        assert_eq!(m.metadata.id, 7);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(m.answers.len(), 1);
        assert_eq!(m.answers[0].ttl, TTL);
        let m = reply(answer(&query("tasks.web", RecordType::A), &records()));
        assert_eq!(m.answers.len(), 3);
        // No IPv6: an empty answer, not an error.
        let m = reply(answer(&query("web", RecordType::AAAA), &records()));
        assert!(m.answers.is_empty());
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    }

    #[test]
    fn other_names_are_forwarded_and_garbage_is_refused() {
        assert_eq!(
            answer(&query("example.org", RecordType::A), &records()),
            Outcome::Forward
        );
        // A header and garbage: FORMERR with the same ID.
        let mut bad = query("web", RecordType::A);
        bad.truncate(15);
        let m = reply(answer(&bad, &records()));
        assert_eq!(
            (m.metadata.id, m.metadata.response_code),
            (7, ResponseCode::FormErr)
        );
        assert_eq!(answer(&[1, 2, 3], &records()), Outcome::Drop);
        assert_eq!(answer(&vec![0u8; MAX_QUERY + 1], &records()), Outcome::Drop);
    }

    #[test]
    fn hostile_bytes_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let good = query("tasks.web", RecordType::A);
        for round in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut b = good.clone();
            let flips = (seed % 6) as usize + 1;
            for k in 0..flips {
                let at = ((seed >> (k * 8)) as usize) % b.len();
                b[at] ^= (seed >> (k * 5)) as u8;
            }
            if round % 3 == 0 {
                b.truncate((seed % b.len() as u64) as usize);
            }
            let _ = answer(&b, &records());
        }
    }

    #[test]
    fn big_udp_answers_are_truncated() {
        let many: Records = BTreeMap::from([(
            "tasks.big".to_owned(),
            (0..200u8).map(|i| Ipv4Addr::new(10, 1, 0, i)).collect(),
        )]);
        let Outcome::Reply(full) = answer(&query("tasks.big", RecordType::A), &many) else {
            panic!()
        };
        assert!(full.len() > 512);
        let cut = fit_udp(full);
        assert!(cut.len() <= 512);
        assert!(Message::from_vec(&cut).unwrap().metadata.truncation);
    }

    #[tokio::test]
    async fn the_server_answers_over_udp_and_tcp() {
        let (_tx, rx) = watch::channel(Arc::new(records()));
        let none = Relay::To(Arc::new(Vec::new()));
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let udp_addr = udp.local_addr().unwrap();
        tokio::spawn(serve_udp(udp, rx.clone(), none.clone()));
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp_addr = tcp.local_addr().unwrap();
        tokio::spawn(serve_tcp(tcp, rx, none));
        let q = query("tasks.web", RecordType::A);
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(&q, udp_addr).await.unwrap();
        let mut buf = vec![0u8; 1500];
        let (n, _) = client.recv_from(&mut buf).await.unwrap();
        assert_eq!(Message::from_vec(&buf[..n]).unwrap().answers.len(), 3);
        // TCP: two queries on one connection, length-prefixed.
        let mut s = tokio::net::TcpStream::connect(tcp_addr).await.unwrap();
        for _ in 0..2 {
            let len = u16::try_from(q.len()).unwrap().to_be_bytes();
            s.write_all(&len).await.unwrap();
            s.write_all(&q).await.unwrap();
            let mut len = [0u8; 2];
            s.read_exact(&mut len).await.unwrap();
            let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
            s.read_exact(&mut reply).await.unwrap();
            assert_eq!(Message::from_vec(&reply).unwrap().answers.len(), 3);
        }
        // A name nobody knows, with no upstream: SERVFAIL.
        let q = query("example.org", RecordType::A);
        client.send_to(&q, udp_addr).await.unwrap();
        let (n, _) = client.recv_from(&mut buf).await.unwrap();
        let m = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    }

    #[tokio::test]
    async fn a_sandbox_without_a_way_out_resolves_swarm_names_only() {
        let (_tx, rx) = watch::channel(Arc::new(records()));
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        tokio::spawn(serve_udp(udp, rx, Relay::Refuse));
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = vec![0u8; 1500];
        for (name, code, answers) in [
            ("web", ResponseCode::NoError, 1),
            ("example.org", ResponseCode::Refused, 0),
        ] {
            client
                .send_to(&query(name, RecordType::A), addr)
                .await
                .unwrap();
            let (n, _) = client.recv_from(&mut buf).await.unwrap();
            let m = Message::from_vec(&buf[..n]).unwrap();
            assert_eq!(
                (m.metadata.response_code, m.answers.len()),
                (code, answers),
                "{name}"
            );
        }
    }

    #[tokio::test]
    async fn a_relayed_answer_must_carry_our_id() {
        // A fake upstream that first sends a forged reply (another ID),
        // then the real one.
        let up = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let up_addr = up.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 1500];
            let (n, from) = up.recv_from(&mut buf).await.unwrap();
            let q = Message::from_vec(&buf[..n]).unwrap();
            assert_ne!(q.metadata.id, 7, "the client's ID is not sent upstream");
            let answer = |id: u16, ip: Ipv4Addr| {
                let mut m = Message::response(id, OpCode::Query);
                m.add_query(q.queries[0].clone());
                m.add_answer(Record::from_rdata(
                    q.queries[0].name().clone(),
                    5,
                    RData::A(A(ip)),
                ));
                m.to_vec().unwrap()
            };
            let forged = answer(q.metadata.id.wrapping_add(1), Ipv4Addr::new(6, 6, 6, 6));
            up.send_to(&forged, from).await.unwrap();
            let real = answer(q.metadata.id, Ipv4Addr::new(192, 0, 2, 1));
            up.send_to(&real, from).await.unwrap();
        });
        let out = forward(&query("example.org", RecordType::A), &[up_addr]).await;
        let m = reply(out);
        assert_eq!(
            m.metadata.id, 7,
            "the answer goes back under the client's ID"
        );
        assert_eq!(m.answers[0].data, RData::A(A(Ipv4Addr::new(192, 0, 2, 1))));
    }

    #[tokio::test]
    async fn a_slow_tcp_client_is_closed() {
        let (_tx, rx) = watch::channel(Arc::new(records()));
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        tokio::spawn(serve_tcp(tcp, rx, Relay::Refuse));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        // A length, then only part of the query, then nothing.
        s.write_all(&[0, 40, 1, 2, 3]).await.unwrap();
        let started = std::time::Instant::now();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(TCP_IO * 3, s.read_to_end(&mut rest)).await;
        assert!(
            matches!(read, Ok(Ok(0))),
            "closed without an answer: {read:?}"
        );
        assert!(started.elapsed() < TCP_IO * 2);
    }

    #[test]
    fn upstreams_come_from_resolv_conf() {
        let ups = upstreams("# x\nnameserver 10.1.1.1\nnameserver 127.0.0.11\nsearch a\n");
        assert_eq!(ups, vec!["10.1.1.1:53".parse().unwrap()]);
    }
}
