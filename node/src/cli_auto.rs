//! Automation subcommands: `tags` (runtime tags), `query` (ask matching
//! nodes and print their answers as they arrive) and `remove` (force-leave).
//! Clients of `/v1/self/tags`, `/v1/queries` and `/v1/peers/{id}/remove`.
//!
//! Exit codes as for every CLI subcommand: 0 success, 1 the daemon answered
//! with an error, 2 usage, 3 no daemon at the socket.

use std::process::ExitCode;

use clap::Subcommand;
use hyper::Method;
use proto::control::{TagsInfo, TagsRequest};

use crate::cli::{client, escape, show};
use crate::config::{parse_tag, SocketArg};

/// The automation subcommands (flattened into [`crate::config::Command`]).
#[derive(Debug, Subcommand)]
pub enum AutoCommand {
    /// Show this node's tags, or change them now (no restart).
    ///
    /// Peers see the change as `peer_updated` within milliseconds. With
    /// --state-dir, changes are kept there (tags.json) and laid over the
    /// configured --tag values at the next start.
    #[command(
        after_help = "Examples:\n  constellationd tags\n  constellationd tags set role=db zone=b\n  constellationd tags delete zone"
    )]
    Tags {
        /// Control socket.
        #[command(flatten)]
        sock: SocketArg,
        /// What to do (nothing: list them).
        #[command(subcommand)]
        action: Option<TagsAction>,
        /// Print the API's JSON.
        #[arg(long, global = true)]
        json: bool,
    },
}

/// `constellationd tags ...`.
#[derive(Debug, Subcommand, Clone)]
pub enum TagsAction {
    /// Add or change tags.
    Set {
        /// KEY=VALUE pairs.
        #[arg(required = true, value_parser = parse_tag)]
        tags: Vec<(String, String)>,
    },
    /// Remove tags (absent keys are ignored).
    Delete {
        /// Keys.
        #[arg(required = true)]
        keys: Vec<String>,
    },
}

/// Runs an automation subcommand.
pub async fn run(cmd: AutoCommand) -> ExitCode {
    match cmd {
        AutoCommand::Tags { sock, action, json } => tags(&sock, action, json).await,
    }
}

async fn tags(sock: &SocketArg, action: Option<TagsAction>, json: bool) -> ExitCode {
    let c = client(sock);
    let req = match action {
        None => return show(c.get("/v1/self/tags").await, json, render_tags),
        Some(TagsAction::Set { tags }) => TagsRequest {
            set: tags.into_iter().collect(),
            delete: Vec::new(),
        },
        Some(TagsAction::Delete { keys }) => TagsRequest {
            set: Default::default(),
            delete: keys,
        },
    };
    let answer = c.send(Method::PATCH, "/v1/self/tags", Some(&req)).await;
    show(answer, json, |v: &TagsInfo| {
        let mut out = match (v.changed, v.sent_to) {
            (Some(false), _) => "unchanged\n".to_string(),
            (_, Some(n)) => format!(
                "changed (version {}), sent to {n} linked peers\n",
                v.version
            ),
            _ => String::new(),
        };
        out.push_str(&render_tags(v));
        if let Some(w) = &v.warning {
            out.push_str(&format!("warning: {}\n", escape(w)));
        }
        out
    })
}

/// Tags one per line, `KEY=VALUE`, escaped.
pub fn render_tags(v: &TagsInfo) -> String {
    if v.tags.is_empty() {
        return "(no tags)\n".into();
    }
    v.tags
        .iter()
        .map(|(k, val)| format!("{}={}\n", escape(k), escape(val)))
        .collect()
}
