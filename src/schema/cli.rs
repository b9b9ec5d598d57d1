//! `joinery schema`: list the broker's schemas, check a directory of `.proto`
//! files (compile, lint, breaking changes against a directory or a running
//! broker) and register it.

use std::path::{Path, PathBuf};

use crate::client::ClientOptions;
use crate::proto::schemas_client::SchemasClient;
use crate::proto::{ListSchemasRequest, ProtoFile, RegisterSchemaRequest};

use super::{Registry, SchemaError};

/// Every `.proto` under `dir` as (import path, content).
pub fn read_dir(dir: &Path) -> Result<Vec<(String, String)>, SchemaError> {
    let mut names = Vec::new();
    super::collect_protos(dir, dir, &mut names).map_err(|e| SchemaError::Directory {
        dir: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let content =
                std::fs::read_to_string(dir.join(&name)).map_err(|e| SchemaError::Directory {
                    dir: dir.to_path_buf(),
                    reason: format!("{name}: {e}"),
                })?;
            Ok((name, content))
        })
        .collect()
}

/// Style problems that do not stop compilation but make a schema hard to
/// evolve: unversioned packages, files outside their package's folder.
pub fn lint(registration: &super::Registration, next: &super::Snapshot) -> Vec<String> {
    let mut problems = Vec::new();
    for package in &registration.packages {
        let version = package.rsplit('.').next().unwrap_or_default();
        let versioned = version.len() > 1
            && version.starts_with('v')
            && version[1..].chars().all(|c| c.is_ascii_digit());
        if !versioned {
            problems.push(format!(
                "package {package} does not end in a version such as .v1; breaking changes then have nowhere to go"
            ));
        }
        if let Some(info) = next.packages.get(package) {
            let folder = package.replace('.', "/");
            for file in &info.files {
                if !file.starts_with(&format!("{folder}/")) {
                    problems.push(format!(
                        "{file} declares package {package}; put it under {folder}/ so imports stay predictable"
                    ));
                }
            }
        }
    }
    problems
}

/// `schema check`: compile, lint, and compare with `against` (a directory)
/// or with what a running broker has (dry-run registration).
pub async fn check(
    dir: &Path,
    against: Option<&Path>,
    broker: Option<&ClientOptions>,
) -> anyhow::Result<bool> {
    let files = read_dir(dir)?;
    if files.is_empty() {
        anyhow::bail!("no .proto files under {}", dir.display());
    }
    let dirs: Vec<PathBuf> = against.map(|p| vec![p.to_path_buf()]).unwrap_or_default();
    let registry = Registry::load(&dirs, Vec::new())?;
    let mut ok = true;
    match registry.prepare(&files) {
        Ok((registration, next)) => {
            println!(
                "compiled {} file(s): packages {}",
                files.len(),
                registration.packages.join(", ")
            );
            for message in &registration.message_types {
                println!("  {message}");
            }
            for problem in lint(&registration, &next) {
                println!("lint: {problem}");
            }
        }
        Err(SchemaError::Breaking(changes)) => {
            ok = false;
            println!(
                "breaking changes against {}:",
                against.map(|p| p.display().to_string()).unwrap_or_default()
            );
            for change in changes {
                println!("  {change}");
            }
        }
        Err(e) => {
            println!("does not compile: {e}");
            return Ok(false);
        }
    }
    if let Some(options) = broker {
        let channel = crate::client::connect_channel(options).await?;
        let response = SchemasClient::new(channel)
            .register_schema(RegisterSchemaRequest {
                files: to_proto_files(files),
                dry_run: true,
            })
            .await?
            .into_inner();
        if response.breaking_changes.is_empty() {
            println!("compatible with the schemas registered on {}", options.addr);
        } else {
            ok = false;
            println!("breaking changes against {}:", options.addr);
            for c in response.breaking_changes {
                println!("  {} {}: {}", c.kind, c.element, c.detail);
            }
        }
    }
    Ok(ok)
}

pub fn to_proto_files(files: Vec<(String, String)>) -> Vec<ProtoFile> {
    files
        .into_iter()
        .map(|(path, content)| ProtoFile { path, content })
        .collect()
}

/// `schema register`: sends every `.proto` under `dir` to the broker.
pub async fn register(dir: &Path, options: &ClientOptions) -> anyhow::Result<()> {
    let files = read_dir(dir)?;
    let channel = crate::client::connect_channel(options).await?;
    let response = SchemasClient::new(channel)
        .register_schema(RegisterSchemaRequest {
            files: to_proto_files(files),
            dry_run: false,
        })
        .await?
        .into_inner();
    println!("registered {}", response.packages.join(", "));
    for message in response.message_types {
        println!("  {message}");
    }
    Ok(())
}

/// `schema list`: the broker's packages.
pub async fn list(options: &ClientOptions) -> anyhow::Result<()> {
    let channel = crate::client::connect_channel(options).await?;
    let response = SchemasClient::new(channel)
        .list_schemas(ListSchemasRequest {})
        .await?
        .into_inner();
    println!(
        "{:<28} {:<10} {:>8}  message types",
        "package", "source", "revision"
    );
    for p in response.packages {
        println!(
            "{:<28} {:<10} {:>8}  {}",
            p.package,
            p.source,
            p.revision,
            p.message_types.len()
        );
    }
    Ok(())
}

/// Converts between JSON and protobuf with descriptors fetched from the
/// broker (`GetSchema`), cached per package.
#[derive(Default)]
pub struct JsonCodec {
    pools: std::collections::HashMap<String, prost_reflect::DescriptorPool>,
}

impl JsonCodec {
    async fn descriptor(
        &mut self,
        channel: &tonic::transport::Channel,
        message_type: &str,
    ) -> anyhow::Result<prost_reflect::MessageDescriptor> {
        if let Some(d) = self
            .pools
            .values()
            .find_map(|p| p.get_message_by_name(message_type))
        {
            return Ok(d);
        }
        let response = SchemasClient::new(channel.clone())
            .get_schema(crate::proto::GetSchemaRequest {
                name: message_type.to_string(),
            })
            .await?
            .into_inner();
        let pool = prost_reflect::DescriptorPool::decode(response.descriptor_set.as_slice())?;
        let descriptor = pool
            .get_message_by_name(message_type)
            .ok_or_else(|| anyhow::anyhow!("the broker has no message type {message_type}"))?;
        self.pools.insert(response.package, pool);
        Ok(descriptor)
    }

    /// Protobuf JSON → encoded protobuf.
    pub async fn encode(
        &mut self,
        channel: &tonic::transport::Channel,
        message_type: &str,
        json: &str,
    ) -> anyhow::Result<Vec<u8>> {
        let descriptor = self.descriptor(channel, message_type).await?;
        let mut deserializer = serde_json::Deserializer::from_str(json);
        let message = prost_reflect::DynamicMessage::deserialize(descriptor, &mut deserializer)?;
        deserializer.end()?;
        Ok(prost::Message::encode_to_vec(&message))
    }

    /// Encoded protobuf → protobuf JSON.
    pub async fn decode(
        &mut self,
        channel: &tonic::transport::Channel,
        message_type: &str,
        payload: &[u8],
    ) -> anyhow::Result<String> {
        let descriptor = self.descriptor(channel, message_type).await?;
        let message = prost_reflect::DynamicMessage::decode(descriptor, payload)?;
        Ok(serde_json::to_string(&message)?)
    }
}
