use super::*;

fn user_token(id: &str, user: &str, secret: &str, expires_at: Option<Millis>) -> Token {
    Token {
        id: id.into(),
        principal: Principal::User { name: user.into() },
        name: "test".into(),
        hash: hash_secret(secret),
        created_at: 10,
        expires_at,
        revoked_at: None,
        created_by: "server:1".into(),
    }
}

fn apply(access: &mut Access, change: AccessChange, at: Millis) -> Result<(), AccessError> {
    // Two compute targets: `gpu` in the default workspace, `vision-gpu` in `vision`.
    access.apply(
        &change,
        "user:admin",
        at,
        |_| None,
        |c| match c {
            "gpu" => Some(DEFAULT_WORKSPACE.to_string()),
            "vision-gpu" => Some("vision".to_string()),
            _ => None,
        },
    )
}

fn bootstrapped() -> Access {
    let mut access = Access::default();
    apply(
        &mut access,
        AccessChange::Bootstrap {
            token: user_token("boot", "admin", "s3cret", None),
        },
        10,
    )
    .unwrap();
    access
}

#[test]
fn a_token_authenticates_only_with_its_secret_while_live() {
    let mut access = bootstrapped();
    let presented = format_token(TOKEN_PREFIX, "boot", "s3cret");
    assert_eq!(access.authenticate(&presented, 11).unwrap().id, "boot");
    assert_eq!(
        access.authenticate(&format_token(TOKEN_PREFIX, "boot", "wrong"), 11),
        Err(AuthError::Unknown)
    );
    assert_eq!(
        access.authenticate(&format_token(TOKEN_PREFIX, "nope", "s3cret"), 11),
        Err(AuthError::Unknown)
    );
    assert_eq!(
        access.authenticate("Bearer x", 11),
        Err(AuthError::Malformed)
    );
    assert_eq!(
        access.authenticate("mst_a_b_c", 11),
        Err(AuthError::Malformed)
    );
    apply(
        &mut access,
        AccessChange::RevokeToken { id: "boot".into() },
        20,
    )
    .unwrap();
    assert_eq!(access.authenticate(&presented, 21), Err(AuthError::Revoked));
}

#[test]
fn an_expired_token_is_refused() {
    let mut access = bootstrapped();
    apply(
        &mut access,
        AccessChange::CreateToken {
            token: user_token("t2", "alice", "abc", Some(100)),
        },
        10,
    )
    .unwrap();
    let presented = format_token(TOKEN_PREFIX, "t2", "abc");
    assert!(access.authenticate(&presented, 99).is_ok());
    assert_eq!(
        access.authenticate(&presented, 100),
        Err(AuthError::Expired)
    );
    assert_eq!(
        apply(
            &mut access,
            AccessChange::CreateToken {
                token: user_token("t3", "alice", "abc", Some(5)),
            },
            10,
        ),
        Err(AccessError::ExpiresInPast)
    );
}

#[test]
fn tokens_ended_a_week_ago_are_dropped_when_the_next_one_is_made() {
    let mut access = bootstrapped();
    let make = |access: &mut Access, id: &str, expires: Option<Millis>, at: Millis| {
        let mut t = user_token(id, "alice", "abc", expires);
        t.created_at = at;
        apply(access, AccessChange::CreateToken { token: t }, at).unwrap();
    };
    make(&mut access, "short", Some(1_000), 10);
    make(&mut access, "revoked", None, 10);
    apply(
        &mut access,
        AccessChange::RevokeToken {
            id: "revoked".into(),
        },
        2_000,
    )
    .unwrap();
    // Within the week both are kept (and refused with their reason).
    make(&mut access, "a", None, 1_000 + ENDED_TOKEN_KEPT - 1);
    assert!(access.tokens.contains_key("short") && access.tokens.contains_key("revoked"));
    assert_eq!(
        access.authenticate(&format_token(TOKEN_PREFIX, "short", "abc"), 5_000),
        Err(AuthError::Expired)
    );
    // A week after it expired the first goes; the revoked one a millisecond later.
    make(&mut access, "b", None, 1_000 + ENDED_TOKEN_KEPT);
    assert!(!access.tokens.contains_key("short"));
    assert!(access.tokens.contains_key("revoked"));
    make(&mut access, "c", None, 2_000 + ENDED_TOKEN_KEPT);
    assert!(!access.tokens.contains_key("revoked"));
    // Live tokens, the bootstrap one included, stay.
    for id in ["boot", "a", "b", "c"] {
        assert!(access.tokens.contains_key(id), "{id}");
    }
}

#[test]
fn bootstrap_happens_once_and_a_revoked_bootstrap_token_stays_revoked() {
    let mut access = bootstrapped();
    apply(
        &mut access,
        AccessChange::RevokeToken { id: "boot".into() },
        20,
    )
    .unwrap();
    let before = access.clone();
    apply(
        &mut access,
        AccessChange::Bootstrap {
            token: user_token("boot", "admin", "s3cret", None),
        },
        30,
    )
    .unwrap();
    assert_eq!(access, before, "a repeated bootstrap is a no-op");
    assert_eq!(access.cluster_role("admin"), Some(Role::Admin));
}

#[test]
fn roles_are_per_workspace_and_cluster_grants_count_everywhere() {
    let mut access = bootstrapped();
    apply(
        &mut access,
        AccessChange::CreateWorkspace {
            name: "vision".into(),
        },
        11,
    )
    .unwrap();
    let grant = Grant {
        user: "alice".into(),
        workspace: Some("vision".into()),
        role: Role::User,
    };
    apply(
        &mut access,
        AccessChange::GrantRole {
            grant: grant.clone(),
        },
        12,
    )
    .unwrap();
    assert_eq!(access.role_in("alice", "vision"), Some(Role::User));
    assert_eq!(access.role_in("alice", DEFAULT_WORKSPACE), None);
    assert_eq!(access.role_in("admin", "vision"), Some(Role::Admin));
    assert_eq!(
        access
            .workspaces_of("alice")
            .into_iter()
            .collect::<Vec<_>>(),
        vec![("vision".to_string(), Role::User)]
    );
    assert!(
        Role::Admin > Role::Operator && Role::Operator > Role::User && Role::User > Role::Reader
    );
    // A grant in a workspace that does not exist is refused.
    let err = apply(
        &mut access,
        AccessChange::GrantRole {
            grant: Grant {
                user: "bob".into(),
                workspace: Some("nlp".into()),
                role: Role::Reader,
            },
        },
        13,
    )
    .unwrap_err();
    assert_eq!(err, AccessError::UnknownWorkspace("nlp".into()));
    // Deleting the workspace removes its grants.
    apply(
        &mut access,
        AccessChange::DeleteWorkspace {
            name: "vision".into(),
        },
        14,
    )
    .unwrap();
    assert_eq!(access.role_in("alice", "vision"), None);
    assert!(!access.grants.contains(&grant));
}

#[test]
fn a_workspace_in_use_or_the_default_one_is_not_deleted() {
    let mut access = bootstrapped();
    apply(
        &mut access,
        AccessChange::CreateWorkspace {
            name: "vision".into(),
        },
        11,
    )
    .unwrap();
    let err = access
        .apply(
            &AccessChange::DeleteWorkspace {
                name: "vision".into(),
            },
            "user:admin",
            12,
            |_| Some("compute target gpu".into()),
            |_| Some("vision".into()),
        )
        .unwrap_err();
    assert!(matches!(err, AccessError::WorkspaceInUse { .. }), "{err}");
    assert!(access.workspace_exists("vision"));
    let err = apply(
        &mut access,
        AccessChange::DeleteWorkspace {
            name: DEFAULT_WORKSPACE.into(),
        },
        12,
    )
    .unwrap_err();
    assert!(matches!(err, AccessError::WorkspaceInUse { .. }));
}

#[test]
fn the_last_cluster_admin_cannot_be_revoked() {
    let mut access = bootstrapped();
    let admin = Grant {
        user: "admin".into(),
        workspace: None,
        role: Role::Admin,
    };
    assert_eq!(
        apply(
            &mut access,
            AccessChange::RevokeRole {
                grant: admin.clone()
            },
            11
        ),
        Err(AccessError::LastAdmin("admin".into()))
    );
    let second = Grant {
        user: "root2".into(),
        ..admin.clone()
    };
    apply(&mut access, AccessChange::GrantRole { grant: second }, 12).unwrap();
    apply(&mut access, AccessChange::RevokeRole { grant: admin }, 13).unwrap();
    assert_eq!(access.cluster_role("admin"), None);
}

#[test]
fn a_join_token_works_once_and_not_after_it_expires() {
    let mut access = bootstrapped();
    let join = JoinToken {
        id: "j1".into(),
        hash: hash_secret("joinsecret"),
        compute: "gpu".into(),
        created_at: 10,
        expires_at: 1_000,
        used: None,
        created_by: "user:admin".into(),
    };
    apply(
        &mut access,
        AccessChange::CreateJoinToken { join: join.clone() },
        10,
    )
    .unwrap();
    let presented = format_token(JOIN_PREFIX, "j1", "joinsecret");
    assert_eq!(access.check_join(&presented, 20).unwrap().compute, "gpu");
    assert!(
        access
            .check_join(&format_token(JOIN_PREFIX, "j1", "x"), 20)
            .is_err()
    );
    let credential = Token {
        id: "n1".into(),
        principal: Principal::Agent {
            node: "node-a".into(),
            compute: "gpu".into(),
        },
        name: "node-a".into(),
        hash: hash_secret("agentsecret"),
        created_at: 20,
        expires_at: None,
        revoked_at: None,
        created_by: "server:1".into(),
    };
    let join_change = AccessChange::Join {
        join_id: "j1".into(),
        node: "node-a".into(),
        credential: credential.clone(),
    };
    apply(&mut access, join_change.clone(), 20).unwrap();
    let agent = access
        .authenticate(&format_token(TOKEN_PREFIX, "n1", "agentsecret"), 21)
        .unwrap();
    assert_eq!(agent.principal, credential.principal);
    let err = access.check_join(&presented, 21).unwrap_err();
    assert!(
        err.to_string().contains("already used (by node node-a)"),
        "{err}"
    );
    let again = AccessChange::Join {
        join_id: "j1".into(),
        node: "node-b".into(),
        credential: Token {
            id: "n2".into(),
            ..credential
        },
    };
    assert!(apply(&mut access, again, 22).is_err());
    // Expiry.
    let late = JoinToken {
        id: "j2".into(),
        ..join
    };
    apply(
        &mut access,
        AccessChange::CreateJoinToken { join: late },
        10,
    )
    .unwrap();
    let err = access
        .check_join(&format_token(JOIN_PREFIX, "j2", "joinsecret"), 1_000)
        .unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
    // A join token for a compute target that does not exist.
    let nowhere = JoinToken {
        id: "j3".into(),
        compute: "nope".into(),
        hash: hash_secret("x"),
        created_at: 10,
        expires_at: 1_000,
        used: None,
        created_by: "user:admin".into(),
    };
    assert!(
        apply(
            &mut access,
            AccessChange::CreateJoinToken { join: nowhere },
            10
        )
        .is_err()
    );
}

#[test]
fn every_change_is_audited_and_the_log_is_bounded() {
    let mut access = bootstrapped();
    assert_eq!(access.audit.len(), 1);
    assert_eq!(access.audit[0].action, "bootstrap");
    assert!(!access.audit[0].detail.contains("s3cret"));
    for i in 0..(MAX_AUDIT_EVENTS + 5) {
        apply(
            &mut access,
            AccessChange::RecordDenials {
                denials: vec![Denial {
                    caller: "anonymous".into(),
                    method: "/muster.v1.RunService/SubmitRun".into(),
                    reason: "no credentials".into(),
                    at: i as Millis,
                }],
                more: 2,
            },
            i as Millis,
        )
        .unwrap();
    }
    assert_eq!(access.audit.len(), MAX_AUDIT_EVENTS);
    assert_eq!(access.audit_dropped, 6);
    let last = access.audit.last().unwrap();
    assert_eq!(last.action, "denied");
    assert!(last.detail.contains("and 2 more"), "{}", last.detail);
}

#[test]
fn roles_parse_by_name() {
    for role in Role::ALL {
        assert_eq!(Role::parse(role.as_str()).unwrap(), role);
    }
    assert_eq!(
        Role::parse("root").unwrap_err().to_string(),
        "unknown role \"root\": use reader, user, operator or admin"
    );
}

#[test]
fn a_workspace_s_serverless_compute_is_one_of_its_own_targets() {
    let mut access = bootstrapped();
    let set = |workspace: &str, compute: Option<&str>| AccessChange::SetServerlessCompute {
        workspace: workspace.into(),
        compute: compute.map(str::to_string),
    };
    apply(&mut access, set(DEFAULT_WORKSPACE, Some("gpu")), 10).unwrap();
    assert_eq!(
        access.serverless.get(DEFAULT_WORKSPACE).map(String::as_str),
        Some("gpu")
    );
    // Another workspace's target, an unknown one, an unknown workspace: refused, unchanged.
    let before = access.clone();
    let err = apply(&mut access, set(DEFAULT_WORKSPACE, Some("vision-gpu")), 11).unwrap_err();
    assert!(matches!(err, AccessError::NotInWorkspace { .. }), "{err}");
    let err = apply(&mut access, set(DEFAULT_WORKSPACE, Some("nope")), 11).unwrap_err();
    assert!(matches!(err, AccessError::NotInWorkspace { .. }), "{err}");
    let err = apply(&mut access, set("vision", Some("vision-gpu")), 11).unwrap_err();
    assert!(matches!(err, AccessError::UnknownWorkspace(_)), "{err}");
    assert_eq!(access.serverless, before.serverless);
    apply(
        &mut access,
        AccessChange::CreateWorkspace {
            name: "vision".into(),
        },
        12,
    )
    .unwrap();
    apply(&mut access, set("vision", Some("vision-gpu")), 13).unwrap();
    apply(&mut access, set(DEFAULT_WORKSPACE, None), 14).unwrap();
    assert_eq!(
        access.serverless.keys().collect::<Vec<_>>(),
        [&"vision".to_string()]
    );
    assert!(
        access
            .audit
            .iter()
            .any(|e| e.action == "workspace.serverless"),
        "audited"
    );
}
