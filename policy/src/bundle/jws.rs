//! JSON Web Signatures (compact form) with ES256 only, and the base64 codecs they need.
//!
//! ES256 (ECDSA P-256 with SHA-256, RFC 7518 §3.4) because OPA's bundle tooling speaks it, keys and
//! signatures are small, verification is fast, and it is the curve the rest of Sluice already uses.
//! The algorithm is fixed by the verifier, never taken from the token: a header naming any other
//! algorithm (`none`, `HS256` with the public key as a secret, ...) is refused.

use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _};
use base64::{
    Engine as _, alphabet,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
};
use rustls_pki_types::{PrivatePkcs8KeyDer, SubjectPublicKeyInfoDer, pem::PemObject as _};

/// Errors of signing and verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwsError {
    /// Not three base64url parts, or not JSON where JSON belongs.
    #[error("malformed signature: {0}")]
    Malformed(&'static str),
    /// The header names another algorithm than ES256.
    #[error("signature algorithm `{0}` refused: only ES256 is accepted")]
    Algorithm(String),
    /// The signature does not verify with the key.
    #[error("signature does not verify with the configured key")]
    BadSignature,
    /// A key could not be read.
    #[error("key: {0}")]
    Key(String),
}

/// Decoding accepts padding or none (JWTs and keys in the wild differ); trailing bits must be
/// zero, so every value has one encoding.
const URL: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);
const STD: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// base64url without padding.
pub fn b64url(data: &[u8]) -> String {
    URL.encode(data)
}

/// Decodes base64url (padding tolerated).
pub fn b64url_decode(text: &str) -> Option<Vec<u8>> {
    URL.decode(text).ok()
}

/// Standard base64 with padding (PEM bodies).
pub fn b64(data: &[u8]) -> String {
    STD.encode(data)
}

/// Decodes standard base64.
pub fn b64_decode(text: &str) -> Option<Vec<u8>> {
    STD.decode(text).ok()
}

/// A PEM block.
pub fn pem(label: &str, der: &[u8]) -> String {
    let body = b64(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A key's id: `k-` and the first 16 hex digits of the SHA-256 of its SubjectPublicKeyInfo.
/// Signatures name their key by it, so a verifier holding several keys knows which one to use,
/// and nobody chooses a name that collides with another key's.
pub fn key_id(spki: &[u8]) -> String {
    format!("k-{}", &sluice_inspect::sha256_hex(spki)[..16])
}

/// The `kid` a compact JWS's header names, read without verifying anything (to pick the key).
pub fn token_kid(token: &str) -> Option<String> {
    let h = token.trim().split('.').next()?;
    let header: serde_json::Value = serde_json::from_slice(&b64url_decode(h)?).ok()?;
    header["kid"].as_str().map(str::to_owned)
}

/// A signing key (PKCS#8 P-256).
pub struct SigningKey(EcdsaKeyPair);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

impl SigningKey {
    /// A new random key: (key, PKCS#8 PEM, public key SPKI PEM).
    pub fn generate() -> Result<(Self, String, String), JwsError> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| JwsError::Key("generation failed".into()))?;
        let key = Self::from_pkcs8(doc.as_ref())?;
        let private = pem("PRIVATE KEY", doc.as_ref());
        let public = pem("PUBLIC KEY", &key.public_spki()?);
        Ok((key, private, public))
    }

    /// From PKCS#8 DER.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, JwsError> {
        EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der)
            .map(Self)
            .map_err(|e| JwsError::Key(format!("not a P-256 PKCS#8 key: {e}")))
    }

    /// From a PEM file's text.
    pub fn from_pem(text: &str) -> Result<Self, JwsError> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(text.as_bytes())
            .map_err(|e| JwsError::Key(format!("no PRIVATE KEY PEM block: {e}")))?;
        Self::from_pkcs8(der.secret_pkcs8_der())
    }

    /// The public key as SubjectPublicKeyInfo DER.
    pub fn public_spki(&self) -> Result<Vec<u8>, JwsError> {
        use aws_lc_rs::encoding::AsDer as _;
        self.0
            .public_key()
            .as_der()
            .map(|d| d.as_ref().to_vec())
            .map_err(|_| JwsError::Key("cannot encode the public key".into()))
    }

    /// This key's id ([`key_id`]).
    pub fn key_id(&self) -> Result<String, JwsError> {
        Ok(key_id(&self.public_spki()?))
    }

    /// Signs `payload` (JSON bytes) into a compact JWS with `kid`.
    pub fn sign(&self, payload: &[u8], kid: &str) -> Result<String, JwsError> {
        let header = serde_json::json!({ "alg": "ES256", "kid": kid }).to_string();
        let input = format!("{}.{}", b64url(header.as_bytes()), b64url(payload));
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let sig = self
            .0
            .sign(&rng, input.as_bytes())
            .map_err(|_| JwsError::Key("signing failed".into()))?;
        Ok(format!("{input}.{}", b64url(sig.as_ref())))
    }
}

/// A verification key: SubjectPublicKeyInfo DER of a P-256 key.
#[derive(Debug, Clone)]
pub struct VerifyingKey(Vec<u8>);

impl VerifyingKey {
    /// From a PEM file's text (`PUBLIC KEY`).
    pub fn from_pem(text: &str) -> Result<Self, JwsError> {
        let der = SubjectPublicKeyInfoDer::from_pem_slice(text.as_bytes())
            .map_err(|e| JwsError::Key(format!("no PUBLIC KEY PEM block: {e}")))?;
        Ok(Self(der.as_ref().to_vec()))
    }

    /// From SPKI DER.
    pub fn from_spki(der: Vec<u8>) -> Self {
        Self(der)
    }

    /// This key's id ([`key_id`]).
    pub fn key_id(&self) -> String {
        key_id(&self.0)
    }

    /// As PEM (`PUBLIC KEY`).
    pub fn to_pem(&self) -> String {
        pem("PUBLIC KEY", &self.0)
    }

    /// Verifies a compact JWS; returns (kid, payload bytes).
    pub fn verify(&self, token: &str) -> Result<(Option<String>, Vec<u8>), JwsError> {
        let mut parts = token.trim().split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwsError::Malformed("a compact JWS has three parts"));
        };
        let header = b64url_decode(h).ok_or(JwsError::Malformed("header is not base64url"))?;
        let header: serde_json::Value = serde_json::from_slice(&header)
            .map_err(|_| JwsError::Malformed("header is not JSON"))?;
        let alg = header["alg"].as_str().unwrap_or("").to_owned();
        if alg != "ES256" {
            return Err(JwsError::Algorithm(alg));
        }
        if header.get("crit").is_some() {
            return Err(JwsError::Malformed(
                "critical header parameters are not supported",
            ));
        }
        let sig = b64url_decode(s).ok_or(JwsError::Malformed("signature is not base64url"))?;
        let key = signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &self.0);
        key.verify(format!("{h}.{p}").as_bytes(), &sig)
            .map_err(|_| JwsError::BadSignature)?;
        let payload = b64url_decode(p).ok_or(JwsError::Malformed("payload is not base64url"))?;
        Ok((header["kid"].as_str().map(str::to_owned), payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for data in [&b""[..], b"f", b"fo", b"foo", b"foob", b"\xff\xfe\x00"] {
            assert_eq!(b64url_decode(&b64url(data)).as_deref(), Some(data));
            assert_eq!(b64_decode(&b64(data)).as_deref(), Some(data));
        }
        assert_eq!(b64(b"ab"), "YWI=");
        assert_eq!(b64url(&[0xfb, 0xff]), "-_8");
        assert!(b64url_decode("a$b").is_none());
    }

    #[test]
    fn signs_and_verifies_and_refuses_everything_else() {
        let (key, private_pem, public_pem) = SigningKey::generate().expect("key");
        let again = SigningKey::from_pem(&private_pem).expect("pem");
        let vk = VerifyingKey::from_pem(&public_pem).expect("pub");
        let token = again.sign(br#"{"a":1}"#, "k1").expect("sign");
        assert_eq!(
            vk.verify(&token).expect("verifies"),
            (Some("k1".into()), br#"{"a":1}"#.to_vec())
        );

        // Another key.
        let (_, _, other_pub) = SigningKey::generate().expect("key");
        assert_eq!(
            VerifyingKey::from_pem(&other_pub)
                .expect("pub")
                .verify(&token),
            Err(JwsError::BadSignature)
        );
        // A changed payload.
        let parts: Vec<&str> = token.split('.').collect();
        let forged = format!("{}.{}.{}", parts[0], b64url(br#"{"a":2}"#), parts[2]);
        assert_eq!(vk.verify(&forged), Err(JwsError::BadSignature));
        // alg: none, and HS256.
        for alg in ["none", "HS256"] {
            let h = b64url(format!(r#"{{"alg":"{alg}"}}"#).as_bytes());
            let t = format!("{h}.{}.", parts[1]);
            assert_eq!(vk.verify(&t), Err(JwsError::Algorithm(alg.into())));
        }
        assert!(matches!(vk.verify("a.b"), Err(JwsError::Malformed(_))));
        let _ = key;
    }
}
