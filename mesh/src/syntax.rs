//! The text forms users type (Docker's flag syntax), parsed into the
//! domain's types: where the CLI turns its flags into what the daemon is
//! sent, so the daemon never parses a string a second time. Each error says
//! what was wrong and what to write instead.

use std::str::FromStr;

use crate::service::{
    AttachmentRef, EndpointMode, PortSpec, Protocol, PublishMode, RestartCondition,
};

/// `KEY=VALUE`: the key must not be empty, the value may be.
pub fn key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("`{text}` is not KEY=VALUE")),
    }
}

fn port_number(text: &str, what: &str) -> Result<u16, String> {
    text.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("invalid {what} port `{text}`: use 1 to 65535"))
}

impl FromStr for PortSpec {
    type Err = String;

    /// `8080:80`, `80`, `53:53/udp`, or
    /// `mode=ingress|host,published=P,target=T,protocol=tcp|udp`.
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid --publish `{text}`: use PUBLISHED:TARGET[/udp] or mode=ingress|host,published=P,target=T[,protocol=tcp|udp]"
            )
        };
        if !text.contains('=') {
            return short_port(text).map_err(|e| e.unwrap_or_else(bad));
        }
        let mut spec = PortSpec {
            mode: PublishMode::Ingress,
            published: None,
            target: 0,
            protocol: Protocol::Tcp,
        };
        for kv in text.split(',') {
            let (k, v) = kv.split_once('=').ok_or_else(bad)?;
            match (k, v) {
                ("mode", "ingress") => spec.mode = PublishMode::Ingress,
                ("mode", "host") => spec.mode = PublishMode::Host,
                ("published", v) => spec.published = Some(port_number(v, "published")?),
                ("target", v) => spec.target = port_number(v, "target")?,
                ("protocol", "tcp") => spec.protocol = Protocol::Tcp,
                ("protocol", "udp") => spec.protocol = Protocol::Udp,
                _ => return Err(bad()),
            }
        }
        if spec.target == 0 {
            return Err(format!("invalid --publish `{text}`: target= is required"));
        }
        Ok(spec)
    }
}

/// `PUBLISHED:TARGET[/udp]` or `TARGET[/udp]`; `Err(None)` for a shape
/// that is none of these.
fn short_port(text: &str) -> Result<PortSpec, Option<String>> {
    let (ports, protocol) = match text.split_once('/') {
        Some((p, "udp")) => (p, Protocol::Udp),
        Some((p, "tcp")) => (p, Protocol::Tcp),
        Some(_) => return Err(None),
        None => (text, Protocol::Tcp),
    };
    let (published, target) = match ports.split_once(':') {
        Some((p, t)) => (
            Some(port_number(p, "published")?),
            port_number(t, "target")?,
        ),
        None => (None, port_number(ports, "target")?),
    };
    Ok(PortSpec {
        mode: PublishMode::Ingress,
        published,
        target,
        protocol,
    })
}

impl PortSpec {
    /// Whether this port is the one `asked` names for removal
    /// (`--publish-rm`): the same target and protocol, and the same
    /// published port when `asked` gives one.
    pub fn is_named_by(&self, asked: &PortSpec) -> bool {
        self.target == asked.target
            && self.protocol == asked.protocol
            && asked.published.is_none_or(|a| self.published == Some(a))
    }
}

impl FromStr for EndpointMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "vip" => Ok(EndpointMode::Vip),
            "dnsrr" => Ok(EndpointMode::Dnsrr),
            other => Err(format!(
                "invalid --endpoint-mode `{other}`: use vip or dnsrr"
            )),
        }
    }
}

impl FromStr for RestartCondition {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "none" => Ok(RestartCondition::None),
            "on-failure" => Ok(RestartCondition::OnFailure),
            "any" => Ok(RestartCondition::Any),
            other => Err(format!(
                "invalid --restart-condition `{other}`: use none, on-failure or any"
            )),
        }
    }
}

impl FromStr for AttachmentRef {
    type Err = String;

    /// `NET` or `name=NET,alias=A`: `network` is then the name (or ID) as
    /// typed, which the daemon resolves against the store.
    fn from_str(text: &str) -> Result<Self, String> {
        if !text.contains('=') {
            return Ok(AttachmentRef {
                network: text.to_owned(),
                aliases: Vec::new(),
            });
        }
        let mut network = None;
        let mut aliases = Vec::new();
        for kv in text.split(',') {
            let pair = key_value(kv).map_err(|e| format!("invalid --network `{text}`: {e}"))?;
            match pair {
                (k, v) if k == "name" => network = Some(v),
                (k, v) if k == "alias" => aliases.push(v),
                (k, _) => {
                    return Err(format!(
                        "invalid --network `{text}`: unknown key `{k}` (use name=NET,alias=A)"
                    ));
                }
            }
        }
        let network =
            network.ok_or_else(|| format!("invalid --network `{text}`: name= is required"))?;
        Ok(AttachmentRef { network, aliases })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(text: &str) -> Result<PortSpec, String> {
        text.parse()
    }

    #[test]
    fn published_ports_parse_in_both_forms() {
        let p = port("8080:80").unwrap();
        assert_eq!(
            (p.published, p.target, p.protocol),
            (Some(8080), 80, Protocol::Tcp)
        );
        let p = port("53/udp").unwrap();
        assert_eq!(
            (p.published, p.target, p.protocol),
            (None, 53, Protocol::Udp)
        );
        let p = port("mode=host,published=8080,target=80,protocol=udp").unwrap();
        assert_eq!(p.mode, PublishMode::Host);
        assert_eq!(
            (p.published, p.target, p.protocol),
            (Some(8080), 80, Protocol::Udp)
        );
        for (bad, says) in [
            ("0:80", "invalid published port `0`"),
            ("80:x", "invalid target port `x`"),
            ("80/sctp", "use PUBLISHED:TARGET"),
            ("mode=ingress,published=80", "target= is required"),
            ("mode=bridge,target=80", "use PUBLISHED:TARGET"),
            ("target=70000", "invalid target port `70000`"),
            ("70000:80", "invalid published port `70000`"),
            ("8080:", "invalid target port ``"),
            ("published=1", "target= is required"),
        ] {
            let e = port(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn a_removal_names_ports_by_target_and_maybe_published() {
        let p = port("8080:80").unwrap();
        assert!(p.is_named_by(&port("80").unwrap()));
        assert!(p.is_named_by(&port("8080:80").unwrap()));
        assert!(!p.is_named_by(&port("9090:80").unwrap()));
        assert!(!p.is_named_by(&port("80/udp").unwrap()));
    }

    #[test]
    fn attachments_modes_and_key_values_parse_or_say_why() {
        let a: AttachmentRef = "name=web,alias=front,alias=api".parse().unwrap();
        assert_eq!(a.network, "web");
        assert_eq!(a.aliases, vec!["front", "api"]);
        let a: AttachmentRef = "web".parse().unwrap();
        assert!(a.aliases.is_empty());
        assert!(
            "alias=x"
                .parse::<AttachmentRef>()
                .unwrap_err()
                .contains("name= is required")
        );
        assert!(
            "name=a,colour=b"
                .parse::<AttachmentRef>()
                .unwrap_err()
                .contains("unknown key")
        );
        assert_eq!("dnsrr".parse(), Ok(EndpointMode::Dnsrr));
        assert!(
            "rr".parse::<EndpointMode>()
                .unwrap_err()
                .contains("use vip or dnsrr")
        );
        assert_eq!("on-failure".parse(), Ok(RestartCondition::OnFailure));
        assert!(
            "sometimes"
                .parse::<RestartCondition>()
                .unwrap_err()
                .contains("invalid --restart-condition")
        );
        assert_eq!(key_value("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert_eq!(key_value("A="), Ok(("A".into(), String::new())));
        assert!(key_value("=x").unwrap_err().contains("is not KEY=VALUE"));
    }
}
