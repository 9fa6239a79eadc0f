#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! The test S3 server does what capy's backups rely on: multipart uploads through
//! `object_store`'s BufWriter (read back whole), presigned GETs, and an aborted
//! multipart upload that leaves no object behind.

use std::time::Duration;

use object_store::buffered::BufWriter;
use object_store::path::Path;
use object_store::ObjectStore as _;
use sha2::Digest as _;
use tokio::io::AsyncWriteExt as _;

const MIB: usize = 1024 * 1024;

#[tokio::test]
async fn multipart_uploads_read_back_and_presigned_urls_download() {
    let s3 = capy_testkit::s3().unwrap();
    let prefix = format!("t-{}", uuid::Uuid::new_v4().simple());
    let store = s3.store(&prefix).unwrap();
    let key = "projects/p/backups/b.dump";
    // 12 MiB in 5 MiB parts (S3's smallest but the last): three parts.
    let data: Vec<u8> = (0..12 * MIB).map(|i| (i % 251) as u8).collect();
    let mut writer =
        BufWriter::with_capacity(store.object_store().clone(), store.path(key), 5 * MIB);
    for chunk in data.chunks(MIB) {
        writer.write_all(chunk).await.unwrap();
    }
    writer.shutdown().await.unwrap();

    let read = store.object_store().get(&store.path(key)).await.unwrap();
    assert_eq!(read.meta.size, data.len() as u64);
    assert_eq!(read.bytes().await.unwrap().as_ref(), data.as_slice());
    assert_eq!(
        s3.list(&prefix).await.unwrap(),
        vec![format!("{prefix}/{key}")]
    );
    assert_eq!(
        s3.get(&format!("{prefix}/{key}"))
            .await
            .unwrap()
            .unwrap()
            .len(),
        data.len()
    );

    let url = store
        .signed_url(key, Duration::from_secs(60))
        .await
        .unwrap()
        .expect("an S3 store signs URLs");
    assert!(
        url.query().unwrap_or_default().contains("X-Amz-Signature"),
        "{url}"
    );
    let response = reqwest::get(url.as_str()).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.bytes().await.unwrap();
    assert_eq!(
        hex::encode(sha2::Sha256::digest(&body)),
        hex::encode(sha2::Sha256::digest(&data))
    );
    assert!(s3
        .pending_uploads()
        .unwrap()
        .iter()
        .all(|k| !k.starts_with(&prefix)));
}

#[tokio::test]
async fn an_aborted_multipart_upload_leaves_no_object() {
    let s3 = capy_testkit::s3().unwrap();
    let prefix = format!("t-{}", uuid::Uuid::new_v4().simple());
    let store = s3.store(&prefix).unwrap();
    let path: Path = store.path("projects/p/backups/aborted.dump");
    let mut upload = store.object_store().put_multipart(&path).await.unwrap();
    upload.put_part(vec![7u8; 5 * MIB].into()).await.unwrap();
    upload.put_part(vec![8u8; MIB].into()).await.unwrap();
    // Begun and not completed: listed as pending, not as an object.
    let pending = s3.pending_uploads().unwrap();
    assert!(pending.contains(&path.to_string()), "{pending:?}");
    assert!(s3.list(&prefix).await.unwrap().is_empty());
    upload.abort().await.unwrap();

    assert!(matches!(
        store.object_store().head(&path).await,
        Err(object_store::Error::NotFound { .. })
    ));
    assert!(s3.list(&prefix).await.unwrap().is_empty());
    assert!(!s3.pending_uploads().unwrap().contains(&path.to_string()));
    assert!(s3.get(path.as_ref()).await.unwrap().is_none());
}
