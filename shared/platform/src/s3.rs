//! S3: the raw landing zone and the Parquet lake. Path-style addressing against any
//! S3-compatible endpoint; checksums only where the operation requires them (local
//! servers such as s3s-fs and Garage reject the newer defaults).

use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use secrecy::ExposeSecret;

use crate::config::S3Config;

/// A client for the configured endpoint.
pub async fn client(config: &S3Config) -> Client {
    let mut builder = match (&config.access_key_id, &config.secret_access_key) {
        (Some(id), Some(secret)) => aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .credentials_provider(Credentials::new(
                id,
                secret.expose_secret(),
                None,
                None,
                "tidemark-config",
            )),
        _ => {
            let shared = aws_config::defaults(BehaviorVersion::latest()).load().await;
            aws_sdk_s3::config::Builder::from(&shared)
        }
    };
    builder = builder
        .region(Region::new(config.region.clone()))
        .endpoint_url(&config.endpoint)
        .force_path_style(true)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .retry_config(RetryConfig::standard().with_max_attempts(3))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(std::time::Duration::from_secs(2))
                .operation_timeout(config.timeout)
                .build(),
        );
    Client::from_conf(builder.build())
}

/// Creates the bucket unless it exists.
pub async fn ensure_bucket(client: &Client, bucket: &str) -> Result<(), aws_sdk_s3::Error> {
    if client.head_bucket().bucket(bucket).send().await.is_ok() {
        return Ok(());
    }
    match client.create_bucket().bucket(bucket).send().await {
        Ok(_) => Ok(()),
        Err(e) => {
            let e = aws_sdk_s3::Error::from(e);
            match e {
                aws_sdk_s3::Error::BucketAlreadyOwnedByYou(_)
                | aws_sdk_s3::Error::BucketAlreadyExists(_) => Ok(()),
                e => Err(e),
            }
        }
    }
}

/// Readiness: HEAD the bucket.
pub async fn check(client: Client, bucket: String) -> Result<(), String> {
    client
        .head_bucket()
        .bucket(bucket)
        .send()
        .await
        .map(drop)
        .map_err(|e| {
            tracing::debug!(error = %aws_sdk_s3::error::DisplayErrorContext(&e), "S3 readiness check failed");
            "unavailable".to_owned()
        })
}
