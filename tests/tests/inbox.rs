//! The reviewers' web inbox in real browsers (Debian's Chromium through
//! chromedriver, Debian's Firefox ESR through geckodriver), driven over
//! WebDriver against a real agent holding a real psql's DROP TABLE. The
//! browser runs in the lab's server namespace, where the agent's API
//! listens on loopback. Screenshots of the inbox, a request page, the audit
//! page and the phone-width inbox go to `target/ui-screenshots/` in every
//! run, one set per browser.
use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use fantoccini::{Client, ClientBuilder, Locator};
use qgate_e2e::{finish, in_netns, require_root, Lab};
use serde_json::json;

#[derive(Clone, Copy, Debug)]
enum Browser {
    Chromium,
    Firefox,
}

impl Browser {
    fn name(self) -> &'static str {
        match self {
            Browser::Chromium => "chromium",
            Browser::Firefox => "firefox",
        }
    }

    fn driver_port(self) -> u16 {
        match self {
            Browser::Chromium => 9515,
            Browser::Firefox => 4444,
        }
    }

    /// The driver's command line.
    fn driver(self) -> (String, Vec<String>) {
        match self {
            Browser::Chromium => (
                "chromedriver".into(),
                vec![format!("--port={}", self.driver_port())],
            ),
            Browser::Firefox => (
                geckodriver(),
                vec![
                    "--port".into(),
                    self.driver_port().to_string(),
                    "--binary".into(),
                    "/usr/bin/firefox-esr".into(),
                ],
            ),
        }
    }

    fn capabilities(self, profile: &std::path::Path) -> serde_json::Map<String, serde_json::Value> {
        let mut caps = serde_json::Map::new();
        match self {
            Browser::Chromium => {
                caps.insert(
                    "goog:chromeOptions".into(),
                    json!({
                        "binary": "/usr/bin/chromium",
                        "args": [
                            "--headless=new", "--no-sandbox", "--disable-gpu",
                            "--disable-dev-shm-usage", "--window-size=1280,900",
                            format!("--user-data-dir={}", profile.display()),
                        ]
                    }),
                );
            }
            Browser::Firefox => {
                caps.insert("browserName".into(), json!("firefox"));
                caps.insert(
                    "moz:firefoxOptions".into(),
                    json!({ "args": ["-headless", "-width", "1280", "-height", "900"] }),
                );
            }
        }
        caps
    }
}

/// geckodriver as `cargo xtask test` installs it (cargo install).
fn geckodriver() -> String {
    let home = std::env::var("CARGO_HOME")
        .unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap_or_default()));
    let installed = format!("{home}/bin/geckodriver");
    if std::path::Path::new(&installed).exists() {
        installed
    } else {
        "geckodriver".into()
    }
}

fn screenshots() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/ui-screenshots"
    ))
}

/// The browser's WebDriver in the server namespace; killed when dropped.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_driver(lab: &Lab, browser: Browser) -> Result<Driver> {
    let (program, args) = browser.driver();
    // A driver a killed run left behind would hold the port.
    let _ = Command::new("pkill")
        .args(["-f", &format!("{} {}", program, args.join(" "))])
        .status();
    let child = lab
        .in_server(&program)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    Ok(Driver(child))
}

/// What the browser part needs from the lab, owned (it runs on a thread of
/// its own, inside the server namespace).
struct Scene {
    browser: Browser,
    base: String,
    rita: String,
    pat: String,
    profile: PathBuf,
    /// psql in the client namespace running the held DROP.
    drop_table: Command,
}

#[test]
fn a_held_drop_appears_live_and_is_approved_in_chromium() -> Result<()> {
    held_drop_in(Browser::Chromium)
}

#[test]
fn a_held_drop_appears_live_and_is_approved_in_firefox() -> Result<()> {
    held_drop_in(Browser::Firefox)
}

fn held_drop_in(browser: Browser) -> Result<()> {
    require_root();
    let mut lab = Lab::new(&format!("inbox{}", &browser.name()[..2]))?;
    lab.start_postgres()?;
    lab.sql("CREATE TABLE ledger_entries (id int)")?;
    lab.start_agent(&[])?;
    let rita = lab.add_reviewer("rita", "reviewers", Some(""))?;
    // pat is the database user postgres: never approves its statements.
    let pat = lab.add_reviewer("pat", "reviewers", Some("postgres"))?;
    let _driver = start_driver(&lab, browser)?;
    let mut drop_table = lab.in_client("psql");
    drop_table
        .env("PGSSLMODE", "disable")
        .args([
            "-h",
            &lab.server_ip.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .args(["-At", "-c", "DROP TABLE ledger_entries"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    std::fs::create_dir_all(screenshots())?;
    let scene = Scene {
        browser,
        base: format!("http://127.0.0.1:{}", lab.api_port()),
        rita,
        pat,
        profile: lab.dir.join("browser-profile"),
        drop_table,
    };
    let server_ns = lab.server_ns.clone();
    let psql = in_netns(&server_ns, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(browse(scene))
    })?;
    let (ok, out, err) = finish(psql, Duration::from_secs(10))?;
    assert!(ok, "psql's DROP ran once approved: {out} {err}");
    assert_eq!(
        lab.sql("SELECT count(*) FROM pg_tables WHERE tablename = 'ledger_entries'")?,
        "0"
    );
    Ok(())
}

async fn connect(browser: Browser, profile: &std::path::Path) -> Result<Client> {
    let caps = browser.capabilities(profile);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match ClientBuilder::new(connector)
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{}", browser.driver_port()))
            .await
        {
            Ok(client) => return Ok(client),
            Err(e) if Instant::now() > deadline => bail!("{}'s WebDriver: {e}", browser.name()),
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

async fn shot(c: &Client, browser: Browser, name: &str) -> Result<()> {
    let png = c.screenshot().await?;
    std::fs::write(
        screenshots().join(format!("{}-{name}", browser.name())),
        png,
    )?;
    Ok(())
}

async fn sign_in(c: &Client, base: &str, token: &str) -> Result<()> {
    c.goto(&format!("{base}/ui/")).await?;
    let input = c
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css("#token"))
        .await?;
    input.send_keys(token).await?;
    c.find(Locator::Css("#login button[type=submit]"))
        .await?
        .click()
        .await?;
    c.wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css("#pending"))
        .await?;
    Ok(())
}

async fn sign_out(c: &Client) -> Result<()> {
    c.find(Locator::Css("#logout")).await?.click().await?;
    c.wait()
        .at_most(Duration::from_secs(5))
        .for_element(Locator::Css("#token"))
        .await?;
    Ok(())
}

/// Polls `f` until it yields, for up to `secs`.
async fn until<T, F, Fut>(what: &str, secs: u64, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The element was replaced in the page since it was found.
fn is_stale(e: &fantoccini::error::CmdError) -> bool {
    e.to_string().contains("stale element")
}

/// Runs `step` on the card of request `id`, found afresh, and again on a
/// new one when the page re-rendered the card under it: the inbox lists
/// the requests once at sign-in and again once its event stream opens.
async fn on_card<T, F, Fut>(c: &Client, id: &str, mut step: F) -> Result<T>
where
    F: FnMut(fantoccini::elements::Element) -> Fut,
    Fut: std::future::Future<Output = Result<T, fantoccini::error::CmdError>>,
{
    let mut attempt = 0;
    loop {
        let card = c
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css(&format!("#request-{id}")))
            .await?;
        match step(card).await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < 5 && is_stale(&e) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The text of the element `css` finds, found afresh when the page
/// re-rendered it between the find and the read (the inbox renders once at
/// sign-in and again when its event stream opens).
async fn text_of(c: &Client, css: &str) -> Result<String> {
    let mut attempt = 0;
    loop {
        let read = async { c.find(Locator::Css(css)).await?.text().await };
        match read.await {
            Ok(text) => return Ok(text),
            Err(e) if attempt < 5 && is_stale(&e) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn browse(mut scene: Scene) -> Result<Child> {
    let c = connect(scene.browser, &scene.profile).await?;
    let result = steps(&c, &mut scene).await;
    let _ = c.close().await;
    result
}

async fn steps(c: &Client, scene: &mut Scene) -> Result<Child> {
    sign_in(c, &scene.base, &scene.rita).await?;
    let empty = text_of(c, "#pending").await?;
    assert!(empty.contains("Nothing is waiting"), "{empty}");
    let token_in_url = c.current_url().await?.to_string().contains(&scene.rita);
    assert!(!token_in_url, "the token never goes into a URL");

    // Held by the agent: the card appears in the open page, no reload.
    let psql = scene.drop_table.spawn().context("psql")?;
    let (text, id) = until("the held DROP in the inbox", 20, || async {
        let Some(card) = c
            .find_all(Locator::Css("article.request[data-status=pending]"))
            .await?
            .into_iter()
            .next()
        else {
            return Ok(None);
        };
        // Re-rendered under us (see `on_card`): the next poll reads the new one.
        let read = async {
            Ok::<_, fantoccini::error::CmdError>((card.text().await?, card.attr("data-id").await?))
        };
        match read.await {
            Ok((text, Some(id))) => Ok(Some((text, id))),
            Ok((_, None)) => bail!("a request card without data-id"),
            Err(e) if is_stale(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    })
    .await?;
    assert!(text.contains("DROP TABLE ledger_entries"), "{text}");
    assert!(text.contains("PENDING"), "status in words: {text}");
    assert!(text.contains("postgres"), "the database user: {text}");
    assert!(text.contains("TCP (plaintext)"), "the transport: {text}");
    assert!(
        text.contains("PostgreSQL at "),
        "the server and protocol: {text}"
    );
    assert!(text.contains("expires in"), "{text}");
    shot(c, scene.browser, "inbox.png").await?;

    // pat is the database user who sent it: the page says why not.
    sign_out(c).await?;
    sign_in(c, &scene.base, &scene.pat).await?;
    let (enabled, why) = on_card(c, &id, |card| async move {
        let approve = card.find(Locator::Css("button.approve")).await?;
        let enabled = approve.is_enabled().await?;
        let why = card.find(Locator::Css(".why-not")).await?.text().await?;
        Ok((enabled, why))
    })
    .await?;
    assert!(!enabled, "pat cannot approve");
    assert!(why.contains("which is you"), "{why}");
    shot(c, scene.browser, "self-approval.png").await?;
    sign_out(c).await?;

    // rita approves with a comment; the card shows who decided.
    sign_in(c, &scene.base, &scene.rita).await?;
    // By keyboard: the comment, Tab to Approve, Enter. Half-way through,
    // the inbox renders again (as when another request arrives or its event
    // stream reconnects): what rita typed and her cursor stay.
    on_card(c, &id, |card| async move {
        let comment = card.find(Locator::Css("textarea")).await?;
        comment.click().await?;
        comment.clear().await?;
        comment.send_keys("checked with").await
    })
    .await?;
    c.execute(
        "window.dispatchEvent(new HashChangeEvent('hashchange'));",
        vec![],
    )
    .await?;
    let (draft, focus) = on_card(c, &id, |card| async move {
        let draft = card
            .find(Locator::Css("textarea"))
            .await?
            .prop("value")
            .await?;
        let focus = c
            .execute("return document.activeElement.id;", vec![])
            .await?;
        Ok((draft, focus))
    })
    .await?;
    assert_eq!(
        draft.as_deref(),
        Some("checked with"),
        "the draft survives a re-render"
    );
    assert_eq!(
        focus,
        serde_json::json!(format!("comment-{id}")),
        "so does the focus"
    );
    c.active_element()
        .await?
        .send_keys(" the ledger team")
        .await?;
    let focused = on_card(c, &id, |card| async move {
        let comment = card.find(Locator::Css("textarea")).await?;
        comment.send_keys("\u{E004}").await?;
        c.execute("return document.activeElement.className;", vec![])
            .await
    })
    .await?;
    assert_eq!(focused, "approve", "Tab from the comment reaches Approve");
    c.active_element().await?.send_keys("\u{E007}").await?;
    let decided = until("the decision on the card", 15, || async {
        let cards = c
            .find_all(Locator::Css(&format!(
                "#request-{id}[data-status=approved]"
            )))
            .await?;
        match cards.into_iter().next() {
            // The inbox re-renders a card when its request changes: one
            // found just before a re-render is gone by the time it is
            // read, and the next poll finds the new one.
            Some(card) => match card.text().await {
                Ok(text) => Ok(Some(text)),
                Err(e) if is_stale(&e) => Ok(None),
                Err(e) => Err(e.into()),
            },
            None => Ok(None),
        }
    })
    .await?;
    assert!(decided.contains("APPROVED"), "{decided}");
    assert!(decided.contains("Approved by rita"), "{decided}");
    assert!(
        decided.contains("checked with the ledger team"),
        "{decided}"
    );

    // The request's own page.
    c.goto(&format!("{}/ui/#/requests/{id}", scene.base))
        .await?;
    let page = until("the request page", 10, || async {
        let text = text_of(c, "main").await?;
        Ok(text.contains("Approved by rita").then_some(text))
    })
    .await?;
    assert!(page.contains("DROP TABLE ledger_entries"), "{page}");
    shot(c, scene.browser, "request.png").await?;

    // The audit page finds it by table and by decision; the chain verifies.
    c.goto(&format!("{}/ui/#/audit", scene.base)).await?;
    let verify = until("the chain's verification", 15, || async {
        let text = text_of(c, "#verify").await?;
        Ok((!text.starts_with("Checking")).then_some(text))
    })
    .await?;
    assert!(verify.contains("intact"), "{verify}");
    let search = |table: &'static str, decision: &'static str| async move {
        let table_input = c.find(Locator::Css("#f-table")).await?;
        table_input.clear().await?;
        table_input.send_keys(table).await?;
        c.find(Locator::Css("#f-decision"))
            .await?
            .select_by_value(decision)
            .await?;
        c.find(Locator::Css("#search button[type=submit]"))
            .await?
            .click()
            .await?;
        until("search results", 10, || async {
            let text = text_of(c, "#results").await?;
            Ok((!text.contains("Searching")).then_some(text))
        })
        .await
    };
    // A decision reaches the statement's row with the store's next batch.
    let found = until("the DROP found by table and decision", 20, || async {
        let text = search("ledger_entries", "approved").await?;
        Ok(text.contains("DROP TABLE ledger_entries").then_some(text))
    })
    .await?;
    assert!(
        found.contains(&format!("#{id}")),
        "links its request: {found}"
    );
    shot(c, scene.browser, "audit.png").await?;
    let none = search("ledger_entries", "deny").await?;
    assert!(none.contains("No statement matches"), "{none}");

    // A phone's width: nothing runs off the side.
    c.goto(&format!("{}/ui/#/inbox", scene.base)).await?;
    c.set_window_size(390, 844).await?;
    c.wait()
        .at_most(Duration::from_secs(5))
        .for_element(Locator::Css("#pending"))
        .await?;
    let overflow = c
        .execute(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth;",
            vec![],
        )
        .await?;
    assert!(
        overflow.as_i64().unwrap_or(1) <= 0,
        "horizontal overflow at phone width: {overflow}"
    );
    shot(c, scene.browser, "inbox-phone.png").await?;
    Ok(psql)
}
