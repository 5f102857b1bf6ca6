//! Named network namespaces under `/run/netns`, and the host namespace's routes and links.

use super::*;

/// Runs `f` on a thread of its own that first enters the network namespace
/// at `path` (stays in this one when `None`): sockets it opens and
/// processes it spawns live there.
pub fn in_netns<T: Send + 'static>(
    path: Option<PathBuf>,
    f: impl FnOnce() -> Result<T, DpError> + Send + 'static,
) -> Result<T, DpError> {
    std::thread::spawn(move || {
        if let Some(p) = path {
            let file = File::open(&p).map_err(|e| io(p.display().to_string(), e))?;
            nix::sched::setns(file, CloneFlags::CLONE_NEWNET).map_err(|e| sys("setns", e))?;
        }
        f()
    })
    .join()
    .map_err(|_| DpError::Panicked)?
}

/// Makes `/run/netns` exist and be a shared mount, as `ip netns add` does,
/// so that namespaces bound there are seen by every mount namespace.
fn prepare_netns_dir() -> Result<(), DpError> {
    std::fs::create_dir_all(NETNS_DIR).map_err(|e| io(NETNS_DIR, e))?;
    let shared = || {
        nix::mount::mount(
            None::<&str>,
            NETNS_DIR,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    if shared().is_err() {
        nix::mount::mount(
            Some(NETNS_DIR),
            NETNS_DIR,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| sys("bind /run/netns", e))?;
        shared().map_err(|e| sys("make /run/netns shared", e))?;
    }
    Ok(())
}

/// Creates the named network namespace `name` (fails if it exists).
pub fn create_netns(name: &str) -> Result<(), DpError> {
    prepare_netns_dir()?;
    let path = Path::new(NETNS_DIR).join(name);
    File::options()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| io(path.display().to_string(), e))?;
    let target = path.clone();
    let made = std::thread::spawn(move || -> Result<(), DpError> {
        nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|e| sys("unshare", e))?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| sys("bind the new namespace", e))
    })
    .join()
    .map_err(|_| DpError::Panicked)?;
    if made.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    made
}

/// Deletes the named network namespace `name`.
pub fn delete_netns(name: &str) -> Result<(), DpError> {
    let path = Path::new(NETNS_DIR).join(name);
    // Not mounted (a failed creation): just the file.
    let _ = nix::mount::umount2(&path, MntFlags::MNT_DETACH);
    std::fs::remove_file(&path).map_err(|e| io(path.display().to_string(), e))
}

/// The named namespaces starting with `prefix`.
pub fn list_netns(prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// Whether the kernel can make links of `driver` (`macvlan` or `ipvlan`):
/// tried for real in a throwaway namespace, so that `network create` can
/// refuse at once, naming what is missing.
pub async fn probe_driver(driver: &str) -> Result<(), DpError> {
    use rtnetlink::packet_route::link::{IpVlanMode, MacVlanMode};
    use rtnetlink::{LinkIpVlan, LinkMacVlan};
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let ns = format!(
        "shoal-probe{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    create_netns(&ns)?;
    let mut b = Linux::new(None);
    let probe = Ns::named(ns.clone());
    let tried = async {
        let h = b.handle(&probe).await?;
        h.link()
            .add(LinkVeth::new("probe0", "probe1").build())
            .execute()
            .await
            .map_err(|e| netlink("veth", e))?;
        let idx = b.index(&probe, "probe0").await?;
        let msg = match driver {
            "macvlan" => LinkMacVlan::new("probe2", idx, MacVlanMode::Bridge).build(),
            "ipvlan" => LinkIpVlan::new("probe2", idx, IpVlanMode::L2).build(),
            _ => return Ok(()),
        };
        h.link()
            .add(msg)
            .execute()
            .await
            .map_err(|e| netlink(driver, e))
    }
    .await;
    b.handles.clear();
    let _ = delete_netns(&ns);
    tried
}

/// This namespace's IPv4 routes that are not Shoal's and not the default
/// one: (destination, prefix length, device).
pub async fn host_routes() -> Result<Vec<(Ipv4Addr, u8, String)>, DpError> {
    let mut all = main_routes().await?;
    all.retain(|(_, _, dev)| !dev.starts_with("shoal"));
    Ok(all)
}

/// The routes of this namespace's main table through link `dev`.
pub async fn routes_via(dev: &str) -> Result<Vec<(Ipv4Addr, u8)>, DpError> {
    Ok(main_routes()
        .await?
        .into_iter()
        .filter(|(_, _, d)| d == dev)
        .map(|(dst, len, _)| (dst, len))
        .collect())
}

/// This namespace's IPv4 routes in the main table, but the default one:
/// (destination, prefix length, device).
async fn main_routes() -> Result<Vec<(Ipv4Addr, u8, String)>, DpError> {
    let mut b = Linux::new(None);
    let links = b.links(&HOST).await?;
    let names: HashMap<u32, String> = links.iter().map(|(n, s)| (s.index, n.clone())).collect();
    let h = b.handle(&HOST).await?;
    let mut out = Vec::new();
    let mut s = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(r) = s.try_next().await.map_err(|e| netlink("dump routes", e))? {
        let len = r.header.destination_prefix_length;
        if len == 0 || r.header.table != 254 {
            continue;
        }
        let mut dst = None;
        let mut dev = String::new();
        for a in &r.attributes {
            match a {
                RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = Some(*d),
                RouteAttribute::Oif(i) => dev = names.get(i).cloned().unwrap_or_default(),
                _ => {}
            }
        }
        if let Some(d) = dst {
            out.push((d, len, dev));
        }
    }
    Ok(out)
}

/// Whether this namespace has a link named `name`.
pub async fn link_exists(name: &str) -> bool {
    Linux::new(None).index(&HOST, name).await.is_ok()
}
