//! Who may do what on `/v1` (as Kubernetes' NodeRestriction: a node's
//! credential names the node, and it may write only its own lease).
//!
//! | caller | may |
//! |---|---|
//! | `weft:admins` | everything |
//! | `weft:nodes`, CN = N | `PUT`/`DELETE /v1/leases/N`, `POST /v1/leases/N/renew`; read leases, the watch stream and the network config |
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

/// What a node certificate may do on a route: `Read`, or act on the lease
/// named by the `{node}` path segment (or the fixed name of the route).
enum NodeRight {
    Read,
    OwnLease(&'static str),
    None,
}

fn node_right(method: &Method, route: &str) -> NodeRight {
    match (method.as_str(), route) {
        ("GET", "/v1/leases" | "/v1/leases/watch" | "/v1/network") => NodeRight::Read,
        ("PUT" | "DELETE", "/v1/leases/{node}") | ("POST", "/v1/leases/{node}/renew") => {
            NodeRight::OwnLease("{node}")
        }
        // A node named "watch" (the watch route's own path).
        ("PUT" | "DELETE", "/v1/leases/watch") => NodeRight::OwnLease("watch"),
        _ => NodeRight::None,
    }
}

/// The decision for one request: `Ok` or the refusal to send.
pub(crate) fn decide(
    caller: Option<&Caller>,
    method: &Method,
    route: &str,
    path: &str,
    node_param: Option<&str>,
) -> Result<(), ControllerError> {
    let action = format!("{method} {path}");
    let caller = match caller {
        // Fail closed: a connection that did not say who it is.
        None => {
            return Err(ControllerError::Forbidden(format!(
                "{action}: the caller is not known"
            )))
        }
        Some(Caller::Unauthenticated) => return Ok(()),
        Some(c) => c,
    };
    let Caller::Cert { name, role, .. } = caller else {
        unreachable!("handled above")
    };
    match role {
        Role::Admin => Ok(()),
        Role::None => Err(ControllerError::Forbidden(format!(
            "{caller} may not {action}: its Organization grants no weft role \
             (weft:nodes or weft:admins)"
        ))),
        Role::Node => match node_right(method, route) {
            NodeRight::Read => Ok(()),
            NodeRight::OwnLease(segment) => {
                let target = if segment == "{node}" {
                    node_param.unwrap_or_default()
                } else {
                    segment
                };
                if target == name {
                    Ok(())
                } else {
                    Err(ControllerError::Forbidden(format!(
                        "{caller} may not {action}: a node may act only on its own lease \
                         ({name}), not on {target:?}'s"
                    )))
                }
            }
            NodeRight::None => Err(ControllerError::Forbidden(format!(
                "{caller} may not {action}: that takes an admin certificate (O=weft:admins)"
            ))),
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
        parts.uri.path(),
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
        decide(c, &m, route, "/path", node).is_ok()
    }

    #[test]
    fn nodes_act_only_on_their_own_lease() {
        let a = cert("node-a", Role::Node);
        let a = Some(&a);
        for (m, r) in [
            (Method::PUT, "/v1/leases/{node}"),
            (Method::DELETE, "/v1/leases/{node}"),
            (Method::POST, "/v1/leases/{node}/renew"),
        ] {
            assert!(check(a, m.clone(), r, Some("node-a")), "{m} {r}");
            assert!(!check(a, m.clone(), r, Some("node-b")), "{m} {r}");
            assert!(!check(a, m.clone(), r, None), "{m} {r}");
        }
        assert!(!check(a, Method::PUT, "/v1/leases/watch", None));
        let w = cert("watch", Role::Node);
        assert!(check(Some(&w), Method::PUT, "/v1/leases/watch", None));
        for r in ["/v1/leases", "/v1/leases/watch", "/v1/network"] {
            assert!(check(a, Method::GET, r, None), "{r}");
        }
        assert!(!check(a, Method::PUT, "/v1/network", None));
        assert!(!check(a, Method::POST, "/v1/reservations", None));
        assert!(!check(a, Method::GET, "/v1/something-new", None));
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
        ] {
            assert!(check(Some(&admin), m.clone(), r, Some("x")));
            assert!(!check(Some(&none), m.clone(), r, Some("node-a")));
            assert!(!check(None, m.clone(), r, Some("x")), "fails closed");
            assert!(check(Some(&Caller::Unauthenticated), m, r, Some("x")));
        }
        let e = decide(Some(&none), &Method::GET, "/v1/leases", "/v1/leases", None).unwrap_err();
        assert!(e.to_string().contains("weft:nodes or weft:admins"), "{e}");
        assert!(e.to_string().contains("GET /v1/leases"), "{e}");
    }
}
