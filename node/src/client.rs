//! A minimal HTTP/1.1 client for the control socket (hyper over a Unix
//! stream), used by every CLI subcommand.
//!
//! Requests are [`proto::control`] types serialised here; answers come back
//! as an [`Answer`] (status and bytes) that the caller reads as the
//! `proto::control` type it expects, or prints as is (`--json`).

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use proto::control::ErrorBody;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

/// Why a request did not produce an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens at the path.
    #[error("no constellationd at {path} ({source}); start one with `constellationd run`, or point to it with --socket PATH or CONSTELLATION_SOCKET")]
    NoDaemon {
        /// The path tried.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("control socket {path}: {detail}")]
    Http {
        /// The path.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
}

/// A client bound to one socket path.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
}

impl Client {
    /// A client for `path`.
    pub fn new(path: &Path) -> Self {
        Client {
            path: path.to_path_buf(),
        }
    }

    fn http(&self, detail: impl std::fmt::Display) -> ClientError {
        ClientError::Http {
            path: self.path.clone(),
            detail: detail.to_string(),
        }
    }

    /// Sends one request; the response body is left to the caller (streams).
    pub async fn request(
        &self,
        method: Method,
        uri: &str,
        body: Bytes,
    ) -> Result<Response<Incoming>, ClientError> {
        let stream =
            UnixStream::connect(&self.path)
                .await
                .map_err(|source| ClientError::NoDaemon {
                    path: self.path.clone(),
                    source,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.http(e))?;
        tokio::spawn(async move {
            // Ends when the response is done or the daemon hangs up; either
            // way the request future reports what matters.
            let _done = conn.await;
        });
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| self.http(e))?;
        sender.send_request(req).await.map_err(|e| self.http(e))
    }

    /// Sends one request and reads the whole answer.
    async fn call(&self, method: Method, uri: &str, body: Bytes) -> Result<Answer, ClientError> {
        let resp = self.request(method, uri, body).await?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.http(e))?
            .to_bytes();
        Ok(Answer {
            status,
            body,
            client: self.clone(),
        })
    }

    /// `GET uri`.
    pub async fn get(&self, uri: &str) -> Result<Answer, ClientError> {
        self.call(Method::GET, uri, Bytes::new()).await
    }

    /// `POST uri` with `body` as JSON (`None`: an empty body).
    pub async fn post<B: Serialize>(
        &self,
        uri: &str,
        body: Option<&B>,
    ) -> Result<Answer, ClientError> {
        self.send(Method::POST, uri, body).await
    }

    /// `method uri` with `body` as JSON (`None`: an empty body).
    pub async fn send<B: Serialize>(
        &self,
        method: Method,
        uri: &str,
        body: Option<&B>,
    ) -> Result<Answer, ClientError> {
        let bytes = match body {
            Some(b) => serde_json::to_vec(b)
                .map(Bytes::from)
                .map_err(|e| self.http(format!("request not encoded: {e}")))?,
            None => Bytes::new(),
        };
        self.call(method, uri, bytes).await
    }
}

/// The daemon's answer to one request.
#[derive(Debug)]
pub struct Answer {
    /// Its status.
    pub status: StatusCode,
    /// Its body (JSON from this daemon).
    pub body: Bytes,
    client: Client,
}

impl Answer {
    /// The body as `T`, whatever the status.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ClientError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            self.client
                .http(format!("answer is not what this client expects: {e}"))
        })
    }

    /// The body as any JSON (to print it as the daemon sent it).
    pub fn json(&self) -> Result<serde_json::Value, ClientError> {
        self.parse()
    }

    /// The `error` of an error answer (or a generic text).
    pub fn error_message(&self) -> String {
        self.parse::<ErrorBody>()
            .map(|e| e.error)
            .unwrap_or_else(|_| "request failed".into())
    }
}
