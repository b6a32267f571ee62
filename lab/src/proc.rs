//! A child process that is killed when its guard drops.

use std::process::{Child, Command};

#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
    what: String,
}

impl Proc {
    pub fn spawn(command: &mut Command, what: &str) -> std::io::Result<Proc> {
        let child = command.spawn()?;
        Ok(Proc {
            child: Some(child),
            what: what.to_owned(),
        })
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("the child is held until drop")
    }

    /// Kills the process now (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether it has exited (and with what status).
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn what(&self) -> &str {
        &self.what
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
