//! joinery's own field rules (`(joinery.rules.v1.field)`), evaluated after
//! buf.validate's. Today: `nhs_number`, the NHS number's modulus-11 check.

use std::collections::HashMap;

use prost_reflect::{
    DescriptorPool, DynamicMessage, ExtensionDescriptor, FieldDescriptor, Kind, ReflectMessage,
    Value,
};

use super::FieldViolation;
use crate::NameMap;

/// Which fields of which message types carry joinery rules.
pub(super) struct JoineryRules {
    /// message full name → its fields with `nhs_number = true`.
    nhs_fields: NameMap<Vec<FieldDescriptor>>,
    /// message full names that contain rules somewhere below them.
    relevant: NameMap<bool>,
}

impl JoineryRules {
    pub(super) fn new(pool: &DescriptorPool) -> Self {
        let mut nhs_fields: NameMap<Vec<FieldDescriptor>> = NameMap::default();
        if let Some(extension) = pool.get_extension_by_name("joinery.rules.v1.field") {
            for message in pool.all_messages() {
                let fields: Vec<FieldDescriptor> = message
                    .fields()
                    .filter(|f| nhs_rule(f, &extension))
                    .collect();
                if !fields.is_empty() {
                    nhs_fields.insert(message.full_name().to_string(), fields);
                }
            }
        }
        // A message is relevant if it has rule fields or contains a relevant
        // message, however deep and through cycles: iterate to a fixpoint.
        let mut relevant: NameMap<bool> = pool
            .all_messages()
            .map(|m| {
                let name = m.full_name().to_string();
                let has = nhs_fields.contains_key(&name);
                (name, has)
            })
            .collect();
        loop {
            let mut changed = false;
            for message in pool.all_messages() {
                if relevant.get(message.full_name()).copied().unwrap_or(false) {
                    continue;
                }
                let contains = message.fields().any(|f| match f.kind() {
                    Kind::Message(inner) => {
                        relevant.get(inner.full_name()).copied().unwrap_or(false)
                    }
                    _ => false,
                });
                if contains {
                    relevant.insert(message.full_name().to_string(), true);
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        JoineryRules {
            nhs_fields,
            relevant,
        }
    }

    /// Appends a violation for every broken rule in `message` (at `path`).
    pub(super) fn check(
        &self,
        message: &DynamicMessage,
        path: &str,
        out: &mut Vec<FieldViolation>,
    ) {
        let descriptor = message.descriptor();
        let name = descriptor.full_name();
        if !self.relevant.get(name).copied().unwrap_or(false) {
            return;
        }
        if let Some(fields) = self.nhs_fields.get(name) {
            for field in fields {
                let at = join(path, field.name());
                match message.get_field(field).as_ref() {
                    Value::String(s) => check_nhs(s, &at, out),
                    Value::List(items) => {
                        for (i, item) in items.iter().enumerate() {
                            if let Value::String(s) = item {
                                check_nhs(s, &format!("{at}[{i}]"), out);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        for field in descriptor.fields() {
            let Kind::Message(inner) = field.kind() else {
                continue;
            };
            if !self
                .relevant
                .get(inner.full_name())
                .copied()
                .unwrap_or(false)
                || !message.has_field(&field)
            {
                continue;
            }
            let at = join(path, field.name());
            match message.get_field(&field).as_ref() {
                Value::Message(m) => self.check(m, &at, out),
                Value::List(items) => {
                    for (i, item) in items.iter().enumerate() {
                        if let Value::Message(m) = item {
                            self.check(m, &format!("{at}[{i}]"), out);
                        }
                    }
                }
                Value::Map(map) => {
                    for (key, value) in map {
                        if let Value::Message(m) = value {
                            self.check(m, &format!("{at}[{key:?}]"), out);
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

/// Whether the field is annotated `(joinery.rules.v1.field).nhs_number = true`.
fn nhs_rule(field: &FieldDescriptor, extension: &ExtensionDescriptor) -> bool {
    let options = field.options();
    if !options.has_extension(extension) {
        return false;
    }
    match options.get_extension(extension).as_ref() {
        Value::Message(rules) => rules
            .get_field_by_name("nhs_number")
            .is_some_and(|v| v.as_bool() == Some(true)),
        _ => false,
    }
}

fn check_nhs(value: &str, path: &str, out: &mut Vec<FieldViolation>) {
    if value.is_empty() {
        return; // presence is buf.validate's `required`
    }
    if !is_valid_nhs_number(value) {
        out.push(FieldViolation {
            field: path.to_string(),
            rule: "joinery.nhs_number".into(),
            message: "not a valid NHS number: 10 digits whose last is the modulus-11 check digit of the first nine".into(),
        });
    }
}

/// The NHS Data Dictionary's check: weights 10..=2 over the first nine
/// digits; check digit = 11 - (sum mod 11), where 11 means 0 and 10 means
/// the number is invalid.
pub fn is_valid_nhs_number(value: &str) -> bool {
    let digits: Vec<u32> = value.chars().filter_map(|c| c.to_digit(10)).collect();
    if digits.len() != 10 || value.len() != 10 {
        return false;
    }
    let sum: u32 = digits[..9]
        .iter()
        .zip((2..=10).rev())
        .map(|(d, w)| d * w)
        .sum();
    let check = match 11 - (sum % 11) {
        11 => 0,
        10 => return false,
        c => c,
    };
    check == digits[9]
}

/// CEL rule id → message, from every `(buf.validate.message).cel` and
/// `(buf.validate.field).cel` rule in the pool.
pub(super) fn cel_messages(pool: &DescriptorPool) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut collect = |rules: &Value| {
        let Value::Message(rules) = rules else { return };
        let Some(cel) = rules.get_field_by_name("cel") else {
            return;
        };
        let Value::List(items) = cel.as_ref() else {
            return;
        };
        for item in items {
            let Value::Message(rule) = item else { continue };
            let text = |name: &str| {
                rule.get_field_by_name(name)
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            };
            let (id, message) = (text("id"), text("message"));
            if !id.is_empty() && !message.is_empty() {
                out.insert(id, message);
            }
        }
    };
    if let Some(ext) = pool.get_extension_by_name("buf.validate.message") {
        for message in pool.all_messages() {
            let options = message.options();
            if options.has_extension(&ext) {
                collect(options.get_extension(&ext).as_ref());
            }
        }
    }
    if let Some(ext) = pool.get_extension_by_name("buf.validate.field") {
        for message in pool.all_messages() {
            for field in message.fields() {
                let options = field.options();
                if options.has_extension(&ext) {
                    collect(options.get_extension(&ext).as_ref());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::is_valid_nhs_number;

    #[test]
    fn nhs_numbers_are_checked_with_modulus_11() {
        assert!(is_valid_nhs_number("9434765919"));
        assert!(is_valid_nhs_number("9434765870"));
        assert!(!is_valid_nhs_number("9434765918"), "wrong check digit");
        assert!(!is_valid_nhs_number("943476591"), "nine digits");
        assert!(!is_valid_nhs_number("94347659190"), "eleven digits");
        assert!(!is_valid_nhs_number("943476591a"));
        assert!(
            !is_valid_nhs_number("943 476 5919"),
            "spaces are not stripped"
        );
    }
}
