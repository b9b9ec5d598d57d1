#[test]
fn common() {
    let reg = joinery::schema::Registry::load(&[], vec![]).unwrap();
    let src = std::fs::read_to_string("proto/interop/common/v1/common.proto").unwrap();
    let src = src.replace("  string support_needs = 14 [(buf.validate.field).string.max_len = 2000];", "  string support_needs = 14 [(buf.validate.field).string.max_len = 2000];\n  string pronouns = 15;");
    match reg.prepare(&[("interop/common/v1/common.proto".to_string(), src)]) {
        Ok((r, _)) => println!("ok {:?}", r.packages),
        Err(e) => println!("ERR {e}"),
    }
    let src = std::fs::read_to_string("proto/interop/referral/v1/marac_referral.proto").unwrap();
    let src = src.replace("  bool idva_referral_made = 12;", "  bool idva_referral_made = 12;\n  string extra = 16;");
    let s2 = std::fs::read_to_string("proto/interop/referral/v1/safeguarding_referral.proto").unwrap();
    match reg.prepare(&[("interop/referral/v1/marac_referral.proto".to_string(), src), ("interop/referral/v1/safeguarding_referral.proto".to_string(), s2)]) {
        Ok((r, _)) => println!("ok {:?}", r.packages),
        Err(e) => println!("ERR {e}"),
    }
}
