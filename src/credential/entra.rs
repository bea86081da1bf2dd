//! Entra ID token sources backed by `azure_identity` 1.0.
//!
//! One [`AzureSourceFactory`] per process turns the configured [`CredentialConfig`] into
//! `azure_identity` credentials. What the crate does on its own, checked in its source:
//!
//! * **Managed identity**: `ManagedIdentityCredential::new` looks at the process environment
//!   and speaks the App Service / Container Apps protocol to `IDENTITY_ENDPOINT` (sending
//!   `IDENTITY_HEADER` as `x-identity-header`) when both are set, IMDS otherwise; user-assigned
//!   when a client id is given. Nothing to do here but pass the client id.
//! * **Authority host**: workload identity and client secret credentials read
//!   `AZURE_AUTHORITY_HOST` themselves only when no cloud is configured; the proxy passes the
//!   configured host as a custom cloud so flag and environment behave alike. It must be HTTPS
//!   (the crate refuses anything else).
//! * **Caching**: every credential but the Azure CLI one caches per scope and answers from the
//!   cache until 5 minutes before expiry; the refresher works around it by building a fresh
//!   instance with [`SourceFactory::build`].
//! * **HTTP**: see [`super::transport`] for why the proxy supplies its own client.

use super::source::{BoxFuture, SourceError, SourceFactory, Token, TokenSource};
use super::transport::token_http_client;
use crate::config::{ConfigError, CredentialConfig};
use crate::secret::Secret;
use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::TokenCredential;
use azure_core::http::{ClientOptions, RetryOptions, Transport};
use azure_identity::{
    AzureCliCredential, AzureCliCredentialOptions, ClientAssertionCredentialOptions,
    ClientSecretCredential, ClientSecretCredentialOptions, ManagedIdentityCredential,
    ManagedIdentityCredentialOptions, UserAssignedId, WorkloadIdentityCredential,
    WorkloadIdentityCredentialOptions,
};
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

/// Builds `azure_identity` credentials for the configured identity and scope.
pub struct AzureSourceFactory {
    credential: CredentialConfig,
    scope: Arc<str>,
    /// Options shared by every instance (our transport, no internal retries, the cloud); the
    /// token cache lives in the credential, so sharing these keeps HTTP connections pooled
    /// without sharing cached tokens.
    client_options: ClientOptions,
}

impl std::fmt::Debug for AzureSourceFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureSourceFactory")
            .field("credential", &credential_name(&self.credential))
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl AzureSourceFactory {
    /// Prepares the factory: builds the HTTP client (trusting `token_ca_file` too, never the
    /// upstream's `--ca-file`) unless the Azure CLI is used, which needs none.
    pub fn new(
        credential: &CredentialConfig,
        scope: &str,
        token_ca_file: Option<&Path>,
    ) -> Result<Self, ConfigError> {
        let mut client_options = ClientOptions {
            retry: RetryOptions::none(),
            cloud: authority_host(credential).map(custom_cloud),
            ..Default::default()
        };
        if !matches!(credential, CredentialConfig::AzureCli { .. }) {
            let client = token_http_client(token_ca_file)?;
            client_options.transport = Some(Transport::new(Arc::new(client)));
        }
        Ok(AzureSourceFactory {
            credential: credential.clone(),
            scope: scope.into(),
            client_options,
        })
    }

    fn build_credential(&self) -> azure_core::Result<Arc<dyn TokenCredential>> {
        let client_options = self.client_options.clone();
        Ok(match &self.credential {
            CredentialConfig::WorkloadIdentity {
                client_id,
                tenant_id,
                token_file,
                ..
            } => WorkloadIdentityCredential::new(Some(WorkloadIdentityCredentialOptions {
                credential_options: ClientAssertionCredentialOptions { client_options },
                client_id: Some(client_id.clone()),
                tenant_id: Some(tenant_id.clone()),
                token_file_path: Some(token_file.clone()),
            }))?,
            CredentialConfig::ManagedIdentity { client_id } => {
                ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                    user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                    client_options,
                }))?
            }
            CredentialConfig::ClientSecret {
                tenant_id,
                client_id,
                secret,
                ..
            } => ClientSecretCredential::new(
                tenant_id,
                client_id.clone(),
                azure_secret(secret),
                Some(ClientSecretCredentialOptions { client_options }),
            )?,
            CredentialConfig::AzureCli { tenant_id } => {
                AzureCliCredential::new(Some(AzureCliCredentialOptions {
                    tenant_id: tenant_id.clone(),
                    ..Default::default()
                }))?
            }
        })
    }
}

impl SourceFactory for AzureSourceFactory {
    fn build(&self) -> Result<Arc<dyn TokenSource>, SourceError> {
        let credential = self
            .build_credential()
            .map_err(|e| SourceError::from_error(&e))?;
        Ok(Arc::new(AzureSource {
            credential,
            scope: self.scope.clone(),
        }))
    }
}

/// Short name of the credential kind, for logs and `check`.
pub fn credential_name(credential: &CredentialConfig) -> &'static str {
    match credential {
        CredentialConfig::WorkloadIdentity { .. } => "workload-identity",
        CredentialConfig::ManagedIdentity { .. } => "managed-identity",
        CredentialConfig::ClientSecret { .. } => "client-secret",
        CredentialConfig::AzureCli { .. } => "azure-cli",
    }
}

fn authority_host(credential: &CredentialConfig) -> Option<&str> {
    match credential {
        CredentialConfig::WorkloadIdentity { authority_host, .. }
        | CredentialConfig::ClientSecret { authority_host, .. } => authority_host.as_deref(),
        CredentialConfig::ManagedIdentity { .. } | CredentialConfig::AzureCli { .. } => None,
    }
}

fn custom_cloud(authority_host: &str) -> Arc<CloudConfiguration> {
    let mut custom = CustomConfiguration::default();
    custom.authority_host = authority_host.to_owned();
    Arc::new(CloudConfiguration::Custom(custom))
}

fn azure_secret(secret: &Secret) -> azure_core::credentials::Secret {
    azure_core::credentials::Secret::new(secret.expose().to_owned())
}

/// One `azure_identity` credential asked for one scope.
struct AzureSource {
    credential: Arc<dyn TokenCredential>,
    scope: Arc<str>,
}

impl TokenSource for AzureSource {
    fn fetch(&self) -> BoxFuture<'_, Result<Token, SourceError>> {
        Box::pin(async move {
            let scopes = [&*self.scope];
            let token = self
                .credential
                .get_token(&scopes, None)
                .await
                .map_err(|e| SourceError::from_error(&e))?;
            Ok(Token {
                secret: Secret::new(token.token.secret()),
                expires_at: SystemTime::from(token.expires_on),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_problems_surface_when_building() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = CredentialConfig::WorkloadIdentity {
            client_id: "client".into(),
            tenant_id: "tenant".into(),
            token_file: dir.path().join("missing-token"),
            authority_host: Some("https://login.example.test".into()),
        };
        let factory = AzureSourceFactory::new(&config, "https://redis.azure.com/.default", None)
            .expect("factory");
        let err = factory.build().err().expect("missing token file");
        assert!(err.message().contains("missing-token"), "{err}");

        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "federated").expect("write");
        let config = CredentialConfig::WorkloadIdentity {
            client_id: "client".into(),
            tenant_id: "tenant".into(),
            token_file,
            authority_host: Some("http://insecure.example.test".into()),
        };
        let factory = AzureSourceFactory::new(&config, "https://redis.azure.com/.default", None)
            .expect("factory");
        let err = factory.build().err().expect("http authority");
        assert!(err.message().contains("HTTPS"), "{err}");
    }

    #[test]
    fn debug_shows_no_secret() {
        let config = CredentialConfig::ClientSecret {
            tenant_id: "tenant".into(),
            client_id: "client".into(),
            secret: Secret::new("hunter2-client-secret"),
            authority_host: None,
        };
        let factory = AzureSourceFactory::new(&config, "scope", None).expect("factory");
        assert!(factory.build().is_ok());
        assert!(!format!("{factory:?}").contains("hunter2"));
    }
}
