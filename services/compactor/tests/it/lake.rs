//! Reading a lake file's columns by range from real S3, and writing one in parts.

use polars::prelude::*;
use rand::{Rng, SeedableRng};
use tidemark_compactor::lake::{self, LakeError, Store};

async fn store() -> Store {
    let config = tidemark_testkit::s3();
    Store::new(tidemark_platform::s3::client(&config).await, config)
}

/// Orders-like columns plus a wide, poorly compressible one, so that the columns
/// read sit far from the file's footer.
fn frame(rows: usize) -> DataFrame {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let currency: Vec<&str> = (0..rows).map(|i| ["EUR", "USD", "JPY"][i % 3]).collect();
    let quantity: Vec<i32> = (0..rows).map(|_| rng.random_range(1..10)).collect();
    let price: Vec<i64> = (0..rows).map(|_| rng.random_range(1..1_000_000)).collect();
    let note: Vec<String> = (0..rows)
        .map(|_| format!("{:032x}", rng.random::<u128>()))
        .collect();
    df!(
        "note" => note,
        "currency" => currency,
        "quantity" => quantity,
        "unit_price_minor" => price,
    )
    .unwrap()
}

async fn put_parquet(store: &Store, key: &str, df: &mut DataFrame, row_group: usize) {
    let mut body = Vec::new();
    ParquetWriter::new(&mut body)
        .with_compression(ParquetCompression::Zstd(None))
        .with_row_group_size(Some(row_group))
        .finish(df)
        .unwrap();
    store.put(key, body).await.unwrap();
}

#[tokio::test]
async fn ranged_reads_of_some_columns_equal_the_whole_file_across_row_groups() {
    let store = store().await;
    let columns = ["currency", "quantity", "unit_price_minor"];
    for (rows, row_group) in [(300_000, 40_000), (500, 500)] {
        let mut df = frame(rows);
        let key = format!("lake/test/{rows}.parquet");
        put_parquet(&store, &key, &mut df, row_group).await;
        let read = lake::read_columns(&store, &key, &columns).await.unwrap();
        let expected = df.select(columns).unwrap();
        assert_eq!(read.height(), rows);
        assert!(read.equals(&expected), "{rows} rows read back differ");
    }
}

#[tokio::test]
async fn a_file_that_is_not_parquet_or_lacks_a_column_is_an_error() {
    let store = store().await;
    store
        .put(
            "lake/test/text.parquet",
            b"{\"not\": \"parquet\"}\n".to_vec(),
        )
        .await
        .unwrap();
    let err = lake::read_columns(&store, "lake/test/text.parquet", &["currency"])
        .await
        .unwrap_err();
    assert!(matches!(err, LakeError::Invalid(_)), "{err}");

    put_parquet(&store, "lake/test/small.parquet", &mut frame(10), 10).await;
    let err = lake::read_columns(&store, "lake/test/small.parquet", &["city"])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no column `city`"), "{err}");
}

#[tokio::test]
async fn an_object_uploaded_in_parts_is_their_concatenation_and_an_aborted_one_is_none() {
    let store = store().await;
    // Every part but the last at least 5 MiB, as S3 requires.
    let parts: Vec<Vec<u8>> = [5 << 20, 5 << 20, 1_000]
        .iter()
        .enumerate()
        .map(|(i, len)| (0..*len).map(|b| (b % 251 + i) as u8).collect())
        .collect();
    let mut upload = store.start_upload("lake/test/parts.parquet").await.unwrap();
    for part in &parts {
        store.upload_part(&mut upload, part.clone()).await.unwrap();
    }
    assert_eq!(upload.bytes, (10 << 20) + 1_000);
    assert!(
        store.get("lake/test/parts.parquet").await.is_err(),
        "nothing is visible before the upload completes"
    );
    store.complete(upload).await.unwrap();
    let read = store.get("lake/test/parts.parquet").await.unwrap();
    assert_eq!(read.as_ref(), parts.concat().as_slice());

    let mut upload = store
        .start_upload("lake/test/aborted.parquet")
        .await
        .unwrap();
    store
        .upload_part(&mut upload, parts[0].clone())
        .await
        .unwrap();
    store.abort(upload).await.unwrap();
    assert!(store.get("lake/test/aborted.parquet").await.is_err());
    assert!(store.list("lake/test/aborted").await.unwrap().is_empty());
}
