//! gRPC services: decode requests, identify the caller, call the broker core,
//! map errors ([`status`]). No business rules live here.

pub mod admin_service;
pub mod broker_service;
pub mod schemas_service;
pub mod status;

pub use admin_service::AdminService;
pub use broker_service::BrokerService;
pub use schemas_service::SchemasService;
