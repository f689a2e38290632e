"""Jobs on a remote Ray cluster, through Ray's own Jobs API (``JobSubmissionClient``).

``submit`` validates the spec here, ships it inside the Ray job's runtime_env (an environment
variable holding the resolved YAML, plus the user's ``--working-dir`` code if any) and starts
``batchgen run env:BATCHGEN_JOB_SPEC`` as the entrypoint on the head node. The submission id is
derived from the output path plus a run number, so a second submission of a job that is still
running reuses the running one's id and Ray refuses it: one driver per output.

Token authentication (Ray 2.60): the token comes from ``RAY_AUTH_TOKEN``, the file named by
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, in that order, and only ever travels in the
``Authorization`` header; it is never printed, logged or put into the job.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from batchgen.errors import BatchgenError, one_line
from batchgen.spec import JobSpec
from batchgen.spec.secrets import secret_keys

SPEC_ENV = "BATCHGEN_JOB_SPEC"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
META_OUTPUT = "batchgen_output"
META_ENDPOINT = "batchgen_endpoint_url"
META_JOB = "batchgen_job"
AGENT_WAIT_S = 60.0  # how long submit waits for a freshly started head's job agent
AGENT_POLL_S = 1.0
# What the Jobs API answers while the head has no job agent yet (Ray 2.60's job_head.py).
NO_AGENT_YET = ("No available agent", "try again later", "head node agent",
                "Head node id has not yet been persisted")


# -- connecting ------------------------------------------------------------------------------


def auth_token() -> tuple[str | None, str]:
    """(token or None, where it came from) — the same sources, in the same order, as Ray."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    source = f"RAY_AUTH_TOKEN_PATH ({path})" if path else "~/.ray/auth_token"
    path = Path(path).expanduser() if path else Path.home() / ".ray" / "auth_token"
    try:
        token = path.read_text().strip()
    except OSError:
        return None, source
    return token or None, source


def dashboard_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise BatchgenError(
            "no cluster given: pass --address http://HEAD:8265 (the Ray dashboard / Jobs API) "
            "or set RAY_ADDRESS"
        )
    return address if "://" in address else f"http://{address}"


@contextmanager
def _hidden_env(*names: str) -> Iterator[None]:
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


class Cluster:
    """A Ray cluster's Jobs API, with Ray's errors turned into messages that say what to do."""

    def __init__(self, address: str | None):
        from ray.job_submission import JobSubmissionClient

        # The SDK logs every packaging step at INFO; keep warnings about what it uploads.
        for name in ("ray", "ray.dashboard.modules.job.sdk", "ray.dashboard.modules.dashboard_sdk"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.address = dashboard_address(address)
        token, self._token_source = auth_token()
        self._had_token = token is not None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with _hidden_env("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            # Ray's SDK lets these override the address it is given: `list --address A` listed
            # the jobs of RAY_ADDRESS's cluster. The address resolved here (--address, else
            # RAY_ADDRESS) is the one used.
            self.client = self._call(lambda: JobSubmissionClient(self.address, headers=headers))

    def _call(self, fn: Callable[[], Any], job_id: str | None = None) -> Any:
        from ray.exceptions import AuthenticationError

        try:
            return fn()
        except AuthenticationError:
            if self._had_token:
                raise BatchgenError(
                    f"{self.address}: the cluster refused the token from {self._token_source}; "
                    "get the cluster's token (`ray get-auth-token` on the head node) and set "
                    "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH"
                ) from None
            raise BatchgenError(
                f"{self.address}: the cluster requires a token and none was found (looked in "
                "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH and ~/.ray/auth_token); set RAY_AUTH_TOKEN "
                "to the cluster's token (`ray get-auth-token` on the head node)"
            ) from None
        except OSError as e:  # ConnectionError, and requests' errors once connected
            raise BatchgenError(
                f"cannot reach the Ray Jobs API at {self.address}: {one_line(e)} (the head's "
                "dashboard port, 8265 by default, must be reachable)"
            ) from None
        except RuntimeError as e:
            text = str(e)
            if job_id and ("404" in text or "does not exist" in text):
                raise BatchgenError(
                    f"no job {job_id} on {self.address} (see `batchgen list --address "
                    f"{self.address}`)"
                ) from None
            raise BatchgenError(f"{self.address}: {_server_message(text)}") from None

    # -- the five verbs --------------------------------------------------------------------

    def submit(
        self,
        spec: JobSpec,
        *,
        working_dir: str | None = None,
        env: dict[str, str] | None = None,
        pip: list[str] | None = None,
        run_args: list[str] | None = None,
    ) -> str:
        runtime_env: dict[str, Any] = {"env_vars": {**(env or {}), SPEC_ENV: spec_yaml(spec)}}
        if working_dir:
            runtime_env["working_dir"] = working_dir
        if pip:
            runtime_env["pip"] = list(pip)
        entrypoint = shlex.join(["batchgen", "run", f"env:{SPEC_ENV}", "--no-progress",
                                 *(run_args or [])])
        metadata = {META_OUTPUT: spec.output.path, META_ENDPOINT: spec.storage.endpoint_url or "",
                    META_JOB: spec.name or ""}
        job_id, running = self._next_id(spec.output.path)
        deadline, waiting = time.monotonic() + AGENT_WAIT_S, False
        while True:
            try:
                return self._call(lambda: self.client.submit_job(
                    entrypoint=entrypoint, submission_id=job_id, runtime_env=runtime_env,
                    metadata=metadata))
            except BatchgenError as e:
                if "already exists" in str(e):
                    state = f"still {running}" if running else "already submitted"
                    raise BatchgenError(
                        f"{job_id} writes {spec.output.path} and is {state} on {self.address}; "
                        "Ray refused a second driver for the same output. Follow it with "
                        f"`batchgen logs {job_id} --follow`, or stop it with `batchgen stop "
                        f"{job_id}` and submit again to resume"
                    ) from None
                # A head that has just started has no job agent for a few seconds.
                if not any(s in str(e) for s in NO_AGENT_YET):
                    raise
                if time.monotonic() > deadline:
                    raise BatchgenError(
                        f"{self.address}: the cluster still has no job agent after "
                        f"{AGENT_WAIT_S:.0f}s ({e}); check the head node (`ray status` there) "
                        "and submit again"
                    ) from None
                if not waiting:
                    print("waiting for the cluster's job agent (a head that has just started "
                          "has none for a few seconds)...", file=sys.stderr, flush=True)
                    waiting = True
                time.sleep(AGENT_POLL_S)

    def _next_id(self, output: str) -> tuple[str, str | None]:
        """The id for a new run of the job writing ``output``: the running one's own id if one
        is still running (so Ray refuses the duplicate), else the next run number."""
        prefix = submission_prefix(output)
        runs = []
        for job in self.list():
            sid = job.submission_id or ""
            m = re.fullmatch(re.escape(prefix) + r"-(\d+)", sid)
            if m:
                runs.append((int(m.group(1)), sid, str(job.status)))
        for _, sid, status in sorted(runs, reverse=True):
            if _state(status) not in TERMINAL:
                return sid, _state(status)
        return f"{prefix}-{max((n for n, _, _ in runs), default=0) + 1}", None

    def info(self, job_id: str):
        return self._call(lambda: self.client.get_job_info(job_id), job_id)

    def list(self) -> list:
        return self._call(self.client.list_jobs)

    def logs(self, job_id: str) -> str:
        return self._call(lambda: self.client.get_job_logs(job_id), job_id)

    def follow(self, job_id: str) -> Iterator[str]:
        """The job's log as it grows, until the job ends."""
        self.info(job_id)  # a clear error for an unknown id before streaming starts
        agen = self.client.tail_job_logs(job_id)
        loop = asyncio.new_event_loop()
        try:
            while True:
                try:
                    chunk = loop.run_until_complete(agen.__anext__())
                except StopAsyncIteration:
                    return
                yield chunk
        finally:
            loop.run_until_complete(agen.aclose())
            loop.close()

    def stop(self, job_id: str, timeout_s: float = 60.0) -> str:
        """Ask Ray to stop the job (SIGTERM to ``batchgen run``, which records ``cancelled``)
        and wait until it has; returns Ray's final state."""
        self._call(lambda: self.client.stop_job(job_id), job_id)
        return self.wait(job_id, timeout_s)

    def wait(self, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0) -> str:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            state = _state(self.info(job_id).status)
            if state in TERMINAL or (deadline is not None and time.monotonic() > deadline):
                return state
            time.sleep(poll_s)


def submission_prefix(output: str) -> str:
    """``batchgen-<output folder name>-<hash of the output path>``: the same job, the same id."""
    norm = output.rstrip("/")
    slug = re.sub(r"[^a-z0-9]+", "-", os.path.basename(norm).lower()).strip("-")[:32] or "job"
    return f"batchgen-{slug}-{hashlib.sha256(norm.encode()).hexdigest()[:8]}"


def spec_yaml(spec: JobSpec) -> str:
    """The resolved spec as YAML, as it travels to the cluster in the Ray job's runtime_env.

    A validated spec holds no credentials (StorageSpec refuses them); this check is for a spec
    changed without validation (``model_copy``), since the runtime_env is plain text."""
    doc = spec.model_dump(mode="json")
    keys = secret_keys(doc["storage"]["options"], "storage.options")
    if keys:
        raise BatchgenError(
            f"{', '.join(keys)}: credentials in the spec would travel in plain text in the Ray "
            "job; pass them as environment variables instead (e.g. --env AWS_ACCESS_KEY_ID "
            "--env AWS_SECRET_ACCESS_KEY), or give the cluster's nodes their own credentials"
        )
    return yaml.safe_dump(doc, sort_keys=False)


def env_vars(names: tuple[str, ...]) -> dict[str, str]:
    """``--env NAME`` (value taken from here) or ``--env NAME=VALUE``."""
    out = {}
    for item in names:
        name, sep, value = item.partition("=")
        if not sep:
            if name not in os.environ:
                raise BatchgenError(f"--env {name}: not set in this environment")
            value = os.environ[name]
        out[name] = value
    return out


def local_paths(spec: JobSpec) -> list[str]:
    """Spec keys that name paths on this machine, which a remote cluster cannot see."""
    keys = {"input.path": spec.input.path, "output.path": spec.output.path}
    if spec.model.engine != "echo" and os.path.isabs(spec.model.path):
        keys["model.path"] = spec.model.path
    return [f"{k} ({v})" for k, v in keys.items() if "://" not in v]


def is_loopback(address: str) -> bool:
    host = address.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
    return host in ("localhost", "[::1]") or host.startswith("127.")


@dataclass
class JobView:
    """What ``batchgen status JOB_ID`` and ``batchgen list`` show of a Ray job; never its
    runtime_env (which holds the spec and any --env values)."""

    job_id: str
    ray_state: str
    message: str
    output: str
    endpoint_url: str | None
    start_time: float | None

    @classmethod
    def of(cls, info) -> JobView:
        meta = info.metadata or {}
        return cls(
            job_id=info.submission_id or info.job_id or "",
            ray_state=_state(info.status),
            message=one_line(info.message or ""),
            output=meta.get(META_OUTPUT, ""),
            endpoint_url=meta.get(META_ENDPOINT) or None,
            start_time=info.start_time / 1000 if info.start_time else None,
        )


def _state(status: Any) -> str:
    return str(getattr(status, "value", status)).rsplit(".", 1)[-1]


def _server_message(text: str) -> str:
    """The exception line of a traceback the Jobs API sent back, else the first line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() not in ("", ".")]
    if "Traceback" in text:
        errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception): ", ln)]
        if errors:
            return errors[-1]
    return lines[0] if lines else "request failed"
