//! `backup.delete`: removes a backup's archive and manifest from the store. An object
//! already gone counts as deleted, so a retry (or a second delete) succeeds.

use capy_shared::step::StepInput;
use capy_shared::store::BackupStore;

use super::archive::{open_store, store_error, BackupArgs};
use super::StepError;

pub async fn run(input: &StepInput) -> Result<(), StepError> {
    let args = BackupArgs::parse(&input.job.args)?;
    let store = open_store(input)?;
    for key in [args.manifest_key(), args.key.clone()] {
        delete(&store, &key).await?;
    }
    println!("backup {}: archive and manifest deleted", args.backup_id);
    Ok(())
}

async fn delete(store: &BackupStore, key: &str) -> Result<(), StepError> {
    match store.object_store().delete(&store.path(key)).await {
        Ok(()) => {
            println!("{key}: deleted");
            Ok(())
        }
        Err(object_store::Error::NotFound { .. }) => {
            println!("{key}: already gone");
            Ok(())
        }
        Err(e) => Err(store_error("deleting from the backup store", e)),
    }
}
