"""The error body and the Open Inference Protocol's request and response bodies, for validation and the OpenAPI
schema. The v1 bodies (predict, detect, model) live in :mod:`pathguard.service.responses`, which builds them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

__all__ = ["ErrorBody", "InferRequest", "InferResponse", "InferTensor"]


class ErrorBody(BaseModel):
    error: str = Field(description="What went wrong.")


class InferTensor(BaseModel):
    """An Open Inference Protocol tensor: row-major ``data`` (flat or nested) of the given shape, or (binary tensor
    data extension) no ``data`` and ``parameters.binary_data_size`` bytes after the JSON header."""

    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[InferTensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str
    outputs: list[InferTensor]
    parameters: dict[str, Any] | None = None
