//! The consumers an operator command looks at, from configuration: their
//! names (`--consumer`, `RELAY_CONSUMERS`) and, optionally, a consumer
//! catalog file (`--consumers-file`, `RELAY_CONSUMERS_FILE`) that also says
//! which service runs each and which event types its queue is bound to.
//! RabbitMQ does not report a queue's bindings over AMQP (only its
//! management API does, which may be off), so `describe` shows them from
//! the file and labels them so.
//!
//! The relay knows no service: the order pipeline's catalog is
//! `contracts/consumers.json`, checked against the services' own constants
//! by a test in `tests/` (`the_consumer_catalog_matches_the_services`).
//!
//! ```json
//! {"consumers": [{"name": "inventory", "service": "processor-service",
//!                 "bindings": ["order.created", "order.cancelled"]}]}
//! ```

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use serde::{Deserialize, Serialize};

/// A consumer: its name (queue and inbox name), and what the catalog file
/// says of it, if anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consumer {
    /// Consumer name, e.g. `inventory`.
    pub name: String,
    /// The service that runs it.
    #[serde(default)]
    pub service: Option<String>,
    /// Event types (routing keys) bound to its queue.
    #[serde(default)]
    pub bindings: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    consumers: Vec<Consumer>,
}

/// Reads a consumer catalog file.
pub fn load(path: &Path) -> anyhow::Result<Vec<Consumer>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the consumer catalog {}", path.display()))?;
    let file: CatalogFile = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a consumer catalog ({{\"consumers\": [{{\"name\": ..., \"bindings\": [...]}}]}})",
            path.display()
        )
    })?;
    Ok(file.consumers)
}

/// Which consumers a command looks at.
#[derive(Debug, Clone, Default, Args)]
pub struct ConsumerArgs {
    /// Consumers to look at (default: every consumer of the catalog file).
    #[arg(long = "consumer", env = "RELAY_CONSUMERS", value_delimiter = ',')]
    pub consumers: Vec<String>,
    /// A consumer catalog (JSON: names, services, bindings); the order pipeline's is
    /// contracts/consumers.json.
    #[arg(long = "consumers-file", env = "RELAY_CONSUMERS_FILE")]
    pub consumers_file: Option<PathBuf>,
}

impl ConsumerArgs {
    /// The consumers named, with what the catalog file says of each; all of
    /// the file's when none is named. Empty when nothing is configured.
    pub fn resolve(&self) -> anyhow::Result<Vec<Consumer>> {
        let known = match &self.consumers_file {
            Some(path) => load(path)?,
            None => Vec::new(),
        };
        let named: Vec<&str> = self.consumers.iter().map(|c| c.trim()).filter(|c| !c.is_empty()).collect();
        if named.is_empty() {
            return Ok(known);
        }
        Ok(named
            .into_iter()
            .map(|name| {
                known.iter().find(|c| c.name == name).cloned().unwrap_or_else(|| Consumer {
                    name: name.to_owned(),
                    service: None,
                    bindings: None,
                })
            })
            .collect())
    }

    /// Like [`Self::resolve`], but nothing configured is an error saying
    /// how to configure it.
    pub fn require(&self) -> anyhow::Result<Vec<Consumer>> {
        let consumers = self.resolve()?;
        anyhow::ensure!(!consumers.is_empty(), NO_CONSUMERS);
        Ok(consumers)
    }
}

/// The one line said when a command needs consumers and none is configured.
pub const NO_CONSUMERS: &str = "no consumers configured: pass --consumer NAME[,NAME...] (or RELAY_CONSUMERS), \
     or --consumers-file FILE (or RELAY_CONSUMERS_FILE; the order pipeline's is contracts/consumers.json)";

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn catalog() -> PathBuf {
        let path = std::env::temp_dir().join(format!("consumers-{}.json", std::process::id()));
        std::fs::write(&path, r#"{"consumers": [{"name": "a", "service": "s", "bindings": ["x.y"]}, {"name": "b"}]}"#)
            .unwrap();
        path
    }

    #[test]
    fn names_pick_from_the_file_and_unknown_names_stay_bare() {
        let file = catalog();
        let all = ConsumerArgs { consumers: vec![], consumers_file: Some(file.clone()) }.resolve().unwrap();
        assert_eq!(all.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        let picked = ConsumerArgs { consumers: vec!["b".into(), "a".into(), "z".into()], consumers_file: Some(file) }
            .resolve()
            .unwrap();
        assert_eq!(picked[1].bindings.as_deref(), Some(&["x.y".to_owned()][..]));
        assert_eq!(picked[2], Consumer { name: "z".into(), service: None, bindings: None });
    }

    #[test]
    fn nothing_configured_says_how() {
        let err = ConsumerArgs::default().require().unwrap_err().to_string();
        assert!(err.contains("--consumer") && err.contains("RELAY_CONSUMERS_FILE"), "{err}");
        let bad = std::env::temp_dir().join(format!("not-a-catalog-{}.json", std::process::id()));
        std::fs::write(&bad, "[]").unwrap();
        let err = ConsumerArgs { consumers: vec![], consumers_file: Some(bad) }.resolve().unwrap_err();
        assert!(format!("{err:#}").contains("is not a consumer catalog"), "{err:#}");
    }
}
