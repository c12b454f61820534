//! The agent's configuration file (`qgate.toml`); command-line flags override it.
use std::{net::SocketAddr, path::PathBuf};

use serde::Deserialize;

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
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub capture: CaptureConfig,
    pub store: StoreConfig,
    pub api: ApiConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CaptureConfig {
    /// Interfaces to attach to; empty means every interface that is up, `lo` included.
    #[serde(default)]
    pub interfaces: Vec<String>,
    /// TCP ports that carry PostgreSQL.
    pub ports: Vec<u16>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub path: PathBuf,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    pub listen: SocketAddr,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Policy file; absent means the built-in default policy.
    pub file: Option<PathBuf>,
}

impl Config {
    pub fn parse(text: &str, path: PathBuf) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse { path, source })
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

/// Every interface that is up (lo included), from /sys/class/net.
pub fn up_interfaces() -> std::io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir("/sys/class/net")? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let flags = std::fs::read_to_string(entry.path().join("flags")).unwrap_or_default();
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap_or(0);
        // IFF_UP (include/uapi/linux/if.h).
        if flags & 0x1 != 0 {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_parses_and_monitors_postgres_on_every_interface() {
        let c = Config::load(None).expect("shipped qgate.toml parses");
        assert_eq!(c.capture.ports, vec![5432]);
        assert!(c.capture.interfaces.is_empty());
        assert!(c.api.listen.ip().is_loopback());
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let text = DEFAULT_CONFIG.replace("[capture]", "[capture]\nportz = [1]");
        let err = Config::parse(&text, "x.toml".into())
            .unwrap_err()
            .to_string();
        assert!(err.contains("portz"), "{err}");
    }
}
