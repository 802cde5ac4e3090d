//! Credentials for the database: a Google service account (RS256 JWT → OAuth2 access token,
//! cached until shortly before it expires) or the legacy database secret.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use serde::Deserialize;
use serde_json::json;

use crate::rtdb::{classify_transport, retry_after, Failure};

/// Scopes the Realtime Database REST API accepts for a service account (research/apis.md §2.5).
const SCOPES: &str =
    "https://www.googleapis.com/auth/userinfo.email https://www.googleapis.com/auth/firebase.database";
const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// A token is replaced this long before it expires (or at half its life, if shorter).
const REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// How a request proves itself to the database.
pub enum Credential {
    /// `Authorization: Bearer …`
    Bearer(String),
    /// `?auth=…` (the legacy database secret).
    Secret(String),
}

/// The fields of a Google service-account key file that minting a token needs.
#[derive(Deserialize)]
struct KeyFile {
    #[serde(rename = "type")]
    kind: String,
    client_email: String,
    private_key: String,
    #[serde(default)]
    private_key_id: Option<String>,
    #[serde(default)]
    token_uri: Option<String>,
}

pub struct ServiceAccount {
    client_email: String,
    key_id: Option<String>,
    token_uri: String,
    key: RsaKeyPair,
    rng: SystemRandom,
    token: Option<(String, Instant)>,
}

impl ServiceAccount {
    /// Reads and checks a service-account key file (no network).
    pub fn from_file(path: &Path) -> Result<ServiceAccount, String> {
        let text = read_secret("service_account_file", path)?;
        let file: KeyFile = serde_json::from_str(&text).map_err(|e| {
            format!(
                "service_account_file {} is not a service-account key: {e}",
                path.display()
            )
        })?;
        if file.kind != "service_account" {
            return Err(format!(
                "service_account_file {}: type is {:?}, not \"service_account\"",
                path.display(),
                file.kind
            ));
        }
        let der = pem_to_der(&file.private_key, "PRIVATE KEY")
            .map_err(|e| format!("service_account_file {}: {e}", path.display()))?;
        let key = RsaKeyPair::from_pkcs8(&der).map_err(|e| {
            format!(
                "service_account_file {}: the private key is not a usable RSA key: {e}",
                path.display()
            )
        })?;
        Ok(ServiceAccount {
            client_email: file.client_email,
            key_id: file.private_key_id,
            token_uri: file
                .token_uri
                .unwrap_or_else(|| GOOGLE_TOKEN_URI.to_string()),
            key,
            rng: SystemRandom::new(),
            token: None,
        })
    }

    /// The cached token, or a new one when there is none or it is about to expire.
    /// Returns whether it was minted by this call.
    pub fn token(
        &mut self,
        agent: &ureq::Agent,
        budget: Duration,
    ) -> Result<(String, bool), Failure> {
        if let Some((token, refresh_at)) = &self.token {
            if Instant::now() < *refresh_at {
                return Ok((token.clone(), false));
            }
        }
        let (token, lifetime) = self.mint(agent, budget)?;
        let margin = REFRESH_MARGIN.min(lifetime / 2);
        self.token = Some((token.clone(), Instant::now() + lifetime - margin));
        Ok((token, true))
    }

    /// Forgets the cached token (the database refused it).
    pub fn forget_token(&mut self) {
        self.token = None;
    }

    fn mint(&self, agent: &ureq::Agent, budget: Duration) -> Result<(String, Duration), Failure> {
        let assertion = self.signed_jwt()?;
        let resp = agent
            .post(&self.token_uri)
            .config()
            .timeout_global(Some(budget))
            .build()
            .send_form([
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", assertion.as_str()),
            ]);
        let mut resp = resp.map_err(|e| classify_transport("the token endpoint", e))?;
        let status = resp.status().as_u16();
        let after = retry_after(resp.headers());
        let body = resp.body_mut().read_to_string().unwrap_or_default();
        match status {
            200..=299 => {
                #[derive(Deserialize)]
                struct Answer {
                    access_token: String,
                    #[serde(default)]
                    expires_in: Option<u64>,
                }
                let a: Answer = serde_json::from_str(&body).map_err(|e| Failure::Retry {
                    reason: format!("the token endpoint's answer is not a token: {e}"),
                    after: None,
                })?;
                let lifetime = Duration::from_secs(a.expires_in.unwrap_or(3600).max(1));
                Ok((a.access_token, lifetime))
            }
            // invalid_grant, invalid_client, unauthorized_client: the key is refused.
            400 | 401 | 403 => Err(Failure::Denied(format!(
                "the token endpoint refused the service account {} ({status}): {}",
                self.client_email,
                body.trim()
            ))),
            _ => Err(Failure::Retry {
                reason: format!("the token endpoint answered {status}: {}", body.trim()),
                after,
            }),
        }
    }

    fn signed_jwt(&self) -> Result<String, Failure> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut header = json!({"alg": "RS256", "typ": "JWT"});
        if let Some(kid) = &self.key_id {
            header["kid"] = json!(kid);
        }
        let claims = json!({
            "iss": self.client_email,
            "scope": SCOPES,
            "aud": self.token_uri,
            "iat": now,
            "exp": now + 3600,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut sig = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &self.rng,
                signing_input.as_bytes(),
                &mut sig,
            )
            .map_err(|_| Failure::Retry {
                reason: "signing the token request failed".into(),
                after: None,
            })?;
        Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig)))
    }
}

/// The DER inside a PEM block labelled `label`.
fn pem_to_der(pem: &str, label: &str) -> Result<Vec<u8>, String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem
        .find(&begin)
        .ok_or_else(|| format!("private_key has no {begin} block (a PKCS#8 key is expected)"))?
        + begin.len();
    let stop = pem[start..]
        .find(&end)
        .ok_or_else(|| format!("private_key has no {end} line"))?
        + start;
    let b64: String = pem[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    STANDARD
        .decode(b64)
        .map_err(|e| format!("private_key is not valid PEM: {e}"))
}

/// Reads a secret file with the SDK's checks (mode, no symlink, size).
pub fn read_secret(key: &str, path: &Path) -> Result<String, String> {
    umeme_plugin_sdk::read_secret_file(path).map_err(|e| format!("{key}: {e}"))
}
