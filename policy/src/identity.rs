//! Who the user of an app session is, from what the app's requests carry: a header, a cookie, or a
//! claim of a JWT that is verified against the JWKS shipped in the bundle.
//!
//! A JWT claim is trusted only after the signature verifies with a key of the bundle's JWKS (by
//! `kid`), the algorithm is one the key allows (RS256 or ES256; never `none`, never an HMAC with a
//! public key as the secret), and `exp`/`nbf` (60 s leeway), `iss` and `aud` (when configured) hold.
//! Header and cookie identities are taken as they come; use them only for apps whose requests the
//! user cannot shape (for example behind a gateway that sets the header).

use std::collections::HashMap;

use aws_lc_rs::signature;
use serde::{Deserialize, Serialize};

use crate::bundle::jws::b64url_decode;

/// Where an app carries the user's identity (`identity:` of a catalogue app): exactly one of the
/// three.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySource {
    /// A request header's value.
    #[serde(default)]
    pub header: Option<String>,
    /// A cookie's value.
    #[serde(default)]
    pub cookie: Option<String>,
    /// A claim of a JWT.
    #[serde(default)]
    pub jwt: Option<JwtSource>,
}

impl IdentitySource {
    /// How many sources are set (exactly one is valid).
    pub fn count(&self) -> usize {
        usize::from(self.header.is_some())
            + usize::from(self.cookie.is_some())
            + usize::from(self.jwt.is_some())
    }
}

/// A JWT identity.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSource {
    /// Header carrying the token (`authorization` takes `Bearer <token>`); tried before the
    /// cookie when both are given.
    #[serde(default)]
    pub header: Option<String>,
    /// Cookie carrying the token.
    #[serde(default)]
    pub cookie: Option<String>,
    /// The claim naming the user (default by provider: Entra ID `upn`, then
    /// `preferred_username`, then `email`; Google and any other `email`).
    #[serde(default)]
    pub claim: Option<String>,
    /// The bundle file holding the JWKS (JSON); or `discovery`.
    #[serde(default)]
    pub jwks: String,
    /// The provider's OpenID Connect discovery document: the keys are fetched from its
    /// `jwks_uri`, cached, and fetched again when a token names a key not known yet.
    #[serde(default)]
    pub discovery: Option<String>,
    /// The identity provider, for its claims: the user and the tenant.
    #[serde(default)]
    pub provider: Option<Provider>,
    /// The claim naming the account's tenant (default by provider: Entra ID `tid`, Google
    /// `hd`); a token whose tenant is not the organisation's is a personal account.
    #[serde(default)]
    pub tenant_claim: Option<String>,
    /// Required `iss` (`{tenantid}` stands for the token's tenant, as in Entra ID's
    /// multi-tenant discovery document).
    #[serde(default)]
    pub issuer: Option<String>,
    /// Required `aud` (one of).
    #[serde(default)]
    pub audience: Option<String>,
}

/// An identity provider whose tokens Sluice reads by its documented claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Microsoft Entra ID: `upn` (or `preferred_username`), tenant `tid`.
    Entra,
    /// Google: `email`, tenant `hd` (absent for consumer accounts).
    Google,
}

impl JwtSource {
    /// The claims that name the user, tried in order.
    pub fn user_claims(&self) -> Vec<&str> {
        match (&self.claim, self.provider) {
            (Some(c), _) => vec![c.as_str()],
            (None, Some(Provider::Entra)) => vec!["upn", "preferred_username", "email"],
            (None, _) => vec!["email"],
        }
    }

    /// The claim that names the tenant, when the identity has one.
    pub fn tenant_claim(&self) -> Option<&str> {
        match (&self.tenant_claim, self.provider) {
            (Some(c), _) => Some(c.as_str()),
            (None, Some(Provider::Entra)) => Some("tid"),
            (None, Some(Provider::Google)) => Some("hd"),
            (None, None) => None,
        }
    }
}

/// Why a token was not trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a compact JWS with JSON parts.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The algorithm is not one Sluice accepts, or not the key's.
    #[error("token algorithm `{0}` refused")]
    Algorithm(String),
    /// No key with the token's `kid`.
    #[error("no key `{0}` in the JWKS")]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("token signature does not verify")]
    BadSignature,
    /// `exp` is past.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token not valid yet")]
    NotYetValid,
    /// `iss` or `aud` differ.
    #[error("token {0} does not match")]
    Claim(&'static str),
    /// The identity claim is absent or not a string.
    #[error("token has no `{0}` claim")]
    NoIdentity(String),
}

#[derive(Debug, Clone)]
enum Key {
    Ec(Vec<u8>),
    Rsa { n: Vec<u8>, e: Vec<u8> },
}

/// A JWKS: verification keys by id, and the tokens already verified with them.
#[derive(Debug, Default)]
pub struct Jwks {
    keys: HashMap<String, Key>,
    /// Verified tokens: token -> (identity, exp, nbf). A browser sends the same session token
    /// with every request; its signature is checked once, its times on every use. Bounded:
    /// emptied when full. One cache per compiled bundle (a new JWKS starts empty).
    verified: std::sync::Mutex<HashMap<String, Verified>>,
}

/// A verified token's identity, `exp`, `nbf` and tenant.
type Verified = (String, u64, Option<u64>, Option<String>);

/// Most keys in one JWKS.
const MAX_KEYS: usize = 100;
/// Most verified tokens remembered per JWKS.
const VERIFIED_CACHE: usize = 4096;
/// Clock leeway for `exp` and `nbf`, seconds.
const LEEWAY: u64 = 60;

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<RawJwk>,
}

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    kid: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
    n: Option<String>,
    e: Option<String>,
}

impl Jwks {
    /// Parses a JWKS document (EC P-256 and RSA keys; every key needs a `kid`).
    pub fn parse(json: &[u8]) -> Result<Self, String> {
        let raw: RawJwks = serde_json::from_slice(json).map_err(|e| format!("JWKS: {e}"))?;
        if raw.keys.len() > MAX_KEYS {
            return Err(format!("JWKS: more than {MAX_KEYS} keys"));
        }
        let mut keys = HashMap::new();
        for k in raw.keys {
            let kid = k.kid.ok_or("JWKS: every key needs a kid")?;
            let dec = |v: Option<String>, what: &str| {
                v.as_deref()
                    .and_then(b64url_decode)
                    .ok_or_else(|| format!("JWKS key `{kid}`: bad or missing `{what}`"))
            };
            let key = match k.kty.as_str() {
                "EC" => {
                    if k.crv.as_deref() != Some("P-256") {
                        return Err(format!("JWKS key `{kid}`: only P-256 EC keys are accepted"));
                    }
                    let (x, y) = (dec(k.x.clone(), "x")?, dec(k.y.clone(), "y")?);
                    if x.len() != 32 || y.len() != 32 {
                        return Err(format!("JWKS key `{kid}`: P-256 coordinates are 32 bytes"));
                    }
                    let mut point = vec![4u8];
                    point.extend_from_slice(&x);
                    point.extend_from_slice(&y);
                    Key::Ec(point)
                }
                "RSA" => Key::Rsa {
                    n: dec(k.n.clone(), "n")?,
                    e: dec(k.e.clone(), "e")?,
                },
                other => {
                    return Err(format!(
                        "JWKS key `{kid}`: key type `{other}` is not accepted"
                    ));
                }
            };
            if keys.insert(kid.clone(), key).is_some() {
                return Err(format!("JWKS: kid `{kid}` appears twice"));
            }
        }
        Ok(Self {
            keys,
            verified: std::sync::Mutex::default(),
        })
    }

    /// Verifies a token and returns the identity claim.
    pub fn verify(&self, token: &str, src: &JwtSource, now: u64) -> Result<String, TokenError> {
        self.verify_tenant(token, src, now).map(|(u, _)| u)
    }

    /// Verifies a token and returns the identity claim and the tenant claim (when `src` names
    /// one and the token has it).
    pub fn verify_tenant(
        &self,
        token: &str,
        src: &JwtSource,
        now: u64,
    ) -> Result<(String, Option<String>), TokenError> {
        let token = token.trim();
        let times_ok = |exp: u64, nbf: Option<u64>| -> Result<(), TokenError> {
            if exp + LEEWAY < now {
                return Err(TokenError::Expired);
            }
            if nbf.is_some_and(|nbf| nbf > now + LEEWAY) {
                return Err(TokenError::NotYetValid);
            }
            Ok(())
        };
        let cached = self
            .verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            .cloned();
        if let Some((user, exp, nbf, tenant)) = cached {
            times_ok(exp, nbf)?;
            return Ok((user, tenant));
        }
        let (user, exp, nbf, tenant) = self.verify_signed(token, src)?;
        times_ok(exp, nbf)?;
        let mut cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= VERIFIED_CACHE {
            cache.clear();
        }
        cache.insert(token.to_owned(), (user.clone(), exp, nbf, tenant.clone()));
        Ok((user, tenant))
    }

    /// Checks the signature and the claims other than the times: (identity, exp, nbf).
    fn verify_signed(&self, token: &str, src: &JwtSource) -> Result<Verified, TokenError> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed("three parts expected"));
        };
        let header: serde_json::Value = b64url_decode(h)
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(TokenError::Malformed("header"))?;
        let alg = header["alg"].as_str().unwrap_or("").to_owned();
        let kid = header["kid"].as_str().unwrap_or("").to_owned();
        let key = self.keys.get(&kid).ok_or(TokenError::UnknownKey(kid))?;
        let sig = b64url_decode(s).ok_or(TokenError::Malformed("signature"))?;
        let msg = format!("{h}.{p}");
        let ok = match (key, alg.as_str()) {
            (Key::Ec(point), "ES256") => {
                signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(msg.as_bytes(), &sig)
                    .is_ok()
            }
            (Key::Rsa { n, e }, "RS256") => signature::RsaPublicKeyComponents {
                n: n.as_slice(),
                e: e.as_slice(),
            }
            .verify(&signature::RSA_PKCS1_2048_8192_SHA256, msg.as_bytes(), &sig)
            .is_ok(),
            _ => return Err(TokenError::Algorithm(alg)),
        };
        if !ok {
            return Err(TokenError::BadSignature);
        }
        let claims: serde_json::Value = b64url_decode(p)
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(TokenError::Malformed("payload"))?;
        let exp = claims
            .get("exp")
            .and_then(serde_json::Value::as_u64)
            .ok_or(TokenError::Malformed("no exp claim"))?;
        let nbf = claims.get("nbf").and_then(serde_json::Value::as_u64);
        let tenant = src
            .tenant_claim()
            .and_then(|c| claims[c].as_str())
            .map(str::to_owned);
        if let Some(iss) = &src.issuer {
            let want = match (iss.contains("{tenantid}"), &tenant) {
                (true, Some(t)) => iss.replace("{tenantid}", t),
                (true, None) => return Err(TokenError::Claim("issuer")),
                (false, _) => iss.clone(),
            };
            if claims["iss"].as_str() != Some(want.as_str()) {
                return Err(TokenError::Claim("issuer"));
            }
        }
        if let Some(aud) = &src.audience {
            let ok = match &claims["aud"] {
                serde_json::Value::String(a) => a == aud,
                serde_json::Value::Array(list) => {
                    list.iter().any(|a| a.as_str() == Some(aud.as_str()))
                }
                _ => false,
            };
            if !ok {
                return Err(TokenError::Claim("audience"));
            }
        }
        let names = src.user_claims();
        let user = names
            .iter()
            .find_map(|c| claims[*c].as_str())
            .map(str::to_owned)
            .ok_or_else(|| TokenError::NoIdentity(names.join(" or ")))?;
        Ok((user, exp, nbf, tenant))
    }
}

/// The keys of identity providers found through their discovery documents, by document URL:
/// the agent fetches them; verification reads them and asks for a fetch when a token names a
/// key not known yet. One per process: a provider's published keys are the same whichever
/// bundle names it.
#[derive(Debug, Default)]
pub struct ProviderKeys {
    inner: std::sync::RwLock<HashMap<String, ProviderState>>,
}

#[derive(Debug, Default)]
struct ProviderState {
    jwks: Option<std::sync::Arc<Jwks>>,
    wanted: bool,
    fetches: u64,
}

/// The process's provider keys.
pub static PROVIDERS: std::sync::LazyLock<ProviderKeys> =
    std::sync::LazyLock::new(ProviderKeys::default);

/// Most providers remembered.
const MAX_PROVIDERS: usize = 256;

impl ProviderKeys {
    /// The keys fetched for `url`, if any.
    pub fn jwks(&self, url: &str) -> Option<std::sync::Arc<Jwks>> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(url)
            .and_then(|s| s.jwks.clone())
    }

    /// Asks for `url`'s keys to be fetched (again).
    pub fn want(&self, url: &str) {
        let mut m = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if m.len() >= MAX_PROVIDERS && !m.contains_key(url) {
            return;
        }
        m.entry(url.to_owned()).or_default().wanted = true;
    }

    /// Whether a fetch of `url` was asked for since the last one.
    pub fn wanted(&self, url: &str) -> bool {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(url)
            .is_none_or(|s| s.wanted || s.jwks.is_none())
    }

    /// Keeps the keys fetched for `url`.
    pub fn set(&self, url: &str, jwks: Jwks) {
        let mut m = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if m.len() >= MAX_PROVIDERS && !m.contains_key(url) {
            return;
        }
        let s = m.entry(url.to_owned()).or_default();
        s.jwks = Some(std::sync::Arc::new(jwks));
        s.wanted = false;
        s.fetches += 1;
    }

    /// How many times `url`'s keys were fetched.
    pub fn fetches(&self, url: &str) -> u64 {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(url)
            .map_or(0, |s| s.fetches)
    }
}

/// Every token the request carries where `src` says to look: each value of the header, each
/// cookie of that name (an app may read any of them: the last header, the cookie instead).
pub fn tokens_from<'a>(src: &JwtSource, headers: &'a http::HeaderMap) -> Vec<&'a str> {
    let mut out = Vec::new();
    if let Some(h) = src.header.as_deref() {
        for v in headers.get_all(h).iter().filter_map(|v| v.to_str().ok()) {
            out.push(
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
                    .unwrap_or(v)
                    .trim(),
            );
        }
    }
    if let Some(name) = src.cookie.as_deref() {
        out.extend(
            headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|c| {
                    c.trim()
                        .strip_prefix(name)
                        .and_then(|r| r.strip_prefix('='))
                }),
        );
    }
    out.truncate(16);
    out
}

/// The token a request carries for `src`: `Authorization: Bearer` or the named header/cookie.
pub fn token_from<'a>(src: &JwtSource, headers: &'a http::HeaderMap) -> Option<&'a str> {
    // The header first (API clients), then the cookie (browsers), when the app uses both.
    if let Some(v) = src
        .header
        .as_deref()
        .and_then(|h| headers.get(h))
        .and_then(|v| v.to_str().ok())
    {
        return Some(
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
                .unwrap_or(v)
                .trim(),
        );
    }
    let name = src.cookie.as_deref()?;
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            c.trim()
                .strip_prefix(name)
                .and_then(|r| r.strip_prefix('='))
        })
}

#[cfg(test)]
mod tests {
    use aws_lc_rs::{
        rand::SystemRandom,
        rsa::{KeyPair as RsaKeyPair, KeySize},
        signature::{EcdsaKeyPair, KeyPair as _},
    };

    use super::*;
    use crate::bundle::jws::b64url;

    fn src() -> JwtSource {
        JwtSource {
            header: Some("authorization".into()),
            jwks: "jwks.json".into(),
            issuer: Some("https://idp.example".into()),
            audience: Some("files".into()),
            ..JwtSource::default()
        }
    }

    fn token(
        alg: &str,
        kid: &str,
        claims: serde_json::Value,
        sign: &dyn Fn(&[u8]) -> Vec<u8>,
    ) -> String {
        let h = b64url(
            serde_json::json!({ "alg": alg, "kid": kid, "typ": "JWT" })
                .to_string()
                .as_bytes(),
        );
        let p = b64url(claims.to_string().as_bytes());
        let input = format!("{h}.{p}");
        format!("{input}.{}", b64url(&sign(input.as_bytes())))
    }

    #[test]
    fn tokens_are_trusted_only_when_everything_holds() {
        let rng = SystemRandom::new();
        let ec_doc =
            EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .expect("ec");
        let ec =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, ec_doc.as_ref())
                .expect("ec");
        let point = ec.public_key().as_ref().to_vec();
        let rsa = RsaKeyPair::generate(KeySize::Rsa2048).expect("rsa");
        let rsa_pub = rsa.public_key();
        let comps: signature::RsaPublicKeyComponents<Vec<u8>> = rsa_pub.into();
        let jwks = serde_json::json!({ "keys": [
            { "kty": "EC", "crv": "P-256", "kid": "ec1", "x": b64url(&point[1..33]), "y": b64url(&point[33..65]) },
            { "kty": "RSA", "kid": "rsa1", "n": b64url(&comps.n), "e": b64url(&comps.e) },
        ]});
        let jwks = Jwks::parse(jwks.to_string().as_bytes()).expect("jwks");
        let now = 1_800_000_000u64;
        let good = serde_json::json!({ "email": "alice@corp.example", "iss": "https://idp.example", "aud": ["files"], "exp": now + 300 });
        let ec_sign = |m: &[u8]| ec.sign(&rng, m).expect("sign").as_ref().to_vec();
        let rsa_sign = |m: &[u8]| {
            let mut sig = vec![0u8; rsa.public_modulus_len()];
            rsa.sign(&signature::RSA_PKCS1_SHA256, &rng, m, &mut sig)
                .expect("sign");
            sig
        };
        assert_eq!(
            jwks.verify(&token("ES256", "ec1", good.clone(), &ec_sign), &src(), now),
            Ok("alice@corp.example".into())
        );
        assert_eq!(
            jwks.verify(
                &token("RS256", "rsa1", good.clone(), &rsa_sign),
                &src(),
                now
            ),
            Ok("alice@corp.example".into())
        );

        let mut expired = good.clone();
        expired["exp"] = serde_json::json!(now - 3600);
        assert_eq!(
            jwks.verify(&token("ES256", "ec1", expired, &ec_sign), &src(), now),
            Err(TokenError::Expired)
        );
        // Signed by a key the JWKS does not hold under that kid.
        let other_doc =
            EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .expect("ec");
        let other = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            other_doc.as_ref(),
        )
        .expect("ec");
        let other_sign = |m: &[u8]| other.sign(&rng, m).expect("sign").as_ref().to_vec();
        assert_eq!(
            jwks.verify(
                &token("ES256", "ec1", good.clone(), &other_sign),
                &src(),
                now
            ),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            jwks.verify(&token("ES256", "nope", good.clone(), &ec_sign), &src(), now),
            Err(TokenError::UnknownKey("nope".into()))
        );
        // alg none, and an HMAC over the public key, and an algorithm that is not the key's.
        assert_eq!(
            jwks.verify(
                &token("none", "ec1", good.clone(), &|_| vec![]),
                &src(),
                now
            ),
            Err(TokenError::Algorithm("none".into()))
        );
        assert_eq!(
            jwks.verify(
                &token("HS256", "rsa1", good.clone(), &|_| vec![1; 32]),
                &src(),
                now
            ),
            Err(TokenError::Algorithm("HS256".into()))
        );
        assert_eq!(
            jwks.verify(&token("RS256", "ec1", good.clone(), &rsa_sign), &src(), now),
            Err(TokenError::Algorithm("RS256".into()))
        );
        // Issuer and audience.
        let mut iss = good.clone();
        iss["iss"] = serde_json::json!("https://evil.example");
        assert_eq!(
            jwks.verify(&token("ES256", "ec1", iss, &ec_sign), &src(), now),
            Err(TokenError::Claim("issuer"))
        );
        let mut aud = good.clone();
        aud["aud"] = serde_json::json!("mail");
        assert_eq!(
            jwks.verify(&token("ES256", "ec1", aud, &ec_sign), &src(), now),
            Err(TokenError::Claim("audience"))
        );

        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_static("Bearer abc.def.ghi"),
        );
        assert_eq!(token_from(&src(), &headers), Some("abc.def.ghi"));
        let cookie_src = JwtSource {
            header: None,
            cookie: Some("session".into()),
            ..src()
        };
        headers.insert(
            http::header::COOKIE,
            http::HeaderValue::from_static("a=1; session=tok.en.x; b=2"),
        );
        assert_eq!(token_from(&cookie_src, &headers), Some("tok.en.x"));
    }

    #[test]
    fn bad_jwks_are_refused() {
        for bad in [
            r#"{"keys":[{"kty":"EC","crv":"P-384","kid":"a","x":"AA","y":"AA"}]}"#,
            r#"{"keys":[{"kty":"oct","kid":"a","k":"AA"}]}"#,
            r#"{"keys":[{"kty":"RSA","n":"AQAB","e":"AQAB"}]}"#,
            r#"{"keys":"x"}"#,
        ] {
            assert!(Jwks::parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
