//! The targets topic: compacted, key = target id, value = the target as the TOML of one
//! `[[target]]` table (the same keys, the same parser and the same validation as
//! `agent.toml`; `targets list` prints a file `targets push` takes back), a tombstone (null
//! value) = removed. TOML rather than JSON: one format for targets everywhere, so an
//! operator moves a target between agent.toml and the fleet by cut and paste, and every error
//! message is the one agent.toml gives.
//!
//! `targets push FILE` makes the topic match FILE's `[[target]]` tables; `targets list`
//! prints what it holds (the latest value per key).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cli::TargetsAction;
use crate::config::{Config, ConfigError, FleetConfig, RawTarget};
use crate::kafka::{Client, KafkaError, RecordRef};

/// Why a `targets` command failed. Each keeps its cause.
#[derive(Debug)]
#[non_exhaustive]
pub enum TargetsError {
    /// The file cannot be read.
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A target of the file is invalid (names the file, line, target and field).
    Invalid(ConfigError),
    /// Kafka failed.
    Kafka(KafkaError),
}

impl fmt::Display for TargetsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetsError::Io { path, error } => write!(f, "{}: {error}", path.display()),
            TargetsError::Invalid(e) => e.fmt(f),
            TargetsError::Kafka(e) => write!(f, "Kafka: {e}"),
        }
    }
}

impl std::error::Error for TargetsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TargetsError::Io { error, .. } => Some(error),
            TargetsError::Invalid(e) => Some(e),
            TargetsError::Kafka(e) => Some(e),
        }
    }
}

impl From<KafkaError> for TargetsError {
    fn from(e: KafkaError) -> TargetsError {
        TargetsError::Kafka(e)
    }
}

/// One `[[target]]` of a file to push: its id, where it is, and its table.
#[derive(Clone, Debug, PartialEq)]
pub struct FileTarget {
    pub id: String,
    pub line: usize,
    pub table: toml::Table,
}

/// Top-level keys a targets file may hold besides `target`: an agent.toml can be pushed as it
/// is (only its targets go to the topic). Anything else is a typo (`[[targets]]`) that would
/// otherwise push no targets and remove every one.
const OTHER_TABLES: [&str; 6] = ["agent", "kafka", "postgres", "rules", "metrics", "fleet"];

/// Reads and validates the `[[target]]` tables of `path` as `cfg` would validate its own.
pub fn read_file(path: &Path, cfg: &Config) -> Result<Vec<FileTarget>, TargetsError> {
    let text = std::fs::read_to_string(path).map_err(|error| TargetsError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    let file = path.display().to_string();
    let invalid =
        |file: String, message: String| TargetsError::Invalid(ConfigError { file, message });
    let mut all: toml::Table = toml::from_str(&text)
        .map_err(|e| invalid(file.clone(), e.to_string().trim().replace('\n', " ")))?;
    if let Some(key) = all
        .keys()
        .find(|k| *k != "target" && !OTHER_TABLES.contains(&k.as_str()))
    {
        return Err(invalid(
            file,
            format!("unknown table {key:?}: a targets file holds [[target]] tables"),
        ));
    }
    let tables = match all.remove("target") {
        None => Vec::new(),
        Some(toml::Value::Array(a)) => a,
        Some(_) => return Err(invalid(file, "target: expected [[target]] tables".into())),
    };
    if tables.is_empty() {
        return Err(invalid(
            file,
            "no [[target]] tables (pushing none would remove every target)".into(),
        ));
    }
    // The n-th `[[target]]` header is the n-th table (the inline-array form has no headers).
    let headers: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.trim_start().starts_with("[[target]]"))
        .map(|(i, _)| i + 1)
        .collect();
    let mut out = Vec::with_capacity(tables.len());
    let mut seen = HashSet::new();
    for (i, value) in tables.into_iter().enumerate() {
        let line = headers.get(i).copied().unwrap_or(0);
        let at = if line > 0 {
            format!("{file}: line {line}")
        } else {
            format!("{file}: target #{}", i + 1)
        };
        let toml::Value::Table(table) = value else {
            return Err(invalid(at, "target: expected a table".into()));
        };
        let raw: RawTarget =
            toml::Value::Table(table.clone())
                .try_into()
                .map_err(|e: toml::de::Error| {
                    invalid(at.clone(), format!("target: {}", e.message().trim()))
                })?;
        let target = cfg
            .validate_target(&at, &raw)
            .map_err(TargetsError::Invalid)?;
        if !seen.insert(target.id.clone()) {
            return Err(invalid(at, format!("target {:?}: duplicate id", target.id)));
        }
        out.push(FileTarget {
            id: target.id,
            line,
            table,
        });
    }
    Ok(out)
}

/// What a push changes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    pub unchanged: usize,
}

impl fmt::Display for Diff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (sign, ids) in [
            ("+", &self.added),
            ("~", &self.changed),
            ("-", &self.removed),
        ] {
            for id in ids.iter() {
                writeln!(f, "{sign} {id}")?;
            }
        }
        write!(
            f,
            "{} added, {} changed, {} removed, {} unchanged",
            self.added.len(),
            self.changed.len(),
            self.removed.len(),
            self.unchanged
        )
    }
}

/// The diff that makes `current` (id → value text, as in the topic) match `wanted`.
pub fn diff(current: &BTreeMap<String, String>, wanted: &[FileTarget]) -> Diff {
    let mut d = Diff::default();
    let ids: HashSet<&str> = wanted.iter().map(|t| t.id.as_str()).collect();
    for t in wanted {
        match current.get(&t.id) {
            None => d.added.push(t.id.clone()),
            // Compared as tables: formatting and key order do not count as a change.
            Some(v) if toml::from_str::<toml::Table>(v).ok().as_ref() == Some(&t.table) => {
                d.unchanged += 1
            }
            Some(_) => d.changed.push(t.id.clone()),
        }
    }
    d.removed = current
        .keys()
        .filter(|id| !ids.contains(id.as_str()))
        .cloned()
        .collect();
    d
}

/// How long each fetch of a partition being read to its end may wait. Not zero: a newer
/// tansu answers zero-wait fetches with nothing.
const READ_WAIT: Duration = Duration::from_millis(20);

/// The whole topic: id → latest value, tombstoned ids left out. A missing topic is empty.
pub fn read_all(client: &mut Client, topic: &str) -> Result<BTreeMap<String, String>, KafkaError> {
    let partitions = match client.partitions(topic) {
        Ok(p) => p,
        Err(KafkaError::UnknownTopic(_)) => return Ok(BTreeMap::new()),
        Err(e) => return Err(e),
    };
    let mut out = BTreeMap::new();
    for p in partitions {
        let mut offset = client.earliest_offset(topic, p)?;
        let end = client.latest_offset(topic, p)?;
        while offset < end {
            let f = client.fetch(topic, p, offset, 1 << 20, READ_WAIT)?;
            for r in f.records {
                let Some(key) = r.key.and_then(|k| String::from_utf8(k).ok()) else {
                    continue;
                };
                match r.value.map(String::from_utf8) {
                    Some(Ok(v)) => {
                        out.insert(key, v);
                    }
                    Some(Err(_)) => {
                        log::warn!(target: "sitewatch::fleet", "topic {topic}: target {key:?}: value is not UTF-8; left out")
                    }
                    None => {
                        out.remove(&key);
                    }
                }
            }
            offset = offset.max(f.next_offset);
            if f.high_watermark.is_some_and(|hw| offset >= hw) {
                break;
            }
        }
    }
    Ok(out)
}

/// Creates the targets topic when missing: compacted, `[fleet] partitions` of them. Used by
/// `targets push` and by an agent before it joins its group.
pub fn ensure(
    client: &mut Client,
    fleet: &FleetConfig,
    replication_factor: i16,
) -> Result<(), KafkaError> {
    client.ensure_topic_with(
        &fleet.targets_topic,
        fleet.partitions,
        replication_factor,
        &[("cleanup.policy", "compact")],
    )
}

/// `targets push`: the topic made to match `wanted` (created compacted when missing). With
/// `dry_run` nothing is written. Returns the diff.
pub fn push(
    client: &mut Client,
    fleet: &FleetConfig,
    replication_factor: i16,
    wanted: &[FileTarget],
    dry_run: bool,
) -> Result<Diff, TargetsError> {
    let topic = &fleet.targets_topic;
    let current = read_all(client, topic)?;
    let d = diff(&current, wanted);
    if dry_run {
        return Ok(d);
    }
    ensure(client, fleet, replication_factor)?;
    let values: BTreeMap<&str, String> = wanted
        .iter()
        .filter(|t| d.added.contains(&t.id) || d.changed.contains(&t.id))
        .map(|t| (t.id.as_str(), toml::to_string(&t.table).unwrap_or_default()))
        .collect();
    let now = crate::util::unix_ms_now();
    let mut records: Vec<RecordRef<'_>> = values
        .iter()
        .map(|(id, v)| RecordRef {
            key: id.as_bytes(),
            value: Some(v.as_bytes()),
            timestamp_ms: now,
        })
        .collect();
    records.extend(d.removed.iter().map(|id| RecordRef {
        key: id.as_bytes(),
        value: None,
        timestamp_ms: now,
    }));
    client.produce_refs(topic, &records)?;
    Ok(d)
}

/// `sitewatch targets push|list` with `cfg` (its `[kafka]`; its `[fleet]` or the defaults):
/// what to print.
pub fn command(cfg: &Config, action: &TargetsAction) -> Result<String, TargetsError> {
    let kafka = cfg.kafka.as_ref().ok_or_else(|| {
        TargetsError::Invalid(ConfigError {
            file: cfg.source.display().to_string(),
            message: "`sitewatch targets` needs a [kafka] section (or SITEWATCH_KAFKA_BROKERS)"
                .into(),
        })
    })?;
    let fleet = cfg.fleet.clone().unwrap_or_default();
    let mut client = Client::connect(kafka)?;
    match action {
        TargetsAction::List => Ok(list(&mut client, &fleet.targets_topic)?),
        TargetsAction::Push { file, dry_run } => {
            let wanted = read_file(file, cfg)?;
            let d = push(
                &mut client,
                &fleet,
                kafka.replication_factor,
                &wanted,
                *dry_run,
            )?;
            let note = if *dry_run {
                " (dry run: nothing written)"
            } else {
                ""
            };
            Ok(format!("{d}{note}\n"))
        }
    }
}

/// `targets list`: the topic as a targets file (`[[target]]` tables, by id).
pub fn list(client: &mut Client, topic: &str) -> Result<String, KafkaError> {
    let mut out = String::new();
    for (id, value) in read_all(client, topic)? {
        out.push_str(&format!("# key {id:?}\n[[target]]\n{value}\n"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::parse("", Path::new("/etc/agent.toml"), &|_| None).unwrap()
    }

    fn file(text: &str) -> Result<Vec<FileTarget>, TargetsError> {
        let dir = std::env::temp_dir().join(format!("sitewatch-targets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("t{}.toml", text.len()));
        std::fs::write(&path, text).unwrap();
        let r = read_file(&path, &cfg());
        let _ = std::fs::remove_file(&path);
        r
    }

    #[test]
    fn a_bad_target_is_refused_with_file_line_target_and_field() {
        let text = "[[target]]\nid = \"a\"\nurl = \"http://127.0.0.1/\"\n\n\
                    [[target]]\nid = \"b\"\nurl = \"http://127.0.0.1/\"\ninterval = \"5x\"\n";
        let err = file(text).unwrap_err().to_string();
        assert!(
            err.contains(".toml: line 5: target \"b\": interval \"5x\""),
            "{err}"
        );
        let err = file("[[target]]\nid = \"a\"\nurl = \"http://127.0.0.1/\"\nintervall = \"5s\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 1: target: unknown field `intervall`"),
            "{err}"
        );
        let err = file("[[targets]]\nid = \"a\"\n").unwrap_err().to_string();
        assert!(err.contains("unknown table \"targets\""), "{err}");
        let dup = "[[target]]\nid = \"a\"\nurl = \"http://127.0.0.1/\"\n[[target]]\nid = \"a\"\nurl = \"http://127.0.0.1/\"\n";
        let err = file(dup).unwrap_err().to_string();
        assert!(err.contains("line 4: target \"a\": duplicate id"), "{err}");
    }

    #[test]
    fn diff_adds_changes_removes_and_ignores_formatting() {
        let wanted = file(
            "[agent]\ninterval = \"1m\"\n[[target]]\nid = \"a\"\nurl = \"http://127.0.0.1/a\"\n\
             [[target]]\nid = \"b\"\nurl = \"http://127.0.0.1/b\"\ninterval = \"5s\"\n\
             [[target]]\nid = \"c\"\nurl = \"http://127.0.0.1/c\"\n",
        )
        .unwrap();
        let mut current = BTreeMap::new();
        current.insert(
            "a".to_string(),
            "url = 'http://127.0.0.1/a'\nid = \"a\"\n".to_string(),
        );
        current.insert(
            "b".to_string(),
            "id = \"b\"\nurl = \"http://127.0.0.1/b\"\n".to_string(),
        );
        current.insert(
            "z".to_string(),
            "id = \"z\"\nurl = \"http://127.0.0.1/z\"\n".to_string(),
        );
        let d = diff(&current, &wanted);
        assert_eq!(d.added, vec!["c"]);
        assert_eq!(d.changed, vec!["b"]);
        assert_eq!(d.removed, vec!["z"]);
        assert_eq!(d.unchanged, 1);
        assert!(
            d.to_string()
                .ends_with("1 added, 1 changed, 1 removed, 1 unchanged")
        );
    }
}
