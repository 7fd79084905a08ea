use super::*;
use proptest::prelude::*;

const STRICT: EmailPolicy = EmailPolicy {
    allow_utf8_local: false,
};
const UTF8: EmailPolicy = EmailPolicy {
    allow_utf8_local: true,
};

fn key(address: &str) -> String {
    let email = Email::parse(address, UTF8).expect("valid address");
    EmailKey::new(&email, EmailKeyPolicy::default())
        .as_str()
        .to_owned()
}

#[test]
fn accepts_plain_and_keeps_it_verbatim() {
    let email = Email::parse("Bob.Smith+news@Example.COM", STRICT).unwrap();
    assert_eq!(email.as_str(), "Bob.Smith+news@Example.COM");
    assert_eq!(email.local_part(), "Bob.Smith+news");
    assert_eq!(email.domain(), "Example.COM");
    assert_eq!(email.ascii_domain(), "example.com");
}

#[test]
fn errors_name_the_rule() {
    assert_eq!(Email::parse("a@b", STRICT), Err(EmailError::DomainLabels));
    assert_eq!(Email::parse(".a@b.io", STRICT), Err(EmailError::LocalDots));
    assert_eq!(
        Email::parse("a b@b.io", STRICT),
        Err(EmailError::ForbiddenCharacter)
    );
    assert_eq!(Email::parse("a@1.2", STRICT), Err(EmailError::NumericTld));
    assert_eq!(Email::parse("é@b.io", STRICT), Err(EmailError::Utf8Local));
    assert!(Email::parse("é@b.io", UTF8).is_ok());
}

#[test]
fn length_limits_are_octets() {
    let local64 = "a".repeat(64);
    assert!(Email::parse(&format!("{local64}@x.io"), STRICT).is_ok());
    assert_eq!(
        Email::parse(&format!("{local64}a@x.io"), STRICT),
        Err(EmailError::LocalLength)
    );
    // 64 octets made of 32 two-octet characters is fine, 33 of them is not.
    assert!(Email::parse(&format!("{}@x.io", "é".repeat(32)), UTF8).is_ok());
    assert!(Email::parse(&format!("{}@x.io", "é".repeat(33)), UTF8).is_err());
    let label = "d".repeat(63);
    let domain = format!("{label}.{label}.{label}.{}.io", "d".repeat(55));
    assert_eq!(domain.len(), 250);
    assert!(Email::parse(&format!("abc@{domain}"), STRICT).is_ok());
    assert_eq!(
        Email::parse(&format!("abcd@{domain}"), STRICT),
        Err(EmailError::TooLong)
    );
    assert_eq!(
        Email::parse(&format!("a@{}.io", "d".repeat(64)), STRICT),
        Err(EmailError::LabelLength)
    );
}

#[test]
fn idn_domains_use_their_ascii_form() {
    let email = Email::parse("anna@bücher.example", STRICT).unwrap();
    assert_eq!(email.ascii_domain(), "xn--bcher-kva.example");
    assert_eq!(email.domain(), "bücher.example");
    // Punycode that does not decode is refused.
    assert_eq!(
        Email::parse("a@xn--zz.example", STRICT),
        Err(EmailError::Idna)
    );
}

#[test]
fn key_folds_case_plus_tags_and_gmail_dots() {
    assert_eq!(key("Bob+x@Gmail.com"), "bob@gmail.com");
    assert_eq!(key("B.o.b+y@googlemail.COM"), "bob@gmail.com");
    assert_eq!(key("b.ob@example.com"), "b.ob@example.com");
    assert_eq!(
        key("anna@bücher.example"),
        key("Anna@xn--bcher-kva.example")
    );
    assert_eq!(key("+only@example.com"), "+only@example.com");
    assert_eq!(key("ÉLISE@example.com"), "elise@example.com");
}

#[test]
fn key_policy_can_keep_tags_and_dots() {
    let email = Email::parse("B.ob+x@gmail.com", STRICT).unwrap();
    let policy = EmailKeyPolicy {
        strip_plus_tag: false,
        fold_gmail_dots: false,
        fold_provider_aliases: false,
    };
    assert_eq!(EmailKey::new(&email, policy).as_str(), "b.ob+x@gmail.com");
    let keep = |address: &str| {
        let email = Email::parse(address, STRICT).unwrap();
        EmailKey::new(&email, policy).as_str().to_owned()
    };
    assert_eq!(keep("b.ob-x@me.com"), "b.ob-x@me.com");
    assert_eq!(keep("x@bob.fastmail.com"), "x@bob.fastmail.com");
}

/// The spellings one provider delivers to one mailbox share a key; a provider's other
/// names (Outlook's dots, Yahoo's country domains) stay apart.
#[test]
fn key_folds_provider_aliases() {
    assert_eq!(key("Bob@me.com"), "bob@icloud.com");
    assert_eq!(key("bob+x@mac.com"), "bob@icloud.com");
    assert_eq!(key("bob@iCloud.com"), "bob@icloud.com");
    for proton in [
        "Bob.Smith@protonmail.com",
        "bob_smith@pm.me",
        "bob-smith+x@proton.me",
        "b.o.b.smith@protonmail.ch",
    ] {
        assert_eq!(key(proton), "bobsmith@proton.me", "{proton}");
    }
    assert_eq!(key("base-keyword@yahoo.com"), "base@yahoo.com");
    assert_eq!(key("base-other@yahoo.co.uk"), "base@yahoo.co.uk");
    assert_eq!(key("base-x@ymail.com"), "base@ymail.com");
    assert_eq!(key("-base@yahoo.com"), "-base@yahoo.com");
    assert_eq!(key("anything@Bob.Fastmail.com"), "bob@fastmail.com");
    assert_eq!(key("bob+x@fastmail.fm"), "bob@fastmail.fm");
    assert_eq!(key("b.ob@outlook.com"), "b.ob@outlook.com");
    assert_eq!(key("bob-x@example.com"), "bob-x@example.com");
    assert_eq!(key("x@a.b.fastmail.com"), "x@a.b.fastmail.com");
    assert_eq!(key("base-x@yahoo.example.org"), "base-x@yahoo.example.org");
    assert_eq!(key("base-x@yahoo.abc.com"), "base-x@yahoo.abc.com");
    assert_eq!(key("base-x@yahoo.fr"), "base@yahoo.fr");
    assert_eq!(key("base-x@yahoo.com.au"), "base@yahoo.com.au");
}

/// A store that matches addresses without regard to accents (MySQL's default collations)
/// takes `gmáil.com` for gmail.com: such spellings share the key of the plain one, however
/// they are written (Unicode, punycode, composed or not, fullwidth).
#[test]
fn key_folds_accents_and_compatibility_forms() {
    let victim = key("victim@gmail.com");
    for spelling in [
        "victim@gmáil.com",
        "victim@xn--gmil-6na.com",
        "victim@gma\u{0301}il.com",
        "victim@ĝmail.com",
        "victim@gmail.cóm",
        "victim@gmaïl.com",
        "victim@ｇｍａｉｌ.com",
        "vïctim@gmail.com",
        "ｖｉｃｔｉｍ@gmail.com",
        "v\u{0131}ctim@gmail.com",
        "VİCTIM@gmail.com",
        "vic．tim@gmail.com",
        "victim＋x@gmail.com",
        "victim@gmaił.com",
        "victim@gmaıl.cøm",
    ] {
        assert_eq!(key(spelling), victim, "{spelling}");
    }
    assert_eq!(key("josé@example.com"), key("jose\u{0301}@example.com"));
    assert_eq!(key("josé@example.com"), "jose@example.com");
    assert_eq!(key("anna@straße.example"), "anna@strasse.example");
    assert_eq!(key("anna@bücher.example"), "anna@bucher.example");
    assert_eq!(key("michæl@hotmail.com"), key("michael@høtmail.com"));
    assert_eq!(key("Đorđe@example.com"), "dorde@example.com");
    // A local part of marks alone keeps its own key.
    assert_ne!(key("\u{0301}@example.com"), key("\u{0300}@example.com"));
    // Scripts without case or accents keep their letters, in IDNA ASCII form.
    assert_eq!(key("用户@例子.example"), "用户@xn--fsqu00a.example");
}

/// Characters that do not show, which IDNA would drop from a domain without a trace, are
/// refused rather than forwarded.
#[test]
fn invisible_characters_are_refused() {
    for address in [
        "a@gmail\u{1BCA0}.com",
        "a\u{1BCA0}b@example.com",
        "a@exam\u{00AD}ple.com",
        "a@example.com\u{E0001}",
        "a\u{FFF9}@example.com",
        "a@exa\u{0600}mple.com",
    ] {
        assert_eq!(
            Email::parse(address, UTF8),
            Err(EmailError::ForbiddenCharacter),
            "{}",
            address.escape_unicode()
        );
    }
}

#[test]
fn debug_never_shows_the_address() {
    let email = Email::parse("secret.person@example.com", STRICT).unwrap();
    let shown = format!(
        "{email:?} {:?}",
        EmailKey::new(&email, EmailKeyPolicy::default())
    );
    assert!(!shown.contains("secret"), "{shown}");
}

proptest! {
    #[test]
    fn parse_never_panics(input in any::<String>(), utf8 in any::<bool>()) {
        let _ = Email::parse(&input, EmailPolicy { allow_utf8_local: utf8 });
    }

    #[test]
    fn parse_never_panics_on_address_shapes(input in "[a-zA-Z0-9.+@\u{00e9}\u{200b}\\-\\[\\]\" ]{0,80}") {
        if let Ok(email) = Email::parse(&input, UTF8) {
            let _ = EmailKey::new(&email, EmailKeyPolicy::default());
        }
    }

    #[test]
    fn accepted_addresses_round_trip(
        local in "[a-zA-Z0-9!#$%&'*+/=?^_`{|}~-]{1,20}(\\.[a-zA-Z0-9_+-]{1,10}){0,2}",
        labels in proptest::collection::vec("[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", 1..4),
        tld in "[a-z]{2,6}",
    ) {
        // Hyphens third and fourth are reserved (RFC 5891 4.2.3.1): `xn--` starts a
        // punycode label, which these are not.
        prop_assume!(labels.iter().all(|label| label.get(2..4) != Some("--")));
        let address = format!("{local}@{}.{tld}", labels.join("."));
        let email = Email::parse(&address, STRICT).expect("generated address is valid");
        prop_assert_eq!(email.as_str(), address.as_str());
        let again = Email::parse(email.as_str(), STRICT).unwrap();
        prop_assert_eq!(again, email);
    }
}

#[test]
fn the_ascii_shortcut_refuses_exactly_the_forbidden_ascii_characters() {
    for b in 0u8..=0x7f {
        let c = char::from(b);
        let address = format!("a{c}b@example.com");
        let refused = matches!(
            Email::parse(&address, EmailPolicy::default()),
            Err(EmailError::ForbiddenCharacter)
        );
        assert_eq!(refused, is_forbidden_char(c), "{b:#04x}");
    }
}
