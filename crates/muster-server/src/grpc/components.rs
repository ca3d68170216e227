//! ComponentService: register, show and list a workspace's command components. Users of
//! the workspace register them (the code snapshot whole and on a majority first); its
//! readers see them.

use std::sync::Arc;

use muster_core::Command;
use muster_core::access::Role;
use muster_proto::v1::{self, component_service_server::ComponentService};
use tonic::{Request, Response, Status};

use crate::coordinator::now_ms;
use crate::grpc::access::workspace_or_default;
use crate::grpc::auth::Caller;
use crate::grpc::check_code;
use crate::server::Server;

pub(crate) struct Components(pub Arc<Server>);

fn to_wire(c: &muster_core::data::Component) -> v1::Component {
    v1::Component {
        name: c.name.clone(),
        version: c.version.clone(),
        workspace: c.workspace.clone(),
        yaml: c.yaml.clone(),
        code: c.code.clone(),
        created_at_ms: c.created_at,
        created_by: c.created_by.clone(),
    }
}

fn not_found(workspace: &str, name: &str, version: Option<&str>) -> Status {
    Status::not_found(format!(
        "component {name}{} does not exist in workspace {workspace:?}: list them with `muster component list`",
        version.map(|v| format!(":{v}")).unwrap_or_default()
    ))
}

#[tonic::async_trait]
impl ComponentService for Components {
    async fn create_component(
        &self,
        req: Request<v1::CreateComponentRequest>,
    ) -> Result<Response<v1::Component>, Status> {
        let caller = Caller::of(&req);
        let wire = req
            .into_inner()
            .component
            .ok_or_else(|| Status::invalid_argument("component: missing"))?;
        let component = muster_core::data::Component {
            name: wire.name.trim().to_string(),
            version: wire.version.trim().to_string(),
            workspace: workspace_or_default(&wire.workspace),
            yaml: wire.yaml,
            code: wire.code,
            created_at: now_ms(),
            created_by: caller.label(),
        };
        caller.require(
            &self.0,
            &component.workspace,
            Role::User,
            &format!("workspace {:?}", component.workspace),
        )?;
        component
            .validate()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Some(manifest) = &component.code {
            let code = muster_core::spec::CodeRef::stored(manifest);
            check_code(&self.0, "code", &code).await?;
        }
        let shown = to_wire(&component);
        self.0
            .coordinator
            .propose(Command::CreateComponent {
                component: Box::new(component),
            })
            .await?;
        Ok(Response::new(shown))
    }

    async fn get_component(
        &self,
        req: Request<v1::GetComponentRequest>,
    ) -> Result<Response<v1::Component>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        let workspace = workspace_or_default(&req.workspace);
        // Another workspace's component is as unknown as one that does not exist.
        caller
            .require(
                &self.0,
                &workspace,
                Role::Reader,
                &format!("workspace {workspace:?}"),
            )
            .map_err(|_| not_found(&workspace, &req.name, req.version.as_deref()))?;
        self.0
            .coordinator
            .read(|s| {
                s.component(&workspace, &req.name, req.version.as_deref())
                    .map(to_wire)
            })
            .map(Response::new)
            .ok_or_else(|| not_found(&workspace, &req.name, req.version.as_deref()))
    }

    async fn list_components(
        &self,
        req: Request<v1::ListComponentsRequest>,
    ) -> Result<Response<v1::ListComponentsResponse>, Status> {
        let caller = Caller::of(&req);
        let requested = req.into_inner().workspace;
        let readable =
            caller.readable(&self.0, Some(requested.as_str()).filter(|w| !w.is_empty()))?;
        let components = self.0.coordinator.read(|s| {
            s.components
                .values()
                .flatten()
                .filter(|c| readable.contains(&c.workspace))
                .map(to_wire)
                .collect()
        });
        Ok(Response::new(v1::ListComponentsResponse { components }))
    }
}
