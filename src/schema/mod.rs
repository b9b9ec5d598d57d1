//! The schema registry: every message type the broker knows, and validation
//! of every published payload against its type and rules.
//!
//! # Where types come from
//! 1. The standard library (`proto/interop/**`), compiled by `build.rs` with
//!    protox and embedded in the binary.
//! 2. `.proto` directories named in `[schemas] dirs`, compiled in-process with
//!    protox at start-up (they may import the standard library and
//!    `buf/validate/validate.proto`).
//! 3. Packages registered at run time through the `Schemas` service, stored
//!    durably in the data directory and loaded again at start-up. A
//!    registered package replaces the same package from 1 or 2.
//!
//! Everything is built into one immutable [`Snapshot`] (a
//! `prost_reflect::DescriptorPool` plus a validator); registering builds a new
//! snapshot from scratch and swaps it in, so readers never see a half-built
//! pool.
//!
//! # Rules, and why prost-protovalidate
//! Field rules are declared in the `.proto` files as `buf.validate`
//! annotations, the ecosystem convention, and evaluated at run time by
//! `prost-protovalidate`, which reads them from prost-reflect descriptors and
//! so works on types compiled at run time (no generated code), including CEL
//! message rules. The alternative — our own evaluator for a subset of the
//! annotations — would drift from the standard and from what `buf lint` and
//! other languages' protovalidate libraries check for the same files.
//! Its cost: its types crate generates code with `protoc` at build time, so
//! building joinery needs protoc installed (running it does not).
//! One rule it cannot express is the NHS number's modulus-11 check digit (its
//! CEL engine has no string indexing), so that one is a joinery annotation,
//! `(joinery.rules.v1.field).nhs_number`, evaluated here after
//! buf.validate's rules (see [`rules`]).
//!
//! # Invariants
//! - A payload is valid only if it decodes as its declared type, every
//!   buf.validate rule holds and every joinery rule holds.
//! - Registration never makes a registered type incompatible: breaking
//!   changes (see [`compat`]) are refused, all listed.

pub mod cli;
pub mod compat;
mod rules;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};
use prost_types::FileDescriptorProto;

pub use compat::BreakingChange;

/// The standard library's descriptors, embedded by `build.rs`.
pub const STANDARD_LIBRARY: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/interop_library.bin"));

/// Packages that belong to the registry's own machinery, not to integrators.
const INFRASTRUCTURE: &[&str] = &["buf.validate", "google.protobuf", "joinery.rules.v1"];

/// Why a schema operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("message type {0:?} is not known to this broker's schema registry")]
    UnknownType(String),
    #[error("no schema package or message type is called {0:?}")]
    UnknownName(String),
    #[error("the payload is not a valid {message_type}: {reason}")]
    Undecodable {
        message_type: String,
        reason: String,
    },
    #[error("the payload breaks the rules of {message_type}: {}", describe(.violations))]
    Invalid {
        message_type: String,
        violations: Vec<FieldViolation>,
    },
    #[error("the JSON is not a valid {message_type}: {reason}")]
    BadJson {
        message_type: String,
        reason: String,
    },
    #[error("could not compile the schemas: {0}")]
    Compile(String),
    #[error("could not read schema directory {dir}: {reason}")]
    Directory { dir: PathBuf, reason: String },
    #[error("the new schemas are not compatible with the registered ones: {}", describe_changes(.0))]
    Breaking(Vec<BreakingChange>),
    #[error("{0}")]
    Rejected(String),
    #[error("the stored schema of package {0:?} is unreadable")]
    Stored(String),
}

fn describe(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{} ({}): {}", v.field, v.rule, v.message))
        .collect::<Vec<_>>()
        .join("; ")
}

fn describe_changes(changes: &[BreakingChange]) -> String {
    changes
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Field path, e.g. `child.nhs_number`.
    pub field: String,
    /// Rule id, e.g. `string.pattern`, `required`, `joinery.nhs_number`.
    pub rule: String,
    pub message: String,
}

/// Where a package comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Standard,
    Config,
    Registered,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Standard => "standard",
            Source::Config => "config",
            Source::Registered => "registered",
        }
    }
}

/// A package as listed.
#[derive(Debug, Clone)]
pub struct PackageInfo {
    pub package: String,
    pub source: Source,
    pub files: Vec<String>,
    pub message_types: Vec<String>,
    pub revision: u32,
}

/// A registered package as stored: its files' descriptors and revision.
#[derive(Clone, PartialEq, Message)]
pub struct StoredPackage {
    #[prost(string, tag = "1")]
    pub package: String,
    #[prost(uint32, tag = "2")]
    pub revision: u32,
    /// Encoded `FileDescriptorProto`s, in dependency order (kept encoded:
    /// prost_types would drop their options, and with them the rules).
    #[prost(bytes = "vec", repeated, tag = "3")]
    pub files: Vec<Vec<u8>>,
}

/// One compiled file, kept encoded with its options.
#[derive(Debug, Clone)]
struct FileBytes {
    package: String,
    name: String,
    bytes: Vec<u8>,
}

/// The result of a registration (or a dry run).
#[derive(Debug, Clone)]
pub struct Registration {
    pub packages: Vec<String>,
    pub message_types: Vec<String>,
    /// What would be stored: one entry per package.
    pub stored: Vec<StoredPackage>,
}

/// An immutable view of every known type.
pub struct Snapshot {
    pool: DescriptorPool,
    validator: prost_protovalidate::Validator,
    rules: rules::JoineryRules,
    /// CEL rule id → the message its .proto declares (the evaluator leaves
    /// message-level rule violations without one).
    cel_messages: std::collections::HashMap<String, String>,
    packages: BTreeMap<String, PackageInfo>,
    /// Files of each source, for rebuilding.
    standard: Vec<FileBytes>,
    config: Vec<FileBytes>,
    registered: BTreeMap<String, StoredPackage>,
}

/// The registry: a snapshot behind a lock, swapped on registration.
pub struct Registry {
    current: RwLock<Arc<Snapshot>>,
    /// Held from `prepare` to `commit`: registrations one at a time, so one
    /// never builds on a snapshot another is about to replace.
    pub registering: tokio::sync::Mutex<()>,
}

impl Registry {
    /// Builds the registry from the standard library, `dirs`, and previously
    /// registered packages.
    pub fn load(dirs: &[PathBuf], registered: Vec<StoredPackage>) -> Result<Registry, SchemaError> {
        let library = DescriptorPool::decode(STANDARD_LIBRARY)
            .map_err(|e| SchemaError::Compile(format!("embedded standard library: {e}")))?;
        let standard: Vec<FileBytes> = library.files().map(|f| file_bytes(&f)).collect();
        let mut config = Vec::new();
        for dir in dirs {
            config.extend(compile_dir(dir, &standard)?);
        }
        let registered = registered
            .into_iter()
            .map(|p| (p.package.clone(), p))
            .collect();
        let snapshot = build(standard, config, registered)?;
        Ok(Registry {
            current: RwLock::new(Arc::new(snapshot)),
            registering: tokio::sync::Mutex::new(()),
        })
    }

    /// The current snapshot (cheap: an `Arc` clone).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Compiles `files` (path → content) and checks them against what is
    /// known. Nothing changes until [`Registry::commit`].
    pub fn prepare(
        &self,
        files: &[(String, String)],
    ) -> Result<(Registration, Arc<Snapshot>), SchemaError> {
        let current = self.snapshot();
        let compiled = compile_sources(files, &current)?;
        let mut by_package: BTreeMap<String, Vec<FileBytes>> = BTreeMap::new();
        for file in compiled {
            let package = file.package.clone();
            if package.is_empty() {
                return Err(SchemaError::Rejected(format!(
                    "{} has no package statement; every schema needs a versioned package such as council.visits.v1",
                    file.name
                )));
            }
            if INFRASTRUCTURE.iter().any(|p| package == *p) {
                return Err(SchemaError::Rejected(format!(
                    "package {package} belongs to the registry itself and cannot be registered"
                )));
            }
            by_package.entry(package).or_default().push(file);
        }
        let mut registered = current.registered.clone();
        let mut stored = Vec::new();
        for (package, files) in &by_package {
            let revision = registered.get(package).map(|p| p.revision).unwrap_or(0) + 1;
            let entry = StoredPackage {
                package: package.clone(),
                revision,
                files: files.iter().map(|f| f.bytes.clone()).collect(),
            };
            registered.insert(package.clone(), entry.clone());
            stored.push(entry);
        }
        let next = build(current.standard.clone(), current.config.clone(), registered)?;
        let mut breaking = Vec::new();
        for package in by_package.keys() {
            if current.packages.contains_key(package) {
                breaking.extend(compat::breaking_changes(&current.pool, &next.pool, package));
            }
        }
        if !breaking.is_empty() {
            return Err(SchemaError::Breaking(breaking));
        }
        let message_types = by_package
            .keys()
            .filter_map(|p| next.packages.get(p))
            .flat_map(|p| p.message_types.clone())
            .collect();
        Ok((
            Registration {
                packages: by_package.keys().cloned().collect(),
                message_types,
                stored,
            },
            Arc::new(next),
        ))
    }

    /// Makes a prepared snapshot current (after its packages are stored).
    pub fn commit(&self, next: Arc<Snapshot>) {
        match self.current.write() {
            Ok(mut guard) => *guard = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
    }
}

impl Snapshot {
    pub fn message(&self, full_name: &str) -> Option<MessageDescriptor> {
        self.pool.get_message_by_name(full_name)
    }

    pub fn packages(&self) -> impl Iterator<Item = &PackageInfo> {
        self.packages.values()
    }

    /// Decodes and validates a payload of `message_type`.
    pub fn validate(
        &self,
        message_type: &str,
        payload: &[u8],
    ) -> Result<DynamicMessage, SchemaError> {
        let descriptor = self
            .message(message_type)
            .ok_or_else(|| SchemaError::UnknownType(message_type.to_string()))?;
        let message =
            DynamicMessage::decode(descriptor, payload).map_err(|e| SchemaError::Undecodable {
                message_type: message_type.to_string(),
                reason: e.to_string(),
            })?;
        self.check(message_type, &message)?;
        Ok(message)
    }

    /// Checks every rule of an already decoded message.
    pub fn check(&self, message_type: &str, message: &DynamicMessage) -> Result<(), SchemaError> {
        let mut violations = Vec::new();
        match self.validator.validate(message) {
            Ok(()) => {}
            Err(prost_protovalidate::Error::Validation(e)) => {
                violations.extend(e.violations().iter().map(|v| {
                    let rule = v.rule_id().to_string();
                    let message = match v.message() {
                        "" => self
                            .cel_messages
                            .get(&rule)
                            .cloned()
                            .unwrap_or_else(|| format!("breaks rule {rule}")),
                        m => m.to_string(),
                    };
                    FieldViolation {
                        field: v.field_path(),
                        rule,
                        message,
                    }
                }))
            }
            Err(e) => {
                return Err(SchemaError::Rejected(format!(
                    "the rules of {message_type} could not be evaluated: {e}"
                )))
            }
        }
        self.rules.check(message, "", &mut violations);
        if violations.is_empty() {
            Ok(())
        } else {
            Err(SchemaError::Invalid {
                message_type: message_type.to_string(),
                violations,
            })
        }
    }

    /// Parses protobuf JSON into a validated message of `message_type`.
    pub fn from_json(&self, message_type: &str, json: &str) -> Result<DynamicMessage, SchemaError> {
        let descriptor = self
            .message(message_type)
            .ok_or_else(|| SchemaError::UnknownType(message_type.to_string()))?;
        let mut deserializer = serde_json::Deserializer::from_str(json);
        let message = DynamicMessage::deserialize(descriptor, &mut deserializer)
            .and_then(|m| deserializer.end().map(|()| m))
            .map_err(|e| SchemaError::BadJson {
                message_type: message_type.to_string(),
                reason: e.to_string(),
            })?;
        self.check(message_type, &message)?;
        Ok(message)
    }

    /// A package's files and every file they import, in dependency order.
    pub fn descriptors_of(&self, name: &str) -> Result<(String, Vec<u8>), SchemaError> {
        let package = if self.packages.contains_key(name) {
            name.to_string()
        } else if let Some(message) = self.message(name) {
            message.package_name().to_string()
        } else {
            return Err(SchemaError::UnknownName(name.to_string()));
        };
        let mut seen: BTreeSet<String> = BTreeSet::new();
        let mut ordered = Vec::new();
        for file in self.pool.files() {
            if file.package_name() == package {
                collect_file(&file, &mut seen, &mut ordered);
            }
        }
        // A FileDescriptorSet is `repeated FileDescriptorProto file = 1`.
        let mut set = Vec::new();
        for file in ordered {
            prost::encoding::bytes::encode(1, &file, &mut set);
        }
        Ok((package, set))
    }
}

fn collect_file(
    file: &prost_reflect::FileDescriptor,
    seen: &mut BTreeSet<String>,
    out: &mut Vec<Vec<u8>>,
) {
    if !seen.insert(file.name().to_string()) {
        return;
    }
    for dependency in file.dependencies() {
        collect_file(&dependency, seen, out);
    }
    out.push(file.encode_to_vec());
}

fn file_bytes(file: &prost_reflect::FileDescriptor) -> FileBytes {
    FileBytes {
        package: file.package_name().to_string(),
        name: file.name().to_string(),
        bytes: file.encode_to_vec(),
    }
}

/// A file waiting to be added to a pool: package, name, bytes, source,
/// revision, and the files it imports.
type Pending = (String, String, Vec<u8>, Source, u32, Vec<String>);

/// Builds a snapshot; a registered package replaces the same package of the
/// standard library or the config directories.
fn build(
    standard: Vec<FileBytes>,
    config: Vec<FileBytes>,
    registered: BTreeMap<String, StoredPackage>,
) -> Result<Snapshot, SchemaError> {
    let mut pool = DescriptorPool::new();
    let mut packages: BTreeMap<String, PackageInfo> = BTreeMap::new();
    let mut add = |pool: &mut DescriptorPool,
                   package: &str,
                   name: &str,
                   bytes: &[u8],
                   source: Source,
                   revision: u32|
     -> Result<(), SchemaError> {
        let info = packages
            .entry(package.to_string())
            .or_insert_with(|| PackageInfo {
                package: package.to_string(),
                source,
                files: Vec::new(),
                message_types: Vec::new(),
                revision,
            });
        info.files.push(name.to_string());
        pool.decode_file_descriptor_proto(bytes)
            .map_err(|e| SchemaError::Compile(format!("{name}: {e}")))
    };
    // Every file to add, then added in dependency order (a registered
    // package may replace one the standard library's files import, or import
    // another registered package).
    let mut todo: Vec<Pending> = Vec::new();
    for (files, source) in [(&standard, Source::Standard), (&config, Source::Config)] {
        for file in files
            .iter()
            .filter(|f| !registered.contains_key(&f.package))
        {
            let proto = FileDescriptorProto::decode(file.bytes.as_slice())
                .map_err(|e| SchemaError::Compile(format!("{}: {e}", file.name)))?;
            todo.push((
                file.package.clone(),
                file.name.clone(),
                file.bytes.clone(),
                source,
                0,
                proto.dependency,
            ));
        }
    }
    for stored in registered.values() {
        for bytes in &stored.files {
            let proto = FileDescriptorProto::decode(bytes.as_slice())
                .map_err(|_| SchemaError::Stored(stored.package.clone()))?;
            todo.push((
                stored.package.clone(),
                proto.name().to_string(),
                bytes.clone(),
                Source::Registered,
                stored.revision,
                proto.dependency,
            ));
        }
    }
    while !todo.is_empty() {
        let ready = todo.iter().position(|(_, _, _, _, _, deps)| {
            deps.iter().all(|d| pool.get_file_by_name(d).is_some())
        });
        let Some(i) = ready else {
            let names: Vec<&str> = todo.iter().map(|t| t.1.as_str()).collect();
            return Err(SchemaError::Compile(format!(
                "imports that no known file provides, or an import cycle, among: {}",
                names.join(", ")
            )));
        };
        let (package, name, bytes, source, revision, _) = todo.remove(i);
        add(&mut pool, &package, &name, &bytes, source, revision)?;
    }
    for message in pool.all_messages() {
        if let Some(info) = packages.get_mut(message.package_name()) {
            info.message_types.push(message.full_name().to_string());
        }
    }
    packages.retain(|name, _| !INFRASTRUCTURE.contains(&name.as_str()));
    let validator = prost_protovalidate::Validator::new();
    let rules = rules::JoineryRules::new(&pool);
    let cel_messages = rules::cel_messages(&pool);
    Ok(Snapshot {
        pool,
        validator,
        rules,
        cel_messages,
        packages,
        standard,
        config,
        registered,
    })
}

/// Compiles every `.proto` under `dir`; imports resolve against the directory
/// and the standard library.
fn compile_dir(dir: &Path, standard: &[FileBytes]) -> Result<Vec<FileBytes>, SchemaError> {
    let mut names = Vec::new();
    collect_protos(dir, dir, &mut names).map_err(|e| SchemaError::Directory {
        dir: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    names.sort();
    let mut resolver = protox::file::ChainFileResolver::new();
    resolver.add(protox::file::IncludeFileResolver::new(dir.to_path_buf()));
    resolver.add(known_files(standard.iter().map(|f| f.bytes.as_slice()))?);
    compile_with(resolver, &names)
}

/// Compiles sources given as (path, content); imports resolve against them
/// and everything in `current`.
fn compile_sources(
    files: &[(String, String)],
    current: &Snapshot,
) -> Result<Vec<FileBytes>, SchemaError> {
    if files.is_empty() {
        return Err(SchemaError::Rejected("no .proto files given".into()));
    }
    let mut resolver = protox::file::ChainFileResolver::new();
    resolver.add(MemoryResolver(files.to_vec()));
    let known: Vec<Vec<u8>> = current
        .pool
        .files()
        .filter(|f| !files.iter().any(|(path, _)| path == f.name()))
        .map(|f| f.encode_to_vec())
        .collect();
    resolver.add(known_files(known.iter().map(Vec::as_slice))?);
    let names: Vec<String> = files.iter().map(|(path, _)| path.clone()).collect();
    compile_with(resolver, &names)
}

/// Already compiled files, for resolving imports.
fn known_files<'a>(
    files: impl Iterator<Item = &'a [u8]>,
) -> Result<protox::file::DescriptorSetFileResolver, SchemaError> {
    let mut set = Vec::new();
    for bytes in files {
        prost::encoding::bytes::encode(1, &bytes.to_vec(), &mut set);
    }
    protox::file::DescriptorSetFileResolver::decode(set.as_slice())
        .map_err(|e| SchemaError::Compile(e.to_string()))
}

/// Compiles `names`; returns just those files, encoded with their options.
fn compile_with(
    resolver: protox::file::ChainFileResolver,
    names: &[String],
) -> Result<Vec<FileBytes>, SchemaError> {
    let mut compiler = protox::Compiler::with_file_resolver(resolver);
    compiler.include_imports(true).include_source_info(false);
    compiler
        .open_files(names)
        .map_err(|e| SchemaError::Compile(format!("{e:?}").chars().take(2000).collect()))?;
    let pool = compiler.descriptor_pool();
    Ok(pool
        .files()
        .filter(|f| names.iter().any(|n| n == f.name()))
        .map(|f| file_bytes(&f))
        .collect())
}

/// Files held in memory, for registration requests.
struct MemoryResolver(Vec<(String, String)>);

impl protox::file::FileResolver for MemoryResolver {
    fn open_file(&self, name: &str) -> Result<protox::file::File, protox::Error> {
        match self.0.iter().find(|(path, _)| path == name) {
            Some((path, content)) => protox::file::File::from_source(path, content),
            None => Err(protox::Error::file_not_found(name)),
        }
    }
}

pub(crate) fn collect_protos(
    root: &Path,
    dir: &Path,
    out: &mut Vec<String>,
) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(root, &path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            if let Ok(relative) = path.strip_prefix(root) {
                out.push(relative.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    Ok(())
}
