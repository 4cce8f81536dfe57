//! How operator commands report: their result on stdout (text for people,
//! `--json` for scripts), progress of long work on stderr.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

/// Prints a command's output (not a log) to stdout in one write: the lock
/// is never held across an await.
pub(crate) fn print(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// Prints `value` as pretty JSON (one document, then a newline).
pub(crate) fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    print(&format!("{}\n", serde_json::to_string_pretty(value)?))
}

/// Prints `value` as one line of JSON (`status --watch --json`: one
/// document per line, for `jq` and log shippers).
pub(crate) fn print_json_line(value: &impl Serialize) -> anyhow::Result<()> {
    print(&format!("{}\n", serde_json::to_string(value)?))
}

/// A plain progress line at most this often, besides every tenth of the way.
const LINE_EVERY: Duration = Duration::from_secs(5);

/// Progress of long work on stderr: a bar where stderr is a terminal;
/// plain lines (`requeue: 500/2000`) where it is not (a log, CI, a pipe),
/// because a bar's redraws make noise there; nothing at all with `--json`,
/// so a script reading stdout and stderr sees only the result.
pub(crate) struct Progress {
    mode: Mode,
}

enum Mode {
    Silent,
    Bar(ProgressBar),
    Lines { what: String, total: u64, done: u64, printed: Option<u64>, at: Instant },
}

impl Progress {
    /// Progress of `what` (a short verb, e.g. `requeue`) over `total` items.
    pub(crate) fn new(what: &str, total: u64, json: bool) -> Self {
        let mode = if json {
            Mode::Silent
        } else if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{prefix:>10} [{bar:40}] {pos}/{len} ({elapsed} elapsed, about {eta} left)",
            )
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_prefix(what.to_owned());
            Mode::Bar(bar)
        } else {
            Mode::Lines { what: what.to_owned(), total, done: 0, printed: None, at: Instant::now() }
        };
        let mut progress = Self { mode };
        progress.line(true);
        progress
    }

    /// The total changed (e.g. fewer messages were there than counted).
    pub(crate) fn set_total(&mut self, new_total: u64) {
        match &mut self.mode {
            Mode::Silent => {}
            Mode::Bar(bar) => bar.set_length(new_total),
            Mode::Lines { total, .. } => *total = new_total,
        }
    }

    /// `done` items of the total are done.
    pub(crate) fn set(&mut self, now: u64) {
        match &mut self.mode {
            Mode::Silent => {}
            Mode::Bar(bar) => bar.set_position(now),
            Mode::Lines { done, .. } => {
                *done = now;
                self.line(false);
            }
        }
    }

    /// One more item is done.
    pub(crate) fn inc(&mut self) {
        let now = match &self.mode {
            Mode::Silent => return,
            Mode::Bar(bar) => bar.position() + 1,
            Mode::Lines { done, .. } => done + 1,
        };
        self.set(now);
    }

    /// The work is over (done or not): the bar is cleared, a last plain
    /// line says where it ended.
    pub(crate) fn finish(mut self) {
        if let Mode::Bar(bar) = &self.mode {
            bar.finish_and_clear();
        }
        self.line(true);
    }

    /// Writes a plain line when forced, at each tenth of the way, at the
    /// end, or when the last one is old.
    fn line(&mut self, force: bool) {
        let Mode::Lines { what, total, done, printed, at } = &mut self.mode else { return };
        let tenth = |n: u64| n.saturating_mul(10).checked_div(*total).unwrap_or(10);
        let due = match *printed {
            None => true,
            Some(last) if last == *done => false,
            Some(last) => tenth(*done) > tenth(last) || *done >= *total || at.elapsed() >= LINE_EVERY,
        };
        if (force && *printed != Some(*done)) || due {
            eprintln!("{what}: {done}/{total}");
            *printed = Some(*done);
            *at = Instant::now();
        }
    }
}
