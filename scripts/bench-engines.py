#!/usr/bin/env python3
"""Engines on the log against the engine inside every gateway, in one script run:
order->answer latency at a fixed rate and capacity (no schedule, a small window), with
the engine inline in the gateways, one engine on the log, and two hot-hot, on one NATS
server (R1) and on three (R3); then the time from an engine's SIGKILL to answers
flowing again, with one engine and with two.

Each measurement is one `loadtest --cluster 2` run (two crash-safe gateways behind
the load tester's balancer, its own NATS servers and engines, processes unpinned), so
the figures include the balancer's hop. Needs a release build (cargo build --release
-p gateway -p loadtest -p matching-stub-process) and nats-server on PATH
(scripts/test.sh installs it into target/tools/nats).

    scripts/bench-engines.py [--rate 5000] [--duration 10s] [--rounds 1]
"""
import argparse, json, os, subprocess, sys, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADTEST = os.path.join(ROOT, 'target/release/loadtest')


def run(args, extra):
    """One loadtest run; its JSON report."""
    with tempfile.NamedTemporaryFile(suffix='.json', delete=False) as out:
        path = out.name
    command = [LOADTEST, '--cluster', '2', '--quiet', '--json', path,
               '--sessions', str(args.sessions), '--duration', args.duration] + extra
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        sys.exit(f'{" ".join(command)} failed:\n{done.stdout}')
    with open(path) as file:
        report = json.load(file)
    os.unlink(path)
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--rate', type=int, default=5000)
    parser.add_argument('--sessions', type=int, default=16)
    parser.add_argument('--duration', default='10s')
    parser.add_argument('--rounds', type=int, default=1)
    args = parser.parse_args()

    modes = [('inline', []), ('1 external', ['--engines', '1']), ('2 hot-hot', ['--engines', '2'])]
    rows = []
    for round_ in range(args.rounds):
        for servers in (1, 3):
            for name, engines in modes:
                nats = ['--nats-servers', str(servers)]
                latency = run(args, nats + engines + ['--rate', str(args.rate)])
                capacity = run(args, nats + engines + ['--rate', '0', '--window', '8'])
                lat = latency['ack_latency_us']
                rows.append((round_, f'R{servers}', name, lat['p50'] / 1e3, lat['p99'] / 1e3,
                             capacity['throughput_orders_per_s'],
                             latency['violations'] + capacity['violations']))
                print(f'round {round_} R{servers} {name:10}: p50 {lat["p50"] / 1e3:.2f} ms, '
                      f'p99 {lat["p99"] / 1e3:.2f} ms at {args.rate}/s; capacity '
                      f'{capacity["throughput_orders_per_s"]:.0f}/s; violations '
                      f'{latency["violations"] + capacity["violations"]}', flush=True)
    for engines in ('1', '2'):
        report = run(args, ['--nats-servers', '1', '--engines', engines, '--kill', 'engine',
                            '--kill-interval', '5s', '--rate', str(args.rate)])
        kills = [kill['no_answers_ms'] for kill in report['cluster']['engine_kills']]
        print(f'engine SIGKILL with {engines} engine(s), R1: no answers for '
              f'{", ".join(f"{ms:.0f} ms" for ms in kills)} (each engine down 1.5 s); '
              f'violations {report["violations"]}', flush=True)


if __name__ == '__main__':
    main()
