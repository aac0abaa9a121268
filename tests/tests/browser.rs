//! The headless-browser harness against a real HTTPS server with its own CA (the demo app): the
//! CA is trusted only through the profile's NSS database, a form login works over DevTools,
//! screenshots have the asked size, and scripted pages run. Needs Chromium and certutil
//! (`cargo xtask setup` installs them), not root.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use sluice_e2e::{
    TempDir,
    browser::{Browser, Cdp, png_size},
    demo_app::{DEFAULT_PASSWORD, DemoApp, DemoOptions, HOST},
};

fn app() -> DemoApp {
    let app = DemoApp::start(DemoOptions::tls().unwrap()).unwrap();
    app.seed("quarterly-report.txt", &b"numbers"[..], "alice")
        .unwrap();
    app
}

fn browser(dir: &TempDir, name: &str, app: &DemoApp, trust: bool) -> Browser {
    let ca = app.ca_file().unwrap();
    let mut b = Browser::new(&dir.join(name), trust.then_some(ca.as_path())).unwrap();
    b.host_rules(&format!("MAP {HOST} {}", app.addr().ip()))
        .timeout(Duration::from_secs(60));
    b
}

#[test]
fn logs_in_through_the_form_over_devtools_and_sees_the_files() {
    let app = app();
    let dir = TempDir::new("browser-cdp");
    let b = browser(&dir, "profile", &app, true);
    let mut cdp = Cdp::launch(&b).unwrap();
    cdp.navigate(&format!("{}/files", app.base_url())).unwrap();
    // Not signed in: the app redirected to its login form.
    assert!(
        cdp.url().unwrap().ends_with("/login"),
        "{}",
        cdp.url().unwrap()
    );
    cdp.fill("input[name=user]", "alice@corp.example").unwrap();
    cdp.fill("input[name=password]", DEFAULT_PASSWORD).unwrap();
    cdp.click_and_wait_load("button[type=submit]").unwrap();
    cdp.wait_for("location.pathname === '/files'", Duration::from_secs(20))
        .unwrap();
    let table = cdp.text("table").unwrap();
    assert!(table.contains("quarterly-report.txt"), "{table}");
    assert!(
        cdp.text("body")
            .unwrap()
            .contains("Signed in as alice@corp.example")
    );
    assert_eq!(
        cdp.eval("document.querySelectorAll('tbody tr').length")
            .unwrap(),
        1
    );
    let png = dir.join("files.png");
    assert_eq!(cdp.screenshot(&png).unwrap(), (1280, 800));
    assert!(std::fs::metadata(&png).unwrap().len() > 1000);

    // A page scripted inside the app's origin: an upload built with DataTransfer, sent with the
    // session cookie (SameSite=Lax) by a real form submission.
    let dom = cdp
        .run_in_origin(
            "<form id=f method=post action=/upload enctype=multipart/form-data>\
             <input type=file name=file id=i></form><script>\
             const dt = new DataTransfer();\
             dt.items.add(new File(['hello from the browser'], 'from-browser.txt', {type: 'text/plain'}));\
             document.getElementById('i').files = dt.files;\
             document.getElementById('f').submit();</script>",
            "location.pathname === '/files' && document.readyState === 'complete' \
             && document.body.innerText.includes('from-browser.txt')",
            Duration::from_secs(20),
        )
        .unwrap();
    assert!(dom.contains("from-browser.txt"));
    let up = app
        .uploads()
        .into_iter()
        .find(|u| u.name == "from-browser.txt")
        .unwrap();
    assert_eq!(up.size, "hello from the browser".len() as u64);
    assert_eq!(up.user, "alice@corp.example");
    cdp.close().unwrap();
}

#[test]
fn an_untrusted_ca_fails_the_navigation() {
    let app = app();
    let dir = TempDir::new("browser-untrusted");
    let b = browser(&dir, "profile", &app, false);
    let mut cdp = b.cdp().unwrap();
    let err = cdp
        .navigate(&format!("{}/login", app.base_url()))
        .unwrap_err();
    assert!(format!("{err:#}").contains("ERR_CERT"), "{err:#}");
    cdp.close().unwrap();
}

#[test]
fn one_shot_runs_dump_the_dom_screenshot_and_run_pages() {
    let app = app();
    let dir = TempDir::new("browser-oneshot");
    let b = browser(&dir, "profile", &app, true);

    let dom = b.dump_dom(&format!("{}/login", app.base_url())).unwrap();
    assert!(dom.contains("name=\"password\""), "{dom}");

    let png = dir.join("login.png");
    b.screenshot(&format!("{}/login", app.base_url()), &png, 800, 600)
        .unwrap();
    assert_eq!(png_size(&png).unwrap(), (800, 600));

    // A page on file: that signs in with a form post: the final DOM is the app's file list.
    let html = format!(
        "<form id=f method=post action=\"{}/login\"><input name=user value=alice>\
         <input name=password value=\"{DEFAULT_PASSWORD}\"></form>\
         <script>document.getElementById('f').submit()</script>",
        app.base_url()
    );
    let dom = b.run_page(&html, Duration::from_secs(30)).unwrap();
    assert!(dom.contains("quarterly-report.txt"), "{dom}");

    // A page that does not navigate says when it is done.
    let dom = b
        .run_page(
            "<p id=p></p><script>setTimeout(() => { document.getElementById('p').textContent = \
             'late ' + (6 * 7); window.sluiceDone = true; }, 300)</script>",
            Duration::from_secs(30),
        )
        .unwrap();
    assert!(dom.contains("late 42"), "{dom}");
}
