//! Logging in to the studio: an API token opens a session of its own.
//!
//! `GET /login?token=mst_…` (the URL `muster dev` prints) or the form on `/login` checks
//! the token like the API does, then makes a **session token** for the same user: an
//! ordinary `mst_` token named `studio session`, replicated like any other, that expires
//! after 12 hours and is revoked when the user logs out. The cookie holds the session token,
//! never the pasted one, so a browser keeps nothing that outlives its session. The cookie is
//! `HttpOnly` (no script reads it), `SameSite=Strict` (no other site's page sends it),
//! `Path=/`, and `Secure` once the server speaks TLS. Every studio page then reads its
//! viewer from the cookie and shows only the workspaces the viewer has a role in; without a
//! valid cookie a page redirects to `/login`. A revoked or expired token, or a session whose
//! user lost their token, ends at the next page.
//!
//! Requests that change something carry a CSRF token (a hash of the session's token, so it
//! needs no server memory and is the same on every server) in a hidden form field, checked
//! beside the front's Origin check; logging out is such a request.

use std::sync::Arc;

use askama::Template;
use axum::Form;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use muster_core::access::{
    AccessChange, Principal, TOKEN_PREFIX, Token, format_token, hash_secret, parse_token,
};
use muster_core::state::Command;
use serde::Deserialize;

use crate::coordinator::{new_secret, new_token_id, now_ms};
use crate::server::Server;
use crate::views::access::{Readable, readable_by};

/// The session cookie's name.
pub(super) const COOKIE: &str = "muster_session";

/// Who is looking at a studio page.
#[derive(Debug, Clone)]
pub(super) struct Viewer {
    /// The user's name.
    pub user: String,
    /// The workspaces they may read.
    pub readable: Readable,
    /// The CSRF token of their session.
    pub csrf: String,
}

/// How the names of the tokens sessions hold begin (`muster token list` shows them); the
/// id of the token that opened the session follows.
pub(super) const SESSION_NAME: &str = "studio session of ";

/// How long a session lasts, in seconds.
const SESSION_S: u64 = 12 * 3600;

/// The CSRF token of a session whose cookie holds `token`.
fn csrf_of(token: &str) -> String {
    hash_secret(&format!("muster-studio-csrf:{token}"))
}

/// The session token in the request's cookies, if any.
fn session_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == COOKIE).then(|| v.to_string())
        })
}

/// A live user token: its user, id and expiry.
struct LiveUser {
    name: String,
    token_id: String,
    expires_at: Option<u64>,
}

/// The user a token belongs to, if it is a live user token; for a session's token, only
/// while the token that opened the session is live too (revoking an API token ends the
/// studio sessions it opened).
fn user_of(server: &Server, token: &str) -> Result<LiveUser, String> {
    let now = now_ms();
    server.coordinator.read(|s| {
        let t = s
            .access
            .authenticate(token, now)
            .map_err(|e| e.to_string())?;
        let Principal::User { name } = &t.principal else {
            return Err("an agent's credential cannot log in".to_string());
        };
        if let Some(parent) = t.name.strip_prefix(SESSION_NAME) {
            let live = s
                .access
                .tokens
                .get(parent.trim())
                .is_some_and(|p| p.is_live(now));
            if !live {
                return Err("the token that opened this session was revoked or expired".into());
            }
        }
        Ok(LiveUser {
            name: name.clone(),
            token_id: t.id.clone(),
            expires_at: t.expires_at,
        })
    })
}

/// The viewer of a request, from its session cookie.
pub(super) fn viewer(server: &Server, headers: &HeaderMap) -> Option<Viewer> {
    let token = session_token(headers)?;
    let user = user_of(server, &token).ok()?.name;
    Some(Viewer {
        readable: readable_by(server, &user),
        csrf: csrf_of(&token),
        user,
    })
}

/// Where a page without a session sends the browser.
pub(super) fn to_login() -> Response {
    Redirect::to("/login").into_response()
}

/// A studio page's viewer as an extractor: a request without a valid session is sent to
/// `/login` before the handler runs.
impl axum::extract::FromRequestParts<Arc<Server>> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        server: &Arc<Server>,
    ) -> Result<Viewer, Response> {
        viewer(server, &parts.headers).ok_or_else(to_login)
    }
}

#[derive(Debug, Template)]
#[template(path = "studio/login.html", whitespace = "minimize")]
struct LoginPage {
    head: super::studio::Head,
    error: Option<String>,
}

fn login_page(status: StatusCode, error: Option<String>) -> Response {
    let page = LoginPage {
        head: super::studio::Head {
            title: "Log in to muster studio".into(),
            refresh_s: None,
            back: None,
        },
        error,
    };
    let mut response = super::studio::render(&page);
    if response.status() == StatusCode::OK {
        *response.status_mut() = status;
    }
    response
}

/// A session for the user of `token`, or the login page saying why not.
async fn start(server: &Server, token: &str) -> Response {
    let opener = match user_of(server, token.trim()) {
        Ok(user) => user,
        Err(why) => return login_page(StatusCode::UNAUTHORIZED, Some(why)),
    };
    let now = now_ms();
    let (id, secret) = (new_token_id(), new_secret());
    let by = format!("user:{}", opener.name);
    // A session never outlives the token that opened it.
    let ends = (now + SESSION_S * 1000).min(opener.expires_at.unwrap_or(u64::MAX));
    let session = Token {
        id: id.clone(),
        principal: Principal::User { name: opener.name },
        name: format!("{SESSION_NAME}{}", opener.token_id),
        hash: hash_secret(&secret),
        created_at: now,
        expires_at: Some(ends),
        revoked_at: None,
        created_by: by.clone(),
    };
    let made = server
        .coordinator
        .propose(Command::Access {
            change: Box::new(AccessChange::CreateToken { token: session }),
            by,
            at: now,
        })
        .await;
    if let Err(e) = made {
        return login_page(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(format!("the session could not be started ({e}): try again")),
        );
    }
    // Over TLS the browser sends the cookie over TLS only.
    let secure = if server.config.tls.is_some() {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/; Max-Age={SESSION_S}{secure}",
        format_token(TOKEN_PREFIX, &id, &secret)
    );
    let mut response = Redirect::to("/").into_response();
    if let Ok(v) = cookie.parse() {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

/// `?token=` of `/login`.
#[derive(Debug, Deserialize)]
pub(super) struct TokenQuery {
    token: Option<String>,
}

/// `GET /login`: the form, or (with `?token=`) a session.
pub(super) async fn login(
    State(server): State<Arc<Server>>,
    Query(q): Query<TokenQuery>,
) -> Response {
    match q.token {
        Some(token) => start(&server, &token).await,
        None => login_page(StatusCode::OK, None),
    }
}

/// The login form's fields.
#[derive(Debug, Deserialize)]
pub(super) struct LoginForm {
    token: String,
}

/// `POST /login`: a session for the pasted token.
pub(super) async fn login_submit(
    State(server): State<Arc<Server>>,
    Form(form): Form<LoginForm>,
) -> Response {
    start(&server, &form.token).await
}

/// The logout form's fields.
#[derive(Debug, Deserialize)]
pub(super) struct LogoutForm {
    csrf: String,
}

/// `POST /logout`: ends the session (the CSRF token must match it) and revokes its token.
pub(super) async fn logout(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Form(form): Form<LogoutForm>,
) -> Response {
    let Some(token) = session_token(&headers) else {
        return to_login();
    };
    if form.csrf != csrf_of(&token) {
        return (
            StatusCode::FORBIDDEN,
            "the form's CSRF token does not match your session: reload the page and try again\n",
        )
            .into_response();
    }
    if let Err(e) = end(&server, &token).await {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the session could not be ended ({e}): try again\n"),
        )
            .into_response();
    }
    let mut response = Redirect::to("/login").into_response();
    let clear = format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    if let Ok(v) = clear.parse() {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

/// Revokes the session token `token` (a live one of a session; any other token, such as an
/// API token in a cookie set by hand, is left alone).
async fn end(server: &Server, token: &str) -> Result<(), String> {
    let now = now_ms();
    let Some((id, _)) = parse_token(TOKEN_PREFIX, token) else {
        return Ok(());
    };
    let session = server.coordinator.read(|s| {
        s.access
            .authenticate(token, now)
            .ok()
            .filter(|t| t.name.starts_with(SESSION_NAME))
            .map(|t| t.principal.label())
    });
    let Some(by) = session else {
        return Ok(());
    };
    server
        .coordinator
        .propose(Command::Access {
            change: Box::new(AccessChange::RevokeToken { id: id.to_string() }),
            by,
            at: now,
        })
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}
