//! Settings, resolved in one place: command line > environment (`COMMONS_*`)
//! > TOML file (`--config`, or `config.toml` in the platform config directory)
//! > defaults.
//!
//! clap reads the command line and the environment (each flag names its
//! variable); this module layers the file and the defaults beneath them.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Environment variable naming the config file.
pub const ENV_CONFIG: &str = "COMMONS_CONFIG";
/// Environment variable naming the data directory.
pub const ENV_DATA_DIR: &str = "COMMONS_DATA_DIR";
/// Environment variable naming the key file.
pub const ENV_KEY: &str = "COMMONS_KEY";
/// The log filter when none is set: libp2p's per-swarm start-up line is noise
/// for members running short commands.
pub const DEFAULT_LOG: &str = "info,libp2p_swarm=warn";

/// Environment variable with the log filter (`tracing` directives); `RUST_LOG` also works.
pub const ENV_LOG: &str = "COMMONS_LOG";

/// The settings file, `config.toml`. Unknown keys are an error, so a typo is
/// never silently ignored.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSettings {
    /// Where the node keeps its key, caches and state.
    pub data_dir: Option<PathBuf>,
    /// The key file (default: `<data_dir>/node.key`).
    pub key: Option<PathBuf>,
    /// Log filter, e.g. `info,commons_node=debug`.
    pub log: Option<String>,
}

/// What the command line and environment gave (clap merges those two).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Overrides {
    /// `--config` / `COMMONS_CONFIG`.
    pub config: Option<PathBuf>,
    /// `--data-dir` / `COMMONS_DATA_DIR`.
    pub data_dir: Option<PathBuf>,
    /// `--key` / `COMMONS_KEY`.
    pub key: Option<PathBuf>,
    /// `--log` / `COMMONS_LOG`.
    pub log: Option<String>,
}

/// The settings in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Where the node keeps its key, caches and state.
    pub data_dir: PathBuf,
    /// The key file.
    pub key: PathBuf,
    /// Log filter.
    pub log: String,
    /// The config file read, if any.
    pub config_file: Option<PathBuf>,
}

/// Settings that could not be resolved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// The named config file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML for these settings.
    #[error("invalid config file {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// No home or data directory could be found and none was given.
    #[error("no data directory: pass --data-dir or set {ENV_DATA_DIR}")]
    NoDataDir,
}

/// Platform directories for Commons.
fn project_dirs() -> Option<directories::ProjectDirs> {
    directories::ProjectDirs::from("org", "Commons", "commons")
}

/// The default config file: `config.toml` in the platform config directory.
#[must_use]
pub fn default_config_path() -> Option<PathBuf> {
    project_dirs().map(|d| d.config_dir().join("config.toml"))
}

/// Reads a settings file.
pub fn read_file(path: &Path) -> Result<FileSettings, SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| SettingsError::Parse {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

impl Settings {
    /// Resolves the settings: `overrides` over the config file over defaults.
    ///
    /// A config file named explicitly must exist; the default one is optional.
    pub fn resolve(overrides: &Overrides) -> Result<Self, SettingsError> {
        let (file, config_file) = match &overrides.config {
            Some(path) => (read_file(path)?, Some(path.clone())),
            None => match default_config_path().filter(|p| p.is_file()) {
                Some(path) => (read_file(&path)?, Some(path)),
                None => (FileSettings::default(), None),
            },
        };
        let default_data_dir = || project_dirs().map(|d| d.data_dir().to_owned());
        Self::layer(overrides, file, config_file, default_data_dir)
    }

    /// The layering itself, with the default data directory passed in (for tests).
    pub fn layer(
        overrides: &Overrides,
        file: FileSettings,
        config_file: Option<PathBuf>,
        default_data_dir: impl FnOnce() -> Option<PathBuf>,
    ) -> Result<Self, SettingsError> {
        let data_dir = match overrides.data_dir.clone().or(file.data_dir) {
            Some(dir) => dir,
            None => default_data_dir().ok_or(SettingsError::NoDataDir)?,
        };
        let key = overrides
            .key
            .clone()
            .or(file.key)
            .unwrap_or_else(|| data_dir.join("node.key"));
        let log = overrides
            .log
            .clone()
            .or(file.log)
            .unwrap_or_else(|| DEFAULT_LOG.to_owned());
        Ok(Self {
            data_dir,
            key,
            log,
            config_file,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_beats_file_beats_default() {
        let file = FileSettings {
            data_dir: Some("/file/data".into()),
            key: None,
            log: Some("debug".into()),
        };
        let none = Overrides::default();
        let s = Settings::layer(&none, file.clone(), None, || Some("/default".into())).unwrap();
        assert_eq!(s.data_dir, PathBuf::from("/file/data"));
        assert_eq!(s.key, PathBuf::from("/file/data/node.key"));
        assert_eq!(s.log, "debug");

        let cli = Overrides {
            data_dir: Some("/cli".into()),
            key: Some("/k".into()),
            ..Overrides::default()
        };
        let s = Settings::layer(&cli, file, None, || Some("/default".into())).unwrap();
        assert_eq!(
            (s.data_dir, s.key, s.log),
            (
                PathBuf::from("/cli"),
                PathBuf::from("/k"),
                "debug".to_owned()
            )
        );

        let s = Settings::layer(&none, FileSettings::default(), None, || {
            Some("/default".into())
        })
        .unwrap();
        assert_eq!(
            (s.data_dir, s.log),
            (PathBuf::from("/default"), DEFAULT_LOG.to_owned())
        );
        assert!(matches!(
            Settings::layer(&none, FileSettings::default(), None, || None),
            Err(SettingsError::NoDataDir)
        ));
    }

    #[test]
    fn unknown_keys_in_the_file_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "data_dir = \"/x\"\ndata_dri = \"/typo\"\n").unwrap();
        assert!(matches!(read_file(&path), Err(SettingsError::Parse { .. })));
        std::fs::write(&path, "data_dir = \"/x\"\n").unwrap();
        assert_eq!(
            read_file(&path).unwrap().data_dir,
            Some(PathBuf::from("/x"))
        );
    }
}
