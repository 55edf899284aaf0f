#!/usr/bin/env python3
"""Order->answer latency and CPU per order of the gateway in embedded mode and in
crash-safe mode (JetStream R1, with NATS's default sync_interval and with
`sync_interval: always`; and R3 on a cluster of three NATS servers), in one script
run, rounds interleaved, so that the machine's drift shows as spread rather than as a
difference between modes.

The gateway and the nats-server processes run pinned to core 0, the load client on
core 1; the gateway's and NATS's CPU time per order come from /proc. Needs a release build
(cargo build --release -p gateway -p loadtest) and nats-server (scripts/test.sh
installs it).

    scripts/bench-crash-safe.py --rate 5000 --rounds 2 [--before OLD/gateway]

--before adds an embedded run of another gateway binary (an earlier commit's), to
check the embedded mode is not slower than before.
"""
import argparse, json, os, shutil, signal, subprocess, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import cpu_us, start_nats, start_nats_cluster, wait_for  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GATEWAY = os.path.join(ROOT, 'target/release/gateway')
LOADTEST = os.path.join(ROOT, 'target/release/loadtest')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--rate', type=int, default=5000)
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--sessions', type=int, default=16)
    parser.add_argument('--duration', default='10s')
    parser.add_argument('--before', help='another gateway binary, run in embedded mode')
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix='bench-crash-safe-')
    dev = os.path.join(work, 'dev')
    nats = start_nats(work, 14300, False)
    nats_always = start_nats(work, 14301, True)
    cluster = start_nats_cluster(work, [14310, 14311, 14312])
    cluster_urls = ','.join(f'nats://127.0.0.1:{port}' for port in [14310, 14311, 14312])
    jetstream = ['--set', 'sequencer.mode=jetstream']
    modes = [('embedded', GATEWAY, [], []),
             ('jetstream R1', GATEWAY, jetstream + ['--set', 'sequencer.nats_url=nats://127.0.0.1:14300'], [nats]),
             ('jetstream R1, sync always', GATEWAY, jetstream + ['--set', 'sequencer.nats_url=nats://127.0.0.1:14301'], [nats_always]),
             ('jetstream R3, 3 servers', GATEWAY, jetstream + ['--set', f'sequencer.nats_url={cluster_urls}',
                                                              '--set', 'sequencer.replicas=3'], cluster)]
    if args.before:
        modes.insert(0, ('embedded, --before', args.before, [], []))
    try:
        for round_ in range(args.rounds):
            for index, (name, program, extra, nats_processes) in enumerate(modes):
                stream = ['--set', f'sequencer.stream=BENCH_{round_}_{index}'] if extra else []
                gateway = subprocess.Popen(
                    ['taskset', '-c', '0', program, '--listen', '127.0.0.1:4500',
                     '--set', f'demo_accounts={args.sessions}', '--set', 'admin.listen=127.0.0.1:14590',
                     '--set', f'dev_dir={dev}'] + extra + stream,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                wait_for('http://127.0.0.1:14590/readyz')
                nats_before = sum(cpu_us(p.pid) for p in nats_processes)
                report = os.path.join(work, f'{round_}-{index}.json')
                subprocess.run(['taskset', '-c', '1', LOADTEST, '--gateway', '127.0.0.1:4500',
                                '--cert', os.path.join(dev, 'cert.der'),
                                '--keys', os.path.join(dev, 'client-keys.toml'),
                                '--gateway-pid', str(gateway.pid), '--sessions', str(args.sessions),
                                '--rate', str(args.rate), '--duration', args.duration,
                                '--replay', '0', '--quiet', '--json', report],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                nats_after = sum(cpu_us(p.pid) for p in nats_processes)
                gateway.send_signal(signal.SIGTERM)
                gateway.wait()
                result = json.load(open(report))
                answers = max(result['checks']['answers'], 1)
                print(f"round {round_} {name:28} p50 {result['ack_latency_us']['p50']:8.0f} us"
                      f"  p99 {result['ack_latency_us']['p99']:8.0f} us"
                      f"  gateway {result['gateway_cpu_us_per_order']:6.1f} us/order"
                      f"  {result['gateway_context_switches_per_order']:4.2f} cs/order"
                      f"  nats {(nats_after - nats_before) / answers:6.1f} us/order"
                      f"  {result['throughput_orders_per_s']:7.0f}/s"
                      f"  violations {result['violations']}", flush=True)
    finally:
        for process in [nats, nats_always] + cluster:
            process.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
