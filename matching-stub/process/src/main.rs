//! `matching-stub`: the bundled price-time matching engine as its own process on the
//! gateways' log (ENGINE.md), for gateways with `engine.mode = "external"`.
//!
//! It reads the batches of requests the gateways publish to `<stream>_requests`, in
//! order, handles each request with the book, and appends its answers to the
//! gateways' stream on `<stream>.answers`: everything it handled while its
//! previous answers were being stored goes out as one message. Now and then it
//! writes a checkpoint (the book and the last batch it answered, once the stream
//! stored that answer), and a restart reads on from there. Two or more may run
//! side by side (hot-hot): the gateways apply the first answer to each batch and
//! compare the others with it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use async_nats::jetstream::{self, consumer, stream};
use clap::Parser;
use futures_util::StreamExt;
use matching_stub::wire::{self, BatchAnswer, RequestBatch};
use matching_stub::{EngineConfig, Instrument, MatchingEngine, OrderBookEngine};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// The bundled matching engine on the gateways' log.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The NATS server (the gateways' `sequencer.nats_url`); the servers of a
    /// cluster separated by commas. A user and password go in the URL.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// The gateways' log (their `sequencer.stream`).
    #[arg(long, default_value = "GATEWAY_IN")]
    stream: String,
    /// This engine's name, in its answers (1 to 64 printable ASCII characters):
    /// each engine of a venue has its own.
    #[arg(long, default_value = "matching-stub")]
    name: String,
    /// The checkpoint file: read at the start (if it is there), written every
    /// `--checkpoint-every` batches. Without one, the engine reads the requests
    /// stream from its first batch.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Batches between checkpoints.
    #[arg(long, default_value_t = 10_000)]
    checkpoint_every: u64,
    /// An instrument, `ID:TICK_SIZE:LOT_SIZE`; repeat for more (the gateways'
    /// default instruments when none is given).
    #[arg(long = "instrument", value_parser = instrument)]
    instruments: Vec<Instrument>,
    /// Finished orders kept per account for order queries.
    #[arg(long, default_value_t = 1_024)]
    finished_orders_per_account: usize,
    /// Most working orders of one account; beyond, new orders are rejected.
    #[arg(long, default_value_t = 50_000)]
    max_working_orders_per_account: usize,
}

fn instrument(text: &str) -> Result<Instrument, String> {
    let parts: Vec<&str> = text.split(':').collect();
    let [id, tick, lot] = parts.as_slice() else {
        return Err("expected ID:TICK_SIZE:LOT_SIZE".into());
    };
    let number = |part: &str| part.parse::<u64>().map_err(|e| format!("{part}: {e}"));
    Ok(Instrument {
        id: u32::try_from(number(id)?).map_err(|e| e.to_string())?,
        tick_size: i64::try_from(number(tick)?).map_err(|e| e.to_string())?,
        lot_size: number(lot)?,
    })
}

/// Largest answers message the engine sends.
const ANSWERS_LIMIT: usize = wire::MAX_MESSAGE_LEN;

/// Batch answers waiting for the publisher before the reader waits.
const ANSWERS_QUEUED: usize = 4_096;

/// Quiet this long, the read checks whether the stream has batches it missed.
const READ_STALL: Duration = Duration::from_millis(500);

/// Longest wait for NATS to answer a request.
const NATS_PATIENCE: Duration = Duration::from_secs(2);

/// Wait before trying again after a failed attempt.
const RETRY_AFTER: Duration = Duration::from_millis(100);

/// The version of the checkpoint file.
const CHECKPOINT_FORMAT: u32 = 1;

/// What a checkpoint holds: the book after the batch it names.
#[derive(Debug, Serialize, Deserialize)]
struct Checkpoint {
    format: u32,
    batch: u64,
    book: OrderBookEngine,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("matching-stub: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let name = args.name.clone();
    if name.is_empty()
        || name.len() > wire::MAX_ENGINE_NAME_LEN
        || !name.bytes().all(|b| b.is_ascii_graphic())
    {
        bail!("--name must be 1 to 64 printable ASCII characters, no spaces");
    }
    let instruments = if args.instruments.is_empty() {
        vec![
            Instrument {
                id: 1,
                tick_size: 1,
                lot_size: 1,
            },
            Instrument {
                id: 2,
                tick_size: 5,
                lot_size: 10,
            },
        ]
    } else {
        args.instruments.clone()
    };
    let config = EngineConfig {
        instruments,
        finished_orders_per_account: args.finished_orders_per_account,
        max_working_orders_per_account: args.max_working_orders_per_account,
    };
    let (mut book, mut answered) = match &args.checkpoint {
        Some(path) if path.exists() => {
            let checkpoint = load_checkpoint(path)?;
            let mut book = checkpoint.book;
            book.reconfigure(&config)
                .map_err(|e| anyhow::anyhow!("the instruments against the checkpoint: {e}"))?;
            info!(batch = checkpoint.batch, path = %path.display(), "checkpoint read");
            (book, checkpoint.batch)
        }
        _ => (
            OrderBookEngine::new(config).map_err(|e| anyhow::anyhow!("the instruments: {e}"))?,
            0,
        ),
    };

    let urls: Vec<&str> = args.nats.split(',').map(str::trim).collect();
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .request_timeout(Some(NATS_PATIENCE))
        .connect(urls)
        .await
        .with_context(|| format!("connecting to NATS at {}", args.nats))?;
    let context = jetstream::new(client);
    let requests_name = format!("{}_requests", args.stream);
    let mut waited = Instant::now();
    let stream = loop {
        match context.get_stream(&requests_name).await {
            Ok(stream) => break stream,
            Err(error) => {
                if waited.elapsed() > Duration::from_secs(5) {
                    info!(%error, stream = requests_name, "waiting for the gateways to make the requests stream");
                    waited = Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    info!(
        engine = name,
        requests = requests_name,
        after = answered,
        "reading the requests"
    );

    let confirmed = Arc::new(AtomicU64::new(answered));
    let (answers, queued) = mpsc::channel(ANSWERS_QUEUED);
    let publisher = tokio::spawn(publish_answers(
        context.clone(),
        format!("{}.answers", args.stream),
        name.clone(),
        queued,
        Arc::clone(&confirmed),
    ));
    let mut pending_checkpoint: Option<(u64, OrderBookEngine)> = None;
    let mut since_checkpoint = 0u64;
    loop {
        let mut messages = match read_from(&stream, answered + 1).await {
            Ok(messages) => messages,
            Err(error) => {
                warn!(%error, after = answered, "cannot read the requests stream; trying again");
                tokio::time::sleep(RETRY_AFTER).await;
                continue;
            }
        };
        loop {
            if let Some((batch, _)) = &pending_checkpoint {
                if confirmed.load(Ordering::Relaxed) >= *batch {
                    if let (Some(path), Some((batch, book))) =
                        (&args.checkpoint, pending_checkpoint.take())
                    {
                        save_checkpoint(path, batch, book)?;
                    }
                }
            }
            let message = match tokio::time::timeout(READ_STALL, messages.next()).await {
                Ok(Some(Ok(message))) => message,
                Ok(Some(Err(error))) => {
                    warn!(%error, after = answered, "reading the requests failed; reading on");
                    break;
                }
                Ok(None) => break,
                Err(_quiet) => {
                    if publisher.is_finished() {
                        bail!("the answers publisher stopped");
                    }
                    if stream_has_more(&stream, answered).await {
                        warn!(
                            after = answered,
                            "the read of the requests stalled; reading again"
                        );
                        break;
                    }
                    continue;
                }
            };
            let Ok(info) = message.info() else {
                break;
            };
            let number = info.stream_sequence;
            if number <= answered {
                continue;
            }
            if number != answered + 1 {
                bail!(
                    "batches {} to {} are gone from {requests_name}: keep requests longer than \
                     the engine's checkpoint is old (or start it without its checkpoint)",
                    answered + 1,
                    number - 1
                );
            }
            let batch = RequestBatch::decode(&message.payload)
                .with_context(|| format!("batch {number} of {requests_name}"))?;
            let mut events = Vec::with_capacity(batch.requests.len());
            for request in batch.requests {
                let mut caused = Vec::new();
                book.handle(request, &mut caused);
                events.push(caused);
            }
            let answer = BatchAnswer {
                batch: number,
                first_request: batch.first_request,
                events,
            };
            if answers.send(answer).await.is_err() {
                bail!("the answers publisher stopped");
            }
            answered = number;
            since_checkpoint += 1;
            if args.checkpoint.is_some()
                && since_checkpoint >= args.checkpoint_every
                && pending_checkpoint.is_none()
            {
                pending_checkpoint = Some((number, book.clone()));
                since_checkpoint = 0;
            }
        }
    }
}

/// An ordered read of the requests stream from batch `first` on.
async fn read_from(stream: &stream::Stream, first: u64) -> anyhow::Result<consumer::pull::Ordered> {
    let deliver_policy = if first <= 1 {
        consumer::DeliverPolicy::All
    } else {
        consumer::DeliverPolicy::ByStartSequence {
            start_sequence: first,
        }
    };
    let consumer = tokio::time::timeout(
        NATS_PATIENCE,
        stream.create_consumer(consumer::pull::OrderedConfig {
            deliver_policy,
            ..Default::default()
        }),
    )
    .await??;
    Ok(tokio::time::timeout(NATS_PATIENCE, consumer.messages()).await??)
}

/// Whether the stream holds batches after `answered` (a quiet read missed them).
async fn stream_has_more(stream: &stream::Stream, answered: u64) -> bool {
    let mut stream = stream.clone();
    matches!(
        tokio::time::timeout(NATS_PATIENCE, stream.info()).await,
        Ok(Ok(info)) if info.state.last_sequence > answered
    )
}

/// Appends the answers to the gateways' stream, in order: one message of every
/// answer queued while the previous message was being stored, sent again under
/// its message id until the stream stores it. `confirmed` is the last batch whose
/// answer is stored.
async fn publish_answers(
    context: jetstream::Context,
    subject: String,
    name: String,
    mut queued: mpsc::Receiver<BatchAnswer>,
    confirmed: Arc<AtomicU64>,
) {
    let header = wire::answers_header_len(&name);
    let mut carried: Option<Vec<u8>> = None;
    let mut carried_batch = 0;
    loop {
        let (first_batch, first) = match carried.take() {
            Some(bytes) => (carried_batch, bytes),
            None => match queued.recv().await {
                Some(answer) => (answer.batch, answer.encode()),
                None => return,
            },
        };
        let mut last_batch = first_batch;
        let mut size = header + first.len();
        let mut batches = vec![first];
        while let Ok(answer) = queued.try_recv() {
            let bytes = answer.encode();
            if size + bytes.len() > ANSWERS_LIMIT {
                carried = Some(bytes);
                carried_batch = answer.batch;
                break;
            }
            size += bytes.len();
            last_batch = answer.batch;
            batches.push(bytes);
        }
        if size > ANSWERS_LIMIT {
            tracing::error!(
                batch = first_batch,
                bytes = size,
                "the answer to one batch is larger than a NATS message: it cannot be sent"
            );
            std::process::exit(2);
        }
        let message = bytes::Bytes::from(wire::encode_answers(&name, &batches));
        let id = format!("{name}:{first_batch}:{last_batch}");
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let publish = jetstream::message::PublishMessage::build()
                .payload(message.clone())
                .message_id(&id);
            let stored = async {
                let ack = context.send_publish(subject.clone(), publish).await?;
                let ack = std::future::IntoFuture::into_future(ack);
                anyhow::Ok(tokio::time::timeout(NATS_PATIENCE, ack).await??)
            };
            match stored.await {
                Ok(_) => break,
                Err(error) => {
                    if attempts % 20 == 1 {
                        warn!(%error, batches = id, "the gateways' stream did not take answers yet; sending them again");
                    }
                    tokio::time::sleep(RETRY_AFTER).await;
                }
            }
        }
        confirmed.store(last_batch, Ordering::Relaxed);
    }
}

fn load_checkpoint(path: &Path) -> anyhow::Result<Checkpoint> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("reading the checkpoint {}", path.display()))?;
    let checkpoint: Checkpoint = postcard::from_bytes(&bytes)
        .with_context(|| format!("decoding the checkpoint {}", path.display()))?;
    if checkpoint.format != CHECKPOINT_FORMAT {
        bail!(
            "the checkpoint {} is of format {}, this engine reads format {CHECKPOINT_FORMAT}",
            path.display(),
            checkpoint.format
        );
    }
    Ok(checkpoint)
}

/// Writes the checkpoint beside its place, syncs it, then moves it there: a crash
/// leaves the old one or the new one.
fn save_checkpoint(path: &Path, batch: u64, book: OrderBookEngine) -> anyhow::Result<()> {
    use std::io::Write as _;
    let checkpoint = Checkpoint {
        format: CHECKPOINT_FORMAT,
        batch,
        book,
    };
    let bytes = postcard::to_stdvec(&checkpoint).context("encoding the checkpoint")?;
    let partial = path.with_extension("partial");
    let mut file = std::fs::File::create(&partial)
        .with_context(|| format!("writing the checkpoint {}", partial.display()))?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    std::fs::rename(&partial, path)
        .with_context(|| format!("moving the checkpoint to {}", path.display()))?;
    info!(batch, bytes = bytes.len(), "checkpoint written");
    Ok(())
}
