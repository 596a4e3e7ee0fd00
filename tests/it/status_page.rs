//! The agents status page at `GET /` of the hub's admin API: who may see it (bearer, login
//! cookie, tenant scope), what it shows, and how it renders in headless Chromium.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::common::*;
use rna::auth::Scope;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP/1.1 response, read whole.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request through the admin API's router, without a socket, read whole.
async fn request(
    world: &World,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    use tower::ServiceExt;
    let mut req = axum::http::Request::builder()
        .method(method)
        .uri(target)
        .header("host", "hub.example:8080");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(axum::body::Body::from(body.to_string())).unwrap();
    let resp = within("admin API response", world.hub.api_router().oneshot(req))
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
        .collect();
    let body = within(
        "admin API body",
        axum::body::to_bytes(resp.into_body(), 16 << 20),
    )
    .await
    .unwrap();
    Reply {
        status,
        headers,
        body: String::from_utf8(body.to_vec()).expect("the admin API answers UTF-8"),
    }
}

/// What a browser sends with a navigation the user started (address bar, bookmark).
const DIRECT: &[(&str, &str)] = &[("Sec-Fetch-Site", "none")];

async fn get(world: &World, target: &str, headers: &[(&str, &str)]) -> Reply {
    request(world, "GET", target, headers, "").await
}

/// The `name=value` part of the reply's Set-Cookie.
fn cookie_pair(reply: &Reply) -> String {
    let set = reply.header("set-cookie").expect("a Set-Cookie header");
    set.split(';').next().unwrap().trim().to_string()
}

/// The table row of one agent in a rendered page, or `None` when the page has none.
fn row<'a>(page: &'a str, agent: &str) -> Option<&'a str> {
    let start = page.find(&format!("data-agent=\"{agent}\""))?;
    let end = page[start..].find("</tr>").expect("row end") + start;
    Some(&page[start..end])
}

/// The text of the cell with class `c-<column>` in a row, tags removed.
fn cell(row: &str, column: &str) -> String {
    let marker = format!("c-{column}");
    let at = row
        .find(&marker)
        .unwrap_or_else(|| panic!("no {marker} cell in {row}"));
    let open_end = row[at..].find('>').unwrap() + at + 1;
    let close = row[open_end..].find("</td>").unwrap() + open_end;
    let mut text = String::new();
    let mut in_tag = false;
    for c in row[open_end..close].chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.trim().to_string()
}

/// Checks the columns of one agent's row against what the hub knows about that agent.
fn check_row(page: &str, agent: &str, tenant: &str) {
    let row = row(page, agent).unwrap_or_else(|| panic!("no row for {agent} in {page}"));
    assert!(
        cell(row, "name").starts_with(&format!("{agent} #")),
        "{row}"
    );
    assert_eq!(cell(row, "tenant"), tenant);
    assert_eq!(cell(row, "version"), env!("CARGO_PKG_VERSION"));
    assert_eq!(
        cell(row, "os"),
        format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH)
    );
    assert!(cell(row, "remote").starts_with("127.0.0.1:"), "{row}");
    assert!(cell(row, "since").contains(" UTC"), "{row}");
    let heartbeat = cell(row, "heartbeat");
    let secs: f64 = heartbeat
        .strip_suffix(" s ago")
        .unwrap_or_else(|| panic!("heartbeat cell {heartbeat:?}"))
        .parse()
        .unwrap();
    assert!(secs < 4.0, "a live agent is not stale: {row}");
    assert!(!row.contains("stale"), "{row}");
    let rtt = cell(row, "rtt");
    assert!(rtt.ends_with(" ms"), "RTT measured: {rtt:?}");
    cell(row, "lost").parse::<u64>().expect("lost packets");
    assert_eq!(cell(row, "streams"), "0");
    for column in ["in", "out"] {
        let bytes = cell(row, column);
        assert!(
            ["B", "KiB", "MiB", "GiB"]
                .iter()
                .any(|u| bytes.ends_with(&format!(" {u}"))),
            "{column}: {bytes:?}"
        );
    }
}

/// Two agents in `acme/prod` and one in `globex/dev`; `db-gateway` has relayed 3 MB.
struct Scene {
    world: World,
    _agents: Vec<TestAgent>,
}

async fn scene() -> Scene {
    let world = World::start().await;
    let acme = world.agent_token("acme/prod");
    let globex = world.agent_token("globex/dev");
    let agents = vec![
        world
            .connect_agent("acme/prod", "db-gateway", &acme, 1)
            .await,
        world
            .connect_agent("acme/prod", "k8s-eu-west", &acme, 1)
            .await,
        world
            .connect_agent("globex/dev", "globex-vault", &globex, 1)
            .await,
    ];
    let dest = http_server().await;
    let mut s = socks_connect(world.socks, "db-gateway", &acme, Dest::Ip(dest))
        .await
        .expect("SOCKS connect through db-gateway");
    s.write_all(b"GET /bytes/3000000 HTTP/1.1\r\nHost: dest\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    within("3 MB through the tunnel", s.read_to_end(&mut got))
        .await
        .unwrap();
    assert!(got.len() > 3_000_000);
    drop(s);
    // Every session has measured a heartbeat round trip and closed its stream, so the page
    // shows settled numbers. The registry signals membership changes, not these counters.
    eventually("heartbeat RTTs and closed streams", || {
        let infos = world.hub.registry().infos(None);
        infos.len() == 3 && infos.iter().all(|i| i.rtt_ms > 0.0 && i.open_streams == 0)
    })
    .await;
    Scene {
        world,
        _agents: agents,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_cookie_bearer_and_tenant_scope() {
    let Scene { world, _agents } = scene().await;
    let api = &world;
    let acme_read = world.token("acme/prod", &[Scope::ReadInfraData]);
    let globex_read = world.token("globex/dev", &[Scope::ReadInfraData]);

    // No token: the login form, as HTML, with a 401.
    let r = get(api, "/", &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    assert!(
        r.body.contains("<form method=\"post\" action=\"/\""),
        "{}",
        r.body
    );
    assert!(r.body.contains("type=\"password\"") && r.body.contains("name=\"token\""));
    assert!(!r.body.contains("db-gateway"));

    // A wrong token: 401, the form again with the reason, never a trace or the agents.
    for bad in [
        "rna_000000000000_000000000000000000000000000000000000000000000000",
        "nope",
    ] {
        let r = get(api, &format!("/?token={bad}"), DIRECT).await;
        assert_eq!(r.status, 401, "{bad}");
        assert!(r.body.contains("id=\"error\""), "{}", r.body);
        assert!(r.body.contains("<form"), "{}", r.body);
        assert!(r.header("set-cookie").is_none());
        assert!(!r.body.contains("db-gateway") && !r.body.contains("panicked"));
        let r = get(api, "/", &[("Authorization", &format!("Bearer {bad}"))]).await;
        assert_eq!(r.status, 401);
        let r = get(api, "/", &[("Cookie", &format!("rna_token={bad}"))]).await;
        assert_eq!(r.status, 401);
        assert!(
            r.header("set-cookie")
                .is_some_and(|c| c.contains("Max-Age=0")),
            "a bad cookie is cleared: {:?}",
            r.headers
        );
    }

    // `?token=` opened directly logs in: 303 to `/` and a cookie the page script cannot read.
    let r = get(api, &format!("/?token={acme_read}"), DIRECT).await;
    assert_eq!(r.status, 303);
    assert_eq!(r.header("location"), Some("/"));
    let set = r.header("set-cookie").unwrap();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.split("; ").any(|a| a == attr), "{attr} in {set}");
    }
    let cookie = cookie_pair(&r);
    assert_eq!(cookie, format!("rna_token={acme_read}"));

    // The cookie shows the page: both acme agents, not globex's.
    let r = get(api, "/", &[("Cookie", &cookie)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert!(r
        .header("content-security-policy")
        .is_some_and(|c| c.contains("default-src 'none'")));
    assert!(r.body.contains("<meta http-equiv=\"refresh\""));
    assert!(
        r.body.contains("2 connections &middot; tenant acme/prod"),
        "{}",
        r.body
    );
    check_row(&r.body, "db-gateway", "acme/prod");
    check_row(&r.body, "k8s-eu-west", "acme/prod");
    assert!(!r.body.contains("globex"), "{}", r.body);
    // 3 MB came from the agent; the request went to it.
    let gateway = row(&r.body, "db-gateway").unwrap();
    assert_eq!(cell(gateway, "in"), "2.9 MiB");
    assert!(cell(gateway, "out").ends_with(" B"), "{gateway}");
    assert!(r
        .body
        .contains("<form method=\"post\" action=\"/sign-out\""));
    assert!(
        !r.body.contains("<script") && !r.body.contains("http://") && !r.body.contains("https://")
    );

    // The login form's POST does the same as `?token=`.
    let r = request(
        api,
        "POST",
        "/",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        &format!("token={acme_read}"),
    )
    .await;
    assert_eq!(r.status, 303);
    assert_eq!(cookie_pair(&r), cookie);

    // A bearer token works without a cookie.
    let r = get(
        api,
        "/",
        &[("Authorization", &format!("Bearer {acme_read}"))],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(row(&r.body, "db-gateway").is_some() && row(&r.body, "k8s-eu-west").is_some());

    // Another tenant's token sees its own agent and none of acme's, on the page and the API.
    let r = get(api, &format!("/?token={globex_read}"), DIRECT).await;
    assert_eq!(r.status, 303);
    let r = get(api, "/", &[("Cookie", &cookie_pair(&r))]).await;
    assert_eq!(r.status, 200);
    check_row(&r.body, "globex-vault", "globex/dev");
    assert!(!r.body.contains("db-gateway") && !r.body.contains("k8s-eu-west"));
    assert!(!r.body.contains("acme"), "{}", r.body);
    let r = get(
        api,
        "/api/v1/agents",
        &[("Authorization", &format!("Bearer {globex_read}"))],
    )
    .await;
    assert_eq!(r.status, 200);
    let list: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let names: Vec<&str> = list["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["globex-vault"]);

    // An admin token sees every tenant.
    let admin = world.token("ops/all", &[Scope::Admin]);
    let r = get(api, "/", &[("Authorization", &format!("Bearer {admin}"))]).await;
    assert_eq!(r.status, 200);
    assert!(r
        .body
        .contains("3 connections &middot; all tenants (admin)"));
    for agent in ["db-gateway", "k8s-eu-west", "globex-vault"] {
        assert!(row(&r.body, agent).is_some(), "{agent}");
    }

    // A valid token without read:infra:data is refused with 403, and shows nothing.
    let agent_token = world.agent_token("acme/prod");
    let r = get(api, &format!("/?token={agent_token}"), DIRECT).await;
    assert_eq!(r.status, 403);
    assert!(r.header("set-cookie").is_none());
    assert!(r.body.contains("read:infra:data") && !r.body.contains("db-gateway"));

    // Sign out (a POST from the page) clears the cookie; a revoked token's cookie stops
    // working.
    let r = request(
        api,
        "POST",
        "/sign-out",
        &[("Cookie", &cookie), ("Sec-Fetch-Site", "same-origin")],
        "",
    )
    .await;
    assert_eq!(r.status, 303);
    assert_eq!(r.header("location"), Some("/"));
    let set = r.header("set-cookie").unwrap();
    assert!(
        set.starts_with("rna_token=;") && set.contains("Max-Age=0"),
        "{set}"
    );
    world.revoke(&acme_read);
    let r = get(api, "/", &[("Cookie", &cookie)]).await;
    assert_eq!(r.status, 401);
    assert!(r.body.contains("token was revoked"), "{}", r.body);
}

/// A form request through the router: status, Set-Cookie, body.
async fn oneshot(
    world: &World,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: String,
) -> (u16, Option<String>, String) {
    let mut headers = headers.to_vec();
    if method == "POST" {
        headers.push(("content-type", "application/x-www-form-urlencoded"));
    }
    let r = request(world, method, target, &headers, &body).await;
    let cookie = r.header("set-cookie").map(str::to_string);
    (r.status, cookie, r.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_and_sign_out_refuse_other_sites() {
    let world = World::start().await;
    let read = world.token("acme/prod", &[Scope::ReadInfraData]);
    let login = format!("rna_token={read}");
    let cross = [
        ("sec-fetch-site", "cross-site"),
        ("origin", "https://evil.example"),
    ];
    // Same site is not same origin: a sibling host must not sign the user in either.
    let sibling = [
        ("sec-fetch-site", "same-site"),
        ("origin", "http://other.hub.example"),
    ];
    let old_browser_cross = [("origin", "https://evil.example")];
    let opaque = [("origin", "null")];
    let own_page = [
        ("sec-fetch-site", "same-origin"),
        ("origin", "http://hub.example:8080"),
    ];
    let old_browser_own = [("origin", "http://hub.example:8080")];
    let script: [(&str, &str); 0] = [];
    // What Set-Cookie must be: the login, cleared, or absent.
    enum Cookie {
        Login,
        Cleared,
        None,
    }
    /// Request headers, the status wanted, and the Set-Cookie wanted.
    type Case<'a> = (&'a [(&'a str, &'a str)], u16, Cookie);
    let form_cases: [Case; 7] = [
        (&cross, 403, Cookie::None),
        (&sibling, 403, Cookie::None),
        (&old_browser_cross, 403, Cookie::None),
        (&opaque, 403, Cookie::None),
        (&own_page, 303, Cookie::Login),
        (&old_browser_own, 303, Cookie::Login),
        (&script, 303, Cookie::Login),
    ];
    let link_cases: [Case; 5] = [
        (&[("sec-fetch-site", "cross-site")], 403, Cookie::None),
        (&[("sec-fetch-site", "same-site")], 403, Cookie::None),
        (&[("sec-fetch-site", "same-origin")], 403, Cookie::None),
        // Without Fetch Metadata nothing tells a link on another site from a typed URL.
        (&script, 403, Cookie::None),
        (&[("sec-fetch-site", "none")], 303, Cookie::Login),
    ];
    let sign_out_cases: [Case; 5] = [
        (&cross, 403, Cookie::None),
        (&old_browser_cross, 403, Cookie::None),
        (&opaque, 403, Cookie::None),
        (&own_page, 303, Cookie::Cleared),
        (&script, 303, Cookie::Cleared),
    ];
    let check = |what: &str, got: (u16, Option<String>, String), status: u16, cookie: &Cookie| {
        let (got_status, set_cookie, body) = got;
        assert_eq!(got_status, status, "{what}: {body}");
        match cookie {
            Cookie::Login => assert!(
                set_cookie.as_deref().is_some_and(|c| c.starts_with(&login)),
                "{what}: {set_cookie:?}"
            ),
            Cookie::Cleared => assert!(
                set_cookie
                    .as_deref()
                    .is_some_and(|c| c.starts_with("rna_token=;") && c.contains("Max-Age=0")),
                "{what}: {set_cookie:?}"
            ),
            Cookie::None => {
                assert_eq!(set_cookie, None, "{what}");
                assert!(
                    body.contains("<form"),
                    "{what}: the login form says why: {body}"
                );
            }
        }
    };
    for (headers, status, cookie) in &form_cases {
        let got = oneshot(&world, "POST", "/", headers, format!("token={read}")).await;
        check(&format!("POST / {headers:?}"), got, *status, cookie);
    }
    for (headers, status, cookie) in &link_cases {
        let got = oneshot(
            &world,
            "GET",
            &format!("/?token={read}"),
            headers,
            String::new(),
        )
        .await;
        check(&format!("GET /?token= {headers:?}"), got, *status, cookie);
    }
    for (headers, status, cookie) in &sign_out_cases {
        let mut headers = headers.to_vec();
        headers.push(("cookie", &login));
        let got = oneshot(&world, "POST", "/sign-out", &headers, String::new()).await;
        check(&format!("POST /sign-out {headers:?}"), got, *status, cookie);
    }
    // A link (or an image) cannot sign anyone out: sign-out is POST only.
    let (status, set_cookie, _) = oneshot(
        &world,
        "GET",
        "/sign-out",
        &[("sec-fetch-site", "cross-site"), ("cookie", &login)],
        String::new(),
    )
    .await;
    assert_eq!((status, set_cookie), (405, None));
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_state_says_how_to_connect_a_first_agent() {
    let world = World::start().await;
    let read = world.token("acme/prod", &[Scope::ReadInfraData]);
    let r = get(&world, "/", &[("Authorization", &format!("Bearer {read}"))]).await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("0 connections"), "{}", r.body);
    assert!(r.body.contains("No agent is connected in tenant acme/prod"));
    assert!(
        r.body.contains(&format!(
            "rna agent --hub {} --name my-agent --token-file token.txt",
            world.quic
        )),
        "{}",
        r.body
    );
    assert!(r.body.contains("--tenant acme/prod"));
    assert!(!r.body.contains("<table"));
}

/// Where test artifacts go: `$CARGO_TARGET_DIR/test-artifacts` or `target/test-artifacts`.
fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The Chromium binary (`$RNA_CHROMIUM`, or `chromium` / `chromium-browser` on the PATH).
fn chromium() -> String {
    let candidates: Vec<String> = match std::env::var("RNA_CHROMIUM") {
        Ok(path) => vec![path],
        Err(_) => vec!["chromium".into(), "chromium-browser".into()],
    };
    for c in &candidates {
        let ok = std::process::Command::new(c)
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return c.clone();
        }
    }
    panic!(
        "headless Chromium is required for the status page test but none of {candidates:?} \
         runs; install it (`apt-get install -y chromium`, as .ci/run does) or set RNA_CHROMIUM"
    );
}

/// Runs headless Chromium on `url` with `extra` flags in a fresh profile, bounded in time;
/// returns its stdout. On a timeout its whole process group is killed and the test fails.
async fn run_chromium(browser: &str, url: &str, extra: &[String]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(browser);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(extra)
    .arg(url)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true)
    .process_group(0);
    let child = cmd.spawn().expect("start chromium");
    let pid = child.id();
    match tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await {
        Ok(out) => {
            let out = out.expect("chromium output");
            assert!(
                out.status.success(),
                "chromium failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
        Err(_) => {
            // The child handle was dropped (killed); its renderer processes share its group.
            if let Some(pid) = pid {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &format!("-{pid}")])
                    .status();
            }
            panic!("chromium did not finish within 60 s on {url}");
        }
    }
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert!(
        png.len() > 24 && png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "not a PNG"
    );
    let be = |at: usize| u32::from_be_bytes([png[at], png[at + 1], png[at + 2], png[at + 3]]);
    (be(16), be(20))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_in_headless_chromium_shows_both_agents() {
    let browser = chromium();
    let Scene { world, _agents } = scene().await;
    let read = world.token("acme/prod", &[Scope::ReadInfraData]);
    // The login answers 303 with the cookie; Chromium follows it to `/` and sends it.
    let url = format!("http://{}/?token={read}", world.api);

    let dom = run_chromium(&browser, &url, &["--dump-dom".to_string()]).await;
    assert!(dom.contains("<table id=\"agents\">"), "rendered DOM: {dom}");
    assert!(!dom.contains("id=\"login\""), "{dom}");
    check_row(&dom, "db-gateway", "acme/prod");
    check_row(&dom, "k8s-eu-west", "acme/prod");
    assert_eq!(dom.matches("<tr data-session=").count(), 2, "{dom}");
    assert!(!dom.contains("globex"), "{dom}");
    let gateway = row(&dom, "db-gateway").unwrap();
    assert_eq!(cell(gateway, "in"), "2.9 MiB");

    let shot = artifacts_dir().join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    run_chromium(
        &browser,
        &url,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1400,600".to_string(),
        ],
    )
    .await;
    let png = std::fs::read(&shot).expect("chromium wrote the screenshot");
    assert_eq!(png_size(&png), (1400, 600));
    assert!(png.len() > 10_000, "a rendered page, not a blank image");
    eprintln!("status page screenshot: {}", shot.display());
    // Refresh the documentation image on request only, so test runs leave the tree clean.
    if std::env::var_os("RNA_UPDATE_DOCS_SCREENSHOT").is_some() {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/images");
        std::fs::create_dir_all(&docs).unwrap();
        std::fs::copy(&shot, docs.join("status-page.png")).unwrap();
    }
}
