//! FDB, neighbour and route entries: added and deleted one by one.

use super::*;

impl Linux {
    /// Deletes link `name` of namespace `ns`.
    pub(super) async fn del_link(&mut self, ns: &Ns, name: &str) -> Result<(), DpError> {
        let idx = self.index(ns, name).await?;
        let h = self.handle(ns).await?;
        h.link()
            .del(idx)
            .execute()
            .await
            .map_err(|e| netlink("delete link", e))
    }

    /// Adds (`add`) or deletes FDB entry `f` in namespace `ns`.
    pub(super) async fn fdb(&mut self, ns: &Ns, f: &Fdb, add: bool) -> Result<(), DpError> {
        let idx = self.index(ns, &f.link).await?;
        let h = self.handle(ns).await?;
        let msg = Self::neighbour(idx, AddressFamily::Bridge, &f.mac, f.dst);
        if add {
            let mut req = h.neighbours().add_bridge(idx, &f.mac);
            *req.message_mut() = msg;
            req.execute().await.map_err(|e| netlink("add FDB entry", e))
        } else {
            h.neighbours()
                .del(msg)
                .execute()
                .await
                .map_err(|e| netlink("delete FDB entry", e))
        }
    }

    /// Adds (`add`) or deletes neighbour entry `n` in namespace `ns`.
    pub(super) async fn neigh(&mut self, ns: &Ns, n: &Neigh, add: bool) -> Result<(), DpError> {
        let idx = self.index(ns, &n.link).await?;
        let h = self.handle(ns).await?;
        if add {
            h.neighbours()
                .add(idx, IpAddr::V4(n.ip))
                .link_layer_address(&n.mac)
                .execute()
                .await
                .map_err(|e| netlink("add neighbour", e))
        } else {
            let msg = Self::neighbour(idx, AddressFamily::Inet, &n.mac, n.ip);
            h.neighbours()
                .del(msg)
                .execute()
                .await
                .map_err(|e| netlink("delete neighbour", e))
        }
    }

    /// Adds (`add`) or deletes route `r` in namespace `ns`.
    pub(super) async fn route(
        &mut self,
        ns: &Ns,
        r: &crate::model::Route,
        add: bool,
    ) -> Result<(), DpError> {
        let idx = self.index(ns, &r.dev).await?;
        let h = self.handle(ns).await?;
        let msg = route_message(r, idx);
        if add {
            h.route()
                .add(msg)
                .execute()
                .await
                .map_err(|e| netlink("add route", e))
        } else {
            h.route()
                .del(msg)
                .execute()
                .await
                .map_err(|e| netlink("delete route", e))
        }
    }
}

fn route_message(r: &crate::model::Route, dev: u32) -> RouteMessage {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(r.dst.0, r.dst.1)
        .output_interface(dev)
        .protocol(RouteProtocol::Static);
    if let Some(via) = r.via {
        b = b.gateway(via);
    }
    b.build()
}
