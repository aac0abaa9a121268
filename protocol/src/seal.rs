//! Sealing a protected file's passwords to the collector: what leaves the agent is readable only
//! with the collector's release key, and only together with the facts it was sealed for.
//!
//! An ECIES-style box: an ephemeral X25519 key agreement with the collector's public key,
//! HKDF-SHA256 over the shared secret (salt: both public keys) for an AES-256-GCM key, a random
//! nonce, and the binding (release id, file SHA-256, event id, device, label, template,
//! recipients, expiry) as the associated data, so a box moved to another event or release, or
//! with its recipients or expiry changed, does not open. Written on aws-lc-rs, which the agent
//! and the collector already use for TLS.
//!
//! Wire form (base64url, no padding): `key id (8) | ephemeral public key (32) | nonce (12) |
//! ciphertext and tag`.

use aws_lc_rs::{
    aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey},
    agreement::{self, EphemeralPrivateKey, PrivateKey, UnparsedPublicKey, X25519},
    hkdf,
    rand::{SecureRandom as _, SystemRandom},
};
use base64::Engine as _;

const INFO: &[u8] = b"sluice release seal v1";
/// Bytes of a key id.
pub const KEY_ID: usize = 8;
const PUBLIC: usize = 32;
const NONCE: usize = 12;

/// Why a box could not be made or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Not the wire form.
    #[error("malformed sealed box")]
    Malformed,
    /// Sealed to another key than the ones held.
    #[error("sealed to an unknown key {0}")]
    UnknownKey(String),
    /// The box does not open with this key and binding (tampered, or moved).
    #[error("the sealed box does not open (tampered with, or bound to other facts)")]
    Open,
    /// The crypto library refused.
    #[error("crypto failure")]
    Crypto,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

/// A collector release key's public half, as agents get it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealingKey {
    /// Key id (the first bytes of the public key's SHA-256).
    pub id: [u8; KEY_ID],
    /// X25519 public key.
    pub public: [u8; PUBLIC],
}

impl SealingKey {
    /// From the public key's bytes.
    pub fn from_public(public: &[u8]) -> Result<Self, SealError> {
        let public: [u8; PUBLIC] = public.try_into().map_err(|_| SealError::Malformed)?;
        Ok(Self {
            id: key_id(&public),
            public,
        })
    }

    /// The public key, base64url (how the collector publishes it).
    pub fn to_base64(&self) -> String {
        b64().encode(self.public)
    }

    /// The key id, hex.
    pub fn id_hex(&self) -> String {
        self.id.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// From [`SealingKey::to_base64`].
    pub fn from_base64(s: &str) -> Result<Self, SealError> {
        Self::from_public(&b64().decode(s.trim()).map_err(|_| SealError::Malformed)?)
    }

    /// Seals `plaintext` bound to `binding`.
    pub fn seal(&self, binding: &[u8], plaintext: &[u8]) -> Result<String, SealError> {
        let rng = SystemRandom::new();
        let eph = EphemeralPrivateKey::generate(&X25519, &rng).map_err(|_| SealError::Crypto)?;
        let eph_public = eph.compute_public_key().map_err(|_| SealError::Crypto)?;
        let eph_public: [u8; PUBLIC] = eph_public
            .as_ref()
            .try_into()
            .map_err(|_| SealError::Crypto)?;
        let peer = UnparsedPublicKey::new(&X25519, self.public);
        let key = agreement::agree_ephemeral(eph, peer, SealError::Crypto, |secret| {
            aead_key(secret, &eph_public, &self.public)
        })?;
        let mut nonce = [0u8; NONCE];
        rng.fill(&mut nonce).map_err(|_| SealError::Crypto)?;
        let mut body = plaintext.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(binding),
            &mut body,
        )
        .map_err(|_| SealError::Crypto)?;
        let mut out = Vec::with_capacity(KEY_ID + PUBLIC + NONCE + body.len());
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&eph_public);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&body);
        Ok(b64().encode(out))
    }
}

/// A collector's release key (private).
pub struct OpeningKey {
    key: PrivateKey,
    public: SealingKey,
}

impl std::fmt::Debug for OpeningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpeningKey")
            .field("id", &self.public.id_hex())
            .finish_non_exhaustive()
    }
}

impl OpeningKey {
    /// A new random key.
    pub fn generate() -> Result<Self, SealError> {
        let key = PrivateKey::generate(&X25519).map_err(|_| SealError::Crypto)?;
        Self::from_key(key)
    }

    /// From the private key's 32 bytes (as [`OpeningKey::to_bytes`] gives them).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SealError> {
        let key = PrivateKey::from_private_key(&X25519, bytes).map_err(|_| SealError::Malformed)?;
        Self::from_key(key)
    }

    fn from_key(key: PrivateKey) -> Result<Self, SealError> {
        let public = key.compute_public_key().map_err(|_| SealError::Crypto)?;
        let public = SealingKey::from_public(public.as_ref())?;
        Ok(Self { key, public })
    }

    /// The private key's bytes (kept in a 0600 file by the collector).
    pub fn to_bytes(&self) -> Result<Vec<u8>, SealError> {
        use aws_lc_rs::encoding::{AsBigEndian as _, Curve25519SeedBin};
        let seed: Curve25519SeedBin<'static> =
            self.key.as_be_bytes().map_err(|_| SealError::Crypto)?;
        Ok(seed.as_ref().to_vec())
    }

    /// The public half.
    pub fn public(&self) -> &SealingKey {
        &self.public
    }

    /// Opens a box sealed to this key with `binding`.
    pub fn open(&self, binding: &[u8], sealed: &str) -> Result<Vec<u8>, SealError> {
        let raw = b64()
            .decode(sealed.trim())
            .map_err(|_| SealError::Malformed)?;
        if raw.len() < KEY_ID + PUBLIC + NONCE + 16 {
            return Err(SealError::Malformed);
        }
        let (id, rest) = raw.split_at(KEY_ID);
        if id != self.public.id {
            return Err(SealError::UnknownKey(sealed_key_id(sealed)?));
        }
        let (eph_public, rest) = rest.split_at(PUBLIC);
        let (nonce, body) = rest.split_at(NONCE);
        let peer = UnparsedPublicKey::new(&X25519, eph_public);
        let key = agreement::agree(&self.key, peer, SealError::Open, |secret| {
            aead_key(secret, eph_public, &self.public.public)
        })?;
        let nonce: [u8; NONCE] = nonce.try_into().map_err(|_| SealError::Malformed)?;
        let mut body = body.to_vec();
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(binding),
                &mut body,
            )
            .map_err(|_| SealError::Open)?;
        Ok(plain.to_vec())
    }
}

/// The key id a box says it was sealed to, hex.
pub fn sealed_key_id(sealed: &str) -> Result<String, SealError> {
    let raw = b64()
        .decode(sealed.trim())
        .map_err(|_| SealError::Malformed)?;
    let id = raw.get(..KEY_ID).ok_or(SealError::Malformed)?;
    Ok(id.iter().map(|b| format!("{b:02x}")).collect())
}

fn key_id(public: &[u8]) -> [u8; KEY_ID] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, public);
    let mut id = [0u8; KEY_ID];
    id.copy_from_slice(&d.as_ref()[..KEY_ID]);
    id
}

fn aead_key(secret: &[u8], eph_public: &[u8], public: &[u8]) -> Result<LessSafeKey, SealError> {
    let mut salt_bytes = Vec::with_capacity(2 * PUBLIC);
    salt_bytes.extend_from_slice(eph_public);
    salt_bytes.extend_from_slice(public);
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &salt_bytes).extract(secret);
    let okm = prk
        .expand(&[INFO], &AES_256_GCM)
        .map_err(|_| SealError::Crypto)?;
    let key = UnboundKey::from(okm);
    Ok(LessSafeKey::new(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_box_opens_with_its_key_and_binding_only() {
        let key = OpeningKey::generate().unwrap_or_else(|_| unreachable!());
        let public =
            SealingKey::from_base64(&key.public().to_base64()).unwrap_or_else(|_| unreachable!());
        let sealed = public.seal(b"release-1|sha", b"secret").unwrap_or_default();
        assert_eq!(key.open(b"release-1|sha", &sealed), Ok(b"secret".to_vec()));
        assert_eq!(key.open(b"release-2|sha", &sealed), Err(SealError::Open));
        let other = OpeningKey::generate().unwrap_or_else(|_| unreachable!());
        assert!(matches!(
            other.open(b"release-1|sha", &sealed),
            Err(SealError::UnknownKey(_))
        ));
        // A flipped bit anywhere after the key id does not open.
        let raw = b64().decode(&sealed).unwrap_or_default();
        for at in [KEY_ID, KEY_ID + PUBLIC, raw.len() - 1] {
            let mut bad = raw.clone();
            bad[at] ^= 1;
            assert!(
                key.open(b"release-1|sha", &b64().encode(&bad)).is_err(),
                "byte {at}"
            );
        }
        assert_eq!(key.open(b"x", "!!"), Err(SealError::Malformed));
        // The private key round-trips through its bytes.
        let again = OpeningKey::from_bytes(&key.to_bytes().unwrap_or_default())
            .unwrap_or_else(|_| unreachable!());
        assert_eq!(
            again.open(b"release-1|sha", &sealed),
            Ok(b"secret".to_vec())
        );
        assert_eq!(again.public(), key.public());
    }
}
