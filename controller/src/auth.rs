//! Who may do what on `/v1` (as Kubernetes' NodeRestriction: a node's
//! credential names the node, and it may write only its own lease).
//!
//! | caller | may |
//! |---|---|
//! | `weft:admins` | everything |
//! | `weft:nodes`, CN = N | `PUT`/`DELETE /v1/leases/N`, `POST /v1/leases/N/renew`, `PUT /v1/leases/N/names`; read leases, names, their watch streams and the network config |
//! | anything else | nothing: `403 forbidden` |
//!
//! Anything not listed is refused (a route added later is admin-only until
//! it is listed here).

use crate::error::ControllerError;
use crate::tls::{Caller, Role};
use crate::Shared;
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::sync::Arc;

/// What a node certificate may do on a route.
enum NodeRight {
    Read,
    /// Act on the lease named by the `{node}` path segment.
    LeaseInPath,
    /// Act on the lease of the node called `watch` (the watch route's own
    /// path).
    LeaseNamedWatch,
    None,
}

fn node_right(method: &Method, route: &str, query: Option<&str>) -> NodeRight {
    match (method.as_str(), route) {
        // Not with_ttl: that costs etcd a request per lease.
        ("GET", "/v1/leases") if !asks_ttl(query) => NodeRight::Read,
        ("GET", "/v1/leases/watch" | "/v1/network" | "/v1/names" | "/v1/names/watch") => {
            NodeRight::Read
        }
        ("PUT" | "DELETE", "/v1/leases/{node}")
        | ("POST", "/v1/leases/{node}/renew")
        | ("PUT", "/v1/leases/{node}/names") => NodeRight::LeaseInPath,
        ("PUT" | "DELETE", "/v1/leases/watch") => NodeRight::LeaseNamedWatch,
        _ => NodeRight::None,
    }
}

/// Whether a query asks for `with_ttl=true` (as the handler reads it).
fn asks_ttl(query: Option<&str>) -> bool {
    query
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .any(|(k, v)| k == "with_ttl" && v != "false")
}

/// The decision for one request: `Ok` or the refusal to send.
pub(crate) fn decide(
    caller: Option<&Caller>,
    method: &Method,
    route: &str,
    uri: &axum::http::Uri,
    node_param: Option<&str>,
) -> Result<(), ControllerError> {
    let action = format!("{method} {uri}");
    match caller {
        // Fail closed: a connection that did not say who it is.
        None => Err(ControllerError::Forbidden(format!(
            "{action}: the caller is not known"
        ))),
        Some(Caller::Unauthenticated) => Ok(()),
        Some(c @ Caller::Cert { name, role, .. }) => match role {
            Role::Admin => Ok(()),
            Role::None => Err(ControllerError::Forbidden(format!(
                "{c} may not {action}: its Organization grants no weft role \
                 (weft:nodes or weft:admins)"
            ))),
            Role::Node => {
                let target = match node_right(method, route, uri.query()) {
                    NodeRight::Read => return Ok(()),
                    NodeRight::LeaseInPath => node_param.unwrap_or_default(),
                    NodeRight::LeaseNamedWatch => "watch",
                    NodeRight::None => {
                        return Err(ControllerError::Forbidden(format!(
                            "{c} may not {action}: that takes an admin certificate \
                             (O=weft:admins)"
                        )))
                    }
                };
                if target == name {
                    Ok(())
                } else {
                    Err(ControllerError::Forbidden(format!(
                        "{c} may not {action}: a node may act only on its own lease \
                         ({name}), not on {target:?}'s"
                    )))
                }
            }
        },
    }
}

/// Middleware on the `/v1` routes: checks the caller against the route
/// before the handler runs; refusals are logged with who and what.
pub(crate) async fn authorize(
    State(s): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    let (mut parts, body) = request.into_parts();
    let route = parts
        .extensions
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_default();
    let params =
        <Path<HashMap<String, String>> as axum::extract::FromRequestParts<_>>::from_request_parts(
            &mut parts, &s,
        )
        .await
        .map(|Path(p)| p)
        .unwrap_or_default();
    let caller = parts.extensions.get::<Caller>();
    let decision = decide(
        caller,
        &parts.method,
        &route,
        &parts.uri,
        params.get("node").map(String::as_str),
    );
    if let Err(e) = decision {
        s.metrics.forbidden.inc();
        tracing::warn!("refused: {e}");
        return e.into_response();
    }
    next.run(Request::from_parts(parts, body)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(name: &str, role: Role) -> Caller {
        Caller::Cert {
            name: name.into(),
            orgs: vec![],
            role,
        }
    }

    fn check(c: Option<&Caller>, m: Method, route: &str, node: Option<&str>) -> bool {
        decide(c, &m, route, &"/path".parse().unwrap(), node).is_ok()
    }

    #[test]
    fn nodes_act_only_on_their_own_lease() {
        let a = cert("node-a", Role::Node);
        let a = Some(&a);
        for (m, r) in [
            (Method::PUT, "/v1/leases/{node}"),
            (Method::DELETE, "/v1/leases/{node}"),
            (Method::POST, "/v1/leases/{node}/renew"),
            (Method::PUT, "/v1/leases/{node}/names"),
        ] {
            assert!(check(a, m.clone(), r, Some("node-a")), "{m} {r}");
            assert!(!check(a, m.clone(), r, Some("node-b")), "{m} {r}");
            assert!(!check(a, m.clone(), r, None), "{m} {r}");
        }
        assert!(!check(a, Method::PUT, "/v1/leases/watch", None));
        let w = cert("watch", Role::Node);
        assert!(check(Some(&w), Method::PUT, "/v1/leases/watch", None));
        for r in [
            "/v1/leases",
            "/v1/leases/watch",
            "/v1/network",
            "/v1/names",
            "/v1/names/watch",
        ] {
            assert!(check(a, Method::GET, r, None), "{r}");
        }
        // Names of things that are not containers are for operators.
        assert!(!check(a, Method::POST, "/v1/names", None));
        assert!(!check(
            a,
            Method::DELETE,
            "/v1/names/{name}/{address}",
            None
        ));
        assert!(!check(a, Method::PUT, "/v1/network", None));
        assert!(!check(a, Method::POST, "/v1/reservations", None));
        assert!(!check(a, Method::GET, "/v1/something-new", None));
        // Listing with TTLs (an etcd request per lease) is for admins.
        let ttl = |q: &str| {
            decide(
                a,
                &Method::GET,
                "/v1/leases",
                &format!("/v1/leases?{q}").parse().unwrap(),
                None,
            )
            .is_ok()
        };
        assert!(ttl("with_ttl=false"));
        assert!(!ttl("with_ttl=true"));
        assert!(!ttl("x=1&with_ttl=true"));
    }

    #[test]
    fn admins_do_everything_others_nothing() {
        let admin = cert("ops", Role::Admin);
        let none = cert("node-a", Role::None);
        for (m, r) in [
            (Method::PUT, "/v1/network"),
            (Method::POST, "/v1/reservations"),
            (Method::DELETE, "/v1/leases/{node}"),
            (Method::GET, "/v1/leases"),
            (Method::POST, "/v1/names"),
            (Method::DELETE, "/v1/names/{name}/{address}"),
        ] {
            assert!(check(Some(&admin), m.clone(), r, Some("x")));
            assert!(!check(Some(&none), m.clone(), r, Some("node-a")));
            assert!(!check(None, m.clone(), r, Some("x")), "fails closed");
            assert!(check(Some(&Caller::Unauthenticated), m, r, Some("x")));
        }
        let e = decide(
            Some(&none),
            &Method::GET,
            "/v1/leases",
            &"/v1/leases".parse().unwrap(),
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("weft:nodes or weft:admins"), "{e}");
        assert!(e.to_string().contains("GET /v1/leases"), "{e}");
    }
}
