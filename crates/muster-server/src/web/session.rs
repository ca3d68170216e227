//! Logging in to the studio: an API token becomes a session cookie.
//!
//! `GET /login?token=mst_…` (the URL `muster dev` prints) or the form on `/login` checks
//! the token like the API does and answers with a cookie holding it: `HttpOnly` (no script
//! reads it), `SameSite=Strict` (no other site's page sends it), `Path=/`, and `Secure`
//! once the server speaks TLS. Every studio page then reads its viewer from the cookie and
//! shows only the workspaces the viewer has a role in; without a valid cookie a page
//! redirects to `/login`. A revoked or expired token ends the session at the next page.
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
use muster_core::access::{Principal, hash_secret};
use serde::Deserialize;

use crate::coordinator::now_ms;
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

/// The user a token belongs to, if it is a live user token.
fn user_of(server: &Server, token: &str) -> Result<String, String> {
    let now = now_ms();
    server
        .coordinator
        .read(|s| match s.access.authenticate(token, now) {
            Ok(t) => match &t.principal {
                Principal::User { name } => Ok(name.clone()),
                Principal::Agent { .. } => Err("an agent's credential cannot log in".to_string()),
            },
            Err(e) => Err(e.to_string()),
        })
}

/// The viewer of a request, from its session cookie.
pub(super) fn viewer(server: &Server, headers: &HeaderMap) -> Option<Viewer> {
    let token = session_token(headers)?;
    let user = user_of(server, &token).ok()?;
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

/// A session for `token`, or the login page saying why not.
fn start(server: &Server, token: &str) -> Response {
    let token = token.trim();
    // Over TLS the browser sends the cookie over TLS only.
    let secure = if server.config.tls.is_some() {
        "; Secure"
    } else {
        ""
    };
    match user_of(server, token) {
        Ok(_) => {
            let cookie = format!(
                "{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age=43200{secure}"
            );
            let mut response = Redirect::to("/").into_response();
            if let Ok(v) = cookie.parse() {
                response.headers_mut().insert(header::SET_COOKIE, v);
            }
            response
        }
        Err(why) => login_page(StatusCode::UNAUTHORIZED, Some(why)),
    }
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
        Some(token) => start(&server, &token),
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
    start(&server, &form.token)
}

/// The logout form's fields.
#[derive(Debug, Deserialize)]
pub(super) struct LogoutForm {
    csrf: String,
}

/// `POST /logout`: ends the session (the CSRF token must match it).
pub(super) async fn logout(headers: HeaderMap, Form(form): Form<LogoutForm>) -> Response {
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
    let mut response = Redirect::to("/login").into_response();
    let clear = format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    if let Ok(v) = clear.parse() {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}
