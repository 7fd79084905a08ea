//! Email addresses: [`Email::parse`] proves an address breaks none of the rules
//! [`EmailError`] names, and [`EmailKey`] is its canonical form for the per-email limit.

use std::fmt;

use icu_normalizer::DecomposingNormalizerBorrowed;
use icu_properties::props::{DefaultIgnorableCodePoint, GeneralCategory};
use icu_properties::{CodePointMapData, CodePointSetData};
use idna::AsciiDenyList;

/// Longest whole address, in octets (RFC 5321 path limit less the angle brackets).
const MAX_ADDRESS_OCTETS: usize = 254;
const MAX_LOCAL_OCTETS: usize = 64;
const MAX_LABEL_OCTETS: usize = 63;
const MAX_DOMAIN_OCTETS: usize = 253;

/// How strict [`Email::parse`] is about the local part.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EmailPolicy {
    /// Accept non-ASCII characters in the local part (RFC 6531 mailboxes).
    pub allow_utf8_local: bool,
}

/// Why an address was refused. Messages name the rule, never the address.
#[allow(missing_docs)] // each message documents its variant
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EmailError {
    #[error("address longer than {MAX_ADDRESS_OCTETS} octets")]
    TooLong,
    #[error("address must contain exactly one '@'")]
    AtSign,
    #[error("whitespace, control or invisible character")]
    ForbiddenCharacter,
    #[error("local part must be 1 to {MAX_LOCAL_OCTETS} octets")]
    LocalLength,
    #[error("local part has a leading, trailing or doubled dot")]
    LocalDots,
    #[error("local part has a character outside the dot-atom set")]
    LocalCharacter,
    #[error("non-ASCII local part is not allowed")]
    Utf8Local,
    #[error("domain is not a valid internationalised name")]
    Idna,
    #[error("domain must have at least two labels")]
    DomainLabels,
    #[error("domain label must be 1 to {MAX_LABEL_OCTETS} octets")]
    LabelLength,
    #[error("domain label has a character other than letters, digits and hyphens")]
    LabelCharacter,
    #[error("domain label starts or ends with a hyphen")]
    LabelHyphen,
    #[error("top-level domain is all digits")]
    NumericTld,
    #[error("domain longer than {MAX_DOMAIN_OCTETS} octets")]
    DomainLength,
}

/// An address that broke none of the rules [`EmailError`] names. Holding one proves it.
///
/// `as_str` is exactly the decoded input (no trimming, no case change), so what is
/// forwarded upstream is what the user typed; `ascii_domain` is the domain's IDNA
/// ASCII form, lower-cased.
#[derive(Clone, PartialEq, Eq)]
pub struct Email {
    address: Box<str>,
    at: usize,
    /// Only when it differs from the domain as given (upper case, Unicode).
    ascii_domain: Option<Box<str>>,
    /// Whether the ASCII domain has an internationalised (`xn--`) label: only then is it
    /// folded for the key.
    international: bool,
}

impl Email {
    /// Parses a percent-decoded address.
    pub fn parse(input: &str, policy: EmailPolicy) -> Result<Email, EmailError> {
        if input.len() > MAX_ADDRESS_OCTETS {
            return Err(EmailError::TooLong);
        }
        // ASCII whitespace and controls are the bytes up to the space, and DEL.
        let forbidden = if input.is_ascii() {
            input.bytes().any(|b| b <= b' ' || b == 0x7f)
        } else {
            input.chars().any(is_forbidden_char)
        };
        if forbidden {
            return Err(EmailError::ForbiddenCharacter);
        }
        let at = input.find('@').ok_or(EmailError::AtSign)?;
        let (local, domain) = (&input[..at], &input[at + 1..]);
        if domain.contains('@') {
            return Err(EmailError::AtSign);
        }
        check_local(local, policy)?;
        let (ascii_domain, international) = ascii_domain(domain)?;
        Ok(Email {
            address: input.into(),
            at,
            ascii_domain: ascii_domain.map(Into::into),
            international,
        })
    }

    /// The address as given.
    pub fn as_str(&self) -> &str {
        &self.address
    }

    /// The part before the `@`, as given.
    pub fn local_part(&self) -> &str {
        &self.address[..self.at]
    }

    /// The domain as given.
    pub fn domain(&self) -> &str {
        &self.address[self.at + 1..]
    }

    /// The domain in IDNA ASCII form, lower-cased.
    pub fn ascii_domain(&self) -> &str {
        self.ascii_domain
            .as_deref()
            .unwrap_or_else(|| self.domain())
    }
}

// Addresses are personal data: Debug shows the shape only, so a stray `{:?}` in a log
// line cannot leak one.
impl fmt::Debug for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Email(<{} octets>)", self.address.len())
    }
}

/// Characters refused anywhere in an address: whitespace, controls, and the invisible
/// ones (Unicode's default-ignorable code points and format characters) that make two
/// addresses look alike, or that IDNA would silently drop from a domain.
fn is_forbidden_char(c: char) -> bool {
    c.is_whitespace()
        || c.is_control()
        || CodePointSetData::new::<DefaultIgnorableCodePoint>().contains(c)
        || CodePointMapData::<GeneralCategory>::new().get(c) == GeneralCategory::Format
}

/// RFC 5322 `atext`.
fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+/=?^_`{|}~-".contains(&b)
}

fn check_local(local: &str, policy: EmailPolicy) -> Result<(), EmailError> {
    if local.is_empty() || local.len() > MAX_LOCAL_OCTETS {
        return Err(EmailError::LocalLength);
    }
    if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
        return Err(EmailError::LocalDots);
    }
    for c in local.chars() {
        if c.is_ascii() {
            if c != '.' && !is_atext(c as u8) {
                return Err(EmailError::LocalCharacter);
            }
        } else if !policy.allow_utf8_local {
            return Err(EmailError::Utf8Local);
        }
    }
    Ok(())
}

/// Converts the domain to its IDNA ASCII form and checks the hostname rules on that form;
/// `None` when that form is the domain as given. And whether that form has an `xn--` label.
fn ascii_domain(domain: &str) -> Result<(Option<String>, bool), EmailError> {
    // Plain lower-case ASCII needs no mapping unless it holds punycode, which IDNA must verify.
    let plain = domain
        .bytes()
        .all(|b| b.is_ascii() && !b.is_ascii_uppercase());
    if plain && !domain.contains("xn--") {
        check_hostname(domain)?;
        return Ok((None, false));
    }
    let ascii = if domain.is_ascii() && !domain.to_ascii_lowercase().contains("xn--") {
        domain.to_ascii_lowercase()
    } else {
        to_ascii(domain)?
    };
    check_hostname(&ascii)?;
    let international = ascii.contains("xn--");
    Ok(((ascii != domain).then_some(ascii), international))
}

fn to_ascii(domain: &str) -> Result<String, EmailError> {
    idna::domain_to_ascii_cow(domain.as_bytes(), AsciiDenyList::STD3)
        .map(|cow| cow.into_owned())
        .map_err(|_| EmailError::Idna)
}

fn check_hostname(ascii: &str) -> Result<(), EmailError> {
    if ascii.len() > MAX_DOMAIN_OCTETS {
        return Err(EmailError::DomainLength);
    }
    let mut labels = 0;
    let mut last = "";
    for label in ascii.split('.') {
        if label.is_empty() || label.len() > MAX_LABEL_OCTETS {
            return Err(EmailError::LabelLength);
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(EmailError::LabelCharacter);
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(EmailError::LabelHyphen);
        }
        labels += 1;
        last = label;
    }
    if labels < 2 {
        return Err(EmailError::DomainLabels);
    }
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return Err(EmailError::NumericTld);
    }
    Ok(())
}

/// How addresses are folded into one per-email limit key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmailKeyPolicy {
    /// `bob+news@x.io` counts as `bob@x.io` (and `bob-news@yahoo.com` as `bob@yahoo.com`
    /// when `fold_provider_aliases` is on).
    pub strip_plus_tag: bool,
    /// `b.o.b@gmail.com` counts as `bob@gmail.com`; googlemail.com counts as gmail.com.
    pub fold_gmail_dots: bool,
    /// Other big providers' spellings of one mailbox count as one: me.com and mac.com as
    /// icloud.com; Proton's domains as proton.me, its local parts without `.`, `-`, `_`;
    /// Yahoo's `-` tags; Fastmail's `anything@bob.fastmail.com` as `bob@fastmail.com`.
    pub fold_provider_aliases: bool,
}

impl Default for EmailKeyPolicy {
    fn default() -> Self {
        EmailKeyPolicy {
            strip_plus_tag: true,
            fold_gmail_dots: true,
            fold_provider_aliases: true,
        }
    }
}

/// The canonical form of an address: the spellings that reach one mailbox at the
/// providers [`EmailKeyPolicy`] names, or that a mail store matching addresses without
/// regard to case and accents would take for one, map to one key, so a caller cannot
/// dodge the per-email limit by rewriting an address. (A domain that delivers every
/// local part to one mailbox, a catch-all, is beyond any key: the per-IP, per-client and
/// global limits bound it.)
///
/// It still holds the address, so it is hashed before it is stored anywhere.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct EmailKey(Box<str>);

impl EmailKey {
    /// Canonicalises a parsed address.
    pub fn new(email: &Email, policy: EmailKeyPolicy) -> EmailKey {
        let mut key = String::with_capacity(email.as_str().len());
        canonical_chars(email, policy, |c| key.push(c));
        EmailKey(key.into())
    }

    /// The canonical address. Hash it before storing it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Feeds the canonical form of `email` to `sink`, one character at a time, so the limiter
/// can hash it without building it: the local part lower-cased, without its tag (unless it
/// starts with one) and without the characters its provider ignores, `@`, the lower-cased
/// IDNA ASCII domain (the provider's own for an alias). Non-ASCII text is first folded
/// (see [`fold`]). A plain ASCII address takes no allocation.
pub(crate) fn canonical_chars(email: &Email, policy: EmailKeyPolicy, mut sink: impl FnMut(char)) {
    let folded_domain;
    let mut domain = email.ascii_domain();
    if email.international {
        folded_domain = fold_domain(domain);
        domain = &folded_domain;
    }
    let folded_local;
    let mut local = email.local_part();
    if !local.is_ascii() {
        folded_local = fold(local);
        local = &folded_local;
    }
    if policy.fold_provider_aliases {
        if let Some((user, provider_domain)) = subdomain_address(domain) {
            (local, domain) = (user, provider_domain);
        }
    }
    let rules = provider(domain, policy);
    if let Some(own) = rules.domain {
        domain = own;
    }
    if policy.strip_plus_tag {
        let at = match rules.tag {
            None => local.find('+'),
            Some(tag) => local.find(['+', tag]),
        };
        if let Some(at) = at.filter(|&i| i > 0) {
            local = &local[..at];
        }
    }
    for c in local.chars() {
        let c = c.to_ascii_lowercase();
        if !rules.ignored.contains(&c) {
            sink(c);
        }
    }
    sink('@');
    domain.chars().for_each(sink);
}

/// What a mail provider takes for one mailbox, beyond case and `+` tags.
#[derive(Default)]
struct ProviderRules {
    /// The domain its aliases count as.
    domain: Option<&'static str>,
    /// Local-part characters it ignores.
    ignored: &'static [char],
    /// A second character that starts a tag.
    tag: Option<char>,
}

/// The rules of the provider serving `domain` (an IDNA ASCII, lower-case domain).
fn provider(domain: &str, policy: EmailKeyPolicy) -> ProviderRules {
    match domain {
        "gmail.com" | "googlemail.com" if policy.fold_gmail_dots => ProviderRules {
            domain: Some("gmail.com"),
            ignored: &['.'],
            tag: None,
        },
        _ if !policy.fold_provider_aliases => ProviderRules::default(),
        "icloud.com" | "me.com" | "mac.com" => ProviderRules {
            domain: Some("icloud.com"),
            ..ProviderRules::default()
        },
        "proton.me" | "protonmail.com" | "protonmail.ch" | "pm.me" => ProviderRules {
            domain: Some("proton.me"),
            ignored: &['.', '-', '_'],
            tag: None,
        },
        // Yahoo names have no `-`: one there starts a disposable address's keyword.
        "ymail.com" | "rocketmail.com" => ProviderRules {
            tag: Some('-'),
            ..ProviderRules::default()
        },
        _ if is_yahoo(domain) => ProviderRules {
            tag: Some('-'),
            ..ProviderRules::default()
        },
        _ => ProviderRules::default(),
    }
}

/// Yahoo's own domains: `yahoo.com` and a country's (`yahoo.fr`, `yahoo.co.uk`,
/// `yahoo.com.au`), not another domain whose name starts with the word
/// (`yahoo.abc.com`, `yahoo.example.org`).
fn is_yahoo(domain: &str) -> bool {
    let country = |code: &str| code.len() == 2 && code.bytes().all(|b| b.is_ascii_lowercase());
    match domain.strip_prefix("yahoo.") {
        Some("com") => true,
        Some(suffix) => match suffix.split_once('.') {
            None => country(suffix),
            Some((second, code)) => matches!(second, "co" | "com") && country(code),
        },
        None => false,
    }
}

/// `anything@bob.fastmail.com` reaches `bob@fastmail.com`: the user and the provider's
/// domain of an address whose domain names the user.
fn subdomain_address(domain: &str) -> Option<(&str, &str)> {
    if !(domain.ends_with(".fastmail.com") || domain.ends_with(".fastmail.fm")) {
        return None;
    }
    let (user, rest) = domain.split_once('.')?;
    matches!(rest, "fastmail.com" | "fastmail.fm").then_some((user, rest))
}

/// `text` lower-cased with its compatibility forms decomposed and combining marks dropped
/// (fullwidth `Ｂｏｂ` as `bob`, `josé` composed or not as `jose`), and [`base_letters`]
/// as theirs (`ß` as `ss`, `ł` as `l`): a mail
/// store comparing addresses without regard to accents (MySQL's default collations do)
/// takes such spellings for one.
fn fold(text: &str) -> String {
    let marks = CodePointMapData::<GeneralCategory>::new();
    let is_mark = |c: char| {
        matches!(
            marks.get(c),
            GeneralCategory::NonspacingMark | GeneralCategory::EnclosingMark
        )
    };
    let mut folded = String::with_capacity(text.len());
    for c in DecomposingNormalizerBorrowed::new_nfkd().normalize_iter(text.chars()) {
        // Lower-casing can add a mark of its own (`İ` is `i` and a dot above).
        for c in c.to_lowercase().filter(|&c| !is_mark(c)) {
            match base_letters(c) {
                Some(letters) => folded.push_str(letters),
                None => folded.push(c),
            }
        }
    }
    // Nothing left (a local part of marks alone): the text itself, lower-cased, rather
    // than one key shared by every such address.
    if folded.is_empty() {
        return text.to_lowercase();
    }
    folded
}

/// Letters that do not decompose but that Unicode's collation (MySQL's utf8mb4_0900_ai_ci)
/// ranks as their base letters, or that upper-case to one (`ı` to `I`).
fn base_letters(c: char) -> Option<&'static str> {
    Some(match c {
        'ß' => "ss",
        'æ' => "ae",
        'œ' => "oe",
        'ł' => "l",
        'ø' => "o",
        'đ' | 'ð' => "d",
        'ħ' => "h",
        'ı' => "i",
        'ς' => "σ",
        _ => return None,
    })
}

/// An internationalised domain (IDNA ASCII form) folded as [`fold`] does, in IDNA ASCII
/// form again: `gmáil.com` counts as gmail.com. The domain as it is when the folded name
/// is not a valid one.
fn fold_domain(ascii: &str) -> String {
    let (unicode, _) = idna::domain_to_unicode(ascii);
    match to_ascii(&fold(&unicode)) {
        Ok(folded) if check_hostname(&folded).is_ok() => folded,
        _ => ascii.to_owned(),
    }
}

impl fmt::Debug for EmailKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EmailKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests;
