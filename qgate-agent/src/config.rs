//! The agent's configuration file (`qgate.toml`); command-line flags override it.
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};

use crate::policy::{
    estimate::{DeferredEstimator, EstimateError, EstimatorConfig, ExplainEstimator},
    NoEstimator, RowEstimator,
};

/// The shipped, documented default configuration.
pub const DEFAULT_CONFIG: &str = include_str!("../qgate.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub capture: CaptureConfig,
    pub store: StoreConfig,
    pub api: ApiConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
    pub gate: GateConfig,
    #[serde(default)]
    pub server_hook: ServerHookConfig,
    #[serde(default)]
    pub catalog: CatalogConfig,
    #[serde(default)]
    pub webhooks: WebhooksConfig,
    #[serde(default)]
    /// Every audit record, as it happens, to a log pipeline.
    pub audit_stream: crate::store::stream::StreamConfig,
}

/// Where request events are posted (chat, paging, ticketing).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// URLs each request event is POSTed to; none: no webhooks.
    pub urls: Vec<String>,
    /// Slack incoming-webhook URLs (a message with the statement, who sent
    /// it and a link to the request in the inbox).
    pub slack_urls: Vec<String>,
    /// The inbox as reviewers reach it, for those links; default: the API's
    /// listen address.
    pub inbox_url: Option<String>,
    /// File holding the HMAC-SHA256 key that signs each delivery
    /// (`X-Qgate-Signature`); absent: unsigned, with a warning.
    pub secret_file: Option<PathBuf>,
    /// Attempts per delivery, the first included.
    pub max_attempts: Option<u32>,
    /// Time limit for one attempt.
    pub timeout_ms: Option<u64>,
}

/// Reading each database's catalog for what can run user code.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CatalogConfig {
    /// Read the catalog of every database the gated server's sessions use
    /// (over its Unix socket, as the user the server runs as) and hold what
    /// reaches user code. Off: user functions, operators, casts, views and
    /// triggers are judged by name only, and the kernel passes plain reads.
    pub enabled: bool,
}

impl Default for CatalogConfig {
    fn default() -> Self {
        CatalogConfig { enabled: true }
    }
}

/// The second capture point, inside the PostgreSQL servers.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerHookConfig {
    /// Read and hold the sessions of the servers on `capture.ports` inside
    /// the server process (which ones: `probes`).
    pub enabled: bool,
    /// How often the agent looks for servers started after it.
    pub rescan_ms: u64,
    /// Where the read and write probes go (see [`HookProbes`]).
    pub probes: HookProbes,
}

impl Default for ServerHookConfig {
    fn default() -> Self {
        ServerHookConfig {
            enabled: true,
            rescan_ms: 2000,
            probes: HookProbes::EveryBackend,
        }
    }
}

/// Where the server hook's read and write probes go: the trade between a
/// cost per statement and a cost per connection.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum HookProbes {
    /// On the server binary: every backend's reads and writes trap, and the
    /// hook reads every session, plaintext TCP included. Nothing is added
    /// to a connection's start.
    EveryBackend,
    /// On each backend the tc programs cannot read (Unix socket, TLS,
    /// GSSAPI), attached when it starts: plaintext TCP sessions never trap
    /// (the wire reads them), but each of those other connections waits
    /// for the attach, which the kernel makes wait for an RCU grace period
    /// (0.1–0.4 s measured here).
    PerSession,
}

/// How statements are gated.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum GateSetting {
    /// Capture and audit only; never hold.
    Monitor,
    /// Hold what the policy says, per connection from its identity.
    Policy,
}

/// What the tc program does while the agent is gone.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum FailMode {
    /// Pass everything (and count it).
    Open,
    /// Keep holding what needs a decision.
    Closed,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GateConfig {
    pub mode: GateSetting,
    pub fail: FailMode,
    /// The agent counts as gone after this long without a heartbeat.
    pub fail_after_ms: u64,
    /// A held statement not decided within this is denied. Must stay well
    /// below what the client's TCP tolerates (tcp_retries2 = 15: ~15 min).
    pub hold_timeout_s: u64,
    /// bpffs directory for pinned maps and links (a `v<N>` directory is made in it).
    pub pin_dir: PathBuf,
    /// What happens to a session qgate cannot read (TLS or GSSAPI
    /// encryption where only the wire path sees it).
    #[serde(default)]
    pub unreadable: Unreadable,
    /// After a restart, how long a statement the previous agent held may
    /// take to come back (its client retransmits it at least every 120 s)
    /// before its request is withdrawn: its connection is gone.
    #[serde(default = "default_recovery_grace_s")]
    pub recovery_grace_s: u64,
}

fn default_recovery_grace_s() -> u64 {
    150
}

/// A session qgate cannot read: TLS or GSSAPI-encrypted TCP on a port the
/// server hook does not read (the hook is off, or could not attach).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Unreadable {
    /// Reset before its TLS handshake, once the server accepted TLS (audited).
    #[default]
    Refuse,
    /// Let through unread; recorded as an encrypted connection.
    Allow,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CaptureConfig {
    /// Interfaces to attach to; empty means every interface that is up, `lo` included.
    #[serde(default)]
    pub interfaces: Vec<String>,
    /// TCP ports that carry PostgreSQL.
    pub ports: Vec<u16>,
    /// TCP ports that carry MySQL/MariaDB: read, audited and gated on the
    /// wire (`port_kind::MYSQL`). 3306 unless set (`[]` for none).
    #[serde(default = "default_mysql_ports")]
    pub mysql_ports: Vec<u16>,
    /// The agent's scheduling niceness (-20 … 19), set before it starts any
    /// thread. Below 0 (as auditd's `priority_boost`), so that a saturated
    /// server does not starve the capture into dropping statements: the
    /// agent takes what it needs and no more (it sleeps when idle). At -5
    /// the store writer, preempted by 32 busy backends on 2 cores, fell
    /// behind and dropped 40 % of 124 k statements/s; at -10 none. The store
    /// writer takes it only while it is behind (`store::writer::Pace`).
    #[serde(default = "default_nice")]
    pub nice: i32,
}

fn default_mysql_ports() -> Vec<u16> {
    vec![3306]
}

fn default_nice() -> i32 {
    -10
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub path: PathBuf,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// PEM certificate chain and key: serve HTTPS. Required for an address
    /// other than loopback unless `allow_plaintext_remote`.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Plaintext on a non-loopback address, knowingly (TLS terminated in front).
    #[serde(default)]
    pub allow_plaintext_remote: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Policy file; absent means the built-in default policy.
    pub file: Option<PathBuf>,
    /// The agent's own read-only connection for `estimated_rows_above`
    /// (libpq-style `host=… port=… user=… dbname=…`). Absent: no estimates,
    /// and such conditions count as exceeded (fail closed).
    pub estimator: Option<String>,
    /// Time limit for one EXPLAIN estimate.
    pub estimator_timeout_ms: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            file: None,
            estimator: None,
            estimator_timeout_ms: 2000,
        }
    }
}

impl PolicyConfig {
    /// What answers `estimated_rows_above` under this configuration.
    pub fn row_estimator(&self) -> Result<Box<dyn RowEstimator + Send + Sync>, EstimateError> {
        Ok(match &self.estimator {
            Some(conninfo) => Box::new(ExplainEstimator::new(
                EstimatorConfig::from_conninfo(conninfo)?,
                Duration::from_millis(self.estimator_timeout_ms),
            )),
            None => Box::new(NoEstimator),
        })
    }

    /// What answers estimate conditions in the live gate: the planner asked
    /// off the capture loop ([`DeferredEstimator`]; `wake` rings when an
    /// answer is in, and the counter returned goes up), or nothing.
    pub fn gate_estimator(
        &self,
        wake: Box<dyn Fn() + Send + Sync>,
    ) -> Result<GateEstimator, EstimateError> {
        let Some(conninfo) = &self.estimator else {
            return Ok((Box::new(NoEstimator), None));
        };
        let explain = ExplainEstimator::new(
            EstimatorConfig::from_conninfo(conninfo)?,
            Duration::from_millis(self.estimator_timeout_ms),
        );
        let timeout = explain.timeout;
        let ask: crate::policy::estimate::Ask = Arc::new(move |sql: &str| {
            crate::policy::estimate::explain(&explain.config, sql, explain.timeout)
                .map_err(|e| e.to_string())
        });
        // Waiting in the queue behind another estimate, then its own timeout.
        let deferred = DeferredEstimator::start(ask, timeout * 2 + Duration::from_secs(1), wake);
        let generation = deferred.generation();
        Ok((Box::new(deferred), Some(generation)))
    }
}

/// See [`PolicyConfig::gate_estimator`].
pub type GateEstimator = (
    Box<dyn RowEstimator + Send + Sync>,
    Option<Arc<std::sync::atomic::AtomicU64>>,
);

/// Longest hold the client's TCP survives with margin: tcp_retries2 = 15
/// gives about 924 s before the kernel gives up on the connection.
pub const MAX_HOLD_TIMEOUT_S: u64 = 840;

impl Config {
    /// A configuration file over the shipped defaults: a key the file
    /// leaves out has the value `qgate.toml` documents.
    pub fn parse(text: &str, path: PathBuf) -> Result<Self, ConfigError> {
        let parse_error = |source| ConfigError::Parse {
            path: path.clone(),
            source,
        };
        let mut merged: toml::Table = toml::from_str(DEFAULT_CONFIG).map_err(parse_error)?;
        let given: toml::Table = toml::from_str(text).map_err(parse_error)?;
        overlay(&mut merged, given);
        let config: Config = merged.try_into().map_err(parse_error)?;
        config
            .validate()
            .map_err(|message| ConfigError::Invalid { path, message })?;
        Ok(config)
    }

    /// Checks what the types cannot say.
    pub fn validate(&self) -> Result<(), String> {
        if self.api.tls_cert.is_some() != self.api.tls_key.is_some() {
            return Err("api.tls_cert and api.tls_key: give both or neither".into());
        }
        if !(-20..=19).contains(&self.capture.nice) {
            return Err(format!(
                "capture.nice: {} is not in -20 … 19",
                self.capture.nice
            ));
        }
        if let Some(port) = self
            .capture
            .mysql_ports
            .iter()
            .find(|p| self.capture.ports.contains(p))
        {
            return Err(format!(
                "capture.mysql_ports: port {port} is also in capture.ports (PostgreSQL): a port \
                 carries one protocol (capture.mysql_ports is [3306] unless set; \
                 `mysql_ports = []` for none)"
            ));
        }
        if self.capture.ports.is_empty() {
            return Err("capture.ports: at least one port".into());
        }
        if self.gate.hold_timeout_s == 0 || self.gate.hold_timeout_s > MAX_HOLD_TIMEOUT_S {
            return Err(format!(
                "gate.hold_timeout_s = {}: must be between 1 and {MAX_HOLD_TIMEOUT_S} \
                 (the client's TCP gives up after about 15 minutes)",
                self.gate.hold_timeout_s
            ));
        }
        if let Err(e) = self.policy.row_estimator() {
            return Err(format!("policy.estimator: {e}"));
        }
        if self.policy.estimator_timeout_ms == 0 {
            return Err("policy.estimator_timeout_ms: at least 1".into());
        }
        if let Some(target) = &self.audit_stream.syslog {
            crate::store::stream::check_target(target)
                .map_err(|e| format!("audit_stream.syslog: {e}"))?;
        }
        if crate::store::stream::facility_code(&self.audit_stream.syslog_facility).is_none() {
            return Err(format!(
                "audit_stream.syslog_facility: unknown facility `{}` (auth, authpriv, daemon, local0 … local7, …)",
                self.audit_stream.syslog_facility
            ));
        }
        if self.audit_stream.jsonl_max_bytes < 4096 || self.audit_stream.jsonl_keep == 0 {
            return Err(
                "audit_stream: jsonl_max_bytes at least 4096, jsonl_keep at least 1".into(),
            );
        }
        if self.gate.fail_after_ms < 100 {
            return Err("gate.fail_after_ms: at least 100 (heartbeats come every 250 ms)".into());
        }
        Ok(())
    }

    /// Reads `path`, or the shipped default when `None`.
    pub fn load(path: Option<&std::path::Path>) -> Result<Self, ConfigError> {
        match path {
            None => Self::parse(DEFAULT_CONFIG, PathBuf::from("<built-in qgate.toml>")),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Self::parse(&text, path.to_owned())
            }
        }
    }
}

/// Puts `given` over `base`, table by table (a value replaces; a table merges).
fn overlay(base: &mut toml::Table, given: toml::Table) {
    for (key, value) in given {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(into)), toml::Value::Table(from)) => overlay(into, from),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Every interface that is up (lo included), in this network namespace.
pub fn up_interfaces() -> std::io::Result<Vec<String>> {
    // getifaddrs(3) asks the kernel over netlink, so it answers for this
    // process's network namespace even where /sys was mounted for another
    // (`nsenter --net`, a container sharing the host's /sys).
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut names = std::collections::BTreeSet::new();
    let mut at = head;
    while !at.is_null() {
        // SAFETY: a node of the list getifaddrs returned, freed only below.
        let node = unsafe { &*at };
        if node.ifa_flags & libc::IFF_UP as u32 != 0 && !node.ifa_name.is_null() {
            // SAFETY: ifa_name is a NUL-terminated interface name.
            let name = unsafe { std::ffi::CStr::from_ptr(node.ifa_name) };
            names.insert(name.to_string_lossy().into_owned());
        }
        at = node.ifa_next;
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(names.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped file with its commented `# key = value` examples made real.
    fn every_documented_key() -> String {
        DEFAULT_CONFIG
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest)
                    if rest.split_once(" = ").is_some_and(|(k, _)| {
                        k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                    }) =>
                {
                    rest.to_owned()
                }
                _ => line.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn key_paths(value: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
        if let serde_json::Value::Object(map) = value {
            for (key, v) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                if v.is_object() {
                    key_paths(v, &path, out);
                } else {
                    out.push(path);
                }
            }
        }
    }

    #[test]
    fn every_key_is_documented_once_in_the_shipped_file() {
        let text = every_documented_key();
        // Every documented key is one the agent reads (unknown keys are errors)…
        let config = Config::parse(&text, "documented".into()).expect("the documented keys parse");
        let table: toml::Table = toml::from_str(&text).unwrap();
        let mut documented = Vec::new();
        key_paths(&serde_json::to_value(&table).unwrap(), "", &mut documented);
        // …and every key the agent reads is documented.
        let mut read = Vec::new();
        key_paths(&serde_json::to_value(&config).unwrap(), "", &mut read);
        documented.sort();
        read.sort();
        assert_eq!(documented, read);
        let mut unique = documented.clone();
        unique.dedup();
        assert_eq!(unique, documented, "a key documented twice");
    }

    #[test]
    fn a_key_left_out_keeps_its_documented_default() {
        let config = Config::parse("[gate]\nfail = \"open\"\n", "partial".into()).unwrap();
        let shipped = Config::load(None).unwrap();
        assert_eq!(config.api.listen, shipped.api.listen);
        assert_eq!(config.capture.ports, shipped.capture.ports);
        assert_eq!(config.gate.fail, FailMode::Open);
        assert_eq!(config.gate.hold_timeout_s, shipped.gate.hold_timeout_s);
    }

    #[test]
    fn shipped_config_parses_and_monitors_postgres_on_every_interface() {
        let c = Config::load(None).expect("shipped qgate.toml parses");
        assert_eq!(c.capture.ports, vec![5432]);
        assert!(c.capture.interfaces.is_empty());
        assert!(c.api.listen.ip().is_loopback());
    }

    #[test]
    fn hold_timeout_beyond_what_tcp_survives_is_refused() {
        let text = DEFAULT_CONFIG.replace("hold_timeout_s = 600", "hold_timeout_s = 3600");
        let err = Config::parse(&text, "x.toml".into())
            .unwrap_err()
            .to_string();
        assert!(err.contains("hold_timeout_s"), "{err}");
    }

    #[test]
    fn the_hooks_probe_placement_is_named_and_checked() {
        assert_eq!(
            ServerHookConfig::default().probes,
            HookProbes::EveryBackend,
            "no cost at a connection's start unless asked"
        );
        let config = Config::parse(
            "[server_hook]\nprobes = \"per-session\"\n",
            "partial".into(),
        )
        .unwrap();
        assert_eq!(config.server_hook.probes, HookProbes::PerSession);
        let err = Config::parse("[server_hook]\nprobes = \"some\"\n", "bad".into()).unwrap_err();
        assert!(format!("{err:#}").contains("probes"), "{err:#}");
    }

    #[test]
    fn shipped_config_has_no_estimator_so_row_limits_fail_closed() {
        let c = Config::load(None).expect("shipped qgate.toml parses");
        assert_eq!(c.policy.estimator, None);
        assert_eq!(c.policy.estimator_timeout_ms, 2000);
    }

    #[test]
    fn estimator_connection_that_cannot_be_read_is_refused_naming_the_key() {
        let text = DEFAULT_CONFIG.replace(
            "[policy]",
            "[policy]\nestimator = \"host=db port=fivefourthreetwo\"",
        );
        let err = Config::parse(&text, "x.toml".into())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("policy.estimator") && err.contains("fivefourthreetwo"),
            "{err}"
        );
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let text = DEFAULT_CONFIG.replace("[capture]", "[capture]\nportz = [1]");
        let err = Config::parse(&text, "x.toml".into())
            .unwrap_err()
            .to_string();
        assert!(err.contains("portz"), "{err}");
    }

    #[test]
    fn mysql_ports_default_to_3306_and_are_never_shared_with_postgresql() {
        let parse = |text: &str| Config::parse(text, "x.toml".into());
        assert_eq!(
            parse(DEFAULT_CONFIG).unwrap().capture.mysql_ports,
            vec![3306]
        );
        // A config written without the key gets the default too.
        let text = DEFAULT_CONFIG.replace("mysql_ports = [3306]\n", "");
        assert_ne!(text, DEFAULT_CONFIG);
        assert_eq!(parse(&text).unwrap().capture.mysql_ports, vec![3306]);
        let text = DEFAULT_CONFIG.replace("mysql_ports = [3306]", "mysql_ports = []");
        assert!(parse(&text).unwrap().capture.mysql_ports.is_empty());
        let text = DEFAULT_CONFIG.replace("ports = [5432]", "ports = [3306]");
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("3306") && err.contains("mysql_ports = []"),
            "{err}"
        );
        let text = DEFAULT_CONFIG.replace("mysql_ports = [3306]", "mysql_ports = [5432]");
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("5432") && err.contains("one protocol"),
            "{err}"
        );
    }

    #[test]
    fn niceness_out_of_range_is_refused_and_the_shipped_one_boosts() {
        let shipped = Config::parse(DEFAULT_CONFIG, "x.toml".into()).unwrap();
        assert_eq!(shipped.capture.nice, -10);
        let text = DEFAULT_CONFIG.replace("nice = -10", "nice = -21");
        let err = Config::parse(&text, "x.toml".into())
            .unwrap_err()
            .to_string();
        assert!(err.contains("capture.nice") && err.contains("-21"), "{err}");
    }
}
