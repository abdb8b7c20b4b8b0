//! The `--config` file: TOML whose keys are the names of `run`'s flags.
//!
//! Precedence, highest first: flags, environment variables
//! (`CONSTELLATION_<FLAG>`), the file, the built-in defaults. The file is
//! merged into the command line: each of its keys whose flag was given
//! neither on the command line nor in the environment becomes `--key=value`,
//! and clap parses the result once more, so a file value goes through
//! exactly the checks a flag does.
//!
//! Values: a string or an integer for a flag that takes one value (durations
//! and addresses are strings: `beacon-interval = "2s"`; `socket-mode` must be
//! a string, `"0660"`, because a TOML integer is decimal); a list for a flag
//! that may repeat (`interface = ["lo", "eth1"]`), and for `tag` also a
//! table (`tag = { role = "db" }`). An unknown key, a value of the wrong
//! type or a value the flag refuses: one line naming the key and the file,
//! exit status 2, before anything binds.
//!
//! A reload ([`reload`]) parses the same command line with the file as it
//! is now, and [`changed`] says which keys differ from the running values.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches};

use crate::config::{Cli, Command, RunArgs};

/// Why the command line and the config file do not make a configuration.
#[derive(Debug)]
pub enum LoadError {
    /// Bad usage on the command line: clap's own message and exit code.
    Clap(clap::Error),
    /// The config file is unreadable or wrong: one line (exit 2).
    File(String),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Clap(e) => f.write_str(&first_line(e)),
            LoadError::File(s) => f.write_str(s),
        }
    }
}

/// Where the running configuration came from, kept for reloads.
#[derive(Debug, Clone)]
pub struct Source {
    /// The command line as given.
    argv: Vec<OsString>,
    /// The config file.
    pub path: PathBuf,
    /// Every `run` key's effective values (raw strings, defaults included).
    pub values: BTreeMap<String, Vec<String>>,
}

/// A parsed command line, with the config file merged in.
#[derive(Debug)]
pub struct Loaded {
    /// The parsed command line.
    pub cli: Cli,
    /// Set for `run --config PATH`.
    pub source: Option<Source>,
}

/// Flags that are not configuration keys.
const NOT_KEYS: [&str; 3] = ["config", "help", "version"];

/// The first line of clap's message, without `error: `.
fn first_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let line = text.lines().next().unwrap_or("invalid arguments");
    line.strip_prefix("error: ").unwrap_or(line).to_string()
}

/// Parses `argv` (program name first) and merges the `--config` file of
/// `run` into it.
pub fn load<I, T>(argv: I) -> Result<Loaded, LoadError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let cmd = Cli::command();
    let matches = cmd
        .clone()
        .try_get_matches_from(&argv)
        .map_err(LoadError::Clap)?;
    let Some(("run", run_m)) = matches.subcommand() else {
        let cli = Cli::from_arg_matches(&matches).map_err(LoadError::Clap)?;
        return Ok(Loaded { cli, source: None });
    };
    let Some(path) = run_m.get_one::<PathBuf>("config").cloned() else {
        let cli = Cli::from_arg_matches(&matches).map_err(LoadError::Clap)?;
        return Ok(Loaded { cli, source: None });
    };
    let run_cmd = cmd
        .find_subcommand("run")
        .expect("the run subcommand exists")
        .clone();
    let table = read_table(&path)?;
    let mut merged = argv.clone();
    for (key, value) in &table {
        let arg = run_cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && !NOT_KEYS.contains(&key.as_str()))
            .ok_or_else(|| unknown_key(&path, key))?;
        let bad = |why: String| {
            LoadError::File(format!(
                "constellationd: {}: key `{key}`: {why}",
                path.display()
            ))
        };
        let multi = matches!(arg.get_action(), clap::ArgAction::Append);
        let takes_value = arg.get_action().takes_values();
        let values = toml_values(key, value, multi, takes_value).map_err(bad)?;
        // The flag's own checks, on the file's values alone.
        let argv: Vec<OsString> = if takes_value {
            values
                .iter()
                .map(|v| format!("--{key}={v}").into())
                .collect()
        } else if values.first().is_some_and(|v| v == "true") {
            vec![format!("--{key}").into()]
        } else {
            Vec::new()
        };
        clap::Command::new("run")
            .no_binary_name(true)
            .arg(arg.clone())
            .try_get_matches_from(&argv)
            .map_err(|e| bad(first_line(&e)))?;
        match run_m.value_source(arg.get_id().as_str()) {
            Some(ValueSource::CommandLine) | Some(ValueSource::EnvVariable) => {}
            _ => merged.extend(argv),
        }
    }
    let matches = cmd.try_get_matches_from(&merged).map_err(|e| {
        LoadError::File(format!(
            "constellationd: {}: {}",
            path.display(),
            first_line(&e)
        ))
    })?;
    let values = match matches.subcommand() {
        Some(("run", m)) => effective(&run_cmd, m),
        _ => BTreeMap::new(),
    };
    let cli = Cli::from_arg_matches(&matches).map_err(LoadError::Clap)?;
    Ok(Loaded {
        cli,
        source: Some(Source { argv, path, values }),
    })
}

fn unknown_key(path: &Path, key: &str) -> LoadError {
    let hint = if key.contains('_') {
        format!(" (did you mean `{}`?)", key.replace('_', "-"))
    } else if key == "config" {
        " (a config file cannot name another)".to_string()
    } else {
        " (keys are the flags of `constellationd run --help`, without the dashes)".to_string()
    };
    LoadError::File(format!(
        "constellationd: {}: unknown key `{key}`{hint}",
        path.display()
    ))
}

/// Reads and parses the file into its top-level table.
fn read_table(path: &Path) -> Result<toml::Table, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        LoadError::File(format!(
            "constellationd: --config {}: cannot read it: {e}",
            path.display()
        ))
    })?;
    text.parse::<toml::Table>().map_err(|e| {
        let at = e
            .span()
            .map(|s| {
                let before = &text[..s.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!(":{line}:{col}")
            })
            .unwrap_or_default();
        LoadError::File(format!(
            "constellationd: {}{at}: not valid TOML: {}",
            path.display(),
            e.message().trim().replace('\n', " ")
        ))
    })
}

/// A file value as the strings its flag would be given.
fn toml_values(
    key: &str,
    v: &toml::Value,
    multi: bool,
    takes_value: bool,
) -> Result<Vec<String>, String> {
    use toml::Value as V;
    let scalar = |v: &V| match v {
        V::String(s) => Ok(s.clone()),
        V::Integer(_) if key == "socket-mode" => {
            Err("expected a string such as \"0660\" (a TOML integer is decimal)".to_string())
        }
        V::Integer(i) => Ok(i.to_string()),
        V::Float(_) => Err("expected a string or a whole number, not a decimal".to_string()),
        V::Boolean(_) => Err("expected a string or a number, not true/false".to_string()),
        V::Datetime(_) => Err("expected a string, not a date (durations are \"2s\")".to_string()),
        V::Array(_) | V::Table(_) => Err("expected a single value".to_string()),
    };
    match v {
        V::Boolean(b) if !takes_value => Ok(vec![b.to_string()]),
        _ if !takes_value => Err("expected true or false".to_string()),
        V::Array(items) if multi => items.iter().map(scalar).collect(),
        V::Array(_) => Err("takes one value, not a list".to_string()),
        V::Table(t) if key == "tag" => t
            .iter()
            .map(|(k, v)| match v {
                V::String(s) => Ok(format!("{k}={s}")),
                _ => Err(format!("tag `{k}`: expected a string value")),
            })
            .collect(),
        V::Table(_) => Err("expected a value, not a table".to_string()),
        v => scalar(v).map(|s| vec![s]),
    }
}

/// Each key's effective values in `m` (the `run` matches).
fn effective(run_cmd: &clap::Command, m: &ArgMatches) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for arg in run_cmd.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if NOT_KEYS.contains(&long) {
            continue;
        }
        let vals: Vec<String> = if arg.get_action().takes_values() {
            m.get_raw(arg.get_id().as_str())
                .map(|r| r.map(|v| v.to_string_lossy().into_owned()).collect())
                .unwrap_or_default()
        } else {
            vec![m.get_flag(arg.get_id().as_str()).to_string()]
        };
        out.insert(long.to_string(), vals);
    }
    out
}

/// The running configuration as `source` gives it now: the same command
/// line and environment, the file as it is now.
pub fn reload(source: &Source) -> Result<(RunArgs, Source), String> {
    let loaded = load(source.argv.clone()).map_err(|e| {
        let line = e.to_string();
        line.strip_prefix("constellationd: ")
            .unwrap_or(&line)
            .to_string()
    })?;
    match (loaded.cli.cmd, loaded.source) {
        (Command::Run(args), Some(src)) => Ok((*args, src)),
        _ => Err("the command line no longer names a config file".into()),
    }
}

/// Keys whose effective values differ between `old` and `new`.
pub fn changed(old: &Source, new: &Source) -> Vec<String> {
    let keys: std::collections::BTreeSet<&String> = old
        .values
        .keys()
        .chain(new.values.keys())
        .filter(|k| old.values.get(*k) != new.values.get(*k))
        .collect();
    keys.into_iter().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("c.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cst-cf-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn run_args(l: Loaded) -> RunArgs {
        match l.cli.cmd {
            Command::Run(a) => *a,
            other => panic!("not run: {other:?}"),
        }
    }

    #[test]
    fn the_file_fills_what_flags_leave_unset() {
        let d = tmp("fill");
        let p = file(
            &d,
            "ttl = 0\nbeacon-interval = \"2s\"\ninterface = [\"lo\"]\ntag = { role = \"db\" }\nname = \"from-file\"\nsocket-mode = \"0660\"\n",
        );
        let l = load([
            "constellationd",
            "run",
            "--config",
            p.to_str().unwrap(),
            "--name",
            "flag",
        ])
        .unwrap();
        let src = l.source.clone().unwrap();
        let a = run_args(l);
        assert_eq!(a.name.as_deref(), Some("flag"), "the flag wins");
        assert_eq!(a.ttl, 0);
        assert_eq!(a.beacon_interval, std::time::Duration::from_secs(2));
        assert_eq!(a.interface, vec!["lo"]);
        assert_eq!(a.tag, vec![("role".to_string(), "db".to_string())]);
        assert_eq!(a.socket_mode, 0o660);
        assert_eq!(src.values["ttl"], vec!["0"]);
        assert_eq!(
            src.values["cluster"],
            vec!["default"],
            "defaults are listed"
        );
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn bad_files_name_the_key_and_the_file() {
        let d = tmp("bad");
        for (text, want) in [
            (
                "beacon_interval = \"2s\"\n",
                "unknown key `beacon_interval` (did you mean `beacon-interval`?)",
            ),
            ("colour = true\n", "unknown key `colour`"),
            ("config = \"x\"\n", "unknown key `config`"),
            ("ttl = 300\n", "key `ttl`: invalid value '300'"),
            ("ttl = \"x\"\n", "key `ttl`: invalid value 'x'"),
            (
                "socket-mode = 660\n",
                "key `socket-mode`: expected a string",
            ),
            (
                "beacon-interval = 2.5\n",
                "key `beacon-interval`: expected a string or a whole number",
            ),
            (
                "name = [\"a\", \"b\"]\n",
                "key `name`: takes one value, not a list",
            ),
            (
                "tag = [\"novalue\"]\n",
                "key `tag`: invalid value 'novalue'",
            ),
            ("group = \"10.0.0.1:5\"\n", "key `group`: invalid value"),
            ("ttl = 1\nttl = 2\n", ":2:1: not valid TOML"),
            (
                "log-level = \"loud\"\n",
                "key `log-level`: invalid value 'loud'",
            ),
        ] {
            let p = file(&d, text);
            let err = load(["constellationd", "run", "--config", p.to_str().unwrap()])
                .expect_err(text)
                .to_string();
            assert!(
                err.contains(want) && err.contains(p.to_str().unwrap()),
                "{text:?}: {err}"
            );
            assert_eq!(err.lines().count(), 1, "{err}");
        }
        let err = load(["constellationd", "run", "--config", "/nonexistent/c.toml"])
            .expect_err("missing")
            .to_string();
        assert!(err.contains("cannot read it"), "{err}");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_reload_reports_the_keys_that_changed() {
        let d = tmp("reload");
        let p = file(&d, "log-level = \"info\"\ntag = [\"a=1\"]\n");
        let argv = [
            "constellationd",
            "run",
            "--config",
            p.to_str().unwrap(),
            "--ttl",
            "0",
        ];
        let first = load(argv).unwrap().source.unwrap();
        std::fs::write(&p, "log-level = \"debug\"\ntag = [\"a=2\"]\nttl = 1\n").unwrap();
        let (args, now) = reload(&first).unwrap();
        assert_eq!(args.log_level, crate::logging::LogLevel::Debug);
        assert_eq!(args.ttl, 0, "the flag still wins");
        assert_eq!(changed(&first, &now), vec!["log-level", "tag"]);
        std::fs::write(&p, "ttl = [").unwrap();
        assert!(reload(&first).unwrap_err().contains("not valid TOML"));
        std::fs::remove_dir_all(d).unwrap();
    }
}
