//! The portal's organisation sign-in (OpenID Connect, `[portal.oidc]`) in headless Chromium,
//! against the real `sluice-collector` binary and the test identity provider
//! (`sluice_e2e::idp`), each with its own CA that the browser trusts and the collector is given:
//! a member signs in at the provider and lands on their own page, which shows their e-mail
//! address and groups, and is refused the admin pages and the query API (403); a member of the
//! admins group reaches the activity log; a wrong password at the provider starts no session, nor
//! does a cancel; a replayed callback URL is refused; every way the provider can get the id token
//! wrong (wrong audience, bad signature, wrong nonce, expired, wrong issuer, unverified e-mail,
//! `alg: none`) ends in a refusal page and no session, while the provider did issue the token;
//! and a confidential client authenticates with its secret, where a wrong secret starts no
//! session. The first runs on SQLite and on PostgreSQL (a cluster of the test's own: sign-in
//! flows and sessions live in the store). Needs the workspace binaries (`cargo build --bins`), Chromium and certutil (`cargo
//! xtask setup`), not root.

#![allow(clippy::unwrap_used)]

use std::{
    fs,
    path::PathBuf,
    process::{Command, Stdio},
};

use sluice_collector::store::cluster::LocalCluster;
use sluice_e2e::{
    TempDir,
    browser::Cdp,
    idp::{DEMO_PASSWORD, Idp, IdpUser, Misbehave},
    portal::{
        Collector, SESSION_COOKIE, browser, session, sign_in, start_collector,
        start_collector_with, wait_at,
    },
};

/// The status of `GET url` with `cookie` (curl, trusting the collector's CA).
fn status(c: &Collector, cookie: Option<&str>, url: &str) -> String {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "20",
        "--cacert",
    ])
    .arg(&c.ca);
    if let Some(v) = cookie {
        cmd.args(["-H", &format!("cookie: {SESSION_COOKIE}={v}")]);
    }
    let out = cmd.arg(url).stdin(Stdio::null()).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The portal's refusal page after a callback: its message, and no session in the browser.
fn refused(cdp: &mut Cdp, c: &Collector) -> String {
    let url = cdp.url().unwrap();
    assert!(
        url.starts_with(&format!("{}/auth/oidc/callback", c.base)),
        "{url}"
    );
    let text = cdp.text("#oidc-error").unwrap();
    assert_eq!(session(cdp, c), None, "no session after: {text}");
    // And the portal still sends the browser to the sign-in page.
    cdp.navigate(&format!("{}/events", c.base)).unwrap();
    assert!(
        cdp.url().unwrap().ends_with("/login"),
        "{}",
        cdp.url().unwrap()
    );
    text
}

fn sign_out(cdp: &mut Cdp, c: &Collector) {
    cdp.navigate(&format!("{}/me", c.base)).unwrap();
    cdp.click_and_wait_load("#sign-out").unwrap();
    assert!(cdp.url().unwrap().ends_with("/login"));
    assert_eq!(session(cdp, c), None);
}

/// With `SLUICE_OIDC_SCREENSHOTS=DIR`, saves the page as `DIR/NAME.png` (to look at the pages).
fn shot(cdp: &mut Cdp, name: &str) {
    if let Some(dir) = std::env::var_os("SLUICE_OIDC_SCREENSHOTS") {
        let dir = PathBuf::from(dir);
        fs::create_dir_all(&dir).unwrap();
        cdp.screenshot(&dir.join(format!("{name}.png"))).unwrap();
    }
}

#[test]
fn organisation_sign_in_in_a_real_browser_on_sqlite() {
    organisation_sign_in_in_a_real_browser(false);
}

#[test]
fn organisation_sign_in_in_a_real_browser_on_postgresql() {
    organisation_sign_in_in_a_real_browser(true);
}

fn organisation_sign_in_in_a_real_browser(postgres: bool) {
    let dir = TempDir::new(if postgres { "oidc-e2e-pg" } else { "oidc-e2e" });
    let pg = postgres.then(|| {
        let pg = LocalCluster::start(&dir.0.join("pg"), 5432, &[("fsync", "off")]).unwrap();
        pg.create_database("sluice").unwrap();
        pg
    });
    let store = pg
        .as_ref()
        .map(|p| format!("[store]\npostgres = {:?}\n", p.conninfo("sluice")))
        .unwrap_or_default();
    let idp = Idp::start(&dir.join("idp"), IdpUser::demo_users()).unwrap();
    let c = start_collector_with(&dir, &idp, "sluice-portal", None, &store).unwrap();
    let mut cdp = browser(&dir, &c, &idp).unwrap();

    // The sign-in page offers the organisation's sign-in.
    cdp.navigate(&format!("{}/login", c.base)).unwrap();
    assert_eq!(
        cdp.text("#oidc-sign-in").unwrap(),
        "Sign in with your organisation"
    );
    shot(&mut cdp, "login");

    // A member: their own page, with who they are.
    sign_in(&mut cdp, &c, &idp, "bob@corp.example", Some(DEMO_PASSWORD)).unwrap();
    wait_at(&mut cdp, "/me").unwrap();
    let who = cdp.text("#signed-in-as").unwrap();
    assert!(who.contains("Signed in as bob@corp.example"), "{who}");
    assert_eq!(cdp.text("#groups").unwrap().trim(), "staff");
    shot(&mut cdp, "me");
    let member = session(&mut cdp, &c).expect("a session");
    assert_eq!(cdp.eval("document.cookie").unwrap(), "", "HttpOnly");
    // Refused the admin pages, with a page saying why.
    cdp.navigate(&format!("{}/events", c.base)).unwrap();
    assert!(cdp.url().unwrap().ends_with("/events"));
    assert!(
        cdp.text("#forbidden")
            .unwrap()
            .contains("administrators only")
    );
    shot(&mut cdp, "forbidden");
    for path in [
        "/events",
        "/devices",
        "/bundles",
        "/events/evt-1",
        "/api/v1/events?q=",
        "/api/v1/events/export?q=&format=csv",
        "/api/v1/devices",
    ] {
        assert_eq!(
            status(&c, Some(&member), &format!("{}{path}", c.base)),
            "403",
            "{path}"
        );
    }
    assert_eq!(status(&c, Some(&member), &format!("{}/me", c.base)), "200");
    assert_eq!(
        status(&c, None, &format!("{}/api/v1/events?q=", c.base)),
        "401"
    );
    sign_out(&mut cdp, &c);
    assert_eq!(status(&c, Some(&member), &format!("{}/me", c.base)), "303");

    // A member of the admins group: the activity log.
    sign_in(&mut cdp, &c, &idp, "dana@corp.example", Some(DEMO_PASSWORD)).unwrap();
    wait_at(&mut cdp, "/events").unwrap();
    // The log holds the sign-ins themselves: audit events of the portal.
    let log = cdp.text("#events").unwrap();
    assert!(
        log.contains("dana@corp.example") && log.contains("portal") && log.contains("login"),
        "{log}"
    );
    let admin = session(&mut cdp, &c).expect("a session");
    assert_eq!(
        status(&c, Some(&admin), &format!("{}/devices", c.base)),
        "200"
    );
    assert_eq!(
        status(&c, Some(&admin), &format!("{}/api/v1/events?q=", c.base)),
        "200"
    );
    cdp.navigate(&format!("{}/me", c.base)).unwrap();
    assert!(cdp.text("#groups").unwrap().contains("sluice-admins"));
    sign_out(&mut cdp, &c);
    // Named by e-mail in `admins` (alice is in no admin group).
    sign_in(
        &mut cdp,
        &c,
        &idp,
        "alice@corp.example",
        Some(DEMO_PASSWORD),
    )
    .unwrap();
    wait_at(&mut cdp, "/events").unwrap();
    sign_out(&mut cdp, &c);

    // A wrong password at the provider: its form again, and no session.
    let issued = idp.tokens_issued();
    sign_in(
        &mut cdp,
        &c,
        &idp,
        "bob@corp.example",
        Some("not the password"),
    )
    .unwrap();
    assert!(cdp.url().unwrap().starts_with(idp.issuer()));
    assert!(
        cdp.text("#idp-error")
            .unwrap()
            .contains("Wrong e-mail address or password")
    );
    shot(&mut cdp, "idp-wrong-password");
    assert_eq!(session(&mut cdp, &c), None);
    assert_eq!(idp.tokens_issued(), issued);

    // Cancelled at the provider: the portal says so.
    sign_in(&mut cdp, &c, &idp, "bob@corp.example", None).unwrap();
    shot(&mut cdp, "cancelled");
    let text = refused(&mut cdp, &c);
    assert!(text.contains("access_denied"), "{text}");

    // A replayed callback URL (same code and state) is refused, in the browser that used it
    // and elsewhere.
    sign_in(&mut cdp, &c, &idp, "bob@corp.example", Some(DEMO_PASSWORD)).unwrap();
    wait_at(&mut cdp, "/me").unwrap();
    let callback = idp.redirects().last().cloned().unwrap();
    assert!(
        callback.contains("code=") && callback.contains("state="),
        "{callback}"
    );
    sign_out(&mut cdp, &c);
    cdp.navigate(&callback).unwrap();
    let text = refused(&mut cdp, &c);
    assert!(text.contains("expired or was already used"), "{text}");
    assert_eq!(status(&c, None, &callback), "400");

    // Every way of getting the id token wrong: the provider issues it, the portal refuses it.
    for (how, logged) in [
        (Misbehave::WrongAudience, "audience does not match"),
        (Misbehave::BadSignature, "signature does not verify"),
        (Misbehave::WrongNonce, "nonce"),
        (Misbehave::Expired, "token expired"),
        (Misbehave::WrongIssuer, "issuer does not match"),
        (Misbehave::UnverifiedEmail, "not verified"),
        (Misbehave::AlgNone, "algorithm `none` refused"),
    ] {
        idp.misbehave(how);
        let issued = idp.tokens_issued();
        sign_in(&mut cdp, &c, &idp, "dana@corp.example", Some(DEMO_PASSWORD)).unwrap();
        let text = refused(&mut cdp, &c);
        assert!(text.contains("could not be verified"), "{how:?}: {text}");
        assert_eq!(
            idp.tokens_issued(),
            issued + 1,
            "{how:?}: a token was issued"
        );
        let log = c.log();
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("portal OIDC sign-in refused"))
            .unwrap_or_default();
        assert!(line.contains(logged), "{how:?}: {line}");
    }
    // A well-behaved provider again: signing in works.
    idp.misbehave(Misbehave::Nothing);
    sign_in(&mut cdp, &c, &idp, "dana@corp.example", Some(DEMO_PASSWORD)).unwrap();
    wait_at(&mut cdp, "/events").unwrap();
    // No token, code or secret reached the collector's log.
    let log = c.log();
    for url in idp.redirects() {
        let code = url
            .split("code=")
            .nth(1)
            .unwrap()
            .split('&')
            .next()
            .unwrap();
        assert!(!log.contains(code), "a code in the log");
    }
    assert!(!log.contains("eyJ"), "a JWT in the log");
    cdp.close().unwrap();
}

#[test]
fn a_confidential_client_authenticates_with_its_secret() {
    let dir = TempDir::new("oidc-e2e-secret");
    let idp = Idp::start(&dir.join("idp"), IdpUser::demo_users()).unwrap();
    idp.add_client("sluice-confidential", "s3cret with spaces & symbols");
    let secret = dir.join("oidc.secret");
    fs::write(&secret, "s3cret with spaces & symbols\n").unwrap();
    let c = start_collector(&dir, &idp, "sluice-confidential", Some(&secret)).unwrap();
    let mut cdp = browser(&dir, &c, &idp).unwrap();
    sign_in(&mut cdp, &c, &idp, "dana@corp.example", Some(DEMO_PASSWORD)).unwrap();
    wait_at(&mut cdp, "/events").unwrap();
    cdp.close().unwrap();
    drop(c);

    // The same client with a wrong secret: the provider refuses the code, no session.
    let dir2 = dir.join("wrong");
    fs::create_dir_all(&dir2).unwrap();
    let wrong = dir2.join("oidc.secret");
    fs::write(&wrong, "not the secret\n").unwrap();
    let c = start_collector(&dir2, &idp, "sluice-confidential", Some(&wrong)).unwrap();
    let mut cdp = browser(&dir2, &c, &idp).unwrap();
    let issued = idp.tokens_issued();
    sign_in(&mut cdp, &c, &idp, "dana@corp.example", Some(DEMO_PASSWORD)).unwrap();
    let text = refused(&mut cdp, &c);
    assert!(text.contains("could not be verified"), "{text}");
    assert_eq!(idp.tokens_issued(), issued);
    assert!(c.log().contains("invalid_client"), "{}", c.log());
    cdp.close().unwrap();

    // A missing secret file stops the collector at start, naming the setting.
    let dir3 = dir.join("missing");
    fs::create_dir_all(&dir3).unwrap();
    let err = start_collector(&dir3, &idp, "sluice-confidential", Some(&dir3.join("nope")))
        .err()
        .unwrap();
    assert!(
        format!("{err:#}").contains("portal.oidc.client_secret_file"),
        "{err:#}"
    );
}
