"""A1111's options: the ones clients store, the ones Refinery honours, and A1111's error body.

A1111 keeps global options (`POST /sdapi/v1/options`) and lets one request
override them (`override_settings`). Refinery stores what clients send in
`<data-dir>/a1111-options.json`; the options the request table names
(`Faces.a1111_option`, e.g. `CLIP_stop_at_last_layers`, `sd_model_checkpoint`) set
their field on every A1111 request, `sd_model_checkpoint` must name the server's own
base or a checkpoint of its models folder and `sd_vae` the checkpoint's own VAE, and
every other option is kept and echoed without effect (docs/api.md).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse

from ...errors import InvalidRequest, StorageError
from ...request import REQUEST_FIELDS, GenerationRequest
from ..state import AppState

OPTIONS_FILE = "a1111-options.json"
OPTIONS_LOCK_FILE = f".{OPTIONS_FILE}.lock"
MAX_OPTION_DEPTH = 16  # A1111's options are flat values and lists: deeper is no client's option
MAX_OPTIONS_BYTES = 256 * 1024
# A1111's own defaults of the options its clients read back; echoed until a client sets them.
A1111_DEFAULTS: dict[str, Any] = {
    "send_seed": True, "send_size": True, "samples_format": "png", "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1,
    "eta_noise_seed_delta": 0, "sd_checkpoints_limit": 1, "show_progress_every_n_steps": 5,
}  # fmt: skip
# A1111's names for "the checkpoint's own VAE", the only one Refinery decodes with.
OWN_VAE = ("Automatic", "None")
log = logging.getLogger(__name__)
HONOURED = {spec.faces.a1111_option: spec.name for spec in REQUEST_FIELDS if spec.faces.a1111_option}


class NotServed(Exception):
    """A setting names a checkpoint or a VAE this server does not have (A1111 answers 404)."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


def a1111_error(status: int, kind: str, message: str, **extra: Any) -> JSONResponse:
    """A1111's error body: `{error, detail, body, errors}`."""
    return JSONResponse({"error": kind, "detail": message, "body": "", "errors": message, **extra}, status_code=status)


def checkpoint(state: AppState) -> dict[str, Any]:
    """The base checkpoint as A1111 names it: title `name [hash10]`, name, file."""
    reference = state.settings.base_model
    short = state.service.own_models.get("base_hash")
    return {"title": f"{reference} [{short}]" if short else reference, "model_name": reference.split("/")[-1],
            "hash": short, "filename": reference}  # fmt: skip


def check_settings(state: AppState, settings: Mapping[str, Any], prefix: str = "") -> None:
    """Refuse settings Refinery cannot honour, before anything is stored or queued.

    Args:
        settings: options as a client sends them (`POST /sdapi/v1/options`, or `override_settings`).
        prefix: how errors name the options (`override_settings.` for a request's overrides).

    Raises:
        NotServed: `sd_model_checkpoint` or `sd_vae` names something this server does not run.
        InvalidRequest: an honoured option's value breaks its field's rule, named by the option.
    """
    wanted = settings.get("sd_model_checkpoint")
    if wanted is not None:
        served = checkpoint(state)
        if str(wanted) not in {str(value) for value in served.values() if value}:
            try:  # a checkpoint of the models folder, by name, title or file name
                state.service.resolve_models(GenerationRequest(prompt="x", base_model=str(wanted)), allow_paths=False)
            except InvalidRequest as error:
                own = served["title"]
                message = f"{prefix}sd_model_checkpoint {wanted!r}: {error.rule}; this server's own is {own!r}"
                raise NotServed("CheckpointNotFound", message) from None
    vae = settings.get("sd_vae")
    if vae is not None and str(vae) not in OWN_VAE:
        own = " or ".join(OWN_VAE)
        raise NotServed("VaeNotFound", f"{prefix}sd_vae {vae!r} is not installed; images decode with the "
                                       f"checkpoint's own VAE ({own}; /sdapi/v1/sd-vae lists none)")  # fmt: skip
    for option, name in HONOURED.items():
        if settings.get(option) is not None:
            try:
                state.service.check_clip_skip(GenerationRequest(prompt="x", **{name: settings[option]}))
            except InvalidRequest as error:
                raise InvalidRequest(prefix + option, error.rule) from None


def _options_path(state: AppState) -> Path:
    return state.settings.data_dir / OPTIONS_FILE


def _depth(value: Any) -> int:
    """How deep `value` nests (a scalar is 0), counted without recursion: a hostile value may nest thousands."""
    deepest, pending = 0, [(value, 0)]
    while pending:
        item, depth = pending.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            pending.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            pending.extend((child, depth + 1) for child in item)
    return deepest


def check_shape(options: Mapping[str, Any]) -> None:
    """Raises: InvalidRequest: naming an option whose value nests deeper than `MAX_OPTION_DEPTH`."""
    for name, value in options.items():
        if (depth := _depth(value)) > MAX_OPTION_DEPTH:
            raise InvalidRequest(name, f"nests {depth} levels deep; options are kept at most {MAX_OPTION_DEPTH} deep")


def stored_options(state: AppState) -> dict[str, Any]:
    """What clients stored with `POST /sdapi/v1/options` (empty before any).

    A file this server cannot use (not JSON, not an object, or written by a version that kept over-deep
    values) is logged and read as what of it can be used, so that A1111 clients still connect.
    """
    path = _options_path(state)
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as error:
        log.error("A1111 options file %s cannot be read (%s); options start empty", path, error)
        return {}
    if not isinstance(stored, dict):
        log.error("A1111 options file %s holds a %s, not an object; options start empty", path, type(stored).__name__)
        return {}
    kept = {name: value for name, value in stored.items() if _depth(value) <= MAX_OPTION_DEPTH}
    if len(kept) < len(stored):
        log.warning("A1111 options %s nest deeper than %d levels: left out", sorted(set(stored) - set(kept)),
                    MAX_OPTION_DEPTH)  # fmt: skip
    return kept


def update_options(state: AppState, options: Mapping[str, Any]) -> None:
    """Merge `options` into the stored ones and write them, one writer at a time (a lock file, so that
    concurrent posts, from threads or from several server processes, each keep their update).

    Raises:
        InvalidRequest: field `options`, the merged options would exceed `MAX_OPTIONS_BYTES`.
        StorageError: the data folder cannot be written; the old file is kept whole.
    """
    lock = state.settings.data_dir / OPTIONS_LOCK_FILE
    try:
        with lock.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
            _store_options(state, {**stored_options(state), **options})
    except OSError as error:
        raise StorageError(f"could not store the A1111 options: {error.strerror or error}") from error


def _store_options(state: AppState, options: dict[str, Any]) -> None:
    """Write the options atomically (temporary file, then rename)."""
    text = json.dumps(options, indent=1, sort_keys=True)
    if len(text.encode()) > MAX_OPTIONS_BYTES:
        raise InvalidRequest("options", f"would take {len(text.encode())} bytes stored; at most {MAX_OPTIONS_BYTES} "
                                        f"bytes of options are kept (A1111's own come to about 30 KB)")  # fmt: skip
    path = _options_path(state)
    handle, temporary = tempfile.mkstemp(prefix=f".{OPTIONS_FILE}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except OSError:
        os.unlink(temporary)
        raise
