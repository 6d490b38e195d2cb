//! What to start: [`ServerCommand`].

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;

/// What happens to the engine when the process that spawned it dies
/// (Linux only; elsewhere there is no parent-death signal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ParentDeath {
    /// SIGKILL to the engine: nothing can survive it. Right for single-process
    /// engines (llama-server).
    #[default]
    Kill,
    /// SIGTERM to the whole process group, then SIGKILL to it after `grace`:
    /// for engines that start processes of their own (vLLM's `EngineCore` and
    /// workers). The leader gets SIGTERM from the kernel, so it can shut its
    /// children down in order; a watcher process inside the group, which
    /// notices our death when the pipe only we hold closes, signals the rest,
    /// and escalates if the leader stalls.
    TerminateGroup {
        /// How long the group has between SIGTERM and SIGKILL.
        grace: std::time::Duration,
    },
}

/// An engine's command line and environment.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerCommand {
    pub(crate) engine: String,
    pub(crate) parent_death: ParentDeath,
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<OsString>,
    pub(crate) env: Vec<(OsString, OsString)>,
    pub(crate) log_lines: usize,
}

impl ServerCommand {
    /// A command running `program`, named `engine` in logs and errors.
    pub fn new(engine: impl Into<String>, program: impl Into<PathBuf>) -> Self {
        Self {
            engine: engine.into(),
            parent_death: ParentDeath::default(),
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            log_lines: 200,
        }
    }

    /// Appends one argument.
    pub fn arg(&mut self, arg: impl Into<OsString>) -> &mut Self {
        self.args.push(arg.into());
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(&mut self, args: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for the engine (on top of the inherited ones).
    pub fn env(&mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> &mut Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The signal the engine gets when our process dies (default SIGKILL).
    pub fn parent_death(&mut self, signal: ParentDeath) -> &mut Self {
        self.parent_death = signal;
        self
    }

    /// How many recent log lines to keep (default 200).
    pub fn log_lines(&mut self, lines: usize) -> &mut Self {
        self.log_lines = lines;
        self
    }

    /// The engine's name.
    pub fn engine(&self) -> &str {
        &self.engine
    }

    /// The program.
    pub fn program(&self) -> &std::path::Path {
        &self.program
    }

    /// The arguments.
    pub fn get_args(&self) -> impl Iterator<Item = &std::ffi::OsStr> {
        self.args.iter().map(OsString::as_os_str)
    }

    /// The value this command sets for the environment variable `key`, if any.
    pub fn env_value(&self, key: &str) -> Option<&std::ffi::OsStr> {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_os_str())
    }

    /// The value of the argument following `flag`, if `flag` is present.
    pub fn flag_value(&self, flag: &str) -> Option<&std::ffi::OsStr> {
        let position = self.args.iter().position(|arg| arg == flag)?;
        self.args.get(position + 1).map(OsString::as_os_str)
    }
}

/// Shows the command line with the value of any `--api-key` hidden.
impl fmt::Debug for ServerCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.program.display())?;
        let mut hide_next = false;
        for arg in &self.args {
            if hide_next {
                f.write_str(" <hidden>")?;
                hide_next = false;
                continue;
            }
            write!(f, " {}", arg.to_string_lossy())?;
            hide_next = arg == "--api-key";
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_the_api_key() {
        let mut command = ServerCommand::new("llama-server", "/bin/llama-server");
        command.args(["--port", "8080", "--api-key", "secret"]);
        let shown = format!("{command:?}");
        assert_eq!(shown, "/bin/llama-server --port 8080 --api-key <hidden>");
        assert_eq!(command.flag_value("--port").unwrap(), "8080");
    }
}
