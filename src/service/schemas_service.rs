//! `joinery.v1.Schemas`: list, fetch, register and try out message schemas.
//! Reading is open to every authenticated agency; registering is for
//! `broker.operators` and is audited.

use prost::Message;
use tonic::{Request, Response, Status};

use super::broker_service::{identify, refuse};
use crate::audit::{AuditEvent, EventKind};
use crate::broker::{Broker, BrokerError};
use crate::proto::schemas_server;
use crate::proto::{
    validate_message_request::Payload, BreakingChange as PbBreakingChange, GetSchemaRequest,
    GetSchemaResponse, ListSchemasRequest, ListSchemasResponse, RegisterSchemaRequest,
    RegisterSchemaResponse, SchemaPackage, ValidateMessageRequest, ValidateMessageResponse,
    Violation,
};
use crate::schema::SchemaError;

/// Most files one registration may carry, and their total size.
const MAX_FILES: usize = 256;
const MAX_SOURCE_BYTES: usize = 4 << 20;

pub struct SchemasService {
    broker: Broker,
}

impl SchemasService {
    pub fn new(broker: Broker) -> Self {
        Self { broker }
    }

    async fn caller<T>(&self, request: &Request<T>) -> Result<String, Status> {
        match identify(request) {
            Ok(caller) => Ok(caller),
            Err((who, e)) => Err(refuse(&self.broker, &who, "", "", e).await),
        }
    }
}

fn schema_status(err: SchemaError) -> Status {
    let (code, reason) = match &err {
        SchemaError::UnknownType(_) | SchemaError::UnknownName(_) => {
            (tonic::Code::NotFound, "schema_not_found")
        }
        SchemaError::Breaking(_) => (tonic::Code::FailedPrecondition, "breaking_change"),
        SchemaError::Undecodable { .. }
        | SchemaError::Invalid { .. }
        | SchemaError::BadJson { .. } => (tonic::Code::InvalidArgument, "invalid_payload"),
        SchemaError::Compile(_) | SchemaError::Rejected(_) | SchemaError::Directory { .. } => {
            (tonic::Code::InvalidArgument, "invalid_schema")
        }
        SchemaError::Stored(_) => (tonic::Code::Internal, "schema_storage"),
    };
    let mut status = Status::new(code, format!("{reason}: {err}"));
    status.metadata_mut().insert(
        super::status::REASON_KEY,
        tonic::metadata::MetadataValue::from_static(reason),
    );
    status
}

fn violations_of(err: &SchemaError) -> Vec<Violation> {
    match err {
        SchemaError::Invalid { violations, .. } => violations
            .iter()
            .map(|v| Violation {
                field: v.field.clone(),
                rule: v.rule.clone(),
                message: v.message.clone(),
            })
            .collect(),
        other => vec![Violation {
            field: String::new(),
            rule: "decode".into(),
            message: other.to_string(),
        }],
    }
}

#[tonic::async_trait]
impl schemas_server::Schemas for SchemasService {
    async fn list_schemas(
        &self,
        request: Request<ListSchemasRequest>,
    ) -> Result<Response<ListSchemasResponse>, Status> {
        self.caller(&request).await?;
        let snapshot = self.broker.schemas().snapshot();
        let packages = snapshot
            .packages()
            .map(|p| SchemaPackage {
                package: p.package.clone(),
                source: p.source.as_str().to_string(),
                files: p.files.clone(),
                message_types: p.message_types.clone(),
                revision: p.revision,
            })
            .collect();
        Ok(Response::new(ListSchemasResponse { packages }))
    }

    async fn get_schema(
        &self,
        request: Request<GetSchemaRequest>,
    ) -> Result<Response<GetSchemaResponse>, Status> {
        self.caller(&request).await?;
        let snapshot = self.broker.schemas().snapshot();
        let (package, descriptor_set) = snapshot
            .descriptors_of(&request.get_ref().name)
            .map_err(schema_status)?;
        Ok(Response::new(GetSchemaResponse {
            package,
            descriptor_set,
        }))
    }

    async fn register_schema(
        &self,
        request: Request<RegisterSchemaRequest>,
    ) -> Result<Response<RegisterSchemaResponse>, Status> {
        let caller = self.caller(&request).await?;
        if let Err(e) = self.broker.check_operator(&caller) {
            return Err(refuse(&self.broker, &caller, "", "", e).await);
        }
        let request = request.into_inner();
        let size: usize = request
            .files
            .iter()
            .map(|f| f.content.len() + f.path.len())
            .sum();
        if request.files.len() > MAX_FILES || size > MAX_SOURCE_BYTES {
            return Err(schema_status(SchemaError::Rejected(format!(
                "at most {MAX_FILES} files and {MAX_SOURCE_BYTES} bytes per registration"
            ))));
        }
        let files: Vec<(String, String)> = request
            .files
            .into_iter()
            .map(|f| (f.path, f.content))
            .collect();
        let registry = self.broker.schemas().clone();
        // One registration at a time, from prepare to commit.
        let _registering = registry.registering.lock().await;
        let preparing = registry.clone();
        let prepared = tokio::task::spawn_blocking(move || {
            let registry = preparing;
            let prepared = registry.prepare(&files);
            (registry, prepared)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        let (registry, prepared) = prepared;
        let (registration, next) = match prepared {
            Ok(ok) => ok,
            Err(SchemaError::Breaking(changes)) if request.dry_run => {
                return Ok(Response::new(RegisterSchemaResponse {
                    packages: Vec::new(),
                    message_types: Vec::new(),
                    breaking_changes: changes
                        .iter()
                        .map(|c| PbBreakingChange {
                            element: c.element.clone(),
                            kind: c.kind.code().to_string(),
                            detail: c.detail.clone(),
                        })
                        .collect(),
                }))
            }
            Err(e) => return Err(schema_status(e)),
        };
        if !request.dry_run {
            let store = self.broker.store().clone();
            let stored = registration.stored.clone();
            tokio::task::spawn_blocking(move || {
                for package in &stored {
                    store.put_schema(&package.package, &package.encode_to_vec())?;
                }
                Ok::<(), crate::storage::StorageError>(())
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| super::status::to_status(BrokerError::Storage(e)))?;
            // Written straight into sled, not journaled: a checkpoint makes
            // sled durable before the registration is answered.
            self.broker
                .store()
                .checkpoint()
                .await
                .map_err(|e| super::status::to_status(BrokerError::Storage(e)))?;
            registry.commit(next);
            for package in &registration.stored {
                let mut event = AuditEvent::new(EventKind::SchemaRegistered, caller.clone());
                event.reason = format!("{} revision {}", package.package, package.revision);
                let _ = self.broker.store().audit(event).await;
            }
        }
        Ok(Response::new(RegisterSchemaResponse {
            packages: registration.packages,
            message_types: registration.message_types,
            breaking_changes: Vec::new(),
        }))
    }

    async fn validate_message(
        &self,
        request: Request<ValidateMessageRequest>,
    ) -> Result<Response<ValidateMessageResponse>, Status> {
        self.caller(&request).await?;
        let request = request.into_inner();
        let snapshot = self.broker.schemas().snapshot();
        if snapshot.message(&request.message_type).is_none() {
            return Err(schema_status(SchemaError::UnknownType(
                request.message_type,
            )));
        }
        let result = match &request.payload {
            Some(Payload::Binary(bytes)) => snapshot
                .validate(&request.message_type, bytes)
                .map(|m| m.encode_to_vec()),
            Some(Payload::Json(json)) => snapshot
                .from_json(&request.message_type, json)
                .map(|m| m.encode_to_vec()),
            None => snapshot
                .validate(&request.message_type, &[])
                .map(|m| m.encode_to_vec()),
        };
        Ok(Response::new(match result {
            Ok(binary) => ValidateMessageResponse {
                valid: true,
                violations: Vec::new(),
                binary,
            },
            Err(e) => ValidateMessageResponse {
                valid: false,
                violations: violations_of(&e),
                binary: Vec::new(),
            },
        }))
    }
}
