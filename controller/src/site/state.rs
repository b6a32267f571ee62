//! What a site keeps in its state dir: each group's standing (its term and role, so that a
//! restart brings no surprise), and the journal of every decision, one JSON object a line.
//!
//! ```text
//!  STATE_DIR/standing/GROUP.json   {"term": 1, "active": true}    written before it is acted on
//!  STATE_DIR/events.jsonl          {"unix_ms": .., "site": .., "group": .., "event": {..}}
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::failover::{Event, Standing};

/// A site's state dir.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    journal: File,
}

impl StateDir {
    pub fn open(dir: &Path) -> io::Result<StateDir> {
        std::fs::create_dir_all(dir.join("standing"))?;
        let journal = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("events.jsonl"))?;
        Ok(StateDir {
            dir: dir.to_owned(),
            journal,
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn standing_file(&self, group: &str) -> PathBuf {
        self.dir.join("standing").join(format!("{group}.json"))
    }

    /// The standing last saved for `group`, if any (a damaged file reads as none, and says so).
    pub fn standing(&self, group: &str) -> Option<Standing> {
        let file = self.standing_file(group);
        let text = std::fs::read_to_string(&file).ok()?;
        match serde_json::from_str(&text) {
            Ok(standing) => Some(standing),
            Err(e) => {
                eprintln!(
                    "secondsite: {} is damaged ({e}): starting from the policy's roles",
                    file.display()
                );
                None
            }
        }
    }

    /// Saves `group`'s standing durably (written aside, synced, renamed over).
    pub fn save_standing(&self, group: &str, standing: Standing) -> io::Result<()> {
        let file = self.standing_file(group);
        let aside = file.with_extension("json.new");
        {
            let mut f = File::create(&aside)?;
            f.write_all(serde_json::to_string(&standing)?.as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&aside, &file)?;
        File::open(self.dir.join("standing"))?.sync_all()
    }

    /// Appends a decision to the journal.
    pub fn record(
        &mut self,
        unix_ms: u64,
        site: &str,
        group: &str,
        event: &Event,
    ) -> io::Result<()> {
        let line = serde_json::json!({
            "unix_ms": unix_ms,
            "site": site,
            "group": group,
            "event": event,
        });
        writeln!(self.journal, "{line}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standing_survives_a_restart_and_the_journal_appends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let standing = Standing {
            term: 3,
            active: true,
        };
        {
            let mut state = StateDir::open(dir.path()).expect("opens");
            assert_eq!(state.standing("web"), None);
            state.save_standing("web", standing).expect("saves");
            state
                .record(1, "site-a", "web", &Event::PeerLost)
                .expect("records");
        }
        let mut state = StateDir::open(dir.path()).expect("reopens");
        assert_eq!(state.standing("web"), Some(standing));
        state
            .record(2, "site-a", "web", &Event::PeerBack)
            .expect("records");
        let journal = std::fs::read_to_string(dir.path().join("events.jsonl")).expect("reads");
        let lines: Vec<serde_json::Value> = journal
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "PeerLost");
        assert_eq!(lines[1]["unix_ms"], 2);
        std::fs::write(dir.path().join("standing/db.json"), "{not json").expect("writes");
        assert_eq!(state.standing("db"), None, "damaged: the policy's roles");
    }
}
