//! The portal's organisation sign-in, as the identity provider's bytes reach it: a JWKS
//! document (the keys a provider publishes, filtered and parsed) and id tokens, which never
//! verify unless signed by a key of the set (the fuzzer holds none) and never panic.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use sluice_collector::{
    config::OidcConfig,
    portal::oidc::{parse_jwks, verify_id_token},
};
use sluice_policy::identity::Jwks;

static JWKS: LazyLock<Option<Jwks>> = LazyLock::new(|| {
    parse_jwks(
        br#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","alg":"ES256","use":"sig",
            "x":"GXDZnAOLruHb2RK5tvc9LHeJlp6S5LYdMAeV12901qI",
            "y":"I6VMJAhQ_k_65AM6mRAanzCYCsBOUQsiPE7v6SNwY_A"}]}"#,
    )
    .ok()
});

static CONFIG: LazyLock<Option<OidcConfig>> = LazyLock::new(|| {
    serde_json::from_str(
        r#"{"issuer":"https://idp.test","client_id":"sluice-portal",
            "redirect_url":"https://127.0.0.1:8443/auth/oidc/callback"}"#,
    )
    .ok()
});

fuzz_target!(|data: &[u8]| {
    let (Some(jwks), Some(cfg)) = (JWKS.as_ref(), CONFIG.as_ref()) else {
        panic!("the fixed key set or configuration does not parse");
    };
    let _ = parse_jwks(data);
    let token = String::from_utf8_lossy(data);
    assert!(
        verify_id_token(jwks, &token, cfg, "nonce", 1_800_000_000).is_err(),
        "an id token verified without a key's signature"
    );
});
