//! Credentials for a broker connection, fetched or read at every connect: user name and
//! password from a secret folder, a Kubernetes service-account token from its file (re-read
//! each time, so a rotated token is used by the next connection), and a managed-identity
//! access token from the platform's identity endpoint (cached, refreshed before it expires).
//!
//! Managed identity, as Azure documents it:
//! - Azure Instance Metadata Service: `GET {endpoint}?api-version=2018-02-01&resource=<audience>`
//!   with `Metadata: true` (default endpoint `http://169.254.169.254/metadata/identity/oauth2/token`).
//! - Azure Arc (when `IDENTITY_ENDPOINT` and `IMDS_ENDPOINT` are set, as the Arc agent does):
//!   `GET {IDENTITY_ENDPOINT}?api-version=2019-11-01&resource=<audience>` with `Metadata: true`
//!   is answered `401` with `WWW-Authenticate: Basic realm=<key file>`; the key file must lie in
//!   the agent's token folder; the request is repeated with `Authorization: Basic <key>`.
//!
//! The token is presented as MQTT 5 enhanced authentication, method `OAUTH2-JWT` (what Azure
//! Event Grid expects). Tokens never reach logs or `Debug` output.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use crate::config::Auth;
use crate::http_client::HttpError;
use crate::secret::Secret;

/// Default IMDS token endpoint.
pub const IMDS_ENDPOINT: &str = "http://169.254.169.254/metadata/identity/oauth2/token";
/// Folder in which Azure Arc writes the key files its identity endpoint points to.
pub const ARC_KEY_DIR: &str = "/var/opt/azcmagent/tokens";
/// MQTT 5 authentication method for managed-identity tokens.
pub const OAUTH_METHOD: &str = "OAUTH2-JWT";
/// MQTT 5 authentication method for Kubernetes service-account tokens.
pub const SAT_METHOD: &str = "K8S-SAT";

/// Where managed-identity tokens come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityOptions {
    /// The token endpoint URL (`http://host:port/path`).
    pub endpoint: String,
    /// Azure Arc's challenge flow (401 + key file) instead of plain IMDS.
    pub arc: bool,
    /// The only folder key files may be read from (Arc).
    pub key_dir: PathBuf,
    /// Time limit of one request: connect, send, and the whole answer.
    pub timeout: Duration,
}

impl IdentityOptions {
    /// From the environment: Arc when `IDENTITY_ENDPOINT` and `IMDS_ENDPOINT` are set, else
    /// IMDS; `EDGEBRIDGE_IDENTITY_ENDPOINT` overrides the URL (tests, other platforms) and
    /// `EDGEBRIDGE_IDENTITY_KEY_DIR` the key folder.
    pub fn from_env() -> IdentityOptions {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let arc_endpoint = var("IDENTITY_ENDPOINT").filter(|_| var("IMDS_ENDPOINT").is_some());
        let arc = arc_endpoint.is_some() || var("EDGEBRIDGE_IDENTITY_ARC").as_deref() == Some("1");
        IdentityOptions {
            endpoint: var("EDGEBRIDGE_IDENTITY_ENDPOINT")
                .or(arc_endpoint)
                .unwrap_or_else(|| IMDS_ENDPOINT.to_string()),
            arc,
            key_dir: var("EDGEBRIDGE_IDENTITY_KEY_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(ARC_KEY_DIR)),
            timeout: HTTP_TIMEOUT,
        }
    }
}

/// Why credentials could not be had; every message says what to fix. Causes are kept as
/// sources (print with [`crate::error::Chain`]).
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// A secret or token file could not be read.
    #[error("cannot read {path}")]
    File {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The identity endpoint could not be asked (unreachable, timed out, not HTTP).
    #[error("identity endpoint {endpoint}")]
    Endpoint {
        /// URL, without the query.
        endpoint: String,
        /// Cause.
        #[source]
        source: HttpError,
    },
    /// The identity endpoint answered something unusable.
    #[error("identity endpoint {endpoint} answered {status}: {message}")]
    Response {
        /// URL.
        endpoint: String,
        /// HTTP status.
        status: u16,
        /// What was wrong.
        message: String,
    },
    /// The answer was larger than [`MAX_RESPONSE`].
    #[error(
        "identity endpoint {endpoint} answered with a body over {limit} bytes; refused (a token response is a few KiB)"
    )]
    TooLarge {
        /// URL.
        endpoint: String,
        /// The limit.
        limit: usize,
    },
    /// The Arc challenge named a key file outside the allowed folder.
    #[error("identity endpoint asked to read key file {path}, which is outside {allowed}; refused")]
    KeyFileOutside {
        /// The file named.
        path: PathBuf,
        /// The allowed folder.
        allowed: PathBuf,
    },
}

/// A fetched access token.
#[derive(Clone, Debug)]
struct Token {
    value: Secret,
    /// When to fetch a new one (before it expires).
    refresh_at: Instant,
}

/// What goes into CONNECT, and when the connection must be renewed for a fresh token.
#[derive(Debug, Default)]
pub struct ConnectCredentials {
    /// User name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<Secret>,
    /// Enhanced authentication method.
    pub auth_method: Option<String>,
    /// Enhanced authentication data.
    pub auth_data: Option<Secret>,
    /// Reconnect (with a persistent session) at this time to present a fresh token.
    pub renew_at: Option<Instant>,
}

/// The credentials of one broker connection, shared by its sessions (one token fetch serves
/// every route client).
#[derive(Debug)]
pub struct Provider {
    auth: Auth,
    identity: IdentityOptions,
    token: tokio::sync::Mutex<Option<Token>>,
    fetches: Mutex<u64>,
}

impl Provider {
    /// A provider for `auth`.
    pub fn new(auth: Auth, identity: IdentityOptions) -> Provider {
        Provider {
            auth,
            identity,
            token: tokio::sync::Mutex::new(None),
            fetches: Mutex::new(0),
        }
    }

    /// The MQTT 5 authentication method its credentials use, if it uses tokens (those expire
    /// and are refreshed: in place with AUTH when the broker granted this method).
    pub fn method(&self) -> Option<&'static str> {
        match &self.auth {
            Auth::ManagedIdentity { .. } => Some(OAUTH_METHOD),
            Auth::Kubernetes { .. } => Some(SAT_METHOD),
            _ => None,
        }
    }

    /// How many tokens were fetched so far.
    pub fn fetches(&self) -> u64 {
        *self.fetches.lock().expect("fetch counter")
    }

    /// Credentials for the next CONNECT.
    pub async fn connect(&self) -> Result<ConnectCredentials, CredentialError> {
        let mut c = ConnectCredentials::default();
        match &self.auth {
            Auth::Anonymous | Auth::X509 { .. } => {}
            Auth::UsernamePassword { dir } => {
                c.username = Some(read_secret(&dir.join("username"))?);
                let pw = dir.join("password");
                if pw.exists() {
                    c.password = Some(Secret::new(read_secret(&pw)?));
                }
            }
            Auth::Kubernetes { token_path } => {
                let token = read_secret(token_path)?;
                // Kubelet rotates a projected token at 80 % of its lifetime: read it again
                // then (a token without a readable `exp` is presented until reconnect).
                c.renew_at = jwt_lifetime(&token).map(|left| {
                    Instant::now()
                        + Duration::from_millis(left.as_millis() as u64 * 8 / 10)
                            .max(Duration::from_secs(1))
                });
                c.auth_method = Some(SAT_METHOD.into());
                c.auth_data = Some(Secret::new(token));
            }
            Auth::ManagedIdentity { audience } => {
                let mut cached = self.token.lock().await;
                let fresh = cached
                    .as_ref()
                    .filter(|t| Instant::now() < t.refresh_at)
                    .cloned();
                let token = match fresh {
                    Some(t) => t,
                    None => {
                        let t = fetch_token(&self.identity, audience).await?;
                        *self.fetches.lock().expect("fetch counter") += 1;
                        *cached = Some(t.clone());
                        t
                    }
                };
                c.auth_method = Some(OAUTH_METHOD.into());
                c.auth_data = Some(token.value);
                c.renew_at = Some(token.refresh_at);
            }
        }
        Ok(c)
    }
}

/// The time left until a JWT's `exp` claim (not verified: the broker verifies it; this only
/// says when to read the token again). `None` for a token that is not a JWT with `exp`.
fn jwt_lifetime(token: &str) -> Option<Duration> {
    use base64::Engine;
    let claims = token.split('.').nth(1)?;
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims.trim_end_matches('='))
        .ok()?;
    let exp = serde_json::from_slice::<serde_json::Value>(&claims)
        .ok()?
        .get("exp")?
        .as_u64()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    (exp > now).then(|| Duration::from_secs(exp - now))
}

fn read_secret(path: &Path) -> Result<String, CredentialError> {
    crate::secret::read_file(path).map_err(|source| CredentialError::File {
        path: path.to_path_buf(),
        source,
    })
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Largest identity response accepted, bytes (a token response is a few KiB).
pub const MAX_RESPONSE: usize = 64 * 1024;
/// Default time limit of one identity request: connect, send, and the whole answer.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

async fn fetch_token(id: &IdentityOptions, audience: &str) -> Result<Token, CredentialError> {
    let api = if id.arc { "2019-11-01" } else { "2018-02-01" };
    let sep = if id.endpoint.contains('?') { '&' } else { '?' };
    let url = format!(
        "{}{sep}api-version={api}&resource={}",
        id.endpoint,
        url_encode(audience)
    );
    let mut headers = vec![("Metadata", "true".to_string())];
    tracing::trace!(endpoint = %id.endpoint, arc = id.arc, "Fetching a token");
    let mut resp = http_get(&url, &headers, id.timeout).await?;
    if id.arc && resp.status == 401 {
        let challenge =
            resp.header("www-authenticate")
                .ok_or_else(|| CredentialError::Response {
                    endpoint: id.endpoint.clone(),
                    status: 401,
                    message: "no WWW-Authenticate header in the Arc challenge".into(),
                })?;
        let path = challenge
            .split_once("realm=")
            .map(|(_, p)| PathBuf::from(p.trim().trim_matches('"')))
            .ok_or_else(|| CredentialError::Response {
                endpoint: id.endpoint.clone(),
                status: 401,
                message: format!("WWW-Authenticate \"{challenge}\" has no realm=<key file>"),
            })?;
        let allowed = id
            .key_dir
            .canonicalize()
            .unwrap_or_else(|_| id.key_dir.clone());
        let real = path.canonicalize().unwrap_or_else(|_| path.clone());
        if !real.starts_with(&allowed) || real.extension().and_then(|e| e.to_str()) != Some("key") {
            return Err(CredentialError::KeyFileOutside {
                path,
                allowed: id.key_dir.clone(),
            });
        }
        let key = read_secret(&real)?;
        tracing::trace!(key_file = %real.display(), "Answering the Arc challenge");
        headers.push(("Authorization", format!("Basic {key}")));
        resp = http_get(&url, &headers, id.timeout).await?;
    }
    if resp.status != 200 {
        let body = String::from_utf8_lossy(&resp.body);
        let mut message: String = body.chars().take(200).collect();
        if (300..400).contains(&resp.status) {
            message = format!(
                "redirects are refused (Location: {})",
                resp.header("location").unwrap_or("none")
            );
        }
        return Err(CredentialError::Response {
            endpoint: id.endpoint.clone(),
            status: resp.status,
            message,
        });
    }
    parse_token(&resp.body).map_err(|message| CredentialError::Response {
        endpoint: id.endpoint.clone(),
        status: 200,
        message,
    })
}

/// Parses the token JSON (`access_token`, and `expires_on` or `expires_in`, as strings or
/// numbers); the token is renewed at 80 % of its remaining lifetime, and at least 1 s from now.
fn parse_token(body: &[u8]) -> Result<Token, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON ({e})"))?;
    let token = v
        .get("access_token")
        .and_then(|t| t.as_str())
        .filter(|t| !t.is_empty())
        .ok_or("no access_token in the response")?;
    let number = |key: &str| -> Option<u64> {
        v.get(key).and_then(|x| {
            x.as_u64()
                .or_else(|| x.as_str().and_then(|s| s.parse().ok()))
        })
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let lifetime = match (number("expires_on"), number("expires_in")) {
        (Some(on), _) => on.saturating_sub(now),
        (None, Some(inn)) => inn,
        (None, None) => return Err("no expires_on or expires_in in the response".into()),
    };
    if lifetime == 0 {
        return Err("the token is already expired".into());
    }
    let renew = Duration::from_millis(lifetime * 800).max(Duration::from_secs(1));
    Ok(Token {
        value: Secret::new(token),
        refresh_at: Instant::now() + renew,
    })
}

/// One GET to the identity endpoint (see [`crate::http_client::get`]), its failures named for the
/// endpoint.
async fn http_get(
    url: &str,
    headers: &[(&str, String)],
    timeout: Duration,
) -> Result<crate::http_client::Response, CredentialError> {
    let endpoint = url.split('?').next().unwrap_or(url).to_string();
    crate::http_client::get(url, headers, timeout, MAX_RESPONSE)
        .await
        .map_err(|source| match source {
            HttpError::TooLarge(limit) => CredentialError::TooLarge { endpoint, limit },
            source => CredentialError::Endpoint { endpoint, source },
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_responses_parse_with_string_or_number_expiry() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let t = parse_token(
            format!(r#"{{"access_token":"abc","expires_on":"{}"}}"#, now + 100).as_bytes(),
        )
        .unwrap();
        assert_eq!(t.value.expose(), "abc");
        let renew = t.refresh_at - Instant::now();
        assert!(
            renew > Duration::from_secs(70) && renew <= Duration::from_secs(80),
            "{renew:?}"
        );
        assert!(parse_token(br#"{"access_token":"abc","expires_in":3600}"#).is_ok());
        assert!(
            parse_token(br#"{"expires_in":3600}"#)
                .unwrap_err()
                .contains("access_token")
        );
        assert!(parse_token(b"<html>").unwrap_err().contains("not JSON"));
        assert!(
            parse_token(br#"{"access_token":"a","expires_on":"1"}"#)
                .unwrap_err()
                .contains("expired")
        );
    }

    #[test]
    fn a_service_account_token_is_read_again_at_80_percent_of_its_lifetime() {
        use base64::Engine;
        let enc = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 100;
        let jwt = format!(
            "{}.{}.sig",
            enc(r#"{"alg":"RS256"}"#),
            enc(&format!(r#"{{"exp":{exp}}}"#))
        );
        let left = jwt_lifetime(&jwt).unwrap();
        assert!(left <= Duration::from_secs(100) && left >= Duration::from_secs(98));
        assert_eq!(jwt_lifetime("not-a-jwt"), None);
        let expired = format!("{}.{}.s", enc("{}"), enc(r#"{"exp":1}"#));
        assert_eq!(jwt_lifetime(&expired), None);
    }

    #[test]
    fn a_token_never_prints() {
        let t = parse_token(br#"{"access_token":"secret-jwt","expires_in":60}"#).unwrap();
        assert!(!format!("{t:?}").contains("secret-jwt"));
    }

    #[test]
    fn audiences_are_url_encoded() {
        assert_eq!(
            url_encode("https://eventgrid.azure.net"),
            "https%3A%2F%2Feventgrid.azure.net"
        );
    }
}
