"""The one place lossfloor connects to Ray: attach to a cluster by address, or start a local instance.

    with ray_session(address) as started:       # started: whether this call started Ray (and stops it)
        ...

`connect` fails fast (one line, exit 2 at the CLI) on an address nobody listens on instead of letting
`ray.init` retry for minutes. Inside a Ray job pass the job's address ($RAY_ADDRESS) explicitly; this
module never auto-discovers a foreign instance on the machine (address None starts a local one).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time

import ray

from lossfloor.errors import InputError


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a HOST:PORT nobody listens on (ray.init would retry for minutes); the address is an
    Engine's (its form checked there)."""
    if "://" in address or address == "auto":
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise InputError(f"--address {address}: cannot connect ({e.strerror or e.__class__.__name__})") from None


def connect(address: str | None, *, state_api: bool = False) -> tuple[bool, float]:
    """Start or attach Ray unless this process already has it; (whether we did, seconds it took).
    address: an Engine's (`--address`, the flag errors name).

    state_api: a local instance started here also runs the dashboard, which serves Ray's state API: Ray
    Train's placement-group cleaner polls it and warns every few seconds without it. The estimate engine
    does without (faster start-up)."""
    t0 = time.monotonic()
    if ray.is_initialized():
        return False, 0.0
    if address is not None:
        _check_reachable(address)
    kwargs = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address is None:
        kwargs["include_dashboard"] = state_api  # used only if this starts a new local cluster
    # Ray nices its workers to 15: on a shared machine that starves the kernel next to anything running
    # at the local engine's priority (0). A local cluster started here (the raylet inherits this
    # environment) runs its workers at 0; attaching to a running cluster changes nothing.
    saved = os.environ.get("RAY_worker_niceness")
    os.environ.setdefault("RAY_worker_niceness", "0")
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as e:
        where = f"--address {address}" if address else "a local Ray instance"
        raise InputError(f"{where}: cannot connect ({str(e).splitlines()[0] if str(e) else e.__class__.__name__})") \
            from None
    finally:
        if saved is None:
            os.environ.pop("RAY_worker_niceness", None)
    return True, time.monotonic() - t0



@contextlib.contextmanager
def ray_session(address: str | None, *, state_api: bool = False):
    """`connect`, then `ray.shutdown()` on every exit path when this call started Ray; yields whether it did."""
    started, _ = connect(address, state_api=state_api)
    try:
        yield started
    finally:
        if started:
            ray.shutdown()


@contextlib.contextmanager
def actors_killed(actors: list):
    """Run with `actors`, kill them at the end whatever happens; an InputError an actor raised (the user's
    model or file failed there) comes back as that one line, as the local engine gives it, not as Ray's
    wrapped traceback."""
    try:
        yield
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, InputError):
            raise InputError(str(e.cause)) from None
        raise
    finally:
        for actor in actors:
            ray.kill(actor)
