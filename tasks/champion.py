"""The registered champion from any directory: load it in Python, or serve it over REST.

In Python (any working directory; the project's ``mlflow.db`` unless ``MLFLOW_TRACKING_URI`` is set)::

    from tasks.champion import load_champion
    model, version = load_champion()        # model.predict(images (B, C, H, W)) -> one row per image

Over REST: ``python -m tasks.champion serve`` (``make serve-model``) runs ``mlflow models serve`` for
the champion's exact version on 127.0.0.1 with this interpreter's environment (no new virtualenv).

Nothing here creates a tracking database: a missing one, a model that was never registered or a
missing alias is a :class:`ChampionNotFoundError` naming the tracking URI and the model.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from flows import telemetry_off
from oodgate.config import RegistryConfig
from tasks import tracking

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
    """Whether a gate reason (:meth:`oodgate.gate.Evidence.reason`) is a criterion that failed."""
    return any(w in reason for w in ("not shown", ", fails ", "not better", "missing or NaN"))


def _no_alias(name: str, alias: str, uri: str, versions: list) -> str:
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
) -> Any:
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


def load_champion(
    name: str = MODEL_NAME, alias: str = ALIAS, uri: str | None = None, version: int | None = None
) -> tuple[Any, int]:
    """``(model, version)``: the version holding ``alias`` (default the champion; ``challenger``: the
    last run's best candidate), or ``version``, as an MLflow pyfunc whose ``predict(images)`` takes
    ``(B, C, H, W)`` float images in [0, 1] (or integers 0-255, as uint8) and returns one row per image: ``p_<class>``,
    ``predicted``, ``score``, ``in_distribution`` (see ``tasks/pyfunc_model.py``)."""
    import mlflow

    version = resolve(name, alias, uri, version)
    with tracking.no_pickle():  # nothing in the registered model is pickled
        model = mlflow.pyfunc.load_model(f"models:/{name}/{version.version}")
    return model, int(version.version)


def serve_command(version: Any, name: str, host: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "--model-uri",
        f"models:/{name}/{version.version}",
        "--env-manager",
        "local",  # this interpreter's packages: no virtualenv built, nothing downloaded
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.champion", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the champion over REST with `mlflow models serve`")
    s.add_argument("--name", default=MODEL_NAME)
    s.add_argument(
        "--alias", default=ALIAS, help="champion (default), or challenger: the last run's best candidate"
    )
    s.add_argument("--version", type=int, default=None, help="a version number instead of an alias")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=5001)
    args = p.parse_args(argv)
    telemetry_off()
    from oodgate import numerics

    # before NumPy and torch load: the server (a child of this process) computes under params.yaml's numerics
    numerics.apply_from_params(tracking.PROJECT_ROOT / "params.yaml")
    uri = tracking.default_tracking_uri()
    try:
        version = resolve(args.name, args.alias, uri, args.version)
    except (ChampionNotFoundError, tracking.TrackingUnavailableError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    loss = (version.tags or {}).get("oodgate.loss", "?")
    print(
        f"Serving {args.name} version {version.version} "
        f"({'version ' + str(args.version) if args.version else args.alias}, loss {loss}) from {uri}\n"
        f"  POST http://{args.host}:{args.port}/invocations   (Ctrl-C stops it)",
        flush=True,
    )
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    # `mlflow models serve` starts uvicorn by name: this interpreter's scripts come first on PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    cmd = serve_command(version, args.name, args.host, args.port)
    os.execve(sys.executable, cmd, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
