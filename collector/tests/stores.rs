//! The two stores answer alike: the same events ingested into SQLite and into PostgreSQL (a
//! cluster of the test's own, from Debian's packages), then the same queries of the query
//! language give the same rows in the same order, page after page, the same counts and the same
//! buckets; ingesting again stores nothing twice on either.

#![allow(clippy::unwrap_used)]

use sluice_collector::{
    portal,
    query::{self, Compiled},
    store::{IngestOptions, Store, cluster::LocalCluster, now_ms},
};
use sluice_protocol::{
    Actor, CLASS_FILE_HOSTING, CLASS_HTTP_ACTIVITY, Device, Endpoint, Event, File, Label, Process,
    Sluice, User,
};

mod common;

const EVENTS: u64 = 3_000;
const DAY: u64 = 86_400_000;

const USERS: &[&str] = &[
    "alice@corp.example",
    "Bob@Corp.example",
    "o'brien@corp.example",
    "zoë@corp.example",
];
const FILES: &[&str] = &[
    "Q3 plan.docx",
    "report_final.pdf",
    "100%.xlsx",
    "a_b.txt",
    "Überblick.pptx",
    "notes|draft.md",
];

fn event(i: u64, now: u64) -> Event {
    let pick = |list: &[&'static str], k: u64| list[(k % list.len() as u64) as usize];
    let user = pick(USERS, i * 7 + i / 5);
    let file = pick(FILES, i * 3 + i / 7);
    let action = pick(&["allow", "block", "monitor"], i * 5 + i / 11);
    // Spread over ten days, several events in the same millisecond.
    let time = now - (i * 2_879_531 % (10 * DAY)) / 1000 * 1000 - (i % 3);
    let mut e = Event::new(
        format!("ev-{i:05}"),
        time,
        if i.is_multiple_of(4) {
            CLASS_HTTP_ACTIVITY
        } else {
            CLASS_FILE_HOSTING
        },
        2,
        "Download",
        Device {
            uid: "claimed".into(),
            hostname: format!("host-{}", i % 5),
            posture: "managed".into(),
            ..Device::default()
        },
    );
    e.message = format!("{user} {action} {file} (quarterly REPORT #{i})");
    e.actor = Actor {
        user: Some(User {
            email_addr: user.into(),
            groups: if i.is_multiple_of(3) {
                vec!["finance".into(), "eng".into()]
            } else {
                vec!["finance".into()]
            },
            guest: false,
        }),
        process: Some(Process {
            name: pick(&["curl", "firefox", "python3"], i).into(),
            path: Some(format!(
                "/usr/bin/{}",
                pick(&["curl", "firefox", "python3"], i)
            )),
            ..Process::default()
        }),
    };
    e.src_endpoint = Some(Endpoint {
        ip: Some(format!("10.0.{}.{}", i % 3, i % 9)),
        ..Endpoint::default()
    });
    let mut f = File {
        name: Some(file.into()),
        ..File::default()
    };
    if i % 4 == 1 {
        f.labels.push(Label {
            guid: "4f1c0a5e-0000-4000-8000-00000000c0f1".into(),
            id: Some("confidential".into()),
            name: Some("Confidential".into()),
            ..Label::default()
        });
    }
    e.files.push(f);
    e.http_request = None;
    e.sluice = Some(Sluice {
        app: pick(&["files", "mail", "chat"], i / 2).into(),
        activity: pick(&["download", "upload", "view"], i / 3).into(),
        action: action.into(),
        policy: (action == "block").then(|| format!("block-{}", pick(&["uploads", "guests"], i))),
        decided_by: "session".into(),
        incident: "i".into(),
        ..Sluice::default()
    });
    e
}

/// Every id matching `q`, newest first, page by page.
fn ids(store: &Store, q: &Compiled) -> Vec<String> {
    let mut out = Vec::new();
    store
        .for_each_page(q, 97, |page| {
            out.extend(page.iter().map(|e| e.id.clone()));
            true
        })
        .unwrap();
    out
}

#[test]
fn the_same_queries_give_the_same_rows_on_both_stores() {
    let dir = std::env::temp_dir().join(format!("sluice-stores-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut pg = common::cluster(&dir.join("pg"));
    let lite = Store::open_with(&dir.join("c.db"), portal::MIGRATIONS).unwrap();
    let post = Store::open_postgres(&pg.conninfo("sluice"), 4, 90, portal::MIGRATIONS).unwrap();

    let now = now_ms() as u64;
    let events: Vec<Event> = (0..EVENTS).map(|i| event(i, now)).collect();
    // One receive time for both stores, so their rows are the same.
    let received = now_ms();
    for store in [&lite, &post] {
        for (k, chunk) in events.chunks(500).enumerate() {
            let body: String = chunk
                .iter()
                .map(|e| serde_json::to_string(e).unwrap() + "\n")
                .collect();
            // The events name five hosts and are a week old at most: held to the agent's
            // identity, their device id and host name are replaced (and flagged) alike on
            // both stores.
            let agent = sluice_collector::store::AgentBinding {
                id: format!("ag_{}", k % 3),
                hostname: format!("host-{}", k % 5),
                now: received,
                max_future_ms: 600_000,
                max_past_ms: 30 * 86_400_000,
            };
            let opts = IngestOptions {
                agent: Some(&agent),
                ..IngestOptions::default()
            };
            let r = store.ingest(body.as_bytes(), opts).unwrap();
            assert_eq!((r.accepted, r.duplicates, r.rejected), (500, 0, 0));
            // Sent again: nothing stored twice.
            let r = store.ingest(body.as_bytes(), opts).unwrap();
            assert_eq!((r.accepted, r.duplicates), (0, 500));
        }
    }

    let at = |days: u64| (now - days * DAY).to_string();
    let queries = [
        String::new(),
        "user:alice@corp.example".into(),
        "user:BOB@corp.example".into(),
        "user:o'brien@corp.example".into(),
        "user:zoë@corp.example".into(),
        "-action:allow".into(),
        "action:block,monitor".into(),
        "app:files action:block".into(),
        "group:finance".into(),
        "group:eng".into(),
        "-group:eng".into(),
        "file:*.docx".into(),
        "file:\"Q3 plan*\"".into(),
        "file:100%*".into(),
        "file:a_b.txt".into(),
        "file:A_B.TXT".into(),
        "file:\"notes|draft.md\"".into(),
        "label:confidential".into(),
        "label:CONFIDENTIAL".into(),
        "-label:confidential class:file".into(),
        "report".into(),
        "REPORT #12".into(),
        "\"quarterly report\"".into(),
        "o'brien".into(),
        "Überblick".into(),
        "100%".into(),
        "ip:10.0.1.4".into(),
        "process:curl".into(),
        "process:/usr/bin/python3".into(),
        "class:http".into(),
        "device:ag_2".into(),
        "device:host-3".into(),
        "policy:block-*".into(),
        "activity:upload,view".into(),
        "since:3d".into(),
        format!("after:{} before:{}", at(6), at(2)),
        format!("before:{} -user:alice@corp.example", at(5)),
        "nothing-matches-this".into(),
    ];
    let mut nonempty = 0;
    for text in &queries {
        let q = query::parse_at(text, now as i64).unwrap().compile();
        let a = ids(&lite, &q);
        let b = ids(&post, &q);
        assert_eq!(
            a.len(),
            b.len(),
            "{text:?}: {} vs {} rows",
            a.len(),
            b.len()
        );
        assert_eq!(a, b, "{text:?}: the rows differ");
        assert_eq!(lite.count(&q).unwrap(), a.len() as u64, "{text:?}");
        assert_eq!(post.count(&q).unwrap(), a.len() as u64, "{text:?}");
        let from = (now - 11 * DAY) as i64;
        let sa = lite.stats(&q, DAY as i64, from, now as i64 + 1).unwrap();
        let sb = post.stats(&q, DAY as i64, from, now as i64 + 1).unwrap();
        assert_eq!(
            format!("{sa:?}"),
            format!("{sb:?}"),
            "{text:?}: the buckets differ"
        );
        if a.is_empty() {
            println!("no rows: {text:?}");
        } else {
            nonempty += 1;
        }
    }
    // The queries select something (all but the last), and not everything.
    assert_eq!(nonempty, queries.len() - 1);
    let all = ids(&lite, &Compiled::all());
    assert_eq!(all.len() as u64, EVENTS);

    // One event by id, with and without its time; the device inventory.
    let e = &events[1234];
    let mut found = Vec::new();
    for store in [&lite, &post] {
        let by_id = store.get_event("ev-01234").unwrap().unwrap();
        let by_time = store
            .get_event_at("ev-01234", Some(e.time as i64))
            .unwrap()
            .unwrap();
        assert_eq!(by_id.json, by_time.json);
        assert!(store.get_event("ev-99999").unwrap().is_none());
        found.push(by_id.json);
    }
    assert_eq!(found[0], found[1]);
    let stored: Event = serde_json::from_str(&found[0]).unwrap();
    assert_eq!(stored.id, e.id);
    assert_eq!(stored.message, e.message);
    let da: Vec<String> = lite
        .devices()
        .unwrap()
        .iter()
        .map(|d| d.uid.clone())
        .collect();
    let db: Vec<String> = post
        .devices()
        .unwrap()
        .iter()
        .map(|d| d.uid.clone())
        .collect();
    let (mut da, mut db) = (da, db);
    da.sort();
    db.sort();
    assert_eq!(da, vec!["ag_0", "ag_1", "ag_2"]);
    assert_eq!(da, db);

    drop(post);
    pg.stop();
    drop(lite);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A store written before events were made compact (`0001_core` only, each event's JSON in its
/// row) opens with every event moved into the compact table: the same events, found by the same
/// queries, their times of receipt kept, the former table gone. On both stores.
#[test]
fn events_stored_before_the_compact_table_are_moved_into_it() {
    const N: u64 = 1_200;
    let dir = std::env::temp_dir().join(format!("sluice-stores-v1-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut pg = common::cluster(&dir.join("pg"));
    let now = now_ms() as u64;
    let events: Vec<Event> = (0..N).map(|i| event(i, now)).collect();
    let v1 = |e: &Event| serde_json::to_vec(e).unwrap();
    {
        let c = rusqlite::Connection::open(dir.join("old.db")).unwrap();
        c.execute_batch(
            "CREATE TABLE migrations(name TEXT PRIMARY KEY, applied_at INTEGER NOT NULL)",
        )
        .unwrap();
        c.execute_batch(sluice_collector::store::MIGRATIONS[0].1)
            .unwrap();
        c.execute("INSERT INTO migrations VALUES ('0001_core', 0)", [])
            .unwrap();
        for (i, e) in events.iter().enumerate() {
            c.execute(
                "INSERT INTO events(id, time, received, class_uid, json) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                rusqlite::params![e.id, e.time as i64, 1000 + i as i64, e.class_uid, v1(e)],
            )
            .unwrap();
        }
    }
    {
        let mut c = postgres::Client::connect(&pg.conninfo("sluice"), postgres::NoTls).unwrap();
        c.batch_execute(
            "CREATE TABLE migrations(name TEXT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .unwrap();
        c.batch_execute(sluice_collector::store::pg::CORE_SCHEMA)
            .unwrap();
        c.execute("INSERT INTO migrations VALUES ('0001_core', 0)", &[])
            .unwrap();
        for (i, e) in events.iter().enumerate() {
            c.execute(
                "INSERT INTO events(id, time, received, class_uid, json) \
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    &e.id,
                    &(e.time as i64),
                    &(1000 + i as i64),
                    &i64::from(e.class_uid),
                    &v1(e),
                ],
            )
            .unwrap();
        }
    }
    let lite = Store::open(&dir.join("old.db")).unwrap();
    let post = Store::open_postgres(&pg.conninfo("sluice"), 4, 90, &[]).unwrap();
    let alice = events
        .iter()
        .filter(|e| e.actor.user.as_ref().unwrap().email_addr == "alice@corp.example")
        .count();
    assert!(alice > 0);
    for store in [&lite, &post] {
        assert_eq!(ids(store, &Compiled::all()).len() as u64, N);
        let q = query::parse("user:alice@corp.example").unwrap().compile();
        assert_eq!(ids(store, &q).len(), alice);
        // Byte for byte the JSON that was stored.
        let got = store.get_event("ev-00042").unwrap().unwrap();
        assert_eq!(got.json.as_bytes(), v1(&events[42]).as_slice());
        let (lo, hi, left) = store
            .with_read(|c| {
                let left = if c.is_pg() {
                    "SELECT count(*) FROM pg_class WHERE relname LIKE '%events_v1%' \
                     OR relname LIKE 'v1_events%'"
                } else {
                    "SELECT count(*) FROM sqlite_schema WHERE name = 'events_v1'"
                };
                let left: i64 = c.query_row(left, sluice_collector::args![], |r| r.get(0))?;
                c.query_row(
                    "SELECT min(received), max(received) FROM events",
                    sluice_collector::args![],
                    |r| Ok((r.get::<i64>(0)?, r.get::<i64>(1)?, left)),
                )
            })
            .unwrap();
        assert_eq!((lo, hi, left), (1000, 1000 + N as i64 - 1, 0));
    }
    drop(post);
    pg.stop();
    drop(lite);
    let _ = std::fs::remove_dir_all(&dir);
}

/// TLS to the database: the server's certificate is verified against `[store] ca_file` and the
/// host name; a CA that did not sign it, or a name it does not carry, is refused; the session is
/// encrypted (the server says so).
#[test]
fn postgres_over_tls_verifies_the_server() {
    let dir = std::env::temp_dir().join(format!("sluice-stores-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test database CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let ca_file = dir.join("db-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let other = dir.join("other-ca.pem");
    let other_key = rcgen::KeyPair::generate().unwrap();
    let mut other_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    other_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&other, other_params.self_signed(&other_key).unwrap().pem()).unwrap();

    let mut pg =
        LocalCluster::start_tls(&dir.join("pg"), &cert.pem(), &key.serialize_pem()).unwrap();
    pg.create_database("sluice").unwrap();
    let open = |host: &str, extra: &str, ca: Option<&std::path::Path>| {
        Store::open_postgres_with(&pg.tcp_conninfo(host, "sluice", extra), 2, 90, ca, &[])
    };

    // Verified against the right CA: the session is encrypted.
    let store = open("localhost", "sslmode=require", Some(&ca_file)).unwrap();
    let ssl: i64 = store
        .with_read(|c| {
            c.query_row(
                "SELECT count(*) FROM pg_stat_ssl WHERE pid = pg_backend_pid() AND ssl",
                sluice_collector::args![],
                |r| r.get(0),
            )
        })
        .unwrap();
    assert_eq!(ssl, 1);
    drop(store);
    // Without sslmode (loopback: `prefer`), TLS is still taken and verified.
    assert!(open("localhost", "", Some(&ca_file)).is_ok());
    // Another CA, or the system's roots: refused.
    for ca in [Some(other.as_path()), None] {
        let e = open("localhost", "sslmode=require", ca)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("certificate") || e.contains("UnknownIssuer"),
            "{e}"
        );
    }
    // A name the certificate does not carry: refused.
    let e = open("127.0.0.1", "sslmode=require", Some(&ca_file))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("certificate") || e.contains("NotValidForName"),
        "{e}"
    );
    pg.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
