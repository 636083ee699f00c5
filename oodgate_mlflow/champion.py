"""The registered champion from any directory: load it in Python, or serve it over REST.

In Python (any working directory; the project's ``mlflow.db`` unless ``MLFLOW_TRACKING_URI`` is set)::

    from oodgate_mlflow.champion import load_champion
    model, version = load_champion()        # model.predict(images (B, C, H, W)) -> one row per image

Over REST: ``python -m oodgate_mlflow.champion serve`` (``make serve-model``) runs MLflow's scoring server
(``mlflow.pyfunc.scoring_server``, what ``mlflow models serve`` runs) for the champion's exact
version on 127.0.0.1 with this interpreter's environment, from a copy whose files were verified
against the registry's record, with a request-size limit.

Nothing here creates a tracking database: a missing one, a model that was never registered or a
missing alias is a :class:`ChampionNotFoundError` naming the tracking URI and the model.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from oodgate.base import numerics
from oodgate.base.config import RegistryConfig
from oodgate.base.project import telemetry_off
from oodgate_mlflow import integrity, tracking

if TYPE_CHECKING:  # mlflow loads on first use: the CLI's errors come before it
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.pyfunc import PyFuncModel

# ASGI, as the scoring server speaks it: a message (and a scope) is a dict of plain values
Message = dict[str, object]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Message, Receive, Send], Awaitable[None]]

MODEL_NAME = RegistryConfig().model_name  # the default of params.yaml's registry.model_name
ALIAS = "champion"


class ChampionNotFoundError(LookupError):
    """No champion to load: no tracking database, no registered model, or no version with the alias."""


def _check_store(uri: str) -> None:
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise ChampionNotFoundError(
                f"no MLflow tracking database at {path} (tracking URI {uri}): run `make run` in "
                f"{tracking.PROJECT_ROOT} first, or set MLFLOW_TRACKING_URI to the store that holds the model"
            )


def _failed(reason: str) -> bool:
    """Whether a gate reason (:meth:`oodgate.deciding.gate.Evidence.reason`) is a criterion that failed."""
    return any(w in reason for w in ("not shown", ", fails ", "not better", "missing or NaN"))


def _no_alias(name: str, alias: str, uri: str, versions: list[ModelVersion]) -> str:
    """Why there is no version with ``alias``, in one line; for the champion: which version is the
    challenger, why it was not promoted, and how to use it anyway."""
    client = tracking.client()
    listed = ", ".join(sorted((str(v.version) for v in versions), key=int))
    if alias == ALIAS:
        try:
            c = client.get_model_version_by_alias(name, "challenger")
        except Exception:
            c = None
        if c is not None:
            tags = c.tags or {}
            why = next(
                (r for r in tags.get("oodgate.gate.reasons", "").split("; ") if _failed(r)),
                "the gate did not show it better than the SoftMax baseline",
            )
            return (
                f"model {name!r} at {uri} has no champion: no candidate was promoted over the SoftMax baseline; "
                f"the challenger is version {c.version} ({tags.get('oodgate.loss', '?')}, not promoted: {why}); "
                f"use it anyway with --alias challenger (make serve-model ARGS='--alias challenger', "
                f"load_champion(alias='challenger'))"
            )
    return (
        f"model {name!r} at {uri} has no version with alias {alias!r} (versions: {listed}); "
        f"pass --version N, or set it with MlflowClient().set_registered_model_alias({name!r}, {alias!r}, <version>)"
    )


def resolve(
    name: str = MODEL_NAME, alias: str = ALIAS, uri: str | None = None, version: int | None = None
) -> ModelVersion:
    """The model version that holds ``alias`` (or the given ``version``); errors name the tracking
    URI, the model and the fix."""
    from mlflow.exceptions import MlflowException

    uri = uri or tracking.default_tracking_uri()
    _check_store(uri)
    tracking.connect(uri, write=False)  # a server that does not answer fails here, with its URI
    client = tracking.client()
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as e:
        raise ChampionNotFoundError(f"cannot read model {name!r} at {uri}: {e}") from None
    if not versions:
        raise ChampionNotFoundError(
            f"no registered model {name!r} at {uri}: no candidate has passed the gate yet "
            "(the last pipeline run's gate-decision artifact says why)"
        )
    if version is not None:
        found = [v for v in versions if int(v.version) == int(version)]
        if not found:
            listed = ", ".join(sorted((str(v.version) for v in versions), key=int))
            raise ChampionNotFoundError(
                f"model {name!r} at {uri} has no version {version} (versions: {listed})"
            )
        return found[0]
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        raise ChampionNotFoundError(_no_alias(name, alias, uri, versions)) from None


def verified_copy(name: str, version: ModelVersion, dst: Path) -> Path:
    """The version's files downloaded into ``dst`` and checked against the digests recorded at
    registration (:mod:`oodgate_mlflow.integrity`); raises :class:`~oodgate_mlflow.integrity.ModelIntegrityError`
    naming the first file that differs, before anything is loaded from them."""
    local = tracking.download_model(f"models:/{name}/{version.version}", dst)
    integrity.verify(
        local, (version.tags or {}).get(integrity.TAG), f"model {name!r} version {version.version}"
    )
    return local


def load_champion(
    name: str = MODEL_NAME, alias: str = ALIAS, uri: str | None = None, version: int | None = None
) -> tuple[PyFuncModel, int]:
    """``(model, version)``: the version holding ``alias`` (default the champion; ``challenger``: the
    last run's best candidate), or ``version``, as an MLflow pyfunc whose ``predict(images)`` takes
    ``(B, C, H, W)`` float images in [0, 1] (or integers 0-255, as uint8) and returns one row per
    image: ``p_<class>``, ``predicted``, ``score``, ``in_distribution`` (see ``oodgate_mlflow/pyfunc_model.py``).
    Its files are verified against the registry's record first, and the model is loaded from the
    verified copy."""
    import mlflow

    found = resolve(name, alias, uri, version)
    with tempfile.TemporaryDirectory(prefix="oodgate-model-") as tmp:
        local = verified_copy(name, found, Path(tmp) / "model")
        with tracking.no_pickle():  # nothing in the registered model is pickled
            model = mlflow.pyfunc.load_model(str(local))
    return model, int(found.version)


MAX_REQUEST_MB = 16.0
# Python's json parser recurses once per level of nesting: 100,000 nested brackets sent to
# /invocations ended in a RecursionError, an HTTP 500 without a message. Images need depth 5.
MAX_JSON_DEPTH = 32
# A JSON string, escapes included; possessive and matching an unterminated string to the end, so one
# pass over the body whatever it holds (no backtracking, no rescanning).
_JSON_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def json_depth(body: bytes) -> int:
    """The deepest nesting of ``[`` and ``{`` in the JSON text ``body``, outside its strings, in
    linear time and without recursion (``{"inputs": [[[[0.5]]]]}`` is 5)."""
    import numpy as np

    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    opens = np.isin(np.frombuffer(brackets, np.uint8), np.frombuffer(b"[{", np.uint8))
    return max(0, int(np.cumsum(opens.astype(np.int32) * 2 - 1, dtype=np.int32).max()))


class _BodyLimit:
    """ASGI middleware: a request whose body is larger than ``limit`` bytes gets HTTP 413 and one
    line, whether it announces its length or streams it, before the model sees it (a 45 MB request
    otherwise took 0.7 GB of memory to parse); a JSON body nested deeper than :data:`MAX_JSON_DEPTH`
    gets HTTP 400 and one line."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send, int(declared))
        # The body is read here, counted, and handed on whole (the scoring server reads it whole anyway).
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message]), send)  # the client went away
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                return await self._refuse(send, seen)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        if _is_json(scope):
            depth = json_depth(body["body"])
            if depth > MAX_JSON_DEPTH:
                return await self._too_deep(send, depth)
        await self.app(scope, _replay([body], receive), send)

    async def _refuse(self, send: Send, size: int) -> None:
        body = json.dumps(
            {
                "error_code": "REQUEST_TOO_LARGE",
                "message": f"request body of {size} bytes or more exceeds the limit of {self.limit} bytes "
                f"(serve --max-request-mb); send fewer images per request",
            }
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _too_deep(self, send: Send, depth: int) -> None:
        body = json.dumps(
            {
                "error_code": "BAD_REQUEST",
                "message": f"JSON nesting depth {depth} exceeds the limit of {MAX_JSON_DEPTH}; "
                'send {"inputs": [...]} with images (batch, C, H, W)',
            }
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 400, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _is_json(scope: Message) -> bool:
    """The request's body is JSON (``application/json``, the scoring server's JSON; CSV and Parquet
    bodies are parsed without recursion, and Parquet's bytes would read as brackets)."""
    ctype = dict(scope.get("headers") or []).get(b"content-type", b"")
    return ctype.split(b";")[0].strip().lower() == b"application/json"


def _replay(messages: list[Message], then: Receive | None = None) -> Receive:
    """An ASGI ``receive`` that returns ``messages`` first, then waits on ``then`` (a disconnect)."""
    pending = list(messages)

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        if then is None:
            return {"type": "http.disconnect"}
        return await then()

    return receive


def port_in_use(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be served on (in use, or not an address of this machine), or None."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return None


def serve(name: str, version: ModelVersion, host: str, port: int, max_request_mb: float) -> None:
    """MLflow's scoring server (``mlflow.pyfunc.scoring_server``: ``/invocations``, ``/ping``,
    ``/health``, ``/version``) for the verified local copy of ``version``, under uvicorn, one worker,
    with a request-size limit."""
    import mlflow
    import uvicorn
    from mlflow.pyfunc import scoring_server

    with tempfile.TemporaryDirectory(prefix="oodgate-serve-") as tmp:
        local = verified_copy(name, version, Path(tmp) / "model")
        with tracking.no_pickle():
            model = mlflow.pyfunc.load_model(str(local))
        app = _BodyLimit(scoring_server.init(model), int(max_request_mb * 2**20))
        uvicorn.run(app, host=host, port=port, workers=1, log_level="info")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m oodgate_mlflow.champion", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a registered version over REST (MLflow's scoring server)")
    s.add_argument("--name", default=MODEL_NAME)
    s.add_argument(
        "--alias", default=ALIAS, help="champion (default), or challenger: the last run's best candidate"
    )
    s.add_argument("--version", type=int, default=None, help="a version number instead of an alias")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=5001)
    s.add_argument(
        "--max-request-mb",
        type=float,
        default=MAX_REQUEST_MB,
        help="larger requests get HTTP 413 (default 16)",
    )
    args = p.parse_args(argv)
    telemetry_off()
    # before NumPy and torch load: the model computes under params.yaml's numerics
    numerics.apply_from_params(tracking.PROJECT_ROOT / "params.yaml")
    busy = port_in_use(args.host, args.port)
    if busy is not None:
        print(
            f"error: port {args.port} on {args.host} cannot be served on ({busy}); stop what listens there "
            "or pass --port",
            file=sys.stderr,
        )
        return 2
    uri = tracking.default_tracking_uri()
    try:
        version = resolve(args.name, args.alias, uri, args.version)
    except (ChampionNotFoundError, tracking.TrackingUnavailableError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    loss = (version.tags or {}).get("oodgate.loss", "?")
    which = f"version {args.version}" if args.version else args.alias
    print(
        f"Serving {args.name} version {version.version} ({which}, loss {loss}) from {uri}\n"
        f"  POST http://{args.host}:{args.port}/invocations   (Ctrl-C stops it)",
        flush=True,
    )
    os.environ.update(MLFLOW_TRACKING_URI=uri, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    try:
        serve(args.name, version, args.host, args.port, args.max_request_mb)
    except integrity.ModelIntegrityError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
