"""Request and response bodies (pydantic): what /openapi.json publishes."""

from __future__ import annotations

from typing import Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field


class TargetSpec(BaseModel):
    """A quality target. None of them = the server's default (`max_l1` 0.07 unless configured)."""

    model_config = ConfigDict(extra="forbid")
    max_l1: float | None = Field(None,
                                 description="Mean absolute pixel error in [0, 1] the reconstruction must "
                                             "reach.", examples=[0.07])
    min_psnr: float | None = Field(None,
                                   description="PSNR in dB the clamped reconstruction must reach.", examples=[24.0])
    tokens: int | None = Field(None,
                               description="Exact token budget (a multiple of the tokens per iteration); no quality is "
                                           "measured.", examples=[128])
    max_tokens: int | None = Field(None, description="Cap on tokens for a quality target.", examples=[192])


class ImageItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = Field(..., description="The encoded image (PNG, JPEG, WebP, GIF, BMP, TIFF), base64.")
    target: TargetSpec | None = None


class TokenizeOptions(BaseModel):
    """What to return besides the tokens; the same in both request forms."""

    include_reconstruction: bool = Field(False,
                                         description="Add the reconstruction of the returned tokens as a base64 PNG.")
    all_iterations: bool = Field(False, description="Add the token ids and quality of every iteration run.")
    stream: bool = Field(False, description="Answer as NDJSON: one event per iteration, then the result.")


class TokenizeJSON(TokenizeOptions):
    """`application/json`: a batch of base64 images, each with its own target."""

    model_config = ConfigDict(extra="forbid")
    images: list[ImageItem] = Field(..., min_length=1, description="One or more images, each with its own target.")


class TokenizeForm(TargetSpec, TokenizeOptions):
    """`multipart/form-data`: one image (`file`) with the target fields and options as form fields."""

    model_config = ConfigDict(extra="forbid")
    file: UploadFile = Field(..., description="The image (PNG, JPEG, WebP, GIF, BMP, TIFF).")

    def target(self) -> dict[str, float | int]:
        """The target fields that were given, as the JSON form's `target` object holds them."""
        return {k: getattr(self, k) for k in TargetSpec.model_fields if getattr(self, k) is not None}


class IterationOut(BaseModel):
    iteration: int
    num_tokens: int
    token_ids: list[int]
    l1: float | None = None
    psnr: float | None = None


class Timings(BaseModel):
    queue_ms: float = Field(..., description="Waiting for admission.")
    compute_ms: float = Field(..., description="From admission to the answer.")
    total_ms: float = Field(..., description="The whole request for this image, cache included.")


class TokenizeResultOut(BaseModel):
    token_ids: list[int]
    num_tokens: int
    iterations: int = Field(..., description="Iterations run (the halting iteration).")
    l1: float | None = Field(None, description="L1 of the returned tokens' reconstruction; null for a token budget.")
    psnr: float | None = None
    target_met: bool
    cached: bool
    target: TargetSpec
    timings: Timings
    reconstruction_png: str | None = Field(None, description="base64 PNG, when include_reconstruction.")
    all_iterations: list[IterationOut] | None = None


class ModelRef(BaseModel):
    id: str
    fingerprint: str


class TokenizeResponse(BaseModel):
    model: ModelRef
    results: list[TokenizeResultOut]


class ReconstructJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token_ids: list[int] | list[list[int]] = Field(
        ..., description="One token sequence, or a batch of them (each a multiple of the tokens per iteration).")


class ReconstructImage(BaseModel):
    num_tokens: int
    png: str = Field(..., description="base64 PNG")


class ReconstructResponse(BaseModel):
    model: ModelRef
    images: list[ReconstructImage]


class ModelInfo(BaseModel):
    id: str
    fingerprint: str
    preset: str | None
    source: str
    image_size: int
    tokens_per_iteration: int
    max_tokens: int
    codebook_size: int
    default_target: TargetSpec
    halting: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]


class ErrorDetail(BaseModel):
    code: str
    message: str
    detail: object | None = None
    request_id: str | None = Field(None, description="The request's X-Request-ID (the caller's, or one made for it)")


class ErrorResponse(BaseModel):
    error: ErrorDetail
