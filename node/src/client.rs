//! A minimal HTTP/1.1 client for the control socket (hyper over a Unix
//! stream), used by every CLI subcommand.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
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
        body: Option<Value>,
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
        let payload = body.map(|v| Bytes::from(v.to_string())).unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(payload))
            .map_err(|e| self.http(e))?;
        sender.send_request(req).await.map_err(|e| self.http(e))
    }

    /// Sends a request and reads a JSON answer.
    pub async fn json(
        &self,
        method: Method,
        uri: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), ClientError> {
        let resp = self.request(method, uri, body).await?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.http(e))?
            .to_bytes();
        let value = serde_json::from_slice(&bytes)
            .map_err(|e| self.http(format!("answer is not JSON: {e}")))?;
        Ok((status, value))
    }
}
