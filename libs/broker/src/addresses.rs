//! The broker's addresses: one AMQP URL, or several (the nodes of one
//! cluster) separated by commas, e.g.
//! `amqp://u:p@rmq-0:5672/%2f,amqp://u:p@rmq-1:5672/%2f`.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};
use tracing::{debug, info};

use crate::BrokerError;

/// How long one address may take to complete a connection (TCP, TLS, AMQP
/// handshake) before the next is tried: a node that is cut off without a
/// reset (a partition, a stalled link) would otherwise hold the client until
/// the kernel's TCP timeout, minutes later.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest frame this client asks for, unless the URL sets `frame_max`.
/// lapin keeps a receive and a send buffer of 32 frames per connection,
/// zero-filled when the size is negotiated: at RabbitMQ's 128 KiB that was
/// 8 MiB of resident memory per connection, and every consumer has one
/// (processor-service four). orderflow's messages are a few KiB; a larger
/// one is simply sent in more frames.
pub const FRAME_MAX: u32 = 16 * 1024;

/// A configured `AMQP_URL` that is not a list of AMQP URLs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Nothing but commas and spaces.
    #[error("no broker address given: expected amqp://user:password@host:port/vhost, several separated by commas")]
    Empty,
    /// One entry of the list is not an AMQP URL.
    #[error("broker address {position} of {count} ({entry}) is not an AMQP URL: {reason}")]
    Entry {
        /// 1-based position in the list.
        position: usize,
        /// How many entries the list has.
        count: usize,
        /// The entry, password masked.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The nodes a client may connect to, in the order given. Parsing checks
/// every entry, so a typo in the third address stops a service at start
/// rather than when the first two nodes are down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addresses {
    urls: Vec<String>,
}

impl Addresses {
    /// Parses a comma-separated list of `amqp://` or `amqps://` URLs
    /// (blanks around entries are ignored; an empty entry is an error).
    pub fn parse(list: &str) -> Result<Self, AddressError> {
        if list.split(',').all(|e| e.trim().is_empty()) {
            return Err(AddressError::Empty);
        }
        let entries: Vec<&str> = list.split(',').map(str::trim).collect();
        let count = entries.len();
        let mut urls = Vec::with_capacity(count);
        for (i, entry) in entries.into_iter().enumerate() {
            let bad = |reason: String| AddressError::Entry {
                position: i + 1,
                count,
                entry: if entry.is_empty() { "empty".to_owned() } else { mask(entry) },
                reason,
            };
            if entry.is_empty() {
                return Err(bad("nothing between the commas".into()));
            }
            if !entry.contains("://") {
                return Err(bad("expected amqp://user:password@host:port/vhost".into()));
            }
            let url = url::Url::parse(entry).map_err(|e| bad(e.to_string()))?;
            if !matches!(url.scheme(), "amqp" | "amqps") {
                return Err(bad(format!("scheme {} is not amqp or amqps", url.scheme())));
            }
            if url.host_str().is_none_or(str::is_empty) {
                return Err(bad("no host".into()));
            }
            // The client's own parser has the last word (query options such
            // as heartbeat); its message may quote the entry, so it is masked.
            AMQPUri::from_str(entry).map_err(|e| bad(e.replace(entry, &mask(entry))))?;
            urls.push(entry.to_owned());
        }
        Ok(Self { urls })
    }

    /// The URLs, in the order given.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// How many nodes are listed.
    pub fn len(&self) -> usize {
        self.urls.len()
    }

    /// Never true: parsing refuses an empty list.
    pub fn is_empty(&self) -> bool {
        self.urls.is_empty()
    }

    /// Every address, passwords masked, for logs and errors.
    pub fn redacted(&self) -> String {
        self.urls.iter().map(|u| mask(u)).collect::<Vec<_>>().join(",")
    }
}

/// Where the next connection of this process to an address list starts:
/// just past the address of the last connection made to it. So a client
/// whose connection was lost (its node stopped, crashed or was cut off)
/// tries the other nodes first, and a process's connections spread over
/// the nodes instead of all landing on the first. (A process has one or two
/// lists, so the map stays small.)
static NEXT: LazyLock<Mutex<HashMap<Vec<String>, usize>>> = LazyLock::new(Mutex::default);

fn next_start(addresses: &Addresses) -> usize {
    let next = NEXT.lock().unwrap_or_else(|e| e.into_inner());
    next.get(&addresses.urls).copied().unwrap_or(0) % addresses.len()
}

fn set_next(addresses: &Addresses, i: usize) {
    let mut next = NEXT.lock().unwrap_or_else(|e| e.into_inner());
    next.insert(addresses.urls.clone(), i % addresses.len());
}

/// Connects to the first of `addresses` that accepts within
/// [`CONNECT_TIMEOUT`], starting just past the node of the previous
/// connection this process made and going round the list once. Fails only
/// when every address failed; callers retry with their backoff.
pub async fn connect_any(addresses: &Addresses, name: &str) -> Result<Connection, BrokerError> {
    let urls = addresses.urls();
    let start = next_start(addresses);
    let mut failures = Vec::new();
    for k in 0..urls.len() {
        let i = (start + k) % urls.len();
        let url = &urls[i];
        let props = ConnectionProperties::default().with_connection_name(name.into());
        let connect = async {
            match AMQPUri::from_str(url) {
                Ok(mut uri) => {
                    uri.query.frame_max.get_or_insert(FRAME_MAX);
                    Connection::connect_uri(uri, props).await
                }
                // Checked when the list was parsed; lapin says what is wrong.
                Err(_) => Connection::connect(url, props).await,
            }
        };
        let reason = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(connection)) => {
                set_next(addresses, i + 1);
                if !failures.is_empty() {
                    info!(connection = name, node = %mask(url), skipped = %failures.join("; "), "connected to another broker node");
                }
                return Ok(connection);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {CONNECT_TIMEOUT:?}"),
        };
        debug!(connection = name, node = %mask(url), %reason, "broker node unavailable");
        failures.push(if urls.len() > 1 { format!("{}: {reason}", mask(url)) } else { reason });
    }
    // The next attempt starts one further on, whichever node failed first.
    set_next(addresses, start + 1);
    Err(BrokerError::Unreachable { url: addresses.redacted(), reason: failures.join("; ") })
}

/// `entry` with its password replaced by `***`, even when it does not parse
/// as a URL (the text between `://` and the last `@` before the host is the
/// user information).
fn mask(entry: &str) -> String {
    if let Ok(mut parsed) = url::Url::parse(entry) {
        if parsed.password().is_some() {
            let _ = parsed.set_password(Some("***"));
        }
        return parsed.to_string();
    }
    let Some(scheme_end) = entry.find("://") else { return entry.to_owned() };
    let rest = &entry[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            let masked = if userinfo.contains(':') { format!("{user}:***") } else { user.to_owned() };
            format!("{}{masked}{}", &entry[..scheme_end + 3], &rest[at..])
        }
        None => entry.to_owned(),
    }
}

/// A command-line value parser for `AMQP_URL`: checks every address and
/// keeps the text. Its error names the bad entry with its password masked
/// and, unlike a plain function parser, does not echo the whole value
/// (passwords and all) into the logs.
#[derive(Debug, Clone, Copy, Default)]
pub struct AmqpUrlsParser;

impl clap::builder::TypedValueParser for AmqpUrlsParser {
    type Value = String;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<String, clap::Error> {
        let name = arg.map_or_else(|| "AMQP_URL".to_owned(), |a| a.to_string());
        let fail = |msg: String| {
            clap::Error::raw(clap::error::ErrorKind::ValueValidation, format!("invalid value for {name}: {msg}\n"))
                .with_cmd(cmd)
        };
        let text = value.to_str().ok_or_else(|| fail("not UTF-8".into()))?;
        Addresses::parse(text).map_err(|e| fail(e.to_string()))?;
        Ok(text.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_or_several() {
        let one = Addresses::parse("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(one.len(), 1);
        let three = Addresses::parse(
            "amqp://u:p@rmq-0:5672/%2f, amqp://u:p@rmq-1:5672/%2f ,amqps://u:p@rmq-2/%2f?heartbeat=10",
        )
        .unwrap();
        assert_eq!(
            three.urls(),
            ["amqp://u:p@rmq-0:5672/%2f", "amqp://u:p@rmq-1:5672/%2f", "amqps://u:p@rmq-2/%2f?heartbeat=10"]
        );
        assert_eq!(
            three.redacted(),
            "amqp://u:***@rmq-0:5672/%2f,amqp://u:***@rmq-1:5672/%2f,amqps://u:***@rmq-2/%2f?heartbeat=10"
        );
    }

    #[test]
    fn a_bad_entry_is_named_by_position_with_its_password_masked() {
        let e = Addresses::parse("amqp://u:secret@a:5672/%2f,http://u:secret@b:5672/%2f").unwrap_err();
        assert_eq!(
            e.to_string(),
            "broker address 2 of 2 (http://u:***@b:5672/%2f) is not an AMQP URL: scheme http is not amqp or amqps"
        );
        let e = Addresses::parse("amqp://u:secret@a:5672/%2f,,amqp://u:secret@c/%2f").unwrap_err();
        assert_eq!(e.to_string(), "broker address 2 of 3 (empty) is not an AMQP URL: nothing between the commas");
        let e = Addresses::parse("amqp://u:secret@a:99999/%2f").unwrap_err().to_string();
        assert!(e.starts_with("broker address 1 of 1 (amqp://u:***@a:99999/%2f) is not an AMQP URL: "), "{e}");
        assert!(!e.contains("secret"), "{e}");
        let e = Addresses::parse("rabbit-0:5672").unwrap_err().to_string();
        assert_eq!(
            e,
            "broker address 1 of 1 (rabbit-0:5672) is not an AMQP URL: expected amqp://user:password@host:port/vhost"
        );
        let e = Addresses::parse("amqp://u:secret@a/%2f?heartbeat=soon").unwrap_err().to_string();
        assert!(e.starts_with("broker address 1 of 1 (amqp://u:***@a/%2f?heartbeat=soon)"), "{e}");
        assert!(!e.contains("secret"), "{e}");
        assert_eq!(Addresses::parse(" , ").unwrap_err(), AddressError::Empty);
    }

    #[test]
    fn the_command_line_error_is_one_line_without_the_password() {
        use clap::Parser;
        #[derive(Debug, Parser)]
        struct Cli {
            #[arg(long, value_parser = AmqpUrlsParser)]
            amqp_url: String,
        }
        let ok = Cli::try_parse_from(["x", "--amqp-url", "amqp://u:p@a/%2f,amqp://u:p@b/%2f"]).unwrap();
        assert_eq!(ok.amqp_url, "amqp://u:p@a/%2f,amqp://u:p@b/%2f");
        let e = Cli::try_parse_from(["x", "--amqp-url", "amqp://u:secret@a/%2f,b:5672"]).unwrap_err().to_string();
        let first = e.lines().next().unwrap_or_default();
        assert!(first.contains("--amqp-url"), "{e}");
        assert!(first.contains("broker address 2 of 2 (b:5672) is not an AMQP URL"), "{e}");
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn masks_passwords_of_entries_that_do_not_parse() {
        assert_eq!(mask("amqp://u:secret@a:99999/%2f"), "amqp://u:***@a:99999/%2f");
        assert_eq!(mask("amqp://u@a:99999/%2f"), "amqp://u@a:99999/%2f");
        assert_eq!(mask("no-scheme"), "no-scheme");
    }
}
