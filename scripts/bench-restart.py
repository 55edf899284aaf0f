#!/usr/bin/env python3
"""Crash-safe mode: how long a gateway takes to rebuild its core at start, from the
latest snapshot plus the records after it, and from the whole stream, on one stream
in one script run.

A gateway (pinned to core 0, with one nats-server) takes load from the load client
(core 1) with a snapshot every --snapshot-every records and the stream kept whole;
then it is started again --rounds times as it is (snapshot + the records after it)
and --rounds times with its snapshots deleted (the whole stream). Each start's
figures come from its own log line "core rebuilt from the stream". Also prints what
storing the snapshots cost (encode time, size, time to store). Needs a release build
(cargo build --release -p gateway -p loadtest) and nats-server (scripts/test.sh
installs it).

    scripts/bench-restart.py --snapshot-every 100000 --rate 8000 --duration 25s
"""
import argparse, json, os, shutil, signal, socket, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import start_nats  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GATEWAY = os.path.join(ROOT, 'target/release/gateway')
LOADTEST = os.path.join(ROOT, 'target/release/loadtest')
NATS_PORT = 14310
STREAM = 'BENCH_RESTART'


def nats_request(subject):
    """One JetStream API request over the plain NATS protocol; returns the answer."""
    with socket.create_connection(('127.0.0.1', NATS_PORT), timeout=5) as s:
        s.recv(4096)  # INFO
        s.sendall(b'CONNECT {"verbose":false}\r\nSUB _INBOX.bench 1\r\n'
                  + f'PUB {subject} _INBOX.bench 0\r\n\r\nPING\r\n'.encode())
        answer = b''
        while b'MSG _INBOX.bench' not in answer or not answer.endswith(b'\r\n'):
            answer += s.recv(65536)
        return answer.decode(errors='replace')


def gateway(dev, snapshot_every, log):
    return subprocess.Popen(
        ['taskset', '-c', '0', GATEWAY, '--listen', '127.0.0.1:4510',
         '--set', 'demo_accounts=16', '--set', 'admin.listen=127.0.0.1:0',
         '--set', f'dev_dir={dev}', '--set', 'log.format=json',
         '--set', 'sequencer.mode=jetstream',
         '--set', f'sequencer.nats_url=nats://127.0.0.1:{NATS_PORT}',
         '--set', f'sequencer.stream={STREAM}',
         '--set', f'sequencer.snapshot_every={snapshot_every}',
         '--set', 'sequencer.purge_after_snapshot=false'],
        stdout=log, stderr=subprocess.STDOUT)


def events(log_path, message):
    with open(log_path) as f:
        for line in f:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get('fields', {}).get('message') == message:
                yield event['fields']


def start_and_stop(work, dev, snapshot_every, name):
    """Starts a gateway, waits for its core to be rebuilt, stops it; the rebuild."""
    log_path = os.path.join(work, f'{name}.log')
    with open(log_path, 'w') as log:
        process = gateway(dev, snapshot_every, log)
        deadline = time.time() + 120
        while time.time() < deadline and not list(events(log_path, 'core rebuilt from the stream')):
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        process.wait()
    rebuilt = list(events(log_path, 'core rebuilt from the stream'))
    if not rebuilt:
        sys.exit(f'{name}: the gateway did not start; see {log_path}')
    return rebuilt[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--snapshot-every', type=int, default=100_000)
    parser.add_argument('--rate', type=int, default=8000)
    parser.add_argument('--duration', default='25s')
    parser.add_argument('--rounds', type=int, default=3)
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix='bench-restart-')
    dev = os.path.join(work, 'dev')
    nats = start_nats(work, NATS_PORT, False)
    try:
        load_log = os.path.join(work, 'load.log')
        with open(load_log, 'w') as log:
            server = gateway(dev, args.snapshot_every, log)
            time.sleep(1.5)
            subprocess.run(['taskset', '-c', '1', LOADTEST, '--gateway', '127.0.0.1:4510',
                            '--cert', os.path.join(dev, 'cert.der'),
                            '--keys', os.path.join(dev, 'client-keys.toml'),
                            '--sessions', '16', '--rate', str(args.rate),
                            '--duration', args.duration, '--replay', '0', '--quiet'],
                           check=True, stdout=subprocess.DEVNULL)
            time.sleep(1)
            server.send_signal(signal.SIGTERM)
            server.wait()
        for stored in events(load_log, 'core snapshot stored'):
            print(f"snapshot at {stored['position']:>8}: {int(stored['bytes']) / 1e6:6.1f} MB,"
                  f" encoded in {int(stored['encode_us']) / 1000:6.1f} ms (the core waits),"
                  f" stored {stored['store_ms']} ms after")
        for round_ in range(args.rounds):
            rebuilt = start_and_stop(work, dev, args.snapshot_every, f'snapshot-{round_}')
            print(f"start from the snapshot at {rebuilt['snapshot']:>8} + {rebuilt['records']:>7}"
                  f" records: {rebuilt['elapsed_ms']:>5} ms (snapshot read and restored after"
                  f" {rebuilt['restored_ms']} ms)")
        nats_request(f'$JS.API.STREAM.DELETE.OBJ_{STREAM}_snapshots')
        for round_ in range(args.rounds):
            rebuilt = start_and_stop(work, dev, 0, f'whole-{round_}')
            print(f"start from the whole stream, {rebuilt['records']:>7} records:"
                  f" {rebuilt['elapsed_ms']:>5} ms")
    finally:
        nats.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
