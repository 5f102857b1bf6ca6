//! Signed SWIM liveness: only a node can say that it is alive.
//!
//! foca's membership updates (`Member`: an identity, an incarnation, a
//! state) travel piggybacked on SWIM packets and are relayed by everyone.
//! Unchecked, any member could claim another node alive at a higher
//! incarnation (keeping a dead node alive, or overriding a suspicion) or
//! under a newer identity (so that the real node's packets lose the
//! conflict). Here every `Alive` claim carries its subject's signature over
//! (identity, incarnation), made with the subject's node key and checked
//! against its certificate (the ones gossip already holds for table
//! entries), whoever relays it; the packet header carries its sender's
//! signature too, so that relays can vouch for what they heard first-hand.
//! A `Suspect` or `Down` claim is taken only about an identity and
//! incarnation its subject has vouched for (signed, or in a header of its
//! own): suspicion is everyone's right in SWIM, and only the subject can
//! answer it, by a higher incarnation or a new identity that it signs.
//!
//! An update that does not pass is replaced by one that changes nothing (the
//! sender alive at incarnation 0, which its own header already said), so a
//! bad update does not cost the rest of the packet. An `Alive` claim whose
//! subject's certificate is not known yet waits (the latest per node) and
//! is applied once a table message brings the certificate.
//!
//! The codec shares [`SwimTrust`] with the gossip core: foca owns the
//! codec, the core owns the keys, the certificates and what waits.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Buf, BufMut};
use foca::{Codec, Header, Incarnation, Member, PostcardCodec, State};
use shoal_mesh::NodeId;

use crate::keys::Keys;
use crate::peer::Peer;

/// Longest signature carried (an ECDSA P-256 signature is at most 72 bytes).
pub const MAX_SIG: usize = 96;

/// At most this many `Alive` claims wait for a certificate.
const MAX_WAITING: usize = 4096;

/// A subject's signed claim that it is alive as `peer` at `incarnation`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Vouch {
    peer: Peer,
    incarnation: Incarnation,
    sig: Vec<u8>,
}

/// What a subject says of itself, signed: the bytes of the claim.
pub fn claim_bytes(peer: &Peer, incarnation: Incarnation) -> Vec<u8> {
    let mut out = b"shoal-swim-alive/1".to_vec();
    out.extend_from_slice(&peer.id.0.to_be_bytes());
    out.extend_from_slice(&peer.generation.to_be_bytes());
    out.extend_from_slice(&peer.bump.to_be_bytes());
    out.extend_from_slice(&incarnation.to_be_bytes());
    out.extend_from_slice(peer.addr.as_bytes());
    out
}

/// The keys, the owners' certificates, and what this node knows of each
/// member's own claims. Shared by the gossip core and the SWIM codec.
pub struct SwimTrust {
    /// Signs this node's claims and entries, checks others'.
    pub keys: Box<dyn Keys>,
    /// Certificates of owners whose entries this node took.
    pub certs: std::collections::BTreeMap<NodeId, Arc<[u8]>>,
    me: NodeId,
    /// This node's signed claim, for its current identity and incarnation.
    own: Option<Vouch>,
    /// Each member's highest signed claim this node checked (shared:
    /// [`crate::share`]).
    vouched: BTreeMap<NodeId, Arc<Vouch>>,
    /// Each member's highest claim from its own packets (the transport
    /// vouches for the sender; the signature is relayed as it came, and
    /// checked by whoever takes the relay).
    heard: BTreeMap<NodeId, Arc<Vouch>>,
    /// `Alive` claims waiting for their subject's certificate.
    waiting: BTreeMap<NodeId, (Member<Peer>, Vec<u8>)>,
    /// The sender of the packet being decoded.
    src: Option<Peer>,
    /// Updates refused, by reason (merged into the core's counts).
    pub refused: std::collections::BTreeMap<&'static str, u64>,
}

impl SwimTrust {
    /// Trust for node `me`, signing with `keys`.
    pub fn new(me: NodeId, keys: Box<dyn Keys>) -> Self {
        SwimTrust {
            keys,
            certs: Default::default(),
            me,
            own: None,
            vouched: BTreeMap::new(),
            heard: BTreeMap::new(),
            waiting: BTreeMap::new(),
            src: None,
            refused: Default::default(),
        }
    }

    /// This node's signature of its claim to be alive as `peer` at
    /// `incarnation` (signed once per identity and incarnation).
    fn own_sig(&mut self, peer: &Peer, incarnation: Incarnation) -> Vec<u8> {
        match &self.own {
            Some(v) if v.peer == *peer && v.incarnation == incarnation => v.sig.clone(),
            _ => {
                let sig = self.keys.sign(&claim_bytes(peer, incarnation));
                self.own = Some(Vouch {
                    peer: peer.clone(),
                    incarnation,
                    sig: sig.clone(),
                });
                sig
            }
        }
    }

    /// This node's signed claim to be alive as `peer` at `incarnation`,
    /// as its SWIM packets carry it ([`crate::sim::Sim::start_formed`]
    /// hands it to the other nodes).
    pub(crate) fn own_claim(&mut self, peer: &Peer, incarnation: Incarnation) -> Vec<u8> {
        self.own_sig(peer, incarnation)
    }

    /// Takes `peer`'s certificate and its signed claim to be alive at
    /// `incarnation`, as a table message and a SWIM update would have
    /// brought them: whether the claim checked out (a claim that does not
    /// is not kept; the certificate is).
    pub(crate) fn preload(
        &mut self,
        peer: &Peer,
        incarnation: Incarnation,
        cert: Arc<[u8]>,
        claim: &[u8],
    ) -> bool {
        self.certs.insert(peer.id, crate::share::share(cert));
        self.check(peer, incarnation, claim) == Some(true)
    }

    /// Forgets this node's cached signature (its key changed).
    pub fn rekey(&mut self) {
        self.own = None;
    }

    /// Whether `sig` is `peer`'s signature of its claim at `incarnation`:
    /// `Some(false)` when it is not, `None` when its certificate is unknown.
    fn check(&mut self, peer: &Peer, incarnation: Incarnation, sig: &[u8]) -> Option<bool> {
        let known = self
            .vouched
            .get(&peer.id)
            .is_some_and(|v| v.peer == *peer && v.incarnation == incarnation && v.sig == sig);
        if known {
            return Some(true);
        }
        let cert = self.certs.get(&peer.id)?.clone();
        let ok = !sig.is_empty()
            && self
                .keys
                .verify(peer.id, &cert, &claim_bytes(peer, incarnation), sig);
        if ok {
            self.vouch(peer, incarnation, sig);
        }
        Some(ok)
    }

    /// Keeps a checked claim if it is the member's newest.
    fn vouch(&mut self, peer: &Peer, incarnation: Incarnation, sig: &[u8]) {
        let newer = self.vouched.get(&peer.id).is_none_or(|v| {
            (v.peer.generation, v.peer.bump, v.incarnation)
                < (peer.generation, peer.bump, incarnation)
        });
        if newer {
            let claim = Vouch {
                peer: peer.clone(),
                incarnation,
                sig: sig.to_vec(),
            };
            self.vouched
                .insert(peer.id, crate::share::share(Arc::new(claim)));
        }
    }

    /// The highest incarnation `peer` (this exact identity) vouched for,
    /// signed or first-hand.
    fn vouched_incarnation(&self, peer: &Peer) -> Option<Incarnation> {
        let signed = self
            .vouched
            .get(&peer.id)
            .filter(|v| v.peer == *peer)
            .map(|v| v.incarnation);
        let heard = self
            .heard
            .get(&peer.id)
            .filter(|v| v.peer == *peer)
            .map(|v| v.incarnation);
        signed.max(heard)
    }

    fn refuse(&mut self, why: &'static str) {
        *self.refused.entry(why).or_default() += 1;
    }

    /// What to apply for `update` (signed `sig`) from the current packet:
    /// the update itself, or one that changes nothing.
    fn judge(&mut self, update: Member<Peer>, sig: Vec<u8>) -> Member<Peer> {
        if update.id().id == self.me {
            // About this node: foca refutes, or declares a look-alike down.
            return update;
        }
        let pass = match update.state() {
            State::Alive => match self.check(update.id(), update.incarnation(), &sig) {
                Some(true) => true,
                Some(false) => {
                    self.refuse("swim_unsigned_alive");
                    false
                }
                None => {
                    if self.waiting.len() < MAX_WAITING
                        || self.waiting.contains_key(&update.id().id)
                    {
                        self.waiting.insert(update.id().id, (update.clone(), sig));
                    }
                    self.refuse("swim_alive_waits_for_cert");
                    false
                }
            },
            State::Suspect | State::Down => {
                let ok = self
                    .vouched_incarnation(update.id())
                    .is_some_and(|i| update.incarnation() <= i);
                if !ok {
                    self.refuse("swim_unvouched_suspicion");
                }
                ok
            }
        };
        if pass {
            return update;
        }
        match &self.src {
            Some(src) => Member::new(src.clone(), 0, State::Alive),
            None => update,
        }
    }

    /// `Alive` claims whose subjects' certificates are now known and whose
    /// signatures check: to be applied now.
    pub fn ready(&mut self) -> Vec<Member<Peer>> {
        let now_known: Vec<NodeId> = self
            .waiting
            .keys()
            .filter(|n| self.certs.contains_key(n))
            .copied()
            .collect();
        let mut out = Vec::new();
        for n in now_known {
            if let Some((m, sig)) = self.waiting.remove(&n)
                && self.check(m.id(), m.incarnation(), &sig) == Some(true)
            {
                out.push(m);
            }
        }
        out
    }

    /// Forgets what is known of `node` (it left or was removed).
    pub fn forget(&mut self, node: NodeId) {
        self.vouched.remove(&node);
        self.heard.remove(&node);
        self.waiting.remove(&node);
    }
}

/// foca's codec with signatures: postcard for the header and each update,
/// each followed by a signature (a length byte, then the bytes; empty when
/// there is none to give).
pub struct SignedCodec(pub Arc<Mutex<SwimTrust>>);

/// Why a packet does not decode.
#[derive(Debug, thiserror::Error)]
pub enum SwimCodecError {
    /// postcard's.
    #[error(transparent)]
    Postcard(#[from] PostcardError),
    /// The buffer ended, or a signature is too long.
    #[error("malformed signature")]
    Signature,
    /// No room in the packet.
    #[error("no room")]
    Full,
}

type PostcardError = <PostcardCodec as Codec<Peer>>::Error;

impl SignedCodec {
    fn trust(&self) -> MutexGuard<'_, SwimTrust> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn put(item: &[u8], sig: &[u8], mut buf: impl BufMut) -> Result<(), SwimCodecError> {
    let sig = if sig.len() > MAX_SIG { &[][..] } else { sig };
    if buf.remaining_mut() < item.len() + 1 + sig.len() {
        return Err(SwimCodecError::Full);
    }
    buf.put_slice(item);
    buf.put_u8(sig.len() as u8);
    buf.put_slice(sig);
    Ok(())
}

/// `peer` with its address shared with the thread's other copies
/// ([`crate::share`]).
fn shared(peer: Peer) -> Peer {
    Peer {
        addr: crate::share::share(peer.addr),
        ..peer
    }
}

fn take_sig(mut buf: impl Buf) -> Result<Vec<u8>, SwimCodecError> {
    if !buf.has_remaining() {
        return Err(SwimCodecError::Signature);
    }
    let len = buf.get_u8() as usize;
    if len > MAX_SIG || buf.remaining() < len {
        return Err(SwimCodecError::Signature);
    }
    let mut sig = vec![0; len];
    buf.copy_to_slice(&mut sig);
    Ok(sig)
}

impl Codec<Peer> for SignedCodec {
    type Error = SwimCodecError;

    fn encode_header(
        &mut self,
        header: &Header<Peer>,
        buf: impl BufMut,
    ) -> Result<(), Self::Error> {
        let mut item = Vec::new();
        PostcardCodec.encode_header(header, &mut item)?;
        let sig = self.trust().own_sig(&header.src, header.src_incarnation);
        put(&item, &sig, buf)
    }

    fn decode_header(&mut self, mut buf: impl Buf) -> Result<Header<Peer>, Self::Error> {
        let mut header: Header<Peer> = PostcardCodec.decode_header(&mut buf)?;
        header.src = shared(header.src);
        header.dst = shared(header.dst);
        let sig = take_sig(&mut buf)?;
        let mut t = self.trust();
        // The transport checked that the sender is the header's source.
        let src = &header.src;
        let newer = t.heard.get(&src.id).is_none_or(|v| {
            (v.peer.generation, v.peer.bump, v.incarnation)
                < (src.generation, src.bump, header.src_incarnation)
        });
        if newer && src.id != t.me {
            let claim = Vouch {
                peer: src.clone(),
                incarnation: header.src_incarnation,
                sig: sig.clone(),
            };
            t.heard.insert(src.id, crate::share::share(Arc::new(claim)));
        }
        match t.check(src, header.src_incarnation, &sig) {
            Some(true) => {}
            Some(false) => t.refuse("swim_bad_header_signature"),
            // Checked once a table message brings the certificate.
            None if !t.waiting.contains_key(&src.id) && t.waiting.len() < MAX_WAITING => {
                let claim = Member::new(src.clone(), header.src_incarnation, State::Alive);
                t.waiting.insert(src.id, (claim, sig));
            }
            None => {}
        }
        t.src = Some(src.clone());
        Ok(header)
    }

    fn encode_member(
        &mut self,
        member: &Member<Peer>,
        buf: impl BufMut,
    ) -> Result<(), Self::Error> {
        let mut item = Vec::new();
        PostcardCodec.encode_member(member, &mut item)?;
        let mut t = self.trust();
        let sig = match member.state() {
            State::Alive if member.id().id == t.me => t.own_sig(member.id(), member.incarnation()),
            State::Alive => {
                let id = member.id().id;
                let exact = |v: &&Arc<Vouch>| {
                    v.peer == *member.id() && v.incarnation == member.incarnation()
                };
                t.vouched
                    .get(&id)
                    .filter(exact)
                    .or_else(|| t.heard.get(&id).filter(exact))
                    .map(|v| v.sig.clone())
                    .unwrap_or_default()
            }
            State::Suspect | State::Down => Vec::new(),
        };
        put(&item, &sig, buf)
    }

    fn decode_member(&mut self, mut buf: impl Buf) -> Result<Member<Peer>, Self::Error> {
        let member: Member<Peer> = PostcardCodec.decode_member(&mut buf)?;
        let member = Member::new(
            shared(member.id().clone()),
            member.incarnation(),
            member.state(),
        );
        let sig = take_sig(&mut buf)?;
        Ok(self.trust().judge(member, sig))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::TestKeys;

    fn peer(id: u64) -> Peer {
        Peer {
            id: NodeId(id),
            addr: format!("10.0.0.{id}:2377").into(),
            generation: 1 << 16,
            bump: 0,
        }
    }

    fn trust(me: u64) -> Arc<Mutex<SwimTrust>> {
        let mut t = SwimTrust::new(NodeId(me), Box::new(TestKeys(NodeId(me))));
        for n in 1..=4u64 {
            t.certs
                .insert(NodeId(n), Arc::from(n.to_le_bytes().to_vec()));
        }
        Arc::new(Mutex::new(t))
    }

    fn packet(codec: &mut SignedCodec, src: &Peer, updates: &[(Member<Peer>, Vec<u8>)]) -> Vec<u8> {
        let mut buf = Vec::new();
        codec
            .encode_header(
                &Header {
                    src: src.clone(),
                    src_incarnation: 0,
                    dst: peer(9),
                    message: foca::Message::Ping(1),
                },
                &mut buf,
            )
            .unwrap();
        for (m, sig) in updates {
            let mut item = Vec::new();
            PostcardCodec.encode_member(m, &mut item).unwrap();
            put(&item, sig, &mut buf).unwrap();
        }
        buf
    }

    fn decode(codec: &mut SignedCodec, bytes: &[u8], n: usize) -> Vec<Member<Peer>> {
        let mut buf = bytes;
        codec.decode_header(&mut buf).unwrap();
        (0..n)
            .map(|_| codec.decode_member(&mut buf).unwrap())
            .collect()
    }

    #[test]
    fn only_a_node_can_say_it_is_alive_and_suspicion_needs_its_word() {
        // Node 2 (the attacker) sends node 1 claims about node 3.
        let mut attacker = SignedCodec(trust(2));
        let mut victim_view = SignedCodec(trust(1));
        let three = peer(3);
        let sig3 = crate::keys::test_signature(NodeId(3), &claim_bytes(&three, 7));
        let forged = crate::keys::test_signature(NodeId(2), &claim_bytes(&three, 7));
        let newer_identity = Peer {
            generation: u64::MAX,
            ..three.clone()
        };
        let harmless = Member::new(peer(2), 0, State::Alive);
        let bytes = packet(
            &mut attacker,
            &peer(2),
            &[
                (Member::new(three.clone(), 7, State::Alive), forged.clone()),
                (Member::new(three.clone(), 7, State::Alive), Vec::new()),
                (Member::new(newer_identity.clone(), 0, State::Alive), forged),
                (Member::new(three.clone(), 9, State::Suspect), Vec::new()),
                (Member::new(three.clone(), 7, State::Alive), sig3.clone()),
                (Member::new(three.clone(), 7, State::Suspect), Vec::new()),
                (Member::new(three.clone(), 8, State::Down), Vec::new()),
            ],
        );
        let got = decode(&mut victim_view, &bytes, 7);
        assert_eq!(got[0], harmless, "a claim signed by someone else");
        assert_eq!(got[1], harmless, "an unsigned claim");
        assert_eq!(got[2], harmless, "a newer identity, not signed by it");
        assert_eq!(
            got[3], harmless,
            "a suspicion of an incarnation never vouched"
        );
        assert_eq!(got[4], Member::new(three.clone(), 7, State::Alive));
        assert_eq!(got[5], Member::new(three.clone(), 7, State::Suspect));
        assert_eq!(got[6], harmless, "down at an incarnation above its word");
        let refused = victim_view.trust().refused.clone();
        assert_eq!(refused["swim_unsigned_alive"], 3);
        assert_eq!(refused["swim_unvouched_suspicion"], 2);

        // What node 1 relays of node 3 carries node 3's signature, which a
        // third node checks.
        let mut item = Vec::new();
        victim_view
            .encode_member(&Member::new(three.clone(), 7, State::Alive), &mut item)
            .unwrap();
        let mut relay_reader = SignedCodec(trust(4));
        let mut relayed = packet(&mut SignedCodec(trust(1)), &peer(1), &[]);
        relayed.extend_from_slice(&item);
        let got = decode(&mut relay_reader, &relayed, 1);
        assert_eq!(got[0], Member::new(three, 7, State::Alive));
    }

    #[test]
    fn a_header_vouches_for_its_sender_and_a_claim_waits_for_a_certificate() {
        let mut four = SignedCodec(trust(4));
        four.trust().certs.remove(&NodeId(3));
        let bytes = packet(&mut SignedCodec(trust(3)), &peer(3), &[]);
        let mut buf = &bytes[..];
        four.decode_header(&mut buf).unwrap();
        // Node 3's header signature lets node 4 relay "3 alive at 0" (also
        // before node 4 has node 3's certificate).
        let mut item = Vec::new();
        four.encode_member(&Member::new(peer(3), 0, State::Alive), &mut item)
            .unwrap();
        assert!(item.len() > 20 && *item.last().unwrap() != 0);

        // Node 5's certificate is unknown: its claim waits, then applies.
        let five = peer(5);
        let sig5 = crate::keys::test_signature(NodeId(5), &claim_bytes(&five, 2));
        let bytes = packet(
            &mut SignedCodec(trust(3)),
            &peer(3),
            &[(Member::new(five.clone(), 2, State::Alive), sig5)],
        );
        let got = decode(&mut four, &bytes, 1);
        assert_eq!(got[0], Member::new(peer(3), 0, State::Alive));
        assert!(four.trust().ready().is_empty());
        four.trust()
            .certs
            .insert(NodeId(5), Arc::from(5u64.to_le_bytes().to_vec()));
        assert_eq!(
            four.trust().ready(),
            vec![Member::new(five, 2, State::Alive)]
        );
    }

    #[test]
    fn hostile_signature_bytes_are_errors() {
        let mut codec = SignedCodec(trust(1));
        let mut bytes = packet(&mut SignedCodec(trust(2)), &peer(2), &[]);
        // A header whose signature length runs past the end.
        let cut = bytes.len() - 3;
        bytes.truncate(cut);
        let mut buf = &bytes[..];
        assert!(codec.decode_header(&mut buf).is_err());
        let mut item = Vec::new();
        PostcardCodec
            .encode_member(&Member::new(peer(3), 0, State::Alive), &mut item)
            .unwrap();
        item.push(200);
        let mut buf = &item[..];
        assert!(codec.decode_member(&mut buf).is_err());
    }

    proptest::proptest! {
        /// Whatever bytes a member sends, the codec returns an error or an
        /// update, never panics, and takes no claim it cannot check.
        #[test]
        fn hostile_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let t = trust(1);
            let mut codec = SignedCodec(t.clone());
            let mut buf = &bytes[..];
            if codec.decode_header(&mut buf).is_ok() {
                while !buf.is_empty() {
                    if codec.decode_member(&mut buf).is_err() {
                        break;
                    }
                }
            }
            let t = t.lock().unwrap();
            proptest::prop_assert!(t.vouched.is_empty());
        }
    }
}
