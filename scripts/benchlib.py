"""What the benchmark scripts share: nats-server processes pinned to core 0, a
process's CPU time, waiting for an HTTP endpoint."""
import os, shutil, subprocess, time
import urllib.request


def cpu_us(pid):
    """The CPU time process `pid` used so far, microseconds."""
    fields = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1e6 / os.sysconf('SC_CLK_TCK')


def nats_program():
    """The nats-server program: on PATH, else where pip --user puts it."""
    return shutil.which('nats-server') or os.path.expanduser('~/.local/bin/nats-server')


def start_nats(work, port, always):
    """One nats-server with JetStream on `port`, storing under `work`; with
    `always`, each acknowledgement waits for the disk (sync_interval: always)."""
    store = os.path.join(work, f'nats-{port}')
    conf = os.path.join(work, f'nats-{port}.conf')
    sync = ', sync_interval: always' if always else ''
    with open(conf, 'w') as f:
        f.write(f'listen: 127.0.0.1:{port}\njetstream {{ store_dir: "{store}"{sync} }}\n')
    process = subprocess.Popen(['taskset', '-c', '0', nats_program(), '-c', conf],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    return process


def start_nats_cluster(work, ports):
    """Three nats-server processes routed into one JetStream cluster, on `ports`
    (client port p, route port p + 100, monitor port p + 200), once JetStream is ready
    on each."""
    program = nats_program()
    routes = ', '.join(f'nats-route://127.0.0.1:{port + 100}' for port in ports)
    processes = []
    for nth, port in enumerate(ports):
        store = os.path.join(work, f'nats-{port}')
        conf = os.path.join(work, f'nats-{port}.conf')
        with open(conf, 'w') as f:
            f.write(f'server_name: bench-{nth}\nlisten: 127.0.0.1:{port}\n'
                    f'http: 127.0.0.1:{port + 200}\n'
                    f'jetstream {{ store_dir: "{store}" }}\n'
                    f'cluster {{ name: bench, listen: 127.0.0.1:{port + 100}, routes: [{routes}] }}\n')
        processes.append(subprocess.Popen(['taskset', '-c', '0', program, '-c', conf],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for port in ports:
        wait_for(f'http://127.0.0.1:{port + 200}/healthz')
    return processes


def wait_for(url, patience=30):
    """Waits until `url` answers 200."""
    deadline = time.time() + patience
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(url, timeout=1).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f'{url} did not answer 200 within {patience} s')
