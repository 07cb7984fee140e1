"""The endpoint's wire format: request bodies read field by field with their JSON types checked
(a 400 naming the field otherwise), and answers built from the SDK's own models, so what the SDK
accepts here it accepts from Daytona.
"""

from __future__ import annotations

import json
import re
import stat as st
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import daytona_api_client as api
import daytona_toolbox_api_client as toolbox

from .records import DAEMON, ApiError, FileStat, SandboxRecord, SnapshotRecord

__all__ = [
    "Body",
    "Query",
    "error_body",
    "execute_json",
    "file_info_json",
    "sandbox_item_json",
    "sandbox_json",
    "snapshot_json",
]


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


def _kind(value: object) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


class Body:
    """A JSON object from a request. Each getter checks its field's type; JSON null is the same
    as a missing field, as it is to the SDK's models."""

    def __init__(self, data: object, where: str = "the request body") -> None:
        if not isinstance(data, dict):
            raise ApiError(400, f"{where} must be a JSON object, not {_kind(data)}")
        self._data: dict[str, Any] = data
        self._where = where

    def _bad(self, key: str, want: str, value: object) -> ApiError:
        return ApiError(400, f"{key} in {self._where} must be {want}, not {_kind(value)}")

    def text(self, key: str) -> str:
        """A required string."""
        value = self.opt_text(key)
        if value is None:
            raise ApiError(400, f"{key} is missing from {self._where}")
        return value

    def opt_text(self, key: str) -> str | None:
        """A string, or None."""
        value = self._data.get(key)
        if value is not None and not isinstance(value, str):
            raise self._bad(key, "a string", value)
        return value

    def opt_int(self, key: str) -> int | None:
        """An integer (not a boolean, not a fraction), or None."""
        value = self._data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise self._bad(key, "an integer", value)
        return value

    def flag(self, key: str) -> bool:
        """A boolean; missing is False."""
        value = self._data.get(key)
        if value is not None and not isinstance(value, bool):
            raise self._bad(key, "a boolean", value)
        return bool(value)

    def text_map(self, key: str) -> dict[str, str]:
        """An object of strings; missing is empty."""
        value = self._data.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self._bad(key, "an object of strings", value)
        for k, v in value.items():
            if not isinstance(v, str):
                raise ApiError(400, f"{key}.{k} in {self._where} must be a string, not {_kind(v)}")
        return dict(value)

    def text_list(self, key: str) -> list[str]:
        """An array of strings; missing is empty."""
        value = self._data.get(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._bad(key, "an array of strings", value)
        return list(value)

    def opt_obj(self, key: str) -> Body | None:
        """A nested object, or None."""
        value = self._data.get(key)
        return None if value is None else Body(value, f"{key} of {self._where}")


class Query:
    """A request's query parameters, read with their types checked (400 otherwise)."""

    def __init__(self, params: Mapping[str, str]) -> None:
        self._params = params

    def text(self, key: str, default: str = "") -> str:
        """A string; missing is ``default``."""
        return self._params.get(key, default)

    def flag(self, key: str) -> bool:
        """``true`` (anything else is False, as the toolbox reads it)."""
        return self._params.get(key) == "true"

    def integer(self, key: str, default: int, minimum: int) -> int:
        """An integer of at least ``minimum``; missing or empty is ``default``."""
        raw = self._params.get(key, "")
        if raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ApiError(400, f"query parameter {key} must be an integer, not {raw!r}") from None
        if value < minimum:
            raise ApiError(400, f"query parameter {key} must be at least {minimum}, not {value}")
        return value

    def mode(self, default: str) -> int:
        """``mode`` as octal permissions (0 to 7777)."""
        raw = self._params.get("mode") or default
        try:
            mode = int(raw, 8)
        except ValueError:
            mode = -1
        if not 0 <= mode <= 0o7777:
            raise ApiError(400, f"mode must be octal permissions like 755, not {raw!r}", None, DAEMON)
        return mode

    def labels(self) -> dict[str, str]:
        """``labels``: a JSON object of strings; missing is empty."""
        raw = self._params.get("labels")
        if not raw:
            return {}
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ApiError(400, f"the labels query parameter is not JSON: {exc}") from exc
        return Body({"labels": data}, "the query").text_map("labels")


def error_body(exc: ApiError, method: str = "", path: str = "") -> dict[str, Any]:
    """The error envelope Daytona's API and daemon answer with (the toolbox's ErrorResponse)."""
    out: dict[str, Any] = {
        "statusCode": exc.status,
        "message": exc.message,
        "source": exc.source,
        "path": path,
        "method": method,
        "timestamp": _iso(time.time()),
    }
    if exc.code:
        out["code"] = exc.code
    return out


def _dump(model: Any) -> Any:
    # to_json applies the models' aliases (camelCase) and formats; json.loads gives plain data.
    return json.loads(model.to_json())


def snapshot_json(rec: SnapshotRecord) -> dict[str, Any]:
    """A snapshot as the SDK reads it (SnapshotDto)."""
    dto = api.SnapshotDto(
        id=rec.id,
        general=False,
        name=rec.name,
        image_name=rec.image_name,
        state=api.SnapshotState(rec.state),
        size=None,
        entrypoint=None,
        cpu=rec.cpu,
        gpu=0,
        mem=rec.memory,
        disk=rec.disk,
        error_reason=rec.error,
        created_at=datetime.fromtimestamp(rec.created, timezone.utc),
        updated_at=datetime.fromtimestamp(rec.updated, timezone.utc),
        last_used_at=None,
        source_sandbox_id=rec.source_sandbox_id,
    )
    out: dict[str, Any] = _dump(dto)
    return out


def _camel(d: dict[str, Any]) -> dict[str, Any]:
    return {re.sub(r"_([a-z])", lambda m: m.group(1).upper(), k): v for k, v in d.items()}


def _box_fields(box: SandboxRecord, toolbox_url: str) -> dict[str, Any]:
    return _camel(
        {
            "id": box.id,
            "organization_id": "local",
            "name": box.name,
            "snapshot": box.snapshot,
            "user": box.user,
            "env": box.env,
            "labels": box.labels,
            "public": False,
            "network_block_all": box.network_block_all,
            "network_allow_list": box.network_allow_list,
            "domain_allow_list": box.domain_allow_list,
            "kvm": False,
            "target": box.target,
            "cpu": box.cpu,
            "gpu": 0,
            "memory": box.memory,
            "disk": box.disk,
            "state": box.state,
            "error_reason": box.error,
            "auto_stop_interval": box.auto_stop,
            "auto_delete_interval": box.auto_delete,
            "auto_archive_interval": 0,
            "created_at": _iso(box.created),
            "updated_at": _iso(box.updated),
            "toolbox_proxy_url": toolbox_url,
        }
    )


def sandbox_json(box: SandboxRecord, toolbox_url: str) -> dict[str, Any]:
    """A sandbox as the SDK reads it (Sandbox)."""
    out: dict[str, Any] = _dump(api.Sandbox.from_dict(_box_fields(box, toolbox_url)))
    return out


def sandbox_item_json(box: SandboxRecord, toolbox_url: str) -> dict[str, Any]:
    """A sandbox as a listing shows it (SandboxListItem)."""
    out: dict[str, Any] = _dump(api.SandboxListItem.from_dict(_box_fields(box, toolbox_url)))
    return out


def file_info_json(info: FileStat) -> dict[str, Any]:
    """A file's status as the toolbox answers it (FileInfo): ids inside the sandbox, 0 is root."""
    dto = toolbox.FileInfo(
        group="root" if info.gid == 0 else str(info.gid),
        is_dir=st.S_ISDIR(info.mode),
        mod_time=_iso(info.mtime),
        mode=st.filemode(info.mode),
        name=info.name,
        owner="root" if info.uid == 0 else str(info.uid),
        permissions=f"{st.S_IMODE(info.mode):04o}",
        size=info.size,
    )
    out: dict[str, Any] = _dump(dto)
    return out


def execute_json(exit_code: int, output: str) -> dict[str, Any]:
    """The answer to ``process/execute`` (ExecuteResponse)."""
    out: dict[str, Any] = _dump(toolbox.ExecuteResponse(exit_code=exit_code, result=output))
    return out
