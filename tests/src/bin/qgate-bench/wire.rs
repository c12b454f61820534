//! Just enough PostgreSQL (protocol 3.0, simple query) and HTTP/1.1 to time
//! a held statement to the microsecond: no client process in between, one
//! monotonic clock for the approval and the CommandComplete.
use std::{
    io::{Read, Write},
    net::TcpStream,
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// A connection that has finished its startup and is ready for a query.
pub struct PgSession {
    stream: TcpStream,
}

impl PgSession {
    /// StartupMessage for `user`/`database` (the lab trusts every client),
    /// then everything up to the first ReadyForQuery.
    pub fn start(
        mut stream: TcpStream,
        user: &str,
        database: &str,
        timeout: Duration,
    ) -> Result<Self> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        let mut body = Vec::new();
        body.extend_from_slice(&196_608u32.to_be_bytes()); // protocol 3.0
        for (k, v) in [
            ("user", user),
            ("database", database),
            ("application_name", "qgate-bench"),
        ] {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        msg.extend_from_slice(&body);
        stream.write_all(&msg)?;
        let mut session = PgSession { stream };
        loop {
            let (kind, payload) = session.message()?;
            match kind {
                b'R' if payload.get(..4) == Some(&[0, 0, 0, 0]) => {}
                b'R' => bail!("the server asks for a password; the lab should trust every client"),
                b'E' => bail!("startup refused: {}", error_text(&payload)),
                b'Z' => return Ok(session),
                _ => {}
            }
        }
    }

    /// Sends one Query message; [`PgSession::complete`] reads its answer.
    pub fn send_query(&mut self, sql: &str) -> Result<()> {
        let mut msg = vec![b'Q'];
        msg.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
        msg.extend_from_slice(sql.as_bytes());
        msg.push(0);
        self.stream.write_all(&msg).context("sending the query")
    }

    /// Reads until ReadyForQuery and returns the CommandComplete tag with the
    /// instant its header arrived.
    pub fn complete(&mut self, timeout: Duration) -> Result<(String, Instant)> {
        self.stream.set_read_timeout(Some(timeout))?;
        let mut done = None;
        loop {
            let (kind, payload) = self.message()?;
            match kind {
                b'C' => {
                    let at = Instant::now();
                    let tag = String::from_utf8_lossy(
                        payload.split(|b| *b == 0).next().unwrap_or_default(),
                    );
                    done = Some((tag.into_owned(), at));
                }
                b'E' => bail!("the statement failed: {}", error_text(&payload)),
                b'Z' => return done.context("ReadyForQuery without CommandComplete"),
                _ => {}
            }
        }
    }

    /// What the client's TCP would do if nobody re-injected the held
    /// segment: milliseconds until its next retransmission (backed-off RTO
    /// minus the time since it last sent data), and retransmissions so far.
    pub fn next_retransmission(&self) -> Result<(f64, u32)> {
        // SAFETY: getsockopt(2) into a zeroed tcp_info of the size we pass.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                self.stream.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            bail!("TCP_INFO: {}", std::io::Error::last_os_error());
        }
        let rto_ms = f64::from(info.tcpi_rto) / 1000.0;
        let since_sent_ms = f64::from(info.tcpi_last_data_sent);
        Ok(((rto_ms - since_sent_ms).max(0.0), info.tcpi_total_retrans))
    }

    fn message(&mut self) -> Result<(u8, Vec<u8>)> {
        let mut head = [0u8; 5];
        self.stream
            .read_exact(&mut head)
            .context("reading from PostgreSQL")?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if !(4..=64 << 20).contains(&len) {
            bail!("message {:?} with impossible length {len}", head[0] as char);
        }
        let mut payload = vec![0; len - 4];
        self.stream
            .read_exact(&mut payload)
            .context("reading from PostgreSQL")?;
        Ok((head[0], payload))
    }
}

/// The `M` (message) field of an ErrorResponse.
fn error_text(payload: &[u8]) -> String {
    payload
        .split(|b| *b == 0)
        .find_map(|f| f.strip_prefix(b"M"))
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .unwrap_or_else(|| "unknown error".into())
}

/// An HTTP answer and the instant its last body byte arrived.
pub struct HttpAnswer {
    pub status: u16,
    pub body: String,
    pub at: Instant,
}

/// One HTTP/1.1 request on `stream` (`Connection: close`).
pub fn http(
    mut stream: TcpStream,
    method: &str,
    path: &str,
    token: &str,
    timeout: Duration,
) -> Result<HttpAnswer> {
    stream.set_read_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = stream
            .read(&mut chunk)
            .with_context(|| format!("reading the answer to {method} {path}"))?;
        buf.extend_from_slice(&chunk[..n]);
        let complete = body_complete(&buf);
        if n == 0 || complete {
            let at = Instant::now();
            let text = String::from_utf8_lossy(&buf).into_owned();
            let (head, body) = text
                .split_once("\r\n\r\n")
                .with_context(|| format!("malformed HTTP answer: {text:?}"))?;
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .with_context(|| format!("no status in {head:?}"))?;
            let body = if head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked")
            {
                dechunk(body)
            } else {
                body.to_owned()
            };
            return Ok(HttpAnswer { status, body, at });
        }
    }
}

/// Whether `buf` holds the whole answer per its Content-Length (a chunked
/// answer is complete when the server closes).
fn body_complete(buf: &[u8]) -> bool {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    head.lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .is_some_and(|len| buf.len() >= end + 4 + len)
}

fn dechunk(body: &str) -> String {
    let mut out = Vec::new();
    let mut rest = body.as_bytes();
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&rest[..eol]);
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        let data = &rest[eol + 2..];
        if n == 0 || data.len() < n {
            break;
        }
        out.extend_from_slice(&data[..n]);
        rest = data[n..].strip_prefix(b"\r\n").unwrap_or(&data[n..]);
    }
    String::from_utf8_lossy(&out).into_owned()
}
