//! Settings from the AWS shared files, `~/.aws/credentials` and `~/.aws/config`, for the
//! profile `AWS_PROFILE` names (`default` without it).
//!
//! The environment comes first (`AWS_ACCESS_KEY_ID` and the rest, which object_store reads
//! itself); these files only fill in what it leaves unset, as the AWS tools do. Both are
//! plain INI files of which torpor reads five keys, so they are parsed here, in a few
//! lines, rather than through a crate of its own.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What a profile says, each key as the AWS files spell it.
#[derive(Debug, Default, PartialEq)]
pub struct Profile {
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
}

impl Profile {
    /// Reads the profile from the files the environment points at (`AWS_SHARED_CREDENTIALS_FILE`,
    /// `AWS_CONFIG_FILE`) or from `~/.aws`. A file that is missing or unreadable adds
    /// nothing: the request then fails for want of credentials, which names what is needed.
    pub fn load() -> Self {
        let name = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let file = |var: &str, default: &str| {
            std::env::var_os(var)
                .map(PathBuf::from)
                .or_else(|| home.as_ref().map(|h| h.join(default)))
        };
        let credentials = file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials");
        let config = file("AWS_CONFIG_FILE", ".aws/config");
        Self::from_files(&name, credentials.as_deref(), config.as_deref())
    }

    fn from_files(name: &str, credentials: Option<&Path>, config: Option<&Path>) -> Self {
        let read = |p: Option<&Path>| p.and_then(|p| std::fs::read_to_string(p).ok());
        let creds = read(credentials).map(|t| section(&t, name)).unwrap_or_default();
        // In the config file every profile but the default one is `[profile NAME]`.
        let config_name =
            if name == "default" { "default".to_string() } else { format!("profile {name}") };
        let conf = read(config).map(|t| section(&t, &config_name)).unwrap_or_default();
        let get = |key: &str| creds.get(key).or_else(|| conf.get(key)).cloned();
        Self {
            access_key_id: get("aws_access_key_id"),
            secret_access_key: get("aws_secret_access_key"),
            session_token: get("aws_session_token"),
            region: conf.get("region").cloned(),
            endpoint_url: conf.get("endpoint_url").cloned(),
        }
    }
}

/// The `key = value` lines of section `[name]` of an INI text (comments start with `#`
/// or `;`; indented lines belong to a nested block, such as `s3 =`, and are skipped).
fn section(text: &str, name: &str) -> HashMap<String, String> {
    let mut inside = false;
    let mut out = HashMap::new();
    for line in text.lines() {
        if line.starts_with([' ', '\t']) {
            continue;
        }
        let line = line.trim();
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = header.trim() == name;
            continue;
        }
        if let (true, Some((k, v))) = (inside, line.split_once('=')) {
            out.insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_named_profile_takes_keys_from_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("credentials");
        let config = dir.path().join("config");
        std::fs::write(
            &creds,
            "[default]\naws_access_key_id = D\n\n[work]\n# a comment\naws_access_key_id=K\n\
             aws_secret_access_key = S \n",
        )
        .unwrap();
        std::fs::write(
            &config,
            "[default]\nregion = eu-west-1\n[profile work]\nregion = garage\n\
             endpoint_url = http://127.0.0.1:3900\ns3 =\n  addressing_style = path\n",
        )
        .unwrap();
        let p = Profile::from_files("work", Some(&creds), Some(&config));
        assert_eq!(
            p,
            Profile {
                access_key_id: Some("K".into()),
                secret_access_key: Some("S".into()),
                session_token: None,
                region: Some("garage".into()),
                endpoint_url: Some("http://127.0.0.1:3900".into()),
            }
        );
        let d = Profile::from_files("default", Some(&creds), Some(&config));
        assert_eq!(d.access_key_id.as_deref(), Some("D"));
        assert_eq!(d.region.as_deref(), Some("eu-west-1"));
    }

    #[test]
    fn missing_files_add_nothing() {
        let p = Profile::from_files("default", Some(Path::new("/nonexistent/c")), None);
        assert_eq!(p, Profile::default());
    }
}
