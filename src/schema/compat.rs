//! Breaking-change detection between two versions of a schema package.
//!
//! When an agency registers a new version of a package (for example
//! `interop.referral.v1`), the registry compares it with the version already
//! registered and refuses it if any change would break a system built against
//! the old one. [`breaking_changes`] does that comparison: it takes two compiled
//! [`DescriptorPool`]s and returns every breaking change it finds, sorted, each
//! naming the fully-qualified element it concerns.
//!
//! Elements are matched by fully-qualified name (messages, enums) and by number
//! (fields, enum values), because numbers are what travel on the wire. A change
//! is breaking when a message that was valid and meaningful under the old
//! schema could be refused, dropped or read with another meaning under the new
//! one — on the protobuf wire *or* in the JSON form joinery also accepts:
//!
//! - **a message or enum removed** (nested ones too): senders and readers of it
//!   have nothing left to resolve the type name against;
//! - **a field number dropped without `reserved`**: nothing stops the number
//!   being reused later for a different meaning, and old data would then decode
//!   into the wrong field. Reserving the number (`reserved 3;` or a range) makes
//!   the removal compatible; reserving only the name does not;
//! - **a field number reused** under another name: old binary data decodes into
//!   the new field, and JSON payloads using the old name are refused;
//! - **a field type changed** (scalar kind, or message / enum type name; map
//!   key or value type): old data decodes wrongly or not at all. Wire-compatible
//!   pairs such as `int32`/`int64` are still reported: their generated code and
//!   JSON forms differ, and a standard library should not drift silently;
//! - **a cardinality changed**: singular ⇄ repeated ⇄ map, proto2 `required`
//!   added or dropped, or explicit presence (`optional`) added or dropped on a
//!   scalar, which changes generated code and what "unset" means;
//! - **a field moved into, out of, or between `oneof`s**: setting one member of
//!   a oneof clears the others, so the meaning of existing messages changes;
//! - **an enum value number dropped without `reserved`**, **moved to another
//!   number**, or **renamed** (JSON carries enum values by name);
//! - **a required rule added**: a protovalidate rule that makes a field (or a
//!   oneof) mandatory where it was not — `(buf.validate.field).required`, a
//!   minimum length / item / pair count of at least one on a field that is
//!   always validated, `(buf.validate.oneof).required`, or a required
//!   `(buf.validate.message).oneof` group. Producers built against the old
//!   schema leave those fields unset, so their messages would now be refused.
//!   A new field that is required at once counts too. The rule is checked only
//!   when the new pool knows the `buf.validate` extensions.
//!
//! Compatible, and so not reported: new messages, enums, fields (without a
//! required rule) and enum values; fields and enum values removed with their
//! numbers reserved; removing or relaxing validation rules; changes outside
//! the package being compared; services.
//!
//! Invariants: the comparison never panics on any pair of valid pools, and its
//! result is deterministic — sorted by element, then kind, then detail, without
//! duplicates.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use prost_reflect::{
    Cardinality, DescriptorPool, DynamicMessage, EnumDescriptor, ExtensionDescriptor,
    FieldDescriptor, Kind, MessageDescriptor, OneofDescriptor,
};

/// One breaking change found by [`breaking_changes`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BreakingChange {
    /// Fully-qualified element the change concerns, e.g.
    /// `interop.referral.v1.SafeguardingReferral.child`. Fields, oneofs and
    /// enum values are named under their message or enum
    /// (`interop.referral.v1.Urgency.URGENCY_HIGH`); for fields the old name is
    /// used, except for required rules where the new one is.
    pub element: String,
    /// What kind of change it is.
    pub kind: ChangeKind,
    /// One sentence an integrator understands, saying what changed and why it
    /// breaks.
    pub detail: String,
}

/// The kinds of breaking change. [`ChangeKind::code`] gives each a stable
/// upper-snake-case code for use in error reasons and reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChangeKind {
    /// A message of the package is gone.
    MessageRemoved,
    /// A field number is gone and the new message does not reserve it.
    FieldRemovedNotReserved,
    /// A field number is used by a field with another name.
    FieldNumberReused,
    /// A field's type (scalar kind, message or enum type, map key or value)
    /// changed.
    FieldTypeChanged,
    /// A field changed between singular, repeated and map, gained or lost
    /// proto2 `required`, or gained or lost explicit presence (`optional`).
    FieldCardinalityChanged,
    /// A field moved into, out of, or between `oneof`s.
    FieldOneofChanged,
    /// An enum of the package is gone.
    EnumRemoved,
    /// An enum value number is gone and the new enum does not reserve it.
    EnumValueRemoved,
    /// An enum value name kept its name but now has another number.
    EnumValueNumberChanged,
    /// An enum value number now carries another name.
    EnumValueRenamed,
    /// A validation rule now makes a field, oneof or group of fields mandatory.
    RequiredRuleAdded,
}

impl ChangeKind {
    /// Stable code for this kind, e.g. `FIELD_TYPE_CHANGED`. Codes are a
    /// contract with integrators: never change or reuse one.
    #[must_use]
    pub const fn code(self) -> &'static str {
        match self {
            Self::MessageRemoved => "MESSAGE_REMOVED",
            Self::FieldRemovedNotReserved => "FIELD_REMOVED_NOT_RESERVED",
            Self::FieldNumberReused => "FIELD_NUMBER_REUSED",
            Self::FieldTypeChanged => "FIELD_TYPE_CHANGED",
            Self::FieldCardinalityChanged => "FIELD_CARDINALITY_CHANGED",
            Self::FieldOneofChanged => "FIELD_ONEOF_CHANGED",
            Self::EnumRemoved => "ENUM_REMOVED",
            Self::EnumValueRemoved => "ENUM_VALUE_REMOVED",
            Self::EnumValueNumberChanged => "ENUM_VALUE_NUMBER_CHANGED",
            Self::EnumValueRenamed => "ENUM_VALUE_RENAMED",
            Self::RequiredRuleAdded => "REQUIRED_RULE_ADDED",
        }
    }
}

impl fmt::Display for ChangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl fmt::Display for BreakingChange {
    /// `FIELD_TYPE_CHANGED interop.referral.v1.SafeguardingReferral.child: <detail>`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.kind, self.element, self.detail)
    }
}

/// Breaking changes going from `old` to `new`, for the messages and enums of
/// `package` (e.g. `"interop.referral.v1"`) only.
///
/// Types of other packages in either pool are ignored, even when the package's
/// fields refer to them (a changed *reference* — a field now pointing at
/// another type — is still reported). An empty result means `new` can replace
/// `old`.
#[must_use]
pub fn breaking_changes(
    old: &DescriptorPool,
    new: &DescriptorPool,
    package: &str,
) -> Vec<BreakingChange> {
    let mut out = Changes::default();
    let old_rules = RuleExtensions::of(old);
    // No protovalidate in the new pool: the required-rule check is skipped.
    let new_rules = RuleExtensions::of(new).filter(|rules| rules.field.is_some());

    for old_msg in old
        .all_messages()
        .filter(|m| m.package_name() == package && !m.is_map_entry())
    {
        match new.get_message_by_name(old_msg.full_name()) {
            Some(new_msg) => {
                compare_messages(&old_msg, &new_msg, &mut out);
                if let Some(new_rules) = &new_rules {
                    compare_required_rules(
                        &old_msg,
                        &new_msg,
                        old_rules.as_ref(),
                        new_rules,
                        &mut out,
                    );
                }
            }
            None => out.push(
                old_msg.full_name(),
                ChangeKind::MessageRemoved,
                format!(
                    "message {} was removed, so systems that still send or read it would break",
                    old_msg.full_name()
                ),
            ),
        }
    }

    for old_enum in old.all_enums().filter(|e| e.package_name() == package) {
        match new.get_enum_by_name(old_enum.full_name()) {
            Some(new_enum) => compare_enums(&old_enum, &new_enum, &mut out),
            None => out.push(
                old_enum.full_name(),
                ChangeKind::EnumRemoved,
                format!(
                    "enum {} was removed, so fields and payloads that use it would break",
                    old_enum.full_name()
                ),
            ),
        }
    }

    out.finish()
}

/// Collects changes; sorts and deduplicates them at the end.
#[derive(Default)]
struct Changes(BTreeSet<BreakingChange>);

impl Changes {
    fn push(&mut self, element: impl Into<String>, kind: ChangeKind, detail: String) {
        self.0.insert(BreakingChange {
            element: element.into(),
            kind,
            detail,
        });
    }

    fn finish(self) -> Vec<BreakingChange> {
        // BTreeSet order is (element, kind, detail): the documented sort.
        self.0.into_iter().collect()
    }
}

fn compare_messages(old: &MessageDescriptor, new: &MessageDescriptor, out: &mut Changes) {
    let reserved = &new.descriptor_proto().reserved_range;
    let is_reserved = |number: u32| {
        // Message reserved ranges are [start, end).
        reserved.iter().any(|r| {
            i64::from(r.start()) <= i64::from(number) && i64::from(number) < i64::from(r.end())
        })
    };

    for old_field in old.fields() {
        let number = old_field.number();
        let element = format!("{}.{}", old.full_name(), old_field.name());
        let Some(new_field) = new.get_field(number) else {
            if !is_reserved(number) {
                out.push(
                    element,
                    ChangeKind::FieldRemovedNotReserved,
                    format!(
                        "field {} = {number} was removed without `reserved {number};`, so the number \
                         could later be reused and old data read with a different meaning",
                        old_field.name()
                    ),
                );
            }
            continue;
        };
        compare_fields(&old_field, &new_field, &element, out);
    }
}

fn compare_fields(old: &FieldDescriptor, new: &FieldDescriptor, element: &str, out: &mut Changes) {
    let number = old.number();
    if old.name() != new.name() {
        out.push(
            element,
            ChangeKind::FieldNumberReused,
            format!(
                "field number {number} was `{}` and is now `{}`, so old data would be read as \
                 the new field and JSON using the old name would be refused",
                old.name(),
                new.name()
            ),
        );
    }

    let (old_shape, new_shape) = (Shape::of(old), Shape::of(new));
    if old_shape.differs_from(new_shape) {
        out.push(
            element,
            ChangeKind::FieldCardinalityChanged,
            format!(
                "field {} = {number} changed from {} to {}, so existing senders and readers \
                 disagree on how many values it holds or whether it is set",
                old.name(),
                old_shape.label(),
                new_shape.label()
            ),
        );
    }

    // Compare types only when both sides are maps or both are not: a map turned
    // into a list is a cardinality change, and its entry type name says nothing.
    if old.is_map() == new.is_map() {
        let (old_type, new_type) = (type_name(old), type_name(new));
        if old_type != new_type {
            out.push(
                element,
                ChangeKind::FieldTypeChanged,
                format!(
                    "field {} = {number} changed type from {old_type} to {new_type}, so data \
                     written with the old schema no longer decodes as intended",
                    old.name()
                ),
            );
        }
    }

    let (old_oneof, new_oneof) = (real_oneof(old), real_oneof(new));
    if old_oneof != new_oneof {
        let describe = |oneof: &Option<String>| match oneof {
            Some(name) => format!("oneof `{name}`"),
            None => "no oneof".to_owned(),
        };
        out.push(
            element,
            ChangeKind::FieldOneofChanged,
            format!(
                "field {} = {number} moved from {} to {}, which changes which fields clear \
                 each other when set",
                old.name(),
                describe(&old_oneof),
                describe(&new_oneof)
            ),
        );
    }
}

/// How many values a field holds and whether it tracks presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Map,
    Repeated,
    /// proto2 `required`.
    Required,
    /// Singular with presence implied by its type or its oneof (messages,
    /// oneof members): presence cannot be changed independently.
    Singular,
    /// Singular scalar or enum with explicit presence (`optional`).
    Optional,
    /// Singular scalar or enum without presence (proto3 default).
    Implicit,
}

impl Shape {
    fn of(field: &FieldDescriptor) -> Self {
        if field.is_map() {
            Self::Map
        } else if field.is_list() {
            Self::Repeated
        } else if field.cardinality() == Cardinality::Required {
            Self::Required
        } else if matches!(field.kind(), Kind::Message(_)) || real_oneof(field).is_some() {
            Self::Singular
        } else if field.supports_presence() {
            Self::Optional
        } else {
            Self::Implicit
        }
    }

    /// Whether going from `self` to `new` changes cardinality. Presence is
    /// compared only when it is a property of the field itself: a field
    /// entering a oneof or becoming a message is reported as such instead.
    fn differs_from(self, new: Self) -> bool {
        let singular = |s: Self| matches!(s, Self::Singular | Self::Optional | Self::Implicit);
        if singular(self) && singular(new) {
            self != new && self != Self::Singular && new != Self::Singular
        } else {
            self != new
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Map => "a map",
            Self::Repeated => "repeated",
            Self::Required => "proto2 required",
            Self::Singular => "singular",
            Self::Optional => "optional (explicit presence)",
            Self::Implicit => "singular without presence",
        }
    }
}

/// The oneof a field belongs to, ignoring the synthetic oneofs of proto3
/// `optional`.
fn real_oneof(field: &FieldDescriptor) -> Option<String> {
    field
        .containing_oneof()
        .filter(|oneof| !oneof.is_synthetic())
        .map(|oneof| oneof.name().to_owned())
}

/// The field's type as written in a `.proto` file: `string`,
/// `interop.common.v1.Person`, `map<string, int32>`. Lists show their element.
fn type_name(field: &FieldDescriptor) -> String {
    match field.kind() {
        Kind::Message(entry) if field.is_map() => format!(
            "map<{}, {}>",
            kind_name(&entry.map_entry_key_field().kind()),
            kind_name(&entry.map_entry_value_field().kind())
        ),
        kind => kind_name(&kind),
    }
}

fn kind_name(kind: &Kind) -> String {
    let scalar = match kind {
        Kind::Message(message) => return message.full_name().to_owned(),
        Kind::Enum(enumeration) => return enumeration.full_name().to_owned(),
        Kind::Double => "double",
        Kind::Float => "float",
        Kind::Int32 => "int32",
        Kind::Int64 => "int64",
        Kind::Uint32 => "uint32",
        Kind::Uint64 => "uint64",
        Kind::Sint32 => "sint32",
        Kind::Sint64 => "sint64",
        Kind::Fixed32 => "fixed32",
        Kind::Fixed64 => "fixed64",
        Kind::Sfixed32 => "sfixed32",
        Kind::Sfixed64 => "sfixed64",
        Kind::Bool => "bool",
        Kind::String => "string",
        Kind::Bytes => "bytes",
    };
    scalar.to_owned()
}

fn compare_enums(old: &EnumDescriptor, new: &EnumDescriptor, out: &mut Changes) {
    let new_by_name: BTreeMap<String, i32> = new
        .values()
        .map(|v| (v.name().to_owned(), v.number()))
        .collect();
    let new_by_number: BTreeMap<i32, String> = new
        .values()
        .map(|v| (v.number(), v.name().to_owned()))
        .collect();
    let reserved = &new.enum_descriptor_proto().reserved_range;
    // Enum reserved ranges are [start, end], unlike message ones.
    let is_reserved = |number: i32| {
        reserved
            .iter()
            .any(|r| r.start() <= number && number <= r.end())
    };

    for value in old.values() {
        let (name, number) = (value.name(), value.number());
        let element = format!("{}.{name}", old.full_name());
        match (new_by_name.get(name), new_by_number.get(&number)) {
            (Some(&new_number), _) if new_number == number => {}
            (Some(&new_number), _) => out.push(
                element,
                ChangeKind::EnumValueNumberChanged,
                format!(
                    "enum value {name} changed number from {number} to {new_number}, so existing \
                     data decodes as a different value"
                ),
            ),
            (None, Some(new_name)) => out.push(
                element,
                ChangeKind::EnumValueRenamed,
                format!(
                    "enum value number {number} was {name} and is now {new_name}, so JSON \
                     payloads using {name} would be refused"
                ),
            ),
            (None, None) if is_reserved(number) => {}
            (None, None) => out.push(
                element,
                ChangeKind::EnumValueRemoved,
                format!(
                    "enum value {name} = {number} was removed without `reserved {number};`, so \
                     payloads carrying it are no longer understood"
                ),
            ),
        }
    }
}

/// The protovalidate option extensions a pool knows about.
struct RuleExtensions {
    /// `buf.validate.field` on `google.protobuf.FieldOptions` (number 1159).
    field: Option<ExtensionDescriptor>,
    /// `buf.validate.oneof` on `google.protobuf.OneofOptions` (number 1159).
    oneof: Option<ExtensionDescriptor>,
    /// `buf.validate.message` on `google.protobuf.MessageOptions` (number 1159).
    message: Option<ExtensionDescriptor>,
}

/// `buf.validate.Ignore.IGNORE_UNSPECIFIED`.
const IGNORE_UNSPECIFIED: i32 = 0;
/// `buf.validate.Ignore.IGNORE_ALWAYS`.
const IGNORE_ALWAYS: i32 = 3;

/// Rules that forbid the empty value, by rule message in `FieldRules`:
/// `(buf.validate.field).<rule>.<limit> >= 1` makes an always-validated field
/// mandatory.
const MINIMUM_RULES: &[(&str, &[&str])] = &[
    ("string", &["min_len", "len", "min_bytes", "len_bytes"]),
    ("bytes", &["min_len", "len"]),
    ("repeated", &["min_items"]),
    ("map", &["min_pairs"]),
];

impl RuleExtensions {
    fn of(pool: &DescriptorPool) -> Option<Self> {
        let rules = Self {
            field: pool.get_extension_by_name("buf.validate.field"),
            oneof: pool.get_extension_by_name("buf.validate.oneof"),
            message: pool.get_extension_by_name("buf.validate.message"),
        };
        (rules.field.is_some() || rules.oneof.is_some() || rules.message.is_some()).then_some(rules)
    }

    /// The `(buf.validate.message).oneof` groups of `message`, as sets of field
    /// names with their `required` flag.
    fn message_oneofs(&self, message: &MessageDescriptor) -> Vec<(BTreeSet<String>, bool)> {
        let Some(rules) = extension_message(&message.options(), self.message.as_ref()) else {
            return Vec::new();
        };
        let Some(groups) = rules.get_field_by_name("oneof") else {
            return Vec::new();
        };
        groups
            .as_list()
            .unwrap_or_default()
            .iter()
            .filter_map(|group| group.as_message())
            .map(|group| {
                let fields = group
                    .get_field_by_name("fields")
                    .and_then(|v| {
                        v.as_list().map(|names| {
                            names
                                .iter()
                                .filter_map(|n| n.as_str().map(str::to_owned))
                                .collect()
                        })
                    })
                    .unwrap_or_default();
                (fields, bool_field(group, "required"))
            })
            .collect()
    }

    /// Why `field` is mandatory under its `(buf.validate.field)` rules, if it
    /// is: the rule as written, e.g. `required = true`.
    ///
    /// `required` always binds (unless the field is `IGNORE_ALWAYS`). A minimum
    /// size binds an unset field only when protovalidate always evaluates it:
    /// the field has no presence (lists, maps, proto3 implicit scalars), its
    /// `ignore` is unspecified, and it is not in a message-level oneof group
    /// (which implies `IGNORE_IF_ZERO_VALUE`).
    fn mandatory_rule(&self, field: &FieldDescriptor, in_message_oneof: bool) -> Option<String> {
        let rules = extension_message(&field.options(), self.field.as_ref())?;
        let ignore = rules
            .get_field_by_name("ignore")
            .and_then(|v| v.as_enum_number())
            .unwrap_or(IGNORE_UNSPECIFIED);
        if ignore == IGNORE_ALWAYS {
            return None;
        }
        if bool_field(&rules, "required") {
            return Some("required = true".to_owned());
        }
        if field.supports_presence() || ignore != IGNORE_UNSPECIFIED || in_message_oneof {
            return None;
        }
        MINIMUM_RULES.iter().find_map(|(rule, limits)| {
            if !rules.has_field_by_name(rule) {
                return None;
            }
            let typed = rules.get_field_by_name(rule)?;
            let typed = typed.as_message()?;
            limits.iter().find_map(|limit| {
                let value = typed.get_field_by_name(limit)?.as_u64()?;
                (value >= 1).then(|| format!("{rule}.{limit} = {value}"))
            })
        })
    }

    fn oneof_required(&self, oneof: &OneofDescriptor) -> bool {
        extension_message(&oneof.options(), self.oneof.as_ref())
            .is_some_and(|rules| bool_field(&rules, "required"))
    }
}

/// The message value of `extension` in `options`, if the extension is known
/// and set.
fn extension_message(
    options: &DynamicMessage,
    extension: Option<&ExtensionDescriptor>,
) -> Option<DynamicMessage> {
    let extension = extension?;
    if !options.has_extension(extension) {
        return None;
    }
    options.get_extension(extension).as_message().cloned()
}

fn bool_field(message: &DynamicMessage, name: &str) -> bool {
    message
        .get_field_by_name(name)
        .and_then(|v| v.as_bool())
        .unwrap_or(false)
}

fn compare_required_rules(
    old: &MessageDescriptor,
    new: &MessageDescriptor,
    old_rules: Option<&RuleExtensions>,
    new_rules: &RuleExtensions,
    out: &mut Changes,
) {
    let old_groups = old_rules.map_or_else(Vec::new, |rules| rules.message_oneofs(old));
    let new_groups = new_rules.message_oneofs(new);
    let in_group = |groups: &[(BTreeSet<String>, bool)], name: &str| {
        groups.iter().any(|(fields, _)| fields.contains(name))
    };

    for new_field in new.fields() {
        let Some(rule) =
            new_rules.mandatory_rule(&new_field, in_group(&new_groups, new_field.name()))
        else {
            continue;
        };
        let element = format!("{}.{}", new.full_name(), new_field.name());
        let number = new_field.number();
        match old.get_field(number) {
            Some(old_field) => {
                let was_mandatory = old_rules.is_some_and(|rules| {
                    rules
                        .mandatory_rule(&old_field, in_group(&old_groups, old_field.name()))
                        .is_some()
                });
                if !was_mandatory {
                    out.push(
                        element,
                        ChangeKind::RequiredRuleAdded,
                        format!(
                            "field {} = {number} now has (buf.validate.field).{rule}, so messages \
                             that leave it unset, valid before, would be refused",
                            new_field.name()
                        ),
                    );
                }
            }
            None => out.push(
                element,
                ChangeKind::RequiredRuleAdded,
                format!(
                    "new field {} = {number} is required by (buf.validate.field).{rule}, so \
                     producers built on the old schema, which never set it, would be refused",
                    new_field.name()
                ),
            ),
        }
    }

    for new_oneof in new.oneofs().filter(|o| !o.is_synthetic()) {
        if !new_rules.oneof_required(&new_oneof) {
            continue;
        }
        let was_required = old_rules.is_some_and(|rules| {
            old.oneofs()
                .find(|o| o.name() == new_oneof.name())
                .is_some_and(|old_oneof| rules.oneof_required(&old_oneof))
        });
        if !was_required {
            out.push(
                format!("{}.{}", new.full_name(), new_oneof.name()),
                ChangeKind::RequiredRuleAdded,
                format!(
                    "oneof {} now has (buf.validate.oneof).required = true, so messages that set \
                     none of its fields, valid before, would be refused",
                    new_oneof.name()
                ),
            );
        }
    }

    // A required group is new unless an old required group is a subset of it:
    // then every old message already sets at least one of its fields.
    for (fields, required) in &new_groups {
        let covered = old_groups
            .iter()
            .any(|(old_fields, old_required)| *old_required && old_fields.is_subset(fields));
        if *required && !covered {
            let names = fields
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", ");
            out.push(
                new.full_name(),
                ChangeKind::RequiredRuleAdded,
                format!(
                    "message {} now requires one of [{names}] by (buf.validate.message).oneof, so \
                     messages that set none of them, valid before, would be refused",
                    new.name()
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use protox::file::{
        ChainFileResolver, File, FileResolver, GoogleFileResolver, IncludeFileResolver,
    };

    /// The crate's `proto/` directory, home of `buf/validate/validate.proto`.
    const PROTO_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
    const FILE: &str = "test/v1/test.proto";
    const PACKAGE: &str = "test.v1";

    /// Serves one in-memory `.proto` file; everything else comes from the
    /// crate's `proto/` directory or protox's well-known types.
    struct InMemory(String);

    impl FileResolver for InMemory {
        fn open_file(&self, name: &str) -> Result<File, protox::Error> {
            if name == FILE {
                File::from_source(name, &self.0)
            } else {
                Err(protox::Error::file_not_found(name))
            }
        }
    }

    /// Compiles `body` as the contents of a proto3 file in package `test.v1`
    /// that imports protovalidate.
    fn pool(body: &str) -> DescriptorPool {
        compile(&format!(
            "syntax = \"proto3\";\npackage {PACKAGE};\nimport \"buf/validate/validate.proto\";\n{body}"
        ))
    }

    /// Compiles `source` as the whole of the test file.
    fn compile(source: &str) -> DescriptorPool {
        let mut resolver = ChainFileResolver::new();
        resolver.add(InMemory(source.to_owned()));
        resolver.add(IncludeFileResolver::new(PROTO_DIR.into()));
        resolver.add(GoogleFileResolver::new());
        let mut compiler = protox::Compiler::with_file_resolver(resolver);
        compiler.open_file(FILE).expect("test schema compiles");
        compiler.descriptor_pool()
    }

    fn changes(old: &str, new: &str) -> Vec<BreakingChange> {
        breaking_changes(&pool(old), &pool(new), PACKAGE)
    }

    fn kinds(changes: &[BreakingChange]) -> Vec<(&str, ChangeKind)> {
        changes
            .iter()
            .map(|c| (c.element.as_str(), c.kind))
            .collect()
    }

    #[test]
    fn field_number_reused_with_another_type_is_breaking() {
        let found = changes(
            "message Referral { string child = 1; }",
            "message Child { string name = 1; }\nmessage Referral { Child child = 1; }",
        );
        assert_eq!(
            kinds(&found),
            [("test.v1.Referral.child", ChangeKind::FieldTypeChanged)]
        );
        assert!(
            found[0].detail.contains("from string to test.v1.Child"),
            "{}",
            found[0]
        );
    }

    #[test]
    fn field_number_reused_with_another_name_is_breaking() {
        let found = changes(
            "message Referral { string child = 1; }",
            "message Referral { string adult = 1; }",
        );
        assert_eq!(
            kinds(&found),
            [("test.v1.Referral.child", ChangeKind::FieldNumberReused)]
        );
        assert!(found[0].detail.contains("`adult`"), "{}", found[0]);
    }

    #[test]
    fn field_number_reused_with_another_name_and_type_reports_both() {
        let found = changes(
            "message Referral { string child = 1; }",
            "message Referral { int64 urgency = 1; }",
        );
        assert_eq!(
            kinds(&found),
            [
                ("test.v1.Referral.child", ChangeKind::FieldNumberReused),
                ("test.v1.Referral.child", ChangeKind::FieldTypeChanged),
            ]
        );
    }

    #[test]
    fn map_value_type_change_is_breaking() {
        let found = changes(
            "message Referral { map<string, string> labels = 1; }",
            "message Referral { map<string, int32> labels = 1; }",
        );
        assert_eq!(
            kinds(&found),
            [("test.v1.Referral.labels", ChangeKind::FieldTypeChanged)]
        );
        assert!(
            found[0].detail.contains("map<string, int32>"),
            "{}",
            found[0]
        );
    }

    #[test]
    fn field_removed_without_reserved_is_breaking() {
        let found = changes(
            "message Referral { string child = 1; string notes = 2; }",
            "message Referral { string child = 1; }",
        );
        assert_eq!(
            kinds(&found),
            [(
                "test.v1.Referral.notes",
                ChangeKind::FieldRemovedNotReserved
            )]
        );
    }

    #[test]
    fn field_removed_with_only_its_name_reserved_is_breaking() {
        let found = changes(
            "message Referral { string child = 1; string notes = 2; }",
            "message Referral { string child = 1; reserved \"notes\"; }",
        );
        assert_eq!(
            kinds(&found),
            [(
                "test.v1.Referral.notes",
                ChangeKind::FieldRemovedNotReserved
            )]
        );
    }

    #[test]
    fn field_removed_with_reserved_number_is_compatible() {
        let old =
            "message Referral { string child = 1; string notes = 2; string a = 5; string b = 7; }";
        assert_eq!(
            changes(
                old,
                "message Referral { string child = 1; reserved 2, 5 to 7; reserved \"notes\"; }"
            ),
            []
        );
        assert_eq!(
            changes(
                old,
                "message Referral { string child = 1; reserved 2 to max; }"
            ),
            []
        );
    }

    #[test]
    fn message_removed_is_breaking_including_nested_messages() {
        let found = changes(
            "message Referral { message Household { string name = 1; } Household household = 1; }\n\
             message Acknowledgement { string id = 1; }",
            "message Referral { reserved 1; }",
        );
        assert_eq!(
            kinds(&found),
            [
                ("test.v1.Acknowledgement", ChangeKind::MessageRemoved),
                ("test.v1.Referral.Household", ChangeKind::MessageRemoved),
            ]
        );
    }

    #[test]
    fn enum_removed_is_breaking() {
        let found = changes(
            "enum Urgency { URGENCY_UNSPECIFIED = 0; }",
            "message Referral {}",
        );
        assert_eq!(
            kinds(&found),
            [("test.v1.Urgency", ChangeKind::EnumRemoved)]
        );
    }

    #[test]
    fn enum_value_removed_is_breaking_unless_reserved() {
        let old = "enum Urgency { URGENCY_UNSPECIFIED = 0; URGENCY_HIGH = 1; URGENCY_LOW = 2; }";
        let found = changes(
            old,
            "enum Urgency { URGENCY_UNSPECIFIED = 0; URGENCY_HIGH = 1; }",
        );
        assert_eq!(
            kinds(&found),
            [("test.v1.Urgency.URGENCY_LOW", ChangeKind::EnumValueRemoved)]
        );
        assert_eq!(
            changes(
                old,
                "enum Urgency { URGENCY_UNSPECIFIED = 0; URGENCY_HIGH = 1; reserved 2; }"
            ),
            []
        );
    }

    #[test]
    fn enum_value_moved_or_renamed_is_breaking() {
        let found = changes(
            "enum Urgency { URGENCY_UNSPECIFIED = 0; URGENCY_HIGH = 1; URGENCY_LOW = 2; }",
            "enum Urgency { URGENCY_UNSPECIFIED = 0; URGENCY_IMMEDIATE = 1; URGENCY_LOW = 3; reserved 2; }",
        );
        assert_eq!(
            kinds(&found),
            [
                ("test.v1.Urgency.URGENCY_HIGH", ChangeKind::EnumValueRenamed),
                (
                    "test.v1.Urgency.URGENCY_LOW",
                    ChangeKind::EnumValueNumberChanged
                ),
            ]
        );
    }

    #[test]
    fn cardinality_and_presence_changes_are_breaking() {
        let found = changes(
            "message Referral { string child = 1; string notes = 2; int32 age = 3; map<string, string> tags = 4; }",
            "message Referral { repeated string child = 1; optional string notes = 2; int32 age = 3; repeated string tags = 4; }",
        );
        assert_eq!(
            kinds(&found),
            [
                (
                    "test.v1.Referral.child",
                    ChangeKind::FieldCardinalityChanged
                ),
                (
                    "test.v1.Referral.notes",
                    ChangeKind::FieldCardinalityChanged
                ),
                ("test.v1.Referral.tags", ChangeKind::FieldCardinalityChanged),
            ]
        );
    }

    #[test]
    fn moving_a_field_into_a_oneof_is_breaking() {
        let found = changes(
            "message Referral { string email = 1; string phone = 2; }",
            "message Referral { oneof contact { string email = 1; string phone = 2; } }",
        );
        assert_eq!(
            kinds(&found),
            [
                ("test.v1.Referral.email", ChangeKind::FieldOneofChanged),
                ("test.v1.Referral.phone", ChangeKind::FieldOneofChanged),
            ]
        );
    }

    #[test]
    fn required_rule_added_is_breaking() {
        let found = changes(
            "message Referral { string child = 1; string nhs_number = 2; optional string notes = 3; }",
            "message Referral {\n\
               string child = 1 [(buf.validate.field).required = true];\n\
               string nhs_number = 2 [(buf.validate.field).string.min_len = 10];\n\
               optional string notes = 3 [(buf.validate.field).string.min_len = 1];\n\
             }",
        );
        // `notes` tracks presence, so its min_len does not apply when it is unset.
        assert_eq!(
            kinds(&found),
            [
                ("test.v1.Referral.child", ChangeKind::RequiredRuleAdded),
                ("test.v1.Referral.nhs_number", ChangeKind::RequiredRuleAdded),
            ]
        );
        assert!(found[0].detail.contains("required = true"), "{}", found[0]);
        assert!(
            found[1].detail.contains("string.min_len = 10"),
            "{}",
            found[1]
        );
    }

    #[test]
    fn required_rule_kept_or_relaxed_is_compatible() {
        let old = "message Referral { string child = 1 [(buf.validate.field).required = true]; }";
        assert_eq!(changes(old, old), []);
        assert_eq!(changes(old, "message Referral { string child = 1; }"), []);
    }

    #[test]
    fn required_rule_added_against_a_schema_without_protovalidate_is_breaking() {
        let old = compile(
            "syntax = \"proto3\";\npackage test.v1;\nmessage Referral { string child = 1; }",
        );
        assert!(old.get_extension_by_name("buf.validate.field").is_none());
        let new =
            pool("message Referral { string child = 1 [(buf.validate.field).required = true]; }");
        assert_eq!(
            kinds(&breaking_changes(&old, &new, PACKAGE)),
            [("test.v1.Referral.child", ChangeKind::RequiredRuleAdded)]
        );
        // And without protovalidate in the new pool, the rule is not checked.
        assert_eq!(breaking_changes(&new, &old, PACKAGE), []);
    }

    #[test]
    fn new_required_field_is_breaking() {
        let found = changes(
            "message Referral { string child = 1; }",
            "message Referral { string child = 1; repeated string concerns = 2 [(buf.validate.field).repeated.min_items = 1]; }",
        );
        assert_eq!(
            kinds(&found),
            [("test.v1.Referral.concerns", ChangeKind::RequiredRuleAdded)]
        );
    }

    #[test]
    fn required_oneof_rules_added_are_breaking() {
        let found = changes(
            "message Referral { oneof subject { string child = 1; string adult = 2; } string email = 3; string phone = 4; }",
            "message Referral {\n\
               option (buf.validate.message).oneof = { fields: [\"email\", \"phone\"], required: true };\n\
               oneof subject { option (buf.validate.oneof).required = true; string child = 1; string adult = 2; }\n\
               string email = 3;\n\
               string phone = 4;\n\
             }",
        );
        assert_eq!(
            kinds(&found),
            [
                ("test.v1.Referral", ChangeKind::RequiredRuleAdded),
                ("test.v1.Referral.subject", ChangeKind::RequiredRuleAdded),
            ]
        );
    }

    #[test]
    fn new_optional_field_is_compatible() {
        let found = changes(
            "message Referral { string child = 1; }\nenum Urgency { URGENCY_UNSPECIFIED = 0; }",
            "message Referral { string child = 1; optional string notes = 2; string reason = 3; }\n\
             message Acknowledgement { string id = 1 [(buf.validate.field).required = true]; }\n\
             enum Urgency { URGENCY_UNSPECIFIED = 0; URGENCY_HIGH = 1; }",
        );
        assert_eq!(found, []);
    }

    #[test]
    fn other_packages_are_ignored() {
        let old = pool("message Referral { string child = 1; }");
        let new = pool("message Referral { int32 child = 1; }");
        assert_eq!(breaking_changes(&old, &new, "interop.referral.v1"), []);
        // buf.validate itself is in both pools but never compared.
        assert_eq!(breaking_changes(&old, &new, PACKAGE).len(), 1);
    }

    #[test]
    fn changes_are_sorted_by_element_then_kind() {
        let found = changes(
            "message Zeta { string a = 1; }\nmessage Alpha { string b = 1; string c = 2; }",
            "message Alpha { int32 renamed = 1; }",
        );
        let keys: Vec<_> = found.iter().map(|c| (c.element.clone(), c.kind)).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert_eq!(
            kinds(&found),
            [
                ("test.v1.Alpha.b", ChangeKind::FieldNumberReused),
                ("test.v1.Alpha.b", ChangeKind::FieldTypeChanged),
                ("test.v1.Alpha.c", ChangeKind::FieldRemovedNotReserved),
                ("test.v1.Zeta", ChangeKind::MessageRemoved),
            ]
        );
    }

    #[test]
    fn display_names_code_element_and_detail() {
        let found = changes(
            "message Referral { string child = 1; }",
            "message Referral { reserved 2; }",
        );
        assert_eq!(
            found[0].to_string(),
            "FIELD_REMOVED_NOT_RESERVED test.v1.Referral.child: field child = 1 was removed \
             without `reserved 1;`, so the number could later be reused and old data read with \
             a different meaning"
        );
    }
}
