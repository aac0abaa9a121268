//! Identities from a real OpenID Connect provider (`sluice_e2e::idp`, on loopback with its own
//! CA): an app whose identity names the provider's discovery document has its tokens verified
//! against the keys found through it, Entra ID's claims read (`upn`, tenant `tid`); a key the
//! provider rotates in is taken after one fetch of its keys, and a flood of tokens naming unknown
//! keys makes no more fetches; a token of another tenant, or of none, is a personal account, and
//! the default bundle refuses its uploads (not its views). Real curl through the real proxy; no
//! root.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::json;
use sluice_e2e::{
    idp::{Idp, IdpUser},
    saas::{self, SaasRig},
    wait_until,
};
use sluice_policy::{
    bundle::jws::{b64_decode, b64url},
    identity::PROVIDERS,
    model::Action,
};

const ORG_TENANT: &str = "8f6a7c1e-1d2b-4c3d-9e8f-0a1b2c3d4e5f";
/// The tenant of personal Microsoft accounts.
const CONSUMER_TENANT: &str = "9188040d-6c67-4c5b-b112-36a304b66dad";

fn pack(issuer: &str) -> String {
    format!(
        r#"
apps:
  - id: corpdrive
    name: A drive signed in through the organisation's identity provider
    hosts: [drive.corp.test]
    identity:
      jwt:
        header: authorization
        provider: entra
        discovery: "{issuer}/.well-known/openid-configuration"
        issuer: "{issuer}"
        audience: corpdrive
    activities:
      - {{ activity: upload, method: PUT, path: "/files/*", file_name: {{ path_last: true }} }}
      - {{ activity: view, method: GET, path: "/files/*" }}
"#
    )
}

/// `token` with its header's `kid` replaced (the signature no longer matters: the key is
/// looked up first).
fn with_kid(token: &str, kid: &str) -> String {
    let mut parts = token.split('.');
    let header = parts.next().unwrap();
    let mut h: serde_json::Value = serde_json::from_slice(&b64_decode(header).unwrap()).unwrap();
    h["kid"] = json!(kid);
    let rest: Vec<&str> = parts.collect();
    format!("{}.{}", b64url(h.to_string().as_bytes()), rest.join("."))
}

#[test]
fn provider_keys_rotate_and_personal_accounts_are_told_apart() {
    let dir = sluice_e2e::TempDir::new("idp-keys");
    let idp = Idp::start(&dir.0, IdpUser::demo_users()).unwrap();
    let discovery = format!("{}/.well-known/openid-configuration", idp.issuer());
    let pack = pack(idp.issuer());
    let rig = SaasRig::start(
        "idp",
        |d| saas::policy_set(d, &[], &[("corpdrive", pack.as_str())], &[]),
        Some(idp.ca_file()),
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || PROVIDERS.fetches(&discovery)
            >= 1),
        "the provider's keys were never fetched"
    );
    let token = |upn: &str, tenant: Option<&str>| {
        let mut c = json!({"upn": upn, "aud": "corpdrive", "sub": upn, "oid": "o-1"});
        if let Some(t) = tenant {
            c["tid"] = json!(t);
        }
        idp.access_token(&c).unwrap()
    };
    let put = |token: &str, name: &str| {
        rig.via(
            "PUT",
            &format!("https://drive.corp.test/files/{name}"),
            &[format!("Authorization: Bearer {token}")],
            Some(b"quarterly notes, nothing secret"),
        )
    };
    let arrived = |name: &str| rig.origin.arrived().iter().any(|a| a.name == name);

    // The organisation's account: verified with the fetched keys, named by `upn`.
    let got = put(&token("alice@corp.example", Some(ORG_TENANT)), "org.txt");
    assert_eq!(got.status, 201, "{}", got.text());
    let e = rig.event_of(&got, "/files/org.txt");
    assert_eq!(e.user.as_deref(), Some("alice@corp.example"), "{e:#?}");
    assert!(e.identity_error.is_none(), "{e:#?}");
    assert!(!e.detail.unwrap_or_default().contains("personal"));

    // The provider rotates a key in: the first token it signs names a key not known yet (not
    // trusted, and a fetch is asked for); after one fetch it is.
    let served = idp.jwks_served();
    let fetches = PROVIDERS.fetches(&discovery);
    idp.rotate().unwrap();
    let rotated = token("alice@corp.example", Some(ORG_TENANT));
    let got = put(&rotated, "rotated-1.txt");
    let e = rig.event_of(&got, "/files/rotated-1.txt");
    assert!(e.user.is_none(), "{e:#?}");
    assert!(
        e.identity_error.as_deref().unwrap_or("").contains("no key"),
        "{e:#?}"
    );
    assert!(
        wait_until(Duration::from_secs(30), || PROVIDERS.fetches(&discovery)
            > fetches),
        "no fetch after an unknown key"
    );
    let got = put(&rotated, "rotated-2.txt");
    assert_eq!(got.status, 201, "{}", got.text());
    let e = rig.event_of(&got, "/files/rotated-2.txt");
    assert_eq!(e.user.as_deref(), Some("alice@corp.example"), "{e:#?}");
    assert_eq!(idp.jwks_served(), served + 1, "one fetch of the keys");

    // A flood of tokens naming keys that do not exist makes no fetch within the gap.
    let after = PROVIDERS.fetches(&discovery);
    for i in 0..20 {
        let got = put(&with_kid(&rotated, &format!("forged-{i}")), "forged.txt");
        let e = rig.event_of(&got, "/files/forged.txt");
        assert!(e.user.is_none(), "{e:#?}");
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        PROVIDERS.fetches(&discovery),
        after,
        "a fetch per forged token"
    );

    // A personal account (the consumer tenant), or a token naming no tenant: uploads refused
    // by the default bundle, with the reason; views are not.
    for (name, tenant) in [
        ("personal.txt", Some(CONSUMER_TENANT)),
        ("no-tenant.txt", None),
    ] {
        let t = token("bob@outlook.example", tenant);
        let got = put(&t, name);
        assert_eq!(got.status, 403, "{name}: {}", got.text());
        assert!(got.text().contains("personal account"), "{}", got.text());
        assert!(!arrived(name), "{name} reached the app");
        let e = rig.event_of(&got, "");
        assert_eq!(e.action, Action::Block, "{e:#?}");
        assert_eq!(e.policy.as_deref(), Some("block-personal-account-uploads"));
        assert_eq!(e.user.as_deref(), Some("bob@outlook.example"));
        assert!(e.detail.unwrap_or_default().contains("personal account"));
        let view = rig.via(
            "GET",
            &format!("https://drive.corp.test/files/{name}"),
            &[format!("Authorization: Bearer {t}")],
            None,
        );
        assert_ne!(view.status, 403, "{}", view.text());
    }
    assert!(arrived("org.txt") && arrived("rotated-2.txt"));
}
