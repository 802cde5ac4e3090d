//! The gateway's admin API, as far as the simulator needs it: provision a meter, credit it
//! (`POST /daraja/simulate`, needs `[api] allow_simulate = true`), and read all balances.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("admin API at {addr}: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin API at {0} did not answer within 30 s")]
    Timeout(SocketAddr),
    #[error("{method} {path}: HTTP {status}: {body}")]
    Status {
        method: &'static str,
        path: String,
        status: u16,
        body: String,
    },
    #[error("unreadable answer from the admin API: {0}")]
    Malformed(String),
}

/// The gateway's view of one meter.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayMeter {
    pub balance_wh: i64,
    pub ledger_seq: i64,
    pub ack_seq: Option<u32>,
    pub total_consumed_wh: i64,
}

#[derive(Clone, Debug)]
pub struct Api {
    pub addr: SocketAddr,
}

impl Api {
    async fn call(
        &self,
        method: &'static str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), ApiError> {
        let io = |source| ApiError::Io {
            addr: self.addr,
            source,
        };
        let exchange = async {
            let mut s = TcpStream::connect(self.addr).await.map_err(io)?;
            let body = body.map(Value::to_string).unwrap_or_default();
            let req = format!(
                "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                self.addr,
                body.len()
            );
            s.write_all(req.as_bytes()).await.map_err(io)?;
            let mut raw = Vec::new();
            s.read_to_end(&mut raw).await.map_err(io)?;
            Ok::<_, ApiError>(raw)
        };
        let raw = tokio::time::timeout(Duration::from_secs(30), exchange)
            .await
            .map_err(|_| ApiError::Timeout(self.addr))??;
        let text = String::from_utf8_lossy(&raw);
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| ApiError::Malformed(text.chars().take(80).collect()))?;
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
        let json = serde_json::from_str(body).unwrap_or(Value::String(body.to_string()));
        Ok((status, json))
    }

    fn expect(
        method: &'static str,
        path: &str,
        (status, v): (u16, Value),
        ok: &[u16],
    ) -> Result<Value, ApiError> {
        if ok.contains(&status) {
            Ok(v)
        } else {
            Err(ApiError::Status {
                method,
                path: path.to_string(),
                status,
                body: v.to_string(),
            })
        }
    }

    /// Adds a meter; an existing one is fine (409).
    pub async fn provision(&self, id: &str, secret: &str) -> Result<(), ApiError> {
        let path = "/api/meters";
        let r = self
            .call("POST", path, Some(&json!({"id": id, "secret": secret})))
            .await?;
        Self::expect("POST", path, r, &[201, 409]).map(drop)
    }

    /// Credits `kes` through the simulate endpoint; returns the new balance in Wh.
    pub async fn credit(&self, id: &str, kes: f64) -> Result<i64, ApiError> {
        let path = "/daraja/simulate";
        let r = self
            .call("POST", path, Some(&json!({"meter_no": id, "amount": kes})))
            .await?;
        let v = Self::expect("POST", path, r, &[200])?;
        v["balance_wh"]
            .as_i64()
            .ok_or_else(|| ApiError::Malformed(v.to_string()))
    }

    /// Sets the gateway's clock (a debug build's `POST /api/debug/clock`), which also folds and
    /// so runs its alert rules at that time.
    pub async fn debug_clock(&self, now_ms: i64) -> Result<(), ApiError> {
        let path = "/api/debug/clock";
        let r = self
            .call("POST", path, Some(&json!({ "nowMs": now_ms })))
            .await?;
        Self::expect("POST", path, r, &[200]).map(drop)
    }

    /// Every meter's ledger state.
    pub async fn meters(&self) -> Result<HashMap<String, GatewayMeter>, ApiError> {
        let path = "/api/meters";
        let r = self.call("GET", path, None).await?;
        let v = Self::expect("GET", path, r, &[200])?;
        let rows = v["meters"]
            .as_array()
            .ok_or_else(|| ApiError::Malformed(v.to_string()))?;
        rows.iter()
            .map(|m| {
                let id = m["id"].as_str().unwrap_or_default().to_string();
                let gm = GatewayMeter {
                    balance_wh: m["balance_wh"].as_i64().unwrap_or_default(),
                    ledger_seq: m["ledger_seq"].as_i64().unwrap_or_default(),
                    ack_seq: m["ack_seq"].as_u64().map(|s| s as u32),
                    total_consumed_wh: m["total_consumed_wh"].as_i64().unwrap_or_default(),
                };
                Ok((id, gm))
            })
            .collect()
    }
}
