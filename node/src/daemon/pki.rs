//! The cluster's PKI: the CA made at `swarm init`, node keys and CSRs, the
//! manager-side signing of a joiner's CSR, CA fingerprints for join tokens,
//! and sealing of manager-only secrets.
//!
//! A node certificate carries the node ID as its common name and the DNS name
//! `<node id>.node.shoal`, which is the server name peers dial it by, so a
//! connection reaches the node it meant to reach. The role is not trusted
//! from the certificate: authorization always consults the replicated store.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use ring::aead;
use rustls::pki_types::CertificateSigningRequestDer;
use shoal_mesh::ids::to_hex;
use shoal_mesh::{NodeId, Role};

/// Errors of the PKI.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen failed to make, parse or sign something.
    #[error("certificate error: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A sealed secret did not open (wrong key or tampered).
    #[error("cannot open a sealed secret: wrong manager key or corrupted data")]
    Unseal,
    /// A certificate is not parseable.
    #[error("malformed certificate: {0}")]
    BadCert(String),
}

/// The server name a node is dialled by.
pub fn server_name(id: NodeId) -> String {
    format!("{id}.node.shoal")
}

/// SHA-256 of `der`, lowercase hex.
pub fn fingerprint(der: &[u8]) -> String {
    to_hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

/// SHA-256 of a join secret, as the store keeps it.
pub fn secret_hash(secret: &str) -> String {
    fingerprint(secret.as_bytes())
}

/// A fresh join secret: 128 random bits as 32 hex digits.
pub fn new_secret() -> String {
    to_hex(&rand::random::<[u8; 16]>())
}

fn ca_params(name: &str) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// A new cluster CA: its certificate (DER) and key (PKCS#8 DER).
pub fn new_ca() -> Result<(Vec<u8>, Vec<u8>), PkiError> {
    let key = KeyPair::generate()?;
    let cert = ca_params("shoal cluster CA")?.self_signed(&key)?;
    Ok((cert.der().to_vec(), key.serialize_der()))
}

/// A CA made by `swarm ca --rotate`.
pub struct RotatedCa {
    /// Its certificate (DER), self-signed.
    pub cert: Vec<u8>,
    /// Its key (PKCS#8 DER).
    pub key: Vec<u8>,
    /// The same name and key signed by the old CA: a certificate under the
    /// new CA sent with it verifies under the old CA too.
    pub cross: Vec<u8>,
}

/// A new CA to replace the one with certificate `old_der` and key
/// `old_key_der`. Its name is new too (so that which CA issued a
/// certificate can be told by name).
pub fn new_rotated_ca(old_der: &[u8], old_key_der: &[u8]) -> Result<RotatedCa, PkiError> {
    let key = KeyPair::generate()?;
    let name = format!("shoal cluster CA {}", to_hex(&rand::random::<[u8; 6]>()));
    let params = ca_params(&name)?;
    let cert = params.self_signed(&key)?;
    let old_key = KeyPair::try_from(old_key_der)?;
    let old = Issuer::from_ca_cert_der(&old_der.to_vec().into(), old_key)?;
    let cross = params.signed_by(&key, &old)?;
    Ok(RotatedCa {
        cert: cert.der().to_vec(),
        key: key.serialize_der(),
        cross: cross.der().to_vec(),
    })
}

/// Whether certificate `cert_der` names CA `ca_der` as its issuer.
pub fn issued_by(cert_der: &[u8], ca_der: &[u8]) -> bool {
    let parse = |der| x509_parser::parse_x509_certificate(der).map(|(_, c)| c);
    match (parse(cert_der), parse(ca_der)) {
        (Ok(cert), Ok(ca)) => cert.issuer().as_raw() == ca.subject().as_raw(),
        _ => false,
    }
}

/// A node's fresh key (PKCS#8 DER) and a CSR for it (DER).
pub fn new_key_and_csr() -> Result<(Vec<u8>, Vec<u8>), PkiError> {
    let key = KeyPair::generate()?;
    let params = CertificateParams::new(Vec::<String>::new())?;
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_der(), csr.der().to_vec()))
}

/// Signs `csr_der` with the CA, for node `id` in `role`, valid from a
/// little earlier (clocks differ) until `validity` from now. Only the CSR's public key is
/// used; every other field comes from our own parameters.
pub fn sign_node_csr(
    ca_cert_der: &[u8],
    ca_key_der: &[u8],
    csr_der: &[u8],
    id: NodeId,
    role: Role,
    validity: std::time::Duration,
) -> Result<Vec<u8>, PkiError> {
    let ca_key = KeyPair::try_from(ca_key_der)?;
    let issuer = Issuer::from_ca_cert_der(&ca_cert_der.to_vec().into(), ca_key)?;
    let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(
        csr_der.to_vec(),
    ))?;
    let mut params = CertificateParams::new(vec![server_name(id)])?;
    params
        .distinguished_name
        .push(DnType::CommonName, id.to_string());
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, role.to_string());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let at = |t: std::time::Duration| {
        time::OffsetDateTime::from_unix_timestamp(t.as_secs() as i64)
            .map_err(|e| PkiError::BadCert(e.to_string()))
    };
    // Valid from a little earlier (clocks differ): a minute, or a quarter
    // of a short validity, so that half its life is still ahead.
    let early = std::time::Duration::from_secs(60).min(validity / 4);
    params.not_before = at(now.saturating_sub(early))?;
    params.not_after = at(now + validity)?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&csr.public_key, &issuer)?;
    Ok(cert.der().to_vec())
}

/// The node ID in a node certificate's common name.
pub fn node_id_of(cert_der: &[u8]) -> Result<NodeId, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| PkiError::BadCert(e.to_string()))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| PkiError::BadCert("no common name".into()))?;
    cn.parse()
        .map_err(|e: shoal_mesh::ids::ParseNodeIdError| PkiError::BadCert(e.to_string()))
}

/// When a certificate stops being valid, in milliseconds since the epoch.
pub fn expires_at_ms(cert_der: &[u8]) -> Result<i64, PkiError> {
    validity_ms(cert_der).map(|(_, until)| until)
}

/// A certificate's validity: from and until, in milliseconds since the epoch.
pub fn validity_ms(cert_der: &[u8]) -> Result<(i64, i64), PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| PkiError::BadCert(e.to_string()))?;
    let v = cert.validity();
    Ok((
        v.not_before.timestamp().saturating_mul(1000),
        v.not_after.timestamp().saturating_mul(1000),
    ))
}

fn aead_key(key: &[u8; 32]) -> aead::LessSafeKey {
    // A 32-byte key is always valid for ChaCha20-Poly1305.
    let unbound = aead::UnboundKey::new(&aead::CHACHA20_POLY1305, key)
        .unwrap_or_else(|_| unreachable!("32-byte ChaCha20 key"));
    aead::LessSafeKey::new(unbound)
}

/// Seals `plain` with the managers' key: nonce ‖ ciphertext ‖ tag.
pub fn seal(key: &[u8; 32], plain: &[u8]) -> Vec<u8> {
    let nonce_bytes: [u8; 12] = rand::random();
    let mut buf = plain.to_vec();
    aead_key(key)
        .seal_in_place_append_tag(
            aead::Nonce::assume_unique_for_key(nonce_bytes),
            aead::Aad::empty(),
            &mut buf,
        )
        .unwrap_or_else(|_| unreachable!("sealing into a Vec cannot fail"));
    let mut out = nonce_bytes.to_vec();
    out.extend_from_slice(&buf);
    out
}

/// Opens what [`seal`] made.
pub fn unseal(key: &[u8; 32], sealed: &[u8]) -> Result<Vec<u8>, PkiError> {
    if sealed.len() < 12 {
        return Err(PkiError::Unseal);
    }
    let (nonce, body) = sealed.split_at(12);
    let nonce = aead::Nonce::try_assume_unique_for_key(nonce).map_err(|_| PkiError::Unseal)?;
    let mut buf = body.to_vec();
    let plain = aead_key(key)
        .open_in_place(nonce, aead::Aad::empty(), &mut buf)
        .map_err(|_| PkiError::Unseal)?;
    Ok(plain.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_node_cert_names_its_node() {
        let (ca, ca_key) = new_ca().unwrap();
        let (_key, csr) = new_key_and_csr().unwrap();
        let day = std::time::Duration::from_secs(86_400);
        let cert = sign_node_csr(&ca, &ca_key, &csr, NodeId(0xabc), Role::Worker, day).unwrap();
        let (from, until) = validity_ms(&cert).unwrap();
        assert!(
            (until - from - 86_400_000 - 60_000).abs() <= 2_000,
            "{from} {until}"
        );
        assert_eq!(node_id_of(&cert).unwrap(), NodeId(0xabc));
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert).unwrap();
        let ou = parsed.subject().iter_organizational_unit().next().unwrap();
        assert_eq!(ou.as_str().unwrap(), "worker");
        assert_eq!(fingerprint(&ca).len(), 64);
    }

    #[test]
    fn sealed_secrets_open_only_with_the_right_key() {
        let key = [7u8; 32];
        let sealed = seal(&key, b"ca key");
        assert_eq!(unseal(&key, &sealed).unwrap(), b"ca key");
        assert!(unseal(&[8u8; 32], &sealed).is_err());
        assert!(unseal(&key, &sealed[..5]).is_err());
    }
}
