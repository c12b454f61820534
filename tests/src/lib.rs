//! The end-to-end harness every privileged test uses: two network
//! namespaces joined by a veth pair, a throwaway PostgreSQL 15 cluster in the
//! server namespace, `qgate-agent` attached to the server's veth, and real
//! clients (psql, pgbench) in the client namespace.
//!
//! Each [`Lab`] has its own names (derived from the test's tag), clears
//! whatever an earlier killed run left under those names, and removes
//! everything it made when dropped, even when the test fails.
use std::{
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::{fd::AsRawFd, unix::fs::PermissionsExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// PostgreSQL 15 server binaries (Debian's layout).
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
pub const PG_PORT: u16 = 5432;

/// How a client reaches the lab's server: the three kinds of session the
/// server hook gates, where the tc program reads only plaintext TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// Plaintext TCP from the client namespace (`PGSSLMODE=disable`).
    Tcp,
    /// TLS over TCP from the client namespace (`PGSSLMODE=require`); needs
    /// [`Lab::start_postgres_tls`].
    Tls,
    /// The Unix socket in the lab's directory, from the server namespace.
    Unix,
}

impl Via {
    /// The store's `connections.transport` for a session made this way.
    pub fn transport(self) -> &'static str {
        match self {
            Via::Tcp => "tcp",
            Via::Tls => "tls",
            Via::Unix => "unix",
        }
    }
}

/// One test's private network: `<tag>s` (server side) and `<tag>c` (client
/// side), both namespaces and veth ends.
pub struct Lab {
    pub tag: String,
    pub server_ns: String,
    pub client_ns: String,
    pub server_if: String,
    pub server_ip: Ipv4Addr,
    pub client_ip: Ipv4Addr,
    pub dir: PathBuf,
    postgres: bool,
    agent: Option<Child>,
}

/// Runs `cmd` to its end; its output, or an error with what it printed.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

fn quiet(cmd: &mut Command) {
    let _ = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// `QGATE_E2E_SERVER_HOOK=off` (set by `cargo xtask test` for its second
/// pass over the gate tests) starts every agent with the server hook off, so
/// the same tests prove the tc path; `=per-session` with the read and write
/// probes attached per backend, to the sessions the wire cannot read.
fn hook_args() -> &'static [&'static str] {
    match std::env::var("QGATE_E2E_SERVER_HOOK").as_deref() {
        Ok("off") => &["--no-server-hook"],
        Ok("per-session") => &["--hook-probes", "per-session"],
        _ => &[],
    }
}

/// Whether the hook reads plaintext TCP sessions too in this run (probes on
/// every backend), or leaves them to the wire (`per-session`, or no hook).
pub fn hook_reads_tcp() -> bool {
    server_hook_on() && std::env::var("QGATE_E2E_SERVER_HOOK").as_deref() != Ok("per-session")
}

/// Whether agents in this run read sessions inside the server (see [`hook_off`]).
pub fn server_hook_on() -> bool {
    std::env::var("QGATE_E2E_SERVER_HOOK").as_deref() != Ok("off")
}

/// Where `qgate-agent` was built: `QGATE_AGENT_BIN` (set by `cargo xtask
/// test`), else next to this test binary's target directory.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("QGATE_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/debug/deps/<test> → target/debug/qgate-agent
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join("qgate-agent"))
        .expect("target directory")
}

impl Lab {
    /// Makes the namespaces and the veth pair. `tag`: at most 8 characters
    /// of `[a-z0-9]`, unique among the tests.
    pub fn new(tag: &str) -> Result<Self> {
        assert!(
            tag.len() <= 8
                && tag
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        );
        let n = tag
            .bytes()
            .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32))
            % 250
            + 1;
        let lab = Lab {
            tag: tag.to_string(),
            server_ns: format!("qg{tag}s"),
            client_ns: format!("qg{tag}c"),
            server_if: format!("qg{tag}s"),
            server_ip: Ipv4Addr::new(10, 213, n as u8, 1),
            client_ip: Ipv4Addr::new(10, 213, n as u8, 2),
            dir: std::env::temp_dir().join(format!("qgate-e2e-{tag}")),
            postgres: false,
            agent: None,
        };
        lab.clear_stale();
        fs::create_dir_all(&lab.dir)?;
        run(Command::new("ip").args(["netns", "add", &lab.server_ns]))?;
        run(Command::new("ip").args(["netns", "add", &lab.client_ns]))?;
        lab.make_link()?;
        Ok(lab)
    }

    /// The veth pair between the namespaces, with its addresses, up.
    fn make_link(&self) -> Result<()> {
        let client_if = format!("qg{}c", self.tag);
        run(Command::new("ip").args([
            "link",
            "add",
            &self.server_if,
            "netns",
            &self.server_ns,
            "type",
            "veth",
            "peer",
            "name",
            &client_if,
            "netns",
            &self.client_ns,
        ]))?;
        for (ns, ifname, ip, ip6) in [
            (
                &self.server_ns,
                &self.server_if,
                self.server_ip,
                self.server_ip6(),
            ),
            (
                &self.client_ns,
                &client_if,
                self.client_ip,
                self.client_ip6(),
            ),
        ] {
            let addr = format!("{ip}/24");
            run(Command::new("ip").args(["-n", ns, "addr", "add", &addr, "dev", ifname]))?;
            let addr6 = format!("{ip6}/64");
            run(Command::new("ip").args(["-n", ns, "addr", "add", &addr6, "dev", ifname, "nodad"]))?;
            run(Command::new("ip").args(["-n", ns, "link", "set", ifname, "up"]))?;
            run(Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]))?;
        }
        Ok(())
    }

    /// Deletes the veth pair and makes it again under the same names and
    /// addresses (a new interface: a bond, VLAN or container network
    /// recreated on a real host). Links attached to the old one are severed.
    pub fn recreate_link(&self) -> Result<()> {
        run(Command::new("ip").args(["-n", &self.server_ns, "link", "del", &self.server_if]))?;
        self.make_link()
    }

    /// The server's IPv6 address (unique local, inside the lab only).
    pub fn server_ip6(&self) -> std::net::Ipv6Addr {
        std::net::Ipv6Addr::new(
            0xfd71,
            0x6761,
            0x7465,
            self.server_ip.octets()[2] as u16,
            0,
            0,
            0,
            1,
        )
    }

    pub fn client_ip6(&self) -> std::net::Ipv6Addr {
        std::net::Ipv6Addr::new(
            0xfd71,
            0x6761,
            0x7465,
            self.server_ip.octets()[2] as u16,
            0,
            0,
            0,
            2,
        )
    }

    /// Removes what a killed earlier run with the same tag left behind.
    fn clear_stale(&self) {
        for ns in [&self.server_ns, &self.client_ns] {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    quiet(Command::new("kill").args(["-9", pid]));
                }
            }
            quiet(Command::new("ip").args(["netns", "del", ns]));
        }
        let _ = fs::remove_dir_all(&self.dir);
        let _ = fs::remove_dir_all(self.pin_dir());
    }

    /// A command run inside the server namespace.
    pub fn in_server(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.server_ns, program]);
        c
    }

    /// A command run inside the client namespace.
    pub fn in_client(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.client_ns, program]);
        c
    }

    pub fn pg_data(&self) -> PathBuf {
        self.dir.join("pgdata")
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.join("qgate.sqlite")
    }

    /// bpffs directory for this lab's pinned maps and links.
    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/qgate-e2e-{}", self.tag))
    }

    /// The agent's API port on the server namespace's loopback.
    pub fn api_port(&self) -> u16 {
        9187
    }

    /// initdb + start a PostgreSQL 15 cluster listening on the server address,
    /// trusting every client (the lab is private).
    pub fn start_postgres(&mut self) -> Result<()> {
        self.start_postgres_with("")
    }

    /// As [`Lab::start_postgres`], with TLS on: a self-signed certificate made
    /// for this lab only, so that a client may choose a session the tc
    /// program cannot read (what the server hook is for). Plaintext stays
    /// allowed: `pg_hba.conf` trusts `host` lines either way.
    /// A self-signed certificate and its key for the lab's servers
    /// (`server.crt`, `server.key` in the lab's directory).
    pub fn self_signed_cert(&self) -> Result<(PathBuf, PathBuf)> {
        let cert = self.dir.join("server.crt");
        let key = self.dir.join("server.key");
        run(Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=qgate-lab", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert))?;
        Ok((cert, key))
    }

    pub fn start_postgres_tls(&mut self) -> Result<()> {
        let (cert, key) = self.self_signed_cert()?;
        // PostgreSQL refuses a key that anyone but its owner may read; the
        // owner becomes postgres with the rest of the lab's directory.
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600))?;
        self.start_postgres_with(&format!(
            " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
            cert.display(),
            key.display()
        ))
    }

    /// initdb + pg_ctl start, with `extra_opts` appended to the server's
    /// command line.
    fn start_postgres_with(&mut self, extra_opts: &str) -> Result<()> {
        let data = self.pg_data();
        fs::create_dir_all(&data)?;
        run(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&self.dir))?;
        run(Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(format!("{PG_BIN}/initdb"))
            .args(["-D"])
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "--no-sync"]))?;
        fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhost all all 0.0.0.0/0 trust\nhost all all ::/0 trust\n",
        )?;
        let opts = format!(
            "-c listen_addresses={},{},127.0.0.1 -p {PG_PORT} -k {} -c fsync=off -c max_connections=100{extra_opts}",
            self.server_ip,
            self.server_ip6(),
            self.dir.display()
        );
        run(self
            .in_server("runuser")
            .args(["-u", "postgres", "--"])
            .arg(format!("{PG_BIN}/pg_ctl"))
            .arg("-D")
            .arg(&data)
            .args(["-o", &opts, "-l"])
            .arg(self.dir.join("postgres.log"))
            .args(["-w", "start"]))?;
        self.postgres = true;
        Ok(())
    }

    /// `pg_ctl restart -m fast`: a new postmaster (new pid) with the same
    /// options.
    pub fn restart_postgres(&self) -> Result<()> {
        run(self
            .in_server("runuser")
            .args(["-u", "postgres", "--"])
            .arg(format!("{PG_BIN}/pg_ctl"))
            .arg("-D")
            .arg(self.pg_data())
            .args(["-m", "fast", "-w", "restart", "-l"])
            .arg(self.dir.join("postgres.log")))?;
        Ok(())
    }

    /// Starts `qgate-agent run` in the server namespace, attached to the
    /// server's veth, and waits until it has attached.
    pub fn start_agent(&mut self, extra: &[&str]) -> Result<()> {
        let before = self.agent_log().matches("capturing").count();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))?;
        // nsenter --net, not `ip netns exec`: the latter remounts /sys and
        // hides the host's bpffs, where the agent pins its maps and links.
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.server_ns))
            .arg("--")
            .arg(agent_bin())
            .args(["run", "--interface", &self.server_if, "--port"])
            .arg(PG_PORT.to_string())
            .arg("--db")
            .arg(self.db_path())
            .arg("--pin-dir")
            .arg(self.pin_dir())
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.api_port()))
            .args(hook_args())
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("QGATE_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting qgate-agent")?;
        self.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.agent_log().matches("capturing").count() > before {
                return Ok(());
            }
            if let Some(status) = self
                .agent
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("qgate-agent exited with {status}:\n{}", self.agent_log());
            }
            thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "qgate-agent did not attach within 20 s:\n{}",
            self.agent_log()
        )
    }

    /// Writes `toml` as the lab's policy file and starts the agent with the
    /// shipped qgate.toml and that policy.
    pub fn start_agent_with_policy(&mut self, toml: &str) -> Result<()> {
        let policy = self.dir.join("policy.toml");
        fs::write(&policy, toml)?;
        let config = self.config_with(&[])?;
        self.start_agent(&[
            "--config",
            &config.to_string_lossy(),
            "--policy",
            &policy.to_string_lossy(),
        ])
    }

    /// Writes the shipped qgate.toml with `replacements` applied (whole
    /// `key = value` lines) into the lab and returns its path, for
    /// `start_agent(&["--config", path])`.
    pub fn config_with(&self, replacements: &[(&str, &str)]) -> Result<PathBuf> {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../qgate-agent/qgate.toml");
        let mut text = fs::read_to_string(&shipped)?;
        for (from, to) in replacements {
            if !text.contains(from) {
                bail!("{from:?} is not in the shipped qgate.toml");
            }
            text = text.replace(from, to);
        }
        let path = self.dir.join("qgate.toml");
        fs::write(&path, text)?;
        Ok(path)
    }

    /// Kills the agent with SIGKILL: no clean-up, pins stay.
    pub fn kill_agent(&mut self) -> Result<()> {
        if let Some(mut child) = self.agent.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Stops the agent with SIGTERM (it flushes the store) and waits.
    pub fn stop_agent(&mut self) -> Result<()> {
        if let Some(mut child) = self.agent.take() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if child.try_wait()?.is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!(
                        "qgate-agent ignored SIGTERM for 10 s:\n{}",
                        self.agent_log()
                    );
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// The running agent's process id (`nsenter` execs it, so this is the
    /// agent itself): for reading its RSS and CPU time under /proc.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// A TCP connection to `addr` made from inside the client namespace, for
    /// tests that speak the protocol themselves and time it to the
    /// microsecond (no client process in between).
    pub fn connect_from_client(&self, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
        in_netns(&self.client_ns, move || {
            TcpStream::connect_timeout(&addr, timeout)
                .with_context(|| format!("connecting to {addr}"))
        })
    }

    /// A TCP connection to `addr` made from inside the server namespace (the
    /// agent's API listens on its loopback).
    pub fn connect_in_server(&self, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
        in_netns(&self.server_ns, move || {
            TcpStream::connect_timeout(&addr, timeout)
                .with_context(|| format!("connecting to {addr}"))
        })
    }

    /// `GET path` on the agent's API with `token`: the status and the body.
    pub fn api_get(&self, token: &str, path: &str) -> Result<(u16, String)> {
        let api = (Ipv4Addr::LOCALHOST, self.api_port()).into();
        let mut stream = self.connect_in_server(api, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
             Connection: close\r\n\r\n"
        )?;
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .with_context(|| format!("reading the answer to GET {path}"))?;
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .with_context(|| format!("malformed HTTP answer: {answer:?}"))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("no status in {head:?}"))?;
        Ok((status, body.to_string()))
    }

    pub fn agent_log(&self) -> String {
        fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// `qgate-agent <args>` (a CLI command, not `run`) inside the server
    /// namespace, where the agent's API listens on loopback.
    pub fn agent_cli(&self, args: &[&str]) -> Result<Output> {
        self.in_server(agent_bin().to_str().context("agent path")?)
            .args(args)
            .output()
            .context("running qgate-agent")
    }

    /// Adds a reviewer to the lab's store and returns its API token.
    pub fn add_reviewer(&self, name: &str, groups: &str, db_users: Option<&str>) -> Result<String> {
        let db = self.db_path();
        let mut args = vec![
            "reviewers",
            "add",
            name,
            "--groups",
            groups,
            "--json",
            "--db",
        ];
        args.push(db.to_str().context("db path")?);
        match db_users {
            // A reviewer who is no database user at all.
            Some("") => args.push("--no-db-user"),
            Some(users) => args.extend(["--db-users", users]),
            None => {}
        }
        let out = self.agent_cli(&args)?;
        if !out.status.success() {
            bail!("reviewers add: {}", String::from_utf8_lossy(&out.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(v["token"]
            .as_str()
            .context("token in reviewers add --json")?
            .to_string())
    }

    /// `qgate-agent requests <args> --json` against the lab's agent.
    pub fn requests(&self, token: &str, args: &[&str]) -> Result<serde_json::Value> {
        let api = format!("http://127.0.0.1:{}", self.api_port());
        let mut all = vec!["requests"];
        all.extend_from_slice(args);
        all.extend(["--api", &api, "--token", token, "--json"]);
        let out = self.agent_cli(&all)?;
        if !out.status.success() {
            bail!(
                "requests {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Waits until at least `n` requests are pending and returns them.
    pub fn pending_requests(
        &self,
        token: &str,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<serde_json::Value>> {
        self.wait_for(&format!("{n} pending request(s)"), timeout, || {
            let list = self.requests(token, &["list", "--status", "pending"])?;
            let list = list.as_array().cloned().unwrap_or_default();
            Ok((list.len() >= n).then_some(list))
        })
    }

    /// A libpq client (`psql`, `pgbench`) that reaches the lab's server
    /// `via` one transport, with its host and port set. Over TCP the
    /// encryption is forced one way or the other (libpq's default `prefer`
    /// would pick TLS whenever the server offers it). Over the Unix socket
    /// the client runs as the OS user postgres in the server namespace;
    /// `setpriv` execs it in place (`runuser` would fork and wait), so a
    /// signal sent to the returned child reaches the client itself.
    fn client_command(&self, via: Via, program: &str) -> Command {
        let mut cmd = match via {
            Via::Tcp | Via::Tls => {
                let mut cmd = self.in_client(program);
                let mode = if via == Via::Tls {
                    "require"
                } else {
                    "disable"
                };
                cmd.env("PGSSLMODE", mode)
                    .args(["-h", &self.server_ip.to_string()]);
                cmd
            }
            Via::Unix => {
                let mut cmd = self.in_server("setpriv");
                cmd.args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
                    .args([program, "-h"])
                    .arg(&self.dir);
                cmd
            }
        };
        cmd.args(["-p", &PG_PORT.to_string()]);
        cmd
    }

    /// psql connected to the lab's server `via` a transport;
    /// `-v ON_ERROR_STOP=0` so a failing statement in a script does not end it.
    pub fn psql_command(&self, via: Via, user: &str, db: &str, args: &[&str]) -> Command {
        let mut cmd = self.client_command(via, "psql");
        cmd.args(["-U", user, "-d", db, "-X", "-q", "-v", "ON_ERROR_STOP=0"])
            .args(args);
        cmd
    }

    /// psql `via` a transport, started in the background with its output
    /// piped (read it with [`finish`]).
    pub fn psql_via_spawn(&self, via: Via, user: &str, db: &str, args: &[&str]) -> Result<Child> {
        spawn_piped(self.psql_command(via, user, db, args), "psql")
    }

    /// psql `via` a transport reading its statements from a pipe (for a
    /// session that stays open while the test does other things).
    pub fn psql_via_spawn_stdin(
        &self,
        via: Via,
        user: &str,
        db: &str,
        args: &[&str],
    ) -> Result<Child> {
        let mut cmd = self.psql_command(via, user, db, args);
        cmd.stdin(Stdio::piped());
        spawn_piped(cmd, "psql")
    }

    /// An open psql session `via` a transport, for statements sent one at a
    /// time on the same connection (e.g. while the agent is down, when a new
    /// connection's StartupMessage waits for it).
    pub fn session(&self, via: Via) -> Result<PsqlSession> {
        let mut child = self.psql_via_spawn_stdin(via, "postgres", "postgres", &["-At"])?;
        let stdin = child.stdin.take().context("psql stdin")?;
        let stdout = child.stdout.take().context("psql stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut session = PsqlSession {
            child,
            stdin,
            lines,
        };
        session.query("SELECT 1", Duration::from_secs(30))?;
        Ok(session)
    }

    /// psql `via` a transport, waited for.
    pub fn psql_via(&self, via: Via, user: &str, db: &str, args: &[&str]) -> Result<Output> {
        self.psql_command(via, user, db, args)
            .output()
            .context("running psql")
    }

    /// psql -c `via` a transport as postgres, failing the test if psql itself
    /// fails, and giving up after a minute: a statement the gate holds by
    /// mistake ends the test with an error instead of hanging it.
    pub fn sql_via(&self, via: Via, sql: &str) -> Result<String> {
        let mut cmd = self.psql_command(via, "postgres", "postgres", &["-At", "-c", sql]);
        let out = output_within(&mut cmd, Duration::from_secs(60))?;
        if !out.status.success() {
            bail!(
                "psql ({via:?}) -c {sql:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// pgbench `via` a transport as postgres on database postgres.
    pub fn pgbench_command(&self, via: Via, args: &[&str]) -> Command {
        let mut cmd = self.client_command(via, "pgbench");
        cmd.args(["-U", "postgres"]).args(args).arg("postgres");
        cmd
    }

    /// pgbench `via` a transport, failing the test if pgbench fails.
    pub fn pgbench_via(&self, via: Via, args: &[&str]) -> Result<Output> {
        let out = self
            .pgbench_command(via, args)
            .output()
            .context("running pgbench")?;
        if !out.status.success() {
            bail!(
                "pgbench ({via:?}) {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }

    /// pgbench `via` a transport, started in the background with its output
    /// piped: for a script whose statement the gate holds.
    pub fn pgbench_via_spawn(&self, via: Via, args: &[&str]) -> Result<Child> {
        spawn_piped(self.pgbench_command(via, args), "pgbench")
    }

    /// psql from the client namespace over plaintext TCP, started in the
    /// background.
    pub fn psql_spawn(&self, user: &str, db: &str, args: &[&str]) -> Result<Child> {
        self.psql_via_spawn(Via::Tcp, user, db, args)
    }

    /// psql from the client namespace over plaintext TCP, waited for.
    pub fn psql(&self, user: &str, db: &str, args: &[&str]) -> Result<Output> {
        self.psql_via(Via::Tcp, user, db, args)
    }

    /// psql -c over plaintext TCP, failing the test if psql itself fails.
    pub fn sql(&self, sql: &str) -> Result<String> {
        self.sql_via(Via::Tcp, sql)
    }

    /// pgbench from the client namespace over plaintext TCP.
    pub fn pgbench(&self, args: &[&str]) -> Result<Output> {
        self.pgbench_via(Via::Tcp, args)
    }

    /// Process ids of the server's client backends, except the one asking:
    /// to find a held session's backend and to check the one the store
    /// names. Asked over the Unix socket, which needs no network.
    pub fn backend_pids(&self) -> Result<Vec<u32>> {
        self.sql_via(
            Via::Unix,
            "SELECT pid FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
        )?
        .lines()
        .map(|l| {
            l.trim()
                .parse()
                .with_context(|| format!("backend pid {l:?}"))
        })
        .collect()
    }

    /// Polls `probe` until it returns `Some`, or fails after `timeout`.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut() -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        let mut last_err = None;
        while Instant::now() < deadline {
            match probe() {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(e) => last_err = Some(e),
            }
            thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "timed out after {timeout:?} waiting for {what} (last error: {last_err:?})\nagent log:\n{}",
            self.agent_log()
        )
    }

    /// A read-only connection to the agent's store.
    pub fn store(&self) -> Result<rusqlite::Connection> {
        let c = rusqlite::Connection::open_with_flags(
            self.db_path(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )?;
        c.busy_timeout(Duration::from_secs(5))?;
        Ok(c)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.postgres {
            quiet(
                self.in_server("runuser")
                    .args(["-u", "postgres", "--"])
                    .arg(format!("{PG_BIN}/pg_ctl"))
                    .arg("-D")
                    .arg(self.pg_data())
                    .args(["-m", "immediate", "stop"]),
            );
        }
        if std::env::var_os("QGATE_KEEP_LAB").is_none() {
            self.clear_stale();
        }
    }
}

/// See [`Lab::session`].
pub struct PsqlSession {
    child: Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
}

impl PsqlSession {
    /// Runs `sql` and returns its output lines joined, or fails after `timeout`.
    pub fn query(&mut self, sql: &str, timeout: Duration) -> Result<String> {
        const END: &str = "__qgate_session_end__";
        writeln!(self.stdin, "{sql};")?;
        writeln!(self.stdin, "\\echo {END}")?;
        self.stdin.flush()?;
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line == END => return Ok(out.join("\n")),
                Ok(line) => out.push(line),
                Err(_) => bail!("no answer to {sql:?} within {timeout:?}: {out:?}"),
            }
        }
    }
}

impl Drop for PsqlSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `f` on a fresh thread that has joined network namespace `ns` (named
/// under /var/run/netns). The namespace is per thread, so the caller's own
/// stays untouched; sockets made inside keep their namespace afterwards.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = format!("/var/run/netns/{ns}");
    let file = fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    thread::spawn(move || {
        // SAFETY: setns(2) on a descriptor we own; it changes only this thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {path}: {}", std::io::Error::last_os_error());
        }
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in namespace {ns} panicked"))?
}

/// Starts `cmd` in the background with stdout and stderr piped.
fn spawn_piped(mut cmd: Command, what: &str) -> Result<Child> {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what}"))
}

/// Runs `cmd` to completion with stdout and stderr captured, killing it when
/// it outlives `timeout`: a benchmark or test whose client hangs (a held
/// statement nobody releases) ends with an error instead of never.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err.join().unwrap_or_default();
            bail!(
                "{cmd:?} still running after {timeout:?}, killed: {}",
                String::from_utf8_lossy(&stderr)
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Reads a child's pipe to its end on a thread, so a chatty child never
/// blocks on a full pipe while we wait for it.
fn drain<R: std::io::Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    })
}

/// Waits for a client, reading its output as it comes (a big error message
/// must not fill the pipe and block it).
pub fn finish(mut child: Child, timeout: Duration) -> Result<(bool, String, String)> {
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut text);
            }
            text
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    match status {
        Some(status) => Ok((status.success(), out, err)),
        None => bail!(
            "the client did not finish within {timeout:?}; it printed: {out} / {}",
            &err[..err.len().min(600)]
        ),
    }
}

/// The e2e tests need root (namespaces, BPF). Under CI a non-root run is a
/// failure, never a silent skip.
pub fn require_root() {
    let uid = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .unwrap_or_default();
    assert_eq!(uid, "0", "end-to-end tests need root (namespaces, tc, BPF)");
}
