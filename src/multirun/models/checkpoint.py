"""Checkpoint: a durable snapshot of run state, and its light-weight metadata."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import ConfigDict, Field

from multirun.models._base import Model, new_id, utcnow


class CheckpointMeta(Model):
    id: str
    run_id: str
    agent_id: str = ""
    step_id: str = ""
    name: str = ""
    created_at: datetime | None = None
    size_bytes: int = 0
    uri: str = ""
    digest: str = ""
    serializer: str = ""


class Checkpoint(Model):
    # state_data is a blob (a pickle's, a compressed one's), not UTF-8 text: base64 in JSON
    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    id: str = Field(default_factory=new_id)
    run_id: str
    agent_id: str = ""
    step_id: str = ""
    name: str = ""
    state_data: bytes = b""
    state_format: str = "json"
    context: dict[str, Any] = Field(default_factory=dict)
    environment: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=utcnow)
    size_bytes: int = 0

    def meta(self, uri: str = "", digest: str = "") -> CheckpointMeta:
        return CheckpointMeta(
            id=self.id,
            run_id=self.run_id,
            agent_id=self.agent_id,
            step_id=self.step_id,
            name=self.name,
            created_at=self.created_at,
            size_bytes=self.size_bytes,
            uri=uri,
            digest=digest,
            serializer=self.state_format,
        )
