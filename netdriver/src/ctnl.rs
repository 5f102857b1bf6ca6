//! Conntrack over netlink (ctnetlink), for one job: when a backend leaves
//! a load balancer, the connections conntrack still sends to it that never
//! got an answer (a TCP SYN to a dead node, a UDP flow) are forgotten, so
//! that their next packet is balanced again, to a live backend. Without
//! this a client that keeps its source port (a UDP flow, most resolvers
//! and metrics agents) stays pinned to the dead backend for as long as it
//! keeps sending, and a SYN retransmitted after the backend left still
//! goes to it. Answered connections are left alone: a task being stopped
//! finishes what it has.
//!
//! The layouts are those of `linux/netfilter/nfnetlink_conntrack.h`: a
//! dump (`IPCTNL_MSG_CT_GET` with `NLM_F_DUMP`) of the namespace's table,
//! then one `IPCTNL_MSG_CT_DELETE` per entry picked, naming it by its
//! original tuple (and zone) exactly as the dump gave them. A dump walks
//! the kernel's whole conntrack hash table (shared by every namespace:
//! 262 144 buckets here, ~12 ms), whatever the namespace holds, so the
//! [`Janitor`] does it on a thread of its own, after the load balancer has
//! changed, not in the reconciler's way.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::mpsc;

use nix::sys::socket::{MsgFlags, recv, send};

use crate::DpError;
use crate::nfnl::{NLA_F_NESTED, NLM_F_ACK, NLM_F_REQUEST, answers, fail};

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_DONE: u16 = 3;
const AF_INET: u8 = 2;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const IPS_SEEN_REPLY: u32 = 1 << 1;

/// IP protocol numbers.
pub const TCP: u8 = 6;
/// IP protocol numbers.
pub const UDP: u8 = 17;

/// Delete messages per `send` (each ~60 bytes).
const DELETES_PER_SEND: usize = 256;

/// One conntrack entry, as much of it as choosing needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// TCP, UDP, …
    pub proto: u8,
    /// Where the client sent it (a VIP, a published port).
    pub orig_dst: (Ipv4Addr, u16),
    /// Who answers it (the backend it was translated to).
    pub reply_src: (Ipv4Addr, u16),
    /// Whether an answer was ever seen.
    pub replied: bool,
    /// Its original tuple and zone attributes, as the kernel gave them.
    key: Vec<u8>,
}

impl Entry {
    /// Not answered yet (TCP), or a UDP flow: what may go elsewhere when
    /// its backend leaves.
    pub fn movable(&self) -> bool {
        self.proto == UDP || !self.replied
    }
}

/// The attributes in `b`: (type without flags, payload, the whole
/// attribute); a malformed one ends the list.
fn attrs(b: &[u8]) -> Vec<(u16, &[u8], &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= b.len() {
        let len = usize::from(u16::from_ne_bytes([b[at], b[at + 1]]));
        if len < 4 || at + len > b.len() {
            break;
        }
        let ty = u16::from_ne_bytes([b[at + 2], b[at + 3]]) & !NLA_F_NESTED;
        out.push((ty, &b[at + 4..at + len], &b[at..at + len]));
        at += (len + 3) & !3;
    }
    out
}

/// A tuple's (source, destination, protocol).
#[allow(clippy::type_complexity)]
fn tuple(b: &[u8]) -> Option<((Ipv4Addr, u16), (Ipv4Addr, u16), u8)> {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, 0, 0);
    let v4 = |p: &[u8]| <[u8; 4]>::try_from(p).ok().map(Ipv4Addr::from);
    let port = |p: &[u8]| <[u8; 2]>::try_from(p).ok().map(u16::from_be_bytes);
    for (ty, p, _) in attrs(b) {
        match ty {
            CTA_TUPLE_IP => {
                for (ty, p, _) in attrs(p) {
                    match ty {
                        CTA_IP_V4_SRC => src = v4(p),
                        CTA_IP_V4_DST => dst = v4(p),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (ty, p, _) in attrs(p) {
                    match ty {
                        CTA_PROTO_NUM => proto = p.first().copied(),
                        CTA_PROTO_SRC_PORT => sport = port(p).unwrap_or(0),
                        CTA_PROTO_DST_PORT => dport = port(p).unwrap_or(0),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(((src?, sport), (dst?, dport), proto?))
}

/// One dumped entry (the attributes after the nfgenmsg); `None` for one
/// that is not IPv4 or lacks a tuple.
fn entry(payload: &[u8]) -> Option<Entry> {
    let (mut orig, mut reply, mut status, mut key) = (None, None, 0, Vec::new());
    for (ty, p, whole) in attrs(payload) {
        match ty {
            CTA_TUPLE_ORIG => orig = tuple(p),
            CTA_TUPLE_REPLY => reply = tuple(p),
            CTA_STATUS => {
                status = <[u8; 4]>::try_from(p).map_or(0, u32::from_be_bytes);
            }
            _ => {}
        }
        if ty == CTA_TUPLE_ORIG || ty == CTA_ZONE {
            key.extend_from_slice(whole);
            while !key.len().is_multiple_of(4) {
                key.push(0);
            }
        }
    }
    let (_, orig_dst, proto) = orig?;
    let (reply_src, _, _) = reply?;
    Some(Entry {
        proto,
        orig_dst,
        reply_src,
        replied: status & IPS_SEEN_REPLY != 0,
        key,
    })
}

/// A ctnetlink message: header, IPv4 nfgenmsg, `attrs`.
fn message(msg: u16, flags: u16, seq: u32, attrs: &[u8]) -> Vec<u8> {
    let len = u32::try_from(20 + attrs.len()).unwrap_or(u32::MAX);
    let mut b = Vec::with_capacity(20 + attrs.len());
    b.extend_from_slice(&len.to_ne_bytes());
    b.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | msg).to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&[AF_INET, 0, 0, 0]);
    b.extend_from_slice(attrs);
    b
}

/// Every IPv4 entry of the socket's namespace.
pub fn entries(fd: &OwnedFd, seq: u32) -> Result<Vec<Entry>, DpError> {
    let req = message(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, &[]);
    send(fd.as_raw_fd(), &req, MsgFlags::empty()).map_err(|e| fail("conntrack dump", e))?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 17];
    loop {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())
            .map_err(|e| fail("reading the conntrack dump", e))?;
        for a in answers(&buf[..n])?.into_iter().filter(|a| a.seq == seq) {
            if a.ty == NLMSG_DONE {
                return Ok(out);
            }
            if let Some(code) = a.error_code().filter(|c| *c != 0) {
                return Err(fail("conntrack dump", nix::Error::from_raw(-code)));
            }
            if a.ty == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW {
                out.extend(entry(a.msg.get(20..).unwrap_or_default()));
            }
        }
    }
}

/// Deletes `doomed` (from [`entries`]); one already gone is no error.
/// Returns how many went.
pub fn forget(fd: &OwnedFd, seq: u32, doomed: &[&Entry]) -> Result<usize, DpError> {
    let mut gone = 0;
    let mut next = seq;
    for chunk in doomed.chunks(DELETES_PER_SEND) {
        let mut buf = Vec::new();
        let mut pending = Vec::new();
        for e in chunk {
            buf.extend(message(
                IPCTNL_MSG_CT_DELETE,
                NLM_F_REQUEST | NLM_F_ACK,
                next,
                &e.key,
            ));
            pending.push(next);
            next = next.wrapping_add(1);
        }
        send(fd.as_raw_fd(), &buf, MsgFlags::empty()).map_err(|e| fail("conntrack delete", e))?;
        let mut answer = vec![0u8; 1 << 16];
        while !pending.is_empty() {
            let n = recv(fd.as_raw_fd(), &mut answer, MsgFlags::empty())
                .map_err(|e| fail("waiting for conntrack deletes", e))?;
            for a in answers(&answer[..n])? {
                let Some(code) = a.error_code() else { continue };
                let Some(i) = pending.iter().position(|s| *s == a.seq) else {
                    continue;
                };
                pending.swap_remove(i);
                match nix::Error::from_raw(-code) {
                    _ if code == 0 => gone += 1,
                    nix::Error::ENOENT => {}
                    e => return Err(fail("conntrack delete", e)),
                }
            }
        }
    }
    Ok(gone)
}

/// Forgets the entries `pick` chooses; how many went.
pub fn forget_where(
    fd: &OwnedFd,
    seq: u32,
    pick: impl Fn(&Entry) -> bool,
) -> Result<usize, DpError> {
    let all = entries(fd, seq)?;
    let doomed: Vec<&Entry> = all.iter().filter(|e| pick(e)).collect();
    if doomed.is_empty() {
        return Ok(0);
    }
    forget(fd, seq.wrapping_add(1), &doomed)
}

/// The backends that left VIPs between `before` (each VIP's backends) and
/// `after`: (VIP, backend).
pub fn left_vips(
    before: &BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>,
    after: &crate::model::Lb,
) -> BTreeSet<(Ipv4Addr, Ipv4Addr)> {
    before
        .iter()
        .flat_map(|(vip, old)| old.iter().map(move |b| (*vip, *b)))
        .filter(|(vip, b)| !after.get(vip).is_some_and(|now| now.contains(b)))
        .collect()
}

/// Published ports' DNAT (`Nat::dnat`): (`tcp`|`udp`, port) → (backends,
/// target port).
type Dnat = BTreeMap<(String, u16), (Vec<Ipv4Addr>, u16)>;

/// The backends that left published ports between `before` and `after`:
/// (protocol number, backend, target port); a backend whose target port
/// changed left the old one.
pub fn left_ports(before: &Dnat, after: Option<&Dnat>) -> BTreeSet<(u8, Ipv4Addr, u16)> {
    before
        .iter()
        .flat_map(|((proto, port), (old, target))| {
            let now = after.and_then(|d| d.get(&(proto.clone(), *port)));
            let proto = if proto == "udp" { UDP } else { TCP };
            old.iter()
                .filter(move |b| !now.is_some_and(|(n, t)| t == target && n.contains(b)))
                .map(move |b| (proto, *b, *target))
        })
        .collect()
}

/// What a [`Janitor`] is asked to do: in namespace `path` (this one if
/// `None`), forget the entries `pick` chooses.
struct Job {
    label: String,
    path: Option<PathBuf>,
    pick: Box<dyn Fn(&Entry) -> bool + Send>,
}

/// A thread that forgets conntrack entries, one job after another, each
/// with a netfilter socket of its own in the job's namespace (closed after
/// it, so that no namespace is kept alive). It ends with its owner.
pub struct Janitor {
    jobs: mpsc::Sender<Job>,
}

impl Janitor {
    /// Starts the thread.
    pub fn spawn() -> Janitor {
        let (jobs, todo) = mpsc::channel::<Job>();
        let work = move || {
            let mut seq = std::process::id() << 16;
            for job in todo {
                seq = seq.wrapping_add(1 << 16);
                let forgot = crate::linux::in_netns(job.path, crate::nfnl::open)
                    .and_then(|fd| forget_where(&fd, seq, job.pick));
                match forgot {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(
                        ns = job.label,
                        n,
                        "forgot unanswered connections to backends that left"
                    ),
                    // The namespace may have gone meanwhile.
                    Err(e) => tracing::debug!(
                        ns = job.label,
                        error = %e,
                        "connections to backends that left not forgotten"
                    ),
                }
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name("shoal-conntrack".into())
            .spawn(work)
        {
            tracing::warn!(error = %e, "no conntrack clean-up thread");
        }
        Janitor { jobs }
    }

    /// Asks for the entries `pick` chooses in namespace `path` (labelled
    /// `label` in the log) to be forgotten, soon.
    pub fn forget(
        &self,
        label: &str,
        path: Option<PathBuf>,
        pick: impl Fn(&Entry) -> bool + Send + 'static,
    ) {
        let job = Job {
            label: label.to_owned(),
            path,
            pick: Box::new(pick),
        };
        if self.jobs.send(job).is_err() {
            tracing::warn!(ns = label, "the conntrack clean-up thread is gone");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn attr(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&u16::try_from(4 + payload.len()).unwrap().to_ne_bytes());
        b.extend_from_slice(&ty.to_ne_bytes());
        b.extend_from_slice(payload);
        while !b.len().is_multiple_of(4) {
            b.push(0);
        }
        b
    }

    fn tuple_attr(ty: u16, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
        let ip = [attr(CTA_IP_V4_SRC, &src), attr(CTA_IP_V4_DST, &dst)].concat();
        let proto = [
            attr(CTA_PROTO_NUM, &[UDP]),
            attr(CTA_PROTO_SRC_PORT, &sport.to_be_bytes()),
            attr(CTA_PROTO_DST_PORT, &dport.to_be_bytes()),
        ]
        .concat();
        let inner = [
            attr(CTA_TUPLE_IP | NLA_F_NESTED, &ip),
            attr(CTA_TUPLE_PROTO | NLA_F_NESTED, &proto),
        ]
        .concat();
        attr(ty | NLA_F_NESTED, &inner)
    }

    #[test]
    fn a_dumped_entry_parses_and_keeps_its_key() {
        let orig = tuple_attr(CTA_TUPLE_ORIG, [10, 0, 0, 5], 40000, [10, 0, 0, 2], 53);
        let reply = tuple_attr(CTA_TUPLE_REPLY, [10, 0, 0, 7], 53, [10, 0, 0, 5], 61001);
        let zone = attr(CTA_ZONE, &0u16.to_be_bytes());
        let status = attr(CTA_STATUS, &8u32.to_be_bytes());
        let e = entry(&[orig.clone(), reply, status, zone.clone()].concat()).unwrap();
        assert_eq!(e.proto, UDP);
        assert_eq!(e.orig_dst, (Ipv4Addr::new(10, 0, 0, 2), 53));
        assert_eq!(e.reply_src, (Ipv4Addr::new(10, 0, 0, 7), 53));
        assert!(!e.replied && e.movable());
        assert_eq!(e.key, [orig, zone].concat());
        // Cut short, or without a reply tuple: not an entry.
        assert_eq!(entry(&e.key[..e.key.len() - 9]), None);
        assert_eq!(entry(&attr(CTA_STATUS, &[0; 4])), None);
    }

    #[test]
    fn a_delete_names_the_entry_by_its_key() {
        let m = message(
            IPCTNL_MSG_CT_DELETE,
            NLM_F_REQUEST | NLM_F_ACK,
            7,
            &[1, 2, 3, 4],
        );
        assert_eq!(m.len(), 24);
        assert_eq!(u32::from_ne_bytes(m[..4].try_into().unwrap()), 24);
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), 0x102);
        assert_eq!(&m[16..20], &[AF_INET, 0, 0, 0]);
        assert_eq!(&m[20..], &[1, 2, 3, 4]);
    }
}
