//! Webhooks on new requests and on decisions.
//!
//! Each delivery is a POST of JSON with a Slack-compatible `text` plus the
//! structured event, signed with HMAC-SHA256 over `"{timestamp}.{body}"`:
//!
//! ```text
//! X-Qgate-Timestamp: 1767225600
//! X-Qgate-Signature: sha256=<hex>
//! ```
//!
//! Receivers recompute the MAC and reject stale timestamps (replays). A
//! delivery is retried with exponential backoff; a failing webhook is logged
//! and counted, and never delays or changes a decision: deliveries run on
//! their own tasks, fed from the board's event stream after the commit.
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::broadcast::{self, error::RecvError};

use super::metrics;
use crate::board::{RequestEvent, RequestEventKind};

pub const SIGNATURE_HEADER: &str = "x-qgate-signature";
pub const TIMESTAMP_HEADER: &str = "x-qgate-timestamp";
/// Statement text longer than this is cut in the `text` line (the full text is in `request`).
const TEXT_STATEMENT_CHARS: usize = 300;

#[derive(Debug, Clone)]
pub struct WebhookOptions {
    pub urls: Vec<String>,
    /// Slack incoming-webhook URLs: `text` and `blocks` only (the statement,
    /// who sent it, and a link to the request in the inbox).
    pub slack_urls: Vec<String>,
    /// The inbox's address as reviewers reach it (`https://db1:9187/ui/`),
    /// for links in chat messages.
    pub inbox_url: Option<String>,
    /// HMAC key; without it deliveries go unsigned (and a warning is logged).
    pub secret: Option<String>,
    /// Attempts per delivery, the first included.
    pub max_attempts: u32,
    /// Wait before the first retry; doubles each time.
    pub first_backoff: Duration,
    pub timeout: Duration,
}

impl Default for WebhookOptions {
    fn default() -> Self {
        WebhookOptions {
            urls: Vec::new(),
            slack_urls: Vec::new(),
            inbox_url: None,
            secret: None,
            max_attempts: 6,
            first_backoff: Duration::from_millis(500),
            timeout: Duration::from_secs(10),
        }
    }
}

/// What a receiver gets.
#[derive(Debug, Serialize)]
pub struct WebhookPayload<'a> {
    /// One line for chat tools (Slack's incoming-webhook `text`).
    pub text: String,
    pub event: &'static str,
    pub request_id: i64,
    pub request: &'a crate::store::requests::Request,
}

/// `sha256=<hex HMAC-SHA256(secret, "{timestamp}.{body}")>`.
pub fn sign(secret: &str, timestamp: u64, body: &[u8]) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let mut hex = String::with_capacity(7 + 64);
    hex.push_str("sha256=");
    for b in tag {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

fn text_line(event: &RequestEvent) -> String {
    let r = &event.request;
    let who = format!(
        "{}@{}",
        r.identity.db_user.as_deref().unwrap_or("<unknown user>"),
        r.identity.database.as_deref().unwrap_or("<unknown db>")
    );
    let mut statement: String = r.statement.chars().take(TEXT_STATEMENT_CHARS).collect();
    if statement.len() < r.statement.len() {
        statement.push('…');
    }
    let what = match event.kind {
        RequestEventKind::Created => format!(
            "held by rule `{}`, needs {} approval(s) from {}",
            r.rule,
            r.approvals_needed,
            r.reviewer_groups.join(", ")
        ),
        RequestEventKind::ApprovalRecorded => format!(
            "approved by {}, {} more needed",
            r.votes.last().map(|v| v.reviewer.as_str()).unwrap_or("?"),
            r.approvals_remaining
        ),
        kind => {
            let by = r.closing.as_ref().map(|c| c.by.as_str()).unwrap_or("qgate");
            let forced = r.closing.as_ref().is_some_and(|c| c.forced);
            format!(
                "{}{} by {by}",
                kind.as_str(),
                if forced { " (break-glass)" } else { "" }
            )
        }
    };
    let reason = r
        .justification
        .as_deref()
        .map(|j| format!(" — reason: {j}"))
        .unwrap_or_default();
    format!("qgate request {}: {who} `{statement}` {what}{reason}", r.id)
}

/// Slack's mrkdwn escapes (`&`, `<`, `>`); a statement's own triple
/// backticks would end its code block.
fn mrkdwn(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace("```", "'''")
}

/// A Slack incoming-webhook message: the line, the statement as code, who
/// sent it from where, and a button to the request in the inbox.
pub fn slack_message(event: &RequestEvent, inbox_url: Option<&str>) -> serde_json::Value {
    let r = &event.request;
    let link = inbox_url.map(|base| {
        let base = base.trim_end_matches('/');
        format!("{base}/#/requests/{}", r.id)
    });
    let mut statement: String = r.statement.chars().take(2900).collect();
    if statement.len() < r.statement.len() {
        statement.push('…');
    }
    let id = &r.identity;
    let from = format!(
        "{}@{} from {}{}",
        id.db_user.as_deref().unwrap_or("<unknown user>"),
        id.database.as_deref().unwrap_or("<unknown db>"),
        id.client_addr.as_deref().unwrap_or("<unknown address>"),
        id.application
            .as_deref()
            .map(|a| format!(" ({a})"))
            .unwrap_or_default()
    );
    let mut text = text_line(event);
    if let Some(link) = &link {
        text.push_str(&format!(" — {link}"));
    }
    let mut blocks = vec![
        serde_json::json!({"type": "section", "text": {"type": "mrkdwn",
            "text": format!("*qgate request #{}* — {}", r.id, mrkdwn(&headline(event)))}}),
        serde_json::json!({"type": "section", "text": {"type": "mrkdwn",
            "text": format!("```{}```", mrkdwn(&statement))}}),
        serde_json::json!({"type": "context", "elements": [{"type": "mrkdwn",
            "text": mrkdwn(&format!("{from}; rule {}", r.rule))}]}),
    ];
    if let Some(link) = link {
        blocks.push(
            serde_json::json!({"type": "actions", "elements": [{"type": "button",
            "text": {"type": "plain_text", "text": "Open in the inbox"}, "url": link}]}),
        );
    }
    serde_json::json!({ "text": text, "blocks": blocks })
}

/// What happened, in a few words.
fn headline(event: &RequestEvent) -> String {
    let r = &event.request;
    match event.kind {
        RequestEventKind::Created => format!(
            "held, needs {} approval(s) from {}",
            r.approvals_needed,
            r.reviewer_groups.join(", ")
        ),
        kind => {
            let by = r.closing.as_ref().map(|c| c.by.as_str()).unwrap_or("qgate");
            format!("{} by {by}", kind.as_str())
        }
    }
}

/// Delivers webhooks for every event but single approvals, until the board closes.
pub async fn run(mut events: broadcast::Receiver<RequestEvent>, options: WebhookOptions) {
    if options.urls.is_empty() && options.slack_urls.is_empty() {
        return;
    }
    if options.secret.is_none() {
        tracing::warn!("webhook secret not set: deliveries are unsigned");
    }
    let client = match reqwest::Client::builder().timeout(options.timeout).build() {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "webhooks disabled: HTTP client setup failed");
            return;
        }
    };
    loop {
        let event = match events.recv().await {
            Ok(event) => event,
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "webhooks fell behind; {n} events not delivered");
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        if event.kind == RequestEventKind::ApprovalRecorded {
            continue;
        }
        let payload = WebhookPayload {
            text: text_line(&event),
            event: event.kind.as_str(),
            request_id: event.request_id,
            request: &event.request,
        };
        let body = match serde_json::to_vec(&payload) {
            Ok(body) => bytes::Bytes::from(body),
            Err(e) => {
                tracing::error!(error = %e, "webhook payload serialisation failed");
                continue;
            }
        };
        for url in &options.urls {
            tokio::spawn(deliver(
                client.clone(),
                url.clone(),
                body.clone(),
                options.clone(),
            ));
        }
        if !options.slack_urls.is_empty() {
            let message = slack_message(&event, options.inbox_url.as_deref());
            let body = bytes::Bytes::from(message.to_string());
            for url in &options.slack_urls {
                tokio::spawn(deliver(
                    client.clone(),
                    url.clone(),
                    body.clone(),
                    options.clone(),
                ));
            }
        }
    }
}

async fn deliver(
    client: reqwest::Client,
    url: String,
    body: bytes::Bytes,
    options: WebhookOptions,
) {
    let mut backoff = options.first_backoff;
    for attempt in 1..=options.max_attempts.max(1) {
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut request = client
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(TIMESTAMP_HEADER, timestamp.to_string());
        if let Some(secret) = &options.secret {
            request = request.header(SIGNATURE_HEADER, sign(secret, timestamp, &body));
        }
        let failure = match request.body(body.clone()).send().await {
            Ok(response) if response.status().is_success() => {
                ::metrics::counter!(metrics::WEBHOOKS, "outcome" => "delivered").increment(1);
                return;
            }
            Ok(response) => format!("HTTP {}", response.status()),
            Err(e) => e.to_string(),
        };
        tracing::warn!(%url, attempt, error = %failure, "webhook delivery failed");
        if attempt < options.max_attempts {
            tokio::time::sleep(backoff).await;
            backoff = backoff.saturating_mul(2);
        }
    }
    ::metrics::counter!(metrics::WEBHOOKS, "outcome" => "failed").increment(1);
    tracing::error!(%url, "webhook given up after {} attempts", options.max_attempts);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"s3cret").expect("key");
        mac.update(b"1767225600.{\"text\":\"hi\"}");
        let expected: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            sign("s3cret", 1767225600, br#"{"text":"hi"}"#),
            format!("sha256={expected}")
        );
        assert_ne!(
            sign("s3cret", 1767225601, br#"{"text":"hi"}"#),
            sign("s3cret", 1767225600, br#"{"text":"hi"}"#)
        );
    }
}
