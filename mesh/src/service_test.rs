use std::collections::BTreeSet;

use super::*;
use crate::apply::{ApplyError, Command, apply};
use crate::test_support::{service, swarm};

fn port(published: Option<u16>, target: u16) -> PortSpec {
    PortSpec {
        mode: PublishMode::Ingress,
        published,
        target,
        protocol: Protocol::Tcp,
    }
}

fn create(s: &mut ClusterState, id: &str, spec: ServiceSpec) -> Result<(), ApplyError> {
    apply(
        s,
        &Command::CreateService {
            id: id.into(),
            spec,
            created_at_ms: 0,
        },
    )
    .map(drop)
}

#[test]
fn vips_and_ports_are_allocated_and_freed_with_the_service() {
    let mut s = swarm(1);
    create(&mut s, "a", service("a", vec![port(Some(8080), 80)])).unwrap();
    create(&mut s, "b", service("b", vec![port(None, 80)])).unwrap();
    let a = &s.services["a"];
    assert_eq!(a.vips["web"].to_string(), "10.0.0.2");
    // 10.255.0.2 is node 1's own endpoint on the routing mesh.
    assert_eq!(
        s.ingress_addrs[&crate::ids::NodeId(1)].to_string(),
        "10.255.0.2"
    );
    assert_eq!(a.vips["ing"].to_string(), "10.255.0.3");
    assert_eq!(a.ports[0].published, 8080);
    let b = &s.services["b"];
    assert_eq!(b.vips["web"].to_string(), "10.0.0.3");
    assert_eq!(b.ports[0].published, 30000);
    let err = create(&mut s, "c", service("c", vec![port(Some(8080), 81)])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "port 8080/tcp is already published by service `a`"
    );
    assert_eq!(
        apply(&mut s, &Command::RemoveNetwork { id: "web".into() })
            .unwrap_err()
            .to_string(),
        "network `web` is in use by service `a`"
    );
    apply(&mut s, &Command::RemoveService { id: "a".into() }).unwrap();
    create(&mut s, "c", service("c", vec![port(Some(8080), 81)])).unwrap();
    assert_eq!(
        s.services["c"].vips["web"].to_string(),
        "10.0.0.2",
        "a's VIP is free again"
    );
}

#[test]
fn bad_service_specs_are_refused_and_change_nothing() {
    let mut s = swarm(1);
    let before = s.clone();
    let mut dnsrr = service("d", vec![port(Some(80), 80)]);
    dnsrr.endpoint_mode = EndpointMode::Dnsrr;
    assert!(
        create(&mut s, "d", dnsrr)
            .unwrap_err()
            .to_string()
            .contains("--endpoint-mode vip")
    );
    let mut on_ingress = service("i", vec![]);
    on_ingress.networks = vec![Attachment {
        network: "ing".into(),
        aliases: vec![],
    }];
    assert!(
        create(&mut s, "i", on_ingress)
            .unwrap_err()
            .to_string()
            .contains("ingress network directly")
    );
    let mut unknown = service("u", vec![]);
    unknown.networks = vec![Attachment {
        network: "nope".into(),
        aliases: vec![],
    }];
    assert_eq!(
        create(&mut s, "u", unknown).unwrap_err().to_string(),
        "network nope not found"
    );
    let mut host = service("h", vec![]);
    host.ports = vec![PortSpec {
        mode: PublishMode::Host,
        published: None,
        target: 80,
        protocol: Protocol::Udp,
    }];
    assert!(
        create(&mut s, "h", host)
            .unwrap_err()
            .to_string()
            .contains("mode=host")
    );
    assert!(matches!(
        create(&mut s, "x", service("Bad_Name", vec![])),
        Err(ApplyError::Service(ServiceError::BadName(_)))
    ));
    assert_eq!(s, before);
}

#[test]
fn vips_never_repeat_across_many_services() {
    let mut s = swarm(1);
    for i in 0..50 {
        create(
            &mut s,
            &format!("s{i}"),
            service(&format!("s{i}"), vec![port(None, 80)]),
        )
        .unwrap();
    }
    let vips: BTreeSet<_> = s.services.values().map(|x| x.vips["web"]).collect();
    assert_eq!(vips.len(), 50);
    let ports: BTreeSet<_> = s.services.values().map(|x| x.ports[0].published).collect();
    assert_eq!(ports.len(), 50);
}

#[test]
fn a_create_replayed_after_a_lost_reply_is_already_done_and_allocates_nothing() {
    let mut s = swarm(1);
    let web = s.networks["web"].clone();
    let again = Command::CreateNetwork {
        id: web.id.clone(),
        spec: web.spec.clone(),
        created_at_ms: web.created_at_ms,
        avoid: vec![],
    };
    let before = s.clone();
    apply(&mut s, &again).unwrap();
    assert_eq!(s, before);
    // Another network under that ID is still refused.
    let other = Command::CreateNetwork {
        id: web.id.clone(),
        spec: web.spec.clone(),
        created_at_ms: web.created_at_ms + 1,
        avoid: vec![],
    };
    assert!(apply(&mut s, &other).is_err());

    create(&mut s, "a", service("a", vec![port(Some(8080), 80)])).unwrap();
    let before = s.clone();
    create(&mut s, "a", service("a", vec![port(Some(8080), 80)])).unwrap();
    assert_eq!(s, before);
    let e = create(&mut s, "a", service("a", vec![port(Some(8081), 80)])).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
}

#[test]
fn a_replica_count_over_the_limit_is_refused_and_changes_nothing() {
    let mut s = swarm(1);
    for n in [MAX_REPLICAS + 1, 1_000_000_000, u64::MAX] {
        let mut spec = service("huge", vec![]);
        spec.mode = ServiceMode::Replicated(n);
        let e = create(&mut s, "huge", spec).unwrap_err();
        assert!(e.to_string().contains("over the limit of 10000"), "{e}");
    }
    assert!(s.services.is_empty());
    let mut spec = service("web", vec![]);
    spec.mode = ServiceMode::Replicated(MAX_REPLICAS);
    create(&mut s, "web", spec).unwrap();
    // Scaling and updating past it are refused too.
    let scale = Command::ScaleService {
        id: "web".into(),
        replicas: u64::MAX,
    };
    assert!(apply(&mut s, &scale).is_err());
    let mut bigger = s.services["web"].spec.clone();
    bigger.mode = ServiceMode::Replicated(MAX_REPLICAS + 1);
    let update = Command::UpdateService {
        id: "web".into(),
        spec: bigger,
        force: false,
        now_ms: 1,
    };
    assert!(apply(&mut s, &update).is_err());
    assert_eq!(
        s.services["web"].spec.mode,
        ServiceMode::Replicated(MAX_REPLICAS)
    );
}

#[test]
fn commands_from_the_log_are_held_to_the_same_bounds_as_the_cli() {
    let mut s = swarm(2);
    let before = s.clone();
    let mut big = service("big", vec![]);
    big.env
        .insert("K".into(), "x".repeat(crate::bounds::MAX_VALUE + 1));
    let mut nul = service("nul", vec![]);
    nul.command.push("a\0b".into());
    let mut many = service("many", vec![]);
    many.command = vec!["x".into(); crate::bounds::MAX_ENTRIES + 1];
    let mut wide = service("wide", vec![]);
    for i in 0..20 {
        wide.env
            .insert(format!("K{i}"), "x".repeat(crate::bounds::MAX_VALUE));
    }
    for (id, spec) in [("b", big), ("n", nul), ("m", many), ("w", wide)] {
        let e = create(&mut s, id, spec).unwrap_err();
        assert!(matches!(e, ApplyError::OutOfBounds(_)), "{id}: {e}");
    }
    let e = create(&mut s, "../../etc", service("ok", vec![])).unwrap_err();
    assert!(e.to_string().contains("service ID"), "{e}");
    let task = Command::AddTask {
        id: "a/b".into(),
        service_id: "x".into(),
        slot: Some(1),
        node: None,
        message: String::new(),
        restarts: 0,
        now_ms: 0,
    };
    assert!(matches!(
        apply(&mut s, &task),
        Err(ApplyError::OutOfBounds(_))
    ));
    let mut stranger = crate::fixtures::node(9);
    stranger.hostname = "evil\u{1b}[2J".into();
    let e = apply(&mut s, &Command::AddNode(stranger)).unwrap_err();
    assert!(e.to_string().starts_with("hostname:"), "{e}");
    let labels = Command::UpdateNode {
        node: crate::ids::NodeId(1),
        availability: None,
        label_add: (0..=crate::bounds::MAX_ENTRIES)
            .map(|i| (format!("k{i}"), String::new()))
            .collect(),
        label_rm: vec![],
    };
    assert!(matches!(
        apply(&mut s, &labels),
        Err(ApplyError::OutOfBounds(_))
    ));
    assert_eq!(s, before, "refusals change nothing");
}

#[test]
fn a_container_spec_survives_the_log_and_bad_values_are_refused() {
    let mut spec = service("web", vec![]);
    spec.container = Some(ContainerSpec {
        image: "lab.local/busybox:1".into(),
        digest: Some(format!("sha256:{}", "ab".repeat(32))),
        limits: Resources {
            memory_bytes: Some(32 << 20),
            ..Default::default()
        },
        stop_grace_ms: Some(2_000),
        ..Default::default()
    });
    let cmd = Command::CreateService {
        id: "a".into(),
        spec: spec.clone(),
        created_at_ms: 0,
    };
    let bytes = crate::codec::encode(&cmd).unwrap();
    let back: Command = crate::codec::decode(&bytes, crate::codec::DEFAULT_LIMIT).unwrap();
    assert_eq!(back, cmd);
    let mut s = swarm(1);
    apply(&mut s, &back).unwrap();
    assert_eq!(s.services["a"].spec, spec);

    let refused = |c: ContainerSpec| {
        let mut spec = service("x", vec![]);
        spec.container = Some(c);
        crate::bounds::check_service(&spec).unwrap_err().to_string()
    };
    let base = ContainerSpec {
        image: "busybox".into(),
        ..Default::default()
    };
    let e = refused(ContainerSpec {
        digest: Some("sha256:zz".into()),
        ..base.clone()
    });
    assert!(e.contains("not sha256:<64 hex digits>"), "{e}");
    let e = refused(ContainerSpec {
        limits: Resources {
            memory_bytes: Some(1 << 20),
            ..Default::default()
        },
        ..base.clone()
    });
    assert!(
        e.starts_with("--limit-memory: 1048576 is out of range"),
        "{e}"
    );
    let e = refused(ContainerSpec {
        image: String::new(),
        ..base.clone()
    });
    assert_eq!(e, "the image: empty");
    let e = refused(ContainerSpec {
        stop_grace_ms: Some(u64::MAX),
        ..base
    });
    assert!(e.starts_with("--stop-grace-period"), "{e}");
}

#[test]
fn log_entries_written_before_containers_apply_as_host_process_services() {
    let spec = service("old", vec![]);
    let v1 = Command::CreateServiceV1 {
        id: "o".into(),
        spec: crate::legacy::ServiceSpecV1::from_current(&spec),
        created_at_ms: 0,
    };
    // The old variant kept its position, so old bytes decode as it.
    let bytes = crate::codec::encode(&v1).unwrap();
    let back: Command = crate::codec::decode(&bytes, crate::codec::DEFAULT_LIMIT).unwrap();
    let mut s = swarm(1);
    apply(&mut s, &back).unwrap();
    assert_eq!(s.services["o"].spec, spec);
    assert!(s.services["o"].spec.container.is_none());
}

#[test]
fn log_entries_written_before_http_routes_apply_without_routes() {
    let mut spec = service("old", vec![]);
    spec.container = Some(ContainerSpec {
        image: "registry.test/app@sha256:".to_owned() + &"a".repeat(64),
        ..Default::default()
    });
    let v2 = Command::CreateServiceV2 {
        id: "o".into(),
        spec: crate::legacy::ServiceSpecV2::from_current(&spec),
        created_at_ms: 0,
    };
    let bytes = crate::codec::encode(&v2).unwrap();
    let back: Command = crate::codec::decode(&bytes, crate::codec::DEFAULT_LIMIT).unwrap();
    let mut s = swarm(1);
    apply(&mut s, &back).unwrap();
    assert_eq!(s.services["o"].spec, spec);
    assert!(s.services["o"].spec.ext.http_routes.is_empty());
}

#[test]
fn a_host_and_path_lead_to_one_service() {
    let route = |t: &str| t.parse::<crate::route::HttpRoute>().unwrap();
    let with = |name: &str, routes: &[&str]| {
        let mut spec = service(name, vec![]);
        spec.ext.http_routes = routes.iter().map(|r| route(r)).collect();
        spec
    };
    let create = |s: &mut ClusterState, id: &str, spec: ServiceSpec| {
        apply(
            s,
            &Command::CreateService {
                id: id.into(),
                spec,
                created_at_ms: 0,
            },
        )
    };
    let mut s = swarm(1);
    create(&mut s, "a", with("a", &["host=a.test"])).unwrap();
    // Another path of the same host, or another host: free.
    create(
        &mut s,
        "b",
        with("b", &["host=a.test,path=/api", "host=b.test"]),
    )
    .unwrap();
    let before = s.clone();
    let e = create(
        &mut s,
        "c",
        with("c", &["host=c.test", "host=A.TEST,target=8080"]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("HTTP route a.test is already routed to service `a`"),
        "{e}"
    );
    assert_eq!(s, before, "nothing changes");
    // An update may not take another's route either; its own it keeps.
    let e = apply(
        &mut s,
        &Command::UpdateService {
            id: "a".into(),
            spec: with("a", &["host=a.test", "host=b.test"]),
            force: false,
            now_ms: 1,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("already routed to service `b`"), "{e}");
    apply(
        &mut s,
        &Command::UpdateService {
            id: "a".into(),
            spec: with("a", &["host=a.test,target=8080"]),
            force: false,
            now_ms: 1,
        },
    )
    .unwrap();
    // Removing a service frees its routes.
    apply(&mut s, &Command::RemoveService { id: "a".into() }).unwrap();
    create(&mut s, "c", with("c", &["host=a.test"])).unwrap();
    // A hostile log entry (not normalized, too many) is refused.
    let mut odd = with("d", &["host=d.test"]);
    odd.ext.http_routes[0].host = "D.test".into();
    let e = create(&mut s, "d", odd).unwrap_err().to_string();
    assert!(e.starts_with("--http-route"), "{e}");
}
