//! nf_tables over netlink, for the one change that must be fast: a
//! backend of a VIP going or coming ([`crate::nft::SlotChange`]). One batch
//! (one kernel transaction) of `DELSETELEM`, `NEWSETELEM` and, when the
//! backend count changes, `DELRULE` + `NEWRULE` on the VIP's chain; no `nft`
//! process, and nothing read back (the `nft` binary reads the whole map
//! before it changes it). Everything else in the table is made by `nft -f`
//! scripts ([`crate::nft::script`]), as is this change if the batch is
//! refused.
//!
//! The messages are built by hand: the layouts are those of
//! `linux/netfilter/nfnetlink.h` and `linux/netfilter/nf_tables.h`, and what
//! `nft --debug=netlink` shows for the same rule:
//!
//! ```text
//! [ numgen reg 1 = random mod N ]
//! [ lookup reg 1 set be_VIP dreg 1 ]
//! [ nat dnat ip addr_min reg 1 ]
//! ```

use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    setsockopt, socket, sockopt,
};
use nix::sys::time::TimeVal;

use crate::DpError;
use crate::nft::{SlotChange, backend_map, chain};

pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 0x2;
pub(crate) const NLA_F_NESTED: u16 = 0x8000;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFPROTO_IPV4: u8 = 2;

const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
const NFTA_GEN_ID: u16 = 1;

const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_NG_DREG: u16 = 1;
const NFTA_NG_MODULUS: u16 = 2;
const NFTA_NG_TYPE: u16 = 3;
const NFTA_NG_OFFSET: u16 = 4;
/// A random slot per new connection (`numgen random`): with `inc`, whose
/// counter starts at 0 in every namespace, every client's first connection
/// went to the same backend.
const NFT_NG_RANDOM: u32 = 1;
const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_SREG: u16 = 2;
const NFTA_LOOKUP_DREG: u16 = 3;
const NFTA_NAT_TYPE: u16 = 1;
const NFTA_NAT_FAMILY: u16 = 2;
const NFTA_NAT_REG_ADDR_MIN: u16 = 3;
const NFT_NAT_DNAT: u32 = 1;
const NFT_REG_1: u32 = 1;

/// The table every sandbox's VIPs live in.
const TABLE: &str = "shoal";

/// Elements per set-element message (each ~28 bytes).
const ELEMENTS_PER_MESSAGE: usize = 2_000;

/// A batch larger than this goes to `nft` instead (the socket's send
/// buffer bounds one `sendmsg`).
pub const MAX_BATCH: usize = 1 << 20;

/// Netlink attributes being written into a buffer.
struct Attrs<'a>(&'a mut Vec<u8>);

impl Attrs<'_> {
    fn put(&mut self, ty: u16, payload: &[u8]) {
        let len = 4 + payload.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&ty.to_ne_bytes());
        self.0.extend_from_slice(payload);
        pad(self.0);
    }

    fn str(&mut self, ty: u16, s: &str) {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.put(ty, &b);
    }

    fn be32(&mut self, ty: u16, v: u32) {
        self.put(ty, &v.to_be_bytes());
    }

    fn nest(&mut self, ty: u16, f: impl FnOnce(&mut Attrs<'_>)) {
        let start = self.0.len();
        self.0.extend_from_slice(&[0, 0]);
        self.0.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        f(&mut Attrs(self.0));
        let len = (self.0.len() - start) as u16;
        self.0[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }
}

fn pad(b: &mut Vec<u8>) {
    while !b.len().is_multiple_of(4) {
        b.push(0);
    }
}

/// A batch of nf_tables messages: one transaction.
pub struct Batch {
    buf: Vec<u8>,
    seq: u32,
    /// Sequence numbers of the messages that are acknowledged, with what
    /// each did (for errors).
    acked: Vec<(u32, &'static str)>,
}

impl Batch {
    fn new(seq: u32) -> Batch {
        let mut b = Batch {
            buf: Vec::new(),
            seq,
            acked: Vec::new(),
        };
        b.header(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            0,
            NFNL_SUBSYS_NFTABLES,
            |_| {},
        );
        b
    }

    fn header(
        &mut self,
        ty: u16,
        flags: u16,
        family: u8,
        res_id: u16,
        attrs: impl FnOnce(&mut Attrs<'_>),
    ) -> u32 {
        let start = self.buf.len();
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        self.buf.extend_from_slice(&[0; 4]);
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&[family, 0]);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        attrs(&mut Attrs(&mut self.buf));
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
        seq
    }

    fn msg(&mut self, msg: u16, flags: u16, what: &'static str, f: impl FnOnce(&mut Attrs<'_>)) {
        let ty = (NFNL_SUBSYS_NFTABLES << 8) | msg;
        let seq = self.header(ty, NLM_F_REQUEST | NLM_F_ACK | flags, NFPROTO_IPV4, 0, f);
        self.acked.push((seq, what));
    }

    fn elements(&mut self, msg: u16, set: &str, elems: &[(u32, Option<[u8; 4]>)]) {
        let (flags, what) = if msg == NFT_MSG_NEWSETELEM {
            (NLM_F_CREATE, "add backend slots")
        } else {
            (0, "delete backend slots")
        };
        for chunk in elems.chunks(ELEMENTS_PER_MESSAGE) {
            self.msg(msg, flags, what, |a| {
                a.str(NFTA_SET_ELEM_LIST_TABLE, TABLE);
                a.str(NFTA_SET_ELEM_LIST_SET, set);
                a.nest(NFTA_SET_ELEM_LIST_ELEMENTS, |a| {
                    for (slot, data) in chunk {
                        a.nest(NFTA_LIST_ELEM, |a| {
                            // numgen leaves a host-order u32 in the register.
                            a.nest(NFTA_SET_ELEM_KEY, |a| {
                                a.put(NFTA_DATA_VALUE, &slot.to_ne_bytes());
                            });
                            if let Some(d) = data {
                                a.nest(NFTA_SET_ELEM_DATA, |a| a.put(NFTA_DATA_VALUE, d));
                            }
                        });
                    }
                });
            });
        }
    }

    fn rule(&mut self, chain_name: &str, set: &str, count: usize) {
        self.msg(NFT_MSG_DELRULE, 0, "flush the VIP's chain", |a| {
            a.str(NFTA_RULE_TABLE, TABLE);
            a.str(NFTA_RULE_CHAIN, chain_name);
        });
        self.msg(
            NFT_MSG_NEWRULE,
            NLM_F_CREATE | NLM_F_APPEND,
            "add the VIP's rule",
            |a| {
                a.str(NFTA_RULE_TABLE, TABLE);
                a.str(NFTA_RULE_CHAIN, chain_name);
                a.nest(NFTA_RULE_EXPRESSIONS, |a| {
                    a.nest(NFTA_LIST_ELEM, |a| {
                        a.str(NFTA_EXPR_NAME, "numgen");
                        a.nest(NFTA_EXPR_DATA, |a| {
                            a.be32(NFTA_NG_DREG, NFT_REG_1);
                            a.be32(NFTA_NG_MODULUS, count as u32);
                            a.be32(NFTA_NG_TYPE, NFT_NG_RANDOM);
                            a.be32(NFTA_NG_OFFSET, 0);
                        });
                    });
                    a.nest(NFTA_LIST_ELEM, |a| {
                        a.str(NFTA_EXPR_NAME, "lookup");
                        a.nest(NFTA_EXPR_DATA, |a| {
                            a.str(NFTA_LOOKUP_SET, set);
                            a.be32(NFTA_LOOKUP_SREG, NFT_REG_1);
                            a.be32(NFTA_LOOKUP_DREG, NFT_REG_1);
                        });
                    });
                    a.nest(NFTA_LIST_ELEM, |a| {
                        a.str(NFTA_EXPR_NAME, "nat");
                        a.nest(NFTA_EXPR_DATA, |a| {
                            a.be32(NFTA_NAT_TYPE, NFT_NAT_DNAT);
                            a.be32(NFTA_NAT_FAMILY, u32::from(NFPROTO_IPV4));
                            a.be32(NFTA_NAT_REG_ADDR_MIN, NFT_REG_1);
                        });
                    });
                });
            },
        );
    }

    fn finish(mut self) -> Batch {
        self.header(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            0,
            NFNL_SUBSYS_NFTABLES,
            |_| {},
        );
        self
    }

    /// The bytes sent.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// The batch that applies `changes` to table `ip shoal`, with sequence
/// numbers from `seq`.
pub fn lb_batch(changes: &[SlotChange], seq: u32) -> Batch {
    let mut b = Batch::new(seq);
    for c in changes {
        let set = backend_map(c.vip);
        let del: Vec<(u32, Option<[u8; 4]>)> = c.delete.iter().map(|i| (*i, None)).collect();
        let add: Vec<(u32, Option<[u8; 4]>)> = c
            .add
            .iter()
            .map(|(i, ip)| (*i, Some(ip.octets())))
            .collect();
        if !del.is_empty() {
            b.elements(NFT_MSG_DELSETELEM, &set, &del);
        }
        if !add.is_empty() {
            b.elements(NFT_MSG_NEWSETELEM, &set, &add);
        }
        if let Some(n) = c.count {
            b.rule(&chain(c.vip), &set, n);
        }
    }
    b.finish()
}

pub(crate) fn fail(what: &str, e: nix::Error) -> DpError {
    DpError::Sys {
        what: format!("nf_tables netlink: {what}"),
        source: e,
    }
}

/// A netfilter netlink socket in the calling thread's network namespace.
/// Kept open by its user: closing one costs an RCU grace period (~8–20 ms
/// here), far more than a whole batch; it also keeps its namespace alive,
/// so it must be dropped with it.
pub fn open() -> Result<OwnedFd, DpError> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )
    .map_err(|e| fail("socket", e))?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(|e| fail("bind", e))?;
    setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(5, 0))
        .map_err(|e| fail("receive timeout", e))?;
    // Room for the largest batch sent (root may go beyond the default).
    setsockopt(&fd, sockopt::SndBufForce, &(2 * MAX_BATCH)).map_err(|e| fail("send buffer", e))?;
    Ok(fd)
}

/// Sends `batch` on `fd` (from [`open`]) and waits for every
/// acknowledgement; the first error the kernel reports fails it (and the
/// kernel then applied nothing). Answers to other sequence numbers (of an
/// earlier batch that timed out) are skipped.
pub fn send_batch(fd: &OwnedFd, batch: &Batch) -> Result<(), DpError> {
    send(fd.as_raw_fd(), &batch.buf, MsgFlags::empty()).map_err(|e| fail("send", e))?;
    let mut pending: Vec<(u32, &'static str)> = batch.acked.clone();
    let mut first_error: Option<String> = None;
    let mut buf = vec![0u8; 65_536];
    while !pending.is_empty() {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())
            .map_err(|e| fail("waiting for the kernel's answer", e))?;
        for a in answers(&buf[..n])? {
            let Some(code) = a.error_code() else { continue };
            if let Some(i) = pending.iter().position(|(s, _)| *s == a.seq) {
                let (_, what) = pending.swap_remove(i);
                if code != 0 && first_error.is_none() {
                    let e = nix::Error::from_raw(-code);
                    first_error = Some(format!("{what}: {}", e.desc()));
                }
            }
        }
    }
    match first_error {
        Some(e) => Err(DpError::Nfnl(format!("refused the change ({e})"))),
        None => Ok(()),
    }
}

/// One netlink message of an answer.
pub(crate) struct Answer<'a> {
    pub(crate) ty: u16,
    pub(crate) seq: u32,
    /// The whole message, header included.
    pub(crate) msg: &'a [u8],
}

impl Answer<'_> {
    /// The error code of an `NLMSG_ERROR` (0 for an acknowledgement).
    pub(crate) fn error_code(&self) -> Option<i32> {
        let m = self.msg;
        (self.ty == NLMSG_ERROR && m.len() >= 20)
            .then(|| i32::from_ne_bytes([m[16], m[17], m[18], m[19]]))
    }
}

fn malformed() -> DpError {
    DpError::Nfnl("a malformed answer".into())
}

/// The messages in `buf` (as one `recv` returned it); a length that runs
/// past the buffer is an error.
pub(crate) fn answers(buf: &[u8]) -> Result<Vec<Answer<'_>>, DpError> {
    let word = |o: usize| u32::from_ne_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
    let mut out = Vec::new();
    let mut at = 0;
    while at + 16 <= buf.len() {
        let len = word(at) as usize;
        if len < 16 || at + len > buf.len() {
            return Err(malformed());
        }
        out.push(Answer {
            ty: u16::from_ne_bytes([buf[at + 4], buf[at + 5]]),
            seq: word(at + 8),
            msg: &buf[at..at + len],
        });
        at += (len + 3) & !3;
    }
    Ok(out)
}

/// The nf_tables generation of the socket's namespace: a counter the
/// kernel bumps on every committed change to any table there, so that
/// tables read at one generation are known unchanged while it stays.
pub fn generation(fd: &OwnedFd, seq: u32) -> Result<u32, DpError> {
    let mut req = Batch {
        buf: Vec::new(),
        seq,
        acked: Vec::new(),
    };
    req.header(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN,
        NLM_F_REQUEST,
        0,
        0,
        |_| {},
    );
    send(fd.as_raw_fd(), &req.buf, MsgFlags::empty()).map_err(|e| fail("send", e))?;
    let mut buf = vec![0u8; 4_096];
    loop {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())
            .map_err(|e| fail("waiting for the generation", e))?;
        if let Some(found) = parse_generation(&buf[..n], seq)? {
            return Ok(found);
        }
    }
}

/// The generation in the answers `buf` to request `seq`, if there.
fn parse_generation(buf: &[u8], seq: u32) -> Result<Option<u32>, DpError> {
    for a in answers(buf)?.into_iter().filter(|a| a.seq == seq) {
        if let Some(code) = a.error_code() {
            return Err(fail("generation", nix::Error::from_raw(-code)));
        }
        if a.ty != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN {
            continue;
        }
        // Attributes after the 4-byte nfgenmsg.
        let m = a.msg;
        let mut at = 20;
        while at + 4 <= m.len() {
            let len = usize::from(u16::from_ne_bytes([m[at], m[at + 1]]));
            let ty = u16::from_ne_bytes([m[at + 2], m[at + 3]]) & !NLA_F_NESTED;
            if len < 4 || at + len > m.len() {
                return Err(malformed());
            }
            if ty == NFTA_GEN_ID && len >= 8 {
                return Ok(Some(u32::from_be_bytes([
                    m[at + 4],
                    m[at + 5],
                    m[at + 6],
                    m[at + 7],
                ])));
            }
            at += (len + 3) & !3;
        }
        return Err(malformed());
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::net::Ipv4Addr;

    use super::*;

    /// The netlink messages of `bytes`: (type, flags, seq, payload length).
    fn messages(bytes: &[u8]) -> Vec<(u16, u16, u32, usize)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len = u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            let ty = u16::from_ne_bytes(bytes[at + 4..at + 6].try_into().unwrap());
            let flags = u16::from_ne_bytes(bytes[at + 6..at + 8].try_into().unwrap());
            let seq = u32::from_ne_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            out.push((ty, flags, seq, len - 16));
            assert_eq!(len % 4, 0);
            at += len;
        }
        assert_eq!(at, bytes.len());
        out
    }

    #[test]
    fn a_backend_change_is_one_framed_batch() {
        let vip = Ipv4Addr::new(10, 0, 0, 2);
        let c = SlotChange {
            vip,
            delete: vec![1, 2],
            add: vec![(1, Ipv4Addr::new(10, 0, 0, 9))],
            count: Some(2),
        };
        let b = lb_batch(&[c], 100);
        let m = messages(b.bytes());
        let types: Vec<u16> = m.iter().map(|x| x.0).collect();
        let nft = |t: u16| (NFNL_SUBSYS_NFTABLES << 8) | t;
        assert_eq!(
            types,
            vec![
                NFNL_MSG_BATCH_BEGIN,
                nft(NFT_MSG_DELSETELEM),
                nft(NFT_MSG_NEWSETELEM),
                nft(NFT_MSG_DELRULE),
                nft(NFT_MSG_NEWRULE),
                NFNL_MSG_BATCH_END,
            ]
        );
        let seqs: Vec<u32> = m.iter().map(|x| x.2).collect();
        assert_eq!(seqs, (100..106).collect::<Vec<_>>());
        // Every message but the batch's frame asks for an acknowledgement.
        assert!(m[1..5].iter().all(|x| x.1 & NLM_F_ACK != 0));
        assert_eq!(m[0].1 & NLM_F_ACK, 0);
        assert_eq!(b.acked.len(), 4);
        // The set's and chain's names are in the messages.
        let text = String::from_utf8_lossy(b.bytes());
        assert!(text.contains("be_10_0_0_2") && text.contains("svc_10_0_0_2"));
        assert!(text.contains("numgen") && text.contains("lookup") && text.contains("nat"));
    }

    #[test]
    fn generation_answers_parse_and_hostile_ones_fail() {
        let mut m = Vec::new();
        let ty = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN;
        m.extend_from_slice(&28u32.to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&7u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&[0, 0, 0, 0]);
        m.extend_from_slice(&8u16.to_ne_bytes());
        m.extend_from_slice(&NFTA_GEN_ID.to_ne_bytes());
        m.extend_from_slice(&42u32.to_be_bytes());
        assert_eq!(parse_generation(&m, 7).unwrap(), Some(42));
        // Another request's answer: not ours.
        assert_eq!(parse_generation(&m, 8).unwrap(), None);
        // Lengths that run past the buffer: an error, never a panic.
        for cut in 0..m.len() {
            let mut bad = m.clone();
            bad.truncate(cut);
            let _ = parse_generation(&bad, 7);
        }
        let mut bad = m.clone();
        bad[20..22].copy_from_slice(&200u16.to_ne_bytes());
        assert!(parse_generation(&bad, 7).is_err());
        let mut bad = m;
        bad[0..4].copy_from_slice(&9999u32.to_ne_bytes());
        assert!(parse_generation(&bad, 7).is_err());
    }

    #[test]
    fn large_changes_are_split_into_messages() {
        let c = SlotChange {
            vip: Ipv4Addr::new(10, 0, 0, 2),
            delete: vec![],
            add: (0..5_000u32).map(|i| (i, Ipv4Addr::from(i))).collect(),
            count: None,
        };
        let b = lb_batch(&[c], 1);
        assert_eq!(messages(b.bytes()).len(), 2 + 3);
    }
}
