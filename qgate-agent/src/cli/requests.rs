//! `qgate-agent requests list|show|approve|deny|watch`: a reviewer's client of the HTTP API.
//!
//! Synchronous to its caller: it runs its own single-threaded runtime, so
//! `main` must call [`run`] outside any tokio runtime.
use std::{io::Write, path::PathBuf, process::ExitCode};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use serde_json::Value;

use crate::api::DEFAULT_LISTEN;

#[derive(Debug, clap::Subcommand)]
pub enum RequestsCommand {
    /// List requests, newest first.
    List {
        /// pending, approved, denied, expired or withdrawn.
        #[arg(long)]
        status: Option<String>,
        /// DB user who sent the statement.
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        database: Option<String>,
        /// Created at or after (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        limit: Option<u32>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show one request in full.
    Show {
        id: i64,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Approve a request (one of the N approvals its rule needs).
    Approve {
        id: i64,
        #[arg(long)]
        comment: Option<String>,
        /// Admins only: break-glass approval, whatever N and the groups.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Deny a request; one deny ends it.
    Deny {
        id: i64,
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Print new requests and decisions as they happen.
    Watch {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Approve statements before they are sent (a migration): each
    /// statement of the file, when a statement of exactly that text
    /// (layout, comments and the case of unquoted names aside; literals
    /// exactly) is held for the database user, is approved by you.
    Preapprove {
        /// The statements (a SQL script; `-` reads standard input).
        #[arg(long)]
        file: PathBuf,
        /// The database user who will send them.
        #[arg(long = "for")]
        for_user: String,
        /// How long the approval holds: `2h`, `30m`, `1d`.
        #[arg(long, default_value = "1h", value_parser = super::parse_duration_s)]
        valid: i64,
        /// How many times each statement may be released by it.
        #[arg(long, default_value_t = 1)]
        uses: i64,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct ApiArgs {
    /// The agent's API.
    #[arg(long = "api", env = "QGATE_API", default_value_t = format!("http://{DEFAULT_LISTEN}"))]
    pub url: String,
    /// Reviewer token (from `qgate-agent reviewers add`). Prefer
    /// `QGATE_TOKEN` or `--token-file`: a command line is visible to every
    /// user of the host (`ps`).
    #[arg(long, env = "QGATE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A file holding the reviewer token (mode 0600 advised).
    #[arg(long, env = "QGATE_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// Extra CA certificate (PEM) to trust, for an agent with its own TLS certificate.
    #[arg(long, env = "QGATE_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: RequestsCommand) -> anyhow::Result<ExitCode> {
    execute(cmd, &mut std::io::stdout().lock())
}

/// [`run`] with its output going to `out`.
pub fn execute(cmd: RequestsCommand, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the HTTP client runtime")?;
    runtime.block_on(execute_async(cmd, out))
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    fn new(args: &ApiArgs) -> anyhow::Result<Self> {
        let from_file = match &args.token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading the token file {}", path.display()))?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        let Some(token) = from_file
            .or_else(|| args.token.clone())
            .filter(|t| !t.is_empty())
        else {
            bail!(
                "no token: set QGATE_TOKEN, or pass --token-file FILE (or --token, visible in \
                 `ps`); tokens come from `qgate-agent reviewers add`"
            );
        };
        let mut builder = reqwest::Client::builder();
        if let Some(path) = &args.ca_cert {
            let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .with_context(|| format!("{} is not a PEM certificate", path.display()))?;
            builder = builder.add_root_certificate(cert);
        }
        Ok(Client {
            http: builder.build().context("building the HTTP client")?,
            base: args.url.trim_end_matches('/').to_owned(),
            token,
        })
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<(bool, Value)> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("connecting to the qgate API at {}", self.base))?;
        let ok = response.status().is_success();
        let status = response.status();
        let text = response.text().await.context("reading the API's answer")?;
        let value = serde_json::from_str(&text)
            .unwrap_or_else(|_| serde_json::json!({ "error": status.as_str(), "message": text }));
        Ok((ok, value))
    }

    async fn get(&self, path: &str, query: &[(&str, String)]) -> anyhow::Result<(bool, Value)> {
        self.send(self.http.get(format!("{}{path}", self.base)).query(query))
            .await
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<(bool, Value)> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(&body))
            .await
    }
}

async fn execute_async(cmd: RequestsCommand, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let (api, (ok, value)) = match cmd {
        RequestsCommand::List {
            status,
            user,
            database,
            since,
            limit,
            api,
        } => {
            let query: Vec<(&str, String)> = [
                ("status", status),
                ("user", user),
                ("database", database),
                ("since", since),
                ("limit", limit.map(|l| l.to_string())),
            ]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect();
            let answer = Client::new(&api)?.get("/v1/requests", &query).await?;
            if answer.0 && !api.json {
                write_request_table(out, &answer.1)?;
                return Ok(ExitCode::SUCCESS);
            }
            (api, answer)
        }
        RequestsCommand::Show { id, api } => {
            let answer = Client::new(&api)?
                .get(&format!("/v1/requests/{id}"), &[])
                .await?;
            if answer.0 && !api.json {
                write_request(out, &answer.1)?;
                return Ok(ExitCode::SUCCESS);
            }
            (api, answer)
        }
        RequestsCommand::Approve {
            id,
            comment,
            force,
            api,
        } => {
            let verb = if force { "force-approve" } else { "approve" };
            let answer = Client::new(&api)?
                .post(
                    &format!("/v1/requests/{id}/{verb}"),
                    serde_json::json!({ "comment": comment }),
                )
                .await?;
            (api, answer)
        }
        RequestsCommand::Deny { id, comment, api } => {
            let answer = Client::new(&api)?
                .post(
                    &format!("/v1/requests/{id}/deny"),
                    serde_json::json!({ "comment": comment }),
                )
                .await?;
            (api, answer)
        }
        RequestsCommand::Watch { api } => return watch(&api, out).await,
        RequestsCommand::Preapprove {
            file,
            for_user,
            valid,
            uses,
            api,
        } => {
            let sql = if file.as_os_str() == "-" {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
                text
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?
            };
            let answer = Client::new(&api)?
                .post(
                    "/v1/preapprovals",
                    serde_json::json!({ "for": for_user, "sql": sql, "valid_s": valid, "uses": uses }),
                )
                .await?;
            if answer.0 && !api.json {
                for p in answer.1.as_array().map(Vec::as_slice).unwrap_or_default() {
                    writeln!(
                        out,
                        "pre-approved #{} for {} until {} ({} use(s)): {}",
                        p["id"],
                        str_of(&p["db_user"]),
                        str_of(&p["valid_until"]),
                        p["uses_left"],
                        str_of(&p["statement"])
                    )?;
                }
                return Ok(ExitCode::SUCCESS);
            }
            (api, answer)
        }
    };
    if api.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
    } else if ok {
        writeln!(
            out,
            "request {}: {}{}",
            value["id"],
            str_of(&value["status"]),
            match value["approvals_remaining"].as_u64() {
                Some(n) if n > 0 => format!(" ({n} more approval(s) needed)"),
                _ => String::new(),
            }
        )?;
    }
    if ok {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("error: {}", str_of(&value["message"]));
    if let Some(status) = value["request"]["status"].as_str() {
        eprintln!("the request is {status}");
    }
    Ok(ExitCode::FAILURE)
}

async fn watch(args: &ApiArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let client = Client::new(args)?;
    let response = client
        .http
        .get(format!("{}/v1/events", client.base))
        .bearer_auth(&client.token)
        .send()
        .await
        .with_context(|| format!("connecting to the qgate API at {}", client.base))?;
    if !response.status().is_success() {
        let status = response.status();
        let value: Value = response.json().await.unwrap_or(Value::Null);
        bail!("{status}: {}", str_of(&value["message"]));
    }
    if !args.json {
        writeln!(out, "watching {} (Ctrl-C to stop)", client.base)?;
        out.flush()?;
    }
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    let mut event = String::new();
    while let Some(chunk) = stream.next().await {
        buffer.push_str(&String::from_utf8_lossy(
            &chunk.context("event stream broke")?,
        ));
        while let Some(end) = buffer.find('\n') {
            let line = buffer[..end].trim_end_matches('\r').to_owned();
            buffer.drain(..=end);
            if let Some(name) = line.strip_prefix("event:") {
                event = name.trim().to_owned();
            } else if let Some(data) = line.strip_prefix("data:") {
                let data = data.trim();
                if args.json {
                    writeln!(out, "{data}")?;
                } else if event == "lagged" {
                    writeln!(out, "(missed {data} events: run `requests list`)")?;
                } else {
                    let value: Value = serde_json::from_str(data).unwrap_or(Value::Null);
                    write_event_line(out, &event, &value["request"])?;
                }
                out.flush()?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn str_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

/// The statement on one line, cut to `max` characters.
fn one_line(statement: &str, max: usize) -> String {
    let flat: String = statement.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > max {
        let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    } else {
        flat
    }
}

fn who(r: &Value) -> String {
    format!(
        "{}@{}",
        r["identity"]["db_user"].as_str().unwrap_or("?"),
        r["identity"]["database"].as_str().unwrap_or("?")
    )
}

fn write_event_line(out: &mut dyn Write, event: &str, r: &Value) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<18} #{:<6} {:<20} {:<24} {}",
        event,
        str_of(&r["id"]),
        who(r),
        str_of(&r["rule"]),
        one_line(r["statement"].as_str().unwrap_or(""), 60)
    )
}

fn write_request_table(out: &mut dyn Write, list: &Value) -> std::io::Result<()> {
    let rows: Vec<[String; 7]> = list
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|r| {
            let needed = r["approvals_needed"].as_u64().unwrap_or(0);
            let remaining = r["approvals_remaining"].as_u64().unwrap_or(0);
            [
                str_of(&r["id"]),
                str_of(&r["status"]),
                format!("{}/{}", needed.saturating_sub(remaining), needed),
                who(r),
                str_of(&r["rule"]),
                str_of(&r["expires_at"]),
                one_line(r["statement"].as_str().unwrap_or(""), 60),
            ]
        })
        .collect();
    write_columns(
        out,
        &[
            "ID",
            "STATUS",
            "APPROVED",
            "WHO",
            "RULE",
            "EXPIRES",
            "STATEMENT",
        ],
        &rows,
    )
}

fn write_request(out: &mut dyn Write, r: &Value) -> std::io::Result<()> {
    let needed = r["approvals_needed"].as_u64().unwrap_or(0);
    let remaining = r["approvals_remaining"].as_u64().unwrap_or(0);
    writeln!(out, "request      {}", str_of(&r["id"]))?;
    writeln!(out, "status       {}", str_of(&r["status"]))?;
    writeln!(out, "rule         {}", str_of(&r["rule"]))?;
    writeln!(
        out,
        "approvals    {} of {} ({} more needed) from {}",
        needed.saturating_sub(remaining),
        needed,
        remaining,
        r["reviewer_groups"]
            .as_array()
            .map(|g| g.iter().map(str_of).collect::<Vec<_>>().join(", "))
            .unwrap_or_default()
    )?;
    writeln!(out, "user         {}", str_of(&r["identity"]["db_user"]))?;
    writeln!(out, "database     {}", str_of(&r["identity"]["database"]))?;
    writeln!(
        out,
        "application  {}",
        str_of(&r["identity"]["application"])
    )?;
    writeln!(
        out,
        "client       {}",
        str_of(&r["identity"]["client_addr"])
    )?;
    writeln!(
        out,
        "connection   {} ({})",
        str_of(&r["connection_id"]),
        str_of(&r["transaction_state"])
    )?;
    writeln!(out, "est. rows    {}", str_of(&r["estimated_rows"]))?;
    if r["held_by"] == "server_hook" {
        writeln!(
            out,
            "held by      server hook: backend {} is stopped before parsing the statement; \
             it keeps the locks of its open transaction, and an \
             idle_in_transaction_session_timeout shorter than the wait ends the session",
            str_of(&r["backend_pid"])
        )?;
    } else {
        writeln!(out, "held by      wire (the statement's segment is held)")?;
    }
    writeln!(out, "created      {}", str_of(&r["created_at"]))?;
    writeln!(out, "expires      {}", str_of(&r["expires_at"]))?;
    writeln!(out, "reason       {}", str_of(&r["justification"]))?;
    for v in r["votes"].as_array().map(Vec::as_slice).unwrap_or_default() {
        writeln!(
            out,
            "vote         {} ({}) {} at {}{}",
            str_of(&v["reviewer"]),
            match v["reviewer_db_users"].as_array() {
                Some(users) if !users.is_empty() => format!(
                    "DB user {}",
                    users
                        .iter()
                        .map(|u| u.as_str().unwrap_or("?"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                _ => "no DB user".to_owned(),
            },
            str_of(&v["verdict"]),
            str_of(&v["at"]),
            v["comment"]
                .as_str()
                .map(|c| format!(": {c}"))
                .unwrap_or_default()
        )?;
    }
    if r["closing"].is_object() {
        writeln!(
            out,
            "closed by    {}{} at {}{}",
            str_of(&r["closing"]["by"]),
            if r["closing"]["forced"] == true {
                " (break-glass)"
            } else {
                ""
            },
            str_of(&r["closing"]["at"]),
            r["closing"]["comment"]
                .as_str()
                .map(|c| format!(": {c}"))
                .unwrap_or_default()
        )?;
    }
    writeln!(out, "facts        {}", r["facts"])?;
    writeln!(out, "statement\n{}", str_of(&r["statement"]))
}

/// A plain text table: columns padded to their widest cell.
pub(crate) fn write_columns<const N: usize>(
    out: &mut dyn Write,
    headers: &[&str; N],
    rows: &[[String; N]],
) -> std::io::Result<()> {
    let mut widths = headers.map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == N {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<w$}  "));
            }
        }
        text
    };
    writeln!(out, "{}", line(headers.to_vec()))?;
    for row in rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}
