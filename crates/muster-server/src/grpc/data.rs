//! DataService: make, show and list a workspace's data assets. Users of the workspace make
//! them (an uploaded snapshot must be whole and on a majority first, like a run's code);
//! its readers see them.

use std::sync::Arc;

use muster_core::Command;
use muster_core::access::Role;
use muster_proto::v1::{self, data_service_server::DataService};
use muster_proto::{data_asset_from_wire, data_asset_to_wire};
use tonic::{Request, Response, Status};

use crate::coordinator::now_ms;
use crate::grpc::access::workspace_or_default;
use crate::grpc::auth::Caller;
use crate::grpc::check_code;
use crate::server::Server;

pub(crate) struct Data(pub Arc<Server>);

fn not_found(workspace: &str, name: &str, version: Option<&str>) -> Status {
    Status::not_found(format!(
        "data asset {name}{} does not exist in workspace {workspace:?}: list them with `muster data list`",
        version.map(|v| format!(":{v}")).unwrap_or_default()
    ))
}

#[tonic::async_trait]
impl DataService for Data {
    async fn create_data(
        &self,
        req: Request<v1::CreateDataRequest>,
    ) -> Result<Response<v1::DataAsset>, Status> {
        let caller = Caller::of(&req);
        let wire = req
            .into_inner()
            .asset
            .ok_or_else(|| Status::invalid_argument("asset: missing"))?;
        let asset = data_asset_from_wire(&wire, now_ms(), &caller.label())
            .map_err(Status::invalid_argument)?;
        caller.require(
            &self.0,
            &asset.workspace,
            Role::User,
            &format!("workspace {:?}", asset.workspace),
        )?;
        asset
            .validate()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let muster_core::data::DataSource::Snapshot { manifest, .. } = &asset.source {
            let stored = muster_core::spec::CodeRef::stored(manifest);
            check_code(&self.0, "path", &stored).await?;
        }
        let shown = data_asset_to_wire(&asset);
        self.0
            .coordinator
            .propose(Command::CreateDataAsset {
                asset: Box::new(asset),
            })
            .await?;
        Ok(Response::new(shown))
    }

    async fn get_data(
        &self,
        req: Request<v1::GetDataRequest>,
    ) -> Result<Response<v1::DataAsset>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        let workspace = workspace_or_default(&req.workspace);
        // Another workspace's asset is as unknown as one that does not exist.
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
                s.data_asset(&workspace, &req.name, req.version.as_deref())
                    .map(data_asset_to_wire)
            })
            .map(Response::new)
            .ok_or_else(|| not_found(&workspace, &req.name, req.version.as_deref()))
    }

    async fn list_data(
        &self,
        req: Request<v1::ListDataRequest>,
    ) -> Result<Response<v1::ListDataResponse>, Status> {
        let caller = Caller::of(&req);
        let requested = req.into_inner().workspace;
        let readable =
            caller.readable(&self.0, Some(requested.as_str()).filter(|w| !w.is_empty()))?;
        let assets = self.0.coordinator.read(|s| {
            s.data_assets
                .values()
                .flatten()
                .filter(|a| readable.contains(&a.workspace))
                .map(data_asset_to_wire)
                .collect()
        });
        Ok(Response::new(v1::ListDataResponse { assets }))
    }

    async fn create_datastore(
        &self,
        req: Request<v1::CreateDatastoreRequest>,
    ) -> Result<Response<v1::Datastore>, Status> {
        let caller = Caller::of(&req);
        let wire = req
            .into_inner()
            .datastore
            .ok_or_else(|| Status::invalid_argument("datastore: missing"))?;
        let store = muster_core::data::Datastore {
            name: wire.name.trim().to_string(),
            workspace: workspace_or_default(&wire.workspace),
            path: wire.path.trim().to_string(),
            created_at: now_ms(),
            created_by: caller.label(),
        };
        // A datastore mounts a host folder into runs: the workspace's operators choose it.
        caller.require(
            &self.0,
            &store.workspace,
            Role::Operator,
            &format!("workspace {:?}", store.workspace),
        )?;
        store
            .validate()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let shown = datastore_to_wire(&store);
        self.0
            .coordinator
            .propose(Command::CreateDatastore { store })
            .await?;
        Ok(Response::new(shown))
    }

    async fn list_datastores(
        &self,
        req: Request<v1::ListDatastoresRequest>,
    ) -> Result<Response<v1::ListDatastoresResponse>, Status> {
        let caller = Caller::of(&req);
        let requested = req.into_inner().workspace;
        let readable =
            caller.readable(&self.0, Some(requested.as_str()).filter(|w| !w.is_empty()))?;
        let datastores = self.0.coordinator.read(|s| {
            s.datastores
                .values()
                .filter(|d| readable.contains(&d.workspace))
                .map(datastore_to_wire)
                .collect()
        });
        Ok(Response::new(v1::ListDatastoresResponse { datastores }))
    }
}

fn datastore_to_wire(d: &muster_core::data::Datastore) -> v1::Datastore {
    v1::Datastore {
        name: d.name.clone(),
        workspace: d.workspace.clone(),
        path: d.path.clone(),
        created_at_ms: d.created_at,
        created_by: d.created_by.clone(),
    }
}
