//! A small gRPC client for the `joinery` command-line verbs and for embedding
//! applications: connects to a broker over mutual TLS.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::proto::broker_client::BrokerClient;

/// Why a client could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("could not read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid broker address {addr:?}")]
    Address {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("could not connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Where the broker is and which certificate to present.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `https://host:port`
    pub addr: String,
    /// CA that signed the broker's certificate.
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Name to check the broker's certificate against (default: the host of `addr`).
    pub server_name: Option<String>,
}

fn read(path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|source| ClientError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Opens a mutual-TLS channel to the broker. An `http://` address opens a
/// plaintext channel instead, for a broker serving loopback-only plaintext
/// (`[tls] insecure_plaintext_agency`, for measuring what TLS costs).
pub async fn connect_channel(options: &ClientOptions) -> Result<Channel, ClientError> {
    let address_error = |source| ClientError::Address {
        addr: options.addr.clone(),
        source,
    };
    let connect_error = |source| ClientError::Connect {
        addr: options.addr.clone(),
        source,
    };
    if options.addr.starts_with("http://") {
        return Endpoint::from_shared(options.addr.clone())
            .map_err(address_error)?
            .connect()
            .await
            .map_err(connect_error);
    }
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&options.ca)?))
        .identity(Identity::from_pem(
            read(&options.cert)?,
            read(&options.key)?,
        ));
    if let Some(name) = &options.server_name {
        tls = tls.domain_name(name.clone());
    }
    let endpoint = Endpoint::from_shared(options.addr.clone())
        .map_err(address_error)?
        .tls_config(tls)
        .map_err(address_error)?;
    endpoint.connect().await.map_err(connect_error)
}

/// A `joinery.v1.Broker` client over mutual TLS.
pub async fn connect(options: &ClientOptions) -> Result<BrokerClient<Channel>, ClientError> {
    Ok(BrokerClient::new(connect_channel(options).await?))
}
