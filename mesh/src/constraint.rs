//! Placement constraints (`--constraint node.labels.zone==east`) and the
//! pure choice of a node for a new task: spread over the eligible nodes.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ids::NodeId;
use crate::state::{Availability, Node, Role};

/// What a constraint looks at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Attribute {
    /// `node.hostname`.
    Hostname,
    /// `node.id`.
    Id,
    /// `node.role`.
    Role,
    /// `node.labels.KEY`.
    Label(String),
}

/// `ATTRIBUTE==VALUE` or `ATTRIBUTE!=VALUE`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Constraint {
    /// The attribute.
    pub attribute: Attribute,
    /// `==` (true) or `!=` (false).
    pub equal: bool,
    /// The value compared with.
    pub value: String,
}

/// Why a constraint did not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid constraint `{0}`: use node.hostname, node.id, node.role or node.labels.KEY with == or !=, e.g. node.labels.zone==east"
)]
pub struct ConstraintError(pub String);

impl FromStr for Constraint {
    type Err = ConstraintError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConstraintError(s.to_owned());
        let (lhs, equal, value) = if let Some((l, r)) = s.split_once("==") {
            (l, true, r)
        } else if let Some((l, r)) = s.split_once("!=") {
            (l, false, r)
        } else {
            return Err(bad());
        };
        let (lhs, value) = (lhs.trim(), value.trim());
        if value.is_empty() || value.contains("==") || value.contains("!=") {
            return Err(bad());
        }
        let attribute = match lhs {
            "node.hostname" => Attribute::Hostname,
            "node.id" => Attribute::Id,
            "node.role" if value == "manager" || value == "worker" => Attribute::Role,
            other => match other.strip_prefix("node.labels.") {
                Some(k) if !k.is_empty() => Attribute::Label(k.to_owned()),
                _ => return Err(bad()),
            },
        };
        Ok(Constraint {
            attribute,
            equal,
            value: value.to_owned(),
        })
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lhs = match &self.attribute {
            Attribute::Hostname => "node.hostname".to_owned(),
            Attribute::Id => "node.id".to_owned(),
            Attribute::Role => "node.role".to_owned(),
            Attribute::Label(k) => format!("node.labels.{k}"),
        };
        write!(
            f,
            "{lhs}{}{}",
            if self.equal { "==" } else { "!=" },
            self.value
        )
    }
}

impl Constraint {
    /// Whether `node` satisfies it. A missing label never equals anything.
    pub fn matches(&self, node: &Node) -> bool {
        let actual = match &self.attribute {
            Attribute::Hostname => Some(node.hostname.clone()),
            Attribute::Id => Some(node.id.to_string()),
            Attribute::Role => Some(
                match node.role {
                    Role::Manager => "manager",
                    Role::Worker => "worker",
                }
                .to_owned(),
            ),
            Attribute::Label(k) => node.labels.get(k).cloned(),
        };
        let is_equal = match (&self.attribute, actual) {
            // An ID constraint accepts a unique prefix, as the CLI does.
            (Attribute::Id, Some(a)) => a.starts_with(&self.value),
            (_, Some(a)) => a == self.value,
            (_, None) => false,
        };
        is_equal == self.equal
    }
}

/// Why no node fits, for `service ps`.
pub fn unplaceable_reason(nodes: &[&Node], constraints: &[Constraint]) -> String {
    if nodes.is_empty() {
        return "no nodes in the swarm".into();
    }
    let active: Vec<&&Node> = nodes
        .iter()
        .filter(|n| n.availability == Availability::Active)
        .collect();
    if active.is_empty() {
        return "no suitable node (all nodes are paused or drained)".into();
    }
    match constraints
        .iter()
        .find(|c| !active.iter().any(|n| c.matches(n)))
    {
        Some(c) => format!("no suitable node (scheduling constraint `{c}` matches no active node)"),
        None => "no suitable node (no active node satisfies all constraints)".into(),
    }
}

/// The node for a new task: among live, active nodes that satisfy every
/// constraint, the one with the fewest tasks of this service, then the
/// fewest tasks overall, then the lowest ID. `None` if none is eligible.
pub fn place(
    nodes: &[&Node],
    live: &dyn Fn(NodeId) -> bool,
    constraints: &[Constraint],
    service_tasks: &BTreeMap<NodeId, usize>,
    all_tasks: &BTreeMap<NodeId, usize>,
) -> Option<NodeId> {
    nodes
        .iter()
        .filter(|n| n.availability == Availability::Active && live(n.id))
        .filter(|n| constraints.iter().all(|c| c.matches(n)))
        .min_by_key(|n| {
            (
                service_tasks.get(&n.id).copied().unwrap_or(0),
                all_tasks.get(&n.id).copied().unwrap_or(0),
                n.id,
            )
        })
        .map(|n| n.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, role: Role, labels: &[(&str, &str)]) -> Node {
        Node {
            id: NodeId(id),
            hostname: format!("h{id}"),
            role,
            availability: Availability::Active,
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            addr: String::new(),
            joined_at_ms: 0,
        }
    }

    #[test]
    fn constraints_parse_match_and_explain_themselves() {
        let n = node(1, Role::Worker, &[("zone", "east")]);
        let c: Constraint = "node.labels.zone==east".parse().unwrap();
        assert!(c.matches(&n));
        assert!(
            !"node.labels.zone!=east"
                .parse::<Constraint>()
                .unwrap()
                .matches(&n)
        );
        assert!(
            !"node.labels.rack==1"
                .parse::<Constraint>()
                .unwrap()
                .matches(&n)
        );
        assert!(
            "node.labels.rack!=1"
                .parse::<Constraint>()
                .unwrap()
                .matches(&n)
        );
        assert!(
            "node.role==worker"
                .parse::<Constraint>()
                .unwrap()
                .matches(&n)
        );
        assert!(
            "node.hostname==h1"
                .parse::<Constraint>()
                .unwrap()
                .matches(&n)
        );
        assert!(
            "node.id==00000000"
                .parse::<Constraint>()
                .unwrap()
                .matches(&n)
        );
        assert_eq!(c.to_string(), "node.labels.zone==east");
        for bad in [
            "node.zone==a",
            "node.role==boss",
            "node.labels.==x",
            "node.hostname=h1",
            "node.id==",
        ] {
            assert!(bad.parse::<Constraint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn placement_spreads_and_honours_availability_liveness_and_constraints() {
        let mut a = node(1, Role::Manager, &[]);
        let b = node(2, Role::Worker, &[("zone", "east")]);
        let c = node(3, Role::Worker, &[("zone", "east")]);
        let all_live = |_: NodeId| true;
        let mut per_service = BTreeMap::new();
        let none = BTreeMap::new();
        let nodes = [&a, &b, &c];
        assert_eq!(
            place(&nodes, &all_live, &[], &per_service, &none),
            Some(NodeId(1))
        );
        per_service.insert(NodeId(1), 1);
        assert_eq!(
            place(&nodes, &all_live, &[], &per_service, &none),
            Some(NodeId(2))
        );
        let east: Vec<Constraint> = vec!["node.labels.zone==east".parse().unwrap()];
        per_service.insert(NodeId(2), 1);
        assert_eq!(
            place(&nodes, &all_live, &east, &per_service, &none),
            Some(NodeId(3))
        );
        let not_three = |id: NodeId| id != NodeId(3);
        assert_eq!(
            place(&nodes, &not_three, &east, &per_service, &none),
            Some(NodeId(2))
        );
        a.availability = Availability::Drain;
        let nodes = [&a, &b, &c];
        let west: Vec<Constraint> = vec!["node.labels.zone==west".parse().unwrap()];
        assert_eq!(place(&nodes, &all_live, &west, &per_service, &none), None);
        assert_eq!(
            unplaceable_reason(&nodes, &west),
            "no suitable node (scheduling constraint `node.labels.zone==west` matches no active node)"
        );
    }
}
