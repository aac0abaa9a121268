//! The portal's audit events: every checked sign-in (local or through the organisation's
//! provider), every failure and every lockout is an event in the activity log, so it is
//! searched, exported and forwarded (syslog, webhook) like the agents' events.
//!
//! Sign-ins are OCSF Authentication (3002, `Logon`): `sluice.app` `portal`, `sluice.activity`
//! `login`, `sluice.action` `allow` or `block`, the name in `actor.user.email_addr`, the client in
//! `src_endpoint`. A lockout is OCSF Account Change (3001, `Lock`), `sluice.activity` `lockout`.

use std::net::IpAddr;

use sluice_protocol::{Actor, Device, Endpoint, Event, Sluice, User};

use crate::{
    Collector,
    store::{IngestOptions, now_ms},
};

/// OCSF class: Authentication.
pub const CLASS_AUTHENTICATION: u32 = 3002;
/// OCSF class: Account Change.
pub const CLASS_ACCOUNT_CHANGE: u32 = 3001;

/// What happened.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    /// Signed in.
    SignedIn,
    /// Refused: why, in a few words.
    Failed(&'a str),
    /// The account was locked for this many seconds after this many failures.
    Locked(u64, usize),
}

/// Records `outcome` for `who` (an account name or a provider's e-mail address) from `ip`;
/// `how` is `password` or `oidc`. A failure to record is logged: the sign-in's own answer does
/// not depend on it.
pub fn sign_in(c: &Collector, ip: Option<IpAddr>, who: &str, how: &str, outcome: Outcome<'_>) {
    let Ok(id) = super::auth::random_token() else {
        tracing::error!("no randomness for an audit event");
        return;
    };
    let (class, activity_id, activity_name, activity, action, severity) = match outcome {
        Outcome::SignedIn => (CLASS_AUTHENTICATION, 1, "Logon", "login", "allow", 1),
        Outcome::Failed(_) => (CLASS_AUTHENTICATION, 1, "Logon", "login", "block", 3),
        Outcome::Locked(..) => (CLASS_ACCOUNT_CHANGE, 9, "Lock", "lockout", "block", 4),
    };
    let mut e = Event::new(
        id,
        u64::try_from(now_ms()).unwrap_or(0),
        class,
        activity_id,
        activity_name,
        Device {
            hostname: "collector".into(),
            ..Device::default()
        },
    );
    e.class_name = match class {
        CLASS_AUTHENTICATION => "Authentication",
        _ => "Account Change",
    }
    .into();
    e.category_uid = 3;
    e.severity_id = severity;
    let from = ip.map_or_else(|| "an unknown address".to_owned(), |i| i.to_string());
    e.message = match outcome {
        Outcome::SignedIn => format!("{who} signed in to the portal ({how}) from {from}"),
        Outcome::Failed(why) => {
            format!("portal sign-in as {who} ({how}) from {from} failed: {why}")
        }
        Outcome::Locked(s, n) => {
            format!(
                "portal account {who} locked for {s} s after {n} failed sign-ins (last from {from})"
            )
        }
    };
    e.actor = Actor {
        user: Some(User {
            email_addr: who.to_owned(),
            ..User::default()
        }),
        process: None,
    };
    e.src_endpoint = ip.map(|i| Endpoint {
        ip: Some(i.to_string()),
        ..Endpoint::default()
    });
    e.sluice = Some(Sluice {
        app: "portal".into(),
        activity: activity.into(),
        action: action.into(),
        decided_by: how.into(),
        detail: match outcome {
            Outcome::SignedIn => None,
            Outcome::Failed(why) => Some(why.to_owned()),
            Outcome::Locked(s, n) => Some(format!("locked_s={s} failures={n}")),
        },
        ..Sluice::default()
    });
    let Ok(line) = serde_json::to_vec(&e) else {
        return;
    };
    let opts = IngestOptions {
        collect_new: c.forward.wants_events(),
        ..IngestOptions::default()
    };
    match c.store.ingest(&line, opts) {
        Ok(out) => c.forward.push(&out.new_events),
        Err(err) => tracing::error!(error = %err, user = who, "recording a portal sign-in"),
    }
}
